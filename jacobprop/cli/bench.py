"""`jacobprop bench`: its parser, the plans of its workloads and their runners.

A grid workload (grad, jacobian, ...) or a suite becomes a `BenchPlan` and an
`Output` (`plan_from_args`), measured by `run`. `train` and `cnn` are not
grids: each has its own options, plan and runner, registered once in `RUNNERS`.
`plan_command` picks one of them and returns `(run, plan)` for `main`.
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import NamedTuple

from .base import (
    DTYPES,
    EXIT_FAILED,
    EXIT_OK,
    Parser,
    UsageError,
    check_writable,
    command_line,
    names,
    positive_float,
    positive_int,
    positive_ints,
    require_matplotlib,
)

__all__ = ["EPILOG", "Output", "add_parser", "grid_option_hint", "plan_command",
           "plan_from_args", "run", "TrainPlan", "plan_train", "run_train", "CNNPlan",
           "plan_cnn", "run_cnn", "Workload", "RUNNERS"]

EPILOG = """\
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


@dataclass
class Output:
    """Where the results go."""

    json_path: str | None = None
    plot_path: str | None = None
    quiet: bool = False


# ---- argument types -----------------------------------------------------------------
def _activations(text: str) -> list[str]:
    from ..bench.models import activation_names

    known = activation_names()
    by_lower = {name.lower(): name for name in known}
    chosen = []
    for item in names(text):
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
    for item in names(text):
        if item.lower() not in DTYPES:
            raise argparse.ArgumentTypeError(
                f"unsupported dtype {item!r} (choose from {', '.join(DTYPES)})"
            )
        chosen.append(item.lower())
    if not chosen:
        raise argparse.ArgumentTypeError("expected at least one dtype")
    return chosen


def _peers(text: str) -> list[str]:
    from ..bench.peers import PEERS

    chosen = names(text)
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
_TRAIN_HELP = ("training: digits against scikit-learn's MLPClassifier, least_squares(lm) "
               "against Adam on a noisy sine, one SGD step against hand-written NumPy")
_CNN_HELP = ("small CNN and CIFAR-sized CNN: loss + gradients vs a NumPy im2col baseline and "
             "peers; --digits trains on scikit-learn's digits")


