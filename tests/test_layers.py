"""Exact known values of every layer's forward, Jacobian and backward formulas."""

import numpy as np
import pytest

import jacobprop as jp


@pytest.fixture
def rng():
    return np.random.default_rng(3)


def test_dense_forward_and_gradients_are_the_textbook_formulas(rng):
    layer = jp.Dense(4, 3, rng=rng)
    x = rng.standard_normal((5, 4))
    G = rng.standard_normal((5, 3))
    y, cache = layer.forward(x)
    np.testing.assert_allclose(y, x @ layer.W.T + layer.b)
    gx, grads = layer.vjp(cache, G)
    np.testing.assert_allclose(grads["W"], G.T @ x)
    np.testing.assert_allclose(grads["b"], G.sum(axis=0))
    np.testing.assert_allclose(gx, G @ layer.W)
    assert list(grads) == ["W", "b"]
    v = rng.standard_normal((5, 4))
    np.testing.assert_allclose(layer.jvp(cache, v), v @ layer.W.T)


def test_dense_jacobians_are_structured_and_exact(rng):
    layer = jp.Dense(4, 3, rng=rng)
    x = rng.standard_normal((5, 4))
    _, cache = layer.forward(x)
    J = layer.jacobian(cache)
    assert isinstance(J, jp.SharedJacobian)
    np.testing.assert_array_equal(J.matrix, layer.W)
    weights = layer.param_jacobians(cache)
    assert isinstance(weights["W"], jp.KroneckerJacobian)
    assert isinstance(weights["b"], jp.IdentityJacobian)
    expected = np.stack([np.kron(np.eye(3), row[None, :]) for row in x])
    np.testing.assert_array_equal(weights["W"].to_dense(), expected)
    # The summed covector product over the batch is dL/dW, raveled in C order.
    G = rng.standard_normal((5, 3))
    np.testing.assert_allclose(weights["W"].sum_vjp(G).reshape(3, 4), G.T @ x)


def test_dense_without_bias_and_its_init(rng):
    layer = jp.Dense(100, 7, bias=False, rng=rng)
    assert list(layer.params) == ["W"]
    assert layer.b is None
    assert np.abs(layer.W).max() <= 1 / np.sqrt(100)
    x = rng.standard_normal((2, 100))
    np.testing.assert_allclose(layer(x), x @ layer.W.T)
    same = jp.Dense(100, 7, bias=False, rng=np.random.default_rng(3))
    np.testing.assert_array_equal(same.W, layer.W)


def test_softmax_jacobian_is_diag_minus_outer(rng):
    x = rng.standard_normal((4, 5))
    y, cache = jp.Softmax().forward(x)
    s = np.exp(x) / np.exp(x).sum(axis=1, keepdims=True)
    np.testing.assert_allclose(y, s)
    expected = np.stack([np.diag(row) - np.outer(row, row) for row in s])
    J = jp.Softmax().jacobian(cache)
    assert isinstance(J, jp.SoftmaxJacobian)
    np.testing.assert_allclose(J.to_dense(), expected, atol=1e-15)
    g = rng.standard_normal((4, 5))
    np.testing.assert_allclose(jp.Softmax().vjp(cache, g)[0], np.einsum("bm,bmn->bn", g, expected))
    np.testing.assert_allclose(jp.Softmax().jvp(cache, g), np.einsum("bmn,bn->bm", expected, g))


def test_relu_derivative_at_zero_is_zero_and_leaky_relu_takes_alpha():
    x = np.array([[-1.0, 0.0, 2.0]])
    _, cache = jp.ReLU().forward(x)
    np.testing.assert_array_equal(jp.ReLU().jacobian(cache).diagonal, [[0.0, 0.0, 1.0]])
    np.testing.assert_array_equal(jp.ReLU().vjp(cache, np.ones((1, 3)))[0], [[0.0, 0.0, 1.0]])
    leaky = jp.LeakyReLU(0.2)
    y, cache = leaky.forward(x)
    np.testing.assert_allclose(y, [[-0.2, 0.0, 2.0]])
    np.testing.assert_allclose(leaky.jacobian(cache).diagonal, [[0.2, 0.2, 1.0]])


@pytest.mark.parametrize(
    ("layer", "function", "derivative"),
    [
        (jp.Sigmoid(), lambda x: 1 / (1 + np.exp(-x)),
         lambda x: np.exp(-x) / (1 + np.exp(-x)) ** 2),
        (jp.Tanh(), np.tanh, lambda x: 1 / np.cosh(x) ** 2),
        (jp.Softplus(), lambda x: np.log1p(np.exp(x)), lambda x: 1 / (1 + np.exp(-x))),
        (jp.Identity(), lambda x: x, np.ones_like),
        (jp.ReLU(), lambda x: np.maximum(x, 0), lambda x: (x > 0) * 1.0),
    ],
)
def test_elementwise_values_and_derivatives(layer, function, derivative, rng):
    x = rng.uniform(-4, 4, (6, 3))
    y, cache = layer.forward(x)
    np.testing.assert_allclose(y, function(x), rtol=1e-13)
    np.testing.assert_allclose(np.diagonal(layer.jacobian(cache).to_dense(), axis1=1, axis2=2),
                               derivative(x), rtol=1e-12)
    g = rng.standard_normal(x.shape)
    np.testing.assert_allclose(layer.vjp(cache, g)[0], g * derivative(x), rtol=1e-12)
    np.testing.assert_allclose(layer.jvp(cache, g), g * derivative(x), rtol=1e-12)


