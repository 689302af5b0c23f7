"""Dropless MoE (`model.capacity_scope=dropless`): every choice computed on every layout, the ragged
exchange's bookkeeping against an emulation of `ragged_all_to_all`, and the bounded buffer's drops
against a loop reference."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from reference import (
    assert_placed_run_matches,
    FACTORIZATIONS,
    loss_and_grads,
    SMALL,
    placed_grad_fn,
    max_abs_diff,
    one_device_mesh,
    small_batch,
    variant,
)
from test_load_balance import batches, np_pooled_route, run_steps, tiny_trainer

import tedjax
from tedjax import ragged, routing
from tedjax.layers import activate
from tedjax.moe import MoE

DROPLESS = variant(SMALL, top_k=2, activation="swiglu", group_size=8, capacity_scope="dropless")
TOP1 = variant(DROPLESS, top_k=1, activation="gelu")
SKEW = np.linspace(1.5, -1.5, 8)  # router bias: the choice is skewed toward the low experts
SKEWS = [SKEW, -SKEW[::-1] * 0.5 + np.roll(SKEW, 3)]  # a second skew between calls: new routing, same program
SHADOW_SETS = [np.array([0, 8]), np.array([5, 1])]  # 8 = an empty shadow slot


def grad_fn_of(config, mesh, placement_e=None, exchange="auto"):
    """`reference.placed_grad_fn` with the dropless pools sent by `exchange`."""
    return placed_grad_fn(config, mesh, placement_e, exchange)


def with_balance(rest, bias_e, shadow_ids=None):
    rest = jax.tree.map(lambda x: x, rest)
    for layer in rest["units"]["blocks"].values():  # [n_moe, ...]: every MoE layer the same
        if "router_bias" in layer["ffn"]:
            ffn = layer["ffn"]
            ffn["router_bias"] = jnp.broadcast_to(jnp.asarray(bias_e, jnp.float32), ffn["router_bias"].shape)
            if shadow_ids is not None and ffn.get("shadow_ids") is not None and ffn["shadow_ids"].shape[-1]:
                ffn["shadow_ids"] = jnp.broadcast_to(jnp.asarray(shadow_ids, jnp.int32), ffn["shadow_ids"].shape)
    return rest


def run(config, mesh, bias_e, **kw):
    fn, params, rest = grad_fn_of(config, mesh, **kw)
    batch = small_batch()
    with jax.set_mesh(mesh):
        batch = jax.device_put(batch, tedjax.mesh.named_sharding(mesh, ("batch", None)))
        loss, grads, metrics = fn(params, with_balance(rest, bias_e), batch)
    return float(loss), jax.tree.map(np.asarray, grads), jax.tree.map(np.asarray, metrics)


@pytest.fixture(scope="module")
def references():
    """1-device dropless loss, gradients and metrics per (config, skew), from one compiled program each."""
    mesh, batch = one_device_mesh(), small_batch()
    out = {}
    for name, config in (("top2", DROPLESS), ("top1", TOP1)):
        fn, params, rest = grad_fn_of(config, mesh)
        with jax.set_mesh(mesh):
            for i, bias in enumerate(SKEWS):
                loss, grads, metrics = fn(params, with_balance(rest, bias), batch)
                out[name, i] = float(loss), jax.tree.map(np.asarray, grads), jax.tree.map(np.asarray, metrics)
        assert fn._cache_size() == 1
    return out


def test_the_skew_makes_expert_capacity_drop(references):
    """The case is a hard one: at this skew per-expert capacity at cf 1.25 drops > 10% of the choices."""
    for name, config in (("top2", DROPLESS), ("top1", TOP1)):
        _, _, metrics = run(variant(config, capacity_scope="expert", capacity_factor=1.25), one_device_mesh(), SKEW)
        assert float(np.max(metrics["dropped_fraction"])) > 0.10
        assert float(np.max(references[name, 0][2]["dropped_fraction"])) == 0.0


def test_dropless_equals_expert_capacity_that_drops_nothing(references):
    """cf = E / k: every expert has S slots, nothing drops, and per-expert capacity computes the same function."""
    loss, grads, metrics = run(variant(DROPLESS, capacity_scope="expert", capacity_factor=4.0), one_device_mesh(),
                               SKEW)
    ref_loss, ref_grads, ref_metrics = references["top2", 0]
    assert float(np.max(metrics["dropped_fraction"])) == 0.0
    assert abs(loss - ref_loss) <= 1e-6 * max(1.0, abs(ref_loss))
    assert max_abs_diff(grads, ref_grads) <= 1e-6
    np.testing.assert_allclose(metrics["expert_load"], ref_metrics["expert_load"], atol=1e-7)


DTD_LAYOUTS = ((2, 2, 2), (1, 2, 4))  # DTD on these (static exchange there), the emulated ragged one elsewhere
CASES = ([("top2", "shadows+chunks" + ("+dtd" if layout in DTD_LAYOUTS else ""), layout) for layout in FACTORIZATIONS]
         + [("top1", "plain", (1, 8, 1)), ("top1", "static", (2, 4, 1))])  # fmt: skip


@pytest.mark.slow
@pytest.mark.parametrize("name,features,layout", CASES,
                         ids=[f"{n}-{f}-{'x'.join(map(str, lay))}" for n, f, lay in CASES])
def test_dropless_matches_one_device(references, name, features, layout):
    """Every layout computes the 1-device function at a skew that makes expert capacity drop: any placement,
    shadow set and router skew (changed between calls, one compiled program), chunks, DTD; the ragged
    exchange's bookkeeping (emulated primitive) where the expert axis splits, the static one elsewhere."""
    config = DROPLESS if name == "top2" else TOP1
    if features.startswith("shadows+chunks"):
        config = variant(config, shadow_experts=2, a2a_chunks=2, dtd=features.endswith("+dtd"))
    mesh = tedjax.make_mesh(*layout)
    placement = np.random.default_rng(sum(layout)).permutation(8)
    fn, params, rest = grad_fn_of(config, mesh, placement, exchange="static" if features == "static" else "emulated")
    with jax.set_mesh(mesh):
        batch = jax.device_put(small_batch(), tedjax.mesh.named_sharding(mesh, ("batch", None)))
        for i, bias in enumerate(SKEWS):
            loss, grads, metrics = fn(params, with_balance(rest, bias, SHADOW_SETS[i]), batch)
            assert_placed_run_matches(loss, grads, metrics, placement, references[name, i])
            # every choice is a row of exactly one device; with no shadow, its pool's (the device load)
            np.testing.assert_allclose(metrics["device_rows"].sum(-1), 1.0, atol=1e-6)
            if not features.startswith("shadows+chunks"):
                np.testing.assert_allclose(metrics["device_rows"], metrics["device_load"], atol=1e-7)
            rows = metrics["device_rows"]
            np.testing.assert_allclose(metrics["rows_max_over_mean"], rows.max(-1) / rows.mean(-1), rtol=1e-6)
    assert fn._cache_size() == 1  # new routing (skew), shadow set: no recompilation


