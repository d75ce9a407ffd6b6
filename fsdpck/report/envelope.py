"""The JSON envelope every command's document starts with, built in one place.

``schema``, ``versions``, ``exit_code``, ``outcome``, ``verdict`` (the verdict line, as
printed), ``error`` (one paragraph, or null); then the command's own fields. The README's
"JSON output" documents it.
"""

from __future__ import annotations

import importlib.util
import platform
import re
import sys
from pathlib import Path
from typing import Any

from fsdpck import __version__
from fsdpck.errors import OUTCOME

SCHEMA_VERSION = 1


def torch_version() -> str | None:
    """The torch in use: the imported module's version where it is loaded, else the installed one's."""
    torch = sys.modules.get("torch")
    if torch is not None and hasattr(torch, "__version__"):
        return str(torch.__version__)
    # torch's own version.py names it (``__version__ = '2.13.0+cpu'``): read, not imported, it costs
    # no ``import torch`` and no importlib.metadata (20-40 ms of a 0.2 s start-up).
    try:
        spec = importlib.util.find_spec("torch")
        origin = spec.origin if spec is not None else None
        text = Path(origin).with_name("version.py").read_text(encoding="utf-8", errors="replace") if origin else ""
    except (ImportError, ValueError, OSError):  # no torch, a namespace package, an unreadable file
        text = ""
    found = re.search(r"^__version__\s*(?::\s*str\s*)?=\s*['\"]([^'\"\n]+)['\"]", text, re.MULTILINE)
    if found:
        return found.group(1)
    from importlib import metadata

    try:
        return metadata.version("torch")
    except metadata.PackageNotFoundError:
        return None


def versions() -> dict[str, str | None]:
    return {"fsdpck": __version__, "torch": torch_version(), "python": platform.python_version()}


def envelope(command: str, *, code: int, verdict: str, error: str | None, **fields: Any) -> dict[str, Any]:
    """A command's JSON document: the common head, then ``fields`` in the order given."""
    doc: dict[str, Any] = {
        "schema": f"fsdpck.{command}/{SCHEMA_VERSION}",
        "versions": versions(),
        "exit_code": code,
        "outcome": OUTCOME.get(code, "unknown"),
        "verdict": verdict,
        "error": error,
    }
    doc.update(fields)
    return doc


def warnings_field(distinct: list[dict[str, Any]] | None) -> dict[str, Any]:
    """PyTorch's warnings as every document carries them: a count and the distinct messages."""
    distinct = distinct or []
    return {"count": sum(int(w.get("count", 1)) for w in distinct), "distinct": distinct}


def json_number(x: float | None) -> float | str | None:
    """A float as JSON can hold it: non-finite values as the strings "nan", "inf", "-inf"."""
    if x is None or x == x and x not in (float("inf"), float("-inf")):
        return x
    return "nan" if x != x else ("inf" if x > 0 else "-inf")
