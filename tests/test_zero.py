"""ZeRO levels 1, 2, 3 (`optimizer.zero`): the same step as one device, the state split as each level says.

Level 1 splits Adam's moments over each parameter's data-parallel group, 2
also the gradients (accumulated in those shards), 3 also the parameters
(FSDP: stored split, all-gathered where the layers use them). Gradients are
read from Adam's first moment after one step: mu = (1 - b1) * clipped grads.
"""

import dataclasses
import functools
import json
import math
import os
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import train_fork
from flax import nnx
from reference import FACTORIZATIONS, SMALL, init_state_on, max_abs_diff, one_device_mesh, variant

import tedjax
from tedjax.checkpoint import Checkpointer
from tedjax.config import DataConfig, MeshConfig, OptimizerConfig, TrainConfig
from tedjax.trainer import Trainer

REPO = Path(__file__).resolve().parents[1]
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
def one_step(layout, zero: int, accum: int = ACCUM, tile_size: int = 0, **model):
    """(loss, grad norm, mu, new params, trainer, state after) of one train step."""
    mesh = one_device_mesh() if layout == (1, 1, 1) else tedjax.make_mesh(*layout)
    trainer = Trainer(train_config(layout, zero, accum, tile_size, **model), mesh)
    state = init_state_on(trainer)
    state, metrics = trainer.train_step(state, trainer.shard_batch(tokens(accum)))
    to_np = lambda t: jax.tree.map(np.asarray, t)  # noqa: E731
    return (float(metrics["loss"]), float(metrics["grad_norm"]), to_np(state.opt_state[0].mu), to_np(state.params),
            trainer, state)


# ZeRO 3 on every layout; ZeRO 2 compiles to ZeRO 1's program on XLA:CPU (its shards are what propagation
# already picks), so three layouts (data only, expert + data, all three axes) check its constraints.
ZERO2_LAYOUTS = [(8, 1, 1), (2, 4, 1), (2, 2, 2)]


@pytest.mark.parametrize("layout,zero", [(layout, 3) for layout in FACTORIZATIONS] + [(layout, 2) for layout in ZERO2_LAYOUTS],
                         ids=lambda v: ids(v) if isinstance(v, tuple) else str(v))
def test_matches_one_device(layout, zero):
    ref_loss, ref_norm, ref_mu, _, _, _ = one_step((1, 1, 1), 1)
    loss, norm, mu, _, trainer, state = one_step(layout, zero)
    assert abs(loss - ref_loss) < 1e-5 * max(1.0, abs(ref_loss))
    assert abs(norm - ref_norm) < 1e-5 * ref_norm
    assert max_abs_diff(mu, ref_mu) < 1e-7  # mu = 0.1 * gradient
    expected = trainer.zero1_shardings if zero == 3 else trainer.model_shardings
    assert jax.tree.leaves(jax.tree.map(lambda a, s: a.sharding.spec == s.spec, state.params, expected)) == \
        [True] * len(jax.tree.leaves(expected))


def test_four_micro_batches_match_one_device():
    """grad_accum = 4 at ZeRO 2 on (2, 4, 1): the gradients summed in the optimizer's shards equal 1 device's."""
    ref_loss, ref_norm, ref_mu, *_ = one_step((1, 1, 1), 1, 4)
    loss, norm, mu, *_ = one_step((2, 4, 1), 2, 4)
    assert abs(loss - ref_loss) < 1e-5 * max(1.0, abs(ref_loss))
    assert abs(norm - ref_norm) < 1e-5 * ref_norm
    assert max_abs_diff(mu, ref_mu) < 1e-7


