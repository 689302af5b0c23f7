"""Generation speed of the tiny model on CPU: tokens/s with the KV cache, and without it for comparison.

The model is the README main job's (configs/tiny.yaml: 4 layers, d_model 128,
8 experts top-1 in every other layer, vocab 256, max_len 128), freshly
initialised: speed does not depend on the weights. For each layout and batch
size, `tedjax.generate` continues a 16-token prompt greedily by N new tokens.

Reported per row:
- compile_s: the first call (compilation of the one generation program + one run);
- tokens_per_s: batch x N new tokens over the median wall time of a warm call
  (prefill and N decode steps, end to end);
- tokens_per_s_best: the same from the fastest call (least disturbed by other
  processes on a shared machine);
- decode_ms_per_step: the marginal cost of one decode step for the whole
  batch, (t(N) - t(N/2)) / (N/2) from the fastest calls, N and N/2
  interleaved and in the same shape bucket, so prefill and fixed costs cancel;
- no-cache rows (batch 1, one device): `generation.greedy_without_cache`,
  which reruns the full-sequence forward on the whole buffer for every new
  token, the way generation works without a cache.

    python benchmarks/generate.py            # full run -> benchmarks/results/generate.{json,md}
    python benchmarks/generate.py --quick    # smoke run -> a temp dir
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
import numpy as np  # noqa: E402

import _common  # noqa: E402
import tedjax  # noqa: E402
from tedjax.config import load_config  # noqa: E402
from tedjax.generation import buckets, greedy_without_cache  # noqa: E402

NAME = "generate"
REPO = Path(__file__).resolve().parents[1]


def parse_layout(text: str) -> tuple[int, int, int]:
    parts = text.replace("x", ",").split(",")
    if len(parts) != 3 or not all(p.strip().isdigit() for p in parts):
        raise argparse.ArgumentTypeError(f"layout {text!r} must look like 2,2,2 (data,expert,tensor)")
    return tuple(int(p) for p in parts)  # type: ignore[return-value]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layouts", type=parse_layout, nargs="+", default=[(1, 1, 1), (2, 2, 2)])
    p.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    p.add_argument("--prompt-len", type=int, default=16)
    p.add_argument("--new-tokens", type=int, default=100)
    p.add_argument("--reps", type=int, default=7, help="timed warm calls per row")
    p.add_argument("--no-cache-tokens", type=int, default=100, help="new tokens for the no-cache comparison (0: skip)")
    p.add_argument("--quick", action="store_true", help="smoke run; writes to a temp dir unless --out")
    p.add_argument("--out", default=None, help="output dir (default benchmarks/results, a temp dir with --quick)")
    args = p.parse_args(argv)
    if args.quick:
        args.layouts, args.batches, args.new_tokens, args.reps, args.no_cache_tokens = [(2, 2, 2)], [1], 16, 2, 4
    return args


def timed(fn, reps: int) -> list[float]:
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return times


def main(argv=None) -> int:
    args = parse_args(argv)
    out_dir = _common.output_dir(NAME, args.out, args.quick)
    machine = _common.machine_info()
    # --quick: the same model with 2 of its 4 layers (one MoE layer): half the program to compile
    config = load_config(str(REPO / "configs" / "tiny.yaml"), ["model.n_layers=2"] if args.quick else []).model
    settings = {k: v for k, v in vars(args).items() if k != "out"}
    settings["layouts"] = ["x".join(map(str, layout)) for layout in args.layouts]
    settings["model"] = "configs/tiny.yaml (random init)" + (", 2 layers (--quick)" if args.quick else "")
    settings["command"] = " ".join(["python", "benchmarks/generate.py", *(argv if argv is not None else sys.argv[1:])])
    if args.prompt_len + args.new_tokens > config.max_len:
        raise ValueError(f"--prompt-len + --new-tokens must be <= max_len={config.max_len}")
    print(f"{NAME}: {machine['device_kind']} x{machine['device_count']}, jax {machine['jax_version']}, "
          f"settings {settings}", flush=True)
    rng = np.random.default_rng(0)
    rows = []
    for layout in args.layouts:
        devices = jax.devices()[: math.prod(layout)]
        mesh = tedjax.make_mesh(*layout, devices=devices)
        model = tedjax.init_model(config, mesh)
        for batch in args.batches:
            prompt = rng.integers(0, config.vocab_size, (batch, args.prompt_len))
            n, half = args.new_tokens, max(1, args.new_tokens // 2)
            run_full = lambda: tedjax.generate(model, prompt, n)  # noqa: E731
            run_half = lambda: tedjax.generate(model, prompt, half)  # noqa: E731
            start = time.perf_counter()
            run_full()
            compile_s = time.perf_counter() - start
            run_half()  # same bucket: no new compile
            full_times, half_times = [], []
            for _ in range(args.reps):  # interleaved, so load from other processes hits both alike
                full_times += timed(run_full, 1)
                half_times += timed(run_half, 1)
            full_s, best_s, half_best_s = _common.median(full_times), min(full_times), min(half_times)
            row = {
                "layout": "x".join(map(str, layout)), "batch": batch, "cache": "yes", "new_tokens": n,
                "buckets": list(buckets(args.prompt_len, n, config.max_len)), "compile_s": compile_s,
                "call_s": full_s, "call_s_best": best_s, "tokens_per_s": batch * n / full_s,
                "tokens_per_s_best": batch * n / best_s,
                "decode_ms_per_step": 1e3 * (best_s - half_best_s) / (n - half) if n > half else None,
                "times_s": full_times, "half_times_s": half_times,
            }  # fmt: skip
            rows.append(row)
            print(f"  {row['layout']} batch {batch}: {row['tokens_per_s']:.0f} tokens/s "
                  f"({row['decode_ms_per_step']:.2f} ms per decode step, compile {compile_s:.1f} s)", flush=True)
    if args.no_cache_tokens:
        mesh = tedjax.make_mesh(1, 1, 1, devices=jax.devices()[:1])
        model = tedjax.init_model(config, mesh)
        prompt = rng.integers(0, config.vocab_size, (1, args.prompt_len))
        n = args.no_cache_tokens
        start = time.perf_counter()
        greedy_without_cache(model, prompt, n)
        compile_s = time.perf_counter() - start
        times = timed(lambda: greedy_without_cache(model, prompt, n), max(1, args.reps // 2))
        call_s = _common.median(times)
        rows.append({"layout": "1x1x1", "batch": 1, "cache": "no", "new_tokens": n, "buckets": None,
                     "compile_s": compile_s, "call_s": call_s, "call_s_best": min(times), "tokens_per_s": n / call_s,
                     "tokens_per_s_best": n / min(times), "decode_ms_per_step": 1e3 * min(times) / n,
                     "times_s": times})  # fmt: skip
        print(f"  no cache, 1x1x1 batch 1: {n / call_s:.0f} tokens/s", flush=True)
    settings["load_avg_end"] = _common.load_avg()
    markdown = render_markdown(rows, settings, machine)
    _common.publish(NAME, rows, settings, markdown, out_dir, machine)
    return 0


def render_markdown(rows, settings, machine) -> str:
    table = _common.markdown_table(rows, [
        ("layout (d,e,t)", "layout"), ("batch", "batch"), ("KV cache", "cache"), ("new tokens", "new_tokens"),
        ("tokens/s (median)", "tokens_per_s", ".0f"), ("tokens/s (best)", "tokens_per_s_best", ".0f"),
        ("ms per decode step", "decode_ms_per_step", ".2f"),
        ("warm call s", "call_s", ".3f"), ("first call (compile) s", "compile_s", ".1f"),
    ])  # fmt: skip
    return (
        f"# Generation speed, tiny model on CPU\n\n"
        f"`{settings['command']}` on {machine['processor']} ({machine['cpu_count']} cores, "
        f"{machine['device_count']} simulated {machine['device_kind']} devices), jax {machine['jax_version']}, "
        f"load average at the end {settings['load_avg_end']}. Model: {settings['model']}; prompt "
        f"{settings['prompt_len']} tokens, greedy.\n\n{table}\n"
        "tokens/s = batch x new tokens / warm call time (prefill + decode), median and fastest of the timed "
        "calls (the fastest is the least disturbed by other processes on a shared machine). ms per decode step "
        "= (t(N) - t(N/2)) / (N/2) from the fastest calls, N and N/2 interleaved and in the same shape bucket, "
        "so prefill and fixed costs cancel. The no-cache row reruns the full forward over the whole buffer for "
        "every token (`generation.greedy_without_cache`); its ms per step is the whole call over N.\n"
    )


if __name__ == "__main__":
    sys.exit(main())
