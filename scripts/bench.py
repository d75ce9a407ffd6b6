"""How fast is fsdpck against bare DCP and against the disk, on the same state and the same dir?

One launch builds fsdpck's three-layer model at a size (``--size`` or ``--width``), takes one
optimizer step, and then, for each of ``--reps`` repetitions, measures side by side in one
directory, with the same state dict:

1. the filesystem: each rank writes its share of the checkpoint's bytes into its own file
   (64 MiB writes through the page cache, then fsync), drops the file's pages from the page
   cache (``posix_fadvise(DONTNEED)``, the fraction still resident checked with mincore) and
   reads it back;
2. bare DCP: ``dcp.save(state, checkpoint_id=dir)`` of the very state dict fsdpck saves; then,
   its pages dropped, a resume with PyTorch's own API into a fresh model + optimizer:
   ``get_state_dict`` (allocates the load target), ``dcp.load`` (the "bare load"),
   ``set_state_dict``, each timed;
3. fsdpck's phases as ``fsdpck verify`` runs them: ``flows.save``, ``flows.load_fresh`` (and
   the time spent inside DCP's own save/load core in each), ``compare_views``,
   ``attach_fingerprints``, and ``state_entries`` (the manifest's fingerprints + stats that
   ``fsdpck save``/``load`` compute).

Every phase starts after a barrier (and a CUDA synchronize on GPU) and counts the slowest
rank. An untimed tiny round trip first loads PyTorch's lazily imported modules and kernels.
fsdpck's pair runs first in even repetitions, bare DCP's in odd ones, so that a drift in the
machine's load favours neither; repetition 0 (fsdpck first) is where fsdpck's peak memory is
taken, per phase (VmHWM reset before each), before any bare DCP path has run in the process.
It prints medians, spread (min-max), the ratios of issue 6 with their targets, peak memory
per rank against the rank's share of the state, and with ``--json`` every raw figure. It
removes everything it wrote.

    python scripts/bench.py --width 64 --reps 1                                 # world size 1
    torchrun --standalone --nproc_per_node=2 scripts/bench.py --size 1GB --reps 5
    torchrun --standalone --nproc_per_node=4 scripts/bench.py --size 32GB --dir /scratch --json b.json
    NPROC=2 bash scripts/bench.sh --size 8GB --json b.json                      # the same through a wrapper

Exit code: 0 when every repetition's round trip verified, 1 when one did not, 2 for a bad
option or dir, 3 when a rank failed.
"""

from __future__ import annotations

import argparse
import gc
import os
import platform
import shutil
import socket
import statistics
import sys
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

T0 = time.perf_counter()  # about the process's start: --max-seconds counts from here
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

SCHEMA = "fsdpck.bench/1"
IO_CHUNK = 64 << 20  # bytes per write()/readinto() of the raw-disk baseline
CACHE_NOTE = ("reads follow posix_fadvise(DONTNEED) after fsync; where the filesystem does not honour it "
              "(tmpfs, some network filesystems) they may still come partly from the page cache: "
              "the fraction still resident after the drop is measured (mincore) and shown")

# Phases timed in every repetition: name -> what the table calls it.
PHASES = {
    "raw-write": "disk: write + fsync",
    "raw-read": "disk: read (pages dropped)",
    "bare-save": "bare dcp.save",
    "fsdpck-save": "fsdpck save",
    "fsdpck-save-dcp": "  of which inside DCP",
    "bare-load": "bare dcp.load",
    "fsdpck-load": "fsdpck load",
    "fsdpck-load-dcp": "  of which inside DCP",
    "bare-resume": "bare resume (get + dcp.load + set)",
    "bare-get-state-dict": "  of which get_state_dict",
    "bare-set-state-dict": "  of which set_state_dict",
    "compare": "fsdpck compare",
    "fingerprint": "fsdpck fingerprint",
    "state-entries": "fsdpck state_entries",
    "bare-setup": "set-up: fresh model (bare)",
    "fsdpck-setup": "set-up: fresh model (fsdpck)",
}
FSDPCK_PHASES = ("step", "state-dict", "fsdpck-save", "fsdpck-setup", "fsdpck-load", "compare", "fingerprint", "state-entries")
RESUME_PARTS = ("bare-get-state-dict", "bare-load", "bare-set-state-dict")  # bare-resume is their sum
ONCE = ("warm-up", "step", "state-dict")  # once: every repetition saves the same state
EXAMPLES = """examples:
  python scripts/bench.py --width 64 --reps 1
  python scripts/bench.py --markdown a.json b.json      # docs/benchmarks.md's tables from --json output
  torchrun --standalone --nproc_per_node=2 scripts/bench.py --size 1GB --reps 3 --json bench.json
  torchrun --standalone --nproc_per_node=2 scripts/bench.py --size 8GB --fsdp 2 --dir /scratch"""


# --- options ----------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=EXAMPLES)
    size = p.add_mutually_exclusive_group()
    size.add_argument("--size", default=None, help="bytes of model + optimizer state to checkpoint (500MB, 8GB, 1.5GiB); default 1GB")
    size.add_argument("--width", type=int, default=None, help="the model's width multiplier instead of --size")
    p.add_argument("--reps", type=int, default=3, help="repetitions (default 3)")
    p.add_argument("--dir", default=None, help="where to write; a fresh subdir is made and removed (default: a temp dir)")
    p.add_argument("--fsdp", type=int, choices=(1, 2), default=1)
    p.add_argument("--api", choices=("legacy", "dsd"), default=None, help="state-dict API (default: legacy for --fsdp 1, dsd for 2)")
    p.add_argument("--optimizer", default="adam", choices=("adam", "adamw", "sgd", "adagrad", "rmsprop"))
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    p.add_argument("--thread-count", type=int, default=1, help="FileSystemWriter thread_count, for fsdpck and bare DCP alike")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads per rank (default: torch's; torchrun sets 1)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--timeout", type=float, default=1800.0, help="collective timeout in seconds")
    p.add_argument("--max-seconds", type=float, default=None,
                   help="start no repetition that would end past this many seconds since launch (keeps a run inside a job's time limit)")
    p.add_argument("--json", default=None, metavar="PATH", help="write every raw timing and figure as JSON (- for stdout)")
    p.add_argument("--verbose", action="store_true", help="show PyTorch's warnings")
    p.add_argument("--quiet", action="store_true", help="no per-phase progress lines on stderr")
    args = p.parse_args(argv)
    if args.reps < 1:
        p.error("--reps must be at least 1")
    if args.width is not None and args.width < 1:
        p.error("--width must be at least 1")
    if args.thread_count < 1:
        p.error("--thread-count must be at least 1")
    if args.api is None:
        args.api = "legacy" if args.fsdp == 1 else "dsd"
    if args.fsdp == 2 and args.api == "legacy":
        p.error("--fsdp 2 with --api legacy is impossible: the legacy functions exist only for FSDP1")
    if args.width is None:
        from fsdpck.model import parse_size

        try:
            args.size_bytes = parse_size(args.size or "1GB")
        except ValueError as e:
            p.error(f"--size: {e}")
    return args


# --- measuring ----------------------------------------------------------------------------


def _vm_hwm() -> int | None:
    """This process's peak RSS since the last reset (Linux VmHWM), or None."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _vm_rss() -> int:
    """This process's resident set now (Linux VmRSS); the peak so far elsewhere."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return _ru_maxrss()


def _reset_hwm() -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0), so each phase gets its own peak."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _ru_maxrss() -> int:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


