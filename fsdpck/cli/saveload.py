"""``fsdpck save`` and ``fsdpck load``: options, checks, and the hand-off to ``fsdpck.commands``."""

from __future__ import annotations

import click

from fsdpck.cli import options as opt
from fsdpck.cli import ranks
from fsdpck.report import saveload as report
from fsdpck.runtime.runner import Presentation
from fsdpck.state import registry


def _presenter(render, verdict, document):
    """How a finished save or load is shown: the table, the verdict line, the JSON document."""
    def present(result, *, code, error, warnings, ctx, elapsed) -> Presentation:
        count = sum(w["count"] for w in warnings)
        return Presentation(render(result, warnings_count=count) if result else None,
                            verdict(result, code=code, error=error),
                            document(result, code=code, error=error, warnings=warnings, ctx=ctx, elapsed=elapsed))
    return present


@click.command(context_settings=opt.CONTEXT_SETTINGS)
@click.argument("directory", metavar="DIR|URL")
@click.option("--overwrite", is_flag=True, help="Replace an earlier fsdpck save there (its .metadata goes first).")
@ranks.state_options(matrix=False)
@ranks.layout_options(default_note=" (recorded in the manifest)")
@ranks.run_options("fsdpck.save/1")
def save(directory, overwrite, fsdp, api, optimizer, dtype, steps, save_mode, steps_during_save, storage_format,
         trainer_state, width,
         size, seed, thread_count, sync_files, single_file_per_rank, replicate, tp, device, timeout, json_target,
         verbose, nproc) -> None:
    """Train, save model + sharded optimizer state with DCP, and write the manifest.

    The manifest (fsdpck.json) records the world size, the flow, the mesh layout, the model
    dims and, per DCP key, the exact fingerprint of the value saved. `fsdpck load` checks
    against it at any world size and layout.

    \b
    Examples:
      torchrun --nproc_per_node=2 -m fsdpck save ./ck-tr
      fsdpck save -n 4 ./ck-4 --fsdp 2 --replicate 2      # HSDP, mesh recorded in the manifest
      fsdpck save -n 2 ./ck-st --fsdp 2 --format safetensors
    """
    ranks.check_width_or_size(size)
    layout = ranks.layout_from(replicate, tp)
    ranks.check_flow_options(fsdp, api, layout, storage_format=storage_format, trainer_state=trainer_state,
                             optimizer=optimizer)
    ranks.launch_if_asked(nproc)
    from fsdpck.commands.save import SaveOptions, run_save

    selection = dict(fsdp=int(fsdp) if fsdp else None, api=api, save_mode=save_mode, optimizer=optimizer, dtype=dtype,
                     steps=steps, layout=layout, trainer_state=trainer_state, steps_during_save=steps_during_save,
                     format=storage_format)
    opts = SaveOptions(location=directory, selection=selection, overwrite=overwrite, width=width, size=size, seed=seed,
                       writer=ranks.writer_from(thread_count, sync_files, single_file_per_rank))

    present = _presenter(report.render_save, report.save_verdict, report.save_document)
    ranks.run_on_ranks("save", lambda ctx: run_save(opts, ctx=ctx), present=present, device=device, timeout=timeout,
                     json_target=json_target,
                     verbose=verbose)


@click.command(context_settings=opt.CONTEXT_SETTINGS)
@click.argument("directories", metavar="DIR|URL...", nargs=-1, required=True)
@click.option("--fsdp", type=click.Choice(["1", "2"]), default=None,
              help="Load through FSDP1 or FSDP2 (default: the one the save used; FSDP2 with --replicate or --tp).")
@click.option("--api", type=click.Choice(["legacy", "dsd"]), default=None,
              help="Load through the legacy functions (FSDP1 only) or the state_dict API (default: the save's).")
@click.option("--planner", type=click.Choice(["default", "none"]), default="default", show_default=True,
              help="Load planner.")
@ranks.layout_options(default_note=" to load into (default: plain FSDP, whatever the save's layout)")
@click.option("--self-test", is_flag=True, help="Flip one bit of the loaded state on one rank: load must report "
                                                "exactly that key and exit 1.")
@click.option("--self-test-rank", type=click.IntRange(0, 1 << 20), default=None,
              help="The rank whose state --self-test flips (default: the last).")
@ranks.run_options("fsdpck.load/1")
def load(directories, fsdp, api, planner, replicate, tp, self_test, self_test_rank, device, timeout, json_target,
         verbose, nproc) -> None:
    """Load checkpoints written by `fsdpck save` at any world size and layout; check every key.

    The model is rebuilt with the dims the manifest records, on this launch's world size and
    mesh; each rank fingerprints what it loaded, and the per-key table says match / differs /
    missing / unexpected / replica-differs. Several checkpoints are checked in one launch.

    \b
    Examples:
      torchrun --nproc_per_node=3 -m fsdpck load ./ck-tr  # saved at 2 ranks, loaded at 3
      fsdpck load -n 3 ./ck-tr --fsdp 2 --api dsd         # FSDP1/legacy save -> FSDP2/dsd load
      fsdpck load -n 4 ./ck-4 --tp 2                      # HSDP 2x2 save -> TP 2 x FSDP2 load
      fsdpck load ./ck-st --json load.json                # safetensors, at world size 1
    """
    layout = ranks.layout_from(replicate, tp)
    ranks.check_flow_options(fsdp, api, layout)
    ranks.launch_if_asked(nproc)
    from fsdpck.commands.load import LoadOptions, run_load

    opts = LoadOptions(locations=list(directories), fsdp=int(fsdp) if fsdp else (
        2 if layout is not None and not layout.is_plain else None), api=api, planner=planner,
        layout=layout or registry.PLAIN, self_test=self_test, self_test_rank=self_test_rank)

    present = _presenter(report.render_load, report.load_verdict, report.load_document)
    ranks.run_on_ranks("load", lambda ctx: run_load(opts, ctx=ctx), present=present, device=device, timeout=timeout,
                     json_target=json_target,
                     verbose=verbose)


COMMANDS = [save, load]
