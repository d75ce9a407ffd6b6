"""Reading tensors a stored piece at a time, in parallel.

The offline commands look at every element of a checkpoint (fingerprints, statistics, an
element diff) or at a part of one tensor (``fsdpck show --slice``). Neither needs a whole
tensor in memory: :func:`read_pieces` asks for a box of each tensor (all of it, or a slice), and
each stored chunk that intersects it is read and its part handed to ``on_piece(request, global
offsets, tensor)`` or copied into the request's own target tensor, then let go: memory stays
near ``threads`` × the largest stored chunk.

A chunk in a local file is read by fsdpck itself: :mod:`fsdpck.checkpoint.torchsave` finds its
elements inside its ``torch.save`` archive without running the archive's pickle (a safetensors
chunk is its byte range, row-major: :func:`fsdpck.checkpoint.safetensors.locate`), and they are
read into a buffer the process reuses, with no fresh tensor and no copy per chunk, and without
importing DCP or torch: each piece goes to ``on_piece`` as memory (a
:class:`~fsdpck.checkpoint.piece.Piece`), which the C kernels read by address; a chunk stored
row-major goes in slices of whole rows (:data:`SLICE_BYTES`). Anything else — remote storage, a
storage transform, an archive ``torchsave`` does not vouch for — goes through DCP's own read
planning (``create_read_items_for_chunk_list``) and reader (``FileSystemReader.read_data``, with
fsdpck's no-follow files), as before; a remote safetensors chunk is read whole into a tensor.

The reads are sorted by file and offset, grouped into runs, and the runs are read by a pool of
threads: reads and the work on each piece (the fingerprint's C kernel, torch's reductions)
release the GIL, so reading one run overlaps working on another. Only keys whose integrity
checks passed may be asked for, which bounds every read by bytes that are in the files. A run
that fails is read again one item at a time, so that each error names its key.
"""

from __future__ import annotations

import ctypes
import math
import os
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Callable, Iterator

from fsdpck.checkpoint import safetensors, torchsave
from fsdpck.checkpoint.integrity import CheckpointDir
from fsdpck.checkpoint.metadata import ChunkInfo, KeyInfo
from fsdpck.checkpoint.piece import Piece, narrow_tensor
from fsdpck.checkpoint.reader import dcp_metadata
from fsdpck.checkpoint.storage import LocalStorage
from fsdpck.errors import CheckpointFormatError
from fsdpck.runtime.progress import NO_PROGRESS, Progress

RUN_BYTES = 16 << 20  # stored items read by one call of DCP's reader (a larger item is a run of its own)
# A local chunk stored row-major is read and handed over this many bytes at a time (whole rows of its
# first dim): the kernels then find the bytes still in the cache, a thread's buffer stays small (fresh
# memory costs a page fault per 4 KiB), and reading one slice overlaps working on another thread's.
SLICE_BYTES = 8 << 20


def read_threads() -> int:
    """Threads for a read: one per core (at least 2, so that one reads while another works), at most 8."""
    return max(2, min(8, os.cpu_count() or 1))


