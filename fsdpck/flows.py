"""The ways optimizer state goes in and out of DCP.

A flow is one path a trainer takes: the FSDP wrapper (FSDP1 with ShardedTensor state,
or FSDP2 with DTensor state), the state-dict API (``legacy``: ``FSDP.optim_state_dict`` +
``load_sharded_optimizer_state_dict`` + ``FSDP.optim_state_dict_to_load``, as in the
reference test; ``dsd``: ``torch.distributed.checkpoint.state_dict``), the load planner
(DCP's default, or none), the optimizer, the dtype, and sync or async save.

Every function here returns the optimizer state as ``{"state": {fqn: {name: value}},
"param_groups": [...]}`` — the view the comparison works on.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from fsdpck.errors import UsageError

FSDP_VERSIONS = (1, 2)
APIS = ("legacy", "dsd")
PLANNERS = ("default", "none")
SAVE_MODES = ("sync", "async")


@dataclass(frozen=True, slots=True)
class Flow:
    fsdp: int = 1
    api: str = "legacy"
    planner: str = "default"
    optimizer: str = "adam"
    dtype: str = "float32"
    steps: int = 1
    save_mode: str = "sync"

    @property
    def name(self) -> str:
        """A short, path-safe name, used for subdirectories and table rows."""
        return f"fsdp{self.fsdp}-{self.api}-planner_{self.planner}-{self.save_mode}-{self.optimizer}-{self.dtype}"

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True, slots=True)
class WriterOptions:
    """FileSystemWriter options that change throughput; recorded in the JSON."""

    thread_count: int = 1
    sync_files: bool = True
    single_file_per_rank: bool = True


def invalid_reason(flow: Flow) -> str | None:
    """Why a combination cannot run, or None."""
    if flow.fsdp == 2 and flow.api == "legacy":
        return (
            "--fsdp 2 with --api legacy is impossible: the legacy functions (FSDP.optim_state_dict and "
            "friends) exist only for FSDP1; use --api dsd with FSDP2"
        )
    return None


def check(flow: Flow) -> None:
    reason = invalid_reason(flow)
    if reason:
        raise UsageError(reason)


OPTIMIZER_NAMES = ("adam", "adamw", "sgd", "adagrad", "rmsprop")
DTYPE_NAMES = ("float32", "bfloat16")


def select(*, matrix: bool, fsdp: int | None, api: str | None, planner: str, save_mode: str | None,
           optimizer: str, dtype: str, steps: int) -> list[Flow]:
    """The flows one launch runs.

    Without ``matrix``: one flow per requested planner (``both`` = default and none), the API
    defaulting to the one its FSDP version is used with. With ``matrix``: every valid
    combination of fsdp × api × planner × save mode, narrowed by any of those given
    explicitly (None = not given). ``optimizer``/``dtype`` may be ``all``.
    An impossible explicit combination is a usage error.
    """
    planners = list(PLANNERS) if planner == "both" else [planner]
    optimizers = list(OPTIMIZER_NAMES) if optimizer == "all" else [optimizer]
    dtypes = list(DTYPE_NAMES) if dtype == "all" else [dtype]
    if matrix:
        fsdps = [fsdp] if fsdp is not None else list(FSDP_VERSIONS)
        apis = [api] if api is not None else list(APIS)
        modes = [save_mode] if save_mode is not None else list(SAVE_MODES)
    else:
        fsdps = [fsdp or 1]
        apis = [api or ("legacy" if (fsdp or 1) == 1 else "dsd")]
        modes = [save_mode or "sync"]
    chosen = []
    for f in fsdps:
        for a in apis:
            probe = Flow(fsdp=f, api=a)
            if invalid_reason(probe):
                if not matrix or (fsdp is not None and api is not None):
                    check(probe)
                continue
            for p in planners:
                for m in modes:
                    for o in optimizers:
                        for d in dtypes:
                            chosen.append(Flow(fsdp=f, api=a, planner=p, optimizer=o, dtype=d, steps=steps, save_mode=m))
    return chosen


def _optim_view(osd: dict[str, Any]) -> dict[str, Any]:
    return {"state": dict(osd.get("state", {})), "param_groups": list(osd.get("param_groups", []))}


def state_for_save(model, optim, flow: Flow) -> tuple[dict[str, Any], dict[str, Any]]:
    """The ``{"model", "optim"}`` state dict to hand to DCP, and the optimizer view before the save."""
    if flow.api == "legacy":
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
        from torch.distributed.fsdp import StateDictType

        FSDP.set_state_dict_type(model, StateDictType.SHARDED_STATE_DICT)
        osd = FSDP.optim_state_dict(model, optim)
        return {"model": model.state_dict(), "optim": osd}, _optim_view(osd)
    from torch.distributed.checkpoint.state_dict import get_state_dict

    msd, osd = get_state_dict(model, optim)
    return {"model": msd, "optim": osd}, _optim_view(osd)


def _instrumented(cls, method: str, phase: str):
    """``cls`` whose data I/O leaves markers in the store (a rank that times out can then say which
    rank is still writing or reading) and runs a failure drill (FSDPCK_FAULT) at its start: the
    rank then fails while the other ranks are writing or reading, as a rank that dies mid-save."""
    import torch.distributed as dist

    from fsdpck import dist as fdist
    from fsdpck import faults

    def io(self, *args, **kwargs):
        fdist.mark_phase(f"{phase} (data I/O)")
        faults.maybe_inject(phase, dist.get_rank() if dist.is_initialized() else 0)
        result = getattr(cls, method)(self, *args, **kwargs)
        fdist.mark_phase(f"{phase} (waiting for the other ranks)")
        return result

    return type(f"Instrumented{cls.__name__}", (cls,), {method: io})


def file_reader(path: Path):
    import torch.distributed.checkpoint as dcp

    return _instrumented(dcp.FileSystemReader, "read_data", "load")(str(path))


def save(state: dict[str, Any], path: Path, flow: Flow, writer: WriterOptions) -> None:
    """DCP save (sync, or async and waited on) into ``path``."""
    import torch.distributed.checkpoint as dcp

    storage_writer = _instrumented(dcp.FileSystemWriter, "write_data", "save")(
        str(path),
        single_file_per_rank=writer.single_file_per_rank,
        sync_files=writer.sync_files,
        thread_count=writer.thread_count,
    )
    if flow.save_mode == "async":
        # The staging copy (device -> host) is part of what is checked: the loaded state
        # is compared with the live state the copy was taken from.
        future = dcp.async_save(state, storage_writer=storage_writer)
        future.result()
    else:
        dcp.save(state, storage_writer=storage_writer)


def _load_planner(flow: Flow):
    import torch.distributed.checkpoint as dcp

    return dcp.DefaultLoadPlanner() if flow.planner == "default" else None


def load_fresh(model, optim, path: Path, flow: Flow) -> dict[str, Any]:
    """Load model and optimizer state from ``path`` into a fresh model/optimizer; return the optimizer view after."""
    import torch.distributed.checkpoint as dcp

    if len(optim.state) != 0:
        raise RuntimeError("the fresh optimizer already has state before the load; the round trip would prove nothing")
    reader = file_reader(path)
    if flow.api == "legacy":
        from torch.distributed.checkpoint.optimizer import load_sharded_optimizer_state_dict
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
        from torch.distributed.fsdp import StateDictType

        FSDP.set_state_dict_type(model, StateDictType.SHARDED_STATE_DICT)
        # The model first: the optimizer state is laid out from the loaded model state dict.
        state = {"model": model.state_dict()}
        dcp.load(state, storage_reader=reader)
        model.load_state_dict(state["model"])
        optim_state = load_sharded_optimizer_state_dict(
            model_state_dict=state["model"],
            optimizer_key="optim",
            storage_reader=file_reader(path),
            planner=_load_planner(flow),
        )
        optim.load_state_dict(FSDP.optim_state_dict_to_load(model, optim, optim_state["optim"]))
        return _optim_view(FSDP.optim_state_dict(model, optim))
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    msd, osd = get_state_dict(model, optim)  # allocates the optimizer's state to load into
    state = {"model": msd, "optim": osd}
    dcp.load(state, storage_reader=reader, planner=_load_planner(flow))
    set_state_dict(model, optim, model_state_dict=state["model"], optim_state_dict=state["optim"])
    return _optim_view(get_state_dict(model, optim)[1])
