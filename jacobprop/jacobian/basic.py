"""The per-sample operators with no spatial structure, and their product rules.

Same conventions as `jacobprop.jacobian.base`: an operator stands for B blocks
of shape `(m, n)` (numerator layout), stores only what its structure needs, and
never forms a block unless asked with `to_dense()` / `to_sparse()`. These are the
operators the dense, elementwise and fully connected layers return, kept
together because their product rules refer to one another.

| class                | per-sample block            | stored as                   |
|----------------------|-----------------------------|-----------------------------|
| `GeneralJacobian`    | anything                    | `(B, m, n)`                 |
| `SharedJacobian`     | the same `M` for every i    | `(m, n)` once               |
| `DiagonalJacobian`   | `diag(d_i)`                 | `(B, n)`                    |
| `IdentityJacobian`   | `I_n`                       | the size only               |
| `SoftmaxJacobian`    | `diag(s_i) - s_i s_i^T`     | `(B, n)`                    |
| `KroneckerJacobian`  | `L_i (kron) x_i^T`          | a Jacobian `L` and `(B, q)` |

and `_TransposedJacobian`, the transpose of an operator with no cheaper
transposed form of its own.

The Dense weight Jacobian `dy_i/dvec(W) = I_out (kron) x_i^T` is a
`KroneckerJacobian` with `L = I`; a row of covectors times it stays Kronecker,
which is why the explicit backward mode gets `dL/dW = G^T X` in one matmul.
"""

from __future__ import annotations

import numpy as np
import scipy.sparse as sparse

from ..errors import ShapeError
from .base import Jacobian, _array_of_layout, _compose, _taken_size

__all__ = [
    "GeneralJacobian",
    "SharedJacobian",
    "DiagonalJacobian",
    "IdentityJacobian",
    "SoftmaxJacobian",
    "KroneckerJacobian",
    "softmax_block_product",
]


# ---------------------------------------------------------------------------
class GeneralJacobian(Jacobian):
    """Per-sample blocks with no structure, stored as a `(B, m, n)` array.

    Notes
    -----
    `vjp(g)_i = g_i @ data_i` and `jvp(v)_i = data_i @ v_i`; composing with it
    on either side asks the other operator to act on `data`, so the result
    costs no more than the other operator's own structure allows.
    """

    kind = "general"

    def __init__(self, data):
        data = _array_of_layout(data, "GeneralJacobian", "data", "(B, m, n)")
        self.data = data
        self.shape = data.shape
        self.dtype = data.dtype

    def _vjp(self, g):
        return (g[:, None, :] @ self.data)[:, 0, :]

    def _jvp(self, v):
        return (self.data @ v[:, :, None])[:, :, 0]

    def _sum_vjp(self, g):
        # One matmul over the flattened batch instead of B small ones.
        batch, m, n = self.shape
        return g.reshape(batch * m) @ self.data.reshape(batch * m, n)

    def _batch_sum(self):
        return self.data.sum(axis=0)

    def _to_dense(self):
        return self.data.copy()

    def _dense_view(self):
        return self.data

    def _transpose(self):
        return GeneralJacobian(self.data.swapaxes(1, 2))

    def _take(self, index):
        return GeneralJacobian(self.data[index])

    def _apply(self, right):
        return self.data @ right

    def _rapply(self, left):
        return left @ self.data

    def _add(self, other):
        return GeneralJacobian(self.data + other._dense_view())

    def _scale(self, scalar):
        return GeneralJacobian(scalar * self.data)


