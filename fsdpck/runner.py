"""Running a distributed command on one rank: set-up, warnings, errors, output, exit code.

The same code runs on every rank. Rank 0 prints the report and writes the JSON; other
ranks are silent unless they fail. A failure is turned into one paragraph naming the
rank, the phase and the cause, recorded in the process group's store so that every
rank ends promptly with the same code (see ``fsdpck.dist``).
"""

from __future__ import annotations

import sys
import time
import warnings
from contextlib import contextmanager
from typing import Any, Callable

from fsdpck import dist as fdist
from fsdpck import faults
from fsdpck.errors import EXIT_RUNTIME, EXIT_USAGE, FsdpckError
from fsdpck.output import make_console, write_json


@contextmanager
def captured_warnings():
    """Keep PyTorch's warnings out of the output; count them (``--verbose`` shows them)."""
    seen: dict[tuple[str, str], int] = {}

    def record(message, category, filename, lineno, file=None, line=None):
        key = (category.__name__, str(message).strip().splitlines()[0][:400] if str(message).strip() else "")
        seen[key] = seen.get(key, 0) + 1

    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.showwarning = record
        yield seen


LOG_PHASES_OVER_S = 2.0  # in a cluster log, a phase that took longer gets a line of its own


def progress_reporter(console):
    """Rank 0's view of long phases: a transient spinner on a terminal, plain lines in a log."""

    @contextmanager
    def report(phase: str, label: str):
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


def warning_list(seen: dict[tuple[str, str], int]) -> list[dict[str, Any]]:
    return [{"category": c, "message": m, "count": n} for (c, m), n in sorted(seen.items(), key=lambda kv: -kv[1])]


def describe_exception(e: BaseException) -> str:
    from fsdpck.roundtrip import describe_checkpoint_exception

    if type(e).__name__ == "CheckpointException":
        return describe_checkpoint_exception(e)
    import re

    text = str(e).strip().splitlines()
    first = re.sub(r"^\[[^\]]*\]\s*", "", text[0]) if text else ""  # drop gloo's source-file prefix
    lowered = str(e).lower()
    if "connection reset by peer" in lowered or "connection closed by peer" in lowered or "broken pipe" in lowered:
        return ("another rank went away during a collective (it exited or was killed); its own message, or the "
                "launcher's summary, names it")
    if "timed out" in lowered or ("timeout" in lowered and "collective" in lowered):
        return f"a collective timed out ({first[:200]}): a rank stopped responding (--timeout)"
    if isinstance(e, OSError) and e.errno == 28:
        return f"no space left on device writing {e.filename or 'the checkpoint dir'}"
    if isinstance(e, OSError) and e.filename:
        return f"{type(e).__name__}: {e.strerror} ({e.filename})"
    return f"{type(e).__name__}: {first[:500]}"


