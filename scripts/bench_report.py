"""The benchmark's figures from its raw measurements, and how they read: the JSON document
(``fsdpck.bench/1``), the tables, the verdict line and docs/benchmarks.md's markdown.

Data in, data out: :func:`document` turns what ``bench_run.run_bench`` measured (every rank's
wall and CPU seconds and peak memory per phase and repetition) into medians, spreads, ratios
against their targets and memory per rank; :func:`render` and :func:`markdown` only read it.
"""

from __future__ import annotations

import statistics
from typing import Any

from rich.console import Group
from rich.text import Text

from fsdpck.report.envelope import envelope, warnings_field
from fsdpck.report.formats import LineTable, fmt_bytes

# Phases timed in every repetition: name -> what the tables call it ("  " marks a part of the row above).
PHASES = {
    "raw-write": "disk: write + fsync",
    "raw-read": "disk: read (pages dropped)",
    "bare-save": "bare dcp.save",
    "fsdpck-save": "fsdpck save",
    "fsdpck-save-dcp": "  of which inside DCP",
    "bare-load": "bare dcp.load",
    "fsdpck-load": "fsdpck load",
    "fsdpck-load-dcp": "  of which inside DCP",
    "bare-resume": "bare resume (get + dcp.load + set)",
    "bare-get-state-dict": "  of which get_state_dict",
    "bare-set-state-dict": "  of which set_state_dict",
    "fsdpck-read-back": "fsdpck read-back of the loaded state",
    "fsdpck-fingerprint": "fsdpck fingerprint (saved + loaded)",
    "fsdpck-compare": "fsdpck compare_round_trip",
    "bare-setup": "set-up: fresh model (bare)",
    "fsdpck-setup": "set-up: fresh model (fsdpck)",
    "bare-step": "set-up: train (bare)",
    "fsdpck-step": "set-up: train (fsdpck)",
    "bare-state-dict": "set-up: state dict (bare)",
    "fsdpck-state-dict": "set-up: state dict (fsdpck)",
}
# fsdpck's own phases (`fsdpck verify`'s run_flow): the memory target's figure is taken over these
# (set-up and repetition 0).
FSDPCK_PHASES = ("step", "state-dict", "fsdpck-step", "fsdpck-state-dict", "fsdpck-fingerprint", "fsdpck-save",
                 "fsdpck-setup", "fsdpck-load", "fsdpck-read-back", "fsdpck-compare")
RESUME_PARTS = ("bare-get-state-dict", "bare-load", "bare-set-state-dict")  # bare-resume is their sum, per rank
CHECK = ("fsdpck-read-back", "fsdpck-fingerprint", "fsdpck-compare")  # what verify adds to save + load
ONCE = ("warm-up", "step", "state-dict")  # once: the reference state's fingerprints and bytes
MEMORY_TARGET = 2.2


def targets_for(device_type: str) -> dict[str, dict[str, Any]]:
    gpu = device_type == "cuda"
    return {
        "save_vs_bare": {"label": "fsdpck save / bare dcp.save", "target": 1.05, "op": "<=", "text": "≤ 1.05"},
        "load_vs_bare": {"label": "fsdpck load / bare dcp.load", "target": 1.05, "op": "<=", "text": "≤ 1.05"},
        "load_dcp_vs_bare": {"label": "  its DCP part / bare dcp.load", "target": None, "text": "(info)"},
        "load_vs_resume": {"label": "fsdpck load / bare resume", "target": None, "text": "(info)"},
        "save_vs_disk": {"label": "save GB/s / disk write GB/s", "target": None, "text": "(info: ≤ 1 expected)"},
        "load_vs_disk": {"label": "load GB/s / disk read GB/s", "target": None, "text": "(info: ≤ 1 expected)"},
        "check_cost": {"label": "(read-back + fingerprint + compare) / (save + load)", "target": 0.10 if gpu else 0.5,
                       "op": "<=", "text": "≤ 0.10 on GPU" if gpu else "≤ 0.5 on CPU"},
        "fingerprint_gbps_per_rank": {"label": "fingerprint GB/s per rank", "target": None, "text": "(info)"},
        "fingerprint_gb_per_cpu_s": {"label": "fingerprint GB per CPU-second", "target": None if gpu else 1.0,
                                     "op": ">=", "text": "(info)" if gpu else "≥ 1 GB/s per CPU core"},
        "fingerprint_vs_copy": {"label": "fingerprint GB/s / copy_ GB/s", "target": 0.5 if gpu else None, "op": ">=",
                                "text": "≥ 0.5 on GPU (within 2× of copy_)" if gpu else "(info)"},
    }


