"""Training end to end: loss falls on real text, exact resume, resharding restore, ZeRO-1, global norm."""

import json
import math
from pathlib import Path

import jax
import numpy as np
import pytest
from flax import nnx
from reference import FACTORIZATIONS, max_abs_diff

import tedjax
from tedjax import analysis
from tedjax.checkpoint import Checkpointer
from tedjax.config import load_config
from tedjax.data import synthetic_batches
from tedjax.loop import run
from tedjax.trainer import Trainer

SMALL_RUN = [
    "model.d_model=64", "model.n_layers=2", "model.n_heads=4", "model.d_ff=128", "model.expert_d_ff=128",
    "model.max_len=64", "data.seq_len=64", "data.batch_size=16", "log.progress=false", "log.every=1",
    "log.eval_batches=2", "optimizer.warmup_steps=2", "optimizer.learning_rate=0.01",
]  # fmt: skip


def small_config(tmp_path, *extra):
    return load_config("configs/tiny.yaml", [*SMALL_RUN, f"log.dir={tmp_path}", *extra])


@pytest.fixture(scope="module")
def straight_run(tmp_path_factory):
    """24 steps without stopping, checkpoints every 12 (saved on the (2, 2, 2) mesh)."""
    tmp = tmp_path_factory.mktemp("straight")
    config = small_config(tmp, "steps=24", "checkpoint.every=12", "log.eval_every=12")
    return config, run(config)


def test_loss_decreases_on_real_text(straight_run):
    config, result = straight_run
    losses = result.train_losses
    assert sorted(losses) == list(range(1, 25))
    assert np.mean([losses[23], losses[24]]) < losses[1] - 1.0
    # validation ran, and the log files exist and hold every step
    assert set(result.eval_losses) == {12, 24}
    records = [json.loads(line) for line in open(f"{config.log.dir}/metrics.jsonl")]
    train_steps = [r["step"] for r in records if r["kind"] == "train"]
    assert train_steps == list(range(1, 25))
    first = next(r for r in records if r["kind"] == "train")
    for key in ("loss", "lm_loss", "aux_loss", "z_loss", "learning_rate", "grad_norm", "tokens_per_s",
                "tflops_per_device", "expert_load", "dropped_fraction", "skipped_steps"):  # fmt: skip
        assert key in first, key
    assert len(first["expert_load"]) == config.model.n_moe_layers
    assert len(first["expert_load"][0]) == config.model.num_experts
    assert any(p.name.startswith("events.out.tfevents") for p in Path(config.log.dir, "tensorboard").iterdir())


def test_tiny_run_beats_unigram_baseline(straight_run):
    """Even 24 small steps move validation loss below the unigram entropy of the text."""
    _, result = straight_run
    assert result.unigram_baseline is not None and 2.5 < result.unigram_baseline < 5.0
    assert result.eval_losses[24] < result.unigram_baseline


def test_resume_continues_exactly(straight_run, tmp_path):
    config, straight = straight_run
    config = small_config(tmp_path, "steps=24", "checkpoint.every=12", "log.eval_every=12")
    first = run(config, stop_after=12)
    assert first.last_checkpoint == 12
    second = run(config, resume=True)
    for step in range(13, 25):
        assert second.train_losses[step] == pytest.approx(straight.train_losses[step], rel=1e-5, abs=1e-6)
    final = jax.tree.map(np.asarray, second.state.params)
    assert max_abs_diff(final, jax.tree.map(np.asarray, straight.state.params)) < 1e-5


def test_restore_onto_another_mesh_reshards(straight_run):
    config, straight = straight_run
    new_mesh = tedjax.make_mesh(1, 4, 2)
    trainer = Trainer(config, new_mesh)
    state, meta = Checkpointer(config, resume=True).restore(trainer.abstract_state())
    assert meta["step"] == 24
    expert_w = state.params["blocks"][1]["ffn"]["w_in"]
    assert expert_w.sharding.mesh.shape == new_mesh.shape
    assert expert_w.sharding.spec == jax.sharding.PartitionSpec("expert", None, "tensor")
    np_restored = jax.tree.map(np.asarray, state.params)
    assert max_abs_diff(np_restored, jax.tree.map(np.asarray, straight.state.params)) == 0.0
    # the next step gives the same loss on both meshes
    batch = next(synthetic_batches(config.model.vocab_size, 16, 64, seed=3))
    losses = []
    for trainer_i, state_i in ((trainer, state), (straight.trainer, straight.state)):
        with jax.set_mesh(trainer_i.mesh):
            _, metrics = trainer_i.train_step(state_i, trainer_i.shard_batch(batch))
        losses.append(float(metrics["loss"]))
    assert losses[0] == pytest.approx(losses[1], rel=1e-5)


