"""The fingerprint's C kernel for CPU tensors: compiled at first use, cached, called through ctypes.

One pass over the data with the arithmetic in registers, where the torch path makes ~25 passes
over int64 temporaries. ``_fpkernel.c`` is compiled with the system C compiler into a per-user
cache (``$FSDPCK_CACHE``, else ``$XDG_CACHE_HOME/fsdpck``, else ``~/.cache/fsdpck``), keyed by
source, flags and platform, so that nodes sharing a home dir build it once. A library that fails
its self-check against :func:`~fsdpck.fingerprint.reference.fp_reference` is never used; without
a compiler the torch path serves, silently (``fsdpck.fingerprint.dispatch.backend`` says which runs).
"""

from __future__ import annotations

import contextlib
import os
import shlex
import shutil
import sys
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

from fsdpck.fingerprint.reference import MASK64, fp_reference, mix64

if TYPE_CHECKING:
    import torch

_C_SOURCE = Path(__file__).with_name("_fpkernel.c")
# No -march=native: one cached library must run on every node that shares the home dir; the
# source clones its entry point per ISA instead (see _fpkernel.c). The second set is the retry
# where those clones do not build or load (no ifunc support: musl, some compilers).
_C_FLAG_SETS = (("-O3", "-shared", "-fPIC"), ("-O3", "-shared", "-fPIC", "-DFSDPCK_NO_CLONES"))
_C_COMPILE_TIMEOUT_S = 120
C_MAX_DIMS = 64  # FSDPCK_MAX_DIMS in _fpkernel.c
# Below this many elements per thread, splitting a chunk over threads costs more than it saves.
_C_MIN_PER_THREAD = 1 << 20

_lock = threading.Lock()
# (ctypes function or None, the library's path or None, a line saying what was found).
_c_state: tuple[Any, Path | None, str] | None = None
# Loaded libraries, kept alive while their functions may be called.
_c_libraries: list[Any] = []
# The loaded library's fused fingerprint-and-statistics routine, when it passed its self-check.
_c_stats: list[Any] = []
# Codes of the floating dtypes the statistics routine reads (fsdpck_stats in _fpkernel.c).
_STATS_CODES = {"float32": 0, "float64": 1, "bfloat16": 2, "float16": 3}
# The value-statistics routine (fsdpck_value_stats), when it passed its self-check, and its dtype codes.
_c_values: list[Any] = []
VALUE_CODES = {**_STATS_CODES, "int8": 10, "uint8": 11, "bool": 11, "int16": 12, "int32": 13, "int64": 14}
# (ThreadPoolExecutor, its size, the pid that made it) for splitting large CPU chunks.
_c_pool: tuple[Any, int, int] | None = None


def _cache_dir() -> Path:
    """Where compiled kernels are kept: ``$FSDPCK_CACHE``, else ``$XDG_CACHE_HOME/fsdpck``, else ``~/.cache/fsdpck``."""
    if os.environ.get("FSDPCK_CACHE"):
        return Path(os.environ["FSDPCK_CACHE"]).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "fsdpck"


def _c_compiler() -> list[str] | None:
    """The C compiler's command: ``$CC`` when set (and then only it), else cc, gcc or clang from PATH."""
    cc = os.environ.get("CC", "").strip()
    if cc:
        argv = shlex.split(cc)
        return argv if argv and shutil.which(argv[0]) else None
    for name in ("cc", "gcc", "clang"):
        found = shutil.which(name)
        if found:
            return [found]
    return None


def c_kernel() -> tuple[Any, Path | None, str]:
    """The C kernel's function (or None), its library's path, and a line saying what happened; built once."""
    global _c_state
    with _lock:
        if _c_state is None:
            _c_state = _build_c_kernel()
        return _c_state


