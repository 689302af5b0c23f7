"""ZeRO levels 1, 2, 3 (`optimizer.zero`): the same step as one device, the state split as each level says.

Level 1 splits Adam's moments over each parameter's data-parallel group, 2
also the gradients (accumulated in those shards), 3 also the parameters
(FSDP: stored split, all-gathered where the layers use them). Gradients are
read from Adam's first moment after one step: mu = (1 - b1) * clipped grads.
"""

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from reference import FACTORIZATIONS, SMALL, max_abs_diff, one_device_mesh, variant

import tedjax
from tedjax import analysis
from tedjax.checkpoint import Checkpointer
from tedjax.config import DataConfig, MeshConfig, OptimizerConfig, TrainConfig
from tedjax.trainer import Trainer

MICRO, SEQ, ACCUM = 8, 16, 2
MODEL = variant(SMALL, capacity_factor=2.0)


def ids(layout):
    return "x".join(map(str, layout))


def train_config(layout, zero: int, accum: int = ACCUM, tile_size: int = 0, **model) -> TrainConfig:
    return TrainConfig(
        steps=10,
        model=variant(MODEL, **model),
        mesh=MeshConfig(*layout),
        optimizer=OptimizerConfig(zero=zero, warmup_steps=0, tile_size=tile_size),
        data=DataConfig(source="synthetic", seq_len=SEQ, batch_size=MICRO * accum, grad_accum=accum),
    )


def tokens(accum: int = ACCUM) -> dict:
    rng = np.random.default_rng(0)
    t = rng.integers(0, MODEL.vocab_size, (MICRO * accum, SEQ + 1)).astype(np.int32)
    return {"inputs": t[:, :-1], "targets": t[:, 1:]}


@functools.cache
def one_step(layout, zero: int, accum: int = ACCUM, tile_size: int = 0):
    """(loss, grad norm, mu, new params, trainer, state after) of one train step."""
    mesh = one_device_mesh() if layout == (1, 1, 1) else tedjax.make_mesh(*layout)
    trainer = Trainer(train_config(layout, zero, accum, tile_size), mesh)
    state = trainer.init_state()
    state, metrics = trainer.train_step(state, trainer.shard_batch(tokens(accum)))
    to_np = lambda t: jax.tree.map(np.asarray, t)  # noqa: E731
    return (float(metrics["loss"]), float(metrics["grad_norm"]), to_np(state.opt_state[0].mu), to_np(state.params),
            trainer, state)


@pytest.mark.parametrize("zero", [2, 3])
@pytest.mark.parametrize("layout", FACTORIZATIONS, ids=ids)
def test_matches_one_device(layout, zero):
    ref_loss, ref_norm, ref_mu, _, _, _ = one_step((1, 1, 1), 1)
    loss, norm, mu, _, trainer, state = one_step(layout, zero)
    assert abs(loss - ref_loss) < 1e-5 * max(1.0, abs(ref_loss))
    assert abs(norm - ref_norm) < 1e-5 * ref_norm
    assert max_abs_diff(mu, ref_mu) < 1e-7  # mu = 0.1 * gradient
    expected = trainer.zero1_shardings if zero == 3 else trainer.model_shardings
    assert jax.tree.leaves(jax.tree.map(lambda a, s: a.sharding.spec == s.spec, state.params, expected)) == \
        [True] * len(jax.tree.leaves(expected))


def per_device_bytes(tree) -> int:
    device = jax.devices()[0]
    return sum(s.data.nbytes for leaf in jax.tree.leaves(tree) for s in leaf.addressable_shards if s.device == device)


def test_zero3_stores_parameters_in_the_optimizer_shards():
    """(2, 2, 2): non-expert weights split 4 ways more, expert weights 2 ways ("data"); Adam's state as at ZeRO 1."""
    *_, trainer1, state1 = one_step((2, 2, 2), 1)
    *_, trainer3, state3 = one_step((2, 2, 2), 3)
    assert per_device_bytes(state3.opt_state) == per_device_bytes(state1.opt_state)
    expected = 0
    for leaf, own, zero in zip(jax.tree.leaves(state1.params), jax.tree.leaves(trainer1.model_shardings),
                               jax.tree.leaves(trainer1.zero1_shardings)):
        expected += leaf.addressable_shards[0].data.nbytes * math.prod(zero.shard_shape(leaf.shape)) \
            // math.prod(own.shard_shape(leaf.shape))
    assert per_device_bytes(state3.params) == expected < per_device_bytes(state1.params) / 3
    expert_w = state3.params["blocks"][1]["ffn"]["w_in"]
    assert "data" in str(expert_w.sharding.spec)  # expert weights split over their own group, "data"


def test_checkpoint_restores_across_levels_and_layouts(tmp_path):
    """A ZeRO-1 (2, 2, 2) state restores as ZeRO 3 on (1, 4, 2) and back, value for value."""
    *_, trainer1, state1 = one_step((2, 2, 2), 1)
    *_, trainer3, state3 = one_step((1, 4, 2), 3)
    for (source, state), target in (((trainer1, state1), trainer3), ((trainer3, state3), trainer1)):
        config = dataclasses.replace(source.config, log=dataclasses.replace(source.config.log, dir=str(tmp_path)))
        directory = tmp_path / f"zero{source.config.optimizer.zero}"
        config = dataclasses.replace(config, checkpoint=dataclasses.replace(config.checkpoint, dir=str(directory)))
        saver = Checkpointer(config, resume=False)
        saver.save(1, state, {"step": 1}, force=True)
        saver.close()
        target_config = dataclasses.replace(target.config, checkpoint=config.checkpoint, log=config.log)
        reader = Checkpointer(target_config, resume=True)
        try:
            restored, meta = reader.restore(target.abstract_state())
        finally:
            reader.close()
        assert meta["step"] == 1
        for got, want in zip(jax.tree.leaves(restored), jax.tree.leaves(state)):
            np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
        for leaf, sharding in zip(jax.tree.leaves(restored.params), jax.tree.leaves(target.param_shardings)):
            assert leaf.sharding.spec == sharding.spec


def test_zero3_placement_move_carries_the_split_state():
    """An expert move at ZeRO 3 permutes the split expert weights and their Adam moments, as at ZeRO 1."""
    new_e = np.roll(np.arange(MODEL.num_experts), 3)
    perm = np.argsort(new_e)  # from the identity placement: new slot -> the slot its expert leaves
    for zero in (1, 3):
        *_, trainer, state = one_step((2, 2, 2), zero)
        before = jax.tree.map(np.asarray, (state.params, state.opt_state[0].mu))
        placements = jax.device_put(trainer.check_placements(np.stack([new_e] * len(trainer.moe_paths))),
                                    jax.sharding.NamedSharding(trainer.mesh, jax.sharding.PartitionSpec()))
        new = trainer.move_experts(jax.tree.map(jnp.copy, state), placements)  # the move donates its input
        for leaf, sharding in zip(jax.tree.leaves(new.params), jax.tree.leaves(trainer.param_shardings)):
            assert leaf.sharding.spec == sharding.spec
        params, mu = jax.tree.map(np.asarray, (new.params, new.opt_state[0].mu))
        for tree, old in ((params, before[0]), (mu, before[1])):
            np.testing.assert_array_equal(tree["blocks"][1]["ffn"]["w_in"], old["blocks"][1]["ffn"]["w_in"][perm])
            np.testing.assert_array_equal(tree["blocks"][0]["attn"]["wq"], old["blocks"][0]["attn"]["wq"])
