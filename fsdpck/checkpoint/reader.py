"""Reading a checkpoint's byte items offline (one process, no process group): a local item's stored
bytes straight from its file, anything else through DCP's own reader.

Byte items come back as their raw bytes: nothing here unpickles them (``decode`` does, with
``weights_only``). Tensors are read a stored piece at a time by ``fsdpck.checkpoint.stream``.
Only keys whose integrity checks passed are read, which bounds every allocation by bytes that
really are in the files.
"""

from __future__ import annotations

import hashlib
import io
from typing import Any, Iterator

from fsdpck.checkpoint import torchsave, unpickler
from fsdpck.checkpoint.integrity import CheckpointDir
from fsdpck.checkpoint.metadata import METADATA_NAME, KeyInfo, parse_metadata
from fsdpck.checkpoint.storage import LocalStorage
from fsdpck.checkpoint.torchsave import BYTE_ITEM_MAX_BYTES
from fsdpck.errors import CheckpointFormatError

def dcp_metadata(ckpt: CheckpointDir) -> Any:
    """DCP's own ``Metadata`` of a checkpoint opened light, for a read through DCP's reader: parsed
    on first need (importing DCP only then) and kept. It must describe what the light open checked:
    a ``.metadata`` changed since is an error, not a new set of bounds. None where unreadable."""
    if ckpt.raw_metadata is not None or ckpt.metadata is None or ckpt.format != "dcp":
        return ckpt.raw_metadata
    source = f"{ckpt.url}/{METADATA_NAME}"
    with ckpt.storage.open_read(METADATA_NAME) as stream:
        raw = unpickler.load_metadata(stream, size=ckpt.metadata_bytes or 0, source=source)
    if parse_metadata(raw, source=source) != ckpt.metadata:
        raise CheckpointFormatError(f"{source}: changed while fsdpck was reading the checkpoint")
    ckpt.raw_metadata = raw
    return raw


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
    """Reads the byte items of one opened checkpoint, without a process group."""

    def __init__(self, ckpt: CheckpointDir):
        if ckpt.metadata is None:
            raise CheckpointFormatError(f"{ckpt.url}: its metadata is unreadable, so its data cannot be read")
        self.ckpt = ckpt

    def _load(self, state_dict: dict[str, Any]) -> Any:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.api import CheckpointException

        planner = _raw_bytes_planner()
        reader = self.ckpt.storage.dcp_reader()
        try:
            reader.preloaded = dcp_metadata(self.ckpt)
            dcp.load(state_dict, storage_reader=reader, planner=planner, no_dist=True)
        except (Exception, CheckpointException) as e:  # CheckpointException is a BaseException
            raise ReadFailed(_describe_load_error(e)) from None
        return planner

    def byte_items(self, infos: list[KeyInfo]) -> Iterator[tuple[KeyInfo, bytes | None, str | None]]:
        """(key info, raw bytes or None, error or None) per byte item, never unpickled here.

        Byte items are small values; one that claims more than BYTE_ITEM_MAX_BYTES is not read
        (a crafted or sparse file must not make fsdpck allocate what it claims).
        """
        big = [i for i in infos if i.stored_bytes > BYTE_ITEM_MAX_BYTES]
        for info in big:
            yield info, None, (f"a byte item of {info.stored_bytes} bytes, more than the {BYTE_ITEM_MAX_BYTES} bytes "
                               "fsdpck reads: not read")
        infos = [i for i in infos if i.stored_bytes <= BYTE_ITEM_MAX_BYTES]
        if torchsave.DIRECT_READS and isinstance(self.ckpt.storage, LocalStorage) and self.ckpt.format == "dcp":
            # A local item's stored bytes are read as they are (no DCP to import); transforms go to DCP.
            plain = [i for i in infos if len(i.chunks) == 1 and i.chunks[0].storage is not None
                     and not i.chunks[0].storage.transforms]
            for info in plain:
                yield (info, *self._read_stored(info))
            infos = [i for i in infos if i not in plain]
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

    def _read_stored(self, info: KeyInfo) -> tuple[bytes | None, str | None]:
        """A byte item's stored bytes from its local file: the range the integrity checks bounded."""
        ref = info.chunks[0].storage
        try:
            with self.ckpt.storage.open_read(ref.file) as stream:
                stream.seek(ref.offset)
                data = stream.read(ref.length)
        except OSError as e:
            return None, f"{ref.file}: cannot be read: {e.strerror or e}"
        if len(data) != ref.length:
            return None, f"{ref.file}: the file ended {ref.length - len(data)} bytes early"
        return data, None


def decode(raw: bytes, *, key: str) -> Any:
    """A byte item's value with ``torch.load(weights_only=True)``; CheckpointFormatError when it needs code."""
    return torchsave.decode_byte_item(raw, source=f"byte item {key!r}")


def stored_digest(raw: bytes) -> str:
    """16 hex digits of a byte item's stored records, ignoring the per-save ``serialization_id``.

    DCP stores a non-tensor value as a ``torch.save`` archive whose ``serialization_id`` record
    differs from save to save; equal values saved twice give equal digests. Used for items
    that cannot be decoded without running code. The archive is read by ``torchsave.members``
    (stored members that do not overlap, at most a few dozen: hashing costs what the bytes are);
    anything else is hashed whole.
    """
    found = torchsave.members(io.BytesIO(raw), 0, len(raw))
    if found is None:
        return hashlib.blake2b(raw, digest_size=8).hexdigest()
    h = hashlib.blake2b(digest_size=8)
    for name in sorted(found):
        if name.endswith("serialization_id"):
            continue
        member = found[name]
        h.update(name.encode() + b"\0")
        h.update(memoryview(raw)[member.offset: member.offset + member.size])
        h.update(b"\0")
    return h.hexdigest()
