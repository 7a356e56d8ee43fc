"""The one tolerance policy of every checker, and the checks of their arguments."""

from __future__ import annotations

import math

import numpy as np

from ..errors import ShapeError
from ..layers.base import Layer
from ..losses import Loss

_EPS = float(np.finfo(np.float64).eps)

#: Relative step of a central difference: truncation h^2 against rounding eps/h.
CENTRAL_STEP = _EPS ** (1 / 3)
#: Relative step with Richardson extrapolation: truncation h^4 against rounding eps/h.
RICHARDSON_STEP = _EPS ** (1 / 5)

_SAFETY = 1e5  # rtol = 1e5 * (expected relative error of the difference)
_FLOOR = 1e-3  # entries below 1e-3 * max|grad| are judged against that floor
_NOISE = 1e2  # rounding of one loss evaluation, in units of eps * (|L| + w sum |y_i|) / h
_LAYER_NOISE = 1e3  # rounding of one layer output, in units of eps * |y| / h
_KINK_SLACK = 1e2  # one-sided slopes are first-order accurate: slack 100 * h, relative
_CONSISTENCY = 1e3  # analytic vs analytic: 1e3 * eps(dtype) * sum of |terms|
# The adjoint test sees only the products' outputs, not what a structured product
# cancels inside: diag(s) - s s^T applied near saturation rounds relative to |s||u|,
# not to |J u| (~ (1 - s_max) |u|). An adjoint bug is an O(1) error, so sqrt(eps)
# catches every one without flagging that rounding.
_ADJOINT_RTOL_POWER = 0.5
_CHUNK = 1 << 21  # elements of one batched array (16 MiB in float64)
_SPLIT_BUDGET = 4096  # evaluations the kink split may spend on one entry
_DIRECTIONS = 2  # random directions per entry in fast mode
_TAYLOR_POINTS = 5  # smallest usable steps the Taylor order is fitted on
_TAYLOR_STEPS = 2.0 ** -np.arange(0, 31)


def default_rtol(richardson: bool = False) -> float:
    """The default relative tolerance of a finite-difference check in float64.

    `1e5 eps^(2/3)` (about 3.7e-6) for central differences, `1e5 eps^(4/5)`
    (about 2.9e-8) with Richardson extrapolation.
    """
    return _SAFETY * _EPS ** (4 / 5 if richardson else 2 / 3)


# ---- argument checks ----------------------------------------------------------------------
def _check_tolerance(where: str, name: str, value) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise TypeError(f"{where}: `{name}` must be a real number, got {value!r}")
    value = float(value)
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"{where}: `{name}` must be finite and >= 0, got {value!r}")
    return value


def _resolve_rtol(where: str, dtype, rtol, atol, richardson: bool):
    rtol = _check_tolerance(where, "rtol", rtol)
    atol = _check_tolerance(where, "atol", atol)
    dtype = np.dtype(dtype)
    if dtype != np.float64 and rtol is None:
        raise TypeError(
            f"{where}: the network computes in {dtype.name}, and the default tolerances "
            f"certify float64 only; pass tolerances chosen for {dtype.name}, e.g. "
            f"{where}(..., rtol=1e-3, atol=1e-5) (the finite differences still run in float64)"
        )
    return (default_rtol(richardson) if rtol is None else rtol), atol


def _check_rng(where: str, rng) -> np.random.Generator:
    if rng is None:
        return np.random.default_rng()
    if not isinstance(rng, np.random.Generator):
        raise TypeError(
            f"{where}: `rng` must be a numpy.random.Generator, got {type(rng).__name__}"
        )
    return rng


def _check_layer_argument(where: str, name: str, layer) -> None:
    if not isinstance(layer, Layer):
        raise TypeError(f"{where}: `{name}` must be a jacobprop Layer, got {type(layer).__name__}")


def _check_loss(where: str, loss) -> None:
    if not isinstance(loss, Loss):
        raise TypeError(f"{where}: `loss` must be a jacobprop Loss, got {type(loss).__name__}")


def _check_gradient_shapes(where: str, source: str, grads: dict, params: dict) -> None:
    """Every gradient has its parameter's shape (a wrong one could broadcast unnoticed)."""
    for key, grad in grads.items():
        if np.shape(grad) != np.shape(params[key]):
            raise ShapeError(
                f"{where}: {source} returned a gradient of shape {np.shape(grad)} for "
                f"`{key}`, whose parameter has shape {np.shape(params[key])}"
            )


def _check_mode(where: str, mode) -> None:
    if mode not in ("vjp", "jacobian"):
        raise ValueError(f"{where}: `mode` must be 'vjp' or 'jacobian', got {mode!r}")


def _as_float64(value):
    """Targets and inputs for the float64 copy: floats widened, integer labels kept."""
    array = np.asarray(value)
    return array.astype(np.float64) if array.dtype.kind == "f" else array


def _kink_floor(y) -> float:
    """How far rounding in `y`'s dtype can move the float64 copy off a loss kink."""
    eps = float(np.finfo(np.result_type(y.dtype, np.float32)).eps)
    return 1e2 * eps * float(np.abs(y).max(initial=0.0))

