"""Rendering of ``fsdpck inspect`` and ``fsdpck diff``: rich renderables, verdict lines, JSON documents.

One set of facts (``ckptdir.InspectResult`` / ``ckptdir.DiffResult``), two views: the
functions here turn a result into a rich ``Group`` of tables (they never print; the
command does) and into the versioned JSON document (``"schema": "fsdpck.inspect/1"`` /
``"fsdpck.diff/1"``). The verdict line is the last line a command prints, in the form
``fsdpck <command>: <VERDICT> — <details>`` so that a job script can grep it.

Importing this module does not import torch.
"""

from __future__ import annotations

import math
from typing import Any, Iterator

from rich.cells import cell_len
from rich.console import Console, ConsoleOptions, Group
from rich.segment import Segment
from rich.style import Style
from rich.table import Table
from rich.text import Text

from fsdpck import __version__
from fsdpck.ckptdir import (
    D_SAME,
    KIND_BYTES,
    DiffResult,
    DiffRow,
    InspectResult,
    Problem,
)

INSPECT_SCHEMA = "fsdpck.inspect/1"
DIFF_SCHEMA = "fsdpck.diff/1"

# More rows than this of one table are summarised in the human report (the JSON has all).
MAX_PROBLEM_ROWS = 200
MAX_SAME_DIFF_ROWS = 100

_STATUS_STYLE = {
    "ok": "green", "verified": "green", "read ok": "green", "same": "green",
    "PROBLEM": "bold red", "MISMATCH": "bold red", "UNREADABLE": "bold red", "DIFFERENT": "bold red",
    "MISSING": "bold red", "OUTSIDE": "bold red", "LEFTOVER": "bold yellow", "INCOMPLETE": "bold yellow",
    "unreferenced": "yellow", "only in A": "bold red", "only in B": "bold red",
    "KIND DIFFERS": "bold red", "SHAPE DIFFERS": "bold red", "DTYPE DIFFERS": "bold red",
}


def clean(text: Any) -> str:
    """``text`` as one printable line: control characters (a hostile key's escape codes) shown escaped."""
    text = str(text)
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


class LineTable:
    """A table that renders one row per line, in rich's default look, at a cost linear in its cells.

    rich's ``Table`` measures and wraps every cell (about 1 ms a row: 12 s for a
    10,000-key checkpoint), and folds long keys over several lines, which a ``grep`` in a
    cluster log then misses. This one pads each column to its widest cell and never
    wraps: a row longer than the terminal is left to the terminal.
    """

    def __init__(self, title: str | None = None):
        self.title = title
        self.columns: list[tuple[str, str]] = []  # (header, "left" or "right")
        self.rows: list[list[tuple[str, str]]] = []  # (text, style)

    def add_column(self, header: str, *, justify: str = "left") -> None:
        self.columns.append((header, justify))

    def add_row(self, *cells: Any) -> None:
        if len(cells) != len(self.columns):
            raise ValueError(f"{len(cells)} cells for {len(self.columns)} columns")
        row = []
        for cell in cells:
            if isinstance(cell, Text):
                row.append((clean(cell.plain), str(cell.style) if cell.style else ""))
            else:
                row.append((clean(cell), ""))
        self.rows.append(row)

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> Iterator[Segment]:
        # Each rule is (left corner, fill, junction, right corner), as in rich's HEAVY_HEAD box.
        if options.ascii_only:
            top = head_sep = bottom = "+-++"
            head_bar = bar = "|"
        else:
            top, head_sep, bottom, head_bar, bar = "┏━┳┓", "┡━╇┩", "└─┴┘", "┃", "│"
        widths = [cell_len(header) for header, _ in self.columns]
        for row in self.rows:
            for n, (text, _) in enumerate(row):
                width = len(text) if text.isascii() else cell_len(text)
                if width > widths[n]:
                    widths[n] = width

        def rule(chars: str) -> Segment:
            left, fill, mid, right = chars
            return Segment(left + mid.join(fill * (w + 2) for w in widths) + right + "\n")

        def pad(text: str, width: int, justify: str) -> str:
            gap = width - (len(text) if text.isascii() else cell_len(text))
            return (" " * gap + text) if justify == "right" else (text + " " * gap)

        if self.title:
            yield Segment(self.title + "\n", Style(italic=True))
        yield rule(top)
        header_style = Style(bold=True)
        yield Segment(head_bar)
        for (header, justify), width in zip(self.columns, widths):
            yield Segment(" " + pad(header, width, justify) + " ", header_style)
            yield Segment(head_bar)
        yield Segment("\n")
        yield rule(head_sep)
        justifies = [j for _, j in self.columns]
        styles: dict[str, Style] = {}
        # Without colour (a cluster log) styles change nothing: one segment per row is faster.
        use_styles = console.color_system is not None
        for row in self.rows:
            plain: list[str] = [bar]
            for (text, style), width, justify in zip(row, widths, justifies):
                cell = " " + pad(text, width, justify) + " "
                if style and use_styles:
                    yield Segment("".join(plain))
                    plain = []
                    yield Segment(cell, styles.setdefault(style, Style.parse(style)))
                else:
                    plain.append(cell)
                plain.append(bar)
            plain.append("\n")
            yield Segment("".join(plain))
        yield rule(bottom)


