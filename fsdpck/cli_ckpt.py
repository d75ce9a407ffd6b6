"""``fsdpck inspect`` and ``fsdpck diff``: open checkpoint dirs, one process, no process group.

Thin commands: parse, call one function of ``fsdpck.ckptdir``, render through
``fsdpck.report_ckpt``, exit with the code of DESIGN.md (0 whole / identical, 1 a
problem or a difference, 2 a bad path or option). torch is imported only when a command
runs, so ``fsdpck --help`` stays fast.
"""

from __future__ import annotations

import os

import click

from fsdpck.errors import UsageError
from fsdpck.output import check_json_target, make_console, write_json

_CONTEXT_SETTINGS = {"help_option_names": ["-h", "--help"], "max_content_width": 100}

_JSON_HELP = "Also write the result as a JSON document to PATH ('-': stdout; the report then goes to stderr)."
_KEY_HELP = "Only keys matching this shell-style pattern (e.g. 'optim.state.*.exp_avg')."


_json_target = check_json_target  # shared with the commands that run on ranks


def _emit(document: dict, json_path: str | None, renderable, verdict: str) -> None:
    """Write the JSON document (if asked), then the report, with the verdict as its last line."""
    if json_path is not None:
        try:
            write_json(json_path, document)
        except OSError as e:
            raise UsageError(f"--json {json_path!r}: cannot write: {e.strerror or e}") from None
    console = make_console(stderr=(json_path == "-"))
    if not (console.encoding or "").lower().startswith("utf"):
        # A log or terminal that is not UTF-8 (PYTHONIOENCODING=ascii, LANG=C): rich draws
        # ASCII boxes; other characters (a key's, the verdict's dash) must not crash the report.
        stream = console.file
        if hasattr(stream, "reconfigure"):
            stream.reconfigure(errors="replace")
        verdict = verdict.replace("—", "-").replace("→", "->")
    # crop=False: a row wider than the console stays whole (one greppable line), as does the verdict.
    console.print(renderable, crop=False)
    console.print(verdict, markup=False, highlight=False, crop=False, soft_wrap=True)


@click.command("inspect", context_settings=_CONTEXT_SETTINGS)
@click.argument("directory", metavar="DIR")
@click.option("--chunks", is_flag=True, help="Show every stored chunk: offsets, sizes, file and byte range.")
@click.option("--key", "key_glob", metavar="GLOB", help=_KEY_HELP)
@click.option("--verify-data", is_flag=True,
              help="Read every item through DCP's reader and check tensor fingerprints against fsdpck.json.")
@click.option("--json", "json_path", metavar="PATH", callback=_json_target, help=_JSON_HELP)
@click.option("-v", "--verbose", is_flag=True, help="Show PyTorch's warnings and timings.")
@click.pass_context
def inspect_command(ctx: click.Context, directory: str, chunks: bool, key_glob: str | None, verify_data: bool,
                    json_path: str | None, verbose: bool) -> None:
    """Show what is in a DCP checkpoint dir and whether it is whole, without running its pickles.

    Reads .metadata with a restricted unpickler, lists every key (kind, global shape, dtype,
    chunks, bytes) and checks integrity from metadata and file sizes alone: files present,
    byte ranges inside them, chunks inside their tensors and covering them exactly, and the
    leftovers of an unfinished save (INCOMPLETE). Exit 0 whole, 1 any problem, 2 bad DIR.

    \b
    Examples:
      fsdpck inspect /ckpt/step-1000                     # layout and integrity
      fsdpck inspect /ckpt/step-1000 --key 'optim.*' --chunks
      fsdpck inspect /ckpt/step-1000 --verify-data       # read all data, check fsdpck.json
      fsdpck inspect /ckpt/step-1000 --json - | jq .verdict
    """
    from fsdpck import ckptdir, report_ckpt

    result = ckptdir.inspect_checkpoint(directory, key_glob=key_glob, verify_data=verify_data)
    _emit(report_ckpt.inspect_document(result), json_path,
          report_ckpt.render_inspect(result, chunks=chunks, verbose=verbose), report_ckpt.inspect_verdict(result))
    ctx.exit(result.exit_code)


@click.command("diff", context_settings=_CONTEXT_SETTINGS)
@click.argument("dir_a", metavar="A")
@click.argument("dir_b", metavar="B")
@click.option("--values", is_flag=True, help="Also show max |Δ| per differing tensor (reads A and B of one key at a time).")
@click.option("--key", "key_glob", metavar="GLOB", help=_KEY_HELP)
@click.option("--json", "json_path", metavar="PATH", callback=_json_target, help=_JSON_HELP)
@click.pass_context
def diff_command(ctx: click.Context, dir_a: str, dir_b: str, values: bool, key_glob: str | None,
                 json_path: str | None) -> None:
    """Compare two DCP checkpoint dirs key by key: keys, shapes, dtypes and data.

    Data are compared by the sharding-invariant fingerprint, so A and B may have been saved
    at different world sizes. Exit 0 identical, 1 any difference or integrity problem, 2 a
    bad path or option.

    \b
    Examples:
      fsdpck diff /ckpt/ws8 /ckpt/ws4                    # same state at two world sizes?
      fsdpck diff /ckpt/a /ckpt/b --values --key 'optim.state.*'
      fsdpck diff /ckpt/a /ckpt/b --json diff.json
    """
    from fsdpck import ckptdir, report_ckpt

    result = ckptdir.diff_checkpoints(dir_a, dir_b, key_glob=key_glob, values=values)
    _emit(report_ckpt.diff_document(result), json_path, report_ckpt.render_diff(result),
          report_ckpt.diff_verdict(result))
    ctx.exit(result.exit_code)
