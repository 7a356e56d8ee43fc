"""Sequential: public API contract, both backward modes, full Jacobians, errors."""

import numpy as np
import pytest

import jacobprop as jp


def _width_agnostic_without_params(name):
    layer = jp.LAYERS[name].example(4, rng=np.random.default_rng(0))
    return layer.input_dim is None and not layer.params


# The layers `build` can put between two Dense layers: any width, no parameters of
# their own (the hand-written reference below knows Dense parameters only).
ACTIVATIONS = [name for name in sorted(jp.LAYERS) if _width_agnostic_without_params(name)]


def build(rng, activation="ReLU", widths=(4, 6, 5, 3), dtype=np.float64):
    layers = []
    for index, (n_in, n_out) in enumerate(zip(widths[:-1], widths[1:], strict=True)):
        layers.append(jp.Dense(n_in, n_out, rng=rng, dtype=dtype))
        if index < len(widths) - 2:
            layers.append(jp.LAYERS[activation].example(n_out, rng=rng, dtype=dtype))
    return jp.Sequential(*layers)


def reference_gradients(net, x, t, loss):
    """Backprop written out by hand for Dense/activation stacks, from dense Jacobians."""
    activations, caches = [x], []
    for layer in net.layers:
        y, cache = layer.forward(activations[-1])
        activations.append(y)
        caches.append(cache)
    g = loss.grad(activations[-1], t)
    grads = {}
    for index in range(len(net) - 1, -1, -1):
        layer, cache = net[index], caches[index]
        if isinstance(layer, jp.Dense):
            grads[f"{index}.W"] = g.T @ activations[index]
            grads[f"{index}.b"] = g.sum(axis=0)
        g = np.einsum("bm,bmn->bn", g, layer.jacobian(cache).to_dense())
    return grads


def relative_error(a, b):
    return np.abs(a - b).max() / max(np.abs(b).max(), 1e-300)


def test_public_api_contract():
    rng = np.random.default_rng(0)
    net = jp.Sequential(jp.Dense(4, 16, rng=rng), jp.ReLU(), jp.Dense(16, 3, rng=rng))
    loss = jp.SoftmaxCrossEntropy()
    x = rng.standard_normal((7, 4))
    t = rng.integers(0, 3, size=7)
    assert net(x).shape == (7, 3)
    value, grads = net.value_and_grad(x, t, loss)
    assert isinstance(value, float)
    assert list(grads) == ["0.W", "0.b", "2.W", "2.b"] == list(net.params)
    for key, grad in grads.items():
        assert grad.shape == net.params[key].shape
    J = net.jacobian(x)
    assert isinstance(J, jp.Jacobian)
    assert J.to_dense().shape == (7, 3, 4)
    assert len(net) == 3 and net[1] is net.layers[1]
    assert net.params["0.W"] is net[0].params["W"]  # live arrays, no copies


@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("loss_name", sorted(jp.LOSSES))
def test_both_modes_agree_with_handwritten_backprop(activation, loss_name):
    # Seeded from the parameters' indices: hash() of strings is salted per process.
    seed = ACTIVATIONS.index(activation) * len(jp.LOSSES) + sorted(jp.LOSSES).index(loss_name)
    rng = np.random.default_rng(seed)
    net = build(rng, activation)
    loss = jp.LOSSES[loss_name]()
    x = rng.standard_normal((6, 4))
    t = loss.example_target((6, 3), rng=rng)
    expected = reference_gradients(net, x, t, loss)
    value, vjp_grads = net.value_and_grad(x, t, loss)
    value_j, jac_grads = net.value_and_grad(x, t, loss, mode="jacobian")
    value_d, dense_grads = net.value_and_grad(x, t, loss, mode="jacobian", dense=True)
    assert value == value_j == value_d
    assert value == pytest.approx(loss.value(net(x), t), rel=1e-14)
    for key in net.params:
        assert relative_error(vjp_grads[key], expected[key]) < 1e-12, key
        assert relative_error(jac_grads[key], vjp_grads[key]) < 1e-12, key
        assert relative_error(dense_grads[key], vjp_grads[key]) < 1e-12, key


def test_gradients_match_finite_differences_of_the_loss():
    rng = np.random.default_rng(5)
    net = build(rng, "Tanh")
    loss = jp.MSE()
    x, t = rng.standard_normal((3, 4)), rng.standard_normal((3, 3))
    _, grads = net.value_and_grad(x, t, loss)
    step = 1e-6
    for key, param in net.params.items():
        numeric = np.zeros_like(param)
        for index in np.ndindex(param.shape):
            saved = param[index]
            param[index] = saved + step
            plus = loss.value(net(x), t)
            param[index] = saved - step
            minus = loss.value(net(x), t)
            param[index] = saved
            numeric[index] = (plus - minus) / (2 * step)
        np.testing.assert_allclose(grads[key], numeric, rtol=1e-6, atol=1e-9, err_msg=key)


