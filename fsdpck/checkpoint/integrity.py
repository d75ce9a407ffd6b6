"""Is a checkpoint whole? Judged from its metadata, its listing and its file sizes alone, safely.

:func:`open_checkpoint` reads ``.metadata`` with the restricted unpickler and the manifest
(if any), then checks: every referenced file present, a regular file, and not reached
through a symlink; every byte range inside its file and not overlapping another; every
chunk inside its tensor; the chunks covering each tensor exactly; the manifest agreeing
with the metadata; and the leftovers of an unfinished save (INCOMPLETE). Each problem names
its key and file. Cost is O(n log n) in the number of chunks, whatever the number of dims
(:func:`covers_exactly`).
"""

from __future__ import annotations

import heapq
import math
import random
from bisect import bisect_left, insort
from dataclasses import dataclass
from typing import Any, Iterable

from fsdpck.checkpoint import safetensors, unpickler
from fsdpck.checkpoint.manifest import KIND_OBJECT, KIND_TENSOR, MANIFEST_NAME, Manifest, read_manifest
from fsdpck.checkpoint.metadata import (
    KIND_BYTES,
    METADATA_MAX_BYTES,
    METADATA_NAME,
    CheckpointMetadata,
    ChunkInfo,
    StorageRef,
    parse_metadata,
)
from fsdpck.checkpoint.nofollow import check_name
from fsdpck.checkpoint.storage import DIR, FILE, SYMLINK, Storage
from fsdpck.errors import CheckpointFormatError, UsageError

SHARD_SUFFIX = ".distcp"

# Problem kinds: each problem of a report has one.
P_NOT_CHECKPOINT = "not-a-checkpoint"
P_INCOMPLETE = "incomplete"
P_METADATA = "metadata"
P_MISSING_FILE = "missing-file"
P_OUTSIDE = "file-outside-dir"
P_SYMLINK = "symlink"
P_NOT_FILE = "not-a-file"
P_BYTE_RANGE = "byte-range"
P_BYTE_OVERLAP = "byte-overlap"
P_NO_STORAGE = "no-storage"
P_ORPHAN_STORAGE = "orphan-storage"
P_CHUNK_BOUNDS = "chunk-bounds"
P_CHUNK_OVERLAP = "chunk-overlap"
P_CHUNK_GAP = "chunk-gap"
P_MANIFEST = "manifest"
P_MANIFEST_MISMATCH = "manifest-mismatch"
P_UNREADABLE = "unreadable"
P_FINGERPRINT = "fingerprint-mismatch"
P_VALUE = "value-mismatch"


@dataclass(frozen=True, slots=True)
class Problem:
    """One thing wrong with a checkpoint; names the key and the file where it has them."""

    kind: str
    message: str
    key: str | None = None
    file: str | None = None


@dataclass(slots=True)
class FileInfo:
    """A file of the checkpoint, or one its metadata names."""

    name: str
    size: int | None  # None: missing, or not looked at
    role: str  # "metadata", "manifest", "shard", "leftover", "other"
    status: str  # "ok", "MISSING", "OUTSIDE", "SYMLINK", "unreferenced", "LEFTOVER"
    items: int = 0  # storage entries in this file
    referenced_bytes: int = 0


@dataclass(slots=True)
class CheckpointDir:
    """A checkpoint as opened: metadata (when readable), files, manifest, and integrity problems."""

    storage: Storage
    metadata: CheckpointMetadata | None
    raw_metadata: Any  # DCP's Metadata (to read data through DCP); None if unreadable or opened light (reader.dcp_metadata)
    metadata_bytes: int | None
    files: list[FileInfo]
    problems: list[Problem]
    notes: list[str]
    manifest: Manifest | None
    manifest_error: str | None
    format: str = "dcp"  # "dcp" (a pickled .metadata) or "safetensors" (JSON headers in each file)

    @property
    def url(self) -> str:
        return self.storage.url

    @property
    def incomplete(self) -> bool:
        return any(p.kind == P_INCOMPLETE for p in self.problems)

    @property
    def data_bytes(self) -> int:
        return sum(f.size or 0 for f in self.files if f.role == "shard" and f.items)

    def problem_keys(self) -> set[str]:
        return {p.key for p in self.problems if p.key is not None}


