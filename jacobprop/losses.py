"""Losses: value, gradient and Jacobian of `L(y, t)` with respect to the network output.

A loss is not a layer: it maps the output `y` `(B, m)` and a target to one
number. With `reduction="mean"`, `L = (1/B) sum_i l(y_i, t_i)`; with "sum",
`L = sum_i l(y_i, t_i)`. `grad(y, t)` is `dL/dy` `(B, m)` (row vectors);
`jacobian(y, t)` is the same as a `(B, 1, m)` operator whose blocks are
`dL/dy_i`, ready to be chained into the network's Jacobians with `@`.
"""

from __future__ import annotations

from typing import ClassVar

import numpy as np
from scipy.special import expit, log_expit

from .dispatch import add_to_registry, resolve_dispatch, standard
from .errors import ShapeError, check_batch_matrix
from .jacobian import GeneralJacobian
from .layers.activations import stable_exp_shifted

__all__ = [
    "Loss",
    "LOSSES",
    "register_loss",
    "MSE",
    "RMSE",
    "SoftmaxCrossEntropy",
    "BinaryCrossEntropy",
]

_INTP = np.dtype(np.intp)  # comparing to a dtype, not a type, skips a conversion per call

#: Every registered loss class by name (tests and CLI read this table).
LOSSES: dict[str, type[Loss]] = {}


def register_loss(cls: type[Loss]) -> type[Loss]:
    """Class decorator: add `cls` to `LOSSES` under its class name.

    A second, different class of the same name is refused (as `register_layer`
    does): a silent overwrite would change what every test and CLI name means.
    """
    return add_to_registry(LOSSES, cls, "register_loss", "loss")


