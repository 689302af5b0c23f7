"""The planner (tedjax.plan): its byte and memory model against compiled programs, the search, mesh: auto,
--dry-run, the cluster presets, and every bad input refused before anything compiles."""

import math
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from compile_flags import FAST_COMPILE_FLAGS

import tedjax
from tedjax import plan
from tedjax.config import load_config

REPO = Path(__file__).resolve().parents[1]
CLUSTERS = sorted((REPO / "configs" / "clusters").glob("*.yaml"))
GPU_PRESETS = sorted((REPO / "configs").glob("gpu_*.yaml"))
H100 = str(REPO / "configs" / "clusters" / "dgx_h100.yaml")

# The larger config of the DTD byte check: bf16, top-2, SwiGLU, routing groups shorter than a sequence,
# two micro-batches, C = 10 slots (padded to 12 by DTD on tensor = 4).
LARGER = ["model.vocab_size=512", "model.d_model=256", "model.n_heads=8", "model.d_ff=1024", "model.num_experts=16",
          "model.expert_d_ff=512", "model.top_k=2", "model.group_size=64", "model.activation=swiglu",
          "model.dtype=bfloat16", "data.batch_size=16", "data.grad_accum=2"]  # fmt: skip
SWITCHES = {"none": [], "dtd": ["model.dtd=true"], "cac": ["model.remat=cac"], "full": ["model.remat=full"]}


def _ci_sample() -> list:
    """A fixed sample of the 64 random cells benchmarks/planner.py sweeps: a greedy cover of every value of every
    switch in tedjax.plan.HELD_OUT_SWITCHES and all 7 layouts (7 cells, one per layout: the fewest compiles that
    cover them; each compile costs ~4.5 CPU-seconds)."""
    cells = plan.held_out_cells(64, seed=0)
    need = {f"{k}={str(v).lower()}" for k, vs in plan.HELD_OUT_SWITCHES.items() for v in vs}
    need |= {f"optimizer.state_dtype={v}" for v in plan.STATE_DTYPES}
    need |= {("layout", layout) for layout in plan.HELD_OUT_LAYOUTS}
    chosen = []
    while need:
        best = max(range(len(cells)), key=lambda i: (len((set(cells[i][1]) | {("layout", cells[i][0])}) & need), -i))
        chosen.append(best)
        need -= set(cells[best][1]) | {("layout", cells[best][0])}
    return [cells[i] for i in sorted(chosen)]


HELD_OUT = _ci_sample()


def cell_config(name, layout, switch):
    sizes = [f"mesh.{axis}={n}" for axis, n in zip(plan.AXES, layout)]
    extra = LARGER if name == "larger" else []
    return load_config("configs/tiny.yaml", ["data.source=synthetic", *extra, *sizes, *SWITCHES[switch]])


def test_the_held_out_sample_covers_every_switch():
    values = {f"{key}={str(v).lower()}" for key, vs in plan.HELD_OUT_SWITCHES.items() for v in vs}
    values |= {f"optimizer.state_dtype={v}" for v in plan.STATE_DTYPES}
    assert values <= {o for _, overrides in HELD_OUT for o in overrides}
    assert {layout for layout, _ in HELD_OUT} == set(plan.HELD_OUT_LAYOUTS)
    assert len(HELD_OUT) == len(plan.HELD_OUT_LAYOUTS) and _ci_sample() == HELD_OUT  # deterministic


@pytest.fixture(scope="module")
def compiled_cells():
    """plan.measure of each held-out cell's compiled train step (one compile per cell, shared by the tests)."""
    out = {}
    for layout, overrides in HELD_OUT:
        config = load_config("configs/tiny.yaml", list(overrides))
        out[(layout, overrides)] = (config, plan.measure(config, tedjax.make_mesh(*layout)))
    return out


def _cell_id(cell):
    layout, overrides = cell
    short = [o.split(".")[1] for o in overrides if not o.startswith(("mesh.", "data.source"))
             and not o.endswith(("=false", "=0", "=1", "=none", "=expert", "=gelu", "=float32"))]
    return "x".join(map(str, layout)) + "-" + "-".join(short)


