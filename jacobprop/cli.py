"""The `jacobprop` command.

Parsing is kept apart from doing: `build_parser` describes the command line,
`plan_from_args` turns parsed arguments into a validated `BenchPlan` and
`Output` (raising `UsageError` for anything the user got wrong), `run`
executes a plan and writes its outputs, and `main(argv) -> int` wires them
together and turns a `UsageError` into one line on stderr and exit code 2.
`jacobprop explain` and `jacobprop check` follow the same pattern with their
own plan (`plan_explain` / `plan_check`) and runner (`run_explain` /
`run_check`).
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import re
import shlex
import sys
from dataclasses import dataclass
from pathlib import Path

__all__ = ["main", "run", "build_parser", "plan_from_args", "Output", "UsageError",
           "ExplainPlan", "CheckPlan", "plan_explain", "plan_check", "run_explain",
           "run_check", "network_from_spec"]

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2
DTYPES = ("float64", "float32")

_EPILOG = """\
examples:
  jacobprop bench                          the default suite (under a minute), table on stdout
  jacobprop bench --suite targets --against torch --json benchmarks/targets.json
  jacobprop bench grad --batch 1,32,256 --width 16,128,1024 --plot grad.png
  jacobprop bench grad --activation Tanh --dtype float32 --against torch,jax
  jacobprop bench jacobian --batch 8 --width 64,256 --depth 3
  jacobprop bench gradcheck --batch 8 --width 64 --depth 3 --in-features 32 --against torch
  jacobprop bench train --parts digits,sine   training comparisons (digits needs scikit-learn)
  jacobprop bench cnn --against torch,jax  the CNN workload (NumPy im2col baseline, peers)
  jacobprop bench cnn --digits             train a CNN on scikit-learn's digits, 3 seeds
  jacobprop bench --print-schema           the JSON schema of --json output

