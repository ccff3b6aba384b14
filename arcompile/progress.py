"""Progress of long steps, and the summary after them: one narrow interface, three reporters.

Code that runs for more than a few seconds names its step and, when it knows how much there
is, how far it got; it never knows where (or whether) that is shown:

    from arcompile import progress

    with progress.step("exporting with torch.export"):
        program = export(...)
    for ids in progress.track(sequences, "GPTQ calibration", unit="seq"):
        run(ids)

The reporter installed by ``reporting(...)`` decides what the user sees (``for_stream``):

- ``RichReporter``: stderr is a terminal. Live bars (rich) with the step, done / total, rate,
  elapsed time and an estimate, nested steps indented; a finished step leaves one line.
- ``PlainReporter``: a pipe, a file, CI (``CI`` set) or ``TERM=dumb``. No control characters:
  log lines as they come and one line per finished step, nothing while it runs.
- ``Reporter`` (the default, and ``--quiet``): silent. Library calls and tests print nothing
  unless a caller installs a reporter.

The pass manager reports through a hook (``PassProgressHook``), not from inside passes.
"""

from __future__ import annotations

import os
import sys
import time
from collections import deque
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any, Iterable, Iterator, TextIO


@dataclass
class Step:
    """A running step: ``advance()`` as its items finish; ``total`` may be set late."""

    name: str
    total: int | None = None
    unit: str = ""
    depth: int = 0
    echo: bool = True  # leaves a line of its own when it ends
    done: int = 0
    start: float = field(default_factory=time.perf_counter)
    seconds: float = 0.0
    _reporter: "Reporter | None" = field(default=None, repr=False)

    def advance(self, n: int = 1) -> None:
        self.done += n
        if self._reporter is not None:
            self._reporter._advanced(self)

    def describe(self) -> str:
        """``name: 12/64 seq in 8.1 s (7.9 seq/s)``, or ``name: 8.1 s`` without a count."""
        if self.total is None and not self.done:
            return f"{self.name}: {self.seconds:.1f} s"
        count = f"{self.done}/{self.total}" if self.total is not None else f"{self.done}"
        unit = f" {self.unit}" if self.unit else ""
        speed = f" ({rate(self.done / self.seconds, self.unit)})" if self.seconds > 0 and \
            self.done else ""
        return f"{self.name}: {count}{unit} in {self.seconds:.1f} s{speed}"


def rate(per_second: float, unit: str = "") -> str:
    """``7.9 seq/s``, or ``24.3 s/seq`` below one a second (as tqdm writes it)."""
    unit = unit or "it"
    return f"{per_second:.1f} {unit}/s" if per_second >= 1 else f"{1 / per_second:.1f} s/{unit}"


class Reporter:
    """Silent: the default when nothing is installed, and ``--quiet``. Subclasses show more."""

    def __init__(self) -> None:
        # the steps that ended, in the order they ended (the last ones: a process that
        # optimizes again and again keeps a bounded record)
        self.finished: deque[Step] = deque(maxlen=1000)
        self._open: list[Step] = []

    def log(self, msg: str) -> None:
        pass

    @contextmanager
    def step(self, name: str, total: int | None = None, unit: str = "",
             echo: bool = True) -> Iterator[Step]:
        """A step from ``with`` to its end. ``echo=False``: no line of its own when it ends
        (its caller already logs one, as the pass manager does per pass)."""
        s = Step(name, total, unit, depth=len(self._open), echo=echo, _reporter=self)
        self._open.append(s)
        self._started(s)
        ok = False
        try:
            yield s
            ok = True
        finally:
            s.seconds = time.perf_counter() - s.start
            self._open.remove(s)
            self.finished.append(s)
            self._ended(s, ok and echo)

    # what a reporter shows: overridden
    def _started(self, s: Step) -> None:
        pass

    def _advanced(self, s: Step) -> None:
        pass

    def _ended(self, s: Step, echo: bool) -> None:
        pass

    def start(self) -> None:
        pass

    def stop(self) -> None:
        pass


