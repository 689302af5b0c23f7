"""Tools around a run (issue 25): profiler trace of a step range, learning-rate schedules, dtype auto and
bfloat16 Adam moments, MFU peaks per device kind and dtype, wandb offline, XLA:GPU flag profiles, and the
CPU record of every benchmark result."""

from __future__ import annotations

import gzip
import json
import os
import subprocess
import sys
import types
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from reference import TINY_RUN_OVERRIDES

from tedjax.checkpoint import config_changes
from tedjax.config import GPU_THROUGHPUT_FLAGS, ModelConfig, OptimizerConfig, XlaConfig, load_config, resolve_dtype
from tedjax.logs import detect_peak_tflops
from tedjax.loop import run
from tedjax.optim import learning_rate_schedule, make_optimizer

REPO = Path(__file__).resolve().parents[1]
TINY_YAML = str(REPO / "configs" / "tiny.yaml")
MOE_SCOPES = ("moe_route", "moe_dispatch", "moe_experts", "moe_combine")  # the named scopes of tedjax/moe.py


def tiny(log_dir, *extra):
    return load_config(TINY_YAML, [*TINY_RUN_OVERRIDES, f"log.dir={log_dir}", "checkpoint.every=0", *extra])


# ---------------------------------------------------------------- profiler trace and wandb offline


@pytest.fixture(scope="module")
def traced_run(tmp_path_factory):
    """3 steps of the tiny MoE run, steps 1..2 traced, metrics mirrored to wandb in offline mode, Adam in bf16."""
    import wandb  # noqa: F401  (in the test extra, so offline mode is checked in CI)
    log_dir = tmp_path_factory.mktemp("tooling") / "run"
    config = tiny(log_dir, "steps=3", "log.profile_steps=[1,3]", "log.wandb.project=tedjax-test",
                  "log.wandb.mode=offline", "log.wandb.name=tiny", "optimizer.state_dtype=bfloat16")  # fmt: skip
    # No network: offline mode must not need one (the env switches off anything wandb would send).
    env = {"WANDB_MODE": "offline", "WANDB_SILENT": "true", "WANDB_DISABLE_GIT": "true", "WANDB_DISABLE_CODE": "true"}
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        result = run(config)
    finally:
        for k, v in old.items():
            os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)
    return log_dir, result


def test_profile_trace_holds_the_traced_steps_and_the_moe_scopes(traced_run):
    log_dir, result = traced_run
    assert sorted(result.train_losses) == [1, 2, 3]
    planes = list((log_dir / "profile").rglob("*.xplane.pb"))
    assert len(planes) == 1, planes  # one trace, of the range only
    raw = planes[0].read_bytes()
    for scope in MOE_SCOPES:  # the ops' names (HLO metadata) keep the MoE layer's scopes
        assert scope.encode() in raw, scope
    from jax.profiler import ProfileData

    events = [(ev.name, dict(ev.stats)) for plane in ProfileData.from_file(str(planes[0])).planes
              for line in plane.lines for ev in line.events]  # fmt: skip
    steps = sorted({stats.get("step_num") for name, stats in events if name == "train"})
    assert steps == [1, 2], steps  # StepTraceAnnotation of exactly the traced steps
    assert any(stats.get("hlo_module") == "jit_train_step" for _, stats in events)  # the step's ops ran inside
    trace = next((log_dir / "profile").rglob("*.trace.json.gz"))
    assert json.loads(gzip.decompress(trace.read_bytes()))["traceEvents"]


def test_wandb_offline_run_holds_the_metrics(traced_run):
    log_dir, _ = traced_run
    runs = list((log_dir / "wandb").glob("offline-run-*"))
    assert len(runs) == 1, runs
    files = list(runs[0].glob("*.wandb"))
    assert files and b"train/loss" in files[0].read_bytes() and b"eval/lm_loss" in files[0].read_bytes()


def test_start_record_has_xla_flags_and_compute_dtype(traced_run):
    log_dir, _ = traced_run
    start = json.loads((log_dir / "metrics.jsonl").read_text().splitlines()[0])
    assert start["kind"] == "start" and start["xla_flags"] == os.environ.get("XLA_FLAGS", "")
    assert start["compute_dtype"] == "float32" and start["config"]["model"]["dtype"] == "auto"
    assert start["config"]["xla"]["gpu_profile"] == "default"


def test_profile_range_and_wandb_errors_come_before_compiling(tmp_path, monkeypatch):
    with pytest.raises(ValueError, match=r"log.profile_steps=\[2, 9\] ends after steps=3"):
        tiny(tmp_path, "steps=3", "log.profile_steps=[2,9]")
    monkeypatch.setitem(sys.modules, "wandb", None)  # import wandb -> ImportError
    with pytest.raises(ValueError, match=r"pip install 'tedjax\[wandb\]'"):
        run(tiny(tmp_path / "run", "steps=1", "log.wandb.project=p", "log.wandb.mode=offline"))
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


# ---------------------------------------------------------------- learning-rate schedules


