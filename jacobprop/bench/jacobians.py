"""Workloads for Jacobians beyond the gradient: jacobian (with peers), ntk, per-sample, curvature.

Each builder turns one `MLPSpec` into a `Group` (see `workloads.py`). The
hand-written NumPy baselines here use the same structure the engine uses
(they are what a careful person would write for this MLP by hand); the peers
are the idiomatic fast paths of torch.func and jitted JAX, built lazily and
skipped with one line when missing.
"""

from __future__ import annotations

import importlib

import numpy as np

from .. import ggn, hessian, ntk
from ..flat import FlatParams
from .models import (
    REFERENCE_ACTIVATIONS,
    MLPSpec,
    build_mlp,
    dense_weights,
    forward_flops,
    reference_forward,
    relative_deviation,
)
from .peers import PeerUnsupported, import_jax, import_peer, jax_activation, torch_activation
from .timing import Case
from .workloads import JACOBIAN_ORDERS, Group, _float64_twin, _peer_case

__all__ = ["jacobian_group", "ntk_group", "per_sample_group", "curvature_group",
           "numpy_ntk", "numpy_per_sample", "numpy_curvature_product"]


# ---- peers: the same MLP as a function of one sample -----------------------------------
def _jax_model(spec: MLPSpec, weights):
    """`(jax, jnp, f, params)`: `f(params, x)` maps one sample `(n,)` to `(m,)`."""
    jax, jnp = import_jax(spec.dtype)
    activation = jax_activation(spec.activation)

    def f(params, x):
        h = x
        for index, (W, b) in enumerate(params):
            h = W @ h + b
            if index < len(params) - 1:
                h = activation(h)
        return h

    params = [(jnp.asarray(W), jnp.asarray(b)) for W, b in weights]
    return jax, jnp, f, params


def _torch_model(spec: MLPSpec, weights):
    """`(torch, f, params)`: `f(params, x)` maps one sample `(n,)` to `(m,)`."""
    torch = import_peer("torch")
    functional = torch.nn.functional
    activation = torch_activation(spec.activation)

    def f(params, x):
        h = x
        for index, (W, b) in enumerate(params):
            h = functional.linear(h, W, b)
            if index < len(params) - 1:
                h = activation(h)
        return h

    params = tuple((torch.tensor(np.array(W)), torch.tensor(np.array(b))) for W, b in weights)
    return torch, f, params


def _flat_pairs(pairs) -> np.ndarray:
    return np.concatenate([np.asarray(a).reshape(-1) for pair in pairs for a in pair])


# ---- jacobian ------------------------------------------------------------------------
def jacobian_group(spec: MLPSpec, *, seed: int = 0, peers=(), samples: int = 4):
    """Full per-sample `net.jacobian(x).to_dense()` by each order and by the peers.

    Baseline: `auto`. The correctness column compares the first `samples`
    blocks with central differences of the float64 network. The group's
    `extra` holds every order's plan (predicted flops and peak bytes).
    """
    from .. import numerical_jacobian

    net, x, _, _ = build_mlp(spec, rng=np.random.default_rng(seed))
    twin = _float64_twin(net, spec, seed)
    want = numerical_jacobian(twin, x[:samples])
    against = f"float64 central differences (first {want.shape[0]} samples)"

    def check(result):
        return relative_deviation(np.asarray(result)[: want.shape[0]], want), against

    plans = {order: net.jacobian(x, order=order).plan for order in JACOBIAN_ORDERS}
    cases = [
        Case(order, lambda order=order: net.jacobian(x, order=order).to_dense(), check,
             flops=float(plans[order].flops),
             extra={"plan": plans[order].describe(), "cost_estimate": plans[order].flops,
                    "predicted_peak_bytes": plans[order].peak_bytes})
        for order in JACOBIAN_ORDERS
    ]
    weights = dense_weights(net)
    for peer in peers:
        for mode in ("jacrev", "jacfwd"):
            path = f"{peer}-{mode}"
            cases.append(_peer_case(path, peer, lambda peer=peer, mode=mode, path=path: Case(
                path, *_jacobian_peer(peer, mode, spec, weights, x), check=check,
                traced=False, peer=peer)))
    extra = {"plan": plans["auto"].describe(),
             "cost_estimate": {order: plans[order].flops for order in JACOBIAN_ORDERS}}
    return Group("jacobian", spec, "auto", against, cases, extra=extra)


