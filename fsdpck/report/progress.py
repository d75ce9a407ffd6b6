"""How a long read shows its progress: a rich bar on a terminal, a line now and then in a log.

The counting and the "only after a couple of seconds" rule are ``fsdpck.runtime.progress``;
these are its views. Both write to the console they are given (stderr: stdout carries the
report, or the JSON with ``--json -``).
"""

from __future__ import annotations

from typing import Any

from fsdpck.report.formats import fmt_bytes


def view(console: Any, *, every_s: float) -> Any:
    """The view for ``console``: a bar where it is a terminal, else a line every ``every_s`` seconds."""
    return BarView(console) if console.is_terminal else LogView(console, every_s=every_s)


def rate(done: int, elapsed: float) -> str:
    return f"{fmt_bytes(done / elapsed)}/s" if elapsed > 0 else "-"


class BarView:
    """A transient rich progress bar: label, bar, bytes done of the total, rate, time left."""

    def __init__(self, console: Any):
        self.console = console
        self.bar: Any = None
        self.task: Any = None

    def start(self, label: str, total: int) -> None:
        from rich.progress import (
            BarColumn,
            DownloadColumn,
            Progress,
            TextColumn,
            TimeRemainingColumn,
            TransferSpeedColumn,
        )

        self.bar = self.task = None  # a bar of an earlier read (diff reads two) is not this one's
        self.bar = Progress(TextColumn("{task.description}"), BarColumn(), DownloadColumn(binary_units=False),
                            TransferSpeedColumn(), TimeRemainingColumn(), console=self.console, transient=True)
        self.task = self.bar.add_task(label, total=total or None)
        self.bar.start()

    def update(self, done: int, elapsed: float) -> None:
        self.bar.update(self.task, completed=done)

    def finish(self, done: int, elapsed: float) -> None:
        if self.bar is None:  # start() was interrupted before the bar existed
            return
        try:
            if self.task is not None:
                self.bar.update(self.task, completed=done)
        finally:
            self.bar.stop()  # the cursor back, however far start() got


class LogView:
    """One plain line every ``every_s`` seconds, and one at the end: ``fsdpck: LABEL: 412 MB of 1.0 GB ...``."""

    def __init__(self, console: Any, *, every_s: float):
        self.console = console
        self.every_s = every_s
        self.label = ""
        self.total = 0
        self.last = None

    def _line(self, text: str) -> None:
        self.console.print(f"fsdpck: {self.label}: {text}", markup=False, highlight=False, soft_wrap=True)

    def start(self, label: str, total: int) -> None:
        self.label, self.total, self.last = label, total, None  # each read (diff reads two) has its own lines

    def update(self, done: int, elapsed: float) -> None:
        if self.last is not None and elapsed - self.last < self.every_s:
            return
        self.last = elapsed
        share = f" ({100 * done / self.total:.0f}%)" if self.total else ""
        self._line(f"{fmt_bytes(done)} of {fmt_bytes(self.total)}{share} in {elapsed:.1f}s, {rate(done, elapsed)}")

    def finish(self, done: int, elapsed: float) -> None:
        self._line(f"read {fmt_bytes(done)} in {elapsed:.1f}s, {rate(done, elapsed)}")
