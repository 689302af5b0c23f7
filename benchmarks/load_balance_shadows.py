"""Load balance II (issue 11): FasterMoE's shadow experts and the chunked all-to-all, measured beside issue 10.

The same two setups as `benchmarks/load_balance.py` (whose helpers this script
imports), with shadows added; one JSON + markdown in benchmarks/results/.

(b) Controlled skew, no training. The same Zipf(s) router logits (Gumbel-max
    first choices, random rank permutations, a separate calibration sample for
    the loads). For each capacity scope (per-expert, device pool, device pool +
    greedy placement of the loads that still reach the pools, shadowed experts
    counting 0, as `Trainer.rebalance` does) the R in {0, 1, 2} hottest
    calibration experts are shadowed, and also the set FasterMoE's cost model
    (`tedjax.balance.choose_shadows`) picks for the reference layer, at
    GPU-like rates (400 TFLOP/s, 100 GB/s) and at CPU-like rates. `tedjax.routing.route` gives the drops,
    with the shadow capacity `tedjax.MoE` uses: min(S, X x C). The cf needed for
    <= 1% drops is exact: a choice's position in its pool or shadow buffer does
    not depend on the capacity, so a binary search over C on one set of
    positions finds it; `route` checks it (<= 1% at C, > 1% at C - 1).
    Bytes per device of one forward + backward of the reference layer at that
    cf: the token all-to-all (4 x one direction; fixed by the capacity, shadows
    or not), plus the pools' int32 counts, plus the shadow weights' all-reduces
    (forward: gather R x D x F per weight matrix, backward: reduce their
    gradients; each all-reduce sends 2 V (X-1)/X), checked against the compiled
    layer's HLO. Targets at Zipf s = 1.0 (top-1): drops at cf 1.0 cut >= 50%
    relative; cf for <= 1% drops >= 2x lower than per-expert capacity without
    shadows; bytes <= 0.6x the baseline's at its own cf.

    Step time: a jitted `tedjax.MoE` forward + backward on 8 simulated CPU devices
    (mesh (8/X, X, 1)), shadows R = 1, 2 against none and a2a_chunks = 2 against
    1 at equal cf, and baseline vs shadows each at its own cf for <= 1% drops;
    programs alternate in one process, median of paired ratios.

(a) The README's main job (`configs/tiny.yaml`, 300 steps) with shadows alone and with device pool +
    placement (`model.shadow_experts=2`, `balance.shadow_every=10`). Both runs use static capacity, where a
    shadow is chosen by the drops it saves, if its copy costs less than keeping the same choices through the
    pools (`balance.choose_shadows_for_drops`); the rates price that copy. By default they are measured on the
    devices at start (or read from `balance.cluster`), so the runs fix CPU-like rates
    (`balance.matmul_tflops=0.05`, `balance.link_gbytes_per_s=10`) to keep the choice independent of the
    machine's load. The ids chosen are read from metrics.jsonl (`kind: "shadows"`).

    python benchmarks/load_balance_shadows.py            # full run -> benchmarks/results/
    python benchmarks/load_balance_shadows.py --quick    # smoke run -> a temp dir
    python benchmarks/load_balance_shadows.py --part skew
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

sys.path.insert(0, str(Path(__file__).resolve().parent))  # _common, load_balance
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tedjax
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

import _common  # noqa: E402
import load_balance as lb  # noqa: E402
from tedjax import analysis, balance  # noqa: E402
from tedjax import routing as routing_lib  # noqa: E402
from tedjax.config import load_config  # noqa: E402
from tedjax.mesh import make_mesh  # noqa: E402
from tedjax.moe import MoE  # noqa: E402

NAME = "load_balance_shadows"
DROP_LIMIT = lb.DROP_LIMIT
SCOPES = lb.SCOPES
CF_POINTS = lb.CF_POINTS
WEIGHT_MATRICES = 2  # the reference layer is GELU: w_in, w_out
BYTES = 4  # float32
# FasterMoE's cost model rates: the config defaults (one GPU node) and CPU-like ones (this machine's order of
# magnitude: tens of GFLOP/s on the expert matmuls, ~10 GB/s host memory copies for the simulated links).
RATES = {"GPU": (400.0, 100.0), "CPU": (0.05, 10.0)}  # (matmul TFLOP/s, link GB/s)

# (a) the main job -------------------------------------------------------------------------------
SHADOWS = ["model.shadow_experts=2", "balance.shadow_every=10",
           f"balance.matmul_tflops={RATES['CPU'][0]}", f"balance.link_gbytes_per_s={RATES['CPU'][1]}"]  # fmt: skip
VARIANTS = {"shadows": SHADOWS, "shadows + device pool + placement": SHADOWS + lb.DEVICE_POOL + ["balance.every=10"]}
QUICK_VARIANTS = ("shadows + device pool + placement",)
REFERENCE_VAL = {"baseline": 1.5690, "device pool": 1.5473}  # README / helper-5's run, if no load_balance.json


def shadow_records(log_dir: Path) -> list[dict]:
    recs = [json.loads(line) for line in (log_dir / "metrics.jsonl").read_text().splitlines()]
    keys = ("layer", "shadow_ids", "changed", "predicted_latency_s", "predicted_latency_with_shadows_s",
            "predicted_saved_fraction", "predicted_copy_s", "predicted_keep_s")
    per_layer = ((r["step"], dict(zip(keys, v))) for r in recs if r.get("kind") == "shadows"
                 for v in zip(*(r[k + "s" if k == "layer" else k] for k in keys)))  # one record per decision
    return [{"step": step, **{k: v[k] for k in keys if k != "changed"}} for step, v in per_layer if v["changed"]]


def references() -> tuple[dict, str]:
    """Baseline and device-pool rows of issue 10's run (benchmarks/results/load_balance.json) if it has them."""
    path = _common.RESULTS_DIR / "load_balance.json"
    try:
        main = json.loads(path.read_text())["main_job"]
        rows = {r["variant"]: r for r in main["rows"]}
        return {k: rows[k] for k in ("baseline", "device pool") if k in rows}, str(path.relative_to(lb.REPO))
    except (OSError, KeyError, TypeError, ValueError):
        return {k: {"variant": k, "val_loss": v} for k, v in REFERENCE_VAL.items()}, "quoted in the brief"


