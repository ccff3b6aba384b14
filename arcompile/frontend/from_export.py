"""torch.export ExportedProgram → arcompile IR.

Each FX call becomes a Node named ``aten.<op>`` (``aten.<op>.<overload>`` unless the overload is
``default``), its arguments kept by their schema names. Multi-output ops keep all outputs and
``operator.getitem`` disappears into output indices. Arithmetic on symbolic sizes becomes
``sym.<op>`` nodes. Parameters, buffers and lifted constants become ``arc.constant`` nodes that
hold the exported tensors by reference.

The two dynamic dims of the token input are renamed ``B`` and ``T`` everywhere, so shapes read
``f32[B, T, 576]`` rather than ``f32[s23, s27, 576]``.
"""

from __future__ import annotations

import operator
from typing import Any

import sympy
import torch
from torch.export import ExportedProgram
from torch.export.graph_signature import InputKind, OutputKind

from arcompile.errors import UnsupportedOpError
from arcompile.ir.graph import SYM_BOOL, SYM_FLOAT, SYM_INT, Graph
from arcompile.ir.ops import op_name

_SYM_OPS = {
    operator.add: "sym.add", operator.sub: "sym.sub", operator.mul: "sym.mul",
    operator.floordiv: "sym.floordiv", operator.truediv: "sym.truediv", operator.mod: "sym.mod",
    operator.neg: "sym.neg", operator.eq: "sym.eq", operator.ne: "sym.ne", operator.lt: "sym.lt",
    operator.le: "sym.le", operator.gt: "sym.gt", operator.ge: "sym.ge", operator.pow: "sym.pow",
    torch.sym_max: "sym.max", torch.sym_min: "sym.min", torch.sym_not: "sym.not",
    torch.sym_float: "sym.float", torch.sym_int: "sym.int",
}


def from_exported_program(ep: ExportedProgram, name: str = "main") -> Graph:
    graph = Graph(name)
    symbols = _symbol_names(ep)
    env: dict[torch.fx.Node, Any] = {}
    sig = ep.graph_signature
    specs = {spec.arg.name: spec for spec in sig.input_specs}

    def typed(val: Any) -> tuple[Any, tuple | None]:
        if isinstance(val, torch.Tensor):
            return val.dtype, tuple(_dim(d, symbols) for d in val.shape)
        if isinstance(val, (torch.SymInt, int)):
            return SYM_INT, ()
        if isinstance(val, (torch.SymFloat, float)):
            return SYM_FLOAT, ()
        if isinstance(val, (torch.SymBool, bool)):
            return SYM_BOOL, ()
        return None, None

    def convert(a: Any) -> Any:
        if isinstance(a, torch.fx.Node):
            return env[a]
        if isinstance(a, (list, tuple)):
            return [convert(x) for x in a]
        if isinstance(a, (torch.dtype, torch.device, torch.layout, torch.memory_format)):
            return a
        return a

    for fx in ep.graph.nodes:
        val = fx.meta.get("val")
        module = _module_path(fx)
        if fx.op == "placeholder":
            spec = specs[fx.name]
            if spec.kind == InputKind.USER_INPUT:
                dtype, shape = typed(val)
                env[fx] = graph.add_input(fx.name, dtype, shape)
            else:
                tensor = _lookup(ep, spec)
                env[fx] = graph.add_constant(tensor, name=spec.target or fx.name,
                                             module=_owner(spec.target or ""))
        elif fx.op == "call_function":
            env[fx] = _convert_call(graph, fx, val, module, typed, convert)
        elif fx.op == "output":
            outs = fx.args[0]
            for spec, o in zip(sig.output_specs, outs):
                if spec.kind == OutputKind.USER_OUTPUT:
                    graph.outputs.append(env[o])
        else:
            raise UnsupportedOpError(f"unsupported FX node kind '{fx.op}' ({fx.target}) "
                                     f"in module '{module or '<top>'}'")
    graph.meta["symbols"] = sorted(set(symbols.values()))
    return graph


