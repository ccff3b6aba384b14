"""Constant folding.

Matches: an ``aten.*`` node every input of which is a constant (or that has no inputs, such
as ``arange(0, 64)`` or ``ones([4, 4])``), computed once here with the reference interpreter's
torch op.
Produces: ``arc.constant`` nodes holding the results (rule ``fold``), or ``view`` when the
result shares storage with a weight (a transpose or slice of it: no bytes are copied). A
folded floating-point result is also computed in float64 and kept as the constant's ``exact``
value, so the float64 numeric check (``numeric_check.py``) sees the maths the graph had, not
its rounding to float32.
Refuses: random ops; nodes that take a symbolic size; and results that would add more than
``max_new_elements`` elements of fresh memory (say, ``weight * 2`` on a 100 MB weight: the
runtime computes that cheaply, folding it would hold a second copy of the weight).
"""

from __future__ import annotations

import torch

from arcompile.ir.graph import Graph, Node
from arcompile.ir.interpreter import evaluate_exact, evaluate_node
from arcompile.passes.base import Pass, PassResult
from arcompile.passes.cse import is_random


class ConstantFolding(Pass):
    name = "constant_folding"

    def __init__(self, max_new_elements: int = 1 << 16):
        self.max_new_elements = max_new_elements

    def settings(self) -> dict:
        return {"max_new_elements": self.max_new_elements}

    def run(self, graph: Graph) -> PassResult:
        result = PassResult()
        for node in graph.nodes():
            if not self._foldable(node):
                continue
            values = evaluate_node(node, [v.data for v in node.inputs])
            values = values if len(node.outputs) > 1 else [values]
            if not all(isinstance(t, torch.Tensor) for t in values):
                continue
            sources = [v.data for v in node.inputs]
            fresh = sum(t.numel() for t in values if not _shares_storage(t, sources))
            if fresh > self.max_new_elements:
                result.note(f"kept {node.op} at {node.module or '<top>'}: folding would "
                            f"materialize {fresh} new elements")
                continue
            shared = fresh == 0 and bool(sources)
            exact = self._exact(node, values, shared)
            for out, tensor, wide in zip(node.outputs, values, exact):
                const = graph.add_constant(tensor, name=out.name, module=node.module,
                                           origin=f"{self.name}/{'view' if shared else 'fold'}",
                                           exact=wide)
                out.replace_all_uses_with(const)
            graph.remove_node(node)
            result.bump("view" if shared else "fold")
        return result

    @staticmethod
    def _exact(node: Node, values: list[torch.Tensor], shared: bool) -> list:
        """Per output, its float64 value where that differs from the stored rounding; None
        elsewhere (integers, and views of weights that no earlier fold rounded)."""
        if not any(t.is_floating_point() for t in values) or (
                shared and all(v.exact is None for v in node.inputs)):
            return [None] * len(values)
        wide = evaluate_exact(node, [v.exact if v.exact is not None else v.data
                                     for v in node.inputs])
        wide = wide if len(node.outputs) > 1 else [wide]
        return [w if isinstance(w, torch.Tensor) and t.is_floating_point()
                and w.shape == t.shape and not torch.equal(w, t.to(torch.float64)) else None
                for t, w in zip(values, wide)]

    def _foldable(self, node: Node) -> bool:
        if not node.op.startswith("aten.") or not node.outputs or is_random(node):
            return False
        if any(not v.is_constant for v in node.inputs):
            return False  # a symbolic size or a runtime tensor
        return all(v.dtype is not None and not isinstance(v.dtype, str) for v in node.outputs)


def _shares_storage(t: torch.Tensor, sources: list[torch.Tensor]) -> bool:
    ptr = t.untyped_storage().data_ptr()
    return any(s.untyped_storage().data_ptr() == ptr for s in sources)
