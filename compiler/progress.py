"""Progress of the long commands on stderr: a live line on a terminal, timestamped lines elsewhere.

    with progress(f"compiling {model.name}", quiet=quiet) as report:
        compile_model(model, out, progress=report)     # report("phase") as each phase begins
        report.count(done, total)                       # counted work (eval's tokens)

On a terminal, rich redraws one line (spinner, phase, elapsed time) and erases it at the end.
Elsewhere (a log, CI, a pipe) nothing can be redrawn, so each phase is one line,
`kiln: [  3.1 s] phase`, and a last one gives the total time; with `quiet` nothing is shown.
Errors are not progress: the command line prints them whatever this does.
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterator
from contextlib import contextmanager

import click

#: a counted task prints at most one plain line per this many seconds (and its last count)
COUNT_EVERY_S = 5.0
#: what a plain progress line looks like (tests tell them from error lines with it)
PLAIN_LINE = re.compile(r"^kiln: \[ *\d+\.\d s\] ")


class Reporter:
    """Called with each phase's description; `count` reports counted work."""

    def __init__(self, title: str, *, live=None, task=None, plain: bool = False):
        self.title, self._live, self._task, self._plain = title, live, task, plain
        self._start = self._last_count = time.perf_counter()

    def __call__(self, message: str) -> None:
        if self._live is not None:
            self._live.update(self._task, description=message)
        elif self._plain:
            self._line(message)

    def count(self, done: int, total: int | None) -> None:
        if self._live is not None:
            self._live.update(self._task, completed=done, total=total)
        elif self._plain:
            now = time.perf_counter()
            if done == total or now - self._last_count >= COUNT_EVERY_S:
                self._last_count = now
                self._line(f"{self.title}: {done}/{total if total is not None else '?'}")

    def elapsed(self) -> float:
        return time.perf_counter() - self._start

    def _line(self, message: str) -> None:
        click.echo(f"kiln: [{self.elapsed():5.1f} s] {message}", err=True)


@contextmanager
def progress(title: str, *, quiet: bool = False, counted: bool = False) -> Iterator[Reporter]:
    """A Reporter for the work done inside the block; `counted` shows a bar with done/total on
    a terminal (for work reported through `count`)."""
    from rich.console import Console

    console = Console(stderr=True)
    if quiet or not console.is_terminal:
        reporter = Reporter(title, plain=not quiet)
        reporter(title)
        yield reporter
        reporter(f"{title}: done")
        return
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        SpinnerColumn,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    columns = ((TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                TimeElapsedColumn(), TimeRemainingColumn()) if counted else
               (SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn()))
    with Progress(*columns, console=console, transient=True) as live:
        yield Reporter(title, live=live, task=live.add_task(title, total=None))