def main_job(args) -> dict:
    runs = []
    with tempfile.TemporaryDirectory(prefix="load_balance_shadows_runs_") as tmp:
        runs_dir = Path(args.runs_dir) if args.runs_dir else Path(tmp)
        print(f"(a) main job, {args.steps} steps, variants {args.variants}, logs in {runs_dir}", flush=True)
        for name in args.variants:
            extra = list(VARIANTS[name])
            if args.quick:
                extra = [o if not o.startswith("balance.shadow_every") else "balance.shadow_every=2" for o in extra]
                extra = [o if not o.startswith("balance.every") else "balance.every=2" for o in extra]
            r = lb.train_variant(args, name, extra, runs_dir)
            r["shadow_changes"] = shadow_records(runs_dir / name.replace(" ", "_").replace("+", "and"))
            runs.append(r)
    refs, source = references()
    rows = []
    for r in runs:
        last_ids: dict[int, list[int]] = {}
        for rec in r["shadow_changes"]:
            last_ids[rec["layer"]] = rec["shadow_ids"]
        row = {"variant": r["variant"], "val_loss": r["val_loss"], "shadow_changes": len(r["shadow_changes"]),
               "placement_changes": len(r["placement_changes"]),
               "shadow_ids_final": "; ".join(f"L{k}: {v}" for k, v in sorted(last_ids.items())) or "none chosen",
               "token_a2a_bytes_per_layer": r["a2a"]["token_sent_bytes_per_layer"]}  # fmt: skip
        for name, ref in refs.items():
            row[f"val_minus_{name.replace(' ', '_')}"] = r["val_loss"] - ref["val_loss"]
        for layer, d in enumerate(r["dropped_final"]):
            row[f"dropped_final_L{layer}"] = d
            row[f"dropped_last10_L{layer}"] = r["dropped_last10_mean"][layer]
        rows.append(row)
    return {"rows": rows, "runs": runs, "references": refs, "reference_source": source,
            "n_moe_layers": len(runs[0]["dropped_final"])}  # fmt: skip


# (b) controlled skew -----------------------------------------------------------------------------
def bucket_positions(expert_gsk: np.ndarray, placement_e: np.ndarray, per_pool: int, shadow_ids) -> tuple:
    """Position of every choice in its pool or shadow buffer, in routing's priority order `[G, S*K]`, and
    whether it is shadowed. Independent of the capacity."""
    groups, group_size, top_k = expert_gsk.shape
    num_pools = placement_e.size // per_pool
    e_gn = expert_gsk.transpose(0, 2, 1).reshape(groups, group_size * top_k)
    bucket_gn = placement_e[e_gn] // per_pool
    shadowed_gn = np.zeros(e_gn.shape, bool)
    for r, e in enumerate(shadow_ids):
        bucket_gn = np.where(e_gn == e, num_pools + r, bucket_gn)
        shadowed_gn |= e_gn == e
    onehot = bucket_gn[..., None] == np.arange(num_pools + len(shadow_ids))
    counts = np.cumsum(onehot, axis=1) - onehot
    return np.take_along_axis(counts, bucket_gn[..., None], axis=-1)[..., 0], shadowed_gn


def dropped_at(positions, shadowed, cap: int, per_pool: int, devices: int, group_size: int) -> float:
    shadow_cap = min(group_size, devices * cap)  # tedjax.MoE's shadow buffer: X devices' worth of one expert
    return float(np.mean(np.where(shadowed, positions >= shadow_cap, positions >= per_pool * cap)))


