"""FasterMoE in tedjax: shadow experts (any set, changed at run time, on every layout) and the chunked
all-to-all (smart scheduling), checked against the 1-device reference and in the compiled HLO."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from reference import (
    assert_placed_run_matches,
    FACTORIZATIONS,
    init_on,
    one_device_mesh,
    placed_grad_fn,
    small_batch,
    variant,
)
from test_load_balance import POOLED, TINY_RUN, batches, placed_loss_and_grads, run_steps, tiny_trainer

import tedjax
from tedjax import analysis, balance, routing
from tedjax.config import check_mesh, load_config
from tedjax.model import moe_layer

SHADOWED = variant(POOLED, shadow_experts=2, a2a_chunks=2)  # device pools + shadows + 2 chunks, nothing drops
SHADOWED_DTD = variant(POOLED, capacity_scope="expert", shadow_experts=2, dtd=True)
SHADOW_SETS = [np.array([3, 5]), np.array([6, 8])]  # 8 = an empty shadow slot


def shadowed_grad_fn(config, mesh, placement_e):
    """`reference.placed_grad_fn` at `placement_e` (the shadow set is part of the non-parameter state)."""
    return placed_grad_fn(config, mesh, placement_e)


def with_shadows(rest, ids):
    rest = jax.tree.map(lambda x: x, rest)
    for layer in rest["units"]["blocks"].values():  # [n_moe, R]: every MoE layer the same set
        if "shadow_ids" in layer["ffn"]:
            layer["ffn"]["shadow_ids"] = jnp.broadcast_to(jnp.asarray(ids, jnp.int32), layer["ffn"]["shadow_ids"].shape)
    return rest


@pytest.fixture(scope="module")
def reference():
    batch = small_batch()
    loss, grads, metrics = placed_loss_and_grads(variant(POOLED, capacity_scope="expert"), one_device_mesh(),
                                                 batch, np.arange(8))
    return batch, loss, grads, metrics


@pytest.mark.slow
@pytest.mark.parametrize("config,layout", [(SHADOWED, layout) for layout in FACTORIZATIONS]
                         + [(SHADOWED_DTD, layout) for layout in [(2, 2, 2), (1, 4, 2), (1, 2, 4)]],
                         ids=lambda v: "x".join(map(str, v)) if isinstance(v, tuple) else
                         ("dtd" if v.dtd else "pool_chunks"))  # fmt: skip
def test_pools_placement_shadows_and_chunks_match_one_device(reference, config, layout):
    """Any placement, any shadow set (changed between calls), chunks, pools or DTD: with nothing dropped,
    the 1-device loss and gradients, and one compiled program."""
    batch, ref_loss, ref_grads, ref_metrics = reference
    mesh = tedjax.make_mesh(*layout)
    placement = np.random.default_rng(sum(layout)).permutation(8)
    grad_fn, params, rest = shadowed_grad_fn(config, mesh, placement)
    with jax.set_mesh(mesh):
        batch = jax.device_put(batch, tedjax.mesh.named_sharding(mesh, ("batch", None)))
        for ids in SHADOW_SETS:  # a new set between steps: same function, same compiled program
            loss, grads, metrics = grad_fn(params, with_shadows(rest, ids), batch)
            assert_placed_run_matches(loss, grads, metrics, placement, (ref_loss, ref_grads, ref_metrics))
            # device load: what still reaches each device's pool (shadowed experts stay local)
            pooled = np.where(np.isin(np.arange(8), ids), 0.0, ref_metrics["expert_load"][0])
            np.testing.assert_allclose(metrics["device_load"][0], balance.device_loads(pooled, placement, layout[1]),
                                       atol=1e-6)
    assert grad_fn._cache_size() == 1


def test_shadowed_tokens_skip_the_pools():
    rng = np.random.default_rng(0)
    logits = jnp.asarray(rng.normal(size=(4, 32, 8)) + np.linspace(2, -2, 8), jnp.float32)
    r = routing.route(logits, top_k=2, capacity_factor=1.0, min_capacity=1, experts_per_pool=2,
                      shadow_ids=jnp.asarray([0, 8], jnp.int32), shadow_capacity=32)
    to_zero = np.asarray(r.expert_index) == 0
    assert to_zero.any()
    np.testing.assert_array_equal(np.asarray(r.pool_index)[to_zero], 4)  # the shadow buffer after 4 pools
    assert np.asarray(r.kept)[to_zero].all()  # its own capacity, S per group: nothing drops there
    assert np.asarray(r.slot_counts)[:, 0].sum() == 0  # nothing of expert 0 enters its pool
    np.testing.assert_allclose(float(np.asarray(r.pool_load).sum()), 1 - to_zero.mean(), rtol=1e-6)
    plain = routing.route(logits, top_k=2, capacity_factor=1.0, min_capacity=1, experts_per_pool=2)
    assert float(r.dropped_fraction) < float(plain.dropped_fraction)


# ----------------------------------------------------------------------------- compiled HLO


def compiled_forward(config, layout, shadow_ids=None):
    mesh = tedjax.make_mesh(*layout)
    model = init_on(config, mesh)
    with jax.set_mesh(mesh):
        moe = moe_layer(model, 0)
        if shadow_ids is not None:
            moe.shadow_ids[...] = jnp.asarray(shadow_ids, jnp.int32)
        graphdef, state = nnx.split(moe)
        x = jax.device_put(jnp.ones((8, 16, config.d_model)), tedjax.mesh.named_sharding(mesh, ("batch", None, None)))
        fn = jax.jit(lambda state, x: nnx.merge(graphdef, state)(x)[0])
        return mesh, fn.lower(state, x).compile()


@pytest.fixture(scope="module")
def chunk_programs():
    base = variant(POOLED, capacity_scope="expert")
    return {n: compiled_forward(variant(base, a2a_chunks=n), (2, 4, 1)) for n in (1, 2)}


def test_chunks_split_each_all_to_all_into_n_of_1_over_n_the_bytes(chunk_programs):
    (mesh, one), (_, two) = chunk_programs[1], chunk_programs[2]
    a2a = {n: [c for c in analysis.collectives(p, mesh) if c.kind == "all-to-all" and c.axes == ("expert",)]
           for n, p in ((1, one), (2, two))}  # fmt: skip
    assert len(a2a[1]) == 2 and len(a2a[2]) == 4
    assert {c.result_bytes for c in a2a[2]} == {a2a[1][0].result_bytes // 2}


def test_each_chunk_returns_without_waiting_for_the_next_chunk(chunk_programs):
    """In the compiled program, each return all-to-all depends on exactly one dispatch all-to-all: chunk 0's
    experts never wait for chunk 1's transfer, so XLA may overlap them."""
    _, two = chunk_programs[2]
    depends_on = analysis.ancestors_in_entry(two, "all-to-all")
    dispatch = [a for a, before in depends_on.items() if not before]
    returns = [a for a, before in depends_on.items() if before]
    assert len(dispatch) == 2 and len(returns) == 2
    for r in returns:
        assert len(depends_on[r] & set(dispatch)) == 1


