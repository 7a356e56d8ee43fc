"""Optional peers: the same loss and gradients computed by other libraries.

Every peer is imported lazily, inside the function that builds its case; a
missing one raises `PeerMissing`, whose message is the one line the CLI
prints ("peer 'jax' is not installed (pip install jax); skipping").

All peers receive the same arrays as the engine (weights, inputs, labels),
copied into their own containers outside the timed call.
"""

from __future__ import annotations

import importlib

import numpy as np

from .models import MLPSpec

__all__ = ["PEERS", "PeerMissing", "import_peer", "import_jax", "jax_activation",
           "jax_mean_cross_entropy", "torch_activation", "peer_versions", "set_peer_threads",
           "grad_callable", "torch_gradcheck_callable"]

#: Peer name -> (module to import, pip package name).
PEERS = {
    "torch": ("torch", "torch"),
    "jax": ("jax", "jax"),
    "autograd": ("autograd", "autograd"),
    "sklearn": ("sklearn", "scikit-learn"),
}


class PeerMissing(ImportError):
    """An optional peer library is not installed; the message is the line to print."""


class PeerUnsupported(ValueError):
    """A peer cannot run this configuration; the message says why."""


def import_peer(name: str):
    """Import and return the peer's top-level module, or raise `PeerMissing`."""
    module, package = PEERS[name]
    try:
        return importlib.import_module(module)
    except ImportError as error:
        raise PeerMissing(
            f"peer {name!r} is not installed (pip install {package}); skipping"
        ) from error


def set_peer_threads(names, threads: int | None) -> None:
    """Set torch's intra-op thread count (`--peer-threads`); None keeps its default."""
    if threads is not None and "torch" in names:
        import_peer("torch").set_num_threads(threads)


def peer_versions(names) -> dict[str, str]:
    """Versions (and torch's thread count) of the peers that import."""
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as dist_version

    versions = {}
    for name in names:
        try:
            module = import_peer(name)
        except PeerMissing:
            continue
        try:
            version = dist_version(PEERS[name][1])
        except PackageNotFoundError:
            version = getattr(module, "__version__", "?")
        if name == "torch":
            version = f"{version} ({module.get_num_threads()} threads)"
        versions[name] = str(version)
    return versions


def grad_callable(name: str, spec: MLPSpec, weights, x, labels):
    """A zero-argument callable returning `(value, [(dW, db), ...])` as NumPy.

    The conversion back to NumPy happens in `convert`, outside the timed call:
    the callable returns the peer's own objects.

    Returns
    -------
    run : callable
    convert : callable
        `convert(run())` -> `(value, grads)` in NumPy, for the correctness column.
    traced : bool
        Whether tracemalloc sees the peer's allocations.
    """
    builders = {
        "torch": _torch_grad,
        "jax": _jax_grad,
        "autograd": _autograd_grad,
        "sklearn": _sklearn_grad,
    }
    return builders[name](spec, weights, x, labels)


# ---- torch ------------------------------------------------------------------------
_TORCH_ACTIVATIONS = {
    "ReLU": "relu",
    "Tanh": "tanh",
    "Sigmoid": "sigmoid",
    "Softplus": "softplus",
    "Identity": None,
    "LeakyReLU": "leaky_relu",
}


def torch_activation(name: str):
    """torch's function for the jacobprop activation `name`; `PeerUnsupported` if unmapped."""
    functional = import_peer("torch").nn.functional
    if name not in _TORCH_ACTIVATIONS:
        raise PeerUnsupported(f"no torch activation mapped for {name}")
    function = _TORCH_ACTIVATIONS[name]
    return (lambda z: z) if function is None else getattr(functional, function)


def _torch_mlp(spec):
    torch = import_peer("torch")
    functional = torch.nn.functional
    activation = torch_activation(spec.activation)

    def logits(xt, flat):
        h = xt
        layers = len(flat) // 2
        for index in range(layers):
            h = functional.linear(h, flat[2 * index], flat[2 * index + 1])
            if index < layers - 1:
                h = activation(h)
        return h

    return torch, functional, logits


def _torch_tensors(torch, weights, x, labels, dtype=None):
    flat = []
    for W, b in weights:
        for array in (W, b):
            tensor = torch.tensor(np.array(array, dtype=dtype or array.dtype))
            flat.append(tensor.requires_grad_())
    xt = torch.tensor(np.array(x, dtype=dtype or x.dtype))
    return flat, xt, torch.tensor(labels, dtype=torch.int64)


def _torch_grad(spec, weights, x, labels):
    torch, functional, logits = _torch_mlp(spec)
    flat, xt, lt = _torch_tensors(torch, weights, x, labels)

    def run():
        loss = functional.cross_entropy(logits(xt, flat), lt)
        return loss, torch.autograd.grad(loss, flat)

    def convert(out):
        loss, grads = out
        arrays = [g.detach().numpy() for g in grads]
        return loss.item(), list(zip(arrays[0::2], arrays[1::2], strict=True))

    return run, convert, False


def torch_gradcheck_callable(spec: MLPSpec, weights, x, labels):
    """`torch.autograd.gradcheck` with its defaults on the same MLP, float64.

    Every weight and bias is an input of the checked function, so every
    parameter is differenced, as in the engine's full check.
    """
    torch, functional, logits = _torch_mlp(spec)
    flat, xt, lt = _torch_tensors(torch, weights, x, labels, dtype=np.float64)

    def loss(*params):
        return functional.cross_entropy(logits(xt, params), lt)

    def run():
        return bool(torch.autograd.gradcheck(loss, tuple(flat)))

    return run


