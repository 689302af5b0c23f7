"""Optimizer: optax AdamW, warmup + cosine, global-norm clipping, ZeRO-1 and the tiled update.

ZeRO-1. Each parameter's optimizer state (Adam's mu and nu) is split over the
parameter's data-parallel group (NOTES.md section 1): non-expert parameters
over ("data", "expert"), expert parameters over "data" alone (their "expert"
axis already splits the expert dim). Gradients are constrained to that layout
before the update, so XLA reduce-scatters them; the updated shard is
all-gathered back into the parameter's own layout. ZeRO 2 and 3 use the same
layout for the accumulated gradients and the stored parameters
(`optimizer.zero`, tedjax.trainer).

Tiled optimizer (TED). Expert state is split over E-times fewer ranks than the
rest, so the update's float32 temporaries of a big expert weight dominate the
step's memory. With `tile_size > 0`, every parameter larger than a tile is
updated inside `shard_map`, one tile of its local shard per `fori_loop` step,
in place in the donated state, so the temporaries are bounded by one tile. The
tiled update runs the same AdamW arithmetic as optax (checked against it in
tests) on the same state. What XLA does (benchmarks/tiled_optimizer.py): the
untiled optax update alone also fuses into in-place loops with no
E-proportional temporary; inside the train step, the skip of non-finite steps
(`where(finite, new, old)` over the state) forces copies of the old state,
which `tiled_adamw_update(..., finite=...)` avoids by skipping tile by tile.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from tedjax.config import DTYPES, OptimizerConfig
from tedjax.mesh import MESH_AXES, STAGE_AXIS


def learning_rate_schedule(cfg: OptimizerConfig, total_steps: int) -> optax.Schedule:
    """Step -> learning rate: linear warmup from 0, then `cfg.schedule` (see OptimizerConfig), from optax schedules."""
    warmup = min(cfg.warmup_steps, max(total_steps - 1, 0))
    peak, end = cfg.learning_rate, cfg.learning_rate * cfg.min_lr_ratio
    if cfg.schedule == "cosine":  # unchanged from before schedules were configurable: same numbers
        return optax.warmup_cosine_decay_schedule(
            init_value=0.0, peak_value=peak, warmup_steps=warmup, decay_steps=max(total_steps, warmup + 1),
            end_value=end,
        )  # fmt: skip
    after = max(total_steps - warmup, 1)  # steps after the warmup
    if cfg.schedule == "linear":
        rest = optax.linear_schedule(peak, end, after)
    elif cfg.schedule == "constant":
        rest = optax.constant_schedule(peak)
    elif cfg.schedule == "wsd":
        decay = min(round(cfg.decay_fraction * total_steps), after)
        stable = after - decay
        rest = (optax.constant_schedule(peak) if decay == 0 else optax.linear_schedule(peak, end, decay)
                if stable == 0 else optax.join_schedules(
                    [optax.constant_schedule(peak), optax.linear_schedule(peak, end, decay)], [stable]))  # fmt: skip
    elif cfg.schedule == "inverse_sqrt":
        scale = max(warmup, 1)
        rest = lambda count: peak * jnp.sqrt(scale / jnp.maximum(count + warmup, scale))  # noqa: E731
    else:  # OptimizerConfig refuses other names
        raise ValueError(f"unknown optimizer.schedule {cfg.schedule!r}")
    if not warmup:
        return rest
    return optax.join_schedules([optax.linear_schedule(0.0, peak, warmup), rest], [warmup])


def weight_decay_mask(params):
    """Decay matrices only: norms' scales (1-D) are not decayed. Under "units" (the scanned layers of
    `tedjax.model.Transformer`) every leaf has a leading "layers" axis, which does not count."""

    def decayed(path, p):
        stacked = bool(path) and getattr(path[0], "key", None) == "units"
        return p.ndim - stacked >= 2

    return jax.tree_util.tree_map_with_path(decayed, params)


def make_optimizer(cfg: OptimizerConfig, total_steps: int) -> optax.GradientTransformation:
    """AdamW with the schedule; clipping is applied by the train step (it needs the global norm)."""
    tx = optax.adamw(
        learning_rate_schedule(cfg, total_steps),
        b1=cfg.b1, b2=cfg.b2, eps=cfg.eps, weight_decay=cfg.weight_decay, mask=weight_decay_mask,
    )  # fmt: skip
    return tx if cfg.state_dtype == "float32" else _moments_stored_as(tx, DTYPES[cfg.state_dtype])


def _moments_stored_as(tx: optax.GradientTransformation, dtype) -> optax.GradientTransformation:
    """`tx` with Adam's mu and nu kept in `dtype` between steps; the update itself computes in float32
    (the stored moments are promoted by the float32 gradients) and rounds the new moments once."""

    def cast(state):
        def leaf(x):
            if isinstance(x, optax.ScaleByAdamState):
                to = lambda t: jax.tree.map(lambda a: a.astype(dtype), t)  # noqa: E731
                return x._replace(mu=to(x.mu), nu=to(x.nu))
            return x

        return jax.tree.map(leaf, state, is_leaf=lambda x: isinstance(x, optax.ScaleByAdamState))

    def update(updates, state, params=None):
        updates, state = tx.update(updates, state, params)
        return updates, cast(state)

    return optax.GradientTransformation(lambda params: cast(tx.init(params)), update)


def global_norm(tree) -> jax.Array:
    """sqrt(sum of squares) over the logical (global) arrays: each expert counted once, whatever the mesh."""
    return jnp.sqrt(sum(jnp.sum(jnp.square(x.astype(jnp.float32))) for x in jax.tree.leaves(tree)))


def clip_by_global_norm(grads, max_norm: float) -> tuple[object, jax.Array]:
    norm = global_norm(grads)
    if max_norm <= 0:
        return grads, norm
    scale = jnp.minimum(1.0, max_norm / jnp.maximum(norm, 1e-12))
    return jax.tree.map(lambda g: g * scale.astype(g.dtype), grads), norm


def _axes_of(entry) -> tuple[str, ...]:
    return () if entry is None else ((entry,) if isinstance(entry, str) else tuple(entry))


def zero1_spec(spec: PartitionSpec, shape: tuple[int, ...], mesh: Mesh) -> PartitionSpec:
    """The parameter's spec with its free data-parallel axes added to one dim they divide.

    Data-parallel axes are those of ("data", "expert") the parameter is not
    already split over. A parameter too small to divide stays as it is
    (replicated state); `zero1_report` counts those bytes.
    """
    entries = list(spec) + [None] * (len(shape) - len(spec))
    used = {a for e in entries for a in _axes_of(e)}
    dp_axes = tuple(a for a in ("data", "expert") if a not in used and mesh.shape[a] > 1)
    if not dp_axes:
        return PartitionSpec(*entries)
    # Try the whole group first, then "data" alone; prefer an unsplit dim.
    for axes in (dp_axes, dp_axes[:1]):
        size = math.prod(mesh.shape[a] for a in axes)
        order = sorted(range(len(shape)), key=lambda d: (entries[d] is not None, d))
        for dim in order:
            current = _axes_of(entries[dim])
            split = math.prod(mesh.shape[a] for a in current) * size
            if shape[dim] % split == 0:
                merged = tuple(a for a in (STAGE_AXIS, *MESH_AXES) if a in current + axes)  # mesh order
                entries[dim] = merged[0] if len(merged) == 1 else merged
                return PartitionSpec(*entries)
    return PartitionSpec(*entries)


def zero1_shardings(abstract_params, param_shardings, mesh: Mesh, enabled: bool = True):
    """Each parameter's optimizer-state layout: `zero1_spec` of its sharding (its own sharding if not enabled).

    Shared by `Trainer` and `tedjax.train_step_fn`; gradients constrained to it
    are reduce-scattered over each parameter's data-parallel group.
    """
    return jax.tree.map(
        lambda a, s: NamedSharding(mesh, zero1_spec(s.spec, a.shape, mesh) if enabled else s.spec),
        abstract_params,
        param_shardings,
    )


def zero1_update(tx: optax.GradientTransformation, grads, opt_state, params, zero1_shardings, param_shardings):
    """optax's update in the ZeRO-1 layout: (new params in `param_shardings`, new optimizer state).

    Gradients and parameters are constrained to the optimizer-state layout (a
    reduce-scatter of the gradients, a local slice of the parameters), the
    update runs on each device's shard, and the new parameters are constrained
    back to their own layout (an all-gather over the data-parallel group).
    """
    grads = jax.lax.with_sharding_constraint(grads, zero1_shardings)
    params = jax.lax.with_sharding_constraint(params, zero1_shardings)
    updates, opt_state = tx.update(grads, opt_state, params)
    new_params = jax.lax.with_sharding_constraint(optax.apply_updates(params, updates), param_shardings)
    return new_params, opt_state


def opt_state_shardings(tx: optax.GradientTransformation, abstract_params, param_shardings, mesh: Mesh, zero1: bool):
    """Shardings for `tx.init(params)`: param-shaped leaves follow ZeRO-1, scalars are replicated."""
    abstract_state = jax.eval_shape(tx.init, abstract_params)

    def for_param(abstract_leaf, sharding):
        spec = zero1_spec(sharding.spec, abstract_leaf.shape, mesh) if zero1 else sharding.spec
        return NamedSharding(mesh, spec)

    replicated = NamedSharding(mesh, PartitionSpec())
    return optax.tree_map_params(
        tx,
        for_param,
        abstract_state,
        param_shardings,
        transform_non_params=lambda _: replicated,
        is_leaf=lambda x: isinstance(x, NamedSharding),
    )


def tiled_adamw_update(
    cfg: OptimizerConfig,
    schedule: Callable,
    grads,
    opt_state,
    params,
    state_shardings,
    mesh: Mesh,
    finite: jax.Array | None = None,
    param_shardings=None,
):
    """optax.adamw's update, with every parameter bigger than a tile updated tile by tile.

    Returns (new_params, new_opt_state) in the same structure as optax. With
    `finite` (a bool scalar), a False skips the step inside the update: every
    tile keeps its old values and the counts do not advance. The caller can then
    drop its own `where(finite, new, old)` over the state, which would keep the
    whole old state alive next to the in-place update (an E-proportional copy).

    With `param_shardings`, the new parameters come back all-gathered into
    their own layout, each leaf once: an untiled leaf guards its update, not
    its value (`p + where(finite, delta, 0)`), because `where(finite, new, p)`
    before the gather makes XLA gather both operands.
    """
    adam_state, decay_state, sched_state = opt_state
    count = adam_state.count
    new_count = optax.safe_increment(count)
    guard = (lambda new, old: new) if finite is None else (lambda new, old: jnp.where(finite, new, old))  # noqa: E731
    lr = schedule(sched_state.count)
    bc1 = 1 - cfg.b1 ** new_count.astype(jnp.float32)
    bc2 = 1 - cfg.b2 ** new_count.astype(jnp.float32)
    decay_mask = weight_decay_mask(params)

    def moments(g, m, v):
        return cfg.b1 * m + (1 - cfg.b1) * g, cfg.b2 * v + (1 - cfg.b2) * jnp.square(g)

    def step_of(p, m, v, decay):
        step = (m / bc1) / (jnp.sqrt(v / bc2) + cfg.eps)
        return step + cfg.weight_decay * p if decay else step

    def new_param(p, m, v, decay):
        return p - lr * step_of(p, m, v, decay)

    def leaf_update(g, m, v, p, decay):
        # The parameter reads the moments as returned (guarded): recomputing them from the old
        # m and v would make XLA copy both to keep them alive across the in-place writes.
        new_m, new_v = moments(g, m, v)
        new_m, new_v = guard(new_m, m), guard(new_v, v)
        return guard(new_param(p, new_m, new_v, decay), p), new_m, new_v

    def tiled(g, m, v, p, decay):
        """Local shard update in place, one tile of `tile_size` elements per loop step.

        A fori_loop reads each tile with dynamic_slice and writes it back with
        dynamic_update_slice into the loop-carried (donated) buffers, so no
        full-size temporary exists. When the tile does not divide the shard, the
        last window is moved back to end at the shard's end and leaves the
        elements an earlier tile updated as they are (a mask, not a second pass:
        an update outside the loop would make XLA copy the buffers).
        """
        n, tile, shape = g.size, cfg.tile_size, g.shape
        if n <= tile:
            return leaf_update(g, m, v, p, decay)
        g, m, v, p = (x.reshape(-1) for x in (g, m, v, p))

        def body(i, carry):
            m, v, p = carry
            start = jnp.minimum(i * tile, n - tile)
            tile_of = lambda x: jax.lax.dynamic_slice_in_dim(x, start, tile)  # noqa: E731
            put = lambda x, t: jax.lax.dynamic_update_slice_in_dim(x, t, start, 0)  # noqa: E731
            fresh = True if n % tile == 0 else start + jnp.arange(tile) >= i * tile
            take = lambda new, old: jnp.where(fresh, guard(new, old), old)  # noqa: E731
            m_t, v_t = moments(tile_of(g), tile_of(m), tile_of(v))
            m, v = put(m, take(m_t, tile_of(m))), put(v, take(v_t, tile_of(v)))
            # Read the new moments back from the updated buffers: if the parameter update
            # recomputed them from the old m and v, XLA would copy both whole buffers to keep
            # the old values alive across the in-place writes.
            p_t = tile_of(p)
            return m, v, put(p, take(new_param(p_t, tile_of(m), tile_of(v), decay), p_t))

        m, v, p = jax.lax.fori_loop(0, -(-n // tile), body, (m, v, p))
        return p.reshape(shape), m.reshape(shape), v.reshape(shape)

    gather = param_shardings is not None

    def per_leaf(g, m, v, p, decay, sharding, param_sharding):
        if g.size <= cfg.tile_size:
            if not gather:
                return leaf_update(g, m, v, p, decay)
            # Guard the update, not the parameter: XLA would gather both operands of where(finite, new, p).
            new_m, new_v = moments(g, m, v)
            new_m, new_v = guard(new_m, m), guard(new_v, v)
            new_p = p - guard(lr * step_of(p, new_m, new_v, decay), jnp.zeros_like(p))
            return jax.lax.with_sharding_constraint(new_p, param_sharding), new_m, new_v
        spec = sharding.spec
        new_p, new_m, new_v = jax.shard_map(
            lambda g, m, v, p: tiled(g, m, v, p, decay),
            mesh=mesh,
            in_specs=(spec, spec, spec, spec),
            out_specs=(spec, spec, spec),
            check_vma=False,
        )(g, m, v, p)
        if gather:
            new_p = jax.lax.with_sharding_constraint(new_p, param_sharding)
        return new_p, new_m, new_v

    leaves_g, treedef = jax.tree.flatten(grads)
    results = [
        per_leaf(g, m, v, p, d, s, ps)
        for g, m, v, p, d, s, ps in zip(
            leaves_g,
            treedef.flatten_up_to(adam_state.mu),
            treedef.flatten_up_to(adam_state.nu),
            treedef.flatten_up_to(params),
            treedef.flatten_up_to(decay_mask),
            treedef.flatten_up_to(state_shardings),
            treedef.flatten_up_to(param_shardings) if gather else [None] * treedef.num_leaves,
        )
    ]
    new_params = treedef.unflatten([r[0] for r in results])
    new_mu = treedef.unflatten([r[1] for r in results])
    new_nu = treedef.unflatten([r[2] for r in results])
    new_adam = adam_state._replace(count=guard(new_count, count), mu=new_mu, nu=new_nu)
    new_sched = sched_state._replace(count=guard(optax.safe_increment(sched_state.count), sched_state.count))
    return new_params, (new_adam, decay_state, new_sched)
