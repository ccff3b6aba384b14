"""Registry of the high-level ``arc.*`` ops that passes create.

Each op registers a reference implementation written with torch ops; the reference
interpreter runs it and the tests compare every lowering against it. Later passes (attention,
norms, the KV cache) add their ops here with ``@register("arc.name")``.
"""

from __future__ import annotations

from typing import Callable

from arcompile.errors import UnsupportedOpError

_REFERENCE: dict[str, Callable] = {}


def register(op: str) -> Callable[[Callable], Callable]:
    def wrap(fn: Callable) -> Callable:
        _REFERENCE[op] = fn
        return fn
    return wrap


def reference_impl(op: str) -> Callable:
    import arcompile.ir.opdefs  # noqa: F401  (registers the arc.* ops on first use)

    try:
        return _REFERENCE[op]
    except KeyError:
        raise UnsupportedOpError(f"op '{op}' has no reference implementation") from None


def known_ops() -> list[str]:
    return sorted(_REFERENCE)
