"""The layer protocol, its derived defaults and the layer registry.

A new layer owes `_forward` and `_jacobian` (and `_param_jacobians` if it has
parameters); `_vjp` and `_jvp` come from the Jacobian and are overridden only
to be faster. `_forward` returns `(y, cache)` whose cache carries the input as
`cache.x`; the first forward pass of each class checks it. Public methods
validate and delegate to the private ones; internal code (Sequential, the
checkers, the testing kit) calls `_call_<method>`, bound once per class to the
private method or to a subclass's public override (`jacobprop.dispatch`).
Two optional hooks, `_affine_param_change` and `_affine_input_columns`, let
the finite-difference checkers skip forward passes for affine layers; three
more, `_kink_crossed`, `_kink_rates` and `_kink_distance`, are the one kink
rule's view of a layer (they read `kinks` by default; MaxPool2D's ties and the
kinks inside a Residual block override them). `sublayers()` shows the layers
a composite is built from, so modes and the testing kit reach inside it.
"""

from __future__ import annotations

from typing import Any, ClassVar

import numpy as np

from ..dispatch import add_to_registry, is_standard, resolve_dispatch, standard
from ..errors import check_batch_matrix
from ..jacobian import Jacobian

__all__ = ["Layer", "LAYERS", "register_layer"]

#: Every registered layer class by name. The contract tests, the hypothesis
#: strategies and the CLI all read this one table.
LAYERS: dict[str, type[Layer]] = {}


def register_layer(cls: type[Layer]) -> type[Layer]:
    """Class decorator: add `cls` to `LAYERS` under its class name (a different class
    of the same name is refused)."""
    return add_to_registry(LAYERS, cls, "register_layer", "layer")


