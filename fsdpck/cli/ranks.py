"""Options of the commands that run on ranks (verify, save, load), their checks, and the hand-off to the runner.

The choices come from ``fsdpck.state.registry``, read when the command line is parsed, so an
optimizer registered there is a choice here without another edit.
"""

from __future__ import annotations

import math
from typing import Any, Callable

import click

from fsdpck.cli.options import apply, json_option
from fsdpck.report.console import make_console
from fsdpck.runtime import launch
from fsdpck.runtime.dist import launched_by_torchrun
from fsdpck.runtime.runner import Presentation, run_distributed
from fsdpck.state import registry
from fsdpck.state.model import parse_size


class RegistryChoice(click.Choice):
    """A choice whose values are read from a registry table each time (``extra`` appended, e.g. "all")."""

    def __init__(self, table: Callable[[], Any], extra: tuple[str, ...] = ()):
        self._table = table
        self._extra = extra
        super().__init__(list(self.choices))

    @property
    def choices(self):  # type: ignore[override]
        return tuple(str(c) for c in self._table()) + self._extra

    @choices.setter
    def choices(self, value) -> None:  # click.Choice.__init__ assigns it
        pass


def _not_nan(ctx, param, value):
    if value is not None and math.isnan(value):  # click's FloatRange lets NaN through
        raise click.BadParameter("must be a number of seconds", ctx=ctx, param=param)
    return value


def _size(ctx, param, value):
    if value is None:
        return None
    try:
        return parse_size(value)
    except ValueError as e:
        raise click.BadParameter(str(e), ctx=ctx, param=param) from None


def given(name: str) -> bool:
    """Whether the option was given on the command line (not its default)."""
    return click.get_current_context().get_parameter_source(name) is not click.core.ParameterSource.DEFAULT


def check_width_or_size(size: int | None) -> None:
    if size is not None and given("width"):
        raise click.UsageError("--width and --size both choose the model's width: give one")


def run_options(schema: str) -> Callable:
    """Options of every command that runs on ranks: device, timeout, JSON, verbosity, -n."""
    return lambda f: apply(f, [
        click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True,
                     help="auto: cuda:LOCAL_RANK with NCCL where GPUs are present, else CPU with gloo."),
        click.option("--timeout", type=click.FloatRange(1, 86_400), default=300.0, show_default=True,
                     callback=_not_nan, help="Seconds any collective may wait before the run fails (exit 3)."),
        json_option(schema),
        click.option("-v", "--verbose", is_flag=True, help="Show PyTorch's warnings (hidden and counted by default)."),
        click.option("-n", "--nproc-per-node", "nproc", type=click.IntRange(1, 1024), default=None,
                     help="Start N workers on this host through PyTorch's elastic launcher and exit with their exact "
                          "fsdpck code (torchrun turns every failure into 1)."),
    ])


def layout_options(*, default_note: str) -> Callable:
    return lambda f: apply(f, [
        click.option("--replicate", type=click.IntRange(1, 1024), default=None,
                     help="HSDP: FSDP2 on a (R replicas × world/R shards) mesh" + default_note + "."),
        click.option("--tp", type=click.IntRange(1, 1024), default=None,
                     help="Tensor parallel degree T: net1/net3 column-wise, net2 row-wise on a T-rank mesh dim, "
                          "FSDP2 on the other" + default_note + "."),
    ])


