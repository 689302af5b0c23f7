"""The MoE layer: router -> dispatch -> all-to-all -> expert FFN -> all-to-all -> combine.

Dispatch is index based. Routing gives every expert slot the token it holds
(`routing.dispatch_indices`); a gather builds the expert buffer
`[G, E, C, D]` and a gather reads it back in combine. Cost is O(tokens x
d_model), unlike GShard's one-hot `[S, E, C]` einsum.

Communication comes from sharding alone. Tokens enter split over ("data",
"expert") on the group dim G. The expert buffer is re-constrained to G over
"data" and E over "expert": XLA moves it with one all-to-all over "expert",
the expert FFN runs on local experts with its hidden dim split over "tensor"
(all-reduce over "tensor" after the down projection), and the inverse
constraint is the second all-to-all.

DTD (Duplicate Token Dropping, TED). With tensor > 1 every tensor rank holds the
same tokens, so the all-to-all would carry `tensor` copies. With `dtd=True` the
buffer's capacity dim is split over "tensor" before the all-to-all (a local
slice, no communication), the all-to-all carries 1/tensor of the bytes, and
the buffer is all-gathered over "tensor" for the expert FFN. On the way back
the FFN output is all-reduced over "tensor" as without DTD, each rank keeps
its 1/tensor of the slots (a local slice), sends them at 1/tensor the size,
and they are all-gathered over "tensor" after the return. Backward mirrors it:
one all-gather over "tensor" per all-to-all in each direction. When C does
not divide by `tensor`, the DTD buffer is padded to the next multiple with
empty slots (never routed to, dropped after each all-gather), so routing and
results are the same as with `dtd=False`; the all-to-all then carries
ceil(C / tensor) / C of the bytes. DTD acts only where it saves something:
on meshes with both "expert" and "tensor" larger than 1 (with expert = 1
there is no all-to-all to shrink, only all-gathers to add).

Load balance (NOTES.md section 8). The buffer's second dim is Q pools of P
slots: E pools of C slots (per-expert capacity), or one pool of E_local x C
slots per device of the "expert" axis (`capacity_scope="device"`), whose
rows `grouped.pool_ffn` computes per expert inside `shard_map`; with
`capacity_scope="dropless"` each device's pool holds the worst case, S x
min(E_local, k) rows per group (or `dropless_buffer_factor` x the rows of
uniform routing), so nothing drops, and on GPU/TPU the pools cross the
"expert" axis filled rows only (`jax.lax.ragged_all_to_all`, `tedjax.ragged`;
XLA:CPU sends the static blocks, same results). Expert weights
sit in physical slots given by the runtime `placement`. Shadow experts add R
buffers after the pools that never leave their device: the shadowed weights
come to every device (one all-reduce of R experts per weight). With
`a2a_chunks = n` each all-to-all and the expert FFN between them run as n
independent chunks of the routing groups.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from tedjax import grouped
from tedjax import ragged as ragged_lib
from tedjax import routing as routing_lib
from tedjax.layers import activate, fan_in_init, lane_einsum, param
from tedjax.mesh import MESH_AXES, RULES, axes_metadata, axis_size, constrain, expert_nodes, logical_to_spec

CAPACITY_SCOPES = ("expert", "device", "dropless")
EXCHANGES = ("auto", "static", "ragged", "emulated")  # dropless pools over the "expert" axis
A2A = ("flat", "hierarchical")  # how the pools cross nodes (model.a2a)
EXPERT_IN_AXES = ("experts", "embed", "ffn")  # w_in, w_gate [E, D, F]
EXPERT_OUT_AXES = ("experts", "ffn", "embed")  # w_out [E, F, D]
EXPERT_WEIGHTS = ("w_in", "w_gate", "w_out")


class BalanceState(nnx.Variable):
    """Load-balance state of an MoE layer, decided at run time and never differentiated:
    expert placement, router bias, recent expert load."""


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class MoEStats:
    """Per-layer routing results that the loss and the logs need."""

    aux_loss: jax.Array  # f32 []
    z_loss: jax.Array  # f32 []
    expert_load: jax.Array  # f32 [E]   fraction of choices per (logical) expert, before drops
    dropped_fraction: jax.Array  # f32 []
    device_load: jax.Array  # f32 [X]   fraction of choices per device of the "expert" axis, before drops
    device_rows: jax.Array  # f32 [X]   rows each device computes, as a fraction of choices: its pool's (before drops),
    #                                   plus its own shadow rows with capacity_scope "dropless" (where rows set the time)
    shadow_gain: jax.Array  # f32 [E]   fraction of choices a shadow of each expert would keep from drops (routing.py)
    redirected_fraction: jax.Array  # f32 []  choices the topology-aware gate sent to their own node instead
    internode_fraction: jax.Array  # f32 []   kept choices whose expert is on another node
    remote_excess: jax.Array  # f32 []  choices picking a remote expert minus what remote pools keep (remote bias)
    device_aux_loss: jax.Array  # f32 []  the load-balancing loss over the devices of the placement (routing.py)


class MoE(nnx.Module):
    """Top-k MoE FFN on `[B, L, D]` tokens; returns `([B, L, D], MoEStats)`.

    Tokens are routed in groups of `group_size` consecutive tokens (default:
    one sequence), a choice of the model, never of the mesh. Set
    `deterministic=True` (or call `.eval()`) for the eval capacity factor and
    no jitter.

    Load balance (NOTES.md section 8). `capacity_scope="device"` pools the
    capacity of the experts that share a device of the "expert" axis. Expert
    weights are stored by physical slot; `placement` (a `BalanceState`, int32
    `[E]`, identity at init) maps each logical expert to its slot, so a new
    placement is a runtime value and never recompiles. `router_bias` `[E]`
    shifts the choice of experts only (aux-loss-free balancing), and
    `load_mean` `[E]` keeps a running mean of the expert load for placement
    policies; `update_balance` updates both after a step. `shadow_ids` `[R]`
    (FasterMoE's shadow experts, `shadow_experts=R`) are logical experts whose
    weights are copied to every device each step, so their tokens are computed
    where they are and skip the all-to-all; id E marks an empty shadow slot.
    `a2a_chunks=n` splits the all-to-all into n chunks that can overlap with
    the experts' compute. `capacity_scope="dropless"` computes every choice
    (`dropless_buffer_factor` > 0 bounds its pools); `exchange` says how its
    pools cross the "expert" axis: "auto" (ragged on GPU/TPU, static on CPU),
    "static", "ragged", or "emulated" (the ragged bookkeeping with the
    primitive emulated by ordinary collectives, for CPU tests).

    Across nodes (NOTES.md section 8.9): with `node_size` devices per node
    (0 = one node) the "expert" axis may span nodes. `remote_fraction=r` < 1
    is FasterMoE's topology-aware gate (`routing.route`; own-node pools take
    the slots remote pools give up, so the buffer's stride per pool is P_own);
    `a2a="hierarchical"` exchanges inside nodes first, then sends only r x P
    slots of each remote pool between nodes (`_hierarchical_round_trip`; the
    ragged exchange is flat only). `remote_bias=True` adds the runtime
    `remote_bias` variable against other nodes' experts in the choice, moved
    by `update_balance` (routing.py "Remote bias").
    """

    def __init__(
        self,
        d_model: int,
        num_experts: int,
        expert_d_ff: int,
        *,
        top_k: int = 1,
        capacity_factor: float = 1.25,
        eval_capacity_factor: float = 2.0,
        min_capacity: int = 4,
        group_size: int = 0,
        activation: str = "gelu",
        jitter_eps: float = 0.0,
        renormalize: bool | None = None,
        dtd: bool = False,
        capacity_scope: str = "expert",
        shadow_experts: int = 0,
        a2a_chunks: int = 1,
        grouped_matmul: str = "auto",
        dropless_buffer_factor: float = 0.0,
        exchange: str = "auto",
        remote_fraction: float = 1.0,
        a2a: str = "flat",
        node_size: int = 0,
        remote_bias: bool = False,
        dtype=jnp.float32,
        rngs: nnx.Rngs,
    ):
        for name, value in (("d_model", d_model), ("num_experts", num_experts), ("expert_d_ff", expert_d_ff)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name}={value!r} must be an integer >= 1; pass the layer's sizes as positive ints")
        if not isinstance(min_capacity, int) or min_capacity < 0:
            raise ValueError(f"min_capacity={min_capacity!r} must be an integer >= 0 (slots per expert per group)")
        if not isinstance(top_k, int) or not 1 <= top_k <= num_experts:
            raise ValueError(f"top_k={top_k} must be between 1 and num_experts={num_experts}")
        if activation not in ("gelu", "swiglu"):
            raise ValueError(f"activation must be 'gelu' or 'swiglu', got {activation!r}")
        if capacity_scope not in CAPACITY_SCOPES:
            raise ValueError(f"capacity_scope must be one of {CAPACITY_SCOPES}, got {capacity_scope!r}")
        for name, value in (("capacity_factor", capacity_factor), ("eval_capacity_factor", eval_capacity_factor)):
            if not value > 0:
                raise ValueError(f"{name}={value} must be > 0; 1.0-2.0 is typical")
        if not 0 <= jitter_eps < 1:
            raise ValueError(f"jitter_eps={jitter_eps} must be in [0, 1); 0.01 is typical")
        if not isinstance(shadow_experts, int) or not 0 <= shadow_experts < num_experts:
            raise ValueError(f"shadow_experts={shadow_experts!r} must be an integer in [0, num_experts={num_experts})")
        if not isinstance(a2a_chunks, int) or a2a_chunks < 1:
            raise ValueError(f"a2a_chunks={a2a_chunks!r} must be an integer >= 1 (1 = one all-to-all each way)")
        if group_size < 0:
            raise ValueError(f"group_size={group_size} must be >= 0 (0 = one sequence per routing group)")
        grouped.resolve_method(grouped_matmul)
        self.router = param(rngs, fan_in_init(d_model), (d_model, num_experts), ("embed", "router_experts"))
        self.w_in = param(rngs, fan_in_init(d_model), (num_experts, d_model, expert_d_ff), EXPERT_IN_AXES)
        self.w_gate = (
            param(rngs, fan_in_init(d_model), (num_experts, d_model, expert_d_ff), EXPERT_IN_AXES)
            if activation == "swiglu"
            else None
        )
        self.w_out = param(rngs, fan_in_init(expert_d_ff), (num_experts, expert_d_ff, d_model), EXPERT_OUT_AXES)
        balance_axes = axes_metadata(("router_experts",))
        self.placement = BalanceState(jnp.arange(num_experts, dtype=jnp.int32), **balance_axes)
        self.router_bias = BalanceState(jnp.zeros((num_experts,), jnp.float32), **balance_axes)
        self.load_mean = BalanceState(jnp.full((num_experts,), 1.0 / num_experts, jnp.float32), **balance_axes)
        self.load_steps = BalanceState(jnp.zeros((), jnp.int32), **axes_metadata(()))
        # running mean of MoEStats.shadow_gain: the drops a shadow of each expert would save (the shadow policy's input)
        self.gain_mean = BalanceState(jnp.zeros((num_experts,), jnp.float32), **balance_axes)
        # no expert is shadowed until a policy (or the user) picks some: id E marks an empty shadow slot
        self.shadow_ids = BalanceState(jnp.full((shadow_experts,), num_experts, jnp.int32),
                                       **axes_metadata(("shadow_experts",)))
        self.num_experts, self.top_k = num_experts, top_k
        self.capacity_factor, self.eval_capacity_factor = capacity_factor, eval_capacity_factor
        self.min_capacity, self.group_size = min_capacity, group_size
        self.jitter_eps, self.dtd, self.dtype = jitter_eps, dtd, dtype
        self.renormalize, self.capacity_scope, self.grouped_matmul = renormalize, capacity_scope, grouped_matmul
        self.num_shadows, self.a2a_chunks = shadow_experts, a2a_chunks
        if not dropless_buffer_factor >= 0 or exchange not in EXCHANGES:
            raise ValueError(f"dropless_buffer_factor={dropless_buffer_factor} must be >= 0 (0 = worst case) and "
                             f"exchange={exchange!r} one of {EXCHANGES}")
        self.dropless_buffer_factor, self.exchange = dropless_buffer_factor, exchange
        routing_lib.remote_capacity(1, remote_fraction)  # raises outside (0, 1]
        if a2a not in A2A or not isinstance(node_size, int) or isinstance(node_size, bool) or node_size < 0:
            raise ValueError(f"a2a={a2a!r} must be one of {A2A} and node_size={node_size!r} an integer >= 0 "
                             "(devices per node; 0 = one node)")
        self.remote_fraction, self.a2a, self.node_size = remote_fraction, a2a, node_size
        # against remote experts in the choice (routing.py, "Remote bias"); only when asked, so the state is unchanged
        self.remote_bias = BalanceState(jnp.zeros((), jnp.float32), **axes_metadata(())) if remote_bias else None
        self.deterministic = False
        self.rngs = rngs if jitter_eps > 0 else None

    def __call__(self, x_bld: jax.Array) -> tuple[jax.Array, MoEStats]:
        self._check_input(x_bld)
        batch, length, d_model = x_bld.shape
        group = self.group_size or length
        self._check_call(batch, length)
        x_gsd = x_bld.reshape(batch * length // group, group, d_model)
        x_gsd = constrain(x_gsd, ("batch", "length", "act_embed"))

        with jax.named_scope("moe_route"):
            routed = self._route(x_gsd)
        with jax.named_scope("moe_dispatch"):
            buf_gnd = self._gather_slots(x_gsd, routed)
        groups, pool_slots = buf_gnd.shape[0], (self.num_experts // routed.experts_per_pool) * routed.capacity
        buf_gqpd = buf_gnd[:, :pool_slots].reshape(groups, -1, routed.capacity, d_model)
        out_gqpd = self._exchange(buf_gqpd, self._counts(routed), routed.remote_capacity)
        out_gnd = out_gqpd.reshape(groups, pool_slots, d_model)
        if routed.num_shadows:
            shadow_grcd = buf_gnd[:, pool_slots:].reshape(groups, routed.num_shadows, routed.shadow_capacity, d_model)
            with jax.named_scope("moe_shadows"):
                shadow_out_grcd = self._shadow_experts(shadow_grcd, self.placement[...])
            out_gnd = jnp.concatenate([out_gnd, shadow_out_grcd.reshape(groups, -1, d_model)], axis=1)
        with jax.named_scope("moe_combine"):
            out_gsd = self._combine(out_gnd, routed)
        device_load_x = jnp.sum(routed.pool_load.reshape(_ways("experts"), -1), axis=-1)
        device_rows_x = device_load_x  # a pool's kept rows; shadows add the rows each device computes locally
        if routed.num_shadows and self.capacity_scope == "dropless":  # (only there do rows set the time)
            device_rows_x = device_load_x + self._shadow_rows(routed)
        stats = MoEStats(routed.aux_loss, routed.z_loss, routed.expert_load, routed.dropped_fraction, device_load_x,
                         device_rows_x, routed.shadow_gain, routed.redirected_fraction, routed.internode_fraction,
                         routed.remote_excess, routed.device_aux_loss)
        return out_gsd.reshape(batch, length, d_model), stats

    def _route(self, x_gsd: jax.Array) -> routing_lib.Routing:
        """Router logits and top-k routing (float32) of the tokens `[G, S, D]`."""
        group = x_gsd.shape[1]
        router_in_gsd = x_gsd.astype(jnp.float32)
        if self.jitter_eps > 0 and not self.deterministic:
            router_in_gsd = routing_lib.apply_jitter(router_in_gsd, self.rngs.jitter(), self.jitter_eps)
        logits_gse = lane_einsum("gsd,de->gse", router_in_gsd, self.router[...], split="g")
        capacity_factor = self.eval_capacity_factor if self.deterministic else self.capacity_factor
        expert_cap = routing_lib.capacity(group, self.num_experts, self.top_k, capacity_factor, self.min_capacity)
        pool_cap = 0
        if self.capacity_scope == "dropless":  # train and eval alike: the pool takes every choice (or the bound)
            pool_cap = routing_lib.dropless_capacity(group, self.num_experts, self.top_k, _ways("experts"),
                                                     self.dropless_buffer_factor)
            expert_cap = group  # a shadow takes each token at most once
        return routing_lib.route(
            logits_gse,
            top_k=self.top_k,
            capacity_factor=capacity_factor,
            min_capacity=self.min_capacity,
            renormalize=self.renormalize,
            bias=self.router_bias[...],
            placement=self.placement[...],
            experts_per_pool=self._experts_per_pool(),
            shadow_ids=self.shadow_ids[...] if self.num_shadows else None,
            # a shadow is on every device, so it takes the load of `expert` devices' worth of one expert
            shadow_capacity=min(group, _ways("experts") * expert_cap),
            pool_capacity=pool_cap,
            remote_fraction=self.remote_fraction,
            nodes=self._nodes(),
            group_node=self._group_nodes(x_gsd.shape[0]),
            remote_bias=None if self.remote_bias is None else self.remote_bias[...],
            experts_per_device=self.num_experts // _ways("experts"),
        )

    def _nodes(self) -> int:
        """Nodes the "expert" axis spans (mesh.node_size; 1 off a TED mesh or with node_size 0)."""
        if not _on_ted_mesh():
            return 1
        mesh = jax.sharding.get_abstract_mesh()
        return expert_nodes([int(mesh.shape[a]) for a in MESH_AXES], self.node_size)

    def _group_nodes(self, groups: int) -> jax.Array | None:
        """Node of every routing group `[G]`: that of the device holding it on the "expert" axis ("batch"
        splits the groups into contiguous blocks over ("data", "expert"), "expert" the minor axis)."""
        nodes = self._nodes()
        if nodes == 1:
            return None
        devices, experts = _ways("batch"), _ways("experts")
        rank_g = (np.arange(groups) // (groups // devices)) % experts
        return jnp.asarray(rank_g // (experts // nodes), jnp.int32)

    def update_balance(self, expert_load_e: jax.Array, *, bias_rate: float, load_decay: float,
                       shadow_gain_e: jax.Array | None = None, gain_decay: float = 0.0,
                       remote_excess: jax.Array | None = None, remote_bias_rate: float = 0.0) -> None:
        """After a step, outside the gradient: running means of the load (and of `shadow_gain_e` `[E]`, with
        shadows), the router bias moved by `bias_rate x sign(mean load - load)` (over-loaded experts become
        less likely), and the remote bias by `remote_bias_rate x sign(remote_excess)`, never below 0."""
        load_e = jax.lax.stop_gradient(expert_load_e).astype(jnp.float32)
        steps = self.load_steps[...] + 1
        # the plain mean of the steps seen until there are enough for the exponential one
        weight = jnp.maximum(1.0 - load_decay, 1.0 / steps.astype(jnp.float32))[..., None]  # [..., 1]: stacked too
        self.load_mean[...] = self.load_mean[...] + weight * (load_e - self.load_mean[...])
        if shadow_gain_e is not None:
            gain_e = jax.lax.stop_gradient(shadow_gain_e).astype(jnp.float32)
            gain_weight = jnp.maximum(1.0 - gain_decay, 1.0 / steps.astype(jnp.float32))[..., None]
            self.gain_mean[...] = self.gain_mean[...] + gain_weight * (gain_e - self.gain_mean[...])
        self.load_steps[...] = steps
        if bias_rate:
            self.router_bias[...] = self.router_bias[...] + bias_rate * jnp.sign(1.0 / self.num_experts - load_e)
        if remote_bias_rate and self.remote_bias is not None and remote_excess is not None:
            step_ = remote_bias_rate * jnp.sign(jax.lax.stop_gradient(remote_excess).astype(jnp.float32))
            self.remote_bias[...] = jnp.maximum(self.remote_bias[...] + step_, 0.0)

    def _shadow_rows(self, routed: routing_lib.Routing) -> jax.Array:
        """Fraction of all choices each device of the "expert" axis computes for shadow experts `[X]`: the kept
        shadow rows of its own routing groups (computed where they are)."""
        devices = _ways("experts")
        shadow_g = jnp.sum(routed.kept & (routed.pool_index >= self.num_experts // routed.experts_per_pool),
                           axis=(1, 2))
        # "batch" splits the groups into contiguous blocks over ("data", "expert"), "expert" the minor axis
        rows_x = shadow_g.reshape(-1, devices, shadow_g.shape[0] // _ways("batch")).sum(axis=(0, 2))
        return rows_x.astype(jnp.float32) / routed.kept.size

    def _experts_per_pool(self) -> int:
        """Slots that share capacity: 1 (per expert), or all the experts of one device."""
        return 1 if self.capacity_scope == "expert" else self.num_experts // _ways("experts")

    def _check_input(self, x_bld: jax.Array) -> None:
        """Rank, width and dtype of the input (static, so free under jit), checked before any reshape."""
        shape, dtype = tuple(getattr(x_bld, "shape", ())), getattr(x_bld, "dtype", None)
        d_model = self.router.shape[-2]  # [D, E], or [N, D, E] as lanes (tedjax.layers.lane_einsum)
        if len(shape) != 3 or shape[-1] != d_model:
            raise ValueError(f"MoE input must have shape [batch, length, d_model={d_model}], got {shape}; "
                             "reshape the activations (a single sequence is [1, length, d_model])")
        if dtype is None or not jnp.issubdtype(dtype, jnp.floating):
            raise TypeError(f"MoE input must be floating point activations, got dtype {dtype}; embed token ids "
                            "first, or cast with x.astype(jnp.float32)")

    def _check_call(self, batch: int, length: int) -> None:
        """Shape and mesh errors a user can cause, raised while tracing instead of as reshape or XLA errors."""
        group = self.group_size or length
        if length % group and group % length:
            raise ValueError(f"MoE group_size={group} must divide the sequence length {length} or be a multiple "
                             "of it; set group_size to a divisor of the sequence length (0 = one sequence)")
        if (batch * length) % group:
            raise ValueError(f"MoE input of {batch} x {length} tokens does not split into routing groups of "
                             f"{group}; use a batch whose token count is a multiple of group_size")
        experts = _ways("experts")
        if self.num_experts % experts:
            raise ValueError(f"num_experts={self.num_experts} is not divisible by the {experts} devices that "
                             "split experts (mesh axis of 'experts'); choose a mesh whose expert axis divides it")
        groups = batch * length // group
        for name in ("batch", "expert_batch"):
            if groups % (_ways(name) * self.a2a_chunks):
                chunks = f" in each of a2a_chunks={self.a2a_chunks} chunks" if self.a2a_chunks > 1 else ""
                raise ValueError(f"{groups} routing groups do not split over the {_ways(name)} devices of the "
                                 f"{name!r} layout{chunks}; use a batch of a multiple of "
                                 f"{_ways(name) * self.a2a_chunks} routing groups")

    def _dtd_active(self) -> bool:
        return self.dtd and _ways("capacity_dtd") > 1 and _ways("experts") > 1

    def _gather_slots(self, x_gsd: jax.Array, routed: routing_lib.Routing) -> jax.Array:
        """Every dispatch slot's token `[G, N, D]`: the Q pools of P slots, then the shadow buffers (local gathers)."""
        choice_gn, slot_gc = _slot_maps(routed, self.num_experts)
        return _gather_tokens(x_gsd.astype(self.dtype), choice_gn, slot_gc, routed.expert_index.shape[-1])

    def _exchange(self, buf_gqpd: jax.Array, counts_gqx: jax.Array | None, remote_cap: int = 0) -> jax.Array:
        """Pools to their devices, the experts, and back: `[G, Q, P, D] -> [G, Q, P, D]`.

        Smart scheduling (FasterMoE): with `a2a_chunks = n` the routing groups are
        split into n independent chunks (every device keeps 1/n of its own groups in
        each), so chunk i's all-to-all can run while chunk i-1's experts compute:
        XLA's async collectives and latency-hiding scheduler overlap independent ops.
        """
        chunks = self.a2a_chunks
        if chunks == 1:
            return self._round_trip(buf_gqpd, counts_gqx, remote_cap)

        def split(x, axes):  # [G, ...] -> [G/n, n, ...], each device's groups stay on it
            return constrain(x.reshape(x.shape[0] // chunks, chunks, *x.shape[1:]), ("batch", None, *axes))

        bufs = split(buf_gqpd, (None, "capacity", "act_embed"))
        counts = None if counts_gqx is None else split(counts_gqx, (None, None))
        outs = [self._round_trip(bufs[:, c], None if counts is None else counts[:, c], remote_cap)
                for c in range(chunks)]
        out = jnp.stack(outs, axis=1)
        return constrain(out, ("batch", None, None, "capacity", "act_embed")).reshape(buf_gqpd.shape)

    def _round_trip(self, buf_gqpd: jax.Array, counts_gqx: jax.Array | None, remote_cap: int = 0) -> jax.Array:
        cap = buf_gqpd.shape[2]
        if self.a2a == "hierarchical" and self._nodes() > 1:
            return self._hierarchical_round_trip(buf_gqpd, counts_gqx, remote_cap or cap)
        if self._ragged_exchange():
            return self._ragged_round_trip(buf_gqpd, counts_gqx)
        if not self._dtd_active():
            buf_gqpd = constrain(buf_gqpd, ("batch", None, "capacity", "act_embed"))
            buf_gqpd = constrain(buf_gqpd, ("expert_batch", "experts", "capacity", "act_embed"))  # all-to-all
            buf_gqpd = checkpoint_name(buf_gqpd, "moe_dispatched")
        else:
            buf_gqpd = constrain(_pad_slots(buf_gqpd), ("batch", None, "capacity_dtd", "act_embed"))  # local slice
            buf_gqpd = constrain(buf_gqpd, ("expert_batch", "experts", "capacity_dtd", "act_embed"))  # all-to-all
            buf_gqpd = checkpoint_name(buf_gqpd, "moe_dispatched")
            buf_gqpd = constrain(buf_gqpd, ("expert_batch", "experts", "capacity", "act_embed"))[:, :, :cap]  # all-gather
        if counts_gqx is not None:  # rows per expert in each pool: a small int32 all-to-all
            counts_gqx = constrain(counts_gqx, ("batch", None, None))
            counts_gqx = constrain(counts_gqx, ("expert_batch", "experts", None))
        with jax.named_scope("moe_experts"):
            out_gqpd = self._experts(buf_gqpd, counts_gqx)
        slots = "capacity_dtd" if self._dtd_active() else "capacity"
        out_gqpd = constrain(out_gqpd, ("batch", None, slots, "act_embed"))  # all-to-all back
        out_gqpd = checkpoint_name(out_gqpd, "moe_returned")
        if self._dtd_active():
            out_gqpd = constrain(out_gqpd, ("batch", None, "capacity", "act_embed"))[:, :, :cap]  # all-gather
        return out_gqpd

    def _hierarchical_round_trip(self, buf_gqpd: jax.Array, counts_gqx: jax.Array | None, remote_cap: int
                                 ) -> jax.Array:  # fmt: skip
        """`_round_trip` in two stages (model.a2a "hierarchical"), one `shard_map`, the same `[G, Q, P, D]` result.

        The "expert" axis is M nodes of L ranks. Each device sends its own node's
        pools whole (P_own slots: the gate gives them what remote pools give up)
        and only the first `remote_cap` (r x P) slots of every other node's pools,
        which the gate leaves empty past that: Q x P slots in all, as at r = 1.
        Stage 1: one all-to-all inside each node: rank l gets every pool of
        local rank l of any node, from each node-mate. Stage 2: one all-to-all
        between the ranks l of all nodes carries the remote buffers (its own
        node's block is empty and stays on the device). The expert FFN runs
        on both; the return mirrors it. With DTD each tensor rank moves 1/T
        of the slots and an all-gather over "tensor" rebuilds them.
        """
        dt = self.dtype
        w_gate = None if self.w_gate is None else self.w_gate[...].astype(dt)
        w_in, w_out = self.w_in[...].astype(dt), self.w_out[...].astype(dt)
        axis, reduce_axes, slot_axis = RULES["experts"], RULES["ffn"], RULES["capacity_dtd"]
        nodes, experts = self._nodes(), _ways("experts")
        ranks, dtd, ways = experts // nodes, self._dtd_active(), _ways("capacity_dtd")
        intra = [[m * ranks + l for l in range(ranks)] for m in range(nodes)]
        inter = [[m * ranks + l for m in range(nodes)] for l in range(ranks)]
        ffn = functools.partial(grouped.pool_ffn, method=self.grouped_matmul)

        def a2a(x, groups):  # leading dim: destination in, source out
            return jax.lax.all_to_all(x, axis, 0, 0, tiled=True, axis_index_groups=groups)

        def my_slots(x, slot_dim):  # DTD: this tensor rank's 1/T of the slots (padded with empty ones)
            if not dtd:
                return x
            pad = -x.shape[slot_dim] % ways
            x = jnp.pad(x, [(0, pad if i == slot_dim else 0) for i in range(x.ndim)])
            size = x.shape[slot_dim] // ways
            return jax.lax.dynamic_slice_in_dim(x, jax.lax.axis_index(slot_axis) * size, size, slot_dim)

        def all_slots(x, slot_dim, size, invariant=False):  # DTD: every tensor rank's slots again
            if not dtd:
                return x
            if invariant:  # the layer's output must be the same on every tensor rank: a psum says so, a gather not
                at = jax.lax.axis_index(slot_axis) * x.shape[slot_dim]
                pad = [(0, 0)] * x.ndim
                pad[slot_dim] = (0, x.shape[slot_dim] * (ways - 1))
                x = jax.lax.psum(jax.lax.dynamic_update_slice_in_dim(jnp.zeros_like(jnp.pad(x, pad)), x, at, slot_dim),
                                 slot_axis)
            else:
                x = jax.lax.all_gather(x, slot_axis, axis=slot_dim, tiled=True)
            return jax.lax.slice_in_dim(x, 0, size, axis=slot_dim)

        def swap(own, remote, groups):  # both `[L, ...]` through one all-to-all
            flat = a2a(jnp.concatenate([own.reshape(ranks, -1), remote.reshape(ranks, -1)], axis=1), groups)
            return flat[:, :own[0].size].reshape(own.shape), flat[:, own[0].size:].reshape(remote.shape)

        lanes = w_in.ndim == 4  # lane weights [N, E, ...], N over "expert_batch": this device's lane is its own

        def local(buf, counts, w_in, w_gate, w_out):
            if lanes:
                w_in, w_gate, w_out = (None if w is None else w[0] for w in (w_in, w_gate, w_out))
            groups, pools, cap, d_model = buf.shape
            per_device = pools // experts
            node = jax.lax.axis_index(axis) // ranks
            to_rel = (node + jnp.arange(nodes)) % nodes  # relative node j -> node; j = 0 is this node
            by_rel = jnp.take(buf.reshape(groups, nodes, ranks, per_device, cap, d_model), to_rel, axis=1)
            own = my_slots(jnp.moveaxis(by_rel[:, 0], 1, 0), 3)  # [L, G, Qd, P', D]
            remote = my_slots(jnp.moveaxis(by_rel[:, 1:, :, :, :remote_cap], 2, 0), 4)  # [L, G, M-1, Qd, R', D]
            own, remote = swap(own, remote, intra)  # stage 1: [L_src, ...]
            # stage 2 by node: block m goes to node m, this node's block (relative 0) is empty
            remote = jnp.concatenate([jnp.zeros_like(remote[:, :, :1]), remote], axis=2)
            remote = jnp.take(jnp.moveaxis(remote, 2, 0), (jnp.arange(nodes) - node) % nodes, axis=0)
            remote = a2a(remote, inter)  # [M_src, L_src, G, Qd, R', D]
            own = checkpoint_name(all_slots(own, 3, cap), "moe_dispatched")
            remote = checkpoint_name(all_slots(remote, 4, remote_cap), "moe_dispatched")
            with jax.named_scope("moe_experts"):
                if counts is None:  # per-expert capacity: each local expert on all its rows
                    rows = jnp.concatenate([jnp.moveaxis(own, 2, 0).reshape(per_device, -1, d_model),
                                            jnp.moveaxis(remote, 3, 0).reshape(per_device, -1, d_model)], axis=1)
                    h = jnp.einsum("emd,edf->emf", rows, w_in)
                    h = activate(h, None if w_gate is None else jnp.einsum("emd,edf->emf", rows, w_gate))
                    out = jnp.einsum("emf,efd->emd", h, w_out)
                    own_out = jnp.moveaxis(out[:, :own.size // (per_device * d_model)].reshape(
                        per_device, *own.shape[:2], *own.shape[3:]), 0, 2)
                    remote_out = jnp.moveaxis(out[:, own.size // (per_device * d_model):].reshape(
                        per_device, *remote.shape[:3], *remote.shape[4:]), 0, 3)
                else:  # device pools: rows per expert from the counts, which cross the "expert" axis flat
                    counts_in = jax.lax.all_to_all(counts.reshape(groups, experts, -1), axis, 1, 0, tiled=True)
                    counts_in = counts_in.reshape(nodes, ranks, groups, per_device, -1)
                    own_counts = jnp.take(counts_in, node, axis=0)
                    remote_counts = jnp.where((jnp.arange(nodes) == node)[:, None, None, None, None], 0, counts_in)
                    own_out = ffn(own.reshape(-1, per_device, cap, d_model),
                                  own_counts.reshape(-1, per_device, own_counts.shape[-1]), w_in, w_gate, w_out)
                    remote_out = ffn(remote.reshape(-1, per_device, remote_cap, d_model),
                                     remote_counts.reshape(-1, per_device, own_counts.shape[-1]), w_in, w_gate, w_out)
                    own_out, remote_out = own_out.reshape(own.shape), remote_out.reshape(remote.shape)
                if reduce_axes is not None:  # the FFN's all-reduce
                    own_out, remote_out = jax.lax.psum(own_out, reduce_axes), jax.lax.psum(remote_out, reduce_axes)
            own_out, remote_out = my_slots(own_out, 3), my_slots(remote_out, 4)
            remote_out = a2a(remote_out, inter)  # back by node: [M, L_src, ...], block m from node m
            remote_out = jnp.moveaxis(jnp.take(remote_out, (node + jnp.arange(1, nodes)) % nodes, axis=0), 0, 2)
            own_out, remote_out = swap(own_out, remote_out, intra)  # back to the senders: [L, G, ...]
            own_out = checkpoint_name(all_slots(own_out, 3, cap, invariant=True), "moe_returned")
            remote_out = checkpoint_name(all_slots(remote_out, 4, remote_cap, invariant=True), "moe_returned")
            remote_out = jnp.pad(remote_out, [(0, 0)] * 4 + [(0, cap - remote_cap), (0, 0)])
            by_rel = jnp.concatenate([own_out[:, :, None], remote_out], axis=2)  # [L, G, M (relative), Qd, P, D]
            out = jnp.take(by_rel, (jnp.arange(nodes) - node) % nodes, axis=2)
            return jnp.moveaxis(out, 0, 2).reshape(groups, pools, cap, d_model)

        buf_spec = logical_to_spec(("batch", None, "capacity", "act_embed"))
        lane = ("expert_batch",) if lanes else ()
        in_spec, out_spec = logical_to_spec(lane + EXPERT_IN_AXES), logical_to_spec(lane + EXPERT_OUT_AXES)
        return jax.shard_map(
            local,
            in_specs=(buf_spec, None if counts_gqx is None else logical_to_spec(("batch", None, None)), in_spec,
                      None if w_gate is None else in_spec, out_spec),
            out_specs=buf_spec,
        )(buf_gqpd, counts_gqx, w_in, w_gate, w_out)

    def _ragged_exchange(self) -> str | None:
        """Which ragged all-to-all carries dropless pools: "ragged" (the primitive; GPU/TPU by default),
        "emulated" (its semantics from ordinary collectives, for CPU tests), or None (the static all-to-all).
        DTD's split of the slots over "tensor" keeps the static exchange."""
        if self.capacity_scope != "dropless" or _ways("experts") == 1 or self._dtd_active():
            return None
        if self.exchange == "auto":
            return None if jax.default_backend() == "cpu" else "ragged"
        return None if self.exchange == "static" else self.exchange

    def _ragged_round_trip(self, buf_gqpd: jax.Array, counts_gqx: jax.Array) -> jax.Array:
        """`_round_trip` with only the filled rows of each pool sent, both ways (`tedjax.ragged`), the
        expert FFN between: one `shard_map`, the same `[G, Q, P, D]` result as the static exchange."""
        dt = self.dtype
        w_gate = None if self.w_gate is None else self.w_gate[...].astype(dt)
        w_in, w_out = self.w_in[...].astype(dt), self.w_out[...].astype(dt)
        all_to_all = (jax.lax.ragged_all_to_all if self._ragged_exchange() == "ragged"
                      else ragged_lib.emulated_ragged_all_to_all)
        axis, reduce_axes = RULES["experts"], RULES["ffn"]
        ffn = functools.partial(grouped.pool_ffn, method=self.grouped_matmul, expected_fill=self._pool_fill(),
                                worst_case_pool=self.capacity_scope == "dropless")

        def local(buf_gxpd, counts_gxe, w_in, w_gate, w_out):
            groups, devices, slots, d_model = buf_gxpd.shape
            counts_in = jax.lax.all_to_all(counts_gxe, axis, 1, 0, tiled=True)  # [X * G, 1, E_local]
            sent_xg = jnp.sum(counts_gxe, axis=-1).T
            got_xg = jnp.sum(counts_in, axis=-1).reshape(devices, groups)
            rows = ragged_lib.exchange(jnp.swapaxes(buf_gxpd, 0, 1), sent_xg, got_xg, axis, all_to_all)
            rows = checkpoint_name(rows.reshape(devices * groups, 1, slots, d_model), "moe_dispatched")
            with jax.named_scope("moe_experts"):
                out = ffn(rows, counts_in, w_in, w_gate, w_out)
                out = out if reduce_axes is None else jax.lax.psum(out, reduce_axes)  # the FFN's all-reduce
            out = ragged_lib.exchange(out.reshape(devices, groups, slots, d_model), got_xg, sent_xg, axis, all_to_all)
            return checkpoint_name(jnp.swapaxes(out, 0, 1), "moe_returned")

        buf_spec = logical_to_spec(("batch", None, "capacity", "act_embed"))
        in_spec, out_spec = logical_to_spec(EXPERT_IN_AXES), logical_to_spec(EXPERT_OUT_AXES)
        return jax.shard_map(
            local,
            in_specs=(buf_spec, logical_to_spec(("batch", None, None)), in_spec,
                      None if w_gate is None else in_spec, out_spec),
            out_specs=buf_spec,
        )(buf_gqpd, counts_gqx, w_in, w_gate, w_out)

    def _counts(self, routed: routing_lib.Routing) -> jax.Array | None:
        """Rows per expert in each pool `[G, Q, X]` (X experts per pool), moved with the pools: 4 X bytes
        per pool of P x D elements. None for per-expert capacity (or one expert per device pool)."""
        per_pool = routed.experts_per_pool
        if per_pool == 1 and self.capacity_scope != "dropless":  # dropless pools always say their rows
            return None
        return routed.slot_counts.reshape(routed.slot_counts.shape[0], -1, per_pool)

    def _shadow_experts(self, buf_grcd: jax.Array, placement_e: jax.Array) -> jax.Array:
        """FasterMoE's shadow experts on this device's own tokens `[G, R, C, D]`: no all-to-all.

        `jnp.take` of the R shadow slots from the expert weights (split over
        "expert") is a local masked select plus one all-reduce of R x D x F per
        weight; its transpose sends the gradients back to the owning slots, so
        the optimizer state never moves.
        """
        dt = self.dtype
        slots_r = jnp.take(placement_e, jnp.minimum(self.shadow_ids[...], self.num_experts - 1))  # E: empty

        def shadow(w, axes):
            copy = constrain(jnp.take(w[...], slots_r, axis=0), ("shadow_experts", *axes))  # all-reduce
            return checkpoint_name(copy, "moe_shadow_weights").astype(dt)

        w_in, w_out = shadow(self.w_in, EXPERT_IN_AXES[1:]), shadow(self.w_out, EXPERT_OUT_AXES[1:])
        w_gate = None if self.w_gate is None else shadow(self.w_gate, EXPERT_IN_AXES[1:])
        groups, shadows, cap, d_model = buf_grcd.shape
        rows_rmd = constrain(jnp.swapaxes(buf_grcd, 0, 1).reshape(shadows, groups * cap, d_model),
                             ("shadow_experts", "batch", "act_embed"))
        h_rmf = jnp.einsum("rmd,rdf->rmf", rows_rmd, w_in)
        gate_rmf = None if w_gate is None else jnp.einsum("rmd,rdf->rmf", rows_rmd, w_gate)
        h_rmf = constrain(activate(h_rmf, gate_rmf), ("shadow_experts", "batch", "act_ffn"))
        out_rmd = constrain(jnp.einsum("rmf,rfd->rmd", h_rmf, w_out), ("shadow_experts", "batch", "act_embed"))
        out_rmd = checkpoint_name(out_rmd, "moe_shadow_out")  # after the all-reduce over "tensor"
        return jnp.swapaxes(out_rmd.reshape(shadows, groups, cap, d_model), 0, 1)

    def _experts(self, buf_gqpd: jax.Array, counts_gqx: jax.Array | None) -> jax.Array:
        """Each local expert's FFN on its rows; hidden dim split over "tensor".

        Per-expert capacity: the matmuls run expert-major on `[E, G*C, D]` rows
        (M = G*C): batch dim leading, so XLA uses its GEMM kernels. Written
        `gecd,edf->gecf`, XLA:CPU chose a generic dot plus transposes of the
        `[.., F]` activations, and the layer cost 2x the dense FFN of the same
        FLOPs (benchmarks/overhead.py). Device pools: `grouped.pool_ffn` on each
        device's rows, inside `shard_map` (its sort is local to a device).
        """
        dt = self.dtype
        w_gate = None if self.w_gate is None else self.w_gate[...].astype(dt)
        w_in, w_out = self.w_in[...].astype(dt), self.w_out[...].astype(dt)
        if counts_gqx is None:
            groups, experts, cap, d_model = buf_gqpd.shape
            rows_emd = jnp.swapaxes(buf_gqpd, 0, 1).reshape(experts, groups * cap, d_model)
            # lane weights (NOTES.md section 3.2): the rows M = G x C split by their groups' "data" shards
            lanes = functools.partial(lane_einsum, split="m", lanes="expert_batch")
            h_emf = lanes("emd,edf->emf", rows_emd, w_in)
            gate_emf = None if w_gate is None else lanes("emd,edf->emf", rows_emd, w_gate)
            h_emf = constrain(activate(h_emf, gate_emf), ("experts", "expert_batch", "act_ffn"))
            out_emd = lanes("emf,efd->emd", h_emf, w_out)
            out_gqpd = jnp.swapaxes(out_emd.reshape(experts, groups, cap, d_model), 0, 1)
        else:
            out_gqpd = self._pooled_experts(buf_gqpd, counts_gqx, w_in, w_gate, w_out)
        out_gqpd = constrain(out_gqpd, ("expert_batch", "experts", "capacity", "act_embed"))  # all-reduce
        if self._dtd_active():  # keep this rank's 1/tensor of the slots (local slice)
            out_gqpd = constrain(_pad_slots(out_gqpd), ("expert_batch", "experts", "capacity_dtd", "act_embed"))
        return checkpoint_name(out_gqpd, "moe_expert_out")

    def _pool_fill(self) -> float:
        """The fraction of a device pool's rows that uniform routing fills (sizes `grouped.pool_ffn`'s blocks)."""
        capacity_factor = self.eval_capacity_factor if self.deterministic else self.capacity_factor
        return grouped.expected_fill(self.capacity_scope, self.num_experts, self.top_k, _ways("experts"),
                                     capacity_factor, self.dropless_buffer_factor)

    def _pooled_experts(self, buf_gqpd, counts_gqx, w_in, w_gate, w_out) -> jax.Array:
        ffn = functools.partial(grouped.pool_ffn, method=self.grouped_matmul, expected_fill=self._pool_fill(),
                                worst_case_pool=self.capacity_scope == "dropless")
        if not _on_ted_mesh():
            return ffn(buf_gqpd, counts_gqx, w_in, w_gate, w_out)
        reduce_axes = RULES["ffn"]

        lanes = w_in.ndim == 4  # lane weights [N, E, ...], N over "expert_batch": this device's lane is its own

        def local(buf, counts, w_in, w_gate, w_out):
            if lanes:
                w_in, w_gate, w_out = (None if w is None else w[0] for w in (w_in, w_gate, w_out))
            out = ffn(buf, counts, w_in, w_gate, w_out)
            return out if reduce_axes is None else jax.lax.psum(out, reduce_axes)  # the FFN's all-reduce

        buf_spec = logical_to_spec(("expert_batch", "experts", "capacity", "act_embed"))
        lane = ("expert_batch",) if lanes else ()
        in_spec, out_spec = logical_to_spec(lane + EXPERT_IN_AXES), logical_to_spec(lane + EXPERT_OUT_AXES)
        return jax.shard_map(
            local,
            in_specs=(buf_spec, logical_to_spec(("expert_batch", "experts", None)), in_spec,
                      None if w_gate is None else in_spec, out_spec),
            out_specs=buf_spec,
        )(buf_gqpd, counts_gqx, w_in, w_gate, w_out)

    def _combine(self, out_gnd: jax.Array, routed: routing_lib.Routing) -> jax.Array:
        """Weighted sum of each token's kept choices `[G, S, D]` from the slot outputs `[G, N, D]`."""
        groups, _, d_model = out_gnd.shape
        group_size, top_k = routed.expert_index.shape[1:]
        choice_gn, slot_gc = _slot_maps(routed, self.num_experts)
        picked_gskd = jax.vmap(grouped.gather_rows)(out_gnd, slot_gc, choice_gn)
        picked_gskd = picked_gskd.reshape(groups, group_size, top_k, d_model)
        weight_gsk = routed.combine_weight.astype(picked_gskd.dtype)
        return jnp.einsum("gskd,gsk->gsd", picked_gskd, weight_gsk)


def _slot_maps(routed: routing_lib.Routing, num_experts: int) -> tuple[jax.Array, jax.Array]:
    """The two index maps between choices and dispatch slots, each the other's inverse:
    the choice (s * K + k) in every slot `[G, N]` (S * K where empty), and the slot of every
    choice `[G, S * K]` (N where dropped)."""
    choice_gn = routing_lib.dispatch_indices(routed, num_experts)
    groups, group_size, top_k = routed.expert_index.shape
    num_slots = choice_gn.shape[1]
    slot_gc = jnp.where(routed.kept, routing_lib.slot_positions(routed, num_experts), num_slots)
    return choice_gn, slot_gc.reshape(groups, group_size * top_k)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _gather_tokens(x_gsd: jax.Array, choice_gn: jax.Array, slot_gc: jax.Array, top_k: int) -> jax.Array:
    """Dispatch: slot n of group g holds token choice_gn // K (0 where empty), `[G, N, D]`.

    Its transpose sums each token's K slots with gathers (`slot_gc`). XLA's own
    transpose of the gather is a scatter-add, which XLA:CPU runs element by element.
    """
    return jnp.take_along_axis(x_gsd, (choice_gn // top_k)[..., None], axis=1, mode="fill", fill_value=0)


def _gather_tokens_fwd(x_gsd, choice_gn, slot_gc, top_k):
    return _gather_tokens(x_gsd, choice_gn, slot_gc, top_k), (choice_gn, slot_gc)


def _gather_tokens_bwd(top_k, residual, dbuf_gnd):
    choice_gn, slot_gc = residual
    groups, choices = slot_gc.shape
    picked_gcd = jnp.take_along_axis(dbuf_gnd, slot_gc[..., None], axis=1, mode="fill", fill_value=0)
    dx_gsd = jnp.sum(picked_gcd.reshape(groups, choices // top_k, top_k, -1), axis=2)
    return dx_gsd, None, None


_gather_tokens.defvjp(_gather_tokens_fwd, _gather_tokens_bwd)


def _on_ted_mesh() -> bool:
    mesh = jax.sharding.get_abstract_mesh()
    return not mesh.empty and set(MESH_AXES) <= set(mesh.axis_names)


def _ways(logical_name: str) -> int:
    """How many ways a logical axis is split on the current mesh (1 outside a TED mesh)."""
    return axis_size(jax.sharding.get_abstract_mesh(), logical_name) if _on_ted_mesh() else 1


def _pad_slots(x_gecd: jax.Array) -> jax.Array:
    """Pad the capacity dim with empty slots to a multiple of the ways "capacity_dtd" is split."""
    pad = -x_gecd.shape[2] % _ways("capacity_dtd")
    return jnp.pad(x_gecd, ((0, 0), (0, 0), (0, pad), (0, 0))) if pad else x_gecd
