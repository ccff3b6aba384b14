"""Fuse gated MLPs (LLaMA / SmolLM2 / Mistral / Gemma): ``down(act(gate(x)) * up(x))``.

Matches, anchored on every linear (the down projection), in both traced forms — ``aten.linear``
as exported, ``aten.mm``/``aten.addmm`` over 2-D views after ``run_decompositions()`` — looking
through reshapes that keep the last dim (they only regroup rows, so row i stays row i):

    y = down(act(gate(x)) * up(x))
      = (act(x @ Wg^T + bg) * (x @ Wu^T + bu)) @ Wd^T + bd

with act one of ``aten.silu`` (or its decomposed ``g * sigmoid(g)``), ``aten.gelu`` exact
(``gelu``) or tanh (``gelu_tanh``). The product is commutative and exact in floating point,
so ``up(x) * act(gate(x))`` matches too; which projection is the "gate" is decided by where the
activation sits, not by module names, so a model that writes ``act(up(x)) * gate(x)`` is the
same formula with the names swapped and fuses identically.
Produces: ``arc.gated_mlp(x, w_gate, w_up, w_down, *biases)`` with attrs ``activation``,
``weight_layout`` ("out_in" for aten.linear, "in_out" for mm/addmm) and ``has_bias``
([gate, up, down]); rule ``gated_mlp``. The ONNX lowering runs gate and up as ONE matmul over
their weights concatenated (streamed to one initializer), then Split, act, Mul, MatMul.
Refuses (with a note): a product whose factors are not act(linear) and linear (for instance
GPT-2/OPT/nanoGPT's non-gated ``down(act(up(x)))``, noted when the down projection reads an
activation), gate and up reading different inputs, an intermediate (gate or up output, the
activation, the product) with another user, a broadcasting product, mixed weight layouts
or dtypes.
"""

from __future__ import annotations

from arcompile.ir.graph import Graph, Node, Value
from arcompile.passes.base import Pass, PassResult
from arcompile.passes.match import Match, producer, single_use
from arcompile.passes.merge_linears import Linear, as_linear, common_module
from arcompile.passes.numeric_check import EXACT

RESHAPES = {"aten.view", "aten.reshape", "aten._unsafe_view"}
ACTIVATION_OPS = {"aten.silu", "aten.gelu", "aten.sigmoid", "aten.relu", "aten.tanh"}


def through_rows(value: Value) -> tuple[Value, list[Node]]:
    """Walk up through reshapes that keep the last dim; the source and the reshapes passed."""
    passed: list[Node] = []
    while (isinstance(value, Value) and value.producer.op in RESHAPES and value.shape
           and value.producer.inputs and value.producer.inputs[0].shape
           and value.producer.inputs[0].shape[-1] == value.shape[-1]):
        passed.append(value.producer)
        value = value.producer.inputs[0]
    return value, passed


def match_activation(value: Value) -> Match:
    """``Match(activation, pre, nodes)`` when ``value`` is act(pre) for a supported act."""
    m = Match()
    node = producer(value)
    if node is None:
        return m.fail("not computed")
    if node.op == "aten.silu":
        return m.ok(activation="silu", pre=node.arg("self"), nodes=[node])
    if node.op == "aten.gelu":
        kind = {"none": "gelu", "tanh": "gelu_tanh"}.get(node.arg("approximate", "none"))
        if kind is None:
            return m.fail(f"gelu with approximate={node.arg('approximate')!r}")
        return m.ok(activation=kind, pre=node.arg("self"), nodes=[node])
    if node.op == "aten.mul.Tensor":  # silu decomposed: g * sigmoid(g)
        a, b = node.arg("self"), node.arg("other")
        for g, s in ((a, b), (b, a)):
            sig = producer(s, "aten.sigmoid")
            if sig is not None and sig.arg("self") is g:
                if not single_use(s):
                    return m.fail(f"sigmoid %{s.name} of the decomposed silu has another user")
                return m.ok(activation="silu", pre=g, nodes=[sig, node])
        return m.fail(f"%{value.name} is a product, not g * sigmoid(g)")
    if node.op in ACTIVATION_OPS:
        return m.fail(f"activation {node.op} is not supported (silu, gelu, gelu tanh)")
    return m.fail(f"%{value.name} comes from {node.op}, not an activation")


def match_projection(value: Value, role: str) -> Match:
    """``Match(linear, nodes)``: ``value`` is a linear's output, maybe through row reshapes."""
    m = Match()
    src, reshapes = through_rows(value)
    found = as_linear(producer(src))
    if not found:
        return m.fail(f"the {role} factor is not a linear: {found.reason}")
    return m.ok(linear=found["linear"], nodes=reshapes + [src.producer])


