"""Pipeline parallelism over the mesh's "stage" axis: GPipe and circular schedules as one SPMD loop.

The schedule knows nothing of transformers. It takes a function applying one
unit (a layer, or a (dense, MoE) pair) `unit_fn(unit_params, x_bld) ->
(x_bld, stats)`, the units' parameters stacked `[U, ...]` and the input split
into microbatches `[M, mb, L, D]`, and returns the outputs `[M, mb, L, D]`
and each unit's `stats` summed over the microbatches.

How it runs (NOTES.md section 10). A state buffer `[S, mb, L, D]`, split
over "stage", holds each stage's activation. Every iteration of one
`lax.scan` applies every stage's units at once (`vmap` over the stage dim
with `spmd_axis_name`, so each device computes only its own stage), then
rolls the buffer by one stage: XLA turns that roll into one
collective-permute of a microbatch's activations. Stage 0 takes a fresh
microbatch, or, in the circular schedule, one back from the last stage for
its next repeat. Stage s works at iteration t on item i = t - s (microbatch
i % M, repeat i // M); items outside [0, M R) are bubble iterations, whose
results are masked out of the outputs and the statistics. There is no
hand-written backward: the loop is an ordinary differentiable JAX program,
so `jax.grad` runs it in reverse (the roll's transpose is the roll the
other way, another collective-permute), and `jax.checkpoint` around each
stage iteration keeps only the stage inputs of each iteration.

Parameter order. With `repeats` R > 1 (circular), stage s holds R
non-adjacent runs of K = U / (S R) units: repeat r, stage s runs logical
units r S K + s K + [0, K). So that each stage's units are one contiguous
block of the stacked `[U, ...]` parameters (and the "stage" split of the
leading "layers" dim moves no weights), the stacked parameters are kept in
*stage-major* order: slot s R K + r K + k holds logical unit r S K + s K + k.
`to_stage_major` / `to_logical` convert; a Trainer keeps its state in
`stored_order` (stage-major for the circular schedule, so no step moves a
weight), while checkpoints keep logical order, so they restore onto any
stage count (`reorder_units`). With R = 1 (GPipe) both orders agree.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec

from tedjax.mesh import MESH_AXES, RULES, constrain

SCHEDULES = ("gpipe", "circular")


# ---------------------------------------------------------------- the schedule as a table (host side, pure)


def schedule_table(stages: int, microbatches: int, repeats: int = 1) -> np.ndarray:
    """int `[T, S]`: the item stage s works on at iteration t, or -1 when it idles (a bubble).

    Item i is microbatch i % M in its repeat i // M. T = M R + S - 1. The
    circular schedule (R > 1) needs M >= S, so that a microbatch is back from
    the last stage before stage 0 needs it for its next repeat.
    """
    _check_counts(stages, microbatches, repeats)
    t = np.arange(microbatches * repeats + stages - 1)[:, None]
    items = t - np.arange(stages)[None, :]
    return np.where((items >= 0) & (items < microbatches * repeats), items, -1)


def idle_fraction(stages: int, microbatches: int, repeats: int = 1) -> float:
    """Fraction of stage-iterations of the schedule that compute nothing, counted from `schedule_table`."""
    return float(np.mean(schedule_table(stages, microbatches, repeats) < 0))


def bubble_fraction(stages: int, microbatches: int, repeats: int = 1, schedule: str = "gpipe") -> float:
    """The textbook bubble: (S-1)/(M+S-1) for GPipe; (S-1)/(R M+S-1) for circular, whose iterations are 1/R as long.

    A fraction of the step time with every iteration equally long (GPipe:
    Huang et al. 2019; interleaved: Narayanan et al. 2021).
    """
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule must be one of {SCHEDULES}, got {schedule!r}")
    r = repeats if schedule == "circular" else 1
    _check_counts(stages, microbatches, r)
    return (stages - 1) / (r * microbatches + stages - 1)


def _check_counts(stages: int, microbatches: int, repeats: int) -> None:
    for name, value in (("stages", stages), ("microbatches", microbatches), ("repeats", repeats)):
        if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < 1:
            raise ValueError(f"pipeline {name} must be a positive integer, got {value!r}")
    if microbatches < stages:
        raise ValueError(f"{microbatches} microbatches cannot fill {stages} stages; set pipeline.microbatches >= "
                         f"mesh.stage = {stages} (or 0, which means {stages})")


# ---------------------------------------------------------------- parameter order


def stage_major_order(units: int, stages: int, repeats: int = 1) -> np.ndarray:
    """int `[U]`: the logical unit held by each stage-major slot (slot s R K + r K + k holds r S K + s K + k)."""
    if units % (stages * repeats):
        raise ValueError(f"{units} scanned units do not split into {stages} stages x {repeats} repeats; choose "
                         f"mesh.stage x pipeline.repeats dividing {units}")
    k = units // (stages * repeats)
    return np.arange(units).reshape(repeats, stages, k).transpose(1, 0, 2).reshape(-1)


def to_stage_major(tree: Any, stages: int, repeats: int = 1) -> Any:
    """Stacked `[U, ...]` leaves from logical to stage-major order (identity for R = 1)."""
    return _permute(tree, stages, repeats, inverse=False)


def to_logical(tree: Any, stages: int, repeats: int = 1) -> Any:
    """Stacked `[U, ...]` leaves from stage-major back to logical order (identity for R = 1)."""
    return _permute(tree, stages, repeats, inverse=True)


def _permute(tree: Any, stages: int, repeats: int, inverse: bool) -> Any:
    if repeats == 1:
        return tree

    def one(a):
        order = stage_major_order(a.shape[0], stages, repeats)
        return jnp.take(a, np.argsort(order) if inverse else order, axis=0)

    return jax.tree.map(one, tree)


def stored_order(stages: int, schedule: str, repeats: int) -> tuple[int, int]:
    """(S, R) of the stage-major order a train state keeps its stacked units in; (1, 1) is logical order.

    The circular schedule's on a mesh with stages, so that each stage's runs are its contiguous block of the
    "layers" dim and no step moves weights; otherwise logical order (GPipe's stage-major order is logical).
    """
    return (stages, repeats) if stages > 1 and schedule == "circular" and repeats > 1 else (1, 1)


def storage_slot(unit: int, units: int, order: tuple[int, int]) -> int:
    """The slot of the stacked `[U, ...]` leaves holding logical unit `unit` in stored `order` (S, R)."""
    return int(np.argsort(stage_major_order(units, *order))[unit])


def reorder_units(tree: Any, source: tuple[int, int], target: tuple[int, int]) -> Any:
    """`tree` with every dict's "units" subtree (stacked `[U, ...]` leaves: parameters, Adam moments, model
    state) moved from stored order `source` (S, R) to `target`; (1, 1) is logical order."""
    if source == target:
        return tree

    def move(d):
        return {**d, "units": to_stage_major(to_logical(d["units"], *source), *target)}

    holds_units = lambda x: isinstance(x, dict) and "units" in x  # noqa: E731
    return jax.tree.map(lambda x: move(x) if holds_units(x) else x, tree, is_leaf=holds_units)


def reorder_state(tree: Any, source: tuple[int, int], target: tuple[int, int]) -> Any:
    """`reorder_units` of device arrays, jitted, each leaf kept in its sharding (over "stage", a collective)."""
    if source == target:
        return tree
    shardings = jax.tree.map(lambda a: a.sharding, tree)
    return jax.jit(functools.partial(reorder_units, source=source, target=target), out_shardings=shardings)(tree)


# ---------------------------------------------------------------- the SPMD loop


def run(
    unit_fn: Callable[[Any, jax.Array], tuple[jax.Array, Any]],
    params_u: Any,
    x_mbld: jax.Array,
    *,
    stages: int,
    repeats: int = 1,
    remat_policy: Callable | None = None,
) -> tuple[jax.Array, Any]:
    """Run `microbatches` M = x.shape[0] microbatches through `stages` S stages of the stacked units.

    unit_fn: `(unit_params, x [mb, L, D]) -> (x [mb, L, D], stats)`, stats any
        pytree of arrays (may be empty).
    params_u: pytree of `[U, ...]` arrays in stage-major order (`to_stage_major`),
        U divisible by S R; the leading dim is split over "stage".
    x_mbld: `[M, mb, L, D]`, M >= S.
    remat_policy: a `jax.checkpoint` policy applied per stage iteration, or None.
    Returns (y `[M, mb, L, D]`, stats stacked `[U, ...]` in logical order, each
    summed over the M microbatches; bubble iterations add nothing).
    """
    units = jax.tree.leaves(params_u)[0].shape[0]
    micro = x_mbld.shape[0]
    stage_major_order(units, stages, repeats)  # raises if U does not split
    table = schedule_table(stages, micro, repeats)
    k = units // (stages * repeats)
    axis = _stage_axis()
    split = lambda a: a.reshape(stages, repeats, k, *a.shape[1:])  # noqa: E731  stage-major: a free reshape
    params_srk = jax.tree.map(lambda a: _on_stages(split(a), axis), params_u)

    def stage_fn(p_rk, repeat, x_bld):
        """One stage's K units of its current repeat: `[mb, L, D] -> ([mb, L, D], stats [K, ...])`."""
        p_k = jax.tree.map(lambda a: a[0] if repeats == 1 else jax.lax.dynamic_index_in_dim(a, repeat, 0, False),
                           p_rk)
        return jax.lax.scan(lambda x, p: unit_fn(p, x), x_bld, p_k)

    if remat_policy is not None:
        stage_fn = jax.checkpoint(stage_fn, policy=remat_policy)
    all_stages = jax.vmap(stage_fn, spmd_axis_name=axis)

    act = ("act_stages", "batch", "length", "act_embed")
    state = constrain(jnp.zeros((stages, *x_mbld.shape[1:]), x_mbld.dtype), act)
    # Each stage keeps a copy of the M microbatches; only stage 0's row is read: fresh inputs, then what comes
    # back from the last stage for the next repeat, then the outputs. A per-stage row keeps every write local.
    buf = constrain(jnp.broadcast_to(x_mbld[None], (stages, *x_mbld.shape)), (act[0], None, *act[1:]))
    stats_shape = jax.eval_shape(lambda: all_stages(params_srk, jnp.zeros(stages, jnp.int32), state)[1])
    acc = jax.tree.map(lambda s: jnp.zeros((s.shape[0], repeats, *s.shape[1:]), s.dtype), stats_shape)
    items_ts = jnp.asarray(table, jnp.int32)
    done_t = jnp.asarray(np.concatenate([[-1], table[:, -1]]), jnp.int32)  # item the last stage finished at t-1
    fresh_t = jnp.asarray(np.maximum(table[:, 0], 0) % micro, jnp.int32)  # stage 0's slot (a scalar: no stage split)

    def store(buf, shifted, done):
        """Row 0 of `shifted` is the last stage's finished item `done` (if any): keep it for its next repeat."""
        slot = jnp.maximum(done, 0) % micro
        old = jax.lax.dynamic_index_in_dim(buf, slot, 1, keepdims=False)
        new = jnp.where(done >= 0, shifted, old)
        return jax.lax.dynamic_update_index_in_dim(buf, new, slot, 1)

    def iteration(carry, t):
        state, buf, acc = carry
        shifted = constrain(_shift(state), act)  # stage s-1 -> s: one collective-permute
        buf = store(buf, shifted, done_t[t])
        items = items_ts[t]
        fresh = jax.lax.dynamic_index_in_dim(buf, fresh_t[t], 1, keepdims=False)
        first = (jnp.arange(stages) == 0)[:, None, None, None]
        x_in = constrain(jnp.where(first, fresh, shifted), act)
        repeat = jnp.clip(items // micro, 0, repeats - 1)
        state, stats = all_stages(params_srk, repeat, x_in)
        active = items >= 0

        def add(acc_rk, s_k):
            mask = active.reshape(-1, *([1] * (s_k.ndim - 1)))
            s_k = jnp.where(mask, s_k, jnp.zeros_like(s_k))  # a bubble's statistics are dropped, NaN or not
            onehot = jax.nn.one_hot(repeat, repeats, dtype=s_k.dtype)
            return acc_rk + jnp.einsum("sr,sk...->srk...", onehot, s_k)

        return (state, buf, jax.tree.map(add, acc, stats)), None

    (state, buf, acc), _ = jax.lax.scan(iteration, (state, buf, acc), jnp.arange(table.shape[0]))
    buf = store(buf, constrain(_shift(state), act), jnp.asarray(table[-1, -1], jnp.int32))
    y_mbld = constrain(buf[0], (None, *act[1:]))
    stats_u = jax.tree.map(lambda a: jnp.swapaxes(a, 0, 1).reshape(units, *a.shape[3:]), acc)  # logical order
    return y_mbld, stats_u


def run_batch(
    unit_fn: Callable[[Any, jax.Array], tuple[jax.Array, Any]],
    params_u: Any,
    x_bld: jax.Array,
    *,
    stages: int,
    microbatches: int,
    repeats: int = 1,
    remat_policy: Callable | None = None,
) -> tuple[jax.Array, Any]:
    """`run` on a batch `[B, L, D]`: split into `microbatches` of B/M rows, run, put back; stats averaged.

    Microbatch m takes rows m, m+M, m+2M, ...: with the batch split over
    ("data", "expert") in contiguous blocks, every device keeps its own rows
    (B must divide by M x data x expert, as `config.check_pipeline` requires).
    Returns (y `[B, L, D]`, stats `[U, ...]` in logical order, the mean over
    microbatches: per-group means of equal-sized microbatches average to the
    whole batch's).
    """
    batch = x_bld.shape[0]
    if batch % microbatches:
        raise ValueError(f"a batch of {batch} rows does not split into {microbatches} microbatches; use a batch "
                         f"size that is a multiple of pipeline.microbatches={microbatches}")
    act = ("batch", "length", "act_embed")
    x_mbld = x_bld.reshape(batch // microbatches, microbatches, *x_bld.shape[1:]).swapaxes(0, 1)
    y_mbld, stats_u = run(unit_fn, params_u, constrain(x_mbld, (None, *act)), stages=stages, repeats=repeats,
                          remat_policy=remat_policy)
    y_bld = constrain(y_mbld.swapaxes(0, 1).reshape(x_bld.shape), act)
    return y_bld, jax.tree.map(lambda a: a / microbatches, stats_u)


@jax.custom_vjp
def _shift(state_sbld: jax.Array) -> jax.Array:
    """Stage s-1's activation to stage s (the last stage's to stage 0): `jnp.roll` by one on the stage dim.

    Its gradient is the roll back by one, written out: as the transpose of
    `jnp.roll`'s slices and concatenation XLA would send two permutes, not one.
    """
    return jnp.roll(state_sbld, 1, axis=0)


_shift.defvjp(lambda x: (_shift(x), None), lambda _, g: (jnp.roll(g, -1, axis=0),))


def _stage_axis() -> str | None:
    """The mesh axis of "act_stages" when the current mesh has it (vmap's spmd_axis_name), else None."""
    mesh = jax.sharding.get_abstract_mesh()
    target = RULES["act_stages"]
    if mesh.empty or target not in mesh.axis_names or not set(MESH_AXES) <= set(mesh.axis_names):
        return None
    return target


def _on_stages(a: jax.Array, axis: str | None) -> jax.Array:
    """Constrain dim 0 of `[S, R, K, ...]` to the stage axis, leaving the others as the parameter has them."""
    if axis is None:
        return a
    return jax.lax.with_sharding_constraint(a, PartitionSpec(axis, *([PartitionSpec.UNCONSTRAINED] * (a.ndim - 1))))