def check_location(storage: Storage, *, what: str = "DIR") -> None:
    """A location that does not exist or is not a dir is a usage error (exit 2), before any work."""
    kind = storage.kind()
    if kind is None:
        raise UsageError(f"{what} {storage.url!r} does not exist")
    if kind != DIR:
        named = {FILE: "a file", SYMLINK: "a symlink"}.get(kind, "neither a file nor a dir (a FIFO, socket or device)")
        raise UsageError(f"{what} {storage.url!r} is {named}, not a checkpoint dir")


def open_checkpoint(storage: Storage, *, what: str = "DIR", light: bool = False) -> CheckpointDir:
    """Read a checkpoint's metadata safely and check its integrity from metadata, listing and sizes alone
    (``light``: without DCP's classes; ``raw_metadata`` is then None until ``reader.dcp_metadata`` needs it)."""
    check_location(storage, what=what)
    problems: list[Problem] = []
    notes: list[str] = []
    try:
        listing = storage.entries()
    except OSError as e:
        raise UsageError(f"{what} {storage.url!r} cannot be listed: {e.strerror or e}") from None

    files: dict[str, FileInfo] = {}
    for name, entry in listing.items():
        role = ("metadata" if name == METADATA_NAME else "manifest" if name == MANIFEST_NAME
                else "leftover" if name.endswith(".tmp") else "shard" if name.endswith(SHARD_SUFFIX) else "other")
        if entry.kind == SYMLINK:
            files[name] = FileInfo(name, None, role, "SYMLINK")
            problems.append(Problem(P_SYMLINK, f"{name} is a symlink: fsdpck does not follow links out of a "
                                    "checkpoint (copy the file in instead)", file=name))
        elif entry.kind == FILE:
            status = "LEFTOVER" if name.endswith(METADATA_NAME + ".tmp") else "ok"
            files[name] = FileInfo(name, entry.size, role, status)
        elif entry.kind != DIR:
            files[name] = FileInfo(name, None, role, "NOT A FILE")
            problems.append(Problem(P_NOT_FILE, f"{name} is not a regular file or dir (a FIFO, socket or device)",
                                    file=name))

    manifest = None
    manifest_error = None
    if files.get(MANIFEST_NAME, FileInfo("", 0, "", "ok")).status == "ok":
        try:
            manifest = read_manifest(storage)
        except CheckpointFormatError as e:
            manifest_error = e.message
            problems.append(Problem(P_MANIFEST, e.message, file=MANIFEST_NAME))

    # Leftovers of a save that did not finish: DCP writes .metadata.tmp, then renames it.
    for name in sorted(files):
        if name.endswith(METADATA_NAME + ".tmp"):
            problems.append(Problem(P_INCOMPLETE, f"{name} is left over from a save that did not finish (DCP writes "
                                    "it last and renames it to .metadata)", file=name))
    shards = sorted(n for n in files if n.endswith(SHARD_SUFFIX))

    md = raw = None
    md_info = files.get(METADATA_NAME)
    metadata_bytes = md_info.size if md_info is not None else None
    tensor_files = sorted(n for n, f in files.items() if n.endswith(safetensors.SUFFIX) and f.status == "ok")
    fmt = "safetensors" if md_info is None and tensor_files else "dcp"
    if fmt == "safetensors":
        for name in tensor_files:
            files[name].role = "shard"
        try:
            md = safetensors.parse_files(_headers(storage, files, tensor_files))
        except CheckpointFormatError as e:
            problems.append(Problem(P_METADATA, e.message, file=e.message.split(":")[0]))
        except OSError as e:
            problems.append(Problem(P_METADATA, f"a safetensors header cannot be read: {e.strerror or e}"))
        metadata_bytes = None
    elif md_info is None:
        rank_local = sorted(n for n in files if n.startswith("__") and n.endswith(METADATA_NAME))
        if shards:
            problems.append(Problem(P_INCOMPLETE, f"no {METADATA_NAME} but {len(shards)} shard file(s) "
                                    f"({_names(shards)}): a save that did not finish", file=METADATA_NAME))
        elif rank_local:
            problems.append(Problem(P_METADATA, f"no {METADATA_NAME}; only rank-local {_names(rank_local)} "
                                    "(saved without collectives), which fsdpck does not read", file=METADATA_NAME))
        else:
            empty = " (the dir is empty)" if not listing else ""
            problems.append(Problem(P_NOT_CHECKPOINT, f"no {METADATA_NAME}: not a DCP checkpoint dir{empty}",
                                    file=METADATA_NAME))
    elif md_info.status != "ok":
        pass  # a symlink or a FIFO: already a problem, not opened
    else:
        source = f"{storage.url}/{METADATA_NAME}"
        try:
            if (md_info.size or 0) > METADATA_MAX_BYTES:
                raise CheckpointFormatError(f"{source}: {md_info.size} bytes, more than the {METADATA_MAX_BYTES} "
                                            "bytes fsdpck reads as metadata: not read")
            with storage.open_read(METADATA_NAME) as stream:
                raw = unpickler.load_metadata(stream, size=md_info.size or 0, source=source, light=light)
            md = parse_metadata(raw, source=source, light=light)
            raw = None if light else raw
        except CheckpointFormatError as e:
            raw = md = None
            problems.append(Problem(P_METADATA, e.message, file=METADATA_NAME))
        except OSError as e:
            raw = md = None
            problems.append(Problem(P_METADATA, f"{source}: cannot be read: {e.strerror or e}", file=METADATA_NAME))

    if md is not None:
        problems.extend(_storage_problems(storage, md, files))
        for key, info in md.keys.items():
            if info.kind == KIND_TENSOR:
                problems.extend(chunk_cover_problems(key, info.shape or (), info.chunks))
        for name in shards:
            if files[name].items == 0 and files[name].status == "ok":
                files[name].status = "unreferenced"
                notes.append(f"{name} is not referenced by {METADATA_NAME} (left over from an earlier save?)")
        if manifest is not None:
            problems.extend(_manifest_problems(md, manifest))
    return CheckpointDir(storage=storage, metadata=md, raw_metadata=raw, metadata_bytes=metadata_bytes,
                         files=sorted(files.values(), key=lambda f: f.name), problems=problems, notes=notes,
                         manifest=manifest, manifest_error=manifest_error, format=fmt)


