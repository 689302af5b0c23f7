"""Smoke test: the benchmark scripts run end to end in --quick mode."""

import json
import math
import time
from pathlib import Path

import train_fork

REPO = Path(__file__).resolve().parents[1]


def test_dispatch_scaling_quick(tmp_path):
    start = time.perf_counter()
    # `python benchmarks/dispatch_scaling.py --quick`, forked with its imports done (tests/train_fork.py)
    proc = train_fork.run_script(REPO / "benchmarks" / "dispatch_scaling.py", ["--quick", "--out", str(tmp_path)],
                                 timeout=120)
    elapsed = time.perf_counter() - start
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    result = json.loads((tmp_path / "dispatch_scaling.json").read_text())
    assert (tmp_path / "dispatch_scaling.md").read_text().startswith("# MoE dispatch scaling")
    assert result["settings"]["quick"] is True
    for key in ("platform", "device_kind", "cpu_count", "jax_version", "date"):
        assert result["machine"][key], key

    rows = result["rows"]
    assert {r["method"] for r in rows} == {"tedjax", "onehot"}
    groups = set(result["settings"]["groups"])
    for method in ("tedjax", "onehot"):
        mine = [r for r in rows if r["method"] == method]
        assert {r["group_size"] for r in mine} == groups
        for r in mine:
            assert r["status"] == "ok", r
            assert r["times_s"] and all(math.isfinite(t) and t > 0 for t in r["times_s"])
            assert math.isfinite(r["us_per_token"]) and r["us_per_token"] > 0
            assert math.isfinite(r["ratio_vs_first"]) and r["ratio_vs_first"] > 0
    assert set(result["verdicts"]) == {"E=8"}
    assert result["verdicts"]["E=8"]["verdict"] in ("PASS", "MISS")  # timing itself is not tested here
    assert elapsed < 60, f"quick mode took {elapsed:.0f} s"
