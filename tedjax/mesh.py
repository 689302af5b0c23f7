"""The device mesh ("stage", "data", "expert", "tensor") and the one logical-to-mesh rule table.

Model code names *logical* axes ("batch", "experts", "ffn", ...) and never a mesh
axis. `RULES` maps each logical axis to the mesh axes it is split over; changing
the parallel layout means changing this table, not the model.

TED's groups on this mesh (NOTES.md section 1):
  non-expert params: split over "tensor", replicated over ("data", "expert")
  expert params:     split over "expert" (the expert dim) and "tensor"
                     (Megatron split inside each expert), replicated over "data"
  the batch:         split over ("data", "expert")
so the non-expert data-parallel group is G_data x G_expert. The outermost
"stage" axis (size 1 unless pipelining, tedjax.pipeline) splits the scanned
layers into pipeline stages; each stage is a whole TED mesh of its own.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import jax
import numpy as np
from flax import nnx
from flax.core import meta
from flax.core.spmd import get_logical_axis_rules
from flax.nnx import bridge
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "expert", "tensor")  # the TED axes, inside each pipeline stage
STAGE_AXIS = "stage"  # outermost; always present, size 1 without a pipeline (a size-1 axis moves no data)

# Logical axis -> mesh axes. None means replicated, on purpose. A logical name
# missing here is an error, never a silent replication.
RULES: dict[str, str | tuple[str, ...] | None] = {
    # activations
    "batch": ("data", "expert"),  # tokens of non-expert blocks
    "expert_batch": "data",  # routing groups while experts compute
    "length": None,
    "capacity": None,
    "act_stages": STAGE_AXIS,  # the pipeline's per-stage activation buffer [stages, mb, L, D]
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
    "shadow_experts": None,  # shadow copies of hot experts live on every device (FasterMoE)
    "norm": None,
    "layers": STAGE_AXIS,  # the leading axis of the scanned units' stacked variables: contiguous runs per stage
}


def make_mesh(
    data: int = 1,
    expert: int = 1,
    tensor: int = 1,
    devices: Sequence[jax.Device] | None = None,
    *,
    stage: int = 1,
) -> Mesh:
    """A ("stage", "data", "expert", "tensor") mesh with Auto axes, "tensor" innermost.

    Neighbouring device ids share a tensor group (NVLink peers on a GPU node),
    then an expert group, then data-parallel replicas, then a pipeline stage.
    """
    sizes = {"stage": stage, "data": data, "expert": expert, "tensor": tensor}
    for name, size in sizes.items():
        if not isinstance(size, (int, np.integer)) or isinstance(size, bool) or size < 1:
            raise ValueError(
                f"mesh axis {name!r} must be a positive integer, got {size!r}; "
                "set stage, data, expert and tensor to integers >= 1 whose product is the device count"
            )
    devices = list(jax.devices() if devices is None else devices)
    if not devices:
        raise ValueError("make_mesh got an empty device list; pass devices=None for all of jax.devices(), "
                         "or a non-empty list such as jax.devices()[:4]")
    wanted = stage * data * expert * tensor
    if wanted != len(devices):
        staged = f"stage={stage}, " if stage > 1 else ""
        raise ValueError(
            f"mesh ({staged}data={data}, expert={expert}, tensor={tensor}) needs {wanted} devices "
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
    grid = np.array(devices, dtype=object).reshape(stage, data, expert, tensor)
    return Mesh(grid, (STAGE_AXIS, *MESH_AXES), axis_types=(AxisType.Auto,) * 4)


def resolve_node_size(mesh: Mesh, node_size: int = 0) -> int:
    """Devices per node of `mesh`: `node_size` if set, else (0) the devices of one process (host).

    Simulated CPU devices all sit in one process: set `mesh.node_size` to
    simulate nodes. The value is checked against the mesh (`expert_nodes`).
    """
    devices = list(np.asarray(mesh.devices).flat)
    if not node_size:
        per_process: dict[int, int] = {}
        for d in devices:
            per_process[d.process_index] = per_process.get(d.process_index, 0) + 1
        node_size = max(per_process.values())
    expert_nodes(mesh_shape(mesh), node_size)
    return int(node_size)


def expert_nodes(sizes: Sequence[int], node_size: int) -> int:
    """How many nodes the "expert" axis spans on a (data, expert, tensor) mesh with `node_size` devices
    per node (1 when a node holds the whole expert axis, or `node_size` is 0).

    make_mesh numbers devices tensor-innermost, then expert, then data, and
    nodes are blocks of `node_size` consecutive devices, so a node holds whole
    tensor groups and contiguous expert ranks. With data > 1 and node_size >=
    expert x tensor a node holds whole expert groups (its all-to-alls stay
    inside it); below that the expert axis spans expert x tensor / node_size
    nodes. Anything else is refused: it would split a tensor group or make
    nodes hold unequal shares of the expert axis.
    """
    data, expert, tensor = (int(v) for v in sizes)
    if isinstance(node_size, (int, np.integer)) and not isinstance(node_size, bool) and node_size == 0:
        return 1
    span, total = expert * tensor, data * expert * tensor
    integer = isinstance(node_size, (int, np.integer)) and not isinstance(node_size, bool) and node_size > 0
    # (a node may hold several stages' meshes whole: node_size a multiple of total)
    fits = integer and node_size % tensor == 0 and (total % node_size == 0 or node_size % total == 0) and (
        span % node_size == 0 or node_size % span == 0)
    if not fits:
        divisors = [n for n in range(tensor, total + 1, tensor)
                    if total % n == 0 and (span % n == 0 or n % span == 0)]
        raise ValueError(
            f"mesh.node_size={node_size!r} does not fit the mesh (data={data}, expert={expert}, tensor={tensor}): "
            f"a node must hold whole tensor groups and either a whole expert group (expert x tensor = {span} "
            f"devices, or a multiple of it) or an equal share of it; set mesh.node_size to one of {divisors} "
            "(0 = the devices of one host)")
    return max(1, span // node_size)


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


def stage_count(mesh: Mesh) -> int:
    """Pipeline stages of `mesh`: its "stage" axis, 1 for a mesh without one."""
    return int(dict(mesh.shape).get(STAGE_AXIS, 1))


def axis_size(mesh: Mesh, logical_name: str) -> int:
    """How many ways a logical axis is split on `mesh`."""
    target = RULES[logical_name]
    axes = (target,) if isinstance(target, str) else tuple(target or ())
    return math.prod(int(mesh.shape[a]) for a in axes)


def flax_rules() -> tuple[tuple[str, str | tuple[str, ...] | None], ...]:
    """`RULES` as Flax logical-axis rules, for `nnx.logical_axis_rules` / `nn.logical_to_mesh_sharding`.

    Each mesh axis also maps to itself, so a spec that already names mesh axes
    (`nn.Partitioned`, `nnx.with_partitioning(init, ("tensor", None))`) passes
    through Linen's rule matching instead of being silently replicated.
    """
    return tuple(RULES.items()) + tuple((axis, axis) for axis in (STAGE_AXIS, *MESH_AXES))


def axes_metadata(logical_axes: Sequence[str | None]) -> dict:
    """Variable metadata declaring logical axes the Flax way: `nnx.Param(value, **axes_metadata(axes))`.

    `out_sharding` is Flax's own key (what `nnx.with_partitioning` sets and
    `nnx.get_partition_spec` reads). `eager_sharding=False` keeps Flax from
    sharding the value at creation, which fails outside a mesh and on logical
    names without a rules context; `tedjax.layers.param` constrains it itself.
    `logical_axes` repeats the names for code that reads `variable.logical_axes`.
    """
    axes = tuple(logical_axes)
    return {"out_sharding": axes, "eager_sharding": False, "logical_axes": axes}


_HOW_TO_DECLARE = (
    "Declare axes the Flax way: nnx.with_partitioning(init, ('embed', 'ffn')) or "
    "nnx.Param(value, out_sharding=(...)) in NNX, nn.with_logical_partitioning(init, (...)) in Linen, "
    "with logical axes of tedjax.mesh.RULES or mesh axes; or pass replicate_unannotated=True to "
    "replicate such arrays on purpose"
)


class UndeclaredShardingError(ValueError):
    """An array with more than 0 dims and no sharding metadata (and replication not asked for)."""


def _declared(leaf) -> tuple[tuple | None, dict]:
    """(declared axis names or None, the leaf's own logical rules) of an nnx Variable or a Linen box."""
    if isinstance(leaf, nnx.Variable):
        metadata = leaf.get_metadata()
    elif isinstance(leaf, bridge.NNXMeta):
        metadata = leaf.metadata
    elif isinstance(leaf, meta.Partitioned):  # nn.Partitioned and nn.LogicallyPartitioned
        metadata = {"out_sharding": leaf.names, "sharding_rules": getattr(leaf, "rules", None)}
    else:
        return None, {}
    names = metadata.get("out_sharding") or metadata.get("logical_axes")
    if isinstance(names, NamedSharding):
        names = names.spec
    return (None if names is None else tuple(names)), dict(metadata.get("sharding_rules") or ())


def _mesh_axes(name: str, local: dict, context: dict, mesh_axes: Sequence[str], where: str) -> tuple[str, ...]:
    """The mesh axes one declared name stands for: RULES, then the leaf's own rules, Flax's context rules,
    and finally a mesh axis of that name."""
    if name in RULES:
        if name in local and _axes_of(local[name]) != _axes_of(RULES[name]):
            raise ValueError(
                f"{where}: its sharding_rules map logical axis {name!r} to {local[name]!r} but "
                f"tedjax.mesh.RULES maps it to {RULES[name]!r}; rename the axis or drop the local rule"
            )
        return _axes_of(RULES[name])
    for rules in (local, context):
        if name in rules:
            return _axes_of(rules[name])
    if name in mesh_axes:
        return (name,)
    raise KeyError(
        f"{where}: axis {name!r} is neither a logical axis of tedjax.mesh.RULES (known: {sorted(RULES)}) "
        f"nor a mesh axis {tuple(mesh_axes)}; add it to RULES or name mesh axes directly"
    )


def _axes_of(target) -> tuple[str, ...]:
    return () if target is None else ((target,) if isinstance(target, str) else tuple(target))


def param_spec(
    leaf, mesh: Mesh | None = None, *, replicate_unannotated: bool = False, where: str = "parameter"
) -> PartitionSpec:
    """PartitionSpec of an nnx Variable, a Linen box or a plain array, from Flax's own sharding metadata.

    Reads `out_sharding` (`nnx.with_partitioning`, `nnx.Param(..., out_sharding=)`,
    tedjax's `param`), Linen's `nn.with_partitioning` / `nn.with_logical_partitioning`
    boxes and bridged NNX variables. Each name is a logical axis of `RULES` or
    a mesh axis (passed through). RNG state and scalars are replicated. Any
    other array without metadata is an error unless `replicate_unannotated`.
    """
    names, local = _declared(leaf)
    value = leaf.get_value() if isinstance(leaf, nnx.Variable) else getattr(leaf, "value", leaf)
    shape = tuple(getattr(value, "shape", ()))
    if names is None:
        if isinstance(leaf, nnx.RngState) or not shape or replicate_unannotated:
            return PartitionSpec()
        raise UndeclaredShardingError(f"{where} of shape {shape} has no sharding metadata. {_HOW_TO_DECLARE}")
    if shape and len(names) > len(shape):
        raise ValueError(f"{where}: sharding {names} has more entries than its shape {shape} has dims")
    context = dict(get_logical_axis_rules() or ())
    mesh_axes = tuple(mesh.axis_names) if mesh is not None else MESH_AXES
    # "layers" splits over "stage" only when there are stages: at stage 1 (or without a mesh, as the planner
    # reads specs) every sharding, and so every program, is the one of a mesh without the axis
    staged = STAGE_AXIS in mesh_axes and int(dict(mesh.shape).get(STAGE_AXIS, 1)) > 1
    spec, used = [], []
    for entry in names:
        parts = () if entry is None or entry is PartitionSpec.UNCONSTRAINED else _axes_of(entry)
        axes = tuple(a for name in parts for a in _mesh_axes(name, local, context, mesh_axes, where)
                     if a != STAGE_AXIS or staged)
        for axis in axes:
            if axis in used:
                raise ValueError(f"{where}: sharding {names} puts mesh axis {axis!r} on two dims")
            used.append(axis)
        spec.append(None if not axes else axes[0] if len(axes) == 1 else axes)
    return PartitionSpec(*spec)


def _is_sharding_leaf(x) -> bool:
    return isinstance(x, (nnx.Variable, meta.AxisMetadata))


def state_shardings(tree, mesh: Mesh, *, replicate_unannotated: bool = False):
    """NamedShardings for a tree of nnx Variables (an nnx State, abstract or concrete), Linen variables
    (boxed or bridged) or optimizer state: the same tree with each Variable, box or array replaced.

    See `param_spec` for how each leaf's sharding is read.
    """
    undeclared = []

    def one(path, leaf):
        kind = type(leaf).__name__ if _is_sharding_leaf(leaf) else "array"
        where = f"{kind} at {jax.tree_util.keystr(path)}"
        try:
            spec = param_spec(leaf, mesh, replicate_unannotated=replicate_unannotated, where=where)
        except UndeclaredShardingError:
            undeclared.append(f"{where} {tuple(getattr(leaf, 'shape', ()))}")
            spec = PartitionSpec()
        return NamedSharding(mesh, spec)

    shardings = jax.tree_util.tree_map_with_path(one, tree, is_leaf=_is_sharding_leaf)
    if undeclared:  # all of them at once, so one edit fixes the model
        listed = ", ".join(undeclared[:8]) + (f" and {len(undeclared) - 8} more" if len(undeclared) > 8 else "")
        raise UndeclaredShardingError(
            f"{len(undeclared)} array(s) have no sharding metadata: {listed}. {_HOW_TO_DECLARE}"
        )
    return shardings