def _build_c_kernel() -> tuple[Any, Path | None, str]:
    import hashlib
    import platform
    import tempfile

    try:
        source = _C_SOURCE.read_bytes()
    except OSError as e:
        return None, None, f"cannot read {_C_SOURCE}: {e.strerror}"
    # The library depends on the source, the flags and the platform, not on which compiler
    # built it: a node without a compiler uses what another node of the same kind cached.
    libc = os.confstr("CS_GNU_LIBC_VERSION") if "CS_GNU_LIBC_VERSION" in os.confstr_names else ""
    platform_key = f"{sys.platform} {platform.machine()} {libc}".encode()
    cache = _cache_dir()
    scratch = None
    try:
        cache.mkdir(parents=True, exist_ok=True)
        writable = os.access(cache, os.W_OK)
    except OSError:
        writable = False
    compiler = _c_compiler()
    problems = []
    try:
        for flags in _C_FLAG_SETS:
            key = hashlib.sha256(b"\0".join([source, " ".join(flags).encode(), platform_key])).hexdigest()[:20]
            path = cache / f"fpkernel-{key}.so"
            if path.exists():
                fn, why = _load_c_kernel(path)
                if fn is not None:
                    return fn, path, f"{path} (cached; {why})"
                # Left by a run that differs in a way the key misses: build it anew below.
                problems.append(why)
            if compiler is None:
                cc = os.environ.get("CC", "").strip()
                problems.append(f"no C compiler (CC={cc!r} not found)" if cc else "no C compiler (cc, gcc, clang) on PATH")
                break
            if not writable:
                # A read-only cache (a home dir mounted read-only on compute nodes): build into a
                # private dir for this process, removed once loaded (the mapping stays valid).
                scratch = scratch or Path(tempfile.mkdtemp(prefix="fsdpck-"))
                path = scratch / path.name
            why = _compile_c_kernel(compiler, flags, source, path)
            if why is not None:
                problems.append(why)
                continue
            fn, why = _load_c_kernel(path)
            if fn is not None:
                return fn, path, f"{path} ({'compiled' if writable else f'compiled, {cache} not writable'}; {why})"
            problems.append(why)
        return None, None, "; ".join(problems)
    finally:
        if scratch is not None:
            shutil.rmtree(scratch, ignore_errors=True)


def _compile_c_kernel(compiler: list[str], flags: Sequence[str], source: bytes, path: Path) -> str | None:
    """Compile ``source`` into ``path`` atomically; None when done, else why not.

    Many ranks may compile at once into a shared cache: each writes a file of its own and
    renames it into place, so a reader sees either no library or a whole one.
    """
    import secrets
    import subprocess

    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        return f"cannot create the cache dir {path.parent}: {e.strerror} (set FSDPCK_CACHE)"
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    argv = [*compiler, *flags, "-o", str(tmp), "-x", "c", "-"]
    try:
        proc = subprocess.run(argv, input=source, capture_output=True, timeout=_C_COMPILE_TIMEOUT_S, check=False)
        if proc.returncode != 0:
            lines = proc.stderr.decode(errors="replace").strip().splitlines()
            return f"{' '.join(argv)} exited {proc.returncode}: {lines[-1] if lines else 'no message'}"
        os.replace(tmp, path)
        return None
    except subprocess.TimeoutExpired:
        return f"{' '.join(argv)} took longer than {_C_COMPILE_TIMEOUT_S} s"
    except OSError as e:
        return f"{' '.join(argv)}: {e.strerror or e}"
    finally:
        with contextlib.suppress(OSError):
            tmp.unlink()


def _load_c_kernel(path: Path) -> tuple[Any, str]:
    """The kernel function from the library at ``path`` (or None) and its ISA (or why not)."""
    import ctypes

    try:
        lib = ctypes.CDLL(str(path))
        fn = lib.fsdpck_fp_strided
        isa = lib.fsdpck_fp_isa
    except (OSError, AttributeError) as e:
        return None, f"cannot load {path}: {e}"
    i64p = ctypes.POINTER(ctypes.c_int64)
    fn.argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, i64p, i64p, i64p, ctypes.c_uint64]
    fn.restype = ctypes.c_uint64
    isa.argtypes = []
    isa.restype = ctypes.c_char_p
    why = _c_self_check(fn)
    if why is not None:
        return None, f"{path} failed its self-check: {why}"
    stats, fused = getattr(lib, "fsdpck_stats", None), getattr(lib, "fsdpck_fp_stats_strided", None)
    if stats is not None and fused is not None:
        stats.argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.POINTER(ctypes.c_double)]
        stats.restype = ctypes.c_int64
        fused.argtypes = [*fn.argtypes, ctypes.c_int64, ctypes.POINTER(ctypes.c_double)]
        fused.restype = ctypes.c_uint64
        # Statistics that fail their check are left unused; the fingerprint still serves.
        _c_stats[:] = [fused] if _stats_self_check(stats, fn, fused) is None else []
    values = getattr(lib, "fsdpck_value_stats", None)
    if values is not None:
        values.argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.POINTER(ctypes.c_int64),
                           ctypes.POINTER(ctypes.c_double)]
        values.restype = ctypes.c_int64
        _c_values[:] = [values] if _values_self_check(values) is None else []
    _c_libraries.append(lib)
    return fn, f"ISA {isa().decode()}"