class PlainReporter(Reporter):
    """One line per log message and per finished step, nothing in between: for pipes and CI."""

    def __init__(self, stream: TextIO | None = None) -> None:
        super().__init__()
        self.stream = stream

    def _write(self, line: str) -> None:
        print(line, file=self.stream or sys.stderr, flush=True)

    def log(self, msg: str) -> None:
        self._write(msg)

    def _ended(self, s: Step, echo: bool) -> None:
        if echo:
            self._write(f"{'  ' * s.depth}done: {s.describe()}")


class RichReporter(Reporter):
    """Live bars on a terminal (rich): one row per running step, indented when nested."""

    def __init__(self, stream: TextIO | None = None) -> None:
        super().__init__()
        from rich.console import Console
        from rich.progress import (
            BarColumn,
            Progress,
            SpinnerColumn,
            TextColumn,
            TimeElapsedColumn,
        )

        self.console = Console(file=stream or sys.stderr, highlight=False)
        self._progress = Progress(
            SpinnerColumn(), TextColumn("{task.description}"), BarColumn(bar_width=30),
            TimeElapsedColumn(), _count_column(), console=self.console, transient=True,
            # stdout stays the command's own (it may be piped while stderr is a terminal)
            redirect_stdout=False, redirect_stderr=True)
        self._tasks: dict[int, Any] = {}

    # the live display runs only while a step does: between steps the terminal is plain
    def stop(self) -> None:
        self._progress.stop()

    def log(self, msg: str) -> None:
        from rich.text import Text

        self.console.print(Text(msg))  # as text: no markup read from messages

    def _started(self, s: Step) -> None:
        if not self._tasks:
            self._progress.start()
        self._tasks[id(s)] = self._progress.add_task("  " * s.depth + s.name, total=s.total,
                                                     unit=s.unit)

    def _advanced(self, s: Step) -> None:
        self._progress.update(self._tasks[id(s)], completed=s.done, total=s.total)

    def _ended(self, s: Step, echo: bool) -> None:
        from rich.text import Text

        self._progress.remove_task(self._tasks.pop(id(s)))
        if echo:
            self.console.print(Text.assemble("  " * s.depth, ("✓ ", "green"), s.describe()))
        if not self._tasks:
            self._progress.stop()


def _count_column():
    """done/total, rate and estimate, for a step that counts its items (else nothing)."""
    from rich.progress import ProgressColumn
    from rich.text import Text

    class CountColumn(ProgressColumn):
        def render(self, task) -> Text:
            if task.total is None:
                return Text("")
            speed = f"  {rate(task.speed, task.fields.get('unit', ''))}" if task.speed else ""
            left = task.time_remaining
            eta = f"  eta {int(left) // 60}:{int(left) % 60:02d}" if left is not None else ""
            return Text(f"{task.completed:.0f}/{task.total:.0f}{speed}{eta}",
                        style="progress.data.speed")
    return CountColumn()


_current: ContextVar[Reporter] = ContextVar("arcompile_progress", default=Reporter())


def current() -> Reporter:
    return _current.get()


def step(name: str, total: int | None = None, unit: str = "", echo: bool = True):
    """A step of the installed reporter (``with progress.step(...) as s: ... s.advance()``)."""
    return _current.get().step(name, total, unit, echo)


def track(items: Iterable, name: str, total: int | None = None, unit: str = "",
          echo: bool = True) -> Iterator:
    """``items`` one by one, each counted as done once the loop body has run."""
    if total is None and hasattr(items, "__len__"):
        total = len(items)  # type: ignore[arg-type]
    with step(name, total, unit, echo) as s:
        for item in items:
            yield item
            s.advance()


def log(msg: str) -> None:
    _current.get().log(msg)


