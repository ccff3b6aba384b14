"""The driver: lower an IR graph to ``model.onnx`` plus external weights in ``model.onnx.data``.

Steps, in an order that keeps failures cheap: check every op has a lowering (nothing is
written otherwise), lower node by node into a ``LowerContext``, name the graph outputs, then
write the weights the lowered graph uses and the model file. Plain standard ONNX at ``OPSET``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import onnx
from onnx import helper

from arcompile.errors import UnsupportedOpError
from arcompile.ir.graph import SYM_DTYPES, Graph, Value

# Importing the ops_* modules fills the lowering table.
from arcompile.runtimes.onnxruntime import (  # noqa: F401
    ops_arc_attention,
    ops_arc_kv_cache,
    ops_arc_mlp,
    ops_arc_norms,
    ops_arc_qdq,
    ops_arc_quant,
    ops_arc_rope,
    ops_arc_skip,
    ops_attention,
    ops_creation,
    ops_elementwise,
    ops_index,
    ops_nn,
    ops_reduce,
    ops_shape,
    ops_sym,
)
from arcompile.runtimes.onnxruntime.context import LowerContext
from arcompile.runtimes.onnxruntime.dtypes import dtype_name, onnx_type
from arcompile.runtimes.onnxruntime.registry import STRUCTURAL_OPS, lowering_for
from arcompile.runtimes.onnxruntime.weights import write_weights

# Opset 21: Gelu (20) and the opset-18 reduce/split forms; ORT 1.32 and TensorRT 10 read it.
OPSET = 21
# IR version 10 goes with opset 21 and keeps older ORT builds able to load the file.
IR_VERSION = 10
# Standard ops newer than OPSET that a lowering may emit: a model holding one is written at
# that opset (and IR version 11) instead; the ops above keep their meaning up to opset 23.
NEWER_OPS = {"Attention": 23}


def check_supported(graph: Graph) -> None:
    """Raise UnsupportedOpError for the first node (in graph order) that has no lowering."""
    for node in graph.nodes():
        if node.op not in STRUCTURAL_OPS and lowering_for(node.op) is None:
            raise UnsupportedOpError(f"no ONNX Runtime lowering for op '{node.op}' "
                                     f"(from module '{node.module or '<top>'}')")


def lower_to_onnx(graph: Graph, out_dir: Path, model_file: str = "model.onnx") -> dict[str, Any]:
    """Write ``out_dir/model_file`` and its weights to ``out_dir/model_file.data``.

    Returns the engine's I/O description ``{"inputs": [...], "outputs": [...]}``, each entry
    ``{"name", "dtype", "shape"}`` with symbolic dims as strings. A single output is named
    ``logits``, and so is a cached step's first output (``graph.meta["kv_cache"]``); other
    outputs and the inputs keep their IR names. Raises UnsupportedOpError before writing anything
    when an op has no lowering.
    """
    check_supported(graph)
    out_names = ["logits"] if len(graph.outputs) == 1 else [v.name for v in graph.outputs]
    if graph.meta.get("kv_cache") is not None:  # a cached step: logits, then the presents
        out_names[0] = "logits"
    ctx = LowerContext(graph, reserved=[v.name for v in graph.inputs] + out_names)
    for v in graph.inputs:
        ctx.bind(v, v.name)
    for node in graph.nodes():
        if node.op not in STRUCTURAL_OPS:
            ctx.lower_node(node, lowering_for(node.op))
    _name_outputs(ctx, graph, out_names)

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    data_path = out_dir / f"{model_file}.data"
    initializers = ctx.small + write_weights(ctx.weights, data_path)
    inputs = [_value_info(v.name, v) for v in graph.inputs]
    outputs = [_value_info(n, v) for n, v in zip(out_names, graph.outputs)]
    onnx_graph = helper.make_graph(ctx.nodes, graph.name, inputs, outputs, initializer=initializers)
    # ORT's fused kernels live in the com.microsoft domain (version 1); import it when used
    domains = sorted({n.domain for n in ctx.nodes if n.domain not in ("", "ai.onnx")})
    opset = max([OPSET] + [NEWER_OPS.get(n.op_type, 0) for n in ctx.nodes if n.domain == ""])
    opsets = [helper.make_opsetid("", opset)] + [helper.make_opsetid(d, 1) for d in domains]
    model = helper.make_model(onnx_graph, opset_imports=opsets, producer_name="arcompile",
                              ir_version=IR_VERSION if opset == OPSET else 11)
    # The protobuf holds no weight bytes, so serializing it directly is small and fast.
    (out_dir / model_file).write_bytes(model.SerializeToString())
    return {"inputs": [_describe(v.name, v) for v in graph.inputs],
            "outputs": [_describe(n, v) for n, v in zip(out_names, graph.outputs)]}


def _name_outputs(ctx: LowerContext, graph: Graph, out_names: list[str]) -> None:
    """Give each graph output its ONNX name: rename the producing node's output in place, or
    add an Identity where the value is a graph input, a weight, or already another output."""
    produced = ctx.produced()
    taken: set[str] = set()
    for value, want in zip(graph.outputs, out_names):
        have = ctx.name(value)
        if have == want:
            taken.add(have)
        elif have in produced and have not in taken:
            ctx.rename(have, want)
            produced.add(want)
            taken.add(want)
        else:
            ctx.nodes.append(helper.make_node("Identity", [have], [want], name=want))


def _value_info(name: str, value: Value) -> onnx.ValueInfoProto:
    shape = [1] if value.dtype in SYM_DTYPES else list(value.shape)
    return helper.make_tensor_value_info(name, onnx_type(value.dtype), shape)


def _describe(name: str, value: Value) -> dict[str, Any]:
    shape = [1] if value.dtype in SYM_DTYPES else list(value.shape)
    return {"name": name, "dtype": dtype_name(value.dtype), "shape": shape}
