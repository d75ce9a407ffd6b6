"""The manifest ``fsdpck.json``: what fsdpck saved into a checkpoint, readable without torch.

``fsdpck save`` (and ``verify --keep``) writes it after DCP has finished on every rank, from
rank 0, atomically where the storage allows (a temporary file, then a rename), so a reader
sees the old manifest, the new one or none, never half of one. Format version 1
(DESIGN.md, "The manifest")::

    {"format": "fsdpck.manifest", "version": 1,
     "fsdpck_version": "0.2.0", "torch_version": "2.13.0+cpu",
     "created": "2026-12-02T13:00:00Z", "world_size": 4,
     "flow": {"fsdp": 2, "api": "dsd", "optimizer": "adam", "dtype": "float32", ...},
     "model": {"dims": [8, 4, 8, 12], "width": 1, "seed": 0},
     "layout": {"replicate": 2, "tp": 1},
     "keys": {"optim.state.net1.0.weight.exp_avg": {"kind": "tensor", "shape": [4, 8],
                 "dtype": "float32", "fingerprint": "0123456789abcdef",
                 "stats": {"numel": 32, "min": -0.1, "max": 0.1, "abs_max": 0.1,
                           "mean": 0.0, "nonfinite": 0}},
              "optim.param_groups.0.lr": {"kind": "object", "canonical": "0x1.999999999999ap-4"}}}

A manifest is data from whoever wrote the dir. It is read whole only up to
:data:`MAX_BYTES`, then validated whole before anything uses it: types, ranges (every count
and shape a non-negative integer of sane size), known kinds, no duplicate JSON keys, and a
format version this fsdpck reads. Anything else is a :class:`~fsdpck.errors.CheckpointFormatError`
naming the file and the field. Fields it does not know are ignored, so version 1 can grow
optional fields (``layout`` and ``trainer_state`` came that way). Which flow values are known
is the registry's to say (``fsdpck.state.registry``), checked where a manifest drives a load.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

from fsdpck import __version__
from fsdpck.errors import CheckpointFormatError

MANIFEST_NAME = "fsdpck.json"
FORMAT_NAME = "fsdpck.manifest"
FORMAT_VERSION = 1  # the newest manifest version this fsdpck reads and the one it writes
MAX_BYTES = 256 << 20  # a manifest of a million keys is about 300 MB of JSON; none is larger
MAX_INT = (1 << 62) - 1

KIND_TENSOR = "tensor"
KIND_OBJECT = "object"

_HEX16 = re.compile(r"[0-9a-f]{16}")
_STAT_FLOATS = ("min", "max", "abs_max", "mean")


@dataclass(kw_only=True, slots=True)
class TensorStats:
    """A few numbers about a tensor's values; the floats are None for empty tensors (or when none is finite)."""

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
        out: dict[str, Any] = {"kind": KIND_TENSOR, "shape": list(self.shape or ()), "dtype": self.dtype,
                               "fingerprint": self.fingerprint}
        if self.stats is not None:
            out["stats"] = self.stats.to_json()
        return out


def _utc_now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass(kw_only=True, slots=True)
class Manifest:
    """The manifest of one checkpoint (format version 1)."""

    torch_version: str
    world_size: int
    flow: dict[str, Any] = field(default_factory=dict)
    model: dict[str, Any] = field(default_factory=dict)
    layout: dict[str, Any] = field(default_factory=dict)
    keys: dict[str, ManifestEntry] = field(default_factory=dict)
    fsdpck_version: str = __version__
    created: str = field(default_factory=_utc_now)
    version: int = FORMAT_VERSION

    def to_json(self) -> dict[str, Any]:
        """The JSON document (a dict ready for ``json.dumps``)."""
        return {
            "format": FORMAT_NAME, "version": self.version, "fsdpck_version": self.fsdpck_version,
            "torch_version": self.torch_version, "created": self.created, "world_size": self.world_size,
            "flow": dict(self.flow), "model": dict(self.model), "layout": dict(self.layout),
            "keys": {key: entry.to_json() for key, entry in self.keys.items()},
        }

    def encode(self) -> bytes:
        return (json.dumps(self.to_json(), indent=1, allow_nan=False) + "\n").encode()

    @classmethod
    def from_json(cls, doc: Any, *, source: str = MANIFEST_NAME) -> Manifest:
        """Validate a parsed document; raises CheckpointFormatError naming ``source`` and the field."""
        return _parse_manifest(doc, source)


