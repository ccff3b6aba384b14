"""Fusion of causal self-attention into one ``arc.attention`` op, however it was written.

Matches, one rule each:
- ``sdpa``: ``aten.scaled_dot_product_attention`` as torch.export keeps it, with
  ``is_causal`` or an ``attn_mask`` (bool, or an additive bias) and with ``enable_gqa`` or
  keys/values repeated by ``repeat_kv`` (expand + reshape).
- ``explicit``: attention written out (``attention_patterns.py`` has the formula): hand-written
  ``q @ k^T * scale``, masked_fill / where / additive bias, softmax, ``@ v`` (GPT-2 eager,
  nanoGPT, their TorchScript traces), and sdpa after ``run_decompositions()`` (bmm on 3-D
  views, the scale split between q and k^T, ``_safe_softmax``'s guard).
Produces: ``arc.attention(query_BHqLD, key_BHkvSD, value_BHkvSD)`` with attrs ``num_heads``,
``num_kv_heads``, ``head_dim``, ``scale``, ``causal`` (always True here), ``mask_kind``
(``is_causal`` / ``bool`` / ``additive``) and ``softmax_dtype``; a ``repeat_kv`` is seen
through so the op takes the KV heads as they are (the repeat becomes dead code).
Refuses, with a note saying why: a mask that is not provably causal (``attention_mask.py``
evaluates it for several sizes: a sliding window or a bidirectional mask stays unfused), a mask
built from token values, no mask at all, dropout, an intermediate (scores, probs) that
another node also uses, shapes that are not (B, H, T, D) with static heads.
Tolerance: the fused op computes the same maths in another order (and drops the
fully-masked-row guard, which a causal mask never triggers): ``EXACT`` in float64.
"""

from __future__ import annotations

import math

from arcompile.ir.graph import Graph, Node, Value
from arcompile.passes.attention_mask import mask_reason
from arcompile.passes.attention_patterns import (
    CASTS,
    RESHAPES,
    key_from_transposed,
    mask_step,
    matmul_operands,
    peel_scale,
    softmax_input,
    unrepeat_kv,
)
from arcompile.passes.base import Pass, PassResult
from arcompile.passes.match import Match, scalar
from arcompile.passes.numeric_check import EXACT


