"""The contract every loaded program meets: one int64 tokens [B, T] in, one float logits
[B, T, V] out, with B and T dynamic and V a fixed number.

``check_contract`` says what a program takes and returns when it does not match. ``normalize``
runs ``ep.run_decompositions({})`` only when the graph holds something the IR converter cannot
read (higher-order ops, submodules, calls that are neither aten ops nor arithmetic on sizes),
because it is slow on big models (~21 s on SmolLM2).
"""

from __future__ import annotations

import math
from typing import Any, Callable

import torch
from torch.export import ExportedProgram
from torch.export.graph_signature import InputKind, OutputKind

from arcompile.errors import ModelLoadError, first_line

_SIZE_FUNCTIONS = {torch.sym_max, torch.sym_min, torch.sym_not, torch.sym_float, torch.sym_int,
                   torch.sym_ite, math.ceil, math.floor, math.trunc, math.sqrt}


def check_contract(ep: ExportedProgram, source: str) -> int:
    """Raise ModelLoadError unless ``ep`` maps int64 [B, T] to float [B, T, V]; return V."""
    inputs, outputs = user_values(ep)
    takes, returns = describe(inputs), describe(outputs)
    wanted = "one int64 token tensor [B, T] and return one float logits tensor [B, T, V]"
    if len(inputs) != 1 or len(outputs) != 1:
        raise ModelLoadError(f"{source}: the program takes {takes} and returns {returns}; "
                             f"arcompile needs it to take {wanted}")
    tokens, logits = inputs[0], outputs[0]
    if not isinstance(tokens, torch.Tensor) or tokens.dtype != torch.int64 or tokens.dim() != 2:
        raise ModelLoadError(f"{source}: the program takes {takes}; arcompile needs {wanted}")
    if (not isinstance(logits, torch.Tensor) or not logits.dtype.is_floating_point
            or logits.dim() != 3):
        raise ModelLoadError(f"{source}: the program returns {returns}; arcompile needs "
                             f"{wanted}")
    b, t = tokens.shape
    if not all(_is_symbol(d) for d in (b, t)) or _expr(b) == _expr(t):
        raise ModelLoadError(f"{source}: the program takes {takes} with fixed sizes; arcompile "
                             "needs batch and sequence dims dynamic: export with dynamic_shapes="
                             "({0: Dim.DYNAMIC, 1: Dim.DYNAMIC},)")
    if _expr(logits.shape[0]) != _expr(b) or _expr(logits.shape[1]) != _expr(t):
        raise ModelLoadError(f"{source}: the program takes {takes} but returns {returns}; the "
                             "logits must keep the tokens' batch and sequence dims")
    vocab = logits.shape[2]
    if not isinstance(vocab, int):
        raise ModelLoadError(f"{source}: the program returns {returns}; the vocab dim must be "
                             "a fixed number")
    return vocab


def normalize(ep: ExportedProgram, source: str, log: Callable[[str], None]) -> ExportedProgram:
    """``ep`` itself when the IR converter can read it, else its ``run_decompositions({})``."""
    odd = unreadable_nodes(ep)
    if not odd:
        return ep
    log(f"normalizing the program with run_decompositions (it has {odd[0]}) ...")
    try:
        return ep.run_decompositions({})
    except Exception as e:  # torch raises many unrelated types here
        raise ModelLoadError(f"{source}: the program holds {odd[0]} and torch could not "
                             f"normalize it: {first_line(e)}") from e


def unreadable_nodes(ep: ExportedProgram) -> list[str]:
    """Descriptions of the nodes from_export.py cannot convert as they are."""
    odd = []
    for node in ep.graph.nodes:
        if node.op in ("placeholder", "output"):
            continue
        if node.op != "call_function":
            odd.append(f"a {node.op} node '{node.target}'")
        elif isinstance(node.target, torch._ops.HigherOrderOperator):
            odd.append(f"the higher-order op {node.target.name()}")
        elif not (isinstance(node.target, torch._ops.OpOverload)
                  # arithmetic on sizes and getitem on multi-output ops
                  or getattr(node.target, "__module__", None) in ("_operator", "operator")
                  or node.target in _SIZE_FUNCTIONS):
            odd.append(f"a call of {getattr(node.target, '__name__', node.target)}")
    return odd


def user_values(ep: ExportedProgram) -> tuple[list[Any], list[Any]]:
    """The example values (FakeTensors, SymInts, constants) of the user inputs and outputs."""
    placeholders = {n.name: n for n in ep.graph.nodes if n.op == "placeholder"}
    inputs = []
    for spec in ep.graph_signature.input_specs:
        if spec.kind != InputKind.USER_INPUT:
            continue
        node = placeholders.get(getattr(spec.arg, "name", None))
        inputs.append(node.meta.get("val") if node is not None
                      else getattr(spec.arg, "value", None))
    output_node = next(n for n in ep.graph.nodes if n.op == "output")
    outputs = []
    for spec, arg in zip(ep.graph_signature.output_specs, output_node.args[0]):
        if spec.kind == OutputKind.USER_OUTPUT:
            outputs.append(arg.meta.get("val") if isinstance(arg, torch.fx.Node) else arg)
    return inputs, outputs


def describe(values: list[Any]) -> str:
    """``(int64[B, T])``-style text for a list of example values."""
    parts = []
    for v in values:
        if isinstance(v, torch.Tensor):
            dims = ", ".join(str(d) for d in v.shape)
            parts.append(f"{str(v.dtype).replace('torch.', '')}[{dims}]")
        else:
            parts.append(type(v).__name__ if v is not None else "None")
    return "(" + ", ".join(parts) + ")"


def _is_symbol(d: Any) -> bool:
    return isinstance(d, torch.SymInt) and d.node.expr.is_Symbol


def _expr(d: Any) -> Any:
    return d.node.expr if isinstance(d, torch.SymInt) else d
