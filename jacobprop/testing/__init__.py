"""Test kit for jacobprop layers: hypothesis strategies and the layer contract.

    from jacobprop.testing import assert_layer_correct
    assert_layer_correct(MyLayer())          # draws inputs, raises on any mismatch

The kit needs hypothesis (the `test` extra); `import jacobprop` never imports
it, only `import jacobprop.testing` does.
"""

from importlib.util import find_spec

# Fail once, here, with the fix in the message, rather than deep inside a submodule.
if find_spec("hypothesis") is None:
    raise ImportError(
        "jacobprop.testing needs hypothesis; install it with: pip install 'jacobprop[test]'"
    )

from .contract import CHECKS, assert_layer_correct, cast_layer
from .profiles import PROFILES, load_profile, register_profiles
from .strategies import (
    DEFAULT_MARGIN,
    NoValidInput,
    checkable,
    draw_input,
    dtypes,
    flatten_layers,
    input_problems,
    inputs,
    kink_distances,
    layers,
    losses,
    per_sample,
    seeds,
    sequentials,
    targets,
)

__all__ = [
    "assert_layer_correct",
    "cast_layer",
    "CHECKS",
    "layers",
    "sequentials",
    "inputs",
    "targets",
    "losses",
    "dtypes",
    "seeds",
    "draw_input",
    "input_problems",
    "flatten_layers",
    "checkable",
    "per_sample",
    "kink_distances",
    "DEFAULT_MARGIN",
    "NoValidInput",
    "register_profiles",
    "load_profile",
    "PROFILES",
]
