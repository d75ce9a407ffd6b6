"""The checkpoint dir a run writes into: choose it, refuse what is not ours, check it is shared, clean up.

Rank 0 decides and every rank uses the same path. fsdpck never deletes or overwrites
what it did not create: a non-empty dir is refused unless ``--overwrite``, and even then
only the subdirectories fsdpck writes are touched, their old ``.metadata`` first so that
a crash midway cannot leave valid-looking metadata over a mix of old and new shards.
"""

from __future__ import annotations

import os
import secrets
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fsdpck.errors import SetupError, UsageError

MARKER = ".fsdpck-run"  # left in each subdirectory fsdpck writes, so --overwrite knows what is its own


@dataclass(slots=True)
class WorkDir:
    root: Path
    temporary: bool  # fsdpck made it (default temp dir): removed whole afterwards
    created_root: bool  # fsdpck created the user-given dir
    created: list[Path]

    def subdir(self, name: str) -> Path:
        return self.root / name


def _decide(path: str | None, overwrite: bool) -> dict[str, Any]:
    """Rank 0's decision, as plain data to broadcast (or an error message)."""
    if path is None:
        root = tempfile.mkdtemp(prefix="fsdpck-")
        return {"root": root, "temporary": True, "created_root": True}
    p = Path(path).expanduser()
    if not p.is_absolute():
        p = Path.cwd() / p
    if p.exists() and not p.is_dir():
        return {"error": f"--checkpoint-dir {p} exists and is not a directory", "kind": "usage"}
    if p.is_dir():
        try:
            entries = [e for e in os.listdir(p)]
        except OSError as e:
            return {"error": f"--checkpoint-dir {p} cannot be listed: {e.strerror}", "kind": "usage"}
        if entries and not overwrite:
            return {
                "error": f"--checkpoint-dir {p} is not empty ({len(entries)} entries); fsdpck will not write over "
                "files it did not create. Choose an empty or new dir, or pass --overwrite to replace fsdpck's own "
                "subdirectories in it",
                "kind": "usage",
            }
        if not os.access(p, os.W_OK | os.X_OK):
            return {"error": f"--checkpoint-dir {p} is not writable by this user", "kind": "usage"}
        return {"root": str(p), "temporary": False, "created_root": False}
    try:
        p.mkdir(parents=True)
    except OSError as e:
        return {"error": f"--checkpoint-dir {p} cannot be created: {e.strerror}", "kind": "usage"}
    return {"root": str(p), "temporary": False, "created_root": True}


def prepare(path: str | None, *, overwrite: bool, ctx) -> WorkDir:
    """Decide the dir on rank 0, share the decision, and check every rank sees the same dir."""
    import torch.distributed as dist

    box: list[Any] = [_decide(path, overwrite) if ctx.is_rank0 else None]
    if ctx.world_size > 1:
        dist.broadcast_object_list(box, src=0)
    decision = box[0]
    if "error" in decision:
        raise UsageError(decision["error"])
    wd = WorkDir(Path(decision["root"]), decision["temporary"], decision["created_root"], [])
    check_shared(wd.root, ctx)
    return wd


def check_shared(root: Path, ctx) -> None:
    """Rank 0 writes a token, every rank reads it back: a dir not shared by all ranks is a set-up error."""
    import torch
    import torch.distributed as dist

    if ctx.world_size == 1:
        return
    token_box: list[Any] = [secrets.token_hex(16) if ctx.is_rank0 else None]
    token_path = root / f".fsdpck-shared-{os.getpid()}" if ctx.is_rank0 else None
    if ctx.is_rank0:
        token_path.write_text(token_box[0])
    path_box: list[Any] = [str(token_path) if ctx.is_rank0 else None]
    dist.broadcast_object_list(token_box, src=0)
    dist.broadcast_object_list(path_box, src=0)
    try:
        seen = Path(path_box[0]).read_text() == token_box[0]
    except OSError:
        seen = False
    flags = torch.zeros(ctx.world_size, dtype=torch.int64, device=ctx.collective_device)
    flags[ctx.rank] = 0 if seen else 1
    dist.all_reduce(flags)
    if ctx.is_rank0:
        token_path.unlink(missing_ok=True)
    blind = [r for r, f in enumerate(flags.tolist()) if f]
    if blind:
        raise SetupError(
            f"--checkpoint-dir {root} is not shared by all ranks: rank(s) {', '.join(map(str, blind))} cannot see "
            "the file rank 0 wrote there. Put the checkpoint dir on storage every node mounts at the same path"
        )


def prepare_subdir(wd: WorkDir, name: str, *, ctx) -> Path:
    """Create (rank 0) a fresh subdirectory for one flow; with --overwrite, replace only an fsdpck one."""
    import torch.distributed as dist

    sub = wd.subdir(name)
    error: list[Any] = [None]
    if ctx.is_rank0:
        if sub.exists():
            if not (sub / MARKER).exists() and any(sub.iterdir()):
                error[0] = f"{sub} exists and was not written by fsdpck; it is left alone. Choose another --checkpoint-dir"
            else:
                # The old .metadata goes first: without it the dir is no loadable checkpoint.
                (sub / ".metadata").unlink(missing_ok=True)
                shutil.rmtree(sub)
        if error[0] is None:
            sub.mkdir(parents=True)
            (sub / MARKER).write_text("written by fsdpck; safe to delete\n")
            wd.created.append(sub)
    if ctx.world_size > 1:
        dist.broadcast_object_list(error, src=0)
    if error[0]:
        raise UsageError(error[0])
    return sub


def dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def cleanup(wd: WorkDir, *, keep: bool) -> None:
    """Remove what this run created (never anything else), unless asked to keep it."""
    if keep:
        return
    if wd.temporary:
        shutil.rmtree(wd.root, ignore_errors=True)
        return
    for sub in wd.created:
        (sub / ".metadata").unlink(missing_ok=True)
        shutil.rmtree(sub, ignore_errors=True)
    if wd.created_root:
        try:
            wd.root.rmdir()  # only if empty: anything else in it is not ours
        except OSError:
            pass
