"""The planner's pipeline stages (issue 22 item 4) and topology cost model (issue 24 item 4): formulas against
hand computations and the schedule itself, the four-axis search on the 46B preset, what it reports. No compiles
but one small program whose permutes the comparison function reads."""

import dataclasses
import math
from pathlib import Path

import jax
import pytest

from tedjax import plan
from tedjax.balance import REMOTE_FRACTION_FLOOR, TopologyCostModel
from tedjax.config import load_config

REPO = Path(__file__).resolve().parents[1]
H100 = str(REPO / "configs" / "clusters" / "dgx_h100.yaml")
MIXTRAL = str(REPO / "configs" / "mixtral_50b.yaml")
TINY = ["data.source=synthetic"]


def staged(overrides=(), stage=2, microbatches=4, schedule="gpipe", repeats=1, layout=(2, 2, 1)):
    d, e, t = layout
    return load_config("configs/tiny.yaml", [*TINY, f"mesh.data={d}", f"mesh.expert={e}", f"mesh.tensor={t}",
                                             f"mesh.stage={stage}", f"pipeline.microbatches={microbatches}",
                                             f"pipeline.schedule={schedule}", f"pipeline.repeats={repeats}",
                                             *overrides])


# --------------------------------------------------------------------------- bubble, permutes, stage memory


def walked_bubble(stages: int, microbatches: int, repeats: int) -> float:
    """The idle stage-iterations of the schedule, walked: stage s works at iteration i on the (i - s)-th of
    the R M microbatch passes, when there is one."""
    passes, busy, idle, i = repeats * microbatches, 0, 0, 0
    while busy < passes * stages:
        for s in range(stages):
            busy, idle = (busy + 1, idle) if 0 <= i - s < passes else (busy, idle + 1)
        i += 1
    return idle / (busy + idle)


@pytest.mark.parametrize("stages", [2, 4])
@pytest.mark.parametrize("microbatches", [4, 8, 16])
def test_bubble_equals_the_schedule_walked(stages, microbatches):
    gpipe, circular = (plan.Pipeline(stages, microbatches, r) for r in (1, 2))
    assert gpipe.bubble == pytest.approx(walked_bubble(stages, microbatches, 1), abs=1e-12)
    assert circular.bubble == pytest.approx(walked_bubble(stages, microbatches, 2), abs=1e-12)
    assert gpipe.bubble == (stages - 1) / (microbatches + stages - 1) and circular.bubble < gpipe.bubble
    assert gpipe.overhead == pytest.approx(gpipe.bubble / (1 - gpipe.bubble))  # idle over busy


def test_p2p_bytes_and_count_by_hand():
    """tiny: batch 32 x 128 tokens, d_model 128. Stage 2 of (2, 2, 1), 4 microbatches, 2 micro-batches:
    each permute carries [32 / (2 x 4 x 2 x 2), 128, 128] (1 row), float32 on XLA:CPU, bf16 on GPUs; GPipe
    runs M + S - 1 = 5 iterations, each permuting once, and hands the last microbatch back after the loop:
    6 permutes forward and 6 backward per micro-batch."""
    config = staged(["data.grad_accum=2"])
    assert plan.p2p_bytes(config, backend="cpu") == 1 * 128 * 128 * 4
    assert plan.p2p_bytes(staged(["model.dtype=bfloat16"]), backend="gpu") == 2 * 128 * 128 * 2  # 2 rows
    assert plan.p2p_count(config) == 2 * 6 * 2
    circular = staged(["data.grad_accum=2", "model.n_layers=8"], schedule="circular", repeats=2)
    assert plan.p2p_count(circular) == 2 * (2 * 4 + 2) * 2
    permutes = [t for t in plan.collectives(config, backend="cpu") if t.kind == "collective-permute"]
    assert [(t.axes, t.result_bytes, t.count, t.sent_bytes) for t in permutes] == [
        (("stage",), 128 * 128 * 4, 24, 128 * 128 * 4)]
    assert plan.p2p_bytes(load_config("configs/tiny.yaml", TINY)) == 0  # no stages, no permutes


