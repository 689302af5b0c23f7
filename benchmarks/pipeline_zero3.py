"""ZeRO-3 under pipeline stages: can a stage's weight gradients be reduced once per step, weights not held?

Issue 22 item 4's question. With ZeRO-3 the units' weights are stored split
over "data" and XLA gathers them where a stage iteration uses them, so their
gradients are reduced over "data" in every one of the schedule's R M + S - 1
iterations (tedjax's Trainer; NOTES.md section 3.2). Three ways to write the
gradient of one toy pipeline (tedjax.pipeline.run, GPipe, remat per stage
iteration) of U residual GELU MLP units on (stage=S, data=8/S), each compiled
and read (tedjax.analysis.collectives over "data", memory_analysis temp):

  zero3      today: weights gathered per iteration, gradients reduced per
             iteration.
  lanes      gradient lanes (NOTES.md section 3.2): every weight gathered
             once into one copy per data rank `[N, ...]`, held for the whole
             step; each iteration's gradient stays in its lane; one reduction.
  per_iter   gathered per iteration into lanes as `zero3` does, and a
             custom_vjp sends each iteration's per-lane gradient to the
             cotangent of a lane-shaped zero input instead of reducing it:
             scan's transpose accumulates it across iterations, and one
             reduction follows the loop. Weights are not held; the
             accumulator is a whole stage's gradient per device.

All three must give the same gradients (checked: max |difference|). Result
(see the results file): one reduction per step is possible without holding
the gathered weights, but only by holding an unreduced gradient accumulator
of the same size (a whole stage's weights per device, what ZeRO-3 stores a
1/data share of), and XLA:CPU's temporaries grow past the lanes' own. So
ZeRO-3 with stages keeps its per-iteration reduction; for one reduction per
step use ZeRO-1 or ZeRO-2, whose lanes cost that memory on purpose.

    python benchmarks/pipeline_zero3.py           # -> benchmarks/results/pipeline_zero3.{json,md}
    python benchmarks/pipeline_zero3.py --quick   # smaller widths -> a temp dir unless --out
"""

from __future__ import annotations

import argparse
import collections
import sys
from pathlib import Path

HERE = Path(__file__).resolve()
sys.path.insert(0, str(HERE.parent))  # _common, _flags
import _flags  # noqa: E402  (no jax: sets XLA_FLAGS below)
sys.path.insert(0, str(HERE.parents[1]))  # tedjax


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="smaller widths")
    p.add_argument("--out", type=str, default=None, help="directory for pipeline_zero3.{json,md}")
    return p.parse_args(argv)


ARGS = parse_args()
_flags.simulate_cpu_devices(ARGS.quick)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from jax.sharding import NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

import _common  # noqa: E402
import tedjax  # noqa: E402
from tedjax import analysis, pipeline  # noqa: E402

S, DATA, M, U = 2, 4, 4, 4  # stages, data ranks (= lanes), microbatches, units
D, F, L, MB = (32, 64, 8, 8) if ARGS.quick else (64, 256, 16, 8)  # widths; MB rows per microbatch
ZERO3 = {"w1": P("stage", None, "data"), "w2": P("stage", "data", None)}  # stored split over "data"
LANES = P("stage", "data")  # [U, N, ...]: lane n on data rank n


def in_lanes(x_bld):
    """`[mb, L, D]` -> `[N, mb / N, L, D]`: lane n holds data rank n's rows."""
    return jax.lax.with_sharding_constraint(x_bld.reshape(DATA, -1, *x_bld.shape[1:]), P("data"))


def mlp_in_lanes(w1_n, w2_n, x_bld):
    """The unit with lane copies of its weights `[N, D, F]`, `[N, F, D]`: each lane's gradient stays local."""
    x_n = in_lanes(x_bld)
    y_n = jnp.einsum("nblf,nfd->nbld", jax.nn.gelu(jnp.einsum("nbld,ndf->nblf", x_n, w1_n)), w2_n)
    return (x_n + y_n).reshape(x_bld.shape)


