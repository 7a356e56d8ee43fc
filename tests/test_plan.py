"""Plans for chains of Jacobian products: orders, caching, cost model, pieces under a bound."""

import numpy as np
import pytest

import jacobprop as jp
from jacobprop.jacobian import GeneralJacobian, Jacobian
from jacobprop.plan import ORDERS, ChainPlan, chain_cost, multiply_chain, plan_chain


def build(seed, widths=(4, 6, 5, 3), activation="Tanh", dtype=np.float64, tail=None):
    rng = np.random.default_rng(seed)
    layers = []
    for index, (n_in, n_out) in enumerate(zip(widths[:-1], widths[1:], strict=True)):
        layers.append(jp.Dense(n_in, n_out, rng=rng, dtype=dtype))
        if index < len(widths) - 2:
            layers.append(jp.LAYERS[activation]())
    if tail is not None:
        layers.append(tail)
    return jp.Sequential(*layers), rng


def dense_chain(net, x):
    """dy/dx by multiplying every layer's dense blocks from the output down."""
    _, cache = net.forward(x)
    result = None
    for layer, layer_cache in zip(net.layers, cache.caches, strict=True):
        block = layer.jacobian(layer_cache).to_dense()
        result = block if result is None else block @ result
    return result


@pytest.mark.parametrize("order", ORDERS)
@pytest.mark.parametrize("activation", ["Tanh", "ReLU", "Softplus"])
@pytest.mark.parametrize("widths", [(4, 6, 5, 3), (2, 9, 9, 9, 1), (7, 3, 8)])
def test_every_order_equals_dense_chaining_and_finite_differences(order, activation, widths):
    seed = len(widths) * 100 + sum(widths) + ORDERS.index(order)
    net, rng = build(seed, widths, activation, tail=jp.Softmax())
    x = rng.standard_normal((5, widths[0]))
    got = net.jacobian(x, order=order).to_dense()
    np.testing.assert_allclose(got, dense_chain(net, x), rtol=1e-12, atol=1e-14)
    numeric = jp.numerical_jacobian(net, x)
    np.testing.assert_allclose(got, numeric, rtol=1e-6, atol=1e-8)


def test_plan_is_cached_per_structures_and_shapes():
    net, rng = build(1)
    x = rng.standard_normal((6, 4))
    first = net.jacobian(x).plan
    # New values, same shapes: the very same plan object comes back.
    second = net.jacobian(rng.standard_normal((6, 4))).plan
    assert first is second
    # Another batch size is another plan.
    assert net.jacobian(x[:3]).plan is not first


def test_plan_carries_order_flops_and_peak():
    net, rng = build(2, widths=(3, 40, 40, 2), activation="ReLU")
    x = rng.standard_normal((8, 3))
    for order in ORDERS:
        plan = net.jacobian(x, order=order).plan
        assert isinstance(plan, ChainPlan)
        assert plan.order == order
        assert plan.flops == net.jacobian_cost(x, order)
        assert plan.peak_bytes > 0
        assert plan.batch == plan.piece == 8
        assert "MFLOP" in plan.describe()
    forward = net.jacobian(x, order="forward").plan
    reverse = net.jacobian(x, order="reverse").plan
    auto = net.jacobian(x, order="auto").plan
    assert forward.chosen == "forward" and reverse.chosen == "reverse"
    assert auto.flops <= min(forward.flops, reverse.flops)


@pytest.mark.parametrize("n_in, n_out, cheap", [(64, 1, "reverse"), (1, 64, "forward")])
def test_cost_model_ranks_the_orders_by_the_narrow_side(n_in, n_out, cheap):
    # The bench records predicted flops beside measured medians for the full
    # grid; here the clear-cut cases, where the measured ranking is the same on
    # any machine (a factor of about 64 in work between the orders).
    net, rng = build(3, widths=(n_in, 64, 64, 64, n_out), activation="ReLU")
    x = rng.standard_normal((16, n_in))
    costs = {order: net.jacobian_cost(x, order) for order in ("forward", "reverse")}
    other = "forward" if cheap == "reverse" else "reverse"
    assert costs[cheap] * 8 < costs[other]
    assert net.jacobian(x).plan.chosen == cheap


class OpaqueJacobian(Jacobian):
    """A structure the cost model knows nothing about (new kinds come from other branches)."""

    kind = "opaque"

    def __init__(self, data):
        self.data = np.asarray(data)
        self.shape = self.data.shape
        self.dtype = self.data.dtype

    def _vjp(self, g):
        return np.einsum("bm,bmn->bn", g, self.data)

    def _jvp(self, v):
        return np.einsum("bmn,bn->bm", self.data, v)

    def _to_dense(self):
        return self.data.copy()

    def _transpose(self):
        return OpaqueJacobian(self.data.swapaxes(1, 2))

    def _take(self, index):
        return OpaqueJacobian(self.data[index])