def test_a_stage_holds_its_share_of_the_layers_and_keeps_every_iterations_activations():
    """Parameters and optimizer state: the embedding and head on every stage, 1/S of the blocks' (exact).
    Activations kept: those of one microbatch through the stage, M + (S-1)/R times."""
    base = load_config("configs/tiny.yaml", [*TINY, "model.n_layers=8", "mesh.data=2", "mesh.expert=2",
                                             "mesh.tensor=1"])
    mem = {s: plan.memory(dataclasses.replace(base, mesh=dataclasses.replace(base.mesh, stage=s)) if s > 1 else base,
                          (2, 2, 1), "cpu") for s in (1, 2, 4)}
    leaves = plan.parameters(base.model)
    sizes = {"data": 2, "expert": 2, "tensor": 1}
    def total(spec_of, inside):
        return sum(plan._local(x.shape, spec_of(x), sizes) * 4 for x in leaves if (x.layer is not None) == inside)

    blocks, outside = total(lambda x: x.spec, True), total(lambda x: x.spec, False)
    adam = lambda x: plan._zero1(x, (2, 2, 1), True)  # noqa: E731 (Adam's two moments, split by ZeRO-1)
    moments, moments_outside = 2 * total(adam, True), 2 * total(adam, False)
    for s in (1, 2, 4):
        assert mem[s].params == blocks // s + outside
        assert mem[s].optimizer == moments // s + moments_outside + mem[1].optimizer - moments - moments_outside
    # k: what one microbatch keeps through the stage. GPipe keeps M + S - 1 = 5 k, circular x2 4.5 k, the
    # stage's layers run without a pipeline on one microbatch 1 k; besides, with stages the head and loss run on
    # the M microbatches at once, and the schedule keeps a buffer of the M microbatches and its cotangent
    gpipe, circular = (staged(["model.n_layers=8"], microbatches=4, schedule=s, repeats=r)
                       for s, r in (("gpipe", 1), ("circular", 2)))
    assert plan.pipeline_problems(circular) == []
    kept = {name: plan.memory(c, (2, 2, 1), "cpu").activations
            for name, c in (("gpipe", gpipe), ("circular", circular), ("one", plan.stage_view(gpipe)))}
    k = 2 * (kept["gpipe"] - kept["circular"])
    view = plan.stage_view(gpipe)
    tokens = view.data.micro_batch_size // 4 * view.data.seq_len  # one device's of a microbatch (data x expert 4)
    td, logits = tokens * view.model.d_model * 4, 2 * tokens * view.model.padded_vocab * 4
    assert k > 0 and kept["gpipe"] - kept["one"] == 4 * k + 3 * (3 * td + logits) + 2 * 4 * td


def test_step_time_adds_the_bubble_and_the_permutes_cross_nodes():
    config = staged(microbatches=8)
    cluster = plan.Cluster.load(H100)
    timing = plan.step_time(config, dataclasses.replace(cluster, gpus_per_node=4).with_devices(8), (2, 2, 1))
    assert timing.bubble_s == pytest.approx(timing.compute_s * (2 - 1) / 8)
    assert timing.links["stage"] == "inter-node"  # 4 GPUs per node: each stage is one node
    assert timing.step_s == pytest.approx(timing.compute_s + timing.bubble_s + sum(timing.comm_s.values()))
    inside = plan.step_time(config, cluster.with_devices(8), (2, 2, 1))
    assert inside.links["stage"] == "intra-node"
    assert plan._crosses_nodes((2, 2, 1), ("data",), 4, stages=2) is False
    assert plan._crosses_nodes((1, 1, 1), ("stage",), 8, stages=8) is False