# ---- jax --------------------------------------------------------------------------
def import_jax(dtype: str):
    """`(jax, jax.numpy)`, with 64-bit arrays switched on for float64 (jax's default is 32)."""
    jax = import_peer("jax")
    if dtype == "float64":
        jax.config.update("jax_enable_x64", True)
    return jax, importlib.import_module("jax.numpy")


def jax_activation(name: str):
    """jax's function for the jacobprop activation `name`; `PeerUnsupported` if unmapped."""
    jnp = importlib.import_module("jax.numpy")
    nn = importlib.import_module("jax.nn")
    activations = {"ReLU": nn.relu, "Tanh": jnp.tanh, "Sigmoid": nn.sigmoid,
                   "Softplus": nn.softplus, "Identity": lambda z: z,
                   "LeakyReLU": lambda z: nn.leaky_relu(z, 0.01)}
    if name not in activations:
        raise PeerUnsupported(f"no jax activation mapped for {name}")
    return activations[name]


def jax_mean_cross_entropy(logits, labels):
    """Mean softmax cross-entropy of jax logits `(B, C)` against integer labels `(B,)`."""
    jnp = importlib.import_module("jax.numpy")
    logsumexp = importlib.import_module("jax.scipy.special").logsumexp
    logp = logits - logsumexp(logits, axis=1, keepdims=True)
    return -jnp.mean(jnp.take_along_axis(logp, labels[:, None], axis=1))


def _jax_grad(spec, weights, x, labels):
    jax, jnp = import_jax(spec.dtype)
    activation = jax_activation(spec.activation)

    def loss(params, xj, lj):
        h = xj
        for index, (W, b) in enumerate(params):
            h = h @ W.T + b
            if index < len(params) - 1:
                h = activation(h)
        return jax_mean_cross_entropy(h, lj)

    step = jax.jit(jax.value_and_grad(loss))
    params = [(jnp.asarray(W), jnp.asarray(b)) for W, b in weights]
    xj, lj = jnp.asarray(x), jnp.asarray(labels)

    def run():
        return jax.block_until_ready(step(params, xj, lj))

    def convert(out):
        value, grads = out
        return float(value), [(np.asarray(dW), np.asarray(db)) for dW, db in grads]

    return run, convert, False


# ---- autograd ---------------------------------------------------------------------
def _autograd_grad(spec, weights, x, labels):
    autograd = import_peer("autograd")
    anp = importlib.import_module("autograd.numpy")
    special = importlib.import_module("autograd.scipy.special")
    activations = {"ReLU": lambda z: anp.maximum(z, 0.0), "Tanh": anp.tanh,
                   "Sigmoid": lambda z: 0.5 * (anp.tanh(0.5 * z) + 1.0),
                   "Softplus": lambda z: anp.logaddexp(0.0, z), "Identity": lambda z: z,
                   "LeakyReLU": lambda z: anp.where(z > 0, z, 0.01 * z)}
    if spec.activation not in activations:
        raise PeerUnsupported(f"no autograd activation mapped for {spec.activation}")
    activation = activations[spec.activation]
    rows = np.arange(x.shape[0])

    def loss(params):
        h = x
        for index, (W, b) in enumerate(params):
            h = anp.dot(h, W.T) + b
            if index < len(params) - 1:
                h = activation(h)
        logp = h - special.logsumexp(h, axis=1, keepdims=True)
        return -anp.mean(logp[rows, labels])

    step = autograd.value_and_grad(loss)
    params = [(W.copy(), b.copy()) for W, b in weights]

    def run():
        return step(params)

    def convert(out):
        value, grads = out
        return float(value), [(np.asarray(dW), np.asarray(db)) for dW, db in grads]

    return run, convert, True


# ---- scikit-learn -----------------------------------------------------------------
_SKLEARN_ACTIVATIONS = {"ReLU": "relu", "Tanh": "tanh", "Sigmoid": "logistic",
                        "Identity": "identity"}


def _sklearn_grad(spec, weights, x, labels):
    import_peer("sklearn")
    from sklearn.neural_network import MLPClassifier

    if spec.activation not in _SKLEARN_ACTIVATIONS:
        raise PeerUnsupported(f"MLPClassifier has no {spec.activation} activation")
    # MLPClassifier's private `_backprop` is its loss-and-gradient step; it
    # needs only the attributes `fit` would set. Its weights are stored
    # transposed, `(in, out)`. alpha=0 switches the L2 penalty off.
    model = MLPClassifier(hidden_layer_sizes=tuple(spec.sizes[1:-1]),
                          activation=_SKLEARN_ACTIVATIONS[spec.activation], alpha=0.0)
    model.coefs_ = [np.ascontiguousarray(W.T) for W, _ in weights]
    model.intercepts_ = [b.copy() for _, b in weights]
    model.n_layers_ = len(weights) + 1
    model.out_activation_ = "softmax"
    onehot = np.zeros((x.shape[0], spec.classes), dtype=x.dtype)
    onehot[np.arange(x.shape[0]), labels] = 1.0
    n_layers = model.n_layers_
    coef_grads = [np.empty_like(c) for c in model.coefs_]
    intercept_grads = [np.empty_like(b) for b in model.intercepts_]

    def run():
        activations = [x] + [None] * (n_layers - 1)
        deltas = [None] * (n_layers - 1)
        return model._backprop(x, onehot, None, activations, deltas, coef_grads,
                               intercept_grads)

    def convert(out):
        value, coefs, intercepts = out
        return float(value), [(dW.T, db) for dW, db in zip(coefs, intercepts, strict=True)]

    return run, convert, True