@pytest.mark.slow
@pytest.mark.parametrize("position", range(1, len(HELD_OUT) + 1), ids=lambda i: _cell_id(HELD_OUT[i - 1]))
def test_predicted_collectives_equal_the_compiled_program(compiled_cells, position):
    cell = HELD_OUT[position - 1]
    config, measured = compiled_cells[cell]
    rows = plan.comparison(config, measured, cell[0], backend="cpu")
    assert plan.unmodelled(config, "cpu") == []
    assert rows
    assert all(r["exact"] for r in rows), [r for r in rows if not r["exact"]]
    for r in rows:
        assert r["predicted_sent"] == pytest.approx(r["measured_sent"], rel=1e-12)
    # The model covers the step's traffic: what XLA partitions its own way is two small gradients.
    modelled = sum(r["measured_bytes"] for r in rows)
    chosen = sum(v["result_bytes"] for rows_ in measured.xla_choice.values() for v in rows_.values())
    assert set(measured.xla_choice) <= set(plan.XLA_CHOOSES) and chosen < 0.05 * modelled


@pytest.mark.slow
@pytest.mark.parametrize("cell", HELD_OUT, ids=_cell_id)
def test_predicted_arguments_are_exact_and_memory_within_20_percent(compiled_cells, cell):
    config, measured = compiled_cells[cell]
    predicted = plan.memory(config, cell[0], backend="cpu")
    assert predicted.arguments == measured.memory["argument_bytes"]  # parameters, Adam state, batch: exact
    assert predicted.total == pytest.approx(measured.memory_bytes, rel=0.20)


@pytest.mark.slow
def test_predicted_memory_is_within_10_percent_on_most_cells(compiled_cells):
    """The sweep's target is >= 95% of cells within 10% (benchmarks/planner.py, which reports it as PASS or
    MISS); this sample holds the model to 6 of its 7. All 7 are within 10% today, two by a small margin
    ((2,4,1) with device pools, shadows and chunks under full remat -9.2%; (1,8,1) with DTD and full remat -9.7%)."""
    errors = {_cell_id(cell): plan.memory(config, cell[0], backend="cpu").total / measured.memory_bytes - 1
              for cell, (config, measured) in compiled_cells.items()}
    assert sum(abs(e) <= 0.10 for e in errors.values()) >= 6, errors


def test_dtd_and_remat_change_the_bytes_as_ted_says():
    """All-to-all bytes: x 1/tensor with DTD (C padded to a multiple of tensor), x 1.5 with plain remat,
    x 1 with CAC."""
    base = cell_config("larger", (1, 2, 4), "none")

    def a2a(config):
        return plan.summarize(plan.collectives(config))[("all-to-all", ("expert",))]["result_bytes"]

    dtd, full, cac = (cell_config("larger", (1, 2, 4), s) for s in ("dtd", "full", "cac"))
    assert a2a(dtd) / a2a(base) == pytest.approx(math.ceil(10 / 4) / 10)  # C = 10 -> 3 slots per tensor rank
    assert a2a(full) == 1.5 * a2a(base) and a2a(cac) == a2a(base)


# --------------------------------------------------------------------------- search


@pytest.fixture(scope="module")
def h100():
    return plan.Cluster.load(H100)


@pytest.mark.parametrize("devices", [64, 256, 1024])
def test_search_scales_to_1024_gpus_and_never_picks_a_plan_that_does_not_fit(h100, devices):
    config = load_config(str(REPO / "configs" / "gpu_2.7b.yaml"), ["mesh=auto"])
    start = time.perf_counter()
    found = plan.search(config, h100, devices)
    assert time.perf_counter() - start < 60
    assert found.pool, plan.rejection_summary(found)
    assert all(e.memory.total <= found.budget_bytes and e.fits for e in found.pool)
    assert [e.step_s for e in found.pool] == sorted(e.step_s for e in found.pool)
    assert all(math.prod(e.plan.layout) == devices for e in found.pool + found.rejected)
    assert all(e.reason for e in found.rejected)  # each rejection says why
    best = found.best.plan
    assert config.model.num_experts % best.expert == 0 and config.model.n_heads % best.tensor == 0


