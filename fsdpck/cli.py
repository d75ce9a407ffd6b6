"""fsdpck's command line: click commands only — options, validation, exit codes.

Each command parses its options, calls one library function, hands the result to a
renderer and exits with the code of DESIGN.md. Errors leave through one boundary
(``FsdpckGroup.invoke``): fsdpck's own exceptions become a one-paragraph message and
their exit code; anything else is a runtime failure (exit 3). ``FSDPCK_DEBUG=1`` adds
the traceback.
"""

from __future__ import annotations

import math
import os
import sys
import traceback

import click

from fsdpck import __version__
from fsdpck.errors import EXIT_RUNTIME, EXIT_USAGE, FsdpckError
from fsdpck.output import check_json_target

CONTEXT_SETTINGS = {"help_option_names": ["-h", "--help"], "max_content_width": 100}


def debug_enabled() -> bool:
    return os.environ.get("FSDPCK_DEBUG", "") not in ("", "0")


def report_error(message: str, *, code: int) -> None:
    """Print an error paragraph on stderr, with the traceback under FSDPCK_DEBUG=1."""
    if debug_enabled():
        traceback.print_exc(file=sys.stderr)
    click.echo(f"fsdpck: error: {message}", err=True)
    sys.stderr.flush()


class FsdpckGroup(click.Group):
    """The error boundary: maps fsdpck's exceptions to exit codes, never a traceback."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except (click.exceptions.Exit, click.exceptions.Abort, click.ClickException):
            raise
        except FsdpckError as e:
            report_error(e.describe(), code=e.exit_code)
            ctx.exit(e.exit_code)
        except KeyboardInterrupt:
            report_error("interrupted", code=EXIT_RUNTIME)
            ctx.exit(EXIT_RUNTIME)
        except Exception as e:  # the boundary: anything unforeseen is a runtime failure, said in one line
            report_error(f"unexpected {type(e).__name__}: {e}", code=EXIT_RUNTIME)
            ctx.exit(EXIT_RUNTIME)


@click.group(cls=FsdpckGroup, context_settings=CONTEXT_SETTINGS)
@click.version_option(__version__, "-V", "--version", prog_name="fsdpck")
def cli() -> None:
    """Check that sharded optimizer state survives torch.distributed.checkpoint, and open checkpoint dirs.

    \b
    Examples:
      torchrun --nproc_per_node=2 fsdpck verify           # pre-flight round trip at 2 ranks
      fsdpck verify -n 8 --checkpoint-dir /shared/ck      # fsdpck launches 8 workers itself
      fsdpck inspect /shared/ck/step-1000                 # what is in a checkpoint, is it whole
      fsdpck diff /ckpt/a /ckpt/b --json -                # how two checkpoints differ

    Exit codes: 0 verified, 1 difference or integrity problem, 2 usage or set-up
    error, 3 runtime failure. Under torchrun the launcher turns any non-zero code
    into 1: use -n N or the JSON's exit_code for the exact one.
    """


def launch_workers(nproc: int) -> None:
    """-n N: re-run this very command in N workers started by fsdpck itself, and exit with their code."""
    from fsdpck import dist as fdist
    from fsdpck.launch import run_workers

    ctx = click.get_current_context()
    if fdist.launched_by_torchrun():
        raise click.UsageError("-n/--nproc-per-node starts its own workers; it cannot be used under torchrun", ctx=ctx)
    ctx.exit(run_workers(nproc, [ctx.info_name, *forwarded_args(ctx, exclude={"nproc"})]))


def forwarded_args(ctx: click.Context, *, exclude: set[str]) -> list[str]:
    """The command's parsed options, written back as arguments for the workers."""
    args: list[str] = []
    for param in ctx.command.params:
        if param.name in exclude or not isinstance(param, click.Option):
            continue
        value = ctx.params.get(param.name)
        source = ctx.get_parameter_source(param.name)
        if value is None or source is click.core.ParameterSource.DEFAULT:
            continue
        flag = max(param.opts, key=len)
        if param.is_flag:
            if param.secondary_opts:  # --x/--no-x: say which
                args.append(flag if value else max(param.secondary_opts, key=len))
            elif value:
                args.append(flag)
            continue
        args += [flag, str(value)]
    if any(isinstance(p, click.Argument) for p in ctx.command.params):
        args.append("--")  # a path that starts with "-" stays a path
    for param in ctx.command.params:
        if isinstance(param, click.Argument):
            value = ctx.params[param.name]
            args += [str(v) for v in value] if isinstance(value, (list, tuple)) else [str(value)]
    return args


