"""Stubs that stop a command line at the point where it would start work: no process group, no
workers, no checkpoint read. A command line that gets that far raises :class:`Started`, naming
the stage it reached; one refused earlier ends in click's or fsdpck's error boundary as usual.

``Started`` is a BaseException so that fsdpck's boundary (which turns any Exception into exit 3)
cannot swallow it.
"""

from __future__ import annotations

from contextlib import contextmanager

import pytest


class Started(BaseException):
    """A command line got past parsing and its checks: ``stage`` says where it would have started."""

    def __init__(self, stage: str):
        super().__init__(stage)
        self.stage = stage


def _stop(stage: str):
    def stub(*_args, **_kwargs):
        raise Started(stage)

    return stub


@contextmanager
def nothing_can_run(*, runner: bool = True):
    """Replace every entry into real work by a stub that raises :class:`Started`.

    ``runner=False`` lets the per-rank runner itself run (its checks before set-up); the
    process group it would then create is still a stub.
    """
    import fsdpck.commands.diff
    import fsdpck.commands.inspect
    import fsdpck.commands.show

    with pytest.MonkeyPatch.context() as mp:
        if runner:
            mp.setattr("fsdpck.cli.ranks.run_distributed", _stop("ranks"))  # the per-rank runner
        mp.setattr("fsdpck.runtime.launch.run_workers", _stop("workers"))  # -n N
        mp.setattr("fsdpck.runtime.dist.setup", _stop("process group"))
        mp.setattr(fsdpck.commands.inspect, "inspect_checkpoint", _stop("inspect"))
        mp.setattr(fsdpck.commands.diff, "diff_checkpoints", _stop("diff"))
        mp.setattr(fsdpck.commands.show, "show_key", _stop("show"))
        yield