exit codes: 0 done; 1 a benchmarked path raised an error; 2 bad usage.
"""


class UsageError(Exception):
    """Something the user typed is wrong; the message is the one line to print."""


class _Parser(argparse.ArgumentParser):
    """argparse, but errors become a `UsageError` instead of usage text and exit."""

    def error(self, message):
        raise UsageError(f"{self.prog}: {message}")


@dataclass
class Output:
    """Where the results go."""

    json_path: str | None = None
    plot_path: str | None = None
    quiet: bool = False


# ---- argument types -----------------------------------------------------------------
def _positive_ints(text: str) -> list[int]:
    values = []
    for item in text.split(","):
        item = item.strip()
        if not item.isdigit() or int(item) < 1:
            raise argparse.ArgumentTypeError(
                f"expected comma-separated positive integers, got {text!r}"
            )
        values.append(int(item))
    return values


def _positive_int(text: str) -> int:
    values = _positive_ints(text)
    if len(values) != 1:
        raise argparse.ArgumentTypeError(f"expected one positive integer, got {text!r}")
    return values[0]


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}")
    return value


def _names(text: str) -> list[str]:
    return [item.strip() for item in text.split(",") if item.strip()]


def _activations(text: str) -> list[str]:
    from .bench.models import activation_names

    known = activation_names()
    by_lower = {name.lower(): name for name in known}
    chosen = []
    for item in _names(text):
        if item.lower() not in by_lower:
            raise argparse.ArgumentTypeError(
                f"unknown activation {item!r} (choose from {', '.join(known)})"
            )
        chosen.append(by_lower[item.lower()])
    if not chosen:
        raise argparse.ArgumentTypeError("expected at least one activation name")
    return chosen


def _dtypes(text: str) -> list[str]:
    chosen = []
    for item in _names(text):
        if item.lower() not in DTYPES:
            raise argparse.ArgumentTypeError(
                f"unsupported dtype {item!r} (choose from {', '.join(DTYPES)})"
            )
        chosen.append(item.lower())
    if not chosen:
        raise argparse.ArgumentTypeError("expected at least one dtype")
    return chosen


def _peers(text: str) -> list[str]:
    from .bench.peers import PEERS

    chosen = _names(text)
    for item in chosen:
        if item not in PEERS:
            raise argparse.ArgumentTypeError(
                f"unknown peer {item!r} (choose from {', '.join(PEERS)})"
            )
    return chosen


# ---- the parser -------------------------------------------------------------------
_WORKLOAD_DEFAULTS = {
    "grad": {"batch": [32], "width": [128], "depth": [2]},
    "jacobian": {"batch": [8], "width": [64], "depth": [3]},
    "gradcheck": {"batch": [8], "width": [64], "depth": [3]},
    "ntk": {"batch": [64], "width": [128], "depth": [2]},
    "per-sample": {"batch": [256], "width": [128], "depth": [2]},
    "curvature": {"batch": [256], "width": [128], "depth": [2]},
}
#: Options of a workload (its grid); valid only after the workload name.
_GRID_OPTIONS = ("--batch", "--width", "--depth", "--activation", "--dtype", "--in-features",
                 "--classes")
_TRAIN_HELP = ("training: digits against scikit-learn's MLPClassifier, least_squares(lm) "
               "against Adam on a noisy sine, one SGD step against hand-written NumPy")
_WORKLOAD_HELP = {
    "grad": "loss + gradients by every path: NumPy reference, vjp, jacobian, dense "
            "jacobian, finite differences, peers",
    "jacobian": "full per-sample dy/dx (to_dense) by forward, reverse and auto product "
                "order (with the plan), peers jit(vmap(jacrev/jacfwd)) and torch.func",
    "ntk": "empirical NTK, full and traced, against a structured NumPy computation and "
           "the peers' Jacobian contraction",
    "per-sample": "per-sample gradients and their norms against a NumPy einsum, the batch "
                  "gradient and the peers' vmap(grad)",
    "curvature": "one GGN and one Hessian product (forward cached) against a NumPy product "
                 "and the peers' linearized products",
    "gradcheck": "the gradient checker's modes (full, fast, richardson, taylor), "
                 "torch.autograd.gradcheck as a peer",
}


def _common_options(suppress: bool) -> argparse.ArgumentParser:
    """Options valid both before and after the workload name.

    The copies after the workload default to SUPPRESS so they never overwrite
    a value given before it.
    """
    def default(value):
        return argparse.SUPPRESS if suppress else value

    parent = _Parser(add_help=False)
    group = parent.add_argument_group("measurement and output")
    group.add_argument("--repeats", type=_positive_int, default=default(None), metavar="N",
                       help="interleaved rounds per group (default: the suite's, 9 for "
                            "a workload)")
    group.add_argument("--budget", type=_positive_float, default=default(None), metavar="SEC",
                       help="rough timing budget per path and group; slower paths are timed "
                            "in fewer rounds, never fewer than 3 (default: the suite's, 1.0)")
    group.add_argument("--against", type=_peers, default=default([]), metavar="PEERS",
                       help="comma-separated optional peers: torch, jax, autograd, sklearn")
    group.add_argument("--json", dest="json_path", default=default(None), metavar="PATH",
                       help="write the results as JSON (see --print-schema)")
    group.add_argument("--plot", dest="plot_path", default=default(None), metavar="PATH",
                       help="write a PNG scaling plot (needs matplotlib: "
                            "pip install 'jacobprop[plot]')")
    group.add_argument("--quiet", "-q", action="store_true", default=default(False),
                       help="no progress bar and no table (use with --json)")
    group.add_argument("--max-dense-mb", type=_positive_float, default=default(256.0),
                       metavar="MB", help="skip the dense jacobian mode when one Kronecker "
                                          "weight block would exceed this (default 256)")
    group.add_argument("--fd-max-params", type=_positive_int, default=default(4000),
                       metavar="N", help="skip plain finite differences above N parameters "
                                         "(default 4000)")
    group.add_argument("--peer-threads", type=_positive_int, default=default(None),
                       metavar="N", help="torch's intra-op threads (default: torch's own)")
    group.add_argument("--seed", type=int, default=default(0),
                       help="seed of weights, inputs and labels (default 0)")
    return parent


def build_parser() -> argparse.ArgumentParser:
    """The full `jacobprop` command line."""
    from . import __version__
    from .bench.suites import SUITES

    parser = _Parser(
        prog="jacobprop",
        description="jacobprop: backpropagation made explicit. Commands: bench, explain, "
                    "check.",
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"jacobprop {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    bench = commands.add_parser(
        "bench",
        help="benchmark gradients, Jacobians and gradient checks",
        description="Benchmark jacobprop. Without a workload, run a suite (the default one "
                    "unless --suite says otherwise) and print a table.",
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        parents=[_common_options(suppress=False)],
    )
    bench.add_argument("--suite", choices=sorted(SUITES), default=None,
                       help="a named suite (default: 'default'); see --list-suites")
    bench.add_argument("--list-suites", action="store_true",
                       help="list the suites and exit")
    bench.add_argument("--print-schema", action="store_true",
                       help="print the JSON schema of --json output and exit")
    workloads = bench.add_subparsers(dest="workload", metavar="WORKLOAD", parser_class=_Parser)
    for name, defaults in _WORKLOAD_DEFAULTS.items():
        sub = workloads.add_parser(
            name, help=_WORKLOAD_HELP[name], description=_WORKLOAD_HELP[name],
            epilog=_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
            parents=[_common_options(suppress=True)],
        )
        grid = sub.add_argument_group("the grid (every combination is one group)")
        grid.add_argument("--batch", type=_positive_ints, default=defaults["batch"],
                          metavar="LIST", help=f"batch sizes (default {defaults['batch'][0]})")
        grid.add_argument("--width", type=_positive_ints, default=defaults["width"],
                          metavar="LIST", help=f"hidden widths (default {defaults['width'][0]})")
        grid.add_argument("--depth", type=_positive_ints, default=defaults["depth"],
                          metavar="LIST",
                          help=f"Dense layers (default {defaults['depth'][0]})")
        grid.add_argument("--activation", type=_activations, default=["ReLU"], metavar="LIST",
                          help="hidden activations, names from jacobprop.LAYERS "
                               "(default ReLU)")
        grid.add_argument("--dtype", type=_dtypes, default=["float64"], metavar="LIST",
                          help="float64 and/or float32 (default float64)")
        grid.add_argument("--in-features", type=_positive_int, default=None, metavar="N",
                          help="input width (default: the hidden width)")
        grid.add_argument("--classes", type=_positive_int, default=10, metavar="N",
                          help="output width / softmax classes (default 10)")
    _add_explain_and_check(commands)
    from .bench.train import add_arguments as add_train_arguments

    add_train_arguments(workloads.add_parser(
        "train", help=_TRAIN_HELP, description=_TRAIN_HELP, epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter))
    from .bench.cnn import add_parser as add_cnn_parser

    add_cnn_parser(workloads, [_common_options(suppress=True)])
    return parser


def _grid_option_before_workload(argv) -> str | None:
    """The first grid option typed between `bench` and the workload name, if any.

    argparse would take its value for the workload name ("invalid choice"), so
    `main` asks this when parsing failed, to say what was really wrong.
    """
    if "bench" not in argv:
        return None
    for token in argv[argv.index("bench") + 1:]:
        if token in _WORKLOAD_DEFAULTS:
            return None
        name = token.split("=", 1)[0]
        if name in _GRID_OPTIONS:
            return name
    return None


# ---- from arguments to a plan ----------------------------------------------------------
def _option(args, name, default=None):
    value = getattr(args, name, None)
    return default if value is None else value


def _check_writable(path: str, option: str, command: str = "jacobprop bench") -> None:
    target = Path(path)
    if target.is_dir():
        raise UsageError(f"{command}: {option} {path!r} is a directory, not a file")
    parent = target.parent
    if not parent.is_dir():
        raise UsageError(f"{command}: {option} {path!r}: directory {str(parent)!r} "
                         "does not exist")
    if not os.access(parent, os.W_OK) or (target.exists() and not os.access(target, os.W_OK)):
        raise UsageError(f"{command}: {option} {path!r} is not writable")


def plan_from_args(args, argv) -> tuple:
    """`(BenchPlan, Output)` from parsed arguments; raises `UsageError` on bad values."""
    from .bench.models import MLPSpec
    from .bench.runner import BenchPlan
    from .bench.suites import SUITES
    from .bench.workloads import Limits

    output = Output(_option(args, "json_path"), _option(args, "plot_path"),
                    bool(_option(args, "quiet", False)))
    if output.json_path is not None:
        _check_writable(output.json_path, "--json")
    if output.plot_path is not None:
        _check_writable(output.plot_path, "--plot")
        try:
            import matplotlib  # noqa: F401 - only probing that the extra is installed
        except ImportError:
            raise UsageError("jacobprop bench: --plot needs matplotlib, which is not "
                             "installed (pip install 'jacobprop[plot]')") from None
    limits = Limits(max_dense_bytes=int(_option(args, "max_dense_mb", 256.0) * 2**20),
                    fd_max_params=_option(args, "fd_max_params", 4000))
    workload = getattr(args, "workload", None)
    command = "jacobprop " + " ".join(shlex.quote(a) for a in argv)
    common = {
        "peers": tuple(_option(args, "against", [])),
        "limits": limits,
        "command": command.strip(),
        "seed": _option(args, "seed", 0),
        "peer_threads": _option(args, "peer_threads"),
    }
    if workload is None:
        suite = SUITES[args.suite or "default"]
        return BenchPlan(
            groups=list(suite.groups),
            repeats=_option(args, "repeats", suite.repeats),
            budget_seconds=_option(args, "budget", suite.budget_seconds),
            suite=args.suite or "default",
            **common,
        ), output
    if args.suite is not None:
        raise UsageError(f"jacobprop bench: --suite cannot be combined with the workload "
                         f"{workload!r}; give one or the other")
    groups = [
        (workload, MLPSpec(batch=b, width=w, depth=d, activation=a, dtype=t,
                           in_features=args.in_features, classes=args.classes), ())
        for b, w, d, a, t in itertools.product(args.batch, args.width, args.depth,
                                               args.activation, args.dtype)
    ]
    return BenchPlan(groups=groups, repeats=_option(args, "repeats", 9),
                     budget_seconds=_option(args, "budget", 1.0), **common), output


# ---- doing it ---------------------------------------------------------------------
def run(plan, output: Output, *, stdout=None, stderr=None) -> int:
    """Measure `plan`, print the table, write JSON and plot; return the exit code."""
    from .bench.report import format_report, write_plot
    from .bench.runner import run_bench

    stdout = sys.stdout if stdout is None else stdout
    stderr = sys.stderr if stderr is None else stderr
    progress = not output.quiet and hasattr(stderr, "isatty") and stderr.isatty()
    doc = run_bench(plan, stderr=stderr, progress=progress)
    if not output.quiet:
        stdout.write(format_report(doc))
    if output.json_path is not None:
        with open(output.json_path, "w", encoding="utf-8") as handle:
            json.dump(doc, handle, indent=1, allow_nan=False)
            handle.write("\n")
    if output.plot_path is not None:
        write_plot(doc, output.plot_path)
    errors = [row for row in doc["rows"] if row["status"] == "error"]
    for row in errors:
        print(f"error: {row['workload']} {row['path']}: {row['reason']}", file=stderr)
    return EXIT_FAILED if errors else EXIT_OK


def _print_suites(stdout) -> None:
    from .bench.suites import SUITES

    for name, suite in SUITES.items():
        stdout.write(f"{name}: {suite.description} ({suite.repeats} rounds)\n")
        for workload, spec, peers in suite.groups:
            extra = f"  + {', '.join(peers)}" if peers else ""
            stdout.write(f"  {workload:9s} {spec.label()}{extra}\n")


# ---- jacobprop explain and jacobprop check -------------------------------------------
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

_CHECK_EPILOG = """\
MODULE is an importable module (the current directory is searched first) or
a path to a .py file; CLASS a jacobprop.Layer subclass in it. The layer is
built by CLASS.example(input_dim, rng=...), which is CLASS() unless the class
overrides it, and checked by jacobprop.testing.assert_layer_correct on
--examples drawn inputs of 3 samples each.

