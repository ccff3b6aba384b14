"""Layer-skip routing: feed-forward blocks that a run-time flag switches off.

Matches, per transformer block, the feed-forward (FFN) output that the residual stream adds:

    h_out = h + ffn(norm(h))        # ffn: arc.gated_mlp, down(act(up(x))), any written form

where the add is ``aten.add.Tensor`` or the residual add a fused norm took
(``arc.skip_rms_norm`` / ``arc.skip_layer_norm``: ``s = x + skip``), the add alone reads
``ffn``'s output, which has ``h``'s shape and dtype, and what is computed only for it (its
*cone*: the nodes whose outputs nothing else reads) holds a linear and no attention. By
structure, not by module names or activations: GPT-2's written-out tanh GELU and OPT's ReLU
MLPs match as LLaMA's fused one does. (GPT-NeoX's parallel residual ``h + attn + ffn`` adds
``ffn`` to the attention output first; skipping it is as exact, its score compares against
that sum.) Only feed-forward blocks: skipping one changes no KV-cache row, so the cache a
skipped step writes is the cache later steps expect (skipping attention would leave that
layer's rows unwritten).

Calibrates on ``samples`` sequences of calibration text (``calibration.calibration_ids``;
seeded random ids for a model without a tokenizer), in the reference interpreter, one score
per block, ``method``:

- ``"ablation"`` (default): the rise of the text's mean next-token loss when that block alone
  is skipped (one run of the routed graph per block, the sequences as one batch);
- ``"cosine"``: FFN-SkipLLM's measure, the mean over tokens of cos(h, h + ffn(norm(h))), the
  residual stream before and after the block (one run). Cheaper, but blind to what a block
  does in few dimensions: on SmolLM2, whose residual stream carries activations near 24,000
  in a handful of channels, skipping the 8 most "similar" of 30 blocks takes held-out
  perplexity from 12.8 to 151; the 8 that the ablation ranks first, to 40.6.

Blocks are ranked by the score (ties: the earlier block first; scores compared to 6
decimals), so the same graph and text give the same ranking and choice; ``budget`` (a
fraction in (0, 1) of the FFN blocks, rounded half up, at least one) takes the top of it:
the lossy mode's choice.

Produces: a graph input ``skip_ffn`` (bool ``[N]``, last, one flag per routed block) and, per
routed block, ``arc.skip_ffn(skip_ffn, h, ffn_out; index, block)`` between the FFN and its
add (rule ``skip_ffn``): zeros when the flag is set, so ``h + 0 = h`` exactly. ``route``:
``"all"`` routes every FFN block (any budget can be chosen at run time: self-speculative
drafting may skip more than the lossy choice) or ``"chosen"`` only the budget's blocks. With
every flag false the graph computes exactly what it did (tolerance 0, proved on sample tokens
as in ``insert_kv_cache``). ``graph.meta["skip_ffn"]`` records the input name, the blocks
(flag index, module, score), the ranking, the budget and its choice, the calibration text and,
with ``measure``, the interpreter's perplexity on held-out text with and without the choice.
The ONNX lowering (``runtimes/onnxruntime/ops_arc_skip.py``) puts each block's cone in an
``If`` so a set flag skips its work.

Refuses (graph left as it was, reason noted): a graph that already has routing, no FFN block
found (each near miss noted: an FFN whose output has another user, a cone that holds
attention, a shape or dtype mismatch with the residual), a graph without a KV cache (the pass
runs after ``insert_kv_cache``), a run of the routed graph that differs from the original with
the flags off. A budget outside (0, 1) is a ValueError.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from arcompile.eval.calibration import calibration_ids, graph_inputs, observe_inputs
from arcompile.eval.metrics import held_ids, perplexity
from arcompile.ir.analysis import exclusive_cone, vocabulary
from arcompile.ir.cached_step import empty_cache, step_inputs
from arcompile.ir.graph import Graph, Node, Value
from arcompile.ir.interpreter import run_graph, widened_constants
from arcompile.ir.skip_routing import budget_count, flags
from arcompile.passes.base import Pass, PassResult
from arcompile.passes.match import Match
from arcompile.passes.merge_linears import common_module
from arcompile.passes.numeric_check import gap, relative_gap, run_exact, within

INPUT = "skip_ffn"
ROUTES = ("all", "chosen")
# where the residual stream adds a block's output: the add itself, or a fused norm's
# s = x + skip (inputs 0 and 1)
RESIDUAL_ADDS = {"aten.add.Tensor": ("self", "other"),
                 "arc.skip_rms_norm": (0, 1), "arc.skip_layer_norm": (0, 1)}
# a cone holding one of these is not a feed-forward block: skipping it would change the cache
ATTENTION_OPS = ("attention", "kv_cache", "scaled_dot_product")
# a feed-forward block holds at least one of these (what its skipping saves)
LINEARS = {"aten.linear", "aten.mm", "aten.addmm", "aten.matmul", "aten.bmm",
           "arc.gated_mlp", "arc.split_linear", "arc.matmul_nbits"}


# how blocks are scored on calibration text, and which end of the scale is skipped first
METHODS = {
    "ablation": {"score": "calibration loss increase with the block alone skipped",
                 "higher_first": False},
    "cosine": {"score": "mean cos(h, h + ffn) over calibration tokens (FFN-SkipLLM)",
               "higher_first": True},
}


class SkipRefused(Exception):
    """Why the pass left the graph unrouted; the message goes into the notes."""


@dataclass
class Block:
    """One feed-forward block: its output, the residual it is added to, the add, the cone."""

    ffn_out: Value
    residual: Value
    add: Node
    ffn_port: int  # the add's input port that reads ffn_out
    residual_port: int
    module: str
    cone: list[Node]


class SkipFFN(Pass):
    """See the module docstring."""

    name = "skip_ffn"
    tolerance = 0.0  # flags off: exactly the original graph's numbers

    def __init__(self, budget: float = 0.25, route: str = "all", tokenizer=None,
                 vocab: int | None = None, method: str = "ablation", samples: int = 4,
                 length: int = 128, measure: bool = False, measure_tokens: int = 512,
                 max_tokens: int | None = None):
        if isinstance(budget, bool) or not isinstance(budget, (int, float)) \
                or not 0 < budget < 1:
            raise ValueError(f"skip_ffn: the budget is a fraction of the feed-forward blocks "
                             f"in (0, 1), got {budget!r}")
        if route not in ROUTES:
            raise ValueError(f"skip_ffn: route must be one of {ROUTES}, got {route!r}")
        if method not in METHODS:
            raise ValueError(f"skip_ffn: method must be one of {tuple(METHODS)}, got "
                             f"{method!r}")
        self.budget, self.route, self.method = float(budget), route, method
        self.tokenizer, self.vocab = tokenizer, vocab
        # max_tokens: the model's context, when shorter than the texts
        self.samples, self.length = samples, min(length, max_tokens or length)
        self.measure, self.measure_tokens = measure, min(measure_tokens,
                                                         max_tokens or measure_tokens)

    def settings(self) -> dict:
        return {"budget": self.budget, "route": self.route, "method": self.method,
                "samples": self.samples, "length": self.length}

    def run(self, graph: Graph) -> PassResult:
        result = PassResult()
        try:
            blocks = find_blocks(graph, result)
            sequences, source = self._calibration_text(graph)
            # every block routed, on a copy: the ablation runs it with one flag set at a time
            work = _route_copy(graph, range(len(blocks)), self.name)
            if self.method == "ablation":
                scores = ablation_scores(work, sequences)
            else:
                scores = cosine_scores(graph, blocks, sequences)
            ranking = rank(scores, METHODS[self.method]["higher_first"])
            chosen = ranking[:budget_count(self.budget, len(blocks))]
            routed = list(range(len(blocks)))
            if self.route == "chosen":
                routed = sorted(chosen)
                work = _route_copy(graph, routed, self.name)
            flag_of = {b: f for f, b in enumerate(routed)}  # block number -> flag index
            work.meta["skip_ffn"] = {
                "input": INPUT,
                "blocks": [{"flag": flag_of[b], "block": b, "module": blocks[b].module,
                            "score": round(scores[b], 6)} for b in routed],
                "score": METHODS[self.method]["score"],
                "scores": [round(s, 6) for s in scores],  # every FFN block, in graph order
                "ranking": [flag_of[b] for b in ranking if b in flag_of],  # best first
                "budget": self.budget, "route": self.route, "method": self.method,
                "chosen": sorted(flag_of[b] for b in chosen),
                "calibration": source,
            }
            diff = prove(graph, work, self.vocab)
        except SkipRefused as e:
            result.note(f"{self.name}: refused, graph left unrouted: {e}")
            return result
        graph.adopt(work)
        result.bump("skip_ffn", len(routed))
        result.max_abs_diff = diff
        if self.measure:
            meta = graph.meta["skip_ffn"]
            meta["perplexity"] = self._perplexity(graph, meta["chosen"])
        return result

    def _calibration_text(self, graph: Graph) -> tuple[list[list[int]], str]:
        try:
            return calibration_ids(self.tokenizer, self.vocab or _vocabulary(graph),
                                   self.samples, self.length)
        except ValueError as e:
            raise SkipRefused(f"no calibration text: {e}") from e

    def _perplexity(self, graph: Graph, chosen: list[int]) -> dict:
        """The interpreter's perplexity on held-out text with no flag and the choice set."""
        ids, source = held_ids(self.tokenizer, self.vocab or _vocabulary(graph),
                               self.measure_tokens)
        full = run_graph(graph, graph_inputs(graph, ids))[0][0].float().numpy()
        inputs = graph_inputs(graph, ids)
        inputs[-1] = flags(graph, chosen)
        skipped = run_graph(graph, inputs)[0][0].float().numpy()
        base, lossy = perplexity(full, ids), perplexity(skipped, ids)
        return {"full": base, "skipped": lossy, "increase": lossy / base - 1,
                "tokens": len(ids), "text": source}


