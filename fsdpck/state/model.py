"""The three-layer model of the reference test, laid out on ranks, and how it trains.

``net1 = Linear(8, a) + ReLU``, ``net2 = Linear(a, b) + ReLU``, ``net3 = Linear(b, c) + ReLU``
with ``a, b, c = ws, 2·ws, 3·ws`` times a width multiplier. The dims are recorded in the
manifest so that a load at another world size rebuilds the same shapes.

Layouts (``registry.Layout``): FSDP1 wraps the whole model; FSDP2 shards net1, net2, net3 and
the root on a mesh: 1-D (``shard``), HSDP 2-D (``replicate`` × ``shard``: FSDP2 shards inside
each replica group and replicates across them), tensor parallel (``shard`` × ``tp``: net1 and
net3 column-wise, net2 row-wise on the ``tp`` dim, FSDP2 on the other), or all three. Every
rank of a TP group trains on the same batch, every data-parallel rank on its own.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from fsdpck.state.registry import DTYPES, OPTIMIZERS, Flow, Layout

IN_FEATURES = 8
BATCH = 8

_UNITS = {"b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12, "kib": 2**10, "mib": 2**20, "gib": 2**30,
          "tib": 2**40}


def parse_size(text: str) -> int:
    """'8GB', '500 MB', '1.5GiB', '1024' (bytes) -> bytes; ValueError with the accepted forms."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", text or "")
    unit = (m.group(2) or "b").lower() if m else ""
    if not m or unit not in _UNITS:
        raise ValueError(f"{text!r} is not a size such as 500MB, 8GB or 1.5GiB")
    value = float(m.group(1)) * _UNITS[unit]
    if value < 1:
        raise ValueError(f"{text!r} is less than one byte")
    return int(value)


@dataclass(frozen=True, slots=True)
class ModelDims:
    """Feature sizes: input, then the three layers' outputs."""

    inp: int
    a: int
    b: int
    c: int

    @classmethod
    def for_world(cls, world_size: int, width: int = 1) -> ModelDims:
        return cls(IN_FEATURES, world_size * width, 2 * world_size * width, 3 * world_size * width)

    def as_list(self) -> list[int]:
        return [self.inp, self.a, self.b, self.c]

    @classmethod
    def from_list(cls, dims: Any) -> ModelDims:
        if not isinstance(dims, list) or len(dims) != 4 or any(
                isinstance(d, bool) or not isinstance(d, int) or not 1 <= d <= 1 << 40 for d in dims):
            raise ValueError(f"model dims must be four positive integers, got {str(dims)[:80]}")
        return cls(*dims)

    def param_count(self) -> int:
        return (self.inp + 1) * self.a + (self.a + 1) * self.b + (self.b + 1) * self.c

    def param_shapes(self) -> dict[str, tuple[int, ...]]:
        """The model's parameters by FQN, as the checkpoint stores them."""
        return {"net1.0.weight": (self.a, self.inp), "net1.0.bias": (self.a,), "net2.0.weight": (self.b, self.a),
                "net2.0.bias": (self.b,), "net3.0.weight": (self.c, self.b), "net3.0.bias": (self.c,)}

    def describe(self) -> str:
        return f"{self.inp}→{self.a}→{self.b}→{self.c}"


def checkpoint_bytes(dims: ModelDims, *, optimizer: str, dtype: str) -> int:
    """Bytes of model + optimizer tensors the checkpoint holds (scalars and metadata aside)."""
    return dims.param_count() * DTYPES[dtype] * (1 + OPTIMIZERS[optimizer].state_tensors)


def width_for_size(target: int, *, world_size: int, optimizer: str, dtype: str) -> int:
    """The smallest width whose checkpoint is at least ``target`` bytes (at least 1)."""
    lo, hi = 1, 1
    while checkpoint_bytes(ModelDims.for_world(world_size, hi), optimizer=optimizer, dtype=dtype) < target:
        lo, hi = hi, hi * 2
    while lo < hi:
        mid = (lo + hi) // 2
        if checkpoint_bytes(ModelDims.for_world(world_size, mid), optimizer=optimizer, dtype=dtype) < target:
            lo = mid + 1
        else:
            hi = mid
    return lo