def test_placement_and_shadows_train_with_dropless():
    """balance.every and shadows on dropless: the host moves experts to shorten the busiest device's rows and
    picks shadows; nothing drops, one compiled step."""
    trainer = tiny_trainer("model.capacity_scope=dropless", "model.shadow_experts=1", "balance.every=2",
                           "balance.shadow_every=2", "balance.margin=0.0", "balance.matmul_tflops=0.001",
                           "model.router_bias_rate=0.0")
    state = trainer.init_state()
    state = trainer._set_balance(state, "router_bias", np.tile(SKEW, (trainer.n_moe, 1)))
    data = batches(trainer, 4)
    state, _ = run_steps(trainer, state, data[:2])
    with jax.set_mesh(trainer.mesh):
        state, done = trainer.rebalance(state, 2)
    assert done["placement"] and done["shadows"]  # the skewed load is worth a move and a shadow
    for change in done["placement"]:
        assert change.new_max_load < change.old_max_load  # objective: the busiest device's rows
    with jax.set_mesh(trainer.mesh):
        for batch in data[2:]:
            state, metrics = trainer.train_step(state, batch)
            assert float(np.max(metrics["dropped_fraction"])) == 0.0 and np.isfinite(float(metrics["loss"]))
    assert trainer.train_step._cache_size() == 1


# ----------------------------------------------------------------------------- the ragged exchange's bookkeeping


def test_emulated_ragged_all_to_all_follows_the_documented_example():
    """jax.lax.ragged_all_to_all's docstring example (2 devices), on the emulation CPU tests run."""
    mesh = jax.make_mesh((2,), ("x",), devices=jax.devices()[:2])
    args = [jax.device_put(np.array(a, np.int32), jax.NamedSharding(mesh, jax.P("x"))) for a in (
        [1, 2, 2, 3, 4, 0], [0] * 8, [0, 1, 0, 1], [1, 2, 1, 1], [0, 0, 1, 2], [1, 1, 2, 1])]  # fmt: skip
    spec = jax.P("x")
    fn = jax.shard_map(lambda *a: ragged.emulated_ragged_all_to_all(*a, axis_name="x"), mesh=mesh,
                       in_specs=(spec,) * 6, out_specs=spec)
    np.testing.assert_array_equal(np.asarray(fn(*args)), [1, 3, 0, 0, 2, 2, 4, 0])


