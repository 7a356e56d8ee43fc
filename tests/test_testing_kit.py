"""The test kit tested: wrong layers fail by name, right ones pass, strategies keep their word."""

import re
import subprocess
import sys
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pytest
from hypothesis import find, given
from hypothesis import strategies as st

import jacobprop as jp
from jacobprop.jacobian import DiagonalJacobian
from jacobprop.testing import (
    CHECKS,
    DEFAULT_MARGIN,
    assert_layer_correct,
    cast_layer,
    draw_input,
    flatten_layers,
    input_problems,
    inputs,
    kink_distances,
    layers,
    load_profile,
    losses,
    sequentials,
    targets,
)

README = Path(__file__).resolve().parents[1] / "README.md"


class Cache(NamedTuple):
    x: np.ndarray  # (B, n)


class Sine(jp.Layer):
    """Correct: `y = sin(x)`, `dy/dx = diag(cos x)`."""

    elementwise = True

    def _forward(self, x):
        return np.sin(x), Cache(x)

    def _jacobian(self, cache):
        return jp.DiagonalJacobian(np.cos(cache.x))


class WrongJacobian(Sine):
    """`y = x^2` with the derivative `x` instead of `2x`."""

    def _forward(self, x):
        return x * x, Cache(x)

    def _jacobian(self, cache):
        return jp.DiagonalJacobian(cache.x)


class BatchCoupled(jp.Layer):
    """`y = x - mean over the batch`: sample i depends on every other sample."""

    def _forward(self, x):
        return x - x.mean(axis=0), Cache(x)

    def _jacobian(self, cache):
        batch, n = cache.x.shape
        return jp.DiagonalJacobian(np.full((batch, n), 1.0 - 1.0 / batch))


class WrongVjp(Sine):
    """A fast vjp override that forgot the cosine."""

    def _vjp(self, cache, g, need_input):
        return g * np.sin(cache.x), {}


class WrongJvp(Sine):
    """A fast jvp override with the wrong sign."""

    def _jvp(self, cache, v):
        return -v * np.cos(cache.x)


class Scale(jp.Layer):
    """`y = a * x` with a parameter vector `a` `(n,)`: `dy_i/da = diag(x_i)`."""

    elementwise = True

    def __init__(self, n, *, rng):
        super().__init__()
        self.params["a"] = rng.uniform(0.5, 1.5, n)

    @property
    def input_dim(self):
        return self.params["a"].shape[0]

    def _forward(self, x):
        return x * self.params["a"], Cache(x)

    def _jacobian(self, cache):
        batch = cache.x.shape[0]
        return jp.DiagonalJacobian(np.broadcast_to(self.params["a"], (batch, self.input_dim)))

    def _param_jacobians(self, cache):
        return {"a": jp.DiagonalJacobian(cache.x)}


class WrongParamJacobian(Scale):
    """Parameter Jacobian off by a factor 2."""

    def _param_jacobians(self, cache):
        return {"a": jp.DiagonalJacobian(2 * cache.x)}


class HiddenMatrix(jp.Layer):
    """`y = x @ M.T` with `M` kept outside `params`: cannot be cast to float32 by the kit."""

    def __init__(self):
        super().__init__()
        self.matrix = np.arange(6.0).reshape(2, 3) / 5

    @property
    def input_dim(self):
        return 3

    def output_dim(self, input_dim):
        return 2

    def _forward(self, x):
        return x @ self.matrix.T, Cache(x)

    def _jacobian(self, cache):
        return jp.SharedJacobian(self.matrix, cache.x.shape[0])


