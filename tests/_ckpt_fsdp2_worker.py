"""A torchrun worker for tests/integration/test_offline_real.py: FSDP2 model + optimizer state saved with dcp.save.

Run on 3 ranks (gloo, CPU)::

    python -m torch.distributed.run --standalone --nproc_per_node=3 tests/_ckpt_fsdp2_worker.py OUT

It writes two checkpoints of the same state: ``OUT/ws3`` saved by all three ranks and
``OUT/ws2`` saved by ranks 0 and 1 alone (their own mesh and process group), so one launch
gives the tests FSDP2 DTensor checkpoints at two world sizes. The state is the same at
both: parameters from a fixed seed, gradients set from full tensors of a fixed seed and
sharded with ``distribute_tensor``, one Adam step (elementwise, so shard-local results
equal the unsharded ones bit for bit). Uneven dims (5 and 7 rows over 2 and 3 ranks) give
uneven chunks. Prints ``rank R OK`` when done.

It ends with ``os._exit`` instead of ``destroy_process_group``, which aborts about one run
in eight on the CI machine.
"""

from __future__ import annotations

import os
import sys
import traceback
import warnings


def build_and_save(out: str, mesh, group) -> None:
    import torch
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import distribute_tensor

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 5), torch.nn.ReLU(), torch.nn.Linear(5, 7), torch.nn.ReLU())
    for layer in model:
        if isinstance(layer, torch.nn.Linear):
            fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=3, gamma=0.5)
    gen = torch.Generator().manual_seed(1)
    for p in model.parameters():
        full = torch.randn(p.shape, generator=gen)
        p.grad = distribute_tensor(full, p.device_mesh, p.placements)
    opt.step()
    sched.step()
    model_sd, optim_sd = get_state_dict(model, opt)
    state = {"model": model_sd, "optim": optim_sd, "sched": sched.state_dict(), "step": 1}
    dcp.save(state, checkpoint_id=out, process_group=group)


def main() -> int:
    import torch.distributed as dist
    from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

    warnings.simplefilter("ignore")
    out = sys.argv[1]
    dist.init_process_group("gloo")
    rank, world_size = dist.get_rank(), dist.get_world_size()
    assert world_size == 3, f"this worker expects 3 ranks, got {world_size}"

    build_and_save(os.path.join(out, "ws3"), init_device_mesh("cpu", (3,)), None)
    pair = dist.new_group([0, 1])  # every rank must take part in creating it
    if rank in (0, 1):
        build_and_save(os.path.join(out, "ws2"), DeviceMesh.from_group(pair, "cpu"), pair)
    dist.barrier()
    print(f"rank {rank} OK", flush=True)
    return 0


if __name__ == "__main__":
    try:
        code = main()
    except BaseException:
        traceback.print_exc()
        code = 1
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
