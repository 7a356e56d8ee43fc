"""Structured batched Jacobian operators and their algebra.

A `Jacobian` stands for B blocks of shape `(m, n)`, one per sample (numerator
layout: row = output, column = input), so its `shape` is `(B, m, n)`. The
blocks are never formed unless asked for with `to_dense()`: each class stores
only what its structure needs, and `@` between two operators returns the
cheapest structured result it can.

| class                | per-sample block            | stored as                   |
|----------------------|-----------------------------|-----------------------------|
| `GeneralJacobian`    | anything                    | `(B, m, n)`                 |
| `SharedJacobian`     | the same `M` for every i    | `(m, n)` once               |
| `DiagonalJacobian`   | `diag(d_i)`                 | `(B, n)`                    |
| `IdentityJacobian`   | `I_n`                       | the size only               |
| `SoftmaxJacobian`    | `diag(s_i) - s_i s_i^T`     | `(B, n)`                    |
| `KroneckerJacobian`  | `L_i (kron) x_i^T`          | a Jacobian `L` and `(B, q)` |

The Dense weight Jacobian `dy_i/dvec(W) = I_out (kron) x_i^T` is a
`KroneckerJacobian` with `L = I`; a row of covectors times it stays Kronecker,
which is why the explicit backward mode gets `dL/dW = G^T X` in one matmul.
"""

from __future__ import annotations

from typing import ClassVar

import numpy as np
import scipy.sparse as sparse
from scipy.sparse.linalg import LinearOperator

from .dispatch import resolve_dispatch, standard
from .errors import ShapeError

__all__ = [
    "Jacobian",
    "GeneralJacobian",
    "SharedJacobian",
    "DiagonalJacobian",
    "IdentityJacobian",
    "SoftmaxJacobian",
    "KroneckerJacobian",
    "as_jacobian",
]


