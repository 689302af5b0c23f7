"""The TED device mesh ("data", "expert", "tensor") and the one logical-to-mesh rule table.

Model code names *logical* axes ("batch", "experts", "ffn", ...) and never a mesh
axis. `RULES` maps each logical axis to the mesh axes it is split over; changing
the parallel layout means changing this table, not the model.

TED's groups on this mesh (NOTES.md section 1):
  non-expert params: split over "tensor", replicated over ("data", "expert")
  expert params:     split over "expert" (the expert dim) and "tensor"
                     (Megatron split inside each expert), replicated over "data"
  the batch:         split over ("data", "expert")
so the non-expert data-parallel group is G_data x G_expert.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "expert", "tensor")

# Logical axis -> mesh axes. None means replicated, on purpose. A logical name
# missing here is an error, never a silent replication.
RULES: dict[str, str | tuple[str, ...] | None] = {
    # activations
    "batch": ("data", "expert"),  # tokens of non-expert blocks
    "expert_batch": "data",  # routing groups while experts compute
    "length": None,
    "capacity": None,
    "capacity_dtd": "tensor",  # DTD: each tensor rank carries 1/tensor of the slots
    "act_embed": None,
    "act_heads": "tensor",
    "act_ffn": "tensor",
    "act_vocab": "tensor",
    # parameters
    "experts": "expert",
    "embed": None,
    "heads": "tensor",
    "head_dim": None,
    "ffn": "tensor",
    "vocab": "tensor",
    "router_experts": None,  # every rank scores every expert
    "norm": None,
}


def make_mesh(
    data: int = 1,
    expert: int = 1,
    tensor: int = 1,
    devices: Sequence[jax.Device] | None = None,
) -> Mesh:
    """A ("data", "expert", "tensor") mesh with Auto axes, "tensor" innermost.

    Neighbouring device ids share a tensor group (NVLink peers on a GPU node),
    then an expert group, then data-parallel replicas.
    """
    sizes = {"data": data, "expert": expert, "tensor": tensor}
    for name, size in sizes.items():
        if not isinstance(size, (int, np.integer)) or isinstance(size, bool) or size < 1:
            raise ValueError(
                f"mesh axis {name!r} must be a positive integer, got {size!r}; "
                "set data, expert and tensor to integers >= 1 whose product is the device count"
            )
    devices = list(jax.devices() if devices is None else devices)
    wanted = data * expert * tensor
    if wanted != len(devices):
        raise ValueError(
            f"mesh (data={data}, expert={expert}, tensor={tensor}) needs {wanted} devices "
            f"but {len(devices)} are given ({devices[0].platform}); choose sizes whose "
            f"product is {len(devices)}"
            + (
                " or run on CPU with XLA_FLAGS=--xla_force_host_platform_device_count="
                f"{wanted} set before jax is imported"
                if devices[0].platform == "cpu" and wanted > len(devices)
                else ""
            )
        )
    # Sorting by (process, id) keeps each host's devices contiguous, so the
    # innermost axes ("tensor", then "expert") stay inside a host when possible.
    devices = sorted(devices, key=lambda d: (d.process_index, d.id))
    grid = np.array(devices, dtype=object).reshape(data, expert, tensor)
    return Mesh(grid, MESH_AXES, axis_types=(AxisType.Auto,) * 3)


def logical_to_spec(logical_axes: Sequence[str | None]) -> PartitionSpec:
    """PartitionSpec for a tuple of logical axis names (None = replicated dim).

    Raises if a name is unknown or two dims would use the same mesh axis.
    """
    spec, used = [], []
    for name in logical_axes:
        if name is None:
            spec.append(None)
            continue
        if name not in RULES:
            raise KeyError(
                f"logical axis {name!r} has no rule in tedjax.mesh.RULES; add it "
                f"(known: {sorted(RULES)})"
            )
        target = RULES[name]
        axes = (target,) if isinstance(target, str) else tuple(target or ())
        for axis in axes:
            if axis in used:
                raise ValueError(
                    f"logical axes {tuple(logical_axes)} put mesh axis {axis!r} on two dims"
                )
            used.append(axis)
        spec.append(target)
    return PartitionSpec(*spec)


def named_sharding(mesh: Mesh, logical_axes: Sequence[str | None]) -> NamedSharding:
    return NamedSharding(mesh, logical_to_spec(logical_axes))


def constrain(x: jax.Array, logical_axes: Sequence[str | None]) -> jax.Array:
    """with_sharding_constraint by logical axes; a no-op when no mesh is set."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or not set(MESH_AXES) <= set(mesh.axis_names):
        return x
    return jax.lax.with_sharding_constraint(x, logical_to_spec(logical_axes))


def mesh_shape(mesh: Mesh) -> tuple[int, int, int]:
    """(data, expert, tensor) sizes of a TED mesh."""
    return tuple(int(mesh.shape[a]) for a in MESH_AXES)  # type: ignore[return-value]


def axis_size(mesh: Mesh, logical_name: str) -> int:
    """How many ways a logical axis is split on `mesh`."""
    target = RULES[logical_name]
    axes = (target,) if isinstance(target, str) else tuple(target or ())
    return math.prod(int(mesh.shape[a]) for a in axes)


def param_spec(variable) -> PartitionSpec:
    """PartitionSpec of an nnx Variable from its `logical_axes` metadata (required on every Param)."""
    axes = getattr(variable, "logical_axes", None)
    if axes is None:
        raise ValueError(
            f"parameter of shape {getattr(variable, 'shape', '?')} has no logical_axes; create it with "
            "tedjax.layers.param(...) so its sharding is declared"
        )
    return logical_to_spec(axes)


def state_shardings(state, mesh: Mesh):
    """NamedShardings for an nnx State (abstract or concrete) from each Variable's logical axes."""
    from flax import nnx

    def one(variable):
        if isinstance(variable, nnx.Variable) and getattr(variable, "logical_axes", None) is not None:
            return NamedSharding(mesh, param_spec(variable))
        return NamedSharding(mesh, PartitionSpec())

    return jax.tree.map(one, state, is_leaf=lambda x: isinstance(x, nnx.Variable))
