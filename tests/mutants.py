"""Deliberately wrong layers: each a realistic backpropagation bug; and the correct ones.

None of them is registered (`LAYERS` must hold correct layers only); every
forward pass is right, only a derivative is wrong. `EXPECTED` says, per
mutant, where the bug lives and therefore which checks must catch it:

- "derivative": the Jacobian, vjp and jvp agree with each other and are all
  wrong. Finite differences catch it everywhere (gradcheck in both backward
  modes, fast, Richardson, Taylor; check_layer's "dy/dx"); the
  analytic-vs-analytic checks (vjp vs Jacobian, jvp vs Jacobian, dot tests)
  cannot, and must pass.
- "vjp": only `_vjp` is wrong. gradcheck in vjp mode (all variants) and the
  Taylor test catch it, and check_layer's "vjp ..." entry; gradcheck with
  mode="jacobian" (which never calls vjp) and the finite-difference Jacobian
  must pass. When the input part of the vjp is wrong, the layer's own dot test
  (its jvp against its vjp) fails too.
- "jvp": only `_jvp` is wrong. No gradient uses the jvp, so every gradcheck
  mode and Taylor pass; check_layer's "jvp" entry and dot test catch it.

`registered_example` gives the correct counterpart, any registered layer with
inputs on its kinks, which no checker may ever flag.
"""

from __future__ import annotations

import numpy as np

import jacobprop as jp
from jacobprop.jacobian import DiagonalJacobian, GeneralJacobian


class SignFlipTanh(jp.Tanh):
    """dy/dx = -(1 - y^2): the sign of the derivative is flipped (all of J, vjp, jvp)."""

    def _derivative(self, cache):
        return -super()._derivative(cache)


class SignFlipVjpDense(jp.Dense):
    """dL/dx = -G W in the vjp only."""

    def _vjp(self, cache, g, need_input):
        gx, grads = super()._vjp(cache, g, need_input)
        return (None if gx is None else -gx), grads


class TransposedWeightGradDense(jp.Dense):
    """dL/dW = X^T G reshaped to W's shape instead of transposed (non-square only)."""

    def _vjp(self, cache, g, need_input):
        gx, grads = super()._vjp(cache, g, need_input)
        grads["W"] = (cache.x.T @ g).reshape(self.params["W"].shape)
        return gx, grads


class BatchMeanBiasDense(jp.Dense):
    """dL/db = mean over the batch instead of the sum."""

    def _vjp(self, cache, g, need_input):
        gx, grads = super()._vjp(cache, g, need_input)
        grads["b"] = g.mean(axis=0)
        return gx, grads


class NoOuterSoftmax(jp.Softmax):
    """Softmax Jacobian diag(s) without its outer term -s s^T (J, vjp, jvp)."""

    def _vjp(self, cache, g, need_input):
        return (g * cache.y if need_input else None), {}

    def _jvp(self, cache, v):
        return v * cache.y

    def _jacobian(self, cache):
        return DiagonalJacobian(cache.y)


class ShiftedOuterSoftmax(jp.Softmax):
    """diag(s) - roll(s) s^T: the outer term's index is off by one (J, vjp, jvp)."""

    def _vjp(self, cache, g, need_input):
        if not need_input:
            return None, {}
        s, r = cache.y, np.roll(cache.y, 1, axis=1)
        return s * g - np.einsum("bm,bm->b", g, r)[:, None] * s, {}

    def _jvp(self, cache, v):
        s, r = cache.y, np.roll(cache.y, 1, axis=1)
        return s * v - r * np.einsum("bn,bn->b", s, v)[:, None]

    def _jacobian(self, cache):
        s, r = cache.y, np.roll(cache.y, 1, axis=1)
        n = s.shape[1]
        dense = -r[:, :, None] * s[:, None, :]
        dense[:, np.arange(n), np.arange(n)] += s
        return GeneralJacobian(dense)