class MemoryWatch:
    """Peak host RSS and CUDA allocation, per phase and overall.

    Per phase: VmHWM is reset before a phase and read after it; CUDA's peak statistics
    likewise. Overall: the largest reading of either, ever — getrusage's ru_maxrss alone
    stops being the lifetime peak once VmHWM has been reset.
    """

    def __init__(self, device) -> None:
        self.cuda = device.type == "cuda"
        self.device = device
        self.per_phase = _reset_hwm()  # also tells whether the reset works here
        self.rss_peak = _ru_maxrss()
        self.cuda_peak = 0

    def _fold(self) -> None:
        import torch

        self.rss_peak = max(self.rss_peak, _vm_hwm() or 0)
        if self.cuda:
            self.cuda_peak = max(self.cuda_peak, torch.cuda.max_memory_allocated(self.device))

    def start(self) -> None:
        import torch

        self._fold()
        if self.per_phase:
            _reset_hwm()
        if self.cuda:
            torch.cuda.reset_peak_memory_stats(self.device)

    def stop(self) -> tuple[int, int]:
        """(peak RSS, peak CUDA allocated) since start(); RSS is the lifetime peak where VmHWM cannot be reset."""
        import torch

        rss = (_vm_hwm() if self.per_phase else None) or _ru_maxrss()
        cuda = torch.cuda.max_memory_allocated(self.device) if self.cuda else 0
        self._fold()
        return rss, cuda

    def overall(self) -> tuple[int, int]:
        self._fold()
        return max(self.rss_peak, _ru_maxrss() if not self.per_phase else 0), self.cuda_peak


class Recorder:
    """Times phases on this rank (barrier first, CUDA synced) and collects every rank's times per repetition."""

    def __init__(self, ctx, *, log: bool = True) -> None:
        self.ctx = ctx
        self.log = log and ctx.is_rank0  # one line per phase on stderr: a run cut short by a job limit still says where it was
        self.memory = MemoryWatch(ctx.device)
        self.current: dict[str, float] = {}
        self.cpu_current: dict[str, float] = {}
        self.reps: list[dict[str, list[float]]] = []  # per repetition: phase -> seconds per rank
        self.cpu_reps: list[dict[str, list[float]]] = []  # the same in CPU seconds of the process (all its threads)
        self.rep = -1  # the repetition running (-1: set-up, before the first)
        self.peaks: list[tuple[int, str, int, int, int]] = []  # (rep, phase, peak RSS, peak CUDA, RSS at its start)

    def sync(self) -> None:
        import torch

        if self.ctx.device.type == "cuda":
            torch.cuda.synchronize(self.ctx.device)

    def barrier(self) -> None:
        import torch.distributed as dist

        if self.ctx.world_size > 1:
            dist.barrier()

    def phase(self, name: str, fn: Callable[[], Any]) -> Any:
        self.sync()
        self.barrier()  # every rank starts together: the slowest rank's time is the phase's time
        self.memory.start()
        rss_start = _vm_rss()
        c0 = time.process_time()
        t0 = time.perf_counter()
        out = fn()
        self.sync()
        self.add(name, time.perf_counter() - t0)
        self.cpu_current[name] = self.cpu_current.get(name, 0.0) + time.process_time() - c0
        rss, cuda = self.memory.stop()
        self.peaks.append((self.rep, name, rss, cuda, rss_start))
        if self.log:
            where = "set-up" if self.rep < 0 else f"rep {self.rep}"
            print(f"bench: {where} {name}: {self.current[name]:.2f} s on rank 0, peak RSS {rss / 1e9:.2f} GB"
                  + (f", CUDA {cuda / 1e9:.2f} GB" if self.memory.cuda else ""), file=sys.stderr, flush=True)
        return out

    def peak_table(self) -> tuple[list[str], list[list[int]]]:
        """Per phase: [peak RSS, peak CUDA] over all repetitions, then the same in fsdpck's clean
        measurement (set-up, and repetition 0, where fsdpck's pair runs before bare DCP's), and the
        RSS at the phase's start there."""
        names = list(dict.fromkeys(name for _, name, *_ in self.peaks))
        rows = []
        for name in names:
            every = [(r, rss, cuda, start) for r, n, rss, cuda, start in self.peaks if n == name]
            clean = [e for e in every if e[0] <= 0] or every
            rows.append([max(e[1] for e in every), max(e[2] for e in every),
                         max(e[1] for e in clean), max(e[2] for e in clean), clean[0][3], 0])
        return names, rows

    def add(self, name: str, seconds: float) -> None:
        self.current[name] = self.current.get(name, 0.0) + seconds

    def end_rep(self) -> dict[str, list[float]]:
        """Every rank's time of every phase of this repetition (a collective; same phases on every rank)."""
        names = list(self.current)
        per_rank = _gather_rows(self.ctx, [[self.current[n] for n in names],
                                           [self.cpu_current.get(n, 0.0) for n in names]], float)
        self.current, self.cpu_current = {}, {}
        times = {n: [per_rank[r][0][i] for r in range(self.ctx.world_size)] for i, n in enumerate(names)}
        self.reps.append(times)
        self.cpu_reps.append({n: [per_rank[r][1][i] for r in range(self.ctx.world_size)] for i, n in enumerate(names)})
        return times


def _gather_rows(ctx, rows: list[list[float]], kind) -> list[list[list]]:
    """all_gather a small rows × k table of numbers: result[rank][row][col]."""
    import torch
    import torch.distributed as dist

    dtype = torch.float64 if kind is float else torch.int64
    mine = torch.tensor(rows, dtype=dtype, device=ctx.collective_device)
    if ctx.world_size == 1:
        return [mine.cpu().tolist()]
    everyone = [torch.zeros_like(mine) for _ in range(ctx.world_size)]
    dist.all_gather(everyone, mine)
    return [t.cpu().tolist() for t in everyone]


@contextmanager
def dcp_clock(recorder: Recorder, name: str, module_name: str, attr: str):
    """Time the calls into DCP's own save/load core made inside a phase (both the public
    ``dcp.save``/``dcp.load`` and the deprecated ``load_state_dict`` that the legacy optimizer
    path uses go through these two functions)."""
    import importlib

    module = importlib.import_module(module_name)
    original = getattr(module, attr, None)
    if original is None:  # a PyTorch without it: the split is simply not reported
        yield
        return

    def timed(*args, **kwargs):
        t0 = time.perf_counter()
        try:
            return original(*args, **kwargs)
        finally:
            recorder.sync()
            recorder.add(name, time.perf_counter() - t0)

    setattr(module, attr, timed)
    try:
        yield
    finally:
        setattr(module, attr, original)


# --- the filesystem ----------------------------------------------------------------------


