"""Open a DCP checkpoint dir without fear: safe metadata reading, integrity checks, inspect and diff.

Everything here runs in one process, with no process group and no GPU, on any checkpoint
written by torch.distributed.checkpoint's ``FileSystemWriter`` — not only fsdpck's.

* ``.metadata`` is a pickle, and DCP's own ``FileSystemReader.read_metadata`` runs
  ``pickle.load`` on it: a crafted checkpoint dir runs code on whoever opens it. Here it
  is read by :class:`RestrictedUnpickler`, which admits only the classes DCP metadata is
  made of (:data:`ADMITTED_GLOBALS`) and refuses anything else, naming it, before it is
  called. The list was taken from ``pickletools`` dumps of ``.metadata`` files that
  torch 2.13 wrote for plain tensors of many dtypes, nested dicts, byte objects (ints,
  strings, scheduler state), 0-dim and empty tensors, FSDP1 ShardedTensor and FSDP2
  DTensor state at 2 and 3 ranks, and ``format_utils.torch_save_to_dcp`` output.
* Integrity (:func:`open_checkpoint_dir`) comes from the metadata and file sizes alone:
  every referenced file present and every byte range inside it, every chunk inside its
  tensor, the chunks covering each tensor exactly (:func:`chunk_cover_problems`), and
  the leftovers of an unfinished save.
* Data is read through DCP's own reader (``FileSystemReader`` + ``dcp.load``, so storage
  transforms keep working), handed the safely unpickled metadata and a planner that keeps
  byte items as raw bytes — DCP's default planner would ``torch.load(weights_only=False)``
  them. Tensors are read a batch of keys at a time into plain tensors of their global
  shape, so memory stays near the largest single tensor (or :data:`READ_BATCH_BYTES`).

The functions return plain dataclasses; ``fsdpck.report_ckpt`` renders them and
``fsdpck.cli_ckpt`` holds the commands.
"""

from __future__ import annotations

import contextlib
import fnmatch
import functools
import gc
import hashlib
import heapq
import io
import math
import os
import pickle
import time
import warnings
import zipfile
from bisect import bisect_left, insort
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Any, Iterable, Iterator

from fsdpck.errors import CheckpointFormatError, UsageError
from fsdpck.manifest import KIND_OBJECT, KIND_TENSOR, MANIFEST_NAME, Manifest, read_manifest

METADATA_NAME = ".metadata"
SHARD_SUFFIX = ".distcp"
# Tensors are read this many bytes of keys at a time (a key larger than this is read alone),
# so that a checkpoint of many small keys does not pay DCP's per-load overhead per key.
READ_BATCH_BYTES = 64 << 20
# max |Δ| is computed in blocks of this many elements (float64 temporaries of 8 MiB each).
DIFF_BLOCK_NUMEL = 1 << 20
# Chunk-cover checks use 2**ndim corners per chunk; above this many dims (no tensor DCP
# writes has them) fall back to the volume and overlap checks alone.
MAX_CORNER_NDIM = 12

KIND_BYTES = "bytes"

# Problem kinds: each problem of a report has one.
P_NOT_CHECKPOINT = "not-a-checkpoint"
P_INCOMPLETE = "incomplete"
P_METADATA = "metadata"
P_MISSING_FILE = "missing-file"
P_OUTSIDE = "file-outside-dir"
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


# --- the restricted unpickler ----------------------------------------------------------

_DCP_METADATA = "torch.distributed.checkpoint.metadata"
_DCP_FILESYSTEM = "torch.distributed.checkpoint.filesystem"

# (module, name) -> where the object comes from. Only these globals may appear in a
# .metadata pickle; dataclass instances themselves are built with NEWOBJ/BUILD opcodes,
# which need no further globals. Path objects (StorageMeta.checkpoint_id) and layouts are
# resolved to harmless stand-ins of fsdpck's own rather than to the named callables.
_ADMITTED_CLASSES: dict[tuple[str, str], str] = {
    (_DCP_METADATA, "Metadata"): "dcp",
    (_DCP_METADATA, "TensorStorageMetadata"): "dcp",
    (_DCP_METADATA, "BytesStorageMetadata"): "dcp",
    (_DCP_METADATA, "ChunkStorageMetadata"): "dcp",
    (_DCP_METADATA, "TensorProperties"): "dcp",
    (_DCP_METADATA, "MetadataIndex"): "dcp",
    (_DCP_METADATA, "StorageMeta"): "dcp",
    (_DCP_METADATA, "_MEM_FORMAT_ENCODING"): "dcp",
    (_DCP_FILESYSTEM, "_StorageInfo"): "dcp",
    ("torch", "Size"): "torch",
    ("collections", "OrderedDict"): "collections",
    ("torch.serialization", "_get_layout"): "layout",
    ("pathlib", "PosixPath"): "posix-path",
    ("pathlib", "PurePosixPath"): "posix-path",
    ("pathlib", "WindowsPath"): "windows-path",
    ("pathlib", "PureWindowsPath"): "windows-path",
    # Python 3.13 moved the concrete path classes into pathlib._local.
    ("pathlib._local", "PosixPath"): "posix-path",
    ("pathlib._local", "PurePosixPath"): "posix-path",
    ("pathlib._local", "WindowsPath"): "windows-path",
    ("pathlib._local", "PureWindowsPath"): "windows-path",
}

# Shown by ``admitted_globals()`` and in the docs: torch.<dtype> covers every torch.dtype.
ADMITTED_GLOBALS: tuple[str, ...] = tuple(f"{m}.{n}" for m, n in _ADMITTED_CLASSES) + (
    "torch.<dtype> (any torch.dtype by name, e.g. torch.float32, torch.bfloat16)",
    "torch.<layout> / torch.<memory_format> (by name, e.g. torch.strided)",
)


def _layout_from_name(name: Any) -> Any:
    """Stand-in for ``torch.serialization._get_layout``: only a known layout's name, nothing else."""
    import torch

    if isinstance(name, str) and name.startswith("torch."):
        value = getattr(torch, name[len("torch.") :], None)
        if isinstance(value, torch.layout):
            return value
    raise pickle.UnpicklingError(f"{name!r} is not the name of a torch.layout")


@functools.lru_cache(maxsize=None)
def _resolve_global(module: str, name: str) -> Any:
    """The object a .metadata pickle may name as ``module.name``, or None when it is not admitted."""
    import torch

    origin = _ADMITTED_CLASSES.get((module, name))
    if origin == "dcp":
        import torch.distributed.checkpoint.filesystem as dcp_fs
        import torch.distributed.checkpoint.metadata as dcp_md

        return getattr(dcp_md if module == _DCP_METADATA else dcp_fs, name)
    if origin == "torch":
        return torch.Size
    if origin == "collections":
        from collections import OrderedDict

        return OrderedDict
    if origin == "layout":
        return _layout_from_name
    if origin == "posix-path":
        return PurePosixPath
    if origin == "windows-path":
        return PureWindowsPath
    if module == "torch" and "." not in name:
        value = getattr(torch, name, None)
        if isinstance(value, (torch.dtype, torch.layout, torch.memory_format)):
            return value
    return None


