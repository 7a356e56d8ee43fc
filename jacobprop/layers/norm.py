"""Normalization: LayerNorm (per sample) and BatchNorm (across the batch in train mode)."""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from ..errors import check_float_dtype, check_positive_int
from ..jacobian import (
    BatchNormJacobian,
    DiagonalJacobian,
    DiagonalLowRankJacobian,
    IdentityJacobian,
)
from .base import Layer, register_layer

__all__ = ["LayerNorm", "BatchNorm"]


class NormCache(NamedTuple):
    x: np.ndarray  # (B, k) input
    normalized: np.ndarray  # (B, k): xh = (x - mean) / sqrt(var + eps)
    inv_std: np.ndarray  # 1 / sqrt(var + eps): (B, 1) for LayerNorm, (k,) for BatchNorm
    mean: np.ndarray | None = None  # (k,) batch mean (BatchNorm in train mode only)
    var: np.ndarray | None = None  # (k,) unbiased batch variance (idem; None for B < 2)


class _Norm(Layer):
    """Shared construction of the normalization layers: `gamma`, `beta` of shape `(k,)`."""

    def __init__(self, features: int, *, eps: float = 1e-5, affine: bool = True,
                 dtype=np.float64):
        super().__init__()
        where = type(self).__name__
        check_positive_int(features, where=where, name="features")
        if isinstance(eps, bool) or not np.isscalar(eps) or not eps > 0:
            raise ValueError(f"{where}: `eps` must be a positive number, got {eps!r}")
        dtype = check_float_dtype(dtype, where=where)
        self.features = int(features)
        self.eps = float(eps)
        self.affine = bool(affine)
        self._dtype = dtype
        if self.affine:
            self.params["gamma"] = np.ones(self.features, dtype)
            self.params["beta"] = np.zeros(self.features, dtype)

    @classmethod
    def example(cls, input_dim, *, rng, dtype=np.float64):
        # eps sets the input scale on which the normalization bends: at a constant sample
        # (variance 0) it is sqrt(eps), and over one or two entries the Jacobian is O(eps).
        # Finite differences need that scale well above their step, hence a large eps in
        # the example; the default 1e-5 is checked against closed forms in the tests.
        layer = cls(input_dim, eps=0.1, affine=bool(rng.integers(0, 4)), dtype=dtype)
        # Parameters away from their identity start, so a wrong formula shows.
        for name, value in layer.params.items():
            value[...] = rng.uniform(0.5, 1.5, value.shape) if name == "gamma" else \
                rng.standard_normal(value.shape)
        return layer

    @property
    def input_dim(self):
        return self.features

    @property
    def dtype(self):
        return self._dtype if not self.params else self.params["gamma"].dtype

    def _affine(self, normalized):
        if not self.affine:
            return normalized
        return normalized * self.params["gamma"] + self.params["beta"]

    def _param_jacobians(self, cache):
        if not self.affine:
            return {}
        batch = cache.x.shape[0]
        return {"gamma": DiagonalJacobian(cache.normalized),
                "beta": IdentityJacobian(batch, self.features, cache.x.dtype)}

    def _param_grads(self, cache, g) -> dict:
        if not self.affine:
            return {}
        return {"gamma": np.add.reduce(g * cache.normalized, axis=0),
                "beta": np.add.reduce(g, axis=0)}

    def _scale(self, dtype) -> np.ndarray:
        """`gamma` (or ones) as `(k,)`."""
        return self.params["gamma"] if self.affine else np.ones(self.features, dtype)

    # ---- hooks of jacobprop.derivatives: per-sample and second-order terms ----
    # Per sample, y = gamma * xh + beta whatever the statistics: the parameter rows are
    # g * xh and g. Only for BatchNorm in train mode do samples meet, and every per-sample
    # path refuses that mode before it calls these.
    def _input_vjp(self, cache, g):
        # The vjp's closed form (two reductions for gamma and beta come with it); the
        # default would build the structured Jacobian first.
        return self._call_vjp(cache, g, True)[0]

    def _per_sample_grads(self, cache, g):
        if not self.affine:
            return {}
        return {"gamma": g * cache.normalized, "beta": g.copy()}

    def _per_sample_sq_norms(self, cache, g):
        if not self.affine:
            return None
        scaled = g * cache.normalized
        return np.einsum("bk,bk->b", scaled, scaled) + np.einsum("bk,bk->b", g, g)

    def _param_jvp(self, cache, tangents):
        if not self.affine:
            return None
        return cache.normalized * tangents["gamma"] + tangents["beta"]

    def _statistics_second_vjp(self, cache, g, v, tangents, need_input, axis):
        """`_second_vjp` of `y = gamma xh + beta` with `xh` normalized along `axis`.

        With `r = 1/sqrt(var + eps)`, `s = g gamma` and means along `axis` (over
        the features for LayerNorm, the batch for BatchNorm in train mode):

            gx = r (s - mean(s) - xh mean(s xh)),
            dxh = r (v - mean(v) - xh a),   a = mean(xh v),   dr = -r^2 a,

        so along `v` and `dgamma` (`ds = g dgamma`)

            d gx = -r a gx + r (ds - mean(ds) - dxh mean(s xh) - xh mean(ds xh + s dxh))

        and `d(dL/dgamma) = sum_i g dxh`; `dL/dbeta = sum_i g` does not move.
        """
        xh, r = cache.normalized, cache.inv_std
        count = max(xh.shape[axis], 1)

        def mean(values):
            return np.add.reduce(values, axis=axis, keepdims=True) / count

        dgamma = tangents.get("gamma") if self.affine else None
        dxh = None
        if v is not None:
            a = mean(xh * v)
            dxh = r * (v - mean(v) - xh * a)
        own = {} if dxh is None or not self.affine else {"gamma": np.add.reduce(g * dxh, axis=0)}
        if not need_input or (dxh is None and dgamma is None):
            return None, own
        s = g * self._scale(g.dtype)
        correlation = mean(s * xh)
        gx2 = np.zeros_like(g)
        if dxh is not None:
            gx = r * (s - mean(s) - xh * correlation)
            gx2 -= r * a * gx + r * (dxh * correlation + xh * mean(s * dxh))
        if dgamma is not None:
            ds = g * dgamma
            gx2 += r * (ds - mean(ds) - xh * mean(ds * xh))
        return gx2, own


