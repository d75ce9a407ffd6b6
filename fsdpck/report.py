"""Rendering verify's results: rich tables for people, a versioned JSON document for scripts.

One set of facts, two views: both are built from ``roundtrip.VerifyResult``. Render
functions return renderables; only the command prints.
"""

from __future__ import annotations

import math
import platform
from typing import Any

from fsdpck import __version__
from fsdpck.errors import EXIT_MEANING

VERIFY_SCHEMA = "fsdpck.verify/1"

_STATUS_STYLE = {"match": "green", "differs": "bold red", "missing": "bold red", "unexpected": "bold red"}


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n} B"


def _fmt_delta(x: float) -> str:
    if x == 0:
        return "0"
    if not math.isfinite(x):
        return str(x)
    return f"{x:.3g}"


def flow_table(result, *, show_fingerprints: bool = True):
    """The per-FQN diff table of one flow."""
    from rich.table import Table

    from rich import box

    table = Table(title=f"{result.flow.name}", title_justify="left", expand=False, box=box.SIMPLE_HEAD, pad_edge=False)
    table.add_column("FQN", overflow="fold", no_wrap=True)
    table.add_column("state", no_wrap=True)
    table.add_column("shape", no_wrap=True)
    table.add_column("dtype", no_wrap=True)
    table.add_column("sharding", no_wrap=True)
    table.add_column("max |Δ|", justify="right", no_wrap=True)
    table.add_column("differing", justify="right", no_wrap=True)
    if show_fingerprints:
        table.add_column("fingerprint", no_wrap=True)
    table.add_column("status", no_wrap=True, min_width=8)
    for r in result.rows:
        shape = "×".join(str(d) for d in r.shape) if r.shape else ("scalar" if r.shape == [] else "—")
        cells = [
            r.fqn,
            r.state,
            shape,
            r.dtype or "—",
            r.sharding,
            _fmt_delta(r.max_abs_diff),
            f"{r.differing}/{r.numel}",
        ]
        if show_fingerprints:
            if r.fp_before is None and r.fp_after is None:
                cells.append("—")
            elif r.fp_before == r.fp_after:
                cells.append(r.fp_before or "—")
            else:
                cells.append(f"{r.fp_before or '—'} →\n{r.fp_after or '—'}")
        status = f"[{_STATUS_STYLE.get(r.status, 'bold red')}]{r.status.upper()}[/]"
        cells.append(status + (f" {r.note}" if r.note else ""))
        table.add_row(*cells)
    return table


def throughput(result) -> dict[str, float | None]:
    """GB/s of the save and load phases: aggregate (checkpoint bytes / slowest rank) and per rank."""
    out: dict[str, float | None] = {}
    ws = max(1, len(result.memory.get("state_bytes", [])) or 1)
    for phase in ("save", "load"):
        t = result.timings.get(phase)
        agg = result.bytes_written / t / 1e9 if t and result.bytes_written else None
        out[f"{phase}_gbps"] = agg
        out[f"{phase}_gbps_per_rank"] = agg / ws if agg is not None else None
    return out


def flow_footer(result) -> str:
    """Timings, bytes, throughput, memory and what the self-test touched, under a flow's table."""
    t = result.timings
    phases = ", ".join(f"{name} {t[name]:.3f}s" for name in t)
    tp = throughput(result)
    rates = ", ".join(
        f"{phase} {tp[phase + '_gbps']:.2f} GB/s ({tp[phase + '_gbps_per_rank']:.2f} per rank)"
        for phase in ("save", "load") if tp[phase + "_gbps"] is not None
    )
    lines = [
        f"phases (slowest rank): {phases}",
        f"state {human_bytes(result.state_bytes)}, checkpoint {human_bytes(result.bytes_written)} at {result.path}"
        + (f"; {rates}" if rates else ""),
    ]
    mem = result.memory
    if mem:
        peak = max(mem["rss_peak"])
        line = f"peak RSS per rank: max {human_bytes(peak)} (baseline {human_bytes(max(mem['rss_baseline']))})"
        if any(mem["cuda_max_allocated"]):
            line += f"; CUDA max allocated: max {human_bytes(max(mem['cuda_max_allocated']))}"
        lines.append(line)
    if result.self_test:
        s = result.self_test
        lines.append(f"self-test: flipped one bit of {s['fqn']}/{s['state']} on rank {s['rank']}")
    if result.error:
        lines.append(f"[bold red]error[/]: {result.error}")
    return "\n".join(lines)


