"""DCP's ``Metadata`` as plain data: keys, chunks, and where each chunk's bytes lie.

:func:`parse_metadata` validates a ``Metadata`` object (as the restricted unpickler built it:
admitted classes, but fields of any admitted type) and turns it into :class:`CheckpointMetadata`.
Every number is checked to be an integer of sane magnitude before it is used or printed, so
a crafted value (a 5000-digit int, a float, a nested list) is a format error naming the
field, never a crash.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from fsdpck.checkpoint.unpickler import TorchName, record_class
from fsdpck.errors import CheckpointFormatError

KIND_TENSOR = "tensor"
KIND_BYTES = "bytes"
METADATA_NAME = ".metadata"
# A sanity bound on what is read whole into memory as metadata; a checkpoint that needs more is
# refused, named, never allocated for. A .metadata of a million chunks is a few hundred MB.
METADATA_MAX_BYTES = 4 << 30
MAX_INT = (1 << 62) - 1  # offsets, sizes and byte counts beyond this are not from any real checkpoint
MAX_DIMS = 64


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
    kind: str  # KIND_TENSOR or KIND_BYTES
    shape: tuple[int, ...] | None
    dtype: str | None  # "float32", as torch names it without the "torch." prefix
    itemsize: int | None
    chunks: tuple[ChunkInfo, ...]

    @property
    def numel(self) -> int | None:
        return None if self.shape is None else math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return (self.numel or 0) * (self.itemsize or 0)

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


def short(value: Any, limit: int = 60) -> str:
    """``repr(value)`` cut short; safe for any value (a huge int is described, not converted)."""
    if isinstance(value, int) and not isinstance(value, bool) and abs(value) > MAX_INT:
        return f"an integer of {value.bit_length()} bits"
    try:
        text = repr(value)
    except Exception:  # a repr that fails is described by its type
        return f"a {type(value).__name__}"
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _int(value: Any, what: str, *, minimum: int = 0) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise CheckpointFormatError(f"{what}: expected an integer, got {short(value)}")
    if not minimum <= value <= MAX_INT:
        raise CheckpointFormatError(f"{what}: {short(value)} is out of range")
    return int(value)


def _ints(value: Any, what: str) -> tuple[int, ...]:
    if not isinstance(value, (tuple, list)):
        raise CheckpointFormatError(f"{what}: expected a sequence of integers, got a {type(value).__name__}")
    if len(value) > MAX_DIMS:
        raise CheckpointFormatError(f"{what}: {len(value)} dims, more than any tensor has")
    return tuple(_int(v, what) for v in value)


def parse_metadata(md: Any, *, source: str, light: bool = False) -> CheckpointMetadata:
    """Turn DCP ``Metadata`` (``light``: the unpickler's records of it) into :class:`CheckpointMetadata`;
    CheckpointFormatError for anything malformed."""
    try:
        return _parse(md, source, light)
    except CheckpointFormatError:
        raise
    except Exception as e:  # a field missing or of a wrong type somewhere in a crafted object graph
        raise CheckpointFormatError(f"{source}: malformed DCP metadata: {type(e).__name__}") from None


def _classes(light: bool) -> tuple[type, type, type, type, type]:
    """(Metadata, MetadataIndex, _StorageInfo, TensorStorageMetadata, BytesStorageMetadata): DCP's, or the records."""
    if light:
        return tuple(record_class(n) for n in ("Metadata", "MetadataIndex", "_StorageInfo", "TensorStorageMetadata",
                                               "BytesStorageMetadata"))  # type: ignore[return-value]
    from torch.distributed.checkpoint.filesystem import _StorageInfo
    from torch.distributed.checkpoint.metadata import (
        BytesStorageMetadata,
        Metadata,
        MetadataIndex,
        TensorStorageMetadata,
    )

    return Metadata, MetadataIndex, _StorageInfo, TensorStorageMetadata, BytesStorageMetadata


def _dtype(dtype: Any, light: bool, where: str) -> tuple[str, int]:
    """(name, element size) of a tensor's dtype: a torch.dtype, or in light mode the unpickler's name for one."""
    if light:
        if type(dtype) is TorchName and dtype.kind == "dtype":
            return dtype.name, dtype.itemsize
    else:
        import torch

        if isinstance(dtype, torch.dtype):
            return str(dtype).removeprefix("torch."), dtype.itemsize
    raise CheckpointFormatError(f"{where}: dtype {short(dtype)} is not a torch.dtype")


def _parse(md: Any, source: str, light: bool) -> CheckpointMetadata:
    Metadata, MetadataIndex, _StorageInfo, TensorStorageMetadata, BytesStorageMetadata = _classes(light)

    if not isinstance(md, Metadata):
        raise CheckpointFormatError(f"{source}: holds a {type(md).__name__}, not DCP Metadata")
    sdm = md.state_dict_metadata
    if not isinstance(sdm, dict):
        raise CheckpointFormatError(f"{source}: state_dict_metadata is a {type(sdm).__name__}, not a dict")
    storage = md.storage_data if md.storage_data is not None else {}
    if not isinstance(storage, dict):
        raise CheckpointFormatError(
            f"{source}: storage_data is a {type(storage).__name__}: not written by DCP's file system writer")
    version = md.version if isinstance(getattr(md, "version", None), str) else None

    refs: dict[tuple[str, tuple[int, ...] | None], StorageRef] = {}
    for index, info in storage.items():
        if not isinstance(index, MetadataIndex) or not isinstance(info, _StorageInfo):
            raise CheckpointFormatError(
                f"{source}: storage_data maps {type(index).__name__} to {type(info).__name__}: "
                "not written by DCP's file system writer")
        fqn = index.fqn
        if not isinstance(fqn, str):
            raise CheckpointFormatError(f"{source}: a storage entry's key is {short(fqn)}, not a string")
        offset = None if index.offset is None else _ints(index.offset, f"{source}: storage entry {fqn!r} offset")
        if not isinstance(info.relative_path, str):
            raise CheckpointFormatError(
                f"{source}: storage entry {fqn!r}: file name {short(info.relative_path)} is not a string")
        transforms = getattr(info, "transform_descriptors", None) or ()
        if not isinstance(transforms, (list, tuple)):
            raise CheckpointFormatError(f"{source}: storage entry {fqn!r}: transforms are a {type(transforms).__name__}")
        refs[(fqn, offset)] = StorageRef(
            file=info.relative_path,
            offset=_int(info.offset, f"{source}: storage entry {fqn!r} byte offset"),
            length=_int(info.length, f"{source}: storage entry {fqn!r} byte length"),
            transforms=tuple(short(t, 200) if not isinstance(t, str) else t for t in transforms),
        )

    used: set[tuple[str, tuple[int, ...] | None]] = set()
    keys: dict[str, KeyInfo] = {}
    for key, item in sdm.items():
        if not isinstance(key, str):
            raise CheckpointFormatError(f"{source}: state_dict_metadata has a key {short(key)} that is not a string")
        if isinstance(item, TensorStorageMetadata):
            dtype_name, itemsize = _dtype(getattr(item.properties, "dtype", None), light, f"{source}: key {key!r}")
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
            keys[key] = KeyInfo(key=key, kind=KIND_TENSOR, shape=shape, dtype=dtype_name, itemsize=itemsize,
                                chunks=tuple(chunks))
        elif isinstance(item, BytesStorageMetadata):
            ref = refs.get((key, None))
            if ref is not None:
                used.add((key, None))
            keys[key] = KeyInfo(key=key, kind=KIND_BYTES, shape=None, dtype=None, itemsize=None,
                                chunks=(ChunkInfo((), (), ref),))
        else:
            raise CheckpointFormatError(f"{source}: key {key!r} is described by a {type(item).__name__}")
    orphans = [(fqn, off, ref) for (fqn, off), ref in refs.items() if (fqn, off) not in used]
    return CheckpointMetadata(dcp_version=version, keys=keys, orphans=orphans, storage_entries=len(refs))
