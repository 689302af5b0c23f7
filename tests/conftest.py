"""Test set-up: 8 simulated CPU devices, set before jax is imported anywhere."""
import os

from compile_flags import FAST_COMPILE_FLAGS  # (imports nothing else)

# Fast compiles (see compile_flags.py); subprocesses and notebook kernels inherit them.
os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8 " + FAST_COMPILE_FLAGS
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")

import tedjax.host  # noqa: E402

tedjax.host.reuse_freed_host_memory()  # as train.py does on CPU


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: a long test (still run in CI)")