def test_shadow_weights_cost_one_all_reduce_of_r_experts():
    mesh, compiled = compiled_forward(variant(POOLED, capacity_scope="expert", shadow_experts=2), (2, 4, 1),
                                      shadow_ids=[1, 6])
    reduces = [c for c in analysis.collectives(compiled, mesh) if c.kind == "all-reduce" and "expert" in c.axes]
    d, f = POOLED.d_model, POOLED.expert_d_ff
    per_weight = 2 * d * f * 4  # R = 2 experts' [D, F] float32
    weights = 3  # SwiGLU: w_in, w_gate, w_out
    assert sum(c.result_bytes for c in reduces) == weights * per_weight
    assert not [c for c in analysis.collectives(compiled, mesh) if c.kind == "all-gather"]


# ----------------------------------------------------------------------------- the policy


def cost_model(tokens=1e4, devices=4, buffers="routed", flop_rate=4e14):
    return balance.ShadowCostModel(d_model=256, expert_d_ff=1024, weight_matrices=2, bytes_per_element=2,
                                   num_devices=devices, tokens_per_step=tokens, flop_rate=flop_rate,
                                   link_bytes_per_s=1e11, buffers=buffers)  # fmt: skip


@pytest.mark.parametrize("buffers", ["routed", "expert", "device"])
def test_shadow_choice_is_the_brute_force_optimum_and_the_walks_are_close(buffers):
    rng = np.random.default_rng(0)
    gaps = []
    for _ in range(60):
        load = rng.dirichlet(np.ones(8) * rng.choice([0.3, 1.0, 3.0]))
        placement = rng.permutation(8)
        cost = cost_model(tokens=rng.choice([1e3, 1e4, 1e5]), devices=int(rng.choice([2, 4])), buffers=buffers,
                          flop_rate=float(rng.choice([4e14, 1e10])))
        ids, before, after = balance.choose_shadows(load, placement, 2, cost)
        best_set, best = balance.best_shadows_brute_force(load, placement, 2, cost)
        assert after == pytest.approx(best, rel=1e-12) and after <= before
        assert cost.latency(load, placement, tuple(e for e in ids.tolist() if e < 8)) == after
        assert len(ids) == 2 and set(ids.tolist()) <= set(range(9))
        walk_ids, _, walk = balance.choose_shadows(load, placement, 2, cost, exact_up_to=0)  # large-E path
        assert best <= walk <= before
        gaps.append(walk / best - 1)
    assert max(gaps) < 0.25 and np.mean(gaps) < 0.02  # measured: <= 19% at worst, < 1% on average


