"""The rest of a resume state (``--trainer-state``): what a trainer checkpoints beside model and optimizer.

- an LR scheduler: warmup then cosine decay through ``LambdaLR`` (2 warmup steps, 100 in all),
  stepped after every optimizer step;
- the step counter (a 0-dim int64 tensor);
- the RNG states: torch's CPU generator, and the current CUDA device's where there is one
  (each training step draws from them, as dropout would); every rank seeds them alike, so
  DCP writes them once and every rank reads them back;
- the data position: a ``Stateful`` (epoch, sample index, shuffle seed), as a data loader's.

All of it goes through DCP under the ``trainer`` key and is compared like everything else.
"""

from __future__ import annotations

import math
from typing import Any

WARMUP_STEPS = 2
TOTAL_STEPS = 100
EPOCH_SAMPLES = 1024


def warmup_cosine(step: int) -> float:
    """The scheduler's factor on the base learning rate at ``step``."""
    warm = min(1.0, (step + 1) / WARMUP_STEPS)
    return warm * 0.5 * (1.0 + math.cos(math.pi * min(step, TOTAL_STEPS) / TOTAL_STEPS))


class DataPosition:
    """Where a data loader is: a ``Stateful`` DCP calls ``state_dict``/``load_state_dict`` on."""

    def __init__(self, seed: int):
        self.epoch = 0
        self.sample = 0
        self.seed = seed

    def advance(self, samples: int) -> None:
        self.sample += samples
        if self.sample >= EPOCH_SAMPLES:
            self.epoch, self.sample = self.epoch + 1, self.sample - EPOCH_SAMPLES

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "sample": self.sample, "seed": self.seed}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.epoch, self.sample, self.seed = int(state["epoch"]), int(state["sample"]), int(state["seed"])


class Trainer:
    """Scheduler, step counter, RNG and data position of one run."""

    def __init__(self, optim: Any, *, seed: int, device: Any, batch: int):
        import torch
        from torch.optim.lr_scheduler import LambdaLR

        torch.manual_seed(seed)
        if device.type == "cuda":
            torch.cuda.manual_seed(seed)
        self.device = device
        self.batch = batch
        self.scheduler = LambdaLR(optim, warmup_cosine)
        self.step = 0
        self.data = DataPosition(seed)

    def after_step(self) -> None:
        """What a training step does to the resume state beside the optimizer's."""
        import torch

        self.scheduler.step()
        self.step += 1
        self.data.advance(self.batch)
        torch.rand(1)  # the step's draw from the CPU generator (dropout's, a sampler's)
        if self.device.type == "cuda":
            torch.rand(1, device=self.device)

    def state_dict(self) -> dict[str, Any]:
        import torch

        rng: dict[str, Any] = {"cpu": torch.get_rng_state()}
        if self.device.type == "cuda":
            rng["cuda"] = torch.cuda.get_rng_state(self.device)
        return {"scheduler": self.scheduler.state_dict(), "step": torch.tensor(self.step, dtype=torch.int64),
                "rng": rng, "data": self.data.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        import torch

        self.scheduler.load_state_dict(state["scheduler"])
        self.step = int(state["step"])
        torch.set_rng_state(state["rng"]["cpu"])
        if self.device.type == "cuda" and "cuda" in state["rng"]:
            torch.cuda.set_rng_state(state["rng"]["cuda"], self.device)
        self.data.load_state_dict(state["data"])
