"""The benchmark's helpers for the disk, the page cache and memory (scripts/bench.py runs them).

- the raw disk: write a rank's share of bytes with fsync, drop a file's pages from the page
  cache (``posix_fadvise(DONTNEED)``), ask how much of it is still resident (``mincore``) and
  read it back; the mount a path lives on (``/proc/mounts``);
- memory: this process's peak RSS since the last reset (Linux ``VmHWM``, reset through
  ``/proc/self/clear_refs``), its RSS now, and CUDA's peak allocation, per phase and over the
  whole run (:class:`MemoryWatch`); the memory bandwidth of ``dst.copy_(src)``.

Nothing here imports fsdpck; torch only where a tensor is made.
"""

from __future__ import annotations

import ctypes
import mmap
import os
import random
import re
import resource
import shutil
import time
from pathlib import Path
from typing import Any, Callable

IO_CHUNK = 64 << 20  # bytes per write()/readinto() of the raw-disk baseline
CACHE_NOTE = ("reads follow posix_fadvise(DONTNEED) after fsync; where the filesystem does not honour it "
              "(tmpfs, some network filesystems) they may still come partly from the page cache: "
              "the fraction still resident after the drop is measured (mincore) and shown")


# --- the disk and the page cache ---------------------------------------------------------


def io_buffer(nbytes: int, *, seed: int) -> bytearray:
    """Random bytes (a compressing filesystem gains nothing), at most IO_CHUNK of them, writable for readinto."""
    return bytearray(random.Random(seed).randbytes(max(1, min(IO_CHUNK, nbytes))))


def raw_write(path: Path, nbytes: int, chunk: bytearray) -> None:
    """``nbytes`` into a new file through the page cache, ``len(chunk)`` at a time, then fsync."""
    view = memoryview(chunk)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        left = nbytes
        while left:
            left -= os.write(fd, view[: min(left, len(view))])
        os.fsync(fd)
    finally:
        os.close(fd)


def raw_read(path: Path, chunk: bytearray) -> int:
    """Read the whole file into ``chunk`` piece by piece; returns the bytes read."""
    got = 0
    with open(path, "rb", buffering=0) as f:
        while True:
            n = f.readinto(chunk)
            if not n:
                return got
            got += n


def resident_fraction(paths: list[Path]) -> float | None:
    """Fraction of these files' pages in the page cache now (mincore), or None where it cannot be asked."""
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
                resident += pages - bytes(vec).count(0)
                total += pages
            finally:
                mm.close()
        return resident / total if total else None
    except (OSError, AttributeError, ValueError, TypeError):
        return None


def drop_pages(paths: list[Path]) -> float | None:
    """fsync each file and ask the kernel to drop its cached pages; return the fraction still resident."""
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)  # dirty pages cannot be dropped
            if hasattr(os, "posix_fadvise"):
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
    return resident_fraction(paths)


def files_under(path: Path) -> list[Path]:
    return sorted(p for p in Path(path).rglob("*") if p.is_file() and not p.is_symlink())


def filesystem_of(path: Path) -> dict[str, Any]:
    """The mount that holds ``path`` (from /proc/mounts) and its size (statvfs)."""
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


# --- memory ----------------------------------------------------------------------------------


def _status(field: str) -> int | None:
    """A ``kB`` line of /proc/self/status (VmHWM, VmRSS) in bytes, or None off Linux."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def ru_maxrss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def rss_now() -> int:
    """This process's resident set now (VmRSS); its peak so far where that cannot be read."""
    return _status("VmRSS") or ru_maxrss()


def reset_hwm() -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0), so that each phase gets its own peak."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


class MemoryWatch:
    """Peak host RSS and CUDA allocation, per phase and over the whole run.

    Per phase: VmHWM is reset before a phase and read after it; CUDA's peak statistics
    likewise. Over the run: the largest reading of either, ever (getrusage's ru_maxrss stops
    being the lifetime peak once VmHWM has been reset, so the peaks are folded here).
    """

    def __init__(self, device: Any) -> None:
        self.device = device
        self.cuda = device.type == "cuda"
        self.per_phase = reset_hwm()  # also tells whether the reset works here
        self.rss_peak = ru_maxrss()
        self.cuda_peak = 0

    def _cuda_max(self) -> int:
        import torch

        return int(torch.cuda.max_memory_allocated(self.device)) if self.cuda else 0

    def _fold(self) -> None:
        self.rss_peak = max(self.rss_peak, _status("VmHWM") or 0)
        self.cuda_peak = max(self.cuda_peak, self._cuda_max())

    def start(self) -> None:
        self._fold()
        if self.per_phase:
            reset_hwm()
        if self.cuda:
            import torch

            torch.cuda.reset_peak_memory_stats(self.device)

    def stop(self) -> tuple[int, int]:
        """(peak RSS, peak CUDA allocated) since start(); RSS is the lifetime peak where VmHWM cannot be reset."""
        rss = (_status("VmHWM") if self.per_phase else None) or ru_maxrss()
        cuda = self._cuda_max()
        self._fold()
        return rss, cuda

    def overall(self) -> tuple[int, int]:
        self._fold()
        return max(self.rss_peak, 0 if self.per_phase else ru_maxrss()), self.cuda_peak


def copy_seconds(device: Any, nbytes: int, *, sync: Callable[[], None], barrier: Callable[[], None]) -> tuple[int, float]:
    """The memory-bandwidth baseline: ``dst.copy_(src)`` of float32 tensors on ``device``, every rank at
    once (``barrier`` before each); returns (bytes copied, this rank's best of three, seconds)."""
    import torch

    cap = (2 << 30) if device.type == "cuda" else (256 << 20)
    n = max(1 << 20, min(cap, nbytes)) // 4
    src = torch.ones(n, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)  # first touch: page faults and allocation are not bandwidth
    best = float("inf")
    for _ in range(3):
        sync()
        barrier()
        t0 = time.perf_counter()
        dst.copy_(src)
        sync()
        best = min(best, time.perf_counter() - t0)
    del src, dst
    return 4 * n, best