def _headers(storage: Storage, files: dict[str, FileInfo], names: list[str]
             ) -> dict[str, tuple[list[safetensors.Entry], int, int]]:
    """Each safetensors file's checked entries, one file at a time: a header's text is let go before
    the next is read."""
    out = {}
    for name in names:
        with storage.open_read(name) as stream:
            entries, start = safetensors.read_entries(stream, size=files[name].size or 0, source=name)
        out[name] = (entries, start, files[name].size or 0)
    return out


def _names(names: list[str], limit: int = 3) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f", ... ({len(names)} in all)" if len(names) > limit else "")


def _box_str(chunk: ChunkInfo) -> str:
    return f"offsets {list(chunk.offsets)} sizes {list(chunk.sizes)}"


def _chunk_where(chunk: ChunkInfo) -> str:
    return f" in {chunk.storage.file}" if chunk.storage is not None else ""


# --- chunks cover their tensor exactly --------------------------------------------------

_PRIME = (1 << 61) - 1  # a Mersenne prime: the field the cover identity is tested in
_ROUNDS = 2  # independent tests; a wrong cover passes all of them with probability < 2**-70
_RANDOM = random.SystemRandom()  # the points are drawn from the OS's entropy: a crafted cover cannot know them


def covers_exactly(shape: tuple[int, ...], chunks: list[ChunkInfo]) -> bool:
    """Whether the chunks (all inside ``shape``) cover every element exactly once.

    The count of chunks covering each element, f, is 1 everywhere iff the polynomial
    ``sum_boxes prod_k sum_{x in box_k} r_k**x`` equals ``prod_k sum_{x < S_k} r_k**x``
    as a polynomial in the r_k. Coordinates are first compressed per dim to the ranks of the
    distinct chunk boundaries (which keeps "covered exactly once" and makes the degrees at
    most 2n + 2), and the identity is tested at random points mod a 61-bit prime
    (Schwartz-Zippel: a wrong cover passes one test with probability at most the total
    degree over the prime, below 2**-35 for a million chunks of 12 dims). A right cover
    always passes. O(n log n + n·dims) whatever the number of dims: dims that every chunk
    spans whole are dropped first.
    """
    boxes = [c for c in chunks if c.numel > 0]
    ndim = len(shape)
    dims = [d for d in range(ndim) if any(c.offsets[d] != 0 or c.sizes[d] != shape[d] for c in boxes)]
    if not dims:  # every chunk spans the whole tensor: exactly one of them may exist
        return len(boxes) == 1
    ranks: dict[int, dict[int, int]] = {}
    for d in dims:
        bounds = {0, shape[d]}
        for c in boxes:
            bounds.add(c.offsets[d])
            bounds.add(c.offsets[d] + c.sizes[d])
        ranks[d] = {b: i for i, b in enumerate(sorted(bounds))}
    compressed = [[(ranks[d][c.offsets[d]], ranks[d][c.offsets[d] + c.sizes[d]]) for d in dims] for c in boxes]
    for _ in range(_ROUNDS):
        powers = []
        for d in dims:
            r = _RANDOM.randrange(2, _PRIME - 1)
            table = [1] * (len(ranks[d]))
            for i in range(1, len(table)):
                table[i] = table[i - 1] * r % _PRIME
            powers.append(table)
        target = 1
        for table in powers:
            target = target * (table[-1] - table[0]) % _PRIME
        total = 0
        for box in compressed:
            term = 1
            for (lo, hi), table in zip(box, powers):
                term = term * (table[hi] - table[lo]) % _PRIME
            total += term
        if total % _PRIME != target:
            return False
    return True