@pytest.mark.parametrize("name", sorted(jp.LAYERS))
def test_no_overflow_or_underflow_at_logits_of_magnitude_1e4(name):
    layer = jp.LAYERS[name].example(3, rng=np.random.default_rng(0))
    x = np.array([[1e4, -1e4, 0.0], [-1e4, -1e4, 1e4]])
    with np.errstate(all="raise"):
        y, cache = layer.forward(x)
        gx, _ = layer.vjp(cache, np.ones_like(y))
        J = layer.jacobian(cache).to_dense()
    assert np.isfinite(y).all() and np.isfinite(gx).all() and np.isfinite(J).all()


def test_saturated_values_are_exact():
    x = np.array([[1e4, -1e4]])
    np.testing.assert_array_equal(jp.Sigmoid()(x), [[1.0, 0.0]])
    np.testing.assert_array_equal(jp.Softplus()(x), [[1e4, 0.0]])
    np.testing.assert_array_equal(jp.Softmax()(x), [[1.0, 0.0]])


@pytest.mark.parametrize("name", sorted(jp.LAYERS))
def test_float32_stays_float32(name):
    rng = np.random.default_rng(0)
    layer = jp.LAYERS[name].example(3, rng=rng, dtype=np.float32)
    x = rng.standard_normal((4, 3)).astype(np.float32)
    y, cache = layer.forward(x)
    assert y.dtype == np.float32
    gx, grads = layer.vjp(cache, np.ones_like(y))
    assert gx.dtype == np.float32
    assert all(g.dtype == np.float32 for g in grads.values())
    assert layer.jacobian(cache).to_dense().dtype == np.float32


def test_integer_input_is_promoted_to_float():
    layer = jp.Dense(2, 2, rng=np.random.default_rng(0))
    y = layer(np.array([[1, 2]]))
    assert y.dtype == np.float64
    np.testing.assert_allclose(y, np.array([[1.0, 2.0]]) @ layer.W.T + layer.b)


@pytest.mark.parametrize(
    ("bad", "error", "message"),
    [
        (np.ones(4), jp.ShapeError, r"Dense: `x` must be 2-D with shape \(B, 4\), got 1-D"),
        (np.ones((2, 3, 4)), jp.ShapeError, r"got 3-D shape \(2, 3, 4\)"),
        (np.ones((2, 5)), jp.ShapeError, r"`x` must have shape \(B, 4\), got \(2, 5\)"),
        (np.ones((2, 4), dtype=bool), TypeError, r"Dense: `x` must be .* got dtype bool"),
        (np.ones((2, 4), dtype=complex), TypeError, r"got dtype complex128 \(complex\)"),
        (np.array([[object()] * 4]), TypeError, r"got dtype object"),
    ],
)
def test_bad_input_names_layer_argument_expected_and_got(bad, error, message):
    with pytest.raises(error, match=message):
        jp.Dense(4, 2, rng=np.random.default_rng(0))(bad)


def test_bad_cotangent_and_tangent_shapes():
    layer = jp.Dense(4, 2, rng=np.random.default_rng(0))
    _, cache = layer.forward(np.ones((3, 4)))
    with pytest.raises(jp.ShapeError, match=r"Dense: `g` must have shape \(3, 2\), got \(3, 4\)"):
        layer.vjp(cache, np.ones((3, 4)))
    with pytest.raises(jp.ShapeError, match=r"`g` must have shape \(3, 2\), got \(2, 2\)"):
        layer.vjp(cache, np.ones((2, 2)))
    with pytest.raises(jp.ShapeError, match=r"Dense: `v` must have shape \(3, 4\)"):
        layer.jvp(cache, np.ones((2, 4)))


@pytest.mark.parametrize(
    ("build", "error", "message"),
    [
        (lambda: jp.Dense(0, 2), ValueError, r"`in_features` must be a positive integer, got 0"),
        (lambda: jp.Dense(2, 2.5), ValueError, r"`out_features` must be a positive integer"),
        (lambda: jp.Dense(2, 2, dtype=np.int64), TypeError, r"`dtype` must be a floating"),
        (lambda: jp.Dense(2, 2, rng=0), TypeError, r"`rng` must be a numpy.random.Generator"),
        (lambda: jp.LeakyReLU(float("nan")), ValueError, r"LeakyReLU: `alpha` must be a finite"),
        (lambda: jp.ELU(True), ValueError, r"ELU: `alpha` must be a finite real number, got True"),
        (lambda: jp.Conv2D(0, 2, 3, input_shape=(1, 4, 4)), ValueError,
         r"`in_channels` must be a positive integer, got 0"),
    ],
)
def test_bad_constructor_arguments(build, error, message):
    with pytest.raises(error, match=message):
        build()


def test_empty_batch_forward_gives_zero_rows(rng):
    net = jp.Sequential(jp.Dense(4, 3, rng=rng), jp.Softmax())
    assert net(np.zeros((0, 4))).shape == (0, 3)


def test_layers_keep_no_state_between_calls(rng):
    layer = jp.Dense(3, 2, rng=rng)
    xa, xb = rng.standard_normal((2, 3)), rng.standard_normal((4, 3))
    _, cache_a = layer.forward(xa)
    _, cache_b = layer.forward(xb)
    g = np.ones((2, 2))
    np.testing.assert_allclose(layer.vjp(cache_a, g)[1]["W"], g.T @ xa)


def test_registry_holds_every_public_layer():
    # Every concrete layer the package exports is registered, and nothing else is.
    exported = {name for name in jp.__all__ if isinstance(getattr(jp, name), type)
                and issubclass(getattr(jp, name), jp.Layer)} - {"Layer", "Sequential"}
    assert set(jp.LAYERS) == exported
    assert {"Dense", "ReLU", "Softmax", "Conv2D", "BatchNorm", "Residual"} <= exported
    with pytest.raises(ValueError, match="a different layer named 'ReLU'"):
        jp.register_layer(type("ReLU", (jp.Layer,), {}))