@contextlib.contextmanager
def gc_paused() -> Iterator[None]:
    """Pause the cyclic GC while building many small objects that are all kept.

    Unpickling and parsing a large .metadata allocate hundreds of thousands of objects,
    and the GC would rescan them again and again: with it on, a 10,000-key checkpoint
    takes ~1.4 s to open instead of ~0.2 s.
    """
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


class RestrictedUnpickler(pickle.Unpickler):
    """An unpickler for DCP ``.metadata`` that admits only the classes DCP metadata is made of.

    Every global a pickle names goes through ``find_class``; anything not admitted raises
    CheckpointFormatError naming ``module.name`` before it could be called, so a
    ``__reduce__`` payload (``os.system``, ``builtins.exec``, ...) never runs. Persistent
    ids are refused by pickle itself (no ``persistent_load``).
    """

    def __init__(self, file: Any, *, source: str = METADATA_NAME):
        super().__init__(file)
        self.source = source

    def find_class(self, module: str, name: str) -> Any:
        obj = _resolve_global(module, name)
        if obj is None:
            raise CheckpointFormatError(
                f"{self.source}: refused to unpickle {module}.{name}: it is not one of the classes DCP "
                "metadata is made of (a crafted or foreign file; nothing in it was executed)"
            )
        return obj


def load_metadata(path: str | os.PathLike) -> Any:
    """The DCP ``Metadata`` object in the ``.metadata`` file at ``path``, unpickled safely.

    Raises CheckpointFormatError for anything that is not a readable DCP metadata pickle.
    """
    from torch.distributed.checkpoint.metadata import Metadata

    path = Path(path)
    try:
        data = path.read_bytes()
    except IsADirectoryError:
        raise CheckpointFormatError(f"{path}: is a directory, not DCP metadata") from None
    except OSError as e:
        raise CheckpointFormatError(f"{path}: cannot read: {e.strerror or e}") from None
    if not data:
        raise CheckpointFormatError(f"{path}: empty file (0 bytes): not DCP metadata")
    try:
        with gc_paused():
            obj = RestrictedUnpickler(io.BytesIO(data), source=str(path)).load()
    except CheckpointFormatError:
        raise
    except Exception as e:  # a hostile or damaged pickle can fail in any way; none is a crash of fsdpck
        raise CheckpointFormatError(f"{path}: not a readable DCP metadata pickle: {type(e).__name__}: {e}") from None
    if not isinstance(obj, Metadata):
        raise CheckpointFormatError(f"{path}: holds a {type(obj).__name__}, not DCP Metadata")
    return obj


# --- the metadata model ----------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class StorageRef:
    """Where one stored item lies: a file relative to the checkpoint dir and a byte range in it."""

    file: str
    offset: int
    length: int
    transforms: tuple[str, ...] = ()

    @property
    def end(self) -> int:
        return self.offset + self.length


@dataclass(frozen=True, slots=True)
class ChunkInfo:
    """One stored chunk of a tensor (global offsets and sizes), or the one blob of a byte item."""

    offsets: tuple[int, ...]
    sizes: tuple[int, ...]
    storage: StorageRef | None

    @property
    def numel(self) -> int:
        return math.prod(self.sizes)


@dataclass(frozen=True, slots=True)
class KeyInfo:
    """One DCP key of ``state_dict_metadata``: a tensor (shape, dtype, chunks) or a byte item."""

    key: str
    kind: str  # "tensor" or "bytes"
    shape: tuple[int, ...] | None
    dtype: str | None  # "float32", as torch names it without the "torch." prefix
    itemsize: int | None
    chunks: tuple[ChunkInfo, ...]

    @property
    def numel(self) -> int | None:
        return None if self.shape is None else math.prod(self.shape)

    @property
    def stored_bytes(self) -> int:
        return sum(c.storage.length for c in self.chunks if c.storage is not None)

    @property
    def files(self) -> tuple[str, ...]:
        return tuple(sorted({c.storage.file for c in self.chunks if c.storage is not None}))


@dataclass(slots=True)
class CheckpointMetadata:
    """The parts of DCP's ``Metadata`` fsdpck uses, as plain data."""

    dcp_version: str | None
    keys: dict[str, KeyInfo]
    orphans: list[tuple[str, tuple[int, ...] | None, StorageRef]]  # storage entries no chunk points at
    storage_entries: int


def _ints(value: Any, what: str) -> tuple[int, ...]:
    if not isinstance(value, (tuple, list)):
        raise CheckpointFormatError(f"{what}: expected a sequence of integers, got {type(value).__name__}")
    out = []
    for v in value:
        if isinstance(v, bool) or not isinstance(v, int):
            raise CheckpointFormatError(f"{what}: expected integers, got {v!r}")
        out.append(int(v))
    return tuple(out)


