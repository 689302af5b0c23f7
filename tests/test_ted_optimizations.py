"""TED's optimizations: DTD, CAC, the tiled optimizer and gradient bucketing.

Each is checked two ways: it computes the same thing (loss and gradients, or
the optimizer state, against the 1-device reference or the untiled update),
and it does what TED says it does, read from the compiled HLO and XLA's memory
analysis (NOTES.md sections 1 and 6).
"""

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
from reference import FACTORIZATIONS, SMALL, loss_and_grads, max_abs_diff, one_device_mesh, small_batch, variant

import tedjax
from tedjax import analysis
from tedjax.config import DataConfig, MeshConfig, OptimizerConfig, TrainConfig, XlaConfig
from tedjax.optim import tiled_adamw_update
from tedjax.trainer import Trainer

REPO = Path(__file__).resolve().parents[1]
BATCH, SEQ = 8, 16
# C = ceil(2.0 * 16 / 8) = 4 slots: divisible by tensor = 2 and 4, so DTD's cut is exact.
BASE = variant(SMALL, capacity_factor=2.0)


def ids(layout):
    return "x".join(map(str, layout))


@functools.cache
def program(config: tedjax.ModelConfig, layout: tuple[int, int, int]):
    """(loss, grads, collectives, memory) of `config`'s loss-and-gradient step on `layout` (compiled once)."""
    mesh = one_device_mesh() if layout == (1, 1, 1) else tedjax.make_mesh(*layout)
    loss, grads, _, compiled = loss_and_grads(config, mesh, small_batch(BATCH, SEQ))
    return loss, grads, analysis.collectives(compiled, mesh), analysis.memory_report(compiled)


def total(colls, kind: str, axes: tuple[str, ...], field: str = "result_bytes") -> float:
    return sum(getattr(c, field) for c in colls if c.kind == kind and c.axes == axes and not c.trivial)


def count(colls, kind: str, axes: tuple[str, ...]) -> int:
    return sum(1 for c in colls if c.kind == kind and c.axes == axes and not c.trivial)


def shape_bytes(config: tedjax.ModelConfig, layout):
    """Per-device bytes of one activation `[B, L, D]` and of one expert buffer `[G, E, C, D]` (float32)."""
    data, expert, _ = layout
    rows = BATCH // (data * expert)
    capacity = tedjax.routing.capacity(SEQ, config.num_experts, config.top_k, config.capacity_factor,
                                       config.min_capacity)
    return rows * SEQ * config.d_model * 4, rows * config.num_experts * capacity * config.d_model * 4


# --------------------------------------------------------------------------- #
# equality


@pytest.mark.parametrize("layout", FACTORIZATIONS, ids=ids)
def test_dtd_and_cac_match_one_device(layout):
    ref_loss, ref_grads, _, _ = program(BASE, (1, 1, 1))
    loss, grads, _, _ = program(variant(BASE, dtd=True, remat="cac"), layout)
    assert abs(loss - ref_loss) < 1e-5 * max(1.0, abs(ref_loss))
    assert max_abs_diff(grads, ref_grads) < 1e-5


@pytest.mark.parametrize("layout", [(2, 2, 2), (1, 2, 4)], ids=ids)
def test_full_remat_matches_one_device(layout):
    ref_loss, ref_grads, _, _ = program(BASE, (1, 1, 1))
    loss, grads, _, _ = program(variant(BASE, remat="full"), layout)
    assert abs(loss - ref_loss) < 1e-5 * max(1.0, abs(ref_loss))
    assert max_abs_diff(grads, ref_grads) < 1e-5