# ---- assert_layer_correct ----------------------------------------------------------
@pytest.mark.parametrize(
    "layer, check",
    [
        (WrongJacobian(), "jacobian vs finite differences"),
        (BatchCoupled(), "batch independence"),
        (WrongVjp(), "vjp vs jacobian"),
        (WrongJvp(), "jvp vs jacobian"),
        (WrongParamJacobian(3, rng=np.random.default_rng(0)),
         "parameter jacobians vs finite differences"),
        (HiddenMatrix(), "float32 vs float64"),
    ],
    ids=lambda value: type(value).__name__ if isinstance(value, jp.Layer) else "",
)
def test_wrong_layer_fails_naming_layer_and_check(layer, check):
    assert check in CHECKS
    with pytest.raises(AssertionError) as raised:
        assert_layer_correct(layer, input_dim=3)
    message = str(raised.value)
    assert isinstance(raised.value, jp.GradcheckError)
    assert type(layer).__name__ in message
    assert f"check {check!r} failed" in message
    if check != "float32 vs float64":
        # The worst entry, both sides side by side.
        assert re.search(r"worst entry \[sample \d+", message) or "worst entry [entry" in message
        assert re.search(r"(analytic|got) -?\d", message)
        assert re.search(r"(numeric|expected) -?\d", message)


def test_wrong_jacobian_message_quotes_the_numbers():
    x = np.array([[0.5, -1.0, 2.0]])
    with pytest.raises(jp.GradcheckError) as raised:
        assert_layer_correct(WrongJacobian(), x, float32=False)
    message = str(raised.value)
    # Worst entry: input 2 = 2.0, analytic derivative x = 2.0, true derivative 2x = 4.0.
    assert "[sample 0, output 2, input 2]" in message
    assert "analytic 2.0" in message
    assert re.search(r"numeric 4\.0000000\d*", message) or re.search(r"numeric 3\.99999", message)


@pytest.mark.parametrize(
    "layer",
    [Sine(), Scale(4, rng=np.random.default_rng(1)),
     jp.Sequential(jp.Dense(3, 4, rng=np.random.default_rng(2)), Sine(), jp.ReLU(),
                   jp.Sequential(jp.Dense(4, 2, rng=np.random.default_rng(3)), jp.Softmax()))],
    ids=["Sine", "Scale", "nested Sequential"],
)
def test_correct_layers_pass(layer):
    before = {name: value.copy() for name, value in layer.params.items()}
    assert_layer_correct(layer)
    # The checks perturb a copy, never the caller's parameters.
    for name, value in layer.params.items():
        np.testing.assert_array_equal(value, before[name])


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"layer": "Tanh"}, "assert_layer_correct: `layer` must be a jacobprop Layer, got str"),
        ({"layer": jp.Tanh(), "rng": 0},
         "assert_layer_correct: `rng` must be a numpy.random.Generator, got int"),
    ],
)
def test_assert_layer_correct_refuses_bad_arguments_by_name(kwargs, message):
    with pytest.raises(TypeError, match=re.escape(message)):
        assert_layer_correct(**kwargs)


def test_hidden_state_layer_passes_when_it_opts_out_of_float32():
    assert_layer_correct(HiddenMatrix(), float32=False)


@pytest.mark.parametrize("name", ["ReLU", "LeakyReLU"])
def test_both_checkers_accept_an_input_exactly_at_a_kink(name):
    # Defect 2 of issue 7: check_layer passed ReLU at x = 0 while assert_layer_correct
    # failed it ("analytic 0.0, numeric 0.5"); one checker, one kink rule now.
    x = np.array([[0.0, 1.0], [-0.5, 0.25]])
    layer = jp.LAYERS[name]()
    assert jp.check_layer(layer, x, rng=np.random.default_rng(0)).ok
    assert_layer_correct(layer, x)


def test_a_wrong_slope_next_to_a_kink_is_still_caught():
    # The kink rule accepts slopes between the one-sided ones only: a ReLU whose
    # derivative is 2 on the positive side is caught at a point on the kink too.
    class SteepReLU(jp.ReLU):
        def _jacobian(self, cache):
            return DiagonalJacobian(2.0 * (cache.x > 0))

        def _vjp(self, cache, g, need_input):
            return g * 2.0 * (cache.x > 0), {}

        def _jvp(self, cache, v):
            return v * 2.0 * (cache.x > 0)

    x = np.array([[0.0, 1.0], [-0.5, 0.25]])
    with pytest.raises(jp.GradcheckError, match="'jacobian vs finite differences' failed"):
        assert_layer_correct(SteepReLU(), x, float32=False)


