"""``fsdpck save``: the first half of verify as a launch of its own.

Trains, saves model + sharded optimizer (+ trainer) state with DCP through a flow, and then —
after every rank finished — rank 0 writes the manifest ``fsdpck.json``: per DCP key, the exact
sharding-invariant fingerprint of the value as it was when the save was called. ``fsdpck
load`` checks against it at any world size and layout.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from fsdpck.checkpoint import workdir
from fsdpck.checkpoint.manifest import KIND_TENSOR, write_manifest
from fsdpck.commands.verify import check_state_moved, manifest_for, steps_during, trained
from fsdpck.errors import UsageError
from fsdpck.runtime import collectives
from fsdpck.runtime.phases import PhaseTracker
from fsdpck.state import flows
from fsdpck.state import model as mdl
from fsdpck.state.model import ModelDims
from fsdpck.state.registry import Flow, WriterOptions
from fsdpck.state.summary import flatten, summarize, views


@dataclass(slots=True)
class SaveOptions:
    location: str
    selection: dict[str, Any]  # flows.select's arguments for the one flow, but the world's
    overwrite: bool = False
    width: int = 1
    size: int | None = None
    seed: int = 0
    writer: WriterOptions = field(default_factory=WriterOptions)


@dataclass(slots=True)
class SaveResult:
    location: str
    flow: Flow
    world_size: int
    dims: ModelDims
    keys: int
    tensors: int
    bytes_written: int
    timings: dict[str, float]
    exit_code: int = 0


def run_save(opts: SaveOptions, *, ctx) -> SaveResult:
    (flow,) = flows.select(matrix=False, world_size=ctx.world_size, cuda=ctx.device.type == "cuda", planner="default",
                           **opts.selection)
    why = flow.problem(ctx.world_size)
    if why:
        raise UsageError(why)
    storage = workdir.prepare_save(opts.location, overwrite=opts.overwrite, ctx=ctx)
    width = opts.width
    if opts.size is not None:
        width = mdl.width_for_size(opts.size, world_size=ctx.world_size, optimizer=flow.optimizer, dtype=flow.dtype)
    dims = ModelDims.for_world(ctx.world_size, width)
    tracker = PhaseTracker(ctx.rank)
    with tracker.phase("step"):
        net, optim, trainer = trained(dims, flow, seed=opts.seed, ctx=ctx)
    with tracker.phase("state-dict"):
        state = flows.state_dict(net, optim, flow, trainer)
    with tracker.phase("fingerprint"):
        # The manifest records the values as they are when the save is called: what was meant to be written.
        saved = summarize(views(flatten(state), rank=ctx.rank), ctx=ctx, stats=True)
    during = steps_during(net, optim, trainer, dims, flow, seed=opts.seed, ctx=ctx)
    with tracker.phase("save"):
        flows.save(state, storage, flow, opts.writer, during=during)
        collectives.barrier(ctx)
    if flow.mode.checkpointer == "process":
        flows.stop_async_process()
    if during is not None:
        with tracker.phase("fingerprint"):
            check_state_moved(saved, net, optim, trainer, flow, ctx=ctx)
    if ctx.is_rank0:
        # After DCP finished on every rank (the barrier): a manifest never describes a half-written save.
        write_manifest(storage, manifest_for(saved, ctx=ctx, flow=flow, dims=dims, seed=opts.seed))
    return SaveResult(
        location=storage.url, flow=flow, world_size=ctx.world_size, dims=dims, keys=len(saved),
        tensors=sum(1 for s in saved.values() if s.kind == KIND_TENSOR),
        bytes_written=workdir.stored_bytes(storage) if ctx.is_rank0 else 0, timings=tracker.max_times(ctx),
    )