examples:
  jacobprop check mylayers:Sine
  jacobprop check path/to/mylayers.py:Sine --input-dim 5 --examples 6 --seed 1
  jacobprop check mylayers:Sine --no-float32     for a layer keeping arrays outside params

exit codes: 0 every check passed; 1 a check failed; 2 bad usage.
"""

#: Conventional short loss names the registry's class names do not spell.
#: Every registered loss is also found by its class name and its capitals
#: (SoftmaxCrossEntropy: "sce"), so this holds only what those miss.
_LOSS_ALIASES = {"ce": "SoftmaxCrossEntropy"}


def _add_explain_and_check(commands) -> None:
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
    explain.add_argument("--batch", type=_positive_int, default=2, metavar="N",
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
    check = commands.add_parser(
        "check", help="check a layer class of your own against finite differences",
        description="Run jacobprop.testing.assert_layer_correct on MODULE:CLASS and print\n"
                    "every check with pass or fail.",
        epilog=_CHECK_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    check.add_argument("target", metavar="MODULE:CLASS")
    check.add_argument("--input-dim", type=_positive_int, default=None, metavar="N",
                       help="input width of the drawn inputs (default: the layer's own, else "
                            "2, 3 and 5 in turn); also passed to CLASS.example (default 3)")
    check.add_argument("--examples", type=_positive_int, default=3, metavar="N",
                       help="number of drawn inputs (default 3, at scales 0.5, 1 and 2)")
    check.add_argument("--seed", type=int, default=0,
                       help="seed of the layer, the inputs and the probe vectors (default 0)")
    check.add_argument("--float32", action=argparse.BooleanOptionalAction, default=True,
                       help="also check a float32 copy of the layer against float64 "
                            "(default on)")


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


@dataclass
class CheckPlan:
    """What `jacobprop check` runs: the user's layer and how to draw its inputs."""

    layer: object  # a jacobprop.Layer built by CLASS.example
    target: str  # "MODULE:CLASS" as typed
    input_dim: int | None = None
    examples: int = 3
    seed: int = 0
    float32: bool = True


