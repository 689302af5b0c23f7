"""Dropless MoE (`model.capacity_scope=dropless`) against per-expert capacity at cf = E/k and cf 1.25.

(a) The MoE layer, forward + backward, compiled on 8 simulated CPU devices at
    a Qwen3-MoE-like shape (E = 128, k = 8, small D and F, mesh (1, 8, 1)) and
    at the main job's shape (configs/tiny.yaml: E = 8, k = 1, D = 128,
    F = 512, mesh (2, 2, 2)). Variants: dropless (worst-case pools, the static
    exchange CPU runs), dropless with `dropless_buffer_factor` 2, per-expert
    capacity at cf = E/k (what Hugging Face imports used to set: nothing
    drops) and at cf 1.25. Per device: compiled temp memory
    (`memory_analysis`), the expert FFN's FLOPs (XLA's cost analysis of the
    per-device expert computation alone, forward + backward, on the busiest
    device's rows per expert from the layer's own routing; the CPU `loop`
    FFN's body is counted once by XLA, so one block's FLOPs are added per
    further block it runs) and the layer's (whole program, the same way),
    token all-to-all bytes (compiled HLO, every pass). The ragged exchange's
    bytes are the bookkeeping's: rows the layer actually
    routed to each device on this input, the planner's expected (uniform)
    rows, and the worst case (the receive buffer).
(b) Zipf(1.0) skew, E = 16 on "expert" = 8: max / mean rows per device of a
    dropless layer without and with SmartMoE placement (greedy on a
    calibration sample's load, scored on a fresh sample).
(c) The main job (configs/tiny.yaml, 300 steps) with dropless: validation
    loss and CPU step time against the baseline (benchmarks/load_balance.py's
    runner; the device pool's figures from results/load_balance.json), and
    both step times again timed in turn, step by step, so that other work on
    the machine weighs on each alike. Skipped with --quick.

Targets (issue 23), at E = 128, k = 8 on "expert" = 8: static dropless
<= 0.5x cf = E/k in memory, expert FLOPs and all-to-all bytes; buffer factor
2 <= 2.2x the routed rows in all three (each measured figure scaled as
figure / figure(cf = E/k) x E/k, since cf = E/k holds E/k x the routed
rows); placement cuts max/mean rows per device by >= 1.3x. The ragged
exchange + grouped GEMM (<= 1.3x the routed rows) is measured on a GPU only
(benchmarks/gpu_session.sh), never estimated here.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # _common
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tedjax
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

import _common  # noqa: E402
import load_balance  # noqa: E402
from tedjax import analysis, balance, grouped, plan  # noqa: E402
from tedjax import routing as routing_lib  # noqa: E402
from tedjax.config import DataConfig, MeshConfig, ModelConfig, TrainConfig, load_config  # noqa: E402
from tedjax.layers import activate  # noqa: E402
from tedjax.mesh import make_mesh  # noqa: E402
from tedjax.moe import MoE  # noqa: E402

SHAPES = {  # name: (E, k, D, F, group size S, routing groups, mesh, activation)
    "qwen3-like E=128 k=8": (128, 8, 64, 64, 64, 16, (1, 8, 1), "swiglu"),
    "main job E=8 k=1": (8, 1, 128, 512, 128, 32, (2, 2, 2), "gelu"),
}
QUICK_SHAPES = {"qwen3-like E=128 k=8": (128, 8, 16, 16, 16, 8, (1, 8, 1), "swiglu")}
MAIN_JOB = {"baseline": [], "dropless": ["model.capacity_scope=dropless"]}  # device pool: load_balance.json
BASELINE_VAL, DEVICE_POOL_VAL = 1.569, 1.547  # issue 23's reference figures


def variants(num_experts: int, top_k: int) -> dict[str, dict]:
    return {
        "dropless": dict(capacity_scope="dropless"),
        "dropless f=2": dict(capacity_scope="dropless", dropless_buffer_factor=2.0),
        "cf=E/k": dict(capacity_scope="expert", capacity_factor=num_experts / top_k),
        "cf 1.25": dict(capacity_scope="expert", capacity_factor=1.25),
    }


def _flops(compiled) -> float:
    cost = _common.xla_cost(compiled)
    return float(cost["flops"])


def loop_block_flops(block: int, d: int, f: int, swiglu: bool) -> float:
    """XLA's FLOPs of one block of `grouped.pool_ffn`'s `loop` method, forward loop + backward loop (which
    recomputes the forward): what each block the loops run adds. XLA's cost analysis counts a loop body once,
    whatever its trip count, so the executed FLOPs are the program's + (blocks run - 1) x this."""
    x, w_in, w_out = jnp.ones((block, d)), jnp.ones((d, f)), jnp.ones((f, d))
    w_gate = jnp.ones((d, f)) if swiglu else None
    fwd = jax.jit(grouped._block_ffn).lower(x, w_in, w_gate, w_out).compile()
    bwd = jax.jit(lambda *a: jax.vjp(grouped._block_ffn, *a)[1](x)).lower(x, w_in, w_gate, w_out).compile()
    return _flops(fwd) + _flops(bwd)