@pytest.mark.parametrize("exchange,ops", [("ragged", 8), ("static", 0)])
def test_the_ragged_exchange_lowers_to_ragged_all_to_all(exchange, ops):
    """What runs on GPU/TPU (XLA:CPU cannot compile it): forward + backward of 2 chunks lower to 2 x (dispatch,
    return, and their transposes) ragged all-to-alls; the static exchange has none."""
    mesh = tedjax.make_mesh(2, 2, 2)
    with jax.set_mesh(mesh):
        moe = MoE(16, 8, 32, top_k=2, group_size=8, capacity_scope="dropless", exchange=exchange, a2a_chunks=2,
                  rngs=nnx.Rngs(0))
        graphdef, params, rest = nnx.split(moe, nnx.Param, ...)
        loss = lambda p, x: jnp.sum(nnx.merge(graphdef, p, rest)(x)[0] ** 2)  # noqa: E731
        text = jax.jit(jax.grad(loss, argnums=(0, 1))).lower(params, jnp.ones((8, 16, 16))).as_text()
    assert text.count("ragged_all_to_all(") == ops


def test_pack_and_unpack_are_inverse_and_keep_only_filled_rows():
    rng = np.random.default_rng(0)
    counts = jnp.asarray(rng.integers(0, 5, (3, 4)), jnp.int32)  # [A, B], P = 4
    x = jnp.asarray(rng.normal(size=(3, 4, 4, 2)), jnp.float32)
    filled = np.arange(4)[None, None, :] < np.asarray(counts)[..., None]
    x = x * filled[..., None]
    packed = np.asarray(ragged.pack(x, counts))
    for a in range(3):  # region a: its segments back to back, then zeros
        rows = np.concatenate([np.asarray(x)[a, b, : int(counts[a, b])] for b in range(4)])
        np.testing.assert_array_equal(packed[a * 16: a * 16 + len(rows)], rows)
        assert not packed[a * 16 + len(rows): (a + 1) * 16].any()
    np.testing.assert_array_equal(np.asarray(ragged.unpack(jnp.asarray(packed), counts, 4)), np.asarray(x))


# ----------------------------------------------------------------------------- a bounded receive buffer


