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

from ..checks import dottest, numerical_jacobian
from ..errors import GradcheckError, check_batch_matrix
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
    "float32 vs float64",
)

#: Default relative tolerance against finite differences (float64 central
#: differences are good to about 1e-9 here; a wrong derivative is off by O(1)).
FD_RTOL = 1e-6
#: Relative tolerance between two analytic float64 computations of one quantity.
EXACT_RTOL = 1e-10
_EXACT = {"rtol": EXACT_RTOL, "labels": ("got", "expected")}
#: Tolerance of the float32 copy against float64 on the same rounded values:
#: relative to the array's scale, plus an absolute floor because derivatives
#: such as tanh's `1 - y^2` come from outputs of size about 1, whose float32
#: rounding (~1e-7) can exceed 1e-4 of a tiny derivative.
FLOAT32_RTOL = 1e-4
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
    rtol: float
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
    rtol : float, optional
        Relative tolerance against finite differences (default 1e-6).
    atol : float, optional
        Absolute tolerance against finite differences (default
        `rtol * max|J|`, the scale of the array compared).
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
    Shapes: `x` `(B, n)`, `y` `(B, m)`, `J = dy/dx` `(B, m, n)`, parameter
    Jacobians `(B, m, p.size)`. Finite differences are central,
    `(f(x + h e_k) - f(x - h e_k)) / 2h` with `h = eps^(1/3) max(1, |x_k|)`
    (`jacobprop.checks.numerical_jacobian`), perturbing feature k of every
    sample at once (valid once batch independence has passed). The dot test
    is `jacobprop.checks.dottest` on the layer's `jvp` and `vjp` (relative
    to the sums' terms, 1e3 eps). Other consistency checks between analytic
    results (vjp, jvp, batch independence) use a relative tolerance of 1e-10;
    the float32 check 1e-4, both relative to the array's scale (the float32
    one plus an absolute 64 float32 epsilons).
    """
    if not isinstance(layer, Layer):
        raise TypeError(
            f"assert_layer_correct: `layer` must be a jacobprop Layer, got {type(layer).__name__}"
        )
    rng = np.random.default_rng(0) if rng is None else rng
    contract = _Contract(repr(layer), FD_RTOL if rtol is None else rtol, atol)
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


def _check_point(contract: _Contract, layer: Layer, x: np.ndarray, rng) -> None:
    batch, n = x.shape
    y, cache = _check_forward(contract, layer, x)
    m = y.shape[1]
    jac = layer.jacobian(cache)
    if tuple(jac.shape) != (batch, m, n):
        contract.fail("jacobian vs finite differences",
                      f"jacobian(cache).shape is {jac.shape}, expected (B, m, n) = "
                      f"{(batch, m, n)}")
    dense = jac.to_dense()
    _check_batch_independence(contract, layer, x, y, dense, rng)

    axes = ("sample", "output", "input")
    contract.compare("jacobian vs finite differences", "dy/dx",
                     dense, numerical_jacobian(layer, x), axes,
                     rtol=contract.rtol, atol=contract.atol)

    params = layer.params
    param_ops = layer.param_jacobians(cache)
    if set(param_ops) != set(params):
        contract.fail("parameter jacobians vs finite differences",
                      f"param_jacobians returned keys {sorted(param_ops)}, the layer's params "
                      f"are {sorted(params)}")
    param_dense = {name: op.to_dense() for name, op in param_ops.items()}

    g = rng.standard_normal((batch, m))
    gx, grads = layer.vjp(cache, g)
    check = "vjp vs jacobian"
    expected = np.einsum("bm,bmn->bn", g, dense)
    contract.compare(check, "vjp(cache, g)[0]", gx, expected, ("sample", "input"), **_EXACT)
    contract.compare(check, "jacobian(cache).vjp(g)", jac.vjp(g), expected,
                     ("sample", "input"), **_EXACT)
    if set(grads) != set(params):
        contract.fail(check, f"vjp returned parameter gradients {sorted(grads)}, the layer's "
                             f"params are {sorted(params)}")
    for name, value in params.items():
        expected = np.einsum("bm,bmp->p", g, param_dense[name]).reshape(value.shape)
        contract.compare(check, f"vjp gradient of {name!r} vs g @ dy/dvec({name})",
                         grads[name], expected, ("entry",) * value.ndim, **_EXACT)

    v = rng.standard_normal((batch, n))
    check = "jvp vs jacobian"
    expected = np.einsum("bmn,bn->bm", dense, v)
    contract.compare(check, "jvp(cache, v)", layer.jvp(cache, v), expected,
                     ("sample", "output"), **_EXACT)
    contract.compare(check, "jacobian(cache).jvp(v)", jac.jvp(v), expected,
                     ("sample", "output"), **_EXACT)

    # The dot test ties jvp and vjp together without trusting the dense Jacobian.
    try:
        dottest((lambda u: layer.jvp(cache, u), lambda w: layer.vjp(cache, w)[0]),
                shape=(batch, m, n), rng=rng, raise_on_fail=True, name="jvp/vjp")
    except GradcheckError as error:
        contract.fail("dot test", str(error))

    for name, value in params.items():
        if tuple(param_ops[name].shape) != (batch, m, value.size):
            contract.fail("parameter jacobians vs finite differences",
                          f"param_jacobians[{name!r}].shape is {param_ops[name].shape}, "
                          f"expected (B, m, {name}.size) = {(batch, m, value.size)}")
        contract.compare("parameter jacobians vs finite differences", f"dy/dvec({name})",
                         param_dense[name], _fd_param_jacobian(layer, x, name),
                         ("sample", "output", f"vec({name})"),
                         rtol=contract.rtol, atol=contract.atol)


def _check_forward(contract, layer, x):
    before = x.copy()
    y, cache = layer.forward(x)
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
    again = layer(x)
    if not np.array_equal(again, y):
        contract.fail("forward", "layer(x) differs from forward(x)[0]: the layer keeps state "
                                 "between calls")
    return y, cache


def _check_batch_independence(contract, layer, x, y, dense, rng) -> None:
    check = "batch independence"
    batch = x.shape[0]

    def outputs_and_blocks(points):
        out, cache = layer.forward(points)
        return out, layer.jacobian(cache).to_dense()

    perm = rng.permutation(batch) if batch > 1 else np.arange(batch)
    out, blocks = outputs_and_blocks(x[perm])
    contract.compare(check, "f(x[perm]) vs f(x)[perm]", out, y[perm], ("sample", "output"),
                     **_EXACT)
    contract.compare(check, "J(x[perm]) vs J(x)[perm]", blocks, dense[perm],
                     ("sample", "output", "input"), **_EXACT)
    for i in range(batch):
        out, blocks = outputs_and_blocks(x[i:i + 1])
        contract.compare(check, f"sample {i} alone vs in the batch: output", out, y[i:i + 1],
                         ("sample", "output"), **_EXACT)
        contract.compare(check, f"sample {i} alone vs in the batch: Jacobian block", blocks,
                         dense[i:i + 1], ("sample", "output", "input"), **_EXACT)
    # Other samples next to the batch must not move it either.
    others = draw_input(layer, batch + 1, rng=rng, input_dim=x.shape[1], scale=1.0)
    out, blocks = outputs_and_blocks(np.concatenate([x, others]))
    contract.compare(check, "f(x) inside a larger batch vs f(x)", out[:batch], y,
                     ("sample", "output"), **_EXACT)
    contract.compare(check, "J(x) inside a larger batch vs J(x)", blocks[:batch], dense,
                     ("sample", "output", "input"), **_EXACT)


def _fd_param_jacobian(layer: Layer, x: np.ndarray, name: str) -> np.ndarray:
    """Central differences of `layer(x)` in `vec(params[name])`, `(B, m, size)`.

    The parameter is overwritten in place (the layer is the contract's own
    float64 copy) and restored exactly afterwards.
    """
    value = layer.params[name]
    original = value.copy()

    def outputs(point):
        value[...] = point
        return layer(x)

    try:
        flat = numerical_jacobian(outputs, original, per_sample=False)
    finally:
        value[...] = original
    return flat.reshape(x.shape[0], -1, value.size)


def _check_float32(contract: _Contract, layer: Layer, x64: np.ndarray, rng) -> None:
    """The float32 copy stays float32 and matches float64 run on the same rounded numbers."""
    check = "float32 vs float64"
    low = cast_layer(layer, _FLOAT32)
    # Compare against float64 arithmetic on the float32-rounded parameters and
    # input, so only the arithmetic differs, not the numbers it starts from.
    high = cast_layer(low, _FLOAT64)
    x32 = x64.astype(_FLOAT32)
    x = x32.astype(_FLOAT64)
    y32, cache32 = low.forward(x32)
    y, cache = high.forward(x)
    batch, m = y.shape
    g = rng.standard_normal((batch, m))
    v = rng.standard_normal(x.shape)
    gx32, grads32 = low.vjp(cache32, g.astype(_FLOAT32))
    gx, grads = high.vjp(cache, g)
    jac32 = low.jacobian(cache32)
    dense32 = jac32.to_dense()
    params32 = low.params
    produced = {
        "forward output": np.asarray(y32).dtype,
        "vjp input gradient": np.asarray(gx32).dtype,
        "jvp": np.asarray(low.jvp(cache32, v.astype(_FLOAT32))).dtype,
        "jacobian(cache).dtype": np.dtype(jac32.dtype),
        "jacobian(cache).to_dense()": dense32.dtype,
    }
    produced.update({f"vjp gradient of {name!r}": np.asarray(grads32[name]).dtype
                     for name in params32})
    produced.update({f"param_jacobians[{name!r}].to_dense()": op.to_dense().dtype
                     for name, op in low.param_jacobians(cache32).items()})
    for what, dtype in produced.items():
        if dtype != _FLOAT32:
            contract.fail(check, f"with float32 parameters and input, {what} is {dtype}, "
                                 f"expected float32 (a layer keeping arrays outside `params` "
                                 f"can opt out with float32=False)")
    contract.compare(check, "forward output", y32, y, ("sample", "output"), **_LOW)
    contract.compare(check, "dy/dx", dense32, high.jacobian(cache).to_dense(),
                     ("sample", "output", "input"), **_LOW)
    contract.compare(check, "vjp input gradient", gx32, gx, ("sample", "input"), **_LOW)
    for name, value in params32.items():
        contract.compare(check, f"vjp gradient of {name!r}", grads32[name], grads[name],
                         ("entry",) * value.ndim, **_LOW)
