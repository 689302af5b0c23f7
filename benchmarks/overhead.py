"""MoE training-step time over the step time of its FLOP-matched dense twin.

Target (issue 5): top-1 (capacity_factor 1.0) step time <= 1.10 x the dense
twin's at every layout (data, expert, tensor) of 8 simulated CPU devices:
(8,1,1), (2,4,1), (2,2,2), (1,8,1). Top-2 (capacity_factor 1.25) is reported
too; it has no target, since its experts do 1.25x the dense twin's FFN FLOPs
(E * C = 2.5 S slots against 2 S rows).

Models. `ModelConfig.dense_twin()` keeps d_model, layers and heads and turns
every MoE layer into a dense FFN of width top_k * expert_d_ff, so both models
do the same matmul FLOPs per token. Both train with `tedjax.trainer.Trainer`
(AdamW, ZeRO-1, the full jitted train step) on the same mesh and the same
synthetic batch (`tedjax.data.synthetic_batches`), same tokens per step.

"before" is the MoE as it was before the performance change recorded in the
report: the expert FFN written G-major (`gecd,edf->gecf`). On XLA:CPU that
einsum ran as a generic dot plus transposes of the `[.., F]` activations.
It is patched in for its compile only (`_legacy_experts` below, the old code
verbatim) and checked to give the same first-step loss as "moe".

Timing. Each program is compiled ahead of time (`.lower().compile()`), run
`--warmup` times untimed, then the programs of one layout run round-robin,
one step each per round, the order reversed every other round, `--reps`
rounds. The verdict uses the median over rounds of the per-round ratio
t_moe / t_dense (both measured seconds apart, so load from other processes
hits both alike). Also shown: the ratio of medians, of the fastest steps, and
of median process CPU time (all threads), which other processes on the
machine move least.

    python benchmarks/overhead.py            # full run -> benchmarks/results/overhead.{json,md}
    python benchmarks/overhead.py --quick    # smoke run (tiny model, one layout) -> a temp dir
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import math
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # _common
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tedjax
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.ad_checkpoint import checkpoint_name  # noqa: E402

import _common  # noqa: E402
from tedjax import data as data_lib  # noqa: E402
from tedjax.config import DataConfig, MeshConfig, ModelConfig, OptimizerConfig, TrainConfig  # noqa: E402
from tedjax.layers import activate  # noqa: E402
from tedjax.mesh import constrain, make_mesh  # noqa: E402
from tedjax.moe import MoE  # noqa: E402
from tedjax.trainer import Trainer  # noqa: E402

NAME = "overhead"
TARGET_RATIO = 1.10
LAYOUTS = ((8, 1, 1), (2, 4, 1), (2, 2, 2), (1, 8, 1))
ROUTINGS = {"top1": (1, 1.0), "top2": (2, 1.25)}  # name -> (top_k, capacity_factor)
TARGETED = "top1"


# --------------------------------------------------------------------------- the "before" expert FFN


def _legacy_experts(self: MoE, buf_gecd: jax.Array, counts_gqx=None) -> jax.Array:
    """`MoE._experts` before the change (no DTD): G-major einsums on `[G, E, C, D]`."""
    if self.dtd:
        raise ValueError("the 'before' variant reproduces the old code without DTD only; run with dtd off")
    dt = self.dtype
    h_gecf = jnp.einsum("gecd,edf->gecf", buf_gecd, self.w_in[...].astype(dt))
    gate_gecf = None if self.w_gate is None else jnp.einsum("gecd,edf->gecf", buf_gecd, self.w_gate[...].astype(dt))
    h_gecf = constrain(activate(h_gecf, gate_gecf), ("expert_batch", "experts", "capacity", "act_ffn"))
    out_gecd = jnp.einsum("gecf,efd->gecd", h_gecf, self.w_out[...].astype(dt))
    out_gecd = constrain(out_gecd, ("expert_batch", "experts", "capacity", "act_embed"))
    return checkpoint_name(out_gecd, "moe_expert_out")


@contextlib.contextmanager
def legacy_experts(active: bool):
    if not active:
        yield
        return
    current = MoE._experts
    MoE._experts = _legacy_experts
    try:
        yield
    finally:
        MoE._experts = current


# --------------------------------------------------------------------------- programs


def model_config(args, routing: str) -> ModelConfig:
    top_k, capacity_factor = ROUTINGS[routing]
    return ModelConfig(
        vocab_size=256, d_model=args.d_model, n_layers=args.layers, n_heads=args.heads, d_ff=args.d_ff,
        max_len=args.seq, num_experts=args.experts, expert_d_ff=args.expert_d_ff, top_k=top_k,
        capacity_factor=capacity_factor, moe_every=args.moe_every, min_capacity=args.min_capacity,
    )  # fmt: skip


@dataclasses.dataclass
class Program:
    routing: str
    variant: str  # "dense" | "moe" | "before"
    model: ModelConfig
    trainer: Trainer
    compiled: object
    state: object
    batch: dict
    compile_s: float
    first_loss: float = math.nan
    wall: list = dataclasses.field(default_factory=list)
    cpu: list = dataclasses.field(default_factory=list)
    cost: dict = dataclasses.field(default_factory=dict)


def build(args, routing: str, variant: str, layout, devices) -> Program:
    moe_config = model_config(args, routing)
    model = moe_config.dense_twin() if variant == "dense" else moe_config
    config = TrainConfig(
        steps=1000, model=model, mesh=MeshConfig(*layout),
        optimizer=OptimizerConfig(warmup_steps=10),
        data=DataConfig(source="synthetic", seq_len=args.seq, batch_size=args.batch),
    )  # fmt: skip
    mesh = make_mesh(*layout, devices=devices)
    trainer = Trainer(config, mesh)
    state = trainer.init_state()
    local = next(data_lib.synthetic_batches(model.vocab_size, args.batch, args.seq, seed=0))
    t0 = time.perf_counter()
    with jax.set_mesh(mesh), legacy_experts(variant == "before"):
        batch = trainer.shard_batch(local)
        compiled = trainer.train_step.lower(state, batch).compile()
    compile_s = time.perf_counter() - t0
    program = Program(routing, variant, model, trainer, compiled, state, batch, compile_s)
    program.cost = _cost(compiled)
    return program


def _cost(compiled) -> dict:
    """Per-device FLOPs and bytes accessed from XLA's cost analysis (noise-free, unlike time)."""
    try:
        cost = _common.xla_cost(compiled)
        return {"gflop": cost.get("flops", math.nan) / 1e9, "gb_accessed": cost.get("bytes accessed", math.nan) / 1e9}
    except Exception:  # cost analysis is best effort
        return {"gflop": math.nan, "gb_accessed": math.nan}