@contextmanager
def one_torch_thread(workers: int) -> Iterator[None]:
    """With several reading threads, each works on its own piece with one intra-op thread: torch's own
    threads on top of them would oversubscribe the cores (measured: 1.5-2x slower on 2 cores). Nothing
    to do where torch is not imported (the C kernels work on one thread each)."""
    torch = sys.modules.get("torch")
    if torch is None:
        yield
        return
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
    global offsets and a :class:`~fsdpck.checkpoint.piece.Piece` that is only valid during the
    call. A key with an error may have had some of its pieces handed over already: its results
    must be dropped.
    """
    requests = [r for r in requests if r.box.numel > 0]
    threads = threads or read_threads()
    with progress.reading(label, planned_bytes(requests)) as advance:
        # The other way: DCP's reader, or (safetensors) a torch tensor per chunk.
        other = _read_safetensors if ckpt.format == "safetensors" else _read_dcp
        if not (torchsave.DIRECT_READS and isinstance(ckpt.storage, LocalStorage)):
            return other(ckpt, requests, on_piece, advance, threads)
        # Local files are read by fsdpck itself, each chunk into a reused buffer: DCP's reader
        # gives every chunk a fresh tensor and then copies it, and importing DCP costs about as
        # much as importing torch (docs/benchmarks.md, "Offline reads").
        errors, rest = _read_local(ckpt, requests, on_piece, advance, threads)
        if rest:
            errors.update(other(ckpt, rest, on_piece, advance, threads))
        return errors


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
            self.on_piece(req, offsets, Piece.of_tensor(tensor))
        with self.lock:
            self.committed.add(_item_id(item))
        self.advance(self.lengths.get(item.storage_index, 0))

    def load_bytes(self, item: Any, value: Any) -> None:
        raise CheckpointFormatError(f"{item.dest_index.fqn}: a byte item where a tensor was expected")


class _Buffer:
    """Memory for one stored chunk's bytes, and its address (for the kernels, and for a tensor view)."""

    def __init__(self, nbytes: int):
        self.memory = bytearray(max(nbytes, 1))
        self.view = memoryview(self.memory)
        self.address = ctypes.addressof(ctypes.c_char.from_buffer(self.memory))
        self.size = len(self.memory)


class _Buffers:
    """Buffers for stored chunks' bytes, reused by every read of the process (both sides of a diff,
    every thread): fresh memory costs a page fault per 4 KiB, more than reading the bytes into it
    (docs/benchmarks.md, "Offline reads"). At most ``keep`` idle buffers are held."""

    def __init__(self, keep: int):
        self.keep = keep
        self.idle: list[_Buffer] = []
        self.lock = threading.Lock()

    @contextmanager
    def borrow(self, nbytes: int) -> Iterator[_Buffer]:
        with self.lock:
            fits = [i for i, b in enumerate(self.idle) if b.size >= nbytes]  # idle is sorted by size
            buffer = self.idle.pop(fits[0]) if fits else None
        if buffer is None:
            buffer = _Buffer(nbytes)
        try:
            yield buffer
        finally:
            with self.lock:
                self.idle.append(buffer)
                self.idle.sort(key=lambda b: b.size)
                del self.idle[: max(0, len(self.idle) - self.keep)]


_BUFFERS = _Buffers(keep=read_threads())


def _read_into(stream: Any, start: int, buffer: _Buffer, nbytes: int, what: str) -> None:
    """``nbytes`` bytes of ``stream`` from ``start`` into the buffer's first bytes."""
    view = buffer.view[:nbytes]
    stream.seek(start)
    done = 0
    while done < nbytes:
        n = stream.readinto(view[done:])
        if not n:
            raise CheckpointFormatError(f"{what}: the file ended {nbytes - done} bytes early")
        done += n


@dataclass(slots=True)
class _Part:
    """The part of one stored chunk inside a request's box (global offsets): what a read delivers."""

    req: Request
    chunk: ChunkInfo
    box: Box


def _parts(requests: list[Request]) -> list[_Part]:
    return [_Part(req, chunk, part) for req in requests for chunk in req.info.chunks
            if chunk.numel and chunk.storage is not None and (part := intersect(req.box, chunk)) is not None]


def _runs(items: list[Any], where: Callable[[Any], tuple[str, int, int]]) -> list[list[Any]]:
    """Items sorted by (file, offset), grouped into runs of one file and at most RUN_BYTES (or one item)."""
    items = sorted(items, key=lambda i: where(i)[:2])
    runs: list[list[Any]] = []
    size = 0
    for item in items:
        file, _, length = where(item)
        if not runs or size + length > RUN_BYTES or where(runs[-1][-1])[0] != file:
            runs.append([])
            size = 0
        runs[-1].append(item)
        size += length
    return runs