def route_dropped(logits, top_k, cf, placement, per_pool, shadow_ids, devices) -> float:
    _, group_size, num_experts = logits.shape
    cap = routing_lib.capacity(group_size, num_experts, top_k, cf, 1)
    kw = {}
    if len(shadow_ids):
        kw = {"shadow_ids": jnp.asarray(shadow_ids, jnp.int32), "shadow_capacity": min(group_size, devices * cap)}
    routed = routing_lib.route(logits, top_k=top_k, capacity_factor=cf, min_capacity=1,
                               placement=jnp.asarray(placement, jnp.int32), experts_per_pool=per_pool, **kw)
    return float(routed.dropped_fraction)


def reference_cost(num_experts: int, devices: int, rates: tuple[float, float], args) -> balance.ShadowCostModel:
    """FasterMoE's model of the reference layer (as `Trainer.shadow_cost_model` builds it for a config)."""
    data = 8 // devices
    tflops, gbytes = rates
    return balance.ShadowCostModel(
        d_model=args.d_model, expert_d_ff=args.d_ff, weight_matrices=WEIGHT_MATRICES, bytes_per_element=BYTES,
        num_devices=devices, tokens_per_step=args.layer_groups * args.group_size / data,
        flop_rate=tflops * 1e12, link_bytes_per_s=gbytes * 1e9)  # fmt: skip


def shadow_bytes(num_shadows: float, devices: int, args, all_devices: int = 8) -> float:
    """Bytes one device sends for the shadow weights in one forward + backward, per weight matrix of
    V = R x D x F x 4 bytes: forward, the all-reduce over the X devices of "expert" that gathers the copy
    (2 V (X-1)/X); backward, the all-reduce of the copy's gradients, which XLA runs over every device that
    computed shadowed tokens, "data" x "expert" (2 V (N-1)/N, N = all_devices; the HLO shows this form)."""
    v = num_shadows * args.d_model * args.d_ff * BYTES
    return WEIGHT_MATRICES * 2 * v * ((devices - 1) / devices + (all_devices - 1) / all_devices)


