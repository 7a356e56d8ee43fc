"""The kink rule, for layers and losses alike: where a derivative jumps, any slope
between the one-sided ones is right.

A layer says where its derivative jumps through one hook, `Layer._kink_crossed(z, z0)`
(which inputs a perturbed pass moved onto or across a kink): by default it reads
`Layer.kinks`, input values of an elementwise layer; MaxPool2D's ties are kinks in the
difference of two inputs. A loss's `kinks` are values of the residual `y - t`.
Everything that judges with them is here: the interval chain rule, the judgement.
"""

from __future__ import annotations

import numpy as np

from .tolerance import _SPLIT_BUDGET, CENTRAL_STEP


def _kink_interval(ev, losses, start, plus, minus, h, budget):
    """`(lo, hi, magnitude)` bounding every derivative a kink convention can give, or None.

    `plus`, `minus` (B, w) are the inputs of leaf `start` at `t = +h` and `-h`
    along the perturbation. At the first kinked leaf they reach, the layer's
    hook `Layer._kink_rates` names the outputs whose derivative a kink makes
    ambiguous and bounds their rate `da_o/dt` over every convention (an
    elementwise layer: the rate `dz_c/dt` on either side of `t = 0` times the
    activation's one-sided slopes at `z_c`; MaxPool2D: the rates of the tied
    entries of the window). `dL/dt` is then split by the chain rule into the
    part through the outputs that stay smooth (their one-sided slopes, or a
    deeper split) and, for every ambiguous output o, the product of its rate
    interval with the one-sided derivatives `dL/da_o` of the rest of the
    network (split again when they reach a kink deeper down). Any choice of
    slope inside `[left, right]` at every kink gives a value inside the sum of
    these intervals. `budget` (a one-element list) caps the evaluations spent.
    """
    found = ev.first_crossing(start, plus, minus)
    if found is None:
        return None
    index, zp, zm, crossed = found
    work = ev.leaves[index].work
    if 2 + 4 * int(crossed.sum()) > budget[0]:
        return None
    z0, a0 = ev.acts[index], ev.acts[index + 1]
    rates = work._kink_rates(z0, zp, zm, crossed, h)
    if rates is None:
        return None
    kinked, rate_lo, rate_hi, spent = rates
    outputs = np.argwhere(kinked)
    count = len(outputs)
    if count == 0:
        return None
    budget[0] -= 2 + spent + 2 * count
    sample, feature = outputs.T
    pick = np.arange(count)

    # The outputs no kink makes ambiguous move together.
    moved = np.stack([ev.forward(index, zp, 1), ev.forward(index, zm, 1)])
    smooth = np.where(kinked, a0, moved)
    y, deeper = ev.run(index + 1, smooth)
    d = losses.diffs(losses.per_sample(y))
    lo, hi = min(d[0] / h, -d[1] / h), max(d[0] / h, -d[1] / h)
    magnitude = abs(d[0] / h) + abs(d[1] / h)
    if deeper.any():
        inner = _kink_interval(ev, losses, index + 1, smooth[0], smooth[1], h, budget)
        if inner is not None:
            lo, hi, magnitude = inner

    # dL/da_o, one-sided, through the rest of the network.
    base = a0[sample, feature]
    eps = CENTRAL_STEP * np.maximum(1.0, np.abs(base))
    rows = np.repeat(a0[None], 2 * count, axis=0)
    rows[pick, sample, feature] += eps
    rows[count + pick, sample, feature] -= eps
    y, deeper = ev.run(index + 1, rows)
    d = losses.diffs(losses.per_sample(y))
    downstream = np.stack([d[:count] / eps, -d[count:] / eps])
    down_lo, down_hi = downstream.min(axis=0), downstream.max(axis=0)
    for c in np.flatnonzero(deeper[:count].any(axis=1) | deeper[count:].any(axis=1)):
        inner = _kink_interval(ev, losses, index + 1, rows[c], rows[count + c], eps[c], budget)
        if inner is not None:
            down_lo[c], down_hi[c] = inner[0], inner[1]
    # The product of two intervals is extreme at one of its four vertices.
    vertices = np.stack([r * g for r in (rate_lo, rate_hi) for g in (down_lo, down_hi)])
    lo += vertices.min(axis=0).sum()
    hi += vertices.max(axis=0).sum()
    magnitude += np.abs(vertices).max(axis=0).sum()
    return lo, hi, magnitude


