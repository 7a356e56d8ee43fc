"""The Taylor remainder test: `taylor_test`."""

from __future__ import annotations

import math

import numpy as np

from ..errors import GradcheckError, ShapeError
from ..layers.base import Layer
from ..losses import Loss
from .differences import _random_direction
from .kinks import loss_near_kink
from .netcheck import _analytic_float64, _attribute, _prepare
from .reports import TaylorReport
from .tolerance import _EPS, _TAYLOR_POINTS, _TAYLOR_STEPS, default_rtol

_ASYMPTOTIC = 0.25  # largest share of D(h) its curvature part may have at a fitted step


def _taylor_sequence(ev, losses, spec, analytic, direction, grad_eps, loss) -> TaylorReport:
    """The remainders along one direction and the order fitted on them."""
    leaves = ev.leaves
    direction = {key: np.asarray(value, dtype=np.float64) for key, value in direction.items()}
    slope = sum(float((np.asarray(analytic[k], dtype=np.float64) * d).sum())
                for k, d in direction.items())
    terms = sum(float(np.abs(np.asarray(analytic[k], dtype=np.float64) * d).sum())
                for k, d in direction.items())
    steps = _TAYLOR_STEPS
    remainders = np.empty(len(steps))
    changes = np.empty(len(steps))
    usable = np.zeros(len(steps), dtype=bool)
    kinked = np.zeros(len(steps), dtype=bool)
    for number, h in enumerate(steps):
        moved = []
        try:
            for key, index, name in spec:
                if index is not None and key in direction:
                    work = leaves[index].work
                    moved.append((work, name, work.params[name]))
                    work.params[name] = work.params[name] + h * direction[key]
            x_moved = ev.acts[0] + h * direction.get("x", 0.0)
            out, crossed = ev.run(0, x_moved[None])
        finally:
            for work, name, old in reversed(moved):
                work.params[name] = old
        change = float(losses.diffs(losses.per_sample(out))[0])
        changes[number] = change
        remainders[number] = abs(change - h * slope)
        rounding = _EPS * losses.scale
        kinked[number] = crossed.any() or loss_near_kink(losses, change)
        usable[number] = not kinked[number] and remainders[number] > 1e2 * rounding
    # The remainder is O(h^2) only where the change is nearly linear in h: with
    # D(h) = L(p + h d) - L(p), the curvature part D(h) - 2 D(h/2) must be at most
    # 1/4 of D(h). Along a saturated exponential (e^{-a(z+h)} with a h > 1) it is
    # not, and the remainder there grows like h although the gradient is right.
    curvature = np.abs(changes[:-1] - 2 * changes[1:])
    curvature = np.append(curvature, curvature[-1])
    asymptotic = curvature <= _ASYMPTOTIC * np.abs(changes)
    above = usable.copy()
    # The asymptotic range is every step below the first one (from the small end)
    # that is above rounding and not nearly linear.
    in_range = np.logical_and.accumulate((asymptotic | ~above)[::-1])[::-1]
    usable &= asymptotic & in_range
    indices = np.flatnonzero(usable)[-_TAYLOR_POINTS:]
    used = np.zeros(len(steps), dtype=bool)
    used[indices] = True
    gradient_error = 0.0
    if len(indices) >= 3:
        order = float(np.polyfit(np.log(steps[indices]), np.log(remainders[indices]), 1)[0])
        # A first-order remainder r ~ h |<g - g_true, d>|: its size relative to sum |g d|
        # says whether it is a wrong gradient or the rounding of the gradient's dtype.
        gradient_error = float(np.median(remainders[indices] / steps[indices])) / max(
            terms, np.finfo(float).tiny)
        # Rule 1 of the policy: a first-order remainder that gradcheck's own finite
        # differences would accept is no evidence of a wrong gradient. It shows where
        # the usable steps are all outside the asymptotic range: along a saturated
        # exponential (e^{-a(z+h)}, a h > 1) the remainder grows like h, not h^2.
        within_rounding = gradient_error <= default_rtol()
        ok, conclusive = order > 1.5 or within_rounding, True
    else:
        # Either the remainder is at rounding level for every step (L is linear along d)
        # or kinks are within reach of the smallest steps (no verdict possible).
        order, ok = math.inf, True
        conclusive = not kinked[-_TAYLOR_POINTS:].any() and not (above & ~in_range).any()
    return TaylorReport(steps.copy(), remainders, used, order, ok, conclusive,
                        len(steps), gradient_error)


