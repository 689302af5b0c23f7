"""Metric logging: JSONL always, TensorBoard event files (tensorboardX), and a tqdm bar or plain lines.

On a terminal with `log.progress=true` a progress bar shows the run; otherwise
(SLURM, files, `log.progress=false`) every train record is also printed as one
plain line. A run that starts at step N (a resume) first moves the records of
later steps, left by the run it replaces, to `metrics.superseded.jsonl`, and
TensorBoard is told to drop its events from step N + 1 on, so no step is
logged twice.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from pathlib import Path

import jax
import numpy as np

# Dense (no sparsity) peak TFLOP/s per device and compute dtype, from the vendors' data sheets; the first
# entry whose name is in the device kind wins, so the specific names (PCIe, NVL) come before the family.
# No float32 entries: XLA's float32 matmuls run at a precision (TF32 or full fp32) these sheets do not pin
# down, and an fp32 run measured against a bf16 peak would understate MFU; set log.peak_tflops for those.
PEAK_TFLOPS: tuple[tuple[str, dict[str, float]], ...] = (
    ("H100 PCIe", {"bfloat16": 756.0}),
    ("H100 NVL", {"bfloat16": 835.0}),
    ("H200 NVL", {"bfloat16": 835.0}),
    ("H100", {"bfloat16": 989.0}),  # SXM ("NVIDIA H100 80GB HBM3")
    ("H200", {"bfloat16": 989.0}),
    ("GH200", {"bfloat16": 989.0}),
    ("A100", {"bfloat16": 312.0}),  # SXM and PCIe alike
    ("L40S", {"bfloat16": 362.0}),
    ("A10G", {"bfloat16": 125.0}),
    ("TPU v4", {"bfloat16": 275.0}),
    ("TPU v5 lite", {"bfloat16": 197.0}),
    ("TPU v5p", {"bfloat16": 459.0}),
    ("TPU v5", {"bfloat16": 459.0}),
    ("TPU v6", {"bfloat16": 918.0}),
)
SUPERSEDED = "metrics.superseded.jsonl"


def detect_peak_tflops(device: jax.Device | None = None, dtype: str = "bfloat16") -> float | None:
    """Peak dense TFLOP/s of `device` for `dtype` compute, or None when unknown (CPU, float32, unlisted cards)."""
    kind = (device or jax.devices()[0]).device_kind.lower()
    for name, peaks in PEAK_TFLOPS:
        if name.lower() in kind:
            return peaks.get(dtype)
    return None


def to_python(metrics: dict) -> dict:
    """Device metrics -> JSON-friendly floats and lists."""
    out = {}
    for key, value in metrics.items():
        value = np.asarray(value)
        out[key] = value.item() if value.ndim == 0 else value.tolist()
        if isinstance(out[key], bool):
            out[key] = int(out[key])
    return out


def truncate_records(path: Path, last_step: int) -> int:
    """Keep the records of steps <= `last_step` in `path`; move the others (and any torn line) to
    `metrics.superseded.jsonl` beside it. Returns how many lines moved."""
    if not path.exists():
        return 0
    keep, moved = [], []
    for line in path.read_text().splitlines(keepends=True):
        try:
            ok = line.endswith("\n") and json.loads(line).get("step", 0) <= last_step
        except (ValueError, AttributeError):
            ok = False
        (keep if ok else moved).append(line if line.endswith("\n") else line + "\n")
    if moved:
        with open(path.with_name(SUPERSEDED), "a") as f:
            f.writelines(moved)
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text("".join(keep))
        os.replace(tmp, path)
    return len(moved)


def format_record(step: int, total: int, record: dict, kind: str = "train") -> str:
    """One plain line: step, loss parts, throughput, MFU, expert balance, drops."""
    parts = [f"step {step}/{total}"]
    if kind == "eval":
        parts.append(f"eval lm_loss {record.get('lm_loss', float('nan')):.4f}")
    else:
        loss = f"loss {record.get('loss', float('nan')):.4f}"
        pieces = [f"lm {record['lm_loss']:.4f}"] if "lm_loss" in record else []
        pieces += [f"{name} {record[key]:.4g}" for key, name in
                   (("aux_loss_per_layer", "aux/layer"), ("z_loss_per_layer", "z/layer")) if key in record]  # fmt: skip
        parts.append(loss + (f" ({', '.join(pieces)})" if pieces else ""))
        if "grad_norm" in record:
            parts.append(f"grad norm {record['grad_norm']:.3g}")
        if "tokens_per_s" in record:
            parts.append(f"{record['tokens_per_s']:,.0f} tok/s")
        if "seconds_per_step" in record:
            parts.append(f"{record['seconds_per_step']:.3g} s/step")
        if "mfu" in record:
            parts.append(f"mfu {record['mfu']:.1%}")
    load = record.get("expert_load")
    if load:
        parts.append(f"load max/mean {_max_over_mean(load):.2f}")
        devices = record.get("device_load")
        if devices and len(devices[0]) > 1:  # what sets the drops with device-pooled capacity
            parts.append(f"device max/mean {_max_over_mean(devices):.2f}")
    if record.get("dropped_fraction") is not None:
        dropped = record["dropped_fraction"]
        parts.append(f"dropped {float(np.mean(dropped)):.1%}")
    if record.get("internode_fraction") is not None and np.any(record["internode_fraction"]):  # nodes (issue 24)
        parts.append(f"inter-node {float(np.mean(record['internode_fraction'])):.1%}, redirected "
                     f"{float(np.mean(record.get('redirected_fraction', 0.0))):.1%}")
    if record.get("shadow_ids") and load:
        parts.append(_shadows(record))
    if kind == "train":
        if "learning_rate" in record:
            parts.append(f"lr {record['learning_rate']:.2e}")
        if record.get("skipped_steps"):
            parts.append(f"skipped {record['skipped_steps']}")
        if "seconds_per_step" in record and total > step:
            parts.append(f"ETA {_clock(record['seconds_per_step'] * (total - step))}")
    return " | ".join(parts)


def format_postfix(record: dict) -> str:
    """The progress bar's postfix for a train record: what the plain line shows that a bar would hide."""
    parts = [f"loss {record.get('loss', float('nan')):.4f}"]
    if "aux_loss_per_layer" in record:
        parts.append(f"aux {record['aux_loss_per_layer']:.3g}")
    if record.get("expert_load"):
        parts.append(f"load {_max_over_mean(record['expert_load']):.2f}")
    if record.get("dropped_fraction") is not None:
        parts.append(f"drop {float(np.mean(record['dropped_fraction'])):.1%}")
    if record.get("shadow_ids") and record.get("expert_load"):
        parts.append(_shadows(record))
    if "learning_rate" in record:
        parts.append(f"lr {record['learning_rate']:.2e}")
    if "tokens_per_s" in record:
        parts.append(f"{record['tokens_per_s']:,.0f} tok/s")
    if record.get("skipped_steps"):
        parts.append(f"skipped {record['skipped_steps']}")
    return ", ".join(parts)


