"""Where one MoE layer's training step goes: a per-op profile of top-1 and top-2.

One `tedjax.MoE` layer (E=8, D=256, F=1024 GELU experts, 8 routing groups of
1024 tokens, the shapes of `benchmarks/peer_deepspeed.py`), forward + backward
of mean(y^2) + 0.01 aux_loss, compiled once per case on the mesh given by
`--layout` (default (1,8,1): 8 simulated CPU devices, or the lent GPUs).

For each case it records
- wall time and process CPU time per step (median), minor page faults per step;
- XLA's cost analysis (FLOPs, bytes) and `memory_analysis()` temporaries;
- a `jax.profiler` trace of a few steps, each op's time summed over devices and
  put in a category by what the op is: collectives by opcode (all-to-all,
  all-reduce, ...), everything else by the `jax.named_scope` it was traced in
  (`moe_route`, `moe_dispatch`, `moe_experts`, `moe_combine`, set in
  tedjax/moe.py, forward and backward alike).

The verdict: top-2 cf 1.25 step time over top-1 cf 1.0 (issue 15: <= 2.7x; the
FLOP ratio is 2.5). On a shared CPU the op times in a trace include time spent
waiting for a core, so the categories are shares, not absolute costs; the CPU
time column is what other processes move least.

    python benchmarks/moe_profile.py            # -> benchmarks/results/moe_profile.{json,md}
    python benchmarks/moe_profile.py --quick    # small shapes, one trace step -> a temp dir
    python benchmarks/moe_profile.py --default-malloc   # without tedjax.host.reuse_freed_host_memory
"""

from __future__ import annotations

import argparse
import collections
import gzip
import json
import os
import re
import resource
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # _common
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tedjax
# per-op trace events from XLA:CPU (GPU kernels are traced without it)
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_cpu_enable_xprof_traceme=true").strip()
if "xla_force_host_platform_device_count" not in os.environ["XLA_FLAGS"]:
    os.environ["XLA_FLAGS"] += " --xla_force_host_platform_device_count=8"
if "--default-malloc" in sys.argv:  # read by _common, which otherwise applies the setting on import
    os.environ["TEDJAX_BENCH_DEFAULT_MALLOC"] = "1"

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from flax import nnx  # noqa: E402

import _common  # noqa: E402
import tedjax  # noqa: E402

COLLECTIVES = ("all-to-all", "all-reduce", "all-gather", "reduce-scatter", "collective-permute")
SCOPES = ("moe_route", "moe_dispatch", "moe_experts", "moe_shadows", "moe_combine")
TARGET_TOP2_OVER_TOP1 = 2.7
CASES = ((1, 1.0), (2, 1.25))


def build_step(top_k: int, capacity_factor: float, args: argparse.Namespace, mesh):
    """The compiled forward + backward of one layer and its arguments."""
    layer = tedjax.MoE(args.d_model, args.experts, args.d_ff, top_k=top_k, capacity_factor=capacity_factor,
                       min_capacity=4, activation="gelu", rngs=nnx.Rngs(0))
    graph, params, rest = nnx.split(layer, nnx.Param, ...)

    def loss_fn(params, x_bld):
        y_bld, stats = nnx.merge(graph, params, rest)(x_bld)
        return jnp.mean(jnp.square(y_bld)) + 0.01 * stats.aux_loss

    with tedjax.use_mesh(mesh):
        params = tedjax.shard(params, mesh)
        x_bld = jax.random.normal(jax.random.key(1), (args.groups, args.tokens, args.d_model))
        x_bld = jax.device_put(x_bld, tedjax.named_sharding(mesh, ("batch", None, None)))
        compiled = jax.jit(jax.value_and_grad(loss_fn, argnums=(0, 1))).lower(params, x_bld).compile()
    return compiled, (params, x_bld)


