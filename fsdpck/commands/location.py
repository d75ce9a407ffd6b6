"""A checkpoint location checked before anything heavy runs: a typo is a usage error in a moment.

Torch-free on purpose: the offline commands call :func:`check` before importing their
implementation (and with it torch, seconds on a cold node).
"""

from __future__ import annotations

from fsdpck.checkpoint.integrity import check_location
from fsdpck.checkpoint.storage import open_storage


def check(location: str, *, what: str = "DIR") -> None:
    """UsageError (exit 2) unless ``location`` is an existing directory (or URL prefix)."""
    check_location(open_storage(location, what=what), what=what)