def test_cast_layer_copies_and_casts_every_nested_parameter():
    rng = np.random.default_rng(0)
    net = jp.Sequential(jp.Dense(2, 3, rng=rng), jp.Sequential(jp.Tanh(), jp.Dense(3, 1, rng=rng)))
    low = cast_layer(net, np.float32)
    assert set(low.params) == set(net.params)
    for key, value in low.params.items():
        assert value.dtype == np.float32
        assert net.params[key].dtype == np.float64
        assert not np.shares_memory(value, net.params[key])
        np.testing.assert_array_equal(value, net.params[key].astype(np.float32))


# ---- strategies --------------------------------------------------------------------
@given(data=st.data())
def test_network_inputs_keep_every_live_kink_input_clear(data):
    net = data.draw(sequentials(min_depth=1, max_depth=5), label="net")
    x = data.draw(inputs(net), label="x")
    assert x.ndim == 2 and x.dtype == np.float64
    assert np.isfinite(x).all()
    z = x
    checked = kink_distances(net, x)
    for position, leaf in enumerate(flatten_layers(net)):
        kinks, saturation = type(leaf).kinks, type(leaf).saturation
        if leaf.has_kinks or saturation is not None:
            item = checked.pop(0)
            assert item.position == position and item.layer is leaf
            np.testing.assert_array_equal(item.z, z)
            gain = item.gain
            assert gain.shape == z.shape and (gain >= 0).all()
            if position == 0:
                assert (gain == 1).all()
        if kinks:
            # The distance is recomputed here rather than taken from kink_distances.
            distance = np.abs(z[:, :, None] - np.asarray(kinks)).min(axis=2)
            assert (distance >= DEFAULT_MARGIN * gain).all()
        if type(leaf).tie_kinks:
            # Recomputed: the gap of each window is at least 2 margin times its least gain.
            windows = leaf._windows_checked()
            least = gain[:, windows].min(axis=2)
            assert (leaf.tie_gaps(z) >= 2 * DEFAULT_MARGIN * least).all()
        if saturation is not None:
            assert (np.abs(z[gain > 0]) <= saturation).all()
        z = leaf(z)
    assert checked == []


@given(x=inputs(jp.ReLU(), input_dim=6, margin=0.05))
def test_single_kinked_layer_inputs_respect_the_margin(x):
    assert np.abs(x).min() >= 0.05


@pytest.mark.parametrize("name", sorted(name for name, cls in jp.LAYERS.items() if cls.saturation))
@given(data=st.data())
def test_saturating_layer_inputs_stay_inside(name, data):
    layer = data.draw(layers(input_dim=3, names=[name]))
    x = data.draw(inputs(layer, input_dim=3, scales=(100.0,)))
    assert np.abs(x).max() <= type(layer).saturation


def test_dead_relu_outputs_are_not_counted_as_kink_inputs():
    # ReLU after ReLU: the second sees exact zeros, constant near x, hence harmless.
    net = jp.Sequential(jp.ReLU(), jp.ReLU())
    x = np.array([[-1.0, 2.0], [0.5, -0.25]])
    second = [item for item in kink_distances(net, x) if item.position == 1][0]
    np.testing.assert_array_equal(second.live, x > 0)
    assert input_problems(net, x) == []
    # A live entry near the kink is reported.
    shifted = jp.Sequential(jp.Dense(2, 2, rng=np.random.default_rng(0)), jp.ReLU())
    w, b = shifted[0].params["W"], shifted[0].params["b"]
    b[:] = -w @ np.array([0.3, 0.7])  # the pre-activation of x = (0.3, 0.7) is exactly 0
    assert input_problems(shifted, np.array([[0.3, 0.7]]))


def test_draw_input_redraws_until_deep_kinks_are_clear():
    rng = np.random.default_rng(0)
    net = jp.Sequential(jp.Dense(3, 5, rng=rng), jp.LeakyReLU(0.1), jp.Dense(5, 4, rng=rng),
                        jp.ReLU())
    for _ in range(20):
        x = draw_input(net, 4, rng=rng, scale=1.0)
        assert input_problems(net, x) == []


