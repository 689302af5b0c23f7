"""The examples: tedjax.MoE inside a user's own NNX model and inside a Linen model (via nnx.bridge).

Each trains a few steps on the (2, 2, 2) mesh; the loss must fall, the expert
weights and their Adam moments must be split over "expert" (and "tensor"), and
the loss and gradients must equal those of the same model on one device.
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
STEPS = 6
EXPERT_SPEC = PartitionSpec("expert", None, "tensor")  # w_in [E, D, F]


def load(name: str):
    spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module", params=["nnx_custom_model", "linen_bridge"])
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
    params, opt_state = state
    return params["moe"]["w_in"].value, opt_state[0].mu["moe"]["w_in"].value


def test_loss_decreases(example):
    _, _, _, losses, _ = example
    assert len(losses) == STEPS and all(np.isfinite(losses))
    assert losses[-1] < losses[0] - 0.5, losses  # ln(64) = 4.16 at start; the task is learnable


def test_expert_weights_sharded_over_expert(example):
    name, module, mesh, _, state = example
    for array in _expert_arrays(name, state):
        assert array.sharding.mesh.shape == mesh.shape
        assert array.sharding.spec == EXPERT_SPEC
        # Each device holds E/2 experts and F/2 of each expert's hidden units.
        shard_shapes = {s.data.shape for s in array.addressable_shards}
        assert shard_shapes == {(module.EXPERTS // 2, module.D_MODEL, module.EXPERT_FF // 2)}


def test_user_parameters_replicated(example):
    name, _, _, _, state = example
    if name == "nnx_custom_model":
        kernel = state[0].head.kernel[...]
    else:
        kernel = state[0]["Dense_0"]["kernel"]
    assert kernel.sharding.is_fully_replicated


def _first_step_gradients(name, module, mesh):
    """(LM loss, {parameter path: gradient of the total loss}) of the example's loss on its first batch, on `mesh`."""
    batch = next(synthetic_batches(module.VOCAB, module.BATCH, module.SEQ, seed=0))
    with jax.set_mesh(mesh):
        batch = jax.device_put(batch, NamedSharding(mesh, tedjax.logical_to_spec(("batch", None))))
        if name == "nnx_custom_model":
            model, _ = module.create_sharded(mesh)
            grad_fn = nnx.jit(nnx.value_and_grad(module.loss_fn, has_aux=True))
            (_, lm_loss), grads = grad_fn(model, batch)
            flat = {"/".join(map(str, k)): v[...] for k, v in nnx.to_flat_state(grads)}
        else:
            model, tx = module.LinenMoELM(), module._optimizer(module.LEARNING_RATE)
            params, _ = module.init_sharded(model, tx, mesh)
            grad_fn = jax.jit(jax.value_and_grad(module.loss_fn, has_aux=True), static_argnums=1)
            (_, lm_loss), grads = grad_fn(params, model, batch)
            flat = {jax.tree_util.keystr(k): v for k, v in jax.tree_util.tree_leaves_with_path(grads)}
    return float(lm_loss), {k: np.asarray(v) for k, v in flat.items()}


def test_same_gradients_on_one_device(example):
    """The mesh changes where things run, not what is computed: loss and every gradient match 1 device.

    (Whole loss curves are not compared: Adam's first step divides each gradient by its own size, so
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
