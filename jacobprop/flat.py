"""The flat parameter vector: every parameter of a network, raveled in `params` order.

`theta = concat(vec(p) for p in net.params.values())`, each `vec` a C-order
ravel, so `theta.size == P` and parameter Jacobians `(B, m, P)`, curvature
operators `(P, P)`, scipy optimizers and the NTK all index parameters the same
way. `FlatParams` is the exact inverse: `unflatten(flatten(params))` returns
arrays equal to the originals bit for bit, and `assign` writes a vector back
into the live arrays in place.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from .errors import ShapeError

__all__ = ["FlatParams"]


class _Slot(NamedTuple):
    key: str
    start: int
    stop: int
    shape: tuple[int, ...]


class FlatParams:
    """The layout of a parameter dict as one vector.

    Parameters
    ----------
    params : dict[str, ndarray]
        Usually `net.params` (live arrays); only the keys, shapes and dtype
        are kept, so the layout stays valid while training writes the arrays.
    """

    def __init__(self, params: dict[str, np.ndarray]):
        slots, start = [], 0
        for key, value in params.items():
            slots.append(_Slot(key, start, start + value.size, value.shape))
            start += value.size
        self.slots: tuple[_Slot, ...] = tuple(slots)
        self.size = start
        dtypes = {value.dtype for value in params.values()}
        self.dtype = np.result_type(*dtypes) if dtypes else np.dtype(np.float64)

    def __repr__(self) -> str:
        return f"FlatParams(size={self.size}, keys={[s.key for s in self.slots]})"

    def flatten(self, params: dict[str, np.ndarray], dtype=None) -> np.ndarray:
        """A new vector `(P,)` holding `params` (same keys and shapes) in layout order."""
        self._check_keys(params, "flatten")
        out = np.empty(self.size, dtype=dtype or self.dtype)
        for slot in self.slots:
            out[slot.start:slot.stop] = params[slot.key].reshape(-1)
        return out

    def unflatten(self, theta) -> dict[str, np.ndarray]:
        """Views into `theta` `(P,)` (or `(..., P)`), keyed and shaped like the params."""
        theta = np.asarray(theta)
        if theta.shape[-1:] != (self.size,):
            raise ShapeError(f"FlatParams.unflatten: `theta` must end in size P = {self.size}, "
                             f"got shape {theta.shape}")
        lead = theta.shape[:-1]
        return {
            slot.key: theta[..., slot.start:slot.stop].reshape(lead + slot.shape)
            for slot in self.slots
        }

    def assign(self, params: dict[str, np.ndarray], theta) -> None:
        """Write `theta` `(P,)` into the live arrays of `params`, in place."""
        self._check_keys(params, "assign")
        theta = np.asarray(theta)
        if theta.shape != (self.size,):
            raise ShapeError(f"FlatParams.assign: `theta` must have shape ({self.size},), "
                             f"got {theta.shape}")
        if not np.isfinite(theta).all():
            raise ValueError("FlatParams.assign: `theta` has non-finite entries; "
                             "nothing was written")
        for slot in self.slots:
            params[slot.key][...] = theta[slot.start:slot.stop].reshape(slot.shape)

    def _check_keys(self, params, method):
        expected = [(s.key, s.shape) for s in self.slots]
        got = [(key, np.shape(value)) for key, value in params.items()]
        if got != expected:
            raise ShapeError(f"FlatParams.{method}: parameters must be {expected} in that "
                             f"order, got {got}")
