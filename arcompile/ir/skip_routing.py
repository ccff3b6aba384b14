"""Which feed-forward blocks a layer-skip-routed graph skips (``passes/skip_ffn.py`` routes
them; ``graph.meta["skip_ffn"]`` and the manifest hold its ranking): the compiler's choice, or
the top of the ranking, as the graph's boolean ``skip_ffn`` input."""

from __future__ import annotations

import math

import torch

from arcompile.ir.graph import Graph


def budget_count(budget: float, blocks: int) -> int:
    """How many of ``blocks`` a budget (fraction) skips: rounded half up, at least one."""
    return max(1, min(blocks, math.floor(budget * blocks + 0.5)))


def choose(meta: dict, skip: bool | float) -> list[int]:
    """Flag indices to set: ``True`` for the compiled choice, a fraction for the top of the
    ranking (of all FFN blocks; only routed ones can be set)."""
    if skip is True:
        return list(meta["chosen"])
    if isinstance(skip, bool) or not isinstance(skip, (int, float)) or not 0 < skip < 1:
        raise ValueError(f"skip is True (the engine's choice) or a fraction in (0, 1) of the "
                         f"feed-forward blocks, got {skip!r}")
    count = budget_count(float(skip), len(meta["scores"]))
    if count > len(meta["ranking"]):
        raise ValueError(f"skip={skip} asks for {count} blocks; this engine routes only "
                         f"{len(meta['ranking'])} (optimize with route='all')")
    return sorted(meta["ranking"][:count])


def flags(graph_or_meta, chosen: list[int]) -> torch.Tensor:
    """The ``skip_ffn`` input with the ``chosen`` flags set."""
    meta = graph_or_meta.meta["skip_ffn"] if isinstance(graph_or_meta, Graph) else graph_or_meta
    out = torch.zeros(len(meta["blocks"]), dtype=torch.bool)
    out[list(chosen)] = True
    return out
