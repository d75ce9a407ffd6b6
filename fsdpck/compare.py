"""Per-(FQN, state) comparison of optimizer state before the save and after the load.

Shard-local: each rank compares only the shards it holds; per-row results (elements,
differing elements, max |Δ|) are reduced with two all-reduces of a ``rows × k`` tensor,
so rank 0 never receives more than a few numbers per row. Default is bitwise equality
(−0.0 ≠ 0.0; NaN equals NaN only with the same payload); ``atol``/``rtol`` relax it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

PIECE = 1 << 20  # elements compared at a time, so the comparison's own memory stays small

_INT_VIEW = {1: "uint8", 2: "int16", 4: "int32", 8: "int64"}


@dataclass(frozen=True, slots=True)
class Tolerance:
    atol: float = 0.0
    rtol: float = 0.0

    @property
    def bitwise(self) -> bool:
        return self.atol == 0.0 and self.rtol == 0.0


@dataclass(slots=True)
class Row:
    """One compared (FQN, state) pair, or one param_groups entry, after the reduction."""

    fqn: str
    state: str
    sharding: str
    shape: list[int] | None
    dtype: str | None
    numel: int
    differing: int
    max_abs_diff: float
    status: str  # match | differs | missing | unexpected
    fp_before: str | None = None
    fp_after: str | None = None
    note: str = ""

    def as_dict(self) -> dict[str, Any]:
        d = {k: getattr(self, k) for k in self.__slots__}
        if isinstance(d["max_abs_diff"], float) and not math.isfinite(d["max_abs_diff"]):
            d["max_abs_diff"] = str(d["max_abs_diff"])
        return d


@dataclass(slots=True)
class _Local:
    """What one rank knows of one value: how it is sharded, and its local pieces."""

    sharding: str
    shape: list[int] | None
    dtype: str | None
    pieces: list[tuple[tuple[int, ...], Any]] = field(default_factory=list)  # (global offsets, tensor)
    counted_here: bool = True  # replicated values are counted on rank 0 only
    obj: Any = None


def describe(value: Any, rank: int) -> _Local:
    """Split a state value into this rank's pieces with their global offsets."""
    import torch
    from torch.distributed._shard.sharded_tensor import ShardedTensor
    from torch.distributed.tensor import DTensor, Replicate

    if isinstance(value, ShardedTensor):
        pieces = [(tuple(s.metadata.shard_offsets), s.tensor) for s in value.local_shards()]
        dtype = str(value.metadata().tensor_properties.dtype).removeprefix("torch.")
        return _Local("ShardedTensor", list(value.size()), dtype, pieces)
    if isinstance(value, DTensor):
        from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

        dtype = str(value.dtype).removeprefix("torch.")
        if all(isinstance(p, Replicate) for p in value.placements):
            local = value.to_local()
            first = value.device_mesh.get_coordinate()
            return _Local("DTensor (replicated)", list(value.shape), dtype, [((0,) * local.dim(), local)],
                          counted_here=not first or all(c == 0 for c in first))
        _, offsets = compute_local_shape_and_global_offset(value.shape, value.device_mesh, value.placements)
        return _Local("DTensor", list(value.shape), dtype, [(tuple(offsets), value.to_local())])
    if isinstance(value, torch.Tensor):
        kind = "scalar" if value.dim() == 0 else "replicated"
        dtype = str(value.dtype).removeprefix("torch.")
        return _Local(kind, list(value.shape), dtype, [((0,) * value.dim(), value)], counted_here=rank == 0)
    return _Local("object", None, type(value).__name__, obj=value, counted_here=rank == 0)


def _bits(t):
    import torch

    return t.view(getattr(torch, _INT_VIEW[t.element_size()])) if t.dtype != torch.bool else t.view(torch.uint8)


def count_differences(a, b, tol: Tolerance) -> tuple[int, float]:
    """(differing elements, max |Δ| over them) of two same-shaped tensors, in bounded pieces."""
    import torch

    if a.shape != b.shape:
        raise ValueError("shapes differ")
    if a.dtype != b.dtype:
        return a.numel(), math.inf
    fa, fb = a.reshape(-1), b.reshape(-1)
    differing, worst = 0, 0.0
    for start in range(0, fa.numel(), PIECE):
        pa, pb = fa[start : start + PIECE], fb[start : start + PIECE]
        neq = _bits(pa) != _bits(pb)
        if not bool(neq.any()):
            continue
        da, db = pa.double(), pb.double()
        delta = (da - db).abs()
        if not tol.bitwise:
            close = delta <= tol.atol + tol.rtol * db.abs()
            neq &= ~close
        n = int(neq.sum())
        if n:
            differing += n
            d = delta[neq]
            d = torch.nan_to_num(d, nan=math.inf)
            worst = max(worst, float(d.max()))
    return differing, worst