def skew_case(num_experts: int, devices: int, s: float, top_k: int, args) -> list[dict]:
    per_device = num_experts // devices
    group_size = args.group_size
    perms = []
    for i in range(args.perms):  # the same samples as load_balance.skew_case
        perm = np.random.default_rng(1000 + i).permutation(num_experts)
        logits = lb.skew_logits(num_experts, s, args.groups, group_size, perm, seed=2 * i)
        calib = lb.skew_logits(num_experts, s, args.groups, group_size, perm, seed=2 * i + 1)
        calib_load = np.asarray(routing_lib.route(calib, top_k=top_k, capacity_factor=1.0).expert_load)
        expert_gsk = np.asarray(routing_lib.route(logits, top_k=top_k, capacity_factor=1.0).expert_index)
        perms.append({"logits": logits, "calib_load": calib_load, "expert_gsk": expert_gsk,
                      "hottest": np.argsort(-calib_load, kind="stable")})  # fmt: skip
    choices = [(f"hottest {r}", r) for r in args.shadows] + [(f"model ({k})", k) for k in RATES]
    rows = []
    for scope in SCOPES:
        per_pool = 1 if scope == "expert" else per_device
        for label, how in choices:
            setups, predicted = [], []
            for pp in perms:
                load = pp["calib_load"]
                if isinstance(how, int):
                    ids = [int(e) for e in pp["hottest"][:how]]
                else:  # FasterMoE's choice (up to 2), made on the identity placement, as rebalance does first
                    cost = reference_cost(num_experts, devices, RATES[how], args)
                    chosen, _, _ = balance.choose_shadows(load, np.arange(num_experts), 2, cost)
                    ids = [int(e) for e in chosen if e < num_experts]
                placement = np.arange(num_experts)
                if scope == "device + placement":
                    placement = balance.greedy_placement(np.where(np.isin(np.arange(num_experts), ids), 0.0, load),
                                                         devices)
                setups.append((ids, placement))
                gpu = reference_cost(num_experts, devices, RATES["GPU"], args)
                cpu = reference_cost(num_experts, devices, RATES["CPU"], args)
                predicted.append({k: c.latency(load, placement, tuple(ids)) / c.latency(load, placement, ())
                                  for k, c in (("GPU", gpu), ("CPU", cpu))})
            pos = [bucket_positions(pp["expert_gsk"], pl, per_pool, ids) for pp, (ids, pl) in zip(perms, setups)]
            positions = np.stack([p for p, _ in pos])
            shadowed = np.stack([m for _, m in pos])


            dropped_cf = {}
            for cf in CF_POINTS:
                cap = routing_lib.capacity(group_size, num_experts, top_k, cf, 1)
                mine = [dropped_at(p, m, cap, per_pool, devices, group_size) for p, m in pos]
                if cf == CF_POINTS[0]:  # route is slow eagerly: check the positions against it at one cf
                    routed = [route_dropped(pp["logits"], top_k, cf, pl, per_pool, ids, devices)
                              for pp, (ids, pl) in zip(perms, setups)]  # fmt: skip
                    if not np.allclose(routed, mine, atol=1e-9):  # the capacity search relies on this
                        raise AssertionError(f"positions disagree with routing.route: {mine} vs {routed} "
                                             f"(E={num_experts}, X={devices}, s={s}, {scope}, {label}, cf {cf})")
                dropped_cf[cf] = float(np.mean(mine))
            lo, hi = 1, math.ceil(top_k * group_size / per_pool)  # hi: every choice fits
            while lo < hi:  # smallest C with drops <= limit (drops fall as C grows)
                mid = (lo + hi) // 2
                fits = dropped_at(positions, shadowed, mid, per_pool, devices, group_size) <= DROP_LIMIT
                lo, hi = (lo, mid) if fits else (mid + 1, hi)
            cap = lo
            cf_needed = lb.cf_for_capacity(cap, group_size, num_experts, top_k)
            at = np.mean([route_dropped(pp["logits"], top_k, cf_needed, pl, per_pool, ids, devices)
                          for pp, (ids, pl) in zip(perms, setups)])  # fmt: skip
            below = None
            if cap > 1:
                cf_below = lb.cf_for_capacity(cap - 1, group_size, num_experts, top_k)
                below = np.mean([route_dropped(pp["logits"], top_k, cf_below, pl, per_pool, ids, devices)
                                 for pp, (ids, pl) in zip(perms, setups)])  # fmt: skip
            if not (at <= DROP_LIMIT and (below is None or below > DROP_LIMIT)):
                raise AssertionError(f"capacity search wrong: C={cap} drops {at}, C-1 drops {below}")
            num_shadows = float(np.mean([len(ids) for ids, _ in setups]))
            costs = lb.layer_costs(num_experts, devices, cf_needed, "expert" if scope == "expert" else "device",
                                   "auto" if scope == "expert" else "blocks", args)
            a2a = 4 * costs["token_a2a_bytes_per_direction"] + costs["counts_a2a_bytes"]
            rows.append({
                "experts": num_experts, "devices": devices, "zipf_s": s, "top_k": top_k, "scope": scope,
                "shadows": label, "num_shadows_mean": num_shadows,
                "shadow_ids_per_perm": [ids for ids, _ in setups],
                "dropped_cf1.0": dropped_cf[1.0], "dropped_cf1.25": dropped_cf[1.25],
                "capacity_needed": cap, "cf_needed": cf_needed, "dropped_at_cf_needed": float(at),
                "dropped_one_slot_less": None if below is None else float(below),
                "a2a_bytes_fwd_bwd_at_cf_needed": a2a, "shadow_allreduce_bytes_fwd_bwd": shadow_bytes(num_shadows, devices, args),
                "predicted_latency_ratio_gpu": float(np.mean([p["GPU"] for p in predicted])),
                "predicted_latency_ratio_cpu": float(np.mean([p["CPU"] for p in predicted])),
            })  # fmt: skip
    base = next(r for r in rows if r["scope"] == "expert" and r["shadows"] == "hottest 0")
    base_bytes = base["a2a_bytes_fwd_bwd_at_cf_needed"]
    for r in rows:
        r["total_bytes"] = r["a2a_bytes_fwd_bwd_at_cf_needed"] + r["shadow_allreduce_bytes_fwd_bwd"]
        r["bytes_ratio_vs_baseline"] = r["total_bytes"] / base_bytes
        r["cf_ratio_vs_baseline"] = base["cf_needed"] / r["cf_needed"]
        same_scope = next(q for q in rows if q["scope"] == r["scope"] and q["shadows"] == "hottest 0")
        r["drop_cut_vs_no_shadows_cf1.0"] = (1 - r["dropped_cf1.0"] / same_scope["dropped_cf1.0"]
                                             if same_scope["dropped_cf1.0"] > 0 else None)
        r["drop_cut_vs_baseline_cf1.0"] = 1 - r["dropped_cf1.0"] / base["dropped_cf1.0"] if base["dropped_cf1.0"] else None
        # tokens per device at which this row's bytes would be 0.6x the baseline's (a2a scales with tokens,
        # the shadow all-reduce does not)
        tokens = args.layer_groups * args.group_size / 8
        a2a_per_token = (r["a2a_bytes_fwd_bwd_at_cf_needed"] - base_bytes * 0.6) / tokens
        r["tokens_per_device_for_0.6x"] = (r["shadow_allreduce_bytes_fwd_bwd"] / -a2a_per_token
                                           if a2a_per_token < 0 else None)
    return rows


