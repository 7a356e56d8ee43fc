"""The one tolerance policy of every checker, and the checks of their arguments.

Every checker (`gradcheck`, `check_layer`, `taylor_test`, the testing kit's
`assert_layer_correct`, which is built on `check_layer`) judges with these
rules and no others; each is derived from the dtype and from magnitudes of
the quantities involved, never from the result alone (a result that cancels
to ~0 must not shrink its own tolerance).

1. **Finite differences** (float64 always). Steps `h_j = eps^(1/3) max(1, |p_j|)`
   (`eps^(1/5)` with Richardson). An entry passes when
   `|a - n| <= atol + rtol max(T, |n|)`, with `T` the sum of the absolute
   terms of the analytic product (`|J|` itself for a Jacobian entry),
   `rtol = default_rtol()` = `1e5 eps^(2/3)` (3.7e-6; `1e5 eps^(4/5)` with
   Richardson) and the default `atol = rtol 1e-3 max|analytic, numeric| +
   rounding of one evaluation / h` (`1e3 eps |y|` for a layer's output,
   `1e2 eps (|L| + w sum_i max|y_i|)` for a loss). Where the derivative jumps,
   the kink rule (`kinks.py`) decides instead. A layer's shortcut hooks
   (`hooks.py`) are judged by this rule too, the hook's slope as the analytic
   side and the forward pass's one-sided difference as the numeric one (exact
   but for rounding, the layer being affine in the entry), the rounding taken
   at the output's largest entry.
2. **Analytic against analytic** (vjp and jvp against the dense Jacobian, the
   dot tests, batch independence, float32 against float64):
   `|a - b| <= 1e3 eps(dtype) (T + R)`. `T` is again the sum of the absolute
   terms of the product (`|g| |J|` for a vjp entry); `R` is the rounding a
   structured product may leave that `T` does not show, per sample
   `|u_i|_1 |y_i|_inf / max(1, |x_i|_inf)` for the covector or vector `u`:
   softmax near saturation computes `s (u - <u, s>)`, which rounds relative to
   `|s| |u|` while `diag(s) - s s^T` has entries near 0. A real bug is an O(1)
   error relative to `T + R`.
3. A network or layer computing in float32 is certified only against an
   `rtol` the caller chose for float32 (rule 1); rule 2 uses eps(float32).

`dottest`, the standalone adjoint test of any operator, has no `y` to take
`R` from; it passes at `sqrt(eps)` relative to the sums' terms instead.
"""

from __future__ import annotations

import math

import numpy as np

from ..errors import ShapeError
from ..layers.base import Layer

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
_CONSISTENCY = 1e3  # analytic vs analytic: 1e3 * eps(dtype) * (T + R), rule 2
# The adjoint test sees only the products' outputs, not what a structured product
# cancels inside: diag(s) - s s^T applied near saturation rounds relative to |s||u|,
# not to |J u| (~ (1 - s_max) |u|). An adjoint bug is an O(1) error, so sqrt(eps)
# catches every one without flagging that rounding.
_ADJOINT_RTOL_POWER = 0.5
_CHUNK = 1 << 21  # elements of one batched array (16 MiB in float64)
_SPLIT_BUDGET = 4096  # evaluations the kink split may spend on one entry
_DIRECTIONS = 2  # random directions per entry in fast mode
_HOOK_SAMPLES = 4  # coordinates per parameter (input columns) a shortcut hook is verified at
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


def _check_layer_argument(where: str, name: str, layer) -> None:
    if not isinstance(layer, Layer):
        raise TypeError(f"{where}: `{name}` must be a jacobprop Layer, got {type(layer).__name__}")


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



def consistency_tolerance(dtype, terms, rounding):
    """Rule 2: the `|a - b|` allowed between two analytic computations in `dtype`."""
    eps = float(np.finfo(np.result_type(dtype, np.float32)).eps)
    return _CONSISTENCY * eps * (np.asarray(terms) + np.asarray(rounding))


def rounding_unit(x: np.ndarray, y: np.ndarray, coupled: bool = False):
    """Rule 2's `R`: a function of `|u|` `(B, k)` giving the per-sample rounding `(B, 1)`.

    `|u_i|_1 |y_i|_inf / max(1, |x_i|_inf)`; for a layer that couples samples,
    the whole batch's norms for every sample.
    """
    y_size = np.abs(y).max(axis=1, initial=0.0)
    x_size = np.maximum(1.0, np.abs(x).max(axis=1, initial=0.0))
    if coupled:
        y_size = np.full_like(y_size, y_size.max(initial=0.0))
        x_size = np.full_like(x_size, x_size.max(initial=1.0))

    def unit(u_abs: np.ndarray, kind: str = "vjp") -> np.ndarray:
        total = u_abs.sum(axis=1)
        if coupled:
            total = np.full_like(total, total.sum())
        return (total * y_size / x_size)[:, None]

    return unit


def refuse_stochastic(where: str, layer: Layer) -> None:
    """Raise when a forward pass of `layer` draws random numbers (Dropout in train mode)."""
    if layer.stochastic:
        culprit = _first_stochastic(layer)
        raise ValueError(
            f"{where}: {culprit} draws a new random mask on every forward pass; call "
            f"net.eval() (or set layer.training = False) before checking: finite "
            f"differences through a new mask per evaluation mean nothing"
        )


def _first_stochastic(layer: Layer) -> str:
    # Composites name their layers through the `sublayers()` hook (no attribute probing).
    for index, child in enumerate(layer.sublayers()):
        if child.stochastic:
            return f"layer {index} ({type(child).__name__})"
    return f"{type(layer).__name__}"
