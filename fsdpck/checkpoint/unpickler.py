"""A restricted unpickler for DCP's ``.metadata``: it builds DCP's metadata and nothing else.

``.metadata`` is a pickle, and DCP's own ``FileSystemReader.read_metadata`` runs
``pickle.load`` on it: a crafted checkpoint dir runs code on whoever opens it. Here every
global the pickle names goes through :meth:`RestrictedUnpickler.find_class`, which admits
only the classes DCP metadata is made of (:data:`ADMITTED`) and refuses anything else,
naming it, before it could be called. The list was taken from ``pickletools`` dumps of
``.metadata`` files that torch 2.11 and 2.13 wrote for plain tensors of many dtypes, nested
dicts, byte objects, 0-dim and empty tensors, FSDP1 ShardedTensor and FSDP2 DTensor state.

What an admitted name resolves to can only make fresh objects; it cannot be changed:

- DCP's dataclasses resolve to sealed stand-in classes whose ``__new__`` returns a fresh
  instance of the real class (so DCP's own ``isinstance`` and ``==`` checks hold) and whose
  class attributes cannot be set: a ``BUILD`` aimed at the class itself fails.
- Paths, the layout lookup and the memory-format enum resolve to sealed constructor
  objects (no ``__dict__``, no attribute can be set) that return fresh values.
- ``torch.Size``, ``OrderedDict``, dtypes, layouts and memory formats are built-in objects
  whose attributes cannot be set.

So a pickle can set attributes only on instances it created itself, and no global state
changes. The unpickler reads from a stream whose reads are clamped to the bytes the file
really has left: a length field claiming more is an error, never an allocation.

``light=True`` (``inspect`` without data reads) admits exactly the same names, but DCP's classes
resolve to sealed *records* of fsdpck's own (:class:`Record`): plain holders of the fields the
pickle gives, built only by ``NEWOBJ`` without arguments and filled only by a ``BUILD`` with a
dict of string keys (TensorProperties: its 5-tuple). Nothing of ``torch.distributed.checkpoint``
is imported then — its package imports DTensor's operator tables and FSDP, about as long as
``import torch`` itself (docs/benchmarks.md, "Offline reads") — and nothing of DCP can be
reached from the records. ``fsdpck.checkpoint.metadata.parse_metadata`` reads either kind.
"""

from __future__ import annotations

import functools
import io
import pickle
import re
from pathlib import PurePosixPath, PureWindowsPath
from typing import Any, BinaryIO, Callable

from fsdpck.checkpoint.dtypes import ALIASES, ITEMSIZE, LAYOUTS, MEMORY_FORMATS
from fsdpck.errors import CheckpointFormatError

_DCP_METADATA = "torch.distributed.checkpoint.metadata"
_DCP_FILESYSTEM = "torch.distributed.checkpoint.filesystem"

# (module, name) of every global a DCP .metadata pickle may name, and what it stands for.
ADMITTED: dict[tuple[str, str], str] = {
    (_DCP_METADATA, "Metadata"): "dcp class",
    (_DCP_METADATA, "TensorStorageMetadata"): "dcp class",
    (_DCP_METADATA, "BytesStorageMetadata"): "dcp class",
    (_DCP_METADATA, "ChunkStorageMetadata"): "dcp class",
    (_DCP_METADATA, "TensorProperties"): "dcp class",
    (_DCP_METADATA, "MetadataIndex"): "dcp class",
    (_DCP_METADATA, "StorageMeta"): "dcp class",
    (_DCP_FILESYSTEM, "_StorageInfo"): "dcp class",
    (_DCP_METADATA, "_MEM_FORMAT_ENCODING"): "memory format enum",
    ("torch", "Size"): "torch.Size",
    ("collections", "OrderedDict"): "OrderedDict",
    ("torch.serialization", "_get_layout"): "layout by name",
    ("pathlib", "PosixPath"): "posix path",
    ("pathlib", "PurePosixPath"): "posix path",
    ("pathlib", "WindowsPath"): "windows path",
    ("pathlib", "PureWindowsPath"): "windows path",
    # Python 3.13 moved the concrete path classes into pathlib._local.
    ("pathlib._local", "PosixPath"): "posix path",
    ("pathlib._local", "PurePosixPath"): "posix path",
    ("pathlib._local", "WindowsPath"): "windows path",
    ("pathlib._local", "PureWindowsPath"): "windows path",
}
# Besides those: torch.<dtype>, torch.<layout> and torch.<memory_format>, by name.
ADMITTED_TORCH_OBJECTS = "torch.<dtype>, torch.<layout>, torch.<memory_format> (e.g. torch.float32, torch.strided)"


