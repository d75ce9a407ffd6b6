"""scripts/bench_offline.py runs end to end at a tiny size: every measurement and ratio is there, and its
JSON starts with the common envelope. Never the speed: that is docs/benchmarks.md, "Offline reads"."""

from __future__ import annotations

import json
import sys

import pytest
from conftest import REPO, check_envelope, run, worker_env

pytestmark = pytest.mark.slow

MEASUREMENTS = {"resident after drop", "cat A (cold)", "cat A+B (cold)", "import torch", "inspect (wall)",
                "inspect --verify-data (wall)", "inspect --verify-data (read phase)", "inspect --stats (wall)",
                "inspect --stats (read phase)", "diff (wall)", "diff (read phase)"}


def test_bench_offline_measures_everything(tmp_path):
    target = tmp_path / "offline.json"
    r = run([sys.executable, str(REPO / "scripts" / "bench_offline.py"), "--dir", str(tmp_path / "ck"), "--size", "2MB",
             "--reps", "1", "--json", str(target)], env=worker_env(), timeout=600)
    assert r.code == 0, r.tail()
    doc = json.loads(target.read_text())
    check_envelope(doc, "bench-offline", 0)
    assert set(doc["samples"]) == MEASUREMENTS and all(len(v) >= 1 for v in doc["samples"].values())
    assert set(doc["ratios"]) >= set(doc["targets"]) and doc["data_bytes"] > 0
    # Each ratio is the median of side-by-side pairs: one pair per repetition.
    assert set(doc["pairs"]) == set(doc["ratios"]) and all(len(v) == 1 for v in doc["pairs"].values())
    assert doc["ratios"]["diff / cat A+B"] == doc["pairs"]["diff / cat A+B"][0]
    assert set(doc["ratios_of_medians"]) == set(doc["ratios"])
    assert doc["ratios_of_medians"]["inspect / import torch"] == (doc["medians"]["inspect (wall)"]
                                                                  / doc["medians"]["import torch"])
    assert "| inspect / import torch |" in r.out and "| diff read phase / cat A+B |" in r.out