def _jacobian_peer(peer, mode, spec, weights, x):
    """`(run,)` returning the peer's `(B, m, n)` Jacobian (converted by `check`)."""
    if peer == "jax":
        jax, jnp, f, params = _jax_model(spec, weights)
        transform = jax.jacrev if mode == "jacrev" else jax.jacfwd
        fn = jax.jit(jax.vmap(transform(f, argnums=1), in_axes=(None, 0)))
        xj = jnp.asarray(x)
        return (lambda: jax.block_until_ready(fn(params, xj)),)
    if peer == "torch":
        torch, f, params = _torch_model(spec, weights)
        func = torch.func
        transform = func.jacrev if mode == "jacrev" else func.jacfwd
        fn = func.vmap(transform(f, argnums=1), in_dims=(None, 0))
        xt = torch.tensor(x)
        return (lambda: fn(params, xt).numpy(),)
    raise PeerUnsupported(f"peer {peer!r} has no Jacobian path here")


# ---- ntk -----------------------------------------------------------------------------
def numpy_ntk(weights, x, activation="ReLU", trace=False):
    """The empirical NTK of an MLP, written out with the layer structure.

    `Theta = sum_l (L_l L_l^T) * (A_l A_l^T + 1)` with `A_l` the inputs of
    Dense layer l and `L_l = dy/dz_l` `(B, m, width_l)`, built from the output
    down: `L_last = I`, `L_{l-1} = (L_l W_l) * f'(z_{l-1})`. Returns
    `(B, B, m, m)` (or `(B, B)` with `trace`).
    """
    backward = REFERENCE_ACTIVATIONS[activation][1]
    last = len(weights) - 1
    inputs, h = reference_forward(weights, x, activation)
    batch, m = h.shape
    kernel = np.zeros((batch, batch) if trace else (batch, m, batch, m), dtype=x.dtype)
    gram_in = inputs[last] @ inputs[last].T + 1
    if trace:
        kernel += m * gram_in
    else:
        idx = np.arange(m)
        kernel[:, idx, :, idx] += gram_in
    L = None
    for index in range(last, 0, -1):
        W = weights[index][0]
        L = np.broadcast_to(W, (batch, *W.shape)).copy() if L is None else L @ W
        backward(L, inputs[index][:, None, :])
        gram_in = inputs[index - 1] @ inputs[index - 1].T + 1
        if trace:
            flat = L.reshape(batch, -1)
            kernel += (flat @ flat.T) * gram_in
        else:
            flat = L.reshape(batch * m, -1)
            gram = (flat @ flat.T).reshape(batch, m, batch, m)
            gram *= gram_in[:, None, :, None]
            kernel += gram
    return kernel if trace else kernel.transpose(0, 2, 1, 3)


