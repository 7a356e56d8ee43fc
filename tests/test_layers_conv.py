"""Conv2D and its operators: exact values against direct loops, structure, image input."""

from __future__ import annotations

import numpy as np
import pytest

import jacobprop as jp
from jacobprop.testing import assert_layer_correct

GEOMETRIES = [  # (C, H, W), O, kernel, stride, padding
    ((1, 5, 5), 2, 3, 1, 0),
    ((2, 5, 6), 3, 3, 2, 1),
    ((3, 4, 7), 2, (2, 3), (1, 2), (1, 0)),
    ((2, 3, 3), 4, 1, 1, 0),
]


def direct_conv(x, W, b, stride, padding):
    """Cross-correlation written as loops over every output entry."""
    batch, channels, height, width = x.shape
    out, _, kh, kw = W.shape
    (sh, sw), (ph, pw) = stride, padding
    padded = np.zeros((batch, channels, height + 2 * ph, width + 2 * pw))
    padded[:, :, ph:ph + height, pw:pw + width] = x
    ho, wo = (height + 2 * ph - kh) // sh + 1, (width + 2 * pw - kw) // sw + 1
    y = np.zeros((batch, out, ho, wo))
    for n in range(batch):
        for o in range(out):
            for i in range(ho):
                for j in range(wo):
                    window = padded[n, :, i * sh:i * sh + kh, j * sw:j * sw + kw]
                    y[n, o, i, j] = b[o] + np.sum(W[o] * window)
    return y


def _pair(value):
    return (value, value) if isinstance(value, int) else tuple(value)