def _c_call(fn: Any, address: int, itemsize: int, dims: Sequence[tuple[int, int, int]], base: int) -> int:
    import ctypes

    ndim = len(dims)
    array = ctypes.c_int64 * ndim
    shape = array(*(n for n, _, _ in dims))
    strides = array(*(s for _, s, _ in dims))
    gstrides = array(*(g for _, _, g in dims))
    return int(fn(address, itemsize, ndim, shape, strides, gstrides, base))


def _c_self_check(fn: Any) -> str | None:
    """Hold the loaded kernel to fp_reference on every itemsize, unit-stride and strided, and 0-dim.

    Guards against a miscompiled or mismatched library: a wrong kernel must never be used.
    The runs are long enough to take the vectorised loops and their remainders.
    """
    import ctypes

    by_itemsize = {1: ctypes.c_uint8, 2: ctypes.c_uint16, 4: ctypes.c_uint32, 8: ctypes.c_uint64}
    for itemsize, ctype in by_itemsize.items():
        top = (1 << (8 * itemsize)) - 1
        values = [mix64(j * 0x9E3779B97F4A7C15 + itemsize) & top for j in range(96)]
        buf = (ctype * len(values))(*values)
        address = ctypes.addressof(buf)
        cases = [
            # (first element, dims, base): 67 contiguous elements; a 4 x 9 block, strided in
            # memory and in the global index; one element (0-dim).
            (3, [(67, 1, 1)], 1000),
            (1, [(4, 20, 50), (9, 2, 3)], 7),
            (5, [], 42),
        ]
        for first, dims, base in cases:
            positions = [(first, base)]
            for n, s, g in dims:
                positions = [(p + j * s, i + j * g) for p, i in positions for j in range(n)]
            expected = fp_reference([values[p] for p, _ in positions], [i for _, i in positions])
            got = _c_call(fn, address + first * itemsize, itemsize, dims, base)
            if got != expected:
                return f"itemsize {itemsize}, dims {dims}: {got:016x} != {expected:016x}"
    return None


