"""One layer against itself and finite differences: `check_layer` and `dottest`."""

from __future__ import annotations

import math

import numpy as np

from ..errors import GradcheckError, ShapeError, check_positive_int, check_rng
from ..jacobian import Jacobian
from ..layers.base import Layer
from .differences import (
    _combine,
    _Evaluator,
    _flatten,
    _method,
    _random_direction,
    _scales,
    _step,
    _sweep,
)
from .hooks import _verify_hooks
from .kinks import _direction_split, _jacobian_split, _judge
from .reports import CheckEntry, GradcheckReport, _entry
from .tolerance import (
    _ADJOINT_RTOL_POWER,
    _DIRECTIONS,
    _EPS,
    _FLOOR,
    _KINK_SLACK,
    _LAYER_NOISE,
    _check_gradient_shapes,
    _check_layer_argument,
    _check_tolerance,
    _resolve_rtol,
    consistency_tolerance,
    refuse_stochastic,
    rounding_unit,
)


# ---- dottest ----------------------------------------------------------------------------------
def dottest(J_or_pair, *, shape: tuple | None = None, rng: np.random.Generator | None = None,
            rtol: float | None = None, raise_on_fail: bool = False, repeats: int = 3,
            name: str | None = None) -> float:
    """The adjoint test `<J u, v> == <u, J^T v>` with random `u`, `v`.

    Parameters
    ----------
    J_or_pair : Jacobian or (jvp, vjp)
        A jacobprop `Jacobian` (its `jvp` and `vjp`), or two callables
        `jvp(u)` `(B, n) -> (B, m)` and `vjp(v)` `(B, m) -> (B, n)`.
    shape : (B, m, n)
        Required with a pair; taken from the operator otherwise.
    rng : numpy.random.Generator, optional
    rtol : float, optional
        Pass threshold, `sqrt(eps(dtype))` by default: adjoint bugs are O(1), while
        a structured product may round relative to sizes its output does not show.
    raise_on_fail : bool
        Raise `GradcheckError` with a readable message when the discrepancy exceeds `rtol`.
    repeats : int
        Random pairs tried; the worst counts.
    name : str, optional
        How the operator is named in the message.

    Returns
    -------
    float
        The largest relative discrepancy `|<J u, v> - <u, J^T v>| / S` with
        `S = max(sum |J u * v|, sum |u * J^T v|)`, the size of the sums'
        terms (so cancellation in the sums does not inflate it).
    """
    where = "dottest"
    rng = check_rng(rng, where=where)
    if isinstance(J_or_pair, Jacobian):
        op = J_or_pair
        jvp, vjp, shape, dtype = op.jvp, op.vjp, op.shape, np.dtype(op.dtype)
        name = name or repr(op)
    elif (isinstance(J_or_pair, tuple) and len(J_or_pair) == 2
          and all(callable(fn) for fn in J_or_pair)):
        jvp, vjp = J_or_pair
        if shape is None or len(shape) != 3:
            raise ValueError(
                f"{where}: a (jvp, vjp) pair needs `shape` = (B, m, n), got {shape!r}"
            )
        dtype = np.dtype(np.float64)
        name = name or "the (jvp, vjp) pair"
    else:
        raise TypeError(
            f"{where}: expected a jacobprop Jacobian or a (jvp, vjp) pair of callables, "
            f"got {type(J_or_pair).__name__}"
        )
    repeats = check_positive_int(repeats, where=where, name="repeats")
    rtol = _check_tolerance(where, "rtol", rtol)
    batch, m, n = (int(s) for s in shape)
    worst, worst_pair = 0.0, (0.0, 0.0)
    for _ in range(repeats):
        u = rng.standard_normal((batch, n))
        v = rng.standard_normal((batch, m))
        if dtype.kind == "f":
            u, v = u.astype(dtype), v.astype(dtype)
        ju, jtv = np.asarray(jvp(u)), np.asarray(vjp(v))
        if ju.shape != (batch, m) or jtv.shape != (batch, n):
            raise ShapeError(
                f"{where}: {name}: jvp must give {(batch, m)} and vjp {(batch, n)}, "
                f"got {ju.shape} and {jtv.shape}"
            )
        dtype = np.result_type(dtype, ju.dtype, jtv.dtype)
        terms_left = ju.astype(np.float64) * v
        terms_right = u * jtv.astype(np.float64)
        lhs, rhs = float(terms_left.sum()), float(terms_right.sum())
        scale = max(float(np.abs(terms_left).sum()), float(np.abs(terms_right).sum()))
        if scale > 0:
            discrepancy = abs(lhs - rhs) / scale
        else:
            discrepancy = 0.0 if lhs == rhs else math.inf
        if not discrepancy <= worst:
            worst, worst_pair = discrepancy, (lhs, rhs)
    if rtol is None:
        eps = float(np.finfo(dtype if dtype.kind == "f" else np.float64).eps)
        rtol = eps ** _ADJOINT_RTOL_POWER
    if raise_on_fail and not worst <= rtol:
        lhs, rhs = worst_pair
        raise GradcheckError(
            f"dottest: {name} fails the adjoint test <J u, v> == <u, J^T v>: "
            f"<J u, v> = {lhs:+.12e}, <u, J^T v> = {rhs:+.12e}, relative discrepancy "
            f"{worst:.3e} > rtol {rtol:.1e}"
        )
    return worst