@pytest.mark.parametrize("order", ORDERS)
def test_unknown_operator_kinds_are_planned_by_the_dense_fallback(order):
    rng = np.random.default_rng(4)
    ops = [
        jp.SharedJacobian(rng.standard_normal((3, 5)), 4),
        OpaqueJacobian(rng.standard_normal((4, 5, 6))),
        jp.DiagonalJacobian(rng.standard_normal((4, 6))),
        OpaqueJacobian(rng.standard_normal((4, 6, 2))),
    ]
    expected = ops[0].to_dense()
    for op in ops[1:]:
        expected = expected @ op.to_dense()
    plan = plan_chain(ops, order)
    assert plan.flops > 0 and plan.peak_bytes > 0
    result = multiply_chain(ops, order)
    np.testing.assert_allclose(result.to_dense(), expected, rtol=1e-12)
    assert result.plan is plan


def test_old_import_path_still_works():
    from jacobprop.jacobian import chain_cost as old_cost
    from jacobprop.jacobian import multiply_chain as old_multiply

    assert old_cost is chain_cost and old_multiply is multiply_chain


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("order", ORDERS)
def test_pieces_equal_the_whole_and_respect_the_bound(order, dtype):
    net, rng = build(5 + ORDERS.index(order), widths=(6, 30, 30, 4), dtype=dtype)
    x = rng.standard_normal((37, 6)).astype(dtype)
    whole = net.jacobian(x, order=order)
    itemsize = np.dtype(dtype).itemsize
    result_bytes = 37 * 4 * 6 * itemsize
    for max_bytes in (result_bytes + 30000, result_bytes + 60000, 10**9):
        pieces = net.jacobian(x, order=order, max_bytes=max_bytes)
        np.testing.assert_allclose(pieces.to_dense(), whole.to_dense(), rtol=1e-6 if
                                   dtype == np.float32 else 1e-13, atol=1e-7)
        assert pieces.plan.peak_bytes <= max_bytes
        assert pieces.plan.batch == 37
        assert pieces.to_dense().dtype == dtype
    tight = net.jacobian(x, order=order, max_bytes=result_bytes + 30000)
    assert tight.plan.piece < 37 and tight.plan.pieces > 1
    assert tight.plan.flops >= whole.plan.flops * 0.99


def test_a_bound_below_the_result_is_refused():
    net, rng = build(6)
    x = rng.standard_normal((10, 4))
    with pytest.raises(ValueError, match="`max_bytes` = 100 is too small"):
        net.jacobian(x, max_bytes=100)
    with pytest.raises(ValueError, match="`max_bytes` must be a positive integer"):
        net.jacobian(x, max_bytes=0)


@pytest.mark.parametrize("batch", [0, 1])
def test_tiny_batches(batch):
    net, rng = build(7)
    x = rng.standard_normal((batch, 4))
    whole = net.jacobian(x)
    assert whole.to_dense().shape == (batch, 3, 4)
    pieces = net.jacobian(x, max_bytes=10**6)
    np.testing.assert_allclose(pieces.to_dense(), whole.to_dense())


def test_pieces_from_a_cache_use_its_input():
    net, rng = build(8)
    x = rng.standard_normal((9, 4))
    _, cache = net.forward(x)
    np.testing.assert_allclose(net.jacobian(cache, max_bytes=10**6).to_dense(),
                               net.jacobian(x).to_dense(), rtol=1e-13)


class CouplingLayer(jp.Identity):
    """Test-only: claims its samples interact (as BatchNorm in train mode does)."""

    @property
    def couples_samples(self):
        return True


def test_pieces_refuse_a_network_whose_samples_interact():
    net, rng = build(9, tail=CouplingLayer())
    with pytest.raises(ValueError, match=r"layer 5 \(CouplingLayer\(\)\) couples samples"):
        net.jacobian(rng.standard_normal((4, 4)), max_bytes=10**6)


def test_single_operator_chain_returns_a_fresh_operator():
    op = GeneralJacobian(np.ones((2, 3, 3)))
    result = multiply_chain([op], "auto")
    assert result is not op and not hasattr(op, "plan")
    np.testing.assert_array_equal(result.to_dense(), op.to_dense())
    assert chain_cost([op], "auto")[1] == 0


@pytest.mark.parametrize("call", [plan_chain, chain_cost, multiply_chain])
def test_an_unknown_order_is_refused_naming_the_function_and_the_choices(call):
    ops = [GeneralJacobian(np.ones((2, 3, 3)))]
    match = (rf"^{call.__name__}: `order` must be one of \('auto', 'forward', 'reverse'\), "
             r"got 'sideways'$")
    with pytest.raises(ValueError, match=match):
        call(ops, "sideways")
