"""Lowerings of the gated MLP and merged linears (arc.gated_mlp, arc.concat_weights,
arc.split_linear) to plain ONNX ops.

ORT's CPU build has no fused gated-MLP kernel; the gain is in the merged matmuls:

    arc.gated_mlp:      gu = x @ [Wg; Wu]^T (+ [bg; bu])    # ONE MatMul, (…, 2I)
                        gate, up = Split(gu, [I, I], -1)
                        y = (act(gate) * up) @ Wd^T (+ bd)
    arc.split_linear:   Split(x @ W^T (+ b), sizes, -1)
    arc.concat_weights: ONE initializer

A concatenation of constants is written as one initializer whose bytes are streamed into the
data file part after part (``LowerContext.weight_concat``): no merged copy exists in memory
while lowering. (out, in) weights go through a Transpose, as ``aten.linear``'s lowering does;
ORT folds it when its graph optimizations are on.
"""

from __future__ import annotations

import torch

from arcompile.ir.graph import Node, Value
from arcompile.runtimes.onnxruntime.context import LowerContext
from arcompile.runtimes.onnxruntime.registry import lowering


def _concat(ctx: LowerContext, parts: list[Value], dim: int, base: str) -> str:
    """Constants: one streamed initializer; anything computed: a Concat node."""
    if all(v.is_constant for v in parts):
        return ctx.weight_concat(parts, dim, base)
    return ctx.op("Concat", [ctx.name(v) for v in parts], axis=dim)


def _matmul(ctx: LowerContext, x: str, weight: str, layout: str) -> str:
    if layout == "out_in":
        weight = ctx.op("Transpose", [weight], perm=[1, 0])
    return ctx.op("MatMul", [x, weight])


def _activation(ctx: LowerContext, x: str, activation: str) -> str:
    if activation == "silu":
        return ctx.op("Mul", [x, ctx.op("Sigmoid", [x])])
    if activation in ("gelu", "gelu_tanh"):  # opset-20 Gelu has both forms
        return ctx.op("Gelu", [x], approximate="tanh" if activation == "gelu_tanh" else "none")
    raise ValueError(f"unknown activation {activation!r}")


@lowering("arc.concat_weights")
def concat_weights(ctx: LowerContext, node: Node) -> str:
    return _concat(ctx, list(node.inputs), node.attrs["dim"], node.output.name)


@lowering("arc.split_linear")
def split_linear(ctx: LowerContext, node: Node) -> list[str]:
    # split(x @ W^T + b, sizes, -1)
    x, weight, *bias = node.inputs
    y = _matmul(ctx, ctx.name(x), ctx.name(weight), node.attrs["weight_layout"])
    if bias:
        y = ctx.op("Add", [y, ctx.name(bias[0])])
    sizes = node.attrs["sizes"]
    return ctx.op("Split", [y, ctx.i64(sizes)], outputs=len(sizes), axis=-1)


@lowering("arc.gated_mlp")
def gated_mlp(ctx: LowerContext, node: Node) -> str:
    # y = (act(x @ Wg^T + bg) * (x @ Wu^T + bu)) @ Wd^T + bd, gate and up in one MatMul
    x, w_gate, w_up, w_down, *rest = node.inputs
    layout = node.attrs["weight_layout"]
    has_bias = list(node.attrs.get("has_bias", (False, False, False)))
    it = iter(rest)
    b_gate, b_up, b_down = (next(it) if present else None for present in has_bias)
    inner = w_gate.shape[0 if layout == "out_in" else 1]
    dim = 0 if layout == "out_in" else 1
    w_gate_up = _concat(ctx, [w_gate, w_up], dim, f"{node.output.name}.gate_up")
    gate_up = _matmul(ctx, ctx.name(x), w_gate_up, layout)
    if b_gate is not None or b_up is not None:
        zeros = ctx.const(torch.zeros(inner, dtype=w_gate.dtype), w_gate.dtype)
        biases = [ctx.name(b) if b is not None else zeros for b in (b_gate, b_up)]
        gate_up = ctx.op("Add", [gate_up, ctx.op("Concat", biases, axis=0)])
    gate, up = ctx.op("Split", [gate_up, ctx.i64([inner, inner])], outputs=2, axis=-1)
    hidden = ctx.op("Mul", [_activation(ctx, gate, node.attrs["activation"]), up])
    out = _matmul(ctx, hidden, ctx.name(w_down), layout)
    return ctx.op("Add", [out, ctx.name(b_down)]) if b_down is not None else out
