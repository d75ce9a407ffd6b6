"""Checkpoints in the Hugging Face safetensors format, as DCP's ``HuggingFaceStorageWriter`` writes them.

Each rank writes ``shard-NNNNN-model-00001-of-00001.safetensors``: an 8-byte little-endian
header length, a JSON header (per tensor: dtype, shape, data byte range; and
``__metadata__.DCP_SHARDING_INFO``, the chunk's global offsets), then the raw bytes. There is
no pickle anywhere, so nothing here can run code; the header is still a stranger's data and is
bounded (:data:`MAX_HEADER_BYTES`, and never past the file's end), parsed strictly (no
duplicate keys, no NaN, every number an integer of sane size) and turned into the same
metadata model as DCP's own format, so that the same integrity checks apply: chunks inside
their tensors and covering them exactly, byte ranges inside the file and of the right length.

The format holds tensors only: optimizer param groups and a trainer's objects have no place in
it (``fsdpck.state.registry`` says what a flow with ``--format safetensors`` saves).
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass
from typing import Any

from fsdpck.checkpoint.dtypes import ITEMSIZE
from fsdpck.checkpoint.metadata import KIND_TENSOR, MAX_INT, CheckpointMetadata, ChunkInfo, KeyInfo, StorageRef
from fsdpck.checkpoint.torchsave import StoredTensor
from fsdpck.errors import CheckpointFormatError

SUFFIX = ".safetensors"
MAX_HEADER_BYTES = 100 << 20  # the safetensors library's own bound
SHARDING_KEY = "DCP_SHARDING_INFO"

# safetensors dtype names -> torch dtype names (element sizes: fsdpck.checkpoint.dtypes.ITEMSIZE)
DTYPES = {
    "BOOL": "bool", "U8": "uint8", "I8": "int8", "I16": "int16", "U16": "uint16", "I32": "int32", "U32": "uint32",
    "I64": "int64", "U64": "uint64", "F16": "float16", "BF16": "bfloat16", "F32": "float32", "F64": "float64",
    "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2", "C64": "complex64",
}


def _fail(source: str, message: str) -> CheckpointFormatError:
    return CheckpointFormatError(f"{source}: {message}")


def _ints(value: Any, what: str, source: str) -> list[int]:
    if not isinstance(value, list) or len(value) > 64 or any(
            isinstance(v, bool) or not isinstance(v, int) or not 0 <= v <= MAX_INT for v in value):
        raise _fail(source, f"{what} is not a list of non-negative integers")
    return value


def _no_duplicates(source: str):
    def hook(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for key, value in pairs:
            if key in out:
                raise _fail(source, f"the header has the key {key[:80]!r} twice")
            out[key] = value
        return out

    return hook


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def read_header(stream: Any, *, size: int, source: str) -> tuple[dict[str, Any], int]:
    """The JSON header of a safetensors file of ``size`` bytes, and where its data start."""
    raw = stream.read(8)
    if len(raw) < 8:
        raise _fail(source, f"{size} bytes: too short for a safetensors header")
    (n,) = struct.unpack("<Q", raw)
    if n > MAX_HEADER_BYTES or n > size - 8:
        raise _fail(source, f"the header claims {n} bytes; the file has {size - 8} after the length "
                            f"(and no header is larger than {MAX_HEADER_BYTES})")
    text = stream.read(n)
    try:
        header = json.loads(text.decode("utf-8"), object_pairs_hook=_no_duplicates(source),
                            parse_constant=_reject_constant)
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        if isinstance(e, CheckpointFormatError):
            raise
        raise _fail(source, f"the header is not JSON ({type(e).__name__}: {str(e)[:120]})") from None
    if not isinstance(header, dict):
        raise _fail(source, "the header is not a JSON object")
    return header, 8 + n


@dataclass(frozen=True, slots=True)
class Entry:
    """One tensor chunk a file's header describes, checked: its dtype's torch name, its sizes, its
    global offsets, and its data's byte range in the file."""

    key: str
    dtype: str
    sizes: tuple[int, ...]
    offsets: tuple[int, ...]
    begin: int
    end: int