def network_from_spec(spec: str, *, rng):
    """A `Sequential` from a spec such as "4-16-relu-3"; raises `UsageError` if malformed.

    Integers are widths, the first one the input's; a Dense layer joins two
    consecutive widths; a name is a parameter-free layer of `jacobprop.LAYERS`
    (case-insensitive) applied at the current width.
    """
    from . import LAYERS, Dense, Sequential
    from .bench.models import activation_names

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
    from . import io

    try:
        return io.load(path)
    except (OSError, ValueError) as error:  # ModelFileError is a ValueError
        raise UsageError(f"{where}: cannot load {path!r}: {error}") from None


def _loss_from_name(name: str):
    from . import LOSSES

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
            _check_writable(path, option, command)
    if args.plot_path is not None:
        try:
            import matplotlib  # noqa: F401 - only probing that the extra is installed
        except ImportError:
            raise UsageError(f"{command}: --plot needs matplotlib, which is not installed "
                             "(pip install 'jacobprop[plot]')") from None
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
    from .explain import explain, plot_jacobians

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


def _import_module(name: str):
    """The user's module by dotted name (the current directory first) or by .py path."""
    import importlib
    import importlib.util

    where = "jacobprop check"
    if name.endswith(".py") or os.sep in name or "/" in name:
        path = Path(name)
        if not path.is_file():
            raise UsageError(f"{where}: no such file {name!r}")
        spec = importlib.util.spec_from_file_location(path.stem, path)
        module = importlib.util.module_from_spec(spec)
        loader = spec.loader.exec_module
    else:
        module, loader = None, None
    # The console script, unlike `python -m`, does not put the current
    # directory on the path; a user's layer usually lives there.
    cwd = os.getcwd()
    added = cwd not in sys.path
    if added:
        sys.path.insert(0, cwd)
    try:
        if loader is not None:
            loader(module)
            return module
        return importlib.import_module(name)
    except ModuleNotFoundError as error:
        if error.name is not None and (name == error.name or name.startswith(error.name + ".")):
            raise UsageError(f"{where}: no such module {name!r}") from None
        raise UsageError(f"{where}: importing {name!r} failed: {error}") from None
    except Exception as error:  # the user's module raised while importing
        raise UsageError(f"{where}: importing {name!r} failed: {type(error).__name__}: "
                         f"{error}") from None
    finally:
        if added:
            sys.path.remove(cwd)


