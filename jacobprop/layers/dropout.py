"""Dropout: random masking in train mode, the identity in eval mode."""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from ..errors import check_rng
from ..jacobian import DiagonalJacobian, IdentityJacobian
from .base import Layer, register_layer

__all__ = ["Dropout"]


class DropoutCache(NamedTuple):
    x: np.ndarray  # (B, n) input
    mask: np.ndarray | None  # (B, n): 0 or 1/(1-p) per entry in train mode; None in eval mode


@register_layer
class Dropout(Layer):
    """Zero each entry with probability `p` and scale the kept ones by `1/(1-p)` (train mode).

    Parameters
    ----------
    p : float
        Drop probability, in `[0, 1]`.
    rng : numpy.random.Generator, optional
        The layer's own source of masks (a fresh unseeded generator when
        omitted); nothing global is used.

    Notes
    -----
    Train mode: `y = x * mask` with `mask_ij = 1[u_ij >= p] / (1 - p)`, `u`
    uniform from `rng` (all zeros for `p = 1`, as PyTorch). The mask is part
    of the cache, so the backward pass uses the forward's mask:
    `dy/dx = diag(mask)`. Every train-mode forward draws a new mask
    (`stochastic` is True), so finite differences must hold the mask fixed.
    Eval mode: `y = x`, `dy/dx = I`.
    """

    def __init__(self, p: float = 0.5, *, rng: np.random.Generator | None = None):
        super().__init__()
        if isinstance(p, bool) or not np.isscalar(p) or not 0 <= p <= 1:
            raise ValueError(f"Dropout: `p` must be a probability in [0, 1], got {p!r}")
        rng = check_rng(rng, where="Dropout")
        self.p = float(p)
        self.rng = rng

    @classmethod
    def example(cls, input_dim, *, rng, dtype=np.float64):
        layer = cls(float(rng.uniform(0.1, 0.6)), rng=np.random.default_rng(rng.integers(2**32)))
        # Eval mode here: every registry-driven test may call the example twice and expect
        # one function. Train mode is covered on its own in tests/test_contract.py: every
        # checker refuses it clearly, `jacobprop.testing.checkable` switches it to eval
        # mode, and its maths is checked against finite differences with the mask fixed.
        layer.training = False
        return layer

    def __repr__(self):
        return f"Dropout(p={self.p})"

    def config(self):
        return {"p": self.p}

    @property
    def stochastic(self) -> bool:
        return self.training and self.p > 0

    def _forward(self, x):
        if not self.training:
            return x, DropoutCache(x, None)
        if self.p == 1:
            mask = np.zeros(x.shape, x.dtype)
        else:
            keep = self.rng.random(x.shape) >= self.p
            mask = keep * x.dtype.type(1 / (1 - self.p))
        return x * mask, DropoutCache(x, mask)

    def _vjp(self, cache, g, need_input):
        if not need_input:
            return None, {}
        return (g if cache.mask is None else g * cache.mask), {}

    def _jvp(self, cache, v):
        return v if cache.mask is None else v * cache.mask

    def _jacobian(self, cache):
        x = cache.x
        if cache.mask is None:
            return IdentityJacobian(x.shape[0], x.shape[1], x.dtype)
        return DiagonalJacobian(cache.mask)

    def _second_vjp(self, cache, g, v, tangents, need_input=True):
        return None, {}  # linear given the cached mask
