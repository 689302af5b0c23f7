"""Every load-balance decision is a record in metrics.jsonl and a line in the log, with its reasons; the shadow
cost model's rates come from an explicit value, a cluster preset or a measurement; a switch that cannot act is
refused before compiling or named at start."""

import contextlib
import functools
import io
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_load_balance import TINY_RUN

import tedjax
from tedjax import analysis, balance, routing
from tedjax.config import check_mesh, load_config
from tedjax.loop import run
from tedjax.trainer import Trainer

# Step ~80 of the main job (configs/tiny.yaml, no shadows): each MoE layer's expert load, from its metrics.jsonl.
MAIN_JOB_LOAD = np.array([
    [0.1777, 0.1445, 0.1582, 0.1079, 0.0984, 0.1499, 0.1089, 0.0544],
    [0.0879, 0.1023, 0.3049, 0.1104, 0.1028, 0.0825, 0.0967, 0.1125],
])  # fmt: skip


@pytest.fixture(scope="module")
def decided(tmp_path_factory):
    """A 5-step run deciding shadows and placement every 2 steps (at steps 2 and 4), with its printed lines.
    The rates make compute dominate, so that shadows pay."""
    log_dir = tmp_path_factory.mktemp("decisions")
    config = load_config(None, [*TINY_RUN, "model.shadow_experts=1", "balance.shadow_every=2", "balance.every=2",
                                "balance.margin=0", "balance.matmul_tflops=0.001", "balance.link_gbytes_per_s=100",
                                "model.capacity_factor=1.0", "model.min_capacity=1",  # pools drop: shadows save
                                "model.aux_loss_weight=0", "steps=5", "log.every=1", "log.eval_every=0",
                                "log.eval_batches=1",
                                "checkpoint.every=0", f"log.dir={log_dir}"])  # fmt: skip
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        result = run(config)
    records = [json.loads(line) for line in (log_dir / "metrics.jsonl").read_text().splitlines()]
    return result, records, out.getvalue(), log_dir / "metrics.jsonl"


def running_mean(values: list, decay: float) -> np.ndarray:
    """MoE.update_balance's running mean: the plain mean of the first steps, then exponential."""
    mean = np.zeros(len(values[0]))
    for steps, value in enumerate(values, start=1):
        mean += max(1 - decay, 1 / steps) * (np.asarray(value) - mean)
    return mean


def test_every_decision_is_a_record_with_its_reasons(decided):
    result, records, _, path = decided
    decisions = analysis.balance_decisions(path)
    shadows, placement = decisions["shadows"], decisions["placement"]
    assert [r["step"] for r in shadows] == [2, 4] == [r["step"] for r in placement]
    for r in shadows:
        assert r["layers"] == [0] and len(r["shadow_ids"][0]) == 1
        chosen = [e for e in r["shadow_ids"][0] if e < 8]
        assert r["num_shadows"] == [len(chosen)] and r["chosen"] == f"L0: {chosen if chosen else 'none'}"
        without, with_, one_more = (r[k][0] for k in ("predicted_latency_s", "predicted_latency_with_shadows_s",
                                                      "predicted_latency_one_more_s"))
        assert without > 0 and with_ > 0 and one_more > 0  # the latency model's view, given with every decision
        # static capacity: chosen by the drops they save, from the running mean of each step's shadow_gain
        saved, copy_s, keep_s = (r[k][0] for k in ("predicted_saved_fraction", "predicted_copy_s", "predicted_keep_s"))
        assert r["policy"] == "drops" and bool(chosen) == (saved > 0 and keep_s > copy_s)
        gains = [t["shadow_gain"][0] for t in records if t["kind"] == "train" and t["step"] <= r["step"]]
        gain_mean = running_mean(gains, decay=1 - 2 / 3)  # balance.gain_decay with balance.shadow_every=2
        best = [int(np.argmax(gain_mean))]
        assert saved == pytest.approx(float(np.sum(gain_mean[chosen or best])), rel=1e-5)
        assert (r["matmul_tflops"], r["link_gbytes_per_s"]) == (0.001, 100.0)
        assert r["rates_source"] == "matmul: balance.matmul_tflops; link: balance.link_gbytes_per_s"
    assert any(r["num_shadows"][0] for r in shadows), "compute-bound rates and drops: a shadow must be chosen"
    for r in placement:
        old, new, adopted = r["old_max_device_load"][0], r["new_max_device_load"][0], r["adopted"][0]
        gain, move_s, window = r["predicted_gain_s_per_step"][0], r["move_s"], r["window_steps"]
        assert move_s == sum(r["bytes_sent_per_device"].values()) / 100e9 and window == 2
        assert adopted == (new < old and gain * window > move_s)  # balance.margin=0, and the hysteresis
        assert (r["experts_moved"][0] > 0) == adopted
        # what the move sent per device, from the compiled one-layer move (every expert leaf and its Adam moments)
        layer_bytes = sum(r["bytes_sent_per_device"].values())
        assert layer_bytes == sum(result.trainer.move_bytes().values()) > 0
        assert r["move_bytes_per_device"] == layer_bytes * sum(r["adopted"])