def find_overlapping_chunks(chunks: Iterable[ChunkInfo]) -> tuple[int, int] | None:
    """Two chunks that share an element, or None: a sweep along dim 0, O(n log n).

    Active chunks (whose dim-0 range contains the current start) are kept sorted by their
    offsets in the other dims, and a new chunk is tested against its two neighbours only.
    Exact for up to 2 dims; for more it finds the overlaps of row-block and grid partitions
    (FSDP, TP, EP) but may miss others. Used only to name a pair once :func:`covers_exactly`
    has said the cover is wrong.
    """
    boxes = [(c.offsets, c.sizes, n) for n, c in enumerate(chunks) if c.numel > 0]
    if len(boxes) < 2:
        return None
    if not boxes[0][0]:
        return boxes[0][2], boxes[1][2]  # 0-dim: two chunks of one element
    boxes.sort(key=lambda b: (b[0][0], b[0][1:], b[2]))
    active: list[tuple[tuple[int, ...], int]] = []
    by_n = {n: (o, s) for o, s, n in boxes}
    ends: list[tuple[int, tuple[tuple[int, ...], int]]] = []

    def meet(a: int, b: int) -> bool:
        (oa, sa), (ob, sb) = by_n[a], by_n[b]
        return all(oa[d] < ob[d] + sb[d] and ob[d] < oa[d] + sa[d] for d in range(1, len(oa)))

    for offsets, sizes, n in boxes:
        start = offsets[0]
        while ends and ends[0][0] <= start:
            _, entry = heapq.heappop(ends)
            del active[bisect_left(active, entry)]
        entry = (offsets[1:], n)
        pos = bisect_left(active, entry)
        for neighbour in (pos - 1, pos):
            if 0 <= neighbour < len(active) and meet(active[neighbour][1], n):
                return min(active[neighbour][1], n), max(active[neighbour][1], n)
        insort(active, entry)
        heapq.heappush(ends, (start + sizes[0], entry))
    return None


