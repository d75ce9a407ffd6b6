"""A piece of a stored tensor as memory: an address, a dtype, sizes and strides — no torch needed.

The offline commands read a local checkpoint's chunks into buffers of their own and hand each
piece to C kernels (the fingerprint, the statistics) by address: ``inspect --verify-data``,
``inspect --stats`` and ``diff`` then never import torch, whose import alone takes longer than
reading a gigabyte from disk (docs/benchmarks.md, "Offline reads"). Where a piece must be a
tensor after all (a target to copy into, a dtype the kernels do not know, no C compiler),
:meth:`Piece.tensor` makes a view of the same memory. A piece read through DCP's reader is a
tensor already (:meth:`Piece.of_tensor`).

A piece is only valid while its owner (the buffer it lies in) is not reused: during the call
it is handed to.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any

from fsdpck.checkpoint.dtypes import COMPLEX_PARTS

def narrow_tensor(t: Any, offsets: tuple[int, ...], sizes: tuple[int, ...], origin: tuple[int, ...]) -> Any:
    """The view at global ``offsets`` of ``sizes`` in a tensor whose first element is at global ``origin``."""
    for dim, (start, length) in enumerate(zip(offsets, sizes)):
        t = t.narrow(dim, start - origin[dim], length)
    return t


@dataclass(frozen=True, slots=True)
class Piece:
    """Elements at ``address``: ``size`` and ``stride`` (in elements) per dim, of ``dtype``."""

    address: int
    dtype: str  # as torch names it without "torch."
    itemsize: int
    size: tuple[int, ...]
    stride: tuple[int, ...]
    owner: Any  # what keeps the memory alive: a buffer, or the tensor itself
    tensor_view: Any = None  # the tensor, when the piece was one to begin with

    @staticmethod
    def of_tensor(t: Any) -> Piece:
        """A CPU tensor as a piece (the same memory)."""
        return Piece(t.data_ptr(), str(t.dtype).removeprefix("torch."), t.element_size(), tuple(t.shape),
                     tuple(t.stride()), t, t)

    @property
    def numel(self) -> int:
        return math.prod(self.size)

    @property
    def contiguous(self) -> bool:
        """Row-major contiguous (dims of one element may have any stride)."""
        expected = 1
        for n, s in zip(reversed(self.size), reversed(self.stride)):
            if n != 1 and s != expected:
                return False
            expected *= n
        return True

    def narrow(self, offsets: tuple[int, ...], sizes: tuple[int, ...], origin: tuple[int, ...]) -> Piece:
        """The part at global ``offsets`` of ``sizes``, in a piece whose first element is at global ``origin``."""
        if offsets == origin and sizes == self.size:
            return self
        address = self.address + self.itemsize * sum((o - g) * s for o, g, s in zip(offsets, origin, self.stride))
        view = None if self.tensor_view is None else narrow_tensor(self.tensor_view, offsets, sizes, origin)
        return replace(self, address=address, size=tuple(sizes), tensor_view=view)

    def real_view(self) -> Piece:
        """A complex piece as its real parts (a last dim of 2); any other piece as it is."""
        part = COMPLEX_PARTS.get(self.dtype)
        if part is None:
            return self
        view = None
        if self.tensor_view is not None:
            import torch

            view = torch.view_as_real(self.tensor_view)
        return Piece(self.address, part, self.itemsize // 2, (*self.size, 2), (*(2 * s for s in self.stride), 1),
                     self.owner, view)

    def tensor(self) -> Any:
        """The piece as a CPU tensor over the same memory (imports torch)."""
        if self.tensor_view is not None:
            return self.tensor_view
        import ctypes

        import torch

        dtype = getattr(torch, self.dtype)
        if self.numel == 0:
            return torch.empty(self.size, dtype=dtype)
        # The span of memory the piece touches, from its first element (strides are never negative).
        span = (1 + sum((n - 1) * s for n, s in zip(self.size, self.stride))) * self.itemsize
        memory = (ctypes.c_ubyte * span).from_address(self.address)
        flat = torch.frombuffer(memory, dtype=torch.uint8).view(dtype)
        t = flat.as_strided(self.size, self.stride)
        t._fsdpck_owner = (memory, self.owner)  # type: ignore[attr-defined]  # kept alive with the view
        return t