@pytest.mark.slow
def test_dtd_pads_capacity_that_tensor_does_not_divide():
    """C = 2 slots over tensor = 4: padded to 4 empty-slot-filled slots, same results, 1/2 the all-to-all."""
    layout = (1, 2, 4)
    ref_loss, ref_grads, _, _ = program(SMALL, (1, 1, 1))
    loss, grads, colls, _ = program(variant(SMALL, dtd=True), layout)
    assert abs(loss - ref_loss) < 1e-5 * max(1.0, abs(ref_loss))
    assert max_abs_diff(grads, ref_grads) < 1e-5
    _, buffer_bytes = shape_bytes(SMALL, layout)  # C = 2
    per_rank = math.ceil(2 / 4) / 2  # one of the 4 padded slots per tensor rank, against C = 2
    assert total(colls, "all-to-all", ("expert",)) == 4 * SMALL.n_moe_layers * buffer_bytes * per_rank


# --------------------------------------------------------------------------- #
# DTD in the HLO


@pytest.mark.parametrize("layout", [(2, 2, 2), (1, 4, 2), (1, 2, 4)], ids=ids)
def test_dtd_divides_all_to_all_by_tensor(layout):
    _, expert, tensor = layout
    _, _, on, _ = program(variant(BASE, dtd=True, remat="cac"), layout)
    _, _, off, _ = program(variant(BASE, remat="cac"), layout)
    _, buffer_bytes = shape_bytes(BASE, layout)
    n_moe = BASE.n_moe_layers

    # DTD off: 2 all-to-alls forward + 2 backward per MoE layer, each the whole buffer.
    assert count(off, "all-to-all", ("expert",)) == 4 * n_moe
    assert total(off, "all-to-all", ("expert",)) == 4 * n_moe * buffer_bytes
    # DTD on: the same all-to-alls, each exactly 1/tensor of the bytes.
    assert count(on, "all-to-all", ("expert",)) == 4 * n_moe
    assert total(on, "all-to-all", ("expert",)) * tensor == total(off, "all-to-all", ("expert",))
    assert total(on, "all-to-all", ("expert",), "sent_bytes") == pytest.approx(
        4 * n_moe * buffer_bytes / tensor * (expert - 1) / expert)
    # ...plus one all-gather over "tensor" per all-to-all (forward and backward), rebuilding the whole buffer.
    gathers = [c for c in on if c.kind == "all-gather" and not c.trivial]
    assert [c.axes for c in gathers] == [("tensor",)] * 4 * n_moe
    assert all(c.result_bytes == buffer_bytes for c in gathers), [c.shape for c in gathers]
    assert count(off, "all-gather", ("tensor",)) == 0
    # The tensor all-reduces are the same with and without DTD.
    assert total(on, "all-reduce", ("tensor",)) == total(off, "all-reduce", ("tensor",))


def test_dtd_is_off_without_an_expert_axis():
    """With expert = 1 there is no all-to-all to shrink: DTD must not add all-gathers."""
    _, _, colls, _ = program(variant(BASE, dtd=True, remat="cac"), (4, 1, 2))
    assert [c for c in colls if c.kind in ("all-gather", "all-to-all") and not c.trivial] == []


# --------------------------------------------------------------------------- #
# CAC in the HLO


def test_cac_does_not_recompute_collectives():
    """Per MoE layer: `full` issues 3 forward-size all-to-all pairs (forward, recompute, backward), `cac` 2.

    The tensor all-reduces that recomputation needs are re-issued by `full`
    only: each layer's attention output, the MoE layer's expert output (its
    combine needs the returned tokens), and the dense FFN output of each block
    that is not the last of its scanned unit (remat applies per unit, so the
    next block's input inside the unit is recomputed; the unit's own output is
    saved, which nothing in the backward pass recomputes).
    """
    layout = (2, 2, 2)
    activation_bytes, buffer_bytes = shape_bytes(BASE, layout)
    none, full, cac = (program(variant(BASE, remat=r), layout)[2] for r in ("none", "full", "cac"))
    n_moe, n_layers = BASE.n_moe_layers, BASE.n_layers

    a2a = {name: total(c, "all-to-all", ("expert",)) for name, c in (("none", none), ("full", full), ("cac", cac))}
    assert a2a == {"none": 4 * n_moe * buffer_bytes, "full": 6 * n_moe * buffer_bytes, "cac": 4 * n_moe * buffer_bytes}
    assert a2a["full"] / a2a["cac"] == 1.5  # TED: checkpointing costs 1.5x the all-to-all; CAC brings it to 1x

    ar = {name: total(c, "all-reduce", ("tensor",)) for name, c in (("none", none), ("full", full), ("cac", cac))}
    assert ar["cac"] == ar["none"]
    inner_dense = BASE.n_layers // BASE.moe_every * (BASE.moe_every - 1)  # dense blocks before a unit's last
    assert ar["full"] - ar["none"] == (n_layers + inner_dense) * activation_bytes + n_moe * buffer_bytes


