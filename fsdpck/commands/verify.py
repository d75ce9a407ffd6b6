"""``fsdpck verify``: train, save model + sharded optimizer (+ trainer) state, load it into a fresh
model and optimizer, and compare every DCP key — the reference test as a function that returns data.

Every requested flow runs in one process group, each in its own subdirectory; the result is a
:class:`VerifyResult` (rendering is ``fsdpck.report.verify``'s job). Each phase is timed and is
what failure drills and error messages refer to.

Async saves run as training runs them: ``dcp.async_save`` returns, the optimizer takes
``steps_during_save`` more steps that change parameters and optimizer state in place while the
write is in flight, then the write is waited on. The loaded state must equal the state as it
was when the save was called (its fingerprints, taken then), and the live state after those
steps must differ from it (or the steps proved nothing).
"""

from __future__ import annotations

import gc
import sys
from dataclasses import dataclass, field
from typing import Any

from fsdpck.checkpoint import workdir
from fsdpck.checkpoint.manifest import KIND_TENSOR, Manifest, write_manifest
from fsdpck.errors import UsageError, describe_checkpoint_exception
from fsdpck.runtime import collectives
from fsdpck.runtime.dist import peak_rss_bytes
from fsdpck.runtime.phases import PhaseTracker, current_phase
from fsdpck.state import flows
from fsdpck.state import model as mdl
from fsdpck.state.compare import Row, Tolerance, compare_round_trip, flip_one_bit
from fsdpck.state.model import ModelDims
from fsdpck.state.registry import Flow, WriterOptions
from fsdpck.state.summary import KeySummary, flatten, summarize, views
from fsdpck.state.trainer import Trainer


SAVED_COPY_LIMIT = 256 << 20


@dataclass(slots=True)
class VerifyOptions:
    selection: dict[str, Any] = field(default_factory=dict)  # flows.select's arguments, but the world's
    checkpoint_dir: str | None = None
    keep: bool = False
    overwrite: bool = False
    atol: float = 0.0
    rtol: float = 0.0
    self_test: bool = False
    self_test_rank: int | None = None  # default: the last rank
    width: int = 1
    size: int | None = None  # bytes of state wanted: picks the width per flow (--size)
    seed: int = 0
    writer: WriterOptions = field(default_factory=WriterOptions)
    # The saved tensors stay in memory to be compared element by element (counts, max |Δ|) while
    # the largest rank's share is at most this; above it, or for an async save, the saved state's
    # fingerprints stand in for them, so that a rank holds one copy of its state at a time. A
    # tolerance needs the elements: with --atol/--rtol they are always kept.
    saved_copy_limit: int = SAVED_COPY_LIMIT

    @property
    def tolerance(self) -> Tolerance:
        return Tolerance(atol=self.atol, rtol=self.rtol)

    def dims_for(self, flow: Flow, world_size: int) -> ModelDims:
        width = self.width
        if self.size is not None:
            width = mdl.width_for_size(self.size, world_size=world_size, optimizer=flow.optimizer, dtype=flow.dtype)
        return ModelDims.for_world(world_size, width)


@dataclass(slots=True)
class FlowResult:
    flow: Flow
    path: str
    dims: ModelDims
    rows: list[Row] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)  # slowest rank per phase, seconds
    bytes_written: int = 0
    state_bytes: int = 0
    memory: dict[str, list[int]] = field(default_factory=dict)
    elementwise: bool = False  # the saved values themselves were compared (not only their fingerprints)
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
class VerifyResult:
    results: list[FlowResult]
    world_size: int
    backend: str
    device: str
    checkpoint_dir: str
    kept: bool
    writer: WriterOptions

    @property
    def exit_code(self) -> int:
        return max((r.exit_code for r in self.results), default=0)


def memory_report(ctx, *, local_state_bytes: int) -> dict[str, list[int]]:
    """Per rank: peak RSS, CUDA max allocated, the RSS baseline after set-up, and the rank's state bytes."""
    import torch

    cuda_peak = torch.cuda.max_memory_allocated(ctx.device) if ctx.device.type == "cuda" else 0
    table = collectives.gather_ints(ctx, [peak_rss_bytes(), cuda_peak, ctx.baseline_rss, local_state_bytes])
    names = ("rss_peak", "cuda_max_allocated", "rss_baseline", "state_bytes")
    return {name: [row[i] for row in table] for i, name in enumerate(names)}


def local_bytes(local: dict[str, Any]) -> int:
    """Bytes of the tensors this rank holds of a state (replicas included: they are its memory)."""
    return sum(t.numel() * t.element_size() for v in local.values() for _, t in v.pieces)


def release_memory(ctx) -> None:
    import torch

    gc.collect()
    if ctx.device.type == "cuda":
        torch.cuda.empty_cache()