def _stats(values: list[float]) -> dict[str, float]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def _met(value: float | None, spec: dict[str, Any]) -> bool | None:
    if value is None or spec.get("target") is None:
        return None
    return value <= spec["target"] if spec["op"] == "<=" else value >= spec["target"]


def _div(a: float, b: float) -> float:
    return a / b if b > 0 else 0.0


def _times(ranks: list[dict[str, Any]], field: str) -> list[dict[str, list[float | None]]]:
    """Per repetition: phase -> that field on every rank (bare-resume: each rank's own sum of its parts)."""
    out = []
    for rep in range(len(ranks[0]["reps"])):
        names = list(ranks[0]["reps"][rep])
        per = {n: [r["reps"][rep][n].get(field) for r in ranks] for n in names}
        if all(p in per for p in RESUME_PARTS):
            per["bare-resume"] = [sum(parts) if None not in parts else None for parts in zip(*(per[p] for p in RESUME_PARTS))]
        out.append(per)
    return out


def _phases(wall, cpu, ranks, total: int) -> dict[str, Any]:
    written = [r["written"] for r in ranks]
    held = [r["held"] for r in ranks]
    io = (total, written)
    sizes = {n: io for n in ("raw-write", "raw-read", "bare-save", "bare-load", "bare-resume", "fsdpck-save",
                             "fsdpck-save-dcp", "fsdpck-load", "fsdpck-load-dcp")}
    sizes["fsdpck-fingerprint"] = (2 * sum(held), [2 * h for h in held])  # every piece a rank holds, saved and loaded
    phases: dict[str, Any] = {}
    for name in wall[0]:
        slowest = [max(rep[name]) for rep in wall]
        entry: dict[str, Any] = {"label": PHASES.get(name, name), "per_rep_per_rank_s": [rep[name] for rep in wall],
                                 "per_rep_per_rank_cpu_s": [rep.get(name) for rep in cpu], "slowest_s": slowest,
                                 **{f"{k}_s": v for k, v in _stats(slowest).items()}}
        if name in sizes:
            nbytes, per_rank = sizes[name]
            entry.update(bytes=nbytes, bytes_per_rank=per_rank, gbps=_div(nbytes, entry["median_s"]) / 1e9 or None)
            # Each rank's own bytes over its own time, the slowest of them (median over repetitions).
            entry["gbps_per_rank"] = statistics.median(
                min(_div(b, t) for b, t in zip(per_rank, rep[name])) / 1e9 for rep in wall)
        phases[name] = entry
    return phases


def _ratios(wall, cpu, ranks, device: str, backend: str) -> dict[str, Any]:
    nreps = len(wall)
    slowest = {n: [max(rep[n]) for rep in wall] for n in wall[0]}

    def ratio(num: tuple[str, ...], den: tuple[str, ...]) -> list[float]:
        return [_div(sum(slowest[n][i] for n in num), sum(slowest[d][i] for d in den)) for i in range(nreps)]

    fp_bytes = [2 * r["held"] for r in ranks]
    fp_wall = [min(_div(b, t) for b, t in zip(fp_bytes, rep["fsdpck-fingerprint"])) / 1e9 for rep in wall]
    fp_cpu = [min(_div(b, t) for b, t in zip(fp_bytes, rep["fsdpck-fingerprint"])) / 1e9 for rep in cpu]
    copy = min(_div(r["copy_bytes"], r["copy_s"]) for r in ranks) / 1e9  # the slowest rank's, all copying at once
    per_rep = {
        "save_vs_bare": ratio(("fsdpck-save",), ("bare-save",)),
        "load_vs_bare": ratio(("fsdpck-load",), ("bare-load",)),
        "load_vs_resume": ratio(("fsdpck-load",), ("bare-resume",)),
        "save_vs_disk": ratio(("raw-write",), ("fsdpck-save",)),  # the same bytes: GB/s ratio = inverse time ratio
        "load_vs_disk": ratio(("raw-read",), ("fsdpck-load",)),
        "check_cost": ratio(CHECK, ("fsdpck-save", "fsdpck-load")),
        "fingerprint_gbps_per_rank": fp_wall,
        "fingerprint_gb_per_cpu_s": fp_cpu,
        "fingerprint_vs_copy": [_div(f, copy) for f in fp_wall],
    }
    if "fsdpck-load-dcp" in slowest:
        per_rep["load_dcp_vs_bare"] = ratio(("fsdpck-load-dcp",), ("bare-load",))
    out: dict[str, Any] = {}
    for key, spec in targets_for(device).items():
        if key not in per_rep:
            continue
        s = _stats(per_rep[key])
        out[key] = {"label": spec["label"], "per_rep": per_rep[key], **s, "target": spec.get("target"),
                    "target_text": spec["text"], "met": _met(s["median"], spec)}
    fp = out["fingerprint_gbps_per_rank"]
    fp.update(per_cpu_second=out["fingerprint_gb_per_cpu_s"]["median"], backend=backend, copy_gbps_per_rank=copy)
    return out


