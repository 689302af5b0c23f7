"""TED's switches on every 8-device layout: step time, collective bytes (measured and predicted), memory.

For each (data, expert, tensor) factorization of 8 simulated CPU devices (the
layouts tests/reference.py checks) and each switch

  baseline  dtd=False, remat="none", untiled optimizer
  dtd       Duplicate Token Dropping (acts only where expert > 1 and tensor > 1)
  cac       remat="cac": activation checkpointing that keeps collective outputs
  full      remat="full": plain activation checkpointing
  dtd+cac   both (TED's combination)
  tiled     the tiled optimizer (optimizer.tile_size)

the script compiles one full training step (`Trainer.lower_train_step`) and
reports, per device: the median step time as a ratio to the (8,1,1) baseline of
the same run; the bytes sent by each kind of collective, read from the
partitioned HLO (`tedjax.analysis`), next to the bytes TED's formulas predict
(NOTES.md section 6); and XLA's argument, output and temp bytes.

Predictions (per device, float32, P = group size, V = local result bytes):
  all-to-all  MoE dispatch + return, forward and backward: 4 per MoE layer
              (6 with remat="full": the recomputation repeats both), each
              V(P-1)/P over "expert", V = tokens x C x E x d_model x 4 bytes
              (tokens in routing groups per device), / tensor with DTD.
  all-reduce tensor  Megatron over "tensor", 2V(P-1)/P each: forward the embedding,
              each attention output and each FFN/expert output; backward the
              LM-head input, each attention input and each FFN/expert input;
              remat="full" repeats each layer's attention output and each
              expert output (the dense FFN output is dead in the backward).
  all-reduce dp  gradients over the part of their DP group ZeRO-1 does not
              split them over (ZeRO-1 off, or a dim that does not divide).
  all-gather  DTD: one per all-to-all over "tensor", V(P-1)/P with V the whole
              buffer. ZeRO-1: the updated parameter shards, over each
              parameter's DP group (data x expert, or data for experts).
  reduce-scatter  ZeRO-1: each splittable gradient over its DP group.
Small collectives (scalars, the cross-entropy's per-token statistics) are not
predicted. The other column holds collectives outside these formulas
(the embedding gradient's scatter: a collective-permute and an all-to-all over
the batch axes).

A last section, bucketing, compiles the (2,2,2) baseline step in a fresh
process per XLA setting (flags must be set before jax is imported) and counts
the all-reduces: XLA:CPU's combiner on (default) and off, and the GPU combine
thresholds (which XLA:CPU ignores; see tedjax.config.XlaConfig).

    python benchmarks/ted_layouts.py            # full run -> benchmarks/results/
    python benchmarks/ted_layouts.py --quick    # smoke run (< 60 s) -> a temp dir unless --out
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve()
sys.path.insert(0, str(HERE.parent))  # _common
sys.path.insert(0, str(HERE.parents[1]))  # tedjax

from _flags import QUICK_COMPILE  # noqa: E402  (no jax)

# tests/reference.py FACTORIZATIONS
LAYOUTS = [(8, 1, 1), (1, 8, 1), (2, 4, 1), (4, 1, 2), (2, 2, 2), (1, 4, 2), (1, 2, 4)]
SWITCHES = ["baseline", "dtd", "cac", "full", "dtd+cac", "tiled"]
QUICK_SWITCHES = ["baseline", "dtd", "cac", "full"]
KINDS = ("all-to-all", "all-reduce tensor", "all-reduce dp", "all-gather", "reduce-scatter", "other")
BUCKETING = {  # setting -> XlaConfig fields
    "default": {},
    "combiner off": {"cpu_all_reduce_combiner": False},
    "gpu threshold 1 KiB": {"all_reduce_combine_bytes": 1024},
    "gpu threshold 1 GiB": {"all_reduce_combine_bytes": 1 << 30},
}
QUICK_BUCKETING = ["default", "combiner off"]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true",
                   help="(2,2,2) x 4 switches, tiny model (< 60 s); temp dir unless --out")
    p.add_argument("--out", type=str, default=None,
                   help="directory for ted_layouts.{json,md} (default benchmarks/results)")
    p.add_argument("--rounds", type=int, default=None, help="timing rounds over all configs (default 5; quick 1)")
    p.add_argument("--steps", type=int, default=None, help="timed steps per config per round (default 3; quick 2)")
    p.add_argument("--bucketing-child", type=str, default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


ARGS = parse_args()
_flags = ["--xla_force_host_platform_device_count=8"]
if ARGS.quick:
    _flags += QUICK_COMPILE.split()  # compiles dominate a smoke run
if ARGS.bucketing_child:
    _flags += json.loads(ARGS.bucketing_child)["flags"]  # XlaConfig(...).flags(), computed by the parent
os.environ["XLA_FLAGS"] = " ".join(_flags)
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

import _common  # noqa: E402
import tedjax  # noqa: E402
from tedjax import analysis  # noqa: E402
from tedjax.config import DataConfig, MeshConfig, ModelConfig, OptimizerConfig, TrainConfig, XlaConfig  # noqa: E402
from tedjax.mesh import logical_to_spec  # noqa: E402
from tedjax.optim import zero1_spec  # noqa: E402
from tedjax.trainer import Trainer  # noqa: E402

FULL_MODEL = dict(vocab_size=256, d_model=64, n_layers=4, n_heads=4, d_ff=256, max_len=64, num_experts=8,
                  expert_d_ff=128, top_k=1, capacity_factor=2.0, min_capacity=1, moe_every=2)
QUICK_MODEL = dict(vocab_size=64, d_model=32, n_layers=2, n_heads=4, d_ff=64, max_len=16, num_experts=8,
                   expert_d_ff=32, top_k=1, capacity_factor=2.0, min_capacity=1, moe_every=2)
FULL_DATA = dict(seq_len=64, batch_size=16)
QUICK_DATA = dict(seq_len=16, batch_size=8)
TILE = 1024  # elements: expert weights' local shards hold several tiles


def train_config(model: dict, data: dict, layout, switch: str) -> TrainConfig:
    dtd = switch in ("dtd", "dtd+cac")
    remat = {"cac": "cac", "dtd+cac": "cac", "full": "full"}.get(switch, "none")
    return TrainConfig(
        steps=100,
        model=ModelConfig(**model, dtd=dtd, remat=remat),
        mesh=MeshConfig(*layout),
        optimizer=OptimizerConfig(tile_size=TILE if switch == "tiled" else 0, warmup_steps=0),
        data=DataConfig(source="synthetic", **data),
    )


# --------------------------------------------------------------------------- #
# predictions


def predicted_bytes(config: TrainConfig, layout) -> dict[str, float]:
    """Bytes each device sends per step, by kind, from TED's formulas (see the module doc)."""
    m, d = config.model, config.data
    data, expert, tensor = layout
    rows = d.batch_size // (data * expert)
    group = m.group_size or d.seq_len
    groups = rows * d.seq_len // group
    cap = tedjax.routing.capacity(group, m.num_experts, m.top_k, m.capacity_factor, m.min_capacity)
    act = rows * d.seq_len * m.d_model * 4  # [B, L, D] per device
    buf = groups * m.num_experts * cap * m.d_model * 4  # [G, E, C, D] per device
    dtd = m.dtd and expert > 1 and tensor > 1
    buf_a2a = groups * m.num_experts * math.ceil(cap / tensor) * m.d_model * 4 if dtd else buf
    buf_gathered = buf_a2a * tensor  # padded to a multiple of tensor
    full = m.remat == "full"
    n_moe, n_layers = m.n_moe_layers, m.n_layers
    n_dense = n_layers - n_moe

    out = dict.fromkeys(KINDS, 0.0)
    out["all-to-all"] = n_moe * (6 if full else 4) * buf_a2a * (expert - 1) / expert
    if dtd:
        out["all-gather"] += n_moe * (6 if full else 4) * buf_gathered * (tensor - 1) / tensor
    forward = act + n_layers * act + n_dense * act + n_moe * buf
    backward = act + n_layers * act + n_dense * act + n_moe * buf
    recompute = n_layers * act + n_moe * buf if full else 0
    out["all-reduce tensor"] += (forward + backward + recompute) * 2 * (tensor - 1) / tensor

    # Gradients over each parameter's DP group: ZeRO-1 reduce-scatters them over the axes it adds
    # to the state's spec and all-gathers the update back; the rest of the group all-reduces.
    sizes = {"stage": 1, "data": data, "expert": expert, "tensor": tensor}
    mesh = type("MeshShape", (), {"shape": sizes})()
    _, abstract = nnx.split(tedjax.model.abstract_model(m))
    for var in jax.tree.leaves(abstract, is_leaf=lambda x: isinstance(x, nnx.Variable)):
        spec = logical_to_spec(var.logical_axes)
        used = _axes(spec)
        local = math.prod(var.shape) * 4 / math.prod(sizes[a] for a in used)
        added = _axes(zero1_spec(spec, var.shape, mesh)) - used if config.optimizer.zero1 else set()
        rest = {"data", "expert"} - used - added
        p_added, p_rest = math.prod(sizes[a] for a in added), math.prod(sizes[a] for a in rest)
        out["reduce-scatter"] += local * (p_added - 1) / p_added
        out["all-gather"] += local * (p_added - 1) / p_added
        out["all-reduce dp"] += 2 * local * (p_rest - 1) / p_rest
    return out


