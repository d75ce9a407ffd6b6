"""Opening names inside a local dir without ever following a symlink, on any path component.

Each component is opened relative to its parent's descriptor with ``O_NOFOLLOW``, starting
from the dir itself, so a link anywhere on the way (or one swapped in midway) fails with
ELOOP instead of leading out of the dir. Names are checked first (relative, no ``..``).
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
from pathlib import Path, PurePosixPath
from typing import BinaryIO, Iterator

from fsdpck.errors import CheckpointFormatError

NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
DIRECTORY = getattr(os, "O_DIRECTORY", 0)
NONBLOCK = getattr(os, "O_NONBLOCK", 0)


def check_name(name: str) -> str:
    """A name from a checkpoint as a safe relative path, or CheckpointFormatError."""
    if not isinstance(name, str) or not name or "\x00" in name or "\\" in name:
        raise CheckpointFormatError(f"{name!r} is not a file name inside the checkpoint")
    pure = PurePosixPath(name)
    if pure.is_absolute() or any(part in ("..", ".") for part in pure.parts) or name != pure.as_posix():
        raise CheckpointFormatError(f"{name!r} is not a file name inside the checkpoint (absolute, or with '..')")
    return name


@contextlib.contextmanager
def parent_fd(root: Path, name: str) -> Iterator[tuple[int, str]]:
    """An fd of the dir inside ``root`` that holds ``name`` (reached without following links), and its last component."""
    parts = PurePosixPath(check_name(name)).parts
    fd = os.open(root, os.O_RDONLY | DIRECTORY)
    try:
        for part in parts[:-1]:
            try:
                next_fd = os.open(part, os.O_RDONLY | DIRECTORY | NOFOLLOW, dir_fd=fd)
            except NotADirectoryError:
                # Linux says ENOTDIR for a symlink opened with O_DIRECTORY | O_NOFOLLOW: tell the two apart.
                if stat.S_ISLNK(os.stat(part, dir_fd=fd, follow_symlinks=False).st_mode):
                    raise OSError(errno.ELOOP, "a symlink on the way (not followed)", part) from None
                raise
            os.close(fd)
            fd = next_fd
        yield fd, parts[-1]
    finally:
        os.close(fd)


def open_file(root: Path, name: str, mode: str = "rb") -> BinaryIO:
    """``root/name`` opened for ``rb`` (a regular file only) or ``wb`` (created or truncated), never through a link."""
    if mode not in ("rb", "wb"):
        raise ValueError(f"mode {mode!r}")
    flags = (os.O_RDONLY | NONBLOCK) if mode == "rb" else (os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    with parent_fd(root, name) as (dir_fd, leaf):
        fd = os.open(leaf, flags | NOFOLLOW, 0o666, dir_fd=dir_fd)
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):  # a FIFO or a device would block or never end
            raise CheckpointFormatError(f"{root}/{name}: not a regular file")
        if mode == "rb":
            os.set_blocking(fd, True)
        return os.fdopen(fd, mode)
    except BaseException:
        os.close(fd)
        raise


def relative_to(root: Path, path: str | os.PathLike) -> str:
    """The name of ``path`` inside ``root`` (DCP hands its file system whole paths)."""
    try:
        return Path(path).relative_to(root).as_posix()
    except ValueError:
        raise CheckpointFormatError(f"{path} is outside the checkpoint dir {root}") from None
