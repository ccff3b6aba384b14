"""Small tools that fusion patterns share: a match result that says why it failed, and walks
up the producers of a value through the ops that do not change its numbers.

    m = Match()
    mean = producer(x, "aten.mean.dim")
    if mean is None:
        return m.fail("input is not a mean over the last dim")
    ...
    return m.ok(x=..., weight=...)

A failed Match is falsy and carries its reason, so a pass can report *why* a candidate did
not fuse (STYLE.md #3) rather than just skipping it.
"""

from __future__ import annotations

from typing import Any, Iterable

from arcompile.ir.analysis import TRANSPARENT
from arcompile.ir.graph import Node, Value

CASTS = {"aten.to.dtype", "aten.to.dtype_layout", "aten._to_copy", "aten.type_as"}


class Match:
    """The outcome of matching one candidate: bindings when it matched, a reason when not."""

    def __init__(self) -> None:
        self.bindings: dict[str, Any] = {}
        self.reason: str | None = None

    def fail(self, reason: str) -> "Match":
        self.reason = reason
        return self

    def ok(self, **bindings: Any) -> "Match":
        self.bindings.update(bindings)
        self.reason = None
        return self

    def __bool__(self) -> bool:
        return self.reason is None

    def __getitem__(self, key: str) -> Any:
        return self.bindings[key]

    def __repr__(self) -> str:
        return f"<Match ok {sorted(self.bindings)}>" if self else f"<Match failed: {self.reason}>"


def producer(value: Any, ops: str | Iterable[str] | None = None) -> Node | None:
    """The node that made ``value`` when its op is in ``ops`` (any op when None)."""
    if not isinstance(value, Value):
        return None
    node = value.producer
    if ops is None:
        return node
    wanted = {ops} if isinstance(ops, str) else set(ops)
    return node if node.op in wanted else None


def through(value: Value, ops: Iterable[str] = TRANSPARENT) -> Value:
    """Walk up from ``value`` through producers whose op is in ``ops``; the first other value."""
    ops = set(ops)
    while isinstance(value, Value) and value.producer.op in ops and value.producer.inputs:
        value = value.producer.inputs[0]
    return value


def single_use(value: Value) -> bool:
    """Used by exactly one node input and not a graph output: safe to fold into a fusion."""
    return len(value.uses()) == 1 and not any(o is value for o in value.graph.outputs)


def scalar(value: Any) -> float | None:
    """A Python number, or the value of a one-element constant; None otherwise."""
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, Value) and value.is_constant and value.data.numel() == 1:
        return float(value.data.reshape(()).item())
    return None


def last_dim(value: Value) -> Any:
    return value.shape[-1] if value.shape else None
