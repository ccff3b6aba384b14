"""The QDQ form of the weight-quantized linear (arc.matmul_nbits): standard ONNX that TensorRT's
parser reads, chosen per graph with ``graph.meta["onnxruntime.weight_lowering"] = "qdq"``
(``optimize(..., weight_format="qdq")``; ``ops_arc_quant`` dispatches here)::

    arc.matmul_nbits(x, packed, scales[, zero_points][, block_offsets][, bias])
        -> MatMul(x, DequantizeLinear(W_KN, scale_bN[, zero_bN], axis=0, block_size))
           (+ block_sums(x) @ offsets, as ops_arc_quant adds it) (+ Add bias)

The IR's codes ([N, n_blocks, blob], MatMulNBits' layout) are rewritten at lowering time
into a [K, N] tensor of ONNX's own 4-bit (INT4 / UINT4, two to a byte) or 8-bit type, the
scales and zero points into [n_blocks, N]; the padding of a last partial block is dropped
(opset 21 allows ceil(K / block_size) blocks). Without zero points (symmetric, and the
float-minimum form's codes) the codes become signed, code - 2^(bits - 1): no zero-point
input at all. One block across K (int8 per channel) is the per-axis form instead: axis 1,
scales [N]. A block whose scale is 0 dequantizes to zeros whatever its codes; it gets the
scale 1 and codes at the zero point, which is the same weight with a positive scale.

TensorRT's explicit quantization is symmetric (zero points of 0 only, scales positive) and
documents weight-only INT4 in blocks and INT8 per channel (``tensorrt_form_issues`` names
what falls outside). TensorRT itself cannot be installed on the machines this is built on,
so the form is checked in ONNX Runtime only, never built by TensorRT here.

ONNX Runtime 1.32 on CPU, probed with one-node models (K 576, N 1536): with graph
optimizations on it fuses DequantizeLinear -> MatMul into MatMulNBits (int4 blocks of 32,
64 and 128 incl. 576 = 4.5 x 128, signed or with zero points; int8 in blocks and per
channel) at its ``session.qdq_matmulnbits_accuracy_level``, 4 by default: the activations
rounded to int8 per block, as ``accuracy_level=4`` says. Same kernel, same speed (10-38 us
against 700-1,100 us for DequantizeLinear + MatMul unfused). With optimizations off it
dequantizes and multiplies in float: the IR op at accuracy level 0, to 4e-7 relative.
"""

from __future__ import annotations

import torch

from arcompile.ir.analysis import is_lm_head
from arcompile.ir.graph import Graph, Node, Value
from arcompile.ir.quant_math import blocks_of, pack, unpack
from arcompile.runtimes.onnxruntime.context import LowerContext
from arcompile.runtimes.onnxruntime.weights import Nibbles


def matmul_nbits_qdq(ctx: LowerContext, node: Node) -> str:
    # y = x @ DQ(W_KN) (+ block offsets) (+ bias); see the module docstring
    x, packed, scales, *rest = node.inputs
    it = iter(rest)
    zero_points = next(it) if node.attrs.get("has_zero_points") else None
    offsets_bN = next(it) if node.attrs.get("has_block_offsets") else None
    bias = next(it) if node.attrs.get("has_bias") else None
    sources = [packed, scales] + ([zero_points] if zero_points is not None else [])
    base = packed.producer.attrs.get("name") or packed.name

    made: dict = {}

    def tensors() -> dict:  # rewritten once, and only if no node sharing the weight did
        if not made:
            made.update(_qdq_tensors(node, packed.data, scales.data,
                                     None if zero_points is None else zero_points.data))
        return made

    kinds = ("codes", "scales") + (("zero_points",) if zero_points is not None else ())
    inputs = [ctx.derived_weight(f"qdq.{kind}", sources, f"{base}.{kind}",
                                 lambda kind=kind: tensors()[kind]) for kind in kinds]
    axes = (dict(axis=1) if _per_channel(node) else
            dict(axis=0, block_size=node.attrs["block_size"]))
    weight = ctx.op("DequantizeLinear", inputs, **axes)
    y = ctx.op("MatMul", [ctx.name(x), weight])
    if offsets_bN is not None:
        y = plus_block_offsets(ctx, node, x, y, offsets_bN)
    return ctx.op("Add", [y, ctx.name(bias)]) if bias is not None else y


