"""Finite differences through a float64 copy of a stack, batched over perturbations."""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from ..dispatch import is_standard
from ..errors import ShapeError, check_batch_matrix
from ..layers.base import Layer
from ..losses import Loss
from ..network import Sequential
from .tolerance import _CHUNK, CENTRAL_STEP, RICHARDSON_STEP, _as_float64, _check_tolerance


# ---- the affine-parameter hook's two forms ------------------------------------------------
def affine_change_columns(change, groups: int, batch: int):
    """`Layer._affine_param_change`'s answer as `(rows (G, k), delta (G, B, k))`.

    A hook gives `rows` `(G,)` with `delta` broadcastable to `(G, B)` (one output
    column per perturbation, as Dense's), or `rows` `(G, k)` of distinct columns
    with `delta` broadcastable to `(G, B, k)` (Conv2D: every position of one
    output channel).
    """
    rows, delta = change
    rows = np.asarray(rows, dtype=np.intp)
    if rows.ndim == 1:
        return rows[:, None], np.broadcast_to(delta, (groups, batch))[:, :, None]
    return rows, np.broadcast_to(delta, (groups, batch, rows.shape[1]))


def _columns_of(out: np.ndarray) -> np.ndarray:
    """`(G, m, B)` view of stacked outputs `(G, B, m)`, so `[g, rows[g]]` picks columns."""
    return np.swapaxes(out, 1, 2)


# ---- the float64 copy of a stack --------------------------------------------------------------
@dataclass
class _Leaf:
    label: str  # "2", "1.0" inside nested stacks, "" for a bare layer
    live: Layer  # read only
    work: Layer  # float64 copy: the only object whose arrays a check perturbs
    keys: dict[str, str]  # parameter name -> key in the report

    @property
    def type_name(self) -> str:
        return type(self.live).__name__

    @property
    def title(self) -> str:
        return f"layer {self.label} ({self.type_name})" if self.label else self.type_name


def _flatten(layer: Layer, prefix: str) -> list[_Leaf]:
    if isinstance(layer, Sequential):
        leaves = []
        for index, inner in enumerate(layer.layers):
            leaves.extend(_flatten(inner, f"{prefix}{index}."))
        return leaves
    work = copy.deepcopy(layer)
    for name in list(work.params):
        work.params[name] = np.array(work.params[name], dtype=np.float64)
    keys = {name: prefix + name for name in layer.params}
    return [_Leaf(prefix[:-1], layer, work, keys)]



