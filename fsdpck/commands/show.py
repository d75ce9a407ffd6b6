"""``fsdpck show DIR KEY [--slice EXPR]``: one tensor, a box of it, or one object — read alone and safely.

The checkpoint is opened as ``inspect`` opens it (restricted unpickler, integrity from metadata
and file sizes); a key with an integrity problem is not read. For a tensor, ``--slice`` is
checked against the global shape before anything is allocated, and only the stored chunks
that meet the box are read, through DCP's read planning and reader (``fsdpck.checkpoint.stream``),
straight into a tensor of the box's size. An object is decoded with ``weights_only``.
"""

from __future__ import annotations

import difflib
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Iterator

from fsdpck.checkpoint.integrity import Problem, check_location, open_checkpoint
from fsdpck.checkpoint.metadata import KIND_BYTES, KIND_TENSOR
from fsdpck.checkpoint.reader import CheckpointReader, decode
from fsdpck.checkpoint.storage import open_storage
from fsdpck.checkpoint.stream import Box, Request, intersect, planned_bytes, read_pieces
from fsdpck.commands.slices import Selection, parse, select
from fsdpck.commands.stats import ValueStats, piece_stats
from fsdpck.errors import CheckpointFormatError, UsageError
from fsdpck.runtime import pywarnings
from fsdpck.runtime.progress import NO_PROGRESS, Progress
from fsdpck.state.canonical import canonical

JSON_MAX_VALUES = 100_000  # a larger selection's values are printed summarised and left out of the JSON
TEXT_MAX_CHARS = 20_000  # an object's repr is cut here
PRECISION = 6  # digits after the point when values are printed


@dataclass(slots=True)
class ShowResult:
    """One key as ``fsdpck show`` read it."""

    location: str
    key: str
    kind: str | None = None  # "tensor" or "bytes"
    shape: tuple[int, ...] | None = None
    dtype: str | None = None
    n_chunks: int = 0
    slice_text: str | None = None
    selection: Selection | None = None
    chunks_read: int = 0
    bytes_read: int = 0
    stats: ValueStats | None = None
    text: str | None = None  # the values as torch prints them, or the object's repr
    values: Any = None  # the values as nested lists (complex: [re, im] pairs), when at most JSON_MAX_VALUES
    canonical: str | None = None  # an object's canonical text
    problems: list[Problem] = field(default_factory=list)  # this key's integrity problems
    other_problems: int = 0  # problems of the checkpoint that are not about this key
    error: str | None = None  # why its data could not be read
    timings: dict[str, float] = field(default_factory=dict)
    warnings: list[dict[str, Any]] = field(default_factory=list)

    @property
    def exit_code(self) -> int:
        return 1 if self.problems or self.error else 0

    @property
    def result_shape(self) -> tuple[int, ...] | None:
        return self.selection.shape if self.selection is not None else self.shape

    @property
    def values_omitted(self) -> bool:
        return self.kind == KIND_TENSOR and self.values is None and self.error is None and not self.problems