def step(program: Program, timed: bool) -> None:
    with jax.set_mesh(program.trainer.mesh):
        cpu0, wall0 = time.process_time(), time.perf_counter()
        program.state, metrics = program.compiled(program.state, program.batch)
        jax.block_until_ready(program.state)
        wall, cpu = time.perf_counter() - wall0, time.process_time() - cpu0
    if math.isnan(program.first_loss):
        program.first_loss = float(metrics["loss"])
    if timed:
        program.wall.append(wall)
        program.cpu.append(cpu)


def run_layout(args, layout, devices) -> list[Program]:
    programs = []
    for routing in args.routings:
        for variant in ("dense", "moe") + (("before",) if args.before else ()):
            programs.append(build(args, routing, variant, layout, devices))
            p = programs[-1]
            print(f"  {_label(layout)} {routing} {variant:6s} compiled in {p.compile_s:.1f} s "
                  f"({p.cost['gflop']:.3g} GFLOP, {p.cost['gb_accessed']:.3g} GB accessed per device)", flush=True)
    for _ in range(args.warmup):
        for p in programs:
            step(p, timed=False)
    for routing in args.routings:  # the patched and the shipped expert FFN compute the same function
        mine = {p.variant: p for p in programs if p.routing == routing}
        if "before" in mine and not math.isclose(mine["before"].first_loss, mine["moe"].first_loss, rel_tol=1e-4):
            raise AssertionError(f"{routing}: first-step loss differs, before {mine['before'].first_loss} "
                                 f"vs moe {mine['moe'].first_loss}")
    for rep in range(args.reps):
        for p in programs if rep % 2 == 0 else programs[::-1]:
            step(p, timed=True)
    return programs


def _label(layout) -> str:
    return "x".join(map(str, layout))


# --------------------------------------------------------------------------- results