def state_options(*, matrix: bool) -> Callable:
    """Options that shape the state that is saved."""
    every = ("all",) if matrix else ()
    each = "; all = each in turn." if matrix else "."
    return lambda f: apply(f, [
        click.option("--fsdp", type=click.Choice(["1", "2"]), default=None,
                     help="FSDP1 (FullyShardedDataParallel, ShardedTensor state; the default) or FSDP2 (fully_shard, "
                          "DTensor state; the default with --replicate or --tp)."),
        click.option("--api", type=click.Choice(list(registry.APIS)), default=None,
                     help="State-dict API: legacy (FSDP.optim_state_dict and friends, FSDP1 only) or dsd "
                          "(get_state_dict/set_state_dict). Default: legacy for FSDP1, dsd for FSDP2."),
        click.option("--optimizer", type=RegistryChoice(lambda: registry.OPTIMIZERS, every),
                     default=registry.DEFAULT_OPTIMIZER, show_default=True,
                     help="Optimizer, with fixed hyper-parameters (README)" + each),
        click.option("--dtype", type=RegistryChoice(lambda: registry.DTYPES, every), default=registry.DEFAULT_DTYPE,
                     show_default=True, help="dtype of parameters and optimizer state" + each),
        click.option("--steps", type=click.IntRange(1, 10_000), default=1, show_default=True,
                     help="Optimizer steps before the save."),
        click.option("--save-mode", type=RegistryChoice(lambda: registry.SAVE_MODES), default=None,
                     help="dcp.save (sync, the default) or dcp.async_save with a checkpointer and stager (README, "
                          "\"Save modes\")."),
        click.option("--steps-during-save", type=click.IntRange(0, 1000), default=1, show_default=True,
                     help="Async save modes: optimizer steps taken while the write is in flight."),
        click.option("--format", "storage_format", type=click.Choice(list(registry.FORMATS)),
                     default=registry.DEFAULT_FORMAT, show_default=True,
                     help="dcp (DCP's own files) or safetensors (DCP's Hugging Face storage: tensors only, so no "
                          "param groups and no --trainer-state; needs --api dsd)."),
        click.option("--trainer-state", is_flag=True,
                     help="Also save and compare an LR scheduler, the step counter, RNG states and a data position."),
        click.option("--width", type=click.IntRange(1, 1_000_000), default=1, show_default=True,
                     help="Multiplies the model dims (ws, 2·ws, 3·ws) to scale the checkpoint."),
        click.option("--size", "size", metavar="SIZE", default=None, callback=_size,
                     help="Pick --width so the checkpoint holds about SIZE of model + optimizer state (500MB, 8GB)."),
        click.option("--seed", type=click.IntRange(0, 2**31 - 1), default=0, show_default=True),
        click.option("--thread-count", type=click.IntRange(1, 256), default=1, show_default=True,
                     help="DCP writer threads per rank."),
        click.option("--sync-files/--no-sync-files", default=True, show_default=True, help="fsync each file DCP writes."),
        click.option("--single-file-per-rank/--no-single-file-per-rank", default=True, show_default=True,
                     help="One file per rank, or one per tensor."),
    ])


def layout_from(replicate: int | None, tp: int | None) -> registry.Layout | None:
    if replicate is None and tp is None:
        return None
    return registry.Layout(replicate=replicate or 1, tp=tp or 1)


def check_flow_options(fsdp: str | None, api: str | None, layout: registry.Layout | None, *,
                       storage_format: str | None = None, trainer_state: bool = False,
                       optimizer: str | None = None) -> None:
    """Combinations impossible at any world size: refused before anything starts (``optimizer``: one
    by name; ``all`` leaves it to the matrix, which skips the impossible ones)."""
    why = registry.wrapper_problem(int(fsdp), api) if fsdp and api else None
    if why is None and layout is not None and not layout.is_plain and fsdp == "1":
        why = layout.problem(1, 1)
    if why is None and storage_format is not None:
        wrapper = int(fsdp) if fsdp else registry.default_fsdp(layout)
        implied = api or registry.default_api(wrapper)
        plain = layout is None or layout.is_plain
        why = registry.format_problem(storage_format, api=implied if plain else "dsd", trainer_state=trainer_state,
                                      fsdp=wrapper, optimizer=None if optimizer == "all" else optimizer)
    if why:
        raise click.UsageError(why)


def writer_from(thread_count: int, sync_files: bool, single_file_per_rank: bool) -> registry.WriterOptions:
    return registry.WriterOptions(thread_count=thread_count, sync_files=sync_files, single_file_per_rank=single_file_per_rank)


def launch_if_asked(nproc: int | None) -> None:
    """-n N: run this very command line in N workers started by fsdpck, and exit with their code."""
    if nproc is None or launch.is_worker():
        return
    ctx = click.get_current_context()
    if launched_by_torchrun():
        raise click.UsageError("-n/--nproc-per-node starts its own workers; it cannot be used under torchrun", ctx=ctx)
    ctx.exit(launch.run_workers(nproc, list(ctx.find_root().command.raw_args)))


def run_on_ranks(command: str, body: Callable[[Any], Any], *, present: Callable[..., Presentation], device: str,
                 timeout: float, json_target: str | None, verbose: bool) -> None:
    """Hand a command's work to the per-rank runner and exit with this rank's code."""
    code = run_distributed(command, body, device=device, timeout=timeout, json_target=json_target, verbose=verbose,
                           present=present, out=make_console(stderr=json_target == "-"), err=make_console(stderr=True))
    click.get_current_context().exit(code)
