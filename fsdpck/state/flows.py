"""The ways a trainer's state goes in and out of DCP, and which of them a launch runs.

A flow (``registry.Flow``) is one path: the FSDP wrapper (FSDP1, ShardedTensor state; FSDP2,
DTensor state, on a mesh layout), the state-dict API (``legacy``: ``FSDP.optim_state_dict`` +
``load_sharded_optimizer_state_dict`` + ``FSDP.optim_state_dict_to_load``, as the reference
test; ``dsd``: ``torch.distributed.checkpoint.state_dict``), the load planner (DCP's default,
or none), the optimizer, the dtype, the save mode (sync, or async with a checkpointer and a
stager, the state moving on while the write runs) and the trainer state.

Every load target is filled with a poison pattern (all bits set) before DCP reads into it,
here for the state dicts fsdpck builds and in fsdpck's DCP reader for those DCP builds itself
(``load_sharded_optimizer_state_dict``): a value that a load silently did not write shows
as a difference, whatever the fresh model or optimizer held before.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import tempfile
from typing import Any, Callable

from fsdpck.checkpoint.dcp_io import fill_all_bits_
from fsdpck.errors import UsageError
from fsdpck.state import registry
from fsdpck.state.registry import APIS, FSDP_VERSIONS, PLANNERS, SAVE_MODES, Flow, Layout, WriterOptions
from fsdpck.state.shards import decompose
from fsdpck.state.summary import flatten


def select(*, matrix: bool, world_size: int, cuda: bool, fsdp: int | None = None, api: str | None = None,
           planner: str = "both", save_mode: str | None = None, optimizer: str = registry.DEFAULT_OPTIMIZER,
           dtype: str = registry.DEFAULT_DTYPE, steps: int = 1, layout: Layout | None = None,
           trainer_state: bool = False, steps_during_save: int = 1, format: str = registry.DEFAULT_FORMAT) -> list[Flow]:
    """The flows one launch runs.

    Without ``matrix``: one flow per requested planner (``both`` = default and none), with the
    API each wrapper is used with by default; a mesh layout implies FSDP2. With ``matrix``:
    every valid combination of wrapper × API × planner × save mode × layout, narrowed by any
    of those given (None = not given); ``optimizer``/``dtype`` may be ``all``. An impossible
    explicit combination is a usage error; the matrix skips impossible ones it made itself.
    """
    planners = list(PLANNERS) if planner == "both" else [planner]
    optimizers = list(registry.OPTIMIZERS) if optimizer == "all" else [optimizer]
    dtypes = list(registry.DTYPES) if dtype == "all" else [dtype]
    if matrix:
        fsdps = [fsdp] if fsdp is not None else list(FSDP_VERSIONS)
        apis = [api] if api is not None else list(APIS)
        modes = [save_mode] if save_mode is not None else list(SAVE_MODES)
        layouts = [layout] if layout is not None else registry.matrix_layouts(world_size)
    else:
        first = fsdp or registry.default_fsdp(layout)
        fsdps, apis = [first], [api or registry.default_api(first)]
        modes, layouts = [save_mode or registry.DEFAULT_SAVE_MODE], [layout or registry.PLAIN]
    explicit = not matrix or (fsdp is not None and api is not None)
    chosen = []
    for f in fsdps:
        for a in apis:
            for lay in layouts:
                probe = Flow(fsdp=f, api=a, layout=lay, format=format, trainer_state=trainer_state)
                why = probe.problem(world_size, optimizer=False)  # the optimizer's part: per optimizer, below
                if why:
                    if explicit or (layout is not None and not layout.is_plain and f == fsdp):
                        raise UsageError(why)
                    continue
                for m in modes:
                    why = SAVE_MODES[m].problem(fsdp=f, cuda=cuda)
                    if why:
                        if save_mode is not None and (not matrix or fsdp is not None):
                            raise UsageError(why)
                        continue
                    for p in planners:
                        for o in optimizers:
                            why = registry.format_problem(format, api=a, trainer_state=trainer_state, fsdp=f,
                                                          optimizer=o)
                            if why:
                                if optimizer != "all" and explicit:
                                    raise UsageError(why)
                                continue
                            for d in dtypes:
                                chosen.append(Flow(fsdp=f, api=a, planner=p, optimizer=o, dtype=d, steps=steps,
                                                   save_mode=m, layout=lay, trainer_state=trainer_state,
                                                   steps_during_save=steps_during_save, format=format))
    if not chosen:
        raise UsageError(f"no flow fits these options at world size {world_size}")
    return chosen


def state_dict(model: Any, optim: Any, flow: Flow, trainer: Any = None) -> dict[str, Any]:
    """The ``{"model", "optim"[, "trainer"]}`` state dict a trainer hands to DCP, through the flow's API."""
    if flow.api == "legacy":
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
        from torch.distributed.fsdp import StateDictType

        FSDP.set_state_dict_type(model, StateDictType.SHARDED_STATE_DICT)
        state = {"model": model.state_dict(), "optim": FSDP.optim_state_dict(model, optim)}
    else:
        from torch.distributed.checkpoint.state_dict import get_state_dict

        msd, osd = get_state_dict(model, optim)
        state = {"model": msd, "optim": osd}
    if flow.format == "safetensors":
        state["optim"] = {"state": state["optim"]["state"]}  # the format holds tensors only: no param groups
    if trainer is not None:
        state["trainer"] = trainer.state_dict()
    return state