def _positive_float(ctx, param, value):
    if value is not None and not value >= 0:  # NaN too: it compares false with everything
        raise click.BadParameter("must be zero or more", ctx=ctx, param=param)
    return value


def _not_nan(ctx, param, value):
    if value is not None and math.isnan(value):  # click's FloatRange lets NaN through
        raise click.BadParameter("must be a number of seconds", ctx=ctx, param=param)
    return value


def _size(ctx, param, value):
    if value is None:
        return None
    from fsdpck.model import parse_size

    try:
        return parse_size(value)
    except ValueError as e:
        raise click.BadParameter(str(e), ctx=ctx, param=param) from None


def _check_width_or_size(width: int, size: int | None) -> None:
    ctx = click.get_current_context()
    if size is not None and ctx.get_parameter_source("width") is not click.core.ParameterSource.DEFAULT:
        raise click.UsageError("--width and --size both choose the model's width: give one", ctx=ctx)


def run_options(schema: str):
    """Options of every command that runs on ranks: device, timeout, JSON, verbosity, -n."""

    def decorate(f):
        for option in reversed([
            click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True,
                         help="auto: cuda:LOCAL_RANK with NCCL where GPUs are present, else CPU with gloo."),
            click.option("--timeout", type=click.FloatRange(1, 86_400), default=300.0, show_default=True, callback=_not_nan,
                         help="Seconds any collective may wait before the run fails (exit 3) instead of hanging."),
            click.option("--json", "json_target", metavar="PATH|-", default=None, callback=check_json_target,
                         help=f"Write the {schema} JSON document there (- for stdout; the report then goes to stderr)."),
            click.option("-v", "--verbose", is_flag=True, help="Show PyTorch's warnings (hidden and counted by default)."),
            click.option("-n", "--nproc-per-node", "nproc", type=click.IntRange(1, 1024), default=None,
                         help="Start N workers on this host through PyTorch's elastic launcher and exit with their "
                              "exact fsdpck code (torchrun turns every failure into 1)."),
        ]):
            f = option(f)
        return f

    return decorate


def state_options(*, matrix: bool):
    """Options that shape the state that is saved: flow, optimizer, dtype, steps, width, seed."""
    allowed = ["all"] if matrix else []

    def decorate(f):
        for option in reversed([
            click.option("--fsdp", type=click.Choice(["1", "2"]), default=None,
                         help="FSDP1 (FullyShardedDataParallel, ShardedTensor state; the default) or FSDP2 "
                              "(fully_shard, DTensor state)."),
            click.option("--api", type=click.Choice(["legacy", "dsd"]), default=None,
                         help="State-dict API: legacy (FSDP.optim_state_dict and friends, FSDP1 only) or dsd "
                              "(get_state_dict/set_state_dict). Default: legacy for FSDP1, dsd for FSDP2."),
            click.option("--optimizer", type=click.Choice(["adam", "adamw", "sgd", "adagrad", "rmsprop", *allowed]),
                         default="adam", show_default=True,
                         help="Optimizer, with fixed hyper-parameters (README)" + ("; all = each in turn." if matrix else ".")),
            click.option("--dtype", type=click.Choice(["float32", "bfloat16", *allowed]), default="float32",
                         show_default=True, help="dtype of parameters and optimizer state" + ("; all = each in turn." if matrix else ".")),
            click.option("--steps", type=click.IntRange(1, 10_000), default=1, show_default=True,
                         help="Optimizer steps before the save."),
            click.option("--save-mode", type=click.Choice(["sync", "async"]), default=None,
                         help="dcp.save (sync, the default), or dcp.async_save waited on before the load."),
            click.option("--width", type=click.IntRange(1, 1_000_000), default=1, show_default=True,
                         help="Multiplies the model dims (ws, 2·ws, 3·ws) to scale the checkpoint; need not divide evenly."),
            click.option("--size", "size", metavar="SIZE", default=None, callback=_size,
                         help="Pick --width so the checkpoint holds about SIZE of model + optimizer state (500MB, 8GB, 1.5GiB)."),
            click.option("--seed", type=click.IntRange(0, 2**31 - 1), default=0, show_default=True),
            click.option("--thread-count", type=click.IntRange(1, 256), default=1, show_default=True,
                         help="FileSystemWriter threads per rank."),
            click.option("--sync-files/--no-sync-files", default=True, show_default=True,
                         help="fsync each file DCP writes."),
            click.option("--single-file-per-rank/--no-single-file-per-rank", default=True, show_default=True,
                         help="One file per rank, or one per tensor."),
        ]):
            f = option(f)
        return f

    return decorate


