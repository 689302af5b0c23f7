"""The same model on 1 device and on every 8-device TED layout: same loss, same gradients."""

import numpy as np
import pytest
from flax import nnx
from reference import (FACTORIZATIONS, SMALL, assert_placed_equal, init_on, loss_and_grads, max_abs_diff,
                       one_device_mesh, small_batch, variant)

import tedjax

CONFIGS = {
    "top1_gelu": SMALL,
    # two routing groups per sequence, so groups never align with mesh shards
    "top2_swiglu_group8": variant(SMALL, top_k=2, activation="swiglu", group_size=8, capacity_factor=0.75),
}


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def reference(request):
    config = CONFIGS[request.param]
    batch = small_batch()
    loss, grads, metrics, _ = loss_and_grads(config, one_device_mesh(), batch)
    return config, batch, loss, grads, metrics


def test_reference_drops_tokens(reference):
    _, _, loss, _, metrics = reference
    dropped = metrics["dropped_fraction"]
    assert np.all(dropped > 0.02), f"the test model must drop tokens in some groups, dropped={dropped}"
    assert np.isfinite(loss)


@pytest.mark.parametrize("layout", FACTORIZATIONS, ids=lambda s: "x".join(map(str, s)))
def test_matches_one_device(reference, layout):
    config, batch, ref_loss, ref_grads, ref_metrics = reference
    loss, grads, metrics, _ = loss_and_grads(config, tedjax.make_mesh(*layout), batch)
    assert abs(loss - ref_loss) < 1e-5 * max(1.0, abs(ref_loss))
    assert max_abs_diff(grads, ref_grads) < 1e-5
    np.testing.assert_allclose(metrics["expert_load"], ref_metrics["expert_load"], atol=1e-6)
    np.testing.assert_allclose(metrics["dropped_fraction"], ref_metrics["dropped_fraction"], atol=1e-6)


@pytest.mark.parametrize("layout", [(2, 2, 2), (1, 8, 1)], ids=lambda s: "x".join(map(str, s)))
def test_init_on_equals_init_model(layout):
    """The tests' shortcut (one device's initial values, placed in the mesh's shardings) is the library's sharded
    init, bit for bit and in the same shardings, so the equivalence tests lose nothing by starting from it."""
    config, mesh = CONFIGS["top2_swiglu_group8"], tedjax.make_mesh(*layout)
    placed, built = nnx.state(init_on(config, mesh)), nnx.state(tedjax.init_model(config, mesh))
    assert_placed_equal(placed, built)