# step time ---------------------------------------------------------------------------------------
class ShadowLayerProgram(lb.LayerProgram):
    """load_balance.LayerProgram with shadow experts (the R hottest ids set) and a2a_chunks; per-expert capacity."""

    def __init__(self, num_experts: int, devices: int, cf: float, num_shadows: int, chunks: int, args):
        self.label = f"R={num_shadows},chunks={chunks}@cf{cf:.4g}"
        self.cf, self.num_shadows, self.chunks = cf, num_shadows, chunks
        self.mesh = make_mesh(8 // devices, devices, 1)
        d, f, s = args.d_model, args.d_ff, args.group_size

        def make():
            moe = MoE(d, num_experts, f, capacity_factor=cf, min_capacity=1, group_size=s,
                      shadow_experts=num_shadows, a2a_chunks=chunks, rngs=nnx.Rngs(0))  # fmt: skip
            if num_shadows:
                moe.shadow_ids[...] = jnp.arange(num_shadows, dtype=jnp.int32)
            return moe

        self.params, self.x, self.compiled, self.compile_s = lb.compile_layer(make, self.mesh, args)
        self.a2a_bytes, self.a2a_ops, self.expert_reduce_bytes = 0.0, 0, 0.0
        for c in analysis.collectives(self.compiled, self.mesh):
            if c.trivial:
                continue
            if c.kind == "all-to-all":
                self.a2a_ops += 1
                self.a2a_bytes += c.sent_bytes
            elif c.kind in ("all-reduce", "reduce-scatter", "all-gather") and "expert" in c.axes:
                self.expert_reduce_bytes += c.sent_bytes
        self.times, self.cpu_times = [], []


def timing(num_experts: int, devices: int, own_cf: dict, args) -> list[dict]:
    specs = [(1.0, r, 1) for r in args.shadows] + [(1.0, 0, 2)]
    if own_cf:
        specs += [spec for spec in ((own_cf[0], 0, 1), (own_cf[2], 2, 1)) if spec not in specs]
    programs = {}
    for spec in specs:
        p = programs[spec] = ShadowLayerProgram(num_experts, devices, *spec, args)
        print(f"    E={num_experts} X={devices} {p.label}: compiled in {p.compile_s:.1f} s, a2a {p.a2a_bytes:.0f} B "
              f"in {p.a2a_ops} ops, all-reduce over expert {p.expert_reduce_bytes:.0f} B", flush=True)
    lb.time_programs(list(programs.values()), args.reps, args.warmup)
    rows = []
    for (cf, r, chunks), p in programs.items():
        base = programs.get((cf, 0, 1), programs[(1.0, 0, 1)])  # the shadow all-reduce does not depend on cf
        own = own_cf and (cf, r, chunks) == (own_cf[2], 2, 1) and own_cf[2] != own_cf[0]
        vs = programs[(own_cf[0], 0, 1)] if own else base
        rows.append({
            "experts": num_experts, "devices": devices, "cf": cf, "shadows": r, "a2a_chunks": chunks,
            "capacity": routing_lib.capacity(args.group_size, num_experts, 1, cf, 1),
            "compared_with": vs.label, "median_ms": _common.median(p.times) * 1e3,
            "ratio": lb.paired_ratio(p, vs) if p is not vs else None,
            "cpu_ratio": lb.paired_ratio(p, vs, cpu=True) if p is not vs else None,
            "hlo_a2a_bytes": p.a2a_bytes, "hlo_a2a_ops": p.a2a_ops,
            "hlo_expert_reduce_bytes": p.expert_reduce_bytes,
            "hlo_shadow_bytes": p.expert_reduce_bytes - base.expert_reduce_bytes,
            "formula_shadow_bytes": shadow_bytes(r, devices, args),
            "a2a_equal_to_no_shadows": math.isclose(p.a2a_bytes, base.a2a_bytes) if base.cf == cf else None,
            "formula_matches_hlo": math.isclose(p.expert_reduce_bytes - base.expert_reduce_bytes,
                                                shadow_bytes(r, devices, args), rel_tol=1e-6),
            "times_s": p.times, "cpu_times_s": p.cpu_times, "compile_s": p.compile_s,
        })  # fmt: skip
    return rows


def skew_part(args) -> dict:
    rows = []
    for num_experts, devices in args.skew_configs:
        for s in args.zipf:
            for top_k in args.top_ks:
                start = time.perf_counter()
                case = skew_case(num_experts, devices, s, top_k, args)
                rows += case
                print(f"  E={num_experts} X={devices} s={s} top-{top_k}: drops at cf 1.0 / cf for <=1% "
                      + ", ".join(f"{r['scope']}+{r['shadows']} {r['dropped_cf1.0']:.3f}/{r['cf_needed']:.3f}"
                                  for r in case) + f" ({time.perf_counter() - start:.1f} s)", flush=True)
    times = []
    for num_experts, devices in args.timing_configs:
        sel = {r["shadows"]: r["cf_needed"] for r in rows if (r["experts"], r["devices"], r["zipf_s"], r["top_k"],
                                                              r["scope"]) == (num_experts, devices, 1.0, 1, "expert")}
        own = {0: sel["hottest 0"], 2: sel["hottest 2"]} if "hottest 0" in sel and "hottest 2" in sel else {}
        times += timing(num_experts, devices, own, args)
    verdicts = {}
    for num_experts, devices in args.skew_configs:
        case = [r for r in rows if (r["experts"], r["devices"], r["zipf_s"], r["top_k"]) == (num_experts, devices, 1.0, 1)]
        for r in case:
            if r["num_shadows_mean"] == 0 or r["scope"] == "device":
                continue
            key = f"E={num_experts},X={devices} {r['scope']} + {r['shadows']}"
            cut = r["drop_cut_vs_no_shadows_cf1.0"]
            verdicts[key] = {
                "drop_cut": cut, "drop_verdict": "PASS" if cut is not None and cut >= 0.5 else "MISS",
                "cf_ratio": r["cf_ratio_vs_baseline"], "cf_verdict": "PASS" if r["cf_ratio_vs_baseline"] >= 2 else "MISS",
                "bytes_ratio": r["bytes_ratio_vs_baseline"],
                "bytes_verdict": "PASS" if r["bytes_ratio_vs_baseline"] <= 0.6 else "MISS"}  # fmt: skip
    return {"rows": rows, "timing": times, "verdicts": verdicts}


# markdown ----------------------------------------------------------------------------------------
def render(main: dict | None, skew: dict | None, settings, machine, wall_s) -> str:
    lines = [
        "# Load balance II: FasterMoE shadow experts and the chunked all-to-all",
        "",
        f"Regenerate: `{settings['command']}` (helpers from `benchmarks/load_balance.py`)",
        "",
        f"Date {machine['date']}; {machine['device_kind']} ({machine['backend']}) x{machine['device_count']}, "
        f"{machine['cpu_count']} CPUs (load average at start {machine['load_avg']}), jax {machine['jax_version']}; "
        f"wall time {wall_s:.0f} s.",
        "",
    ]
    s = settings
    if skew is not None:
        lines += [
            "## (b) Controlled skew: Zipf(s) first choices, with shadow experts",
            "",
            f"{s['groups']} groups of {s['group_size']} tokens, {s['perms']} random rank permutations (the samples of "
            "`load_balance.py`). Shadows: the R hottest experts of a calibration sample, or the set FasterMoE's cost "
            "model picks (up to 2) for the reference layer with GPU rates "
            f"{RATES['GPU']} or CPU-like rates {RATES['CPU']} (TFLOP/s, GB/s); `#sh`: shadows it picked (mean over "
            "permutations). Shadow capacity min(S, X x C). Placement (device + placement) is the greedy on the "
            "loads that still reach the pools. Bytes per device, forward + backward, of the reference layer "
            f"(D={s['d_model']}, F={s['d_ff']}, {s['layer_groups']} groups of {s['group_size']} tokens on "
            "(8/X, X, 1), f32) at the row's cf for <= 1% drops: token all-to-all (+ pool counts) + shadow all-reduces; "
            "ratio against per-expert capacity without shadows at its own cf. Pred. GPU/CPU: the model's predicted "
            "latency with the row's shadows over without (its own placement). Tokens/dev for 0.6x: tokens per "
            "device (here 1024) from which this row's bytes would be <= 0.6x the baseline's (the all-to-all grows "
            "with tokens, the weight copy does not; empty: never).",
            "",
            _common.markdown_table(skew["rows"], [
                ("E", "experts"), ("X", "devices"), ("s", "zipf_s"), ("k", "top_k"), ("scope", "scope"),
                ("shadows", "shadows"), ("#sh", "num_shadows_mean", ".2g"),
                ("dropped cf 1.0", "dropped_cf1.0", ".2%"), ("cut vs no shadows", "drop_cut_vs_no_shadows_cf1.0", ".0%"),
                ("dropped cf 1.25", "dropped_cf1.25", ".2%"), ("cf for <=1%", "cf_needed", ".3f"),
                ("x lower than baseline", "cf_ratio_vs_baseline", ".2f"),
                ("a2a MB", lambda r: r["a2a_bytes_fwd_bwd_at_cf_needed"] / 1e6, ".3f"),
                ("shadow all-reduce MB", lambda r: r["shadow_allreduce_bytes_fwd_bwd"] / 1e6, ".3f"),
                ("bytes vs baseline", "bytes_ratio_vs_baseline", ".2f"),
                ("tokens/dev for 0.6x", "tokens_per_device_for_0.6x", ".0f"),
                ("pred. GPU", "predicted_latency_ratio_gpu", ".3f"), ("pred. CPU", "predicted_latency_ratio_cpu", ".3f"),
            ]),  # fmt: skip
            "Targets (Zipf s = 1.0, top-1; baseline = per-expert capacity, no shadows):",
            "",
        ]
        for key, v in skew["verdicts"].items():
            lines.append(f"- {key}: drops at cf 1.0 cut {v['drop_cut']:.0%} vs no shadows (>= 50%) -> "
                         f"**{v['drop_verdict']}**; cf for <= 1% {v['cf_ratio']:.2f}x lower (>= 2x) -> "
                         f"**{v['cf_verdict']}**; bytes {v['bytes_ratio']:.2f}x (<= 0.6x) -> **{v['bytes_verdict']}**")
        lines += [
            "",
            "Honest model: FasterMoE's model predicts a latency change from moving hot tokens off the links and "
            "evening the busiest device's compute, paid for by copying weights; under SPMD with static shapes the "
            "all-to-all bytes are fixed by the capacity, so shadows realise nothing at equal cf except the added "
            "all-reduce, and their realised gain is fewer drops, or a lower cf (smaller buffers) for the same drops.",
            "",
        ]
        shape_args = argparse.Namespace(**{k: s[k] for k in ("group_size", "layer_groups", "d_model", "d_ff")})
        for r in skew["rows"]:
            if (r["zipf_s"], r["top_k"], r["scope"]) != (1.0, 1, "expert") or r["num_shadows_mean"] == 0:
                continue
            base = next(q for q in skew["rows"] if (q["experts"], q["devices"], q["zipf_s"], q["top_k"], q["scope"],
                                                     q["shadows"]) == (r["experts"], r["devices"], 1.0, 1, "expert",
                                                                       "hottest 0"))  # fmt: skip
            a2a_cf1 = 4 * lb.layer_costs(r["experts"], r["devices"], 1.0, "expert", "auto", shape_args)[
                "token_a2a_bytes_per_direction"]
            lines.append(
                f"- E={r['experts']},X={r['devices']}, s = 1.0, per-expert, {r['shadows']}: model predicts latency "
                f"x{r['predicted_latency_ratio_gpu']:.2f} (GPU rates) / x{r['predicted_latency_ratio_cpu']:.2f} (CPU "
                f"rates); realised: bytes at cf 1.0 x{1 + r['shadow_allreduce_bytes_fwd_bwd'] / a2a_cf1:.2f}, drops at "
                f"cf 1.0 {base['dropped_cf1.0']:.1%} -> {r['dropped_cf1.0']:.1%}, at the cf for <= 1% drops "
                f"({base['cf_needed']:.3f} -> {r['cf_needed']:.3f}) bytes x{r['bytes_ratio_vs_baseline']:.2f}")
        lines += [
            "",
            "### Step time of one MoE layer, forward + backward (8 simulated CPU devices, per-expert capacity)",
            "",
            f"Median of {s['reps']} runs, programs alternating (ABBA); ratio = median of paired ratios against the "
            "program named (wall; CPU time beside it). XLA:CPU has no asynchronous collectives, so chunks cannot "
            "overlap here: the chunks ratio is their bookkeeping cost, not the GPU gain (the HLO structure is tested "
            "in tests/test_shadows_and_chunks.py). HLO bytes: sent per device, from `tedjax.analysis`; shadow "
            "all-reduce = all-reduce bytes over the expert axis minus those of the same program without shadows, "
            "beside the formula.",
            "",
            _common.markdown_table(skew["timing"], [
                ("E", "experts"), ("X", "devices"), ("cf", "cf", ".3f"), ("C", "capacity"), ("R", "shadows"),
                ("chunks", "a2a_chunks"), ("vs", "compared_with"), ("median ms", "median_ms", ".1f"),
                ("ratio", "ratio", ".2f"), ("CPU-time ratio", "cpu_ratio", ".2f"),
                ("a2a B (HLO)", "hlo_a2a_bytes", ".0f"), ("a2a ops", "hlo_a2a_ops"),
                ("shadow all-reduce B (HLO)", "hlo_shadow_bytes", ".0f"),
                ("formula", "formula_shadow_bytes", ".0f"), ("equal", "formula_matches_hlo"),
            ]),  # fmt: skip
        ]
    if main is not None:
        n_moe = main["n_moe_layers"]
        refs = main["references"]
        cols = [("variant", "variant"), ("val loss", "val_loss", ".4f")]
        cols += [(f"vs {k}", f"val_minus_{k.replace(' ', '_')}", "+.4f") for k in refs]
        cols += [(f"dropped L{i} @{s['steps']}", f"dropped_final_L{i}", ".2%") for i in range(n_moe)]
        cols += [(f"L{i} last-10 mean", f"dropped_last10_L{i}", ".2%") for i in range(n_moe)]
        cols += [("shadow changes", "shadow_changes"), ("final shadow ids", "shadow_ids_final"),
                 ("placement changes", "placement_changes"),
                 ("token a2a B/layer", "token_a2a_bytes_per_layer", ".0f")]  # fmt: skip
        ref_text = ", ".join(f"{k} {v['val_loss']:.4f}" for k, v in refs.items())
        lines += [
            "",
            f"## (a) The main job: `configs/tiny.yaml`, {s['steps']} steps, cf 1.25, mesh (2, 2, 2), with shadows",
            "",
            f"Overrides: {' '.join(SHADOWS)} (CPU-like cost-model rates: with the GPU defaults the model picks no "
            "shadow for this model, see the module docstring); + device pool + placement: "
            f"{' '.join(lb.DEVICE_POOL)} balance.every=10. References ({main['reference_source']}): {ref_text}.",
            "",
            _common.markdown_table(main["rows"], cols),
            "References at step 300 (dropped L0 / L1): " + "; ".join(
                f"{k} {v['dropped_final_L0']:.2%} / {v['dropped_final_L1']:.2%}" for k, v in refs.items()
                if "dropped_final_L0" in v and "dropped_final_L1" in v) + ".",
            "",
        ]
        for r in main["runs"]:
            experts = load_config(str(lb.CONFIG), r["overrides"]).model.num_experts  # id E = an empty slot
            active = [c for c in r["shadow_changes"] if any(i < experts for i in c["shadow_ids"])]
            lines.append(f"- {r['variant']}: {len(active)} of the {len(r['shadow_changes'])} logged shadow changes (a change "
                         "is logged when a layer's set differs) set at least one shadow" + (f" (last at step {active[-1]['step']})" if active else ""))
        for r in main["runs"]:
            changes = r["shadow_changes"]
            if changes:
                lines.append(f"- {r['variant']}: shadow choices (step, layer, ids, predicted latency before -> after): "
                             + "; ".join(f"{c['step']}, L{c['layer']}, {c['shadow_ids']}, "
                                         f"{c['predicted_latency_s'] * 1e3:.2f} -> "
                                         f"{c['predicted_latency_with_shadows_s'] * 1e3:.2f} ms" for c in changes[:6])
                             + (f" ... ({len(changes)} changes)" if len(changes) > 6 else ""))
    return "\n".join(lines) + "\n"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--part", choices=("all", "train", "skew"), default="all")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--runs-dir", default=None, help="where the training runs log (default: a temp dir)")
    p.add_argument("--reuse-runs", action="store_true", help="reuse finished runs found in --runs-dir")
    p.add_argument("--groups", type=int, default=512)
    p.add_argument("--group-size", type=int, default=256)
    p.add_argument("--perms", type=int, default=4)
    p.add_argument("--reps", type=int, default=15)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--quick", action="store_true", help="tiny smoke run; writes to a temp dir unless --out")
    p.add_argument("--out", default=None, help="output dir (default benchmarks/results, a temp dir with --quick)")
    args = p.parse_args(argv)
    args.zipf, args.top_ks, args.shadows = (0.5, 1.0, 1.5), (1,), (0, 1, 2)
    args.skew_configs = args.timing_configs = lb.SKEW_CONFIGS
    args.d_model, args.d_ff, args.layer_groups = 128, 512, 32
    args.variants = list(VARIANTS)
    if args.quick:
        args.steps, args.variants = 6, list(QUICK_VARIANTS)
        args.groups, args.perms, args.reps, args.warmup = 16, 1, 2, 1
        args.zipf, args.skew_configs, args.timing_configs, args.shadows = (1.0,), ((8, 4),), ((8, 4),), (0, 1)
        args.d_model, args.d_ff, args.group_size, args.layer_groups = 32, 64, 64, 16
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    start = time.perf_counter()
    out_dir = _common.output_dir(NAME, args.out, args.quick)
    out_dir.mkdir(parents=True, exist_ok=True)
    machine = _common.machine_info()
    settings = {k: v for k, v in vars(args).items() if k not in ("out", "runs_dir")}
    settings["command"] = " ".join(["python", "benchmarks/load_balance_shadows.py",
                                    *(argv if argv is not None else sys.argv[1:])])  # fmt: skip
    settings["rates"] = RATES
    settings["targets"] = {"skew": "Zipf s = 1.0, top-1: drops at cf 1.0 cut >= 50% relative by R in {1, 2} shadows; "
                                   "cf for <= 1% drops >= 2x lower than per-expert capacity without shadows; "
                                   "a2a + shadow all-reduce bytes <= 0.6x the baseline's a2a bytes at its own cf",
                           "main_job": "reported"}  # fmt: skip
    print(f"{NAME}: {machine['device_kind']} x{machine['device_count']}, load {machine['load_avg']}", flush=True)
    main_result = skew = None
    if args.part in ("all", "skew"):
        print("(b) controlled skew", flush=True)
        skew = skew_part(args)
    if args.part in ("all", "train"):
        main_result = main_job(args)
    wall_s = time.perf_counter() - start
    markdown = render(main_result, skew, settings, machine, wall_s)
    rows = (skew["rows"] if skew else []) + (main_result["rows"] if main_result else [])
    _common.publish(NAME, rows, settings, markdown, out_dir, machine,
                    extra={"main_job": main_result, "skew": skew, "wall_s": wall_s})
    return 0


if __name__ == "__main__":
    sys.exit(main())