def _convert_call(graph: Graph, fx: torch.fx.Node, val: Any, module: str, typed, convert) -> Any:
    target = fx.target
    if target is operator.getitem:
        src, index = fx.args
        produced = convert(src)
        return produced[index]
    if target in _SYM_OPS:
        args = {f"a{i}": convert(a) for i, a in enumerate(fx.args)}
        node = graph.add_op(_SYM_OPS[target], args, [typed(val)], module=module, names=[fx.name])
        return node.output
    if not isinstance(target, torch._ops.OpOverload):
        raise UnsupportedOpError(f"unsupported call '{getattr(target, '__name__', target)}' "
                                 f"in module '{module or '<top>'}'; arcompile converts aten ops "
                                 "and arithmetic on sizes")
    schema = target._schema
    args: dict[str, Any] = {}
    for i, arg in enumerate(schema.arguments):
        if i < len(fx.args) and not arg.kwarg_only:
            args[arg.name] = convert(fx.args[i])
        elif arg.name in fx.kwargs:
            args[arg.name] = convert(fx.kwargs[arg.name])
    if isinstance(val, (list, tuple)):
        outputs = [typed(v) for v in val]
        names = [f"{fx.name}_{i}" for i in range(len(outputs))]
    elif val is None:
        outputs, names = [], []
    else:
        outputs, names = [typed(val)], [fx.name]
    node = graph.add_op(op_name(target), args, outputs, module=module, names=names)
    if isinstance(val, (list, tuple)):
        return list(node.outputs)
    return node.outputs[0] if node.outputs else None


def _lookup(ep: ExportedProgram, spec) -> torch.Tensor:
    target = spec.target
    if target in ep.state_dict:
        t = ep.state_dict[target]
    elif target in ep.constants:
        t = ep.constants[target]
    else:
        raise UnsupportedOpError(f"exported input '{spec.arg.name}' ({spec.kind.name}) has no tensor")
    if not isinstance(t, torch.Tensor):
        raise UnsupportedOpError(f"constant '{target}' is a {type(t).__name__}, not a tensor; "
                                 "arcompile accepts tensor constants only")
    return t.detach() if t.requires_grad else t


def _module_path(fx: torch.fx.Node) -> str:
    stack = fx.meta.get("nn_module_stack") or {}
    if not stack:
        return ""
    path = list(stack.values())[-1][0]
    if path.startswith("_empty_nn_module_stack"):  # a placeholder torch.export writes
        return ""
    return _clean_path(path)


def _clean_path(path: str) -> str:
    # strict=False export gives "m.model.layers.0.mlp"; dynamo gives "L['self'].model.layers[0]"
    path = path.replace("L['self'].", "").replace("L['self']", "")
    path = path.replace("[", ".").replace("]", "").replace("'", "")
    return path.strip(".")


def _owner(target: str) -> str:
    return target.rsplit(".", 1)[0] if "." in target else ""


def _symbol_names(ep: ExportedProgram) -> dict[sympy.Symbol, str]:
    """Map the symbols of the first user input's dims to B and T (others keep their names)."""
    names: dict[sympy.Symbol, str] = {}
    users = [s for s in ep.graph_signature.input_specs if s.kind == InputKind.USER_INPUT]
    placeholders = {n.name: n for n in ep.graph.nodes if n.op == "placeholder"}
    if users:
        val = placeholders[users[0].arg.name].meta.get("val")
        if isinstance(val, torch.Tensor):
            for label, d in zip(("B", "T"), val.shape):
                if isinstance(d, torch.SymInt) and isinstance(d.node.expr, sympy.Symbol):
                    names[d.node.expr] = label
    return names


def _dim(d: Any, symbols: dict[sympy.Symbol, str]) -> int | str:
    if isinstance(d, int):
        return d
    expr = d.node.expr
    if expr.is_number:
        return int(expr)
    subs = {s: sympy.Symbol(n, integer=True, positive=True) for s, n in symbols.items()
            if s in expr.free_symbols}
    return str(expr.xreplace(subs))