def _int(value: Any, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise CheckpointFormatError(f"{what}: expected an integer, got {value!r}")
    return int(value)


def parse_metadata(md: Any, *, source: str = METADATA_NAME) -> CheckpointMetadata:
    """Turn DCP ``Metadata`` into :class:`CheckpointMetadata`; CheckpointFormatError for anything malformed.

    The restricted unpickler only admits DCP's classes, but a crafted pickle can still
    leave their fields missing or of any admitted type; none of that may crash fsdpck.
    """
    try:
        return _parse_metadata(md, source)
    except CheckpointFormatError:
        raise
    except Exception as e:  # a field missing or of a wrong type somewhere in a crafted object graph
        raise CheckpointFormatError(f"{source}: malformed DCP metadata: {type(e).__name__}: {e}") from None


def _parse_metadata(md: Any, source: str) -> CheckpointMetadata:
    import torch
    from torch.distributed.checkpoint.filesystem import _StorageInfo
    from torch.distributed.checkpoint.metadata import (
        BytesStorageMetadata,
        Metadata,
        MetadataIndex,
        TensorStorageMetadata,
    )

    if not isinstance(md, Metadata):
        raise CheckpointFormatError(f"{source}: holds a {type(md).__name__}, not DCP Metadata")
    sdm = md.state_dict_metadata
    if not isinstance(sdm, dict):
        raise CheckpointFormatError(f"{source}: state_dict_metadata is a {type(sdm).__name__}, not a dict")
    storage = md.storage_data
    if storage is None:
        storage = {}
    if not isinstance(storage, dict):
        raise CheckpointFormatError(
            f"{source}: storage_data is a {type(storage).__name__}: not written by DCP's FileSystemWriter"
        )
    version = md.version if isinstance(md.version, str) else None

    refs: dict[tuple[str, tuple[int, ...] | None], StorageRef] = {}
    for index, info in storage.items():
        if not isinstance(index, MetadataIndex) or not isinstance(info, _StorageInfo):
            raise CheckpointFormatError(
                f"{source}: storage_data maps {type(index).__name__} to {type(info).__name__}: "
                "not written by DCP's FileSystemWriter"
            )
        fqn = index.fqn
        if not isinstance(fqn, str):
            raise CheckpointFormatError(f"{source}: a storage entry's key is {fqn!r}, not a string")
        offset = None if index.offset is None else _ints(index.offset, f"{source}: storage entry {fqn!r} offset")
        if not isinstance(info.relative_path, str):
            raise CheckpointFormatError(f"{source}: storage entry {fqn!r}: file name {info.relative_path!r} is not a string")
        transforms = getattr(info, "transform_descriptors", None) or ()
        refs[(fqn, offset)] = StorageRef(
            file=info.relative_path,
            offset=_int(info.offset, f"{source}: storage entry {fqn!r} byte offset"),
            length=_int(info.length, f"{source}: storage entry {fqn!r} byte length"),
            transforms=tuple(str(t) for t in transforms),
        )

    used: set[tuple[str, tuple[int, ...] | None]] = set()
    keys: dict[str, KeyInfo] = {}
    for key, item in sdm.items():
        if not isinstance(key, str):
            raise CheckpointFormatError(f"{source}: state_dict_metadata has a key {key!r} that is not a string")
        if isinstance(item, TensorStorageMetadata):
            dtype = getattr(item.properties, "dtype", None)
            if not isinstance(dtype, torch.dtype):
                raise CheckpointFormatError(f"{source}: key {key!r}: dtype {dtype!r} is not a torch.dtype")
            shape = _ints(item.size, f"{source}: key {key!r} size")
            if not isinstance(item.chunks, (list, tuple)):
                raise CheckpointFormatError(f"{source}: key {key!r}: chunks is a {type(item.chunks).__name__}")
            chunks = []
            for n, chunk in enumerate(item.chunks):
                offsets = _ints(getattr(chunk, "offsets", None), f"{source}: key {key!r} chunk {n} offsets")
                sizes = _ints(getattr(chunk, "sizes", None), f"{source}: key {key!r} chunk {n} sizes")
                ref = refs.get((key, offsets))
                if ref is not None:
                    used.add((key, offsets))
                chunks.append(ChunkInfo(offsets=offsets, sizes=sizes, storage=ref))
            keys[key] = KeyInfo(
                key=key,
                kind=KIND_TENSOR,
                shape=shape,
                dtype=str(dtype).removeprefix("torch."),
                itemsize=dtype.itemsize,
                chunks=tuple(chunks),
            )
        elif isinstance(item, BytesStorageMetadata):
            ref = refs.get((key, None))
            if ref is not None:
                used.add((key, None))
            keys[key] = KeyInfo(
                key=key, kind=KIND_BYTES, shape=None, dtype=None, itemsize=None, chunks=(ChunkInfo((), (), ref),)
            )
        else:
            raise CheckpointFormatError(f"{source}: key {key!r} is described by a {type(item).__name__}")
    orphans = [(fqn, off, ref) for (fqn, off), ref in refs.items() if (fqn, off) not in used]
    return CheckpointMetadata(dcp_version=version, keys=keys, orphans=orphans, storage_entries=len(refs))


# --- integrity -------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Problem:
    """One thing wrong with a checkpoint dir; names the key and the file where it has them."""

    kind: str
    message: str
    key: str | None = None
    file: str | None = None


@dataclass(slots=True)
class FileInfo:
    """A file of the checkpoint dir, or one its metadata names."""

    name: str
    size: int | None  # None: missing (or outside the dir, not looked at)
    role: str  # "metadata", "manifest", "shard", "leftover", "other"
    status: str  # "ok", "MISSING", "OUTSIDE", "unreferenced", "LEFTOVER"
    items: int = 0  # storage entries in this file
    referenced_bytes: int = 0


def _box_str(chunk: ChunkInfo) -> str:
    return f"offsets {list(chunk.offsets)} sizes {list(chunk.sizes)}"


def _chunk_where(chunk: ChunkInfo) -> str:
    return f" in {chunk.storage.file}" if chunk.storage is not None else ""


def find_overlapping_chunks(chunks: Iterable[ChunkInfo]) -> tuple[int, int] | None:
    """Two chunks that share an element, or None: a sweep along dim 0, O(n log n).

    Chunks are visited in order of their dim-0 start; the chunks whose dim-0 range
    contains the current start ("active") are kept sorted by their offsets in the other
    dims, and a new chunk is tested against its two neighbours in that order only.
    Active chunks all overlap along dim 0, so as long as no overlap has been found they
    are pairwise disjoint in the other dims. For tensors of up to 2 dims that makes the
    search exact (disjoint intervals sorted by start are sorted by end too: a new interval
    that meets any of them meets a neighbour). For 3 dims and more it finds every overlap
    between chunks of a row-block or grid partition (FSDP, TP, EP) that share their
    non-leading offsets, but may miss others; :func:`chunk_cover_problems` does not rely on
    it to decide whether the cover is exact, only to name a pair.
    """
    boxes = [(c.offsets, c.sizes, n) for n, c in enumerate(chunks) if c.numel > 0]
    if len(boxes) < 2:
        return None
    if not boxes[0][0]:
        return boxes[0][2], boxes[1][2]  # 0-dim: two chunks of one element
    boxes.sort(key=lambda b: (b[0][0], b[0][1:], b[2]))
    active: list[tuple[tuple[int, ...], int]] = []  # (offsets in dims 1.., n), sorted
    by_n = {n: (o, s) for o, s, n in boxes}
    ends: list[tuple[int, tuple[tuple[int, ...], int]]] = []  # heap of (dim-0 end, active entry)

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


def _covers_exactly(shape: tuple[int, ...], chunks: list[ChunkInfo]) -> bool:
    """Whether the chunks (all inside ``shape``) cover every element exactly once; O(n · 2**ndim).

    The count of chunks covering each element, f, is determined by its signed corner
    measure: each box [o, o+s) adds +1 or -1 at its 2**ndim corners (the sign is -1 for an
    odd number of upper coordinates), and prefix sums along every dim rebuild f. So f == 1
    on the tensor (an exact cover: no overlap, no gap) iff the corner sums of the chunks
    equal the corners of the whole tensor. Exact in any number of dims, no sorting.
    """
    ndim = len(shape)
    counts: dict[tuple[int, ...], int] = {}
    masks = range(1 << ndim)
    signs = [(-1) ** bin(m).count("1") for m in masks]
    for c in chunks:
        if c.numel == 0:
            continue
        lo, hi = c.offsets, tuple(o + s for o, s in zip(c.offsets, c.sizes))
        for m in masks:
            corner = tuple(hi[d] if (m >> d) & 1 else lo[d] for d in range(ndim))
            counts[corner] = counts.get(corner, 0) + signs[m]
    target = {}
    for m in masks:
        target[tuple(shape[d] if (m >> d) & 1 else 0 for d in range(ndim))] = signs[m]
    return {k: v for k, v in counts.items() if v} == target


def chunk_cover_problems(key: str, shape: tuple[int, ...], chunks: tuple[ChunkInfo, ...]) -> list[Problem]:
    """Chunks outside the tensor, overlapping, or leaving elements uncovered: O(n log n) in the chunk count.

    Bounds are checked per chunk; whether the in-bounds chunks cover the tensor exactly is
    decided by :func:`_covers_exactly` (exact in any number of dims); when they do not,
    the stored volume against the element count and :func:`find_overlapping_chunks` say
    how, naming a pair of overlapping chunks where the sweep finds one.
    """
    problems: list[Problem] = []
    ndim = len(shape)
    for n, c in enumerate(chunks):
        if len(c.offsets) != ndim or len(c.sizes) != ndim:
            problems.append(Problem(P_CHUNK_BOUNDS, f"chunk {n} ({_box_str(c)}) does not have the tensor's {ndim} dims "
                                    f"(shape {list(shape)})", key, c.storage.file if c.storage else None))
        elif any(o < 0 or s < 0 or (s > 0 and o + s > dim) for o, s, dim in zip(c.offsets, c.sizes, shape)):
            problems.append(Problem(P_CHUNK_BOUNDS, f"chunk {n} ({_box_str(c)}) lies outside the tensor's shape "
                                    f"{list(shape)}", key, c.storage.file if c.storage else None))
    if problems:
        return problems
    numel = math.prod(shape)
    if numel == 0:
        return problems
    if len(chunks) == 1 and all(o == 0 for o in chunks[0].offsets) and chunks[0].sizes == shape:
        return problems  # the common case: one chunk holds the whole tensor
    volume = sum(c.numel for c in chunks)
    if ndim <= MAX_CORNER_NDIM:
        if volume == numel and _covers_exactly(shape, list(chunks)):
            return problems
    pair = find_overlapping_chunks(chunks)
    if ndim > MAX_CORNER_NDIM and pair is None and volume == numel:
        return problems  # beyond MAX_CORNER_NDIM dims only the volume and the sweep judge the cover
    if pair is not None:
        a, b = chunks[pair[0]], chunks[pair[1]]
        problems.append(Problem(
            P_CHUNK_OVERLAP,
            f"chunks {pair[0]} ({_box_str(a)}{_chunk_where(a)}) and {pair[1]} ({_box_str(b)}{_chunk_where(b)}) overlap",
            key, (a.storage or b.storage).file if (a.storage or b.storage) else None))
        if volume <= numel:
            problems.append(Problem(P_CHUNK_GAP, f"chunks leave elements of the tensor (shape {list(shape)}) uncovered: "
                                    f"{volume} stored elements, some twice, for {numel}", key))
    elif volume < numel or ndim <= 2:
        problems.append(Problem(P_CHUNK_GAP, f"chunks leave elements of the tensor (shape {list(shape)}) uncovered: "
                                f"{len(chunks)} chunks hold {volume} of {numel} elements", key))
    else:
        problems.append(Problem(P_CHUNK_OVERLAP, f"chunks do not cover the tensor (shape {list(shape)}) exactly: "
                                f"{len(chunks)} chunks hold {volume} elements for {numel}, some of them twice", key))
    return problems


def _safe_relative(name: str) -> bool:
    """Whether a file name from the metadata stays inside the checkpoint dir (no absolute path, no ``..``)."""
    if not name or "\x00" in name:
        return False
    for pure in (PurePosixPath(name), PureWindowsPath(name)):
        if pure.is_absolute() or pure.anchor or ".." in pure.parts:
            return False
    return True


@dataclass(slots=True)
class CheckpointDir:
    """A checkpoint dir as opened: metadata (when readable), files, manifest, and integrity problems."""

    root: Path
    metadata: CheckpointMetadata | None
    raw_metadata: Any  # DCP's Metadata object (for reading data through DCP); not part of reports
    metadata_bytes: int | None
    files: list[FileInfo]
    problems: list[Problem]
    notes: list[str]
    manifest: Manifest | None
    manifest_error: str | None

    @property
    def incomplete(self) -> bool:
        return any(p.kind == P_INCOMPLETE for p in self.problems)

    @property
    def data_bytes(self) -> int:
        return sum(f.size or 0 for f in self.files if f.role == "shard" and f.items)

    def problem_keys(self) -> set[str]:
        return {p.key for p in self.problems if p.key is not None}


def check_dir_path(path: str | os.PathLike, *, what: str = "DIR") -> Path:
    """The checkpoint dir as a Path; UsageError (exit 2) when it does not exist or is not a dir."""
    if not str(path):
        raise UsageError(f"{what} is empty: give the checkpoint dir")
    p = Path(path)
    if not p.exists():
        raise UsageError(f"{what} {str(path)!r} does not exist")
    if not p.is_dir():
        raise UsageError(f"{what} {str(path)!r} is a file, not a checkpoint dir")
    return p


def open_checkpoint_dir(path: str | os.PathLike, *, what: str = "DIR") -> CheckpointDir:
    """Read a checkpoint dir's metadata safely and check its integrity from metadata and file sizes alone."""
    root = check_dir_path(path, what=what)
    problems: list[Problem] = []
    notes: list[str] = []
    on_disk: dict[str, int] = {}
    try:
        with os.scandir(root) as it:
            for entry in it:
                try:
                    if entry.is_file():
                        on_disk[entry.name] = entry.stat().st_size
                except OSError:
                    continue
    except OSError as e:
        raise UsageError(f"{what} {str(path)!r} cannot be listed: {e.strerror or e}") from None

    # The manifest, when there is one.
    manifest = None
    manifest_error = None
    try:
        manifest = read_manifest(root)
    except CheckpointFormatError as e:
        manifest_error = e.message
        problems.append(Problem(P_MANIFEST, e.message, file=MANIFEST_NAME))

    # Leftovers of a save that did not finish: DCP writes .metadata.tmp, then renames it.
    for name in sorted(on_disk):
        if name.endswith(METADATA_NAME + ".tmp"):
            problems.append(Problem(P_INCOMPLETE, f"{name} is left over from a save that did not finish "
                                    "(DCP writes it last and renames it to .metadata)", file=name))
    shards = sorted(n for n in on_disk if n.endswith(SHARD_SUFFIX))

    md = raw = None
    metadata_bytes = on_disk.get(METADATA_NAME)
    md_path = root / METADATA_NAME
    if METADATA_NAME not in on_disk and not md_path.exists():
        rank_local = sorted(n for n in on_disk if n.startswith("__") and n.endswith(METADATA_NAME))
        if shards:
            problems.append(Problem(P_INCOMPLETE, f"no {METADATA_NAME} but {len(shards)} shard file(s) "
                                    f"({_names(shards)}): a save that did not finish", file=METADATA_NAME))
        elif rank_local:
            problems.append(Problem(P_METADATA, f"no {METADATA_NAME}; only rank-local {_names(rank_local)} "
                                    "(saved without collectives), which fsdpck does not read", file=METADATA_NAME))
        else:
            empty = " (the dir is empty)" if not any(root.iterdir()) else ""
            problems.append(Problem(P_NOT_CHECKPOINT, f"no {METADATA_NAME}: not a DCP checkpoint dir{empty}",
                                    file=METADATA_NAME))
    elif not md_path.is_file():
        problems.append(Problem(P_METADATA, f"{md_path} is not a regular file", file=METADATA_NAME))
    else:
        try:
            raw = load_metadata(md_path)
            with gc_paused():
                md = parse_metadata(raw, source=str(md_path))
        except CheckpointFormatError as e:
            raw = None
            problems.append(Problem(P_METADATA, e.message, file=METADATA_NAME))

    files: dict[str, FileInfo] = {}
    for name, size in on_disk.items():
        role = ("metadata" if name == METADATA_NAME else "manifest" if name == MANIFEST_NAME
                else "leftover" if name.endswith(".tmp") else "shard" if name.endswith(SHARD_SUFFIX) else "other")
        status = "LEFTOVER" if role == "leftover" and name.endswith(METADATA_NAME + ".tmp") else "ok"
        files[name] = FileInfo(name=name, size=size, role=role, status=status)

    if md is not None:
        problems.extend(_storage_problems(root, md, files))
        for key, info in md.keys.items():
            if info.kind == KIND_TENSOR:
                problems.extend(chunk_cover_problems(key, info.shape or (), info.chunks))
        for name in shards:
            if files[name].items == 0:
                files[name].status = "unreferenced"
                notes.append(f"{name} is not referenced by {METADATA_NAME} (left over from an earlier save?)")
        if manifest is not None:
            problems.extend(_manifest_problems(md, manifest))
    return CheckpointDir(
        root=root, metadata=md, raw_metadata=raw, metadata_bytes=metadata_bytes, files=sorted(files.values(), key=lambda f: f.name),
        problems=problems, notes=notes, manifest=manifest, manifest_error=manifest_error,
    )


def _names(names: list[str], limit: int = 3) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f", ... ({len(names)} in all)" if len(names) > limit else "")


