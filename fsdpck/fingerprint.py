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

The torch arithmetic runs on the tensor's own device in bounded pieces (:func:`piece_numel`
elements, at most 1 << 22), so its working memory stays a few buffers of that size however
large the shard is. :func:`fp_reference` is a torch-free transcription of the definition
that the tests hold the torch path to.

Importing this module does not import torch (``fsdpck --help`` stays fast); torch is
imported inside the functions that need it.
"""

from __future__ import annotations

import itertools
import math
from typing import TYPE_CHECKING, Any, Sequence

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
    empty or 0-dim, and may live on any device; the work runs there. Returns an int in
    [0, 2**64); the partial sums of the chunks of any split add up (mod 2**64) to
    :func:`fp_tensor` of the whole.
    """
    import torch

    global_shape = [int(s) for s in global_shape]
    offsets = [int(o) for o in offsets]
    shape = list(t.shape)
    _check_placement(shape, global_shape, offsets)
    bits = _bits_view(t.detach())
    if bits.numel() == 0:
        return 0
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