def test_cac_with_dtd_keeps_the_all_gathers_single():
    """DTD + CAC: the saved collective outputs spare the recomputation its all-gathers too (4 per MoE layer)."""
    _, _, colls, _ = program(variant(BASE, dtd=True, remat="cac"), (2, 2, 2))
    assert count(colls, "all-gather", ("tensor",)) == 4 * BASE.n_moe_layers
    assert count(colls, "all-to-all", ("expert",)) == 4 * BASE.n_moe_layers


# --------------------------------------------------------------------------- #
# tiled optimizer


def train_config(layout, tile_size: int, num_experts: int = 8) -> TrainConfig:
    return TrainConfig(
        steps=10,
        model=variant(BASE, num_experts=num_experts),
        mesh=MeshConfig(*layout),
        optimizer=OptimizerConfig(tile_size=tile_size, warmup_steps=0),
        data=DataConfig(source="synthetic", seq_len=SEQ, batch_size=BATCH),
    )


def first_step(layout, tile_size: int):
    mesh = tedjax.make_mesh(*layout)
    trainer = Trainer(train_config(layout, tile_size), mesh)
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, BASE.vocab_size, (BATCH, SEQ + 1)).astype(np.int32)
    batch = trainer.shard_batch({"inputs": tokens[:, :-1], "targets": tokens[:, 1:]})
    state = trainer.init_state()
    before = jax.tree.map(np.asarray, state.params)
    with jax.set_mesh(mesh):
        state, _ = trainer.train_step(state, batch)
    return before, jax.tree.map(np.asarray, (state.params, state.opt_state))


@pytest.mark.slow
@pytest.mark.parametrize("layout", [(2, 2, 2), (1, 2, 4)], ids=ids)
def test_tiled_step_matches_untiled(layout):
    # 100-element tiles: the expert weights' local shards (1024 elements on 2x2x2 with ZeRO-1) take
    # 10 full tiles and a partial one; attention and embedding weights are tiled too, norms are not.
    before, (params_t, opt_t) = first_step(layout, tile_size=100)
    _, (params_u, opt_u) = first_step(layout, tile_size=0)
    # Adam's first step is lr * g / (|g| + eps): the two programs' roundoff in a 1e-7 gradient
    # (a different reduction order) moves such an element by ~1e-6 (lr = 3e-3).
    assert max_abs_diff(params_t, params_u) < 1e-5
    assert max_abs_diff(opt_t, opt_u) < 1e-6
    assert max_abs_diff(params_t, before) > 1e-4  # the step did move the parameters