def run_on_ranks(command: str, body, *, device, timeout, json_target, verbose, render, verdict, document) -> None:
    """Hand a command's work to the per-rank runner and exit with its code."""
    from fsdpck import runner

    code = runner.run_distributed(command, body, device=device, timeout=timeout, json_target=json_target,
                                  verbose=verbose, render=render, verdict=verdict, document=document)
    click.get_current_context().exit(code)


def _writer(thread_count: int, sync_files: bool, single_file_per_rank: bool):
    from fsdpck.flows import WriterOptions

    return WriterOptions(thread_count=thread_count, sync_files=sync_files, single_file_per_rank=single_file_per_rank)


@cli.command(context_settings=CONTEXT_SETTINGS)
@click.option("--checkpoint-dir", type=click.Path(file_okay=True, dir_okay=True), default=None,
              help="Where to write the checkpoints (each flow in its own subdirectory). Default: a fresh temporary dir.")
@click.option("--keep", is_flag=True, help="Keep the checkpoints (with a manifest each) after a verified run; a failed run always keeps them.")
@click.option("--overwrite", is_flag=True, help="Write into a non-empty --checkpoint-dir, replacing only fsdpck's own subdirectories.")
@click.option("--planner", type=click.Choice(["default", "none", "both"]), default="both", show_default=True,
              help="Load planner: DCP's DefaultLoadPlanner, none, or both (each in its own subdirectory).")
@state_options(matrix=True)
@click.option("--matrix", is_flag=True,
              help="Run every valid combination of fsdp × api × planner × save mode in one launch (narrowed by any of "
                   "those options given); a summary row per combination.")
@click.option("--details", is_flag=True, help="With --matrix: print the per-FQN table of every combination, not only the failed ones.")
@click.option("--atol", type=float, default=0.0, show_default=True, callback=_positive_float,
              help="Absolute tolerance (default: bitwise equality).")
@click.option("--rtol", type=float, default=0.0, show_default=True, callback=_positive_float,
              help="Relative tolerance (default: bitwise equality).")
