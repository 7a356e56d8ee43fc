"""`Sequential`: a stack of layers that is itself a layer.

The forward pass records a tape (one cache per layer). The backward pass
runs in one of two modes that must agree to rounding:

- `mode="vjp"`: chain each layer's vector-Jacobian product from `dL/dy`
  back to the first layer; no matrix is ever formed.
- `mode="jacobian"`: the chain rule as written on paper. The loss gives
  `dL/dy` as a `(B, 1, m)` operator; walking backward, each parameter's
  gradient is `sum_i (dL/dy_l @ dy_l/dvec(p))_i` and the covector moves on
  through `@ dy_l/dx_l`. `dense=True` materializes every block first.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np

from .dispatch import standard
from .errors import ShapeError, check_batch_matrix
from .jacobian import DenseCoupledJacobian, GeneralJacobian, Jacobian, _compose
from .layers.base import Layer
from .layers.pooling import Flatten
from .layers.spatial import SpatialLayer, ravel_images
from .losses import Loss, check_loss
from .plan import _multiply_planned, check_order, plan_chain

__all__ = ["Sequential", "SequentialCache"]

_MODES = ("vjp", "jacobian")


class SequentialCache(NamedTuple):
    x: np.ndarray  # (B, n) network input
    caches: tuple  # one cache per layer, in layer order
    y: np.ndarray  # (B, m) network output


class Sequential(Layer):
    """Layers applied in order: `y = f_L(... f_2(f_1(x)))`.

    Parameters
    ----------
    *layers : Layer
        The stack, first layer first. A `Sequential` may contain others.

    Notes
    -----
    `dy/dx = J_L @ ... @ J_1` with `J_l = dy_l/dx_l`, and for a parameter p of
    layer l, `dy/dvec(p) = J_L @ ... @ J_{l+1} @ dy_l/dvec(p)`. Parameters and
    gradients are keyed `"<layer index>.<name>"` in layer order.
    """

    def __init__(self, *layers: Layer):
        # No super().__init__(): `params` is a live property over the layers here.
        if len(layers) == 1 and isinstance(layers[0], (list, tuple)):
            layers = tuple(layers[0])
        if not layers:
            raise ValueError("Sequential: needs at least one layer")
        for index, layer in enumerate(layers):
            if not isinstance(layer, Layer):
                raise TypeError(
                    f"Sequential: layer {index} must be a jacobprop Layer, "
                    f"got {type(layer).__name__}"
                )
        self._layers = tuple(layers)
        self._input_shape, self._output_shape = self._infer_shapes()
        self._input_dim = self._check_widths()
        self._input_where = f"Sequential layer 0 ({type(self._layers[0]).__name__})"
        # Gradient keys are formatted once here, not on every backward pass.
        self._keys = tuple(
            {name: f"{index}.{name}" for name in layer.params}
            for index, layer in enumerate(self._layers)
        )

    def _infer_shapes(self) -> tuple:
        """Thread the per-sample image shape `(C, H, W)` through the stack.

        A spatial layer built without `input_shape` takes the previous layer's
        `output_shape` (and keeps it: one layer object, one geometry). A
        declared shape wins over the previous output shape: samples are raveled
        either way, so it reads the same numbers as an image of its own shape
        (a reshape); only the sizes must agree, which `_check_widths` checks.
        Layers that keep the width keep the shape (activations, normalization,
        Dropout, Residual); Flatten and layers that change the width end it.
        Returns the network's input shape (the first spatial layer's, when
        only layers of any width precede it) and its output shape, each
        `(C, H, W)` or None.
        """
        shape = first = None
        leading = True  # only width-keeping, non-spatial layers so far
        for index, layer in enumerate(self._layers):
            if isinstance(layer, (SpatialLayer, Sequential)):
                declared = layer.input_shape
                if isinstance(layer, SpatialLayer) and declared is None:
                    if shape is None:
                        raise ShapeError(
                            f"Sequential: layer {index} ({layer!r}) needs `input_shape=(C, H, "
                            f"W)`: no layer before it determines the image shape"
                        )
                    layer.bind_input_shape(shape)
                    declared = shape
                if leading:
                    first = declared
                leading = False
                shape = layer.output_shape
                continue
            ends = isinstance(layer, Flatten)
            width = None if shape is None else math.prod(shape)
            if width is not None and (ends or layer.output_dim(width) != width):
                shape = None
            # Only layers of any width may precede the one that fixes the network's input.
            leading = leading and not ends and layer.input_dim is None
        return first, shape

    @property
    def input_shape(self) -> tuple[int, int, int] | None:
        """The per-sample image shape `(C, H, W)` the network accepts as `(B, C, H, W)`."""
        return self._input_shape

    @property
    def output_shape(self) -> tuple[int, int, int] | None:
        """The per-sample image shape of the output, None once it is plain features."""
        return self._output_shape

    def _check_widths(self) -> int | None:
        """Check that consecutive layers fit; return the network's input width."""
        width = first = None
        for index, layer in enumerate(self._layers):
            expected = layer.input_dim
            if expected is not None:
                if width is not None and width != expected:
                    raise ShapeError(
                        f"Sequential: layer {index} ({layer!r}) expects {expected} input "
                        f"features, but layer {index - 1} produces {width}"
                    )
                if width is None and first is None:
                    first = expected
                width = expected
            if width is not None:
                width = layer.output_dim(width)
        return first

    # ---- container protocol ---------------------------------------------------
    @property
    def layers(self) -> tuple[Layer, ...]:
        return self._layers

    def sublayers(self) -> tuple[Layer, ...]:
        return self._layers

    def __len__(self) -> int:
        return len(self._layers)

    def __getitem__(self, index):
        if isinstance(index, slice):
            return Sequential(*self._layers[index])
        return self._layers[index]

    def __iter__(self):
        return iter(self._layers)

    def __repr__(self):
        inner = ",\n".join(f"  ({i}) {layer!r}" for i, layer in enumerate(self._layers))
        return f"Sequential(\n{inner}\n)"

    # ---- modes and state -----------------------------------------------------------
    def train(self, mode: bool = True) -> Sequential:
        """Set `training = mode` on this stack and every layer in it, reaching inside
        every composite through `Layer.sublayers()` (nested stacks, Residual blocks)."""
        self.training = bool(mode)
        _set_training(self._layers, bool(mode))
        return self

    def eval(self) -> Sequential:
        """Eval mode everywhere: `train(False)`."""
        return self.train(False)

    @property
    def couples_samples(self) -> bool:
        return any(layer.couples_samples for layer in self._layers)

    @property
    def stochastic(self) -> bool:
        return any(layer.stochastic for layer in self._layers)

    def update_state(self, cache: SequentialCache) -> None:
        """Write the state a train-mode forward computed (e.g. BatchNorm's running
        statistics) from `cache` into the layers; the forward pass never does."""
        for layer, layer_cache in zip(self._layers, cache.caches, strict=True):
            layer.update_state(layer_cache)

    @classmethod
    def from_config(cls, config: dict) -> Sequential:
        # The constructor takes the layers positionally.
        return cls(*config["layers"])

    def config(self) -> dict:
        return {"layers": list(self._layers)}

    @property
    def params(self) -> dict[str, np.ndarray]:
        """The live parameter arrays (no copies), keyed `"<index>.<name>"`, in layer order."""
        return {
            keys[name]: value
            for layer, keys in zip(self._layers, self._keys, strict=True)
            for name, value in layer.params.items()
        }

    @property
    def input_dim(self):
        return self._input_dim

    def output_dim(self, input_dim):
        for layer in self._layers:
            input_dim = layer.output_dim(input_dim)
        return input_dim

    @property
    def dtype(self):
        for layer in self._layers:
            if layer.dtype is not None:
                return layer.dtype
        return None

    # ---- the layer protocol -------------------------------------------------------
    def _check_input(self, x, where=None):
        # The parameter dtype matters only to promote integer input; float input
        # (every hot loop) skips looking it up.
        if self._input_shape is not None and isinstance(x, np.ndarray) and x.ndim == 4:
            x = ravel_images(x, self._input_shape, where or self._input_where)
        is_float = isinstance(x, np.ndarray) and x.dtype.kind == "f"
        return check_batch_matrix(
            x, where=where or self._input_where, name="x", features=self._input_dim,
            dtype=np.float64 if is_float else (self.dtype or np.float64),
        )

    def _forward(self, x):
        caches = []
        for layer in self._layers:
            x, cache = layer._call_forward(x)
            caches.append(cache)
        return x, SequentialCache(caches[0].x, tuple(caches), x)

    def _vjp(self, cache, g, need_input):
        caches = cache.caches
        per_layer = [None] * len(self._layers)
        for index in range(len(self._layers) - 1, -1, -1):
            g, per_layer[index] = self._layers[index]._call_vjp(
                caches[index], g, need_input or index > 0
            )
        return g, self._collect(enumerate(per_layer))

    def _jvp(self, cache, v):
        for layer, layer_cache in zip(self._layers, cache.caches, strict=True):
            v = layer._call_jvp(layer_cache, v)
        return v

    def _jacobian(self, cache, order="auto"):
        ops = self._jacobian_ops(cache)
        # Planned once per structures and shapes (cached); the layers' own
        # operators compose by construction, so no shape checks per product.
        return _multiply_planned(ops, plan_chain(ops, order, forward=True))

    def _jacobian_ops(self, cache) -> list[Jacobian]:
        """The layers' dy/dx operators, output side first (`J_L, ..., J_1`)."""
        return [
            layer._call_jacobian(c) for layer, c in zip(self._layers, cache.caches, strict=True)
        ][::-1]

    def _param_jacobians(self, cache):
        # dy/dvec(p) = (J_L @ ... @ J_{l+1}) @ dy_l/dvec(p): keep the running
        # suffix product, built from the output side.
        suffix = None
        per_layer = []
        for index in range(len(self._layers) - 1, -1, -1):
            layer, layer_cache = self._layers[index], cache.caches[index]
            own = layer._call_param_jacobians(layer_cache)
            per_layer.append(
                (index, {name: op if suffix is None else suffix @ op for name, op in own.items()})
            )
            if index > 0:
                step = layer._call_jacobian(layer_cache)
                suffix = step if suffix is None else suffix @ step
        return self._collect(reversed(per_layer))

    # ---- hooks of jacobprop.derivatives: layer by layer, never the stack's Jacobian ----
    # Whole networks are walked leaf by leaf in jacobprop.derivatives; these let a
    # stack used as a layer (a Residual block) answer the same hooks as any layer.
    def _input_vjp(self, cache, g):
        from .derivatives import _block_input_vjp

        return _block_input_vjp(self, cache, g)

    def _per_sample_grads(self, cache, g):
        from .derivatives import _block_per_sample

        return _block_per_sample(self, cache, g, norms=False)

    def _per_sample_sq_norms(self, cache, g):
        from .derivatives import _block_per_sample

        return _block_per_sample(self, cache, g, norms=True)

    def _param_jvp(self, cache, tangents):
        from .derivatives import _block_param_jvp

        return _block_param_jvp(self, cache, tangents)

    def _second_vjp(self, cache, g, v, tangents, need_input=True):
        from .derivatives import _block_second_vjp

        return _block_second_vjp(self, cache, g, v, tangents, need_input)

    def _collect(self, per_layer) -> dict:
        """Merge per-layer dicts into one keyed `"<index>.<name>"`, in layer order."""
        merged = {}
        for index, values in per_layer:
            keys = self._keys[index]
            for name, value in values.items():
                merged[keys[name]] = value
        return merged

    def _check_cotangent(self, cache, g):
        expected = cache.y.shape
        return check_batch_matrix(
            g, where="Sequential", name="g", features=expected[1], batch=expected[0]
        )

    # ---- the public network API ------------------------------------------------------
    @standard
    def jacobian(self, x_or_cache, order: str = "auto", *, max_bytes: int | None = None
                 ) -> Jacobian:
        """The full input-output Jacobian dy/dx, `(B, m, n)`.

        Parameters
        ----------
        x_or_cache : ndarray `(B, n)` or SequentialCache
            The input (the forward pass is run) or the cache of one already run.
        order : {"auto", "forward", "reverse"}
            Product order of `J_L @ ... @ J_1`: "forward" starts from the inputs
            (cost grows with the input width), "reverse" from the outputs (grows
            with the output width), "auto" picks the cheapest parenthesization
            for the structures at hand (shared, diagonal, ...). The choice is
            planned once per structures and shapes and cached.
        max_bytes : int, optional
            Bound the predicted peak memory: the batch is processed in pieces
            (each with its own forward pass; with a cache, from `cache.x`) and
            the result is one dense `(B, m, n)` operator. Refused for networks
            whose samples interact (`couples_samples`).

        Returns
        -------
        Jacobian
            Its `plan` attribute (`jacobprop.plan.ChainPlan`) holds the order
            chosen, the predicted flops and the predicted peak bytes.
        """
        check_order(order, where="Sequential.jacobian")
        if max_bytes is not None:
            from .derivatives import jacobian_in_pieces

            x = (x_or_cache.x if isinstance(x_or_cache, SequentialCache)
                 else self._check_input(x_or_cache))
            return jacobian_in_pieces(self, x, order, max_bytes)
        if isinstance(x_or_cache, SequentialCache):
            cache = x_or_cache
        else:
            _, cache = self._forward(self._check_input(x_or_cache))
        return self._jacobian(cache, order)

    def jacobian_cost(self, x_or_cache, order: str = "auto") -> int:
        """The flop estimate the plan assigns to `jacobian(x, order)`."""
        check_order(order, where="Sequential.jacobian_cost")
        if isinstance(x_or_cache, SequentialCache):
            cache = x_or_cache
        else:
            _, cache = self._forward(self._check_input(x_or_cache))
        return plan_chain(self._jacobian_ops(cache), order).flops

    def param_jacobian(self, x) -> Jacobian:
        """dy_i/dtheta over the flat parameters (`params` order, each C-order), `(B, m, P)`.

        A structured operator (see `jacobprop.derivatives.ParamJacobian`);
        `to_dense()` materializes it.
        """
        from .derivatives import param_jacobian

        return param_jacobian(self, x)

    def per_sample_grad_norms(self, x, t, loss: Loss) -> np.ndarray:
        """`(B,)`: each sample's gradient norm over all parameters, never materialized.

        The per-sample gradients are those of `value_and_grad(..., per_sample=True)`
        (including the loss's reduction weight).
        """
        from .derivatives import per_sample_grad_norms

        return per_sample_grad_norms(self, x, t, loss)

    def value_and_grad(self, x, t, loss: Loss, mode: str = "vjp", dense: bool = False, *,
                       per_sample: bool = False):
        """`(L, grads)`: the loss value and `dL/dp` for every parameter.

        Parameters
        ----------
        x : ndarray `(B, n)`
        t : target in the form `loss` takes
        loss : Loss
        mode : {"vjp", "jacobian"}
            "vjp" chains vector-Jacobian products (fast, no matrices); "jacobian"
            multiplies the layers' Jacobian operators backward with `@`.
        dense : bool
            With mode="jacobian", materialize every block as a `(B, m, n)`
            array first (slow; for teaching and cross-checking).
        per_sample : bool
            Give every gradient a leading batch axis `(B, *p.shape)`: sample i's
            share of `dL/dp` (the loss's reduction weight included), so they
            sum to the batch gradient. Needs mode="vjp" and a separable loss;
            refused for networks whose samples interact.

        Returns
        -------
        value : float
        grads : dict[str, ndarray]
            Same keys, order and shapes as `params`. Nothing is written to the
            layers: a failed call leaves every parameter as it was.
        """
        if mode not in _MODES:
            raise ValueError(f"Sequential.value_and_grad: `mode` must be one of {_MODES}, "
                             f"got {mode!r}")
        if dense and mode != "jacobian":
            raise ValueError("Sequential.value_and_grad: `dense=True` materializes the "
                             f"Jacobian blocks of mode='jacobian'; it has no effect with "
                             f"mode={mode!r}")
        check_loss(loss, where="Sequential.value_and_grad")
        if per_sample:
            if mode != "vjp" or dense:
                raise ValueError("Sequential.value_and_grad: per_sample=True works with "
                                 f"mode='vjp' and dense=False, got mode={mode!r}, "
                                 f"dense={dense!r}")
            from .derivatives import per_sample_value_and_grad

            return per_sample_value_and_grad(self, x, t, loss)
        y, cache = self._forward(self._check_input(x))
        # `y` comes from our own forward pass: only the target needs checking.
        value, g = loss._call_value_and_grad(y, loss._validated_target(y, t))
        if mode == "vjp":
            return value, self._vjp(cache, g, False)[1]
        return value, self._backward_by_jacobians(cache, GeneralJacobian(g[:, None, :]), dense)

    def _backward_by_jacobians(self, cache, covector: Jacobian, dense: bool) -> dict:
        # Shapes fit by construction here, so `_compose` (what `@` calls after
        # its checks) is used directly.
        # A coupled operator (train-mode BatchNorm) stays coupled: its dense form is
        # (B, m, B, n), and composing or summing it keeps both batch axes.
        def materialize(op):
            if not dense:
                return op
            if op.couples_samples:
                return DenseCoupledJacobian(op.to_dense())
            return GeneralJacobian(op.to_dense())

        covector = materialize(covector)
        per_layer = [None] * len(self._layers)
        for index in range(len(self._layers) - 1, -1, -1):
            layer, layer_cache = self._layers[index], cache.caches[index]
            grads = per_layer[index] = {}
            for name, op in layer._call_param_jacobians(layer_cache).items():
                summed = _compose(covector, materialize(op)).batch_sum()
                grads[name] = summed.reshape(layer.params[name].shape)
            if index > 0:
                covector = _compose(covector, materialize(layer._call_jacobian(layer_cache)))
        return self._collect(enumerate(per_layer))

    # ---- seeing the chain rule ------------------------------------------------------
    def explain(self, x, t=None, loss: Loss | None = None, *, values: bool = False):
        """A trace of the backward pass of `loss` at `x` (or of `jacobian(x)` without one).

        Every step in the order it runs: the operator multiplied (structure
        and shape), its storage against dense blocks, the engine's flop
        estimate, and the parameter gradient read off there. `values=True`
        records sample 0's matrices. See `jacobprop.explain.explain`.

        Returns
        -------
        jacobprop.explain.Trace
            `str()` is a table; `.to_dict()` / `.to_json()` are plain data.
        """
        from .explain import explain  # explain builds on this module

        return explain(self, x, t, loss, values=values)


def _set_training(layers, mode: bool) -> None:
    """`training = mode` on `layers` and, through `sublayers()`, on everything inside."""
    for layer in layers:
        layer.training = mode
        _set_training(layer.sublayers(), mode)