def resident_fraction(paths: list[Path]) -> float | None:
    """Fraction of these files' pages in the page cache now (mincore), or None where it cannot be asked."""
    import ctypes
    import mmap

    try:
        libc = ctypes.CDLL(None, use_errno=True)
        page = mmap.PAGESIZE
        resident = total = 0
        for path in paths:
            size = path.stat().st_size
            if size == 0:
                continue
            with open(path, "rb") as f:
                mm = mmap.mmap(f.fileno(), size, access=mmap.ACCESS_COPY)  # private, never written: no I/O
            try:
                view = (ctypes.c_char * size).from_buffer(mm)
                pages = (size + page - 1) // page
                vec = (ctypes.c_ubyte * pages)()
                rc = libc.mincore(ctypes.c_void_p(ctypes.addressof(view)), ctypes.c_size_t(size), vec)
                del view
                if rc != 0:
                    return None
                raw = bytes(vec)
                resident += pages - raw.count(0)
                total += pages
            finally:
                mm.close()
        return resident / total if total else None
    except (OSError, AttributeError, ValueError, TypeError):
        return None


def drop_pages(paths: list[Path]) -> float | None:
    """fsync each file and ask the kernel to drop its cached pages; return what is still resident."""
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)  # dirty pages cannot be dropped
            if hasattr(os, "posix_fadvise"):
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
    return resident_fraction(paths)


def drop_dir(path: Path, rec: Recorder) -> float | None:
    """Drop a checkpoint dir's pages on every node (its local rank 0), all ranks waiting for it."""
    frac = None
    if rec.ctx.local_rank == 0:
        frac = drop_pages(sorted(p for p in path.rglob("*") if p.is_file()))
    rec.barrier()
    return frac


def raw_write(path: Path, nbytes: int, chunk: memoryview) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        left = nbytes
        while left:
            left -= os.write(fd, chunk[: min(left, len(chunk))])
        os.fsync(fd)
    finally:
        os.close(fd)


def raw_read(path: Path, chunk: memoryview) -> int:
    got = 0
    with open(path, "rb", buffering=0) as f:
        while True:
            n = f.readinto(chunk)
            if not n:
                return got
            got += n


def filesystem_of(path: Path) -> dict[str, Any]:
    """The mount that holds ``path`` (from /proc/mounts) and its size (statvfs)."""
    import re

    real = os.path.realpath(path)
    best: tuple[str, str, str] | None = None
    try:
        with open("/proc/mounts") as f:
            for line in f:
                parts = line.split()
                if len(parts) < 3:
                    continue
                dev, mnt, fstype = (re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), s) for s in parts[:3])
                if (real == mnt or real.startswith(mnt.rstrip("/") + "/")) and (best is None or len(mnt) >= len(best[1])):
                    best = (dev, mnt, fstype)
    except OSError:
        pass
    usage = shutil.disk_usage(path)
    return {"path": str(path), "device": best[0] if best else None, "mountpoint": best[1] if best else None,
            "fstype": best[2] if best else None, "total_bytes": usage.total, "free_bytes": usage.free}


# --- the state ----------------------------------------------------------------------------


@dataclass(slots=True)
class StateSizes:
    keys: list[dict[str, Any]]  # every DCP tensor key: shape, dtype, bytes (global)
    total: int  # sum of the keys' bytes: what the checkpoint holds
    held: int  # this rank's local tensor bytes (its share of memory)
    written: int  # this rank's share of the checkpoint (replicated values: rank 0)
    view_bytes: int  # this rank's fingerprinted bytes of the optimizer view (one side)
    objects: int = 0  # non-tensor DCP keys (param_groups entries ...)
    per_rank: dict[str, list[int]] = field(default_factory=dict)


def state_sizes(state: dict[str, Any], view: dict[str, Any], ctx) -> StateSizes:
    import math

    import torch
    from torch.distributed.checkpoint._nested_dict import flatten_state_dict

    from fsdpck.compare import describe

    def nbytes(t) -> int:
        return t.numel() * t.element_size()

    flat, _ = flatten_state_dict(state)
    keys, total, held, written, objects = [], 0, 0, 0, 0
    for key in sorted(flat):
        info = describe(flat[key], ctx.rank)
        if info.sharding == "object":
            objects += 1
            continue
        itemsize = torch.empty((), dtype=getattr(torch, info.dtype)).element_size()
        size = math.prod(info.shape) * itemsize
        keys.append({"key": key, "shape": list(info.shape), "dtype": info.dtype, "sharding": info.sharding, "bytes": size})
        total += size
        local = sum(nbytes(t) for _, t in info.pieces)
        held += local
        written += local if info.counted_here else 0
    view_bytes = 0
    for states in view["state"].values():
        for value in states.values():
            info = describe(value, ctx.rank)
            if info.sharding != "object" and info.counted_here:
                view_bytes += sum(nbytes(t) for _, t in info.pieces)
    sizes = StateSizes(keys, total, held, written, view_bytes, objects)
    table = _gather_rows(ctx, [[held, written, view_bytes]], int)
    sizes.per_rank = {name: [int(table[r][0][i]) for r in range(ctx.world_size)]
                      for i, name in enumerate(("held", "written", "view"))}
    return sizes


# --- one run --------------------------------------------------------------------------------


def make_run_dir(base: str | None, ctx) -> tuple[Path, Path]:
    """Rank 0 makes a fresh dir (inside --dir, or a temp dir); returns (run dir, what to remove at the end)."""
    import torch.distributed as dist

    from fsdpck.errors import UsageError
    from fsdpck.workdir import check_shared

    box: list[Any] = [None]
    if ctx.is_rank0:
        try:
            if base is None:
                run = Path(tempfile.mkdtemp(prefix="fsdpck-bench-"))
                remove = run
            else:
                root = Path(base).expanduser().absolute()
                created = not root.exists()
                root.mkdir(parents=True, exist_ok=True)
                run = Path(tempfile.mkdtemp(prefix="fsdpck-bench-", dir=root))
                remove = root if created else run
            box[0] = (str(run), str(remove))
        except OSError as e:
            box[0] = f"--dir {base}: {e.strerror or e}"
    if ctx.world_size > 1:
        dist.broadcast_object_list(box, src=0)
    if isinstance(box[0], str):
        raise UsageError(box[0])
    run, remove = Path(box[0][0]), Path(box[0][1])
    check_shared(run, ctx)
    return run, remove


