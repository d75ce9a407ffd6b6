"""The fingerprint's partial sum over one chunk as a Triton kernel, for CUDA tensors.

:mod:`fsdpck.fingerprint.dispatch` imports this module lazily, only for CUDA tensors and only where
``triton`` imports, and falls back to its torch path if anything here fails. The kernel reads
each element once and does the definition's arithmetic in registers (uint64, wrapping, logical
shifts), where the torch path makes ~25 passes over int64 temporaries.

The chunk comes as the same (size, memory stride, global stride) dims and base global index
that the C kernel takes (``dispatch.layout``): dims ordered so that the last one has the
smallest memory stride, and merged where both strides allow. The kernel takes up to four such
dims as rows x columns, the three outer dims flattened into rows. A tile is ``BLOCK`` elements:
one row's worth of columns or, for short rows (a column slice, a column-major chunk), several
rows of them, its width a power of two (a compiled variant each, made on first use). Each
program sums ``TILES`` tiles in registers, reduces once and writes one partial sum; a launch
covers at most ``MAX_PROGRAMS`` programs, whose partials are summed on the device as int64 (a
wrapping sum, the same mod 2**64). So the kernel's own memory is 64 KiB whatever the chunk's
size. Chunks of more than four dims (rare after merging) loop over the extra outer dims in
Python.

With ``TRITON_INTERPRET=1`` in the environment when triton is imported, the same kernel runs
in Triton's interpreter on CPU tensors: that is how the tests check it without a GPU (in a
subprocess of their own, since the choice is made once per process).
"""

from __future__ import annotations

import contextlib
import functools
import os
from typing import TYPE_CHECKING, Sequence

import triton
import triton.language as tl

if TYPE_CHECKING:
    import torch

# Elements per tile, and tiles per program. 1024 uint64 lanes over 8 warps is 4 per thread:
# enough loads in flight to stream memory, few registers; 8 tiles per program makes each
# program's reduction and store rare. Sized by `scripts/bench_fingerprint.py --device cuda
# --triton-sweep` on an H200 (docs/benchmarks.md): 8 warps over 4 gave 0.540 of copy_ against 0.517.
BLOCK = 1024
TILES = 8
NUM_WARPS = 8
# Programs per launch: enough to fill any current GPU many times over (8192 * 8 tiles of 1024
# is 64 Mi elements a launch), few enough that the partial sums are 64 KiB.
MAX_PROGRAMS = 8192
# Dims the kernel takes; more are looped over in Python.
KERNEL_DIMS = 4


