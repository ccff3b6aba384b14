"""KV-cache insertion: a cache-free ``tokens[B, T] -> logits`` graph becomes one cached step.

Matches: a graph whose attentions are all fused (``arc.attention``, causal) and whose only
input is the token ids ``[B, T]``.

Produces (on a copy, adopted only once proven):

- new inputs after the tokens: ``past_length`` (int64 scalar: the P tokens already cached) and
  per attention ``past_key_{i}`` / ``past_value_{i}`` ``[B, Hkv, P, D]``;
- ``logits_to_keep`` (int64 scalar, last input) when the logits come from one linear LM head
  over ``[B, T, H]``: only the last ``logits_to_keep`` positions reach the head (0: all), so a
  prefill computes the one row of logits it samples from (rule ``logits_to_keep``);
- every ``arc.attention(q, k, v)`` becomes ``arc.attention_cached(q, k, v, past_key,
  past_value) -> (out, present_key, present_value)``, presents ``[B, Hkv, P + T, D]``
  appended to the graph outputs after the logits (key, value per layer);
- positions, with no per-architecture code. A value is *position-dependent* when it is computed
  from the sequence length T alone (``sym_size(tokens, 1)``), never from token values: the
  ``arange`` of GPT-2/LLaMA/nanoGPT, OPT's ``cumsum`` of an all-ones mask plus offset, the
  rotary cos/sin and the position ids ``arc.rope`` records. Where such a value meets the rest
  of the graph it is replaced by its values at the new tokens' absolute positions, one of two
  ways (rules ``position_narrowed`` / ``position_sliced``)::

      # narrowed: arange(0, T) -> arange(P, P + T), then only ops that work position by
      #           position (elementwise, unsqueeze, embedding lookup, cat off the T axis)
      # sliced:   pos_cached(T) = pos(P + T)[..., P:P + T, ...]   (anything else: cumsum, ...)

  The slice is exact for anything computed from positions alone, whatever it computes; the
  narrowed form computes only T positions per step (O(T), not O(P + T)).

Proof (``step_proof.py``, shared with ``pack_attention``): the rewritten graph is run by the
reference interpreter against the original on random tokens (B = 1 and 2, several prefix
splits): full sequence at once versus prefix with an empty cache then the rest with the
presents fed back, both in float64. Logits must agree within
``tolerance`` of their magnitude (``numeric_check.py``: a correct cache differs by float64
rounding, a position off by one by whole units, on any CPU).

Refuses (graph left exactly as it was, reason noted): no fused attention, a non-causal
``arc.attention``, an unfused attention left (any sdpa or softmax: it would only see the new
tokens; conservative, a softmax elsewhere, e.g. a MoE router, refuses too),
a position-dependent value that has no T axis, two T axes or T inside a compound dim, a
vocabulary size that cannot be found to draw sample tokens, and any failed proof (e.g.
positions computed from token values, which this pass cannot trace).
"""

from __future__ import annotations

import copy
import re
from dataclasses import replace

import torch

from arcompile.ir.cached_step import CachedStep
from arcompile.ir.graph import SYM_DTYPES, SYM_INT, Graph, In, Node, Value
from arcompile.ir.interpreter import run_graph, widened_constants
from arcompile.passes.base import Pass, PassResult
from arcompile.passes.numeric_check import CHECK_DTYPE, EXACT, within
from arcompile.passes.step_proof import chunked, decode_exact, sample_tokens, worst_gap

UNFUSED_ATTENTION = {"aten.scaled_dot_product_attention", "aten._softmax", "aten.softmax.int",
                     "aten._safe_softmax", "aten.softmax"}
SHAPE_READS = {"aten.sym_size.int"}  # read a size, not the values
PAST = "P"  # the symbol for the cached length


class KVCacheRefused(Exception):
    """Why the pass left the graph uncached; the message goes into the notes."""


