"""Packing of cached attention into the layout its projections already have (after
``insert_kv_cache``, for the in-place cache runtime).

Matches, per ``arc.attention_cached`` of a graph whose cache runs in place
(``graph.meta["kv_cache"].runtime_cache == "inplace"``)::

    # q_BHqTD = [rope](transpose(view(q_BTX, [B, T, H, D]), 1, 2))   k likewise with Hkv;
    # v_BHkvTD = transpose(view(v_BTX, [B, T, Hkv, D]), 1, 2)        v never rotated
    # out_BHqTD, present_key, present_value = arc.attention_cached(q, k, v, past_k, past_v)
    # out_BTX = reshape(transpose(out_BHqTD, 1, 2), [B, T, H*D])

where each transpose is any chain of ``transpose``/``permute`` (and no-op copies) that
composes to (0, 2, 1, 3) — the decomposed export writes three permutes — and a rope on q and
k may sit before or after it.

Produces one ``arc.attention_cached_packed`` per attention (``ir/opdefs/kv_cache.py``) on the
``[B, T, n*D]`` tensors, output ``[B, T, H*D]`` (the old present values keep their names, which
the cache layout records). Rules:

- ``packed``: q, k, v are the three pieces (q, k, v order, sizes H*D, Hkv*D, Hkv*D) of one
  last-dim split of a ``[B, T, X]`` tensor, which goes in whole (GPT-2's ``c_attn``);
- ``packed_linear``: they are the three outputs of one ``arc.split_linear`` (merged Q/K/V,
  (out, in) weights) read by nothing else: it becomes ``aten.linear`` over the same merged
  weight, its output the packed input (the quantizer then sees one linear);
- ``separate``: otherwise q, k, v go in as three tensors;
- ``rotary``: ropes on q and k are folded in (``rotary_dim``, ``rotary_interleaved``), with
  ``past_length`` and constant ``cos_cache``/``sin_cache`` ``[rows, rot/2]`` as inputs: the
  model's own table rows (``position_source="table"``), or ``cos/sin(arange(max_context) *
  inv_freq)`` (``"inv_freq"``); either times the rope's ``attention_scaling``. One pair of
  caches serves every layer.

Refuses (noted; the attention is left as it was): a graph without a KV cache or whose cache
runtime is not in-place (the op lowers to GroupQueryAttention over the in-place buffers only),
a non-causal attention, dtypes other than float32, a q/k/v that is not such a view of a
``[B, T, n*D]`` tensor (e.g. GPT-NeoX's per-head interleaved q|k|v), an output with another
user or not merged back to ``[B, T, H*D]``, a rotated value, a rope on only one of q and k or
two ropes that differ, positions whose source is unproven or that are not provably
``past_length + arange(T)`` (the only positions GroupQueryAttention computes), a rotary dim
GroupQueryAttention's CPU kernel rejects (``rotary_dim / 2`` must be a multiple of 8 and at
most ``D / 2``; checked on ORT 1.32: partial rotary works then, GPT-NeoX's 4 of 16 does not),
no recorded ``max_context`` to size the cache, and a rotary table with fewer rows than it
(GroupQueryAttention would read past the table where the model fails).

Proof, as ``insert_kv_cache`` does (``step_proof.py``; this pass runs on the cached step, which
the pipeline's numeric check cannot run): the rewritten copy and the graph as it came are run by
the reference interpreter on random tokens (B = 2) decoded in chunks (5, 1, 2 tokens,
presents fed back: a prefill, a single-token step and a multi-token step over a cache), in
float64, and every output of every step must agree within ``tolerance`` of its magnitude
(``numeric_check.py``); else nothing is adopted and the difference is noted.
"""

from __future__ import annotations

import torch

from arcompile.ir.cached_step import input_named
from arcompile.ir.graph import Graph, Node, Value
from arcompile.ir.interpreter import widened_constants
from arcompile.passes.base import Pass, PassResult
from arcompile.passes.match import Match, scalar
from arcompile.passes.numeric_check import EXACT, within
from arcompile.passes.step_proof import chunked, decode_exact, sample_tokens, worst_gap