def ntk_group(spec: MLPSpec, *, seed: int = 0, peers=()):
    """`jp.ntk(net, x)` (x1 = x2 = the batch), full and traced; baseline: structured NumPy."""
    net, x, _, _ = build_mlp(spec, rng=np.random.default_rng(seed))
    weights = dense_weights(net)
    twin = _float64_twin(net, spec, seed)
    x64 = x.astype(np.float64)
    has_reference = spec.activation in REFERENCE_ACTIVATIONS
    if spec.batch * spec.classes * spec.n_params * 8 <= 256 * 2**20:
        dense = twin.param_jacobian(x64).to_dense()
        want = np.einsum("aip,bjp->abij", dense, dense)
        against = "float64 explicit J J^T from the dense parameter Jacobian"
    else:
        want = ntk(twin, x64)
        against = "float64 jp.ntk"

    def check(result):
        result = np.asarray(result)
        if result.ndim == 2:
            return relative_deviation(result, np.einsum("abii->ab", want)), against
        return relative_deviation(result, want), against

    flops = _ntk_flops(spec)
    cases = []
    if has_reference:
        cases.append(Case("numpy-structured", lambda: numpy_ntk(weights, x, spec.activation),
                          check, flops=flops))
        cases.append(Case("numpy-structured-trace",
                          lambda: numpy_ntk(weights, x, spec.activation, trace=True), check))
    else:
        cases.append(Case("numpy-structured",
                          skip=f"no hand-written reference for {spec.activation}"))
    cases.append(Case("ntk", lambda: np.ascontiguousarray(ntk(net, x)), check, flops=flops))
    cases.append(Case("ntk-trace", lambda: ntk(net, x, trace=True), check))
    for peer in peers:
        path = f"{peer}-jacobian-contraction"
        cases.append(_peer_case(path, peer, lambda peer=peer, path=path: Case(
            path, _ntk_peer(peer, spec, weights, x), check, traced=False, peer=peer)))
    baseline = "numpy-structured" if has_reference else "ntk"
    return Group("ntk", spec, baseline, against, cases)


def _ntk_flops(spec):
    """Matmul flops of the structured NTK: the Gram products of each layer."""
    sizes, batch, m = spec.sizes, spec.batch, spec.classes
    total = 0
    for a, b in zip(sizes[:-1], sizes[1:], strict=True):
        total += 2 * batch * batch * a  # input Gram
        total += 2 * (batch * m) ** 2 * b  # output-side Gram
    return float(total)


def _ntk_peer(peer, spec, weights, x):
    """The NTK by Jacobian contraction: per-sample parameter Jacobians, then J J^T."""
    if peer == "jax":
        jax, jnp, f, params = _jax_model(spec, weights)

        def kernel(params, xs):
            jac = jax.vmap(jax.jacrev(f, argnums=0), in_axes=(None, 0))(params, xs)
            leaves = jax.tree_util.tree_leaves(jac)
            flat = [leaf.reshape(leaf.shape[0], leaf.shape[1], -1) for leaf in leaves]
            return sum(jnp.einsum("aip,bjp->abij", j, j) for j in flat)

        fn = jax.jit(kernel)
        xj = jnp.asarray(x)
        return lambda: jax.block_until_ready(fn(params, xj))
    if peer == "torch":
        torch, f, params = _torch_model(spec, weights)
        func = torch.func
        jac_fn = func.vmap(func.jacrev(f, argnums=0), in_dims=(None, 0))
        xt = torch.tensor(x)

        def run():
            jac = jac_fn(params, xt)
            total = 0
            for pair in jac:
                for j in pair:
                    j = j.reshape(j.shape[0], j.shape[1], -1)
                    total = total + torch.einsum("aip,bjp->abij", j, j)
            return total.numpy()

        return run
    raise PeerUnsupported(f"peer {peer!r} has no NTK path here")


# ---- per-sample gradients --------------------------------------------------------------
def numpy_per_sample(weights, x, labels, activation="ReLU"):
    """Per-sample gradients of the mean cross-entropy: `[(dW (B, m, n), db (B, m))]`.

    The batch backward of `reference_value_and_grad`, with `dW_l` replaced by
    the einsum of per-sample outer products `G_i a_i^T`.
    """
    backward = REFERENCE_ACTIVATIONS[activation][1]
    batch = x.shape[0]
    last = len(weights) - 1
    inputs, y = reference_forward(weights, x, activation)
    y -= y.max(axis=1, keepdims=True)
    p = np.exp(y)
    p /= p.sum(axis=1, keepdims=True)
    p[np.arange(batch), labels] -= 1.0
    p *= 1.0 / batch
    g = p
    grads = [None] * len(weights)
    for index in range(last, -1, -1):
        grads[index] = (np.einsum("bi,bj->bij", g, inputs[index]), g)
        if index > 0:
            g = g @ weights[index][0]
            backward(g, inputs[index])
    return grads


