"""``fsdpck inspect``: options, and the hand-off to ``fsdpck.commands.inspect``."""

from __future__ import annotations

import click

from fsdpck.cli import options as opt

KEY_HELP = "Only keys matching this shell-style pattern (e.g. 'optim.state.*.exp_avg')."


@click.command("inspect", context_settings=opt.CONTEXT_SETTINGS)
@click.argument("directory", metavar="DIR|URL")
@click.option("--chunks", is_flag=True, help="Show every stored chunk: offsets, sizes, file and byte range.")
@click.option("--key", "key_glob", metavar="GLOB", help=KEY_HELP)
@click.option("--verify-data", is_flag=True,
              help="Read every item (safely) and check tensors' fingerprints and objects' values against fsdpck.json.")
@click.option("--stats", is_flag=True,
              help="Read every item (safely, a stored piece at a time) and show per tensor min, max, mean, std, zeros, "
                   "NaN/+Inf/-Inf, per object its value, and what is suspicious: non-finite values, all-zero optimizer "
                   "moments, step values that disagree, a zero or non-finite lr, parameters without optimizer state.")
@click.option("--strict", is_flag=True, help="Exit 1 when --stats finds anything suspicious (implies --stats).")
@opt.json_option("fsdpck.inspect/1")
@click.option("-v", "--verbose", is_flag=True, help="Show PyTorch's warnings and timings.")
@click.pass_context
def inspect_command(ctx: click.Context, directory: str, chunks: bool, key_glob: str | None, verify_data: bool,
                    stats: bool, strict: bool, json_target: str | None, verbose: bool) -> None:
    """Show what is in a DCP checkpoint and whether it is whole, without running its pickles.

    Reads .metadata with a restricted unpickler, lists every key (kind, global shape, dtype,
    chunks, bytes) and checks integrity from metadata and file sizes alone: files present and
    not symlinks, byte ranges inside them, chunks inside their tensors and covering them
    exactly, and the leftovers of an unfinished save (INCOMPLETE). Exit 0 whole, 1 any
    problem (or, with --strict, anything suspicious), 2 bad DIR. Reads of more than a couple
    of seconds show progress on stderr (FSDPCK_PROGRESS_AFTER, FSDPCK_PROGRESS_EVERY: seconds).

    \b
    Examples:
      fsdpck inspect ./ck-4                               # layout and integrity
      fsdpck inspect ./ck-4 --key 'optim.*' --chunks
      fsdpck inspect ./ck-4 --verify-data                 # read all data, check fsdpck.json
      fsdpck inspect ./ck-4 --stats --strict              # values; fails if anything is suspicious
      fsdpck inspect ./ck-4 --stats --key 'optim.state.*.step'
      fsdpck inspect ./ck-4 --json inspect.json
    """
    from fsdpck.commands import location

    location.check(directory)  # before torch is imported: a typo fails in a moment
    progress = opt.offline_progress()
    from fsdpck.commands.inspect import inspect_checkpoint

    report_ready = opt.warm_up(_report)  # rich and the tables are imported while the disk works
    result = inspect_checkpoint(directory, key_glob=key_glob, verify_data=verify_data, stats=stats, strict=strict,
                                progress=progress)
    report = report_ready()
    opt.emit(report.document(result, code=result.exit_code), json_target,
             report.render(result, chunks=chunks, verbose=verbose), report.verdict(result))
    ctx.exit(result.exit_code)


def _report():
    from fsdpck.report import inspect

    return inspect


COMMANDS = [inspect_command]
