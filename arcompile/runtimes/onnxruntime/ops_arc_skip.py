"""Lowering of ``arc.skip_ffn`` (``passes/skip_ffn.py``): a feed-forward block run only when
its flag is off.

    y = If(skip_flags[index],
           then: ConstantOfShape(Shape(h), 0)     # the block skipped: its work never runs
           else: <the block's ONNX nodes>)        # ffn(x) as its own lowerings emitted it

The block was lowered before this node, by whatever lowerings its ops have (a float
``arc.gated_mlp``, or the matmul_nbits a quantization pass left). This lowering moves those
ONNX nodes out of the main graph into the else-branch: walking back from the block's output,
a node moves when every reader of its outputs has moved and it depends on the block's input
(the values the block's IR cone reads from outside, ``skip_ffn.exclusive_cone``). Nodes over
constants only (a weight's Transpose) stay in the main graph, where ONNX Runtime folds them
once at load; values shared between layers (``ctx.once``) are computed from graph inputs, so
they never move. The branch reads everything else from the outer scope, which ONNX allows.

The flags are a required graph input (``Engine`` feeds all false for plain decoding): ONNX
Runtime's I/O binding, which the in-place cache runs through, cannot bind an initializer
that stands in as an input's default.
"""

from __future__ import annotations

import torch
from onnx import helper

from arcompile.errors import UnsupportedOpError
from arcompile.ir.analysis import exclusive_cone
from arcompile.ir.graph import Node
from arcompile.runtimes.onnxruntime.context import LowerContext
from arcompile.runtimes.onnxruntime.dtypes import onnx_type
from arcompile.runtimes.onnxruntime.registry import lowering


@lowering("arc.skip_ffn")
def skip_ffn(ctx: LowerContext, node: Node) -> str:
    flags, residual, ffn_out = node.inputs
    cone = set(exclusive_cone(ffn_out))
    entry = {ctx.name(v) for n in cone for v in n.inputs
             if v.producer not in cone and not v.is_constant}
    root = ctx.name(ffn_out)
    body = _take_block(ctx, root, entry)
    if not body:
        raise UnsupportedOpError(f"{node.where()}: the block's output %{ffn_out.name} is not "
                                 f"computed from its input inside the ONNX graph; nothing to skip")
    out_type = onnx_type(ffn_out.dtype)
    base = ctx.fresh(f"{ffn_out.name}.skipped")
    shape = ctx.fresh(f"{base}.shape")
    zero = helper.make_tensor(f"{base}.zero", out_type, [1], [0])
    then_graph = helper.make_graph(
        [helper.make_node("Shape", [ctx.name(residual)], [shape], name=shape),
         helper.make_node("ConstantOfShape", [shape], [base], name=base, value=zero)],
        f"{base}.then", [], [helper.make_tensor_value_info(base, out_type, None)])
    else_graph = helper.make_graph(body, f"{base}.else", [],
                                   [helper.make_tensor_value_info(root, out_type, None)])
    cond = ctx.op("Gather", [ctx.name(flags), ctx.const(int(node.attrs["index"]), torch.int64)],
                  axis=0)
    return ctx.op("If", [cond], then_branch=then_graph, else_branch=else_graph)


def _take_block(ctx: LowerContext, root: str, entry: set[str]) -> list:
    """Remove from ``ctx.nodes`` and return (in order) the nodes that compute ``root`` from
    the ``entry`` values and whose outputs nothing outside them reads."""
    depends = set(entry)  # names computed from the block's input
    readers: dict[str, list] = {}
    for proto in ctx.nodes:
        for name in proto.input:
            readers.setdefault(name, []).append(proto)
        if any(name in depends for name in proto.input):
            depends.update(proto.output)
    needed, moved = {root}, []
    chosen: set[int] = set()
    for proto in reversed(ctx.nodes):  # readers before producers
        outputs = set(proto.output)
        if not outputs & needed or outputs & entry or not outputs & depends:
            continue
        if any(id(r) not in chosen for name in proto.output for r in readers.get(name, ())):
            continue  # something outside the block reads it
        chosen.add(id(proto))
        moved.append(proto)
        needed.update(proto.input)
    ctx.nodes[:] = [p for p in ctx.nodes if id(p) not in chosen]
    return moved[::-1]
