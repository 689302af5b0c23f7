"""Validation loss of the tiny MoE against its FLOP-matched dense twin, same tokens, same text.

Target (issue 5): the MoE model (configs/tiny.yaml) reaches a lower validation
loss than its dense twin (configs/tiny_dense.yaml: every MoE layer an FFN of
width top_k x expert_d_ff, so the same FLOPs per token) at equal steps.

Both are trained with `tedjax.loop.run` from Python on the same stdlib text,
the same batches (same data seed) and the same number of steps, and evaluated
on the same validation batches every `--eval-every` steps. PASS when the MoE's
validation loss is lower at the last step; the table shows every evaluation
step and the plot both curves (train loss faint).

    python benchmarks/quality.py            # full run -> benchmarks/results/quality.{json,md,png}
    python benchmarks/quality.py --quick    # smoke run (tiny model, a few steps) -> a temp dir
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # _common
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tedjax
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

import numpy as np  # noqa: E402

import _common  # noqa: E402
from tedjax.config import load_config  # noqa: E402
from tedjax.loop import run  # noqa: E402

NAME = "quality"
REPO = Path(__file__).resolve().parents[1]
CONFIGS = {"moe": REPO / "configs" / "tiny.yaml", "dense": REPO / "configs" / "tiny_dense.yaml"}
QUICK_OVERRIDES = [
    "model.d_model=32", "model.n_heads=2", "model.d_ff=64", "model.expert_d_ff=64", "model.max_len=32",
    "data.seq_len=32", "data.batch_size=8",
]  # fmt: skip


def train(name: str, args, log_dir: Path) -> dict:
    overrides = [
        f"steps={args.steps}", f"seed={args.seed}", f"data.seed={args.seed}", f"log.dir={log_dir / name}",
        "log.progress=false", "log.tensorboard=false", f"log.eval_every={args.eval_every}",
        f"log.eval_batches={args.eval_batches}", "checkpoint.every=0",
    ] + (QUICK_OVERRIDES if args.quick else [])  # fmt: skip
    config = load_config(str(CONFIGS[name]), overrides)
    start = time.perf_counter()
    result = run(config)
    wall_s = time.perf_counter() - start
    counts = config.model.param_counts()
    return {
        "name": name,
        "config": str(CONFIGS[name].relative_to(REPO)),
        "overrides": overrides,
        "eval_losses": {int(k): float(v) for k, v in sorted(result.eval_losses.items())},
        "train_losses": {int(k): float(v) for k, v in sorted(result.train_losses.items())},
        "params_total": counts["total"],
        "params_active": counts["active"],
        "flops_per_token": config.model.flops_per_token(config.data.seq_len),
        "tokens_per_step": config.data.batch_size * config.data.seq_len,
        "wall_s": wall_s,
        "unigram_baseline": result.unigram_baseline,
    }


def compare(runs: dict) -> tuple[list[dict], dict]:
    moe, dense = runs["moe"]["eval_losses"], runs["dense"]["eval_losses"]
    steps = sorted(set(moe) & set(dense))
    rows = [{"step": s, "moe_val_loss": moe[s], "dense_val_loss": dense[s], "moe_minus_dense": moe[s] - dense[s],
             "moe_lower": moe[s] < dense[s]} for s in steps]  # fmt: skip
    last = rows[-1]
    verdict = {
        "step": last["step"],
        "moe_val_loss": last["moe_val_loss"],
        "dense_val_loss": last["dense_val_loss"],
        "gap": last["moe_minus_dense"],
        "moe_lower_at": f"{sum(r['moe_lower'] for r in rows)}/{len(rows)} evaluation steps",
        "verdict": "PASS" if last["moe_lower"] else "MISS",
    }
    return rows, verdict


def plot(runs: dict, verdict: dict, path: Path) -> str | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed (pip install matplotlib); no plot written"
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    colors = {"moe": "tab:blue", "dense": "tab:orange"}
    for name, r in runs.items():
        label = f"{name} ({r['params_total'] / 1e6:.2f}M params, {r['params_active'] / 1e6:.2f}M active)"
        train_steps = np.array(list(r["train_losses"]), dtype=float)
        train_loss = np.array(list(r["train_losses"].values()), dtype=float)
        if len(train_loss) >= 10:
            window = max(len(train_loss) // 30, 1)
            smooth = np.convolve(train_loss, np.ones(window) / window, mode="valid")
            ax.plot(train_steps[window - 1:], smooth, color=colors[name], alpha=0.25, lw=1)
        steps, losses = list(r["eval_losses"]), list(r["eval_losses"].values())
        ax.plot(steps, losses, "o-", color=colors[name], label=f"{label} validation")
    ax.set_xlabel("step (same tokens per step for both)")
    ax.set_ylabel("loss (nats / byte)")
    ax.set_title(f"tiny MoE vs FLOP-matched dense twin: {verdict['verdict']} "
                 f"(final val {verdict['moe_val_loss']:.3f} vs {verdict['dense_val_loss']:.3f})", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    evals = [v for r in runs.values() for v in r["eval_losses"].values()]
    if evals:
        ax.set_ylim(min(evals) - 0.1, min(max(evals) + 0.3, min(evals) + 2.5))
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return None


def render_markdown(rows, verdict, runs, settings, machine, wall_s, plot_note) -> str:
    moe, dense = runs["moe"], runs["dense"]
    cols = [("step", "step"), ("MoE val loss", "moe_val_loss", ".4f"), ("dense val loss", "dense_val_loss", ".4f"),
            ("MoE - dense", "moe_minus_dense", "+.4f")]  # fmt: skip
    lines = [
        "# Validation loss: tiny MoE vs its FLOP-matched dense twin",
        "",
        f"Regenerate: `{settings['command']}`",
        "",
        f"Date {machine['date']}; {machine['device_kind']} ({machine['backend']}) x{machine['device_count']}, "
        f"{machine['cpu_count']} CPUs, jax {machine['jax_version']}; run wall time {wall_s:.0f} s "
        f"(MoE {moe['wall_s']:.0f} s, dense {dense['wall_s']:.0f} s).",
        "",
        f"`{moe['config']}` ({moe['params_total'] / 1e6:.2f}M parameters, {moe['params_active'] / 1e6:.2f}M active "
        f"per token, {moe['flops_per_token'] / 1e6:.1f} MFLOP/token) against `{dense['config']}` "
        f"({dense['params_total'] / 1e6:.2f}M parameters, {dense['flops_per_token'] / 1e6:.1f} MFLOP/token), "
        f"trained with `tedjax.loop.run` for {settings['steps']} steps of {moe['tokens_per_step']} tokens "
        f"(seed {settings['seed']}, same batches), validation LM loss on the same {settings['eval_batches']} "
        f"validation batches every {settings['eval_every']} steps. Unigram baseline "
        f"{moe['unigram_baseline'] if moe['unigram_baseline'] is None else round(moe['unigram_baseline'], 4)} "
        "nats/byte.",
        "",
        _common.markdown_table(rows, cols),
        f"Target: MoE validation loss below the dense twin's at equal steps. At step {verdict['step']}: "
        f"{verdict['moe_val_loss']:.4f} vs {verdict['dense_val_loss']:.4f} ({verdict['gap']:+.4f}); MoE lower at "
        f"{verdict['moe_lower_at']} -> **{verdict['verdict']}**",
        "",
        f"![validation loss]({NAME}.png)" if plot_note is None else f"No plot: {plot_note}",
        "",
    ]
    return "\n".join(lines)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=300, help="training steps for each model (configs: 300)")
    p.add_argument("--eval-every", type=int, default=25)
    p.add_argument("--eval-batches", type=int, default=8)
    p.add_argument("--seed", type=int, default=0, help="model and data seed, the same for both")
    p.add_argument("--quick", action="store_true", help="tiny smoke run; writes to a temp dir unless --out")
    p.add_argument("--out", default=None, help="output dir (default benchmarks/results, a temp dir with --quick)")
    args = p.parse_args(argv)
    if args.quick:
        args.steps, args.eval_every, args.eval_batches = 4, 2, 1
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    start = time.perf_counter()
    out_dir = _common.output_dir("quality", args.out, args.quick)
    out_dir.mkdir(parents=True, exist_ok=True)
    machine = _common.machine_info()
    settings = {k: v for k, v in vars(args).items() if k != "out"}
    settings["target"] = "MoE validation loss < dense twin's at the last evaluation step (equal steps and tokens)"
    settings["command"] = " ".join(["python", "benchmarks/quality.py", *(argv if argv is not None else sys.argv[1:])])
    print(f"{NAME}: {machine['device_kind']} x{machine['device_count']}, settings {settings}", flush=True)
    runs = {}
    with tempfile.TemporaryDirectory(prefix="quality_runs_") as log_dir:
        for name in ("moe", "dense"):
            runs[name] = train(name, args, Path(log_dir))
            print(f"  {name}: {runs[name]['wall_s']:.0f} s, validation losses {runs[name]['eval_losses']}", flush=True)
    rows, verdict = compare(runs)
    plot_note = plot(runs, verdict, out_dir / f"{NAME}.png")
    if plot_note:
        print(plot_note, flush=True)
    wall_s = time.perf_counter() - start
    markdown = render_markdown(rows, verdict, runs, settings, machine, wall_s, plot_note)
    json_path, md_path = _common.save_results(NAME, rows, settings, markdown, out_dir, machine=machine,
                                              extra={"verdict": verdict, "runs": runs, "wall_s": wall_s})
    print()
    print(markdown)
    print(f"wrote {json_path}, {md_path}" + ("" if plot_note else f" and {out_dir / (NAME + '.png')}"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
