"""The intermediate representation: graph, verifier, printer and reference interpreter."""

from arcompile.ir.graph import SYM_INT, Graph, In, Node, Value
from arcompile.ir.interpreter import run_graph
from arcompile.ir.printer import print_graph
from arcompile.ir.verify import verify

__all__ = ["Graph", "In", "Node", "Value", "SYM_INT", "run_graph", "print_graph", "verify"]
