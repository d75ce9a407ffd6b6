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
from fsdpck.compare import Row, Tolerance, compare_views, flip_one_bit
from fsdpck.flows import Flow, WriterOptions
from fsdpck.model import ModelDims

PHASE_NAMES = ("step", "state-dict", "save", "load", "compare")


class PhaseTracker:
    """Times phases and remembers which one is running, for error messages."""

    def __init__(self, rank: int) -> None:
        self.rank = rank
        self.current = "init"
        self.times: dict[str, float] = {}

    @contextmanager
    def phase(self, name: str):
        self.current = name
        if name in faults.PHASES:
            faults.maybe_inject(name, self.rank)
        t0 = time.perf_counter()
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
    seed: int = 0
    writer: WriterOptions = field(default_factory=WriterOptions)


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


def _local_state_bytes(view: dict[str, Any]) -> int:
    import torch

    from fsdpck.compare import describe

    total = 0
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

    tracker = set_tracker(PhaseTracker(ctx.rank))
    result = FlowResult(flow=flow, path=str(path))
    with tracker.phase("step"):
        net = mdl.wrap(mdl.build_model(dims, seed=opts.seed, dtype=flow.dtype, device=ctx.device),
                       fsdp=flow.fsdp, device=ctx.device, world_size=ctx.world_size)
        optim = mdl.build_optimizer(flow.optimizer, net.parameters())
        mdl.train_steps(net, optim, steps=flow.steps, seed=opts.seed, rank=ctx.rank, dims=dims, dtype=flow.dtype, device=ctx.device)
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

        write_manifest(path, make_manifest(entries, ctx=ctx, flow=flow, dims=dims, width=opts.width, seed=opts.seed))
    with tracker.phase("load"):
        net2 = mdl.wrap(mdl.build_model(dims, seed=opts.seed + 1, dtype=flow.dtype, device=ctx.device),
                        fsdp=flow.fsdp, device=ctx.device, world_size=ctx.world_size)
        optim2 = mdl.build_optimizer(flow.optimizer, net2.parameters())
        after = flows.load_fresh(net2, optim2, path, flow)
    with tracker.phase("compare"):
        if opts.self_test:
            result.self_test = flip_one_bit(after, ctx=ctx)
        result.rows = compare_views(before, after, ctx=ctx, tol=opts.tolerance)
    # Slowest rank per phase, and the state's size: scalars only cross ranks.
    size = torch.tensor([_local_state_bytes(before)], dtype=torch.float64, device=ctx.collective_device)
    if ctx.world_size > 1:
        dist.all_reduce(size)
    result.timings = tracker.max_times(ctx)
    result.state_bytes = int(size.item())
    if ctx.is_rank0:
        result.bytes_written = dir_bytes(path)
    return result


def run_verify(opts: VerifyOptions, *, ctx) -> VerifyResult:
    """Every requested flow, each in its own subdirectory of one checkpoint dir."""
    from torch.distributed.checkpoint.api import CheckpointException

    from fsdpck import workdir

    dims = ModelDims.for_world(ctx.world_size, opts.width)
    wd = workdir.prepare(opts.checkpoint_dir, overwrite=opts.overwrite, ctx=ctx)
    out = VerifyResult([], ctx.world_size, ctx.backend, str(ctx.device), dims, str(wd.root), kept=opts.keep)
    try:
        for flow in opts.flows:
            sub = workdir.prepare_subdir(wd, flow.name, ctx=ctx)
            try:
                out.results.append(run_flow(flow, sub, ctx=ctx, opts=opts, dims=dims))
            except CheckpointException as e:
                # DCP raises this on every rank together, so the ranks stay in step and the
                # other flows can still run; anything else ends the run (see cli).
                out.results.append(FlowResult(flow=flow, path=str(sub), error=f"{current_phase()}: {describe_checkpoint_exception(e)}"))
    finally:
        # A failed check keeps its checkpoint for inspection; a verified one is cleaned up unless --keep.
        failed = sys.exc_info()[0] is not None or any(r.exit_code for r in out.results)
        out.kept = opts.keep or failed
        if ctx.is_rank0:
            workdir.cleanup(wd, keep=out.kept)
    return out


def describe_checkpoint_exception(e: Exception) -> str:
    """DCP's CheckpointException lists the failing ranks: name them and their causes."""
    failures = getattr(e, "failures", None)
    if not failures:
        return f"{type(e).__name__}: {e}"
    parts = []
    for rank, err in sorted(failures.items()):
        cause = err[0] if isinstance(err, tuple) else err
        parts.append(f"rank {rank}: {type(cause).__name__}: {cause}")
    return f"DCP reported failures on rank(s) {', '.join(str(r) for r in sorted(failures))} — " + "; ".join(parts)
