"""The layer contract in one call: `assert_layer_correct(layer)`.

Everything a jacobprop layer promises, checked on a few inputs:

1. forward: output shape `(B, output_dim(n))`, the input's dtype, finite, and
   the input left untouched;
2. batch independence: sample i's output and Jacobian block do not depend on
   the other samples (permuted, split and extended batches);
3. the Jacobian `dy/dx` against central finite differences;
4. `vjp` against the Jacobian (and the Jacobian operator's own `vjp`);
5. `jvp` against the Jacobian (and the operator's own `jvp`);
6. the dot test `<J u, v> == <u, J^T v>` between `jvp` and `vjp`;
7. every parameter Jacobian `dy/dvec(p)` against finite differences;
8. float32 against float64: a float32 copy of the layer stays float32 end to
   end and agrees within float32 rounding.

The checks run on a float64 copy of the layer, so the caller's layer is never
touched (parameters are perturbed in place on the copy only).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import numpy as np

from ..checks import check_layer
from ..checks.tolerance import (
    _check_layer_argument,
    consistency_tolerance,
    refuse_stochastic,
)
from ..errors import GradcheckError, check_batch_matrix, check_rng
from ..layers.base import Layer
from .strategies import DEFAULT_MARGIN, draw_input, flatten_layers, input_problems

__all__ = ["CHECKS", "assert_layer_correct", "cast_layer"]

#: The names of the checks, in the order they run; failures quote one of them.
CHECKS = (
    "forward",
    "batch independence",
    "jacobian vs finite differences",
    "vjp vs jacobian",
    "jvp vs jacobian",
    "dot test",
    "parameter jacobians vs finite differences",
    "shortcut hooks vs forward",
    "float32 vs float64",
)

#: The float32 copy against float64 on the same rounded values: rule 2 of the
#: tolerance policy (`jacobprop.checks.tolerance`) in float32, relative to the
#: array's scale, plus an absolute floor because derivatives such as tanh's
#: `1 - y^2` come from outputs of size about 1, whose float32 rounding (~1e-7)
#: can exceed 1e-4 of a tiny derivative.
FLOAT32_RTOL = float(consistency_tolerance(np.float32, 1.0, 0.0))
FLOAT32_FLOOR = 64 * float(np.finfo(np.float32).eps)
_LOW = {"rtol": FLOAT32_RTOL, "floor": FLOAT32_FLOOR, "labels": ("float32", "float64")}

_FLOAT64 = np.dtype(np.float64)
_FLOAT32 = np.dtype(np.float32)


def cast_layer(layer: Layer, dtype) -> Layer:
    """A deep copy of `layer` with every parameter array converted to `dtype`.

    Notes
    -----
    Nested `Sequential` stacks are walked down to their leaf layers and each
    leaf's `params[name]` is replaced by `params[name].astype(dtype)`. A layer
    that keeps floating arrays outside `params` is not fully cast; its float32
    copy then computes in float64, which the "float32 vs float64" check
    reports (opt out with `assert_layer_correct(..., float32=False)`).
    """
    duplicate = copy.deepcopy(layer)
    for leaf in flatten_layers(duplicate):
        for name, value in list(leaf.params.items()):
            leaf.params[name] = np.asarray(value).astype(dtype)
    return duplicate


@dataclass
class _Contract:
    """The layer under test and how to word a failure."""

    label: str
    rtol: float | None
    atol: float | None
    x: np.ndarray | None = None

    def fail(self, check: str, detail: str) -> None:
        shape = None if self.x is None else self.x.shape
        message = (f"assert_layer_correct({self.label}): check {check!r} failed for input "
                   f"shape {shape}:\n  {detail}")
        if self.x is not None and self.x.size <= 24:
            # Small enough to paste back into a test and reproduce.
            start = "  x = np.array("
            values = np.array2string(self.x, precision=17, separator=", ", prefix=start,
                                     max_line_width=99)
            message += f"\n{start}{values})"
        raise GradcheckError(message)

    def compare(self, check, what, analytic, numeric, axes, *, rtol, atol=None, floor=0.0,
                labels=("analytic", "numeric")):
        """Fail unless `|analytic - numeric| <= atol + rtol * |numeric|` entrywise.

        With `atol=None` it is `rtol * max(|numeric|, |analytic|) + floor`:
        entries are judged against the scale of the whole array, so rounding
        in tiny entries does not count but any O(1) error does. `labels` name
        the two sides in the message (finite differences are "numeric").
        """
        analytic = np.asarray(analytic)
        numeric = np.asarray(numeric)
        if analytic.shape != numeric.shape:
            self.fail(check, f"{what}: shape {analytic.shape}, expected {numeric.shape}")
        if analytic.size == 0:
            return
        if not np.isfinite(analytic).all():
            index = tuple(np.argwhere(~np.isfinite(analytic))[0])
            self.fail(check, f"{what}: non-finite entry {_where(index, axes)} = "
                             f"{float(analytic[index])!r}")
        a = analytic.astype(np.float64)
        n = numeric.astype(np.float64)
        if atol is None:
            atol = rtol * max(np.abs(n).max(), np.abs(a).max(), np.finfo(np.float64).tiny)
            atol += floor
        tolerance = atol + rtol * np.abs(n)
        excess = np.abs(a - n) - tolerance
        index = np.unravel_index(int(np.argmax(excess)), excess.shape)
        if excess[index] > 0:
            self.fail(
                check,
                f"{what}: worst entry {_where(index, axes)}: {labels[0]} {float(a[index])!r}, "
                f"{labels[1]} {float(n[index])!r} (|diff| {abs(a[index] - n[index]):.3g} > "
                f"tolerance {tolerance[index]:.3g}; rtol={rtol:g}, atol={atol:.3g})",
            )


def _where(index, axes) -> str:
    return "[" + ", ".join(f"{axis} {i}" for axis, i in zip(axes, index, strict=True)) + "]"


def assert_layer_correct(layer: Layer, x=None, *, rtol: float | None = None,
                         atol: float | None = None, float32: bool = True,
                         rng: np.random.Generator | None = None, batch: int = 3,
                         input_dim: int | None = None,
                         margin: float = DEFAULT_MARGIN) -> None:
    """Check the whole layer contract; raise `jacobprop.GradcheckError` on the first failure.

    Parameters
    ----------
    layer : Layer
        Any layer, including a (nested) `Sequential` and a user's subclass.
    x : array_like `(B, n)`, optional
        The input to check at. When None, three inputs of `batch` samples are
        drawn at scales 0.5, 1 and 2, clear of the kinks and saturated regions
        the layers declare (`Layer.kinks`, `Layer.saturation`).
    rtol, atol : float, optional
        Tolerances against finite differences, passed to `check_layer`
        (defaults: the policy of `jacobprop.checks.tolerance`).
    float32 : bool
        Also check a float32 copy of the layer (see `cast_layer`) against
        float64. A layer that cannot be cast by converting its `params` opts
        out with False.
    rng : numpy.random.Generator, optional
        Source of drawn inputs and random probe vectors (seeded with 0 when
        None, so a failure reproduces).
    batch : int
        B of the drawn inputs.
    input_dim : int, optional
        Width of the drawn inputs for a layer that takes any width (default:
        2, 3 and 5 for the three inputs).
    margin : float
        Distance from kinks kept by drawn inputs.

    Raises
    ------
    GradcheckError
        An `AssertionError` naming the layer, the check (one of `CHECKS`),
        and the worst entry with its analytic and numeric values.

    Notes
    -----
    Shapes: `x` `(B, n)`, `y` `(B, m)`, `J = dy/dx` `(B, m, n)` (`(B, m, B, n)`
    dense for a layer that declares `couples_samples`), parameter Jacobians
    `(B, m, p.size)`. Built on `jacobprop.check_layer`, which does every
    derivative comparison (finite differences, vjp and jvp against the
    Jacobian, the dot tests) with its tolerance policy and its kink rule: the
    two checkers never disagree. This function adds what only it does: drawn
    inputs, the forward pass's own contract, batch independence (or, for a
    layer coupling samples, that its operator declares the coupling and its
    dense form is `(B, m, B, n)`) and float32 against float64, all under rule
    2 of the policy (`jacobprop.checks.tolerance`).
    """
    _check_layer_argument("assert_layer_correct", "layer", layer)
    refuse_stochastic("assert_layer_correct", layer)
    # Seeded by default: a contract failure must reproduce on the next run.
    rng = check_rng(np.random.default_rng(0) if rng is None else rng,
                    where="assert_layer_correct")
    label = repr(layer)
    if not label.startswith(type(layer).__name__):
        # A subclass inheriting its parent's repr is named by its own class.
        label = f"{type(layer).__name__}: {label}"
    contract = _Contract(label, rtol, atol)
    reference = cast_layer(layer, _FLOAT64)
    if x is None:
        points = []
        for width, scale in zip((2, 3, 5), (0.5, 1.0, 2.0), strict=True):
            width = input_dim if input_dim is not None else width
            points.append(draw_input(reference, batch, rng=rng, input_dim=width, scale=scale,
                                     margin=margin))
    else:
        points = [check_batch_matrix(x, where=f"assert_layer_correct({layer!r})", name="x",
                                     features=reference.input_dim)]
    for point in points:
        point = point.astype(_FLOAT64)
        contract.x = point
        try:
            _check_point(contract, reference, point, rng)
        except GradcheckError as error:
            problems = input_problems(reference, point, margin) if x is not None else []
            if problems:
                raise GradcheckError(
                    f"{error}\n  note: the given x is a poor point for finite differences: "
                    f"{problems[0]}"
                ) from None
            raise
        if float32:
            _check_float32(contract, layer, point, rng)


#: Which check of `CHECKS` a failing `check_layer` entry belongs to.
def _check_of(entry_name: str) -> str:
    if entry_name == "dy/dx":
        return "jacobian vs finite differences"
    if entry_name.startswith("dy/d"):
        return "parameter jacobians vs finite differences"
    if entry_name.startswith("vjp") or entry_name == "J vjp":
        return "vjp vs jacobian"
    if entry_name.startswith("jvp") or entry_name == "J jvp":
        return "jvp vs jacobian"
    if entry_name.startswith("hook "):
        return "shortcut hooks vs forward"
    return "dot test"


def _axes(entry_name: str, index: tuple) -> tuple:
    """Names of the axes of a `check_layer` entry, for the failure message."""
    if entry_name == "dy/dx":
        return ("sample", "output", "input") if len(index) == 3 else (
            "sample", "output", "sample", "input")
    if entry_name.startswith("dy/d"):
        return ("sample", "output", f"vec({entry_name[4:]})")
    if entry_name == "vjp dx":
        return ("sample", "input")
    if entry_name.startswith("vjp d"):
        return ("entry",) * len(index)
    return ("sample", "output")[:len(index)] if len(index) <= 2 else ("entry",) * len(index)


def _check_point(contract: _Contract, layer: Layer, x: np.ndarray, rng) -> None:
    batch, n = x.shape
    y, cache = _check_forward(contract, layer, x)
    m = y.shape[1]
    coupled = bool(layer.couples_samples)
    jac = layer._call_jacobian(cache)
    if tuple(jac.shape) != (batch, m, n):
        contract.fail("jacobian vs finite differences",
                      f"jacobian(cache).shape is {jac.shape}, expected (B, m, n) = "
                      f"{(batch, m, n)}")
    dense = np.asarray(jac.to_dense())
    if coupled:
        _check_declared_coupling(contract, layer, x, y, jac, dense, rng)
    else:
        _check_batch_independence(contract, layer, x, y, jac, dense, rng)

    params = layer.params
    param_ops = layer._call_param_jacobians(cache)
    if set(param_ops) != set(params):
        contract.fail("parameter jacobians vs finite differences",
                      f"param_jacobians returned keys {sorted(param_ops)}, the layer's params "
                      f"are {sorted(params)}")
    for name, value in params.items():
        if tuple(param_ops[name].shape) != (batch, m, value.size):
            contract.fail("parameter jacobians vs finite differences",
                          f"param_jacobians[{name!r}].shape is {param_ops[name].shape}, "
                          f"expected (B, m, {name}.size) = {(batch, m, value.size)}")
    _, grads = layer._call_vjp(cache, np.zeros((batch, m)), True)
    if set(grads) != set(params):
        contract.fail("vjp vs jacobian", f"vjp returned parameter gradients {sorted(grads)}, "
                                         f"the layer's params are {sorted(params)}")

    # Derivatives against finite differences and against each other: check_layer, with
    # its tolerances and its kink rule (one checker).
    report = check_layer(layer, x, rtol=contract.rtol, atol=contract.atol, rng=rng)
    failures = report.failures
    if failures:
        first = min(failures, key=lambda e: CHECKS.index(_check_of(e.name)))
        index = "-" if first.worst_index is None else _where(first.worst_index,
                                                             _axes(first.name, first.worst_index))
        differenced = first.check in ("finite differences", "directional")
        sides = ("analytic", "numeric") if differenced else ("got", "expected")
        contract.fail(
            _check_of(first.name),
            f"{first.name} ({first.check}): worst entry {index}: {sides[0]} "
            f"{first.analytic!r}, {sides[1]} {first.numeric!r} (max abs err "
            f"{first.max_abs_error:.3g}, max rel err {first.max_rel_error:.3g})\n{report}")


def _check_forward(contract, layer, x):
    before = x.copy()
    y, cache = layer._call_forward(layer._check_input(x))
    y = np.asarray(y)
    expected = (x.shape[0], layer.output_dim(x.shape[1]))
    if y.shape != expected:
        contract.fail("forward", f"output shape {y.shape}, expected (B, output_dim(n)) = "
                                 f"{expected}")
    if y.dtype != x.dtype:
        contract.fail("forward", f"output dtype {y.dtype} for input dtype {x.dtype}")
    if not np.isfinite(y).all():
        index = tuple(np.argwhere(~np.isfinite(y))[0])
        contract.fail("forward", f"non-finite output y{list(index)} = {y[index]!r}")
    if not np.array_equal(x, before):
        contract.fail("forward", "forward(x) modified its input x in place")
    again = layer._call_forward(x)[0]
    if not np.array_equal(again, y):
        contract.fail("forward", "a second forward(x) differs from the first: the layer "
                                 "keeps state between calls")
    return y, cache


def _independence(n: int) -> dict:
    """Rule 2 for results that only the batch around them changed: rounding of a dot
    product of length n, relative to the array's scale."""
    return {"rtol": consistency_tolerance(np.float64, 1.0 + n, 0.0), "labels": ("got", "expected")}