class Loss:
    """Base class: subclasses implement `_per_sample` and `_value_and_grad`.

    Parameters
    ----------
    reduction : {"mean", "sum"}
        How per-sample losses combine into `L`.
    """

    #: Values of the residual `y - t` at which the derivative of `L` jumps, as
    #: `Layer.kinks` lists the input values where a layer's does (one
    #: representation, one rule in `jacobprop.checks.kinks`). RMSE: `(0.0,)`,
    #: `L` is a scaled norm of the residual, kinked where it is 0.
    kinks: ClassVar[tuple[float, ...]] = ()
    #: `L` is a (weighted) sum of per-sample losses, so it changes by the sum of
    #: their changes; finite-difference checks batch many perturbations on that.
    separable: ClassVar[bool] = True
    #: Internal code calls `_call_value`, `_call_value_and_grad` and
    #: `_call_per_sample` (validated `y`, `t`): the private method, or the
    #: public override of a subclass (`dispatch.py`).
    _DISPATCH: ClassVar[dict[str, str]] = {
        "value": "_value",
        "value_and_grad": "_value_and_grad",
        "per_sample": "_per_sample",
    }

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        resolve_dispatch(cls)

    def __init__(self, reduction: str = "mean"):
        if reduction not in ("mean", "sum"):
            raise ValueError(
                f"{type(self).__name__}: `reduction` must be 'mean' or 'sum', got {reduction!r}"
            )
        self.reduction = reduction

    def __repr__(self):
        return f"{type(self).__name__}(reduction={self.reduction!r})"

    # ---- public API ----------------------------------------------------------
    @standard
    def value(self, y, t) -> float:
        """`L(y, t)`, a Python float."""
        y, t = self._check(y, t)
        return self._value(y, t)

    def grad(self, y, t) -> np.ndarray:
        """`dL/dy`, shape `(B, m)`."""
        y, t = self._check(y, t)
        return self._call_value_and_grad(y, t)[1]

    @standard
    def value_and_grad(self, y, t) -> tuple[float, np.ndarray]:
        """`(L, dL/dy)` in one pass."""
        y, t = self._check(y, t)
        return self._value_and_grad(y, t)

    def jacobian(self, y, t) -> GeneralJacobian:
        """`dL/dy` as a `(B, 1, m)` operator: block i is the row `dL/dy_i`."""
        return GeneralJacobian(self.grad(y, t)[:, None, :])

    @standard
    def per_sample(self, y, t) -> np.ndarray:
        """The per-sample losses `l(y_i, t_i)`, shape `(B,)`."""
        y, t = self._check(y, t)
        return self._per_sample(y, t)

    def reduce(self, per_sample: np.ndarray) -> float:
        """Combine per-sample losses into `L` (so `value == reduce(per_sample)`)."""
        return self._reduce(np.asarray(per_sample))

    def example_target(self, shape: tuple[int, int], *, rng: np.random.Generator,
                       dtype=np.float64):
        """A valid random target for outputs of `shape` `(B, m)`."""
        return rng.standard_normal(shape).astype(dtype)

    # ---- adapters: how internal paths call a user's public override --------
    def _public_value(self, y, t):
        return self.value(y, t)

    def _public_value_and_grad(self, y, t):
        return self.value_and_grad(y, t)

    def _public_per_sample(self, y, t):
        return self.per_sample(y, t)

    # ---- shared machinery ---------------------------------------------------
    def _value(self, y, t) -> float:
        return self._reduce(self._call_per_sample(y, t))

    def _weight(self, batch: int) -> float:
        return 1.0 / batch if self.reduction == "mean" else 1.0

    def _reduce(self, per_sample: np.ndarray) -> float:
        total = float(per_sample.sum())
        return total / per_sample.shape[0] if self.reduction == "mean" else total

    def _check(self, y, t):
        y = check_batch_matrix(y, where=type(self).__name__, name="y")
        return y, self._validated_target(y, t)

    def _validated_target(self, y: np.ndarray, t):
        """Check `t` against an already valid output `y`; refuse an empty batch."""
        where = type(self).__name__
        if y.shape[0] == 0:
            raise ValueError(f"{where}: the batch is empty (y has shape {y.shape}); "
                             "a loss over zero samples is undefined")
        return self._check_target(y, t, where)

    def _check_target(self, y, t, where):
        t = check_batch_matrix(t, where=where, name="t", dtype=y.dtype)
        if t.shape != y.shape:
            raise ShapeError(f"{where}: target `t` must have the shape of `y` {y.shape}, "
                             f"got {t.shape}")
        return t

    def _per_sample(self, y, t):
        raise NotImplementedError

    def _value_and_grad(self, y, t):
        raise NotImplementedError

    def _accuracy(self, y, t) -> float | None:
        """Fraction of samples the outputs classify right (validated `y`, `t`), or None
        for a loss that is not a classification loss. `fit` reports it per epoch."""
        return None

    def _hessian_product(self, y, t, v):
        """`d^2 L/dy^2 v` for `v` `(B, m)`, reduction weight included (curvature products).

        For separable losses the Hessian is block-diagonal: one `(m, m)` block
        per sample, applied to `v_i`.
        """
        raise NotImplementedError(
            f"{type(self).__name__} does not state its Hessian (`_hessian_product`), which "
            "jp.ggn and jp.hessian need"
        )


resolve_dispatch(Loss)


def check_loss(loss, *, where: str) -> Loss:
    """`loss` itself when it is a jacobprop Loss; a TypeError naming `where` otherwise."""
    if not isinstance(loss, Loss):
        raise TypeError(f"{where}: `loss` must be a jacobprop Loss, got {type(loss).__name__}")
    return loss


@register_loss
class MSE(Loss):
    """Mean squared error.

    Notes
    -----
    `l(y_i, t_i) = (1/m) sum_k (y_ik - t_ik)^2`, so with "mean" `L` is the mean
    over all `B*m` entries; `dL/dy = (2 / m) w (y - t)` with `w = 1/B` ("mean")
    or 1 ("sum").
    """

    def _per_sample(self, y, t):
        diff = y - t
        return np.einsum("bm,bm->b", diff, diff) / y.shape[1]

    def _value_and_grad(self, y, t):
        diff = y - t
        batch, m = y.shape
        value = float(np.einsum("bm,bm->", diff, diff)) / m * self._weight(batch)
        diff *= 2.0 * self._weight(batch) / m
        return value, diff

    def _hessian_product(self, y, t, v):
        # H_i = (2 w / m) I
        return v * (2.0 * self._weight(y.shape[0]) / y.shape[1])