class SharedJacobian(Jacobian):
    """The same `(m, n)` matrix for every sample (Dense: `dy/dx = W`).

    Notes
    -----
    `vjp(g) = g @ M` and `jvp(v) = v @ M^T` are single matmuls over the batch;
    shared @ shared is shared and costs `m k n`, independent of B.
    """

    kind = "shared"

    def __init__(self, matrix, batch_size: int):
        matrix = _array_of_layout(matrix, "SharedJacobian", "matrix", "(m, n)")
        self.matrix = matrix
        self.shape = (int(batch_size), *matrix.shape)
        self.dtype = matrix.dtype

    def _vjp(self, g):
        return g @ self.matrix

    def _jvp(self, v):
        return v @ self.matrix.T

    def _sum_vjp(self, g):
        return g.sum(axis=0) @ self.matrix

    def _batch_sum(self):
        return self.batch_size * self.matrix

    def _to_dense(self):
        return np.repeat(self.matrix[None], self.batch_size, axis=0)

    def _transpose(self):
        return SharedJacobian(self.matrix.T, self.batch_size)

    def _take(self, index):
        return SharedJacobian(self.matrix, _taken_size(self.batch_size, index))

    def _apply(self, right):
        if right.ndim == 2:
            return self.matrix @ right
        # One GEMM over the flattened batch beats numpy's loop of B small ones.
        batch, n, k = right.shape
        flat = right.swapaxes(1, 2).reshape(batch * k, n) @ self.matrix.T
        return flat.reshape(batch, k, self.out_dim).swapaxes(1, 2)

    def _rapply(self, left):
        if left.ndim == 2:
            return left @ self.matrix
        batch, k, m = left.shape
        return (left.reshape(batch * k, m) @ self.matrix).reshape(batch, k, self.in_dim)

    def _matmul(self, other):
        if isinstance(other, SharedJacobian):
            return SharedJacobian(self.matrix @ other.matrix, self.batch_size)
        if isinstance(other, DiagonalJacobian):
            # W diag(d_i): scale the columns of W per sample.
            return GeneralJacobian(self.matrix[None, :, :] * other.diagonal[:, None, :])
        return NotImplemented

    def _rmatmul(self, other):
        if isinstance(other, DiagonalJacobian):
            # diag(d_i) W: scale the rows of W per sample.
            return GeneralJacobian(other.diagonal[:, :, None] * self.matrix[None, :, :])
        return NotImplemented

    def _add(self, other):
        if isinstance(other, SharedJacobian):
            return SharedJacobian(self.matrix + other.matrix, self.batch_size)
        return NotImplemented

    def _scale(self, scalar):
        return SharedJacobian(scalar * self.matrix, self.batch_size)

    @classmethod
    def _matmul_cost(cls, shape, other, other_shape):
        batch, m, k = shape
        if issubclass(other, SharedJacobian):
            return SharedJacobian, m * k * other_shape[2]
        if issubclass(other, DiagonalJacobian):
            return GeneralJacobian, batch * m * k
        return NotImplemented

    @classmethod
    def _rmatmul_cost(cls, shape, other, other_shape):
        if issubclass(other, DiagonalJacobian):
            return GeneralJacobian, shape[0] * shape[1] * shape[2]
        return NotImplemented

    @classmethod
    def _apply_cost(cls, shape, k):
        # the GEMM, plus the copy that lays the stack out for it (see `_apply`)
        batch, m, n = shape
        return batch * m * n * k + batch * n * k

    @classmethod
    def _stored_items(cls, shape):
        return shape[1] * shape[2]

    def to_sparse(self):
        return sparse.csr_array(
            sparse.kron(sparse.identity(self.batch_size, format="csr"), self.matrix)
        )


class DiagonalJacobian(Jacobian):
    """Per-sample diagonal blocks `diag(d_i)` (elementwise activations).

    Notes
    -----
    `vjp(g) = g * d` and `jvp(v) = v * d`; the operator is its own transpose
    and diagonal @ diagonal multiplies the diagonals.
    """

    kind = "diagonal"

    def __init__(self, diagonal):
        diagonal = _array_of_layout(diagonal, "DiagonalJacobian", "diagonal", "(B, n)")
        self.diagonal = diagonal
        batch, n = diagonal.shape
        self.shape = (batch, n, n)
        self.dtype = diagonal.dtype

    def _vjp(self, g):
        return g * self.diagonal

    _jvp = _vjp

    def _sum_vjp(self, g):
        return np.einsum("bn,bn->n", g, self.diagonal)

    def _batch_sum(self):
        return np.diag(self.diagonal.sum(axis=0))

    def _to_dense(self):
        batch, n, _ = self.shape
        dense = np.zeros(self.shape, dtype=self.dtype)
        dense[:, np.arange(n), np.arange(n)] = self.diagonal
        return dense

    def _transpose(self):
        return self

    def _take(self, index):
        return DiagonalJacobian(self.diagonal[index])

    def _apply(self, right):
        return self.diagonal[:, :, None] * right

    def _rapply(self, left):
        return left * self.diagonal[:, None, :]

    def _matmul(self, other):
        if isinstance(other, DiagonalJacobian):
            return DiagonalJacobian(self.diagonal * other.diagonal)
        return NotImplemented

    def _add(self, other):
        if isinstance(other, DiagonalJacobian):
            return DiagonalJacobian(self.diagonal + other.diagonal)
        if isinstance(other, IdentityJacobian):
            return DiagonalJacobian(self.diagonal + 1)
        return NotImplemented

    def _scale(self, scalar):
        return DiagonalJacobian(scalar * self.diagonal)

    @classmethod
    def _matmul_cost(cls, shape, other, other_shape):
        if issubclass(other, DiagonalJacobian):
            return DiagonalJacobian, shape[0] * shape[1]
        return NotImplemented

    @classmethod
    def _apply_cost(cls, shape, k):
        return shape[0] * shape[1] * k

    _rapply_cost = _apply_cost

    @classmethod
    def _stored_items(cls, shape):
        return shape[0] * shape[1]

    def to_sparse(self):
        size = self.diagonal.size
        return sparse.csr_array(
            (self.diagonal.reshape(-1), np.arange(size), np.arange(size + 1)), shape=(size, size)
        )


