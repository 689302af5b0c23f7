"""The examples: tedjax.MoE inside a user's own NNX model (plain and Flax-partitioned) and a Linen model.

Each trains a few steps on the (2, 2, 2) mesh; the loss must fall, the expert
weights must be split over "expert" (and "tensor"), and the loss and gradients
must equal those of the same model on one device. The Flax-partitioned
example also compiles its step once, has its expert weights split from init
onward and its optimizer state split over data (ZeRO-1).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import jax
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec
from reference import one_device_mesh

import tedjax
from tedjax.data import synthetic_batches

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
NAMES = ["nnx_custom_model", "linen_bridge", "nnx_partitioned_transformer"]
STEPS = 6
EXPERT_SPEC = PartitionSpec("expert", None, "tensor")  # w_in [E, D, F]
BACKEND_COMPILE = "/jax/core/compile/backend_compile_duration"


def load(name: str):
    spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_every_example_is_tested():
    assert sorted(p.stem for p in EXAMPLES.glob("*.py")) == sorted(NAMES)


@pytest.fixture(scope="module", params=NAMES)
def example(request):
    module = load(request.param)
    mesh = tedjax.make_mesh(2, 2, 2)
    losses, *state = module.train(STEPS, mesh=mesh)
    return request.param, module, mesh, losses, state


def _expert_arrays(name, state):
    """(w_in, Adam first moment of w_in) after training."""
    if name == "nnx_custom_model":
        model, optimizer = state
        mu = nnx.state(optimizer)["opt_state"][0]["mu"]
        return model.block.moe.w_in[...], mu["block"]["moe"]["w_in"][...]
    if name == "nnx_partitioned_transformer":
        model, _, opt_state = state
        return model.moe.w_in[...], opt_state[0].mu["moe"]["w_in"]
    params, opt_state = state
    return params["moe"]["w_in"].value, opt_state[0].mu["moe"]["w_in"].value


def test_loss_decreases(example):
    _, _, _, losses, _ = example
    assert len(losses) == STEPS and all(np.isfinite(losses))
    assert losses[-1] < losses[0] - 0.5, losses  # ln(64) = 4.16 at start; the task is learnable


def test_expert_weights_sharded_over_expert(example):
    name, module, mesh, _, state = example
    w_in, mu = _expert_arrays(name, state)
    # ZeRO-1 (the partitioned example) also splits the moments over "data", on the first dim it divides.
    mu_spec = PartitionSpec("expert", "data", "tensor") if name == "nnx_partitioned_transformer" else EXPERT_SPEC
    for array, spec in ((w_in, EXPERT_SPEC), (mu, mu_spec)):
        assert array.sharding.mesh.shape == mesh.shape
        assert array.sharding.spec == spec
    # Each device holds E/2 experts and F/2 of each expert's hidden units.
    shard_shapes = {s.data.shape for s in w_in.addressable_shards}
    assert shard_shapes == {(module.EXPERTS // 2, module.D_MODEL, module.EXPERT_FF // 2)}


def test_user_parameters_follow_their_declaration(example):
    """Undeclared user parameters are replicated (asked for explicitly); declared ones follow their axes."""
    name, _, _, _, state = example
    if name == "nnx_custom_model":
        assert state[0].head.kernel[...].sharding.is_fully_replicated
    elif name == "linen_bridge":
        assert state[0]["Dense_0"]["kernel"].sharding.is_fully_replicated
    else:
        model = state[0]
        assert model.head.kernel[...].sharding.spec == PartitionSpec(None, "tensor")  # ("embed", "vocab")
        assert model.attn.out.kernel[...].sharding.spec == PartitionSpec("tensor", None)  # ("heads", "embed")
        assert model.embed.embedding[...].sharding.spec == PartitionSpec("tensor", None)  # ("vocab", "embed")


def _first_step_gradients(name, module, mesh):
    """(LM loss, {parameter path: gradient of the total loss}) of the example's loss on its first batch, on `mesh`."""
    batch = next(synthetic_batches(module.VOCAB, module.BATCH, module.SEQ, seed=0))
    with jax.set_mesh(mesh):
        batch = jax.device_put(batch, NamedSharding(mesh, tedjax.logical_to_spec(("batch", None))))
        if name == "linen_bridge":
            model, tx = module.LinenMoELM(), module._optimizer(module.LEARNING_RATE)
            params, _ = module.init_sharded(model, tx, mesh)
            grad_fn = jax.jit(jax.value_and_grad(module.loss_fn, has_aux=True), static_argnums=1)
            (_, lm_loss), grads = grad_fn(params, model, batch)
            flat = {jax.tree_util.keystr(k): v for k, v in jax.tree_util.tree_leaves_with_path(grads)}
        else:
            model = module.create_sharded(mesh)[0] if name == "nnx_custom_model" else module.create(mesh)[0]
            grad_fn = nnx.jit(nnx.value_and_grad(module.loss_fn, has_aux=True))
            (_, lm_loss), grads = grad_fn(model, batch)
            flat = {"/".join(map(str, k)): v[...] for k, v in nnx.to_flat_state(grads)}
    return float(lm_loss), {k: np.asarray(v) for k, v in flat.items()}