def _free() -> None:
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def run_bench(args: argparse.Namespace, ctx) -> dict[str, Any]:
    """Every measurement; returns the JSON document (complete on rank 0)."""
    import torch
    import torch.distributed.checkpoint as dcp

    from fsdpck import flows
    from fsdpck import model as mdl
    from fsdpck.compare import Tolerance, attach_fingerprints, compare_views
    from fsdpck.saveload import state_entries

    started = time.perf_counter()
    load_start = os.getloadavg()
    flow = flows.Flow(fsdp=args.fsdp, api=args.api, optimizer=args.optimizer, dtype=args.dtype)
    writer = flows.WriterOptions(thread_count=args.thread_count)
    width = args.width or mdl.width_for_size(args.size_bytes, world_size=ctx.world_size, optimizer=flow.optimizer, dtype=flow.dtype)
    dims = mdl.ModelDims.for_world(ctx.world_size, width)
    run_dir, remove = make_run_dir(args.dir, ctx)
    fs = filesystem_of(run_dir)  # now: the dir is gone when the document is built
    rec = Recorder(ctx, log=not args.quiet)

    def build(seed: int, shape=dims):
        net = mdl.wrap(mdl.build_model(shape, seed=seed, dtype=flow.dtype, device=ctx.device),
                       fsdp=flow.fsdp, device=ctx.device, world_size=ctx.world_size)
        return net, mdl.build_optimizer(flow.optimizer, net.parameters())

    def step(net, optim, seed: int, shape=dims) -> None:
        mdl.train_steps(net, optim, steps=flow.steps, seed=seed, rank=ctx.rank, dims=shape, dtype=flow.dtype, device=ctx.device)

    def bare_resume(path: Path, *, seed: int, shape=dims, phase=None):
        """Load ``path`` the way a trainer resumes with bare DCP and PyTorch's state-dict API: a fresh
        model + optimizer built as fsdpck builds them, get_state_dict (it allocates the optimizer's
        state: the target DCP loads into), dcp.load, set_state_dict. With FSDP1, get_state_dict gives
        the same ShardedTensor layout as the legacy API, which has no load target of its own
        (load_sharded_optimizer_state_dict calls DCP itself). Returns the loaded optimizer view."""
        from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

        run = phase or (lambda name, fn: fn())
        net_b, optim_b = run("bare-setup", lambda: build(seed, shape))
        msd, osd = run("bare-get-state-dict", lambda: get_state_dict(net_b, optim_b))
        into = {"model": msd, "optim": osd}
        run("bare-load", lambda: dcp.load(into, checkpoint_id=str(path)))
        run("bare-set-state-dict", lambda: set_state_dict(net_b, optim_b, model_state_dict=into["model"],
                                                          optim_state_dict=into["optim"]))
        return {"state": into["optim"]["state"], "param_groups": into["optim"]["param_groups"]}, (net_b, optim_b, into)

    def warm_up() -> None:
        """A tiny round trip through every path timed below, untimed. PyTorch imports modules, starts
        thread pools and builds kernels on first use: none of that may land in the first repetition,
        and the RSS after it is the PyTorch baseline that the memory target allows on top of 2.2x."""
        tiny = mdl.ModelDims.for_world(ctx.world_size, 1)
        path = run_dir / "warm-up"
        net, optim = build(args.seed, tiny)
        step(net, optim, args.seed, tiny)
        state, before = flows.state_for_save(net, optim, flow)
        dcp.save(state, checkpoint_id=str(path / "bare"))
        flows.save(state, path / "fsdpck", flow, writer)
        rec.barrier()
        bare_view, held = bare_resume(path / "bare", seed=args.seed + 1, shape=tiny)
        net2, optim2 = build(args.seed + 1, tiny)
        after = flows.load_fresh(net2, optim2, path / "fsdpck", flow)
        attach_fingerprints(compare_views(before, after, ctx=ctx, tol=Tolerance()), before, after, ctx=ctx)
        state_entries(state, ctx=ctx)
        fingerprint_backend(ctx.device)
        del net, optim, state, before, bare_view, held, net2, optim2, after
        _free()
        rec.barrier()
        if ctx.is_rank0:
            shutil.rmtree(path)

    try:
        rec.phase("warm-up", warm_up)
        warm_rss = _vm_rss()
        rec.sync()
        rec.memory.start()  # CUDA's peak statistics start after the warm-up's few bytes

        # The state every repetition saves: built once, as `fsdpck verify` builds it.
        def live():
            net, optim = build(args.seed)
            step(net, optim, args.seed)
            return net, optim

        net, optim = rec.phase("step", live)
        state, before = rec.phase("state-dict", lambda: flows.state_for_save(net, optim, flow))
        once = rec.end_rep()
        rec.reps.clear()
        rec.cpu_reps.clear()
        sizes = state_sizes(state, before, ctx)
        fp_backend = fingerprint_backend(ctx.device)
        resident: dict[str, list[float | None]] = {"raw": [], "bare": [], "fsdpck": []}
        verified: list[bool] = []
        bare_matched: list[bool] = []
        dir_bytes: dict[str, int] = {}

        def bare_pair(rep_dir: Path) -> None:
            path = rep_dir / "bare"
            if args.thread_count == 1:
                rec.phase("bare-save", lambda: dcp.save(state, checkpoint_id=str(path)))
            else:
                rec.phase("bare-save", lambda: dcp.save(state, storage_writer=dcp.FileSystemWriter(
                    str(path), thread_count=args.thread_count)))
            if ctx.is_rank0:
                dir_bytes["bare"] = sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
            resident["bare"].append(drop_dir(path, rec))

            view, held = bare_resume(path, seed=args.seed + 1, phase=rec.phase)
            # Untimed: the bare load really read the state (the same shard-local comparison fsdpck runs).
            rows = compare_views(before, view, ctx=ctx, tol=Tolerance())
            bare_matched.append(bool(rows) and all(r.status == "match" for r in rows))
            del view, held, rows
            _free()
            rec.barrier()
            if ctx.is_rank0:
                shutil.rmtree(path)

        def fsdpck_pair(rep_dir: Path) -> None:
            path = rep_dir / "fsdpck"

            def save():
                with dcp_clock(rec, "fsdpck-save-dcp", "torch.distributed.checkpoint.state_dict_saver", "_save_state_dict"):
                    flows.save(state, path, flow, writer)
                rec.barrier()  # as run_flow's save phase: the save is done when every rank is

            rec.phase("fsdpck-save", save)
            if ctx.is_rank0:
                dir_bytes["fsdpck"] = sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
            resident["fsdpck"].append(drop_dir(path, rec))
            net2, optim2 = rec.phase("fsdpck-setup", lambda: build(args.seed + 1))

            def load():
                with dcp_clock(rec, "fsdpck-load-dcp", "torch.distributed.checkpoint.state_dict_loader", "_load_state_dict"):
                    out = flows.load_fresh(net2, optim2, path, flow)
                rec.barrier()
                return out

            after = rec.phase("fsdpck-load", load)
            rows = rec.phase("compare", lambda: compare_views(before, after, ctx=ctx, tol=Tolerance()))
            rec.phase("fingerprint", lambda: attach_fingerprints(rows, before, after, ctx=ctx))
            rec.phase("state-entries", lambda: state_entries(state, ctx=ctx))
            verified.append(bool(rows) and all(
                r.status == "match" and r.fp_before == r.fp_after for r in rows))
            del net2, optim2, after, rows
            _free()
            rec.barrier()
            if ctx.is_rank0:
                shutil.rmtree(path)

        stopped_early, longest, rep_started = None, 0.0, time.perf_counter()
        for rep in range(args.reps):
            rec.rep = rep
            rep_dir = run_dir / f"rep{rep}"
            raw = rep_dir / f"raw-rank{ctx.rank}.bin"
            if ctx.is_rank0:
                rep_dir.mkdir()
            rec.barrier()
            # Random bytes (a compressing filesystem gains nothing), allocated for the disk phases only:
            # the buffer must not sit in the RSS that fsdpck's phases are measured by.
            chunk = memoryview(torch.randint(0, 256, (min(IO_CHUNK, max(1, sizes.written)),), dtype=torch.uint8,
                                             generator=torch.Generator().manual_seed(ctx.rank)).numpy())
            rec.phase("raw-write", lambda: raw_write(raw, sizes.written, chunk))
            resident["raw"].append(drop_pages([raw]))
            got = rec.phase("raw-read", lambda: raw_read(raw, chunk))
            del chunk
            if got != sizes.written:
                raise RuntimeError(f"raw read of {raw} returned {got} bytes, {sizes.written} were written")
            raw.unlink()
            # Alternate which goes first, so that a drift in the machine's load favours neither; fsdpck
            # first in repetition 0, where its memory is measured before bare DCP's paths have run.
            pairs = (fsdpck_pair, bare_pair) if rep % 2 == 0 else (bare_pair, fsdpck_pair)
            for pair in pairs:
                pair(rep_dir)
            rec.end_rep()
            rec.barrier()
            if ctx.is_rank0:
                shutil.rmtree(rep_dir)
            if args.max_seconds and rep + 1 < args.reps:
                # Every rank takes the same decision: the slowest rank's clock, and the longest repetition so far.
                now = time.perf_counter()
                table = _gather_rows(ctx, [[now - T0, now - rep_started]], float)
                elapsed = max(row[0][0] for row in table)
                longest = max(longest, max(row[0][1] for row in table))
                if elapsed + 1.1 * longest > args.max_seconds:
                    stopped_early = f"stopped after {rep + 1} of {args.reps} repetitions: another would end past --max-seconds {args.max_seconds:g}"
                    break
            rep_started = time.perf_counter()

        rss_peak, cuda_peak = rec.memory.overall()
        phase_names, peak_rows = rec.peak_table()
        mem = _gather_rows(ctx, [[rss_peak, cuda_peak, ctx.baseline_rss, warm_rss, 0, 0]] + peak_rows, int)
        fp_rate = _fingerprint_rates(rec, sizes)
        copy_gbps = _copy_bandwidth(ctx, rec, sizes.held)
        all_verified = _all_ranks(ctx, all(verified))
        bare_ok = _all_ranks(ctx, all(bare_matched))
    except BaseException:
        # No barrier here: another rank may be the one that failed. Rank 0 removes what was written.
        if ctx.is_rank0:
            shutil.rmtree(remove, ignore_errors=True)
        raise
    rec.barrier()
    if ctx.is_rank0:
        shutil.rmtree(remove, ignore_errors=True)
    return build_document(args=args, ctx=ctx, flow=flow, writer=writer, dims=dims, width=width, sizes=sizes, rec=rec,
                          once=once, mem=mem, phase_names=phase_names, fp_rate=fp_rate, copy_gbps=copy_gbps,
                          resident=resident, verified=all_verified, bare_matched=bare_ok, dir_bytes=dir_bytes, fs=fs,
                          fp_backend=fp_backend, stopped_early=stopped_early,
                          load=(load_start, os.getloadavg()), wall_s=time.perf_counter() - started)


