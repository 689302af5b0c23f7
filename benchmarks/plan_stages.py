"""The planner's two new terms: pipeline stages (issue 22 item 4) and the topology cost model (issue 24 item 4).

Pure arithmetic (nothing is compiled, nothing runs on a GPU):

1. Bubble: `tedjax.plan.bubble_fraction` against the fraction of
   stage-iterations that compute nothing in the schedule itself (every
   (iteration, stage) of a GPipe or circular schedule walked), for S in
   {2, 4}, M in {4, 8, 16}, R in {1, 2}.
2. The ~46B Mixtral-like preset (configs/mixtral_50b.yaml) on every
   cluster preset, across nodes: the best plan of the four-axis search
   (`search(..., stages=True)`), whether it uses stages, and the planner's
   reason line against the best plan without stages.
3. The topology cost model: one gpu_6.7b-sized MoE block on 4 DGX-H100
   nodes (32 GPUs), flat all-to-all against the hierarchical one at the r
   `balance.TopologyCostModel` proposes, for three layouts whose expert
   axis spans nodes. Target (issue 24): >= 1.3x.

    python benchmarks/plan_stages.py          # -> benchmarks/results/plan_stages.{json,md}
    python benchmarks/plan_stages.py --quick  # part 2 on one cluster with the switches pinned -> a temp dir

`--compiled` instead compiles the tiny model's train step with stages on 8
simulated CPU devices (and at stage 1 for reference), remat none and full,
and compares `plan.memory` (XLA:CPU) with `memory_analysis()` (arguments +
temporaries) -> benchmarks/results/plan_stage_memory.{json,md}. Minutes.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve()
sys.path.insert(0, str(HERE.parent))  # _common
sys.path.insert(0, str(HERE.parents[1]))  # tedjax

if "--compiled" in sys.argv:  # 8 simulated CPU devices, set before jax starts
    import os

    os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
    os.environ.setdefault("JAX_PLATFORMS", "cpu")

import _common  # noqa: E402

from tedjax import plan  # noqa: E402
from tedjax.config import load_config  # noqa: E402

REPO = HERE.parents[1]
CLUSTERS = REPO / "configs" / "clusters"
PRESET = REPO / "configs" / "mixtral_50b.yaml"
# (cluster file, GPUs): a few nodes of each, more where the GPUs are small
ACROSS_NODES = (("dgx_h100.yaml", 32), ("dgx_a100_80gb.yaml", 32), ("h200.yaml", 16), ("summit.yaml", 128))
QUICK_PIN = {"remat": "full", "dtd": False, "tile_size": 0, "zero": 2}  # --quick: switches pinned, axes searched
TARGET = 1.3


def schedule_bubble(stages: int, microbatches: int, repeats: int = 1) -> float:
    """Idle fraction of a schedule walked iteration by iteration: at iteration i stage s works on virtual
    microbatch i - s (microbatch (i - s) mod M of run (i - s) // M), which exists when 0 <= i - s < R M."""
    work = repeats * microbatches
    iterations = 0
    idle = busy = 0
    while busy < work * stages:
        for s in range(stages):
            if 0 <= iterations - s < work:
                busy += 1
            else:
                idle += 1
        iterations += 1
    return idle / (idle + busy)


def bubbles() -> list[dict]:
    rows = []
    for s in (2, 4):
        for m in (4, 8, 16):
            for r in (1, 2):
                rows.append({"stages": s, "microbatches": m, "repeats": r,
                             "theory": plan.bubble_fraction(s, m, r), "schedule": schedule_bubble(s, m, r)})
    return rows


def across_nodes(quick: bool) -> list[dict]:
    config = load_config(str(PRESET), ["mesh=auto"])
    rows = []
    for name, devices in ACROSS_NODES[:1] if quick else ACROSS_NODES:
        cluster = plan.Cluster.load(str(CLUSTERS / name))
        start = time.perf_counter()
        found = plan.search(config, cluster, devices, stages=True, fixed=QUICK_PIN if quick else None)
        seconds = time.perf_counter() - start
        best = found.pool[0] if found.pool else None
        flat = next((e for e in found.pool if e.plan.stage == 1), None)
        rows.append({
            "cluster": found.cluster.name, "gpus": devices, "nodes": found.cluster.nodes,
            "best": best.plan.describe() if best else "none fits",
            "stages": best.plan.stage if best else 0,
            "step_ms": best.step_s * 1e3 if best else None,
            "memory_gib": best.memory.total / plan.GIB if best else None,
            "best_without_stages": flat.plan.describe() if flat else "none fits",
            "step_ms_without_stages": flat.step_s * 1e3 if flat else None,
            "plans": len(found.pool) + len(found.rejected), "search_s": seconds,
            "reason": plan.stage_reason(found) if best else str(plan.NoPlanFits(found)).replace("\n", " "),
        })
        print(f"{name} x {devices}: {rows[-1]['best']} ({seconds:.1f} s)\n  {rows[-1]['reason']}", flush=True)
    return rows


def topology() -> list[dict]:
    base = load_config(str(REPO / "configs" / "gpu_6.7b.yaml"))
    cluster = plan.Cluster.load(str(CLUSTERS / "dgx_h100.yaml")).with_devices(32)
    rows = []
    for layout in ((1, 16, 2), (2, 16, 1), (2, 8, 2)):
        d, e, t = layout
        # one sequence per batch device in each micro-batch, as the preset's 2-sequence micro-batches on 8 GPUs
        accum = base.data.batch_size // (d * e)
        config = dataclasses.replace(base, mesh=dataclasses.replace(base.mesh, data=d, expert=e, tensor=t),
                                     data=dataclasses.replace(base.data, grad_accum=accum))
        topo = plan.topology_model(config, cluster, layout)
        r = topo.propose_remote_fraction()
        gated = dataclasses.replace(config, model=dataclasses.replace(config.model, a2a="hierarchical",
                                                                      remote_fraction=r))
        flat_layer, gated_layer = plan.moe_layer_time(config, cluster, layout), plan.moe_layer_time(gated, cluster, layout)
        flat_step, gated_step = plan.step_time(config, cluster, layout), plan.step_time(gated, cluster, layout)
        ratio = flat_layer.step_s / gated_layer.step_s
        rows.append({"layout": f"({d},{e},{t})", "nodes": topo.nodes, "expert_ranks_per_node": topo.node_devices,
                     "grad_accum": accum, "balanced_r": topo.balanced_fraction(), "r": r,
                     "layer_flat_ms": flat_layer.step_s * 1e3, "layer_gated_ms": gated_layer.step_s * 1e3,
                     "layer_a2a_flat_ms": flat_layer.comm_s.get("expert", 0.0) * 1e3,
                     "layer_a2a_gated_ms": gated_layer.comm_s.get("expert", 0.0) * 1e3,
                     "layer_speedup": ratio, "step_flat_ms": flat_step.step_s * 1e3,
                     "step_gated_ms": gated_step.step_s * 1e3, "step_speedup": flat_step.step_s / gated_step.step_s,
                     "target": "PASS" if ratio >= TARGET else "MISS"})
    return rows


# (remat, stage, (data, expert, tensor), microbatches, grad_accum) of the tiny model: --compiled
COMPILED_CASES = [(remat, stage, layout, micro, accum) for remat in ("none", "full")
                  for stage, layout, micro, accum in ((2, (2, 2, 1), 4, 1), (2, (2, 2, 1), 8, 1), (2, (2, 2, 1), 4, 2),
                                                      (1, (4, 2, 1), 0, 1))]
TINY_STAGED = ["model.vocab_size=256", "model.d_model=32", "model.n_layers=4", "model.n_heads=2", "model.d_ff=64",
               "model.expert_d_ff=64", "model.num_experts=4", "model.max_len=32", "data.seq_len=32",
               "data.source=synthetic", "data.batch_size=32"]  # fmt: skip


def compiled_memory() -> list[dict]:
    """`plan.memory` against the compiled train step's memory_analysis, with and without stages."""
    import tedjax
    from tedjax.trainer import Trainer

    rows = []
    for remat, stage, (d, e, t), micro, accum in COMPILED_CASES:
        config = load_config(None, TINY_STAGED + [f"model.remat={remat}", f"mesh.stage={stage}", f"mesh.data={d}",
                                                  f"mesh.expert={e}", f"mesh.tensor={t}",
                                                  f"pipeline.microbatches={micro}", f"data.grad_accum={accum}"])
        mesh = tedjax.make_mesh(d, e, t, stage=stage)
        analysis = Trainer(config, mesh).lower_train_step().compile().memory_analysis()
        compiled = analysis.argument_size_in_bytes + analysis.temp_size_in_bytes
        predicted = plan.memory(config, (d, e, t), backend="cpu")
        rows.append({"remat": remat, "stage": stage, "layout": f"({d},{e},{t})", "microbatches": micro,
                     "grad_accum": accum, "compiled_bytes": compiled, "predicted_bytes": predicted.total,
                     "predicted_over_compiled": predicted.total / compiled})
        print(rows[-1], flush=True)
    for row in rows:  # the stage term against the model without stages (the same remat): what stages add
        base = next(r for r in rows if r["stage"] == 1 and r["remat"] == row["remat"])
        row["relative_to_stage_1"] = row["predicted_over_compiled"] / base["predicted_over_compiled"]
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--compiled", action="store_true")
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    machine = _common.machine_info()
    if args.compiled:
        rows = compiled_memory()
        md = ["# Planner: stage memory against compiled train steps", "",
              "`python benchmarks/plan_stages.py --compiled`: the tiny MoE (4 layers, d_model 32, 4 experts, batch "
              "32 x 32 tokens) on 8 simulated CPU devices; predicted = `plan.memory(..., backend=\"cpu\")`, "
              "compiled = memory_analysis() arguments + temporaries. The last column divides by the same ratio "
              "at stage 1 (the model's own error without stages).", "",
              _common.markdown_table(rows, ["remat", "stage", "layout", "microbatches", "grad_accum",
                                            ("compiled bytes", "compiled_bytes", ","),
                                            ("predicted bytes", "predicted_bytes", ","),
                                            ("predicted / compiled", "predicted_over_compiled", ".3f"),
                                            ("relative to stage 1", "relative_to_stage_1", ".3f")])]
        _common.publish("plan_stage_memory", rows, {"cases": COMPILED_CASES}, "\n".join(md),
                        _common.output_dir("plan_stage_memory", args.out, False), machine)
        return 0
    bubble_rows, stage_rows, topo_rows = bubbles(), across_nodes(args.quick), topology()
    md = ["# Planner: pipeline stages and the topology cost model", "",
          "`python benchmarks/plan_stages.py" + (" --quick" if args.quick else "") + "` (pure arithmetic, no compile).",
          "", "## 1. Bubble: theory against the schedule walked", "",
          _common.markdown_table(bubble_rows, ["stages", "microbatches", "repeats", ("theory", "theory", ".4f"),
                                               ("schedule", "schedule", ".4f")]),
          "## 2. The 46B Mixtral-like preset across nodes (four-axis search)", "",
          _common.markdown_table(stage_rows, ["cluster", "gpus", "best", "stages", ("step ms", "step_ms", ",.1f"),
                                              ("memory GiB", "memory_gib", ".2f"), "best_without_stages",
                                              ("step ms without stages", "step_ms_without_stages", ",.1f"),
                                              ("search s", "search_s", ".1f")]),
          *[f"- {r['cluster']} x {r['gpus']}: {r['reason']}" for r in stage_rows], "",
          "## 3. A gpu_6.7b-sized MoE block on 4 DGX-H100 nodes: flat against hierarchical at the proposed r", "",
          _common.markdown_table(topo_rows, ["layout", "nodes", "expert_ranks_per_node", ("balanced r", "balanced_r", ".3f"),
                                             ("r", "r", ".2f"), ("block flat ms", "layer_flat_ms", ".2f"),
                                             ("block gated ms", "layer_gated_ms", ".2f"),
                                             ("speedup", "layer_speedup", ".2f"), "target",
                                             ("step speedup", "step_speedup", ".3f")]),
          f"Target: the block's predicted time falls by >= {TARGET}x. Block: attention and MoE FFN, forward and "
          "backward, with the collectives of their activations, over one step (grad_accum micro-batches of one "
          "sequence per batch device); step: the whole train step, whose gradient reductions the gate leaves as "
          "they are."]
    settings = {"quick": args.quick, "clusters": [c for c, _ in (ACROSS_NODES[:1] if args.quick else ACROSS_NODES)],
                "pinned": QUICK_PIN if args.quick else {}}
    _common.publish("plan_stages", bubble_rows + stage_rows + topo_rows, settings, "\n".join(md),
                    _common.output_dir("plan_stages", args.out, args.quick), machine,
                    extra={"bubble": bubble_rows, "across_nodes": stage_rows, "topology": topo_rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