def rows_for(layout_name: str, programs: list[Program], args) -> list[dict]:
    rows = []
    for routing in args.routings:
        mine = {p.variant: p for p in programs if p.routing == routing}
        dense = mine["dense"]
        for variant in ("moe", "before"):
            p = mine.get(variant)
            if p is None:
                continue
            paired = [m / d for m, d in zip(p.wall, dense.wall)]
            ratio = _common.median(paired)
            targeted = routing == TARGETED and variant == "moe"
            rows.append({
                "layout": layout_name,
                "routing": routing,
                "top_k": p.model.top_k,
                "capacity_factor": p.model.capacity_factor,
                "variant": variant,
                "moe_ms": _common.median(p.wall) * 1e3,
                "dense_ms": _common.median(dense.wall) * 1e3,
                "ratio": ratio,
                "ratio_q1": float(np.percentile(paired, 25)),
                "ratio_q3": float(np.percentile(paired, 75)),
                "ratio_of_medians": _common.median(p.wall) / _common.median(dense.wall),
                "ratio_min": min(p.wall) / min(dense.wall),
                "ratio_cpu": _common.median(p.cpu) / _common.median(dense.cpu),
                "moe_times_s": p.wall,
                "dense_times_s": dense.wall,
                "moe_cpu_s": p.cpu,
                "dense_cpu_s": dense.cpu,
                "moe_gflop": p.cost["gflop"],
                "dense_gflop": dense.cost["gflop"],
                "moe_gb_accessed": p.cost["gb_accessed"],
                "dense_gb_accessed": dense.cost["gb_accessed"],
                "moe_compile_s": p.compile_s,
                "dense_compile_s": dense.compile_s,
                "first_loss_moe": p.first_loss,
                "first_loss_dense": dense.first_loss,
                "target": ("PASS" if ratio <= TARGET_RATIO else "MISS") if targeted else "",
            })
    return rows


def render_markdown(rows, settings, machine, wall_s, skipped) -> str:
    cols = [
        ("layout (d,e,t)", "layout"),
        ("routing", lambda r: f"top-{r['top_k']} cf {r['capacity_factor']}"),
        ("MoE code", "variant"),
        ("MoE ms", "moe_ms", ".0f"),
        ("dense ms", "dense_ms", ".0f"),
        ("ratio (paired median)", "ratio", ".3f"),
        ("IQR", lambda r: f"{r['ratio_q1']:.2f}-{r['ratio_q3']:.2f}"),
        ("ratio of medians", "ratio_of_medians", ".3f"),
        ("ratio (fastest)", "ratio_min", ".3f"),
        ("ratio (CPU time)", "ratio_cpu", ".3f"),
        ("GFLOP/dev MoE / dense", lambda r: f"{r['moe_gflop']:.3g} / {r['dense_gflop']:.3g}"),
        ("GB accessed/dev MoE / dense", lambda r: f"{r['moe_gb_accessed']:.3g} / {r['dense_gb_accessed']:.3g}"),
        (f"target <= {TARGET_RATIO}", "target"),
    ]
    order = sorted(rows, key=lambda r: (r["routing"], r["variant"] != "before", LAYOUT_ORDER.get(r["layout"], 99)))
    s = settings
    lines = [
        "# MoE step time over the FLOP-matched dense twin",
        "",
        f"Regenerate: `{s['command']}`",
        "",
        f"Date {machine['date']}; {machine['device_kind']} ({machine['backend']}) x{machine['device_count']}, "
        f"{machine['cpu_count']} CPUs, jax {machine['jax_version']}, flax {machine['flax_version']}; "
        f"{machine['platform']}. Run wall time {wall_s:.0f} s; load average {machine.get('load_avg')} at start, "
        f"{s.get('load_avg_end')} at end.",
        "",
        f"Model: d_model {s['d_model']}, {s['layers']} layers (MoE every {s['moe_every']} layers), {s['heads']} heads, "
        f"d_ff {s['d_ff']}, {s['experts']} experts of d_ff {s['expert_d_ff']}, float32, vocab 256. "
        f"Dense twin: `ModelConfig.dense_twin()` (MoE layers -> FFN of width top_k x {s['expert_d_ff']}). "
        f"Step: `Trainer.train_step` (AdamW, ZeRO-1), batch {s['batch']} x seq {s['seq']} = "
        f"{s['batch'] * s['seq']} tokens per step, synthetic data. {s['reps']} timed rounds after "
        f"{s['warmup']} warm-up steps; the programs of a layout alternate step by step.",
        "",
        "ratio = median over rounds of t_MoE / t_dense (wall clock), IQR its spread; also the ratio of the "
        "median wall times, of the fastest steps, and of median process CPU time (all threads; least moved "
        "by other processes). GFLOP and GB accessed per device come from XLA's cost analysis of each "
        "compiled step. MoE code `moe` = tedjax as shipped; `before` = the expert FFN as it was written "
        "before the change (G-major `gecd,edf->gecf` einsums), same routing, dispatch and combine.",
        "",
        _common.markdown_table(order, cols),
        f"Target: top-1 (cf 1.0) ratio <= {TARGET_RATIO} at every layout:",
        "",
    ]
    for r in order:
        if r["target"]:
            lines.append(f"- {r['layout']}: {r['ratio']:.3f} (CPU time {r['ratio_cpu']:.3f}) -> **{r['target']}**")
    verdict = settings.get("verdict")
    if verdict:
        lines += ["", f"Overall: **{verdict}**"]
    lines += [""] + [f"- {line}" for line in skipped]
    if s.get("notes"):
        lines += ["", "Notes:", ""] + [f"- {n}" for n in s["notes"]]
    return "\n".join(lines) + "\n"


