"""fsdpck's exception types and the exit codes they map to.

Library code raises these; ``fsdpck.cli`` is the one place that turns them into
exit codes and one-paragraph messages (DESIGN.md, "Exit codes").
"""

from __future__ import annotations

EXIT_OK = 0
EXIT_DIFFERENCE = 1
EXIT_USAGE = 2
EXIT_RUNTIME = 3

EXIT_MEANING = {
    EXIT_OK: "verified",
    EXIT_DIFFERENCE: "difference found",
    EXIT_USAGE: "usage or set-up error",
    EXIT_RUNTIME: "runtime failure",
}


class FsdpckError(Exception):
    """Base of fsdpck's errors; ``exit_code`` says how the process ends."""

    exit_code = EXIT_RUNTIME

    def __init__(self, message: str, *, rank: int | None = None, phase: str | None = None):
        super().__init__(message)
        self.message = message
        self.rank = rank
        self.phase = phase

    def describe(self) -> str:
        """The one-paragraph message: where (rank, phase) and what."""
        where = []
        if self.rank is not None:
            where.append(f"rank {self.rank}")
        if self.phase is not None:
            where.append(f"during {self.phase}")
        prefix = (" ".join(where) + ": ") if where else ""
        return prefix + self.message


class UsageError(FsdpckError):
    """A bad option, path or combination: exit 2."""

    exit_code = EXIT_USAGE


class SetupError(FsdpckError):
    """The environment is not fit to run in (a dir not shared by all ranks, no GPU for --device cuda): exit 2."""

    exit_code = EXIT_USAGE


class CheckpointFormatError(FsdpckError):
    """A checkpoint dir or manifest that cannot be read as what it claims to be: exit 1 (an integrity problem)."""

    exit_code = EXIT_DIFFERENCE


class RuntimeFailure(FsdpckError):
    """An exception or timeout on some rank during save, load or compare: exit 3."""

    exit_code = EXIT_RUNTIME
