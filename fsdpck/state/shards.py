"""THE shard decomposition: what part of a value this rank holds, at which global offsets, and
whether its copy is the one counted.

Every check that works shard-locally (verify's comparison, the fingerprints of save, load,
verify and the manifest) splits a value with :func:`decompose` and nothing else:

- a ``ShardedTensor`` (FSDP1): its local shards at their shard offsets;
- a ``DTensor`` (FSDP2, HSDP, TP) on any mesh: its local tensor split into blocks at exact
  global offsets. ``Shard(d)`` and ``_StridedShard(d, sf)`` are followed mesh dim by mesh dim
  as DTensor itself splits (torch.chunk sizes, then the strided interleave), so that an
  uneven or strided local tensor becomes one block per contiguous run; a ``Replicate`` mesh
  dim makes copies, and only the copy at coordinate 0 on every replicated dim is counted.
  ``Partial`` (and any placement not listed) is refused: it holds addends, not values;
- a plain tensor: the whole of it on every rank, counted on rank 0;
- anything else (a param group's lr, a list of names): an object, counted on rank 0.

``counterpart`` names the rank whose counted copy this rank's copy must equal: a replica
that drifted is found by comparing the two (``fsdpck.state.summary``).
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field
from typing import Any

Run = tuple[int, int]  # (global start, length) of a contiguous run of indices along one dim


class UnsupportedPlacement(ValueError):
    """A DTensor placement whose local values are not a slice of the tensor (``Partial``), or unknown."""


@dataclass(slots=True)
class Shards:
    """What this rank holds of one value."""

    kind: str  # "tensor" or "object"
    layout: str  # how it is held, for reports: "ShardedTensor", "DTensor (Replicate(), Shard(dim=0))", ...
    shape: tuple[int, ...] | None = None
    dtype: str | None = None
    pieces: list[tuple[tuple[int, ...], Any]] = field(default_factory=list)  # (global offsets, local tensor)
    counted: bool = True  # this rank's copy counts toward the whole
    counterpart: int = 0  # the rank whose counted copy this one must equal
    obj: Any = None  # an object's value

    @property
    def local_numel(self) -> int:
        return sum(t.numel() for _, t in self.pieces)


def dtype_name(dtype: Any) -> str:
    return str(dtype).removeprefix("torch.")


def decompose(value: Any, *, rank: int) -> Shards:
    """Split ``value`` into this rank's pieces with their global offsets (see the module's docstring)."""
    import torch
    from torch.distributed._shard.sharded_tensor import ShardedTensor
    from torch.distributed.tensor import DTensor

    if isinstance(value, ShardedTensor):
        meta = value.metadata()
        pieces = [(tuple(s.metadata.shard_offsets), s.tensor) for s in value.local_shards()]
        # metadata().size rather than size(): the same, without size()'s deprecation warning.
        return Shards("tensor", "ShardedTensor", tuple(meta.size), dtype_name(meta.tensor_properties.dtype), pieces,
                      counted=True, counterpart=rank)
    if isinstance(value, DTensor):
        return _decompose_dtensor(value, rank)
    if isinstance(value, torch.Tensor):
        layout = "scalar" if value.dim() == 0 else "tensor (replicated)"
        return Shards("tensor", layout, tuple(value.shape), dtype_name(value.dtype),
                      [((0,) * value.dim(), value)], counted=rank == 0, counterpart=0)
    return Shards("object", "object", obj=value, counted=rank == 0, counterpart=0)


def _decompose_dtensor(value: Any, rank: int) -> Shards:
    from torch.distributed.tensor import Replicate, Shard

    try:
        from torch.distributed.tensor.placement_types import _StridedShard
    except ImportError:  # a torch without it has no strided placements either
        _StridedShard = ()  # type: ignore[assignment]

    mesh = value.device_mesh
    placements = tuple(value.placements)
    shape = tuple(int(s) for s in value.shape)
    layout = "DTensor (" + ", ".join(str(p) for p in placements) + ")"
    dtype = dtype_name(value.dtype)
    coordinate = mesh.get_coordinate()
    if coordinate is None:  # this rank is not part of the mesh and holds nothing of the value
        return Shards("tensor", layout, shape, dtype, [], counted=False, counterpart=rank)

    runs: list[list[Run]] = [[(0, n)] for n in shape]
    replicated: list[int] = []
    for mesh_dim, placement in enumerate(placements):
        k = mesh.size(mesh_dim)
        c = coordinate[mesh_dim]
        if isinstance(placement, Replicate):
            replicated.append(mesh_dim)
        elif _StridedShard and isinstance(placement, _StridedShard):
            d = placement.dim
            runs[d] = _strided_shard(runs[d], k, c, int(placement.split_factor))
        elif isinstance(placement, Shard):
            d = placement.dim
            runs[d] = _shard(runs[d], k, c)
        else:
            raise UnsupportedPlacement(
                f"cannot decompose a DTensor with placement {placement} (placements {placements}, mesh "
                f"{tuple(mesh.shape)}): its local values are not a slice of the tensor, so fsdpck would miscount "
                "them; only Shard, _StridedShard and Replicate are supported")
    local = value.to_local()
    expected = tuple(sum(n for _, n in r) for r in runs)
    if tuple(local.shape) != expected:
        raise UnsupportedPlacement(
            f"DTensor of shape {shape} with placements {placements} on mesh {tuple(mesh.shape)}: its local tensor "
            f"has shape {tuple(local.shape)}, but the placements give {expected}; refusing rather than miscounting")
    counted = all(coordinate[m] == 0 for m in replicated)
    counterpart_coord = tuple(0 if m in replicated else coordinate[m] for m in range(mesh.ndim))
    counterpart = int(mesh.mesh[counterpart_coord].item())
    return Shards("tensor", layout, shape, dtype, _blocks(local, runs), counted=counted, counterpart=counterpart)


def _take(runs: list[Run], lo: int, hi: int) -> list[Run]:
    """The runs holding local positions [lo, hi) of the index list that ``runs`` spell out."""
    out: list[Run] = []
    pos = 0
    for start, n in runs:
        a, b = max(lo, pos), min(hi, pos + n)
        if a < b:
            out.append((start + a - pos, b - a))
        pos += n
        if pos >= hi:
            break
    return out


def _chunk(n: int, k: int, c: int) -> tuple[int, int]:
    """Local positions [lo, hi) that torch.chunk gives chunk ``c`` of ``k`` over ``n`` (empty past the end)."""
    size = -(-n // k) if n else 0
    return min(c * size, n), min((c + 1) * size, n)


def _shard(runs: list[Run], k: int, c: int) -> list[Run]:
    n = sum(m for _, m in runs)
    return _take(runs, *_chunk(n, k, c))


def _strided_shard(runs: list[Run], k: int, c: int, split_factor: int) -> list[Run]:
    """``_StridedShard``: split into ``split_factor`` chunks, chunk ``c`` of ``k`` of each, in order."""
    n = sum(m for _, m in runs)
    out: list[Run] = []
    for j in range(split_factor):
        lo, hi = _chunk(n, split_factor, j)
        a, b = _chunk(hi - lo, k, c)
        out.extend(_take(runs, lo + a, lo + b))
    return out


def _merge(runs: list[Run]) -> list[Run]:
    merged: list[Run] = []
    for start, n in runs:
        if merged and merged[-1][0] + merged[-1][1] == start:
            merged[-1] = (merged[-1][0], merged[-1][1] + n)
        else:
            merged.append((start, n))
    return merged


def _blocks(local: Any, runs: list[list[Run]]) -> list[tuple[tuple[int, ...], Any]]:
    """The local tensor as blocks: one per combination of contiguous runs, at their global offsets."""
    if local.dim() == 0:
        return [((), local)]
    if math.prod(local.shape) == 0:
        return []
    per_dim = []
    for dim_runs in runs:
        local_start = 0
        entries = []
        for start, n in _merge(dim_runs):
            entries.append((start, local_start, n))
            local_start += n
        per_dim.append(entries)
    blocks = []
    for combo in itertools.product(*per_dim):
        offsets = tuple(g for g, _, _ in combo)
        index = tuple(slice(l, l + n) for _, l, n in combo)
        blocks.append((offsets, local[index]))
    return blocks