class Jacobian:
    """B per-sample Jacobian blocks of shape `(m, n)`, kept in structured form.

    Subclasses set `shape` and `dtype` and implement every private method in
    `OWED` (checked when the class is defined: a missing one raises TypeError
    naming it; an intermediate base class opts out with
    `class Base(Jacobian, abstract=True)`); `_apply`, `_rapply`, `_sum_vjp`,
    `_batch_sum` have dense defaults to override when a structure makes them
    cheaper. The public
    methods here validate once and delegate (scipy's `matvec` -> `_matvec`
    pattern).

    Attributes
    ----------
    couples_samples : bool
        False (block-diagonal, the default): `shape` `(B, m, n)` stands for B
        independent blocks. True for an operator of a layer whose samples
        interact (BatchNorm in train mode): `shape` is still `(B, m, n)`, but
        `to_dense()` is the full `(B, m, B, n)` array and `vjp`/`jvp` map
        `(B, m)` <-> `(B, n)` across the whole batch.
    """

    # Necessary for `ndarray @ Jacobian` to reach `__rmatmul__`.
    __array_ufunc__ = None
    #: Internal products call `_call_vjp` / `_call_jvp`, bound once per class to
    #: the private method or to a subclass's public override (`dispatch.py`).
    _DISPATCH: ClassVar[dict[str, str]] = {"vjp": "_vjp", "jvp": "_jvp"}
    #: What a subclass owes: private method -> what it computes.
    OWED: ClassVar[dict[str, str]] = {
        "_vjp": "row-vector products g_i @ J_i, (B, m) -> (B, n)",
        "_jvp": "column-vector products J_i @ v_i, (B, n) -> (B, m)",
        "_to_dense": "a new dense array of every block, (B, m, n)",
        "_transpose": "the per-sample transposes as an operator, (B, n, m)",
        "_take": "the sub-batch at an index (a slice or an index array) as an operator",
    }
    couples_samples: ClassVar[bool] = False

    def __init_subclass__(cls, abstract: bool = False, **kwargs):
        super().__init_subclass__(**kwargs)
        # `class Base(Jacobian, abstract=True)` defers the check to its subclasses.
        missing = [name for name in cls.OWED if not callable(getattr(cls, name, None))]
        if missing and not abstract:
            owed = "; ".join(f"{name} ({cls.OWED[name]})" for name in missing)
            raise TypeError(
                f"Jacobian subclass {cls.__name__} must implement {', '.join(missing)}: {owed}"
            )
        if not missing:
            resolve_dispatch(cls)

    kind = "abstract"
    #: True for an operator whose output sample i depends on other input samples
    #: (`jacobian_spatial.CoupledJacobian`): its dense form is `(B, m, B, n)`.
    couples_samples: ClassVar[bool] = False
    shape: tuple[int, int, int]
    dtype: np.dtype

    # ---- sizes -------------------------------------------------------------
    @property
    def batch_size(self) -> int:
        return self.shape[0]

    @property
    def out_dim(self) -> int:
        return self.shape[1]

    @property
    def in_dim(self) -> int:
        return self.shape[2]

    def __repr__(self) -> str:
        return f"{type(self).__name__}(shape={self.shape}, dtype={np.dtype(self.dtype).name})"

    # ---- products with vectors ---------------------------------------------
    @standard
    def vjp(self, g) -> np.ndarray:
        """Row-vector products `g_i @ J_i`: `g` is `(B, m)`, the result `(B, n)`."""
        return self._vjp(self._check_vectors(g, self.out_dim, "g", "vjp"))

    @standard
    def jvp(self, v) -> np.ndarray:
        """Column-vector products `J_i @ v_i`: `v` is `(B, n)`, the result `(B, m)`."""
        return self._jvp(self._check_vectors(v, self.in_dim, "v", "jvp"))

    def sum_vjp(self, g) -> np.ndarray:
        """`sum_i g_i @ J_i`, shape `(n,)`: how a parameter gradient sums over samples."""
        return self._sum_vjp(self._check_vectors(g, self.out_dim, "g", "sum_vjp"))

    def batch_sum(self) -> np.ndarray:
        """`sum_i J_i` as a dense `(m, n)` array."""
        return self._batch_sum()

    def to_dense(self) -> np.ndarray:
        """Materialize every block: a new `(B, m, n)` array."""
        return self._to_dense()

    @property
    def T(self) -> Jacobian:  # noqa: N802 (numpy's spelling)
        """The per-sample transposes, `(B, n, m)`, as an operator."""
        return self._transpose()

    def __getitem__(self, index) -> Jacobian:
        """The sub-batch `index` (an int, slice or index array) as an operator."""
        if isinstance(index, (int, np.integer)):
            if not -self.batch_size <= index < self.batch_size:
                raise IndexError(
                    f"{type(self).__name__}: sample index {index} is out of range "
                    f"for batch size {self.batch_size}"
                )
            index = slice(index, index + 1 if index != -1 else None)
        return self._take(index)

    # ---- composition -------------------------------------------------------
    def __matmul__(self, other) -> Jacobian:
        if not isinstance(other, Jacobian):
            other = as_jacobian(other, batch_size=self.batch_size)
        _check_composable(self, other)
        return _compose(self, other)

    def __rmatmul__(self, other) -> Jacobian:
        left = as_jacobian(other, batch_size=self.batch_size)
        _check_composable(left, self)
        return _compose(left, self)

    def __add__(self, other) -> Jacobian:
        if not isinstance(other, Jacobian):
            other = as_jacobian(other, batch_size=self.batch_size)
        if other.shape != self.shape:
            raise ShapeError(
                f"Jacobian +: shapes must match, got {self.shape} and {other.shape}"
            )
        # A coupled operator knows how to add a per-sample one, never the reverse.
        result = other._add(self) if other.couples_samples else self._add(other)
        if result is NotImplemented:
            result = other._add(self)
        if result is NotImplemented:
            result = GeneralJacobian(self._dense_view() + other._dense_view())
        return result

    __radd__ = __add__

    def __neg__(self) -> Jacobian:
        return self._scale(-1.0)

    def __mul__(self, scalar) -> Jacobian:
        if not np.isscalar(scalar):
            return NotImplemented
        return self._scale(scalar)

    __rmul__ = __mul__

    # ---- scipy views -------------------------------------------------------
    def to_scipy(self, sample: int | None = None) -> LinearOperator:
        """A `scipy.sparse.linalg.LinearOperator` view that never forms the blocks.

        With `sample=i` it is the `(m, n)` block of sample i; with `sample=None`
        the whole batch as one block-diagonal operator of shape `(B*m, B*n)`
        acting on C-order flattened `(B, n)` arrays (for an operator that
        couples samples, the whole coupled matrix, and `sample` is refused).
        """
        if sample is not None and self.couples_samples:
            raise ValueError(
                f"{type(self).__name__}.to_scipy: the samples are coupled, so there is no "
                f"block of one sample; call to_scipy() for the whole batch"
            )
        op = self if sample is None else self[sample]
        batch, m, n = op.shape

        def matvec(v):
            return op._call_jvp(np.reshape(v, (batch, n))).reshape(-1)

        def rmatvec(u):
            # LinearOperator's adjoint conjugates; the blocks are real.
            return op._call_vjp(np.reshape(u, (batch, m))).reshape(-1)

        return LinearOperator(
            (batch * m, batch * n), matvec=matvec, rmatvec=rmatvec, dtype=op.dtype
        )

    def to_sparse(self) -> sparse.csr_array:
        """The block-diagonal `(B*m, B*n)` matrix as a `scipy.sparse.csr_array`.

        For an operator that couples samples, the whole `(B*m, B*n)` matrix.
        """
        if self.couples_samples:
            batch, m, n = self.shape
            return sparse.csr_array(self._dense_view().reshape(batch * m, batch * n))
        return _blocks_to_sparse(self._dense_view())

    # ---- adapters: how internal paths call a user's public override --------
    def _public_vjp(self, g):
        return self.vjp(g)

    def _public_jvp(self, v):
        return self.jvp(v)

    # ---- defaults for subclasses -------------------------------------------
    def _sum_vjp(self, g: np.ndarray) -> np.ndarray:
        return self._call_vjp(g).sum(axis=0)

    def _batch_sum(self) -> np.ndarray:
        return self._dense_view().sum(axis=0)

    def _dense_view(self) -> np.ndarray:
        """The blocks as a `(B, m, n)` array that the caller only reads (may be shared)."""
        return self._to_dense()

    def _apply(self, right: np.ndarray) -> np.ndarray:
        """`J_i @ R_i` for a dense stack `R` of shape `(B, n, k)` (or `(n, k)`)."""
        return self._dense_view() @ right

    def _rapply(self, left: np.ndarray) -> np.ndarray:
        """`L_i @ J_i` for a dense stack `L` of shape `(B, k, m)` (or `(k, m)`)."""
        return left @ self._dense_view()

    def _matmul(self, other: Jacobian):
        """A structured `self @ other`, or NotImplemented to let `other` try."""
        return NotImplemented

    def _rmatmul(self, other: Jacobian):
        """A structured `other @ self`, or NotImplemented for the generic path."""
        return NotImplemented

    def _add(self, other: Jacobian):
        return NotImplemented

    def _scale(self, scalar) -> Jacobian:
        return GeneralJacobian(scalar * self._dense_view())

    def _vjp_sq_norms(self, g: np.ndarray) -> np.ndarray:
        """`||g_i @ J_i||^2` per sample `(B,)` (per-sample gradient norms)."""
        u = self._call_vjp(g)
        return np.einsum("bn,bn->b", u, u)

    # ---- product costs: the plan's model (`plan.py`) of the rules above ------
    # Class methods on shapes only, so an order is planned before any product
    # runs. A class with no cost of its own is costed as dense blocks: an upper
    # bound, never an error, for structures the model does not know.
    @classmethod
    def _matmul_cost(cls, shape, other: type, other_shape):
        """`(result class, flops)` of `_matmul` with `other`, or NotImplemented."""
        return NotImplemented

    @classmethod
    def _rmatmul_cost(cls, shape, other: type, other_shape):
        """`(result class, flops)` of `_rmatmul` with `other`, or NotImplemented."""
        return NotImplemented

    @classmethod
    def _apply_cost(cls, shape, k: int) -> int:
        """Flops of `_apply` to a dense `(B, n, k)` stack."""
        batch, m, n = shape
        return batch * m * n * k

    @classmethod
    def _rapply_cost(cls, shape, k: int) -> int:
        """Flops of `_rapply` to a dense `(B, k, m)` stack."""
        batch, m, n = shape
        return batch * k * m * n

    @classmethod
    def _stored_items(cls, shape) -> int:
        """Array entries an operator of this class and `shape` holds."""
        batch, m, n = shape
        return batch * m * n

    def _check_vectors(self, array, size: int, name: str, method: str) -> np.ndarray:
        array = array if isinstance(array, np.ndarray) else np.asarray(array)
        if array.shape != (self.batch_size, size):
            raise ShapeError(
                f"{type(self).__name__}.{method}: `{name}` must have shape "
                f"(B, {'m' if name == 'g' else 'n'}) = {(self.batch_size, size)}, "
                f"got {array.shape}"
            )
        return array


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
def as_jacobian(value, *, batch_size: int | None = None) -> Jacobian:
    """Wrap an array as an operator: `(m, n)` -> shared, `(B, m, n)` -> general."""
    if isinstance(value, Jacobian):
        return value
    array = np.asarray(value)
    if array.ndim == 3:
        return GeneralJacobian(array)
    if array.ndim == 2:
        if batch_size is None:
            raise ShapeError(
                "as_jacobian: a 2-D matrix is shared by every sample and needs `batch_size`"
            )
        return SharedJacobian(array, batch_size)
    raise ShapeError(
        f"as_jacobian: expected a Jacobian, an (m, n) matrix or a (B, m, n) stack, "
        f"got shape {array.shape}"
    )