def canonical(value: Any) -> str:
    """A stable text form of a non-tensor value, for comparing param_groups and plain objects."""
    import torch

    if isinstance(value, torch.Tensor):
        return f"tensor({value.tolist()!r}, dtype={value.dtype})"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k!r}: {canonical(v)}" for k, v in sorted(value.items(), key=lambda kv: str(kv[0]))) + "}"
    if isinstance(value, (list, tuple)):
        inner = ", ".join(canonical(v) for v in value)
        return f"[{inner}]" if isinstance(value, list) else f"({inner})"
    if isinstance(value, float):
        return float.hex(value)
    return repr(value)


# Columns of the two reduction tensors.
_SUM = ("present_before", "present_after", "numel", "differing")
_MAX = ("max_abs_diff", "numel_max", "differing_max")


def _measure(before: _Local | None, after: _Local | None, tol: Tolerance) -> tuple[list[float], list[float]]:
    s = dict.fromkeys(_SUM, 0.0)
    m = dict.fromkeys(_MAX, 0.0)
    s["present_before"] = 1.0 if before is not None else 0.0
    s["present_after"] = 1.0 if after is not None else 0.0
    if before is None or after is None:
        return [s[k] for k in _SUM], [m[k] for k in _MAX]
    sharded = before.sharding in ("ShardedTensor", "DTensor")
    if before.sharding == "param group" and after.sharding == "param group":
        entries, bad = param_group_differences(before.obj, after.obj)
        m["numel_max"], m["differing_max"] = float(entries), float(len(bad))
        return [s[k] for k in _SUM], [m[k] for k in _MAX]
    if before.sharding in ("object", "param group") or after.sharding in ("object", "param group"):
        same = before.sharding == after.sharding and canonical(before.obj) == canonical(after.obj)
        m["numel_max"], m["differing_max"] = 1.0, 0.0 if same else 1.0
        return [s[k] for k in _SUM], [m[k] for k in _MAX]
    after_pieces = {off: t for off, t in after.pieces}
    numel = differing = 0
    worst = 0.0
    for off, ta in before.pieces:
        numel += ta.numel()
        tb = after_pieces.pop(off, None)
        if tb is None or tb.shape != ta.shape:
            differing += ta.numel()  # a shard that moved or changed shape: nothing of it matches
            worst = math.inf if ta.numel() else worst
            continue
        n, w = count_differences(ta, tb, tol)
        differing += n
        worst = max(worst, w)
    for tb in after_pieces.values():
        differing += tb.numel()
        worst = math.inf if tb.numel() else worst
    if before.shape != after.shape or before.dtype != after.dtype:
        differing = max(differing, numel, 1)
        worst = math.inf
    if sharded:
        s["numel"], s["differing"] = float(numel), float(differing)
    else:
        # Replicated values are compared on every rank (a rank whose copy drifted is a
        # difference) but counted once: they go through the MAX reduction.
        m["numel_max"], m["differing_max"] = float(numel), float(differing)
    m["max_abs_diff"] = worst
    return [s[k] for k in _SUM], [m[k] for k in _MAX]


PARAM_GROUP_STATE = "hyperparams"


def _param_group_entries(groups: list[dict[str, Any]]) -> dict[tuple[str, str], Any]:
    """One row per param group; its value is the group's dict (compared entry by entry)."""
    return {(f"param_groups[{i}]", PARAM_GROUP_STATE): dict(group) for i, group in enumerate(groups)}


def param_group_differences(before: dict[str, Any], after: dict[str, Any]) -> tuple[int, list[str]]:
    """(entries compared, names of the entries that differ) of two param groups."""
    names = sorted(set(before) | set(after), key=str)
    bad = [str(k) for k in names if k not in before or k not in after or canonical(before[k]) != canonical(after[k])]
    return len(names), bad


def row_keys(view: dict[str, Any]) -> list[tuple[str, str]]:
    keys = [(str(fqn), str(name)) for fqn, states in view["state"].items() for name in states]
    return keys + list(_param_group_entries(view["param_groups"]))


def _lookup(view: dict[str, Any], key: tuple[str, str], rank: int) -> _Local | None:
    fqn, name = key
    if fqn.startswith("param_groups["):
        entries = _param_group_entries(view["param_groups"])
        if key not in entries:
            return None
        return _Local("param group", None, None, obj=entries[key], counted_here=True)
    states = view["state"].get(fqn)
    if states is None or name not in states:
        return None
    return describe(states[name], rank)


