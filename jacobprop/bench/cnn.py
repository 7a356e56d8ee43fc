"""The CNN workload of `jacobprop bench cnn`, and the digits training run.

Two small convolutional networks, each `Conv2D(3x3, pad 1) -> ReLU ->
MaxPool2D(2)` twice, then `Flatten -> Dense(., 10)`, with softmax
cross-entropy (mean) against integer labels:

- "small": 1x8x8 input, 8 and 16 channels (the digits size);
- "cifar": 3x32x32 input, 16 and 32 channels.

Paths timed on the same arrays: `numpy-im2col` (the baseline: the same
network written out by hand in NumPy, channels-last, one
`sliding_window_view` copy and one GEMM per convolution, no validation),
`vjp` (`net.value_and_grad`), `jacobian` (the explicit mode, structured
operators) and the peers `torch` (eager) and `jax` (`jit(value_and_grad)`).

`--digits` instead trains a CNN on scikit-learn's 8x8 digits (an optional
dependency, imported only then) on a 75/25 split for three seeds with
`jp.fit(..., optimizer=jp.Adam(2e-3))` and prints the test accuracies.
"""

from __future__ import annotations

import importlib
import sys
import time
from dataclasses import dataclass

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from .. import (
    Adam,
    Conv2D,
    Dense,
    Dropout,
    Flatten,
    MaxPool2D,
    ReLU,
    Sequential,
    SoftmaxCrossEntropy,
)
from ..training import fit
from .peers import (
    PeerMissing,
    import_jax,
    import_peer,
    jax_mean_cross_entropy,
    peer_versions,
)
from .timing import Case, machine_info, measure_group

__all__ = ["CNNSpec", "CONFIGS", "build_cnn", "reference_value_and_grad", "run_cnn",
           "digits_cnn", "run_digits", "CNN_PEERS"]


@dataclass(frozen=True)
class CNNSpec:
    """One CNN configuration: input `(C, H, W)`, the two conv widths, batch and dtype."""

    name: str
    input_shape: tuple[int, int, int]
    channels: tuple[int, int]
    batch: int
    dtype: str = "float64"
    classes: int = 10

    def label(self) -> str:
        c, h, w = self.input_shape
        return (f"{self.name} {c}x{h}x{w} ch {self.channels[0]},{self.channels[1]} "
                f"B={self.batch} {self.dtype}")


#: The configurations of the issue: the small CNN at batch 32 and 256, the CIFAR-sized one at 64.
CONFIGS = {
    "small": ((1, 8, 8), (8, 16), (32, 256)),
    "cifar": ((3, 32, 32), (16, 32), (64,)),
}


