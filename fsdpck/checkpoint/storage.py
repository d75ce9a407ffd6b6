"""Where a checkpoint lives: one small interface for a local dir and for an fsspec URL.

Every command reaches its checkpoint location through a :class:`Storage`: listing, bounded
reads, atomic writes, removal of what fsdpck wrote, and DCP's own reader and writer for it.
The rules for a location fsdpck did not write (DESIGN.md, "Reading checkpoint dirs safely")
are kept here, once: names are relative paths inside the location, and nothing is opened,
listed or deleted through a symlink (locally: ``fsdpck.checkpoint.nofollow``; DCP's reader
and writer that fsdpck hands to DCP open their files the same way).

``open_storage(text)`` picks the kind: a plain path is local; ``scheme://...`` is fsspec
(``fsdpck.checkpoint.remote``, the optional extra ``fsdpck[s3]``).
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat as stat_mod
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Protocol

from fsdpck.checkpoint import nofollow
from fsdpck.checkpoint.nofollow import check_name
from fsdpck.errors import CheckpointFormatError, UsageError
from fsdpck.runtime.files import atomic_write

# Kinds of entry a listing reports; anything but FILE and DIR is a problem inside a checkpoint.
FILE, DIR, SYMLINK, OTHER = "file", "dir", "symlink", "other"


@dataclass(frozen=True, slots=True)
class Entry:
    """One name in a location: its kind and (for files) its size in bytes."""

    kind: str
    size: int = 0


class Storage(Protocol):
    """A checkpoint location. Names are ``/``-separated paths relative to it."""

    url: str  # what messages show: a path, or a URL without credentials

    def kind(self) -> str | None: ...  # of the location itself: FILE, DIR, SYMLINK, OTHER, or None (missing)
    def child(self, name: str) -> Storage: ...
    def entries(self) -> dict[str, Entry]: ...  # the names directly inside, never following a link
    def stat(self, name: str) -> Entry | None: ...
    def open_read(self, name: str) -> BinaryIO: ...  # a binary stream of a regular file
    def read_bytes(self, name: str, *, limit: int) -> bytes: ...
    def write_atomic(self, name: str, data: bytes) -> None: ...
    def create(self, name: str, data: bytes) -> None: ...  # a new small file (a marker, a token)
    def remove(self, name: str) -> None: ...
    def remove_tree(self, name: str) -> None: ...
    def make_dirs(self) -> None: ...
    def dcp_writer(self, *, format: str = "dcp", **options: Any) -> Any: ...
    def dcp_reader(self, *, format: str = "dcp") -> Any: ...


def open_storage(location: str, *, what: str = "DIR") -> Storage:
    """The storage a command-line location names: a plain path, or an fsspec URL."""
    if not isinstance(location, str) or not location.strip():
        raise UsageError(f"{what} is empty: give a checkpoint dir or URL")
    if "://" in location:
        from fsdpck.checkpoint import remote  # the optional extra: imported only for URLs

        return remote.open_url(location, what=what)
    return LocalStorage(Path(location).expanduser().absolute())


def _kind_of(mode: int) -> str:
    if stat_mod.S_ISREG(mode):
        return FILE
    if stat_mod.S_ISDIR(mode):
        return DIR
    if stat_mod.S_ISLNK(mode):
        return SYMLINK
    return OTHER


class LocalStorage:
    """A local directory. Its own path may go through symlinks (a user's choice); nothing inside does."""

    def __init__(self, root: Path):
        self.root = Path(root)
        self.url = str(self.root)

    def __repr__(self) -> str:
        return f"LocalStorage({self.url!r})"

    def kind(self) -> str | None:
        try:
            st = os.stat(self.root)  # the location itself, as the user named it
        except (FileNotFoundError, NotADirectoryError):
            return None
        except OSError as e:
            raise UsageError(f"{self.url}: {e.strerror}") from None
        except ValueError:  # a NUL byte in the path: no file system has such a name
            raise UsageError(f"{self.url!r}: a path cannot hold a NUL byte") from None
        return _kind_of(st.st_mode)

    def child(self, name: str) -> LocalStorage:
        return LocalStorage(self.root / check_name(name))

    def entries(self) -> dict[str, Entry]:
        out: dict[str, Entry] = {}
        with os.scandir(self.root) as it:
            for entry in it:
                try:
                    st = entry.stat(follow_symlinks=False)
                except OSError:
                    continue
                kind = _kind_of(st.st_mode)
                out[entry.name] = Entry(kind, st.st_size if kind == FILE else 0)
        return out

    def stat(self, name: str) -> Entry | None:
        try:
            with nofollow.parent_fd(self.root, name) as (fd, leaf):
                st = os.stat(leaf, dir_fd=fd, follow_symlinks=False)
        except (FileNotFoundError, NotADirectoryError):
            return None
        except OSError as e:
            if e.errno == errno.ELOOP:  # a component on the way is a symlink (nofollow.parent_fd says so)
                return Entry(SYMLINK)
            raise
        kind = _kind_of(st.st_mode)
        return Entry(kind, st.st_size if kind == FILE else 0)

    def open_read(self, name: str) -> BinaryIO:
        """A regular file inside the dir, opened without following any link (ELOOP otherwise)."""
        return nofollow.open_file(self.root, name, "rb")

    def read_bytes(self, name: str, *, limit: int) -> bytes:
        with self.open_read(name) as f:
            size = os.fstat(f.fileno()).st_size
            if size > limit:
                raise CheckpointFormatError(f"{self.url}/{name}: {size} bytes, more than the {limit} bytes such a "
                                            "file may have: not read")
            return f.read(size)

    def write_atomic(self, name: str, data: bytes) -> None:
        atomic_write(self.root / check_name(name), data)

    def create(self, name: str, data: bytes) -> None:
        with nofollow.parent_fd(self.root, name) as (dir_fd, leaf):
            fd = os.open(leaf, os.O_WRONLY | os.O_CREAT | os.O_EXCL | nofollow.NOFOLLOW, 0o666, dir_fd=dir_fd)
        with os.fdopen(fd, "wb") as f:
            f.write(data)

    def remove(self, name: str) -> None:
        with contextlib.suppress(FileNotFoundError), nofollow.parent_fd(self.root, name) as (dir_fd, leaf):
            os.unlink(leaf, dir_fd=dir_fd)  # a link is removed itself, never what it points at

    def remove_tree(self, name: str) -> None:
        """Remove the dir ``name`` and what is in it, never through a link (shutil's fd-based walk)."""
        target = self.root / check_name(name)
        if os.path.islink(target):
            raise UsageError(f"{target} is a symlink: fsdpck does not delete through links")
        import shutil  # only removals need it: an offline read does not load it

        shutil.rmtree(target)

    def make_dirs(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)

    def dcp_writer(self, *, format: str = "dcp", **options: Any) -> Any:
        from fsdpck.checkpoint import dcp_io  # torch: imported when DCP is, not when a location is opened

        if format == "safetensors":
            return dcp_io.LocalHFWriter(self.root, **options)
        return dcp_io.LocalWriter(self.root, **options)

    def dcp_reader(self, *, format: str = "dcp") -> Any:
        from fsdpck.checkpoint import dcp_io  # torch: imported when DCP is, not when a location is opened

        return dcp_io.LocalHFReader(self.root) if format == "safetensors" else dcp_io.LocalReader(self.root)
