"""Exceptions raised by jacobprop, and the shared input checks that raise them.

Every message names where the problem is (layer or loss), the argument, what was
expected and what came, so the same check reads the same everywhere.
"""

from __future__ import annotations

import numpy as np

__all__ = ["ShapeError", "GradcheckError"]


class ShapeError(ValueError):
    """An array has the wrong number of dimensions or the wrong size along one."""


class GradcheckError(AssertionError):
    """A derivative disagrees with finite differences (raised only on request)."""


_REJECTED_KINDS = {
    "b": "boolean",
    "c": "complex",
    "O": "object",
    "U": "string",
    "S": "bytes",
    "V": "structured",
    "M": "datetime",
    "m": "timedelta",
}


def as_float_array(value, *, where: str, name: str, dtype=np.float64) -> np.ndarray:
    """Return `value` as a floating ndarray; integers are promoted to `dtype`.

    Boolean, complex, object and other non-numeric arrays raise TypeError: a
    derivative of those is never what the caller meant.
    """
    array = value if isinstance(value, np.ndarray) else np.asarray(value)
    kind = array.dtype.kind
    if kind == "f":
        return array
    if kind in "iu":
        return array.astype(dtype)
    described = _REJECTED_KINDS.get(kind, str(array.dtype))
    raise TypeError(
        f"{where}: `{name}` must be a real floating (or integer) array, "
        f"got dtype {array.dtype} ({described})"
    )


def check_batch_matrix(
    value, *, where: str, name: str, features: int | None = None, batch: int | None = None,
    dtype=np.float64,
) -> np.ndarray:
    """Validate a batch-first 2-D float array `(batch, features)` and return it.

    `features` and `batch` are checked when given; the message shows "B" or
    "features" for the sizes left free.
    """
    if isinstance(value, np.ndarray) and value.dtype.kind == "f":
        array = value  # the common case, without a call: this runs on every forward
    else:
        array = as_float_array(value, where=where, name=name, dtype=dtype)
    expected = (
        f"({'B' if batch is None else batch}, {'features' if features is None else features})"
    )
    if array.ndim != 2:
        hint = ""
        if array.ndim == 1:
            hint = "; for one sample pass x[None, :], for a batch of scalars x[:, None]"
        raise ShapeError(
            f"{where}: `{name}` must be 2-D with shape {expected}, "
            f"got {array.ndim}-D shape {array.shape}{hint}"
        )
    if (features is not None and array.shape[1] != features) or (
        batch is not None and array.shape[0] != batch
    ):
        raise ShapeError(f"{where}: `{name}` must have shape {expected}, got {array.shape}")
    return array


def check_rng(rng, *, where: str) -> np.random.Generator:
    """`rng` itself, or a fresh unseeded generator for None; anything else is a TypeError."""
    if rng is None:
        return np.random.default_rng()
    if not isinstance(rng, np.random.Generator):
        raise TypeError(
            f"{where}: `rng` must be a numpy.random.Generator, got {type(rng).__name__}"
        )
    return rng


def check_float_dtype(dtype, *, where: str) -> np.dtype:
    """`dtype` as a numpy dtype, which must be floating (float32, float64, ...)."""
    dtype = np.dtype(dtype)
    if dtype.kind != "f":
        raise TypeError(f"{where}: `dtype` must be a floating dtype, got {dtype}")
    return dtype


def check_positive_int(value, *, where: str, name: str) -> int:
    """`value` as an int >= 1 (a bool is not an integer here)."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{where}: `{name}` must be a positive integer, got {value!r}")
    return int(value)