def _coordinate_points(ev, index, name, coord, h):
    """`(start, plus, minus)`: the inputs (B, w) of leaf `start` with entry `coord` of the
    flat input (`index` None) or of the flat parameter moved by `+h` and `-h`."""
    if index is None:
        plus, minus = ev.point(None, None).copy(), ev.point(None, None).copy()
        plus.reshape(-1)[coord] += h
        minus.reshape(-1)[coord] -= h
        return 0, plus, minus
    plus = ev.param_outputs(index, name, np.array([coord]), np.array([h]))[0]
    minus = ev.param_outputs(index, name, np.array([coord]), np.array([-h]))[0]
    return index + 1, plus, minus


class _Output:
    """Output `y[sample, row]` in the role of the loss, for the kink split of a Jacobian entry."""

    def __init__(self, y0: np.ndarray, sample: int, row: int):
        self.sample, self.row, self.base = sample, row, y0[sample, row]

    def per_sample(self, y: np.ndarray) -> np.ndarray:
        return y[:, self.sample, self.row]

    def diffs(self, values: np.ndarray) -> np.ndarray:
        return values - self.base


class _Probe:
    """What `_judge` may ask about one failing entry beyond its differences at step h.

    `probe(coord, budget)` is the kink split (`_kink_interval`, or None);
    `probe.half(coord)` is `(D(h/2), evaluations)`, the central difference at
    half the step (None when it cannot be had), for the second opinion on an
    entry no kink reaches: where the derivative varies on a scale much finer
    than the step (GELU's Gaussian tail at x = -33), the truncation error of
    `D(h)` alone can exceed the tolerance.
    """

    def __init__(self, interval, half=None):
        self.interval, self.half = interval, half

    def __call__(self, coord, budget):
        return self.interval(coord, budget)


def _central(ev, out, start, plus, minus, step) -> float:
    """`(out(+) - out(-)) / (2 step)` for inputs `plus`, `minus` of leaf `start`."""
    y, _ = ev.run(start, np.stack([plus, minus]))
    values = out.diffs(out.per_sample(y))
    return float(values[0] - values[1]) / (2 * step)


def _jacobian_split(ev, y0, index, name, h, shape):
    """The `_Probe` for entry `(i, r, j)` of a Jacobian `shape` (B, m, k), of the
    input (`index` None, steps `h` (B, n)) or of a parameter (steps `h` (k,))."""

    def locate(coord):
        sample, row, col = (int(i) for i in np.unravel_index(coord, shape))
        if index is None:
            return sample, row, sample * shape[2] + col, h[sample, col]
        return sample, row, col, h[col]

    def split(coord, budget):
        sample, row, coord, step = locate(coord)
        start, plus, minus = _coordinate_points(ev, index, name, coord, step)
        return _kink_interval(ev, _Output(y0, sample, row), start, plus, minus, step, budget)

    def half(coord):
        sample, row, coord, step = locate(coord)
        start, plus, minus = _coordinate_points(ev, index, name, coord, step / 2)
        return _central(ev, _Output(y0, sample, row), start, plus, minus, step / 2), 2

    return _Probe(split, half)


def _direction_split(ev, y0, points, step):
    """The `_Probe` for entry `(j, i, r)` of directional derivatives along the directions
    whose `(start, plus, minus)` are `points[j]` (input directions, which start at leaf 0,
    are linear in the step: their half step is the midpoint)."""

    def split(coord, budget):
        j, sample, row = (int(i) for i in np.unravel_index(coord, (len(points), *y0.shape)))
        start, plus, minus = points[j]
        return _kink_interval(ev, _Output(y0, sample, row), start, plus, minus, step, budget)

    def half(coord):
        j, sample, row = (int(i) for i in np.unravel_index(coord, (len(points), *y0.shape)))
        start, plus, minus = points[j]
        if start != 0:
            return None, 0
        base = ev.acts[0]
        return _central(ev, _Output(y0, sample, row), 0, (base + plus) / 2, (base + minus) / 2,
                        step / 2), 2

    return _Probe(split, half)