VIEWS = {"aten.view", "aten.reshape", "aten._unsafe_view"}
COPIES = {"aten.clone", "aten.contiguous", "aten.alias", "aten.detach"}  # same values, layout
SPLITS = {"aten.split.Tensor", "aten.split_with_sizes", "aten.chunk"}
INT_CASTS = {"aten._to_copy", "aten.to.dtype"}
INTEGER = (torch.int64, torch.int32)
ARANGES = {"aten.arange", "aten.arange.start", "aten.arange.start_step"}


class PackAttention(Pass):
    """See the module docstring."""

    name = "pack_attention"
    tolerance = EXACT

    # one batch of two rows: each proof run costs a whole-model interpreter step (SmolLM2:
    # seconds), and a batch of two checks everything a batch of one does
    def __init__(self, chunks: tuple[int, ...] = (5, 1, 2), batches: tuple[int, ...] = (2,),
                 seed: int = 0):
        self.chunks, self.batches, self.seed = chunks, batches, seed

    def settings(self) -> dict:
        return {"chunks": list(self.chunks), "batches": list(self.batches)}

    def run(self, graph: Graph) -> PassResult:
        result = PassResult()
        step = graph.meta.get("kv_cache")
        if step is None:
            result.note(f"{self.name}: the graph has no KV cache; nothing to pack")
            return result
        if step.runtime_cache != "inplace":
            result.note(f"{self.name}: the cache runtime is {step.runtime_cache!r}; "
                        f"the packed op lowers to GroupQueryAttention over in-place buffers "
                        f"only, so attention is left as it was")
            return result
        work = graph.copy()
        counts = rewrite(work, self.name, result.note)
        if not any(counts.values()):
            return result
        try:
            with widened_constants():
                diff, relative = self._prove(graph, work)
        except Exception as e:  # e.g. no embedding to draw tokens for; the graph stays
            result.note(f"{self.name}: refused, graph left as it was: the proof did not run: "
                        f"{type(e).__name__}: {e}")
            return result
        if not within(relative, self.tolerance):  # NaN fails too
            result.note(f"{self.name}: refused, graph left as it was: the packed step differs "
                        f"from the unpacked one by {diff:.3g} ({relative:.3g} of the outputs' "
                        f"magnitude, in float64; tolerance {self.tolerance:g})")
            return result
        graph.adopt(work)
        for rule, n in counts.items():
            if n:
                result.bump(rule, n)
        result.max_abs_diff = diff
        return result

    # -- proof ------------------------------------------------------------------------
    def _prove(self, original: Graph, packed: Graph) -> tuple[float, float]:
        """(max |Δ|, max |Δ| / magnitude) over every output of every step, in float64."""
        draws = sample_tokens(original, self.seed, self.batches, sum(self.chunks))

        def pairs():  # (unpacked, packed) output by output, step by step, batch by batch
            for tokens in draws:
                chunks = chunked(tokens, self.chunks)
                yield from zip(decode_exact(original, chunks, every_output=True),
                               decode_exact(packed, chunks, every_output=True))
        return worst_gap(pairs())


# -- the rewrite ------------------------------------------------------------------------
def rewrite(graph: Graph, pass_name: str, note) -> dict[str, int]:
    """Pack every attention of ``graph`` that matches, in place; counts per rule."""
    counts = {"packed": 0, "packed_linear": 0, "separate": 0, "rotary": 0}
    caches: dict[tuple, tuple[Value, Value]] = {}  # one cos/sin pair for every layer
    for node in graph.nodes():
        if node not in graph or node.op != "arc.attention_cached":
            continue
        m = match_attention(node)
        if m:
            m = _rotary_caches(graph, node, m, caches, pass_name)
        if not m:
            note(f"{pass_name}: {node.outputs[0].name} @ {node.module or '<top>'} not packed: "
                 f"{m.reason}")
            continue
        rule = _rewrite(graph, node, m, pass_name)
        counts[rule] += 1
        counts["rotary"] += m["rope"] is not None
    return counts


