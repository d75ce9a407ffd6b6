"""scripts/bench.py at a tiny size: every phase and figure there and plausible, the bytes right, the
--markdown tables made from its JSON, and a bad --dir through the runner's boundary. Never the
speed: speed is measured by the benchmark, not asserted by a test."""

from __future__ import annotations

import math
import sys
from pathlib import Path

from conftest import REPO, check_envelope, load_json, run

BENCH = str(REPO / "scripts" / "bench.py")
PHASES = {"raw-write", "raw-read", "bare-step", "bare-state-dict", "bare-save", "bare-setup", "bare-get-state-dict",
          "bare-load", "bare-set-state-dict", "bare-resume", "fsdpck-step", "fsdpck-state-dict", "fsdpck-save",
          "fsdpck-save-dcp", "fsdpck-setup", "fsdpck-load", "fsdpck-load-dcp", "fsdpck-read-back",
          "fsdpck-fingerprint", "fsdpck-compare"}
FSDPCK_PHASES = {"step", "state-dict", "fsdpck-step", "fsdpck-state-dict", "fsdpck-save", "fsdpck-setup",
                 "fsdpck-load", "fsdpck-read-back", "fsdpck-fingerprint", "fsdpck-compare"}
RATIOS = {"save_vs_bare", "load_vs_bare", "load_dcp_vs_bare", "load_vs_resume", "save_vs_disk", "load_vs_disk",
          "check_cost", "fingerprint_gbps_per_rank", "fingerprint_gb_per_cpu_s", "fingerprint_vs_copy"}
REPS = 2  # both orders: fsdpck's pair first in repetition 0, bare DCP's first in repetition 1