@register_loss
class RMSE(MSE):
    """Root of the MSE over the batch: `L = sqrt(MSE(y, t))`, one number.

    Notes
    -----
    `dL/dy = dMSE/dy / (2 L)`. At exactly zero error (`L == 0`) the gradient
    is taken as 0, the minimum-norm subgradient: `L` is a scaled Euclidean
    norm of `y - t`, whose subdifferential at 0 is a ball around 0.
    `per_sample` gives the per-sample MSE; `reduce` takes the square root.
    """

    kinks = (0.0,)
    separable = False

    def _reduce(self, per_sample):
        return float(np.sqrt(super()._reduce(per_sample)))

    def _value_and_grad(self, y, t):
        mse, grad = super()._value_and_grad(y, t)
        value = float(np.sqrt(mse))
        if value == 0.0:
            return value, np.zeros_like(grad)
        grad /= 2.0 * value
        return value, grad

    def _hessian_product(self, y, t, v):
        # L = sqrt(M): H = H_M / (2L) - grad_M grad_M^T / (4 L^3), one rank-one term over
        # the whole batch (RMSE is not separable). At L == 0 the Hessian does not exist;
        # its value is taken as 0 there, as the gradient is.
        mse, grad_m = MSE._value_and_grad(self, y, t)
        value = np.sqrt(mse)
        if value == 0.0:
            return np.zeros_like(v)
        return (MSE._hessian_product(self, y, t, v) / (2 * value)
                - grad_m * (np.vdot(grad_m, v) / (4 * value**3)))


@register_loss
class SoftmaxCrossEntropy(Loss):
    """Cross-entropy of `softmax(y)` against class labels or probability rows.

    Targets are either integer labels `(B,)` with `0 <= t_i < m`, or
    probability rows `(B, m)` (non-negative, each summing to 1).

    Notes
    -----
    With log-probabilities `log p_i = y_i - logsumexp(y_i)` (computed from the
    row maximum, so any finite logits are safe):
    `l_i = -log p_i[t_i]` or `-sum_k t_ik log p_ik`, and
    `dL/dy_i = w (p_i * sum_k t_ik - t_i)`, i.e. `w (p_i - onehot(t_i))`.
    """

    def example_target(self, shape, *, rng, dtype=np.float64):
        return rng.integers(0, shape[1], size=shape[0])

    def _check_target(self, y, t, where):
        t = t if isinstance(t, np.ndarray) else np.asarray(t)
        batch, classes = y.shape
        if t.ndim == 2:
            return self._check_probabilities(y, t, where)
        if t.ndim != 1 or t.shape[0] != batch:
            raise ShapeError(
                f"{where}: target `t` must be class labels of shape ({batch},) or "
                f"probability rows of shape {y.shape}, got shape {t.shape}"
            )
        if t.dtype.kind not in "iu":
            if t.dtype.kind != "f":
                raise TypeError(f"{where}: class labels `t` must be integers, got dtype {t.dtype}")
            fractional = np.flatnonzero(t != np.round(t))
            if fractional.size:
                index = fractional[0]
                raise ValueError(
                    f"{where}: class labels `t` must be integers, got t[{index}] = {t[index]}"
                )
        if t.dtype != _INTP:
            t = t.astype(_INTP)
        # Viewed as unsigned, a negative label wraps to a huge one: one reduction finds both.
        if t.size and np.maximum.reduce(t.view(np.uintp)) >= classes:
            index = int(np.flatnonzero((t < 0) | (t >= classes))[0])
            raise ValueError(
                f"{where}: class label t[{index}] = {t[index]} is out of range for "
                f"{classes} classes (expected 0 <= label < {classes})"
            )
        return t

    def _check_probabilities(self, y, t, where):
        t = check_batch_matrix(t, where=where, name="t", dtype=y.dtype)
        if t.shape != y.shape:
            raise ShapeError(
                f"{where}: probability targets `t` must have the shape of `y` {y.shape}, "
                f"got {t.shape}"
            )
        if (t < 0).any():
            row, col = np.argwhere(t < 0)[0]
            raise ValueError(
                f"{where}: probability targets must be non-negative, got t[{row}, {col}] = "
                f"{t[row, col]}"
            )
        sums = t.sum(axis=1)
        tolerance = np.sqrt(np.finfo(t.dtype).eps) * t.shape[1]
        off = np.flatnonzero(np.abs(sums - 1) > tolerance)
        if off.size:
            raise ValueError(
                f"{where}: each probability row of `t` must sum to 1, row {off[0]} sums to "
                f"{sums[off[0]]}"
            )
        return t

    @staticmethod
    def _cross_entropies(shifted, log_sums, t):
        """`-sum_k t_ik log p_ik` per sample from `y - rowmax` and its log-sum-exp."""
        if t.ndim == 1:
            return log_sums - shifted[np.arange(shifted.shape[0]), t]
        return log_sums * t.sum(axis=1) - np.einsum("bm,bm->b", t, shifted)

    def _per_sample(self, y, t):
        shifted, exps = stable_exp_shifted(y)
        return self._cross_entropies(shifted, np.log(np.add.reduce(exps, axis=1)), t)

    def _accuracy(self, y, t):
        labels = t if t.ndim == 1 else np.argmax(t, axis=1)
        return float(np.mean(np.argmax(y, axis=1) == labels))

    def _value_and_grad(self, y, t):
        batch = y.shape[0]
        shifted, probabilities = stable_exp_shifted(y)
        # ufunc.reduce directly: ndarray.sum adds a Python-level call (hot path).
        sums = np.add.reduce(probabilities, axis=1)
        log_sums = np.log(sums)
        probabilities /= sums[:, None]
        weight = 1.0 / batch if self.reduction == "mean" else 1.0
        per_sample = self._cross_entropies(shifted, log_sums, t)
        if t.ndim == 1:
            probabilities[np.arange(batch), t] -= 1.0
        else:
            probabilities *= t.sum(axis=1)[:, None]
            probabilities -= t
        probabilities *= weight
        return float(np.add.reduce(per_sample)) * weight, probabilities

    def _hessian_product(self, y, t, v):
        # H_i = w s_i (diag(p_i) - p_i p_i^T) with s_i = sum_k t_ik (1 for labels)
        _, exps = stable_exp_shifted(y)
        p = exps / np.add.reduce(exps, axis=1, keepdims=True)
        hv = p * (v - np.einsum("bm,bm->b", p, v)[:, None])
        hv *= self._weight(y.shape[0])
        if t.ndim == 2:
            hv *= t.sum(axis=1)[:, None]
        return hv