@pytest.mark.parametrize("geometry", GEOMETRIES)
def test_forward_matches_a_direct_loop(geometry):
    shape, out, kernel, stride, padding = geometry
    rng = np.random.default_rng(len(shape) + out)
    layer = jp.Conv2D(shape[0], out, kernel, input_shape=shape, stride=stride,
                      padding=padding, rng=rng)
    x = rng.standard_normal((3, *shape))
    expected = direct_conv(x, layer.W, layer.params["b"], _pair(stride), _pair(padding))
    assert layer.output_shape == expected.shape[1:]
    np.testing.assert_allclose(layer(x), expected.reshape(3, -1), rtol=1e-13, atol=1e-14)
    # float32 stays float32 and agrees to its rounding.
    layer32 = jp.Conv2D(shape[0], out, kernel, input_shape=shape, stride=stride,
                        padding=padding, rng=np.random.default_rng(0), dtype=np.float32)
    y32 = layer32(x.astype(np.float32))
    assert y32.dtype == np.float32
    expected32 = direct_conv(x.astype(np.float32).astype(np.float64),
                             layer32.W.astype(np.float64), layer32.params["b"].astype(np.float64),
                             _pair(stride), _pair(padding))
    np.testing.assert_allclose(y32, expected32.reshape(3, -1), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("geometry", GEOMETRIES)
def test_the_contract_holds(geometry):
    shape, out, kernel, stride, padding = geometry
    layer = jp.Conv2D(shape[0], out, kernel, input_shape=shape, stride=stride,
                      padding=padding, rng=np.random.default_rng(out))
    assert_layer_correct(layer, rng=np.random.default_rng(1))


def test_input_jacobian_is_the_shared_toeplitz_matrix():
    rng = np.random.default_rng(5)
    layer = jp.Conv2D(2, 3, 3, input_shape=(2, 4, 5), stride=2, padding=1, rng=rng)
    x = rng.standard_normal((4, 40))
    _, cache = layer.forward(x)
    jac = layer.jacobian(cache)
    assert isinstance(jac, jp.ConvJacobian)
    # Column k of the matrix is the bias-free response to the unit image e_k.
    unit_responses = np.stack([layer(np.eye(40)[k][None])[0] - layer(np.zeros((1, 40)))[0]
                               for k in range(40)], axis=1)
    dense = jac.to_dense()
    assert dense.shape == (4, layer.output_dim(40), 40)
    for block in dense:
        np.testing.assert_allclose(block, unit_responses, rtol=1e-13, atol=1e-15)
    np.testing.assert_array_equal(jac.to_sparse().toarray(),
                                  np.kron(np.eye(4), dense[0]))
    np.testing.assert_allclose(jac.batch_sum(), 4 * dense[0], rtol=1e-13)
    # Products keep agreeing with the dense blocks: vectors, stacks, transposes, sub-batches.
    g = rng.standard_normal((4, jac.out_dim))
    v = rng.standard_normal((4, 40))
    np.testing.assert_allclose(jac.vjp(g), np.einsum("bm,bmn->bn", g, dense), rtol=1e-12)
    np.testing.assert_allclose(jac.jvp(v), np.einsum("bmn,bn->bm", dense, v), rtol=1e-12)
    right = rng.standard_normal((4, 40, 2))
    np.testing.assert_allclose((jac @ jp.GeneralJacobian(right)).to_dense(), dense @ right,
                               rtol=1e-12)
    left = rng.standard_normal((4, 2, jac.out_dim))
    np.testing.assert_allclose((jp.GeneralJacobian(left) @ jac).to_dense(), left @ dense,
                               rtol=1e-12)
    np.testing.assert_allclose(jac.T.to_dense(), dense.swapaxes(1, 2))
    np.testing.assert_allclose(jac[1:3].to_dense(), dense[1:3])


def test_weight_jacobian_gives_dl_dw_in_one_product():
    rng = np.random.default_rng(6)
    layer = jp.Conv2D(2, 3, (2, 3), input_shape=(2, 4, 5), padding=1, rng=rng)
    x = rng.standard_normal((3, 40))
    y, cache = layer.forward(x)
    g = rng.standard_normal(y.shape)
    _, grads = layer.vjp(cache, g)
    ops = layer.param_jacobians(cache)
    assert isinstance(ops["W"], jp.PatchesJacobian)
    # The explicit mode: covector @ dy/dvec(W), summed over the batch.
    covector = jp.GeneralJacobian(g[:, None, :])
    for name in ("W", "b"):
        product = covector @ ops[name]
        assert isinstance(product, jp.PatchesJacobian)
        np.testing.assert_allclose(product.batch_sum().reshape(layer.params[name].shape),
                                   grads[name], rtol=1e-12)
        np.testing.assert_allclose(ops[name].sum_vjp(g).reshape(layer.params[name].shape),
                                   grads[name], rtol=1e-12)
    # dL/dW by loops: sum over samples and positions of g times the window.
    x4 = x.reshape(3, 2, 4, 5)
    padded = np.pad(x4, ((0, 0), (0, 0), (1, 1), (1, 1)))
    g4 = g.reshape(3, 3, *layer.output_shape[1:])
    expected = np.zeros_like(layer.W)
    for o in range(3):
        for i in range(g4.shape[2]):
            for j in range(g4.shape[3]):
                expected[o] += np.einsum("b,bcij->cij", g4[:, o, i, j],
                                         padded[:, :, i:i + 2, j:j + 3])
    np.testing.assert_allclose(grads["W"], expected, rtol=1e-12,
                               atol=1e-13 * np.abs(expected).max())


@pytest.mark.parametrize("batch", [0, 1])
def test_batch_edges(batch):
    rng = np.random.default_rng(batch)
    layer = jp.Conv2D(1, 2, 3, input_shape=(1, 4, 4), padding=1, rng=rng)
    x = rng.standard_normal((batch, 16))
    y, cache = layer.forward(x)
    assert y.shape == (batch, 32)
    gx, grads = layer.vjp(cache, np.ones_like(y))
    assert gx.shape == (batch, 16)
    assert grads["W"].shape == layer.W.shape
    assert layer.jacobian(cache).to_dense().shape == (batch, 32, 16)


def test_images_are_accepted_and_shapes_are_inferred():
    rng = np.random.default_rng(7)
    net = jp.Sequential(
        jp.Conv2D(1, 4, 3, input_shape=(1, 8, 8), padding=1, rng=rng), jp.ReLU(),
        jp.MaxPool2D(2), jp.Conv2D(4, 2, 3, rng=rng), jp.AvgPool2D(2), jp.Flatten(),
        jp.Dense(2, 3, rng=rng),
    )
    assert net.input_shape == (1, 8, 8)
    assert net[3].input_shape == (4, 4, 4) and net[3].output_shape == (2, 2, 2)
    assert net[4].output_shape == (2, 1, 1)
    assert net.output_shape is None and net.input_dim == 64
    images = rng.standard_normal((5, 1, 8, 8))
    np.testing.assert_array_equal(net(images), net(images.reshape(5, -1)))
    _, grads = net.value_and_grad(images, rng.integers(0, 3, 5), jp.SoftmaxCrossEntropy())
    assert grads["3.W"].shape == (2, 4, 3, 3)
    with pytest.raises(jp.ShapeError, match=r"\(B, 1, 8, 8\)"):
        net(rng.standard_normal((5, 1, 8, 7)))
    with pytest.raises(jp.ShapeError, match="needs `input_shape"):
        jp.Sequential(jp.Dense(4, 4), jp.Conv2D(1, 1, 1))
    with pytest.raises(jp.ShapeError, match="expects 16 input features"):
        jp.Sequential(jp.Conv2D(1, 2, 1, input_shape=(1, 4, 4)),
                      jp.Conv2D(1, 1, 1, input_shape=(1, 4, 4)))
    # A declared shape of the same size reads the raveled samples as its own images.
    reshaped = jp.Sequential(jp.Conv2D(1, 2, 1, input_shape=(1, 4, 4)),
                             jp.Conv2D(4, 1, 1, input_shape=(4, 2, 4)))
    assert reshaped.output_shape == (1, 2, 4)


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="`kernel_size`"):
        jp.Conv2D(1, 1, 0)
    with pytest.raises(ValueError, match="has 2 channels, but in_channels is 1"):
        jp.Conv2D(1, 1, 3, input_shape=(2, 5, 5))
    with pytest.raises(ValueError, match="does not fit"):
        jp.Conv2D(1, 1, 3, input_shape=(1, 2, 5))
    with pytest.raises(jp.ShapeError, match="input shape"):
        jp.Conv2D(1, 1, 3)(np.zeros((1, 9)))


