"""Removal of ops that do nothing at inference time.

Matches, one rule each:
- ``assert``: runtime checks torch.export leaves in (``_assert_tensor_metadata``,
  ``_assert_scalar``, ``sym_constrain_range*``); they have no outputs and guard tracing only.
- ``identity_cast``: ``to`` / ``_to_copy`` / ``type_as`` whose output dtype equals its input's.
- ``identity_view``: ``view`` / ``reshape`` / ``_unsafe_view`` / ``expand`` whose output shape
  equals its input's, dim by dim (symbols compared by name).
- ``copy``: ``clone``, ``contiguous``, ``alias``, ``detach``, ``lift_fresh_copy`` — the graph is
  functional (torch.export guarantees it), so a copy is its input.
- ``eval_dropout``: ``dropout`` with ``train=False``, and any dropout with ``p=0``.
- ``full_slice``: ``slice`` from 0 to the end (or past it) with step 1.
Produces: users rewired to the op's input; the op is removed.
Refuses: a cast or view whose type differs in any way, a dropout in training mode.
"""

from __future__ import annotations

from arcompile.ir.graph import Graph, Node, Value
from arcompile.passes.base import Pass, PassResult

ASSERTS = {"aten._assert_tensor_metadata", "aten._assert_scalar", "aten._assert_async.msg",
           "aten.sym_constrain_range", "aten.sym_constrain_range_for_size"}
CASTS = {"aten.to.dtype", "aten.to.dtype_layout", "aten.to.device", "aten._to_copy",
         "aten.type_as"}
VIEWS = {"aten.view", "aten.reshape", "aten._unsafe_view", "aten.expand"}
COPIES = {"aten.clone", "aten.contiguous", "aten.alias", "aten.detach", "aten.lift_fresh_copy"}
DROPOUTS = {"aten.dropout", "aten.native_dropout", "aten.feature_dropout"}
SLICE_TO_END = 2**62  # torch.export writes "to the end" as sys.maxsize


class RemoveNoOps(Pass):
    name = "remove_noops"

    def run(self, graph: Graph) -> PassResult:
        result = PassResult()
        for node in graph.nodes():
            if node.op in ASSERTS and not node.outputs:
                graph.remove_node(node)
                result.bump("assert")
                continue
            rule = self._rule(node)
            if rule is None:
                continue
            node.output.replace_all_uses_with(node.inputs[0])
            graph.remove_node(node)
            result.bump(rule)
        return result

    def _rule(self, node: Node) -> str | None:
        if len(node.outputs) != 1 or not node.inputs:
            return None
        src, out = node.inputs[0], node.output
        if node.op in CASTS and _same_type(src, out):
            return "identity_cast"
        if node.op in VIEWS and _same_type(src, out):
            return "identity_view"
        if node.op in COPIES and _same_type(src, out):
            return "copy"
        if node.op in DROPOUTS and (node.arg("train") is False or node.arg("p") == 0):
            return "eval_dropout"
        if node.op == "aten.slice.Tensor" and _is_full_slice(node, src):
            return "full_slice"
        return None


def _same_type(a: Value, b: Value) -> bool:
    return a.dtype == b.dtype and a.shape is not None and a.shape == b.shape


def _is_full_slice(node: Node, src: Value) -> bool:
    dim, start, end, step = (node.arg("dim", 0), node.arg("start"), node.arg("end"),
                             node.arg("step", 1))
    if step != 1 or start not in (None, 0) or src.shape is None:
        return False
    size = src.shape[dim]
    if end is None or (isinstance(end, int) and end >= SLICE_TO_END):
        return True
    return isinstance(end, int) and isinstance(size, int) and end >= size
