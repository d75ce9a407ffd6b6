"""Running a command on one rank: set-up, warnings, errors, output, exit code.

The same code runs on every rank. Rank 0 prints the report and writes the JSON; other ranks
are silent unless they fail. A failure becomes one paragraph naming the rank, the phase and
the cause, recorded in the process group's store so that every rank ends promptly with the
same code (``fsdpck.runtime.dist``).
"""

from __future__ import annotations

import json
import sys
import time
import traceback
from dataclasses import dataclass
from typing import Any, Callable

from fsdpck.errors import EXIT_RUNTIME, EXIT_USAGE, FsdpckError, debug_enabled, describe_exception
from fsdpck.runtime import dist, faults, launch, phases, pywarnings
from fsdpck.runtime.files import write_json_target


@dataclass(slots=True)
class Presentation:
    """What rank 0 shows for a result (or for a failure, with ``result`` None)."""

    renderable: Any  # a rich renderable, or None
    verdict: str  # the last line
    document: dict[str, Any]  # the --json document


# present(result or None, code=, error=, warnings=, ctx=, elapsed=) -> Presentation
Present = Callable[..., Presentation]


def run_distributed(command: str, body: Callable[[Any], Any], *, device: str, timeout: float,
                    json_target: str | None, verbose: bool, present: Present, out: Any, err: Any) -> int:
    """Set up the process group, run ``body(ctx)`` and report; returns this rank's exit code.

    ``out`` and ``err`` are the consoles for the report and for errors; ``body``'s result has
    an ``exit_code``.
    """
    started = time.perf_counter()
    rank = dist.env_rank()
    state: dict[str, Any] = {"ctx": None, "reported": False}

    def report(result: Any, code: int, error: str | None, seen) -> None:
        if rank != 0 or state["reported"]:
            return
        state["reported"] = True
        warnings = pywarnings.distinct(seen)
        shown = present(result, code=code, error=error, warnings=warnings, ctx=state["ctx"],
                        elapsed=time.perf_counter() - started)
        if shown.renderable is not None:
            out.print(shown.renderable)
        if verbose and warnings:
            err.print(f"PyTorch warnings ({sum(w['count'] for w in warnings)}):", markup=False)
            for w in warnings:
                err.print(f"  {w['count']:>5} × {w['category']}: {w['message']}", markup=False)
        if json_target:
            try:
                write_json_target(json_target, json.dumps(shown.document, indent=2, default=str) + "\n")
            except OSError as e:  # the report and the verdict still come; say why the JSON did not
                err.print(f"fsdpck: error: --json {json_target}: cannot write: {e.strerror or e}", markup=False)
        out.print(shown.verdict, markup=False, highlight=False, crop=False, soft_wrap=True)
        sys.stdout.flush()

    def elastic_record(code_: int, error_: str | None, result_: Any = None) -> None:
        """torchrun's failure summary then shows fsdpck's verdict instead of "error_file: <N/A>"."""
        try:
            line = present(result_, code=code_, error=error_, warnings=[], ctx=state["ctx"], elapsed=None).verdict
        except Exception:  # a verdict that cannot be rendered on this rank: say the essentials
            line = f"fsdpck {command}: exit {code_}: {error_ or 'a difference was found'}"
        launch.write_elastic_error_file(line)

    if rank == 0:
        phases.set_progress(phases.progress_reporter(err))
    result = None
    error: str | None = None
    code = 0
    with pywarnings.captured() as seen:
        try:
            faults.maybe_inject("init", rank)
            ctx = state["ctx"] = dist.setup(device=device, timeout_s=timeout)

            def on_failure(failure: dict[str, Any]) -> None:  # every rank, when another rank failed first
                line = f"rank {failure['rank']} during {failure['phase']}: {failure['message']}"
                failed_code = int(failure.get("code", EXIT_RUNTIME))
                if rank == 0:
                    err.print(f"fsdpck: error: {line}", markup=False)
                    report(None, failed_code, line, seen)
                elastic_record(failed_code, line)

            ctx.on_failure.append(on_failure)
            result = body(ctx)
            code = result.exit_code
        except BaseException as e:  # the rank's boundary: any failure becomes one paragraph and an exit code
            dist.mark_exiting()
            ctx = state["ctx"]
            code = e.exit_code if isinstance(e, FsdpckError) else EXIT_RUNTIME
            phase = phases.current_phase() if ctx is not None else "init"
            message = e.message if isinstance(e, FsdpckError) else describe_exception(e)
            if debug_enabled():
                traceback.print_exc()
            # Usage and set-up errors found once the process group exists are decided on rank 0
            # and raised on every rank together (collectives.decide): rank 0 alone says so.
            consensual = ctx is not None and code == EXIT_USAGE
            if consensual or ctx is None or ctx.world_size == 1:
                error = e.describe() if isinstance(e, FsdpckError) else f"rank {rank} during {phase}: {message}"
            else:
                if "timed out" in message:
                    behind = dist.laggards(ctx)
                    if behind:
                        message += "; " + ", ".join(f"rank {r} stopped responding (last seen in {p})" for r, p in behind)
                error = f"rank {ctx.rank} during {phase}: {message}"
                first = dist.record_failure(ctx, phase=phase, message=message, code=code)
                if first.get("rank") != ctx.rank:
                    error += f" (first failure: rank {first['rank']} during {first['phase']}: {first['message']})"
            if rank != 0 and not consensual:
                err.print(f"fsdpck: error: {error}", markup=False)
        if error is not None and rank == 0:
            err.print(f"fsdpck: error: {error}", markup=False)
        report(result, code, error, seen)
    if code != 0:
        elastic_record(code, error, result)
    _end_together(state["ctx"], code, error)
    dist.teardown()
    return code


def _end_together(ctx, code: int, error: str | None) -> None:
    """Keep ranks alive until rank 0 has reported: torchrun kills every worker as soon as one
    exits non-zero, which would cut rank 0's report off."""
    if ctx is None or ctx.world_size == 1:
        return
    if error is None or code == EXIT_USAGE:
        import torch.distributed as tdist

        try:
            tdist.barrier()  # every rank is here: rank 0 has printed
        except Exception:  # a rank already gone: nothing left to wait for
            pass
        return
    if ctx.is_rank0:
        dist.mark_reported()
    else:
        dist.wait_until_reported()
