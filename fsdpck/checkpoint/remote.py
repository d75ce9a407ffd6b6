"""Checkpoints behind an fsspec URL (``s3://bucket/prefix``, ``gs://...``, ``memory://...``).

The optional extra ``fsdpck[s3]`` brings fsspec and s3fs; without it a URL is a usage error
that says which extra to install. Credentials and the endpoint come from the standard
environment (``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``, ``AWS_ENDPOINT_URL``, ...) or
fsspec's configuration; a URL's own user and password are never printed (:attr:`FsspecStorage.url`).

What an object store cannot give, and what fsdpck does instead:
- there are no symlinks, and no directories but key prefixes: a prefix with no objects does
  not exist until something is written under it;
- a single PUT replaces an object whole (a reader sees the old or the new), so the manifest is
  written with one PUT; DCP's own ``.metadata.tmp`` -> ``.metadata`` rename is a copy and a
  delete there, not atomic;
- "create only if absent" is a check, then a PUT: two writers racing are not detected.

``file://`` URLs are local dirs (``fsdpck.checkpoint.storage.LocalStorage``), with the local
rules about symlinks.
"""

from __future__ import annotations

import contextlib
import logging
import os
import posixpath
import re
from pathlib import Path
from typing import Any, BinaryIO

from fsdpck.checkpoint.dcp_io import InstrumentedWriter, SafeReaderMixin
from fsdpck.checkpoint.nofollow import check_name
from fsdpck.checkpoint.storage import DIR, FILE, Entry, LocalStorage
from fsdpck.errors import CheckpointFormatError, UsageError

try:
    from fsspec.core import url_to_fs
    from torch.distributed.checkpoint._fsspec_filesystem import FsspecReader, FsspecWriter
except ImportError as e:  # the extra is not installed: only this module needs it
    _MISSING: str | None = f"{type(e).__name__}: {e}"
    FsspecReader = FsspecWriter = object  # type: ignore[assignment,misc]
else:
    _MISSING = None


def redact(url: str) -> str:
    """A URL as messages may show it: any ``user:password@`` removed."""
    return re.sub(r"^([a-zA-Z][a-zA-Z0-9+.-]*://)[^/@]*@", r"\1", url)


class OneLineAsyncio(logging.Filter):
    """fsspec runs its requests on an asyncio loop; when the store goes away mid-write, requests
    nobody awaits any more fail there, and asyncio logs each ("Task exception was never retrieved")
    with its traceback, into the middle of a cluster log. fsdpck reports the failure itself (the
    rank, the phase, exit 3); these become one line each (``FSDPCK_DEBUG=1`` keeps the tracebacks)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and os.environ.get("FSDPCK_DEBUG") != "1":
            error = record.exc_info[1]
            text = str(error).strip().splitlines()
            record.msg = (f"fsdpck: a background storage request failed as well: {type(error).__name__}: "
                          f"{text[0][:300] if text else ''}").rstrip(": ")
            record.args = ()
            record.exc_info = record.exc_text = None
        return True


def open_url(url: str, *, what: str = "DIR") -> Any:
    """The storage a URL names: ``file://`` is a local dir; anything else goes through fsspec."""
    if url.startswith("file://"):
        return LocalStorage(Path(url[len("file://"):]).expanduser().absolute())
    asyncio_log = logging.getLogger("asyncio")
    if not any(isinstance(f, OneLineAsyncio) for f in asyncio_log.filters):
        asyncio_log.addFilter(OneLineAsyncio())
    if _MISSING is not None:
        raise UsageError(f"{what} {redact(url)}: URLs need fsspec and its file system for the scheme; install the "
                         f"extra: pip install 'fsdpck[s3]' ({_MISSING})")
    try:
        fs, path = url_to_fs(url)
    except (ImportError, ValueError) as e:
        raise UsageError(f"{what} {redact(url)}: fsspec cannot open this URL ({type(e).__name__}: {e}); for s3:// "
                         "install the extra: pip install 'fsdpck[s3]'") from None
    return FsspecStorage(fs, path.rstrip("/"), url.rstrip("/"))


def _problem(e: BaseException, url: str) -> UsageError:
    """A store's refusal (no bucket, bad credentials, no endpoint) as a usage error in one line."""
    text = str(e).strip().splitlines()[0][:300] if str(e).strip() else type(e).__name__
    lowered = text.lower()
    if isinstance(e, PermissionError) or "access denied" in lowered or "forbidden" in lowered or "credentials" in lowered \
            or "signature" in lowered or "invalidaccesskeyid" in lowered:
        return UsageError(f"{url}: the store refused access ({text}): check the credentials "
                          "(AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_ENDPOINT_URL)")
    if "nosuchbucket" in lowered or ("bucket" in lowered and "not exist" in lowered):
        return UsageError(f"{url}: the bucket does not exist ({text}); create it first, fsdpck does not")
    return UsageError(f"{url}: the store cannot be reached or refused the request ({type(e).__name__}: {text})")