def show_key(location: str, key: str, *, slice_expr: str | None = None, width: int = 120,
             progress: Progress = NO_PROGRESS) -> ShowResult:
    """Read ``key`` of the checkpoint at ``location`` (a box of it with ``slice_expr``)."""
    t0 = time.perf_counter()
    storage = open_storage(location)
    check_location(storage)
    items = parse(slice_expr) if slice_expr is not None else None
    result = ShowResult(location=storage.url, key=key, slice_text=slice_expr)
    with pywarnings.captured() as seen:
        ckpt = open_checkpoint(storage, light=True)  # DCP's classes only if the read needs DCP's reader
        md = ckpt.metadata
        if md is None:
            result.problems = list(ckpt.problems)
            result.warnings = pywarnings.distinct(seen)
            return result
        info = md.keys.get(key)
        if info is None:
            close = difflib.get_close_matches(key, list(md.keys), n=3, cutoff=0.6)
            hint = f"; did you mean {', '.join(repr(c) for c in close)}?" if close else ""
            raise UsageError(f"KEY {key!r} is not in {ckpt.url} ({len(md.keys):,} keys; fsdpck inspect lists "
                             f"them){hint}")
        result.kind, result.shape, result.dtype, result.n_chunks = info.kind, info.shape, info.dtype, len(info.chunks)
        if info.kind == KIND_BYTES and items is not None:
            raise UsageError(f"--slice: {key!r} is an object, not a tensor: it has no dims to slice")
        result.problems = [p for p in ckpt.problems if p.key == key]
        result.other_problems = len(ckpt.problems) - len(result.problems)
        if not result.problems:
            t_read = time.perf_counter()
            if info.kind == KIND_TENSOR:
                shape = info.shape or ()
                result.selection = select(items, shape) if items is not None else Selection(
                    (0,) * len(shape), shape, (True,) * len(shape))
                _read_tensor(ckpt, info, result, width=width, progress=progress)
            else:
                _read_object(ckpt, info, result)
            result.timings["read_s"] = time.perf_counter() - t_read
        result.warnings = pywarnings.distinct(seen)
    result.timings["total_s"] = time.perf_counter() - t0
    return result


@contextmanager
def print_options(**options: Any) -> Iterator[None]:
    """torch's print options for a while, then back as they were."""
    import torch
    from torch._tensor_str import PRINT_OPTS

    saved = {name: getattr(PRINT_OPTS, name) for name in ("precision", "threshold", "edgeitems", "linewidth",
                                                          "sci_mode")}
    torch.set_printoptions(**options)
    try:
        yield
    finally:
        torch.set_printoptions(**saved)


def _read_tensor(ckpt: Any, info: Any, result: ShowResult, *, width: int, progress: Progress) -> None:
    import torch

    sel = result.selection
    box = Box(sel.offsets, sel.sizes)
    try:
        into = torch.empty(sel.sizes, dtype=getattr(torch, info.dtype or ""))
    except RuntimeError:
        # Only an empty selection can be too large for torch (a dim of 0 beside dims whose strides pass
        # int64, as a hostile header may claim): nothing to read, shown without a tensor.
        if box.numel:
            raise
        result.stats = ValueStats()
        result.text = f"tensor([], size={tuple(sel.shape)}, dtype=torch.{info.dtype})"
        result.values = []
        return
    request = Request(info, box, into=into)
    result.chunks_read = sum(1 for c in info.chunks if c.numel and box.numel and intersect(box, c) is not None)
    result.bytes_read = planned_bytes([request])
    errors = read_pieces(ckpt, [request], progress=progress, label="show: reading")
    if errors:
        result.error = errors[info.key]
        return
    values = request.into.reshape(sel.shape)
    result.stats = piece_stats(values)
    with print_options(precision=PRECISION, linewidth=max(40, width), threshold=1000, edgeitems=3):
        result.text = str(values)
    if values.numel() <= JSON_MAX_VALUES:
        result.values = (torch.view_as_real(values) if values.is_complex() else values).tolist()


def _read_object(ckpt: Any, info: Any, result: ShowResult) -> None:
    for _, raw, error in CheckpointReader(ckpt).byte_items([info]):
        if error is not None:
            result.error = error
            return
        result.bytes_read = len(raw)
        result.chunks_read = 1
        try:
            obj = decode(raw, key=info.key)
            result.canonical = canonical(obj)
        except CheckpointFormatError as e:
            result.error = e.message
            return
        except (ValueError, RecursionError):  # a value canonical() cannot write: shown by its repr alone
            result.canonical = None
        try:
            text = repr(obj)
        except Exception:  # a value whose repr fails is shown by its type
            text = f"<{type(obj).__name__}>"
        result.text = text if len(text) <= TEXT_MAX_CHARS else text[:TEXT_MAX_CHARS] + f"... ({len(text):,} characters)"
