"""The round trip: train a step, save model + sharded optimizer state, load into a fresh
model and optimizer, and compare — the reference test as a function that returns data.

``run_verify`` runs every requested flow in one process group and returns a
``VerifyResult``; rendering is ``fsdpck.report``'s job. Each phase is timed and is the
unit that failure drills (``FSDPCK_FAULT``) and error messages refer to.
"""

from __future__ import annotations

import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fsdpck import faults
from fsdpck.compare import Row, Tolerance, attach_fingerprints, compare_views, flip_one_bit
from fsdpck.flows import Flow, WriterOptions
from fsdpck.model import ModelDims

class PhaseTracker:
    """Times phases, remembers which one is running (for error messages) and tells the progress reporter."""

    def __init__(self, rank: int, label: str = "") -> None:
        self.rank = rank
        self.label = label
        self.current = "init"
        self.times: dict[str, float] = {}

    @contextmanager
    def phase(self, name: str):
        self.current = name
        if name in faults.PHASES and name not in ("save", "load"):
            faults.maybe_inject(name, self.rank)  # save and load drills fire inside DCP's own I/O (flows.py)
        mark_phase(name)
        t0 = time.perf_counter()
        with _reporter(name, self.label):
            yield
        self.times[name] = self.times.get(name, 0.0) + time.perf_counter() - t0

    def max_times(self, ctx) -> dict[str, float]:
        """The slowest rank's time per phase (a collective: every rank calls it with the same phases)."""
        import torch
        import torch.distributed as dist

        names = list(self.times)  # execution order, the same on every rank
        t = torch.tensor([self.times[n] for n in names], dtype=torch.float64, device=ctx.collective_device)
        if ctx.world_size > 1 and names:
            dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return dict(zip(names, t.cpu().tolist()))


_tracker = PhaseTracker(0)


def mark_phase(name: str) -> None:
    """Leave this rank's phase in the store, so a rank that times out can say who fell behind."""
    from fsdpck import dist as fdist

    fdist.mark_phase(name)


@contextmanager
def _no_progress(phase: str, label: str):
    yield


_reporter = _no_progress


def set_progress(reporter) -> None:
    """Install a context manager factory ``reporter(phase, label)`` wrapped around every phase (rank 0)."""
    global _reporter
    _reporter = reporter


def current_phase() -> str:
    """The phase running now on this rank (for error messages)."""
    return _tracker.current


def set_tracker(tracker: PhaseTracker) -> PhaseTracker:
    """Make ``tracker`` the one error messages read the current phase from."""
    global _tracker
    _tracker = tracker
    return tracker


@dataclass(slots=True)
class FlowResult:
    flow: Flow
    path: str
    rows: list[Row] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)  # slowest rank per phase, seconds
    bytes_written: int = 0
    state_bytes: int = 0
    memory: dict[str, list[int]] = field(default_factory=dict)
    self_test: dict[str, Any] | None = None
    error: str | None = None

    @property
    def differing_rows(self) -> list[Row]:
        return [r for r in self.rows if r.status != "match"]

    @property
    def exit_code(self) -> int:
        if self.error:
            return 3
        return 1 if self.differing_rows else 0


@dataclass(slots=True)
class VerifyOptions:
    flows: list[Flow]
    checkpoint_dir: str | None = None
    keep: bool = False
    overwrite: bool = False
    tolerance: Tolerance = field(default_factory=Tolerance)
    self_test: bool = False
    width: int = 1
    size: int | None = None  # bytes of state wanted: picks the width per flow (--size)
    seed: int = 0
    writer: WriterOptions = field(default_factory=WriterOptions)

    def dims_for(self, flow: Flow, world_size: int) -> ModelDims:
        from fsdpck.model import width_for_size

        width = self.width
        if self.size is not None:
            width = width_for_size(self.size, world_size=world_size, optimizer=flow.optimizer, dtype=flow.dtype)
        return ModelDims.for_world(world_size, width)