def test_kink_margin_scales_with_the_gain_in_front_of_the_layer():
    # LeakyReLU(0.01) twice: the second sees 0.01 x, exactly as far from its kink,
    # relative to how far a perturbation of x moves it, as x is from the first.
    net = jp.Sequential(jp.LeakyReLU(0.01), jp.LeakyReLU(0.01), jp.ReLU())
    x = np.array([[-0.5, 0.002, -0.002]])
    items = kink_distances(net, x)
    np.testing.assert_allclose(items[1].gain, [[0.01, 1.0, 0.01]])
    np.testing.assert_allclose(items[2].gain, [[1e-4, 1.0, 1e-4]])
    assert input_problems(net, x) == []
    assert input_problems(net, np.array([[-0.5, 0.0005, -0.002]]))
    x = draw_input(net, 3, rng=np.random.default_rng(0), input_dim=4, scale=0.3)
    assert input_problems(net, x) == []


def test_max_pool_ties_are_kept_clear_like_other_kinks():
    """A tie in a window is MaxPool2D's kink: its distance is half the gap (both ends move),
    scaled by the gain in front like a value kink, and draw_input keeps it clear."""
    pool = jp.MaxPool2D(2, input_shape=(1, 2, 2))
    assert pool.has_kinks and not jp.AvgPool2D(2).has_kinks
    np.testing.assert_allclose(pool._kink_distance(np.array([[1.0, 0.9, 0.0, 1.0]])),
                               [[0.0, 0.05, 0.5, 0.0]])
    assert input_problems(pool, np.array([[1.0, 0.9, 0.0, 0.5]])) == []
    [problem] = input_problems(pool, np.array([[1.0, 1.0, 0.0, 0.5]]))
    assert "a tie in its window" in problem
    rng = np.random.default_rng(11)
    dense = jp.Dense(2, 4, rng=rng)
    net = jp.Sequential(dense, jp.MaxPool2D(2, input_shape=(1, 2, 2)))
    dense.params["W"][:] = [[1.0, 0.0], [1.0 + 1e-3, 0.0], [0.0, 1.0], [0.0, 1.0]]
    dense.params["b"][:] = 0.0
    # At x = (1, 0) the first two entries are 1e-3 apart: clear with a gain of 1 ...
    assert input_problems(net, np.array([[1.0, 0.0]]), margin=4e-4) == []
    # ... but not once a larger gain in front moves them more per unit of x or W.
    dense.params["W"] *= 10.0
    assert input_problems(net, np.array([[0.1, 0.0]]), margin=4e-4)
    dense.params["W"][:] = rng.standard_normal((4, 2))  # rows 2 and 3 were always tied
    for _ in range(10):
        x = draw_input(net, 3, rng=rng, margin=1e-2)
        assert input_problems(net, x, margin=1e-2) == []


def test_layers_strategy_reads_the_registry(monkeypatch):
    monkeypatch.setitem(jp.LAYERS, "Sine", Sine)
    found = find(layers(), lambda layer: isinstance(layer, Sine))
    assert isinstance(found, Sine)
    names = {type(leaf).__name__ for leaf in flatten_layers(
        find(sequentials(min_depth=3, max_depth=3), lambda net: any(
            isinstance(leaf, Sine) for leaf in flatten_layers(net))))}
    assert "Sine" in names


@pytest.mark.parametrize(
    "strategy, registry",
    [(layers, "LAYERS"), (sequentials, "LAYERS"), (losses, "LOSSES")],
    ids=["layers", "sequentials", "losses"],
)
@pytest.mark.parametrize("names", [["NoSuchName"], []], ids=["unknown", "empty"])
def test_strategies_refuse_names_outside_their_registry(strategy, registry, names):
    with pytest.raises(ValueError) as raised:
        find(strategy(names=names), lambda drawn: True)
    message = str(raised.value)
    expected = f"{strategy.__name__}: `names` must be a non-empty selection of jacobprop."
    expected += registry
    assert expected in message
    assert f"got {names!r}" in message