def format_bytes(n: int | None) -> str:
    """Bytes in decimal units, as ``du -h --si`` would: 999 B, 1.2 kB, 3.4 MB."""
    if n is None:
        return "-"
    if n < 1000:
        return f"{n} B"
    value = float(n)
    for unit in ("kB", "MB", "GB", "TB", "PB"):
        value /= 1000.0
        if value < 999.95 or unit == "PB":
            return f"{value:.1f} {unit}"
    return f"{n} B"  # pragma: no cover


def _plural(n: int, word: str, plural: str | None = None) -> str:
    return f"{n:,} {word if n == 1 else (plural or word + 's')}"


def _status(status: str) -> Text:
    return Text(status, style=_STATUS_STYLE.get(status, ""))


def _shape(shape: tuple[int, ...] | None) -> str:
    return "-" if shape is None else "[" + ", ".join(str(s) for s in shape) + "]"


def _problem_counts(problems: list[Problem]) -> str:
    counts: dict[str, int] = {}
    for p in problems:
        counts[p.kind] = counts.get(p.kind, 0) + 1
    return ", ".join(f"{n} {kind}" for kind, n in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))


def _problems_table(problems: list[Problem], *, title: str = "Problems") -> LineTable:
    table = LineTable(title)
    for name in ("status", "problem", "key", "file", "message"):
        table.add_column(name)
    for p in problems[:MAX_PROBLEM_ROWS]:
        status = "INCOMPLETE" if p.kind == "incomplete" else "PROBLEM"
        table.add_row(_status(status), p.kind, p.key or "-", p.file or "-", p.message)
    if len(problems) > MAX_PROBLEM_ROWS:
        table.add_row("", "", f"... and {len(problems) - MAX_PROBLEM_ROWS:,} more", "", "(all are in --json)")
    return table


# --- inspect ---------------------------------------------------------------------------


def inspect_verdict(result: InspectResult) -> str:
    """The last line of ``fsdpck inspect``: ``fsdpck inspect: <VERDICT> — ...``."""
    if result.problems:
        kinds = _problem_counts(result.problems)
        if result.incomplete:
            return f"fsdpck inspect: INCOMPLETE — a save that did not finish ({kinds}) (exit {result.exit_code})"
        return (f"fsdpck inspect: PROBLEMS — {_plural(len(result.problems), 'problem')}: {kinds} "
                f"(exit {result.exit_code})")
    shard_files = sum(1 for f in result.files if f.role == "shard" and f.items)
    line = (f"fsdpck inspect: OK — {_plural(result.n_keys, 'key')}, {_plural(shard_files, 'file')}, "
            f"{format_bytes(result.data_bytes)}, whole")
    if result.verify_data:
        checked = len(result.rows)
        verified = result.count("verified")
        if result.manifest is not None:
            line += f", data verified against fsdpck.json ({verified:,} of {checked:,} keys)"
        else:
            line += f", data readable ({checked:,} keys; no fsdpck.json to check against)"
    return line


def render_inspect(result: InspectResult, *, chunks: bool = False, verbose: bool = False) -> Group:
    """The human report of ``fsdpck inspect``: summary, keys, (chunks), files, problems."""
    parts: list[Any] = [_inspect_summary(result)]
    if result.readable:
        parts.append(_keys_table(result))
        if chunks:
            parts.append(_chunks_table(result))
    parts.append(_files_table(result))
    if result.problems:
        parts.append(_problems_table(result.problems))
    for note in result.notes:
        parts.append(Text(f"note: {clean(note)}", style="yellow"))
    if result.warnings:
        if verbose:
            parts.append(Text(f"{_plural(len(result.warnings), 'warning')} from PyTorch:", style="dim"))
            parts.extend(Text(f"  {clean(w)}", style="dim") for w in result.warnings)
        else:
            parts.append(Text(f"{_plural(len(result.warnings), 'warning')} from PyTorch hidden (--verbose shows them)",
                              style="dim"))
    if verbose:
        parts.append(Text("timings: " + ", ".join(f"{k} {v:.3f}" for k, v in result.timings.items()), style="dim"))
    return Group(*parts)