def plus_block_offsets(ctx: LowerContext, node: Node, x: Value, y: str, offsets_bN: Value) -> str:
    """``y + block_sums(x) @ offsets``, in float from the unrounded x (quant_math.block_sums)."""
    K, block_size, rank = node.attrs["K"], node.attrs["block_size"], len(x.shape)
    nb = blocks_of(K, block_size)
    x_padded = ctx.name(x)
    if nb * block_size != K:  # zeros up to whole blocks, on the last axis only
        x_padded = ctx.op("Pad", [x_padded, ctx.i64([0] * (2 * rank - 1) + [nb * block_size - K])])
    blocks = ctx.op("Reshape", [x_padded, ctx.i64([0] * (rank - 1) + [nb, block_size])])
    sums = ctx.op("ReduceSum", [blocks, ctx.i64([-1])], keepdims=0)
    return ctx.op("Add", [y, ctx.op("MatMul", [sums, ctx.name(offsets_bN)])])


def _per_channel(node: Node) -> bool:
    """int8 in one block across K: TensorRT's per-channel form (per-axis DequantizeLinear)."""
    return node.attrs["bits"] == 8 and _blocks(node) == 1


def _blocks(node: Node) -> int:

    return blocks_of(node.attrs["K"], node.attrs["block_size"])


def _qdq_tensors(node: Node, packed: torch.Tensor, scales: torch.Tensor,
                 zero_points: torch.Tensor | None) -> dict:
    """{"codes": [K, N], "scales": [n_blocks, N] or [N], "zero_points": like the scales}:
    tensors, or ``weights.Nibbles`` for 4 bits."""
    K, N, bits, block_size = (node.attrs[k] for k in ("K", "N", "bits", "block_size"))
    nb = _blocks(node)
    codes = unpack(packed.reshape(N, -1), bits)[:, :nb * block_size].to(torch.int16)
    scale = scales.reshape(N, nb).clone()
    zero = (unpack(zero_points.reshape(N, -1), bits)[:, :nb].to(torch.int16)
            if zero_points is not None else torch.full((N, nb), 1 << (bits - 1), dtype=torch.int16))
    empty = scale == 0  # any codes there dequantize to 0: put them at the zero point
    if bool(empty.any()):
        scale[empty] = 1.0
        codes = codes.reshape(N, nb, block_size)
        codes = torch.where(empty[..., None], zero[..., None], codes).reshape(N, -1)
    codes = codes[:, :K]
    signed = zero_points is None
    if signed:  # no zero-point input: the codes relative to the implicit 2^(bits - 1)
        codes = codes - (1 << (bits - 1))
    out = {"codes": codes.T.contiguous(), "scales": scale.T.contiguous()}
    if not signed:
        out["zero_points"] = zero.T.contiguous()
    if _per_channel(node):  # the per-axis form, [N]
        out = {k: v.reshape(N) if k != "codes" else v for k, v in out.items()}
    dtype = torch.int8 if signed else torch.uint8
    for kind in [k for k in ("codes", "zero_points") if k in out]:
        value = out[kind]
        if bits == 4:
            out[kind] = Nibbles(_pack_nibbles(value), tuple(value.shape), signed)
        else:
            out[kind] = value.to(dtype)
    return out


def _pack_nibbles(values: torch.Tensor) -> torch.Tensor:
    """4-bit values (signed or not) in row-major order, two to a byte, the first low."""

    return pack((values.reshape(-1) & 0xF).to(torch.uint8), 4)


def tensorrt_form_issues(graph: Graph) -> list[str]:
    """Why the graph's quantized weights are not in the form TensorRT documents for weight-only
    quantization (symmetric; int4 in blocks, int8 per channel): one line per reason, naming
    the LM head where it alone is the reason; empty when all are."""
    where: dict[str, set[str]] = {}
    for n in graph.nodes():
        if n.op == "arc.gather_nbits":
            where.setdefault("a token embedding read from the quantized LM head "
                             "(GatherBlockQuantized is ONNX Runtime's own op: --embedding "
                             "fp32)", set()).add("head")
        if n.op != "arc.matmul_nbits":
            continue
        part = "head" if is_lm_head(graph, n, n.inputs[1]) else "body"
        if n.attrs.get("has_zero_points"):
            where.setdefault("integer zero points (TensorRT dequantizes with zero points of 0 "
                             "only: --zero-point none", set()).add(part)
        if n.attrs["bits"] == 8 and _blocks(n) > 1:
            where.setdefault("int8 weights in blocks (TensorRT documents int8 weights per "
                             "channel: one block across K", set()).add(part)
    lines = []
    for reason, parts in sorted(where.items()):
        if reason.endswith(")"):
            lines.append(reason)
        else:
            lines.append(reason + ("; the LM head takes its own format: --lm-head int4 or "
                                   "fp32)" if parts == {"head"} else ")"))
    return lines