def per_sample_group(spec: MLPSpec, *, seed: int = 0, peers=()):
    """Per-sample gradients and their norms; baseline: the NumPy einsum of outer products.

    Rows: `per-sample` (materialized, `value_and_grad(per_sample=True)`),
    `norms` (`per_sample_grad_norms`), `batch-grad` (the ordinary
    `value_and_grad`, what the norms are compared with) and the peers'
    `vmap(grad)`.
    """
    net, x, labels, loss = build_mlp(spec, rng=np.random.default_rng(seed))
    weights = dense_weights(net)
    twin = _float64_twin(net, spec, seed)
    x64 = x.astype(np.float64)
    _, truth = twin.value_and_grad(x64, labels, loss, per_sample=True)
    want = [truth[key] for key in net.params]
    want_norms = np.sqrt(sum(np.sum(w.reshape(spec.batch, -1) ** 2, axis=1) for w in want))
    _, batch_truth = twin.value_and_grad(x64, labels, loss)
    against = "float64 jacobprop per-sample gradients"

    def check_pairs(pairs):
        return relative_deviation([a for pair in pairs for a in pair], want), against

    def check_engine(result):
        return relative_deviation([result[1][key] for key in net.params], want), against

    def check_norms(result):
        return relative_deviation(result, want_norms), "float64 norms of the per-sample gradients"

    def check_batch(result):
        return (relative_deviation([result[1][key] for key in net.params],
                                   [batch_truth[key] for key in net.params]),
                "float64 jacobprop batch gradient")

    cases = []
    if spec.activation in REFERENCE_ACTIVATIONS:
        cases.append(Case("numpy-einsum",
                          lambda: numpy_per_sample(weights, x, labels, spec.activation),
                          check_pairs))
        baseline = "numpy-einsum"
    else:
        cases.append(Case("numpy-einsum",
                          skip=f"no hand-written reference for {spec.activation}"))
        baseline = "per-sample"
    cases.append(Case("per-sample",
                      lambda: net.value_and_grad(x, labels, loss, per_sample=True),
                      check_engine))
    cases.append(Case("norms", lambda: net.per_sample_grad_norms(x, labels, loss), check_norms))
    cases.append(Case("batch-grad", lambda: net.value_and_grad(x, labels, loss), check_batch))
    for peer in peers:
        path = f"{peer}-vmap-grad"
        cases.append(_peer_case(path, peer, lambda peer=peer, path=path: Case(
            path, _per_sample_peer(peer, spec, weights, x, labels), check_pairs,
            traced=False, peer=peer)))
    return Group("per-sample", spec, baseline, against, cases)


def _per_sample_peer(peer, spec, weights, x, labels):
    """`vmap(grad)` of one sample's cross-entropy / B: the per-sample share of the mean."""
    batch = x.shape[0]
    if peer == "jax":
        jax, jnp, f, params = _jax_model(spec, weights)
        logsumexp = importlib.import_module("jax.scipy.special").logsumexp

        def one(params, xi, li):
            y = f(params, xi)
            return (logsumexp(y) - y[li]) / batch

        fn = jax.jit(jax.vmap(jax.grad(one), in_axes=(None, 0, 0)))
        xj, lj = jnp.asarray(x), jnp.asarray(labels)

        def run():
            return [(np.asarray(dW), np.asarray(db))
                    for dW, db in jax.block_until_ready(fn(params, xj, lj))]

        return run
    if peer == "torch":
        torch, f, params = _torch_model(spec, weights)
        func = torch.func

        def one(params, xi, onehot):
            # A one-hot row, not `y[label]`: vmap cannot index by a batched tensor.
            y = f(params, xi)
            return (torch.logsumexp(y, 0) - (y * onehot).sum()) / batch

        fn = func.vmap(func.grad(one), in_dims=(None, 0, 0))
        onehot = np.zeros((batch, spec.classes), dtype=x.dtype)
        onehot[np.arange(batch), labels] = 1.0
        xt, lt = torch.tensor(x), torch.tensor(onehot)

        def run():
            return [(dW.numpy(), db.numpy()) for dW, db in fn(params, xt, lt)]

        return run
    raise PeerUnsupported(f"peer {peer!r} has no per-sample gradient path here")