def _memory(ranks: list[dict[str, Any]], gpu: bool, per_phase: bool) -> dict[str, Any]:
    per_rank = []
    for r in ranks:
        share, base, warm = r["held"], r["rss_baseline"], r["rss_warm"]
        table: dict[str, dict[str, int]] = {}
        for rep, figures in enumerate([r["once"], *r["reps"]]):
            for name, f in figures.items():
                if "rss" not in f:  # a part of a phase (DCP's core): no memory of its own
                    continue
                t = table.setdefault(name, {"rss": 0, "cuda_max_allocated": 0, "rss_rep0": 0,
                                            "cuda_max_allocated_rep0": 0, "rss_at_start_rep0": f["rss_start"]})
                t["rss"], t["cuda_max_allocated"] = max(t["rss"], f["rss"]), max(t["cuda_max_allocated"], f["cuda"])
                if rep <= 1:  # the set-up and repetition 0, where fsdpck's pair runs before any bare DCP path
                    t["rss_rep0"] = max(t["rss_rep0"], f["rss"])
                    t["cuda_max_allocated_rep0"] = max(t["cuda_max_allocated_rep0"], f["cuda"])
        own = {n: v for n, v in table.items() if n in FSDPCK_PHASES}
        measured = per_phase and own
        rss = max(v["rss_rep0"] for v in own.values()) if measured else r["rss_peak"]
        cuda = max(v["cuda_max_allocated_rep0"] for v in own.values()) if measured else r["cuda_peak"]
        key = "cuda_max_allocated" if gpu else "rss"
        per_rank.append({
            "rank": r["rank"], "share_bytes": share, "rss_baseline": base, "rss_warm": warm, "rss_peak": rss,
            "cuda_max_allocated": cuda, "rss_ratio": _div(rss - warm, share), "rss_ratio_setup": _div(rss - base, share),
            "cuda_ratio": _div(cuda, share) if gpu else None,
            "peak_phase": max(own, key=lambda n: own[n][key + "_rep0"]) if measured else None,
            "process": {"rss_peak": r["rss_peak"], "cuda_max_allocated": r["cuda_peak"],
                        "rss_ratio": _div(r["rss_peak"] - warm, share),
                        "cuda_ratio": _div(r["cuda_peak"], share) if gpu else None,
                        "peak_phase": max(table, key=lambda n: table[n][key])},
            "phases": table,
        })
    key = "cuda_ratio" if gpu else "rss_ratio"
    worst = max(m[key] for m in per_rank)
    return {
        "label": "memory: CUDA max allocated / share" if gpu else "memory: (peak RSS − RSS after the warm-up) / share",
        "basis": "CUDA max allocated / share" if gpu else "(peak RSS − RSS after the warm-up) / share",
        "scope": ("fsdpck's phases in the set-up and repetition 0, before any bare DCP path ran" if per_phase else
                  "the whole process, bare DCP's paths included: VmHWM cannot be reset here"),
        "baselines": {"rss_baseline": "peak RSS right after process-group set-up (what fsdpck verify reports)",
                      "rss_warm": "RSS after a tiny untimed round trip: PyTorch's modules, pools and kernels loaded"},
        "per_rank": per_rank, "ratio_max": worst,
        "rss_ratio_max": max(m["rss_ratio"] for m in per_rank),
        "rss_ratio_setup_max": max(m["rss_ratio_setup"] for m in per_rank),
        "process_ratio_max": max(m["process"][key] for m in per_rank),
        "target": MEMORY_TARGET, "target_text": f"≤ {MEMORY_TARGET}", "met": worst <= MEMORY_TARGET,
    }


