"""Merge linears that read the same input into one matmul (Q/K/V projections, a gate/up pair
that fuse_mlp did not take).

Matches: two or more linears whose input is the very same Value, in either traced form:
``aten.linear(x, W[out, in], b)`` as exported, or ``aten.mm(x2d, W[in, out])`` /
``aten.addmm(b, x2d, W[in, out])`` after ``run_decompositions()`` (the ``permute`` of the weight
is a constant view by then). Weights must be 2-D constants; linears are grouped by traced form,
weight dtype and input size, so only alike ones merge.
Produces: ``arc.concat_weights(W1, ..., Wn, dim)`` (dim 0 for (out, in) weights, 1 for
(in, out)) — a graph-level op over the original constants, never a torch.cat here: the model's
weights stay single copies — the same for the biases when any linear has one (a zeros
constant stands in for those without), and ``arc.split_linear(x, W, [b], sizes,
weight_layout)`` with one output per original linear (rule ``merge``).
Refuses: a lone linear; linears on different inputs or with different weight dtypes, layouts
or input sizes (each such subgroup merges on its own if it has two members); non-constant or
non-2-D weights; ``addmm`` with ``alpha``/``beta`` other than 1 or a bias that is not 1-D.
Numbers: exact up to the matmul's blocking over a wider output (~1e-6 relative).
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

import torch

from arcompile.ir.graph import Graph, Node, Value
from arcompile.passes.base import Pass, PassResult
from arcompile.passes.match import Match
from arcompile.passes.numeric_check import EXACT


@dataclass
class Linear:
    """One traced linear, whichever form it was traced in."""

    node: Node
    x: Value
    weight: Value
    bias: Value | None
    layout: str  # "out_in" (aten.linear) or "in_out" (aten.mm / aten.addmm)

    @property
    def out_features(self) -> int:
        return self.weight.shape[0 if self.layout == "out_in" else 1]

    @property
    def in_features(self) -> int:
        return self.weight.shape[1 if self.layout == "out_in" else 0]


def as_linear(node: Node | None) -> Match:
    """``Match(linear=Linear(...))`` when ``node`` is a linear: y = x @ W^T + b."""
    m = Match()
    if node is None:
        return m.fail("not produced by a node")
    if node.op == "aten.linear":
        x, weight, bias, layout = node.arg("input"), node.arg("weight"), node.arg("bias"), "out_in"
    elif node.op == "aten.mm":
        x, weight, bias, layout = node.arg("self"), node.arg("mat2"), None, "in_out"
    elif node.op == "aten.addmm":
        if node.arg("alpha", 1) != 1 or node.arg("beta", 1) != 1:
            return m.fail(f"{node.op} scales by alpha/beta")
        x, weight, bias, layout = node.arg("mat1"), node.arg("mat2"), node.arg("self"), "in_out"
    else:
        return m.fail(f"{node.op} is not a linear (aten.linear, aten.mm, aten.addmm)")
    if not isinstance(weight, Value) or weight.shape is None or len(weight.shape) != 2:
        return m.fail(f"{node.op}: the weight is not a 2-D tensor")
    if not all(isinstance(d, int) for d in weight.shape):
        return m.fail(f"{node.op}: the weight has a symbolic shape {weight.shape}")
    lin = Linear(node, x, weight, bias, layout)
    if bias is not None and (not isinstance(bias, Value) or bias.shape != (lin.out_features,)):
        return m.fail(f"{node.op}: the bias is not 1-D of size {lin.out_features}")
    return m.ok(linear=lin)


def common_module(nodes: list[Node]) -> str:
    """The longest module path every node lies under (``model.layers.0.mlp``)."""
    paths = [n.module.split(".") for n in nodes if n.module]
    if not paths:
        return ""
    common = paths[0]
    for p in paths[1:]:
        k = 0
        while k < min(len(common), len(p)) and common[k] == p[k]:
            k += 1
        common = common[:k]
    return ".".join(common)


class MergeLinears(Pass):
    """See the module docstring: linears sharing an input become one arc.split_linear."""

    name = "merge_linears"
    # a wider matmul may block its sums differently (float32: exactly 0 on SmolLM2, both
    # forms); the float64 check sees float64 rounding only
    tolerance = EXACT

    def run(self, graph: Graph) -> PassResult:
        result = PassResult()
        by_input: dict[Value, list[Linear]] = defaultdict(list)
        for node in graph.nodes():
            m = as_linear(node)
            if m:
                by_input[m["linear"].x].append(m["linear"])
        for x, linears in by_input.items():
            if len(linears) < 2:
                continue
            groups: dict[tuple, list[Linear]] = defaultdict(list)
            for lin in linears:
                m = self._mergeable(lin)
                if not m:
                    result.note(f"kept {lin.node.op} at {lin.node.module or '<top>'} apart: "
                                f"{m.reason}")
                    continue
                groups[(lin.layout, lin.weight.dtype, lin.in_features)].append(lin)
            if len(groups) > 1:
                result.note(f"linears reading %{x.name} differ in form, dtype or input size: "
                            f"{len(groups)} groups merged separately")
            for group in groups.values():
                if len(group) < 2:
                    continue
                self._merge(graph, x, group)
                result.bump("merge")
        return result

    @staticmethod
    def _mergeable(lin: Linear) -> Match:
        m = Match()
        if not lin.weight.is_constant:
            return m.fail(f"its weight %{lin.weight.name} is computed, not a constant")
        if lin.bias is not None and not lin.bias.is_constant:
            return m.fail(f"its bias %{lin.bias.name} is computed, not a constant")
        if lin.bias is not None and lin.bias.dtype != lin.weight.dtype:
            return m.fail("its bias and weight dtypes differ")
        return m.ok()

    def _merge(self, graph: Graph, x: Value, group: list[Linear]) -> None:
        # split(x @ concat(W1..Wn)^T + concat(b1..bn), [o1..on], -1) == (x @ Wi^T + bi)_i
        layout, dtype = group[0].layout, group[0].weight.dtype
        origin = f"{self.name}/merge"
        module = common_module([lin.node for lin in group])
        dim = 0 if layout == "out_in" else 1
        sizes = [lin.out_features for lin in group]
        w_shape = list(group[0].weight.shape)
        w_shape[dim] = sum(sizes)
        weight = graph.add_node("arc.concat_weights", [lin.weight for lin in group], {"dim": dim},
                                [(dtype, tuple(w_shape))], module=module, origin=origin,
                                names=["merged_weight"]).output
        inputs = [x, weight]
        if any(lin.bias is not None for lin in group):
            # zeros only for the linears without a bias, and only because another has one
            biases = [lin.bias if lin.bias is not None else
                      graph.add_constant(torch.zeros(lin.out_features, dtype=dtype),
                                         name="zero_bias", module=lin.node.module, origin=origin)
                      for lin in group]
            inputs.append(graph.add_node("arc.concat_weights", biases, {"dim": 0},
                                         [(dtype, (sum(sizes),))], module=module, origin=origin,
                                         names=["merged_bias"]).output)
        outs = [(lin.node.output.dtype, lin.node.output.shape) for lin in group]
        split = graph.add_node("arc.split_linear", inputs,
                               {"sizes": sizes, "weight_layout": layout}, outs, module=module,
                               origin=origin, names=[lin.node.output.name + "_m" for lin in group])
        for lin, out in zip(group, split.outputs):
            lin.node.output.replace_all_uses_with(out)
            graph.remove_node(lin.node)
