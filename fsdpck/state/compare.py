"""Saved against loaded, key by key: the rows every verdict is made of.

Two comparisons, one row type:

- :func:`compare_round_trip` (verify): the state as it was saved against the state loaded
  into a fresh model and optimizer, at the same world size and layout. Every key is judged by
  its fingerprint (and shape, dtype); where the saved values themselves are still at hand
  (nothing moved them since the save), each rank also compares its shards element by element
  (bitwise, or within ``--atol``/``--rtol``) and only counts and a max |Δ| cross ranks.
- :func:`compare_manifest` (load): the manifest's record of what was saved against what this
  load holds, at any world size and layout.

Either way a key whose counted copy matches but one of whose replicas differs (an HSDP
replica, a TP-replicated bias, a value every rank holds) is ``replica-differs``, naming the
ranks. ``--self-test`` is :func:`flip_one_bit`: one bit of one value on one rank, which must
show as exactly one row.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from fsdpck.checkpoint.manifest import KIND_OBJECT, KIND_TENSOR, ManifestEntry
from fsdpck.runtime import collectives
from fsdpck.state.shards import Shards
from fsdpck.state.summary import KeySummary

PIECE = 1 << 20  # elements compared at a time, so the comparison's own memory stays small
MATCH, DIFFERS, MISSING, UNEXPECTED, REPLICA_DIFFERS = "match", "differs", "missing", "unexpected", "replica-differs"
STATUSES = (MATCH, DIFFERS, MISSING, UNEXPECTED, REPLICA_DIFFERS)


@dataclass(frozen=True, slots=True)
class Tolerance:
    atol: float = 0.0
    rtol: float = 0.0

    @property
    def bitwise(self) -> bool:
        return self.atol == 0.0 and self.rtol == 0.0


@dataclass(slots=True)
class Row:
    """One DCP key, saved against loaded."""

    key: str
    group: str  # "model", "optim", "trainer"
    fqn: str  # the parameter (or param group, or trainer part) the key belongs to
    state: str  # which of its values: "param", "exp_avg", "lr", ...
    kind: str  # KIND_TENSOR or KIND_OBJECT
    layout: str
    shape: list[int] | None
    dtype: str | None
    status: str
    saved: str | None  # fingerprint (tensor) or canonical text (object)
    loaded: str | None
    numel: int | None = None
    differing: int | None = None  # elements that differ, where the saved values were compared
    max_abs_diff: float | None = None
    replica_ranks: list[int] = field(default_factory=list)
    note: str = ""


def split_key(key: str) -> tuple[str, str, str]:
    """A DCP key as (group, fqn, state): ``optim.state.net1.0.weight.exp_avg`` -> (optim, net1.0.weight, exp_avg)."""
    parts = key.split(".")
    group = parts[0]
    if group == "model" and len(parts) > 1:
        return group, ".".join(parts[1:]), "param"
    if group == "optim" and len(parts) > 3 and parts[1] == "state":
        return group, ".".join(parts[2:-1]), parts[-1]
    if group == "optim" and len(parts) > 2:
        return group, ".".join(parts[1:-1]), parts[-1]
    return group, ".".join(parts[:-1]) if len(parts) > 1 else key, parts[-1] if len(parts) > 1 else "value"


def _bits(t: Any) -> Any:
    import torch

    ints = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
    return t.view(torch.uint8) if t.dtype == torch.bool else t.view(ints[t.element_size()])


def count_differences(a: Any, b: Any, tol: Tolerance) -> tuple[int, float]:
    """(differing elements, max |Δ| over them) of two same-shaped tensors, in bounded pieces."""
    import torch

    if a.shape != b.shape:
        raise ValueError("shapes differ")
    if a.dtype != b.dtype:
        return a.numel(), math.inf
    fa, fb = a.reshape(-1), b.reshape(-1)
    differing, worst = 0, 0.0
    for start in range(0, fa.numel(), PIECE):
        pa, pb = fa[start: start + PIECE], fb[start: start + PIECE]
        neq = _bits(pa) != _bits(pb)
        if not bool(neq.any()):
            continue
        da, db = pa.double(), pb.double()
        delta = (da - db).abs()
        if not tol.bitwise:
            neq &= ~(delta <= tol.atol + tol.rtol * db.abs())
        n = int(neq.sum())
        if n:
            differing += n
            worst = max(worst, float(torch.nan_to_num(delta[neq], nan=math.inf).max()))
    return differing, worst


def _elementwise(before: Shards | None, after: Shards | None, tol: Tolerance) -> tuple[int, int, float]:
    """(numel, differing, max |Δ|) of this rank's counted shards of one tensor key."""
    if before is None or after is None or before.kind != KIND_TENSOR or after.kind != KIND_TENSOR:
        return 0, 0, 0.0
    if not (before.counted and after.counted):
        return 0, 0, 0.0
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
    return numel, differing, worst


