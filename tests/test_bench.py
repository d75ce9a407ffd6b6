"""scripts/bench.py at a tiny size: every phase timed, the figures plausible, the bytes right (never the speed)."""

from __future__ import annotations

import math
import sys
import time
from pathlib import Path

from conftest import REPO, load_json, run


def test_bench_world_size_1_reports_every_phase_and_the_state_bytes(tmp_path: Path):
    from fsdpck.model import ModelDims, checkpoint_bytes

    out = tmp_path / "bench.json"
    work = tmp_path / "work"
    started = time.perf_counter()
    r = run([sys.executable, str(REPO / "scripts" / "bench.py"), "--width", "4", "--reps", "1", "--dir", str(work),
             "--json", str(out)], cwd=tmp_path, timeout=180)
    wall = time.perf_counter() - started
    assert r.code == 0, r.tail()
    assert "VERIFIED" in r.last_line(), r.tail()
    doc = load_json(out)
    assert doc["schema"] == "fsdpck.bench/1" and doc["world_size"] == 1 and doc["reps"] == 1
    assert doc["verified"] and doc["bare_load_matched"]

    # Every phase, timed once, positive, and no longer than the whole run.
    phases = {"raw-write", "raw-read", "bare-save", "bare-setup", "bare-get-state-dict", "bare-load", "bare-set-state-dict",
              "bare-resume", "fsdpck-save", "fsdpck-save-dcp", "fsdpck-setup", "fsdpck-load", "fsdpck-load-dcp", "compare",
              "fingerprint", "state-entries"}
    assert phases <= set(doc["phases"])
    for name in phases:
        p = doc["phases"][name]
        assert len(p["slowest_s"]) == 1 and len(p["per_rep_per_rank_s"][0]) == 1, name
        assert 0 < p["min_s"] <= p["median_s"] <= p["max_s"] < wall, (name, p)
    # DCP's own share of fsdpck's save and load cannot exceed the phase it is part of.
    assert doc["phases"]["fsdpck-save-dcp"]["median_s"] <= doc["phases"]["fsdpck-save"]["median_s"]
    assert doc["phases"]["fsdpck-load-dcp"]["median_s"] <= doc["phases"]["fsdpck-load"]["median_s"]
    # The bare resume is its three timed parts, summed per rank.
    parts = sum(doc["phases"][n]["median_s"] for n in ("bare-get-state-dict", "bare-load", "bare-set-state-dict"))
    assert math.isclose(doc["phases"]["bare-resume"]["median_s"], parts, rel_tol=1e-9)
    for name in ("warm-up", "step", "state-dict"):
        assert doc["once"][name]["slowest_s"] > 0

    # Bytes: the sum of the state's sizes, key by key, and what the model's dims say.
    keys = doc["keys"]
    for k in keys:
        itemsize = {"float32": 4, "bfloat16": 2, "int64": 8}[k["dtype"]]
        assert k["bytes"] == math.prod(k["shape"]) * itemsize, k
    assert doc["state_bytes"] == sum(k["bytes"] for k in keys)
    dims = ModelDims.from_list(doc["dims"])
    assert dims == ModelDims.for_world(1, 4)
    scalars = sum(k["bytes"] for k in keys if k["shape"] == [])  # Adam's step, one per parameter
    assert doc["state_bytes"] - scalars == checkpoint_bytes(dims, optimizer="adam", dtype="float32")
    # At world size 1 this rank holds and writes all of it; the disk baseline moves the same bytes.
    assert doc["rank_bytes"]["held"] == doc["rank_bytes"]["written"] == [doc["state_bytes"]]
    for name in ("raw-write", "raw-read", "bare-save", "bare-load", "bare-resume", "fsdpck-save", "fsdpck-load"):
        assert doc["phases"][name]["bytes"] == doc["state_bytes"]
        assert doc["phases"][name]["gbps"] > 0
    assert doc["checkpoint_dir_bytes"]["bare"] > doc["state_bytes"]  # data plus .metadata

    # Ratios and memory figures are present and plausible.
    for key in ("save_vs_bare", "load_vs_bare", "load_dcp_vs_bare", "load_vs_resume", "save_vs_disk", "load_vs_disk",
                "check_cost", "fingerprint_gbps_per_rank", "fingerprint_gb_per_cpu_s"):
        ratio = doc["ratios"][key]
        assert 0 < ratio["min"] <= ratio["median"] <= ratio["max"], (key, ratio)
    assert doc["ratios"]["fingerprint_gbps_per_rank"]["copy_gbps_per_rank"] > 0
    (mem,) = doc["memory"]["per_rank"]
    assert mem["share_bytes"] == doc["state_bytes"]
    assert 0 < mem["rss_baseline"] <= mem["rss_peak"] and 0 < mem["rss_warm"] <= mem["rss_peak"]
    assert mem["rss_ratio"] == (mem["rss_peak"] - mem["rss_warm"]) / mem["share_bytes"]
    assert mem["peak_phase"] in doc["memory"]["per_rank"][0]["phases"]
    assert doc["dir"]["fstype"] and doc["versions"]["torch"] and doc["hostname"]

    # Everything it wrote is gone: the --dir it created included.
    assert not work.exists()

    # The tables of docs/benchmarks.md come from the JSON, without a process group.
    md = run([sys.executable, str(REPO / "scripts" / "bench.py"), "--markdown", str(out)], cwd=tmp_path, timeout=60)
    assert md.code == 0, md.tail()
    assert "| fsdpck save / bare dcp.save | ≤ 1.05 |" in md.out and "| bare dcp.load |" in md.out