def _storage_problems(root: Path, md: CheckpointMetadata, files: dict[str, FileInfo]) -> list[Problem]:
    """Referenced files present, byte ranges inside them and not overlapping, every chunk stored."""
    problems: list[Problem] = []
    per_file: dict[str, list[tuple[int, int, str]]] = {}

    def visit(key: str, what: str, ref: StorageRef | None, min_bytes: int) -> None:
        if ref is None:
            problems.append(Problem(P_NO_STORAGE, f"{what} has no storage entry: its data is not in the checkpoint", key))
            return
        info = files.get(ref.file)
        if not ref.file:
            problems.append(Problem(P_MISSING_FILE, f"{what} has a storage entry that names no file", key))
            return
        if info is None:
            if not _safe_relative(ref.file):
                info = files[ref.file] = FileInfo(name=ref.file, size=None, role="shard", status="OUTSIDE")
            else:
                try:
                    size = (root / ref.file).stat().st_size if (root / ref.file).is_file() else None
                except OSError:
                    size = None
                info = files[ref.file] = FileInfo(name=ref.file, size=size, role="shard",
                                                  status="ok" if size is not None else "MISSING")
        info.items += 1
        info.referenced_bytes += max(ref.length, 0)
        if info.status == "OUTSIDE":
            problems.append(Problem(P_OUTSIDE, f"{what} names a file outside the checkpoint dir: {ref.file!r} "
                                    "(not looked at)", key, ref.file))
            return
        if info.size is None:
            problems.append(Problem(P_MISSING_FILE, f"{what} is stored in {ref.file}, which is missing", key, ref.file))
            return
        if ref.offset < 0 or ref.length < 0 or ref.end > info.size:
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
        problems.append(Problem(P_ORPHAN_STORAGE, f"a storage entry for {fqn!r}{at} in {ref.file} matches no "
                                "chunk of the metadata", fqn if fqn in md.keys else None, ref.file))
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
            continue
        if entry.kind == KIND_OBJECT and info.kind != KIND_BYTES:
            problems.append(Problem(P_MANIFEST_MISMATCH, f"{MANIFEST_NAME} lists an object, the checkpoint holds a tensor", key))
        elif entry.kind == KIND_TENSOR and info.kind != KIND_TENSOR:
            problems.append(Problem(P_MANIFEST_MISMATCH, f"{MANIFEST_NAME} lists a tensor, the checkpoint holds a byte item", key))
        elif entry.kind == KIND_TENSOR:
            if tuple(entry.shape or ()) != info.shape:
                problems.append(Problem(P_MANIFEST_MISMATCH, f"shape {list(info.shape or ())} in the checkpoint, "
                                        f"{list(entry.shape or ())} in {MANIFEST_NAME}", key))
            if entry.dtype != info.dtype:
                problems.append(Problem(P_MANIFEST_MISMATCH, f"dtype {info.dtype} in the checkpoint, {entry.dtype} "
                                        f"in {MANIFEST_NAME}", key))
    problems.sort(key=lambda p: p.key or "")
    return problems


