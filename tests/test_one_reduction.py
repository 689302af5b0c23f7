"""Gradient accumulation reduces the gradients once per step (ZeRO-1, NOTES.md section 3.2).

One compiled step at grad_accum = 4 on (2, 2, 2), composed with DTD, CAC and
the tiled optimizer, on two scanned units (their weights' lanes at dim 1 of
`[layers, lanes, ...]`), checked twice: its loss and gradients equal one
device's, and its data-parallel reductions carry as many bytes as the step at
grad_accum = 1 (with a reduction per micro-batch they carried 4x). The lane
helpers themselves are checked without a mesh.
"""

import jax
import numpy as np
import pytest
from reference import max_abs_diff
from test_zero import one_step, tokens, train_config

import tedjax
from tedjax import analysis
from tedjax.trainer import Trainer

LAYOUT, OPTIONS = (2, 2, 2), {"tile_size": 100, "dtd": True, "remat": "cac", "n_layers": 4}


def compiled_step(accum: int):
    """(trainer, state, compiled train step) of ZeRO-1 at `accum` micro-batches on LAYOUT."""
    options = dict(OPTIONS)
    config = train_config(LAYOUT, 1, accum, options.pop("tile_size"), **options)
    trainer = Trainer(config, tedjax.make_mesh(*LAYOUT))
    state = trainer.init_state()
    return trainer, state, trainer.lower_train_step(state).compile()


def reduction_bytes(compiled, mesh) -> tuple[float, int]:
    """(bytes one device sends in all-reduces and reduce-scatters over the batch axes per step, the largest
    such op inside the micro-batch loop in bytes)."""
    total, in_loop = 0.0, 0
    for c in analysis.collectives(compiled, mesh):
        if c.kind in ("all-reduce", "reduce-scatter") and not c.trivial and {"data", "expert"} & set(c.axes):
            total += c.sent_bytes * (c.trip_count or 1)
            in_loop = max(in_loop, c.result_bytes if c.in_loop else 0)
    return total, in_loop


@pytest.fixture(scope="module")
def four_micro_batches():
    return compiled_step(4)


def test_matches_one_device(four_micro_batches):
    trainer, state, compiled = four_micro_batches
    with jax.set_mesh(trainer.mesh):
        state, metrics = compiled(state, trainer.shard_batch(tokens(4)))
    ref_loss, ref_norm, ref_mu, *_ = one_step((1, 1, 1), 1, 4, n_layers=OPTIONS["n_layers"])
    assert abs(float(metrics["loss"]) - ref_loss) < 1e-5 * max(1.0, abs(ref_loss))
    assert abs(float(metrics["grad_norm"]) - ref_norm) < 1e-5 * ref_norm
    assert max_abs_diff(jax.tree.map(np.asarray, state.opt_state[0].mu), ref_mu) < 1e-7  # mu = 0.1 * gradient


def test_reduction_bytes_do_not_grow_with_micro_batches(four_micro_batches):
    trainer, _, compiled = four_micro_batches
    per_step, in_loop = reduction_bytes(compiled, trainer.mesh)
    one, _ = reduction_bytes(compiled_step(1)[2], trainer.mesh)
    # inside the loop only the loss and metric scalars are reduced; the gradients once, after it (the embedding's
    # gradient is reduced as a sum of lanes at n = 4, at n = 1 by XLA's own scatter: a few % apart)
    assert in_loop <= 256, in_loop
    assert per_step <= 1.2 * one, (per_step, one)


def test_lane_helpers_equal_the_plain_ops_and_their_lane_gradients_sum_to_the_plain_gradient():
    """No mesh: lanes `[N, ...]` of one weight give the plain result, and each lane's gradient is its own
    rows' share (their sum is the plain gradient)."""
    from tedjax.layers import lane_einsum, lane_scale, lane_take

    rng = np.random.default_rng(0)
    x, w = rng.standard_normal((4, 3, 5)), rng.standard_normal((5, 6))
    scale, table, ids = rng.standard_normal(5), rng.standard_normal((7, 5)), rng.integers(0, 7, (4, 3))
    ops = {
        "einsum": (lambda w: lane_einsum("bld,df->blf", x, w, split="b"), w),
        "scale": (lambda s: lane_scale(x, s), scale),
        "take": (lambda t: lane_take(t, ids), table),
    }
    for name, (op, weight) in ops.items():
        lanes = np.broadcast_to(weight, (2, *weight.shape))
        np.testing.assert_allclose(op(lanes), op(weight), rtol=1e-6, err_msg=name)
        plain = jax.grad(lambda w: (op(w) ** 2).sum())(weight)
        per_lane = jax.grad(lambda w: (op(w) ** 2).sum())(lanes)
        first_half = jax.grad(lambda w: (op(w)[:2] ** 2).sum())(weight)  # lane 0 holds batch rows 0..1
        np.testing.assert_allclose(per_lane[0], first_half, rtol=1e-5, atol=1e-6, err_msg=name)
        np.testing.assert_allclose(per_lane.sum(0), plain, rtol=1e-5, atol=1e-6, err_msg=name)
