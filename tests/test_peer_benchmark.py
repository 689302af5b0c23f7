"""benchmarks/peer_deepspeed.py: the tedjax side runs end to end in --quick mode, and without the peer's
environment the script says how to make it, marks the peer as not measured (never PASS) and exits with 0.

Timings are not asserted (they depend on the machine); what is checked is that
each case was measured, that the reported figures follow from the raw step
times stored next to them, and that nothing is claimed for the peer that was
not measured. The DeepSpeed side itself needs torch and deepspeed, which are
never tedjax dependencies, so it is not run here.
"""

import json
import math
import os
import statistics
import sys
import time
from pathlib import Path

import pytest
import train_fork

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "peer_deepspeed.py"
SETUP = (
    "python3 -m venv ~/ds-venv",
    "~/ds-venv/bin/pip install numpy torch==2.14.1",
    "DS_BUILD_OPS=0 ~/ds-venv/bin/pip install deepspeed==0.19.8",
)

pytestmark = pytest.mark.slow


def run_script(*args: str, env: dict | None = None) -> tuple[str, float]:
    start = time.perf_counter()
    # `python benchmarks/peer_deepspeed.py *args`, forked with its imports done (tests/train_fork.py)
    proc = train_fork.run_script(SCRIPT, list(args), env=env or dict(os.environ), timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout, time.perf_counter() - start


def load(out: Path) -> dict:
    result = json.loads((out / "peer_deepspeed.json").read_text())
    for key in ("platform", "device_kind", "cpu_count", "jax_version", "date", "load_avg"):
        assert result["machine"][key], key
    assert result["machine"]["device_count"] == 8 and result["machine"]["backend"] == "cpu"
    return result


def check_tedjax_rows(result: dict, names: set[str]) -> None:
    settings = result["settings"]
    tokens_per_step = 8 * settings["tokens"]
    assert {r["case"] for r in result["rows"]} == names
    for r in result["rows"]:
        # the peer was not measured, so nothing is claimed for it, and the verdict is never PASS
        assert r["target"] == result["verdicts"][r["case"]] == "NOT MEASURED"
        assert r["deepspeed_tokens_per_s"] is None and r["ratio"] is None and r["ratios_per_round"] == []
        assert r["deepspeed_times_s"] == []
        # tedjax: one measurement per round of `steps` timed steps; tokens/s follows from them
        assert len(r["tedjax_times_s"]) == settings["rounds"]
        assert all(len(t) == settings["steps"] and min(t) > 0 for t in r["tedjax_times_s"])
        per_round = [tokens_per_step / statistics.median(t) for t in r["tedjax_times_s"]]
        assert r["tedjax_tokens_per_s_per_round"] == pytest.approx(per_round)
        assert r["tedjax_tokens_per_s"] == pytest.approx(statistics.median(per_round)) and r["tedjax_tokens_per_s"] > 0
        # C = max(ceil(k * cf * S / E), min_capacity), as DeepSpeed-MoE computes it
        assert r["capacity"] == max(math.ceil(r["top_k"] * r["capacity_factor"] * settings["tokens"] / 8), 4)
        assert math.isfinite(r["tedjax_first_loss"]) and r["tedjax_first_loss"] > 0
        assert 0 <= r["tedjax_dropped_fraction"] <= 1 and r["tedjax_compile_s"] > 0
    assert settings["target_ratio"] == 1.5


def test_quick_runs_tedjax_side_of_all_three_cases(tmp_path):
    stdout, elapsed = run_script("--quick", "--out", str(tmp_path))
    result = load(tmp_path)
    settings = result["settings"]
    assert settings["quick"] is True and settings["rounds"] == 1
    assert settings["peer_status"] == "not measured: --quick runs the tedjax side only"
    assert settings["peer_setup"] is None  # quick mode does not look for the peer at all
    check_tedjax_rows(result, {"top1_ep8", "top1_ep4", "top2_ep8"})
    rows = {r["case"]: r for r in result["rows"]}
    assert (rows["top1_ep4"]["tedjax_mesh"], rows["top1_ep4"]["deepspeed_ep"]) == ("(2,4,1)", 4)
    assert (rows["top2_ep8"]["top_k"], rows["top2_ep8"]["capacity_factor"]) == (2, 1.25)
    for name in rows:
        assert f"NOT MEASURED: {name}" in stdout
    assert "PASS" not in stdout
    md = (tmp_path / "peer_deepspeed.md").read_text()
    assert md.startswith("# tedjax MoE layer vs DeepSpeed-MoE's") and "**NOT MEASURED**" in md and "PASS" not in md
    assert elapsed < 120, f"--quick took {elapsed:.0f} s"  # ~15 s on an idle 2-core machine


def test_missing_peer_environment_says_how_to_make_it(tmp_path):
    venv = tmp_path / "no-deepspeed-venv"  # a Python that has neither torch nor deepspeed
    (venv / "bin").mkdir(parents=True)
    (venv / "bin" / "python").symlink_to(sys.executable)
    env = {**os.environ, "TEDJAX_PEER_VENV": str(venv)}
    out = tmp_path / "out"
    # two stand-in setups beside the default (issue 25): each starts its own tedjax side, tiny shapes
    stdout, _ = run_script("--cases", "top1_ep8", "--rounds", "1", "--warmup", "0", "--steps", "1", "--d-model", "64",
                           "--d-ff", "128", "--tokens", "128", "--setups", "default", "avx2", "one_core",
                           "--out", str(out), env=env)  # fmt: skip
    for command in SETUP:
        assert command in stdout
    assert "cannot import torch, torch.distributed.run and deepspeed" in stdout and str(venv) in stdout
    result = load(out)
    settings = result["settings"]
    assert settings["quick"] is False and settings["peer_venv"] == str(venv)
    assert settings["peer_status"].startswith("not measured: ") and settings["peer_setup"] == list(SETUP)
    assert settings["setups"] == ["default", "avx2", "one_core"]
    assert [r["setup"] for r in result["rows"]] == settings["setups"]
    for setup in ("default", "avx2", "one_core"):
        result_one = {**result, "rows": [r for r in result["rows"] if r["setup"] == setup]}
        key = "top1_ep8" if setup == "default" else f"{setup}:top1_ep8"
        check_tedjax_rows({**result_one, "verdicts": {"top1_ep8": result["verdicts"][key]}}, {"top1_ep8"})
        assert f"NOT MEASURED: top1_ep8{'' if setup == 'default' else f' [{setup}]'}" in stdout
    # each setup reached the tedjax process it started: the XLA ISA cap, the one-CPU affinity
    machines = result["machines_by_setup"]
    assert machines["avx2"]["xla_max_isa"] == "AVX2" and machines["default"]["xla_max_isa"] is None
    assert machines["one_core"]["cpu_threads"] == 1
    assert "PASS" not in stdout
    md = (out / "peer_deepspeed.md").read_text()
    assert all(command in md for command in SETUP) and "PASS" not in md
