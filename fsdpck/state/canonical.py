"""The canonical text of a non-tensor value, and its 64-bit digest: how objects are compared.

Optimizer param groups, a scheduler's state and a data position are not tensors; DCP stores
them as byte items. They are compared, recorded in the manifest and fingerprinted by one
text form: exact for floats (``float.hex``), independent of dict order, and the same for a
value in memory and for the same value read back with ``torch.load(weights_only=True)``. The
manifest stores this text, so its format is part of manifest version 1 and does not change.
"""

from __future__ import annotations

import hashlib
import sys
from typing import Any

MAX_DEPTH = 64


def is_tensor(value: Any) -> bool:
    """Whether ``value`` is a torch tensor, without importing torch (where it is not imported, none exists)."""
    torch = sys.modules.get("torch")
    return torch is not None and isinstance(value, torch.Tensor)


def canonical(value: Any, _depth: int = 0) -> str:
    """A stable text form of ``value`` (tensors by their values, for the small ones objects hold)."""
    if _depth > MAX_DEPTH:
        raise ValueError("a value nested more than 64 levels deep")
    if is_tensor(value):
        return f"tensor({value.tolist()!r}, dtype={value.dtype})"
    if isinstance(value, dict):
        items = sorted(value.items(), key=lambda kv: str(kv[0]))
        return "{" + ", ".join(f"{k!r}: {canonical(v, _depth + 1)}" for k, v in items) + "}"
    if isinstance(value, (list, tuple)):
        inner = ", ".join(canonical(v, _depth + 1) for v in value)
        return f"[{inner}]" if isinstance(value, list) else f"({inner})"
    if isinstance(value, float):
        return float.hex(value)
    return repr(value)


def digest(text: str) -> int:
    """A 64-bit digest of a canonical text: an object's "fingerprint", summed and compared like a tensor's."""
    return int.from_bytes(hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=8).digest(), "little")