def figures(raw: dict[str, Any]) -> dict[str, Any]:
    """Everything the report shows and the JSON keeps, from the raw measurements."""
    ranks = raw["ranks"]
    wall, cpu = _times(ranks, "wall"), _times(ranks, "cpu")
    total = sum(k["bytes"] for k in raw["keys"])
    gpu = raw["device"] == "cuda"
    resident = {kind: [f for r in ranks for f in r["resident"][kind] if f is not None] for kind in ("raw", "bare", "fsdpck")}
    once = {n: [r["once"][n]["wall"] for r in ranks] for n in ONCE if n in ranks[0]["once"]}
    # The raw figures stay, every rank's (its "ranks" entry); the rest is derived from them.
    fields = {k: v for k, v in raw.items() if k not in ("cache_note", "fingerprint_backend")}
    fields.update(
        reps=len(wall), state_bytes=total,
        rank_bytes={"held": [r["held"] for r in ranks], "written": [r["written"] for r in ranks],
                    "fingerprinted": [2 * r["held"] for r in ranks]},
        once={n: {"per_rank_s": v, "slowest_s": max(v)} for n, v in once.items()},
        phases=_phases(wall, cpu, ranks, total),
        ratios=_ratios(wall, cpu, ranks, raw["device"], raw["fingerprint_backend"]),
        memory=_memory(ranks, gpu, raw["memory_per_phase"]),
        page_cache={"note": raw["cache_note"], "resident_after_drop": resident},
    )
    fields["ranks"] = fields.pop("ranks")  # the raw figures last
    return fields


def missed(doc: dict[str, Any]) -> list[str]:
    out = [r["label"].strip() for r in doc["ratios"].values() if r["met"] is False]
    return out + (["memory"] if not doc["memory"]["met"] else [])


def verdict(doc: dict[str, Any] | None, *, code: int, error: str | None) -> str:
    """The last line: one line a shell script can grep."""
    if error is not None or doc is None:
        return f"fsdpck bench: FAILED (exit {code}) — {error or 'no result'}"
    n, asked = doc["reps"], doc["reps_requested"]
    targets = f"targets missed: {', '.join(missed(doc))}" if missed(doc) else "every target met"
    if code == 0:
        run = f"{n} of {n} repetition(s)" + (f" run ({asked} asked for)" if n != asked else "")
        return f"fsdpck bench: VERIFIED (exit 0) — round trip verified in {run}; {targets}"
    return f"fsdpck bench: DIFFERENCE (exit {code}) — the round trip differed in a repetition; {targets}"


def document(raw: dict[str, Any] | None, *, code: int, error: str | None, warnings: list[dict[str, Any]] | None,
             ctx: Any = None, elapsed: float | None = None) -> dict[str, Any]:
    """The ``fsdpck.bench/1`` document: the envelope every command's JSON starts with, then every figure."""
    fields = figures(raw) if raw is not None else {
        "world_size": ctx.world_size if ctx else None, "device": ctx.device.type if ctx else None}
    return envelope("bench", code=code, verdict=verdict(fields if raw else None, code=code, error=error), error=error,
                    **fields, elapsed_s=elapsed, warnings=warnings_field(warnings))


# --- reading it ---------------------------------------------------------------------------------


def _s(x: float) -> str:
    return f"{x:.3f}" if x < 100 else f"{x:.1f}"


def _num(x: float | None) -> str:
    """Three significant digits, however small (tiny test runs have tiny rates)."""
    if x is None:
        return ""
    return f"{x:.3g}" if abs(x) < 1000 else f"{x:.0f}"


def _frac(values: list[float]) -> str:
    return f"{100 * max(values):.0f}%" if values else "unknown"


def _table(title: str, columns: list[str], left: tuple[str, ...]) -> LineTable:
    table = LineTable(title)
    for col in columns:
        table.add_column(col, justify="left" if col in left else "right")
    return table


