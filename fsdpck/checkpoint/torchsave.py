"""Where a stored tensor's bytes lie inside a ``torch.save`` archive, found without running its pickle.

DCP stores each tensor chunk as a ``torch.save`` archive (a zip, stored uncompressed) inside a
``.distcp`` file, and its reader gets the chunk back with ``torch.load``: a fresh tensor per chunk,
then a copy into the load's target. On a 2-core VM that fresh memory costs more than the read
itself (docs/benchmarks.md, "Offline reads"). :func:`locate` instead reads the archive's zip
directory and its small ``data.pkl`` and says where the raw elements are, so that the offline
commands can read them straight into a buffer they reuse.

Everything here comes from a stranger, and what fsdpck reads must be what ``torch.load`` (and so
``fsdpck load``) would read, or it could vouch for bytes DCP never loads. So the zip is read by
:func:`members`, stricter than Python's ``zipfile`` and than torch's reader: one end record with
no comment, the central directory exactly where that record says and nowhere else, at most
:data:`MAX_MEMBERS` stored (uncompressed, unencrypted, not zip64) members with unique printable
ASCII names under one top dir, each local header naming its member, no two members overlapping.
``data.pkl`` is never handed to ``pickle``'s free loader: the unpickler here admits exactly the
names a plain tensor's record uses (``torch._utils._rebuild_tensor_v2``, ``collections.OrderedDict``
and the one storage class of the dtype the metadata names), each resolving to a sealed
constructor that returns a record of fsdpck's own, which no pickle can make otherwise or change
(``BUILD`` on it fails). Anything else — another global, a byte order other than ``little``, no
``version`` record, a storage that does not hold exactly the elements its record claims, a view
reaching outside it — makes :func:`locate` return None, and the caller reads that chunk through
DCP's own reader instead. The archive is read through a window on the item's byte range, so no
read leaves it (tests/unit/test_torchsave.py plants each of these).
"""

from __future__ import annotations

import io
import math
import pickle
import struct
import warnings
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
_STORAGE_DTYPE = {name: dtype for dtype, name in STORAGE_CLASS.items()}

PICKLE_MAX_BYTES = 64 << 10  # a plain tensor's record is ~150 bytes
# Whether the offline commands read local items themselves (tests turn it off to compare with DCP's reader).
DIRECT_READS = True
MAX_MEMBERS = 64  # a torch.save archive of one tensor has 7
_END = struct.Struct("<4sHHHHIIH")  # the zip's end of central directory record: 22 bytes
_CENTRAL = struct.Struct("<4sHHHHHHIIIHHHHHII")  # a central directory entry: 46 bytes
_LOCAL = struct.Struct("<4sHHHHHIIIHH")  # a local file header: 30 bytes
_ZIP64_END = struct.Struct("<4sQHHIIQQQQ")  # the zip64 end of central directory record: 56 bytes
_ZIP64_LOCATOR = struct.Struct("<4sIQI")  # its locator: 20 bytes
_FLAGS = 0x0808  # the only flags allowed: a data descriptor follows (bit 3), UTF-8 names (bit 11)
_ZIP64 = 0xFFFFFFFF


# Byte items are small values (param groups, a scheduler's state); larger ones are not decoded.
BYTE_ITEM_MAX_BYTES = 64 << 20


# The pickle opcodes of plain data (None, bools, ints, floats, strings, lists, tuples, dicts) that
# torch's weights_only unpickler handles, and handles as Python's pickle does: a pickle of only
# these is decoded without torch (:func:`_plain_value`), to the same value.
_PLAIN_OPS = frozenset({
    "PROTO", "STOP", "MARK", "TUPLE", "TUPLE1", "TUPLE2", "TUPLE3", "NONE", "NEWFALSE", "NEWTRUE", "EMPTY_TUPLE",
    "EMPTY_LIST", "EMPTY_DICT", "BININT", "BININT1", "BININT2", "BINFLOAT", "BINUNICODE", "LONG1", "BINGET",
    "LONG_BINGET", "BINPUT", "LONG_BINPUT", "APPEND", "APPENDS", "SETITEM", "SETITEMS",
})


