"""The exact, sharding-invariant fingerprint of a tensor (DESIGN.md, "The fingerprint").

For a tensor of global shape S whose dtype has itemsize k <= 8, every element at global
row-major linear index i with raw bits b (an unsigned k-byte integer, zero-extended to 64
bits) contributes ``h(i, b) = mix(b ^ mix(i + 1))``, where ``mix`` is the SplitMix64
finaliser; the fingerprint is the sum of all contributions modulo 2**64, written as 16
lowercase hex digits.

Because it is a plain sum over (global index, bits) pairs, a shard, a DCP storage chunk or
a piece of either contributes a partial sum computed from its global offsets alone, and
the partial sums of any split add up to the same value. So each rank fingerprints only what
it holds and one collective of scalars (:func:`allreduce_sum_u64`) gives the whole.

Typical use on a rank::

    partial = fp_local(state_dict[fqn])                  # ShardedTensor, DTensor or tensor
    (total,) = allreduce_sum_u64([partial], device=dev)  # same on every rank
    manifest[fqn]["fingerprint"] = to_hex(total)

The work runs on the tensor's own device, through one of three paths that give the same
answer (:func:`backend` says which; ``FSDPCK_FP_BACKEND=torch|c|triton|auto`` forces one):

- ``c`` (CPU tensors): a small C kernel (``_fpkernel.c``), compiled at first use with the
  system C compiler into a per-user cache and called through ctypes; one pass over the data.
- ``triton`` (CUDA tensors): a Triton kernel (:mod:`fsdpck.fingerprint_triton`), where
  triton imports; one pass over the data.
- ``torch`` (everything else, and the fallback when a kernel cannot be had): torch ops in
  bounded pieces (:func:`piece_numel` elements, at most 1 << 22), so that its working memory
  stays a few buffers of that size however large the shard is.

:func:`fp_reference` is a torch-free transcription of the definition that the tests hold
every path to.

Importing this module does not import torch (``fsdpck --help`` stays fast); torch is
imported inside the functions that need it.
"""

from __future__ import annotations

import contextlib
import itertools
import math
import os
import shlex
import shutil
import sys
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

from fsdpck.errors import SetupError

if TYPE_CHECKING:
    import torch

MASK64 = (1 << 64) - 1

# How many elements are processed at once: None picks per device (see piece_numel), an int
# fixes it everywhere (tests set small ones so that pieces split inside chunks). Each piece
# needs up to four int64 buffers of this many elements (index pattern, running hash, shift
# temporary, widened bits), so memory stays bounded whatever the shard size.
PIECE_NUMEL: int | None = None

# On the CPU about this many elements per intra-op thread keeps each thread's share of the
# buffers in its cache while per-op overhead stays small (scripts/bench_fingerprint.py:
# 1 << 18 was fastest on 2 threads of 1 << 14 ... 1 << 20, and 1 << 20 on 16 threads of
# 1 << 18 ... 1 << 22). Never fewer than _CPU_MIN_PIECE, never more than _MAX_PIECE.
_CPU_PIECE_PER_THREAD = 1 << 16
_CPU_MIN_PIECE = 1 << 18
# On an accelerator each op is a kernel launch, so pieces are as large as is still small
# next to its memory: 1 << 22 elements is 128 MiB of buffers.
_MAX_PIECE = 1 << 22

# The SplitMix64 finaliser's multipliers, and the same bits as signed int64 values, which
# is how torch's int64 multiplication (wrapping two's complement, i.e. mod 2**64) takes them.
_MUL1 = 0xBF58476D1CE4E5B9
_MUL2 = 0x94D049BB133111EB


def _to_signed64(x: int) -> int:
    """The int64 value with the same 64 bits as the unsigned ``x``."""
    x &= MASK64
    return x - (1 << 64) if x >= (1 << 63) else x


_MUL1_I64 = _to_signed64(_MUL1)
_MUL2_I64 = _to_signed64(_MUL2)


def _low_bits(n: int) -> int:
    """Mask of the low ``n`` bits: turns torch's arithmetic right shift by 64 - n into a logical one."""
    return (1 << n) - 1