def render(doc: dict[str, Any]) -> Group:
    """The head, the phases, the ratios and memory per rank, and the notes: everything above the verdict."""
    f, d, gpu = doc["flow"], doc["dir"], doc["device"] == "cuda"
    head = Text(
        f"fsdpck bench · {doc['date']} · {doc['hostname']} · torch {doc['versions']['torch']}\n"
        f"{doc['device']} ({doc['device_name']}) × {doc['world_size']} ranks, {doc['threads_per_rank']} thread(s) each, "
        f"{doc['cpu_count']} CPUs, load average {doc['loadavg']['start'][0]:.1f} → {doc['loadavg']['end'][0]:.1f}\n"
        f"state {fmt_bytes(doc['state_bytes'])} (width {doc['width']}, dims {doc['dims']}, fsdp{f['fsdp']} {f['api']}, "
        f"{f['optimizer']} {f['dtype']}), {doc['reps']} rep(s); verify compared the loaded state with "
        f"{'the saved tensors' if doc.get('saved_copy_kept') else 'the saved state fingerprints'}\n"
        f"dir {d['path']} on {d['fstype']} ({d['device']}, {fmt_bytes(d['free_bytes'])} free)")
    phases = _table("phases: slowest rank, seconds", ["phase", "median", "min–max", "GB/s", "GB/s per rank"], ("phase",))
    for name in PHASES:
        p = doc["phases"].get(name)
        if p is not None:
            phases.add_row(p["label"], _s(p["median_s"]), f"{_s(p['min_s'])}–{_s(p['max_s'])}", _num(p.get("gbps")),
                           _num(p.get("gbps_per_rank")))
    ratios = _table("ratios: median of per-repetition ratios", ["ratio", "median", "min–max", "target", "met"],
                    ("ratio", "target"))
    for r in doc["ratios"].values():
        ratios.add_row(r["label"], _num(r["median"]), f"{_num(r['min'])}–{_num(r['max'])}", r["target_text"],
                       {True: "met", False: "MISSED", None: ""}[r["met"]])
    m = doc["memory"]
    ratios.add_row(m["label"], _num(m["ratio_max"]), "", m["target_text"], "met" if m["met"] else "MISSED")
    cols = ["rank", "share", "RSS set-up", "RSS warm", "RSS peak", "−warm /share", "−set-up /share"]
    memory = _table(f"peak memory per rank: {m['scope']}; target ratio {m['basis']}",
                    cols + (["CUDA max", "CUDA /share"] if gpu else []) + ["peak in", "whole run"], ())
    for r in m["per_rank"]:
        cells = [str(r["rank"]), fmt_bytes(r["share_bytes"]), fmt_bytes(r["rss_baseline"]), fmt_bytes(r["rss_warm"]),
                 fmt_bytes(r["rss_peak"]), _num(r["rss_ratio"]), _num(r["rss_ratio_setup"])]
        if gpu:
            cells += [fmt_bytes(r["cuda_max_allocated"]), _num(r["cuda_ratio"])]
        memory.add_row(*cells, r["peak_phase"] or "?", _num(r["process"]["cuda_ratio" if gpu else "rss_ratio"]))
    fp = doc["ratios"]["fingerprint_gbps_per_rank"]
    where = ", ".join(sorted({r["process"]["peak_phase"] for r in m["per_rank"]}))
    res = doc["page_cache"]["resident_after_drop"]
    notes = [
        f"whole run: the memory ratio over every phase, bare DCP's included (peak in {where}).",
        f"fingerprint ({fp['backend']}): {_num(fp['median'])} GB/s per rank ({doc['threads_per_rank']} intra-op "
        f"thread(s)), {_num(fp['per_cpu_second'])} GB per CPU-second; dst.copy_(src) on the same device, every rank "
        f"at once: {_num(fp['copy_gbps_per_rank'])} GB/s per rank, so the fingerprint runs at "
        f"{100 * doc['ratios']['fingerprint_vs_copy']['median']:.2g}% of memory-copy speed.",
        f"page cache after the drop, worst: disk file {_frac(res['raw'])}, bare checkpoint {_frac(res['bare'])}, "
        f"fsdpck checkpoint {_frac(res['fsdpck'])} resident. Note: {doc['page_cache']['note']}.",
        f"the bare load's result compared equal to the saved state: {doc['bare_load_matched']}; "
        f"{doc['warnings']['count']} PyTorch warning(s) hidden (--verbose shows them).",
    ]
    if doc["stopped_early"]:
        notes.append(doc["stopped_early"] + ".")
    return Group(head, Text(""), phases, Text(""), ratios, Text(""), memory, Text(""), Text("\n".join(notes)))


