"""The TED MoE transformer: pre-norm decoder blocks, every `moe_every`-th one MoE."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh

from tedjax.config import ModelConfig, check_mesh
from tedjax.layers import (COLLECTIVE_OUTPUTS, Attention, DenseFFN, RMSNorm, RopeScaling, fan_in_init, lane_einsum,
                           lane_take, param)
from tedjax.mesh import constrain, state_shardings
from tedjax.moe import MoE, MoEStats

REMAT_POLICIES = {
    "full": jax.checkpoint_policies.nothing_saveable,
    "cac": jax.checkpoint_policies.save_only_these_names(*COLLECTIVE_OUTPUTS),
}


def rope_scaling(config: ModelConfig) -> RopeScaling:
    """The model's RoPE scaling settings (model.rope_*)."""
    return RopeScaling(config.rope_scaling, config.rope_factor, config.rope_original_max_len, config.rope_beta_fast,
                       config.rope_beta_slow, config.rope_attention_factor, config.rope_truncate)


class Block(nnx.Module):
    def __init__(self, config: ModelConfig, layer: int, *, rngs: nnx.Rngs):
        dt = config.compute_dtype
        self.attn_norm = RMSNorm(config.d_model, eps=config.norm_eps, rngs=rngs)
        self.attn = Attention(
            config.d_model, config.n_heads, n_kv_heads=config.n_kv_heads, head_dim=config.head_dim,
            qk_norm=config.qk_norm, norm_eps=config.norm_eps, rope_base=config.rope_base, dtype=dt,
            implementation=config.attention, rope_scaling=rope_scaling(config), sliding_window=config.sliding_window,
            rngs=rngs,
        )  # fmt: skip
        self.ffn_norm = RMSNorm(config.d_model, eps=config.norm_eps, rngs=rngs)
        self.is_moe = bool(config.num_experts) and config.is_moe_layer(layer)
        if self.is_moe:
            self.ffn = MoE(
                config.d_model, config.num_experts, config.expert_d_ff,
                top_k=config.top_k, capacity_factor=config.capacity_factor,
                eval_capacity_factor=config.eval_capacity_factor, min_capacity=config.min_capacity,
                group_size=config.group_size, activation=config.activation, jitter_eps=config.jitter_eps,
                renormalize=config.router_renormalize, dtd=config.dtd,
                capacity_scope=config.capacity_scope, shadow_experts=config.shadow_experts,
                a2a_chunks=config.a2a_chunks, dropless_buffer_factor=config.dropless_buffer_factor,
                dtype=dt, rngs=rngs,
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
        vocab = config.padded_vocab  # rows past vocab_size are padding (model.vocab_multiple); their logits are -inf
        self.embed = param(rngs, jax.nn.initializers.normal(1.0), (vocab, config.d_model), ("vocab", "embed"))
        self.blocks = nnx.List([Block(config, i, rngs=rngs) for i in range(config.n_layers)])
        self.final_norm = RMSNorm(config.d_model, eps=config.norm_eps, rngs=rngs)
        self.head = param(rngs, fan_in_init(config.d_model), (config.d_model, vocab), ("embed", "vocab"))

    def __call__(self, tokens_bl: jax.Array) -> tuple[jax.Array, list[MoEStats]]:
        cfg = self.config
        check_tokens(cfg, tokens_bl)  # shapes always, id range when concrete (see check_tokens)
        tokens_bl = constrain(tokens_bl, ("batch", "length"))
        x_bld = lane_take(self.embed[...], tokens_bl).astype(cfg.compute_dtype)
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
        logits_blv = lane_einsum("bld,dv->blv", x_bld, self.head[...].astype(cfg.compute_dtype), split="b")
        logits_blv = constrain(mask_padded_vocab(cfg, logits_blv.astype(jnp.float32)), ("batch", "length", "act_vocab"))
        return logits_blv, all_stats


def mask_padded_vocab(config: ModelConfig, logits_blv: jax.Array) -> jax.Array:
    """-inf at the padded ids (>= vocab_size) of `[..., padded_vocab]` logits: no probability, no gradient."""
    if config.padded_vocab == config.vocab_size:
        return logits_blv
    return jnp.where(jnp.arange(config.padded_vocab) < config.vocab_size, logits_blv, -jnp.inf)


def loss_fn(model: Transformer, batch: dict[str, jax.Array], *, check_ids: bool = False
            ) -> tuple[jax.Array, dict[str, jax.Array]]:  # fmt: skip
    """LM cross-entropy + weighted router losses summed over MoE layers.

    `batch`: {"inputs": int32 [B, L], "targets": int32 [B, L], optional "mask": [B, L]}.
    Returns (total loss, metrics) where metrics hold the parts and per-layer
    expert load `[n_moe, E]`, device load `[n_moe, X]` (X devices of the
    "expert" axis) and dropped fraction `[n_moe]`. Ids must be in
    [0, vocab_size): concrete ids are checked (`check_tokens`, `check_targets`);
    inside jit they are not checked unless `check_ids=True`
    under `jax.experimental.checkify.checkify` (see `checkify_token_ids`).
    """
    cfg = model.config
    if check_ids:
        checkify_token_ids(cfg, batch)
    check_targets(cfg, batch["targets"], batch["inputs"])
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
            device_load=jnp.stack([s.device_load for s in stats]),
            device_rows=jnp.stack([s.device_rows for s in stats]),
            # the busiest device's rows over the mean: the step-time bound once compute follows rows (dropless)
            rows_max_over_mean=jnp.stack([jnp.max(s.device_rows) / jnp.maximum(jnp.mean(s.device_rows), 1e-9)
                                          for s in stats]),
        )
    metrics["loss"] = total
    return total, metrics


