"""Every checker catches every deliberately wrong layer it applies to, naming the layer.

Which checks apply to which mutant follows from where its bug lives (see the
docstring and `EXPECTED` of tests/mutants.py): the tests assert those checks
fail *and* the others pass, so a checker that flags everything fails here too.
"""

from __future__ import annotations

import numpy as np
import pytest
from mutants import (
    EXPECTED,
    Centering,
    PerSampleCentering,
    mutant_layer,
    network_with,
    registered_example,
)

import jacobprop as jp
from jacobprop.testing import assert_layer_correct

MUTANTS = list(EXPECTED)
NETWORK_MODES = {
    "full": {},
    "fast": {"fast": True},
    "richardson": {"richardson": True},
    "jacobian mode": {"mode": "jacobian"},
}


def catches(kind: str, mode: str) -> bool:
    """Whether a network check in `mode` must catch a bug living in `kind`."""
    if kind == "jvp":
        return False  # no gradient ever calls the jvp
    if kind == "vjp":
        return mode != "jacobian mode"  # the Jacobian backward never calls the vjp
    if kind == "jacobian":
        return mode == "jacobian mode"  # the vjp backward never forms a Jacobian
    if kind == "hook":
        return mode != "fast"  # verified before use; fast mode uses no hook
    return True


def taylor_catches(kind: str) -> bool:
    """Whether the Taylor test must catch a bug living in `kind`: it uses no shortcut hook,
    so only a wrong gradient shows."""
    return kind != "hook" and catches(kind, "full")


def mutant_problem(mutant, seed=0):
    """`(net, index of the mutant, x, t, loss, rng)`.

    Not named `setup`: pytest 7 (allowed by the `test` extra) calls a module-level
    `setup` as nose-style module set-up, with the module as its argument.
    """
    rng = np.random.default_rng(seed)
    net, index, width = network_with(mutant, rng=rng)
    x = rng.standard_normal((5, width))
    loss = jp.MSE()
    t = rng.standard_normal((5, 3))
    return net, index, x, t, loss, rng


def test_mutants_are_not_registered():
    registered = set(jp.LAYERS.values())
    assert not registered & set(MUTANTS)


@pytest.mark.parametrize("mode", list(NETWORK_MODES))
@pytest.mark.parametrize("mutant", MUTANTS, ids=lambda cls: cls.__name__)
def test_gradcheck_catches_exactly_the_mutants_it_applies_to(mutant, mode):
    kind, _ = EXPECTED[mutant]
    net, index, x, t, loss, rng = mutant_problem(mutant)
    report = jp.gradcheck(net, x, t, loss, rng=rng, **NETWORK_MODES[mode])
    if not catches(kind, mode):
        assert report.ok, str(report)
        return
    assert not report.ok
    text = str(report)
    assert f"layer {index} ({mutant.__name__})" in report.culprit
    assert report.culprit in text and "FAIL" in text
    with pytest.raises(jp.GradcheckError, match=mutant.__name__):
        jp.gradcheck(net, x, t, loss, rng=rng, raise_on_fail=True, **NETWORK_MODES[mode])


@pytest.mark.parametrize("mutant", MUTANTS, ids=lambda cls: cls.__name__)
def test_taylor_catches_exactly_the_gradient_bugs(mutant):
    """Hook bugs included: no gradient is wrong, so Taylor passes them."""
    kind, _ = EXPECTED[mutant]
    net, index, x, t, loss, rng = mutant_problem(mutant)
    result = jp.taylor_test(net, x, t, loss, rng=rng)
    if not taylor_catches(kind):
        assert result.ok, str(result)
        assert result.order > 1.5
        return
    assert not result.ok
    assert result.order < 1.5
    assert f"layer {index} ({mutant.__name__})" in str(result)


@pytest.mark.parametrize("kwargs", [{}, {"fast": True}, {"richardson": True}],
                         ids=["full", "fast", "richardson"])
@pytest.mark.parametrize("mutant", MUTANTS, ids=lambda cls: cls.__name__)
def test_check_layer_flags_exactly_the_expected_entries(mutant, kwargs):
    _, failing = EXPECTED[mutant]
    rng = np.random.default_rng(1)
    layer, width = mutant_layer(mutant, rng=rng)
    report = jp.check_layer(layer, rng.standard_normal((5, width)), rng=rng, **kwargs)
    assert {entry.name for entry in report.failures} == failing, str(report)
    assert mutant.__name__ in str(report)


GRADIENT_MUTANTS = [m for m in MUTANTS if catches(EXPECTED[m][0], "full")]


@pytest.mark.parametrize("mutant", GRADIENT_MUTANTS, ids=lambda cls: cls.__name__)
def test_the_first_wrong_layer_is_named_even_deep_in_the_network(mutant):
    """A jvp-only bug changes no gradient, so only the gradient bugs have a culprit here."""
    rng = np.random.default_rng(2)
    inner, _ = mutant_layer(mutant, rng=rng)
    width = inner.input_dim or 6
    out = inner.output_dim(width)
    net = jp.Sequential(jp.Dense(3, width, rng=rng), jp.Tanh(), inner,
                        jp.Dense(out, 2, rng=rng))
    report = jp.gradcheck(net, rng.standard_normal((4, 3)), rng.standard_normal((4, 2)),
                          jp.MSE(), rng=rng)
    assert not report.ok
    assert f"layer 2 ({mutant.__name__})" in report.culprit


