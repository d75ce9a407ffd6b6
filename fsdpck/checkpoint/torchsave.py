"""Where a stored tensor's bytes lie inside a ``torch.save`` archive, found without running its pickle.

DCP stores each tensor chunk as a ``torch.save`` archive (a zip, stored uncompressed) inside a
``.distcp`` file, and its reader gets the chunk back with ``torch.load``: a fresh tensor per chunk,
then a copy into the load's target. On a 2-core VM that fresh memory costs more than the read
itself (docs/benchmarks.md, "Offline reads"). :func:`locate` instead reads the archive's zip
directory and its small ``data.pkl`` and says where the raw elements are, so that the offline
commands can read them straight into a buffer they reuse.

``data.pkl`` comes from a stranger like the rest of the dir, and it is never handed to
``pickle``'s free loader: the unpickler here admits exactly the names a plain tensor's record
uses (``torch._utils._rebuild_tensor_v2``, ``collections.OrderedDict`` and one storage class),
each resolving to a sealed constructor of fsdpck's own that only records its arguments; the
storage arrives as a persistent id, recorded likewise. Anything else — another global, a
compressed or oversized record, a byte order other than little, a storage that does not hold
the elements its record claims, a view reaching outside it — makes :func:`locate` return None,
and the caller reads that chunk through DCP's own reader instead. The archive is read through a
window on the item's byte range, so no read leaves it.
"""

from __future__ import annotations

import io
import math
import pickle
import struct
import warnings
import zipfile
from dataclasses import dataclass
from typing import Any, BinaryIO

from fsdpck.checkpoint.unpickler import ClampedReader, _Constructor
from fsdpck.errors import CheckpointFormatError

# The storage class torch.save names for each dtype's elements (TypedStorage's pickle names).
STORAGE_CLASS: dict[str, str] = {
    "float32": "FloatStorage", "float64": "DoubleStorage", "float16": "HalfStorage",
    "bfloat16": "BFloat16Storage", "int64": "LongStorage", "int32": "IntStorage", "int16": "ShortStorage",
    "int8": "CharStorage", "uint8": "ByteStorage", "bool": "BoolStorage",
    "complex64": "ComplexFloatStorage", "complex128": "ComplexDoubleStorage",
}  # fmt: skip

PICKLE_MAX_BYTES = 64 << 10  # a plain tensor's record is ~150 bytes
# Whether the offline commands read local items themselves (tests turn it off to compare with DCP's reader).
DIRECT_READS = True
_LOCAL_HEADER = struct.Struct("<4sHHHHHIIIHH")  # a zip local file header: 30 bytes


# Byte items are small values (param groups, a scheduler's state); larger ones are not decoded.
BYTE_ITEM_MAX_BYTES = 64 << 20


def decode_byte_item(data: bytes, *, source: str) -> Any:
    """A DCP byte item's value, decoded with ``torch.load(weights_only=True)``; CheckpointFormatError otherwise."""
    if len(data) > BYTE_ITEM_MAX_BYTES:
        raise CheckpointFormatError(f"{source}: a byte item of {len(data)} bytes, more than the "
                                    f"{BYTE_ITEM_MAX_BYTES} fsdpck decodes: not read")
    import torch

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return torch.load(io.BytesIO(data), weights_only=True, map_location="cpu")
    except Exception as e:  # anything that is not plain data: refused, never run
        text = str(e).strip().splitlines()
        raise CheckpointFormatError(
            f"{source}: cannot be loaded without running code (torch.load with weights_only refused it: "
            f"{type(e).__name__}: {text[0][:200] if text else ''})"
        ) from None


@dataclass(frozen=True, slots=True)
class StoredTensor:
    """A tensor's elements in an archive: ``nbytes`` raw bytes at ``data_offset`` (from the
    archive's first byte), viewed as ``size``/``stride`` from element ``storage_offset``."""

    data_offset: int
    nbytes: int
    storage_offset: int
    size: tuple[int, ...]
    stride: tuple[int, ...]


class Window(io.RawIOBase):
    """``length`` bytes of ``raw`` from ``start``, as a seekable stream of its own: nothing outside them is read."""

    def __init__(self, raw: BinaryIO, start: int, length: int):
        self._raw, self._start, self._length, self._pos = raw, start, length, 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: self._length}[whence]
        self._pos = min(max(0, base + offset), self._length)
        return self._pos

    def readinto(self, buffer: Any) -> int:
        view = memoryview(buffer).cast("B")[: max(0, self._length - self._pos)]
        if not view.nbytes:
            return 0
        self._raw.seek(self._start + self._pos)
        n = self._raw.readinto(view) or 0
        self._pos += n
        return n


class _Refused(Exception):
    pass


class _StorageClass:
    __slots__ = ("name",)

    def __init__(self, name: str):
        self.name = name


