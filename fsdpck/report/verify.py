"""``fsdpck verify``'s result as people read it (a table per flow, a summary for --matrix) and as
scripts read it (``fsdpck.verify/1``), plus the verdict line both end with."""

from __future__ import annotations

from typing import Any

from rich.console import Group
from rich.text import Text

from fsdpck.report.envelope import envelope, json_number, warnings_field
from fsdpck.report.formats import LineTable, fmt_bytes, fmt_number, fmt_seconds, fmt_tensor, status_text


def short_value(value: str | None, width: int = 16) -> str:
    if value is None:
        return "-"
    return value if len(value) <= width else value[: width - 1] + "…"


def value_cell(row: Any) -> str:
    """The fingerprint (tensors) or canonical text (objects), saved -> loaded when they differ."""
    if row.saved == row.loaded or row.loaded is None or row.saved is None:
        return short_value(row.saved if row.saved is not None else row.loaded)
    return f"{short_value(row.saved, 8)} → {short_value(row.loaded, 8)}"


def flow_table(result: Any) -> LineTable:
    """The per-key table of one flow."""
    table = LineTable(result.flow.name)
    table.add_column("FQN", overflow="ellipsis")
    table.add_column("state", overflow="ellipsis")
    table.add_column("shape, dtype", overflow="ellipsis")
    table.add_column("layout", overflow="ellipsis")
    table.add_column("max |Δ|", justify="right")
    table.add_column("differing", justify="right")
    table.add_column("fingerprint / value", overflow="ellipsis")
    table.add_column("status", overflow="wrap", keep=True)
    for r in result.rows:
        differing = "-" if r.differing is None else f"{r.differing}/{r.numel}"
        table.add_row(r.fqn, r.state, fmt_tensor(r.shape, r.dtype), r.layout, fmt_number(r.max_abs_diff),
                      differing, value_cell(r), status_text(r.status.upper(), r.note))
    return table


def throughput(result: Any) -> dict[str, float | None]:
    """GB/s of the save and load phases: aggregate (checkpoint bytes / slowest rank) and per rank."""
    out: dict[str, float | None] = {}
    ws = max(1, len(result.memory.get("state_bytes", [])))
    for phase in ("save", "load"):
        t = result.timings.get(phase)
        agg = result.bytes_written / t / 1e9 if t and result.bytes_written else None
        out[f"{phase}_gbps"] = agg
        out[f"{phase}_gbps_per_rank"] = agg / ws if agg is not None else None
    return out


def flow_footer(result: Any) -> Text:
    """Timings, bytes, throughput, memory and what the self-test touched, under a flow's table."""
    tp = throughput(result)
    rates = ", ".join(f"{phase} {tp[phase + '_gbps']:.2f} GB/s ({tp[phase + '_gbps_per_rank']:.2f} per rank)"
                      for phase in ("save", "load") if tp[phase + "_gbps"] is not None and result.bytes_written >= 1e6)
    lines = [f"phases (slowest rank): {fmt_seconds(result.timings)}",
             f"state {fmt_bytes(result.state_bytes)}, checkpoint {fmt_bytes(result.bytes_written)} at {result.path}"
             + (f"; {rates}" if rates else "")]
    mem = result.memory
    if mem:
        line = (f"peak RSS per rank: max {fmt_bytes(max(mem['rss_peak']))} "
                f"(baseline {fmt_bytes(max(mem['rss_baseline']))})")
        if any(mem["cuda_max_allocated"]):
            line += f"; CUDA max allocated: max {fmt_bytes(max(mem['cuda_max_allocated']))}"
        lines.append(line)
    if result.flow.mode.asynchronous and not result.elementwise and result.rows:
        lines.append(f"async: {result.flow.steps_during_save} optimizer step(s) ran during the write; the load is "
                     "compared with the fingerprints taken when the save was called")
    if result.self_test:
        s = result.self_test
        lines.append(f"self-test: flipped bit {s['bit']} of {s['key']} on rank {s['rank']}")
    text = Text("\n".join(lines))
    if result.error:
        text.append("\nerror: ", style="bold red")
        text.append(result.error)
    return text


def summary_table(result: Any) -> LineTable:
    """--matrix: one row per combination."""
    table = LineTable("flows")
    for name, justify in (("fsdp", "left"), ("api", "left"), ("layout", "left"), ("planner", "left"),
                          ("save", "left"), ("optimizer", "left"), ("dtype", "left"), ("rows", "right"),
                          ("diff", "right"), ("save s", "right"), ("load s", "right"), ("status", "left")):
        table.add_column(name, justify=justify, overflow="ellipsis" if name in ("save", "layout") else "fixed",
                         keep=name == "status")
    for r in result.results:
        f = r.flow
        status = "ERROR" if r.error else ("DIFFERS" if r.differing_rows else "MATCH")
        table.add_row(str(f.fsdp), f.api, f.layout.name, f.planner, f.save_mode, f.optimizer, f.dtype, str(len(r.rows)),
                      str(len(r.differing_rows)), f"{r.timings.get('save', 0):.3f}",
                      f"{r.timings.get('load', 0):.3f}", status_text(status))
    return table


