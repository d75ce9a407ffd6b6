"""Statistics of a tensor's values, computed a piece at a time in bounded memory, and merged.

``inspect --stats`` and ``show`` describe values without holding a tensor whole: each stored
piece gives a :class:`ValueStats` (:func:`piece_stats`) and pieces merge exactly for the
counts, min and max, and by Chan's parallel formula for the mean and the variance.

What is counted, per tensor: elements; zeros (−0.0 included); NaN; +Inf; −Inf. min, max,
mean and std (the population standard deviation) are of the *finite* values only, so one NaN
does not hide the rest. Floating tensors are read in blocks of :data:`BLOCK` elements: a block
whose float32 (or float64) sum is finite holds no NaN or Inf, so the common case costs a sum,
``aminmax``, a count of zeros, and the sum and dot product of the values shifted by an estimate
of the mean, accumulated in float64 (no cancellation when the mean is large against the spread).
float16, bfloat16 and float8 blocks are widened to float32 first; integer and bool tensors
are counted exactly and their mean and std come from float64. A complex tensor is described
as its real view (``view_as_real``): twice as many real values, real and imaginary parts together.

A piece the offline commands read (a :class:`~fsdpck.checkpoint.piece.Piece`, memory by address)
is described by the C kernel instead (``fsdpck_value_stats``: the same quantities, in blocks merged
the same way, without torch) when it is contiguous and of a dtype the kernel knows, unless
``FSDPCK_FP_BACKEND=torch`` keeps everything on torch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from fsdpck.checkpoint.piece import Piece
from fsdpck.fingerprint.ckernel import value_stats_c
from fsdpck.fingerprint.dispatch import c_kernels_allowed

BLOCK = 1 << 18  # elements per block: 1 MiB of float32, which stays in a core's L2 cache over the passes


@dataclass(slots=True)
class ValueStats:
    """Counts, extremes and moments of a tensor's values; ``merge`` combines those of two pieces."""

    numel: int = 0
    zeros: int = 0
    nan: int = 0
    posinf: int = 0
    neginf: int = 0
    finite: int = 0  # how many values the min, max, mean and std are of
    min: float | int | None = None
    max: float | int | None = None
    mean: float = 0.0
    m2: float = 0.0  # the sum of squared deviations from the mean (of the finite values)

    @property
    def nonfinite(self) -> int:
        return self.nan + self.posinf + self.neginf

    @property
    def std(self) -> float | None:
        return math.sqrt(max(self.m2, 0.0) / self.finite) if self.finite else None

    @property
    def average(self) -> float | None:
        return self.mean if self.finite else None

    def merge(self, other: ValueStats) -> None:
        self.numel += other.numel
        self.zeros += other.zeros
        self.nan += other.nan
        self.posinf += other.posinf
        self.neginf += other.neginf
        if other.finite:
            if self.finite:
                n = self.finite + other.finite
                delta = other.mean - self.mean
                self.m2 += other.m2 + delta * delta * self.finite * other.finite / n
                self.mean += delta * other.finite / n
                self.min = min(self.min, other.min)  # type: ignore[type-var]
                self.max = max(self.max, other.max)  # type: ignore[type-var]
                self.finite = n
            else:
                self.finite, self.mean, self.m2, self.min, self.max = (other.finite, other.mean, other.m2, other.min,
                                                                        other.max)

    def as_dict(self) -> dict[str, Any]:
        return {"numel": self.numel, "min": self.min, "max": self.max, "mean": self.average, "std": self.std,
                "zeros": self.zeros, "nan": self.nan, "posinf": self.posinf, "neginf": self.neginf}


def _moments(values: Any, shift: float, acc: list[float], scratch: Any) -> None:
    """Add the count, Σ(x − shift) and Σ(x − shift)² of a 1-d block of finite floats to ``acc``."""
    import torch

    n = values.numel()
    centred = scratch[:n]
    torch.sub(values, shift, out=centred)
    acc[0] += n
    acc[1] += float(centred.sum())
    acc[2] += float(torch.dot(centred, centred))


def _nonzero(block: Any) -> int:
    """Elements that are not zero (-0.0 is a zero, NaN is not). count_nonzero branches per element and
    runs at a fifth of this speed on tensors that are half zeros (Adam's moments behind a ReLU); a sum of
    bools in int64 is as slow; in int32 (a block has far fewer than 2**31 elements) it is vectorised."""
    import torch

    return int(block.bool().sum(dtype=torch.int32))


