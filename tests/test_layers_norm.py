"""LayerNorm and BatchNorm against closed forms, the coupled Jacobian, modes and state."""

from __future__ import annotations

import numpy as np
import pytest

import jacobprop as jp
from jacobprop.testing import assert_layer_correct


def whole_batch_jacobian(function, x, step=1e-6):
    """Central differences of a whole-batch function `(B, n) -> (B, m)`: `(B, m, B, n)`."""
    batch, n = x.shape
    columns = []
    for index in range(batch * n):
        e = np.zeros(batch * n)
        e[index] = step
        e = e.reshape(batch, n)
        columns.append((function(x + e) - function(x - e)) / (2 * step))
    return np.stack(columns, axis=-1).reshape(*function(x).shape, batch, n)


def with_affine(layer, rng):
    layer.params["gamma"][...] = rng.uniform(0.5, 1.5, layer.features)
    layer.params["beta"][...] = rng.standard_normal(layer.features)
    return layer


# ---- LayerNorm ------------------------------------------------------------------------
def test_layer_norm_matches_its_closed_form():
    rng = np.random.default_rng(0)
    layer = with_affine(jp.LayerNorm(5), rng)
    x = 3 * rng.standard_normal((4, 5)) + 1
    y, cache = layer.forward(x)
    mean = x.mean(axis=1, keepdims=True)
    var = x.var(axis=1, keepdims=True)
    xh = (x - mean) / np.sqrt(var + 1e-5)
    gamma, beta = layer.params["gamma"], layer.params["beta"]
    np.testing.assert_allclose(y, gamma * xh + beta, rtol=1e-13)
    jac = layer.jacobian(cache)
    assert isinstance(jac, jp.DiagonalLowRankJacobian)
    r = 1 / np.sqrt(var[:, 0] + 1e-5)
    expected = np.stack([gamma[:, None] * r[b] * (np.eye(5) - 1 / 5 - np.outer(xh[b], xh[b]) / 5)
                         for b in range(4)])
    np.testing.assert_allclose(jac.to_dense(), expected, rtol=1e-12, atol=1e-14)
    g = rng.standard_normal(y.shape)
    np.testing.assert_allclose(layer.vjp(cache, g)[0], np.einsum("bm,bmn->bn", g, expected),
                               rtol=1e-11)
    np.testing.assert_allclose(jac.T.to_dense(), expected.swapaxes(1, 2), rtol=1e-12,
                               atol=1e-14)


@pytest.mark.parametrize("affine", [True, False])
def test_layer_norm_contract_at_the_default_eps(affine):
    rng = np.random.default_rng(1)
    layer = jp.LayerNorm(6, affine=affine)
    if affine:
        with_affine(layer, rng)
    assert_layer_correct(layer, rng=rng)


# ---- BatchNorm, train mode: the coupled Jacobian ---------------------------------------
def test_batch_norm_train_matches_its_closed_form():
    rng = np.random.default_rng(2)
    layer = with_affine(jp.BatchNorm(3), rng)
    assert layer.training and layer.couples_samples
    x = 2 * rng.standard_normal((5, 3)) - 1
    y, cache = layer.forward(x)
    xh = (x - x.mean(axis=0)) / np.sqrt(x.var(axis=0) + 1e-5)
    np.testing.assert_allclose(y, layer.params["gamma"] * xh + layer.params["beta"], rtol=1e-13)
    jac = layer.jacobian(cache)
    assert isinstance(jac, jp.CoupledJacobian) and jac.couples_samples
    assert jac.shape == (5, 3, 3)
    dense = jac.to_dense()
    assert dense.shape == (5, 3, 5, 3)
    scale = layer.params["gamma"] / np.sqrt(x.var(axis=0) + 1e-5)
    for j in range(3):
        across = scale[j] * (np.eye(5) - 1 / 5 - np.outer(xh[:, j], xh[:, j]) / 5)
        np.testing.assert_allclose(dense[:, j, :, j], across, rtol=1e-12, atol=1e-14)
        others = np.delete(dense[:, j, :, :], j, axis=2)
        assert not others.any()


