"""What verifying the shortcut hooks costs the checkers, same process.

    OPENBLAS_NUM_THREADS=1 PYTHONPATH=$PWD python benchmarks/hook_check_overhead.py

`check_layer` and `gradcheck` as they are, against the same calls with the hook
verification stubbed out (`_verify_hooks` returning no entries, so every hook is
trusted unchecked, as before): medians of interleaved rounds and their ratio.
"""

import statistics
import time
from unittest import mock

import numpy as np

import jacobprop as jp
from jacobprop.checks import layercheck, netcheck


def median_seconds(functions: dict, rounds: int = 15, inner: int = 3) -> dict:
    times = {name: [] for name in functions}
    for _ in range(rounds):  # interleaved, so drift on a shared machine hits all alike
        for name, function in functions.items():
            start = time.perf_counter()
            for _ in range(inner):
                function()
            times[name].append((time.perf_counter() - start) / inner)
    return {name: statistics.median(values) for name, values in times.items()}


def unverified(function):
    """`function` with the checkers trusting every hook unchecked."""
    def call():
        with mock.patch.object(layercheck, "_verify_hooks", lambda *a, **k: ([], 0)), \
                mock.patch.object(netcheck, "_verify_hooks", lambda *a, **k: ([], 0)):
            return function()
    return call


def verified(function):
    """The same context-manager overhead, hooks verified."""
    def call():
        with mock.patch.object(layercheck, "_verify_hooks", layercheck._verify_hooks), \
                mock.patch.object(netcheck, "_verify_hooks", netcheck._verify_hooks):
            return function()
    return call


def cases():
    rng = np.random.default_rng(0)
    dense = jp.Dense(16, 16, rng=rng)
    yield "check_layer Dense(16, 16), B=8", lambda: jp.check_layer(
        dense, rng.standard_normal((8, 16)), rng=np.random.default_rng(1))
    wide = jp.Dense(48, 32, rng=rng)
    x_wide = rng.standard_normal((16, 48))
    yield "check_layer Dense(48, 32), B=16", lambda: jp.check_layer(
        wide, x_wide, rng=np.random.default_rng(1))
    net = jp.Sequential(jp.Dense(8, 32, rng=rng), jp.Tanh(), jp.Dense(32, 32, rng=rng),
                        jp.Tanh(), jp.Dense(32, 4, rng=rng))
    x, t = rng.standard_normal((16, 8)), rng.standard_normal((16, 4))
    yield "check_layer 8-32-32-4 stack, B=16", lambda: jp.check_layer(
        net, x, rng=np.random.default_rng(1))
    yield "gradcheck 8-32-32-4, B=16", lambda: jp.gradcheck(
        net, x, t, jp.MSE(), rng=np.random.default_rng(1))
    yield "gradcheck 8-32-32-4 fast, B=16", lambda: jp.gradcheck(
        net, x, t, jp.MSE(), fast=True, rng=np.random.default_rng(1))


def main():
    print("| call | hooks trusted unchecked | hooks verified | ratio |")
    print("|---|---|---|---|")
    for name, function in cases():
        times = median_seconds({"before": unverified(function), "after": verified(function)})
        print(f"| {name} | {times['before'] * 1e3:.2f} ms | {times['after'] * 1e3:.2f} ms | "
              f"{times['after'] / times['before']:.3f} |")


if __name__ == "__main__":
    main()
