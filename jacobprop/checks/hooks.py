"""The layers' finite-difference shortcuts checked against their own forward passes.

`Layer._affine_param_change` and `Layer._affine_input_columns` let the
checkers skip forward passes (`differences._Evaluator`), so a wrong hook
would feed them wrong differences: a correct layer would look wrong, or a
wrong one right. Before a checker trusts them, `_verify_hooks` compares what
each hook provided by a layer (non-None) says with the layer's forward pass,
at a few random coordinates (every one when there are few): on the float64
copy, whose parameters are moved one entry at a time and restored, never on
the live arrays. A hook that disagrees is reported, and its layer's hooks
are not used afterwards (`_Evaluator.untrusted`), so the checker's other
entries stay honest.

Both sides are compared as slopes, change over step, under rule 1 of the one
policy (`tolerance.py`): the hook plays the analytic side and the forward's
one-sided difference the numeric side; for an affine entry that difference
has no truncation error, only the rounding of one evaluation, `1e3 eps |y| /
h` (taken at the largest output, so outputs that cancel to ~0 do not shrink
it). The steps are the checkers' own, `h = eps^(1/3) max(1, |p|)`, with a
random sign.
"""

from __future__ import annotations

import numpy as np

from ..errors import ShapeError
from .differences import _Evaluator, affine_change_columns
from .reports import CheckEntry, _entry
from .tolerance import _EPS, _FLOOR, _HOOK_SAMPLES, _LAYER_NOISE, CENTRAL_STEP

PARAM_CHECK = "_affine_param_change vs forward"
INPUT_CHECK = "_affine_input_columns vs forward"


def _own_stream(rng: np.random.Generator) -> np.random.Generator:
    """A child of `rng` (`Generator.spawn`), so that the checker's other draws from `rng`
    stay what they were without the hooks; `rng` itself if it cannot spawn."""
    try:
        return rng.spawn(1)[0]
    except (AttributeError, TypeError, ValueError):
        return rng


def _sample(rng: np.random.Generator, size: int) -> np.ndarray:
    """Every index below `size` when there are few, else `_HOOK_SAMPLES` distinct ones, sorted."""
    if size <= _HOOK_SAMPLES:
        return np.arange(size)
    return np.sort(rng.choice(size, _HOOK_SAMPLES, replace=False))


def _verify_hooks(ev: _Evaluator, rtol: float, atol: float | None, rng: np.random.Generator,
                  *, used_only: bool = False) -> tuple[list[CheckEntry], int]:
    """One entry per hook a leaf of `ev` provides, and the layer passes spent.

    The layer of a failing hook joins `ev.untrusted`: none of its hooks is used
    afterwards. With `used_only` (gradcheck) only the
    hooks the differences can use are verified -- every parameter hook, and
    the input hook of a leaf right after a column-wise elementwise leaf that
    follows another -- and only the failing ones are returned.

    Entries are named `"hook <key>"` (`"hook W"`, `"hook 0.W"` in a stack) for
    the parameter hook and `"hook x"` (`"hook 2.x"`) for the input hook; the
    worst index reads (parameter index..., sample, output) or (input column,
    sample, output), the analytic value is the hook's slope and the numeric
    value the forward pass's.
    """
    rng = _own_stream(rng)
    entries, cost = [], 0
    for index, leaf in enumerate(ev.leaves):
        x, y0 = ev.acts[index], ev.acts[index + 1]
        found = [_param_hook_entry(ev, index, name, x, y0, rtol, atol, rng, used_only)
                 for name in leaf.work.params]
        if not used_only or (index >= 2 and ev._column_wise(index - 1)
                             and not ev.kinked[index]):
            found.append(_input_hook_entry(ev, index, x, y0, rtol, atol, rng, used_only))
        for entry, points in filter(None, found):
            cost += points  # one layer pass per sampled coordinate
            if entry is not None:
                entries.append(entry)
                if not entry.passed:
                    ev.untrusted.add(index)
    return entries, cost


def _claimed(leaf, hook: str, shape: tuple, fill) -> np.ndarray:
    """`fill()`, with a broadcasting mistake of the hook turned into a readable error."""
    try:
        return fill()
    except (ValueError, IndexError) as error:
        raise ShapeError(
            f"{leaf.title}.{hook} returned values that do not fit the output's changes "
            f"(G, B, m) = {shape}: {error}") from None


