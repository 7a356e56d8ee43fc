"""The checkers catch the round-2 mutants (tests/mutants_layers.py) and pass their parents."""

from __future__ import annotations

import numpy as np
import pytest
from mutants_layers import EXPECTED, mutant_layer, network_with

import jacobprop as jp
from jacobprop.testing.contract import CHECKS

MUTANTS = list(EXPECTED)


def _parent(mutant):
    return next(cls for cls in mutant.__mro__[1:] if cls.__name__ in jp.LAYERS)


def test_mutants_are_not_registered():
    assert not set(jp.LAYERS.values()) & set(MUTANTS)
    for _, failing in EXPECTED.values():
        assert failing <= set(CHECKS)


@pytest.mark.parametrize("mutant", MUTANTS, ids=lambda cls: cls.__name__)
def test_assert_layer_correct_names_the_expected_check(mutant):
    _, failing = EXPECTED[mutant]
    layer = mutant_layer(mutant, rng=np.random.default_rng(1))
    with pytest.raises(jp.GradcheckError) as caught:
        jp.testing.assert_layer_correct(layer, rng=np.random.default_rng(2), batch=4,
                                        float32=False)
    assert any(f"check {name!r} failed" in str(caught.value) for name in failing), \
        str(caught.value)


@pytest.mark.parametrize("mutant", MUTANTS, ids=lambda cls: cls.__name__)
def test_gradcheck_catches_the_mutant_and_passes_its_parent(mutant):
    kind, _ = EXPECTED[mutant]
    rng = np.random.default_rng(3)
    net, width = network_with(mutant, rng=rng)
    x = rng.standard_normal((5, width))
    t = rng.standard_normal((5, 3))
    assert not jp.gradcheck(net, x, t, jp.MSE(), rng=rng).ok
    # The explicit (Jacobian) backward mode never calls the vjp.
    assert jp.gradcheck(net, x, t, jp.MSE(), rng=rng, mode="jacobian").ok == (kind == "vjp")
    # The same network with the correct parent layer passes: the parameter
    # differences are exact for it (only the input entries of a coupled layer need
    # the whole-batch differences of the other branch's gradcheck).
    parent = _parent(mutant)
    layer = net[1]
    fixed = parent(**{k: v for k, v in layer.config().items()})
    for name, value in layer.params.items():
        fixed.params[name] = value.copy()
    good = jp.Sequential(net[0], fixed, net[2])
    _, grads = good.value_and_grad(x, t, jp.MSE())
    _, explicit = good.value_and_grad(x, t, jp.MSE(), mode="jacobian")
    for key, value in grads.items():
        np.testing.assert_allclose(explicit[key], value, rtol=1e-10,
                                   atol=1e-12 * np.abs(value).max())