def piece_stats(t: Any) -> ValueStats:
    """The statistics of one tensor or :class:`~fsdpck.checkpoint.piece.Piece` (a stored piece, a
    slice): a contiguous piece of a dtype the C kernel knows there, without torch; otherwise with
    torch, in blocks of BLOCK elements."""
    if isinstance(t, Piece):
        real = t.real_view()
        got = value_stats_c(real.address, real.dtype, real.numel) if real.contiguous and c_kernels_allowed() else None
        if got is not None:
            (zeros, nan, posinf, neginf, finite), lo, hi, mean, m2 = got
            return ValueStats(numel=real.numel, zeros=zeros, nan=nan, posinf=posinf, neginf=neginf, finite=finite,
                              min=lo, max=hi, mean=mean if finite else 0.0, m2=m2 if finite else 0.0)
        if real.numel == 0:
            return ValueStats()
        t = t.tensor()
    return _tensor_stats(t)


def _tensor_stats(t: Any) -> ValueStats:
    import torch

    if t.is_complex():
        t = torch.view_as_real(t)
    x = t.reshape(-1)
    out = ValueStats(numel=x.numel())
    if x.numel() == 0:
        return out
    if not x.is_floating_point():
        return _integer_stats(x, out)
    work = x.dtype if x.dtype in (torch.float32, torch.float64) else torch.float32
    scratch = torch.empty(min(BLOCK, x.numel()), dtype=work)
    wide = torch.empty(min(BLOCK, x.numel()), dtype=work) if x.dtype != work else None
    lo = hi = None
    shift = None
    acc = [0, 0.0, 0.0]  # finite count, Σ(x − shift), Σ(x − shift)²
    for start in range(0, x.numel(), BLOCK):
        block = x[start: start + BLOCK]
        if wide is not None:
            block = wide[: block.numel()].copy_(block)
        out.zeros += block.numel() - _nonzero(block)
        total = float(block.sum())
        if not math.isfinite(total):  # NaN or ±Inf somewhere (or a float32 sum that overflowed)
            out.nan += int(torch.isnan(block).sum())
            out.posinf += int((block == math.inf).sum())
            out.neginf += int((block == -math.inf).sum())
            block = block[torch.isfinite(block)]
            if not block.numel():
                continue
            total = float(block.sum(dtype=torch.float64))
        if shift is None:
            shift = total / block.numel()
        b_lo, b_hi = torch.aminmax(block)
        lo = float(b_lo) if lo is None else min(lo, float(b_lo))
        hi = float(b_hi) if hi is None else max(hi, float(b_hi))
        _moments(block, shift, acc, scratch)
    if acc[0]:
        n, s, q = acc
        out.finite, out.min, out.max = n, lo, hi
        out.mean = shift + s / n
        out.m2 = max(q - s * s / n, 0.0)
    return out


def _integer_stats(x: Any, out: ValueStats) -> ValueStats:
    """Integers and bools: exact counts and extremes; mean and std from float64."""
    import torch

    if x.dtype == torch.bool:
        x = x.view(torch.uint8)
    lo = hi = None
    shift = None
    acc = [0, 0.0, 0.0]
    scratch = torch.empty(min(BLOCK, x.numel()), dtype=torch.float64)
    for start in range(0, x.numel(), BLOCK):
        block = x[start: start + BLOCK]
        out.zeros += block.numel() - _nonzero(block)
        b_lo, b_hi = _extremes(block)
        lo = b_lo if lo is None else min(lo, b_lo)
        hi = b_hi if hi is None else max(hi, b_hi)
        wide = block.to(torch.float64)
        total = float(wide.sum())
        if shift is None:
            shift = total / wide.numel()
        _moments(wide, shift, acc, scratch)
    n, s, q = acc
    out.finite, out.min, out.max = n, lo, hi
    out.mean = shift + s / n
    out.m2 = max(q - s * s / n, 0.0)
    return out


def _extremes(block: Any) -> tuple[int, int]:
    """Exact min and max of integers. torch has no aminmax for uint16/32/64 on the CPU: uint16 and
    uint32 go through int64; uint64 through its int64 bits with the top bit flipped, which orders
    them as unsigned (0 is -2**63, 2**64-1 is 2**63-1)."""
    import torch

    if block.dtype in (torch.uint16, torch.uint32):
        block = block.to(torch.int64)
    elif block.dtype == torch.uint64:
        lo, hi = torch.aminmax(block.view(torch.int64) ^ -(1 << 63))
        return int(lo) + (1 << 63), int(hi) + (1 << 63)
    lo, hi = torch.aminmax(block)
    return int(lo), int(hi)


def scalar_value(stats: ValueStats) -> float | int | None:
    """The value of a one-element tensor, from its statistics (NaN and ±Inf included)."""
    if stats.numel != 1:
        return None
    if stats.nan:
        return math.nan
    if stats.posinf:
        return math.inf
    if stats.neginf:
        return -math.inf
    return stats.min