def expert_flops(kind: dict, e_local: int, groups_out: int, rows_per_group: int, d: int, f: int, swiglu: bool,
                 rows_e: np.ndarray | None = None, fill: float = 1.0) -> tuple[float, int]:
    """XLA's FLOPs of one device's expert FFN alone, forward + backward (loss = sum(out^2)), on the buffer
    the layer gives it: per-expert `[E_local, G/data * C, D]` einsums, or the grouped pool FFN with the
    busiest device's rows per local expert `rows_e` (the layer's own routing of its input). `f` is the
    device's slice of the FFN dim (F / tensor). With `loop` the blocks it runs are counted (`loop_block_flops`).
    Returns (FLOPs, blocks run; 0 for the static methods)."""
    key = jax.random.key(0)
    w_in = jax.random.normal(key, (e_local, d, f))
    w_gate = jax.random.normal(key, (e_local, d, f)) if swiglu else None
    w_out = jax.random.normal(key, (e_local, f, d))
    if kind["capacity_scope"] == "expert":
        buf = jnp.ones((e_local, groups_out * rows_per_group, d))

        def ffn(buf, w_in, w_gate, w_out):
            h = jnp.einsum("emd,edf->emf", buf, w_in)
            gate = None if w_gate is None else jnp.einsum("emd,edf->emf", buf, w_gate)
            return jnp.sum(jnp.square(jnp.einsum("emf,efd->emd", activate(h, gate), w_out)))
    else:
        buf = jnp.ones((groups_out, 1, rows_per_group, d))
        rows_e = np.asarray(rows_e, np.int64)  # each expert's rows spread over the groups
        counts = np.stack([rows_e // groups_out + (g < rows_e % groups_out) for g in range(groups_out)])
        counts = jnp.asarray(counts[:, None, :], jnp.int32)

        def ffn(buf, w_in, w_gate, w_out):
            return jnp.sum(jnp.square(grouped.pool_ffn(buf, counts, w_in, w_gate, w_out, expected_fill=fill,
                                                       worst_case_pool=kind["capacity_scope"] == "dropless")))

    compiled = jax.jit(jax.grad(ffn, argnums=(0, 1, 2, 3))).lower(buf, w_in, w_gate, w_out).compile()
    flops, blocks = _flops(compiled), 0
    if grouped.resolve_method("auto", kind["capacity_scope"] == "dropless") == "loop":
        block = grouped.block_rows(math.ceil(groups_out * rows_per_group * fill), e_local)
        blocks = int(grouped.loop_blocks(counts, block))
        flops += (blocks - 1) * loop_block_flops(block, d, f, swiglu)
    return flops, blocks


def layer_row(shape_name: str, shape: tuple, name: str, kind: dict) -> dict:
    num_experts, top_k, d, f, s, groups, layout, activation = shape
    mesh = make_mesh(*layout)
    x_devices = layout[1]
    args = argparse.Namespace(d_model=d, group_size=s, layer_groups=groups)

    def make():
        return MoE(d, num_experts, f, top_k=top_k, min_capacity=1, group_size=s, activation=activation,
                   rngs=nnx.Rngs(0), **kind)

    params, x, compiled, compile_s = load_balance.compile_layer(make, mesh, args)
    with jax.set_mesh(mesh):
        (_, dropped), _ = compiled(params, x)
    token_bytes = sum((c.trip_count if c.in_loop and c.trip_count else 1) * c.sent_bytes
                      for c in analysis.collectives(compiled, mesh)
                      if c.kind == "all-to-all" and not c.trivial and not c.shape.lstrip("(").startswith("s32"))
    e_local, groups_out = num_experts // x_devices, groups // layout[0]
    if kind["capacity_scope"] == "expert":
        rows_per_group = routing_lib.capacity(s, num_experts, top_k, kind["capacity_factor"], 1) * e_local
    else:
        rows_per_group = routing_lib.dropless_capacity(s, num_experts, top_k, x_devices,
                                                       kind.get("dropless_buffer_factor", 0.0))
    ex_rows = rows_per_group if kind["capacity_scope"] != "expert" else rows_per_group // e_local
    most_rows, rows_e, fill = rows_routed(make, mesh, x)
    flops, blocks = expert_flops(kind, e_local, groups_out, ex_rows, d, f // layout[2], activation == "swiglu",
                                 rows_e, fill)
    layer_flops = _flops(compiled)
    if blocks:  # the layer's loops, also counted once: the busiest device's blocks
        block = grouped.block_rows(math.ceil(groups_out * ex_rows * fill), e_local)
        layer_flops += (blocks - 1) * loop_block_flops(block, d, f // layout[2], activation == "swiglu")
    row = {
        "shape": shape_name, "variant": name, "experts": num_experts, "top_k": top_k, "mesh": list(layout),
        "temp_bytes": int(compiled.memory_analysis().temp_size_in_bytes),
        "expert_flops": flops, "loop_blocks": blocks,
        "layer_flops": layer_flops, "a2a_bytes": float(token_bytes),
        "buffer_rows": groups_out * rows_per_group, "routed_rows": groups_out * s * top_k / x_devices,
        "dropped_fraction": float(dropped), "compile_s": compile_s,
    }
    if kind["capacity_scope"] == "dropless":
        config = TrainConfig(model=ModelConfig(d_model=d, num_experts=num_experts, top_k=top_k, expert_d_ff=f,
                                               max_len=s, group_size=s, capacity_scope="dropless",
                                               dropless_buffer_factor=kind.get("dropless_buffer_factor", 0.0),
                                               n_heads=1, moe_every=1),
                             data=DataConfig(seq_len=s, batch_size=groups, source="synthetic"),
                             mesh=MeshConfig(*layout))  # fmt: skip
        rows = plan.dropless_rows(config, backend="cpu")
        row.update(ragged_rows_actual_max=most_rows, ragged_rows_expected=rows["expected_rows"],
                   ragged_rows_worst=rows["worst_rows"], planner_buffer_rows=rows["buffer_rows"])
    return row


def rows_routed(make, mesh, x) -> tuple[float, np.ndarray, float]:
    """On this input, per data shard: the most rows a device of the "expert" axis receives (what the ragged
    exchange sends it, per direction; `MoEStats.device_rows`), that device's rows per local expert (from
    `MoEStats.expert_load`, identity placement), and the pool fill the layer sizes its blocks by."""
    with jax.set_mesh(mesh):
        layer = make()
        _, stats = jax.jit(lambda layer, x: layer(x))(layer, x)
        fill = layer._pool_fill() if layer.capacity_scope != "expert" else 1.0
    choices = x.shape[0] * x.shape[1] * layer.top_k / mesh.shape["data"]
    rows_x = np.asarray(stats.device_rows)
    rows_e = np.asarray(stats.expert_load).reshape(rows_x.shape[0], -1)[int(np.argmax(rows_x))] * choices
    return float(np.max(rows_x)) * choices, np.rint(rows_e), fill


def judge_layers(rows: list[dict]) -> list[dict]:
    verdicts = []
    for shape in dict.fromkeys(r["shape"] for r in rows):
        mine = {r["variant"]: r for r in rows if r["shape"] == shape}
        ref = mine["cf=E/k"]
        scale = ref["experts"] / ref["top_k"]
        for name in ("dropless", "dropless f=2", "cf 1.25"):
            r = mine[name]
            ratios = {m: r[m] / ref[m] for m in ("temp_bytes", "expert_flops", "a2a_bytes", "layer_flops")}
            r.update({f"{m}_vs_cf_E_over_k": v for m, v in ratios.items()})
            r.update({f"{m}_x_routed": v * scale for m, v in ratios.items()})
            three = [ratios[m] for m in ("temp_bytes", "expert_flops", "a2a_bytes")]
            if ref["experts"] == 128 and name == "dropless":
                verdicts.append({"target": f"{shape}: static dropless <= 0.5x cf=E/k (memory, expert FLOPs, "
                                           "a2a bytes)", "measured": [round(v, 3) for v in three],
                                 "verdict": "PASS" if max(three) <= 0.5 else "MISS"})
            if ref["experts"] == 128 and name == "dropless f=2":
                routed = [v * scale for v in three]
                verdicts.append({"target": f"{shape}: buffer factor 2 <= 2.2x routed rows (memory, expert FLOPs, "
                                           "a2a bytes)", "measured": [round(v, 3) for v in routed],
                                 "dropped_fraction": r["dropped_fraction"],
                                 "verdict": "PASS" if max(routed) <= 2.2 else "MISS"})
    return verdicts


def zipf_rows(args) -> dict:
    """Max / mean rows per device of a dropless layer (every choice is a row), E = 16 on X = 8, Zipf(1.0)."""
    num_experts, devices, s = 16, 8, 1.0
    out = {"experts": num_experts, "devices": devices, "zipf_s": s, "cases": []}
    for top_k in (1, 2):
        before, after, shadowed, best = [], [], [], []
        for i in range(args.perms):
            perm = np.random.default_rng(1000 + i).permutation(num_experts)
            logits = load_balance.skew_logits(num_experts, s, args.groups, args.zipf_group_size, perm, seed=2 * i)
            calib = load_balance.skew_logits(num_experts, s, args.groups, args.zipf_group_size, perm, seed=2 * i + 1)
            load = np.asarray(routing_lib.route(logits, top_k=top_k, capacity_factor=1.0).expert_load)
            calib_load = np.asarray(routing_lib.route(calib, top_k=top_k, capacity_factor=1.0).expert_load)
            for placement, sink in ((np.arange(num_experts), before),
                                    (balance.greedy_placement(calib_load, devices), after)):
                rows = balance.device_loads(load, placement, devices)
                sink.append(rows.max() / rows.mean())
            # the best any placement reaches on this sample (two slots per device: hottest with coldest is optimal)
            ranked = np.sort(load)
            best.append(float(np.max(ranked[:devices] + ranked[::-1][:devices])) * devices / load.sum())
            # + the calibration's hottest expert shadowed: its rows stay where its tokens are (spread evenly),
            # and the placement balances the rest
            hot = int(np.argmax(calib_load))
            pooled, calib_pooled = load.copy(), calib_load.copy()
            pooled[hot] = calib_pooled[hot] = 0.0
            placed = balance.greedy_placement(calib_pooled, devices)
            rows = balance.device_loads(pooled, placed, devices) + load[hot] / devices
            shadowed.append(rows.max() / rows.mean())
        case = {"top_k": top_k, "max_over_mean_identity": float(np.mean(before)),
                "max_over_mean_placed": float(np.mean(after)),
                "max_over_mean_placed_and_shadow": float(np.mean(shadowed)),
                "max_over_mean_best_placement": float(np.mean(best)),
                "hottest_expert_over_mean_device": float(np.mean(np.sort(load)[-1:]) * devices)}
        case["cut"] = case["max_over_mean_identity"] / case["max_over_mean_placed"]
        case["verdict"] = "PASS" if case["cut"] >= 1.3 else "MISS"
        case["best_cut"] = case["max_over_mean_identity"] / case["max_over_mean_best_placement"]
        case["cut_with_shadow"] = case["max_over_mean_identity"] / case["max_over_mean_placed_and_shadow"]
        out["cases"].append(case)
    return out


def main_job(args) -> list[dict]:
    runs_dir = Path(args.runs_dir or tempfile.mkdtemp(prefix="dropless_runs_"))
    lb_args = argparse.Namespace(steps=args.steps, seed=0, quick=False, reuse_runs=args.reuse_runs)
    rows = []
    for name, extra in MAIN_JOB.items():
        r = load_balance.train_variant(lb_args, name, extra, runs_dir)
        rows.append({"variant": name, "val_loss": r["val_loss"], "median_step_s": r["median_step_s"],
                     "dropped_final": r["dropped_final"], "token_a2a_bytes_per_layer":
                     r["a2a"]["token_sent_bytes_per_layer"], "reused_run": r["reused_run"], "wall_s": r["wall_s"]})
    base = rows[0]["median_step_s"]
    paired = paired_step_times(args)
    for r in rows:
        r["step_time_vs_baseline"] = r["median_step_s"] / base
        r["paired_step_s"] = paired[r["variant"]]
        r["paired_vs_baseline"] = paired[r["variant"]] / paired["baseline"]
    earlier = _common.RESULTS_DIR / "load_balance.json"
    if earlier.exists():  # the device pool as benchmarks/load_balance.py measured it (another session's load)
        lb = json.loads(earlier.read_text())
        pool = {r["variant"]: r for r in lb["main_job"]["rows"]}
        if "device pool" in pool and "baseline" in pool:
            rows.append({"variant": "device pool (load_balance.json)", "val_loss": pool["device pool"]["val_loss"],
                         "median_step_s": pool["device pool"]["median_step_s"],
                         "step_time_vs_baseline": pool["device pool"]["median_step_s"]
                         / pool["baseline"]["median_step_s"], "reused_run": True})
    return rows


def gpu_check(args) -> int:
    """On a GPU (benchmarks/gpu_session.sh): the ragged exchange against its CPU emulation and against the
    static exchange (equal outputs and gradients), and the grouped GEMM's work on the worst-case buffer
    against the routed rows (`ragged_dot` time on a buffer filled to the expected rows / on the routed rows)."""
    from jax.sharding import NamedSharding

    from tedjax import ragged

    devices = jax.devices()
    n, machine, rows = len(devices), _common.machine_info(), []
    mesh = jax.make_mesh((n,), ("x",), devices=devices)
    rng = np.random.default_rng(0)
    groups, slots, d = 4, 64, 128
    counts = jnp.asarray(rng.integers(0, slots // 2 + 1, (n * n, groups)), jnp.int32)  # [devices x regions, B]
    x = jnp.asarray(rng.normal(size=(n * n, groups, slots, d)), jnp.float32)
    x = x * (np.arange(slots)[None, None, :, None] < np.asarray(counts)[..., None, None])
    spec = jax.P("x")

    def both(x, send, recv_all):
        recv = recv_all  # [n, B]: region a = what device a sends here
        real = ragged.exchange(x, send, recv, "x")
        emulated = ragged.exchange(x, send, recv, "x", ragged.emulated_ragged_all_to_all)
        return real, emulated

    recv = jnp.asarray(np.asarray(counts).reshape(n, n, groups).transpose(1, 0, 2).reshape(n * n, groups))
    put = lambda a: jax.device_put(a, NamedSharding(mesh, spec))  # noqa: E731
    fn = jax.jit(jax.shard_map(both, mesh=mesh, in_specs=(spec, spec, spec), out_specs=(spec, spec)))
    real, emulated = fn(put(x), put(counts), put(recv))
    grad = jax.jit(jax.grad(lambda x, c, r, w: jnp.sum(fn(x, c, r)[w] ** 2)), static_argnums=3)
    g_real, g_emu = grad(put(x), put(counts), put(recv), 0), grad(put(x), put(counts), put(recv), 1)
    rows.append({"check": f"ragged_all_to_all vs emulation ({n} device(s))",
                 "max_abs_diff": float(jnp.max(jnp.abs(real - emulated))),
                 "grad_max_abs_diff": float(jnp.max(jnp.abs(g_real - g_emu)))})
    if n > 1:  # the layer on ("expert" = all devices): ragged against static
        outs = {}
        lay = make_mesh(1, n, 1)
        for exchange in ("ragged", "static"):
            def make(exchange=exchange):
                return MoE(d, 8 * n, 256, top_k=2, group_size=64, capacity_scope="dropless", activation="swiglu",
                           exchange=exchange, rngs=nnx.Rngs(0))
            params, xs, compiled, _ = load_balance.compile_layer(
                make, lay, argparse.Namespace(d_model=d, group_size=64, layer_groups=4 * n))
            with jax.set_mesh(lay):
                outs[exchange] = compiled(params, xs)
        (lr, _), gr = outs["ragged"]
        (ls, _), gs = outs["static"]
        rows.append({"check": f"dropless layer, ragged vs static exchange on {n} devices",
                     "max_abs_diff": abs(float(lr) - float(ls)) / max(abs(float(ls)), 1.0),
                     "grad_max_abs_diff": max(float(jnp.max(jnp.abs(a - b)))
                                              for a, b in zip(jax.tree.leaves(gr), jax.tree.leaves(gs)))})
    # Grouped GEMM work: E_local = 16, k = 8 of E = 128 on 8 devices -> the worst-case pool is 8x the routed rows
    e_local, s, ff = (16, 32, 64) if args.quick else (16, 256, 1024)
    routed, worst = s, 8 * s  # per group: S k / X routed rows, S x min(E_local, k) worst case
    key = jax.random.key(0)
    w_in = jax.random.normal(key, (e_local, d, ff), jnp.bfloat16)
    w_out = jax.random.normal(key, (e_local, ff, d), jnp.bfloat16)
    timings = {}
    for name, pool in (("worst-case buffer", worst), ("routed rows only", routed)):
        buf = jax.random.normal(key, (16, 1, pool, d), jnp.bfloat16)
        cnt = jnp.full((16, 1, e_local), routed // e_local, jnp.int32)  # the same routed rows, in a larger buffer
        f = jax.jit(lambda b, wi, wo: grouped.pool_ffn(b, cnt, wi, None, wo, method="ragged"))
        timings[name] = _common.median(_common.time_fn(f, buf, w_in, w_out, reps=20, warmup=2))
    ratio = timings["worst-case buffer"] / timings["routed rows only"]
    rows.append({"check": "ragged_dot grouped FFN: time on the worst-case buffer / on the routed rows "
                          "(target <= 1.3)", "ratio": ratio, "verdict": "PASS" if ratio <= 1.3 else "MISS",
                 **{f"{k} s": v for k, v in timings.items()}})
    for r in rows:
        print(r, flush=True)
    md = "# Dropless on GPU\n\n" + f"{machine['device_kind']} x {n}, jax {machine['jax_version']}\n\n" + \
        _common.markdown_table(rows, ["check", "max_abs_diff", "grad_max_abs_diff", "ratio", "verdict"])
    _common.publish("dropless_gpu", rows, {"gpu_check": True}, md, args.out or _common.RESULTS_DIR, machine)
    return 0


def paired_step_times(args, reps: int = 15) -> dict[str, float]:
    """Median train-step seconds of the main job's variants timed in turn, step by step (ABAB...), so that the
    machine's load (other work) weighs on each the same: a fairer ratio than two runs at different times."""
    from tedjax.data import synthetic_batches
    from tedjax.trainer import Trainer

    trainers, states = {}, {}
    for name, extra in MAIN_JOB.items():
        config = load_config(str(load_balance.CONFIG), [*extra, "log.progress=false"])
        mesh = make_mesh(config.mesh.data, config.mesh.expert, config.mesh.tensor)
        trainers[name] = Trainer(config, mesh)
        states[name] = trainers[name].init_state()
    d = next(iter(trainers.values())).config.data
    stream = synthetic_batches(256, d.batch_size, d.seq_len, seed=0)
    batches = [next(stream) for _ in range(4)]
    times = {name: [] for name in trainers}
    for i in range(reps + 2):  # 2 warm-up rounds (compilation)
        for name, trainer in trainers.items():
            batch = trainer.shard_batch(batches[i % len(batches)])
            with jax.set_mesh(trainer.mesh):
                start = time.perf_counter()
                states[name], metrics = trainer.train_step(states[name], batch)
                jax.block_until_ready(metrics)
            if i >= 2:
                times[name].append(time.perf_counter() - start)
    return {name: _common.median(t) for name, t in times.items()}


def markdown(layer_rows, verdicts, zipf, job_rows, machine, quick) -> str:
    lines = ["# Dropless MoE (`model.capacity_scope=dropless`)", "",
             f"Machine: {machine['processor']}, {machine['cpu_count']} CPUs, jax {machine['jax_version']}, "
             f"{machine['device_count']} simulated {machine['backend']} devices, load {machine['load_avg']}"
             + (" (--quick: small shapes, no main job)" if quick else ""), "",
             "## (a) The layer, per device (forward + backward; static exchange, what CPU runs)", "",
             _common.markdown_table(layer_rows, [
                 "shape", "variant", ("temp MB", lambda r: r["temp_bytes"] / 1e6, ".2f"),
                 ("expert GFLOP", lambda r: r["expert_flops"] / 1e9, ".3f"),
                 ("layer GFLOP", lambda r: r["layer_flops"] / 1e9, ".3f"),
                 ("a2a MB", lambda r: r["a2a_bytes"] / 1e6, ".2f"), ("buffer rows", "buffer_rows"),
                 ("routed rows", "routed_rows", ".0f"), ("dropped", "dropped_fraction", ".2%"),
                 ("mem / (E/k)", "temp_bytes_vs_cf_E_over_k", ".3f"),
                 ("expert FLOPs / (E/k)", "expert_flops_vs_cf_E_over_k", ".3f"),
                 ("a2a / (E/k)", "a2a_bytes_vs_cf_E_over_k", ".3f")]),
             "Ragged exchange (GPU/TPU), rows per device and direction from the bookkeeping:", "",
             _common.markdown_table([r for r in layer_rows if "ragged_rows_worst" in r], [
                 "shape", "variant", ("most rows routed to a device (this input)", "ragged_rows_actual_max", ".0f"),
                 ("expected (uniform)", "ragged_rows_expected", ".0f"), ("worst case", "ragged_rows_worst")]),
             "Targets:", "",
             _common.markdown_table(verdicts, ["target", "measured", "verdict"]),
             "- ragged exchange + grouped GEMM <= 1.3x the routed rows (GPU): not measured here "
             "(benchmarks/gpu_session.sh measures it on a GPU).", "",
             f"## (b) Zipf({zipf['zipf_s']}) skew, E = {zipf['experts']} on \"expert\" = {zipf['devices']}: "
             "max / mean rows per device (dropless)", "",
             _common.markdown_table(zipf["cases"], ["top_k", ("identity", "max_over_mean_identity", ".3f"),
                                                    ("placed", "max_over_mean_placed", ".3f"), ("cut", "cut", ".2f"),
                                                    ("verdict (>= 1.3x)", "verdict"),
                                                    ("best placement (exact)", "max_over_mean_best_placement",
                                                     ".3f"), ("best cut", "best_cut", ".2f"),
                                                    ("placed + 1 shadow", "max_over_mean_placed_and_shadow", ".3f"),
                                                    ("cut with the shadow", "cut_with_shadow", ".2f"),
                                                    ("hottest expert / mean device", "hottest_expert_over_mean_device",
                                                     ".3f")]),
             "No placement can split an expert: with two slots per device the best placement pairs the hottest "
             "expert with the coldest (exact, on the scored sample: 'best placement'), so a cut under 1.3x there "
             "means no placement reaches the target; a shadow of the hottest expert (its rows stay with their "
             "tokens) lifts the bound.", "",
             "## (c) The main job (configs/tiny.yaml, 300 steps)", ""]
    if job_rows:
        lines.append(_common.markdown_table(job_rows, [
            "variant", ("val loss", "val_loss", ".4f"), ("median step s", "median_step_s", ".3f"),
            ("step time / baseline", "step_time_vs_baseline", ".2f"),
            ("paired step s", "paired_step_s", ".3f"), ("paired / baseline", "paired_vs_baseline", ".2f"),
            ("dropped at the end", "dropped_final"),
            ("token a2a B/layer", "token_a2a_bytes_per_layer", ".0f")]))
        lines.append(f"Issue 23's reference: baseline {BASELINE_VAL}, device pool {DEVICE_POOL_VAL}.")
    else:
        lines.append("Skipped (--quick)." if quick else "Not run yet (`--part job` runs it).")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="small shapes, no main job; writes to a temp dir unless --out")
    p.add_argument("--out", default=None, help="output dir (default benchmarks/results, a temp dir with --quick)")
    p.add_argument("--steps", type=int, default=300, help="(c) main job steps")
    p.add_argument("--runs-dir", default=None, help="(c) where the training runs log (default: a temp dir)")
    p.add_argument("--reuse-runs", action="store_true", help="(c) reuse finished runs found in --runs-dir")
    p.add_argument("--groups", type=int, default=256, help="(b) routing groups per sample")
    p.add_argument("--zipf-group-size", type=int, default=256, help="(b) tokens per routing group")
    p.add_argument("--perms", type=int, default=4, help="(b) random assignments of Zipf ranks to experts")
    p.add_argument("--gpu-check", action="store_true", help="the GPU checks (benchmarks/gpu_session.sh)")
    p.add_argument("--part", choices=("all", "layer", "job"), default="all",
                   help="run (a)+(b), or (c), keeping the other part of an earlier dropless.json in the out dir")
    args = p.parse_args(argv)
    if args.gpu_check:
        return gpu_check(args)
    if args.quick:
        args.groups, args.zipf_group_size, args.perms = 16, 64, 2
    start = time.perf_counter()
    machine = _common.machine_info()
    shapes = QUICK_SHAPES if args.quick else SHAPES
    out_dir = _common.output_dir("dropless", args.out, args.quick)
    earlier = json.loads((out_dir / "dropless.json").read_text()) if (out_dir / "dropless.json").exists() else {}
    layer_rows = [] if args.part != "job" else earlier.get("rows", [])
    for shape_name, shape in shapes.items() if args.part != "job" else ():
        for name, kind in variants(shape[0], shape[1]).items():
            layer_rows.append(layer_row(shape_name, shape, name, kind))
            r = layer_rows[-1]
            print(f"{shape_name} {name}: temp {r['temp_bytes'] / 1e6:.2f} MB, expert {r['expert_flops'] / 1e9:.3f} "
                  f"GFLOP, a2a {r['a2a_bytes'] / 1e6:.2f} MB, dropped {r['dropped_fraction']:.2%}", flush=True)
    verdicts = judge_layers(layer_rows) if args.part != "job" else earlier.get("verdicts", [])
    zipf = zipf_rows(args) if args.part != "job" else earlier.get("zipf")
    job_rows = [] if args.quick else main_job(args) if args.part != "layer" else earlier.get("main_job", [])
    settings = {"quick": args.quick, "shapes": {k: list(v) for k, v in shapes.items()}, "steps": args.steps,
                "groups": args.groups, "zipf_group_size": args.zipf_group_size, "perms": args.perms}
    md = markdown(layer_rows, verdicts, zipf, job_rows, machine, args.quick)
    _common.publish("dropless", layer_rows, settings, md, out_dir, machine,
                    extra={"verdicts": verdicts, "zipf": zipf, "main_job": job_rows,
                           "wall_s": time.perf_counter() - start})
    return 0


if __name__ == "__main__":
    sys.exit(main())
