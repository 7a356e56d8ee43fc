"""Tests of the finite-difference checkers themselves (`jacobprop.checks`).

Every checker must be right where the answer is known, pass on every correct
layer and loss of the registries (at random inputs and exactly at kinks), and
fail -- with a readable report -- where a derivative is wrong (see also
test_mutants.py).
"""

from __future__ import annotations

import copy
from typing import NamedTuple

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from mutants import registered_example

import jacobprop as jp
from jacobprop.checks import CENTRAL_STEP, default_rtol
from jacobprop.testing import checkable

LAYER_NAMES = sorted(jp.LAYERS)
LOSS_NAMES = sorted(jp.LOSSES)
F32 = {"rtol": 1e-3, "atol": 1e-5}


def stack_with(layer_name, *, rng, dtype=np.float64, width=5, n_in=4, n_out=3):
    """`Dense(n_in, width) -> <registered layer> -> Dense(., n_out)` in `dtype`."""
    middle = checkable(jp.LAYERS[layer_name].example(width, rng=rng, dtype=dtype))
    inner = middle.output_dim(width)
    return jp.Sequential(
        jp.Dense(n_in, width, rng=rng, dtype=dtype),
        middle,
        jp.Dense(inner, n_out, rng=rng, dtype=dtype),
    )


def snapshot(net):
    return {key: (value, value.copy()) for key, value in net.params.items()}


def assert_unchanged(net, saved):
    for key, value in net.params.items():
        original, copy = saved[key]
        assert value is original, f"{key} was replaced"
        np.testing.assert_array_equal(value, copy, err_msg=f"{key} was modified")


# ---- numerical_jacobian ------------------------------------------------------------------
def test_numerical_jacobian_of_a_linear_map_is_the_matrix():
    rng = np.random.default_rng(0)
    matrix = rng.standard_normal((3, 5))
    x = rng.standard_normal((4, 5)) * 10
    jac = jp.numerical_jacobian(lambda z: z @ matrix.T, x)
    assert jac.shape == (4, 3, 5)
    np.testing.assert_allclose(jac, np.broadcast_to(matrix, (4, 3, 5)), rtol=1e-8, atol=1e-9)


@pytest.mark.parametrize(
    ("function", "derivative"),
    [(np.tanh, lambda z: 1 - np.tanh(z) ** 2), (np.exp, np.exp), (np.sin, np.cos)],
)
def test_numerical_jacobian_of_elementwise_functions_is_diagonal(function, derivative):
    rng = np.random.default_rng(1)
    x = rng.standard_normal((3, 4))
    jac = jp.numerical_jacobian(function, x)
    expected = np.zeros((3, 4, 4))
    expected[:, np.arange(4), np.arange(4)] = derivative(x)
    np.testing.assert_allclose(jac, expected, rtol=1e-8, atol=1e-10)


def test_numerical_jacobian_of_softmax():
    rng = np.random.default_rng(2)
    x = rng.standard_normal((3, 5))

    def softmax(z):
        e = np.exp(z - z.max(axis=1, keepdims=True))
        return e / e.sum(axis=1, keepdims=True)

    s = softmax(x)
    expected = -s[:, :, None] * s[:, None, :]
    expected[:, np.arange(5), np.arange(5)] += s
    np.testing.assert_allclose(jp.numerical_jacobian(softmax, x), expected, atol=1e-10)


def test_numerical_jacobian_of_a_whole_array_function():
    rng = np.random.default_rng(3)
    matrix = rng.standard_normal((2, 3))
    jac = jp.numerical_jacobian(lambda w: np.tanh(w).sum(axis=0), matrix, per_sample=False)
    expected = np.zeros((3, 6))
    for i in range(2):
        for j in range(3):
            expected[j, i * 3 + j] = 1 - np.tanh(matrix[i, j]) ** 2
    np.testing.assert_allclose(jac, expected, rtol=1e-8, atol=1e-10)


def test_richardson_is_more_accurate_on_a_smooth_function():
    x = np.linspace(0.3, 2.0, 6).reshape(2, 3)
    exact = np.zeros((2, 3, 3))
    exact[:, np.arange(3), np.arange(3)] = np.cos(x) * np.exp(np.sin(x))
    plain = np.abs(jp.numerical_jacobian(lambda z: np.exp(np.sin(z)), x, step=1e-3) - exact).max()
    extrapolated = np.abs(
        jp.numerical_jacobian(lambda z: np.exp(np.sin(z)), x, step=1e-3, richardson=True) - exact
    ).max()
    assert extrapolated < plain / 100, (plain, extrapolated)


@pytest.mark.parametrize(("richardson", "per_column"), [(False, 2), (True, 4)])
def test_per_sample_costs_two_evaluations_per_input_coordinate(richardson, per_column):
    calls = []

    def f(z):
        calls.append(z.shape)
        return np.tanh(z)

    x = np.random.default_rng(4).standard_normal((7, 5))
    jp.numerical_jacobian(f, x, richardson=richardson)
    assert len(calls) == per_column * 5  # independent of the batch size 7
    assert all(shape == (7, 5) for shape in calls)


def test_numerical_jacobian_rejects_bad_arguments():
    with pytest.raises(TypeError, match="numerical_jacobian.*callable"):
        jp.numerical_jacobian(3, np.ones((2, 2)))
    with pytest.raises(jp.ShapeError, match="numerical_jacobian"):
        jp.numerical_jacobian(lambda z: z.sum(axis=1), np.ones((2, 3)))
    with pytest.raises(ValueError, match="`step` must be"):
        jp.numerical_jacobian(np.tanh, np.ones((2, 3)), step=-1.0)


# ---- dottest ------------------------------------------------------------------------------
def test_dottest_passes_on_the_engines_operators():
    rng = np.random.default_rng(5)
    net = jp.Sequential(jp.Dense(4, 6, rng=rng), jp.Softmax(), jp.Dense(6, 3, rng=rng))
    jac = net.jacobian(rng.standard_normal((5, 4)))
    assert jp.dottest(jac, rng=rng) < 1e-13
    assert jp.dottest(jac.T, rng=rng) < 1e-13


def test_dottest_measures_and_reports_a_wrong_adjoint():
    rng = np.random.default_rng(6)
    matrix = rng.standard_normal((3, 4))
    pair = (lambda u: u @ matrix.T, lambda v: 1.01 * (v @ matrix))
    discrepancy = jp.dottest(pair, shape=(2, 3, 4), rng=rng)
    assert 1e-3 < discrepancy < 0.1
    with pytest.raises(jp.GradcheckError, match=r"dottest: my operator .*<J u, v>"):
        jp.dottest(pair, shape=(2, 3, 4), rng=rng, raise_on_fail=True, name="my operator")
    right = (lambda u: u @ matrix.T, lambda v: v @ matrix)
    assert jp.dottest(right, shape=(2, 3, 4), rng=rng, raise_on_fail=True) < 1e-13


def test_dottest_rejects_bad_arguments():
    with pytest.raises(TypeError, match="dottest"):
        jp.dottest(np.ones((2, 3, 3)))
    with pytest.raises(ValueError, match="shape"):
        jp.dottest((np.tanh, np.tanh))
    with pytest.raises(jp.ShapeError, match="dottest"):
        jp.dottest((lambda u: u, lambda v: v), shape=(2, 3, 4))


