"""Across nodes (issue 24): the topology-aware gate and the hierarchical all-to-all on the main job.

The main job (configs/tiny.yaml, 300 steps) on mesh (1, 8, 1) as 2 simulated nodes of 4 devices
(mesh.node_size=4), with model.a2a=hierarchical, at remote fractions r in {1.0, 0.5, 0.25, 0.14}. For
each r: the validation loss at the last step, the fraction of choices the gate redirected (mean of the
last 10 logged steps, over MoE layers), the inter-node fraction of routed tokens, and the bytes one
device sends to the other node per train step, read from the compiled step's HLO replica groups
(`tedjax.analysis.internode_bytes`): the MoE's all-to-alls, and every collective (the gradient
all-reduce and the embedding gradient's all-to-all cross nodes too, alike in every row). The flat exchange at r = 1 is the bytes
baseline (same loss as hierarchical at r = 1: the same function).

Targets (issue 24): at r = 0.25 the all-to-all inter-node bytes <= 0.3x flat's; validation loss within
0.02 of r = 1. The cost model's predicted step time for a gpu_6.7b-sized layer on DGX H100 nodes, with
and without the gate, is `benchmarks/plan_stages.py`'s (benchmarks/results/plan_stages.md).

Two validation losses per trained row: with the gate (the model as trained, the eval capacity factor
and the same r: the honest figure for a run that keeps training or serving across these nodes), and
without it (r = 1 and no remote bias: the router's own choice, the model served where nothing limits
the inter-node share). `--bias-rates` adds rows with `model.remote_bias_rate` (the opt-in remote bias,
tedjax/routing.py "Remote bias"). `--train-expert 2` trains on (1, 2, 1) as 2 nodes of 1 device: the
same routing groups on the same nodes, so the same function as (1, 8, 1) (tests/test_topology.py checks
the layouts agree), at a fraction of the CPU time; the bytes are always from the (1, 8, 1) compile.

    python benchmarks/topology.py            # 4 runs of 300 steps, then the compiles (~15-25 min, loaded CPU)
    python benchmarks/topology.py --quick    # a small model, 1 step at r = 0.25 (no r = 1 row): checks the script (CI)
    # the remote bias runs (benchmarks/results/topology_bias.md; each run once, then --reuse-runs for the table):
    python benchmarks/topology.py --baseline-val-loss 1.5703 --fractions 1.0 0.25 --bias-rates 0 0.01 \
        --variant 1.0:0:model.router_bias_rate=0.03 --variant 0.5:0.01:model.router_bias_rate=0.03 \
        --variant 0.25:0.01:model.router_bias_rate=0.03 --variant 0.14:0.01:model.router_bias_rate=0.03 \
        --name topology_bias --train-expert 2 --runs-dir /tmp/route_runs/bench
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()

import jax  # noqa: E402
import numpy as np  # noqa: E402

import _common  # noqa: E402
from tedjax import analysis  # noqa: E402
from tedjax.config import load_config  # noqa: E402
from tedjax.loop import run  # noqa: E402
from tedjax.mesh import make_mesh  # noqa: E402
from tedjax.trainer import Trainer  # noqa: E402

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "tiny.yaml"
FRACTIONS = (1.0, 0.5, 0.25, 0.14)
QUICK_FRACTIONS = (0.25,)  # one trained row and the flat compile: 3 compiles, the script end to end
NODE_SIZE = 4
TOPOLOGY = ["mesh.data=1", "mesh.expert=8", "mesh.tensor=1", f"mesh.node_size={NODE_SIZE}"]
QUICK_OVERRIDES = ["model.d_model=32", "model.n_heads=2", "model.d_ff=64", "model.expert_d_ff=64",
                   "model.max_len=32", "data.seq_len=32", "data.batch_size=8", "log.eval_batches=1"]
BYTES_TARGET, LOSS_TARGET = 0.3, 0.02


def overrides(args, r: float, a2a: str, log_dir: Path, bias_rate: float = 0.0, train: bool = False,
              extra: tuple[str, ...] = ()) -> list[str]:
    """The run's settings; `train`: on the mesh it trains on (`--train-expert`), else (1, 8, 1)."""
    experts = args.train_expert if train else 8
    topology = [*TOPOLOGY[:1], f"mesh.expert={experts}", TOPOLOGY[2], f"mesh.node_size={experts // 2}"]
    return [f"steps={args.steps}", f"log.dir={log_dir}", "log.progress=false", "log.tensorboard=false",
            "log.every=1", "checkpoint.every=0", f"log.eval_every={args.steps}", *topology,
            f"model.remote_fraction={r}", f"model.a2a={a2a}", *(QUICK_OVERRIDES if args.quick else []),
            *([f"model.remote_bias_rate={bias_rate}"] if bias_rate else []), *extra]


