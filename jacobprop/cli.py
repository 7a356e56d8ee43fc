"""The `jacobprop` command.

Parsing is kept apart from doing: `build_parser` describes the command line,
`plan_from_args` turns parsed arguments into a validated `BenchPlan` and
`Output` (raising `UsageError` for anything the user got wrong), `run`
executes a plan and writes its outputs, and `main(argv) -> int` wires them
together and turns a `UsageError` into one line on stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import shlex
import sys
from dataclasses import dataclass
from pathlib import Path

__all__ = ["main", "run", "build_parser", "plan_from_args", "Output", "UsageError"]

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
}
#: Options of a workload (its grid); valid only after the workload name.
_GRID_OPTIONS = ("--batch", "--width", "--depth", "--activation", "--dtype", "--in-features",
                 "--classes")
_WORKLOAD_HELP = {
    "grad": "loss + gradients by every path: NumPy reference, vjp, jacobian, dense "
            "jacobian, finite differences, peers",
    "jacobian": "full per-sample dy/dx by forward, reverse and auto product order",
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
        description="jacobprop: backpropagation made explicit. Commands: bench.",
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


def _check_writable(path: str, option: str) -> None:
    target = Path(path)
    if target.is_dir():
        raise UsageError(f"jacobprop bench: {option} {path!r} is a directory, not a file")
    parent = target.parent
    if not parent.is_dir():
        raise UsageError(f"jacobprop bench: {option} {path!r}: directory {str(parent)!r} "
                         "does not exist")
    if not os.access(parent, os.W_OK) or (target.exists() and not os.access(target, os.W_OK)):
        raise UsageError(f"jacobprop bench: {option} {path!r} is not writable")


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
    if plan.peers and all(workload == "jacobian" for workload, _, _ in plan.groups):
        print("note: peers have no jacobian workload; --against is ignored here", file=stderr)
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
            raise UsageError("jacobprop: choose a command (bench); see jacobprop --help")
        if args.print_schema:
            from .bench.schema import SCHEMA

            sys.stdout.write(json.dumps(SCHEMA, indent=1) + "\n")
            return EXIT_OK
        if args.list_suites:
            _print_suites(sys.stdout)
            return EXIT_OK
        if getattr(args, "workload", None) == "cnn":
            from .bench.cnn import main_cnn

            return main_cnn(args)
        plan, output = plan_from_args(args, argv)
    except UsageError as error:
        print(f"{error} (see --help)", file=sys.stderr)
        return EXIT_USAGE
    return run(plan, output)


if __name__ == "__main__":  # pragma: no cover - `python -m jacobprop.cli`
    sys.exit(main())