def test_bounded_buffer_drops_exactly_the_overflow():
    """dropless_buffer_factor 1.25 at a skew: the pools overflow, and the dropped fraction, the routing and the
    layer's output equal a loop reference, on the static and the (emulated) ragged exchange."""
    devices, factor, group = 4, 1.25, 16
    mesh = tedjax.make_mesh(2, devices, 1)
    x = jax.random.normal(jax.random.key(1), (8, group, 16))
    pool = routing.dropless_capacity(group, 8, 2, devices, factor)
    assert pool == 10 and pool < group * 2  # 1.25 x the 8 rows of uniform routing, below the worst case
    outs = []
    for exchange in ("static", "emulated"):
        with jax.set_mesh(mesh):
            moe = MoE(16, 8, 32, top_k=2, group_size=group, capacity_scope="dropless", dropless_buffer_factor=factor,
                      exchange=exchange, rngs=nnx.Rngs(0))
            moe.router_bias[...] = jnp.asarray(SKEW, jnp.float32)
            y, stats = jax.jit(lambda m, x: m(x))(moe, x)
            outs.append((np.asarray(y), float(stats.dropped_fraction)))
    router, w_in, w_out = (np.asarray(w[...]) for w in (moe.router, moe.w_in, moe.w_out))
    logits = np.asarray(x).reshape(-1, group, 16) @ router
    ref, kept, _ = np_pooled_route(logits, SKEW, np.arange(8), 2, pool // 2, 2)
    dropped = 1 - kept.mean()
    assert dropped > 0.05
    probs = np.asarray(jax.nn.softmax(jnp.asarray(logits), axis=-1))
    gates = np.take_along_axis(probs, ref["expert"], axis=-1) * kept
    gates = gates / np.maximum(gates.sum(-1, keepdims=True), np.finfo(np.float32).eps)
    xs = np.asarray(x).reshape(-1, group, 16)
    y_ref = np.zeros_like(xs)
    for g in range(xs.shape[0]):
        for s in range(group):
            for k in range(2):
                if kept[g, s, k]:
                    e = ref["expert"][g, s, k]
                    h = np.asarray(activate(jnp.asarray(xs[g, s] @ w_in[e]), None))
                    y_ref[g, s] += gates[g, s, k] * (h @ w_out[e])
    for y, frac in outs:
        assert frac == pytest.approx(dropped, abs=1e-7)
        np.testing.assert_allclose(y.reshape(y_ref.shape), y_ref, atol=2e-5)


def test_bad_dropless_settings_are_refused():
    with pytest.raises(ValueError, match="dropless_buffer_factor"):
        tedjax.ModelConfig(capacity_scope="dropless", dropless_buffer_factor=-1.0)
    with pytest.raises(ValueError, match="'dropless'"):
        tedjax.ModelConfig(capacity_scope="droples")


def test_planner_models_dropless_buffers_and_ragged_rows():
    """E = 128, k = 8 on "expert" = 8: the static buffer is S x min(16, 8) = 8 S rows per group (half of
    cf = E/k's 16 S), the ragged exchange expects S (uniform routing); the dispatch all-to-all carries the
    buffer, and a buffer factor 2 bounds it to 2 S."""
    from tedjax import plan
    from tedjax.config import DataConfig, MeshConfig, TrainConfig

    def config(**model):
        m = tedjax.ModelConfig(d_model=64, n_heads=2, num_experts=128, top_k=8, expert_d_ff=64, max_len=64,
                               moe_every=1, n_layers=1, **model)
        return TrainConfig(model=m, data=DataConfig(seq_len=64, batch_size=16, source="synthetic"),
                           mesh=MeshConfig(1, 8, 1))

    rows = plan.dropless_rows(config(capacity_scope="dropless"), backend="cpu")
    assert rows["buffer_rows"] == rows["worst_rows"] == 16 * 64 * 8 and rows["expected_rows"] == 16 * 64
    assert rows["ragged_bytes_expected"] == 16 * 64 * 64 * 4  # rows x D x float32
    assert rows["grouped_flops_expected"] == 16 * 64 * 2 * 2 * 64 * 64  # rows x 2 x (w_in, w_out) x D x F
    bounded = plan.dropless_rows(config(capacity_scope="dropless", dropless_buffer_factor=2.0), backend="cpu")
    assert bounded["buffer_rows"] == 16 * 64 * 2

    def dispatch(cfg):
        (t,) = [t for t in plan.collectives(cfg, backend="cpu") if t.what == "MoE dispatch and return"]
        return t.result_bytes

    assert dispatch(config(capacity_scope="dropless")) == rows["static_bytes"]
    assert dispatch(config(capacity_scope="expert", capacity_factor=16.0)) == 2 * rows["static_bytes"]


# (stage, data, expert, tensor), model, reference layout: dropless against 1 device; device pools (which
# drop here: top-1 at cf 1) against the same pools on the same TED layout without stages
STAGED = {
    "dropless-2x1x2x2": ((2, 1, 2, 2), variant(DROPLESS, moe_every=1), (1, 1, 1)),
    "device-2x2x2x1": ((2, 2, 2, 1), variant(SMALL, n_layers=2, moe_every=1, capacity_scope="device"), (2, 2, 1)),
}


@pytest.mark.parametrize("case", sorted(STAGED))
def test_pools_run_in_the_pipeline(case):
    """Device pools and dropless under pipeline stages (the stage vmap over the pools' shard_map): the loss,
    gradients and drops of the same pools without stages."""
    from tedjax.config import PipelineConfig

    (stage, data, expert, tensor), config, ref_layout = STAGED[case]
    ref_mesh = tedjax.make_mesh(*ref_layout, devices=jax.devices()[:int(np.prod(ref_layout))])
    ref_loss, ref_grads, ref_metrics, _ = loss_and_grads(config, ref_mesh, small_batch())
    loss, grads, metrics, _ = loss_and_grads(config, tedjax.make_mesh(data, expert, tensor, stage=stage),
                                             small_batch(), pipeline=PipelineConfig(microbatches=2))
    assert (float(np.min(ref_metrics["dropped_fraction"])) > 0.02) == (config.capacity_scope == "device")
    assert abs(loss - ref_loss) <= 1e-5 * max(1.0, abs(ref_loss))
    assert max_abs_diff(grads, ref_grads) <= 1e-5
    same_pools = ref_layout[1] == expert  # device loads only where the reference has the same devices
    for name in ("dropped_fraction", "expert_load", *(["device_load"] if same_pools else [])):
        np.testing.assert_allclose(metrics[name], ref_metrics[name], atol=1e-6, err_msg=name)