def run_name(r: float, bias_rate: float, extra: tuple[str, ...] = ()) -> str:
    return f"r{r}" + (f"_bias{bias_rate}" if bias_rate else "") + "".join(f"_{o}" for o in extra)


def parse_variant(spec: str) -> tuple[float, float, tuple[str, ...]]:
    """'R[:RATE[:key=value,...]]' -> (r, remote bias rate, overrides)."""
    r, rate, extra = (spec.split(":", 2) + ["0", ""])[:3]
    return float(r), float(rate), tuple(o for o in extra.split(",") if o)


def val_without_gate(args, result, config, extra: tuple[str, ...] = ()) -> float:
    """Validation loss of the trained state at r = 1 with the remote bias at 0: the router's own choice."""
    from tedjax.loop import Batches, evaluate

    plain = load_config(str(CONFIG), overrides(args, 1.0, "hierarchical", Path(config.log.dir),
                                               config.model.remote_bias_rate, train=True, extra=extra))
    trainer = Trainer(plain, result.trainer.mesh)
    model_state = jax.tree_util.tree_map_with_path(
        lambda path, x: x * 0 if "remote_bias" in jax.tree_util.keystr(path) else x, result.state.model_state)
    return evaluate(trainer, dataclasses.replace(result.state, model_state=model_state), Batches(plain))["lm_loss"]


def internode(config, cache: Path | None = None, trainer: Trainer | None = None) -> dict:
    """Bytes per device per train step that cross nodes, from the compiled step's replica groups (kept in
    `cache`, a json file, so a reused run is not compiled again). `trainer`: the run's, whose train step
    is already compiled (its lowering hits jax's cache instead of compiling again)."""
    if cache is not None and cache.exists():
        return json.loads(cache.read_text())
    out = _internode(config, trainer)
    if cache is not None:
        cache.parent.mkdir(parents=True, exist_ok=True)
        cache.write_text(json.dumps(out))
    return out


def _internode(config, trainer: Trainer | None = None) -> dict:
    mesh = make_mesh(config.mesh.data, config.mesh.expert, config.mesh.tensor) if trainer is None else trainer.mesh
    compiled = (trainer or Trainer(config, mesh)).lower_train_step().compile()
    out = {"a2a_internode_bytes": 0.0, "a2a_internode_ops": 0, "all_internode_bytes": 0.0, "a2a_sent_bytes": 0.0}
    for c in analysis.collectives(compiled, mesh):
        weight = c.trip_count if c.in_loop and c.trip_count else 1
        crossing = weight * analysis.internode_bytes(c, config.mesh.node_size)
        out["all_internode_bytes"] += crossing
        if c.kind == "all-to-all" and "_take" not in c.op_name:  # the MoE's (not the embedding gradient's)
            out["a2a_internode_bytes"] += crossing
            out["a2a_internode_ops"] += weight * (crossing > 0)
            out["a2a_sent_bytes"] += weight * c.sent_bytes
    return out


def read_metrics(path: Path) -> tuple[dict, dict]:
    train, evals = {}, {}
    for line in path.read_text().splitlines():
        rec = json.loads(line)
        (train if rec.get("kind") == "train" else evals if rec.get("kind") == "eval" else {})[rec.get("step")] = rec
    return train, evals


