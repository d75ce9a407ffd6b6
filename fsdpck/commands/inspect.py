"""``fsdpck inspect``: what is in any DCP checkpoint, whether it is whole, (with --verify-data)
whether its data are what the manifest says, and (with --stats) what its values look like and
what is suspicious about them — one process, no process group, read safely, a piece at a time.
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
from fsdpck.checkpoint.storage import open_storage
from fsdpck.commands.offline import read_items, select_keys
from fsdpck.commands.stats import ValueStats
from fsdpck.commands.suspicious import KeyFacts, Verdict, judge
from fsdpck.runtime import pywarnings
from fsdpck.runtime.progress import NO_PROGRESS, Progress

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
    stats: ValueStats | None = None  # --stats: of a tensor's values
    suspicious: list[str] = field(default_factory=list)  # --stats: "rule: message" of each finding about the key
    plain: Any = None  # a byte item's value, when it is a plain scalar or a list of them (for the rules)
    decoded: bool = False  # whether the byte item decoded with weights_only


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
    stats: bool = False
    strict: bool = False
    verdict_rules: Verdict | None = None  # --stats: what the suspicious rules found

    @property
    def suspicious(self) -> list[Any]:
        return self.verdict_rules.findings if self.verdict_rules is not None else []

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
        return 1 if self.problems or (self.strict and self.suspicious) else 0

    def count(self, status: str) -> int:
        return sum(1 for r in self.rows if r.status == status)


def inspect_checkpoint(location: str, *, key_glob: str | None = None, verify_data: bool = False, stats: bool = False,
                       strict: bool = False, progress: Progress = NO_PROGRESS, threads: int | None = None
                       ) -> InspectResult:
    """Open ``location`` safely and check its integrity; with ``verify_data`` check every item against the
    manifest, with ``stats`` describe every value and apply the suspicious rules (``strict``: they fail it)."""
    stats = stats or strict
    t0 = time.perf_counter()
    storage = open_storage(location)
    check_location(storage)
    with pywarnings.captured() as seen:
        # Neither torch nor DCP's own classes (and its imports of DTensor and FSDP) are imported to open
        # the checkpoint or to read a local one: only where data must be read through DCP's reader
        # (remote storage, storage transforms) or a dtype needs torch.
        ckpt = open_checkpoint(storage, light=True)
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
        verdict_rules = None
        if (verify_data or stats) and md is not None:
            problems.extend(_read_data(ckpt, rows, set(first_problem), verify_data=verify_data, stats=stats,
                                       progress=progress, threads=threads))
            if stats:
                verdict_rules = _judge(rows, keys)
        t_end = time.perf_counter()

    return InspectResult(
        location=ckpt.url, dcp_version=md.dcp_version if md is not None else None, metadata_bytes=ckpt.metadata_bytes,
        n_keys=len(keys), n_tensors=sum(1 for k in keys if md.keys[k].kind == KIND_TENSOR) if md else 0,
        n_byte_items=sum(1 for k in keys if md.keys[k].kind == KIND_BYTES) if md else 0, data_bytes=ckpt.data_bytes,
        files=ckpt.files, manifest=ckpt.manifest, manifest_error=ckpt.manifest_error, key_glob=key_glob,
        rows=list(rows.values()), problems=problems, notes=ckpt.notes, verify_data=verify_data,
        timings={"open_s": t_open - t0, "read_s": (t_end - t_open) if verify_data or stats else 0.0,
                 "total_s": t_end - t0},
        warnings=pywarnings.distinct(seen), readable=md is not None, stats=stats, strict=strict,
        verdict_rules=verdict_rules,
    )


def _one_file(info: KeyInfo) -> str | None:
    files = info.files
    return files[0] if len(files) == 1 else (", ".join(files) if files else None)


def _read_data(ckpt: CheckpointDir, rows: dict[str, KeyRow], problem_keys: set[str], *, verify_data: bool,
               stats: bool, progress: Progress, threads: int | None) -> list[Problem]:
    """Read every selected, integrity-clean item (a piece at a time); check each against the manifest."""
    md = ckpt.metadata
    problems: list[Problem] = []
    readable = [md.keys[k] for k in rows if k not in problem_keys]
    manifest_keys = ckpt.manifest.keys if ckpt.manifest is not None else {}
    results = read_items(ckpt, readable, fingerprints=verify_data, stats=stats, progress=progress,
                         label="inspect: reading", threads=threads)
    for info in readable:
        row, got = rows[info.key], results[info.key]
        if got.error is not None:
            row.status, row.detail = S_UNREADABLE, got.error
            problems.append(Problem(P_UNREADABLE, f"cannot be read: {got.error}", info.key, _one_file(info)))
            continue
        row.status = S_READ
        row.stats = got.stats
        entry = manifest_keys.get(info.key) if verify_data else None
        if info.kind == KIND_TENSOR:
            row.fingerprint = got.fingerprint
            if entry is None or entry.kind != KIND_TENSOR:
                continue
            if row.fingerprint == row.expected:
                row.status = S_VERIFIED
            else:
                row.status = S_MISMATCH
                row.detail = f"fingerprint {row.fingerprint}, {MANIFEST_NAME} has {row.expected}"
                problems.append(Problem(P_FINGERPRINT, f"data differs from {MANIFEST_NAME}: fingerprint "
                                        f"{row.fingerprint}, expected {row.expected}", info.key, _one_file(info)))
            continue
        item = got.item
        row.fingerprint, row.value = item.digest, item.value
        if entry is None or entry.kind != KIND_OBJECT:
            if item.error is not None:
                row.status, row.detail = S_UNREADABLE, item.error
                problems.append(Problem(P_UNREADABLE, item.error, info.key, _one_file(info)))
        elif item.canonical == entry.canonical:
            row.status = S_VERIFIED
        else:
            row.status = S_MISMATCH
            got_text = item.canonical if item.canonical is not None else f"undecodable ({item.error})"
            row.detail = f"{got_text[:80]}, {MANIFEST_NAME} has {entry.canonical[:80]}"
            problems.append(Problem(P_VALUE, f"value differs from {MANIFEST_NAME}: {got_text[:120]}, expected "
                                    f"{entry.canonical[:120]}", info.key, _one_file(info)))
        row.plain = item.plain
        row.decoded = item.canonical is not None
    return problems


def _judge(rows: dict[str, KeyRow], all_keys: list[str]) -> Verdict:
    """The suspicious rules over what was read; each finding is also noted on the rows it names."""
    facts = {k: KeyFacts(key=k, kind=r.kind, dtype=r.dtype, shape=r.shape, stats=r.stats, value=r.plain,
                         decoded=r.decoded) for k, r in rows.items() if r.status in (S_READ, S_VERIFIED, S_MISMATCH)}
    verdict = judge(facts, all_keys)
    for key, found in verdict.by_key().items():
        if key in rows:
            rows[key].suspicious = [f"{f.rule}: {f.message}" for f in found]
    return verdict