_KEEP_AFTER_30 = _low_bits(64 - 30)
_KEEP_AFTER_27 = _low_bits(64 - 27)
_KEEP_AFTER_31 = _low_bits(64 - 31)


# --- the definition, in plain Python -------------------------------------------------


def mix64(z: int) -> int:
    """SplitMix64's finaliser on an unsigned 64-bit integer (the definition's ``mix``)."""
    z &= MASK64
    z ^= z >> 30
    z = (z * _MUL1) & MASK64
    z ^= z >> 27
    z = (z * _MUL2) & MASK64
    z ^= z >> 31
    return z


def fp_reference(values_bits: Sequence[int], indices: Sequence[int]) -> int:
    """The fingerprint sum over (bits, global index) pairs, straight from the definition, without torch.

    ``values_bits[j]`` is the raw bits of an element as an unsigned integer (already
    zero-extended) and ``indices[j]`` its global row-major linear index. Slow; for tests.
    """
    if len(values_bits) != len(indices):
        raise ValueError(f"fp_reference: {len(values_bits)} values but {len(indices)} indices")
    total = 0
    for b, i in zip(values_bits, indices):
        if not 0 <= b <= MASK64:
            raise ValueError(f"fp_reference: bits {b!r} are not an unsigned 64-bit integer")
        total += mix64(b ^ mix64(i + 1))
    return total & MASK64


def to_hex(x: int) -> str:
    """A fingerprint as the 16 lowercase hex digits the manifest and reports show."""
    if not 0 <= x <= MASK64:
        raise ValueError(f"fingerprint {x!r} is not an unsigned 64-bit integer")
    return f"{x:016x}"


def from_hex(s: str) -> int:
    """The fingerprint that :func:`to_hex` wrote as ``s`` (exactly 16 hex digits)."""
    if not isinstance(s, str) or len(s) != 16:
        raise ValueError(f"fingerprint {s!r} is not 16 hex digits")
    try:
        return int(s, 16)
    except ValueError:
        raise ValueError(f"fingerprint {s!r} is not 16 hex digits") from None


# --- the torch path --------------------------------------------------------------------


def _bits_view(t: torch.Tensor) -> torch.Tensor:
    """``t``'s raw bits as an integer tensor of the same itemsize, ready to widen to 64 bits.

    Itemsizes 1, 2 and 4 become unsigned views, so that widening to int64 zero-extends them
    as the definition asks; itemsize 8 is used as int64 directly, whose bits are already b.
    """
    import torch

    by_itemsize = {1: torch.uint8, 2: torch.uint16, 4: torch.uint32, 8: torch.int64}
    itemsize = t.element_size()
    if itemsize not in by_itemsize:
        raise ValueError(
            f"cannot fingerprint dtype {t.dtype}: itemsize {itemsize} bytes; the fingerprint is defined "
            "for itemsizes 1, 2, 4 and 8"
        )
    if t.dtype == by_itemsize[itemsize]:
        return t
    try:
        return t.view(by_itemsize[itemsize])
    except RuntimeError as e:
        raise ValueError(f"cannot fingerprint dtype {t.dtype}: its raw bits cannot be viewed ({e})") from None


def _mix_(z: torch.Tensor, tmp: torch.Tensor, *, nonnegative: bool = False) -> None:
    """``z = mix(z)`` in place on int64 values (mod 2**64), using ``tmp`` as scratch.

    torch's ``>>`` on int64 is arithmetic, so each shift is masked to make it logical;
    when every value is known to be non-negative (the ``i + 1`` of an index) the first
    shift already is logical and its mask is skipped.
    """
    import torch

    torch.bitwise_right_shift(z, 30, out=tmp)
    if not nonnegative:
        tmp.bitwise_and_(_KEEP_AFTER_30)
    z.bitwise_xor_(tmp)
    z.mul_(_MUL1_I64)
    torch.bitwise_right_shift(z, 27, out=tmp)
    tmp.bitwise_and_(_KEEP_AFTER_27)
    z.bitwise_xor_(tmp)
    z.mul_(_MUL2_I64)
    torch.bitwise_right_shift(z, 31, out=tmp)
    tmp.bitwise_and_(_KEEP_AFTER_31)
    z.bitwise_xor_(tmp)


