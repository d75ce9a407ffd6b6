"""``fsdpck diff``'s result: both sides, the keys (differences first), problems; the verdict; ``fsdpck.diff/1``."""

from __future__ import annotations

from collections import Counter
from typing import Any

from rich.console import Group

from fsdpck.report.envelope import envelope, json_number, warnings_field
from fsdpck.report.formats import (
    LineTable,
    counts_line,
    fmt_bytes,
    fmt_number,
    fmt_tensor,
    key_value_lines,
    plural,
    status_text,
)
from fsdpck.report.inspect import problem_counts, problem_json, problems_table

MAX_SAME_ROWS = 100  # with more keys than this, the keys that are the same are counted, not listed


def verdict(result: Any = None, *, code: int | None = None, error: str | None = None) -> str:
    if error is not None:
        return f"fsdpck diff: FAILED (exit {code}) — {error}"
    code = result.exit_code
    n = len(result.rows)
    what = counts_line(Counter(r.status.lower() if r.status.isupper() else r.status for r in result.differing))
    if result.problems:
        return (f"fsdpck diff: PROBLEMS (exit {code}) — {plural(len(result.problems), 'integrity problem')}: "
                f"{problem_counts(result.problems)}; {len(result.differing):,} of {plural(n, 'key')} differ"
                + (f": {what}" if result.differing else ""))
    close = result.count("within tolerance")
    if not result.differing and close:
        return (f"fsdpck diff: WITHIN TOLERANCE (exit 0) — {plural(n, 'key')}: same keys, shapes and dtypes; "
                f"{close:,} differ only within {_tolerance(result)}")
    if not result.differing:
        return f"fsdpck diff: IDENTICAL (exit 0) — {plural(n, 'key')}: same keys, shapes, dtypes and data"
    return f"fsdpck diff: DIFFERENT (exit {code}) — {len(result.differing):,} of {plural(n, 'key')} differ: {what}"


def _tolerance(result: Any) -> str:
    t = result.tolerance
    return f"--atol {t.atol:g} --rtol {t.rtol:g}"


def _pair(a: Any, b: Any, fmt=str) -> str:
    if a is None and b is None:
        return "-"
    if a == b:
        return fmt(a)
    return f"{fmt(a) if a is not None else '-'} → {fmt(b) if b is not None else '-'}"


def _diff_cells(row: Any, values: bool) -> list[Any]:
    tensor = (row.kind_a or row.kind_b) != "bytes"

    def chunks(n: int | None) -> str:
        return "-" if n is None else str(n)

    if tensor:
        kind = _pair(fmt_tensor(row.shape_a, row.dtype_a) if row.kind_a else None,
                     fmt_tensor(row.shape_b, row.dtype_b) if row.kind_b else None)
    else:
        kind = _pair(row.kind_a, row.kind_b)
    data = row.detail if row.status == "UNREADABLE" else _pair(row.fingerprint_a, row.fingerprint_b,
                                                                lambda v: v if len(v) <= 16 else v[:16])
    cells = [row.key, kind, f"{chunks(row.chunks_a)}/{chunks(row.chunks_b)}" if tensor else "-", data]
    if values:
        cells.append(_values_cell(row))
    cells.append(status_text(row.status))
    return cells


def _values_cell(row: Any) -> str:
    v = row.values
    if not v:
        return "-"
    if not v["differing"]:
        return f"all {v['elements']:,} within tolerance"
    return (f"{v['differing']:,}/{v['elements']:,} differ, first at {v['first_index']}, max |Δ| "
            f"{fmt_number(v['max_abs_diff'])}, rel {fmt_number(v['max_rel_diff'])}")


def render(result: Any) -> Group:
    """Both sides, then the keys: differences first."""
    sides = []
    for label, side in (("A", result.a), ("B", result.b)):
        ws = f", saved at world size {side.manifest_world_size}" if side.manifest_world_size else ""
        sides.append((label, f"{side.location}  ({plural(side.n_keys, 'key')}, {fmt_bytes(side.data_bytes)} in "
                             f"{plural(side.files, 'file')}{ws})"))
    if result.key_glob is not None:
        sides.append(("--key", repr(result.key_glob)))
    if not result.tolerance.bitwise:
        sides.append(("tolerance", f"{_tolerance(result)}: an element differs when |A - B| > atol + rtol·|B|"))
    parts: list[Any] = [key_value_lines(sides)]
    table = LineTable("Keys")
    table.add_column("key", overflow="ellipsis")
    table.add_column("shape, dtype", overflow="ellipsis")
    table.add_column("chunks A/B", justify="right")
    table.add_column("data", overflow="ellipsis")
    if result.values:
        table.add_column("values", overflow="wrap")
    table.add_column("status", keep=True)
    same = [r for r in result.rows if r.status in ("same", "within tolerance")]
    shown_same = same if len(result.rows) <= MAX_SAME_ROWS else []
    for row in result.differing + shown_same:
        table.add_row(*_diff_cells(row, result.values))
    if len(shown_same) < len(same):
        table.add_row(f"... {len(same):,} keys the same (listed in --json)", *[""] * (len(table.columns) - 2),
                      status_text("same"))
    parts.append(table)
    if result.problems:
        parts.append(problems_table(result.problems, title="Integrity problems"))
    return Group(*parts)


def document(result: Any = None, *, code: int, error: str | None = None) -> dict[str, Any]:
    """The ``fsdpck.diff/1`` JSON document."""
    doc = envelope("diff", code=code, verdict=verdict(result, code=code, error=error), error=error)
    if result is None:
        return doc

    def side(s: Any) -> dict[str, Any]:
        return {"path": s.location, "dcp_version": s.dcp_version, "keys": s.n_keys, "data_bytes": s.data_bytes,
                "files": s.files, "world_size": s.manifest_world_size, "problems": len(s.problems)}

    doc.update({
        "backend": None, "device": "cpu", "a": side(result.a), "b": side(result.b), "key_glob": result.key_glob,
        "values": result.values,
        "tolerance": {"atol": json_number(result.tolerance.atol), "rtol": json_number(result.tolerance.rtol)},
        "summary": {"status": result.status, "keys": len(result.rows), "differing": len(result.differing),
                    "by_status": dict(Counter(r.status for r in result.rows))},
        "rows": [{"key": r.key, "status": r.status, "kind_a": r.kind_a, "kind_b": r.kind_b,
                  "shape_a": list(r.shape_a) if r.shape_a is not None else None,
                  "shape_b": list(r.shape_b) if r.shape_b is not None else None, "dtype_a": r.dtype_a,
                  "dtype_b": r.dtype_b, "chunks_a": r.chunks_a, "chunks_b": r.chunks_b,
                  "fingerprint_a": r.fingerprint_a, "fingerprint_b": r.fingerprint_b,
                  "values": None if r.values is None else {k: json_number(v) if isinstance(v, float) else v
                                                           for k, v in r.values.items()},
                  "max_abs_diff": None if r.values is None else json_number(r.values["max_abs_diff"]),
                  "detail": r.detail} for r in result.rows],
        "problems": [problem_json(p) for p in result.problems],
        "warnings": warnings_field(result.warnings),
        "timings": {k: round(v, 6) for k, v in result.timings.items()},
    })
    return doc
