"""The XLA settings a benchmark needs before jax is imported: no jax here, so scripts call it first."""

import os
import sys
from pathlib import Path

sys.path.append(str(Path(__file__).resolve().parents[1] / "tests"))
from compile_flags import FAST_COMPILE_FLAGS  # noqa: E402  (no jax)

# Fast compiles for --quick runs (the figures they check do not depend on XLA:CPU's optimization level):
# tests/compile_flags.py's, which says why each one.
QUICK_COMPILE = " " + FAST_COMPILE_FLAGS


def simulate_cpu_devices(quick: bool, devices: int = 8) -> None:
    """Set XLA_FLAGS to `devices` simulated CPU devices (plus fast compiles when `quick`) and default to CPU.

    Call it before the first `import jax`; it replaces XLA_FLAGS rather than extending them.
    """
    os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}" + (QUICK_COMPILE if quick else "")
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
