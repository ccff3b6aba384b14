"""Reference implementations of the arc.* MLP and merged-linear ops.

``weight_layout`` says how a weight is stored, because the two traced forms differ:
``"out_in"`` is nn.Linear's ``(out, in)`` (``aten.linear``), ``"in_out"`` the transposed view
that ``run_decompositions()`` feeds to ``aten.mm``/``aten.addmm`` (``x @ W``).

- ``arc.gated_mlp(x, w_gate, w_up, w_down, *biases, activation, weight_layout, has_bias)``:
  ``down(act(gate(x)) * up(x))`` with act ``silu``, ``gelu`` (erf) or ``gelu_tanh``.
  ``has_bias`` is ``[gate, up, down]`` booleans; the biases present follow the weights in
  that order. (LLaMA, SmolLM2, Mistral, Qwen, Gemma MLPs.)
- ``arc.concat_weights(*parts, dim)``: the parts concatenated along ``dim``. A graph-level op
  over the original constants, so optimizing never holds a second copy of the weights; the
  interpreter concatenates on the fly (one layer at a time, freed after use) and the ONNX
  lowering streams the parts into one initializer.
- ``arc.split_linear(x, weight[, bias], sizes, weight_layout)``: one matmul over weights
  concatenated along the output dim, then split along the last dim into ``len(sizes)``
  outputs: ``split(x @ W^T + b, sizes, -1)`` (Q/K/V projections of one input).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from arcompile.ir.ops import register

ACTIVATIONS = ("silu", "gelu", "gelu_tanh")


def activate(x: torch.Tensor, activation: str) -> torch.Tensor:
    if activation == "silu":
        return F.silu(x)
    if activation == "gelu":
        return F.gelu(x)
    if activation == "gelu_tanh":
        return F.gelu(x, approximate="tanh")
    raise ValueError(f"unknown activation {activation!r}; known: {', '.join(ACTIVATIONS)}")


def apply_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                 weight_layout: str) -> torch.Tensor:
    """``x @ W^T + b`` for an (out, in) weight, ``x @ W + b`` for an (in, out) one."""
    if weight_layout == "out_in":
        return F.linear(x, weight, bias)
    if weight_layout != "in_out":
        raise ValueError(f"unknown weight_layout {weight_layout!r}")
    y = x @ weight
    return y + bias if bias is not None else y


@register("arc.gated_mlp")
def gated_mlp(x, w_gate, w_up, w_down, *biases, activation: str, weight_layout: str,
              has_bias=(False, False, False)):
    # down(act(x @ Wg^T + bg) * (x @ Wu^T + bu)) + bd
    it = iter(biases)
    b_gate, b_up, b_down = (next(it) if present else None for present in has_bias)
    gate = apply_linear(x, w_gate, b_gate, weight_layout)
    up = apply_linear(x, w_up, b_up, weight_layout)
    return apply_linear(activate(gate, activation) * up, w_down, b_down, weight_layout)


@register("arc.concat_weights")
def concat_weights(*parts, dim: int):
    return torch.cat(parts, dim=dim)


@register("arc.split_linear")
def split_linear(x, weight, *bias, sizes, weight_layout: str):
    y = apply_linear(x, weight, bias[0] if bias else None, weight_layout)
    return list(torch.split(y, list(sizes), dim=-1))
