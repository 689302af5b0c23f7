"""The TED MoE transformer: pre-norm decoder blocks, every `moe_every`-th one MoE."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh

from tedjax.config import ModelConfig, check_mesh
from tedjax.layers import COLLECTIVE_OUTPUTS, Attention, DenseFFN, RMSNorm, fan_in_init, param
from tedjax.mesh import constrain, state_shardings
from tedjax.moe import MoE, MoEStats

REMAT_POLICIES = {
    "full": jax.checkpoint_policies.nothing_saveable,
    "cac": jax.checkpoint_policies.save_only_these_names(*COLLECTIVE_OUTPUTS),
}


class Block(nnx.Module):
    def __init__(self, config: ModelConfig, layer: int, *, rngs: nnx.Rngs):
        dt = config.compute_dtype
        self.attn_norm = RMSNorm(config.d_model, rngs=rngs)
        self.attn = Attention(config.d_model, config.n_heads, rope_base=config.rope_base, dtype=dt, rngs=rngs)
        self.ffn_norm = RMSNorm(config.d_model, rngs=rngs)
        self.is_moe = bool(config.num_experts) and config.is_moe_layer(layer)
        if self.is_moe:
            self.ffn = MoE(
                config.d_model, config.num_experts, config.expert_d_ff,
                top_k=config.top_k, capacity_factor=config.capacity_factor,
                eval_capacity_factor=config.eval_capacity_factor, min_capacity=config.min_capacity,
                group_size=config.group_size, activation=config.activation, jitter_eps=config.jitter_eps,
                dtd=config.dtd, dtype=dt, rngs=rngs,
            )  # fmt: skip
        else:
            width = config.top_k * config.expert_d_ff if config.is_moe_layer(layer) else config.d_ff
            self.ffn = DenseFFN(config.d_model, width, activation=config.activation, dtype=dt, rngs=rngs)

    def __call__(self, x_bld: jax.Array) -> tuple[jax.Array, MoEStats | None]:
        x_bld = x_bld + self.attn(self.attn_norm(x_bld))
        if self.is_moe:
            h_bld, stats = self.ffn(self.ffn_norm(x_bld))
        else:
            h_bld, stats = self.ffn(self.ffn_norm(x_bld)), None
        return constrain(x_bld + h_bld, ("batch", "length", "act_embed")), stats


class Transformer(nnx.Module):
    """Decoder-only LM. `__call__(tokens [B, L] int32) -> (logits [B, L, V] f32, [MoEStats per MoE layer])`."""

    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
        self.config = config
        self.embed = param(rngs, jax.nn.initializers.normal(1.0), (config.vocab_size, config.d_model), ("vocab", "embed"))
        self.blocks = nnx.List([Block(config, i, rngs=rngs) for i in range(config.n_layers)])
        self.final_norm = RMSNorm(config.d_model, rngs=rngs)
        self.head = param(rngs, fan_in_init(config.d_model), (config.d_model, config.vocab_size), ("embed", "vocab"))

    def __call__(self, tokens_bl: jax.Array) -> tuple[jax.Array, list[MoEStats]]:
        cfg = self.config
        tokens_bl = constrain(tokens_bl, ("batch", "length"))
        x_bld = jnp.take(self.embed[...], tokens_bl, axis=0).astype(cfg.compute_dtype)
        x_bld = constrain(x_bld, ("batch", "length", "act_embed"))
        all_stats = []
        for block in self.blocks:
            if cfg.remat == "none":
                x_bld, stats = block(x_bld)
            else:
                x_bld, stats = nnx.remat(lambda b, x: b(x), policy=REMAT_POLICIES[cfg.remat])(block, x_bld)
            if stats is not None:
                all_stats.append(stats)
        x_bld = self.final_norm(x_bld)
        logits_blv = jnp.einsum("bld,dv->blv", x_bld, self.head[...].astype(cfg.compute_dtype))
        logits_blv = constrain(logits_blv.astype(jnp.float32), ("batch", "length", "act_vocab"))
        return logits_blv, all_stats


def loss_fn(model: Transformer, batch: dict[str, jax.Array]) -> tuple[jax.Array, dict[str, jax.Array]]:
    """LM cross-entropy + weighted router losses summed over MoE layers.

    `batch`: {"inputs": int32 [B, L], "targets": int32 [B, L], optional "mask": [B, L]}.
    Returns (total loss, metrics) where metrics hold the parts and per-layer
    expert load `[n_moe, E]` and dropped fraction `[n_moe]`.
    """
    cfg = model.config
    logits_blv, stats = model(batch["inputs"])
    token_loss_bl = optax.softmax_cross_entropy_with_integer_labels(logits_blv, batch["targets"])
    mask_bl = batch.get("mask")
    if mask_bl is None:
        lm_loss = jnp.mean(token_loss_bl)
    else:
        mask_bl = mask_bl.astype(jnp.float32)
        lm_loss = jnp.sum(token_loss_bl * mask_bl) / jnp.maximum(jnp.sum(mask_bl), 1.0)
    metrics = {"lm_loss": lm_loss}
    total = lm_loss
    if stats:
        aux = sum(s.aux_loss for s in stats)
        z = sum(s.z_loss for s in stats)
        total = total + cfg.aux_loss_weight * aux + cfg.z_loss_weight * z
        metrics.update(
            aux_loss=aux,
            z_loss=z,
            expert_load=jnp.stack([s.expert_load for s in stats]),
            dropped_fraction=jnp.stack([s.dropped_fraction for s in stats]),
        )
    metrics["loss"] = total
    return total, metrics


def abstract_model(config: ModelConfig, seed: int = 0) -> Transformer:
    """The model's structure with ShapeDtypeStruct leaves; nothing is allocated."""
    return nnx.eval_shape(lambda: Transformer(config, rngs=nnx.Rngs(seed)))


def init_model(config: ModelConfig, mesh: Mesh, seed: int = 0) -> Transformer:
    """Build a Transformer whose parameters are created already sharded on `mesh`.

    Shapes come from `eval_shape`, shardings from the logical axes, and a jitted
    init writes each device's shard directly: no unsharded copy ever exists.
    """
    check_mesh(config, mesh)
    graphdef, abstract_state = nnx.split(abstract_model(config, seed))
    shardings = state_shardings(abstract_state, mesh)

    @jax.jit
    def init():
        return nnx.state(Transformer(config, rngs=nnx.Rngs(seed)))

    with jax.set_mesh(mesh):
        state = jax.jit(init, out_shardings=shardings)()
    return nnx.merge(graphdef, state)
