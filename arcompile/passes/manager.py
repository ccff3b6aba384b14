"""The pass manager: runs passes in order with hooks around each one.

Hooks instrument from outside (STYLE.md #8): timing, verification and the numeric check are
hooks, and so is anything a later tool (the profiler) wants to measure after every pass. When
a pass fails, the error names the passes that ran before it.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch

from arcompile.errors import ArcompileError, PassError
from arcompile.ir.graph import Graph
from arcompile.ir.verify import verify
from arcompile.passes.base import Pass, PassResult
from arcompile.passes.numeric_check import gap, relative_gap, run_exact, within
from arcompile.progress import PassProgressHook


@dataclass
class PassRecord:
    """What one pass did: the row of ``optimize``'s report and of the manifest."""

    name: str
    counts: dict[str, int]
    notes: list[str]
    nodes_before: int
    nodes_after: int
    seconds: float
    settings: dict = field(default_factory=dict)
    max_abs_diff: float | None = None  # the numeric check's, or the pass's own proof's

    def as_dict(self) -> dict:
        return dict(self.__dict__)


class Hook:
    """Override either method; ``after`` may raise to stop the pipeline."""

    def before(self, p: Pass, graph: Graph) -> None:
        pass

    def after(self, p: Pass, graph: Graph, record: PassRecord) -> None:
        pass


class VerifyHook(Hook):
    def after(self, p: Pass, graph: Graph, record: PassRecord) -> None:
        verify(graph)


class NumericCheckHook(Hook):
    """Runs the graph on sample tokens after every pass, in float64, and holds each pass to its
    tolerance against the graph it got (``numeric_check.py`` says why float64 and relative).

    The first reference is the graph as it came from the frontend, run by the reference
    interpreter (no optimization of ours switched on), computed when the hook is made; after a
    pass passes, its outputs are the next pass's reference.
    """

    def __init__(self, graph: Graph, sample_inputs: Sequence[torch.Tensor]):
        self.inputs = list(sample_inputs)
        self.reference = run_exact(graph, self.inputs)
        self.traced = self.reference

    def after(self, p: Pass, graph: Graph, record: PassRecord) -> None:
        outs = run_exact(graph, self.inputs)
        diff = max(gap(a, b) for a, b in zip(outs, self.reference))
        relative = max(relative_gap(a, b) for a, b in zip(outs, self.reference))
        record.max_abs_diff = diff
        if not within(relative, p.tolerance):
            raise PassError(f"pass '{p.name}' changed the logits by {diff:.3g} "
                            f"({relative:.3g} of their magnitude, in float64), beyond its "
                            f"tolerance of {p.tolerance:g} of their magnitude")
        self.reference = outs


class PassManager:
    def __init__(self, passes: Sequence[Pass], hooks: Sequence[Hook] = (),
                 log: Callable[[str], None] | None = None):
        self.passes = list(passes)
        # progress last: its step spans the pass and the other hooks' checks after it
        self.hooks = [*hooks, PassProgressHook()]
        self.log = log

    def run(self, graph: Graph) -> list[PassRecord]:
        records: list[PassRecord] = []
        for p in self.passes:
            before = len(graph)
            for h in self.hooks:
                h.before(p, graph)
            start = time.perf_counter()
            try:
                result: PassResult = p.run(graph)
            except ArcompileError as e:
                raise PassError(self._failure(p, records, e)) from e
            except Exception as e:  # a bug in the pass: keep the cause, name the context
                raise PassError(self._failure(p, records, e)) from e
            record = PassRecord(p.name, dict(result.counts), list(result.notes), before,
                                len(graph), time.perf_counter() - start, p.settings(),
                                result.max_abs_diff)
            try:
                for h in self.hooks:
                    h.after(p, graph, record)
            except ArcompileError as e:
                raise PassError(self._failure(p, records, e)) from e
            records.append(record)
            if self.log:
                self.log(format_record(record))
        return records

    @staticmethod
    def _failure(p: Pass, records: list[PassRecord], e: Exception) -> str:
        ran = ", ".join(r.name for r in records) or "none"
        return f"pass '{p.name}' failed (passes run before it: {ran}): {e}"


def format_record(r: PassRecord) -> str:
    rules = ", ".join(f"{k}={v}" for k, v in r.counts.items() if v) or "no change"
    check = f", max|Δlogit| {r.max_abs_diff:.2g}" if r.max_abs_diff is not None else ""
    notes = f", {len(r.notes)} not applied (--explain says why)" if r.notes else ""
    return (f"  {r.name:<18} {r.nodes_before:>6} -> {r.nodes_after:<6} nodes  "
            f"{r.seconds * 1000:7.1f} ms  {rules}{check}{notes}")