# --- reading data through DCP ----------------------------------------------------------


@functools.lru_cache(maxsize=None)
def _dcp_reader_types() -> tuple[type, type]:
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner

    class SafeMetadataReader(FileSystemReader):
        """DCP's FileSystemReader, handed the metadata fsdpck unpickled with the restricted unpickler."""

        def __init__(self, path: Path, metadata: Any):
            super().__init__(path)
            self._fsdpck_metadata = metadata

        def read_metadata(self, *args: Any, **kwargs: Any) -> Any:
            return self._fsdpck_metadata

    class RawBytesPlanner(DefaultLoadPlanner):
        """Keeps byte items as raw bytes: DefaultLoadPlanner.load_bytes would torch.load(weights_only=False) them."""

        def __init__(self) -> None:
            super().__init__()
            self.raw: dict[str, bytes] = {}

        def load_bytes(self, read_item: Any, value: io.BytesIO) -> None:
            self.raw[read_item.dest_index.fqn] = value.getvalue()

    return SafeMetadataReader, RawBytesPlanner


def _describe_load_error(e: BaseException) -> str:
    """One line for a failed ``dcp.load``: the first rank's root cause, not DCP's traceback dump."""
    failures = getattr(e, "failures", None)
    if isinstance(failures, dict) and failures:
        first = next(iter(failures.values()))
        if isinstance(first, tuple) and first and isinstance(first[0], BaseException):
            e = first[0]
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}".rstrip(": ")


