"""Per-sample gradients, their norms, the NTK and curvature products through a small CNN.

`Conv2D(3, 16, 3, pad 1) -> ReLU -> MaxPool2D(2) -> Conv2D(16, 32, 3, pad 1) -> ReLU
-> MaxPool2D(2) -> Flatten -> LayerNorm(512) -> Dense(512, 10)` on 3 x 16 x 16
images, softmax cross-entropy, float64. Medians of interleaved repeats, one
process; ratios are against the batch gradient of the same call. Run from the
repository root:

    OMP_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1 PYTHONPATH=$PWD \
        python benchmarks/derivs_cnn.py
"""

import time

import numpy as np

import jacobprop as jp
from jacobprop.flat import FlatParams


def build(rng):
    return jp.Sequential(
        jp.Conv2D(3, 16, 3, input_shape=(3, 16, 16), padding=1, rng=rng), jp.ReLU(),
        jp.MaxPool2D(2), jp.Conv2D(16, 32, 3, padding=1, rng=rng), jp.ReLU(),
        jp.MaxPool2D(2), jp.Flatten(), jp.LayerNorm(512), jp.Dense(512, 10, rng=rng))


def loop_per_sample(net, x, t, loss):
    return [net.value_and_grad(x[i:i + 1], t[i:i + 1], loss)[1] for i in range(len(x))]


def main(batch=64, repeats=7):
    rng = np.random.default_rng(0)
    net = build(rng)
    x = rng.standard_normal((batch, 768))
    t = rng.integers(0, 10, size=batch)
    loss = jp.SoftmaxCrossEntropy(reduction="sum")
    size = FlatParams(net.params).size
    v = rng.standard_normal(size)
    ggn, hess = jp.ggn(net, x, t, loss), jp.hessian(net, x, t, loss)
    cases = {
        "batch gradient": lambda: net.value_and_grad(x, t, loss),
        "per-sample gradients": lambda: net.value_and_grad(x, t, loss, per_sample=True),
        "per-sample norms": lambda: net.per_sample_grad_norms(x, t, loss),
        "loop over samples": lambda: loop_per_sample(net, x, t, loss),
        "ntk trace (B x B)": lambda: jp.ntk(net, x[:16], trace=True),
        "GGN product": lambda: ggn @ v,
        "Hessian product": lambda: hess @ v,
    }
    times = {name: [] for name in cases}
    for _ in range(repeats):
        for name, case in cases.items():
            start = time.perf_counter()
            case()
            times[name].append(time.perf_counter() - start)
    base = float(np.median(times["batch gradient"]))
    print(f"batch {batch}, {size} parameters, float64")
    for name in cases:
        median = float(np.median(times[name]))
        print(f"{name:24s} {median * 1e3:9.3g} ms  {median / base:7.3g}x batch gradient")


if __name__ == "__main__":
    main()
