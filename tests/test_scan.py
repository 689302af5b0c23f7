"""Scanned layers (issue 22 item 1): one stacked unit of `moe_every` blocks, run by lax.scan or by a loop
over the same state; the "layers" axis; older checkpoints with unrolled blocks."""

import dataclasses
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec
from reference import TINY_RUN_OVERRIDES, loss_and_grads, one_device_mesh, small_batch

import tedjax
from tedjax.checkpoint import Checkpointer, CheckpointError, _layer_trees
from tedjax.config import load_config
from tedjax.model import Block, stack_layers, unstack_layers
from tedjax.trainer import Trainer

# 5 layers, an MoE layer every 2: two scanned units (dense, MoE) and one dense tail layer
DEEP = tedjax.ModelConfig(vocab_size=64, d_model=32, n_layers=5, n_heads=4, d_ff=64, max_len=16, num_experts=4,
                          expert_d_ff=32, top_k=2, capacity_factor=1.0, min_capacity=1)


@pytest.fixture(scope="module")
def runs():
    """(loss, grads, metrics, compiled) of DEEP on 1 device: looped and scanned, and scanned with full remat per
    unit."""
    batch = small_batch()
    return {(remat, scan): loss_and_grads(dataclasses.replace(DEEP, remat=remat, scan_layers=scan),
                                          one_device_mesh(), batch)
            for remat, scan in (("none", False), ("none", True), ("full", True))}


def test_scan_equals_the_loop(runs):
    """The scan and the Python loop over the same stacked parameters: the same loss and metrics bit for bit
    in f32; gradients within a few float32 roundings (measured up to 5.3 eps). XLA:CPU compiles the scan's while
    bodies apart, and two of its decisions depend on what is fused with what: FMA contraction and YNNPACK
    fusions. With both off (--xla_cpu_max_isa=AVX --xla_cpu_experimental_ynn_fusion_type=, a per-process flag)
    the two are bit-equal: the next test checks it (NOTES.md section 3.1)."""
    (loss_loop, grads_loop, metrics_loop, _), (loss_scan, grads_scan, metrics_scan, _) = (runs["none", False],
                                                                                          runs["none", True])
    assert loss_scan == loss_loop
    for key in metrics_loop:
        np.testing.assert_array_equal(metrics_scan[key], metrics_loop[key], err_msg=key)
    assert jax.tree.structure(grads_scan) == jax.tree.structure(grads_loop)
    for (path, g_scan), g_loop in zip(jax.tree_util.tree_flatten_with_path(grads_scan)[0], jax.tree.leaves(grads_loop)):
        np.testing.assert_allclose(g_scan, g_loop, rtol=0, atol=8 * np.finfo(np.float32).eps * np.abs(g_loop).max(),
                                   err_msg=jax.tree_util.keystr(path))


def test_scan_equals_the_loop_bit_for_bit_without_fusion_dependent_rounding():
    """Issue 22's bit-for-bit target: with XLA:CPU's two fusion-dependent rounding choices off (FMA contraction,
    which only `--xla_cpu_max_isa=AVX` removes, and YNNPACK library fusions), DEEP looped and scanned give the
    same loss and every gradient leaf bit for bit, without remat and with full remat. The ISA is read once per
    process, hence `tools/scan_bits.py` in its own process (NOTES.md section 3.1)."""
    repo = Path(__file__).resolve().parents[1]
    proc = subprocess.run([sys.executable, str(repo / "tools" / "scan_bits.py"), "--flags", "tests-exact", "--unit",
                           "tedjax", "--remat", "none,full"], capture_output=True, text=True, timeout=600, cwd=repo)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [line for line in proc.stdout.splitlines() if line.startswith("flags=tests-exact unit=tedjax")]
    assert [line.split("remat=")[1].split(":")[0] for line in lines] == ["none", "full"], proc.stdout
    for line in lines:
        assert line.endswith("loss equal True; gradient leaves differing: 0 of 28"), line