def summary_table(result):
    """--matrix: one row per combination."""
    from rich import box
    from rich.table import Table

    table = Table(title="flows", title_justify="left", box=box.SIMPLE_HEAD, pad_edge=False)
    for name, kw in (("fsdp", {}), ("api", {}), ("planner", {}), ("save", {}), ("optimizer", {}), ("dtype", {}),
                     ("rows", {"justify": "right"}), ("differing", {"justify": "right"}), ("bytes", {"justify": "right"}),
                     ("save s", {"justify": "right"}), ("load s", {"justify": "right"}), ("status", {})):
        table.add_column(name, no_wrap=True, **kw)
    for r in result.results:
        f = r.flow
        status = "[bold red]ERROR[/]" if r.error else ("[bold red]DIFFERS[/]" if r.differing_rows else "[green]MATCH[/]")
        table.add_row(
            str(f.fsdp), f.api, f.planner, f.save_mode, f.optimizer, f.dtype,
            str(len(r.rows)), str(len(r.differing_rows)), human_bytes(r.bytes_written),
            f"{r.timings.get('save', 0):.3f}", f"{r.timings.get('load', 0):.3f}", status,
        )
    return table


def render_verify(result, *, warnings_count: int = 0, summary: bool = False, details: bool = False):
    """Everything rank 0 prints above the verdict, as one renderable.

    One table per flow; with ``summary`` (--matrix) a row per flow first, then the per-FQN
    tables of the flows that failed (all of them with ``details``).
    """
    from rich.console import Group
    from rich.text import Text

    parts: list[Any] = []
    if summary:
        parts.append(summary_table(result))
        for r in result.results:
            if r.error:
                parts.append(Text.from_markup(f"[bold red]{r.flow.name}[/]: {r.error}"))
    for r in result.results:
        if summary and not details and not r.differing_rows:
            continue
        if r.rows:
            parts.append(flow_table(r))
        parts.append(Text.from_markup(flow_footer(r)))
        parts.append(Text(""))
    d = result.dims
    tail = (
        f"world size {result.world_size}, backend {result.backend}, device {result.device}, "
        f"model dims {d.inp}→{d.a}→{d.b}→{d.c}; "
        f"{warnings_count} PyTorch warning(s) hidden (--verbose shows them)"
    )
    if result.kept:
        tail += f"; checkpoint kept at {result.checkpoint_dir}"
    parts.append(Text(tail))
    return Group(*parts)


def verdict(result=None, *, code: int, error: str | None = None) -> str:
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
        first = ", ".join(f"{row.fqn}/{row.state}" for _, row in bad[:3]) + (" …" if len(bad) > 3 else "")
        return f"fsdpck verify: DIFFERENCE (exit {code}) — {len(bad)} of {rows} rows differ ({first}); {where}"
    flows_bad = [r for r in result.results if r.differing_rows]
    r0, row0 = bad[0]
    return (
        f"fsdpck verify: DIFFERENCE (exit {code}) — {len(flows_bad)} of {n} flow(s) differ, {len(bad)} of {rows} rows "
        f"(first: {r0.flow.name} {row0.fqn}/{row0.state}); world size {result.world_size}"
    )


def versions() -> dict[str, str]:
    import torch

    return {"fsdpck": __version__, "torch": torch.__version__, "python": platform.python_version()}