def _manifest_line(result: InspectResult) -> Text:
    if result.manifest_error is not None:
        return Text(f"fsdpck.json INVALID: {clean(result.manifest_error)}", style="bold red")
    m = result.manifest
    if m is None:
        return Text("none (not saved by fsdpck; --verify-data checks readability only)")
    return Text(f"fsdpck.json: {len(m.keys):,} keys, world size {m.world_size}, fsdpck {m.fsdpck_version}, "
                f"torch {m.torch_version}, created {m.created}")


def _grid() -> Table:
    grid = Table.grid(padding=(0, 2))
    grid.add_column(style="bold")
    grid.add_column(overflow="fold")
    return grid


def _cell(value: Any) -> Text:
    """A grid cell as Text: paths and names from a checkpoint dir are never read as rich markup."""
    return value if isinstance(value, Text) else Text(clean(value))


def _inspect_summary(result: InspectResult) -> Table:
    rows: list[tuple[str, Any]] = [("checkpoint", result.path), ("DCP version", result.dcp_version or "-")]
    if result.readable:
        shard_files = sum(1 for f in result.files if f.role == "shard" and f.items)
        rows += [
            ("keys", f"{result.n_keys:,} ({_plural(result.n_tensors, 'tensor')}, "
                     f"{_plural(result.n_byte_items, 'byte item')})"),
            ("data", f"{format_bytes(result.data_bytes)} in {_plural(shard_files, 'file')}"),
            ("metadata", f".metadata, {format_bytes(result.metadata_bytes)}"),
        ]
    else:
        rows.append(("metadata", Text(".metadata missing or unreadable (see problems)", style="bold red")))
    rows.append(("manifest", _manifest_line(result)))
    if result.key_glob is not None:
        rows.append(("--key", f"{result.key_glob!r}: {len(result.rows):,} of {result.n_keys:,} keys"))
    grid = _grid()
    for label, value in rows:
        grid.add_row(label, _cell(value))
    return grid


def _keys_table(result: InspectResult) -> LineTable:
    title = "Keys" if result.key_glob is None else f"Keys matching {result.key_glob!r}"
    table = LineTable(title)
    table.add_column("key")
    table.add_column("kind")
    table.add_column("shape")
    table.add_column("dtype")
    table.add_column("chunks", justify="right")
    table.add_column("bytes", justify="right")
    if result.verify_data:
        table.add_column("fingerprint / value")
    table.add_column("status")
    for row in result.rows:
        cells: list[Any] = [
            row.key, row.kind, _shape(row.shape), row.dtype or "-",
            str(len(row.chunks)) if row.kind != KIND_BYTES else "-", format_bytes(row.stored_bytes),
        ]
        if result.verify_data:
            if row.kind == KIND_BYTES:
                cells.append(row.value or "-")
            elif row.status == "MISMATCH":
                cells.append(f"{row.fingerprint} (fsdpck.json: {row.expected})")
            else:
                cells.append(row.fingerprint or "-")
        cells.append(_status(row.status))
        table.add_row(*cells)
    return table


def _chunks_table(result: InspectResult) -> LineTable:
    table = LineTable("Chunks")
    for name, justify in (("key", "left"), ("chunk", "right"), ("offsets", "left"), ("sizes", "left"),
                          ("file", "left"), ("byte range", "left"), ("status", "left")):
        table.add_column(name, justify=justify)
    for row in result.rows:
        for n, c in enumerate(row.chunks):
            where = c.storage
            status = "ok" if where is not None and row.status != "PROBLEM" else "PROBLEM"
            table.add_row(
                row.key, str(n) if row.kind != KIND_BYTES else "-",
                _shape(c.offsets) if row.kind != KIND_BYTES else "-", _shape(c.sizes) if row.kind != KIND_BYTES else "-",
                where.file if where else "-", f"[{where.offset}, {where.end})" if where else "no storage entry",
                _status(status),
            )
    return table