def _row_major_strides(shape: Sequence[int]) -> list[int]:
    strides = [1] * len(shape)
    for d in range(len(shape) - 2, -1, -1):
        strides[d] = strides[d + 1] * shape[d + 1]
    return strides


def _check_placement(shape: Sequence[int], global_shape: Sequence[int], offsets: Sequence[int]) -> None:
    if not (len(shape) == len(global_shape) == len(offsets)):
        raise ValueError(
            f"chunk of shape {tuple(shape)} at offsets {tuple(offsets)} does not fit global shape "
            f"{tuple(global_shape)}: the number of dims differs"
        )
    if math.prod(shape) == 0:
        # An empty shard (uneven DTensor sharding) may sit at offset == size; it adds nothing.
        return
    for d, (n, o, s) in enumerate(zip(shape, offsets, global_shape)):
        if o < 0 or o + n > s:
            raise ValueError(
                f"chunk of shape {tuple(shape)} at offsets {tuple(offsets)} does not fit global shape "
                f"{tuple(global_shape)} along dim {d}"
            )


def piece_numel(device: torch.device) -> int:
    """How many elements :func:`fp_chunk` processes at once on ``device``."""
    import torch

    if PIECE_NUMEL is not None:
        return max(1, int(PIECE_NUMEL))
    if torch.device(device).type == "cpu":
        return min(_MAX_PIECE, max(_CPU_MIN_PIECE, _CPU_PIECE_PER_THREAD * torch.get_num_threads()))
    return _MAX_PIECE


def fp_chunk(t: torch.Tensor, *, global_shape: Sequence[int], offsets: Sequence[int]) -> int:
    """The partial fingerprint of chunk ``t`` placed at ``offsets`` inside a tensor of ``global_shape``.

    ``t`` may have any strides (non-contiguous views are read in place, not copied), may be
    empty or 0-dim, and may live on any device; the work runs there, through the path that
    :func:`backend` names for that device. Returns an int in [0, 2**64); the partial sums of
    the chunks of any split add up (mod 2**64) to :func:`fp_tensor` of the whole.
    """
    import torch

    global_shape = [int(s) for s in global_shape]
    offsets = [int(o) for o in offsets]
    shape = list(t.shape)
    _check_placement(shape, global_shape, offsets)
    bits = _bits_view(t.detach())
    if bits.numel() == 0:
        return 0
    path = backend(bits.device) if bits.layout == torch.strided else "torch"
    if path == "c":
        dims, base = _layout(shape, bits.stride(), global_shape, offsets)
        if len(dims) <= _C_MAX_DIMS:
            return _fp_chunk_c(bits, dims, base)
    elif path == "triton":
        dims, base = _layout(shape, bits.stride(), global_shape, offsets)
        try:
            return _triton_module().fp_layout(bits, dims, base)
        except Exception as e:  # noqa: BLE001 - any failure of the fast path falls back to torch
            if _requested_backend() == "triton":
                raise
            _triton_failed(bits.device, e)
    return _fp_chunk_torch(bits, shape, global_shape, offsets)


