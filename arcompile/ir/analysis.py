"""Questions about a graph's structure that passes and lowerings both ask: which ops only
move a tensor, which linear makes the logits, which nodes exist only for one value."""

from __future__ import annotations

from arcompile.ir.graph import Graph, Node, Value

# Ops that move or re-type a tensor without changing its values' meaning; patterns look
# through them where the formula does not care about layout or a no-op cast.
TRANSPARENT = {"aten.view", "aten.reshape", "aten._unsafe_view", "aten.clone",
               "aten.contiguous", "aten.alias", "aten.detach"}


def is_lm_head(graph: Graph, node: Node, weight: Value) -> bool:
    """The linear whose result is the logits (through views), or that reads an embedding's
    table (tied weights)."""
    if any(user.op == "aten.embedding" for user, _ in weight.uses()):
        return True
    out = node.outputs[0]
    while out not in graph.outputs:
        uses = out.uses()
        if len(uses) != 1 or uses[0][0].op not in TRANSPARENT:
            return False
        out = uses[0][0].outputs[0]
    return True


def exclusive_cone(out: Value) -> list[Node]:
    """The nodes computed only for ``out``: its producer, and every producer all of whose
    outputs only cone members read (never a graph output, an input or a constant)."""
    members: set[Node] = set()
    pending = [out.producer]
    while pending:
        node = pending.pop()
        if node in members or node.op in ("arc.input", "arc.constant"):
            continue
        if node is not out.producer and (
                any(o is v for v in node.outputs for o in node.graph.outputs)
                or any(c not in members for v in node.outputs for c, _ in v.uses())):
            continue  # read outside the cone: seen again if a later member is its last reader
        members.add(node)
        pending.extend(v.producer for v in node.inputs)
    return sorted(members, key=lambda n: n.order)


def vocabulary(graph: Graph) -> int | None:
    """The token vocabulary: the smallest embedding table that reads the first input (None
    when no embedding does)."""
    rows = [n.arg("weight").shape[0] for n, _ in graph.inputs[0].uses()
            if n.op == "aten.embedding" and isinstance(n.arg("weight").shape[0], int)]
    return min(rows) if rows else None
