"""Writing a local file so that a reader sees the old one, the new one or none, never half of one."""

from __future__ import annotations

import os
import stat
from pathlib import Path


def atomic_write(path: str | os.PathLike, data: bytes, *, fsync: bool = True) -> Path:
    """Write ``data`` to ``path``: a temporary file beside it, fsync, then ``os.replace``.

    The file gets the permissions the umask gives new files (not mkstemp's 0600): a report or a
    manifest in a shared dir must be readable by whoever reads the rest. The temporary file is
    removed on any failure; nothing else in the directory is touched.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{os.urandom(4).hex()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), 0o666)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            if fsync:
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    if fsync:
        _fsync_dir(path.parent)
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


def write_json_target(target: str, text: str) -> None:
    """A ``--json`` document: to stdout for ``-``; written through a device or a pipe that is there
    (``/dev/stdout``, ``>(jq .)``, a FIFO), as a shell redirection would, never replacing it; else
    atomically to the file (its dir created)."""
    import sys

    if target == "-":
        sys.stdout.write(text)
        sys.stdout.flush()
        return
    path = Path(target)
    try:
        mode = os.stat(path).st_mode  # through links: /dev/stdout and /dev/fd/N are links to what they name
    except (FileNotFoundError, NotADirectoryError):
        mode = None
    if mode is not None and not stat.S_ISREG(mode) and not stat.S_ISDIR(mode):
        with open(path, "w") as f:
            f.write(text)
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, text.encode(), fsync=False)
