"""The process group: set-up from torchrun's environment (or a world of one without it),
device and backend choice, and how a failure on one rank ends every rank.

Nothing else in fsdpck calls ``dist.init_process_group``. A failure on one rank must end
every rank promptly with the same code (DESIGN.md), so a failing rank records its failure
in the process group's store, and a watchdog thread on every rank polls for failures
recorded elsewhere: a rank blocked in a collective that will never complete (NCCL does not
notice a dead peer) is ended by its watchdog instead of hanging.
"""

from __future__ import annotations

import json
import os
import resource
import sys
import threading
import time
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any, Callable

from fsdpck.errors import EXIT_RUNTIME, SetupError

_FAILED_COUNT_KEY = "fsdpck/failed"
_FIRST_FAILURE_KEY = "fsdpck/first_failure"
_REPORTED_KEY = "fsdpck/failure_reported"
REPORT_WAIT_S = 10.0  # how long a failed rank waits for rank 0 to report before it exits
_WATCH_INTERVAL_S = 0.2


@dataclass(slots=True)
class DistContext:
    """Where this process stands: its rank, the world, its device and the backend."""

    rank: int
    world_size: int
    local_rank: int
    device: Any  # torch.device
    backend: str
    launched: bool  # under torchrun (or fsdpck's own launcher) rather than a plain process
    timeout_s: float
    node_count: int = 1
    baseline_rss: int = 0  # peak RSS right after set-up: PyTorch's own share, before any state exists
    on_failure: list[Callable[[dict[str, Any]], None]] = field(default_factory=list)  # every rank, before a watchdog exit

    @property
    def is_rank0(self) -> bool:
        return self.rank == 0

    @property
    def collective_device(self):
        """Device for scalar collectives: CUDA under NCCL, CPU under gloo."""
        import torch

        return self.device if self.device.type == "cuda" else torch.device("cpu")


_state: dict[str, Any] = {"ctx": None, "hard_exit": False, "exiting": False, "phase_seq": 0}


def env_rank() -> int:
    """This process's rank from torchrun's environment (0 without torchrun); works before set-up."""
    try:
        return int(os.environ.get("RANK", "0"))
    except ValueError:
        return 0