@register_loss
class BinaryCrossEntropy(Loss):
    """Binary cross-entropy on logits, targets in `[0, 1]` with the shape of `y`.

    Notes
    -----
    `l_i = (1/m) sum_k [softplus(y_ik) - t_ik y_ik]`, with
    `softplus(z) = -log_sigmoid(-z)` so neither side overflows;
    `dL/dy = (w / m) (sigmoid(y) - t)`.
    """

    def example_target(self, shape, *, rng, dtype=np.float64):
        return rng.uniform(0.0, 1.0, size=shape).astype(dtype)

    def _check_target(self, y, t, where):
        t = super()._check_target(y, t, where)
        bad = (t < 0) | (t > 1) | np.isnan(t)
        if bad.any():
            row, col = np.argwhere(bad)[0]
            raise ValueError(
                f"{where}: targets must lie in [0, 1], got t[{row}, {col}] = {t[row, col]}"
            )
        return t

    @staticmethod
    def _entries(y, t):
        """`softplus(y) - t y`, elementwise `(B, m)`."""
        return -log_expit(-y) - t * y

    def _per_sample(self, y, t):
        return self._entries(y, t).mean(axis=1)

    def _accuracy(self, y, t):
        # A logit above 0 predicts the positive class; soft targets count by 0.5.
        return float(np.mean((y > 0) == (t > 0.5)))

    def _value_and_grad(self, y, t):
        batch, m = y.shape
        weight = self._weight(batch)
        value = float(self._entries(y, t).sum()) * weight / m
        grad = expit(y)
        grad -= t
        grad *= weight / m
        return value, grad

    def _hessian_product(self, y, t, v):
        # H_i = (w / m) diag(sigmoid(y_i) sigmoid(-y_i))
        return v * (expit(y) * expit(-y)) * (self._weight(y.shape[0]) / y.shape[1])