def _fp_kernel(
    ptr, out, start, base,
    n1, n2, n3,
    s0, s1, s2, s3,
    g0, g1, g2, g3,
    rows, first_tile, col_tiles, total_tiles,
    ITEMSIZE: tl.constexpr, UNIT_STRIDE: tl.constexpr, UNIT_GLOBAL: tl.constexpr, OUTER_DIMS: tl.constexpr,
    BLOCK_ROWS: tl.constexpr, BLOCK_COLS: tl.constexpr, TILES: tl.constexpr,
):  # fmt: skip
    # Element (i0, i1, i2, c) of the chunk is at ptr[start + i0*s0 + i1*s1 + i2*s2 + c*s3] and has
    # global index base + i0*g0 + i1*g1 + i2*g2 + c*g3; row r = (i0*n1 + i1)*n2 + i2. A tile is
    # BLOCK_ROWS rows x BLOCK_COLS columns. OUTER_DIMS says how many outer dims there are (0: one
    # row; 1: only i2; 3: all), so that the common cases skip the 64-bit divisions that split a
    # row number. UNIT_STRIDE and UNIT_GLOBAL say that s3 and g3 are 1 (a contiguous row, the
    # common case), sparing an emulated 64-bit multiply per element in a loop that is bound by
    # integer arithmetic, not memory. Integer arguments may arrive as int32; all is widened to
    # int64 before use.
    pid = tl.program_id(0).to(tl.int64)
    start = start.to(tl.int64)
    base = base.to(tl.int64)
    n1 = n1.to(tl.int64)
    n2 = n2.to(tl.int64)
    n3 = n3.to(tl.int64)
    s0 = s0.to(tl.int64)
    s1 = s1.to(tl.int64)
    s2 = s2.to(tl.int64)
    s3 = s3.to(tl.int64)
    g0 = g0.to(tl.int64)
    g1 = g1.to(tl.int64)
    g2 = g2.to(tl.int64)
    g3 = g3.to(tl.int64)
    rows = rows.to(tl.int64)
    first_tile = first_tile.to(tl.int64)
    col_tiles = col_tiles.to(tl.int64)
    total_tiles = total_tiles.to(tl.int64)

    row_lanes = tl.arange(0, BLOCK_ROWS).to(tl.int64)[:, None]
    col_lanes = tl.arange(0, BLOCK_COLS).to(tl.int64)[None, :]
    acc = tl.zeros([BLOCK_ROWS, BLOCK_COLS], dtype=tl.uint64)
    # A constant trip count: the interpreter (numpy 2) cannot range() over a runtime argument.
    for k in range(TILES):
        tile = first_tile + pid * TILES + k
        if OUTER_DIMS == 0:
            r = row_lanes
            c = tile * BLOCK_COLS + col_lanes
        else:
            row_tile = tile // col_tiles
            r = row_tile * BLOCK_ROWS + row_lanes
            c = (tile - row_tile * col_tiles) * BLOCK_COLS + col_lanes
        if OUTER_DIMS == 3:
            i2 = r % n2
            rest = r // n2
            i1 = rest % n1
            i0 = rest // n1
        else:
            i2 = r
            i1 = tl.zeros_like(r)
            i0 = tl.zeros_like(r)
        offset = start + i0 * s0 + i1 * s1 + i2 * s2
        mask = (r < rows) & (c < n3) & (tile < total_tiles)
        if UNIT_STRIDE:
            x = tl.load(ptr + offset + c, mask=mask, other=0)
        else:
            x = tl.load(ptr + offset + c * s3, mask=mask, other=0)
        # The pointer is a signed view of the bits (int8/16/32/64); widening it sign-extends,
        # so the mask makes it the zero extension that the definition asks for.
        b = x.to(tl.uint64)
        if ITEMSIZE == 1:
            b = b & 0xFF
        elif ITEMSIZE == 2:
            b = b & 0xFFFF
        elif ITEMSIZE == 4:
            b = b & 0xFFFFFFFF
        # z = mix(i + 1); Triton's >> on unsigned integers is a logical shift.
        if UNIT_GLOBAL:
            z = (base + i0 * g0 + i1 * g1 + i2 * g2 + c + 1).to(tl.uint64)
        else:
            z = (base + i0 * g0 + i1 * g1 + i2 * g2 + c * g3 + 1).to(tl.uint64)
        z ^= z >> 30
        z *= 0xBF58476D1CE4E5B9
        z ^= z >> 27
        z *= 0x94D049BB133111EB
        z ^= z >> 31
        # h = mix(b ^ z)
        z ^= b
        z ^= z >> 30
        z *= 0xBF58476D1CE4E5B9
        z ^= z >> 27
        z *= 0x94D049BB133111EB
        z ^= z >> 31
        acc += tl.where(mask, z, tl.zeros([BLOCK_ROWS, BLOCK_COLS], dtype=tl.uint64))
    total = tl.sum(tl.sum(acc, axis=1), axis=0)
    tl.store(out + pid, total.to(tl.int64, bitcast=True))


# Integer arguments are not specialised on their values (== 1, divisible by 16): that would
# compile a kernel per shape class, seconds each on first use, for no gain in a memory-bound loop.
_INT_ARGS = [
    "start", "base", "n1", "n2", "n3", "s0", "s1", "s2", "s3", "g0", "g1", "g2", "g3",
    "rows", "first_tile", "col_tiles", "total_tiles",
]  # fmt: skip