def test_tensor_stays_inside_a_node(h100):
    """Link per mesh axis follows make_mesh's device order: tensor innermost, then expert, then data."""
    assert not plan._crosses_nodes((16, 4, 2), ("tensor",), 8)
    assert not plan._crosses_nodes((16, 4, 2), ("expert", "tensor"), 8)
    assert plan._crosses_nodes((16, 4, 2), ("data",), 8)
    assert plan._crosses_nodes((2, 8, 4), ("expert",), 8)
    config = load_config(str(REPO / "configs" / "gpu_2.7b.yaml"), ["mesh.data=16", "mesh.expert=4", "mesh.tensor=2"])
    timing = plan.step_time(config, h100.with_devices(128))
    assert timing.links["tensor"] == "intra-node" and timing.links["data"] == "inter-node"


def test_a_model_that_fits_nowhere_names_the_closest_plan_and_what_it_lacks(h100):
    config = load_config(str(REPO / "configs" / "gpu_6.7b.yaml"), ["mesh=auto"])
    found = plan.search(config, h100, 8)
    assert not found.pool
    with pytest.raises(plan.NoPlanFits, match=r"no plan fits .* Closest: \(\d+,\d+,\d+\) .* GiB more than"):
        _ = found.best


def test_no_plan_stores_less_than_the_parameter_bound_allows(h100):
    """Whatever the layout and ZeRO level, the devices together hold each parameter's weight, gradient and Adam
    moments (`plan.state_bytes_per_parameter`), so no plan fits more than `plan.parameter_bound` parameters."""
    config = load_config(str(REPO / "configs" / "gpu_2.7b.yaml"), ["mesh=auto", "model.num_experts=24"])  # 21.8B
    total = config.model.param_counts()["total"]
    found = plan.search(config, h100, 8)
    assert plan.state_bytes_per_parameter(config) == 16
    for est in found.pool + found.rejected:
        if est.memory is not None:
            state = est.memory.params + est.memory.optimizer + est.memory.gradients
            assert state * 8 >= total * plan.state_bytes_per_parameter(config), est.plan.describe()
    assert found.pool and plan.parameter_bound(config, h100, 8) < 2 * total  # it fits; no level could fit 2x
    bf16 = load_config(str(REPO / "configs" / "gpu_2.7b.yaml"), ["optimizer.state_dtype=bfloat16"])
    assert plan.state_bytes_per_parameter(bf16) == 12
    assert plan.parameter_bound(bf16, h100, 8) / plan.parameter_bound(config, h100, 8) == pytest.approx(16 / 12)


def test_layouts_that_do_not_divide_are_rejected_with_the_reason(h100):
    config = load_config("configs/tiny.yaml", ["mesh=auto"])
    found = plan.search(config, h100, 16)
    reasons = {e.plan.layout: e.reason for e in found.rejected}
    assert "num_experts=8 is not divisible by the expert axis (16)" in reasons[(1, 16, 1)]
    assert "n_heads=4 is not divisible by the tensor axis (16)" in reasons[(1, 1, 16)]


# --------------------------------------------------------------------------- clusters and presets


@pytest.mark.parametrize("path", CLUSTERS, ids=lambda p: p.stem)
def test_cluster_presets_load_and_cite_sources(path):
    cluster = plan.Cluster.load(str(path))
    assert cluster.devices >= cluster.gpus_per_node and cluster.memory_gib > 10
    assert "Sources:" in path.read_text()
    assert {"dgx_a100_80gb", "dgx_h100", "h200", "summit"} <= {p.stem for p in CLUSTERS}


@pytest.mark.parametrize(
    "change, message",
    [
        ({"memory_gib": None}, "missing field memory_gib"),
        ({"nodes": 0}, "cluster.nodes must be an integer >= 1"),
        ({"peak_bf16_tflops": -5}, "cluster.peak_bf16_tflops must be a number > 0"),
        ({"inter_node_gbps": 900}, "inter_node_gbps=900 exceeds intra_node_gbps"),
        ({"memory_gib": 80000}, "not a GPU's memory in GiB"),
        ({"speed": 3}, "unknown field speed"),
    ],
)
def test_bad_cluster_files_are_refused_clearly(tmp_path, change, message):
    import yaml

    values = yaml.safe_load(Path(H100).read_text())
    values.update(change)
    values = {k: v for k, v in values.items() if v is not None}
    path = tmp_path / "cluster.yaml"
    path.write_text(yaml.safe_dump(values))
    with pytest.raises(ValueError, match=message):
        plan.Cluster.load(str(path))
    path.write_text("- just\n- a list\n")
    with pytest.raises(ValueError, match="must be a mapping"):
        plan.Cluster.load(str(path))
    with pytest.raises(FileNotFoundError, match="configs/clusters"):
        plan.Cluster.load(str(tmp_path / "missing.yaml"))