def test_remat_per_unit_recomputes_the_same_numbers(runs):
    (loss_full, grads_full, *_), (loss, grads, *_) = runs["full", True], runs["none", True]
    assert loss_full == loss
    for g_full, g in zip(jax.tree.leaves(grads_full), jax.tree.leaves(grads), strict=True):
        np.testing.assert_allclose(g_full, g, rtol=0, atol=8 * np.finfo(np.float32).eps * np.abs(g).max())


def test_scan_without_remat_keeps_no_more_than_the_loop(runs):
    """The scan stacks its residuals over units; with elementwise ops recomputed (save_all_but_elementwise) its
    temporaries stay at the loop's, where saving every intermediate (GELU's tanh terms, attention's
    probabilities) took more."""
    temp = {scan: runs["none", scan][3].memory_analysis().temp_size_in_bytes for scan in (False, True)}
    assert temp[True] <= temp[False], temp


def test_stacked_units_keep_the_unrolled_initial_values():
    """Blocks built one by one and then stacked: the values an unrolled model gets from the same seed."""
    model = tedjax.Transformer(DEEP, rngs=nnx.Rngs(0))
    rngs = nnx.Rngs(0)
    rngs.params()  # the embedding's draw comes first
    unrolled = {i: nnx.to_pure_dict(nnx.state(Block(DEEP, i, rngs=rngs), nnx.Param)) for i in range(DEEP.n_layers)}
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    jax.tree.map(np.testing.assert_array_equal, unstack_layers(DEEP, params)["blocks"], unrolled)
    restacked = stack_layers(DEEP, unstack_layers(DEEP, params))
    jax.tree.map(np.testing.assert_array_equal, restacked, params)
    assert set(params) == {"embed", "units", "tail", "final_norm", "head"} and set(params["tail"]) == {0}
    assert params["units"]["blocks"][1]["ffn"]["w_in"].shape == (2, 4, 32, 32)  # [units, E, D, F]


def test_layers_axis_leads_every_stacked_variable():
    """Every variable of the units (parameters and balance state) declares "layers" first: split over "stage"
    by RULES, so replicated on a mesh without stages."""
    model = tedjax.model.abstract_model(DEEP)
    assert tedjax.RULES["layers"] == "stage"
    for path, var in nnx.iter_graph(model.units):
        if isinstance(var, nnx.Variable) and not isinstance(var, nnx.RngState):
            assert var.get_metadata()["out_sharding"][0] == "layers", path
            assert var.shape[0] == DEEP.n_layers // DEEP.moe_every, path
    mesh = tedjax.make_mesh(2, 2, 2)
    spec = tedjax.state_shardings(nnx.state(model.units), mesh)["blocks"][1]["ffn"]["w_in"].spec
    assert spec == PartitionSpec(None, "expert", None, "tensor")


def test_unrolled_checkpoint_restores_stacked(tmp_path):
    """A checkpoint whose layers are unrolled (`params/blocks/<i>`, tedjax before scanned layers) restores into
    the stacked state, values and shardings; another model's is refused, saying who wrote it."""
    config = load_config(None, [*TINY_RUN_OVERRIDES, "model.n_layers=3", f"log.dir={tmp_path / 'run'}"])
    trainer = Trainer(config, tedjax.make_mesh(2, 2, 2))
    state = trainer.init_state()
    state = dataclasses.replace(state, params=jax.tree.map(lambda x: x + 0.5, state.params))  # not the init
    old = _layer_trees(state, lambda t: unstack_layers(config.model, t))
    assert "blocks" in old.params and "units" not in old.params and "blocks" in old.opt_state[0].mu
    checkpointer = Checkpointer(config, resume=False)
    checkpointer.save(1, old, {"step": 1})
    checkpointer.close()
    restored, _ = Checkpointer(config, resume=True).restore(trainer.abstract_state())
    for got, want in zip(jax.tree.leaves(restored), jax.tree.leaves(state), strict=True):
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
        assert got.sharding.is_equivalent_to(want.sharding, want.ndim)
    other = dataclasses.replace(config, model=dataclasses.replace(config.model, n_layers=4))
    with pytest.raises(CheckpointError, match="written by a tedjax before scanned layers .* unrolled `blocks`"):
        Checkpointer(config, resume=True).restore(Trainer(other, tedjax.make_mesh(2, 2, 2)).abstract_state())
