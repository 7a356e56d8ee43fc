"""Optimizers: `SGD` and `Adam` (with AdamW's decoupled weight decay).

`opt.step(params, grads)` updates the live arrays of `params` in place with
the same formulas, in the same order of operations, as `torch.optim.SGD`,
`torch.optim.Adam` and `torch.optim.AdamW` (single-tensor CPU path, no
AMSGrad, no dampening). The optimizer's state (momentum buffers, moment
estimates, the step count) is kept per parameter key in the optimizer, apart
from the parameters, as in optax: the same `params` dict can be handed to
another optimizer, and `state_dict()` / `load_state_dict()` copy the state
out and back (training's rollback, resuming from a file).

The learning rate is a number or a schedule: any callable `lr(step) -> float`
of the 0-based index of the update about to be made (optax's convention), so
`lambda k: 0.1 * 0.5 ** (k // 100)` halves it every 100 steps.
"""

from __future__ import annotations

import numbers
from collections.abc import Callable

import numpy as np

from .errors import ShapeError

__all__ = ["Optimizer", "SGD", "Adam"]


def _is_nonnegative(value) -> bool:
    """A finite real number >= 0 (a bool is not a number here)."""
    return (not isinstance(value, bool) and isinstance(value, numbers.Real)
            and bool(np.isfinite(value)) and value >= 0)


def _check_nonnegative(where: str, name: str, value) -> float:
    if not _is_nonnegative(value):
        raise ValueError(f"{where}: `{name}` must be a finite number >= 0, got {value!r}")
    return float(value)


class Optimizer:
    """Base class: validate `(params, grads)`, then apply `_update` key by key.

    Parameters
    ----------
    lr : float or callable
        Learning rate, or a schedule `lr(step) -> float` of the 0-based step.

    Attributes
    ----------
    steps : int
        Updates made so far (torch's per-parameter `step`, shared by all keys
        because every key is updated on every step).
    state : dict[str, dict[str, ndarray]]
        Per parameter key, the optimizer's arrays (created on the first step).
    """

    #: Names of the per-key state arrays, in the order `state_dict` lists them.
    state_names: tuple[str, ...] = ()

    def __init__(self, lr):
        where = type(self).__name__
        if not callable(lr):
            lr = _check_nonnegative(where, "lr", lr)
        self.lr: float | Callable[[int], float] = lr
        self.steps = 0
        self.state: dict[str, dict[str, np.ndarray]] = {}
        # The layout (keys, shapes, dtypes) the state was built for, fixed on the first step.
        self._layout: tuple | None = None

    # ---- public API ------------------------------------------------------------------
    def step(self, params: dict[str, np.ndarray], grads: dict[str, np.ndarray]) -> None:
        """Update every array of `params` in place from `grads` (same keys and shapes).

        A mismatch (missing or extra key, wrong shape, non-float gradient, a
        parameter layout other than the one the state was built for) raises
        before anything is written.
        """
        lr = self.current_lr()
        self._check(params, grads)
        self._apply(params, grads, lr)

    def current_lr(self) -> float:
        """The learning rate of the next step (the schedule evaluated at `steps`)."""
        if not callable(self.lr):
            return self.lr
        lr = self.lr(self.steps)
        if not _is_nonnegative(lr):
            raise ValueError(f"{type(self).__name__}: the schedule `lr` returned {lr!r} at "
                             f"step {self.steps}; expected a finite number >= 0")
        return float(lr)

    def state_dict(self) -> dict:
        """A deep copy of the state: `{"steps": int, "state": {key: {name: ndarray}}}`."""
        return {
            "steps": self.steps,
            "state": {
                key: {name: array.copy() for name, array in arrays.items()}
                for key, arrays in self.state.items()
            },
        }

    def load_state_dict(self, state: dict) -> None:
        """Replace the state by a copy of `state` (as `state_dict` returns it)."""
        where = f"{type(self).__name__}.load_state_dict"
        steps = state.get("steps")
        if isinstance(steps, bool) or not isinstance(steps, numbers.Integral) or steps < 0:
            raise ValueError(f"{where}: `steps` must be an integer >= 0, got {steps!r}")
        arrays = state.get("state", {})
        for key, named in arrays.items():
            if set(named) != set(self.state_names):
                raise ValueError(f"{where}: state of {key!r} must hold {self.state_names}, "
                                 f"got {tuple(named)}")
        self.steps = int(steps)
        self.state = {
            key: {name: np.array(named[name], copy=True) for name in self.state_names}
            for key, named in arrays.items()
        }
        self._layout = tuple(
            (key, named[self.state_names[0]].shape, named[self.state_names[0]].dtype)
            for key, named in self.state.items()
        ) if self.state_names and self.state else None

    def config(self) -> dict:
        """Constructor arguments as JSON values (a schedule cannot be saved: None)."""
        return {"lr": None if callable(self.lr) else self.lr}

    def _apply(self, params, grads, lr: float) -> None:
        """The update without the checks, for callers whose grads match by construction
        (`fit` checks the layout once per fit, then calls this on every step)."""
        if not self.state:
            self.state = {key: self._init_state(value) for key, value in params.items()}
        step = self.steps + 1
        state = self.state
        for key, param in params.items():
            self._update(param, grads[key], state[key], lr, step)
        self.steps = step

    # ---- checks -------------------------------------------------------------------------
    def _check(self, params, grads) -> None:
        where = f"{type(self).__name__}.step"
        if not isinstance(params, dict) or not isinstance(grads, dict):
            raise TypeError(f"{where}: `params` and `grads` must be dicts of arrays, got "
                            f"{type(params).__name__} and {type(grads).__name__}")
        if params.keys() != grads.keys():
            missing = [k for k in params if k not in grads]
            extra = [k for k in grads if k not in params]
            raise KeyError(f"{where}: `grads` must have the keys of `params`; missing "
                           f"{missing}, unexpected {extra}; nothing was updated")
        for key, param in params.items():
            grad = grads[key]
            if not isinstance(param, np.ndarray) or param.dtype.kind != "f":
                raise TypeError(f"{where}: parameter {key!r} must be a floating ndarray, got "
                                f"{type(param).__name__} {getattr(param, 'dtype', '')}")
            if not isinstance(grad, np.ndarray) or grad.dtype.kind != "f":
                raise TypeError(f"{where}: gradient {key!r} must be a floating ndarray, got "
                                f"{type(grad).__name__} {getattr(grad, 'dtype', '')}")
            if grad.shape != param.shape:
                raise ShapeError(f"{where}: gradient {key!r} must have the parameter's shape "
                                 f"{param.shape}, got {grad.shape}; nothing was updated")
        layout = tuple((key, value.shape, value.dtype) for key, value in params.items())
        if self.state and self._layout is not None and layout != self._layout:
            raise ValueError(f"{where}: the state was built for parameters {self._layout}, "
                             f"got {layout}; use a new optimizer for a new network")
        if not self.state:  # no state yet: the layout of this call is the one it will hold
            self._layout = layout

    # ---- the update, per key --------------------------------------------------------
    def _init_state(self, param: np.ndarray) -> dict[str, np.ndarray]:
        return {name: np.zeros_like(param) for name in self.state_names}

    def _update(self, param, grad, state, lr: float, step: int) -> None:
        raise NotImplementedError


