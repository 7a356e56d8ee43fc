"""Losses: values against naive formulas, gradients against finite differences, stability."""

import numpy as np
import pytest

import jacobprop as jp


@pytest.fixture
def rng():
    return np.random.default_rng(11)


def central_gradient(function, y, step=1e-6):
    """Plain central differences of a scalar function of an array (test-only reference)."""
    grad = np.zeros_like(y)
    for index in np.ndindex(y.shape):
        plus, minus = y.copy(), y.copy()
        plus[index] += step
        minus[index] -= step
        grad[index] = (function(plus) - function(minus)) / (2 * step)
    return grad


def naive_log_softmax(y):
    return y - np.log(np.exp(y).sum(axis=1, keepdims=True))


NAIVE = {
    "MSE": lambda y, t: ((y - t) ** 2).mean(axis=1),
    "RMSE": lambda y, t: ((y - t) ** 2).mean(axis=1),
    "SoftmaxCrossEntropy": lambda y, t: -naive_log_softmax(y)[np.arange(len(t)), t],
    "BinaryCrossEntropy": lambda y, t: (
        -(t * np.log(1 / (1 + np.exp(-y))) + (1 - t) * np.log(1 - 1 / (1 + np.exp(-y))))
    ).mean(axis=1),
}


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("name", sorted(jp.LOSSES))
def test_value_gradient_and_jacobian(name, reduction, rng):
    loss = jp.LOSSES[name](reduction=reduction)
    y = rng.standard_normal((5, 3))
    t = loss.example_target(y.shape, rng=rng)
    per_sample = NAIVE[name](y, t)
    np.testing.assert_allclose(loss.per_sample(y, t), per_sample, rtol=1e-12)
    combined = per_sample.mean() if reduction == "mean" else per_sample.sum()
    expected = np.sqrt(combined) if name == "RMSE" else combined
    value, grad = loss.value_and_grad(y, t)
    assert isinstance(value, float)
    np.testing.assert_allclose(value, expected, rtol=1e-12)
    np.testing.assert_allclose(loss.value(y, t), expected, rtol=1e-12)
    np.testing.assert_allclose(loss.reduce(loss.per_sample(y, t)), expected, rtol=1e-12)
    numeric = central_gradient(lambda z: loss.value(z, t), y)
    np.testing.assert_allclose(grad, numeric, rtol=1e-7, atol=1e-9)
    np.testing.assert_allclose(loss.grad(y, t), grad)
    J = loss.jacobian(y, t)
    assert J.shape == (5, 1, 3)
    np.testing.assert_allclose(J.to_dense()[:, 0, :], grad)


def test_mse_mean_is_the_mean_over_all_entries(rng):
    y, t = rng.standard_normal((4, 3)), rng.standard_normal((4, 3))
    np.testing.assert_allclose(jp.MSE().value(y, t), ((y - t) ** 2).mean())


def test_probability_rows_match_labels_and_soft_targets_are_differentiated(rng):
    loss = jp.SoftmaxCrossEntropy()
    y = rng.standard_normal((4, 3))
    labels = np.array([2, 0, 1, 2])
    onehot = np.eye(3)[labels]
    np.testing.assert_allclose(loss.value(y, onehot), loss.value(y, labels), rtol=1e-14)
    np.testing.assert_allclose(loss.grad(y, onehot), loss.grad(y, labels), atol=1e-15)
    soft = rng.dirichlet(np.ones(3), size=4)
    np.testing.assert_allclose(
        loss.value(y, soft), -(soft * naive_log_softmax(y)).sum(axis=1).mean(), rtol=1e-12
    )
    np.testing.assert_allclose(
        loss.grad(y, soft), central_gradient(lambda z: loss.value(z, soft), y), atol=1e-9
    )


def test_integral_float_labels_are_accepted(rng):
    y = rng.standard_normal((2, 3))
    loss = jp.SoftmaxCrossEntropy()
    assert loss.value(y, np.array([1.0, 2.0])) == loss.value(y, np.array([1, 2]))


def test_rmse_at_zero_error_has_the_zero_subgradient():
    y = np.array([[1.0, -2.0], [0.5, 3.0]])
    value, grad = jp.RMSE().value_and_grad(y, y.copy())
    assert value == 0.0
    np.testing.assert_array_equal(grad, np.zeros_like(y))


@pytest.mark.parametrize("name", sorted(jp.LOSSES))
def test_stable_for_logits_of_magnitude_1e4(name, rng):
    loss = jp.LOSSES[name]()
    y = np.array([[1e4, -1e4, 0.0], [-1e4, -1e4, 1e4]])
    t = loss.example_target(y.shape, rng=rng)
    with np.errstate(all="raise"):
        value, grad = loss.value_and_grad(y, t)
    assert np.isfinite(value) and np.isfinite(grad).all()


