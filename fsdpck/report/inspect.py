"""``fsdpck inspect``'s result: summary, keys (or their stats), chunks, files, problems, suspicious
findings; the verdict; ``fsdpck.inspect/1``."""

from __future__ import annotations

from collections import Counter
from typing import Any

from rich.console import Group
from rich.text import Text

from fsdpck.report.envelope import envelope, warnings_field
from fsdpck.report.formats import (
    LineTable,
    clean,
    counts_line,
    fmt_bytes,
    fmt_shape,
    fmt_tensor,
    key_value_lines,
    plural,
    status_text,
)
from fsdpck.report.stats import findings_summary, findings_table, objects_table, stats_json, stats_table, verdict_json

MAX_PROBLEM_ROWS = 200  # more problems than this are summarised in the human report (the JSON has all)


def problems_table(problems: list[Any], *, title: str = "Problems") -> LineTable:
    table = LineTable(title)
    table.add_column("status", keep=True)
    table.add_column("problem")
    table.add_column("key", overflow="ellipsis")
    table.add_column("file", overflow="ellipsis")
    table.add_column("message", overflow="wrap")
    for p in problems[:MAX_PROBLEM_ROWS]:
        table.add_row(status_text("INCOMPLETE" if p.kind == "incomplete" else "PROBLEM"), p.kind, p.key or "-",
                      p.file or "-", p.message)
    if len(problems) > MAX_PROBLEM_ROWS:
        table.add_row("", "", f"... and {len(problems) - MAX_PROBLEM_ROWS:,} more", "", "(all are in --json)")
    return table


def problem_counts(problems: list[Any]) -> str:
    return counts_line(Counter(p.kind for p in problems))


def problem_json(p: Any) -> dict[str, Any]:
    return {"kind": p.kind, "key": p.key, "file": p.file, "message": p.message}


def verdict(result: Any = None, *, code: int | None = None, error: str | None = None) -> str:
    """The last line of ``fsdpck inspect``."""
    if error is not None:
        return f"fsdpck inspect: FAILED (exit {code}) — {error}"
    code = result.exit_code
    suspicious = result.suspicious
    odd = f"{len(suspicious):,} suspicious: {counts_line(Counter(f.rule for f in suspicious))}" if suspicious else ""
    if result.problems:
        kinds = problem_counts(result.problems)
        also = f"; {odd}" if odd else ""
        if result.incomplete:
            return f"fsdpck inspect: INCOMPLETE (exit {code}) — a save that did not finish ({kinds}){also}"
        return f"fsdpck inspect: PROBLEMS (exit {code}) — {plural(len(result.problems), 'problem')}: {kinds}{also}"
    if suspicious and result.strict:
        return (f"fsdpck inspect: SUSPICIOUS (exit {code}) — {odd}; {plural(result.n_keys, 'key')}, whole "
                "(--strict fails on them)")
    shard_files = sum(1 for f in result.files if f.role == "shard" and f.items)
    line = (f"fsdpck inspect: OK (exit 0) — {plural(result.n_keys, 'key')}, {plural(shard_files, 'file')}, "
            f"{fmt_bytes(result.data_bytes)}, whole")
    if result.verify_data:
        checked, verified = len(result.rows), result.count("verified")
        if result.manifest is not None:
            line += f", data verified against fsdpck.json ({verified:,} of {checked:,} keys)"
        else:
            line += f", data readable ({checked:,} keys; no fsdpck.json to check against)"
    if result.stats:
        line += f"; {odd} (--strict fails on them)" if suspicious else "; stats: nothing suspicious"
    return line


