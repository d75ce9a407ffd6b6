"""``fsdpck verify``: options, checks, and the hand-off to ``fsdpck.commands.verify``."""

from __future__ import annotations

import math

import click

from fsdpck.cli import options as opt
from fsdpck.cli import ranks
from fsdpck.report import verify as report
from fsdpck.runtime.runner import Presentation


@click.command(context_settings=opt.CONTEXT_SETTINGS)
@click.option("--checkpoint-dir", metavar="PATH|URL", default=None,
              help="Where to write the checkpoints (each flow in its own subdirectory): a dir or an fsspec URL "
                   "(s3://bucket/prefix). Default: a fresh temporary dir.")
@click.option("--keep", is_flag=True, help="Keep the checkpoints (with a manifest each) after a verified run; a failed "
                                           "run always keeps them.")
@click.option("--overwrite", is_flag=True, help="Write into a non-empty --checkpoint-dir, replacing only fsdpck's own "
                                                "flow dirs.")
@click.option("--planner", type=click.Choice(["default", "none", "both"]), default="both", show_default=True,
              help="Load planner: DCP's DefaultLoadPlanner, none, or both (each in its own subdirectory).")
@ranks.state_options(matrix=True)
@ranks.layout_options(default_note="; with --matrix, HSDP 2 and TP 2 are included where the world size allows")
@click.option("--matrix", is_flag=True, help="Every valid combination of wrapper × API × planner × save mode × layout "
                                             "in one launch (narrowed by any of those options given); a summary row "
                                             "per combination.")
@click.option("--details", is_flag=True, help="With --matrix: the table of every combination, not only failed ones.")
@click.option("--atol", type=float, default=0.0, show_default=True, callback=opt.not_negative,
              help="Absolute tolerance (default: bitwise equality).")
@click.option("--rtol", type=float, default=0.0, show_default=True, callback=opt.not_negative,
              help="Relative tolerance (default: bitwise equality).")
@click.option("--self-test", is_flag=True, help="Flip one bit of the loaded state on one rank: every flow must then "
                                                "report exactly that row and exit 1.")
@click.option("--self-test-rank", type=click.IntRange(0, 1 << 20), default=None,
              help="The rank whose state --self-test flips (default: the last); under HSDP a rank outside replica 0 "
                   "shows as replica-differs.")
@ranks.run_options("fsdpck.verify/1")
def verify(checkpoint_dir, keep, overwrite, planner, fsdp, api, optimizer, dtype, steps, save_mode, steps_during_save,
           storage_format, trainer_state, width, size, seed, thread_count, sync_files, single_file_per_rank, replicate, tp, matrix,
           details, atol, rtol, self_test, self_test_rank, device, timeout, json_target, verbose, nproc) -> None:
    """Round-trip sharded optimizer state through DCP and compare every saved key, shard-locally.

    Builds the three-layer model of PyTorch's DCP optimizer-state test, takes optimizer
    steps, saves model + sharded optimizer state, loads into a fresh model and optimizer
    and compares every key. Rank 0 prints one table per flow and a one-line verdict.

    \b
    Examples:
      torchrun --nproc_per_node=2 -m fsdpck verify        # under torchrun (which exits 1 on any failure)
      fsdpck verify -n 2 --checkpoint-dir ./ck-job --overwrite   # into a dir a job reuses
      fsdpck verify -n 4 --fsdp 2 --replicate 2           # HSDP: 2 replicas x 2 shards
      fsdpck verify -n 2 --fsdp 2 --trainer-state --save-mode async  # the whole resume state, saved as training runs
      fsdpck verify -n 2 --matrix --optimizer all --dtype all  # every flow, optimizer and dtype in one launch
      fsdpck verify -n 2 --matrix --self-test             # each flow fails on its one flipped row (exit 1)
      fsdpck verify --json report.json                    # the same facts for scripts
    """
    ranks.check_width_or_size(size)
    if self_test and not (math.isfinite(atol) and math.isfinite(rtol)):
        raise click.UsageError("--self-test with an infinite --atol/--rtol could not fail: nothing would be proven")
    layout = ranks.layout_from(replicate, tp)
    ranks.check_flow_options(fsdp, api, layout, storage_format=storage_format, trainer_state=trainer_state,
                             optimizer=optimizer)
    ranks.launch_if_asked(nproc)
    from fsdpck.commands.verify import VerifyOptions, run_verify

    selection = dict(matrix=matrix, fsdp=int(fsdp) if fsdp else None, api=api, save_mode=save_mode,
                     planner=planner if (ranks.given("planner") or not matrix) else "both", optimizer=optimizer,
                     dtype=dtype, steps=steps, layout=layout, trainer_state=trainer_state,
                     steps_during_save=steps_during_save, format=storage_format)
    opts = VerifyOptions(selection=selection, checkpoint_dir=checkpoint_dir, keep=keep, overwrite=overwrite, atol=atol,
                         rtol=rtol, self_test=self_test, self_test_rank=self_test_rank, width=width, size=size,
                         seed=seed, writer=ranks.writer_from(thread_count, sync_files, single_file_per_rank))

    def present(result, *, code, error, warnings, ctx, elapsed) -> Presentation:
        renderable = None
        if result is not None:
            renderable = report.render(result, warnings_count=sum(w["count"] for w in warnings),
                                       summary=matrix or len(result.results) > 2, details=details)
        return Presentation(renderable, report.verdict(result, code=code, error=error),
                            report.document(result, code=code, error=error, warnings=warnings, ctx=ctx,
                                            elapsed=elapsed))

    ranks.run_on_ranks("verify", lambda ctx: run_verify(opts, ctx=ctx), present=present, device=device, timeout=timeout, json_target=json_target,
                     verbose=verbose)


COMMANDS = [verify]
