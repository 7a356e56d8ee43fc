"""The batch-coupled operators: output sample i depends on every input sample.

Their `shape` is still `(B, m, n)` (numerator layout), but `to_dense()` is
`(B, m, B, n)`, `vjp` / `jvp` act on the whole batch, `batch_sum()` sums over
both batch axes and every per-sample path (indexing a sample, a per-sample
scipy view) refuses them (class attribute `couples_samples = True`). Kept in
their own module because composing or adding one with any operator stays
coupled, a rule none of the per-sample operators needs to know.

| class                    | what it is                                                 |
|--------------------------|------------------------------------------------------------|
| `CoupledJacobian`        | base class; composing it with anything stays coupled       |
| `BatchNormJacobian`      | train-mode BatchNorm, `s_j (d_ab - 1/B - xh_aj xh_bj / B)` |
| `CoupledProduct`         | a product of factors, at least one coupled                 |
| `CoupledSum`             | a weighted sum of terms (Residual around a coupled block)  |
| `DenseCoupledJacobian`   | a materialized `(B, m, B, n)` array                        |

`coupled_dense(op)` gives any operator, coupled or not, as that `(B, m, B, n)` array.
"""

from __future__ import annotations

import numpy as np

from ..errors import ShapeError
from .base import Jacobian, _array_of_layout, _compose

__all__ = [
    "CoupledJacobian",
    "BatchNormJacobian",
    "CoupledProduct",
    "CoupledSum",
    "DenseCoupledJacobian",
    "coupled_dense",
]


# ---------------------------------------------------------------------------
def coupled_dense(op: Jacobian) -> np.ndarray:
    """`op` as a `(B, m, B, n)` array: a per-sample operator's blocks on the sample diagonal."""
    if op.couples_samples:
        return op.to_dense()
    blocks = op._dense_view()
    batch, m, n = blocks.shape
    dense = np.zeros((batch, m, batch, n), dtype=blocks.dtype)
    dense[np.arange(batch), :, np.arange(batch), :] = blocks
    return dense


class CoupledJacobian(Jacobian, abstract=True):
    """Base of the batch-coupled operators: output sample i depends on every input sample.

    Notes
    -----
    `shape == (B, m, n)` like every operator, but the operator is one
    `(B*m, B*n)` matrix that is not block-diagonal: `to_dense()` returns it as
    `(B, m, B, n)`, `vjp(g)` / `jvp(v)` map `(B, m)` <-> `(B, n)` across the
    whole batch, and `batch_sum()` is `sum_{i, b} J[i, :, b, :]` `(m, n)`
    (for a covector times a parameter Jacobian that is the gradient). Any
    composition with it, on either side, is a `CoupledProduct`; any sum a
    `CoupledSum`. Taking a sample (`J[i]`, `to_scipy(sample=i)`) is refused.
    """

    couples_samples = True
    kind = "coupled"

    def _factors(self) -> tuple[Jacobian, ...]:
        return (self,)

    def _take(self, index):
        raise ValueError(
            f"{type(self).__name__}: this Jacobian couples the samples of the batch (a "
            f"train-mode BatchNorm is in the chain), so it has no per-sample blocks to take; "
            f"use to_dense() for the (B, m, B, n) array, or vjp/jvp on the whole batch"
        )

    def _batch_sum(self):
        # Row j of the sum is the summed vjp of the unit covector e_j in every sample.
        batch, m, n = self.shape
        rows = np.empty((m, n), dtype=self.dtype)
        for j in range(m):
            unit = np.zeros((batch, m), dtype=self.dtype)
            unit[:, j] = 1
            rows[j] = self._sum_vjp(unit)
        return rows

    def _apply(self, right):
        raise TypeError(f"{type(self).__name__}: a batch-coupled operator has no per-sample "
                        f"blocks to apply; compose it with @ instead")

    _rapply = _apply

    def _matmul(self, other):
        return CoupledProduct(self._factors() + _factors_of(other))

    def _rmatmul(self, other):
        return CoupledProduct(_factors_of(other) + self._factors())

    def _add(self, other):
        return CoupledSum((self, other))

    def _scale(self, scalar):
        return CoupledSum((self,), (scalar,))

    # ---- product costs (plan.py) ----------------------------------------------------
    # A product with a coupled operator is kept as its factors (CoupledProduct): nothing
    # is multiplied across the batch, but a per-sample operator next to a per-sample end
    # factor is merged into it by its own rule. The end factor's other side is not in
    # `shape`, so the merge is costed as `other` applied to `n` (or `m`) columns.
    @classmethod
    def _matmul_cost(cls, shape, other, other_shape):
        if getattr(other, "couples_samples", False):
            return CoupledProduct, 0
        return CoupledProduct, other._rapply_cost(other_shape, shape[2])

    @classmethod
    def _rmatmul_cost(cls, shape, other, other_shape):
        if getattr(other, "couples_samples", False):
            return CoupledProduct, 0
        return CoupledProduct, other._apply_cost(other_shape, shape[1])

    @classmethod
    def _stored_items(cls, shape):
        batch, m, n = shape[:3]
        return batch * (m + n)  # the factors' own arrays, about a batch of rows each side