def chunk_cover_problems(key: str, shape: tuple[int, ...], chunks: tuple[ChunkInfo, ...]) -> list[Problem]:
    """Chunks outside the tensor, overlapping, or leaving elements uncovered."""
    problems: list[Problem] = []
    ndim = len(shape)
    for n, c in enumerate(chunks):
        file = c.storage.file if c.storage else None
        if len(c.offsets) != ndim or len(c.sizes) != ndim:
            problems.append(Problem(P_CHUNK_BOUNDS, f"chunk {n} ({_box_str(c)}) does not have the tensor's {ndim} "
                                    f"dims (shape {list(shape)})", key, file))
        elif any(o < 0 or s < 0 or (s > 0 and o + s > dim) for o, s, dim in zip(c.offsets, c.sizes, shape)):
            problems.append(Problem(P_CHUNK_BOUNDS, f"chunk {n} ({_box_str(c)}) lies outside the tensor's shape "
                                    f"{list(shape)}", key, file))
    if problems:
        return problems
    numel = math.prod(shape)
    if numel == 0:
        return problems
    if len(chunks) == 1 and all(o == 0 for o in chunks[0].offsets) and chunks[0].sizes == shape:
        return problems  # the common case: one chunk holds the whole tensor
    if covers_exactly(shape, list(chunks)):
        return problems
    volume = sum(c.numel for c in chunks)
    pair = find_overlapping_chunks(chunks)
    if pair is not None:
        a, b = chunks[pair[0]], chunks[pair[1]]
        problems.append(Problem(
            P_CHUNK_OVERLAP,
            f"chunks {pair[0]} ({_box_str(a)}{_chunk_where(a)}) and {pair[1]} ({_box_str(b)}{_chunk_where(b)}) overlap",
            key, (a.storage or b.storage).file if (a.storage or b.storage) else None))
        if volume <= numel:
            problems.append(Problem(P_CHUNK_GAP, f"chunks leave elements of the tensor (shape {list(shape)}) "
                                    f"uncovered: {volume} stored elements, some twice, for {numel}", key))
    elif volume < numel:
        problems.append(Problem(P_CHUNK_GAP, f"chunks leave elements of the tensor (shape {list(shape)}) uncovered: "
                                f"{len(chunks)} chunks hold {volume} of {numel} elements", key))
    else:
        problems.append(Problem(P_CHUNK_OVERLAP, f"chunks do not cover the tensor (shape {list(shape)}) exactly: "
                                f"{len(chunks)} chunks hold {volume} elements for {numel}, some of them twice", key))
    return problems


# --- files and byte ranges ---------------------------------------------------------------