def test_config_rebuilds_the_layer():
    layer = jp.Conv2D(2, 3, (2, 3), input_shape=(2, 4, 5), stride=2, padding=1, bias=False)
    twin = jp.Conv2D(**layer.config())
    assert twin.config() == layer.config()
    assert twin.W.shape == layer.W.shape and "b" not in twin.params


@pytest.mark.parametrize("order", ["auto", "forward", "reverse"])
def test_network_jacobian_through_every_new_operator(order):
    rng = np.random.default_rng(8)
    net = jp.Sequential(
        jp.Conv2D(2, 3, 3, input_shape=(2, 5, 5), padding=1, rng=rng), jp.SiLU(),
        jp.MaxPool2D(2, stride=1), jp.AvgPool2D((2, 1)), jp.LayerNorm(3 * 2 * 4),
        jp.Residual(jp.Sequential(jp.Dense(24, 24, rng=rng), jp.Tanh())), jp.Flatten(),
        jp.Dense(24, 4, rng=rng),
    )
    # An input whose pooling windows are all clear of ties (a tie is a kink).
    for _ in range(50):
        x = rng.standard_normal((3, 50))
        if net[2].tie_gaps(net[:2](x)).min() > 1e-3:
            break
    else:
        pytest.fail("no input with every max-pool window clear of ties in 50 draws")
    dense = net.jacobian(x, order=order).to_dense()
    np.testing.assert_allclose(dense, jp.numerical_jacobian(net, x), rtol=1e-6,
                               atol=1e-8 * np.abs(dense).max())


def test_explicit_mode_through_convolution_and_batch_norm():
    rng = np.random.default_rng(9)
    net = jp.Sequential(
        jp.Conv2D(1, 2, 3, input_shape=(1, 4, 4), padding=1, rng=rng), jp.BatchNorm(32),
        jp.ReLU(), jp.MaxPool2D(2), jp.Conv2D(2, 3, 2, rng=rng), jp.Flatten(),
        jp.Dense(3, 2, rng=rng),
    )
    x, t = rng.standard_normal((5, 1, 4, 4)), rng.integers(0, 2, 5)
    loss = jp.SoftmaxCrossEntropy()
    _, grads = net.value_and_grad(x, t, loss)
    scale = max(np.abs(value).max() for value in grads.values())
    for dense in (False, True):
        _, explicit = net.value_and_grad(x, t, loss, mode="jacobian", dense=dense)
        for key, value in grads.items():
            np.testing.assert_allclose(explicit[key], value, rtol=1e-10, atol=1e-13 * scale)
