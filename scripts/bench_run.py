"""The benchmark's measurements on one rank: fsdpck's phases as ``fsdpck verify`` runs them, bare
DCP and the raw disk, on one state and in one directory (scripts/bench.py says how to run it).

Every phase goes through :class:`Recorder`: fsdpck's :class:`~fsdpck.runtime.phases.PhaseTracker`
(so that an error names the phase and a rank that falls behind is named), then a CUDA
synchronize and a barrier (every rank starts together: the slowest rank's time is the phase's
time), the peak RSS and CUDA allocation reset, wall and CPU seconds. The figures stay on their
rank until the end, where every rank's travel as one small JSON document
(``collectives.all_gather_json``).
"""

from __future__ import annotations

import importlib
import os
import platform
import socket
import sys
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Iterator

from bench_io import (CACHE_NOTE, MemoryWatch, copy_seconds, drop_pages, files_under, filesystem_of, io_buffer,
                      raw_read, raw_write, rss_now)

from fsdpck.checkpoint import workdir
from fsdpck.checkpoint.manifest import KIND_TENSOR
from fsdpck.checkpoint.storage import LocalStorage
from fsdpck.commands.verify import VerifyOptions, fresh, local_bytes, release_memory, run_flow, trained
from fsdpck.errors import UsageError
from fsdpck.fingerprint import backend_detail
from fsdpck.runtime import collectives, phases
from fsdpck.state import flows
from fsdpck.state import model as mdl
from fsdpck.state.compare import MATCH, Tolerance, compare_round_trip
from fsdpck.state.model import ModelDims
from fsdpck.state.registry import Flow, WriterOptions
from fsdpck.state.summary import flatten, summarize, views

SCHEMA = "fsdpck.bench/1"


@dataclass(slots=True)
class BenchResult:
    """Every raw figure of the run, every rank's included (the same on every rank)."""

    raw: dict[str, Any]

    @property
    def exit_code(self) -> int:
        return 0 if self.raw["verified"] else 1


@contextmanager
def _silent(phase: str, label: str) -> Iterator[None]:
    yield


class Recorder:
    """Times phases on this rank and keeps their figures, per repetition (index 0: the set-up)."""

    def __init__(self, ctx, *, log: bool) -> None:
        self.ctx = ctx
        self.log = log and ctx.is_rank0  # a run cut short by a job limit still says where it was
        self.tracker = phases.PhaseTracker(ctx.rank, "bench")
        self.memory = MemoryWatch(ctx.device)
        self.reps: list[dict[str, dict[str, float]]] = [{}]

    @property
    def rep(self) -> int:
        return len(self.reps) - 2  # -1: the set-up, before the first repetition

    def sync(self) -> None:
        if self.ctx.device.type == "cuda":
            import torch

            torch.cuda.synchronize(self.ctx.device)

    def barrier(self) -> None:
        collectives.barrier(self.ctx)

    def phase(self, name: str, fn: Callable[[], Any]) -> Any:
        with self.tracker.phase(name), self.measured(name):
            return fn()

    @contextmanager
    def measured(self, name: str) -> Iterator[None]:
        """Every rank starts together; on the way out: wall and CPU seconds, peak RSS and CUDA allocation."""
        self.sync()
        self.barrier()
        self.memory.start()
        rss_start = rss_now()
        c0, t0 = time.process_time(), time.perf_counter()
        yield
        self.sync()
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
        rss, cuda = self.memory.stop()
        entry = self.reps[-1].setdefault(name, {"wall": 0.0, "cpu": 0.0, "rss": 0, "cuda": 0, "rss_start": rss_start})
        entry["wall"] += wall
        entry["cpu"] += cpu
        entry["rss"], entry["cuda"] = max(entry["rss"], rss), max(entry["cuda"], cuda)
        if self.log:
            where = "set-up" if self.rep < 0 else f"rep {self.rep}"
            print(f"bench: {where} {name}: {wall:.2f} s on rank 0, peak RSS {rss / 1e9:.2f} GB"
                  + (f", CUDA {cuda / 1e9:.2f} GB" if self.memory.cuda else ""), file=sys.stderr, flush=True)

    def reporter(self, before: dict[str, Callable[[], Any]]) -> Callable[[str, str], Any]:
        """A progress reporter (``phases.set_progress``) that measures the phases ``fsdpck verify``'s
        own code runs, as ``fsdpck-<phase>``; ``before[phase]`` runs untimed first (dropping pages)."""
        @contextmanager
        def report(phase: str, label: str) -> Iterator[None]:
            if label == "bench":  # the Recorder's own phases measure themselves
                yield
                return
            if phase in before:
                before.pop(phase)()
            with self.measured(f"fsdpck-{phase}"):
                yield
        return report

    def add(self, name: str, seconds: float) -> None:
        """Time spent inside a phase by a part of it (DCP's own core)."""
        entry = self.reps[-1].setdefault(name, {"wall": 0.0})
        entry["wall"] += seconds

    def next_rep(self) -> None:
        self.reps.append({})


