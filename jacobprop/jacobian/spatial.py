"""Structured Jacobians of the image layers and LayerNorm's diagonal plus low rank.

Same conventions as `jacobprop.jacobian.base`: an operator stands for B blocks
of shape `(m, n)` (numerator layout), stores only what its structure needs, and
never forms a block unless asked with `to_dense()` / `to_sparse()`. Kept apart
from `basic.py` because the image operators share the image geometry (im2col
columns, pooling windows) and the copy/gather weights of the plan's cost model;
the low-rank operator states its rank in its plan shape as they do.

| class                     | per-sample block                   | stored as                    |
|---------------------------|------------------------------------|------------------------------|
| `ConvJacobian`            | Toeplitz matrix of a convolution   | the kernel `(O, C, kh, kw)`  |
| `PatchesJacobian`         | `L_i (I_O kron P_i)`               | a Jacobian `L`, patches `P`  |
| `SelectionJacobian`       | row j is `w_ij e_{idx_ij}^T`       | `idx`, `w` `(B, m)`          |
| `PoolJacobian`            | one window average for every i     | windows `(m, K)` once        |
| `DiagonalLowRankJacobian` | `diag(d_i) + U_i V_i^T`            | `(B, n)`, `(B, n, r)` twice  |

Product costs (flops, B samples) are stated with each class's product rules.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import scipy.sparse as sparse
from numpy.lib.stride_tricks import sliding_window_view

from ..errors import ShapeError
from .base import Jacobian, _array_of_layout, _compose, _taken_size
from .basic import DiagonalJacobian, IdentityJacobian, _TransposedJacobian

__all__ = [
    "ConvGeometry",
    "ConvJacobian",
    "PatchesJacobian",
    "SelectionJacobian",
    "PoolJacobian",
    "DiagonalLowRankJacobian",
    "channel_rows",
    "from_channel_rows",
    "pool_windows",
]


# ---------------------------------------------------------------------------
class ConvGeometry(NamedTuple):
    """Sizes of one 2-D cross-correlation: input `(C, H, W)`, kernel, stride, zero padding.

    The im2col layout is columns: `(C*kh*kw, B*L)`, row `c*kh*kw + i*kw + j`
    (C-order of the kernel `W[o, c, i, j]`), column `b*L + p` for output
    position `p = ho*Wo + wo`. Then `y_rows = W_mat @ columns` `(O, B*L)` is
    one GEMM, and the copy that builds the columns reads whole image rows.
    """

    input_shape: tuple[int, int, int]
    kernel: tuple[int, int]
    stride: tuple[int, int]
    padding: tuple[int, int]

    @property
    def output_hw(self) -> tuple[int, int]:
        _, height, width = self.input_shape
        (kh, kw), (sh, sw), (ph, pw) = self.kernel, self.stride, self.padding
        return (height + 2 * ph - kh) // sh + 1, (width + 2 * pw - kw) // sw + 1

    @property
    def positions(self) -> int:
        """L, the output positions per channel."""
        ho, wo = self.output_hw
        return ho * wo

    @property
    def in_dim(self) -> int:
        channels, height, width = self.input_shape
        return channels * height * width

    def columns(self, x: np.ndarray) -> np.ndarray:
        """im2col of `x` `(B, C*H*W)`: a new `(C*kh*kw, B*L)` array."""
        batch = x.shape[0]
        channels, height, width = self.input_shape
        (kh, kw), (ph, pw), (sh, sw) = self.kernel, self.padding, self.stride
        image = x.reshape(batch, channels, height, width)
        if ph or pw:
            # Zeros and one slice assignment: np.pad costs more than the copy itself here.
            padded = np.zeros((batch, channels, height + 2 * ph, width + 2 * pw), x.dtype)
            padded[:, :, ph:ph + height, pw:pw + width] = image
            image = padded
        windows = sliding_window_view(image, self.kernel, axis=(2, 3))[:, :, ::sh, ::sw]
        # (B, C, Ho, Wo, kh, kw) -> (C, kh, kw, B, Ho, Wo): the one copy of im2col.
        return windows.transpose(1, 4, 5, 0, 2, 3).reshape(channels * kh * kw,
                                                          batch * self.positions)

    def fold(self, columns: np.ndarray, batch: int) -> np.ndarray:
        """col2im, the adjoint of `columns`: `(C*kh*kw, B*L)` summed into `(B, C*H*W)`."""
        channels, height, width = self.input_shape
        (kh, kw), (sh, sw), (ph, pw) = self.kernel, self.stride, self.padding
        ho, wo = self.output_hw
        blocks = columns.reshape(channels, kh, kw, batch, ho, wo)
        image = np.zeros((channels, batch, height + 2 * ph, width + 2 * pw), columns.dtype)
        # One strided add of a contiguous slab per kernel offset: each offset maps
        # positions to pixels one to one.
        for i in range(kh):
            for j in range(kw):
                image[:, :, i:i + sh * (ho - 1) + 1:sh, j:j + sw * (wo - 1) + 1:sw] += (
                    blocks[:, i, j]
                )
        image = image[:, :, ph:ph + height, pw:pw + width]
        return image.transpose(1, 0, 2, 3).reshape(batch, self.in_dim)

    def transposed_conv(self, matrix_w: np.ndarray, values: np.ndarray) -> np.ndarray:
        """`col2im(W_mat^T g_rows)`: the vjp of the correlation for `g` `(B, O*L)`, `(B, n)`.

        With stride 1 every output row is widened to the padded width and every
        sample to the padded height (zeros), so that kernel offset `(i, j)`
        becomes ONE shift by `i*Wp + j` of the whole flattened batch: `kh*kw`
        contiguous adds instead of `C*B*Ho` short strided ones, for a GEMM
        larger by `Hp*Wp / (Ho*Wo)`. Other strides fold the columns.
        """
        batch = values.shape[0]
        channels_out = matrix_w.shape[0]
        if self.stride != (1, 1):
            return self.fold(matrix_w.T @ channel_rows(values, channels_out), batch)
        channels, height, width = self.input_shape
        (kh, kw), (ph, pw) = self.kernel, self.padding
        ho, wo = self.output_hw
        hp, wp = height + 2 * ph, width + 2 * pw
        rows = np.zeros((channels_out, batch, hp, wp), values.dtype)
        rows[:, :, :ho, :wo] = values.reshape(batch, channels_out, ho, wo).transpose(1, 0, 2, 3)
        size = batch * hp * wp
        columns = (matrix_w.T @ rows.reshape(channels_out, size)).reshape(channels, kh, kw, size)
        image = np.zeros((channels, size + (kh - 1) * wp + kw - 1), columns.dtype)
        for i in range(kh):
            for j in range(kw):
                start = i * wp + j
                image[:, start:start + size] += columns[:, i, j]
        image = image[:, :size].reshape(channels, batch, hp, wp)[:, :, ph:ph + height,
                                                                 pw:pw + width]
        return image.transpose(1, 0, 2, 3).reshape(batch, self.in_dim)


def channel_rows(values: np.ndarray, channels: int) -> np.ndarray:
    """`(B, O*L)` channel-major outputs as the `(O, B*L)` rows the columns GEMM uses."""
    batch, size = values.shape
    positions = size // channels
    return values.reshape(batch, channels, positions).transpose(1, 0, 2).reshape(
        channels, batch * positions)


def from_channel_rows(rows: np.ndarray, batch: int, positions: int) -> np.ndarray:
    """The inverse of `channel_rows`: `(O, B*L)` -> `(B, O*L)`."""
    channels = rows.shape[0]
    return rows.reshape(channels, batch, positions).transpose(1, 0, 2).reshape(
        batch, channels * positions)


#: What one entry of a strided copy or gather costs, in the model's flops (one
#: multiply-add of a GEMM or of an elementwise product). Measured with one thread,
#: best of 15 (`benchmarks/README.md`, "Plan costs of the spatial operators"):
#: im2col and window gathers run at 1/4 to 1/10 of the elementwise rate.
_COPY_WEIGHT = 4
_GATHER_WEIGHT = 8


def _conv_padding(shape) -> tuple[int, int]:
    """`(Hp Wp, C)` from a conv plan shape; from a bare shape, the input as one channel."""
    if len(shape) >= 7:
        return int(shape[5]), int(shape[6])
    return int(shape[2]), 1


def _conv_extras(shape) -> tuple[int, int, int, int, int]:
    """`(B, m, n, K, O)` from a conv plan shape; from a bare `(B, m, n)` (a product's
    result) the densest guess: one output channel, a kernel the size of the input."""
    if len(shape) >= 5:
        return tuple(int(v) for v in shape[:5])
    batch, m, n = shape[:3]
    return batch, m, n, n, 1


class _SameBlock(Jacobian, abstract=True):
    """Base of an operator whose B blocks are one `(m, n)` matrix given by `_matrix()`.

    The matrix is formed only on request (dense, batch sum, sparse); the
    products stay structured in the subclass.
    """

    def _matrix(self) -> np.ndarray:
        raise NotImplementedError

    def _to_dense(self):
        return np.repeat(self._matrix()[None], self.batch_size, axis=0)

    def _batch_sum(self):
        return self.batch_size * self._matrix()

    def _transpose(self):
        return _TransposedJacobian(self)

    def to_sparse(self):
        block = sparse.csr_array(self._matrix())
        return sparse.csr_array(sparse.kron(sparse.identity(self.batch_size, format="csr"), block))


class ConvJacobian(_SameBlock):
    """dy/dx of a convolution: one Toeplitz-like `(O*L, C*H*W)` matrix shared by every sample.

    Parameters
    ----------
    weight : ndarray `(O, C, kh, kw)`
    geometry : ConvGeometry
    batch_size : int

    Notes
    -----
    `jvp(v) = conv(v, W)` (the forward without bias) and `vjp(g) =
    col2im(W_mat^T @ g_rows)`, the transposed convolution; each costs
    `2 B L O C kh kw` flops, against `2 B O L C H W` for the dense block. The
    matrix itself is formed only by `to_dense` / `to_sparse`, by convolving
    the identity.
    """

    kind = "conv"

    def __init__(self, weight, geometry: ConvGeometry, batch_size: int):
        self.weight = _array_of_layout(weight, "ConvJacobian", "weight", "(O, C, kh, kw)")
        self.geometry = geometry
        channels_out = self.weight.shape[0]
        self.shape = (int(batch_size), channels_out * geometry.positions, geometry.in_dim)
        self.dtype = self.weight.dtype

    @property
    def _matrix_w(self) -> np.ndarray:
        return self.weight.reshape(self.weight.shape[0], -1)

    def _jvp(self, v):
        rows = self._matrix_w @ self.geometry.columns(v)
        return from_channel_rows(rows, v.shape[0], self.geometry.positions)

    def _vjp(self, g):
        return self.geometry.transposed_conv(self._matrix_w, g)

    def _matrix(self) -> np.ndarray:
        """The shared `(m, n)` block: the convolution of every unit input."""
        return self._jvp(np.eye(self.in_dim, dtype=self.dtype)).T

    def _take(self, index):
        return ConvJacobian(self.weight, self.geometry, _taken_size(self.batch_size, index))

    def _apply(self, right):
        # Each of the k columns of every sample is one more image to convolve.
        if right.ndim == 2:
            return self._jvp(right.T).T
        batch, n, k = right.shape
        out = self._jvp(right.swapaxes(1, 2).reshape(batch * k, n))
        return out.reshape(batch, k, self.out_dim).swapaxes(1, 2)

    def _rapply(self, left):
        if left.ndim == 2:
            return self._vjp(left)
        batch, k, m = left.shape
        return self._vjp(left.reshape(batch * k, m)).reshape(batch, k, self.in_dim)

    def _scale(self, scalar):
        return ConvJacobian(scalar * self.weight, self.geometry, self.batch_size)

    # ---- product costs (plan.py): the plan shape adds K = C kh kw and O --------
    def _plan_shape(self) -> tuple:
        # (B, m, n, K, O, padded pixels Hp Wp, C): what the costs and temporaries need.
        _, height, width = self.geometry.input_shape
        ph, pw = self.geometry.padding
        return (*self.shape, self.weight[0].size, self.weight.shape[0],
                (height + 2 * ph) * (width + 2 * pw), self.weight.shape[1])

    @classmethod
    def _apply_cost(cls, shape, k):
        # Every column is an image: its im2col copy (L K entries, a strided gather that
        # runs about as slowly as _COPY_WEIGHT GEMM flops each) and its share of the GEMM.
        batch, m, _, kernel, channels_out = _conv_extras(shape)
        return batch * k * kernel * (m + _COPY_WEIGHT * (m // channels_out))

    _rapply_cost = _apply_cost  # W^T G (m K) and the fold of the columns (L K)

    @classmethod
    def _apply_temporary(cls, shape, k):
        # Per column: the images laid out (n), padded (C Hp Wp), their im2col columns
        # (K L) and the GEMM's rows before the channel-major copy (m).
        batch, m, n, kernel, channels_out = _conv_extras(shape)
        padded, channels = _conv_padding(shape)
        return batch * k * (n + channels * padded + kernel * (m // channels_out) + m)

    @classmethod
    def _rapply_temporary(cls, shape, k):
        # Per row: the covector widened to the padded grid (O Hp Wp), W^T times it
        # (K Hp Wp), the image it is folded into (C Hp Wp) and its channel-major copy (n).
        batch, m, n, kernel, channels_out = _conv_extras(shape)
        padded, channels = _conv_padding(shape)
        return batch * k * (padded * (channels_out + kernel + channels) + n)

    @classmethod
    def _forward_items(cls, shape):
        # The layer's cache keeps the im2col columns of its input, (K, B L); while they
        # are built the padded images exist too, and the GEMM's rows before their copy.
        batch, m, _, kernel, channels_out = _conv_extras(shape)
        padded, channels = _conv_padding(shape)
        return batch * (kernel * (m // channels_out) + channels * padded + m)

    @classmethod
    def _stored_items(cls, shape):
        _, _, _, kernel, channels_out = _conv_extras(shape)
        return kernel * channels_out



class PatchesJacobian(Jacobian):
    """Blocks `L_i (I_O kron P_i)`: the convolution's weight (or bias) Jacobian.

    Parameters
    ----------
    left : Jacobian `(B, k, O*L)`
        What acts on the convolution's output (`IdentityJacobian` for the
        layer's own Jacobian; the covector after composition).
    columns : ndarray `(q, B*L)`
        The im2col columns (`q = C*kh*kw` for the weight; a row of ones,
        broadcast without memory, for the bias); `P_i = columns[:, i*L:(i+1)*L].T`.
    out_channels : int
        O.

    Notes
    -----
    `y_i[o, p] = sum_c W[o, c] P_i[p, c]`, so `dy_i/dvec(W) = I_O kron P_i`
    `(O*L, O*q)`. `vjp(g)_i = vec(G_i P_i)` with `G_i = (g_i L_i)` reshaped
    `(O, L)`; `sum_vjp(g) = vec(G_rows columns^T)` is ONE GEMM over all B*L
    positions (`2 B L O q` flops), which is the explicit mode's `dL/dW`;
    `jvp(vec V)_i = L_i vec(V P_i^T)`. Left-multiplying keeps the form, as
    `KroneckerJacobian` does for Dense.
    """

    kind = "patches"

    def __init__(self, left: Jacobian, columns, out_channels: int):
        if not isinstance(left, Jacobian):
            raise TypeError(
                f"PatchesJacobian: `left` must be a Jacobian, got {type(left).__name__}"
            )
        columns = _array_of_layout(columns, "PatchesJacobian", "columns", "(q, B * L)")
        batch, k, inner = left.shape
        if inner % out_channels or columns.shape[1] != batch * (inner // out_channels):
            raise ShapeError(
                f"PatchesJacobian: `columns` must have B * L = {batch} * "
                f"{inner // max(out_channels, 1)} columns for `left` of shape {left.shape} "
                f"and {out_channels} channels, got shape {columns.shape}"
            )
        self.left = left
        self.columns = columns
        self.out_channels = int(out_channels)
        self.shape = (batch, k, self.out_channels * columns.shape[0])
        self.dtype = np.result_type(left.dtype, columns.dtype)

    @property
    def _positions(self) -> int:
        return self.left.in_dim // self.out_channels

    @property
    def _per_sample(self) -> np.ndarray:
        """The columns as `(q, B, L)`."""
        return self.columns.reshape(-1, self.batch_size, self._positions)

    def _left_values(self, g) -> np.ndarray:
        return self.left._call_vjp(g).reshape(self.batch_size, self.out_channels,
                                              self._positions)

    def _vjp(self, g):
        u = self._left_values(g)  # (B, O, L)
        return np.matmul(u, self._per_sample.transpose(1, 2, 0)).reshape(self.batch_size,
                                                                         self.in_dim)

    def _sum_vjp(self, g):
        rows = channel_rows(self.left._call_vjp(g), self.out_channels)
        return (rows @ self.columns.T).reshape(-1)

    def _jvp(self, v):
        batch = self.batch_size
        weights = v.reshape(batch, self.out_channels, self.columns.shape[0])
        values = np.matmul(weights, self._per_sample.transpose(1, 0, 2))  # (B, O, L)
        return self.left._call_jvp(values.reshape(batch, self.left.in_dim))

    def _left_blocks(self) -> np.ndarray:
        batch, k, _ = self.left.shape
        return self.left._dense_view().reshape(batch, k, self.out_channels, self._positions)

    def _patches_last(self) -> np.ndarray:
        """The columns as `(B, L, q)`: `P_i` per sample, ready for batched GEMMs."""
        return self._per_sample.transpose(1, 2, 0)

    def _to_dense(self):
        # One batched GEMM (B of (k O, L) @ (L, q)); einsum would not use BLAS here.
        batch, k, _ = self.left.shape
        blocks = self._left_blocks().reshape(batch, k * self.out_channels, self._positions)
        return np.matmul(blocks, self._patches_last()).reshape(self.shape)

    def _batch_sum(self):
        # Contract over samples and positions at once: one GEMM.
        summed = np.tensordot(self._left_blocks(), self._per_sample, axes=([0, 3], [1, 2]))
        return summed.reshape(self.out_dim, -1)

    def _transpose(self):
        return _TransposedJacobian(self)

    def _take(self, index):
        per_sample = self._per_sample[:, index, :]
        return PatchesJacobian(self.left._take(index),
                               per_sample.reshape(per_sample.shape[0], -1), self.out_channels)

    def _apply(self, right):
        batch = self.batch_size
        right = np.broadcast_to(right, (batch, *right.shape[-2:]))
        blocks = right.reshape(batch, self.out_channels, self.columns.shape[0], -1)
        values = np.matmul(self._patches_last()[:, None], blocks)  # (B, O, L, r)
        return self.left._apply(values.reshape(batch, self.left.in_dim, values.shape[-1]))

    def _rapply(self, left):
        reduced = self.left._rapply(left)
        batch, rows, _ = reduced.shape
        reduced = reduced.reshape(batch, rows * self.out_channels, self._positions)
        return np.matmul(reduced, self._patches_last()).reshape(batch, rows, self.in_dim)

    def _rmatmul(self, other):
        return PatchesJacobian(_compose(other, self.left), self.columns, self.out_channels)

    def _scale(self, scalar):
        return PatchesJacobian(self.left._scale(scalar), self.columns, self.out_channels)

    # ---- product costs (plan.py): the plan shape adds O and L -------------------
    def _plan_shape(self) -> tuple:
        return (*self.shape, self.out_channels, self._positions)

    @classmethod
    def _patches_extras(cls, shape):
        batch, k, n = shape[:3]
        if len(shape) >= 5:
            return batch, k, n, int(shape[3]), int(shape[4])
        return batch, k, n, 1, k  # a bare shape: one channel, as many positions as rows

    @classmethod
    def _apply_cost(cls, shape, k):
        # Contract the columns per sample (O L q per column), then the left factor as dense.
        batch, rows, n, channels_out, positions = cls._patches_extras(shape)
        return batch * k * (positions * n + rows * channels_out * positions)

    _rapply_cost = _apply_cost

    @classmethod
    def _rmatmul_cost(cls, shape, other, other_shape):
        # `other` is absorbed by the left factor (the identity for a layer's own block).
        batch, rows, _, channels_out, positions = cls._patches_extras(shape)
        return PatchesJacobian, other._apply_cost(other_shape, channels_out * positions)

    @classmethod
    def _stored_items(cls, shape):
        batch, rows, n, channels_out, positions = cls._patches_extras(shape)
        return batch * positions * (n // channels_out) + batch * rows * channels_out * positions


# ---------------------------------------------------------------------------
def pool_windows(input_shape, kernel, stride) -> np.ndarray:
    """`(C*Ho*Wo, kh*kw)` flat input indices of every pooling window, window in C-order."""
    channels, height, width = input_shape
    (kh, kw), (sh, sw) = kernel, stride
    ho, wo = ConvGeometry(input_shape, kernel, stride, (0, 0)).output_hw
    c = np.arange(channels)[:, None, None, None, None]
    rows = (np.arange(ho) * sh)[None, :, None, None, None] + np.arange(kh)[:, None]
    cols = (np.arange(wo) * sw)[None, None, :, None, None] + np.arange(kw)
    index = (c * height + rows) * width + cols  # (C, Ho, Wo, kh, kw)
    return index.reshape(channels * ho * wo, kh * kw)


class SelectionJacobian(Jacobian):
    """Per-sample weighted selections: row j of block i is `w_ij e_{idx_ij}^T` (max-pool).

    Parameters
    ----------
    indices : int ndarray `(B, m)`
        The input entry each output copies.
    in_dim : int
        n.
    weights : ndarray `(B, m)`, optional
        Row scales (ones when omitted; composing with a diagonal sets them).
    distinct : bool
        Whether a sample's indices are all different (non-overlapping windows),
        which lets the vjp assign instead of accumulate.

    Notes
    -----
    `jvp(v)_ij = w_ij v_i[idx_ij]` and `vjp(g)_i = sum_j g_ij w_ij e_{idx_ij}`
    (a scatter-add), `O(B m)` each against `O(B m n)` dense. A diagonal on
    either side only rescales `w`.
    """

    kind = "selection"

    def __init__(self, indices, in_dim: int, weights=None, *, distinct: bool = False,
                 dtype=np.float64):
        self.indices = _array_of_layout(indices, "SelectionJacobian", "indices", "(B, m)")
        self.weights = None if weights is None else np.asarray(weights)
        if self.weights is not None and self.weights.shape != self.indices.shape:
            raise ShapeError(f"SelectionJacobian: `weights` must have the shape of `indices` "
                             f"{self.indices.shape}, got {self.weights.shape}")
        self.distinct = bool(distinct)
        batch, m = self.indices.shape
        self.shape = (batch, m, int(in_dim))
        self.dtype = np.dtype(dtype) if weights is None else self.weights.dtype

    def _weighted(self, values):
        return values if self.weights is None else values * self.weights

    def _jvp(self, v):
        return self._weighted(np.take_along_axis(v, self.indices, axis=1))

    def _flat_indices(self) -> np.ndarray:
        batch, _, n = self.shape
        return self.indices + (np.arange(batch) * n)[:, None]

    def _vjp(self, g):
        batch, _, n = self.shape
        values = self._weighted(g)
        if self.distinct:
            out = np.zeros(batch * n, dtype=values.dtype)
            out[self._flat_indices().ravel()] = values.ravel()
            return out.reshape(batch, n)
        return np.bincount(self._flat_indices().ravel(), weights=values.ravel(),
                           minlength=batch * n).reshape(batch, n).astype(values.dtype, copy=False)

    def _row_weights(self) -> np.ndarray:
        return np.ones(self.indices.shape, self.dtype) if self.weights is None else self.weights

    def _to_dense(self):
        batch, m, n = self.shape
        dense = np.zeros(self.shape, dtype=self.dtype)
        dense[np.arange(batch)[:, None], np.arange(m), self.indices] = self._row_weights()
        return dense

    def _transpose(self):
        return _TransposedJacobian(self)

    def _take(self, index):
        weights = None if self.weights is None else self.weights[index]
        return SelectionJacobian(self.indices[index], self.in_dim, weights,
                                 distinct=self.distinct, dtype=self.dtype)

    def _apply(self, right):
        right = np.broadcast_to(right, (self.batch_size, *right.shape[-2:]))
        picked = np.take_along_axis(right, self.indices[:, :, None], axis=1)
        return picked * self._row_weights()[:, :, None]

    def _rapply(self, left):
        batch, m, n = self.shape
        left = np.broadcast_to(left, (batch, *left.shape[-2:]))
        out = np.zeros((batch, n, left.shape[1]), dtype=np.result_type(left, self.dtype))
        values = left.swapaxes(1, 2) * self._row_weights()[:, :, None]
        np.add.at(out, (np.arange(batch)[:, None], self.indices), values)
        return out.swapaxes(1, 2)

    def _matmul(self, other):
        if isinstance(other, DiagonalJacobian):
            picked = np.take_along_axis(other.diagonal, self.indices, axis=1)
            return SelectionJacobian(self.indices, self.in_dim, self._weighted(picked),
                                     distinct=self.distinct)
        return NotImplemented

    def _rmatmul(self, other):
        if isinstance(other, DiagonalJacobian):
            return SelectionJacobian(self.indices, self.in_dim,
                                     self._weighted(other.diagonal), distinct=self.distinct)
        return NotImplemented

    def _scale(self, scalar):
        return SelectionJacobian(self.indices, self.in_dim, scalar * self._row_weights(),
                                 distinct=self.distinct)

    # ---- product costs (plan.py) ----------------------------------------------------
    @classmethod
    def _apply_cost(cls, shape, k):
        batch, m = shape[:2]
        return _GATHER_WEIGHT * batch * m * k  # a fancy-index gather per output entry

    @classmethod
    def _rapply_cost(cls, shape, k):
        batch, m, n = shape[:3]
        return batch * k * (_GATHER_WEIGHT * m + n)  # the zeroed result, a scatter-add

    @classmethod
    def _matmul_cost(cls, shape, other, other_shape):
        if issubclass(other, DiagonalJacobian):
            return SelectionJacobian, 2 * shape[0] * shape[1]
        return NotImplemented

    _rmatmul_cost = _matmul_cost

    @classmethod
    def _apply_temporary(cls, shape, k):
        return shape[0] * shape[1] * k  # the picked rows before their weights

    _rapply_temporary = _apply_temporary  # the weighted rows before the scatter

    @classmethod
    def _forward_items(cls, shape):
        return shape[0] * shape[1]  # the max-pool cache keeps the winners' indices

    @classmethod
    def _stored_items(cls, shape):
        return 2 * shape[0] * shape[1]  # indices and weights

    def to_sparse(self):
        batch, m, n = self.shape
        rows = np.arange(batch * m)
        cols = self._flat_indices().ravel()
        return sparse.csr_array((self._row_weights().ravel(), (rows, cols)),
                                shape=(batch * m, batch * n))


class PoolJacobian(_SameBlock):
    """The same window average for every sample (AvgPool2D): row j averages window j.

    Parameters
    ----------
    windows : int ndarray `(m, K)`
        Flat input indices of each output's window (`pool_windows`).
    in_dim, batch_size : int
    dtype : floating dtype

    Notes
    -----
    `jvp(v)_ij = mean_k v_i[windows_jk]`; `vjp(g)_i` adds `g_ij / K` to each
    entry of window j, one strided assignment per window offset k (for a
    fixed k the windows hit distinct inputs). Both cost `O(B m K)`.
    """

    kind = "pool"

    def __init__(self, windows, in_dim: int, batch_size: int, dtype=np.float64):
        self.windows = _array_of_layout(windows, "PoolJacobian", "windows", "(m, K)")
        self.shape = (int(batch_size), self.windows.shape[0], int(in_dim))
        self.dtype = np.dtype(dtype)

    @property
    def _scale_factor(self):
        return self.dtype.type(1.0 / self.windows.shape[1])

    def _jvp(self, v):
        return v[:, self.windows].sum(axis=2) * self._scale_factor

    def _vjp(self, g):
        return self._scatter(g)

    def _scatter(self, values):
        """`values` `(..., m)` spread over the windows, `/ K`: `(..., n)`.

        Done on the transposed layout, one output entry per row: adding to whole
        rows picked by a window offset is one contiguous copy each, where a
        fancy index on the last axis walks the array entry by entry (30x slower
        at 64 columns per sample).
        """
        lead, m = values.shape[:-1], values.shape[-1]
        rows = values.reshape(-1, m).T * self._scale_factor  # (m, prod(lead))
        out = np.zeros((self.in_dim, rows.shape[1]), dtype=np.result_type(values, self.dtype))
        for column in self.windows.T:
            out[column] += rows
        return out.T.reshape(*lead, self.in_dim)

    def _matrix(self):
        matrix = np.zeros(self.shape[1:], dtype=self.dtype)
        for column in self.windows.T:
            matrix[np.arange(self.out_dim), column] += self._scale_factor
        return matrix

    def _take(self, index):
        return PoolJacobian(self.windows, self.in_dim, _taken_size(self.batch_size, index),
                            self.dtype)

    def _apply(self, right):
        return right[..., self.windows, :].sum(axis=-2) * self._scale_factor

    def _rapply(self, left):
        return self._scatter(left)

    # ---- product costs (plan.py): the plan shape adds the window size K ----------
    def _plan_shape(self) -> tuple:
        return (*self.shape, self.windows.shape[1])

    @classmethod
    def _window(cls, shape) -> int:
        return int(shape[3]) if len(shape) >= 4 else max(shape[2] // max(shape[1], 1), 1)

    @classmethod
    def _apply_cost(cls, shape, k):
        batch, m = shape[:2]
        return batch * m * k * (cls._window(shape) + 1)

    @classmethod
    def _rapply_cost(cls, shape, k):
        batch, m, n = shape[:3]
        return batch * k * (m * (cls._window(shape) + 1) + n)

    @classmethod
    def _apply_temporary(cls, shape, k):
        return shape[0] * shape[1] * k * cls._window(shape)  # the gathered windows

    @classmethod
    def _rapply_temporary(cls, shape, k):
        batch, m, n = shape[:3]
        return batch * k * (m + n)  # the scaled rows and the transposed sums

    @classmethod
    def _stored_items(cls, shape):
        return shape[1] * cls._window(shape)


class DiagonalLowRankJacobian(Jacobian):
    """Square blocks `diag(d_i) + U_i V_i^T` (LayerNorm: rank 2).

    Parameters
    ----------
    diagonal : ndarray `(B, n)`
    left, right : ndarray `(B, n, r)`
        U and V.

    Notes
    -----
    `jvp(v)_i = d_i * v_i + U_i (V_i^T v_i)`, `vjp(g)_i = d_i * g_i + V_i
    (U_i^T g_i)`: `O(B n r)` each against `O(B n^2)` dense. The transpose
    swaps U and V; a diagonal on either side keeps the form.
    """

    kind = "lowrank"

    def __init__(self, diagonal, left, right):
        self.diagonal = _array_of_layout(diagonal, "DiagonalLowRankJacobian", "diagonal",
                                         "(B, n)")
        self.left = _array_of_layout(left, "DiagonalLowRankJacobian", "left", "(B, n, r)")
        self.right = _array_of_layout(right, "DiagonalLowRankJacobian", "right", "(B, n, r)")
        if self.left.shape != self.right.shape or self.left.shape[:2] != self.diagonal.shape:
            raise ShapeError(
                f"DiagonalLowRankJacobian: `left` and `right` must both be (B, n, r) with "
                f"(B, n) = {self.diagonal.shape}, got {self.left.shape} and {self.right.shape}"
            )
        batch, n = self.diagonal.shape
        self.shape = (batch, n, n)
        self.dtype = np.result_type(self.diagonal, self.left, self.right)

    def _jvp(self, v):
        inner = np.einsum("bnr,bn->br", self.right, v)
        return self.diagonal * v + np.einsum("bnr,br->bn", self.left, inner)

    def _vjp(self, g):
        inner = np.einsum("bnr,bn->br", self.left, g)
        return self.diagonal * g + np.einsum("bnr,br->bn", self.right, inner)

    def _to_dense(self):
        dense = self.left @ self.right.swapaxes(1, 2)
        n = self.in_dim
        dense[:, np.arange(n), np.arange(n)] += self.diagonal
        return dense

    def _transpose(self):
        return DiagonalLowRankJacobian(self.diagonal, self.right, self.left)

    def _take(self, index):
        return DiagonalLowRankJacobian(self.diagonal[index], self.left[index], self.right[index])

    def _apply(self, right):
        return (self.diagonal[:, :, None] * right
                + self.left @ (self.right.swapaxes(1, 2) @ right))

    def _rapply(self, left):
        return left * self.diagonal[:, None, :] + (left @ self.left) @ self.right.swapaxes(1, 2)

    def _matmul(self, other):
        if isinstance(other, DiagonalJacobian):
            d = other.diagonal
            return DiagonalLowRankJacobian(self.diagonal * d, self.left,
                                           self.right * d[:, :, None])
        return NotImplemented

    def _rmatmul(self, other):
        if isinstance(other, DiagonalJacobian):
            d = other.diagonal
            return DiagonalLowRankJacobian(d * self.diagonal, d[:, :, None] * self.left,
                                           self.right)
        return NotImplemented

    # ---- product costs (plan.py): the plan shape adds the rank r -----------------
    def _plan_shape(self) -> tuple:
        return (*self.shape, self.left.shape[2])

    @classmethod
    def _rank(cls, shape) -> int:
        return int(shape[3]) if len(shape) >= 4 else 2  # LayerNorm's

    @classmethod
    def _apply_cost(cls, shape, k):
        batch, n = shape[:2]
        return batch * n * k * (1 + 2 * cls._rank(shape))

    _rapply_cost = _apply_cost

    @classmethod
    def _matmul_cost(cls, shape, other, other_shape):
        if issubclass(other, DiagonalJacobian):
            return DiagonalLowRankJacobian, shape[0] * shape[1] * (1 + cls._rank(shape))
        return NotImplemented

    _rmatmul_cost = _matmul_cost

    @classmethod
    def _stored_items(cls, shape):
        return shape[0] * shape[1] * (1 + 2 * cls._rank(shape))

    def _add(self, other):
        if isinstance(other, DiagonalJacobian):
            return DiagonalLowRankJacobian(self.diagonal + other.diagonal, self.left, self.right)
        if isinstance(other, IdentityJacobian):
            return DiagonalLowRankJacobian(self.diagonal + 1, self.left, self.right)
        return NotImplemented

    def _scale(self, scalar):
        return DiagonalLowRankJacobian(scalar * self.diagonal, scalar * self.left, self.right)