def launched_by_torchrun() -> bool:
    return all(k in os.environ for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"))


def peak_rss_bytes() -> int:
    """This process's peak resident set size so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def choose_device(requested: str, local_rank: int):
    """``auto`` picks CUDA where GPUs are present, else CPU; ``cuda`` without GPUs is a set-up error."""
    import torch

    has_cuda = torch.cuda.is_available() and torch.cuda.device_count() > 0
    if requested == "auto":
        requested = "cuda" if has_cuda else "cpu"
    if requested == "cuda":
        if not has_cuda:
            raise SetupError("--device cuda was asked for, but torch sees no CUDA device on this host")
        count = torch.cuda.device_count()
        if local_rank >= count:
            raise SetupError(
                f"local rank {local_rank} has no GPU of its own: this host has {count} CUDA device(s); "
                f"start at most {count} processes per node, or pass --device cpu"
            )
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank), "cpu:gloo,cuda:nccl"
    return torch.device("cpu"), "gloo"


def setup(*, device: str = "auto", timeout_s: float = 300.0) -> DistContext:
    """Initialise the process group from torchrun's env, or a world of one without it."""
    import torch.distributed as dist

    if _state["ctx"] is not None:
        return _state["ctx"]
    launched = launched_by_torchrun()
    local_rank = int(os.environ.get("LOCAL_RANK", "0")) if launched else 0
    dev, backend = choose_device(device, local_rank)
    timeout = timedelta(seconds=timeout_s)
    if launched:
        kwargs: dict[str, Any] = {}
        if dev.type == "cuda":
            kwargs["device_id"] = dev  # binds NCCL to this GPU and avoids the lazy-init warning
        dist.init_process_group(backend=backend, timeout=timeout, **kwargs)
    else:
        # A world of one needs no rendezvous: an in-memory store keeps it free of ports and env vars.
        dist.init_process_group(backend=backend, store=dist.HashStore(), rank=0, world_size=1, timeout=timeout)
    world = dist.get_world_size()
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", str(world))) if launched else 1
    ctx = DistContext(
        rank=dist.get_rank(), world_size=world, local_rank=local_rank, device=dev, backend=backend,
        launched=launched, timeout_s=timeout_s, node_count=max(1, world // max(1, local_world)),
        baseline_rss=peak_rss_bytes(),
    )
    _state.update(ctx=ctx, hard_exit=world > 1, exiting=False)
    if world > 1:
        _start_watchdog(ctx)
    return ctx


def current() -> DistContext | None:
    return _state["ctx"]


def mark_exiting() -> None:
    """This rank's main thread is handling a failure itself: the watchdog stands down."""
    _state["exiting"] = True


def needs_hard_exit() -> bool:
    """True once a multi-rank process group exists: the process then ends through os._exit.

    Tearing a gloo process group down at exit aborts the process (SIGABRT) in about one run
    of eight with torch 2.13, which would turn a verified run into a crash.
    """
    return bool(_state["hard_exit"])


def teardown() -> None:
    """Release a world of one (tests run several in one process); multi-rank groups end with the process."""
    import torch.distributed as dist

    ctx = _state["ctx"]
    if ctx is None:
        return
    if ctx.world_size == 1 and dist.is_initialized():
        dist.destroy_process_group()
        _state["ctx"] = None


# --- failure propagation -------------------------------------------------------------


def _store():
    import torch.distributed as dist

    try:
        return dist.distributed_c10d._get_default_store()
    except Exception:  # no process group (yet, or any more)
        return None


def record_failure(ctx: DistContext, *, phase: str, message: str, code: int = EXIT_RUNTIME) -> dict[str, Any]:
    """Tell every rank that this one failed; returns the first failure recorded in the world."""
    payload = {"rank": ctx.rank, "phase": phase, "message": message, "code": code, "time": time.time()}
    store = _store()
    if store is None or ctx.world_size == 1:
        return payload
    try:
        first = store.compare_set(_FIRST_FAILURE_KEY, "", json.dumps(payload))
        store.add(_FAILED_COUNT_KEY, 1)
        return json.loads(first) if first else payload
    except Exception:  # the store went away: the launcher is ending the job
        return payload


def mark_phase(name: str) -> None:
    """Record that this rank entered phase ``name`` (numbered, so ranks can be compared)."""
    ctx = _state["ctx"]
    store = _store()
    if ctx is None or store is None or ctx.world_size == 1:
        return
    _state["phase_seq"] += 1
    try:
        store.set(f"fsdpck/phase/{ctx.rank}", json.dumps([_state["phase_seq"], name]))
    except Exception:  # best effort: only used to name a laggard
        pass


def laggards(ctx: DistContext) -> list[tuple[int, str]]:
    """Ranks that entered fewer phases than this one: (rank, last phase entered)."""
    store = _store()
    if store is None or ctx.world_size == 1:
        return []
    out = []
    for r in range(ctx.world_size):
        key = f"fsdpck/phase/{r}"
        try:
            seq, name = json.loads(store.get(key)) if store.check([key]) else (0, "init")
        except Exception:
            continue
        if seq < _state["phase_seq"]:
            out.append((r, name))
    return out


def mark_reported() -> None:
    """Rank 0 has printed the failure: failed ranks may now exit (their exit makes torchrun kill the rest)."""
    store = _store()
    if store is not None:
        try:
            store.set(_REPORTED_KEY, "1")
        except Exception:
            pass


def wait_until_reported(timeout_s: float = REPORT_WAIT_S) -> None:
    """A failed rank lingers until rank 0 has reported, or ``timeout_s``: torchrun kills every
    worker as soon as one exits non-zero, which would cut rank 0 off mid-sentence."""
    store = _store()
    if store is None:
        return
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if store.check([_REPORTED_KEY]):
                return
        except Exception:
            return
        time.sleep(0.05)


def _start_watchdog(ctx: DistContext) -> None:
    store = _store()
    if store is None:
        return

    def watch() -> None:
        while True:
            time.sleep(_WATCH_INTERVAL_S)
            try:
                failed = store.add(_FAILED_COUNT_KEY, 0)
            except Exception:
                return  # the store went away: the launcher is ending the job
            if failed == 0:
                continue
            try:
                failure = json.loads(store.get(_FIRST_FAILURE_KEY))
            except Exception:
                failure = {"rank": "?", "phase": "?", "message": "unknown failure", "code": EXIT_RUNTIME}
            if failure.get("rank") == ctx.rank or _state["exiting"]:
                return  # this rank's main thread is already ending it
            # Give this rank's main thread a moment: it may be failing on its own (DCP raises
            # the same CheckpointException on every rank) and will then say more.
            time.sleep(1.0)
            if _state["exiting"]:
                return
            for callback in list(ctx.on_failure):
                try:
                    callback(failure)
                except Exception:  # a report that fails must not stop the exit
                    pass
            sys.stdout.flush()
            sys.stderr.flush()
            if ctx.is_rank0:
                mark_reported()
            os._exit(int(failure.get("code", EXIT_RUNTIME)))

    threading.Thread(target=watch, name="fsdpck-watchdog", daemon=True).start()
