"""``fsdpck save`` and ``fsdpck load`` results: the report, the verdict line, the JSON document."""

from __future__ import annotations

from typing import Any

from rich.console import Group
from rich.text import Text

from fsdpck.report.envelope import envelope, warnings_field
from fsdpck.report.formats import LineTable, fmt_bytes, fmt_seconds, fmt_tensor, status_text
from fsdpck.report.verify import row_json, short_value


def _layout_name(layout: dict[str, Any]) -> str:
    parts = ([f"hsdp{layout['replicate']}"] if layout.get("replicate", 1) > 1 else []) + (
        [f"tp{layout['tp']}"] if layout.get("tp", 1) > 1 else [])
    return "-".join(parts) or "plain"


# --- save ----------------------------------------------------------------------------------


def render_save(result: Any, *, warnings_count: int = 0) -> Text:
    return Text(
        f"saved {result.keys} keys ({result.tensors} tensors, {fmt_bytes(result.bytes_written)}) through "
        f"{result.flow.name} at world size {result.world_size} to {result.location}\n"
        f"model dims {result.dims.describe()}; manifest {result.location}/fsdpck.json\n"
        f"phases (slowest rank): {fmt_seconds(result.timings)}; {warnings_count} PyTorch warning(s) hidden")


def save_verdict(result: Any = None, *, code: int, error: str | None = None) -> str:
    if error is not None:
        return f"fsdpck save: FAILED (exit {code}) — {error}"
    return (f"fsdpck save: SAVED (exit 0) — {result.keys} keys at world size {result.world_size}, manifest written, "
            f"{result.location}")


def save_document(result: Any = None, *, code: int, error: str | None = None, warnings: list | None = None,
                  ctx: Any = None, elapsed: float | None = None) -> dict[str, Any]:
    doc = envelope("save", code=code, verdict=save_verdict(result, code=code, error=error), error=error,
                   world_size=ctx.world_size if ctx else None, backend=ctx.backend if ctx else None,
                   device=str(ctx.device) if ctx else None, elapsed_s=elapsed, warnings=warnings_field(warnings))
    if result is not None:
        doc.update({"directory": result.location, "flow": result.flow.as_dict(), "model_dims": result.dims.as_list(),
                    "keys": result.keys, "tensors": result.tensors, "bytes_written": result.bytes_written,
                    "timings_s": result.timings})
    return doc


# --- load ----------------------------------------------------------------------------------


def load_table(result: Any) -> LineTable:
    saved = result.save_flow
    table = LineTable(f"{result.location}: saved at world size {result.saved_world_size} "
                      f"(fsdp{saved.get('fsdp')}/{saved.get('api')}, {_layout_name(result.saved_layout)}, torch "
                      f"{result.saved_torch}), loaded at {result.world_size} (fsdp{result.load_flow.fsdp}/"
                      f"{result.load_flow.api}, {result.load_flow.layout.name})")
    table.add_column("DCP key", overflow="ellipsis")
    table.add_column("shape, dtype", overflow="ellipsis")
    table.add_column("saved", overflow="ellipsis")
    table.add_column("loaded", overflow="ellipsis")
    table.add_column("status", overflow="wrap", keep=True)
    for r in result.rows:
        loaded = "=" if r.status == "match" and r.saved == r.loaded else short_value(r.loaded, 18)
        table.add_row(r.key, fmt_tensor(r.shape, r.dtype), short_value(r.saved, 18), loaded,
                      status_text(r.status.upper(), r.note))
    return table


def render_load(run: Any, *, warnings_count: int = 0) -> Group:
    parts: list[Any] = []
    for result in run.results:
        parts.append(load_table(result))
        if result.self_test:
            s = result.self_test
            parts.append(Text(f"self-test: flipped bit {s['bit']} of {s['key']} on rank {s['rank']}"))
        parts.append(Text(f"phases (slowest rank): {fmt_seconds(result.timings)}"))
        parts.append(Text(""))
    parts.append(Text(f"{warnings_count} PyTorch warning(s) hidden (--verbose shows them)"))
    return Group(*parts)


def load_verdict(run: Any = None, *, code: int, error: str | None = None) -> str:
    if error is not None:
        return f"fsdpck load: FAILED (exit {code}) — {error}"
    n = sum(len(r.rows) for r in run.results)
    saved = sorted({r.saved_world_size for r in run.results})
    where = f"saved at world size {', '.join(map(str, saved))}, loaded at {run.world_size}"
    many = f"{len(run.results)} checkpoints, " if len(run.results) > 1 else ""
    if code == 0:
        return f"fsdpck load: VERIFIED (exit 0) — {many}{n} keys match the manifest; {where}"
    bad = [(r, row) for r in run.results for row in r.differing]
    first = ", ".join(f"{row.key} ({row.status})" for _, row in bad[:3]) + (" …" if len(bad) > 3 else "")
    if len(run.results) > 1:
        first = f"first in {bad[0][0].location}: {first}"
    return f"fsdpck load: DIFFERENCE (exit {code}) — {many}{len(bad)} of {n} keys: {first}; {where}"


def load_document(run: Any = None, *, code: int, error: str | None = None, warnings: list | None = None,
                  ctx: Any = None, elapsed: float | None = None) -> dict[str, Any]:
    doc = envelope("load", code=code, verdict=load_verdict(run, code=code, error=error), error=error,
                   world_size=ctx.world_size if ctx else None, backend=ctx.backend if ctx else None,
                   device=str(ctx.device) if ctx else None, elapsed_s=elapsed, warnings=warnings_field(warnings),
                   checkpoints=[])
    for result in run.results if run is not None else []:
        doc["checkpoints"].append({
            "directory": result.location, "saved_world_size": result.saved_world_size, "saved_torch": result.saved_torch,
            "save_flow": result.save_flow, "saved_layout": result.saved_layout, "load_flow": result.load_flow.as_dict(),
            "model_dims": result.dims.as_list(), "timings_s": result.timings, "self_test": result.self_test,
            "exit_code": result.exit_code, "keys_compared": len(result.rows), "keys_differing": len(result.differing),
            "rows": [row_json(r) for r in result.rows],
        })
    return doc