def manifest_for(saved: dict[str, KeySummary], *, ctx, flow: Flow, dims: ModelDims, seed: int) -> Manifest:
    import torch

    return Manifest(torch_version=torch.__version__, world_size=ctx.world_size, flow=flow.as_dict(),
                    model={"dims": dims.as_list(), "width": dims.a // ctx.world_size, "seed": seed},
                    layout=flow.layout.as_dict(), keys={k: s.manifest_entry() for k, s in saved.items()})


def trained(dims: ModelDims, flow: Flow, *, seed: int, ctx) -> tuple[Any, Any, Trainer | None]:
    """The model, optimizer (and trainer state) after ``flow.steps`` steps: what every command saves."""
    net, optim = mdl.build(dims, flow, seed=seed, ctx=ctx)
    trainer = Trainer(optim, seed=seed, device=ctx.device, batch=mdl.BATCH) if flow.trainer_state else None
    mdl.train_steps(net, optim, dims, flow, seed=seed, first_step=0, count=flow.steps, ctx=ctx, trainer=trainer)
    return net, optim, trainer


def fresh(dims: ModelDims, flow: Flow, *, seed: int, ctx) -> tuple[Any, Any, Trainer | None]:
    """A model and optimizer (and trainer state) to load into, seeded apart from the trained ones."""
    net, optim = mdl.build(dims, flow, seed=seed + 1, ctx=ctx)
    trainer = Trainer(optim, seed=seed + 1, device=ctx.device, batch=mdl.BATCH) if flow.trainer_state else None
    return net, optim, trainer


def keeps_saved_copy(local_state_bytes: int, opts: VerifyOptions, *, ctx) -> bool:
    """Whether the saved tensors are kept for an element-by-element comparison (the same answer on
    every rank: the comparison's collectives depend on it)."""
    if not opts.tolerance.bitwise:
        return True
    (largest,) = collectives.allreduce_floats(ctx, [float(local_state_bytes)], op="max")
    return largest <= opts.saved_copy_limit


def load_fresh(storage: Any, dims: ModelDims, flow: Flow, *, seed: int, tracker: PhaseTracker, ctx,
               self_test: bool = False, self_test_rank: int | None = None, bit: int | None = None):
    """Build a fresh model and optimizer, load the checkpoint into them, return this rank's state
    as the loading API gives it back (and, with ``self_test``, what was flipped in it)."""
    with tracker.phase("setup"):
        net, optim, trainer = fresh(dims, flow, seed=seed, ctx=ctx)
    with tracker.phase("load"):
        flows.load_into(net, optim, storage, flow, rank=ctx.rank, trainer=trainer)
        collectives.barrier(ctx)
    with tracker.phase("read-back"):
        after = views(flatten(flows.state_dict(net, optim, flow, trainer)), rank=ctx.rank)
        flipped = None
        if self_test:
            target = ctx.world_size - 1 if self_test_rank is None else self_test_rank
            flipped = flip_one_bit(after, ctx=ctx, rank=target, bit=bit)
    if flow.fsdp == 1:
        mdl.release(net)  # FSDP1's state dicts are copies: ``after`` does not share the model's memory
    return after, flipped


def steps_during(net: Any, optim: Any, trainer: Any, dims: ModelDims, flow: Flow, *, seed: int, ctx):
    """The optimizer steps an async save's write overlaps with, as a callable for ``flows.save``."""
    if not (flow.mode.asynchronous and flow.steps_during_save > 0):
        return None
    return lambda: mdl.train_steps(net, optim, dims, flow, seed=seed, first_step=flow.steps,
                                   count=flow.steps_during_save, ctx=ctx, trainer=trainer)


def check_state_moved(saved: dict[str, KeySummary], net: Any, optim: Any, trainer: Any, flow: Flow, *, ctx) -> None:
    """After the steps taken during an async save, the live state must differ from what was saved."""
    live = summarize(views(flatten(flows.state_dict(net, optim, flow, trainer)), rank=ctx.rank), ctx=ctx)
    moved = [k for k, s in saved.items() if s.kind == KIND_TENSOR and k in live and live[k].fingerprint != s.fingerprint]
    if not moved:
        raise RuntimeError(f"the {flow.steps_during_save} optimizer step(s) taken during the async save changed no "
                           "tensor of the state: the check would prove nothing about the stager")


def run_flow(flow: Flow, storage: Any, *, ctx, opts: VerifyOptions, dims: ModelDims) -> FlowResult:
    """One round trip through one flow, compared and reduced."""
    tracker = PhaseTracker(ctx.rank, flow.name)
    result = FlowResult(flow=flow, path=storage.url, dims=dims)
    with tracker.phase("step"):
        net, optim, trainer = trained(dims, flow, seed=opts.seed, ctx=ctx)
    with tracker.phase("state-dict"):
        state = flows.state_dict(net, optim, flow, trainer)
        before = views(flatten(state), rank=ctx.rank)
    during = steps_during(net, optim, trainer, dims, flow, seed=opts.seed, ctx=ctx)
    result.state_bytes = local_bytes(before)
    keep_saved = during is None and keeps_saved_copy(result.state_bytes, opts, ctx=ctx)
    saved: dict[str, KeySummary] | None = None
    if not keep_saved or opts.keep:
        with tracker.phase("fingerprint"):
            # The state as it is when the save is called: what the checkpoint must hold.
            saved = summarize(before, ctx=ctx, stats=opts.keep)
    with tracker.phase("save"):
        flows.save(state, storage, flow, opts.writer, during=during)
        collectives.barrier(ctx)
    if opts.keep and ctx.is_rank0:
        write_manifest(storage, manifest_for(saved, ctx=ctx, flow=flow, dims=dims, seed=opts.seed))
    if during is not None:
        with tracker.phase("fingerprint"):
            check_state_moved(saved, net, optim, trainer, flow, ctx=ctx)
    if not keep_saved:
        before = None  # the fingerprints taken at the save stand for the saved values from here on
    # At most ``before`` (the saved tensors themselves) is compared from here on: let the model,
    # its gradients and the optimizer go before the fresh ones are built, so that a rank's peak
    # memory is one copy of its share (two where the saved copy is kept), not three.
    if flow.fsdp == 1:
        mdl.release(net)  # FSDP1's state dicts are copies: ``before`` does not share the model's memory
    del net, optim, trainer, state, during
    release_memory(ctx)
    after, result.self_test = load_fresh(storage, dims, flow, seed=opts.seed, tracker=tracker, ctx=ctx,
                                         self_test=opts.self_test, self_test_rank=opts.self_test_rank,
                                         bit=None if opts.tolerance.bitwise else 62)
    with tracker.phase("fingerprint"):
        if saved is None:
            saved = summarize(before, ctx=ctx)
        loaded = summarize(after, ctx=ctx)
    with tracker.phase("compare"):
        result.rows = compare_round_trip(saved, loaded, ctx=ctx, tol=opts.tolerance, before=before, after=after)
        result.elementwise = before is not None
    result.timings = tracker.max_times(ctx)
    result.memory = memory_report(ctx, local_state_bytes=result.state_bytes)
    result.state_bytes = int(sum(result.memory["state_bytes"]))
    if ctx.is_rank0:
        result.bytes_written = workdir.stored_bytes(storage)
    return result


def run_verify(opts: VerifyOptions, *, ctx) -> VerifyResult:
    """Every requested flow, each in its own subdirectory of one checkpoint location."""
    from torch.distributed.checkpoint.api import CheckpointException

    selected = flows.select(world_size=ctx.world_size, cuda=ctx.device.type == "cuda", **opts.selection)
    for flow in selected:
        why = flow.problem(ctx.world_size)
        if why:
            raise UsageError(why)
    if opts.self_test_rank is not None and opts.self_test_rank >= ctx.world_size:
        raise UsageError(f"--self-test-rank {opts.self_test_rank} is not a rank of this world of {ctx.world_size}")
    wd = workdir.prepare(opts.checkpoint_dir, overwrite=opts.overwrite, ctx=ctx)
    out = VerifyResult([], ctx.world_size, ctx.backend, str(ctx.device), wd.storage.url, kept=opts.keep,
                       writer=opts.writer)
    # A flow collects garbage between its save and its load (release_memory). What is alive between
    # flows (torch's and DCP's modules: most of the heap) is frozen out of those collections: a full
    # collection over it took 0.2 s a flow, 40 % of a --matrix run on 2 cores.
    gc.collect()
    gc.freeze()
    try:
        for flow in selected:
            storage = workdir.prepare_subdir(wd, flow.name, ctx=ctx)
            dims = opts.dims_for(flow, ctx.world_size)
            try:
                out.results.append(run_flow(flow, storage, ctx=ctx, opts=opts, dims=dims))
            except CheckpointException as e:
                # DCP raises this on every rank together, so the ranks stay in step and the other
                # flows can still run; anything else ends the run (the runner's boundary).
                out.results.append(FlowResult(flow=flow, path=storage.url, dims=dims,
                                              error=f"{current_phase()}: {describe_checkpoint_exception(e, path=storage.url)}"))
            gc.collect()  # the flow's own garbage; what survives it is frozen too
            gc.freeze()
    except OSError as e:
        if e.filename is None:  # a failed write() or close() names no file: name the dir being written
            e.filename = wd.storage.url
        raise
    finally:
        gc.unfreeze()
        if any(f.mode.checkpointer == "process" for f in selected):
            flows.stop_async_process()
        # A failed check keeps its checkpoint for inspection; a verified one is cleaned up unless --keep.
        failed = sys.exc_info()[0] is not None or any(r.exit_code for r in out.results)
        out.kept = opts.keep or failed
        if ctx.is_rank0:
            workdir.cleanup(wd, keep=out.kept)
    return out