class _TensorRecordUnpickler(pickle.Unpickler):
    def __init__(self, file: BinaryIO, storage_class: str):
        super().__init__(file)
        self.storage_class = storage_class
        self.storages: list[tuple[str, int]] = []

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) == ("torch._utils", "_rebuild_tensor_v2"):
            return _Constructor(lambda *args: ("tensor", args), "rebuild")
        if (module, name) == ("collections", "OrderedDict"):
            return _Constructor(lambda *args: ("hooks", args), "hooks")
        if module == "torch" and name == self.storage_class:
            return _StorageClass(name)
        raise _Refused(f"{module}.{name}")

    def persistent_load(self, pid: Any) -> Any:
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage" and isinstance(pid[1], _StorageClass)
                and isinstance(pid[2], str) and isinstance(pid[4], int) and not isinstance(pid[4], bool)):
            raise _Refused("persistent id")
        self.storages.append((pid[2], pid[4]))
        return ("storage", pid[2], pid[4])


def _ints(value: Any) -> tuple[int, ...] | None:
    if not isinstance(value, tuple) or not all(isinstance(v, int) and not isinstance(v, bool) for v in value):
        return None
    return value


def _data_offset(window: Window, info: zipfile.ZipInfo) -> int | None:
    """Where a stored member's bytes start, from its local header (its central entry may differ)."""
    window.seek(info.header_offset)
    header = window.read(_LOCAL_HEADER.size)
    if len(header) != _LOCAL_HEADER.size:
        return None
    fields = _LOCAL_HEADER.unpack(header)
    if fields[0] != b"PK\x03\x04":
        return None
    return info.header_offset + _LOCAL_HEADER.size + fields[9] + fields[10]


def locate(raw: BinaryIO, start: int, length: int, *, dtype: str, itemsize: int,
           sizes: tuple[int, ...]) -> StoredTensor | None:
    """Where the elements of the ``torch.save`` archive at ``start`` (``length`` bytes of ``raw``) lie.

    ``dtype``, ``itemsize`` and ``sizes`` are what the checkpoint's metadata says the chunk is.
    Returns None when the archive is not a plain little-endian tensor of exactly that dtype and
    sizes whose view lies inside its storage, which lies inside the archive.
    """
    storage_class = STORAGE_CLASS.get(dtype)
    if storage_class is None or length <= 0:
        return None
    window = Window(raw, start, length)
    try:
        with zipfile.ZipFile(io.BufferedReader(window, 1 << 16)) as archive:
            members = archive.infolist()
            if any(m.compress_type != zipfile.ZIP_STORED or m.flag_bits & 0x1 for m in members):
                return None
            pkl = [m for m in members if m.filename.endswith("/data.pkl") and m.filename.count("/") == 1]
            if len(pkl) != 1 or pkl[0].file_size > PICKLE_MAX_BYTES:
                return None
            prefix = pkl[0].filename[: -len("data.pkl")]
            by_name = {m.filename: m for m in members}
            order = by_name.get(prefix + "byteorder")
            if order is not None and (order.file_size > 16 or archive.read(order).strip() != b"little"):
                return None
            record = archive.read(pkl[0])
    except (zipfile.BadZipFile, zipfile.LargeZipFile, OSError, EOFError, ValueError, KeyError,
            NotImplementedError, RuntimeError, struct.error):
        return None
    unpickler = _TensorRecordUnpickler(io.BufferedReader(ClampedReader(io.BytesIO(record), len(record))),
                                       storage_class)
    try:
        obj = unpickler.load()
    except (_Refused, pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, IndexError,
            KeyError, RecursionError, MemoryError, struct.error):
        return None
    if not (isinstance(obj, tuple) and len(obj) == 2 and obj[0] == "tensor"):
        return None
    args = obj[1]
    if len(args) not in (6, 7) or not (isinstance(args[0], tuple) and args[0][:1] == ("storage",)):
        return None
    _, key, numel = args[0]
    offset, size, stride = args[1], _ints(args[2]), _ints(args[3])
    if (not isinstance(offset, int) or isinstance(offset, bool) or size is None or stride is None
            or len(size) != len(stride) or tuple(size) != tuple(sizes) or offset < 0 or numel < 0
            or any(n < 0 for n in size) or any(s < 0 for s in stride)
            or not (isinstance(args[5], tuple) and args[5] == ("hooks", ()))
            or (len(args) == 7 and args[6] is not None)):
        return None
    # The view's last element must lie in the storage (an empty view needs nothing of it).
    if math.prod(size) and offset + sum((n - 1) * s for n, s in zip(size, stride)) >= numel:
        return None
    member = by_name.get(f"{prefix}data/{key}")
    if member is None or member.file_size != numel * itemsize:
        return None
    try:
        data_offset = _data_offset(window, member)
    except (OSError, ValueError):
        return None
    if data_offset is None or data_offset + member.file_size > length:
        return None
    return StoredTensor(data_offset=data_offset, nbytes=member.file_size, storage_offset=offset,
                        size=tuple(size), stride=tuple(stride))
