"""A network's gradients against finite differences of its loss: `gradcheck`."""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from ..errors import GradcheckError, check_rng
from ..layers.base import Layer
from ..losses import Loss, check_loss
from ..network import Sequential
from .differences import (
    _combine,
    _Evaluator,
    _flatten,
    _input_differences,
    _LossDiffs,
    _method,
    _param_differences,
    _random_direction,
    _scales,
    _step,
    numerical_jacobian,
)
from .hooks import _verify_hooks
from .kinks import _central, _coordinate_points, _judge, _kink_interval, _Probe
from .layercheck import check_layer
from .reports import GradcheckReport, _entry
from .tolerance import (
    _DIRECTIONS,
    _EPS,
    _FLOOR,
    _KINK_SLACK,
    _NOISE,
    _as_float64,
    _check_gradient_shapes,
    _check_layer_argument,
    _check_mode,
    _kink_floor,
    _resolve_rtol,
    default_rtol,
    refuse_stochastic,
)


# ---- gradcheck ----------------------------------------------------------------------
def _as_sequential(where: str, net) -> Sequential:
    _check_layer_argument(where, "net", net)
    return net if isinstance(net, Sequential) else Sequential(net)


def _analytic(where, seq: Sequential, x, t, loss: Loss, mode: str):
    """The gradients under test, in the network's own dtype, keyed like the report."""
    # The paths a network itself takes (`_call_*`): a public override is what is checked.
    y, cache = seq._call_forward(seq._check_input(x))
    value, g = loss._call_value_and_grad(y, loss._validated_target(y, t))
    if mode == "vjp":
        gx, grads = seq._call_vjp(cache, g, True)
    else:
        _, grads = seq.value_and_grad(x, t, loss, mode="jacobian")
        # dL/dx_c = sum_i (dL/dy_i) (dy_i/dx_c): the summed vjp of a unit covector, which
        # reads (B, 1, n) blocks and a coupled (B, 1, B, n) operator alike.
        covector = loss.jacobian(y, t) @ seq._call_jacobian(cache)
        gx = covector._call_vjp(np.ones((y.shape[0], 1), dtype=covector.dtype))
    _check_gradient_shapes(where, f"the {mode} backward of {type(seq).__name__}", grads,
                           seq.params)
    analytic = dict(grads)
    analytic["x"] = gx
    return analytic, y, cache


def _analytic_float64(where, leaves, x, t, loss, mode):
    """The gradients of the float64 copies of the layers, keyed like the network's."""
    flat = Sequential(*[leaf.work for leaf in leaves])
    grads, _, _ = _analytic(where, flat, x, t, loss, mode)
    analytic = {leaf.keys[name]: grads[f"{index}.{name}"]
                for index, leaf in enumerate(leaves) for name in leaf.keys}
    analytic["x"] = grads["x"]
    return analytic


def _entries_of(leaves):
    """`(key, leaf index or None, parameter name)` in report order: parameters, then x."""
    spec = [(leaf.keys[name], index, name)
            for index, leaf in enumerate(leaves) for name in leaf.keys]
    spec.append(("x", None, None))
    return spec


def _attribute(leaves, x, t, loss, rtol, atol, rng) -> str:
    """Name the first layer whose own Jacobians disagree, or the loss."""
    inputs = x
    for leaf in leaves:
        layer_rtol = rtol
        if layer_rtol is None and np.result_type(inputs, np.float32) != np.float64:
            # Taylor has no tolerance to pass on; sqrt(eps) is float32's usual one.
            layer_rtol = float(np.sqrt(np.finfo(np.result_type(inputs, np.float32)).eps))
        report = check_layer(leaf.live, inputs, rtol=layer_rtol, atol=atol, rng=rng)
        if not report.ok:
            failed = "; ".join(
                f"{e.name} ({e.check}, max rel err {e.max_rel_error:.2e})"
                for e in report.failures
            )
            return f"first layer whose own derivatives disagree: {leaf.title}: {failed}"
        inputs = leaf.live._call_forward(leaf.live._check_input(inputs))[0]
    y = np.asarray(inputs, dtype=np.float64)
    t64 = _as_float64(t)
    t64 = loss._validated_target(y, t64)
    numeric = numerical_jacobian(lambda out: np.array([loss._call_value(out, t64)]), y,
                                 per_sample=False).reshape(y.shape)
    analytic = np.asarray(loss._call_value_and_grad(y, t64)[1], dtype=np.float64)
    error = np.abs(analytic - numeric)
    bound = (rtol or default_rtol()) * (np.abs(analytic) + np.abs(numeric)
                                        + _FLOOR * np.abs(numeric).max(initial=0.0))
    if (error > bound + (atol or 0.0)).any():
        return (f"every layer agrees with finite differences at its own input; the loss "
                f"{type(loss).__name__} does not: dL/dy max abs err {error.max():.2e}")
    return ("every layer and the loss agree with finite differences on their own: look at "
            "how the network composes them")