def _axes(spec) -> set[str]:
    return {a for entry in spec for a in ((entry,) if isinstance(entry, str) else (entry or ()))}


def measured_bytes(colls) -> tuple[dict[str, float], dict[str, int]]:
    sent, count = dict.fromkeys(KINDS, 0.0), dict.fromkeys(KINDS, 0)
    for c in colls:
        if c.trivial:
            continue
        kind = c.kind
        if kind == "all-reduce":
            kind = "all-reduce tensor" if c.axes == ("tensor",) else "all-reduce dp"
        elif kind not in KINDS or (kind == "all-to-all" and (c.axes != ("expert",) or "scatter" in c.op_name)):
            kind = "other"  # incl. the embedding gradient's scatter (an all-to-all over "expert" when data = 1)
        sent[kind] += c.sent_bytes
        count[kind] += 1
    return sent, count


# --------------------------------------------------------------------------- #
# one config


def build(model: dict, data: dict, layout, switch: str) -> dict:
    config = train_config(model, data, layout, switch)
    mesh = tedjax.make_mesh(*layout)
    trainer = Trainer(config, mesh)
    start = time.perf_counter()
    compiled = trainer.lower_train_step().compile()
    compile_s = time.perf_counter() - start
    colls = analysis.collectives(compiled, mesh)
    sent, count = measured_bytes(colls)
    mem = analysis.memory_report(compiled)
    rng = np.random.default_rng(0)
    shape = (config.data.batch_size, config.data.seq_len + 1)
    tokens = rng.integers(0, config.model.vocab_size, shape).astype(np.int32)
    batch = trainer.shard_batch({"inputs": tokens[:, :-1], "targets": tokens[:, 1:]})
    state = trainer.init_state()
    state, _ = compiled(state, batch)  # warm-up
    jax.block_until_ready(state)
    return {
        "layout": list(layout), "switch": switch, "compiled": compiled, "state": state, "batch": batch,
        "times_s": [], "compile_s": compile_s, "sent_bytes": sent, "counts": count,
        "predicted_bytes": predicted_bytes(config, layout),
        "argument_bytes": mem.get("argument_bytes"), "output_bytes": mem.get("output_bytes"),
        "alias_bytes": mem.get("alias_bytes"), "temp_bytes": mem.get("temp_bytes"),
    }