def _narrow(t: Any, part: Box, origin: tuple[int, ...]) -> Any:
    """The view of ``part`` (global offsets) in a tensor whose first element is at global ``origin``."""
    return narrow_tensor(t, part.offsets, part.sizes, origin)


def _deliver(req: Request, part: Box, piece: Piece, on_piece: Any) -> None:
    """A piece (the elements of ``part``) into the request's target, or to ``on_piece``."""
    if req.into is not None:
        _narrow(req.into, part, req.box.offsets).copy_(piece.tensor())
    elif on_piece is not None:
        on_piece(req, part.offsets, piece)


def _read_part(stream: Any, part: _Part, on_piece: Any, fmt: str) -> bool:
    """Read one part straight from its (open) file through a reused buffer and deliver it; False
    where it is left to the other way (a storage transform, a dtype without a known size, or an
    archive :func:`torchsave.locate` does not vouch for). ``fmt``: the checkpoint's format."""
    info, chunk, ref = part.req.info, part.chunk, part.chunk.storage
    if ref is None or ref.transforms or not info.itemsize:
        return False
    if fmt == "safetensors":
        found = safetensors.locate(chunk, dtype=info.dtype or "", itemsize=info.itemsize)
    else:
        found = torchsave.locate(stream, ref.offset, ref.length, dtype=info.dtype or "", itemsize=info.itemsize,
                                 sizes=chunk.sizes)
    if found is None:
        return False
    itemsize, what = info.itemsize, f"{ref.file} ({info.key})"
    stored = Piece(0, info.dtype or "", itemsize, found.size, found.stride, None)
    if not found.size or not stored.contiguous:  # one read of its storage, viewed as stored
        with _BUFFERS.borrow(found.nbytes) as buffer:
            _read_into(stream, ref.offset + found.data_offset, buffer, found.nbytes, what)
            piece = Piece(buffer.address + found.storage_offset * itemsize, info.dtype or "", itemsize,
                          found.size, found.stride, buffer)
            _deliver(part.req, part.box, piece.narrow(part.box.offsets, part.box.sizes, chunk.offsets), on_piece)
        return True
    # Row-major: the part's rows (of the first dim) in slices of about SLICE_BYTES, each read alone.
    row = math.prod(found.size[1:])
    first, stop = part.box.offsets[0] - chunk.offsets[0], part.box.offsets[0] - chunk.offsets[0] + part.box.sizes[0]
    step = max(1, SLICE_BYTES // max(1, row * itemsize))
    strides = tuple(math.prod(found.size[d + 1:]) for d in range(len(found.size)))
    with _BUFFERS.borrow(min(stop - first, step) * row * itemsize) as buffer:
        for r in range(first, stop, step):
            n = min(step, stop - r)
            try:
                _read_into(stream, ref.offset + found.data_offset + (found.storage_offset + r * row) * itemsize, buffer,
                           n * row * itemsize, what)
            except Exception as e:
                if r == first:
                    raise
                raise _PartlyDelivered(part, e) from None  # rows were handed over: not to be read again
            origin = (chunk.offsets[0] + r, *chunk.offsets[1:])
            sub = Box((origin[0], *part.box.offsets[1:]), (n, *part.box.sizes[1:]))
            piece = Piece(buffer.address, info.dtype or "", itemsize, (n, *found.size[1:]), strides, buffer)
            _deliver(part.req, sub, piece.narrow(sub.offsets, sub.sizes, origin), on_piece)
    return True


class _PartlyDelivered(Exception):
    """A part failed after some of its slices were delivered: its key has an error, and it is not read again."""

    def __init__(self, part: _Part, cause: BaseException):
        super().__init__(str(cause))
        self.part, self.cause = part, cause


def _read_local(ckpt: CheckpointDir, requests: list[Request], on_piece: Any, advance: Any, threads: int
                ) -> tuple[dict[str, str], list[Request]]:
    """Read the requests' chunks from local files without DCP or torch: ``{key: error}``, and a request
    per part left to the other way (its box is that part, so nothing is delivered twice)."""
    parts = _parts(requests)
    runs = _runs(parts, lambda p: (p.chunk.storage.file, p.chunk.storage.offset, p.chunk.storage.length))
    left: list[_Part] = []
    done: set[int] = set()
    failed: list[tuple[list[_Part], BaseException]] = []
    final: list[tuple[list[_Part], BaseException]] = []  # parts partly delivered, then failed
    lock = threading.Lock()

    def read_run(run: list[_Part]) -> None:
        try:
            with ckpt.storage.open_read(run[0].chunk.storage.file) as stream:
                for part in run:
                    if id(part) in done:
                        continue
                    if _read_part(stream, part, on_piece, ckpt.format):
                        advance(part.chunk.storage.length)
                    else:
                        with lock:
                            left.append(part)
                    with lock:
                        done.add(id(part))
        except _PartlyDelivered as e:
            with lock:
                done.add(id(e.part))
                final.append(([e.part], e.cause))
                failed.append((run, e.cause))
        except Exception as e:  # any failure of a run: its parts not yet done are read again one by one
            with lock:
                failed.append((run, e))

    workers = max(1, min(threads, len(runs)))
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="fsdpck-read") as pool, one_torch_thread(workers):
        list(pool.map(read_run, runs))
        retry = [part for run, _ in failed for part in run if id(part) not in done]
        failed.clear()
        list(pool.map(lambda part: read_run([part]), retry))
    errors: dict[str, str] = {}
    for run, e in final + failed:
        for part in run:
            errors.setdefault(part.req.info.key, describe(e))
    rest = []
    for part in left:
        if part.req.info.key not in errors:
            into = part.req.into
            rest.append(Request(part.req.info, part.box,
                                into=None if into is None else _narrow(into, part.box, part.req.box.offsets)))
    return errors, rest