@functools.cache
def isolated_update(layout, num_experts: int, tile_size: int):
    """The optimizer update alone, jitted with its state and parameters donated: (compiled, trainer)."""
    mesh = tedjax.make_mesh(*layout)
    config = train_config(layout, tile_size, num_experts)
    trainer = Trainer(config, mesh)
    abstract = jax.tree.map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), trainer.abstract_params,
        trainer.zero1_shardings,
    )

    def update(grads, opt_state, params, finite):
        if tile_size:
            new_params, new_state = tiled_adamw_update(config.optimizer, trainer.schedule, grads, opt_state, params,
                                                       trainer.zero1_shardings, mesh, finite=finite)
        else:
            updates, new_state = trainer.tx.update(grads, opt_state, params)
            new_params = optax.apply_updates(params, updates)
        return new_state, new_params  # donated inputs' order, so each output reuses its input's buffer

    finite = jax.ShapeDtypeStruct((), jnp.bool_)
    with jax.set_mesh(mesh):
        compiled = jax.jit(update, donate_argnums=(1, 2)).lower(
            abstract, trainer.abstract_state().opt_state, abstract, finite).compile()
    return compiled, trainer


def test_tiled_step_gathers_each_parameter_once():
    """The train step all-gathers each ZeRO-split parameter once, tiled or not.

    A 1M-element tile holds every leaf of the test model, so all take the
    untiled branch, whose `where(finite, new, old)` guard used to make XLA
    gather both operands (2 gathers per leaf).
    """
    layout = (2, 2, 2)
    mesh = tedjax.make_mesh(*layout)
    gathered = {}
    for tile in (0, 1 << 20):
        trainer = Trainer(train_config(layout, tile), mesh)
        colls = analysis.collectives(trainer.lower_train_step().compile(), mesh)
        gathered[tile] = sorted(c.shape.split("{")[0] for c in colls
                                if c.kind == "all-gather" and not c.trivial and c.shape.startswith("f32"))
    split = [a for a, s, z in zip(jax.tree.leaves(trainer.abstract_params), jax.tree.leaves(trainer.param_shardings),
                                  jax.tree.leaves(trainer.zero1_shardings)) if s.spec != z.spec]
    assert len(split) > 10
    assert gathered[1 << 20] == gathered[0]
    assert len(gathered[0]) == len(split)


@pytest.mark.parametrize("finite", [True, False])
def test_tiled_update_matches_optax(finite):
    """100-element tiles (with a partial last tile) against optax; a non-finite step leaves the state as it was."""
    layout = (2, 2, 2)
    tiled, trainer = isolated_update(layout, 8, 100)
    plain, _ = isolated_update(layout, 8, 0)
    state = trainer.init_state()
    rng = np.random.default_rng(1)
    grads = jax.device_put(jax.tree.map(lambda p: rng.standard_normal(p.shape).astype(np.float32), state.params),
                           trainer.zero1_shardings)

    def run(update, ok):  # fresh copies: the update donates its state and parameters
        params = jax.device_put(jax.tree.map(jnp.copy, state.params), trainer.zero1_shardings)
        return jax.tree.map(np.asarray, update(grads, jax.tree.map(jnp.copy, state.opt_state), params, jnp.asarray(ok)))

    old = jax.tree.map(np.asarray, (state.opt_state, state.params))
    got = run(tiled, finite)
    if finite:
        assert max_abs_diff(got, run(plain, True)) < 1e-6
        assert max_abs_diff(got, old) > 1e-4
    else:  # every value, the counts included, as it was
        assert max_abs_diff(got, old) == 0.0


def test_tiled_update_temp_memory_stays_within_a_tile():
    """Temp bytes of the optimizer update, E = 4 and 16 experts, state and parameters donated.

    Tiled: flat in E and below one tile of the four operands (the update runs
    in place, tile by tile). Untiled: XLA fuses the whole elementwise AdamW into
    in-place loops, so on XLA:CPU it has no E-proportional temporary either
    (benchmarks/tiled_optimizer.py shows the first, pad + lax.map, tiling did).
    """
    layout, tile = (2, 2, 2), 256  # expert weights' local shards: 2 tiles at E = 4, 8 at E = 16
    temp = {(e, t): analysis.memory_report(isolated_update(layout, e, t)[0])["temp_bytes"]
            for e in (4, 16) for t in (0, tile)}
    args = {e: analysis.memory_report(isolated_update(layout, e, 0)[0])["argument_bytes"] for e in (4, 16)}
    assert args[16] > 3 * args[4] / 2  # the expert state really grows with E
    assert temp[(4, tile)] == temp[(16, tile)]
    assert temp[(16, tile)] < 4 * tile * 4
    assert temp[(4, 0)] == temp[(16, 0)] < 4 * tile * 4