class _Setup(NamedTuple):
    """A validated network check: its analytic gradients and the float64 evaluator."""

    rng: np.random.Generator
    analytic: dict  # key -> analytic gradient, in the network's dtype
    x: np.ndarray  # the validated network input
    y: np.ndarray  # the network output
    leaves: list
    ev: _Evaluator
    losses: _LossDiffs
    spec: list  # (key, leaf index or None for x, parameter name)


def _prepare(where, net, x, t, loss, mode, rng) -> _Setup:
    """Validate the arguments of a network check and set up its float64 evaluator."""
    seq = _as_sequential(where, net)
    refuse_stochastic(where, seq)
    check_loss(loss, where=where)
    _check_mode(where, mode)
    rng = check_rng(rng, where=where)
    analytic, y, cache = _analytic(where, seq, x, t, loss, mode)
    leaves = _flatten(seq, "")
    ev = _Evaluator(leaves, np.asarray(cache.x, dtype=np.float64))
    losses = _LossDiffs(loss, t, ev.acts[-1], _kink_floor(y))
    return _Setup(rng, analytic, cache.x, y, leaves, ev, losses, _entries_of(leaves))


def gradcheck(net: Layer, x, t, loss: Loss, *, fast: bool = False, richardson: bool = False,
              rtol: float | None = None, atol: float | None = None,
              raise_on_fail: bool = False, rng: np.random.Generator | None = None,
              mode: str = "vjp") -> GradcheckReport:
    """Check `dL/dp` for every parameter of `net`, and `dL/dx`, against finite differences.

    Parameters
    ----------
    net : Layer
        A `Sequential` (nested stacks are flattened) or any single layer
        (checked as `Sequential(net)`, so its keys read `"0.W"`).
    x : array_like `(B, n)`
    t : target in the form `loss` takes
    loss : Loss
    fast : bool
        Two random directional checks `<grad, v>` against a central difference
        along `v` per parameter (and for `x`), a handful of evaluations
        whatever the parameter count; else every coordinate.
    richardson : bool
        Richardson extrapolation over steps `h` and `h/2` (twice the evaluations).
    rtol, atol : float, optional
        See the module docstring for the defaults; a network computing in
        float32 needs an explicit `rtol`.
    raise_on_fail : bool
        Raise `GradcheckError` whose message is the report table.
    rng : numpy.random.Generator, optional
        Directions of the fast mode and covectors of the attribution.
    mode : {"vjp", "jacobian"}
        Which backward pass of the network produces the gradients under test.

    Returns
    -------
    GradcheckReport
        One entry per parameter key and one for `"x"`, and one per shortcut
        hook the differences would use that disagrees with its layer's forward
        pass ("hook 0.W", see `check_layer`; the differences then do without
        it; fast mode uses no hook and checks none). For a failure,
        `culprit` names the first layer whose own Jacobians (input or
        parameter) or vjp/jvp disagree at its cached input (`check_layer`).

    Notes
    -----
    Shapes: `x` `(B, n)`, `net(x)` `(B, m)`; every entry compares the analytic
    gradient (the parameter's shape, `(B, n)` for x) with finite differences
    of `L` through a float64 copy of the network; per coordinate
    `D_j = (L(p + h_j e_j) - L(p - h_j e_j)) / (2 h_j)`. Evaluations: `2P + 2n + 1`
    for P parameters (`4P + 4n + 1` with Richardson), plus the per-element
    kink splits if any (the few single-layer passes that verify the shortcut
    hooks are not counted).
    """
    where = "gradcheck"
    rng, analytic, x, y, leaves, ev, losses, spec = _prepare(
        where, net, x, t, loss, mode, rng
    )
    user_rtol = rtol
    rtol, atol = _resolve_rtol(where, np.result_type(y.dtype, np.float32), rtol, atol,
                               richardson)
    step = _step(richardson)
    # The differences below trust the layers' shortcut hooks only once checked against
    # their forward passes; a wrong one is left unused and reported (`hooks.py`).
    # (Fast mode uses none; the single-layer passes are not counted.)
    wrong_hooks = [] if fast else _verify_hooks(ev, rtol, atol, rng, used_only=True)[0]
    evaluations = 1
    diffs = {}
    if fast:
        scale = max(float(np.abs(a).max(initial=0.0)) for a in analytic.values())
    else:
        for key, index, name in spec:
            if index is None:
                diffs[key], cost = _input_differences(ev, losses, step, richardson)
            else:
                diffs[key], cost = _param_differences(ev, losses, index, name, step, richardson)
            evaluations += cost
        scale = max(max(float(np.abs(a).max(initial=0.0)) for a in analytic.values()),
                    max(float(np.abs(d.numeric).max(initial=0.0)) for d in diffs.values()))
    floor = _FLOOR * scale
    entries = []
    for key, index, name in spec:
        leaf = None if index is None else leaves[index]
        label = None if leaf is None else leaf.label
        type_name = "input" if leaf is None else leaf.type_name
        a = np.asarray(analytic[key], dtype=np.float64)
        if fast:
            entry, cost = _fast_entry(ev, losses, key, index, name, a, step, richardson, rtol,
                                      atol, floor, rng, label, type_name)
        else:
            entry, cost = _full_entry(ev, losses, key, index, name, a, diffs[key], step, rtol,
                                      atol, floor, label, type_name)
        evaluations += cost
        entries.append(entry)
    entries.extend(wrong_hooks)
    method = _method(fast, richardson)
    report = GradcheckReport(
        f"gradcheck {type(net).__name__} ({len(leaves)} layers), loss {type(loss).__name__}, "
        f"{np.dtype(y.dtype).name} (differences in float64), gradients by {mode}",
        entries, evaluations, method, rtol, atol)
    if not report.ok:
        report.culprit = _attribute(leaves, x, t, loss, user_rtol, atol, rng)
    if raise_on_fail and not report.ok:
        raise GradcheckError(str(report))
    return report