def _check_composable(left: Jacobian, right: Jacobian) -> None:
    if left.batch_size != right.batch_size or left.in_dim != right.out_dim:
        raise ShapeError(
            f"Jacobian @: cannot compose {type(left).__name__} of shape {left.shape} with "
            f"{type(right).__name__} of shape {right.shape} (need equal B and "
            f"left n == right m)"
        )


def _compose(left: Jacobian, right: Jacobian) -> Jacobian:
    """`left @ right`, structured where a rule exists, else one dense stack."""
    result = left._matmul(right)
    if result is NotImplemented:
        result = right._rmatmul(left)
    if result is NotImplemented:
        # No rule keeps a structure: the result is one dense stack. A general
        # side is already dense, so the other side acts on it directly;
        # otherwise materialize the cheaper side and apply the other.
        if isinstance(left, GeneralJacobian):
            result = GeneralJacobian(right._rapply(left.data))
        elif isinstance(right, GeneralJacobian):
            result = GeneralJacobian(left._apply(right.data))
        elif _dense_size(right) <= _dense_size(left):
            result = GeneralJacobian(left._apply(right._dense_view()))
        else:
            result = GeneralJacobian(right._rapply(left._dense_view()))
    return result


def softmax_block_product(s: np.ndarray, u: np.ndarray) -> np.ndarray:
    """`(diag(s_i) - s_i s_i^T) u_i` for every sample, in O(n) each."""
    return s * (u - np.einsum("bn,bn->b", u, s)[:, None])


