"""``fsdpck inspect``: what is in any DCP checkpoint, whether it is whole, and (with --verify-data)
whether its data are what the manifest says — one process, no process group, read safely.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from fsdpck.checkpoint.integrity import (
    P_FINGERPRINT,
    P_INCOMPLETE,
    P_UNREADABLE,
    P_VALUE,
    CheckpointDir,
    FileInfo,
    Problem,
    check_location,
    open_checkpoint,
)
from fsdpck.checkpoint.manifest import KIND_OBJECT, KIND_TENSOR, MANIFEST_NAME, Manifest
from fsdpck.checkpoint.metadata import KIND_BYTES, ChunkInfo, KeyInfo
from fsdpck.checkpoint.reader import READ_BATCH_BYTES, CheckpointReader
from fsdpck.checkpoint.storage import open_storage
from fsdpck.commands.offline import byte_item, select_keys, tensor_fingerprint
from fsdpck.runtime import pywarnings

# Per-key statuses.
S_OK = "ok"
S_PROBLEM = "PROBLEM"
S_VERIFIED = "verified"
S_READ = "read ok"
S_MISMATCH = "MISMATCH"
S_UNREADABLE = "UNREADABLE"


@dataclass(slots=True)
class KeyRow:
    """One key: its layout, and what reading its data found."""

    key: str
    kind: str
    shape: tuple[int, ...] | None
    dtype: str | None
    chunks: tuple[ChunkInfo, ...]
    stored_bytes: int
    status: str
    fingerprint: str | None = None
    expected: str | None = None  # the manifest's fingerprint (tensors) or canonical text (objects)
    value: str | None = None  # byte items: a short repr, when decodable safely
    detail: str | None = None


@dataclass(slots=True)
class InspectResult:
    """What ``fsdpck inspect`` found: one set of facts that the table and the JSON show."""

    location: str
    dcp_version: str | None
    metadata_bytes: int | None
    n_keys: int
    n_tensors: int
    n_byte_items: int
    data_bytes: int
    files: list[FileInfo]
    manifest: Manifest | None
    manifest_error: str | None
    key_glob: str | None
    rows: list[KeyRow]
    problems: list[Problem]
    notes: list[str]
    verify_data: bool
    timings: dict[str, float] = field(default_factory=dict)
    warnings: list[dict[str, Any]] = field(default_factory=list)
    readable: bool = True  # whether .metadata could be read at all

    @property
    def incomplete(self) -> bool:
        return any(p.kind == P_INCOMPLETE for p in self.problems)

    @property
    def status(self) -> str:
        if self.incomplete:
            return "INCOMPLETE"
        return "PROBLEMS" if self.problems else "OK"

    @property
    def exit_code(self) -> int:
        return 1 if self.problems else 0

    def count(self, status: str) -> int:
        return sum(1 for r in self.rows if r.status == status)


def inspect_checkpoint(location: str, *, key_glob: str | None = None, verify_data: bool = False,
                       batch_bytes: int = READ_BATCH_BYTES) -> InspectResult:
    """Open ``location`` safely, check its integrity, and with ``verify_data`` read and check every item."""
    t0 = time.perf_counter()
    storage = open_storage(location)
    check_location(storage)  # a bad path is a usage error before the seconds torch takes to import
    with pywarnings.captured() as seen:
        import torch.distributed.checkpoint  # noqa: F401 (seconds of imports, timed apart from the work)

        t_import = time.perf_counter()
        ckpt = open_checkpoint(storage)
        t_open = time.perf_counter()
        md = ckpt.metadata
        keys = sorted(md.keys) if md is not None else []
        selected = select_keys(keys, key_glob, where=f" of {ckpt.url}")
        first_problem: dict[str, str] = {}
        for p in ckpt.problems:
            if p.key is not None:
                first_problem.setdefault(p.key, p.message)
        rows: dict[str, KeyRow] = {}
        for key in selected:
            info = md.keys[key]
            row = KeyRow(key=key, kind=info.kind, shape=info.shape, dtype=info.dtype, chunks=info.chunks,
                         stored_bytes=info.stored_bytes, status=S_PROBLEM if key in first_problem else S_OK,
                         detail=first_problem.get(key))
            entry = ckpt.manifest.keys.get(key) if ckpt.manifest is not None else None
            if entry is not None:
                row.expected = entry.fingerprint if entry.kind == KIND_TENSOR else entry.canonical
            rows[key] = row
        problems = list(ckpt.problems)
        if verify_data and md is not None:
            problems.extend(_verify_data(ckpt, rows, set(first_problem), batch_bytes=batch_bytes))
        t_end = time.perf_counter()

    return InspectResult(
        location=ckpt.url, dcp_version=md.dcp_version if md is not None else None, metadata_bytes=ckpt.metadata_bytes,
        n_keys=len(keys), n_tensors=sum(1 for k in keys if md.keys[k].kind == KIND_TENSOR) if md else 0,
        n_byte_items=sum(1 for k in keys if md.keys[k].kind == KIND_BYTES) if md else 0, data_bytes=ckpt.data_bytes,
        files=ckpt.files, manifest=ckpt.manifest, manifest_error=ckpt.manifest_error, key_glob=key_glob,
        rows=list(rows.values()), problems=problems, notes=ckpt.notes, verify_data=verify_data,
        timings={"import_s": t_import - t0, "metadata_and_integrity_s": t_open - t_import,
                 "verify_data_s": (t_end - t_open) if verify_data else 0.0, "total_s": t_end - t0},
        warnings=pywarnings.distinct(seen), readable=md is not None,
    )


def _one_file(info: KeyInfo) -> str | None:
    files = info.files
    return files[0] if len(files) == 1 else (", ".join(files) if files else None)


def _verify_data(ckpt: CheckpointDir, rows: dict[str, KeyRow], problem_keys: set[str], *,
                 batch_bytes: int) -> list[Problem]:
    """Read every selected, integrity-clean item through DCP; check each against the manifest."""
    md = ckpt.metadata
    problems: list[Problem] = []
    reader = CheckpointReader(ckpt)
    readable = [md.keys[k] for k in rows if k not in problem_keys]
    manifest_keys = ckpt.manifest.keys if ckpt.manifest is not None else {}

    def unreadable(info: KeyInfo, error: str) -> None:
        rows[info.key].status, rows[info.key].detail = S_UNREADABLE, error
        problems.append(Problem(P_UNREADABLE, f"cannot be read: {error}", info.key, _one_file(info)))

    for info, tensor, error in reader.tensors([i for i in readable if i.kind == KIND_TENSOR], batch_bytes=batch_bytes):
        if error is not None:
            unreadable(info, error)
            continue
        row = rows[info.key]
        row.fingerprint = tensor_fingerprint(tensor)
        del tensor
        entry = manifest_keys.get(info.key)
        if entry is None or entry.kind != KIND_TENSOR:
            row.status = S_READ
        elif row.fingerprint == row.expected:
            row.status = S_VERIFIED
        else:
            row.status = S_MISMATCH
            row.detail = f"fingerprint {row.fingerprint}, {MANIFEST_NAME} has {row.expected}"
            problems.append(Problem(P_FINGERPRINT, f"data differs from {MANIFEST_NAME}: fingerprint {row.fingerprint}, "
                                    f"expected {row.expected}", info.key, _one_file(info)))
    for info, raw, error in reader.byte_items([i for i in readable if i.kind == KIND_BYTES]):
        if error is not None:
            unreadable(info, error)
            continue
        row = rows[info.key]
        item = byte_item(raw, key=info.key)
        row.fingerprint, row.value = item.digest, item.value
        entry = manifest_keys.get(info.key)
        if entry is None or entry.kind != KIND_OBJECT:
            row.status = S_READ if item.error is None else S_UNREADABLE
            if item.error is not None:
                row.detail = item.error
                problems.append(Problem(P_UNREADABLE, item.error, info.key, _one_file(info)))
        elif item.canonical == entry.canonical:
            row.status = S_VERIFIED
        else:
            row.status = S_MISMATCH
            got = item.canonical if item.canonical is not None else f"undecodable ({item.error})"
            row.detail = f"{got[:80]}, {MANIFEST_NAME} has {entry.canonical[:80]}"
            problems.append(Problem(P_VALUE, f"value differs from {MANIFEST_NAME}: {got[:120]}, expected "
                                    f"{entry.canonical[:120]}", info.key, _one_file(info)))
    return problems