def run_distributed(
    command: str,
    body: Callable[[Any], Any],
    *,
    device: str,
    timeout: float,
    json_target: str | None,
    verbose: bool,
    render: Callable[[Any, list[dict[str, Any]]], Any],
    verdict: Callable[..., str],
    document: Callable[..., dict[str, Any]],
) -> int:
    """Set up the process group, run ``body(ctx)`` and report; returns this rank's exit code."""
    from fsdpck.cli import debug_enabled

    out = make_console(stderr=json_target == "-")
    err = make_console(stderr=True)
    started = time.perf_counter()
    ctx = None
    result = None
    error: str | None = None
    code = 0
    rank = fdist.env_rank()

    def finish_report(result_: Any, code_: int, error_: str | None, seen_: dict) -> None:
        if rank != 0:
            return
        wl = warning_list(seen_)
        if result_ is not None:
            out.print(render(result_, wl))
        if verbose and wl:
            err.print(f"PyTorch warnings ({sum(w['count'] for w in wl)}):")
            for w in wl:
                err.print(f"  {w['count']:>5} × {w['category']}: {w['message']}", markup=False)
        if json_target:
            try:
                write_json(json_target, document(result_, code=code_, error=error_, warnings=wl, ctx=ctx,
                                                 elapsed=time.perf_counter() - started))
            except OSError as e:  # the report and the verdict still come; say why the JSON did not
                err.print(f"fsdpck: error: --json {json_target}: cannot write: {e.strerror or e}", markup=False)
        out.print(verdict(result_, code=code_, error=error_), markup=False, highlight=False, soft_wrap=True)
        sys.stdout.flush()

    if rank == 0:
        from fsdpck.roundtrip import set_progress

        set_progress(progress_reporter(err))
    with captured_warnings() as seen:
        try:
            faults.maybe_inject("init", rank)
            ctx = fdist.setup(device=device, timeout_s=timeout)
            ctx.on_failure.append(
                lambda failure: (
                    err.print(f"fsdpck: error: rank {failure['rank']} during {failure['phase']}: {failure['message']}", markup=False),
                    finish_report(None, int(failure.get("code", EXIT_RUNTIME)),
                                  f"rank {failure['rank']} during {failure['phase']}: {failure['message']}", seen),
                )
            )
            result = body(ctx)
            code = result.exit_code
        except FsdpckError as e:
            fdist.mark_exiting()
            code = e.exit_code
            error = e.describe()
            # Usage and set-up errors found after the process group exists are decided on rank 0
            # and raised on every rank together: rank 0 alone says so.
            consensual = ctx is not None and code == EXIT_USAGE
            if debug_enabled():
                import traceback

                traceback.print_exc()
            if not consensual and ctx is not None and ctx.world_size > 1:
                error = f"rank {ctx.rank} during {_phase()}: {e.message}"
                fdist.record_failure(ctx, phase=_phase(), message=e.message, code=code)
            if rank != 0 and not consensual:
                err.print(f"fsdpck: error: {error}", markup=False)
        except BaseException as e:  # the rank's boundary: any failure becomes one paragraph and exit 3
            fdist.mark_exiting()
            code = EXIT_RUNTIME
            phase = _phase() if ctx is not None else "init"
            message = describe_exception(e) if not isinstance(e, KeyboardInterrupt) else "interrupted"
            if ctx is not None and "timed out" in message:
                behind = fdist.laggards(ctx)
                if behind:
                    message += "; " + ", ".join(f"rank {r} stopped responding (last seen in {p})" for r, p in behind)
            error = f"rank {rank} during {phase}: {message}"
            if debug_enabled():
                import traceback

                traceback.print_exc()
            if ctx is not None and ctx.world_size > 1:
                first = fdist.record_failure(ctx, phase=phase, message=message, code=code)
                if first.get("rank") != rank:
                    error += f" (first failure: rank {first['rank']} during {first['phase']}: {first['message']})"
            if rank != 0:
                err.print(f"fsdpck: error: {error}", markup=False)
        if error is not None and rank == 0:
            err.print(f"fsdpck: error: {error}", markup=False)
        finish_report(result, code, error, seen)
    if code != 0:
        from fsdpck.launch import write_elastic_error_file

        try:
            line = verdict(result, code=code, error=error)
        except Exception:
            line = f"fsdpck {command}: exit {code}: {error}"
        write_elastic_error_file(line)
    _end_together(ctx, code, error)
    fdist.teardown()
    return code


def _end_together(ctx, code: int, error: str | None) -> None:
    """Keep ranks alive until rank 0 has reported: torchrun kills every worker as soon as one
    exits non-zero, which would cut rank 0's report off."""
    if ctx is None or ctx.world_size == 1:
        return
    if error is None or code == EXIT_USAGE:
        import torch.distributed as dist

        try:
            dist.barrier()  # every rank is here: rank 0 has printed
            return
        except Exception:
            return
    if ctx.is_rank0:
        fdist.mark_reported()
    else:
        fdist.wait_until_reported()


def _phase() -> str:
    from fsdpck.roundtrip import current_phase

    return current_phase()
