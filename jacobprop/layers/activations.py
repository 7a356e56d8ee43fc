"""Activation layers: elementwise nonlinearities and softmax.

Each elementwise layer states its function and its derivative side by side;
the shared base turns the derivative into a diagonal Jacobian and a vjp.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
from scipy.special import expit, log_expit, ndtr

from ..jacobian import (
    DiagonalJacobian,
    IdentityJacobian,
    SoftmaxJacobian,
    softmax_block_product,
)
from .base import Layer, register_layer

__all__ = ["Identity", "ReLU", "LeakyReLU", "Sigmoid", "Tanh", "Softplus", "Softmax", "GELU",
           "SiLU", "ELU"]


class ActivationCache(NamedTuple):
    x: np.ndarray  # (B, n) input
    y: np.ndarray | None  # (B, n) output where the Jacobian needs it (softmax), else None


def stable_exp_shifted(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """`(x - rowmax, exp(x - rowmax))` for `(B, n)` logits of any finite magnitude.

    The exponent is never positive, so nothing overflows; terms below the
    smallest normal number become exact zeros rather than raising under a
    caller's `np.errstate(all="raise")` (that underflow is the right answer).
    """
    # ufunc.reduce directly: ndarray.max/sum add a Python-level call each.
    shifted = x - np.maximum.reduce(x, axis=1, keepdims=True)
    return shifted, _exp_nonpositive(shifted)


def _exp_nonpositive(z: np.ndarray) -> np.ndarray:
    """`exp(z)` for `z <= 0`: values below the smallest normal become exact zeros (the
    right answer) instead of raising under a caller's `np.errstate(all="raise")`."""
    try:
        # numpy ignores underflow by default; entering errstate on every call
        # would cost more than the exp itself at small sizes.
        return np.exp(z)
    except FloatingPointError:
        with np.errstate(under="ignore"):
            return np.exp(z)


def _finite_alpha(alpha, where: str) -> float:
    """`alpha` (LeakyReLU's slope, ELU's scale) as a float; a bool or a non-finite is refused."""
    if isinstance(alpha, bool) or not np.isscalar(alpha) or not np.isfinite(alpha):
        raise ValueError(f"{where}: `alpha` must be a finite real number, got {alpha!r}")
    return float(alpha)


class Elementwise(Layer):
    """Base of `y_j = f(x_j)`: the Jacobian is `diag(f'(x))` `(B, n)`."""

    elementwise = True

    def _forward(self, x):
        return self._function(x), ActivationCache(x, None)

    def _function(self, x):
        raise NotImplementedError

    def _derivative(self, cache):
        """`f'(x)` with the shape and dtype of `x`."""
        raise NotImplementedError

    def _vjp(self, cache, g, need_input):
        return (g * self._derivative(cache) if need_input else None), {}

    def _jvp(self, cache, v):
        return v * self._derivative(cache)

    def _jacobian(self, cache):
        return DiagonalJacobian(self._derivative(cache))

    def _second_derivative(self, cache):
        """`f''(x)` with the shape of `x`, or None where f is piecewise linear."""
        raise NotImplementedError(
            f"{type(self).__name__} does not state its second derivative "
            "(`_second_derivative`), which exact Hessian products need"
        )

    def _second_vjp(self, cache, g, v, tangents, need_input=True):
        # d/de [g * f'(x + e v)] = g * f''(x) * v
        if v is None or not need_input:
            return None, {}
        second = self._second_derivative(cache)
        return (None if second is None else g * second * v), {}


@register_layer
class Identity(Layer):
    """`y = x`; the Jacobian is the identity.

    Notes
    -----
    `dy/dx = I_n`, stored as an `IdentityJacobian` (no array).
    """

    elementwise = True

    def _forward(self, x):
        return x, ActivationCache(x, None)

    def _vjp(self, cache, g, need_input):
        return g, {}

    def _jvp(self, cache, v):
        return v

    def _jacobian(self, cache):
        x = cache.x
        return IdentityJacobian(x.shape[0], x.shape[1], x.dtype)

    def _second_vjp(self, cache, g, v, tangents, need_input=True):
        return None, {}  # linear


@register_layer
class ReLU(Elementwise):
    """`y = max(x, 0)`.

    Notes
    -----
    `dy/dx = diag(1[x > 0])`. At `x == 0` the derivative is taken as 0 (as in
    PyTorch and JAX); any value in `[0, 1]` is a valid subgradient there.
    """

    kinks = (0.0,)

    def _forward(self, x):
        # The base class's forward without its `_function` call: ReLU sits in every hot loop.
        return np.maximum(x, 0), ActivationCache(x, None)

    def _derivative(self, cache):
        return (cache.x > 0).astype(cache.x.dtype)

    def _vjp(self, cache, g, need_input):
        # Multiplying by the boolean mask skips the float cast of the derivative.
        return (g * (cache.x > 0) if need_input else None), {}

    def _second_derivative(self, cache):
        return None  # zero away from the kink


