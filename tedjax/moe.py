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
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from tedjax import routing as routing_lib
from tedjax.layers import activate, fan_in_init, param
from tedjax.mesh import MESH_AXES, axis_size, constrain


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class MoEStats:
    """Per-layer routing results that the loss and the logs need."""

    aux_loss: jax.Array  # f32 []
    z_loss: jax.Array  # f32 []
    expert_load: jax.Array  # f32 [E]   fraction of choices per expert, before drops
    dropped_fraction: jax.Array  # f32 []


class MoE(nnx.Module):
    """Top-k MoE FFN on `[B, L, D]` tokens; returns `([B, L, D], MoEStats)`.

    Tokens are routed in groups of `group_size` consecutive tokens (default:
    one sequence), a choice of the model, never of the mesh. Set
    `deterministic=True` (or call `.eval()`) for the eval capacity factor and
    no jitter.
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
        dtd: bool = False,
        dtype=jnp.float32,
        rngs: nnx.Rngs,
    ):
        if not 1 <= top_k <= num_experts:
            raise ValueError(f"top_k={top_k} must be between 1 and num_experts={num_experts}")
        self.router = param(rngs, fan_in_init(d_model), (d_model, num_experts), ("embed", "router_experts"))
        expert_in_axes = ("experts", "embed", "ffn")
        self.w_in = param(rngs, fan_in_init(d_model), (num_experts, d_model, expert_d_ff), expert_in_axes)
        self.w_gate = (
            param(rngs, fan_in_init(d_model), (num_experts, d_model, expert_d_ff), expert_in_axes)
            if activation == "swiglu"
            else None
        )
        self.w_out = param(rngs, fan_in_init(expert_d_ff), (num_experts, expert_d_ff, d_model), ("experts", "ffn", "embed"))
        self.num_experts, self.top_k = num_experts, top_k
        self.capacity_factor, self.eval_capacity_factor = capacity_factor, eval_capacity_factor
        self.min_capacity, self.group_size = min_capacity, group_size
        self.jitter_eps, self.dtd, self.dtype = jitter_eps, dtd, dtype
        self.deterministic = False
        self.rngs = rngs if jitter_eps > 0 else None

    def __call__(self, x_bld: jax.Array) -> tuple[jax.Array, MoEStats]:
        batch, length, d_model = x_bld.shape
        group = self.group_size or length
        x_gsd = x_bld.reshape(batch * length // group, group, d_model)
        x_gsd = constrain(x_gsd, ("batch", "length", "act_embed"))

        router_in_gsd = x_gsd.astype(jnp.float32)
        if self.jitter_eps > 0 and not self.deterministic:
            router_in_gsd = routing_lib.apply_jitter(router_in_gsd, self.rngs.jitter(), self.jitter_eps)
        logits_gse = jnp.einsum("gsd,de->gse", router_in_gsd, self.router[...])
        routed = routing_lib.route(
            logits_gse,
            top_k=self.top_k,
            capacity_factor=self.eval_capacity_factor if self.deterministic else self.capacity_factor,
            min_capacity=self.min_capacity,
        )
        expert_out_gecd = self._experts(self._dispatch(x_gsd, routed))
        out_gsd = self._combine(expert_out_gecd, routed)
        stats = MoEStats(routed.aux_loss, routed.z_loss, routed.expert_load, routed.dropped_fraction)
        return out_gsd.reshape(batch, length, d_model), stats

    def _dtd_active(self) -> bool:
        return self.dtd and _ways("capacity_dtd") > 1 and _ways("experts") > 1

    def _dispatch(self, x_gsd: jax.Array, routed: routing_lib.Routing) -> jax.Array:
        """Token buffer per expert `[G, E, C, D]`, laid out for the expert FFN."""
        groups, _, d_model = x_gsd.shape
        slot_token_gn = routing_lib.dispatch_indices(routed, self.num_experts)
        buf_gnd = jnp.take_along_axis(x_gsd, slot_token_gn[..., None], axis=1, mode="fill", fill_value=0)
        cap = routed.capacity
        buf_gecd = buf_gnd.reshape(groups, self.num_experts, cap, d_model).astype(self.dtype)
        if not self._dtd_active():
            buf_gecd = constrain(buf_gecd, ("batch", None, "capacity", "act_embed"))
            buf_gecd = constrain(buf_gecd, ("expert_batch", "experts", "capacity", "act_embed"))  # all-to-all
            return checkpoint_name(buf_gecd, "moe_dispatched")
        buf_gecd = constrain(_pad_slots(buf_gecd), ("batch", None, "capacity_dtd", "act_embed"))  # local slice
        buf_gecd = constrain(buf_gecd, ("expert_batch", "experts", "capacity_dtd", "act_embed"))  # all-to-all
        buf_gecd = checkpoint_name(buf_gecd, "moe_dispatched")
        buf_gecd = constrain(buf_gecd, ("expert_batch", "experts", "capacity", "act_embed"))  # all-gather
        return buf_gecd[:, :, :cap]

    def _experts(self, buf_gecd: jax.Array) -> jax.Array:
        """Each local expert's FFN on its slots; hidden dim split over "tensor".

        The matmuls run expert-major on `[E, G*C, D]` rows (M = G*C): batch dim
        leading, so XLA uses its GEMM kernels. Written `gecd,edf->gecf`, XLA:CPU
        chose a generic dot plus transposes of the `[.., F]` activations, and
        the layer cost 2x the dense FFN of the same FLOPs (benchmarks/overhead.py).
        """
        dt = self.dtype
        groups, experts, cap, d_model = buf_gecd.shape
        rows_emd = jnp.swapaxes(buf_gecd, 0, 1).reshape(experts, groups * cap, d_model)
        h_emf = jnp.einsum("emd,edf->emf", rows_emd, self.w_in[...].astype(dt))
        gate_emf = None if self.w_gate is None else jnp.einsum("emd,edf->emf", rows_emd, self.w_gate[...].astype(dt))
        h_emf = constrain(activate(h_emf, gate_emf), ("experts", "expert_batch", "act_ffn"))
        out_emd = jnp.einsum("emf,efd->emd", h_emf, self.w_out[...].astype(dt))
        out_gecd = jnp.swapaxes(out_emd.reshape(experts, groups, cap, d_model), 0, 1)
        out_gecd = constrain(out_gecd, ("expert_batch", "experts", "capacity", "act_embed"))  # all-reduce
        if self._dtd_active():  # keep this rank's 1/tensor of the slots (local slice)
            out_gecd = constrain(_pad_slots(out_gecd), ("expert_batch", "experts", "capacity_dtd", "act_embed"))
        return checkpoint_name(out_gecd, "moe_expert_out")

    def _combine(self, out_gecd: jax.Array, routed: routing_lib.Routing) -> jax.Array:
        """Weighted sum of each token's kept choices `[G, S, D]`."""
        dtd = self._dtd_active()
        slots = "capacity_dtd" if dtd else "capacity"
        out_gecd = constrain(out_gecd, ("batch", None, slots, "act_embed"))  # all-to-all back
        out_gecd = checkpoint_name(out_gecd, "moe_returned")
        if dtd:
            out_gecd = constrain(out_gecd, ("batch", None, "capacity", "act_embed"))  # all-gather
            out_gecd = out_gecd[:, :, : routed.capacity]
        groups, experts, cap, d_model = out_gecd.shape
        group_size, top_k = routed.expert_index.shape[1:]
        out_gnd = out_gecd.reshape(groups, experts * cap, d_model)
        pos_gsk = jnp.where(routed.kept, routed.expert_index * cap + routed.slot, 0)
        picked_gskd = jnp.take_along_axis(out_gnd, pos_gsk.reshape(groups, group_size * top_k, 1), axis=1)
        picked_gskd = picked_gskd.reshape(groups, group_size, top_k, d_model)
        weight_gsk = routed.combine_weight.astype(picked_gskd.dtype)
        return jnp.einsum("gskd,gsk->gsd", picked_gskd, weight_gsk)


def _ways(logical_name: str) -> int:
    """How many ways a logical axis is split on the current mesh (1 outside a TED mesh)."""
    mesh = jax.sharding.get_abstract_mesh()
    return 1 if mesh.empty or not set(MESH_AXES) <= set(mesh.axis_names) else axis_size(mesh, logical_name)


def _pad_slots(x_gecd: jax.Array) -> jax.Array:
    """Pad the capacity dim with empty slots to a multiple of the ways "capacity_dtd" is split."""
    pad = -x_gecd.shape[2] % _ways("capacity_dtd")
    return jnp.pad(x_gecd, ((0, 0), (0, 0), (0, pad), (0, 0))) if pad else x_gecd