def plan_check(args) -> CheckPlan:
    """A `CheckPlan` from parsed arguments; raises `UsageError` for a bad MODULE:CLASS."""
    import numpy as np

    from .layers.base import Layer

    where = "jacobprop check"
    module_name, _, class_name = args.target.rpartition(":")
    if not module_name or not class_name:
        raise UsageError(f"{where}: expected MODULE:CLASS, e.g. mylayers:Sine; got "
                         f"{args.target!r}")
    module = _import_module(module_name)
    cls = getattr(module, class_name, None)
    if cls is None:
        raise UsageError(f"{where}: module {module_name!r} has no class {class_name!r}")
    if not (isinstance(cls, type) and issubclass(cls, Layer)):
        what = cls.__name__ if isinstance(cls, type) else type(cls).__name__
        raise UsageError(f"{where}: {args.target!r} is not a jacobprop Layer subclass (it is "
                         f"{'the class' if isinstance(cls, type) else 'a'} {what})")
    # Separate streams: the layer's weights do not shift when --examples changes.
    layer_seed, _ = np.random.SeedSequence(args.seed).spawn(2)
    width = args.input_dim or 3
    try:
        layer = cls.example(width, rng=np.random.default_rng(layer_seed))
    except Exception as error:  # the class cannot be built without the user's arguments
        raise UsageError(f"{where}: cannot build the layer: {class_name}.example({width}, "
                         f"rng=...) raised {type(error).__name__}: {error}; give the class an "
                         "`example(input_dim, *, rng, dtype)` classmethod") from None
    return CheckPlan(layer, args.target, args.input_dim, args.examples, args.seed, args.float32)