@register_layer
class LeakyReLU(Elementwise):
    """`y = x` for `x > 0`, else `alpha * x`.

    Parameters
    ----------
    alpha : float
        Slope on the negative side (0.01 by default).

    Notes
    -----
    `dy/dx = diag(1 if x > 0 else alpha)`; at `x == 0` the derivative is
    `alpha` (as in PyTorch).
    """

    kinks = (0.0,)

    def __init__(self, alpha: float = 0.01):
        super().__init__()
        self.alpha = _finite_alpha(alpha, "LeakyReLU")

    @classmethod
    def example(cls, input_dim, *, rng, dtype=np.float64):
        return cls(alpha=float(rng.uniform(0.01, 0.5)))

    def config(self):
        return {"alpha": self.alpha}

    def __repr__(self):
        return f"LeakyReLU(alpha={self.alpha})"

    def _function(self, x):
        return np.where(x > 0, x, self.alpha * x)

    def _derivative(self, cache):
        x = cache.x
        return np.where(x > 0, 1.0, self.alpha).astype(x.dtype)

    def _second_derivative(self, cache):
        return None  # zero away from the kink


@register_layer
class Sigmoid(Elementwise):
    """`y = 1 / (1 + exp(-x))`, computed without overflow on either side.

    Notes
    -----
    `dy/dx = diag(y * (1 - y))`, evaluated as `sigmoid(x) * sigmoid(-x)`: the
    factor `1 - y` computed from a rounded `y` near 1 would lose every digit.
    """

    saturation = 30.0

    def _function(self, x):
        return expit(x)

    def _derivative(self, cache):
        x = cache.x
        return expit(x) * expit(-x)

    def _second_derivative(self, cache):
        # y' (1 - 2y), with 1 - 2 sigmoid(x) = sigmoid(-x) - sigmoid(x) (no cancellation
        # of a rounded y near 1)
        up, down = expit(cache.x), expit(-cache.x)
        return up * down * (down - up)


@register_layer
class Tanh(Elementwise):
    """`y = tanh(x)`.

    Notes
    -----
    `dy/dx = diag(1 - y^2)`, evaluated as `4 sigmoid(2x) sigmoid(-2x)`, which
    keeps full relative precision where `1 - y^2` would cancel (large |x|,
    float32 especially) and never overflows as `1 / cosh(x)^2` would.
    """

    saturation = 15.0

    def _function(self, x):
        return np.tanh(x)

    def _derivative(self, cache):
        twice = 2 * cache.x
        derivative = expit(twice)
        derivative *= expit(-twice)
        derivative *= 4
        return derivative

    def _second_derivative(self, cache):
        # d/dx (1 - y^2) = -2 y (1 - y^2)
        return -2 * np.tanh(cache.x) * self._derivative(cache)


@register_layer
class Softplus(Elementwise):
    """`y = log(1 + exp(x))`, computed as `-log_sigmoid(-x)` so it never overflows.

    Notes
    -----
    `dy/dx = diag(sigmoid(x))`.
    """

    saturation = 30.0

    def _function(self, x):
        return -log_expit(-x)

    def _derivative(self, cache):
        return expit(cache.x)

    def _second_derivative(self, cache):
        return expit(cache.x) * expit(-cache.x)


@register_layer
class Softmax(Layer):
    """`y_i = exp(x_i) / sum_k exp(x_ik)` per sample, shifted by the row maximum.

    Notes
    -----
    `dy_i/dx_i = diag(y_i) - y_i y_i^T` (a `SoftmaxJacobian` storing `y`), so
    `vjp(g)_i = y_i * (g_i - <g_i, y_i>)`, and the jvp is the same (symmetric).
    """

    saturation = 30.0

    def _forward(self, x):
        y = softmax(x)
        return y, ActivationCache(x, y)

    def _vjp(self, cache, g, need_input):
        return (softmax_block_product(cache.y, g) if need_input else None), {}

    def _jvp(self, cache, v):
        # The block is symmetric, so the jvp is the vjp formula.
        return softmax_block_product(cache.y, v)

    def _jacobian(self, cache):
        return SoftmaxJacobian(cache.y)

    def _second_vjp(self, cache, g, v, tangents, need_input=True):
        # vjp = s * (g - <g, s>); moving x along v moves s by r = s * (v - <v, s>),
        # so with g fixed: r * (g - <g, s>) - s <g, r>.
        if v is None or not need_input:
            return None, {}
        s = cache.y
        r = softmax_block_product(s, v)
        return (r * (g - np.einsum("bn,bn->b", g, s)[:, None])
                - s * np.einsum("bn,bn->b", g, r)[:, None]), {}


