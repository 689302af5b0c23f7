"""Shared helpers: one small model computed on 1 device and on 8-device meshes."""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import tedjax
from tedjax.config import TrainConfig

# Every (data, expert, tensor) factorization of 8 devices the core must match.
FACTORIZATIONS = [(8, 1, 1), (1, 8, 1), (2, 4, 1), (4, 1, 2), (2, 2, 2), (1, 4, 2), (1, 2, 4)]

SMALL = tedjax.ModelConfig(
    vocab_size=64, d_model=32, n_layers=2, n_heads=4, d_ff=64, max_len=16,
    num_experts=8, expert_d_ff=32, top_k=1, capacity_factor=1.0, min_capacity=1,
)  # fmt: skip


def small_batch(batch_size: int = 8, seq_len: int = 16, vocab: int = 64, seed: int = 0) -> dict[str, jax.Array]:
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, vocab, (batch_size, seq_len + 1))
    return {"inputs": jnp.asarray(tokens[:, :-1], jnp.int32), "targets": jnp.asarray(tokens[:, 1:], jnp.int32)}


def one_device_mesh():
    return tedjax.make_mesh(1, 1, 1, devices=jax.devices()[:1])


@functools.cache
def _initial_values(config: tedjax.ModelConfig, seed: int, node_size: int) -> nnx.State:
    with jax.set_mesh(one_device_mesh()):
        return jax.jit(lambda: nnx.state(tedjax.model.Transformer(config, rngs=nnx.Rngs(seed), node_size=node_size)))()


def init_on(config: tedjax.ModelConfig, mesh, seed: int = 0, pipeline=None):
    """`tedjax.init_model(config, mesh, seed)`'s model: the same values (`test_init_on_equals_init_model`), made
    once per config on one device and placed in the mesh's shardings. The init program (random initializers
    for every leaf) costs more to compile than the gradient program the tests check (test_equivalence.py: 14 s
    of init against 11 s of grad_fn compiles), and one config is checked on many meshes. With `pipeline`,
    `init_model` itself."""
    if pipeline is not None:
        return tedjax.init_model(config, mesh, seed=seed, pipeline=pipeline)
    tedjax.model.check_mesh(config, mesh)
    node_size = tedjax.mesh.resolve_node_size(mesh)
    graphdef, abstract = nnx.split(tedjax.model.abstract_model(config, seed, None, node_size))
    values = jax.device_put(_initial_values(config, seed, node_size), tedjax.mesh.state_shardings(abstract, mesh))
    return nnx.merge(graphdef, values)


@functools.cache
def _initial_train_state(config: TrainConfig):
    from tedjax.trainer import Trainer

    return Trainer(config, one_device_mesh()).init_state()


def init_state_on(trainer):
    """`trainer.init_state()`'s values and shardings (`test_init_state_on_equals_init_state`), made once per
    config on one device (as `init_on`) and placed in the trainer's state shardings; with stages,
    `init_state` itself (their units are stored in schedule order)."""
    if trainer.config.mesh.stage > 1:
        return trainer.init_state()
    one = dataclasses.replace(trainer.config, mesh=tedjax.config.MeshConfig(1, 1, 1))
    # fresh buffers: the train step donates its state, and a replicated leaf's placed copy may share device 0's
    # buffer with the cached one
    fresh = jax.tree.map(jnp.copy, _initial_train_state(one))
    return jax.device_put(fresh, trainer.state_shardings)


def assert_placed_equal(placed, built) -> None:
    """Two trees of arrays the same bit for bit: structure, dtypes, shardings and values."""
    assert jax.tree.structure(placed) == jax.tree.structure(built)
    for a, b in zip(jax.tree.leaves(placed), jax.tree.leaves(built), strict=True):
        assert a.sharding == b.sharding and a.dtype == b.dtype
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def loss_and_grads(config: tedjax.ModelConfig, mesh, batch, seed: int = 0, pipeline=None):
    """(loss, grads as a pure dict of numpy arrays, metrics, compiled) of `config` on `mesh` (`pipeline`: a
    tedjax.config.PipelineConfig for meshes with stages)."""
    model = init_on(config, mesh, seed=seed, pipeline=pipeline)
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    params, rest = nnx.to_pure_dict(params), nnx.to_pure_dict(rest)

    def grad_fn(params, batch):
        loss_of = lambda p: tedjax.loss_fn(nnx.merge(graphdef, p, rest), batch)  # noqa: E731
        (loss, metrics), grads = jax.value_and_grad(loss_of, has_aux=True)(params)
        return loss, grads, metrics

    with jax.set_mesh(mesh):
        batch = jax.device_put(batch, tedjax.mesh.named_sharding(mesh, ("batch", None)))
        compiled = jax.jit(grad_fn).lower(params, batch).compile()
        loss, grads, metrics = compiled(params, batch)
    to_np = lambda t: jax.tree.map(np.asarray, t)  # noqa: E731
    return float(loss), to_np(grads), to_np(metrics), compiled