def test_train_records_and_lines_show_the_shadows_each_step_used(decided):
    result, records, printed, _ = decided
    decided_ids = {r["step"]: r["shadow_ids"] for r in records if r["kind"] == "shadows"}
    used = {r["step"]: r["shadow_ids"] for r in records if r["kind"] == "train"}
    assert used[1] == used[2] == [[8]]  # no shadow before the first decision
    assert used[3] == used[4] == decided_ids[2] and used[5] == decided_ids[4]
    np.testing.assert_array_equal(result.trainer.shadow_ids(result.state), decided_ids[4])
    lines = printed.splitlines()
    step3 = next(line for line in lines if line.startswith("step 3/5 |"))
    chosen = [e for e in decided_ids[2][0] if e < 8]
    assert f"shadows L0 {','.join(map(str, chosen)) or 'none'}" in step3
    assert any(line.startswith("step 2 shadows: L0 ") for line in lines)
    assert any(line.startswith("step 4 placement: L0 max device load ") and "MiB per device" in line for line in lines)
    banner = next(line for line in lines if line.startswith("  shadows"))
    assert "matmul 0.001 TFLOP/s, link 100 GB/s per device" in banner


def test_decisions_plot_over_steps(decided, tmp_path):
    import matplotlib  # noqa: F401  (a test dependency: the plot is part of what is checked)
    fig = analysis.plot_balance_decisions(decided[3], tmp_path / "decisions.png")
    assert (tmp_path / "decisions.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [ax.get_title().split()[0] for ax in fig.axes] == ["shadows", "placement"]


# ----------------------------------------------------------------------------- rates


@pytest.fixture(scope="module")
def main_job_trainer():
    config = load_config("configs/tiny.yaml", ["model.shadow_experts=2", "model.dtype=bfloat16",
                                               "balance.cluster=configs/clusters/dgx_h100.yaml"])
    return Trainer(config, tedjax.make_mesh(2, 2, 2))


def test_dgx_h100_rates_on_the_main_job_say_why(main_job_trainer):
    """At a DGX-H100's rates, layer 0 (hottest expert 0.178, next 0.158) gains less from a shadow than its copy
    costs: "none chosen", with both predicted times. Layer 1's expert at 0.305 pads every expert's buffer to
    2.8x the mean, which costs more than copying its 131 KB: shadowed."""
    rates = main_job_trainer.balance_rates()
    assert (rates.matmul_tflops, rates.link_gbytes_per_s) == (989.0, 450.0)  # bf16 peak, NVLink: 2 GPUs, 1 node
    assert rates.source.startswith("cluster DGX-H100 from configs/clusters/dgx_h100.yaml")
    cost = main_job_trainer.shadow_cost_model()
    assert cost.buffers == "expert"
    first, second = (balance.decide_shadows(layer, load, np.arange(8), 2, cost, np.full(2, 8))
                     for layer, load in enumerate(MAIN_JOB_LOAD))
    assert first.chosen == () and first.with_shadows_s == first.latency_s < first.one_more_s
    line = balance.describe_shadows(80, [first, second])
    assert line.startswith(f"step 80 shadows: L0 none chosen: predicted {first.latency_s * 1e3:.3g} ms without, "
                           f"{first.one_more_s * 1e3:.3g} ms with the best one; L1 [2] (new): predicted ")
    assert second.chosen == (2,) and second.with_shadows_s < second.latency_s


# Step ~80 of the main job (no shadows): the fraction of all choices a shadow of each expert would keep from drops
# (routing's shadow_gain over the training batches of steps 70-89, with step 80's parameters; 12.1% / 8.9% dropped).
MAIN_JOB_GAIN = np.array([
    [0.0106, 0.0061, 0.0222, 0.0044, 0.0223, 0.0346, 0.0090, 0.0062],
    [0.0120, 0.0034, 0.0219, 0.0018, 0.0074, 0.0097, 0.0126, 0.0164],
])  # fmt: skip


def test_dgx_h100_rates_choose_no_shadow_for_the_drops_of_the_main_job(main_job_trainer):
    """Under static capacity a shadow is chosen for the drops it saves, only where its copy costs less than keeping
    the same choices through its pool. At a DGX-H100's rates copying one expert (0.58 us) costs 6x what keeping
    layer 0's best 3.5% of choices does: "none chosen", with both predicted times."""
    cost = main_job_trainer.shadow_cost_model()
    first, second = (balance.decide_shadows(layer, load, np.arange(8), 2, cost, np.full(2, 8), gain)
                     for layer, (load, gain) in enumerate(zip(MAIN_JOB_LOAD, MAIN_JOB_GAIN)))
    assert first.chosen == second.chosen == ()
    assert first.saved == pytest.approx(0.0346) and first.copy_s > first.keep_s > 0
    assert first.copy_s == pytest.approx(4 * 2 * 128 * 256 * 2 / 450e9 / 2)  # 4 model (X-1)/X, bf16, 2 devices
    line = balance.describe_shadows(80, [first, second])
    assert line.startswith(f"step 80 shadows: L0 none chosen: the best would keep 3.46% of choices from drops, but "
                           f"its copy costs {first.copy_s * 1e3:.3g} ms (predicted), more than the "
                           f"{first.keep_s * 1e3:.3g} ms of keeping them by the pools; L1 none chosen: ")


def test_cpu_rates_choose_the_shadows_that_save_the_most_drops():
    """At CPU rates a shadow pays once it keeps 2.2% of the choices: layer 0's experts 5 and 4 (the most, not the
    hottest by mean load: expert 0 is the hottest of MAIN_JOB_LOAD), and none of layer 1's, whose best keeps 2.19%."""
    cost = balance.ShadowCostModel(d_model=128, expert_d_ff=256, weight_matrices=2, bytes_per_element=4, num_devices=2,
                                   tokens_per_step=2048, flop_rate=0.008e12, link_bytes_per_s=0.43e9, buffers="expert")
    threshold = cost.copy_s() / cost.keep_s(1.0)
    assert threshold == pytest.approx(0.0221, abs=1e-4)
    first, second = (balance.decide_shadows(layer, load, np.arange(8), 2, cost, np.full(2, 8), gain)
                     for layer, (load, gain) in enumerate(zip(MAIN_JOB_LOAD, MAIN_JOB_GAIN)))
    assert first.chosen == (4, 5) and first.ids.tolist() == [4, 5] and first.changed
    assert first.saved == pytest.approx(0.0346 + 0.0223) and first.keep_s > first.copy_s == 2 * cost.copy_s()
    assert second.chosen == () and second.ids.tolist() == [8, 8] and not second.changed
    assert balance.describe_shadows(80, [first]) == (
        f"step 80 shadows: L0 [4, 5] (new): keep 5.69% of choices from drops; predicted {first.copy_s * 1e3:.3g} ms "
        f"of copies, {first.keep_s * 1e3:.3g} ms to keep them by the pools")
    # one slot: the best alone; no drop to save: none, whatever the rates
    assert balance.choose_shadows_for_drops(MAIN_JOB_GAIN[0], 1, cost).tolist() == [5]
    assert balance.choose_shadows_for_drops(np.zeros(8), 2, cost).tolist() == [8, 8]


def _loop_dropped(expert_gsk, pool_e, pool_cap, shadow, shadow_cap) -> int:
    """Dropped choices, counted choice by choice in priority order (k major, token minor) in Python loops, with
    expert `shadow` (or None) in a shadow buffer of `shadow_cap` slots per group."""
    dropped = 0
    for group in expert_gsk:
        used = {}
        for k in range(group.shape[1]):
            for token in range(group.shape[0]):
                e = int(group[token, k])
                bucket, cap = ("shadow", shadow_cap) if e == shadow else (int(pool_e[e]), pool_cap)
                used[bucket] = used.get(bucket, 0) + 1
                dropped += used[bucket] > cap
    return dropped


@pytest.mark.parametrize("top_k,experts_per_pool", [(1, 1), (2, 4)])
def test_shadow_gain_is_the_drops_each_shadow_saves(top_k, experts_per_pool):
    """routing's shadow_gain against a loop reference: for each expert, the drops without shadows minus the drops
    with that expert alone shadowed, whatever the current shadow set (here expert 3), per-expert capacity and
    device pools with a placement (top-2)."""
    from tedjax import routing

    rng = np.random.default_rng(top_k * 10 + experts_per_pool)
    logits = jnp.asarray(rng.normal(size=(5, 32, 8)) * 2.0, jnp.float32)
    placement = np.array([3, 0, 5, 1, 7, 2, 6, 4])
    shadow_cap = 2 * routing.capacity(32, 8, top_k, 1.0, 1)  # as MoE sizes it: X = 2 devices' worth of one expert
    route = jax.jit(functools.partial(routing.route, top_k=top_k, capacity_factor=1.0, min_capacity=1,
                                      experts_per_pool=experts_per_pool, shadow_capacity=shadow_cap))  # one compile
    r = route(logits, placement=jnp.asarray(placement), shadow_ids=jnp.asarray([3, 8], jnp.int32))
    expert_gsk, pool_e = np.asarray(r.expert_index), placement // experts_per_pool
    base = _loop_dropped(expert_gsk, pool_e, r.capacity, None, shadow_cap)
    want = [(base - _loop_dropped(expert_gsk, pool_e, r.capacity, e, shadow_cap)) / expert_gsk.size for e in range(8)]
    np.testing.assert_allclose(np.asarray(r.shadow_gain), want, rtol=1e-6, atol=1e-7)
    assert base > 0 and max(want) > 0


def test_explicit_rates_override_the_cluster(main_job_trainer):
    config = load_config("configs/tiny.yaml", ["model.shadow_experts=2", "balance.cluster=configs/clusters/dgx_h100.yaml",
                                               "balance.matmul_tflops=0.01"])  # fmt: skip
    rates = balance.resolve_rates(config, main_job_trainer.mesh)
    assert (rates.matmul_tflops, rates.link_gbytes_per_s) == (0.01, 450.0)
    assert rates.source.startswith("matmul: balance.matmul_tflops; link: cluster DGX-H100")


def test_without_a_cluster_or_rates_they_are_measured_here(main_job_trainer):
    config = load_config("configs/tiny.yaml", ["model.shadow_experts=2"])
    rates = balance.resolve_rates(config, main_job_trainer.mesh)
    assert rates.matmul_tflops > 0 and rates.link_gbytes_per_s > 0
    assert rates.source.startswith("measured at start on these 8 cpu devices")


def test_a_missing_cluster_file_is_refused_before_anything_is_written(tmp_path):
    config = load_config(None, [*TINY_RUN, "model.shadow_experts=1", "balance.cluster=configs/clusters/nope.yaml",
                                f"log.dir={tmp_path / 'run'}"])
    with pytest.raises(FileNotFoundError, match="cluster file configs/clusters/nope.yaml does not exist"):
        run(config)
    assert not (tmp_path / "run").exists()


# ----------------------------------------------------------------------------- switches that cannot act


@pytest.mark.parametrize("overrides,message", [
    (["model.num_experts=0", "model.shadow_experts=2"], "model.shadow_experts=2 balances experts, and this model is dense"),
    (["model.num_experts=0", "balance.every=10"], "balance.every=10 balances experts, and this model is dense"),
    (["model.num_experts=4", "model.top_k=4", "model.router_bias_rate=0.001"], "router_bias_rate=0.001 cannot act"),
])  # fmt: skip
def test_a_switch_that_cannot_act_on_any_mesh_is_refused(overrides, message):
    with pytest.raises(ValueError, match=message):
        load_config(None, [*TINY_RUN, *overrides])


def test_the_dense_placement_message_leads_to_a_working_command():
    with pytest.raises(ValueError) as err:
        load_config("configs/tiny_dense.yaml", ["balance.every=10"])
    suggested = str(err.value).split("(e.g. ")[1].rstrip(")").split()
    config = load_config("configs/tiny_dense.yaml", ["balance.every=10", *suggested])
    check_mesh(config.model, tedjax.make_mesh(2, 2, 2), config.data.micro_batch_size, config.data.seq_len)


def test_a_switch_that_cannot_act_on_this_mesh_is_named_at_start():
    config = load_config(None, [*TINY_RUN, "model.shadow_experts=1", "balance.every=10"])
    warnings = balance.cannot_act(config, expert_devices=1)
    assert len(warnings) == 2
    assert warnings[0].startswith("model.shadow_experts=1 cannot act: one device on \"expert\"")
    assert warnings[1].startswith("balance.every=10 cannot act: with one device on \"expert\"")
    assert balance.cannot_act(config, expert_devices=2) == []
    unused = load_config(None, [*TINY_RUN, "balance.matmul_tflops=1.0"])
    assert "they are not used" in balance.cannot_act(unused, expert_devices=2)[0]


def test_a_group_size_that_does_not_split_over_the_batch_devices_is_refused_before_compiling():
    # 16 x 16 tokens in groups of 128: 2 groups, which data x expert = 4 devices cannot share
    config = load_config(None, [*TINY_RUN, "model.group_size=128"])
    with pytest.raises(ValueError, match="group_size=128 makes 2 routing groups per micro-batch, which do not split "
                                         "over data x expert = 4 devices; use a group_size dividing the 64 tokens"):
        Trainer(config, tedjax.make_mesh(2, 2, 2))


def test_only_the_layers_that_adopt_a_placement_move():
    """Two MoE layers; layer 0 adopts a new placement, layer 1 keeps its own: only layer 0's experts (weights and
    Adam moments) move, and the one-layer move sends at most half the bytes of moving both (with scanned layers
    ZeRO-1 may split the moments over their "layers" axis, and XLA then moves both layers' slices with all-reduces
    of their own)."""
    from test_load_balance import _at, batches, run_steps, tiny_trainer

    trainer = tiny_trainer("model.n_layers=4", "balance.every=1", "balance.margin=0", "balance.matmul_tflops=0.001",
                           "balance.link_gbytes_per_s=100",  # moving pays
                           "model.capacity_factor=1.0", "model.min_capacity=1")  # static pools that can drop
    state, _ = run_steps(trainer, trainer.init_state(), batches(trainer, 1))
    load = np.array([0.4, 0.3, 0.1, 0.05, 0.05, 0.04, 0.03, 0.03])
    leaf = _at(state.model_state, trainer.moe_path)["load_mean"]  # layer 0 skewed (adopts), 1 uniform (keeps)
    _at(state.model_state, trainer.moe_path)["load_mean"] = jax.device_put(
        np.stack([load] + [np.full(8, 1 / 8)] * (trainer.n_moe - 1)), leaf.sharding).astype(leaf.dtype)
    before = jax.tree.map(np.asarray, (state.params, state.opt_state))
    state, done = trainer.rebalance(state, 1)
    assert [d.adopted for d in done["placement"]] == [True, False]
    after = jax.tree.map(np.asarray, (state.params, state.opt_state))
    new_placement, path = trainer.placements(state), trainer.moe_path
    np.testing.assert_array_equal(new_placement[1], np.arange(8))
    flat_before = dict(jax.tree_util.tree_flatten_with_path(before)[0])
    for key, leaf in jax.tree_util.tree_flatten_with_path(after)[0]:
        name = jax.tree_util.keystr(key)
        old = flat_before[key]
        if "".join(f"[{k!r}]" for k in path) + "['w_" in name:  # the expert weights and moments [n_moe, E, ...]
            np.testing.assert_array_equal(leaf[0][new_placement[0]], old[0])  # slot placement[e] holds expert e
            np.testing.assert_array_equal(leaf[1:], old[1:])  # the other layers kept theirs
        else:
            np.testing.assert_array_equal(leaf, old)
    one = sum(trainer.move_bytes().values())
    with jax.set_mesh(trainer.mesh):
        both = trainer.move_experts.lower(state, trainer.check_placements(new_placement)).compile()
    assert done["move_bytes"] == one and 0 < 2 * one <= sum(c.sent_bytes * (c.trip_count or 1)
                                                            for c in analysis.collectives(both, trainer.mesh))


def test_a_placement_that_does_not_pay_back_its_move_within_the_window_is_kept():
    load = np.array([[0.30, 0.20, 0.15, 0.10, 0.10, 0.05, 0.05, 0.05]])
    cost = balance.ShadowCostModel(d_model=128, expert_d_ff=256, weight_matrices=2, bytes_per_element=4, num_devices=4,
                                   tokens_per_step=2048, flop_rate=1e10, link_bytes_per_s=1e9, buffers="device")
    (free,) = balance.decide_placements(load, np.arange(8)[None], 4, 0.02)
    (priced,) = balance.decide_placements(load, np.arange(8)[None], 4, 0.02, cost, window=10, move_s=0.0)
    assert free.adopted and priced.adopted and priced.gain_s > 0
    gain = priced.gain_s
    (short,) = balance.decide_placements(load, np.arange(8)[None], 4, 0.02, cost, window=10, move_s=11 * gain)
    (long,) = balance.decide_placements(load, np.arange(8)[None], 4, 0.02, cost, window=12, move_s=11 * gain)
    assert not short.adopted and long.adopted
    line = balance.describe_placement(10, [short], 0.02, 2**20, 10, 11 * gain)
    assert "kept (saves" in line and "x 10 steps < a move's" in line


def test_pool_drops_model_matches_sampled_groups():
    """`PoolDrops.dropped`: the expected overflow of Binomial(S k, device share) counts over each device's pool,
    against sampled routing groups."""
    load, placement = np.array([0.3, 0.25, 0.25, 0.2]), np.array([0, 1, 2, 3])  # devices: 0.55 / 0.45
    pools = balance.PoolDrops(choices_per_group=64, pool_rows=36)
    counts = np.random.default_rng(0).binomial(64, [[0.55, 0.45]], size=(200_000, 2))
    sampled = np.mean(np.maximum(counts - 36, 0).sum(axis=1)) / 64
    assert abs(pools.dropped(load, placement, 2) - sampled) < 0.02 * sampled
    assert pools.dropped(load, np.array([0, 2, 3, 1]), 2) < 0.6 * sampled  # 0.5 / 0.5: about half the drops


def test_static_pools_move_only_for_drops_saved_on_the_earlier_loads_too():
    """Under static pools a placement's gain is the drops it saves, priced at the step time; the greedy fitted to
    the recent loads must also gain on the previous decision's loads, or the layer keeps its placement."""
    pools = balance.PoolDrops(choices_per_group=64, pool_rows=36)
    now, earlier = np.array([[0.3, 0.25, 0.25, 0.2]]), np.array([[0.2, 0.3, 0.25, 0.25]])
    kw = dict(window=10, pools=pools, step_s=1.0)
    (fresh,) = balance.decide_placements(now, np.arange(4)[None], 2, 0.02, move_s=0.01, **kw)
    assert fresh.adopted and fresh.gain_s == pytest.approx(pools.dropped(now[0], np.arange(4), 2)
                                                          - pools.dropped(now[0], fresh.placement, 2))
    (priced,) = balance.decide_placements(now, np.arange(4)[None], 2, 0.02, move_s=11 * fresh.gain_s, **kw)
    (noisy,) = balance.decide_placements(now, np.arange(4)[None], 2, 0.02, move_s=0.01, earlier_load_ne=earlier, **kw)
    assert not priced.adopted and not noisy.adopted and noisy.gain_s < 0


def test_the_placement_bound_counts_the_drops_routing_makes(monkeypatch):
    """benchmarks/load_balance_bound.py's exact drops of a placement (pool keeps min(n, P), shadow buffers
    min(n_e, C_shadow)) against `routing.route` on the same choices, and its 35 splits of 8 experts over 2."""
    import importlib
    from pathlib import Path

    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1] / "benchmarks"))
    bound = importlib.import_module("load_balance_bound")
    splits = bound.placements(8, 2)
    assert len(splits) == len(set(splits)) == 35 and all(sum(d) == 4 for d in splits)
    rng = np.random.default_rng(0)
    logits = jnp.asarray(rng.normal(size=(6, 32, 8)) + np.linspace(1.0, -1.0, 8), jnp.float32)
    index = np.asarray(jax.numpy.argmax(logits, -1))
    counts = np.stack([np.bincount(g, minlength=8) for g in index])[None]  # [1 step, G, E]
    for device_e, shadows in ((splits[0], ()), (splits[17], (0,)), (splits[34], (1, 5))):
        placement = np.argsort(np.argsort(np.asarray(device_e), kind="stable"), kind="stable")  # slot of each expert
        routed = routing.route(logits, top_k=1, capacity_factor=1.0, min_capacity=1, placement=jnp.asarray(placement),
                               experts_per_pool=4, shadow_ids=jnp.asarray(shadows, jnp.int32) if shadows else None,
                               shadow_capacity=6)
        want = int(np.sum(~np.asarray(routed.kept)))
        assert bound.dropped(counts, device_e, 4 * 4, shadows, 6).sum() == want > 0
