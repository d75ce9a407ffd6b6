"""Reading tensors a stored piece at a time, in parallel, through DCP's own reader.

The offline commands look at every element of a checkpoint (fingerprints, statistics, an
element diff) or at a part of one tensor (``fsdpck show --slice``). Neither needs a whole
tensor in memory: :func:`read_pieces` asks for a box of each tensor (all of it, or a slice),
DCP's read planning (``create_read_items_for_chunk_list``, what its own load planner uses)
turns each box into the stored chunks that intersect it, and DCP's reader
(``FileSystemReader.read_data``, with fsdpck's safe byte items and no-follow files) reads them.
Each piece then goes to ``on_piece(request, global offsets, tensor)`` or into the request's
own target tensor, and is let go: memory stays near ``threads`` × 2 × the largest stored chunk.

The reads are sorted by file and offset, grouped into runs, and the runs are read by a pool of
threads: DCP's reader and the work on each piece (the fingerprint's C kernel, torch's
reductions) release the GIL, so reading one run overlaps working on another. Only keys whose
integrity checks passed may be asked for, which bounds every read by bytes that are in the
files. A run that fails is read again one item at a time, so that each error names its key.
"""

from __future__ import annotations

import math
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Callable, Iterator

from fsdpck.checkpoint import safetensors, torchsave
from fsdpck.checkpoint.integrity import CheckpointDir
from fsdpck.checkpoint.storage import LocalStorage
from fsdpck.checkpoint.metadata import ChunkInfo, KeyInfo
from fsdpck.errors import CheckpointFormatError
from fsdpck.runtime.progress import NO_PROGRESS, Progress

RUN_BYTES = 16 << 20  # stored items read by one call of DCP's reader (a larger item is a run of its own)
DIRECT_READS = True  # tests and the benchmark turn fsdpck's own reads of local chunks off, to compare


def read_threads() -> int:
    """Threads for a read: one per core (at least 2, so that one reads while another works), at most 8."""
    return max(2, min(8, os.cpu_count() or 1))


@contextmanager
def one_torch_thread(workers: int) -> Iterator[None]:
    """With several reading threads, each works on its own piece with one intra-op thread: torch's own
    threads on top of them would oversubscribe the cores (measured: 1.5-2x slower on 2 cores)."""
    import torch

    before = torch.get_num_threads()
    if workers > 1 and before > 1:
        torch.set_num_threads(1)
    try:
        yield
    finally:
        if torch.get_num_threads() != before:
            torch.set_num_threads(before)


@dataclass(frozen=True, slots=True)
class Box:
    """A box of a tensor: global offsets and sizes per dim."""

    offsets: tuple[int, ...]
    sizes: tuple[int, ...]

    @property
    def numel(self) -> int:
        return math.prod(self.sizes)

    @staticmethod
    def whole(shape: tuple[int, ...]) -> Box:
        return Box((0,) * len(shape), tuple(shape))


@dataclass(slots=True)
class Request:
    """A box of one tensor key to read: its pieces go to ``on_piece``, or into ``into`` (a tensor of the box's sizes)."""

    info: KeyInfo
    box: Box
    into: Any = None


def intersect(box: Box, chunk: ChunkInfo) -> Box | None:
    """The part of ``chunk`` inside ``box`` (global offsets), or None when they do not meet."""
    offsets, sizes = [], []
    for b0, bn, c0, cn in zip(box.offsets, box.sizes, chunk.offsets, chunk.sizes):
        lo, hi = max(b0, c0), min(b0 + bn, c0 + cn)
        if hi <= lo:
            return None
        offsets.append(lo)
        sizes.append(hi - lo)
    return Box(tuple(offsets), tuple(sizes))


def planned_bytes(requests: list[Request]) -> int:
    """Stored bytes the requests will read: every chunk that meets a box is read whole."""
    total = 0
    for req in requests:
        if req.box.numel == 0:
            continue
        total += sum(c.storage.length for c in req.info.chunks
                     if c.storage is not None and c.numel and intersect(req.box, c) is not None)
    return total