def _lr(schedule, steps=100, warmup=10, **kw):
    cfg = OptimizerConfig(learning_rate=1.0, min_lr_ratio=0.1, warmup_steps=warmup, schedule=schedule, **kw)
    f = learning_rate_schedule(cfg, steps)
    return lambda s: float(f(s))


def test_cosine_schedule_is_unchanged():
    cfg = OptimizerConfig(warmup_steps=7)
    ref = optax.warmup_cosine_decay_schedule(0.0, cfg.learning_rate, 7, 50, cfg.learning_rate * cfg.min_lr_ratio)
    new = learning_rate_schedule(cfg, 50)
    assert [float(new(s)) for s in range(52)] == [float(ref(s)) for s in range(52)]


@pytest.mark.parametrize("schedule", ["linear", "constant", "wsd", "inverse_sqrt"])
def test_schedules_warm_up_linearly_then_follow_their_shape(schedule):
    lr = _lr(schedule)
    assert [lr(s) for s in (0, 5, 10)] == pytest.approx([0.0, 0.5, 1.0])
    expected = {  # step -> value, from each schedule's definition (OptimizerConfig)
        "linear": {55: 0.55, 100: 0.1},
        "constant": {55: 1.0, 100: 1.0},
        "wsd": {60: 1.0, 80: 1.0, 90: 0.55, 100: 0.1},  # decay_fraction 0.2: the last 20 steps decay linearly
        "inverse_sqrt": {40: 0.5, 90: 1 / 3},  # sqrt(10 / step)
    }[schedule]
    for step, value in expected.items():
        assert lr(step) == pytest.approx(value, rel=1e-5), step


def test_wsd_decay_fraction_and_no_warmup():
    lr = _lr("wsd", warmup=0, decay_fraction=0.5)
    assert [lr(s) for s in (0, 49, 50, 75, 100)] == pytest.approx([1.0, 1.0, 1.0, 0.55, 0.1])
    assert _lr("inverse_sqrt", warmup=0)(4) == pytest.approx(0.5)


def test_schedule_change_is_refused_on_resume_like_a_learning_rate_change():
    saved = tiny("/tmp/x").to_dict()
    changes = config_changes(saved, tiny("/tmp/x", "optimizer.schedule=wsd"))
    assert [(c.key, c.kind) for c in changes] == [("optimizer.schedule", "result")]
    changes = config_changes(saved, tiny("/tmp/x", "optimizer.decay_fraction=0.3"))
    assert [(c.key, c.kind) for c in changes] == [("optimizer.decay_fraction", "result")]


# ---------------------------------------------------------------- precision


def test_dtype_auto_is_float32_on_cpu_and_bfloat16_on_gpu_and_tpu():
    assert ModelConfig().dtype == "auto" and ModelConfig().compute_dtype == jnp.float32  # these tests run on CPU
    assert [resolve_dtype("auto", b) for b in ("cpu", "gpu", "cuda", "tpu")] == ["float32"] + ["bfloat16"] * 3
    assert resolve_dtype("float32", "gpu") == "float32"
    # A checkpoint saved with dtype float32 resumes under auto on CPU (the same numbers), not on GPU.
    saved = tiny("/tmp/x", "model.dtype=float32").to_dict()
    assert config_changes(saved, tiny("/tmp/x")) == []
    assert [c.key for c in config_changes(saved, tiny("/tmp/x", "model.dtype=bfloat16"))] == ["model.dtype"]


def _fake(kind):
    return types.SimpleNamespace(device_kind=kind)


def test_mfu_peak_per_device_kind_and_dtype():
    kinds = {"NVIDIA H100 80GB HBM3": 989.0, "NVIDIA H100 PCIe": 756.0, "NVIDIA H100 NVL": 835.0,
             "NVIDIA H200": 989.0, "NVIDIA A100-SXM4-80GB": 312.0, "NVIDIA A100 80GB PCIe": 312.0,
             "TPU v5 lite": 197.0, "TPU v5p": 459.0}  # fmt: skip
    assert {k: detect_peak_tflops(_fake(k)) for k in kinds} == kinds
    assert detect_peak_tflops(_fake("NVIDIA H100 80GB HBM3"), "float32") is None  # no fp32 run against a bf16 peak
    assert detect_peak_tflops(_fake("cpu")) is None and detect_peak_tflops(_fake("Tesla V100-SXM2-16GB")) is None


def test_bfloat16_adam_moments_in_the_sharded_train_step(traced_run):
    """The traced run kept its moments in bfloat16 through ZeRO-1 and the skip guard: half the state bytes."""
    _, result = traced_run
    adam = result.state.opt_state[0]
    leaves = jax.tree.leaves((adam.mu, adam.nu))
    assert {x.dtype for x in leaves} == {jnp.dtype(jnp.bfloat16)}
    params = jax.tree.leaves(result.state.params)
    assert sum(x.nbytes for x in leaves) == sum(x.nbytes for x in params)  # 2 moments x 2 bytes = 1 x float32
    assert all(np.isfinite(v) for v in result.train_losses.values())


