"""The IR core: values and uses, editing, the verifier, the printer and the interpreter."""

from __future__ import annotations

import pytest
import torch

from arcompile.errors import VerifyError
from arcompile.ir import Graph, print_graph, run_graph, verify


def small_graph():
    """y = tanh(x @ w) + x @ w, built by hand."""
    g = Graph("small")
    x = g.add_input("x", torch.float32, ("T", 4))
    w = g.add_constant(torch.eye(4), name="w", module="proj")
    mm = g.add_op("aten.mm", {"self": x, "mat2": w}, [(torch.float32, ("T", 4))], module="proj")
    th = g.add_op("aten.tanh", {"self": mm.output}, [(torch.float32, ("T", 4))], module="act")
    add = g.add_op("aten.add.Tensor", {"self": th.output, "other": mm.output},
                   [(torch.float32, ("T", 4))], module="")
    g.outputs.append(add.output)
    return g, x, w, mm, th, add


def test_uses_keep_operand_order_and_replace_all_uses():
    g, x, w, mm, th, add = small_graph()
    assert mm.inputs == (x, w)
    assert mm.output.uses() == [(th, 0), (add, 1)]
    mm.output.replace_all_uses_with(x)
    assert th.inputs == (x,) and add.inputs == (th.output, x)
    assert add.arg("other") is x
    assert x.uses() == [(mm, 0), (th, 0), (add, 1)]
    g.remove_node(mm)
    verify(g)


def test_remove_node_refuses_a_used_node_and_weights_are_not_copied():
    g, x, w, mm, th, add = small_graph()
    with pytest.raises(VerifyError, match="still used"):
        g.remove_node(mm)
    tensor = torch.ones(3)
    assert g.add_constant(tensor, name="t").data is tensor


def test_verifier_catches_dangling_inputs_and_bad_constants():
    g, x, w, mm, th, add = small_graph()
    g._g.remove_node(mm)  # bypass the API on purpose
    with pytest.raises(VerifyError, match="dangling"):
        verify(g)
    g2, *_ = small_graph()
    const = next(n for n in g2.nodes() if n.op == "arc.constant")
    const.output.data = torch.zeros(2, 2)
    with pytest.raises(VerifyError, match="holds torch.float32"):
        verify(g2)


def test_verifier_rejects_unknown_aten_arguments():
    g, x, *_ = small_graph()
    g.add_op("aten.tanh", {"self": x, "bogus": 1}, [(torch.float32, ("T", 4))])
    with pytest.raises(VerifyError, match="bogus"):
        verify(g)


def test_printer_shows_types_ops_and_modules():
    g, *_ = small_graph()
    text = print_graph(g)
    assert "graph small(%x: f32[T, 4])" in text
    assert "aten.mm(self=%x, mat2=%w)  # proj" in text
    assert "1 constants" in text


def test_interpreter_runs_and_checks_symbolic_dims():
    g, *_ = small_graph()
    x = torch.randn(3, 4)
    assert torch.allclose(run_graph(g, [x])[0], torch.tanh(x) + x)
    with pytest.raises(VerifyError, match="dim 1 should be 4"):
        run_graph(g, [torch.randn(3, 5)])


def test_printer_shows_operands_of_ops_that_keep_them_outside_attributes():
    g, x, w, *_ = small_graph()
    g.add_node("arc.demo", (x, w), {"eps": 1e-6}, [(torch.float32, ("T", 4))])
    assert "arc.demo(%x, %w, eps=1e-06)" in print_graph(g)