def read_pieces(ckpt: CheckpointDir, requests: list[Request], on_piece: Callable[[Request, tuple[int, ...], Any], None]
                | None = None, *, progress: Progress = NO_PROGRESS, label: str = "reading",
                threads: int | None = None) -> dict[str, str]:
    """Read every request's box; returns ``{key: one-line error}`` for the keys that could not be read.

    ``on_piece`` is called from the reading threads (it must be thread-safe) with each piece's
    global offsets and a tensor that is only valid during the call. A key with an error may
    have had some of its pieces handed over already: its results must be dropped.
    """
    requests = [r for r in requests if r.box.numel > 0]
    threads = threads or read_threads()
    with progress.reading(label, planned_bytes(requests)) as advance:
        if ckpt.format == "safetensors":
            return _read_safetensors(ckpt, requests, on_piece, advance, threads)
        return _read_dcp(ckpt, requests, on_piece, advance, threads)


def describe(e: BaseException) -> str:
    """A read failure in one line: the first line of its message."""
    if isinstance(e, CheckpointFormatError):
        return e.message
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0][:300] if text else ''}".rstrip(": ")


class _Sink:
    """The load planner DCP's reader hands pieces to: a target per read item, then the piece itself."""

    def __init__(self, requests: dict[tuple[str, tuple[int, ...]], Request], on_piece: Any, advance: Any,
                 lengths: dict[Any, int]):
        import torch

        self.torch = torch
        self.requests = requests
        self.on_piece = on_piece
        self.advance = advance
        self.lengths = lengths
        self.local = threading.local()  # a reused buffer per thread: fresh memory costs page faults
        self.committed: set[Any] = set()
        self.lock = threading.Lock()

    def request(self, item: Any) -> Request:
        return self.requests[(item.dest_index.fqn, tuple(item.dest_index.offset or ()))]

    def resolve_tensor(self, item: Any) -> Any:
        torch = self.torch
        req = self.request(item)
        if req.into is not None:
            target = req.into
            for dim, (start, length) in enumerate(zip(item.dest_offsets, item.lengths)):
                target = target.narrow(dim, start, length)
            return target
        dtype = getattr(torch, req.info.dtype or "")
        nbytes = math.prod(item.lengths) * (req.info.itemsize or 1)
        buffer = getattr(self.local, "buffer", None)
        if buffer is None or buffer.numel() < nbytes:
            buffer = self.local.buffer = torch.empty(max(nbytes, 1), dtype=torch.uint8)
        return buffer[:nbytes].view(dtype).view(tuple(item.lengths))

    def commit_tensor(self, item: Any, tensor: Any) -> None:
        req = self.request(item)
        if self.on_piece is not None and req.into is None:
            offsets = tuple(o + d for o, d in zip(req.box.offsets, item.dest_offsets))
            self.on_piece(req, offsets, tensor)
        with self.lock:
            self.committed.add(_item_id(item))
        self.advance(self.lengths.get(item.storage_index, 0))

    def load_bytes(self, item: Any, value: Any) -> None:
        raise CheckpointFormatError(f"{item.dest_index.fqn}: a byte item where a tensor was expected")

    def place(self, item: Any, piece: Any) -> None:
        """A piece read by fsdpck itself, as DCP's reader would hand it over: into the request's
        target (a copy), or straight to ``on_piece`` (no copy: it is valid only during the call)."""
        if self.request(item).into is not None:
            target = self.resolve_tensor(item)
            target.copy_(piece)
            piece = target
        self.commit_tensor(item, piece)