# ---- gradcheck over the registries -----------------------------------------------------------
@pytest.mark.parametrize("loss_name", LOSS_NAMES)
@pytest.mark.parametrize("layer_name", LAYER_NAMES)
def test_gradcheck_passes_on_every_layer_with_every_loss_float64(layer_name, loss_name):
    rng = np.random.default_rng([LAYER_NAMES.index(layer_name), LOSS_NAMES.index(loss_name)])
    net = stack_with(layer_name, rng=rng)
    loss = jp.LOSSES[loss_name]()
    x = rng.standard_normal((4, 4))
    t = loss.example_target((4, 3), rng=rng)
    for kwargs in ({}, {"fast": True}, {"richardson": True}):
        report = jp.gradcheck(net, x, t, loss, rng=rng, **kwargs)
        assert report.ok, str(report)
        assert [entry.name for entry in report.entries] == [*net.params, "x"]
    assert jp.taylor_test(net, x, t, loss, rng=rng).ok


@pytest.mark.parametrize("loss_name", LOSS_NAMES)
@pytest.mark.parametrize("layer_name", LAYER_NAMES)
def test_gradcheck_passes_on_every_layer_with_every_loss_float32(layer_name, loss_name):
    rng = np.random.default_rng([LAYER_NAMES.index(layer_name), LOSS_NAMES.index(loss_name), 32])
    net = stack_with(layer_name, rng=rng, dtype=np.float32)
    loss = jp.LOSSES[loss_name]()
    x = rng.standard_normal((4, 4)).astype(np.float32)
    t = loss.example_target((4, 3), rng=rng, dtype=np.float32)
    report = jp.gradcheck(net, x, t, loss, rng=rng, **F32)
    assert report.ok, str(report)
    assert "float32" in report.title
    assert jp.gradcheck(net, x, t, loss, rng=rng, fast=True, **F32).ok
    assert jp.taylor_test(net, x, t, loss, rng=rng).ok


def test_float32_without_tolerances_is_refused_with_the_fix_in_the_message():
    rng = np.random.default_rng(7)
    net = jp.Sequential(jp.Dense(3, 2, rng=rng, dtype=np.float32))
    x = rng.standard_normal((2, 3)).astype(np.float32)
    t = np.zeros((2, 2), dtype=np.float32)
    with pytest.raises(TypeError, match=r"gradcheck.*float32.*rtol="):
        jp.gradcheck(net, x, t, jp.MSE())
    with pytest.raises(TypeError, match=r"check_layer.*float32.*rtol="):
        jp.check_layer(net[0], x)
    assert jp.gradcheck(net, x, t, jp.MSE(), rtol=1e-3).ok


def test_float32_tolerances_still_catch_a_wrong_gradient():
    rng = np.random.default_rng(8)
    net = jp.Sequential(jp.Dense(3, 4, rng=rng, dtype=np.float32), BadSlopeTanh(),
                        jp.Dense(4, 2, rng=rng, dtype=np.float32))
    x = rng.standard_normal((3, 3)).astype(np.float32)
    t = rng.standard_normal((3, 2)).astype(np.float32)
    report = jp.gradcheck(net, x, t, jp.MSE(), **F32)
    assert not report.ok
    assert "layer 1 (BadSlopeTanh)" in report.culprit
    taylor = jp.taylor_test(net, x, t, jp.MSE(), rng=rng)
    assert not taylor.ok and "BadSlopeTanh" in str(taylor)


def test_a_single_layer_is_checked_as_a_one_layer_stack():
    rng = np.random.default_rng(9)
    report = jp.gradcheck(jp.Dense(3, 2, rng=rng), rng.standard_normal((4, 3)),
                          rng.standard_normal((4, 2)), jp.MSE())
    assert report.ok
    assert [entry.name for entry in report.entries] == ["0.W", "0.b", "x"]


def test_nested_stacks_are_flattened_with_their_keys():
    rng = np.random.default_rng(10)
    inner = jp.Sequential(jp.Dense(5, 4, rng=rng), jp.ReLU())
    net = jp.Sequential(jp.Dense(3, 5, rng=rng), inner, jp.Dense(4, 2, rng=rng))
    x = rng.standard_normal((4, 3))
    report = jp.gradcheck(net, x, rng.integers(0, 2, 4), jp.SoftmaxCrossEntropy())
    assert report.ok, str(report)
    assert [e.name for e in report.entries] == ["0.W", "0.b", "1.0.W", "1.0.b", "2.W", "2.b", "x"]
    assert report["1.0.W"].layer == "1.0 Dense"


def test_jacobian_mode_is_checked_too():
    rng = np.random.default_rng(11)
    net = stack_with("Softmax", rng=rng)
    x = rng.standard_normal((3, 4))
    report = jp.gradcheck(net, x, rng.standard_normal((3, 3)), jp.MSE(), mode="jacobian")
    assert report.ok, str(report)
    assert "by jacobian" in report.title


# ---- kinks ------------------------------------------------------------------------------------
KINKED = sorted(name for name, cls in jp.LAYERS.items() if cls.kinks)


def test_the_registry_has_kinked_layers_to_test():
    assert KINKED, "no registered layer declares kinks: the kink tests below test nothing"


@pytest.mark.parametrize("loss_name", LOSS_NAMES)
@pytest.mark.parametrize("layer_name", KINKED)
def test_inputs_exactly_at_kinks_are_never_flagged(layer_name, loss_name):
    rng = np.random.default_rng(12)
    cls = jp.LAYERS[layer_name]
    loss = jp.LOSSES[loss_name]()
    kink = cls.kinks[0]
    # (a) the network input itself at the kink, straight into the kinked layer
    first = jp.Sequential(cls.example(4, rng=rng), jp.Dense(4, 3, rng=rng))
    x = rng.standard_normal((5, 4))
    x[0] = kink
    x[2, 1] = kink
    t = loss.example_target((5, 3), rng=rng)
    # (b) Dense pre-activations exactly at the kink for whole samples, in two layers
    d1, d2 = jp.Dense(4, 6, rng=rng), jp.Dense(6, 5, rng=rng)
    d1.params["b"][:] = kink
    d2.params["b"][:] = kink
    deep = jp.Sequential(d1, cls.example(6, rng=rng), d2, cls.example(5, rng=rng),
                         jp.Dense(5, 3, rng=rng))
    x_deep = rng.standard_normal((5, 4))
    x_deep[[0, 3]] = 0.0
    for net, inputs in ((first, x), (deep, x_deep)):
        for kwargs in ({}, {"fast": True}, {"richardson": True}):
            report = jp.gradcheck(net, inputs, t, loss, rng=rng, **kwargs)
            assert report.ok, str(report)
        assert jp.gradcheck(net, inputs, t, loss, rng=rng).kink_accepted > 0


def test_kink_acceptance_is_reported_and_counted():
    rng = np.random.default_rng(13)
    net = jp.Sequential(jp.ReLU(), jp.Dense(3, 2, rng=rng))
    x = np.array([[0.0, 1.0, -1.0], [2.0, 0.0, 0.5]])
    report = jp.gradcheck(net, x, rng.standard_normal((2, 2)), jp.MSE())
    assert report.ok
    assert report["x"].kink_accepted == 2
    assert "2 accepted at kinks" in str(report)