class CheckpointReader:
    """Reads the items of one checkpoint dir through DCP's own reader, without a process group."""

    def __init__(self, ckpt: CheckpointDir):
        if ckpt.raw_metadata is None:
            raise CheckpointFormatError(f"{ckpt.root}: its metadata is unreadable, so its data cannot be read")
        self.ckpt = ckpt

    def _load(self, state_dict: dict[str, Any]) -> Any:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.api import CheckpointException

        reader_type, planner_type = _dcp_reader_types()
        planner = planner_type()
        try:
            dcp.load(state_dict, storage_reader=reader_type(self.ckpt.root, self.ckpt.raw_metadata), planner=planner,
                     no_dist=True)
        except (Exception, CheckpointException) as e:  # CheckpointException is a BaseException
            raise _ReadFailed(_describe_load_error(e)) from None
        return planner

    def tensors(self, infos: list[KeyInfo], *, batch_bytes: int = READ_BATCH_BYTES) -> Iterator[tuple[KeyInfo, Any, str | None]]:
        """(key info, tensor or None, error or None) per tensor key, read in batches of about ``batch_bytes``."""
        batch: list[KeyInfo] = []
        size = 0
        for info in infos:
            nbytes = (info.numel or 0) * (info.itemsize or 0)
            if batch and size + nbytes > batch_bytes:
                yield from self._tensor_batch(batch)
                batch, size = [], 0
            batch.append(info)
            size += nbytes
        if batch:
            yield from self._tensor_batch(batch)

    def _tensor_batch(self, batch: list[KeyInfo]) -> Iterator[tuple[KeyInfo, Any, str | None]]:
        import torch

        try:
            state = {info.key: torch.empty(info.shape or (), dtype=getattr(torch, info.dtype or "")) for info in batch}
        except (RuntimeError, MemoryError, TypeError, ValueError, AttributeError) as e:
            if len(batch) == 1:
                yield batch[0], None, f"cannot allocate {list(batch[0].shape or ())} {batch[0].dtype}: {e}"
                return
            for info in batch:
                yield from self._tensor_batch([info])
            return
        try:
            self._load(state)
        except _ReadFailed as e:
            del state
            if len(batch) == 1:
                yield batch[0], None, str(e)
                return
            # Read one key at a time to find out which of the batch cannot be read.
            for info in batch:
                yield from self._tensor_batch([info])
            return
        for info in batch:
            tensor = state.pop(info.key)
            yield info, tensor, None
            del tensor

    def tensor(self, info: KeyInfo) -> Any:
        """One tensor key's data; _ReadFailed when it cannot be read."""
        for _, tensor, error in self._tensor_batch([info]):
            if error is not None:
                raise _ReadFailed(error)
            return tensor
        raise _ReadFailed("nothing read")  # pragma: no cover

    def byte_items(self, infos: list[KeyInfo]) -> Iterator[tuple[KeyInfo, bytes | None, str | None]]:
        """(key info, raw bytes or None, error or None) per byte item, never unpickled here."""
        if not infos:
            return
        try:
            planner = self._load({info.key: io.BytesIO() for info in infos})
        except _ReadFailed as e:
            if len(infos) == 1:
                yield infos[0], None, str(e)
                return
            for info in infos:
                yield from self.byte_items([info])
            return
        for info in infos:
            raw = planner.raw.get(info.key)
            yield (info, raw, None) if raw is not None else (info, None, "DCP read nothing for it")


class _ReadFailed(Exception):
    pass


def tensor_fingerprint(t: Any) -> str:
    """The DESIGN.md fingerprint of a whole tensor as 16 hex digits (complex128 through its float64 view)."""
    import torch

    from fsdpck.fingerprint import fp_tensor, to_hex

    if t.element_size() > 8 and t.is_complex():
        # The fingerprint is defined for itemsizes up to 8: take the float64 pairs instead.
        t = torch.view_as_real(t)
    return to_hex(fp_tensor(t))


def _canonical(obj: Any, depth: int = 0) -> str:
    """An order-insensitive, exact text form of a value torch.load(weights_only=True) produced."""
    import torch

    if depth > 64:
        raise ValueError("nested too deeply")
    if isinstance(obj, torch.Tensor):
        return f"tensor({str(obj.dtype).removeprefix('torch.')},{list(obj.shape)},{tensor_fingerprint(obj)})"
    if isinstance(obj, dict):
        items = sorted((_canonical(k, depth + 1), _canonical(v, depth + 1)) for k, v in obj.items())
        return "{" + ",".join(f"{k}:{v}" for k, v in items) + "}"
    if isinstance(obj, (list, tuple)):
        inner = ",".join(_canonical(v, depth + 1) for v in obj)
        return f"[{inner}]" if isinstance(obj, list) else f"({inner})"
    if isinstance(obj, float):
        return float.hex(obj) if math.isfinite(obj) else repr(obj)
    return f"{type(obj).__name__}:{obj!r}"


def _short_repr(obj: Any, limit: int = 48) -> str:
    import torch

    if isinstance(obj, torch.Tensor):
        text = f"tensor({list(obj.shape)}, {str(obj.dtype).removeprefix('torch.')})"
    else:
        text = repr(obj)
    return text if len(text) <= limit else text[: limit - 3] + "..."


@dataclass(frozen=True, slots=True)
class ByteItemIdentity:
    """What a byte item holds, as far as it can be told without unpickling arbitrary objects."""

    digest: str  # 16 hex digits: equal for equal values (not the tensor fingerprint)
    value: str | None  # a short repr when torch.load(weights_only=True) could decode it
    decoded: bool


def byte_item_identity(raw: bytes) -> ByteItemIdentity:
    """Identify a byte item: decoded with ``torch.load(weights_only=True)`` when that can, else by its pickle.

    DCP stores non-tensor values as ``torch.save`` archives, whose ``serialization_id``
    record differs from save to save; comparing decoded values (or, failing that, the
    archive's records without that id) makes equal values compare equal.
    """
    import torch

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            obj = torch.load(io.BytesIO(raw), weights_only=True, map_location="cpu")
        text = _canonical(obj)
        return ByteItemIdentity(hashlib.blake2b(text.encode(), digest_size=8).hexdigest(), _short_repr(obj), True)
    except Exception:  # not decodable without running code: fall back to the stored bytes
        pass
    h = hashlib.blake2b(digest_size=8)
    try:
        with zipfile.ZipFile(io.BytesIO(raw)) as z:
            for name in sorted(z.namelist()):
                if name.endswith("serialization_id"):
                    continue
                h.update(name.encode() + b"\0" + z.read(name) + b"\0")
    except (zipfile.BadZipFile, OSError, ValueError, EOFError, RuntimeError, NotImplementedError):
        h = hashlib.blake2b(raw, digest_size=8)
    return ByteItemIdentity(h.hexdigest(), None, False)