def test_same_gradients_on_one_device(example):
    """The mesh changes where things run, not what is computed: loss and every gradient match 1 device.

    (Whole loss curves are not compared here: Adam's first step divides each gradient by its own size, so
    float-rounding differences in near-zero gradients become full-size updates of either sign.)
    """
    name, module, mesh, losses, _ = example
    loss8, grads8 = _first_step_gradients(name, module, mesh)
    loss1, grads1 = _first_step_gradients(name, module, one_device_mesh())
    assert loss8 == pytest.approx(losses[0], abs=1e-6)  # the first training step computed this loss
    assert abs(loss8 - loss1) < 1e-5
    assert grads8.keys() == grads1.keys() and any("w_in" in k for k in grads8)
    for key in grads8:
        np.testing.assert_allclose(grads8[key], grads1[key], rtol=0, atol=1e-6, err_msg=key)


def test_main_runs_as_documented(example):
    """`main(steps)` returns one finite loss per step (the scripts' entry point)."""
    _, module, _, losses, _ = example
    assert jax.device_count() == 8, "main() picks its mesh from the device count; conftest gives 8"
    assert module.main(steps=2) == pytest.approx(losses[:2], abs=2e-5)


# The Flax-partitioned example: the checks on the step helper.


@pytest.fixture(scope="module")
def partitioned():
    return load("nnx_partitioned_transformer")


def _train_counting_compiles(module, mesh, steps: int):
    """(losses, backend compiles during the steps, model, opt_state), from a fresh model on `mesh`."""
    model, step, opt_state = module.create(mesh)
    data = synthetic_batches(module.VOCAB, module.BATCH, module.SEQ, seed=0)
    batches = [next(data) for _ in range(steps)]
    compiles = []

    def listen(event, _secs, **_):
        if event == BACKEND_COMPILE:
            compiles.append(event)

    jax.monitoring.register_event_duration_secs_listener(listen)
    try:
        losses = []
        for batch in batches:
            (_, lm_loss), opt_state = step(model, opt_state, batch)
            losses.append(float(lm_loss))
    finally:
        jax.monitoring.unregister_event_duration_listener(listen)
    return losses, len(compiles), model, opt_state


@pytest.fixture(scope="module")
def partitioned_runs(partitioned):
    """{"2x2x2": ..., "1": ...}: 3 steps from a fresh model on each mesh."""
    meshes = {"2x2x2": tedjax.make_mesh(2, 2, 2), "1": one_device_mesh()}
    return {key: _train_counting_compiles(partitioned, mesh, steps=3) for key, mesh in meshes.items()}


@pytest.fixture(scope="module")
def fresh_partitioned(partitioned):
    """(model, step, opt_state) straight from `create` on (2, 2, 2), before any step."""
    return partitioned.create(tedjax.make_mesh(2, 2, 2))


def test_partitioned_example_compiles_once(partitioned_runs):
    assert partitioned_runs["2x2x2"][1] == 1
    assert partitioned_runs["1"][1] == 1


def test_partitioned_example_expert_weights_split_from_init(partitioned, fresh_partitioned):
    model = fresh_partitioned[0]
    for weight in (model.moe.w_in, model.moe.w_out):
        assert weight[...].sharding.spec[0] == "expert"
        assert {s.data.shape[0] for s in weight[...].addressable_shards} == {partitioned.EXPERTS // 2}
    # Flax's own view shows the declared logical axes.
    spec = nnx.get_partition_spec(nnx.state(model))["moe"]["w_in"].get_value()
    assert spec == PartitionSpec("experts", "embed", "ffn")


def test_partitioned_example_optimizer_state_split_over_data(fresh_partitioned):
    mu = fresh_partitioned[2][0].mu
    # Expert moments: split over "data" on top of the weight's own ("expert", "tensor") split.
    assert mu["moe"]["w_in"].sharding.spec == PartitionSpec("expert", "data", "tensor")
    # Non-expert moments: split over the whole non-expert data-parallel group ("data", "expert").
    assert mu["attn"]["q"]["kernel"].sharding.spec == PartitionSpec(("data", "expert"), "tensor")
    # Every device holds 1/8 of the expert moments: 1/2 each from "expert", "tensor" and "data".
    w_in = mu["moe"]["w_in"]
    assert {int(np.prod(s.data.shape)) for s in w_in.addressable_shards} == {w_in.size // 8}


def test_partitioned_example_same_loss_on_one_device(partitioned_runs):
    """Three training steps on (2, 2, 2) give the losses of one device (to float rounding)."""
    losses8, losses1 = partitioned_runs["2x2x2"][0], partitioned_runs["1"][0]
    assert losses8[0] == pytest.approx(losses1[0], abs=1e-5)
    np.testing.assert_allclose(losses8, losses1, rtol=0, atol=1e-4)
