"""Test set-up: 8 simulated CPU devices, set before jax is imported anywhere."""
import os
import shutil
import tempfile

from compile_flags import FAST_COMPILE_FLAGS  # (imports nothing else)

# Fast compiles (see compile_flags.py); subprocesses and notebook kernels inherit them.
os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8 " + FAST_COMPILE_FLAGS
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

# One persistent compilation cache per suite run, made by the first process (the xdist controller) and
# inherited by the workers, train.py subprocesses, benchmark scripts and notebook kernels: a program that
# several of them compile (same HLO, flags and devices) is compiled once. A hit loads the same executable,
# so results, HLO and memory analysis are unchanged (only the HLO's source-line metadata may name the
# first caller), and jax still reports a backend compile for it, so the tests that count compiles count hits.
_OWN_CACHE = "JAX_COMPILATION_CACHE_DIR" not in os.environ
if _OWN_CACHE:
    os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="tedjax-tests-xla-cache-")
    os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
    os.environ["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"] = "0"

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")

import tedjax.host  # noqa: E402

tedjax.host.reuse_freed_host_memory()  # as train.py does on CPU


# Seconds per file on the 2-core VM (CI, xdist; --durations=0 of a full run summed per file, 2026-12-07, on an
# otherwise idle VM: 658 s in all, -n 2):
# the heaviest files start first, so that with `--dist loadfile` the last files to finish are short ones and
# neither worker waits long for the other.
# (xdist's default order, most tests first, started the 137 s file near the end.) Unlisted files (under 5 s)
# follow in their usual order; remeasure when a file grows.
HEAVY_FILES = {"test_perf_benchmarks_quick.py": 112, "test_ted_optimizations.py": 108, "test_dropless.py": 82,
               "test_zero.py": 81, "test_plan.py": 72, "test_notebooks.py": 71, "test_pipeline.py": 70,
               "test_faults.py": 69, "test_train.py": 67, "test_shadows_and_chunks.py": 66, "test_equivalence.py": 48,
               "test_multiprocess.py": 43, "test_hf.py": 40, "test_load_balance.py": 35, "test_examples.py": 30,
               "test_scan.py": 28, "test_generate.py": 27, "test_readme.py": 24, "test_one_reduction.py": 23,
               "test_routing.py": 22, "test_balance_decisions.py": 22, "test_peer_benchmark.py": 19,
               "test_topology.py": 16, "test_collectives.py": 16, "test_resume_guards.py": 15,
               "test_attention.py": 11, "test_plan_stages.py": 10, "test_host.py": 9, "test_tooling.py": 9,
               "test_input_checks.py": 8, "test_data.py": 7, "test_benchmarks_quick.py": 5, "test_moe_profile.py": 5}


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: a long test (still run in CI)")
    if hasattr(config.option, "loadscopereorder"):  # pytest-xdist: keep the order below
        config.option.loadscopereorder = False


def pytest_collection_modifyitems(config, items):
    files = list(dict.fromkeys(item.path for item in items))
    rank = {path: (-HEAVY_FILES.get(path.name, 0), i) for i, path in enumerate(files)}
    items.sort(key=lambda item: rank[item.path])  # stable: each file keeps its own order


def pytest_unconfigure(config):
    if _OWN_CACHE:
        shutil.rmtree(os.environ["JAX_COMPILATION_CACHE_DIR"], ignore_errors=True)
