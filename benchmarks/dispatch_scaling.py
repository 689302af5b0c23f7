"""Does MoE forward+backward time per token stay flat as the routing group grows?

Target (issue): per-token time at group 4096 within 1.2x of group 512, for
E = 8 and E = 64, top-1, capacity_factor 1.0.

Measured on ONE device, no mesh. Input `[B, S, D]` with `group_size=S`, so each
sequence is one routing group; B * S (tokens per step) is fixed, so per-token
time is comparable across S. Two methods, same routing (`tedjax.routing.route`)
and the same expert FFN math on the same parameters:

  tedjax  `tedjax.moe.MoE`: index-based dispatch (scatter of slot ids, gathers).
  onehot  GShard-style: one-hot dispatch mask `[G, S, E, C]`,
          einsum('gsec,gsd->gecd') to dispatch, einsum('gsec,gecd->gsd') with
          the combine weights folded into the mask to combine. Cost
          2 S E C d ~ 2 S^2 cf d per group (NOTES.md section 2): quadratic.

Timed: `jax.value_and_grad(sum(out**2))` w.r.t. the layer's params and the
input, jitted once per config, warm-up excluded, median of `--reps`
repetitions. All configs are compiled first, then timed round-robin: each
round times every (E, S, method) cell once, in an order that rotates and
reverses (ABBA) from round to round, so slow load drifts of a noisy machine
hit every cell alike. Process CPU time is recorded next to wall time. Both
methods are checked to agree (output, loss and gradients) before anything is
timed.

    python benchmarks/dispatch_scaling.py            # full run -> benchmarks/results/
    python benchmarks/dispatch_scaling.py --quick    # smoke run (< 20 s) -> a temp dir
"""

from __future__ import annotations

import argparse
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
from flax import nnx  # noqa: E402

import _common  # noqa: E402
from tedjax import routing as routing_lib  # noqa: E402
from tedjax.layers import activate  # noqa: E402
from tedjax.moe import MoE  # noqa: E402

NAME = "dispatch_scaling"
METHODS = ("tedjax", "onehot")
TARGET_RATIO = 1.2


# --------------------------------------------------------------------------- baseline