def render(result: Any, *, chunks: bool = False, verbose: bool = False) -> Group:
    """The human report: summary, keys, (chunks), files, problems."""
    parts: list[Any] = [_summary(result)]
    if result.readable and result.stats:
        tensors = [r for r in result.rows if r.kind != "bytes"]
        objects = [r for r in result.rows if r.kind == "bytes"]
        if tensors:
            parts.append(stats_table(tensors, title="Tensors (min, max, mean, std of the finite values)"))
        if objects:
            parts.append(objects_table(objects))
        if chunks:
            parts.append(_chunks_table(result))
    elif result.readable:
        parts.append(_keys_table(result))
        if chunks:
            parts.append(_chunks_table(result))
    parts.append(_files_table(result))
    if result.problems:
        parts.append(problems_table(result.problems))
    if result.verdict_rules is not None:
        if result.suspicious:
            parts.append(findings_table(result.suspicious))
        parts.append(Text(findings_summary(result.verdict_rules), style="bold yellow" if result.suspicious else ""))
        for note in result.verdict_rules.notes:
            parts.append(Text(f"note: {clean(note)}", style="yellow"))
    for note in result.notes:
        parts.append(Text(f"note: {clean(note)}", style="yellow"))
    n = sum(w["count"] for w in result.warnings)
    if n and verbose:
        parts.append(Text(f"{plural(n, 'warning')} from PyTorch:", style="dim"))
        parts.extend(Text(f"  {w['count']} × {w['category']}: {clean(w['message'])}", style="dim")
                     for w in result.warnings)
    elif n:
        parts.append(Text(f"{plural(n, 'warning')} from PyTorch hidden (--verbose shows them)", style="dim"))
    if verbose:
        parts.append(Text("timings: " + ", ".join(f"{k} {v:.3f}" for k, v in result.timings.items()), style="dim"))
    return Group(*parts)


def _manifest_line(result: Any) -> Text:
    if result.manifest_error is not None:
        return Text(f"fsdpck.json INVALID: {clean(result.manifest_error)}", style="bold red")
    m = result.manifest
    if m is None:
        return Text("none (not saved by fsdpck; --verify-data checks readability only)")
    return Text(f"fsdpck.json: {len(m.keys):,} keys, world size {m.world_size}, fsdpck {m.fsdpck_version}, "
                f"torch {m.torch_version}, created {m.created}")


def _summary(result: Any) -> Text:
    rows: list[tuple[str, Any]] = [("checkpoint", result.location), ("DCP version", result.dcp_version or "-")]
    if result.readable:
        shard_files = sum(1 for f in result.files if f.role == "shard" and f.items)
        rows += [("keys", f"{result.n_keys:,} ({plural(result.n_tensors, 'tensor')}, "
                          f"{plural(result.n_byte_items, 'byte item')})"),
                 ("data", f"{fmt_bytes(result.data_bytes)} in {plural(shard_files, 'file')}"),
                 ("metadata", f".metadata, {fmt_bytes(result.metadata_bytes)}")]
    else:
        rows.append(("metadata", Text(".metadata missing or unreadable (see problems)", style="bold red")))
    rows.append(("manifest", _manifest_line(result)))
    if result.key_glob is not None:
        rows.append(("--key", f"{result.key_glob!r}: {len(result.rows):,} of {result.n_keys:,} keys"))
    return key_value_lines(rows)


def _keys_table(result: Any) -> LineTable:
    table = LineTable("Keys" if result.key_glob is None else f"Keys matching {result.key_glob!r}")
    table.add_column("key", overflow="ellipsis")
    table.add_column("shape, dtype", overflow="ellipsis")
    table.add_column("chunks", justify="right")
    table.add_column("bytes", justify="right")
    if result.verify_data:
        table.add_column("fingerprint / value", overflow="ellipsis")
    table.add_column("status", overflow="wrap", keep=True)
    for row in result.rows:
        cells: list[Any] = [row.key, fmt_tensor(row.shape, row.dtype) if row.kind != "bytes" else "bytes",
                            str(len(row.chunks)) if row.kind != "bytes" else "-", fmt_bytes(row.stored_bytes)]
        if result.verify_data:
            if row.kind == "bytes":
                cells.append(row.value or "-")
            elif row.status == "MISMATCH":
                cells.append(f"{row.fingerprint} (fsdpck.json: {row.expected})")
            else:
                cells.append(row.fingerprint or "-")
        cells.append(status_text(row.status, row.detail if row.status in ("MISMATCH", "UNREADABLE") else ""))
        table.add_row(*cells)
    return table