def file_entries(header: dict[str, Any], *, source: str) -> list[Entry]:
    """The chunks one file's parsed header describes, each checked; the header itself can then be let
    go (a header's parsed JSON takes many times its bytes: only the entries are kept per file)."""
    meta = header.get("__metadata__") or {}
    if not isinstance(meta, dict):
        raise _fail(source, "__metadata__ is not an object")
    sharding: dict[str, Any] = {}
    if meta.get(SHARDING_KEY) is not None:
        try:
            sharding = json.loads(str(meta[SHARDING_KEY]), object_pairs_hook=_no_duplicates(source),
                                  parse_constant=_reject_constant)
        except (ValueError, RecursionError) as e:
            if isinstance(e, CheckpointFormatError):
                raise
            raise _fail(source, f"{SHARDING_KEY} is not JSON") from None
        if not isinstance(sharding, dict):
            raise _fail(source, f"{SHARDING_KEY} is not an object")
    out = []
    for key, entry in header.items():
        if key == "__metadata__":
            continue
        if not isinstance(entry, dict):
            raise _fail(source, f"tensor {key[:80]!r} is not described by an object")
        dtype = entry.get("dtype")
        if dtype not in DTYPES:
            raise _fail(source, f"tensor {key[:80]!r}: dtype {str(dtype)[:20]!r} is not a safetensors dtype")
        shape = _ints(entry.get("shape"), f"tensor {key[:80]!r} shape", source)
        pair = _ints(entry.get("data_offsets"), f"tensor {key[:80]!r} data_offsets", source)
        if len(pair) != 2 or pair[1] < pair[0]:
            raise _fail(source, f"tensor {key[:80]!r}: data_offsets is not a [begin, end] byte range")
        info = sharding.get(key)
        offsets = [0] * len(shape)
        if info is not None:
            if not isinstance(info, dict):
                raise _fail(source, f"{SHARDING_KEY} of {key[:80]!r} is not an object")
            offsets = _ints(info.get("saved_offsets"), f"{SHARDING_KEY} of {key[:80]!r}", source)
            if len(offsets) != len(shape):
                raise _fail(source, f"{SHARDING_KEY} of {key[:80]!r} has {len(offsets)} offsets for "
                                    f"{len(shape)} dims")
        out.append(Entry(key, DTYPES[dtype], tuple(shape), tuple(offsets), pair[0], pair[1]))
    return out


def parse_files(files: dict[str, tuple[list[Entry], int, int]]) -> CheckpointMetadata:
    """Per file name: (its entries, data start, file size) -> the checkpoint's metadata model."""
    chunks: dict[str, list[ChunkInfo]] = {}
    dtypes: dict[str, str] = {}
    shapes: dict[str, list[int]] = {}
    for name, (entries, start, _size) in sorted(files.items()):
        source = name
        for e in entries:
            key = e.key
            if dtypes.setdefault(key, e.dtype) != e.dtype:
                raise _fail(source, f"tensor {key[:80]!r} is {e.dtype} here and {dtypes[key]} in another file")
            # The whole tensor spans every chunk's end, as DCP's own reader assembles it.
            ends = [o + s for o, s in zip(e.offsets, e.sizes)]
            known = shapes.setdefault(key, ends)
            if len(known) != len(ends):
                raise _fail(source, f"tensor {key[:80]!r} has chunks of different numbers of dims")
            shapes[key] = [max(a, b) for a, b in zip(known, ends)]
            ref = StorageRef(file=name, offset=start + e.begin, length=e.end - e.begin)
            chunks.setdefault(key, []).append(ChunkInfo(offsets=e.offsets, sizes=e.sizes, storage=ref))
    keys = {}
    for key, key_chunks in chunks.items():
        name_dtype = dtypes[key]
        keys[key] = KeyInfo(key=key, kind=KIND_TENSOR, shape=tuple(shapes[key]), dtype=name_dtype,
                            itemsize=ITEMSIZE[name_dtype], chunks=tuple(key_chunks))
    return CheckpointMetadata(dcp_version=None, keys=keys, orphans=[], storage_entries=sum(map(len, chunks.values())))


def locate(chunk: ChunkInfo, *, dtype: str, itemsize: int) -> StoredTensor:
    """Where a chunk's elements lie in its file: its whole byte range, row-major (the format has no
    other layout). The range was checked against the file; its length is checked against the shape."""
    numel = math.prod(chunk.sizes)
    if chunk.storage.length != numel * itemsize:
        raise CheckpointFormatError(f"{chunk.storage.file}: {chunk.storage.length} bytes where {numel} {dtype} "
                                    f"elements need {numel * itemsize}")
    stride = tuple(math.prod(chunk.sizes[d + 1:]) for d in range(len(chunk.sizes)))
    return StoredTensor(data_offset=0, nbytes=chunk.storage.length, storage_offset=0, size=tuple(chunk.sizes),
                        stride=stride)


def read_chunk(stream: Any, chunk: ChunkInfo, *, dtype: str) -> Any:
    """One chunk's tensor, read from an open file (its byte range was checked against the file)."""
    import torch

    found = locate(chunk, dtype=dtype, itemsize=ITEMSIZE[dtype])  # the range holds exactly the shape's elements
    stream.seek(chunk.storage.offset)
    data = stream.read(found.nbytes)
    if len(data) != found.nbytes:
        raise CheckpointFormatError(f"{chunk.storage.file}: the file ended {found.nbytes - len(data)} bytes early")
    if not data:
        return torch.empty(chunk.sizes, dtype=getattr(torch, dtype))
    return torch.frombuffer(bytearray(data), dtype=torch.uint8).view(getattr(torch, dtype)).reshape(chunk.sizes)