def _fp_chunk_torch(bits: torch.Tensor, shape: list[int], global_shape: list[int], offsets: list[int]) -> int:
    """fp_chunk's torch path: ``bits`` is the chunk's non-empty integer view (see :func:`_bits_view`)."""
    import torch

    if bits.dim() == 0:
        # A 0-dim tensor is one element at global index 0.
        bits, shape, global_shape, offsets = bits.reshape(1), [1], [1], [0]

    numel_per_piece = piece_numel(bits.device)
    strides = _row_major_strides(global_shape)
    ndim = len(shape)

    # Pieces are blocks t[o_0, ..., o_{k-1}, s:s+rows] over the trailing dims k..ndim-1:
    # pick the outermost k whose trailing dims (after k) fit in a piece, so that pieces
    # are large and the Python loop runs about numel / numel_per_piece times.
    k = ndim - 1
    inner = 1
    while k > 0 and inner * shape[k] <= numel_per_piece:
        inner *= shape[k]
        k -= 1
    rows = min(shape[k], max(1, numel_per_piece // inner))

    with torch.no_grad():
        device = bits.device
        i64 = dict(dtype=torch.int64, device=device)
        # pattern[j] = global index of the piece's j-th element (row-major) relative to the
        # piece's first element; the same for every piece of this chunk, so built once.
        pattern = torch.arange(rows, **i64).mul_(strides[k])
        for d in range(k + 1, ndim):
            step = torch.arange(shape[d], **i64).mul_(strides[d])
            pattern = (pattern.unsqueeze(-1) + step).flatten()
        numel = pattern.numel()
        z = torch.empty(numel, **i64)
        tmp = torch.empty(numel, **i64)
        # Bits of itemsize 2 and 4 are widened (zero-extended) into this buffer; bits of
        # itemsize 1 and 8 go straight into the xor, whose int64 result zero-extends uint8.
        widen = bits.dtype in (torch.uint16, torch.uint32)
        wide = torch.empty(numel, **i64) if widen else None
        acc = torch.zeros((), **i64)

        # Offsets of the trailing dims, plus one for the definition's i + 1.
        trailing = 1 + sum(offsets[d] * strides[d] for d in range(k + 1, ndim))
        for outer in itertools.product(*(range(shape[d]) for d in range(k))):
            lead = trailing + sum((offsets[d] + outer[d]) * strides[d] for d in range(k))
            for start in range(0, shape[k], rows):
                piece = bits[outer + (slice(start, start + rows),)]
                n = piece.numel()
                zp, tp = z[:n], tmp[:n]
                torch.add(pattern[:n], lead + (offsets[k] + start) * strides[k], out=zp)
                _mix_(zp, tp, nonnegative=True)
                zv = zp.view(piece.shape)
                if widen:
                    wv = wide[:n].view(piece.shape)
                    wv.copy_(piece)
                    zv.bitwise_xor_(wv)
                else:
                    zv.bitwise_xor_(piece)
                _mix_(zp, tp)
                # int64 sums wrap mod 2**64, which is the arithmetic the definition wants;
                # accumulating on the device avoids a host sync per piece on CUDA.
                acc.add_(zp.sum())
        return int(acc.item()) & MASK64


# --- the fast paths: a C kernel on the CPU, a Triton kernel on CUDA ------------------------
#
# Both read each element once and keep the arithmetic in registers, where the torch path
# makes ~25 passes over int64 temporaries; both take the chunk as _layout's dims. Either one
# that cannot be had (no compiler, no triton, a failed self-check) leaves its device on the
# torch path, silently: the answer is the same, only slower. backend() says which path runs.

BACKEND_ENV = "FSDPCK_FP_BACKEND"
_BACKEND_CHOICES = ("auto", "torch", "c", "triton")

_C_SOURCE = Path(__file__).with_name("_fpkernel.c")
# No -march=native: one cached library must run on every node that shares the home dir; the
# source clones its entry point per ISA instead (see _fpkernel.c). The second set is the retry
# where those clones do not build or load (no ifunc support: musl, some compilers).
_C_FLAG_SETS = (("-O3", "-shared", "-fPIC"), ("-O3", "-shared", "-fPIC", "-DFSDPCK_NO_CLONES"))
_C_COMPILE_TIMEOUT_S = 120
_C_MAX_DIMS = 64  # FSDPCK_MAX_DIMS in _fpkernel.c
# Below this many elements per thread, splitting a chunk over threads costs more than it saves.
_C_MIN_PER_THREAD = 1 << 20

_lock = threading.Lock()
# (ctypes function or None, the library's path or None, a line saying what was found).
_c_state: tuple[Any, Path | None, str] | None = None
# Loaded libraries, kept alive while their functions may be called.
_c_libraries: list[Any] = []
# (ThreadPoolExecutor, its size, the pid that made it) for splitting large CPU chunks.
_c_pool: tuple[Any, int, int] | None = None
# Per CUDA device (and "cpu" under Triton's interpreter): (usable, a line saying why or why not).
_triton_state: dict[str, tuple[bool, str]] = {}


def _requested_backend() -> str:
    raw = os.environ.get(BACKEND_ENV, "")
    value = raw.strip().lower() or "auto"
    if value not in _BACKEND_CHOICES:
        raise SetupError(f"{BACKEND_ENV}={raw!r} is not one of {', '.join(_BACKEND_CHOICES)}")
    return value


def backend(device: Any) -> str:
    """Which path fingerprints tensors on ``device``: ``"c"``, ``"triton"`` or ``"torch"``.

    By default (``FSDPCK_FP_BACKEND`` unset or ``auto``): the C kernel for CPU tensors where it
    compiles (or is cached), loads and passes its self-check; the Triton kernel for CUDA tensors
    where triton imports and the kernel passes its self-check on that device; torch otherwise.
    ``FSDPCK_FP_BACKEND=torch|c|triton`` forces a path for the devices it serves (``c``: CPU;
    ``triton``: CUDA, and CPU when Triton runs its interpreter, ``TRITON_INTERPRET=1``), other
    devices keeping torch, and raises :class:`~fsdpck.errors.SetupError` where it cannot be had.
    The first call for a device may compile its kernel (about a second; cached across runs).
    """
    import torch

    requested = _requested_backend()
    device = torch.device(device)
    if requested == "torch":
        return "torch"
    if device.type == "cpu" and requested in ("auto", "c"):
        fn, _, why = _c_kernel()
        if fn is not None:
            return "c"
        if requested == "c":
            raise SetupError(f"{BACKEND_ENV}=c, but the C kernel is not available: {why}")
        return "torch"
    triton_serves = device.type == "cuda" or (device.type == "cpu" and _triton_interpreting())
    if requested in ("auto", "triton") and triton_serves:
        ok, why = _triton_ready(device)
        if ok:
            return "triton"
        if requested == "triton":
            raise SetupError(f"{BACKEND_ENV}=triton, but the Triton kernel is not available on {device}: {why}")
    return "torch"


def backend_detail(device: Any) -> str:
    """:func:`backend`'s answer for ``device`` and why: the library and ISA, or why torch; for reports."""
    import torch

    device = torch.device(device)
    path = backend(device)
    requested = _requested_backend()
    if path == "c":
        return f"c: {_c_kernel()[2]}"
    if path == "triton":
        return f"triton: {_triton_state[_device_key(device)][1]}"
    if requested == "torch":
        return f"torch: forced by {BACKEND_ENV}=torch"
    if requested != "auto":
        return f"torch: {BACKEND_ENV}={requested} does not serve {device.type} tensors"
    if device.type == "cpu":
        return f"torch: no C kernel: {_c_kernel()[2]}"
    if device.type == "cuda":
        return f"torch: no Triton kernel: {_triton_state[_device_key(device)][1]}"
    return f"torch: the only path for {device.type} tensors"


def _layout(
    shape: Sequence[int], strides: Sequence[int], global_shape: Sequence[int], offsets: Sequence[int]
) -> tuple[list[tuple[int, int, int]], int]:
    """A chunk as the kernels take it: (size, memory stride, global stride) dims and a base index.

    ``base`` is the global index of the chunk's first element. Size-1 dims are dropped (they
    only move the base), the rest ordered by memory stride, largest first, so that the
    innermost loop walks memory in the smallest steps whatever the layout (a column-major
    chunk is read along its columns); neighbours that are contiguous in memory and in the
    global index merge into one dim, so that a contiguous slice of whole rows is one run.
    Every element's global index is base + sum(j_d * g_d) in any dim order, which is all the
    sum needs.
    """
    gstrides = _row_major_strides(global_shape)
    base = sum(o * g for o, g in zip(offsets, gstrides))
    dims = sorted(((n, s, g) for n, s, g in zip(shape, strides, gstrides) if n != 1), key=lambda d: -abs(d[1]))
    merged: list[tuple[int, int, int]] = []
    for n, s, g in dims:
        if merged and merged[-1][1] == s * n and merged[-1][2] == g * n:
            merged[-1] = (merged[-1][0] * n, s, g)
        else:
            merged.append((n, s, g))
    return merged, base


# --- the C kernel ------------------------------------------------------------------------


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


def _c_kernel() -> tuple[Any, Path | None, str]:
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


def _fp_chunk_c(bits: torch.Tensor, dims: list[tuple[int, int, int]], base: int) -> int:
    """The C kernel over a CPU chunk, split over torch's intra-op thread count when it is large.

    ctypes releases the GIL for the call, so the parts run in parallel; they are ranges of
    the outermost dim, each a chunk of its own with its own base.
    """
    import torch

    fn, _, _ = _c_kernel()
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


# --- the Triton kernel -------------------------------------------------------------------


def _device_key(device: Any) -> str:
    import torch

    device = torch.device(device)
    if device.type == "cuda" and device.index is None and torch.cuda.is_available():
        device = torch.device("cuda", torch.cuda.current_device())
    return str(device)


def _triton_module() -> Any:
    from fsdpck import fingerprint_triton

    return fingerprint_triton


def _triton_interpreting() -> bool:
    try:
        return bool(_triton_module().interpreting())
    except Exception:  # noqa: BLE001 - no usable triton means no interpreter either
        return False


def _triton_ready(device: Any) -> tuple[bool, str]:
    """Whether the Triton kernel runs right on ``device``: imported, compiled and self-checked once per device."""
    key = _device_key(device)
    with _lock:
        if key not in _triton_state:
            _triton_state[key] = _check_triton(key)
        return _triton_state[key]


def _check_triton(device: str) -> tuple[bool, str]:
    import torch

    try:
        module = _triton_module()
    except Exception as e:  # noqa: BLE001 - ImportError, or a triton that breaks on import
        return False, f"triton does not import: {type(e).__name__}: {e}"
    try:
        # The kernel against the torch path on this device, in the variants that matter: every
        # itemsize on a contiguous run (the common case), rows of a 2-D slice, and a strided
        # 3-D chunk (outer dims split by division, memory stride 3). More than one tile each.
        gen = torch.Generator().manual_seed(0)
        data = torch.randint(0, 256, (2 * 3 * 1100 * 8,), generator=gen, dtype=torch.uint8)
        cases = []
        for dtype in (torch.uint8, torch.uint16, torch.uint32, torch.int64):
            full = data.view(dtype)[: 2 * 3 * 1100].reshape(2, 3, 1100).to(device)
            cases.append((full, (0, 0, 0), full.shape))
            if dtype == torch.uint16:
                cases.append((full[1, :, 7:1000], (1, 7), (3, 1100)))
            if dtype == torch.int64:
                cases.append((full[:, 1:, 5:900:3], (0, 1, 5), full.shape))
        for chunk, offsets, global_shape in cases:
            shape = list(chunk.shape)
            dims, base = _layout(shape, chunk.stride(), global_shape, offsets)
            got = module.fp_layout(chunk, dims, base)
            expected = _fp_chunk_torch(chunk, shape, list(global_shape), list(offsets))
            if got != expected:
                return False, f"self-check failed for {chunk.dtype}, shape {shape}: {got:016x} != {expected:016x}"
    except Exception as e:  # noqa: BLE001 - compile or launch failure: keep torch
        return False, f"self-check raised {type(e).__name__}: {e}"
    return True, f"triton {getattr(module.triton, '__version__', '?')}"


def _triton_failed(device: Any, error: BaseException) -> None:
    """A chunk failed on the Triton path: this device stays on torch from now on."""
    with _lock:
        _triton_state[_device_key(device)] = (False, f"failed on a chunk: {type(error).__name__}: {error}")


def fp_tensor(t: torch.Tensor) -> int:
    """The fingerprint of a whole plain tensor (its own shape is the global shape)."""
    return fp_chunk(t, global_shape=tuple(t.shape), offsets=(0,) * t.dim())


def _is_sharded_tensor(value: Any) -> bool:
    try:
        from torch.distributed._shard.sharded_tensor import ShardedTensor
    except ImportError:
        return False
    return isinstance(value, ShardedTensor)


def _is_dtensor(value: Any) -> bool:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:
        return False
    return isinstance(value, DTensor)


def _fp_sharded_tensor(value: Any) -> int:
    # FSDP1's ShardedTensor: each rank holds disjoint shards, so plain partial sums add up.
    # metadata().size rather than size(): the same global size, without size()'s
    # deprecation warning (DESIGN.md keeps PyTorch's deprecations out of the output).
    global_shape = tuple(value.metadata().size)
    total = 0
    for shard in value.local_shards():
        total += fp_chunk(shard.tensor, global_shape=global_shape, offsets=shard.metadata.shard_offsets)
    return total & MASK64


def _fp_dtensor(value: Any) -> int:
    from torch.distributed.tensor import Replicate, Shard
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    mesh = value.device_mesh
    placements = tuple(value.placements)
    for placement in placements:
        # Partial holds addends rather than values, and _StridedShard's local rows are not
        # one block at one offset; neither fits "a chunk at global offsets".
        if type(placement) not in (Shard, Replicate):
            raise ValueError(
                f"cannot fingerprint a DTensor with placement {placement!r} (placements {placements}); "
                "only Shard(dim) and Replicate are supported"
            )
    coordinate = mesh.get_coordinate()
    if coordinate is None:
        # This rank is not part of the mesh and holds nothing of the value.
        return 0
    for mesh_dim, placement in enumerate(placements):
        # Every coordinate along a replicated mesh dim holds the same data; count it once,
        # at coordinate 0, so that the sum over ranks is the fingerprint of the whole.
        if isinstance(placement, Replicate) and coordinate[mesh_dim] != 0:
            return 0
    global_shape = tuple(value.shape)
    local_shape, global_offset = compute_local_shape_and_global_offset(global_shape, mesh, placements)
    local = value._local_tensor
    if tuple(local.shape) != tuple(local_shape):
        raise ValueError(
            f"DTensor local tensor has shape {tuple(local.shape)} but placements {placements} on mesh "
            f"{tuple(mesh.shape)} give {tuple(local_shape)} for global shape {global_shape}"
        )
    return fp_chunk(local, global_shape=global_shape, offsets=global_offset)


def fp_local(value: Any) -> int:
    """This rank's partial fingerprint of a distributed value; summed over ranks it is the whole's.

    A ``ShardedTensor`` counts its local shards at their shard offsets; a ``DTensor``
    (``Shard(dim)`` / ``Replicate`` placements) counts its local tensor at this rank's global
    offset, empty shards included, and a replicated one only at mesh coordinate 0; a plain
    tensor counts whole (the caller decides on which rank).
    """
    import torch

    if _is_sharded_tensor(value):
        return _fp_sharded_tensor(value)
    if _is_dtensor(value):
        return _fp_dtensor(value)
    if isinstance(value, torch.Tensor):
        return fp_tensor(value)
    raise TypeError(f"cannot fingerprint a {type(value).__name__}: not a tensor, ShardedTensor or DTensor")


def allreduce_sum_u64(values: list[int], *, group: Any = None, device: Any = None) -> list[int]:
    """Sum unsigned 64-bit partial fingerprints over the ranks of ``group``, exactly mod 2**64.

    One ``all_reduce`` of an int64 tensor holding each value as two 32-bit halves: each half
    summed over fewer than 2**31 ranks stays below 2**63, so nothing relies on signed
    overflow. Every rank must pass the same number of values. ``device`` is where the
    collective's tensor lives (CUDA for NCCL, CPU for gloo; by default chosen from the
    group's backend). Without a process group, world size is 1 and the values come back.
    """
    import torch
    import torch.distributed as dist

    for v in values:
        if not 0 <= v <= MASK64:
            raise ValueError(f"allreduce_sum_u64: {v!r} is not an unsigned 64-bit integer")
    if not values or not (dist.is_available() and dist.is_initialized()):
        return [int(v) for v in values]
    if device is None:
        backend = str(dist.get_backend(group))
        if "nccl" in backend and torch.cuda.is_available():
            device = torch.device("cuda", torch.cuda.current_device())
        else:
            device = torch.device("cpu")
    halves = [h for v in values for h in (v & 0xFFFFFFFF, v >> 32)]
    t = torch.tensor(halves, dtype=torch.int64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.SUM, group=group)
    summed = t.tolist()
    return [(summed[2 * j] + (summed[2 * j + 1] << 32)) & MASK64 for j in range(len(values))]
