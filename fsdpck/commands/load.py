"""``fsdpck load``: the second half of verify, at any world size and layout, against the manifest.

For each checkpoint: rank 0 opens it as ``inspect`` does (restricted unpickler, integrity from
metadata and file sizes) and validates the whole manifest (types, ranges, known flow values,
model dims that agree with the shapes in ``.metadata``) before anything is allocated from it;
then every rank builds a fresh model with the recorded dims on this launch's layout, loads
through a flow that may differ from the save's, fingerprints what it holds and the keys are
compared with the manifest. A checkpoint that is not whole is exit 1 before any load; a bad
manifest field is exit 2, naming it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from fsdpck.checkpoint.integrity import open_checkpoint
from fsdpck.checkpoint.manifest import MANIFEST_NAME, Manifest
from fsdpck.checkpoint.reader import CheckpointReader, decode
from fsdpck.checkpoint.storage import open_storage
from fsdpck.commands.verify import load_fresh
from fsdpck.errors import CheckpointFormatError, UsageError
from fsdpck.runtime import collectives
from fsdpck.runtime.phases import PhaseTracker
from fsdpck.state import registry
from fsdpck.state.compare import Row, compare_manifest
from fsdpck.state.model import ModelDims
from fsdpck.state.registry import Flow, Layout
from fsdpck.state.summary import summarize


@dataclass(slots=True)
class LoadOptions:
    locations: list[str]
    fsdp: int | None = None
    api: str | None = None
    planner: str = "default"
    layout: Layout = registry.PLAIN
    self_test: bool = False
    self_test_rank: int | None = None


@dataclass(slots=True)
class LoadResult:
    location: str
    save_flow: dict[str, Any]
    saved_layout: dict[str, Any]
    saved_torch: str
    load_flow: Flow
    saved_world_size: int
    world_size: int
    dims: ModelDims
    rows: list[Row]
    timings: dict[str, float]
    self_test: dict[str, Any] | None = None

    @property
    def differing(self) -> list[Row]:
        return [r for r in self.rows if r.status != "match"]

    @property
    def exit_code(self) -> int:
        return 1 if self.differing else 0


@dataclass(slots=True)
class LoadRun:
    """One launch of ``fsdpck load``: one result per checkpoint, in the order given."""

    results: list[LoadResult]
    world_size: int

    @property
    def exit_code(self) -> int:
        return max((r.exit_code for r in self.results), default=0)


def _choice(value: Any, allowed: Any, field: str, source: str) -> Any:
    if isinstance(value, bool) or value not in allowed:
        shown = ", ".join(map(str, allowed))
        raise UsageError(f"{source}: {field} is {str(value)[:60]!r}, not one of {shown}: this fsdpck cannot rebuild "
                         "the state it describes")
    return value


def _int_field(value: Any, field: str, source: str, lo: int, hi: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise UsageError(f"{source}: {field} is {str(value)[:60]!r}, not an integer from {lo} to {hi}")
    return value


def validated(manifest: Manifest, metadata: Any, source: str) -> dict[str, Any]:
    """What a load needs from a manifest, every field checked (UsageError naming the field)."""
    flow = manifest.flow
    out = {
        "fsdp": _choice(flow.get("fsdp"), registry.FSDP_VERSIONS, "flow.fsdp", source),
        "api": _choice(flow.get("api"), registry.APIS, "flow.api", source),
        "optimizer": _choice(flow.get("optimizer"), list(registry.OPTIMIZERS), "flow.optimizer", source),
        "dtype": _choice(flow.get("dtype"), list(registry.DTYPES), "flow.dtype", source),
        "steps": _int_field(flow.get("steps", 1), "flow.steps", source, 1, 10_000),
        "trainer_state": flow.get("trainer_state", False),
        "format": _choice(flow.get("format", registry.DEFAULT_FORMAT), registry.FORMATS, "flow.format", source),
        "seed": _int_field(manifest.model.get("seed", 0), "model.seed", source, 0, 2**31 - 1),
        "replicate": _int_field(manifest.layout.get("replicate", 1), "layout.replicate", source, 1, 1 << 20),
        "tp": _int_field(manifest.layout.get("tp", 1), "layout.tp", source, 1, 1 << 20),
    }
    if not isinstance(out["trainer_state"], bool):
        raise UsageError(f"{source}: flow.trainer_state is {str(out['trainer_state'])[:60]!r}, not true or false")
    try:
        dims = ModelDims.from_list(manifest.model.get("dims"))
    except ValueError as e:
        raise UsageError(f"{source}: model.dims: {e}") from None
    # The dims must describe the model whose parameters .metadata holds: then whatever they make
    # this load allocate is backed by bytes that really are in the checkpoint's files.
    for fqn, shape in dims.param_shapes().items():
        info = metadata.keys.get(f"model.{fqn}")
        if info is None or info.shape != shape:
            found = "no such key" if info is None else f"shape {list(info.shape or ())}"
            raise UsageError(f"{source}: model.dims {dims.as_list()} give model.{fqn} the shape {list(shape)}, but "
                             f"the checkpoint's .metadata has {found}: the manifest does not describe this checkpoint")
    out["dims"] = dims.as_list()
    return out


def _open(location: str) -> dict[str, Any]:
    """Rank 0: the checkpoint opened and checked, its manifest validated; plain data for every rank."""
    storage = open_storage(location)
    ckpt = open_checkpoint(storage)
    source = f"{storage.url}/{MANIFEST_NAME}"
    if ckpt.manifest is None and ckpt.manifest_error is None:
        raise UsageError(f"{storage.url} has no {MANIFEST_NAME}: it was not written by fsdpck save, so there is nothing "
                         "to check the loaded state against. Use `fsdpck inspect` to look at any DCP checkpoint")
    if ckpt.problems:
        first = ckpt.problems[0]
        where = f" ({first.key})" if first.key else ""
        raise CheckpointFormatError(
            f"{storage.url} is not whole: {len(ckpt.problems)} problem(s), the first: {first.message}{where}. Nothing "
            f"was loaded; `fsdpck inspect {storage.url}` lists them all")
    fields = validated(ckpt.manifest, ckpt.metadata, source)
    # Every byte item must decode as plain data before DCP reads any: a checkpoint that holds a
    # pickle needing code is refused here (exit 1), and never reaches an unpickler.
    byte_keys = [info for info in ckpt.metadata.keys.values() if info.kind == "bytes"]
    for info, raw, error in CheckpointReader(ckpt).byte_items(byte_keys):
        if error is not None:
            raise CheckpointFormatError(f"{storage.url}: byte item {info.key!r} cannot be read: {error}. Nothing was "
                                        "loaded")
        try:
            decode(raw, key=info.key)
        except CheckpointFormatError as e:
            raise CheckpointFormatError(f"{storage.url}: {e.message}. Nothing was loaded") from None
    return {"url": storage.url, "manifest": ckpt.manifest.to_json(), "fields": fields}


def load_one(location: str, opts: LoadOptions, *, ctx) -> LoadResult:
    opened = collectives.decide(ctx, lambda: _open(location))
    storage = open_storage(opened["url"])
    manifest = Manifest.from_json(opened["manifest"], source=f"{storage.url}/{MANIFEST_NAME}")
    f = opened["fields"]
    fsdp = opts.fsdp or f["fsdp"]
    api = opts.api or (f["api"] if fsdp == f["fsdp"] else registry.default_api(fsdp))
    flow = Flow(fsdp=fsdp, api=api, planner=opts.planner, optimizer=f["optimizer"], dtype=f["dtype"], steps=f["steps"],
                layout=opts.layout, trainer_state=f["trainer_state"], format=f["format"])
    why = flow.problem(ctx.world_size)
    if why:
        raise UsageError(why)
    dims = ModelDims.from_list(f["dims"])
    tracker = PhaseTracker(ctx.rank, storage.url)
    after, self_test = load_fresh(storage, dims, flow, seed=f["seed"], tracker=tracker, ctx=ctx,
                                  self_test=opts.self_test, self_test_rank=opts.self_test_rank)
    with tracker.phase("fingerprint"):
        loaded = summarize(after, ctx=ctx)
    with tracker.phase("compare"):
        rows = compare_manifest(manifest.keys, loaded)
    return LoadResult(location=storage.url, save_flow=manifest.flow, saved_layout=dict(manifest.layout),
                      saved_torch=manifest.torch_version, load_flow=flow, saved_world_size=manifest.world_size,
                      world_size=ctx.world_size, dims=dims, rows=rows, timings=tracker.max_times(ctx),
                      self_test=self_test)


def run_load(opts: LoadOptions, *, ctx) -> LoadRun:
    """Load each checkpoint in turn in one process group (resharding to this world size and layout)."""
    if opts.self_test_rank is not None and opts.self_test_rank >= ctx.world_size:
        raise UsageError(f"--self-test-rank {opts.self_test_rank} is not a rank of this world of {ctx.world_size}")
    return LoadRun([load_one(location, opts, ctx=ctx) for location in opts.locations], ctx.world_size)
