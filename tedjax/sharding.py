"""Put your own Flax model on a TED mesh: the mesh context, sharding from Flax metadata, sharded creation.

Parameters declare their axes the Flax way (`nnx.with_partitioning`,
`out_sharding=`, Linen's `nn.with_logical_partitioning`); each name is a
logical axis of `tedjax.mesh.RULES` or a mesh axis. `use_mesh` sets the mesh
and the rules for Flax, `create_sharded` builds a model with every array
created in its sharding, `shard` moves an existing model or state there, and
`simulate_cpu_devices` gives a laptop the 8 devices the examples use.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import TypeVar

import jax
from flax import nnx
from jax.sharding import Mesh

from tedjax.host import reuse_freed_host_memory
from tedjax.mesh import flax_rules, state_shardings

T = TypeVar("T")


@contextlib.contextmanager
def use_mesh(mesh: Mesh) -> Iterator[Mesh]:
    """`jax.set_mesh(mesh)` plus Flax's logical-axis rules from `tedjax.mesh.RULES`.

    Inside it, Flax shards a parameter declared with logical names
    (`nnx.with_partitioning(init, ("embed", "ffn"))`) when it is created, instead
    of failing with "Resource axis: embed ... not found in mesh", and
    `nnx.get_partition_spec` / `nn.get_partition_spec` map logical names to mesh axes.
    """
    with jax.set_mesh(mesh), nnx.logical_axis_rules(flax_rules()):
        yield mesh


def create_sharded(create: Callable[[], T], mesh: Mesh, *, replicate_unannotated: bool = False) -> T:
    """`create()` (a model, or a tuple such as (model, optimizer)) with every array created in its sharding.

    Shapes come from `nnx.eval_shape`, shardings from each Variable's metadata
    (`tedjax.mesh.state_shardings`), and a jitted `create` writes each device's
    shard directly: no unsharded copy of any parameter ever exists.
    """
    with use_mesh(mesh):
        graphdef, abstract_state = nnx.split(nnx.eval_shape(create))
        shardings = state_shardings(abstract_state, mesh, replicate_unannotated=replicate_unannotated)
        state = jax.jit(lambda: nnx.split(create())[1], out_shardings=shardings)()
    return nnx.merge(graphdef, state)


def shard(model_or_state: T, mesh: Mesh, *, replicate_unannotated: bool = False) -> T:
    """Place an NNX model or optimizer (in place; also returned), an nnx State, or Linen variables on `mesh`.

    Each array goes where its Flax sharding metadata says (see
    `tedjax.mesh.param_spec`). An array with no metadata is an error that says
    how to declare it, unless `replicate_unannotated=True`.
    """
    with use_mesh(mesh):
        if isinstance(model_or_state, nnx.Pytree):
            state = nnx.state(model_or_state)
            shardings = state_shardings(state, mesh, replicate_unannotated=replicate_unannotated)
            nnx.update(model_or_state, jax.device_put(state, shardings))
            return model_or_state
        shardings = state_shardings(model_or_state, mesh, replicate_unannotated=replicate_unannotated)
        return jax.device_put(model_or_state, shardings)


def simulate_cpu_devices(n: int) -> None:
    """Run jax on `n` simulated CPU devices (a laptop stand-in for an n-accelerator host).

    Call it before jax starts its backends: right after the imports, before
    anything creates an array or asks for devices. It selects the CPU platform,
    so remove it to run on real accelerators. It also makes glibc keep freed
    memory for XLA:CPU's next step (`tedjax.host.reuse_freed_host_memory`).
    """
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise ValueError(f"simulate_cpu_devices needs a positive device count, got {n!r}")
    try:
        jax.config.update("jax_num_cpu_devices", n)
    except RuntimeError:
        devices = jax.devices()
        if devices[0].platform == "cpu" and len(devices) == n:
            return  # already so, e.g. set through XLA_FLAGS
        raise RuntimeError(
            f"simulate_cpu_devices({n}) came too late: jax has already started with {len(devices)} "
            f"{devices[0].platform} device(s). Call it before anything creates a jax array or asks for "
            f"devices (right after the imports), or start Python with "
            f"XLA_FLAGS=--xla_force_host_platform_device_count={n} JAX_PLATFORMS=cpu"
        ) from None
    jax.config.update("jax_platforms", "cpu")
    reuse_freed_host_memory()