class SGD(Optimizer):
    """Stochastic gradient descent with momentum, Nesterov and weight decay.

    Parameters
    ----------
    lr : float or callable
        Learning rate `eta` (or a schedule of the step).
    momentum : float
        `mu`; 0 for plain SGD.
    nesterov : bool
        Nesterov momentum (needs `momentum > 0`).
    weight_decay : float
        `lambda`, added to the gradient (L2 penalty `lambda/2 |p|^2`).

    Notes
    -----
    As `torch.optim.SGD` (dampening 0), for each parameter `p` with gradient `g`:

    - `g <- g + lambda p`;
    - with momentum: `b <- g` on the first step, else `b <- mu b + g`; then
      `g <- g + mu b` (Nesterov) or `g <- b`;
    - `p <- p - eta g`.
    """

    state_names = ("momentum_buffer",)

    def __init__(self, lr=0.01, *, momentum: float = 0.0, nesterov: bool = False,
                 weight_decay: float = 0.0):
        super().__init__(lr)
        self.momentum = _check_nonnegative("SGD", "momentum", momentum)
        self.weight_decay = _check_nonnegative("SGD", "weight_decay", weight_decay)
        self.nesterov = bool(nesterov)
        if self.nesterov and self.momentum == 0:
            raise ValueError("SGD: `nesterov=True` needs `momentum > 0`, got momentum=0")
        if self.momentum == 0:
            self.state_names = ()

    def __repr__(self):
        return (f"SGD(lr={self.lr!r}, momentum={self.momentum}, nesterov={self.nesterov}, "
                f"weight_decay={self.weight_decay})")

    def config(self) -> dict:
        return {**super().config(), "momentum": self.momentum, "nesterov": self.nesterov,
                "weight_decay": self.weight_decay}

    def _update(self, param, grad, state, lr, step):
        if self.weight_decay:
            grad = grad + self.weight_decay * param  # a new array: the caller's grad is theirs
        if self.momentum:
            buffer = state["momentum_buffer"]
            if step == 1:
                buffer[...] = grad
            else:
                buffer *= self.momentum
                buffer += grad
            if self.nesterov:
                grad = grad + self.momentum * buffer
            else:
                grad = buffer
        param -= lr * grad


