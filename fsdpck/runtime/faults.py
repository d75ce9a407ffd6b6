"""Failure drills: ``FSDPCK_FAULT=PHASE:RANK[:KIND]`` makes one rank fail at one phase.

Users rehearse their job scripts' failure handling with it (README, "Failure drills").
Phases: init, step, save, load, compare; save and load drills fire inside DCP's own I/O
(``fsdpck.state.flows``), the others as their phase starts (``fsdpck.runtime.phases``).
Kinds: raise (an exception, the default), exit (the process exits 3 at once, as after a
fatal error), hang (the rank stops responding; the others time out), kill (SIGKILL, as the
OOM killer would).
"""

from __future__ import annotations

import os
import signal
import sys
import time
from dataclasses import dataclass

from fsdpck.errors import UsageError

PHASES = ("init", "step", "save", "load", "compare")
KINDS = ("raise", "exit", "hang", "kill")
ENV = "FSDPCK_FAULT"


class InjectedFault(RuntimeError):
    """The exception a ``raise`` drill throws."""


@dataclass(frozen=True, slots=True)
class Fault:
    phase: str
    rank: int
    kind: str = "raise"


def parse(text: str | None) -> Fault | None:
    if not text:
        return None
    parts = text.split(":")
    if len(parts) not in (2, 3) or parts[0] not in PHASES or not parts[1].isdigit() or (len(parts) == 3 and parts[2] not in KINDS):
        raise UsageError(
            f"{ENV}={text!r} is not PHASE:RANK[:KIND] with PHASE one of {', '.join(PHASES)} "
            f"and KIND one of {', '.join(KINDS)}"
        )
    return Fault(parts[0], int(parts[1]), parts[2] if len(parts) == 3 else "raise")


def from_env() -> Fault | None:
    return parse(os.environ.get(ENV))


def maybe_inject(phase: str, rank: int) -> None:
    """Fail here if the drill asks for this phase on this rank."""
    fault = from_env()
    if fault is None or fault.phase != phase or fault.rank != rank:
        return
    if fault.kind == "raise":
        raise InjectedFault(f"injected fault ({ENV}={phase}:{rank}:raise)")
    sys.stdout.flush()
    sys.stderr.flush()
    if fault.kind == "exit":
        print(f"fsdpck: error: rank {rank} during {phase}: injected fault, exiting ({ENV})", file=sys.stderr, flush=True)
        os._exit(3)
    if fault.kind == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    while True:  # hang: stop responding, as a rank stuck in I/O or a deadlock would
        time.sleep(3600)