def test_a_vjp_bug_only_in_one_sample_shows_with_batches_only():
    """FirstSampleReLU is right for B = 1: the checks must not flag it there."""
    from mutants import FirstSampleReLU

    rng = np.random.default_rng(3)
    net, _, _, _, loss, _ = mutant_problem(FirstSampleReLU)
    x, t = rng.standard_normal((1, 4)), rng.standard_normal((1, 3))
    assert jp.gradcheck(net, x, t, loss).ok
    assert jp.check_layer(FirstSampleReLU(), rng.standard_normal((1, 6))).ok


@pytest.mark.parametrize("layer_name", sorted(jp.LAYERS))
def test_no_correct_registered_layer_is_ever_flagged(layer_name):
    rng = np.random.default_rng(4)
    cls = jp.LAYERS[layer_name]
    layer, random_x, at_kinks = registered_example(layer_name, 6, 5, rng=rng)
    width = random_x.shape[1]
    for x in (random_x, at_kinks):
        for kwargs in ({}, {"fast": True}, {"richardson": True}):
            report = jp.check_layer(layer, x, rng=rng, **kwargs)
            assert report.ok, str(report)
        net = jp.Sequential(jp.Dense(3, width, rng=rng), layer,
                            jp.Dense(layer.output_dim(width), 2, rng=rng))
        x_net = rng.standard_normal((5, 3))
        # A whole sample on the kink (for MaxPool2D: every window of it tied at 0).
        x_net[0] = 0.0
        net[0].params["b"][:] = cls.kinks[0] if cls.kinks else 0.0
        for kwargs in ({}, {"fast": True}, {"richardson": True}):
            report = jp.gradcheck(net, x_net, rng.standard_normal((5, 2)), jp.MSE(),
                                  rng=rng, **kwargs)
            assert report.ok, str(report)
        assert jp.taylor_test(net, x_net, rng.standard_normal((5, 2)), jp.MSE(), rng=rng).ok


@pytest.mark.parametrize("mutant", MUTANTS, ids=lambda cls: cls.__name__)
def test_assert_layer_correct_catches_every_mutant(mutant):
    """The testing kit's one call catches every bug of the table, whatever its kind."""
    from jacobprop.testing.contract import _check_of

    _, failing = EXPECTED[mutant]
    rng = np.random.default_rng(5)
    layer, width = mutant_layer(mutant, rng=rng)
    with pytest.raises(jp.GradcheckError, match=mutant.__name__) as caught:
        assert_layer_correct(layer, input_dim=width, rng=rng)
    # The check named is the kit's name for a failing check_layer entry, or batch
    # independence for a layer whose samples interact although it says they do not.
    named = {_check_of(entry) for entry in failing} | {"batch independence"}
    assert any(f"check {name!r} failed" in str(caught.value) for name in named)


def test_a_layer_coupling_samples_passes_every_checker_when_it_says_so():
    rng = np.random.default_rng(6)
    x = rng.standard_normal((4, 3))
    assert jp.check_layer(Centering(), x, rng=rng).ok
    report = jp.check_layer(Centering(), x, rng=rng)
    assert "samples coupled" in report.title
    assert report["dy/dx"].size == 4 * 3 * 4 * 3  # the (B, m, B, n) dense Jacobian
    assert_layer_correct(Centering(), rng=rng)
    assert_layer_correct(Centering(), x, rng=rng)
    net = jp.Sequential(jp.Dense(3, 5, rng=rng), Centering(), jp.Tanh(),
                        jp.Dense(5, 2, rng=rng))
    assert net.couples_samples
    t = rng.standard_normal((4, 2))
    for kwargs in ({}, {"fast": True}, {"richardson": True}):
        report = jp.gradcheck(net, x, t, jp.MSE(), rng=rng, **kwargs)
        assert report.ok, str(report)
    assert jp.taylor_test(net, x, t, jp.MSE(), rng=rng).ok


def test_a_coupled_layer_is_differenced_over_the_whole_batch():
    """The per-sample shortcut (move column j of every sample at once) sums the
    cross-sample terms; for a coupled network it would be wrong, so it is not used."""
    rng = np.random.default_rng(7)
    x = rng.standard_normal((3, 2))
    report = jp.check_layer(Centering(), x, rng=rng)
    assert report.evaluations >= 2 * x.size  # one whole-batch pass per entry and side
    net = jp.Sequential(Centering(), jp.Dense(2, 1, rng=rng))
    report = jp.gradcheck(net, x, rng.standard_normal((3, 1)), jp.MSE(), rng=rng)
    assert report.ok and report["x"].passed


def test_a_coupled_operator_in_a_layer_declaring_no_coupling_is_caught():
    class Undeclared(PerSampleCentering):
        def _jacobian(self, cache):
            return Centering._jacobian(self, cache)

    rng = np.random.default_rng(8)
    with pytest.raises(jp.GradcheckError, match="couples samples"):
        assert_layer_correct(Undeclared(), rng=rng, float32=False)


def test_a_coupled_operator_views_the_whole_batch_in_scipy():
    from mutants import CenteringJacobian

    op = CenteringJacobian(3, 2, np.float64)
    assert op.couples_samples and not jp.DiagonalJacobian(np.ones((3, 2))).couples_samples
    dense = op.to_dense().reshape(6, 6)
    v = np.random.default_rng(12).standard_normal(6)
    np.testing.assert_allclose(op.to_sparse().toarray(), dense)
    np.testing.assert_allclose(op.to_scipy().matvec(v), dense @ v, atol=1e-15)
    np.testing.assert_allclose(op.to_scipy().rmatvec(v), dense.T @ v, atol=1e-15)
    with pytest.raises(ValueError, match="samples are coupled"):
        op.to_scipy(sample=0)
