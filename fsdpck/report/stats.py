"""Values described: the stats cells and table of ``inspect --stats`` and ``show``, the suspicious findings, and their JSON."""

from __future__ import annotations

from collections import Counter
from typing import Any

from fsdpck.report.envelope import json_number
from fsdpck.report.formats import LineTable, counts_line, fmt_number, fmt_tensor, plural, status_text

STATS_HEADERS = ("min", "max", "mean", "std", "zeros", "NaN/±Inf")


def _num(x: Any) -> str:
    if x is None:
        return "-"
    if isinstance(x, int) and not isinstance(x, bool):
        return f"{x:,}" if abs(x) < 10**7 else f"{x:.3g}"
    return fmt_number(x)


def nonfinite_cell(s: Any) -> str:
    if not (s.nan or s.posinf or s.neginf):
        return "-"
    return "/".join(count_cell(n, s.numel) if n else "0" for n in (s.nan, s.posinf, s.neginf))


def count_cell(n: int, of: int) -> str:
    """A count in at most 7 cells: exact below a million, "all" when it is every value, else 29.7M."""
    if n and n == of:
        return "all"
    if n < 1_000_000:
        return f"{n:,}"
    return f"{n / 1e6:.3g}M" if n < 1e9 else f"{n / 1e9:.3g}G"


def stats_cells(s: Any) -> list[str]:
    """min, max, mean, std (of the finite values), zeros, NaN/+Inf/-Inf counts."""
    if s is None:
        return ["-"] * len(STATS_HEADERS)
    return [_num(s.min), _num(s.max), _num(s.average), _num(s.std), count_cell(s.zeros, s.numel), nonfinite_cell(s)]


def add_stats_columns(table: LineTable) -> None:
    for header in STATS_HEADERS:
        table.add_column(header, justify="right")


def stats_table(rows: list[Any], *, title: str) -> LineTable:
    """One line per tensor key: numel, the stats, and its status (SUSPICIOUS when it broke a rule)."""
    table = LineTable(title)
    table.add_column("key", overflow="ellipsis")
    table.add_column("numel", justify="right")
    add_stats_columns(table)
    table.add_column("status", overflow="wrap")
    for row in rows:
        numel = count_cell(row.stats.numel, 0) if row.stats is not None else "-"
        table.add_row(row.key, numel, *stats_cells(row.stats), status_cell(row))
    return table


def objects_table(rows: list[Any], *, title: str = "Objects") -> LineTable:
    table = LineTable(title)
    table.add_column("key", overflow="ellipsis")
    table.add_column("value", overflow="wrap")
    table.add_column("status", overflow="wrap")
    for row in rows:
        table.add_row(row.key, row.value or "-", status_cell(row))
    return table


def status_cell(row: Any) -> Any:
    """The row's status; a row that reads fine but breaks a rule is SUSPICIOUS (the Suspicious table says why:
    the rules' names here would take the width the keys need in a 120-column log)."""
    if row.status in ("MISMATCH", "UNREADABLE", "PROBLEM"):
        return status_text(row.status, row.detail or "")
    return status_text("SUSPICIOUS" if row.suspicious else row.status)


def findings_table(findings: list[Any]) -> LineTable:
    table = LineTable("Suspicious")
    table.add_column("status", keep=True)
    table.add_column("rule")
    table.add_column("key", overflow="ellipsis")
    table.add_column("why", overflow="wrap")
    for f in findings:
        table.add_row(status_text("SUSPICIOUS"), f.rule, f.key, f.message)
    return table


def findings_summary(verdict: Any) -> str:
    """One line: what the rules found, and what they could look at."""
    seen = (f"optimizer {', '.join(repr(o) for o in verdict.optimizers)}: "
            f"{plural(verdict.parameters_with_state, 'parameter')} with state, "
            f"{plural(verdict.param_groups, 'param group')}") if verdict.optimizers else "no optimizer recognised"
    if not verdict.findings:
        return f"suspicious: nothing ({seen})"
    return f"suspicious: {counts_line(Counter(f.rule for f in verdict.findings))} ({seen})"


def stats_json(s: Any) -> dict[str, Any] | None:
    if s is None:
        return None
    return {k: json_number(v) if isinstance(v, float) else v for k, v in s.as_dict().items()}


def verdict_json(verdict: Any) -> dict[str, Any] | None:
    if verdict is None:
        return None
    return {"count": len(verdict.findings), "by_rule": dict(Counter(f.rule for f in verdict.findings)),
            "findings": [{"rule": f.rule, "key": f.key, "keys": list(f.keys or (f.key,)), "message": f.message}
                         for f in verdict.findings],
            "optimizers": list(verdict.optimizers), "parameters_with_state": verdict.parameters_with_state,
            "param_groups": verdict.param_groups, "notes": list(verdict.notes)}


def json_values(value: Any) -> Any:
    """Nested lists of numbers as JSON holds them (non-finite floats as "nan", "inf", "-inf")."""
    if isinstance(value, list):
        return [json_values(v) for v in value]
    return json_number(value) if isinstance(value, float) else value