def interpreting() -> bool:
    """Whether Triton runs kernels in its interpreter (``TRITON_INTERPRET=1`` when triton was imported)."""
    knobs = getattr(triton, "knobs", None)
    if knobs is not None:
        return bool(knobs.runtime.interpret)
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@functools.lru_cache(maxsize=None)
def _kernel():
    # triton.jit gives the interpreter's stand-in when TRITON_INTERPRET=1; it and the library
    # functions the kernel calls (tl.sum, tl.zeros) must agree, so the choice is Triton's, made
    # from the environment when triton is imported, not this module's.
    return triton.jit(_fp_kernel, do_not_specialize=_INT_ARGS)


_SIGNED_BY_ITEMSIZE: dict[int, str] = {1: "int8", 2: "int16", 4: "int32", 8: "int64"}


def fp_layout(bits: torch.Tensor, dims: Sequence[tuple[int, int, int]], base: int) -> int:
    """The partial fingerprint of the elements that ``dims`` and ``base`` place, from ``bits``' first element.

    ``bits`` is a non-empty integer view of the chunk (itemsize 1, 2, 4 or 8) on a CUDA device,
    or on the CPU when Triton interprets (:func:`interpreting`); ``dims`` are its (size, memory
    stride, global stride) dims, innermost last, and ``base`` the global index of its first
    element. Returns an int in [0, 2**64).
    """
    import itertools

    import torch

    itemsize = bits.element_size()
    signed = bits.view(getattr(torch, _SIGNED_BY_ITEMSIZE[itemsize]))
    dims = list(dims)
    if len(dims) < KERNEL_DIMS:
        dims = [(1, 0, 0)] * (KERNEL_DIMS - len(dims)) + dims
    loop, dims = dims[: len(dims) - KERNEL_DIMS], dims[len(dims) - KERNEL_DIMS :]
    (n0, s0, g0), (n1, s1, g1), (n2, s2, g2), (n3, s3, g3) = dims
    # Tiles as wide as the rows are long (a power of two up to BLOCK), so that short rows (a
    # column slice, a column-major chunk) still fill the lanes: BLOCK elements a tile.
    block_cols = min(BLOCK, triton.next_power_of_2(n3))
    block_rows = BLOCK // block_cols
    rows = n0 * n1 * n2
    col_tiles = triton.cdiv(n3, block_cols)
    total_tiles = triton.cdiv(rows, block_rows) * col_tiles
    tiles_per_launch = MAX_PROGRAMS * TILES
    kernel = _kernel()
    out = torch.empty((min(MAX_PROGRAMS, triton.cdiv(total_tiles, TILES)),), dtype=torch.int64, device=bits.device)
    acc = torch.zeros((), dtype=torch.int64, device=bits.device)
    outer_dims = 0 if rows == 1 else 1 if n0 == n1 == 1 else 3
    options = dict(
        ITEMSIZE=itemsize, UNIT_STRIDE=s3 == 1, UNIT_GLOBAL=g3 == 1, OUTER_DIMS=outer_dims,
        BLOCK_ROWS=block_rows, BLOCK_COLS=block_cols, TILES=TILES,
    )  # fmt: skip
    if not interpreting():
        options["num_warps"] = NUM_WARPS
    context = torch.cuda.device(bits.device) if bits.device.type == "cuda" else contextlib.nullcontext()
    with context:
        # Dims beyond the kernel's four: one pass per index of the extra outer dims.
        for index in itertools.product(*(range(n) for n, _, _ in loop)):
            start = sum(j * s for j, (_, s, _) in zip(index, loop))
            first = base + sum(j * g for j, (_, _, g) in zip(index, loop))
            for first_tile in range(0, total_tiles, tiles_per_launch):
                programs = triton.cdiv(min(tiles_per_launch, total_tiles - first_tile), TILES)
                partials = out[:programs]
                kernel[(programs,)](
                    signed, partials, start, first,
                    n1, n2, n3, s0, s1, s2, s3, g0, g1, g2, g3,
                    rows, first_tile, col_tiles, total_tiles,
                    **options,
                )  # fmt: skip
                # int64 sums wrap mod 2**64, the definition's arithmetic; no sync until the end.
                acc.add_(partials.sum())
        return int(acc.item()) & ((1 << 64) - 1)
