"""Finite-difference checks of every derivative jacobprop computes.

    report = jp.gradcheck(net, x, t, loss)          # every parameter and x, per coordinate
    report = jp.gradcheck(net, x, t, loss, fast=True)   # a few random directions
    report = jp.check_layer(layer, x)               # one layer: Jacobians, vjp, jvp, dot test
    result = jp.taylor_test(net, x, t, loss)        # order of the Taylor remainder, 2 if right
    J = jp.numerical_jacobian(f, x)                 # (B, m, n) in 2n evaluations of f

How the checks stay honest
--------------------------
- Finite differences always run in float64, on a float64 *copy* of every
  layer: the live parameter arrays are only ever read, so a failing or raising
  check leaves them exactly as they were.
- Steps are scaled to the dtype and to each coordinate,
  `h_j = eps^(1/3) max(1, |p_j|)` for central differences (truncation `h^2`
  against rounding `eps/h`) and `eps^(1/5) max(1, |p_j|)` with Richardson
  extrapolation `(4 D(h/2) - D(h)) / 3`, which cancels the `h^2` term.
- Tolerances follow from the same numbers: `rtol = 1e5 eps^(2/3)` (3.7e-6)
  for central differences and `1e5 eps^(4/5)` (2.9e-8) with Richardson; an
  entry passes when `|a - n| <= atol + rtol max(|a|, |n|)`, where the default
  `atol = rtol 1e-3 max|grad| + 1e2 eps (|L| + w sum_i max|y_i|) / h`
  (`w = 1/B` for a mean) is a floor under which an entry is judged against
  the whole gradient's magnitude (never divided by ~0), plus the rounding of
  the loss itself. Nothing grows with the dimension.
- A network that computes in float32 is certified only against tolerances
  the caller chose for float32 (`rtol=`, optionally `atol=`); without them
  the checks raise TypeError rather than apply float64 tolerances.

The kink rule
-------------
A layer declares in `kinks` the input values where its derivative jumps (ReLU,
LeakyReLU: `(0.0,)`); a loss declares named kinks (RMSE: `"zero error"`, where
`L` is a norm at its minimum). Where the derivative jumps, any value between
the one-sided slopes is a correct derivative, and finite differences that
straddle the jump mean nothing. So an entry that fails the central-difference
test is *accepted at a kink* when, and only when,

1. a kink is within reach of its perturbation: while the perturbed points
   `p +- h e_j` are pushed through the network, some input of a kinked layer
   moved and ended on the other side of (or exactly on) a kink, compared with
   the unperturbed pass -- this is how a perturbation of a parameter reaches
   a kink several layers deeper; or the loss is within reach of its named
   kink (for "zero error": `|L(p)| <= |L(p +- h e_j) - L(p)|`, or `|L(p)|`
   within `100 eps |y|` of the network's dtype: a float32 network exactly at
   zero error is a hair off it in the float64 copy); and
2. the analytic value lies, up to the tolerance plus a first-order slack
   `100 h (|slopes| + floor)`, inside an interval of admissible derivatives:
   between the one-sided differences `(L(p+h) - L(p)) / h` and
   `(L(p) - L(p-h)) / h`; for "zero error", where `L = k |e|` is a norm, in
   `[-s, s]` with `s^2 = (L(p+h)^2 + L(p-h)^2 - 2 L(p)^2) / (2 h^2)`, the
   subdifferential of the norm; or inside the *interval chain rule* at the first
   kinked elementwise layer the perturbation reaches. There `dL/dt` splits
   into the part through the elements that stay on their side, plus, for
   every element c that reaches a kink, the product of three intervals: the
   rate `dz_c/dt` on either side of `t = 0`, the activation's one-sided
   slopes at `z_c`, and the one-sided derivatives of the rest of the network
   with respect to the element's output `a_c` (themselves split again where
   they reach a deeper kink). Every choice of slope between the one-sided
   ones at every kink element lands inside; that is what keeps many elements
   at a kink at once (a Dense pre-activation exactly 0 for a whole sample,
   moved by one input in both directions; zero pre-activations in several
   layers at once) from ever being flagged for a correct layer, although the
   network's own one-sided slopes need not bracket the convention there.

The report counts the entries accepted this way; they are left out of the
error columns. `check_layer` applies the same rule entry by entry of the
Jacobian: entry `(i, r, j)` is accepted between its one-sided differences, or
inside the interval chain rule with the output `y_ir` in the role of `L`, when
moving `x_ij` (or the parameter) reaches a kink in sample i. The Taylor
test leaves out the steps that reach a kink, and says it cannot judge when
the smallest steps all do.

The vectorized full check
-------------------------
For a `Sequential` (nested stacks are flattened), the prefix up to layer `l`
runs once; the outputs of layer `l` under every perturbation of one of its
parameters are stacked as extra batch rows -- for `Dense`, moving `W[j, k]`
by `h` moves output column `j` by `h x[:, k]`, with no call at all; any other
layer is evaluated once per coordinate on its own input -- and the rows go
through the rest of the network in batched forward passes, chunked to about
16 MiB per array. `loss.per_sample` then gives one row of per-sample losses
per perturbation, reduced per group (`loss.reduce`; as one array sum when the
loss keeps the base class's mean/sum reduction). The input `x` costs 2n
evaluations for all `B` samples, since samples never interact.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np

from .errors import GradcheckError, ShapeError, check_batch_matrix
from .jacobian import Jacobian
from .layers.base import Layer
from .layers.dense import Dense
from .losses import Loss
from .network import Sequential

__all__ = [
    "numerical_jacobian",
    "dottest",
    "check_layer",
    "gradcheck",
    "taylor_test",
    "CheckEntry",
    "GradcheckReport",
    "TaylorReport",
    "CENTRAL_STEP",
    "RICHARDSON_STEP",
    "default_rtol",
]

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


# ---- reports ------------------------------------------------------------------------------
@dataclass
class CheckEntry:
    """One row of a report: one derivative compared with its reference.

    Attributes
    ----------
    name : str
        The parameter key (`"0.W"`), `"x"`, or the check (`"dy/dx"`, `"vjp dW"`...).
    layer_index : str or None
        The layer the entry belongs to (`"2"`, `"1.0"` in nested stacks); None
        for the network input.
    layer_type : str
        Its class name (`"input"` for `x`).
    check : str
        What was compared with what ("finite differences", "directional",
        "vjp vs Jacobian", "dot test", ...).
    size : int
        Number of values compared.
    max_abs_error, max_rel_error : float
        Over the entries not accepted at a kink; the relative error is
        `|a - n| / (max(|a|, |n|) + floor)`.
    worst_index : tuple or None
        Index of the entry with the largest error relative to its tolerance.
    analytic, numeric : float
        The two values at `worst_index`.
    passed : bool
    kink_accepted : int
        Entries that failed the central difference but were accepted by the kink rule.
    """

    name: str
    layer_index: str | None
    layer_type: str
    check: str
    size: int
    max_abs_error: float
    max_rel_error: float
    worst_index: tuple | None
    analytic: float
    numeric: float
    passed: bool
    kink_accepted: int = 0

    @property
    def layer(self) -> str:
        """`"<index> <Type>"`, or the type alone when there is no index."""
        if not self.layer_index:
            return self.layer_type
        return f"{self.layer_index} {self.layer_type}"


@dataclass
class GradcheckReport:
    """The result of `gradcheck` or `check_layer`: one `CheckEntry` per derivative.

    Attributes
    ----------
    title : str
        What was checked.
    entries : list of CheckEntry
    evaluations : int
        Function evaluations spent (one forward pass of the batch, or of one
        layer for `check_layer`, per perturbed point).
    method : str
        "central differences", "Richardson", "directional", ...
    rtol, atol : float, float or None
        The tolerances applied (atol None: the default per-entry floor).
    culprit : str or None
        For a failed network check: the first layer whose own Jacobians
        disagree with finite differences at its cached input.
    notes : list of str
    """

    title: str
    entries: list[CheckEntry]
    evaluations: int
    method: str
    rtol: float
    atol: float | None
    culprit: str | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """True when every entry passed."""
        return all(entry.passed for entry in self.entries)

    @property
    def failures(self) -> list[CheckEntry]:
        return [entry for entry in self.entries if not entry.passed]

    @property
    def kink_accepted(self) -> int:
        """Entries accepted by the kink rule, over the whole report."""
        return sum(entry.kink_accepted for entry in self.entries)

    def __getitem__(self, name: str) -> CheckEntry:
        for entry in self.entries:
            if entry.name == name:
                return entry
        names = ", ".join(repr(entry.name) for entry in self.entries)
        raise KeyError(f"GradcheckReport: no entry {name!r}; the entries are {names}")

    def __str__(self) -> str:
        verdict = "ok" if self.ok else "FAILED"
        atol = "default floor" if self.atol is None else f"{self.atol:.1e}"
        lines = [
            f"{self.title}: {verdict}",
            f"  {self.method}, rtol={self.rtol:.1e}, atol={atol}, "
            f"{self.evaluations:,} evaluations, {self.kink_accepted} accepted at kinks",
        ]
        header = ("entry", "layer", "check", "size", "max abs err", "max rel err",
                  "worst index", "analytic", "numeric", "kinks", "status")
        rows = [header]
        for e in self.entries:
            index = "-" if e.worst_index is None else str(tuple(int(i) for i in e.worst_index))
            rows.append((
                e.name, e.layer, e.check, str(e.size), _number(e.max_abs_error, ".2e"),
                _number(e.max_rel_error, ".2e"), index, _number(e.analytic, "+.8e"),
                _number(e.numeric, "+.8e"), str(e.kink_accepted), "ok" if e.passed else "FAIL",
            ))
        widths = [max(len(row[col]) for row in rows) for col in range(len(header))]
        for number, row in enumerate(rows):
            cells = (cell.ljust(width) for cell, width in zip(row, widths, strict=True))
            lines.append(("  " + "  ".join(cells)).rstrip())
            if number == 0:
                lines.append("  " + "  ".join("-" * w for w in widths))
        if self.culprit:
            lines.append(f"  {self.culprit}")
        lines.extend(f"  note: {note}" for note in self.notes)
        return "\n".join(lines)


def _number(value: float, spec: str) -> str:
    return "-" if math.isnan(value) else format(value, spec)


@dataclass
class TaylorReport:
    """The result of `taylor_test`.

    Attributes
    ----------
    steps, remainders : ndarray
        `h` and `|L(p + h d) - L(p) - h <grad, d>|` for every step tried.
    used : ndarray of bool
        The steps the order was fitted on (asymptotic range, above rounding,
        no kink within reach).
    order : float
        The fitted slope of log-remainder against log-h: about 2 when the
        gradient is right, 1 when it is wrong (inf when the remainder is at
        rounding level for every step, i.e. the loss is linear along `d`).
    ok : bool
        `order > 1.5`; also True when no step is usable because a kink lies
        within reach of all of them (`conclusive` is then False).
    conclusive : bool
    evaluations : int
    gradient_error : float
        `median(r / h) / sum |g d|` over the fitted steps: the relative size of
        a first-order remainder. An order below 1.5 still passes when this is
        within `100 eps`, the rounding of a float64 gradient.
    direction : str
        The direction shown: "given", "all" (every entry at once) or the entry
        key the direction was restricted to.
    orders : dict
        The order observed along every direction tried.
    culprit : str or None
        For a failure, the first layer whose own Jacobians disagree.
    """

    steps: np.ndarray
    remainders: np.ndarray
    used: np.ndarray
    order: float
    ok: bool
    conclusive: bool
    evaluations: int
    gradient_error: float = 0.0
    direction: str = "given"
    orders: dict = field(default_factory=dict)
    culprit: str | None = None

    def __str__(self) -> str:
        verdict = "ok" if self.ok else "FAILED"
        if not self.conclusive:
            summary = "inconclusive: a kink lies within reach of every usable step"
        elif math.isinf(self.order):
            summary = "remainder at rounding level for every step (linear along d)"
        else:
            summary = (f"observed order {self.order:.2f} (2 when the gradient is right, "
                       f"1 if not), first-order remainder {self.gradient_error:.1e} of sum |g d|")
        orders = ", ".join(f"{key} {order:.2f}" for key, order in self.orders.items())
        lines = [f"taylor_test: {verdict}: along {self.direction}: {summary}; "
                 f"{self.evaluations} evaluations",
                 f"  orders by direction: {orders}",
                 "  h            remainder    used"]
        for h, r, u in zip(self.steps, self.remainders, self.used, strict=True):
            lines.append(f"  {h:.3e}    {r:.3e}    {'*' if u else ''}".rstrip())
        if self.culprit:
            lines.append(f"  {self.culprit}")
        return "\n".join(lines)


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


def _crossed(z: np.ndarray, z0: np.ndarray, kinks: tuple) -> np.ndarray:
    """Mask of the elements of `z` (G, B, w) that moved from `z0` (B, w) onto or across a kink."""
    hit = np.zeros(z.shape, dtype=bool)
    for kink in kinks:
        # sign(z - k) sign(z0 - k) <= 0, without taking the sign of the large array.
        hit |= (z - kink) * np.sign(z0 - kink) <= 0
    return hit & (z != z0)


class _Evaluator:
    """The float64 copies of a stack's layers at one input, and batched perturbed passes."""

    def __init__(self, leaves: list[_Leaf], x: np.ndarray):
        self.leaves = leaves
        self.batch = x.shape[0]
        acts = [x]
        for leaf in leaves:
            acts.append(leaf.work.forward(acts[-1])[0])
        self.acts = acts  # acts[l] is the input of leaf l, acts[-1] the output
        self.kinks = [tuple(float(k) for k in type(leaf.work).kinks) for leaf in leaves]
        width = max(a.shape[1] for a in acts)
        self.chunk = max(1, _CHUNK // (self.batch * width))

    def run(self, start: int, rows: np.ndarray):
        """Push `rows` (G, B, w), inputs of leaf `start`, to the output.

        Returns the outputs (G, B, m) and the reach mask (G, B): the sample's
        pass moved some kinked layer's input onto or across one of its kinks.
        """
        groups = rows.shape[0]
        reach = np.zeros(rows.shape[:2], dtype=bool)
        flat = rows.reshape(groups * self.batch, -1)
        for index in range(start, len(self.leaves)):
            if self.kinks[index]:
                z = flat.reshape(groups, self.batch, -1)
                reach |= _crossed(z, self.acts[index], self.kinks[index]).any(axis=2)
            flat = self.leaves[index].work.forward(flat)[0]
        return flat.reshape(groups, self.batch, -1), reach

    def first_crossing(self, start: int, plus: np.ndarray, minus: np.ndarray):
        """`(l, z+, z-, crossed)` at the first kinked leaf that either pass reaches, or None."""
        for index in range(start, len(self.leaves)):
            kinks = self.kinks[index]
            if kinks:
                base = self.acts[index]
                crossed = _crossed(np.stack([plus, minus]), base, kinks).any(axis=0)
                if crossed.any():
                    return index, plus, minus, crossed
            work = self.leaves[index].work
            plus, minus = work.forward(plus)[0], work.forward(minus)[0]
        return None

    def _dense_shortcut(self, index: int) -> bool:
        work = self.leaves[index].work
        return isinstance(work, Dense) and type(work)._forward is Dense._forward

    def _column_wise(self, index: int) -> bool:
        """Leaf `index` maps any single column elementwise (no parameters, any width)."""
        work = self.leaves[index].work
        return work.elementwise and not work.params and work.input_dim is None

    def param_pass(self, index: int, name: str, coords: np.ndarray, steps: np.ndarray):
        """`run` from the outputs of leaf `index` under `param_outputs(...)` perturbations.

        Moving one Dense weight or bias changes one output column; when the next
        layer is elementwise, only that column is pushed through it (one value per
        sample instead of the whole width), and a Dense after that gets a rank-one
        update instead of a matmul, before the rows go on.
        """
        after = index + 1
        if not (self._dense_shortcut(index) and after < len(self.leaves)
                and self._column_wise(after)):
            return self.run(after, self.param_outputs(index, name, coords, steps))
        groups = len(coords)
        rows, delta = self._dense_change(index, name, coords, steps)
        base = self.acts[after][:, rows].T  # (G, B): the unperturbed column of each group
        moved = base + delta
        reach = _crossed(moved, base, self.kinks[after])
        activated = self.leaves[after].work.forward(moved.reshape(-1, 1))[0]
        activated = activated.reshape(groups, self.batch)
        following = after + 1
        if (following < len(self.leaves) and self._dense_shortcut(following)
                and not self.kinks[following]):
            # And a Dense after it sees a rank-one change: column j of its input moved
            # by c, so its output moves by c W[:, j] -- no matmul.
            change = activated - self.acts[following][:, rows].T
            weight = self.leaves[following].work.params["W"]
            out = np.repeat(self.acts[following + 1][None], groups, axis=0)
            out += change[:, :, None] * weight[:, rows].T[:, None, :]
            y_out, deeper = self.run(following + 1, out)
            return y_out, reach | deeper
        out = np.repeat(self.acts[following][None], groups, axis=0)
        out[np.arange(groups), :, rows] = activated
        y_out, deeper = self.run(following, out)
        return y_out, reach | deeper

    def _dense_change(self, index: int, name: str, coords: np.ndarray, steps: np.ndarray):
        """`(rows, delta)`: output column `rows[g]` of Dense leaf `index` moves by `delta[g]`.

        Dense's own forward is affine in each weight: `W[j, k] + h` moves column j
        by `h x[:, k]` (delta `(G, B)`), `b[j] + h` moves it by h (delta `(G, 1)`).
        """
        if name == "W":
            x = self.acts[index]
            rows, cols = np.divmod(coords, x.shape[1])
            return rows, steps[:, None] * x[:, cols].T
        return coords, steps[:, None]

    def param_outputs(self, index: int, name: str, coords: np.ndarray, steps: np.ndarray):
        """Outputs (G, B, m) of leaf `index` with `params[name].flat[coords[g]] += steps[g]`."""
        work = self.leaves[index].work
        x, y = self.acts[index], self.acts[index + 1]
        groups = len(coords)
        if self._dense_shortcut(index):
            out = np.repeat(y[None], groups, axis=0)
            rows, delta = self._dense_change(index, name, coords, steps)
            out[np.arange(groups), :, rows] += delta
            return out
        out = np.empty((groups, *y.shape))
        flat = work.params[name].reshape(-1)  # a view: the copy is C-contiguous
        for group, (coord, step) in enumerate(zip(coords, steps, strict=True)):
            old = flat[coord]
            flat[coord] = old + step
            try:
                out[group] = work.forward(x)[0]
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
            return index + 1, work.forward(self.acts[index])[0]
        finally:
            work.params[name] = old


class _LossDiffs:
    """`L(perturbed) - L(base)` from per-sample losses, for many perturbations at once."""

    def __init__(self, loss: Loss, t, y0: np.ndarray, kink_floor: float):
        self.loss = loss
        self.t = _as_float64(t)
        self.ps0 = np.asarray(loss.per_sample(y0, self.t), dtype=np.float64)
        self.value = float(loss.reduce(self.ps0))
        # The base class reduces by a sum (or mean) over samples: one array sum for all
        # groups then, and L - L0 is summed from per-sample differences (less rounding).
        self.linear = loss.separable
        self.weight = 1.0 / y0.shape[0] if loss.reduction == "mean" else 1.0
        # What one evaluation of L is rounded against: L itself and the outputs it
        # is computed from (a cross-entropy of large logits cancels them).
        self.scale = abs(self.value) + self.weight * float(np.abs(y0).max(axis=1).sum())
        self._tiled: dict[int, np.ndarray] = {}
        # A network computing in float32 that hits a loss kink exactly (RMSE at zero
        # error) is off it by float32 rounding in the float64 copy: still at the kink.
        self.kink_floor = kink_floor

    def per_sample(self, y: np.ndarray) -> np.ndarray:
        groups, batch, m = y.shape
        if groups not in self._tiled:
            reps = groups if self.t.ndim == 1 else (groups, 1)
            self._tiled[groups] = np.tile(self.t, reps)
        return self.loss.per_sample(y.reshape(groups * batch, m), self._tiled[groups]).reshape(
            groups, batch
        )

    def diffs(self, ps: np.ndarray) -> np.ndarray:
        """`L - L0` per group, `ps` (G, B) -> (G,)."""
        if self.linear:
            return self.weight * (ps - self.ps0).sum(axis=1)
        return np.array([self.loss.reduce(row) for row in ps], dtype=np.float64) - self.value

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

    def norm_slope(self, dplus, dminus, h) -> np.ndarray:
        """For a "zero error" kink, the largest slope of `L` along each step.

        There `L = k |e|` is a scaled norm of the error, whose slopes at `e = 0`
        fill `[-k |v|, k |v|]` along `e = t v`; and `k^2 |v|^2` is the second
        difference of `L^2`, `(L(h)^2 + L(-h)^2 - 2 L(0)^2) / (2 h^2)`, even when
        rounding has left the float64 copy a hair off the kink.
        """
        if "zero error" not in type(self.loss).kinks:
            return np.zeros(np.shape(dplus))
        plus, minus = self.value + dplus, self.value + dminus
        curvature = (plus ** 2 + minus ** 2 - 2 * self.value ** 2) / 2
        return np.sqrt(np.maximum(curvature, 0.0)) / h

    def kink_reach(self, dplus, dminus, fwd, bwd, tol) -> np.ndarray:
        """Entries whose perturbation reaches one of the loss's named kinks."""
        reach = np.zeros(np.shape(dplus), dtype=bool)
        for kink in type(self.loss).kinks:
            if kink == "zero error":
                reach |= abs(self.value) <= np.maximum(
                    np.maximum(np.abs(dplus), np.abs(dminus)), self.kink_floor)
            else:  # a kink we cannot locate: within reach wherever the slopes jump
                reach |= np.abs(fwd - bwd) > tol
        return reach


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


def _combine(d: dict, h: np.ndarray, richardson: bool, reach) -> _Differences:
    central = (d[1.0] - d[-1.0]) / (2 * h)
    if richardson:
        half = (d[0.5] - d[-0.5]) / h
        central = (4 * half - central) / 3
    return _Differences(central, d[1.0] / h, -d[-1.0] / h, d[1.0], d[-1.0], reach, h)


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
    # Row g of y holds the B per-sample losses of B separate perturbations.
    for s, cols, y, crossed in _sweep(ev, None, None, h, d):
        d[s][:, cols] = losses.sample_diffs(losses.per_sample(y)).T
        if abs(s) == 1.0:
            reach[:, cols] |= crossed.T
    return _combine(d, h, richardson, reach), len(d) * x.shape[1]


def _kink_interval(ev, losses, start, plus, minus, h, budget):
    """`(lo, hi, magnitude)` bounding every derivative a kink convention can give, or None.

    `plus`, `minus` (B, w) are the inputs of leaf `start` at `t = +h` and `-h`
    along the perturbation. At the first kinked elementwise leaf they reach,
    `dL/dt` is split by the chain rule into the part through the elements
    that stay on their side (their one-sided slopes, or a deeper split) and,
    for every element c that reaches a kink, the product of three intervals:
    the rate `dz_c/dt` on either side of `t = 0`, the activation's one-sided
    slopes at `z_c`, and the one-sided derivatives `dL/da_c` of the rest of
    the network with respect to the element's output (split again when they
    reach a kink deeper down). Any choice of slope inside `[left, right]` at
    every kink element gives a value inside the sum of these intervals.
    `budget` (a one-element list) caps the evaluations spent.
    """
    found = ev.first_crossing(start, plus, minus)
    if found is None:
        return None
    index, zp, zm, crossed = found
    work = ev.leaves[index].work
    elements = np.argwhere(crossed)
    count = len(elements)
    if not work.elementwise or 2 + 4 * count > budget[0]:
        return None
    budget[0] -= 2 + 4 * count
    z0, a0 = ev.acts[index], ev.acts[index + 1]
    batch = z0.shape[0]
    sample, feature = elements.T
    pick = np.arange(count)

    # The elements that stay on their side of every kink move together.
    smooth = np.stack([z0 + np.where(crossed, 0.0, zp - z0), z0 + np.where(crossed, 0.0, zm - z0)])
    y, deeper = ev.run(index, smooth)
    d = losses.diffs(losses.per_sample(y))
    lo, hi = min(d[0] / h, -d[1] / h), max(d[0] / h, -d[1] / h)
    magnitude = abs(d[0] / h) + abs(d[1] / h)
    if deeper.any():
        inner = _kink_interval(ev, losses, index, smooth[0], smooth[1], h, budget)
        if inner is not None:
            lo, hi, magnitude = inner

    # dz_c/dt on both sides of t = 0.
    rates = np.stack([(zp - z0)[sample, feature] / h, -(zm - z0)[sample, feature] / h])
    # The activation's one-sided slopes at z_c, over the perturbation's reach.
    reach = np.maximum(np.abs(zp - z0), np.abs(zm - z0))[sample, feature]
    rows = np.repeat(z0[None], 2 * count, axis=0)
    rows[pick, sample, feature] += reach
    rows[count + pick, sample, feature] -= reach
    out = work.forward(rows.reshape(2 * count * batch, -1))[0].reshape(2 * count, batch, -1)
    base = a0[sample, feature]
    slopes = np.stack([(out[pick, sample, feature] - base) / reach,
                       (base - out[count + pick, sample, feature]) / reach])
    # dL/da_c, one-sided, through the rest of the network.
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
    # The product of three intervals is extreme at one of its eight vertices.
    vertices = np.stack([r * s * g for r in rates for s in slopes for g in (down_lo, down_hi)])
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


def _jacobian_split(ev, y0, index, name, h, shape):
    """`split(coord, budget)` for entry `(i, r, j)` of a Jacobian `shape` (B, m, k), of the
    input (`index` None, steps `h` (B, n)) or of a parameter (steps `h` (k,))."""

    def split(coord, budget):
        sample, row, col = (int(i) for i in np.unravel_index(coord, shape))
        if index is None:
            coord, step = sample * shape[2] + col, h[sample, col]
        else:
            coord, step = col, h[col]
        start, plus, minus = _coordinate_points(ev, index, name, coord, step)
        return _kink_interval(ev, _Output(y0, sample, row), start, plus, minus, step, budget)

    return split


def _direction_split(ev, y0, points, step):
    """`split(coord, budget)` for entry `(j, i, r)` of directional derivatives along the
    directions whose `(start, plus, minus)` are `points[j]`."""

    def split(coord, budget):
        j, sample, row = (int(i) for i in np.unravel_index(coord, (len(points), *y0.shape)))
        start, plus, minus = points[j]
        return _kink_interval(ev, _Output(y0, sample, row), start, plus, minus, step, budget)

    return split


def _judge(a, diff: _Differences, tol, slack_unit, floor, losses=None, split=None):
    """`(passed, accepted_at_kink, evaluations)` per entry (flat arrays)."""
    numeric = diff.numeric.reshape(-1)
    fwd, bwd = diff.forward.reshape(-1), diff.backward.reshape(-1)
    reach = diff.reach.reshape(-1).copy()
    passed = np.abs(a - numeric) <= tol
    slack = tol + slack_unit * (np.abs(fwd) + np.abs(bwd) + floor)
    inside = (a >= np.minimum(fwd, bwd) - slack) & (a <= np.maximum(fwd, bwd) + slack)
    if losses is not None:
        dplus, dminus = diff.dplus.reshape(-1), diff.dminus.reshape(-1)
        loss_reach = losses.kink_reach(dplus, dminus, fwd, bwd, tol)
        reach |= loss_reach
        steps = np.broadcast_to(diff.steps, diff.numeric.shape).reshape(-1)
        inside |= loss_reach & (np.abs(a) <= losses.norm_slope(dplus, dminus, steps) + slack)
    accepted = ~passed & reach & inside
    evaluations = 0
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


def _entry(name, layer_index, layer_type, check, a, numeric, tol, floor, passed, accepted,
           shape) -> CheckEntry:
    a, numeric = np.asarray(a, dtype=np.float64).reshape(-1), numeric.reshape(-1)
    error = np.abs(a - numeric)
    judged = ~accepted
    if not judged.any():
        return CheckEntry(name, layer_index, layer_type, check, a.size, 0.0, 0.0, None,
                          float("nan"), float("nan"), bool(passed.all()), int(accepted.sum()))
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = np.where(error > 0, error / tol, 0.0)
    ratio = np.where(judged, np.nan_to_num(ratio, nan=np.inf), -1.0)
    worst = int(np.argmax(ratio))
    relative = error / (np.maximum(np.abs(a), np.abs(numeric)) + max(floor, np.finfo(float).tiny))
    return CheckEntry(
        name, layer_index, layer_type, check, int(a.size),
        float(error[judged].max()), float(relative[judged].max()),
        tuple(int(i) for i in np.unravel_index(worst, shape)),
        float(a[worst]), float(numeric[worst]), bool(passed.all()), int(accepted.sum()),
    )


# ---- numerical_jacobian -----------------------------------------------------------------------
def numerical_jacobian(f: Callable, x, *, eps: float | None = None, richardson: bool = False,
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
    eps : float, optional
        Relative step: `h_j = eps * max(1, |x_j|)`. Defaults to `eps64^(1/3)`
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
    step = _check_tolerance(where, "eps", eps)
    if step == 0.0:
        raise ValueError(f"{where}: `eps` must be > 0, got {eps!r}")
    if step is None:
        step = _step(richardson)
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
    rng = _check_rng(where, rng)
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
    if isinstance(repeats, bool) or not isinstance(repeats, (int, np.integer)) or repeats < 1:
        raise ValueError(f"{where}: `repeats` must be a positive integer, got {repeats!r}")
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
def _consistency_entry(name, label, type_name, check, got, expected, scale, dtype, shape):
    """Analytic vs analytic: error against `1e3 eps(dtype) * sum of |terms|`."""
    rtol = _CONSISTENCY * float(np.finfo(dtype).eps)
    got = np.asarray(got, dtype=np.float64).reshape(-1)
    expected = np.asarray(expected, dtype=np.float64).reshape(-1)
    scale = np.asarray(scale, dtype=np.float64).reshape(-1)
    floor = _FLOOR * float(scale.max(initial=0.0))
    tol = rtol * (scale + floor)
    passed = np.abs(got - expected) <= tol
    return _entry(name, label, type_name, check, got, expected, tol, floor, passed,
                  np.zeros(got.size, dtype=bool), shape)


def check_layer(layer: Layer, x, *, fast: bool = False, richardson: bool = False,
                rtol: float | None = None, atol: float | None = None,
                raise_on_fail: bool = False, rng: np.random.Generator | None = None
                ) -> GradcheckReport:
    """Check one layer's derivatives at `x`: Jacobians, vjp, jvp and the dot test.

    Parameters
    ----------
    layer : Layer
        Any layer, a `Sequential` included.
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
        differences of its forward, `(B, m, n)` and `(B, m, p.size)`),
        "vjp dx" and "vjp d<p>" (`layer.vjp` against `g_i J_i` and
        `sum_i g_i J^p_i` for a random `g` `(B, m)`), "jvp" (`layer.jvp`
        against `J_i v_i`), "dot test" (the layer's own jvp against its vjp)
        and "dot test J" (the Jacobian operator's jvp against its vjp).

    Notes
    -----
    The analytic-vs-analytic comparisons use `1e3 eps(dtype)` times the sum
    of the absolute terms of each product, whatever `rtol` is. Kinks: an entry
    `(i, r, j)` of a Jacobian whose column j reaches a kink in sample i is
    accepted between its one-sided differences or inside the interval chain
    rule for `y_ir` (module docstring).
    """
    where = "check_layer"
    _check_layer_argument(where, "layer", layer)
    rng = _check_rng(where, rng)
    y, cache = layer.forward(x)
    dtype = np.result_type(y.dtype, np.float32)
    rtol, atol = _resolve_rtol(where, dtype, rtol, atol, richardson)
    step = _step(richardson)
    x_live = cache.x
    batch, n = x_live.shape
    m = y.shape[1]
    leaves = _flatten(layer, "")
    ev = _Evaluator(leaves, np.asarray(x_live, dtype=np.float64))
    y0 = ev.acts[-1]
    type_name = type(layer).__name__

    jac = layer.jacobian(cache)
    dense = np.asarray(jac.to_dense(), dtype=np.float64)
    param_jacs = layer.param_jacobians(cache)
    param_dense = {key: np.asarray(op.to_dense(), dtype=np.float64)
                   for key, op in param_jacs.items()}
    locate = {leaf.keys[name]: (index, name)
              for index, leaf in enumerate(leaves) for name in leaf.keys}
    evaluations = 0

    # -- finite differences of the forward pass ------------------------------------------
    # (name, analytic, differences, |terms| of the analytic products, shape, kink split)
    fd = []
    targets = [("dy/dx", None, None, dense)] + [
        (f"dy/d{key}", *locate[key], pd) for key, pd in param_dense.items()
    ]
    for label, index, name, jac_dense in targets:
        point = ev.point(index, name)
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
                   shape, _jacobian_split(ev, y0, index, name, h, shape)))

    scale = max([float(np.abs(a).max(initial=0.0)) for _, a, *_ in fd]
                + [float(np.abs(df.numeric).max(initial=0.0)) for _, _, df, *_ in fd])
    floor = _FLOOR * scale
    noise_base = _LAYER_NOISE * _EPS * np.abs(y0)
    entries = []
    for name, analytic, diff, terms, shape, split in fd:
        a = np.asarray(analytic, dtype=np.float64).reshape(-1)
        numeric = diff.numeric.reshape(-1)
        hs = np.broadcast_to(diff.steps, shape).reshape(-1)
        per_output = noise_base if fast else noise_base[:, :, None]
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
    g = rng.standard_normal((batch, m)).astype(dtype)
    v = rng.standard_normal((batch, n)).astype(dtype)
    gx, grads = layer.vjp(cache, g)
    g64, v64 = g.astype(np.float64), v.astype(np.float64)
    entries.append(_consistency_entry(
        "vjp dx", None, type_name, "vjp vs Jacobian", gx,
        np.einsum("bm,bmn->bn", g64, dense),
        np.einsum("bm,bmn->bn", np.abs(g64), np.abs(dense)), dtype, (batch, n)))
    _check_gradient_shapes(where, f"{type_name}.vjp", grads, layer.params)
    for key, pd in param_dense.items():
        got = grads[key]
        expected = np.einsum("bm,bmk->k", g64, pd)
        entries.append(_consistency_entry(
            f"vjp d{key}", None, type_name, "vjp vs Jacobian", got, expected,
            np.einsum("bm,bmk->k", np.abs(g64), np.abs(pd)), dtype, np.shape(got)))
    entries.append(_consistency_entry(
        "jvp", None, type_name, "jvp vs Jacobian", layer.jvp(cache, v),
        np.einsum("bmn,bn->bm", dense, v64),
        np.einsum("bmn,bn->bm", np.abs(dense), np.abs(v64)), dtype, (batch, m)))
    for name, pair in (("dot test", (lambda u: layer.jvp(cache, u),
                                     lambda w: layer.vjp(cache, w)[0])),
                       ("dot test J", jac)):
        discrepancy = dottest(pair, shape=(batch, m, n), rng=rng)
        limit = _CONSISTENCY * float(np.finfo(dtype).eps)
        entries.append(CheckEntry(
            name, None, type_name, "<J u, v> == <u, J^T v>", batch * m * n, float("nan"),
            discrepancy, None, float("nan"), float("nan"), discrepancy <= limit))

    method = _method(fast, richardson)
    report = GradcheckReport(
        f"check_layer {type_name} at x of shape {x_live.shape} ({np.dtype(y.dtype).name})",
        entries, evaluations, method, rtol, atol)
    if raise_on_fail and not report.ok:
        raise GradcheckError(str(report))
    return report