def _files_table(result: InspectResult) -> LineTable:
    table = LineTable("Files")
    table.add_column("file")
    table.add_column("role")
    table.add_column("size", justify="right")
    table.add_column("items", justify="right")
    table.add_column("referenced", justify="right")
    table.add_column("status")
    for f in result.files:
        table.add_row(f.name, f.role, format_bytes(f.size), str(f.items) if f.role == "shard" else "-",
                      format_bytes(f.referenced_bytes) if f.role == "shard" else "-", _status(f.status))
    return table


def _problem_json(p: Problem) -> dict[str, Any]:
    return {"kind": p.kind, "key": p.key, "file": p.file, "message": p.message}


def inspect_document(result: InspectResult) -> dict[str, Any]:
    """The ``--json`` document of ``fsdpck inspect`` (schema ``fsdpck.inspect/1``)."""
    m = result.manifest
    return {
        "schema": INSPECT_SCHEMA,
        "fsdpck_version": __version__,
        "torch_version": result.torch_version,
        "path": result.path,
        "dcp_version": result.dcp_version,
        "world_size": m.world_size if m is not None else None,
        "backend": None,
        "device": "cpu",
        "key_glob": result.key_glob,
        "verify_data": result.verify_data,
        "summary": {
            "keys": result.n_keys, "tensors": result.n_tensors, "byte_items": result.n_byte_items,
            "data_bytes": result.data_bytes, "metadata_bytes": result.metadata_bytes,
            "files": sum(1 for f in result.files if f.role == "shard" and f.items),
            "readable": result.readable,
        },
        "manifest": {
            "present": m is not None or result.manifest_error is not None,
            "valid": m is not None,
            "error": result.manifest_error,
            "fsdpck_version": m.fsdpck_version if m else None,
            "torch_version": m.torch_version if m else None,
            "world_size": m.world_size if m else None,
            "created": m.created if m else None,
            "keys": len(m.keys) if m else None,
        },
        "keys": [
            {
                "key": r.key, "kind": r.kind, "shape": list(r.shape) if r.shape is not None else None, "dtype": r.dtype,
                "stored_bytes": r.stored_bytes, "status": r.status, "fingerprint": r.fingerprint,
                "expected_fingerprint": r.expected, "value": r.value, "detail": r.detail,
                "chunks": [
                    {"offsets": list(c.offsets), "sizes": list(c.sizes),
                     "file": c.storage.file if c.storage else None,
                     "byte_offset": c.storage.offset if c.storage else None,
                     "byte_length": c.storage.length if c.storage else None}
                    for c in r.chunks
                ],
            }
            for r in result.rows
        ],
        "files": [
            {"name": f.name, "role": f.role, "size": f.size, "items": f.items, "referenced_bytes": f.referenced_bytes,
             "status": f.status}
            for f in result.files
        ],
        "problems": [_problem_json(p) for p in result.problems],
        "notes": list(result.notes),
        "warnings": {"count": len(result.warnings), "messages": list(result.warnings)},
        "timings": {k: round(v, 6) for k, v in result.timings.items()},
        "verdict": result.verdict,
        "verdict_line": inspect_verdict(result),
        "exit_code": result.exit_code,
    }


# --- diff ------------------------------------------------------------------------------


def diff_verdict(result: DiffResult) -> str:
    """The last line of ``fsdpck diff``: ``fsdpck diff: <VERDICT> — ...``."""
    n = len(result.rows)
    if result.problems:
        return (f"fsdpck diff: PROBLEMS — {_plural(len(result.problems), 'integrity problem')}: "
                f"{_problem_counts(result.problems)}; {len(result.differing):,} of {_plural(n, 'key')} differ "
                f"(exit {result.exit_code})")
    if not result.differing:
        return f"fsdpck diff: IDENTICAL — {_plural(n, 'key')}: same keys, shapes, dtypes and data"
    counts: dict[str, int] = {}
    for r in result.differing:
        counts[r.status] = counts.get(r.status, 0) + 1
    what = ", ".join(f"{c} {s.lower() if s.isupper() else s}"
                     for s, c in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))
    return f"fsdpck diff: DIFFERENT — {len(result.differing):,} of {_plural(n, 'key')} differ: {what} (exit {result.exit_code})"


def _fmt_delta(x: float | None) -> str:
    if x is None:
        return "-"
    if math.isnan(x):
        return "nan"
    return f"{x:.6g}"


def _pair(a: Any, b: Any, fmt=str) -> str:
    if a is None and b is None:
        return "-"
    if a == b:
        return fmt(a)
    return f"{fmt(a) if a is not None else '-'} → {fmt(b) if b is not None else '-'}"


