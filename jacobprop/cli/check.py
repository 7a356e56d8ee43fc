"""`jacobprop check`: run the layer contract on a layer class of the user's own.

`plan_check` imports MODULE:CLASS and builds the layer into a `CheckPlan`
(raising `UsageError` for anything the user got wrong); `run_check` runs the
contract on drawn inputs and prints every check with pass or fail.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path

from .base import EXIT_FAILED, EXIT_OK, UsageError, positive_int

__all__ = ["CheckPlan", "add_parser", "plan_check", "run_check", "plan_command"]

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

def add_parser(commands) -> None:
    """Register `jacobprop check` on the top-level sub-parsers."""
    check = commands.add_parser(
        "check", help="check a layer class of your own against finite differences",
        description="Run jacobprop.testing.assert_layer_correct on MODULE:CLASS and print\n"
                    "every check with pass or fail.",
        epilog=_CHECK_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    check.add_argument("target", metavar="MODULE:CLASS")
    check.add_argument("--input-dim", type=positive_int, default=None, metavar="N",
                       help="input width of the drawn inputs (default: the layer's own, else "
                            "2, 3 and 5 in turn); also passed to CLASS.example (default 3)")
    check.add_argument("--examples", type=positive_int, default=3, metavar="N",
                       help="number of drawn inputs (default 3, at scales 0.5, 1 and 2)")
    check.add_argument("--seed", type=int, default=0,
                       help="seed of the layer, the inputs and the probe vectors (default 0)")
    check.add_argument("--float32", action=argparse.BooleanOptionalAction, default=True,
                       help="also check a float32 copy of the layer against float64 "
                            "(default on)")


@dataclass
class CheckPlan:
    """What `jacobprop check` runs: the user's layer and how to draw its inputs."""

    layer: object  # a jacobprop.Layer built by CLASS.example
    target: str  # "MODULE:CLASS" as typed
    input_dim: int | None = None
    examples: int = 3
    seed: int = 0
    float32: bool = True


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

    from ..layers.base import Layer

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

    from ..errors import GradcheckError
    from ..testing import CHECKS, NoValidInput, assert_layer_correct, cast_layer, draw_input

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
    from ..testing import CHECKS

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



def plan_command(args, argv) -> tuple:
    """`(run, plan)` for `jacobprop check ...`; `run(plan)` returns the exit code."""
    return run_check, plan_check(args)