def verify_document(result=None, *, code: int, error: str | None = None, warnings: list[dict[str, Any]] | None = None,
                    ctx=None, started: float | None = None, elapsed: float | None = None) -> dict[str, Any]:
    """The ``fsdpck.verify/1`` JSON document (README, "JSON output")."""
    doc: dict[str, Any] = {
        "schema": VERIFY_SCHEMA,
        "versions": versions(),
        "world_size": result.world_size if result else (ctx.world_size if ctx else None),
        "backend": result.backend if result else (ctx.backend if ctx else None),
        "device": result.device if result else (str(ctx.device) if ctx else None),
        "exit_code": code,
        "verdict": verdict(result, code=code, error=error),
        "outcome": EXIT_MEANING.get(code, "unknown"),
        "error": error,
        "elapsed_s": elapsed,
        "warnings": {"count": sum(w["count"] for w in warnings or []), "distinct": warnings or []},
        "flows": [],
    }
    if result is not None:
        doc["model_dims"] = result.dims.as_list()
        doc["checkpoint_dir"] = result.checkpoint_dir
        doc["checkpoint_kept"] = result.kept
        for r in result.results:
            doc["flows"].append(
                {
                    "flow": r.flow.as_dict(),
                    "name": r.flow.name,
                    "path": r.path,
                    "exit_code": r.exit_code,
                    "error": r.error,
                    "timings_s": r.timings,
                    "state_bytes": r.state_bytes,
                    "bytes_written": r.bytes_written,
                    "throughput": throughput(r),
                    "memory_bytes": r.memory,
                    "self_test": r.self_test,
                    "rows_compared": len(r.rows),
                    "rows_differing": len(r.differing_rows),
                    "rows": [row.as_dict() for row in r.rows],
                }
            )
    return doc


# --- save / load ---------------------------------------------------------------------

SAVE_SCHEMA = "fsdpck.save/1"
LOAD_SCHEMA = "fsdpck.load/1"


def _phases(t: dict[str, float]) -> str:
    return ", ".join(f"{k} {v:.3f}s" for k, v in t.items())


def render_save(result, *, warnings_count: int = 0):
    from rich.text import Text

    d = result.dims
    return Text(
        f"saved {result.keys} keys ({result.tensors} tensors, {human_bytes(result.bytes_written)}) through "
        f"{result.flow.name} at world size {result.world_size} to {result.directory}\n"
        f"model dims {d.inp}→{d.a}→{d.b}→{d.c}; manifest {result.directory}/fsdpck.json\n"
        f"phases (slowest rank): {_phases(result.timings)}; {warnings_count} PyTorch warning(s) hidden"
    )


def save_verdict(result=None, *, code: int, error: str | None = None) -> str:
    if error is not None:
        return f"fsdpck save: FAILED (exit {code}) — {error}"
    return (f"fsdpck save: SAVED (exit 0) — {result.keys} keys at world size {result.world_size}, "
            f"manifest written, {result.directory}")


def _document_head(schema: str, verdict_line: str, *, code: int, error, warnings, ctx, elapsed) -> dict[str, Any]:
    """What every rank-run command's JSON document starts with."""
    return {
        "schema": schema, "versions": versions(), "exit_code": code, "outcome": EXIT_MEANING.get(code, "unknown"),
        "verdict": verdict_line, "error": error, "elapsed_s": elapsed,
        "world_size": ctx.world_size if ctx else None, "backend": ctx.backend if ctx else None,
        "device": str(ctx.device) if ctx else None,
        "warnings": {"count": sum(w["count"] for w in warnings or []), "distinct": warnings or []},
    }


def save_document(result=None, *, code: int, error: str | None = None, warnings=None, ctx=None, elapsed=None):
    doc = _document_head(SAVE_SCHEMA, save_verdict(result, code=code, error=error), code=code, error=error,
                         warnings=warnings, ctx=ctx, elapsed=elapsed)
    if result is not None:
        doc.update({"directory": result.directory, "flow": result.flow.as_dict(), "model_dims": result.dims.as_list(),
                    "keys": result.keys, "tensors": result.tensors, "bytes_written": result.bytes_written,
                    "timings_s": result.timings})
    return doc


