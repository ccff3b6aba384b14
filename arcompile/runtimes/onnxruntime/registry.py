"""The table of ONNX lowerings: one entry per IR op ("backends are tables", STYLE.md #11).

A lowering is ``fn(ctx, node) -> name | list[name | None] | None``: it emits ONNX nodes through
the ``LowerContext`` and returns the ONNX names that hold the IR node's outputs, in order
(``None`` for an op with no outputs, such as an assert). Ops register with
``@lowering("aten.add.Tensor", ...)``; later passes register their ``arc.*`` ops the same way.
"""

from __future__ import annotations

from typing import Callable

_TABLE: dict[str, Callable] = {}

# Nodes the driver handles itself rather than through the table.
STRUCTURAL_OPS = ("arc.input", "arc.constant")


def lowering(*ops: str) -> Callable[[Callable], Callable]:
    """Register ``fn`` as the lowering of every op in ``ops``."""
    def wrap(fn: Callable) -> Callable:
        for op in ops:
            if op in _TABLE:
                raise ValueError(f"op '{op}' already has an ONNX lowering ({_TABLE[op].__name__})")
            _TABLE[op] = fn
        return fn
    return wrap


def lowering_for(op: str) -> Callable | None:
    return _TABLE.get(op)


def supported_ops() -> list[str]:
    """Every op this backend lowers, sorted (graph inputs and constants included)."""
    return sorted([*_TABLE, *STRUCTURAL_OPS])
