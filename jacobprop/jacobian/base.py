"""The `Jacobian` base class, its composition and the helpers every operator shares.

A `Jacobian` stands for B blocks of shape `(m, n)`, one per sample (numerator
layout: row = output, column = input), so its `shape` is `(B, m, n)`. The
blocks are never formed unless asked for with `to_dense()`: each class stores
only what its structure needs, and `@` between two operators returns the
cheapest structured result it can (`_compose`: a class's own product rule,
else the other side's, else one dense stack).

This module holds what every operator module builds on: the base class with
its dispatch and `OWED` check, `as_jacobian`, the composition rule and the
small validation and layout helpers. The operators themselves live in
`basic.py`, `spatial.py` and `coupled.py`; the base class's dense fallbacks
return a `GeneralJacobian`, imported from `basic.py` at the end of this module
(`basic.py` subclasses `Jacobian`, so it can only load once the class exists).
"""

from __future__ import annotations

from typing import ClassVar

import numpy as np
import scipy.sparse as sparse
from scipy.sparse.linalg import LinearOperator

from ..dispatch import resolve_dispatch, standard
from ..errors import ShapeError

__all__ = ["Jacobian", "as_jacobian"]


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
    #: (`coupled.CoupledJacobian`): its dense form is `(B, m, B, n)`.
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

    def _plan_shape(self) -> tuple:
        """`shape`, followed by any sizes this class's cost methods need beyond it
        (a convolution's kernel, a pool's window, a low-rank update's rank)."""
        return tuple(self.shape)

    @classmethod
    def _apply_temporary(cls, shape, k: int) -> int:
        """Entries `_apply` allocates besides its result (a convolution's im2col columns)."""
        return 0

    @classmethod
    def _rapply_temporary(cls, shape, k: int) -> int:
        """Entries `_rapply` allocates besides its result."""
        return 0

    @classmethod
    def _forward_items(cls, shape) -> int:
        """Entries the layer that made this operator keeps in its cache for it."""
        return 0

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


# The dense operators the fallbacks above return. Imported last: `basic.py`
# subclasses `Jacobian` and imports the helpers above, which exist by now.
from .basic import GeneralJacobian, SharedJacobian  # noqa: E402
