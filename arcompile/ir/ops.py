"""IR op names and the registry of the high-level ``arc.*`` ops that passes create.

``aten.*`` ops are named after torch's OpOverloads (``op_name``, ``resolve_op``).

Each op registers a reference implementation written with torch ops; the reference
interpreter runs it and the tests compare every lowering against it. Later passes (attention,
norms, the KV cache) add their ops here with ``@register("arc.name")``.
"""

from __future__ import annotations

from typing import Callable

import torch

from arcompile.errors import UnsupportedOpError

_REFERENCE: dict[str, Callable] = {}


def register(op: str) -> Callable[[Callable], Callable]:
    def wrap(fn: Callable) -> Callable:
        _REFERENCE[op] = fn
        return fn
    return wrap


def reference_impl(op: str) -> Callable:
    """The reference implementation of ``op``. The ``arc.*`` ops register when
    ``arcompile.ir.opdefs`` is imported, which the interpreter does."""
    try:
        return _REFERENCE[op]
    except KeyError:
        raise UnsupportedOpError(f"op '{op}' has no reference implementation") from None


def known_ops() -> list[str]:
    return sorted(_REFERENCE)


def op_name(target: torch._ops.OpOverload) -> str:
    packet, overload = target._schema.name.split("::")[-1], target._overloadname
    ns = target.namespace
    return f"{ns}.{packet}" if overload == "default" else f"{ns}.{packet}.{overload}"


def resolve_op(name: str) -> torch._ops.OpOverload:
    """The torch OpOverload behind an IR op name such as ``aten.add.Tensor``."""
    parts = name.split(".")
    ns, packet = parts[0], parts[1]
    overload = parts[2] if len(parts) > 2 else "default"
    return getattr(getattr(getattr(torch.ops, ns), packet), overload)
