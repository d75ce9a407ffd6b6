"""Recording what the failure tests saw, for docs/reliability.md.

Each reliability test calls ``record(...)`` with the fault, what the user saw, the exit
code, the time to exit and what was left on disk. With FSDPCK_RELIABILITY_LOG=path set,
rows are appended there as JSON lines; ``scripts/reliability_table.py`` turns them into
the table in docs/reliability.md. Without it, ``record`` does nothing.
"""

from __future__ import annotations

import json
import os


def current_test() -> str:
    """The running test as pytest names it (``tests/integration/test_drills.py::test_drill``), without
    its parameters and phase: the table's "test" column, never a stale hand-written path."""
    current = os.environ.get("PYTEST_CURRENT_TEST", "")
    return current.rsplit(" ", 1)[0].split("[", 1)[0] or "?"


def record(fault: str, *, sees: str, code: int, seconds: float, left: str, test: str | None = None) -> None:
    path = os.environ.get("FSDPCK_RELIABILITY_LOG")
    if not path:
        return
    row = {"fault": fault, "sees": sees.strip(), "code": code, "seconds": round(seconds, 1), "left": left,
           "test": test or current_test()}
    with open(path, "a") as f:
        f.write(json.dumps(row) + "\n")


def sees(text: str, *needles: str) -> str:
    """The first line of ``text`` that holds any of ``needles`` (what the user reads)."""
    for line in text.splitlines():
        if any(n in line for n in needles):
            return line.strip()
    return ""
