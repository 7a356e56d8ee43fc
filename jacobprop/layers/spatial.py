"""What the image layers share: a per-sample `input_shape` `(C, H, W)` and raveled batches.

Inside a network a `(C, H, W)` sample is its C-order ravel, so every array is
still a `(B, n)` batch matrix and every Jacobian `(B, m, n)`. A spatial layer
also accepts the `(B, C, H, W)` array itself and ravels it. When it is built
without `input_shape`, the `Sequential` it is placed in supplies the shape
from the previous layer's `output_shape`.
"""

from __future__ import annotations

import math

import numpy as np

from ..errors import ShapeError, as_float_array
from .base import Layer

__all__ = ["SpatialLayer", "pair", "as_image_shape", "ravel_images"]


def pair(value, where: str, name: str, *, minimum: int = 1) -> tuple[int, int]:
    """An int or a pair of ints (as PyTorch's `kernel_size`, `stride`, `padding`) as a pair."""
    values = (value, value) if isinstance(value, (int, np.integer)) else tuple(value)
    if (len(values) != 2 or any(isinstance(v, bool) or not isinstance(v, (int, np.integer))
                                for v in values) or min(values) < minimum):
        raise ValueError(f"{where}: `{name}` must be an integer >= {minimum} or a pair of them, "
                         f"got {value!r}")
    return int(values[0]), int(values[1])


def as_image_shape(shape, where: str) -> tuple[int, int, int]:
    """`shape` checked as a per-sample `(C, H, W)` of positive ints."""
    values = tuple(shape)
    if len(values) != 3 or any(isinstance(v, bool) or not isinstance(v, (int, np.integer))
                               or v < 1 for v in values):
        raise ValueError(f"{where}: `input_shape` must be (C, H, W) with positive integers, "
                         f"got {shape!r}")
    return int(values[0]), int(values[1]), int(values[2])


def ravel_images(x, input_shape, where: str) -> np.ndarray:
    """`(B, C, H, W)` images as the `(B, C*H*W)` batch matrix (a view); other input unchanged."""
    if isinstance(x, np.ndarray) and x.ndim == 4:
        if input_shape is not None and x.shape[1:] != tuple(input_shape):
            expected = ", ".join(map(str, input_shape))
            raise ShapeError(f"{where}: `x` must be (B, C, H, W) = (B, {expected}) images or "
                             f"a (B, {math.prod(input_shape)}) batch matrix, got shape {x.shape}")
        return as_float_array(x, where=where, name="x").reshape(x.shape[0], -1)
    return x


class SpatialLayer(Layer):
    """Base of the layers that read a sample as an image `(C, H, W)`.

    Subclasses define `_output_shape(input_shape)` and, when some shapes do not
    fit, `_check_shape(input_shape)`; `bind_input_shape` (from the constructor's
    `input_shape`, or from a `Sequential`) fixes the shape once, and a subclass
    extends it to derive its geometry there.
    """

    _input_shape: tuple[int, int, int] | None = None

    @property
    def input_shape(self) -> tuple[int, int, int] | None:
        """The per-sample input `(C, H, W)`, or None while not yet known."""
        return self._input_shape

    @property
    def output_shape(self) -> tuple[int, int, int] | None:
        """The per-sample output `(C', H', W')`, or None while the input shape is unknown."""
        if self._input_shape is None:
            return None
        return self._output_shape(self._input_shape)

    def _output_shape(self, input_shape):
        raise NotImplementedError

    def bind_input_shape(self, input_shape) -> None:
        """Fix the input shape once (what a `Sequential` does from the previous layer).

        A layer that already has a different shape refuses: one layer object
        has one geometry.
        """
        input_shape = as_image_shape(input_shape, self._where)
        if self._input_shape is not None and self._input_shape != input_shape:
            raise ShapeError(f"{self._where}: already built for input shape "
                             f"{self._input_shape}, cannot take {input_shape}")
        self._check_shape(input_shape)
        self._input_shape = input_shape

    def _check_shape(self, input_shape) -> None:
        """Raise ValueError if this layer cannot take `input_shape`."""

    @property
    def input_dim(self):
        return None if self._input_shape is None else math.prod(self._input_shape)

    def output_dim(self, input_dim):
        return math.prod(self._output_shape(self._require_shape()))

    def _require_shape(self) -> tuple[int, int, int]:
        if self._input_shape is None:
            raise ShapeError(f"{self._where}: the input shape (C, H, W) is not known; pass "
                             f"`input_shape=` or place the layer in a Sequential after a "
                             f"layer that determines it")
        return self._input_shape

    def _check_input(self, x, where=None):
        x = ravel_images(x, self._input_shape, where or self._where)
        self._require_shape()
        return super()._check_input(x, where)
