"""Reading a checkpoint's byte items offline (one process, no process group), through DCP's own reader.

Byte items come back as their raw bytes: nothing here unpickles them (``decode`` does, with
``weights_only``). Tensors are read a stored piece at a time by ``fsdpck.checkpoint.stream``.
Only keys whose integrity checks passed are read, which bounds every allocation by bytes that
really are in the files.
"""

from __future__ import annotations

import hashlib
import io
import zipfile
from typing import Any, Iterator

from fsdpck.checkpoint.integrity import CheckpointDir
from fsdpck.checkpoint.metadata import KeyInfo
from fsdpck.errors import CheckpointFormatError

class ReadFailed(Exception):
    """An item that could not be read; the message says why in one line."""


def _describe_load_error(e: BaseException) -> str:
    """One line for a failed ``dcp.load``: the first rank's root cause, not DCP's traceback dump."""
    failures = getattr(e, "failures", None)
    if isinstance(failures, dict) and failures:
        first = next(iter(failures.values()))
        if isinstance(first, tuple) and first and isinstance(first[0], BaseException):
            e = first[0]
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0][:300] if text else ''}".rstrip(": ")


def _raw_bytes_planner() -> Any:
    from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner

    class RawBytesPlanner(DefaultLoadPlanner):
        """Keeps byte items as raw bytes: DefaultLoadPlanner.load_bytes would torch.load(weights_only=False) them."""

        keeps_raw_bytes = True

        def __init__(self) -> None:
            super().__init__()
            self.raw: dict[str, bytes] = {}

        def load_bytes(self, read_item: Any, value: io.BytesIO) -> None:
            self.raw[read_item.dest_index.fqn] = value.read()

    return RawBytesPlanner()


class CheckpointReader:
    """Reads the byte items of one opened checkpoint through DCP's reader, without a process group."""

    def __init__(self, ckpt: CheckpointDir):
        if ckpt.metadata is None or (ckpt.format == "dcp" and ckpt.raw_metadata is None):
            raise CheckpointFormatError(f"{ckpt.url}: its metadata is unreadable, so its data cannot be read")
        self.ckpt = ckpt

    def _load(self, state_dict: dict[str, Any]) -> Any:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.api import CheckpointException

        planner = _raw_bytes_planner()
        reader = self.ckpt.storage.dcp_reader()
        reader.preloaded = self.ckpt.raw_metadata
        try:
            dcp.load(state_dict, storage_reader=reader, planner=planner, no_dist=True)
        except (Exception, CheckpointException) as e:  # CheckpointException is a BaseException
            raise ReadFailed(_describe_load_error(e)) from None
        return planner

    def byte_items(self, infos: list[KeyInfo]) -> Iterator[tuple[KeyInfo, bytes | None, str | None]]:
        """(key info, raw bytes or None, error or None) per byte item, never unpickled here.

        Byte items are small values; one that claims more than BYTE_ITEM_MAX_BYTES is not read
        (a crafted or sparse file must not make fsdpck allocate what it claims).
        """
        from fsdpck.checkpoint.dcp_io import BYTE_ITEM_MAX_BYTES  # torch and DCP: only once data are read

        big = [i for i in infos if i.stored_bytes > BYTE_ITEM_MAX_BYTES]
        for info in big:
            yield info, None, (f"a byte item of {info.stored_bytes} bytes, more than the {BYTE_ITEM_MAX_BYTES} bytes "
                               "fsdpck reads: not read")
        infos = [i for i in infos if i.stored_bytes <= BYTE_ITEM_MAX_BYTES]
        if not infos:
            return
        try:
            planner = self._load({info.key: io.BytesIO() for info in infos})
        except ReadFailed as e:
            if len(infos) == 1:
                yield infos[0], None, str(e)
                return
            for info in infos:
                yield from self.byte_items([info])
            return
        for info in infos:
            raw = planner.raw.get(info.key)
            yield (info, raw, None) if raw is not None else (info, None, "DCP read nothing for it")


def decode(raw: bytes, *, key: str) -> Any:
    """A byte item's value with ``torch.load(weights_only=True)``; CheckpointFormatError when it needs code."""
    from fsdpck.checkpoint.dcp_io import decode_byte_item  # torch and DCP: only once data are read

    return decode_byte_item(raw, source=f"byte item {key!r}")


def stored_digest(raw: bytes) -> str:
    """16 hex digits of a byte item's stored records, ignoring the per-save ``serialization_id``.

    DCP stores a non-tensor value as a ``torch.save`` archive whose ``serialization_id`` record
    differs from save to save; equal values saved twice give equal digests. Used for items
    that cannot be decoded without running code.
    """
    h = hashlib.blake2b(digest_size=8)
    try:
        with zipfile.ZipFile(io.BytesIO(raw)) as z:
            members = sorted(z.infolist(), key=lambda m: m.filename)
            if any(m.compress_type != zipfile.ZIP_STORED for m in members):
                raise ValueError("compressed: not written by torch.save")  # and never inflated here
            for m in members:
                name = m.filename
                if name.endswith("serialization_id"):
                    continue
                with z.open(m) as member:
                    h.update(name.encode() + b"\0")
                    for block in iter(lambda: member.read(1 << 20), b""):
                        h.update(block)
                    h.update(b"\0")
    except (zipfile.BadZipFile, OSError, ValueError, EOFError, RuntimeError, NotImplementedError):
        h = hashlib.blake2b(raw, digest_size=8)
    return h.hexdigest()