def fp_chunk_c(bits: torch.Tensor, dims: list[tuple[int, int, int]], base: int) -> int:
    """The C kernel over a CPU chunk (dims and base from ``dispatch.layout``), split over torch's intra-op thread count when it is large.

    ctypes releases the GIL for the call, so the parts run in parallel; they are ranges of
    the outermost dim, each a chunk of its own with its own base.
    """
    import torch

    fn, _, _ = c_kernel()
    itemsize = bits.element_size()
    address = bits.data_ptr()
    parts = min(torch.get_num_threads(), bits.numel() // _C_MIN_PER_THREAD, dims[0][0]) if dims else 1
    if parts <= 1:
        return _c_call(fn, address, itemsize, dims, base)
    n0, s0, g0 = dims[0]
    edges = [n0 * k // parts for k in range(parts + 1)]
    jobs = [
        (address + a * s0 * itemsize, [(b - a, s0, g0), *dims[1:]], base + a * g0) for a, b in zip(edges, edges[1:])
    ]
    pool = _thread_pool(parts)
    return sum(pool.map(lambda job: _c_call(fn, job[0], itemsize, job[1], job[2]), jobs)) & MASK64


def _thread_pool(workers: int) -> Any:
    """A thread pool of at least ``workers`` threads, made again after a fork (whose child has none)."""
    global _c_pool
    from concurrent.futures import ThreadPoolExecutor

    with _lock:
        pool, size, pid = _c_pool if _c_pool is not None else (None, 0, None)
        if pool is None or size < workers or pid != os.getpid():
            if pool is not None and pid == os.getpid():
                pool.shutdown(wait=False)
            pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="fsdpck-fp")
            _c_pool = (pool, workers, os.getpid())
        return pool


def _stats_call(fn: Any, address: int, code: int, n: int) -> tuple[int, float, float, float]:
    import ctypes

    out = (ctypes.c_double * 4)()
    if fn(address, code, n, out) != 0:
        raise ValueError(f"fsdpck_stats does not know dtype code {code}")
    return int(out[0]), out[1], out[2], out[3]


def _fused_call(fused: Any, address: int, itemsize: int, dims: Sequence[tuple[int, int, int]], base: int,
                code: int) -> tuple[int, tuple[int, float, float, float]]:
    import ctypes

    ndim = len(dims)
    array = ctypes.c_int64 * ndim
    out = (ctypes.c_double * 4)()
    fp = fused(address, itemsize, ndim, array(*(n for n, _, _ in dims)), array(*(s for _, s, _ in dims)),
               array(*(g for _, _, g in dims)), base, code, out)
    return int(fp), (int(out[0]), out[1], out[2], out[3])


def _stats_self_check(stats: Any, fn: Any, fused: Any) -> str | None:
    """Hold the statistics to plain Python on each dtype, with NaN and infinities among values that
    fill several vectors and a tail (and, for float32, the unmasked fast path's whole blocks), and
    the fused routine to both the fingerprint and the statistics, contiguous and strided."""
    import ctypes
    import math
    import struct

    finite = [1.5, -2.0, 0.25, 3.0, -0.5, 6.0, 0.0, -8.0, 0.125] * 4  # exact in every format
    clean = [0.5, -1.0, 2.0, 0.25] * 80  # 320 elements: one whole block of the fast path and more
    packs = {"float32": "f", "float64": "d", "float16": "e"}
    for name, code in _STATS_CODES.items():
        for values, exact in ((finite[:17] + [math.nan, math.inf] + finite[17:] + [-math.inf], finite),
                              (clean, clean)):
            if name == "bfloat16":  # the top half of each float32
                raw = b"".join(struct.pack("<f", v)[2:] for v in values)
            else:
                raw = struct.pack(f"<{len(values)}{packs[name]}", *values)
            buf = ctypes.create_string_buffer(raw, len(raw))
            address, itemsize = ctypes.addressof(buf), len(raw) // len(values)
            want = (len(values) - len(exact), math.fsum(exact), min(exact), max(exact))
            got = _stats_call(stats, address, code, len(values))
            if got != want:
                return f"{name}: {got} != {want}"
            for dims in ([(len(values), 1, 1)], [(len(values) // 2, 2, 1)]):
                fp, st = _fused_call(fused, address, itemsize, dims, 5, code)
                if fp != _c_call(fn, address, itemsize, dims, 5):
                    return f"{name}, dims {dims}: the fused fingerprint differs"
                if dims[0][1] == 1 and st != want:
                    return f"{name}, fused: {st} != {want}"
    return None


def fp_stats_chunk_c(bits: torch.Tensor, dims: list[tuple[int, int, int]], base: int,
                     dtype_name: str) -> tuple[int, tuple[int, float, float | None, float | None]] | None:
    """The fingerprint of a CPU chunk (as :func:`fp_chunk_c`) and, in the same pass over memory, the
    statistics of its values: (non-finite elements, sum, min, max of the finite ones; min and max
    None when none is finite). None where the routine does not serve this dtype or did not load."""
    code = _STATS_CODES.get(dtype_name)
    if code is None:
        return None
    c_kernel()
    if not _c_stats:
        return None
    import torch

    fused, itemsize, address = _c_stats[0], bits.element_size(), bits.data_ptr()
    parts = min(torch.get_num_threads(), bits.numel() // _C_MIN_PER_THREAD, dims[0][0]) if dims else 1
    if parts <= 1:
        results = [_fused_call(fused, address, itemsize, dims, base, code)]
    else:
        n0, s0, g0 = dims[0]
        edges = [n0 * k // parts for k in range(parts + 1)]
        jobs = [(address + a * s0 * itemsize, [(b - a, s0, g0), *dims[1:]], base + a * g0)
                for a, b in zip(edges, edges[1:])]
        results = list(_thread_pool(parts).map(
            lambda job: _fused_call(fused, job[0], itemsize, job[1], job[2], code), jobs))
    fp = sum(r[0] for r in results) & MASK64
    nonfinite = sum(r[1][0] for r in results)
    total = sum(r[1][1] for r in results)
    lo, hi = min(r[1][2] for r in results), max(r[1][3] for r in results)
    if nonfinite == bits.numel():
        return fp, (nonfinite, 0.0, None, None)
    return fp, (nonfinite, total, lo, hi)


def fp_piece_c(address: int, itemsize: int, dims: Sequence[tuple[int, int, int]], base: int) -> int | None:
    """The C kernel over memory at ``address`` (dims and base from ``dispatch.layout``), in the calling
    thread; None when the kernel is not available."""
    fn, _, _ = c_kernel()
    return None if fn is None else _c_call(fn, address, itemsize, dims, base)


def value_stats_c(address: int, dtype_name: str, n: int
                  ) -> tuple[tuple[int, int, int, int, int], float | int | None, float | int | None, float, float] | None:
    """The statistics ``inspect --stats`` reports of ``n`` contiguous elements at ``address``:
    ((zeros, nan, +inf, -inf, finite), min, max, mean, m2), min and max of the finite values (ints for
    integer dtypes, None when none is finite); None where the routine does not serve the dtype."""
    import ctypes

    code = VALUE_CODES.get(dtype_name)
    if code is None or n <= 0:
        return None
    c_kernel()
    if not _c_values:
        return None
    counts, moments = (ctypes.c_int64 * 7)(), (ctypes.c_double * 4)()
    if _c_values[0](address, code, n, counts, moments) != 0:
        return None
    finite = counts[4]
    if code >= 10:
        lo, hi = counts[5], counts[6]
    else:
        lo, hi = (moments[0], moments[1]) if finite else (None, None)
    return (counts[0], counts[1], counts[2], counts[3], finite), lo, hi, moments[2], moments[3]


def _values_self_check(routine: Any) -> str | None:
    """Hold the value statistics to plain Python on every code: counts and extremes exactly, the
    mean and m2 to 1e-12 relative, over several blocks with NaN, infinities and signed zeros."""
    import ctypes
    import math
    import struct

    floats = [((j * 7919) % 256 - 128) / 4.0 for j in range(2500)]  # exact in every format, bfloat16 too
    floats[3], floats[2100], floats[2101], floats[2400], floats[17] = math.nan, math.inf, -math.inf, -0.0, 0.0
    ints = [((j * 7919) % 255) - 127 for j in range(2500)]
    packs = {"float32": "f", "float64": "d", "float16": "e", "int8": "b", "uint8": "B", "int16": "h",
             "int32": "i", "int64": "q"}
    for name, code in VALUE_CODES.items():
        if name == "bool":
            continue
        data = floats if code < 10 else [v + 127 for v in ints] if name == "uint8" else ints
        if name == "bfloat16":  # the top half of each float32 (every value above is exact there)
            raw = b"".join(struct.pack("<f", v)[2:] for v in data)
        else:
            raw = struct.pack(f"<{len(data)}{packs[name]}", *data)
        buf = ctypes.create_string_buffer(raw, len(raw))
        counts, moments = (ctypes.c_int64 * 7)(), (ctypes.c_double * 4)()
        if routine(ctypes.addressof(buf), code, len(data), counts, moments) != 0:
            return f"{name}: refused"
        finite = [v for v in data if math.isfinite(v)]
        mean = math.fsum(finite) / len(finite)
        m2 = math.fsum((v - mean) ** 2 for v in finite)
        want = (sum(v == 0 for v in data), sum(math.isnan(v) for v in data), data.count(math.inf),
                data.count(-math.inf), len(finite))
        lo, hi = (counts[5], counts[6]) if code >= 10 else (moments[0], moments[1])
        if tuple(counts[:5]) != want or (lo, hi) != (min(finite), max(finite)):
            return f"{name}: counts {tuple(counts[:5])}, extremes {(lo, hi)}"
        if not (math.isclose(moments[2], mean, rel_tol=1e-12) and math.isclose(moments[3], m2, rel_tol=1e-12)):
            return f"{name}: mean {moments[2]} != {mean} or m2 {moments[3]} != {m2}"
    return None
