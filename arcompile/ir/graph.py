"""The IR core: Value, Node and Graph.

A Graph keeps a networkx.MultiDiGraph private. Its nodes are Node objects; an edge runs from a
producer to a consumer with the key ``(output_index, input_port)``, so operand order survives
(networkx alone would lose it). Every Value has a producer: graph inputs come from
``arc.input`` nodes and weights from ``arc.constant`` nodes, which keeps ``uses()`` and the
verifier uniform. Passes go through this API and never touch networkx.

Values compare by identity. Shapes are tuples whose dims are ints or symbol strings such as
``"B"``, ``"T"`` or ``"T + 1"``. Weights are held by reference (``Value.data`` is the very
tensor the frontend loaded), so optimizing a model does not copy its parameters.
"""

from __future__ import annotations

import copy
import itertools
from dataclasses import dataclass
from typing import Any, Iterable, Iterator

import networkx as nx
import torch

from arcompile.errors import VerifyError

Dim = int | str
# Scalar symbolic values (a dynamic size, arithmetic on sizes) are Values of these "dtypes".
SYM_INT = "symint"
SYM_FLOAT = "symfloat"
SYM_BOOL = "symbool"
SYM_DTYPES = (SYM_INT, SYM_FLOAT, SYM_BOOL)

_ids = itertools.count()


@dataclass(frozen=True)
class In:
    """A reference, inside a node attribute, to the node's input number ``index``.

    Traced aten ops mix tensors and plain values in one argument (``view(x, [B, T, 9, 64])``
    where B and T are symbolic Values, ``cat([a, b], 1)``). The Values live in ``Node.inputs``
    (so edges are the single source of truth) and the attribute keeps their place.
    """

    index: int


class Value:
    """One output of one node: dtype, symbolic shape, and for constants the tensor itself.

    ``exact``: for a constant a pass computed (a folded table, a rotary cache), its value in
    float64, which the float64 numeric check runs instead of ``data`` rounded to the graph's
    dtype; None for weights and anything computed without rounding."""

    __slots__ = ("name", "dtype", "shape", "producer", "index", "data", "exact", "__weakref__")

    def __init__(self, name: str, dtype: Any, shape: tuple[Dim, ...] | None,
                 producer: "Node", index: int):
        self.name = name
        self.dtype = dtype
        self.shape = shape
        self.producer = producer
        self.index = index
        self.data: torch.Tensor | None = None
        self.exact: torch.Tensor | None = None

    @property
    def graph(self) -> "Graph":
        return self.producer.graph

    def uses(self) -> list[tuple["Node", int]]:
        """(consumer, input port) pairs, in graph order; graph outputs are not included."""
        return self.graph._uses(self)

    def replace_all_uses_with(self, other: "Value") -> None:
        self.graph._replace_all_uses(self, other)

    @property
    def is_constant(self) -> bool:
        return self.producer.op == "arc.constant"

    def __repr__(self) -> str:
        return f"%{self.name}: {format_type(self.dtype, self.shape)}"

    __hash__ = object.__hash__  # identity; documented rather than implied


class Node:
    """An op with ordered inputs, named attributes, typed outputs and its provenance.

    ``module`` is the path of the nn.Module the op was traced from (``model.layers.3.mlp``);
    ``origin`` is ``frontend`` for traced ops or ``pass_name/rule`` for ops a pass created.
    """

    def __init__(self, graph: "Graph", op: str, inputs: tuple[Value, ...],
                 attrs: dict[str, Any], module: str, origin: str):
        self.graph = graph
        self.op = op
        self._inputs = inputs
        self.attrs = attrs
        self.outputs: tuple[Value, ...] = ()
        self.module = module
        self.origin = origin
        self.order = next(_ids)

    @property
    def inputs(self) -> tuple[Value, ...]:
        return self._inputs

    @property
    def output(self) -> Value:
        if len(self.outputs) != 1:
            raise ValueError(f"{self.op} has {len(self.outputs)} outputs, not one")
        return self.outputs[0]

    def arg(self, name: str, default: Any = None) -> Any:
        """An attribute with its ``In`` references resolved to the input Values."""
        if name not in self.attrs:
            return default
        return resolve(self.attrs[name], self._inputs)

    def resolved_attrs(self) -> dict[str, Any]:
        return {k: resolve(v, self._inputs) for k, v in self.attrs.items()}

    def where(self) -> str:
        """Where the node came from, for error messages."""
        return f"{self.op} (from module '{self.module or '<top>'}')"

    def __repr__(self) -> str:
        outs = ", ".join(v.name for v in self.outputs)
        return f"<Node {outs} = {self.op} @ {self.module or '<top>'}>"

    __hash__ = object.__hash__