def _judge(a, diff, tol, slack_unit, floor, losses=None, split=None):
    """`(passed, accepted_at_kink, evaluations)` per entry (flat arrays)."""
    numeric = diff.numeric.reshape(-1)
    fwd, bwd = diff.forward.reshape(-1), diff.backward.reshape(-1)
    reach = diff.reach.reshape(-1).copy()
    passed = np.abs(a - numeric) <= tol
    slack = tol + slack_unit * (np.abs(fwd) + np.abs(bwd) + floor)
    inside = (a >= np.minimum(fwd, bwd) - slack) & (a <= np.maximum(fwd, bwd) + slack)
    if losses is not None:
        dplus, dminus = diff.dplus.reshape(-1), diff.dminus.reshape(-1)
        loss_reach = loss_kink_reach(losses, dplus, dminus, fwd, bwd, tol)
        reach |= loss_reach
        steps = np.broadcast_to(diff.steps, diff.numeric.shape).reshape(-1)
        inside |= loss_reach & (np.abs(a) <= loss_norm_slope(losses, dplus, dminus, steps) + slack)
    accepted = ~passed & reach & inside
    evaluations = 0
    half = getattr(split, "half", None)
    if half is not None and not diff.richardson:
        # Second opinion where no kink is in reach: Richardson from D(h) and D(h/2), within
        # the tolerance plus its own error estimate |R - D(h/2)| (the truncation of
        # D(h/2)). A real bug, O(1) relative, stays far outside. Capped like the split.
        budget = _SPLIT_BUDGET
        for coord in np.flatnonzero(~passed & ~accepted & ~reach):
            if budget < 2:
                break
            value, cost = half(coord)
            budget -= cost
            evaluations += cost
            if value is None:
                continue
            extrapolated = (4 * value - numeric[coord]) / 3
            if abs(a[coord] - extrapolated) <= tol[coord] + abs(extrapolated - value):
                passed[coord] = True
    if split is not None:
        layer_reach = diff.reach.reshape(-1)
        for coord in np.flatnonzero(~passed & ~accepted & layer_reach):
            budget = [_SPLIT_BUDGET]
            interval = split(coord, budget)
            evaluations += _SPLIT_BUDGET - budget[0]
            if interval is None:
                continue
            lo, hi, magnitude = interval
            margin = tol[coord] + slack_unit * (magnitude + floor)
            if lo - margin <= a[coord] <= hi + margin:
                accepted[coord] = True
    return passed | accepted, accepted, evaluations


# ---- the same rule for a loss: its kinks are values of the residual y - t ----------------
def loss_norm_slope(losses, dplus, dminus, h) -> np.ndarray:
    """For the kink at residual 0, the largest slope of `L` along each step.

    There `L = k |e|` is a scaled norm of the error, whose slopes at `e = 0`
    fill `[-k |v|, k |v|]` along `e = t v`; and `k^2 |v|^2` is the second
    difference of `L^2`, `(L(h)^2 + L(-h)^2 - 2 L(0)^2) / (2 h^2)`, even when
    rounding has left the float64 copy a hair off the kink.
    """
    if 0.0 not in type(losses.loss).kinks:
        return np.zeros(np.shape(dplus))
    plus, minus = losses.value + dplus, losses.value + dminus
    curvature = (plus ** 2 + minus ** 2 - 2 * losses.value ** 2) / 2
    return np.sqrt(np.maximum(curvature, 0.0)) / h

def loss_kink_reach(losses, dplus, dminus, fwd, bwd, tol) -> np.ndarray:
    """Entries whose perturbation reaches one of the loss's kinks (residual values)."""
    reach = np.zeros(np.shape(dplus), dtype=bool)
    for kink in type(losses.loss).kinks:
        if kink == 0.0:
            reach |= abs(losses.value) <= np.maximum(
                np.maximum(np.abs(dplus), np.abs(dminus)), losses.kink_floor)
        else:  # a kink we cannot locate: within reach wherever the slopes jump
            reach |= np.abs(fwd - bwd) > tol
    return reach




def loss_near_kink(losses, change: float) -> bool:
    """The Taylor test's form of `loss_kink_reach`: one step changed `L` by `change`."""
    return bool(type(losses.loss).kinks) and abs(losses.value) <= max(abs(change),
                                                                      losses.kink_floor)
