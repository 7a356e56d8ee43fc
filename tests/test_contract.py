"""The layer contract for every registered layer, with no per-layer code.

`pytest.mark.parametrize` reads `jacobprop.LAYERS` at collection time, so a
newly registered layer class is checked here the moment it exists.
"""

from typing import NamedTuple

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import jacobprop as jp
from jacobprop.jacobian import DiagonalJacobian
from jacobprop.testing import assert_layer_correct, checkable, inputs, layers, per_sample


@pytest.mark.parametrize("name", sorted(jp.LAYERS))
@given(data=st.data(), width=st.integers(1, 5))
def test_layer_contract(name, data, width):
    # coupled=True: a train-mode BatchNorm stays coupled, and the kit checks the coupling.
    layer = data.draw(layers(input_dim=width, names=[name], coupled=True), label="layer")
    x = data.draw(inputs(layer, input_dim=width), label="x")
    assert_layer_correct(layer, x, rng=np.random.default_rng(0))


def refused_by_every_checker(layer, x, rng):
    """Every checker refuses a stochastic layer with the fix in the message."""
    message = "draws a new random mask"
    with pytest.raises(ValueError, match=message):
        jp.check_layer(layer, x, rng=rng)
    with pytest.raises(ValueError, match=message):
        assert_layer_correct(layer, x, rng=rng)
    width = layer.output_dim(x.shape[1])
    net = jp.Sequential(jp.Identity(), layer, jp.Dense(width, 2, rng=rng))
    t = rng.standard_normal((x.shape[0], 2))
    with pytest.raises(ValueError, match=message + ".*call net.eval"):
        jp.gradcheck(net, x, t, jp.MSE(), rng=rng)
    with pytest.raises(ValueError, match=message + ".*call net.eval"):
        jp.taylor_test(net, x, t, jp.MSE(), rng=rng)