def _item_id(item: Any) -> tuple:
    return (item.dest_index.fqn, tuple(item.dest_index.offset or ()), tuple(item.storage_index.offset or ()))


def _read_dcp(ckpt: CheckpointDir, requests: list[Request], on_piece: Any, advance: Any, threads: int) -> dict[str, str]:
    """Through DCP's reader (its read planning and ``FileSystemReader.read_data``): remote storage,
    storage transforms, and what :func:`_read_local` leaves."""
    import torch
    from torch.distributed.checkpoint.metadata import ChunkStorageMetadata
    from torch.distributed.checkpoint.planner import LoadPlan
    from torch.distributed.checkpoint.planner_helpers import create_read_items_for_chunk_list

    try:
        raw = dcp_metadata(ckpt)
    except (CheckpointFormatError, OSError) as e:
        return {req.info.key: describe(e) for req in requests}
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
    runs = _runs(items, lambda i: (storage[i.storage_index].relative_path, storage[i.storage_index].offset,
                                   storage[i.storage_index].length))
    reader = ckpt.storage.dcp_reader(format=ckpt.format)
    reader.set_up_storage_reader(raw, True)
    sink = _Sink(by_box, on_piece, advance, {i.storage_index: storage[i.storage_index].length for i in items})
    errors: dict[str, str] = {}
    failed: list[Any] = []
    lock = threading.Lock()

    def read_run(run: list[Any]) -> None:
        try:
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
                value = Piece.of_tensor(value).narrow(part.offsets, part.sizes, chunk.offsets)
                _deliver(req, part, value, on_piece)
                advance(chunk.storage.length)
        except (OSError, CheckpointFormatError, RuntimeError, ValueError) as e:
            with lock:
                errors[req.info.key] = describe(e)

    workers = max(1, min(threads, len(requests)))
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="fsdpck-read") as pool, one_torch_thread(workers):
        list(pool.map(read_one, requests))
    return errors