# -- calibration ------------------------------------------------------------------------
def ablation_scores(routed: Graph, sequences: list[list[int]]) -> list[float]:
    """Per routed block, how much the calibration text's mean next-token loss rises when
    that block alone is skipped (the sequences as one batch; one run per block, plus one)."""
    tokens = torch.tensor(sequences)
    empty = empty_cache(routed, tokens.shape[0])
    count = len(routed.meta["skip_ffn"]["blocks"])

    def loss(skipped: list[int]) -> float:
        logits = run_graph(routed, step_inputs(routed, tokens, torch.tensor(0), empty,
                                               torch.tensor(0), flags(routed, skipped)))[0]
        return float(torch.nn.functional.cross_entropy(
            logits[:, :-1].reshape(-1, logits.shape[-1]).double(), tokens[:, 1:].reshape(-1)))

    base = loss([])
    return [loss([b]) - base for b in range(count)]


def cosine_scores(graph: Graph, blocks: list[Block], sequences: list[list[int]]) -> list[float]:
    """Per block, the mean over calibration tokens of cos(h, h + ffn) (FFN-SkipLLM)."""
    by_add: dict[Node, list[int]] = {}
    for i, b in enumerate(blocks):
        by_add.setdefault(b.add, []).append(i)
    sums = [0.0] * len(blocks)
    count = [0] * len(blocks)

    def visit(node: Node, args: list) -> None:
        for i in by_add[node]:
            b = blocks[i]
            h = args[b.residual_port].double().reshape(-1, args[b.residual_port].shape[-1])
            out = h + args[b.ffn_port].double().reshape(h.shape)
            cos = torch.nn.functional.cosine_similarity(h, out, dim=-1)
            sums[i] += float(cos.sum())
            count[i] += cos.numel()

    observe_inputs(graph, sequences, list(by_add), visit)
    return [s / max(n, 1) for s, n in zip(sums, count)]