class _Buffers:
    """Buffers for stored chunks' bytes, reused by every read of the process (both sides of a diff,
    every thread): fresh memory costs a page fault per 4 KiB, more than reading the bytes into it
    (docs/benchmarks.md, "Offline reads"). At most ``keep`` idle buffers are held."""

    def __init__(self, keep: int):
        self.keep = keep
        self.idle: list[Any] = []
        self.lock = threading.Lock()

    @contextmanager
    def borrow(self, nbytes: int) -> Iterator[Any]:
        import torch

        with self.lock:
            fits = [i for i, b in enumerate(self.idle) if b.numel() >= nbytes]  # idle is sorted by size
            buffer = self.idle.pop(fits[0]) if fits else None
        if buffer is None:
            buffer = torch.empty(max(nbytes, 1), dtype=torch.uint8)
        try:
            yield buffer
        finally:
            with self.lock:
                self.idle.append(buffer)
                self.idle.sort(key=lambda b: b.numel())
                del self.idle[: max(0, len(self.idle) - self.keep)]


_BUFFERS = _Buffers(keep=read_threads())


def _read_into(stream: Any, start: int, buffer: Any, nbytes: int, what: str) -> None:
    """``nbytes`` bytes of ``stream`` from ``start`` into a CPU uint8 tensor's first bytes."""
    import ctypes

    view = memoryview((ctypes.c_ubyte * nbytes).from_address(buffer.data_ptr())).cast("B") if nbytes else b""
    stream.seek(start)
    done = 0
    while done < nbytes:
        n = stream.readinto(view[done:])
        if not n:
            raise CheckpointFormatError(f"{what}: the file ended {nbytes - done} bytes early")
        done += n


def _read_direct(ckpt: CheckpointDir, run: list[Any], storage: dict[Any, Any], sizes: dict[Any, tuple[int, ...]],
                 sink: _Sink) -> list[Any]:
    """Read a run's tensor chunks straight from their file into a reused buffer, each placed
    where DCP's reader would have put it; returns the items left for DCP's reader (a storage
    transform, or an archive :func:`torchsave.locate` does not vouch for)."""
    torch = sink.torch
    left: list[Any] = []
    path = storage[run[0].storage_index].relative_path
    with ckpt.storage.open_read(path) as stream:
        for item in run:
            where = storage[item.storage_index]
            info = sink.request(item).info
            found = None
            if not where.transform_descriptors and info.itemsize:
                found = torchsave.locate(stream, where.offset, where.length, dtype=info.dtype or "",
                                         itemsize=info.itemsize, sizes=sizes[item.storage_index])
            if found is None:
                left.append(item)
                continue
            with _BUFFERS.borrow(found.nbytes) as buffer:
                _read_into(stream, where.offset + found.data_offset, buffer, found.nbytes, f"{path} ({info.key})")
                piece = buffer[: found.nbytes].view(getattr(torch, info.dtype or "")).as_strided(
                    found.size, found.stride, found.storage_offset)
                for dim, (start, length) in enumerate(zip(item.storage_offsets, item.lengths)):
                    piece = piece.narrow(dim, start, length)
                sink.place(item, piece)
    return left


def _item_id(item: Any) -> tuple:
    return (item.dest_index.fqn, tuple(item.dest_index.offset or ()), tuple(item.storage_index.offset or ()))