class _Sealed(type):
    """Metaclass of the stand-in classes: no attribute of the class can be set or deleted."""

    def __setattr__(cls, name: str, value: Any) -> None:
        raise pickle.UnpicklingError(f"refused to set {name!r} on the class {cls.__name__}")

    def __delattr__(cls, name: str) -> None:
        raise pickle.UnpicklingError(f"refused to delete {name!r} from the class {cls.__name__}")


class _Constructor:
    """A sealed callable that makes fresh values (paths, layouts, enum members)."""

    __slots__ = ("_fn", "_name")

    def __init__(self, fn: Callable[..., Any], name: str):
        object.__setattr__(self, "_fn", fn)
        object.__setattr__(self, "_name", name)

    def __call__(self, *args: Any) -> Any:
        return self._fn(*args)

    def __setattr__(self, name: str, value: Any) -> None:
        raise pickle.UnpicklingError(f"refused to set {name!r} on {self._name}")

    def __delattr__(self, name: str) -> None:
        raise pickle.UnpicklingError(f"refused to delete {name!r} from {self._name}")

    def __reduce__(self):  # never pickled anywhere
        raise TypeError(f"{self._name} stand-in is not picklable")


def _stand_in(real: type) -> type:
    """A sealed subclass of ``real`` whose instances are fresh instances of ``real`` itself."""

    def __new__(cls, *args: Any, **kwargs: Any) -> Any:
        if args or kwargs:  # called as a constructor (REDUCE): the real class, properly initialised
            return real(*args, **kwargs)
        return object.__new__(real)  # NEWOBJ: an empty instance that BUILD then fills in

    return _Sealed(real.__name__, (real,), {"__new__": __new__, "__slots__": (), "__module__": __name__})


class Record(metaclass=_Sealed):
    """A DCP metadata object as plain data (light mode): the fields its pickle gave, and no behaviour."""

    __slots__ = ("__dict__",)
    __hash__ = None  # type: ignore[assignment]  # as DCP's dataclasses (frozen MetadataIndex aside)

    def __new__(cls, *args: Any, **kwargs: Any) -> Any:
        if args or kwargs:  # DCP's metadata pickles build these with NEWOBJ and no arguments
            raise pickle.UnpicklingError(f"refused to build {cls.__name__} with arguments")
        return object.__new__(cls)

    def __setstate__(self, state: Any) -> None:
        if not isinstance(state, dict) or not all(type(k) is str for k in state):
            raise pickle.UnpicklingError(f"{type(self).__name__}: a state of a {type(state).__name__}, not fields")
        self.__dict__.update(state)

    def __reduce__(self):  # never pickled anywhere
        raise TypeError(f"{type(self).__name__} record is not picklable")


class _PropertiesRecord(Record):
    """DCP's TensorProperties pickles its fields as a tuple (its own ``__getstate__``)."""

    __slots__ = ()
    FIELDS = ("dtype", "layout", "requires_grad", "memory_format", "pin_memory")

    def __setstate__(self, state: Any) -> None:
        if not isinstance(state, tuple) or len(state) != len(self.FIELDS):
            raise pickle.UnpicklingError(f"TensorProperties: a state of a {type(state).__name__}, not 5 fields")
        self.__dict__.update(zip(self.FIELDS, state))


class _IndexRecord(Record):
    """DCP's MetadataIndex is a frozen dataclass: equal and hashed by (fqn, offset), as dict keys need."""

    __slots__ = ()

    def _key(self) -> tuple[Any, Any]:
        return getattr(self, "fqn", None), getattr(self, "offset", None)

    def __eq__(self, other: Any) -> bool:
        return type(other) is type(self) and self._key() == other._key()

    def __hash__(self) -> int:  # type: ignore[override]
        return hash(self._key())


# The defaults of DCP's dataclass fields (class attributes there: a field a pickle leaves out reads as
# its default), as torch 2.11-2.13 define them; fields with a default factory are absent here.
RECORD_DEFAULTS: dict[str, dict[str, Any]] = {
    "Metadata": {"planner_data": None, "storage_data": None, "storage_meta": None, "version": None},
    "MetadataIndex": {"offset": None, "index": None},
    "StorageMeta": {"checkpoint_id": None, "save_id": None, "load_id": None},
    "_StorageInfo": {"transform_descriptors": None},
}


