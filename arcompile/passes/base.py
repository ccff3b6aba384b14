"""The pass contract.

A pass takes a graph, rewrites it in place and returns a PassResult: whether it changed the
graph and how many times each of its rewrite rules fired. A pass states the numeric tolerance
it promises, as a fraction of the logits' magnitude in float64 (``numeric_check.py``:
``EXACT`` for rewrites exact in real arithmetic, ``0.0`` for passes that must not change
results at all); the pass manager's numeric check holds it to that.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from arcompile.ir.graph import Graph


@dataclass
class PassResult:
    counts: dict[str, int] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    # a pass that proves itself (its inputs change, so the numeric check cannot compare):
    # the max |Δlogit| its own proof measured
    max_abs_diff: float | None = None

    @property
    def changed(self) -> bool:
        return any(self.counts.values())

    def bump(self, rule: str, n: int = 1) -> None:
        self.counts[rule] = self.counts.get(rule, 0) + n

    def note(self, text: str) -> None:
        """Record why something did not apply; shown by ``optimize`` and kept in the manifest."""
        self.notes.append(text)


class Pass:
    """Base class: set ``name``, ``tolerance`` and a docstring; implement ``run``."""

    name: str = "pass"
    # max |Δlogit| / max(1, max|logit|) this pass may cause against the graph it got, both
    # run in float64 (numeric_check.py)
    tolerance: float = 0.0

    def run(self, graph: Graph) -> PassResult:
        raise NotImplementedError

    def settings(self) -> dict:
        """The options this pass ran with, recorded in the engine manifest."""
        return {}

    def __repr__(self) -> str:
        return f"<pass {self.name}>"
