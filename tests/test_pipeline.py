"""The pipeline schedule (tedjax.pipeline) on a toy unit against a plain sequential scan, on 8 CPU devices.

One compile per (stages, repeats, microbatches) case, shared by the
equivalence and HLO tests through a module-scoped cache.
"""

import functools
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import tedjax
from reference import SMALL, loss_and_grads, max_abs_diff, one_device_mesh, small_batch, variant
from tedjax import analysis, balance, pipeline
from tedjax.checkpoint import Checkpointer
from tedjax.config import (CheckpointConfig, DataConfig, LogConfig, MeshConfig, OptimizerConfig, PipelineConfig,
                           TrainConfig, load_config)
from tedjax.trainer import Trainer
from tedjax.mesh import named_sharding

D, F, L, MB = 8, 16, 4, 4  # toy widths; MB rows per microbatch, split over "data"

# (stages, repeats, microbatches): GPipe (R = 1) and circular (R = 2), S in {2, 4}
CASES = [(2, 1, 4), (4, 1, 4), (2, 2, 4), (4, 2, 8)]


def unit(p, x_bld):
    """A residual MLP with statistics: a mean (crosses the data split) and a call count (exposes bubbles)."""
    h_bld = jax.nn.relu(x_bld @ p["w1"]) @ p["w2"]
    return x_bld + h_bld, {"sq": jnp.mean(x_bld * x_bld), "calls": jnp.ones(()), "h_d": jnp.mean(h_bld, axis=(0, 1))}


def objective(y_mbld, stats):
    return jnp.sum(jnp.sin(y_mbld)) + jnp.sum(stats["sq"]) + jnp.sum(stats["h_d"] * jnp.arange(D))


def sequential(params_u, x_mbld):
    """Each microbatch through all units in logical order; stats summed over microbatches."""
    y_mbld, stats = jax.vmap(lambda x: jax.lax.scan(lambda x, p: unit(p, x), x, params_u))(x_mbld)
    return y_mbld, jax.tree.map(lambda a: a.sum(0), stats)


def inputs(units: int, micro: int):
    k1, k2, k3 = jax.random.split(jax.random.key(0), 3)
    params_u = {"w1": jax.random.normal(k1, (units, D, F)) / 3, "w2": jax.random.normal(k2, (units, F, D)) / 4}
    return params_u, jax.random.normal(k3, (micro, MB, L, D))


