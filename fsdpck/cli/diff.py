"""``fsdpck diff``: options, and the hand-off to ``fsdpck.commands.diff``."""

from __future__ import annotations

import click

from fsdpck.cli import options as opt
from fsdpck.cli.inspect import KEY_HELP


@click.command("diff", context_settings=opt.CONTEXT_SETTINGS)
@click.argument("dir_a", metavar="A")
@click.argument("dir_b", metavar="B")
@click.option("--values", is_flag=True, help="For tensors whose data differ: how many elements, the first differing "
                                             "index, max |Δ| and max relative |Δ| (reads A and B of one key at a time).")
@click.option("--atol", type=float, default=0.0, show_default=True, callback=opt.not_negative,
              help="Absolute tolerance for --values (implies it): an element differs when |A - B| > atol + rtol*|B| "
                   "(default: bitwise equality); a key whose every element is within it is 'within tolerance'.")
@click.option("--rtol", type=float, default=0.0, show_default=True, callback=opt.not_negative,
              help="Relative tolerance for --values (implies it), as --atol.")
@click.option("--key", "key_glob", metavar="GLOB", help=KEY_HELP)
@opt.json_option("fsdpck.diff/1")
@click.pass_context
def diff_command(ctx: click.Context, dir_a: str, dir_b: str, values: bool, atol: float, rtol: float,
                 key_glob: str | None, json_target: str | None) -> None:
    """Compare two DCP checkpoints key by key: keys, shapes, dtypes and data.

    Data are compared by the sharding-invariant fingerprint, so A and B may have been saved
    at different world sizes and layouts. Exit 0 identical (or within --atol/--rtol), 1 any
    difference or integrity problem, 2 a bad path or option. Reads of more than a couple of
    seconds show progress on stderr.

    \b
    Examples:
      fsdpck diff ./ck-4 ./ck-2                           # two runs (exit 1)
      fsdpck diff ./ck-4 ./ck-4 --values --key 'optim.state.*'
      fsdpck diff ./ck-4 ./ck-4 --atol 1e-6 --rtol 1e-5   # close enough counts as the same
      fsdpck diff ./ck-4 ./ck-2 --json diff.json          # the same for scripts (exit 1)
    """
    from fsdpck.commands import location

    location.check(dir_a, what="A")  # before torch is imported: a typo fails in a moment
    location.check(dir_b, what="B")
    progress = opt.offline_progress()
    from fsdpck.commands.diff import diff_checkpoints

    report_ready = opt.warm_up(_report)  # rich and the tables are imported while the disk works
    result = diff_checkpoints(dir_a, dir_b, key_glob=key_glob, values=values, atol=atol, rtol=rtol, progress=progress)
    report = report_ready()
    opt.emit(report.document(result, code=result.exit_code), json_target, report.render(result),
             report.verdict(result))
    ctx.exit(result.exit_code)


def _report():
    from fsdpck.report import diff

    return diff


COMMANDS = [diff_command]