def _shadows(record: dict) -> str:
    """The shadows a step used, per MoE layer ("shadows L0 3,5 L1 none"); ids >= E are empty slots."""
    load = record["expert_load"]
    return "shadows " + " ".join(f"L{i} {','.join(str(e) for e in ids if e < len(load[i])) or 'none'}"
                                 for i, ids in enumerate(record["shadow_ids"]))


def _max_over_mean(layers: list) -> float:
    """The worst layer's max/mean of a per-layer load `[layers][E or X]` (1.0 = balanced)."""
    return max(max(layer) * len(layer) / max(sum(layer), 1e-9) for layer in layers)


def _clock(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"
def require_wandb() -> None:
    """Raise ValueError naming the fix when log.wandb is set but wandb is not installed (checked before compiling)."""
    try:
        import wandb  # noqa: F401
    except ImportError:
        raise ValueError("log.wandb.project is set but the wandb package is not installed; "
                         "pip install 'tedjax[wandb]' (or leave log.wandb.project empty)") from None


class WandbTracker:
    """Mirrors the records MetricsLogger writes to a Weights & Biases run (`log.wandb`), as TensorBoard gets them.

    mode=offline writes the run under `<log.dir>/wandb` without any network access; `wandb sync` uploads it later.
    """

    def __init__(self, project: str, name: str, mode: str, log_dir: Path, config: dict | None = None):
        import wandb

        self.run = wandb.init(project=project, name=name or None, mode=mode, dir=str(log_dir), config=config,
                              settings=wandb.Settings(silent=True))  # fmt: skip

    def log(self, step: int, record: dict, kind: str) -> None:
        data = {}
        for key, value in record.items():
            if key in ("kind", "step", "time"):
                continue
            if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
                data[f"{kind}/{key}"] = value
            elif isinstance(value, list):  # per-layer lists, as in TensorBoard
                for layer, entry in enumerate(value):
                    if isinstance(entry, list):
                        ratio = max(entry) * len(entry) / max(sum(entry), 1e-9)
                        data[f"{kind}/{key}/layer{layer}_max_over_mean"] = ratio
                    elif isinstance(entry, (int, float)):
                        data[f"{kind}/{key}/layer{layer}"] = entry
        if data:
            self.run.log(data, step=step)

    def close(self) -> None:
        self.run.finish()


class MetricsLogger:
    """Writes one JSON line per record to `<dir>/metrics.jsonl` and mirrors scalars to TensorBoard."""

    def __init__(self, log_dir: str | Path, *, total_steps: int, start_step: int = 0,
                 tensorboard: bool = True, progress: bool = True, wandb: dict | None = None):  # fmt: skip
        self.enabled = jax.process_index() == 0
        self.dir = Path(log_dir)
        self.total_steps = total_steps
        self.writer = self.bar = self.wandb = None
        self.superseded = 0
        if not self.enabled:
            return
        self.dir.mkdir(parents=True, exist_ok=True)
        self.superseded = truncate_records(self.dir / "metrics.jsonl", start_step)
        self.jsonl = open(self.dir / "metrics.jsonl", "a")
        if tensorboard:
            from tensorboardX import SummaryWriter

            tb_dir = self.dir / "tensorboard"
            # Events of steps > start_step from an earlier run are dropped by TensorBoard (a SessionLog.START).
            purge = start_step + 1 if tb_dir.exists() else None
            self.writer = SummaryWriter(str(tb_dir), purge_step=purge)
        if wandb:  # {project, name, mode, config}: log.wandb with a project
            self.wandb = WandbTracker(log_dir=self.dir, **wandb)
        if progress and sys.stdout.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total_steps, initial=start_step, unit="step", dynamic_ncols=True)

    def log(self, step: int, record: dict, *, kind: str = "train") -> None:
        if not self.enabled:
            return
        record = {"kind": kind, "step": step, "time": time.time(), **record}
        self.jsonl.write(json.dumps(record) + "\n")
        self.jsonl.flush()
        if kind == "start":
            return  # the run's config and accepted changes: JSONL only (and wandb's run config)
        if self.wandb is not None:
            self.wandb.log(step, record, kind)
        if self.writer is not None:
            for key, value in record.items():
                if key in ("kind", "step", "time"):
                    continue
                if isinstance(value, (int, float)) and math.isfinite(value):
                    self.writer.add_scalar(f"{kind}/{key}", value, step)
                elif isinstance(value, list):  # per-layer lists: dropped fraction [layers], load [layers][E]
                    for layer, entry in enumerate(value):
                        if isinstance(entry, list):
                            self.writer.add_scalar(f"{kind}/{key}/layer{layer}_max_over_mean",
                                                   max(entry) * len(entry) / max(sum(entry), 1e-9), step)
                        else:
                            self.writer.add_scalar(f"{kind}/{key}/layer{layer}", entry, step)
        if kind not in ("train", "eval"):
            return
        if self.bar is None:
            print(format_record(step, self.total_steps, record, kind), flush=True)
        elif kind == "train":
            self.bar.set_postfix_str(format_postfix(record))
        else:
            self.bar.write(format_record(step, self.total_steps, record, kind))

    def advance(self, steps: int = 1) -> None:
        if self.bar is not None:
            self.bar.update(steps)

    def message(self, text: str) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.write(text)
        else:
            print(text, flush=True)

    def close_bar(self) -> None:
        """Draw the finished bar for good; later messages print as plain lines below it."""
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    def close(self) -> None:
        if not self.enabled:
            return
        self.jsonl.close()
        if self.writer is not None:
            self.writer.close()
        if self.wandb is not None:
            self.wandb.close()
        self.close_bar()
