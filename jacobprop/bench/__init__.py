"""Benchmark workloads behind `jacobprop bench`.

- `models`: the benchmark MLP, the hand-written NumPy reference, flop counts;
- `workloads`: the grad, jacobian and gradcheck groups of paths;
- `peers`: optional torch / jax / autograd / scikit-learn paths, imported lazily;
- `timing`: warm-up, interleaved repeats, medians, memory, machine facts;
- `suites`: the default suite and the speed-target suite;
- `runner`: `run_bench(plan) -> document`; `report`: table and plot;
- `schema`: the versioned JSON schema of the document and its validator.
"""

from .models import MLPSpec, activation_names, reference_value_and_grad
from .runner import BenchPlan, run_bench
from .schema import SCHEMA, SCHEMA_VERSION, SchemaError, validate
from .suites import SUITES, TARGETS
from .workloads import Limits

__all__ = [
    "MLPSpec",
    "activation_names",
    "reference_value_and_grad",
    "BenchPlan",
    "run_bench",
    "SCHEMA",
    "SCHEMA_VERSION",
    "SchemaError",
    "validate",
    "SUITES",
    "TARGETS",
    "Limits",
]
