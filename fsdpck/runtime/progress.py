"""Progress of a long offline read: bytes done out of a total, shown only once the read takes a while.

Readers call the ``advance(nbytes)`` of :meth:`Progress.reading` from any thread. A ticker
thread hands ``(done, elapsed)`` to a *view* (``fsdpck.report.progress``: a rich bar with bytes
and rate on a terminal, a line every ``FSDPCK_PROGRESS_EVERY`` seconds, default 10, and one at
the end in a log) once the read has run for ``FSDPCK_PROGRESS_AFTER`` seconds (default 2), so
a quick read shows nothing at all.

Both variables take seconds (0: progress from the first byte, a line every tick); anything else is a usage
error naming the variable. Torch-free: the offline commands check them before importing torch.
"""

from __future__ import annotations

import math
import os
import threading
import time
from contextlib import contextmanager
from typing import Callable, Iterator, Protocol

from fsdpck.errors import UsageError

AFTER_ENV = "FSDPCK_PROGRESS_AFTER"
EVERY_ENV = "FSDPCK_PROGRESS_EVERY"
DEFAULT_AFTER_S = 2.0
DEFAULT_EVERY_S = 10.0
TICK_S = 0.2  # how often the ticker tells the view (a log view prints only every EVERY seconds)


class View(Protocol):
    """What shows progress: started once the read has taken a while, then updated, then finished."""

    def start(self, label: str, total: int) -> None: ...

    def update(self, done: int, elapsed: float) -> None: ...

    def finish(self, done: int, elapsed: float) -> None: ...


def seconds_from_env(name: str, default: float) -> float:
    """A number of seconds (>= 0) from the environment; UsageError naming the variable otherwise."""
    text = os.environ.get(name, "").strip()
    if not text:
        return default
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (value >= 0 and math.isfinite(value)):
        raise UsageError(f"{name}={text!r}: expected a number of seconds, 0 or more")
    return value


def after_from_env() -> float:
    return seconds_from_env(AFTER_ENV, DEFAULT_AFTER_S)


def every_from_env() -> float:
    return seconds_from_env(EVERY_ENV, DEFAULT_EVERY_S)


class Progress:
    """Shows reads through ``view`` once they have run ``after_s`` seconds; a ``None`` view shows nothing."""

    def __init__(self, view: View | None, *, after_s: float | None = None):
        self.view = view
        self.after_s = after_from_env() if after_s is None else after_s

    @contextmanager
    def reading(self, label: str, total: int) -> Iterator[Callable[[int], None]]:
        """A read of ``total`` bytes: yields ``advance(nbytes)``, safe to call from any thread."""
        if self.view is None:
            yield lambda n: None
            return
        task = _Task(self.view, label, total, after_s=self.after_s)
        try:  # entered before the view is first shown: whatever start() got to, end() finishes it
            if self.after_s <= 0:  # at once, before the first byte
                task.show(0, 0.0)
            task.thread.start()
            yield task.advance
        finally:
            task.end()


NO_PROGRESS = Progress(None, after_s=0.0)


class _Task:
    """One read being shown: the counter, and the ticker thread that tells the view."""

    def __init__(self, view: View, label: str, total: int, *, after_s: float):
        self.view, self.label, self.total, self.after_s = view, label, max(0, int(total)), after_s
        self.done = 0
        self.lock = threading.Lock()
        self.stop = threading.Event()
        self.shown = False
        self.failed = False
        self.t0 = time.perf_counter()
        self.thread = threading.Thread(target=self._tick, name="fsdpck-progress", daemon=True)

    def advance(self, n: int) -> None:
        with self.lock:
            self.done += int(n)

    def _tick(self) -> None:
        try:
            while not self.stop.wait(TICK_S if self.shown else min(TICK_S, max(0.01, self.after_s))):
                elapsed = time.perf_counter() - self.t0
                if elapsed < self.after_s:
                    continue
                with self.lock:
                    done = self.done
                self.show(done, elapsed)
        except Exception:  # a view that fails here (a closed stderr, a broken terminal) shows nothing more;
            self.failed = True  # progress is a courtesy: the read goes on and its result stands

    def show(self, done: int, elapsed: float) -> None:
        if self.failed:
            return
        if not self.shown:
            self.shown = True  # from here on end() finishes the view, whatever start() got to
            self.view.start(self.label, self.total)
        self.view.update(done, elapsed)

    def end(self) -> None:
        self.stop.set()
        if self.thread.ident is not None:  # started
            self.thread.join()
        if self.shown:
            try:
                self.view.finish(self.done, time.perf_counter() - self.t0)
            except Exception:
                if not self.failed:  # a view that already failed is only given its chance to clean up
                    raise
