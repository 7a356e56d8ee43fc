"""Residual connection around any block: `y = x + block(x)`."""

from __future__ import annotations

from collections.abc import Iterator, MutableMapping
from typing import NamedTuple

import numpy as np

from ..jacobian import IdentityJacobian
from .base import Layer, register_layer

__all__ = ["Residual"]


class ResidualCache(NamedTuple):
    x: np.ndarray  # (B, n) input
    block: object  # the block's own cache


class _BlockParams(MutableMapping):
    """The block's live parameters under the block's own keys; assignment writes through.

    Setting `"0.W"` replaces `params["W"]` of the block's layer 0, so code that
    swaps a parameter array (a dtype cast, `jp.load`) reaches the real layer.
    """

    def __init__(self, block: Layer):
        self._block = block

    def __getitem__(self, key):
        return self._block.params[key]

    def __setitem__(self, key, value):
        if key not in self._block.params:
            raise KeyError(f"Residual: the block has no parameter {key!r}")
        _assign(self._block, key, value)

    def __delitem__(self, key):
        raise TypeError("Residual: parameters cannot be deleted")

    def __iter__(self) -> Iterator[str]:
        return iter(self._block.params)

    def __len__(self) -> int:
        return len(self._block.params)


def _assign(layer: Layer, key: str, value) -> None:
    """Set the parameter `key` (as `layer.params` names it) in the leaf layer that owns it."""
    from ..network import Sequential  # the network module imports the layers

    if isinstance(layer, Residual):
        _assign(layer.block, key, value)
    elif isinstance(layer, Sequential):
        index, _, rest = key.partition(".")
        _assign(layer.layers[int(index)], rest, value)
    else:
        layer.params[key] = value


