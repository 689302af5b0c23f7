"""The TED MoE transformer: pre-norm decoder blocks, every `moe_every`-th one MoE, stacked in units and scanned."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh

from tedjax import pipeline as pipe
from tedjax.config import ModelConfig, PipelineConfig, check_mesh
from tedjax.layers import (COLLECTIVE_OUTPUTS, Attention, DenseFFN, RMSNorm, RopeScaling, fan_in_init, lane_einsum,
                           lane_take, param)
from tedjax.mesh import constrain, resolve_node_size, stage_count, state_shardings
from tedjax.moe import MoE, MoEStats

REMAT_POLICIES = {
    "full": jax.checkpoint_policies.nothing_saveable,
    "cac": jax.checkpoint_policies.save_only_these_names(*COLLECTIVE_OUTPUTS),
}
# Elementwise and layout primitives: cheap to compute again from their inputs, which XLA fuses into the
# backward's own kernels.
_RECOMPUTED = frozenset((
    "abs", "add", "and", "broadcast_in_dim", "ceil", "clamp", "convert_element_type", "copy", "cos", "div", "eq",
    "erf", "exp", "exp2", "expand_dims", "expm1", "floor", "ge", "gt", "integer_pow", "iota", "is_finite", "le",
    "log", "log1p", "logistic", "lt", "max", "min", "mul", "ne", "neg", "not", "or", "pow", "reshape", "rem",
    "round", "rsqrt", "select_n", "sign", "sin", "sqrt", "square", "squeeze", "stop_gradient", "sub", "tanh",
    "transpose", "xor",
))


def save_all_but_elementwise(prim: jax.extend.core.Primitive, *_, **__) -> bool:
    """The scanned units' residual policy without remat: keep every output but those of elementwise ops.

    A scan stacks each residual over units in the loop's carry, where XLA can no longer fuse an
    elementwise producer into its backward consumer as it does in a loop: GELU's tanh alone left five
    `[tokens, F]` stacks. Recomputing elementwise ops in the backward keeps what the loop keeps.
    """
    return prim.name not in _RECOMPUTED


def rope_scaling(config: ModelConfig) -> RopeScaling:
    """The model's RoPE scaling settings (model.rope_*)."""
    return RopeScaling(config.rope_scaling, config.rope_factor, config.rope_original_max_len, config.rope_beta_fast,
                       config.rope_beta_slow, config.rope_attention_factor, config.rope_truncate)


class Block(nnx.Module):
    def __init__(self, config: ModelConfig, layer: int, *, rngs: nnx.Rngs, node_size: int = 0):
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
                remote_fraction=config.remote_fraction, a2a=config.a2a, node_size=node_size,
                remote_bias=config.remote_bias_rate > 0, dtype=dt, rngs=rngs,
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


class Unit(nnx.Module):
    """`moe_every` consecutive blocks, the body of the layer scan; with experts, its last block is MoE.

    `__call__(x [B, L, D]) -> (x [B, L, D], MoEStats of its MoE block or None)`.
    """

    def __init__(self, blocks: list[Block]):
        self.blocks = nnx.List(blocks)

    def __call__(self, x_bld: jax.Array) -> tuple[jax.Array, MoEStats | None]:
        unit_stats = None
        for block in self.blocks:
            x_bld, stats = block(x_bld)
            unit_stats = stats if stats is not None else unit_stats
        return x_bld, unit_stats


def apply_unit(graphdef: nnx.GraphDef, unit_state: nnx.State, x_bld: jax.Array
               ) -> tuple[jax.Array, MoEStats | None, nnx.State]:  # fmt: skip
    """One unit of layers as a pure function: `(x [B, L, D], its MoEStats or None, its state after the call)`.

    `graphdef` and `unit_state` are `nnx.split(model.units)` with the leading
    "layers" axis sliced off (unit i: `jax.tree.map(lambda a: a[i], state)`).
    The state after the call differs only in RNG counts (router jitter).
    """
    unit = nnx.merge(graphdef, unit_state)
    x_bld, stats = unit(x_bld)
    return x_bld, stats, nnx.state(unit)


