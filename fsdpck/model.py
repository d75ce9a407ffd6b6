"""The three-layer model of the reference test, its FSDP wrapping and its optimizers.

``net1 = Linear(8, a) + ReLU``, ``net2 = Linear(a, b) + ReLU``, ``net3 = Linear(b, c) + ReLU``
with ``a, b, c = ws, 2·ws, 3·ws`` times a width multiplier. The dims are recorded in the
manifest so that a load at another world size rebuilds the same shapes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

IN_FEATURES = 8
BATCH = 8

# Fixed hyper-parameters per optimizer (README, "Optimizers"). Each brings state of
# another shape: Adam/AdamW exp_avg, exp_avg_sq and a step scalar; SGD momentum_buffer;
# Adagrad sum and step; RMSprop square_avg and step.
OPTIMIZERS: dict[str, dict[str, Any]] = {
    "adam": {"lr": 0.1},
    "adamw": {"lr": 0.1, "weight_decay": 0.01},
    "sgd": {"lr": 0.1, "momentum": 0.9},
    "adagrad": {"lr": 0.1},
    "rmsprop": {"lr": 0.01, "alpha": 0.99},
}

# Tensors of optimizer state per parameter, each the parameter's shape (scalars not counted).
STATE_TENSORS = {"adam": 2, "adamw": 2, "sgd": 1, "adagrad": 1, "rmsprop": 1}
_ITEMSIZE = {"float32": 4, "bfloat16": 2}

_UNITS = {"b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12, "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def parse_size(text: str) -> int:
    """'8GB', '500 MB', '1.5GiB', '1024' (bytes) -> bytes; ValueError with the accepted forms."""
    import re

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
    def from_list(cls, dims: list[int]) -> ModelDims:
        if len(dims) != 4 or any(not isinstance(d, int) or d < 1 for d in dims):
            raise ValueError(f"model dims must be four positive integers, got {dims!r}")
        return cls(*dims)

    def param_count(self) -> int:
        return (self.inp + 1) * self.a + (self.a + 1) * self.b + (self.b + 1) * self.c


def checkpoint_bytes(dims: ModelDims, *, optimizer: str, dtype: str) -> int:
    """Bytes of model + optimizer tensors the checkpoint holds (scalars and metadata aside)."""
    return dims.param_count() * _ITEMSIZE[dtype] * (1 + STATE_TENSORS[optimizer])


def width_for_size(target: int, *, world_size: int, optimizer: str, dtype: str) -> int:
    """The smallest --width whose checkpoint is at least ``target`` bytes (at least 1)."""
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


def build_model(dims: ModelDims, *, seed: int, dtype: str, device):
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


def wrap(model, *, fsdp: int, device, world_size: int):
    """FSDP1 (FullyShardedDataParallel, ShardedTensor state) or FSDP2 (fully_shard, DTensor state)."""
    if fsdp == 1:
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

        # device_id is required on CPU: FSDP1 otherwise looks for an accelerator and refuses.
        return FSDP(model, device_id=device)
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(device.type, (world_size,))
    for layer in (model.net1, model.net2, model.net3):
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def build_optimizer(name: str, params):
    import torch

    classes = {
        "adam": torch.optim.Adam,
        "adamw": torch.optim.AdamW,
        "sgd": torch.optim.SGD,
        "adagrad": torch.optim.Adagrad,
        "rmsprop": torch.optim.RMSprop,
    }
    return classes[name](params, **OPTIMIZERS[name])


def train_steps(model, optim, *, steps: int, seed: int, rank: int, dims: ModelDims, dtype: str, device) -> None:
    """``steps`` optimizer steps on seeded inputs (each rank its own batch, as data parallelism does)."""
    import torch

    gen = torch.Generator(device="cpu").manual_seed(seed * 1_000_003 + rank)
    for _ in range(steps):
        x = torch.rand(BATCH, dims.inp, generator=gen).to(dtype=getattr(torch, dtype), device=device)
        model(x).sum().backward()
        optim.step()
        optim.zero_grad()


def trained(dims: ModelDims, flow, *, seed: int, ctx):
    """The wrapped model and its optimizer after ``flow.steps`` steps: the state every command saves."""
    net = wrap(build_model(dims, seed=seed, dtype=flow.dtype, device=ctx.device),
               fsdp=flow.fsdp, device=ctx.device, world_size=ctx.world_size)
    optim = build_optimizer(flow.optimizer, net.parameters())
    train_steps(net, optim, steps=flow.steps, seed=seed, rank=ctx.rank, dims=dims, dtype=flow.dtype, device=ctx.device)
    return net, optim


def fresh(dims: ModelDims, flow, *, seed: int, ctx):
    """A wrapped model and an optimizer with no state yet, to load into."""
    net = wrap(build_model(dims, seed=seed, dtype=flow.dtype, device=ctx.device),
               fsdp=flow.fsdp, device=ctx.device, world_size=ctx.world_size)
    return net, build_optimizer(flow.optimizer, net.parameters())