@pytest.mark.parametrize("stages, fix", [
    (dict(stage=4, microbatches=4), "choose stages x repeats dividing 2"),
    (dict(stage=2, microbatches=1), "set pipeline.microbatches >= 2"),
    (dict(stage=2, microbatches=16), "that is a multiple of 64"),
])
def test_stages_that_do_not_divide_are_rejected_with_the_fix(stages, fix):
    """(A config with such stages may itself refuse to load; the plan is rejected either way.)"""
    tiny = load_config("configs/tiny.yaml", [*TINY, "mesh=auto"])
    est = plan.estimate(tiny, plan.Plan(2, 2, 1, **stages), plan.Cluster.load(H100))
    assert not est.fits and est.reason.startswith("does not divide: ") and fix in est.reason, est.reason
    assert plan.pipeline_problems(staged()) == []


def test_plan_round_trips_its_stages():
    config = staged(["model.n_layers=8"], schedule="circular", repeats=1, stage=2, microbatches=8)
    p = plan.Plan.of(config)
    assert (p.stage, p.microbatches, p.repeats) == (2, 8, 1)
    again = plan.Plan(1, 4, 2, stage=2, microbatches=8, repeats=2).apply(config)
    assert (again.mesh.stage, again.pipeline.microbatches, again.pipeline.schedule, again.pipeline.repeats) == (
        2, 8, "circular", 2)
    assert plan.Plan.of(again).describe() == "2 stages (circular x2, 8 microbatches) x (1,4,2) remat=none accum=1"
    # (the trainer keeps the circular schedule's units stage-major: no weight moves to model)
    assert plan.unmodelled(again) == ["mesh.stage=2 (the embedding's and head's collectives, and the MoE "
                                      "statistics' moves, over the stage axis)"]


# --------------------------------------------------------------------------- the comparison with a compiled program