@contextmanager
def dcp_clock(rec: Recorder, name: str, module_name: str, attr: str) -> Iterator[None]:
    """Time the calls into DCP's save/load core made inside a phase: ``dcp.save``/``dcp.load`` and the
    deprecated ``load_state_dict`` of the legacy optimizer path all go through these two functions."""
    module = importlib.import_module(module_name)
    original = getattr(module, attr, None)
    if original is None:  # a PyTorch without it: the split is simply not reported
        yield
        return

    def timed(*args: Any, **kwargs: Any) -> Any:
        t0 = time.perf_counter()
        try:
            return original(*args, **kwargs)
        finally:
            rec.sync()
            rec.add(name, time.perf_counter() - t0)

    setattr(module, attr, timed)
    try:
        yield
    finally:
        setattr(module, attr, original)


def _decide_run_dir(base: str | None) -> dict[str, Any]:
    """Rank 0: a fresh dir of the run's own (inside --dir, or a temp dir), as plain data for every rank."""
    if base is None:
        return {"root": tempfile.mkdtemp(prefix="fsdpck-bench-"), "temporary": True, "created_root": True, "run": None}
    if "://" in base:
        raise UsageError(f"--dir {base}: the benchmark measures a local disk (fsync, the page cache): give a local dir")
    root = Path(base).expanduser().absolute()
    try:
        created = not root.exists()
        root.mkdir(parents=True, exist_ok=True)
        run = Path(tempfile.mkdtemp(prefix="fsdpck-bench-", dir=root))
    except OSError as e:
        raise UsageError(f"--dir {base}: {e.strerror or e}") from None
    return {"root": str(root), "temporary": False, "created_root": created, "run": run.name}


def make_run_dir(base: str | None, ctx) -> tuple[workdir.WorkDir, LocalStorage]:
    """The run's dir, the same on every rank and seen by every rank, and the WorkDir that removes it."""
    d = collectives.decide(ctx, lambda: _decide_run_dir(base))
    wd = workdir.WorkDir(LocalStorage(Path(d["root"])), temporary=d["temporary"], created_root=d["created_root"],
                         created=[d["run"]] if d["run"] else [])
    run = wd.storage.child(d["run"]) if d["run"] else wd.storage
    workdir.check_shared(run, ctx, what="--dir")
    return wd, run


def subdir(parent: LocalStorage, name: str, ctx) -> LocalStorage:
    """A new dir that rank 0 makes; every rank returns once it exists."""
    collectives.decide(ctx, lambda: parent.child(name).make_dirs())
    return parent.child(name)


def run_bench(args: Any, ctx) -> BenchResult:
    """Every measurement of one launch (see scripts/bench.py); rank 0 also removes what was written."""
    started, load_start = time.perf_counter(), os.getloadavg()
    phases.set_progress(_silent)  # the Recorder prints one line per phase itself
    (flow,) = flows.select(matrix=False, world_size=ctx.world_size, cuda=ctx.device.type == "cuda", fsdp=args.fsdp,
                           api=args.api, planner="default", optimizer=args.optimizer, dtype=args.dtype)
    dims = VerifyOptions(width=args.width or 1, size=args.size_bytes).dims_for(flow, ctx.world_size)
    wd, run = make_run_dir(args.dir, ctx)
    try:
        raw = Bench(args, ctx, flow, dims, run).measure()
    finally:
        if ctx.is_rank0:
            workdir.cleanup(wd, keep=False)
    raw.update(loadavg={"start": list(load_start), "end": list(os.getloadavg())}, wall_s=time.perf_counter() - started)
    return BenchResult(raw)