def resolve(template: Any, inputs: tuple[Value, ...]) -> Any:
    if isinstance(template, In):
        return inputs[template.index]
    if isinstance(template, list):
        return [resolve(t, inputs) for t in template]
    if isinstance(template, tuple):
        return tuple(resolve(t, inputs) for t in template)
    return template


def extract_values(args: dict[str, Any]) -> tuple[tuple[Value, ...], dict[str, Any]]:
    """Split attributes that hold Values into (inputs, attrs with In references)."""
    inputs: list[Value] = []

    def walk(a: Any) -> Any:
        if isinstance(a, Value):
            inputs.append(a)
            return In(len(inputs) - 1)
        if isinstance(a, list):
            return [walk(x) for x in a]
        if isinstance(a, tuple):
            return tuple(walk(x) for x in a)
        return a

    attrs = {k: walk(v) for k, v in args.items()}
    return tuple(inputs), attrs


class Graph:
    """A dataflow graph of Nodes; see the module docstring."""

    def __init__(self, name: str = "main"):
        self.name = name
        self._g = nx.MultiDiGraph()
        self.inputs: list[Value] = []
        self.outputs: list[Value] = []
        self.meta: dict[str, Any] = {}
        self._names: set[str] = set()

    # -- building ---------------------------------------------------------------------
    def add_node(self, op: str, inputs: Iterable[Value] = (), attrs: dict[str, Any] | None = None,
                 outputs: Iterable[tuple[Any, tuple[Dim, ...] | None]] = (),
                 module: str = "", origin: str = "frontend",
                 names: Iterable[str] | None = None) -> Node:
        """Add a node. ``outputs`` lists (dtype, shape) per output; returns the node."""
        inputs = tuple(inputs)
        for v in inputs:
            if not isinstance(v, Value) or v.graph is not self:
                raise VerifyError(f"{op}: input {v!r} is not a value of graph '{self.name}'")
        node = Node(self, op, inputs, dict(attrs or {}), module, origin)
        outs = list(outputs)
        names = list(names) if names is not None else [None] * len(outs)
        node.outputs = tuple(Value(self._unique(n or "v"), dt, tuple(sh) if sh is not None else None,
                                   node, i)
                             for i, ((dt, sh), n) in enumerate(zip(outs, names)))
        self._g.add_node(node)
        for port, v in enumerate(inputs):
            self._g.add_edge(v.producer, node, key=(v.index, port))
        return node

    def add_op(self, op: str, args: dict[str, Any], outputs, **kw) -> Node:
        """Add a node whose attributes may hold Values anywhere (aten-style arguments)."""
        inputs, attrs = extract_values(args)
        return self.add_node(op, inputs, attrs, outputs, **kw)

    def add_input(self, name: str, dtype: Any, shape: tuple[Dim, ...]) -> Value:
        node = self.add_node("arc.input", (), {"name": name}, [(dtype, shape)], names=[name])
        self.inputs.append(node.output)
        return node.output

    def add_constant(self, tensor: torch.Tensor, name: str = "const", module: str = "",
                     origin: str = "frontend", exact: torch.Tensor | None = None) -> Value:
        """A weight or constant. The tensor is kept by reference, never copied. ``exact``: its
        float64 value when ``tensor`` is a rounding of one (see ``Value``)."""
        node = self.add_node("arc.constant", (), {"name": name},
                             [(tensor.dtype, tuple(tensor.shape))], module=module,
                             origin=origin, names=[name])
        node.output.data = tensor
        if exact is not None:
            if exact.dtype != torch.float64 or exact.shape != tensor.shape:
                raise ValueError(f"exact value of {name} must be float64 of shape "
                                 f"{tuple(tensor.shape)}, got {exact.dtype} {tuple(exact.shape)}")
            node.output.exact = exact
        return node.output

    def _unique(self, base: str) -> str:
        base = base.replace(".", "_") or "v"
        name, k = base, 1
        while name in self._names:
            name, k = f"{base}_{k}", k + 1
        self._names.add(name)
        return name

    # -- queries ----------------------------------------------------------------------
    def nodes(self) -> list[Node]:
        """All nodes in a deterministic topological order (ties broken by creation order)."""
        return list(nx.lexicographical_topological_sort(self._g, key=lambda n: n.order))

    def __iter__(self) -> Iterator[Node]:
        return iter(self.nodes())

    def __len__(self) -> int:
        return self._g.number_of_nodes()

    def __contains__(self, node: Node) -> bool:
        return self._g.has_node(node)

    def copy(self) -> "Graph":
        """A deep copy that shares the weight tensors (never copies parameters)."""
        memo = {id(t): t for v in self.constants() for t in (v.data, v.exact) if t is not None}
        return copy.deepcopy(self, memo)

    def adopt(self, work: "Graph") -> None:
        """Become ``work`` (a rewritten copy): callers that hold this object see the result."""
        for node in work._g.nodes:
            node.graph = self
        self._g, self.inputs, self.outputs = work._g, work.inputs, work.outputs
        self._names, self.meta = work._names, work.meta

    def op_count(self, op: str) -> int:
        return sum(1 for n in self._g.nodes if n.op == op)

    def constants(self) -> list[Value]:
        return [n.output for n in self.nodes() if n.op == "arc.constant"]

    def users(self, node: Node) -> list[Node]:
        return list(dict.fromkeys(self._g.successors(node)))

    def _uses(self, value: Value) -> list[tuple[Node, int]]:
        found = [(c, key[1]) for _, c, key in self._g.out_edges(value.producer, keys=True)
                 if key[0] == value.index]
        return sorted(found, key=lambda u: (u[0].order, u[1]))

    def has_uses(self, value: Value) -> bool:
        return bool(self._uses(value)) or any(o is value for o in self.outputs)

    # -- editing ----------------------------------------------------------------------
    def set_input(self, node: Node, port: int, new: Value) -> None:
        old = node.inputs[port]
        self._g.remove_edge(old.producer, node, key=(old.index, port))
        node._inputs = node._inputs[:port] + (new,) + node._inputs[port + 1:]
        self._g.add_edge(new.producer, node, key=(new.index, port))

    def _replace_all_uses(self, old: Value, new: Value) -> None:
        if old is new:
            return
        for consumer, port in self._uses(old):
            self.set_input(consumer, port, new)
        self.outputs = [new if o is old else o for o in self.outputs]

    def remove_node(self, node: Node) -> None:
        """Remove a node whose outputs are no longer used."""
        for v in node.outputs:
            if self.has_uses(v):
                raise VerifyError(f"cannot remove {node.where()}: output %{v.name} still used")
        if node.op == "arc.input":
            raise VerifyError(f"cannot remove graph input %{node.output.name}")
        self._g.remove_node(node)


def format_type(dtype: Any, shape: tuple[Dim, ...] | None) -> str:
    dt = DTYPE_NAMES.get(dtype, str(dtype))
    if shape is None:
        return f"{dt}[?]"
    if dtype in SYM_DTYPES:
        return dt
    return f"{dt}[{', '.join(str(d) for d in shape)}]"


DTYPE_NAMES = {
    torch.float32: "f32", torch.float16: "f16", torch.bfloat16: "bf16", torch.float64: "f64",
    torch.int64: "i64", torch.int32: "i32", torch.int8: "i8", torch.uint8: "u8",
    torch.bool: "bool", SYM_INT: "symint", SYM_FLOAT: "symfloat", SYM_BOOL: "symbool",
}
