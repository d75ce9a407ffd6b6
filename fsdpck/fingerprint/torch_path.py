"""The fingerprint's torch path: torch ops in bounded pieces, on any device.

It serves every device and dtype, and is the fallback when a kernel cannot be had. Pieces
are at most :func:`piece_numel` elements (1 << 22 at most), so its working memory stays a
few int64 buffers of that size however large the chunk is.
"""

from __future__ import annotations

import itertools
import math
from typing import TYPE_CHECKING, Sequence

from fsdpck.fingerprint.reference import MASK64, MUL1, MUL2

if TYPE_CHECKING:
    import torch

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


def _to_signed64(x: int) -> int:
    """The int64 value with the same 64 bits as the unsigned ``x`` (how torch's wrapping int64 multiply takes it)."""
    x &= MASK64
    return x - (1 << 64) if x >= (1 << 63) else x


_MUL1_I64 = _to_signed64(MUL1)
_MUL2_I64 = _to_signed64(MUL2)
# Masks of the low 64 - n bits: they turn torch's arithmetic right shift by n into a logical one.
_KEEP_AFTER_30 = (1 << (64 - 30)) - 1
_KEEP_AFTER_27 = (1 << (64 - 27)) - 1
_KEEP_AFTER_31 = (1 << (64 - 31)) - 1


def bits_view(t: torch.Tensor) -> torch.Tensor:
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


def row_major_strides(shape: Sequence[int]) -> list[int]:
    strides = [1] * len(shape)
    for d in range(len(shape) - 2, -1, -1):
        strides[d] = strides[d + 1] * shape[d + 1]
    return strides


def check_placement(shape: Sequence[int], global_shape: Sequence[int], offsets: Sequence[int]) -> None:
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


def fp_chunk_torch(bits: torch.Tensor, shape: list[int], global_shape: list[int], offsets: list[int]) -> int:
    """The torch path: ``bits`` is the chunk's non-empty integer view (see :func:`_bits_view`)."""
    import torch

    if bits.dim() == 0:
        # A 0-dim tensor is one element at global index 0.
        bits, shape, global_shape, offsets = bits.reshape(1), [1], [1], [0]

    numel_per_piece = piece_numel(bits.device)
    strides = row_major_strides(global_shape)
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