def _ranks(ranks: list[int]) -> str:
    return ", ".join(map(str, ranks[:8])) + (", ..." if len(ranks) > 8 else "")


def _replica_note(ranks: list[int], when: str) -> str:
    return f"{when}: rank(s) {_ranks(ranks)} hold a copy that differs from the replica they copy"


def compare_round_trip(saved: dict[str, KeySummary], loaded: dict[str, KeySummary], *, ctx, tol: Tolerance,
                       before: dict[str, Shards] | None = None, after: dict[str, Shards] | None = None) -> list[Row]:
    """verify's rows. ``before``/``after``: this rank's shards, where the saved values can still be compared."""
    keys = sorted(saved.keys() | loaded.keys())
    elementwise = before is not None and after is not None
    sums: list[float] = []
    maxes: list[float] = []
    if elementwise:
        for key in keys:
            n, d, w = _elementwise(before.get(key), after.get(key), tol)
            sums += [n, d]
            maxes.append(w)
        sums = collectives.allreduce_floats(ctx, sums, op="sum")
        maxes = collectives.allreduce_floats(ctx, maxes, op="max")
    rows = []
    for i, key in enumerate(keys):
        s, l = saved.get(key), loaded.get(key)
        ref = s or l
        group, fqn, state = split_key(key)
        row = Row(key=key, group=group, fqn=fqn, state=state, kind=ref.kind, layout=ref.layout, shape=ref.shape,
                  dtype=ref.dtype, status=MATCH, saved=s.value if s else None, loaded=l.value if l else None)
        if elementwise and ref.kind == KIND_TENSOR:
            row.numel, row.differing, row.max_abs_diff = int(sums[2 * i]), int(sums[2 * i + 1]), maxes[i]
        if s is None:
            row.status = UNEXPECTED
        elif l is None:
            row.status = MISSING
        else:
            _judge(row, s.kind, l.kind, s.shape, l.shape, s.dtype, l.dtype,
                   values_differ=(row.differing > 0) if (elementwise and not tol.bitwise and row.differing is not None)
                   else row.saved != row.loaded)
            _name_ranks(row, s, l)
        rows.append(row)
    return rows


def _name_ranks(row: Row, s: KeySummary, l: KeySummary) -> None:
    """Whether the row's replicas disagree, and which ranks hold a copy that is not what it should be.

    Replicas disagree when a rank's copy differs from the counted copy it replicates (on either
    side: replicas that already disagreed when the state was saved are named too). At the same
    world size and layout every rank's loaded copy must also equal its own saved copy, so the
    ranks whose partial fingerprints changed are the ones named; elsewhere the replicas that
    disagree are.
    """
    comparable = len(s.partials) == len(l.partials) and s.layout == l.layout
    changed = [r for r, (a, b) in enumerate(zip(s.partials, l.partials)) if a != b] if comparable else []
    if row.status == DIFFERS:
        if changed:
            row.replica_ranks = changed
            row.note = "; ".join(filter(None, [row.note, f"rank(s) {_ranks(changed)} hold values that differ from "
                                                         "the saved ones"]))
    elif l.replica_ranks:
        row.replica_ranks = changed or list(l.replica_ranks)
        row.note = _replica_note(row.replica_ranks, "loaded")
        row.status = REPLICA_DIFFERS
    if s.replica_ranks:
        row.replica_ranks = sorted(set(row.replica_ranks) | set(s.replica_ranks))
        row.note = "; ".join(filter(None, [row.note, _replica_note(s.replica_ranks, "saved")]))
        if row.status == MATCH:
            row.status = REPLICA_DIFFERS


