"""See the chain rule: a trace of what the backward pass multiplies, in the order it runs.

`explain(net, x, t, loss)` (or `net.explain(...)`) walks the same steps as
`net.value_and_grad(x, t, loss, mode="jacobian")`: the loss hands over the
covector `G = dL/dy` as a `(B, 1, m)` operator; walking backward through the
layers, every parameter gradient is read off as `sum_i G_i @ dy_i/dvec(p)`
(for Dense: `dL/dW = G^T X`, `dL/db = sum_i G_i`), and `G` moves on through
`G @ dy_l/dx_l`. Each step records the operator it multiplies by (its
structure kind and shape), what that operator stores against a dense
`(B, m, n)` block, and the flops the engine's own cost model
(`jacobprop.plan.plan_chain`) assigns to the product.

Without a loss, the trace is that of `net.jacobian(x)`: the layer Jacobians
`J_l = dy_l/dx_l` and the products of the accumulation plan the engine picks
(the cheapest parenthesization of `J_{L-1} @ ... @ J_0`).

The trace is plain data: `str(trace)` is a table, `trace.to_dict()` /
`trace.to_json()` and `Trace.from_dict` / `Trace.from_json` round-trip it.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields

import numpy as np

from .jacobian import GeneralJacobian, Jacobian
from .losses import Loss, check_loss
from .plan import plan_chain

__all__ = ["Trace", "TraceStep", "explain", "operator_nbytes", "plot_jacobians"]

#: The kinds of step, in the words of the chain rule.
LOSS_GRADIENT = "loss gradient"        # G = dL/dy, the covector the backward pass starts from
PARAMETER_GRADIENT = "read off"        # dL/dvec(p) = sum_i G_i @ dy_i/dvec(p)
BACKPROPAGATE = "backpropagate"        # G <- G @ dy_l/dx_l
FACTOR = "layer jacobian"              # J_l = dy_l/dx_l, a factor of dy/dx
PRODUCT = "product"                    # one product of the accumulation plan


def operator_nbytes(op: Jacobian) -> int:
    """Bytes of the arrays a Jacobian operator keeps, nested operators included.

    Counts every ndarray attribute of `op` (and of operators it holds, such as
    a Kronecker operator's left factor) once, however often it is referenced.
    The identity stores nothing; a shared block stores its `(m, n)` matrix once.
    """
    seen: set[int] = set()

    def walk(operator) -> int:
        total = 0
        for value in vars(operator).values():
            if isinstance(value, np.ndarray) and id(value) not in seen:
                seen.add(id(value))
                total += value.nbytes
            elif isinstance(value, Jacobian):
                total += walk(value)
        return total

    return walk(op)


def _dense_nbytes(op: Jacobian) -> int:
    batch, m, n = op.shape
    return batch * m * n * np.dtype(op.dtype).itemsize


def _product_flops(left: Jacobian, right: Jacobian) -> int:
    """The engine's flop estimate for `left @ right` (one product, so order is moot)."""
    return int(plan_chain([left, right], "reverse").flops)


def _block(op: Jacobian, sample: int) -> list:
    """Sample `sample`'s `(m, n)` block as nested lists of floats."""
    return op[sample].to_dense()[0].tolist()


def _record(action: str, op: Jacobian, result: Jacobian, *, flops: int, where: str,
            operator: str, layer: int | None = None, **extra) -> TraceStep:
    """A step multiplying by `op` and producing `result`; sizes are read off the operators."""
    return TraceStep(
        action=action, layer=layer, where=where, operator=operator, kind=op.kind,
        shape=list(op.shape), stored_bytes=operator_nbytes(op), dense_bytes=_dense_nbytes(op),
        flops=flops, result_kind=result.kind, result_shape=list(result.shape), **extra,
    )


@dataclass
class TraceStep:
    """One step of a trace.

    Attributes
    ----------
    action : str
        "loss gradient", "read off", "backpropagate" (gradient traces) or
        "layer jacobian", "product" (Jacobian traces).
    layer : int or None
        Index of the layer in the network; None for the loss and for products.
    where : str
        The layer's or loss's repr, or for a product the span of layers.
    operator : str
        What the step multiplies by, e.g. "dy_2/dx_2" or "dy_0/dvec(W)".
    kind, shape : str, list of int
        Structure and `(B, m, n)` shape of that operator.
    stored_bytes, dense_bytes : int
        Bytes the operator keeps, and what `(B, m, n)` dense blocks would take.
    flops : int
        The engine's cost-model estimate of the step's product (0 for the loss
        gradient and for the layer Jacobians, which are not products).
    result_kind, result_shape : str, list of int
        The operator the step produces (the new covector, a gradient's
        operator, or a partial product).
    gradient : str or None
        The parameter key (`"2.W"`) whose gradient is read off at this step.
    formula : str or None
        How it is read off, e.g. "dL/dW = G^T X".
    values : dict or None
        With `values=True`: the step's matrices for one sample, as nested lists
        ("block": the operator's block; "G": the covector after the step;
        "gradient": the parameter gradient summed over the batch).
    """

    action: str
    layer: int | None
    where: str
    operator: str
    kind: str
    shape: list[int]
    stored_bytes: int
    dense_bytes: int
    flops: int
    result_kind: str
    result_shape: list[int]
    gradient: str | None = None
    formula: str | None = None
    values: dict[str, list] | None = None


@dataclass
class Trace:
    """The steps of a backward pass or of a full Jacobian, as plain data.

    Attributes
    ----------
    mode : {"gradient", "jacobian"}
        A loss's backward pass, or `net.jacobian(x)`.
    network : list of str
        The layers' reprs, layer 0 first.
    loss : str or None
        The loss's repr (gradient traces).
    batch : int
        B, the number of samples traced.
    dtype : str
        The dtype of the computation.
    steps : list of TraceStep
        In the order they run.
    value : float or None
        The loss value (gradient traces).
    chain : str
        The operator chain whose product orders `order_flops` compares.
    order_flops : dict of str to int
        The engine's flop estimate of `chain` per product order ("forward",
        "reverse", "auto").
    order : str
        The order the traced computation uses: "reverse" for a loss's backward
        pass, the chosen one for a Jacobian.
    plan : int or list
        The parenthesization: a leaf index into `chain` or a pair of plans.
    sample : int or None
        The sample whose matrices `values` hold, or None without values.
    """

    mode: str
    network: list[str]
    loss: str | None
    batch: int
    dtype: str
    steps: list[TraceStep]
    value: float | None
    chain: str
    order_flops: dict[str, int]
    order: str
    plan: int | list
    sample: int | None = None

    # ---- totals ------------------------------------------------------------
    @property
    def flops(self) -> int:
        """The sum of the steps' flop estimates."""
        return sum(step.flops for step in self.steps)

    @property
    def stored_bytes(self) -> int:
        """Bytes the traced operators keep, summed over the steps."""
        return sum(step.stored_bytes for step in self.steps)

    @property
    def dense_bytes(self) -> int:
        """Bytes the same operators would take as dense `(B, m, n)` blocks."""
        return sum(step.dense_bytes for step in self.steps)

    # ---- plain data ----------------------------------------------------------
    def to_dict(self) -> dict:
        """The trace as JSON-ready Python values (dicts, lists, str, int, float, None)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> Trace:
        """Rebuild a trace from `to_dict()` output (or its JSON, parsed)."""
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ValueError(f"Trace.from_dict: unknown keys {unknown}")
        data = dict(data)
        data["steps"] = [TraceStep(**step) for step in data["steps"]]
        return cls(**data)

    def to_json(self, **kwargs) -> str:
        """`json.dumps(self.to_dict(), **kwargs)`."""
        return json.dumps(self.to_dict(), **kwargs)

    @classmethod
    def from_json(cls, text: str) -> Trace:
        """Rebuild a trace from `to_json()` output."""
        return cls.from_dict(json.loads(text))

    # ---- the readable table --------------------------------------------------
    def __str__(self) -> str:
        return _format(self)


# ---------------------------------------------------------------------------
def explain(net, x, t=None, loss: Loss | None = None, *, values: bool = False) -> Trace:
    """Trace the backward pass of `loss` through `net` at `x` (or `net.jacobian(x)`).

    Parameters
    ----------
    net : Sequential
    x : ndarray `(B, n)`
    t : target in the form `loss` takes, optional
    loss : Loss, optional
        With a loss (and a target): the trace of the gradient's backward pass,
        exactly as `value_and_grad(..., mode="jacobian")` runs it. Without:
        the trace of the full Jacobian `dy/dx` and its accumulation plan.
    values : bool
        Record the actual matrices of sample 0 in every step (keep B and the
        widths tiny: the table prints them).

    Returns
    -------
    Trace
    """
    from .network import Sequential  # explain sits above the network (no import cycle)

    if not isinstance(net, Sequential):
        raise TypeError(f"explain: `net` must be a jacobprop Sequential, got {type(net).__name__}")
    if loss is not None:
        check_loss(loss, where="explain")
    if (loss is None) != (t is None):
        given, missing = ("loss", "t") if t is None else ("t", "loss")
        raise ValueError(f"explain: `{given}` was given without `{missing}`; pass both for a "
                         "gradient trace, or neither for a Jacobian trace")
    x = net._check_input(x, where="explain")
    if values and x.shape[0] == 0:
        raise ValueError("explain: values=True needs at least one sample, got a batch of 0")
    y, cache = net._forward(x)
    sample = 0 if values else None
    if loss is None:
        return _jacobian_trace(net, cache, y, sample)
    return _gradient_trace(net, cache, y, t, loss, sample)


def _gradient_trace(net, cache, y, t, loss, sample) -> Trace:
    value, g = loss._call_value_and_grad(y, loss._validated_target(y, t))
    covector = GeneralJacobian(g[:, None, :])
    steps = [_record(LOSS_GRADIENT, covector, covector, flops=0, where=repr(loss),
                     operator="G = dL/dy",
                     values=None if sample is None else {"G": _block(covector, sample)})]
    layers = net.layers
    start, jacobians, deepest = covector, {}, None
    for index in range(len(layers) - 1, -1, -1):
        layer, layer_cache = layers[index], cache.caches[index]
        for name, op in layer._call_param_jacobians(layer_cache).items():
            product = covector @ op
            gradient = product.batch_sum().reshape(layer.params[name].shape)
            steps.append(_record(
                PARAMETER_GRADIENT, op, product, flops=_product_flops(covector, op),
                where=repr(layer), operator=f"dy_{index}/dvec({name})", layer=index,
                gradient=f"{index}.{name}", formula=_formula(name, op),
                values=None if sample is None else {
                    "block": _block(op, sample), "gradient": np.atleast_2d(gradient).tolist()
                },
            ))
            if deepest is None or index < deepest[0]:
                deepest = (index, name, op)
        if index > 0:  # as in the backward pass: dL/dx of the first layer is never needed
            op = jacobians[index] = layer._call_jacobian(layer_cache)
            flops = _product_flops(covector, op)
            covector = covector @ op
            steps.append(_record(
                BACKPROPAGATE, op, covector, flops=flops, where=repr(layer),
                operator=f"dy_{index}/dx_{index}", layer=index,
                values=None if sample is None else {
                    "block": _block(op, sample), "G": _block(covector, sample)
                },
            ))
    # Compare product orders on the longest chain the backward pass evaluates:
    # the deepest parameter's G @ dy_{L-1}/dx_{L-1} @ ... @ dy_l/dvec(p) (or,
    # without parameters, dL/dx).
    if deepest is None:
        stop, last = 0, (layers[0]._call_jacobian(cache.caches[0]), "dy_0/dx_0")
    else:
        stop, last = deepest[0], (deepest[2], f"dy_{deepest[0]}/dvec({deepest[1]})")
    chain_ops, chain_names = [start], ["G"]
    for index in range(len(layers) - 1, stop, -1):
        chain_ops.append(jacobians[index])
        chain_names.append(f"dy_{index}/dx_{index}")
    chain_ops.append(last[0])
    chain_names.append(last[1])
    plans = _plans(chain_ops)
    return Trace(
        mode="gradient", network=[repr(layer) for layer in layers], loss=repr(loss),
        batch=int(y.shape[0]), dtype=np.dtype(y.dtype).name, steps=steps, value=float(value),
        chain=" @ ".join(chain_names), order_flops=_order_flops(plans), order="reverse",
        plan=_as_lists(plans["reverse"].tree), sample=sample,
    )


def _plans(ops) -> dict:
    """The engine's plan of the chain `ops` for every product order, in table order."""
    return {order: plan_chain(ops, order) for order in ("reverse", "forward", "auto")}


def _order_flops(plans) -> dict[str, int]:
    return {order: int(plan.flops) for order, plan in plans.items()}


def _formula(name: str, op: Jacobian) -> str:
    """How the gradient of parameter `name` comes out of `G @ op`, by the operator's kind."""
    if op.kind == "identity":
        return f"dL/d{name} = sum_i G_i"
    if op.kind == "kronecker":
        if op.left.kind == "identity":
            return f"dL/d{name} = G^T X"
        return f"dL/d{name} = (G L)^T X"
    return f"dL/d{name} = sum_i G_i @ dy_i/dvec({name})"


def _jacobian_trace(net, cache, y, sample) -> Trace:
    layers = net.layers
    count = len(layers)
    factors = [layer._call_jacobian(c) for layer, c in zip(layers, cache.caches, strict=True)]
    # The chain is written output first, J_{L-1} @ ... @ J_0, as `Sequential.jacobian` does.
    ops = factors[::-1]
    names = [f"J_{count - 1 - position}" for position in range(count)]
    steps = []
    for position, op in enumerate(ops):
        index = count - 1 - position
        steps.append(_record(
            FACTOR, op, op, flops=0, where=repr(layers[index]),
            operator=f"{names[position]} = dy_{index}/dx_{index}", layer=index,
            values=None if sample is None else {"block": _block(op, sample)},
        ))
    plans = _plans(ops)
    tree = plans["auto"].tree

    def evaluate(node):
        """(operator, label) of a plan node, recording each product as a step."""
        if isinstance(node, int):
            return ops[node], names[node]
        (left, left_name), (right, right_name) = evaluate(node[0]), evaluate(node[1])
        product = left @ right
        label = f"J_{_span(left_name)[0]}..{_span(right_name)[1]}"
        steps.append(_record(
            PRODUCT, product, product, flops=_product_flops(left, right), where=label,
            operator=f"{left_name} @ {right_name}",
            values=None if sample is None else {"block": _block(product, sample)},
        ))
        return product, label

    evaluate(tree)
    return Trace(
        mode="jacobian", network=[repr(layer) for layer in layers], loss=None,
        batch=int(y.shape[0]), dtype=np.dtype(y.dtype).name, steps=steps, value=None,
        chain=" @ ".join(names), order_flops=_order_flops(plans), order="auto",
        plan=_as_lists(tree),
        sample=sample,
    )


def _span(label: str) -> tuple[str, str]:
    """The highest and lowest layer of a label "J_3" or "J_3..1"."""
    indices = label[2:].split("..")
    return indices[0], indices[-1]


def _as_lists(tree):
    return tree if isinstance(tree, int) else [_as_lists(node) for node in tree]


# ---- the table --------------------------------------------------------------
def _bytes(count: int) -> str:
    if count < 1024:
        return f"{count} B"
    for unit in ("KiB", "MiB", "GiB"):
        count /= 1024
        if count < 1024 or unit == "GiB":
            return f"{count:.1f} {unit}"
    raise AssertionError("unreachable")


def _shape(shape) -> str:
    return "(" + ", ".join(str(size) for size in shape) + ")"


_HEADER = ("step", "layer", "operator", "structure", "shape", "stores", "dense", "flops",
           "result", "reads off")


def _row(number: int, step: TraceStep) -> tuple[str, ...]:
    layer = "loss" if step.action == LOSS_GRADIENT else (
        "" if step.layer is None else f"{step.layer} {step.where.split('(')[0]}")
    if step.action == LOSS_GRADIENT:
        operator = step.operator
    elif step.action == PARAMETER_GRADIENT:
        operator = f"G @ {step.operator}"
    elif step.action == BACKPROPAGATE:
        operator = f"G <- G @ {step.operator}"
    else:
        operator = step.operator
    result = f"{step.result_kind} {_shape(step.result_shape)}"
    reads = "" if step.gradient is None else f"{step.gradient}: {step.formula}"
    return (str(number), layer, operator, step.kind, _shape(step.shape),
            _bytes(step.stored_bytes), _bytes(step.dense_bytes), f"{step.flops:,}", result,
            reads)


def _format(trace: Trace) -> str:
    lines = []
    if trace.mode == "gradient":
        lines.append(f"Backward pass of {trace.loss} = {trace.value:.6g} through "
                     f"{len(trace.network)} layers, B = {trace.batch}, {trace.dtype}")
        lines.append("G is the covector dL/dy_l, one row per sample, (B, 1, m) as an operator; "
                     "X is the input a Dense layer kept.")
    else:
        lines.append(f"Full Jacobian dy/dx = {trace.chain} through {len(trace.network)} "
                     f"layers, B = {trace.batch}, {trace.dtype}")
    for index, layer in enumerate(trace.network):
        lines.append(f"  layer {index}: {layer}")
    rows = [_HEADER] + [_row(number, step) for number, step in enumerate(trace.steps)]
    widths = [max(len(row[column]) for row in rows) for column in range(len(_HEADER))]
    numeric = {0, 5, 6, 7}
    for position, row in enumerate(rows):
        cells = [cell.rjust(width) if column in numeric and position else cell.ljust(width)
                 for column, (cell, width) in enumerate(zip(row, widths, strict=True))]
        lines.append("  ".join(cells).rstrip())
        if position == 0:
            lines.append("  ".join("-" * width for width in widths))
    lines.append(f"total: {trace.flops:,} flops (engine estimate); operators store "
                 f"{_bytes(trace.stored_bytes)} against {_bytes(trace.dense_bytes)} dense")
    costs = ", ".join(f"{order} {flops:,}" for order, flops in trace.order_flops.items())
    if trace.mode == "gradient":
        lines.append("flops: the engine's cost model for each product G @ operator; summing a "
                     "read-off over the batch (G^T X) is not a product and not counted.")
        lines.append(f"order: the backward pass multiplies from the loss (reverse). For the "
                     f"longest chain, {trace.chain}: {costs} flops.")
    else:
        lines.append(f"order: {costs} flops; the engine takes the cheapest, plan "
                     f"{_plan(trace.plan, trace.chain.split(' @ '))}.")
    if trace.sample is not None:
        lines.append("")
        lines.append(f"values of sample {trace.sample}:")
        with np.printoptions(precision=4, suppress=True, linewidth=99, threshold=400,
                             edgeitems=3):
            for number, step in enumerate(trace.steps):
                for name, matrix in (step.values or {}).items():
                    what = {"block": step.operator, "G": "G", "gradient":
                            f"dL/d({step.gradient})"}[name]
                    lines.append(f"step {number}, {what}:")
                    # + 0.0 turns ReLU's -0.0 into 0.0, which reads as what it is.
                    lines.append(str(np.asarray(matrix) + 0.0))
    return "\n".join(lines) + "\n"


def _plan(tree, names) -> str:
    if isinstance(tree, int):
        return names[tree]
    return f"({_plan(tree[0], names)} @ {_plan(tree[1], names)})"


# ---- pictures ---------------------------------------------------------------
def plot_jacobians(net, x, path, *, sample: int = 0) -> None:
    """Heatmaps of every layer's Jacobian block for one sample and of their product.

    Parameters
    ----------
    net : Sequential
    x : ndarray `(B, n)`
    path : str or path-like
        Where the PNG goes.
    sample : int
        Which sample's blocks are drawn.

    Notes
    -----
    Panel l shows `dy_l/dx_l` of sample `sample` (rows = outputs, columns =
    inputs, numerator layout); the last panel the chained product
    `dy/dx = J_{L-1} @ ... @ J_0`. Colours are centred on zero. Needs
    matplotlib (the `plot` extra).
    """
    try:
        import matplotlib
    except ImportError:
        raise ImportError("plot_jacobians needs matplotlib, which is not installed "
                          "(pip install 'jacobprop[plot]')") from None
    matplotlib.use("Agg")  # files only; never open a window
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    x = net._check_input(x, where="plot_jacobians")
    if not 0 <= sample < x.shape[0]:
        raise IndexError(f"plot_jacobians: `sample` {sample} is out of range for a batch of "
                         f"{x.shape[0]}")
    _, cache = net._forward(x)
    panels = []
    for index, (layer, layer_cache) in enumerate(zip(net.layers, cache.caches, strict=True)):
        op = layer._call_jacobian(layer_cache)
        panels.append((f"{index}: {layer!r}\ndy_{index}/dx_{index}, {op.kind}",
                       op[sample].to_dense()[0]))
    total = net._jacobian(cache)
    panels.append((f"dy/dx = J_{len(net) - 1} @ ... @ J_0\n{total.kind}",
                   total[sample].to_dense()[0]))
    columns = min(len(panels), 4)
    rows = -(-len(panels) // columns)
    figure, axes = plt.subplots(rows, columns, figsize=(3.6 * columns, 3.4 * rows),
                                squeeze=False)
    for ax in axes.flat[len(panels):]:
        ax.set_visible(False)
    for ax, (title, block) in zip(axes.flat, panels, strict=False):
        bound = float(np.abs(block).max()) or 1.0
        # Square cells, so a block's shape reads as (outputs, inputs) at a glance.
        image = ax.imshow(block, cmap="RdBu_r", vmin=-bound, vmax=bound, aspect="equal",
                          interpolation="nearest")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.yaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_title(f"{title} {block.shape[0]}x{block.shape[1]}", fontsize=8)
        ax.set_xlabel("input", fontsize=8)
        ax.set_ylabel("output", fontsize=8)
        ax.tick_params(labelsize=7)
        figure.colorbar(image, ax=ax, shrink=0.8)
    figure.suptitle(f"Jacobian blocks of sample {sample} (rows: outputs, columns: inputs)",
                    fontsize=10)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