@contextmanager
def reporting(reporter: Reporter) -> Iterator[Reporter]:
    """Install ``reporter`` for the ``with`` block (started and stopped around it)."""
    token = _current.set(reporter)
    reporter.start()
    try:
        yield reporter
    finally:
        reporter.stop()
        _current.reset(token)


def install(reporter: Reporter) -> Reporter:
    """Install ``reporter`` for the rest of the process (scripts such as bench/suite.py; the
    rich reporter's live display starts and stops with its steps, so nothing needs closing)."""
    _current.set(reporter)
    return reporter


def interactive(stream: TextIO) -> bool:
    """A person watching a terminal: not a pipe or file, not CI, not ``TERM=dumb``."""
    return (hasattr(stream, "isatty") and stream.isatty() and not os.environ.get("CI")
            and os.environ.get("TERM") != "dumb")


def for_stream(quiet: bool = False, stream: TextIO | None = None) -> Reporter:
    """The reporter the command line uses: silent with ``quiet``, bars on a terminal, plain
    lines otherwise."""
    stream = stream or sys.stderr
    if quiet:
        return Reporter()
    return RichReporter(stream) if interactive(stream) else PlainReporter(stream)


class PassProgressHook:
    """A pass-manager hook (``passes/manager.Hook``'s two methods) that shows each pass as a
    step while it runs. The manager puts it after every other hook, so the step also spans
    their checks (verification, the numeric check); the manager's own line reports it."""

    def __init__(self) -> None:
        self._steps: list = []

    def before(self, p, graph) -> None:
        while self._steps:  # a pass that failed earlier never reached ``after``
            self._steps.pop().__exit__(RuntimeError, RuntimeError("pass failed"), None)
        cm = step(f"pass {p.name}", echo=False)
        cm.__enter__()
        self._steps.append(cm)

    def after(self, p, graph, record) -> None:
        if self._steps:
            self._steps.pop().__exit__(None, None, None)


def print_summary(lines: list[str], records: Iterable = (), steps: Iterable[Step] = (),
                  file: TextIO | None = None) -> None:
    """After the last step: ``lines`` (``key: value`` figures, as ``optimize`` prints them)
    and the passes' records as tables on a terminal; elsewhere the lines as they are, so
    scripts that read them keep working."""
    file = file or sys.stdout
    if not interactive(file):
        for line in lines:
            print(line, file=file, flush=True)
        return
    from rich import box
    from rich.console import Console, Group
    from rich.table import Table

    records = list(records)
    passes = Table(box=box.SIMPLE_HEAD, title="passes", title_justify="left", pad_edge=False)
    for header, justify in (("pass", "left"), ("nodes", "right"), ("time", "right"),
                            ("rewrites", "left"), ("max|Δlogit|", "right")):
        passes.add_column(header, justify=justify, no_wrap=header != "rewrites")
    for r in records:
        rules = ", ".join(f"{k}={v}" for k, v in r.counts.items() if v) or "-"
        if r.notes:
            rules += f" [dim]({len(r.notes)} not applied)[/]"
        took = f"{r.seconds * 1e3:.0f} ms" if r.seconds < 1 else f"{r.seconds:.1f} s"
        passes.add_row(r.name, f"{r.nodes_before} → {r.nodes_after}", took,
                       rules, f"{r.max_abs_diff:.2g}" if r.max_abs_diff is not None else "-")
    results = Table(box=box.SIMPLE_HEAD, show_header=False, title="result",
                    title_justify="left", pad_edge=False)
    results.add_column(style="bold", no_wrap=True)
    results.add_column()
    for line in lines:
        key, _, value = line.partition(": ")
        results.add_row(key, value) if value else results.add_row("", line)
    # every outermost step, passes included (their steps leave no line of their own)
    slow = sorted((s for s in steps if s.depth == 0), key=lambda s: -s.seconds)[:3]
    if slow:
        results.add_row("slowest steps", ", ".join(f"{s.name} {s.seconds:.1f} s" for s in slow))
    Console(file=file).print(Group(*([passes] if records else []), results))
