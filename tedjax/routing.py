"""Top-k routing with capacity, GShard / DeepSpeed-MoE semantics (NOTES.md section 2).

All math is float32 on router logits `[G, S, E]` (G routing groups of S tokens,
E experts). Routing is computed independently per group, so a model computes
the same function however the mesh splits the batch.

Capacity. Each expert takes at most C = max(ceil(k * capacity_factor * S / E),
min_capacity) tokens per group.

Slot order (position priority). Slots are filled choice by choice, and within a
choice in token order: every token's first choice is placed before any second
choice. A choice that finds its expert full is dropped; a dropped choice
contributes nothing (its combine weight is 0).

Combine weights. The router probability of each kept choice; for k > 1 (and
`renormalize`), divided by the sum over the token's *kept* choices, so dropped
choices count as 0 (DeepSpeed top-2: w1 / (w1 + w2)). For k = 1 the weight is
the plain probability, as in Switch / DeepSpeed top-1.

Losses. Load balancing: E * sum_e(me_e * ce_e), me = mean router probability of
expert e, ce = fraction of tokens whose first choice is e (before drops),
computed per group and averaged. Router z-loss: mean over tokens of
logsumexp(logits)^2.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Routing:
    """Where each of a token's k choices goes. Shapes: G groups, S tokens, K choices, E experts."""

    expert_index: jax.Array  # int32 [G, S, K]   chosen expert per choice
    slot: jax.Array  # int32 [G, S, K]           position in the expert's buffer (< capacity if kept)
    combine_weight: jax.Array  # f32 [G, S, K]   0 where dropped
    kept: jax.Array  # bool [G, S, K]
    aux_loss: jax.Array  # f32 []                 load-balancing loss
    z_loss: jax.Array  # f32 []                   router z-loss
    expert_load: jax.Array  # f32 [E]             fraction of all choices sent to each expert (before drops)
    dropped_fraction: jax.Array  # f32 []         fraction of choices dropped
    capacity: int = dataclasses.field(metadata=dict(static=True))


def capacity(group_size: int, num_experts: int, top_k: int, capacity_factor: float, min_capacity: int) -> int:
    """C = max(ceil(k * cf * S / E), min_capacity) slots per expert per group."""
    return max(math.ceil(top_k * capacity_factor * group_size / num_experts), min_capacity)


def route(
    logits: jax.Array,
    *,
    top_k: int,
    capacity_factor: float,
    min_capacity: int = 4,
    renormalize: bool | None = None,
) -> Routing:
    """Route tokens given float32 router logits `[G, S, E]`.

    `renormalize` defaults to `top_k > 1` (GShard / DeepSpeed behaviour).
    """
    groups, group_size, num_experts = logits.shape
    if not 1 <= top_k <= num_experts:
        raise ValueError(f"top_k={top_k} must be between 1 and num_experts={num_experts}")
    if capacity_factor <= 0:
        raise ValueError(f"capacity_factor={capacity_factor} must be > 0")
    renormalize = top_k > 1 if renormalize is None else renormalize
    cap = capacity(group_size, num_experts, top_k, capacity_factor, min_capacity)

    logits = logits.astype(jnp.float32)
    probs_gse = jax.nn.softmax(logits, axis=-1)
    gate_gsk, index_gsk = _top_k(logits, probs_gse, top_k)

    # Slot of each choice: choices in priority order (k major, token minor), a
    # running count per expert. Cost O(S * K * E) integers per group, no d_model.
    onehot_gkse = jax.nn.one_hot(jnp.swapaxes(index_gsk, 1, 2), num_experts, dtype=jnp.int32)
    flat_g_ks_e = onehot_gkse.reshape(groups, top_k * group_size, num_experts)
    position_g_ks_e = jnp.cumsum(flat_g_ks_e, axis=1) - flat_g_ks_e
    slot_gks = jnp.sum(position_g_ks_e * flat_g_ks_e, axis=-1).reshape(groups, top_k, group_size)
    slot_gsk = jnp.swapaxes(slot_gks, 1, 2)
    kept_gsk = slot_gsk < cap

    weight_gsk = jnp.where(kept_gsk, gate_gsk, 0.0)
    if renormalize:
        denom_gs1 = jnp.sum(weight_gsk, axis=-1, keepdims=True)
        weight_gsk = weight_gsk / jnp.maximum(denom_gs1, jnp.finfo(jnp.float32).eps)

    me_ge = jnp.mean(probs_gse, axis=1)
    ce_ge = jnp.mean(jax.nn.one_hot(index_gsk[..., 0], num_experts, dtype=jnp.float32), axis=1)
    aux_loss = jnp.mean(num_experts * jnp.sum(me_ge * ce_ge, axis=-1))
    z_loss = jnp.mean(jnp.square(jax.nn.logsumexp(logits, axis=-1)))

    expert_load = jnp.sum(flat_g_ks_e, axis=(0, 1)).astype(jnp.float32) / (groups * group_size * top_k)
    dropped_fraction = jnp.sum(~kept_gsk) / kept_gsk.size  # exactly 0 when nothing drops
    return Routing(
        expert_index=index_gsk.astype(jnp.int32),
        slot=slot_gsk.astype(jnp.int32),
        combine_weight=weight_gsk,
        kept=kept_gsk,
        aux_loss=aux_loss,
        z_loss=z_loss,
        expert_load=expert_load,
        dropped_fraction=dropped_fraction,
        capacity=cap,
    )


