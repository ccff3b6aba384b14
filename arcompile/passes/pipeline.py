"""The pipeline: which passes run, in which order, and why there.

1. ``remove_noops`` first: torch.export leaves asserts, identity casts and views, eval-mode
   dropout and copies; removing them exposes the real dataflow to every later pattern.
2. ``constant_folding`` next: with the no-ops gone, position tables, masks built from
   constants and weight views become constants, so later passes see fewer nodes.
3. ``cse`` after folding: folding makes more nodes identical (the same constant inputs), and
   the fusions below need one node per computation (HF computes its mask pieces twice).
4. ``fuse_norms``: RMSNorm / LayerNorm, and a residual add feeding a norm, become one op
   each. First among the fusions because norms bracket every block: the other patterns then
   start and end at clean ``arc.*`` boundaries.
5. ``fuse_rope``: rotary embeddings become ``arc.rope``, recording how cos/sin derive from
   positions; before attention so the KV-cache pass later finds positions in one place.
6. ``fuse_attention``: every form of attention (sdpa, decomposed, hand-written with a
   causal mask it proves, GQA via repeat_kv) becomes ``arc.attention`` on the KV heads as they
   are. The KV-cache pass rewrites this op.
7. ``fuse_mlp``: ``down(act(gate(x)) * up(x))`` becomes ``arc.gated_mlp``, which keeps gate
   and up apart so its lowering can stream them into one weight.
8. ``merge_linears``: linears still sharing an input (Q/K/V) become one matmul. After the MLP
   fusion, so gate/up inside a gated MLP are not merged twice.
9. ``dce`` last: everything the earlier passes disconnected goes (the repeated KV heads,
   the causal-mask subgraphs).

A pass that does not apply to a target is listed here as an explicit no-op for it.
"""

from __future__ import annotations

from arcompile.errors import ArcompileError
from arcompile.passes.base import Pass
from arcompile.passes.constant_folding import ConstantFolding
from arcompile.passes.cse import CommonSubexpressionElimination
from arcompile.passes.dce import DeadCodeElimination
from arcompile.passes.fuse_attention import FuseAttention
from arcompile.passes.fuse_mlp import FuseGatedMLP
from arcompile.passes.fuse_norms import FuseNorms
from arcompile.passes.fuse_rope import FuseRope
from arcompile.passes.merge_linears import MergeLinears
from arcompile.passes.remove_noops import RemoveNoOps

PASSES: dict[str, type[Pass]] = {
    "remove_noops": RemoveNoOps,
    "constant_folding": ConstantFolding,
    "cse": CommonSubexpressionElimination,
    "fuse_norms": FuseNorms,
    "fuse_rope": FuseRope,
    "fuse_attention": FuseAttention,
    "fuse_mlp": FuseGatedMLP,
    "merge_linears": MergeLinears,
    "dce": DeadCodeElimination,
}
DEFAULT_ORDER = list(PASSES)
FUSIONS = ["fuse_norms", "fuse_rope", "fuse_attention", "fuse_mlp", "merge_linears"]
PRESETS = {
    "default": DEFAULT_ORDER,
    "cleanup": [p for p in DEFAULT_ORDER if p not in FUSIONS],  # no fusions: the baseline
    "none": [],
}


def build_pipeline(spec: str | list[str] = "default") -> list[Pass]:
    """Passes for a preset name (``default``, ``cleanup``, ``none``) or a list/comma string of
    pass names. Named passes always run in pipeline order, whatever order they were given in.
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