def fingerprint_backend(device) -> str:
    """fsdpck.fingerprint's path on ``device`` (C kernel, Triton kernel or torch ops), where the module says."""
    from fsdpck import fingerprint

    detail = getattr(fingerprint, "backend_detail", None) or getattr(fingerprint, "backend", None)
    return str(detail(device)) if detail else "torch"


def _all_ranks(ctx, flag: bool) -> bool:
    table = _gather_rows(ctx, [[1 if flag else 0]], int)
    return all(row[0][0] for row in table)


def _fingerprint_rates(rec: Recorder, sizes: StateSizes) -> tuple[list[float], list[float]]:
    """Per repetition, the slowest rank's fingerprint rate: GB/s of wall time, and GB per CPU-second
    of the process (a per-core rate that a machine shared with other work does not bend)."""
    wall, cpu = [], []
    for rep, rep_cpu in zip(rec.reps, rec.cpu_reps):
        view = sizes.per_rank["view"]
        w = [2 * b / t / 1e9 for b, t in zip(view, rep["fingerprint"]) if t > 0 and b > 0]
        c = [2 * b / t / 1e9 for b, t in zip(view, rep_cpu["fingerprint"]) if t > 0 and b > 0]
        wall.append(min(w) if w else 0.0)
        cpu.append(min(c) if c else 0.0)
    return wall, cpu


def _copy_bandwidth(ctx, rec: Recorder, held: int) -> float:
    """Memory bandwidth baseline in the same run: ``dst.copy_(src)`` on every rank at once, tensor GB/s
    (the unit of fingerprint GB/s); the slowest rank's best of three. Run after the memory figures are taken."""
    import torch

    cap = (2 << 30) if ctx.device.type == "cuda" else (256 << 20)
    n = max(1 << 20, min(cap, held)) // 4
    src = torch.ones(n, dtype=torch.float32, device=ctx.device)
    dst = torch.empty_like(src)
    dst.copy_(src)
    best = float("inf")
    for _ in range(3):
        rec.sync()
        rec.barrier()
        t0 = time.perf_counter()
        dst.copy_(src)
        rec.sync()
        best = min(best, time.perf_counter() - t0)
    del src, dst
    table = _gather_rows(ctx, [[best]], float)
    return 4 * n / max(row[0][0] for row in table) / 1e9


# --- the report ------------------------------------------------------------------------------


def _stats(values: list[float]) -> dict[str, float]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def targets_for(device_type: str) -> dict[str, dict[str, Any]]:
    gpu = device_type == "cuda"
    return {
        "save_vs_bare": {"label": "fsdpck save / bare dcp.save", "target": 1.05, "op": "<=", "text": "≤ 1.05"},
        "load_vs_bare": {"label": "fsdpck load / bare dcp.load", "target": 1.05, "op": "<=", "text": "≤ 1.05"},
        "load_dcp_vs_bare": {"label": "  its DCP part / bare dcp.load", "target": None, "text": "(info)"},
        "load_vs_resume": {"label": "fsdpck load / bare resume", "target": None, "text": "(info)"},
        "save_vs_disk": {"label": "save GB/s / disk write GB/s", "target": None, "text": "(info: ≤ 1 expected)"},
        "load_vs_disk": {"label": "load GB/s / disk read GB/s", "target": None, "text": "(info: ≤ 1 expected)"},
        "check_cost": {"label": "(fingerprint + compare) / (save + load)", "target": 0.10 if gpu else 0.5, "op": "<=",
                       "text": "≤ 0.10 on GPU" if gpu else "≤ 0.5 on CPU"},
        "fingerprint_gbps_per_rank": {"label": "fingerprint GB/s per rank", "target": None,
                                      "text": "vs memory bandwidth (copy_)" if gpu else "(info)"},
        "fingerprint_gb_per_cpu_s": {"label": "fingerprint GB per CPU-second", "target": None if gpu else 1.0, "op": ">=",
                                     "text": "(info)" if gpu else "≥ 1 GB/s per CPU core"},
        "memory": {"label": "memory (peak − PyTorch baseline) / share", "target": 2.2, "op": "<=", "text": "≤ 2.2"},
    }


