"""Checkpoints in the Hugging Face safetensors format, as DCP's ``HuggingFaceStorageWriter`` writes them.

Each rank writes ``shard-NNNNN-model-00001-of-00001.safetensors``: an 8-byte little-endian
header length, a JSON header (per tensor: dtype, shape, data byte range; and
``__metadata__.DCP_SHARDING_INFO``, the chunk's global offsets), then the raw bytes. There is
no pickle anywhere, so nothing here can run code; the header is still a stranger's data and is
bounded (:data:`MAX_HEADER_BYTES`, and never past the file's end), walked rather than parsed
whole, strictly (no duplicate keys, no NaN, every number an integer of sane size, nothing built
that the format does not have: :func:`read_entries`) and turned into the same
metadata model as DCP's own format, so that the same integrity checks apply: chunks inside
their tensors and covering them exactly, byte ranges inside the file and of the right length.

The format holds tensors only: optimizer param groups and a trainer's objects have no place in
it (``fsdpck.state.registry`` says what a flow with ``--format safetensors`` saves).
"""

from __future__ import annotations

import dataclasses
import math
import struct
from dataclasses import dataclass
from typing import Any, Container, Iterator

from fsdpck.checkpoint.dtypes import ITEMSIZE
from fsdpck.checkpoint.jsonscan import MAX_LIST, Scanner
from fsdpck.checkpoint.metadata import KIND_TENSOR, MAX_INT, CheckpointMetadata, ChunkInfo, KeyInfo, StorageRef
from fsdpck.checkpoint.torchsave import StoredTensor
from fsdpck.errors import CheckpointFormatError

SUFFIX = ".safetensors"
MAX_HEADER_BYTES = 100 << 20  # the safetensors library's own bound
SHARDING_KEY = "DCP_SHARDING_INFO"
_FIELDS = ("dtype", "shape", "data_offsets")  # a tensor's entry: any other field is a scalar, read past
_ORIGIN = [(0,) * n for n in range(MAX_LIST + 1)]  # a chunk's global offsets where the header gives none

# safetensors dtype names -> torch dtype names (element sizes: fsdpck.checkpoint.dtypes.ITEMSIZE)
DTYPES = {
    "BOOL": "bool", "U8": "uint8", "I8": "int8", "I16": "int16", "U16": "uint16", "I32": "int32", "U32": "uint32",
    "I64": "int64", "U64": "uint64", "F16": "float16", "BF16": "bfloat16", "F32": "float32", "F64": "float64",
    "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2", "C64": "complex64",
}


def _fail(source: str, message: str) -> CheckpointFormatError:
    return CheckpointFormatError(f"{source}: {message}")


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


def read_entries(stream: Any, *, size: int, source: str) -> tuple[list[Entry], int]:
    """The tensor chunks the header of a safetensors file of ``size`` bytes describes, each checked,
    and where the file's data start.

    The header is walked (:class:`~fsdpck.checkpoint.jsonscan.Scanner`), never parsed whole: only
    the entries are built, so a header costs about its bytes plus its entries, whatever it holds
    (``json.loads`` took up to 28 times its bytes). What the format does not have is refused
    unbuilt: a list or an object where a field of a tensor or of ``__metadata__`` (a map of
    strings) should be, a shape or byte range that is not a short list of integers.
    """
    raw = stream.read(8)
    if len(raw) < 8:
        raise _fail(source, f"{size} bytes: too short for a safetensors header")
    (n,) = struct.unpack("<Q", raw)
    if n > MAX_HEADER_BYTES or n > size - 8:
        raise _fail(source, f"the header claims {n} bytes; the file has {size - 8} after the length "
                            f"(and no header is larger than {MAX_HEADER_BYTES})")
    try:
        text = stream.read(n).decode("utf-8")
    except UnicodeDecodeError as e:
        raise _fail(source, f"the header is not JSON (UnicodeDecodeError: {str(e)[:120]})") from None
    scan = Scanner(text, lambda message: _fail(source, message))
    out: list[Entry] = []
    sharding_text = None
    for key in scan.members("the header"):
        if key == "__metadata__":
            sharding_text = _sharding_text(scan)
        else:
            out.append(_tensor(scan, key))
    scan.end("the header")
    del text, scan
    if sharding_text is not None:  # read once the tensors are known: entries for no tensor are dropped unbuilt
        at = {e.key: i for i, e in enumerate(out)}
        for key, offsets in _sharding(sharding_text, at, source):
            e = out[at[key]]
            if len(offsets) != len(e.sizes):
                raise _fail(source, f"{SHARDING_KEY} of {key[:80]!r} has {len(offsets)} offsets for {len(e.sizes)} dims")
            out[at[key]] = dataclasses.replace(e, offsets=tuple(offsets))
    return out, 8 + n


def _checked(scan: Scanner, values: list[int], what: str) -> list[int]:
    if any(v > MAX_INT for v in values):
        raise scan.fail(f"{what} holds an integer beyond {MAX_INT}")
    return values


def _tensor(scan: Scanner, key: str) -> Entry:
    """One tensor's entry (other fields: scalars, ignored), at global offset 0 until the sharding info says."""
    what = f"tensor {key[:80]!r}"
    dtype, shape, pair = None, None, None
    for field in scan.members(what, track=_FIELDS):
        if field == "dtype":
            dtype = scan.string(f"{what} dtype")
        elif field == "shape":
            shape = _checked(scan, scan.ints(f"{what} shape"), f"{what} shape")
        elif field == "data_offsets":
            pair = scan.ints(f"{what} data_offsets")
        else:
            scan.scalar(f"{what} field {field[:40]!r}")
    if dtype not in DTYPES:
        raise scan.fail(f"{what}: dtype {str(dtype)[:20]!r} is not a safetensors dtype")
    if shape is None:
        raise scan.fail(f"{what} has no shape")
    if pair is None or len(pair) != 2 or pair[1] < pair[0] or pair[1] > MAX_INT:
        raise scan.fail(f"{what}: data_offsets is not a [begin, end] byte range")
    return Entry(key, DTYPES[dtype], tuple(shape), _ORIGIN[len(shape)], pair[0], pair[1])


def _sharding_text(scan: Scanner) -> str | None:
    """``__metadata__`` (a map of strings, or null): the text of DCP's sharding info, if there is one."""
    found = None
    if scan.is_null():
        return found
    for name in scan.members("__metadata__", track=(SHARDING_KEY,)):
        value = scan.string(f"__metadata__ {name[:80]!r}")
        if name == SHARDING_KEY:
            found = value
    return found


def _sharding(text: str, tensors: Container[str], source: str) -> Iterator[tuple[str, list[int]]]:
    """(tensor, its chunk's global offsets) from DCP's sharding info, for the tensors the file has."""
    info = Scanner(text, lambda message: _fail(source, f"{SHARDING_KEY}: {message}"))
    for key in info.members(SHARDING_KEY, track=tensors):
        what = f"{SHARDING_KEY} of {key[:80]!r}"
        offsets = None
        for field in info.members(what, track=("saved_offsets",)):
            if field == "saved_offsets":
                offsets = _checked(info, info.ints(what), what)
            else:
                info.scalar(f"{what} field {field[:40]!r}")
        if offsets is None:
            raise info.fail(f"{what} has no saved_offsets")
        if key in tensors:
            yield key, offsets
    info.end(SHARDING_KEY)


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