class Bench:
    """One launch's measurements: the state, then per repetition the disk, bare DCP and fsdpck."""

    def __init__(self, args: Any, ctx, flow: Flow, dims: ModelDims, run: LocalStorage) -> None:
        self.args, self.ctx, self.flow, self.dims, self.run = args, ctx, flow, dims, run
        self.writer = WriterOptions(thread_count=args.thread_count)
        self.seed, self.tol = args.seed, Tolerance()
        self.rec = Recorder(ctx, log=not args.quiet)
        self.resident: dict[str, list[float | None]] = {"raw": [], "bare": [], "fsdpck": []}
        self.verified: list[bool] = []
        self.elementwise: list[bool] = []  # whether verify kept the saved tensors (small states) or fingerprints
        self.bare_matched: list[bool] = []
        self.dir_bytes: dict[str, int] = {}
        # fsdpck's pair is `fsdpck verify`'s own round trip (commands.verify.run_flow) with these options.
        self.opts = VerifyOptions(seed=self.seed, writer=self.writer)
        # Set once (measure): the trained state's summary, which every repetition's state must equal (training
        # is seeded), and this rank's share of the checkpoint's bytes.
        self.reference: dict[str, Any] = {}
        self.written = 0

    # --- the paths, each as a trainer or fsdpck verify takes it ---------------------------------

    def state_of(self, net: Any, optim: Any, trainer: Any) -> tuple[dict[str, Any], dict[str, Any]]:
        state = flows.state_dict(net, optim, self.flow, trainer)
        return state, views(flatten(state), rank=self.ctx.rank)

    def bare_save(self, state: dict[str, Any], path: Path) -> None:
        import torch.distributed.checkpoint as dcp

        if self.writer.thread_count == 1:
            dcp.save(state, checkpoint_id=str(path))
        else:
            dcp.save(state, storage_writer=dcp.FileSystemWriter(str(path), thread_count=self.writer.thread_count))

    def bare_resume(self, path: Path, dims: ModelDims, phase: Callable[[str, Callable[[], Any]], Any]):
        """Load ``path`` as a trainer resumes with bare DCP and PyTorch's state-dict API: a fresh model and
        optimizer as fsdpck builds them, get_state_dict (it allocates the optimizer's state: the target DCP
        loads into), dcp.load, set_state_dict. With FSDP1, get_state_dict gives the legacy API's ShardedTensor
        layout, which has no load target of its own. Returns the loaded state's views and what holds them."""
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

        net, optim, _ = phase("bare-setup", lambda: fresh(dims, self.flow, seed=self.seed, ctx=self.ctx))
        msd, osd = phase("bare-get-state-dict", lambda: get_state_dict(net, optim))
        into = {"model": msd, "optim": osd}
        phase("bare-load", lambda: dcp.load(into, checkpoint_id=str(path)))
        phase("bare-set-state-dict", lambda: set_state_dict(net, optim, model_state_dict=into["model"],
                                                            optim_state_dict=into["optim"]))
        return views(flatten(into), rank=self.ctx.rank), (net, optim, into)

    def drop_dir(self, path: Path) -> float | None:
        """Drop a checkpoint dir's pages on every node (its local rank 0), every rank waiting for it."""
        frac = drop_pages(files_under(path)) if self.ctx.local_rank == 0 else None
        self.rec.barrier()
        return frac

    def warm_up(self) -> None:
        """A tiny round trip through every path timed below, untimed. PyTorch imports modules, starts
        thread pools and builds kernels on first use (the fingerprint compiles its C kernel): none of
        that may land in the first repetition, and the RSS after it is the PyTorch baseline that the
        memory target allows on top of 2.2 × the share."""
        ctx, flow, seed = self.ctx, self.flow, self.seed
        tiny = ModelDims.for_world(ctx.world_size, 1)
        where = subdir(self.run, "warm-up", ctx)
        net, optim, trainer = trained(tiny, flow, seed=seed, ctx=ctx)
        state = flows.state_dict(net, optim, flow, trainer)
        self.bare_save(state, where.root / "bare")
        mdl.release(net)
        del net, optim, trainer, state
        self.rec.barrier()
        _, held = self.bare_resume(where.root / "bare", tiny, lambda name, fn: fn())
        run_flow(flow, subdir(where, "fsdpck", ctx), ctx=ctx, opts=self.opts, dims=tiny)
        backend_detail(ctx.device)
        mdl.release(held[0])
        del held
        release_memory(ctx)
        self.rec.barrier()
        if ctx.is_rank0:
            self.run.remove_tree("warm-up")

    # --- one repetition -------------------------------------------------------------------------

    def disk(self, rep_dir: LocalStorage) -> None:
        raw = rep_dir.root / f"raw-rank{self.ctx.rank}.bin"
        # Allocated for the disk phases only: the buffer must not sit in the RSS fsdpck's phases are measured by.
        chunk = io_buffer(self.written, seed=self.ctx.rank)
        self.rec.phase("raw-write", lambda: raw_write(raw, self.written, chunk))
        self.resident["raw"].append(drop_pages([raw]))
        got = self.rec.phase("raw-read", lambda: raw_read(raw, chunk))
        del chunk
        if got != self.written:
            raise RuntimeError(f"raw read of {raw} returned {got} bytes, {self.written} were written")
        raw.unlink()

    def bare_pair(self, rep_dir: LocalStorage) -> None:
        """A trainer's save and resume with bare DCP: train, save, let the model go, resume into a fresh one."""
        ctx, rec = self.ctx, self.rec
        path = rep_dir.root / "bare"
        net, optim, trainer = rec.phase("bare-step", lambda: trained(self.dims, self.flow, seed=self.seed, ctx=ctx))
        state = rec.phase("bare-state-dict", lambda: flows.state_dict(net, optim, self.flow, trainer))
        rec.phase("bare-save", lambda: self.bare_save(state, path))
        mdl.release(net)  # FSDP1 keeps a model's parameters after the model is gone otherwise
        del net, optim, trainer, state
        release_memory(ctx)
        if ctx.is_rank0:
            self.dir_bytes["bare"] = workdir.stored_bytes(rep_dir.child("bare"))
        self.resident["bare"].append(self.drop_dir(path))
        after, holders = self.bare_resume(path, self.dims, rec.phase)
        # Untimed: the bare load really read the state (its fingerprints are the trained state's).
        rows = compare_round_trip(self.reference, summarize(after, ctx=ctx), ctx=ctx, tol=self.tol)
        self.bare_matched.append(bool(rows) and all(r.status == MATCH for r in rows))
        mdl.release(holders[0])
        del after, holders, rows
        release_memory(ctx)
        rec.barrier()
        if ctx.is_rank0:
            rep_dir.remove_tree("bare")

    def fsdpck_pair(self, rep_dir: LocalStorage) -> None:
        """``fsdpck verify``'s round trip, its own code (``commands.verify.run_flow``), phase by phase; the
        checkpoint's pages are dropped between the save and the load, as for bare DCP."""
        ctx, rec, flow = self.ctx, self.rec, self.flow
        storage = subdir(rep_dir, "fsdpck", ctx)
        drop = {"setup": lambda: self.resident["fsdpck"].append(self.drop_dir(storage.root))}
        phases.set_progress(rec.reporter(drop))
        try:
            with dcp_clock(rec, "fsdpck-save-dcp", "torch.distributed.checkpoint.state_dict_saver", "_save_state_dict"), \
                    dcp_clock(rec, "fsdpck-load-dcp", "torch.distributed.checkpoint.state_dict_loader", "_load_state_dict"):
                result = run_flow(flow, storage, ctx=ctx, opts=self.opts, dims=self.dims)
        finally:
            phases.set_progress(_silent)
        if ctx.is_rank0:
            self.dir_bytes["fsdpck"] = result.bytes_written
        # Verified, and what was saved is the trained state every repetition starts from.
        same = all(row.saved == self.reference[row.key].value for row in result.rows if row.key in self.reference)
        self.verified.append(bool(result.rows) and result.exit_code == 0 and same)
        self.elementwise.append(result.elementwise)
        del result
        release_memory(ctx)
        rec.barrier()
        if ctx.is_rank0:
            rep_dir.remove_tree("fsdpck")

    # --- the run --------------------------------------------------------------------------------

    def measure(self) -> dict[str, Any]:
        ctx, rec, args = self.ctx, self.rec, self.args
        fs = filesystem_of(self.run.root)  # now: the dir is gone when the document is built
        rec.phase("warm-up", self.warm_up)
        warm_rss = rss_now()
        rec.sync()
        rec.memory.start()  # CUDA's peak statistics start after the warm-up's few bytes

        # The trained state, once: its fingerprints (what every repetition's save must hold: training is
        # seeded) and this rank's bytes; it goes before the repetitions, each of which trains its own.
        net, optim, trainer = rec.phase("step", lambda: trained(self.dims, self.flow, seed=self.seed, ctx=ctx))
        state, before = rec.phase("state-dict", lambda: self.state_of(net, optim, trainer))
        self.reference = summarize(before, ctx=ctx)  # untimed
        held = local_bytes(before)
        self.written = sum(t.numel() * t.element_size()  # this rank's share of the checkpoint: its counted pieces
                           for v in before.values() if v.counted for _, t in v.pieces)
        mdl.release(net)
        del net, optim, trainer, state, before
        release_memory(ctx)

        stopped_early, longest, rep_started = None, 0.0, time.perf_counter()
        for rep in range(args.reps):
            rec.next_rep()
            rep_dir = subdir(self.run, f"rep{rep}", ctx)
            self.disk(rep_dir)
            # Alternate which goes first, so that a drift in the machine's load favours neither; fsdpck first
            # in repetition 0, where its memory is measured before any bare DCP path has run in the process.
            for pair in (self.fsdpck_pair, self.bare_pair) if rep % 2 == 0 else (self.bare_pair, self.fsdpck_pair):
                pair(rep_dir)
            rec.barrier()
            if ctx.is_rank0:
                self.run.remove_tree(f"rep{rep}")
            if args.max_seconds and rep + 1 < args.reps:
                # Every rank takes the same decision: the slowest rank's clock and the longest repetition so far.
                now = time.perf_counter()
                elapsed, took = collectives.allreduce_floats(ctx, [now - args.t0, now - rep_started], op="max")
                longest = max(longest, took)
                if elapsed + 1.1 * longest > args.max_seconds:
                    stopped_early = (f"stopped after {rep + 1} of {args.reps} repetitions: another would end past "
                                     f"--max-seconds {args.max_seconds:g}")
                    break
            rep_started = time.perf_counter()

        rss_peak, cuda_peak = rec.memory.overall()
        copy_bytes, copy_s = copy_seconds(ctx.device, held, sync=rec.sync, barrier=rec.barrier)
        mine = {"rank": ctx.rank, "once": rec.reps[0], "reps": rec.reps[1:], "rss_peak": rss_peak,
                "cuda_peak": cuda_peak, "rss_baseline": ctx.baseline_rss, "rss_warm": warm_rss, "held": held,
                "written": self.written, "copy_bytes": copy_bytes, "copy_s": copy_s, "resident": self.resident,
                "verified": all(self.verified), "bare_matched": all(self.bare_matched),
                "elementwise": all(self.elementwise)}
        ranks = collectives.all_gather_json(ctx, mine)
        return {**self.describe(fs, stopped_early), "ranks": ranks,
                "checkpoint_dir_bytes": collectives.broadcast_json(ctx, self.dir_bytes),
                "verified": all(r["verified"] for r in ranks),
                "saved_copy_kept": all(r["elementwise"] for r in ranks),
                "bare_load_matched": all(r["bare_matched"] for r in ranks)}

    def describe(self, fs: dict[str, Any], stopped_early: str | None) -> dict[str, Any]:
        """The run's circumstances: machine, versions, dir, flow, model, state."""
        import torch

        ctx = self.ctx
        return {
            "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "hostname": socket.gethostname(),
            "cuda": torch.version.cuda,
            "device": ctx.device.type,
            "device_name": (torch.cuda.get_device_name(ctx.device) if ctx.device.type == "cuda"
                            else platform.processor() or platform.machine()),
            "backend": ctx.backend,
            "world_size": ctx.world_size,
            "nodes": ctx.node_count,
            "threads_per_rank": torch.get_num_threads(),
            "cpu_count": os.cpu_count(),
            "dir": {**fs, "given": self.args.dir},
            "flow": self.flow.as_dict(),
            "writer": self.writer.as_dict(),
            "dims": self.dims.as_list(),
            "width": self.dims.a // ctx.world_size,
            "reps_requested": self.args.reps,
            "stopped_early": stopped_early,
            "keys": _keys(self.reference),
            "object_keys": sum(1 for s in self.reference.values() if s.kind != KIND_TENSOR),
            "fingerprint_backend": backend_detail(ctx.device),
            "memory_per_phase": self.rec.memory.per_phase,
            "cache_note": CACHE_NOTE,
        }


def _keys(summaries: dict[str, Any]) -> list[dict[str, Any]]:
    """Every tensor key of the checkpoint: its global shape, dtype, layout and bytes."""
    import math

    import torch

    out = []
    for key, s in sorted(summaries.items()):
        if s.kind != KIND_TENSOR:
            continue
        itemsize = torch.empty((), dtype=getattr(torch, s.dtype)).element_size()
        out.append({"key": key, "shape": list(s.shape), "dtype": s.dtype, "layout": s.layout,
                    "bytes": math.prod(s.shape) * itemsize})
    return out