def load_table(result):
    from rich import box
    from rich.table import Table

    table = Table(title=f"{result.directory}: saved at world size {result.saved_world_size} "
                        f"({result.save_flow.get('fsdp')}/{result.save_flow.get('api')}), loaded at "
                        f"{result.world_size} ({result.load_flow.fsdp}/{result.load_flow.api})",
                  title_justify="left", box=box.SIMPLE_HEAD, pad_edge=False)
    table.add_column("DCP key", no_wrap=True, overflow="fold")
    table.add_column("shape", no_wrap=True)
    table.add_column("dtype", no_wrap=True)
    table.add_column("saved", no_wrap=True)
    table.add_column("loaded", no_wrap=True)
    table.add_column("status", no_wrap=True)
    for r in result.rows:
        shape = "×".join(map(str, r.shape)) if r.shape else ("scalar" if r.shape == [] else "—")

        def short(v):
            return "—" if v is None else (v if len(v) <= 18 else v[:17] + "…")

        loaded = "=" if r.status == "match" and r.saved == r.loaded else short(r.loaded)
        status = f"[{_STATUS_STYLE.get(r.status, 'bold red')}]{r.status.upper()}[/]" + (f" {r.note}" if r.note else "")
        table.add_row(r.key, shape, r.dtype or "—", short(r.saved), loaded, status)
    return table


def render_load(run, *, warnings_count: int = 0):
    from rich.console import Group
    from rich.text import Text

    parts: list[Any] = []
    for result in run.results:
        parts.append(load_table(result))
        if result.self_test:
            s = result.self_test
            parts.append(Text(f"self-test: flipped one bit of {s['fqn']}/{s['state']} on rank {s['rank']}"))
        parts.append(Text(f"phases (slowest rank): {_phases(result.timings)}"))
        parts.append(Text(""))
    parts.append(Text(f"{warnings_count} PyTorch warning(s) hidden (--verbose shows them)"))
    return Group(*parts)


def load_verdict(run=None, *, code: int, error: str | None = None) -> str:
    if error is not None:
        return f"fsdpck load: FAILED (exit {code}) — {error}"
    n = sum(len(r.rows) for r in run.results)
    saved = sorted({r.saved_world_size for r in run.results})
    where = f"saved at world size {', '.join(map(str, saved))}, loaded at {run.world_size}"
    dirs = f"{len(run.results)} checkpoints, " if len(run.results) > 1 else ""
    if code == 0:
        return f"fsdpck load: VERIFIED (exit 0) — {dirs}{n} keys match the manifest; {where}"
    bad = [(r, row) for r in run.results for row in r.differing]
    first = ", ".join(f"{row.key} ({row.status})" for _, row in bad[:3]) + (" …" if len(bad) > 3 else "")
    if len(run.results) > 1:
        first = f"first in {bad[0][0].directory}: {first}"
    return f"fsdpck load: DIFFERENCE (exit {code}) — {dirs}{len(bad)} of {n} keys: {first}; {where}"


def load_document(run=None, *, code: int, error: str | None = None, warnings=None, ctx=None, elapsed=None):
    doc = _document_head(LOAD_SCHEMA, load_verdict(run, code=code, error=error), code=code, error=error,
                         warnings=warnings, ctx=ctx, elapsed=elapsed)
    doc["checkpoints"] = []
    for result in run.results if run is not None else []:
        doc["checkpoints"].append({
            "directory": result.directory, "saved_world_size": result.saved_world_size,
            "save_flow": result.save_flow, "load_flow": result.load_flow.as_dict(), "model_dims": result.dims.as_list(),
            "timings_s": result.timings, "self_test": result.self_test, "exit_code": result.exit_code,
            "keys_compared": len(result.rows), "keys_differing": len(result.differing),
            "rows": [r.as_dict() for r in result.rows],
        })
    return doc
