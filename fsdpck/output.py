"""Where fsdpck's words go: one console for reports, one for errors, and the JSON document.

Reports go to stdout, except with ``--json -``: then stdout carries the JSON document
alone and the human-readable report moves to stderr, so ``fsdpck ... --json - | jq`` works.
When the stream is not a terminal (a cluster log), rich renders without colour at a
fixed width; ``NO_COLOR`` is honoured by rich itself.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
from pathlib import Path
from typing import Any, TextIO

LOG_WIDTH = 120  # width of tables in cluster logs, where there is no terminal to ask


def make_console(file: TextIO | None = None, *, stderr: bool = False, width: int | None = None):
    """A rich Console that behaves in a cluster log: no colour and a sane width when not a tty."""
    from rich.console import Console

    stream = file if file is not None else (sys.stderr if stderr else sys.stdout)
    is_tty = hasattr(stream, "isatty") and stream.isatty()
    if width is None and not is_tty:
        width = int(os.environ.get("COLUMNS", LOG_WIDTH))
    return Console(
        file=stream,
        width=width,
        color_system="auto" if is_tty else None,
        highlight=False,
        soft_wrap=False,
        emoji=False,
    )


def write_json(target: str, document: dict[str, Any]) -> None:
    """Write the JSON document to ``target`` (a path, or ``-`` for stdout); files are written atomically."""
    text = json.dumps(document, indent=2, sort_keys=False, default=str) + "\n"
    if target == "-":
        sys.stdout.write(text)
        sys.stdout.flush()
        return
    path = Path(target)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.fchmod(fd, 0o666 & ~umask)  # mkstemp's 0600 would hide the report from the user's group
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def check_json_target(ctx, param, value: str | None) -> str | None:
    """click callback for --json PATH: '-' or a file path that is not a directory, checked before any work."""
    import click

    if value is None or value == "-":
        return value
    if not value or os.path.isdir(value):
        raise click.BadParameter(f"{value!r} is {'empty' if not value else 'a directory'}: give a file path or '-'",
                                 ctx=ctx, param=param)
    return value
