"""Shared helpers for the benchmark scripts: timing, machine info, result files.

Import this module *after* the script has set XLA_FLAGS, since it imports jax. Typical use at the top of a script:

    import os, sys
    from pathlib import Path
    sys.path.insert(0, str(Path(__file__).resolve().parent))      # this helper module
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo (tedjax)
    os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
    import _common
"""

from __future__ import annotations

import datetime
import json
import tempfile
import math
import os
import platform
import statistics
import subprocess
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import jax

from tedjax.host import reuse_freed_host_memory

# What train.py does on CPU: XLA's per-step temporaries stop page-faulting. TEDJAX_BENCH_DEFAULT_MALLOC=1
# keeps glibc's defaults instead, to measure what the setting changes (benchmarks/moe_profile.py --default-malloc).
HOST_MEMORY_REUSED = os.environ.get("TEDJAX_BENCH_DEFAULT_MALLOC") != "1" and reuse_freed_host_memory()

RESULTS_DIR = Path(__file__).resolve().parent / "results"


def time_fn(fn: Callable, *args, reps: int = 5, warmup: int = 1) -> list[float]:
    """Wall-clock seconds of `reps` calls of `fn(*args)`, after `warmup` untimed calls.

    Every call is blocked on with `jax.block_until_ready`, so asynchronous
    dispatch does not hide device time. Compilation happens in the warm-up
    (use warmup >= 1 for jitted functions).
    """
    for _ in range(warmup):
        jax.block_until_ready(fn(*args))
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return times


def median(values: Sequence[float]) -> float:
    return float(statistics.median(values)) if len(values) else math.nan


def machine_info() -> dict[str, Any]:
    """Where and with what the numbers were taken."""
    devices = jax.devices()
    try:
        import flax

        flax_version = flax.__version__
    except Exception:  # pragma: no cover - flax is a dependency, but stay general
        flax_version = None
    try:
        cpus_usable = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not on Linux
        cpus_usable = os.cpu_count()
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "python": platform.python_version(),
        "cpu_count": os.cpu_count(),
        "cpu_count_usable": cpus_usable,
        **cpu_info(),
        "jax_version": jax.__version__,
        "jaxlib_version": _jaxlib_version(),
        "flax_version": flax_version,
        "backend": jax.default_backend(),
        "device_kind": devices[0].device_kind,
        "device_count": len(devices),
        "load_avg": load_avg(),
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
        "git_commit": _git_commit(),
    }


# x86 vector extensions that decide which kernels XLA:CPU (LLVM, oneDNN, YNNPACK) can use.
VECTOR_FLAGS = ("sse4_2", "avx", "avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512_vnni",
                "avx512_bf16", "avx512_fp16", "amx_tile", "amx_bf16", "amx_int8", "asimd", "sve")


def cpu_info() -> dict[str, Any]:
    """The CPU model, its vector flags and the threads this process may use (XLA:CPU speed depends on all three).

    From /proc/cpuinfo on Linux; `cpu_model` falls back to platform.processor() elsewhere.
    `cpu_threads` is the affinity mask's size (what XLA:CPU's thread pool sizes itself by).
    """
    model, flags, per_package = None, set(), {}
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        text = ""
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip()
        if model is None and key in ("model name", "Model", "CPU part"):
            model = value.strip()
        elif key in ("flags", "Features") and not flags:
            flags = set(value.split())
        elif key in ("siblings", "cpu cores") and key not in per_package:
            per_package[key] = int(value)
    try:
        threads = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not on Linux
        threads = os.cpu_count()
    return {
        "cpu_model": model or platform.processor() or platform.machine(),
        "cpu_vector_flags": [f for f in VECTOR_FLAGS if f in flags],
        "cpu_threads": threads,
        # hardware threads per core (2 = SMT: two vCPUs may share one core's vector units)
        "cpu_threads_per_core": (per_package["siblings"] // per_package["cpu cores"]
                                 if per_package.get("cpu cores") else None),
        # thread counts and ISA caps set for this run (ATEN_CPU_CAPABILITY: a torch peer limited like XLA)
        "thread_env": {k: os.environ[k] for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "TF_NUM_INTEROP_THREADS",
                                                  "TF_NUM_INTRAOP_THREADS", "ATEN_CPU_CAPABILITY") if k in os.environ},
        "xla_max_isa": _flag_value(os.environ.get("XLA_FLAGS", ""), "xla_cpu_max_isa"),
    }


def _flag_value(flags: str, name: str) -> str | None:
    """The value of `--name=value` in an XLA_FLAGS string (the last one wins, as in XLA), or None."""
    values = [f.split("=", 1)[1] for f in flags.split() if f.startswith(f"--{name}=")]
    return values[-1] if values else None


def xla_cost(compiled) -> dict:
    """`compiled.cost_analysis()` as one dict ("flops", "bytes accessed", ...; empty when XLA gives none): some jax
    versions wrap it in a one-element list."""
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return dict(cost or {})


def expert_matmul_shapes(rows: int, d_model: int, d_ff: int) -> tuple[tuple[int, int, int], ...]:
    """(m, k, n) of an expert FFN's three products on `rows` tokens: forward `[R, D] x [D, F]`, input gradient
    `[R, F] x [F, D]`, weight gradient `[D, R] x [R, F]`."""
    return (rows, d_model, d_ff), (rows, d_ff, d_model), (d_model, rows, d_ff)


