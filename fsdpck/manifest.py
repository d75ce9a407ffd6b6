"""The manifest ``fsdpck.json``: what fsdpck saved into a checkpoint dir, readable without torch.

``fsdpck save`` (and ``verify --keep``) writes it after DCP has finished, from rank 0,
atomically: a temporary file in the same dir, then ``os.replace``, so a reader sees the
old manifest, the new one or none, never half of one. It records the format version,
the fsdpck and torch versions, the world size, the flow, the model dims and seed, and for
every DCP key (the flattened key exactly as in the checkpoint's ``state_dict_metadata``)
either the shape, dtype, fingerprint and a few stats of the tensor before the save, or a
canonical string of a non-tensor value. ``fsdpck load`` and ``fsdpck inspect
--verify-data`` check against it.

Format version 1 (DESIGN.md, "The manifest")::

    {"format": "fsdpck.manifest", "version": 1,
     "fsdpck_version": "0.1.0", "torch_version": "2.13.0+cpu",
     "created": "2026-11-28T13:00:00Z", "world_size": 2,
     "flow": {"fsdp": 1, "api": "legacy", ...}, "model": {"dims": [8, 2, 4, 6], ...},
     "keys": {"optim.state.net1.0.weight.exp_avg": {"kind": "tensor", "shape": [2, 8],
                 "dtype": "float32", "fingerprint": "0123456789abcdef",
                 "stats": {"numel": 16, "min": -0.1, "max": 0.1, "abs_max": 0.1,
                           "mean": 0.0, "nonfinite": 0}},
              "optim.param_groups.0.lr": {"kind": "object", "canonical": "0.1"}}}

A reader refuses, with :class:`~fsdpck.errors.CheckpointFormatError` naming the file and
the field, anything that is not such a document: bad UTF-8 or JSON (a truncated file),
missing or mistyped fields, duplicate keys, or a newer format version than this fsdpck
reads. Fields it does not know are ignored, so version 1 can grow optional fields.
"""

from __future__ import annotations

import json
import math
import os
import re
import secrets
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from fsdpck import __version__
from fsdpck.errors import CheckpointFormatError

MANIFEST_NAME = "fsdpck.json"
FORMAT_NAME = "fsdpck.manifest"
FORMAT_VERSION = 1  # the newest manifest version this fsdpck reads and the one it writes

KIND_TENSOR = "tensor"
KIND_OBJECT = "object"

_HEX16 = re.compile(r"[0-9a-f]{16}")
_STAT_FLOATS = ("min", "max", "abs_max", "mean")


@dataclass(kw_only=True, slots=True)
class TensorStats:
    """A few numbers about a tensor's values; the floats are None for empty tensors (or when not finite)."""

    numel: int
    min: float | None = None
    max: float | None = None
    abs_max: float | None = None
    mean: float | None = None
    nonfinite: int | None = None

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"numel": self.numel}
        for name in _STAT_FLOATS:
            value = getattr(self, name)
            # JSON has no NaN or infinity; nonfinite counts them instead.
            out[name] = float(value) if value is not None and math.isfinite(value) else None
        out["nonfinite"] = self.nonfinite
        return out


@dataclass(kw_only=True, slots=True)
class ManifestEntry:
    """One DCP key: a tensor (shape, dtype, fingerprint, stats) or an object (its canonical string)."""

    kind: str
    shape: tuple[int, ...] | None = None
    dtype: str | None = None
    fingerprint: str | None = None
    stats: TensorStats | None = None
    canonical: str | None = None

    def __post_init__(self) -> None:
        if self.kind == KIND_TENSOR:
            if self.shape is None or self.dtype is None or self.fingerprint is None:
                raise ValueError("a tensor entry needs shape, dtype and fingerprint")
            self.shape = tuple(int(s) for s in self.shape)
            if not _HEX16.fullmatch(self.fingerprint):
                raise ValueError(f"fingerprint {self.fingerprint!r} is not 16 lowercase hex digits")
        elif self.kind == KIND_OBJECT:
            if self.canonical is None:
                raise ValueError("an object entry needs canonical")
        else:
            raise ValueError(f"kind {self.kind!r} is neither {KIND_TENSOR!r} nor {KIND_OBJECT!r}")

    def to_json(self) -> dict[str, Any]:
        if self.kind == KIND_OBJECT:
            return {"kind": KIND_OBJECT, "canonical": self.canonical}
        out: dict[str, Any] = {
            "kind": KIND_TENSOR,
            "shape": list(self.shape or ()),
            "dtype": self.dtype,
            "fingerprint": self.fingerprint,
        }
        if self.stats is not None:
            out["stats"] = self.stats.to_json()
        return out


