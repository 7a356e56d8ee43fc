"""Dropout (modes, mask in the cache), Residual, and the GELU / SiLU / ELU activations."""

from __future__ import annotations

import copy

import numpy as np
import pytest
from scipy.special import erf

import jacobprop as jp
from jacobprop.testing import assert_layer_correct


# ---- Dropout ---------------------------------------------------------------------------
def test_dropout_train_mode_masks_scales_and_keeps_the_mask():
    layer = jp.Dropout(0.25, rng=np.random.default_rng(0))
    assert layer.training and layer.stochastic
    x = np.random.default_rng(1).standard_normal((200, 50))
    y, cache = layer.forward(x)
    kept = cache.mask != 0
    np.testing.assert_allclose(y[kept], x[kept] / 0.75, rtol=1e-15)
    assert not y[~kept].any()
    assert abs(kept.mean() - 0.75) < 0.02  # 10,000 draws: 5 standard deviations
    g = np.random.default_rng(2).standard_normal(y.shape)
    gx, _ = layer.vjp(cache, g)
    np.testing.assert_array_equal(gx, g * cache.mask)  # the forward's mask, not a new one
    np.testing.assert_array_equal(layer.jacobian(cache).diagonal, cache.mask)
    # A second forward draws a new mask: the layer keeps no state but its generator's.
    assert not np.array_equal(layer.forward(x)[1].mask, cache.mask)


def test_dropout_train_mode_against_differences_with_the_mask_held_fixed():
    layer = jp.Dropout(0.5, rng=np.random.default_rng(3))
    x = np.random.default_rng(4).standard_normal((3, 4))
    state = copy.deepcopy(layer.rng)
    _, cache = layer.forward(x)

    def fixed_mask(point):
        # The same generator state every time: the same mask as the cache's.
        return jp.Dropout(0.5, rng=copy.deepcopy(state))(point)

    numeric = np.stack([(fixed_mask(x + 1e-6 * e) - fixed_mask(x - 1e-6 * e)) / 2e-6
                        for e in np.eye(4)], axis=-1)
    np.testing.assert_allclose(layer.jacobian(cache).to_dense(), numeric, rtol=1e-8)


def test_dropout_eval_mode_and_the_extreme_probabilities():
    x = np.random.default_rng(5).standard_normal((3, 4))
    layer = jp.Dropout(0.9)
    jp.Sequential(layer).eval()
    assert not layer.stochastic
    np.testing.assert_array_equal(layer(x), x)
    assert isinstance(layer.jacobian(layer.forward(x)[1]), jp.IdentityJacobian)
    assert_layer_correct(layer)
    np.testing.assert_array_equal(jp.Dropout(0.0)(x), x)
    assert not jp.Dropout(0.0).stochastic
    assert not jp.Dropout(1.0)(x).any()
    y32 = jp.Dropout(0.5, rng=np.random.default_rng(0))(x.astype(np.float32))
    assert y32.dtype == np.float32
    with pytest.raises(ValueError, match="`p` must be a probability"):
        jp.Dropout(1.5)
    with pytest.raises(TypeError):
        jp.Dropout(0.5, np.random.default_rng(0))  # rng is keyword-only


# ---- Residual --------------------------------------------------------------------------
def test_residual_adds_the_identity_and_keys_parameters_inside_the_block():
    rng = np.random.default_rng(6)
    block = jp.Sequential(jp.Dense(3, 3, rng=rng), jp.Tanh())
    net = jp.Sequential(jp.Dense(2, 3, rng=rng), jp.Residual(block), jp.Dense(3, 1, rng=rng))
    assert list(net.params) == ["0.W", "0.b", "1.0.W", "1.0.b", "2.W", "2.b"]
    assert net.params["1.0.W"] is block[0].params["W"]
    x = rng.standard_normal((4, 2))
    _, cache = net.forward(x)
    h = net[0](x)
    np.testing.assert_allclose(net[1](h), h + block(h), rtol=1e-15)
    jac = net[1].jacobian(cache.caches[1])
    np.testing.assert_allclose(jac.to_dense(),
                               np.eye(3) + block.jacobian(h).to_dense(), rtol=1e-14)
    assert_layer_correct(net[1])
    assert_layer_correct(net)
    # Replacing a parameter through the residual reaches the block's own layer.
    net[1].params["0.W"] = np.zeros((3, 3))
    assert not block[0].params["W"].any()


def test_residual_passes_the_mode_and_state_to_its_block():
    norm = jp.BatchNorm(3)
    drop = jp.Dropout(0.5)
    residual = jp.Residual(jp.Sequential(norm, drop))
    net = jp.Sequential(residual)
    assert net.couples_samples and net.stochastic
    net.eval()
    assert not norm.training and not drop.training and not net.couples_samples
    net.train()
    x = np.random.default_rng(7).standard_normal((4, 3))
    _, cache = net.forward(x)
    net.update_state(cache)
    np.testing.assert_allclose(norm.running_mean, 0.1 * x.mean(axis=0))
    with pytest.raises(ValueError, match="keep the width"):
        jp.Residual(jp.Dense(3, 2))


# ---- GELU, SiLU, ELU -------------------------------------------------------------------
@pytest.mark.parametrize(
    ("layer", "function", "derivative"),
    [
        (jp.GELU(), lambda x: 0.5 * x * (1 + erf(x / np.sqrt(2))),
         lambda x: 0.5 * (1 + erf(x / np.sqrt(2))) + x * np.exp(-x * x / 2) / np.sqrt(2 * np.pi)),
        (jp.SiLU(), lambda x: x / (1 + np.exp(-x)),
         lambda x: 1 / (1 + np.exp(-x)) + x * np.exp(-x) / (1 + np.exp(-x)) ** 2),
        (jp.ELU(0.5), lambda x: np.where(x > 0, x, 0.5 * (np.exp(x) - 1)),
         lambda x: np.where(x > 0, 1.0, 0.5 * np.exp(x))),
    ],
)
def test_activation_values_and_derivatives(layer, function, derivative):
    x = np.random.default_rng(8).uniform(-4, 4, (6, 3))
    y, cache = layer.forward(x)
    np.testing.assert_allclose(y, function(x), rtol=1e-13, atol=1e-15)
    np.testing.assert_allclose(layer.jacobian(cache).diagonal, derivative(x), rtol=1e-12)
    assert_layer_correct(layer)


def test_activation_tails_keep_their_precision():
    # GELU's left tail is x * Phi(x) ~ -phi(x): 0.5 * (1 + erf) would round to 0 there.
    x = np.array([[-10.0, -30.0]])
    y = jp.GELU()(x)
    assert (y < 0).all() and np.isfinite(y).all()
    np.testing.assert_allclose(y[0, 0], -10 * 7.619853024160527e-24, rtol=1e-10)
    np.testing.assert_allclose(jp.ELU()(np.array([[1e-10]])) - jp.ELU()(np.array([[-1e-10]])),
                               2e-10, rtol=1e-9)
    assert jp.ELU.kinks == (0.0,)


@pytest.mark.parametrize("name", sorted(jp.LAYERS))
def test_config_rebuilds_every_registered_layer(name):
    layer = jp.LAYERS[name].example(6, rng=np.random.default_rng(0))
    twin = type(layer)(**layer.config())
    assert twin.config() == layer.config()
    assert {k: v.shape for k, v in twin.params.items()} == \
        {k: v.shape for k, v in layer.params.items()}