def _top_k(logits_gse: jax.Array, probs_gse: jax.Array, k: int) -> tuple[jax.Array, jax.Array]:
    """k rounds of argmax over the logits (lowest index wins ties, like lax.top_k).

    Choosing on logits, not probabilities, keeps later choices right when
    probabilities underflow to 0. XLA's SPMD partitioner all-gathers
    lax.top_k along batch dims on some backends; argmax is a plain reduction
    and stays local to each shard.
    """
    gates, indices, remaining = [], [], logits_gse
    for _ in range(k):
        index_gs = jnp.argmax(remaining, axis=-1)
        gates.append(jnp.take_along_axis(probs_gse, index_gs[..., None], axis=-1)[..., 0])
        indices.append(index_gs)
        remaining = jnp.where(jax.nn.one_hot(index_gs, remaining.shape[-1], dtype=bool), -jnp.inf, remaining)
    return jnp.stack(gates, axis=-1), jnp.stack(indices, axis=-1)


def apply_jitter(x: jax.Array, key: jax.Array, eps: float) -> jax.Array:
    """Multiply router inputs by U(1 - eps, 1 + eps) noise (Switch Transformer jitter)."""
    noise = jax.random.uniform(key, x.shape, jnp.float32, 1.0 - eps, 1.0 + eps)
    return x * noise.astype(x.dtype)


def dispatch_indices(routing: Routing, num_experts: int) -> jax.Array:
    """For every expert slot, the token it holds: int32 `[G, E * C]`, S where empty.

    A scatter of S * K token ids, so dispatching costs O(E * C * d_model) gathers
    rather than a one-hot `[S, E, C]` einsum (O(S * E * C * d_model)).
    """
    groups, group_size, top_k = routing.expert_index.shape
    cap = routing.capacity
    flat_pos_gsk = routing.expert_index * cap + routing.slot
    # Dropped choices scatter out of bounds and are discarded.
    flat_pos_gsk = jnp.where(routing.kept, flat_pos_gsk, num_experts * cap)
    token_sk = jnp.broadcast_to(jnp.arange(group_size, dtype=jnp.int32)[:, None], (group_size, top_k))

    def one_group(pos_sk):
        # vmap makes G a scatter batch dim, which the SPMD partitioner keeps local.
        empty_n = jnp.full((num_experts * cap,), group_size, jnp.int32)
        return empty_n.at[pos_sk.reshape(-1)].set(token_sk.reshape(-1), mode="drop")

    return jax.vmap(one_group)(flat_pos_gsk)
