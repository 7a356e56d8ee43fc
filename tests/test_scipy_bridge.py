"""scipy bridges: the optimum of linear least squares (against numpy.linalg.lstsq), the
residual Jacobian against finite differences, the result left in the network."""

import numpy as np
import pytest

import jacobprop as jp
from jacobprop.flat import FlatParams
from jacobprop.scipy_bridge import residual_jacobian


def linear_problem(seed, n=4, m=2, batch=30):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((batch, n))
    t = rng.standard_normal((batch, m))
    net = jp.Sequential(jp.Dense(n, m, rng=rng))
    # min ||[x 1] [W b]^T - t||: the least-squares solution with an intercept column.
    solution = np.linalg.lstsq(np.hstack([x, np.ones((batch, 1))]), t, rcond=None)[0]
    return net, x, t, solution[:n].T, solution[n]


def test_minimize_reaches_the_least_squares_optimum():
    net, x, t, W, b = linear_problem(1)
    result = jp.minimize(net, x, t, jp.MSE(), options={"gtol": 1e-12, "ftol": 1e-15})
    assert result.success
    assert np.allclose(net[0].params["W"], W, atol=1e-6)
    assert np.allclose(net[0].params["b"], b, atol=1e-6)
    assert np.array_equal(FlatParams(net.params).flatten(net.params), result.x)


@pytest.mark.parametrize("method, options", [
    ("lm", {}),
    ("trf", {}),
    ("trf", {"tr_solver": "lsmr"}),  # the Jacobian as a LinearOperator
])
def test_least_squares_reaches_the_least_squares_optimum(method, options):
    net, x, t, W, b = linear_problem(2)
    result = jp.least_squares(net, x, t, method=method, xtol=1e-14, ftol=1e-14, **options)
    assert result.success
    assert np.allclose(net[0].params["W"], W, atol=1e-8)
    assert np.allclose(net[0].params["b"], b, atol=1e-8)
    residual = net(x) - t
    assert result.cost == pytest.approx(0.5 * np.sum(residual**2), rel=1e-12)


def tanh_net(seed, dtype=np.float64):
    rng = np.random.default_rng(seed)
    return jp.Sequential(jp.Dense(2, 5, rng=rng, dtype=dtype), jp.Tanh(),
                         jp.Dense(5, 3, rng=rng, dtype=dtype), jp.Sigmoid())


@pytest.mark.parametrize("batch", [1, 4])
def test_residual_jacobian_against_finite_differences(batch):
    net = tanh_net(3 + batch)
    x = np.random.default_rng(batch).standard_normal((batch, 2))
    flat = FlatParams(net.params)
    theta = flat.flatten(net.params)
    dense = residual_jacobian(net, net.forward(x)[1])
    assert dense.shape == (batch * 3, flat.size)
    h = 1e-6
    numeric = np.empty_like(dense)
    for j in range(flat.size):
        plus, minus = theta.copy(), theta.copy()
        plus[j] += h
        minus[j] -= h
        flat.assign(net.params, plus)
        y_plus = net(x).reshape(-1)
        flat.assign(net.params, minus)
        numeric[:, j] = (y_plus - net(x).reshape(-1)) / (2 * h)
    flat.assign(net.params, theta)
    assert np.allclose(dense, numeric, rtol=1e-6, atol=1e-8)


def test_residual_jacobian_operator_matches_the_dense_matrix():
    net = tanh_net(9)
    rng = np.random.default_rng(10)
    x = rng.standard_normal((6, 2))
    cache = net.forward(x)[1]
    dense = residual_jacobian(net, cache)
    operator = residual_jacobian(net, cache, operator=True)
    v, u = rng.standard_normal(dense.shape[1]), rng.standard_normal(dense.shape[0])
    assert np.allclose(operator.matvec(v), dense @ v, rtol=1e-12, atol=1e-14)
    assert np.allclose(operator.rmatvec(u), dense.T @ u, rtol=1e-12, atol=1e-14)


def test_minimize_on_a_classifier_lowers_the_loss_and_keeps_float32():
    net = tanh_net(11, dtype=np.float32)
    rng = np.random.default_rng(12)
    x = rng.standard_normal((20, 2)).astype(np.float32)
    t = (rng.uniform(size=(20, 3)) > 0.5).astype(np.float32)
    loss = jp.BinaryCrossEntropy()
    before = loss.value(net(x), t)
    result = jp.minimize(net, x, t, loss, options={"maxiter": 30})
    assert loss.value(net(x), t) < before
    assert result.fun == pytest.approx(loss.value(net(x), t), rel=1e-5)
    assert all(v.dtype == np.float32 for v in net.params.values())


def test_a_failing_solve_leaves_the_initial_parameters():
    net, x, t, _, _ = linear_problem(13)
    before = {k: v.copy() for k, v in net.params.items()}
    with pytest.raises(ValueError):
        jp.least_squares(net, x[:2], t[:2], method="lm")  # lm needs B*m >= P (4 < 10)
    assert all(np.array_equal(net.params[k], before[k]) for k in before)


def test_an_error_mid_solve_leaves_the_initial_parameters():
    net, x, t, _, _ = linear_problem(15)
    before = {k: v.copy() for k, v in net.params.items()}

    def stop(theta):
        raise RuntimeError("stop here")

    with pytest.raises(RuntimeError, match="stop here"):
        jp.minimize(net, x, t, jp.MSE(), method="BFGS", callback=stop)
    assert all(np.array_equal(net.params[k], before[k]) for k in before)


class Coupled(jp.Identity):
    """Claims to couple samples (as BatchNorm in train mode) or to draw random numbers."""

    def __init__(self, coupled=True, stochastic=False):
        super().__init__()
        self._coupled, self._stochastic = coupled, stochastic

    @property
    def couples_samples(self):
        return self._coupled

    @property
    def stochastic(self):
        return self._stochastic


def test_coupled_or_random_networks_are_refused():
    rng = np.random.default_rng(16)
    x, t = rng.standard_normal((5, 2)), rng.standard_normal((5, 1))
    coupled = jp.Sequential(jp.Dense(2, 1, rng=rng), Coupled())
    with pytest.raises(ValueError, match="couples samples.*net.eval"):
        jp.least_squares(coupled, x, t)
    random = jp.Sequential(jp.Dense(2, 1, rng=rng), Coupled(False, True))
    with pytest.raises(ValueError, match="random numbers.*net.eval"):
        jp.minimize(random, x, t, jp.MSE())


def test_bad_arguments():
    net, x, t, _, _ = linear_problem(14)
    with pytest.raises(jp.ShapeError, match="`T` must have the output's shape"):
        jp.least_squares(net, x, t[:, :1])
    with pytest.raises(TypeError, match="`loss`"):
        jp.minimize(net, x, t, "mse")
    with pytest.raises(TypeError, match="Sequential"):
        jp.minimize(net[0], x, t, jp.MSE())