@pytest.mark.parametrize("path", GPU_PRESETS, ids=lambda p: p.stem)
def test_gpu_presets_name_their_gpu_and_fit_it_with_headroom(path):
    text = path.read_text()
    config = load_config(str(path))
    assert config.model.vocab_size == 256  # the byte tokenizer's ids (data.source: tokens from `prepare`)
    cluster_file = next(c for c in CLUSTERS if c.stem in text)
    cluster = plan.Cluster.load(str(cluster_file))
    assert cluster.gpu in text and "headroom" in text
    est = plan.estimate(config, plan.Plan.of(config), cluster.with_devices(8))
    assert est.fits, est.reason
    assert est.memory.total <= cluster.memory_gib * 2**30 * (1 - plan.HEADROOM)


# --------------------------------------------------------------------------- mesh: auto and --dry-run


@pytest.mark.parametrize(
    "yaml_mesh, overrides, message",
    [
        ("{auto: true, tensor: 2}", [], r"auto cannot be combined with explicit sizes \(mesh.tensor\)"),
        ("auto", ["mesh.data=2"], r"auto cannot be combined with explicit sizes \(mesh.data\)"),
        ("{data: 2, expert: 2, tensor: 2}", ["mesh.auto=true"], "auto cannot be combined with explicit sizes"),
        ("sideways", [], "mesh must be a mapping of data, expert, tensor or the word auto"),
    ],
)
def test_mesh_auto_with_explicit_sizes_is_refused(tmp_path, yaml_mesh, overrides, message):
    path = tmp_path / "run.yaml"
    path.write_text(f"mesh: {yaml_mesh}\n")
    with pytest.raises(ValueError, match=message):
        load_config(str(path), overrides)
    assert load_config(str(path), ["mesh=auto"]).mesh.auto  # the command line may replace the whole section


def test_mesh_auto_picks_a_fitting_plan_for_the_devices_present(capsys):
    config = load_config("configs/tiny.yaml", ["mesh=auto"])
    assert config.mesh.auto
    chosen = plan.auto_config(config)
    out = capsys.readouterr().out
    assert "chosen:" in out and "runner-up:" in out and "per GPU" in out
    assert math.prod(plan.Plan.of(chosen).layout) == len(__import__("jax").devices())
    assert not chosen.mesh.auto
    tedjax.check_mesh(chosen.model, tedjax.make_mesh(chosen.mesh.data, chosen.mesh.expert, chosen.mesh.tensor),
                      chosen.data.micro_batch_size, chosen.data.seq_len)