class IdentityJacobian(Jacobian):
    """Identity blocks `I_n` (bias Jacobian, Identity layer, skip paths); stores no array.

    Notes
    -----
    `vjp(g) = g`, `jvp(v) = v`; composing with it returns the other operator.
    """

    kind = "identity"

    def __init__(self, batch_size: int, size: int, dtype=np.float64):
        self.shape = (int(batch_size), int(size), int(size))
        self.dtype = np.dtype(dtype)

    def _vjp(self, g):
        return g

    _jvp = _vjp

    def _sum_vjp(self, g):
        return g.sum(axis=0)

    def _vjp_sq_norms(self, g):
        return np.einsum("bn,bn->b", g, g)

    def _batch_sum(self):
        return self.batch_size * np.eye(self.out_dim, dtype=self.dtype)

    def _to_dense(self):
        return np.repeat(np.eye(self.out_dim, dtype=self.dtype)[None], self.batch_size, axis=0)

    def _transpose(self):
        return self

    def _take(self, index):
        return IdentityJacobian(_taken_size(self.batch_size, index), self.out_dim, self.dtype)

    def _apply(self, right):
        return right

    def _rapply(self, left):
        return left

    def _matmul(self, other):
        return other

    def _rmatmul(self, other):
        return other

    def _add(self, other):
        if isinstance(other, IdentityJacobian):
            return DiagonalJacobian(np.full(self.shape[:2], 2.0, dtype=self.dtype))
        return NotImplemented

    def _scale(self, scalar):
        return DiagonalJacobian(np.full(self.shape[:2], scalar, dtype=self.dtype))

    @classmethod
    def _matmul_cost(cls, shape, other, other_shape):
        return other, 0

    _rmatmul_cost = _matmul_cost

    @classmethod
    def _apply_cost(cls, shape, k):
        return 0

    _rapply_cost = _apply_cost

    @classmethod
    def _stored_items(cls, shape):
        return 0

    def to_sparse(self):
        return sparse.csr_array(sparse.identity(self.batch_size * self.out_dim, dtype=self.dtype))


class SoftmaxJacobian(Jacobian):
    """Softmax blocks `diag(s_i) - s_i s_i^T`, stored as the probabilities `s` `(B, n)`.

    Notes
    -----
    Symmetric, so `vjp(g)_i = s_i * (g_i - <g_i, s_i>)` is also the jvp; each
    costs `O(n)` per sample instead of the `O(n^2)` of the dense block.
    """

    kind = "softmax"

    def __init__(self, probabilities):
        probabilities = _array_of_layout(
            probabilities, "SoftmaxJacobian", "probabilities", "(B, n)"
        )
        self.probabilities = probabilities
        batch, n = probabilities.shape
        self.shape = (batch, n, n)
        self.dtype = probabilities.dtype

    def _vjp(self, g):
        return softmax_block_product(self.probabilities, g)

    _jvp = _vjp

    def _to_dense(self):
        s = self.probabilities
        dense = -s[:, :, None] * s[:, None, :]
        n = s.shape[1]
        dense[:, np.arange(n), np.arange(n)] += s
        return dense

    def _transpose(self):
        return self

    def _take(self, index):
        return SoftmaxJacobian(self.probabilities[index])

    def _apply(self, right):
        s = self.probabilities
        if right.ndim == 2:
            right = right[None]
        return s[:, :, None] * (right - s[:, None, :] @ right)

    def _rapply(self, left):
        s = self.probabilities
        if left.ndim == 2:
            left = left[None]
        return (left - left @ s[:, :, None]) * s[:, None, :]

    @classmethod
    def _apply_cost(cls, shape, k):
        # one reduction, one subtraction and one scaling per entry of the stack
        return 3 * shape[0] * shape[1] * k

    _rapply_cost = _apply_cost

    @classmethod
    def _stored_items(cls, shape):
        return shape[0] * shape[1]


