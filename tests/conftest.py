"""Test set-up: 8 simulated CPU devices, set before jax is imported anywhere."""
import os

# Tiny models compile far faster without LLVM's expensive passes; tests time
# compilation, not kernels.
os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "")
    + " --xla_force_host_platform_device_count=8 --xla_backend_optimization_level=0"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: a long test (still run in CI)")
