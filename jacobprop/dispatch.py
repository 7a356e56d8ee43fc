"""Public overrides are obeyed: one dispatch table per class, resolved at definition.

Every extensible class (Layer, Loss, Jacobian) has public methods that
validate and delegate to private ones (scipy's `matvec` -> `_matvec`). The
private ones are the documented extension points, but a subclass may still
override a public method; every internal path must then call the override.

Internal code therefore never calls `_vjp` (say) directly, but `_call_vjp`,
which `resolve_dispatch` binds once per class: to the private method when the
public one is the library's own validating wrapper (marked `@standard`), or
to an adapter that calls the user's public override. Resolving at class
definition costs nothing per call, which matters on the vjp hot path.
"""

from __future__ import annotations

from collections.abc import Callable

__all__ = ["standard", "resolve_dispatch", "add_to_registry"]


def standard(method: Callable) -> Callable:
    """Mark a public method as the library's validate-then-delegate wrapper."""
    method._jacobprop_standard = True
    return method


def is_standard(cls: type, public: str) -> bool:
    """Whether `cls.<public>` is a library wrapper (not a user's override)."""
    return getattr(getattr(cls, public), "_jacobprop_standard", False)


def resolve_dispatch(cls: type) -> None:
    """Bind `cls._call_<name>` for every entry of `cls._DISPATCH`.

    `_DISPATCH` maps a public name to its private twin. An adapter for an
    overridden public method is looked up on the class as `_public_<name>`
    (each base class defines how the private signature maps onto the public
    one, e.g. Layer's vjp drops `need_input`).
    """
    for public, private in cls._DISPATCH.items():
        if is_standard(cls, public):
            target = getattr(cls, private)
        else:
            target = getattr(cls, f"_public_{public}")
        setattr(cls, f"_call_{public}", target)


def add_to_registry(table: dict, cls: type, decorator: str, kind: str) -> type:
    """Add `cls` to a registry `table` under its class name; a second, different class
    of that name is refused (a silent overwrite would change what every registry-driven
    test, strategy and CLI name means)."""
    name = cls.__name__
    if name in table and table[name] is not cls:
        raise ValueError(f"{decorator}: a different {kind} named {name!r} is registered")
    table[name] = cls
    return cls