def test_cross_entropy_at_huge_logits_is_exact():
    y = np.array([[1e4, -1e4, 0.0]])
    loss = jp.SoftmaxCrossEntropy(reduction="sum")
    assert loss.value(y, np.array([0])) == 0.0
    assert loss.value(y, np.array([1])) == 2e4
    np.testing.assert_array_equal(loss.grad(y, np.array([1])), [[1.0, -1.0, 0.0]])
    bce = jp.BinaryCrossEntropy(reduction="sum")
    np.testing.assert_allclose(bce.value(np.array([[1e4, -1e4]]), np.array([[0.0, 1.0]])), 1e4)


@pytest.mark.parametrize(
    ("loss", "y", "t", "error", "message"),
    [
        (jp.SoftmaxCrossEntropy(), np.zeros((3, 4)), np.array([0, 4, 1]), ValueError,
         r"class label t\[1\] = 4 is out of range for 4 classes"),
        (jp.SoftmaxCrossEntropy(), np.zeros((3, 4)), np.array([0, -1, 1]), ValueError,
         r"class label t\[1\] = -1 is out of range"),
        (jp.SoftmaxCrossEntropy(), np.zeros((3, 4)), np.array([0, 1.5, 1]), ValueError,
         r"class labels `t` must be integers, got t\[1\] = 1.5"),
        (jp.SoftmaxCrossEntropy(), np.zeros((3, 4)), np.array([0, 1]), jp.ShapeError,
         r"class labels of shape \(3,\) or probability rows of shape \(3, 4\), got shape \(2,\)"),
        (jp.SoftmaxCrossEntropy(), np.zeros((2, 2)), np.array([[0.5, 0.6], [1, 0]]), ValueError,
         r"row 0 sums to"),
        (jp.SoftmaxCrossEntropy(), np.zeros((2, 2)), np.array([[1.5, -0.5], [1, 0]]), ValueError,
         r"must be non-negative, got t\[0, 1\] = -0.5"),
        (jp.MSE(), np.zeros((3, 2)), np.zeros((3, 3)), jp.ShapeError,
         r"MSE: target `t` must have the shape of `y` \(3, 2\), got \(3, 3\)"),
        (jp.MSE(), np.zeros((3, 2)), np.zeros(3), jp.ShapeError, r"MSE: `t` must be 2-D"),
        (jp.BinaryCrossEntropy(), np.zeros((1, 2)), np.array([[0.5, 2.0]]), ValueError,
         r"targets must lie in \[0, 1\], got t\[0, 1\] = 2.0"),
        (jp.MSE(), np.zeros((0, 2)), np.zeros((0, 2)), ValueError, r"the batch is empty"),
        (jp.RMSE(), np.zeros((2, 2), dtype=complex), np.zeros((2, 2)), TypeError,
         r"RMSE: `y` must be a real floating"),
    ],
)
def test_bad_targets_raise_clear_errors(loss, y, t, error, message):
    with pytest.raises(error, match=message):
        loss.value_and_grad(y, t)


def test_bad_reduction():
    with pytest.raises(ValueError, match=r"MSE: `reduction` must be 'mean' or 'sum', got 'max'"):
        jp.MSE(reduction="max")


def test_float32_losses_stay_float32(rng):
    for name, cls in jp.LOSSES.items():
        loss = cls()
        y = rng.standard_normal((3, 2)).astype(np.float32)
        t = loss.example_target(y.shape, rng=rng, dtype=np.float32)
        assert loss.grad(y, t).dtype == np.float32, name


@pytest.mark.parametrize("name", sorted(jp.LOSSES))
def test_separable_flag_tells_whether_reduce_is_linear(name, rng):
    loss = jp.LOSSES[name]()
    a, b = rng.uniform(0.5, 2.0, 6), rng.uniform(0.5, 2.0, 6)
    linear = np.isclose(loss.reduce(a + b), loss.reduce(a) + loss.reduce(b), rtol=1e-12)
    assert linear == loss.separable


def test_classification_losses_report_accuracy_and_regression_losses_do_not():
    y = np.array([[2.0, -1.0], [0.5, 3.0], [-4.0, -2.0]])
    # argmax: 0, 1, 1 against labels 0, 0, 1 (and the same as probability rows)
    ce = jp.SoftmaxCrossEntropy()
    assert ce._accuracy(y, np.array([0, 0, 1])) == pytest.approx(2 / 3)
    assert ce._accuracy(y, np.eye(2)[[0, 0, 1]]) == pytest.approx(2 / 3)
    # logit > 0 predicts 1: [1, 0], [1, 1], [0, 0] against [1, 1], [0, 1], [0, 1]
    bce = jp.BinaryCrossEntropy()
    t = np.array([[1.0, 1.0], [0.0, 1.0], [0.0, 1.0]])
    assert bce._accuracy(y, t) == pytest.approx(3 / 6)
    assert jp.MSE()._accuracy(y, y) is None
    assert jp.RMSE()._accuracy(y, y) is None
