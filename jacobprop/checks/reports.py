"""What the checkers return: `CheckEntry`, `GradcheckReport`, `TaylorReport`."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np


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
        within `default_rtol()` (3.7e-6), what gradcheck's differences accept.
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
            summary = ("inconclusive: no step above rounding is both clear of kinks and in "
                       "the asymptotic range")
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