def decode_byte_item(data: bytes, *, source: str) -> Any:
    """A DCP byte item's value, as ``torch.load(weights_only=True)`` decodes it; CheckpointFormatError otherwise.

    Plain data in an archive :func:`members` vouches for is decoded here without torch (its import
    costs more than a gigabyte's read, docs/benchmarks.md); anything else goes to ``torch.load``.
    """
    if len(data) > BYTE_ITEM_MAX_BYTES:
        raise CheckpointFormatError(f"{source}: a byte item of {len(data)} bytes, more than the "
                                    f"{BYTE_ITEM_MAX_BYTES} fsdpck decodes: not read")
    plain, value = _plain_value(data)
    if plain:
        return value
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


class _NoGlobals(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        raise _Refused(f"{module}.{name}")

    def persistent_load(self, pid: Any) -> Any:
        raise _Refused("persistent id")


def _plain_value(data: bytes) -> tuple[bool, Any]:
    """(True, the value) when ``data`` is an archive whose ``data.pkl`` uses only :data:`_PLAIN_OPS`
    (no global, no storage: nothing but plain data); (False, None) for anything else."""
    import pickletools

    try:
        found = _archive(io.BytesIO(data), 0, len(data))
        pkl = found[1].get(found[0] + "data.pkl") if found is not None else None
        if pkl is None or pkl.size > PICKLE_MAX_BYTES:
            return False, None
        record = read_member(io.BytesIO(data), 0, pkl)
        if record is None or any(op.name not in _PLAIN_OPS for op, _, _ in pickletools.genops(record)):
            return False, None
        return True, _NoGlobals(io.BytesIO(record)).load()
    except Exception:  # anything else is torch.load's to decode or refuse
        return False, None


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


@dataclass(frozen=True, slots=True)
class Member:
    """A stored member of a zip: its data's offset from the archive's first byte, and its size."""

    offset: int
    size: int


def _exactly(window: Window, n: int) -> bytes | None:
    data = window.read(n)
    return data if len(data) == n else None


def members(raw: BinaryIO, start: int, length: int) -> dict[str, Member] | None:
    """The members of the zip archive at ``start`` (``length`` bytes of ``raw``), by name in
    directory order; None unless it is laid out as described at the top of this module."""
    if length < _END.size:
        return None
    window = Window(raw, start, length)
    window.seek(length - _END.size)
    end = _exactly(window, _END.size)
    if end is None:
        return None
    sig, disk, cd_disk, n_here, n, cd_size, cd_offset, comment = _END.unpack(end)
    if (sig != b"PK\x05\x06" or disk or cd_disk or n_here != n or comment or not 0 < n <= MAX_MEMBERS
            or cd_size > n * (_CENTRAL.size + 1024)):
        return None
    # torch writes a zip64 end record and its locator between the directory and the end record;
    # they must say what the end record says (a reader that trusts either finds the same directory).
    between = length - _END.size - (cd_offset + cd_size)
    if between == _ZIP64_END.size + _ZIP64_LOCATOR.size:
        window.seek(cd_offset + cd_size)
        tail = _exactly(window, between)
        if tail is None:
            return None
        z_sig, z_len, _, _, z_disk, z_cd_disk, z_here, z_n, z_size, z_offset = _ZIP64_END.unpack_from(tail)
        l_sig, l_disk, l_at, l_disks = _ZIP64_LOCATOR.unpack_from(tail, _ZIP64_END.size)
        if (z_sig != b"PK\x06\x06" or z_len != _ZIP64_END.size - 12 or z_disk or z_cd_disk
                or (z_here, z_n, z_size, z_offset) != (n, n, cd_size, cd_offset)
                or l_sig != b"PK\x06\x07" or l_disk or l_at != cd_offset + cd_size or l_disks != 1):
            return None
    elif between != 0:
        return None
    window.seek(cd_offset)
    directory = _exactly(window, cd_size)
    if directory is None:
        return None
    out: dict[str, Member] = {}
    spans: list[tuple[int, int]] = []
    pos = 0
    for _ in range(n):
        if pos + _CENTRAL.size > len(directory):
            return None
        entry = _CENTRAL.unpack_from(directory, pos)
        sig, flags, method, packed, size, name_len, extra_len, comment_len, header = (
            entry[0], entry[3], entry[4], entry[8], entry[9], entry[10], entry[11], entry[12], entry[16])
        raw_name = directory[pos + _CENTRAL.size: pos + _CENTRAL.size + name_len]
        pos += _CENTRAL.size + name_len + extra_len + comment_len
        if (sig != b"PK\x01\x02" or flags & ~_FLAGS or method != 0 or packed != size or _ZIP64 in (size, header)
                or len(raw_name) != name_len or pos > len(directory)):
            return None
        try:
            name = raw_name.decode("ascii")
        except UnicodeDecodeError:
            return None
        if not name.isprintable() or name in out:
            return None
        window.seek(header)
        local = _exactly(window, _LOCAL.size)
        if local is None:
            return None
        local_sig, local_name_len, local_extra_len = local[:4], *_LOCAL.unpack(local)[9:]
        if local_sig != b"PK\x03\x04" or _exactly(window, local_name_len) != raw_name:
            return None
        data = header + _LOCAL.size + local_name_len + local_extra_len
        if data + size > cd_offset:
            return None
        out[name] = Member(data, size)
        spans.append((header, data + size))
    spans.sort()
    if pos != len(directory) or any(a[1] > b[0] for a, b in zip(spans, spans[1:])):
        return None
    return out


def read_member(raw: BinaryIO, start: int, member: Member) -> bytes | None:
    raw.seek(start + member.offset)
    data = raw.read(member.size)
    return data if len(data) == member.size else None


class _Refused(Exception):
    pass


class _OtherDtype(Exception):
    """The archive holds a plain tensor of another dtype than the checkpoint's metadata names."""

    def __init__(self, stored: str):
        super().__init__(stored)
        self.stored = stored


class _Record:
    """What the admitted names make: fresh, sealed holders of what the pickle passed, which a pickle
    cannot make otherwise (no global resolves to these classes) nor change (``BUILD`` fails)."""

    __slots__ = ("args",)

    def __init__(self, args: tuple):
        object.__setattr__(self, "args", args)

    def __setattr__(self, name: str, value: Any) -> None:
        raise _Refused("a record cannot be changed")

    def __setstate__(self, state: Any) -> None:
        raise _Refused("BUILD on a record")


class _Tensor(_Record):
    __slots__ = ()


class _Hooks(_Record):
    __slots__ = ()


class _Storage(_Record):
    __slots__ = ()


class _StorageClass(_Record):
    __slots__ = ()


class _TensorRecordUnpickler(pickle.Unpickler):
    def __init__(self, file: BinaryIO, storage_class: str):
        super().__init__(file)
        self.storage_class = storage_class

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) == ("torch._utils", "_rebuild_tensor_v2"):
            return _Constructor(lambda *args: _Tensor(args), "rebuild")
        if (module, name) == ("collections", "OrderedDict"):
            return _Constructor(lambda *args: _Hooks(args), "hooks")
        if module == "torch" and name in _STORAGE_DTYPE:
            return _StorageClass((name,))
        raise _Refused(f"{module}.{name}")

    def persistent_load(self, pid: Any) -> Any:
        if not (type(pid) is tuple and len(pid) == 5 and pid[0] == "storage" and type(pid[1]) is _StorageClass
                and type(pid[2]) is str and type(pid[4]) is int):
            raise _Refused("persistent id")
        if pid[1].args[0] != self.storage_class:
            raise _OtherDtype(_STORAGE_DTYPE[pid[1].args[0]])
        return _Storage((pid[2], pid[4]))


