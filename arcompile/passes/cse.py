"""Common-subexpression elimination.

Matches: two nodes with the same op, the same input Values (by identity) and equal
attributes, or two constants holding the very same tensor (tied weights).
Produces: one node; users of the second are moved to the first.
Refuses: ops that draw random numbers (their tag ``nondeterministic_seeded``), and nodes
without outputs.
"""

from __future__ import annotations

from typing import Any

import torch

from arcompile.ir.graph import Graph, Node
from arcompile.ir.ops import resolve_op
from arcompile.passes.base import Pass, PassResult


def is_random(node: Node) -> bool:
    if not node.op.startswith("aten."):
        return False
    return torch.Tag.nondeterministic_seeded in resolve_op(node.op).tags


def _freeze(a: Any) -> Any:
    if isinstance(a, (list, tuple)):
        return (type(a).__name__,) + tuple(_freeze(x) for x in a)
    if isinstance(a, dict):
        return tuple(sorted((k, _freeze(v)) for k, v in a.items()))
    if isinstance(a, float) and a != a:
        return "nan"
    return (type(a).__name__, repr(a))


class CommonSubexpressionElimination(Pass):
    name = "cse"

    def run(self, graph: Graph) -> PassResult:
        result = PassResult()
        seen: dict[Any, Node] = {}
        for node in graph.nodes():
            if node.op == "arc.input" or not node.outputs or is_random(node):
                continue
            if node.op == "arc.constant":
                key: Any = ("arc.constant", id(node.output.data))
            else:
                key = (node.op, tuple(id(v) for v in node.inputs), _freeze(node.attrs))
            first = seen.setdefault(key, node)
            if first is node:
                continue
            for mine, theirs in zip(node.outputs, first.outputs):
                mine.replace_all_uses_with(theirs)
            graph.remove_node(node)
            result.bump("tied_constant" if node.op == "arc.constant" else "duplicate_node")
        return result