def _met(value: float | None, spec: dict[str, Any]) -> bool | None:
    if value is None or spec.get("target") is None:
        return None
    return value <= spec["target"] if spec["op"] == "<=" else value >= spec["target"]


def build_document(*, args, ctx, flow, writer, dims, width, sizes: StateSizes, rec: Recorder, once, mem, phase_names,
                   fp_rate, copy_gbps, resident, verified, bare_matched, dir_bytes, fs, fp_backend,
                   stopped_early, load, wall_s) -> dict[str, Any]:
    import torch

    from fsdpck.report import versions

    ws = ctx.world_size
    for rep in rec.reps:  # each rank's own sum, so that the slowest rank's resume is one rank's
        rep["bare-resume"] = [sum(parts) for parts in zip(*(rep[n] for n in RESUME_PARTS))]
    slowest = {name: [max(rep[name]) for rep in rec.reps] for name in rec.reps[0]}
    written = sizes.per_rank["written"]
    view2 = [2 * v for v in sizes.per_rank["view"]]
    phase_bytes = {n: (sizes.total, written) for n in ("raw-write", "raw-read", "bare-save", "bare-load", "bare-resume", "fsdpck-save",
                                                     "fsdpck-save-dcp", "fsdpck-load", "fsdpck-load-dcp", "state-entries")}
    phase_bytes.update({n: (sum(view2), view2) for n in ("compare", "fingerprint")})
    phases: dict[str, Any] = {}
    for name, times in slowest.items():
        entry: dict[str, Any] = {"label": PHASES.get(name, name), "per_rep_per_rank_s": [rep[name] for rep in rec.reps],
                                 "per_rep_per_rank_cpu_s": [rep.get(name) for rep in rec.cpu_reps],
                                 "slowest_s": times, **{f"{k}_s": v for k, v in _stats(times).items()}}
        if name in phase_bytes:
            total, per_rank = phase_bytes[name]
            entry["bytes"] = total
            entry["bytes_per_rank"] = per_rank
            med = entry["median_s"]
            entry["gbps"] = total / med / 1e9 if med > 0 else None
            # Each rank's own bytes over its own time, the slowest of them (median over repetitions).
            entry["gbps_per_rank"] = statistics.median(
                min(b / t / 1e9 for b, t in zip(per_rank, rep[name]) if t > 0) if any(t > 0 for t in rep[name]) else 0.0
                for rep in rec.reps)
        phases[name] = entry

    def ratio(num: list[str], den: list[str]) -> list[float]:
        return [sum(slowest[n][i] for n in num) / sum(slowest[d][i] for d in den) for i in range(len(rec.reps))]

    specs = targets_for(ctx.device.type)
    per_rep = {
        "save_vs_bare": ratio(["fsdpck-save"], ["bare-save"]),
        "load_vs_bare": ratio(["fsdpck-load"], ["bare-load"]),
        "load_vs_resume": ratio(["fsdpck-load"], ["bare-resume"]),
        "save_vs_disk": ratio(["raw-write"], ["fsdpck-save"]),  # same bytes: GB/s ratio = inverse time ratio
        "load_vs_disk": ratio(["raw-read"], ["fsdpck-load"]),
        "check_cost": ratio(["fingerprint", "compare"], ["fsdpck-save", "fsdpck-load"]),
        "fingerprint_gbps_per_rank": fp_rate[0],
        "fingerprint_gb_per_cpu_s": fp_rate[1],
    }
    if "fsdpck-load-dcp" in slowest:
        per_rep["load_dcp_vs_bare"] = ratio(["fsdpck-load-dcp"], ["bare-load"])
    threads = torch.get_num_threads()
    ratios: dict[str, Any] = {}
    for key, spec in specs.items():
        if key == "memory" or key not in per_rep:
            continue
        s = _stats(per_rep[key])
        value = s["median"]
        ratios[key] = {"label": spec["label"], "per_rep": per_rep[key], **s, "target": spec.get("target"),
                       "target_text": spec["text"], "compared": value, "met": _met(value, spec)}
    fp = ratios["fingerprint_gbps_per_rank"]
    fp["per_cpu_second"] = ratios["fingerprint_gb_per_cpu_s"]["median"]
    fp["backend"] = fp_backend
    fp["copy_gbps_per_rank"] = copy_gbps
    fp["vs_copy"] = fp["median"] / copy_gbps if copy_gbps else None

    gpu = ctx.device.type == "cuda"
    per_rank_mem = []
    for r in range(ws):
        rss_all, cuda_all, base, warm = mem[r][0][:4]
        share = sizes.per_rank["held"][r]
        phases_r = {n: dict(zip(("rss", "cuda_max_allocated", "rss_rep0", "cuda_max_allocated_rep0", "rss_at_start_rep0"),
                                mem[r][1 + i][:5])) for i, n in enumerate(phase_names)}
        # The target's figure: fsdpck's own phases, measured where no bare DCP path has run before them.
        own = {n: v for n, v in phases_r.items() if n in FSDPCK_PHASES}
        measured = rec.memory.per_phase and own
        rss = max(v["rss_rep0"] for v in own.values()) if measured else rss_all
        cuda = max(v["cuda_max_allocated_rep0"] for v in own.values()) if measured else cuda_all
        peak_key = "cuda_max_allocated_rep0" if gpu else "rss_rep0"
        per_rank_mem.append({
            "rank": r, "share_bytes": share, "rss_baseline": base, "rss_warm": warm,
            "rss_peak": rss, "cuda_max_allocated": cuda,
            "rss_ratio": (rss - warm) / share if share else None,
            "rss_ratio_setup": (rss - base) / share if share else None,
            "cuda_ratio": cuda / share if share and gpu else None,
            "peak_phase": max(own, key=lambda n: own[n][peak_key]) if measured else None,
            "process": {"rss_peak": rss_all, "cuda_max_allocated": cuda_all,
                        "rss_ratio": (rss_all - warm) / share if share else None,
                        "cuda_ratio": cuda_all / share if share and gpu else None,
                        "peak_phase": max(phases_r, key=lambda n: phases_r[n]["cuda_max_allocated" if gpu else "rss"])},
            "phases": phases_r,
        })
    key = "cuda_ratio" if gpu else "rss_ratio"
    worst = max(m[key] for m in per_rank_mem if m[key] is not None)
    memory = {
        "label": specs["memory"]["label"],
        "basis": ("CUDA max allocated / share" if gpu else "(peak RSS − RSS after the warm-up) / share"),
        "scope": ("fsdpck's phases in repetition 0, before any bare DCP path ran" if rec.memory.per_phase else
                  "the whole process, bare DCP's paths included: VmHWM cannot be reset here"),
        "baselines": {"rss_baseline": "peak RSS right after process-group set-up (what fsdpck verify reports)",
                      "rss_warm": "RSS after a tiny untimed round trip: PyTorch's modules, pools and kernels loaded"},
        "per_rank": per_rank_mem, "ratio_max": worst,
        "rss_ratio_max": max(m["rss_ratio"] for m in per_rank_mem),
        "rss_ratio_setup_max": max(m["rss_ratio_setup"] for m in per_rank_mem),
        "process_ratio_max": max(m["process"][key] for m in per_rank_mem if m["process"][key] is not None),
        "target": 2.2, "target_text": "≤ 2.2", "met": worst <= 2.2,
    }

    device_name = torch.cuda.get_device_name(ctx.device) if ctx.device.type == "cuda" else platform.processor() or platform.machine()
    return {
        "schema": SCHEMA,
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "hostname": socket.gethostname(),
        "versions": {**versions(), "cuda": torch.version.cuda},
        "device": str(ctx.device.type),
        "device_name": device_name,
        "backend": ctx.backend,
        "world_size": ws,
        "nodes": ctx.node_count,
        "threads_per_rank": threads,
        "cpu_count": os.cpu_count(),
        "loadavg": {"start": list(load[0]), "end": list(load[1])},
        "dir": {**fs, "given": args.dir},
        "flow": flow.as_dict(),
        "writer": {"thread_count": writer.thread_count, "sync_files": writer.sync_files,
                   "single_file_per_rank": writer.single_file_per_rank},
        "dims": dims.as_list(),
        "width": width,
        "reps": len(rec.reps),
        "reps_requested": args.reps,
        "stopped_early": stopped_early,
        "state_bytes": sizes.total,
        "keys": sizes.keys,
        "object_keys": sizes.objects,
        "rank_bytes": {"held": sizes.per_rank["held"], "written": written, "fingerprinted": view2},
        "checkpoint_dir_bytes": dir_bytes,
        "once": {n: {"per_rank_s": once[n], "slowest_s": max(once[n])} for n in ONCE},
        "phases": phases,
        "ratios": ratios,
        "memory": memory,
        "page_cache": {"note": CACHE_NOTE, "resident_after_drop": resident},
        "verified": verified,
        "bare_load_matched": bare_matched,
        "wall_s": wall_s,
        "exit_code": 0 if verified else 1,
    }


