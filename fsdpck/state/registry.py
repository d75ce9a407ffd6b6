"""Every choice that shapes the state a run checks, spelled once: optimizers, dtypes, FSDP
wrappers, state-dict APIs, load planners, save modes and mesh layouts.

The command line's choices, the ``--matrix`` combinations, the README's tables and the
benchmark all derive from these tables; adding an optimizer is :func:`register_optimizer`
(or one entry below) and nothing else.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

# --- optimizers ------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class OptimizerSpec:
    """An optimizer fsdpck can train with: how to build it, and what state it keeps per parameter."""

    name: str
    factory: Callable[..., Any]  # factory(params) -> torch.optim.Optimizer
    hyper: dict[str, Any]  # the fixed hyper-parameters, as the README lists them
    state: tuple[str, ...]  # state entries per parameter
    state_tensors: int  # of those, tensors with the parameter's shape (for --size)

    def build(self, params: Any) -> Any:
        return self.factory(params, **self.hyper)


def _torch_optimizer(name: str) -> Callable[..., Any]:
    def factory(params: Any, **hyper: Any) -> Any:
        import torch

        return getattr(torch.optim, name)(params, **hyper)

    factory.__name__ = f"torch.optim.{name}"
    return factory


OPTIMIZERS: dict[str, OptimizerSpec] = {}


def register_optimizer(spec: OptimizerSpec) -> OptimizerSpec:
    """Make an optimizer a choice of ``--optimizer``, a value of ``--optimizer all`` and of the benchmark."""
    OPTIMIZERS[spec.name] = spec
    return spec


for _spec in (
    OptimizerSpec("adam", _torch_optimizer("Adam"), {"lr": 0.1}, ("exp_avg", "exp_avg_sq", "step"), 2),
    OptimizerSpec("adamw", _torch_optimizer("AdamW"), {"lr": 0.1, "weight_decay": 0.01},
                  ("exp_avg", "exp_avg_sq", "step"), 2),
    OptimizerSpec("sgd", _torch_optimizer("SGD"), {"lr": 0.1, "momentum": 0.9}, ("momentum_buffer",), 1),
    # Adagrad creates its state ("sum", "step") in its constructor, not at the first step.
    OptimizerSpec("adagrad", _torch_optimizer("Adagrad"), {"lr": 0.1}, ("sum", "step"), 1),
    OptimizerSpec("rmsprop", _torch_optimizer("RMSprop"), {"lr": 0.01, "alpha": 0.99}, ("square_avg", "step"), 1),
):
    register_optimizer(_spec)

DEFAULT_OPTIMIZER = "adam"  # as in PyTorch's reference test

# --- dtypes ------------------------------------------------------------------------------

DTYPES: dict[str, int] = {"float32": 4, "bfloat16": 2}  # name -> itemsize
DEFAULT_DTYPE = "float32"

# --- storage formats ------------------------------------------------------------------------

# dcp: DCP's own (a pickled .metadata, torch.save'd items); safetensors: DCP's Hugging Face storage,
# which holds tensors only (each rank's shards with their offsets in the JSON header).
FORMATS = ("dcp", "safetensors")
DEFAULT_FORMAT = "dcp"

# --- wrappers, state-dict APIs, planners --------------------------------------------------

FSDP_VERSIONS = (1, 2)
APIS = ("legacy", "dsd")
PLANNERS = ("default", "none")


def default_fsdp(layout: Layout | None) -> int:
    """The wrapper when none is named: FSDP1 (the reference test's), FSDP2 where a layout (HSDP, TP) needs it."""
    return 2 if layout is not None and not layout.is_plain else 1


def default_api(fsdp: int) -> str:
    """The API each wrapper is used with by default: the reference test's for FSDP1, DCP's state_dict API for FSDP2."""
    return "legacy" if fsdp == 1 else "dsd"


def wrapper_problem(fsdp: int, api: str) -> str | None:
    """Why a wrapper and an API cannot go together, or None."""
    if fsdp == 2 and api == "legacy":
        return ("--fsdp 2 with --api legacy is impossible: the legacy functions (FSDP.optim_state_dict and friends) "
                "exist only for FSDP1; use --api dsd with FSDP2")
    return None


# --- save modes ----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class SaveMode:
    """How the state reaches DCP: ``dcp.save``, or ``dcp.async_save`` with a checkpointer and a stager."""

    name: str
    summary: str
    asynchronous: bool = False
    checkpointer: str = "thread"  # async_checkpointer_type: thread | process
    stager: str | None = None  # None: DCP's own choice; "shared", "blocking", "pinned"
    needs_cuda: bool = False
    fsdp1: bool = True  # whether it can stage FSDP1's ShardedTensor state

    def problem(self, *, fsdp: int, cuda: bool) -> str | None:
        """Why this save mode cannot run here, or None."""
        if self.needs_cuda and not cuda:
            return f"--save-mode {self.name} stages into pinned CUDA host memory: it needs GPUs (--device cuda)"
        if fsdp == 1 and not self.fsdp1:
            return (f"--save-mode {self.name} uses DCP's DefaultStager, which cannot stage FSDP1's ShardedTensor state "
                    "(torch raises 'data_ptr ... not supported for ShardedTensor'): use it with --fsdp 2")
        return None


SAVE_MODES: dict[str, SaveMode] = {m.name: m for m in (
    SaveMode("sync", "dcp.save"),
    SaveMode("async", "dcp.async_save, thread checkpointer, DCP's default stager", True),
    SaveMode("async-process", "dcp.async_save, process checkpointer (a background process writes)", True, "process"),
    SaveMode("async-shm", "dcp.async_save, DefaultStager staging into shared memory", True, stager="shared",
             fsdp1=False),
    SaveMode("async-blocking", "dcp.async_save, BlockingAsyncStager", True, stager="blocking"),
    SaveMode("async-pinned", "dcp.async_save, DefaultStager with pinned memory and async staging (CUDA)", True,
             stager="pinned", needs_cuda=True, fsdp1=False),
)}
DEFAULT_SAVE_MODE = "sync"

# --- layouts -------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Layout:
    """How ranks hold the model: plain data parallel, HSDP (``replicate`` replicas), tensor parallel (``tp``)."""

    replicate: int = 1
    tp: int = 1

    @property
    def name(self) -> str:
        parts = ([f"hsdp{self.replicate}"] if self.replicate > 1 else []) + ([f"tp{self.tp}"] if self.tp > 1 else [])
        return "-".join(parts) or "plain"

    @property
    def is_plain(self) -> bool:
        return self.replicate == 1 and self.tp == 1

    def mesh_shape(self, world_size: int) -> tuple[int, ...]:
        """(replicate, shard, tp) without the dims of size 1 that the layout does not use."""
        shard = world_size // (self.replicate * self.tp)
        return tuple(n for n, used in ((self.replicate, self.replicate > 1), (shard, True), (self.tp, self.tp > 1))
                     if used)

    def mesh_dim_names(self) -> tuple[str, ...]:
        return tuple(n for n, used in (("replicate", self.replicate > 1), ("shard", True), ("tp", self.tp > 1)) if used)

    def problem(self, world_size: int, fsdp: int) -> str | None:
        """Why this layout cannot exist at this world size with this wrapper, or None."""
        if self.is_plain:
            return None
        if fsdp != 2:
            return (f"--replicate and --tp lay FSDP2 out on a device mesh; they need --fsdp 2 (got --fsdp {fsdp})")
        if world_size % (self.replicate * self.tp):
            return (f"world size {world_size} is not divisible by --replicate {self.replicate} × --tp {self.tp}: "
                    "the mesh would not be whole")
        return None

    def as_dict(self) -> dict[str, int]:
        return {"replicate": self.replicate, "tp": self.tp}


PLAIN = Layout()


def matrix_layouts(world_size: int) -> list[Layout]:
    """The layouts ``--matrix`` adds where the world size gives each mesh dim at least 2 ranks."""
    out = [PLAIN]
    if world_size % 2 == 0 and world_size >= 4:
        out += [Layout(replicate=2), Layout(tp=2)]
    if world_size % 8 == 0:
        out.append(Layout(replicate=2, tp=2))
    return out


@dataclass(frozen=True, slots=True)
class WriterOptions:
    """DCP file writer options that change throughput; recorded in the JSON."""

    thread_count: int = 1
    sync_files: bool = True
    single_file_per_rank: bool = True

    def as_dict(self) -> dict[str, Any]:
        return {"thread_count": self.thread_count, "sync_files": self.sync_files,
                "single_file_per_rank": self.single_file_per_rank}


# --- the flow -----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Flow:
    """One way a trainer's state goes through DCP: everything that shapes what is saved and how."""

    fsdp: int = 1
    api: str = "legacy"
    planner: str = "default"
    optimizer: str = DEFAULT_OPTIMIZER
    dtype: str = DEFAULT_DTYPE
    steps: int = 1
    save_mode: str = DEFAULT_SAVE_MODE
    layout: Layout = field(default=PLAIN)
    trainer_state: bool = False
    steps_during_save: int = 1  # async modes: optimizer steps taken while the write runs
    format: str = DEFAULT_FORMAT

    @property
    def name(self) -> str:
        """A short, path-safe name, used for subdirectories and table rows."""
        name = f"fsdp{self.fsdp}-{self.api}-planner_{self.planner}-{self.save_mode}-{self.optimizer}-{self.dtype}"
        if not self.layout.is_plain:
            name += f"-{self.layout.name}"
        return name + ("-trainer" if self.trainer_state else "") + ("-safetensors" if self.format == "safetensors" else "")

    @property
    def mode(self) -> SaveMode:
        return SAVE_MODES[self.save_mode]

    def as_dict(self) -> dict[str, Any]:
        return {"fsdp": self.fsdp, "api": self.api, "planner": self.planner, "optimizer": self.optimizer,
                "dtype": self.dtype, "steps": self.steps, "save_mode": self.save_mode, **self.layout.as_dict(),
                "trainer_state": self.trainer_state, "format": self.format,
                "steps_during_save": self.steps_during_save if self.mode.asynchronous else 0}

    def problem(self, world_size: int, *, optimizer: bool = True) -> str | None:
        """Why this flow cannot run at ``world_size``, or None (``optimizer=False``: whatever its optimizer)."""
        return (wrapper_problem(self.fsdp, self.api) or self.layout.problem(world_size, self.fsdp)
                or format_problem(self.format, api=self.api, trainer_state=self.trainer_state, fsdp=self.fsdp,
                                  optimizer=self.optimizer if optimizer else None))


def format_problem(fmt: str, *, api: str, trainer_state: bool, fsdp: int | None = None,
                   optimizer: str | None = None) -> str | None:
    """Why a storage format cannot hold a flow's state, or None (``fsdp``, ``optimizer``: when known)."""
    if fmt != "safetensors":
        return None
    if api == "legacy":
        return ("--format safetensors with --api legacy is impossible: load_sharded_optimizer_state_dict reads DCP's "
                "pickled .metadata, which the safetensors format does not have; use --api dsd")
    if trainer_state:
        return ("--format safetensors holds tensors only: the trainer state's scheduler and data position are not "
                "tensors; drop --trainer-state")
    if fsdp == 1 and optimizer in OPTIMIZERS and "step" in OPTIMIZERS[optimizer].state:
        return (f"--format safetensors with FSDP1 and --optimizer {optimizer} is impossible: FSDP1's optimizer state "
                f"dict gives every parameter of a flat parameter one shared 'step' tensor, and the safetensors writer "
                f"refuses tensors that share memory (DCP fails the save); use --fsdp 2, or an optimizer without a "
                f"step ({', '.join(n for n, o in OPTIMIZERS.items() if 'step' not in o.state)})")
    return None
