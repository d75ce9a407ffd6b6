"""Per DCP key, what the whole world holds: fingerprint, replica agreement and statistics.

One collective pass over a state dict (every rank calls :func:`summarize` with its own
shards, ``fsdpck.state.shards``): each rank fingerprints only what it holds, and only scalars
cross ranks. For each key the result says

- its fingerprint: the sum of the counted copies' partial fingerprints (tensors), or the
  digest of rank 0's canonical text (objects);
- which ranks hold a copy that differs from the counted copy it replicates (an HSDP replica,
  a TP-replicated bias, a plain tensor or object every rank holds) — ``replica_ranks``;
- optionally a few statistics of the counted values (the manifest records them).

The keys are DCP's flattened keys (``optim.state.net1.0.weight.exp_avg``), the names the
checkpoint's metadata and the manifest use.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from fsdpck.checkpoint.manifest import KIND_OBJECT, KIND_TENSOR, ManifestEntry, TensorStats
from fsdpck.fingerprint import MASK64, fp_chunk, fp_chunk_stats, to_hex
from fsdpck.runtime import collectives
from fsdpck.state.canonical import canonical, digest
from fsdpck.state.shards import Shards, decompose


@dataclass(slots=True)
class KeySummary:
    """One DCP key as the whole world holds it (the same on every rank)."""

    key: str
    kind: str  # KIND_TENSOR or KIND_OBJECT
    layout: str
    shape: list[int] | None
    dtype: str | None
    fingerprint: str  # 16 hex digits: of the values (tensors) or of the canonical text (objects)
    canonical: str | None = None  # objects: rank 0's canonical text
    replica_ranks: list[int] = field(default_factory=list)  # ranks whose copy differs from the one it replicates
    stats: TensorStats | None = None
    partials: list[int] = field(default_factory=list)  # each rank's partial fingerprint (0 where it holds none)

    def manifest_entry(self) -> ManifestEntry:
        if self.kind == KIND_OBJECT:
            return ManifestEntry(kind=KIND_OBJECT, canonical=self.canonical)
        return ManifestEntry(kind=KIND_TENSOR, shape=tuple(self.shape or ()), dtype=self.dtype,
                             fingerprint=self.fingerprint, stats=self.stats)

    @property
    def value(self) -> str:
        """What a report shows for it: the fingerprint of a tensor, the canonical text of an object."""
        return self.fingerprint if self.kind == KIND_TENSOR else (self.canonical or "")


def flatten(state: dict[str, Any]) -> dict[str, Any]:
    """A nested state dict as DCP flattens it: ``{"optim": {"state": {...}}}`` -> ``optim.state....``."""
    from torch.distributed.checkpoint._nested_dict import flatten_state_dict

    flat, _ = flatten_state_dict(state)
    return dict(flat)


def views(flat: dict[str, Any], *, rank: int) -> dict[str, Shards]:
    return {key: decompose(value, rank=rank) for key, value in flat.items()}


def partial_fingerprint(view: Shards) -> int:
    """This rank's partial fingerprint of its copy (counted or not: replicas are compared by it)."""
    return _partial(view, with_stats=False)[0]


# A key's statistics on one rank, as the collectives reduce them: summed (numel, sum of the finite
# values, non-finite count) and maxed (max, -min, max |x| over the finite values).
_NO_STATS = ([0.0, 0.0, 0.0], [-math.inf, -math.inf, -math.inf])


def _partial(view: Shards, *, with_stats: bool) -> tuple[int, tuple[list[float], list[float]]]:
    """The partial fingerprint of this rank's copy and, with ``with_stats``, the statistics of its
    counted pieces; on the CPU both come from one pass over memory where the C kernel serves."""
    if view.kind == KIND_OBJECT:
        return digest(canonical(view.obj)), _NO_STATS
    want = with_stats and view.counted
    total = 0
    sums, maxes = [0.0, 0.0, 0.0], [-math.inf, -math.inf, -math.inf]
    for offsets, t in view.pieces:
        if not (want and t.numel()):
            total += fp_chunk(t, global_shape=view.shape or (), offsets=offsets)
            continue
        fp, piece = fp_chunk_stats(t, global_shape=view.shape or (), offsets=offsets)
        total += fp
        bad, piece_sum, lo, hi = piece if piece is not None else _piece_stats(t.detach())
        sums[0] += t.numel()
        sums[1] += piece_sum
        sums[2] += bad
        if lo is not None:
            maxes = [max(maxes[0], hi), max(maxes[1], -lo), max(maxes[2], abs(lo), abs(hi))]
    return total & MASK64, (sums, maxes)


def key_order(ctx, local: dict[str, Shards]) -> list[tuple[str, dict[str, Any]]]:
    """Every key any rank holds, sorted, with its description (from the lowest rank that holds it)."""
    mine = {k: {"kind": v.kind, "layout": v.layout, "shape": list(v.shape) if v.shape is not None else None,
                "dtype": v.dtype} for k, v in local.items()}
    described: dict[str, dict[str, Any]] = {}
    for theirs in collectives.all_gather_json(ctx, mine):
        for k, d in theirs.items():
            described.setdefault(k, d)
    return sorted(described.items())