def _factors_of(op: Jacobian) -> tuple[Jacobian, ...]:
    return op._factors() if isinstance(op, CoupledJacobian) else (op,)


class BatchNormJacobian(CoupledJacobian):
    """Train-mode BatchNorm: `J[a, j, b, k] = delta_jk s_j (delta_ab - 1/B - xh_aj xh_bj / B)`.

    Parameters
    ----------
    scale : ndarray `(k,)`
        `s = gamma / sqrt(var + eps)` per feature (`1 / sqrt(var + eps)`
        without affine parameters).
    normalized : ndarray `(B, k)`
        `xh = (x - mean) / sqrt(var + eps)`, batch statistics.

    Notes
    -----
    For each feature the batch sees `s (I_B - 1 1^T / B - xh xh^T / B)`: a
    symmetric rank-2 update of the identity across samples, so the operator
    is its own transpose and `vjp(g) = jvp(g) = s (g - mean_b g - xh
    mean_b(xh g))`, `O(B k)`; the dense form is `(B, k, B, k)`.
    """

    def __init__(self, scale, normalized):
        self.scale = _array_of_layout(scale, "BatchNormJacobian", "scale", "(k)")
        self.normalized = _array_of_layout(normalized, "BatchNormJacobian", "normalized",
                                           "(B, k)")
        batch, k = self.normalized.shape
        self.shape = (batch, k, k)
        self.dtype = np.result_type(self.scale, self.normalized)

    def _vjp(self, g):
        xh = self.normalized
        batch = max(xh.shape[0], 1)
        mean = np.add.reduce(g, axis=0) / batch
        correlation = np.add.reduce(g * xh, axis=0) / batch
        return self.scale * (g - mean - xh * correlation)

    _jvp = _vjp

    def _to_dense(self):
        xh = self.normalized
        batch, k = xh.shape
        # (B, B, k): the across-sample matrix of each feature.
        across = (np.eye(batch, dtype=self.dtype)[:, :, None] - 1.0 / batch
                  - xh[:, None, :] * xh[None, :, :] / batch) * self.scale
        dense = np.zeros((batch, k, batch, k), dtype=self.dtype)
        features = np.arange(k)
        dense[:, features, :, features] = across.transpose(2, 0, 1)
        return dense

    def _transpose(self):
        return self


