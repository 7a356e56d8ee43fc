"""What every `jacobprop` command shares: the usage error, the parser that raises
it, exit codes, argument types and the checks of output paths."""

from __future__ import annotations

import argparse
import os
import shlex
from pathlib import Path

__all__ = ["EXIT_OK", "EXIT_FAILED", "EXIT_USAGE", "DTYPES", "UsageError", "Parser",
           "positive_ints", "positive_int", "positive_float", "names", "check_writable",
           "require_matplotlib", "command_line"]

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2
DTYPES = ("float64", "float32")


class UsageError(Exception):
    """Something the user typed is wrong; the message is the one line to print."""


class Parser(argparse.ArgumentParser):
    """argparse, but errors become a `UsageError` instead of usage text and exit."""

    def error(self, message):
        raise UsageError(f"{self.prog}: {message}")


# ---- argument types -----------------------------------------------------------------
def positive_ints(text: str) -> list[int]:
    values = []
    for item in text.split(","):
        item = item.strip()
        if not item.isdigit() or int(item) < 1:
            raise argparse.ArgumentTypeError(
                f"expected comma-separated positive integers, got {text!r}"
            )
        values.append(int(item))
    return values


def positive_int(text: str) -> int:
    item = text.strip()
    if not item.isdigit() or int(item) < 1:
        raise argparse.ArgumentTypeError(f"expected one positive integer, got {text!r}")
    return int(item)


def positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}")
    return value


def names(text: str) -> list[str]:
    """The non-empty items of a comma-separated list."""
    return [item.strip() for item in text.split(",") if item.strip()]


# ---- output paths -------------------------------------------------------------------
def check_writable(path: str, option: str, command: str = "jacobprop bench") -> None:
    """Raise `UsageError` unless `path` can be written as a file, before any work."""
    target = Path(path)
    if target.is_dir():
        raise UsageError(f"{command}: {option} {path!r} is a directory, not a file")
    parent = target.parent
    if not parent.is_dir():
        raise UsageError(f"{command}: {option} {path!r}: directory {str(parent)!r} "
                         "does not exist")
    if not os.access(parent, os.W_OK) or (target.exists() and not os.access(target, os.W_OK)):
        raise UsageError(f"{command}: {option} {path!r} is not writable")


def require_matplotlib(command: str) -> None:
    """Raise `UsageError` when `--plot` was given but the plot extra is missing."""
    try:
        import matplotlib  # noqa: F401 - only probing that the extra is installed
    except ImportError:
        raise UsageError(f"{command}: --plot needs matplotlib, which is not installed "
                         "(pip install 'jacobprop[plot]')") from None


def command_line(argv) -> str:
    """The command as typed, quoted so that it can be pasted back (recorded in results)."""
    return "jacobprop " + shlex.join(argv)
