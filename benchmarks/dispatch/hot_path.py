"""The vjp hot path before and after the resolve-once dispatch, in one process.

    python benchmarks/dispatch/hot_path.py BEFORE_TREE AFTER_TREE

Both source trees of jacobprop are loaded side by side (under two package
names), on the same arrays: `Dense(w, w) -> ReLU -> Dense(w, 10)`, softmax
cross-entropy, float64. Rounds interleave the two versions and the
hand-written NumPy reference; each figure is the median over 41 rounds of
the mean time of one `value_and_grad` call within a round.
"""

import importlib.util
import statistics
import sys
import time
from importlib import import_module

import numpy as np


def load(name, root):
    spec = importlib.util.spec_from_file_location(
        name, f"{root}/jacobprop/__init__.py", submodule_search_locations=[f"{root}/jacobprop"]
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def build(jp, batch, width, seed=0):
    rng = np.random.default_rng(seed)
    net = jp.Sequential(jp.Dense(width, width, rng=rng), jp.ReLU(),
                        jp.Dense(width, 10, rng=rng))
    x = rng.standard_normal((batch, width))
    labels = rng.integers(0, 10, batch)
    return net, x, labels, jp.SoftmaxCrossEntropy()


def paths_for(before, after, reference, batch, width):
    old, x, labels, old_loss = build(before, batch, width)
    new, _, _, new_loss = build(after, batch, width)
    weights = [(new[0].params["W"], new[0].params["b"]),
               (new[2].params["W"], new[2].params["b"])]
    return {
        "before": lambda: old.value_and_grad(x, labels, old_loss),
        "after": lambda: new.value_and_grad(x, labels, new_loss),
        "numpy": lambda: reference(weights, x, labels),
    }


def main(before_tree, after_tree):
    before = load("jp_before", before_tree)
    after = load("jp_after", after_tree)
    reference = import_module("jp_after.bench.models").reference_value_and_grad
    for batch, width in [(1, 16), (32, 128)]:
        paths = paths_for(before, after, reference, batch, width)
        inner = 2000 if width < 100 else 200
        times = {name: [] for name in paths}
        for _ in range(41):
            for name, fn in paths.items():
                start = time.perf_counter()
                for _ in range(inner):
                    fn()
                times[name].append((time.perf_counter() - start) / inner)
        med = {name: statistics.median(values) for name, values in times.items()}
        line = ", ".join(f"{name} {value * 1e6:.2f} us" for name, value in med.items())
        print(f"B={batch} width={width}: {line}; "
              f"before/numpy {med['before'] / med['numpy']:.2f}, "
              f"after/numpy {med['after'] / med['numpy']:.2f}; "
              f"after/before {med['after'] / med['before']:.3f}")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
