"""Predicted against measured cost of the product orders of small CNN Jacobians.

`net.jacobian(X, order=...).to_dense()` for forward, reverse and auto on CNNs
(Conv2D -> ReLU -> Conv2D -> GELU -> MaxPool2D or AvgPool2D -> Flatten
[-> LayerNorm] -> Dense), batch 16, float64. Repeats are interleaved across the
orders; the table gives the plan's predicted flops and the measured median, and
whether the predicted ranking of forward against reverse matches the measured
one where the predicted gap is at least 3x. Run from the repository root:

    OMP_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1 PYTHONPATH=$PWD \
        python benchmarks/plan_cnn_orders.py
"""

import time

import numpy as np

import jacobprop as jp

SHAPES = [  # (in_shape, channels, classes, pool, layernorm)
    ((1, 8, 8), 4, 1, "MaxPool2D", False),
    ((2, 12, 12), 4, 2, "MaxPool2D", False),
    ((3, 8, 8), 8, 10, "MaxPool2D", True),
    ((4, 8, 8), 8, 10, "AvgPool2D", True),
    ((1, 8, 8), 4, 64, "MaxPool2D", False),
    ((1, 6, 6), 2, 200, "AvgPool2D", False),
    ((1, 4, 4), 4, 256, "MaxPool2D", True),
]
ORDERS = ("forward", "reverse", "auto")


def build(in_shape, channels, classes, pool, layernorm, rng):
    conv = jp.Conv2D(in_shape[0], channels, 3, input_shape=in_shape, padding=1, rng=rng)
    second = jp.Conv2D(channels, channels, 3, input_shape=conv.output_shape, padding=1,
                       rng=rng)
    pooling = jp.LAYERS[pool](2, input_shape=second.output_shape)
    width = int(np.prod(pooling.output_shape))
    layers = [conv, jp.ReLU(), second, jp.GELU(), pooling, jp.Flatten()]
    if layernorm:
        layers.append(jp.LayerNorm(width))
    return jp.Sequential(*layers, jp.Dense(width, classes, rng=rng))


def main(repeats=9, batch=16):
    rng = np.random.default_rng(0)
    agree = total = 0
    print(f"{'in_shape':>10} {'ch':>3} {'out':>4} {'pool':>9} {'LN':>3} | "
          + " | ".join(f"{o:>7}: pred MFLOP, median ms" for o in ORDERS) + " | auto picks")
    for spec in SHAPES:
        net = build(*spec, rng)
        x = rng.standard_normal((batch, int(np.prod(spec[0]))))
        plans = {o: net.jacobian(x, order=o).plan for o in ORDERS}
        times = {o: [] for o in ORDERS}
        for repeat in range(repeats):
            # Rotated, so that no order always runs right after the big forward one.
            for order in ORDERS[repeat % 3:] + ORDERS[:repeat % 3]:
                start = time.perf_counter()
                net.jacobian(x, order=order).to_dense()
                times[order].append(time.perf_counter() - start)
        median = {o: float(np.median(times[o])) for o in ORDERS}
        cells = " | ".join(f"{plans[o].flops / 1e6:9.3g} {median[o] * 1e3:14.3g}" for o in ORDERS)
        gap = max(plans["forward"].flops, plans["reverse"].flops) / max(
            min(plans["forward"].flops, plans["reverse"].flops), 1)
        mark = ""
        if gap >= 3:
            total += 1
            predicted = plans["forward"].flops < plans["reverse"].flops
            measured = median["forward"] < median["reverse"]
            agree += predicted == measured
            mark = " (ranking matches)" if predicted == measured else " (ranking DIFFERS)"
        print(f"{str(spec[0]):>10} {spec[1]:>3} {spec[2]:>4} {spec[3]:>9} "
              f"{'y' if spec[4] else 'n':>3} | {cells} | {plans['auto'].chosen}"
              f" (gap {gap:.3g}x){mark}")
    print(f"predicted gap >= 3x: measured ranking matches in {agree} of {total}")


if __name__ == "__main__":
    main()
