"""Reference implementation of ``arc.skip_ffn``, a feed-forward block that can be switched off
at run time (made by ``passes/skip_ffn.py``).

    arc.skip_ffn(skip_flags, x, ffn_out; index, block) -> y
        y = zeros_like(ffn_out) if skip_flags[index] else ffn_out

``skip_flags`` is the graph's bool ``[N]`` input (one flag per routed block), ``x`` the
block's input (only its shape is read: a runtime that skips the block must still produce a
zero of that shape without computing ``ffn_out``), ``ffn_out`` the block's output, which the
residual stream adds: ``h + y`` is ``h`` exactly when the flag is set. ``block`` names the
block (its module) for reports.

The reference computes ``ffn_out`` either way (the interpreter runs every node); the ONNX
lowering (``runtimes/onnxruntime/ops_arc_skip.py``) moves the block's computation into the
else-branch of an ``If``, so a set flag saves its work.
"""

from __future__ import annotations

import torch

from arcompile.ir.ops import register


@register("arc.skip_ffn")
def skip_ffn(skip_flags: torch.Tensor, x: torch.Tensor, ffn_out: torch.Tensor, *, index: int,
             block: str = "") -> torch.Tensor:
    if bool(skip_flags[index]):
        return torch.zeros_like(ffn_out)
    return ffn_out