def _full_entry(ev, losses, key, index, name, a, diff, step, rtol, atol, floor, label,
                type_name):
    flat_a = a.reshape(-1)
    numeric = diff.numeric.reshape(-1)
    hs = diff.steps.reshape(-1)
    noise = _NOISE * _EPS * losses.scale / hs
    base = (rtol * floor + noise) if atol is None else atol
    tol = base + rtol * np.maximum(np.abs(flat_a), np.abs(numeric))
    slack_unit = _KINK_SLACK * step

    def split(coord, budget):
        start, plus, minus = _coordinate_points(ev, index, name, coord, hs[coord])
        return _kink_interval(ev, losses, start, plus, minus, hs[coord], budget)

    def half(coord):
        step = hs[coord] / 2
        start, plus, minus = _coordinate_points(ev, index, name, coord, step)
        return _central(ev, losses, start, plus, minus, step), 2

    passed, accepted, cost = _judge(flat_a, diff, tol, slack_unit, floor, losses,
                                    _Probe(split, half))
    return _entry(key, label, type_name, "finite differences", flat_a, numeric, tol, floor,
                  passed, accepted, a.shape), cost


def _fast_entry(ev, losses, key, index, name, a, step, richardson, rtol, atol, floor, rng,
                label, type_name):
    base_point = ev.point(index, name)
    analytic, tol = [], []
    d = {s: np.empty(_DIRECTIONS) for s in _scales(richardson)}
    reach = np.zeros(_DIRECTIONS, dtype=bool)
    splits, directions = [], []
    for j in range(_DIRECTIONS):
        direction = _random_direction(rng, base_point)
        directions.append(direction)
        rows = {}
        for s in d:
            start, point = ev.direction_point(index, name, s * step * direction)
            y, crossed = ev.run(start, point[None])
            d[s][j] = losses.diffs(losses.per_sample(y))[0]
            rows[s] = (start, point)
            if abs(s) == 1.0:
                reach[j] |= crossed.any() or ev.inner_reach(
                    index, name, [s * step * direction]).any()
        splits.append((rows[1.0][0], rows[1.0][1], rows[-1.0][1]))
        terms = a * direction
        analytic.append(terms.sum())
        # The size of the sum's terms, not of the sum: cancellation must not shrink it.
        scale = np.abs(terms).sum()
        noise = _NOISE * _EPS * losses.scale / step
        base = (rtol * floor * float(np.sqrt((direction ** 2).sum())) + noise
                ) if atol is None else atol
        tol.append((base, scale))
    diff = _combine(d, np.full(_DIRECTIONS, step), richardson, reach)
    analytic = np.array(analytic)
    numeric = diff.numeric
    tol = np.array([base + rtol * max(scale, abs(n))
                    for (base, scale), n in zip(tol, numeric, strict=True)])
    slack_unit = _KINK_SLACK * step

    def split(j, budget):
        start, plus, minus = splits[j]
        return _kink_interval(ev, losses, start, plus, minus, step, budget)

    def half(j):
        start, plus = ev.direction_point(index, name, 0.5 * step * directions[j])
        _, minus = ev.direction_point(index, name, -0.5 * step * directions[j])
        return _central(ev, losses, start, plus, minus, step / 2), 2

    passed, accepted, cost = _judge(analytic, diff, tol, slack_unit, floor, losses,
                                    _Probe(split, half))
    entry = _entry(key, label, type_name, "directional", analytic, numeric, tol, floor, passed,
                   accepted, (_DIRECTIONS,))
    entry.size = int(a.size)
    return entry, len(d) * _DIRECTIONS + cost