class Adam(Optimizer):
    """Adam, and AdamW with `decoupled=True`.

    Parameters
    ----------
    lr : float or callable
        Learning rate `eta` (or a schedule of the step).
    betas : (float, float)
        `beta1, beta2` in `[0, 1)`: decay of the first and second moment estimates.
    eps : float
        Added to the root of the second moment.
    weight_decay : float
        `lambda`: added to the gradient (Adam), or multiplying the parameter
        by `1 - eta lambda` before the update (AdamW, `decoupled=True`).
    decoupled : bool
        AdamW's decoupled weight decay (Loshchilov & Hutter).

    Notes
    -----
    As `torch.optim.Adam` / `AdamW` (no AMSGrad), at step `k = 1, 2, ...`:

    - `g <- g + lambda p` (Adam) or `p <- p (1 - eta lambda)` (AdamW);
    - `m <- lerp(m, g, 1 - beta1)`, i.e. `m + (1 - beta1)(g - m)`;
    - `v <- beta2 v + (1 - beta2) g^2`;
    - `p <- p - (eta / (1 - beta1^k)) m / (sqrt(v) / sqrt(1 - beta2^k) + eps)`.
    """

    state_names = ("exp_avg", "exp_avg_sq")

    def __init__(self, lr=1e-3, *, betas=(0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.0, decoupled: bool = False):
        super().__init__(lr)
        try:
            beta1, beta2 = (float(b) for b in betas)
        except (TypeError, ValueError):
            raise ValueError(f"Adam: `betas` must be two numbers, got {betas!r}") from None
        for name, beta in (("betas[0]", beta1), ("betas[1]", beta2)):
            if not 0.0 <= beta < 1.0:
                raise ValueError(f"Adam: `{name}` must lie in [0, 1), got {beta!r}")
        self.betas = (beta1, beta2)
        self.eps = _check_nonnegative("Adam", "eps", eps)
        self.weight_decay = _check_nonnegative("Adam", "weight_decay", weight_decay)
        self.decoupled = bool(decoupled)

    def __repr__(self):
        return (f"Adam(lr={self.lr!r}, betas={self.betas}, eps={self.eps}, "
                f"weight_decay={self.weight_decay}, decoupled={self.decoupled})")

    def config(self) -> dict:
        return {**super().config(), "betas": list(self.betas), "eps": self.eps,
                "weight_decay": self.weight_decay, "decoupled": self.decoupled}

    def _update(self, param, grad, state, lr, step):
        beta1, beta2 = self.betas
        if self.weight_decay:
            if self.decoupled:
                param *= 1 - lr * self.weight_decay
            else:
                grad = grad + self.weight_decay * param
        exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
        _lerp_(exp_avg, grad, 1 - beta1)
        # Products in torch's order (addcmul_: v + ((1 - beta2) g) g; addcdiv_:
        # p + ((-step_size) m) / denominator), so the roundings agree too.
        exp_avg_sq *= beta2
        squared = grad * (1 - beta2)
        squared *= grad
        exp_avg_sq += squared
        step_size = lr / (1 - beta1**step)
        denominator = np.sqrt(exp_avg_sq)
        denominator /= (1 - beta2**step) ** 0.5
        denominator += self.eps
        update = exp_avg * -step_size
        update /= denominator
        param += update


def _lerp_(start: np.ndarray, end: np.ndarray, weight: float) -> None:
    """`start <- start + weight (end - start)` in place, rounded as torch's `lerp_`.

    torch evaluates from the nearer end: `start + w (end - start)` for `|w| < 0.5`,
    else `end - (end - start)(1 - w)`; matching it keeps the moments identical.
    """
    difference = end - start
    if abs(weight) < 0.5:
        difference *= weight
        start += difference
    else:
        difference *= 1 - weight
        np.subtract(end, difference, out=start)

