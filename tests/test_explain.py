"""`net.explain`: the trace of a known net against hand-computed shapes, kinds, bytes, flops."""

import json

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import jacobprop as jp
from jacobprop.explain import Trace, TraceStep, explain, operator_nbytes
from jacobprop.jacobian import chain_cost
from jacobprop.testing import inputs, losses, sequentials, targets


def mlp(batch, *, seed, dtype=np.float64):
    """The issue's 4-16-relu-3 with a batch of inputs and labels."""
    rng = np.random.default_rng(seed)
    net = jp.Sequential(jp.Dense(4, 16, rng=rng, dtype=dtype), jp.ReLU(),
                        jp.Dense(16, 3, rng=rng, dtype=dtype))
    x = rng.standard_normal((batch, 4)).astype(dtype)
    t = rng.integers(0, 3, size=batch)
    return net, x, t


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("batch", [1, 2, 5])
def test_gradient_trace_of_4_16_relu_3_matches_the_hand_computed_table(batch, dtype):
    net, x, t = mlp(batch, seed=batch, dtype=dtype)
    trace = net.explain(x, t, jp.SoftmaxCrossEntropy())
    size = np.dtype(dtype).itemsize
    B = batch  # noqa: N806 (the maths name)
    # Backward order: the loss's covector, then layer 2 (W, b, dx), layer 1 (dx),
    # layer 0 (W, b; its dy/dx is never needed for the weights).
    expected = [
        # action, layer, kind, shape, stored entries, flops of G @ operator
        ("loss gradient", None, "general", [B, 1, 3], B * 3, 0),
        ("read off", 2, "kronecker", [B, 3, 48], B * 16, B * 3),      # stores X_2 (B, 16)
        ("read off", 2, "identity", [B, 3, 3], 0, 0),
        ("backpropagate", 2, "shared", [B, 3, 16], 3 * 16, B * 3 * 16),   # W_2 once
        ("backpropagate", 1, "diagonal", [B, 16, 16], B * 16, B * 16),
        ("read off", 0, "kronecker", [B, 16, 64], B * 4, B * 16),      # stores X_0 (B, 4)
        ("read off", 0, "identity", [B, 16, 16], 0, 0),
    ]
    got = [(s.action, s.layer, s.kind, s.shape, s.stored_bytes // size, s.flops)
           for s in trace.steps]
    assert got == expected
    dense = [np.prod(shape) for *_, shape, _, _ in expected]
    assert [s.dense_bytes for s in trace.steps] == [int(d) * size for d in dense]
    assert [s.result_shape for s in trace.steps] == [
        [B, 1, 3], [B, 1, 48], [B, 1, 3], [B, 1, 16], [B, 1, 16], [B, 1, 64], [B, 1, 16]]
    assert [(s.gradient, s.formula) for s in trace.steps if s.gradient] == [
        ("2.W", "dL/dW = G^T X"), ("2.b", "dL/db = sum_i G_i"),
        ("0.W", "dL/dW = G^T X"), ("0.b", "dL/db = sum_i G_i")]
    assert trace.flops == B * (3 + 48 + 16 + 16)
    assert trace.dtype == np.dtype(dtype).name and trace.batch == batch
    # Deepest chain G @ J_2 @ J_1 @ dy_0/dvec(W): from the loss, 48B + 16B + 16B;
    # from the weights, J_1 @ K costs 16*16 B, J_2 @ that 3*16 B, G @ that 3 B.
    assert trace.chain == "G @ dy_2/dx_2 @ dy_1/dx_1 @ dy_0/dvec(W)"
    assert trace.order_flops["reverse"] == B * (48 + 16 + 16)
    assert trace.order_flops["forward"] == B * (256 + 48 + 3)
    assert trace.order_flops["auto"] <= trace.order_flops["reverse"]


def test_jacobian_trace_follows_the_engines_plan():
    batch = 2
    net, x, _ = mlp(batch, seed=7)
    trace = explain(net, x)
    assert trace.mode == "jacobian" and trace.loss is None and trace.value is None
    assert [(s.action, s.operator, s.kind, s.shape, s.flops) for s in trace.steps] == [
        ("layer jacobian", "J_2 = dy_2/dx_2", "shared", [2, 3, 16], 0),
        ("layer jacobian", "J_1 = dy_1/dx_1", "diagonal", [2, 16, 16], 0),
        ("layer jacobian", "J_0 = dy_0/dx_0", "shared", [2, 16, 4], 0),
        # shared @ diagonal scales columns: B m n; then general @ shared: B m k n
        ("product", "J_2 @ J_1", "general", [2, 3, 16], 2 * 3 * 16),
        ("product", "J_2..1 @ J_0", "general", [2, 3, 4], 2 * 3 * 16 * 4),
    ]
    # forward: diagonal @ shared scales rows (B m n), then shared @ general is a GEMM
    # plus the copy that lays the stack out for it (B m k n + B k n)
    assert trace.order_flops == {
        "reverse": 480, "forward": 2 * 16 * 4 + (2 * 3 * 16 * 4 + 2 * 16 * 4), "auto": 480
    }
    assert trace.plan == [[0, 1], 2]
    assert trace.order_flops["auto"] == net.jacobian_cost(x)
    assert "plan ((J_2 @ J_1) @ J_0)" in str(trace)


@pytest.mark.parametrize("batch", [1, 3])
def test_values_are_the_matrices_the_engine_computes(batch):
    net, x, t = mlp(batch, seed=10 + batch)
    loss = jp.SoftmaxCrossEntropy()
    trace = net.explain(x, t, loss, values=True)
    value, grads = net.value_and_grad(x, t, loss)
    assert trace.value == pytest.approx(value, rel=1e-12)
    assert trace.sample == 0
    read = {s.gradient: np.array(s.values["gradient"]) for s in trace.steps if s.gradient}
    for key, grad in grads.items():
        np.testing.assert_allclose(read[key].reshape(grad.shape), grad, rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(trace.steps[0].values["G"], loss.grad(net(x), t)[:1])
    _, cache = net.forward(x)
    for step in trace.steps:
        if step.action == "backpropagate":
            layer = net[step.layer]
            block = layer.jacobian(cache.caches[step.layer]).to_dense()[0]
            np.testing.assert_array_equal(step.values["block"], block)
    # The covector entering layer 0 is dL/dx_0 = dL/dy_1 @ J_1, sample 0's row.
    last_g = [s for s in trace.steps if s.action == "backpropagate"][-1].values["G"]
    g = loss.grad(net(x), t)
    expected = net[1].vjp(cache.caches[1], net[2].vjp(cache.caches[2], g)[0])[0][:1]
    np.testing.assert_allclose(last_g, expected, rtol=1e-12)
    assert "values of sample 0:" in str(trace)


def test_jacobian_values_multiply_to_the_full_jacobian():
    net, x, _ = mlp(2, seed=3)
    trace = net.explain(x, values=True)
    np.testing.assert_allclose(trace.steps[-1].values["block"], net.jacobian(x).to_dense()[0],
                               rtol=1e-12)


@pytest.mark.parametrize("values", [False, True])
@pytest.mark.parametrize("with_loss", [False, True])
def test_json_round_trips_and_is_plain_data(values, with_loss):
    net, x, t = mlp(2, seed=20 + 2 * values + with_loss)
    args = (x, t, jp.SoftmaxCrossEntropy()) if with_loss else (x,)
    trace = net.explain(*args, values=values)
    text = trace.to_json()
    back = Trace.from_json(text)
    assert back == trace
    assert str(back) == str(trace)
    assert Trace.from_dict(json.loads(json.dumps(trace.to_dict()))) == trace
    assert all(isinstance(step, TraceStep) for step in back.steps)
    with pytest.raises(ValueError, match="unknown keys"):
        Trace.from_dict({**trace.to_dict(), "extra": 1})


def test_table_names_every_layer_step_and_gradient():
    net, x, t = mlp(2, seed=30)
    text = str(net.explain(x, t, jp.SoftmaxCrossEntropy()))
    for layer in net:
        assert repr(layer) in text
    for piece in ("G <- G @ dy_2/dx_2", "G @ dy_0/dvec(W)", "2.W: dL/dW = G^T X",
                  "0.b: dL/db = sum_i G_i", "kronecker", "shared", "diagonal", "identity"):
        assert piece in text
    assert len(text.splitlines()[0]) <= 120


def test_parameter_free_stack_compares_orders_on_dl_dx():
    net = jp.Sequential(jp.Tanh(), jp.Softmax())
    rng = np.random.default_rng(40)
    x = rng.standard_normal((3, 5))
    trace = net.explain(x, rng.standard_normal((3, 5)), jp.MSE())
    assert [s.action for s in trace.steps] == ["loss gradient", "backpropagate"]
    assert trace.steps[1].kind == "softmax"
    assert trace.chain == "G @ dy_1/dx_1 @ dy_0/dx_0"


def test_batch_zero_and_one_and_large_magnitudes():
    net, x, t = mlp(2, seed=50)
    with pytest.raises(ValueError, match="batch is empty"):  # the loss's own refusal
        net.explain(x[:0], t[:0], jp.SoftmaxCrossEntropy())
    # (A Dense stack's jacobian() itself fails at B = 0 in the engine, see the
    # report; an activation stack shows the trace works on an empty batch.)
    activations = jp.Sequential(jp.Tanh(), jp.Softmax())
    empty = activations.explain(np.zeros((0, 4)))
    assert [s.shape for s in empty.steps][:2] == [[0, 4, 4], [0, 4, 4]]
    assert all(s.stored_bytes == s.dense_bytes == 0 for s in empty.steps)
    one = net.explain(x[:1], values=True)
    np.testing.assert_allclose(one.steps[-1].values["block"],
                               net.jacobian(x[:1]).to_dense()[0], rtol=1e-12)
    big = net.explain(1e150 * x, values=True)
    assert np.isfinite(big.steps[-1].values["block"]).all()
    assert Trace.from_json(big.to_json()) == big


def test_operator_nbytes_counts_each_array_once_and_recurses():
    rng = np.random.default_rng(60)
    x = rng.standard_normal((3, 4))
    w = rng.standard_normal((5, 4))
    assert operator_nbytes(jp.IdentityJacobian(3, 5)) == 0
    assert operator_nbytes(jp.SharedJacobian(w, 3)) == w.nbytes
    kron = jp.KroneckerJacobian(jp.DiagonalJacobian(x), x)  # the same array twice
    assert operator_nbytes(kron) == x.nbytes
    assert operator_nbytes(kron.T) == x.nbytes  # a transposed view holds the operator


def test_bad_arguments_are_named():
    net, x, t = mlp(2, seed=70)
    with pytest.raises(ValueError, match="`loss` was given without `t`"):
        net.explain(x, loss=jp.MSE())
    with pytest.raises(ValueError, match="`t` was given without `loss`"):
        net.explain(x, t)
    with pytest.raises(TypeError, match="`loss` must be a jacobprop Loss"):
        net.explain(x, t, "ce")
    with pytest.raises(TypeError, match="`net` must be a jacobprop Sequential"):
        explain(jp.ReLU(), x)
    with pytest.raises(jp.ShapeError, match="explain"):
        net.explain(x[:, :3])
    with pytest.raises(ValueError, match="at least one sample"):
        net.explain(x[:0], values=True)


@st.composite
def problems(draw):
    """`(net, x, t, loss)`: a random registered stack (nested too), input and target."""
    net = draw(sequentials(min_depth=1, max_depth=4), label="net")
    x = draw(inputs(net), label="x")
    loss = draw(losses(), label="loss")
    t = draw(targets(loss, net(x).shape), label="t")
    return net, x, t, loss


@given(problem=problems())
def test_any_stack_traces_the_backward_pass_it_explains(problem):
    net, x, t, loss = problem
    trace = net.explain(x, t, loss, values=True)
    value, grads = net.value_and_grad(x, t, loss, mode="jacobian")
    assert trace.value == pytest.approx(value, rel=1e-12, abs=1e-300)
    read = {s.gradient: np.array(s.values["gradient"]) for s in trace.steps if s.gradient}
    assert list(read) == [key for index in range(len(net) - 1, -1, -1)
                          for key in grads if key.split(".")[0] == str(index)]
    for key, grad in grads.items():
        np.testing.assert_allclose(read[key].reshape(grad.shape), grad, rtol=1e-12,
                                   atol=1e-12 * np.abs(grad).max(initial=1.0))
    _, cache = net.forward(x)
    for step in trace.steps:
        if step.action == "backpropagate":
            op = net[step.layer].jacobian(cache.caches[step.layer])
            assert (step.kind, step.shape) == (op.kind, list(op.shape))
            assert step.stored_bytes == operator_nbytes(op)
            assert step.dense_bytes == int(np.prod(op.shape)) * op.dtype.itemsize
    assert Trace.from_json(trace.to_json()) == trace
    # The Jacobian trace's plan is the engine's: same total as jacobian_cost.
    plan = net.explain(x)
    assert plan.order_flops["auto"] == net.jacobian_cost(x)
    assert plan.order_flops["auto"] == chain_cost(
        [layer.jacobian(c) for layer, c in zip(net, cache.caches, strict=True)][::-1], "auto")[0]