def _read_dcp(ckpt: CheckpointDir, requests: list[Request], on_piece: Any, advance: Any, threads: int) -> dict[str, str]:
    import torch
    from torch.distributed.checkpoint.metadata import ChunkStorageMetadata, MetadataIndex
    from torch.distributed.checkpoint.planner import LoadPlan
    from torch.distributed.checkpoint.planner_helpers import create_read_items_for_chunk_list

    raw = ckpt.raw_metadata
    if raw is None:
        raise CheckpointFormatError(f"{ckpt.url}: its metadata is unreadable, so its data cannot be read")
    by_box: dict[tuple[str, tuple[int, ...]], Request] = {}
    items: list[Any] = []
    for req in requests:
        key = (req.info.key, req.box.offsets)
        if key in by_box:
            raise ValueError(f"{req.info.key}: the box at {list(req.box.offsets)} is asked for twice")
        by_box[key] = req
        wanted = ChunkStorageMetadata(offsets=torch.Size(req.box.offsets), sizes=torch.Size(req.box.sizes))
        items.extend(create_read_items_for_chunk_list(req.info.key, raw.state_dict_metadata[req.info.key], [wanted]))
    storage = raw.storage_data
    items.sort(key=lambda i: (storage[i.storage_index].relative_path, storage[i.storage_index].offset))
    runs: list[list[Any]] = []
    size = 0
    for item in items:
        where = storage[item.storage_index]
        if not runs or size + where.length > RUN_BYTES or storage[runs[-1][-1].storage_index].relative_path != \
                where.relative_path:
            runs.append([])
            size = 0
        runs[-1].append(item)
        size += where.length

    reader = ckpt.storage.dcp_reader(format=ckpt.format)
    reader.set_up_storage_reader(raw, True)
    sink = _Sink(by_box, on_piece, advance, {i.storage_index: storage[i.storage_index].length for i in items})
    errors: dict[str, str] = {}
    failed: list[Any] = []
    lock = threading.Lock()
    # Local files are read by fsdpck itself, each chunk into a buffer reused per thread: DCP's
    # reader gives every chunk a fresh tensor and then copies it (docs/benchmarks.md).
    direct = isinstance(ckpt.storage, LocalStorage) and ckpt.format == "dcp" and DIRECT_READS
    sizes = {MetadataIndex(key, chunk.offsets): tuple(chunk.sizes)
             for key in {i.storage_index.fqn for i in items}
             for chunk in raw.state_dict_metadata[key].chunks} if direct else {}

    def read_run(run: list[Any]) -> None:
        try:
            if direct:
                run = _read_direct(ckpt, run, storage, sizes, sink)
            if run:
                reader.read_data(LoadPlan(run), sink).wait()
        except Exception as e:  # any failure of a run: its items are read again one by one to name the key
            with lock:
                failed.append((run, e))

    workers = max(1, min(threads, len(runs)))
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="fsdpck-read") as pool, one_torch_thread(workers):
        list(pool.map(read_run, runs))
        retry = [item for run, _ in failed for item in run if _item_id(item) not in sink.committed]
        failed.clear()
        list(pool.map(lambda item: read_run([item]), retry))
    for run, e in failed:
        for item in run:
            errors.setdefault(item.dest_index.fqn, describe(e))
    return errors


def _read_safetensors(ckpt: CheckpointDir, requests: list[Request], on_piece: Any, advance: Any,
                      threads: int) -> dict[str, str]:
    """safetensors: each chunk that meets a box read straight from its file (no DCP, no pickle)."""
    errors: dict[str, str] = {}
    lock = threading.Lock()

    def read_one(req: Request) -> None:
        try:
            for chunk in req.info.chunks:
                part = intersect(req.box, chunk) if chunk.numel and chunk.storage is not None else None
                if part is None:
                    continue
                with ckpt.storage.open_read(chunk.storage.file) as stream:
                    value = safetensors.read_chunk(stream, chunk, dtype=req.info.dtype or "")
                for dim, (start, length) in enumerate(zip(part.offsets, part.sizes)):
                    value = value.narrow(dim, start - chunk.offsets[dim], length)
                if req.into is not None:
                    target = req.into
                    for dim, (start, length) in enumerate(zip(part.offsets, part.sizes)):
                        target = target.narrow(dim, start - req.box.offsets[dim], length)
                    target.copy_(value)
                elif on_piece is not None:
                    on_piece(req, part.offsets, value)
                advance(chunk.storage.length)
        except (OSError, CheckpointFormatError, RuntimeError, ValueError) as e:
            with lock:
                errors[req.info.key] = describe(e)

    workers = max(1, min(threads, len(requests)))
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="fsdpck-read") as pool, one_torch_thread(workers):
        list(pool.map(read_one, requests))
    return errors
