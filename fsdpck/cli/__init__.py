"""fsdpck's command line: the group, its error boundary, and the process's end.

Each command lives in a module of its own (``fsdpck.cli.verify`` ...): it parses and
validates its options, calls one function of ``fsdpck.commands``, hands the result to a
renderer of ``fsdpck.report`` and exits with the code of DESIGN.md. A command imports its
``fsdpck.commands`` module when it runs, so that ``fsdpck --help`` does not import torch.
Errors leave through one boundary (:class:`FsdpckGroup`): fsdpck's own exceptions become a
one-paragraph message and their exit code, anything else a runtime failure (exit 3);
``FSDPCK_DEBUG=1`` adds the traceback.
"""

from __future__ import annotations

import os
import sys
import traceback

import click

from fsdpck import __version__
from fsdpck.cli.options import CONTEXT_SETTINGS
from fsdpck.errors import EXIT_RUNTIME, EXIT_USAGE, FsdpckError, debug_enabled, describe_exception
from fsdpck.runtime import dist


def report_error(message: str) -> None:
    """An error paragraph on stderr, with the traceback under FSDPCK_DEBUG=1."""
    if debug_enabled():
        traceback.print_exc(file=sys.stderr)
    click.echo(f"fsdpck: error: {message}", err=True)
    sys.stderr.flush()


class FsdpckGroup(click.Group):
    """The error boundary: fsdpck's exceptions become exit codes and one paragraph, never a traceback.

    It also keeps the command line exactly as given: ``-n N`` re-runs it in the workers.
    """

    raw_args: list[str] = []

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


from fsdpck.cli import diff as _diff  # noqa: E402  (the commands register themselves on ``cli``)
from fsdpck.cli import inspect as _inspect  # noqa: E402
from fsdpck.cli import saveload as _saveload  # noqa: E402
from fsdpck.cli import show as _show  # noqa: E402
from fsdpck.cli import verify as _verify  # noqa: E402

for _module in (_verify, _saveload, _inspect, _show, _diff):
    for _command in _module.COMMANDS:
        cli.add_command(_command)


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
    """End the process with ``code``; after a multi-rank run through ``os._exit`` once output is flushed
    (``fsdpck.runtime.dist.needs_hard_exit`` says why)."""
    sys.stdout.flush()
    sys.stderr.flush()
    if dist.needs_hard_exit():
        os._exit(code)
    sys.exit(code)
