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

# Dense bf16 peak FLOP/s per device, for MFU when log.peak_tflops is 0.
PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "A10G": 125.0, "V100": 125.0,
               "TPU v4": 275.0, "TPU v5 lite": 197.0, "TPU v5p": 459.0, "TPU v6": 918.0}  # fmt: skip
SUPERSEDED = "metrics.superseded.jsonl"


def detect_peak_tflops(device: jax.Device | None = None) -> float | None:
    """Peak bf16 TFLOP/s of `device` from its kind, or None when unknown (e.g. CPU)."""
    kind = (device or jax.devices()[0]).device_kind
    for name, tflops in PEAK_TFLOPS.items():
        if name.lower() in kind.lower():
            return tflops
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
        if "tokens_per_s" in record:
            parts.append(f"{record['tokens_per_s']:,.0f} tok/s")
        if "mfu" in record:
            parts.append(f"mfu {record['mfu']:.1%}")
    load = record.get("expert_load")
    if load:
        ratios = [max(layer) * len(layer) / max(sum(layer), 1e-9) for layer in load]
        parts.append(f"load max/mean {max(ratios):.2f}")
        devices = record.get("device_load")
        if devices and len(devices[0]) > 1:  # what sets the drops with device-pooled capacity
            ratios = [max(layer) * len(layer) / max(sum(layer), 1e-9) for layer in devices]
            parts.append(f"device max/mean {max(ratios):.2f}")
    if record.get("dropped_fraction") is not None:
        dropped = record["dropped_fraction"]
        parts.append(f"dropped {float(np.mean(dropped)):.1%}")
    if record.get("shadow_ids") and load:  # the shadows this step used (E = an empty slot)
        parts.append("shadows " + " ".join(f"L{i} {','.join(str(e) for e in ids if e < len(load[i])) or 'none'}"
                                           for i, ids in enumerate(record["shadow_ids"])))
    if kind == "train":
        if "learning_rate" in record:
            parts.append(f"lr {record['learning_rate']:.2e}")
        if record.get("skipped_steps"):
            parts.append(f"skipped {record['skipped_steps']}")
    return " | ".join(parts)


class MetricsLogger:
    """Writes one JSON line per record to `<dir>/metrics.jsonl` and mirrors scalars to TensorBoard."""

    def __init__(self, log_dir: str | Path, *, total_steps: int, start_step: int = 0,
                 tensorboard: bool = True, progress: bool = True):  # fmt: skip
        self.enabled = jax.process_index() == 0
        self.dir = Path(log_dir)
        self.total_steps = total_steps
        self.writer = self.bar = None
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
            return  # the run's config and accepted changes: JSONL only
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
            self.bar.set_postfix(loss=f"{record.get('loss', float('nan')):.4f}",
                                 tok_s=f"{record.get('tokens_per_s', 0):.0f}")
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

    def close(self) -> None:
        if not self.enabled:
            return
        self.jsonl.close()
        if self.writer is not None:
            self.writer.close()
        if self.bar is not None:
            self.bar.close()