class Layer:
    """Base class of every layer (see DESIGN.md, "Layer protocol").

    Attributes
    ----------
    params : dict[str, ndarray]
        The live parameter arrays; `{}` for a parameter-free layer.
    kinks : tuple of float
        Input values at which an elementwise layer's derivative jumps (ReLU:
        `(0.0,)`). Finite-difference checks accept any slope between the
        one-sided ones there, and the test strategies keep inputs away.
    tie_kinks : bool
        The derivative jumps where two inputs are equal (MaxPool2D's ties);
        such a layer has a `tie_gaps(x)` method, and test inputs keep the
        gaps clear.
    saturation : float or None
        Beyond `|x| > saturation` the derivative is negligibly small, so
        relative finite-difference errors mean nothing; strategies stay inside.
    elementwise : bool
        Output j depends on input j only (the Jacobian is diagonal).
    """

    kinks: ClassVar[tuple[float, ...]] = ()
    #: The derivative jumps where two inputs tie (MaxPool2D: two maxima in a window),
    #: a kink no single input value describes; `tie_gaps(x)` on such a layer measures it.
    tie_kinks: ClassVar[bool] = False
    saturation: ClassVar[float | None] = None
    elementwise: ClassVar[bool] = False
    #: Train or eval mode (`Sequential.train()` / `.eval()` set it on every
    #: layer). Only layers whose maths changes with the mode read it.
    training: bool = True

    #: Internal code (Sequential, gradcheck, the testing kit, the derivative
    #: operators) calls a layer only through these `_call_*` names, resolved
    #: once per class: the private method, or the public one when a subclass
    #: overrides it (so an override is never bypassed). See `dispatch.py`.
    _DISPATCH: ClassVar[dict[str, str]] = {
        "forward": "_forward",
        "vjp": "_vjp",
        "jvp": "_jvp",
        "jacobian": "_jacobian",
        "param_jacobians": "_param_jacobians",
    }

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        resolve_dispatch(cls)
        _check_cache_once(cls)

    def __init__(self) -> None:
        self.params: dict[str, np.ndarray] = {}

    # ---- facts the tests and the network need ------------------------------
    @property
    def input_dim(self) -> int | None:
        """Features the layer expects, or None when it takes any width."""
        return None

    def output_dim(self, input_dim: int) -> int:
        """Features of the output for `input_dim` input features."""
        return input_dim

    @property
    def dtype(self) -> np.dtype | None:
        """The dtype of the parameters, or None for a parameter-free layer."""
        for value in self.params.values():
            return value.dtype
        return None

    @property
    def couples_samples(self) -> bool:
        """Whether output i depends on other samples than i (BatchNorm in train mode).

        Such a layer's Jacobian is not block-diagonal; every path that assumes
        independent samples (per-sample anything, finite-difference shortcuts
        that perturb all samples at once) reads this and falls back or refuses.
        """
        return False

    @property
    def stochastic(self) -> bool:
        """Whether a forward pass draws random numbers (Dropout in train mode).

        Finite-difference checks refuse such a layer with a clear error: a new
        draw per evaluation would make any difference quotient meaningless.
        """
        return False

    def config(self) -> dict[str, Any]:
        """The constructor's arguments as JSON values: `type(self).from_config(config())` rebuilds
        the layer (with fresh parameters, which `jp.load` then overwrites).

        A value that is itself a Layer (Residual's block, Sequential's layers)
        is serialized recursively by `jp.save`. `rng` is never part of it.
        """
        return {}

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> Layer:
        """The layer `config()` describes, with fresh parameters: `cls(**config)`."""
        return cls(**config)

    def state_arrays(self) -> dict[str, np.ndarray]:
        """Arrays the layer keeps outside `params` that a saved model must carry
        (BatchNorm's running statistics); `{}` for most layers. `jp.save` writes
        them, `jp.load` hands them back through `load_state_arrays`."""
        return {}

    def load_state_arrays(self, arrays: dict[str, np.ndarray]) -> None:
        """Take back what `state_arrays` gave (same names and shapes), in place."""
        if arrays:
            raise ValueError(f"{self._where}: keeps no state arrays, got {sorted(arrays)}")

    def sublayers(self) -> tuple[Layer, ...]:
        """The layers this one is built from, in running order (`()` for a leaf).

        `Sequential` gives its layers, `Residual` its block; a custom composite
        overrides it so that `Sequential.train()`/`.eval()` and the testing kit
        (`jacobprop.testing.checkable`) reach every layer inside it.
        """
        return ()

    def update_state(self, cache) -> None:
        """Write state that a train-mode forward computed into its cache (BatchNorm's
        running statistics). The forward pass never mutates a layer; only the
        training loop or an explicit call does. No-op for stateless layers.
        """

    @classmethod
    def example(cls, input_dim: int, *, rng: np.random.Generator, dtype=np.float64) -> Layer:
        """A small instance taking `input_dim` features, for tests and benchmarks."""
        return cls()

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"

    # ---- public protocol: validate, then compute ---------------------------
    def __call__(self, x) -> np.ndarray:
        return self.forward(x)[0]

    @standard
    def forward(self, x) -> tuple[np.ndarray, Any]:
        """`(y, cache)`: the output `(B, m)` and what the backward pass needs.

        The cache carries the input as `cache.x` (any object with that
        attribute; a NamedTuple is usual). The first forward pass of every
        class checks it, so a layer that forgets `x` fails there, by name.
        """
        return self._own_forward(self._check_input(x))

    @standard
    def vjp(self, cache, g) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """`(g @ dy/dx, {name: sum_i g_i @ dy_i/dvec(p) reshaped like p})` for `g` `(B, m)`."""
        g = self._check_cotangent(self._check_cache(cache, "vjp"), g)
        return self._vjp(cache, g, True)

    @standard
    def jvp(self, cache, v) -> np.ndarray:
        """`dy/dx @ v` per sample, `v` `(B, n)` -> `(B, m)`."""
        x = self._check_cache(cache, "jvp").x
        v = check_batch_matrix(
            v, where=self._where, name="v", features=x.shape[1], batch=x.shape[0]
        )
        return self._jvp(cache, v)

    @standard
    def jacobian(self, x_or_cache) -> Jacobian:
        """dy/dx as a batched structured operator `(B, m, n)`.

        Parameters
        ----------
        x_or_cache : array_like `(B, n)` or cache
            The input (the forward pass is run, as `Sequential.jacobian` does)
            or the cache of a forward pass already run.
        """
        return self._jacobian(self._cache_of(x_or_cache, "jacobian"))

    @standard
    def param_jacobians(self, x_or_cache) -> dict[str, Jacobian]:
        """dy/dvec(p) for every parameter p, each `(B, m, p.size)`; input or cache."""
        return self._param_jacobians(self._cache_of(x_or_cache, "param_jacobians"))

    # ---- adapters: how internal paths call a user's public override --------
    def _public_forward(self, x):
        return self.forward(x)

    def _public_vjp(self, cache, g, need_input):
        return self.vjp(cache, g)

    def _public_jvp(self, cache, v):
        return self.jvp(cache, v)

    def _public_jacobian(self, cache):
        return self.jacobian(cache)

    def _public_param_jacobians(self, cache):
        return self.param_jacobians(cache)

    # ---- defaults derived from the Jacobian ---------------------------------
    def _vjp(self, cache, g, need_input: bool):
        """Private vjp; `need_input=False` lets the first layer skip dL/dx."""
        gx = self._call_jacobian(cache)._call_vjp(g) if need_input else None
        grads = {
            name: jac._sum_vjp(g).reshape(self.params[name].shape)
            for name, jac in self._call_param_jacobians(cache).items()
        }
        return gx, grads

    def _jvp(self, cache, v):
        return self._call_jacobian(cache)._call_jvp(v)

    def _param_jacobians(self, cache) -> dict[str, Jacobian]:
        return {}

    def _forward(self, x):
        raise NotImplementedError(f"{type(self).__name__} must implement _forward")

    def _jacobian(self, cache) -> Jacobian:
        raise NotImplementedError(f"{type(self).__name__} must implement _jacobian")

    # ---- the kink rule's hooks (jacobprop.checks.kinks, jacobprop.testing) ------
    @property
    def has_kinks(self) -> bool:
        """Whether the derivative jumps somewhere: at input values (`kinks`) or at ties."""
        return bool(self.kinks) or self.tie_kinks

    def _kink_crossed(self, z: np.ndarray, z0: np.ndarray, reference=None) -> np.ndarray:
        """Mask, shaped like `z` `(..., w)`, of the entries that moved from `z0` onto or
        across a kink: the one test every checker applies to this layer's input.

        This default reads `kinks`: entry j crossed when `(z_j - k)` and `(z0_j - k)`
        differ in sign or the first is 0, and `z_j != z0_j`. A layer whose kinks
        are not input values (MaxPool2D's ties) overrides it. `reference`, for a
        composite with kinks inside (Residual), is a copy of the layer at the
        unperturbed parameters: its inner pass at `z0` is the base to compare with.
        """
        return _crossed_values(z, z0, self.kinks)

    def _kink_rates(self, z0: np.ndarray, zp: np.ndarray, zm: np.ndarray, crossed, h: float):
        """Bounds on the rates of the outputs a kink makes ambiguous, for the kink rule.

        Parameters
        ----------
        z0, zp, zm : ndarray `(B, w)`
            The input at `t = 0`, `+h` and `-h` along a perturbation.
        crossed : ndarray `(B, w)` bool
            `_kink_crossed` of `zp` or `zm` against `z0`.
        h : float

        Returns
        -------
        None or (kinked, lo, hi, evaluations)
            `kinked` `(B, m)` marks the outputs whose derivative along `t` depends
            on the convention at a kink; `lo`, `hi` `(count,)` bound `da_o/dt`
            for them in `np.argwhere(kinked)` order over every convention and
            both sides of `t = 0`; `evaluations` counts the forward rows spent.
            This default serves an elementwise layer (the rate `dz_c/dt` on
            either side times the activation's one-sided slopes at `z_c`,
            measured over the perturbation's reach); None (no split) otherwise.
        """
        if not self.elementwise:
            return None
        elements = np.argwhere(crossed)
        count = len(elements)
        sample, feature = elements.T
        pick = np.arange(count)
        rates = np.stack([(zp - z0)[sample, feature] / h, -(zm - z0)[sample, feature] / h])
        reach = np.maximum(np.abs(zp - z0), np.abs(zm - z0))[sample, feature]
        rows = np.repeat(z0[None], 2 * count, axis=0)
        rows[pick, sample, feature] += reach
        rows[count + pick, sample, feature] -= reach
        batch = z0.shape[0]
        out = self._call_forward(rows.reshape(2 * count * batch, -1))[0]
        out = out.reshape(2 * count, batch, -1)
        base = self._call_forward(z0)[0][sample, feature]
        slopes = np.stack([(out[pick, sample, feature] - base) / reach,
                           (base - out[count + pick, sample, feature]) / reach])
        products = np.stack([r * s for r in rates for s in slopes])
        return crossed, products.min(axis=0), products.max(axis=0), 2 * count + 1

    def _kink_distance(self, z: np.ndarray) -> np.ndarray:
        """`(B, w)`: how far each input entry may move (the others held) before it can
        reach a kink; inf where it cannot. The strategies keep it above `margin * gain`."""
        z = np.asarray(z, dtype=np.float64)
        if not self.kinks:
            return np.full(z.shape, np.inf)
        return np.abs(z[..., None] - np.asarray(self.kinks, dtype=np.float64)).min(axis=-1)

    # ---- hooks for cheap finite differences -------------------------------------
    def _affine_param_change(self, x: np.ndarray, name: str, coords: np.ndarray,
                             steps: np.ndarray):
        """How the output moves when single parameter entries move, if that is cheap to say.

        Parameters
        ----------
        x : ndarray `(B, n)`
            The (float64) input the layer is evaluated at.
        name : str
            A key of `params`.
        coords, steps : ndarray `(G,)`
            Perturbation g moves `params[name].flat[coords[g]]` by `steps[g]`.

        Returns
        -------
        None or (rows, delta)
            None (this default) means "no shortcut": the checkers evaluate the
            layer once per perturbation. A layer whose output is affine in
            every entry of `name` returns the output columns each perturbation
            changes and by how much, leaving every other output as it was:
            either `rows` `(G,)` ints with `delta` broadcastable to `(G, B)`
            (one column each: perturbation g changes `y[:, rows[g]]` by
            `delta[g]`; Dense: `W[j, k] + h` moves column j by `h x[:, k]`), or
            `rows` `(G, k)` of distinct columns with `delta` broadcastable to
            `(G, B, k)` (perturbation g changes `y[:, rows[g, c]]` by
            `delta[g, :, c]`; Conv2D: `W[o, c, i, j] + h` moves every position
            p of channel o by `h` times the patch entry `x[c, p + (i, j)]`).
            `jacobprop.checks.differences.affine_change_columns` reads both.
            The finite-difference checkers then never call the forward pass
            for these perturbations, so the rule must hold exactly for the
            layer's own forward.
        """
        return None

    def _own_forward_is(self, owner: type[Layer]) -> bool:
        """Whether this layer's forward pass (public and private) is `owner`'s own."""
        cls = type(self)
        return cls._forward is owner._forward and is_standard(cls, "forward")

    def _affine_input_columns(self, cols: np.ndarray):
        """`M[:, cols].T` `(G, m)` when `y = x @ M.T + c` with one `M` for every x; else None.

        None (this default) means "no shortcut". With columns given, a checker
        that moves input column `cols[g]` of every sample by `c` updates the
        output by `c M[:, cols[g]]` instead of calling the forward pass.
        """
        return None

    # ---- hooks for per-sample derivatives (jacobprop.derivatives) -------------
    def _input_vjp(self, cache, g) -> np.ndarray:
        """`g @ dy/dx` `(B, n)` alone: the vjp without the summed parameter gradients."""
        if self.params:
            return self._call_jacobian(cache)._call_vjp(g)
        return self._call_vjp(cache, g, True)[0]

    def _per_sample_grads(self, cache, g) -> dict[str, np.ndarray]:
        """`{name: (B, *p.shape)}`, row i `g_i @ dy_i/dvec(p)`: the vjp not summed over i.

        This default goes through the parameter Jacobians; layers override it
        with the direct formula (Dense: the outer products `g_i x_i^T`).
        """
        batch = g.shape[0]
        return {
            name: op._call_vjp(g).reshape((batch, *self.params[name].shape))
            for name, op in self._call_param_jacobians(cache).items()
        }

    def _per_sample_sq_norms(self, cache, g) -> np.ndarray | None:
        """`(B,)`: `sum_p ||g_i @ dy_i/dvec(p)||^2` without forming the rows; None if no params.

        The default asks each parameter Jacobian (`Jacobian._vjp_sq_norms`).
        """
        total = None
        for op in self._call_param_jacobians(cache).values():
            norms = op._vjp_sq_norms(g)
            total = norms if total is None else total + norms
        return total

    # ---- hooks for curvature (jacobprop.derivatives) --------------------------
    def _param_jvp(self, cache, tangents: dict[str, np.ndarray]) -> np.ndarray | None:
        """`sum_p dy/dvec(p) vec(tangents[p])` `(B, m)`: how y moves with the parameters.

        `tangents` maps each parameter name to an array of its shape (the same
        direction for every sample). None for a parameter-free layer. This
        default goes through the parameter Jacobians; layers override it with
        the direct formula (Dense: `x @ dW^T + db`).
        """
        total = None
        for name, op in self._call_param_jacobians(cache).items():
            direction = np.reshape(tangents[name], -1)
            moved = op._call_jvp(np.broadcast_to(direction, (op.batch_size, direction.size)))
            total = moved if total is None else total + moved
        return total

    def _second_vjp(self, cache, g, v, tangents, need_input: bool = True):
        """The second-derivative term of the R-operator (exact Hessian products).

        With `g` `(B, m)` the covector at this layer's output, `v` `(B, n)` the
        tangent of its input (None means zero) and `tangents` the parameter
        direction (name -> array of the parameter's shape), return
        `(d/de [g @ dy/dx](x + e v, p + e t), {name: d/de [sum_i g_i dy_i/dp]})`
        with `g` held fixed: the part of the differentiated vjp that is not
        the vjp of a new covector. `None` / missing keys mean zero;
        `need_input=False` (the first layer) lets the input part be skipped. A
        layer without it cannot take part in `jp.hessian` (the GGN does not
        need it).
        """
        raise NotImplementedError(
            f"{type(self).__name__} does not state its second derivative (`_second_vjp`), "
            "which exact Hessian products need; jp.ggn works without it"
        )

    # ---- validation ----------------------------------------------------------
    @property
    def _where(self) -> str:
        return type(self).__name__

    def _cache_of(self, x_or_cache, method: str):
        """The cache for `x_or_cache`: an input array runs the forward pass."""
        if isinstance(x_or_cache, (np.ndarray, list)):
            return self._call_forward(self._check_input(x_or_cache))[1]
        return self._check_cache(x_or_cache, method)

    def _check_cache(self, cache, method: str):
        x = getattr(cache, "x", None)
        if not isinstance(x, np.ndarray) or x.ndim != 2:
            raise TypeError(
                f"{self._where}.{method}: expected the input x (B, n) or the cache of "
                f"{self._where}.forward (carrying the input as `cache.x`), got "
                f"{type(cache).__name__}"
            )
        return cache

    def _check_input(self, x, where: str | None = None) -> np.ndarray:
        dtype = self.dtype or np.float64
        return check_batch_matrix(
            x, where=where or self._where, name="x", features=self.input_dim, dtype=dtype
        )

    def _check_cotangent(self, cache, g) -> np.ndarray:
        x = cache.x
        expected = (x.shape[0], self.output_dim(x.shape[1]))
        return check_batch_matrix(
            g, where=self._where, name="g", features=expected[1], batch=expected[0]
        )


