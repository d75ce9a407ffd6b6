"""``fsdpck diff A B``: two checkpoints key by key — keys, kinds, shapes, dtypes, then data.

Data are compared by fingerprint, which does not depend on how a tensor was chunked, so A and
B may come from different world sizes and layouts; both are read a stored piece at a time, in
parallel (``fsdpck.checkpoint.stream``). With ``--values``, tensors whose data differ are read
again box by box (A's stored chunks; the same box of B through DCP's read planning) for the
element-level difference: two boxes in memory at a time. With ``--atol``/``--rtol`` (verify's
meaning: an element differs when its bits differ and |A − B| > atol + rtol·|B|), a key whose
every element is within them is ``within tolerance``, not a difference.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any

from fsdpck.checkpoint.integrity import CheckpointDir, Problem, check_location, open_checkpoint
from fsdpck.checkpoint.metadata import KIND_TENSOR, KeyInfo
from fsdpck.checkpoint.storage import open_storage
from fsdpck.checkpoint.stream import Box, Request, read_pieces
from fsdpck.commands.offline import read_items, select_keys
from fsdpck.runtime import pywarnings
from fsdpck.runtime.progress import NO_PROGRESS, Progress
from fsdpck.state.compare import Tolerance

D_SAME = "same"
D_DIFFERENT = "DIFFERENT"
D_ONLY_A = "only in A"
D_ONLY_B = "only in B"
D_KIND = "KIND DIFFERS"
D_SHAPE = "SHAPE DIFFERS"
D_DTYPE = "DTYPE DIFFERS"
D_UNREADABLE = "UNREADABLE"
D_CLOSE = "within tolerance"  # fingerprints differ, every element within --atol/--rtol: not a difference
DIFF_BLOCK_NUMEL = 1 << 20  # elements compared at a time for --values (float64 temporaries of 8 MiB)


@dataclass(slots=True)
class DiffSide:
    """One of the two checkpoints of a diff."""

    location: str
    dcp_version: str | None
    n_keys: int
    data_bytes: int
    files: int
    manifest_world_size: int | None
    problems: list[Problem]


@dataclass(slots=True)
class DiffRow:
    """One key: how it stands in A and in B."""

    key: str
    status: str
    kind_a: str | None = None
    kind_b: str | None = None
    shape_a: tuple[int, ...] | None = None
    shape_b: tuple[int, ...] | None = None
    dtype_a: str | None = None
    dtype_b: str | None = None
    chunks_a: int | None = None
    chunks_b: int | None = None
    fingerprint_a: str | None = None
    fingerprint_b: str | None = None
    values: dict[str, Any] | None = None  # --values: elements, differing, first index, max abs and rel diff
    detail: str | None = None


@dataclass(slots=True)
class DiffResult:
    """What ``fsdpck diff A B`` found."""

    a: DiffSide
    b: DiffSide
    key_glob: str | None
    values: bool
    rows: list[DiffRow]
    problems: list[Problem]  # integrity problems of either side; each message starts "A: " or "B: "
    timings: dict[str, float] = field(default_factory=dict)
    warnings: list[dict[str, Any]] = field(default_factory=list)
    tolerance: Tolerance = Tolerance()

    @property
    def differing(self) -> list[DiffRow]:
        return [r for r in self.rows if r.status not in (D_SAME, D_CLOSE)]

    @property
    def status(self) -> str:
        if self.problems:
            return "PROBLEMS"
        if self.differing:
            return "DIFFERENT"
        return "WITHIN TOLERANCE" if self.count(D_CLOSE) else "IDENTICAL"

    @property
    def exit_code(self) -> int:
        return 1 if (self.problems or self.differing) else 0

    def count(self, status: str) -> int:
        return sum(1 for r in self.rows if r.status == status)


def diff_checkpoints(location_a: str, location_b: str, *, key_glob: str | None = None, values: bool = False,
                     atol: float = 0.0, rtol: float = 0.0, progress: Progress = NO_PROGRESS,
                     threads: int | None = None) -> DiffResult:
    """Compare two checkpoints key by key: keys, kinds, shapes, dtypes, then data by fingerprint
    (``values``: and element by element where the fingerprints differ; a tolerance implies it)."""
    tolerance = Tolerance(atol=atol, rtol=rtol)
    values = values or not tolerance.bitwise
    t0 = time.perf_counter()
    storage_a, storage_b = open_storage(location_a, what="A"), open_storage(location_b, what="B")
    check_location(storage_a, what="A")
    check_location(storage_b, what="B")
    with pywarnings.captured() as seen:
        # DCP's classes only if a read needs DCP's reader (remote storage, storage transforms).
        ckpt_a, ckpt_b = open_checkpoint(storage_a, what="A", light=True), open_checkpoint(storage_b, what="B", light=True)
        t_open = time.perf_counter()
        problems = [Problem(p.kind, f"A: {p.message}", p.key, p.file) for p in ckpt_a.problems]
        problems += [Problem(p.kind, f"B: {p.message}", p.key, p.file) for p in ckpt_b.problems]
        keys_a = ckpt_a.metadata.keys if ckpt_a.metadata is not None else {}
        keys_b = ckpt_b.metadata.keys if ckpt_b.metadata is not None else {}
        selected = select_keys(sorted(keys_a.keys() | keys_b.keys()), key_glob, where=" of A and B")

        rows: dict[str, DiffRow] = {}
        to_read: list[str] = []
        for key in selected:
            a, b = keys_a.get(key), keys_b.get(key)
            row = DiffRow(key=key, status=D_SAME)
            if a is not None:
                row.kind_a, row.shape_a, row.dtype_a, row.chunks_a = a.kind, a.shape, a.dtype, len(a.chunks)
            if b is not None:
                row.kind_b, row.shape_b, row.dtype_b, row.chunks_b = b.kind, b.shape, b.dtype, len(b.chunks)
            if a is None:
                row.status = D_ONLY_B
            elif b is None:
                row.status = D_ONLY_A
            elif a.kind != b.kind:
                row.status = D_KIND
            elif a.shape != b.shape:
                row.status = D_SHAPE
            elif a.dtype != b.dtype:
                row.status = D_DTYPE
            else:
                to_read.append(key)
            rows[key] = row

        digests_a = _digests(ckpt_a, [keys_a[k] for k in to_read], progress, "diff: reading A", threads)
        digests_b = _digests(ckpt_b, [keys_b[k] for k in to_read], progress, "diff: reading B", threads)
        for key in to_read:
            row = rows[key]
            (fa, err_a), (fb, err_b) = digests_a[key], digests_b[key]
            row.fingerprint_a, row.fingerprint_b = fa, fb
            if err_a or err_b:
                row.status = D_UNREADABLE
                row.detail = "; ".join(f"{side}: {err}" for side, err in (("A", err_a), ("B", err_b)) if err)
            elif fa != fb:
                row.status = D_DIFFERENT
        if values:
            _values(ckpt_a, ckpt_b, [rows[k] for k in to_read if rows[k].status == D_DIFFERENT], keys_a, keys_b,
                    tolerance, progress, threads)
        t_end = time.perf_counter()

    def side(ckpt: CheckpointDir) -> DiffSide:
        md = ckpt.metadata
        return DiffSide(location=ckpt.url, dcp_version=md.dcp_version if md else None, n_keys=len(md.keys) if md else 0,
                        data_bytes=ckpt.data_bytes, files=sum(1 for f in ckpt.files if f.role == "shard" and f.items),
                        manifest_world_size=ckpt.manifest.world_size if ckpt.manifest else None,
                        problems=ckpt.problems)

    return DiffResult(a=side(ckpt_a), b=side(ckpt_b), key_glob=key_glob, values=values, rows=list(rows.values()),
                      problems=problems,
                      timings={"open_s": t_open - t0, "read_s": t_end - t_open, "total_s": t_end - t0},
                      warnings=pywarnings.distinct(seen), tolerance=tolerance)


def _digests(ckpt: CheckpointDir, infos: list[KeyInfo], progress: Progress, label: str,
             threads: int | None) -> dict[str, tuple[str | None, str | None]]:
    """key -> (fingerprint or byte-item digest, error)."""
    if ckpt.metadata is None:
        return {i.key: (None, "metadata unreadable") for i in infos}
    bad = ckpt.problem_keys()
    out: dict[str, tuple[str | None, str | None]] = {i.key: (None, "integrity problem (see problems)")
                                                     for i in infos if i.key in bad}
    read = read_items(ckpt, [i for i in infos if i.key not in out], progress=progress, label=label, threads=threads)
    for key, got in read.items():
        if got.error is not None:
            out[key] = (None, got.error)
        else:
            out[key] = (got.fingerprint if got.item is None else got.item.digest, None)
    return out


def element_diff(a: Any, b: Any, *, tolerance: Tolerance = Tolerance(), block_numel: int = DIFF_BLOCK_NUMEL
                 ) -> dict[str, Any]:
    """Elements, differing elements, the first differing (row-major) index, max |Δ| and max relative |Δ|.

    Elements differ as the fingerprint sees them: by their raw bits (−0.0 against 0.0 and two NaN
    payloads differ, with a |Δ| of 0 and infinity); a NaN against a number counts infinite. With a
    tolerance, an element whose bits differ still counts as the same when |a − b| <= atol + rtol·|b|
    (as in verify). max |Δ| and max relative |Δ| are over the elements that count as differing.
    """
    import torch

    x, y = a.reshape(-1), b.reshape(-1)
    if x.numel() != y.numel():
        raise ValueError(f"cannot diff {x.numel()} elements against {y.numel()}")
    ints = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
    raw = x.dtype == y.dtype and x.element_size() in ints and not x.is_complex()
    wide = torch.complex128 if (x.is_complex() or y.is_complex()) else torch.float64
    differing, first, worst, worst_rel = 0, None, 0.0, 0.0
    for start in range(0, x.numel(), block_numel):
        xs, ys = x[start: start + block_numel], y[start: start + block_numel]
        if raw:
            size = ints[x.element_size()]
            neq = (xs.view(torch.uint8) != ys.view(torch.uint8)) if x.dtype == torch.bool else (
                xs.view(size) != ys.view(size))
        else:
            wx, wy = xs.to(wide), ys.to(wide)
            neq = ~((wx == wy) | (torch.isnan(wx) & torch.isnan(wy)))
        if not tolerance.bitwise and bool(neq.any()):
            dx, dy = xs[neq].to(wide), ys[neq].to(wide)
            close = (dx - dy).abs() <= tolerance.atol + tolerance.rtol * dy.abs()
            neq[neq.clone()] = ~close
        n = int(neq.sum())
        if not n:
            continue
        differing += n
        if first is None:
            first = start + int(torch.nonzero(neq)[0, 0])
        dx, dy = xs[neq].to(wide), ys[neq].to(wide)
        d = torch.nan_to_num((dx - dy).abs().to(torch.float64), nan=math.inf)
        worst = max(worst, float(d.max()))
        scale = torch.maximum(dx.abs().to(torch.float64), dy.abs().to(torch.float64))
        rel = torch.where(d == 0, torch.zeros_like(d), d / scale)
        worst_rel = max(worst_rel, float(torch.nan_to_num(rel, nan=math.inf).max()))
    return {"elements": x.numel(), "differing": differing, "first_index": first, "max_abs_diff": worst,
            "max_rel_diff": worst_rel}


def _values(ckpt_a: CheckpointDir, ckpt_b: CheckpointDir, rows: list[DiffRow], keys_a: dict[str, KeyInfo],
            keys_b: dict[str, KeyInfo], tolerance: Tolerance, progress: Progress, threads: int | None) -> None:
    """--values for tensor keys whose data differ: box by box (A's stored chunks), two boxes in memory at a time."""
    for row in rows:
        info_a, info_b = keys_a[row.key], keys_b[row.key]
        if info_a.kind != KIND_TENSOR:
            continue
        try:
            row.values = _key_values(ckpt_a, ckpt_b, info_a, info_b, tolerance, progress, threads)
        except _Unreadable as e:
            row.detail = f"values not compared: {e}"
            continue
        if not tolerance.bitwise and row.values["differing"] == 0:
            row.status = D_CLOSE


class _Unreadable(Exception):
    pass


def _key_values(ckpt_a: CheckpointDir, ckpt_b: CheckpointDir, info_a: KeyInfo, info_b: KeyInfo, tolerance: Tolerance,
                progress: Progress, threads: int | None) -> dict[str, Any]:
    import torch

    shape = info_a.shape or ()
    dtype_a, dtype_b = getattr(torch, info_a.dtype or ""), getattr(torch, info_b.dtype or "")
    boxes = sorted({(c.offsets, c.sizes) for c in info_a.chunks if c.numel}) or [(Box.whole(shape).offsets, shape)]
    total = {"elements": math.prod(shape), "differing": 0, "first_index": None, "max_abs_diff": 0.0,
             "max_rel_diff": 0.0}
    first_linear = None
    for offsets, sizes in boxes:
        box = Box(tuple(offsets), tuple(sizes))
        a, b = torch.empty(box.sizes, dtype=dtype_a), torch.empty(box.sizes, dtype=dtype_b)
        for ckpt, info, into, side in ((ckpt_a, info_a, a, "A"), (ckpt_b, info_b, b, "B")):
            errors = read_pieces(ckpt, [Request(info, box, into=into)], progress=progress,
                                 label=f"diff --values: reading {side}", threads=threads)
            if errors:
                raise _Unreadable(f"{side}: {errors[info.key]}")
        d = element_diff(a, b, tolerance=tolerance)
        del a, b
        total["differing"] += d["differing"]
        total["max_abs_diff"] = max(total["max_abs_diff"], d["max_abs_diff"])
        total["max_rel_diff"] = max(total["max_rel_diff"], d["max_rel_diff"])
        if d["first_index"] is not None:
            index = [o + i for o, i in zip(box.offsets, _unravel(d["first_index"], box.sizes))]
            linear = _ravel(index, shape)
            if first_linear is None or linear < first_linear:
                first_linear, total["first_index"] = linear, index
    return total


def _ravel(index: list[int], shape: tuple[int, ...]) -> int:
    out = 0
    for i, n in zip(index, shape):
        out = out * n + i
    return out


def _unravel(index: int, shape: tuple[int, ...]) -> list[int]:
    out = []
    for n in reversed(shape):
        out.append(index % n if n else 0)
        index //= n if n else 1
    return list(reversed(out))