def _route_copy(graph: Graph, routed, pass_name: str) -> Graph:
    """A copy of ``graph`` (weights shared) with the blocks numbered ``routed`` routed and
    the meta the step inputs need; the caller completes the meta."""
    work = graph.copy()
    blocks = find_blocks(work, PassResult())  # the same blocks, found again in graph order
    routed = list(routed)
    rewrite(work, [blocks[b] for b in routed], pass_name)
    work.meta["skip_ffn"] = {"input": INPUT, "blocks": [{"block": b} for b in routed]}
    return work


# -- matching ---------------------------------------------------------------------------
def find_blocks(graph: Graph, result: PassResult) -> list[Block]:
    """Every feed-forward block in graph order; near misses noted on ``result``."""
    if any(v.name == INPUT for v in graph.inputs) or "skip_ffn" in graph.meta:
        raise SkipRefused(f"the graph already has layer-skip routing (input %{INPUT})")
    if graph.meta.get("kv_cache") is None:
        raise SkipRefused("the graph has no KV cache: the pass runs after insert_kv_cache "
                          "(routing serves cached decoding: lossy and self-speculative)")
    blocks = []
    for node in graph.nodes():
        found = []
        for port in RESIDUAL_ADDS.get(node.op, ()):
            m = match_block(node, port)
            if m:
                found.append(m["block"])
            elif m.bindings.get("ffn_like"):
                result.note(f"{node.where()}: feed-forward block not routed: {m.reason}")
        if len(found) > 1:  # which one is the residual stream? neither is skipped
            result.note(f"{node.where()}: both operands look like feed-forward blocks; "
                        f"neither is routed")
            continue
        blocks += found
    if not blocks:
        raise SkipRefused("no feed-forward block found (a computation with a linear and no "
                          "attention, added to the residual stream)")
    return blocks