@register_layer
class Residual(Layer):
    """`y = x + block(x)` for a block whose output width equals its input width.

    Parameters
    ----------
    block : Layer
        Any layer, typically a `Sequential`.

    Notes
    -----
    `dy/dx = I + J_block` (the block's structured Jacobian plus an identity;
    coupled if the block couples samples); the vjp is `g + vjp_block(g)`.
    Parameters are the block's, under the block's keys, so inside a network
    the key reads `"<index>.<key inside block>"` (`"1.0.W"` for a
    `Sequential` block at index 1); their Jacobians are the block's.
    """

    def __init__(self, block: Layer):
        # No super().__init__(): `params` is a live view of the block's parameters.
        if not isinstance(block, Layer):
            raise TypeError(f"Residual: `block` must be a jacobprop Layer, "
                            f"got {type(block).__name__}")
        width = block.input_dim
        if width is not None and block.output_dim(width) != width:
            raise ValueError(f"Residual: the block must keep the width, but {block!r} maps "
                             f"{width} features to {block.output_dim(width)}")
        self.block = block

    @classmethod
    def example(cls, input_dim, *, rng, dtype=np.float64):
        from ..network import Sequential  # the network module imports the layers
        from .activations import Tanh
        from .dense import Dense

        return cls(Sequential(Dense(input_dim, input_dim, rng=rng, dtype=dtype), Tanh()))

    def config(self):
        return {"block": self.block}

    def __repr__(self):
        return f"Residual({self.block!r})"

    @property
    def params(self) -> MutableMapping:
        return _BlockParams(self.block)

    @property
    def training(self) -> bool:
        return self.block.training

    @training.setter
    def training(self, mode: bool) -> None:
        from ..network import Sequential  # the network module imports the layers

        if isinstance(self.block, Sequential):
            self.block.train(mode)
        else:
            self.block.training = bool(mode)

    @property
    def couples_samples(self) -> bool:
        return self.block.couples_samples

    @property
    def stochastic(self) -> bool:
        return self.block.stochastic

    @property
    def input_dim(self):
        return self.block.input_dim

    def output_dim(self, input_dim):
        return input_dim

    @property
    def dtype(self):
        return self.block.dtype

    def sublayers(self):
        return (self.block,)

    # ---- kinks inside the block (the kink rule's hooks, see Layer) -------------------
    @property
    def has_kinks(self) -> bool:
        return any(inner.has_kinks for inner in _chain(self.block))

    def _kink_crossed(self, z, z0, reference=None):
        """A kink inside the block: its layers run on `z` `(..., B, n)` (with the current
        parameters) and on `z0` `(B, n)` (with `reference`'s, the unperturbed ones, when
        given), and each kinked one's own hook says whether its input crossed. The first
        entry of every sample that reached one is marked (the checkers read which samples
        did); there is no interval split through a block, only the one-sided bracket."""
        hit = np.zeros(np.shape(z), dtype=bool)
        batch = z0.shape[0]
        current, base = np.reshape(z, (-1, batch, z0.shape[1])), z0
        chain = _chain(self.block)
        bases = _chain((reference if reference is not None else self).block)
        for inner, at_base in zip(chain, bases, strict=True):
            if inner.has_kinks:
                reached = inner._kink_crossed(current, base).any(axis=-1)
                hit[..., 0] |= reached.reshape(hit.shape[:-1])
            current = np.stack([inner._call_forward(rows)[0] for rows in current])
            base = at_base._call_forward(base)[0]
        return hit

    def _kink_rates(self, z0, zp, zm, crossed, h):
        """For every output of a sample that reached a kink inside the block, `do_c/dt =
        dz_c/dt + d block_c/dt`: the first from the step on either side, the second bounded
        over every convention by the interval chain rule run through the block's own
        layers (`jacobprop.checks.kinks`); the one-sided slopes where it finds no kink."""
        from ..checks.differences import _Evaluator, _flatten  # the checks import layers
        from ..checks.kinks import _kink_interval, _Output
        from ..checks.tolerance import _SPLIT_BUDGET

        samples = np.flatnonzero(crossed.any(axis=1))
        width = z0.shape[1]
        kinked = np.zeros((z0.shape[0], width), dtype=bool)
        kinked[samples] = True
        ev = _Evaluator(_flatten(self.block, ""), z0)
        out0 = ev.acts[-1]
        budget = [_SPLIT_BUDGET // 4]
        lo, hi = [], []
        for sample in samples:
            for c in range(width):
                rates = ((zp - z0)[sample, c] / h, -(zm - z0)[sample, c] / h)
                found = _kink_interval(ev, _Output(out0, sample, c), 0, zp, zm, h, budget)
                if found is None:
                    ends = [(ev.run(0, zp[None])[0][0, sample, c] - out0[sample, c]) / h,
                            (out0[sample, c] - ev.run(0, zm[None])[0][0, sample, c]) / h]
                    found = (min(ends), max(ends))
                lo.append(min(rates) + found[0])
                hi.append(max(rates) + found[1])
        return kinked, np.array(lo), np.array(hi), _SPLIT_BUDGET // 4 - budget[0]

    def update_state(self, cache) -> None:
        self.block.update_state(cache.block)

    def _forward(self, x):
        out, cache = self.block._call_forward(x)
        return x + out, ResidualCache(x, cache)

    def _vjp(self, cache, g, need_input):
        gx, grads = self.block._call_vjp(cache.block, g, True)
        return (g + gx if need_input else None), grads

    def _jvp(self, cache, v):
        return v + self.block._call_jvp(cache.block, v)

    def _jacobian(self, cache):
        x = cache.x
        return self.block._call_jacobian(cache.block) + IdentityJacobian(*x.shape, x.dtype)

    def _param_jacobians(self, cache):
        return self.block._call_param_jacobians(cache.block)

    # ---- hooks of jacobprop.derivatives: the block's, as y - x = block(x) ----
    # (a Sequential block answers these layer by layer itself)
    def _input_vjp(self, cache, g):
        return g + self.block._input_vjp(cache.block, g)

    def _per_sample_grads(self, cache, g):
        return self.block._per_sample_grads(cache.block, g)

    def _per_sample_sq_norms(self, cache, g):
        return self.block._per_sample_sq_norms(cache.block, g)

    def _param_jvp(self, cache, tangents):
        return self.block._param_jvp(cache.block, tangents)

    def _second_vjp(self, cache, g, v, tangents, need_input=True):
        # The identity path is linear: the whole second-order term is the block's.
        return self.block._second_vjp(cache.block, g, v, tangents, need_input)


def _chain(block: Layer) -> list[Layer]:
    """The layers `block` runs one after the other: a (nested) Sequential's, else itself."""
    from ..network import Sequential  # the network module imports the layers

    if isinstance(block, Sequential):
        return [leaf for inner in block.layers for leaf in _chain(inner)]
    return [block]