def render_diff(result: DiffResult) -> Group:
    """The human report of ``fsdpck diff``: both dirs, then the keys (differences first)."""
    grid = _grid()
    for label, side in (("A", result.a), ("B", result.b)):
        ws = f", saved at world size {side.manifest_world_size}" if side.manifest_world_size else ""
        grid.add_row(label, _cell(f"{side.path}  ({_plural(side.n_keys, 'key')}, {format_bytes(side.data_bytes)} in "
                                  f"{_plural(side.files, 'file')}{ws})"))
    if result.key_glob is not None:
        grid.add_row("--key", _cell(repr(result.key_glob)))
    parts: list[Any] = [grid]

    table = LineTable("Keys")
    table.add_column("key")
    table.add_column("kind")
    table.add_column("shape")
    table.add_column("dtype")
    table.add_column("chunks A/B", justify="right")
    table.add_column("data A")
    table.add_column("data B")
    if result.values:
        table.add_column("max |Δ|", justify="right")
    table.add_column("status")
    differing = result.differing
    same = [r for r in result.rows if r.status == D_SAME]
    shown_same = same if len(result.rows) <= MAX_SAME_DIFF_ROWS else []
    for row in differing + shown_same:
        table.add_row(*_diff_cells(row, result.values))
    if len(shown_same) < len(same):
        table.add_row(f"... {len(same):,} keys the same (listed in --json)", *[""] * (len(table.columns) - 2),
                      _status("same"))
    parts.append(table)
    if result.problems:
        parts.append(_problems_table(result.problems, title="Integrity problems"))
    return Group(*parts)


def _diff_cells(row: DiffRow, values: bool) -> list[Any]:
    def chunks(n: int | None) -> str:
        return "-" if n is None else str(n)

    cells: list[Any] = [
        row.key,
        _pair(row.kind_a, row.kind_b),
        _pair(row.shape_a, row.shape_b, _shape) if (row.kind_a or row.kind_b) != KIND_BYTES else "-",
        _pair(row.dtype_a, row.dtype_b),
        f"{chunks(row.chunks_a)}/{chunks(row.chunks_b)}" if (row.kind_a or row.kind_b) != KIND_BYTES else "-",
        row.fingerprint_a or (row.detail if row.status == "UNREADABLE" else "-"),
        row.fingerprint_b or "-",
    ]
    if values:
        cells.append(_fmt_delta(row.max_abs_diff))
    cells.append(_status(row.status))
    return cells


def _json_float(x: float | None) -> float | str | None:
    if x is None or math.isfinite(x):
        return x
    return "nan" if math.isnan(x) else ("inf" if x > 0 else "-inf")


def diff_document(result: DiffResult) -> dict[str, Any]:
    """The ``--json`` document of ``fsdpck diff`` (schema ``fsdpck.diff/1``)."""

    def side(s) -> dict[str, Any]:
        return {"path": s.path, "dcp_version": s.dcp_version, "keys": s.n_keys, "data_bytes": s.data_bytes,
                "files": s.files, "world_size": s.manifest_world_size, "problems": len(s.problems)}

    counts: dict[str, int] = {}
    for r in result.rows:
        counts[r.status] = counts.get(r.status, 0) + 1
    return {
        "schema": DIFF_SCHEMA,
        "fsdpck_version": __version__,
        "torch_version": result.torch_version,
        "backend": None,
        "device": "cpu",
        "a": side(result.a),
        "b": side(result.b),
        "key_glob": result.key_glob,
        "values": result.values,
        "summary": {"keys": len(result.rows), "differing": len(result.differing), "by_status": counts},
        "rows": [
            {
                "key": r.key, "status": r.status, "kind_a": r.kind_a, "kind_b": r.kind_b,
                "shape_a": list(r.shape_a) if r.shape_a is not None else None,
                "shape_b": list(r.shape_b) if r.shape_b is not None else None,
                "dtype_a": r.dtype_a, "dtype_b": r.dtype_b, "chunks_a": r.chunks_a, "chunks_b": r.chunks_b,
                "fingerprint_a": r.fingerprint_a, "fingerprint_b": r.fingerprint_b,
                "max_abs_diff": _json_float(r.max_abs_diff), "detail": r.detail,
            }
            for r in result.rows
        ],
        "problems": [_problem_json(p) for p in result.problems],
        "warnings": {"count": len(result.warnings), "messages": list(result.warnings)},
        "timings": {k: round(v, 6) for k, v in result.timings.items()},
        "verdict": result.verdict,
        "verdict_line": diff_verdict(result),
        "exit_code": result.exit_code,
    }