def _storage_problems(storage: Storage, md: CheckpointMetadata, files: dict[str, FileInfo]) -> list[Problem]:
    """Referenced files present and regular, byte ranges inside them and not overlapping, every chunk stored."""
    problems: list[Problem] = []
    per_file: dict[str, list[tuple[int, int, str]]] = {}

    def file_info(name: str) -> FileInfo:
        info = files.get(name)
        if info is not None:
            return info
        try:
            check_name(name)
        except CheckpointFormatError:
            info = FileInfo(name=name, size=None, role="shard", status="OUTSIDE")
        else:
            entry = storage.stat(name)  # a name with dirs in it: walked without following links
            status = ("MISSING" if entry is None else "SYMLINK" if entry.kind == SYMLINK
                      else "ok" if entry.kind == FILE else "NOT A FILE")
            info = FileInfo(name=name, size=entry.size if entry is not None and entry.kind == FILE else None,
                            role="shard", status=status)
        files[name] = info
        return info

    def visit(key: str, what: str, ref: StorageRef | None, min_bytes: int) -> None:
        if ref is None:
            problems.append(Problem(P_NO_STORAGE, f"{what} has no storage entry: its data is not in the checkpoint", key))
            return
        if not ref.file:
            problems.append(Problem(P_MISSING_FILE, f"{what} has a storage entry that names no file", key))
            return
        info = file_info(ref.file)
        info.items += 1
        info.referenced_bytes += ref.length
        if info.status == "OUTSIDE":
            problems.append(Problem(P_OUTSIDE, f"{what} names a file outside the checkpoint dir: {ref.file!r} "
                                    "(not looked at)", key, ref.file))
            return
        if info.status == "SYMLINK":
            problems.append(Problem(P_SYMLINK, f"{what} is stored in {ref.file}, which is (or lies behind) a symlink: "
                                    "not followed", key, ref.file))
            return
        if info.status == "NOT A FILE":
            problems.append(Problem(P_NOT_FILE, f"{what} is stored in {ref.file}, which is not a regular file", key,
                                    ref.file))
            return
        if info.size is None:
            problems.append(Problem(P_MISSING_FILE, f"{what} is stored in {ref.file}, which is missing", key, ref.file))
            return
        if ref.end > info.size:
            problems.append(Problem(P_BYTE_RANGE, f"{what}: bytes [{ref.offset}, {ref.end}) lie outside {ref.file} "
                                    f"({info.size} bytes: truncated?)", key, ref.file))
            return
        if not ref.transforms and ref.length < min_bytes:
            problems.append(Problem(P_BYTE_RANGE, f"{what}: {ref.length} bytes in {ref.file} cannot hold its "
                                    f"{min_bytes} bytes of data", key, ref.file))
        per_file.setdefault(ref.file, []).append((ref.offset, ref.end, key))

    for key, info in md.keys.items():
        if info.kind == KIND_BYTES:
            visit(key, "the byte item", info.chunks[0].storage, 0)
            continue
        for n, c in enumerate(info.chunks):
            what = "the tensor" if len(info.chunks) == 1 else f"chunk {n} ({_box_str(c)})"
            visit(key, what, c.storage, c.numel * (info.itemsize or 0) if c.numel > 0 else 0)
    for fqn, offset, ref in md.orphans:
        at = f" at offsets {list(offset)}" if offset is not None else ""
        problems.append(Problem(P_ORPHAN_STORAGE, f"a storage entry for {fqn!r}{at} in {ref.file} matches no chunk "
                                "of the metadata", fqn if fqn in md.keys else None, ref.file))
    # Two items sharing bytes of a file: sort by offset and sweep, O(n log n) per file.
    for name, ranges in per_file.items():
        ranges.sort()
        reach, reach_key = -1, ""
        for start, end, key in ranges:
            if start < reach and end > start:
                problems.append(Problem(P_BYTE_OVERLAP, f"its bytes [{start}, {end}) in {name} overlap those of "
                                        f"{reach_key!r}", key, name))
            if end > reach:
                reach, reach_key = end, key
    return problems


def _manifest_problems(md: CheckpointMetadata, manifest: Manifest) -> list[Problem]:
    """Keys, kinds, shapes and dtypes of fsdpck.json against the metadata (no data read)."""
    problems: list[Problem] = []
    for key in manifest.keys.keys() - md.keys.keys():
        problems.append(Problem(P_MANIFEST_MISMATCH, f"listed in {MANIFEST_NAME} but not in the checkpoint", key))
    for key, info in md.keys.items():
        entry = manifest.keys.get(key)
        if entry is None:
            problems.append(Problem(P_MANIFEST_MISMATCH, f"in the checkpoint but not in {MANIFEST_NAME}", key))
        elif entry.kind == KIND_OBJECT and info.kind != KIND_BYTES:
            problems.append(Problem(P_MANIFEST_MISMATCH, f"{MANIFEST_NAME} lists an object, the checkpoint holds a "
                                    "tensor", key))
        elif entry.kind == KIND_TENSOR and info.kind != KIND_TENSOR:
            problems.append(Problem(P_MANIFEST_MISMATCH, f"{MANIFEST_NAME} lists a tensor, the checkpoint holds a "
                                    "byte item", key))
        elif entry.kind == KIND_TENSOR:
            if tuple(entry.shape or ()) != info.shape:
                problems.append(Problem(P_MANIFEST_MISMATCH, f"shape {list(info.shape or ())} in the checkpoint, "
                                        f"{list(entry.shape or ())} in {MANIFEST_NAME}", key))
            if entry.dtype != info.dtype:
                problems.append(Problem(P_MANIFEST_MISMATCH, f"dtype {info.dtype} in the checkpoint, {entry.dtype} "
                                        f"in {MANIFEST_NAME}", key))
    problems.sort(key=lambda p: p.key or "")
    return problems