@pytest.mark.parametrize("zero", [2, 3])
def test_composes_with_dtd_cac_and_the_tiled_optimizer(zero):
    """DTD + CAC + 100-element tiles on (1, 2, 4): the same loss and gradients as one device."""
    ref_loss, ref_norm, ref_mu, _, _, _ = one_step((1, 1, 1), 1)
    loss, norm, mu, *_ = one_step((1, 2, 4), zero, ACCUM, 100, dtd=True, remat="cac")
    assert abs(loss - ref_loss) < 1e-5 * max(1.0, abs(ref_loss))
    assert abs(norm - ref_norm) < 1e-5 * ref_norm
    assert max_abs_diff(mu, ref_mu) < 1e-7


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
    expert_w = state3.params["units"]["blocks"][1]["ffn"]["w_in"]
    assert "data" in str(expert_w.sharding.spec)  # expert weights split over their own group, "data"
    batch = jax.tree.map(lambda x: x[0], trainer3.shard_batch(tokens()))  # one micro-batch [B, L]
    evals = [float(t.eval_step(s.params, s.model_state, batch)["loss"]) for t, s in ((trainer1, state1),
                                                                                   (trainer3, state3))]
    assert evals[1] == pytest.approx(evals[0], rel=1e-5)  # evaluation reads the split parameters as they are


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
        # each shard written whole by one replica (no per-replica slices: no slicing programs to compile)
        written = {m["array_metadata"]["param_name"]: m["array_metadata"]["write_shape"] for m in json.loads(
            (directory / "1" / "state" / "array_metadatas" / "process_0").read_text())["array_metadatas"]}
        for path, leaf in jax.tree_util.tree_leaves_with_path(state.params):
            name = "params." + ".".join(str(getattr(k, "key", k)) for k in path)
            assert written[name] == list(leaf.sharding.shard_shape(leaf.shape)), name
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
        placements = jax.device_put(trainer.check_placements(np.stack([new_e] * trainer.n_moe)),
                                    jax.sharding.NamedSharding(trainer.mesh, jax.sharding.PartitionSpec()))
        new = trainer.move_experts(jax.tree.map(jnp.copy, state), placements)  # the move donates its input
        for leaf, sharding in zip(jax.tree.leaves(new.params), jax.tree.leaves(trainer.param_shardings)):
            assert leaf.sharding.spec == sharding.spec
        params, mu = jax.tree.map(np.asarray, (new.params, new.opt_state[0].mu))
        for tree, old in ((params, before[0]), (mu, before[1])):
            units, old_units = tree["units"]["blocks"], old["units"]["blocks"]  # [n_moe, E, ...]
            np.testing.assert_array_equal(units[1]["ffn"]["w_in"], old_units[1]["ffn"]["w_in"][:, perm])
            np.testing.assert_array_equal(units[0]["attn"]["wq"], old_units[0]["attn"]["wq"])


@pytest.mark.slow
def test_memory_scale_quick(tmp_path):
    """benchmarks/memory_scale.py --quick: ZeRO 3's split leaves take 1/|group| of an unsplit copy (target)."""
    env = dict(os.environ)
    env.pop("XLA_FLAGS", None)  # the script sets its own, before importing jax
    proc = train_fork.run_script(REPO / "benchmarks" / "memory_scale.py", ["--quick", "--out", str(tmp_path)], env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads((tmp_path / "memory_scale.json").read_text())
    assert result["settings"]["quick"] is True and result["machine"]["jax_version"]
    rows = {(r["layout"], r["zero"]): r for r in result["rows"]}
    assert {z for _, z in rows} == {0, 1, 2, 3}
    for target in result["settings"]["targets"]:
        by = {z: rows[(target["layout"], z)] for z in range(4)}
        assert target["zero0_is_unsplit"]  # memory_analysis agrees with the shard shapes
        assert target["ratio"] == pytest.approx(by[3]["sharded_total"] / by[3]["ideal_sharded_total"])
        assert target["verdict"] == ("PASS" if abs(target["ratio"] - 1) <= 0.05 else "MISS")
        assert by[1]["sharded_optimizer"] == by[2]["sharded_optimizer"] == by[3]["sharded_optimizer"] \
            < by[0]["sharded_optimizer"]
        assert by[2]["sharded_grads"] == by[3]["sharded_grads"] < by[1]["sharded_grads"] == by[0]["sharded_grads"]
        assert by[3]["sharded_params"] < by[2]["sharded_params"] == by[1]["sharded_params"]
        assert by[3]["step_argument"] < by[1]["step_argument"]
    assert (tmp_path / "memory_scale.md").read_text().startswith("# Memory per device by ZeRO level")


def test_custom_loop_step_zero3_stores_the_model_split():
    """`train_step_fn(..., zero=3)`: the model holds its parameters split between steps, and steps as at ZeRO 1."""
    mesh = tedjax.make_mesh(2, 2, 2)
    batch = {"x": np.random.default_rng(0).standard_normal((8, 8, 16)).astype(np.float32)}
    losses, params = {}, {}
    for zero in (1, 3):
        moe = tedjax.MoE(16, 8, 32, rngs=nnx.Rngs(0))
        step = tedjax.train_step_fn(lambda m, b: jnp.mean(m(b["x"])[0] ** 2), optax.sgd(0.5), mesh, zero=zero)
        opt_state = step.init(moe)
        shardings = step.param_shardings(moe)
        losses[zero] = [float(step(moe, opt_state, batch)[0]) for _ in range(2)]
        assert moe.w_in[...].sharding.spec == shardings["zero1" if zero == 3 else "model"]["w_in"].spec
        params[zero] = jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(moe, nnx.Param)))
    assert shardings["zero1"]["w_in"].spec != shardings["model"]["w_in"].spec  # "data" added: really split
    np.testing.assert_allclose(losses[3], losses[1], rtol=1e-6)
    assert losses[3][1] < losses[3][0]
    assert max_abs_diff(params[3], params[1]) < 1e-6
    with pytest.raises(ValueError, match="zero1=False turns off"):
        tedjax.train_step_fn(lambda m, b: 0.0, optax.sgd(0.1), mesh, zero1=False, zero=3)