class OnePercentVjpSigmoid(jp.Sigmoid):
    """The vjp is 1% too large."""

    def _vjp(self, cache, g, need_input):
        return (1.01 * g * self._derivative(cache) if need_input else None), {}


class DroppedColumnDense(jp.Dense):
    """The vjp's dL/dx ignores the last input column (left at zero)."""

    def _vjp(self, cache, g, need_input):
        gx, grads = super()._vjp(cache, g, need_input)
        if gx is not None:
            gx = gx.copy()
            gx[:, -1] = 0.0
        return gx, grads


class JvpMismatchTanh(jp.Tanh):
    """The jvp uses 1 - y instead of 1 - y^2; the Jacobian and vjp are right."""

    def _jvp(self, cache, v):
        return v * (1 - np.tanh(cache.x))


class FirstSampleReLU(jp.ReLU):
    """Uses sample 0's mask for every sample: right only for batch size 1 (J, vjp, jvp)."""

    def _derivative(self, cache):
        mask = (cache.x[:1] > 0).astype(cache.x.dtype)
        return np.broadcast_to(mask, cache.x.shape).copy()

    def _vjp(self, cache, g, need_input):
        return (g * self._derivative(cache) if need_input else None), {}


#: mutant class -> (where the bug is, check_layer entries that must fail)
EXPECTED = {
    SignFlipTanh: ("derivative", {"dy/dx"}),
    SignFlipVjpDense: ("vjp", {"vjp dx", "dot test"}),
    TransposedWeightGradDense: ("vjp", {"vjp dW"}),
    BatchMeanBiasDense: ("vjp", {"vjp db"}),
    NoOuterSoftmax: ("derivative", {"dy/dx"}),
    ShiftedOuterSoftmax: ("derivative", {"dy/dx"}),
    OnePercentVjpSigmoid: ("vjp", {"vjp dx", "dot test"}),
    DroppedColumnDense: ("vjp", {"vjp dx", "dot test"}),
    JvpMismatchTanh: ("jvp", {"jvp", "dot test"}),
    FirstSampleReLU: ("derivative", {"dy/dx"}),
}


def network_with(mutant_cls, *, rng: np.random.Generator):
    """A small network `Dense -> mutant -> Dense` (or `mutant Dense -> Tanh -> Dense`).

    Returns `(net, index of the mutant layer, input width)`; Dense mutants are
    non-square (4 -> 6) so a transposed gradient cannot keep its shape by chance.
    """
    if issubclass(mutant_cls, jp.Dense):
        layers = [mutant_cls(4, 6, rng=rng), jp.Tanh(), jp.Dense(6, 3, rng=rng)]
        return jp.Sequential(*layers), 0, 4
    layers = [jp.Dense(4, 6, rng=rng), mutant_cls(), jp.Dense(6, 3, rng=rng)]
    return jp.Sequential(*layers), 1, 4


def mutant_layer(mutant_cls, *, rng: np.random.Generator):
    """The mutant alone (non-square when it is a Dense) and its input width."""
    if issubclass(mutant_cls, jp.Dense):
        return mutant_cls(4, 6, rng=rng), 4
    return mutant_cls(), 6


def registered_example(layer_name: str, width: int, batch: int, *, rng: np.random.Generator):
    """A registered layer's example, a random input and the same input on its kinks.

    Returns `(layer, x, at_kinks)`, both inputs `(batch, layer.input_dim or width)`.
    `at_kinks` puts a whole sample (the first) on the first kink, and every other
    feature of every other sample after it on each kink in turn, so that entries
    at a kink sit beside entries that are not, in the same sample and the same
    feature. Equal to `x` for a layer without kinks.
    """
    cls = jp.LAYERS[layer_name]
    layer = cls.example(width, rng=rng)
    x = rng.standard_normal((batch, layer.input_dim or width))
    at_kinks = x.copy()
    if cls.kinks:
        at_kinks[0] = cls.kinks[0]
    for k, kink in enumerate(cls.kinks):
        at_kinks[1 + k::2, ::2] = kink
    return layer, x, at_kinks
