"""Compile time of the train step against depth: layers unrolled (before) and scanned (after).

Target (issue 22 item 1): with `model.scan_layers` the tiny config's train
step at 32 layers compiles in <= 1.5x the time of 4 layers.

What is timed. The tiny config (configs/tiny.yaml: d_model 128, 8 experts, an
MoE layer every 2) on its 8 simulated CPU devices (data 2, expert 2,
tensor 2), `tedjax.trainer.Trainer`'s jitted train step lowered from the
abstract state (nothing allocated) and compiled: `lower` (trace to
StableHLO) and `compile` (XLA) seconds, each program once, in one process,
for n_layers in {4, 16, 32} with `scan_layers` False (a Python loop over the
stacked units: the unrolled program of before) and True (one `lax.scan`).
The HLO text size of each compiled program is recorded too.

    python benchmarks/compile_depth.py           # -> benchmarks/results/compile_depth.{json,md}
    python benchmarks/compile_depth.py --quick   # smoke run (a smaller model, depths 2 and 4) -> a temp dir
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # _common
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tedjax
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

import jax  # noqa: E402

import _common  # noqa: E402
from tedjax.config import load_config  # noqa: E402
from tedjax.mesh import make_mesh  # noqa: E402
from tedjax.trainer import Trainer  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
TARGET = 1.5  # compile(32 layers) / compile(4 layers), scanned


def compile_once(config) -> dict:
    """Lower and compile the train step of `config` from its abstract state; seconds and HLO size."""
    mc = config.mesh
    trainer = Trainer(config, make_mesh(mc.data, mc.expert, mc.tensor))
    state = trainer.abstract_state()
    shape = (config.data.grad_accum, config.data.batch_size // config.data.grad_accum, config.data.seq_len)
    tokens = jax.ShapeDtypeStruct(shape, jax.numpy.int32, sharding=trainer.batch_sharding)
    start = time.perf_counter()
    lowered = trainer.train_step.lower(state, {"inputs": tokens, "targets": tokens})
    lowered_at = time.perf_counter()
    compiled = lowered.compile()
    done = time.perf_counter()
    return {"lower_s": lowered_at - start, "compile_s": done - lowered_at, "total_s": done - start,
            "hlo_chars": len(compiled.as_text())}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="smaller model, depths 2 and 4 (CI smoke run)")
    p.add_argument("--out", default=None, help="output directory (default benchmarks/results/, a temp dir with --quick)")
    args = p.parse_args(argv)
    overrides = ["model.d_model=32", "model.d_ff=64", "model.expert_d_ff=64", "model.max_len=16", "data.seq_len=16",
                 "data.batch_size=8", "data.source=synthetic"] if args.quick else ["data.source=synthetic"]
    base = load_config(REPO / "configs" / "tiny.yaml", overrides)
    depths = (2, 4) if args.quick else (4, 16, 32)
    machine = _common.machine_info()
    rows = []
    for scan in (False, True):
        for depth in depths:
            config = dataclasses.replace(base, model=dataclasses.replace(base.model, n_layers=depth, scan_layers=scan))
            row = {"scan_layers": scan, "n_layers": depth, **compile_once(config)}
            rows.append(row)
            print(f"scan_layers={scan!s:5} n_layers={depth:2}: lower {row['lower_s']:.2f} s, compile "
                  f"{row['compile_s']:.2f} s, HLO {row['hlo_chars']:,} chars", flush=True)
    for row in rows:
        first = next(r for r in rows if r["scan_layers"] == row["scan_layers"] and r["n_layers"] == depths[0])
        row["total_vs_shallowest"] = row["total_s"] / first["total_s"]
    scanned = {r["n_layers"]: r for r in rows if r["scan_layers"]}
    ratio = scanned[depths[-1]]["total_s"] / scanned[depths[0]]["total_s"]
    verdict = {"ratio": ratio, "target": TARGET, "deep": depths[-1], "shallow": depths[0],
               "verdict": "PASS" if ratio <= TARGET else "MISS"}
    md = [f"# Compile time against depth{' (quick)' if args.quick else ''}", "",
          f"Train step of configs/tiny.yaml{' (shrunk)' if args.quick else ''} on 8 simulated CPU devices "
          "(data 2, expert 2, tensor 2), lowered from the abstract state and compiled once per row.", "",
          _common.markdown_table(rows, [("scan_layers", "scan_layers"), ("layers", "n_layers"),
                                        ("lower s", "lower_s", ".2f"), ("compile s", "compile_s", ".2f"),
                                        ("total s", "total_s", ".2f"), ("x shallowest", "total_vs_shallowest", ".2f"),
                                        ("HLO chars", "hlo_chars", ",")]), "",
          f"Scanned: {depths[-1]} layers take {ratio:.2f}x the time of {depths[0]} (target <= {TARGET}x): "
          f"**{verdict['verdict']}**."]
    settings = {"quick": args.quick, "depths": list(depths), "config": "configs/tiny.yaml",
                "overrides": overrides, "load_avg": _common.load_avg()}
    _common.publish("compile_depth", rows, settings, "\n".join(md), _common.output_dir("compile_depth", args.out,
                                                                                       args.quick),
                    machine, extra={"verdict": verdict})
    return 0


if __name__ == "__main__":
    sys.exit(main())
