"""Named suites: the default one behind plain `jacobprop bench`, and the speed targets.

A suite is a list of `(workload, MLPSpec, peers)` plus its repeat count. The
default suite is sized to finish in well under a minute on two cores; the
targets suite holds exactly the configurations the project's speed targets
are stated for (see benchmarks/README.md) and the targets themselves.
"""

from __future__ import annotations

from dataclasses import dataclass

from .models import MLPSpec

__all__ = ["Suite", "SUITES", "Target", "TARGETS", "evaluate_targets"]


@dataclass(frozen=True)
class Suite:
    """A named list of benchmark groups.

    Attributes
    ----------
    description : str
    groups : tuple of (workload, MLPSpec, peers)
        `peers` are added to whatever `--against` asks for.
    repeats : int
        Interleaved rounds per group unless `--repeats` overrides it.
    """

    description: str
    groups: tuple
    repeats: int = 9
    budget_seconds: float = 1.0


# The gradcheck target network: 32 -> 64 -> 64 -> 10, batch 8 (6,922 parameters).
GRADCHECK_TARGET = MLPSpec(batch=8, width=64, depth=3, in_features=32)

# Jacobians beyond the gradient (issue 8): the full-Jacobian grid against the
# peers, and the NTK, per-sample and curvature target configurations.
JACOBIAN_GRID = tuple(
    MLPSpec(batch=64, width=width, depth=depth, dtype=dtype, classes=classes)
    for dtype in ("float64", "float32")
    for width in (16, 128)
    for classes in (1, 10, width)
    for depth in (2, 8)
)
NTK_TARGET = MLPSpec(batch=64, width=128, depth=2)
PER_SAMPLE_TARGETS = tuple(MLPSpec(batch=batch, width=width) for batch in (64, 256)
                           for width in (16, 128))
CURVATURE_TARGET = MLPSpec(batch=256, width=128)

SUITES = {
    "default": Suite(
        "A quick tour: every workload at small and medium sizes, float64 and float32",
        (
            ("grad", MLPSpec(batch=1, width=16), ()),
            ("grad", MLPSpec(batch=32, width=128), ()),
            ("grad", MLPSpec(batch=32, width=128, dtype="float32"), ()),
            ("grad", MLPSpec(batch=128, width=512), ()),
            ("jacobian", MLPSpec(batch=8, width=64, depth=3), ()),
            ("jacobian", MLPSpec(batch=32, width=128, depth=3, in_features=512), ()),
            ("gradcheck", MLPSpec(batch=8, width=32, depth=3, in_features=16), ()),
        ),
        repeats=9,
        budget_seconds=0.6,
    ),
    "targets": Suite(
        "The core-engine speed targets (float64, ReLU, softmax cross-entropy) and the "
        "gradcheck target against torch.autograd.gradcheck",
        (
            ("grad", MLPSpec(batch=256, width=1024), ()),
            ("grad", MLPSpec(batch=32, width=128), ()),
            ("grad", MLPSpec(batch=1, width=16), ()),
            ("gradcheck", GRADCHECK_TARGET, ("torch",)),
        ),
        repeats=21,
        budget_seconds=3.0,
    ),
    "jacobians": Suite(
        "Jacobians beyond the gradient: the full-Jacobian grid, NTK, per-sample gradients "
        "and curvature products, each against torch.func and jitted JAX",
        tuple([("jacobian", spec, ("torch", "jax")) for spec in JACOBIAN_GRID]
              + [("ntk", NTK_TARGET, ("torch", "jax"))]
              + [("per-sample", spec, ("torch", "jax")) for spec in PER_SAMPLE_TARGETS]
              + [("curvature", CURVATURE_TARGET, ("torch", "jax"))]),
        repeats=11,
        budget_seconds=1.5,
    ),
}


@dataclass(frozen=True)
class Target:
    """`rows[numerator] / rows[denominator] <relation> limit` in one group.

    `speedup=True` inverts the ratio (denominator / numerator), for "x times faster".
    """

    name: str
    workload: str
    spec: MLPSpec
    numerator: str
    denominator: str
    limit: float
    relation: str = "<="
    speedup: bool = False


TARGETS = (
    Target("vjp / NumPy reference, B=256 width 1024", "grad", MLPSpec(256, 1024),
           "vjp", "numpy-reference", 1.10),
    Target("vjp / NumPy reference, B=32 width 128", "grad", MLPSpec(32, 128),
           "vjp", "numpy-reference", 1.30),
    Target("vjp / NumPy reference, B=1 width 16", "grad", MLPSpec(1, 16),
           "vjp", "numpy-reference", 1.5),
    Target("jacobian mode / vjp, B=256 width 1024", "grad", MLPSpec(256, 1024),
           "jacobian", "vjp", 1.5),
    Target("jacobian mode / vjp, B=32 width 128", "grad", MLPSpec(32, 128),
           "jacobian", "vjp", 1.5),
    Target("full gradcheck speed-up over torch.autograd.gradcheck, 32-64-64-10 B=8",
           "gradcheck", GRADCHECK_TARGET, "full", "torch", 20.0, ">=", speedup=True),
    Target("ntk / structured NumPy, B=64 width 128", "ntk", NTK_TARGET,
           "ntk", "numpy-structured", 1.5),
    Target("ntk trace / structured NumPy trace, B=64 width 128", "ntk", NTK_TARGET,
           "ntk-trace", "numpy-structured-trace", 1.5),
    *(Target(f"per-sample grads / NumPy einsum, B={spec.batch} width {spec.width}",
             "per-sample", spec, "per-sample", "numpy-einsum", 1.2)
      for spec in PER_SAMPLE_TARGETS),
    *(Target(f"per-sample norms / batch gradient, B={spec.batch} width {spec.width}",
             "per-sample", spec, "norms", "batch-grad", 1.5)
      for spec in PER_SAMPLE_TARGETS),
    Target("GGN product / NumPy product, B=256 width 128", "curvature", CURVATURE_TARGET,
           "ggn", "numpy-ggn", 1.3),
    Target("Hessian product / NumPy product, B=256 width 128", "curvature", CURVATURE_TARGET,
           "hessian", "numpy-hessian", 1.3),
)


def evaluate_targets(groups: list[dict], rows: list[dict]) -> list[dict]:
    """The targets whose group was run, each with its measured value and verdict."""
    results = []
    for target in TARGETS:
        config = target.spec.as_dict()
        match = next((group for group in groups
                      if group["workload"] == target.workload and group["config"] == config),
                     None)
        if match is None:
            continue
        medians = {
            row["path"]: row["median_s"]
            for row in rows
            if row["group"] == match["index"] and row["status"] == "ok"
        }
        top, bottom = medians.get(target.numerator), medians.get(target.denominator)
        if top is None or bottom is None:
            missing = target.numerator if top is None else target.denominator
            results.append({"name": target.name, "measured": None, "limit": target.limit,
                            "relation": target.relation, "met": None,
                            "note": f"path {missing!r} was not measured"})
            continue
        measured = bottom / top if target.speedup else top / bottom
        met = measured <= target.limit if target.relation == "<=" else measured >= target.limit
        results.append({"name": target.name, "measured": measured, "limit": target.limit,
                        "relation": target.relation, "met": bool(met), "note": None})
    return results
