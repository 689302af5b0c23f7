"""Building blocks shared by the transformer and the MoE layer.

Every parameter is created through `param`, which records its logical axes;
`tedjax.mesh.RULES` turns them into shardings.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from tedjax.mesh import constrain

# Outputs of collectives, saved by remat="cac" so recomputation issues none.
COLLECTIVE_OUTPUTS = ("attn_out", "ffn_out", "moe_dispatched", "moe_expert_out", "moe_returned")


def param(
    rngs: nnx.Rngs,
    init: Callable,
    shape: Sequence[int],
    logical_axes: Sequence[str | None],
) -> nnx.Param:
    """A float32 parameter that carries its logical axes (the only way tedjax makes parameters)."""
    if len(shape) != len(logical_axes):
        raise ValueError(f"shape {tuple(shape)} and logical axes {tuple(logical_axes)} differ in rank")
    return nnx.Param(init(rngs.params(), tuple(shape), jnp.float32), logical_axes=tuple(logical_axes))


def fan_in_init(fan_in: int) -> Callable:
    return jax.nn.initializers.normal(stddev=fan_in**-0.5)


def activate(h: jax.Array, gate: jax.Array | None) -> jax.Array:
    """GELU(h), or SwiGLU: silu(gate) * h."""
    return jax.nn.gelu(h) if gate is None else jax.nn.silu(gate) * h


class RMSNorm(nnx.Module):
    def __init__(self, dim: int, *, rngs: nnx.Rngs):
        self.scale = param(rngs, jax.nn.initializers.ones, (dim,), ("norm",))

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + 1e-6)
        return (normed * self.scale[...]).astype(x.dtype)


def rope(x_blhk: jax.Array, base: float) -> jax.Array:
    """Rotary position embedding over the last dim of `[B, L, H, K]`."""
    length, half = x_blhk.shape[1], x_blhk.shape[-1] // 2
    freq_k = base ** (-jnp.arange(half, dtype=jnp.float32) / half)
    angle_lk = jnp.arange(length, dtype=jnp.float32)[:, None] * freq_k[None, :]
    sin, cos = jnp.sin(angle_lk)[None, :, None, :], jnp.cos(angle_lk)[None, :, None, :]
    x1, x2 = jnp.split(x_blhk.astype(jnp.float32), 2, axis=-1)
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).astype(x_blhk.dtype)


class Attention(nnx.Module):
    """Causal self-attention, heads split over "tensor" (Megatron column / row split)."""

    def __init__(self, d_model: int, n_heads: int, *, rope_base: float, dtype, rngs: nnx.Rngs):
        head_dim = d_model // n_heads
        qkv_shape, qkv_axes = (d_model, n_heads, head_dim), ("embed", "heads", "head_dim")
        self.wq = param(rngs, fan_in_init(d_model), qkv_shape, qkv_axes)
        self.wk = param(rngs, fan_in_init(d_model), qkv_shape, qkv_axes)
        self.wv = param(rngs, fan_in_init(d_model), qkv_shape, qkv_axes)
        self.wo = param(rngs, fan_in_init(d_model), (n_heads, head_dim, d_model), ("heads", "head_dim", "embed"))
        self.rope_base, self.dtype = rope_base, dtype

    def __call__(self, x_bld: jax.Array) -> jax.Array:
        dt = self.dtype
        q_blhk = rope(jnp.einsum("bld,dhk->blhk", x_bld, self.wq[...].astype(dt)), self.rope_base)
        k_blhk = rope(jnp.einsum("bld,dhk->blhk", x_bld, self.wk[...].astype(dt)), self.rope_base)
        v_blhk = jnp.einsum("bld,dhk->blhk", x_bld, self.wv[...].astype(dt))
        q_blhk = constrain(q_blhk, ("batch", "length", "act_heads", None))
        scores_bhqs = jnp.einsum("bqhk,bshk->bhqs", q_blhk, k_blhk).astype(jnp.float32)
        scores_bhqs = scores_bhqs * q_blhk.shape[-1] ** -0.5
        length = x_bld.shape[1]
        causal_qs = jnp.tril(jnp.ones((length, length), dtype=bool))
        scores_bhqs = jnp.where(causal_qs, scores_bhqs, jnp.finfo(jnp.float32).min)
        probs_bhqs = jax.nn.softmax(scores_bhqs, axis=-1).astype(dt)
        out_blhk = jnp.einsum("bhqs,bshk->bqhk", probs_bhqs, v_blhk)
        out_bld = jnp.einsum("blhk,hkd->bld", out_blhk, self.wo[...].astype(dt))
        # Row-parallel output: the tensor all-reduce happens here.
        return checkpoint_name(constrain(out_bld, ("batch", "length", "act_embed")), "attn_out")


class DenseFFN(nnx.Module):
    """Dense FFN, hidden units split over "tensor"."""

    def __init__(self, d_model: int, d_ff: int, *, activation: str, dtype, rngs: nnx.Rngs):
        self.w_in = param(rngs, fan_in_init(d_model), (d_model, d_ff), ("embed", "ffn"))
        self.w_gate = (
            param(rngs, fan_in_init(d_model), (d_model, d_ff), ("embed", "ffn")) if activation == "swiglu" else None
        )
        self.w_out = param(rngs, fan_in_init(d_ff), (d_ff, d_model), ("ffn", "embed"))
        self.dtype = dtype

    def __call__(self, x_bld: jax.Array) -> jax.Array:
        dt = self.dtype
        h_blf = jnp.einsum("bld,df->blf", x_bld, self.w_in[...].astype(dt))
        gate_blf = None if self.w_gate is None else jnp.einsum("bld,df->blf", x_bld, self.w_gate[...].astype(dt))
        h_blf = constrain(activate(h_blf, gate_blf), ("batch", "length", "act_ffn"))
        out_bld = jnp.einsum("blf,fd->bld", h_blf, self.w_out[...].astype(dt))
        return checkpoint_name(constrain(out_bld, ("batch", "length", "act_embed")), "ffn_out")
