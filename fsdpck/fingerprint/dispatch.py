"""Which path fingerprints a chunk, and the dispatch to it.

Three paths give the same answer: the torch path (any device), the C kernel (CPU tensors)
and the Triton kernel (CUDA tensors). :func:`backend` says which serves a device;
``FSDPCK_FP_BACKEND=torch|c|triton|auto`` forces one. Small chunks always take the torch
path: compiling a kernel (about a second for C, five for Triton on a fresh node) to hash a
few hundred bytes costs more than it saves (:data:`SMALL_CHUNK_NUMEL`, measured in
docs/benchmarks.md).
"""

from __future__ import annotations

import os
import threading
from typing import TYPE_CHECKING, Any, Sequence

from fsdpck.errors import SetupError
from fsdpck.fingerprint import ckernel
from fsdpck.fingerprint.torch_path import bits_view, check_placement, fp_chunk_torch, row_major_strides

if TYPE_CHECKING:
    import torch

BACKEND_ENV = "FSDPCK_FP_BACKEND"
_BACKEND_CHOICES = ("auto", "torch", "c", "triton")
# Chunks with fewer elements than this take the torch path whatever the backend: no kernel is
# compiled for them (a pre-flight verify's whole state is a few hundred bytes).
SMALL_CHUNK_NUMEL = 1 << 16

_lock = threading.Lock()
# Per CUDA device (and "cpu" under Triton's interpreter): (usable, a line saying why or why not).
_triton_state: dict[str, tuple[bool, str]] = {}


def fp_chunk(t: torch.Tensor, *, global_shape: Sequence[int], offsets: Sequence[int]) -> int:
    """The partial fingerprint of chunk ``t`` placed at ``offsets`` inside a tensor of ``global_shape``.

    ``t`` may have any strides (non-contiguous views are read in place, not copied), may be
    empty or 0-dim, and may live on any device; the work runs there, through the path that
    :func:`backend` names for that device (the torch path for small chunks). Returns an int in
    [0, 2**64); the partial sums of the chunks of any split add up (mod 2**64) to the
    fingerprint of the whole.
    """
    import torch

    global_shape = [int(s) for s in global_shape]
    offsets = [int(o) for o in offsets]
    shape = list(t.shape)
    check_placement(shape, global_shape, offsets)
    bits = bits_view(t.detach())
    if bits.numel() == 0:
        return 0
    path = "torch"
    if bits.layout == torch.strided and (bits.numel() >= SMALL_CHUNK_NUMEL or _requested_backend() != "auto"):
        path = backend(bits.device)
    if path == "c":
        dims, base = layout(shape, bits.stride(), global_shape, offsets)
        if len(dims) <= ckernel.C_MAX_DIMS:
            return ckernel.fp_chunk_c(bits, dims, base)
    elif path == "triton":
        dims, base = layout(shape, bits.stride(), global_shape, offsets)
        try:
            return _triton_module().fp_layout(bits, dims, base)
        except Exception as e:  # noqa: BLE001 - any failure of the fast path falls back to torch
            if _requested_backend() == "triton":
                raise
            _triton_failed(bits.device, e)
    return fp_chunk_torch(bits, shape, global_shape, offsets)


def fp_chunk_stats(t: torch.Tensor, *, global_shape: Sequence[int],
                   offsets: Sequence[int]) -> tuple[int, tuple[int, float, float | None, float | None] | None]:
    """:func:`fp_chunk`, and where the C path serves the chunk (a large CPU chunk of a floating dtype),
    its statistics from the same pass over memory: (non-finite elements, sum, min, max of the finite
    ones). The statistics are None where that path does not serve: the caller computes them."""
    import torch

    if (t.device.type == "cpu" and t.numel() >= SMALL_CHUNK_NUMEL and t.layout == torch.strided
            and backend(t.device) == "c"):
        global_shape = [int(s) for s in global_shape]
        offsets = [int(o) for o in offsets]
        check_placement(list(t.shape), global_shape, offsets)
        bits = bits_view(t.detach())
        dims, base = layout(list(t.shape), bits.stride(), global_shape, offsets)
        if len(dims) <= ckernel.C_MAX_DIMS:
            got = ckernel.fp_stats_chunk_c(bits, dims, base, str(t.dtype).removeprefix("torch."))
            if got is not None:
                return got
    return fp_chunk(t, global_shape=global_shape, offsets=offsets), None