def test_batch_norm_coupled_jacobian_against_whole_batch_differences():
    rng = np.random.default_rng(3)
    layer = with_affine(jp.BatchNorm(4), rng)
    x = rng.standard_normal((6, 4))
    y, cache = layer.forward(x)
    jac = layer.jacobian(cache)
    dense = jac.to_dense()
    numeric = whole_batch_jacobian(layer, x)
    np.testing.assert_allclose(dense, numeric, rtol=1e-7, atol=1e-8 * np.abs(numeric).max())
    g, v = rng.standard_normal(y.shape), rng.standard_normal(x.shape)
    expected_vjp = np.einsum("im,imbn->bn", g, dense)
    np.testing.assert_allclose(layer.vjp(cache, g)[0], expected_vjp, rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(jac.vjp(g), expected_vjp, rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(layer.jvp(cache, v), np.einsum("imbn,bn->im", dense, v),
                               rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(jac.batch_sum(), dense.sum(axis=(0, 2)), atol=1e-13)
    np.testing.assert_allclose(jac.T.to_dense(), dense.transpose(2, 3, 0, 1))
    np.testing.assert_allclose(jac.to_sparse().toarray(), dense.reshape(24, 24))
    # The parameter Jacobians are per sample (gamma and beta act on each sample alone).
    for name, op in layer.param_jacobians(cache).items():
        assert not op.couples_samples

        def shifted(point, name=name):
            twin = jp.BatchNorm(4)
            twin.params.update({k: v.copy() for k, v in layer.params.items()})
            twin.params[name] = point
            return twin(x)

        value = layer.params[name]
        numeric = np.stack([(shifted(value + 1e-6 * e) - shifted(value - 1e-6 * e)) / 2e-6
                            for e in np.eye(4)], axis=-1)
        np.testing.assert_allclose(op.to_dense(), numeric, rtol=1e-7, atol=1e-9)


def test_per_sample_paths_refuse_the_coupled_jacobian():
    layer = jp.BatchNorm(2)
    x = np.random.default_rng(4).standard_normal((3, 2))
    jac = layer.jacobian(layer.forward(x)[1])
    with pytest.raises(ValueError, match="coupl"):
        jac[0]
    with pytest.raises(ValueError, match="coupl"):
        jac.to_scipy(sample=1)
    whole = jac.to_scipy()
    u = np.arange(6.0)
    np.testing.assert_allclose(whole.matvec(u), jac.jvp(u.reshape(3, 2)).ravel())


def test_coupling_survives_composition_on_both_sides():
    rng = np.random.default_rng(5)
    net = jp.Sequential(jp.Dense(3, 4, rng=rng), with_affine(jp.BatchNorm(4), rng), jp.Tanh(),
                        jp.Dense(4, 2, rng=rng))
    assert net.couples_samples
    x = rng.standard_normal((5, 3))
    for order in ("auto", "forward", "reverse"):
        jac = net.jacobian(x, order=order)
        assert jac.couples_samples and jac.shape == (5, 2, 3)
        np.testing.assert_allclose(jac.to_dense(), whole_batch_jacobian(net, x), rtol=1e-6,
                                   atol=1e-9)
    _, cache = net.forward(x)
    ops = [layer.jacobian(c) for layer, c in zip(net.layers, cache.caches, strict=True)]
    product = ops[3] @ ops[2] @ ops[1] @ ops[0]
    assert isinstance(product, jp.CoupledJacobian)
    g = rng.standard_normal((5, 2))
    np.testing.assert_allclose(product.vjp(g), net.vjp(cache, g)[0], rtol=1e-12)
    # Residual around a coupled block: I + J stays coupled.
    residual = jp.Residual(jp.Sequential(jp.Dense(4, 4, rng=rng), jp.BatchNorm(4)))
    z = rng.standard_normal((5, 4))
    jac = residual.jacobian(residual.forward(z)[1])
    assert jac.couples_samples
    np.testing.assert_allclose(jac.to_dense(), whole_batch_jacobian(residual, z), rtol=1e-6,
                               atol=1e-9)


@pytest.mark.parametrize("dense", [False, True])
def test_explicit_mode_agrees_with_vjp_mode_and_finite_differences(dense):
    rng = np.random.default_rng(6)
    net = jp.Sequential(jp.Dense(3, 4, rng=rng), with_affine(jp.BatchNorm(4), rng), jp.ReLU(),
                        jp.Dense(4, 3, rng=rng))
    x, t = rng.standard_normal((6, 3)), rng.integers(0, 3, 6)
    loss = jp.SoftmaxCrossEntropy()
    _, grads = net.value_and_grad(x, t, loss)
    _, explicit = net.value_and_grad(x, t, loss, mode="jacobian", dense=dense)
    # The bias before BatchNorm has gradient 0 (the batch mean removes it): rounding
    # noise, judged on the scale of all the gradients.
    scale = max(np.abs(value).max() for value in grads.values())
    for key, value in grads.items():
        np.testing.assert_allclose(explicit[key], value, rtol=1e-10, atol=1e-13 * scale)
    # The whole-batch loss in each parameter entry: its finite differences see the coupling.
    for key in ("0.W", "1.gamma"):
        param = net.params[key]
        numeric = np.zeros(param.size)
        for index in range(param.size):
            original = param.flat[index]
            param.flat[index] = original + 1e-6
            upper = loss.value(net(x), t)
            param.flat[index] = original - 1e-6
            lower = loss.value(net(x), t)
            param.flat[index] = original
            numeric[index] = (upper - lower) / 2e-6
        np.testing.assert_allclose(grads[key].ravel(), numeric, rtol=1e-6, atol=1e-9)


# ---- BatchNorm, eval mode, and the state rule ------------------------------------------
def test_batch_norm_eval_mode_uses_running_statistics_per_sample():
    rng = np.random.default_rng(7)
    layer = with_affine(jp.BatchNorm(3), rng)
    layer.running_mean[...] = [1.0, -2.0, 0.5]
    layer.running_var[...] = [4.0, 0.25, 1.0]
    net = jp.Sequential(layer).eval()
    assert not layer.training and not layer.couples_samples and not net.couples_samples
    x = rng.standard_normal((4, 3))
    y, cache = layer.forward(x)
    scale = layer.params["gamma"] / np.sqrt(layer.running_var + 1e-5)
    np.testing.assert_allclose(y, (x - layer.running_mean) * scale + layer.params["beta"],
                               rtol=1e-13)
    jac = layer.jacobian(cache)
    assert isinstance(jac, jp.DiagonalJacobian)
    np.testing.assert_allclose(jac.diagonal, np.broadcast_to(scale, (4, 3)))
    assert_layer_correct(layer, rng=rng)


def test_no_forward_changes_running_statistics_and_update_state_is_pytorchs_rule():
    rng = np.random.default_rng(8)
    layer = jp.BatchNorm(3, momentum=0.2)
    net = jp.Sequential(jp.Dense(2, 3, rng=rng), layer)
    x = rng.standard_normal((5, 2))
    before = layer.running_mean.copy(), layer.running_var.copy()
    _, cache = net.forward(x)
    net.value_and_grad(x, rng.standard_normal((5, 3)), jp.MSE())
    net.value_and_grad(x, rng.standard_normal((5, 3)), jp.MSE(), mode="jacobian")
    net.jacobian(x)
    net(x)
    np.testing.assert_array_equal(layer.running_mean, before[0])
    np.testing.assert_array_equal(layer.running_var, before[1])
    net.update_state(cache)
    h = net[0](x)
    np.testing.assert_allclose(layer.running_mean, 0.8 * before[0] + 0.2 * h.mean(axis=0))
    np.testing.assert_allclose(layer.running_var, 0.8 * before[1] + 0.2 * h.var(axis=0, ddof=1))
    # An eval-mode forward computes no statistics: updating from it changes nothing.
    after = layer.running_mean.copy()
    net.eval()
    net.update_state(net.forward(x)[1])
    np.testing.assert_array_equal(layer.running_mean, after)


@pytest.mark.parametrize("batch", [0, 1])
def test_batch_norm_batch_edges(batch):
    layer = jp.BatchNorm(2)
    x = np.random.default_rng(batch).standard_normal((batch, 2))
    y, cache = layer.forward(x)
    assert y.shape == (batch, 2) and np.isfinite(y).all()
    gx, _ = layer.vjp(cache, np.ones_like(y))
    assert gx.shape == (batch, 2)
    if batch == 1:
        with pytest.raises(ValueError, match="at least 2 samples"):
            layer.update_state(cache)


def test_float32_train_mode_stays_float32():
    rng = np.random.default_rng(9)
    layer = jp.BatchNorm(3, dtype=np.float32)
    x = rng.standard_normal((4, 3)).astype(np.float32)
    y, cache = layer.forward(x)
    gx, grads = layer.vjp(cache, np.ones_like(y))
    assert y.dtype == gx.dtype == grads["gamma"].dtype == np.float32
    assert layer.jacobian(cache).to_dense().dtype == np.float32


def test_large_magnitudes_normalize_exactly():
    x = np.array([[1e8, -1e8, 3e8], [1e8 + 2, -1e8 - 2, 3e8 + 4], [1e8 - 2, -1e8 + 2, 3e8 - 4]])
    y = jp.BatchNorm(3)(x)
    np.testing.assert_allclose(y.std(axis=0), 1.0, rtol=1e-5)
    z = jp.LayerNorm(3)(x)
    np.testing.assert_allclose(z.mean(axis=1), 0.0, atol=1e-6)


def test_config_rebuilds_the_layers():
    for layer in (jp.LayerNorm(4, eps=1e-3, affine=False), jp.BatchNorm(3, momentum=0.3)):
        assert type(layer)(**layer.config()).config() == layer.config()