_ASYNC_GROUP: list[tuple[Any, Any]] = []  # (the world group it was made under, the group)


def async_group() -> Any:
    """A gloo process group of its own for async saves, made once (a collective: every rank calls it).

    The write runs in a background thread while training goes on: its collectives (plans, the
    final barrier) on the training's process group would interleave with the training's own
    and deadlock. Trainers give async checkpointing a group of its own, as here.
    """
    import torch.distributed as dist

    world = dist.group.WORLD  # a new world (one process, many runs) needs a new group
    if not _ASYNC_GROUP or _ASYNC_GROUP[0][0] is not world:
        _ASYNC_GROUP[:] = [(world, dist.new_group(backend="gloo"))]
    return _ASYNC_GROUP[0][1]


def _stager(name: str | None) -> Any:
    if name is None:
        return None
    from torch.distributed.checkpoint.staging import BlockingAsyncStager, DefaultStager, StagingOptions

    if name == "blocking":
        return BlockingAsyncStager()
    if name == "shared":
        return DefaultStager(StagingOptions(use_pinned_memory=False, use_shared_memory=True, use_async_staging=False,
                                            use_non_blocking_copy=False))
    if name == "pinned":
        return DefaultStager(StagingOptions(use_pinned_memory=True, use_shared_memory=False, use_async_staging=True,
                                            use_non_blocking_copy=True))
    raise ValueError(f"stager {name!r}")


def save(state: dict[str, Any], storage: Any, flow: Flow, writer: WriterOptions, *,
         during: Callable[[], None] | None = None) -> None:
    """DCP save into ``storage``: ``dcp.save``, or ``dcp.async_save`` as training runs it.

    Async: once ``async_save`` returns (and staging has completed, where DCP separates it),
    ``during()`` runs while the write is in flight (the optimizer steps that mutate the live
    state in place), then the write is waited on.
    """
    import torch.distributed.checkpoint as dcp

    storage_writer = storage.dcp_writer(format=flow.format, **writer.as_dict())
    mode = flow.mode
    if not mode.asynchronous:
        dcp.save(state, storage_writer=storage_writer)
        if during is not None:
            during()
        return
    from torch.distributed.checkpoint.state_dict_saver import AsyncCheckpointerType

    stager = _stager(mode.stager)
    kind = AsyncCheckpointerType.PROCESS if mode.checkpointer == "process" else AsyncCheckpointerType.THREAD
    if mode.checkpointer == "process":
        quiet_async_process()
    gate = None
    if during is not None:
        gate = os.path.join(tempfile.gettempdir(), f".fsdpck-gate-{os.getpid()}-{secrets.token_hex(6)}")
        storage_writer.gate = gate  # the write starts only once the steps below are done
    try:
        response = dcp.async_save(state, storage_writer=storage_writer, async_checkpointer_type=kind,
                                  async_stager=stager, process_group=async_group())
        upload = getattr(response, "upload_completion", response)
        staging = getattr(response, "staging_completion", None)
        if staging is not None:
            staging.result()  # the stager's copy is done: training may go on
        if during is not None:
            during()
            open(gate, "x").close()
        upload.result()
    finally:
        if gate is not None:
            with contextlib.suppress(OSError):
                if not os.path.exists(gate):
                    open(gate, "x").close()  # never leave a write waiting
                os.unlink(gate)
        if stager is not None:
            stager.close()