class BadKinkReLU(jp.ReLU):
    """Derivative 2 exactly at 0: outside [0, 1], not a subgradient (not registered)."""

    def _derivative(self, cache):
        x = cache.x
        return np.where(x > 0, 1.0, np.where(x == 0, 2.0, 0.0)).astype(x.dtype)

    def _vjp(self, cache, g, need_input):
        return (g * self._derivative(cache) if need_input else None), {}


def test_a_wrong_slope_at_a_kink_is_still_caught():
    rng = np.random.default_rng(14)
    net = jp.Sequential(BadKinkReLU(), jp.Dense(3, 2, rng=rng))
    x = np.array([[0.0, 1.0, -1.0], [2.0, 0.0, 0.5]])
    t = rng.standard_normal((2, 2))
    report = jp.gradcheck(net, x, t, jp.MSE())
    assert not report.ok
    assert not report["x"].passed
    assert "BadKinkReLU" in report.culprit
    assert not jp.check_layer(BadKinkReLU(), x)["dy/dx"].passed


@pytest.mark.parametrize("layer_name", [*KINKED, "BadKinkReLU"])
def test_check_layer_of_a_stack_judges_a_whole_sample_at_a_kink_by_the_chain_rule(layer_name):
    # Every pre-activation of sample 0 is exactly at the kink and moves with each of its
    # inputs: the stack's one-sided slopes need not bracket the layer's convention there,
    # the interval chain rule does -- and still rejects a slope outside the one-sided ones.
    cls = BadKinkReLU if layer_name == "BadKinkReLU" else jp.LAYERS[layer_name]
    rng = np.random.default_rng(30)
    first = jp.Dense(4, 6, rng=rng)
    first.params["b"][:] = cls.kinks[0]
    net = jp.Sequential(first, cls.example(6, rng=rng), jp.Dense(6, 3, rng=rng))
    x = rng.standard_normal((3, 4))
    x[0] = 0.0
    for kwargs in ({}, {"fast": True}, {"richardson": True}):
        report = jp.check_layer(net, x, rng=rng, **kwargs)
        if cls is BadKinkReLU:
            assert {e.name for e in report.failures} == {"dy/dx", "dy/d0.b"}, str(report)
        else:
            assert report.ok, str(report)
            assert report.kink_accepted > 0


@pytest.mark.parametrize("layer_name", LAYER_NAMES)
def test_check_layer_passes_on_every_registered_layer(layer_name):
    rng = np.random.default_rng(15)
    cls = jp.LAYERS[layer_name]
    layer, _, x = registered_example(layer_name, 5, 4, rng=rng)
    for kwargs in ({}, {"fast": True}, {"richardson": True}):
        report = jp.check_layer(layer, x, rng=rng, **kwargs)
        assert report.ok, str(report)
    if cls.kinks:
        assert jp.check_layer(layer, x, rng=rng).kink_accepted > 0
    layer32 = cls.example(5, rng=rng, dtype=np.float32)
    assert jp.check_layer(layer32, x.astype(np.float32), rng=rng, **F32).ok


@pytest.mark.parametrize("kwargs", [{}, {"fast": True}, {"richardson": True}])
def test_rmse_at_exactly_zero_error_is_a_kink_not_a_failure(kwargs):
    rng = np.random.default_rng(16)
    net = jp.Sequential(jp.Dense(4, 5, rng=rng), jp.Tanh(), jp.Dense(5, 3, rng=rng))
    x = rng.standard_normal((4, 4))
    t = net(x)
    assert jp.RMSE().value(net(x), t) == 0.0
    report = jp.gradcheck(net, x, t, jp.RMSE(), **kwargs)
    assert report.ok, str(report)
    assert report.kink_accepted > 0
    assert jp.taylor_test(net, x, t, jp.RMSE(), rng=rng).ok


def test_rmse_at_zero_error_in_float32_is_still_at_the_kink():
    # The float64 copy of a float32 network that hits its target exactly is a hair
    # off zero error; the float32 gradient (0, the minimum-norm subgradient) is right.
    rng = np.random.default_rng(29)
    net = jp.Sequential(jp.Dense(4, 5, rng=rng, dtype=np.float32), jp.Softplus(),
                        jp.Dense(5, 2, rng=rng, dtype=np.float32))
    x = rng.standard_normal((4, 4)).astype(np.float32)
    t = net(x)
    for kwargs in ({}, {"fast": True}, {"richardson": True}):
        report = jp.gradcheck(net, x, t, jp.RMSE(), rng=rng, **F32, **kwargs)
        assert report.ok, str(report)
        assert report.kink_accepted > 0
    assert jp.taylor_test(net, x, t, jp.RMSE(), rng=rng).ok


# ---- the report --------------------------------------------------------------------------------
class BadSlopeTanh(jp.Tanh):
    """Derivative 1.5 (1 - y^2) everywhere (not registered)."""

    def _derivative(self, cache):
        return 1.5 * super()._derivative(cache)


def failing_setup(rng):
    net = jp.Sequential(jp.Dense(3, 4, rng=rng), BadSlopeTanh(), jp.Dense(4, 2, rng=rng))
    return net, rng.standard_normal((3, 3)), rng.standard_normal((3, 2)), jp.MSE()


def test_report_names_the_worst_parameter_layer_and_values():
    rng = np.random.default_rng(17)
    net, x, t, loss = failing_setup(rng)
    report = jp.gradcheck(net, x, t, loss)
    assert not report.ok
    assert {e.name for e in report.failures} == {"0.W", "0.b", "x"}
    assert report["2.W"].passed and report["2.b"].passed
    worst = report["0.W"]
    assert (worst.layer_index, worst.layer_type) == ("0", "Dense")
    _, grads = net.value_and_grad(x, t, loss)
    assert worst.analytic == pytest.approx(grads["0.W"][worst.worst_index], rel=1e-12)
    # the analytic value is 1.5 times off somewhere upstream: the two disagree clearly
    assert abs(worst.analytic - worst.numeric) > 1e-3 * abs(worst.numeric)
    text = str(report)
    row = next(line for line in text.splitlines() if line.strip().startswith("0.W"))
    assert "FAIL" in row and "0 Dense" in row and str(worst.worst_index) in row
    assert f"{worst.analytic:+.8e}" in row and f"{worst.numeric:+.8e}" in row
    assert "layer 1 (BadSlopeTanh)" in report.culprit and report.culprit in text
    assert f"{report.evaluations:,} evaluations" in text


def test_raise_on_fail_raises_the_table():
    rng = np.random.default_rng(18)
    net, x, t, loss = failing_setup(rng)
    report = jp.gradcheck(net, x, t, loss, rng=np.random.default_rng(0))
    with pytest.raises(jp.GradcheckError) as info:
        jp.gradcheck(net, x, t, loss, raise_on_fail=True, rng=np.random.default_rng(0))
    assert isinstance(info.value, AssertionError)
    assert str(info.value) == str(report)
    with pytest.raises(jp.GradcheckError, match="BadSlopeTanh"):
        jp.check_layer(BadSlopeTanh(), x, raise_on_fail=True)
    with pytest.raises(jp.GradcheckError, match="BadSlopeTanh"):
        jp.taylor_test(net, x, t, loss, raise_on_fail=True)


