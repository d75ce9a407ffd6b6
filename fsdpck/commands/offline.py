"""What ``inspect``, ``diff`` and ``show`` share: choosing keys, and identifying an item's data.

A tensor is identified by its fingerprint (the same whatever its chunking, so checkpoints
saved at different world sizes compare); a byte item by the digest of its canonical text
when it decodes with ``weights_only`` (equal values saved twice then compare equal), else by
the digest of its stored records.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass
from typing import Any, Iterable

from fsdpck.checkpoint.reader import decode, stored_digest
from fsdpck.errors import CheckpointFormatError, UsageError
from fsdpck.fingerprint import fp_tensor, to_hex
from fsdpck.state.canonical import canonical, digest


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
    import torch

    if isinstance(obj, torch.Tensor):
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


def byte_item(raw: bytes, *, key: str) -> ByteItem:
    try:
        obj = decode(raw, key=key)
        text = canonical(obj)
    except (CheckpointFormatError, ValueError, RecursionError) as e:
        message = e.message if isinstance(e, CheckpointFormatError) else str(e)
        return ByteItem(stored_digest(raw), None, None, message)
    return ByteItem(f"{digest(text):016x}", text, short_repr(obj), None)
