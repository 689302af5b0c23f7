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

Placement and pools (load balance, NOTES.md section 8). Expert weights live in
physical slots; `placement[e]` is the slot of logical expert e (SmartMoE's
expert_mapping), a runtime array. Slots are grouped into pools of
`experts_per_pool` consecutive slots (one pool per device for device-pooled
capacity; one slot per pool for per-expert capacity, the default). Capacity is
shared inside a pool: a pool takes at most P = experts_per_pool x C choices per
group, in the same priority order, so the worst pool, not the worst expert,
sets the drops. Inside a pool's buffer the kept choices are laid out sorted by
slot (each expert's tokens contiguous, in priority order), and `slot_counts`
says how many each slot holds, so the receiving device can compute each
expert on its own rows without sending an expert id per token.

Dropless pools. With `pool_capacity` = S x min(experts_per_pool, k) (one
pool per device, `dropless_capacity`) no pool can overflow: a token's k
choices are distinct experts. A smaller `pool_capacity` (a buffer factor)
drops in the same priority order.

Across nodes (FasterMoE's topology-aware gate). With `nodes` = M > 1 the Q
pools are split into M contiguous blocks, one per node, and `group_node[g]`
is the node of routing group g (the node of the device that holds the group
on the "expert" axis). A pool on another node is *remote*: per group it keeps
at most `remote_capacity(P, r)` = max(1, floor(r x P)) choices, r =
`remote_fraction`, and a pool on the group's own node takes the slots the
remote ones give up, `own_node_capacity` = P + (M - 1)(P - R) (at most S x
min(experts per pool, k)), so a group's room stays Q x P as at r = 1; the
dispatch buffer's stride per pool (`Routing.capacity`) is then that P_own.
In priority order, a choice that finds its remote pool at
that limit is redirected to the expert of the group's own node with the
highest choice logit among those with room that the token has not chosen
(lowest id on ties), and takes the next slot there; with none, it is dropped.
Shadow buffers are on every node, so never remote. The decisions are a scan
over the S x K choices in priority order (each redirect uses room a later
choice would see), run only when r < 1.

Remote bias (opt-in, `model.remote_bias_rate`). A runtime scalar `remote_bias`
>= 0 is subtracted from the choice logits of every expert whose bucket is on
another node than the group's, before top-k: a choice whose remote expert
leads its best own-node expert by less than the bias stays on its node, so the
choices that do cross are those that prefer a remote expert the most, not the
first in position order. `remote_excess` (the fraction of choices, after the
bias and before the gate, that pick a remote pool, minus the fraction the
remote pools can keep) drives it after each step (`MoE.update_balance`, like
the router bias). Gates and losses stay unbiased.

Device balance loss (opt-in, `model.device_aux_loss_weight`; DeepSeek-V2's
device-level balance loss). The load-balancing loss over devices instead of
experts: D * sum_d(me_d * ce_d) per group, averaged, where me_d and ce_d sum
me_e and ce_e over the experts whose physical slot is on device d
(`placement[e] // experts_per_device`, so the grouping follows the runtime
placement and never recompiles). With device pools a device's pool is what
drops, and a group's pool overflows when its own tokens crowd one device: the
term pushes each group's probability away from the device its first choices
crowd, where the per-expert loss sees D times fewer tokens per term.

Router bias (aux-loss-free balancing, DeepSeek-V3). `bias[e]` is added to the
logits used to *choose* experts only; gates and losses use the unbiased
probabilities.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Routing:
    """Where each of a token's k choices goes. Shapes: G groups, S tokens, K choices, E experts, Q pools."""

    expert_index: jax.Array  # int32 [G, S, K]   chosen (logical) expert per choice
    pool_index: jax.Array  # int32 [G, S, K]     pool (buffer row) of the chosen expert's slot
    slot: jax.Array  # int32 [G, S, K]           position in the pool's buffer (< capacity if kept)
    combine_weight: jax.Array  # f32 [G, S, K]   0 where dropped
    kept: jax.Array  # bool [G, S, K]
    slot_counts: jax.Array  # int32 [G, E]       kept choices per physical slot, per group
    aux_loss: jax.Array  # f32 []                 load-balancing loss
    z_loss: jax.Array  # f32 []                   router z-loss
    device_aux_loss: jax.Array  # f32 []          the load-balancing loss over devices (module doc)
    expert_load: jax.Array  # f32 [E]             fraction of all choices sent to each logical expert (before drops)
    pool_load: jax.Array  # f32 [Q]               fraction of all choices sent to each pool (before drops; shadowed
    #                                               choices excluded)
    dropped_fraction: jax.Array  # f32 []         fraction of choices dropped
    shadow_gain: jax.Array  # f32 [E]              fraction of all choices a shadow of each expert alone would keep that
    #                                               its pool drops, net of the shadow's own drops (0 without shadows)
    redirected_fraction: jax.Array  # f32 []      fraction of choices redirected to their own node (remote_fraction)
    internode_fraction: jax.Array  # f32 []       fraction of kept choices whose pool is on another node
    remote_excess: jax.Array  # f32 []            fraction of choices picking a remote pool (before the gate) minus
    #                                               the fraction remote pools keep (0 on one node)
    capacity: int = dataclasses.field(metadata=dict(static=True))  # slots per pool per group (P; P_own with the gate)
    experts_per_pool: int = dataclasses.field(metadata=dict(static=True))
    num_shadows: int = dataclasses.field(default=0, metadata=dict(static=True))  # shadow buffers after the Q pools
    shadow_capacity: int = dataclasses.field(default=0, metadata=dict(static=True))  # slots per shadow per group
    remote_capacity: int = dataclasses.field(default=0, metadata=dict(static=True))  # slots of a remote pool (0: P)


def capacity(group_size: int, num_experts: int, top_k: int, capacity_factor: float, min_capacity: int) -> int:
    """C = max(ceil(k * cf * S / E), min_capacity) slots per expert per group."""
    return max(math.ceil(top_k * capacity_factor * group_size / num_experts), min_capacity)


def remote_capacity(pool_capacity: int, remote_fraction: float) -> int:
    """Slots of a pool on another node a routing group may fill: max(1, floor(r x P)), P at r = 1."""
    if not 0 < remote_fraction <= 1:
        raise ValueError(f"remote_fraction={remote_fraction} must be in (0, 1]; 1.0 = off, 0.14 is fastmoe's default")
    if remote_fraction >= 1:
        return pool_capacity
    return max(1, math.floor(remote_fraction * pool_capacity + 1e-9))


def own_node_capacity(pool_capacity: int, remote_cap: int, nodes: int, most: int) -> int:
    """Slots of a pool on a routing group's own node when the topology-aware gate is on.

    Each of the M - 1 other nodes' pools gives up P - R slots (R =
    `remote_cap`); the group's own node's pools take them, so the group's
    total room stays Q x P, as at r = 1: P_own = P + (M - 1)(P - R), never
    more than `most` (the choices one pool can get from a group: S x
    min(experts per pool, k)) and never less than P.
    """
    return max(pool_capacity, min(pool_capacity + (nodes - 1) * (pool_capacity - remote_cap), most))


def dropless_capacity(group_size: int, num_experts: int, top_k: int, num_devices: int,
                      buffer_factor: float = 0.0) -> int:
    """Rows P of one device's pool per routing group with dropless routing.

    A token's k choices are k distinct experts, so at most min(E_local, k) of
    them land on one device: P = S x min(E_local, k) never drops. With
    `buffer_factor` f > 0 the pool is bounded to ceil(f x S x k / X) rows (f
    times the rows of uniform routing, MaxText's buffer factor), never more
    than the worst case; choices past it drop in priority order.
    """
    worst = group_size * min(num_experts // num_devices, top_k)
    if buffer_factor <= 0:
        return worst
    return max(1, min(worst, math.ceil(buffer_factor * group_size * top_k / num_devices)))


def route(
    logits: jax.Array,
    *,
    top_k: int,
    capacity_factor: float,
    min_capacity: int = 4,
    renormalize: bool | None = None,
    bias: jax.Array | None = None,
    placement: jax.Array | None = None,
    experts_per_pool: int = 1,
    shadow_ids: jax.Array | None = None,
    shadow_capacity: int = 0,
    pool_capacity: int = 0,
    remote_fraction: float = 1.0,
    nodes: int = 1,
    group_node: jax.Array | None = None,
    remote_bias: jax.Array | None = None,
    experts_per_device: int = 0,
) -> Routing:
    """Route tokens given float32 router logits `[G, S, E]`.

    `renormalize` defaults to `top_k > 1` (GShard / DeepSpeed behaviour).
    `bias` `[E]` shifts the choice only; `placement` `[E]` int32 maps logical
    experts to physical slots (default identity); `experts_per_pool` slots
    share `experts_per_pool x C` places per group (1 = per-expert capacity).
    `shadow_ids` `[R]` int32 (logical experts, runtime) are shadowed: their
    choices go to shadow buffers R of `shadow_capacity` slots, indexed Q..Q+R-1
    after the Q pools in `pool_index`, and never count against a pool.
    `pool_capacity` > 0 sets P directly in place of `experts_per_pool x C`
    (dropless pools, `dropless_capacity`). `nodes` > 1 and `group_node` `[G]`
    int32 place pools and groups on nodes; `remote_fraction` < 1 limits and
    redirects the choices of remote pools (module doc, "Across nodes");
    `remote_bias` f32 [] (with `nodes` > 1) is subtracted from the choice logits
    of experts on another node (module doc, "Remote bias"). `experts_per_device`
    (default `experts_per_pool`) groups the physical slots into devices for
    `device_aux_loss`.
    """
    groups, group_size, num_experts = logits.shape
    if not 1 <= top_k <= num_experts:
        raise ValueError(f"top_k={top_k} must be between 1 and num_experts={num_experts}")
    if capacity_factor <= 0:
        raise ValueError(f"capacity_factor={capacity_factor} must be > 0")
    if experts_per_pool < 1 or num_experts % experts_per_pool:
        raise ValueError(f"experts_per_pool={experts_per_pool} must be >= 1 and divide num_experts={num_experts}")
    renormalize = top_k > 1 if renormalize is None else renormalize
    cap = capacity(group_size, num_experts, top_k, capacity_factor, min_capacity)
    pool_cap, num_pools = pool_capacity or experts_per_pool * cap, num_experts // experts_per_pool
    remote_cap = remote_capacity(pool_cap, remote_fraction)
    if nodes > 1 and (num_pools % nodes or group_node is None or group_node.shape != (groups,)):
        raise ValueError(f"nodes={nodes} must divide the {num_pools} pools and group_node must be int32 [{groups}]")
    gate = nodes > 1 and remote_cap < pool_cap
    # the buffer's stride per pool: own-node pools take the slots remote pools give up (static for all groups)
    own_cap = own_node_capacity(pool_cap, remote_cap, nodes, group_size * min(experts_per_pool, top_k)) if gate \
        else pool_cap

    logits = logits.astype(jnp.float32)
    probs_gse = jax.nn.softmax(logits, axis=-1)
    choice_logits = logits if bias is None else logits + bias.astype(jnp.float32)
    num_shadows = 0 if shadow_ids is None else int(shadow_ids.shape[0])
    # node of each bucket: pools in contiguous blocks per node, shadows on every node (-1)
    bucket_node_b = jnp.asarray([q * nodes // num_pools for q in range(num_pools)] + [-1] * num_shadows, jnp.int32)
    remote_gb = (jnp.zeros((groups, 1), jnp.int32) if nodes == 1 else group_node.astype(jnp.int32)[:, None])
    remote_gb = (bucket_node_b >= 0) & (bucket_node_b != remote_gb)
    shadow_r = None if not num_shadows else shadow_ids.astype(jnp.int32)
    if remote_bias is not None and nodes > 1:
        remote_ge = jnp.take(remote_gb, _expert_buckets(placement, shadow_r, num_experts, experts_per_pool), axis=1)
        choice_logits = choice_logits - jnp.where(remote_ge, remote_bias.astype(jnp.float32), 0.0)[:, None, :]
    gate_gsk, index_gsk = _top_k(choice_logits, probs_gse, top_k)
    phys_gsk = index_gsk if placement is None else jnp.take(placement.astype(jnp.int32), index_gsk)
    pool_gsk = phys_gsk // experts_per_pool
    if num_shadows:
        if shadow_capacity < 1:
            raise ValueError(f"shadow_capacity={shadow_capacity} must be >= 1 with {num_shadows} shadow experts")
        match_gskr = index_gsk[..., None] == shadow_ids.astype(jnp.int32)
        shadowed_gsk = jnp.any(match_gskr, axis=-1)
        pool_gsk = jnp.where(shadowed_gsk, num_pools + jnp.argmax(match_gskr, axis=-1), pool_gsk)
    else:
        shadowed_gsk = jnp.zeros(index_gsk.shape, bool)
    bucket_cap_b = jnp.asarray([pool_cap] * num_pools + [shadow_capacity] * num_shadows, jnp.int32)

    # Position of each choice in its pool: choices in priority order (k major,
    # token minor), a running count per pool. O(S * K * Q) integers per group.
    def priority_order(x_gsk):
        return jnp.swapaxes(x_gsk, 1, 2).reshape(groups, top_k * group_size)

    def from_priority_order(x_gn):
        return jnp.swapaxes(x_gn.reshape(groups, top_k, group_size), 1, 2)

    redirected_gsk, first_choice_gs, chosen_pool_gsk = jnp.zeros(index_gsk.shape, bool), index_gsk[..., 0], pool_gsk
    if gate:
        expert_bucket_e = _expert_buckets(placement, shadow_r, num_experts, experts_per_pool)
        limit_gb = jnp.where(remote_gb, remote_cap, jnp.where(bucket_node_b >= 0, own_cap, bucket_cap_b))
        index_gsk, kept_gsk, position_gsk, redirected_gsk = _redirect(
            jax.lax.stop_gradient(choice_logits), index_gsk, expert_bucket_e, limit_gb, remote_gb)
        gate_gsk = jnp.take_along_axis(probs_gse, index_gsk, axis=-1)
        phys_gsk = index_gsk if placement is None else jnp.take(placement.astype(jnp.int32), index_gsk)
        pool_gsk = jnp.take(expert_bucket_e, index_gsk)
        shadowed_gsk = pool_gsk >= num_pools
        position_gn = priority_order(position_gsk)
    else:
        pool_onehot_gnq = jax.nn.one_hot(priority_order(pool_gsk), num_pools + num_shadows, dtype=jnp.int32)
        position_gn = jnp.sum((jnp.cumsum(pool_onehot_gnq, axis=1) - pool_onehot_gnq) * pool_onehot_gnq, axis=-1)
        kept_gsk = from_priority_order(position_gn) < bucket_cap_b[pool_gsk]
    if experts_per_pool == 1:
        slot_gsk = from_priority_order(position_gn)
        slot_counts_ge = _counts_per_group(pool_gsk, kept_gsk & ~shadowed_gsk, num_pools)
    else:
        # Kept choices laid out by slot inside the pool: rank among the slot's kept
        # choices, after the kept choices of the pool's earlier slots.
        main_kept_gn = priority_order(kept_gsk & ~shadowed_gsk)
        kept_onehot_gne = jax.nn.one_hot(jnp.where(main_kept_gn, priority_order(phys_gsk), -1),
                                         num_experts, dtype=jnp.int32)
        rank_gn = jnp.sum((jnp.cumsum(kept_onehot_gne, axis=1) - kept_onehot_gne) * kept_onehot_gne, axis=-1)
        slot_counts_ge = jnp.sum(kept_onehot_gne, axis=1)
        counts_gqx = slot_counts_ge.reshape(groups, num_pools, experts_per_pool)
        offset_ge = (jnp.cumsum(counts_gqx, axis=-1) - counts_gqx).reshape(groups, num_experts)
        slot_gsk = jnp.take_along_axis(offset_ge[:, None, :], phys_gsk, axis=-1) + from_priority_order(rank_gn)
        slot_gsk = jnp.where(shadowed_gsk, from_priority_order(position_gn), slot_gsk)

    weight_gsk = jnp.where(kept_gsk, gate_gsk, 0.0)
    if renormalize:
        denom_gs1 = jnp.sum(weight_gsk, axis=-1, keepdims=True)
        weight_gsk = weight_gsk / jnp.maximum(denom_gs1, jnp.finfo(jnp.float32).eps)

    me_ge = jnp.mean(probs_gse, axis=1)
    ce_ge = jnp.mean(jax.nn.one_hot(first_choice_gs, num_experts, dtype=jnp.float32), axis=1)  # before redirects
    aux_loss = jnp.mean(num_experts * jnp.sum(me_ge * ce_ge, axis=-1))
    per_device = experts_per_device or experts_per_pool
    slot_e = jnp.arange(num_experts, dtype=jnp.int32) if placement is None else placement.astype(jnp.int32)
    device_ed = jax.nn.one_hot(slot_e // per_device, num_experts // per_device, dtype=jnp.float32)
    device_aux_loss = jnp.mean(num_experts // per_device * jnp.sum((me_ge @ device_ed) * (ce_ge @ device_ed), -1))
    z_loss = jnp.mean(jnp.square(jax.nn.logsumexp(logits, axis=-1)))

    choices = groups * group_size * top_k
    expert_load = jnp.sum(_counts_per_group(index_gsk, True, num_experts), axis=0).astype(jnp.float32) / choices
    pool_load = jnp.sum(_counts_per_group(pool_gsk, ~shadowed_gsk, num_pools), axis=0).astype(jnp.float32) / choices
    dropped_fraction = jnp.sum(~kept_gsk) / kept_gsk.size  # exactly 0 when nothing drops
    shadow_gain = jnp.zeros((num_experts,), jnp.float32)
    if num_shadows:
        slot_e = jnp.arange(num_experts, dtype=jnp.int32) if placement is None else placement.astype(jnp.int32)
        expert_counts_ge = _counts_per_group(index_gsk, True, num_experts)
        shadow_gain = _shadow_gain(expert_counts_ge, slot_e // experts_per_pool, pool_cap, shadow_capacity) / choices
    # on one node nothing crosses or is redirected: constants, so no all-reduce is spent on the statistics
    internode_fraction = redirected_fraction = remote_excess = jnp.zeros((), jnp.float32)
    if nodes > 1:
        remote_gsk = jnp.take_along_axis(remote_gb, pool_gsk.reshape(groups, -1), axis=1).reshape(pool_gsk.shape)
        internode_fraction = jnp.sum(kept_gsk & remote_gsk) / jnp.maximum(jnp.sum(kept_gsk), 1)
        redirected_fraction = jnp.sum(redirected_gsk) / redirected_gsk.size
        if remote_bias is not None:  # only the remote bias reads it: no extra work for the other runs
            wanted_gsk = jnp.take_along_axis(remote_gb, chosen_pool_gsk.reshape(groups, -1), axis=1)
            room = num_pools * (nodes - 1) // nodes * remote_cap / (group_size * top_k)  # what remote pools keep
            remote_excess = jnp.mean(wanted_gsk) - room
    return Routing(
        expert_index=index_gsk.astype(jnp.int32),
        pool_index=pool_gsk.astype(jnp.int32),
        slot=slot_gsk.astype(jnp.int32),
        combine_weight=weight_gsk,
        kept=kept_gsk,
        slot_counts=slot_counts_ge.astype(jnp.int32),
        aux_loss=aux_loss,
        z_loss=z_loss,
        device_aux_loss=device_aux_loss,
        expert_load=expert_load,
        pool_load=pool_load,
        dropped_fraction=dropped_fraction,
        shadow_gain=shadow_gain,
        redirected_fraction=redirected_fraction.astype(jnp.float32),
        internode_fraction=internode_fraction.astype(jnp.float32),
        remote_excess=remote_excess.astype(jnp.float32),
        capacity=own_cap,
        experts_per_pool=experts_per_pool,
        num_shadows=num_shadows,
        shadow_capacity=shadow_capacity if num_shadows else 0,
        remote_capacity=remote_cap,
    )


def _shadow_gain(counts_ge: jax.Array, pool_e: jax.Array, pool_cap: int, shadow_cap: int) -> jax.Array:
    """Choices `[E]` (summed over groups) that a shadow of each expert alone would keep and its pool drops,
    less those its shadow buffer would drop: what shadowing it saves, whatever is shadowed now.

    Counted on all choices `counts_ge` `[G, E]` (before drops, shadowed or not) against each expert's pool
    `pool_e` `[E]`, so the figure does not depend on the current set: the pool's overflow with and without
    the expert's n choices, minus max(n - C_shadow, 0). With one expert per pool (per-expert capacity)
    that is min(n, C_shadow) - min(n, C), exact and additive over experts; two shadows of one device pool
    save at most the sum of their figures.
    """
    counts_ge = counts_ge.astype(jnp.float32)
    pool_counts_gq = jax.vmap(lambda n_e: jnp.zeros(n_e.shape, jnp.float32).at[pool_e].add(n_e))(counts_ge)
    in_pool_ge = jnp.take(pool_counts_gq, pool_e, axis=1)  # all the choices of each expert's pool
    saved_ge = (jnp.maximum(in_pool_ge - pool_cap, 0.0) - jnp.maximum(in_pool_ge - counts_ge - pool_cap, 0.0)
                - jnp.maximum(counts_ge - shadow_cap, 0.0))
    return jnp.sum(saved_ge, axis=0)


def _expert_buckets(placement, shadow_ids_r, num_experts: int, experts_per_pool: int) -> jax.Array:
    """The bucket of every logical expert `[E]`: its pool, or Q + r for the shadow r holding it."""
    phys_e = jnp.arange(num_experts, dtype=jnp.int32) if placement is None else placement.astype(jnp.int32)
    bucket_e = phys_e // experts_per_pool
    if shadow_ids_r is not None:
        match_er = jnp.arange(num_experts, dtype=jnp.int32)[:, None] == shadow_ids_r
        bucket_e = jnp.where(jnp.any(match_er, axis=-1), num_experts // experts_per_pool + jnp.argmax(match_er, -1),
                             bucket_e)
    return bucket_e


def _redirect(scores_gse, index_gsk, expert_bucket_e, limit_gb, remote_gb):
    """The topology-aware gate's decisions, one choice at a time in priority order (k major, token minor),
    all groups at once. Returns the final expert, kept, position in its bucket (the running count) and
    whether it was redirected, each `[G, S, K]`."""
    groups, group_size, top_k = index_gsk.shape
    num_experts = scores_gse.shape[-1]
    local_room = ~remote_gb  # [G, B]

    def step(carry, n):
        counts_gb, final_gsk = carry
        k, s = n // group_size, n % group_size
        e_g = jax.lax.dynamic_index_in_dim(jax.lax.dynamic_index_in_dim(index_gsk, s, 1, False), k, 1, False)
        b_g = expert_bucket_e[e_g]
        room_gb = counts_gb < limit_gb
        fits_g = jnp.take_along_axis(room_gb, b_g[:, None], axis=1)[:, 0]
        remote_g = jnp.take_along_axis(remote_gb, b_g[:, None], axis=1)[:, 0]
        # a token's experts: its original k choices and where earlier choices went
        mine_gj = jnp.concatenate([jax.lax.dynamic_index_in_dim(index_gsk, s, 1, False),
                                   jax.lax.dynamic_index_in_dim(final_gsk, s, 1, False)], axis=-1)
        taken_ge = jnp.any(mine_gj[..., None] == jnp.arange(num_experts), axis=1)
        candidate_ge = jnp.take(local_room & room_gb, expert_bucket_e, axis=1) & ~taken_ge
        score_ge = jax.lax.dynamic_index_in_dim(scores_gse, s, 1, False)
        best_g = jnp.argmax(jnp.where(candidate_ge, score_ge, -jnp.inf), axis=-1).astype(jnp.int32)
        move_g = ~fits_g & remote_g & jnp.any(candidate_ge, axis=-1)
        new_e_g = jnp.where(move_g, best_g, e_g)
        new_b_g = expert_bucket_e[new_e_g]
        kept_g = fits_g | move_g
        position_g = jnp.take_along_axis(counts_gb, new_b_g[:, None], axis=1)[:, 0]
        counts_gb = counts_gb + (kept_g[:, None] & (new_b_g[:, None] == jnp.arange(counts_gb.shape[1])))
        final_gsk = final_gsk.at[:, s, k].set(new_e_g)
        return (counts_gb, final_gsk), (kept_g, position_g, move_g)

    counts_gb = jnp.zeros(limit_gb.shape, jnp.int32)
    (_, final_gsk), (kept_ng, position_ng, moved_ng) = jax.lax.scan(
        step, (counts_gb, index_gsk.astype(jnp.int32)), jnp.arange(group_size * top_k, dtype=jnp.int32))

    def back(x_ng):  # [K * S, G] in priority order -> [G, S, K]
        return jnp.transpose(x_ng.reshape(top_k, group_size, groups), (2, 1, 0))

    return final_gsk, back(kept_ng), back(position_ng), back(moved_ng)


def _counts_per_group(bucket_gsk: jax.Array, where_gsk, buckets: int) -> jax.Array:
    """How many choices of each group fall in each bucket `[G, buckets]` (a per-group histogram: O(S * K)
    work, not the O(S * K * buckets) of a one-hot sum). Buckets >= `buckets` are ignored."""
    weight_gsk = jnp.broadcast_to(jnp.asarray(where_gsk, jnp.int32), bucket_gsk.shape)

    def one_group(bucket_sk, weight_sk):
        return jnp.zeros((buckets,), jnp.int32).at[bucket_sk.reshape(-1)].add(weight_sk.reshape(-1), mode="drop")

    return jax.vmap(one_group)(bucket_gsk, weight_gsk)


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
    """For every dispatch slot, the choice it holds, s * K + k: int32 `[G, Q * P + R * C_shadow]`,
    S * K where empty (so `// K` gives the token, S where empty).

    A scatter of S * K ids, so dispatching costs O(E * C * d_model) gathers
    rather than a one-hot `[S, E, C]` einsum (O(S * E * C * d_model)).
    """
    groups, group_size, top_k = routing.expert_index.shape
    cap, num_pools = routing.capacity, num_experts // routing.experts_per_pool
    num_slots = num_pools * cap + routing.num_shadows * routing.shadow_capacity
    flat_pos_gsk = slot_positions(routing, num_experts)
    # Dropped choices scatter out of bounds and are discarded.
    flat_pos_gsk = jnp.where(routing.kept, flat_pos_gsk, num_slots)
    choice_c = jnp.arange(group_size * top_k, dtype=jnp.int32)

    def one_group(pos_sk):
        # vmap makes G a scatter batch dim, which the SPMD partitioner keeps local.
        empty_n = jnp.full((num_slots,), group_size * top_k, jnp.int32)
        return empty_n.at[pos_sk.reshape(-1)].set(choice_c, mode="drop")

    return jax.vmap(one_group)(flat_pos_gsk)


def slot_positions(routing: Routing, num_experts: int) -> jax.Array:
    """Flat position of every choice in the dispatch buffer `[Q * P + R * C_shadow]`: int32 `[G, S, K]`
    (meaningful where kept). Pools first, then the shadow buffers."""
    cap, num_pools = routing.capacity, num_experts // routing.experts_per_pool
    shadow = routing.pool_index - num_pools
    return jnp.where(shadow >= 0, num_pools * cap + shadow * routing.shadow_capacity + routing.slot,
                     routing.pool_index * cap + routing.slot)