class KroneckerJacobian(Jacobian):
    """Blocks `L_i (kron) x_i^T`: a Jacobian `L` `(B, k, p)` and row vectors `x` `(B, q)`.

    Notes
    -----
    The Dense weight Jacobian is `dy_i/dvec(W) = I_out (kron) x_i^T` (C-order
    `vec`), i.e. `L = I`. The block has shape `(k, p*q)`, and
    `vjp(g)_i = vec(outer(g_i L_i, x_i))`, `jvp(vec V)_i = L_i V_i x_i`,
    `sum_vjp(g) = vec((g L)^T X)` -- for `L = I` that is `dL/dW = G^T X`.
    Left-multiplying keeps the form: `A_i (L_i kron x_i^T) = (A_i L_i) kron x_i^T`.
    """

    kind = "kronecker"

    def __init__(self, left: Jacobian, x):
        x = np.asarray(x)
        if not isinstance(left, Jacobian):
            raise TypeError(
                f"KroneckerJacobian: `left` must be a Jacobian, got {type(left).__name__}"
            )
        if x.ndim != 2 or x.shape[0] != left.batch_size:
            raise ShapeError(
                f"KroneckerJacobian: `x` must have shape ({left.batch_size}, q), got {x.shape}"
            )
        self.left = left
        self.x = x
        batch, k, p = left.shape
        self.shape = (batch, k, p * x.shape[1])
        self.dtype = x.dtype if x.dtype == left.dtype else np.result_type(left.dtype, x.dtype)

    def _vjp(self, g):
        u = self.left._call_vjp(g)
        return (u[:, :, None] * self.x[:, None, :]).reshape(self.batch_size, -1)

    def _jvp(self, v):
        batch, p, q = self.batch_size, self.left.in_dim, self.x.shape[1]
        w = (v.reshape(batch, p, q) @ self.x[:, :, None])[:, :, 0]
        return self.left._call_jvp(w)

    def _sum_vjp(self, g):
        return (self.left._call_vjp(g).T @ self.x).reshape(-1)

    def _batch_sum(self):
        batch, k, p = self.left.shape
        if isinstance(self.left, IdentityJacobian):
            return np.kron(np.eye(p, dtype=self.dtype), self.x.sum(axis=0)[None, :])
        left = self.left._dense_view().reshape(batch, k * p)
        return (left.T @ self.x).reshape(k, -1)

    def _to_dense(self):
        left = self.left._dense_view()
        dense = left[:, :, :, None] * self.x[:, None, None, :]
        return dense.reshape(self.shape)

    def _transpose(self):
        return _TransposedJacobian(self)

    def _take(self, index):
        return KroneckerJacobian(self.left._take(index), self.x[index])

    def _apply(self, right):
        batch, p, q = self.batch_size, self.left.in_dim, self.x.shape[1]
        right = np.broadcast_to(right, (batch, *right.shape[-2:]))
        contracted = np.einsum("bpqr,bq->bpr", right.reshape(batch, p, q, -1), self.x)
        return self.left._apply(contracted)

    def _rapply(self, left):
        reduced = self.left._rapply(left)
        batch, rows, p = reduced.shape
        return (reduced[:, :, :, None] * self.x[:, None, None, :]).reshape(batch, rows, -1)

    def _rmatmul(self, other):
        return KroneckerJacobian(_compose(other, self.left), self.x)

    def _scale(self, scalar):
        return KroneckerJacobian(self.left._scale(scalar), self.x)

    def _vjp_sq_norms(self, g):
        # ||vec(outer(u_i, x_i))||^2 = ||u_i||^2 ||x_i||^2: never forms the outer products.
        u = self.left._call_vjp(g)
        return np.einsum("bk,bk->b", u, u) * np.einsum("bq,bq->b", self.x, self.x)

    @classmethod
    def _rmatmul_cost(cls, shape, other, other_shape):
        # The left factor absorbs `other` (usually an identity, which is free);
        # its structure is not known from `shape`, so count one pass over `other`.
        return KroneckerJacobian, shape[0] * other_shape[1] * shape[1]


class _TransposedJacobian(Jacobian):
    """The transpose of an operator that has no cheaper transposed form of its own."""

    kind = "transposed"

    def __init__(self, op: Jacobian):
        self.op = op
        batch, m, n = op.shape
        self.shape = (batch, n, m)
        self.dtype = op.dtype

    def _vjp(self, g):
        return self.op._call_jvp(g)

    def _jvp(self, v):
        return self.op._call_vjp(v)

    def _to_dense(self):
        return self.op._dense_view().swapaxes(1, 2).copy()

    def _transpose(self):
        return self.op

    def _take(self, index):
        return _TransposedJacobian(self.op._take(index))

    def _apply(self, right):
        # (J^T R)^T = R^T J
        return self.op._rapply(np.swapaxes(right, -1, -2)).swapaxes(1, 2)

    def _rapply(self, left):
        return self.op._apply(np.swapaxes(left, -1, -2)).swapaxes(1, 2)


# ---------------------------------------------------------------------------
def softmax_block_product(s: np.ndarray, u: np.ndarray) -> np.ndarray:
    """`(diag(s_i) - s_i s_i^T) u_i` for every sample, in O(n) each."""
    return s * (u - np.einsum("bn,bn->b", u, s)[:, None])

