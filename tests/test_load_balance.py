"""Load balance: device-pooled capacity, SmartMoE placement (weights and Adam moments move together),
aux-loss-free router bias; each checked against a reference."""

import dataclasses
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from reference import SMALL, init_on, variant

import tedjax
from tedjax import balance, grouped, routing
from tedjax.config import check_mesh, load_config
from tedjax.data import synthetic_batches
from tedjax.model import moe_stack
from tedjax.trainer import Trainer

# ----------------------------------------------------------------------------- routing with pools


def np_pooled_route(logits_gse, bias_e, placement_e, top_k, cap, per_pool):
    """Loop reference: choices in priority order, first P = per_pool * cap per pool kept,
    kept choices laid out by slot (then priority) inside their pool."""
    G, S, E = logits_gse.shape
    pool_cap = per_pool * cap
    out = {k: np.zeros((G, S, top_k), np.int64) for k in ("expert", "pool", "slot")}
    kept = np.zeros((G, S, top_k), bool)
    counts = np.zeros((G, E), np.int64)
    for g in range(G):
        scores = logits_gse[g] + bias_e
        order = np.argsort(-scores, axis=-1, kind="stable")[:, :top_k]
        used = {}
        kept_by_slot = {}
        for k in range(top_k):
            for s in range(S):
                e = order[s, k]
                slot = placement_e[e]
                pool = slot // per_pool
                out["expert"][g, s, k], out["pool"][g, s, k] = e, pool
                if used.get(pool, 0) < pool_cap:
                    kept[g, s, k] = True
                    kept_by_slot.setdefault(slot, []).append((s, k))
                used[pool] = used.get(pool, 0) + 1
        for pool in range(E // per_pool):
            position = 0
            for slot in range(pool * per_pool, (pool + 1) * per_pool):
                for s, k in kept_by_slot.get(slot, []):
                    out["slot"][g, s, k] = position
                    position += 1
                counts[g, slot] = len(kept_by_slot.get(slot, []))
    return out, kept, counts


@pytest.mark.parametrize("top_k,per_pool,cf", [(1, 2, 1.0), (2, 4, 0.75), (2, 1, 1.0), (1, 8, 0.5)])
def test_pooled_routing_matches_loop_reference(top_k, per_pool, cf):
    rng = np.random.default_rng(top_k * 10 + per_pool)
    G, S, E = 3, 24, 8
    # skewed logits, so pools overflow
    logits = rng.normal(size=(G, S, E)) + np.linspace(2, -2, E)
    bias = rng.normal(size=E) * 0.5
    placement = rng.permutation(E)
    r = routing.route(jnp.asarray(logits, jnp.float32), top_k=top_k, capacity_factor=cf, min_capacity=1,
                      bias=jnp.asarray(bias, jnp.float32), placement=jnp.asarray(placement),
                      experts_per_pool=per_pool)
    cap = routing.capacity(S, E, top_k, cf, 1)
    ref, kept, counts = np_pooled_route(logits, bias, placement, top_k, cap, per_pool)
    assert r.capacity == per_pool * cap and r.experts_per_pool == per_pool
    np.testing.assert_array_equal(np.asarray(r.expert_index), ref["expert"])
    np.testing.assert_array_equal(np.asarray(r.pool_index), ref["pool"])
    np.testing.assert_array_equal(np.asarray(r.kept), kept)
    np.testing.assert_array_equal(np.where(kept, np.asarray(r.slot), -1), np.where(kept, ref["slot"], -1))
    np.testing.assert_array_equal(np.asarray(r.slot_counts), counts)
    assert 0 < float(r.dropped_fraction) < 1, "the case must drop some choices to test capacity"
    # gates are the unbiased probabilities: bias moves the choice only
    probs = jax.nn.softmax(jnp.asarray(logits, jnp.float32), axis=-1)
    if top_k == 1:
        chosen = np.take_along_axis(np.asarray(probs), ref["expert"][..., :1], axis=-1)[..., 0]
        np.testing.assert_allclose(np.asarray(r.combine_weight)[..., 0], np.where(kept[..., 0], chosen, 0), rtol=1e-6)
    pool_load = np.bincount(ref["pool"].ravel(), minlength=E // per_pool) / ref["pool"].size
    np.testing.assert_allclose(np.asarray(r.pool_load), pool_load, rtol=1e-6)


def test_pooling_never_drops_more_than_per_expert_capacity():
    rng = np.random.default_rng(0)
    logits = jnp.asarray(rng.normal(size=(16, 64, 8)) + np.linspace(1.5, -1.5, 8), jnp.float32)
    per_expert = routing.route(logits, top_k=2, capacity_factor=1.0, min_capacity=1)
    pooled = routing.route(logits, top_k=2, capacity_factor=1.0, min_capacity=1, experts_per_pool=4)
    assert float(pooled.dropped_fraction) < float(per_expert.dropped_fraction)


# ----------------------------------------------------------------------------- grouped compute


def np_pool_ffn(buf, counts, w_in, w_out):
    G, Q, P, D = buf.shape
    X = counts.shape[-1]
    out = np.zeros_like(buf)
    for g in range(G):
        for q in range(Q):
            row = 0
            for x in range(X):
                for _ in range(counts[g, q, x]):
                    e = q * X + x
                    h = np.asarray(jax.nn.gelu(buf[g, q, row] @ w_in[e]))
                    out[g, q, row] = h @ w_out[e]
                    row += 1
    return out


@pytest.fixture(scope="module")
def pool_case():
    rng = np.random.default_rng(1)
    G, Q, P, D, F, X = 3, 2, 12, 8, 16, 3
    counts = np.zeros((G, Q, X), np.int32)
    for g in range(G):
        for q in range(Q):
            n = rng.integers(0, P + 1)
            counts[g, q] = np.bincount(rng.integers(0, X, n), minlength=X)
    counts[0, 0] = [P, 0, 0]  # one expert takes the whole pool
    buf = rng.normal(size=(G, Q, P, D)).astype(np.float32)
    w_in = rng.normal(size=(Q * X, D, F)).astype(np.float32) / 3
    w_out = rng.normal(size=(Q * X, F, D)).astype(np.float32) / 4
    return buf, counts, w_in, w_out


@pytest.mark.parametrize("method", ["blocks", "ragged", "loop"])
def test_pool_ffn_matches_loop_reference(pool_case, method):
    buf, counts, w_in, w_out = pool_case
    out = grouped.pool_ffn(jnp.asarray(buf), jnp.asarray(counts), jnp.asarray(w_in), None, jnp.asarray(w_out),
                           method=method)
    np.testing.assert_allclose(np.asarray(out), np_pool_ffn(buf, counts, w_in, w_out), atol=1e-5)


def test_pool_ffn_gradients_agree_between_methods(pool_case):
    buf, counts, w_in, w_out = map(jnp.asarray, pool_case)
    probe = jnp.asarray(np.random.default_rng(2).normal(size=buf.shape), jnp.float32)

    def grads(method):
        f = lambda b, wi, wo: jnp.sum(probe * grouped.pool_ffn(b, counts, wi, None, wo, method=method))
        return jax.grad(f, argnums=(0, 1, 2))(buf, w_in, w_out)

    ragged = grads("ragged")
    for method in ("blocks", "loop"):
        for a, b in zip(grads(method), ragged):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5)


def test_gather_rows_transpose_is_the_inverse_gather():
    # y = x[[2, -, 0, -]] (9 = empty); x rows 1, 3, 4 are not taken
    x = jnp.arange(15.0).reshape(5, 3)
    index = jnp.asarray([2, 9, 0, 9], jnp.int32)
    inverse = jnp.asarray([2, 9, 0, 9, 9], jnp.int32)
    y, vjp = jax.vjp(lambda x: grouped.gather_rows(x, index, inverse), x)
    _, vjp_ref = jax.vjp(lambda x: jnp.take(x, index, axis=0, mode="fill", fill_value=0), x)
    dy = jnp.arange(12.0).reshape(4, 3) + 1
    np.testing.assert_array_equal(vjp(dy)[0], vjp_ref(dy)[0])


# ----------------------------------------------------------------------------- the layer on every layout

POOLED = variant(SMALL, top_k=2, activation="swiglu", group_size=8, capacity_factor=8.0,
                 capacity_scope="device")  # large cf: nothing drops, so every layout computes the same function


def placed_loss_and_grads(config, mesh, batch, placement_e):
    """Loss and gradients (in logical expert order) with every MoE layer's experts at `placement_e`."""
    model = init_on(config, mesh)
    moe = moe_stack(model)  # every MoE layer, stacked on a leading "layers" axis
    moe.placement[...] = jnp.broadcast_to(jnp.asarray(placement_e, jnp.int32), moe.placement.shape)
    for w in (moe.w_in, moe.w_gate, moe.w_out):  # slot placement[e] holds expert e
        if w is not None:
            w[...] = jnp.take(w[...], jnp.argsort(jnp.asarray(placement_e)), axis=1)
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    rest = nnx.to_pure_dict(rest)

    def grad_fn(params, batch):
        loss_of = lambda p: tedjax.loss_fn(nnx.merge(graphdef, p, rest), batch)
        (loss, metrics), grads = jax.value_and_grad(loss_of, has_aux=True)(params)
        return loss, grads, metrics

    with jax.set_mesh(mesh):
        batch = jax.device_put(batch, tedjax.mesh.named_sharding(mesh, ("batch", None)))
        loss, grads, metrics = jax.jit(grad_fn)(nnx.to_pure_dict(params), batch)
    grads = jax.tree.map(np.asarray, grads)
    for layer in grads["units"]["blocks"].values():  # expert weights [n_moe, E, ...]
        for name in ("w_in", "w_gate", "w_out"):
            if "router" in layer["ffn"] and name in layer["ffn"]:
                layer["ffn"][name] = layer["ffn"][name][:, np.asarray(placement_e)]  # back to logical order
    return float(loss), grads, jax.tree.map(np.asarray, metrics)


# ----------------------------------------------------------------------------- placement moves in training

TINY_RUN = [
    "model.vocab_size=64", "model.d_model=32", "model.n_layers=2", "model.n_heads=4", "model.d_ff=64",
    "model.expert_d_ff=32", "model.max_len=16", "data.seq_len=16", "data.batch_size=16", "data.source=synthetic",
    "log.progress=false", "model.capacity_factor=8.0", "model.capacity_scope=device", "optimizer.warmup_steps=1",
    "optimizer.learning_rate=0.01", "mesh.data=2", "mesh.expert=2", "mesh.tensor=2",
]  # fmt: skip


def tiny_trainer(*extra):
    config = load_config(None, [*TINY_RUN, *extra])
    mesh = tedjax.make_mesh(config.mesh.data, config.mesh.expert, config.mesh.tensor)
    return Trainer(config, mesh)


def batches(trainer, n, start=0):
    d = trainer.config.data
    stream = synthetic_batches(trainer.config.model.vocab_size, d.batch_size, d.seq_len, seed=3)
    out = [next(stream) for _ in range(start + n)][start:]
    return [trainer.shard_batch(b) for b in out]


def run_steps(trainer, state, steps):
    losses = []
    with jax.set_mesh(trainer.mesh):
        for batch in steps:
            state, metrics = trainer.train_step(state, batch)
            losses.append(float(metrics["loss"]))
    return state, losses


@pytest.fixture(scope="module")
def moved_runs():
    """The same 7 steps without a move, with a move after step 2, and with a move that leaves Adam behind."""
    trainer = tiny_trainer("model.router_bias_rate=0.001")
    data = batches(trainer, 7)
    _, straight = run_steps(trainer, trainer.init_state(), data)
    placement = np.stack([np.random.default_rng(layer).permutation(8) for layer in range(trainer.n_moe)])
    placement = trainer.check_placements(placement)

    state, first = run_steps(trainer, trainer.init_state(), data[:2])
    with jax.set_mesh(trainer.mesh):
        state = trainer.move_experts(state, placement)
    moved_placement = trainer.placements(state)
    state, moved = run_steps(trainer, state, data[2:])

    state, _ = run_steps(trainer, trainer.init_state(), data[:2])
    unmoved_opt_state = jax.tree.map(jnp.copy, state.opt_state)
    with jax.set_mesh(trainer.mesh):
        state = trainer.move_experts(state, placement)
    state = dataclasses.replace(state, opt_state=unmoved_opt_state)  # SmartMoE's bug: moments stay behind
    state, weights_only = run_steps(trainer, state, data[2:])
    return trainer, straight, first + moved, weights_only, moved_placement, placement


def test_placement_change_keeps_the_next_losses(moved_runs):
    trainer, straight, moved, _, moved_placement, placement = moved_runs
    np.testing.assert_array_equal(moved_placement, np.asarray(placement))
    np.testing.assert_allclose(moved[2:], straight[2:], rtol=1e-6)


def test_moving_weights_without_their_moments_changes_the_run(moved_runs):
    _, straight, _, weights_only, _, _ = moved_runs
    assert np.max(np.abs(np.asarray(weights_only[1:]) - np.asarray(straight[3:]))) > 1e-4


def test_placements_and_bias_never_recompile(moved_runs):
    trainer = moved_runs[0]
    assert trainer.train_step._cache_size() == 1
    assert trainer.move_experts._cache_size() == 1


def test_router_bias_follows_the_load():
    trainer = tiny_trainer("model.router_bias_rate=0.01", "model.capacity_factor=1.0")
    state, _ = run_steps(trainer, trainer.init_state(), batches(trainer, 1))
    # after one step the bias is +rate for under-loaded experts and -rate for over-loaded ones
    bias_before = trainer.balance_values(state, "router_bias")[0]  # (the step donates `state`)
    with jax.set_mesh(trainer.mesh):
        state2, metrics = trainer.train_step(state, batches(trainer, 1, start=1)[0])
    load = np.asarray(metrics["expert_load"])
    bias_after = trainer.balance_values(state2, "router_bias")[0]
    np.testing.assert_allclose(bias_after - bias_before, 0.01 * np.sign(1 / 8 - load[0]), atol=1e-7)
    assert np.any(bias_after != 0)


def _at(tree, path):
    for key in path:
        tree = tree[key]
    return tree


# ----------------------------------------------------------------------------- host-side policy


def test_greedy_pairs_hot_experts_with_cold_ones():
    load = np.array([0.30, 0.20, 0.15, 0.10, 0.10, 0.05, 0.05, 0.05])
    placement = balance.greedy_placement(load, num_devices=4)
    assert sorted(placement.tolist()) == list(range(8))
    per_device = balance.device_loads(load, placement, 4)
    assert per_device.max() == pytest.approx(0.35)  # 0.30 + 0.05: the hottest shares with a coldest
    assert per_device.max() < balance.device_loads(load, np.arange(8), 4).max()


def test_greedy_is_near_the_best_placement_on_small_cases():
    import itertools

    rng = np.random.default_rng(0)
    for _ in range(20):
        load = rng.dirichlet(np.ones(6) * 0.5)
        greedy = balance.device_loads(load, balance.greedy_placement(load, 3), 3).max()
        best = min(balance.device_loads(load, np.asarray(p), 3).max() for p in itertools.permutations(range(6)))
        assert greedy <= best * 4 / 3 + 1e-12  # Graham's bound for longest-processing-time first


def test_propose_keeps_placement_unless_the_gain_beats_the_margin():
    load = np.array([[0.30, 0.20, 0.15, 0.10, 0.10, 0.05, 0.05, 0.05]])
    identity = np.arange(8)[None]
    new, changes = balance.propose(load, identity, 4, margin=0.02)
    assert [c.layer for c in changes] == [0] and changes[0].new_max_load < changes[0].old_max_load
    again, no_changes = balance.propose(load, new, 4, margin=0.02)
    assert not no_changes and np.array_equal(again, new)
    _, too_small = balance.propose(load, identity, 4, margin=0.5)
    assert not too_small
    # experts that stay on their device keep their slot (fewer bytes to move)
    stay = (new[0] // 2) == (identity[0] // 2)
    np.testing.assert_array_equal(new[0][stay], identity[0][stay])


# ----------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("override,message", [
    ("model.capacity_scope=pool", "capacity_scope"),
    ("balance.every=-1", "balance.every"),
    ("model.router_bias_rate=-0.1", "router_bias_rate"),
    ("balance.margin=1.5", "balance.margin"),
    ("model.capacity_scope=expert", "capacity_scope=device"),
])  # fmt: skip
def test_bad_balance_config_is_refused(override, message):
    with pytest.raises(ValueError, match=message):
        load_config(None, [*TINY_RUN, "balance.every=10", override])