@register_layer
class LayerNorm(_Norm):
    """Normalize each sample over its features: `y = gamma * (x - mu) / sqrt(var + eps) + beta`.

    Parameters
    ----------
    features : int
        k, the width normalized over.
    eps : float
        Added to the variance (1e-5, as PyTorch).
    affine : bool
        Learn `gamma` (ones) and `beta` (zeros), shape `(k,)`.
    dtype : floating dtype

    Notes
    -----
    Per sample: `mu = mean(x)`, `var = mean((x - mu)^2)` (biased, as PyTorch),
    `r = 1/sqrt(var + eps)`, `xh = (x - mu) r`. Then

        dy/dx = diag(gamma) r (I - 1 1^T / k - xh xh^T / k)

    exactly (eps included): diagonal plus rank 2, a `DiagonalLowRankJacobian`
    with `d = gamma r`, `U = -(d / k) [1, xh]`, `V = [1, xh]`, so products
    cost `O(k)` per sample. `dy/dgamma = diag(xh)`, `dy/dbeta = I`.
    """

    def __repr__(self):
        return f"LayerNorm({self.features}, eps={self.eps}, affine={self.affine})"

    def config(self):
        return {"features": self.features, "eps": self.eps, "affine": self.affine,
                "dtype": np.dtype(self.dtype).name}

    def _forward(self, x):
        centered = x - np.add.reduce(x, axis=1, keepdims=True) / self.features
        var = np.add.reduce(centered * centered, axis=1, keepdims=True) / self.features
        inv_std = 1 / np.sqrt(var + x.dtype.type(self.eps))
        normalized = centered * inv_std
        return self._affine(normalized), NormCache(x, normalized, inv_std)

    def _vjp(self, cache, g, need_input):
        gx = None
        if need_input:
            scaled = g * self._scale(g.dtype)
            xh, k = cache.normalized, self.features
            gx = cache.inv_std * (scaled - np.add.reduce(scaled, axis=1, keepdims=True) / k
                                  - xh * (np.add.reduce(scaled * xh, axis=1, keepdims=True) / k))
        return gx, self._param_grads(cache, g)

    def _jacobian(self, cache):
        xh = cache.normalized
        if self.features == 1:
            # One feature normalizes to 0 whatever x: the Jacobian is exactly zero, which
            # the rank-2 form would only reach up to rounding.
            return DiagonalJacobian(np.zeros_like(xh))
        diagonal = self._scale(xh.dtype) * cache.inv_std  # (B, k)
        basis = np.stack([np.ones_like(xh), xh], axis=2)  # (B, k, 2)
        return DiagonalLowRankJacobian(diagonal, -(diagonal / self.features)[:, :, None] * basis,
                                       basis)

    def _second_vjp(self, cache, g, v, tangents, need_input=True):
        return self._statistics_second_vjp(cache, g, v, tangents, need_input, axis=1)