@pytest.mark.parametrize("order", ["auto", "forward", "reverse"])
def test_full_jacobian_in_every_order_matches_per_layer_product(order):
    rng = np.random.default_rng(2)
    net = jp.Sequential(
        jp.Dense(5, 8, rng=rng), jp.Tanh(), jp.Dense(8, 8, rng=rng), jp.Softmax(),
        jp.Dense(8, 3, rng=rng),
    )
    x = rng.standard_normal((4, 5))
    _, cache = net.forward(x)
    expected = np.stack([np.eye(5)] * 4)
    for layer, layer_cache in zip(net.layers, cache.caches, strict=True):
        expected = layer.jacobian(layer_cache).to_dense() @ expected
    np.testing.assert_allclose(net.jacobian(x, order=order).to_dense(), expected, atol=1e-13)
    np.testing.assert_allclose(net.jacobian(cache, order=order).to_dense(), expected, atol=1e-13)
    step = 1e-6
    numeric = np.stack(
        [(net(x + step * e) - net(x - step * e)) / (2 * step) for e in np.eye(5)], axis=2
    )
    np.testing.assert_allclose(expected, numeric, atol=1e-8)


def test_auto_order_picks_the_cheaper_accumulation():
    rng = np.random.default_rng(0)
    wide_in = jp.Sequential(jp.Dense(200, 50, rng=rng), jp.ReLU(), jp.Dense(50, 2, rng=rng))
    narrow_in = jp.Sequential(jp.Dense(2, 50, rng=rng), jp.ReLU(), jp.Dense(50, 200, rng=rng))
    for net, n_in, cheap, dear in [(wide_in, 200, "reverse", "forward"),
                                   (narrow_in, 2, "forward", "reverse")]:
        x = rng.standard_normal((16, n_in))
        assert net.jacobian_cost(x, cheap) < net.jacobian_cost(x, dear)
        assert net.jacobian_cost(x, "auto") <= net.jacobian_cost(x, cheap)


def test_param_jacobians_of_a_network_are_the_chained_products():
    rng = np.random.default_rng(4)
    net = build(rng, "Sigmoid", widths=(3, 4, 2))
    x = rng.standard_normal((5, 3))
    _, cache = net.forward(x)
    jacobians = net.param_jacobians(cache)
    assert list(jacobians) == list(net.params)
    step = 1e-6
    for key, param in net.params.items():
        numeric = np.zeros((5, 2, param.size))
        for flat in range(param.size):
            index = np.unravel_index(flat, param.shape)
            saved = param[index]
            param[index] = saved + step
            plus = net(x)
            param[index] = saved - step
            minus = net(x)
            param[index] = saved
            numeric[:, :, flat] = (plus - minus) / (2 * step)
        np.testing.assert_allclose(jacobians[key].to_dense(), numeric, atol=1e-8, err_msg=key)


def test_nested_sequentials_compose_keys_and_gradients():
    rng = np.random.default_rng(9)
    inner = jp.Sequential(jp.Dense(4, 5, rng=rng), jp.Tanh())
    net = jp.Sequential(inner, jp.Dense(5, 2, rng=rng))
    flat = jp.Sequential(inner[0], inner[1], net[1])
    x, t = rng.standard_normal((3, 4)), rng.standard_normal((3, 2))
    assert list(net.params) == ["0.0.W", "0.0.b", "1.W", "1.b"]
    for mode in ("vjp", "jacobian"):
        _, nested = net.value_and_grad(x, t, jp.MSE(), mode=mode)
        _, plain = flat.value_and_grad(x, t, jp.MSE(), mode=mode)
        np.testing.assert_allclose(nested["0.0.W"], plain["0.W"], rtol=1e-13)
        np.testing.assert_allclose(nested["1.b"], plain["2.b"], rtol=1e-13)


def test_network_vjp_and_jvp_as_a_layer():
    rng = np.random.default_rng(6)
    net = build(rng, "Softplus")
    x = rng.standard_normal((4, 4))
    _, cache = net.forward(x)
    J = net.jacobian(cache).to_dense()
    g, v = rng.standard_normal((4, 3)), rng.standard_normal((4, 4))
    gx, grads = net.vjp(cache, g)
    np.testing.assert_allclose(gx, np.einsum("bm,bmn->bn", g, J), atol=1e-13)
    np.testing.assert_allclose(net.jvp(cache, v), np.einsum("bmn,bn->bm", J, v), atol=1e-13)
    assert list(grads) == list(net.params)


