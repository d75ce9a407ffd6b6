"""DCP's own reader and writer, as fsdpck hands them to DCP: the same I/O, made safe and observable.

- Metadata is read with the restricted unpickler (``fsdpck.checkpoint.unpickler``), never
  with ``pickle.load``: this holds for every DCP code path that asks the reader for it
  (``dcp.load``, ``load_sharded_optimizer_state_dict``).
- Byte items (non-tensor values) reach the load planner only through :class:`SafeBytes`,
  which decodes them with ``torch.load(weights_only=True)``: DCP's ``DefaultLoadPlanner``
  would run ``torch.load(weights_only=False)`` on whatever a crafted dir holds.
- Local files are opened without following a symlink on any path component
  (``fsdpck.checkpoint.nofollow``), for reading and for writing.
- Data I/O leaves phase markers in the process group's store (a rank that times out can say
  who is still writing) and is where the save and load failure drills fire (FSDPCK_FAULT).

The classes are defined at module level: DCP's process-based async checkpointer pickles the
writer into its background process.
"""

from __future__ import annotations

import contextlib
import io
import os
from pathlib import Path
from typing import Any, Iterator

import torch
from torch.distributed.checkpoint import FileSystemReader, FileSystemWriter
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.filesystem import FileSystem

try:  # DCP's Hugging Face storage needs the safetensors package: the extra fsdpck[hf]
    from torch.distributed.checkpoint import HuggingFaceStorageReader, HuggingFaceStorageWriter
except ImportError:  # a torch without it
    HuggingFaceStorageReader = HuggingFaceStorageWriter = FileSystemReader  # type: ignore[misc,assignment]

from fsdpck.checkpoint import nofollow, unpickler
from fsdpck.checkpoint.metadata import METADATA_MAX_BYTES, METADATA_NAME
from fsdpck.checkpoint.torchsave import decode_byte_item
from fsdpck.errors import CheckpointFormatError
from fsdpck.runtime import dist as fdist
from fsdpck.runtime import faults

class SafeBytes:
    """A load planner seen through a filter: its byte items are decoded with ``weights_only``.

    For DCP's ``DefaultLoadPlanner`` family (every planner fsdpck or DCP's optimizer helpers
    use) the decoded value is put where ``DefaultLoadPlanner.load_bytes`` would put it; any
    other planner gets the bytes only after they decoded safely. Everything else is the
    planner's own.
    """

    def __init__(self, planner: Any):
        self._planner = planner

    def __getattr__(self, name: str) -> Any:
        return getattr(self._planner, name)

    def load_bytes(self, read_item: Any, value: io.BytesIO) -> None:
        fqn = read_item.dest_index.fqn
        planner = self._planner
        if getattr(planner, "keeps_raw_bytes", False):  # fsdpck's offline reader: never unpickles at all
            planner.load_bytes(read_item, value)
            return
        data = value.read()
        obj = decode_byte_item(data, source=f"byte item {fqn!r}")
        if not isinstance(planner, DefaultLoadPlanner):
            planner.load_bytes(read_item, io.BytesIO(data))
            return
        if planner.flatten_state_dict:
            from torch.distributed.checkpoint._traverse import set_element

            set_element(planner.original_state_dict, planner.mappings[fqn], obj)
        else:
            planner.state_dict[fqn] = obj


def fill_all_bits_(t: Any) -> None:
    """Fill a tensor (any strides) with all bits set: NaN with a payload for floats, -1 for integers.

    The poison a load target holds before DCP reads into it: a value the load did not write
    then differs from anything a trainer saves.
    """
    ints = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
    if t.numel() == 0:
        return
    if t.dtype == torch.bool:
        t.detach().fill_(True)
    elif t.element_size() in ints:
        t.detach().view(ints[t.element_size()]).fill_(255 if t.element_size() == 1 else -1)


class NoFollowFileSystem(FileSystem):
    """DCP's local file system, opening every file inside ``root`` without following a link."""

    def __init__(self, root: Path):
        super().__init__()
        self.root = Path(root)

    @contextlib.contextmanager
    def create_stream(self, path: str | os.PathLike, mode: str) -> Iterator[io.IOBase]:
        with nofollow.open_file(self.root, nofollow.relative_to(self.root, path), mode) as stream:
            yield stream

    def rename(self, path: str | os.PathLike, new_path: str | os.PathLike) -> None:
        old, new = nofollow.relative_to(self.root, path), nofollow.relative_to(self.root, new_path)
        with nofollow.parent_fd(self.root, old) as (old_fd, old_leaf), \
                nofollow.parent_fd(self.root, new) as (new_fd, new_leaf):
            os.rename(old_leaf, new_leaf, src_dir_fd=old_fd, dst_dir_fd=new_fd)

    def rm_file(self, path: str | os.PathLike) -> None:
        with nofollow.parent_fd(self.root, nofollow.relative_to(self.root, path)) as (fd, leaf):
            os.unlink(leaf, dir_fd=fd)

    def exists(self, path: str | os.PathLike) -> bool:
        try:
            with nofollow.parent_fd(self.root, nofollow.relative_to(self.root, path)) as (fd, leaf):
                os.stat(leaf, dir_fd=fd, follow_symlinks=False)
            return True
        except OSError:
            return False


