"""Metric logging: JSONL always, TensorBoard event files (tensorboardX) and a tqdm progress bar."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import jax
import numpy as np

# Dense bf16 peak FLOP/s per device, for MFU when log.peak_tflops is 0.
PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "A10G": 125.0, "V100": 125.0,
               "TPU v4": 275.0, "TPU v5 lite": 197.0, "TPU v5p": 459.0, "TPU v6": 918.0}  # fmt: skip


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


class MetricsLogger:
    """Writes one JSON line per record to `<dir>/metrics.jsonl` and mirrors scalars to TensorBoard."""

    def __init__(self, log_dir: str | Path, *, total_steps: int, start_step: int = 0,
                 tensorboard: bool = True, progress: bool = True):  # fmt: skip
        self.enabled = jax.process_index() == 0
        self.dir = Path(log_dir)
        self.writer = self.bar = None
        if not self.enabled:
            return
        self.dir.mkdir(parents=True, exist_ok=True)
        self.jsonl = open(self.dir / "metrics.jsonl", "a")
        if tensorboard:
            from tensorboardX import SummaryWriter

            self.writer = SummaryWriter(str(self.dir / "tensorboard"))
        if progress:
            from tqdm import tqdm

            self.bar = tqdm(total=total_steps, initial=start_step, unit="step", dynamic_ncols=True)

    def log(self, step: int, record: dict, *, kind: str = "train") -> None:
        if not self.enabled:
            return
        record = {"kind": kind, "step": step, "time": time.time(), **record}
        self.jsonl.write(json.dumps(record) + "\n")
        self.jsonl.flush()
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
        if self.bar is not None and kind == "train":
            self.bar.set_postfix(loss=f"{record.get('loss', float('nan')):.4f}",
                                 tok_s=f"{record.get('tokens_per_s', 0):.0f}")
        elif self.bar is not None and kind == "eval":
            self.bar.write(f"step {step}: val_loss {record.get('lm_loss', float('nan')):.4f}")

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