# ---- curvature -------------------------------------------------------------------------
class _NumpyCurvature:
    """GGN and (for piecewise-linear activations) Hessian products of the MLP by hand.

    The forward pass, the softmax probabilities and (for the Hessian) the
    backward covectors are computed once here, as in the engine's operators.
    """

    def __init__(self, weights, x, labels, activation):
        self.backward = REFERENCE_ACTIVATIONS[activation][1]
        self.weights, self.batch = weights, x.shape[0]
        last = len(weights) - 1
        inputs, h = reference_forward(weights, x, activation)
        self.inputs = inputs
        p = np.exp(h - h.max(axis=1, keepdims=True))
        p /= p.sum(axis=1, keepdims=True)
        self.p = p
        g = p.copy()
        g[np.arange(self.batch), labels] -= 1.0
        g /= self.batch
        covectors = [None] * len(weights)
        for index in range(last, -1, -1):
            covectors[index] = g
            if index > 0:
                g = g @ weights[index][0]
                self.backward(g, inputs[index])
        self.covectors = covectors

    def product(self, tangents, exact):
        """`C v` with `tangents` = `[(dW, db)]`; `exact` adds the Dense second-order terms."""
        weights, inputs = self.weights, self.inputs
        last = len(weights) - 1
        rs = [None] * len(weights)  # tangent of each Dense input
        r = None
        for index, (W, _) in enumerate(weights):
            rs[index] = r
            dW, db = tangents[index]
            out = inputs[index] @ dW.T + db
            if r is not None:
                out += r @ W.T
            if index < last:
                self.backward(out, inputs[index + 1])
            r = out
        p = self.p
        rg = p * (r - np.einsum("bm,bm->b", p, r)[:, None]) / self.batch
        result = [None] * len(weights)
        for index in range(last, -1, -1):
            W = weights[index][0]
            dW_out = rg.T @ inputs[index]
            if exact and rs[index] is not None:
                dW_out += self.covectors[index].T @ rs[index]
            result[index] = (dW_out, rg.sum(axis=0))
            if index > 0:
                rg = rg @ W
                if exact:
                    rg += self.covectors[index] @ tangents[index][0]
                self.backward(rg, inputs[index])
        return result


def numpy_curvature_product(weights, x, labels, activation="ReLU"):
    """A `_NumpyCurvature` for the MLP (forward cached), for benchmarks and tests."""
    return _NumpyCurvature(weights, x, labels, activation)