# ---- check_layer -------------------------------------------------------------------------------
def _consistency_entry(name, type_name, check, got, expected, terms, rounding, dtype, shape):
    """Analytic vs analytic under `consistency_tolerance` (the one rule, `tolerance.py`)."""
    got = np.asarray(got, dtype=np.float64).reshape(-1)
    expected = np.asarray(expected, dtype=np.float64).reshape(-1)
    terms = np.asarray(terms, dtype=np.float64).reshape(-1)
    rounding = np.broadcast_to(np.asarray(rounding, dtype=np.float64), shape).reshape(-1)
    tol = consistency_tolerance(dtype, terms, rounding)
    passed = np.abs(got - expected) <= tol
    floor = float((terms + rounding).max(initial=0.0)) * _FLOOR
    return _entry(name, None, type_name, check, got, expected, tol, floor, passed,
                  np.zeros(got.size, dtype=bool), shape)


def _dot_entry(name, type_name, jvp, vjp, shape, rounding_of, dtype, rng) -> CheckEntry:
    """The adjoint test `<J u, w> == <u, J^T w>` under the same analytic rule."""
    batch, m, n = shape
    u = rng.standard_normal((batch, n)).astype(dtype)
    w = rng.standard_normal((batch, m)).astype(dtype)
    ju = np.asarray(jvp(u), dtype=np.float64)
    jtw = np.asarray(vjp(w), dtype=np.float64)
    if ju.shape != (batch, m) or jtw.shape != (batch, n):
        raise ShapeError(f"check_layer: {type_name} {name}: jvp must give {(batch, m)} and vjp "
                         f"{(batch, n)}, got {ju.shape} and {jtw.shape}")
    left, right = ju * w, u * jtw
    lhs, rhs = float(left.sum()), float(right.sum())
    terms = max(float(np.abs(left).sum()), float(np.abs(right).sum()))
    rounding = float((rounding_of(np.abs(u)) * np.abs(w)).sum())
    tol = float(consistency_tolerance(dtype, np.array(terms), np.array(rounding)))
    discrepancy = abs(lhs - rhs)
    relative = discrepancy / max(terms + rounding, np.finfo(float).tiny)
    return CheckEntry(name, None, type_name, "<J u, w> == <u, J^T w>", batch * m * n,
                      discrepancy, relative, None, lhs, rhs, discrepancy <= tol)


def _summed_coupling(dense: np.ndarray) -> np.ndarray:
    """`(B, m, k)` from a parameter Jacobian's dense form, `(B, m, B, k)` when coupled."""
    return dense.sum(axis=2) if dense.ndim == 4 else dense