def test_permute_comparison_reads_a_compiled_programs_permutes():
    """A stand-in for the pipeline's program (tests/test_pipeline.py checks the real one): a scan of R M + S - 1
    iterations that permutes one microbatch's [rows, L, D] over "stage" each, then the hand-off after the
    loop, differentiated. The comparison finds them all, forward and backward, with the predicted bytes."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

    config = staged(microbatches=4, layout=(2, 2, 1))
    pipe = plan.pipeline_of(config)
    mesh = Mesh(np.array(jax.devices()[:8]).reshape(2, 2, 2, 1), ("stage", "data", "expert", "tensor"))
    rows = config.data.batch_size // (pipe.microbatches * 4)
    shape = (pipe.stages, 4 * rows, config.data.seq_len, config.model.d_model)
    ring = [(s, (s + 1) % pipe.stages) for s in range(pipe.stages)]

    def body(x, _):
        return jax.lax.ppermute(jnp.sin(x), "stage", ring), None

    def loss(x):
        def run(x):
            x = jax.lax.scan(body, x, None, length=pipe.iterations)[0]
            return jax.lax.ppermute(x, "stage", ring)  # the last stage's hand-off

        step = jax.shard_map(run, mesh=mesh,
                             in_specs=P("stage", ("data", "expert")), out_specs=P("stage", ("data", "expert")))
        return jnp.sum(jnp.sin(step(x)))  # a cotangent that depends on x: nothing folds away

    x = jax.ShapeDtypeStruct(shape, jnp.float32, sharding=NamedSharding(mesh, P("stage", ("data", "expert"))))
    compiled = jax.jit(jax.grad(loss)).lower(x).compile()
    row = plan.permute_comparison(config, compiled, mesh)
    assert row["measured_bytes"] == [row["predicted_bytes"]] == [plan.p2p_bytes(config, backend="cpu")]
    assert row["measured_count"] == row["predicted_count"] == 2 * (pipe.iterations + 1) and row["exact"]


# --------------------------------------------------------------------------- the topology cost model


def test_topology_cost_model_by_hand():
    """32 devices of the expert axis, 8 per node, DGX-H100 links: flat sends 7/32 of the buffer over NVLink
    while 24/32 cross the network; hierarchical sends 7/8 over NVLink, then r x 3/4 over the network."""
    v = 64 * 2**20
    m = TopologyCostModel(32, 8, 450e9, 50e9)
    assert m.flat_s(v) == pytest.approx(v * 24 / 32 / 50e9)
    assert m.hierarchical_s(v, 0.25) == pytest.approx(v * 7 / 8 / 450e9 + 0.25 * v * 3 / 4 / 50e9)
    # static shapes: with the gate alone every pool is sized as an own-node one, P + 3 (P - P/4) = 3.25 P
    assert m.seconds(v, "flat", 0.25) == pytest.approx(m.flat_s(3.25 * v)) and m.seconds(v, "flat") == m.flat_s(v)
    assert m.hierarchical_s(v, 1.0) > m.flat_s(v) > m.hierarchical_s(v, 0.25)
    assert m.balanced_fraction() == pytest.approx((7 / 8 / 450) / (3 / 4 / 50))  # 0.130
    assert m.propose_remote_fraction() == REMOTE_FRACTION_FLOOR == 0.14
    assert m.propose_remote_fraction(floor=0.05) == pytest.approx(0.12962962962962962)
    assert TopologyCostModel(8, 8, 450e9, 50e9).propose_remote_fraction() == 1.0  # one node: nothing to redirect
    assert TopologyCostModel(16, 4, 50e9, 50e9).propose_remote_fraction() == 1.0  # no slower network
    lat = TopologyCostModel(32, 8, 450e9, 50e9, 8e-6, 3e-6, 14e-6)
    assert lat.flat_s(0) == pytest.approx(8e-6 + 31 * 14e-6)
    assert lat.hierarchical_s(0, 0.5) == pytest.approx(2 * 8e-6 + 7 * 3e-6 + 3 * 14e-6)
    with pytest.raises(ValueError, match="must divide expert_devices"):
        TopologyCostModel(12, 8, 450e9, 50e9)


def test_the_planner_prices_the_hierarchical_all_to_all_and_reports_it():
    cluster = plan.Cluster.load(H100).with_devices(32)
    base = load_config(str(REPO / "configs" / "gpu_6.7b.yaml"), ["mesh.data=1", "mesh.expert=16", "mesh.tensor=2",
                                                                  "data.grad_accum=32"])
    gated = load_config(str(REPO / "configs" / "gpu_6.7b.yaml"), ["mesh.data=1", "mesh.expert=16", "mesh.tensor=2",
                                                                   "data.grad_accum=32", "model.a2a=hierarchical",
                                                                   "model.remote_fraction=0.14"])
    flat_layer, gated_layer = plan.moe_layer_time(base, cluster), plan.moe_layer_time(gated, cluster)
    assert flat_layer.compute_s == gated_layer.compute_s and flat_layer.links["expert"] == "inter-node"
    assert flat_layer.step_s / gated_layer.step_s >= 1.3  # issue 24's target for this layer (1.51x)
    assert plan.collectives(base) == plan.collectives(gated)  # the byte table keeps the flat exchange
    est = plan.estimate(base, plan.Plan.of(base), cluster)
    line = plan.topology_line(base, est, cluster)
    assert "spans 4 nodes of 4 expert ranks" in line and "model.remote_fraction=0.14" in line
    flat_gated = dataclasses.replace(base, model=dataclasses.replace(base.model, remote_fraction=0.5))
    assert plan.unmodelled(flat_gated) == ["model.remote_fraction=0.5 with model.a2a=flat (the byte and memory "
                                          "tables' growth of its buffers across nodes; its time is modelled)"]
    # nodes of 6 GPUs split 16 expert ranks unevenly (Summit): priced whole over the network, as without the model
    assert [plan.expert_nodes((1, 16, 2), n) for n in (6, 8, 32)] == [0, 4, 16]
    six = dataclasses.replace(cluster, gpus_per_node=6).with_devices(32)
    assert plan.step_time(gated, six).links["expert"] == "inter-node"
    assert "unevenly" in plan.topology_line(base, est, six)
    assert plan.unmodelled(gated) == ["model.a2a=hierarchical (its bytes per exchange; its time is modelled)"]


# --------------------------------------------------------------------------- the four-axis search


PINNED = {"remat": "full", "dtd": False, "tile_size": 0, "zero": 2}  # the preset's switches: the axes searched


@pytest.fixture(scope="module")
def mixtral_search():
    return plan.search(load_config(MIXTRAL, ["mesh=auto"]), plan.Cluster.load(H100), 32, stages=True, fixed=PINNED)


def test_the_46b_preset_across_nodes_plans_stages_and_says_why(mixtral_search):
    config = load_config(MIXTRAL)
    assert 40e9 < config.model.param_counts()["total"] < 55e9
    best = mixtral_search.best
    assert best.plan.stage > 1 and best.timing.links["stage"] == "inter-node"
    assert best.plan == plan.Plan.of(config)  # the preset is the search's plan
    reason = plan.stage_reason(mixtral_search)
    without = next(e for e in mixtral_search.pool if e.plan.stage == 1)
    assert reason.startswith("Why stages:") and f"{without.step_s * 1e3:,.2f} ms without" in reason
    assert all(math.prod(e.plan.layout) * e.plan.stage == 32 for e in mixtral_search.pool)
    # one node's 8 GPUs hold no plan without stages (its float32 weights, gradients and Adam state: 743 GB)
    one_node = plan.search(load_config(MIXTRAL, ["mesh=auto"]), plan.Cluster.load(H100), 8, fixed=PINNED)
    assert not one_node.pool
    assert "| stage | schedule | microbatches | bubble ms |" in plan.pool_table(mixtral_search)


def test_plan_command_line_with_stages_prints_the_reason(capsys):
    assert plan.main(["--cluster", H100, "--config", "configs/tiny.yaml", "--devices", "2", "--stages",
                      "--top", "2", "data.source=synthetic"]) == 0
    out = capsys.readouterr().out
    assert "| stage | schedule | microbatches | bubble ms |" in out
    assert any(line.startswith(("Why stages:", "No stages:")) for line in out.splitlines())


def test_stages_are_searched_by_default_when_the_devices_span_nodes(capsys, monkeypatch):
    """The CLI and mesh=auto search stages across nodes, not inside one node, unless told (--[no-]stages)."""
    tiny = ["--cluster", H100, "--config", "configs/tiny.yaml", "--top", "1", "data.source=synthetic"]
    for extra, searched in ((["--devices", "16"], True), (["--devices", "8"], False),
                            (["--devices", "16", "--no-stages"], False), (["--devices", "8", "--stages"], True)):
        assert plan.main(tiny + extra) == 0
        out = capsys.readouterr().out
        assert any(line.startswith(("Why stages:", "No stages:")) for line in out.splitlines()) == searched, extra
    asked = []
    real_search = plan.search
    monkeypatch.setattr(plan, "search", lambda *a, **k: asked.append(k["stages"]) or real_search(*a, **k))
    four_per_node = dataclasses.replace(plan.Cluster.load(H100), gpus_per_node=4)
    tiny_auto = load_config("configs/tiny.yaml", ["mesh=auto", "data.source=synthetic"])
    for cluster in (four_per_node, plan.Cluster.load(H100)):
        plan.auto_config(tiny_auto, jax.devices()[:8], cluster, log=lambda _: None)
    assert asked == [True, False]


def test_plan_stages_benchmark_quick(tmp_path, monkeypatch):
    """benchmarks/plan_stages.py --quick, in this process (pure arithmetic: no jax start-up to pay again)."""
    import json

    monkeypatch.syspath_prepend(str(REPO / "benchmarks"))
    import plan_stages

    assert plan_stages.main(["--quick", "--out", str(tmp_path)]) == 0
    result = json.loads((tmp_path / "plan_stages.json").read_text())
    assert result["settings"]["quick"] is True
    assert all(r["theory"] == pytest.approx(r["schedule"]) for r in result["bubble"])
    assert result["across_nodes"][0]["stages"] > 1
    row = next(r for r in result["topology"] if r["layout"] == "(1,16,2)")
    assert row["layer_speedup"] == pytest.approx(row["layer_flat_ms"] / row["layer_gated_ms"])