def test_bench_world_size_1_reports_every_phase_and_figure(tmp_path: Path):
    from fsdpck.state.model import ModelDims, checkpoint_bytes

    out = tmp_path / "bench.json"
    work = tmp_path / "work"  # does not exist: the benchmark makes it and removes it again
    r = run([sys.executable, BENCH, "--width", "4", "--reps", str(REPS), "--dir", str(work), "--json", str(out)],
            cwd=tmp_path, timeout=300)
    assert r.code == 0, r.tail()
    assert "VERIFIED" in r.last_line(), r.tail()
    doc = load_json(out)
    check_envelope(doc, "bench", 0, verdict=r.last_line())
    assert (doc["world_size"], doc["reps"], doc["reps_requested"], doc["stopped_early"]) == (1, REPS, REPS, None)
    assert doc["verified"] and doc["bare_load_matched"]
    assert doc["flow"]["fsdp"] == 1 and doc["flow"]["api"] == "legacy" and doc["flow"]["save_mode"] == "sync"

    # Every phase, timed in every repetition on every rank, positive and within the run.
    assert PHASES <= set(doc["phases"])
    for name in PHASES:
        p = doc["phases"][name]
        assert len(p["slowest_s"]) == REPS and all(len(rep) == 1 for rep in p["per_rep_per_rank_s"]), name
        assert 0 < p["min_s"] <= p["median_s"] <= p["max_s"] < doc["wall_s"], (name, p)
        assert p["label"].strip() in r.out, name  # a row of the printed table
    for name in PHASES - {"bare-resume", "fsdpck-save-dcp", "fsdpck-load-dcp"}:
        assert all(c[0] > 0 for c in doc["phases"][name]["per_rep_per_rank_cpu_s"]), name  # CPU seconds too
    for part, whole in (("fsdpck-save-dcp", "fsdpck-save"), ("fsdpck-load-dcp", "fsdpck-load")):
        # DCP's own share of fsdpck's save and load is a part of it, repetition by repetition.
        assert all(a <= b for a, b in zip(doc["phases"][part]["slowest_s"], doc["phases"][whole]["slowest_s"]))
    parts = [doc["phases"][n]["slowest_s"] for n in ("bare-get-state-dict", "bare-load", "bare-set-state-dict")]
    for rep, total in enumerate(doc["phases"]["bare-resume"]["slowest_s"]):  # the sum of its three timed parts
        assert math.isclose(total, sum(p[rep] for p in parts), rel_tol=1e-9)
    for name in ("warm-up", "step", "state-dict"):
        assert doc["once"][name]["slowest_s"] > 0
    assert len(doc["ranks"]) == 1 and len(doc["ranks"][0]["reps"]) == REPS  # the raw figures, kept whole

    # Bytes: the sum of the state's sizes, key by key, and what the model's dims say.
    keys = doc["keys"]
    for k in keys:
        itemsize = {"float32": 4, "bfloat16": 2, "int64": 8}[k["dtype"]]
        assert k["bytes"] == math.prod(k["shape"]) * itemsize, k
    assert doc["state_bytes"] == sum(k["bytes"] for k in keys) and doc["object_keys"] > 0
    dims = ModelDims.from_list(doc["dims"])
    assert dims == ModelDims.for_world(1, 4) and doc["width"] == 4
    scalars = sum(k["bytes"] for k in keys if k["shape"] == [])  # Adam's step, one per parameter
    assert doc["state_bytes"] - scalars == checkpoint_bytes(dims, optimizer="adam", dtype="float32")
    # At world size 1 this rank holds and writes all of it; the disk baseline moves the same bytes.
    rank_bytes = doc["rank_bytes"]
    assert rank_bytes["held"] == rank_bytes["written"] == [doc["state_bytes"]]
    assert rank_bytes["fingerprinted"] == [2 * doc["state_bytes"]]  # the saved state and the loaded one
    for name in ("raw-write", "raw-read", "bare-save", "bare-load", "bare-resume", "fsdpck-save", "fsdpck-load"):
        assert doc["phases"][name]["bytes"] == doc["state_bytes"]
        assert doc["phases"][name]["gbps"] > 0 and doc["phases"][name]["gbps_per_rank"] > 0
    for name in ("bare", "fsdpck"):
        assert doc["checkpoint_dir_bytes"][name] > doc["state_bytes"]  # data plus .metadata

    # Ratios and their targets, present and plausible.
    assert set(doc["ratios"]) == RATIOS
    for key, ratio in doc["ratios"].items():
        assert len(ratio["per_rep"]) == REPS and 0 < ratio["min"] <= ratio["median"] <= ratio["max"], (key, ratio)
        assert (ratio["met"] is None) == (ratio["target"] is None), (key, ratio)  # a target is met or missed
    assert doc["ratios"]["save_vs_bare"]["target"] == doc["ratios"]["load_vs_bare"]["target"] == 1.05
    assert doc["ratios"]["check_cost"]["target"] == 0.5 and doc["ratios"]["fingerprint_gb_per_cpu_s"]["target"] == 1.0
    fp = doc["ratios"]["fingerprint_gbps_per_rank"]
    assert fp["copy_gbps_per_rank"] > 0 and fp["per_cpu_second"] > 0 and fp["backend"].split(":")[0] in ("c", "torch")

    # Memory per rank against its share, the baselines, and where the peak was.
    memory = doc["memory"]
    (mem,) = memory["per_rank"]
    assert mem["share_bytes"] == doc["state_bytes"]
    # Not rss_warm <= rss_peak: at a tiny size the phases may peak below the RSS right after the warm-up.
    assert 0 < mem["rss_baseline"] <= mem["rss_peak"] and mem["rss_warm"] > 0
    assert mem["rss_ratio"] == (mem["rss_peak"] - mem["rss_warm"]) / mem["share_bytes"]
    assert mem["peak_phase"] in FSDPCK_PHASES and mem["process"]["peak_phase"] in mem["phases"]
    assert mem["process"]["rss_peak"] >= mem["rss_peak"]
    assert memory["target"] == 2.2 and memory["ratio_max"] == mem["rss_ratio"]
    assert memory["met"] == (mem["rss_ratio"] <= 2.2)
    for figures in mem["phases"].values():
        assert 0 < figures["rss_rep0"] <= figures["rss"], figures
    resident = doc["page_cache"]["resident_after_drop"]
    for kind in ("raw", "bare", "fsdpck"):
        assert all(0 <= f <= 1 for f in resident[kind]) and len(resident[kind]) in (0, REPS), resident
    assert doc["dir"]["fstype"] and doc["versions"]["torch"] and doc["hostname"] and doc["loadavg"]["end"]

    # The verdict names the targets missed, from the same figures.
    missed = [v["label"].strip() for v in doc["ratios"].values() if v["met"] is False] + (
        ["memory"] if not memory["met"] else [])
    assert r.last_line().endswith(f"targets missed: {', '.join(missed)}" if missed else "every target met")

    # Everything it wrote is gone: the --dir it created included.
    assert not work.exists()

    # docs/benchmarks.md's tables come from the JSON, without a process group: a column per document.
    md = run([sys.executable, BENCH, "--markdown", str(out), str(out)], cwd=tmp_path, timeout=60)
    assert md.code == 0, md.tail()
    lines = md.out.splitlines()
    assert lines[0].startswith("| phase: slowest rank, s | cpu ×1") and lines[0].count("median (min–max)") == 2
    assert "| fsdpck save / bare dcp.save | ≤ 1.05 |" in md.out and "| bare dcp.load |" in md.out
    assert "| ↳ of which inside DCP |" in md.out and "| memory: (peak RSS − RSS after the warm-up) / share | ≤ 2.2 |" in md.out
    assert sum(line.startswith("- cpu ×1") for line in lines) == 2 and "round trip verified: True" in md.out


def test_bench_bad_dir_is_a_usage_error_through_the_runner(tmp_path: Path):
    """A --dir that cannot be made: exit 2, one error paragraph, the verdict, and the JSON envelope."""
    blocker = tmp_path / "a-file"
    blocker.write_text("not a dir")
    out = tmp_path / "bench.json"
    r = run([sys.executable, BENCH, "--width", "1", "--reps", "1", "--dir", str(blocker / "sub"), "--json", str(out)],
            cwd=tmp_path, timeout=120)
    assert r.code == 2, r.tail()
    assert f"fsdpck: error: --dir {blocker / 'sub'}: Not a directory" in r.err, r.tail()
    doc = load_json(out)
    check_envelope(doc, "bench", 2, verdict=r.last_line())
    assert blocker.read_text() == "not a dir" and sorted(p.name for p in tmp_path.iterdir()) == ["a-file", "bench.json"]