# out, present_key, present_value = arc.attention_cached(q, k, v, past_key, past_value)
def match_attention(attn: Node) -> Match:
    """Bindings: ``inputs`` (the packed tensor, or q, k, v [B, T, n*D]), ``linear`` (the
    ``arc.split_linear`` to turn into one linear, or None), ``rope`` (q's, or None),
    ``result`` (the [B, T, H*D] value the output chain ends in) and ``chain`` (its nodes)."""
    m = Match()
    query, key, value, past_key, past_value = attn.inputs
    a = attn.attrs
    heads, kv_heads, dim = a["num_heads"], a["num_kv_heads"], a["head_dim"]
    if not a.get("causal", False):
        return m.fail("not causal (GroupQueryAttention is causal only)")
    for v in (query, key, value, past_key, past_value):
        if v.dtype != torch.float32:
            return m.fail(f"%{v.name} is {v.dtype}; only float32 is packed")
    if a.get("softmax_dtype", "float32") != "float32":
        return m.fail(f"softmax in {a['softmax_dtype']}, not float32")
    if not query.shape or len(query.shape) != 4:
        return m.fail(f"query %{query.name} is not (B, H, T, D)")
    batch, seq = query.shape[0], query.shape[2]

    found = []
    for v, n, what in ((query, heads, "query"), (key, kv_heads, "key"), (value, kv_heads, "value")):
        src = match_heads(v, n, dim, batch, seq)
        if not src:
            return m.fail(f"{what}: {src.reason}")
        found.append(src)
    (q, rope_q), (k, rope_k), (v, rope_v) = ((s["x"], s["rope"]) for s in found)
    if rope_v is not None:
        return m.fail(f"the value is rotated (%{rope_v.outputs[0].name})")
    rotary = match_rotary(rope_q, rope_k, dim)
    if not rotary:
        return m.fail(rotary.reason)

    merged = match_merge(attn.outputs[0], heads, dim, batch, seq)
    if not merged:
        return m.fail(merged.reason)

    views = {s["view"] for s in found}
    inputs, linear = [q, k, v], None
    piece = _packing(q, k, v, (heads * dim, kv_heads * dim, kv_heads * dim), batch, seq, views)
    if piece is not None and piece.op == "arc.split_linear":
        linear = piece
    elif piece is not None:
        inputs = [piece.inputs[0]]
    return m.ok(inputs=inputs, linear=linear, rope=rope_q, result=merged["result"],
                chain=merged["chain"], batch=batch, seq=seq)


# x_BHTD = [rope](permute*(view(x_BTX, [B, T, n, D])))  with the permutes composing to (0,2,1,3)
def match_heads(v: Value, n: int, dim: int, batch, seq) -> Match:
    """``x`` [B, T, n*D] (and ``rope``, ``view``) when ``v`` is its heads moved before T."""
    m = Match()
    order, rope, cur = [0, 1, 2, 3], None, v
    while True:
        node = cur.producer
        if node.op == "arc.rope" and rope is None:
            rope, cur = node, node.inputs[0]
            if not cur.shape or cur.shape[-1] != dim:
                return m.fail(f"the rope rotates %{cur.name}, whose last dim is not D={dim}")
            continue
        perm = _permutation(node)
        if perm is None:
            break
        order = [perm[i] for i in order]  # v's axis i is this node's input axis order[i]
        cur = node.inputs[0]
    if order == [0, 1, 2, 3]:
        return m.fail(f"%{cur.name} comes from {cur.producer.op}, not from a transpose of "
                      f"(B, T, n, D) heads")
    if order != [0, 2, 1, 3]:
        return m.fail(f"%{v.name} is not (B, T, n, D) with T and n swapped (the permutes "
                      f"compose to {order})")
    view = cur.producer
    if view.op not in VIEWS:
        return m.fail(f"%{cur.name} comes from {view.op}, not a view of the projection into "
                      f"heads")
    x = view.inputs[0]
    if tuple(cur.shape or ()) != (batch, seq, n, dim):
        return m.fail(f"%{cur.name} is {cur.shape}, not (B, T, n, D) = {(batch, seq, n, dim)}")
    if tuple(x.shape or ()) != (batch, seq, n * dim):
        return m.fail(f"%{x.name} is {x.shape}, not (B, T, n*D) = {(batch, seq, n * dim)}")
    return m.ok(x=x, rope=rope, view=view)