def fp_piece(piece: Any, *, global_shape: Sequence[int], offsets: Sequence[int]) -> int:
    """:func:`fp_chunk` of a :class:`~fsdpck.checkpoint.piece.Piece` in host memory (complex128 as its
    float64 view: the fingerprint is defined for itemsizes up to 8), without torch where the C kernel
    serves CPU tensors: the same value, by the same kernel."""
    global_shape, offsets = [int(s) for s in global_shape], [int(o) for o in offsets]
    real = piece.real_view() if piece.itemsize > 8 else piece
    if real is not piece:
        global_shape, offsets = [*global_shape, 2], [*offsets, 0]
    if c_kernels_allowed() and _cpu_backend() == "c" and real.itemsize in (1, 2, 4, 8):
        check_placement(list(real.size), global_shape, offsets)
        if real.numel == 0:
            return 0
        dims, base = layout(real.size, real.stride, global_shape, offsets)
        if len(dims) <= ckernel.C_MAX_DIMS:
            got = ckernel.fp_piece_c(real.address, real.itemsize, dims, base)
            if got is not None:
                return got
    return fp_chunk(real.tensor(), global_shape=global_shape, offsets=offsets)


def c_kernels_allowed() -> bool:
    """Whether ``FSDPCK_FP_BACKEND`` lets the C kernels serve CPU memory (``auto`` or ``c``); ``torch``
    (or ``triton``) keeps the offline statistics on torch as well."""
    return _requested_backend() in ("auto", "c")


def _cpu_backend() -> str:
    """:func:`backend` for CPU tensors under ``auto`` or ``c``, without importing torch: ``"c"`` or ``"torch"``."""
    fn, _, why = ckernel.c_kernel()
    if fn is not None:
        return "c"
    if _requested_backend() == "c":
        raise SetupError(f"{BACKEND_ENV}=c, but the C kernel is not available: {why}")
    return "torch"


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
        return _cpu_backend()
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
        return f"c: {ckernel.c_kernel()[2]}"
    if path == "triton":
        return f"triton: {_triton_state[_device_key(device)][1]}"
    if requested == "torch":
        return f"torch: forced by {BACKEND_ENV}=torch"
    if requested != "auto":
        return f"torch: {BACKEND_ENV}={requested} does not serve {device.type} tensors"
    if device.type == "cpu":
        return f"torch: no C kernel: {ckernel.c_kernel()[2]}"
    if device.type == "cuda":
        return f"torch: no Triton kernel: {_triton_state[_device_key(device)][1]}"
    return f"torch: the only path for {device.type} tensors"


def layout(
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
    gstrides = row_major_strides(global_shape)
    base = sum(o * g for o, g in zip(offsets, gstrides))
    dims = sorted(((n, s, g) for n, s, g in zip(shape, strides, gstrides) if n != 1), key=lambda d: -abs(d[1]))
    merged: list[tuple[int, int, int]] = []
    for n, s, g in dims:
        if merged and merged[-1][1] == s * n and merged[-1][2] == g * n:
            merged[-1] = (merged[-1][0] * n, s, g)
        else:
            merged.append((n, s, g))
    return merged, base


def _device_key(device: Any) -> str:
    import torch

    device = torch.device(device)
    if device.type == "cuda" and device.index is None and torch.cuda.is_available():
        device = torch.device("cuda", torch.cuda.current_device())
    return str(device)


def _triton_module() -> Any:
    from fsdpck.fingerprint import triton_kernel

    return triton_kernel


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
            dims, base = layout(shape, chunk.stride(), global_shape, offsets)
            got = module.fp_layout(chunk, dims, base)
            expected = fp_chunk_torch(chunk, shape, list(global_shape), list(offsets))
            if got != expected:
                return False, f"self-check failed for {chunk.dtype}, shape {shape}: {got:016x} != {expected:016x}"
    except Exception as e:  # noqa: BLE001 - compile or launch failure: keep torch
        return False, f"self-check raised {type(e).__name__}: {e}"
    return True, f"triton {getattr(module.triton, '__version__', '?')}"


def _triton_failed(device: Any, error: BaseException) -> None:
    """A chunk failed on the Triton path: this device stays on torch from now on."""
    with _lock:
        _triton_state[_device_key(device)] = (False, f"failed on a chunk: {type(error).__name__}: {error}")