def _chunks_table(result: Any) -> LineTable:
    table = LineTable("Chunks")
    for name, justify in (("key", "left"), ("chunk", "right"), ("offsets", "left"), ("sizes", "left"),
                          ("file", "left"), ("byte range", "left"), ("status", "left")):
        table.add_column(name, justify=justify, overflow="ellipsis" if name in ("key", "file") else "fixed",
                         keep=name == "status")
    for row in result.rows:
        for n, c in enumerate(row.chunks):
            where = c.storage
            status = "ok" if where is not None and row.status != "PROBLEM" else "PROBLEM"
            tensor = row.kind != "bytes"
            table.add_row(row.key, str(n) if tensor else "-", fmt_shape(c.offsets) if tensor else "-",
                          fmt_shape(c.sizes) if tensor else "-", where.file if where else "-",
                          f"[{where.offset}, {where.end})" if where else "no storage entry", status_text(status))
    return table


def _files_table(result: Any) -> LineTable:
    table = LineTable("Files")
    table.add_column("file", overflow="ellipsis")
    table.add_column("role")
    table.add_column("size", justify="right")
    table.add_column("items", justify="right")
    table.add_column("referenced", justify="right")
    table.add_column("status", keep=True)
    for f in result.files:
        shard = f.role == "shard"
        table.add_row(f.name, f.role, fmt_bytes(f.size), str(f.items) if shard else "-",
                      fmt_bytes(f.referenced_bytes) if shard else "-", status_text(f.status))
    return table


def document(result: Any = None, *, code: int, error: str | None = None) -> dict[str, Any]:
    """The ``fsdpck.inspect/1`` JSON document."""
    doc = envelope("inspect", code=code, verdict=verdict(result, code=code, error=error), error=error)
    if result is None:
        return doc
    m = result.manifest
    doc.update({
        "path": result.location, "dcp_version": result.dcp_version, "world_size": m.world_size if m else None,
        "backend": None, "device": "cpu", "key_glob": result.key_glob, "verify_data": result.verify_data,
        "stats": result.stats, "strict": result.strict,
        "summary": {"status": result.status, "keys": result.n_keys, "tensors": result.n_tensors,
                    "byte_items": result.n_byte_items, "data_bytes": result.data_bytes,
                    "metadata_bytes": result.metadata_bytes,
                    "files": sum(1 for f in result.files if f.role == "shard" and f.items), "readable": result.readable,
                    "suspicious": len(result.suspicious) if result.stats else None},
        "manifest": {"present": m is not None or result.manifest_error is not None, "valid": m is not None,
                     "error": result.manifest_error, "fsdpck_version": m.fsdpck_version if m else None,
                     "torch_version": m.torch_version if m else None, "world_size": m.world_size if m else None,
                     "created": m.created if m else None, "keys": len(m.keys) if m else None},
        "keys": [{"key": r.key, "kind": r.kind, "shape": list(r.shape) if r.shape is not None else None,
                  "dtype": r.dtype, "stored_bytes": r.stored_bytes, "status": r.status, "fingerprint": r.fingerprint,
                  "expected": r.expected, "value": r.value, "detail": r.detail, "stats": stats_json(r.stats),
                  "suspicious": list(r.suspicious),
                  "chunks": [{"offsets": list(c.offsets), "sizes": list(c.sizes),
                              "file": c.storage.file if c.storage else None,
                              "byte_offset": c.storage.offset if c.storage else None,
                              "byte_length": c.storage.length if c.storage else None} for c in r.chunks]}
                 for r in result.rows],
        "files": [{"name": f.name, "role": f.role, "size": f.size, "items": f.items,
                   "referenced_bytes": f.referenced_bytes, "status": f.status} for f in result.files],
        "problems": [problem_json(p) for p in result.problems],
        "suspicious": verdict_json(result.verdict_rules),
        "notes": list(result.notes),
        "warnings": warnings_field(result.warnings),
        "timings": {k: round(v, 6) for k, v in result.timings.items()},
    })
    return doc
