"""Fully connected (affine) layer."""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from ..errors import check_float_dtype, check_positive_int, check_rng
from ..jacobian import IdentityJacobian, KroneckerJacobian, SharedJacobian
from .base import Layer, register_layer

__all__ = ["Dense"]


class DenseCache(NamedTuple):
    x: np.ndarray  # (B, in_features): the input, which dL/dW needs


@register_layer
class Dense(Layer):
    """Affine layer `y = x @ W.T + b`.

    Parameters
    ----------
    in_features, out_features : int
        Sizes n and m.
    bias : bool
        Whether to add `b`.
    rng : numpy.random.Generator, optional
        Source of the initial weights, uniform in `+-1/sqrt(in_features)`
        (PyTorch's default); a fresh unseeded generator when omitted.
    dtype : floating dtype
        float64 by default.

    Notes
    -----
    Shapes: `x` `(B, n)`, `W` `(m, n)`, `b` `(m,)`, `y` `(B, m)`.

    - `dy_i/dx_i = W` for every sample (a `SharedJacobian`);
    - `dy_i/dvec(W) = I_m (kron) x_i^T` (a `KroneckerJacobian` over `x`);
    - `dy_i/db = I_m`.

    So `dL/dx = G @ W`, `dL/dW = G^T @ X` and `dL/db = sum_i G_i`.
    """

    def __init__(self, in_features: int, out_features: int, *, bias: bool = True,
                 rng: np.random.Generator | None = None, dtype=np.float64):
        super().__init__()
        for name, value in (("in_features", in_features), ("out_features", out_features)):
            check_positive_int(value, where="Dense", name=name)
        dtype = check_float_dtype(dtype, where="Dense")
        rng = check_rng(rng, where="Dense")
        self.in_features = int(in_features)
        self.out_features = int(out_features)
        self.bias = bool(bias)
        bound = 1.0 / np.sqrt(in_features)
        self.params["W"] = rng.uniform(-bound, bound, (out_features, in_features)).astype(dtype)
        if bias:
            self.params["b"] = rng.uniform(-bound, bound, out_features).astype(dtype)

    @classmethod
    def example(cls, input_dim, *, rng, dtype=np.float64):
        return cls(input_dim, int(rng.integers(1, 6)), rng=rng, dtype=dtype)

    def config(self):
        return {"in_features": self.in_features, "out_features": self.out_features,
                "bias": self.bias, "dtype": self.params["W"].dtype.name}

    def __repr__(self):
        return f"Dense({self.in_features}, {self.out_features}, bias={self.bias})"

    @property
    def W(self) -> np.ndarray:  # noqa: N802 (the maths name)
        return self.params["W"]

    @property
    def b(self) -> np.ndarray | None:
        return self.params.get("b")

    @property
    def input_dim(self):
        return self.in_features

    def output_dim(self, input_dim):
        return self.out_features

    def _forward(self, x):
        y = x @ self.params["W"].T
        if self.bias:
            y += self.params["b"]
        return y, DenseCache(x)

    def _vjp(self, cache, g, need_input):
        grads = {"W": g.T @ cache.x}
        if self.bias:
            grads["b"] = np.add.reduce(g, axis=0)  # g.sum without its Python wrapper
        return (g @ self.params["W"] if need_input else None), grads

    def _jvp(self, cache, v):
        return v @ self.params["W"].T

    def _jacobian(self, cache):
        return SharedJacobian(self.params["W"], cache.x.shape[0])

    def _input_vjp(self, cache, g):
        return g @ self.params["W"]

    def _per_sample_grads(self, cache, g):
        # dL_i/dW = g_i x_i^T: one einsum, never a loop over samples
        grads = {"W": np.einsum("bi,bj->bij", g, cache.x)}
        if self.bias:
            grads["b"] = g.copy()  # its own array: `g` may be handed on unchanged
        return grads

    def _per_sample_sq_norms(self, cache, g):
        # ||g_i x_i^T||_F^2 = ||g_i||^2 ||x_i||^2, and ||g_i||^2 for the bias
        g_sq = np.einsum("bi,bi->b", g, g)
        total = g_sq * np.einsum("bj,bj->b", cache.x, cache.x)
        if self.bias:
            total += g_sq
        return total

    def _param_jvp(self, cache, tangents):
        # dy = x dW^T + db
        moved = cache.x @ tangents["W"].T
        if self.bias:
            moved += tangents["b"]
        return moved

    def _second_vjp(self, cache, g, v, tangents, need_input=True):
        # The vjp is bilinear: g W (input) and g^T x (weight); its derivative
        # with g fixed is g dW and g^T v. The bias gradient sum_i g_i is constant.
        own = {} if v is None else {"W": g.T @ v}
        return (g @ tangents["W"] if need_input else None), own

    def _param_jacobians(self, cache):
        batch = cache.x.shape[0]
        identity = IdentityJacobian(batch, self.out_features, self.params["W"].dtype)
        jacobians = {"W": KroneckerJacobian(identity, cache.x)}
        if self.bias:
            jacobians["b"] = identity
        return jacobians

    # The checkers' shortcuts hold for this forward only: a subclass that changes the
    # forward pass gets none unless it restates the hooks.
    def _affine_param_change(self, x, name, coords, steps):
        if not self._own_forward_is(Dense):
            return None
        if name == "W":
            rows, cols = np.divmod(coords, x.shape[1])
            return rows, steps[:, None] * x[:, cols].T
        return coords, steps[:, None]

    def _affine_input_columns(self, cols):
        if not self._own_forward_is(Dense):
            return None
        return self.params["W"][:, cols].T