def softmax(x: np.ndarray) -> np.ndarray:
    """Row-wise softmax of `(B, n)` logits, stable for any finite magnitude."""
    _, exps = stable_exp_shifted(x)
    exps /= np.add.reduce(exps, axis=1, keepdims=True)
    return exps


# ---- smooth activations of the second round -----------------------------------------
_INV_SQRT_2PI = 1 / np.sqrt(2 * np.pi)


@register_layer
class GELU(Elementwise):
    """`y = x Phi(x)`, Phi the standard normal CDF (exact, with erf: PyTorch's default).

    Notes
    -----
    `dy/dx = diag(Phi(x) + x phi(x))`, `phi(x) = exp(-x^2/2) / sqrt(2 pi)`.
    `Phi` is `scipy.special.ndtr`, accurate in the far left tail where
    `0.5 (1 + erf(x / sqrt 2))` would cancel to 0.
    """

    def _function(self, x):
        return x * ndtr(x)

    def _derivative(self, cache):
        x = cache.x
        density = _exp_nonpositive(-0.5 * x * x) * x.dtype.type(_INV_SQRT_2PI)
        return ndtr(x) + x * density

    def _second_derivative(self, cache):
        # d/dx [Phi + x phi] = phi + phi + x phi' = phi (2 - x^2), since phi' = -x phi.
        # Beyond |x| = 40, phi is 0 in every float format; the clip keeps x^2 finite.
        x = np.clip(cache.x, -40, 40)
        density = _exp_nonpositive(-0.5 * x * x) * x.dtype.type(_INV_SQRT_2PI)
        return density * (2 - x * x)


@register_layer
class SiLU(Elementwise):
    """`y = x sigmoid(x)` (also called swish).

    Notes
    -----
    `dy/dx = diag(sigmoid(x) + x sigmoid(x) sigmoid(-x))`, with `sigmoid(-x)`
    in place of `1 - sigmoid(x)`, which loses every digit for large x.
    """

    def _function(self, x):
        return x * expit(x)

    def _derivative(self, cache):
        x = cache.x
        s = expit(x)
        return s + x * s * expit(-x)

    def _second_derivative(self, cache):
        # With s = sigmoid(x), s' = s (1 - s): f'' = s(1-s) (2 + x (1 - 2s)); 1 - s is
        # sigmoid(-x) and 1 - 2s = sigmoid(-x) - sigmoid(x), both exact for large |x|.
        x = cache.x
        s, t = expit(x), expit(-x)
        return s * t * (2 + x * (t - s))


@register_layer
class ELU(Elementwise):
    """`y = x` for `x > 0`, else `alpha (exp(x) - 1)` (with `expm1`, exact near 0).

    Parameters
    ----------
    alpha : float
        Value approached as `x -> -inf` is `-alpha` (1.0 by default).

    Notes
    -----
    `dy/dx = diag(1 if x > 0 else alpha exp(x))`. For `alpha != 1` the slope
    jumps at 0 (a kink); at `x == 0` the derivative is `alpha` (PyTorch's
    choice).
    """

    kinks = (0.0,)

    def __init__(self, alpha: float = 1.0):
        super().__init__()
        self.alpha = _finite_alpha(alpha, "ELU")

    @classmethod
    def example(cls, input_dim, *, rng, dtype=np.float64):
        return cls(alpha=float(rng.uniform(0.2, 2.0)))

    def config(self):
        return {"alpha": self.alpha}

    def __repr__(self):
        return f"ELU(alpha={self.alpha})"

    def _function(self, x):
        # expm1 of the clipped input: no overflow warning from the branch np.where drops.
        return np.where(x > 0, x, self.alpha * np.expm1(np.minimum(x, 0)))

    def _derivative(self, cache):
        x = cache.x
        return np.where(x > 0, 1, x.dtype.type(self.alpha) * _exp_nonpositive(np.minimum(x, 0)))

    def _second_derivative(self, cache):
        # 0 for x > 0, alpha exp(x) for x <= 0: the same side of the kink as `_derivative`.
        x = cache.x
        return np.where(x > 0, 0, x.dtype.type(self.alpha) * _exp_nonpositive(np.minimum(x, 0)))