def test_placement_on_a_mesh_that_does_not_divide_the_experts_is_refused():
    config = load_config(None, [*TINY_RUN, "balance.every=10", "model.num_experts=6"])
    with pytest.raises(ValueError, match="num_experts=6 is not divisible by the expert axis"):
        check_mesh(config.model, tedjax.make_mesh(1, 4, 2))


def test_bad_placement_is_refused_before_moving():
    trainer = tiny_trainer()
    with pytest.raises(ValueError, match="permutation"):
        trainer.check_placements(np.zeros((trainer.n_moe, 8), np.int32))


@pytest.mark.parametrize("layout,spec", [((2, 4, 1), ("expert", "data", None)), ((1, 4, 2), ("expert", None, "tensor")),
                                         ((1, 8, 1), ("expert",)), ((2, 2, 2), (("data", "expert"), None, None))])
def test_slot_permutation_keeps_rows_local_and_exact(layout, spec):
    from jax.sharding import NamedSharding, PartitionSpec

    from tedjax.trainer import _permute_slots

    mesh = tedjax.make_mesh(*layout)
    rng = np.random.default_rng(0)
    leaf = np.asarray(rng.normal(size=(8, 4, 6)), np.float32)
    perm = rng.permutation(8)
    sharding = NamedSharding(mesh, PartitionSpec(*spec))
    with jax.set_mesh(mesh):
        f = jax.jit(lambda x, p: _permute_slots(x, p, sharding.spec, mesh), out_shardings=sharding)
        out = f(jax.device_put(leaf, sharding), jnp.asarray(perm, jnp.int32))
        hlo = f.lower(jax.device_put(leaf, sharding), jnp.asarray(perm, jnp.int32)).compile().as_text()
    np.testing.assert_array_equal(np.asarray(out), leaf[perm])
    if spec[0] == "expert":  # the rows travel by collective-permute; nothing gathers the whole leaf
        assert "all-gather" not in hlo and "collective-permute" in hlo