def _judge(row: Row, kind_s: str, kind_l: str, shape_s: Any, shape_l: Any, dtype_s: Any, dtype_l: Any, *,
           values_differ: bool) -> None:
    if kind_s != kind_l:
        row.status, row.note = DIFFERS, f"saved a {kind_s}, loaded a {kind_l}"
    elif kind_s == KIND_TENSOR and (list(shape_s or []) != list(shape_l or []) or dtype_s != dtype_l):
        row.status = DIFFERS
        row.note = f"saved {list(shape_s or [])} {dtype_s}, loaded {list(shape_l or [])} {dtype_l}"
    elif values_differ:
        row.status = DIFFERS


def compare_manifest(saved: dict[str, ManifestEntry], loaded: dict[str, KeySummary]) -> list[Row]:
    """load's rows: the manifest's record of the save against what this load holds."""
    rows = []
    for key in sorted(saved.keys() | loaded.keys()):
        s, l = saved.get(key), loaded.get(key)
        group, fqn, state = split_key(key)
        saved_value = (s.fingerprint if s.kind == KIND_TENSOR else s.canonical) if s else None
        shape = list(s.shape) if s is not None and s.shape is not None else (l.shape if l else None)
        row = Row(key=key, group=group, fqn=fqn, state=state, kind=(s or l).kind, layout=l.layout if l else "-",
                  shape=shape, dtype=s.dtype if s else l.dtype, status=MATCH, saved=saved_value,
                  loaded=l.value if l else None)
        if s is None:
            row.status = UNEXPECTED
        elif l is None:
            row.status = MISSING
        else:
            _judge(row, s.kind, l.kind, s.shape, l.shape, s.dtype, l.dtype, values_differ=row.saved != row.loaded)
            if l.replica_ranks:
                row.replica_ranks = list(l.replica_ranks)
                row.note = "; ".join(filter(None, [row.note, _replica_note(l.replica_ranks, "loaded")]))
                if row.status == MATCH:
                    row.status = REPLICA_DIFFERS
        rows.append(row)
    return rows


def flip_one_bit(local: dict[str, Shards], *, ctx, rank: int, bit: int | None = None) -> dict[str, Any]:
    """--self-test: flip one bit of one element of one tensor on ``rank``; the same answer on every rank.

    The first key (in key order) of which ``rank`` holds a non-empty floating-point piece is
    touched: its lowest mantissa bit by default (the smallest change bitwise equality must
    catch), or with a tolerance ``bit`` (the exponent's highest, a change beyond any).
    """
    choice: dict[str, Any] | None = None
    if ctx.rank == rank:
        for key in sorted(local):
            view = local[key]
            if view.kind != KIND_TENSOR:
                continue
            piece = next((t for _, t in view.pieces if t.numel() > 0 and t.is_floating_point()), None)
            if piece is None:
                continue
            b = 0 if bit is None else min(bit, piece.element_size() * 8 - 2)
            first = _bits(piece.detach())[(0,) * piece.dim()]  # the piece's first element: a view, in place
            first.bitwise_xor_(1 << b)
            choice = {"rank": rank, "key": key, "bit": b}
            break
    choice = collectives.broadcast_json(ctx, choice, src=rank)
    if choice is None:
        raise RuntimeError(f"--self-test found no floating-point state on rank {rank} to flip")
    return choice
