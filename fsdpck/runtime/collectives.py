"""The few collectives fsdpck uses, each in one place: scalars and small JSON documents only.

Nothing but scalars and small decisions ever crosses ranks (DESIGN.md, "Comparing without
gathering"). Objects travel as JSON in a byte tensor, never as pickles: a rank never
unpickles what another process sent. "Rank 0 decides, then every rank acts on the same
decision" is :func:`decide`.
"""

from __future__ import annotations

import json
from typing import Any, Callable, Sequence

from fsdpck.errors import CheckpointFormatError, FsdpckError, SetupError, UsageError

MASK64 = (1 << 64) - 1
_ERROR_TYPES = {cls.__name__: cls for cls in (FsdpckError, UsageError, SetupError, CheckpointFormatError)}


def _torch():
    import torch
    import torch.distributed as dist

    return torch, dist


def broadcast_json(ctx, value: Any, *, src: int = 0) -> Any:
    """``value`` (JSON-able) from rank ``src`` to every rank; other ranks pass anything (None)."""
    if ctx.world_size == 1:
        return value
    torch, dist = _torch()
    dev = ctx.collective_device
    payload = json.dumps(value).encode() if ctx.rank == src else b""
    size = torch.tensor([len(payload)], dtype=torch.int64, device=dev)
    dist.broadcast(size, src=src)
    buf = (torch.frombuffer(bytearray(payload), dtype=torch.uint8).to(dev) if ctx.rank == src
           else torch.empty(int(size.item()), dtype=torch.uint8, device=dev))
    if buf.numel():
        dist.broadcast(buf, src=src)
    return json.loads(bytes(buf.cpu().tolist()).decode()) if ctx.rank != src else value


def all_gather_json(ctx, value: Any) -> list[Any]:
    """Every rank's ``value`` (JSON-able), in rank order, on every rank."""
    if ctx.world_size == 1:
        return [value]
    torch, dist = _torch()
    dev = ctx.collective_device
    payload = json.dumps(value).encode()
    sizes = torch.zeros(ctx.world_size, dtype=torch.int64, device=dev)
    sizes[ctx.rank] = len(payload)
    dist.all_reduce(sizes)
    longest = int(sizes.max().item())
    buf = torch.zeros(longest, dtype=torch.uint8, device=dev)
    if payload:
        buf[: len(payload)] = torch.frombuffer(bytearray(payload), dtype=torch.uint8).to(dev)
    out = [torch.empty_like(buf) for _ in range(ctx.world_size)]
    dist.all_gather(out, buf)
    return [json.loads(bytes(t[: int(n)].cpu().tolist()).decode()) for t, n in zip(out, sizes.tolist())]


def decide(ctx, fn: Callable[[], Any], *, src: int = 0) -> Any:
    """Rank ``src`` runs ``fn()``; every rank returns its (JSON-able) result or raises the same error.

    An fsdpck error raised by ``fn`` is raised on every rank with the same type and message
    (a usage error found on rank 0 is then reported once, by rank 0, and every rank exits 2).
    Any other exception is raised on ``src`` as it is, and on the others as a RuntimeError
    that names it, so that no rank waits for a decision that never comes.
    """
    box: dict[str, Any] = {}
    original: BaseException | None = None
    if ctx.rank == src:
        try:
            box = {"ok": fn()}
        except FsdpckError as e:
            box = {"error": type(e).__name__ if type(e).__name__ in _ERROR_TYPES else "FsdpckError", "message": e.message}
        except Exception as e:  # the decision failed: every rank must still hear of it
            original = e
            box = {"crash": f"{type(e).__name__}: {e}"}
    box = broadcast_json(ctx, box, src=src)
    if "error" in box:
        raise _ERROR_TYPES[box["error"]](box["message"])
    if "crash" in box:
        if original is not None:
            raise original
        raise RuntimeError(f"rank {src} failed while deciding for every rank: {box['crash']}")
    return box["ok"]


def allreduce_sum_u64(ctx, values: Sequence[int]) -> list[int]:
    """Sum unsigned 64-bit values (partial fingerprints) over all ranks, exactly mod 2**64.

    One all-reduce of an int64 tensor holding each value as two 32-bit halves: each half summed
    over fewer than 2**31 ranks stays below 2**63, so nothing relies on signed overflow.
    """
    for v in values:
        if not 0 <= v <= MASK64:
            raise ValueError(f"allreduce_sum_u64: {v!r} is not an unsigned 64-bit integer")
    if ctx.world_size == 1 or not values:
        return [int(v) for v in values]
    torch, dist = _torch()
    halves = [h for v in values for h in (v & 0xFFFFFFFF, v >> 32)]
    t = torch.tensor(halves, dtype=torch.int64, device=ctx.collective_device)
    dist.all_reduce(t)
    summed = t.cpu().tolist()
    return [(summed[2 * j] + (summed[2 * j + 1] << 32)) & MASK64 for j in range(len(values))]


def allreduce_floats(ctx, values: Sequence[float], *, op: str) -> list[float]:
    """Element-wise ``sum`` or ``max`` of float64 values over all ranks."""
    if ctx.world_size == 1 or not values:
        return [float(v) for v in values]
    torch, dist = _torch()
    t = torch.tensor([float(v) for v in values], dtype=torch.float64, device=ctx.collective_device)
    dist.all_reduce(t, op={"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX}[op])
    return t.cpu().tolist()


def gather_ints(ctx, values: Sequence[int]) -> list[list[int]]:
    """Every rank's list of ints (the same length on every rank), in rank order."""
    if ctx.world_size == 1:
        return [[int(v) for v in values]]
    torch, dist = _torch()
    n = len(values)
    table = torch.zeros(ctx.world_size * n, dtype=torch.int64, device=ctx.collective_device)
    table[ctx.rank * n: (ctx.rank + 1) * n] = torch.tensor([int(v) for v in values], dtype=torch.int64)
    dist.all_reduce(table)
    flat = table.cpu().tolist()
    return [flat[r * n: (r + 1) * n] for r in range(ctx.world_size)]


def barrier(ctx) -> None:
    if ctx.world_size > 1:
        _, dist = _torch()
        dist.barrier()