def _rank() -> int:
    import torch.distributed as dist

    return dist.get_rank() if dist.is_initialized() else 0


GATE_TIMEOUT_S = 600.0


def wait_for_gate(path: str, timeout_s: float = GATE_TIMEOUT_S) -> None:
    """Block until the file ``path`` exists (an async save's write waits for training to move on)."""
    import time

    deadline = time.monotonic() + timeout_s
    while not os.path.exists(path):
        if time.monotonic() > deadline:
            raise TimeoutError(f"the async save's write waited {timeout_s:.0f} s for the training steps to finish")
        time.sleep(0.005)


class InstrumentedWriter:
    """Mixin for a DCP storage writer: phase markers and the save drill around its data I/O.

    ``gate`` (a local file path, picklable into DCP's checkpointer process): when set, the
    write waits until that file exists, so that an async save writes only after the training
    steps meant to overlap it have changed the live state (the worst case for a stager that
    does not copy, whatever the machine's speed).
    """

    gate: str | None = None

    def write_data(self, plan: Any, planner: Any) -> Any:
        fdist.mark_phase("save (data I/O)")
        if self.gate:
            wait_for_gate(self.gate)
        faults.maybe_inject("save", _rank())
        result = super().write_data(plan, planner)  # type: ignore[misc]
        fdist.mark_phase("save (waiting for the other ranks)")
        return result


class InstrumentedReader:
    """Mixin for a DCP storage reader: safe byte items, poisoned targets, phase markers, the load drill."""

    poison = False  # fill every tensor target of a read with all bits set before reading (load checks)

    def read_data(self, plan: Any, planner: Any) -> Any:
        fdist.mark_phase("load (data I/O)")
        if self.poison:
            from torch.distributed.checkpoint.planner import LoadItemType

            for item in plan.items:
                if item.type != LoadItemType.BYTE_IO:
                    fill_all_bits_(planner.resolve_tensor(item))
        faults.maybe_inject("load", _rank())
        result = super().read_data(plan, SafeBytes(planner))  # type: ignore[misc]
        fdist.mark_phase("load (waiting for the other ranks)")
        return result


class SafeReaderMixin(InstrumentedReader):
    """Mixin for a reader of DCP's own format: its pickled .metadata through the restricted unpickler."""

    preloaded: Any = None  # metadata already read (and checked) by fsdpck: handed to DCP as it is

    def _open_metadata(self) -> tuple[Any, int, str]:  # (stream, size, name for messages)
        raise NotImplementedError

    def read_metadata(self, *args: Any, **kwargs: Any) -> Any:
        if self.preloaded is not None:
            return self.preloaded
        stream, size, source = self._open_metadata()
        with stream:
            if size > METADATA_MAX_BYTES:
                raise CheckpointFormatError(f"{source}: {size} bytes, more than the {METADATA_MAX_BYTES} bytes "
                                            "fsdpck reads as metadata: not read")
            metadata = unpickler.load_metadata(stream, size=size, source=source)
        # As DCP's own read_metadata leaves it.
        from torch.distributed.checkpoint.metadata import StorageMeta

        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = getattr(self, "load_id", None)
        return metadata


class LocalWriter(InstrumentedWriter, FileSystemWriter):
    """DCP's FileSystemWriter into a local dir, never writing through a link."""

    def __init__(self, root: Path, **options: Any):
        super().__init__(root, **options)
        self.fs = NoFollowFileSystem(Path(root))


class LocalHFWriter(InstrumentedWriter, HuggingFaceStorageWriter):
    """DCP's Hugging Face (safetensors) writer into a local dir: each rank writes its own shards."""

    def __init__(self, root: Path, *, thread_count: int = 1, **_ignored: Any):
        super().__init__(str(root), thread_count=thread_count, save_distributed=True)
        self.fs = NoFollowFileSystem(Path(root))


class LocalHFReader(InstrumentedReader, HuggingFaceStorageReader):
    """DCP's Hugging Face (safetensors) reader: no pickle to restrict; the headers are JSON."""

    def __init__(self, root: Path):
        super().__init__(str(root))


class LocalReader(SafeReaderMixin, FileSystemReader):
    """DCP's FileSystemReader of a local dir: restricted metadata, safe byte items, no links followed."""

    def __init__(self, root: Path):
        super().__init__(root)
        self.fs = NoFollowFileSystem(Path(root))

    def _open_metadata(self) -> tuple[Any, int, str]:
        root = Path(self.path)
        try:
            stream = nofollow.open_file(root, METADATA_NAME, "rb")
        except FileNotFoundError:
            raise CheckpointFormatError(f"{root}: no {METADATA_NAME}: not a DCP checkpoint (or a save that did "
                                        "not finish)") from None
        except OSError as e:
            raise CheckpointFormatError(f"{root}/{METADATA_NAME}: cannot be opened: {e.strerror}"
                                        + (" (a symlink: not followed)" if e.errno == 40 else "")) from None
        return stream, os.fstat(stream.fileno()).st_size, str(root / METADATA_NAME)
