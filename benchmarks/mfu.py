"""Tokens/s and MFU of single-GPU training configs, bf16 (GPU only).

Issue 5, `mfu`: tokens per second and model FLOPs utilisation of the GPU
configs that fit one H100. Candidates are the shipped `configs/gpu_*.yaml`
(their mesh set to one device) and the single-GPU configs built below, each
with its FLOP-matched dense twin. A candidate is measured only where it fits:
its compiled step's memory (XLA memory analysis: arguments + temporaries)
must fit the device; otherwise the row says how much it needs.

Measured: `Trainer.train_step` on synthetic tokens, compiled ahead of time,
`--warmup` untimed steps, then the median of `--reps` timed steps.
tokens/s = tokens per step / median step time; MFU = ModelConfig.flops_per_token
(6 x active matmul parameters + causal attention) x tokens/s / the device's
dense bf16 peak (`tedjax.logs.PEAK_TFLOPS`).

Without a GPU nothing is measured: the script prints a SKIP line (and, with
--quick, runs the same measuring code once on a tiny model on one CPU device,
labelled a smoke run; no MFU is computed for it). No numbers are made up.

    python benchmarks/mfu.py            # on a GPU machine -> benchmarks/results/mfu.{json,md}
    python benchmarks/mfu.py --quick    # smoke run -> a temp dir
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # _common
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tedjax
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

import jax  # noqa: E402

import _common  # noqa: E402
from tedjax import data as data_lib  # noqa: E402
from tedjax.config import (  # noqa: E402
    CheckpointConfig,
    DataConfig,
    LogConfig,
    MeshConfig,
    ModelConfig,
    OptimizerConfig,
    TrainConfig,
    load_config,
)
from tedjax.config import resolve_dtype  # noqa: E402
from tedjax.logs import detect_peak_tflops  # noqa: E402
from tedjax.mesh import make_mesh  # noqa: E402
from tedjax.trainer import Trainer  # noqa: E402

NAME = "mfu"
REPO = Path(__file__).resolve().parents[1]
GIB = 2**30


def _gpt(d_model: int, n_layers: int, n_heads: int, experts: int, **changes) -> ModelConfig:
    base = dict(vocab_size=50304, d_model=d_model, n_layers=n_layers, n_heads=n_heads, d_ff=4 * d_model,
                max_len=2048, num_experts=experts, expert_d_ff=4 * d_model, top_k=1, capacity_factor=1.0,
                eval_capacity_factor=1.0, moe_every=2, dtype="bfloat16", remat="cac")  # fmt: skip
    return ModelConfig(**{**base, **changes})


# name -> (model, sequences per step, seq_len): single-GPU configs built here.
BUILT_IN = {
    "moe_125m_e8_top1": (_gpt(768, 12, 12, 8), 16, 2048),
    "moe_125m_e8_top2": (_gpt(768, 12, 12, 8, top_k=2, capacity_factor=1.25), 16, 2048),
    "moe_350m_e16_top1": (_gpt(1024, 24, 16, 16), 8, 2048),
}


@dataclasses.dataclass
class Candidate:
    name: str
    source: str
    config: TrainConfig

    @property
    def tokens_per_step(self) -> int:
        return self.config.data.batch_size * self.config.data.seq_len


def _train_config(model: ModelConfig, batch: int, seq: int, grad_accum: int = 1, tile_size: int = 0) -> TrainConfig:
    return TrainConfig(
        steps=1000, model=model, mesh=MeshConfig(1, 1, 1),
        optimizer=OptimizerConfig(warmup_steps=10, tile_size=tile_size),
        data=DataConfig(source="synthetic", seq_len=seq, batch_size=batch, grad_accum=grad_accum),
        checkpoint=CheckpointConfig(every=0), log=LogConfig(progress=False, tensorboard=False),
    )  # fmt: skip


def candidates(args) -> list[Candidate]:
    out = []
    for path in sorted((REPO / "configs").glob("gpu_*.yaml")):
        shipped = load_config(str(path))
        d = shipped.data
        # One device: one micro-batch of the shipped size per step (the global batch needs the whole node).
        config = _train_config(shipped.model, d.micro_batch_size, d.seq_len, tile_size=shipped.optimizer.tile_size)
        out.append(Candidate(path.stem, str(path.relative_to(REPO)), config))
    for name, (model, batch, seq) in BUILT_IN.items():
        out.append(Candidate(name, "built in (benchmarks/mfu.py)", _train_config(model, batch, seq)))
    result = []
    for c in out:
        result.append(c)
        if c.config.model.num_experts:
            twin = dataclasses.replace(c.config, model=c.config.model.dense_twin())
            result.append(Candidate(c.name + "_dense_twin", c.source + ", dense_twin()", twin))
    return result


H100_GIB = 78.0  # usable memory of one H100 80GB, for the plan printed where no GPU is present


def _memory_gib(device) -> float:
    stats = device.memory_stats() if hasattr(device, "memory_stats") else None
    return (stats or {}).get("bytes_limit", 80e9) / GIB


def state_gib(model: ModelConfig) -> float:
    """float32 parameters, gradients and two Adam moments: 16 bytes per parameter."""
    return 16 * model.param_counts()["total"] / GIB


def measure(candidate: Candidate, device, reps: int, warmup: int) -> dict:
    """Compile on one device, check it fits, then time `reps` steps (median)."""
    config = candidate.config
    row = {"status": "ok"}
    mesh = make_mesh(1, 1, 1, devices=[device])
    trainer = Trainer(config, mesh)
    state = trainer.abstract_state()
    t0 = time.perf_counter()
    compiled = trainer.lower_train_step(state).compile()
    row["compile_s"] = time.perf_counter() - t0
    try:
        mem = compiled.memory_analysis()
        need = mem.argument_size_in_bytes + mem.output_size_in_bytes + mem.temp_size_in_bytes - mem.alias_size_in_bytes
        row["compiled_gib"] = need / GIB
    except Exception:  # memory analysis is best effort
        need = None
    limit = (device.memory_stats() or {}).get("bytes_limit") if hasattr(device, "memory_stats") else None
    if limit and need and need > limit:
        row["status"] = f"does not fit: compiled step needs {need / GIB:.1f} GiB of {limit / GIB:.1f} GiB"
        return row
    d = config.data
    local = next(data_lib.synthetic_batches(config.model.vocab_size, d.batch_size, d.seq_len, seed=0))
    with jax.set_mesh(mesh):
        state = trainer.init_state()
        batch = trainer.shard_batch(local)
        times = []
        for i in range(warmup + reps):
            start = time.perf_counter()
            state, metrics = compiled(state, batch)
            jax.block_until_ready(state)
            if i >= warmup:
                times.append(time.perf_counter() - start)
    step_s = _common.median(times)
    tokens_per_s = candidate.tokens_per_step / step_s
    flops_per_token = config.model.flops_per_token(d.seq_len)
    peak = detect_peak_tflops(device, resolve_dtype(config.model.dtype))  # none for float32 (no bf16 peak)
    row.update(
        step_ms=step_s * 1e3,
        times_s=times,
        tokens_per_s=tokens_per_s,
        tflops=flops_per_token * tokens_per_s / 1e12,
        mfu=flops_per_token * tokens_per_s / (peak * 1e12) if peak else None,
        peak_tflops=peak,
        loss=float(metrics["loss"]),
    )
    return row


def describe(c: Candidate) -> dict:
    m, d = c.config.model, c.config.data
    counts = m.param_counts()
    return {
        "config": c.name,
        "source": c.source,
        "d_model": m.d_model,
        "n_layers": m.n_layers,
        "experts": m.num_experts,
        "top_k": m.top_k,
        "params_total_m": counts["total"] / 1e6,
        "params_active_m": counts["active"] / 1e6,
        "batch": d.batch_size,
        "seq_len": d.seq_len,
        "tokens_per_step": c.tokens_per_step,
        "gflop_per_token": m.flops_per_token(d.seq_len) / 1e9,
        "state_gib": state_gib(m),
        "remat": m.remat,
        "dtype": m.dtype,
    }


def render_markdown(rows, settings, machine, wall_s, skip_line) -> str:
    cols = [
        ("config", "config"), ("source", "source"),
        ("params (M) total / active", lambda r: f"{r['params_total_m']:.0f} / {r['params_active_m']:.0f}"),
        ("tokens/step", "tokens_per_step"), ("param+grad+Adam GiB", "state_gib", ".1f"),
        ("compiled GiB", "compiled_gib", ".1f"), ("step ms", "step_ms", ".1f"), ("tokens/s", "tokens_per_s", ".0f"),
        ("TFLOP/s", "tflops", ".1f"), ("MFU", lambda r: "" if r.get("mfu") is None else f"{100 * r['mfu']:.1f}%"),
        ("step time / dense twin", "ratio_vs_dense_twin", ".3f"),
        ("status", "status"),
    ]  # fmt: skip
    lines = [
        "# Tokens/s and MFU on one GPU (bf16)",
        "",
        f"Regenerate: `{settings['command']}` (on a machine with a GPU)",
        "",
        f"Date {machine['date']}; {machine['device_kind']} ({machine['backend']}) x{machine['device_count']}, "
        f"jax {machine['jax_version']}; run wall time {wall_s:.0f} s.",
        "",
        "Each config on a one-device mesh, `Trainer.train_step` (AdamW, remat as configured) on synthetic "
        f"tokens; median of {settings['reps']} steps after {settings['warmup']} warm-up steps. "
        "MFU = flops_per_token (6 x active matmul params + causal attention) x tokens/s / dense bf16 peak. "
        "Shipped `configs/gpu_*.yaml` are sized for a node: here one micro-batch per step. A config whose "
        "float32 parameters, gradients and Adam moments (16 bytes per parameter) exceed the GPU's memory "
        "(78 GiB, an H100, where no GPU is present) is not compiled.",
        "",
    ]
    if skip_line:
        lines += [f"**{skip_line}**", ""]
    lines += [_common.markdown_table(rows, cols)]
    return "\n".join(lines) + "\n"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--reps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--only", nargs="+", help="measure only configs whose name contains one of these strings")
    p.add_argument("--quick", action="store_true", help="smoke run; writes to a temp dir unless --out")
    p.add_argument("--out", default=None, help="output dir (default benchmarks/results, a temp dir with --quick)")
    args = p.parse_args(argv)
    if args.quick:  # on a GPU: the smallest built-in pair only
        args.reps, args.warmup, args.only = 2, 1, args.only or ["moe_125m_e8_top1"]
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    start = time.perf_counter()
    out_dir = _common.output_dir("mfu", args.out, args.quick)
    machine = _common.machine_info()
    settings = {k: v for k, v in vars(args).items() if k != "out"}
    settings["command"] = " ".join(["python", "benchmarks/mfu.py", *(argv if argv is not None else sys.argv[1:])])
    print(f"{NAME}: {machine['device_kind']} x{machine['device_count']} ({machine['backend']})", flush=True)
    gpus = [d for d in jax.devices() if d.platform == "gpu"]
    rows, skip_line = [], None
    for c in candidates(args):
        row = describe(c)
        limit_gib = _memory_gib(gpus[0]) if gpus else H100_GIB
        row["state_fits"] = row["state_gib"] <= limit_gib
        if not row["state_fits"]:
            row["status"] = (f"does not fit one GPU: parameters, gradients and Adam state alone need "
                             f"{row['state_gib']:.0f} GiB of {limit_gib:.0f} GiB")
        elif not gpus:
            row["status"] = "not measured: no GPU"
        elif args.only and not any(s in c.name for s in args.only):
            row["status"] = "not measured: not selected (--only / --quick)"
        else:
            try:
                row.update(measure(c, gpus[0], args.reps, args.warmup))
            except Exception as err:  # e.g. out of memory at run time: record it, go on
                row["status"] = f"failed: {type(err).__name__}: {str(err).splitlines()[0][:200]}"
        print(f"  {row['config']:28s} {row['params_total_m']:8.0f}M params  state {row['state_gib']:6.1f} GiB  "
              + (f"{row['tokens_per_s']:.0f} tokens/s, MFU {row['mfu']:.1%}" if row.get("mfu") is not None
                 else row["status"]), flush=True)
        rows.append(row)
    for row in rows:  # step time over the dense twin's, where both ran
        twin = next((t for t in rows if t["config"] == row["config"] + "_dense_twin"), None)
        if twin and row.get("step_ms") and twin.get("step_ms"):
            row["ratio_vs_dense_twin"] = row["step_ms"] / twin["step_ms"]
    if not gpus:
        skip_line = (f"SKIP GPU measurement: no GPU on this machine (backend {jax.default_backend()}); "
                     "tokens/s and MFU need a GPU, nothing was measured")
        print(skip_line, flush=True)
        if args.quick:  # exercise the measuring code on CPU so it cannot rot; not a GPU figure
            tiny = _gpt(64, 2, 2, 4, vocab_size=256, max_len=64, dtype="float32", remat="none")
            c = Candidate("cpu_smoke_tiny", "built in (quick smoke, CPU)", _train_config(tiny, 4, 64))
            row = {**describe(c), **measure(c, jax.devices("cpu")[0], args.reps, args.warmup)}
            row["status"] = "smoke run on CPU (not a GPU figure; no MFU)"
            row["mfu"] = None
            print(f"  {c.name}: {row['tokens_per_s']:.0f} tokens/s on CPU (smoke)", flush=True)
            rows.append(row)
    wall_s = time.perf_counter() - start
    markdown = render_markdown(rows, settings, machine, wall_s, skip_line)
    _common.publish(NAME, rows, settings, markdown, out_dir, machine, extra={"skipped": skip_line, "wall_s": wall_s})
    return 0


if __name__ == "__main__":
    sys.exit(main())
