"""Deliberately wrong versions of the round-2 layers: the verification kit must catch each.

Same idea as tests/mutants.py (the lead folds this table into it): each class
inherits a correct layer and breaks one derivative. `EXPECTED` says, per mutant,
where the bug lives and which checks must catch it:

- WrongWeightGradConv: "vjp" -- only the vjp's dL/dW is wrong (the im2col rows
  are paired with the wrong channel: `G_rows` flipped along the channels).
  gradcheck in vjp mode catches it (finite differences of the loss in W);
  assert_layer_correct's "vjp vs jacobian" check catches it (the vjp disagrees
  with `g @ dy/dvec(W)`); gradcheck with mode="jacobian" never calls the vjp
  and must pass.
- NoMeanLayerNorm: "derivative" -- the Jacobian, vjp and jvp all drop the mean
  term `-1 1^T / k` and agree with each other. Finite differences catch it
  (assert_layer_correct "jacobian vs finite differences", gradcheck in both
  modes); the analytic-vs-analytic checks must pass.
- PerSampleBatchNorm: "coupling" -- train-mode BatchNorm whose derivatives keep
  only the blocks J[i, :, i, :] and claim independent samples
  (`couples_samples` False). assert_layer_correct's "batch independence" check
  catches it (a sample's output moves with the rest of the batch), and so does
  gradcheck of a network `Dense -> mutant -> Dense` through the parameters of
  the Dense before it (their finite differences see the coupling).
"""

from __future__ import annotations

import numpy as np

import jacobprop as jp
from jacobprop.jacobian import DiagonalJacobian
from jacobprop.jacobian_spatial import channel_rows


class WrongWeightGradConv(jp.Conv2D):
    """dL/dW pairs each output channel's rows with the reversed channel order."""

    def _vjp(self, cache, g, need_input):
        gx, grads = super()._vjp(cache, g, need_input)
        rows = channel_rows(g, self.out_channels)[::-1]
        grads["W"] = (rows @ cache.columns.T).reshape(self.params["W"].shape)
        return gx, grads


class NoMeanLayerNorm(jp.LayerNorm):
    """dy/dx = diag(gamma) r (I - xh xh^T / k): the mean term is missing (J, vjp, jvp)."""

    def _jacobian(self, cache):
        xh = cache.normalized
        diagonal = self._scale(xh.dtype) * cache.inv_std
        basis = xh[:, :, None]
        return jp.DiagonalLowRankJacobian(diagonal, -(diagonal / self.features)[:, :, None]
                                          * basis, basis)

    def _vjp(self, cache, g, need_input):
        gx = self._jacobian(cache)._vjp(g) if need_input else None
        return gx, self._param_grads(cache, g)

    def _jvp(self, cache, v):
        return self._jacobian(cache)._jvp(v)


class PerSampleBatchNorm(jp.BatchNorm):
    """Train-mode BatchNorm treated as per-sample: only the diagonal blocks, no coupling."""

    @property
    def couples_samples(self):
        return False

    def _diagonal_blocks(self, cache):
        scale = self._scale(cache.x.dtype) * cache.inv_std
        batch = max(cache.x.shape[0], 1)
        return scale * (1 - 1 / batch - cache.normalized ** 2 / batch)

    def _jacobian(self, cache):
        return DiagonalJacobian(self._diagonal_blocks(cache))

    def _vjp(self, cache, g, need_input):
        gx = g * self._diagonal_blocks(cache) if need_input else None
        return gx, self._param_grads(cache, g)

    def _jvp(self, cache, v):
        return v * self._diagonal_blocks(cache)


#: mutant class -> (where the bug is, assert_layer_correct checks that must fail)
EXPECTED = {
    WrongWeightGradConv: ("vjp", {"vjp vs jacobian"}),
    NoMeanLayerNorm: ("derivative", {"jacobian vs finite differences"}),
    PerSampleBatchNorm: ("coupling", {"batch independence"}),
}


def mutant_layer(mutant_cls, *, rng: np.random.Generator):
    """The mutant alone, with parameters away from their identity start, in train mode."""
    if issubclass(mutant_cls, jp.Conv2D):
        return mutant_cls(2, 3, 3, input_shape=(2, 4, 5), padding=1, rng=rng)
    layer = mutant_cls(6)
    layer.params["gamma"][...] = rng.uniform(0.5, 1.5, 6)
    layer.params["beta"][...] = rng.standard_normal(6)
    return layer


def network_with(mutant_cls, *, rng: np.random.Generator):
    """`Dense -> mutant -> Dense`, and the network's input width."""
    layer = mutant_layer(mutant_cls, rng=rng)
    width = layer.input_dim
    out = layer.output_dim(width)
    return jp.Sequential(jp.Dense(4, width, rng=rng), layer, jp.Dense(out, 3, rng=rng)), 4