def render(result: Any, *, warnings_count: int = 0, summary: bool = False, details: bool = False) -> Group:
    """Everything rank 0 prints above the verdict: a table per flow, or with ``summary`` (--matrix) a
    row per flow first and then the tables of the flows that failed (all of them with ``details``)."""
    parts: list[Any] = []
    if summary:
        parts.append(summary_table(result))
        for r in result.results:
            if r.error:
                parts.append(Text(f"{r.flow.name}: {r.error}", style="bold red"))
    for r in result.results:
        if summary and not details and not r.differing_rows:
            continue
        if r.rows:
            parts.append(flow_table(r))
        parts.append(flow_footer(r))
        parts.append(Text(""))
    first = result.results[0].dims.describe() if result.results else "-"
    tail = (f"world size {result.world_size}, backend {result.backend}, device {result.device}, model dims {first}; "
            f"{warnings_count} PyTorch warning(s) hidden (--verbose shows them)")
    if result.kept:
        tail += f"; checkpoint kept at {result.checkpoint_dir}"
    parts.append(Text(tail))
    return Group(*parts)


def verdict(result: Any = None, *, code: int, error: str | None = None) -> str:
    """The last line: one line a shell script can grep."""
    if error is not None:
        return f"fsdpck verify: FAILED (exit {code}) — {error}"
    rows = sum(len(r.rows) for r in result.results)
    bad = [(r, row) for r in result.results for row in r.differing_rows]
    errored = [r for r in result.results if r.error]
    n = len(result.results)
    where = f"{n} flow(s), {rows} rows, world size {result.world_size}"
    if code == 0:
        return f"fsdpck verify: VERIFIED (exit 0) — {where}, 0 differences"
    if errored:
        return f"fsdpck verify: FAILED (exit {code}) — {len(errored)} of {n} flow(s) raised: {errored[0].error}"
    if n == 1:
        first = ", ".join(f"{row.key} ({row.status})" for _, row in bad[:3]) + (" …" if len(bad) > 3 else "")
        return f"fsdpck verify: DIFFERENCE (exit {code}) — {len(bad)} of {rows} rows differ: {first}; {where}"
    flows_bad = [r for r in result.results if r.differing_rows]
    r0, row0 = bad[0]
    return (f"fsdpck verify: DIFFERENCE (exit {code}) — {len(flows_bad)} of {n} flow(s) differ, {len(bad)} of {rows} "
            f"rows (first: {r0.flow.name} {row0.key} ({row0.status})); world size {result.world_size}")


def row_json(row: Any) -> dict[str, Any]:
    tensor = row.kind == "tensor"
    return {"key": row.key, "group": row.group, "fqn": row.fqn, "state": row.state, "kind": row.kind,
            "sharding": row.layout, "shape": row.shape, "dtype": row.dtype, "numel": row.numel,
            "differing": row.differing, "max_abs_diff": json_number(row.max_abs_diff), "status": row.status,
            "saved": row.saved, "loaded": row.loaded, "fp_before": row.saved if tensor else None,
            "fp_after": row.loaded if tensor else None, "replica_ranks": row.replica_ranks, "note": row.note}


def document(result: Any = None, *, code: int, error: str | None = None, warnings: list[dict[str, Any]] | None = None,
             ctx: Any = None, elapsed: float | None = None) -> dict[str, Any]:
    """The ``fsdpck.verify/1`` JSON document (README, "JSON output")."""
    doc = envelope("verify", code=code, verdict=verdict(result, code=code, error=error), error=error,
                   world_size=result.world_size if result else (ctx.world_size if ctx else None),
                   backend=result.backend if result else (ctx.backend if ctx else None),
                   device=result.device if result else (str(ctx.device) if ctx else None),
                   elapsed_s=elapsed, warnings=warnings_field(warnings), flows=[])
    if result is None:
        return doc
    doc["model_dims"] = result.results[0].dims.as_list() if result.results else None
    doc["checkpoint_dir"] = result.checkpoint_dir
    doc["checkpoint_kept"] = result.kept
    doc["writer"] = result.writer.as_dict()
    for r in result.results:
        doc["flows"].append({
            "name": r.flow.name, "flow": r.flow.as_dict(), "path": r.path, "model_dims": r.dims.as_list(),
            "exit_code": r.exit_code, "error": r.error, "timings_s": r.timings, "state_bytes": r.state_bytes,
            "bytes_written": r.bytes_written, "throughput": throughput(r), "memory_bytes": r.memory,
            "compared": "values" if r.elementwise else "fingerprints", "self_test": r.self_test,
            "rows_compared": len(r.rows), "rows_differing": len(r.differing_rows),
            "rows": [row_json(row) for row in r.rows],
        })
    return doc