def max_abs_diff(a, b) -> float:
    return max(jax.tree.leaves(jax.tree.map(lambda x, y: float(np.max(np.abs(x - y))), a, b)))


def placed_grad_fn(config: tedjax.ModelConfig, mesh, placement_e=None, exchange: str | None = None):
    """(jitted loss-and-grads taking the non-parameter state as an argument, params, rest), with every MoE
    layer's experts at `placement_e` (slot placement[e] holds expert e) and, when given, its `exchange`."""
    from tedjax.model import moe_stack

    model = init_on(config, mesh)
    moe = moe_stack(model)  # every MoE layer, stacked on a leading "layers" axis
    if exchange is not None:
        moe.exchange = exchange
    if placement_e is not None:
        moe.placement[...] = jnp.broadcast_to(jnp.asarray(placement_e, jnp.int32), moe.placement.shape)
        for w in (moe.w_in, moe.w_gate, moe.w_out):
            if w is not None:
                w[...] = jnp.take(w[...], jnp.argsort(jnp.asarray(placement_e)), axis=1)
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)

    def grad_fn(params, rest, batch):
        loss_of = lambda p: tedjax.loss_fn(nnx.merge(graphdef, p, rest), batch)  # noqa: E731
        (loss, metrics), grads = jax.value_and_grad(loss_of, has_aux=True)(params)
        return loss, grads, metrics

    return jax.jit(grad_fn), nnx.to_pure_dict(params), nnx.to_pure_dict(rest)


def expert_grads_in_logical_order(grads: dict, placement) -> dict:
    """Gradients of a model whose expert slots follow `placement`, with each MoE layer's expert weights put
    back in logical expert order (in place), to compare with a model that was never placed."""
    for block in grads["units"]["blocks"].values():  # expert weights [n_moe, E, ...]
        for name in ("w_in", "w_gate", "w_out"):
            if "router" in block["ffn"] and name in block["ffn"]:
                block["ffn"][name] = block["ffn"][name][:, placement]
    return grads


def assert_placed_run_matches(loss, grads, metrics, placement, reference) -> None:
    """A placed run's (loss, grads, metrics) equal the unplaced `reference` (loss, grads, metrics) with nothing
    dropped: loss and gradients (expert ones back in logical order) to 1e-5, expert loads to 1e-6."""
    ref_loss, ref_grads, ref_metrics = reference
    grads = expert_grads_in_logical_order(jax.tree.map(np.asarray, grads), placement)
    assert float(np.max(metrics["dropped_fraction"])) == 0.0
    assert abs(float(loss) - ref_loss) < 1e-5 * max(1.0, abs(ref_loss))
    assert max_abs_diff(grads, ref_grads) < 1e-5
    np.testing.assert_allclose(metrics["expert_load"], ref_metrics["expert_load"], atol=1e-6)


def variant(config: tedjax.ModelConfig, **changes) -> tedjax.ModelConfig:
    return dataclasses.replace(config, **changes)


# train.py overrides for a tiny 8-device run on synthetic tokens (the fault and resume-guard tests)
TINY_RUN_OVERRIDES = [
    "model.vocab_size=256", "model.d_model=32", "model.n_layers=2", "model.n_heads=2", "model.d_ff=64",
    "model.expert_d_ff=64", "model.num_experts=4", "model.max_len=32", "data.seq_len=32", "data.batch_size=8",
    "data.source=synthetic", "mesh.data=2", "mesh.expert=2", "mesh.tensor=2", "log.progress=false",
    "log.tensorboard=false", "log.every=1", "log.eval_every=0", "log.eval_batches=1", "optimizer.warmup_steps=2",
]  # fmt: skip