def _array_of_layout(value, where: str, name: str, layout: str) -> np.ndarray:
    """`value` as an array with as many axes as `layout` names, e.g. "(B, n)"."""
    array = np.asarray(value)
    ndim = layout.count(",") + 1
    if array.ndim != ndim:
        raise ShapeError(
            f"{where}: `{name}` must be {ndim}-D {layout}, got shape {array.shape}"
        )
    return array


def _taken_size(batch_size: int, index) -> int:
    return len(np.arange(batch_size)[index])


def _dense_size(op: Jacobian) -> int:
    batch, m, n = op.shape
    return batch * m * n


def _blocks_to_sparse(blocks: np.ndarray) -> sparse.csr_array:
    batch, m, n = blocks.shape
    sample, row, col = np.nonzero(blocks)
    values = blocks[sample, row, col]
    return sparse.csr_array(
        (values, (sample * m + row, sample * n + col)), shape=(batch * m, batch * n)
    )


# ---- the product order of a chain lives in `plan.py` --------------------------
def __getattr__(name):
    # `from jacobprop.jacobian import chain_cost, multiply_chain` predates
    # `plan.py`, which imports this module, so the names resolve lazily here.
    if name in ("chain_cost", "multiply_chain"):
        from . import plan

        return getattr(plan, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