def _check_batch_independence(contract, layer, x, y, jac, dense, rng) -> None:
    check = "batch independence"
    batch, n = x.shape
    exact = _independence(n)
    if jac.couples_samples:
        contract.fail(check, f"jacobian(cache) is a {type(jac).__name__} that couples samples, "
                             f"but the layer declares couples_samples=False")

    def outputs_and_blocks(points):
        out, cache = layer._call_forward(points)
        return out, np.asarray(layer._call_jacobian(cache).to_dense())

    perm = rng.permutation(batch) if batch > 1 else np.arange(batch)
    out, blocks = outputs_and_blocks(x[perm])
    contract.compare(check, "f(x[perm]) vs f(x)[perm]", out, y[perm], ("sample", "output"),
                     **exact)
    contract.compare(check, "J(x[perm]) vs J(x)[perm]", blocks, dense[perm],
                     ("sample", "output", "input"), **exact)
    for i in range(batch):
        out, blocks = outputs_and_blocks(x[i:i + 1])
        contract.compare(check, f"sample {i} alone vs in the batch: output", out, y[i:i + 1],
                         ("sample", "output"), **exact)
        contract.compare(check, f"sample {i} alone vs in the batch: Jacobian block", blocks,
                         dense[i:i + 1], ("sample", "output", "input"), **exact)
    # Other samples next to the batch must not move it either.
    others = draw_input(layer, batch + 1, rng=rng, input_dim=x.shape[1], scale=1.0)
    out, blocks = outputs_and_blocks(np.concatenate([x, others]))
    contract.compare(check, "f(x) inside a larger batch vs f(x)", out[:batch], y,
                     ("sample", "output"), **exact)
    contract.compare(check, "J(x) inside a larger batch vs J(x)", blocks[:batch], dense,
                     ("sample", "output", "input"), **exact)