class InsertKVCache(Pass):
    """See the module docstring."""

    name = "insert_kv_cache"
    tolerance = EXACT

    def __init__(self, proof_length: int = 8, splits: tuple[int, ...] = (3, 7),
                 batches: tuple[int, ...] = (1, 2), seed: int = 0,
                 runtime_cache: str = "concat", max_context: int | None = None):
        self.proof_length = proof_length
        self.splits = splits
        self.batches = batches
        self.seed = seed
        # for the lowering, recorded in the layout: how the runtime keeps the cache
        # ("concat": presents fed back; "inplace": buffers bound as past and present) and
        # the most tokens an engine decodes
        self.runtime_cache, self.max_context = runtime_cache, max_context

    def settings(self) -> dict:
        return {"proof_length": self.proof_length, "splits": list(self.splits),
                "batches": list(self.batches), "runtime_cache": self.runtime_cache,
                "max_context": self.max_context}

    def run(self, graph: Graph) -> PassResult:
        result = PassResult()
        try:
            work = graph.copy()
            layers, positions = rewrite(work, self.name)
            with widened_constants():
                diff = self._prove(graph, work)
        except KVCacheRefused as e:
            result.note(f"{self.name}: refused, graph left uncached: {e}")
            return result
        step = work.meta["kv_cache"] = replace(
            work.meta["kv_cache"], runtime_cache=self.runtime_cache,
            max_context=int(self.max_context) if self.max_context is not None else None)
        graph.adopt(work)
        for rule, n in (("attention_cached", layers), ("position_narrowed", positions[0]),
                        ("position_sliced", positions[1]),
                        ("logits_to_keep", int(step.logits_to_keep is not None))):
            if n:
                result.bump(rule, n)
        result.max_abs_diff = diff  # the proof's: prefix + steps against full recomputation
        if step.logits_to_keep is None:
            result.note(f"{self.name}: logits_to_keep not added: the logits are not one linear "
                        f"head over [B, T, H], so every step computes every new row's logits")
        return result

    # -- proof ------------------------------------------------------------------------
    def _prove(self, original: Graph, cached: Graph) -> float:
        try:
            draws = sample_tokens(original, self.seed, self.batches, self.proof_length)
        except ValueError as e:  # no embedding: no vocabulary to draw from
            raise KVCacheRefused(str(e)) from e
        worst = 0.0
        for tokens in draws:
            batch = tokens.shape[0]
            try:
                (full,) = run_graph(original, [tokens], compute_dtype=CHECK_DTYPE)[:1]
            except Exception as e:
                raise KVCacheRefused(f"the original graph did not run on {self.proof_length} "
                                     f"random tokens: {type(e).__name__}: {e}") from e
            for split in self.splits:
                if not 0 < split < self.proof_length:
                    continue
                try:
                    steps = decode_exact(cached, chunked(tokens,
                                                         (split, self.proof_length - split)))
                except Exception as e:  # e.g. a position table shorter than the proof
                    raise KVCacheRefused(f"the cached graph did not run on the proof's "
                                         f"inputs: {type(e).__name__}: {e}") from e
                pairs = [(full, torch.cat(steps, dim=1))]
                if cached.meta["kv_cache"].logits_to_keep is not None:  # the last row only
                    (last,) = decode_exact(cached, [tokens[:, :split]], keep=1)
                    if last.shape[1] != 1:
                        raise KVCacheRefused(f"logits_to_keep=1 gave {last.shape[1]} rows")
                    pairs.append((full[:, split - 1:split], last))
                diff, relative = worst_gap(pairs)
                worst = max(worst, diff)
                if not within(relative, self.tolerance):  # NaN fails too
                    raise KVCacheRefused(
                        f"cached decoding differs from full recomputation by {diff:.3g} "
                        f"({relative:.3g} of the logits' magnitude, in float64; tolerance "
                        f"{self.tolerance:g}) (B={batch}, prefix {split} of "
                        f"{self.proof_length}): a position source or cross-position op the "
                        f"pass cannot trace")
        return worst