def write_manifest(storage: Any, manifest: Manifest) -> None:
    """Write ``fsdpck.json`` into the checkpoint's storage (atomically where it can); rank 0 calls it."""
    storage.write_atomic(MANIFEST_NAME, manifest.encode())


def read_manifest(storage: Any) -> Manifest | None:
    """The manifest in ``storage``, or None when it has none; CheckpointFormatError when it is malformed."""
    entry = storage.stat(MANIFEST_NAME)
    if entry is None:
        return None
    where = f"{storage.url}/{MANIFEST_NAME}"
    if entry.kind != "file":
        raise CheckpointFormatError(f"{where}: a {entry.kind}, not a regular file (not followed, not read)")
    try:
        raw = storage.read_bytes(MANIFEST_NAME, limit=MAX_BYTES)
    except FileNotFoundError:
        return None
    except OSError as e:
        raise CheckpointFormatError(f"{where}: cannot read the manifest: {e.strerror or e}") from None
    return parse_manifest_bytes(raw, source=where)


def parse_manifest_bytes(raw: bytes, *, source: str) -> Manifest:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise CheckpointFormatError(f"{source}: not UTF-8 text at byte {e.start}: not an fsdpck manifest") from None
    try:
        doc = json.loads(text, object_pairs_hook=_no_duplicate_keys(source), parse_constant=_no_constant(source),
                         parse_int=_bounded_int(source))
    except json.JSONDecodeError as e:
        hint = " (the file ends early: truncated?)" if _ends_early(text) else ""
        raise CheckpointFormatError(f"{source}: not valid JSON: {e.msg} (line {e.lineno}, column {e.colno}){hint}") from None
    except RecursionError:
        raise CheckpointFormatError(f"{source}: not a manifest: JSON nested too deeply") from None
    return _parse_manifest(doc, source)


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