@pytest.mark.slow
def test_placement_and_bias_survive_a_restore_onto_another_layout(tmp_path):
    from tedjax.loop import run

    base = [*TINY_RUN, "model.router_bias_rate=0.01", "model.aux_loss_weight=0", "balance.every=3", "balance.margin=0",
            "balance.link_gbytes_per_s=100",  # moves pay back within 3 steps (the hysteresis)
            # dropless: placement saves time (static pools that never drop gain nothing from it), and the
            # function is the same on both layouts
            "model.capacity_scope=dropless",
            "checkpoint.every=4", "log.eval_every=0", "log.eval_batches=1"]  # fmt: skip
    straight = run(load_config(None, [*base, "steps=5", f"log.dir={tmp_path / 'straight'}"]))
    # The straight run's step-4 checkpoint (the move happened at step 3, none is due at 5) is the split
    # run's: a second run of the same 4 steps would save the same bits.
    shutil.copytree(tmp_path / "straight" / "checkpoints", tmp_path / "split" / "checkpoints")
    shutil.rmtree(tmp_path / "split" / "checkpoints" / "5", ignore_errors=True)
    saved_placement = straight.trainer.placements(straight.state)
    assert not np.array_equal(saved_placement, np.tile(np.arange(8), (len(saved_placement), 1))), "no move happened"
    # expert 2 -> 4: the same slots, now 2 per device
    resumed = run(load_config(None, [*base, "steps=5", f"log.dir={tmp_path / 'split'}", "mesh.data=1",
                                     "mesh.expert=4"]), resume=True)  # fmt: skip
    assert sorted(resumed.train_losses) == [5]  # resumed from step 4
    np.testing.assert_array_equal(resumed.trainer.placements(resumed.state), saved_placement)
    np.testing.assert_allclose(resumed.trainer.balance_values(resumed.state, "router_bias"),
                               straight.trainer.balance_values(straight.state, "router_bias"), atol=1e-7)
    assert resumed.train_losses[5] == pytest.approx(straight.train_losses[5], rel=1e-5)