def _kink_floor(y) -> float:
    """How far rounding in `y`'s dtype can move the float64 copy off a loss kink."""
    eps = float(np.finfo(np.result_type(y.dtype, np.float32)).eps)
    return 1e2 * eps * float(np.abs(y).max(initial=0.0))


# ---- gradcheck ----------------------------------------------------------------------
def _as_sequential(where: str, net) -> Sequential:
    _check_layer_argument(where, "net", net)
    return net if isinstance(net, Sequential) else Sequential(net)


def _analytic(where, seq: Sequential, x, t, loss: Loss, mode: str):
    """The gradients under test, in the network's own dtype, keyed like the report."""
    y, cache = seq.forward(x)
    value, g = loss.value_and_grad(y, t)
    if mode == "vjp":
        gx, grads = seq.vjp(cache, g)
    else:
        _, grads = seq.value_and_grad(x, t, loss, mode="jacobian")
        gx = (loss.jacobian(y, t) @ seq.jacobian(cache)).to_dense()[:, 0, :]
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
        inputs = leaf.live.forward(inputs)[0]
    y = np.asarray(inputs, dtype=np.float64)
    t64 = _as_float64(t)
    numeric = numerical_jacobian(lambda out: np.array([loss.value(out, t64)]), y,
                                 per_sample=False).reshape(y.shape)
    analytic = np.asarray(loss.grad(inputs, t), dtype=np.float64)
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
    _check_loss(where, loss)
    _check_mode(where, mode)
    rng = _check_rng(where, rng)
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
        One entry per parameter key and one for `"x"`. For a failure,
        `culprit` names the first layer whose own Jacobians (input or
        parameter) or vjp/jvp disagree at its cached input (`check_layer`).

    Notes
    -----
    Shapes: `x` `(B, n)`, `net(x)` `(B, m)`; every entry compares the analytic
    gradient (the parameter's shape, `(B, n)` for x) with finite differences
    of `L` through a float64 copy of the network; per coordinate
    `D_j = (L(p + h_j e_j) - L(p - h_j e_j)) / (2 h_j)`. Evaluations: `2P + 2n + 1`
    for P parameters (`4P + 4n + 1` with Richardson), plus the per-element
    kink splits if any.
    """
    where = "gradcheck"
    rng, analytic, x, y, leaves, ev, losses, spec = _prepare(
        where, net, x, t, loss, mode, rng
    )
    user_rtol = rtol
    rtol, atol = _resolve_rtol(where, np.result_type(y.dtype, np.float32), rtol, atol,
                               richardson)
    step = _step(richardson)
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

    passed, accepted, cost = _judge(flat_a, diff, tol, slack_unit, floor, losses, split)
    return _entry(key, label, type_name, "finite differences", flat_a, numeric, tol, floor,
                  passed, accepted, a.shape), cost


def _fast_entry(ev, losses, key, index, name, a, step, richardson, rtol, atol, floor, rng,
                label, type_name):
    base_point = ev.point(index, name)
    analytic, tol = [], []
    d = {s: np.empty(_DIRECTIONS) for s in _scales(richardson)}
    reach = np.zeros(_DIRECTIONS, dtype=bool)
    splits = []
    for j in range(_DIRECTIONS):
        direction = _random_direction(rng, base_point)
        rows = {}
        for s in d:
            start, point = ev.direction_point(index, name, s * step * direction)
            y, crossed = ev.run(start, point[None])
            d[s][j] = losses.diffs(losses.per_sample(y))[0]
            rows[s] = (start, point)
            if abs(s) == 1.0:
                reach[j] |= crossed.any()
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

    passed, accepted, cost = _judge(analytic, diff, tol, slack_unit, floor, losses, split)
    entry = _entry(key, label, type_name, "directional", analytic, numeric, tol, floor, passed,
                   accepted, (_DIRECTIONS,))
    entry.size = int(a.size)
    return entry, len(d) * _DIRECTIONS + cost


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
        remainders[number] = abs(change - h * slope)
        rounding = _EPS * losses.scale
        loss_kink = bool(type(loss).kinks) and abs(losses.value) <= max(abs(change),
                                                                        losses.kink_floor)
        kinked[number] = crossed.any() or loss_kink
        usable[number] = not kinked[number] and remainders[number] > 1e2 * rounding
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
        within_rounding = gradient_error <= _CONSISTENCY * grad_eps / 10
        ok, conclusive = order > 1.5 or within_rounding, True
    else:
        # Either the remainder is at rounding level for every step (L is linear along d)
        # or kinks are within reach of the smallest steps (no verdict possible).
        order, ok = math.inf, True
        conclusive = not kinked[-_TAYLOR_POINTS:].any()
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
    whose remainder is above rounding, `1e2 eps (|L| + w sum_i max|y_i|)`, and
    that reach no kink. Pass: order > 1.5, the midpoint of the two cases, no tolerance to
    tune -- or a first-order remainder `median(r / h)` within `100 eps sum |g d|`,
    the rounding of the gradient. A network computing in float32 is
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
