"""fsdpck save / fsdpck load: the two halves of verify, split across launches, so that a
checkpoint saved at N ranks is checked when loaded at M (resharding).

``save`` trains, saves through a flow and writes the manifest (``fsdpck.json``): per DCP key,
the exact sharding-invariant fingerprint of the value that was saved. ``load`` rebuilds the
model from the manifest's dims (not from the current world size), loads through a flow that
may differ from the save's (FSDP1/legacy → FSDP2/dsd is a migration users make), fingerprints
what it loaded — each rank its own shards — and compares key by key with the manifest.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fsdpck.errors import SetupError, UsageError
from fsdpck.flows import Flow, WriterOptions
from fsdpck.model import ModelDims


@dataclass(slots=True)
class KeyRow:
    """One DCP key: what the manifest says was saved, and what this load got."""

    key: str
    kind: str  # tensor | object
    shape: list[int] | None
    dtype: str | None
    saved: str | None  # fingerprint (tensor) or canonical form (object)
    loaded: str | None
    status: str  # match | differs | missing | unexpected
    note: str = ""

    def as_dict(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in self.__slots__}


def state_entries(state: dict[str, Any], *, ctx) -> dict[str, Any]:
    """Manifest entries for every DCP key of ``state`` (collective: every rank calls it).

    Fingerprints and stats are computed shard-locally and reduced as scalars; replicated
    values and plain objects are taken from rank 0's copy.
    """
    import torch
    import torch.distributed as dist
    from torch.distributed.checkpoint._nested_dict import flatten_state_dict

    from fsdpck.compare import canonical, describe
    from fsdpck.fingerprint import allreduce_sum_u64, fp_chunk, to_hex
    from fsdpck.manifest import KIND_OBJECT, KIND_TENSOR, ManifestEntry, TensorStats

    flat, _ = flatten_state_dict(state)
    keys = sorted(flat)
    infos = {k: describe(flat[k], ctx.rank) for k in keys}
    tensor_keys = [k for k in keys if infos[k].sharding != "object"]
    fps: list[int] = []
    sums: list[list[float]] = []  # numel, sum, nonfinite
    maxes: list[list[float]] = []  # max, -min, abs_max
    for k in tensor_keys:
        info = infos[k]
        fp, numel, total, nonfinite = 0, 0, 0.0, 0
        hi, neg_lo, amax = -math.inf, -math.inf, -math.inf
        if info.counted_here:
            for off, t in info.pieces:
                fp = (fp + fp_chunk(t, global_shape=info.shape, offsets=off)) % (1 << 64)
                if t.numel() == 0:
                    continue
                numel += t.numel()
                bad, piece_sum, lo_, hi_ = _piece_stats(t.detach())
                nonfinite += bad
                total += piece_sum
                if lo_ is not None:
                    hi, neg_lo, amax = max(hi, hi_), max(neg_lo, -lo_), max(amax, abs(lo_), abs(hi_))
        fps.append(fp)
        sums.append([numel, total, nonfinite])
        maxes.append([hi, neg_lo, amax])
    dev = ctx.collective_device
    if tensor_keys and ctx.world_size > 1:
        fps = allreduce_sum_u64(fps, device=dev)
        s = torch.tensor(sums, dtype=torch.float64, device=dev)
        m = torch.tensor(maxes, dtype=torch.float64, device=dev)
        dist.all_reduce(s)
        dist.all_reduce(m, op=dist.ReduceOp.MAX)
        sums, maxes = s.cpu().tolist(), m.cpu().tolist()
    entries: dict[str, Any] = {}
    for i, k in enumerate(tensor_keys):
        info = infos[k]
        numel, total, nonfinite = int(sums[i][0]), sums[i][1], int(sums[i][2])
        hi, neg_lo, amax = maxes[i]
        finite_n = numel - nonfinite
        stats = TensorStats(
            numel=numel,
            min=-neg_lo if finite_n else None,
            max=hi if finite_n else None,
            abs_max=amax if finite_n else None,
            mean=total / finite_n if finite_n else None,
            nonfinite=nonfinite,
        )
        entries[k] = ManifestEntry(kind=KIND_TENSOR, shape=tuple(info.shape), dtype=info.dtype,
                                   fingerprint=to_hex(fps[i]), stats=stats)
    for k in keys:
        if infos[k].sharding == "object":
            entries[k] = ManifestEntry(kind=KIND_OBJECT, canonical=canonical(infos[k].obj))
    return dict(sorted(entries.items()))


_SUM_PIECE = 1 << 20  # elements widened to float64 at a time for a tensor's sum (8 MiB)


def _piece_stats(x) -> tuple[int, float, float | None, float | None]:
    """(non-finite elements, sum, min, max) of a non-empty tensor, over its finite elements.

    Min and max come from one aminmax pass; NaN and inf propagate into them, so when both are
    finite every element is and the isfinite mask is never built. That mask and
    ``x.sum(dtype=torch.float64)`` each run at about 0.3 GB/s on one CPU thread (torch 2.13),
    ten times slower than the fingerprint; widening bounded pieces runs at about 3 GB/s.
    """
    import torch

    nonfinite = 0
    if x.is_floating_point():
        lo, hi = torch.aminmax(x)
        if not (math.isfinite(float(lo)) and math.isfinite(float(hi))):
            finite = torch.isfinite(x)
            nonfinite = int(x.numel() - int(finite.sum()))
            x = x[finite]
            if x.numel() == 0:
                return nonfinite, 0.0, None, None
            lo, hi = torch.aminmax(x)
    else:
        lo, hi = x.min(), x.max()
    acc = torch.zeros((), dtype=torch.float64, device=x.device)
    for piece in x.reshape(-1).split(_SUM_PIECE):
        acc += piece.to(torch.float64).sum()
    return nonfinite, float(acc), float(lo), float(hi)


def make_manifest(entries: dict[str, Any], *, ctx, flow: Flow, dims: ModelDims, width: int, seed: int):
    import torch

    from fsdpck.manifest import Manifest

    return Manifest(
        torch_version=torch.__version__,
        world_size=ctx.world_size,
        flow=flow.as_dict(),
        model={"dims": dims.as_list(), "width": width, "seed": seed},
        keys=entries,
    )


# --- save ----------------------------------------------------------------------------


@dataclass(slots=True)
class SaveOptions:
    directory: str
    flow: Flow
    overwrite: bool = False
    width: int = 1
    size: int | None = None
    seed: int = 0
    writer: WriterOptions = field(default_factory=WriterOptions)


@dataclass(slots=True)
class SaveResult:
    directory: str
    flow: Flow
    world_size: int
    dims: ModelDims
    keys: int
    tensors: int
    bytes_written: int
    timings: dict[str, float]
    exit_code: int = 0


def _prepare_save_dir(directory: str, *, overwrite: bool, ctx) -> Path:
    """Rank 0 checks the dir; with --overwrite only an fsdpck checkpoint (it has a manifest) is replaced."""
    import torch.distributed as dist

    from fsdpck.manifest import MANIFEST_NAME
    from fsdpck.workdir import check_shared

    path = Path(directory).expanduser().absolute()
    box: list[Any] = [None]
    if ctx.is_rank0:
        if path.exists() and not path.is_dir():
            box[0] = f"{path} exists and is not a directory"
        elif path.is_dir() and any(path.iterdir()):
            if not overwrite:
                box[0] = (f"{path} is not empty; fsdpck will not write over files it did not create. "
                          "Choose an empty or new dir, or pass --overwrite to replace an earlier fsdpck save there")
            elif not (path / MANIFEST_NAME).exists():
                box[0] = (f"{path} has no {MANIFEST_NAME}: it was not written by fsdpck save, so --overwrite "
                          "leaves it alone. Choose another dir")
            else:
                # The old .metadata goes first: a crash midway then leaves no loadable checkpoint
                # over a mix of old and new shards. Then the old manifest and shard files.
                (path / ".metadata").unlink(missing_ok=True)
                (path / MANIFEST_NAME).unlink(missing_ok=True)
                for f in path.glob("*.distcp"):
                    f.unlink()
        else:
            try:
                path.mkdir(parents=True, exist_ok=True)
            except OSError as e:
                box[0] = f"{path} cannot be created: {e.strerror}"
    if ctx.world_size > 1:
        dist.broadcast_object_list(box, src=0)
    if box[0]:
        raise UsageError(box[0])
    check_shared(path, ctx)
    return path


def run_save(opts: SaveOptions, *, ctx) -> SaveResult:
    import torch.distributed as dist

    from fsdpck import flows
    from fsdpck import model as mdl
    from fsdpck.manifest import write_manifest
    from fsdpck.roundtrip import PhaseTracker, set_tracker
    from fsdpck.workdir import dir_bytes

    path = _prepare_save_dir(opts.directory, overwrite=opts.overwrite, ctx=ctx)
    flow = opts.flow
    width = opts.width
    if opts.size is not None:
        from fsdpck.model import width_for_size

        width = width_for_size(opts.size, world_size=ctx.world_size, optimizer=flow.optimizer, dtype=flow.dtype)
    dims = ModelDims.for_world(ctx.world_size, width)
    tracker = set_tracker(PhaseTracker(ctx.rank))
    with tracker.phase("step"):
        net, optim = mdl.trained(dims, flow, seed=opts.seed, ctx=ctx)
    with tracker.phase("state-dict"):
        state, _ = flows.state_for_save(net, optim, flow)
    with tracker.phase("fingerprint"):
        # Fingerprint the in-memory values before the save: the manifest records what was meant to be written.
        entries = state_entries(state, ctx=ctx)
    with tracker.phase("save"):
        flows.save(state, path, flow, opts.writer)
        if ctx.world_size > 1:
            dist.barrier()
    if ctx.is_rank0:
        # After DCP finished on every rank (the barrier): a manifest never describes a half-written save.
        write_manifest(path, make_manifest(entries, ctx=ctx, flow=flow, dims=dims, width=width, seed=opts.seed))
    return SaveResult(
        directory=str(path), flow=flow, world_size=ctx.world_size, dims=dims, keys=len(entries),
        tensors=sum(1 for e in entries.values() if e.kind == "tensor"),
        bytes_written=dir_bytes(path) if ctx.is_rank0 else 0, timings=tracker.max_times(ctx),
    )


# --- load ----------------------------------------------------------------------------


@dataclass(slots=True)
class LoadOptions:
    directories: list[str]
    fsdp: int | None = None
    api: str | None = None
    planner: str = "default"
    self_test: bool = False


@dataclass(slots=True)
class LoadResult:
    directory: str
    save_flow: dict[str, Any]
    load_flow: Flow
    saved_world_size: int
    world_size: int
    dims: ModelDims
    rows: list[KeyRow]
    timings: dict[str, float]
    self_test: dict[str, Any] | None = None

    @property
    def differing(self) -> list[KeyRow]:
        return [r for r in self.rows if r.status != "match"]

    @property
    def exit_code(self) -> int:
        return 1 if self.differing else 0


def _read_manifest_everywhere(path: Path, ctx):
    """Rank 0 reads and validates the manifest; every rank gets the same one (or the same error)."""
    import torch.distributed as dist

    from fsdpck.errors import CheckpointFormatError
    from fsdpck.manifest import MANIFEST_NAME, Manifest, read_manifest

    box: list[Any] = [None]
    if ctx.is_rank0:
        if not path.is_dir():
            box[0] = ("usage", f"{path} is not a directory" if path.exists() else f"{path} does not exist")
        else:
            try:
                m = read_manifest(path)
                box[0] = ("ok", m.to_json()) if m else (
                    "usage", f"{path} has no {MANIFEST_NAME}: it was not written by fsdpck save, so there is nothing "
                             "to check the loaded state against. Use `fsdpck inspect` to look at any DCP checkpoint")
            except CheckpointFormatError as e:
                box[0] = ("format", e.message)
    if ctx.world_size > 1:
        dist.broadcast_object_list(box, src=0)
    kind, payload = box[0]
    if kind == "usage":
        raise UsageError(payload)
    if kind == "format":
        raise CheckpointFormatError(payload)
    return Manifest.from_json(payload, source=str(path / MANIFEST_NAME))


def compare_entries(saved: dict[str, Any], loaded: dict[str, Any]) -> list[KeyRow]:
    """Key by key: manifest (saved) against what was loaded. Pure; no process group."""
    rows = []
    for key in sorted(set(saved) | set(loaded)):
        s, l = saved.get(key), loaded.get(key)
        ref = s or l
        row = KeyRow(
            key=key, kind=ref.kind, shape=list(ref.shape) if ref.shape is not None else None, dtype=ref.dtype,
            saved=(s.fingerprint if s.kind == "tensor" else s.canonical) if s else None,
            loaded=(l.fingerprint if l.kind == "tensor" else l.canonical) if l else None,
            status="match",
        )
        if s is None:
            row.status = "unexpected"
        elif l is None:
            row.status = "missing"
        elif s.kind != l.kind:
            row.status, row.note = "differs", f"kind {s.kind} → {l.kind}"
        elif s.kind == "tensor" and (tuple(s.shape) != tuple(l.shape) or s.dtype != l.dtype):
            row.status = "differs"
            row.note = f"{list(s.shape)} {s.dtype} → {list(l.shape)} {l.dtype}"
        elif row.saved != row.loaded:
            row.status = "differs"
        rows.append(row)
    return rows


@dataclass(slots=True)
class LoadRun:
    """One launch of ``fsdpck load``: one result per checkpoint dir, in the order given."""

    results: list[LoadResult]
    world_size: int

    @property
    def exit_code(self) -> int:
        return max((r.exit_code for r in self.results), default=0)


def run_load(opts: LoadOptions, *, ctx) -> LoadRun:
    """Load each dir in turn in one process group (resharding to this world size) and check it."""
    return LoadRun([load_one(d, opts, ctx=ctx) for d in opts.directories], ctx.world_size)


def load_one(directory: str, opts: LoadOptions, *, ctx) -> LoadResult:
    from fsdpck import flows
    from fsdpck import model as mdl
    from fsdpck.compare import flip_one_bit
    from fsdpck.roundtrip import PhaseTracker, set_tracker

    path = Path(directory).expanduser().absolute()
    manifest = _read_manifest_everywhere(path, ctx)
    saved_flow = manifest.flow
    try:
        dims = ModelDims.from_list(list(manifest.model.get("dims", [])))
    except ValueError as e:
        raise SetupError(f"{path}/fsdpck.json: {e}") from None
    fsdp = opts.fsdp or int(saved_flow.get("fsdp", 1))
    api = opts.api or ("legacy" if fsdp == 1 and saved_flow.get("api") == "legacy" else "dsd")
    flow = Flow(fsdp=fsdp, api=api, planner=opts.planner, optimizer=saved_flow.get("optimizer", "adam"),
                dtype=saved_flow.get("dtype", "float32"), steps=int(saved_flow.get("steps", 1)))
    flows.check(flow)
    seed = int(manifest.model.get("seed", 0))
    tracker = set_tracker(PhaseTracker(ctx.rank))
    self_test = None
    with tracker.phase("load"):
        net, optim = mdl.fresh(dims, flow, seed=seed + 1, ctx=ctx)
        flows.load_fresh(net, optim, path, flow)
    with tracker.phase("state-dict"):
        state, view = flows.state_for_save(net, optim, flow)
        if opts.self_test:
            self_test = flip_one_bit(view, ctx=ctx)  # the view shares its tensors with ``state``
    with tracker.phase("fingerprint"):
        loaded = state_entries(state, ctx=ctx)
    with tracker.phase("compare"):
        rows = compare_entries(manifest.keys, loaded)
    return LoadResult(
        directory=str(path), save_flow=saved_flow, load_flow=flow, saved_world_size=manifest.world_size,
        world_size=ctx.world_size, dims=dims, rows=rows, timings=tracker.max_times(ctx), self_test=self_test,
    )
