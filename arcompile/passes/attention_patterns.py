"""The pieces of an attention written out by hand, matched backwards from ``probs @ value``.

    scores_BHLS = query_BHLD @ key_BHSD^T            # matmul, or view(bmm(view(q), view(kT)))
    scores      = scores * c | scores / c            # the scale, anywhere on the chain, also
                                                     #   folded into q and kT (decomposed sdpa)
    scores      = masked_fill(scores, drop, -inf)    # or where(keep, scores, -inf),
                | where(keep, scores, -inf)          #   or scores + bias (0 / -inf-like);
                | scores + bias                      #   at most one mask
    probs       = softmax(scores.to(f32), -1)        # _softmax / softmax; _safe_softmax's
    probs       = where(all_dropped, 0, probs)       #   guard for fully masked rows
    out_BHLD    = probs @ value_BHSD                 # matmul, or view(bmm(view(p), view(v)))

and grouped-query keys/values written as ``repeat_kv``:

    key_BHqSD = key_BHkvSD[:, :, None].expand(B, Hkv, Hq / Hkv, S, D).reshape(B, Hq, S, D)

Every function returns a ``Match`` that says why it failed. ``interior`` collects the nodes
between the two matmuls: they are removed by the rewrite, so none may have another user.
"""

from __future__ import annotations

from typing import Any

from arcompile.ir.graph import Node, Value
from arcompile.passes.attention_mask import is_neg_fill
from arcompile.passes.match import CASTS, TRANSPARENT, Match, producer, scalar, through

SOFTMAX = {"aten.softmax.int", "aten._softmax", "aten._safe_softmax"}
RESHAPES = {"aten.view", "aten.reshape", "aten._unsafe_view"}
MULS = {"aten.mul.Tensor", "aten.mul.Scalar"}
DIVS = {"aten.div.Tensor", "aten.div.Scalar"}
WHERES = {"aten.where.self", "aten.where.ScalarOther", "aten.where.ScalarSelf",
          "aten.where.Scalar"}
MASKED_FILLS = {"aten.masked_fill.Scalar", "aten.masked_fill.Tensor"}


def unbatch(value: Value, rank: int = 4) -> Value | None:
    """The nearest rank-4 [B, H, X, Y] value a [B*H, X, Y] bmm operand was viewed from."""
    v = value
    while v.producer.op in RESHAPES:
        v = v.producer.arg("self")
        if v.shape is not None and len(v.shape) == rank and v.shape[-2:] == value.shape[-2:]:
            return v
    return None


def matmul_operands(value: Value, interior: list[Node],
                    own_first: bool = False) -> tuple[Value, Value] | Match:
    """(a, b) for ``value = a @ b`` on rank-4 operands, seeing through a bmm's 3-D views.
    With ``own_first`` the views of ``a`` (the probs) belong to the pattern too."""
    node = value.producer
    if node.op == "aten.matmul":
        a, b = node.arg("self"), node.arg("other")
        if any(not isinstance(t, Value) or t.shape is None or len(t.shape) != 4 for t in (a, b)):
            return Match().fail("matmul operands are not rank 4 (B, H, T, D)")
        interior.append(node)
        return a, b
    if node.op in RESHAPES and producer(node.arg("self"), "aten.bmm"):
        bmm = node.arg("self").producer
        a, b = unbatch(bmm.arg("self")), unbatch(bmm.arg("mat2"))
        if a is None or b is None or len(value.shape) != 4 or a.shape[:2] != value.shape[:2]:
            return Match().fail("bmm operands are not views of rank-4 (B, H, T, D) tensors")
        interior.extend((node, bmm))
        view = bmm.arg("self").producer
        while own_first and view.op in RESHAPES:
            interior.append(view)
            view = view.arg("self").producer
        return a, b
    return Match().fail(f"{value.name} is made by {node.op}, not a matmul")


def peel_scale(value: Value, interior: list[Node] | None = None) -> tuple[Value, float]:
    """Walk up through multiplications and divisions by a constant: (value, product).
    The nodes walked through are added to ``interior`` when given."""
    factor = 1.0
    while True:
        node = value.producer
        a, b = node.arg("self"), node.arg("other")
        if node.op in MULS and scalar(b) is not None and isinstance(a, Value):
            value, factor = a, factor * scalar(b)
        elif node.op in MULS and scalar(a) is not None and isinstance(b, Value):
            value, factor = b, factor * scalar(a)
        elif node.op in DIVS and scalar(b) is not None and scalar(b) != 0 and isinstance(a, Value):
            value, factor = a, factor / scalar(b)
        else:
            return value, factor
        if interior is not None:
            interior.append(node)


def key_from_transposed(key_t: Value) -> tuple[Value, float] | Match:
    """``key_t = (key * c).transpose(-1, -2)`` in any order: (key_BHSD, c)."""
    key_t, factor = peel_scale(key_t)
    node = key_t.producer
    if node.op == "aten.transpose.int":
        dims = sorted(d % 4 for d in (node.arg("dim0"), node.arg("dim1")))
        ok = dims == [2, 3]
    elif node.op == "aten.permute":
        ok = [d % 4 for d in node.arg("dims")] == [0, 1, 3, 2]
    else:
        return Match().fail(f"the key operand is made by {node.op}, not a transpose of the key")
    if not ok:
        return Match().fail("the key operand transposes other dims than the last two")
    key, more = peel_scale(node.arg("self"))
    return key, factor * more


