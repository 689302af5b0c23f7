"""One gradient reduction per step: step time and reduction bytes at grad_accum = 4, before and after.

The tiny config (configs/tiny.yaml: d_model 128, 4 layers, 8 experts, batch 32 x 128 tokens) at
grad_accum = 4, ZeRO-1, on 8 simulated CPU devices, on the layouts (2, 2, 2) and (1, 8, 1):

  before  the data-parallel gradient reduction in every micro-batch (the same Trainer with no lanes,
          which compiles to the step tedjax had before NOTES.md section 3.2)
  after   each weight's gradient accumulated in local lanes and reduced once per step

For each: bytes one device sends in all-reduces / reduce-scatters over the batch axes per step (from the
compiled HLO, loop trips counted), and the median step time, wall and CPU (the two variants' steps
alternate, so load on a shared machine hits both alike).

    python benchmarks/one_reduction.py            # -> benchmarks/results/one_reduction.{json,md}
    python benchmarks/one_reduction.py --quick    # (2, 2, 2) only, 2 layers, 2 timed steps -> a temp dir
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve()
sys.path.insert(0, str(HERE.parent))  # _common, _flags
import _flags  # noqa: E402  (no jax: sets XLA_FLAGS below)
sys.path.insert(0, str(HERE.parents[1]))  # tedjax


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--reps", type=int, default=10, help="timed steps per variant")
    p.add_argument("--accum", type=int, default=4, help="micro-batches per step")
    p.add_argument("--quick", action="store_true", help="(2, 2, 2) only, 2 layers, 2 timed steps")
    p.add_argument("--out", type=str, default=None, help="directory for one_reduction.{json,md}")
    return p.parse_args(argv)


ARGS = parse_args()
_flags.simulate_cpu_devices(ARGS.quick)

import jax  # noqa: E402
import numpy as np  # noqa: E402

import _common  # noqa: E402
import tedjax  # noqa: E402
from tedjax import analysis  # noqa: E402
from tedjax.config import load_config  # noqa: E402
from tedjax.trainer import Trainer  # noqa: E402

LAYOUTS = [(2, 2, 2)] if ARGS.quick else [(2, 2, 2), (1, 8, 1)]


class NoLanes(Trainer):
    """The Trainer with every parameter's gradient reduced in each micro-batch (no lanes): the step before."""

    def _lanes(self):
        lanes, dims, _ = super()._lanes()
        return jax.tree.map(lambda _: 1, lanes), dims, self.model_shardings


def reduction_bytes(compiled, mesh) -> tuple[float, float]:
    """(per step, of which inside the micro-batch loop): bytes one device sends in all-reduces and
    reduce-scatters over the batch axes ("data", "expert")."""
    total = in_loop = 0.0
    for c in analysis.collectives(compiled, mesh):
        if c.kind in ("all-reduce", "reduce-scatter") and not c.trivial and {"data", "expert"} & set(c.axes):
            sent = c.sent_bytes * (c.trip_count or 1)
            total += sent
            in_loop += sent if c.in_loop else 0.0
    return total, in_loop


def prepare(layout, variant: str) -> dict:
    """The compiled step of one variant, its state and batch, and its reduction bytes."""
    overrides = [f"mesh.data={layout[0]}", f"mesh.expert={layout[1]}", f"mesh.tensor={layout[2]}",
                 f"data.grad_accum={ARGS.accum}", "data.source=synthetic"]
    if ARGS.quick:
        overrides += ["model.n_layers=2"]
    config = load_config(str(HERE.parents[1] / "configs" / "tiny.yaml"), overrides)
    mesh = tedjax.make_mesh(*layout)
    trainer = (NoLanes if variant == "before" else Trainer)(config, mesh)
    state = trainer.init_state()
    compiled = trainer.lower_train_step(state).compile()
    per_step, in_loop = reduction_bytes(compiled, mesh)
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, config.model.vocab_size, (config.data.batch_size, config.data.seq_len + 1), np.int32)
    batch = trainer.shard_batch({"inputs": tokens[:, :-1], "targets": tokens[:, 1:]})
    run = {"state": state, "mesh": mesh, "compiled": compiled, "batch": batch}

    def step():
        with jax.set_mesh(mesh):
            run["state"], metrics = compiled(run["state"], batch)
        return metrics["loss"]

    first_loss = float(jax.block_until_ready(step()))
    return {"layout": "x".join(map(str, layout)), "variant": variant, "grad_accum": ARGS.accum,
            "reduction_bytes": per_step, "reduction_bytes_in_loop": in_loop, "first_loss": first_loss,
            "step": step}


def measure(layout) -> list[dict]:
    """Both variants on one layout, their steps timed alternately (so load on the machine hits both alike)."""
    rows = [prepare(layout, variant) for variant in ("before", "after")]
    for row in rows:
        _common.time_fn(row["step"], reps=1, warmup=1)  # warm-up
        row["times_s"], row["cpu_s"] = [], []
    for _ in range(ARGS.reps):
        for row in rows:
            cpu = time.process_time()
            row["times_s"] += _common.time_fn(row["step"], reps=1, warmup=0)
            row["cpu_s"].append(time.process_time() - cpu)  # less sensitive than wall time to a loaded machine
    for row in rows:
        del row["step"]
        row["step_s"], row["step_cpu_s"] = _common.median(row["times_s"]), _common.median(row["cpu_s"])
    return rows


def main() -> None:
    machine = _common.machine_info()
    rows = [row for layout in LAYOUTS for row in measure(layout)]
    for row in rows:
        before = next(r for r in rows if r["layout"] == row["layout"] and r["variant"] == "before")
        row["bytes_vs_before"] = row["reduction_bytes"] / before["reduction_bytes"]
        row["time_vs_before"] = row["step_s"] / before["step_s"]
        row["cpu_vs_before"] = row["step_cpu_s"] / before["step_cpu_s"]
    settings = {"quick": ARGS.quick, "reps": ARGS.reps, "grad_accum": ARGS.accum, "config": "configs/tiny.yaml",
                "zero": 1, "layouts": ["x".join(map(str, lay)) for lay in LAYOUTS]}
    markdown = (
        f"# One gradient reduction per step (grad_accum = {ARGS.accum}, ZeRO-1, tiny config)\n\n"
        "Bytes: sent per device per step in all-reduces / reduce-scatters over the batch axes (compiled HLO).\n\n"
        + _common.markdown_table(rows, [
            "layout", "variant", ("reduction KiB", lambda r: r["reduction_bytes"] / 1024, ".1f"),
            ("in the loop KiB", lambda r: r["reduction_bytes_in_loop"] / 1024, ".1f"),
            ("bytes vs before", "bytes_vs_before", ".3f"), ("step ms", lambda r: r["step_s"] * 1e3, ".1f"),
            ("time vs before", "time_vs_before", ".3f"), ("CPU s", "step_cpu_s", ".2f"),
            ("CPU vs before", "cpu_vs_before", ".3f"), ("first loss", "first_loss", ".5f"),
        ])
    )
    out = _common.output_dir("one_reduction", ARGS.out, ARGS.quick)
    _common.publish("one_reduction", rows, settings, markdown, out, machine)


if __name__ == "__main__":
    main()
