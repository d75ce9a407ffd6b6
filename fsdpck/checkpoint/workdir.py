"""The location a run writes into: chosen on rank 0, refused when it is not fsdpck's to write,
checked to be shared by every rank, and cleaned of what the run wrote.

fsdpck never deletes or overwrites what it did not create. ``verify`` writes each flow into
a subdirectory that it marks as its own (:data:`MARKER`); ``save`` writes a checkpoint whose
manifest marks it. ``--overwrite`` replaces only those, their old ``.metadata`` first (so a
crash midway cannot leave valid-looking metadata over a mix of old and new shards), and never
goes through a symlink: a link where fsdpck would write or delete is a usage error.
"""

from __future__ import annotations

import secrets
import shutil
import tempfile
from dataclasses import dataclass, field
from typing import Any

from fsdpck.checkpoint.manifest import MANIFEST_NAME
from fsdpck.checkpoint.metadata import METADATA_NAME
from fsdpck.checkpoint.storage import DIR, FILE, SYMLINK, Storage, open_storage
from fsdpck.errors import SetupError, UsageError
from fsdpck.runtime import collectives

MARKER = ".fsdpck-run"  # left in each subdirectory verify writes, so --overwrite knows what is its own
SHARD_SUFFIX = ".distcp"


@dataclass(slots=True)
class WorkDir:
    storage: Storage
    temporary: bool  # fsdpck made it (the default temp dir): removed whole afterwards
    created_root: bool  # fsdpck created the dir the user named
    created: list[str] = field(default_factory=list)  # subdirectories this run wrote


def _describe_entries(storage: Storage, entries: dict[str, Any]) -> str:
    """What a non-empty dir holds, in words a user can act on."""
    ours = [n for n, e in entries.items() if e.kind == DIR and (s := storage.stat(f"{n}/{MARKER}")) and s.kind == FILE]
    if ours and len(ours) == len(entries):
        shown = ", ".join(sorted(ours)[:3]) + (", ..." if len(ours) > 3 else "")
        return f"it holds the checkpoints of an earlier fsdpck run ({len(ours)} flow dir(s): {shown})"
    if MANIFEST_NAME in entries:
        return f"it holds an earlier `fsdpck save` ({MANIFEST_NAME} is there)"
    return f"it holds {len(entries)} entries fsdpck did not write"


def _decide_root(location: str | None, overwrite: bool) -> dict[str, Any]:
    """Rank 0's decision on verify's checkpoint location, as plain data for every rank."""
    if location is None:
        return {"root": tempfile.mkdtemp(prefix="fsdpck-"), "temporary": True, "created_root": True}
    storage = open_storage(location, what="--checkpoint-dir")
    kind = storage.kind()
    if kind is None:
        try:
            storage.make_dirs()
        except OSError as e:
            raise UsageError(f"--checkpoint-dir {storage.url} cannot be created: {e.strerror or e}") from None
        return {"root": storage.url, "temporary": False, "created_root": True}
    if kind != DIR:
        raise UsageError(f"--checkpoint-dir {storage.url} exists and is not a directory")
    try:
        entries = storage.entries()
    except OSError as e:
        raise UsageError(f"--checkpoint-dir {storage.url} cannot be listed: {e.strerror or e}") from None
    if entries and not overwrite:
        raise UsageError(
            f"--checkpoint-dir {storage.url} is not empty: {_describe_entries(storage, entries)}. Pass --overwrite "
            "to replace fsdpck's own flow dirs in it (nothing else is touched), or choose an empty or new dir")
    _check_writable(storage, "--checkpoint-dir")
    return {"root": storage.url, "temporary": False, "created_root": False}


def _check_writable(storage: Storage, what: str) -> None:
    import os

    root = getattr(storage, "root", None)
    if root is not None and not os.access(root, os.W_OK | os.X_OK):
        raise UsageError(f"{what} {storage.url} is not writable by this user")


def prepare(location: str | None, *, overwrite: bool, ctx) -> WorkDir:
    """verify's checkpoint location: decided on rank 0, the same on every rank, seen by every rank."""
    decision = collectives.decide(ctx, lambda: _decide_root(location, overwrite))
    wd = WorkDir(open_storage(decision["root"]), decision["temporary"], decision["created_root"])
    check_shared(wd.storage, ctx, what="--checkpoint-dir")
    return wd


def _replace_subdir(storage: Storage, name: str) -> None:
    """Rank 0: make ``name`` a fresh, marked subdirectory; an old one only if fsdpck wrote it."""
    where = f"{storage.url}/{name}"
    entry = storage.stat(name)
    if entry is not None:
        if entry.kind == SYMLINK:
            raise UsageError(f"{where} is a symlink: fsdpck neither writes nor deletes through links. Remove it, "
                             "or choose another --checkpoint-dir")
        if entry.kind != DIR:
            raise UsageError(f"{where} exists and is not a directory; it is left alone. Choose another --checkpoint-dir")
        sub = storage.child(name)
        marker = sub.stat(MARKER)
        if sub.entries() and (marker is None or marker.kind != FILE):
            raise UsageError(f"{where} exists and was not written by fsdpck; it is left alone. Choose another "
                             "--checkpoint-dir")
        # The old .metadata goes first: without it the dir is no loadable checkpoint.
        sub.remove(METADATA_NAME)
        storage.remove_tree(name)
    sub = storage.child(name)
    sub.make_dirs()
    sub.create(MARKER, b"written by fsdpck; safe to delete\n")