def compare_views(before: dict[str, Any], after: dict[str, Any], *, ctx, tol: Tolerance, fingerprints: bool = False) -> list[Row]:
    """Compare two optimizer views shard-locally and reduce the results across ranks."""
    import torch
    import torch.distributed as dist

    local_keys = sorted(set(row_keys(before)) | set(row_keys(after)))
    if ctx.world_size > 1:
        # Key names only (strings), never tensors: every rank must walk the same rows in the same order.
        gathered: list[Any] = [None] * ctx.world_size
        dist.all_gather_object(gathered, local_keys)
        keys = sorted({tuple(k) for ks in gathered for k in ks})
    else:
        keys = local_keys
    keys.sort(key=lambda k: (k[0].startswith("param_groups["), k))

    sums, maxes, meta = [], [], []
    for key in keys:
        b, a = _lookup(before, key, ctx.rank), _lookup(after, key, ctx.rank)
        s, m = _measure(b, a, tol)
        sums.append(s)
        maxes.append(m)
        meta.append(b or a)
    dev = ctx.collective_device
    sum_t = torch.tensor(sums, dtype=torch.float64, device=dev).reshape(len(keys), len(_SUM))
    max_t = torch.tensor(maxes, dtype=torch.float64, device=dev).reshape(len(keys), len(_MAX))
    if ctx.world_size > 1:
        dist.all_reduce(sum_t, op=dist.ReduceOp.SUM)
        dist.all_reduce(max_t, op=dist.ReduceOp.MAX)
    sum_l, max_l = sum_t.cpu().tolist(), max_t.cpu().tolist()

    rows = []
    for i, (key, info) in enumerate(zip(keys, meta)):
        s = dict(zip(_SUM, sum_l[i]))
        m = dict(zip(_MAX, max_l[i]))
        numel = int(s["numel"] + m["numel_max"])
        differing = int(s["differing"] + m["differing_max"])
        if s["present_after"] == 0:
            status = "missing"
        elif s["present_before"] == 0:
            status = "unexpected"
        else:
            status = "differs" if differing else "match"
        row = Row(
            fqn=key[0],
            state=key[1],
            sharding=info.sharding if info else "?",
            shape=info.shape if info else None,
            dtype=info.dtype if info else None,
            numel=numel,
            differing=differing,
            max_abs_diff=float(m["max_abs_diff"]),
            status=status,
        )
        if info is not None and info.sharding == "param group" and status == "differs":
            b, a = _lookup(before, key, ctx.rank), _lookup(after, key, ctx.rank)
            if b is not None and a is not None:
                row.note = "differs: " + ", ".join(param_group_differences(b.obj, a.obj)[1])
        rows.append(row)
    if fingerprints:
        attach_fingerprints(rows, before, after, ctx=ctx)
    return rows


def attach_fingerprints(rows: list[Row], before: dict[str, Any], after: dict[str, Any], *, ctx) -> None:
    """Fill each tensor row's fingerprint saved/loaded: partial sums per rank, one collective of scalars."""
    from fsdpck.fingerprint import allreduce_sum_u64, to_hex

    parts: list[int] = []
    for row in rows:
        key = (row.fqn, row.state)
        parts.extend(_fingerprint_parts(_lookup(before, key, ctx.rank)))
        parts.extend(_fingerprint_parts(_lookup(after, key, ctx.rank)))
    fps = allreduce_sum_u64(parts, device=ctx.collective_device) if ctx.world_size > 1 else parts
    for i, row in enumerate(rows):
        if row.sharding in ("object", "param group", "?"):
            continue
        row.fp_before = to_hex(fps[2 * i]) if row.status != "unexpected" else None
        row.fp_after = to_hex(fps[2 * i + 1]) if row.status != "missing" else None


def _fingerprint_parts(info: _Local | None) -> list[int]:
    """This rank's partial fingerprint of a value (0 for what is counted elsewhere)."""
    if info is None or info.sharding in ("object", "param group") or not info.counted_here:
        return [0]
    from fsdpck.fingerprint import fp_chunk

    total = 0
    for off, t in info.pieces:
        total = (total + fp_chunk(t, global_shape=info.shape, offsets=off)) % (1 << 64)
    return [total]


def flip_one_bit(view: dict[str, Any], *, ctx, bit: int | None = None) -> dict[str, Any]:
    """--self-test: flip one bit of one element of one sharded state on the last rank.

    The lowest mantissa bit by default (the smallest change bitwise equality must catch); with
    a tolerance, ``bit`` picks a bit whose flip exceeds it (the exponent's highest).

    Returns which row and rank were touched (the same on every rank) so the report can
    show that exactly that row was caught.
    """
    import torch.distributed as dist

    target = ctx.world_size - 1
    choice: list[Any] = [None]
    if ctx.rank == target:
        for key in sorted(row_keys(view)):
            info = _lookup(view, key, ctx.rank)
            if info is None or info.sharding not in ("ShardedTensor", "DTensor"):
                continue
            pieces = [t for _, t in info.pieces if t.numel() > 0 and t.is_floating_point()]
            if pieces:
                flat = _bits(pieces[0]).reshape(-1)
                if flat.data_ptr() != _bits(pieces[0]).data_ptr() or not pieces[0].is_contiguous():
                    continue  # a reshape that copied would flip a copy, not the state
                b = 0 if bit is None else min(bit, pieces[0].element_size() * 8 - 2)
                flat[0] ^= (1 << b) if b < 63 else -(1 << 63)
                choice = [{"rank": ctx.rank, "fqn": key[0], "state": key[1], "bit": b}]
                break
    if ctx.world_size > 1:
        dist.broadcast_object_list(choice, src=target)
    if choice[0] is None:
        raise RuntimeError(f"--self-test found no sharded floating-point state on rank {target} to flip")
    return choice[0]
