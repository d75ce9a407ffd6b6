"""fsdpck's command line: the group, its error boundary, and the process's end.

Each command lives in a module of its own (``fsdpck.cli.verify`` ...): it parses and
validates its options, calls one function of ``fsdpck.commands``, hands the result to a
renderer of ``fsdpck.report`` and exits with the code of DESIGN.md. The group imports a
command's module only when that command is asked for (``fsdpck inspect`` never loads verify's
options), and a command imports its ``fsdpck.commands`` module when it runs, so that
``fsdpck --help`` does not import torch.
Errors leave through one boundary (:class:`FsdpckGroup`): fsdpck's own exceptions become a
one-paragraph message and their exit code, anything else a runtime failure (exit 3);
``FSDPCK_DEBUG=1`` adds the traceback.
"""

from __future__ import annotations

import importlib
import os
import sys

import click

from fsdpck import __version__
from fsdpck.cli.options import CONTEXT_SETTINGS
from fsdpck.errors import EXIT_RUNTIME, EXIT_USAGE, FsdpckError, debug_enabled, describe_exception
from fsdpck.runtime import dist


def report_error(message: str) -> None:
    """An error paragraph on stderr, with the traceback under FSDPCK_DEBUG=1."""
    if debug_enabled():
        import traceback

        traceback.print_exc(file=sys.stderr)
    click.echo(f"fsdpck: error: {message}", err=True)
    sys.stderr.flush()


# Each command's name and the module that defines it (as ``COMMANDS``), in the order of --help.
COMMAND_MODULES = {
    "verify": "fsdpck.cli.verify",
    "save": "fsdpck.cli.saveload",
    "load": "fsdpck.cli.saveload",
    "inspect": "fsdpck.cli.inspect",
    "show": "fsdpck.cli.show",
    "diff": "fsdpck.cli.diff",
}


class FsdpckGroup(click.Group):
    """The error boundary: fsdpck's exceptions become exit codes and one paragraph, never a traceback.

    It also keeps the command line exactly as given (``-n N`` re-runs it in the workers) and
    loads a command's module when the command is looked up.
    """

    raw_args: list[str] = []

    def list_commands(self, ctx: click.Context) -> list[str]:
        return list(COMMAND_MODULES)

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        if name not in self.commands and name in COMMAND_MODULES:
            for command in importlib.import_module(COMMAND_MODULES[name]).COMMANDS:
                self.add_command(command)
        return self.commands.get(name)

    def main(self, args=None, *posargs, **kwargs):
        self.raw_args = list(sys.argv[1:] if args is None else args)
        return super().main(self.raw_args, *posargs, **kwargs)

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except (click.exceptions.Exit, click.exceptions.Abort, click.ClickException):
            raise
        except FsdpckError as e:
            report_error(e.describe())
            ctx.exit(e.exit_code)
        except KeyboardInterrupt:
            report_error("interrupted")
            ctx.exit(EXIT_RUNTIME)
        except Exception as e:  # the boundary: anything unforeseen is a runtime failure, said in one line
            report_error(f"unexpected {describe_exception(e)}")
            ctx.exit(EXIT_RUNTIME)


@click.group(cls=FsdpckGroup, context_settings=CONTEXT_SETTINGS)
@click.version_option(__version__, "-V", "--version", prog_name="fsdpck")
def cli() -> None:
    """Check that sharded optimizer state survives torch.distributed.checkpoint, and open checkpoints.

    \b
    Examples:
      fsdpck verify -n 2                                  # pre-flight round trip at 2 ranks, exact exit code
      torchrun --nproc_per_node=2 -m fsdpck verify        # the same under torchrun
      fsdpck inspect ./ck-4 --verify-data                 # what is in a checkpoint, is it whole and right
      fsdpck inspect ./ck-4 --stats --strict              # NaNs, zero moments, steps, lr: fails if suspicious
      fsdpck show ./ck-4 optim.state.net1.0.weight.exp_avg --slice 0:2,:4
      fsdpck diff ./ck-4 ./ck-2                           # how two checkpoints differ (exit 1)

    Exit codes: 0 verified, 1 difference or integrity problem, 2 usage or set-up
    error, 3 runtime failure. Under torchrun the launcher turns any non-zero code
    into 1: use -n N or the JSON's exit_code for the exact one.
    """


def command(name: str) -> click.Command:
    """The command called ``name``, its module loaded (what ``fsdpck NAME`` runs)."""
    found = cli.get_command(click.Context(cli), name)
    if found is None:
        raise KeyError(name)
    return found


def main() -> None:
    """Console-script entry point (also ``python -m fsdpck`` and ``python fsdpck``)."""
    _streams_to_devnull_where_closed()
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
    """End the process with ``code``; after a multi-rank run through ``os._exit`` once output is flushed
    (``fsdpck.runtime.dist.needs_hard_exit`` says why)."""
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (BrokenPipeError, ValueError):  # its reader has gone (``| head``): the code still stands
            from fsdpck.report.console import silence

            silence(stream)
    if dist.needs_hard_exit():
        os._exit(code)
    sys.exit(code)


def _streams_to_devnull_where_closed() -> None:
    """Started with stdout or stderr closed (``>&-``): Python leaves it ``None``; what would go there
    goes nowhere instead, and the exit code is the command's."""
    if sys.stdout is None:
        sys.stdout = open(os.devnull, "w")
    if sys.stderr is None:
        sys.stderr = open(os.devnull, "w")