def onehot_moe(model: MoE, x_bld: jax.Array) -> jax.Array:
    """GShard one-hot einsum dispatch/combine with `model`'s router and experts.

    Same routing call and the same expert FFN as `MoE.__call__`; only dispatch
    and combine differ. Returns `[B, L, D]`. Training-mode routing only (the
    train capacity factor, no jitter), which is what the benchmark times.
    """
    batch, length, d_model = x_bld.shape
    group = model.group_size or length
    x_gsd = x_bld.reshape(batch * length // group, group, d_model)
    logits_gse = jnp.einsum("gsd,de->gse", x_gsd.astype(jnp.float32), model.router[...])
    routed = routing_lib.route(
        logits_gse,
        top_k=model.top_k,
        capacity_factor=model.capacity_factor,
        min_capacity=model.min_capacity,
    )
    num_experts, cap, dt = model.num_experts, routed.capacity, model.dtype
    # Dispatch mask [G, S, E, C]: 1 where token s sits in slot c of expert e.
    expert_gske = jax.nn.one_hot(routed.expert_index, num_experts, dtype=dt)
    # A dropped choice gets slot index C, which one_hot maps to an all-zero row.
    slot_gskc = jax.nn.one_hot(jnp.where(routed.kept, routed.slot, cap), cap, dtype=dt)
    dispatch_gsec = jnp.einsum("gske,gskc->gsec", expert_gske, slot_gskc)
    combine_gsec = jnp.einsum("gske,gskc,gsk->gsec", expert_gske, slot_gskc, routed.combine_weight.astype(dt))

    buf_gecd = jnp.einsum("gsec,gsd->gecd", dispatch_gsec, x_gsd.astype(dt))
    # Expert FFN: the same math as MoE._experts.
    h_gecf = jnp.einsum("gecd,edf->gecf", buf_gecd, model.w_in[...].astype(dt))
    gate_gecf = None if model.w_gate is None else jnp.einsum("gecd,edf->gecf", buf_gecd, model.w_gate[...].astype(dt))
    out_gecd = jnp.einsum("gecf,efd->gecd", activate(h_gecf, gate_gecf), model.w_out[...].astype(dt))

    out_gsd = jnp.einsum("gsec,gecd->gsd", combine_gsec, out_gecd)
    return out_gsd.reshape(batch, length, d_model)


_STEPS: dict = {}


def make_step(model: MoE, method: str):
    """jitted (params, x) -> ((loss, out), (grad_params, grad_x)), loss = sum(out**2).

    One jitted function per (method, layer config), shared by the equivalence
    check and the timing, so equal input shapes compile once.
    """
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    key = (method, model.num_experts, model.group_size, model.w_in.shape, model.top_k,
           model.capacity_factor, model.min_capacity)
    if key not in _STEPS:

        def loss_fn(params, x):
            layer = nnx.merge(graphdef, params, rest)
            out = layer(x)[0] if method == "tedjax" else onehot_moe(layer, x)
            return jnp.sum(jnp.square(out.astype(jnp.float32))), out

        _STEPS[key] = jax.jit(jax.value_and_grad(loss_fn, argnums=(0, 1), has_aux=True))
    return _STEPS[key], params


def build(num_experts: int, group: int, args) -> tuple[MoE, jax.Array]:
    model = MoE(
        args.d_model,
        num_experts,
        args.d_ff,
        top_k=args.top_k,
        capacity_factor=args.capacity_factor,
        min_capacity=args.min_capacity,
        group_size=group,
        rngs=nnx.Rngs(0),
    )
    batch = args.tokens // group
    x = jax.random.normal(jax.random.key(1), (batch, group, args.d_model), jnp.float32)
    return model, x


def _assert_close(name, a, b, rtol, atol):
    """max |a - b| <= atol + rtol * max |b|: relative to the tensor's scale, since
    float32 sums in a different order (gather vs einsum) differ in the last bits."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    err, scale = float(np.max(np.abs(a - b))), float(np.max(np.abs(b)))
    if not err <= atol + rtol * scale:
        raise AssertionError(f"tedjax and onehot disagree on {name}: max |diff| = {err:.3g} (max |value| {scale:.3g})")


def check_equivalence(num_experts: int, group: int, args) -> dict:
    """Both methods give the same output, loss and gradients on a small case (2 groups)."""
    small = argparse.Namespace(**{**vars(args), "tokens": 2 * group})
    model, x = build(num_experts, group, small)
    results = {}
    for method in METHODS:
        step, params = make_step(model, method)
        results[method] = step(params, x)
    ((loss_a, out_a), (gp_a, gx_a)), ((loss_b, out_b), (gp_b, gx_b)) = results["tedjax"], results["onehot"]
    _assert_close("output", out_a, out_b, 1e-5, 1e-5)
    _assert_close("loss", loss_a, loss_b, 1e-5, 1e-5)
    _assert_close("grad x", gx_a, gx_b, 1e-4, 1e-5)
    for (path, ga), gb in zip(jax.tree_util.tree_leaves_with_path(gp_a), jax.tree_util.tree_leaves(gp_b)):
        _assert_close(f"grad {jax.tree_util.keystr(path)}", ga, gb, 1e-4, 1e-5)
    routed_dropped = float(
        routing_lib.route(
            jnp.einsum("gsd,de->gse", x.reshape(-1, group, args.d_model), model.router[...]),
            top_k=args.top_k,
            capacity_factor=args.capacity_factor,
            min_capacity=args.min_capacity,
        ).dropped_fraction
    )
    max_diff = float(jnp.max(jnp.abs(out_a - out_b)))
    return {"num_experts": num_experts, "group_size": group, "tokens": 2 * group,
            "max_abs_out_diff": max_diff, "dropped_fraction": routed_dropped}


# --------------------------------------------------------------------------- timing


def onehot_mask_bytes(group: int, num_experts: int, args) -> int:
    """Bytes of one f32 `[G, S, E, C]` mask over the whole step."""
    cap = routing_lib.capacity(group, num_experts, args.top_k, args.capacity_factor, args.min_capacity)
    return (args.tokens // group) * group * num_experts * cap * 4


def prepare_config(num_experts: int, group: int, args) -> dict:
    """Model, input and compiled (and warmed-up) steps of both methods for one (E, S)."""
    model, x = build(num_experts, group, args)
    cap = routing_lib.capacity(group, num_experts, args.top_k, args.capacity_factor, args.min_capacity)
    skipped = {}
    mask_gib = onehot_mask_bytes(group, num_experts, args) / 2**30
    if args.onehot_max_group and group > args.onehot_max_group:
        skipped["onehot"] = f"onehot skipped: S > --onehot-max-group {args.onehot_max_group}"
    elif mask_gib > args.onehot_max_mask_gb:
        skipped["onehot"] = f"onehot skipped: mask {mask_gib:.2f} GiB > --onehot-max-mask-gb {args.onehot_max_mask_gb}"
    methods = [m for m in METHODS if m not in skipped]

    steps, compile_s, losses = {}, {}, {}
    for method in methods:
        step, params = make_step(model, method)
        start = time.perf_counter()
        (loss, _), _ = jax.block_until_ready(step(params, x))  # compile + first run
        compile_s[method] = time.perf_counter() - start
        _common.time_fn(step, params, x, reps=0, warmup=args.warmup)  # more untimed runs
        steps[method], losses[method] = (step, params), float(loss)
    if len(losses) == 2 and not math.isclose(losses["tedjax"], losses["onehot"], rel_tol=1e-4):
        raise AssertionError(f"E={num_experts} S={group}: losses differ {losses}")
    return dict(num_experts=num_experts, group=group, cap=cap, x=x, methods=methods, skipped=skipped,
                steps=steps, compile_s=compile_s, losses=losses,
                wall={m: [] for m in methods}, cpu={m: [] for m in methods})


def time_interleaved(configs: list[dict], reps: int) -> None:
    """`reps` rounds; each round times every (config, method) once.

    The order rotates over configs and alternates the methods (ABBA) round by
    round, so drifts in machine load spread over all cells instead of biasing
    one group size or one method. Records wall and process CPU seconds.
    """
    cells = [(c, m) for c in configs for m in c["methods"]]
    for rep in range(reps):
        shift = rep % len(cells)
        order = cells[shift:] + cells[:shift]
        if rep % 2:
            order = order[::-1]
        for config, method in order:
            step, params = config["steps"][method]
            cpu0 = time.process_time()
            config["wall"][method] += _common.time_fn(step, params, config["x"], reps=1, warmup=0)
            config["cpu"][method].append(time.process_time() - cpu0)
        print(f"  round {rep + 1}/{reps} done", flush=True)


def config_rows(config: dict, args) -> list[dict]:
    rows = []
    for method in METHODS:
        row = {
            "method": method,
            "num_experts": config["num_experts"],
            "group_size": config["group"],
            "batch": args.tokens // config["group"],
            "tokens": args.tokens,
            "capacity": config["cap"],
            "onehot_mask_mib": onehot_mask_bytes(config["group"], config["num_experts"], args) / 2**20,
        }
        if method in config["skipped"]:
            row.update(status=config["skipped"][method], times_s=[], cpu_times_s=[],
                       median_ms=None, us_per_token=None, us_per_token_min=None, us_per_token_cpu=None)
        else:
            wall, cpu = config["wall"][method], config["cpu"][method]
            med = _common.median(wall)
            row.update(
                status="ok",
                compile_s=config["compile_s"][method],
                loss=config["losses"][method],
                times_s=wall,
                cpu_times_s=cpu,
                median_ms=med * 1e3,
                min_ms=min(wall) * 1e3,
                us_per_token=med / args.tokens * 1e6,
                us_per_token_min=min(wall) / args.tokens * 1e6,
                us_per_token_cpu=_common.median(cpu) / args.tokens * 1e6,
            )
        rows.append(row)
    return rows


def add_ratios(rows: list[dict], groups: list[int]) -> dict:
    """Per-token time / that at the smallest group (median wall, min wall, median CPU), and the verdicts.

    The verdict uses the median wall-clock ratio; the min and CPU-time ratios
    are there to judge how much machine noise moved it.
    """
    verdicts = {}
    base_s, last_s = groups[0], groups[-1]
    for method in METHODS:
        for num_experts in sorted({r["num_experts"] for r in rows}):
            mine = {r["group_size"]: r for r in rows if r["method"] == method and r["num_experts"] == num_experts}
            base = mine.get(base_s, {})
            for row in mine.values():
                for key, suffix in (("us_per_token", ""), ("us_per_token_min", "_min"), ("us_per_token_cpu", "_cpu")):
                    ok = base.get(key) and row.get(key)
                    row["ratio_vs_first" + suffix] = row[key] / base[key] if ok else None
                row["target"] = ""
            last = mine.get(last_s)
            if last is None or last["ratio_vs_first"] is None:
                continue
            ok = last["ratio_vs_first"] <= TARGET_RATIO
            if method == "tedjax":
                last["target"] = "PASS" if ok else "MISS"
                verdicts[f"E={num_experts}"] = {
                    "ratio": last["ratio_vs_first"],
                    "ratio_min": last["ratio_vs_first_min"],
                    "ratio_cpu": last["ratio_vs_first_cpu"],
                    "verdict": "PASS" if ok else "MISS",
                    "from_group": base_s,
                    "to_group": last_s,
                }
            else:
                last["target"] = f"({'within' if ok else 'over'} {TARGET_RATIO}x)"
    return verdicts


def render_markdown(rows, verdicts, settings, machine, checks, wall_s) -> str:
    cols = [
        ("E", "num_experts"),
        ("group S", "group_size"),
        ("B", "batch"),
        ("C", "capacity"),
        ("method", "method"),
        ("median ms/step", "median_ms", ".1f"),
        ("us/token", "us_per_token", ".3f"),
        ("ratio vs S=%d" % settings["groups"][0], "ratio_vs_first", ".2f"),
        ("min us/token", "us_per_token_min", ".3f"),
        ("ratio (min)", "ratio_vs_first_min", ".2f"),
        ("CPU us/token", "us_per_token_cpu", ".3f"),
        ("ratio (CPU)", "ratio_vs_first_cpu", ".2f"),
        (f"target <= {TARGET_RATIO}x", "target"),
        ("note", lambda r: "" if r["status"] == "ok" else r["status"]),
    ]
    order = sorted(rows, key=lambda r: (r["num_experts"], r["method"] != "tedjax", r["group_size"]))
    lines = [
        "# MoE dispatch scaling: per-token forward+backward time vs routing group size",
        "",
        f"Date {machine['date']}; {machine['device_kind']} ({machine['backend']}), "
        f"{machine['cpu_count']} CPUs, jax {machine['jax_version']}, flax {machine['flax_version']}; "
        f"{machine['platform']}.",
        "",
        f"Settings: tokens/step {settings['tokens']} (B x S), d_model {settings['d_model']}, "
        f"expert_d_ff {settings['d_ff']}, top-{settings['top_k']}, capacity_factor "
        f"{settings['capacity_factor']}, min_capacity {settings['min_capacity']}, float32, one device, "
        f"value_and_grad of sum(out**2) w.r.t. params and input, median of {settings['reps']} reps "
        f"(after compile + {settings['warmup']} warm-up runs), timed round-robin over all (E, S, method) "
        f"cells with rotating order, so load drifts hit every cell. Run wall time {wall_s:.0f} s "
        f"(load average {machine.get('load_avg')} at start, {settings.get('load_avg_end')} at end).",
        "",
        "us/token = median wall time / tokens per step; min = fastest rep; CPU = median process CPU "
        "time (all threads) / tokens, less sensitive to other processes taking the cores.",
        "",
        "tedjax = `tedjax.moe.MoE` (index dispatch); onehot = GShard one-hot einsum "
        "dispatch/combine (`[G,S,E,C]` mask) with the same routing and expert FFN.",
        "",
        _common.markdown_table(order, cols),
        "Target (tedjax): per-token time at S=%d within %.1fx of S=%d:"
        % (settings["groups"][-1], TARGET_RATIO, settings["groups"][0]),
        "",
    ]
    for key, v in verdicts.items():
        lines.append(f"- {key}: {v['ratio']:.2f}x (min {v['ratio_min']:.2f}x, CPU {v['ratio_cpu']:.2f}x) "
                     f"-> **{v['verdict']}**")
    lines += [
        "",
        "Equivalence check before timing (2 groups each, output/loss/grads allclose): "
        + "; ".join(f"E={c['num_experts']} S={c['group_size']} max|diff| {c['max_abs_out_diff']:.1e}" for c in checks),
        "",
    ]
    if settings.get("notes"):
        lines += ["Notes:", ""] + [f"- {n}" for n in settings["notes"]] + [""]
    return "\n".join(lines)


# --------------------------------------------------------------------------- main


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--groups", type=int, nargs="+", default=[512, 1024, 2048, 4096], help="routing group sizes S")
    p.add_argument("--experts", type=int, nargs="+", default=[8, 64], help="numbers of experts E")
    p.add_argument("--tokens", type=int, default=8192, help="tokens per step (B * S), fixed across S")
    p.add_argument("--d-model", type=int, default=256)
    p.add_argument("--d-ff", type=int, default=512, help="expert_d_ff")
    p.add_argument("--top-k", type=int, default=1)
    p.add_argument("--capacity-factor", type=float, default=1.0)
    p.add_argument("--min-capacity", type=int, default=4)
    p.add_argument("--reps", type=int, default=15, help="timed repetitions per method and config (median)")
    p.add_argument("--warmup", type=int, default=2, help="untimed runs after the compiling run")
    p.add_argument("--onehot-max-group", type=int, default=0, help="skip onehot above this S (0: no cap)")
    p.add_argument("--onehot-max-mask-gb", type=float, default=2.0,
                   help="skip onehot when one [G,S,E,C] f32 mask for the step exceeds this many GiB")
    p.add_argument("--note", action="append", help="a note to print under the table (repeatable)")
    p.add_argument("--quick", action="store_true", help="tiny smoke run (< 20 s); writes to a temp dir unless --out")
    p.add_argument("--out", type=str, default=None,
                   help="output dir (default benchmarks/results, or a temp dir with --quick)")
    args = p.parse_args(argv)
    if args.quick:
        # tokens = 2 groups of the smallest S: the equivalence check's shape, so it compiles once.
        args.groups, args.experts, args.tokens = [64, 128], [8], 128
        args.d_model, args.d_ff, args.reps, args.warmup = 32, 64, 2, 1
    args.groups = sorted(args.groups)
    for s in args.groups:
        if args.tokens % s:
            p.error(f"--tokens {args.tokens} must be a multiple of every group size (got {s})")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    wall_start = time.perf_counter()
    out_dir = _common.output_dir("dispatch_scaling", args.out, args.quick)
    machine = _common.machine_info()
    settings = {k: v for k, v in vars(args).items() if k != "out"}
    settings["dtype"] = "float32"
    settings["target"] = f"tedjax us/token at S={args.groups[-1]} <= {TARGET_RATIO} x at S={args.groups[0]}"
    print(f"{NAME}: {machine['device_kind']} x{machine['device_count']}, jax {machine['jax_version']}, "
          f"settings {settings}", flush=True)

    checks = []
    for num_experts in args.experts:
        checks.append(check_equivalence(num_experts, args.groups[0], args))
        print(f"  equivalence ok: E={num_experts} S={args.groups[0]} "
              f"max|diff| {checks[-1]['max_abs_out_diff']:.1e}", flush=True)

    configs = []
    for num_experts in args.experts:
        for group in args.groups:
            t0 = time.perf_counter()
            configs.append(prepare_config(num_experts, group, args))
            print(f"  compiled E={num_experts} S={group} ({time.perf_counter() - t0:.1f} s)", flush=True)
    time_interleaved(configs, args.reps)
    rows = [row for config in configs for row in config_rows(config, args)]
    del configs
    for r in rows:
        timing = f"{r['us_per_token']:.3f} us/token (median of {len(r['times_s'])})" if r["us_per_token"] else None
        print(f"  E={r['num_experts']:3d} S={r['group_size']:5d} {r['method']:7s} {timing or r['status']}", flush=True)

    verdicts = add_ratios(rows, args.groups)
    wall_s = time.perf_counter() - wall_start
    settings["load_avg_end"] = _common.load_avg()
    settings["notes"] = [r["status"] for r in rows if r["status"] != "ok"] + list(args.note or [])
    markdown = render_markdown(rows, verdicts, settings, machine, checks, wall_s)
    extra = {"verdicts": verdicts, "equivalence_checks": checks, "wall_s": wall_s}
    _common.publish(NAME, rows, settings, markdown, out_dir, machine, extra=extra)
    return 0


if __name__ == "__main__":
    sys.exit(main())