# -- the rewrite ------------------------------------------------------------------------
def rewrite(graph: Graph, pass_name: str) -> tuple[int, tuple[int, int]]:
    """Rewrite ``graph`` in place into a cached step: (attentions, (narrowed, sliced))."""
    if len(graph.inputs) != 1:  # e.g. an attention_mask input: padded batches come later
        raise KVCacheRefused(f"graph takes {len(graph.inputs)} inputs; only a tokens-only "
                             f"graph is handled")
    tokens = graph.inputs[0]
    if tokens.shape is None or len(tokens.shape) != 2 or not isinstance(tokens.shape[1], str):
        raise KVCacheRefused(f"first input %{tokens.name} is not tokens [B, T] with symbolic T")
    seq = tokens.shape[1]
    nodes = graph.nodes()
    for node in nodes:
        if node.op in UNFUSED_ATTENTION:
            raise KVCacheRefused(f"unfused attention remains ({node.where()}): it would only "
                                 f"see the new tokens")
    attentions = [n for n in nodes if n.op == "arc.attention"]
    if not attentions:
        raise KVCacheRefused("no fused arc.attention in the graph")
    for node in attentions:
        if not node.attrs.get("causal", False):
            raise KVCacheRefused(f"{node.where()} is not causal")
    if PAST in graph.meta.get("symbols", ()) or any(
            PAST in _symbols(v.shape) for n in nodes for v in n.outputs if v.shape):
        raise KVCacheRefused(f"the graph already uses the symbol {PAST!r}")

    past_length = graph.add_input("past_length", torch.int64, ())
    pasts = []
    for i, node in enumerate(attentions):
        key, value = node.inputs[1], node.inputs[2]
        pasts.append((graph.add_input(f"past_key_{i}", key.dtype, _with_seq(key.shape, PAST)),
                      graph.add_input(f"past_value_{i}", value.dtype,
                                      _with_seq(value.shape, PAST))))

    origin = f"{pass_name}/positions"
    past_sym = graph.add_op("aten._local_scalar_dense", {"self": past_length},
                            [(SYM_INT, ())], origin=origin, names=["past_len"]).output
    positions = _rewrite_positions(graph, nodes, seq, past_sym, origin)

    presents = []
    for i, (node, (past_key, past_value)) in enumerate(zip(attentions, pasts)):
        query, key, value = node.inputs
        total = _with_seq(key.shape, f"{PAST} + {seq}")
        out = node.output
        cached = graph.add_node("arc.attention_cached",
                                (query, key, value, past_key, past_value), dict(node.attrs),
                                outputs=[(out.dtype, out.shape), (key.dtype, total),
                                         (value.dtype, _with_seq(value.shape,
                                                                 f"{PAST} + {seq}"))],
                                module=node.module, origin=f"{pass_name}/attention_cached",
                                names=["attn_BHqTD", f"present_key_{i}", f"present_value_{i}"])
        out.replace_all_uses_with(cached.outputs[0])
        graph.remove_node(node)
        presents += [cached.outputs[1], cached.outputs[2]]
    graph.outputs = list(graph.outputs) + presents
    keep = _keep_logits(graph, seq, pass_name)
    if "symbols" in graph.meta:
        graph.meta["symbols"] = sorted(set(graph.meta["symbols"]) | {PAST} |
                                       ({KEPT} if keep else set()))
    # what a runtime needs to drive the step (the manifest's cache layout, later)
    graph.meta["kv_cache"] = CachedStep(
        past_length=past_length.name, past=tuple((k.name, v.name) for k, v in pasts),
        present=tuple((k.name, v.name) for k, v in zip(presents[::2], presents[1::2])),
        logits_to_keep=keep.name if keep is not None else None)
    return len(attentions), positions


HEADS = {"aten.linear", "aten.matmul"}  # the LM head: position by position over [B, T, H]
KEPT = "K"  # the symbol for the number of positions whose logits are returned


def _keep_logits(graph: Graph, seq: str, pass_name: str) -> Value | None:
    """Add the ``logits_to_keep`` input and slice the LM head's input to its last rows.

    Only where the logits are one linear (``HEADS``) of a ``[B, T, H]`` value by a constant
    weight: that op works position by position, so its last rows need only the input's last
    rows. ``x[:, -k:]`` keeps every row for k = 0, as in transformers. Else None (all rows).
    """
    logits = graph.outputs[0]
    head = logits.producer
    if head.op not in HEADS or len(head.inputs) < 2 or len(logits.uses()) or \
            graph.outputs.count(logits) != 1:
        return None
    x, weight = head.inputs[0], head.inputs[1]
    shape = logits.shape or ()
    if (x.shape is None or len(x.shape) != 3 or x.shape[1] != seq or len(shape) != 3
            or shape[1] != seq or weight.producer.op != "arc.constant"
            or len(weight.shape or ()) != 2 or any(v.producer.op != "arc.constant"
                                                   for v in head.inputs[2:])):
        return None
    if any(KEPT in _symbols(v.shape) for n in graph.nodes() for v in n.outputs if v.shape):
        return None
    origin = f"{pass_name}/logits_to_keep"
    keep = graph.add_input("logits_to_keep", torch.int64, ())
    count = graph.add_op("aten._local_scalar_dense", {"self": keep}, [(SYM_INT, ())],
                         origin=origin, names=["keep"]).output
    start = graph.add_node("sym.neg", (count,), {"a0": In(0)}, [(SYM_INT, ())],
                           origin=origin, names=["keep_from"]).output
    rows = (x.shape[0], KEPT, x.shape[2])
    kept = graph.add_op("aten.slice.Tensor", {"self": x, "dim": 1, "start": start,
                                              "end": 2 ** 63 - 1}, [(x.dtype, rows)],
                        module=head.module, origin=origin, names=[f"{x.name}_kept"]).output
    graph.set_input(head, 0, kept)
    logits.shape = (shape[0], KEPT, shape[2])
    return keep


