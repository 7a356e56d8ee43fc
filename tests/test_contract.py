"""The layer contract for every registered layer, with no per-layer code.

`pytest.mark.parametrize` reads `jacobprop.LAYERS` at collection time, so a
newly registered layer class is checked here the moment it exists.
"""

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import jacobprop as jp
from jacobprop.testing import assert_layer_correct, inputs, layers


@pytest.mark.parametrize("name", sorted(jp.LAYERS))
@given(data=st.data(), width=st.integers(1, 5))
def test_layer_contract(name, data, width):
    layer = data.draw(layers(input_dim=width, names=[name]), label="layer")
    x = data.draw(inputs(layer, input_dim=width), label="x")
    assert_layer_correct(layer, x, rng=np.random.default_rng(0))