def prepare_subdir(wd: WorkDir, name: str, *, ctx) -> Storage:
    """A fresh subdirectory for one flow (rank 0 makes it); with --overwrite, replaces only an fsdpck one."""
    collectives.decide(ctx, lambda: _replace_subdir(wd.storage, name))
    wd.created.append(name)
    return wd.storage.child(name)


def _prepare_save(location: str, overwrite: bool) -> str:
    """Rank 0: the save location, empty, new, or (with --overwrite) an earlier fsdpck save emptied of it."""
    storage = open_storage(location)
    kind = storage.kind()
    if kind is None:
        try:
            storage.make_dirs()
        except OSError as e:
            raise UsageError(f"{storage.url} cannot be created: {e.strerror or e}") from None
        return storage.url
    if kind != DIR:
        raise UsageError(f"{storage.url} exists and is not a directory")
    entries = storage.entries()
    if not entries:
        _check_writable(storage, "DIRECTORY")
        return storage.url
    if not overwrite:
        raise UsageError(f"{storage.url} is not empty: {_describe_entries(storage, entries)}. Pass --overwrite to "
                         "replace an earlier fsdpck save there, or choose an empty or new dir")
    manifest = entries.get(MANIFEST_NAME)
    if manifest is None or manifest.kind != FILE:
        raise UsageError(f"{storage.url} has no {MANIFEST_NAME}: it was not written by fsdpck save, so --overwrite "
                         "leaves it alone. Choose another dir")
    links = sorted(n for n, e in entries.items() if e.kind == SYMLINK)
    if links:
        raise UsageError(f"{storage.url} holds symlinks ({', '.join(links[:3])}): fsdpck neither writes nor deletes "
                         "through links, so --overwrite leaves it alone")
    _check_writable(storage, "DIRECTORY")
    # The old .metadata goes first: a crash midway then leaves no loadable checkpoint over a mix
    # of old and new shards. Then the old manifest and shard files; nothing else.
    storage.remove(METADATA_NAME)
    storage.remove(MANIFEST_NAME)
    for name, entry in entries.items():
        if entry.kind == FILE and name.endswith(SHARD_SUFFIX):
            storage.remove(name)
    return storage.url


def prepare_save(location: str, *, overwrite: bool, ctx) -> Storage:
    """``fsdpck save``'s location, decided on rank 0 and checked to be seen by every rank."""
    storage = open_storage(collectives.decide(ctx, lambda: _prepare_save(location, overwrite)))
    check_shared(storage, ctx, what="DIRECTORY")
    return storage


def check_shared(storage: Storage, ctx, *, what: str) -> None:
    """Rank 0 writes a token, every rank reads it back: a location not shared by all ranks is a set-up error."""
    if ctx.world_size == 1:
        return
    name = f".fsdpck-shared-{secrets.token_hex(6)}"
    token = secrets.token_hex(16)

    def write() -> dict[str, str]:
        storage.create(name, token.encode())
        return {"name": name, "token": token}

    shared = collectives.decide(ctx, write)
    try:
        seen = storage.read_bytes(shared["name"], limit=1024).decode() == shared["token"]
    except Exception:  # missing, unreadable, another file: this rank does not see rank 0's dir
        seen = False
    flags = collectives.gather_ints(ctx, [0 if seen else 1])
    if ctx.is_rank0:
        storage.remove(shared["name"])
    blind = [r for r, (f,) in enumerate(flags) if f]
    if blind:
        raise SetupError(
            f"{what} {storage.url} is not shared by all ranks: rank(s) {', '.join(map(str, blind))} cannot see the "
            "file rank 0 wrote there. Put the checkpoint on storage every node mounts at the same path")


def stored_bytes(storage: Storage) -> int:
    """Bytes of the files directly in a location (a checkpoint is flat)."""
    return sum(e.size for e in storage.entries().values() if e.kind == FILE)


def cleanup(wd: WorkDir, *, keep: bool) -> None:
    """Remove what this run created (never anything else), unless asked to keep it."""
    if keep:
        return
    root = getattr(wd.storage, "root", None)
    if wd.temporary and root is not None:
        shutil.rmtree(root, ignore_errors=True)
        return
    for name in wd.created:
        try:
            wd.storage.child(name).remove(METADATA_NAME)
            wd.storage.remove_tree(name)
        except (OSError, UsageError):
            pass  # already gone, or no longer ours to delete
    if wd.created_root and root is not None:
        try:
            root.rmdir()  # only if empty: anything else in it is not ours
        except OSError:
            pass
