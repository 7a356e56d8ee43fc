"""The benchmark's MLP, its hand-written NumPy reference and its cost model.

Every workload runs on the same kind of network: `depth` Dense layers,
`Dense(in, width) -> act -> ... -> Dense(width, classes)`, trained with
softmax cross-entropy against integer labels. The hand-written reference is
the baseline the engine must match: forward and backward written out with
plain NumPy, no validation, in-place where it is free.
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import pairwise

import numpy as np
from scipy.special import expit

from .. import LAYERS, Dense, Sequential, SoftmaxCrossEntropy

__all__ = [
    "MLPSpec",
    "activation_names",
    "build_mlp",
    "softmax_cross_entropy_head",
    "dense_weights",
    "grad_flops",
    "forward_flops",
    "reference_forward",
    "reference_value_and_grad",
    "REFERENCE_ACTIVATIONS",
    "relative_deviation",
]


def activation_names() -> list[str]:
    """Registered layers that work as a hidden activation: no parameters, no arguments.

    Read from `jacobprop.LAYERS` so that a new activation is benchmarkable at once.
    """
    names = []
    for name, cls in LAYERS.items():
        try:
            layer = cls()
        except TypeError:  # needs constructor arguments (Dense)
            continue
        if not layer.params:
            names.append(name)
    return names


@dataclass(frozen=True)
class MLPSpec:
    """The shape of one benchmark network and its batch.

    Attributes
    ----------
    batch : int
        Samples B.
    width : int
        Hidden width (every hidden Dense has `width` outputs).
    depth : int
        Number of Dense layers (depth 2 = `Dense(in, width) -> act -> Dense(width, classes)`).
    activation : str
        A name from `jacobprop.LAYERS`.
    dtype : str
        "float64" or "float32".
    in_features : int
        Input width; the hidden width when not given.
    classes : int
        Output width (softmax classes).
    """

    batch: int
    width: int
    depth: int = 2
    activation: str = "ReLU"
    dtype: str = "float64"
    in_features: int | None = None
    classes: int = 10

    @property
    def n_in(self) -> int:
        return self.width if self.in_features is None else self.in_features

    @property
    def sizes(self) -> list[int]:
        """Layer widths from input to output, `depth + 1` numbers."""
        return [self.n_in] + [self.width] * (self.depth - 1) + [self.classes]

    @property
    def n_params(self) -> int:
        sizes = self.sizes
        return sum((a + 1) * b for a, b in pairwise(sizes))

    def label(self) -> str:
        arch = "-".join(str(s) for s in self.sizes)
        return f"B={self.batch} {arch} {self.activation} {self.dtype}"

    def as_dict(self) -> dict:
        return {
            "batch": self.batch,
            "width": self.width,
            "depth": self.depth,
            "activation": self.activation,
            "dtype": self.dtype,
            "in_features": self.n_in,
            "classes": self.classes,
            "n_params": self.n_params,
        }


def build_mlp(spec: MLPSpec, *, rng: np.random.Generator):
    """`(net, x, labels, loss)` for `spec`: the network, a batch and its targets."""
    dtype = np.dtype(spec.dtype)
    sizes = spec.sizes
    layers = []
    for index, (n_in, n_out) in enumerate(pairwise(sizes)):
        layers.append(Dense(n_in, n_out, rng=rng, dtype=dtype))
        if index < spec.depth - 1:
            layers.append(LAYERS[spec.activation]())
    net = Sequential(*layers)
    x = rng.standard_normal((spec.batch, spec.n_in)).astype(dtype)
    labels = rng.integers(0, spec.classes, size=spec.batch)
    return net, x, labels, SoftmaxCrossEntropy()


def dense_weights(net) -> list[tuple[np.ndarray, np.ndarray]]:
    """The `(W, b)` pairs of the Dense layers of `net`, in order (live arrays)."""
    return [(layer.params["W"], layer.params["b"]) for layer in net if isinstance(layer, Dense)]


def forward_flops(spec: MLPSpec) -> float:
    """Matmul flops of one forward pass: `sum_l 2 B n_l m_l`."""
    sizes = spec.sizes
    return float(sum(2 * spec.batch * a * b for a, b in pairwise(sizes)))


def grad_flops(spec: MLPSpec) -> float:
    """Matmul flops of loss + gradients: forward, `dW = G^T X`, and `G W` below layer 1.

    Elementwise work (activations, softmax) is left out: it is O(B width) per
    layer against O(B width^2) for the products.
    """
    sizes = spec.sizes
    per_layer = [2 * spec.batch * a * b for a, b in pairwise(sizes)]
    return float(2 * sum(per_layer) + sum(per_layer[1:]))


# ---- the hand-written reference ----------------------------------------------------
# Each hidden activation: forward in place on the fresh pre-activation `z`, and
# the factor that scales the incoming gradient, computed from the output `a`
# alone (so the pre-activation need not be kept).
def _relu(z):
    return np.maximum(z, 0, out=z)


def _relu_back(g, a):
    g *= a > 0


def _tanh(z):
    return np.tanh(z, out=z)


def _tanh_back(g, a):
    g *= 1 - a * a


def _sigmoid(z):
    return expit(z, out=z)


def _sigmoid_back(g, a):
    g *= a * (1 - a)


def _leaky(z):
    return np.where(z > 0, z, 0.01 * z)


def _leaky_back(g, a):
    g *= np.where(a > 0, 1.0, 0.01).astype(g.dtype, copy=False)


def _softplus(z):
    return np.logaddexp(0, z, out=z)


def _softplus_back(g, a):
    # softplus'(z) = sigmoid(z) = 1 - exp(-softplus(z))
    g *= -np.expm1(-a)


def _identity(z):
    return z


def _identity_back(g, a):
    pass


#: Hidden activations the hand-written reference implements (LeakyReLU at its
#: default slope 0.01).
REFERENCE_ACTIVATIONS = {
    "ReLU": (_relu, _relu_back),
    "Tanh": (_tanh, _tanh_back),
    "Sigmoid": (_sigmoid, _sigmoid_back),
    "LeakyReLU": (_leaky, _leaky_back),
    "Softplus": (_softplus, _softplus_back),
    "Identity": (_identity, _identity_back),
}


def softmax_cross_entropy_head(y: np.ndarray, labels) -> tuple[float, np.ndarray]:
    """Mean softmax cross-entropy of logits `y` `(B, C)` and its gradient `(B, C)`.

    `L = (1/B) sum_i (logsumexp(y_i) - y_i[t_i])`, `dL/dy = (softmax(y) -
    onehot(t)) / B`. Shifts `y` by its row maxima in place (the NumPy
    baselines own their logits), and reuses one array for the exponentials
    and the gradient, as a hand-fused step would.
    """
    batch = y.shape[0]
    y -= y.max(axis=1, keepdims=True)
    p = np.exp(y)
    sums = p.sum(axis=1)
    rows = np.arange(batch)
    value = float(np.log(sums).sum() - y[rows, labels].sum()) / batch
    p /= sums[:, None]
    p[rows, labels] -= 1.0
    p *= 1.0 / batch
    return value, p


def reference_forward(weights, x, activation="ReLU"):
    """The MLP's forward pass by hand, keeping what the hand-written backward passes read.

    Parameters
    ----------
    weights : list of (W, b)
        `W` `(m_l, n_l)`, `b` `(m_l,)` for each Dense layer.
    x : ndarray `(B, n_0)`
    activation : str
        A key of `REFERENCE_ACTIVATIONS`, applied after every Dense but the last.

    Returns
    -------
    inputs : list of ndarray
        `a_{l-1}` `(B, n_l)`, the input of each Dense layer (`a_0 = x`); the
        activation backward passes take these outputs of `f`.
    y : ndarray `(B, m_L)`
        The last `z`, a new array (callers may shift it in place).

    Notes
    -----
    `z_l = a_{l-1} W_l^T + b_l`, `a_l = f(z_l)`, no activation after the last layer.
    """
    forward = REFERENCE_ACTIVATIONS[activation][0]
    last = len(weights) - 1
    inputs, h = [], x
    for index, (W, b) in enumerate(weights):
        inputs.append(h)
        z = h @ W.T
        z += b
        h = forward(z) if index < last else z
    return inputs, h


def reference_value_and_grad(weights, x, labels, activation="ReLU"):
    """Softmax cross-entropy of an MLP and its gradients, written out in NumPy.

    Parameters
    ----------
    weights : list of (W, b)
        `W` `(m_l, n_l)`, `b` `(m_l,)` for each Dense layer.
    x : ndarray `(B, n_0)`
    labels : int ndarray `(B,)`
    activation : str
        A key of `REFERENCE_ACTIVATIONS`, applied after every Dense but the last.

    Returns
    -------
    value : float
    grads : list of (dW, db)
        Same shapes as `weights`.

    Notes
    -----
    Forward: `a_0 = x`, `z_l = a_{l-1} W_l^T + b_l`, `a_l = f(z_l)`; the last `z`
    is the logits `y`. `L = (1/B) sum_i (logsumexp(y_i) - y_i[t_i])`.
    Backward: `G = (softmax(y) - onehot(t)) / B`; per layer from the top,
    `dW_l = G^T a_{l-1}`, `db_l = sum_i G_i`, then `G <- (G W_l) * f'(z_{l-1})`.
    """
    backward = REFERENCE_ACTIVATIONS[activation][1]
    inputs, y = reference_forward(weights, x, activation)
    value, g = softmax_cross_entropy_head(y, labels)
    grads = [None] * len(weights)
    for index in range(len(weights) - 1, -1, -1):
        grads[index] = (g.T @ inputs[index], g.sum(axis=0))
        if index > 0:
            g = g @ weights[index][0]
            backward(g, inputs[index])
    return value, grads


# ---- correctness helpers ------------------------------------------------------------
def relative_deviation(got, want) -> float:
    """Normwise relative deviation `max|got - want| / max|want|`, maximised over arrays.

    `got` and `want` are arrays or equal-length sequences (or dicts with the
    same keys) of arrays. The comparison runs in float64.
    """
    if isinstance(want, dict):
        got = [got[key] for key in want]
        want = list(want.values())
    elif isinstance(want, np.ndarray) or np.isscalar(want):
        got, want = [got], [want]
    worst = 0.0
    for a, b in zip(got, want, strict=True):
        a = np.asarray(a, dtype=np.float64)
        b = np.asarray(b, dtype=np.float64)
        scale = float(np.max(np.abs(b))) if b.size else 0.0
        diff = float(np.max(np.abs(a - b))) if b.size else 0.0
        worst = max(worst, diff / scale if scale > 0 else diff)
    return worst