def op_categories(hlo_text: str) -> dict[str, str]:
    """HLO instruction name -> category: collectives by opcode, the rest by the named scope in their
    metadata or, for fusions, in their fused computation's. XLA drops the metadata of some dots; those
    are "matmul, no scope" (in this one-layer program, the experts' weight gradients)."""
    computation, scopes_in, has_dot, lines = None, collections.defaultdict(set), set(), []
    for line in hlo_text.splitlines():
        header = re.match(r"(?:ENTRY )?%?([\w.\-]+) \(.*\) -> .* \{$", line)
        if header:
            computation = header.group(1)
            continue
        match = re.match(r"\s*(?:ROOT )?%?([\w.\-]+) = .*?\b([a-z][\w\-]*)\(", line)
        if not match:
            continue
        op_name = re.search(r'op_name="([^"]*)"', line)
        scopes_in[computation].update(s for s in SCOPES if op_name and s in op_name.group(1))
        if match.group(2) in ("dot", "convolution") or "ynn_fusion" in match.group(1):
            has_dot.add(computation)
        called = re.search(r"calls=%?([\w.\-]+)", line)
        lines.append((match.group(1), match.group(2), op_name and op_name.group(1), called and called.group(1)))
    categories = {}
    for name, opcode, op_name, called in lines:
        collective = next((c for c in COLLECTIVES if opcode.startswith(c)), None)
        scopes = [s for s in SCOPES if op_name and s in op_name] or sorted(scopes_in.get(called, ()))
        if collective:
            categories[name] = collective
        elif scopes:
            categories[name] = scopes[0]
        elif opcode in ("dot", "convolution") or called in has_dot:
            categories[name] = "matmul, no scope"
        else:
            categories[name] = "other"
    return categories


def trace_op_times(compiled, call_args, steps: int) -> tuple[dict[str, float], dict[str, float]]:
    """Seconds per step in each category, and in each of the 12 costliest ops (summed over devices)."""
    categories = op_categories(compiled.as_text())
    with tempfile.TemporaryDirectory() as trace_dir:
        with jax.profiler.trace(trace_dir, create_perfetto_trace=True):
            for _ in range(steps):
                jax.block_until_ready(compiled(*call_args))
        trace_file = next(Path(trace_dir).rglob("*.trace.json.gz"))
        events = json.load(gzip.open(trace_file))["traceEvents"]
    per_op = collections.Counter()
    for event in events:
        if event.get("ph") != "X":
            continue
        name = event["name"]
        if name not in categories:
            name = (event.get("args") or {}).get("hlo_op", name)  # GPU kernels name their HLO op here
        if name in categories:
            per_op[name] += event.get("dur", 0) * 1e-6 / steps
    per_category = collections.Counter()
    for name, seconds in per_op.items():
        per_category[categories[name]] += seconds
    return dict(per_category), dict(per_op.most_common(12))