def test_evaluation_counts():
    rng = np.random.default_rng(19)
    net = jp.Sequential(jp.Dense(3, 4, rng=rng), jp.Tanh(), jp.Dense(4, 2, rng=rng))
    x, t = rng.standard_normal((6, 3)), rng.standard_normal((6, 2))
    parameters = sum(p.size for p in net.params.values())
    assert jp.gradcheck(net, x, t, jp.MSE()).evaluations == 2 * parameters + 2 * 3 + 1
    assert jp.gradcheck(net, x, t, jp.MSE(), richardson=True).evaluations == (
        4 * parameters + 4 * 3 + 1)
    entries = len(net.params) + 1
    assert jp.gradcheck(net, x, t, jp.MSE(), fast=True).evaluations == entries * 2 * 2 + 1


class CountingTanh(jp.Tanh):
    """Counts forward passes (class-wide, so the checker's copies count too)."""

    calls = 0

    def forward(self, x):
        CountingTanh.calls += 1
        return super().forward(x)


def test_the_full_check_runs_perturbations_as_batched_rows():
    rng = np.random.default_rng(20)
    net = jp.Sequential(jp.Dense(6, 8, rng=rng), CountingTanh(), jp.Dense(8, 3, rng=rng))
    x, t = rng.standard_normal((5, 6)), rng.standard_normal((5, 3))
    CountingTanh.calls = 0
    report = jp.gradcheck(net, x, t, jp.MSE())
    assert report.ok
    # 56 coordinates of layer 0 and 6 of x, +-: one batched pass per entry and sign
    # (plus the forward passes of the analytic gradient and the float64 copy).
    assert report.evaluations == 2 * (56 + 27 + 6) + 1
    assert CountingTanh.calls <= 2 * 3 + 2


def test_richardson_tightens_the_tolerance_and_the_error():
    rng = np.random.default_rng(21)
    net = stack_with("Tanh", rng=rng)
    x, t = rng.standard_normal((4, 4)), rng.standard_normal((4, 3))
    plain = jp.gradcheck(net, x, t, jp.MSE())
    extrapolated = jp.gradcheck(net, x, t, jp.MSE(), richardson=True)
    assert extrapolated.rtol == default_rtol(True) < plain.rtol == default_rtol(False)
    assert extrapolated.ok and plain.ok
    # The h^2 term cancelled: every entry's error falls by more than an order of magnitude.
    for one, other in zip(plain.entries, extrapolated.entries, strict=True):
        assert other.max_abs_error < one.max_abs_error / 10, (one.name, one, other)


# ---- parameters are never touched ------------------------------------------------------------
def test_parameters_are_unchanged_after_a_failing_check():
    rng = np.random.default_rng(22)
    net, x, t, loss = failing_setup(rng)
    saved = snapshot(net)
    for kwargs in ({}, {"fast": True}, {"richardson": True}):
        assert not jp.gradcheck(net, x, t, loss, **kwargs).ok
        assert_unchanged(net, saved)
    assert not jp.taylor_test(net, x, t, loss).ok
    assert_unchanged(net, saved)


class ExplodingDense(jp.Dense):
    """Raises on its `after`-th forward pass (not registered).

    Overriding `_forward` also takes it off the Dense shortcut, so the checker
    perturbs its (copied) weights coordinate by coordinate.
    """

    def __init__(self, *args, after, **kwargs):
        super().__init__(*args, **kwargs)
        self.after = after
        self.calls = 0

    def _forward(self, x):
        self.calls += 1
        if self.calls >= self.after:
            raise RuntimeError("boom")
        return super()._forward(x)


@pytest.mark.parametrize("after", [3, 5, 12])
def test_parameters_are_unchanged_after_an_exception_mid_check(after):
    rng = np.random.default_rng(23)
    net = jp.Sequential(ExplodingDense(3, 4, rng=rng, after=after), jp.Dense(4, 2, rng=rng))
    saved = snapshot(net)
    with pytest.raises(RuntimeError, match="boom"):
        jp.gradcheck(net, rng.standard_normal((3, 3)), rng.standard_normal((3, 2)), jp.MSE())
    assert_unchanged(net, saved)


class PlainDense(jp.Dense):
    """Dense with its own `_forward` (same maths): checked by the generic per-coordinate path."""

    def _forward(self, x):
        return super()._forward(x)


def test_the_generic_per_coordinate_path_agrees_with_the_dense_shortcut():
    rng = np.random.default_rng(28)
    fast_path = jp.Sequential(jp.Dense(3, 4, rng=rng), jp.Tanh(), jp.Dense(4, 2, rng=rng))
    generic = jp.Sequential(PlainDense(3, 4), jp.Tanh(), PlainDense(4, 2))
    for key, value in fast_path.params.items():
        generic.params[key][...] = value
    x, t = rng.standard_normal((5, 3)), rng.standard_normal((5, 2))
    one, other = jp.gradcheck(fast_path, x, t, jp.MSE()), jp.gradcheck(generic, x, t, jp.MSE())
    assert one.ok and other.ok
    # Both match the same analytic gradient to 1e-9, so they match each other.
    for a, b in zip(one.entries, other.entries, strict=True):
        assert a.name == b.name
        assert a.max_abs_error < 1e-9 and b.max_abs_error < 1e-9


# ---- fast mode and the Taylor test ------------------------------------------------------------
def test_fast_mode_costs_a_handful_of_evaluations_whatever_the_size():
    rng = np.random.default_rng(24)
    net = jp.Sequential(jp.Dense(30, 40, rng=rng), jp.Tanh(), jp.Dense(40, 10, rng=rng))
    x, t = rng.standard_normal((4, 30)), rng.integers(0, 10, 4)
    report = jp.gradcheck(net, x, t, jp.SoftmaxCrossEntropy(), fast=True, rng=rng)
    assert report.ok, str(report)
    assert report.evaluations == 5 * 4 + 1
    assert report["0.W"].size == 1200


def test_taylor_order_is_two_when_right_and_one_when_wrong():
    rng = np.random.default_rng(25)
    net = stack_with("Sigmoid", rng=rng)
    x, t = rng.standard_normal((4, 4)), rng.standard_normal((4, 3))
    right = jp.taylor_test(net, x, t, jp.MSE(), rng=rng)
    assert right.ok and right.conclusive
    assert abs(right.order - 2) < 0.2
    assert right.used.sum() >= 3
    wrong_net, x, t, loss = failing_setup(rng)
    wrong = jp.taylor_test(wrong_net, x, t, loss, rng=rng)
    assert not wrong.ok
    assert abs(wrong.order - 1) < 0.2
    assert "observed order" in str(wrong) and "BadSlopeTanh" in str(wrong)


def test_taylor_tries_every_entry_and_catches_a_bug_hidden_in_small_gradients():
    rng = np.random.default_rng(31)
    net, x, t, loss = failing_setup(rng)
    # Shrink the last layer: the wrong Tanh slope now lives in gradients 1e4 times
    # smaller than the last layer's own.
    net[2].params["W"][...] *= 1e-4
    t = t + 3
    result = jp.taylor_test(net, x, t, loss, rng=rng)
    assert set(result.orders) == {"all", *net.params, "x"}
    assert not result.ok
    assert result.direction in {"0.W", "0.b", "x", "all"}
    report = jp.gradcheck(net, x, t, loss)
    assert {e.name for e in report.failures} == {"0.W", "0.b", "x"}