def test_bfloat16_adam_moments_converge_like_float32():
    """A least-squares fit of a 64 x 32 map, 300 AdamW steps: bfloat16 moments reach the float32 moments' loss.
    The main job with bfloat16 moments is in README ("Precision")."""
    key_x, key_w = jax.random.split(jax.random.key(0))
    x = jax.random.normal(key_x, (256, 64))
    y = x @ jax.random.normal(key_w, (64, 32))
    loss = lambda p: jnp.mean(jnp.square(x @ p["w"] + p["b"] - y))  # noqa: E731
    finals = {}
    for dtype in ("float32", "bfloat16"):
        cfg = OptimizerConfig(learning_rate=0.05, warmup_steps=10, weight_decay=0.0, state_dtype=dtype)
        tx = make_optimizer(cfg, 300)
        params = {"w": jnp.zeros((64, 32)), "b": jnp.zeros(32)}

        def step(carry, _):
            params, state = carry
            value, grads = jax.value_and_grad(loss)(params)
            updates, state = tx.update(grads, state, params)
            return (optax.apply_updates(params, updates), state), value

        (params, _), curve = jax.lax.scan(step, (params, tx.init(params)), None, length=300)
        finals[dtype] = float(loss(params))
    assert float(curve[0]) > 50 and finals["float32"] < 1e-5, finals  # the problem is solved (68 -> 7e-7) ...
    assert finals["bfloat16"] < 1e-5, finals  # ... with bfloat16 moments too (9e-7)


def test_bfloat16_moments_keep_their_dtype_through_an_update():
    tx = make_optimizer(OptimizerConfig(state_dtype="bfloat16"), 10)
    params = {"w": jnp.ones((4, 4)), "b": jnp.ones(4)}
    state = tx.init(params)
    _, new = jax.jit(tx.update)(params, state, params)
    assert jax.tree.map(lambda x: x.dtype, new) == jax.tree.map(lambda x: x.dtype, state)
    assert new[0].nu["w"].dtype == jnp.bfloat16 and float(new[0].nu["w"][0, 0]) == pytest.approx(0.05, rel=1e-2)


# ---------------------------------------------------------------- XLA:GPU flag profiles


def test_gpu_throughput_profile_flags():
    assert XlaConfig().flags() == []
    flags = XlaConfig(gpu_profile="throughput", all_reduce_combine_bytes=1024).flags()
    assert "--xla_gpu_enable_latency_hiding_scheduler=true" in flags
    names = [f.split("=")[0] for f in flags]
    assert len(names) == len(set(names))  # the explicit threshold replaces the profile's
    assert "--xla_gpu_all_reduce_combine_threshold_bytes=1024" in flags
    assert set(GPU_THROUGHPUT_FLAGS) - set(flags) == {"--xla_gpu_all_reduce_combine_threshold_bytes=536870912"}


def test_gpu_throughput_flags_exist_in_this_jaxlib():
    """XLA aborts on an unknown flag: every profile flag must parse (XLA:CPU accepts and ignores them)."""
    env = {**os.environ, "XLA_FLAGS": " ".join(XlaConfig(gpu_profile="throughput").flags()), "JAX_PLATFORMS": "cpu"}
    out = subprocess.run([sys.executable, "-c", "import jax; print(jax.numpy.ones(3).sum())"], env=env,
                         capture_output=True, text=True, timeout=120)  # fmt: skip
    assert out.returncode == 0 and out.stdout.strip() == "3.0", out.stderr[-2000:]


# ---------------------------------------------------------------- benchmark machine record


def test_benchmark_results_record_the_cpu(monkeypatch):
    sys.path.insert(0, str(REPO / "benchmarks"))
    try:
        import _common
    finally:
        sys.path.remove(str(REPO / "benchmarks"))
    info = _common.machine_info()
    assert info["cpu_model"] and info["cpu_threads"] >= 1
    flags = Path("/proc/cpuinfo").read_text().split() if Path("/proc/cpuinfo").exists() else []
    assert info["cpu_vector_flags"] == [f for f in _common.VECTOR_FLAGS if f in flags]
    line = _common.cpu_line(info)
    assert info["cpu_model"] in line and f"{info['cpu_threads']} threads" in line
    # an ISA cap (a stand-in for an older CPU) is part of the record, on the XLA side and the torch peer's
    monkeypatch.setenv("XLA_FLAGS", "--xla_cpu_max_isa=AVX512 --xla_cpu_max_isa=AVX2")  # the last one wins
    monkeypatch.setenv("ATEN_CPU_CAPABILITY", "avx2")
    capped = {**info, **_common.cpu_info()}
    assert capped["xla_max_isa"] == "AVX2" and capped["thread_env"]["ATEN_CPU_CAPABILITY"] == "avx2"
    line = _common.cpu_line(capped)
    assert "XLA ISA capped at AVX2" in line and "ATEN_CPU_CAPABILITY=avx2" in line