class FuseGatedMLP(Pass):
    """See the module docstring: ``down(act(gate(x)) * up(x))`` → arc.gated_mlp."""

    name = "fuse_mlp"
    # same maths; the decomposed form (g * sigmoid(g), mm over views) rounds differently from
    # F.silu and F.linear (float32: 3.6e-5 on SmolLM2's decomposed logits), float64 rounding
    # only in the check
    tolerance = EXACT

    def run(self, graph: Graph) -> PassResult:
        result = PassResult()
        for node in graph.nodes():
            if node not in graph:
                continue
            down = as_linear(node)
            if not down:
                continue
            m = self.match(down["linear"])
            if m:
                self.rewrite(graph, m)
                result.bump("gated_mlp")
            elif m.bindings.get("mlp_like"):
                result.note(f"{node.op} at {node.module or '<top>'} not fused: {m.reason}")
        return result

    def match(self, down: Linear) -> Match:
        m = Match()
        # down(act(gate(x)) * up(x)): the down projection reads a product (through reshapes)
        prod_v, prod_views = through_rows(down.x)
        prod = producer(prod_v)
        if prod is not None and (prod.op in ACTIVATION_OPS or match_activation(prod_v)):
            m.bindings["mlp_like"] = True  # down(act(up(x))), decomposed silu included
            return m.fail(f"non-gated MLP: the down projection reads an activation "
                          f"({prod.op}) directly, no gate product")
        if prod is None or prod.op != "aten.mul.Tensor":
            return m.fail("the input is not a product")
        a, b = prod.arg("self"), prod.arg("other")
        if not (isinstance(a, Value) and isinstance(b, Value)) or a.shape != b.shape:
            return m.fail("the product broadcasts or has a scalar factor")  # a norm's scale
        act_a, act_b = match_activation(a), match_activation(b)
        # worth a note only when it looks like an MLP: a factor is an activation or a linear
        m.bindings["mlp_like"] = bool(act_a or act_b or match_projection(a, "")
                                      or match_projection(b, ""))
        if act_a and act_b:
            return m.fail("both factors are activations: act(a) * act(b) is not a gated MLP")
        if not act_a and not act_b:
            return m.fail(f"no activation on either factor ({act_a.reason}; {act_b.reason})")
        act, up_v = (act_a, b) if act_a else (act_b, a)
        gate = match_projection(act["pre"], "gate")
        if not gate:
            return m.fail(gate.reason)
        up = match_projection(up_v, "up")
        if not up:
            return m.fail(up.reason)
        g, u = gate["linear"], up["linear"]
        if g.x is not u.x:
            return m.fail(f"gate and up read different inputs (%{g.x.name}, %{u.x.name})")
        if len({g.layout, u.layout, down.layout}) != 1:
            return m.fail("the three projections were traced in different forms")
        if len({g.weight.dtype, u.weight.dtype, down.weight.dtype}) != 1:
            return m.fail("the three projections' weights have different dtypes")
        if g.out_features != u.out_features or down.in_features != g.out_features:
            return m.fail(f"sizes disagree: gate {g.out_features}, up {u.out_features}, "
                          f"down reads {down.in_features}")
        if tuple(g.x.shape or ())[:-1] != tuple(down.node.output.shape or ())[:-1]:
            return m.fail(f"a reshape between x {g.x.shape} and the down projection's output "
                          f"{down.node.output.shape} regroups the rows")
        # everything between x and the down projection disappears: each must be ours alone
        # (the decomposed silu's pre-activation is read twice, by sigmoid and by the mul)
        absorbed = prod_views + [prod] + act["nodes"] + gate["nodes"] + up["nodes"]
        members = set(absorbed) | {down.node}
        for v in (v for n in absorbed for v in n.outputs):
            others = [c for c, _ in v.uses() if c not in members]
            if others or any(o is v for o in v.graph.outputs):
                who = others[0].where() if others else "a graph output"
                return m.fail(f"%{v.name} has another user outside the MLP: {who}")
        return m.ok(down=down, gate=g, up=u, activation=act["activation"], nodes=absorbed)

    def rewrite(self, graph: Graph, m: Match) -> None:
        down, g, u = m["down"], m["gate"], m["up"]
        biases = [lin.bias for lin in (g, u, down) if lin.bias is not None]
        absorbed = [down.node] + m["nodes"]
        fused = graph.add_node(
            "arc.gated_mlp", [g.x, g.weight, u.weight, down.weight, *biases],
            {"activation": m["activation"], "weight_layout": down.layout,
             "has_bias": [lin.bias is not None for lin in (g, u, down)]},
            [(down.node.output.dtype, down.node.output.shape)],
            module=common_module(absorbed), origin=f"{self.name}/gated_mlp",
            names=[down.node.output.name + "_mlp"])
        down.node.output.replace_all_uses_with(fused.output)
        pending = list(dict.fromkeys(absorbed))
        while pending:  # users before producers: remove whatever nothing reads any more
            free = [n for n in pending if not any(graph.has_uses(v) for v in n.outputs)]
            for n in free:
                graph.remove_node(n)
            pending = [n for n in pending if n not in free]