def _ints(value: Any) -> tuple[int, ...] | None:
    if type(value) is not tuple or not all(type(v) is int for v in value):
        return None
    return value


def locate(raw: BinaryIO, start: int, length: int, *, dtype: str, itemsize: int,
           sizes: tuple[int, ...]) -> StoredTensor | None:
    """Where the elements of the ``torch.save`` archive at ``start`` (``length`` bytes of ``raw``) lie.

    ``dtype``, ``itemsize`` and ``sizes`` are what the checkpoint's metadata says the chunk is.
    Returns None when the archive is not a plain little-endian tensor of exactly that dtype and
    sizes whose view lies inside its storage, which lies inside the archive. A plain tensor of
    another dtype is a :class:`CheckpointFormatError`: the metadata misdescribes the data (DCP's
    own reader would convert it to the named dtype without a word).
    """
    storage_class = STORAGE_CLASS.get(dtype)
    if storage_class is None or length <= 0:
        return None
    try:
        archive = _archive(raw, start, length)
        if archive is None:
            return None
        prefix, found = archive
        pkl = found.get(prefix + "data.pkl")
        if pkl is None or pkl.size > PICKLE_MAX_BYTES:
            return None
        record = read_member(raw, start, pkl)
        if record is None:
            return None
        obj = _TensorRecordUnpickler(io.BytesIO(record), storage_class).load()
        return _placed(obj, found, prefix, itemsize, sizes, length)
    except _OtherDtype as e:
        raise CheckpointFormatError(f"stored as {e.stored}, where the checkpoint's metadata says {dtype}") from None
    except Exception:  # any oddity (a crafted pickle, an unreadable range): not vouched for; DCP's reader decides
        return None