def build_model(dims: ModelDims, *, seed: int, dtype: str, device: Any) -> Any:
    """The unwrapped model, initialised identically on every rank from ``seed``."""
    import torch
    import torch.nn as nn

    class ThreeLayer(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.net1 = nn.Sequential(nn.Linear(dims.inp, dims.a), nn.ReLU())
            self.net2 = nn.Sequential(nn.Linear(dims.a, dims.b), nn.ReLU())
            self.net3 = nn.Sequential(nn.Linear(dims.b, dims.c), nn.ReLU())

        def forward(self, x):
            return self.net3(self.net2(self.net1(x)))

    # Every rank must start from the same weights: FSDP shards them, it does not sync them.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = ThreeLayer()
    return model.to(dtype=getattr(torch, dtype), device=device)


_MESHES: dict[tuple[Any, ...], Any] = {}


def device_mesh(layout: Layout, ctx) -> Any:
    """The mesh of a layout on this world (made once per process: each makes process groups)."""
    from torch.distributed.device_mesh import init_device_mesh

    shape = layout.mesh_shape(ctx.world_size)
    key = (ctx.device.type, shape, layout.mesh_dim_names())
    if key not in _MESHES:
        _MESHES[key] = init_device_mesh(ctx.device.type, shape, mesh_dim_names=layout.mesh_dim_names())
    return _MESHES[key]


def data_rank(layout: Layout, ctx) -> int:
    """Which batch this rank trains on: ranks of one TP group (the innermost mesh dim) share one."""
    return ctx.rank // layout.tp


def wrap(model: Any, flow: Flow, ctx) -> Any:
    """FSDP1 (ShardedTensor state) or FSDP2 on the flow's layout (DTensor state)."""
    if flow.fsdp == 1:
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

        # device_id is required on CPU: FSDP1 otherwise looks for an accelerator and refuses.
        return FSDP(model, device_id=ctx.device)
    from torch.distributed.fsdp import fully_shard

    layout = flow.layout
    mesh = device_mesh(layout, ctx)
    if layout.tp > 1:
        from torch.distributed.tensor import Replicate
        from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

        parallelize_module(model, mesh["tp"], {
            "net1.0": ColwiseParallel(),
            "net2.0": RowwiseParallel(),
            "net3.0": ColwiseParallel(output_layouts=Replicate()),
        })
    if layout.replicate > 1:
        dp_mesh = mesh["replicate", "shard"]
    else:
        dp_mesh = mesh["shard"] if layout.tp > 1 else mesh
    for layer in (model.net1, model.net2, model.net3):
        fully_shard(layer, mesh=dp_mesh)
    fully_shard(model, mesh=dp_mesh)
    return model


def batch(dims: ModelDims, flow: Flow, *, seed: int, step: int, ctx) -> Any:
    """The input of one step on this rank: seeded by (seed, data rank, step), the same for a TP group."""
    import torch

    gen = torch.Generator(device="cpu").manual_seed((seed * 1_000_003 + data_rank(flow.layout, ctx)) * 10_007 + step)
    return torch.rand(BATCH, dims.inp, generator=gen).to(dtype=getattr(torch, flow.dtype), device=ctx.device)


def train_steps(model: Any, optim: Any, dims: ModelDims, flow: Flow, *, seed: int, first_step: int, count: int,
                ctx, trainer: Any = None) -> None:
    """``count`` optimizer steps (forward, backward, step, zero_grad), from step number ``first_step``."""
    for step in range(first_step, first_step + count):
        model(batch(dims, flow, seed=seed, step=step, ctx=ctx)).sum().backward()
        optim.step()
        optim.zero_grad()
        if trainer is not None:
            trainer.after_step()


def release(net: Any) -> None:
    """Free the memory of an FSDP1 model that is no longer used (a no-op for FSDP2 and plain modules).

    FSDP1's flat parameters outlive the module: something outside Python's reach keeps them, and
    ``del`` plus ``gc.collect()`` leaves a model's worth of parameters (and gradients) allocated
    per model built, so that a matrix of flows, or a benchmark's repetitions, grow until the device
    is full. Their storage is freed here; the model must not be used afterwards. Nothing fsdpck
    keeps shares it: FSDP1's state dicts copy the parameters and the optimizer state.
    """
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    if not isinstance(net, FSDP):
        return
    for module in FSDP.fsdp_modules(net):
        handle = getattr(module, "_handle", None)
        flat = getattr(handle, "flat_param", None)
        if flat is None:
            continue
        for name in ("grad", "_local_shard", "_full_param_padded", "_padded_unsharded_grad", "_saved_grad_shard",
                     "_mp_shard", "_cpu_grad"):
            t = getattr(flat, name, None)
            if t is not None and t.untyped_storage().nbytes():
                t.untyped_storage().resize_(0)
        if flat.untyped_storage().nbytes():
            flat.untyped_storage().resize_(0)


def build(dims: ModelDims, flow: Flow, *, seed: int, ctx) -> tuple[Any, Any]:
    """A wrapped model and its optimizer (no steps taken)."""
    net = wrap(build_model(dims, seed=seed, dtype=flow.dtype, device=ctx.device), flow, ctx)
    return net, OPTIMIZERS[flow.optimizer].build(net.parameters())