def _rewrite_positions(graph: Graph, nodes: list[Node], seq: str, past_sym: Value,
                       origin: str) -> tuple[int, int]:
    """Give every position-dependent tensor the values of the new tokens' absolute positions.

    Two ways, per value where it meets the token-dependent graph:
    - *narrowed*: computed from ``arange(P, P + T)`` in place of ``arange(0, T)`` through
      ops that work position by position (``POSITIONWISE``), so only T positions are computed;
    - *sliced*: anything else (OPT's ``cumsum`` of an all-ones mask, ...) is recomputed for
      ``P + T`` positions and its last T rows are taken along its T axis.
    Returns (narrowed, sliced) counts.
    """
    data: set[Value] = set(graph.inputs)  # values that depend on token (or cache) values
    positional: set[Node] = set()
    seeds: list[Value] = []
    for node in nodes:
        if node.op == "arc.input":
            continue
        if node.op in SHAPE_READS:
            src, dim = node.arg("self"), node.arg("dim")
            size = src.shape[dim] if src.shape is not None and isinstance(dim, int) else None
            if size == seq:
                positional.add(node)
                seeds.append(node.output)
            elif size is not None and seq in _symbols((size,)):
                raise KVCacheRefused(f"{node.where()} reads size {size!r}, which depends on "
                                     f"{seq} in a way the pass does not trace")
            continue
        if any(v in data for v in node.inputs):
            data.update(node.outputs)
        elif any(v.producer in positional for v in node.inputs):
            positional.add(node)

    # Where a position-dependent tensor meets the token-dependent graph. Sizes (symints) stay:
    # there T is the count of new tokens, which is what views and reshapes need.
    frontier: dict[Value, list[tuple[Node, int]]] = {}
    for node in nodes:
        if node in positional or node.op == "arc.input":
            continue
        for port, v in enumerate(node.inputs):
            if v.producer in positional and v.dtype not in SYM_DTYPES:
                frontier.setdefault(v, []).append((node, port))
    for v in graph.outputs:
        if v.producer in positional:
            raise KVCacheRefused(f"position-dependent %{v.name} is a graph output")
    if not frontier:
        return 0, 0

    total = graph.add_node("sym.add", (past_sym, seeds[0]), {"a0": In(0), "a1": In(1)},
                           [(SYM_INT, ())], origin=origin, names=["total_len"]).output
    # pos_full(P + T): the whole subgraph again, every seed T replaced by P + T
    full: dict[Value, Value] = {s: total for s in seeds}
    # pos(P : P + T): only where each op provably works position by position
    narrow: dict[Value, Value] = {}
    for node in nodes:
        if node not in positional or node.op in SHAPE_READS:
            continue
        copy_ = graph.add_node(node.op, [full.get(v, v) for v in node.inputs],
                               copy.deepcopy(node.attrs),
                               [(v.dtype, _total_shape(v.shape, seq)) for v in node.outputs],
                               module=node.module, origin=f"{origin}_full",
                               names=[f"{v.name}_abs" for v in node.outputs])
        full.update(zip(node.outputs, copy_.outputs))
        narrowed = _narrow(graph, node, narrow, set(seeds), past_sym, total, seq, origin)
        if narrowed is not None:
            narrow.update(zip(node.outputs, narrowed.outputs))

    sliced = 0
    for v, uses in frontier.items():
        if v in narrow:
            new = narrow[v]
        else:
            new = _slice_new(graph, v, full[v], seq, past_sym, total, origin)
            sliced += 1
        for consumer, port in uses:
            graph.set_input(consumer, port, new)
    return len(frontier) - sliced, sliced