def markdown(docs: list[dict[str, Any]]) -> str:
    """The tables of docs/benchmarks.md from one or more JSON documents (one column each)."""
    names = [f"{d['device']} ×{d['world_size']}, {d['state_bytes'] / 1e9:.3g} GB, fsdp{d['flow']['fsdp']} {d['flow']['api']}"
             for d in docs]
    out = ["| phase: slowest rank, s | " + " | ".join(f"{n}: median (min–max) · GB/s" for n in names) + " |",
           "| --- |" + " --- |" * len(docs)]
    for key, label in PHASES.items():
        cells = []
        for d in docs:
            p = d["phases"].get(key)
            gb = f" · {_num(p['gbps'])}" if p and p.get("gbps") is not None else ""
            cells.append(f"{p['median_s']:.2f} ({p['min_s']:.2f}–{p['max_s']:.2f}){gb}" if p else "")
        out.append(f"| {'↳ ' + label.strip() if label.startswith('  ') else label} | " + " | ".join(cells) + " |")
    out += ["", "| ratio | target | " + " | ".join(f"{n}: median (min–max)" for n in names) + " |",
            "| --- | --- |" + " --- |" * len(docs)]
    keys = list(dict.fromkeys(k for d in docs for k in d["ratios"]))
    for key in keys:
        first = next(d["ratios"][key] for d in docs if key in d["ratios"])
        cells = []
        for d in docs:
            r = d["ratios"].get(key)
            met = {True: " **met**", False: " **missed**", None: ""}[r["met"]] if r else ""
            cells.append(f"{_num(r['median'])} ({_num(r['min'])}–{_num(r['max'])}){met}" if r else "")
        out.append(f"| {first['label'].strip()} | {first['target_text']} | " + " | ".join(cells) + " |")
    cells = [f"{_num(d['memory']['ratio_max'])} **{'met' if d['memory']['met'] else 'missed'}** "
             f"(whole run {_num(d['memory']['process_ratio_max'])})" for d in docs]
    out.append(f"| memory: {docs[0]['memory']['basis']} | {docs[0]['memory']['target_text']} | " + " | ".join(cells) + " |")
    out.append("")
    for n, d in zip(names, docs):
        gpu = d["device"] == "cuda"
        m, fp = d["memory"]["per_rank"], d["ratios"]["fingerprint_gbps_per_rank"]
        worst = max(m, key=lambda r: r["cuda_ratio" if gpu else "rss_ratio"] or 0)
        cuda = f", CUDA max allocated {worst['cuda_max_allocated'] / 1e9:.3g} GB" if gpu else ""
        out.append(
            f"- {n}: {d['reps']} rep(s) of {d['reps_requested']}; {d['date']} on {d['hostname']} ({d['device_name']}), "
            f"torch {d['versions']['torch']}, {d['threads_per_rank']} thread(s) per rank, load average "
            f"{d['loadavg']['start'][0]:.1f}→{d['loadavg']['end'][0]:.1f}; dir on {d['dir']['fstype']} ({d['dir']['device']}); "
            f"share {worst['share_bytes'] / 1e6:.0f} MB per rank, RSS after set-up {worst['rss_baseline'] / 1e6:.0f} MB, "
            f"after warm-up {worst['rss_warm'] / 1e6:.0f} MB, peak {worst['rss_peak'] / 1e9:.3g} GB in {worst['peak_phase']}{cuda}; "
            f"fingerprint ({fp['backend'].split(':')[0]}) {_num(fp['median'])} GB/s per rank, "
            f"{_num(fp['per_cpu_second'])} GB per CPU-second, copy_ {_num(fp['copy_gbps_per_rank'])} GB/s per rank; "
            f"round trip verified: {d['verified']}; wall {d['wall_s']:.0f} s")
    return "\n".join(out)