def max_abs_diff(a: Any, b: Any, *, block_numel: int = DIFF_BLOCK_NUMEL) -> float:
    """max |a - b| over all elements, in float64 blocks (int64 beyond 2**53 is approximate).

    Bitwise-equal elements count 0 (NaN against NaN, inf against inf); NaN against a
    number gives NaN, which is the result then.
    """
    import torch

    x, y = a.reshape(-1), b.reshape(-1)
    if x.numel() != y.numel():
        raise ValueError(f"cannot diff {x.numel()} elements against {y.numel()}")
    wide = torch.complex128 if (x.is_complex() or y.is_complex()) else torch.float64
    best = 0.0
    for start in range(0, x.numel(), block_numel):
        xs = x[start : start + block_numel].to(wide)
        ys = y[start : start + block_numel].to(wide)
        d = (xs - ys).abs()
        same = (xs == ys) | (torch.isnan(xs) & torch.isnan(ys))
        d.masked_fill_(same, 0.0)
        if torch.isnan(d).any():
            return math.nan
        best = max(best, float(d.max()))
    return best


# --- inspect ---------------------------------------------------------------------------

# Per-key statuses of inspect.
S_OK = "ok"
S_PROBLEM = "PROBLEM"
S_VERIFIED = "verified"
S_READ = "read ok"
S_MISMATCH = "MISMATCH"
S_UNREADABLE = "UNREADABLE"


@dataclass(slots=True)
class KeyRow:
    """One key of ``fsdpck inspect``: its layout, and what reading its data found."""

    key: str
    kind: str
    shape: tuple[int, ...] | None
    dtype: str | None
    chunks: tuple[ChunkInfo, ...]
    stored_bytes: int
    status: str
    fingerprint: str | None = None
    expected: str | None = None  # the manifest's fingerprint
    value: str | None = None  # byte items: a short repr, when decodable safely
    detail: str | None = None


@dataclass(slots=True)
class InspectResult:
    """What ``fsdpck inspect`` found: one set of facts that the table and the JSON show."""

    path: str
    torch_version: str
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
    warnings: list[str] = field(default_factory=list)
    readable: bool = True  # whether .metadata could be read at all

    @property
    def incomplete(self) -> bool:
        return any(p.kind == P_INCOMPLETE for p in self.problems)

    @property
    def verdict(self) -> str:
        if self.incomplete:
            return "INCOMPLETE"
        return "PROBLEMS" if self.problems else "OK"

    @property
    def exit_code(self) -> int:
        return 1 if self.problems else 0

    def count(self, status: str) -> int:
        return sum(1 for r in self.rows if r.status == status)


def _select_keys(keys: Iterable[str], glob: str | None, *, option: str = "--key", where: str = "") -> list[str]:
    keys = list(keys)
    if glob is None:
        return keys
    chosen = [k for k in keys if fnmatch.fnmatchcase(k, glob)]
    if not chosen and keys:
        raise UsageError(f"{option} {glob!r} matches none of the {len(keys)} keys{where}")
    return chosen


def inspect_checkpoint(path: str | os.PathLike, *, key_glob: str | None = None, verify_data: bool = False,
                       batch_bytes: int = READ_BATCH_BYTES) -> InspectResult:
    """Open ``path`` safely, check its integrity, and with ``verify_data`` read and fingerprint every item."""
    t0 = time.perf_counter()
    check_dir_path(path)  # a bad path is a usage error before the seconds torch takes to import
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        import torch
        import torch.distributed.checkpoint  # noqa: F401 (seconds of imports, timed apart from the work)

        t_import = time.perf_counter()
        ckpt = open_checkpoint_dir(path)
        t_open = time.perf_counter()
        md = ckpt.metadata
        keys = sorted(md.keys) if md is not None else []
        selected = _select_keys(keys, key_glob, where=f" of {ckpt.root}")
        problem_keys = ckpt.problem_keys()
        first_problem: dict[str, str] = {}
        for p in ckpt.problems:
            if p.key is not None:
                first_problem.setdefault(p.key, p.message)
        rows: dict[str, KeyRow] = {}
        for key in selected:
            info = md.keys[key]
            rows[key] = KeyRow(key=key, kind=info.kind, shape=info.shape, dtype=info.dtype, chunks=info.chunks,
                               stored_bytes=info.stored_bytes, status=S_PROBLEM if key in problem_keys else S_OK)
            entry = ckpt.manifest.keys.get(key) if ckpt.manifest is not None else None
            if entry is not None and entry.kind == KIND_TENSOR:
                rows[key].expected = entry.fingerprint
            if key in problem_keys:
                rows[key].detail = first_problem[key]
        problems = list(ckpt.problems)
        if verify_data and md is not None:
            problems.extend(_verify_data(ckpt, rows, problem_keys, batch_bytes=batch_bytes))
        t_end = time.perf_counter()

    return InspectResult(
        path=str(ckpt.root),
        torch_version=torch.__version__,
        dcp_version=md.dcp_version if md is not None else None,
        metadata_bytes=ckpt.metadata_bytes,
        n_keys=len(keys),
        n_tensors=sum(1 for k in keys if md.keys[k].kind == KIND_TENSOR) if md else 0,
        n_byte_items=sum(1 for k in keys if md.keys[k].kind == KIND_BYTES) if md else 0,
        data_bytes=ckpt.data_bytes,
        files=ckpt.files,
        manifest=ckpt.manifest,
        manifest_error=ckpt.manifest_error,
        key_glob=key_glob,
        rows=list(rows.values()),
        problems=problems,
        notes=ckpt.notes,
        verify_data=verify_data,
        timings={"import_s": t_import - t0, "metadata_and_integrity_s": t_open - t_import,
                 "verify_data_s": (t_end - t_open) if verify_data else 0.0, "total_s": t_end - t0},
        warnings=[f"{w.category.__name__}: {w.message}" for w in caught],
        readable=md is not None,
    )


def _verify_data(ckpt: CheckpointDir, rows: dict[str, KeyRow], problem_keys: set[str], *,
                 batch_bytes: int) -> list[Problem]:
    """Read every selected, integrity-clean item through DCP; fingerprint tensors and check them against the manifest."""
    md = ckpt.metadata
    assert md is not None
    problems: list[Problem] = []
    reader = CheckpointReader(ckpt)
    readable = [md.keys[k] for k in rows if k not in problem_keys]
    tensors = [i for i in readable if i.kind == KIND_TENSOR]
    byte_items = [i for i in readable if i.kind == KIND_BYTES]
    for info, tensor, error in reader.tensors(tensors, batch_bytes=batch_bytes):
        row = rows[info.key]
        if error is not None:
            row.status, row.detail = S_UNREADABLE, error
            problems.append(Problem(P_UNREADABLE, f"cannot be read through DCP: {error}", info.key, _one_file(info)))
            continue
        row.fingerprint = tensor_fingerprint(tensor)
        del tensor
        if row.expected is None:
            row.status = S_READ
        elif row.fingerprint == row.expected:
            row.status = S_VERIFIED
        else:
            row.status = S_MISMATCH
            row.detail = f"fingerprint {row.fingerprint}, {MANIFEST_NAME} has {row.expected}"
            problems.append(Problem(P_FINGERPRINT, f"data differs from {MANIFEST_NAME}: fingerprint {row.fingerprint}, "
                                    f"expected {row.expected}", info.key, _one_file(info)))
    for info, raw, error in reader.byte_items(byte_items):
        row = rows[info.key]
        if error is not None:
            row.status, row.detail = S_UNREADABLE, error
            problems.append(Problem(P_UNREADABLE, f"cannot be read through DCP: {error}", info.key, _one_file(info)))
            continue
        identity = byte_item_identity(raw)
        row.status = S_READ
        row.value = identity.value
        if ckpt.manifest is not None and info.key in ckpt.manifest.keys:
            row.status = S_VERIFIED  # object keys are checked for presence; their values are not compared
    return problems


