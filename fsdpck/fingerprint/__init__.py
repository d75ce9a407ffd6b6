"""The exact, sharding-invariant fingerprint of a tensor (DESIGN.md, "The fingerprint").

Every element at global row-major index i with raw bits b contributes
``mix(b ^ mix(i + 1))`` (SplitMix64's finaliser); the fingerprint is the sum mod 2**64. A
shard, a DCP storage chunk or any piece of either contributes a partial sum from its global
offsets alone, and the partial sums of any split add up to the same value: each rank
fingerprints what it holds and one collective of scalars gives the whole
(``fsdpck.runtime.collectives.allreduce_sum_u64``); how a DTensor or ShardedTensor splits
into such pieces is ``fsdpck.state.shards``.

    fp_chunk(t, global_shape=S, offsets=o)   # a piece of a tensor of shape S, at offsets o
    fp_tensor(t)                             # a whole tensor
    to_hex(x)                                # '0123456789abcdef'

Modules: ``reference`` (the definition in plain Python), ``torch_path``, ``ckernel`` (CPU),
``triton_kernel`` (CUDA), ``dispatch`` (which path runs, and the dispatch to it). Importing this
package does not import torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from fsdpck.fingerprint.dispatch import BACKEND_ENV, backend, backend_detail, fp_chunk, fp_chunk_stats, fp_piece
from fsdpck.fingerprint.reference import MASK64, fp_reference, mix64, to_hex

if TYPE_CHECKING:
    import torch

__all__ = ["BACKEND_ENV", "MASK64", "backend", "backend_detail", "fp_chunk", "fp_chunk_stats", "fp_piece", "fp_reference",
           "fp_tensor", "mix64", "to_hex"]


def fp_tensor(t: torch.Tensor) -> int:
    """The fingerprint of a whole plain tensor (its own shape is the global shape)."""
    return fp_chunk(t, global_shape=tuple(t.shape), offsets=(0,) * t.dim())