def _archive(raw: BinaryIO, start: int, length: int) -> tuple[str, dict[str, Member]] | None:
    """(the top dir with its "/", the members) of a ``torch.save`` archive as :func:`members` reads it,
    every member under one top dir, with a ``version`` record and the byte order ``little``; else None."""
    found = members(raw, start, length) if length > 0 else None
    if not found:
        return None
    prefix = next(iter(found)).split("/", 1)[0] + "/"
    order = found.get(prefix + "byteorder")
    if (prefix == "/" or not all(name.startswith(prefix) for name in found) or prefix + "version" not in found
            or order is None or order.size != len(b"little") or read_member(raw, start, order) != b"little"):
        return None
    return prefix, found


def _placed(obj: Any, found: dict[str, Member], prefix: str, itemsize: int, sizes: tuple[int, ...],
            length: int) -> StoredTensor | None:
    """The checked record as a StoredTensor, or None."""
    if type(obj) is not _Tensor or len(obj.args) not in (6, 7):
        return None
    storage, offset, size, stride, _, hooks = obj.args[:6]
    if type(storage) is not _Storage or type(hooks) is not _Hooks or hooks.args != ():
        return None
    if len(obj.args) == 7 and obj.args[6] is not None:
        return None
    key, numel = storage.args
    size, stride = _ints(size), _ints(stride)
    if (type(offset) is not int or size is None or stride is None or len(size) != len(stride)
            or size != tuple(sizes) or offset < 0 or numel < 0 or any(n < 0 for n in size) or any(s < 0 for s in stride)):
        return None
    # The view's last element must lie in the storage (an empty view needs nothing of it).
    if math.prod(size) and offset + sum((n - 1) * s for n, s in zip(size, stride)) >= numel:
        return None
    member = found.get(f"{prefix}data/{key}")
    if member is None or member.size != numel * itemsize or not 0 <= member.offset <= length - member.size:
        return None
    return StoredTensor(data_offset=member.offset, nbytes=member.size, storage_offset=offset,
                        size=tuple(size), stride=tuple(stride))