def _crossed_values(z: np.ndarray, z0: np.ndarray, kinks) -> np.ndarray:
    """`Layer._kink_crossed` for kinks at input values: `z` `(..., w)` against `z0`."""
    hit = np.zeros(np.shape(z), dtype=bool)
    for kink in kinks:
        # sign(z - k) sign(z0 - k) <= 0, without taking the sign of the large array.
        hit |= (z - kink) * np.sign(z0 - kink) <= 0
    return hit & (z != z0)


def _first_forward(self, x):
    """The private forward pass, plus a check of the cache the first time a class runs it."""
    cls = type(self)
    y, cache = cls._forward(self, x)
    x_cached = getattr(cache, "x", None)
    if not isinstance(x_cached, np.ndarray) or x_cached.shape != np.shape(x):
        got = ("no attribute `x`" if x_cached is None
               else f"`cache.x` of shape {np.shape(x_cached)} for an input of shape "
                    f"{np.shape(x)}")
        raise TypeError(
            f"{cls.__name__}._forward must return (y, cache) whose cache carries the input "
            f"as `cache.x` (e.g. a NamedTuple with a field x: the backward pass and the "
            f"checkers read it); got a {type(cache).__name__} with {got}"
        )
    # Checked once: from now on this class calls its private forward directly.
    cls._own_forward = cls._forward
    if cls._call_forward is _first_forward:
        cls._call_forward = cls._forward
    return y, cache


def _check_cache_once(cls: type[Layer]) -> None:
    """Route the class's first forward pass through `_first_forward`."""
    cls._own_forward = _first_forward
    if cls._call_forward is cls._forward:
        cls._call_forward = _first_forward


resolve_dispatch(Layer)
_check_cache_once(Layer)