# --------------------------------------------------------------------------- #
# gradient bucketing


def test_xla_config_flags():
    assert XlaConfig().flags() == []
    flags = XlaConfig(all_reduce_combine_bytes=1 << 20, all_gather_combine_bytes=4096, combine_count=8,
                      cpu_all_reduce_combiner=False).flags()
    assert flags == [
        "--xla_gpu_all_reduce_combine_threshold_bytes=1048576",
        "--xla_gpu_all_gather_combine_threshold_bytes=4096",
        "--xla_gpu_collective_combine_threshold_count=8",
        "--xla_disable_hlo_passes=cpu-all-reduce-combiner",
    ]
    with pytest.raises(ValueError, match="xla.all_reduce_combine_bytes"):
        XlaConfig(all_reduce_combine_bytes=-1)
    with pytest.raises(ValueError, match="xla.cpu_all_reduce_combiner"):
        XlaConfig(cpu_all_reduce_combiner="no")


# --------------------------------------------------------------------------- #
# benchmarks, quick mode


def run_quick(script: str, out: Path) -> dict:
    env = dict(os.environ)
    env.pop("XLA_FLAGS", None)  # the script sets its own, before importing jax
    proc = train_fork.run_script(REPO / "benchmarks" / script, ["--quick", "--out", str(out)], env=env, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads((out / script.replace(".py", ".json")).read_text())


@pytest.mark.slow
def test_ted_layouts_quick(tmp_path):
    result = run_quick("ted_layouts.py", tmp_path)
    assert (tmp_path / "ted_layouts.md").read_text().startswith("# TED layouts")
    assert result["settings"]["quick"] is True
    rows = {(tuple(r["layout"]), r["switch"]): r for r in result["rows"]}
    for (layout, switch), r in rows.items():
        assert r["step_ratio"] > 0 and r["step_s"] > 0
        for kind in ("all-to-all", "all-reduce tensor", "all-reduce dp", "all-gather", "reduce-scatter"):
            assert r["sent_bytes"][kind] >= 0 and r["predicted_bytes"][kind] >= 0
        assert r["sent_bytes"]["all-to-all"] == pytest.approx(r["predicted_bytes"]["all-to-all"])
    a2a = {switch: r["sent_bytes"]["all-to-all"] for (lay, switch), r in rows.items() if lay == (2, 2, 2)}
    assert a2a["baseline"] > 0
    assert a2a["dtd"] * 2 == a2a["baseline"] == a2a["cac"]
    assert a2a["full"] == 1.5 * a2a["cac"]
    buckets = {b["setting"]: b for b in result["bucketing"]}
    assert buckets["combiner off"]["all_reduce_count"] > buckets["default"]["all_reduce_count"]
    assert buckets["combiner off"]["all_reduce_bytes"] == buckets["default"]["all_reduce_bytes"]


@pytest.mark.slow
def test_tiled_optimizer_quick(tmp_path):
    result = run_quick("tiled_optimizer.py", tmp_path)
    assert result["settings"]["quick"] is True
    isolated = [r for r in result["rows"] if r["program"] == "update"]
    tiled = {r["num_experts"]: r["temp_bytes"] for r in isolated if r["variant"] == "tiled"}
    assert len(tiled) >= 2 and len(set(tiled.values())) == 1
    steps = {(r["variant"], r["num_experts"]): r for r in result["rows"] if r["program"] == "train_step"}
    for (variant, experts), r in steps.items():  # tiled or not, each split parameter is gathered once
        assert r["all_gathers"] == steps[("untiled", experts)]["all_gathers"] >= r["split_params"] > 0