def test_taylor_along_a_given_direction():
    rng = np.random.default_rng(26)
    net, x, t, loss = failing_setup(rng)
    # Moving only the last layer's bias never passes through the wrong Tanh slope.
    only_bias = {"2.b": rng.standard_normal(2)}
    assert jp.taylor_test(net, x, t, loss, direction=only_bias).ok
    upstream = {"0.b": rng.standard_normal(4)}
    assert not jp.taylor_test(net, x, t, loss, direction=upstream).ok
    with pytest.raises(KeyError, match="unknown key"):
        jp.taylor_test(net, x, t, loss, direction={"9.W": np.ones(2)})
    with pytest.raises(jp.ShapeError, match=r"direction\['2.b'\]"):
        jp.taylor_test(net, x, t, loss, direction={"2.b": np.ones(3)})


# ---- argument errors ------------------------------------------------------------
def test_argument_errors():
    rng = np.random.default_rng(27)
    net = jp.Sequential(jp.Dense(3, 2, rng=rng))
    x, t = rng.standard_normal((2, 3)), rng.standard_normal((2, 2))
    with pytest.raises(TypeError, match="gradcheck: `net` must be a jacobprop Layer"):
        jp.gradcheck(lambda z: z, x, t, jp.MSE())
    with pytest.raises(TypeError, match="gradcheck: `loss` must be a jacobprop Loss"):
        jp.gradcheck(net, x, t, lambda y, t: 0.0)
    with pytest.raises(jp.ShapeError, match=r"\(B, 3\)"):
        jp.gradcheck(net, rng.standard_normal((2, 4)), t, jp.MSE())
    with pytest.raises(jp.ShapeError, match="target"):
        jp.gradcheck(net, x, rng.standard_normal((2, 5)), jp.MSE())
    with pytest.raises(ValueError, match="`rtol` must be finite and >= 0"):
        jp.gradcheck(net, x, t, jp.MSE(), rtol=-1.0)
    with pytest.raises(ValueError, match="`atol` must be finite and >= 0"):
        jp.gradcheck(net, x, t, jp.MSE(), atol=float("nan"))
    with pytest.raises(TypeError, match="`rtol` must be a real number"):
        jp.gradcheck(net, x, t, jp.MSE(), rtol="tight")
    with pytest.raises(TypeError, match="`rng` must be a numpy.random.Generator"):
        jp.gradcheck(net, x, t, jp.MSE(), rng=0)
    with pytest.raises(ValueError, match="`mode` must be"):
        jp.gradcheck(net, x, t, jp.MSE(), mode="adjoint")
    with pytest.raises(TypeError, match="check_layer: `layer` must be a jacobprop Layer"):
        jp.check_layer(np.tanh, x)
    with pytest.raises(TypeError, match="taylor_test: `loss` must be a jacobprop Loss"):
        jp.taylor_test(net, x, t, "mse")


class LongBiasGradDense(jp.Dense):
    """dL/db with one entry too many (not registered): it must not reach a comparison."""

    def _vjp(self, cache, g, need_input):
        gx, grads = super()._vjp(cache, g, need_input)
        grads["b"] = np.append(grads["b"], 0.0)
        return gx, grads


def test_a_gradient_of_the_wrong_shape_is_a_shape_error_naming_the_key():
    rng = np.random.default_rng(32)
    layer = LongBiasGradDense(3, 2, rng=rng)
    x, t = rng.standard_normal((4, 3)), rng.standard_normal((4, 2))
    with pytest.raises(jp.ShapeError, match=r"check_layer: LongBiasGradDense.vjp .*\(3,\) "
                                             r"for `b`, whose parameter has shape \(2,\)"):
        jp.check_layer(layer, x)
    with pytest.raises(jp.ShapeError, match=r"gradcheck: the vjp backward .*`0.b`"):
        jp.gradcheck(jp.Sequential(layer), x, t, jp.MSE())


def test_default_tolerances_follow_the_step():
    eps = np.finfo(np.float64).eps
    assert CENTRAL_STEP == pytest.approx(eps ** (1 / 3))
    assert default_rtol(False) == pytest.approx(1e5 * eps ** (2 / 3))
    assert default_rtol(True) == pytest.approx(1e5 * eps ** (4 / 5))


def test_max_pool_ties_are_kinks_and_wrong_routes_are_still_caught():
    """A tie in a window is a kink in the difference of two inputs: any slope between the
    one-sided ones is right there, for every checker; a MaxPool routing its derivative to
    the wrong entry of an untied window is caught at the same tied inputs."""
    from mutants import LastEntryMaxPool, NeighbourMaxPool

    from jacobprop.testing import assert_layer_correct

    rng = np.random.default_rng(40)
    x = rng.standard_normal((3, 16))
    x[0] = 0.0  # every window of sample 0 tied four ways
    x[1, ::2] = 0.5  # pairs tied in sample 1, beside untied entries
    pool = jp.MaxPool2D(2, input_shape=(2, 2, 4))
    for kwargs in ({}, {"fast": True}, {"richardson": True}):
        report = jp.check_layer(pool, x, rng=rng, **kwargs)
        assert report.ok and report.kink_accepted > 0, str(report)
    assert_layer_correct(pool, x, rng=rng)
    dense = jp.Dense(3, 16, rng=rng)
    dense.params["b"][:] = 0.0
    net = jp.Sequential(dense, pool, jp.Tanh(), jp.Dense(4, 2, rng=rng))
    x_net, t = rng.standard_normal((4, 3)), rng.standard_normal((4, 2))
    x_net[0] = 0.0  # the whole first sample's windows tied, moved by every input
    for kwargs in ({}, {"fast": True}, {"mode": "jacobian"}):
        report = jp.gradcheck(net, x_net, t, jp.MSE(), rng=rng, **kwargs)
        assert report.ok, str(report)
    assert report.kink_accepted > 0
    assert jp.taylor_test(net, x_net, t, jp.MSE(), rng=rng).ok
    for mutant in (LastEntryMaxPool, NeighbourMaxPool):
        wrong = mutant(2, input_shape=(2, 2, 4))
        report = jp.check_layer(wrong, x, rng=rng)
        assert {entry.name for entry in report.failures} == {"dy/dx"}, str(report)
        net_wrong = jp.Sequential(dense, wrong, jp.Tanh(), jp.Dense(4, 2, rng=rng))
        report = jp.gradcheck(net_wrong, x_net, t, jp.MSE(), rng=rng)
        assert not report.ok and f"layer 1 ({mutant.__name__})" in report.culprit


class OnePercentVjpBatchNorm(jp.BatchNorm):
    """Train-mode BatchNorm whose vjp's dL/dx is 1% too large (its Jacobian is right)."""

    def _vjp(self, cache, g, need_input):
        gx, grads = super()._vjp(cache, g, need_input)
        return (None if gx is None else 1.01 * gx), grads