def _fmt_s(x: float) -> str:
    return f"{x:.3f}" if x < 100 else f"{x:.1f}"


def _fmt_num(x: float) -> str:
    """Three significant digits, however small (tiny test runs have tiny rates)."""
    return f"{x:.3g}" if abs(x) < 1000 else f"{x:.0f}"


def _fmt_frac(values: list[float | None]) -> str:
    known = [v for v in values if v is not None]
    return f"{100 * max(known):.0f}%" if known else "unknown"


def render(doc: dict[str, Any]):
    """The three tables and the verdict, as renderables."""
    from rich.console import Group
    from rich.table import Table

    from fsdpck.report import human_bytes

    head = (f"fsdpck bench · {doc['date']} · {doc['hostname']} · torch {doc['versions']['torch']}\n"
            f"{doc['device']} ({doc['device_name']}) × {doc['world_size']} ranks, {doc['threads_per_rank']} thread(s) each, "
            f"{doc['cpu_count']} CPUs, load average {doc['loadavg']['start'][0]:.1f} → {doc['loadavg']['end'][0]:.1f}\n"
            f"state {human_bytes(doc['state_bytes'])} (width {doc['width']}, dims {doc['dims']}, fsdp{doc['flow']['fsdp']} "
            f"{doc['flow']['api']}, {doc['flow']['optimizer']} {doc['flow']['dtype']}), {doc['reps']} rep(s)\ndir "
            f"{doc['dir']['path']} on {doc['dir']['fstype']} ({doc['dir']['device']}, {human_bytes(doc['dir']['free_bytes'])} free)")

    phases = Table(title="phases: slowest rank, seconds", title_justify="left")
    for col in ("phase", "median", "min–max", "GB/s", "GB/s per rank"):
        phases.add_column(col, justify="left" if col == "phase" else "right")
    for name in PHASES:
        p = doc["phases"].get(name)
        if p is None:
            continue
        gb, gbr = p.get("gbps"), p.get("gbps_per_rank")
        phases.add_row(p["label"], _fmt_s(p["median_s"]), f"{_fmt_s(p['min_s'])}–{_fmt_s(p['max_s'])}",
                       _fmt_num(gb) if gb is not None else "", _fmt_num(gbr) if gbr is not None else "")

    ratios = Table(title="ratios: median of per-repetition ratios", title_justify="left")
    for col in ("ratio", "median", "min–max", "target", "met"):
        ratios.add_column(col, justify="left" if col in ("ratio", "target") else "right")
    for r in doc["ratios"].values():
        met = {True: "met", False: "MISSED", None: ""}[r["met"]]
        ratios.add_row(r["label"], _fmt_num(r["median"]), f"{_fmt_num(r['min'])}–{_fmt_num(r['max'])}", r["target_text"], met)
    m = doc["memory"]
    ratios.add_row(m["label"] if doc["device"] != "cuda" else "memory: CUDA max allocated / share", _fmt_num(m["ratio_max"]),
                   "", m["target_text"], "met" if m["met"] else "MISSED")

    gpu = doc["device"] == "cuda"
    memory = Table(title=f"peak memory per rank: {m['scope']}; target ratio {m['basis']}", title_justify="left")
    columns = ["rank", "share", "RSS set-up", "RSS warm", "RSS peak", "−warm /share", "−set-up /share"]
    columns += ["CUDA max", "CUDA /share"] if gpu else []
    for col in columns + ["peak in", "whole run"]:
        memory.add_column(col, justify="right")
    for r in m["per_rank"]:
        cells = [str(r["rank"]), human_bytes(r["share_bytes"]), human_bytes(r["rss_baseline"]), human_bytes(r["rss_warm"]),
                 human_bytes(r["rss_peak"]), _fmt_num(r["rss_ratio"]) if r["rss_ratio"] is not None else "",
                 _fmt_num(r["rss_ratio_setup"]) if r["rss_ratio_setup"] is not None else ""]
        if gpu:
            cells += [human_bytes(r["cuda_max_allocated"]), _fmt_num(r["cuda_ratio"]) if r["cuda_ratio"] is not None else ""]
        whole = r["process"]["cuda_ratio" if gpu else "rss_ratio"]
        cells += [r["peak_phase"] or "?", _fmt_num(whole) if whole is not None else ""]
        memory.add_row(*cells)
    where = sorted({r["process"]["peak_phase"] for r in m["per_rank"]})
    memory.caption = f"whole run: the same ratio over every phase, bare DCP's included (peak in {', '.join(where)})"
    memory.caption_justify = "left"

    fp = doc["ratios"]["fingerprint_gbps_per_rank"]
    fp_line = (f"fingerprint ({fp['backend']}): {_fmt_num(fp['median'])} GB/s per rank "
               f"({doc['threads_per_rank']} intra-op thread(s)), {_fmt_num(fp['per_cpu_second'])} GB per CPU-second; "
               f"dst.copy_(src) on the same device, every rank at once: {_fmt_num(fp['copy_gbps_per_rank'])} GB/s per rank, "
               f"so the fingerprint runs at {100 * (fp['vs_copy'] or 0):.2g}% of memory-copy speed.")
    res = doc["page_cache"]["resident_after_drop"]
    notes = (f"page cache after the drop, worst: disk file {_fmt_frac(res['raw'])}, bare checkpoint {_fmt_frac(res['bare'])}, "
             f"fsdpck checkpoint {_fmt_frac(res['fsdpck'])} resident. Note: {CACHE_NOTE}.")
    missed = [r["label"].strip() for r in doc["ratios"].values() if r["met"] is False] + (["memory"] if not m["met"] else [])
    verdict = ("fsdpck bench: round trip VERIFIED in every repetition" if doc["verified"]
               else "fsdpck bench: round trip DIFFERS (exit 1)")
    verdict += f"; targets missed: {', '.join(missed)}" if missed else "; every target met"
    if doc["stopped_early"]:
        notes += f"\n{doc['stopped_early']}."
    return Group(head, "", phases, "", ratios, fp_line, "", memory, "", notes), verdict