def _check_declared_coupling(contract, layer, x, y, jac, dense, rng) -> None:
    """A layer that declares coupled samples: its operator says so, its dense form is
    `(B, m, B, n)`, and permuting the samples permutes outputs and Jacobian alike."""
    check = "batch independence"
    batch, n = x.shape
    m = y.shape[1]
    if not jac.couples_samples:
        contract.fail(check, f"the layer declares couples_samples=True, but jacobian(cache) is a "
                             f"{type(jac).__name__} with couples_samples=False")
    if dense.shape != (batch, m, batch, n):
        contract.fail(check, f"jacobian(cache).to_dense() of a layer coupling samples must be "
                             f"(B, m, B, n) = {(batch, m, batch, n)}, got {dense.shape}")
    perm = rng.permutation(batch) if batch > 1 else np.arange(batch)
    out, cache = layer._call_forward(x[perm])
    blocks = np.asarray(layer._call_jacobian(cache).to_dense())
    exact = _independence(batch * n)
    contract.compare(check, "f(x[perm]) vs f(x)[perm]", out, y[perm], ("sample", "output"),
                     **exact)
    contract.compare(check, "J(x[perm]) vs J(x)[perm]", blocks, dense[perm][:, :, perm],
                     ("sample", "output", "sample", "input"), **exact)


