"""tedjax.host: glibc keeps freed memory, so XLA:CPU's per-step temporaries stop page-faulting."""

import ctypes.util
import subprocess
import sys
import textwrap

import pytest

# Minor page faults per call of an expert FFN's forward and backward on 8 CPU devices
# (2560 rows each, like the top-2 layer of benchmarks/peer_deepspeed.py): XLA allocates each
# device's ~33 MiB of temporaries afresh on every call, above glibc's mmap threshold.
_PROBE = textwrap.dedent("""
    import resource, sys
    import jax, jax.numpy as jnp
    from jax.sharding import NamedSharding, PartitionSpec as P
    import tedjax.host
    jax.config.update("jax_num_cpu_devices", 8)
    applied = tedjax.host.reuse_freed_host_memory() if sys.argv[1] == "reuse" else None
    mesh = jax.make_mesh((8,), ("x",))
    def loss(w, x):
        ffn = lambda w, x: jax.nn.gelu(x @ w[0]) @ w[0].T
        return jnp.sum(jax.shard_map(ffn, mesh=mesh, in_specs=(P("x"), P("x")), out_specs=P("x"))(w, x) ** 2)
    f = jax.jit(jax.grad(loss))
    x = jax.device_put(jnp.ones((8 * 2560, 256)), NamedSharding(mesh, P("x")))
    w = jax.device_put(jnp.ones((8, 256, 1024)) * 0.01, NamedSharding(mesh, P("x")))
    for _ in range(2):  # compile, then one call that leaves its freed temporaries to the allocator
        f(w, x).block_until_ready()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(3):  # (each call is ~30 GFLOP: the calls, not the compile, are most of this test's time)
        f(w, x).block_until_ready()
    print(applied, (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 3)
""")


def _faults_per_call(mode: str) -> tuple[str, float]:
    out = subprocess.run([sys.executable, "-c", _PROBE, mode], capture_output=True, text=True, check=True,
                         env={"JAX_PLATFORMS": "cpu", "PATH": "/usr/bin:/bin"})
    applied, faults = out.stdout.split()
    return applied, float(faults)


@pytest.mark.skipif(not ctypes.util.find_library("c") or sys.platform != "linux", reason="glibc's mallopt only")
def test_reuse_freed_host_memory_stops_the_page_faults_of_each_call():
    applied, reused = _faults_per_call("reuse")
    _, default = _faults_per_call("default")
    assert applied == "True"
    # 8 x 33 MiB of temporaries are ~68k pages: the default allocator faults in nearly all of them
    assert default > 40_000, f"expected the default allocator to fault the temporaries in, saw {default:.0f}/call"
    # measured: ~70k without, 0.5k-6k with the setting
    assert reused < default / 5, f"{reused:.0f} page faults per call with the setting, {default:.0f} without"


def test_reuse_freed_host_memory_is_idempotent_and_public():
    import tedjax

    assert tedjax.host.reuse_freed_host_memory() == tedjax.host.reuse_freed_host_memory()