# ---------------------------------------------------------------- ZeRO-1


def _zero1_trainer(layout, zero1=True, tmp="/tmp/unused"):
    config = load_config("configs/tiny.yaml", [*SMALL_RUN, f"log.dir={tmp}", f"optimizer.zero1={str(zero1).lower()}",
                                               f"mesh.data={layout[0]}", f"mesh.expert={layout[1]}",
                                               f"mesh.tensor={layout[2]}"])  # fmt: skip
    return Trainer(config, tedjax.make_mesh(*layout))


def _per_device_bytes(tree) -> int:
    device = jax.devices()[0]
    return sum(s.data.nbytes for leaf in jax.tree.leaves(tree) for s in leaf.addressable_shards if s.device == device)


@pytest.mark.parametrize("layout", [(2, 2, 2), (1, 4, 2), (8, 1, 1)], ids=lambda s: "x".join(map(str, s)))
def test_zero1_optimizer_state_bytes_match_the_formula(layout):
    data, expert, tensor = layout
    trainer = _zero1_trainer(layout)
    state = trainer.init_state()
    # Formula (NOTES.md section 1): Adam's mu and nu (2 x 4 bytes per element), each parameter
    # split over its own shards, then over its data-parallel group: data x expert for
    # non-expert parameters, data for expert parameters.
    expected = 0
    _, abstract = nnx.split(tedjax.model.abstract_model(trainer.config.model))
    for v in jax.tree.leaves(abstract, is_leaf=lambda x: isinstance(x, nnx.Variable)):
        spec = tedjax.logical_to_spec(v.logical_axes)
        is_expert = "experts" in v.logical_axes
        model_split = (tensor if "tensor" in jax.tree.leaves(tuple(spec)) else 1) * (expert if is_expert else 1)
        dp_group = data if is_expert else data * expert
        expected += 2 * 4 * math.prod(v.shape) // (model_split * dp_group)
    scalars = 4 * 2  # Adam's count and the schedule's count, replicated
    assert _per_device_bytes(state.opt_state) == expected + scalars
    replicated = _zero1_trainer(layout, zero1=False).init_state()
    if data * expert > 1:
        assert _per_device_bytes(replicated.opt_state) > 1.5 * _per_device_bytes(state.opt_state)


def test_zero1_update_gathers_parameters_over_their_data_parallel_group():
    trainer = _zero1_trainer((2, 2, 2))
    colls = analysis.collectives(trainer.lower_train_step().compile(), trainer.mesh)
    # float32 gathers are the parameters' (the embedding backward also gathers int32 token ids)
    gathers = analysis.summarize([c for c in colls if c.kind == "all-gather" and c.shape.startswith("f32")])
    # every updated shard is gathered back: non-expert params over (data, expert), expert params over data
    params = trainer.abstract_params
    expert_bytes = sum(4 * math.prod(p.shape) // (2 * 2) for p in jax.tree.leaves(params) if p.ndim == 3 and
                       p.shape[0] == trainer.config.model.num_experts)  # fmt: skip
    assert gathers[("all-gather", ("data",))]["result_bytes"] == expert_bytes
    assert ("all-gather", ("data", "expert")) in gathers
    assert not any("expert" in axes and "data" not in axes for (_, axes) in gathers)


# ---------------------------------------------------------------- global norm


@pytest.fixture(scope="module")
def one_step_batch():
    return next(synthetic_batches(256, 16, 64, seed=5))


def _grad_norm_on(layout, batch):
    trainer = _zero1_trainer(layout)
    state = trainer.init_state()
    with jax.set_mesh(trainer.mesh):
        _, metrics = trainer.train_step(state, trainer.shard_batch(batch))
    return float(metrics["grad_norm"]), float(metrics["loss"])


@pytest.fixture(scope="module")
def one_device_norm(one_step_batch):
    config = load_config("configs/tiny.yaml", [*SMALL_RUN, "mesh.data=1", "mesh.expert=1", "mesh.tensor=1"])
    trainer = Trainer(config, tedjax.make_mesh(1, 1, 1, devices=jax.devices()[:1]))
    with jax.set_mesh(trainer.mesh):
        _, metrics = trainer.train_step(trainer.init_state(), trainer.shard_batch(one_step_batch))
    return float(metrics["grad_norm"]), float(metrics["loss"])


@pytest.mark.slow
@pytest.mark.parametrize("layout", FACTORIZATIONS, ids=lambda s: "x".join(map(str, s)))
def test_global_grad_norm_counts_every_expert_once(layout, one_step_batch, one_device_norm):
    norm, loss = _grad_norm_on(layout, one_step_batch)
    assert loss == pytest.approx(one_device_norm[1], rel=1e-5)
    assert norm == pytest.approx(one_device_norm[0], rel=1e-4)