def time_round(cell: dict, steps: int) -> None:
    for _ in range(steps):
        start = time.perf_counter()
        cell["state"], metrics = cell["compiled"](cell["state"], cell["batch"])
        jax.block_until_ready((cell["state"], metrics))
        cell["times_s"].append(time.perf_counter() - start)


# --------------------------------------------------------------------------- #
# bucketing (one process per XLA setting)


def bucketing_child(spec: dict) -> None:
    model, data = spec["model"], spec["data"]
    cell = build(model, data, (2, 2, 2), "baseline")
    time_round(cell, spec["steps"])
    print("RESULT " + json.dumps(bucketing_row(cell)))


def bucketing_row(cell: dict) -> dict:
    """The all-reduces of a compiled (2,2,2) baseline cell, and its step time."""
    colls = analysis.collectives(cell["compiled"], tedjax.make_mesh(2, 2, 2))
    ars = [c for c in colls if c.kind == "all-reduce" and not c.trivial]
    return {
        "xla_flags": os.environ["XLA_FLAGS"],
        "all_reduce_count": len(ars),
        "all_reduce_bytes": sum(c.sent_bytes for c in ars),
        "all_reduce_result_bytes": sum(c.result_bytes for c in ars),
        "largest_all_reduce_bytes": max((c.result_bytes for c in ars), default=0),
        "step_s": _common.median(cell["times_s"]),
    }


