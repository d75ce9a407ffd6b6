"""``fsdpck show --slice EXPR``: the expression, parsed strictly, and the box of the tensor it names.

An expression is one item per dim, separated by commas, for the leading dims (the dims left out
are taken whole)::

    I        one index (the dim is dropped from the result, as in Python)
    A:B      indices A to B-1 (either may be left out: A:  :B  :)

Negative numbers count from the end of the dim, as in Python (``-1`` is the last index). Unlike
Python, nothing is clamped: an index or a bound outside the dim, a start after the stop, a step
(``A:B:C``), ``...`` or anything else is an error naming the dim, before anything is read.
Torch-free: the command line checks the syntax before torch is imported.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from fsdpck.errors import UsageError

MAX_TEXT = 4096  # an expression longer than this is not a slice anyone typed (64 dims of "A:B")
_INT = r"[+-]?\d{1,18}"  # more digits than this is no dim of any tensor
_ITEM = re.compile(rf"\s*(?:(?P<index>{_INT})|(?P<start>{_INT})?\s*:\s*(?P<stop>{_INT})?)\s*")


@dataclass(frozen=True, slots=True)
class Item:
    """One dim's part of an expression: an index, or a range with optional ends."""

    index: int | None = None
    start: int | None = None
    stop: int | None = None

    @property
    def is_index(self) -> bool:
        return self.index is not None

    def text(self) -> str:
        if self.index is not None:
            return str(self.index)
        return f"{'' if self.start is None else self.start}:{'' if self.stop is None else self.stop}"


@dataclass(frozen=True, slots=True)
class Selection:
    """What an expression selects from a tensor of a given shape: a box, and the dims it keeps."""

    offsets: tuple[int, ...]
    sizes: tuple[int, ...]
    keep: tuple[bool, ...]  # False for a dim given by a single index (dropped from the result)

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(n for n, k in zip(self.sizes, self.keep) if k)


def shown(text: str, limit: int = 60) -> str:
    """An expression as an error message quotes it: cut short."""
    return repr(text if len(text) <= limit else text[: limit - 3] + "...")


def parse(text: str, *, option: str = "--slice") -> tuple[Item, ...]:
    """The items of an expression; UsageError (exit 2) naming ``option`` for anything else."""
    if len(text) > MAX_TEXT:
        raise UsageError(f"{option}: an expression of {len(text):,} characters is not a slice")
    if not text.strip():
        raise UsageError(f"{option} {shown(text)}: empty; give one item per leading dim, e.g. '0:4,:8'")
    items = []
    for n, part in enumerate(text.split(",")):
        m = _ITEM.fullmatch(part)
        if m is None:
            why = "steps are not supported" if part.count(":") > 1 else (
                "'...' is not supported" if "..." in part else "expected an index I or a range A:B")
            raise UsageError(f"{option} {shown(text)}: item {n} {shown(part.strip(), 30)}: {why}")
        if m.group("index") is not None:
            items.append(Item(index=int(m.group("index"))))
        else:
            start, stop = m.group("start"), m.group("stop")
            items.append(Item(start=None if start is None else int(start), stop=None if stop is None else int(stop)))
    return tuple(items)


def select(items: tuple[Item, ...], shape: tuple[int, ...], *, option: str = "--slice") -> Selection:
    """The box ``items`` name in a tensor of ``shape``; UsageError naming the dim for anything out of range."""
    text = shown(",".join(i.text() for i in items))
    if not shape:
        raise UsageError(f"{option} {text}: the tensor is a scalar; it has no dims to slice")
    if len(items) > len(shape):
        raise UsageError(f"{option} {text}: {len(items)} items for a tensor of {len(shape)} dims {list(shape)}")
    offsets, sizes, keep = [], [], []
    for dim, size in enumerate(shape):
        item = items[dim] if dim < len(items) else Item()
        where = f"{option} {text}: dim {dim} (size {size})"
        if item.index is not None:
            index = item.index + size if item.index < 0 else item.index
            if not 0 <= index < size:
                raise UsageError(f"{where}: index {item.index} is outside it")
            offsets.append(index)
            sizes.append(1)
            keep.append(False)
            continue
        start = 0 if item.start is None else (item.start + size if item.start < 0 else item.start)
        stop = size if item.stop is None else (item.stop + size if item.stop < 0 else item.stop)
        for name, given, value in (("start", item.start, start), ("stop", item.stop, stop)):
            if not 0 <= value <= size:
                raise UsageError(f"{where}: {name} {given} is outside it")
        if start > stop:
            raise UsageError(f"{where}: start {item.start} comes after stop {item.stop}")
        offsets.append(start)
        sizes.append(stop - start)
        keep.append(True)
    return Selection(tuple(offsets), tuple(sizes), tuple(keep))
