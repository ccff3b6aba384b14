"""Fusion of rotary position embeddings into ``arc.rope``.

Matches, anchored on the ``add`` that ends each application:

- ``rotate_half`` (LLaMA, SmolLM2, GPT-NeoX)::

      # out = x * cos + cat(-x[..., d/2:], x[..., :d/2]) * sin

- ``interleaved`` (GPT-J's ``rotate_every_two``; as exported ``stack + flatten``, after
  ``run_decompositions()`` ``cat(unsqueeze, unsqueeze) + view``)::

      # out = x * cos + stack(-x[..., 1::2], x[..., ::2], -1).flatten(-2) * sin

- ``partial`` (GPT-NeoX ``rotary_pct``, GPT-J ``rotary_dim``), either of the above on the first
  ``rot`` dims, with the rest passed through::

      # out = cat(rope(h[..., :rot]), h[..., rot:], -1)

Produces: ``arc.rope(x, cos, sin, *position_inputs)`` with attrs ``rotary_dim``,
``interleaved``, ``position_source`` and ``attention_scaling``. ``cos`` and ``sin`` stay inputs
(they depend on positions, which the KV-cache pass rewrites). When the pass can prove how they
were computed it records it, for a lowering to ORT's ``RotaryEmbedding``:

- ``position_source="inv_freq"``: ``cos = cos(pos * inv_freq) * s`` (halves duplicated by
  ``cat([f, f])`` for rotate-half, ``repeat_interleave(2)`` for interleaved); inputs 3 and 4
  are the integer ``position_ids`` and the constant ``inv_freq`` ``[rot/2]``.
- ``position_source="table"``: ``sin, cos = split(table[pos])`` from a constant table of
  ``[sin | cos]`` halves (GPT-J); inputs 3..5 are ``position_ids``, ``cos_table`` and
  ``sin_table``, each ``[max_pos, rot/2]`` (ORT's cos_cache / sin_cache).
- ``position_source="unproven"``: cos and sin share angles but how the angles came from
  positions was not recognised (noted with the reason).

Refuses (noted with the reason): halves rotated the wrong way round, slices that are not the
two halves (or the even/odd lanes) of the same tensor, a cos/sin pair not provably taken of the
same angles (or with different layouts or scales), an intermediate with a user outside the
pattern, mixed dtypes, a head dim that is not a known even number.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, NamedTuple

import torch

from arcompile.ir.graph import Graph, Node, Value
from arcompile.passes.base import Pass, PassResult
from arcompile.passes.match import Match, producer, scalar
from arcompile.passes.numeric_check import EXACT

SLICE_TO_END = 2**62  # torch.export writes "to the end" as sys.maxsize
MULS = {"aten.mul.Tensor", "aten.mul.Scalar"}
VIEWS = {"aten.view", "aten.reshape", "aten._unsafe_view"}
CASTS = {"aten.to.dtype", "aten.to.dtype_layout", "aten._to_copy", "aten.type_as"}
# Ops between the angles' cos/sin and the multiply that only broadcast or re-type them.
COS_SIN_PEEL = {"aten.unsqueeze", "aten.expand", "aten.repeat_interleave.self_int"} | VIEWS | CASTS


class FuseRope(Pass):
    """Rotary embeddings -> ``arc.rope``; see the module docstring for the forms matched."""

    name = "fuse_rope"
    # the reference op computes in the model's own order: the same numbers, float64
    # rounding at most
    tolerance = EXACT

    def run(self, graph: Graph) -> PassResult:
        result = PassResult()
        for node in graph.nodes():
            if node not in graph or node.op != "aten.add.Tensor":
                continue
            m = match_rope(node)
            if not m:
                if m.reason and not m.reason.startswith("skip:"):
                    result.note(f"{self.name}: {node.output.name} @ {node.module or '<top>'} "
                                f"not fused: {m.reason}")
                continue
            rule = rewrite(graph, node, m, self.name)
            result.bump(rule)
            if m["position_note"]:
                result.note(f"{self.name}: {node.output.name} @ {node.module or '<top>'} fused "
                            f"without position source: {m['position_note']}")
        return result


# -- pattern ------------------------------------------------------------------------------

def match_rope(add: Node) -> Match:
    """Match ``x * cos + rotate(x) * sin`` ending at ``add``; bindings describe the rewrite."""
    m = Match()
    if add.arg("alpha", 1) != 1:
        return m.fail("skip: add with alpha")
    a, b = add.arg("self"), add.arg("other")
    muls = [producer(a, MULS), producer(b, MULS)]
    if None in muls:
        return m.fail("skip: not a sum of two products")
    # one product is x * cos, the other rotate(x) * sin; try both roles and operand orders
    reasons: list[str] = []
    for mul_cos, mul_sin in (muls, muls[::-1]):
        for rotated, sin in _operand_orders(mul_sin):
            rot = match_rotation(rotated)
            if not rot:
                reasons.append(rot.reason)
                continue
            if not isinstance(sin, Value):
                continue
            x = rot["x"]
            cos = _other_operand(mul_cos, x)
            if cos is None:
                reasons.append(f"the rotated tensor %{x.name} is not also multiplied by cos "
                               f"in %{mul_cos.output.name}")
                continue
            return _check(m, add, mul_cos, mul_sin, x, cos, sin, rot)
    # a sum of products where neither looks rotated is no rope at all: skip it quietly
    real = [r for r in reasons if not r.startswith("skip:")]
    return m.fail(real[0] if real else "skip: no rotated operand")


def _operand_orders(mul: Node) -> list[tuple[Any, Any]]:
    s, o = mul.arg("self"), mul.arg("other")
    return [(s, o), (o, s)]


def _other_operand(mul: Node, x: Value) -> Any:
    s, o = mul.arg("self"), mul.arg("other")
    if s is x and isinstance(o, Value):
        return o
    if o is x and isinstance(s, Value):
        return s
    return None


def _check(m: Match, add: Node, mul_cos: Node, mul_sin: Node, x: Value, cos: Value, sin: Value,
           rot: Match) -> Match:
    d = x.shape[-1] if x.shape else None
    if not isinstance(d, int) or d % 2:
        return m.fail(f"rotated dim of %{x.name} is {d}, not a known even size")
    for v in (cos, sin):
        if v.dtype != x.dtype:
            return m.fail(f"%{v.name} is {v.dtype}, %{x.name} is {x.dtype}")
        if not v.shape or v.shape[-1] != d:
            return m.fail(f"%{v.name} has last dim {v.shape[-1] if v.shape else '?'}, not the "
                          f"rotated dim {d}")
    if cos is sin:
        return m.fail(f"cos and sin are the same tensor %{cos.name}")
    if tuple(add.output.shape or ()) != tuple(x.shape):
        return m.fail(f"cos/sin broadcast %{x.name} {x.shape} up to {add.output.shape}")

    # the pattern's own intermediates may feed nothing but the pattern
    inner = [mul_cos, mul_sin] + rot["nodes"]
    inside = set(inner) | {add}
    for n in inner:
        for user, _ in n.output.uses():
            if user not in inside:
                return m.fail(f"%{n.output.name} ({n.op}) has another user, %"
                              f"{user.outputs[0].name if user.outputs else user.op} ({user.op})")
        if any(o is n.output for o in n.graph.outputs):
            return m.fail(f"%{n.output.name} ({n.op}) is a graph output")

    angles = match_angles(cos, sin, rot["interleaved"])
    if not angles:
        return m.fail(angles.reason)

    partial = match_partial(add, x, inside)
    return m.ok(x=x, cos=cos, sin=sin, interleaved=rot["interleaved"], rotary_dim=d,
                source=partial["source"] if partial else x,
                output=partial["output"] if partial else add.output,
                partial=bool(partial), position=angles["position"],
                attention_scaling=angles["scale"], position_note=angles["note"])


# out = x * cos + rotate(x) * sin: find x from rotate(x)
def match_rotation(rotated: Any) -> Match:
    m = Match()
    cat = producer(rotated, "aten.cat")
    if cat is not None and _is_last_dim(cat.arg("dim", 0), cat.output):
        return _rotate_half(m, cat)
    flat = producer(rotated, {"aten.flatten.using_ints"} | VIEWS)
    if flat is not None:
        return _rotate_every_two(m, flat)
    return m.fail("skip: operand is neither a cat nor a flatten")


# rotate_half(x) = cat(-x[..., d/2:], x[..., :d/2], -1)
def _rotate_half(m: Match, cat: Node) -> Match:
    pieces = cat.arg("tensors")
    if len(pieces) != 2:
        return m.fail(f"skip: cat of {len(pieces)} pieces")
    negs = [producer(p, "aten.neg") for p in pieces]
    if sum(n is not None for n in negs) != 1:
        return m.fail("skip: cat without exactly one negated piece")
    neg_at = 0 if negs[0] is not None else 1
    neg = negs[neg_at]
    neg_slice = producer(neg.arg("self"), "aten.slice.Tensor")
    plain_slice = producer(pieces[1 - neg_at], "aten.slice.Tensor")
    if neg_slice is None or plain_slice is None:
        return m.fail("skip: rotate-half pieces are not slices")
    x = neg_slice.arg("self")
    if plain_slice.arg("self") is not x:
        return m.fail(f"rotate-half slices two different tensors (%{x.name}, "
                      f"%{plain_slice.arg('self').name})")
    d = x.shape[-1] if x.shape else None
    if not isinstance(d, int) or d % 2:
        return m.fail(f"rotated dim of %{x.name} is {d}, not a known even size")
    neg_range, plain_range = _range(neg_slice, x), _range(plain_slice, x)
    if None in (neg_range, plain_range):
        return m.fail("rotate-half slices are not contiguous slices of the last dim")
    h = d // 2
    if neg_at != 0 or neg_range != (h, d) or plain_range != (0, h):
        found = [f"x[..., {r[0]}:{r[1]}]" for r in (neg_range, plain_range)]
        found[0] = "-" + found[0]
        if neg_at:
            found = found[::-1]
        return m.fail(f"halves in the wrong places: cat({', '.join(found)}), rotate-half is "
                      f"cat(-x[..., {h}:{d}], x[..., 0:{h}])")
    return m.ok(x=x, interleaved=False, nodes=[cat, neg, neg_slice, plain_slice])


# rotate_every_two(x) = stack(-x[..., 1::2], x[..., ::2], -1).flatten(-2)
#   decomposed:         view(cat(unsqueeze(-x[..., 1::2], -1), unsqueeze(x[..., ::2], -1), -1))
def _rotate_every_two(m: Match, flat: Node) -> Match:
    inner = flat.inputs[0] if flat.inputs else None
    if not isinstance(inner, Value) or not inner.shape or inner.shape[-1] != 2:
        return m.fail("skip: flatten of something other than pairs")
    if flat.op == "aten.flatten.using_ints":
        r = len(inner.shape)
        if (flat.arg("start_dim", 0) % r, flat.arg("end_dim", -1) % r) != (r - 2, r - 1):
            return m.fail("skip: flatten of other dims than the last two")
    elif not _merges_last_two(inner, flat.output):
        return m.fail("skip: view that does not merge the pair dim")
    nodes = [flat]
    pair = producer(inner, "aten.stack")
    if pair is not None:
        if pair.arg("dim", 0) % len(inner.shape) != len(inner.shape) - 1:
            return m.fail("skip: stack on another dim than the last")
        pieces = list(pair.arg("tensors"))
        nodes.append(pair)
    else:
        pair = producer(inner, "aten.cat")
        if pair is None or not _is_last_dim(pair.arg("dim", 0), inner):
            return m.fail("skip: pairs not built by stack or cat on the last dim")
        nodes.append(pair)
        pieces = []
        for p in pair.arg("tensors"):
            unsq = producer(p, "aten.unsqueeze")
            if unsq is None or unsq.arg("dim") % len(inner.shape) != len(inner.shape) - 1:
                return m.fail("skip: cat pieces are not unsqueezed on the last dim")
            nodes.append(unsq)
            pieces.append(unsq.arg("self"))
    if len(pieces) != 2:
        return m.fail(f"skip: pairs of {len(pieces)} pieces")
    neg = producer(pieces[0], "aten.neg")
    if neg is None:
        if producer(pieces[1], "aten.neg") is not None:
            return m.fail("pairs in the wrong order: stack(x[..., ::2], -x[..., 1::2]), "
                          "rotate_every_two is stack(-x[..., 1::2], x[..., ::2])")
        return m.fail("skip: no negated lane")
    odd, even = producer(neg.arg("self"), "aten.slice.Tensor"), producer(pieces[1], "aten.slice.Tensor")
    if odd is None or even is None:
        return m.fail("interleaved pieces are not strided slices")
    x = odd.arg("self")
    if even.arg("self") is not x:
        return m.fail("interleaved slices take two different tensors")
    lanes = (_lane(odd, x), _lane(even, x))
    if lanes != (1, 0):
        return m.fail(f"interleaved lanes are {lanes}, rotate_every_two negates lane 1 and "
                      f"keeps lane 0: stack(-x[..., 1::2], x[..., ::2])")
    return m.ok(x=x, interleaved=True, nodes=nodes + [neg, odd, even])


def _merges_last_two(inner: Value, out: Value) -> bool:
    """``out`` is ``inner`` [..., n, 2] with its last two dims merged into [..., 2n]."""
    n = inner.shape[-2]
    return (isinstance(n, int) and out.shape is not None
            and tuple(out.shape) == tuple(inner.shape[:-2]) + (2 * n,))


def _is_last_dim(dim: Any, value: Value) -> bool:
    return isinstance(dim, int) and value.shape is not None and dim % len(value.shape) == len(value.shape) - 1


def _range(s: Node, x: Value) -> tuple[int, int] | None:
    """(start, end) of a step-1 slice of the last dim of x, ends clamped; None otherwise."""
    d = x.shape[-1]
    if not _is_last_dim(s.arg("dim", 0), x) or s.arg("step", 1) != 1:
        return None
    start, end = s.arg("start", 0) or 0, s.arg("end", SLICE_TO_END)
    if not isinstance(start, int) or not isinstance(end, int):
        return None
    start, end = (start + d if start < 0 else start), (end + d if end < 0 else end)
    return min(start, d), min(end, d)


def _lane(s: Node, x: Value) -> int | None:
    """Which lane of pairs a step-2 slice of the whole last dim takes (0 even, 1 odd)."""
    if not _is_last_dim(s.arg("dim", 0), x) or s.arg("step", 1) != 2:
        return None
    start, end = s.arg("start", 0) or 0, s.arg("end", SLICE_TO_END)
    if start not in (0, 1) or not isinstance(end, int) or end < x.shape[-1]:
        return None
    return start


# out = cat(rope(h[..., :rot]), h[..., rot:], -1): the fused op takes h and passes the rest
def match_partial(add: Node, x: Value, inside: set[Node]) -> Match:
    m = Match()
    head = producer(x, "aten.slice.Tensor")
    uses = add.output.uses()
    if head is None or len(uses) != 1 or uses[0][0].op != "aten.cat":
        return m.fail("not a partial rotary")
    cat = uses[0][0]
    h = head.arg("self")
    if not h.shape or not isinstance(h.shape[-1], int):
        return m.fail("not a partial rotary")
    rot, d = x.shape[-1], h.shape[-1]
    pieces = cat.arg("tensors")
    if (len(pieces) != 2 or pieces[0] is not add.output or not _is_last_dim(cat.arg("dim", 0), cat.output)
            or _range(head, h) != (0, rot)):
        return m.fail("not a partial rotary")
    tail = producer(pieces[1], "aten.slice.Tensor")
    if tail is None or tail.arg("self") is not h or _range(tail, h) != (rot, d):
        return m.fail("not a partial rotary")
    inside = inside | {cat}
    for n in (head, tail):
        if any(u not in inside for u, _ in n.output.uses()) or any(o is n.output for o in n.graph.outputs):
            return m.fail(f"%{n.output.name} has another user")
    if any(o is add.output for o in add.graph.outputs):
        return m.fail("the rotated part is a graph output")
    return m.ok(source=h, output=cat.output, nodes=[head, tail, cat])


# -- where cos and sin come from ------------------------------------------------------------

@dataclass
class _Chain:
    """What lies between a cos/sin table and the multiply: the base value, the ops walked
    (their layout, for comparing cos with sin) and the scalar factor met on the way."""

    base: Value
    ops: list[tuple] = field(default_factory=list)
    scale: float = 1.0
    repeat_pairs: bool = False  # a repeat_interleave(2) of the last dim was walked


def _peel(v: Value) -> _Chain:
    chain = _Chain(v)
    while True:
        node = chain.base.producer
        if node.op in MULS:
            s, o = node.arg("self"), node.arg("other")
            k, t = (scalar(o), s) if scalar(o) is not None else (scalar(s), o)
            if k is None or not isinstance(t, Value):
                return chain
            chain.scale *= k
            chain.ops.append(("mul", k))
            chain.base = t
            continue
        if node.op not in COS_SIN_PEEL or not node.inputs:
            return chain
        src = node.inputs[0]
        if node.op == "aten.repeat_interleave.self_int" and node.arg("repeats") == 2 \
                and _is_last_dim(node.arg("dim"), node.output):
            chain.repeat_pairs = True
        if node.op in VIEWS and _merges_pairs(src, node.output):
            chain.repeat_pairs = True  # decomposed repeat_interleave: unsqueeze, expand, view
        chain.ops.append((node.op, repr(sorted((k, v) for k, v in node.attrs.items()
                                               if not isinstance(v, (list, tuple))))))
        chain.base = src


def _merges_pairs(src: Value, out: Value) -> bool:
    """``view`` of ``[..., n, 2]`` (an expand of ``[..., n, 1]``) into ``[..., 2n]``."""
    e = producer(src, "aten.expand")
    if e is None or not src.shape or src.shape[-1] != 2 or not out.shape:
        return False
    inner = e.inputs[0]
    return bool(inner.shape) and inner.shape[-1] == 1 and isinstance(src.shape[-2], int) \
        and out.shape[-1] == 2 * src.shape[-2]


def match_angles(cos: Value, sin: Value, interleaved: bool) -> Match:
    """cos and sin must be provably taken of the same angles; then say, if we can, how the
    angles came from positions (bindings ``position``, ``scale``, ``note``)."""
    m = Match()
    c, s = _peel(cos), _peel(sin)
    if c.ops != s.ops or c.scale != s.scale:
        return m.fail(f"cos %{cos.name} and sin %{sin.name} are laid out or scaled differently "
                      f"({[o[0] for o in c.ops]} x{c.scale} vs {[o[0] for o in s.ops]} x{s.scale})")
    cn, sn = c.base.producer, s.base.producer
    if cn.op == "aten.cos" and sn.op == "aten.sin":
        if cn.arg("self") is not sn.arg("self"):
            return m.fail(f"cos and sin are not of the same angles: cos(%{cn.arg('self').name}) "
                          f"and sin(%{sn.arg('self').name})")
        position, note = _inv_freq_source(cn.arg("self"), c, interleaved, cos.shape[-1])
        return m.ok(position=position, scale=c.scale, note=note)
    if cn is sn and cn.op in {"aten.split.Tensor", "aten.split_with_sizes", "aten.chunk"} \
            and c.base is not s.base:
        table = _table_source(cn, c, s, interleaved, cos.shape[-1])
        if not table:
            return m.fail(table.reason)
        return m.ok(position=table["position"], scale=c.scale, note=table["note"])
    return m.fail(f"cannot prove cos %{cos.name} and sin %{sin.name} come from the same angles "
                  f"(they come from {cn.op} and {sn.op})")


# angles = pos[..., None].float() * inv_freq; rotate-half: cat([angles, angles], -1)
def _inv_freq_source(angles: Value, chain: _Chain, interleaved: bool, rot: int):
    half = angles
    if interleaved:
        if not chain.repeat_pairs:  # repeat_interleave taken of the angles, before cos/sin
            half = _unrepeat_pairs(angles)
            if half is None:
                return None, f"interleaved angles %{angles.name} are not repeat_interleave(2)'d"
    else:
        cat = producer(angles, "aten.cat")
        pieces = cat.arg("tensors") if cat is not None else []
        if len(pieces) != 2 or pieces[0] is not pieces[1] or not _is_last_dim(cat.arg("dim", 0), angles):
            return None, f"angles %{angles.name} are not cat([f, f], -1)"
        half = pieces[0]
    mul = producer(half, MULS)
    if mul is None:
        return None, f"angles %{half.name} come from {half.producer.op}, not pos * inv_freq"
    for pos_f, inv in _operand_orders(mul):
        if not (isinstance(inv, Value) and inv.is_constant and inv.data.numel() == rot // 2):
            continue
        if inv.data.dim() and inv.data.shape[-1] != rot // 2:
            continue
        # walk up casts and unsqueezes to the integer position ids, as high as they go
        pos, ids = pos_f, None
        while isinstance(pos, Value):
            if pos.dtype in (torch.int64, torch.int32):
                ids = pos
            if pos.producer.op not in CASTS | {"aten.unsqueeze"} | VIEWS:
                break
            pos = pos.producer.inputs[0]
        if ids is None:
            return None, f"positions %{pos_f.name} do not come from an integer tensor"
        return ("inv_freq", [ids, inv]), None
    return None, f"no constant inv_freq of {rot // 2} elements in %{half.name}"


def _unrepeat_pairs(v: Value) -> Value | None:
    """f when ``v`` is repeat_interleave(f, 2, -1), as exported or decomposed; else None."""
    node = v.producer
    if node.op == "aten.repeat_interleave.self_int" and node.arg("repeats") == 2 \
            and _is_last_dim(node.arg("dim"), v):
        return node.arg("self")
    if node.op in VIEWS and _merges_pairs(node.inputs[0], v):
        unsq = producer(producer(node.inputs[0], "aten.expand").inputs[0], "aten.unsqueeze")
        if unsq is not None and unsq.arg("dim") % len(unsq.output.shape) == len(unsq.output.shape) - 1:
            return unsq.arg("self")
    return None


class _Table(NamedTuple):
    """A cos or sin cache cut from the model's table, and its float64 value if it has one."""

    data: torch.Tensor
    exact: torch.Tensor | None


