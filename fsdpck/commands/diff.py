"""``fsdpck diff A B``: two checkpoints key by key — keys, kinds, shapes, dtypes, then data.

Data are compared by fingerprint, which does not depend on how a tensor was chunked, so A and
B may come from different world sizes and layouts. With ``--values``, tensors whose data
differ are read again in pairs for the element-level difference, one key's A and B in memory
at a time.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any

from fsdpck.checkpoint.integrity import CheckpointDir, Problem, check_location, open_checkpoint
from fsdpck.checkpoint.metadata import KIND_BYTES, KIND_TENSOR, KeyInfo
from fsdpck.checkpoint.reader import READ_BATCH_BYTES, CheckpointReader, ReadFailed
from fsdpck.checkpoint.storage import open_storage
from fsdpck.commands.offline import byte_item, select_keys, tensor_fingerprint
from fsdpck.runtime import pywarnings

D_SAME = "same"
D_DIFFERENT = "DIFFERENT"
D_ONLY_A = "only in A"
D_ONLY_B = "only in B"
D_KIND = "KIND DIFFERS"
D_SHAPE = "SHAPE DIFFERS"
D_DTYPE = "DTYPE DIFFERS"
D_UNREADABLE = "UNREADABLE"
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

    @property
    def differing(self) -> list[DiffRow]:
        return [r for r in self.rows if r.status != D_SAME]

    @property
    def status(self) -> str:
        if self.problems:
            return "PROBLEMS"
        return "DIFFERENT" if self.differing else "IDENTICAL"

    @property
    def exit_code(self) -> int:
        return 1 if (self.problems or self.differing) else 0

    def count(self, status: str) -> int:
        return sum(1 for r in self.rows if r.status == status)


def diff_checkpoints(location_a: str, location_b: str, *, key_glob: str | None = None, values: bool = False,
                     batch_bytes: int = READ_BATCH_BYTES) -> DiffResult:
    """Compare two checkpoints key by key: keys, kinds, shapes, dtypes, then data by fingerprint."""
    t0 = time.perf_counter()
    storage_a, storage_b = open_storage(location_a, what="A"), open_storage(location_b, what="B")
    check_location(storage_a, what="A")
    check_location(storage_b, what="B")
    with pywarnings.captured() as seen:
        ckpt_a, ckpt_b = open_checkpoint(storage_a, what="A"), open_checkpoint(storage_b, what="B")
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

        digests_a = _digests(ckpt_a, [keys_a[k] for k in to_read], batch_bytes)
        digests_b = _digests(ckpt_b, [keys_b[k] for k in to_read], batch_bytes)
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
            _values(ckpt_a, ckpt_b, [rows[k] for k in to_read if rows[k].status == D_DIFFERENT], keys_a, keys_b)
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
                      warnings=pywarnings.distinct(seen))


def _digests(ckpt: CheckpointDir, infos: list[KeyInfo], batch_bytes: int) -> dict[str, tuple[str | None, str | None]]:
    """key -> (fingerprint or byte-item digest, error)."""
    if ckpt.raw_metadata is None:
        return {i.key: (None, "metadata unreadable") for i in infos}
    bad = ckpt.problem_keys()
    out: dict[str, tuple[str | None, str | None]] = {i.key: (None, "integrity problem (see problems)")
                                                     for i in infos if i.key in bad}
    reader = CheckpointReader(ckpt)
    tensors = [i for i in infos if i.kind == KIND_TENSOR and i.key not in out]
    for info, tensor, error in reader.tensors(tensors, batch_bytes=batch_bytes):
        out[info.key] = (None, error) if error else (tensor_fingerprint(tensor), None)
        del tensor
    for info, raw, error in reader.byte_items([i for i in infos if i.kind == KIND_BYTES and i.key not in out]):
        out[info.key] = (None, error) if error else (byte_item(raw, key=info.key).digest, None)
    return out


def element_diff(a: Any, b: Any, *, block_numel: int = DIFF_BLOCK_NUMEL) -> dict[str, Any]:
    """Elements, differing elements, the first differing global index, max |Δ| and max relative |Δ|.

    Elements differ as the fingerprint sees them: by their raw bits (−0.0 against 0.0 and two NaN
    payloads differ, with a |Δ| of 0 and infinity); a NaN against a number counts infinite.
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
            keys_b: dict[str, KeyInfo]) -> None:
    """--values for tensor keys whose data differ: one key's A and B in memory at a time."""
    reader_a, reader_b = CheckpointReader(ckpt_a), CheckpointReader(ckpt_b)
    for row in rows:
        if keys_a[row.key].kind != KIND_TENSOR:
            continue
        try:
            ta = reader_a.tensor(keys_a[row.key])
            tb = reader_b.tensor(keys_b[row.key])
            row.values = element_diff(ta, tb)
            if row.values["first_index"] is not None:
                row.values["first_index"] = _unravel(row.values["first_index"], keys_a[row.key].shape or ())
        except ReadFailed as e:
            row.detail = f"values not compared: {e}"
        finally:
            ta = tb = None  # noqa: F841 (free both before the next key)


def _unravel(index: int, shape: tuple[int, ...]) -> list[int]:
    out = []
    for n in reversed(shape):
        out.append(index % n if n else 0)
        index //= n if n else 1
    return list(reversed(out))