def _utc_now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass(kw_only=True, slots=True)
class Manifest:
    """The manifest of one checkpoint dir (format version 1)."""

    torch_version: str
    world_size: int
    flow: dict[str, Any] = field(default_factory=dict)
    model: dict[str, Any] = field(default_factory=dict)
    keys: dict[str, ManifestEntry] = field(default_factory=dict)
    fsdpck_version: str = __version__
    created: str = field(default_factory=_utc_now)
    version: int = FORMAT_VERSION

    def to_json(self) -> dict[str, Any]:
        """The JSON document (a dict ready for ``json.dumps``)."""
        return {
            "format": FORMAT_NAME,
            "version": self.version,
            "fsdpck_version": self.fsdpck_version,
            "torch_version": self.torch_version,
            "created": self.created,
            "world_size": self.world_size,
            "flow": dict(self.flow),
            "model": dict(self.model),
            "keys": {key: entry.to_json() for key, entry in self.keys.items()},
        }

    @classmethod
    def from_json(cls, doc: Any, *, source: str = MANIFEST_NAME) -> Manifest:
        """Validate a parsed document; raises CheckpointFormatError naming ``source`` and the field."""
        return _parse_manifest(doc, source)


def write_manifest(directory: str | os.PathLike, manifest: Manifest) -> Path:
    """Write ``DIR/fsdpck.json`` atomically (temporary file in DIR, fsync, ``os.replace``); rank 0 calls it.

    The file gets the permissions the umask gives new files (not mkstemp's 0600): the
    checkpoint dir is often shared, and whoever reads the checkpoint must read it too.
    """
    directory = Path(directory)
    path = directory / MANIFEST_NAME
    text = json.dumps(manifest.to_json(), indent=1, allow_nan=False) + "\n"
    tmp = directory / f".{MANIFEST_NAME}.{os.getpid()}.{secrets.token_hex(4)}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(directory)
    return path


