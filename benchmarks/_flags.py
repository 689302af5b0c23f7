"""The XLA settings a benchmark needs before jax is imported: no jax here, so scripts call it first."""

import os

# Fast compiles for --quick runs (the figures they check do not depend on XLA:CPU's optimization level):
# tests/compile_flags.py's, which says why each one.
QUICK_COMPILE = (" --xla_backend_optimization_level=0 --xla_cpu_use_fusion_emitters=false"
                 " --xla_cpu_parallel_codegen_split_count=1")


def simulate_cpu_devices(quick: bool, devices: int = 8) -> None:
    """Set XLA_FLAGS to `devices` simulated CPU devices (plus fast compiles when `quick`) and default to CPU.

    Call it before the first `import jax`; it replaces XLA_FLAGS rather than extending them.
    """
    os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}" + (QUICK_COMPILE if quick else "")
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