def _no_duplicate_keys(source: str):
    def hook(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for key, value in pairs:
            if key in out:
                raise CheckpointFormatError(f"{source}: the JSON object has the key {key[:80]!r} twice")
            out[key] = value
        return out

    return hook


def _no_constant(source: str):
    def hook(name: str) -> Any:
        raise CheckpointFormatError(f"{source}: {name} is not JSON (and not a value a manifest holds)")

    return hook


def _bounded_int(source: str):
    def hook(text: str) -> int:
        if len(text.lstrip("-")) > 19:  # beyond 2**63: no count, size or seed is that large
            raise CheckpointFormatError(f"{source}: an integer of {len(text)} digits is out of range")
        return int(text)

    return hook


# --- validation ------------------------------------------------------------------------


def _fail(source: str, where: str, message: str) -> CheckpointFormatError:
    return CheckpointFormatError(f"{source}: {where}: {message}")


def _type_name(value: Any) -> str:
    return {dict: "an object", list: "an array", str: "a string", bool: "a boolean", type(None): "null"}.get(
        type(value), "a number")


def _kind_words(kind: type | tuple[type, ...]) -> str:
    kinds = kind if isinstance(kind, tuple) else (kind,)
    words = {dict: "an object", list: "an array", str: "a string", int: "an integer", float: "a number"}
    return " or ".join(dict.fromkeys(words.get(k, k.__name__) for k in kinds))


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


def _count(value: Any, source: str, where: str, *, minimum: int = 0) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not minimum <= value <= MAX_INT:
        raise _fail(source, where, f"expected an integer of at least {minimum}, got {_type_name(value)} "
                                   f"{value if isinstance(value, int) and not isinstance(value, bool) else ''}".rstrip())
    return value


def _parse_manifest(doc: Any, source: str) -> Manifest:
    if not isinstance(doc, dict):
        raise CheckpointFormatError(f"{source}: not an fsdpck manifest: the document is {_type_name(doc)}, not an object")
    fmt = doc.get("format")
    if fmt != FORMAT_NAME:
        shown = fmt if isinstance(fmt, (str, int, float, type(None))) else _type_name(fmt)
        raise _fail(source, "format", f"expected {FORMAT_NAME!r}, got {str(shown)[:80]!r}: not an fsdpck manifest")
    version = _require(doc, "version", int, source)
    if version > FORMAT_VERSION:
        writer = doc.get("fsdpck_version")
        by = f" (written by fsdpck {writer[:40]})" if isinstance(writer, str) else ""
        raise _fail(source, "version", f"manifest format version {version}{by} is newer than this fsdpck "
                                       f"{__version__} reads (version {FORMAT_VERSION}): upgrade fsdpck")
    if version < 1:
        raise _fail(source, "version", f"{version} is not a manifest format version (versions start at 1)")
    fsdpck_version = _require(doc, "fsdpck_version", str, source)
    torch_version = _require(doc, "torch_version", str, source)
    created = _require(doc, "created", str, source)
    world_size = _count(_require(doc, "world_size", int, source), source, "world_size", minimum=1)
    flow = _require(doc, "flow", dict, source)
    model = _require(doc, "model", dict, source)
    layout = doc.get("layout", {})
    if not isinstance(layout, dict):
        raise _fail(source, "layout", f"expected an object, got {_type_name(layout)}")
    keys_doc = _require(doc, "keys", dict, source)
    keys = {key: _parse_entry(key, entry_doc, source) for key, entry_doc in keys_doc.items()}
    return Manifest(version=version, fsdpck_version=fsdpck_version, torch_version=torch_version, created=created,
                    world_size=world_size, flow=flow, model=model, layout=layout, keys=keys)


def _parse_entry(key: str, doc: Any, source: str) -> ManifestEntry:
    where = f"keys[{key[:200]!r}]"
    if not isinstance(doc, dict):
        raise _fail(source, where, f"expected an object, got {_type_name(doc)}")
    kind = _require(doc, "kind", str, source, where)
    if kind == KIND_OBJECT:
        return ManifestEntry(kind=KIND_OBJECT, canonical=_require(doc, "canonical", str, source, where))
    if kind != KIND_TENSOR:
        raise _fail(source, f"{where}.kind", f"expected {KIND_TENSOR!r} or {KIND_OBJECT!r}, got {kind[:40]!r}")
    shape = _require(doc, "shape", list, source, where)
    if len(shape) > 64:
        raise _fail(source, f"{where}.shape", f"{len(shape)} dims, more than any tensor has")
    for s in shape:
        _count(s, source, f"{where}.shape")
    dtype = _require(doc, "dtype", str, source, where)
    fingerprint = _require(doc, "fingerprint", str, source, where)
    if not _HEX16.fullmatch(fingerprint):
        raise _fail(source, f"{where}.fingerprint", f"expected 16 lowercase hex digits, got {fingerprint[:40]!r}")
    stats = None
    if doc.get("stats") is not None:
        stats = _parse_stats(doc["stats"], source, f"{where}.stats")
    return ManifestEntry(kind=KIND_TENSOR, shape=tuple(shape), dtype=dtype, fingerprint=fingerprint, stats=stats)


def _parse_stats(doc: Any, source: str, where: str) -> TensorStats:
    if not isinstance(doc, dict):
        raise _fail(source, where, f"expected an object, got {_type_name(doc)}")
    numel = _count(_require(doc, "numel", int, source, where), source, f"{where}.numel")
    values: dict[str, float | None] = {}
    for name in _STAT_FLOATS:
        value = doc.get(name)
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))):
            raise _fail(source, f"{where}.{name}", f"expected a number or null, got {_type_name(value)}")
        values[name] = None if value is None else float(value)
    nonfinite = doc.get("nonfinite")
    if nonfinite is not None:
        _count(nonfinite, source, f"{where}.nonfinite")
    return TensorStats(numel=numel, nonfinite=nonfinite, **values)
