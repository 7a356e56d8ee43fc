"""MaxPool2D, AvgPool2D and Flatten on hand-made inputs, and their selection operators."""

from __future__ import annotations

import numpy as np
import pytest

import jacobprop as jp
from jacobprop.testing import assert_layer_correct

IMAGE = np.array([[1.0, 5.0, 2.0, 0.0],
                  [3.0, 4.0, 7.0, 7.0],
                  [0.0, -1.0, 6.0, 2.0],
                  [2.0, 2.0, 1.0, 3.0]])


def test_max_pool_on_a_hand_made_image():
    layer = jp.MaxPool2D(2, input_shape=(1, 4, 4))
    x = IMAGE.reshape(1, 16)
    y, cache = layer.forward(x)
    np.testing.assert_array_equal(y, [[5.0, 7.0, 2.0, 6.0]])
    # The tie 7, 7 goes to the first in C-order of its window (row 1, column 2 = index 6);
    # the tie 2, 2 in the bottom-left window to (3, 0) = index 12.
    np.testing.assert_array_equal(cache.indices, [[1, 6, 12, 10]])
    gx, _ = layer.vjp(cache, np.array([[10.0, 20.0, 30.0, 40.0]]))
    expected = np.zeros(16)
    expected[[1, 6, 12, 10]] = [10.0, 20.0, 30.0, 40.0]
    np.testing.assert_array_equal(gx, expected[None])
    jac = layer.jacobian(cache)
    assert isinstance(jac, jp.SelectionJacobian)
    dense = np.zeros((1, 4, 16))
    dense[0, np.arange(4), [1, 6, 12, 10]] = 1
    np.testing.assert_array_equal(jac.to_dense(), dense)
    np.testing.assert_array_equal(jac.to_sparse().toarray(), dense[0])
    np.testing.assert_array_equal(layer.tie_gaps(x), [[1.0, 0.0, 0.0, 3.0]])
    assert jp.MaxPool2D.tie_kinks and not jp.AvgPool2D.tie_kinks


def test_overlapping_windows_accumulate_in_the_vjp():
    layer = jp.MaxPool2D(3, stride=1, input_shape=(1, 4, 4))
    x = IMAGE.reshape(1, 16)
    y, cache = layer.forward(x)
    np.testing.assert_array_equal(y, [[7.0, 7.0, 7.0, 7.0]])
    # Every window's first maximum is the 7 at index 6: all four covectors land there.
    gx, _ = layer.vjp(cache, np.array([[1.0, 2.0, 3.0, 4.0]]))
    assert gx[0, 6] == 10.0 and np.count_nonzero(gx) == 1
    np.testing.assert_array_equal(gx, np.einsum("bm,bmn->bn", [[1.0, 2.0, 3.0, 4.0]],
                                                layer.jacobian(cache).to_dense()))


def test_selection_composes_with_diagonals_without_densifying():
    rng = np.random.default_rng(2)
    layer = jp.MaxPool2D(2, input_shape=(2, 4, 4))
    x = rng.standard_normal((3, 32))
    _, cache = layer.forward(x)
    jac = layer.jacobian(cache)
    left = jp.DiagonalJacobian(rng.standard_normal((3, 8)))
    right = jp.DiagonalJacobian(rng.standard_normal((3, 32)))
    for product, expected in (
        (left @ jac, left.to_dense() @ jac.to_dense()),
        (jac @ right, jac.to_dense() @ right.to_dense()),
        (left @ jac @ right, left.to_dense() @ jac.to_dense() @ right.to_dense()),
    ):
        assert isinstance(product, jp.SelectionJacobian)
        np.testing.assert_allclose(product.to_dense(), expected, rtol=1e-14)
    stack = rng.standard_normal((3, 5, 8))
    np.testing.assert_allclose((jp.GeneralJacobian(stack) @ jac).to_dense(),
                               stack @ jac.to_dense(), rtol=1e-14)


def test_avg_pool_on_a_hand_made_image():
    layer = jp.AvgPool2D((2, 2), stride=(2, 1), input_shape=(1, 4, 4))
    assert layer.output_shape == (1, 2, 3)
    x = IMAGE.reshape(1, 16)
    y, cache = layer.forward(x)
    np.testing.assert_allclose(y, [[13 / 4, 18 / 4, 16 / 4, 3 / 4, 8 / 4, 12 / 4]])
    jac = layer.jacobian(cache)
    assert isinstance(jac, jp.PoolJacobian)
    dense = jac.to_dense()[0]
    assert dense[0, [0, 1, 4, 5]].tolist() == [0.25] * 4 and dense[0].sum() == 1.0
    # Column 1 of the image sits in two windows of the first row of outputs.
    gx, _ = layer.vjp(cache, np.ones((1, 6)))
    assert gx[0, 1] == 0.5 and gx[0, 0] == 0.25


@pytest.mark.parametrize("cls", [jp.MaxPool2D, jp.AvgPool2D])
@pytest.mark.parametrize("stride", [None, 1, (1, 2)])
def test_the_contract_holds(cls, stride):
    layer = cls((2, 3), stride=stride, input_shape=(2, 4, 5))
    assert_layer_correct(layer, rng=np.random.default_rng(3))


@pytest.mark.parametrize("batch", [0, 1])
def test_batch_edges(batch):
    for layer in (jp.MaxPool2D(2, input_shape=(1, 4, 4)), jp.AvgPool2D(2, input_shape=(1, 4, 4))):
        x = np.random.default_rng(batch).standard_normal((batch, 16)).astype(np.float32)
        y, cache = layer.forward(x)
        assert y.shape == (batch, 4) and y.dtype == np.float32
        gx, _ = layer.vjp(cache, np.ones_like(y))
        assert gx.shape == (batch, 16) and gx.dtype == np.float32


def test_flatten_is_the_identity_on_the_raveled_layout():
    images = np.arange(24.0).reshape(2, 3, 2, 2)
    flat = jp.Flatten()(images)
    np.testing.assert_array_equal(flat, images.reshape(2, 12))
    _, cache = jp.Flatten().forward(flat)
    assert isinstance(jp.Flatten().jacobian(cache), jp.IdentityJacobian)
    with pytest.raises(ValueError, match="does not fit"):
        jp.MaxPool2D(3, input_shape=(1, 2, 5))


def test_selection_weights_must_match_the_indices():
    indices = np.zeros((2, 3), dtype=np.intp)
    with pytest.raises(jp.ShapeError,
                       match=r"SelectionJacobian: `weights` must have the shape of `indices` "
                             r"\(2, 3\), got \(2, 4\)"):
        jp.SelectionJacobian(indices, 5, np.ones((2, 4)))