# ---- taylor_test --------------------------------------------------------------------
def taylor_test(net: Layer, x, t, loss: Loss, *, direction: dict | None = None,
                rng: np.random.Generator | None = None, mode: str = "vjp",
                raise_on_fail: bool = False) -> TaylorReport:
    """The Taylor remainder test: `|L(p + h d) - L(p) - h <grad, d>|` falls as `h^2`.

    Parameters
    ----------
    net : Layer
    x : array_like `(B, n)`
    t : target
    loss : Loss
    direction : dict, optional
        Keyed like the gradcheck entries (`"0.W"`, ..., `"x"`), each the shape
        of its array; missing keys do not move. By default a random direction
        (normal, scaled by `max(1, |p|)`) over every parameter and `x`, then the
        same restricted to each entry in turn, so that a wrong gradient in a
        small corner of the network is not drowned by the rest of `<g, d>`
        (32 evaluations per direction).
    rng : numpy.random.Generator, optional
    mode : {"vjp", "jacobian"}
    raise_on_fail : bool
        Raise `GradcheckError` (message: the report) on failure.

    Returns
    -------
    TaylorReport

    Notes
    -----
    With `r(h) = |L(p + h d) - L(p) - h <g, d>|`, a right gradient leaves
    `r = O(h^2)`, a wrong one `r ~ h |<g - g_true, d>|`. Steps `h = 2^-k`,
    k = 0..30, are evaluated through the float64 copy; the order is the
    least-squares slope of `log r` against `log h` over the 5 smallest steps
    whose remainder is above rounding, `1e2 eps (|L| + w sum_i max|y_i|)`,
    that reach no kink and where the change is nearly linear (its curvature
    part `|D(h) - 2 D(h/2)|` at most `|D(h)| / 4`, `D(h) = L(p + h d) - L(p)`).
    Pass: order > 1.5, the midpoint of the two cases, no tolerance to tune --
    or a first-order remainder `median(r / h)` within `default_rtol() sum |g d|`
    (3.7e-6), a relative error gradcheck's own differences accept (rule 1 of
    `jacobprop.checks.tolerance`). A network computing in float32 is
    differentiated through its float64 copy (same layer code): a float32
    gradient is right only to its rounding, relative to sums that may cancel,
    which would show as order 1 at small steps.
    """
    where = "taylor_test"
    rng, analytic, x, y, leaves, ev, losses, spec = _prepare(
        where, net, x, t, loss, mode, rng
    )
    bases = {key: ev.point(index, name) for key, index, name in spec}
    if direction is None:
        # One direction over everything, then one per entry: a wrong gradient in a
        # small corner of the network must not drown in the rest of <g, d>.
        overall = {key: _random_direction(rng, b) for key, b in bases.items()}
        directions = {"all": overall, **{key: {key: value} for key, value in overall.items()}}
    elif not isinstance(direction, dict):
        raise TypeError(f"{where}: `direction` must be a dict keyed like the gradients, "
                        f"got {type(direction).__name__}")
    else:
        for key, value in direction.items():
            if key not in bases:
                raise KeyError(f"{where}: `direction` has an unknown key {key!r}; "
                               f"the keys are {list(bases)}")
            if np.shape(value) != bases[key].shape:
                raise ShapeError(f"{where}: `direction[{key!r}]` must have shape "
                                 f"{bases[key].shape}, got {np.shape(value)}")
        directions = {"given": direction}
    grad_eps = float(np.finfo(np.result_type(y.dtype, np.float32)).eps)
    if np.dtype(y.dtype) != np.float64:
        # A float32 gradient is right to its rounding only, relative to terms that
        # may cancel: the same layer code is differentiated in the float64 copy.
        analytic = _analytic_float64(where, leaves, ev.acts[0], losses.t, loss, mode)
        grad_eps = _EPS
    results = {
        name: _taylor_sequence(ev, losses, spec, analytic, moved, grad_eps, loss)
        for name, moved in directions.items()
    }
    # Report the worst direction: a failing one, else the lowest order.
    name, report = min(results.items(), key=lambda item: (item[1].ok, item[1].order))
    report.direction = name
    report.orders = {key: result.order for key, result in results.items()}
    report.evaluations = 1 + len(_TAYLOR_STEPS) * len(results)
    ok = all(result.ok for result in results.values())
    report.ok = ok
    if not ok:
        report.culprit = _attribute(leaves, x, t, loss, None, None, rng)
    if raise_on_fail and not ok:
        raise GradcheckError(str(report))
    return report

