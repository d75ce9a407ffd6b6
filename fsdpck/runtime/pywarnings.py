"""PyTorch's warnings are not the user's problem: kept out of the output, counted, shown with --verbose."""

from __future__ import annotations

import warnings
from collections import Counter
from contextlib import contextmanager
from typing import Any, Iterator


@contextmanager
def captured() -> Iterator[Counter]:
    """Record every warning raised inside (all of them, not once per place) as (category, first line) counts."""
    seen: Counter = Counter()

    def record(message, category, filename, lineno, file=None, line=None):
        text = str(message).strip()
        seen[(category.__name__, text.splitlines()[0][:400] if text else "")] += 1

    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.showwarning = record
        yield seen


def distinct(seen: Counter) -> list[dict[str, Any]]:
    """The recorded warnings, most frequent first, as the JSON documents list them."""
    return [{"category": c, "message": m, "count": n} for (c, m), n in seen.most_common()]