#: How the contract words a failure (`jacobprop.testing.contract`); the name of
#: the failed check, one of `jacobprop.testing.CHECKS`, is read back from it.
_CHECK_FAILED = re.compile(r"check '(.+?)' failed")


@dataclass
class _CheckRun:
    """What happened: per check, on how many inputs it passed; the failure, if any."""

    passed: dict
    failure: str | None = None
    failed_check: str | None = None  # None with a failure: the layer raised
    failed_input: int = 0  # 1-based


def _run_contract(plan: CheckPlan) -> _CheckRun:
    """`assert_layer_correct` on each drawn input, stopping at the first failure."""
    import numpy as np

    from .errors import GradcheckError
    from .testing import CHECKS, NoValidInput, assert_layer_correct, cast_layer, draw_input

    _, input_seed = np.random.SeedSequence(plan.seed).spawn(2)
    rng = np.random.default_rng(input_seed)
    run = _CheckRun(dict.fromkeys(CHECKS, 0))
    # The widths and scales assert_layer_correct draws on its own, in turn.
    widths, scales = (2, 3, 5), (0.5, 1.0, 2.0)
    for example in range(plan.examples):
        width = plan.input_dim if plan.input_dim is not None else widths[example % 3]
        try:
            # Drawn by the float64 copy the contract checks, clear of its kinks.
            x = draw_input(cast_layer(plan.layer, np.float64), 3, rng=rng, input_dim=width,
                           scale=scales[example % 3])
            assert_layer_correct(plan.layer, x, rng=rng, float32=plan.float32)
        except GradcheckError as error:
            run.failure = str(error)
            found = _CHECK_FAILED.search(run.failure)
            if found and found.group(1) in CHECKS:
                run.failed_check = found.group(1)
                # The contract runs its checks in CHECKS order and stops at the
                # first failure, so the ones before it passed on this input.
                for check in CHECKS[:CHECKS.index(run.failed_check)]:
                    run.passed[check] += 1
        except NoValidInput as error:
            run.failure = f"no input clear of the layer's kinks was found: {error}"
        except Exception as error:  # the user's layer crashed: a failure, not a traceback
            run.failure = f"{type(error).__name__}: {error}"
        if run.failure is not None:
            run.failed_input = example + 1
            return run
        for check in CHECKS:
            run.passed[check] += 1
    return run


