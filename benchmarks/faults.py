"""Reliability summary: run tests/test_faults.py and save what was tried and what held.

    python benchmarks/faults.py [--out DIR]

The counts come from the test module itself (its `COUNTS`, written when the
module ends), so the summary is exactly what the assertions checked: kill
points tried / survived (SIGKILL, then --resume), clean stops (SIGTERM /
SIGINT), bad inputs tried / rejected cleanly, non-finite steps injected /
skipped. Writes `faults.json` and `faults.md` to DIR (default
benchmarks/results/) and prints the one-line summary.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import _common  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=None, help="directory for faults.json / faults.md (benchmarks/results/)")
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory() as tmp:
        summary_file = Path(tmp) / "summary.json"
        env = dict(os.environ, TEDJAX_FAULTS_SUMMARY=str(summary_file))
        start = time.perf_counter()
        proc = subprocess.run([sys.executable, "-m", "pytest", "tests/test_faults.py", "-q", "-p", "no:cacheprovider"],
                              cwd=REPO, env=env, capture_output=True, text=True)  # fmt: skip
        seconds = time.perf_counter() - start
        if not summary_file.exists():
            print(proc.stdout[-5000:] + proc.stderr[-5000:], file=sys.stderr)
            print("error: tests/test_faults.py did not write its summary", file=sys.stderr)
            return 1
        summary = json.loads(summary_file.read_text())

    counts = summary["counts"]
    tail = proc.stdout.strip().splitlines()[-1] if proc.stdout.strip() else ""
    result_line = re.sub(r"\s*=+\s*", "", tail)
    rows = [
        {"fault": "SIGKILL at a random point, then --resume", "tried": counts.get("kill_tried", 0),
         "held": counts.get("kill_survived", 0)},
        {"fault": "SIGTERM / SIGINT: checkpoint and exit 0", "tried": counts.get("signal_tried", 0),
         "held": counts.get("signal_survived", 0)},
        {"fault": "bad input refused before compiling or writing", "tried": counts.get("bad_input_tried", 0),
         "held": counts.get("bad_input_rejected", 0)},
        {"fault": "non-finite loss / gradient step skipped", "tried": counts.get("nan_injected", 0),
         "held": counts.get("nan_skipped", 0)},
    ]  # fmt: skip
    kill, stop, bad, nan = (f"{r['held']}/{r['tried']}" for r in rows)
    line = (f"kill points {kill} survived, clean stops {stop}, bad inputs {bad} rejected cleanly, "
            f"non-finite steps {nan} skipped")
    machine = _common.machine_info()
    md = [
        "# Faults: crashes, signals, non-finite steps, bad input",
        "",
        f"`pytest tests/test_faults.py`: {result_line} in {seconds:.0f} s "
        f"({machine['cpu_count_usable']} CPUs, load {machine['load_avg']}).",
        "",
        _common.markdown_table(rows, [("fault", "fault"), ("tried", "tried"), ("held", "held")]),
        "Kill history (each SIGKILL/SIGTERM/SIGINT, the newest complete checkpoint after it, the orbax "
        "temporary (partial) steps present, and the step the next run resumed from):",
        "",
        _common.markdown_table(summary.get("kill_history", []),
                               ["signal", "when", "newest_complete", "partial_steps", "resumed_from"]),  # fmt: skip
    ]
    json_path, md_path = _common.save_results(
        "faults", rows, {"test_file": "tests/test_faults.py"}, "\n".join(md), out_dir=args.out, machine=machine,
        extra={"summary": line, "pytest": {"returncode": proc.returncode, "result": result_line,
                                           "seconds": round(seconds, 1)},
               "kill_history": summary.get("kill_history", [])},
    )  # fmt: skip
    print(f"faults: {line} (pytest: {result_line}, {seconds:.0f} s)")
    print(f"saved {json_path} and {md_path}")
    return 0 if proc.returncode == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
