"""Building blocks shared by the transformer and the MoE layer.

Every parameter is created through `param`, which records its logical axes;
`tedjax.mesh.RULES` turns them into shardings.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from typing import Literal

import jax
import jax.extend.backend
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from tedjax.mesh import MESH_AXES, axes_metadata, constrain, logical_to_spec

# Outputs of collectives, saved by remat="cac" so recomputation issues none.
COLLECTIVE_OUTPUTS = ("attn_out", "ffn_out", "moe_dispatched", "moe_expert_out", "moe_returned",
                      "moe_shadow_weights", "moe_shadow_out")


def param(
    rngs: nnx.Rngs,
    init: Callable,
    shape: Sequence[int],
    logical_axes: Sequence[str | None],
) -> nnx.Param:
    """A float32 parameter that declares its logical axes the Flax way (the only way tedjax makes parameters).

    The axes are Flax's `out_sharding` metadata, so `nnx.get_partition_spec`
    shows them (and maps them under `nnx.logical_axis_rules(tedjax.mesh.flax_rules())`).
    Under a TED mesh the value is created in its sharding; outside one it is unsharded.
    """
    if len(shape) != len(logical_axes):
        raise ValueError(f"shape {tuple(shape)} and logical axes {tuple(logical_axes)} differ in rank")
    value = constrain(init(rngs.params(), tuple(shape), jnp.float32), logical_axes)
    return nnx.Param(value, **axes_metadata(logical_axes))


# ------------------------------------------------ lanes: one gradient reduction per step (NOTES.md section 3.2)
#
# Under gradient accumulation `Trainer` hands the layers each weight as `[N, ...]`: N lanes, one per shard of
# the weight's data-parallel group (split over "batch", or "expert_batch" for expert weights), all equal.
# The helpers below split the activations' batch dim into the same N lanes, so every lane's matmul and its
# weight gradient stay on one device: the gradient is a local partial sum, reduced once after the
# micro-batches. A weight without the extra dim takes the ordinary path.


def lane_einsum(spec: str, x: jax.Array, w: jax.Array, *, split: str, lanes: str = "batch") -> jax.Array:
    """`jnp.einsum(spec, x, w)`; with lane weights `[N, *w]` the dim `split` of x and the output runs as
    N lanes (the `lanes` logical axis), each with its own copy of the weight."""
    ins, out = spec.split("->")
    xs, ws = ins.split(",")
    if w.ndim == len(ws):
        return jnp.einsum(spec, x, w)
    i, o = xs.index(split), out.index(split)
    x = _split_lanes(x, i, w.shape[0], lanes)
    y = jnp.einsum(f"{xs[:i]}Z{xs[i:]},Z{ws}->{out[:o]}Z{out[o:]}", x, w)
    return y.reshape(*y.shape[:o], -1, *y.shape[o + 2:])


def lane_scale(x: jax.Array, scale: jax.Array) -> jax.Array:
    """`x * scale` over the last dim of `[B, ..., D]`; lane scales `[N, D]` each scale their lane of B."""
    if scale.ndim == 1:
        return x * scale
    x = _split_lanes(x, 0, scale.shape[0], "batch")
    return (x * scale.reshape(scale.shape[0], *(1,) * (x.ndim - 2), -1)).reshape(-1, *x.shape[2:])


def lane_take(table: jax.Array, ids_bl: jax.Array) -> jax.Array:
    """Rows of `table` `[V, D]` at `ids_bl` `[B, L]` -> `[B, L, D]`; lane tables `[N, V, D]` serve their lane of B."""
    if table.ndim == 2:
        return jnp.take(table, ids_bl, axis=0)
    ids_nbl = _split_lanes(ids_bl, 0, table.shape[0], "batch")
    rows = jax.vmap(lambda t, i: jnp.take(t, i, axis=0))(table, ids_nbl)
    return rows.reshape(-1, *rows.shape[2:])


def _split_lanes(x: jax.Array, dim: int, lanes: int, logical: str) -> jax.Array:
    """`x` with dim `dim` reshaped to `[lanes, size / lanes]`, the lanes split over `logical`'s mesh axes
    (a local reshape: the lanes are exactly the existing shards)."""
    x = x.reshape(*x.shape[:dim], lanes, x.shape[dim] // lanes, *x.shape[dim + 1:])
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or not set(MESH_AXES) <= set(mesh.axis_names):
        return x
    spec = [jax.sharding.PartitionSpec.UNCONSTRAINED] * x.ndim
    spec[dim] = logical_to_spec((logical,))[0]
    return jax.lax.with_sharding_constraint(x, jax.sharding.PartitionSpec(*spec))


def fan_in_init(fan_in: int) -> Callable:
    return jax.nn.initializers.normal(stddev=fan_in**-0.5)


def activate(h: jax.Array, gate: jax.Array | None) -> jax.Array:
    """GELU(h), or SwiGLU: silu(gate) * h."""
    return jax.nn.gelu(h) if gate is None else jax.nn.silu(gate) * h


class RMSNorm(nnx.Module):
    """x / rms(x) * scale over the last dim, in float32."""

    def __init__(self, dim: int, *, eps: float = 1e-6, rngs: nnx.Rngs):
        self.scale = param(rngs, jax.nn.initializers.ones, (dim,), ("norm",))
        self.eps = eps

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return lane_scale(normed, self.scale[...]).astype(x.dtype)


@dataclasses.dataclass(frozen=True)
class RopeScaling:
    """RoPE frequency scaling as Hugging Face's `rope_type` (transformers' modeling_rope_utils).

    "none": frequencies base^(-i/half). "linear": those / `factor` (positions
    interpolated). "yarn": per frequency, a ramp between the interpolated
    (/ factor) and the original one over the dims whose wavelength spans
    `beta_slow`..`beta_fast` rotations of the `original_max_len` context, and
    cos / sin scaled by `attention_factor` (0 = 0.1 ln(factor) + 1).
    """

    kind: str = "none"
    factor: float = 1.0
    original_max_len: int = 0
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    attention_factor: float = 0.0
    truncate: bool = True

    def frequencies(self, base: float, head_dim: int) -> tuple[np.ndarray, float]:
        """(float32 inverse frequencies `[head_dim / 2]`, cos / sin scale), computed on the host like transformers."""
        half = head_dim // 2
        exponent = np.arange(0, head_dim, 2, dtype=np.float32) / np.float32(head_dim)
        inv_freq = (1.0 / base**exponent).astype(np.float32)
        if self.kind == "none":
            return inv_freq, 1.0
        if self.kind == "linear":
            return (inv_freq / np.float32(self.factor)).astype(np.float32), 1.0
        if self.kind != "yarn":
            raise ValueError(f"unknown RoPE scaling {self.kind!r}; tedjax implements 'none', 'linear' and 'yarn'")
        factor = self.factor
        scale = self.attention_factor or (0.1 * math.log(factor) + 1.0 if factor > 1 else 1.0)

        def correction_dim(rotations: float) -> float:  # the dim whose wavelength fits `rotations` times
            return head_dim * math.log(self.original_max_len / (rotations * 2 * math.pi)) / (2 * math.log(base))

        low, high = correction_dim(self.beta_fast), correction_dim(self.beta_slow)
        if self.truncate:
            low, high = math.floor(low), math.ceil(high)
        low, high = max(low, 0), min(high, head_dim - 1)
        if low == high:
            high += 0.001  # as transformers: no division by zero
        ramp = np.clip((np.arange(half, dtype=np.float32) - np.float32(low)) / np.float32(high - low), 0, 1)
        extrapolate = (1 - ramp).astype(np.float32)
        pos_freqs = (base**exponent).astype(np.float32)
        interpolated = (1.0 / (np.float32(factor) * pos_freqs)).astype(np.float32)
        extrapolated = (1.0 / pos_freqs).astype(np.float32)
        return (interpolated * (1 - extrapolate) + extrapolated * extrapolate).astype(np.float32), float(scale)


def rope(x_blhk: jax.Array, base: float, positions_l: jax.Array | None = None,
         scaling: RopeScaling = RopeScaling()) -> jax.Array:  # fmt: skip
    """Rotary position embedding over the last dim of `[B, L, H, K]` (positions default to 0..L-1).

    Halves convention (x1 = first half, x2 = second half), as Llama / Mixtral / Qwen in Hugging Face;
    `scaling` changes the frequencies (and, for YaRN, the size of cos and sin).
    """
    length = x_blhk.shape[1]
    inv_freq, scale = scaling.frequencies(base, x_blhk.shape[-1])
    freq_k = jnp.asarray(inv_freq)
    pos_l = jnp.arange(length, dtype=jnp.float32) if positions_l is None else positions_l.astype(jnp.float32)
    angle_lk = pos_l[:, None] * freq_k[None, :]
    sin, cos = jnp.sin(angle_lk)[None, :, None, :], jnp.cos(angle_lk)[None, :, None, :]
    if scale != 1.0:
        sin, cos = sin * scale, cos * scale
    x1, x2 = jnp.split(x_blhk.astype(jnp.float32), 2, axis=-1)
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).astype(x_blhk.dtype)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class KVCache:
    """One attention layer's keys and values for T positions: `[B, H_kv, T, K]` each.

    Heads before positions: the layout the attention matmuls read, so XLA
    updates the cache in place instead of transposing it at every step.
    """

    k_bhtk: jax.Array
    v_bhtk: jax.Array


AttentionImpl = Literal["auto", "xla", "cudnn"]
ATTENTION_IMPLS = ("auto", "xla", "cudnn")
CUDNN_DTYPES = (jnp.bfloat16, jnp.float16)


def cudnn_head_dim_limit() -> int:
    """Largest head size cuDNN flash attention takes on the default device: 256 from Hopper (sm 9.0) on, else 128."""
    capability = getattr(jax.devices()[0], "compute_capability", "0.0")
    return 256 if tuple(int(p) for p in str(capability).split(".")[:2]) >= (9, 0) else 128


def on_cuda() -> bool:
    """Whether the default backend is an NVIDIA GPU (cuDNN's only platform)."""
    return jax.default_backend() == "gpu" and "cuda" in jax.extend.backend.get_backend().platform_version.lower()


def attention_implementation(requested: str, dtype, head_dim: int) -> Literal["xla", "cudnn"]:
    """The `implementation` to ask `jax.nn.dot_product_attention` for.

    jax's own default (`None`) always means "xla" in this jax version, so
    tedjax chooses: "auto" is cuDNN flash attention where cuDNN runs it (a CUDA
    GPU, bfloat16/float16 compute, head size a multiple of 8 up to 128, or 256
    from Hopper on) and the XLA implementation everywhere else (CPU, float32).
    """
    if requested == "cudnn" and not on_cuda():
        raise ValueError(
            f"attention implementation 'cudnn' needs an NVIDIA GPU, but the default backend is "
            f"{jax.default_backend()!r}; use 'auto' or 'xla'"
        )
    if requested != "auto":
        return requested  # type: ignore[return-value]
    fits_cudnn = jnp.dtype(dtype) in CUDNN_DTYPES and head_dim % 8 == 0
    return "cudnn" if fits_cudnn and on_cuda() and head_dim <= cudnn_head_dim_limit() else "xla"


class Attention(nnx.Module):
    """Causal self-attention, heads split over "tensor" (Megatron column / row split).

    Grouped-query attention: `n_kv_heads` key/value heads (0 = n_heads), query
    head h reads key/value head h // (n_heads / n_kv_heads), as Hugging Face's
    `repeat_kv`. `qk_norm` adds an RMSNorm over each query and key head before
    RoPE (Qwen3). `head_dim` 0 means d_model // n_heads. `rope_scaling` scales
    RoPE's frequencies (linear, YaRN). `sliding_window` W > 0 lets each query
    see only the W positions ending at its own (Mistral / Mixtral's band, a
    mask in training and in cached decoding alike; 0 = every earlier position).

    The attention itself is `jax.nn.dot_product_attention`: cuDNN flash
    attention on an NVIDIA GPU in bfloat16 (no `[B, H, L, L]` scores in
    memory), its XLA implementation elsewhere; `implementation` ("auto",
    "xla", "cudnn") picks one (see `attention_implementation`). The XLA one
    takes the logits and the softmax in float32 whatever the compute dtype and
    casts the probabilities back to it for the product with the values.
    """

    def __init__(
        self,
        d_model: int,
        n_heads: int,
        *,
        rope_base: float,
        dtype,
        rngs: nnx.Rngs,
        n_kv_heads: int = 0,
        head_dim: int = 0,
        qk_norm: bool = False,
        norm_eps: float = 1e-6,
        implementation: AttentionImpl = "auto",
        rope_scaling: RopeScaling = RopeScaling(),
        sliding_window: int = 0,
    ):
        head_dim = head_dim or d_model // n_heads
        n_kv_heads = n_kv_heads or n_heads
        if n_heads % n_kv_heads:
            raise ValueError(f"n_heads={n_heads} must be a multiple of n_kv_heads={n_kv_heads}")
        if implementation not in ATTENTION_IMPLS:
            raise ValueError(f"attention implementation must be one of {ATTENTION_IMPLS}, got {implementation!r}")
        if implementation == "cudnn" and (jnp.dtype(dtype) not in CUDNN_DTYPES or head_dim % 8 or head_dim > 256):
            raise ValueError(
                f"cuDNN flash attention needs bfloat16 or float16 compute and a head size that is a multiple "
                f"of 8 up to 256 (128 before Hopper), got {jnp.dtype(dtype).name} and {head_dim}; "
                "use implementation 'auto' or 'xla'"
            )
        qkv_axes = ("embed", "heads", "head_dim")
        self.wq = param(rngs, fan_in_init(d_model), (d_model, n_heads, head_dim), qkv_axes)
        self.wk = param(rngs, fan_in_init(d_model), (d_model, n_kv_heads, head_dim), qkv_axes)
        self.wv = param(rngs, fan_in_init(d_model), (d_model, n_kv_heads, head_dim), qkv_axes)
        wo_axes = ("heads", "head_dim", "embed")
        self.wo = param(rngs, fan_in_init(n_heads * head_dim), (n_heads, head_dim, d_model), wo_axes)
        self.q_norm = RMSNorm(head_dim, eps=norm_eps, rngs=rngs) if qk_norm else None
        self.k_norm = RMSNorm(head_dim, eps=norm_eps, rngs=rngs) if qk_norm else None
        self.rope_base, self.dtype, self.implementation = rope_base, dtype, implementation
        self.rope_scaling, self.sliding_window = rope_scaling, sliding_window

    def __call__(self, x_bld: jax.Array) -> jax.Array:
        q_blhk, k_blhk, v_blhk = self._project(x_bld, None)
        impl = attention_implementation(self.implementation, q_blhk.dtype, q_blhk.shape[-1])
        # The band as jax's local window (left W-1, right 0): cuDNN takes it natively, XLA as a mask.
        window = (self.sliding_window - 1, 0) if self.sliding_window else None
        out_blhk = jax.nn.dot_product_attention(q_blhk, k_blhk, v_blhk, is_causal=True, local_window_size=window,
                                                implementation=impl)
        return self._output(out_blhk)

    def cached(self, x_bld: jax.Array, cache: KVCache, start: jax.Array) -> tuple[jax.Array, KVCache]:
        """Attention of `[B, L, D]` tokens at positions start..start+L-1 that also sees the cache.

        Writes this step's keys and values into `cache` (`[B, H_kv, T, K]`) at
        `start` and attends over every cached position up to each query's own.
        Always the XLA implementation: the visible positions depend on `start`,
        a traced value, so they are a `[L, T]` mask, which cuDNN would take as
        a materialised additive bias; and a decode step has one query per
        sequence, where flash attention has nothing to save.
        """
        length, total = x_bld.shape[1], cache.k_bhtk.shape[2]
        positions_l = start + jnp.arange(length, dtype=jnp.int32)
        q_blhk, k_blhk, v_blhk = self._project(x_bld, positions_l)
        cache_axes = ("batch", "act_heads", "length", None)
        dt = cache.k_bhtk.dtype
        k_bhtk = jax.lax.dynamic_update_slice_in_dim(cache.k_bhtk, jnp.swapaxes(k_blhk, 1, 2).astype(dt), start, axis=2)
        v_bhtk = jax.lax.dynamic_update_slice_in_dim(cache.v_bhtk, jnp.swapaxes(v_blhk, 1, 2).astype(dt), start, axis=2)
        k_bhtk, v_bhtk = constrain(k_bhtk, cache_axes), constrain(v_bhtk, cache_axes)
        cached_t = jnp.arange(total, dtype=jnp.int32)
        visible_lt = cached_t[None, :] <= positions_l[:, None]
        if self.sliding_window:  # the same band as training: the W positions ending at the query's own
            visible_lt &= cached_t[None, :] > positions_l[:, None] - self.sliding_window
        k_bthk = jnp.swapaxes(k_bhtk, 1, 2).astype(q_blhk.dtype)
        v_bthk = jnp.swapaxes(v_bhtk, 1, 2).astype(q_blhk.dtype)
        out_blhk = jax.nn.dot_product_attention(
            q_blhk, k_bthk, v_bthk, mask=visible_lt[None, None], implementation="xla"
        )
        return self._output(out_blhk), KVCache(k_bhtk, v_bhtk)

    def _project(self, x_bld: jax.Array, positions_l: jax.Array | None) -> tuple[jax.Array, jax.Array, jax.Array]:
        """Queries `[B, L, H, K]`, keys and values `[B, L, H_kv, K]`, RoPE applied, heads over "tensor"."""
        dt = self.dtype
        q_blhk = lane_einsum("bld,dhk->blhk", x_bld, self.wq[...].astype(dt), split="b")
        k_blhk = lane_einsum("bld,dhk->blhk", x_bld, self.wk[...].astype(dt), split="b")
        if self.q_norm is not None:
            q_blhk, k_blhk = self.q_norm(q_blhk), self.k_norm(k_blhk)
        q_blhk = rope(q_blhk, self.rope_base, positions_l, self.rope_scaling)
        k_blhk = rope(k_blhk, self.rope_base, positions_l, self.rope_scaling)
        v_blhk = lane_einsum("bld,dhk->blhk", x_bld, self.wv[...].astype(dt), split="b")
        # cuDNN's partitioner needs queries, keys and values split alike (batch and heads only).
        axes = ("batch", "length", "act_heads", None)
        return constrain(q_blhk, axes), constrain(k_blhk, axes), constrain(v_blhk, axes)

    def _output(self, out_blhk: jax.Array) -> jax.Array:
        out_blhk = constrain(out_blhk, ("batch", "length", "act_heads", None))
        out_bld = lane_einsum("blhk,hkd->bld", out_blhk, self.wo[...].astype(self.dtype), split="b")
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
        h_blf = lane_einsum("bld,df->blf", x_bld, self.w_in[...].astype(dt), split="b")
        gate_blf = (None if self.w_gate is None
                    else lane_einsum("bld,df->blf", x_bld, self.w_gate[...].astype(dt), split="b"))
        h_blf = constrain(activate(h_blf, gate_blf), ("batch", "length", "act_ffn"))
        out_bld = lane_einsum("blf,fd->bld", h_blf, self.w_out[...].astype(dt), split="b")
        return checkpoint_name(constrain(out_bld, ("batch", "length", "act_embed")), "ffn_out")
