"""The pipeline: which passes run, in which order, and why there.

1. ``remove_noops`` first: torch.export leaves asserts, identity casts and views, eval-mode
   dropout and copies; removing them exposes the real dataflow to every later pattern.
2. ``constant_folding`` next: with the no-ops gone, position tables, masks built from
   constants and weight views become constants, so later passes see fewer nodes.
3. ``cse`` after folding: folding makes more nodes identical (the same constant inputs).
4. ``dce`` last: everything the earlier passes disconnected goes.

Later issues insert fusion, KV-cache and quantization passes between 3 and 4; a pass that
does not apply to a target is listed here as an explicit no-op for it.
"""

from __future__ import annotations

from arcompile.errors import ArcompileError
from arcompile.passes.base import Pass
from arcompile.passes.constant_folding import ConstantFolding
from arcompile.passes.cse import CommonSubexpressionElimination
from arcompile.passes.dce import DeadCodeElimination
from arcompile.passes.remove_noops import RemoveNoOps

PASSES: dict[str, type[Pass]] = {
    "remove_noops": RemoveNoOps,
    "constant_folding": ConstantFolding,
    "cse": CommonSubexpressionElimination,
    "dce": DeadCodeElimination,
}
DEFAULT_ORDER = ["remove_noops", "constant_folding", "cse", "dce"]
PRESETS = {"default": DEFAULT_ORDER, "none": []}


def build_pipeline(spec: str | list[str] = "default") -> list[Pass]:
    """Passes for a preset name (``default``, ``none``) or a list/comma string of pass names.

    Named passes always run in pipeline order, whatever order they were given in.
    """
    if isinstance(spec, str):
        names = PRESETS[spec] if spec in PRESETS else [s.strip() for s in spec.split(",") if s.strip()]
    else:
        names = list(spec)
    unknown = [n for n in names if n not in PASSES]
    if unknown:
        raise ArcompileError(f"unknown pass {unknown[0]!r}; known passes: {', '.join(PASSES)} "
                             f"(presets: {', '.join(PRESETS)})")
    return [PASSES[n]() for n in DEFAULT_ORDER if n in names]
