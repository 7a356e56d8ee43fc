"""Property-based tests of the engine: random stacks, random operators, every registered name.

Networks, inputs and targets come from `jacobprop.testing` (drawn from the
registries `jp.LAYERS` and `jp.LOSSES`); Jacobian operators of every structure
are built here with random entries. Every property compares two computations
that must agree exactly in exact arithmetic, with tolerances stated next to
each comparison.
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import scipy.linalg
from hypothesis import given
from hypothesis import strategies as st

import jacobprop as jp
from jacobprop.checks import dottest, gradcheck, numerical_jacobian
from jacobprop.testing import (
    assert_layer_correct,
    cast_layer,
    dtypes,
    inputs,
    layers,
    losses,
    seeds,
    sequentials,
    targets,
)


def assert_close(got, expected, rtol, what="", floor=0.0, scale=None):
    """`|got - expected| <= rtol * (|expected| + scale) + floor` entrywise.

    `scale` defaults to `max|expected|`, so entries that cancel to rounding
    noise are judged against the array they live in; a product passes the
    size of its operands, `max(|A| @ |B|)`, the scale its rounding error has.
    """
    got, expected = np.asarray(got), np.asarray(expected)
    assert got.shape == expected.shape, f"{what}: shape {got.shape} != {expected.shape}"
    if scale is None:
        scale = max(np.abs(expected).max(initial=0.0), np.abs(got).max(initial=0.0))
    np.testing.assert_allclose(got, expected, rtol=rtol, atol=rtol * scale + floor, err_msg=what)


#: float32 against float64: 1e-4 relative to the array's scale, plus an absolute
#: floor for derivatives like tanh's `1 - y^2`, computed from outputs of size
#: about 1, whose float32 rounding (~1e-7) can exceed 1e-4 of a tiny result.
LOW = {"rtol": 1e-4, "floor": 64 * float(np.finfo(np.float32).eps)}


# ---- networks ------------------------------------------------------------------------
@st.composite
def problems(draw, dtype=np.float64, max_depth=4):
    """`(net, x, t, loss)`: a random stack, an input clear of kinks, a valid target."""
    net = draw(sequentials(min_depth=1, max_depth=max_depth, dtype=dtype), label="net")
    x = draw(inputs(net, dtype=dtype), label="x")
    loss = draw(losses(), label="loss")
    t = draw(targets(loss, net(x).shape, dtype=dtype), label="t")
    return net, x, t, loss


@given(problem=problems())
def test_backward_modes_agree(problem):
    net, x, t, loss = problem
    value, grads = net.value_and_grad(x, t, loss)
    assert list(grads) == list(net.params)
    for mode, dense in (("jacobian", False), ("jacobian", True)):
        other_value, other = net.value_and_grad(x, t, loss, mode=mode, dense=dense)
        assert list(other) == list(grads)
        assert other_value == pytest.approx(value, rel=1e-12, abs=0.0)
        for key, grad in grads.items():
            assert other[key].shape == net.params[key].shape
            assert_close(other[key], grad, 1e-12, f"{key} mode={mode} dense={dense}")


@given(problem=problems())
def test_vjp_is_linear_and_matches_the_full_jacobian(problem):
    net, x, _, _ = problem
    y, cache = net.forward(x)
    rng = np.random.default_rng(0)
    g1, g2 = rng.standard_normal(y.shape), rng.standard_normal(y.shape)
    a, b = 0.7, -1.3
    gx, grads = net.vjp(cache, a * g1 + b * g2)
    gx1, grads1 = net.vjp(cache, g1)
    gx2, grads2 = net.vjp(cache, g2)
    assert_close(gx, a * gx1 + b * gx2, 1e-12, "dL/dx")
    param_ops = net.param_jacobians(cache)
    magnitude = np.abs(a * g1) + np.abs(b * g2)
    for key in grads:
        # A gradient that cancels to zero (a bias feeding a softmax) is rounding noise on
        # the scale of the terms it sums: |g| @ |dy/dvec(p)|.
        terms = np.einsum("bm,bmp->p", magnitude, np.abs(param_ops[key].to_dense()))
        assert_close(grads[key], a * grads1[key] + b * grads2[key], 1e-12, key,
                     scale=terms.max(initial=0.0))
    v1, v2 = rng.standard_normal(x.shape), rng.standard_normal(x.shape)
    assert_close(net.jvp(cache, a * v1 + b * v2),
                 a * net.jvp(cache, v1) + b * net.jvp(cache, v2), 1e-12, "jvp")
    dense = net.jacobian(cache).to_dense()
    assert_close(gx1, np.einsum("bm,bmn->bn", g1, dense), 1e-12, "vjp vs J")
    assert_close(net.jvp(cache, v1), np.einsum("bmn,bn->bm", dense, v1), 1e-12, "jvp vs J")
    for key, op in net.param_jacobians(cache).items():
        expected = op.sum_vjp(g1).reshape(net.params[key].shape)
        assert_close(grads1[key], expected, 1e-12, f"vjp vs param Jacobian {key}")


@given(data=st.data())
def test_random_stacks_satisfy_the_layer_contract(data):
    # A Sequential is a Layer: the whole contract holds for the stack too.
    net = data.draw(sequentials(min_depth=2, max_depth=5), label="net")
    x = data.draw(inputs(net), label="x")
    assert_layer_correct(net, x, rng=np.random.default_rng(0))


@given(problem=problems())
def test_gradcheck_passes(problem):
    net, x, t, loss = problem
    report = gradcheck(net, x, t, loss)
    assert report.ok, str(report)
    assert {entry.name for entry in report.entries} >= set(net.params)


@given(problem=problems(), seed=seeds())
def test_shuffling_the_batch_shuffles_outputs_and_keeps_summed_gradients(problem, seed):
    net, x, t, loss = problem
    perm = np.random.default_rng(seed).permutation(x.shape[0])
    y = net(x)
    assert_close(net(x[perm]), y[perm], 1e-13, "outputs")
    jac = net.jacobian(x)
    assert_close(net.jacobian(x[perm]).to_dense(), jac.to_dense()[perm], 1e-13, "blocks")
    assert_close(jac[perm].to_dense(), jac.to_dense()[perm], 0.0, "J[perm]")
    value, grads = net.value_and_grad(x, t, loss)
    shuffled_value, shuffled = net.value_and_grad(x[perm], t[perm], loss)
    assert shuffled_value == pytest.approx(value, rel=1e-12)
    for key in grads:
        assert_close(shuffled[key], grads[key], 1e-12, key)


@given(data=st.data())
def test_float32_agrees_with_float64(data):
    net, x, t, loss = data.draw(problems())
    low = cast_layer(net, np.float32)
    # The float64 reference runs on the float32-rounded numbers, so only the
    # arithmetic differs between the two sides.
    high = cast_layer(low, np.float64)
    x32 = x.astype(np.float32)
    t32 = t.astype(np.float32) if t.dtype.kind == "f" else t
    t64 = t32.astype(np.float64) if t.dtype.kind == "f" else t
    y32 = low(x32)
    assert y32.dtype == np.float32
    assert_close(y32, high(x32.astype(np.float64)), what="outputs", **LOW)
    for mode in ("vjp", "jacobian"):
        value32, grads32 = low.value_and_grad(x32, t32, loss, mode=mode)
        value, grads = high.value_and_grad(x32.astype(np.float64), t64, loss, mode=mode)
        assert value32 == pytest.approx(value, rel=1e-4, abs=1e-6)
        for key, grad in grads.items():
            assert grads32[key].dtype == np.float32, f"{key} in mode {mode}"
            assert_close(grads32[key], grad, what=f"{key} mode={mode}", **LOW)
    jac32 = low.jacobian(x32)
    assert jac32.to_dense().dtype == np.float32
    assert_close(jac32.to_dense(), high.jacobian(x32.astype(np.float64)).to_dense(),
                 what="J", **LOW)


@given(data=st.data(), dtype=dtypes())
def test_dtype_is_kept_end_to_end(data, dtype):
    net, x, t, loss = data.draw(problems(dtype=dtype))
    y, cache = net.forward(x)
    assert x.dtype == dtype and y.dtype == dtype
    assert net.vjp(cache, np.ones_like(y))[0].dtype == dtype
    assert net.jacobian(cache).to_dense().dtype == dtype
    for op in net.param_jacobians(cache).values():
        assert op.to_dense().dtype == dtype
    for mode in ("vjp", "jacobian"):
        value, grads = net.value_and_grad(x, t, loss, mode=mode)
        assert np.isfinite(value)
        for key, grad in grads.items():
            assert grad.dtype == dtype, f"{key} in mode {mode}"


@given(data=st.data())
def test_jacobian_orders_agree_with_finite_differences(data):
    net = data.draw(sequentials(min_depth=1, max_depth=6))
    x = data.draw(inputs(net))
    numeric = numerical_jacobian(net, x)
    for order in ("forward", "reverse", "auto"):
        assert_close(net.jacobian(x, order=order).to_dense(), numeric, 1e-6, order)
    auto = net.jacobian_cost(x, "auto")
    assert auto <= min(net.jacobian_cost(x, "forward"), net.jacobian_cost(x, "reverse"))


@pytest.mark.parametrize("name", sorted(jp.LAYERS))
@given(data=st.data(), width=st.integers(1, 5))
def test_dot_test_of_every_layer_jacobian(name, data, width):
    layer = data.draw(layers(input_dim=width, names=[name]))
    x = data.draw(inputs(layer, input_dim=width))
    _, cache = layer.forward(x)
    rng = np.random.default_rng(data.draw(seeds()))
    for op in (layer.jacobian(cache), *layer.param_jacobians(cache).values()):
        assert_dot_test(op, rng)


def assert_dot_test(op, rng):
    """`<J u, w> == <u, J^T w>` over the batch and per sample, and `.T` swaps jvp and vjp."""
    dottest(op, rng=rng, raise_on_fail=True)
    batch, m, n = op.shape
    u, w = rng.standard_normal((batch, n)), rng.standard_normal((batch, m))
    ju, jtw = op.jvp(u), op.vjp(w)
    # Per sample, against the size of each sample's terms, with dottest's tolerance:
    # an adjoint bug is O(1), while softmax near saturation rounds relative to |s||u|,
    # which the terms (~ (1 - s_max) |u|) do not show.
    terms = np.maximum(np.abs(ju * w).sum(axis=1), np.abs(u * jtw).sum(axis=1))
    difference = np.abs(np.einsum("bm,bm->b", ju, w) - np.einsum("bn,bn->b", u, jtw))
    assert (difference <= np.sqrt(np.finfo(np.float64).eps) * terms).all()
    assert_close(op.T.jvp(w), jtw, 1e-12, "J.T.jvp vs J.vjp")
    assert_close(op.T.vjp(u), ju, 1e-12, "J.T.vjp vs J.jvp")


# ---- structured operators -------------------------------------------------------------
SQUARE = {"diagonal", "identity", "softmax"}
BASE_KINDS = ("general", "shared", "diagonal", "identity", "softmax", "kronecker")
KINDS = BASE_KINDS + tuple(f"{kind}.T" for kind in BASE_KINDS)


def is_square(kind: str) -> bool:
    return kind.removesuffix(".T") in SQUARE


def build(kind: str, batch: int, m: int, n: int, rng) -> jp.Jacobian:
    """A random operator of `kind` with shape `(batch, m, n)` (square kinds need m == n)."""
    if kind.endswith(".T"):
        op = build(kind.removesuffix(".T"), batch, n, m, rng)
        result = op.T
        assert result.shape == (batch, m, n)
        return result
    if kind == "general":
        return jp.GeneralJacobian(rng.standard_normal((batch, m, n)))
    if kind == "shared":
        return jp.SharedJacobian(rng.standard_normal((m, n)), batch)
    assert kind == "kronecker" or m == n, (kind, m, n)
    if kind == "diagonal":
        return jp.DiagonalJacobian(rng.standard_normal((batch, n)))
    if kind == "identity":
        return jp.IdentityJacobian(batch, n)
    if kind == "softmax":
        return jp.SoftmaxJacobian(rng.dirichlet(np.ones(n), size=batch))
    # Kronecker: blocks L_i (kron) x_i^T of shape (m, p*q) with p*q == n.
    divisors = [q for q in range(1, n + 1) if n % q == 0]
    q = divisors[rng.integers(len(divisors))]
    p = n // q
    left_kinds = ["general", "shared"] + (["diagonal", "identity"] if m == p else [])
    left_kinds += ["softmax"] if m == p > 1 else []
    left = build(left_kinds[rng.integers(len(left_kinds))], batch, m, p, rng)
    return jp.KroneckerJacobian(left, rng.standard_normal((batch, q)))


@st.composite
def chains(draw, kinds):
    """Random compatible operators `(B, d0, d1), (B, d1, d2), ...` of the given kinds.

    With a softmax in the chain every size is at least 2: a 1x1 softmax block
    `s - s^2` is zero up to cancellation, so its rounding has no scale to be
    relative to (the Softmax layer of width 1 is covered by the contract test).
    """
    batch = draw(st.integers(1, 3))
    smallest = 2 if any(kind.startswith("softmax") for kind in kinds) else 1
    dims = [draw(st.integers(smallest, 4))]
    for kind in kinds:
        dims.append(dims[-1] if is_square(kind) else draw(st.integers(smallest, 4)))
    rng = np.random.default_rng(draw(seeds()))
    return [build(kind, batch, dims[i], dims[i + 1], rng) for i, kind in enumerate(kinds)]


def matmul_dense(*arrays):
    result = arrays[0]
    for array in arrays[1:]:
        result = result @ array
    return result


@pytest.mark.parametrize("left, right", list(itertools.product(KINDS, repeat=2)))
@given(data=st.data())
def test_products_of_every_pair_of_structures(left, right, data):
    third = data.draw(st.sampled_from(KINDS), label="third")
    a, b, c = data.draw(chains([left, right, third]), label="chain")
    da, db, dc = a.to_dense(), b.to_dense(), c.to_dense()
    # Rounding errors of a product scale with its operands, not with the
    # result (a 1x1 softmax block is exactly 0 up to cancellation).
    two = np.abs(da) @ np.abs(db)
    three = (two @ np.abs(dc)).max()
    product = a @ b
    assert isinstance(product, jp.Jacobian)
    assert product.shape == (a.batch_size, a.out_dim, b.in_dim)
    assert_close(product.to_dense(), da @ db, 1e-12, f"{left} @ {right}", scale=two.max())
    assert_close(((a @ b) @ c).to_dense(), (a @ (b @ c)).to_dense(), 1e-12, "associativity",
                 scale=three)
    assert_close((a @ (b @ c)).to_dense(), matmul_dense(da, db, dc), 1e-12, "vs dense",
                 scale=three)
    # Plain arrays on either side: a (B, k, m) stack or one shared (k, m) matrix.
    rng = np.random.default_rng(data.draw(seeds()))
    stack = rng.standard_normal((a.batch_size, 2, a.out_dim))
    shared = rng.standard_normal((2, a.out_dim))
    right_stack = rng.standard_normal((a.batch_size, b.in_dim, 3))
    assert_close((stack @ product).to_dense(), stack @ da @ db, 1e-12, "ndarray stack @ J",
                 scale=(np.abs(stack) @ two).max())
    assert_close((shared @ product).to_dense(), shared @ da @ db, 1e-12, "ndarray @ J",
                 scale=(np.abs(shared) @ two).max())
    assert_close((product @ right_stack).to_dense(), da @ db @ right_stack, 1e-12,
                 "J @ ndarray", scale=(two @ np.abs(right_stack)).max())


@pytest.mark.parametrize("kind", KINDS)
@given(data=st.data())
def test_operator_views_match_dense(kind, data):
    (op,) = data.draw(chains([kind]))
    dense = op.to_dense()
    batch, m, n = op.shape
    assert dense.shape == op.shape and dense.dtype == op.dtype
    rng = np.random.default_rng(data.draw(seeds()))
    g1, g2 = rng.standard_normal((batch, m)), rng.standard_normal((batch, m))
    v1, v2 = rng.standard_normal((batch, n)), rng.standard_normal((batch, n))
    # vjp and jvp are the dense products, and linear.
    assert_close(op.vjp(g1), np.einsum("bm,bmn->bn", g1, dense), 1e-12, "vjp")
    assert_close(op.jvp(v1), np.einsum("bmn,bn->bm", dense, v1), 1e-12, "jvp")
    assert_close(op.vjp(2.0 * g1 - 3.0 * g2), 2.0 * op.vjp(g1) - 3.0 * op.vjp(g2), 1e-12, "lin")
    assert_close(op.jvp(2.0 * v1 - 3.0 * v2), 2.0 * op.jvp(v1) - 3.0 * op.jvp(v2), 1e-12, "lin")
    assert_close(op.sum_vjp(g1), np.einsum("bm,bmn->n", g1, dense), 1e-12, "sum_vjp")
    assert_close(op.batch_sum(), dense.sum(axis=0), 1e-12, "batch_sum")
    assert_close(op.T.to_dense(), dense.swapaxes(1, 2), 0.0, ".T")
    assert_dot_test(op, rng)
    # Sub-batches.
    index = rng.permutation(batch)[: max(1, batch - 1)]
    assert_close(op[index].to_dense(), dense[index], 0.0, "J[index]")
    assert_close(op[batch - 1].to_dense(), dense[batch - 1:], 0.0, "J[i]")
    assert_close(op[-1].to_dense(), dense[-1:], 0.0, "J[-1]")
    assert_close(op[-batch].to_dense(), dense[:1], 0.0, "J[-B]")
    # Sums and scalings, with its own kind and with an unstructured stack.
    other = build(kind, batch, m, n, rng)
    general = jp.GeneralJacobian(rng.standard_normal(op.shape))
    for left, right in ((op, other), (op, general), (general, op)):
        total = left + right
        assert total.shape == op.shape
        assert_close(total.to_dense(), left.to_dense() + right.to_dense(), 1e-15, "J + J")
    assert_close((2.5 * op).to_dense(), 2.5 * dense, 1e-15, "2.5 * J")
    assert_close((op * -0.5).to_dense(), -0.5 * dense, 1e-15, "J * -0.5")
    assert_close((-op).to_dense(), -dense, 0.0, "-J")
    # scipy views: the block-diagonal operator and matrix, and one sample's block.
    block_diagonal = scipy.linalg.block_diag(*dense)
    assert_close(op.to_sparse().toarray(), block_diagonal, 0.0, "to_sparse")
    linear = op.to_scipy()
    assert linear.shape == (batch * m, batch * n)
    assert_close(linear.matvec(v1.reshape(-1)), block_diagonal @ v1.reshape(-1), 1e-12, "matvec")
    assert_close(linear.rmatvec(g1.reshape(-1)), g1.reshape(-1) @ block_diagonal, 1e-12,
                 "rmatvec")
    sample = int(rng.integers(batch))
    block = op.to_scipy(sample=sample)
    assert block.shape == (m, n)
    assert_close(block.matvec(v1[sample]), dense[sample] @ v1[sample], 1e-12, "sample matvec")
    assert_close(block.rmatvec(g1[sample]), g1[sample] @ dense[sample], 1e-12, "sample rmatvec")