def unrepeat_kv(kv: Value) -> Value:
    """The KV heads before ``repeat_kv`` (see the module docstring); ``kv`` itself if it is
    not a repeat."""
    expand = producer(through(kv, TRANSPARENT), "aten.expand")
    if expand is None:
        return kv
    unsqueeze = producer(through(expand.arg("self"), TRANSPARENT), "aten.unsqueeze")
    if unsqueeze is None or unsqueeze.arg("dim") % 5 != 2:
        return kv
    src = unsqueeze.arg("self")
    wide = expand.output.shape  # (B, Hkv, rep, S, D)
    if (src.shape is None or len(src.shape) != 4 or len(wide) != 5 or wide[1] != src.shape[1]
            or wide[3:] != src.shape[2:] or wide[0] != kv.shape[0]
            or not all(isinstance(d, int) for d in (wide[1], wide[2], kv.shape[1]))
            or wide[1] * wide[2] != kv.shape[1] or kv.shape[2:] != src.shape[2:]):
        return kv
    return src


def softmax_input(probs: Value, interior: list[Node]) -> tuple[Node, Value] | Match:
    """From the probs operand of the second matmul back to (softmax node, its input)."""
    node = probs.producer
    while node.op in RESHAPES:  # bmm's 3-D view of the probs
        interior.append(node)
        probs, node = node.arg("self"), node.arg("self").producer
    softmax = producer(node.arg("other"), SOFTMAX) if node.op in WHERES else None
    if softmax is not None and _is_zero_fill(node.arg("self")):
        guard = _guard_nodes(node, softmax)
        if guard is None:
            return Match().fail("the probs go through a where that is not softmax's guard "
                                "for fully masked rows")
        interior.append(node)
        interior.extend(guard)
        probs, node = node.arg("other"), softmax
    if node.op in CASTS:  # softmax computed in another dtype, cast back
        interior.append(node)
        probs, node = node.arg("self"), node.arg("self").producer
    if node.op not in SOFTMAX:
        return Match().fail(f"the probs of 'probs @ value' come from {node.op}, not softmax")
    dim = node.arg("dim")
    if dim is None or dim % len(probs.shape) != len(probs.shape) - 1:
        return Match().fail(f"softmax is over dim {dim}, not the last (keys)")
    interior.append(node)
    return node, node.arg("self")


def _is_zero_fill(v: Any) -> bool:
    if scalar(v) == 0.0:
        return True
    node = producer(v, {"aten.full_like", "aten.zeros_like"})
    return node is not None and node.arg("fill_value", 0) == 0


def _guard_nodes(where: Node, softmax: Node) -> list[Node] | None:
    """The nodes of ``where(~any(~(scores == -inf), -1), 0, probs)``, the guard that zeroes a
    row whose keys are all masked (never, once the mask is proven causal); None when
    ``where`` is anything else."""
    found: list[Node] = []
    value = where.arg("condition")
    for op in ("aten.logical_not", "aten.any.dim", "aten.logical_not", "aten.eq.Scalar"):
        node = producer(value, op)
        if node is None:
            return None
        found.append(node)
        value = node.arg("self")
    eq, any_ = found[3], found[1]
    if value is not softmax.arg("self") or eq.arg("other") != float("-inf"):
        return None
    if any_.arg("dim") % len(value.shape) != len(value.shape) - 1:
        return None
    fill = producer(where.arg("self"), {"aten.full_like", "aten.zeros_like"})
    return found + ([fill] if fill is not None else [])


def mask_step(value: Value) -> tuple[Value, Value, str, Node] | Match | None:
    """If ``value`` is the scores with a mask applied: (scores, mask, keep, node), where
    ``keep`` reads the mask as in ``attention_mask.mask_reason``. None when no mask op."""
    node = value.producer
    if node.op in MASKED_FILLS:
        if not is_neg_fill(scalar(node.arg("value"))):
            return Match().fail("masked_fill fills with a value that is not -inf-like")
        return node.arg("self"), node.arg("mask"), "false", node
    if node.op in WHERES:
        a, b = node.arg("self"), node.arg("other")
        if isinstance(a, Value) and a.shape == value.shape and is_neg_fill(scalar(b)):
            return a, node.arg("condition"), "true", node
        if isinstance(b, Value) and b.shape == value.shape and is_neg_fill(scalar(a)):
            return b, node.arg("condition"), "false", node
        return Match().fail("where does not choose between the scores and -inf")
    if node.op == "aten.add.Tensor":
        a, b = node.arg("self"), node.arg("other")
        if not (isinstance(a, Value) and isinstance(b, Value)):
            return None
        # the scores operand has the full scores shape and leads to a matmul
        for scores, bias in ((a, b), (b, a)):
            if scores.shape == value.shape and _leads_to_matmul(scores):
                return scores, bias, "additive", node
        return Match().fail("add of two tensors, neither of them the scores")
    return None


def _leads_to_matmul(value: Value) -> bool:
    value, _ = peel_scale(through(value, CASTS))
    node = value.producer
    return node.op == "aten.matmul" or (node.op in RESHAPES
                                        and producer(node.arg("self"), "aten.bmm") is not None)
