"""scipy.optimize on the flat parameter vector, with exact gradients and Jacobians.

`theta` is `FlatParams(net.params)`'s vector: every parameter C-order raveled
in `params` order. `minimize` hands scipy `L(theta)` and its exact gradient
(`jac=True`); `least_squares` hands it the residuals `r(theta) = vec(net(X) - T)`
and their exact Jacobian `dr/dtheta` `(B*m, P)`, assembled from the per-layer
parameter Jacobians: as a dense matrix, or (with `tr_solver="lsmr"`) as a
`scipy.sparse.linalg.LinearOperator` that applies the structured operators
without forming them. Both write the result's parameters into the network and
return scipy's `OptimizeResult`; if scipy raises, the network gets its initial
parameters back.
"""

from __future__ import annotations

import numpy as np

from .errors import ShapeError, as_float_array
from .flat import FlatParams
from .losses import Loss, check_loss
from .network import Sequential

__all__ = ["minimize", "least_squares", "residual_jacobian"]


def minimize(net: Sequential, X, T, loss: Loss, method: str = "L-BFGS-B", **options):
    """Minimize `loss(net(X), T)` over all parameters with `scipy.optimize.minimize`.

    Parameters
    ----------
    net : Sequential
        Its current parameters are the starting point; the result's are left in it.
    X : ndarray `(B, n)`
    T : targets as `loss` takes them
    loss : Loss
    method : str
        Any gradient-based method of `scipy.optimize.minimize` ("L-BFGS-B",
        "BFGS", "CG", "trust-constr", ...).
    **options
        Passed on to `scipy.optimize.minimize` (`tol=...`, `options={"maxiter":
        ...}`, `callback=...`).

    Returns
    -------
    scipy.optimize.OptimizeResult
        `x` is the flat parameter vector (float64), `fun` the loss there.

    Notes
    -----
    The optimizer works in float64; a float32 network evaluates `L` and its
    gradient in float32, which limits how far the line searches can go.
    """
    from scipy import optimize

    problem = _Problem(net, X, "minimize")
    check_loss(loss, where="minimize")
    y = net._call_forward(problem.X)[0]
    T = loss._validated_target(y, T)

    def value_and_grad(theta):
        problem.assign(theta)
        y, cache = net._call_forward(problem.X)
        value, g = loss._call_value_and_grad(y, T)
        grads = net._call_vjp(cache, g, False)[1]
        return value, problem.flat.flatten(grads, dtype=np.float64)

    return problem.run(lambda: optimize.minimize(
        value_and_grad, problem.theta0, jac=True, method=method, **options))