def stack_units(units: list[Unit]) -> Unit:
    """One Unit whose every variable holds those of `units` along a new leading "layers" axis.

    Stacking blocks built one by one keeps the initial values of an unrolled
    model (the same RNG draws in the same order), so scanning changes no number.
    Each unit's RNG key (router jitter) is folded with its index, so units draw
    different noise.
    """
    graphdef, _ = nnx.split(units[0])
    stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *[nnx.state(u) for u in units])
    unit = nnx.merge(graphdef, stacked)
    for _, node in nnx.iter_graph(unit):
        if isinstance(node, nnx.RngKey):
            node[...] = jax.vmap(jax.random.fold_in)(node[...], jnp.arange(len(units), dtype=jnp.uint32))
        elif isinstance(node, nnx.Variable) and node.get_metadata().get("out_sharding") is not None:
            axes = ("layers", *node.get_metadata()["out_sharding"])
            node.set_metadata(out_sharding=axes, logical_axes=axes)
    return unit


class Transformer(nnx.Module):
    """Decoder-only LM. `__call__(tokens [B, L] int32) -> (logits [B, L, V] f32, [MoEStats per MoE layer])`.

    Its layers are `units`: one `Unit` of `moe_every` blocks whose variables
    all carry a leading "layers" axis of n_layers // moe_every units, run by
    `lax.scan` (`model.scan_layers`) or by a Python loop over the same stacked
    variables. Layers that do not fill a unit (n_layers % moe_every, all dense)
    follow as unrolled `tail` blocks. MoE layer k is unit k's last block.
    On a mesh with "stage" > 1 and a `pipeline` config, the units run through
    `tedjax.pipeline` (embedding, tail and head outside it, as without stages).
    """

    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs, pipeline: PipelineConfig | None = None,
                 node_size: int = 0):
        self.config = config
        self.pipeline = pipeline  # None: never pipelined (generation, Hugging Face export): stages are gathered
        # (stages, repeats) of the stage-major order `units` is stored in (tedjax.pipeline.stored_order); (1, 1):
        # logical. The Trainer stores the circular schedule's, so that no step moves weights between stages.
        self.units_order = (1, 1)
        vocab = config.padded_vocab  # rows past vocab_size are padding (model.vocab_multiple); their logits are -inf
        self.embed = param(rngs, jax.nn.initializers.normal(1.0), (vocab, config.d_model), ("vocab", "embed"))
        blocks = [Block(config, i, rngs=rngs, node_size=node_size) for i in range(config.n_layers)]
        every, units = config.moe_every, config.n_layers // config.moe_every
        self.units = stack_units([Unit(blocks[u * every:(u + 1) * every]) for u in range(units)]) if units else None
        self.tail = nnx.List(blocks[units * every:])
        self.final_norm = RMSNorm(config.d_model, eps=config.norm_eps, rngs=rngs)
        self.head = param(rngs, fan_in_init(config.d_model), (config.d_model, vocab), ("embed", "vocab"))

    def __call__(self, tokens_bl: jax.Array) -> tuple[jax.Array, list[MoEStats]]:
        cfg = self.config
        check_tokens(cfg, tokens_bl)  # shapes always, id range when concrete (see check_tokens)
        tokens_bl = constrain(tokens_bl, ("batch", "length"))
        x_bld = lane_take(self.embed[...], tokens_bl).astype(cfg.compute_dtype)
        x_bld = constrain(x_bld, ("batch", "length", "act_embed"))
        x_bld, all_stats = self.run_units(x_bld)
        for block in self.tail:
            if cfg.remat == "none":
                x_bld, _ = block(x_bld)
            else:
                x_bld, _ = nnx.remat(lambda b, x: b(x), policy=REMAT_POLICIES[cfg.remat])(block, x_bld)
        x_bld = self.final_norm(x_bld)
        logits_blv = lane_einsum("bld,dv->blv", x_bld, self.head[...].astype(cfg.compute_dtype), split="b")
        logits_blv = constrain(mask_padded_vocab(cfg, logits_blv.astype(jnp.float32)), ("batch", "length", "act_vocab"))
        return logits_blv, all_stats

    def run_units(self, x_bld: jax.Array) -> tuple[jax.Array, list[MoEStats]]:
        """All units on `[B, L, D]`: scanned, or looped over the same stacked state; remat per unit."""
        cfg = self.config
        if self.units is None:
            return x_bld, []
        graphdef, state = nnx.split(self.units)
        step = functools.partial(apply_unit, graphdef)
        if cfg.remat != "none":  # inside a scan, the loop already keeps XLA from merging recomputation away
            step = jax.checkpoint(step, policy=REMAT_POLICIES[cfg.remat], prevent_cse=not cfg.scan_layers)
        elif cfg.scan_layers:
            step = jax.checkpoint(step, policy=save_all_but_elementwise, prevent_cse=False)
        n_units = cfg.n_layers // cfg.moe_every
        stages = stage_count(jax.sharding.get_abstract_mesh())
        if stages > 1 and self.pipeline is not None:
            return self._run_pipelined(step, state, x_bld, stages, n_units)
        state = pipe.to_logical(state, *self.units_order)  # (generation from a Trainer's circular state)

        def body(x_bld, unit_state):
            x_bld, stats, unit_state = step(unit_state, x_bld)
            return x_bld, (stats, nnx.filter_state(unit_state, nnx.RngState))

        if cfg.scan_layers:
            x_bld, (stats, rng_state) = jax.lax.scan(body, x_bld, state)
            stats = [jax.tree.map(lambda a, u=u: a[u], stats) for u in range(n_units)] if stats is not None else []
        else:
            outs = []
            for u in range(n_units):
                x_bld, out = body(x_bld, jax.tree.map(lambda a, u=u: a[u], state))
                outs.append(out)
            stats = [s for s, _ in outs if s is not None]
            rng_state = jax.tree.map(lambda *xs: jnp.stack(xs), *[r for _, r in outs])
        nnx.update(self.units, pipe.to_stage_major(rng_state, *self.units_order))
        return x_bld, stats

    def _run_pipelined(self, step, state: nnx.State, x_bld: jax.Array, stages: int, n_units: int
                       ) -> tuple[jax.Array, list[MoEStats]]:  # fmt: skip
        """The units through `tedjax.pipeline.run_batch`: MoE statistics are means over the microbatches.

        Router-jitter RNG counts are not advanced (each microbatch draws from the same keys).
        """
        cfg = self.pipeline
        repeats = cfg.repeats if cfg.schedule == "circular" else 1
        # circular: each stage's runs must be one contiguous block of the "layers" dim (NOTES.md section 10.4). A
        # Trainer stores them so; a state in another order is permuted here, moving weights between stages
        if self.units_order != pipe.stored_order(stages, cfg.schedule, repeats):
            state = pipe.to_stage_major(pipe.to_logical(state, *self.units_order), stages, repeats)
        x_bld, stats_u = pipe.run_batch(lambda unit_state, x: step(unit_state, x)[:2], state, x_bld, stages=stages,
                                        microbatches=cfg.microbatches_for(stages), repeats=repeats)
        if stats_u is None:  # no MoE layer
            return x_bld, []
        return x_bld, [jax.tree.map(lambda a, u=u: a[u], stats_u) for u in range(n_units)]


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
        if cfg.device_aux_loss_weight:  # DeepSeek-V2's device-level balance loss (routing.py)
            metrics["device_aux_loss"] = sum(s.device_aux_loss for s in stats)
            total = total + cfg.device_aux_loss_weight * metrics["device_aux_loss"]
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
            redirected_fraction=jnp.stack([s.redirected_fraction for s in stats]),
            internode_fraction=jnp.stack([s.internode_fraction for s in stats]),
        )
        if cfg.remote_bias_rate:  # what moves the remote bias
            metrics["remote_excess"] = jnp.stack([s.remote_excess for s in stats])
        if cfg.shadow_experts:  # what a shadow of each expert would keep from drops: the shadow policy's input
            metrics["shadow_gain"] = jnp.stack([s.shadow_gain for s in stats])
    metrics["loss"] = total
    return total, metrics