def measure(compiled, call_args, args: argparse.Namespace) -> dict:
    for _ in range(args.warmup):
        jax.block_until_ready(compiled(*call_args))
    walls, cpus = [], []
    faults_before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(args.steps):
        cpu, start = time.process_time(), time.perf_counter()
        jax.block_until_ready(compiled(*call_args))
        walls.append(time.perf_counter() - start)
        cpus.append(time.process_time() - cpu)
    faults = (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults_before) / args.steps
    cost = _common.xla_cost(compiled)
    memory = compiled.memory_analysis()
    per_category, top_ops = trace_op_times(compiled, call_args, args.trace_steps)
    return {
        "wall_s": _common.median(walls), "cpu_s": _common.median(cpus), "page_faults_per_step": faults,
        "flops": float(cost.get("flops", 0.0)), "bytes_accessed": float(cost.get("bytes accessed", 0.0)),
        "temp_bytes": int(memory.temp_size_in_bytes) if memory is not None else None,
        "op_seconds": per_category, "top_ops": top_ops, "walls": walls, "cpus": cpus,
    }


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small shapes and few steps (CI smoke run)")
    parser.add_argument("--layout", default="1,8,1", help="mesh (data,expert,tensor), default 1,8,1")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--trace-steps", type=int, default=3)
    parser.add_argument("--default-malloc", action="store_true",
                        help="keep glibc's default (no tedjax.host.reuse_freed_host_memory): the 'before' figure")
    parser.add_argument("--out", default=None, help="output folder (default benchmarks/results, a temp dir for --quick)")
    args = parser.parse_args(argv)
    args.experts, args.d_model, args.d_ff, args.tokens, args.groups = 8, 256, 1024, 1024, 8
    if args.quick:
        args.d_model, args.d_ff, args.tokens = 64, 256, 256
        args.steps, args.warmup, args.trace_steps = 2, 1, 1
    args.layout = tuple(int(v) for v in args.layout.split(","))
    if len(args.layout) != 3:
        parser.error(f"--layout takes data,expert,tensor (three integers), got {args.layout}")
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    mesh = tedjax.make_mesh(*args.layout)
    rows, measured = [], {}
    for top_k, capacity_factor in CASES:
        compiled, call_args = build_step(top_k, capacity_factor, args, mesh)
        result = measure(compiled, call_args, args)
        measured[top_k] = result
        total_ops = sum(result["op_seconds"].values()) or 1.0
        rows.append({
            "case": f"top-{top_k}, cf {capacity_factor}",
            "wall_ms": result["wall_s"] * 1e3, "cpu_ms": result["cpu_s"] * 1e3,
            "page_faults": result["page_faults_per_step"], "gflop": result["flops"] / 1e9,
            "temp_mb": (result["temp_bytes"] or 0) / 2**20,
            **{f"share_{name}": result["op_seconds"].get(name, 0.0) / total_ops
               for name in (*SCOPES, *COLLECTIVES, "matmul, no scope", "other")},
        })
    # the expert FFN's products alone (R = one device's rows at top-1 cf 1.0 on (1,8,1)): the step's ceiling rate
    roof = _common.matmul_roof(_common.expert_matmul_shapes(args.groups * args.tokens // args.experts, args.d_model,
                                                            args.d_ff), reps=3 if args.quick else 20)
    for row, top_k in zip(rows, measured):
        total_gflop = measured[top_k]["flops"] * jax.device_count() / 1e9
        row["gflop_per_cpu_s"] = total_gflop / measured[top_k]["cpu_s"]
        row["of_matmul_roof"] = row["gflop_per_cpu_s"] / roof["harmonic_mean"]
        row["floor_cpu_ms"] = total_gflop / roof["harmonic_mean"] * 1e3
    wall_ratio = measured[2]["wall_s"] / measured[1]["wall_s"]
    cpu_ratio = measured[2]["cpu_s"] / measured[1]["cpu_s"]
    flop_ratio = measured[2]["flops"] / measured[1]["flops"] if measured[1]["flops"] else float("nan")
    category_ratio = {name: measured[2]["op_seconds"].get(name, 0.0) / measured[1]["op_seconds"][name]
                      for name in measured[1]["op_seconds"] if measured[1]["op_seconds"][name] > 0}
    verdict = "PASS" if wall_ratio <= TARGET_TOP2_OVER_TOP1 else "MISS"
    allocator = "tedjax.host.reuse_freed_host_memory" if _common.HOST_MEMORY_REUSED else "glibc default"
    print(f"MoE layer profile on {jax.device_count()} {jax.devices()[0].platform} device(s), mesh {args.layout}, "
          f"allocator: {allocator}")
    for row in rows:
        shares = ", ".join(f"{k[6:]} {v:.0%}" for k, v in row.items() if k.startswith("share_") and v >= 0.005)
        print(f"  {row['case']}: {row['wall_ms']:.1f} ms wall, {row['cpu_ms']:.1f} ms CPU, "
              f"{row['page_faults']:.0f} page faults, {row['gflop']:.2f} GFLOP, temps {row['temp_mb']:.1f} MiB; "
              f"op time: {shares}")
    print(f"top-2 / top-1: wall {wall_ratio:.2f}x, CPU {cpu_ratio:.2f}x, FLOPs {flop_ratio:.2f}x "
          f"(target <= {TARGET_TOP2_OVER_TOP1}x wall): {verdict}")
    print("  per category: " + ", ".join(f"{k} {v:.2f}x" for k, v in sorted(category_ratio.items())))
    print("  bare matmuls of the expert shapes, GFLOP per CPU-second: "
          + ", ".join(f"{k} {v:.1f}" for k, v in roof.items()))
    for row in rows:
        print(f"  {row['case']}: {row['gflop_per_cpu_s']:.1f} GFLOP per CPU-second, {row['of_matmul_roof']:.0%} "
              f"of the bare matmuls'; floor at that rate {row['floor_cpu_ms']:.0f} ms of CPU per step")
    settings = {"layout": args.layout, "experts": args.experts, "d_model": args.d_model, "d_ff": args.d_ff,
                "tokens_per_group": args.tokens, "groups": args.groups, "steps": args.steps,
                "trace_steps": args.trace_steps, "allocator": allocator, "quick": args.quick}
    extra = {"top2_over_top1": {"wall": wall_ratio, "cpu": cpu_ratio, "flops": flop_ratio, "verdict": verdict,
                                "per_category": category_ratio},
             "top_ops": {k: measured[k]["top_ops"] for k in measured}, "matmul_roof": roof}
    name = "moe_profile" + ("_default_malloc" if args.default_malloc else "")
    columns = ["case", ("wall ms", "wall_ms", ".1f"), ("CPU ms", "cpu_ms", ".1f"),
               ("page faults", "page_faults", ".0f"), ("GFLOP", "gflop", ".2f"), ("temps MiB", "temp_mb", ".1f"),
               *((n, f"share_{n}", ".0%") for n in (*SCOPES, "all-to-all", "all-reduce", "matmul, no scope",
                                                    "other"))]
    markdown = "\n".join([
        "# MoE layer profile: top-1 cf 1.0 and top-2 cf 1.25", "",
        f"`python benchmarks/moe_profile.py{' --default-malloc' if args.default_malloc else ''}` on "
        f"{jax.device_count()} {jax.devices()[0].platform} device(s), mesh (data, expert, tensor) = {args.layout}, "
        f"E={args.experts}, D={args.d_model}, F={args.d_ff} GELU, {args.groups} groups of {args.tokens} tokens; "
        f"forward + backward; allocator: {allocator}. Shares are trace time per op category, summed over devices.",
        "", _common.markdown_table(rows, columns), "",
        f"top-2 / top-1: wall {wall_ratio:.2f}x, CPU {cpu_ratio:.2f}x, FLOPs {flop_ratio:.2f}x: **{verdict}** "
        f"(target <= {TARGET_TOP2_OVER_TOP1}x wall). Per category: "
        + ", ".join(f"{k} {v:.2f}x" for k, v in sorted(category_ratio.items())) + ".",
        "",
        "Against the CPU's matmul throughput: the expert FFN's three products alone, jitted on one device "
        "(forward, input and weight gradient; `_common.matmul_roof`), run at "
        + ", ".join(f"{k}: {v:.1f}" for k, v in roof.items() if k != "harmonic_mean")
        + f" GFLOP per CPU-second (FLOP-weighted harmonic mean {roof['harmonic_mean']:.1f}). "
        + " ".join(f"{row['case']}: {row['gflop_per_cpu_s']:.1f} GFLOP per CPU-second, "
                   f"{row['of_matmul_roof']:.0%} of that; a step of its FLOPs made only of such matmuls would "
                   f"take {row['floor_cpu_ms']:.0f} ms of CPU." for row in rows),
    ])
    _common.save_results(name, rows, settings, markdown, out_dir=_common.output_dir(name, args.out, args.quick),
                         extra=extra)
    return {"rows": rows, **extra}


if __name__ == "__main__":
    main()