@click.option("--self-test", is_flag=True, help="Flip one bit of the loaded state on one rank: verify must report exactly that row and exit 1.")
@run_options("fsdpck.verify/1")
def verify(checkpoint_dir, keep, overwrite, planner, fsdp, api, optimizer, dtype, steps, save_mode, width, size, seed,
           thread_count, sync_files, single_file_per_rank, matrix, details, atol, rtol, self_test,
           device, timeout, json_target, verbose, nproc) -> None:
    """Round-trip sharded optimizer state through DCP and compare every (FQN, state), shard-locally.

    Builds the three-layer model of PyTorch's DCP optimizer-state test, takes optimizer
    steps, saves model + sharded optimizer state, loads into a fresh model and optimizer
    and compares. Rank 0 prints one table per flow and a one-line verdict.

    \b
    Examples:
      torchrun --nproc_per_node=2 fsdpck verify
      torchrun --nproc_per_node=8 fsdpck verify --checkpoint-dir /shared/ck-preflight --overwrite
      fsdpck verify -n 8                   # fsdpck starts 8 workers: exact exit code
      fsdpck verify --fsdp 2 --optimizer adamw --dtype bfloat16
      torchrun --nproc_per_node=4 -m fsdpck verify --matrix --optimizer all
      fsdpck verify --self-test            # proves the check can fail: exit 1, one row
      fsdpck verify -n 2 --size 8GB --checkpoint-dir /shared/ck   # can the storage take a real one?
      fsdpck verify --json report.json     # same facts for scripts (schema fsdpck.verify/1)
    """
    _check_width_or_size(width, size)
    if self_test and not (math.isfinite(atol) and math.isfinite(rtol)):
        raise click.UsageError("--self-test with an infinite --atol/--rtol could not fail: nothing would be proven")
    if nproc is not None:
        launch_workers(nproc)
    from fsdpck import report
    from fsdpck.compare import Tolerance
    from fsdpck.flows import select
    from fsdpck.roundtrip import VerifyOptions, run_verify

    planner_given = click.get_current_context().get_parameter_source("planner") is not click.core.ParameterSource.DEFAULT
    flows = select(matrix=matrix, fsdp=int(fsdp) if fsdp else None, api=api,
                   planner=planner if (planner_given or not matrix) else "both",
                   save_mode=save_mode, optimizer=optimizer, dtype=dtype, steps=steps)
    opts = VerifyOptions(flows=flows, checkpoint_dir=checkpoint_dir, keep=keep, overwrite=overwrite,
                         tolerance=Tolerance(atol=atol, rtol=rtol), self_test=self_test, width=width, size=size, seed=seed,
                         writer=_writer(thread_count, sync_files, single_file_per_rank))
    run_on_ranks(
        "verify", lambda ctx: run_verify(opts, ctx=ctx), device=device, timeout=timeout, json_target=json_target,
        verbose=verbose,
        render=lambda result, wl: report.render_verify(result, warnings_count=sum(w["count"] for w in wl),
                                                       summary=matrix or len(flows) > 2, details=details),
        verdict=report.verdict, document=report.verify_document,
    )


@cli.command(context_settings=CONTEXT_SETTINGS)
@click.argument("directory", type=click.Path(file_okay=True, dir_okay=True))
@click.option("--overwrite", is_flag=True, help="Replace an earlier fsdpck save in DIRECTORY (its .metadata goes first).")
@state_options(matrix=False)
@run_options("fsdpck.save/1")
def save(directory, overwrite, fsdp, api, optimizer, dtype, steps, save_mode, width, size, seed,
         thread_count, sync_files, single_file_per_rank, device, timeout, json_target, verbose, nproc) -> None:
    """Train, save model + sharded optimizer state to DIRECTORY with DCP, and write the manifest.

    The manifest (DIRECTORY/fsdpck.json) records the world size, the flow, the model dims
    and, per DCP key, the exact fingerprint of the value saved. `fsdpck load` checks
    against it at any world size.

    \b
    Examples:
      torchrun --nproc_per_node=8 -m fsdpck save /shared/ck-8
      torchrun --nproc_per_node=2 -m fsdpck load /shared/ck-8      # resharded 8 -> 2
      fsdpck save -n 4 /shared/ck --fsdp 2 --width 1000 --dtype bfloat16
    """
    _check_width_or_size(width, size)
    if nproc is not None:
        launch_workers(nproc)
    from fsdpck import report
    from fsdpck.flows import select
    from fsdpck.saveload import SaveOptions, run_save

    (flow,) = select(matrix=False, fsdp=int(fsdp) if fsdp else None, api=api, planner="default",
                     save_mode=save_mode, optimizer=optimizer, dtype=dtype, steps=steps)
    opts = SaveOptions(directory=directory, flow=flow, overwrite=overwrite, width=width, size=size, seed=seed,
                       writer=_writer(thread_count, sync_files, single_file_per_rank))
    run_on_ranks(
        "save", lambda ctx: run_save(opts, ctx=ctx), device=device, timeout=timeout, json_target=json_target,
        verbose=verbose, render=lambda result, wl: report.render_save(result, warnings_count=sum(w["count"] for w in wl)),
        verdict=report.save_verdict, document=report.save_document,
    )