def markdown(docs: list[dict[str, Any]]) -> str:
    """The tables of docs/benchmarks.md from one or more JSON documents (one column each)."""
    names = [f"{d['device']} ×{d['world_size']}, {d['state_bytes'] / 1e9:.3g} GB, fsdp{d['flow']['fsdp']} {d['flow']['api']}"
             for d in docs]
    out = ["| phase: slowest rank, s | " + " | ".join(f"{n}: median (min–max) · GB/s" for n in names) + " |",
           "| --- |" + " --- |" * len(docs)]
    for key, label in PHASES.items():
        cells = []
        for d in docs:
            p = d["phases"].get(key)
            gb = f" · {_fmt_num(p['gbps'])}" if p and p.get("gbps") is not None else ""
            cells.append(f"{p['median_s']:.2f} ({p['min_s']:.2f}–{p['max_s']:.2f}){gb}" if p else "")
        out.append(f"| {'↳ ' + label.strip() if label.startswith('  ') else label} | " + " | ".join(cells) + " |")
    out += ["", "| ratio | target | " + " | ".join(f"{n}: median (min–max)" for n in names) + " |",
            "| --- | --- |" + " --- |" * len(docs)]
    for key, first in docs[0]["ratios"].items():
        cells = []
        for d in docs:
            r = d["ratios"].get(key)
            met = {True: " **met**", False: " **missed**", None: ""}[r["met"]] if r else ""
            cells.append(f"{_fmt_num(r['median'])} ({_fmt_num(r['min'])}–{_fmt_num(r['max'])}){met}" if r else "")
        out.append(f"| {first['label'].strip()} | {first['target_text']} | " + " | ".join(cells) + " |")
    cells = [f"{_fmt_num(d['memory']['ratio_max'])} **{'met' if d['memory']['met'] else 'missed'}** "
             f"(whole run {_fmt_num(d['memory']['process_ratio_max'])})" for d in docs]
    out.append(f"| memory: {docs[0]['memory']['basis']} | ≤ 2.2 | " + " | ".join(cells) + " |")
    out.append("")
    for n, d in zip(names, docs):
        m, fp = d["memory"]["per_rank"], d["ratios"]["fingerprint_gbps_per_rank"]
        worst = max(m, key=lambda r: r["cuda_ratio" if d["device"] == "cuda" else "rss_ratio"] or 0)
        cuda = (f", CUDA max allocated {worst['cuda_max_allocated'] / 1e9:.3g} GB" if d["device"] == "cuda" else "")
        out.append(
            f"- {n}: {d['reps']} rep(s) of {d['reps_requested']}; {d['date']} on {d['hostname']} ({d['device_name']}), "
            f"torch {d['versions']['torch']}, {d['threads_per_rank']} thread(s) per rank, load average "
            f"{d['loadavg']['start'][0]:.1f}→{d['loadavg']['end'][0]:.1f}; dir on {d['dir']['fstype']} ({d['dir']['device']}); "
            f"share {worst['share_bytes'] / 1e6:.0f} MB per rank, RSS after set-up {worst['rss_baseline'] / 1e6:.0f} MB, "
            f"after warm-up {worst['rss_warm'] / 1e6:.0f} MB, peak {worst['rss_peak'] / 1e9:.3g} GB in {worst['peak_phase']}{cuda}; "
            f"fingerprint ({fp['backend'].split(':')[0]}) {_fmt_num(fp['median'])} GB/s per rank, "
            f"{_fmt_num(fp['per_cpu_second'])} GB per CPU-second, copy_ {_fmt_num(fp['copy_gbps_per_rank'])} GB/s per rank; "
            f"round trip verified: {d['verified']}; wall {d['wall_s']:.0f} s")
    return "\n".join(out)


# --- entry point ---------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--markdown"]:
        # No process group: turn JSON documents written by --json into docs/benchmarks.md's tables.
        import json

        if len(argv) < 2:
            print("usage: bench.py --markdown RUN.json [RUN.json ...]", file=sys.stderr)
            return 2
        print(markdown([json.loads(Path(f).read_text()) for f in argv[1:]]))
        return 0
    args = parse_args(argv)
    from fsdpck import dist as fdist
    from fsdpck.errors import EXIT_RUNTIME, FsdpckError
    from fsdpck.output import make_console, write_json
    from fsdpck.runner import captured_warnings

    ctx, code, doc = None, EXIT_RUNTIME, None
    err = make_console(stderr=True)
    with captured_warnings() as seen:
        try:
            import torch

            if args.threads:
                torch.set_num_threads(args.threads)
            ctx = fdist.setup(device=args.device, timeout_s=args.timeout)
            doc = run_bench(args, ctx)
            code = doc["exit_code"]
        except FsdpckError as e:
            fdist.mark_exiting()
            code = e.exit_code
            err.print(f"fsdpck bench: error on rank {fdist.env_rank()}: {e.message}", markup=False)
        except BaseException as e:
            fdist.mark_exiting()
            code = EXIT_RUNTIME
            import traceback

            traceback.print_exc()
            if ctx is not None and ctx.world_size > 1:
                fdist.record_failure(ctx, phase="bench", message=f"{type(e).__name__}: {e}", code=code)
    if doc is not None and fdist.env_rank() == 0:
        doc["warnings"] = sum(seen.values())
        if args.verbose:
            for (category, message), n in seen.items():
                err.print(f"{category} ×{n}: {message}", markup=False)
        out = make_console(stderr=args.json == "-")
        report, verdict = render(doc)
        out.print(report, markup=False)
        out.print(verdict, markup=False, highlight=False, soft_wrap=True)  # one greppable line, never wrapped
        if args.json:
            write_json(args.json, doc)
    sys.stdout.flush()
    sys.stderr.flush()
    if fdist.needs_hard_exit():
        os._exit(code)  # as fsdpck's CLI: tearing gloo down at exit sometimes aborts
    fdist.teardown()
    return code


if __name__ == "__main__":
    sys.exit(main())