# sin, cos = split(table[pos], rot/2, -1); cos = repeat_interleave(cos, 2, -1)
def _table_source(split: Node, c: _Chain, s: _Chain, interleaved: bool, rot: int) -> Match:
    m = Match()
    index = producer(split.inputs[0], "aten.index.Tensor")
    table = index.arg("self") if index is not None else None
    indices = index.arg("indices") if index is not None else None
    if table is None or not table.is_constant or len(indices) != 1 or indices[0] is None:
        return m.fail(f"cannot prove cos and sin come from the same angles: {split.op} of "
                      f"{split.inputs[0].producer.op}, not of a constant table indexed by position")
    dim = split.arg("dim", 0)
    if not _is_last_dim(dim, split.inputs[0]) or table.data.dim() != 2:
        return m.fail("cos/sin table split along another dim than the last")
    half_w = c.base.shape[-1]
    if s.base.shape[-1] != half_w or table.data.shape[-1] != 2 * half_w:
        return m.fail("cos/sin table is not two equal halves")
    offset = {v: i * half_w for i, v in enumerate(split.outputs)}
    cos_t = table.data[:, offset[c.base]:offset[c.base] + half_w]
    sin_t = table.data[:, offset[s.base]:offset[s.base] + half_w]
    if not torch.allclose(cos_t.double() ** 2 + sin_t.double() ** 2,
                          torch.ones((), dtype=torch.float64), atol=1e-4):
        return m.fail("the table halves are not cos and sin of the same angles "
                      "(cos^2 + sin^2 != 1)")
    pos = indices[0]
    # a folded table keeps its float64 value (constant_folding.py); the caches keep theirs
    wide = table.exact if table.exact is not None else None

    def cache(half: Value, width: int) -> _Table:
        at = offset[half]
        return _Table(table.data[:, at:at + width],
                      wide[:, at:at + width] if wide is not None else None)
    if interleaved and c.repeat_pairs and half_w == rot // 2:
        # views of the model's table: the lowering writes its storage once for every layer
        return m.ok(position=("table", [pos, cache(c.base, half_w), cache(s.base, half_w)]),
                    note=None)
    if not interleaved and half_w == rot:
        # rotate-half tables hold [cos(f) | cos(f)]; the cache is the first half
        return m.ok(position=("table", [pos, cache(c.base, rot // 2), cache(s.base, rot // 2)]),
                    note=None) if torch.equal(cos_t[:, :rot // 2], cos_t[:, rot // 2:]) \
            else m.ok(position=None, note="table halves are not duplicated")
    return m.ok(position=None, note="table layout not recognised")


# -- rewrite ---------------------------------------------------------------------------------

def rewrite(graph: Graph, add: Node, m: Match, pass_name: str) -> str:
    rule = ("interleaved" if m["interleaved"] else "rotate_half") + ("_partial" if m["partial"] else "")
    inputs = [m["source"], m["cos"], m["sin"]]
    attrs: dict[str, Any] = {"rotary_dim": m["rotary_dim"], "interleaved": m["interleaved"],
                             "position_source": "unproven",
                             "attention_scaling": m["attention_scaling"]}
    if m["position"] is not None:
        kind, extra = m["position"]
        attrs["position_source"] = kind
        for i, t in enumerate(extra):
            if isinstance(t, _Table):  # table caches: new constants [max_pos, rot/2]
                t = graph.add_constant(t.data, name=f"rope_{('cos', 'sin')[i - 1]}_table",
                                       module=add.module, origin=f"{pass_name}/{rule}",
                                       exact=t.exact)
            elif t.is_constant and t.data.dim() != 1:  # inv_freq as [rot/2]
                t = graph.add_constant(t.data.reshape(-1), name="rope_inv_freq",
                                       module=add.module, origin=f"{pass_name}/{rule}",
                                       exact=t.exact.reshape(-1) if t.exact is not None else None)
            inputs.append(t)
    out = m["output"]
    node = graph.add_node("arc.rope", inputs, attrs, [(out.dtype, out.shape)],
                          module=add.module, origin=f"{pass_name}/{rule}",
                          names=[f"rope_{out.name}"])
    out.replace_all_uses_with(node.output)
    _remove_dead(graph, out.producer)
    return rule


def _remove_dead(graph: Graph, root: Node) -> None:
    """Remove ``root`` and the producers it leaves without users (the old pattern)."""
    stack = [root]
    while stack:
        node = stack.pop()
        if node not in graph or node.op in ("arc.input", "arc.constant"):
            continue
        if any(graph.has_uses(v) for v in node.outputs):
            continue
        producers = [v.producer for v in node.inputs]
        graph.remove_node(node)
        stack.extend(producers)