@pytest.mark.parametrize("mode", ["vjp", "jacobian"])
def test_every_checker_works_through_a_train_mode_batchnorm(mode):
    """The explicit mode's dL/dx through a coupled operator is the summed vjp of the
    covector (B, 1, B, n), not its first row; check_layer sums a coupled chain's dy/dp
    over the second batch axis; the culprit is found among coupled layers too."""
    from mutants import PerSampleBatchNorm

    rng = np.random.default_rng(41)
    net = jp.Sequential(jp.Dense(3, 4, rng=rng), jp.BatchNorm(4), jp.Tanh(),
                        jp.Dense(4, 2, rng=rng))
    net[1].params["gamma"][:] = rng.uniform(0.5, 1.5, 4)
    x, t = rng.standard_normal((5, 3)), rng.standard_normal((5, 2))
    for kwargs in ({}, {"fast": True}):
        report = jp.gradcheck(net, x, t, jp.MSE(), rng=rng, mode=mode, **kwargs)
        assert report.ok and report["x"].size == x.size, str(report)
    report = jp.check_layer(net, x, rng=rng)
    assert report.ok and "samples coupled" in report.title, str(report)
    assert jp.taylor_test(net, x, t, jp.MSE(), rng=rng).ok
    for wrong, caught in ((PerSampleBatchNorm(4), True), (OnePercentVjpBatchNorm(4),
                                                          mode == "vjp")):
        bad = jp.Sequential(net[0], wrong, net[2], net[3])
        report = jp.gradcheck(bad, x, t, jp.MSE(), rng=rng, mode=mode)
        assert report.ok is not caught, str(report)
        if caught:
            assert f"layer 1 ({type(wrong).__name__})" in report.culprit


def affine_layers(rng):
    return [jp.Dense(4, 3, rng=rng),
            jp.Conv2D(2, 3, (2, 3), input_shape=(2, 3, 4), padding=1, stride=(1, 2), rng=rng),
            jp.Conv2D(1, 2, 3, input_shape=(1, 4, 4), bias=False, rng=rng)]


@pytest.mark.parametrize("which", range(3))
def test_the_affine_parameter_hook_is_exactly_the_forward(which):
    """`_affine_param_change` (one column per entry for Dense, every position of one output
    channel for Conv2D) says exactly what the forward pass does when one entry moves."""
    from jacobprop.checks.differences import affine_change_columns

    rng = np.random.default_rng(50 + which)
    layer = affine_layers(rng)[which]
    x = rng.standard_normal((3, layer.input_dim))
    y = layer(x)
    for name, value in layer.params.items():
        coords = np.arange(value.size)
        steps = rng.uniform(0.5, 2.0, value.size)
        rows, delta = affine_change_columns(layer._affine_param_change(x, name, coords, steps),
                                            value.size, x.shape[0])
        assert rows.shape[0] == value.size and delta.shape == (value.size, 3, rows.shape[1])
        for g, coord in enumerate(coords):
            moved = copy.deepcopy(layer)
            moved.params[name].reshape(-1)[coord] += steps[g]
            expected = moved(x) - y
            got = np.zeros_like(y)
            got[:, rows[g]] = delta[g]
            np.testing.assert_allclose(got, expected, atol=1e-12)

    class OwnForward(type(layer)):
        def forward(self, x):
            return super().forward(x)

    own = copy.deepcopy(layer)
    own.__class__ = OwnForward
    assert own._affine_param_change(x, "W", np.arange(2), np.ones(2)) is None


def test_gradcheck_of_a_small_cnn_uses_the_conv_shortcut_and_catches_its_bugs():
    """Through the Conv2D hook (Conv2D -> ReLU -> Conv2D -> Tanh -> MaxPool -> Dense) the
    full gradcheck passes, and a wrong dL/dW of either convolution is caught and named."""
    from mutants import WrongWeightGradConv

    rng = np.random.default_rng(52)

    def cnn(conv):
        return jp.Sequential(conv(1, 2, 3, padding=1, input_shape=(1, 4, 4), rng=rng),
                             jp.ReLU(), jp.Conv2D(2, 3, 3, padding=1, rng=rng), jp.Tanh(),
                             jp.MaxPool2D(2), jp.Flatten(), jp.Dense(12, 2, rng=rng))

    x, t = rng.standard_normal((3, 16)), rng.standard_normal((3, 2))
    assert jp.gradcheck(cnn(jp.Conv2D), x, t, jp.MSE(), rng=rng).ok
    report = jp.gradcheck(cnn(WrongWeightGradConv), x, t, jp.MSE(), rng=rng)
    assert not report.ok and not report["0.W"].passed and report["2.W"].passed
    assert "layer 0 (WrongWeightGradConv)" in report.culprit


# ---- no false alarms: wide magnitudes, exact kinks, saturation (issue 7) -------------------
REGRESSION_SETS = ("logits N(0, 6^2)", "logits N(0, 30^2)", "exact kinks", "saturated")


def regression_cases() -> int:
    """Cases per (layer, set): 2 per hypothesis example (80 in the CI profile, 24 in dev),
    so 2,560 drawn cases over the 8 layers and 4 sets in CI."""
    from hypothesis import settings

    return 2 * settings().max_examples


def regression_input(layer_name: str, kind: str, seed: int):
    """A registered layer's example and an input drawn from `kind`, shapes drawn too."""
    rng = np.random.default_rng(seed)
    cls = jp.LAYERS[layer_name]
    width, batch = int(rng.integers(1, 6)), int(rng.integers(1, 5))
    layer = checkable(cls.example(width, rng=rng))
    shape = (batch, layer.input_dim or width)
    if kind == "logits N(0, 6^2)":
        x = rng.normal(0.0, 6.0, shape)
    elif kind == "logits N(0, 30^2)":
        x = rng.normal(0.0, 30.0, shape)
    elif kind == "exact kinks":
        x = rng.standard_normal(shape)
        x[rng.random(shape) < 0.5] = (cls.kinks or (0.0,))[0]
    else:  # far into the flat tails of sigmoid, tanh, softmax, softplus
        x = rng.choice([-1.0, 1.0], shape) * rng.uniform(15.0, 40.0, shape)
    return layer, x, rng


