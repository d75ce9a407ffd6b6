"""``fsdpck show``'s result: what was read, the stats, the values; the verdict; ``fsdpck.show/1``."""

from __future__ import annotations

from typing import Any

from rich.console import Group
from rich.text import Text

from fsdpck.report.envelope import envelope, warnings_field
from fsdpck.report.formats import LineTable, fmt_bytes, fmt_shape, fmt_tensor, key_value_lines, plural, status_text
from fsdpck.report.inspect import problem_json, problems_table
from fsdpck.report.stats import add_stats_columns, json_values, stats_cells, stats_json


def _what(result: Any) -> str:
    return result.key + (f"[{result.slice_text}]" if result.slice_text is not None else "")


def verdict(result: Any = None, *, code: int | None = None, error: str | None = None) -> str:
    if error is not None:
        return f"fsdpck show: FAILED (exit {code}) — {error}"
    code = result.exit_code
    if result.problems:
        return (f"fsdpck show: PROBLEMS (exit {code}) — {_what(result)} not read: "
                f"{plural(len(result.problems), 'integrity problem')} ({result.problems[0].message[:160]})")
    if result.error is not None:
        return f"fsdpck show: UNREADABLE (exit {code}) — {_what(result)}: {result.error}"
    if result.kind == "bytes":
        return f"fsdpck show: OK (exit 0) — {result.key}: an object, {fmt_bytes(result.bytes_read)}"
    numel = result.stats.numel if result.stats is not None else 0
    return (f"fsdpck show: OK (exit 0) — {_what(result)}: {fmt_shape(result.result_shape)} {result.dtype}, "
            f"{plural(numel, 'value')} from {plural(result.chunks_read, 'stored chunk')} of {result.n_chunks:,} "
            f"({fmt_bytes(result.bytes_read)} read)")


def render(result: Any) -> Group:
    """What was read, its stats, then its values."""
    rows: list[tuple[str, Any]] = [("checkpoint", result.location), ("key", result.key)]
    if result.kind == "tensor":
        rows.append(("tensor", f"{fmt_tensor(result.shape, result.dtype)}, {plural(result.n_chunks, 'stored chunk')}"))
        if result.slice_text is not None and result.selection is not None:
            sel = result.selection
            box = ", ".join(f"{o}:{o + n}" for o, n in zip(sel.offsets, sel.sizes))
            rows.append(("--slice", f"{result.slice_text!r} = [{box}] → {fmt_shape(sel.shape)}"))
        rows.append(("read", f"{plural(result.chunks_read, 'stored chunk')}, {fmt_bytes(result.bytes_read)}"))
    elif result.kind == "bytes":
        rows.append(("object", f"a byte item, {fmt_bytes(result.bytes_read)}, decoded with weights_only"))
    if result.other_problems:
        rows.append(("note", f"the checkpoint has {plural(result.other_problems, 'other problem')} "
                             "(fsdpck inspect lists them)"))
    parts: list[Any] = [key_value_lines(rows)]
    if result.problems:
        parts.append(problems_table(result.problems))
    if result.error is not None:
        parts.append(Text(f"cannot be read: {result.error}", style="bold red"))
    if result.stats is not None:
        table = LineTable("Stats (min, max, mean, std of the finite values)")
        table.add_column("values", justify="right")
        add_stats_columns(table)
        table.add_column("status", keep=True)
        table.add_row(f"{result.stats.numel:,}", *stats_cells(result.stats), status_text("read ok"))
        parts.append(table)
    if result.text is not None:
        parts.append(Text(result.text))
    return Group(*parts)


def document(result: Any = None, *, code: int, error: str | None = None) -> dict[str, Any]:
    """The ``fsdpck.show/1`` JSON document."""
    doc = envelope("show", code=code, verdict=verdict(result, code=code, error=error), error=error)
    if result is None:
        return doc
    sel = result.selection
    doc.update({
        "path": result.location, "key": result.key, "kind": result.kind,
        "shape": list(result.shape) if result.shape is not None else None, "dtype": result.dtype,
        "chunks": result.n_chunks, "slice": result.slice_text,
        "box": {"offsets": list(sel.offsets), "sizes": list(sel.sizes)} if sel is not None else None,
        "result_shape": list(result.result_shape) if result.result_shape is not None else None,
        "chunks_read": result.chunks_read, "bytes_read": result.bytes_read,
        "stats": stats_json(result.stats),
        "values": json_values(result.values) if result.values is not None else None,
        "values_omitted": result.values_omitted,
        "text": result.text, "canonical": result.canonical, "detail": result.error,
        "problems": [problem_json(p) for p in result.problems], "other_problems": result.other_problems,
        "warnings": warnings_field(result.warnings),
        "timings": {k: round(v, 6) for k, v in result.timings.items()},
    })
    return doc
