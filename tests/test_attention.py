"""Attention through `jax.nn.dot_product_attention` against the explicit einsum attention it replaced.

`reference_attend` below is tedjax's previous attention, kept verbatim: float32
`[B, H, L, L]` scores from einsums, GQA by grouping the query heads. The layer
must match it on one device (float32 to round-off, bfloat16 with no loss of
accuracy), in its gradients, in the KV-cached decoding path, and on meshes
that split the heads over "tensor", where it must also compile to the same
collectives.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import tedjax
from tedjax import layers
from tedjax.analysis import collectives, summarize
from tedjax.layers import Attention, KVCache, attention_implementation
from tedjax.mesh import named_sharding, state_shardings

BATCH, LENGTH, D_MODEL, HEADS, HEAD_DIM = 8, 16, 32, 8, 8
ARCHS = {  # name -> (n_kv_heads, qk_norm)
    "mha": (0, False),
    "gqa": (4, True),  # 2 query heads per key/value head, RMSNorm over q and k heads (Qwen3)
    "mqa": (1, False),  # 1 key/value head (cannot split over "tensor")
}
# Tolerances are relative to each array's size. float32: largest difference over largest entry
# (measured <= 4e-7: round-off of the same products summed in another order). bfloat16: root mean
# square difference over root mean square (measured <= 9e-3; bfloat16 rounds at 2^-9 = 2e-3).
F32_TOL = 2e-6
BF16_TOL = 2e-2


def reference_attend(q_bqhk, k_bshk, v_bshk, visible_qs, dtype):
    """tedjax's attention before jax.nn.dot_product_attention: softmax over float32 scores `[B, H, Q, S]`."""
    batch, queries, heads, head_dim = q_bqhk.shape
    kv_heads = k_bshk.shape[2]
    if kv_heads == heads:
        scores_bhqs = jnp.einsum("bqhk,bshk->bhqs", q_bqhk, k_bshk).astype(jnp.float32)
    else:
        q_bqgrk = q_bqhk.reshape(batch, queries, kv_heads, heads // kv_heads, head_dim)
        scores_bhqs = jnp.einsum("bqgrk,bsgk->bgrqs", q_bqgrk, k_bshk).astype(jnp.float32)
        scores_bhqs = scores_bhqs.reshape(batch, heads, queries, -1)
    scores_bhqs = scores_bhqs * head_dim**-0.5
    scores_bhqs = jnp.where(visible_qs, scores_bhqs, jnp.finfo(jnp.float32).min)
    probs_bhqs = jax.nn.softmax(scores_bhqs, axis=-1).astype(dtype)
    if kv_heads == heads:
        return jnp.einsum("bhqs,bshk->bqhk", probs_bhqs, v_bshk)
    probs_bgrqs = probs_bhqs.reshape(batch, kv_heads, heads // kv_heads, queries, -1)
    out_bqgrk = jnp.einsum("bgrqs,bsgk->bqgrk", probs_bgrqs, v_bshk)
    return out_bqgrk.reshape(batch, queries, heads, head_dim)


def reference_forward(attn: Attention, x_bld):
    """The layer's own projections, RoPE and output, with the reference attention between them."""
    q_blhk, k_blhk, v_blhk = attn._project(x_bld, None)
    causal_qs = jnp.tril(jnp.ones((x_bld.shape[1],) * 2, dtype=bool))
    return attn._output(reference_attend(q_blhk, k_blhk, v_blhk, causal_qs, attn.dtype))


def make_attention(arch: str, dtype) -> Attention:
    n_kv_heads, qk_norm = ARCHS[arch]
    return Attention(D_MODEL, HEADS, n_kv_heads=n_kv_heads, head_dim=HEAD_DIM, qk_norm=qk_norm,
                     rope_base=10000.0, dtype=dtype, rngs=nnx.Rngs(0))  # fmt: skip


def _inputs(dtype):
    rng = np.random.default_rng(1)
    x_bld = jnp.asarray(rng.normal(size=(BATCH, LENGTH, D_MODEL)), dtype)
    cotangent_bld = jnp.asarray(rng.normal(size=(BATCH, LENGTH, D_MODEL)), jnp.float32)
    return x_bld, cotangent_bld


def _value_and_grads(graphdef, state, x_bld, cotangent_bld, reference):
    def loss(state, x_bld):
        attn = nnx.merge(graphdef, state)
        y_bld = reference_forward(attn, x_bld) if reference else attn(x_bld)
        return jnp.sum(y_bld.astype(jnp.float32) * cotangent_bld), y_bld

    (_, y_bld), grads = jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)(state, x_bld)
    return y_bld, grads


_value_and_grads_jit = jax.jit(_value_and_grads, static_argnames=("graphdef", "reference"))


def run(arch: str, dtype, mesh, reference: bool):
    """(output, (param grads, input grads) as numpy, compiled) of the layer on `mesh`."""
    graphdef, state = nnx.split(make_attention(arch, dtype))
    x_bld, cotangent_bld = _inputs(dtype)
    with jax.set_mesh(mesh):
        state = jax.device_put(state, state_shardings(state, mesh))
        x_bld = jax.device_put(x_bld, named_sharding(mesh, ("batch", "length", "act_embed")))
        cotangent_bld = jax.device_put(cotangent_bld, named_sharding(mesh, ("batch", "length", "act_embed")))
        compiled = _value_and_grads_jit.lower(graphdef, state, x_bld, cotangent_bld, reference).compile()
        y_bld, grads = compiled(state, x_bld, cotangent_bld)
    to_np = lambda t: jax.tree.map(lambda a: np.asarray(a, np.float32), t)
    return to_np(y_bld), to_np(grads), compiled


def one_device():
    return tedjax.make_mesh(1, 1, 1, devices=jax.devices()[:1])


def max_diff(a, b) -> float:
    """Largest |a - b| over the largest |b|, the worst array of the trees."""
    return max(float(np.max(np.abs(x - y)) / np.max(np.abs(y))) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def rms_diff(a, b) -> float:
    """||a - b|| / ||b||, the worst array of the trees."""
    return max(float(np.linalg.norm(x - y) / np.linalg.norm(y)) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


@pytest.fixture(scope="module")
def single():
    """(arch, dtype name, "new" | "reference") -> run(...) on one device, computed lazily and kept."""
    cache = {}

    def get(arch, dtype, which):
        key = (arch, dtype, which)
        if key not in cache:
            cache[key] = run(arch, jnp.dtype(dtype).type, one_device(), reference=which == "reference")
        return cache[key]

    return get


# ---------------------------------------------------------------- one device


@pytest.mark.parametrize("arch", list(ARCHS))
def test_float32_equals_reference(single, arch):
    y_new, grads_new, _ = single(arch, "float32", "new")
    y_ref, grads_ref, _ = single(arch, "float32", "reference")
    assert np.abs(y_ref).max() > 0.1  # a real signal, not zeros
    assert max_diff(y_new, y_ref) <= F32_TOL
    assert max_diff(grads_new, grads_ref) <= F32_TOL


@pytest.mark.parametrize("arch", ["mha", "gqa"])
def test_bfloat16_equals_reference_and_is_no_less_accurate(single, arch):
    y_new, grads_new, _ = single(arch, "bfloat16", "new")
    y_ref, grads_ref, _ = single(arch, "bfloat16", "reference")
    y_f32, grads_f32, _ = single(arch, "float32", "reference")
    assert rms_diff(y_new, y_ref) <= BF16_TOL
    assert rms_diff(grads_new, grads_ref) <= BF16_TOL
    # Softmax in float32 on float32 logits: no further from the float32 result than the old path,
    # which rounded the logits to bfloat16 before its float32 softmax (5% is the noise between leaves).
    assert rms_diff(y_new, y_f32) <= 1.05 * rms_diff(y_ref, y_f32)
    assert rms_diff(grads_new, grads_f32) <= 1.05 * rms_diff(grads_ref, grads_f32)


def test_bfloat16_stays_bfloat16():
    attn = make_attention("gqa", jnp.bfloat16)
    x_bld, _ = _inputs(jnp.bfloat16)
    assert jax.eval_shape(attn, x_bld).dtype == jnp.bfloat16


# ---------------------------------------------------------------- KV-cached decoding


def _prefill_then_decode(graphdef, state, x_bld, prompt: int):
    """Outputs `[B, L, D]` of a prefill of `prompt` tokens into an empty cache, then one-token decode steps."""
    attn = nnx.merge(graphdef, state)
    kv_heads = attn.wk.shape[1]
    zeros = jnp.zeros((x_bld.shape[0], kv_heads, x_bld.shape[1], attn.wk.shape[2]), attn.dtype)
    y_prompt, cache = attn.cached(x_bld[:, :prompt], KVCache(zeros, zeros), jnp.int32(0))

    def step(cache, position):
        x_b1d = jax.lax.dynamic_slice_in_dim(x_bld, position, 1, axis=1)
        y_b1d, cache = attn.cached(x_b1d, cache, position)
        return cache, y_b1d[:, 0]

    _, y_steps = jax.lax.scan(step, cache, jnp.arange(prompt, x_bld.shape[1], dtype=jnp.int32))
    return jnp.concatenate([y_prompt, jnp.swapaxes(y_steps, 0, 1)], axis=1)


@pytest.mark.parametrize("arch", ["mha", "gqa"])
def test_cached_decoding_equals_full_forward(single, arch):
    graphdef, state = nnx.split(make_attention(arch, jnp.float32))
    x_bld, _ = _inputs(jnp.float32)
    y_cached = jax.jit(_prefill_then_decode, static_argnames=("graphdef", "prompt"))(graphdef, state, x_bld, prompt=5)
    y_full, _, _ = single(arch, "float32", "new")
    assert max_diff(np.asarray(y_cached), y_full) <= F32_TOL


# ---------------------------------------------------------------- heads split over "tensor"


@pytest.mark.parametrize("tensor", [2, 4])
@pytest.mark.parametrize("arch", ["mha", "gqa"])
def test_mesh_equals_one_device_with_the_same_collectives(single, arch, tensor):
    mesh = tedjax.make_mesh(8 // tensor, 1, tensor)
    y_mesh, grads_mesh, compiled = run(arch, jnp.float32, mesh, reference=False)
    y_one, grads_one, _ = single(arch, "float32", "new")
    assert max_diff(y_mesh, y_one) <= F32_TOL
    assert max_diff(grads_mesh, grads_one) <= F32_TOL
    # Heads stay on their tensor rank: the only tensor collective of the old path is the row-parallel
    # output's all-reduce (and, with qk_norm, the norm scales' gradient sums); nothing is added.
    _, _, compiled_ref = run(arch, jnp.float32, mesh, reference=True)
    found = summarize(collectives(compiled, mesh))
    assert found == summarize(collectives(compiled_ref, mesh))
    assert {kind for kind, _ in found} == {"all-reduce"}
    assert ("all-reduce", ("tensor",)) in found


# ---------------------------------------------------------------- choosing the implementation


def test_auto_picks_cudnn_only_where_it_runs(monkeypatch):
    assert attention_implementation("auto", jnp.bfloat16, 64) == "xla"  # CPU
    monkeypatch.setattr(layers, "on_cuda", lambda: True)
    monkeypatch.setattr(layers, "cudnn_head_dim_limit", lambda: 128)
    assert attention_implementation("auto", jnp.bfloat16, 64) == "cudnn"
    assert attention_implementation("auto", jnp.float16, 128) == "cudnn"
    assert attention_implementation("auto", jnp.float32, 64) == "xla"  # cuDNN takes 16-bit inputs only
    assert attention_implementation("auto", jnp.bfloat16, 60) == "xla"  # not a multiple of 8
    assert attention_implementation("auto", jnp.bfloat16, 256) == "xla"  # above the pre-Hopper limit
    monkeypatch.setattr(layers, "cudnn_head_dim_limit", lambda: 256)
    assert attention_implementation("auto", jnp.bfloat16, 256) == "cudnn"
    assert attention_implementation("xla", jnp.bfloat16, 64) == "xla"


def test_bad_implementation_is_refused():
    with pytest.raises(ValueError, match="must be one of"):
        Attention(D_MODEL, HEADS, rope_base=1e4, dtype=jnp.float32, rngs=nnx.Rngs(0), implementation="flash")
    with pytest.raises(ValueError, match="bfloat16 or float16"):
        Attention(D_MODEL, HEADS, rope_base=1e4, dtype=jnp.float32, rngs=nnx.Rngs(0), implementation="cudnn")
    with pytest.raises(ValueError, match="multiple of 8"):
        Attention(
            D_MODEL, HEADS, head_dim=12, rope_base=1e4, dtype=jnp.bfloat16, rngs=nnx.Rngs(0), implementation="cudnn"
        )
    attn = Attention(D_MODEL, HEADS, head_dim=HEAD_DIM, rope_base=1e4, dtype=jnp.bfloat16, rngs=nnx.Rngs(0),
                     implementation="cudnn")  # fmt: skip
    with pytest.raises(ValueError, match="needs an NVIDIA GPU"):
        jax.eval_shape(attn, jnp.zeros((1, 4, D_MODEL), jnp.bfloat16))


# ---------------------------------------------------------------- sliding window and RoPE scaling (issue 20)

WINDOW = 5  # over LENGTH = 16 positions


def test_sliding_window_is_a_band_in_training_and_in_decoding():
    """Each query sees the WINDOW positions ending at its own: the reference with a band mask, the full
    forward (jax's local window) and prefill + one-token decoding (a band in the cache mask) all agree."""
    attn = Attention(D_MODEL, HEADS, n_kv_heads=4, head_dim=HEAD_DIM, rope_base=10000.0, dtype=jnp.float32,
                     sliding_window=WINDOW, rngs=nnx.Rngs(0))  # fmt: skip
    x_bld, _ = _inputs(jnp.float32)
    q_blhk, k_blhk, v_blhk = attn._project(x_bld, None)
    position = np.arange(LENGTH)
    band_qs = (position[None, :] <= position[:, None]) & (position[None, :] > position[:, None] - WINDOW)
    y_reference = np.asarray(attn._output(reference_attend(q_blhk, k_blhk, v_blhk, band_qs, jnp.float32)))
    y_full = np.asarray(jax.jit(lambda x: attn(x))(x_bld))
    assert max_diff(y_full, y_reference) <= F32_TOL
    graphdef, state = nnx.split(attn)
    y_cached = jax.jit(_prefill_then_decode, static_argnames=("graphdef", "prompt"))(graphdef, state, x_bld, prompt=7)
    assert max_diff(np.asarray(y_cached), y_reference) <= F32_TOL
    # past the window the band matters: full causal attention differs
    causal = np.asarray(attn._output(reference_attend(q_blhk, k_blhk, v_blhk, np.tril(band_qs | True), jnp.float32)))
    assert max_diff(causal[:, WINDOW:], y_reference[:, WINDOW:]) > 1e-2
    np.testing.assert_allclose(causal[:, :WINDOW], y_reference[:, :WINDOW], rtol=1e-5, atol=1e-6)


def test_rope_scaling_frequencies():
    """Linear divides every frequency by the factor; YaRN keeps the fast ones, divides the slow ones and
    ramps between (the dims whose wavelength spans beta_slow..beta_fast rotations of the original context)."""
    base, dim = 10000.0, 16
    plain, one = layers.RopeScaling().frequencies(base, dim)
    linear, scale = layers.RopeScaling("linear", 4.0).frequencies(base, dim)
    np.testing.assert_allclose(linear, plain / 4, rtol=1e-6)
    assert one == scale == 1.0
    yarn, scale = layers.RopeScaling("yarn", 4.0, original_max_len=32).frequencies(base, dim)
    assert scale == pytest.approx(0.1 * np.log(4.0) + 1)
    # low = floor(16 ln(32 / (32 * 2 pi)) / (2 ln 1e4)) = -2 -> 0; high = ceil(16 ln(32 / 2 pi) / (2 ln 1e4)) = 2
    ramp = np.clip((np.arange(8) - 0) / (2 - 0), 0, 1)
    np.testing.assert_allclose(yarn, plain / 4 * ramp + plain * (1 - ramp), rtol=1e-6)
    with pytest.raises(ValueError, match="unknown RoPE scaling 'ntk'"):
        layers.RopeScaling("ntk", 2.0).frequencies(base, dim)