@pytest.mark.parametrize("mode", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("name", sorted(jp.LAYERS))
def test_every_registered_layer_is_checked_in_both_modes(name, mode):
    """Whatever mode `example` builds, each mode is covered: a stochastic one is refused by
    every checker and checked after `checkable`; a coupling one is checked as coupled."""
    rng = np.random.default_rng(100 * sorted(jp.LAYERS).index(name) + mode)
    layer = jp.LAYERS[name].example(4, rng=rng)
    jp.Sequential(layer).train(mode)  # reaches inside composites through sublayers()
    x = rng.standard_normal((3, layer.input_dim or 4))
    if layer.stochastic:
        refused_by_every_checker(layer, x, rng)
        checkable(layer)
        assert not layer.stochastic and not layer.training
    if layer.couples_samples:
        assert "samples coupled" in jp.check_layer(layer, x, rng=rng).title
    assert_layer_correct(layer, rng=rng, input_dim=None if layer.input_dim else 4)


def test_train_mode_dropout_maths_with_its_mask_held_fixed():
    """The train-mode derivatives are those of `x -> x * mask` for the forward's own mask
    (the cache): checked against finite differences of that function and by dot tests."""
    rng = np.random.default_rng(12)
    layer = jp.Dropout(0.4, rng=np.random.default_rng(13))
    x = rng.standard_normal((5, 6))
    y, cache = layer.forward(x)
    assert set(np.unique(cache.mask)) <= {0.0, 1 / 0.6} and 0 < cache.mask.sum() < 30 / 0.6
    np.testing.assert_array_equal(y, x * cache.mask)
    jac = layer.jacobian(cache)
    numeric = jp.numerical_jacobian(lambda z: z * cache.mask, x)
    np.testing.assert_allclose(jac.to_dense(), numeric, atol=1e-9)
    g, v = rng.standard_normal((5, 6)), rng.standard_normal((5, 6))
    np.testing.assert_allclose(layer.vjp(cache, g)[0], np.einsum("bm,bmn->bn", g, numeric),
                               atol=1e-9)
    np.testing.assert_allclose(layer.jvp(cache, v), np.einsum("bmn,bn->bm", numeric, v),
                               atol=1e-9)
    jp.dottest(jac, rng=rng, raise_on_fail=True)


class Twice(jp.Layer):
    """A custom composite: `inner` applied twice (it shows its child through sublayers)."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def sublayers(self):
        return (self.inner,)

    def _forward(self, x):
        y1, c1 = self.inner._call_forward(x)
        y2, c2 = self.inner._call_forward(y1)
        return y2, TwiceCache(x, c1, c2)

    def _jacobian(self, cache):
        return (self.inner._call_jacobian(cache.second)
                @ self.inner._call_jacobian(cache.first))


class TwiceCache(NamedTuple):
    x: np.ndarray
    first: object
    second: object


def test_modes_and_checkable_reach_inside_residual_blocks_and_custom_composites():
    rng = np.random.default_rng(14)
    dropout, norm, deep = jp.Dropout(0.3, rng=rng), jp.BatchNorm(4), jp.Dropout(0.2, rng=rng)
    net = jp.Sequential(jp.Dense(3, 4, rng=rng),
                        jp.Residual(jp.Sequential(jp.Dense(4, 4, rng=rng), dropout, norm)),
                        Twice(deep), jp.Dense(4, 2, rng=rng))
    net.eval()
    assert not (dropout.training or norm.training or deep.training or net.stochastic)
    net.train()
    assert dropout.training and norm.training and deep.training and net.stochastic
    assert net.couples_samples
    # checkable: only the leaves that draw random numbers go to eval mode.
    assert checkable(net) is net
    assert not dropout.training and not deep.training and norm.training
    assert not net.stochastic and net.couples_samples
    x, t = rng.standard_normal((5, 3)), rng.standard_normal((5, 2))
    assert jp.gradcheck(net, x, t, jp.MSE(), rng=rng).ok
    assert per_sample(net) is net and not norm.training and not net.couples_samples


# ---- the extension contract: a public override is obeyed on every path ------------------
# (issue 7, defect 3). Each override is 1% (or 2x) off, so a path that bypasses it
# computes the right value and the assertion that it is wrong fails.
class BadTanh(jp.Tanh):
    def vjp(self, cache, g):
        gx, grads = super().vjp(cache, g)
        return 1.01 * gx, grads


class DoubledTanh(jp.Tanh):
    def forward(self, x):
        y, cache = super().forward(x)
        return 2.0 * y, cache


class JvpTanh(jp.Tanh):
    def jvp(self, cache, v):
        return 1.01 * super().jvp(cache, v)


class JacobianTanh(jp.Tanh):
    def jacobian(self, x_or_cache):
        return 1.01 * super().jacobian(x_or_cache)


class ParamJacobiansDense(jp.Dense):
    def param_jacobians(self, x_or_cache):
        jacobians = dict(super().param_jacobians(x_or_cache))
        jacobians["W"] = 1.01 * jacobians["W"]
        return jacobians


def problem(middle, seed):
    rng = np.random.default_rng(seed)
    net = jp.Sequential(jp.Dense(3, 4, rng=rng), middle, jp.Dense(4, 2, rng=rng))
    plain = jp.Sequential(*[jp.Tanh() if isinstance(layer, jp.Tanh) else layer
                            for layer in net.layers])
    return net, plain, rng.standard_normal((5, 3)), rng.standard_normal((5, 2)), rng


def test_dispatch_is_resolved_once_per_class():
    assert jp.Tanh._call_vjp is jp.Tanh._vjp
    assert jp.Dense._call_param_jacobians is jp.Dense._param_jacobians
    assert BadTanh._call_vjp is jp.Layer._public_vjp
    assert BadTanh._call_jvp is jp.Tanh._jvp
    assert DoubledTanh._call_forward is jp.Layer._public_forward


def test_public_vjp_override_is_obeyed_and_gradcheck_catches_it():
    net, plain, x, t, rng = problem(BadTanh(), 0)
    loss = jp.MSE()
    _, grads = net.value_and_grad(x, t, loss)
    _, right = plain.value_and_grad(x, t, loss)
    np.testing.assert_allclose(grads["0.W"], 1.01 * right["0.W"], rtol=1e-12)
    np.testing.assert_allclose(grads["2.W"], right["2.W"], rtol=1e-12)
    report = jp.gradcheck(net, x, t, loss, rng=rng)
    assert not report.ok and not report["0.W"].passed
    assert "layer 1 (BadTanh)" in report.culprit
    assert jp.gradcheck(net, x, t, loss, rng=rng, mode="jacobian").ok  # never calls vjp
    assert not jp.taylor_test(net, x, t, loss, rng=rng).ok
    failing = {entry.name for entry in jp.check_layer(BadTanh(), x, rng=rng).failures}
    assert failing == {"vjp dx", "dot test"}
    with pytest.raises(jp.GradcheckError, match="'vjp vs jacobian' failed"):
        assert_layer_correct(BadTanh(), rng=rng)


def test_public_forward_override_is_obeyed_everywhere():
    net, plain, x, t, rng = problem(DoubledTanh(), 1)
    np.testing.assert_allclose(net(x), net[2](2.0 * np.tanh(net[0](x))), rtol=1e-12)
    np.testing.assert_allclose(jp.Sequential(DoubledTanh())(x), 2.0 * np.tanh(x))
    loss = jp.MSE()
    value, _ = net.value_and_grad(x, t, loss)
    assert value == pytest.approx(loss.value(net(x), t), rel=1e-14)
    report = jp.gradcheck(net, x, t, loss, rng=rng)
    assert not report.ok and "layer 1 (DoubledTanh)" in report.culprit
    failing = {entry.name for entry in jp.check_layer(DoubledTanh(), x, rng=rng).failures}
    assert failing == {"dy/dx"}


def test_public_jvp_override_is_obeyed():
    net, plain, x, t, rng = problem(JvpTanh(), 2)
    _, cache = net.forward(x)
    v = rng.standard_normal(x.shape)
    jvp = net.jvp(cache, v)
    _, plain_cache = plain.forward(x)
    assert not np.allclose(jvp, plain.jvp(plain_cache, v), rtol=1e-6)
    failing = {entry.name for entry in jp.check_layer(JvpTanh(), x, rng=rng).failures}
    assert failing == {"jvp", "dot test"}
    with pytest.raises(jp.GradcheckError, match="'jvp vs jacobian' failed"):
        assert_layer_correct(JvpTanh(), rng=rng)


def test_public_jacobian_override_is_obeyed_by_the_jacobian_paths():
    net, plain, x, t, rng = problem(JacobianTanh(), 3)
    np.testing.assert_allclose(net[1].jacobian(x).to_dense(),
                               1.01 * jp.Tanh().jacobian(x).to_dense(), rtol=1e-12)
    assert not np.allclose(net.jacobian(x).to_dense(), plain.jacobian(x).to_dense(),
                           rtol=1e-6)
    loss = jp.MSE()
    _, by_jacobian = net.value_and_grad(x, t, loss, mode="jacobian")
    _, right = plain.value_and_grad(x, t, loss)
    assert not np.allclose(by_jacobian["0.W"], right["0.W"], rtol=1e-6)
    assert jp.gradcheck(net, x, t, loss, rng=rng).ok  # the vjp backward is right
    report = jp.gradcheck(net, x, t, loss, rng=rng, mode="jacobian")
    assert not report.ok and "layer 1 (JacobianTanh)" in report.culprit


def test_public_param_jacobians_override_is_obeyed():
    rng = np.random.default_rng(4)
    net = jp.Sequential(ParamJacobiansDense(3, 4, rng=rng), jp.Tanh(), jp.Dense(4, 2, rng=rng))
    x, t = rng.standard_normal((5, 3)), rng.standard_normal((5, 2))
    loss = jp.MSE()
    _, by_vjp = net.value_and_grad(x, t, loss)
    _, by_jacobian = net.value_and_grad(x, t, loss, mode="jacobian")
    np.testing.assert_allclose(by_jacobian["0.W"], 1.01 * by_vjp["0.W"], rtol=1e-12)
    plain = jp.Dense(3, 4)
    plain.params.update(net[0].params)
    plain_net = jp.Sequential(plain, net[1], net[2])
    np.testing.assert_allclose(net.param_jacobians(x)["0.W"].to_dense(),
                               1.01 * plain_net.param_jacobians(x)["0.W"].to_dense(),
                               rtol=1e-12)
    np.testing.assert_allclose(net[0].param_jacobians(x)["W"].to_dense(),
                               1.01 * plain.param_jacobians(x)["W"].to_dense(), rtol=1e-12)
    assert not jp.gradcheck(net, x, t, loss, rng=rng, mode="jacobian").ok
    failing = {e.name for e in jp.check_layer(net[0], x, rng=rng).failures}
    assert failing == {"dy/dW", "vjp dW"}


class ScaledVjpDiagonal(DiagonalJacobian):
    def vjp(self, g):
        return 1.01 * super().vjp(g)


class Cube(jp.Layer):
    """y = x^3 with no vjp/jvp of its own: both derive from the operator."""

    def _forward(self, x):
        return x ** 3, CubeCache(x)

    def _jacobian(self, cache):
        return ScaledVjpDiagonal(3 * cache.x ** 2)


class CubeCache(NamedTuple):
    x: np.ndarray


def test_public_operator_vjp_override_is_obeyed_by_layers_and_to_scipy():
    rng = np.random.default_rng(5)
    x = rng.standard_normal((2, 3))
    op = Cube().jacobian(x)
    g = rng.standard_normal((2, 3))
    np.testing.assert_allclose(op.to_scipy().rmatvec(g.reshape(-1)),
                               1.01 * (g * 3 * x ** 2).reshape(-1), rtol=1e-12)
    _, cache = Cube().forward(x)
    np.testing.assert_allclose(Cube().vjp(cache, g)[0], 1.01 * g * 3 * x ** 2, rtol=1e-12)
    failing = {e.name for e in jp.check_layer(Cube(), x, rng=rng).failures}
    assert {"vjp dx", "J vjp", "dot test J"} <= failing
    net = jp.Sequential(jp.Dense(3, 3, rng=rng), Cube(), jp.Dense(3, 1, rng=rng))
    report = jp.gradcheck(net, x, rng.standard_normal((2, 1)), jp.MSE(), rng=rng)
    assert not report.ok and "layer 1 (Cube)" in report.culprit


class DoubleGradMSE(jp.MSE):
    def value_and_grad(self, y, t):
        value, grad = super().value_and_grad(y, t)
        return value, 2.0 * grad


class DoubledPerSampleMSE(jp.MSE):
    def per_sample(self, y, t):
        return 2.0 * super().per_sample(y, t)


def test_public_loss_overrides_are_obeyed():
    net, _, x, t, rng = problem(jp.Tanh(), 6)
    _, doubled = net.value_and_grad(x, t, DoubleGradMSE())
    _, right = net.value_and_grad(x, t, jp.MSE())
    np.testing.assert_allclose(doubled["0.W"], 2.0 * right["0.W"], rtol=1e-12)
    assert not jp.gradcheck(net, x, t, DoubleGradMSE(), rng=rng).ok
    loss = DoubledPerSampleMSE()
    assert loss.value(net(x), t) == pytest.approx(2.0 * jp.MSE().value(net(x), t))
    # Finite differences of L come from the overridden per-sample losses.
    assert not jp.gradcheck(net, x, t, loss, rng=rng).ok


# ---- names mean one thing; extension points fail early (issue 7, defects 4, 5, 7) ---------
def test_no_submodule_import_yields_a_function():
    import importlib
    from pathlib import Path

    root = Path(jp.__file__).parent
    names = [p.stem for p in root.glob("*.py") if p.stem not in ("__init__", "__main__")]
    names += [p.parent.name for p in root.glob("*/__init__.py")]
    assert "checks" in names and "gradcheck" not in names
    for name in names:
        if name == "testing":
            continue
        module = importlib.import_module(f"jacobprop.{name}")
        assert type(module).__name__ == "module", name
        # The package never re-exports a function under a module's name.
        assert getattr(jp, name, module) is module, name
    import jacobprop.checks as checks

    assert callable(checks.numerical_jacobian) and checks.gradcheck is jp.gradcheck
    for name in jp.__all__:
        assert hasattr(jp, name), name


def test_layer_jacobian_takes_an_input_or_a_cache_like_the_network():
    rng = np.random.default_rng(10)
    x = rng.standard_normal((3, 4))
    layer = jp.Tanh()
    _, cache = layer.forward(x)
    np.testing.assert_array_equal(layer.jacobian(x).to_dense(), layer.jacobian(cache).to_dense())
    dense = jp.Dense(4, 2, rng=rng)
    assert dense.param_jacobians(x)["W"].shape == (3, 2, 8)
    with pytest.raises(TypeError, match=r"Tanh.jacobian: expected the input x \(B, n\) or the "
                                        r"cache of Tanh.forward.*got dict"):
        layer.jacobian({"x": x})
    with pytest.raises(jp.ShapeError, match="Dense"):
        dense.jacobian(x[:, :3])


def test_an_option_without_effect_is_an_error():
    rng = np.random.default_rng(11)
    net = jp.Sequential(jp.Dense(3, 2, rng=rng))
    x, t = rng.standard_normal((4, 3)), rng.standard_normal((4, 2))
    with pytest.raises(ValueError, match="dense=True.*mode='jacobian'"):
        net.value_and_grad(x, t, jp.MSE(), mode="vjp", dense=True)
    net.value_and_grad(x, t, jp.MSE(), mode="jacobian", dense=True)


def test_both_registries_refuse_a_silent_overwrite():
    with pytest.raises(ValueError, match="register_loss: a different loss named 'MSE'"):
        jp.register_loss(type("MSE", (jp.Loss,), {}))
    with pytest.raises(ValueError, match="register_layer: a different layer named 'Tanh'"):
        jp.register_layer(type("Tanh", (jp.Layer,), {}))
    assert jp.register_loss(jp.MSE) is jp.MSE  # registering the same class again is fine


def test_a_step_is_called_a_step_and_kinks_are_one_representation():
    x = np.ones((2, 3))
    np.testing.assert_allclose(jp.numerical_jacobian(np.sin, x, step=1e-4)[:, 0, 0],
                               np.cos(1.0), rtol=1e-7)
    with pytest.raises(TypeError, match="eps"):
        jp.numerical_jacobian(np.sin, x, eps=1e-4)
    for cls in [*jp.LAYERS.values(), *jp.LOSSES.values()]:
        assert all(isinstance(kink, float) for kink in cls.kinks), cls
    assert jp.RMSE.kinks == (0.0,)


def test_a_cache_without_x_fails_at_the_first_forward_naming_the_layer():
    class Forgetful(jp.Layer):
        def _forward(self, x):
            return 2 * x, (x,)

        def _jacobian(self, cache):
            return jp.DiagonalJacobian(np.full(cache[0].shape, 2.0))

    with pytest.raises(TypeError, match=r"Forgetful._forward must return \(y, cache\) whose "
                                        r"cache carries the input as `cache.x`"):
        jp.Sequential(Forgetful())(np.ones((2, 3)))
    with pytest.raises(TypeError, match="Forgetful._forward"):
        Forgetful().forward(np.ones((2, 3)))


def test_a_jacobian_subclass_missing_a_method_fails_at_definition_naming_it():
    with pytest.raises(TypeError, match=r"Jacobian subclass Half must implement _jvp, "
                                        r"_transpose: _jvp \(column-vector products"):
        class Half(jp.Jacobian):
            def _vjp(self, g):
                return g

            def _to_dense(self):
                return np.zeros(self.shape)

            def _take(self, index):
                return self


class DoubledValueMSE(jp.MSE):
    def value(self, y, t):
        return 2.0 * super().value(y, t)


def test_a_public_value_override_defines_the_loss_gradcheck_differences():
    net, _, x, t, rng = problem(jp.Tanh(), 7)
    # value_and_grad still gives MSE's gradient, so the two public methods disagree.
    report = jp.gradcheck(net, x, t, DoubledValueMSE(), rng=rng)
    assert not report.ok and not report["x"].passed and not report["0.W"].passed
    assert "the loss DoubledValueMSE does not" in report.culprit
    assert jp.gradcheck(net, x, t, jp.MSE(), rng=rng).ok


def test_an_abstract_jacobian_base_defers_the_check_to_its_subclasses():
    class Base(jp.Jacobian, abstract=True):
        def _transpose(self):
            return self

    with pytest.raises(TypeError, match="Jacobian subclass Concrete must implement _vjp"):
        class Concrete(Base):
            pass