def _param_hook_entry(ev, index, name, x, y0, rtol, atol, rng, failures_only):
    """`(entry, passes)` for the parameter hook on `name`, or None when there is none;
    the entry is None when it passed and only failures are wanted."""
    leaf = ev.leaves[index]
    flat = leaf.work.params[name].reshape(-1)  # a view: the copy is C-contiguous
    coords = _sample(rng, flat.size)
    signs = np.where(rng.random(coords.size) < 0.5, -1.0, 1.0)
    steps = signs * CENTRAL_STEP * np.maximum(1.0, np.abs(flat[coords]))
    change = leaf.work._affine_param_change(x, name, coords, steps)
    if change is None:
        return None
    groups, batch = coords.size, x.shape[0]
    claimed = np.zeros((groups, *y0.shape))

    def fill():
        # Either form of the answer (one column per perturbation, or several).
        rows, delta = affine_change_columns(change, groups, batch)
        claimed[np.arange(groups)[:, None, None], np.arange(batch)[None, :, None],
                rows[:, None, :]] = delta
        return claimed

    _claimed(leaf, "_affine_param_change", claimed.shape, fill)
    moved = np.empty((groups, *y0.shape))
    for group, (coord, step) in enumerate(zip(coords, steps, strict=True)):
        old = flat[coord]
        flat[coord] = old + step
        try:
            moved[group] = leaf.work._call_forward(x)[0]
        finally:
            flat[coord] = old
    per_step = steps[:, None, None]
    entry = _slope_entry(f"hook {leaf.keys[name]}", leaf, PARAM_CHECK, claimed / per_step,
                         (moved - y0) / per_step, np.abs(per_step), y0, rtol, atol,
                         failures_only)
    if entry is not None and entry.worst_index is not None:
        where = np.unravel_index(int(coords[entry.worst_index[0]]), leaf.work.params[name].shape)
        entry.worst_index = (*(int(i) for i in where), *entry.worst_index[1:])
    return entry, groups


def _input_hook_entry(ev, index, x, y0, rtol, atol, rng, failures_only):
    """`(entry, passes)` for the input hook, or None when there is none."""
    leaf = ev.leaves[index]
    cols = _sample(rng, x.shape[1])
    columns = leaf.work._affine_input_columns(cols)
    if columns is None:
        return None
    groups, batch = cols.size, x.shape[0]
    signs = np.where(rng.random(groups) < 0.5, -1.0, 1.0)
    # Column cols[g] of every sample moves by its own checker step, sign shared.
    h = CENTRAL_STEP * np.maximum(1.0, np.abs(x[:, cols].T))  # (G, B)
    rows = np.repeat(x[None], groups, axis=0)
    rows[np.arange(groups), :, cols] += signs[:, None] * h
    moved = ev.forward(index, rows.reshape(groups * batch, x.shape[1]), groups).reshape(
        groups, *y0.shape)
    claimed = _claimed(leaf, "_affine_input_columns", moved.shape, lambda: np.broadcast_to(
        np.asarray(columns, dtype=np.float64)[:, None, :], moved.shape))
    prefix = f"{leaf.label}." if leaf.label else ""
    entry = _slope_entry(f"hook {prefix}x", leaf, INPUT_CHECK, claimed,
                         (moved - y0) * signs[:, None, None] / h[:, :, None], h[:, :, None],
                         y0, rtol, atol, failures_only)
    if entry is not None and entry.worst_index is not None:
        entry.worst_index = (int(cols[entry.worst_index[0]]), *entry.worst_index[1:])
    return entry, groups


def _slope_entry(name, leaf, check, claimed, forward, h, y0, rtol, atol,
                 failures_only) -> CheckEntry | None:
    """Rule 1 with the hook's slope as the analytic side: `(G, B, m)` arrays, `h`
    broadcastable to them. None when it passed and `failures_only`."""
    scale = max(float(np.abs(claimed).max(initial=0.0)), float(np.abs(forward).max(initial=0.0)))
    floor = _FLOOR * scale
    noise = _LAYER_NOISE * _EPS * float(np.abs(y0).max(initial=0.0)) / h
    base = (rtol * floor + noise) if atol is None else atol
    tol = base + rtol * np.maximum(np.abs(claimed), np.abs(forward))
    passed = np.abs(claimed - forward) <= tol
    if failures_only and passed.all():
        return None
    shape = forward.shape
    return _entry(name, leaf.label or None, leaf.type_name, check, claimed.reshape(-1),
                  forward.reshape(-1), np.broadcast_to(tol, shape).reshape(-1), floor,
                  passed.reshape(-1), np.zeros(forward.size, dtype=bool), shape)
