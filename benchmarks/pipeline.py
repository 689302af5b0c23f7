"""Pipeline schedules (tedjax.pipeline): bubble, step time per token and per-device weight memory against stage = 1.

On 8 simulated CPU devices, a stack of U = 8 residual MLP units (the
pipeline's own unit of work; the schedule does not know what a unit is) is
trained one step (forward + backward, remat per stage iteration):

  bubble     for S in {2, 4}, M in {4, 8, 16}, GPipe and circular (R = 2):
             the schedule's idle fraction (stage-iterations that compute
             nothing, from tedjax.pipeline.schedule_table), the textbook
             (S-1)/(R M+S-1), and the measured one, 1 - t(stage 1) / t(stage S)
             (t: the fastest of the timed steps, wall and process CPU time; the
             8 devices share the cores, so CPU time counts all their work)
             at equal devices and tokens. Bubble iterations still compute (on
             masked inputs) in SPMD, so on CPU devices that share the cores the
             measured time carries the bubble as an accelerator's idle time does.
  memory     per-device parameter + AdamW state bytes (compiled
             memory_analysis, the update step's arguments) at stage S over
             stage 1: target 1/S within 10% (optimizer state placed as the
             parameters; with ZeRO-1 over data, reported alongside, the state
             is split over 8/S data ranks instead of 8, so it does not shrink).

    python benchmarks/pipeline.py            # full run -> benchmarks/results/pipeline.{json,md}
    python benchmarks/pipeline.py --quick    # S = 2, M = 4 (< 60 s) -> a temp dir unless --out
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
    p.add_argument("--quick", action="store_true", help="S = 2, M = 4 only, small widths (< 60 s)")
    p.add_argument("--reps", type=int, default=None, help="timed steps per case (default 5; quick 2)")
    p.add_argument("--out", type=str, default=None, help="directory for pipeline.{json,md}")
    return p.parse_args(argv)


ARGS = parse_args()
_flags.simulate_cpu_devices(ARGS.quick)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import optax  # noqa: E402

import _common  # noqa: E402
import tedjax  # noqa: E402
from tedjax import pipeline  # noqa: E402
from tedjax.mesh import named_sharding  # noqa: E402
from tedjax.optim import zero1_spec  # noqa: E402

UNITS = 8
D, F, L, MB = (32, 64, 8, 8) if ARGS.quick else (128, 512, 32, 8)  # widths; MB rows per microbatch
STAGES = (2,) if ARGS.quick else (2, 4)
MICRO = (4,) if ARGS.quick else (4, 8, 16)
REPS = ARGS.reps or (2 if ARGS.quick else 5)
CIRCULAR_REPEATS = 2


def unit(p, x_bld):
    return x_bld + jax.nn.gelu(x_bld @ p["w1"]) @ p["w2"], jnp.mean(x_bld * x_bld)


def make_params():
    k1, k2 = jax.random.split(jax.random.key(0))
    return {"w1": jax.random.normal(k1, (UNITS, D, F)) / D**0.5, "w2": jax.random.normal(k2, (UNITS, F, D)) / F**0.5}


def step_time(stages: int, repeats: int, micro: int) -> tuple[float, list[float], float, list[float]]:
    """Fastest of `REPS` wall and CPU seconds (other jobs only add) of one forward+backward step.

    M microbatches on (stage=S, data=8/S); S = 1: a plain scan over the whole batch on (data=8).
    """
    mesh = tedjax.make_mesh(8 // stages, 1, 1, stage=stages)
    params = make_params()
    x = jax.random.normal(jax.random.key(1), (micro, MB, L, D))
    policy = jax.checkpoint_policies.nothing_saveable

    def loss(p, x_mbld):
        if stages == 1:  # today's layer scan over the whole batch [M mb, L, D], remat per unit
            body = jax.checkpoint(lambda x, pu: unit(pu, x), policy=policy)
            y, _ = jax.lax.scan(body, x_mbld, p)
        else:
            y, _ = pipeline.run(unit, p, x_mbld, stages=stages, repeats=repeats, remat_policy=policy)
        return jnp.mean(y**2)

    with jax.set_mesh(mesh):
        p = jax.device_put(pipeline.to_stage_major(params, stages, repeats),
                           named_sharding(mesh, ("layers", None, None)))
        if stages == 1:
            xs = jax.device_put(x.reshape(-1, L, D), named_sharding(mesh, ("batch", None, None)))
        else:
            xs = jax.device_put(x, named_sharding(mesh, (None, "batch", None, None)))
        fn = jax.jit(jax.grad(loss))
        jax.block_until_ready(fn(p, xs))  # compile
        times, cpu = [], []
        for _ in range(REPS):
            cpu0, wall0 = time.process_time(), time.perf_counter()
            jax.block_until_ready(fn(p, xs))
            times.append(time.perf_counter() - wall0)
            cpu.append(time.process_time() - cpu0)
    return min(times), times, min(cpu), cpu


def weight_bytes(stages: int, zero1: bool) -> int:
    """Per-device bytes of the parameters + AdamW state (the arguments of a compiled update step)."""
    mesh = tedjax.make_mesh(8 // stages, 1, 1, stage=stages)
    params = jax.eval_shape(make_params)
    spec = named_sharding(mesh, ("layers", None, None)).spec
    p_sharding = jax.tree.map(lambda _: jax.sharding.NamedSharding(mesh, spec), params)
    opt = optax.adamw(1e-3)
    state = jax.eval_shape(opt.init, params)

    def state_sharding(leaf):
        if getattr(leaf, "ndim", 0) != 3:
            return jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
        s = zero1_spec(spec, leaf.shape, mesh) if zero1 else spec
        return jax.sharding.NamedSharding(mesh, s)

    def update(p, s, g):
        updates, s = opt.update(g, s, p)
        return optax.apply_updates(p, updates), s

    with jax.set_mesh(mesh):
        compiled = jax.jit(update, in_shardings=(p_sharding, jax.tree.map(state_sharding, state), p_sharding)
                           ).lower(params, state, params).compile()  # fmt: skip
    grads_bytes = sum(leaf.size * leaf.dtype.itemsize for leaf in jax.tree.leaves(params)) // stages
    return int(compiled.memory_analysis().argument_size_in_bytes) - grads_bytes


def main() -> None:
    machine = _common.machine_info()
    rows = []
    base = {}
    for micro in MICRO:
        base[micro] = step_time(1, 1, micro)
        print(f"stage 1, M={micro}: {base[micro][0] * 1e3:.1f} ms, {base[micro][2] * 1e3:.1f} ms CPU", flush=True)
    for stages in STAGES:
        for micro in MICRO:
            for schedule, repeats in (("gpipe", 1), ("circular", CIRCULAR_REPEATS)):
                t, times, c, cpu = step_time(stages, repeats, micro)
                row = {
                    "stages": stages, "microbatches": micro, "schedule": schedule, "repeats": repeats,
                    "idle_fraction": pipeline.idle_fraction(stages, micro, repeats),
                    "theory": pipeline.bubble_fraction(stages, micro, repeats, schedule),
                    "step_s": t, "times_s": times, "stage1_step_s": base[micro][0], "stage1_times_s": base[micro][1],
                    "time_per_token_vs_stage1": t / base[micro][0],
                    "measured_bubble": 1 - base[micro][0] / t,
                    "cpu_s": c, "cpu_times_s": cpu, "stage1_cpu_s": base[micro][2],
                    "stage1_cpu_times_s": base[micro][3],
                    "measured_bubble_cpu": 1 - base[micro][2] / c,
                }  # fmt: skip
                rows.append(row)
                print(f"S={stages} M={micro} {schedule}: idle {row['idle_fraction']:.3f} theory {row['theory']:.3f} "
                      f"measured {row['measured_bubble']:.3f} ({t * 1e3:.1f} ms), from CPU time "
                      f"{row['measured_bubble_cpu']:.3f}", flush=True)
    memory = []
    one = {z: weight_bytes(1, z) for z in (False, True)}
    for stages in STAGES:
        for zero1 in (False, True):
            b = weight_bytes(stages, zero1)
            ratio = b / one[zero1]
            memory.append({"stages": stages, "zero1": zero1, "bytes_per_device": b, "stage1_bytes": one[zero1],
                           "ratio": ratio, "target_ratio": 1 / stages,
                           "target": ("PASS" if abs(ratio * stages - 1) <= 0.10 else "MISS") if not zero1 else ""})

    settings = {"quick": ARGS.quick, "units": UNITS, "d_model": D, "d_ff": F, "seq_len": L, "microbatch_rows": MB,
                "reps": REPS, "circular_repeats": CIRCULAR_REPEATS, "devices": 8}  # fmt: skip
    md = [
        "# Pipeline schedules (tedjax.pipeline)", "",
        f"{UNITS} residual MLP units (d={D}, ffn={F}, L={L}, {MB} rows per microbatch), one forward+backward step "
        "with remat per stage iteration, on 8 simulated CPU devices: (stage=S, data=8/S) against (stage=1, data=8) "
        "at equal tokens. Idle = stage-iterations computing nothing, from the schedule; theory = (S-1)/(R M+S-1); "
        "measured = 1 - t(stage 1)/t(stage S), t the fastest of the timed steps, in wall and in process CPU seconds "
        "(all 8 simulated devices share the cores, so CPU time counts every device's work, bubble iterations "
        "included, and is less disturbed by other jobs); "
        f"load average {machine['load_avg']} at the start.", "",
        _common.markdown_table(rows, [("S", "stages"), ("M", "microbatches"), ("schedule", "schedule"),
                                      ("R", "repeats"), ("idle", "idle_fraction", ".3f"), ("theory", "theory", ".3f"),
                                      ("measured", "measured_bubble", ".3f"),
                                      ("measured (CPU s)", "measured_bubble_cpu", ".3f"),
                                      ("step ms", lambda r: r["step_s"] * 1e3, ".1f"),
                                      ("stage-1 ms", lambda r: r["stage1_step_s"] * 1e3, ".1f"),
                                      ("time/token vs stage 1", "time_per_token_vs_stage1", ".2f")]),
        "", "## Per-device parameter + AdamW state", "",
        _common.markdown_table(memory, [("S", "stages"), ("ZeRO-1", "zero1"), ("bytes/device", "bytes_per_device"),
                                        ("stage-1 bytes", "stage1_bytes"), ("ratio", "ratio", ".3f"),
                                        ("1/S", "target_ratio", ".3f"), ("target (1/S within 10%)", "target")]),
    ]  # fmt: skip
    _common.publish("pipeline", rows, settings, "\n".join(md), _common.output_dir("pipeline", ARGS.out, ARGS.quick),
                    machine, extra={"memory": memory})


if __name__ == "__main__":
    main()