@functools.cache
def compiled_case(stages: int, repeats: int, micro: int):
    """(mesh, compiled value-and-grad of the pipelined objective, its results in logical order, the reference's)."""
    units = 2 * stages * repeats
    params_u, x_mbld = inputs(units, micro)
    mesh = tedjax.make_mesh(8 // stages, 1, 1, stage=stages)

    def piped(p, x):
        y, stats = pipeline.run(unit, p, x, stages=stages, repeats=repeats,
                                remat_policy=jax.checkpoint_policies.nothing_saveable)
        return objective(y, stats), stats

    with jax.set_mesh(mesh):
        p_sm = jax.device_put(pipeline.to_stage_major(params_u, stages, repeats),
                              named_sharding(mesh, ("layers", None, None)))
        x = jax.device_put(x_mbld, named_sharding(mesh, (None, "batch", None, None)))
        compiled = jax.jit(jax.value_and_grad(piped, argnums=(0, 1), has_aux=True)).lower(p_sm, x).compile()
        (loss, stats), (g_p, g_x) = compiled(p_sm, x)
    got = (loss, stats, pipeline.to_logical(g_p, stages, repeats), g_x)

    def plain(p, x):
        y, stats = sequential(p, x)
        return objective(y, stats), stats

    (loss0, stats0), (g_p0, g_x0) = jax.jit(jax.value_and_grad(plain, argnums=(0, 1), has_aux=True))(params_u, x_mbld)
    return mesh, compiled, got, (loss0, stats0, g_p0, g_x0)


@pytest.mark.parametrize("stages, repeats, micro", CASES)
def test_pipeline_equals_sequential(stages, repeats, micro):
    _, _, got, want = compiled_case(stages, repeats, micro)
    for name, a, b in zip(("loss", "stats", "param grads", "input grads"), got, want):
        for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
            scale = float(jnp.max(jnp.abs(y)))
            assert float(jnp.max(jnp.abs(x - y))) <= 2e-6 * max(scale, 1.0), name
    # every unit ran exactly once per microbatch: no bubble iteration leaked into the statistics
    np.testing.assert_array_equal(np.asarray(got[1]["calls"]), np.full(2 * stages * repeats, micro))


@pytest.mark.parametrize("stages, repeats, micro", CASES)
def test_one_collective_permute_per_iteration_each_way(stages, repeats, micro):
    mesh, compiled, _, _ = compiled_case(stages, repeats, micro)
    in_loop = [c for c in analysis.collectives(compiled, mesh) if c.in_loop and not c.trivial]
    permutes = [c for c in in_loop if c.kind == "collective-permute"]
    microbatch_bytes = MB // mesh.shape["data"] * L * D * 4  # one device's share of a microbatch's activations
    iterations = micro * repeats + stages - 1
    assert len(permutes) == 2, permutes  # the forward shift and its transpose in the backward loop
    assert all(c.axes == ("stage",) and c.result_bytes == microbatch_bytes for c in permutes), permutes
    assert all(c.trip_count == iterations for c in permutes), [c.trip_count for c in permutes]
    # weights never move inside the loop: the only other traffic is the data-parallel reductions
    assert all(c.axes == ("data",) and c.kind == "all-reduce" for c in in_loop if c.kind != "collective-permute")


@pytest.mark.parametrize("stages", [2, 4])
@pytest.mark.parametrize("micro", [4, 8, 16])
def test_idle_fraction_of_the_schedule_matches_theory(stages, micro):
    gpipe = pipeline.idle_fraction(stages, micro)
    assert gpipe == pytest.approx((stages - 1) / (micro + stages - 1))
    assert gpipe == pytest.approx(pipeline.bubble_fraction(stages, micro, schedule="gpipe"))
    circular = pipeline.idle_fraction(stages, micro, repeats=2)
    assert circular == pytest.approx(pipeline.bubble_fraction(stages, micro, 2, "circular")) and circular < gpipe
    # the repeats of a GPipe schedule are ignored: it has one run of layers per stage
    assert pipeline.bubble_fraction(stages, micro, 2, "gpipe") == gpipe


def test_schedule_table_and_stage_major_order():
    table = pipeline.schedule_table(2, 2, repeats=2)
    np.testing.assert_array_equal(table, [[0, -1], [1, 0], [2, 1], [3, 2], [-1, 3]])
    # 8 units, 2 stages x 2 repeats: stage 0 holds units 0-1 and 4-5, stage 1 units 2-3 and 6-7
    np.testing.assert_array_equal(pipeline.stage_major_order(8, 2, 2), [0, 1, 4, 5, 2, 3, 6, 7])
    tree = {"w": jnp.arange(8.0)[:, None]}
    back = pipeline.to_logical(pipeline.to_stage_major(tree, 2, 2), 2, 2)
    np.testing.assert_array_equal(back["w"], tree["w"])


def test_bad_counts_are_refused():
    with pytest.raises(ValueError, match="3 microbatches cannot fill 4 stages; set pipeline.microbatches >= "):
        pipeline.schedule_table(4, 3)
    with pytest.raises(ValueError, match="6 scanned units do not split into 4 stages x 1 repeats"):
        pipeline.stage_major_order(6, 4)
    with pytest.raises(ValueError, match="schedule must be one of"):
        pipeline.bubble_fraction(2, 4, schedule="1f1b")


STAGED = ["model.vocab_size=256", "model.d_model=32", "model.n_layers=4", "model.n_heads=2", "model.d_ff=64",
          "model.expert_d_ff=64", "model.num_experts=4", "model.max_len=32", "data.seq_len=32", "data.source=synthetic",
          "mesh.stage=2", "mesh.data=2", "mesh.expert=2", "mesh.tensor=1", "data.batch_size=8"]  # fmt: skip


@pytest.mark.parametrize("overrides, message", [
    (["model.n_layers=6", "model.moe_every=2", "mesh.stage=4", "mesh.data=1"],
     r"mesh.stage=4 x pipeline.repeats=1 does not divide the 3 scanned units \(model.n_layers=6 in units of "
     r"moe_every=2\)"),
    (["pipeline.schedule=circular", "pipeline.repeats=2", "pipeline.microbatches=2", "model.n_layers=8"],
     None),  # fits: 4 units (moe_every 2) = 2 stages x 2 repeats, 2 microbatches of 4 sequences
    (["pipeline.microbatches=1"], r"pipeline.microbatches=1 is too few for mesh.stage=2"),
    (["pipeline.microbatches=4"],
     r"a micro-batch of 8 sequences does not split into pipeline.microbatches=4 microbatches over data x expert = 4"),
    (["pipeline.repeats=2"], r"pipeline.repeats=2 needs pipeline.schedule=circular"),
])  # fmt: skip
def test_pipeline_config_is_checked_before_anything_compiles(overrides, message):
    if message is None:
        assert load_config(None, STAGED + overrides).pipeline.microbatches_for(2) == 2
        return
    with pytest.raises(ValueError, match=message):
        load_config(None, STAGED + overrides)


def test_run_batch_equals_the_whole_batch_on_one_device():
    """Microbatches of interleaved rows, put back in place; stats averaged (each unit's mean over the batch)."""
    params_u, x_mbld = inputs(4, 4)
    x_bld = x_mbld.reshape(-1, L, D)
    mesh = tedjax.make_mesh(4, 1, 1, stage=2)
    with jax.set_mesh(mesh):
        x = jax.device_put(x_bld, named_sharding(mesh, ("batch", None, None)))
        y, stats = jax.jit(functools.partial(pipeline.run_batch, unit, stages=2, microbatches=4))(params_u, x)
    y0, stats0 = jax.lax.scan(lambda x, p: unit(p, x), x_bld, params_u)
    np.testing.assert_allclose(y, y0, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(stats["sq"], stats0["sq"], rtol=1e-5)
    np.testing.assert_allclose(stats["calls"], np.ones(4))


# ---------------------------------------------------------------- the Transformer through the pipeline

# 4 units of 1 MoE layer each; top-1 at capacity factor 1 drops tokens, top-2 at 4 drops none
DROPS = variant(SMALL, n_layers=4, moe_every=1)
NO_DROPS = variant(SMALL, n_layers=4, moe_every=1, top_k=2, capacity_factor=4.0)
# (stage, data, expert, tensor), schedule, repeats, microbatches, model
MODEL_CASES = {
    "2x2x2x1-gpipe-top1-drops": ((2, 2, 2, 1), "gpipe", 1, 2, DROPS),
    "2x1x2x2-circular-top2": ((2, 1, 2, 2), "circular", 2, 4, NO_DROPS),
    "4x1x2x1-gpipe-top2": ((4, 1, 2, 1), "gpipe", 1, 4, NO_DROPS),
    "2x2x1x2-circular-top1-drops": ((2, 2, 1, 2), "circular", 2, 4, DROPS),
}


@functools.cache
def reference_run(config):
    return loss_and_grads(config, one_device_mesh(), small_batch())


@functools.cache
def pipelined_run(case: str):
    (stage, data, expert, tensor), schedule, repeats, micro, config = MODEL_CASES[case]
    pipe_cfg = PipelineConfig(microbatches=micro, schedule=schedule, repeats=repeats)
    mesh = tedjax.make_mesh(data, expert, tensor, stage=stage)
    return mesh, loss_and_grads(config, mesh, small_batch(), pipeline=pipe_cfg)


@pytest.mark.parametrize("case", sorted(MODEL_CASES))
def test_transformer_pipeline_matches_one_device(case):
    config = MODEL_CASES[case][-1]
    ref_loss, ref_grads, ref_metrics, _ = reference_run(config)
    assert np.all(ref_metrics["dropped_fraction"] > 0.02) == (config is DROPS)
    assert np.all(ref_metrics["dropped_fraction"] == 0) == (config is NO_DROPS)
    _, (loss, grads, metrics, _) = pipelined_run(case)
    assert abs(loss - ref_loss) < 1e-5 * max(1.0, abs(ref_loss))
    assert max_abs_diff(grads, ref_grads) < 1e-5
    # MoE statistics: means over the microbatches, exactly the whole batch's
    for name in ("aux_loss", "z_loss", "expert_load", "dropped_fraction", "lm_loss"):
        np.testing.assert_allclose(metrics[name], ref_metrics[name], atol=1e-6, rtol=1e-6, err_msg=name)


def test_transformer_pipeline_sends_one_microbatch_per_iteration():
    mesh, (_, _, _, compiled) = pipelined_run("4x1x2x1-gpipe-top2")
    (stage, data, expert, _), _, _, micro, config = MODEL_CASES["4x1x2x1-gpipe-top2"]
    permutes = [c for c in analysis.collectives(compiled, mesh)
                if c.kind == "collective-permute" and c.in_loop and c.axes == ("stage",)]  # fmt: skip
    rows = small_batch()["inputs"].shape[0] // micro // (data * expert)  # one device's rows of a microbatch
    activation_bytes = rows * small_batch()["inputs"].shape[1] * config.d_model * 4
    assert len(permutes) == 2 and all(c.result_bytes == activation_bytes for c in permutes), permutes
    assert all(c.trip_count == micro + stage - 1 for c in permutes)
    # the planner predicts every permute of the activations, in the loop and the hand-off after it (issue 22 item 4)
    from tedjax import plan

    batch, length = small_batch()["inputs"].shape
    planned = TrainConfig(model=config, mesh=MeshConfig(data, expert, 1, stage), pipeline=PipelineConfig(micro),
                          data=DataConfig(source="synthetic", seq_len=length, batch_size=batch))
    row = plan.permute_comparison(planned, compiled, mesh)
    assert row["exact"] and row["measured_count"] == 2 * (micro + stage), row


# FasterMoE under stages: shadows (a set per layer, stored in the pipeline's stage-major order) and 2-chunk
# all-to-alls, at (2, 1, 2, 2), circular with 2 repeats and 2 microbatches (4 routing groups each: 2 chunks x 2)
SHADOWS_AND_CHUNKS = variant(NO_DROPS, shadow_experts=2, a2a_chunks=2)
SHADOW_IDS = np.array([[3, 5], [0, 8], [6, 1], [8, 8]])  # [MoE layer, R]; 8 = an empty slot


def test_shadows_and_chunks_through_the_pipeline_match_one_device():
    """Each stage's MoE layers copy their shadowed experts to that stage's expert devices and split each
    all-to-all in 2 chunks: the 1-device loss, gradients and statistics of the same model without either, and
    every chunk of the loop's all-to-alls is half of an unchunked microbatch's (the 4-microbatch run of this layout,
    whose microbatches are half as large)."""
    from flax import nnx

    from tedjax.model import moe_stack

    ref_loss, ref_grads, ref_metrics, _ = reference_run(NO_DROPS)
    mesh = tedjax.make_mesh(1, 2, 2, stage=2)
    model = tedjax.init_model(SHADOWS_AND_CHUNKS, mesh, pipeline=PipelineConfig(2, "circular", 2))
    moe_stack(model).shadow_ids[...] = jnp.asarray(SHADOW_IDS, jnp.int32)
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)

    def grad_fn(params, batch):
        loss_of = lambda p: tedjax.loss_fn(nnx.merge(graphdef, p, rest), batch)  # noqa: E731
        return jax.value_and_grad(loss_of, has_aux=True)(params)

    with jax.set_mesh(mesh):
        batch = jax.device_put(small_batch(), named_sharding(mesh, ("batch", None)))
        compiled = jax.jit(grad_fn).lower(params, batch).compile()
        (loss, metrics), grads = compiled(params, batch)
    assert abs(float(loss) - ref_loss) < 1e-5 * max(1.0, abs(ref_loss))
    assert max_abs_diff(jax.tree.map(np.asarray, nnx.to_pure_dict(grads)), ref_grads) < 1e-5
    for name in ("aux_loss", "z_loss", "expert_load", "dropped_fraction", "lm_loss"):
        np.testing.assert_allclose(metrics[name], ref_metrics[name], atol=1e-6, rtol=1e-6, err_msg=name)
    # each layer's shadowed experts' tokens stay on their device: its pools get what the other experts draw
    for layer, ids in enumerate(SHADOW_IDS):
        pooled = np.where(np.isin(np.arange(8), ids), 0.0, ref_metrics["expert_load"][layer])
        np.testing.assert_allclose(metrics["device_load"][layer], balance.device_loads(pooled, np.arange(8), 2),
                                   atol=1e-6, err_msg=layer)
    a2a = lambda program: [c.result_bytes for c in analysis.collectives(program, mesh)  # noqa: E731
                           if c.kind == "all-to-all" and c.in_loop and c.axes == ("expert",)]
    chunked, unchunked = a2a(compiled), a2a(pipelined_run("2x1x2x2-circular-top2")[1][3])
    assert chunked and len(chunked) == 2 * len(unchunked) and set(chunked) == set(unchunked), (chunked, unchunked)


# ---------------------------------------------------------------- the Trainer: ZeRO-1, tiled AdamW, DTD, CAC


def trainer_config(stage: int, data: int, expert: int, tensor: int, tmp: Path, schedule: str = "circular",
                   repeats: int = 2) -> TrainConfig:
    return TrainConfig(
        steps=10, model=variant(DROPS, dtd=True, remat="cac"), mesh=MeshConfig(data, expert, tensor, stage),
        optimizer=OptimizerConfig(zero=1, warmup_steps=0, tile_size=256),
        data=DataConfig(source="synthetic", seq_len=16, batch_size=16, grad_accum=2),
        pipeline=PipelineConfig(microbatches=4, schedule=schedule, repeats=repeats),
        log=LogConfig(dir=str(tmp)), checkpoint=CheckpointConfig(dir=str(tmp / "ckpt"), async_save=False),
    )  # fmt: skip


@pytest.fixture(scope="module")
def trainers(tmp_path_factory):
    """Trainers of one config by stage count: 1 (one device), 2 ((2, 2, 1, 2) of 8 devices, circular with 2
    repeats: 4 units) and 4 ((4, 1, 1, 2), GPipe: 4 units do not split into 4 x 2)."""
    tmp = tmp_path_factory.mktemp("pipeline_ckpt")
    layouts = {1: (1, 1, 1, 1), 2: (2, 2, 1, 2), 4: (4, 1, 1, 2)}
    out = {}
    for stage, layout in layouts.items():
        mesh = one_device_mesh() if stage == 1 else tedjax.make_mesh(*layout[1:], stage=stage)
        gpipe = {"schedule": "gpipe", "repeats": 1} if stage == 4 else {}
        out[stage] = Trainer(trainer_config(*layout, tmp, **gpipe), mesh)
    return tmp, out


def step_on(trainer: Trainer, state, seed: int):
    """(state, loss) after one train step on the fixed batch `seed`."""
    batch = {k: np.asarray(v) for k, v in small_batch(16, 16, seed=seed).items()}
    state, metrics = trainer.train_step(state, trainer.shard_batch(batch))
    return state, float(metrics["loss"])


def restore(trainer: Trainer, **kwargs):
    reader = Checkpointer(trainer.config, resume=True, **kwargs)
    try:
        return reader.restore(trainer.abstract_state())
    finally:
        reader.close()


def test_trainer_with_stages_zero1_tiled_dtd_cac_and_checkpoints_across_stage_counts(trainers):
    """Stage 2 (circular) trains as 1 device does (ZeRO-1 state split over data inside each stage, tiled AdamW,
    DTD, CAC, two micro-batches, the units' gradients in lanes), and its checkpoint after one step restores at
    stage 1 and at stage 4 (GPipe: another schedule and repeats, a safe change) with the same values and the same
    next loss. The stage-2 state keeps its units in the circular schedule's stage-major order; the checkpoint
    holds them in logical order."""
    _, by_stage = trainers
    losses, saved = {}, None
    for stage in (1, 2):
        state, first = step_on(by_stage[stage], by_stage[stage].init_state(), 0)
        if stage == 2:  # saved before the next step donates the state
            saver = Checkpointer(by_stage[2].config, resume=False)
            saver.save(1, state, {"step": 1}, force=True)
            saver.close()
            assert by_stage[2].units_order == (2, 2)
            stored = np.asarray(state.params["units"]["blocks"][0]["attn"]["wq"])
            saved = jax.tree.map(np.asarray, by_stage[2].logical_units(state.params))
            np.testing.assert_array_equal(stored, pipeline.to_stage_major(saved["units"]["blocks"][0]["attn"]["wq"],
                                                                           2, 2))
        losses[stage] = [first, step_on(by_stage[stage], state, 1)[1]]
    np.testing.assert_allclose(losses[2], losses[1], rtol=2e-5)
    restored, meta = restore(by_stage[1])
    assert meta["step"] == 1
    assert step_on(by_stage[1], restored, 1)[1] == pytest.approx(losses[2][1], rel=2e-5)
    # stage 4, GPipe: no --allow-change; the same values in logical order and the same next loss
    restored, _ = restore(by_stage[4])
    for a, b in zip(jax.tree.leaves(restored.params), jax.tree.leaves(saved), strict=True):
        np.testing.assert_array_equal(np.asarray(a), b)
    assert step_on(by_stage[4], restored, 1)[1] == pytest.approx(losses[2][1], rel=2e-5)


def test_stage_weights_stay_put_and_their_gradients_are_reduced_once_per_step(trainers):
    """The compiled circular step at stage 2: over "stage" only activations move (one microbatch per iteration
    each way, and the outputs to every stage for the head) besides statistics smaller than the smallest weight,
    so no weight crosses stages; and the units' weights take lanes (NOTES.md section 3.2): inside the schedule's
    loop no gradient is reduced over the data-parallel axes, only the MoE statistics."""
    trainer = trainers[1][2]
    compiled = trainer.lower_train_step().compile()
    data = trainer.config.data
    smallest = min(int(np.prod(s.shard_shape(a.shape))) * 4 for a, s in zip(
        jax.tree.leaves(trainer.abstract_params["units"]), jax.tree.leaves(trainer.model_shardings["units"])))
    rows = data.micro_batch_size // 2  # one device's rows of a micro-batch (data x expert = 2)
    activations = rows * data.seq_len * trainer.config.model.d_model * 4
    microbatch = activations // trainer.config.pipeline.microbatches
    found = [c for c in analysis.collectives(compiled, trainer.mesh) if not c.trivial]
    staged = [c for c in found if "stage" in c.axes]
    permutes = [c for c in staged if c.kind == "collective-permute" and (c.trip_count or 0) > data.grad_accum]
    # the shift forward and back in each of the R M + S - 1 iterations, one microbatch each
    assert [(c.result_bytes, c.trip_count) for c in permutes] == [(microbatch, data.grad_accum * (2 * 4 + 1))] * 2
    assert all(c.result_bytes in (microbatch, activations) or c.sent_bytes < smallest for c in staged), staged
    in_schedule = [c for c in found if (c.trip_count or 0) > data.grad_accum and {"data", "expert"} & set(c.axes)]
    assert in_schedule and all(c.result_bytes < smallest for c in in_schedule), (smallest, in_schedule)


def test_a_placement_move_with_stages_moves_the_right_layer_and_keeps_the_loss(trainers):
    """`Trainer.move_experts`-style move of MoE layer 1 on the circular stage-2 state, whose units are stored
    stage-major (layer 1 at slot 2): that layer's experts and placement move, no other; the loss is unchanged."""
    trainer = trainers[1][2]
    state = trainer.init_state()
    before = jax.tree.map(np.asarray, trainer.logical_units(state.params))
    loss = step_on(trainer, trainer.init_state(), 0)[1]
    placements = trainer.placements(state)
    placements[1] = np.roll(placements[1], 3)  # expert e to slot placements[1][e]
    moved = trainer._move_layer(state, jax.numpy.asarray(placements), (1,))
    np.testing.assert_array_equal(trainer.placements(moved), placements)
    after = jax.tree.map(np.asarray, trainer.logical_units(moved.params))
    w_in = [t["units"]["blocks"][0]["ffn"]["w_in"] for t in (before, after)]  # [layers, E (by slot), D, F]
    np.testing.assert_array_equal(w_in[1][1], w_in[0][1][np.argsort(placements[1])])
    np.testing.assert_array_equal(np.delete(w_in[1], 1, axis=0), np.delete(w_in[0], 1, axis=0))
    assert step_on(trainer, moved, 0)[1] == pytest.approx(loss, rel=2e-5)


HF_MIXTRAL = Path(__file__).resolve().parent / "fixtures" / "hf" / "mixtral"


def test_hf_load_onto_a_mesh_with_stages():
    """tedjax.hf.load onto (stage, data, expert, tensor) = (2, 2, 2, 1): each unit's weights on its stage, and the
    logits equal transformers' (the model has no pipeline config: its scan gathers each unit from its stage, as
    generation does)."""
    from flax import nnx

    from tedjax import hf

    mesh = tedjax.make_mesh(2, 2, 1, stage=2)
    _, model = hf.load(HF_MIXTRAL, mesh)
    assert model.units.blocks[0].attn.wq[...].sharding.spec[0] == "stage"
    gold = dict(np.load(HF_MIXTRAL.parent / "mixtral_golden.npz"))
    rows = gold["input_ids"].shape[0]
    model.eval()
    graphdef, state = nnx.split(model)
    with jax.set_mesh(mesh):
        tokens = jax.device_put(np.tile(gold["input_ids"], (8 // rows, 1)).astype(np.int32),
                                named_sharding(mesh, ("batch", None)))
        logits = jax.jit(lambda s, t: nnx.merge(graphdef, s)(t)[0])(state, tokens)
    error = np.max(np.abs(np.asarray(logits)[:rows] - gold["logits"]))
    assert error <= 1e-4 * np.max(np.abs(gold["logits"])), error


def test_hf_save_writes_a_stage_major_model_in_logical_order(tmp_path):
    """A model merged from a circular Trainer's state keeps its units stage-major (`units_order`); hf.save writes
    layer k as layer k all the same: the files equal those of the same model in logical order."""
    from flax import nnx

    from tedjax import hf
    from tedjax import pipeline as pipe

    config = tedjax.ModelConfig(vocab_size=64, d_model=16, n_layers=4, n_heads=2, d_ff=32, num_experts=4,
                                expert_d_ff=32, top_k=2, moe_every=1, activation="swiglu", max_len=32)
    logical = tedjax.Transformer(config, rngs=nnx.Rngs(0))
    graphdef, state = nnx.split(logical)
    nnx.replace_by_pure_dict(state, pipe.reorder_units(nnx.to_pure_dict(state), (1, 1), (2, 2)))
    stored = nnx.merge(graphdef, state)
    stored.units_order = (2, 2)
    w = [np.asarray(m.units.blocks[0].attn.wq[...]) for m in (logical, stored)]
    assert not np.array_equal(w[0], w[1]) and np.array_equal(w[0][[0, 2, 1, 3]], w[1])  # really stage-major
    files = [hf.save(m, tmp_path / name) / "model.safetensors" for m, name in ((logical, "a"), (stored, "b"))]
    assert files[0].read_bytes() == files[1].read_bytes()