@pytest.mark.slow
def test_dry_run_compiles_prints_and_writes_nothing(tmp_path):
    log_dir = tmp_path / "run"
    proc = subprocess.run(
        [sys.executable, "train.py", "--config", "configs/tiny.yaml", "--dry-run", "--cpu-devices", "4",
         "--cluster", str(REPO / "configs" / "clusters" / "summit.yaml"), "mesh.data=1", "mesh.expert=2",
         "mesh.tensor=2", "data.source=synthetic", f"log.dir={log_dir}"],
        check=False, cwd=REPO, capture_output=True, text=True, timeout=600,
        env={**os.environ, "XLA_FLAGS": FAST_COMPILE_FLAGS},  # --cpu-devices sets the count
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    out = proc.stdout
    assert "dry run: (1,2,2)" in out and "nothing trained or written" in out
    assert "| all-to-all | expert |" in out and "| total |" in out and "predicted on 4 x V100-SXM2-16GB (Summit)" in out
    assert "differ" not in out and "not modelled" not in out and "warning" not in out and "assumed" not in out
    assert not log_dir.exists()


def test_train_refuses_bad_cpu_devices_before_importing_jax():
    proc = subprocess.run([sys.executable, "train.py", "--dry-run", "--cpu-devices", "0"], check=False, cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "--cpu-devices must be >= 1" in proc.stderr


def test_plan_command_line(tmp_path, capsys):
    from tedjax.plan import main

    # two nodes: the stage search runs (64 GPUs cost twice the CPU for the same paths)
    assert main(["--cluster", H100, "--config", "configs/gpu_1.3b.yaml", "--devices", "16", "--top", "3"]) == 0
    assert "Why stages" in capsys.readouterr().out
    assert main(["--cluster", str(tmp_path / "nope.yaml"), "--config", "configs/tiny.yaml"]) == 2
    assert main(["--cluster", H100, "--config", "configs/gpu_6.7b.yaml", "--devices", "8"]) == 2


# --------------------------------------------------------------------------- what the planner does not model


def test_a_setting_the_planner_does_not_model_is_named(monkeypatch, capsys):
    config = load_config("configs/tiny.yaml", ["data.source=synthetic"])
    assert plan.unmodelled(config, "cpu") == [] and plan.unmodelled_line(config, "cpu") == ""
    off = load_config("configs/tiny.yaml", ["data.source=synthetic", "xla.cpu_all_reduce_combiner=false"])
    assert plan.unmodelled_line(off, "cpu") == "not modelled: xla.cpu_all_reduce_combiner=false"
    assert plan.unmodelled(off, "gpu") == []  # a CPU-only flag
    # A switch newer than the planner (in neither MODELLED nor NO_EFFECT) is named once it leaves its default.
    monkeypatch.setitem(plan.MODELLED, "model", tuple(k for k in plan.MODELLED["model"] if k != "a2a_chunks"))
    chunked = load_config("configs/tiny.yaml", ["data.source=synthetic", "model.a2a_chunks=2"])
    assert plan.unmodelled(chunked, "cpu") == ["model.a2a_chunks=2"]
    plan.auto_config(load_config("configs/tiny.yaml", ["mesh=auto", "model.a2a_chunks=2"]))
    assert "not modelled: model.a2a_chunks=2" in capsys.readouterr().out
    assert plan.main(["--cluster", H100, "--config", "configs/tiny.yaml", "model.a2a_chunks=2"]) == 0
    assert "not modelled: model.a2a_chunks=2" in capsys.readouterr().out


def test_every_config_key_is_either_modelled_or_without_effect():
    import dataclasses

    known = {(s, k) for table in (plan.MODELLED, plan.NO_EFFECT, plan.NOT_MODELLED) for s, keys in table.items()
             for k in keys}
    from tedjax.config import TrainConfig

    config = TrainConfig()
    keys = set()
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        keys |= ({(f.name, g.name) for g in dataclasses.fields(value)} if dataclasses.is_dataclass(value)
                 else {("", f.name)})
    assert keys - known == set(), ("add new config keys to plan.MODELLED (and model them), plan.NO_EFFECT or "
                                   "plan.NOT_MODELLED")
    looped = load_config("configs/tiny.yaml", ["data.source=synthetic", "model.scan_layers=false"])
    assert plan.unmodelled(looped, "gpu") == ["model.scan_layers=false"]  # named, never passed over
    bf16_moments = load_config("configs/tiny.yaml", ["data.source=synthetic", "optimizer.state_dtype=bfloat16"])
    assert plan.unmodelled(bf16_moments, "gpu") == []


@pytest.mark.parametrize("zero", [1, 3])
def test_bf16_moments_halve_the_stored_moments_and_the_updates_copy(zero):
    """optimizer.state_dtype=bfloat16: Adam's mu and nu take 2 bytes each in the optimizer's shards, at rest and
    in the untiled update's new copy; parameters and gradients stay float32 (the held-out cells check it compiled)."""
    f32, bf16 = (plan.memory(load_config("configs/tiny.yaml", ["data.source=synthetic", f"optimizer.zero={zero}",
                                                               f"optimizer.state_dtype={d}"]), (2, 2, 2))
                 for d in ("float32", "bfloat16"))
    counters = 3 * 4 + 2 * 4
    assert bf16.optimizer - counters == (f32.optimizer - counters) // 2
    assert bf16.params == f32.params and bf16.gradients == f32.gradients
    update = dict(f32.phases)["optimizer update"] - dict(bf16.phases)["optimizer update"]
    assert update == (f32.optimizer - counters) // 2


# --------------------------------------------------------------------------- latency, --devices, output


def test_latency_gives_small_models_a_sane_step_time(h100):
    """The tiny model's step is dominated by its collectives' latency, not by its few MiB of bytes; the
    per-parameter ones count once per combined bucket."""
    config = load_config("configs/tiny.yaml", ["data.source=synthetic"])
    timing = plan.step_time(config, h100.with_devices(8))
    traffic = plan.collectives(config)
    ops = sum(t.count for t in traffic if t.what not in plan.COMBINED)
    buckets = len({(t.kind, t.axes) for t in traffic if t.what in plan.COMBINED})
    assert ops > 40 and timing.latency_s >= (ops + buckets) * h100.collective_latency_us * 1e-6
    assert timing.latency_s < sum(t.count for t in traffic) * 1e-4
    assert timing.latency_s > 0.5 * sum(timing.comm_s.values())  # small messages: latency bound
    zero = plan.dataclasses.replace(h100, collective_latency_us=0.0, intra_node_step_us=0.0, inter_node_step_us=0.0)
    assert plan.step_time(config, zero.with_devices(8)).latency_s == 0.0
    # NCCL's tuner picks the protocol per message: a 4-byte all-reduce over 8 GPUs runs in LL (6.6 us + 14
    # steps of 0.6 us), a 64 MiB one in Simple (8.4 us + 14 steps of 3.4 us, at the full link bandwidth)
    def one(nbytes):
        op = plan.Traffic("all-reduce", ("expert",), nbytes, 1, "one op", 8)
        return plan.step_time(config, h100.with_devices(8), (1, 8, 1), traffic=[op])

    assert one(4).latency_s == pytest.approx((6.6 + 14 * 0.6) * 1e-6)
    big = one(64 << 20)
    assert big.latency_s == pytest.approx((8.4 + 14 * 3.4) * 1e-6)
    assert big.comm_s["expert"] == pytest.approx(big.latency_s + 2 * (64 << 20) * 7 / 8 / 450e9)
    # an older cluster file without the latency fields still loads, with NCCL's figures
    assert plan.Cluster.from_dict({f: getattr(h100, f) for f in plan.Cluster.FIELDS}) == h100


def test_plan_defaults_to_one_node_says_so_and_keeps_lines_short(capsys):
    assert plan.main(["--cluster", H100, "--config", "configs/gpu_1.3b.yaml"]) == 0
    out = capsys.readouterr().out
    assert "Planning for 8 GPUs: one node of DGX-H100" in out and "on 8 x H100" in out
    prose = [line for line in out.splitlines() if not line.startswith("|")]
    assert max(map(len, prose)) <= plan.WIDTH
    rows = [line for line in out.splitlines() if line.startswith("| 1 |")]
    assert rows and all(cell.count(".") <= 1 for cell in rows[0].split("|")[9:12])  # x.xx GiB / ms


def test_summit_names_a_device_count_that_divides_the_batch():
    summit = plan.Cluster.load(str(REPO / "configs" / "clusters" / "summit.yaml"))
    config = load_config(str(REPO / "configs" / "gpu_6.7b.yaml"), ["mesh=auto"])
    with pytest.raises(plan.NoPlanFits, match=r"no layout divides the model(.|\n)*128 GPUs divide it"):
        _ = plan.search(config, summit, summit.devices).best


def test_train_mesh_auto_refuses_a_plan_that_exceeds_the_named_cluster(tmp_path):
    import yaml

    values = yaml.safe_load(Path(H100).read_text())
    values.update(name="tiny-GPU", memory_gib=0.01)
    cluster = tmp_path / "small.yaml"
    cluster.write_text(yaml.safe_dump(values))
    proc = subprocess.run([sys.executable, "train.py", "--config", "configs/tiny.yaml", "--cluster", str(cluster),
                           "mesh=auto", "data.source=synthetic", f"log.dir={tmp_path / 'run'}"],
                          check=False, cwd=REPO, capture_output=True, text=True, timeout=300)  # fmt: skip
    assert proc.returncode == 2 and "no plan fits" in proc.stderr and "tiny-GPU" not in proc.stdout
    assert not (tmp_path / "run").exists()