def moe_layers(model: Transformer) -> list[MoE]:
    """The model's MoE modules in layer order (the order of its `MoEStats`)."""
    return [block.ffn for block in model.blocks if block.is_moe]


def update_balance(model: Transformer, expert_load_ne: jax.Array, *, bias_rate: float, load_decay: float) -> None:
    """After a step: each MoE layer's load running mean and router bias from its load `[n_moe, E]`."""
    for moe, load_e in zip(moe_layers(model), expert_load_ne):
        moe.update_balance(load_e, bias_rate=bias_rate, load_decay=load_decay)


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


# ---------------------------------------------------------------- input checks (issue 14)


def check_tokens(config: ModelConfig, tokens_bl) -> None:
    """Raise ValueError for token input the model would silently mis-handle.

    Always (shapes are static, so this costs nothing under jit): `[B, L]`
    integers, L <= max_len, and routing groups that tile the sequences.
    When `tokens_bl` is concrete (not traced), also the id range: ids >= vocab_size
    would give a NaN loss, and -1 would silently read the last embedding row.
    Inside jit ids cannot be checked without a cost; see `checkify_token_ids`.
    """
    shape, dtype = getattr(tokens_bl, "shape", None), getattr(tokens_bl, "dtype", None)
    if shape is None or len(shape) != 2 or not jnp.issubdtype(dtype, jnp.integer):
        raise ValueError(f"tokens must be integer ids of shape [batch, length], got shape {shape} dtype {dtype}")
    batch, length = shape
    if length > config.max_len:
        raise ValueError(f"sequence length {length} exceeds model.max_len={config.max_len}; "
                         "shorten the sequences or raise max_len")
    group = config.group_size
    if config.num_experts and group:
        if length % group and group % length:
            raise ValueError(f"model.group_size={group} must divide the sequence length {length} or be a multiple "
                             "of it: routing groups would span parts of two sequences")
        if batch * length % group:
            raise ValueError(f"model.group_size={group} does not tile {batch} x {length} tokens; "
                             f"use a batch whose batch x length is a multiple of {group}")
    _check_id_range(config, tokens_bl, "token")


def check_targets(config: ModelConfig, targets_bl, inputs_bl) -> None:
    """Raise ValueError for loss targets that would give a wrong loss or NaN silently.

    Always: integer ids of the inputs' shape `[B, L]`. When concrete (as in
    `check_tokens`): ids in [0, vocab_size), masked positions included, since an
    id >= vocab_size turns even a masked sum into NaN.
    """
    shape, dtype = getattr(targets_bl, "shape", None), getattr(targets_bl, "dtype", None)
    if shape != getattr(inputs_bl, "shape", None) or not jnp.issubdtype(dtype, jnp.integer):
        raise ValueError(f"targets must be integer ids of the inputs' shape {getattr(inputs_bl, 'shape', None)}, "
                         f"got shape {shape} dtype {dtype}; pass the next-token ids of each input position")
    _check_id_range(config, targets_bl, "target")


def _check_id_range(config: ModelConfig, ids, name: str) -> None:
    """Ids in [0, vocab_size) when `ids` is concrete; traced ids are left to `checkify_token_ids`."""
    if not isinstance(ids, jax.core.Tracer) and ids.size:
        low, high = int(jnp.min(ids)), int(jnp.max(ids))
        if low < 0 or high >= config.vocab_size:
            fix = "give ignored positions any valid id and mask 0" if name == "target" else "fix the tokenizer"
            raise ValueError(f"{name} ids must be in [0, vocab_size={config.vocab_size}), got ids from {low} to "
                             f"{high}; {fix} or raise model.vocab_size")


def checkify_token_ids(config: ModelConfig, batch: dict[str, jax.Array]) -> None:
    """`checkify` checks that every id of `batch`'s inputs and targets is in [0, vocab_size).

    Run the loss under `checkify.checkify(...)` (jit inside or outside) and call
    `err.throw()`; without checkify, jit refuses the check.
    """
    from jax.experimental import checkify

    for name in ("inputs", "targets"):
        ids = batch[name]
        checkify.check(jnp.all((ids >= 0) & (ids < config.vocab_size)),
                       f"{name} token ids must be in [0, vocab_size={config.vocab_size}), got ids from {{low}} to "
                       "{high}", low=jnp.min(ids), high=jnp.max(ids))  # fmt: skip