class CoupledProduct(CoupledJacobian):
    """`F_1 @ F_2 @ ... @ F_r`, at least one factor coupled; each factor kept as it is.

    Notes
    -----
    `vjp` runs the factors' vjps left to right, `jvp` right to left, so a
    product costs the sum of its factors' costs. Adjacent per-sample factors
    are merged with their own product rule when the product is built.
    """

    def __init__(self, factors):
        merged: list[Jacobian] = []
        for factor in factors:
            if merged and not merged[-1].couples_samples and not factor.couples_samples:
                merged[-1] = _compose(merged[-1], factor)
            else:
                merged.append(factor)
        self.factors = tuple(merged)
        first, last = self.factors[0], self.factors[-1]
        self.shape = (first.batch_size, first.out_dim, last.in_dim)
        self.dtype = np.result_type(*[factor.dtype for factor in self.factors])

    def _factors(self):
        return self.factors

    def _vjp(self, g):
        for factor in self.factors:
            g = factor._call_vjp(g)
        return g

    def _jvp(self, v):
        for factor in reversed(self.factors):
            v = factor._call_jvp(v)
        return v

    def _sum_vjp(self, g):
        for factor in self.factors[:-1]:
            g = factor._call_vjp(g)
        # The last factor sums over samples its own way (one GEMM for Dense and conv).
        return self.factors[-1]._sum_vjp(g)

    def _to_dense(self):
        dense = coupled_dense(self.factors[-1])
        batch, _, _, n = dense.shape
        for factor in reversed(self.factors[:-1]):
            if factor.couples_samples:
                dense = np.einsum("imbk,bkcn->imcn", factor.to_dense(), dense)
            else:
                k = dense.shape[1]
                dense = factor._apply(dense.reshape(batch, k, batch * n))
                dense = dense.reshape(batch, -1, batch, n)
        return dense

    def _transpose(self):
        return CoupledProduct(tuple(factor.T for factor in reversed(self.factors)))


class CoupledSum(CoupledJacobian):
    """`sum_t c_t J_t` of operators of one shape, at least one coupled (Residual: `I + J`).

    Notes
    -----
    `vjp` / `jvp` sum the terms' products: the cost is the sum of theirs. The
    dense form embeds each per-sample term on the sample diagonal.
    """

    def __init__(self, terms, coefficients=None):
        self.terms = tuple(terms)
        self.coefficients = (tuple(1.0 for _ in self.terms) if coefficients is None
                             else tuple(coefficients))
        self.shape = self.terms[0].shape
        self.dtype = np.result_type(*[term.dtype for term in self.terms])

    def _vjp(self, g):
        return sum(c * term._call_vjp(g) for c, term in zip(self.coefficients, self.terms,
                                                            strict=True))

    def _jvp(self, v):
        return sum(c * term._call_jvp(v) for c, term in zip(self.coefficients, self.terms,
                                                            strict=True))

    def _to_dense(self):
        return sum(c * coupled_dense(term) for c, term in zip(self.coefficients, self.terms,
                                                              strict=True))

    def _transpose(self):
        return CoupledSum(tuple(term.T for term in self.terms), self.coefficients)

    def _add(self, other):
        return CoupledSum((*self.terms, other), (*self.coefficients, 1.0))

    def _scale(self, scalar):
        return CoupledSum(self.terms, tuple(scalar * c for c in self.coefficients))


class DenseCoupledJacobian(CoupledJacobian):
    """A materialized coupled operator, `data` `(B, m, B, n)` (explicit mode, `dense=True`).

    Notes
    -----
    `vjp(g)_b = sum_i g_i data[i, :, b, :]`, `jvp` likewise: `O(B^2 m n)` each.
    """

    def __init__(self, data):
        self.data = _array_of_layout(data, "DenseCoupledJacobian", "data", "(B, m, B, n)")
        batch, m, other, n = self.data.shape
        if other != batch:
            raise ShapeError(f"DenseCoupledJacobian: `data` must be (B, m, B, n), got "
                             f"{self.data.shape}")
        self.shape = (batch, m, n)
        self.dtype = self.data.dtype

    def _vjp(self, g):
        return np.einsum("im,imbn->bn", g, self.data)

    def _jvp(self, v):
        return np.einsum("imbn,bn->im", self.data, v)

    def _to_dense(self):
        return self.data.copy()

    def _dense_view(self):
        return self.data

    def _transpose(self):
        return DenseCoupledJacobian(self.data.transpose(2, 3, 0, 1))

    @classmethod
    def _stored_items(cls, shape):
        batch, m, n = shape[:3]
        return batch * m * batch * n