def unit_zero3(p, x_bld):
    return x_bld + jax.nn.gelu(x_bld @ p["w1"]) @ p["w2"], jnp.zeros(())


def unit_lanes(p, x_bld):
    return mlp_in_lanes(p["w1"], p["w2"], x_bld), jnp.zeros(())


@jax.custom_vjp
def gathered_lanes(w, acc_n):
    """`w` gathered into N lane copies `[N, ...]`; its gradient goes, unreduced, to the cotangent of `acc_n`."""
    return jax.lax.with_sharding_constraint(jnp.broadcast_to(w, (DATA, *w.shape)), P("data"))


gathered_lanes.defvjp(lambda w, acc_n: (gathered_lanes(w, acc_n), None),
                      lambda _, g_n: (jnp.zeros(g_n.shape[1:], g_n.dtype), g_n))


def unit_per_iter(p, x_bld):
    return mlp_in_lanes(gathered_lanes(p["w1"], p["a1"]), gathered_lanes(p["w2"], p["a2"]), x_bld), jnp.zeros(())


def run(unit, params, x_mbld):
    y, _ = pipeline.run(unit, params, x_mbld, stages=S, remat_policy=jax.checkpoint_policies.nothing_saveable)
    return jnp.mean(y**2)


def lane_copies(a):
    return jax.lax.with_sharding_constraint(jnp.broadcast_to(a[:, None], (U, DATA, *a.shape[1:])), LANES)


def grads_zero3(w, x):
    return jax.grad(lambda w: run(unit_zero3, w, x))(w)


def grads_lanes(w, x):
    return jax.grad(lambda w: run(unit_lanes, {k: lane_copies(v) for k, v in w.items()}, x))(w)


def grads_per_iter(w, x):
    acc = {k: jax.lax.with_sharding_constraint(jnp.zeros((U, DATA, *v.shape[1:]), v.dtype), LANES)
           for k, v in w.items()}  # fmt: skip
    g_w, g_acc = jax.grad(lambda w, acc: run(unit_per_iter, {**w, "a1": acc["w1"], "a2": acc["w2"]}, x),
                          argnums=(0, 1))(w, acc)
    return {k: g_w[k] + g_acc[k].sum(1) for k in w}  # the lanes summed: the step's one reduction


VARIANTS = {"zero3": grads_zero3, "lanes": grads_lanes, "per_iter": grads_per_iter}


