"""What every command shares: click's settings, the --json option, an offline command's progress and output.

Kept light, because an offline command (inspect, show, diff) imports it before its first read:
rich and the report's tables are imported by :func:`warm_up` on a thread while the read runs,
or when first needed. The options of the commands that run on ranks (verify, save, load) and
their checks are ``fsdpck.cli.ranks``.
"""

from __future__ import annotations

import json
import os
import threading
from typing import Any, Callable

import click

from fsdpck.errors import UsageError
from fsdpck.runtime.files import write_json_target
from fsdpck.runtime.progress import Progress, after_from_env, every_from_env

# rich's modules import one another: two threads importing them at once could each get the
# other's module half made. Every import of the report or rich here holds this lock.
_RICH_IMPORTS = threading.RLock()

CONTEXT_SETTINGS = {"help_option_names": ["-h", "--help"], "max_content_width": 100}


def check_json_target(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
    """--json PATH: '-' or a file path that is not a directory, checked before any work."""
    if value is None or value == "-":
        return value
    if not value or os.path.isdir(value):
        raise click.BadParameter(f"{value!r} is {'empty' if not value else 'a directory'}: give a file path or '-'",
                                 ctx=ctx, param=param)
    return value


def not_negative(ctx, param, value):
    if value is not None and not value >= 0:  # NaN too: it compares false with everything
        raise click.BadParameter("must be zero or more", ctx=ctx, param=param)
    return value


def apply(f: Callable, options: list[Callable]) -> Callable:
    for option in reversed(options):
        f = option(f)
    return f


def json_option(schema: str) -> Callable:
    return click.option("--json", "json_target", metavar="PATH|-", default=None, callback=check_json_target,
                        help=f"Write the {schema} JSON document there (- for stdout; the report then goes to stderr).")


def offline_progress() -> Progress:
    """Progress for an offline command's reads, on stderr; checks FSDPCK_PROGRESS_* (exit 2 when malformed)."""
    return Progress(_StderrView(every_s=every_from_env()), after_s=after_from_env())


class _StderrView:
    """The progress view on stderr, made when a read first shows progress: rich is not imported before the read."""

    def __init__(self, *, every_s: float):
        self.every_s = every_s
        self.view: Any = None

    def start(self, label: str, total: int) -> None:
        if self.view is None:
            with _RICH_IMPORTS:
                from fsdpck.report.console import make_console
                from fsdpck.report.progress import view

            self.view = view(make_console(stderr=True), every_s=self.every_s)
        self.view.start(label, total)

    def update(self, done: int, elapsed: float) -> None:
        self.view.update(done, elapsed)

    def finish(self, done: int, elapsed: float) -> None:
        if self.view is not None:  # None: start() failed before the view was made (its error goes on)
            self.view.finish(done, elapsed)


def warm_up(load: Callable[[], Any]) -> Callable[[], Any]:
    """Run ``load`` (the imports of a command's report: rich, its tables) and those of :func:`emit` on a
    thread from now on.

    An offline command calls it just before its read: the imports then hold the GIL only
    while the reading threads wait on the disk, instead of adding to the time before the
    first read or after the last. The function returned waits for the thread and returns
    ``load()``: by then a look-up in ``sys.modules``; an import that failed on the thread
    fails again there, in the command, through the error boundary.
    """
    thread = threading.Thread(target=_quietly, args=(load,), name="fsdpck-warm-up")
    thread.start()

    def ready() -> Any:
        thread.join()
        with _RICH_IMPORTS:
            return load()

    return ready


def _quietly(load: Callable[[], Any]) -> None:
    with _RICH_IMPORTS:
        try:
            from fsdpck.report import console  # noqa: F401  (what emit() prints with)

            load()
        except BaseException:  # said by ready(), in the command's thread
            pass


def emit(document: dict[str, Any], json_target: str | None, renderable: Any, verdict: str) -> None:
    """An offline command's output: the JSON document (if asked), then the report, the verdict last."""
    if json_target is not None:
        try:
            write_json_target(json_target, json.dumps(document, indent=2, default=str) + "\n")
        except OSError as e:
            raise UsageError(f"--json {json_target!r}: cannot write: {e.strerror or e}") from None
    with _RICH_IMPORTS:
        from fsdpck.report.console import make_console, print_verdict

    console = make_console(stderr=json_target == "-")
    console.print(renderable, crop=False)
    print_verdict(console, verdict)