def _one_file(info: KeyInfo) -> str | None:
    files = info.files
    return files[0] if len(files) == 1 else (", ".join(files) if files else None)


# --- diff ------------------------------------------------------------------------------

D_SAME = "same"
D_DIFFERENT = "DIFFERENT"
D_ONLY_A = "only in A"
D_ONLY_B = "only in B"
D_KIND = "KIND DIFFERS"
D_SHAPE = "SHAPE DIFFERS"
D_DTYPE = "DTYPE DIFFERS"
D_UNREADABLE = "UNREADABLE"


@dataclass(slots=True)
class DiffSide:
    """One of the two checkpoint dirs of a diff."""

    path: str
    dcp_version: str | None
    n_keys: int
    data_bytes: int
    files: int
    manifest_world_size: int | None
    problems: list[Problem]


@dataclass(slots=True)
class DiffRow:
    """One key of ``fsdpck diff``: how it stands in A and in B."""

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
    max_abs_diff: float | None = None
    detail: str | None = None


@dataclass(slots=True)
class DiffResult:
    """What ``fsdpck diff A B`` found."""

    a: DiffSide
    b: DiffSide
    torch_version: str
    key_glob: str | None
    values: bool
    rows: list[DiffRow]
    problems: list[Problem]  # integrity problems of either side; the key names "A: ..." / "B: ..." in the message
    timings: dict[str, float] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)

    @property
    def differing(self) -> list[DiffRow]:
        return [r for r in self.rows if r.status != D_SAME]

    @property
    def verdict(self) -> str:
        if self.problems:
            return "PROBLEMS"
        return "DIFFERENT" if self.differing else "IDENTICAL"

    @property
    def exit_code(self) -> int:
        return 1 if (self.problems or self.differing) else 0

    def count(self, status: str) -> int:
        return sum(1 for r in self.rows if r.status == status)


def diff_checkpoints(path_a: str | os.PathLike, path_b: str | os.PathLike, *, key_glob: str | None = None,
                     values: bool = False, batch_bytes: int = READ_BATCH_BYTES) -> DiffResult:
    """Compare two checkpoint dirs key by key: keys, kinds, shapes, dtypes, then data by fingerprint.

    Fingerprints do not depend on how a tensor was chunked, so A and B may come from
    different world sizes. With ``values``, keys whose data differ are read again in pairs
    for max |Δ|, so memory stays near twice the largest tensor.
    """
    t0 = time.perf_counter()
    check_dir_path(path_a, what="A")
    check_dir_path(path_b, what="B")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        import torch

        ckpt_a = open_checkpoint_dir(path_a, what="A")
        ckpt_b = open_checkpoint_dir(path_b, what="B")
        t_open = time.perf_counter()
        problems = [Problem(p.kind, f"A: {p.message}", p.key, p.file) for p in ckpt_a.problems]
        problems += [Problem(p.kind, f"B: {p.message}", p.key, p.file) for p in ckpt_b.problems]
        keys_a = ckpt_a.metadata.keys if ckpt_a.metadata is not None else {}
        keys_b = ckpt_b.metadata.keys if ckpt_b.metadata is not None else {}
        selected = _select_keys(sorted(keys_a.keys() | keys_b.keys()), key_glob, where=" of A and B")

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
            elif values and keys_a[key].kind == KIND_TENSOR:
                row.max_abs_diff = 0.0
        if values:
            _values(ckpt_a, ckpt_b, [rows[k] for k in to_read if rows[k].status == D_DIFFERENT], keys_a, keys_b)
        t_end = time.perf_counter()

    def side(ckpt: CheckpointDir) -> DiffSide:
        md = ckpt.metadata
        return DiffSide(
            path=str(ckpt.root), dcp_version=md.dcp_version if md else None, n_keys=len(md.keys) if md else 0,
            data_bytes=ckpt.data_bytes, files=sum(1 for f in ckpt.files if f.role == "shard" and f.items),
            manifest_world_size=ckpt.manifest.world_size if ckpt.manifest else None, problems=ckpt.problems,
        )

    return DiffResult(
        a=side(ckpt_a), b=side(ckpt_b), torch_version=torch.__version__, key_glob=key_glob, values=values,
        rows=list(rows.values()), problems=problems,
        timings={"open_s": t_open - t0, "read_s": t_end - t_open, "total_s": t_end - t0},
        warnings=[f"{w.category.__name__}: {w.message}" for w in caught],
    )


def _digests(ckpt: CheckpointDir, infos: list[KeyInfo], batch_bytes: int) -> dict[str, tuple[str | None, str | None]]:
    """key -> (fingerprint or byte digest, error): tensors by the fingerprint, byte items by their identity."""
    out: dict[str, tuple[str | None, str | None]] = {}
    if ckpt.raw_metadata is None:
        return {i.key: (None, "metadata unreadable") for i in infos}
    bad = ckpt.problem_keys()
    reader = CheckpointReader(ckpt)
    for info in infos:
        if info.key in bad:
            out[info.key] = (None, "integrity problem (see problems)")
    tensors = [i for i in infos if i.kind == KIND_TENSOR and i.key not in out]
    for info, tensor, error in reader.tensors(tensors, batch_bytes=batch_bytes):
        out[info.key] = (None, error) if error else (tensor_fingerprint(tensor), None)
        del tensor
    byte_items = [i for i in infos if i.kind == KIND_BYTES and i.key not in out]
    for info, raw, error in reader.byte_items(byte_items):
        out[info.key] = (None, error) if error else (byte_item_identity(raw).digest, None)
    return out


def _values(ckpt_a: CheckpointDir, ckpt_b: CheckpointDir, rows: list[DiffRow], keys_a: dict[str, KeyInfo],
            keys_b: dict[str, KeyInfo]) -> None:
    """max |Δ| for tensor keys whose data differ: one key's A and B in memory at a time."""
    reader_a, reader_b = CheckpointReader(ckpt_a), CheckpointReader(ckpt_b)
    for row in rows:
        if keys_a[row.key].kind != KIND_TENSOR:
            continue
        try:
            ta = reader_a.tensor(keys_a[row.key])
            tb = reader_b.tensor(keys_b[row.key])
            row.max_abs_diff = max_abs_diff(ta, tb)
        except _ReadFailed as e:
            row.detail = f"max |Δ| not computed: {e}"
        finally:
            ta = tb = None  # noqa: F841 (free both before the next key)