def train_row(args, r: float, runs_dir: Path, bias_rate: float = 0.0, extra: tuple[str, ...] = ()) -> dict:
    log_dir = runs_dir / run_name(r, bias_rate, extra)
    config = load_config(str(CONFIG), overrides(args, r, "hierarchical", log_dir, bias_rate, extra=extra))
    metrics = log_dir / "metrics.jsonl"
    if r == 1.0 and not extra and args.baseline_val_loss is not None:  # the main job's function on any mesh
        row = {"remote_fraction": r, "remote_bias_rate": 0.0, "extra": "", "val_loss": args.baseline_val_loss,
               "val_loss_no_gate": args.baseline_val_loss, "redirected_fraction": 0.0,
               "internode_fraction": None, "dropped_fraction": None, "remote_bias": None, "wall_s": None,
               "val_loss_source": "--baseline-val-loss (README main job, not trained here)"}
        row.update(internode(config, log_dir / "internode.json"))
        return row
    wall_file, extra_file, trainer = log_dir / "wall_s.json", log_dir / "extra.json", None
    if not (args.reuse_runs and metrics.exists() and args.steps in read_metrics(metrics)[1]):
        start = time.perf_counter()
        train_config = load_config(str(CONFIG), overrides(args, r, "hierarchical", log_dir, bias_rate, train=True,
                                                          extra=extra))
        result = run(train_config, mesh=make_mesh(1, args.train_expert, 1, jax.devices()[:args.train_expert]))
        wall_file.write_text(json.dumps(time.perf_counter() - start))
        trainer = result.trainer if args.train_expert == 8 else None
        bias = result.trainer.balance_values(result.state, "remote_bias").tolist() if bias_rate else None
        # (not with --quick: one more compile, and CI time is short)
        no_gate = None if args.quick else val_without_gate(args, result, config, extra)
        extra_file.write_text(json.dumps({"val_loss_no_gate": no_gate,
                                          "remote_bias": bias, "train_mesh": [1, args.train_expert, 1]}))
    wall_s = json.loads(wall_file.read_text()) if wall_file.exists() else None
    saved = json.loads(extra_file.read_text()) if extra_file.exists() else {}
    train, evals = read_metrics(metrics)
    last = [train[s] for s in sorted(train)[-10:]]
    row = {"remote_fraction": r, "remote_bias_rate": bias_rate, "extra": " ".join(extra),
           "val_loss": evals[args.steps]["lm_loss"],
           "val_loss_no_gate": saved.get("val_loss_no_gate"),
           "redirected_fraction": float(np.mean([rec["redirected_fraction"] for rec in last])),
           "internode_fraction": float(np.mean([rec["internode_fraction"] for rec in last])),
           "dropped_fraction": float(np.mean([rec["dropped_fraction"] for rec in last])),
           "remote_bias": saved.get("remote_bias"), "train_mesh": saved.get("train_mesh"),
           "wall_s": wall_s}
    row.update(internode(config, log_dir / "internode.json", trainer))
    print(f"  r={r}: val loss {row['val_loss']:.4f}, redirected {row['redirected_fraction']:.1%}, inter-node "
          f"{row['internode_fraction']:.1%} of routed tokens, a2a inter-node {row['a2a_internode_bytes']:.0f} B/step"
          + (f", {wall_s:.0f} s" if wall_s else ""), flush=True)
    return row


def judge(rows: list[dict], flat: dict) -> None:
    base = rows[0] if rows[0]["remote_fraction"] == 1.0 else None  # no r = 1 row (--quick): no loss verdict
    # a row with overrides (say a router bias) is judged against r = 1 with the same overrides, if run
    matched = {row["extra"]: row for row in rows if row["remote_fraction"] == 1.0}
    for row in rows:
        same = matched.get(row["extra"])
        row["val_minus_r1_same"] = None if same is None or not row["extra"] else row["val_loss"] - same["val_loss"]
        row["a2a_internode_vs_flat"] = row["a2a_internode_bytes"] / flat["a2a_internode_bytes"]
        row["all_internode_vs_flat"] = row["all_internode_bytes"] / flat["all_internode_bytes"]
        row["val_minus_r1"] = None if base is None else row["val_loss"] - base["val_loss"]
        row["no_gate_minus_r1"] = (None if base is None or row["val_loss_no_gate"] is None else
                                   row["val_loss_no_gate"] - base["val_loss"])
        worst = max(abs(d) for d in (row["val_minus_r1"], row["val_minus_r1_same"]) if d is not None) \
            if base is not None else None
        row["loss_target"] = "" if base is None else "PASS" if worst <= LOSS_TARGET else "MISS"
        row["bytes_target"] = ("" if row["remote_fraction"] != 0.25 else
                               "PASS" if row["a2a_internode_vs_flat"] <= BYTES_TARGET else "MISS")


