"""Where fsdpck's words go, and how wide they may be.

One rule for every table of every command: on a terminal, the terminal's width; in a log
(stdout not a terminal), 120 columns unless ``COLUMNS`` says otherwise, without colour.
``NO_COLOR`` is honoured by rich itself. With ``--json -`` stdout carries the JSON document
alone and the human-readable report moves to stderr.
"""

from __future__ import annotations

import os
import sys
from typing import TextIO

from rich.console import Console

LOG_WIDTH = 120  # width of tables in cluster logs, where there is no terminal to ask


def log_width() -> int:
    """The width of output that goes to a log: ``COLUMNS`` when it is a sane number, else 120."""
    try:
        width = int(os.environ.get("COLUMNS", ""))
    except ValueError:
        return LOG_WIDTH
    return width if 20 <= width <= 10_000 else LOG_WIDTH


def silence(stream: TextIO) -> None:
    """Point a stream whose reader has gone (``| head``) at /dev/null: what is left goes nowhere, quietly."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        try:
            os.dup2(devnull, stream.fileno())
        finally:
            os.close(devnull)
    except (OSError, ValueError):
        pass


class _Console(Console):
    """rich's Console, but a reader that stops reading (``fsdpck diff A B | head``) does not change the
    exit code: what is left of the report goes nowhere, and the command ends with its own code (rich
    would exit 1, which means "difference found")."""

    def on_broken_pipe(self) -> None:
        self.quiet = True
        silence(self.file)


def make_console(file: TextIO | None = None, *, stderr: bool = False) -> Console:
    """A rich Console that behaves in a cluster log: no colour and a sane width when not a terminal."""
    stream = file if file is not None else (sys.stderr if stderr else sys.stdout)
    is_tty = hasattr(stream, "isatty") and stream.isatty()
    console = _Console(
        file=stream,
        width=None if is_tty else log_width(),
        color_system="auto" if is_tty else None,
        highlight=False,
        soft_wrap=False,
        emoji=False,
    )
    if not (console.encoding or "").lower().startswith("utf") and hasattr(stream, "reconfigure"):
        # A log or terminal that is not UTF-8 (PYTHONIOENCODING=ascii, LANG=C): rich draws ASCII
        # boxes; any other character (a key's, the verdict's dash) must not crash the report.
        stream.reconfigure(errors="replace")
    return console


def print_verdict(console: Console, line: str) -> None:
    """The last line of every command: whole, on one line, whatever the width (a script greps it)."""
    if not (console.encoding or "").lower().startswith("utf"):
        line = line.replace("—", "-").replace("→", "->").replace("×", "x")
    console.print(line, markup=False, highlight=False, crop=False, soft_wrap=True)
