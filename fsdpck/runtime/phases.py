"""Phases of a run on one rank: timed, named in error messages, marked for laggard detection,
the place failure drills fire, and shown as progress on rank 0.

A command times its work as ``with tracker.phase("save"): ...``. The phase running now is what
an error message names ("rank 1 during load: ..."); each phase entered is left in the process
group's store so that a rank that times out can say which rank fell behind.
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from typing import Any, Callable, ContextManager, Iterator

from fsdpck.runtime import collectives, dist, faults

LOG_PHASES_OVER_S = 2.0  # in a cluster log, a phase that took longer gets a line of its own


@contextmanager
def _no_progress(phase: str, label: str) -> Iterator[None]:
    yield


_reporter: list[Callable[[str, str], ContextManager[None]]] = [_no_progress]


def set_progress(reporter: Callable[[str, str], ContextManager[None]]) -> None:
    """Wrap every phase in ``reporter(phase, label)`` (rank 0 shows progress through it)."""
    _reporter[0] = reporter


def progress_reporter(console: Any) -> Callable[[str, str], ContextManager[None]]:
    """Rank 0's view of long phases: a transient spinner on a terminal, plain lines in a log."""

    @contextmanager
    def report(phase: str, label: str) -> Iterator[None]:
        if console.is_terminal:
            with console.status(f"{phase} {label}…", spinner="dots"):
                yield
            return
        t0 = time.perf_counter()
        yield
        took = time.perf_counter() - t0
        if took >= LOG_PHASES_OVER_S:
            console.print(f"fsdpck: {phase} {label} took {took:.1f}s", markup=False, highlight=False, soft_wrap=True)

    return report


class PhaseTracker:
    """Times phases, remembers which one is running (for error messages) and tells the progress reporter."""

    def __init__(self, rank: int, label: str = "") -> None:
        self.rank = rank
        self.label = label
        self.current = "init"
        self.times: dict[str, float] = {}
        _tracker[0] = self

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        self.current = name
        if name in faults.PHASES and name not in ("save", "load"):
            faults.maybe_inject(name, self.rank)  # save and load drills fire inside DCP's own I/O
        dist.mark_phase(name)
        t0 = time.perf_counter()
        with _reporter[0](name, self.label):
            yield
        self.times[name] = self.times.get(name, 0.0) + time.perf_counter() - t0

    def max_times(self, ctx) -> dict[str, float]:
        """The slowest rank's time per phase (a collective: every rank has run the same phases)."""
        names = list(self.times)  # execution order, the same on every rank
        return dict(zip(names, collectives.allreduce_floats(ctx, [self.times[n] for n in names], op="max")))


_tracker: list[PhaseTracker | None] = [None]


def current_phase() -> str:
    """The phase running now on this rank (for error messages); "init" before any."""
    return _tracker[0].current if _tracker[0] is not None else "init"
