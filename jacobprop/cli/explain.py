"""`jacobprop explain`: build or load a small stack and print its chain rule.

`plan_explain` turns parsed arguments into an `ExplainPlan` (raising
`UsageError` for anything the user got wrong); `run_explain` prints the trace
and writes its JSON and picture.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path

from .base import EXIT_OK, UsageError, check_writable, positive_int, require_matplotlib

__all__ = ["ExplainPlan", "add_parser", "network_from_spec", "plan_explain", "run_explain",
           "plan_command"]

_EXPLAIN_EPILOG = """\
SPEC is a stack in one word: integers are widths (a Dense layer between two
consecutive ones), names are parameter-free layers from jacobprop.LAYERS.
A model saved by jp.save (.npz) works too.

examples:
  jacobprop explain 4-16-relu-3 --loss ce --batch 2     the backward pass of a loss
  jacobprop explain 4-16-relu-3                         the full Jacobian dy/dx and its plan
  jacobprop explain 3-4-tanh-2 --loss mse --batch 1 --values
  jacobprop explain 4-16-relu-3 --plot jacobians.png --json trace.json

exit codes: 0 done; 2 bad usage.
"""

#: Conventional short loss names the registry's class names do not spell.
#: Every registered loss is also found by its class name and its capitals
#: (SoftmaxCrossEntropy: "sce"), so this holds only what those miss.
_LOSS_ALIASES = {"ce": "SoftmaxCrossEntropy"}


def add_parser(commands) -> None:
    """Register `jacobprop explain` on the top-level sub-parsers."""
    explain = commands.add_parser(
        "explain", help="print the chain rule of a small stack: every Jacobian of the "
                        "backward pass, its structure, storage and flops",
        description="Build a stack from SPEC (or load a saved one), run one batch and print\n"
                    "the backward pass of --loss step by step (without --loss: the full\n"
                    "Jacobian dy/dx and the order the engine multiplies it in).",
        epilog=_EXPLAIN_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    explain.add_argument("spec", metavar="SPEC", help="e.g. 4-16-relu-3, or a saved .npz")
    explain.add_argument("--loss", default=None, metavar="NAME",
                         help="trace the gradient of this loss: ce, mse, rmse, bce or a class "
                              "name from jacobprop.LOSSES (default: trace dy/dx)")
    explain.add_argument("--batch", type=positive_int, default=2, metavar="N",
                         help="samples in the batch (default 2)")
    explain.add_argument("--seed", type=int, default=0,
                         help="seed of weights, input and target (default 0)")
    explain.add_argument("--values", action="store_true",
                         help="also print the matrices of sample 0 (keep the stack tiny)")
    explain.add_argument("--json", dest="json_path", default=None, metavar="PATH",
                         help="write the trace as JSON (jacobprop.explain.Trace.from_json "
                              "reads it back)")
    explain.add_argument("--plot", dest="plot_path", default=None, metavar="PATH",
                         help="write heatmaps of every layer's Jacobian block for sample 0 "
                              "and of their product (needs matplotlib: "
                              "pip install 'jacobprop[plot]')")
@dataclass
class ExplainPlan:
    """What `jacobprop explain` runs: a network, one batch, and where the results go."""

    net: object  # a jacobprop.Sequential
    x: object  # (B, n) input
    t: object = None  # target, with `loss`
    loss: object = None  # a jacobprop.Loss, or None for the Jacobian trace
    values: bool = False
    json_path: str | None = None
    plot_path: str | None = None


def network_from_spec(spec: str, *, rng):
    """A `Sequential` from a spec such as "4-16-relu-3"; raises `UsageError` if malformed.

    Integers are widths, the first one the input's; a Dense layer joins two
    consecutive widths; a name is a parameter-free layer of `jacobprop.LAYERS`
    (case-insensitive) applied at the current width.
    """
    from .. import LAYERS, Dense, Sequential
    from ..bench.models import activation_names

    where = "jacobprop explain"
    tokens = spec.split("-")
    if not tokens[0].isdigit() or int(tokens[0]) < 1:
        raise UsageError(f"{where}: SPEC must start with the input width, e.g. 4-16-relu-3; "
                         f"got {spec!r}")
    names = {name.lower(): name for name in activation_names()}
    width, layers = int(tokens[0]), []
    for token in tokens[1:]:
        if token.isdigit() and int(token) >= 1:
            layers.append(Dense(width, int(token), rng=rng))
            width = int(token)
        elif token.lower() in names:
            layers.append(LAYERS[names[token.lower()]]())
        else:
            raise UsageError(f"{where}: {token!r} in SPEC {spec!r} is neither a positive "
                             f"width nor a layer name ({', '.join(names.values())})")
    if not layers:
        raise UsageError(f"{where}: SPEC {spec!r} has no layer; give at least two widths, "
                         "e.g. 4-3")
    return Sequential(*layers)


def _load_network(path: str):
    """A model saved by `jp.save`."""
    where = "jacobprop explain"
    if not Path(path).is_file():
        raise UsageError(f"{where}: no such file {path!r}")
    from .. import io

    try:
        return io.load(path)
    except (OSError, ValueError) as error:  # ModelFileError is a ValueError
        raise UsageError(f"{where}: cannot load {path!r}: {error}") from None


def _loss_from_name(name: str):
    from .. import LOSSES

    known = {}
    for class_name in LOSSES:
        known[class_name.lower()] = class_name
        known["".join(c for c in class_name if c.isupper()).lower()] = class_name
    known.update({alias: target for alias, target in _LOSS_ALIASES.items() if target in LOSSES})
    if name.lower() not in known:
        raise UsageError(f"jacobprop explain: unknown loss {name!r} (choose from "
                         f"{', '.join(sorted(known))})")
    return LOSSES[known[name.lower()]]()


def plan_explain(args) -> ExplainPlan:
    """An `ExplainPlan` from parsed arguments; raises `UsageError` on bad values."""
    import numpy as np

    command = "jacobprop explain"
    for path, option in ((args.json_path, "--json"), (args.plot_path, "--plot")):
        if path is not None:
            check_writable(path, option, command)
    if args.plot_path is not None:
        require_matplotlib(command)
    rng = np.random.default_rng(args.seed)
    if args.spec.endswith(".npz"):
        net = _load_network(args.spec)
    else:
        net = network_from_spec(args.spec, rng=rng)
    width = net.input_dim
    if width is None:
        raise UsageError(f"{command}: the network {args.spec!r} does not fix its input width")
    x = rng.standard_normal((args.batch, width))
    loss = t = None
    if args.loss is not None:
        loss = _loss_from_name(args.loss)
        t = loss.example_target((args.batch, net.output_dim(width)), rng=rng)
    return ExplainPlan(net, x, t, loss, args.values, args.json_path, args.plot_path)


def run_explain(plan: ExplainPlan, *, stdout=None) -> int:
    """Print the trace, write JSON and the picture; return the exit code."""
    from ..explain import explain, plot_jacobians

    stdout = sys.stdout if stdout is None else stdout
    trace = explain(plan.net, plan.x, plan.t, plan.loss, values=plan.values)
    stdout.write(str(trace))
    if plan.json_path is not None:
        with open(plan.json_path, "w", encoding="utf-8") as handle:
            handle.write(trace.to_json(indent=1) + "\n")
    if plan.plot_path is not None:
        plot_jacobians(plan.net, plan.x, plan.plot_path)
        stdout.write(f"wrote {plan.plot_path}\n")
    return EXIT_OK


def plan_command(args, argv) -> tuple:
    """`(run, plan)` for `jacobprop explain ...`; `run(plan)` returns the exit code."""
    return run_explain, plan_explain(args)