def least_squares(net: Sequential, X, T, method: str = "lm", **options):
    """Fit `net(X) ~ T` with `scipy.optimize.least_squares` and the exact residual Jacobian.

    Minimizes `0.5 * sum((net(X) - T)^2)` over the flat parameters.

    Parameters
    ----------
    net : Sequential
        Its current parameters are the starting point; the result's are left in it.
    X : ndarray `(B, n)`
    T : ndarray `(B, m)` (or `(B,)` when `m == 1`)
    method : {"lm", "trf", "dogbox"}
        "lm" (Levenberg-Marquardt, MINPACK) needs `B*m >= P` and a dense Jacobian.
    **options
        Passed on (`max_nfev`, `xtol`, `ftol`, `x_scale`, ...). With
        `tr_solver="lsmr"` (trf, dogbox) the Jacobian is a `LinearOperator`.

    Returns
    -------
    scipy.optimize.OptimizeResult
        `x` the flat parameters, `cost` the final `0.5 * sum(r^2)`, `nfev`, `njev`.

    Notes
    -----
    `r(theta) = vec(net(X; theta) - T)`, sample-major, and
    `dr/dtheta` `(B*m, P)` holds per sample `i` the block `dy_i/dtheta` `(m, P)`,
    whose columns for parameter `p` are `dy_i/dvec(p)` (one layer's parameter
    Jacobian chained through the layers after it).
    """
    from scipy import optimize

    problem = _Problem(net, X, "least_squares")
    if net.couples_samples:
        # The assembly below reads one (B, m, p.size) block per key; a batch-coupled
        # operator (BatchNorm in train mode) is not laid out that way.
        raise ValueError("least_squares: the network couples samples in its current mode "
                         "(BatchNorm in train mode); call net.eval() first")
    y = net._call_forward(problem.X)[0]
    T = as_float_array(T, where="least_squares", name="T", dtype=y.dtype)
    if T.ndim == 1 and y.shape[1] == 1:
        T = T[:, None]
    if T.shape != y.shape:
        raise ShapeError(f"least_squares: `T` must have the output's shape {y.shape}, "
                         f"got {T.shape}")
    operator = options.get("tr_solver") == "lsmr"
    memo = {}

    def forward(theta):
        # scipy asks for r and J at the same theta in turn: one forward pass serves both.
        if "theta" not in memo or not np.array_equal(memo["theta"], theta):
            problem.assign(theta)
            memo["theta"] = np.array(theta, copy=True)
            memo["y"], memo["cache"] = net._call_forward(problem.X)
        return memo["y"], memo["cache"]

    def residuals(theta):
        y = forward(theta)[0]
        return (y - T).reshape(-1).astype(np.float64, copy=False)

    def jacobian(theta):
        cache = forward(theta)[1]
        return residual_jacobian(net, cache, operator=operator)

    return problem.run(lambda: optimize.least_squares(
        residuals, problem.theta0, jac=jacobian, method=method, **options))


def residual_jacobian(net: Sequential, cache, *, operator: bool = False):
    """`d vec(y)/d theta` `(B*m, P)` at a forward `cache`, dense or as a LinearOperator.

    The rows of `net.param_jacobian` (`jacobprop.derivatives.ParamJacobian`,
    one structured block per parameter in `params` order) stacked over the
    batch: row `i*m + j` is `dy_ij/dtheta`.
    """
    from scipy.sparse.linalg import LinearOperator

    from .derivatives import ParamJacobian

    jac = ParamJacobian(net._param_jacobians(cache))
    batch, m, size = jac.shape
    if not operator:
        return jac.to_dense().reshape(batch * m, size)

    def matvec(v):
        # The same parameter direction for every sample: broadcast it over the batch.
        return jac._call_jvp(np.broadcast_to(np.ravel(v), (batch, size))).reshape(-1)

    def rmatvec(u):
        return jac._sum_vjp(np.reshape(u, (batch, m)))

    return LinearOperator((batch * m, size), matvec=matvec, rmatvec=rmatvec, dtype=np.float64)


class _Problem:
    """The network, its validated input and the flat parameter layout for one solve."""

    def __init__(self, net, X, where):
        if not isinstance(net, Sequential):
            raise TypeError(f"{where}: `net` must be a jacobprop Sequential, got "
                            f"{type(net).__name__}")
        if net.stochastic:
            raise ValueError(f"{where}: the network draws random numbers in its current mode "
                             "(Dropout in train mode); call net.eval() first, a scipy "
                             "optimizer needs a deterministic objective")
        if not net.params:
            raise ValueError(f"{where}: the network has no parameters to optimize")
        self.net = net
        self.X = net._check_input(X)
        if self.X.shape[0] == 0:
            raise ValueError(f"{where}: `X` holds no samples (shape {self.X.shape})")
        dtype = net.dtype or np.float64
        if self.X.dtype != dtype:
            self.X = self.X.astype(dtype)
        self.flat = FlatParams(net.params)
        self.theta0 = self.flat.flatten(net.params, dtype=np.float64)

    def assign(self, theta) -> None:
        self.flat.assign(self.net.params, theta)

    def run(self, solve):
        try:
            result = solve()
        except BaseException:
            self.flat.assign(self.net.params, self.theta0)  # never leave a trial point behind
            raise
        self.flat.assign(self.net.params, result.x)
        return result