# Ops that compute each position from that position alone (elementwise, broadcasting, a
# table lookup by index, adding unit dims); with cat, only along an axis that is not T.
POSITIONWISE = {"aten.add.Tensor", "aten.sub.Tensor", "aten.mul.Tensor", "aten.div.Tensor",
                "aten.add.Scalar", "aten.sub.Scalar", "aten.mul.Scalar", "aten.div.Scalar",
                "aten.neg", "aten.cos", "aten.sin", "aten.exp", "aten.pow.Tensor_Scalar",
                "aten.to.dtype", "aten._to_copy", "aten.unsqueeze", "aten.embedding",
                "aten.cat"}
ARANGES = {"aten.arange", "aten.arange.start", "aten.arange.start_step"}


def _narrow(graph: Graph, node: Node, narrow: dict[Value, Value], seeds: set[Value],
            past_sym: Value, total: Value, seq: str, origin: str) -> Node | None:
    """``node`` computed for the new positions only, or None when that is not provably right."""
    # arange(0, T) -> arange(P, P + T): the new tokens' absolute positions
    if node.op in ARANGES:
        end, start, step = node.arg("end"), node.arg("start", 0), node.arg("step", 1)
        if end not in seeds or start != 0 or step != 1:
            return None
        args = {k: v for k, v in node.resolved_attrs().items() if k not in ("start", "end", "step")}
        return graph.add_op("aten.arange.start", {"start": past_sym, "end": total, **args},
                            [(node.output.dtype, node.output.shape)], module=node.module,
                            origin=origin, names=[f"{node.output.name}_new"])
    if node.op not in POSITIONWISE or len(node.outputs) != 1:
        return None
    positional_inputs = [v for v in node.inputs if v.producer.op != "arc.constant"]
    # a seed used as a value (not as the end of an arange) would need P + T, not T
    if not positional_inputs or any(v in seeds or v not in narrow for v in positional_inputs):
        return None
    shape = node.output.shape or ()
    if node.op == "aten.cat":
        axes = [i for i, d in enumerate(shape) if d == seq]
        dim = node.arg("dim", 0) % len(shape) if shape else None
        if len(axes) != 1 or dim == axes[0]:
            return None
    if sum(1 for d in shape if d == seq) != 1 or any(
            seq in _symbols((d,)) for d in shape if d != seq):
        return None
    return graph.add_node(node.op, [narrow.get(v, v) for v in node.inputs],
                          copy.deepcopy(node.attrs), [(node.output.dtype, shape)],
                          module=node.module, origin=origin,
                          names=[f"{node.output.name}_new"])


def _slice_new(graph: Graph, v: Value, full_v: Value, seq: str, past_sym: Value, total: Value,
               origin: str) -> Value:
    """``full_v[..., P:P + T, ...]`` along the one axis of ``v`` that has length T."""
    axes = [i for i, d in enumerate(v.shape or ()) if d == seq]
    compound = [d for d in (v.shape or ()) if d != seq and seq in _symbols((d,))]
    if compound or len(axes) != 1:
        why = (f"has {seq} inside the dim {compound[0]!r}" if compound else
               f"has {len(axes)} axes of length {seq}")
        raise KVCacheRefused(f"position-dependent %{v.name} ({v.producer.where()}) {why}; "
                             f"cannot slice it to the new tokens")
    return graph.add_op("aten.slice.Tensor", {"self": full_v, "dim": axes[0], "start": past_sym,
                                               "end": total}, [(v.dtype, v.shape)],
                        module=v.producer.module, origin=origin, names=[f"{v.name}_new"]).output


# -- helpers ----------------------------------------------------------------------------
def _with_seq(shape, dim) -> tuple:
    return tuple(shape[:2]) + (dim,) + tuple(shape[3:])


def _symbols(shape) -> set[str]:
    return {s for d in shape if isinstance(d, str) for s in re.findall(r"[A-Za-z_]\w*", d)}


def _total_shape(shape, seq: str):
    if shape is None:
        return None
    return tuple(re.sub(rf"\b{re.escape(seq)}\b", f"({PAST} + {seq})", d) if isinstance(d, str)
                 else d for d in shape)
