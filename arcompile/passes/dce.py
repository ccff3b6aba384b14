"""Dead-code elimination.

Matches: any node none of whose outputs is used by another node or is a graph output.
Produces: the graph without it (repeated until nothing more is dead).
Refuses: graph inputs, which stay even when unused so the engine keeps its signature, and
nodes without outputs (asserts), which ``remove_noops`` decides about.
"""

from __future__ import annotations

from arcompile.ir.graph import Graph
from arcompile.passes.base import Pass, PassResult


class DeadCodeElimination(Pass):
    name = "dce"

    def run(self, graph: Graph) -> PassResult:
        result = PassResult()
        # reverse topological order: a node's users are visited (and maybe removed) first
        for node in reversed(graph.nodes()):
            if node.op == "arc.input" or not node.outputs:
                continue
            if not any(graph.has_uses(v) for v in node.outputs):
                graph.remove_node(node)
                result.bump("constant" if node.op == "arc.constant" else "node")
        return result