# out_BTX = reshape(permute*(out_BHTD), [B, T, H*D])  with the permutes composing to (0,2,1,3)
def match_merge(out: Value, heads: int, dim: int, batch, seq) -> Match:
    """``result`` [B, T, H*D] and the ``chain`` of nodes from ``out`` to it (all single-use)."""
    m = Match()
    order, cur, chain = [0, 1, 2, 3], out, []
    while True:
        uses = cur.uses()
        if len(uses) != 1 or any(o is cur for o in cur.graph.outputs):
            return m.fail(f"%{cur.name} has {len(uses)} users (or is a graph output); the "
                          f"packed op has no (B, H, T, D) output to give them")
        node, port = uses[0]
        if node.op in VIEWS and port == 0:
            break
        perm = _permutation(node)
        if perm is None:
            return m.fail(f"the attention output goes to {node.op}, not a permute or a "
                          f"reshape to (B, T, H*D)")
        order = [order[p] for p in perm]  # the node's axis i is the output's axis order[i]
        cur = node.outputs[0]
        chain.append(node)
    if order != [0, 2, 1, 3]:
        return m.fail(f"the permutes after the attention compose to {order}, not (0, 2, 1, 3)")
    if tuple(node.outputs[0].shape or ()) != (batch, seq, heads * dim):
        return m.fail(f"%{node.outputs[0].name} is {node.outputs[0].shape}, not (B, T, H*D) = "
                      f"{(batch, seq, heads * dim)}")
    return m.ok(result=node.outputs[0], chain=chain + [node])


def _permutation(node: Node) -> list[int] | None:
    """The axes ``node`` takes its output's axes from, when it only permutes a 4-D tensor."""
    if len(node.outputs) != 1 or not node.inputs or len(node.outputs[0].shape or ()) != 4:
        return None
    if node.op in COPIES:
        return [0, 1, 2, 3]
    if node.op == "aten.transpose.int":
        a, b = node.arg("dim0") % 4, node.arg("dim1") % 4
        perm = [0, 1, 2, 3]
        perm[a], perm[b] = b, a
        return perm
    if node.op == "aten.permute":
        return [d % 4 for d in node.arg("dims")]
    return None


def _packing(q: Value, k: Value, v: Value, sizes: tuple, batch, seq, views: set) -> Node | None:
    """The node whose outputs 0, 1, 2 are q, k, v with ``sizes`` along the last dim: a split
    of one [B, T, X] tensor, or an ``arc.split_linear`` read only by ``views``; else None."""
    node = q.producer
    if (k.producer is not node or v.producer is not node or len(node.outputs) != 3
            or (q.index, k.index, v.index) != (0, 1, 2)
            or tuple(o.shape[-1] for o in node.outputs) != sizes):
        return None
    if node.op in SPLITS:
        whole = node.inputs[0]
        dim = node.arg("dim", 0)
        if (isinstance(dim, int) and dim % 3 == 2
                and tuple(whole.shape or ()) == (batch, seq, sum(sizes))):
            return node
        return None
    if node.op == "arc.split_linear" and node.attrs.get("weight_layout") == "out_in" \
            and list(node.attrs["sizes"]) == list(sizes) \
            and all(user in views for o in node.outputs for user, _ in o.uses()) \
            and not any(o in node.graph.outputs for o in node.outputs):
        return node
    return None


