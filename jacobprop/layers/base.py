"""The layer protocol, its derived defaults and the layer registry.

A new layer owes `_forward` and `_jacobian` (and `_param_jacobians` if it has
parameters); `_vjp` and `_jvp` come from the Jacobian and are overridden only
to be faster. Public methods validate and delegate to the private ones, which
`Sequential` calls directly once the network input has been checked.
"""

from __future__ import annotations

from typing import Any, ClassVar

import numpy as np

from ..dispatch import resolve_dispatch, standard
from ..errors import check_batch_matrix
from ..jacobian import Jacobian

__all__ = ["Layer", "LAYERS", "register_layer"]

#: Every registered layer class by name. The contract tests, the hypothesis
#: strategies and the CLI all read this one table.
LAYERS: dict[str, type[Layer]] = {}


def register_layer(cls: type[Layer]) -> type[Layer]:
    """Class decorator: add `cls` to `LAYERS` under its class name."""
    name = cls.__name__
    if name in LAYERS and LAYERS[name] is not cls:
        raise ValueError(f"register_layer: a different layer named {name!r} is registered")
    LAYERS[name] = cls
    return cls


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
        """The constructor's arguments as JSON values: `type(self)(**config())` rebuilds
        the layer (with fresh parameters, which `jp.load` then overwrites).

        A value that is itself a Layer (Residual's block, Sequential's layers)
        is serialized recursively by `jp.save`. `rng` is never part of it.
        """
        return {}

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
        """`(y, cache)`: the output `(B, m)` and what the backward pass needs."""
        return self._forward(self._check_input(x))

    @standard
    def vjp(self, cache, g) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """`(g @ dy/dx, {name: sum_i g_i @ dy_i/dvec(p) reshaped like p})` for `g` `(B, m)`."""
        g = self._check_cotangent(cache, g)
        return self._vjp(cache, g, True)

    @standard
    def jvp(self, cache, v) -> np.ndarray:
        """`dy/dx @ v` per sample, `v` `(B, n)` -> `(B, m)`."""
        x = cache.x
        v = check_batch_matrix(
            v, where=self._where, name="v", features=x.shape[1], batch=x.shape[0]
        )
        return self._jvp(cache, v)

    @standard
    def jacobian(self, cache) -> Jacobian:
        """dy/dx as a batched structured operator `(B, m, n)`."""
        return self._jacobian(cache)

    @standard
    def param_jacobians(self, cache) -> dict[str, Jacobian]:
        """dy/dvec(p) for every parameter p, each `(B, m, p.size)`."""
        return self._param_jacobians(cache)

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

    # ---- validation ----------------------------------------------------------
    @property
    def _where(self) -> str:
        return type(self).__name__

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


resolve_dispatch(Layer)
