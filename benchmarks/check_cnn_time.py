"""Time check_layer and gradcheck on a small CNN (the Conv2D finite-difference hook).

    PYTHONPATH=$PWD python benchmarks/check_cnn_time.py [--repeats 5]

Prints the median wall time of each check over `--repeats` runs, and how many
forward evaluations the report counts. The network: 1x8x8 input, Conv2D(1, 8, 3,
padding=1) -> ReLU -> Conv2D(8, 8, 3, padding=1) -> Tanh -> MaxPool2D(2) -> Flatten ->
Dense(128, 10), batch 8, float64, MSE.
"""

from __future__ import annotations

import argparse
import time

import numpy as np

import jacobprop as jp


def network(rng):
    return jp.Sequential(
        jp.Conv2D(1, 8, 3, padding=1, input_shape=(1, 8, 8), rng=rng), jp.ReLU(),
        jp.Conv2D(8, 8, 3, padding=1, rng=rng), jp.Tanh(), jp.MaxPool2D(2), jp.Flatten(),
        jp.Dense(128, 10, rng=rng))


def median_time(run, repeats):
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        result = run()
        times.append(time.perf_counter() - start)
    return float(np.median(times)), result


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    net = network(rng)
    x, t = rng.standard_normal((8, 64)), rng.standard_normal((8, 10))
    cases = {
        "gradcheck (full)": lambda: jp.gradcheck(net, x, t, jp.MSE(), rng=rng),
        "check_layer(conv2)": lambda: jp.check_layer(net[2], net[:2](x), rng=rng),
        "check_layer(net)": lambda: jp.check_layer(net, x, rng=rng),
    }
    for name, run in cases.items():
        seconds, report = median_time(run, args.repeats)
        print(f"{name:22s} {seconds * 1e3:9.1f} ms  ok={report.ok}  "
              f"evaluations={report.evaluations}")


if __name__ == "__main__":
    main()
