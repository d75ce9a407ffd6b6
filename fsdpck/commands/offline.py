"""What ``inspect``, ``diff`` and ``show`` share: choosing keys, identifying an item's data, reading them all.

A tensor is identified by its fingerprint (the same whatever its chunking, so checkpoints
saved at different world sizes compare): the sum of its stored pieces' partial fingerprints,
each taken at its global offsets as it is read (:func:`read_items`, through
``fsdpck.checkpoint.stream``). A byte item is identified by the digest of its canonical text
when it decodes with ``weights_only`` (equal values saved twice then compare equal), else by
the digest of its stored records.
"""

from __future__ import annotations

import fnmatch
import threading
from dataclasses import dataclass
from typing import Any, Iterable

from fsdpck.checkpoint.integrity import CheckpointDir
from fsdpck.checkpoint.metadata import KIND_BYTES, KIND_TENSOR, KeyInfo
from fsdpck.checkpoint.piece import Piece
from fsdpck.checkpoint.reader import CheckpointReader, decode, stored_digest
from fsdpck.checkpoint.stream import Box, Request, read_pieces
from fsdpck.commands.stats import ValueStats, piece_stats
from fsdpck.errors import CheckpointFormatError, UsageError
from fsdpck.fingerprint import MASK64, fp_piece, fp_tensor, to_hex
from fsdpck.runtime.progress import NO_PROGRESS, Progress
from fsdpck.state.canonical import canonical, digest, is_tensor


def select_keys(keys: Iterable[str], glob: str | None, *, option: str = "--key", where: str = "") -> list[str]:
    keys = list(keys)
    if glob is None:
        return keys
    chosen = [k for k in keys if fnmatch.fnmatchcase(k, glob)]
    if not chosen and keys:
        raise UsageError(f"{option} {glob!r} matches none of the {len(keys)} keys{where}")
    return chosen


def tensor_fingerprint(t: Any) -> str:
    """The fingerprint of a whole tensor as 16 hex digits (complex128 through its float64 view)."""
    import torch

    if t.element_size() > 8 and t.is_complex():
        t = torch.view_as_real(t)  # the fingerprint is defined for itemsizes up to 8
    return to_hex(fp_tensor(t))


def short_repr(obj: Any, limit: int = 48) -> str:
    if is_tensor(obj):
        text = f"tensor({list(obj.shape)}, {str(obj.dtype).removeprefix('torch.')})"
    else:
        try:
            text = repr(obj)
        except Exception:  # a value whose repr fails is shown by its type
            text = f"<{type(obj).__name__}>"
    return text if len(text) <= limit else text[: limit - 3] + "..."


@dataclass(frozen=True, slots=True)
class ByteItem:
    """A byte item as far as it can be told without running code."""

    digest: str  # 16 hex digits: equal for equal values
    canonical: str | None  # the canonical text, when it decoded with weights_only
    value: str | None  # a short repr for reports
    error: str | None  # why it did not decode
    plain: Any = None  # the value itself when it is a plain scalar or string, or a list or tuple of them


def byte_item(raw: bytes, *, key: str) -> ByteItem:
    try:
        obj = decode(raw, key=key)
        text = canonical(obj)
    except (CheckpointFormatError, ValueError, RecursionError) as e:
        message = e.message if isinstance(e, CheckpointFormatError) else str(e)
        return ByteItem(stored_digest(raw), None, None, message)
    return ByteItem(f"{digest(text):016x}", text, short_repr(obj), None, obj if _plain(obj) else None)


def _plain(obj: Any, depth: int = 0) -> bool:
    """None, a bool, number or short string; or a list or tuple of them (a param group's betas, its params)."""
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return not isinstance(obj, str) or len(obj) <= 1000
    if isinstance(obj, (list, tuple)) and depth == 0 and len(obj) <= 1_000_000:
        return all(_plain(v, 1) for v in obj)
    return False


@dataclass(slots=True)
class ItemRead:
    """What reading one key gave: a tensor's fingerprint and/or statistics, or a byte item; or an error."""

    fingerprint: str | None = None
    stats: ValueStats | None = None
    item: ByteItem | None = None
    error: str | None = None


def read_items(ckpt: CheckpointDir, infos: list[KeyInfo], *, fingerprints: bool = True, stats: bool = False,
               progress: Progress = NO_PROGRESS, label: str = "reading", threads: int | None = None
               ) -> dict[str, ItemRead]:
    """Read every key of ``infos`` (integrity-checked ones only) a stored piece at a time, in parallel.

    Tensors: the fingerprint (a sum of the pieces' partial fingerprints) and/or the statistics
    (merged over the pieces), never the whole tensor in memory. Byte items: decoded with
    ``weights_only`` (:func:`byte_item`).
    """
    tensors = [i for i in infos if i.kind == KIND_TENSOR]
    sums: dict[str, int] = {i.key: 0 for i in tensors}
    merged: dict[str, ValueStats] = {i.key: ValueStats() for i in tensors}
    lock = threading.Lock()

    def on_piece(req: Request, offsets: tuple[int, ...], piece: Piece) -> None:
        fp = fp_piece(piece, global_shape=req.info.shape or (), offsets=offsets) if fingerprints else 0
        st = piece_stats(piece) if stats else None
        with lock:
            sums[req.info.key] = (sums[req.info.key] + fp) & MASK64
            if st is not None:
                merged[req.info.key].merge(st)

    errors = read_pieces(ckpt, [Request(i, Box.whole(i.shape or ())) for i in tensors], on_piece, progress=progress,
                         label=label, threads=threads) if tensors else {}
    out: dict[str, ItemRead] = {}
    for info in tensors:
        if info.key in errors:
            out[info.key] = ItemRead(error=errors[info.key])
        else:
            out[info.key] = ItemRead(fingerprint=to_hex(sums[info.key]) if fingerprints else None,
                                     stats=merged[info.key] if stats else None)
    byte_keys = [i for i in infos if i.kind == KIND_BYTES]
    if byte_keys:
        for info, raw, error in CheckpointReader(ckpt).byte_items(byte_keys):
            out[info.key] = ItemRead(error=error) if error is not None else ItemRead(item=byte_item(raw, key=info.key))
    return out