@dataclass(slots=True)
class VerifyResult:
    results: list[FlowResult]
    world_size: int
    backend: str
    device: str
    dims: ModelDims
    checkpoint_dir: str
    kept: bool
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def exit_code(self) -> int:
        return max((r.exit_code for r in self.results), default=0)


def _local_state_bytes(view: dict[str, Any], model=None) -> int:
    """Bytes of optimizer state (and model parameters) this rank holds."""
    import torch

    from fsdpck.compare import describe

    total = 0
    for p in model.parameters() if model is not None else []:
        local = p.to_local() if hasattr(p, "to_local") else p  # FSDP2: DTensor; FSDP1: the flat shard
        total += local.numel() * local.element_size()
    for states in view["state"].values():
        for value in states.values():
            info = describe(value, rank=0)
            total += sum(t.numel() * t.element_size() for _, t in info.pieces if isinstance(t, torch.Tensor))
    return total


def run_flow(flow: Flow, path: Path, *, ctx, opts: VerifyOptions, dims: ModelDims) -> FlowResult:
    """One round trip through one flow, compared shard-locally and reduced."""
    import torch
    import torch.distributed as dist

    from fsdpck import flows, model as mdl
    from fsdpck.workdir import dir_bytes

    tracker = set_tracker(PhaseTracker(ctx.rank, flow.name))
    result = FlowResult(flow=flow, path=str(path))
    with tracker.phase("step"):
        net, optim = mdl.trained(dims, flow, seed=opts.seed, ctx=ctx)
    with tracker.phase("state-dict"):
        state, before = flows.state_for_save(net, optim, flow)
    entries = None
    if opts.keep:
        from fsdpck.saveload import make_manifest, state_entries

        with tracker.phase("fingerprint"):
            entries = state_entries(state, ctx=ctx)  # a kept checkpoint gets a manifest, as `fsdpck save` writes
    with tracker.phase("save"):
        flows.save(state, path, flow, opts.writer)
        if ctx.world_size > 1:
            dist.barrier()
    if entries is not None and ctx.is_rank0:
        from fsdpck.manifest import write_manifest

        write_manifest(path, make_manifest(entries, ctx=ctx, flow=flow, dims=dims, width=dims.a // ctx.world_size, seed=opts.seed))
    # Only the optimizer view ``before`` is compared from here on: let the trained model, its
    # gradients and the saved state dict go before the fresh model is built, so that a rank's
    # peak memory is about two copies of its share, not three.
    local_bytes = _local_state_bytes(before, net)
    del net, optim, state
    _release_memory(ctx)
    with tracker.phase("setup"):
        net2, optim2 = mdl.fresh(dims, flow, seed=opts.seed + 1, ctx=ctx)
    with tracker.phase("load"):
        after = flows.load_fresh(net2, optim2, path, flow)
        if ctx.world_size > 1:
            dist.barrier()
    with tracker.phase("compare"):
        if opts.self_test:
            result.self_test = flip_one_bit(after, ctx=ctx, bit=None if opts.tolerance.bitwise else 62)
        result.rows = compare_views(before, after, ctx=ctx, tol=opts.tolerance)
    with tracker.phase("fingerprint"):
        attach_fingerprints(result.rows, before, after, ctx=ctx)
    # Slowest rank per phase, sizes and memory: scalars only cross ranks.
    result.timings = tracker.max_times(ctx)
    result.memory = memory_report(ctx, local_state_bytes=local_bytes)
    result.state_bytes = int(sum(result.memory["state_bytes"]))
    if ctx.is_rank0:
        result.bytes_written = dir_bytes(path)
    return result


def _release_memory(ctx) -> None:
    import gc

    import torch

    gc.collect()
    if ctx.device.type == "cuda":
        torch.cuda.empty_cache()


def peak_rss_bytes() -> int:
    """This process's peak resident set size so far (Linux reports KiB)."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def memory_report(ctx, *, local_state_bytes: int) -> dict[str, list[int]]:
    """Per rank: peak RSS, CUDA max allocated, the RSS baseline after set-up, and the rank's state bytes."""
    import torch
    import torch.distributed as dist

    cuda_peak = torch.cuda.max_memory_allocated(ctx.device) if ctx.device.type == "cuda" else 0
    mine = torch.tensor([peak_rss_bytes(), cuda_peak, ctx.baseline_rss, local_state_bytes],
                        dtype=torch.int64, device=ctx.collective_device)
    if ctx.world_size > 1:
        everyone = [torch.zeros_like(mine) for _ in range(ctx.world_size)]
        dist.all_gather(everyone, mine)
    else:
        everyone = [mine]
    table = torch.stack(everyone).cpu().tolist()
    names = ("rss_peak", "cuda_max_allocated", "rss_baseline", "state_bytes")
    return {name: [row[i] for row in table] for i, name in enumerate(names)}


def run_verify(opts: VerifyOptions, *, ctx) -> VerifyResult:
    """Every requested flow, each in its own subdirectory of one checkpoint dir."""
    from torch.distributed.checkpoint.api import CheckpointException

    from fsdpck import workdir

    dims = opts.dims_for(opts.flows[0], ctx.world_size)
    wd = workdir.prepare(opts.checkpoint_dir, overwrite=opts.overwrite, ctx=ctx)
    out = VerifyResult([], ctx.world_size, ctx.backend, str(ctx.device), dims, str(wd.root), kept=opts.keep)
    try:
        for flow in opts.flows:
            sub = workdir.prepare_subdir(wd, flow.name, ctx=ctx)
            try:
                out.results.append(run_flow(flow, sub, ctx=ctx, opts=opts, dims=opts.dims_for(flow, ctx.world_size)))
            except CheckpointException as e:
                # DCP raises this on every rank together, so the ranks stay in step and the
                # other flows can still run; anything else ends the run (see cli).
                out.results.append(FlowResult(flow=flow, path=str(sub),
                                              error=f"{current_phase()}: {describe_checkpoint_exception(e, path=sub)}"))
    except OSError as e:
        if e.filename is None:  # a failed write() or close() names no file: name the dir being written
            e.filename = str(wd.root)
        raise
    finally:
        # A failed check keeps its checkpoint for inspection; a verified one is cleaned up unless --keep.
        failed = sys.exc_info()[0] is not None or any(r.exit_code for r in out.results)
        out.kept = opts.keep or failed
        if ctx.is_rank0:
            workdir.cleanup(wd, keep=out.kept)
    return out


def describe_checkpoint_exception(e: Exception, *, path: Path | None = None) -> str:
    """DCP's CheckpointException lists the failing ranks: name them and their causes."""
    failures = getattr(e, "failures", None)
    if not failures:
        return f"{type(e).__name__}: {e}"
    parts = []
    for rank, err in sorted(failures.items()):
        cause = err[0] if isinstance(err, tuple) else err
        parts.append(f"rank {rank}: {type(cause).__name__}: {cause}")
    text = f"DCP reported failures on rank(s) {', '.join(str(r) for r in sorted(failures))} — " + "; ".join(parts)
    if path is not None and _out_of_space(failures, path):
        text = f"no space left on device writing {path}; " + text
    return text


def _out_of_space(failures: dict, path: Path) -> bool:
    """Did a DCP write fail for want of space? torch.save's zip writer reports the short write of a
    full disk as 'unexpected pos N vs M'; then the file system holding ``path`` is (nearly) full."""
    import errno
    import shutil

    for err in failures.values():
        cause = err[0] if isinstance(err, tuple) else err
        if isinstance(cause, OSError) and cause.errno == errno.ENOSPC:
            return True
        if "unexpected pos" in str(cause):
            try:
                return shutil.disk_usage(path).free < (1 << 20)
            except OSError:
                return False
    return False