def _quiet_checkpointing_subprocess(*args: Any, **kwargs: Any) -> Any:
    """DCP's checkpointer process, with its INFO lines ("Waiting for checkpoint save request...") kept
    out of the job's log: the process is spawned with this function (found by name, in this module),
    which filters the root logger and then runs DCP's own loop."""
    import logging

    import torch.distributed.checkpoint._async_process_executor as executor

    logging.getLogger().addFilter(lambda record: record.levelno >= logging.WARNING)
    return executor._AsyncCheckpointProcess._checkpointing_subprocess(*args, **kwargs)


def quiet_async_process() -> None:
    """Start DCP's checkpointer process through :func:`_quiet_checkpointing_subprocess` (presentation only:
    where this torch has another layout, its lines simply show)."""
    import torch.distributed.checkpoint._async_process_executor as executor

    cls = getattr(executor, "_AsyncCheckpointProcess", None)
    if cls is not None and hasattr(cls, "_checkpointing_subprocess"):
        cls._checkpointing_subprocess = staticmethod(_quiet_checkpointing_subprocess)


def stop_async_process() -> None:
    """End DCP's async checkpointer process, if one was started (it would outlive a hard exit)."""
    import torch.distributed.checkpoint._async_process_executor as executor

    process = getattr(executor, "_CHECKPOINT_PROCESS", None)
    if process is None:
        return
    executor._CHECKPOINT_PROCESS = None
    try:
        process.__del__()  # sends TERMINATE and joins, SIGTERM after 5 s
    except Exception:  # already gone
        pass


def poison_(state: dict[str, Any], *, rank: int) -> None:
    """Fill every tensor of a load target with all bits set (NaN with a payload, -1 for integers)."""
    for value in flatten(state).values():
        view = decompose(value, rank=rank)
        for _, t in view.pieces:
            fill_all_bits_(t)


def _reader(storage: Any, flow: Flow) -> Any:
    reader = storage.dcp_reader(format=flow.format)
    reader.poison = True  # targets DCP allocates itself are poisoned before they are read into
    return reader


def _planner(flow: Flow) -> Any:
    import torch.distributed.checkpoint as dcp

    return dcp.DefaultLoadPlanner() if flow.planner == "default" else None


def load_into(model: Any, optim: Any, storage: Any, flow: Flow, *, rank: int, trainer: Any = None) -> None:
    """Load model and optimizer (and trainer) state from ``storage`` into a fresh model and optimizer."""
    import torch.distributed.checkpoint as dcp

    if flow.api == "legacy":
        from torch.distributed.checkpoint.optimizer import load_sharded_optimizer_state_dict
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
        from torch.distributed.fsdp import StateDictType

        FSDP.set_state_dict_type(model, StateDictType.SHARDED_STATE_DICT)
        # The model first: the optimizer state is laid out from the loaded model state dict.
        state = {"model": model.state_dict()}
        poison_(state, rank=rank)
        dcp.load(state, storage_reader=_reader(storage, flow))
        model.load_state_dict(state["model"])
        optim_state = load_sharded_optimizer_state_dict(model_state_dict=state["model"], optimizer_key="optim",
                                                        storage_reader=_reader(storage, flow), planner=_planner(flow))
        del state  # the model's copy is in the model now: let it go before the optimizer state is flattened
        optim_state = FSDP.optim_state_dict_to_load(model, optim, optim_state["optim"])
        optim.load_state_dict(optim_state)
        if trainer is not None:
            extra = {"trainer": trainer.state_dict()}
            poison_(extra, rank=rank)
            dcp.load(extra, storage_reader=_reader(storage, flow), planner=_planner(flow))
            trainer.load_state_dict(extra["trainer"])
        return
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    msd, osd = get_state_dict(model, optim)  # allocates the optimizer's state to load into
    state = {"model": msd, "optim": osd}
    if flow.format == "safetensors":
        state["optim"] = {"state": osd["state"]}  # the format holds tensors only: the groups stay the fresh ones
    if trainer is not None:
        state["trainer"] = trainer.state_dict()
    poison_(state, rank=rank)
    dcp.load(state, storage_reader=_reader(storage, flow), planner=_planner(flow))
    set_state_dict(model, optim, model_state_dict=state["model"],
                   optim_state_dict={"state": state["optim"]["state"], "param_groups": osd["param_groups"]})
    if trainer is not None:
        trainer.load_state_dict(state["trainer"])