def test_float32_end_to_end():
    rng = np.random.default_rng(8)
    net64 = build(rng, "Tanh")
    net32 = jp.Sequential(*[
        layer if not layer.params else _cast(layer, np.float32) for layer in net64.layers
    ])
    x = rng.standard_normal((5, 4))
    t = rng.integers(0, 3, size=5)
    loss = jp.SoftmaxCrossEntropy()
    value64, grads64 = net64.value_and_grad(x, t, loss)
    for mode in ("vjp", "jacobian"):
        value32, grads32 = net32.value_and_grad(x.astype(np.float32), t, loss, mode=mode)
        assert abs(value32 - value64) < 1e-5 * abs(value64)
        for key, grad in grads32.items():
            assert grad.dtype == np.float32
            assert relative_error(grad, grads64[key]) < 1e-5
    assert net32.jacobian(x.astype(np.float32)).to_dense().dtype == np.float32


def _cast(layer, dtype):
    copy = jp.Dense(layer.in_features, layer.out_features, rng=np.random.default_rng(0),
                    dtype=dtype)
    for name, value in layer.params.items():
        copy.params[name] = value.astype(dtype)
    return copy


def test_errors_name_the_layer_argument_and_both_shapes():
    rng = np.random.default_rng(0)
    with pytest.raises(jp.ShapeError, match=r"layer 2 \(Dense\(5, 3, bias=True\)\) expects 5 "
                                            r"input features, but layer 1 produces 4"):
        jp.Sequential(jp.Dense(2, 4, rng=rng), jp.ReLU(), jp.Dense(5, 3, rng=rng))
    with pytest.raises(TypeError, match="layer 1 must be a jacobprop Layer, got function"):
        jp.Sequential(jp.ReLU(), lambda x: x)
    net = jp.Sequential(jp.Dense(4, 3, rng=rng), jp.ReLU())
    with pytest.raises(jp.ShapeError, match=r"Sequential layer 0 \(Dense\): `x` must have shape "
                                            r"\(B, 4\), got \(2, 5\)"):
        net(np.ones((2, 5)))
    with pytest.raises(jp.ShapeError, match=r"got 1-D shape \(4,\); for one sample pass x\[None"):
        net(np.ones(4))
    with pytest.raises(TypeError, match=r"`x` must be a real floating .* got dtype bool"):
        net(np.ones((2, 4), dtype=bool))
    with pytest.raises(ValueError, match="`mode` must be one of"):
        net.value_and_grad(np.ones((2, 4)), np.ones((2, 3)), jp.MSE(), mode="backprop")
    with pytest.raises(TypeError, match="`loss` must be a jacobprop Loss, got str"):
        net.value_and_grad(np.ones((2, 4)), np.ones((2, 3)), "mse")
    with pytest.raises(ValueError, match="`order` must be one of"):
        net.jacobian(np.ones((2, 4)), order="middle")
    with pytest.raises(ValueError, match="the batch is empty"):
        net.value_and_grad(np.zeros((0, 4)), np.zeros((0, 3)), jp.MSE())


@pytest.mark.parametrize("mode", ["vjp", "jacobian"])
def test_a_failed_call_leaves_every_parameter_unchanged(mode):
    rng = np.random.default_rng(1)
    net = build(rng)
    before = {key: value.copy() for key, value in net.params.items()}
    bad_calls = [
        lambda: net.value_and_grad(np.ones((2, 4)), np.array([0, 7]), jp.SoftmaxCrossEntropy(),
                                   mode=mode),
        lambda: net.value_and_grad(np.ones((2, 5)), np.array([0, 1]), jp.SoftmaxCrossEntropy(),
                                   mode=mode),
        lambda: net.value_and_grad(np.ones((2, 4)), np.ones((2, 2)), jp.MSE(), mode=mode),
    ]
    for call in bad_calls:
        with pytest.raises(ValueError):
            call()
        for key, value in net.params.items():
            np.testing.assert_array_equal(value, before[key])


def test_value_and_grad_writes_nothing_to_the_layers():
    rng = np.random.default_rng(1)
    net = build(rng)
    before = {key: value.copy() for key, value in net.params.items()}
    x = rng.standard_normal((3, 4))
    net.value_and_grad(x, rng.integers(0, 3, 3), jp.SoftmaxCrossEntropy())
    net.value_and_grad(x, rng.integers(0, 3, 3), jp.SoftmaxCrossEntropy(), mode="jacobian")
    for key, value in net.params.items():
        np.testing.assert_array_equal(value, before[key])
    assert all(not hasattr(layer, "grad") for layer in net.layers)


def test_network_vjp_refuses_a_cotangent_of_another_batch_size():
    rng = np.random.default_rng(0)
    net = jp.Sequential(jp.Dense(3, 4, rng=rng), jp.Tanh())
    _, cache = net.forward(rng.standard_normal((5, 3)))
    message = r"Sequential: `g` must have shape \(5, 4\), got \(1, 4\)"
    with pytest.raises(jp.ShapeError, match=message):
        net.vjp(cache, np.ones((1, 4)))