def summarize(local: dict[str, Shards], *, ctx, stats: bool = False) -> dict[str, KeySummary]:
    """Fingerprints, replica agreement (and statistics) of every key: a collective of scalars."""
    order = key_order(ctx, local)
    ws, n = ctx.world_size, len(order)
    partials = [0] * (ws * n)
    meta: list[int] = []
    local_stats: dict[str, tuple[list[float], list[float]]] = {}
    for i, (key, d) in enumerate(order):
        view = local.get(key)
        if view is not None:
            partials[ctx.rank * n + i], local_stats[key] = _partial(view, with_stats=stats)
        meta += [view is not None, view.counterpart if view is not None else -1, bool(view and view.counted)]
    partials = collectives.allreduce_sum_u64(ctx, partials)
    table = collectives.gather_ints(ctx, meta)
    value_stats = _stats(local_stats, order, ctx) if stats else None
    canon = _canonicals(local, order, ctx)
    out: dict[str, KeySummary] = {}
    for i, (key, d) in enumerate(order):
        present = [bool(table[r][3 * i]) for r in range(ws)]
        counterpart = [table[r][3 * i + 1] for r in range(ws)]
        counted = [bool(table[r][3 * i + 2]) for r in range(ws)]
        part = [partials[r * n + i] for r in range(ws)]
        fp = sum(p for r, p in enumerate(part) if present[r] and counted[r]) & MASK64
        drifted = [r for r in range(ws)
                   if present[r] and 0 <= counterpart[r] < ws and present[counterpart[r]]
                   and part[r] != part[counterpart[r]]]
        out[key] = KeySummary(key=key, kind=d["kind"], layout=d["layout"], shape=d["shape"], dtype=d["dtype"],
                              fingerprint=to_hex(fp), canonical=canon.get(key), replica_ranks=drifted,
                              stats=value_stats[key] if value_stats and d["kind"] == KIND_TENSOR else None,
                              partials=[p if present[r] else 0 for r, p in enumerate(part)])
    return out


def _canonicals(local: dict[str, Shards], order: list[tuple[str, dict[str, Any]]], ctx) -> dict[str, str]:
    """Rank 0's canonical text of every object key it holds (objects are counted on rank 0)."""
    objects = [k for k, d in order if d["kind"] == KIND_OBJECT]
    if not objects:
        return {}
    mine = {k: canonical(local[k].obj) for k in objects if k in local} if ctx.is_rank0 else None
    return collectives.broadcast_json(ctx, mine)


_SUM_PIECE = 1 << 20  # elements widened to float64 at a time for a tensor's sum (8 MiB)


def _piece_stats(x: Any) -> tuple[int, float, float | None, float | None]:
    """(non-finite elements, sum, min, max) of a non-empty tensor, over its finite elements.

    Min and max come from one aminmax pass; NaN and inf propagate into them, so when both are
    finite every element is and the isfinite mask is never built.
    """
    import torch

    nonfinite = 0
    if x.dtype == torch.bool:
        x = x.to(torch.uint8)
    if x.is_floating_point():
        lo, hi = torch.aminmax(x)
        if not (math.isfinite(float(lo)) and math.isfinite(float(hi))):
            finite = torch.isfinite(x)
            nonfinite = int(x.numel() - int(finite.sum()))
            x = x[finite]
            if x.numel() == 0:
                return nonfinite, 0.0, None, None
            lo, hi = torch.aminmax(x)
    else:
        lo, hi = x.min(), x.max()
    acc = torch.zeros((), dtype=torch.float64, device=x.device)
    for piece in x.reshape(-1).split(_SUM_PIECE):
        acc += piece.to(torch.float64).sum()
    return nonfinite, float(acc), float(lo), float(hi)


def _stats(local_stats: dict[str, tuple[list[float], list[float]]], order: list[tuple[str, dict[str, Any]]],
           ctx) -> dict[str, TensorStats]:
    """Every tensor key's statistics over all ranks' counted pieces: two collectives of scalars."""
    tensor_keys = [k for k, d in order if d["kind"] == KIND_TENSOR]
    sums: list[float] = []  # numel, sum, nonfinite per key
    maxes: list[float] = []  # max, -min, abs_max per key
    for key in tensor_keys:
        key_sums, key_maxes = local_stats.get(key, _NO_STATS)
        sums += key_sums
        maxes += key_maxes
    sums = collectives.allreduce_floats(ctx, sums, op="sum")
    maxes = collectives.allreduce_floats(ctx, maxes, op="max")
    out = {}
    for i, key in enumerate(tensor_keys):
        numel, total, nonfinite = int(sums[3 * i]), sums[3 * i + 1], int(sums[3 * i + 2])
        hi, neg_lo, amax = maxes[3 * i: 3 * i + 3]
        finite_n = numel - nonfinite
        out[key] = TensorStats(numel=numel, min=-neg_lo if finite_n else None, max=hi if finite_n else None,
                               abs_max=amax if finite_n else None, mean=total / finite_n if finite_n else None,
                               nonfinite=nonfinite)
    return out