@given(data=st.data())
def test_targets_are_valid_for_every_registered_loss(data):
    loss = data.draw(losses())
    batch, m = data.draw(st.integers(1, 4)), data.draw(st.integers(1, 4))
    t = data.draw(targets(loss, (batch, m)))
    y = np.random.default_rng(0).standard_normal((batch, m))
    value = loss.value(y, t)  # raises on an invalid target
    assert np.isfinite(value)


# ---- profiles and imports ------------------------------------------------------------
def test_profile_selection_follows_the_environment():
    from hypothesis import settings

    try:
        assert load_profile({}) == "dev"
        assert load_profile({"CI": "false"}) == "dev"
        assert load_profile({"CI": "true"}) == "ci"
        assert settings.default.derandomize is True
        assert settings.default.deadline is None
        ci_examples = settings.default.max_examples
        assert load_profile({"CI": "1", "HYPOTHESIS_PROFILE": "dev"}) == "dev"
        assert settings.default.max_examples < ci_examples
    finally:
        load_profile()


def test_import_jacobprop_does_not_import_hypothesis():
    code = "import sys, jacobprop; assert 'hypothesis' not in sys.modules, 'imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_testing_without_hypothesis_says_how_to_install_it():
    code = (
        "import sys\n"
        "sys.modules['hypothesis'] = None  # as if it were not installed\n"
        "try:\n"
        "    import jacobprop.testing\n"
        "except ImportError as error:\n"
        "    print(error)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True,
                            text=True)
    assert "pip install 'jacobprop[test]'" in result.stdout


# ---- the README example ----------------------------------------------------------------
def readme_blocks() -> list[str]:
    """The python code blocks of README.md's "Checking your own layer" section."""
    text = README.read_text()
    section = text.split("<!-- BEGIN checking-your-own-layer -->")[1]
    section = section.split("<!-- END checking-your-own-layer -->")[0]
    assert "## Checking your own layer" in section
    blocks = re.findall(r"```python\n(.*?)```", section, flags=re.S)
    assert blocks, "no python block in the README section"
    return blocks


def run_readme(blocks) -> dict:
    """Run the blocks in one namespace, then every `test_*` function they define."""
    namespace = {"__name__": "readme_example"}
    for block in blocks:
        # A pseudo file name: the block's line numbers are not README.md's, and
        # hypothesis would otherwise read (and tokenize) the wrong lines of the file.
        exec(compile(block, "<README.md: Checking your own layer>", "exec"), namespace)
    tests = [value for name, value in namespace.items() if name.startswith("test_")]
    for test in tests:
        test()
    return namespace


def test_readme_layer_example_runs():
    blocks = readme_blocks()
    assert "assert_layer_correct(Sine())" in blocks[0]
    assert "@jp.register_layer\n" not in blocks[0]
    namespace = run_readme(blocks)
    assert "test_sine" in namespace  # the hypothesis example ran too
    assert "Sine" not in jp.LAYERS  # the example does not register its layer


def test_readme_layer_example_would_catch_a_wrong_derivative():
    blocks = readme_blocks()
    broken = blocks[0].replace("np.cos(cache.x)", "np.sin(cache.x)")
    assert broken != blocks[0]
    with pytest.raises(jp.GradcheckError, match="jacobian vs finite differences"):
        run_readme([broken])


@pytest.mark.parametrize("mutant_name", ["ScaledParamHookDense", "ShiftedInputColumnsDense"])
def test_assert_layer_correct_names_a_wrong_shortcut_hook(mutant_name):
    """The kit's one call fails on a layer whose derivatives are right but whose
    finite-difference shortcut is not; the message quotes the hook entry."""
    import mutants

    cls = getattr(mutants, mutant_name)
    rng = np.random.default_rng(60)
    hook = "hook W" if mutant_name == "ScaledParamHookDense" else "hook x"
    with pytest.raises(jp.GradcheckError) as info:
        assert_layer_correct(cls(4, 6, rng=rng), rng=rng)
    message = str(info.value)
    assert mutant_name in message and f"{hook} (_affine_" in message
    assert "vs forward" in message
    # The layer's derivatives themselves are right: only the hook entry fails.
    report = jp.check_layer(cls(4, 6, rng=rng), rng.standard_normal((3, 4)), rng=rng)
    assert {e.name for e in report.failures} == {hook}
