"""LowerContext: the state of one IR → ONNX lowering and the helpers every lowering uses.

It owns the ONNX nodes emitted so far, the small constants lowerings create (inline
initializers, deduplicated), the IR weights the graph uses (written to external data by the
driver, once per distinct tensor) and the ONNX name that holds each IR Value.

Naming: the ONNX value that ends up holding an IR Value takes that Value's name (``add_3``),
intermediates a lowering needs on the way are ``add_3.0``, ``add_3.1``…; ONNX node names are
``module/output`` so an ORT profile reads by module. IR names never contain dots (the
Graph replaces them), so the two kinds cannot collide; ``fresh`` guarantees it anyway.
"""

from __future__ import annotations

from typing import Any, Callable, Iterable

import torch
from onnx import NodeProto, TensorProto, helper

from arcompile.errors import UnsupportedOpError
from arcompile.ir.graph import SYM_DTYPES, Graph, Node, Value
from arcompile.runtimes.onnxruntime.dtypes import onnx_type, torch_dtype
from arcompile.runtimes.onnxruntime.weights import ConcatParts


class LowerContext:
    """Builds one ONNX graph; see the module docstring."""

    def __init__(self, graph: Graph, reserved: Iterable[str] = ()):
        self.graph = graph
        self.nodes: list[NodeProto] = []
        self.small: list[TensorProto] = []
        self.weights: dict[str, torch.Tensor] = {}
        self._names: dict[Value, str] = {}
        self._taken: set[str] = set(reserved)
        self._consts: dict[tuple, str] = {}
        self._storages: dict[tuple, str] = {}
        self._node: Node | None = None
        self._made: list[NodeProto] = []
        self._temps = 0
        self._once: dict[tuple, Any] = {}

    def once(self, key: tuple, build: Callable[[], Any]) -> Any:
        """``build()``'s ONNX names, emitted the first time ``key`` is asked for and reused
        after: for values every layer needs alike (GroupQueryAttention's sequence lengths, the
        rotary position ids), computed once per graph instead of once per node. ``build``
        may only read graph inputs and constants, which every node can see."""
        if key not in self._once:
            self._once[key] = build()
        return self._once[key]

    # -- names --------------------------------------------------------------------------
    def fresh(self, base: str) -> str:
        name, k = base, 1
        while name in self._taken:
            name, k = f"{base}.{k}", k + 1
        self._taken.add(name)
        return name

    def bind(self, value: Value, name: str) -> None:
        self._taken.add(name)
        self._names[value] = name

    def name(self, value: Value) -> str:
        """The ONNX name holding ``value``; a weight is registered for writing on first use."""
        if value in self._names:
            return self._names[value]
        if value.is_constant:
            return self._weight(value)
        raise KeyError(f"%{value.name} was used before the node producing it was lowered")

    def _weight(self, value: Value) -> str:
        t = value.data
        # Tied weights: two constants viewing the same storage the same way are one tensor.
        key = storage_key(t)
        if key not in self._storages:
            name = self.fresh(value.producer.attrs.get("name") or value.name)
            self.weights[name] = t
            self._storages[key] = name
        self._names[value] = self._storages[key]
        return self._names[value]

    def weight_concat(self, parts: list[Value], dim: int, base: str) -> str:
        """One initializer holding the constants ``parts`` concatenated along ``dim``; its bytes
        are streamed into the data file part by part (``weights.ConcatParts``), never held."""
        key = ("concat", dim) + tuple(storage_key(v.data) for v in parts)
        if key not in self._storages:
            name = self.fresh(base)
            self.weights[name] = ConcatParts([v.data for v in parts], dim)
            self._storages[key] = name
        return self._storages[key]

    def derived_weight(self, kind: str, sources: list[Value], base: str,
                       build: Callable[[], Any]) -> str:
        """One initializer holding ``build()`` (a tensor or a ``weights`` stand-in), made
        from the constants ``sources``: built once per ``kind`` and sources, so a weight
        two nodes share is rewritten and written once (the QDQ form of a quantized weight)."""
        key = ("derived", kind) + tuple(storage_key(v.data) for v in sources)
        if key not in self._storages:
            name = self.fresh(base)
            self.weights[name] = build()
            self._storages[key] = name
        return self._storages[key]

    # -- emitting -----------------------------------------------------------------------
    def op(self, op_type: str, inputs: Iterable[str], outputs: int = 1, **attrs: Any) -> Any:
        """Emit one ONNX node; returns its output name (a list when ``outputs`` > 1)."""
        outs = [self._temp() for _ in range(outputs)]
        proto = helper.make_node(op_type, list(inputs), outs, **attrs)
        self.nodes.append(proto)
        self._made.append(proto)
        return outs[0] if outputs == 1 else outs

    def _temp(self) -> str:
        base = self._node.outputs[0].name if self._node is not None and self._node.outputs else "t"
        self._temps += 1
        return self.fresh(f"{base}.{self._temps}")

    def lower_node(self, node: Node, fn: Callable) -> None:
        """Run one lowering and bind the IR node's outputs to the names it returned."""
        self._node, self._made, self._temps = node, [], 0
        result = fn(self, node)
        results = list(result) if isinstance(result, (list, tuple)) else [result]
        if not node.outputs:
            results = []
        if len(results) != len(node.outputs):
            raise UnsupportedOpError(f"the ONNX lowering of {node.where()} gave {len(results)} "
                                     f"outputs for {len(node.outputs)}")
        made = {o for p in self._made for o in p.output}
        renamed: dict[str, str] = {}
        for value, got in zip(node.outputs, results):
            if got is None:
                if self.graph.has_uses(value):
                    raise UnsupportedOpError(f"the ONNX lowering of {node.where()} cannot "
                                             f"produce output %{value.name}, which is used")
                continue
            if got in made and got not in renamed:  # the final ONNX value takes the IR name
                renamed[got] = self.fresh(value.name)
                self._rename(self._made, got, renamed[got])
            self._names[value] = renamed.get(got, got)
        where = f"{node.op} @ {node.module or '<top>'}"
        for proto in self._made:
            proto.name = f"{node.module}/{proto.output[0]}" if node.module else proto.output[0]
            proto.doc_string = where
        self._node, self._made = None, []

    def rename(self, old: str, new: str) -> None:
        """Rename an ONNX value everywhere (the driver uses it to name graph outputs)."""
        self._taken.add(new)
        self._rename(self.nodes, old, new)
        for v, n in self._names.items():
            if n == old:
                self._names[v] = new

    @staticmethod
    def _rename(protos: list[NodeProto], old: str, new: str) -> None:
        for p in protos:
            for field in (p.input, p.output):
                for i, n in enumerate(field):
                    if n == old:
                        field[i] = new

    def produced(self) -> set[str]:
        return {o for p in self.nodes for o in p.output}

    # -- constants ----------------------------------------------------------------------
    def const(self, value: Any, dtype: Any) -> str:
        """A small inline constant (Python scalar, list or tensor) of ``dtype``."""
        dtype = torch_dtype(dtype)
        t = value if isinstance(value, torch.Tensor) else torch.tensor(value, dtype=dtype)
        t = t.to(dtype).contiguous()
        raw = t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b""
        key = (t.dtype, tuple(t.shape), raw)
        if key not in self._consts:
            name = self.fresh(f"const.{len(self._consts)}")
            self.small.append(helper.make_tensor(name, onnx_type(t.dtype), list(t.shape), raw,
                                                 raw=True))
            self._consts[key] = name
        return self._consts[key]

    def i64(self, values: Iterable[int]) -> str:
        """A 1-D int64 constant, the form axes, starts and shapes take."""
        return self.const([int(v) for v in values], torch.int64)

    # -- operands -----------------------------------------------------------------------
    def tensor(self, x: Any, dtype: Any = None) -> str:
        """An operand as an ONNX tensor of ``dtype``: a tensor Value (cast when needed), a
        symbolic scalar (squeezed to rank 0) or a Python number (a rank-0 constant)."""
        if isinstance(x, Value):
            name = self.name(x)
            if x.dtype in SYM_DTYPES:
                name = self.op("Reshape", [name, self.i64([])])
            return self.cast(name, x.dtype, dtype) if dtype is not None else name
        if isinstance(x, (bool, int, float)):
            return self.const(x, dtype if dtype is not None else python_dtype(x))
        raise UnsupportedOpError(f"{self._where()}: cannot use {x!r} as a tensor operand")

    def cast(self, name: str, from_dtype: Any, to_dtype: Any) -> str:
        if torch_dtype(from_dtype) == torch_dtype(to_dtype):
            return name
        return self.op("Cast", [name], to=onnx_type(to_dtype))

    def sizes(self, items: Iterable[Any]) -> str:
        """A list of sizes (ints and symint Values) as one int64 1-D tensor."""
        pieces: list[str] = []
        run: list[int] = []
        for item in items:
            if isinstance(item, Value):
                if run:
                    pieces.append(self.i64(run))
                    run = []
                pieces.append(self.cast(self.name(item), item.dtype, torch.int64))
            else:
                run.append(int(item))
        if run or not pieces:
            pieces.append(self.i64(run))
        return pieces[0] if len(pieces) == 1 else self.op("Concat", pieces, axis=0)

    def shape_of(self, value: Value, start: int = 0, end: int | None = None) -> str:
        attrs = {"start": start} if end is None else {"start": start, "end": end}
        return self.op("Shape", [self.name(value)], **attrs)

    # -- types --------------------------------------------------------------------------
    def promote(self, a: Any, b: Any) -> torch.dtype:
        """torch's result dtype for a binary op on ``a`` and ``b`` (Values or Python scalars)."""
        result = torch.result_type(_probe(a), _probe(b))
        return result

    def _where(self) -> str:
        return self._node.where() if self._node is not None else "lowering"


def storage_key(t: torch.Tensor) -> tuple:
    """Equal for two tensors viewing the same storage the same way (tied weights)."""
    return (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape),
            tuple(t.stride()), t.dtype)


def rank(value: Value) -> int:
    return len(value.shape)


def python_dtype(x: Any) -> torch.dtype:
    if isinstance(x, bool):
        return torch.bool
    if isinstance(x, int):
        return torch.int64
    return torch.float32


def _probe(a: Any) -> Any:
    # torch.result_type ranks dimensioned tensors above rank-0 tensors above Python scalars, so
    # the probe keeps each operand's category: a meta tensor of the right rank, or a scalar.
    if isinstance(a, Value):
        if a.dtype in SYM_DTYPES:
            return {"symint": 0, "symfloat": 0.0, "symbool": False}[a.dtype]
        return torch.empty((1,) * len(a.shape), dtype=a.dtype, device="meta")
    return a