def curvature_group(spec: MLPSpec, *, seed: int = 0, peers=()):
    """One GGN and one Hessian product `C v`, forward cached; baseline: NumPy GGN product."""
    net, x, labels, loss = build_mlp(spec, rng=np.random.default_rng(seed))
    weights = dense_weights(net)
    flat = FlatParams(net.params)
    v = np.random.default_rng(seed + 2).standard_normal(flat.size).astype(spec.dtype)
    tangents = flat.unflatten(v)
    pairs = [(tangents[f"{i}.W"], tangents[f"{i}.b"])
             for i in range(0, 2 * spec.depth - 1, 2)]
    twin = _float64_twin(net, spec, seed)
    x64 = x.astype(np.float64)
    v64 = v.astype(np.float64)
    want_ggn = ggn(twin, x64, labels, loss) @ v64
    want_hessian = hessian(twin, x64, labels, loss) @ v64
    against = "float64 jacobprop products"

    def check_with(want, what):
        def check(result):
            got = result if isinstance(result, np.ndarray) else _flat_pairs(result)
            return relative_deviation(got, want), what
        return check

    G = ggn(net, x, labels, loss)
    H = hessian(net, x, labels, loss)
    flops = 4 * forward_flops(spec)
    cases = []
    piecewise_linear = spec.activation in ("ReLU", "LeakyReLU", "Identity")
    if spec.activation in REFERENCE_ACTIVATIONS:
        by_hand = numpy_curvature_product(weights, x, labels, spec.activation)
        cases.append(Case("numpy-ggn", lambda: by_hand.product(pairs, False),
                          check_with(want_ggn, against), flops=flops))
        if piecewise_linear:
            cases.append(Case("numpy-hessian", lambda: by_hand.product(pairs, True),
                              check_with(want_hessian, against), flops=flops))
        baseline = "numpy-ggn"
    else:
        cases.append(Case("numpy-ggn", skip=f"no hand-written reference for {spec.activation}"))
        baseline = "ggn"
    cases.append(Case("ggn", lambda: G @ v, check_with(want_ggn, against), flops=flops))
    cases.append(Case("hessian", lambda: H @ v, check_with(want_hessian, against), flops=flops))
    for peer in peers:
        for exact in (False, True):
            path = f"{peer}-{'hvp' if exact else 'ggn'}"
            want = want_hessian if exact else want_ggn
            cases.append(_peer_case(path, peer, lambda peer=peer, exact=exact, path=path,
                                    want=want: Case(
                path, _curvature_peer(peer, exact, spec, weights, x, labels, pairs),
                check_with(want, against), traced=False, peer=peer)))
    return Group("curvature", spec, baseline, against, cases)


def _curvature_peer(peer, exact, spec, weights, x, labels, pairs):
    """One curvature product by the peer with the forward pass cached where it can be."""
    batch = x.shape[0]
    if peer == "jax":
        jax, jnp, f, params = _jax_model(spec, weights)
        logsumexp = importlib.import_module("jax.scipy.special").logsumexp
        xj, lj = jnp.asarray(x), jnp.asarray(labels)
        vj = [(jnp.asarray(dW), jnp.asarray(db)) for dW, db in pairs]
        batched = jax.vmap(f, in_axes=(None, 0))

        def outputs(params):
            return batched(params, xj)

        if exact:
            def loss(params):
                y = outputs(params)
                return jnp.mean(logsumexp(y, axis=1) - jnp.take_along_axis(
                    y, lj[:, None], axis=1)[:, 0])

            _, product = jax.linearize(jax.grad(loss), params)
        else:
            y, jvp_fn = jax.linearize(outputs, params)
            vjp_fn = jax.linear_transpose(jvp_fn, params)
            p = jax.nn.softmax(y, axis=1)

            def product(v):
                u = jvp_fn(v)
                hu = p * (u - jnp.sum(p * u, axis=1, keepdims=True)) / batch
                return vjp_fn(hu)[0]

        fn = jax.jit(product)
        return lambda: jax.block_until_ready(fn(vj))
    if peer == "torch":
        torch, f, params = _torch_model(spec, weights)
        func = torch.func
        functional = torch.nn.functional
        xt, lt = torch.tensor(x), torch.tensor(labels, dtype=torch.int64)
        vt = tuple((torch.tensor(np.array(dW)), torch.tensor(np.array(db))) for dW, db in pairs)
        batched = func.vmap(f, in_dims=(None, 0))

        def outputs(params):
            return batched(params, xt)

        if exact:
            def loss(params):
                return functional.cross_entropy(outputs(params), lt)

            grad_fn = func.grad(loss)

            def run():
                return [(a.numpy(), b.numpy())
                        for a, b in func.jvp(grad_fn, (params,), (vt,))[1]]

            return run
        y, vjp_fn = func.vjp(outputs, params)
        p = torch.softmax(y.detach(), dim=1)

        def run():
            u = func.jvp(outputs, (params,), (vt,))[1]
            hu = p * (u - (p * u).sum(dim=1, keepdim=True)) / batch
            return [(a.numpy(), b.numpy()) for a, b in vjp_fn(hu)[0]]

        return run
    raise PeerUnsupported(f"peer {peer!r} has no curvature path here")