@register_layer
class BatchNorm(_Norm):
    """Normalize each feature over the batch (train) or by running statistics (eval).

    Parameters
    ----------
    features : int
        k.
    eps : float
        Added to the variance (1e-5).
    momentum : float
        Weight of the new batch in the running statistics (0.1, as PyTorch).
    affine : bool
        Learn `gamma` (ones) and `beta` (zeros), shape `(k,)`.
    dtype : floating dtype

    Attributes
    ----------
    running_mean, running_var : ndarray `(k,)`
        Start at 0 and 1; written only by `update_state(cache)` (the training
        loop calls it), never by a forward pass.

    Notes
    -----
    Train mode, per feature j over the B samples: `mu`, biased `var`,
    `r = 1/sqrt(var + eps)`, `xh = (x - mu) r`, `y = gamma xh + beta`. Output
    sample a depends on every input sample b:

        dy_aj/dx_bk = delta_jk gamma_j r_j (delta_ab - 1/B - xh_aj xh_bj / B)

    the first Jacobian that is not block-diagonal: a `BatchNormJacobian`
    (coupled; dense form `(B, k, B, k)`), and `couples_samples` is True. The
    cache carries the batch mean and unbiased variance; `update_state` sets
    `running = (1 - momentum) running + momentum batch` (PyTorch's rule).
    Eval mode: `y = gamma (x - running_mean) / sqrt(running_var + eps) + beta`,
    a per-sample diagonal Jacobian. In both, `dy/dgamma = diag(xh)` and
    `dy/dbeta = I` per sample.
    """

    def __init__(self, features: int, *, eps: float = 1e-5, momentum: float = 0.1,
                 affine: bool = True, dtype=np.float64):
        super().__init__(features, eps=eps, affine=affine, dtype=dtype)
        if isinstance(momentum, bool) or not np.isscalar(momentum) or not 0 <= momentum <= 1:
            raise ValueError(f"BatchNorm: `momentum` must be a number in [0, 1], "
                             f"got {momentum!r}")
        self.momentum = float(momentum)
        self.running_mean = np.zeros(self.features, self._dtype)
        self.running_var = np.ones(self.features, self._dtype)

    @classmethod
    def example(cls, input_dim, *, rng, dtype=np.float64):
        layer = super().example(input_dim, rng=rng, dtype=dtype)
        layer.running_mean[...] = rng.standard_normal(input_dim)
        layer.running_var[...] = rng.uniform(0.5, 2.0, input_dim)
        # Train mode (the default): the batch-coupled Jacobian is what the registry-driven
        # contract tests must see; the testing kit checks the declared coupling. Eval mode
        # is covered by tests/test_contract.py on `example(...).eval()`-style copies.
        return layer

    def __repr__(self):
        return (f"BatchNorm({self.features}, eps={self.eps}, momentum={self.momentum}, "
                f"affine={self.affine})")

    def config(self):
        return {"features": self.features, "eps": self.eps, "momentum": self.momentum,
                "affine": self.affine, "dtype": np.dtype(self.dtype).name}

    @property
    def couples_samples(self) -> bool:
        return self.training

    def state_arrays(self):
        return {"running_mean": self.running_mean, "running_var": self.running_var}

    def load_state_arrays(self, arrays):
        expected = {"running_mean", "running_var"}
        if set(arrays) != expected:
            raise ValueError(f"{self._where}: state arrays must be {sorted(expected)}, "
                             f"got {sorted(arrays)}")
        for name in sorted(expected):
            live, value = getattr(self, name), arrays[name]
            if value.shape != live.shape or value.dtype != live.dtype:
                raise ValueError(f"{self._where}: `{name}` must be {live.dtype} {live.shape}, "
                                 f"got {value.dtype} {value.shape}")
        for name in sorted(expected):
            getattr(self, name)[...] = arrays[name]

    def update_state(self, cache) -> None:
        """Blend the batch statistics of a train-mode forward into the running ones."""
        if cache.mean is None:
            return  # an eval-mode forward computes no statistics
        if cache.var is None:
            raise ValueError(f"BatchNorm.update_state: the running variance needs the "
                             f"unbiased variance of at least 2 samples; the batch had "
                             f"{cache.x.shape[0]}")
        keep = 1 - self.momentum
        self.running_mean[...] = keep * self.running_mean + self.momentum * cache.mean
        self.running_var[...] = keep * self.running_var + self.momentum * cache.var

    def _forward(self, x):
        dtype = x.dtype
        if not self.training:
            inv_std = 1 / np.sqrt(self.running_var.astype(dtype, copy=False)
                                  + dtype.type(self.eps))
            normalized = (x - self.running_mean.astype(dtype, copy=False)) * inv_std
            return self._affine(normalized), NormCache(x, normalized, inv_std)
        batch = x.shape[0]
        mean = np.add.reduce(x, axis=0) / max(batch, 1)
        centered = x - mean
        squares = np.add.reduce(centered * centered, axis=0)
        inv_std = 1 / np.sqrt(squares / max(batch, 1) + dtype.type(self.eps))
        normalized = centered * inv_std
        unbiased = squares / (batch - 1) if batch > 1 else None
        return self._affine(normalized), NormCache(x, normalized, inv_std, mean, unbiased)

    def _vjp(self, cache, g, need_input):
        # Both Jacobians (eval diagonal, train coupled) apply in O(B k) without a block.
        gx = self._jacobian(cache)._vjp(g) if need_input else None
        return gx, self._param_grads(cache, g)

    def _jacobian(self, cache):
        scale = self._scale(cache.x.dtype) * cache.inv_std
        if cache.mean is None:
            return DiagonalJacobian(np.broadcast_to(scale, cache.x.shape))
        return BatchNormJacobian(scale, cache.normalized)

    def _second_vjp(self, cache, g, v, tangents, need_input=True):
        if cache.mean is not None:
            # Train mode: the batch statistics move with every sample, the same second
            # derivative as LayerNorm's with the batch in place of the features.
            return self._statistics_second_vjp(cache, g, v, tangents, need_input, axis=0)
        # Eval mode is affine in x: y = gamma (x - running_mean) r + beta, r fixed. The vjp
        # g gamma r (input) and sum_i g xh (gamma) move only through dgamma and v.
        r = cache.inv_std
        own = {}
        if v is not None and self.affine:
            own["gamma"] = np.add.reduce(g * v * r, axis=0)
        gx = g * tangents["gamma"] * r if need_input and self.affine else None
        return gx, own
