"""The `jacobprop` command.

Parsing is kept apart from doing. `build_parser` describes the command line;
each command's module (`bench`, `explain`, `check`) adds its sub-parser and
has a `plan_command(args, argv) -> (run, plan)` that turns parsed arguments
into a validated plan (raising `UsageError` for anything the user got wrong)
and names the runner that executes it. `main(argv) -> int` wires them
together and turns a `UsageError` into one line on stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import sys

from . import bench, check, explain
from .base import EXIT_FAILED, EXIT_OK, EXIT_USAGE, Parser, UsageError
from .bench import Output, plan_from_args, run
from .check import CheckPlan, plan_check, run_check
from .explain import ExplainPlan, network_from_spec, plan_explain, run_explain

__all__ = ["main", "run", "build_parser", "plan_from_args", "Output", "UsageError",
           "ExplainPlan", "CheckPlan", "plan_explain", "plan_check", "run_explain",
           "run_check", "network_from_spec", "EXIT_OK", "EXIT_FAILED", "EXIT_USAGE"]

#: Command name -> its module; each has `add_parser(commands)` and
#: `plan_command(args, argv) -> (run, plan)`.
_COMMANDS = {"bench": bench, "explain": explain, "check": check}


def build_parser() -> argparse.ArgumentParser:
    """The full `jacobprop` command line."""
    from .. import __version__

    parser = Parser(
        prog="jacobprop",
        description="jacobprop: backpropagation made explicit. Commands: "
                    f"{', '.join(_COMMANDS)}.",
        epilog=bench.EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"jacobprop {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=Parser)
    for module in _COMMANDS.values():
        module.add_parser(commands)
    return parser


def _parse(argv: list[str]):
    """Parsed arguments; raises `UsageError`, and `SystemExit` for --help and --version."""
    try:
        args = build_parser().parse_args(argv)
    except UsageError:
        hint = bench.grid_option_hint(argv)
        if hint is None:
            raise
        raise hint from None
    if args.command is None:
        raise UsageError(f"jacobprop: choose a command ({', '.join(_COMMANDS)}); see "
                         "jacobprop --help")
    return args


def main(argv=None) -> int:
    """Entry point of the `jacobprop` console script; returns the exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        try:
            args = _parse(argv)
        except SystemExit as exit_:  # --help and --version end parsing on purpose
            return int(exit_.code or 0)
        run_command, plan = _COMMANDS[args.command].plan_command(args, argv)
        # A runner raises UsageError only for what it alone can find out, such
        # as an optional dependency missing on import.
        return run_command(plan)
    except UsageError as error:
        print(f"{error} (see --help)", file=sys.stderr)
        return EXIT_USAGE