def _check_float32(contract: _Contract, layer: Layer, x64: np.ndarray, rng) -> None:
    """The float32 copy stays float32 and matches float64 run on the same rounded numbers."""
    check = "float32 vs float64"
    low = cast_layer(layer, _FLOAT32)
    # Compare against float64 arithmetic on the float32-rounded parameters and
    # input, so only the arithmetic differs, not the numbers it starts from.
    high = cast_layer(low, _FLOAT64)
    x32 = x64.astype(_FLOAT32)
    x = x32.astype(_FLOAT64)
    y32, cache32 = low._call_forward(x32)
    y, cache = high._call_forward(x)
    batch, m = y.shape
    g = rng.standard_normal((batch, m))
    v = rng.standard_normal(x.shape)
    gx32, grads32 = low._call_vjp(cache32, g.astype(_FLOAT32), True)
    gx, grads = high._call_vjp(cache, g, True)
    jac32 = low._call_jacobian(cache32)
    dense32 = jac32.to_dense()
    params32 = low.params
    produced = {
        "forward output": np.asarray(y32).dtype,
        "vjp input gradient": np.asarray(gx32).dtype,
        "jvp": np.asarray(low._call_jvp(cache32, v.astype(_FLOAT32))).dtype,
        "jacobian(cache).dtype": np.dtype(jac32.dtype),
        "jacobian(cache).to_dense()": dense32.dtype,
    }
    produced.update({f"vjp gradient of {name!r}": np.asarray(grads32[name]).dtype
                     for name in params32})
    produced.update({f"param_jacobians[{name!r}].to_dense()": op.to_dense().dtype
                     for name, op in low._call_param_jacobians(cache32).items()})
    for what, dtype in produced.items():
        if dtype != _FLOAT32:
            contract.fail(check, f"with float32 parameters and input, {what} is {dtype}, "
                                 f"expected float32 (a layer keeping arrays outside `params` "
                                 f"can opt out with float32=False)")
    contract.compare(check, "forward output", y32, y, ("sample", "output"), **_LOW)
    contract.compare(check, "dy/dx", dense32, high._call_jacobian(cache).to_dense(),
                     ("sample", "output", "input"), **_LOW)
    contract.compare(check, "vjp input gradient", gx32, gx, ("sample", "input"), **_LOW)
    for name, value in params32.items():
        contract.compare(check, f"vjp gradient of {name!r}", grads32[name], grads[name],
                         ("entry",) * value.ndim, **_LOW)