def run_check(plan: CheckPlan, *, stdout=None) -> int:
    """Check the layer on each drawn input; print every check; 0 if all pass, else 1."""
    from .testing import CHECKS

    stdout = sys.stdout if stdout is None else stdout
    run = _run_contract(plan)
    total = plan.examples
    stdout.write(f"jacobprop check {plan.target}: {plan.layer!r}, {total} drawn inputs of "
                 f"3 samples, seed {plan.seed}\n")
    for check in CHECKS:
        passed = run.passed[check]
        if check == "float32 vs float64" and not plan.float32:
            word, detail = "skipped", "(--no-float32)"
        elif passed == total:
            word, detail = "ok", ""
            if check == "parameter jacobians vs finite differences" and not plan.layer.params:
                detail = "(no parameters)"
        elif check == run.failed_check:
            word, detail = "FAIL", f"on input {run.failed_input} of {total}"
        elif passed:
            word, detail = "ok", f"on {passed} of {total} inputs, then stopped at the failure"
        else:
            word, detail = "not run", ""
        stdout.write(f"  {word:8s} {check}" + (f"  {detail}" if detail else "") + "\n")
    if run.failure is None:
        stdout.write("all checks passed\n")
        return EXIT_OK
    if run.failed_check is None:
        stdout.write(f"  {'ERROR':8s} the layer raised while being checked on input "
                     f"{run.failed_input} of {total}\n")
    stdout.write(f"failed: {run.failure}\n")
    return EXIT_FAILED


_COMMANDS = {"explain": (plan_explain, run_explain), "check": (plan_check, run_check)}


def main(argv=None) -> int:
    """Entry point of the `jacobprop` console script; returns the exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    try:
        try:
            args = parser.parse_args(argv)
        except SystemExit as exit_:  # --help and --version end parsing on purpose
            return int(exit_.code or 0)
        except UsageError:
            option = _grid_option_before_workload(argv)
            if option is None:
                raise
            raise UsageError(
                f"jacobprop bench: {option} is an option of a workload; give it after the "
                f"workload name ({', '.join(_WORKLOAD_DEFAULTS)}), e.g. "
                f"'jacobprop bench grad {option} ...'"
            ) from None
        if args.command is None:
            raise UsageError("jacobprop: choose a command (bench, explain, check); see "
                             "jacobprop --help")
        if args.command in _COMMANDS:
            plan_command, run_command = _COMMANDS[args.command]
            plan, output = plan_command(args), None
        elif args.print_schema:
            from .bench.schema import SCHEMA

            sys.stdout.write(json.dumps(SCHEMA, indent=1) + "\n")
            return EXIT_OK
        elif args.list_suites:
            _print_suites(sys.stdout)
            return EXIT_OK
        elif args.workload == "cnn":  # its own runner, not a grid
            from .bench.cnn import main_cnn

            return main_cnn(args)
        elif args.workload == "train":  # its own runner, not a grid
            from .bench.train import run_from_args

            return run_from_args(args, "jacobprop " + shlex.join(argv), stdout=sys.stdout,
                                 stderr=sys.stderr)
        else:
            plan, output = plan_from_args(args, argv)
    except UsageError as error:
        print(f"{error} (see --help)", file=sys.stderr)
        return EXIT_USAGE
    if args.command in _COMMANDS:
        return run_command(plan)
    return run(plan, output)


if __name__ == "__main__":  # pragma: no cover - `python -m jacobprop.cli`
    sys.exit(main())