def matmul_roof(shapes, reps: int) -> dict[str, float]:
    """float32 GFLOP per CPU-second of bare jitted matmuls `[m, k] x [k, n]` on one device, best of `reps`
    calls each, and their FLOP-weighted harmonic mean over equal-FLOP shapes (`harmonic_mean`): the rate of a
    step made only of these products, which no step of them beats per CPU-second."""
    import jax
    import jax.numpy as jnp

    matmul, device, key = jax.jit(jnp.matmul), jax.devices()[0], jax.random.key(0)
    out = {}
    for m, k, n in shapes:
        a = jax.device_put(jax.random.normal(key, (m, k), jnp.float32), device)
        b = jax.device_put(jax.random.normal(key, (k, n), jnp.float32), device)
        jax.block_until_ready(matmul(a, b))
        best = 0.0
        for _ in range(reps):
            cpu = time.process_time()
            jax.block_until_ready(matmul(a, b))
            best = max(best, 2 * m * k * n / max(time.process_time() - cpu, 1e-6))
        out[f"{m}x{k}x{n}"] = best / 1e9
    out["harmonic_mean"] = len(out) / sum(1 / v for v in out.values())
    return out


def cpu_line(machine: dict) -> str:
    """One markdown line naming the CPU, its vector flags and thread count (ends every results file)."""
    flags = ", ".join(machine.get("cpu_vector_flags") or []) or "unknown"
    return (f"CPU: {machine.get('cpu_model', 'unknown')} ({flags}); {machine.get('cpu_threads', '?')} threads "
            f"({machine.get('cpu_threads_per_core') or '?'} per core); "
            f"jax {machine.get('jax_version', '?')}, "
            f"{machine.get('device_count', '?')} {machine.get('backend', '?')} devices"
            + (f"; XLA ISA capped at {machine['xla_max_isa']}" if machine.get("xla_max_isa") else "")
            + "".join(f"; {k}={v}" for k, v in (machine.get("thread_env") or {}).items()) + ".")


def load_avg() -> list[float] | None:
    """1, 5 and 15 minute load averages (other work on the machine skews timings)."""
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except OSError:  # pragma: no cover - not available
        return None


def _jaxlib_version() -> str | None:
    try:
        import jaxlib

        return jaxlib.__version__
    except Exception:
        return None


def _git_commit() -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=Path(__file__).resolve().parent,
            capture_output=True,
            text=True,
            timeout=5,
        )
        return out.stdout.strip() or None if out.returncode == 0 else None
    except Exception:
        return None


def _format(value: Any, fmt: str | None) -> str:
    if value is None:
        return ""
    if fmt and isinstance(value, (int, float)) and not isinstance(value, bool):
        return format(value, fmt)
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def markdown_table(rows: Sequence[dict], columns: Sequence[str | tuple]) -> str:
    """A GitHub markdown table of `rows` (dicts).

    Each column is a key, or a tuple `(header, key)` / `(header, key, fmt)`
    where `key` is a dict key or a callable of the row, and `fmt` a format spec
    for numbers (e.g. ".2f"). Missing values print as empty cells.
    """
    specs = []
    for col in columns:
        if isinstance(col, str):
            specs.append((col, col, None))
        else:
            header, key, *rest = col
            specs.append((header, key, rest[0] if rest else None))
    lines = [
        "| " + " | ".join(header for header, _, _ in specs) + " |",
        "|" + "|".join("---" for _ in specs) + "|",
    ]
    for row in rows:
        cells = []
        for _, key, fmt in specs:
            value = key(row) if callable(key) else row.get(key)
            cells.append(_format(value, fmt))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, float) and not math.isfinite(obj):
        return None  # strict JSON has no NaN / inf
    if hasattr(obj, "item") and callable(obj.item):  # numpy / jax scalars
        return _jsonable(obj.item())
    if isinstance(obj, Path):
        return str(obj)
    return obj


def output_dir(name: str, out: str | None, quick: bool) -> Path:
    """Where a script writes: `--out` if given, a fresh temp dir for `--quick`, else benchmarks/results/."""
    if out:
        return Path(out)
    return Path(tempfile.mkdtemp(prefix=f"{name}_")) if quick else RESULTS_DIR


def save_results(
    name: str,
    rows: Sequence[dict],
    settings: dict,
    markdown: str,
    out_dir: str | Path | None = None,
    machine: dict | None = None,
    extra: dict | None = None,
) -> tuple[Path, Path]:
    """Write `<out_dir>/<name>.json` (machine, settings, rows, extra) and `<out_dir>/<name>.md`.

    `out_dir` defaults to `benchmarks/results/`. Returns the two paths.
    """
    out = Path(out_dir) if out_dir is not None else RESULTS_DIR
    out.mkdir(parents=True, exist_ok=True)
    payload = {
        "name": name,
        "machine": machine if machine is not None else machine_info(),
        "settings": settings,
        "rows": list(rows),
        **(extra or {}),
    }
    json_path, md_path = out / f"{name}.json", out / f"{name}.md"
    json_path.write_text(json.dumps(_jsonable(payload), indent=2, allow_nan=False) + "\n")
    markdown = (markdown if markdown.endswith("\n") else markdown + "\n") + "\n" + cpu_line(payload["machine"]) + "\n"
    md_path.write_text(markdown)
    return json_path, md_path


def publish(name: str, rows: Sequence[dict], settings: dict, markdown: str, out_dir: str | Path | None,
            machine: dict, extra: dict | None = None) -> tuple[Path, Path]:
    """save_results, then print the table and where it went (the end of every benchmark script)."""
    json_path, md_path = save_results(name, rows, settings, markdown, out_dir, machine=machine, extra=extra)
    print()
    print(markdown)
    print(f"wrote {json_path} and {md_path}")
    return json_path, md_path