@pytest.mark.parametrize("kind", REGRESSION_SETS)
@pytest.mark.parametrize("layer_name", LAYER_NAMES)
def test_no_checker_cries_wolf_on_a_correct_layer(layer_name, kind):
    """check_layer and assert_layer_correct on every case; gradcheck (full and fast) and
    the Taylor test on every fourth, through `Identity -> layer -> Dense`."""
    from jacobprop.testing import assert_layer_correct

    losses = [jp.MSE(), jp.SoftmaxCrossEntropy(), jp.BinaryCrossEntropy()]
    base = 10_000 * LAYER_NAMES.index(layer_name) + 1_000 * REGRESSION_SETS.index(kind)
    for case in range(regression_cases()):
        layer, x, rng = regression_input(layer_name, kind, base + case)
        report = jp.check_layer(layer, x, rng=rng)
        assert report.ok, f"seed {base + case}\n{report}"
        assert_layer_correct(layer, x, rng=rng)
        if case % 4:
            continue
        loss = losses[(case // 4) % len(losses)]
        net = jp.Sequential(jp.Identity(), layer,
                            jp.Dense(layer.output_dim(x.shape[1]), 2, rng=rng))
        t = loss.example_target((x.shape[0], 2), rng=rng)
        for fast in (False, True):
            report = jp.gradcheck(net, x, t, loss, rng=rng, fast=fast)
            assert report.ok, f"seed {base + case}\n{report}"
        result = jp.taylor_test(net, x, t, loss, rng=rng)
        assert result.ok, f"seed {base + case}\n{result}"


def test_kinks_inside_a_residual_block_are_kinks_too():
    """ReLU inside `Residual(Sequential(Dense, ReLU))` with a whole sample's pre-activations
    exactly at 0: the block's kinks reach the checkers through Residual's hooks (its inner
    pass against a copy at the unperturbed parameters, the interval chain rule through
    the block); a wrong slope there is still caught."""
    rng = np.random.default_rng(53)
    dense = jp.Dense(3, 3, rng=rng)
    dense.params["b"][:] = 0.0
    block = jp.Residual(jp.Sequential(dense, jp.ReLU()))
    x, t = rng.standard_normal((4, 3)), rng.standard_normal((4, 2))
    x[0] = 0.0
    assert block.has_kinks and not jp.Residual(jp.Sequential(jp.Tanh())).has_kinks
    report = jp.check_layer(block, x, rng=rng)
    assert report.ok and report.kink_accepted > 0, str(report)
    net = jp.Sequential(jp.Identity(), block, jp.Dense(3, 2, rng=rng))
    report = jp.gradcheck(net, x, t, jp.MSE(), rng=rng)
    assert report.ok and report.kink_accepted > 0, str(report)
    assert jp.taylor_test(net, x, t, jp.MSE(), rng=rng).ok
    wrong = jp.Residual(jp.Sequential(dense, BadKinkReLU()))
    assert not jp.check_layer(wrong, x, rng=rng).ok
    bad = jp.Sequential(jp.Identity(), wrong, jp.Dense(3, 2, rng=rng))
    assert not jp.gradcheck(bad, x, t, jp.MSE(), rng=rng).ok


class OnePercentGELU(jp.GELU):
    """GELU whose derivative (J, vjp, jvp alike) is 1% too large."""

    def _derivative(self, cache):
        return 1.01 * super()._derivative(cache)


def test_a_derivative_varying_finer_than_the_step_gets_a_second_opinion():
    """GELU's left tail is Gaussian: at x = -33 its derivative changes on a scale 1/|x|,
    while the step grows with |x|, so D(h) alone is off by ~5e-6 relative (issue 7's
    saturated set, CI seed 73029). Richardson from D(h) and D(h/2), with its own error
    estimate, clears it; a 1% error in the same tail is still caught."""
    x = np.array([[-33.0], [-30.5], [-36.0]])
    for fast in (False, True):
        report = jp.check_layer(jp.GELU(), x, rng=np.random.default_rng(0), fast=fast)
        assert report.ok, str(report)
        report = jp.check_layer(OnePercentGELU(), x, rng=np.random.default_rng(0), fast=fast)
        assert [entry.name for entry in report.failures] == ["dy/dx"], str(report)


def test_softmax_with_logits_far_apart_passes_check_layer():
    """Issue 7, defect 1: every entry failed at 1e-11 relative for logits 7 or more apart
    (the structured product rounds relative to |s| |u|, which |g| |J| does not show)."""
    x = np.array([[-13.95, -1.31]])
    for seed in range(20):
        report = jp.check_layer(jp.Softmax(), x, rng=np.random.default_rng(seed))
        assert report.ok, str(report)


# ---- stochastic layers are refused, not failed at random ----------------------------------
class CoinFlip(jp.Layer):
    """Multiplies by a fresh random 0/2 mask in train mode (a test-only dropout)."""

    def __init__(self, *, rng):
        super().__init__()
        self.rng = rng

    @property
    def stochastic(self):
        return self.training

    def _forward(self, x):
        mask = 2.0 * (self.rng.random(x.shape) < 0.5) if self.training else np.ones_like(x)
        return x * mask, CoinCache(x, mask)

    def _jacobian(self, cache):
        return jp.DiagonalJacobian(cache.mask)


class CoinCache(NamedTuple):
    x: np.ndarray
    mask: np.ndarray


def test_every_checker_refuses_a_stochastic_layer_in_train_mode():
    from jacobprop.testing import assert_layer_correct

    rng = np.random.default_rng(9)
    net = jp.Sequential(jp.Dense(3, 4, rng=rng), CoinFlip(rng=rng), jp.Dense(4, 2, rng=rng))
    x, t = rng.standard_normal((5, 3)), rng.standard_normal((5, 2))
    message = r"layer 1 \(CoinFlip\) draws a new random mask on every forward pass; call net.eval"
    with pytest.raises(ValueError, match=message):
        jp.gradcheck(net, x, t, jp.MSE(), rng=rng)
    with pytest.raises(ValueError, match=message):
        jp.taylor_test(net, x, t, jp.MSE(), rng=rng)
    with pytest.raises(ValueError, match="CoinFlip draws a new random mask"):
        jp.check_layer(net[1], rng.standard_normal((5, 4)), rng=rng)
    with pytest.raises(ValueError, match="CoinFlip draws a new random mask"):
        assert_layer_correct(net[1], rng=rng)
    # Any composite names the culprit through `sublayers()`, not only a Sequential.
    with pytest.raises(ValueError, match=r"layer 0 \(CoinFlip\) draws a new random mask"):
        jp.check_layer(jp.Residual(CoinFlip(rng=rng)), rng.standard_normal((5, 4)), rng=rng)
    net.eval()
    assert jp.gradcheck(net, x, t, jp.MSE(), rng=rng).ok
    assert jp.check_layer(net[1], rng.standard_normal((5, 4)), rng=rng).ok


# ---- the layers' shortcut hooks are verified before they are trusted ---------------------------
HOOK_NAMES = {"hook W", "hook b", "hook x"}


def hook_entries(report):
    return {entry.name: entry for entry in report.entries if entry.name.startswith("hook ")}


def test_check_layer_verifies_every_hook_a_layer_provides():
    rng = np.random.default_rng(40)
    x = rng.standard_normal((5, 4))
    report = jp.check_layer(jp.Dense(4, 3, rng=rng), x, rng=rng)
    hooks = hook_entries(report)
    assert report.ok and set(hooks) == HOOK_NAMES, str(report)
    assert {e.check for e in hooks.values()} == {"_affine_param_change vs forward",
                                                 "_affine_input_columns vs forward"}
    # W has 12 entries: 4 sampled; b's 3 entries and x's 4 columns are few: every one.
    assert hooks["hook W"].size == 4 * 5 * 3
    assert hooks["hook b"].size == 3 * 5 * 3 and hooks["hook x"].size == 4 * 5 * 3
    no_bias = jp.check_layer(jp.Dense(4, 3, bias=False, rng=rng), x, rng=rng)
    assert set(hook_entries(no_bias)) == {"hook W", "hook x"}
    # No hooks: a layer without them, and a Dense whose forward is its own.
    assert not hook_entries(jp.check_layer(jp.Tanh(), x, rng=rng))
    assert not hook_entries(jp.check_layer(PlainDense(4, 3, rng=rng), x, rng=rng))
    stack = jp.check_layer(jp.Sequential(jp.Dense(4, 3, rng=rng), jp.Tanh(),
                                         jp.Dense(3, 2, rng=rng)), x, rng=rng)
    assert set(hook_entries(stack)) == {"hook 0.W", "hook 0.b", "hook 0.x", "hook 2.W",
                                        "hook 2.b", "hook 2.x"}
    assert stack.ok and stack["hook 2.W"].layer == "2 Dense"


@pytest.mark.parametrize("case", ["batch 0", "batch 1", "float32", "large", "zeros"])
def test_correct_hooks_pass_at_the_edges(case):
    rng = np.random.default_rng(41 + ["batch 0", "batch 1", "float32", "large",
                                      "zeros"].index(case))
    dtype = np.float32 if case == "float32" else np.float64
    layer = jp.Dense(5, 4, rng=rng, dtype=dtype)
    batch = {"batch 0": 0, "batch 1": 1}.get(case, 6)
    x = rng.standard_normal((batch, 5)).astype(dtype)
    if case == "large":
        x *= 1e6
        layer.params["W"] *= 1e3
        layer.params["b"] += 1e8
    if case == "zeros":
        x[:, ::2] = 0.0
        layer.params["W"][1] = 0.0
    kwargs = F32 if case == "float32" else {}
    report = jp.check_layer(layer, x, rng=rng, **kwargs)
    assert report.ok and set(hook_entries(report)) == HOOK_NAMES, str(report)


def test_a_wrong_parameter_hook_is_reported_and_not_trusted():
    from mutants import ScaledParamHookDense

    rng = np.random.default_rng(46)
    layer = ScaledParamHookDense(4, 6, rng=rng)
    saved = snapshot(layer)
    report = jp.check_layer(layer, rng.standard_normal((5, 4)), rng=rng)
    assert_unchanged(layer, saved)
    # Only the hook fails: the Jacobian's differences went through the forward pass.
    assert {e.name for e in report.failures} == {"hook W"}, str(report)
    entry = report["hook W"]
    assert entry.layer == "ScaledParamHookDense" and len(entry.worst_index) == 4
    assert entry.worst_index[0] < 6 and entry.worst_index[1] < 4  # (j, k) in W's shape
    assert entry.analytic == pytest.approx(1.5 * entry.numeric, rel=1e-6)
    text = str(report)
    assert "hook W" in text and "_affine_param_change vs forward" in text and "FAIL" in text

    net = jp.Sequential(layer, jp.Tanh(), jp.Dense(6, 2, rng=rng))
    saved = snapshot(net)
    x, t = rng.standard_normal((5, 4)), rng.standard_normal((5, 2))
    for kwargs in ({}, {"richardson": True}, {"mode": "jacobian"}):
        report = jp.gradcheck(net, x, t, jp.MSE(), rng=rng, **kwargs)
        assert {e.name for e in report.failures} == {"hook 0.W"}, str(report)
        assert "layer 0 (ScaledParamHookDense): hook W" in report.culprit
        assert_unchanged(net, saved)
    # Fast mode differences along directions through forward passes: no hook used, none
    # checked, and the gradients are right.
    fast = jp.gradcheck(net, x, t, jp.MSE(), rng=rng, fast=True)
    assert fast.ok and not hook_entries(fast), str(fast)
    assert_unchanged(net, saved)


def test_gradcheck_reports_only_hooks_it_uses_and_only_when_they_fail():
    from mutants import ShiftedInputColumnsDense

    rng = np.random.default_rng(53)
    # As the first layer, a wrong input hook is never consulted: the numbers are right.
    net = jp.Sequential(ShiftedInputColumnsDense(3, 4, rng=rng), jp.Tanh(),
                        jp.Dense(4, 2, rng=rng))
    x, t = rng.standard_normal((4, 3)), rng.standard_normal((4, 2))
    report = jp.gradcheck(net, x, t, jp.MSE(), rng=rng)
    assert report.ok and [e.name for e in report.entries] == [*net.params, "x"], str(report)


def test_a_wrong_input_hook_deep_in_a_network_is_reported_and_not_trusted():
    """After Dense -> Tanh the checkers would update layer 2's output by its input hook."""
    from mutants import ShiftedInputColumnsDense

    rng = np.random.default_rng(47)
    net = jp.Sequential(jp.Dense(3, 5, rng=rng), jp.Tanh(),
                        ShiftedInputColumnsDense(5, 4, rng=rng), jp.Dense(4, 2, rng=rng))
    x, t = rng.standard_normal((4, 3)), rng.standard_normal((4, 2))
    report = jp.gradcheck(net, x, t, jp.MSE(), rng=rng)
    assert {e.name for e in report.failures} == {"hook 2.x"}, str(report)
    assert report["0.W"].passed and report["0.b"].passed
    assert report["hook 2.x"].worst_index[0] < 5  # an input column of layer 2
    assert "layer 2 (ShiftedInputColumnsDense): hook x" in report.culprit
    layer = jp.check_layer(net, x, rng=rng)
    assert {e.name for e in layer.failures} == {"hook 2.x"}, str(layer)


class OneWrongBiasEntryDense(jp.Dense):
    """The bias hook is wrong for entry 2 only: few entries, so every one is checked."""

    def _affine_param_change(self, x, name, coords, steps):
        rows, delta = super()._affine_param_change(x, name, coords, steps)
        if name == "b":
            delta = np.where((coords == 2)[:, None], 2.0 * delta, delta)
        return rows, delta


@pytest.mark.parametrize("seed", [48, 49, 50])
def test_a_small_parameter_has_every_coordinate_verified(seed):
    rng = np.random.default_rng(seed)
    report = jp.check_layer(OneWrongBiasEntryDense(3, 4, rng=rng), rng.standard_normal((2, 3)),
                            rng=rng)
    assert {e.name for e in report.failures} == {"hook b"}
    assert report["hook b"].worst_index[0] == 2


class MisshapenHookDense(jp.Dense):
    def _affine_input_columns(self, cols):
        return self.params["W"][:, cols]  # (m, G): not transposed


def test_a_hook_of_the_wrong_shape_is_a_shape_error_naming_layer_and_hook():
    rng = np.random.default_rng(51)
    with pytest.raises(jp.ShapeError, match=r"MisshapenHookDense\._affine_input_columns"):
        jp.check_layer(MisshapenHookDense(3, 5, rng=rng), rng.standard_normal((2, 3)), rng=rng)


def test_verifying_the_hooks_draws_nothing_from_the_callers_rng():
    """The hooks' coordinates come from a spawned child, so the other draws stay put."""
    from jacobprop.checks.differences import _Evaluator, _flatten
    from jacobprop.checks.hooks import _verify_hooks

    rng = np.random.default_rng(52)
    layer = jp.Dense(9, 7, rng=rng)
    ev = _Evaluator(_flatten(layer, ""), rng.standard_normal((3, 9)))
    state = rng.bit_generator.state
    entries, passes = _verify_hooks(ev, default_rtol(), None, rng)
    assert rng.bit_generator.state == state
    assert [e.name for e in entries] == ["hook W", "hook b", "hook x"]
    assert passes == 4 + 4 + 4 and not ev.untrusted


@given(seed=st.integers(0, 2**32 - 1), n=st.integers(1, 9), m=st.integers(1, 9),
       batch=st.integers(1, 5), x_power=st.integers(-6, 8), w_power=st.integers(-4, 4))
def test_correct_hooks_never_fail_whatever_the_shapes_and_magnitudes(seed, n, m, batch,
                                                                      x_power, w_power):
    rng = np.random.default_rng(seed)
    layer = jp.Dense(n, m, rng=rng)
    layer.params["W"] *= 10.0 ** w_power
    layer.params["b"] *= 10.0 ** (w_power + x_power)
    x = rng.standard_normal((batch, n)) * 10.0 ** x_power
    report = jp.check_layer(layer, x, rng=rng)
    assert all(e.passed for e in hook_entries(report).values()), str(report)
