"""Hypothesis strategies for layers, networks, inputs and targets, all drawn from the registries.

Every layer comes from `jacobprop.LAYERS` and is built with its own
`Layer.example(input_dim, rng=..., dtype=...)`; every loss from
`jacobprop.LOSSES`, with targets from `Loss.example_target`. No list here can
drift from the registries: a newly registered layer is drawn the moment it is
registered.

Inputs keep clear of the places where finite differences mean nothing: every
input to a layer with kinks (`kinks`, or MaxPool2D's ties, measured by the layer's
`_kink_distance`) is far enough from each kink that no input or parameter moved
by less than `margin` carries it across (its distance is at
least `margin` times its largest derivative in the inputs and parameters, the
"gain"; the first layer's entries simply keep `margin`), and every input to a
layer with a `saturation` lies within `|z| <= saturation`. For a network this
holds at every depth, pre-activations included; entries that do not move at
all (gain 0, as behind a ReLU that is off) cannot cross a kink and are exempt.

The numpy part (`draw_input`, `kink_distances`) works without hypothesis and
is what `assert_layer_correct` uses when it draws its own inputs.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
from hypothesis import reject
from hypothesis import strategies as st

from ..layers.base import LAYERS, Layer
from ..losses import LOSSES, Loss
from ..network import Sequential

__all__ = [
    "DEFAULT_MARGIN",
    "NoValidInput",
    "LayerInputs",
    "flatten_layers",
    "checkable",
    "per_sample",
    "kink_distances",
    "input_problems",
    "draw_input",
    "seeds",
    "dtypes",
    "layers",
    "sequentials",
    "inputs",
    "losses",
    "targets",
]

#: Default distance kept between any live layer input and a kink of that layer.
#: Central differences step by about 6e-6 * max(1, |x|) in float64, so 1e-3
#: leaves a wide gap even after a few layers amplify the step.
DEFAULT_MARGIN = 1e-3

#: Input scales `inputs` draws from: small, unit and large activations.
DEFAULT_SCALES = (0.3, 1.0, 2.5)


class NoValidInput(ValueError):
    """No input clear of every kink and saturated region was found in the attempts allowed."""


class LayerInputs(NamedTuple):
    """What one kinked or saturating layer of a stack receives for an input `x`."""

    position: int  # index of the layer in `flatten_layers(net)`
    layer: Layer
    z: np.ndarray  # (B, w): the layer's input
    distance: np.ndarray  # (B, w): distance of z to the nearest kink (inf when none)
    gain: np.ndarray  # (B, w): max |dz/dx| and |dz/dvec(p)| over inputs and earlier params

    @property
    def live(self) -> np.ndarray:
        """`(B, w)` bool: False where `z` does not move with the input or any parameter."""
        return self.gain > 0


def flatten_layers(layer: Layer) -> list[Layer]:
    """The leaf layers of `layer` in the order they run (nested Sequentials expanded)."""
    if isinstance(layer, Sequential):
        return [leaf for inner in layer.layers for leaf in flatten_layers(inner)]
    return [layer]


def kink_distances(layer: Layer, x: np.ndarray) -> list[LayerInputs]:
    """The input of every leaf layer that declares kinks or a saturation, for input `x`.

    Parameters
    ----------
    layer : Layer
        A layer or a (nested) `Sequential`.
    x : ndarray `(B, n)`
        The input of `layer`.

    Returns
    -------
    list of LayerInputs
        One entry per leaf layer with kinks (`Layer.has_kinks`) or a
        `saturation`, in running order: its input `z` `(B, w)`, the layer's
        `_kink_distance(z)` (`min_k |z - kink_k|` for value kinks; for
        MaxPool2D's ties half the distance below the window's maximum; inf
        without kinks) and the `gain` of every entry.

    Notes
    -----
    The gain of `z[b, j]` is the largest entry of row `(b, j)` of the prefix
    Jacobian `dz/dx` `(B, w, n)` and of every prefix parameter Jacobian
    `dz/dvec(p)` `(B, w, p.size)`, all in absolute value (1 for the first
    layer, whose input is x). To first order, a perturbation of size h of
    one input or parameter moves `z[b, j]` by at most `gain * h`; an entry of
    gain 0 (behind a ReLU that is off, say) does not move at all.
    """
    leaves = flatten_layers(layer)
    found = []
    z = np.asarray(x)
    for position, leaf in enumerate(leaves):
        if leaf.has_kinks or type(leaf).saturation is not None:
            # The layer's own hook: value kinks, or MaxPool2D's ties (half the gap).
            distance = leaf._kink_distance(z)
            gain = np.ones(z.shape) if position == 0 else _gains(leaves[:position], x)
            found.append(LayerInputs(position, leaf, z, distance, gain))
        z = leaf._call_forward(leaf._check_input(z))[0]
    return found


def _gains(prefix: list[Layer], x: np.ndarray) -> np.ndarray:
    """`(B, w)`: the largest |derivative| of each prefix output in x and the prefix params."""
    net = Sequential(*prefix)
    _, cache = net._call_forward(net._check_input(x))
    gain = np.abs(net._call_jacobian(cache).to_dense()).max(axis=2, initial=0.0)
    for op in net._call_param_jacobians(cache).values():
        np.maximum(gain, np.abs(op.to_dense()).max(axis=2, initial=0.0), out=gain)
    return gain


def input_problems(layer: Layer, x: np.ndarray, margin: float = DEFAULT_MARGIN) -> list[str]:
    """Why `x` is a poor point for finite differences of `layer`; empty when it is fine.

    Each string names the leaf layer, the entry and the offending value.

    Notes
    -----
    `margin` is measured in units of the network's input and parameters: an
    entry `z` of a kinked layer's input must be at least `margin * gain` from
    every kink (see `kink_distances`), so no input or parameter moved by less
    than `margin` can carry it across, whatever the layers in between did to
    its scale. Entries of gain 0 never move and are never a problem. A live
    input of a saturating layer must satisfy `|z| <= saturation`.
    """
    problems = []
    for item in kink_distances(layer, x):
        cls = type(item.layer)
        near = _first_flagged(item, item.distance < margin * item.gain)
        if near is not None:
            where, gain = near
            kinks = cls.kinks if cls.kinks else "(a tie in its window)"
            problems.append(f"{where} is within {margin} * gain {gain:.3g} of a kink {kinks}")
        if cls.saturation is not None:
            beyond = _first_flagged(item, item.live & (np.abs(item.z) > cls.saturation))
            if beyond is not None:
                problems.append(f"{beyond[0]} is beyond the saturation |z| <= {cls.saturation}")
    return problems


def _first_flagged(item: LayerInputs, flagged: np.ndarray) -> tuple[str, float] | None:
    """The first entry of `item.z` marked in `flagged` `(B, w)`: where it is, and its gain."""
    if not flagged.any():
        return None
    b, j = np.argwhere(flagged)[0]
    where = f"layer {item.position} ({item.layer!r}): input [{b}, {j}] = {float(item.z[b, j])!r}"
    return where, float(item.gain[b, j])


def draw_input(
    layer: Layer,
    batch: int,
    *,
    rng: np.random.Generator,
    input_dim: int | None = None,
    dtype=np.float64,
    scale: float = 1.0,
    margin: float = DEFAULT_MARGIN,
    attempts: int = 32,
) -> np.ndarray:
    """A random input `(batch, n)` on which every layer input is clear of kinks and saturation.

    Parameters
    ----------
    layer : Layer
        A layer or a (nested) `Sequential`.
    batch : int
        Number of samples B.
    rng : numpy.random.Generator
    input_dim : int, optional
        The width n when `layer.input_dim` is None (a width-agnostic layer).
    dtype : floating dtype
    scale : float
        Standard deviation of the Gaussian entries.
    margin : float
        Least distance from a kink (see `input_problems`).
    attempts : int
        Draws before giving up with `NoValidInput`.

    Notes
    -----
    Entries of the first layer's input are pushed `2 * margin` from its kinks
    and clipped inside its saturation; deeper layers' inputs cannot be moved
    that way, so the whole input is redrawn until they are clear (rarely more
    than once: an entry lands within `margin * gain` of a kink with
    probability about `margin / scale`). The check runs in float64, before
    the cast to `dtype`.
    """
    width = layer.input_dim if layer.input_dim is not None else input_dim
    if width is None:
        raise ValueError(
            f"draw_input: {layer!r} takes any number of features; pass `input_dim`"
        )
    first = type(flatten_layers(layer)[0])
    for _ in range(attempts):
        x = scale * rng.standard_normal((batch, width))
        for kink in first.kinks:
            offset = x - kink
            close = np.abs(offset) < 2 * margin
            x[close] = kink + np.where(offset[close] < 0, -2 * margin, 2 * margin)
        if first.saturation is not None:
            np.clip(x, -0.9 * first.saturation, 0.9 * first.saturation, out=x)
        problems = input_problems(layer, x, margin)
        if not problems:
            return x.astype(dtype)
    raise NoValidInput(
        f"draw_input: no input of shape ({batch}, {width}) for {layer!r} kept every layer "
        f"input {margin} away from its kinks and inside its saturation in {attempts} draws; "
        f"last problem: {problems[0]}"
    )


# ---- hypothesis strategies -------------------------------------------------------
def seeds() -> st.SearchStrategy[int]:
    """Seeds for `numpy.random.default_rng`: examples build their arrays from one draw."""
    return st.integers(min_value=0, max_value=2**32 - 1)


def dtypes() -> st.SearchStrategy[np.dtype]:
    """float64 or float32."""
    return st.sampled_from([np.dtype(np.float64), np.dtype(np.float32)])


def _chosen(where: str, registry: dict, names) -> list[str]:
    """`names` checked against `registry` (`LAYERS` or `LOSSES`); all its names when None."""
    chosen = sorted(registry) if names is None else list(names)
    unknown = [name for name in chosen if name not in registry]
    if unknown or not chosen:
        title = "LAYERS" if registry is LAYERS else "LOSSES"
        raise ValueError(
            f"{where}: `names` must be a non-empty selection of jacobprop.{title} "
            f"{sorted(registry)}, got {names!r}"
        )
    return chosen


@st.composite
def layers(draw, input_dim: int | None = None, *, names=None, dtype=np.float64,
           max_dim: int = 5, coupled: bool = False) -> Layer:
    """A registered layer built with `Layer.example` (stochastic ones in eval mode).

    Parameters
    ----------
    input_dim : int, optional
        Features the layer must take; drawn from `1..max_dim` when None
        (width-agnostic layers ignore it; `inputs` draws their width).
    names : iterable of str, optional
        Restrict to these names of `jacobprop.LAYERS` (default: all of them,
        read at every draw, so a layer registered later is drawn too).
    dtype : floating dtype
    max_dim : int
    coupled : bool
        Keep layers that couple samples (train-mode BatchNorm) as their example
        builds them; by default they are switched to eval mode (`per_sample`), so
        every drawn layer has block-diagonal Jacobians, as most properties assume.
    """
    name = draw(st.sampled_from(_chosen("layers", LAYERS, names)))
    width = input_dim if input_dim is not None else draw(st.integers(1, max_dim))
    rng = np.random.default_rng(draw(seeds()))
    layer = checkable(LAYERS[name].example(width, rng=rng, dtype=dtype))
    return layer if coupled else per_sample(layer)


def _walk(layer: Layer):
    """`layer` and every layer inside it, through `Layer.sublayers()`."""
    yield layer
    for inner in layer.sublayers():
        yield from _walk(inner)


def checkable(layer: Layer) -> Layer:
    """`layer`, with every stochastic layer in it switched to eval mode.

    The checkers refuse a stochastic layer (a new mask per evaluation makes
    every difference quotient meaningless); in eval mode Dropout is the
    identity and checkable. Every layer the strategies draw goes through this.
    It reaches inside every composite (`Layer.sublayers()`: nested stacks,
    Residual blocks) and switches only the leaves that draw random numbers,
    so a train-mode BatchNorm beside a Dropout stays in train mode.
    """
    return _leaves_to_eval(layer, lambda leaf: leaf.stochastic)


def per_sample(layer: Layer) -> Layer:
    """`layer`, with every leaf that couples samples (train-mode BatchNorm) in eval mode."""
    return _leaves_to_eval(layer, lambda leaf: leaf.couples_samples)


def _leaves_to_eval(layer: Layer, chosen) -> Layer:
    """`layer`, with every leaf for which `chosen(leaf)` is True put in eval mode."""
    for inner in _walk(layer):
        if not inner.sublayers() and chosen(inner):
            inner.training = False
    return layer


@st.composite
def sequentials(draw, min_depth: int = 1, max_depth: int = 4, widths=(1, 5), *,
                names=None, dtype=np.float64, nested: bool = True,
                coupled: bool = False) -> Sequential:
    """A `Sequential` of `min_depth..max_depth` registered layers.

    Parameters
    ----------
    min_depth, max_depth : int
        Number of leaf layers.
    widths : (int, int)
        Range of the network's input width.
    names : iterable of str, optional
        Restrict the layers to these registry names.
    dtype : floating dtype
    nested : bool
        Sometimes wrap a run of layers in an inner `Sequential`, which must
        behave exactly like the flat stack.
    coupled : bool
        As for `layers`: keep train-mode BatchNorm coupling the samples.

    Notes
    -----
    The width is threaded through the stack: layer k is built with
    `example(width_k)` and `width_{k+1} = layer_k.output_dim(width_k)`, so a
    width-agnostic first layer still gets a definite width.
    """
    chosen = _chosen("sequentials", LAYERS, names)
    depth = draw(st.integers(min_depth, max_depth))
    width = draw(st.integers(*widths))
    rng = np.random.default_rng(draw(seeds()))
    stack = []
    for _ in range(depth):
        layer = LAYERS[draw(st.sampled_from(chosen))].example(width, rng=rng, dtype=dtype)
        layer = checkable(layer)
        stack.append(layer if coupled else per_sample(layer))
        width = layer.output_dim(width)
    if nested and depth >= 2 and draw(st.booleans()):
        start = draw(st.integers(0, depth - 2))
        stop = draw(st.integers(start + 2, depth))
        stack[start:stop] = [Sequential(*stack[start:stop])]
    return Sequential(*stack)


@st.composite
def inputs(draw, layer_or_net: Layer, batch: int | None = None, *, input_dim: int | None = None,
           dtype=np.float64, margin: float = DEFAULT_MARGIN, scales=DEFAULT_SCALES,
           max_batch: int = 4, max_dim: int = 5) -> np.ndarray:
    """An input `(B, n)` for `layer_or_net`, clear of every kink and saturated region.

    Parameters
    ----------
    layer_or_net : Layer
        A layer or (nested) `Sequential`.
    batch : int, optional
        B; drawn from `1..max_batch` when None.
    input_dim : int, optional
        n for a width-agnostic layer; drawn from `1..max_dim` when None.
    dtype : floating dtype
    margin : float
        See `input_problems`.
    scales : sequence of float
        Standard deviations to draw from.

    Notes
    -----
    The entries come from `numpy.random.default_rng(seed)` for a drawn seed
    (fast, and shrinking still reaches small seeds); see `draw_input` for how
    kinks and saturation are kept clear. An example for which no clear input
    turns up is rejected, which the registered layers make rare.
    """
    if batch is None:
        batch = draw(st.integers(1, max_batch))
    if layer_or_net.input_dim is None and input_dim is None:
        input_dim = draw(st.integers(1, max_dim))
    scale = draw(st.sampled_from(list(scales)))
    rng = np.random.default_rng(draw(seeds()))
    try:
        return draw_input(layer_or_net, batch, rng=rng, input_dim=input_dim, dtype=dtype,
                          scale=scale, margin=margin)
    except NoValidInput:
        reject()


@st.composite
def losses(draw, *, names=None, reductions=("mean", "sum")) -> Loss:
    """A registered loss (from `jacobprop.LOSSES`) with a drawn reduction."""
    cls = LOSSES[draw(st.sampled_from(_chosen("losses", LOSSES, names)))]
    return cls(reduction=draw(st.sampled_from(list(reductions))))


@st.composite
def targets(draw, loss: Loss, out_shape: tuple[int, int], *, dtype=np.float64):
    """A valid target for `loss` on outputs of shape `out_shape` `(B, m)`.

    Uses `loss.example_target`, so each loss class states its own valid
    targets (labels for SoftmaxCrossEntropy, `[0, 1]` for BinaryCrossEntropy).
    """
    rng = np.random.default_rng(draw(seeds()))
    return loss.example_target(tuple(out_shape), rng=rng, dtype=dtype)