class FuseAttention(Pass):
    """See the module docstring."""

    name = "fuse_attention"
    tolerance = EXACT

    def run(self, graph: Graph) -> PassResult:
        result = PassResult()
        proofs: dict[tuple, str | None] = {}  # one mask serves every layer: prove it once
        for node in graph.nodes():
            if node not in graph:
                continue
            if node.op == "aten.scaled_dot_product_attention":
                rule, m = "sdpa", self._match_sdpa(node)
            elif node.op in ("aten.matmul", "aten.bmm"):
                rule, m = "explicit", self._match_explicit(node)
                if not m and "softmax" not in m.bindings:
                    continue  # a plain matmul, not the end of an attention
            else:
                continue
            if m and m["mask"] is not None:
                key = (m["mask"], m["keep"], m["query"].shape, m["key"].shape)
                if key not in proofs:
                    proofs[key] = mask_reason(m["mask"], m["keep"], m["query"], m["key"])
                if proofs[key]:
                    m.fail(proofs[key])
            if not m:
                result.note(f"{node.module or node.outputs[0].name}: attention not fused: "
                            f"{m.reason}")
                continue
            self._rewrite(graph, m, rule)
            result.bump(rule)
        return result

    # -- sdpa -------------------------------------------------------------------------
    def _match_sdpa(self, node: Node) -> Match:
        m = Match()
        if node.arg("dropout_p"):
            return m.fail("attention has dropout; export in eval mode")
        query = node.arg("query")
        key, value = unrepeat_kv(node.arg("key")), unrepeat_kv(node.arg("value"))
        mask, causal = node.arg("attn_mask"), bool(node.arg("is_causal", False))
        if mask is not None and causal:
            return m.fail("both is_causal and an attn_mask")
        if mask is None and not causal:
            return m.fail("no mask: the attention is bidirectional, not causal")
        if causal and query.shape[-2] != key.shape[-2]:
            return m.fail("is_causal with query and key lengths that may differ")
        scale = node.arg("scale")
        if scale is None and isinstance(query.shape[-1], int):
            scale = 1.0 / math.sqrt(query.shape[-1])
        if scalar(scale) is None:
            return m.fail(f"scale {scale!r} is not a constant")
        keep = "additive" if mask is not None and mask.dtype.is_floating_point else "true"
        kind = "is_causal" if causal else ("additive" if keep == "additive" else "bool")
        return _finish(m, node.output, [node], query, key, value, scalar(scale), mask, keep,
                       kind, str(query.dtype).removeprefix("torch."))

    # -- explicit ---------------------------------------------------------------------
    def _match_explicit(self, node: Node) -> Match:
        m, interior = Match(), []
        if node.op == "aten.matmul":
            out = node.output
        else:  # bmm: the rank-4 view of its result is the attention's output
            users = node.output.uses()
            if len(users) != 1 or users[0][0].op not in RESHAPES:
                return m.fail("bmm result is not viewed back to rank 4")
            out = users[0][0].output
        operands = matmul_operands(out, interior, own_first=True)
        if isinstance(operands, Match):
            return operands
        probs, value = operands
        found = softmax_input(probs, interior)
        if isinstance(found, Match):
            return found
        softmax, scores = found
        m.bindings["softmax"] = softmax  # from here on, failures are worth a note

        # Walk the scores back to the first matmul: casts, scale factors, one mask.
        scale, mask, keep = 1.0, None, None
        while True:
            if scores.producer.op in CASTS:
                interior.append(scores.producer)
                scores = scores.producer.arg("self")
                continue
            unscaled, factor = peel_scale(scores, interior)
            if unscaled is not scores:
                scores, scale = unscaled, scale * factor
                continue
            step = mask_step(scores)
            if isinstance(step, Match):
                return m.fail(step.reason)
            if step is None:
                break
            if mask is not None:
                return m.fail("two masks applied to the scores")
            scores, mask, keep, mask_node = step
            interior.append(mask_node)
        operands = matmul_operands(scores, interior)
        if isinstance(operands, Match):
            return m.fail(operands.reason)
        query, key_t = operands
        query, q_factor = peel_scale(query)
        found = key_from_transposed(key_t)
        if isinstance(found, Match):
            return m.fail(found.reason)
        key, k_factor = found
        if mask is None:
            return m.fail("no mask: the attention is bidirectional, not causal")
        kind = "additive" if keep == "additive" else "bool"
        return _finish(m, out, interior, query, unrepeat_kv(key), unrepeat_kv(value),
                       scale * q_factor * k_factor, mask, keep, kind,
                       str(softmax.output.dtype).removeprefix("torch."))

    # -- rewrite ----------------------------------------------------------------------
    def _rewrite(self, graph: Graph, m: Match, rule: str) -> None:
        out: Value = m["out"]
        anchor = m["interior"][0]
        fused = graph.add_node("arc.attention", (m["query"], m["key"], m["value"]), m["attrs"],
                               outputs=[(out.dtype, out.shape)], module=anchor.module,
                               origin=f"{self.name}/{rule}", names=["attn_BHqTD"])
        out.replace_all_uses_with(fused.output)
        pending = list(m["interior"])
        while pending:  # users before producers; nothing outside uses them (checked)
            dead = [n for n in pending if not any(graph.has_uses(v) for v in n.outputs)]
            for n in dead:
                graph.remove_node(n)
            pending = [n for n in pending if n not in dead]
            if not dead:
                break


def _finish(m: Match, out: Value, interior: list[Node], query: Value, key: Value, value: Value,
            scale: float, mask: Value | None, keep: str | None, kind: str,
            softmax_dtype: str) -> Match:
    """Check shapes and exclusive use, and bind what the rewrite needs."""
    shapes = [t.shape for t in (query, key, value)]
    if any(s is None or len(s) != 4 for s in shapes):
        return m.fail("query, key and value are not rank 4 (B, H, T, D)")
    heads, kv_heads, head_dim = query.shape[1], key.shape[1], query.shape[3]
    if not all(isinstance(d, int) for d in (heads, kv_heads, head_dim, value.shape[1])):
        return m.fail("head counts or head size are not static")
    if heads % kv_heads or value.shape[1] != kv_heads:
        return m.fail(f"{heads} query heads cannot share {kv_heads} key / "
                      f"{value.shape[1]} value heads")
    if key.shape[3] != head_dim or value.shape[3] != head_dim or key.shape[2] != value.shape[2]:
        return m.fail(f"key {key.shape} / value {value.shape} do not fit query {query.shape}")
    if len({query.dtype, key.dtype, value.dtype}) != 1:
        return m.fail("query, key and value have different dtypes")
    inside = set(interior)
    for node in interior:
        for v in node.outputs:
            if v is out:
                continue
            if any(o is v for o in v.graph.outputs):
                return m.fail(f"intermediate %{v.name} ({node.op}) is a graph output")
            other = [u.op for u, _ in v.uses() if u not in inside]
            if other:
                return m.fail(f"intermediate %{v.name} ({node.op}) has another user ({other[0]})")
    if math.isclose(scale, 1 / math.sqrt(head_dim), rel_tol=1e-9):
        scale = 1 / math.sqrt(head_dim)  # sqrt(scale) on q and on k^T, multiplied back
    attrs = {"num_heads": heads, "num_kv_heads": kv_heads, "head_dim": head_dim,
             "scale": float(scale), "causal": True, "mask_kind": kind,
             "softmax_dtype": softmax_dtype}
    return m.ok(out=out, interior=interior, query=query, key=key, value=value, mask=mask,
                keep=keep, attrs=attrs)