def match_block(add: Node, port) -> Match:
    """``Match(block=Block)`` when the ``add``'s operand at ``port`` (a name or an index)
    is a feed-forward block's output: read by this add alone, and computed (its cone) from
    at least one linear and no attention, added to a residual of its shape and dtype."""
    m = Match()
    ports = RESIDUAL_ADDS[add.op]
    operands = [add.arg(p) if isinstance(p, str) else add.inputs[p] for p in ports]
    out = operands[ports.index(port)]
    residual = operands[1 - ports.index(port)]
    if not isinstance(out, Value) or not isinstance(residual, Value) or out is residual:
        return m.fail(f"{add.op} does not add two different tensors")
    if add.op == "aten.add.Tensor" and add.arg("alpha", 1) != 1:
        return m.fail(f"the residual add scales by alpha={add.arg('alpha')}")
    producer = out.producer
    if producer.op in ("arc.input", "arc.constant"):
        return m.fail(f"%{out.name} is not computed")
    cone = exclusive_cone(out)
    # an attention block: attention in the cone, or the cone reads attention's output
    # (its o_proj; the attention op itself also writes the cache, so it is not exclusive)
    feeds = {v.producer for n in cone for v in n.inputs} - set(cone)
    if any(any(k in n.op for k in ATTENTION_OPS) for n in [*cone, *feeds]):
        return m.fail("an attention block, not a feed-forward one")  # not worth a note
    linears = [n for n in cone if n.op in LINEARS]
    m.bindings["ffn_like"] = bool(linears) or producer.op in LINEARS
    others = [c for v in producer.outputs for c, _ in v.uses() if c is not add]
    if others or any(o in producer.outputs for o in out.graph.outputs):
        who = others[0].where() if others else "a graph output"
        return m.fail(f"%{out.name}'s producer has another reader ({who}): skipping it would "
                      f"change more than the residual stream")
    if not linears:
        return m.fail(f"%{out.name} is computed without a linear: not a feed-forward block")
    if residual.shape != out.shape or residual.dtype != out.dtype:
        return m.fail(f"the residual %{residual.name} {residual.dtype}{residual.shape} and the "
                      f"block's output {out.dtype}{out.shape} differ in shape or dtype")
    return m.ok(block=Block(out, residual, add, _port(add, out), _port(add, residual),
                            common_module(cone), cone))


def _port(node: Node, value: Value) -> int:
    return next(i for i, v in enumerate(node.inputs) if v is value)


# -- choosing ---------------------------------------------------------------------------
def rank(scores: list[float], higher_first: bool = False) -> list[int]:
    """Block numbers, the most skippable first (the lowest score, or the highest with
    ``higher_first``), compared to 6 decimals so float noise cannot reorder; ties: the
    earlier block first."""
    sign = -1 if higher_first else 1
    return sorted(range(len(scores)), key=lambda i: (sign * round(scores[i], 6), i))


# -- the rewrite ------------------------------------------------------------------------
def rewrite(graph: Graph, blocks: list[Block], pass_name: str) -> None:
    """Add the flags input and one ``arc.skip_ffn`` per block (flag index = position)."""
    skip = graph.add_input(INPUT, torch.bool, (len(blocks),))
    for index, b in enumerate(blocks):
        out = b.ffn_out
        gated = graph.add_node("arc.skip_ffn", (skip, b.residual, out),
                               {"index": index, "block": b.module},
                               [(out.dtype, out.shape)], module=b.module,
                               origin=f"{pass_name}/skip_ffn", names=[f"{out.name}_routed"])
        graph.set_input(b.add, b.ffn_port, gated.output)


def prove(original: Graph, routed: Graph, vocab: int | None, length: int = 6) -> float:
    """max |Δlogit| between the graphs on random tokens with every flag off, in float64 like
    every proof (``numeric_check.py``); it must be 0: the flags only select."""
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab or _vocabulary(original), (length,), generator=gen).tolist()
    with widened_constants():
        want = run_exact(original, graph_inputs(original, ids))[0]
        got = run_exact(routed, graph_inputs(routed, ids))[0]
    diff = gap(got, want)
    if not within(relative_gap(got, want), SkipFFN.tolerance):
        raise SkipRefused(f"the routed graph with every flag off differs from the original "
                          f"by {diff:.3g}")
    return diff


def _vocabulary(graph: Graph) -> int:
    vocab = vocabulary(graph)
    if vocab is None:
        raise SkipRefused(f"no embedding reads %{graph.inputs[0].name}: cannot find the "
                          f"vocabulary to draw sample tokens")
    return vocab
