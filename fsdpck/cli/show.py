"""``fsdpck show``: options, and the hand-off to ``fsdpck.commands.show``."""

from __future__ import annotations

import click

from fsdpck.cli import options as opt
from fsdpck.errors import UsageError
from fsdpck.report import show as report
from fsdpck.report.console import make_console


def _slice(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
    """--slice: the syntax is checked before torch is imported (the dims, once the shape is known)."""
    if value is None:
        return None
    from fsdpck.commands.slices import parse  # torch-free

    try:
        parse(value)
    except UsageError as e:
        raise click.BadParameter(e.message.removeprefix("--slice "), ctx=ctx, param=param) from None
    return value


@click.command("show", context_settings=opt.CONTEXT_SETTINGS)
@click.argument("directory", metavar="DIR|URL")
@click.argument("key", metavar="KEY")
@click.option("--slice", "slice_expr", metavar="EXPR", callback=_slice,
              help="Only this part of a tensor: one item per leading dim, an index I or a range A:B (ends optional, "
                   "negatives count from the end), e.g. '0:4,:8' or '3' or '-2:'. Only the stored chunks that "
                   "meet it are read.")
@opt.json_option("fsdpck.show/1")
@click.pass_context
def show_command(ctx: click.Context, directory: str, key: str, slice_expr: str | None, json_target: str | None) -> None:
    """Print one tensor (or a slice of it) or one object of a DCP checkpoint, with its stats.

    The checkpoint is opened as inspect opens it (restricted unpickler, integrity checks); only
    KEY is read, and for a slice only the stored chunks that meet it, straight into a tensor
    of the slice's size. Objects are decoded with weights_only. Exit 0 shown, 1 KEY cannot be
    read (an integrity problem, data that cannot be read), 2 a bad DIR, KEY or --slice.

    \b
    Examples:
      fsdpck show ./ck-4 optim.state.net1.0.weight.exp_avg --slice 0:2,:4
      fsdpck show ./ck-4 model.net2.0.weight --slice -1     # the last row
      fsdpck show ./ck-4 optim.param_groups.0.lr          # an object's value
      fsdpck show ./ck-4 optim.state.net1.0.weight.step --json step.json
    """
    from fsdpck.commands import location

    location.check(directory)  # before torch is imported: a typo fails in a moment
    progress = opt.offline_progress()
    console = make_console(stderr=json_target == "-")
    from fsdpck.commands.show import show_key

    result = show_key(directory, key, slice_expr=slice_expr, width=console.width, progress=progress)
    opt.emit(report.document(result, code=result.exit_code), json_target, report.render(result),
             report.verdict(result))
    ctx.exit(result.exit_code)


COMMANDS = [show_command]