def check_layer(layer: Layer, x, *, fast: bool = False, richardson: bool = False,
                rtol: float | None = None, atol: float | None = None,
                raise_on_fail: bool = False, rng: np.random.Generator | None = None
                ) -> GradcheckReport:
    """Check one layer's derivatives at `x`: Jacobians, vjp, jvp and the dot test.

    Parameters
    ----------
    layer : Layer
        Any layer, a `Sequential` included, a user's subclass too: the layer
        is called the way networks call it, so a public override is what is
        checked.
    x : array_like `(B, n)`
    fast : bool
        Compare the Jacobians along two random directions instead of per coordinate.
    richardson : bool
        Richardson-extrapolated differences (steps `h` and `h/2`).
    rtol, atol : float, optional
        Finite-difference tolerances; required (rtol) for a layer computing in float32.
    raise_on_fail : bool
        Raise `GradcheckError` (message: the report table) when a check fails.
    rng : numpy.random.Generator, optional
        Source of the random covectors and directions.

    Returns
    -------
    GradcheckReport
        Entries "dy/dx" and "dy/d<p>" (the layer's Jacobians against finite
        differences of its forward, `(B, m, n)` and `(B, m, p.size)`; for a
        layer that couples samples dy/dx is `(B, m, B, n)`), "vjp dx" and
        "vjp d<p>" (`vjp` against `g J` and `sum_i g_i J^p_i` for a random
        `g` `(B, m)`), "jvp" (`jvp` against `J v`), "J vjp" and "J jvp" (the
        Jacobian operator's own products against its dense form), "dot test"
        (the layer's own jvp against its vjp) and "dot test J" (the operator's);
        for every shortcut hook a layer provides (`Layer._affine_param_change`,
        `Layer._affine_input_columns`), "hook <p>" and "hook x" (`"hook 0.W"`,
        `"hook 2.x"` in a stack): the hook's slope against the forward pass's at
        a few random coordinates, worst index (coordinate..., sample, output).
        A failing hook is not used by the finite differences above.

    Raises
    ------
    ValueError
        For a stochastic layer (Dropout in train mode): every forward pass
        draws a new mask, so no difference quotient means anything.

    Notes
    -----
    One tolerance policy (`jacobprop.checks.tolerance`): finite-difference
    entries pass within `atol + rtol max(|terms|, |numeric|)`, analytic
    comparisons within `1e3 eps(dtype)` of their terms plus the rounding a
    structured product may leave. Kinks: an entry `(i, r, j)` of a Jacobian
    whose column j reaches a kink in sample i is accepted between its
    one-sided differences or inside the interval chain rule for `y_ir`
    (`jacobprop.checks`). A layer that couples samples is differenced one
    input entry at a time over the whole batch (no kink rule there).
    """
    where = "check_layer"
    _check_layer_argument(where, "layer", layer)
    refuse_stochastic(where, layer)
    rng = check_rng(rng, where=where)
    x_live = layer._check_input(x)
    y, cache = layer._call_forward(x_live)
    dtype = np.result_type(y.dtype, np.float32)
    rtol, atol = _resolve_rtol(where, dtype, rtol, atol, richardson)
    step = _step(richardson)
    batch, n = x_live.shape
    m = y.shape[1]
    coupled = bool(layer.couples_samples)
    leaves = _flatten(layer, "")
    ev = _Evaluator(leaves, np.asarray(x_live, dtype=np.float64))
    y0 = ev.acts[-1]
    type_name = type(layer).__name__
    # Before the differences below trust a shortcut hook, it is checked against the
    # forward pass; one that disagrees is reported and left unused (`hooks.py`).
    hook_entries, evaluations = _verify_hooks(ev, rtol, atol, rng)

    jac = layer._call_jacobian(cache)
    dense = np.asarray(jac.to_dense(), dtype=np.float64)
    dense_shape = (batch, m, batch, n) if coupled else (batch, m, n)
    if dense.shape != dense_shape:
        raise ShapeError(
            f"{where}: {type_name}.jacobian(cache).to_dense() must have shape "
            f"{'(B, m, B, n)' if coupled else '(B, m, n)'} = {dense_shape} "
            f"(couples_samples={coupled}), got {dense.shape}")
    param_jacs = layer._call_param_jacobians(cache)
    # A coupled chain's dy/dp is (B, m, B, k), one block per sample whose use of the
    # shared parameter moved y_i: dy_i/dp is the sum over that second batch axis.
    # |dy/dp| keeps the size of the cross-sample terms the sum may cancel (a bias before a
    # train-mode BatchNorm: exactly 0): the rounding of the products is relative to them.
    param_abs = {}
    param_dense = {}
    for key, op in param_jacs.items():
        full = np.asarray(op.to_dense(), dtype=np.float64)
        param_dense[key] = _summed_coupling(full)
        param_abs[key] = _summed_coupling(np.abs(full))
    locate = {leaf.keys[name]: (index, name)
              for index, leaf in enumerate(leaves) for name in leaf.keys}

    # -- finite differences of the forward pass ------------------------------------------
    # (name, analytic, differences, |terms| of the analytic products, shape, kink split)
    fd = []
    targets = [("dy/dx", None, None, dense)] + [
        (f"dy/d{key}", *locate[key], pd) for key, pd in param_dense.items()
    ]
    for label, index, name, jac_dense in targets:
        point = ev.point(index, name)
        if coupled and index is None:
            # Samples interact: one input entry at a time, the whole batch each time.
            fd.append((label, jac_dense, ev.coupled_input_jacobian(step, richardson),
                       np.abs(jac_dense), dense_shape, None))
            evaluations += len(_scales(richardson)) * batch * n
            continue
        if fast:
            shape = (_DIRECTIONS, batch, m)
            d = {s: np.empty(shape) for s in _scales(richardson)}
            reach = np.zeros(shape, dtype=bool)
            analytic, terms = np.empty(shape), np.empty(shape)
            points = []
            for j in range(_DIRECTIONS):
                direction = _random_direction(rng, point)
                moved = {}
                for s in d:
                    start, rows = ev.direction_point(index, name, s * step * direction)
                    out, crossed = ev.run(start, rows[None])
                    d[s][j] = out[0] - y0
                    moved[s] = rows
                    if abs(s) == 1.0:
                        reach[j] |= crossed[0][:, None]
                points.append((start, moved[1.0], moved[-1.0]))
                # dy/dx acts per sample on (B, n); a parameter direction is shared by all.
                spec = "bmn,bn->bm" if index is None else "bmk,k->bm"
                flat = direction if index is None else direction.reshape(-1)
                analytic[j] = np.einsum(spec, jac_dense, flat)
                terms[j] = np.einsum(spec, np.abs(jac_dense), np.abs(flat))
            evaluations += len(d) * _DIRECTIONS
            fd.append((label, analytic, _combine(d, step, richardson, reach), terms, shape,
                       _direction_split(ev, y0, points, step)))
            continue
        # Column j of dy/dx or dy/dp, (B, m), is the output's change under coordinate j.
        h = step * np.maximum(1.0, np.abs(point if index is None else point.reshape(-1)))
        shape = jac_dense.shape
        d = {s: np.empty(shape) for s in _scales(richardson)}
        reach = np.zeros(shape, dtype=bool)
        for s, coords, out, crossed in _sweep(ev, index, name, h, d):
            d[s][:, :, coords] = np.moveaxis(out - y0, 0, 2)
            if abs(s) == 1.0:
                reach[:, :, coords] |= crossed.T[:, None, :]
        evaluations += len(d) * shape[2]
        steps = h[:, None, :] if index is None else h[None, None, :]
        fd.append((label, jac_dense, _combine(d, steps, richardson, reach), np.abs(jac_dense),
                   shape, None if coupled else _jacobian_split(ev, y0, index, name, h, shape)))

    scale = max([float(np.abs(a).max(initial=0.0)) for _, a, *_ in fd]
                + [float(np.abs(df.numeric).max(initial=0.0)) for _, _, df, *_ in fd])
    floor = _FLOOR * scale
    # Rounding of one output entry, spread by a coupled layer over the whole batch.
    noise_out = _LAYER_NOISE * _EPS * (np.full_like(y0, np.abs(y0).max(initial=0.0))
                                       if coupled else np.abs(y0))
    entries = []
    for name, analytic, diff, terms, shape, split in fd:
        a = np.asarray(analytic, dtype=np.float64).reshape(-1)
        numeric = diff.numeric.reshape(-1)
        hs = np.broadcast_to(diff.steps, shape).reshape(-1)
        per_output = noise_out if fast else noise_out.reshape(
            noise_out.shape + (1,) * (len(shape) - 2))
        noise = np.broadcast_to(per_output, shape).reshape(-1) / hs
        base = (rtol * floor + noise) if atol is None else atol
        terms = np.broadcast_to(terms, shape).reshape(-1)
        tol = base + rtol * np.maximum(terms, np.abs(numeric))
        slack_unit = _KINK_SLACK * step
        passed, accepted, cost = _judge(a, diff, tol, slack_unit, floor, split=split)
        evaluations += cost
        entries.append(_entry(name, None, type_name, "directional" if fast
                              else "finite differences", a, numeric, tol, floor, passed,
                              accepted, shape))

    # -- the layer's vjp and jvp against its own Jacobians --------------------------------------
    x64, y64 = np.asarray(x_live, dtype=np.float64), np.asarray(y, dtype=np.float64)
    unit = rounding_unit(x64, y64, coupled)
    g = rng.standard_normal((batch, m)).astype(dtype)
    v = rng.standard_normal((batch, n)).astype(dtype)
    gx, grads = layer._call_vjp(cache, _own_dtype(g, y), True)
    _check_gradient_shapes(where, f"{type_name}.vjp", grads, layer.params)
    g64, v64 = g.astype(np.float64), v.astype(np.float64)
    vjp_spec = "bm,bmcn->cn" if coupled else "bm,bmn->bn"
    jvp_spec = "bmcn,cn->bm" if coupled else "bmn,bn->bm"
    entries.append(_consistency_entry(
        "vjp dx", type_name, "vjp vs Jacobian", gx, np.einsum(vjp_spec, g64, dense),
        np.einsum(vjp_spec, np.abs(g64), np.abs(dense)), unit(np.abs(g64), "vjp"), dtype,
        (batch, n)))
    for key, pd in param_dense.items():
        entries.append(_consistency_entry(
            f"vjp d{key}", type_name, "vjp vs Jacobian", grads[key],
            np.einsum("bm,bmk->k", g64, pd), np.einsum("bm,bmk->k", np.abs(g64), param_abs[key]),
            0.0, dtype, np.shape(grads[key])))
    entries.append(_consistency_entry(
        "jvp", type_name, "jvp vs Jacobian", layer._call_jvp(cache, _own_dtype(v, y)),
        np.einsum(jvp_spec, dense, v64), np.einsum(jvp_spec, np.abs(dense), np.abs(v64)),
        unit(np.abs(v64), "jvp"), dtype, (batch, m)))

    # The operator's own products (what `to_scipy` and the default vjp/jvp use).
    entries.append(_consistency_entry(
        "J vjp", type_name, "operator vjp vs its dense form", jac._call_vjp(_own_dtype(g, y)),
        np.einsum(vjp_spec, g64, dense), np.einsum(vjp_spec, np.abs(g64), np.abs(dense)),
        unit(np.abs(g64), "vjp"), dtype, (batch, n)))
    entries.append(_consistency_entry(
        "J jvp", type_name, "operator jvp vs its dense form", jac._call_jvp(_own_dtype(v, y)),
        np.einsum(jvp_spec, dense, v64), np.einsum(jvp_spec, np.abs(dense), np.abs(v64)),
        unit(np.abs(v64), "jvp"), dtype, (batch, m)))

    def rounding_of(u_abs):
        return unit(u_abs, "jvp")

    shape3 = (batch, m, n)
    entries.append(_dot_entry(
        "dot test", type_name, lambda u: layer._call_jvp(cache, _own_dtype(u, y)),
        lambda w: layer._call_vjp(cache, _own_dtype(w, y), True)[0], shape3, rounding_of,
        dtype, rng))
    entries.append(_dot_entry(
        "dot test J", type_name, lambda u: jac._call_jvp(_own_dtype(u, y)),
        lambda w: jac._call_vjp(_own_dtype(w, y)), shape3, rounding_of, dtype, rng))

    entries.extend(hook_entries)
    method = _method(fast, richardson)
    report = GradcheckReport(
        f"check_layer {type_name} at x of shape {x_live.shape} ({np.dtype(y.dtype).name})"
        + (", samples coupled" if coupled else ""),
        entries, evaluations, method, rtol, atol)
    if raise_on_fail and not report.ok:
        raise GradcheckError(str(report))
    return report


def _own_dtype(array: np.ndarray, y: np.ndarray) -> np.ndarray:
    """A probe vector in the dtype the layer computes in."""
    return array.astype(y.dtype) if y.dtype.kind == "f" else array