def moe_path(config: ModelConfig) -> tuple:
    """Where the MoE layers are in the model's state (`nnx.to_pure_dict`): the last block of the units."""
    return ("units", "blocks", config.moe_every - 1, "ffn")


def moe_stack(model: Transformer) -> MoE | None:
    """The MoE module of the scanned units (None without experts): every variable has a leading "layers" axis,
    and MoE layer k (the order of the model's `MoEStats`) is index k of it (index
    `pipeline.storage_slot(k, ...)` in a model with `units_order` other than (1, 1))."""
    return model.units.blocks[-1].ffn if model.config.num_experts and model.units is not None else None


def unit_view(model: Transformer, unit: int) -> Unit:
    """A copy of unit `unit` of the model's stack, with its own unstacked variables (changes do not write back)."""
    graphdef, state = nnx.split(model.units)
    slot = pipe.storage_slot(unit, model.config.n_layers // model.config.moe_every, model.units_order)
    return nnx.merge(graphdef, jax.tree.map(lambda a: a[slot], state))


def moe_layer(model: Transformer, layer: int) -> MoE:
    """A copy of MoE layer `layer` as a standalone `MoE` module (its variables unstacked; changes do not write back)."""
    return unit_view(model, layer).blocks[-1].ffn


def update_balance(model: Transformer, expert_load_ne: jax.Array, *, bias_rate: float, load_decay: float,
                   shadow_gain_ne: jax.Array | None = None, gain_decay: float = 0.0,
                   remote_excess_n: jax.Array | None = None, remote_bias_rate: float = 0.0) -> None:
    """After a step: each MoE layer's load running mean and router bias from its load `[n_moe, E]`, the
    running mean of its shadow gain `[n_moe, E]` (with shadows), and its remote bias from `remote_excess_n`."""
    moe = moe_stack(model)
    if moe is not None:
        stored = lambda a: None if a is None else pipe.to_stage_major(a, *model.units_order)  # noqa: E731
        moe.update_balance(stored(expert_load_ne), bias_rate=bias_rate, load_decay=load_decay,
                           shadow_gain_e=stored(shadow_gain_ne), gain_decay=gain_decay,
                           remote_excess=stored(remote_excess_n), remote_bias_rate=remote_bias_rate)


def layer_index(config: ModelConfig, layer: int) -> tuple[tuple, int | None]:
    """(path in the model's state, index on its "layers" axis or None) of decoder layer `layer`'s block."""
    unit, pos = divmod(layer, config.moe_every)
    if unit < config.n_layers // config.moe_every:
        return ("units", "blocks", pos), unit
    return ("tail", layer - config.n_layers // config.moe_every * config.moe_every), None


def unstack_layers(config: ModelConfig, tree: dict, take=None) -> dict:
    """A pure-dict state (params, or a tree like them) with the units unrolled into `blocks` {layer: block
    tree}, the layout of tedjax before scanned layers; `stack_layers` inverts it. `take(leaf, i)` slices
    unit i of a stacked leaf (default `leaf[i]`)."""
    take = (lambda a, i: a[i]) if take is None else take
    out = {k: v for k, v in tree.items() if k not in ("units", "tail")}
    blocks = {}
    for layer in range(config.n_layers):
        path, index = layer_index(config, layer)
        sub = tree
        for key in path:
            sub = sub.get(key, {}) if isinstance(sub, dict) else {}
        if sub:  # (a tree of some variables only, such as the MoE layers' balance state, has no other layers)
            blocks[layer] = sub if index is None else jax.tree.map(lambda a, i=index: take(a, i), sub)
    out["blocks"] = blocks
    return out


def stack_layers(config: ModelConfig, tree: dict, stack=None) -> dict:
    """The inverse of `unstack_layers`: `blocks` {layer: block tree} into `units` (stacked) and `tail`.

    `stack` joins the leaves of the units (default `jnp.stack`; `np.stack` keeps host arrays on the host).
    """
    stack = jnp.stack if stack is None else stack
    blocks = tree["blocks"]
    out = {k: v for k, v in tree.items() if k != "blocks"}
    every, units = config.moe_every, config.n_layers // config.moe_every
    if units:
        out["units"] = {"blocks": {pos: jax.tree.map(lambda *xs: stack(xs), *[blocks[u * every + pos]
                                                                             for u in range(units)])
                                   for pos in range(every) if pos in blocks}}
    tail = {k: blocks[units * every + k] for k in range(config.n_layers - units * every) if units * every + k in blocks}
    if tail:  # (no "tail" key without tail layers, as in `nnx.to_pure_dict`)
        out["tail"] = tail
    return out


def abstract_model(config: ModelConfig, seed: int = 0, pipeline: PipelineConfig | None = None, node_size: int = 0
                   ) -> Transformer:  # fmt: skip
    """The model's structure with ShapeDtypeStruct leaves; nothing is allocated."""
    return nnx.eval_shape(lambda: Transformer(config, rngs=nnx.Rngs(seed), pipeline=pipeline, node_size=node_size))


def init_model(config: ModelConfig, mesh: Mesh, seed: int = 0, pipeline: PipelineConfig | None = None,
               node_size: int = 0) -> Transformer:
    """Build a Transformer whose parameters are created already sharded on `mesh`.

    Shapes come from `eval_shape`, shardings from the logical axes, and a jitted
    init writes each device's shard directly: no unsharded copy ever exists.
    With `pipeline`, a mesh with stages runs the units through tedjax.pipeline.
    """
    check_mesh(config, mesh)
    node_size = resolve_node_size(mesh, node_size)  # 0 = the devices of one host
    graphdef, abstract_state = nnx.split(abstract_model(config, seed, pipeline, node_size))
    shardings = state_shardings(abstract_state, mesh)

    @jax.jit
    def init():
        return nnx.state(Transformer(config, rngs=nnx.Rngs(seed), node_size=node_size))

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