def build_cnn(spec: CNNSpec, *, rng: np.random.Generator) -> Sequential:
    """`(Conv2D 3x3 pad 1 -> ReLU -> MaxPool2D 2) x 2 -> Flatten -> Dense(., classes)`."""
    c, h, w = spec.input_shape
    c1, c2 = spec.channels
    dtype = np.dtype(spec.dtype)
    return Sequential(
        Conv2D(c, c1, 3, input_shape=spec.input_shape, padding=1, rng=rng, dtype=dtype),
        ReLU(),
        MaxPool2D(2),
        Conv2D(c1, c2, 3, padding=1, rng=rng, dtype=dtype),
        ReLU(),
        MaxPool2D(2),
        Flatten(),
        Dense(c2 * (h // 4) * (w // 4), spec.classes, rng=rng, dtype=dtype),
    )


def _weights(net: Sequential) -> list[np.ndarray]:
    """`[W1, b1, W2, b2, W3, b3]` of a `build_cnn` network (live arrays)."""
    return [net.params[key] for key in ("0.W", "0.b", "3.W", "3.b", "7.W", "7.b")]


# ---- the hand-written NumPy baseline ---------------------------------------------------
def _patches_nhwc(images: np.ndarray) -> np.ndarray:
    """im2col of channels-last images `(B, H, W, C)`, 3x3, padding 1: `(B*H*W, C*9)`."""
    batch, height, width, channels = images.shape
    padded = np.pad(images, ((0, 0), (1, 1), (1, 1), (0, 0)))
    windows = sliding_window_view(padded, (3, 3), axis=(1, 2))  # (B, H, W, C, 3, 3)
    return windows.reshape(batch * height * width, channels * 9)


def _fold_nhwc(columns: np.ndarray, shape) -> np.ndarray:
    """The adjoint of `_patches_nhwc`: `(B*H*W, C*9)` summed back into `(B, H, W, C)`."""
    batch, height, width, channels = shape
    blocks = columns.reshape(batch, height, width, channels, 3, 3)
    padded = np.zeros((batch, height + 2, width + 2, channels), columns.dtype)
    for i in range(3):
        for j in range(3):
            padded[:, i:i + height, j:j + width, :] += blocks[:, :, :, :, i, j]
    return padded[:, 1:-1, 1:-1, :]


def _pool_nhwc(z: np.ndarray):
    """2x2 max-pool of `(B, H, W, C)`; returns the output and the winners' mask."""
    batch, height, width, channels = z.shape
    blocks = z.reshape(batch, height // 2, 2, width // 2, 2, channels)
    out = blocks.max(axis=(2, 4))
    mask = blocks == out[:, :, None, :, None, :]
    return out, mask


def _unpool_nhwc(g: np.ndarray, mask: np.ndarray) -> np.ndarray:
    batch, h2, w2, channels = g.shape
    return (mask * g[:, :, None, :, None, :]).reshape(batch, 2 * h2, 2 * w2, channels)


def reference_value_and_grad(weights, x: np.ndarray, labels: np.ndarray, input_shape):
    """Loss and gradients of the `build_cnn` network, written out in NumPy (channels-last).

    `weights` is `[W1, b1, W2, b2, W3, b3]` in jacobprop's layouts, `x` the
    `(B, C*H*W)` batch. Ties in a pooling window share its gradient (random
    inputs have none that matter: a tie of zeros sits behind an inactive ReLU).
    """
    W1, b1, W2, b2, W3, b3 = weights
    batch = x.shape[0]
    c, h, w = input_shape
    images = x.reshape(batch, c, h, w).transpose(0, 2, 3, 1)
    p1 = _patches_nhwc(images)
    z1 = (p1 @ W1.reshape(W1.shape[0], -1).T + b1).reshape(batch, h, w, -1)
    a1 = np.maximum(z1, 0)
    q1, m1 = _pool_nhwc(a1)
    p2 = _patches_nhwc(q1)
    z2 = (p2 @ W2.reshape(W2.shape[0], -1).T + b2).reshape(batch, h // 2, w // 2, -1)
    a2 = np.maximum(z2, 0)
    q2, m2 = _pool_nhwc(a2)
    flat = q2.transpose(0, 3, 1, 2).reshape(batch, -1)  # C-order of (C, H, W), as Flatten
    logits = flat @ W3.T + b3
    shifted = logits - logits.max(axis=1, keepdims=True)
    log_norm = np.log(np.exp(shifted).sum(axis=1, keepdims=True))
    value = float(-(shifted - log_norm)[np.arange(batch), labels].mean())
    g = np.exp(shifted - log_norm)
    g[np.arange(batch), labels] -= 1
    g /= batch
    dW3, db3 = g.T @ flat, g.sum(axis=0)
    gq2 = (g @ W3).reshape(q2.shape[0], q2.shape[3], q2.shape[1], q2.shape[2])
    ga2 = _unpool_nhwc(gq2.transpose(0, 2, 3, 1), m2)
    gz2 = (ga2 * (z2 > 0)).reshape(-1, W2.shape[0])
    dW2, db2 = (gz2.T @ p2).reshape(W2.shape), gz2.sum(axis=0)
    gq1 = _fold_nhwc(gz2 @ W2.reshape(W2.shape[0], -1), q1.shape)
    gz1 = (_unpool_nhwc(gq1, m1) * (z1 > 0)).reshape(-1, W1.shape[0])
    dW1, db1 = (gz1.T @ p1).reshape(W1.shape), gz1.sum(axis=0)
    return value, [dW1, db1, dW2, db2, dW3, db3]


# ---- peers -------------------------------------------------------------------------------
def _torch_case(weights, x, labels, spec):
    torch = import_peer("torch")
    functional = importlib.import_module("torch.nn.functional")
    dtype = getattr(torch, spec.dtype)
    params = [torch.tensor(w, dtype=dtype, requires_grad=True) for w in weights]
    images = torch.tensor(x.reshape(x.shape[0], *spec.input_shape), dtype=dtype)
    targets = torch.tensor(labels, dtype=torch.long)

    def run():
        W1, b1, W2, b2, W3, b3 = params
        h = functional.max_pool2d(functional.relu(functional.conv2d(images, W1, b1, padding=1)), 2)
        h = functional.max_pool2d(functional.relu(functional.conv2d(h, W2, b2, padding=1)), 2)
        loss = functional.cross_entropy(functional.linear(h.flatten(1), W3, b3), targets)
        return loss, torch.autograd.grad(loss, params)

    def convert(out):
        loss, grads = out
        return float(loss.detach()), [g.detach().numpy() for g in grads]

    return run, convert


def _jax_case(weights, x, labels, spec):
    jax, jnp = import_jax(spec.dtype)
    lax = importlib.import_module("jax.lax")

    def block(h, W, b):
        h = lax.conv_general_dilated(h, W, (1, 1), ((1, 1), (1, 1)),
                                     dimension_numbers=("NCHW", "OIHW", "NCHW"))
        h = jnp.maximum(h + b[None, :, None, None], 0)
        return lax.reduce_window(h, -jnp.inf, lax.max, (1, 1, 2, 2), (1, 1, 2, 2), "VALID")

    def loss(params, images, targets):
        W1, b1, W2, b2, W3, b3 = params
        h = block(block(images, W1, b1), W2, b2)
        return jax_mean_cross_entropy(h.reshape(h.shape[0], -1) @ W3.T + b3, targets)

    step = jax.jit(jax.value_and_grad(loss))
    params = [jnp.asarray(w) for w in weights]
    images = jnp.asarray(x.reshape(x.shape[0], *spec.input_shape))
    targets = jnp.asarray(labels)

    def run():
        return jax.block_until_ready(step(params, images, targets))

    def convert(out):
        value, grads = out
        return float(value), [np.asarray(g) for g in grads]

    return run, convert


#: Peers with a cnn workload: name -> `(run, convert)` builder of its case.
CNN_PEERS = {"torch": _torch_case, "jax": _jax_case}


# ---- one group -------------------------------------------------------------------------
def _deviation(grads, reference) -> float:
    return max(float(np.abs(np.asarray(g, np.float64) - r).max() / max(np.abs(r).max(), 1e-300))
               for g, r in zip(grads, reference, strict=True))


def cnn_cases(spec: CNNSpec, peers=(), *, seed: int = 0) -> list[Case]:
    """The timed paths of one configuration, all on the same weights, input and labels."""
    rng = np.random.default_rng(seed)
    net = build_cnn(spec, rng=rng)
    x = rng.standard_normal((spec.batch, int(np.prod(spec.input_shape)))).astype(spec.dtype)
    labels = rng.integers(0, spec.classes, spec.batch)
    loss = SoftmaxCrossEntropy()
    weights = _weights(net)
    reference = reference_value_and_grad([w.astype(np.float64) for w in weights],
                                         x.astype(np.float64), labels, spec.input_shape)[1]
    keys = list(net.params)

    def engine_check(out):
        return _deviation([out[1][key] for key in keys], reference), "numpy-im2col float64"

    cases = [
        Case("numpy-im2col",
             lambda: reference_value_and_grad(weights, x, labels, spec.input_shape),
             lambda out: (_deviation(out[1], reference), "numpy-im2col float64")),
        Case("vjp", lambda: net.value_and_grad(x, labels, loss), engine_check),
        Case("jacobian", lambda: net.value_and_grad(x, labels, loss, mode="jacobian"),
             engine_check),
    ]
    for name in peers:
        try:
            run, convert = CNN_PEERS[name](weights, x, labels, spec)
        except PeerMissing as error:
            cases.append(Case(name, skip=str(error), peer=name))
            continue
        cases.append(Case(name, run,
                          lambda out, convert=convert: (_deviation(convert(out)[1], reference),
                                                        "numpy-im2col float64"),
                          traced=False, peer=name))
    return cases


def run_cnn(configs, dtypes, peers=(), *, repeats: int = 9, budget: float = 1.0,
            seed: int = 0, stdout=None) -> list[dict]:
    """Time every configuration and dtype; print a table; return the rows."""
    stdout = sys.stdout if stdout is None else stdout
    info = machine_info()
    stdout.write(f"# jacobprop bench cnn: {info['cpu']}, {info['cores']} cores, numpy "
                 f"{info['numpy']}; peers {peer_versions(peers) or '-'}\n")
    stdout.write(f"{'configuration':44s} {'path':13s} {'median ms':>10s} {'x numpy':>8s} "
                 f"{'x torch':>8s} {'max rel dev':>12s}\n")
    rows = []
    for name in configs:
        input_shape, channels, batches = CONFIGS[name]
        for batch in batches:
            for dtype in dtypes:
                spec = CNNSpec(name, input_shape, channels, batch, dtype)
                cases = cnn_cases(spec, peers, seed=seed)
                timings = measure_group(cases, repeats, budget_seconds=budget)
                base = timings.get("numpy-im2col")
                torch_timing = timings.get("torch")
                for case in cases:
                    row = {"config": spec.label(), "path": case.path}
                    timing = timings.get(case.path)
                    if case.skip is not None or timing is None:
                        row["skip"] = case.skip
                        stdout.write(f"{spec.label():44s} {case.path:13s} skipped: "
                                     f"{case.skip}\n")
                    elif isinstance(timing, str):
                        row["error"] = timing
                        stdout.write(f"{spec.label():44s} {case.path:13s} ERROR: {timing}\n")
                    else:
                        median = timing.median
                        deviation, _ = case.check(timing.result)
                        row.update(median_s=median, deviation=deviation)
                        ratio = median / base.median if not isinstance(base, (str, type(None))) \
                            else float("nan")
                        versus = (median / torch_timing.median
                                  if not isinstance(torch_timing, (str, type(None)))
                                  else float("nan"))
                        row.update(ratio_numpy=ratio, ratio_torch=versus)
                        stdout.write(f"{spec.label():44s} {case.path:13s} {1e3 * median:10.3f} "
                                     f"{ratio:8.2f} {versus:8.2f} {deviation:12.2e}\n")
                    rows.append(row)
    return rows


# ---- real data: digits -----------------------------------------------------------------
def digits_cnn(*, rng: np.random.Generator) -> Sequential:
    """`Conv(1->32) -> ReLU -> Pool -> Conv(32->64) -> ReLU -> Pool -> Dropout(0.3) -> Dense`."""
    return Sequential(
        Conv2D(1, 32, 3, input_shape=(1, 8, 8), padding=1, rng=rng), ReLU(), MaxPool2D(2),
        Conv2D(32, 64, 3, padding=1, rng=rng), ReLU(), MaxPool2D(2),
        Flatten(), Dropout(0.3, rng=rng), Dense(64 * 2 * 2, 10, rng=rng),
    )


def run_digits(seeds=(0, 1, 2), *, epochs: int = 30, stdout=None) -> list[float]:
    """Train `digits_cnn` by `jp.fit` with Adam (lr 2e-3, batch 32) on digits; test in eval
    mode."""
    stdout = sys.stdout if stdout is None else stdout
    try:
        datasets = importlib.import_module("sklearn.datasets")
        selection = importlib.import_module("sklearn.model_selection")
    except ImportError:
        raise PeerMissing("the digits run needs scikit-learn (pip install scikit-learn)") \
            from None
    digits = datasets.load_digits()
    X = digits.data / 16.0
    labels = digits.target
    accuracies = []
    for seed in seeds:
        X_train, X_test, y_train, y_test = selection.train_test_split(
            X, labels, test_size=0.25, random_state=seed, stratify=labels)
        rng = np.random.default_rng(seed)
        net = digits_cnn(rng=rng)
        start = time.perf_counter()
        fit(net, X_train, y_train, SoftmaxCrossEntropy(), optimizer=Adam(2e-3),
            epochs=epochs, batch_size=32, rng=rng, progress=False)
        seconds = time.perf_counter() - start
        accuracy = float((net.eval()(X_test).argmax(axis=1) == y_test).mean())
        accuracies.append(accuracy)
        stdout.write(f"digits seed {seed}: test accuracy {accuracy:.4f} "
                     f"({len(X_train)} train / {len(X_test)} test, {epochs} epochs, "
                     f"{seconds:.1f} s)\n")
    stdout.write(f"digits mean test accuracy over {len(seeds)} seeds: "
                 f"{np.mean(accuracies):.4f}\n")
    return accuracies
