"""Pooling over spatial windows (max and average) and Flatten."""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from ..jacobian import ConvGeometry, PoolJacobian, SelectionJacobian, pool_windows
from .activations import ActivationCache, Identity
from .base import register_layer
from .conv import _divisor
from .spatial import SpatialLayer, as_image_shape, pair

__all__ = ["MaxPool2D", "AvgPool2D", "Flatten"]


class MaxPoolCache(NamedTuple):
    x: np.ndarray  # (B, C*H*W) input
    indices: np.ndarray  # (B, m): the flat input index each output copied


class _Pool2D(SpatialLayer):
    """Windows of `kernel_size` every `stride` (default: the kernel), no padding, per channel."""

    def __init__(self, kernel_size, *, stride=None, input_shape=None):
        super().__init__()
        where = type(self).__name__
        self.kernel_size = pair(kernel_size, where, "kernel_size")
        self.stride = self.kernel_size if stride is None else pair(stride, where, "stride")
        self._windows = None
        if input_shape is not None:
            self.bind_input_shape(input_shape)

    @classmethod
    def example(cls, input_dim, *, rng, dtype=np.float64):
        channels = _divisor(input_dim, rng)
        height = _divisor(input_dim // channels, rng)
        width = input_dim // channels // height
        kernel = (int(rng.integers(1, min(3, height) + 1)),
                  int(rng.integers(1, min(3, width) + 1)))
        stride = None if rng.integers(2) else int(rng.integers(1, 3))
        return cls(kernel, stride=stride, input_shape=(channels, height, width))

    def config(self):
        return {"kernel_size": list(self.kernel_size), "stride": list(self.stride),
                "input_shape": None if self._input_shape is None else list(self._input_shape)}

    def __repr__(self):
        return (f"{type(self).__name__}({self.kernel_size}, stride={self.stride}, "
                f"input_shape={self._input_shape})")

    def bind_input_shape(self, input_shape):
        super().bind_input_shape(input_shape)
        # Derived once from the geometry here, never in a forward pass.
        self._windows = pool_windows(self._input_shape, self.kernel_size, self.stride)
        self._offsets = self._windows[0] - self._windows[0, 0]  # the same in every window
        _, ho, wo = self._output_shape(self._input_shape)
        (kh, kw), (sh, sw) = self.kernel_size, self.stride
        self._offset_slices = [(slice(i, i + sh * (ho - 1) + 1, sh),
                                slice(j, j + sw * (wo - 1) + 1, sw))
                               for i in range(kh) for j in range(kw)]

    def _check_shape(self, input_shape):
        _, height, width = as_image_shape(input_shape, self._where)
        kh, kw = self.kernel_size
        if height < kh or width < kw:
            raise ValueError(f"{self._where}: the window {self.kernel_size} does not fit "
                             f"`input_shape` {input_shape}")

    def _output_shape(self, input_shape):
        # A window is a correlation kernel without padding: the same output size.
        geometry = ConvGeometry(input_shape, self.kernel_size, self.stride, (0, 0))
        return (input_shape[0], *geometry.output_hw)

    @property
    def _overlapping(self) -> bool:
        return self.stride[0] < self.kernel_size[0] or self.stride[1] < self.kernel_size[1]

    def _windows_checked(self) -> np.ndarray:
        self._require_shape()
        return self._windows


@register_layer
class MaxPool2D(_Pool2D):
    """Max over each `kernel_size` window of each channel: `y_j = max_{k in window j} x_k`.

    Parameters
    ----------
    kernel_size : int or (int, int)
    stride : int or (int, int), optional
        Defaults to the kernel size.
    input_shape : (int, int, int), optional
        `(C, H, W)`; inferred inside a `Sequential`.

    Notes
    -----
    `x` `(B, C*H*W)`, `y` `(B, C*Ho*Wo)`, `Ho = (H - kh) // sh + 1`. Each
    output copies one input, so `dy_i/dx_i` is a per-sample selection
    (`SelectionJacobian`, stored as the `(B, m)` indices): `vjp` scatters
    `g` back to the winners, `jvp` gathers `v` at them.

    Ties go to the first maximum in C-order of the window (row by row). A
    tie is a kink: there the derivative jumps between the tied entries, so
    finite differences mean nothing within a step of one. `tie_gaps(x)`
    gives each window's margin (largest minus second largest); test inputs
    must keep it clear (distinct entries, as random draws are).
    """

    tie_kinks = True

    def tie_gaps(self, x) -> np.ndarray:
        """`(B, m)`: for each window, its largest entry minus its second largest (inf for 1x1)."""
        x = self._check_input(x)
        values = np.sort(x[:, self._windows_checked()], axis=2)
        if values.shape[2] < 2:
            return np.full(values.shape[:2], np.inf)
        return values[:, :, -1] - values[:, :, -2]

    def _crossed_windows(self, z, z0):
        """`(crossed, at, winner)`: window j crossed when some other entry reached its first
        maximum at `z0` (`x_k >= x_w`), or when it was tied at `z0` and moved; `crossed`
        and `at` (the flat index of w) `(..., B, m)`, `winner` `(B, m)` (w's offset)."""
        windows = self._windows_checked()
        winner = np.argmax(z0[:, windows], axis=2)  # the first maximum, as the forward's
        at = np.broadcast_to(windows[np.arange(len(windows)), winner], z.shape[:-1]
                             + (len(windows),))
        top = np.take_along_axis(z, at, axis=-1)
        crossed = np.zeros(top.shape, dtype=bool)
        tied = self.tie_gaps(z0) == 0
        moved = np.zeros(top.shape, dtype=bool) if tied.any() else None
        for k in range(windows.shape[1]):
            entry = z[..., windows[:, k]]
            crossed |= (entry >= top) & (winner != k)
            if moved is not None:
                moved |= entry != z0[:, windows[:, k]]
        if moved is not None:
            crossed |= tied & moved
        return crossed, at, winner

    def _kink_crossed(self, z, z0, reference=None):
        """A tie is a kink in the difference of two inputs (see `_crossed_windows`); the
        first maximum at `z0` of each crossed window is marked (the checkers read which
        samples reached a kink). `z` `(..., B, n)`, `z0` `(B, n)`."""
        hit = np.zeros(np.shape(z), dtype=bool)
        if self._windows_checked().shape[1] < 2:
            return hit
        crossed, at, _ = self._crossed_windows(z, z0)
        if self._overlapping:
            rows = np.arange(hit.size // hit.shape[-1])[:, None]
            np.logical_or.at(hit.reshape(-1, hit.shape[-1]), (rows, at.reshape(len(rows), -1)),
                             crossed.reshape(len(rows), -1))
        else:  # distinct windows: every entry has one window, so no index repeats
            np.put_along_axis(hit, at, crossed, axis=-1)
        return hit

    def _kink_rates(self, z0, zp, zm, crossed, h):
        """A window whose maximum ties (or changes hands) within the step: `dy_j/dt` is the
        rate of one of the entries that reach its maximum, whichever the convention;
        bounded by the least and largest of their rates on both sides of `t = 0`."""
        windows = self._windows_checked()
        if windows.shape[1] < 2:
            return None
        both = np.stack([zp, zm])
        kinked, at, winner = self._crossed_windows(both, z0)
        kinked = kinked.any(axis=0)  # (B, m)
        # Candidates: the first maximum, every entry tied with it at z0, and every entry
        # that reaches the maximum at +h or -h.
        values, base = both[..., windows], z0[:, windows]  # (2, B, m, K), (B, m, K)
        top0 = np.take_along_axis(base, winner[..., None], axis=2)
        candidates = (base == top0) | (values >= np.take_along_axis(
            values, np.broadcast_to(winner[..., None], values.shape[:-1] + (1,)), axis=-1)
        ).any(axis=0)
        rates = np.stack([(zp - z0)[:, windows] / h, -(zm - z0)[:, windows] / h])
        lo = np.where(candidates, rates, np.inf).min(axis=(0, 3))
        hi = np.where(candidates, rates, -np.inf).max(axis=(0, 3))
        return kinked, lo[kinked], hi[kinked], 0

    def _kink_distance(self, z):
        """`(B, n)`: half the distance of each entry below its window's maximum (half the
        gap to the runner-up for the maximum itself), since both ends of a tie move;
        the least over the windows holding it, inf for an entry in none."""
        z = np.asarray(z, dtype=np.float64)
        windows = self._windows_checked()
        distance = np.full(z.shape, np.inf)
        if windows.shape[1] < 2:
            return distance
        values = z[:, windows]
        top = values.max(axis=2, keepdims=True)
        below = top - values
        gaps = self.tie_gaps(z)[:, :, None]
        half = 0.5 * np.where(below == 0, gaps, below)
        for k in range(windows.shape[1]):
            cols = windows[:, k]
            distance[:, cols] = np.minimum(distance[:, cols], half[:, :, k])
        return distance

    def _forward(self, x):
        windows = self._windows_checked()
        batch = x.shape[0]
        image = x.reshape(batch, *self._input_shape)
        # One strided view per window offset, in C-order of the window.
        views = [image[:, :, rows, cols] for rows, cols in self._offset_slices]
        # A strictly greater entry takes over, so ties stay with the first maximum. The
        # winner is updated by arithmetic: np.copyto(..., where=) costs five times more.
        best = views[0].copy()
        winner = np.zeros(best.shape, np.int8 if len(views) < 128 else np.intp)
        for k, view in enumerate(views[1:], start=1):
            greater = view > best
            np.maximum(best, view, out=best)
            winner += (k - winner) * greater
        size = windows.shape[0]
        indices = windows[:, 0] + self._offsets[winner.reshape(batch, size)]
        return best.reshape(batch, size), MaxPoolCache(x, indices)

    def _jacobian(self, cache):
        return SelectionJacobian(cache.indices, cache.x.shape[1],
                                 distinct=not self._overlapping, dtype=cache.x.dtype)

    def _jvp(self, cache, v):
        return np.take_along_axis(v, cache.indices, axis=1)

    def _second_vjp(self, cache, g, v, tangents, need_input=True):
        return None, {}  # linear given the cached winners (a tie is a kink)


@register_layer
class AvgPool2D(_Pool2D):
    """Mean over each `kernel_size` window of each channel: `y_j = mean_{k in window j} x_k`.

    Parameters
    ----------
    kernel_size : int or (int, int)
    stride : int or (int, int), optional
        Defaults to the kernel size.
    input_shape : (int, int, int), optional
        `(C, H, W)`; inferred inside a `Sequential`.

    Notes
    -----
    Linear, with one `(C*Ho*Wo, C*H*W)` matrix for every sample
    (`PoolJacobian`, stored as the `(m, kh*kw)` window indices):
    `dy_i/dx_i[j, k] = 1/(kh kw)` when input k is in window j.
    """

    def _jacobian(self, cache):
        x = cache.x
        return PoolJacobian(self._windows_checked(), x.shape[1], x.shape[0], x.dtype)

    def _forward(self, x):
        cache = ActivationCache(x, None)
        return self._jacobian(cache)._jvp(x), cache

    def _second_vjp(self, cache, g, v, tangents, need_input=True):
        return None, {}  # linear


@register_layer
class Flatten(Identity):
    """The identity on the raveled layout: `(B, C, H, W)` images become `(B, C*H*W)`.

    Inside a network every sample is already its C-order ravel, so this layer
    changes nothing (it inherits every derivative from `Identity`); it exists
    so that stacks read as in PyTorch, and it ends the spatial shape (a later
    layer sees plain features).

    Notes
    -----
    `dy/dx = I_n` (an `IdentityJacobian`).
    """

    def _check_input(self, x, where=None):
        if isinstance(x, np.ndarray) and x.ndim > 2:
            x = x.reshape(x.shape[0], -1)
        return super()._check_input(x, where)