def run_bucketing(settings: list[str], model: dict, data: dict, steps: int, default_cell: dict | None = None
                  ) -> list[dict]:  # fmt: skip
    """One subprocess per setting (XLA reads its flags once per process); `default_cell`: the (2,2,2)
    baseline this process compiled with the same flags, which stands for the "default" setting."""
    rows = []
    for name in settings:
        flags = XlaConfig(**BUCKETING[name]).flags()
        if not flags and default_cell is not None:
            rows.append({"setting": name, "xla": BUCKETING[name], **bucketing_row(default_cell)})
            continue
        spec = {"xla": BUCKETING[name], "flags": flags, "model": model, "data": data, "steps": steps}
        argv = [sys.executable, str(HERE), "--bucketing-child", json.dumps(spec)] + (["--quick"] if ARGS.quick else [])
        env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
        proc = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=600)
        lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
        if proc.returncode or not lines:
            raise RuntimeError(f"bucketing setting {name!r} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
        rows.append({"setting": name, "xla": BUCKETING[name], **json.loads(lines[-1][len("RESULT "):])})
    return rows


# --------------------------------------------------------------------------- #
# report


def fmt_bytes(n: float | None) -> str:
    if n is None:
        return ""
    n = float(n)
    if abs(n) < 1024:
        return f"{n:.0f}"
    if abs(n) < 1024**2:
        return f"{n / 1024:.1f}K"
    return f"{n / 1024**2:.2f}M"


def markdown(rows: list[dict], bucketing: list[dict], settings: dict, machine: dict) -> str:
    lines = [
        "# TED layouts: switches x 8-device layouts",
        "",
        f"Machine: {machine['processor']}, {machine['cpu_count_usable']} usable cores, {machine['device_count']} "
        f"simulated {machine['backend']} devices, jax {machine['jax_version']}, load {machine.get('load_avg')}. "
        f"Model: {settings['model']}; batch {settings['data']['batch_size']} x {settings['data']['seq_len']} tokens. "
        f"Step time: median of {settings['rounds']} x {settings['steps']} steps per config, timed round-robin; "
        "ratio to the (8,1,1) baseline. Bytes: sent per device per step, measured / predicted "
        "(module doc of benchmarks/ted_layouts.py). Memory: XLA memory_analysis per device.",
        "",
        "| layout | switch | step ms | ratio | all-to-all | all-reduce tensor | all-reduce dp | all-gather "
        "| reduce-scatter | other | arg | out | temp |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        cells = [f"{fmt_bytes(r['sent_bytes'][k])} / {fmt_bytes(r['predicted_bytes'][k])}" for k in KINDS[:-1]]
        lines.append(
            f"| {'x'.join(map(str, r['layout']))} | {r['switch']} | {r['step_s'] * 1e3:.2f} | {r['step_ratio']:.2f} | "
            + " | ".join(cells)
            + f" | {fmt_bytes(r['sent_bytes']['other'])} | {fmt_bytes(r['argument_bytes'])} | "
            f"{fmt_bytes(r['output_bytes'])} | {fmt_bytes(r['temp_bytes'])} |"
        )
    lines += ["", "## Bucketing (XLA all-reduce combiner), (2,2,2) baseline step", "",
              "| setting | XLA flags | all-reduces | bytes sent | largest (result bytes) | step ms |",
              "|---|---|---:|---:|---:|---:|"]
    for b in bucketing:
        extra = " ".join(f for f in b["xla_flags"].split() if "device_count" not in f and "optimization_level" not in f)
        lines.append(f"| {b['setting']} | `{extra or '(none)'}` | {b['all_reduce_count']} | "
                     f"{fmt_bytes(b['all_reduce_bytes'])} | {fmt_bytes(b['largest_all_reduce_bytes'])} | "
                     f"{b['step_s'] * 1e3:.2f} |")
    lines += ["", "## Notes", ""] + [f"- {n}" for n in settings["notes"]]
    return "\n".join(lines) + "\n"


def summary_notes(rows: list[dict], bucketing: list[dict]) -> list[str]:
    by = {(tuple(r["layout"]), r["switch"]): r for r in rows}
    notes = []
    for layout in [lay for lay in LAYOUTS if lay[1] > 1 and lay[2] > 1 and (lay, "dtd") in by]:
        base, dtd = by[(layout, "baseline")], by[(layout, "dtd")]
        ratio = dtd["sent_bytes"]["all-to-all"] / base["sent_bytes"]["all-to-all"]
        notes.append(f"DTD on {'x'.join(map(str, layout))}: all-to-all bytes x{ratio:.3f} "
                     f"(1/tensor = {1 / layout[2]:.3f}); all-gather bytes {fmt_bytes(base['sent_bytes']['all-gather'])}"
                     f" -> {fmt_bytes(dtd['sent_bytes']['all-gather'])}; step ratio {base['step_ratio']:.2f} -> "
                     f"{dtd['step_ratio']:.2f}.")
    for layout in [lay for lay in LAYOUTS if (lay, "full") in by and (lay, "cac") in by and lay[1] > 1]:
        none, full, cac = (by[(layout, s)] for s in ("baseline", "full", "cac"))
        notes.append(
            f"Remat on {'x'.join(map(str, layout))}: all-to-all bytes none/full/cac = "
            f"{fmt_bytes(none['sent_bytes']['all-to-all'])}/{fmt_bytes(full['sent_bytes']['all-to-all'])}/"
            f"{fmt_bytes(cac['sent_bytes']['all-to-all'])} (full/cac = "
            f"{full['sent_bytes']['all-to-all'] / cac['sent_bytes']['all-to-all']:.2f}); tensor all-reduce "
            + "/".join(fmt_bytes(x["sent_bytes"]["all-reduce tensor"]) for x in (none, full, cac))
            + f"; temp bytes {fmt_bytes(none['temp_bytes'])}/"
            f"{fmt_bytes(full['temp_bytes'])}/{fmt_bytes(cac['temp_bytes'])}.")
    same = [(by[(lay, "baseline")], by[(lay, "dtd")]) for lay in LAYOUTS
            if (lay, "dtd") in by and not (lay[1] > 1 and lay[2] > 1)]
    if same:  # DTD is off where expert or tensor is 1: the same program twice
        spread = max(abs(a["step_s"] / b["step_s"] - 1) for a, b in same)
        notes.append(f"Timing noise: on layouts where DTD is inactive, baseline and dtd compile to the same program; "
                     f"their step times differ by up to {spread:.0%} in this run. Smaller step-ratio differences are "
                     "not significant.")
    notes += [
        "Measured tensor all-reduce > predicted by 2 activations per layer: XLA all-reduces the attention input "
        "gradient once per projection (q, k, v: 3 ops where Megatron sums first and reduces once); plus the "
        "cross-entropy's per-token statistics (small).",
        "Measured dp all-reduce where reduce-scatter is predicted: XLA:CPU does not form reduce-scatters; each "
        "ZeRO-1 gradient reduce-scatter is an all-reduce plus a local slice (2x the bytes).",
        "Measured all-gather > predicted on layouts with expert > 1: XLA also all-gathers the token ids for the "
        "embedding-gradient scatter (small).",
        "tiled: temp bytes above baseline because the train step's non-finite guard (where(finite, new, old) over "
        "the state) keeps a copy of the old state next to the in-place tiled update; see "
        "benchmarks/results/tiled_optimizer.md.",
        "DTD keeps the expert-output all-reduce (TED: all-reduce, drop duplicates, all-to-all); XLA:CPU would not "
        "turn it into a reduce-scatter anyway.",
        "Simulated devices share 2 CPU cores: step times measure compute and memory traffic, not a network; "
        "collectives are memory copies here. Read the byte columns for communication.",
    ]
    if bucketing:
        b = {x["setting"]: x for x in bucketing}
        if "combiner off" in b:
            notes.append("Bucketing: XLA:CPU combines all-reduces by default "
                         f"({b['default']['all_reduce_count']} ops); "
                         f"with the combiner off, {b['combiner off']['all_reduce_count']} ops of the same total bytes. "
                         "The --xla_gpu_*_combine_threshold_bytes flags do not change the CPU program "
                         "(XLA:CPU's combiner has a fixed, unlimited byte threshold).")
    return notes


def main() -> None:
    if ARGS.bucketing_child:
        bucketing_child(json.loads(ARGS.bucketing_child))
        return
    quick = ARGS.quick
    plan = [(lay, sw) for lay in LAYOUTS for sw in SWITCHES]
    if quick:  # the ratio's (8,1,1) baseline, then the switches on (2,2,2)
        plan = [((8, 1, 1), "baseline")] + [((2, 2, 2), sw) for sw in QUICK_SWITCHES]
    model, data = (QUICK_MODEL, QUICK_DATA) if quick else (FULL_MODEL, FULL_DATA)
    rounds = ARGS.rounds or (1 if quick else 5)
    steps = ARGS.steps or (2 if quick else 3)
    out_dir = ARGS.out or (tempfile.mkdtemp(prefix="ted_layouts_") if quick else None)

    cells = []
    for layout, switch in plan:
        cell = build(model, data, layout, switch)
        cells.append(cell)
        print(f"compiled {layout} {switch}: {cell['compile_s']:.1f} s", flush=True)
    for r in range(rounds):  # round-robin, order reversed every other round
        for cell in cells if r % 2 == 0 else reversed(cells):
            time_round(cell, steps)
    base = _common.median(cells[0]["times_s"])
    rows = []
    for cell in cells:
        step_s = _common.median(cell["times_s"])
        rows.append({k: v for k, v in cell.items() if k not in ("compiled", "state", "batch")}
                    | {"step_s": step_s, "step_ratio": step_s / base})

    # quick: the default setting is this process's own (2,2,2) baseline (the same flags and model), one
    # subprocess fewer; the full run times every setting alike, each in its own process
    same = next(c for c in cells if tuple(c["layout"]) == (2, 2, 2) and c["switch"] == "baseline") if quick else None
    bucketing = run_bucketing(QUICK_BUCKETING if quick else list(BUCKETING), model, data, steps=3 if quick else 10,
                              default_cell=same)
    settings = {"quick": quick, "model": model, "data": data, "tile_size": TILE, "rounds": rounds, "steps": steps,
                "plan": [[list(lay), sw] for lay, sw in plan]}
    settings["notes"] = summary_notes(rows, bucketing)
    machine = _common.machine_info()
    md = markdown(rows, bucketing, settings, machine)
    print(md)
    json_path, md_path = _common.save_results("ted_layouts", rows, settings, md, out_dir=out_dir, machine=machine,
                                              extra={"bucketing": bucketing})
    print(f"wrote {json_path} and {md_path}")


if __name__ == "__main__":
    main()