class FsspecStorage:
    """A checkpoint location in an fsspec file system (an object store, usually)."""

    def __init__(self, fs: Any, path: str, url: str):
        self.fs = fs
        self.path = path
        self.raw_url = url
        self.url = redact(url)

    def __repr__(self) -> str:
        return f"FsspecStorage({self.url!r})"

    def _join(self, name: str) -> str:
        return posixpath.join(self.path, check_name(name))

    def _call(self, fn: Any, *args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except FileNotFoundError:
            raise
        except (OSError, ValueError, RuntimeError) as e:
            raise _problem(e, self.url) from None

    def kind(self) -> str | None:
        bucket = self.path.split("/", 1)[0]
        if not self._call(self.fs.exists, bucket):
            raise UsageError(f"{self.url}: the bucket (or root) {bucket!r} does not exist; create it first, fsdpck "
                             "does not")
        try:
            info = self._call(self.fs.info, self.path)
        except FileNotFoundError:
            return None
        return DIR if info.get("type") == "directory" else FILE

    def child(self, name: str) -> FsspecStorage:
        return FsspecStorage(self.fs, self._join(name), f"{self.raw_url}/{check_name(name)}")

    def entries(self) -> dict[str, Any]:
        self.fs.invalidate_cache(self.path)
        try:
            listing = self._call(self.fs.ls, self.path, detail=True)
        except FileNotFoundError:
            return {}
        out = {}
        for item in listing:
            name = posixpath.basename(item["name"].rstrip("/"))
            if name and item["name"].rstrip("/") != self.path:
                kind = DIR if item.get("type") == "directory" else FILE
                out[name] = Entry(kind, int(item.get("size") or 0) if kind == FILE else 0)
        return out

    def stat(self, name: str) -> Any:
        try:
            info = self._call(self.fs.info, self._join(name))
        except FileNotFoundError:
            return None
        kind = DIR if info.get("type") == "directory" else FILE
        return Entry(kind, int(info.get("size") or 0) if kind == FILE else 0)

    def open_read(self, name: str) -> BinaryIO:
        return self._call(self.fs.open, self._join(name), "rb")

    def read_bytes(self, name: str, *, limit: int) -> bytes:
        entry = self.stat(name)
        if entry is None:
            raise FileNotFoundError(f"{self.url}/{name}")
        if entry.size > limit:
            raise CheckpointFormatError(f"{self.url}/{name}: {entry.size} bytes, more than the {limit} bytes such a "
                                        "file may have: not read")
        return self._call(self.fs.cat_file, self._join(name))

    def write_atomic(self, name: str, data: bytes) -> None:
        self._call(self.fs.pipe_file, self._join(name), data)  # one PUT: readers see the old object or the new

    def create(self, name: str, data: bytes) -> None:
        if self._call(self.fs.exists, self._join(name)):
            raise FileExistsError(f"{self.url}/{name}")
        self._call(self.fs.pipe_file, self._join(name), data)

    def remove(self, name: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            self._call(self.fs.rm_file, self._join(name))

    def remove_tree(self, name: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            self._call(self.fs.rm, self._join(name), recursive=True)

    def make_dirs(self) -> None:
        self.kind()  # a missing bucket is a usage error: fsdpck never creates buckets
        self._call(self.fs.makedirs, self.path, exist_ok=True)

    def dcp_writer(self, *, format: str = "dcp", **options: Any) -> RemoteWriter:
        _dcp_only(format, self.url)
        return RemoteWriter(self.raw_url, **options)

    def dcp_reader(self, *, format: str = "dcp") -> RemoteReader:
        _dcp_only(format, self.url)
        return RemoteReader(self.raw_url)


def _dcp_only(format: str, url: str) -> None:
    if format != "dcp":
        raise UsageError(f"{url}: DCP's Hugging Face (safetensors) storage writes local dirs only; use a local path "
                         "with --format safetensors")


class RemoteWriter(InstrumentedWriter, FsspecWriter):
    """DCP's FsspecWriter, with phase markers and the save drill."""


class RemoteReader(SafeReaderMixin, FsspecReader):
    """DCP's FsspecReader: restricted metadata, safe byte items, phase markers and the load drill."""

    def _open_metadata(self) -> tuple[Any, int, str]:
        path = os.path.join(self.path, ".metadata")
        try:
            size = int(self.fs.fs.info(path).get("size") or 0)
            stream = self.fs.fs.open(path, "rb")
        except FileNotFoundError:
            raise CheckpointFormatError(f"{redact(str(self.path))}: no .metadata: not a DCP checkpoint (or a save "
                                        "that did not finish)") from None
        return stream, size, f"{redact(str(self.path))}/.metadata"


__all__ = ["FsspecStorage", "open_url", "redact"]
