"""fsdpck's exception types, the exit codes they map to, and the one describer of failures.

Library code raises these; the command line (``fsdpck.cli``) and the per-rank runner
(``fsdpck.runtime.runner``) are the two places that turn them into exit codes and
one-paragraph messages. ``FSDPCK_DEBUG=1`` adds tracebacks there.
"""

from __future__ import annotations

import errno
import os
import re

EXIT_OK = 0
EXIT_DIFFERENCE = 1
EXIT_USAGE = 2
EXIT_RUNTIME = 3

# What each exit code means, as the JSON's "outcome" says it.
OUTCOME = {
    EXIT_OK: "verified",
    EXIT_DIFFERENCE: "difference found",
    EXIT_USAGE: "usage or set-up error",
    EXIT_RUNTIME: "runtime failure",
}


def debug_enabled() -> bool:
    """FSDPCK_DEBUG=1: failures also print their traceback."""
    return os.environ.get("FSDPCK_DEBUG", "") not in ("", "0")


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


def describe_checkpoint_exception(e: BaseException, *, path: str | None = None) -> str:
    """DCP's CheckpointException lists the failing ranks: name them and their causes in one line."""
    failures = getattr(e, "failures", None)
    if not isinstance(failures, dict) or not failures:
        return f"{type(e).__name__}: {_first_line(e)}"
    parts = []
    for rank, err in sorted(failures.items()):
        cause = err[0] if isinstance(err, tuple) and err else err
        parts.append(f"rank {rank}: {type(cause).__name__}: {_first_line(cause)}")
    text = f"DCP reported failures on rank(s) {', '.join(str(r) for r in sorted(failures))} — " + "; ".join(parts)
    if path is not None and _out_of_space(failures, path):
        text = f"no space left on device writing {path}; " + text
    return text


def _out_of_space(failures: dict, path: str) -> bool:
    """Did a DCP write fail for want of space? torch.save's zip writer reports the short write of a
    full disk as 'unexpected pos N vs M'; then the file system holding ``path`` is (nearly) full."""
    import shutil

    for err in failures.values():
        cause = err[0] if isinstance(err, tuple) and err else err
        if isinstance(cause, OSError) and cause.errno == errno.ENOSPC:
            return True
        if "unexpected pos" in str(cause):
            try:
                return shutil.disk_usage(path).free < (1 << 20)
            except OSError:
                return False
    return False


def _first_line(e: BaseException) -> str:
    lines = str(e).strip().splitlines()
    return re.sub(r"^\[[^\]]*\]\s*", "", lines[0])[:500] if lines else ""  # drop gloo's source-file prefix


def describe_exception(e: BaseException, *, path: str | None = None) -> str:
    """Any failure as one line: the cause a user can act on, not a traceback."""
    if type(e).__name__ == "CheckpointException":
        return describe_checkpoint_exception(e, path=path)
    if isinstance(e, FsdpckError):
        return e.describe()
    if isinstance(e, KeyboardInterrupt):
        return "interrupted"
    lowered = str(e).lower()
    if "connection reset by peer" in lowered or "connection closed by peer" in lowered or "broken pipe" in lowered:
        return ("another rank went away during a collective (it exited or was killed); its own message, or the "
                "launcher's summary, names it")
    if "timed out" in lowered or ("timeout" in lowered and "collective" in lowered):
        return f"a collective timed out ({_first_line(e)[:200]}): a rank stopped responding (--timeout)"
    if isinstance(e, OSError) and e.errno == errno.ENOSPC:
        return f"no space left on device writing {e.filename or path or 'the checkpoint dir'}"
    if isinstance(e, OSError) and (e.filename or path):
        return f"{type(e).__name__}: {e.strerror or _first_line(e)} ({e.filename or path})"
    return f"{type(e).__name__}: {_first_line(e)}"