@functools.lru_cache(maxsize=None)
def record_class(name: str) -> type:
    """The sealed record class that stands for DCP's class ``name`` in light mode."""
    base = {"TensorProperties": _PropertiesRecord, "MetadataIndex": _IndexRecord}.get(name, Record)
    return _Sealed(name, (base,), {"__slots__": (), "__module__": __name__, **RECORD_DEFAULTS.get(name, {})})


class TorchName(metaclass=_Sealed):
    """A dtype, layout or memory format of torch in light mode: its name (and a dtype's element size)."""

    __slots__ = ("kind", "name", "itemsize")

    def __init__(self, kind: str, name: str, itemsize: int | None = None):
        for field, value in (("kind", kind), ("name", name), ("itemsize", itemsize)):
            object.__setattr__(self, field, value)

    def __setattr__(self, name: str, value: Any) -> None:
        raise pickle.UnpicklingError(f"refused to set {name!r} on torch.{self.name}")

    def __eq__(self, other: Any) -> bool:
        return type(other) is TorchName and (self.kind, self.name) == (other.kind, other.name)

    def __hash__(self) -> int:
        return hash((self.kind, self.name))

    def __repr__(self) -> str:
        return f"torch.{self.name}"

    def __reduce__(self):  # never pickled anywhere
        raise TypeError("a light-mode torch name is not picklable")


# The shape of a dtype's name (float8_e4m3fn, uint3, bits16, ...): only such a name, when the table
# does not know it, is asked of torch; any other name of torch's is refused as it is.
_DTYPE_NAME = re.compile(r"(b?float|q?u?int|complex|bits)[0-9][0-9a-z_]*")


def _torch_name(name: str) -> TorchName | None:
    """``torch.<name>`` in light mode: a known dtype, layout or memory format; else torch's own answer."""
    name = ALIASES.get(name, name)
    if name in ITEMSIZE:
        return TorchName("dtype", name, ITEMSIZE[name])
    if name in LAYOUTS:
        return TorchName("layout", name)
    if name in MEMORY_FORMATS:
        return TorchName("memory_format", name)
    if not _DTYPE_NAME.fullmatch(name):  # refused without importing torch (about 2 s)
        return None
    import torch  # a dtype name this table does not know (a newer torch's): torch decides

    value = vars(torch).get(name)  # not getattr: torch imports submodules lazily by name
    if isinstance(value, torch.dtype):
        return TorchName("dtype", str(value).removeprefix("torch."), value.itemsize)
    if isinstance(value, (torch.layout, torch.memory_format)):
        return TorchName("layout" if isinstance(value, torch.layout) else "memory_format", name)
    return None


def _size_record(values: Any) -> tuple:
    """``torch.Size(values)`` in light mode: a plain tuple (parse_metadata checks its items)."""
    if type(values) not in (tuple, list):
        raise pickle.UnpicklingError(f"torch.Size of a {type(values).__name__}")
    return tuple(values)


def _layout_record(name: Any) -> TorchName:
    """``torch.serialization._get_layout`` in light mode: only a known layout's name."""
    if isinstance(name, str) and name.startswith("torch."):
        found = _torch_name(name[len("torch."):])
        if found is not None and found.kind == "layout":
            return found
    raise pickle.UnpicklingError(f"{name!r} is not the name of a torch.layout")


def _memory_format_code(value: Any) -> int:
    """``_MEM_FORMAT_ENCODING(value)`` in light mode: the enum's value itself, one of its three."""
    if type(value) is not int or not 0 <= value <= 2:
        raise pickle.UnpicklingError(f"{value!r} is not a memory format code")
    return value


def _layout_from_name(name: Any) -> Any:
    """``torch.serialization._get_layout``: only a known layout's name, nothing else."""
    import torch

    if isinstance(name, str) and name.startswith("torch."):
        value = vars(torch).get(name[len("torch."):])
        if isinstance(value, torch.layout):
            return value
    raise pickle.UnpicklingError(f"{name!r} is not the name of a torch.layout")


def _memory_format_encoding(value: Any) -> Any:
    from torch.distributed.checkpoint.metadata import _MEM_FORMAT_ENCODING

    return _MEM_FORMAT_ENCODING(value)