def _fsync_dir(directory: Path) -> None:
    """Make the rename durable where the file system supports syncing a directory (best effort)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def read_manifest(directory: str | os.PathLike) -> Manifest | None:
    """The manifest in ``directory``, or None when it has none; CheckpointFormatError when it is malformed."""
    path = Path(directory) / MANIFEST_NAME
    if not path.exists():
        return None
    if not path.is_file():  # a FIFO would block the read forever
        raise CheckpointFormatError(f"{path}: not a regular file")
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return None
    except OSError as e:
        raise CheckpointFormatError(f"{path}: cannot read the manifest: {e.strerror or e}") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise CheckpointFormatError(f"{path}: not UTF-8 text at byte {e.start}: not an fsdpck manifest") from None
    try:
        doc = json.loads(text, object_pairs_hook=_no_duplicate_keys(path))
    except json.JSONDecodeError as e:
        hint = " (the file ends early: truncated?)" if _ends_early(text) else ""
        raise CheckpointFormatError(
            f"{path}: not valid JSON: {e.msg} (line {e.lineno}, column {e.colno}){hint}"
        ) from None
    except RecursionError:
        raise CheckpointFormatError(f"{path}: not a manifest: JSON nested too deeply") from None
    return _parse_manifest(doc, str(path))


def _ends_early(text: str) -> bool:
    """Whether JSON text stops inside a string or an open object/array: a truncated file, not a typo."""
    depth, in_string, escaped = 0, False, False
    for c in text:
        if in_string:
            if escaped:
                escaped = False
            elif c == "\\":
                escaped = True
            elif c == '"':
                in_string = False
        elif c == '"':
            in_string = True
        elif c in "[{":
            depth += 1
        elif c in "]}":
            depth -= 1
    return in_string or depth > 0 or not text.strip()


def _no_duplicate_keys(path: Path):
    def hook(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for key, value in pairs:
            if key in out:
                raise CheckpointFormatError(f"{path}: the JSON object has the key {key!r} twice")
            out[key] = value
        return out

    return hook


# --- validation ------------------------------------------------------------------------


def _fail(source: str, where: str, message: str) -> CheckpointFormatError:
    return CheckpointFormatError(f"{source}: {where}: {message}")


def _type_name(value: Any) -> str:
    return {dict: "an object", list: "an array", str: "a string", bool: "a boolean", type(None): "null"}.get(
        type(value), "a number"
    )


def _require(doc: dict[str, Any], name: str, kind: type | tuple[type, ...], source: str, where: str = "") -> Any:
    path = f"{where}.{name}" if where else name
    if name not in doc:
        raise _fail(source, path, "missing")
    value = doc[name]
    # bool is an int subclass in Python; a JSON true is never a count.
    if isinstance(value, bool) and bool not in (kind if isinstance(kind, tuple) else (kind,)):
        raise _fail(source, path, f"expected {_kind_words(kind)}, got {_type_name(value)}")
    if not isinstance(value, kind):
        raise _fail(source, path, f"expected {_kind_words(kind)}, got {_type_name(value)}")
    return value


def _kind_words(kind: type | tuple[type, ...]) -> str:
    kinds = kind if isinstance(kind, tuple) else (kind,)
    words = {dict: "an object", list: "an array", str: "a string", int: "an integer", float: "a number"}
    return " or ".join(dict.fromkeys(words.get(k, k.__name__) for k in kinds))


def _parse_manifest(doc: Any, source: str) -> Manifest:
    if not isinstance(doc, dict):
        raise CheckpointFormatError(f"{source}: not an fsdpck manifest: the document is {_type_name(doc)}, not an object")
    fmt = doc.get("format")
    if fmt != FORMAT_NAME:
        raise _fail(source, "format", f"expected {FORMAT_NAME!r}, got {fmt!r}: not an fsdpck manifest")
    version = _require(doc, "version", int, source)
    if version > FORMAT_VERSION:
        writer = doc.get("fsdpck_version")
        by = f" (written by fsdpck {writer})" if isinstance(writer, str) else ""
        raise _fail(
            source,
            "version",
            f"manifest format version {version}{by} is newer than this fsdpck {__version__} reads "
            f"(version {FORMAT_VERSION}): upgrade fsdpck",
        )
    if version < 1:
        raise _fail(source, "version", f"{version} is not a manifest format version (versions start at 1)")

    fsdpck_version = _require(doc, "fsdpck_version", str, source)
    torch_version = _require(doc, "torch_version", str, source)
    created = _require(doc, "created", str, source)
    world_size = _require(doc, "world_size", int, source)
    if world_size < 1:
        raise _fail(source, "world_size", f"expected a positive integer, got {world_size}")
    flow = _require(doc, "flow", dict, source)
    model = _require(doc, "model", dict, source)
    keys_doc = _require(doc, "keys", dict, source)

    keys: dict[str, ManifestEntry] = {}
    for key, entry_doc in keys_doc.items():
        keys[key] = _parse_entry(key, entry_doc, source)
    return Manifest(
        version=version,
        fsdpck_version=fsdpck_version,
        torch_version=torch_version,
        created=created,
        world_size=world_size,
        flow=flow,
        model=model,
        keys=keys,
    )


def _parse_entry(key: str, doc: Any, source: str) -> ManifestEntry:
    where = f"keys[{key!r}]"
    if not isinstance(doc, dict):
        raise _fail(source, where, f"expected an object, got {_type_name(doc)}")
    kind = _require(doc, "kind", str, source, where)
    if kind == KIND_OBJECT:
        canonical = _require(doc, "canonical", str, source, where)
        return ManifestEntry(kind=KIND_OBJECT, canonical=canonical)
    if kind != KIND_TENSOR:
        raise _fail(source, f"{where}.kind", f"expected {KIND_TENSOR!r} or {KIND_OBJECT!r}, got {kind!r}")
    shape = _require(doc, "shape", list, source, where)
    for s in shape:
        if isinstance(s, bool) or not isinstance(s, int) or s < 0:
            raise _fail(source, f"{where}.shape", f"expected non-negative integers, got {shape!r}")
    dtype = _require(doc, "dtype", str, source, where)
    fingerprint = _require(doc, "fingerprint", str, source, where)
    if not _HEX16.fullmatch(fingerprint):
        raise _fail(source, f"{where}.fingerprint", f"expected 16 lowercase hex digits, got {fingerprint!r}")
    stats = None
    if doc.get("stats") is not None:
        stats = _parse_stats(doc["stats"], source, f"{where}.stats")
    return ManifestEntry(kind=KIND_TENSOR, shape=tuple(shape), dtype=dtype, fingerprint=fingerprint, stats=stats)


def _parse_stats(doc: Any, source: str, where: str) -> TensorStats:
    if not isinstance(doc, dict):
        raise _fail(source, where, f"expected an object, got {_type_name(doc)}")
    numel = _require(doc, "numel", int, source, where)
    values: dict[str, float | None] = {}
    for name in _STAT_FLOATS:
        value = doc.get(name)
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))):
            raise _fail(source, f"{where}.{name}", f"expected a number or null, got {_type_name(value)}")
        values[name] = None if value is None else float(value)
    nonfinite = doc.get("nonfinite")
    if nonfinite is not None and (isinstance(nonfinite, bool) or not isinstance(nonfinite, int)):
        raise _fail(source, f"{where}.nonfinite", f"expected an integer or null, got {_type_name(nonfinite)}")
    return TensorStats(numel=numel, nonfinite=nonfinite, **values)