def _common_options(suppress: bool) -> argparse.ArgumentParser:
    """Options valid both before and after the workload name.

    The copies after the workload default to SUPPRESS so they never overwrite
    a value given before it.
    """
    def default(value):
        return argparse.SUPPRESS if suppress else value

    parent = Parser(add_help=False)
    group = parent.add_argument_group("measurement and output")
    group.add_argument("--repeats", type=positive_int, default=default(None), metavar="N",
                       help="interleaved rounds per group (default: the suite's, 9 for "
                            "a workload)")
    group.add_argument("--budget", type=positive_float, default=default(None), metavar="SEC",
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
    group.add_argument("--max-dense-mb", type=positive_float, default=default(256.0),
                       metavar="MB", help="skip the dense jacobian mode when one Kronecker "
                                          "weight block would exceed this (default 256)")
    group.add_argument("--fd-max-params", type=positive_int, default=default(4000),
                       metavar="N", help="skip plain finite differences above N parameters "
                                         "(default 4000)")
    group.add_argument("--peer-threads", type=positive_int, default=default(None),
                       metavar="N", help="torch's intra-op threads (default: torch's own)")
    group.add_argument("--seed", type=int, default=default(0),
                       help="seed of weights, inputs and labels (default 0)")
    return parent


def _workload_parser(workloads, name: str, help_text: str, parents=()):
    return workloads.add_parser(
        name, help=help_text, description=help_text, epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter, parents=list(parents),
    )


def _add_grid_arguments(sub, defaults: dict) -> None:
    grid = sub.add_argument_group("the grid (every combination is one group)")
    grid.add_argument("--batch", type=positive_ints, default=defaults["batch"],
                      metavar="LIST", help=f"batch sizes (default {defaults['batch'][0]})")
    grid.add_argument("--width", type=positive_ints, default=defaults["width"],
                      metavar="LIST", help=f"hidden widths (default {defaults['width'][0]})")
    grid.add_argument("--depth", type=positive_ints, default=defaults["depth"],
                      metavar="LIST", help=f"Dense layers (default {defaults['depth'][0]})")
    grid.add_argument("--activation", type=_activations, default=["ReLU"], metavar="LIST",
                      help="hidden activations, names from jacobprop.LAYERS (default ReLU)")
    grid.add_argument("--dtype", type=_dtypes, default=["float64"], metavar="LIST",
                      help="float64 and/or float32 (default float64)")
    grid.add_argument("--in-features", type=positive_int, default=None, metavar="N",
                      help="input width (default: the hidden width)")
    grid.add_argument("--classes", type=positive_int, default=10, metavar="N",
                      help="output width / softmax classes (default 10)")


def _add_train_arguments(parser) -> None:
    from ..bench.train import PARTS

    parser.add_argument("--seeds", type=positive_int, default=5, metavar="N",
                        help="seeds (splits, initial weights, shuffling) per comparison "
                             "(default 5)")
    parser.add_argument("--epochs", type=positive_int, default=200, metavar="N",
                        help="digits epochs for both libraries (default 200, "
                             "MLPClassifier's max_iter default)")
    parser.add_argument("--adam-steps", type=positive_int, default=5000, metavar="N",
                        help="full-batch Adam steps on the noisy sine (default 5000)")
    parser.add_argument("--step-repeats", type=positive_int, default=15, metavar="N",
                        help="interleaved rounds of the step timing (default 15)")
    parser.add_argument("--parts", default=",".join(PARTS), metavar="LIST",
                        help="which parts to run: digits, sine, step, optim (the optimizers "
                             "against torch.optim, when torch is installed; default: all)")
    parser.add_argument("--json", dest="json_path", default=None, metavar="PATH",
                        help="also write the results as JSON (a document of its own shape, "
                             "not the --print-schema one)")
    parser.add_argument("--quiet", "-q", action="store_true",
                        help="no per-seed progress lines on stderr")


def _add_cnn_arguments(parser) -> None:
    parser.add_argument("--config", default="small,cifar", metavar="LIST",
                        help="configurations: small (1x8x8, B=32,256), cifar (3x32x32, B=64)")
    parser.add_argument("--dtype", default="float64,float32", metavar="LIST",
                        help="float64 and/or float32 (default both)")
    parser.add_argument("--digits", action="store_true",
                        help="train on scikit-learn's digits (3 seeds) instead of timing")
    parser.add_argument("--epochs", type=positive_int, default=30, help="epochs of the digits run")


def add_parser(commands) -> None:
    """Register `jacobprop bench` and its workloads on the top-level sub-parsers."""
    from ..bench.suites import SUITES

    bench = commands.add_parser(
        "bench",
        help="benchmark gradients, Jacobians and gradient checks",
        description="Benchmark jacobprop. Without a workload, run a suite (the default one "
                    "unless --suite says otherwise) and print a table.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        parents=[_common_options(suppress=False)],
    )
    bench.add_argument("--suite", choices=sorted(SUITES), default=None,
                       help="a named suite (default: 'default'); see --list-suites")
    bench.add_argument("--list-suites", action="store_true",
                       help="list the suites and exit")
    bench.add_argument("--print-schema", action="store_true",
                       help="print the JSON schema of --json output and exit")
    workloads = bench.add_subparsers(dest="workload", metavar="WORKLOAD", parser_class=Parser)
    for name, defaults in _WORKLOAD_DEFAULTS.items():
        _add_grid_arguments(_workload_parser(workloads, name, _WORKLOAD_HELP[name],
                                             [_common_options(suppress=True)]), defaults)
    for name, workload in RUNNERS.items():
        parents = [_common_options(suppress=True)] if workload.common_options else []
        workload.add_arguments(_workload_parser(workloads, name, workload.help, parents))


def grid_option_hint(argv) -> UsageError | None:
    """The error to show instead when a grid option was typed before the workload name.

    argparse would take its value for the workload name ("invalid choice"), so
    `main` asks this when parsing failed, to say what was really wrong.
    """
    if "bench" not in argv:
        return None
    for token in argv[argv.index("bench") + 1:]:
        if token in _WORKLOAD_DEFAULTS:
            return None
        option = token.split("=", 1)[0]
        if option in _GRID_OPTIONS:
            return UsageError(
                f"jacobprop bench: {option} is an option of a workload; give it after the "
                f"workload name ({', '.join(_WORKLOAD_DEFAULTS)}), e.g. "
                f"'jacobprop bench grad {option} ...'"
            )
    return None


# ---- from arguments to a plan ----------------------------------------------------------
def _option(args, name, default=None):
    value = getattr(args, name, None)
    return default if value is None else value


def plan_from_args(args, argv) -> tuple:
    """`(BenchPlan, Output)` from parsed arguments; raises `UsageError` on bad values."""
    from ..bench.models import MLPSpec
    from ..bench.runner import BenchPlan
    from ..bench.suites import SUITES
    from ..bench.workloads import Limits

    output = Output(_option(args, "json_path"), _option(args, "plot_path"),
                    bool(_option(args, "quiet", False)))
    if output.json_path is not None:
        check_writable(output.json_path, "--json")
    if output.plot_path is not None:
        check_writable(output.plot_path, "--plot")
        require_matplotlib("jacobprop bench")
    limits = Limits(max_dense_bytes=int(_option(args, "max_dense_mb", 256.0) * 2**20),
                    fd_max_params=_option(args, "fd_max_params", 4000))
    workload = getattr(args, "workload", None)
    common = {
        "peers": tuple(_option(args, "against", [])),
        "limits": limits,
        "command": command_line(argv),
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


def _write_json(path: str, doc: dict) -> None:
    with open(path, "w", encoding="utf-8") as handle:
        json.dump(doc, handle, indent=1, allow_nan=False)
        handle.write("\n")


# ---- doing it ---------------------------------------------------------------------
def run(plan, output: Output, *, stdout=None, stderr=None) -> int:
    """Measure `plan`, print the table, write JSON and plot; return the exit code."""
    from ..bench.report import format_report, write_plot
    from ..bench.runner import run_bench

    stdout = sys.stdout if stdout is None else stdout
    stderr = sys.stderr if stderr is None else stderr
    progress = not output.quiet and hasattr(stderr, "isatty") and stderr.isatty()
    doc = run_bench(plan, stderr=stderr, progress=progress)
    if not output.quiet:
        stdout.write(format_report(doc))
    if output.json_path is not None:
        _write_json(output.json_path, doc)
    if output.plot_path is not None:
        write_plot(doc, output.plot_path)
    errors = [row for row in doc["rows"] if row["status"] == "error"]
    for row in errors:
        print(f"error: {row['workload']} {row['path']}: {row['reason']}", file=stderr)
    return EXIT_FAILED if errors else EXIT_OK


def _suites_text() -> str:
    from ..bench.suites import SUITES

    lines = []
    for name, suite in SUITES.items():
        lines.append(f"{name}: {suite.description} ({suite.repeats} rounds)\n")
        for workload, spec, peers in suite.groups:
            extra = f"  + {', '.join(peers)}" if peers else ""
            lines.append(f"  {workload:9s} {spec.label()}{extra}\n")
    return "".join(lines)


def _schema_text() -> str:
    from ..bench.schema import SCHEMA

    return json.dumps(SCHEMA, indent=1) + "\n"


def _print_text(text: str, *, stdout=None) -> int:
    (sys.stdout if stdout is None else stdout).write(text)
    return EXIT_OK


# ---- bench train ----------------------------------------------------------------------
@dataclass
class TrainPlan:
    """What `jacobprop bench train` runs and where its results go."""

    options: object  # a jacobprop.bench.train.TrainOptions
    command: str
    json_path: str | None = None
    quiet: bool = False


def plan_train(args, argv) -> TrainPlan:
    """A `TrainPlan` from parsed arguments; raises `UsageError` on bad values."""
    from ..bench.train import PARTS, TrainOptions

    parts = names(args.parts)
    unknown = sorted(set(parts) - set(PARTS))
    if unknown or not parts:
        raise UsageError(f"jacobprop bench train: --parts must name some of "
                         f"{', '.join(PARTS)}; got {args.parts!r}")
    if args.json_path is not None:
        check_writable(args.json_path, "--json")
    options = TrainOptions(seeds=args.seeds, epochs=args.epochs, adam_steps=args.adam_steps,
                           repeats=args.step_repeats, parts=parts)
    return TrainPlan(options, command_line(argv), args.json_path, args.quiet)


def run_train(plan: TrainPlan, *, stdout=None, stderr=None) -> int:
    """Run the training comparisons, print the report, write JSON; return the exit code."""
    from ..bench.train import format_train_report, run_train_bench

    stdout = sys.stdout if stdout is None else stdout
    stderr = sys.stderr if stderr is None else stderr

    def log(line):
        if not plan.quiet:
            print(line, file=stderr, flush=True)

    doc = run_train_bench(plan.options, command=plan.command, log=log)
    stdout.write(format_train_report(doc))
    if plan.json_path is not None:
        _write_json(plan.json_path, doc)
    return EXIT_OK


# ---- bench cnn ------------------------------------------------------------------------
@dataclass
class CNNPlan:
    """What `jacobprop bench cnn` runs: the timing grid, or the digits training run."""

    configs: list
    dtypes: list
    peers: tuple = ()
    without_workload: tuple = ()  # peers asked for that have no cnn workload
    repeats: int = 9
    budget: float = 1.0
    seed: int = 0
    peer_threads: int | None = None
    digits: bool = False
    epochs: int = 30


def plan_cnn(args, argv) -> CNNPlan:
    """A `CNNPlan` from parsed arguments; raises `UsageError` on bad values."""
    from ..bench.cnn import CNN_PEERS, CONFIGS

    if _option(args, "json_path") or _option(args, "plot_path"):
        raise UsageError("jacobprop bench cnn: --json and --plot follow the schema of the MLP "
                         "workloads, which the cnn rows do not fit yet; redirect the table "
                         "instead (> cnn.txt)")
    configs, dtypes = names(args.config), names(args.dtype)
    if not args.digits:
        for name in configs:
            if name not in CONFIGS:
                raise UsageError(f"jacobprop bench cnn: unknown --config {name!r} "
                                 f"(choose from {', '.join(CONFIGS)})")
        for name in dtypes:
            if name not in DTYPES:
                raise UsageError(f"jacobprop bench cnn: unsupported --dtype {name!r}")
    against = _option(args, "against", [])
    return CNNPlan(
        configs, dtypes,
        peers=tuple(name for name in against if name in CNN_PEERS),
        without_workload=tuple(name for name in against if name not in CNN_PEERS),
        repeats=_option(args, "repeats", 9), budget=_option(args, "budget", 1.0),
        seed=_option(args, "seed", 0), peer_threads=_option(args, "peer_threads"),
        digits=args.digits, epochs=args.epochs,
    )


def run_cnn(plan: CNNPlan, *, stdout=None, stderr=None) -> int:
    """Time the CNN configurations (or train on digits); return the exit code."""
    from ..bench.cnn import run_cnn as run_cnn_table
    from ..bench.cnn import run_digits
    from ..bench.peers import PeerMissing, set_peer_threads

    stdout = sys.stdout if stdout is None else stdout
    stderr = sys.stderr if stderr is None else stderr
    if plan.digits:
        try:
            run_digits(epochs=plan.epochs, stdout=stdout)
        except PeerMissing as error:  # scikit-learn is found missing only on import
            raise UsageError(f"jacobprop bench cnn --digits: {error}") from None
        return EXIT_OK
    for name in plan.without_workload:
        print(f"peer {name!r} has no cnn workload (torch and jax do); skipping", file=stderr)
    set_peer_threads(plan.peers, plan.peer_threads)
    rows = run_cnn_table(plan.configs, plan.dtypes, plan.peers, repeats=plan.repeats,
                         budget=plan.budget, seed=plan.seed, stdout=stdout)
    return EXIT_FAILED if any("error" in row for row in rows) else EXIT_OK


# ---- which runner -----------------------------------------------------------------------
class Workload(NamedTuple):
    """A workload with options, a plan and a runner of its own (not a grid of MLPs)."""

    help: str
    add_arguments: Callable  # (parser) -> None
    plan: Callable  # (args, argv) -> plan; raises UsageError
    run: Callable  # (plan) -> exit code
    common_options: bool  # also takes the measurement and output options


#: The workloads that are not grids, each registered once: parser, plan and runner.
RUNNERS = {
    "train": Workload(_TRAIN_HELP, _add_train_arguments, plan_train, run_train, False),
    "cnn": Workload(_CNN_HELP, _add_cnn_arguments, plan_cnn, run_cnn, True),
}


def plan_command(args, argv) -> tuple:
    """`(run, plan)` for `jacobprop bench ...`; `run(plan)` returns the exit code."""
    if args.print_schema:
        return _print_text, _schema_text()
    if args.list_suites:
        return _print_text, _suites_text()
    if args.workload in RUNNERS:
        workload = RUNNERS[args.workload]
        return workload.run, workload.plan(args, argv)
    plan, output = plan_from_args(args, argv)
    return partial(run, output=output), plan
