"""Jacobians beyond the gradient: per-sample gradients, parameter Jacobians, NTK, curvature.

Everything here is built from the per-layer operators and products the
layers already state, walking the network's leaves (nested `Sequential`s are
flattened, keys stay `"<index>.<index>.<name>"`):

- per-sample gradients: the covector `g_l` reaching each layer is pushed
  through the layer's parameter Jacobians without summing over the batch
  (for Dense, the outer products `g_i x_i^T`); their norms use
  `||g_i x_i^T||_F = ||g_i|| ||x_i||` and never form them;
- the parameter Jacobian `dy_i/dtheta` `(B, m, P)` as an operator over the
  flat parameter vector (`FlatParams` order), one structured block per
  parameter;
- the empirical NTK `Theta(x1, x2)_ab = sum_p J_p(x1_a) J_p(x2_b)^T` from the
  same blocks: for a Kronecker block `L_a (kron) x_a^T`, the product is
  `(L_a L_b^T) <x_a, x_b>`, so a layer costs one Gram of its output-side
  factor and one of its inputs (the "structured derivatives" of Novak et
  al. 2022), never `(B, m, P)`;
- curvature: the Gauss-Newton matrix `J^T H_loss J` and the exact Hessian
  by the R-operator (Pearlmutter 1994), as `scipy.sparse.linalg.LinearOperator`s
  on the flat parameters. The forward pass (and for the Hessian the
  backward covectors) are computed once when the operator is built.

Every per-sample quantity needs samples that do not interact: a network
with a layer whose `couples_samples` is True (BatchNorm in train mode) is
refused with an error naming that layer.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
from scipy.sparse.linalg import LinearOperator

from .errors import ShapeError, check_positive_int
from .flat import FlatParams
from .jacobian import (
    GeneralJacobian,
    IdentityJacobian,
    Jacobian,
    KroneckerJacobian,
    SharedJacobian,
    _TransposedJacobian,
)
from .losses import Loss, check_loss
from .network import Sequential
from .plan import ChainPlan, _items, _plan_items

__all__ = [
    "ParamJacobian",
    "param_jacobian",
    "ntk",
    "per_sample_value_and_grad",
    "per_sample_grad_norms",
    "ggn",
    "hessian",
    "jacobian_in_pieces",
]


# ---- walking the network ----------------------------------------------------------
class _Leaf(NamedTuple):
    layer: object  # a non-Sequential Layer
    cache: object  # its cache from the forward pass
    keys: dict  # parameter name -> key in `net.params`


def _leaves(net, cache, prefix: str = "") -> list[_Leaf]:
    """The non-Sequential layers of `net` in order, with their caches and full keys."""
    leaves = []
    # The stack's own key table when it is the outermost one (formatted once, in
    # Sequential.__init__); nested stacks prefix their keys with their index.
    own_keys = net._keys if not prefix else None
    for index, (layer, layer_cache) in enumerate(zip(net.layers, cache.caches, strict=True)):
        if isinstance(layer, Sequential):
            leaves.append(_leaves(layer, layer_cache, f"{prefix}{index}."))
            continue
        if own_keys is not None:
            keys = own_keys[index]
        else:
            keys = {name: f"{prefix}{index}.{name}" for name in layer.params}
        leaves.append([_Leaf(layer, layer_cache, keys)])
    return [leaf for group in leaves for leaf in group]


def _coupling_layer(net, path: str = "") -> str | None:
    """`"<index> (<layer>)"` of the first layer that couples samples, or None."""
    for index, layer in enumerate(net.layers):
        if not layer.couples_samples:
            continue
        if isinstance(layer, Sequential):
            inner = _coupling_layer(layer, f"{path}{index}.")
            if inner is not None:
                return inner
        return f"{path}{index} ({layer!r})"
    return None


def _refuse_coupled(net, what: str) -> None:
    where = _coupling_layer(net)
    if where is not None:
        raise ValueError(
            f"{what}: layer {where} couples samples (its output depends on other samples "
            f"of the batch, e.g. BatchNorm in train mode), so per-sample derivatives are "
            f"not defined; call net.eval() first or use the batch gradient"
        )


def _check_per_sample(net, loss, where: str) -> None:
    """Per-sample gradients need a loss that sums over samples and samples that never meet."""
    check_loss(loss, where=where)
    _refuse_coupled(net, where)
    if not loss.separable:
        raise ValueError(f"{where}: {type(loss).__name__} is not a sum of per-sample losses, "
                         "so it has no per-sample gradients")


def _forward_and_loss(net, x, t, loss):
    y, cache = net._forward(net._check_input(x))
    t = loss._validated_target(y, t)
    value, g = loss._call_value_and_grad(y, t)
    return y, t, cache, value, g


# ---- per-sample gradients ------------------------------------------------------------
def per_sample_value_and_grad(net, x, t, loss: Loss):
    """`(L, grads)` with every gradient `(B, *p.shape)`: sample i's share of `dL/dp`.

    With the loss's reduction weight `w` (1/B for "mean"), entry i is
    `w dl(y_i, t_i)/dp`, so the per-sample gradients sum to the batch gradient.
    """
    _check_per_sample(net, loss, "Sequential.value_and_grad(per_sample=True)")
    _, _, cache, value, g = _forward_and_loss(net, x, t, loss)
    return value, _block_per_sample(net, cache, g, norms=False)


def per_sample_grad_norms(net, x, t, loss: Loss) -> np.ndarray:
    """`(B,)`: the Euclidean norm of each sample's gradient over all parameters.

    Each layer states the squared norms of its unsummed parameter vjps
    (`Layer._per_sample_sq_norms`, by default from each parameter Jacobian's
    `_vjp_sq_norms`): for Dense, `||g_i x_i^T||^2 = ||g_i||^2 ||x_i||^2` and
    `||g_i||^2` for the bias, so no per-sample gradient is formed and the
    cost is about one batch gradient.
    """
    _check_per_sample(net, loss, "Sequential.per_sample_grad_norms")
    _, _, cache, _, g = _forward_and_loss(net, x, t, loss)
    total = _block_per_sample(net, cache, g, norms=True)
    if total is None:  # no parameters
        return np.zeros(g.shape[0], dtype=g.dtype)
    return np.sqrt(np.asarray(total, dtype=g.dtype))


# ---- the parameter Jacobian -----------------------------------------------------------
class ParamJacobian(Jacobian):
    """`dy_i/dtheta` for the flat parameter vector: one block per parameter, side by side.

    Parameters
    ----------
    blocks : dict[str, Jacobian]
        `dy/dvec(p)` per parameter key, each `(B, m, p.size)`, in `params` order.

    Notes
    -----
    The block of sample i is `[J_1(i) | J_2(i) | ...]`, shape `(m, P)` with
    `P = sum_p p.size`; `vjp(g)_i` concatenates the blocks' vjps and
    `jvp(v)_i = sum_p J_p(i) v_i[slot p]`. `to_dense()` is `(B, m, P)`.
    """

    kind = "parameters"

    def __init__(self, blocks: dict):
        if not blocks:
            raise ValueError("ParamJacobian: needs at least one parameter block")
        ops = list(blocks.values())
        batch, m, _ = ops[0].shape
        for key, op in blocks.items():
            if op.shape[:2] != (batch, m):
                raise ShapeError(f"ParamJacobian: block {key!r} has shape {op.shape}, expected "
                                 f"({batch}, {m}, ...)")
        self.blocks = dict(blocks)
        bounds = np.cumsum([0] + [op.in_dim for op in ops])
        self._slices = [slice(int(a), int(b)) for a, b in zip(bounds[:-1], bounds[1:],
                                                                strict=True)]
        self.shape = (batch, m, int(bounds[-1]))
        self.dtype = np.result_type(*[op.dtype for op in ops])

    def _ops(self):
        return zip(self.blocks.values(), self._slices, strict=True)

    def _vjp(self, g):
        return np.concatenate([op._call_vjp(g) for op in self.blocks.values()], axis=1)

    def _jvp(self, v):
        total = None
        for op, where in self._ops():
            part = op._call_jvp(np.ascontiguousarray(v[:, where]))
            total = part if total is None else total + part
        return total

    def _sum_vjp(self, g):
        return np.concatenate([op._sum_vjp(g) for op in self.blocks.values()])

    def _to_dense(self):
        return np.concatenate([op._dense_view() for op in self.blocks.values()], axis=2)

    def _transpose(self):
        return _TransposedJacobian(self)

    def _take(self, index):
        return ParamJacobian({key: op._take(index) for key, op in self.blocks.items()})

    def _apply(self, right):
        total = None
        for op, where in self._ops():
            part = op._apply(right[..., where, :])
            total = part if total is None else total + part
        return total

    def _rapply(self, left):
        return np.concatenate([op._rapply(left) for op in self.blocks.values()], axis=-1)

    def _vjp_sq_norms(self, g):
        return sum(op._vjp_sq_norms(g) for op in self.blocks.values())


def param_jacobian(net, x) -> ParamJacobian:
    """`dy_i/dtheta` `(B, m, P)` over the flat parameters (`params` order, each C-order).

    Each block is `(J_L ... J_{l+1}) @ dy_l/dvec(p)`, kept structured (for
    Dense weights a Kronecker block over the layer input), so the operator
    stores about `B m` numbers per layer width, never `B m P`.
    """
    _refuse_coupled(net, "Sequential.param_jacobian")
    _, cache = net._forward(net._check_input(x))
    blocks = net._param_jacobians(cache)
    if not blocks:
        raise ValueError("Sequential.param_jacobian: the network has no parameters")
    return ParamJacobian(blocks)


# ---- the neural tangent kernel -------------------------------------------------------
def ntk(net, x1, x2=None, *, trace: bool = False) -> np.ndarray:
    """The empirical neural tangent kernel `Theta(x1, x2) = J(x1) J(x2)^T`.

    Parameters
    ----------
    net : Sequential
    x1 : ndarray `(B1, n)`
    x2 : ndarray `(B2, n)`, optional
        Defaults to `x1`.
    trace : bool
        Return the trace over outputs, `(B1, B2)`, instead of the full kernel.

    Returns
    -------
    ndarray `(B1, B2, m, m)` (block `[a, b]` is `J(x1_a) J(x2_b)^T`), or `(B1, B2)`.

    Notes
    -----
    `Theta_ab = sum_p J_p(a) J_p(b)^T` over the parameter blocks. A Kronecker
    block `L_a (kron) x_a^T` (a Dense weight) gives `(L_a L_b^T) <x_a, x_b>`;
    blocks that share their output-side factor `L` (a Dense layer's weight and
    bias) share its Gram, so each layer costs one `(B1 m, k) @ (k, B2 m)`
    product and one Gram of its inputs, and `(B, m, P)` is never formed.
    """
    if not isinstance(net, Sequential):
        raise TypeError(f"ntk: `net` must be a jacobprop Sequential, got {type(net).__name__}")
    _refuse_coupled(net, "ntk")
    _, cache1 = net._forward(net._check_input(x1, where="ntk `x1`"))
    blocks1 = net._param_jacobians(cache1)
    if x2 is None:
        blocks2 = blocks1
    else:
        _, cache2 = net._forward(net._check_input(x2, where="ntk `x2`"))
        blocks2 = net._param_jacobians(cache2)
    groups = _shared_factor_groups(blocks1, blocks2)
    batch1, m = cache1.y.shape
    batch2 = cache1.y.shape[0] if x2 is None else cache2.y.shape[0]
    dtype = cache1.y.dtype
    # Accumulated as (B1, m, B2, m): the layout the Gram products come out in.
    kernel = np.zeros((batch1, batch2) if trace else (batch1, m, batch2, m), dtype=dtype)
    for left1, left2, factor in groups:
        _add_factor_gram(kernel, left1, left2, factor, trace, same=x2 is None)
    return kernel if trace else kernel.transpose(0, 2, 1, 3)


def _shared_factor_groups(blocks1, blocks2):
    """`[(L1, L2, input Gram or 1.0)]`: blocks grouped by their output-side factor.

    A block `L (kron) x^T` contributes `<x_a, x_b>` to its factor's weight; a
    block with no Kronecker form is its own factor `L` with weight 1.
    """
    groups = {}
    for key, op1 in blocks1.items():
        op2 = blocks2[key]
        if isinstance(op1, KroneckerJacobian) and isinstance(op2, KroneckerJacobian):
            left1, left2 = op1.left, op2.left
            weight = op1.x @ op2.x.T
        else:
            left1, left2, weight = op1, op2, 1.0
        entry = groups.get(id(left1))
        if entry is None:
            groups[id(left1)] = [left1, left2, weight]
        else:
            entry[2] = entry[2] + weight
    return [tuple(entry) for entry in groups.values()]


def _add_factor_gram(kernel, left1, left2, weight, trace, same):
    """`kernel += (L1_a L2_b^T) * weight_ab` in the layout of `_ntk`."""
    batch1, m, k = left1.shape
    batch2 = left2.shape[0]
    weight = np.broadcast_to(weight, (batch1, batch2))
    if isinstance(left1, IdentityJacobian):
        # L_a L_b^T = I_m for every pair.
        if trace:
            kernel += m * weight
        else:
            idx = np.arange(m)
            kernel[:, idx, :, idx] += weight
        return
    if isinstance(left1, SharedJacobian) and isinstance(left2, SharedJacobian):
        gram = left1.matrix @ left2.matrix.T
        if trace:
            kernel += np.trace(gram) * weight
        else:
            kernel += gram[None, :, None, :] * weight[:, None, :, None]
        return
    a = left1._dense_view()
    b = a if same else left2._dense_view()
    if trace:
        a2 = a.reshape(batch1, m * k)
        gram = a2 @ (a2 if same else b.reshape(batch2, m * k)).T
        kernel += gram * weight
        return
    a2 = a.reshape(batch1 * m, k)
    gram = a2 @ (a2 if same else b.reshape(batch2 * m, k)).T
    gram = gram.reshape(batch1, m, batch2, m)
    gram *= weight[:, None, :, None]
    kernel += gram


# ---- a network Jacobian computed in pieces -----------------------------------------
def jacobian_in_pieces(net, x, order: str, max_bytes: int) -> GeneralJacobian:
    """`net.jacobian(x, order)` computed over slices of the batch within `max_bytes`.

    The piece size is the largest whose predicted peak (the activations of
    the piece's forward pass, the layer operators, the intermediates the plan
    keeps alive and the assembled `(B, m, n)` result) stays within the bound. The result is
    dense, `(B, m, n)`, equal to the unpieced one; it carries the plan.
    """
    where = "Sequential.jacobian"
    max_bytes = check_positive_int(max_bytes, where=where, name="max_bytes")
    _refuse_coupled(net, f"{where} with `max_bytes`")
    batch = x.shape[0]
    if batch == 0:
        return net._jacobian(net._forward(x)[1], order)
    # One sample fixes the classes and per-sample sizes of every factor.
    _, probe = net._forward(x[:1])
    ops = net._jacobian_ops(probe)
    itemsize = max(np.dtype(op.dtype).itemsize for op in ops)
    items = _items(ops)
    m, n = ops[0].out_dim, ops[-1].in_dim
    dtype = np.result_type(*[op.dtype for op in ops])
    result_bytes = batch * m * n * itemsize

    def predicted(piece):
        scaled = tuple((cls, (piece, *shape[1:])) for cls, shape in items)
        plan = _plan_items(scaled, order, itemsize, True)
        return plan, plan.peak_bytes + result_bytes

    plan, peak = predicted(1)
    if peak > max_bytes:
        raise ValueError(
            f"{where}: `max_bytes` = {max_bytes} is too small: the ({batch}, {m}, {n}) "
            f"result with one sample per piece needs about {peak} bytes"
        )
    low, high = 1, batch  # the largest piece that fits, by bisection
    while low < high:
        middle = (low + high + 1) // 2
        if predicted(middle)[1] <= max_bytes:
            low = middle
        else:
            high = middle - 1
    plan, peak = predicted(low)
    del probe, ops  # the one-sample pass is not part of the pieces' memory
    out = np.empty((batch, m, n), dtype=dtype)
    flops = 0
    for start in range(0, batch, low):
        _, cache = net._forward(x[start:start + low])
        piece = net._jacobian(cache, order)
        flops += piece.plan.flops
        out[start:start + low] = piece._dense_view()
    result = GeneralJacobian(out)
    result.plan = ChainPlan(order, plan.chosen, plan.tree, flops, peak, batch, low)
    return result


# ---- curvature -----------------------------------------------------------------------
class Curvature:
    """State and products of `jp.ggn` / `jp.hessian`; `.operator` is the scipy view.

    Parameters
    ----------
    net : Sequential
    x, t, loss : the batch and loss the curvature is taken at
    exact : bool
        False: the generalized Gauss-Newton `G = J^T H_L J`; True: the Hessian
        `H = G + sum_l (d^2 y_l)^T g_l`, by the R-operator.

    Notes
    -----
    With `J = dy/dtheta` and `H_L = d^2 L / dy^2` (block-diagonal per sample
    for separable losses), `G v = J^T (H_L (J v))`: one forward-mode sweep
    (each layer's `jvp` plus `_param_jvp`), the loss Hessian product, one
    vjp sweep. The exact Hessian adds, in the same backward sweep, each
    layer's second-derivative term `_second_vjp(cache, g_l, r_l, v_l)` with
    the cached covector `g_l` and the tangent `r_l` of its input. The forward
    pass and the covectors are computed once, here.
    """

    def __init__(self, net, x, t, loss: Loss, *, exact: bool):
        where = "hessian" if exact else "ggn"
        check_loss(loss, where=where)
        self.exact = exact
        self.flat = FlatParams(net.params)
        if self.flat.size == 0:
            raise ValueError(f"{where}: the network has no parameters")
        self._slots = {slot.key: slice(slot.start, slot.stop) for slot in self.flat.slots}
        y, t, cache, _, g = _forward_and_loss(net, x, t, loss)
        self.y, self.t, self.loss = y, t, loss
        self.leaves = _leaves(net, cache)
        self.dtype = np.result_type(y.dtype, self.flat.dtype)
        # g_l, the covector at each leaf's output, for the second-order terms.
        self.covectors = _covectors(self.leaves, g) if exact else None

    @property
    def operator(self) -> LinearOperator:
        size = self.flat.size
        return LinearOperator((size, size), matvec=self.matvec, rmatvec=self.matvec,
                              dtype=self.dtype)

    def matvec(self, v) -> np.ndarray:
        """`C v` for a flat parameter vector `v` `(P,)` (C symmetric, so also `v^T C`)."""
        v = np.asarray(v).reshape(-1)
        if v.shape[0] != self.flat.size:
            raise ShapeError(f"{'hessian' if self.exact else 'ggn'}: the vector must have "
                             f"{self.flat.size} entries (P), got {v.shape[0]}")
        tangents = self.flat.unflatten(v.astype(self.dtype, copy=False))
        leaves = self.leaves
        inputs, r = _tangent_sweep(leaves, None, tangents)
        if r is None:
            r = np.zeros_like(self.y)
        rg = self.loss._hessian_product(self.y, self.t, r)
        out = np.empty(self.flat.size, dtype=self.dtype)
        for position in range(len(leaves) - 1, -1, -1):
            layer, layer_cache, keys = leaves[position]
            need_input = position > 0
            gx, own = layer._call_vjp(layer_cache, rg, need_input)
            if self.exact:
                local = {n: tangents[k] for n, k in keys.items()}
                gx2, own2 = layer._second_vjp(layer_cache, self.covectors[position],
                                              inputs[position], local, need_input)
                if gx2 is not None and need_input:
                    gx = _accumulate(gx, gx2, rg)
                for name, value in own2.items():
                    own[name] = _accumulate(own[name], value, rg)
            for name, key in keys.items():
                out[self._slots[key]] = own[name].reshape(-1)
            rg = gx
        return out


def _block_param_jvp(block, cache, tangents) -> np.ndarray | None:
    """`Layer._param_jvp` of a `Sequential` used as a block (inside a `Residual`).

    `tangents` is keyed as `block.params`; the tangent is pushed through the
    later layers by their jvps.
    """
    return _tangent_sweep(_leaves(block, cache), None, tangents)[1]


def _tangent_sweep(leaves, v, tangents):
    """`(inputs, r)`: the forward-mode sweep of the R-operator through `leaves`.

    Starting from the input tangent `v` (None: zero), each leaf maps
    `r_out = J_x r_in + sum_p dy/dvec(p) t_p` (its `jvp` plus `_param_jvp`
    along `tangents`, keyed by full key). `inputs[l]` is the tangent of leaf
    l's input and `r` that of the last output; None means zero.
    """
    inputs, r = [], v
    for layer, layer_cache, keys in leaves:
        inputs.append(r)
        out = None if r is None else layer._call_jvp(layer_cache, r)
        if keys:
            moved = layer._param_jvp(layer_cache, {n: tangents[k] for n, k in keys.items()})
            out = moved if out is None else out + moved
        r = out
    return inputs, r


def _covectors(leaves, g) -> list:
    """`[g_l]`: the covector at each leaf's output, pulled back from `g` at the last."""
    covectors = [None] * len(leaves)
    for position in range(len(leaves) - 1, -1, -1):
        covectors[position] = g
        if position > 0:
            g = leaves[position].layer._input_vjp(leaves[position].cache, g)
    return covectors


def _block_input_vjp(block, cache, g) -> np.ndarray:
    """`Layer._input_vjp` of a `Sequential` block: each layer's own, last to first."""
    for layer, layer_cache, _ in reversed(_leaves(block, cache)):
        g = layer._input_vjp(layer_cache, g)
    return g


def _block_per_sample(block, cache, g, norms: bool):
    """`Layer._per_sample_grads` (or `_per_sample_sq_norms`) of a `Sequential`.

    The covector `g` at the output is walked back through the leaves by their
    `_input_vjp`s; each leaf with parameters adds its unsummed vjps (or their
    squared norms, summed: `(B,)`, None without parameters). Rows are keyed as
    `block.params`, so for the outermost network as `net.params`.
    """
    leaves = _leaves(block, cache)
    rows, total = {}, None
    for position in range(len(leaves) - 1, -1, -1):
        layer, layer_cache, keys = leaves[position]
        if keys:
            if norms:
                part = layer._per_sample_sq_norms(layer_cache, g)
                total = part if total is None else total + part
            else:
                own = layer._per_sample_grads(layer_cache, g)
                rows.update({keys[name]: own[name] for name in keys})
        if position > 0:
            g = layer._input_vjp(layer_cache, g)
    return total if norms else {key: rows[key] for key in block.params}


def _block_second_vjp(block, cache, g, v, tangents, need_input=True):
    """`Layer._second_vjp` of a `Sequential` used as a block (inside a `Residual`).

    The derivative of the block's vjp with `g` fixed, along the input tangent
    `v` and the parameter direction `tangents` (keyed as `block.params`), is
    the R-operator of the block alone: a tangent sweep forward (`r_l`), then a
    backward sweep that starts from a zero covector change at the block's
    output and adds every layer's own second-order term with its covector
    `g_l` (pulled back from `g`). Returns `(input part or None, {key: part})`.
    """
    leaves = _leaves(block, cache)
    inputs, _ = _tangent_sweep(leaves, v, tangents)
    covectors = _covectors(leaves, g)
    change, grads = None, {}  # the change of the covector, None meaning zero
    for position in range(len(leaves) - 1, -1, -1):
        layer, layer_cache, keys = leaves[position]
        needed = position > 0 or need_input
        gx, own = None, {}
        if change is not None:
            gx, own = layer._call_vjp(layer_cache, change, needed)
        local = {n: tangents[k] for n, k in keys.items()}
        gx2, own2 = layer._second_vjp(layer_cache, covectors[position], inputs[position],
                                      local, needed)
        if gx2 is not None and needed:
            gx = gx2 if gx is None else _accumulate(gx, gx2, change)
        for name, value in own2.items():
            own[name] = value if name not in own else _accumulate(own[name], value, change)
        for name, value in own.items():
            grads[keys[name]] = value
        change = gx if needed else None
    return change, grads


def _accumulate(total, part, protected):
    """`total + part`, in place when `total` is a fresh array (not `protected`, the
    covector a layer may hand back unchanged, nor a view of it)."""
    if total is protected or np.shares_memory(total, protected):
        return total + part
    total += part
    return total


def ggn(net, x, t, loss: Loss) -> LinearOperator:
    """The generalized Gauss-Newton matrix `J^T H_L J` `(P, P)` as a `LinearOperator`.

    `J = dy/dtheta` over the flat parameters (`param_jacobian` order) and
    `H_L = d^2 L/dy^2` the loss Hessian (softmax cross-entropy:
    `w (diag(p_i) - p_i p_i^T)` per sample). Symmetric positive semi-definite
    for convex losses; `scipy.sparse.linalg.eigsh` and `cg` use it directly.
    """
    return Curvature(net, x, t, loss, exact=False).operator


def hessian(net, x, t, loss: Loss) -> LinearOperator:
    """The exact Hessian `d^2 L/dtheta^2` `(P, P)` as a `LinearOperator` (R-operator).

    Needs every layer to state its second derivative (`Layer._second_vjp`);
    piecewise-linear layers (ReLU) contribute nothing between kinks.
    """
    return Curvature(net, x, t, loss, exact=True).operator
