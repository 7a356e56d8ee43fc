"""2-D convolution (cross-correlation, as `torch.nn.functional.conv2d`) by im2col and one GEMM."""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from ..errors import check_float_dtype, check_positive_int, check_rng
from ..jacobian import (
    ConvGeometry,
    ConvJacobian,
    IdentityJacobian,
    PatchesJacobian,
    channel_rows,
    from_channel_rows,
)
from .base import register_layer
from .spatial import SpatialLayer, as_image_shape, pair

__all__ = ["Conv2D"]


class ConvCache(NamedTuple):
    x: np.ndarray  # (B, C*H*W): the input
    columns: np.ndarray  # (C*kh*kw, B*L): its im2col columns, which dL/dW needs


def _divisor(number: int, rng: np.random.Generator) -> int:
    divisors = [d for d in range(1, number + 1) if number % d == 0]
    return int(divisors[rng.integers(len(divisors))])


@register_layer
class Conv2D(SpatialLayer):
    """2-D cross-correlation with zero padding: `y[o] = b[o] + sum_c W[o, c] * x[c]`.

    Parameters
    ----------
    in_channels, out_channels : int
        C and O.
    kernel_size : int or (int, int)
        `(kh, kw)`.
    input_shape : (int, int, int), optional
        The per-sample input `(C, H, W)`; inside a `Sequential` it may be left
        out when the previous layer's `output_shape` determines it.
    stride, padding : int or (int, int)
        As in PyTorch; padding adds zeros on both sides.
    bias : bool
    rng : numpy.random.Generator, optional
        Initial `W` and `b` uniform in `+-1/sqrt(C kh kw)` (PyTorch's default).
    dtype : floating dtype

    Notes
    -----
    Shapes: `x` `(B, C*H*W)` (or `(B, C, H, W)`), `W` `(O, C, kh, kw)`, `b`
    `(O,)`, `y` `(B, O*Ho*Wo)` with `Ho = (H + 2 ph - kh) // sh + 1` (same for
    W) and `L = Ho*Wo` positions. With the im2col columns `P` `(C kh kw, B*L)`
    (one `sliding_window_view` copy), `y_rows = W_mat @ P + b` `(O, B*L)` is
    one GEMM.

    - `dy_i/dx_i` is one Toeplitz-like `(O*L, C*H*W)` matrix shared by every
      sample (`ConvJacobian`): applied by correlation, formed only by
      `to_dense` / `to_sparse`;
    - `dy_i/dvec(W) = I_O (kron) P_i^T` (`PatchesJacobian`), so
      `dL/dW = G_rows P^T`, one GEMM over all `B*L` positions, as Dense's
      `G^T X` (`G_rows` `(O, B*L)` is `g` with its channels first);
    - `dy_i/db = I_O (kron) 1_L`.

    So `dL/dx = col2im(W_mat^T G_rows)` (the transposed convolution).
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size, *, input_shape=None,
                 stride=1, padding=0, bias: bool = True, rng: np.random.Generator | None = None,
                 dtype=np.float64):
        super().__init__()
        where = "Conv2D"
        self.in_channels = check_positive_int(in_channels, where=where, name="in_channels")
        self.out_channels = check_positive_int(out_channels, where=where, name="out_channels")
        self.kernel_size = pair(kernel_size, where, "kernel_size")
        self.stride = pair(stride, where, "stride")
        self.padding = pair(padding, where, "padding", minimum=0)
        self.bias = bool(bias)
        self._geometry = None
        dtype = check_float_dtype(dtype, where=where)
        rng = check_rng(rng, where=where)
        if input_shape is not None:
            self.bind_input_shape(input_shape)
        kh, kw = self.kernel_size
        bound = 1.0 / np.sqrt(self.in_channels * kh * kw)
        shape = (self.out_channels, self.in_channels, kh, kw)
        self.params["W"] = rng.uniform(-bound, bound, shape).astype(dtype)
        if self.bias:
            self.params["b"] = rng.uniform(-bound, bound, self.out_channels).astype(dtype)

    @classmethod
    def example(cls, input_dim, *, rng, dtype=np.float64):
        # Any width is some (C, H, W); padding lets a 3x3 kernel fit a 1-pixel row.
        channels = _divisor(input_dim, rng)
        height = _divisor(input_dim // channels, rng)
        width = input_dim // channels // height
        padding = int(rng.integers(0, 2))
        kernel = (int(rng.integers(1, min(3, height + 2 * padding) + 1)),
                  int(rng.integers(1, min(3, width + 2 * padding) + 1)))
        # At least two output channels: with one, a following Softmax makes the bias
        # gradient cancel to rounding noise, which array-relative checks misread.
        return cls(channels, int(rng.integers(2, 4)), kernel,
                   input_shape=(channels, height, width), stride=int(rng.integers(1, 3)),
                   padding=padding, rng=rng, dtype=dtype)

    def config(self):
        return {"in_channels": self.in_channels, "out_channels": self.out_channels,
                "kernel_size": list(self.kernel_size),
                "input_shape": None if self._input_shape is None else list(self._input_shape),
                "stride": list(self.stride), "padding": list(self.padding), "bias": self.bias,
                "dtype": np.dtype(self.params["W"].dtype).name}

    def __repr__(self):
        return (f"Conv2D({self.in_channels}, {self.out_channels}, {self.kernel_size}, "
                f"input_shape={self._input_shape}, stride={self.stride}, "
                f"padding={self.padding}, bias={self.bias})")

    def _check_shape(self, input_shape):
        channels, height, width = as_image_shape(input_shape, self._where)
        if channels != self.in_channels:
            raise ValueError(f"Conv2D: `input_shape` {input_shape} has {channels} channels, "
                             f"but in_channels is {self.in_channels}")
        (kh, kw), (ph, pw) = self.kernel_size, self.padding
        if height + 2 * ph < kh or width + 2 * pw < kw:
            raise ValueError(f"Conv2D: the kernel {self.kernel_size} does not fit the padded "
                             f"input {(height + 2 * ph, width + 2 * pw)} of `input_shape` "
                             f"{input_shape}")

    @property
    def geometry(self) -> ConvGeometry:
        """The sizes of the correlation, fixed once the input shape is."""
        if self._geometry is None:
            self._require_shape()
        return self._geometry

    def bind_input_shape(self, input_shape) -> None:
        super().bind_input_shape(input_shape)
        # Derived once here (construction or a Sequential), never in a forward pass.
        self._geometry = ConvGeometry(self._input_shape, self.kernel_size, self.stride,
                                      self.padding)

    def _output_shape(self, input_shape):
        geometry = ConvGeometry(input_shape, self.kernel_size, self.stride, self.padding)
        return (self.out_channels, *geometry.output_hw)

    @property
    def W(self) -> np.ndarray:  # noqa: N802 (the maths name)
        return self.params["W"]

    def _matrix_w(self) -> np.ndarray:
        return self.params["W"].reshape(self.out_channels, -1)

    # ---- forward, then its derivatives --------------------------------------
    def _forward(self, x):
        columns = self.geometry.columns(x)
        rows = self._matrix_w() @ columns  # (O, B*L)
        if self.bias:
            rows += self.params["b"][:, None]
        return from_channel_rows(rows, x.shape[0], self.geometry.positions), ConvCache(x, columns)

    def _vjp(self, cache, g, need_input):
        rows = channel_rows(g, self.out_channels)  # (O, B*L)
        grads = {"W": (rows @ cache.columns.T).reshape(self.params["W"].shape)}
        if self.bias:
            grads["b"] = np.add.reduce(rows, axis=1)
        gx = self._jacobian(cache)._vjp(g) if need_input else None  # the transposed conv
        return gx, grads

    def _affine_param_change(self, x, name, coords, steps):
        # W[o, c, i, j] + h moves channel o at every position by h times the matching row
        # of the im2col columns; b[o] + h moves it by h. See Layer._affine_param_change.
        if not self._own_forward_is(Conv2D):
            return None
        positions = self.geometry.positions
        if name == "W":
            channel, entry = np.divmod(coords, self.params["W"][0].size)
            patches = self.geometry.columns(x)[entry]  # (G, B*L)
            delta = steps[:, None, None] * patches.reshape(len(coords), x.shape[0], positions)
        else:
            channel, delta = coords, steps[:, None, None]
        return channel[:, None] * positions + np.arange(positions), delta

    def _jacobian(self, cache):
        return ConvJacobian(self.params["W"], self.geometry, cache.x.shape[0])

    def _param_jacobians(self, cache):
        batch = cache.x.shape[0]
        dtype = self.params["W"].dtype
        identity = IdentityJacobian(batch, self.out_channels * self.geometry.positions, dtype)
        jacobians = {"W": PatchesJacobian(identity, cache.columns, self.out_channels)}
        if self.bias:
            # The bias sees a patch of one constant 1 per position (no memory: stride 0).
            ones = np.broadcast_to(np.ones((1, 1), dtype), (1, cache.columns.shape[1]))
            jacobians["b"] = PatchesJacobian(identity, ones, self.out_channels)
        return jacobians

    # ---- hooks of jacobprop.derivatives: per-sample and second-order terms ----
    def _per_sample_patches(self, cache) -> np.ndarray:
        """The im2col columns of each sample, `(B, L, C kh kw)` (a view of `cache.columns`)."""
        batch = cache.x.shape[0]
        columns = cache.columns
        return columns.reshape(columns.shape[0], batch, self.geometry.positions).transpose(1, 2, 0)

    def _per_sample_grads(self, cache, g):
        # Sample i's weight gradient is G_i P_i^T with G_i (O, L) its output covector and
        # P_i its patches: one batched GEMM over the samples.
        batch = g.shape[0]
        rows = g.reshape(batch, self.out_channels, self.geometry.positions)
        grads = {"W": np.matmul(rows, self._per_sample_patches(cache))
                 .reshape(batch, *self.params["W"].shape)}
        if self.bias:
            grads["b"] = np.add.reduce(rows, axis=2)
        return grads

    def _per_sample_sq_norms(self, cache, g):
        # ||G_i P_i^T||_F^2, either from the (O, K) rows themselves or, when the positions
        # are few, as <G_i^T G_i, P_i^T P_i> over (L, L) Grams (the "ghost norm" trick).
        batch = g.shape[0]
        positions, kernel = self.geometry.positions, cache.columns.shape[0]
        rows = g.reshape(batch, self.out_channels, positions)
        patches = self._per_sample_patches(cache)  # (B, L, K)
        if positions * (self.out_channels + kernel) < self.out_channels * kernel:
            left = np.matmul(rows.transpose(0, 2, 1), rows)  # (B, L, L)
            right = np.matmul(patches, patches.transpose(0, 2, 1))
            total = np.einsum("bij,bij->b", left, right)
        else:
            weights = np.matmul(rows, patches)  # (B, O, K)
            total = np.einsum("bok,bok->b", weights, weights)
        if self.bias:
            sums = np.add.reduce(rows, axis=2)
            total += np.einsum("bo,bo->b", sums, sums)
        return total

    def _param_jvp(self, cache, tangents):
        # y moves by the correlation of x with dW, plus db: one GEMM on the cached columns.
        rows = tangents["W"].reshape(self.out_channels, -1) @ cache.columns
        if self.bias:
            rows += tangents["b"][:, None]
        return from_channel_rows(rows, cache.x.shape[0], self.geometry.positions)

    def _second_vjp(self, cache, g, v, tangents, need_input=True):
        # The vjp is bilinear in (W, x) as Dense's: gx = conv_W^T g, dL/dW = G P(x)^T. With g
        # fixed its derivative is conv_dW^T g for the input and G P(v)^T for W; the bias
        # gradient sum G does not move.
        gx = None
        if need_input:
            gx = self.geometry.transposed_conv(tangents["W"].reshape(self.out_channels, -1), g)
        if v is None:
            return gx, {}
        rows = channel_rows(g, self.out_channels)
        return gx, {"W": (rows @ self.geometry.columns(v).T).reshape(self.params["W"].shape)}