LAYOUT_ORDER = {_label(layout): i for i, layout in enumerate(LAYOUTS)}


# --------------------------------------------------------------------------- main


def parse_layout(text: str) -> tuple[int, int, int]:
    parts = text.replace("x", ",").split(",")
    if len(parts) != 3 or not all(p.strip().isdigit() for p in parts):
        raise argparse.ArgumentTypeError(f"layout {text!r} must look like 2,4,1 (data,expert,tensor)")
    return tuple(int(p) for p in parts)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layouts", type=parse_layout, nargs="+", default=list(LAYOUTS), help="data,expert,tensor")
    p.add_argument("--routings", nargs="+", default=list(ROUTINGS), choices=list(ROUTINGS))
    p.add_argument("--d-model", type=int, default=256)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--d-ff", type=int, default=1024, help="width of the non-MoE layers' FFN")
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--expert-d-ff", type=int, default=1024)
    p.add_argument("--moe-every", type=int, default=2, help="every n-th layer is MoE (2: as configs/tiny.yaml)")
    p.add_argument("--min-capacity", type=int, default=4)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--batch", type=int, default=32, help="sequences per step (all devices)")
    p.add_argument("--reps", type=int, default=6, help="timed rounds (even: each program leads as often as it trails)")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps per program after compiling")
    p.add_argument("--no-before", dest="before", action="store_false",
                   help="skip the 'before' variant (the old expert FFN)")
    p.add_argument("--note", action="append", help="a note printed under the table (repeatable)")
    p.add_argument("--quick", action="store_true", help="tiny smoke run; writes to a temp dir unless --out")
    p.add_argument("--out", default=None, help="output dir (default benchmarks/results, a temp dir with --quick)")
    args = p.parse_args(argv)
    if args.quick:
        args.layouts, args.routings = [(2, 2, 2)], ["top1"]
        args.d_model, args.heads, args.d_ff, args.expert_d_ff = 32, 2, 64, 64
        args.seq, args.batch, args.reps, args.warmup = 32, 8, 2, 1
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    start = time.perf_counter()
    out_dir = _common.output_dir("overhead", args.out, args.quick)
    machine = _common.machine_info()
    settings = {k: v for k, v in vars(args).items() if k not in ("out", "note")}
    settings["layouts"] = [_label(layout) for layout in args.layouts]
    settings["command"] = " ".join(["python", "benchmarks/overhead.py", *(argv if argv is not None else sys.argv[1:])])
    settings["target"] = f"top-1 cf 1.0: median paired step-time ratio MoE / dense twin <= {TARGET_RATIO}"
    print(f"{NAME}: {machine['device_kind']} x{machine['device_count']}, jax {machine['jax_version']}, "
          f"settings {settings}", flush=True)

    cpu_devices = jax.devices("cpu")
    rows, skipped = [], []
    for layout in args.layouts:
        if math.prod(layout) != len(cpu_devices):
            raise ValueError(f"layout {layout} needs {math.prod(layout)} devices but {len(cpu_devices)} CPU devices "
                             f"exist; set XLA_FLAGS=--xla_force_host_platform_device_count={math.prod(layout)}")
        rows += rows_for(_label(layout), run_layout(args, layout, cpu_devices), args)
    if jax.default_backend() == "gpu":
        rows += rows_for("gpu 1x1x1", run_layout(args, (1, 1, 1), jax.devices()[:1]), args)
    else:
        line = (f"SKIP single-GPU layout (1,1,1): no GPU on this machine (backend {jax.default_backend()}); "
                "run this script where `jax.default_backend() == 'gpu'` to add it")
        print(line, flush=True)
        skipped.append(line)

    for r in rows:
        print(f"  {r['layout']:9s} {r['routing']} {r['variant']:6s} MoE {r['moe_ms']:7.0f} ms  dense "
              f"{r['dense_ms']:7.0f} ms  ratio {r['ratio']:.3f} (CPU {r['ratio_cpu']:.3f}) {r['target']}", flush=True)
    targeted = [r for r in rows if r["target"]]
    settings["verdict"] = (("PASS" if all(r["target"] == "PASS" for r in targeted) else "MISS")
                           + f" ({sum(r['target'] == 'PASS' for r in targeted)}/{len(targeted)} layouts)")
    settings["load_avg_end"] = _common.load_avg()
    settings["notes"] = list(args.note or [])
    wall_s = time.perf_counter() - start
    markdown = render_markdown(rows, settings, machine, wall_s, skipped)
    _common.publish(NAME, rows, settings, markdown, out_dir, machine, extra={"wall_s": wall_s, "skipped": skipped})
    return 0


if __name__ == "__main__":
    sys.exit(main())