# -- rotary -----------------------------------------------------------------------------------
def match_rotary(rope_q: Node | None, rope_k: Node | None, dim: int) -> Match:
    """q and k rotated alike, in a way GroupQueryAttention's rotary computes."""
    m = Match()
    if rope_q is None and rope_k is None:
        return m.ok()
    if rope_q is None or rope_k is None:
        return m.fail(f"only the {'key' if rope_q is None else 'query'} is rotated")
    if rope_q.attrs != rope_k.attrs or len(rope_q.inputs) != len(rope_k.inputs) or not all(
            _same(a, b) for a, b in zip(rope_q.inputs[1:], rope_k.inputs[1:])):
        return m.fail("the query's and the key's ropes differ (attributes or cos/sin inputs)")
    a = rope_q.attrs
    if a.get("position_source") not in ("inv_freq", "table"):
        return m.fail(f"rope position_source is {a.get('position_source')!r}: how cos/sin "
                      f"come from positions is not proven")
    rot = a["rotary_dim"]
    if rot % 2 or (rot // 2) % 8 or rot > dim:
        return m.fail(f"rotary_dim {rot} of head dim {dim}: GroupQueryAttention's rotary "
                      f"needs rotary_dim / 2 a multiple of 8 and rotary_dim <= D")
    positions = match_positions(rope_q.inputs[3])
    if not positions:
        return m.fail(positions.reason)
    return m.ok()


# pos = past_length + arange(T): arange(P, P + T), or arange(0, P + T)[P:P + T], through
# unit-dim reshapes, broadcasts, integer casts and + 0
def match_positions(pos: Value) -> Match:
    m = Match()
    graph = pos.graph
    past = input_named(graph, graph.meta["kv_cache"].past_length)
    tokens = graph.inputs[0]

    def is_past(s) -> bool:  # P: the past_length input read as a size
        return (isinstance(s, Value) and s.producer.op == "aten._local_scalar_dense"
                and s.producer.inputs[0] is past)

    def is_total(s) -> bool:  # P + T, T the new tokens' count
        if not isinstance(s, Value) or s.producer.op != "sym.add" or len(s.producer.inputs) != 2:
            return False
        length = [x for x in s.producer.inputs if not is_past(x)]
        return len(length) == 1 and _is_length(length[0], tokens)

    node = _peel(pos).producer
    if node.op in ARANGES and is_past(node.arg("start")) and is_total(node.arg("end")) \
            and node.arg("step", 1) == 1:
        return m.ok()
    if node.op == "aten.slice.Tensor" and is_past(node.arg("start")) \
            and is_total(node.arg("end")) and node.arg("step", 1) == 1:
        whole = node.arg("self")
        inner = _peel(whole).producer
        if inner.op in ARANGES and inner.arg("start", 0) == 0 and is_total(inner.arg("end")) \
                and inner.arg("step", 1) == 1 and _unit_dims_only(whole, node.arg("dim", 0)):
            return m.ok()
    return m.fail(f"rope positions %{pos.name} are not provably past_length + arange(T) "
                  f"(they come from {node.op}); GroupQueryAttention computes no others")


def _is_length(s: Value, tokens: Value) -> bool:
    return (s.producer.op == "aten.sym_size.int" and s.producer.arg("self") is tokens
            and s.producer.arg("dim") == 1)


def _peel(v: Value) -> Value:
    """Up through ops that keep each position's integer value: unsqueeze, unit-dim views,
    expand, integer casts and adding or subtracting 0."""
    while True:
        node = v.producer
        if node.op in {"aten.unsqueeze", "aten.expand"} | VIEWS:
            src = node.inputs[0]
            if node.op in VIEWS and _non_unit(src.shape) != _non_unit(v.shape):
                return v
        elif node.op in INT_CASTS and v.dtype in INTEGER:
            src = node.inputs[0]
        elif node.op in {"aten.add.Tensor", "aten.sub.Tensor", "aten.add.Scalar",
                         "aten.sub.Scalar"} and scalar(node.arg("other")) == 0 \
                and node.arg("alpha", 1) == 1:
            src = node.arg("self")
        else:
            return v
        if not isinstance(src, Value) or src.dtype not in INTEGER:
            return v
        v = src


def _same(a: Value, b: Value) -> bool:
    """The same value, or constants with equal contents (fuse_rope adds a table per rope)."""
    return a is b or (a.is_constant and b.is_constant and a.dtype == b.dtype
                      and a.data.shape == b.data.shape and torch.equal(a.data, b.data))


def _non_unit(shape) -> list:
    return [d for d in (shape or ()) if d != 1]


def _unit_dims_only(v: Value, dim: int) -> bool:
    """``v`` has one axis longer than 1 (the positions), the one sliced."""
    shape = v.shape or ()
    return len(_non_unit(shape)) <= 1 and all(d == 1 for i, d in enumerate(shape)
                                              if i != dim % len(shape))


def _rotary_caches(graph: Graph, attn: Node, m: Match, caches: dict, pass_name: str) -> Match:
    """Add the cos/sin caches [rows, rot/2] the matched rope needs (once per graph) to ``m``."""
    rope = m["rope"]
    if rope is None:
        return m
    a = rope.attrs
    rot, scale = a["rotary_dim"], float(a.get("attention_scaling", 1.0))
    if a["position_source"] == "inv_freq":
        inv_freq = rope.inputs[4]
        rows = graph.meta["kv_cache"].max_context
        if not rows:
            return Match().fail("the cache layout records no max_context: the size of the "
                                "rotary cache is unknown")
        key = ("inv_freq", inv_freq, rows, scale)
    else:
        cos_table, sin_table = rope.inputs[4], rope.inputs[5]
        rows, limit = cos_table.shape[0], graph.meta["kv_cache"].max_context
        if limit is None or rows < limit:
            # the model would fail on a position past its table; GroupQueryAttention would
            # read past the cache instead
            return Match().fail(f"the rotary table has {rows} rows, fewer than max_context "
                                f"{limit}")
        key = ("table", cos_table, sin_table, scale)
    if key not in caches:
        exact = (None, None)
        if key[0] == "inv_freq":
            # the model's own product and trig, per position: float(pos) * inv_freq; and the
            # same in float64 for the numeric check (numeric_check.py), which computes the
            # unpacked rope's angles in float64 too
            angles = torch.arange(rows).to(torch.float32)[:, None] * inv_freq.data.reshape(1, -1)
            cos, sin = angles.cos(), angles.sin()
            wide = (inv_freq.exact if inv_freq.exact is not None
                    else inv_freq.data.to(torch.float64)).reshape(1, -1)
            angles64 = torch.arange(rows, dtype=torch.float64)[:, None] * wide
            exact = (angles64.cos(), angles64.sin())
        else:
            cos, sin = cos_table.data, sin_table.data
            exact = (cos_table.exact, sin_table.exact)
        if scale != 1.0:
            cos, sin = cos * scale, sin * scale
            exact = tuple(e * scale if e is not None else None for e in exact)
        if tuple(cos.shape[1:]) != (rot // 2,):
            return Match().fail(f"the rotary table is {tuple(cos.shape)}, not [rows, {rot // 2}]")
        origin = f"{pass_name}/rotary"
        caches[key] = (graph.add_constant(cos.contiguous(), name="rotary_cos_cache",
                                          origin=origin, exact=exact[0]),
                       graph.add_constant(sin.contiguous(), name="rotary_sin_cache",
                                          origin=origin, exact=exact[1]))
    return m.ok(caches=caches[key])


def _rewrite(graph: Graph, attn: Node, m: Match, pass_name: str) -> str:
    _, _, _, past_key, past_value = attn.inputs
    inputs, rule = list(m["inputs"]), "packed" if len(m["inputs"]) == 1 else "separate"
    if m["linear"] is not None:  # merged Q/K/V: one linear whose output is the packed input
        split = m["linear"]
        x, weight, *bias = split.inputs
        width = sum(split.attrs["sizes"])
        args = {"input": x, "weight": weight, **({"bias": bias[0]} if bias else {})}
        inputs = [graph.add_op("aten.linear", args,
                               [(split.outputs[0].dtype, tuple(x.shape[:-1]) + (width,))],
                               module=split.module, origin=f"{pass_name}/packed_linear",
                               names=["qkv_BTX"]).output]
        rule = "packed_linear"
    attrs = {**attn.attrs, "packed": len(inputs) == 1, "rotary_dim": 0,
             "rotary_interleaved": False}
    inputs += [past_key, past_value]
    rope = m["rope"]
    if rope is not None:
        past = input_named(graph, graph.meta["kv_cache"].past_length)
        inputs += [past, *m["caches"]]
        attrs.update(rotary_dim=rope.attrs["rotary_dim"],
                     rotary_interleaved=bool(rope.attrs["interleaved"]))
    result, (_, old_key, old_value) = m["result"], attn.outputs
    packed = graph.add_node("arc.attention_cached_packed", inputs, attrs,
                            outputs=[(result.dtype, result.shape),
                                     (old_key.dtype, old_key.shape),
                                     (old_value.dtype, old_value.shape)],
                            module=attn.module, origin=f"{pass_name}/{rule}",
                            names=["attn_BTX", "present_key", "present_value"])
    result.replace_all_uses_with(packed.outputs[0])
    old_key.replace_all_uses_with(packed.outputs[1])
    old_value.replace_all_uses_with(packed.outputs[2])
    for node in reversed(m["chain"]):
        graph.remove_node(node)
    graph.remove_node(attn)
    # the presents are graph outputs the cache layout names: the new values take the names
    for new, old in ((packed.outputs[1], old_key), (packed.outputs[2], old_value)):
        new.name = old.name
    return rule