@cli.command(context_settings=CONTEXT_SETTINGS)
@click.argument("directories", metavar="DIRECTORY...", nargs=-1, required=True, type=click.Path(file_okay=True, dir_okay=True))
@click.option("--fsdp", type=click.Choice(["1", "2"]), default=None,
              help="Load through FSDP1 or FSDP2 (default: the one the save used).")
@click.option("--api", type=click.Choice(["legacy", "dsd"]), default=None,
              help="Load through the legacy functions (FSDP1 only) or the state_dict API (default: the save's).")
@click.option("--planner", type=click.Choice(["default", "none"]), default="default", show_default=True,
              help="Load planner.")
@click.option("--self-test", is_flag=True, help="Flip one bit of the loaded state on one rank: load must report exactly that key and exit 1.")
@run_options("fsdpck.load/1")
def load(directories, fsdp, api, planner, self_test, device, timeout, json_target, verbose, nproc) -> None:
    """Load checkpoints written by `fsdpck save` at any world size and check every key against the manifest.

    The model is rebuilt with the dims the manifest records, so the shapes match whatever
    the world size now. Each rank fingerprints what it loaded; the per-key table says
    match / differs / missing / unexpected. Several dirs are checked in one launch.

    \b
    Examples:
      torchrun --nproc_per_node=2 -m fsdpck load /shared/ck-8
      fsdpck load -n 3 /shared/ck-8 --fsdp 2 --api dsd   # FSDP1/legacy save -> FSDP2/dsd load
      fsdpck load /shared/ck-8 --json - | jq .exit_code
    """
    if nproc is not None:
        launch_workers(nproc)
    from fsdpck import report
    from fsdpck.saveload import LoadOptions, run_load

    opts = LoadOptions(directories=list(directories), fsdp=int(fsdp) if fsdp else None, api=api, planner=planner, self_test=self_test)
    run_on_ranks(
        "load", lambda ctx: run_load(opts, ctx=ctx), device=device, timeout=timeout, json_target=json_target,
        verbose=verbose, render=lambda result, wl: report.render_load(result, warnings_count=sum(w["count"] for w in wl)),
        verdict=report.load_verdict, document=report.load_document,
    )


# Commands defined in other modules are registered below.
from fsdpck.cli_ckpt import diff_command, inspect_command  # noqa: E402

cli.add_command(inspect_command, "inspect")
cli.add_command(diff_command, "diff")


def main() -> None:
    """Console-script entry point (also ``python -m fsdpck`` and ``python fsdpck``)."""
    try:
        code = cli.main(prog_name="fsdpck", standalone_mode=False)
    except click.exceptions.Abort:
        click.echo("fsdpck: aborted", err=True)
        code = EXIT_RUNTIME
    except click.ClickException as e:
        e.show()
        code = EXIT_USAGE if e.exit_code in (1, 2) else e.exit_code
    except click.exceptions.Exit as e:
        code = e.exit_code
    finish(code if isinstance(code, int) else 0)


def finish(code: int) -> None:
    """End the process with ``code``.

    After a multi-rank run the process ends through ``os._exit`` once output is
    flushed: tearing the gloo process group down at exit aborts the process
    (SIGABRT) in about one run of eight with torch 2.13, which would turn a
    verified run into a crash.
    """
    sys.stdout.flush()
    sys.stderr.flush()
    from fsdpck import dist as fdist

    if fdist.needs_hard_exit():
        os._exit(code)
    sys.exit(code)