def test_static_buffers_price_the_busiest_expert_or_device():
    """Per-expert capacity pads every expert's buffer to the busiest expert's tokens, device pools every pool to
    the busiest device's: shadowing the hot expert shrinks all of them, which routed buffers do not see."""
    load = np.array([0.44, 0.08, 0.08, 0.08, 0.08, 0.08, 0.08, 0.08])
    routed, expert, device = (cost_model(tokens=1e4, devices=2, buffers=b) for b in ("routed", "expert", "device"))
    assert expert.latency(load, np.arange(8)) > device.latency(load, np.arange(8)) > routed.latency(load, np.arange(8))
    comp = 2.0 * 2 * 256 * 1024 / 4e14
    saved = expert.latency(load, np.arange(8)) - expert.latency(load, np.arange(8), (0,))
    assert saved > 3 * comp * 4 * (0.44 - 0.08) * 1e4 * 0.99  # 4 experts per device, each 0.36 x 1e4 rows smaller
    assert balance.choose_shadows(load, np.arange(8), 1, expert)[0].tolist() == [0]


def test_device_pools_search_exactly():
    rng = np.random.default_rng(1)
    for _ in range(30):
        load, placement = rng.dirichlet(np.ones(8) * 0.5), rng.permutation(8)
        cost = cost_model(tokens=1e4, devices=2, buffers="device", flop_rate=1e10)
        _, _, after = balance.choose_shadows(load, placement, 2, cost)
        assert after == pytest.approx(balance.best_shadows_brute_force(load, placement, 2, cost)[1], rel=1e-12)


def test_no_shadow_when_copying_costs_more_than_it_saves():
    uniform = np.full(8, 1 / 8)
    ids, before, after = balance.choose_shadows(uniform, np.arange(8), 2, cost_model(tokens=100.0))
    assert ids.tolist() == [8, 8] and after == before  # all slots empty
    skewed = np.array([0.5, 0.2, 0.1, 0.05, 0.05, 0.04, 0.03, 0.03])
    ids, before, after = balance.choose_shadows(skewed, np.arange(8), 2, cost_model(tokens=1e6))
    assert 0 in ids.tolist() and after < before


# Compute-bound (shadows pay), and dropping tokens to save. The two tests below share this config, so the
# second one's train step (the same program on the same mesh) is a persistent-cache hit.
SHADOW_RUN = ["model.shadow_experts=1", "balance.shadow_every=2", "balance.matmul_tflops=0.001",
              "balance.link_gbytes_per_s=100", "model.capacity_factor=1.0", "model.min_capacity=1",
              "model.aux_loss_weight=0", "checkpoint.every=3", "log.eval_every=0", "log.eval_batches=1", "steps=4"]


def test_training_picks_shadows_without_recompiling(tmp_path):
    trainer = tiny_trainer(*SHADOW_RUN)
    state = trainer.init_state()
    chosen = []
    for step, batch in enumerate(batches(trainer, 4), start=1):
        state, _ = run_steps(trainer, state, [batch])
        if trainer.balance_due(step):
            state, done = trainer.rebalance(state, step)
            chosen += [d for d in done["shadows"] if d.chosen]
    assert chosen and trainer.shadow_ids(state)[0, 0] < 8
    assert trainer.train_step._cache_size() == 1


# ----------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("override,message", [
    ("model.shadow_experts=8", "shadow_experts=8 must be < num_experts=8"),
    ("model.shadow_experts=-1", "model.shadow_experts"),
    ("model.a2a_chunks=0", "model.a2a_chunks"),
    ("balance.shadow_every=0", "balance.shadow_every"),
])  # fmt: skip
def test_bad_shadow_or_chunk_config_is_refused(override, message):
    with pytest.raises(ValueError, match=message):
        load_config(None, [*TINY_RUN, override])


def test_chunks_that_do_not_divide_the_groups_are_refused_before_compiling():
    config = load_config(None, [*TINY_RUN, "model.a2a_chunks=3"])
    with pytest.raises(ValueError, match="a2a_chunks=3 does not divide"):
        check_mesh(config.model, tedjax.make_mesh(2, 2, 2), config.data.batch_size, config.data.seq_len)


def test_shadow_state_survives_checkpoint_onto_another_layout(tmp_path):
    from tedjax.loop import run

    base = [*TINY_RUN, *SHADOW_RUN]
    first = run(load_config(None, [*base, f"log.dir={tmp_path}"]), stop_after=3)
    saved = first.trainer.shadow_ids(first.state)
    resumed = run(load_config(None, [*base, f"log.dir={tmp_path}", "mesh.data=1", "mesh.expert=4"]), resume=True)
    np.testing.assert_array_equal(resumed.trainer.shadow_ids(resumed.state), saved)
    assert saved[0, 0] < 8, "the policy chose a shadow before the checkpoint"
    assert 4 in resumed.train_losses
