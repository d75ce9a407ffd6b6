"""A torchrun worker for tests/test_fingerprint.py: partial fingerprints of uneven shards add up.

Run on 3 ranks (gloo, CPU)::

    python -m torch.distributed.run --standalone --nproc_per_node=3 tests/_fp_dtensor_worker.py

Each rank fingerprints its own shard of DTensors whose sharded dim does not divide by the
world size (one rank's shard is empty for 2 rows over 3 ranks), of a replicated DTensor and
of a ShardedTensor that one rank holds nothing of; one ``allreduce_sum_u64`` must give
``fp_tensor`` of the full tensor on every rank. Prints ``rank R OK N`` on success.

It ends with ``os._exit`` instead of ``destroy_process_group``: on the CI machine the
latter aborts about one run in eight, which would make the test flaky for no fault of the
fingerprint.
"""

from __future__ import annotations

import os
import sys
import traceback
import warnings


def main() -> int:
    import torch
    import torch.distributed as dist
    from torch.distributed._shard.sharded_tensor import Shard as ShardedTensorShard
    from torch.distributed._shard.sharded_tensor import init_from_local_shards
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    from fsdpck.fingerprint import allreduce_sum_u64, fp_local, fp_tensor

    dist.init_process_group("gloo")
    rank, world_size = dist.get_rank(), dist.get_world_size()
    assert world_size == 3, f"this worker expects 3 ranks, got {world_size}"
    mesh = init_device_mesh("cpu", (world_size,))

    # Every rank builds the same full tensors from the same seed.
    gen = torch.Generator().manual_seed(1234)
    cases = {
        "2x5 Shard(0): one empty shard": (torch.randn(2, 5, generator=gen), [Shard(0)]),
        "7x3 Shard(0): 3, 3, 1 rows": (torch.randn(7, 3, generator=gen), [Shard(0)]),
        "4x7 Shard(1) bf16: 3, 3, 1 cols": (torch.randn(4, 7, generator=gen).bfloat16(), [Shard(1)]),
        "4 int8 Shard(0): 2, 2, 0": (torch.randint(-128, 128, (4,), dtype=torch.int8, generator=gen), [Shard(0)]),
        "3x2x5 Shard(2): 2, 2, 1": (torch.randn(3, 2, 5, generator=gen, dtype=torch.float64), [Shard(2)]),
        "5x4 Replicate": (torch.randn(5, 4, generator=gen), [Replicate()]),
    }
    names, partials, expected = [], [], []
    for name, (full, placements) in cases.items():
        dt = distribute_tensor(full, mesh, placements)
        names.append(name)
        partials.append(fp_local(dt))
        expected.append(fp_tensor(full))

    # A ShardedTensor as FSDP1 makes them: rows 0:4 on rank 0, 4:7 on rank 1, none on rank 2.
    full = torch.randn(7, 3, generator=gen)
    rows = {0: (0, 4), 1: (4, 7)}.get(rank)
    local = [] if rows is None else [ShardedTensorShard.from_tensor_and_offsets(full[rows[0] : rows[1]].clone(), [rows[0], 0], rank)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        st = init_from_local_shards(local, 7, 3)
    names.append("7x3 ShardedTensor: 4, 3, 0 rows")
    partials.append(fp_local(st))
    expected.append(fp_tensor(full))

    totals = allreduce_sum_u64(partials)
    bad = [f"{n}: got {t:016x}, want {e:016x}" for n, t, e in zip(names, totals, expected) if t != e]
    if bad:
        _say(f"rank {rank} FAIL " + "; ".join(bad))
        return 1
    _say(f"rank {rank} OK {len(names)}")
    return 0


def _say(line: str) -> None:
    # One write per line: the ranks share torchrun's stdout, and print() may split a line
    # from its newline, interleaving ranks' lines.
    sys.stdout.flush()
    os.write(sys.stdout.fileno(), (line + "\n").encode())


if __name__ == "__main__":
    try:
        code = main()
    except BaseException:
        traceback.print_exc()
        code = 1
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
