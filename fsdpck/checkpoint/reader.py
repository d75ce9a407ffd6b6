"""Reading a checkpoint's items offline (one process, no process group), through DCP's own reader.

Tensors are read a batch of keys at a time into plain tensors of their global shape (DCP
assembles the chunks), so memory stays near the largest single tensor or
:data:`READ_BATCH_BYTES`. Only keys whose integrity checks passed are read, which bounds
every allocation by bytes that really are in the files. Byte items come back as their raw
bytes: nothing here unpickles them (``decode`` does, with ``weights_only``).
"""

from __future__ import annotations

import hashlib
import io
import zipfile
from typing import Any, Iterator

from fsdpck.checkpoint import safetensors
from fsdpck.checkpoint.dcp_io import BYTE_ITEM_MAX_BYTES, decode_byte_item
from fsdpck.checkpoint.integrity import CheckpointDir
from fsdpck.checkpoint.metadata import KeyInfo
from fsdpck.errors import CheckpointFormatError

# Tensors are read this many bytes of keys at a time (a key larger than this is read alone),
# so that a checkpoint of many small keys does not pay DCP's per-load overhead per key.
READ_BATCH_BYTES = 64 << 20


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
    """Reads the items of one opened checkpoint through DCP's reader, without a process group."""

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

    def tensors(self, infos: list[KeyInfo], *, batch_bytes: int = READ_BATCH_BYTES) -> Iterator[tuple[KeyInfo, Any, str | None]]:
        """(key info, tensor or None, error or None) per tensor key, read in batches of about ``batch_bytes``."""
        batch: list[KeyInfo] = []
        size = 0
        for info in infos:
            if batch and size + info.nbytes > batch_bytes:
                yield from self._tensor_batch(batch)
                batch, size = [], 0
            batch.append(info)
            size += info.nbytes
        if batch:
            yield from self._tensor_batch(batch)

    def _tensor_batch(self, batch: list[KeyInfo]) -> Iterator[tuple[KeyInfo, Any, str | None]]:
        import torch

        try:
            state = {info.key: torch.empty(info.shape or (), dtype=getattr(torch, info.dtype or "")) for info in batch}
        except (RuntimeError, MemoryError, TypeError, ValueError, AttributeError) as e:
            if len(batch) == 1:
                yield batch[0], None, f"cannot allocate {list(batch[0].shape or ())} {batch[0].dtype}: {e}"
                return
            for info in batch:
                yield from self._tensor_batch([info])
            return
        try:
            if self.ckpt.format == "safetensors":
                self._assemble(state, batch)
            else:
                self._load(state)
        except ReadFailed as e:
            del state
            if len(batch) == 1:
                yield batch[0], None, str(e)
                return
            for info in batch:  # one at a time, to find out which of the batch cannot be read
                yield from self._tensor_batch([info])
            return
        for info in batch:
            tensor = state.pop(info.key)
            yield info, tensor, None
            del tensor

    def _assemble(self, state: dict[str, Any], batch: list[KeyInfo]) -> None:
        """safetensors: each chunk read straight from its file into its place (no DCP, no pickle)."""
        storage = self.ckpt.storage
        for info in batch:
            target = state[info.key]
            for chunk in info.chunks:
                if chunk.numel == 0:
                    continue
                try:
                    with storage.open_read(chunk.storage.file) as stream:
                        value = safetensors.read_chunk(stream, chunk, dtype=info.dtype or "")
                except (OSError, CheckpointFormatError) as e:
                    raise ReadFailed(f"{type(e).__name__}: {getattr(e, 'message', None) or e}") from None
                target[tuple(slice(o, o + n) for o, n in zip(chunk.offsets, chunk.sizes))] = value

    def tensor(self, info: KeyInfo) -> Any:
        """One tensor key's data; ReadFailed when it cannot be read."""
        for _, tensor, error in self._tensor_batch([info]):
            if error is not None:
                raise ReadFailed(error)
            return tensor
        raise ReadFailed("nothing read")

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