@functools.lru_cache(maxsize=None)
def resolve(module: str, name: str, light: bool = False) -> Any:
    """What a .metadata pickle gets for the global ``module.name``, or None when it is not admitted.
    ``light``: nothing of torch is imported (unless a dtype is not in ``fsdpck.checkpoint.dtypes``)."""
    origin = ADMITTED.get((module, name))
    if light:
        return _resolve_light(module, name, origin)
    import torch

    if origin == "dcp class":
        import torch.distributed.checkpoint.filesystem as dcp_fs
        import torch.distributed.checkpoint.metadata as dcp_md

        return _stand_in(getattr(dcp_md if module == _DCP_METADATA else dcp_fs, name))
    if origin == "memory format enum":
        return _Constructor(_memory_format_encoding, f"{module}.{name}")
    if origin == "torch.Size":
        return torch.Size
    if origin == "layout by name":
        return _Constructor(_layout_from_name, f"{module}.{name}")
    if module == "torch" and "." not in name:
        value = vars(torch).get(name)  # not getattr: a name such as _dynamo would import that module
        if isinstance(value, (torch.dtype, torch.layout, torch.memory_format)):
            return value
    return _resolve_common(module, name, origin)


def _resolve_light(module: str, name: str, origin: str | None) -> Any:
    """:func:`resolve` in light mode: records and names of fsdpck's own."""
    if origin == "dcp class":
        return record_class(name)
    if origin == "memory format enum":
        return _Constructor(_memory_format_code, f"{module}.{name}")
    if origin == "torch.Size":
        return _Constructor(_size_record, "torch.Size")
    if origin == "layout by name":
        return _Constructor(_layout_record, f"{module}.{name}")
    if module == "torch" and "." not in name and origin is None:
        return _torch_name(name)
    return _resolve_common(module, name, origin)


def _resolve_common(module: str, name: str, origin: str | None) -> Any:
    if origin == "OrderedDict":
        from collections import OrderedDict

        return OrderedDict
    if origin == "posix path":
        return _Constructor(PurePosixPath, f"{module}.{name}")
    if origin == "windows path":
        return _Constructor(PureWindowsPath, f"{module}.{name}")
    return None


class RestrictedUnpickler(pickle.Unpickler):
    """Admits only the classes DCP metadata is made of; anything else is refused by name, uncalled."""

    def __init__(self, file: BinaryIO, *, source: str, light: bool = False):
        super().__init__(file)
        self.source = source
        self.light = light

    def find_class(self, module: str, name: str) -> Any:
        obj = resolve(module, name, self.light)
        if obj is None:
            raise CheckpointFormatError(
                f"{self.source}: refused to unpickle {module}.{name}: it is not one of the classes DCP "
                "metadata is made of (a crafted or foreign file; nothing in it was executed)"
            )
        return obj

    def persistent_load(self, pid: Any) -> Any:
        raise CheckpointFormatError(f"{self.source}: refused a persistent id in the metadata pickle")


class ClampedReader(io.RawIOBase):
    """A read-only stream that never hands out (or allocates for) more than ``size`` bytes in all."""

    def __init__(self, raw: BinaryIO, size: int):
        self._raw = raw
        self._left = size

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        view = memoryview(buffer)[: self._left]
        n = self._raw.readinto(view) if view.nbytes else 0
        self._left -= n or 0
        return n or 0

    def read(self, size: int = -1) -> bytes:
        size = self._left if size is None or size < 0 else min(size, self._left)
        data = self._raw.read(size) if size else b""
        self._left -= len(data)
        return data


def load_metadata(stream: BinaryIO, *, size: int, source: str, light: bool = False) -> Any:
    """The DCP ``Metadata`` in a ``.metadata`` stream of ``size`` bytes, unpickled safely (``light``: as records).

    Raises CheckpointFormatError for anything that is not a readable DCP metadata pickle.
    """
    if light:
        Metadata = record_class("Metadata")
    else:
        from torch.distributed.checkpoint.metadata import Metadata

    if size <= 0:
        raise CheckpointFormatError(f"{source}: empty file (0 bytes): not DCP metadata")
    try:
        obj = RestrictedUnpickler(io.BufferedReader(ClampedReader(stream, size)), source=source, light=light).load()
    except CheckpointFormatError:
        raise
    except RecursionError:
        raise CheckpointFormatError(f"{source}: not DCP metadata: the pickle nests too deeply") from None
    except Exception as e:  # a hostile or damaged pickle can fail in any way; none is a crash of fsdpck
        text = str(e).splitlines()[0][:300] if str(e) else ""
        raise CheckpointFormatError(f"{source}: not a readable DCP metadata pickle: {type(e).__name__}: {text}") from None
    if not isinstance(obj, Metadata):
        raise CheckpointFormatError(f"{source}: holds a {type(obj).__name__}, not DCP Metadata")
    return obj