def markdown(rows: list[dict], flat: dict, args) -> str:
    title = "# Across nodes: topology-aware gate + hierarchical all-to-all (issue 24)"
    lines = [title + (" (--quick: small model, few steps)" if args.quick else ""), "",
             f"Main job (configs/tiny.yaml, {args.steps} steps), mesh (1, 8, 1) as 2 simulated nodes of "
             f"{NODE_SIZE}, model.a2a=hierarchical. Inter-node bytes: per device per train step, from the "
             "compiled step's replica groups (forward and backward). Flat exchange at r = 1: all-to-all "
             f"{flat['a2a_internode_bytes']:.0f} B, all collectives {flat['all_internode_bytes']:.0f} B. "
             "Redirected / inter-node: mean of the last 10 steps. Predicted step time with and without the "
             "gate: benchmarks/plan_stages.py (the cost model, issue 24 item 4)."]
    lines += [f"r = {row['remote_fraction']}: val loss from {row['val_loss_source']}." for row in rows
              if row.get("val_loss_source")]
    lines += ["Val loss: with the gate (eval cf, same r and remote bias: the function the run trains); without "
              "the gate: the same weights at r = 1 with the remote bias at 0. Remote bias rate: "
              "`model.remote_bias_rate`; also: further overrides of the run, judged against r = 1 with the same "
              "overrides where that row exists (the loss target takes the worse of the two gaps)."]
    if args.train_expert != 8:
        lines += [f"Trained on (1, {args.train_expert}, 1) as 2 nodes of {args.train_expert // 2}: the same routing "
                  "groups on the same nodes as (1, 8, 1), so the same function (up to float order); bytes from the "
                  "(1, 8, 1) compile."]
    lines += [""]
    lines.append(_common.markdown_table(rows, [
        ("r", "remote_fraction"), ("remote bias rate", "remote_bias_rate"), ("also", "extra"),
        ("val loss", "val_loss", ".4f"),
        ("vs r=1", "val_minus_r1", "+.4f"), ("vs r=1, same also", "val_minus_r1_same", "+.4f"),
        ("loss target", "loss_target"),
        ("val without gate", "val_loss_no_gate", ".4f"), ("vs r=1", "no_gate_minus_r1", "+.4f"),
        ("redirected", "redirected_fraction", ".1%"),
        ("inter-node tokens", "internode_fraction", ".1%"), ("dropped", "dropped_fraction", ".1%"),
        ("a2a inter-node B/step", "a2a_internode_bytes", ".0f"), ("vs flat", "a2a_internode_vs_flat", ".3f"),
        ("bytes target", "bytes_target"), ("all inter-node B/step", "all_internode_bytes", ".0f"),
        ("all vs flat", "all_internode_vs_flat", ".3f"),
    ]))
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="small model, 1 step at r = 0.25; writes to a temp dir")
    p.add_argument("--out", default=None, help="output dir (default benchmarks/results, a temp dir with --quick)")
    p.add_argument("--steps", type=int, default=None, help="train steps per r (default 300, 1 with --quick)")
    p.add_argument("--runs-dir", default=None, help="where the runs log (default a temp dir)")
    p.add_argument("--reuse-runs", action="store_true", help="read finished runs in --runs-dir instead of training")
    p.add_argument("--baseline-val-loss", type=float, default=None,
                   help="r = 1's validation loss from an earlier run of the main job (r = 1 computes the same "
                        "function on every mesh); given, r = 1 is compiled for its bytes but not trained")
    p.add_argument("--fractions", type=float, nargs="+", default=None,
                   help=f"remote fractions to run, in this order (default {FRACTIONS}; r = 1 is the baseline)")
    p.add_argument("--bias-rates", type=float, nargs="+", default=[0.0],
                   help="model.remote_bias_rate values, each run at every r < 1 (default 0: off)")
    p.add_argument("--extra", nargs="*", default=[], help="more key=value overrides for the trained runs")
    p.add_argument("--variant", action="append", default=[], metavar="R[:RATE[:KEY=VALUE,...]]",
                   help="one more run: remote fraction, remote bias rate, overrides (repeatable)")
    p.add_argument("--name", default="topology", help="results file name (benchmarks/results/NAME.{json,md})")
    p.add_argument("--train-expert", type=int, default=8, choices=(2, 8),
                   help="train on (1, N, 1) as 2 nodes of N/2 (the same function; 2 is ~4x cheaper on CPU)")
    args = p.parse_args(argv)
    args.steps = args.steps or (1 if args.quick else 300)
    runs_dir = Path(args.runs_dir or tempfile.mkdtemp(prefix="topology_runs_"))
    machine = _common.machine_info()
    fractions = args.fractions or (QUICK_FRACTIONS if args.quick else FRACTIONS)
    flat = internode(load_config(str(CONFIG), overrides(args, 1.0, "flat", runs_dir / "flat")),
                     runs_dir / "flat" / "internode.json")
    runs = [(r, rate, tuple(args.extra)) for r in fractions for rate in args.bias_rates if r < 1 or not rate]
    runs += [parse_variant(spec) for spec in args.variant]
    rows = [train_row(args, r, runs_dir, rate, extra) for r, rate, extra in runs]
    # r = 1 first: the loss baseline
    rows.sort(key=lambda row: (-row["remote_fraction"], row["remote_bias_rate"], row["extra"]))
    judge(rows, flat)
    settings = {"quick": args.quick, "steps": args.steps, "fractions": list(fractions), "node_size": NODE_SIZE,
                "mesh": [1, 8, 1], "bias_rates": args.bias_rates, "variants": args.variant,
                "train_mesh": [1, args.train_expert, 1],
                "overrides": overrides(args, 0.25, "hierarchical", runs_dir / "r0.25")}
    _common.publish(args.name, rows, settings, markdown(rows, flat, args), _common.output_dir(
        args.name, args.out, args.quick), machine, extra={"flat": flat})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
