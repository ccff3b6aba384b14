"""The verifier: run between passes so a broken graph is caught at the pass that broke it.

It checks structure (acyclic, every input produced inside this graph, ``In`` references in
range, outputs present), types (every value typed, constants matching their tensors, shapes
made of ints and symbols) and, for ``aten.*`` ops, that the attributes name real schema
arguments. It raises VerifyError naming the node and the module it came from.
"""

from __future__ import annotations

import networkx as nx
import torch

from arcompile.errors import VerifyError
from arcompile.ir.graph import SYM_DTYPES, Graph, In, Node
from arcompile.ir.ops import resolve_op


def verify(graph: Graph) -> None:
    problems = list(_problems(graph))
    if problems:
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        raise VerifyError(f"graph '{graph.name}' is invalid: {problems[0]}{more}")


def _problems(graph: Graph):
    g = graph._g
    if not nx.is_directed_acyclic_graph(g):
        cycle = nx.find_cycle(g)
        yield f"cycle through {cycle[0][0].where()}"
        return
    for node in g.nodes:
        yield from _node_problems(graph, node)
    for i, v in enumerate(graph.inputs):
        if v.producer not in graph or v.producer.op != "arc.input":
            yield f"graph input {i} (%{v.name}) is not an arc.input node of this graph"
    if not graph.outputs:
        yield "graph has no outputs"
    for i, v in enumerate(graph.outputs):
        if v.producer not in graph:
            yield f"graph output {i} (%{v.name}) is produced by a node that was removed"


def _node_problems(graph: Graph, node: Node):
    for port, v in enumerate(node.inputs):
        if v.producer not in graph:
            yield f"{node.where()}: input {port} (%{v.name}) is dangling (its producer was removed)"
        elif v.index >= len(v.producer.outputs) or v.producer.outputs[v.index] is not v:
            yield f"{node.where()}: input {port} (%{v.name}) is not an output of its producer"
    for i, v in enumerate(node.outputs):
        if v.producer is not node or v.index != i:
            yield f"{node.where()}: output {i} (%{v.name}) does not point back to its node"
        if v.dtype is None or v.shape is None:
            yield f"{node.where()}: output %{v.name} has no type"
        elif v.dtype not in SYM_DTYPES and not all(isinstance(d, (int, str)) for d in v.shape):
            yield f"{node.where()}: output %{v.name} has shape {v.shape} (dims must be int or symbol)"
    refs = [r.index for r in _refs(node.attrs)]
    if any(r >= len(node.inputs) for r in refs):
        yield f"{node.where()}: an attribute refers to input {max(refs)} of {len(node.inputs)}"
    if node.op == "arc.constant":
        data = node.output.data
        if not isinstance(data, torch.Tensor):
            yield f"constant %{node.output.name} holds no tensor"
        elif data.dtype != node.output.dtype or tuple(data.shape) != node.output.shape:
            yield (f"constant %{node.output.name} is typed {node.output.dtype}{node.output.shape} "
                   f"but holds {data.dtype}{tuple(data.shape)}")
    elif node.op.startswith("aten."):
        yield from _schema_problems(node)


def _schema_problems(node: Node):
    try:
        schema = resolve_op(node.op)._schema
    except AttributeError:
        yield f"{node.where()}: no such torch op"
        return
    names = {a.name for a in schema.arguments}
    unknown = sorted(set(node.attrs) - names)
    if unknown:
        yield f"{node.where()}: attributes {unknown} are not arguments of {schema.name}"


def _refs(a):
    if isinstance(a, In):
        yield a
    elif isinstance(a, dict):
        for x in a.values():
            yield from _refs(x)
    elif isinstance(a, (list, tuple)):
        for x in a:
            yield from _refs(x)