class _Evaluator:
    """The float64 copies of a stack's layers at one input, and batched perturbed passes."""

    def __init__(self, leaves: list[_Leaf], x: np.ndarray):
        self.leaves = leaves
        self.batch = x.shape[0]
        acts = [x]
        for leaf in leaves:
            acts.append(leaf.work._call_forward(acts[-1])[0])
        self.acts = acts  # acts[l] is the input of leaf l, acts[-1] the output
        # Whose derivative jumps somewhere (at input values or at ties): the layer's hook
        # `_kink_crossed` says which of its inputs a perturbed pass moved onto a kink.
        self.kinked = [bool(leaf.work.has_kinks) for leaf in leaves]
        # A composite with kinks inside (Residual) compares its inner pass against a copy
        # at the unperturbed parameters: its own parameters' moves cross those kinks too.
        self.reference = [copy.deepcopy(leaf.work) if kinked and leaf.work.sublayers()
                          else None for leaf, kinked in zip(leaves, self.kinked, strict=True)]
        # A layer whose samples interact must see each perturbed batch on its own.
        self.coupled = [bool(leaf.work.couples_samples) for leaf in leaves]
        # Leaves whose shortcut hooks disagreed with their forward pass (`hooks.py`):
        # their perturbations always go through the forward pass.
        self.untrusted: set[int] = set()
        width = max(a.shape[1] for a in acts)
        self.chunk = max(1, _CHUNK // max(1, self.batch * width))  # batch 0 too

    def run(self, start: int, rows: np.ndarray):
        """Push `rows` (G, B, w), inputs of leaf `start`, to the output.

        Returns the outputs (G, B, m) and the reach mask (G, B): the sample's
        pass moved some kinked layer's input onto or across one of its kinks.
        """
        groups = rows.shape[0]
        reach = np.zeros(rows.shape[:2], dtype=bool)
        flat = rows.reshape(groups * self.batch, rows.shape[2])
        for index in range(start, len(self.leaves)):
            if self.kinked[index]:
                z = flat.reshape(groups, self.batch, -1)
                reach |= self.crossed(index, z, self.acts[index]).any(axis=2)
            flat = self.forward(index, flat, groups)
        return flat.reshape(groups, self.batch, flat.shape[1]), reach

    def crossed(self, index: int, z: np.ndarray, z0: np.ndarray) -> np.ndarray:
        """Leaf `index`'s kink hook: the entries of `z` that moved from `z0` onto a kink."""
        work = self.leaves[index].work
        reference = self.reference[index]
        if reference is None:
            return np.asarray(work._kink_crossed(z, z0), dtype=bool)
        return np.asarray(work._kink_crossed(z, z0, reference), dtype=bool)

    def inner_reach(self, index: int, name: str, deltas) -> np.ndarray:
        """`(G, B)`: which samples of leaf `index`'s pass reach a kink inside it when
        `params[name]` moves by each of `deltas` (flat `(size,)` arrays, or `(coord,
        step)` pairs); all False for a leaf without kinks inside."""
        deltas = list(deltas)
        reach = np.zeros((len(deltas), self.batch), dtype=bool)
        if index is None or self.reference[index] is None:
            return reach
        work, x = self.leaves[index].work, self.acts[index]
        old = work.params[name]
        for group, delta in enumerate(deltas):
            moved = old.copy()
            if isinstance(delta, tuple):
                moved.reshape(-1)[delta[0]] += delta[1]
            else:
                moved += np.reshape(delta, old.shape)
            work.params[name] = moved
            try:
                reach[group] = self.crossed(index, x[None], x)[0].any(axis=-1)
            finally:
                work.params[name] = old
        return reach

    def forward(self, index: int, flat: np.ndarray, groups: int) -> np.ndarray:
        """Leaf `index` on `groups` stacked batches `(groups * B, w)`."""
        work = self.leaves[index].work
        if not self.coupled[index] or groups == 1:
            return work._call_forward(flat)[0]
        parts = flat.reshape(groups, self.batch, flat.shape[1])
        return np.concatenate([work._call_forward(part)[0] for part in parts])

    def coupled_input_jacobian(self, step: float, richardson: bool):
        """Differences of the output in every input entry, one at a time: `(B, m, B, n)`.

        For a stack whose samples interact, moving column j of every sample at
        once (the per-sample shortcut) would add up the cross-sample terms.
        """
        x = self.acts[0]
        y0 = self.acts[-1]
        batch, n = x.shape
        h = step * np.maximum(1.0, np.abs(x)).reshape(-1)
        shape = (batch, y0.shape[1], batch, n)
        d = {s: np.empty(shape) for s in _scales(richardson)}
        chunk = max(1, self.chunk // max(1, batch))
        for first in range(0, batch * n, chunk):
            coords = np.arange(first, min(batch * n, first + chunk))
            for s in d:
                rows = np.repeat(x[None], len(coords), axis=0)
                rows.reshape(len(coords), -1)[np.arange(len(coords)), coords] += s * h[coords]
                out, _ = self.run(0, rows)
                sample, col = np.divmod(coords, n)
                d[s][:, :, sample, col] = np.moveaxis(out - y0, 0, 2)
        steps = h.reshape(batch, n)[None, None]
        reach = np.zeros(shape, dtype=bool)
        return _combine(d, steps, richardson, reach)

    def first_crossing(self, start: int, plus: np.ndarray, minus: np.ndarray):
        """`(l, z+, z-, crossed)` at the first kinked leaf that either pass reaches, or None."""
        for index in range(start, len(self.leaves)):
            if self.kinked[index]:
                base = self.acts[index]
                crossed = self.crossed(index, np.stack([plus, minus]), base).any(axis=0)
                if crossed.any():
                    return index, plus, minus, crossed
            work = self.leaves[index].work
            plus, minus = work._call_forward(plus)[0], work._call_forward(minus)[0]
        return None

    def _column_wise(self, index: int) -> bool:
        """Leaf `index` maps any single column elementwise (no parameters, any width)."""
        work = self.leaves[index].work
        return work.elementwise and not work.params and work.input_dim is None

    def param_pass(self, index: int, name: str, coords: np.ndarray, steps: np.ndarray):
        """`run` from the outputs of leaf `index` under `param_outputs(...)` perturbations.

        When the layer's hook `_affine_param_change` says which output columns
        moving one entry changes (Dense: one; Conv2D: every position of one
        output channel), and the next layer is elementwise, only those columns
        are pushed through it instead of the whole width; a layer after that
        which is affine in its input with one matrix (`_affine_input_columns`)
        gets a low-rank update instead of a forward pass, before the rows go on.
        """
        after = index + 1
        change = None
        if after < len(self.leaves) and self._column_wise(after):
            change = self._affine_change(index, name, coords, steps)
        if change is None:
            y_out, reach = self.run(after, self.param_outputs(index, name, coords, steps))
            return y_out, reach | self.inner_reach(index, name, zip(coords, steps,
                                                                    strict=True))
        groups = len(coords)
        rows, delta = change  # (G, k), (G, B, k)
        base = np.moveaxis(self.acts[after][:, rows], 0, 1)  # (G, B, k): unperturbed columns
        moved = base + delta
        reach = self.crossed(after, moved, base).any(axis=2)
        activated = self.leaves[after].work._call_forward(moved.reshape(-1, 1))[0]
        activated = activated.reshape(moved.shape)
        following = after + 1
        columns = None
        if (following < len(self.leaves) and not self.kinked[following]
                and following not in self.untrusted):
            columns = self.leaves[following].work._affine_input_columns(rows.reshape(-1))
        if columns is not None:
            # Column j of its input moved by c, so its output moves by c M[:, j]: no pass.
            moved_by = activated - np.moveaxis(self.acts[following][:, rows], 0, 1)
            out = np.repeat(self.acts[following + 1][None], groups, axis=0)
            columns = columns.reshape(groups, rows.shape[1], -1)
            out += np.einsum("gbk,gkm->gbm", moved_by, columns)
            y_out, deeper = self.run(following + 1, out)
            return y_out, reach | deeper
        out = np.repeat(self.acts[following][None], groups, axis=0)
        _columns_of(out)[np.arange(groups)[:, None], rows] = np.swapaxes(activated, 1, 2)
        y_out, deeper = self.run(following, out)
        return y_out, reach | deeper

    def _affine_change(self, index: int, name: str, coords: np.ndarray, steps: np.ndarray):
        """The hook `Layer._affine_param_change` of leaf `index` at its cached input, as
        `(rows (G, k), delta (G, B, k))` (a hook may give one column per perturbation)."""
        if index in self.untrusted:
            return None
        work = self.leaves[index].work
        change = work._affine_param_change(self.acts[index], name, coords, steps)
        if change is None:
            return None
        return affine_change_columns(change, len(coords), self.batch)

    def param_outputs(self, index: int, name: str, coords: np.ndarray, steps: np.ndarray):
        """Outputs (G, B, m) of leaf `index` with `params[name].flat[coords[g]] += steps[g]`."""
        work = self.leaves[index].work
        x, y = self.acts[index], self.acts[index + 1]
        groups = len(coords)
        change = self._affine_change(index, name, coords, steps)
        if change is not None:
            out = np.repeat(y[None], groups, axis=0)
            rows, delta = change
            _columns_of(out)[np.arange(groups)[:, None], rows] += np.swapaxes(delta, 1, 2)
            return out
        out = np.empty((groups, *y.shape))
        flat = work.params[name].reshape(-1)  # a view: the copy is C-contiguous
        for group, (coord, step) in enumerate(zip(coords, steps, strict=True)):
            old = flat[coord]
            flat[coord] = old + step
            try:
                out[group] = work._call_forward(x)[0]
            finally:
                flat[coord] = old
        return out

    def input_pass(self, cols: np.ndarray, steps: np.ndarray):
        """`run` with column `cols[g]` of the input moved by `steps[g]` (G, B) in every sample."""
        rows = np.repeat(self.acts[0][None], len(cols), axis=0)
        rows[np.arange(len(cols)), :, cols] += steps
        return self.run(0, rows)

    def point(self, index: int | None, name: str | None) -> np.ndarray:
        """The float64 array an entry perturbs: the input (index None) or a parameter."""
        return self.acts[0] if index is None else self.leaves[index].work.params[name]

    def direction_point(self, index: int | None, name: str | None, delta: np.ndarray):
        """`(start, rows)`: the input (B, w) of leaf `start` when `point(index, name)` moves by
        `delta`."""
        if index is None:
            return 0, self.acts[0] + delta
        work = self.leaves[index].work
        old = work.params[name]
        work.params[name] = old + delta
        try:
            return index + 1, work._call_forward(self.acts[index])[0]
        finally:
            work.params[name] = old


class _LossDiffs:
    """`L(perturbed) - L(base)` from per-sample losses, for many perturbations at once."""

    def __init__(self, loss: Loss, t, y0: np.ndarray, kink_floor: float):
        self.loss = loss
        self.t = loss._validated_target(y0, _as_float64(t))
        # A subclass that overrides the public `value` defines L by it: then L is
        # evaluated whole, per perturbed batch, and never from per-sample losses.
        self.whole = not is_standard(type(loss), "value")
        if self.whole:
            self.ps0 = None
            self.value = float(loss._call_value(y0, self.t))
        else:
            self.ps0 = np.asarray(loss._call_per_sample(y0, self.t), dtype=np.float64)
            self.value = float(loss.reduce(self.ps0))
        # The base class reduces by a sum (or mean) over samples: one array sum for all
        # groups then, and L - L0 is summed from per-sample differences (less rounding).
        self.linear = loss.separable and not self.whole
        self.weight = 1.0 / y0.shape[0] if loss.reduction == "mean" else 1.0
        # What one evaluation of L is rounded against: L itself and the outputs it
        # is computed from (a cross-entropy of large logits cancels them).
        self.scale = abs(self.value) + self.weight * float(np.abs(y0).max(axis=1).sum())
        self._tiled: dict[int, np.ndarray] = {}
        # A network computing in float32 that hits a loss kink exactly (RMSE at zero
        # error) is off it by float32 rounding in the float64 copy: still at the kink.
        self.kink_floor = kink_floor

    def per_sample(self, y: np.ndarray) -> np.ndarray:
        """Per-sample losses (G, B) of the outputs (G, B, m); the outputs themselves when
        L is evaluated whole."""
        if self.whole:
            return y
        groups, batch, m = y.shape
        if groups not in self._tiled:
            reps = groups if self.t.ndim == 1 else (groups, 1)
            self._tiled[groups] = np.tile(self.t, reps)
        return self.loss._call_per_sample(y.reshape(groups * batch, m),
                                          self._tiled[groups]).reshape(
            groups, batch
        )

    def diffs(self, ps: np.ndarray) -> np.ndarray:
        """`L - L0` per group, `ps` (G, B) -> (G,)."""
        if self.linear:
            return self.weight * (ps - self.ps0).sum(axis=1)
        if self.whole:
            values = [self.loss._call_value(row, self.t) for row in ps]
        else:
            values = [self.loss.reduce(row) for row in ps]
        return np.array(values, dtype=np.float64) - self.value

    def sample_diffs(self, ps: np.ndarray) -> np.ndarray:
        """`L - L0` when only sample i takes its value from row g: (G, B) -> (G, B)."""
        if self.linear:
            return self.weight * (ps - self.ps0)
        out = np.empty(ps.shape)
        for group in range(ps.shape[0]):
            for sample in range(ps.shape[1]):
                row = self.ps0.copy()
                row[sample] = ps[group, sample]
                out[group, sample] = self.loss.reduce(row) - self.value
        return out


# ---- finite differences -------------------------------------------------------------------
@dataclass
class _Differences:
    """Finite differences of one entry, all arrays shaped like the entry."""

    numeric: np.ndarray  # central (or Richardson) estimate
    forward: np.ndarray  # (L(p+h) - L(p)) / h
    backward: np.ndarray  # (L(p) - L(p-h)) / h
    dplus: np.ndarray  # L(p+h) - L(p)
    dminus: np.ndarray  # L(p-h) - L(p)
    reach: np.ndarray  # a kinked layer's input crossed a kink
    steps: np.ndarray  # h
    richardson: bool = False  # `numeric` is already extrapolated


def _combine(d: dict, h: np.ndarray, richardson: bool, reach) -> _Differences:
    central = (d[1.0] - d[-1.0]) / (2 * h)
    if richardson:
        half = (d[0.5] - d[-0.5]) / h
        central = (4 * half - central) / 3
    return _Differences(central, d[1.0] / h, -d[-1.0] / h, d[1.0], d[-1.0], reach, h,
                        richardson)


def _step(richardson: bool) -> float:
    """The relative step: `eps^(1/5)` with Richardson extrapolation, else `eps^(1/3)`."""
    return RICHARDSON_STEP if richardson else CENTRAL_STEP


def _method(fast: bool, richardson: bool) -> str:
    """How a report names its finite differences."""
    return ("directional, " if fast else "") + (
        "Richardson" if richardson else "central differences")


def _scales(richardson: bool) -> tuple[float, ...]:
    return (1.0, -1.0, 0.5, -0.5) if richardson else (1.0, -1.0)


def _random_direction(rng: np.random.Generator, point: np.ndarray) -> np.ndarray:
    """Normal, scaled like the steps by `max(1, |p|)`: shaped like `point`."""
    return rng.standard_normal(point.shape) * np.maximum(1.0, np.abs(point))


def _sweep(ev, index, name, h, scales):
    """`(s, coords, y, reach)` for every chunk of coordinates and every step scale `s`.

    The coordinates are the columns of the input (`index` None, `h` (B, n): column
    j of every sample moves by `s h[:, j]` at once, since samples never interact)
    or the flat entries of a parameter (`h` (size,)); `y` (G, B, m) are the
    network outputs and `reach` (G, B) the kink-reach mask of `_Evaluator.run`.
    """
    size = h.shape[1] if index is None else h.size
    for first in range(0, size, ev.chunk):
        coords = np.arange(first, min(size, first + ev.chunk))
        for s in scales:
            if index is None:
                y, reach = ev.input_pass(coords, s * h[:, coords].T)
            else:
                y, reach = ev.param_pass(index, name, coords, s * h[coords])
            yield s, coords, y, reach


def _param_differences(ev, losses, index, name, step, richardson):
    p = ev.point(index, name)
    h = step * np.maximum(1.0, np.abs(p.reshape(-1)))
    d = {s: np.empty(p.size) for s in _scales(richardson)}
    reach = np.zeros(p.size, dtype=bool)
    for s, coords, y, crossed in _sweep(ev, index, name, h, d):
        d[s][coords] = losses.diffs(losses.per_sample(y))
        if abs(s) == 1.0:
            reach[coords] |= crossed.any(axis=1)
    return _combine(d, h, richardson, reach), len(d) * p.size


def _input_differences(ev, losses, step, richardson):
    x = ev.point(None, None)
    h = step * np.maximum(1.0, np.abs(x))
    d = {s: np.empty(x.shape) for s in _scales(richardson)}
    reach = np.zeros(x.shape, dtype=bool)
    if any(ev.coupled) or losses.whole:
        # Samples interact (or L is evaluated whole): every entry of x is its own
        # perturbation of the whole batch.
        flat_h = h.reshape(-1)
        for first in range(0, x.size, ev.chunk):
            coords = np.arange(first, min(x.size, first + ev.chunk))
            for s in d:
                rows = np.repeat(x[None], len(coords), axis=0)
                rows.reshape(len(coords), -1)[np.arange(len(coords)), coords] += (
                    s * flat_h[coords])
                y, crossed = ev.run(0, rows)
                d[s].reshape(-1)[coords] = losses.diffs(losses.per_sample(y))
                if abs(s) == 1.0:
                    reach.reshape(-1)[coords] |= crossed.any(axis=1)
        return _combine(d, h, richardson, reach), len(d) * x.size
    # Row g of y holds the B per-sample losses of B separate perturbations.
    for s, cols, y, crossed in _sweep(ev, None, None, h, d):
        d[s][:, cols] = losses.sample_diffs(losses.per_sample(y)).T
        if abs(s) == 1.0:
            reach[:, cols] |= crossed.T
    return _combine(d, h, richardson, reach), len(d) * x.shape[1]



# ---- numerical_jacobian -----------------------------------------------------------------------
def numerical_jacobian(f: Callable, x, *, step: float | None = None, richardson: bool = False,
                       per_sample: bool = True) -> np.ndarray:
    """The Jacobian of `f` at `x` by central differences, in float64.

    Parameters
    ----------
    f : callable
        With `per_sample=True`, maps a batch `(B, n)` to `(B, m)`, sample i
        of the output depending on sample i of the input only. Otherwise any
        array to any array.
    x : array_like
        The point; promoted to float64 (a copy: `f` may not mutate the caller's array).
    step : float, optional
        Relative step: `h_j = step * max(1, |x_j|)`. Defaults to `eps64^(1/3)`
        (`eps64^(1/5)` with Richardson).
    richardson : bool
        Combine steps h and h/2, `(4 D(h/2) - D(h)) / 3`, cancelling the `h^2` error.
    per_sample : bool
        Perturb coordinate j of every sample at once.

    Returns
    -------
    ndarray
        `(B, m, n)` with `per_sample=True`, else `(f(x).size, x.size)`.

    Notes
    -----
    `D_j = (f(x + h_j e_j) - f(x - h_j e_j)) / (x_j+h_j - (x_j-h_j))`, the
    denominator taken from the rounded points. With `per_sample=True` the
    whole `(B, m, n)` Jacobian costs `2n` evaluations of `f` (`4n` with
    Richardson), not `2Bn`: samples never interact, so column j of every
    sample moves at once.
    """
    where = "numerical_jacobian"
    if not callable(f):
        raise TypeError(f"{where}: `f` must be callable, got {type(f).__name__}")
    relative = _check_tolerance(where, "step", step)
    if relative == 0.0:
        raise ValueError(f"{where}: `step` must be > 0, got {step!r}")
    step = _step(richardson) if relative is None else relative
    if per_sample:
        x = np.array(check_batch_matrix(x, where=where, name="x"), dtype=np.float64)
        batch, n = x.shape
    else:
        x = np.array(x, dtype=np.float64)
        n = x.size
    h = step * np.maximum(1.0, np.abs(x))
    columns = []
    for j in range(n):
        estimates = []
        for scale in ((1.0, 0.5) if richardson else (1.0,)):
            values = []
            for sign in (1.0, -1.0):
                point = x.copy()
                if per_sample:
                    point[:, j] += sign * scale * h[:, j]
                else:
                    point.reshape(-1)[j] += sign * scale * h.reshape(-1)[j]
                values.append((point, np.asarray(f(point), dtype=np.float64)))
            (xp, yp), (xm, ym) = values
            if per_sample:
                if yp.ndim != 2 or yp.shape[0] != batch:
                    raise ShapeError(
                        f"{where}: with per_sample=True `f` must map (B, n) to (B, m) with "
                        f"B = {batch}, got an output of shape {yp.shape}"
                    )
                estimates.append((yp - ym) / (xp[:, j] - xm[:, j])[:, None])
            else:
                width = xp.reshape(-1)[j] - xm.reshape(-1)[j]
                estimates.append((yp - ym).reshape(-1) / width)
        if richardson:
            columns.append((4 * estimates[1] - estimates[0]) / 3)
        else:
            columns.append(estimates[0])
    return np.stack(columns, axis=-1)