def main() -> None:
    machine = _common.machine_info()
    mesh = tedjax.make_mesh(DATA, 1, 1, stage=S)
    k1, k2, k3 = jax.random.split(jax.random.key(0), 3)
    weights = {"w1": jax.random.normal(k1, (U, D, F)) / D**0.5, "w2": jax.random.normal(k2, (U, F, D)) / F**0.5}
    x = jax.random.normal(k3, (M, MB, L, D))
    stage_bytes = U // S * 2 * D * F * 4  # one stage's weights, whole, float32
    rows, grads = [], {}
    with jax.set_mesh(mesh):
        w = {k: jax.device_put(v, NamedSharding(mesh, ZERO3[k])) for k, v in weights.items()}
        x = jax.device_put(x, NamedSharding(mesh, P(None, "data")))
        out = {k: NamedSharding(mesh, spec) for k, spec in ZERO3.items()}
        for name, fn in VARIANTS.items():
            compiled = jax.jit(fn, out_shardings=out).lower(w, x).compile()
            grads[name] = compiled(w, x)
            found = collections.defaultdict(lambda: [0, 0])
            for c in analysis.collectives(compiled, mesh):
                if not c.trivial and "data" in c.axes:
                    n = c.trip_count or 1
                    key = f"{c.kind} {'in loop' if c.in_loop else 'once'}"
                    found[key][0] += n
                    found[key][1] += c.result_bytes * n
            reduce_bytes = sum(b for k, (_, b) in found.items() if k.startswith(("all-reduce", "reduce-scatter")))
            gather_bytes = sum(b for k, (_, b) in found.items() if k.startswith("all-gather"))
            rows.append({
                "variant": name, "temp_bytes": int(compiled.memory_analysis().temp_size_in_bytes),
                "reduce_ops": sum(n for k, (n, _) in found.items() if k.startswith(("all-reduce", "reduce-scatter"))),
                "reduce_bytes": reduce_bytes, "reductions_in_loop": any(
                    k.startswith(("all-reduce", "reduce-scatter")) and k.endswith("in loop") for k in found),
                "gather_bytes": gather_bytes, "collectives": {k: {"ops": n, "bytes": b} for k, (n, b) in found.items()},
                "reduce_bytes_over_stage_weights": reduce_bytes / stage_bytes,
                "gather_bytes_over_stage_weights": gather_bytes / stage_bytes,
            })  # fmt: skip
    for row in rows:
        row["max_grad_diff_vs_zero3"] = max(float(jnp.max(jnp.abs(grads[row["variant"]][k] - grads["zero3"][k])))
                                            for k in weights)  # fmt: skip
        row["temp_over_zero3"] = row["temp_bytes"] / rows[0]["temp_bytes"]
        print(f"{row['variant']}: temp {row['temp_bytes']} B, reductions {row['reduce_ops']} ops "
              f"{row['reduce_bytes']} B, gathers {row['gather_bytes']} B, max |grad - zero3| "
              f"{row['max_grad_diff_vs_zero3']:.2e}", flush=True)
    settings = {"quick": ARGS.quick, "stages": S, "data": DATA, "microbatches": M, "units": U, "d_model": D, "d_ff": F,
                "seq_len": L, "microbatch_rows": MB, "iterations": M + S - 1, "stage_weight_bytes": stage_bytes,
                "zero3_shard_bytes": stage_bytes // DATA, "devices": 8}  # fmt: skip
    md = [
        "# ZeRO-3 under pipeline stages: where the units' gradients are reduced", "",
        f"{U} residual GELU MLP units (d={D}, ffn={F}, L={L}, {MB} rows per microbatch), GPipe over S={S} stages, "
        f"M={M} microbatches ({M + S - 1} iterations), remat per stage iteration, weights stored ZeRO-3 style "
        f"(split over data={DATA}), on 8 simulated CPU devices; one stage's weights are {stage_bytes} B per device "
        f"whole, {stage_bytes // DATA} B as a ZeRO-3 shard. Bytes: per device per step over \"data\" (XLA:CPU "
        "all-reduces where a GPU would reduce-scatter); temp: compiled memory_analysis.", "",
        _common.markdown_table(rows, [("variant", "variant"), ("temp B", "temp_bytes"),
                                      ("temp / zero3", "temp_over_zero3", ".2f"),
                                      ("reductions", "reduce_ops"), ("reduced B", "reduce_bytes"),
                                      ("reduced / stage weights", "reduce_bytes_over_stage_weights", ".2f"),
                                      ("gathered / stage weights", "gather_bytes_over_stage_weights", ".2f"),
                                      ("max abs grad diff", "max_grad_diff_vs_zero3", ".1e")]),
        "", "zero3: today's per-iteration reductions. lanes: one reduction, every weight held gathered the whole "
        "step. per_iter: one reduction with the weights gathered per iteration, at the cost of an unreduced "
        "accumulator of a whole stage's gradient per device (the same bytes as the gathered weights).",
        "", _common.cpu_line(machine),
    ]  # fmt: skip
    _common.publish("pipeline_zero3", rows, settings, "\n".join(md),
                    _common.output_dir("pipeline_zero3", ARGS.out, ARGS.quick), machine)


if __name__ == "__main__":
    main()
