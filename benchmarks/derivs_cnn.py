"""Per-sample gradients, their norms, the NTK and curvature products through a small CNN.

`Conv2D(3, 16, 3, pad 1) -> ReLU -> MaxPool2D(2) -> Conv2D(16, 32, 3, pad 1) -> ReLU
-> MaxPool2D(2) -> Flatten -> LayerNorm(512) -> Dense(512, 10)` on 3 x 16 x 16
images, softmax cross-entropy, float64. Medians of interleaved repeats, one
process; ratios are against the batch gradient of the same call. Run from the
repository root:

    OMP_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1 PYTHONPATH=$PWD \
        python benchmarks/derivs_cnn.py

With `torch` as the argument (in the peers' venv,
`/work/peers/venv/bin/python benchmarks/derivs_cnn.py torch`) torch.func's
`vmap(grad)` of the same network runs beside them, one torch thread.
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


def torch_per_sample(net, x, t, batch):
    """torch.func `vmap(grad)` of the same network and loss (per-sample rows, summed loss)."""
    import torch
    import torch.nn.functional as F  # noqa: N812 (torch's own name)

    keys = list(net.params)
    params = {key: torch.tensor(net.params[key]) for key in keys}

    def one(p, xi, label):
        h = xi.reshape(1, 3, 16, 16)
        h = F.max_pool2d(F.relu(F.conv2d(h, p["0.W"], p["0.b"], padding=1)), 2)
        h = F.max_pool2d(F.relu(F.conv2d(h, p["3.W"], p["3.b"], padding=1)), 2)
        h = F.layer_norm(h.flatten(1), (512,), p["7.gamma"], p["7.beta"], eps=1e-5)
        logits = F.linear(h, p["8.W"], p["8.b"])[0]
        return torch.logsumexp(logits, 0) - (logits * label).sum()

    fn = torch.func.vmap(torch.func.grad(one), in_dims=(None, 0, 0))
    onehot = np.zeros((batch, 10))
    onehot[np.arange(batch), t] = 1
    xt, lt = torch.tensor(x), torch.tensor(onehot)
    return lambda: fn(params, xt, lt), lambda out: {k: out[k].numpy() for k in keys}


def main(batch=64, repeats=7, against=()):
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
    if "torch" in against:
        import torch

        torch.set_num_threads(1)
        run, convert = torch_per_sample(net, x, t, batch)
        rows = net.value_and_grad(x, t, loss, per_sample=True)[1]
        deviation = max(float(np.abs(convert(run())[k] - rows[k]).max()) for k in rows)
        print(f"torch.func vmap(grad) against per_sample=True: max abs deviation {deviation:.2e}")
        cases["torch.func vmap(grad)"] = run
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
    import sys

    main(against=tuple(sys.argv[1].split(",")) if len(sys.argv) > 1 else ())
