"""train.py as 2 processes x 4 CPU devices (jax.distributed over loopback) equals 1 process x 8 devices.

Every run is a subprocess of `python train.py` with its own environment: the
2 x 4 run is two processes joined by a coordinator on 127.0.0.1, exchanging
tensors through gloo, so the gradient all-reduce and the expert all-to-all
cross a process boundary. The mesh (data=1, expert=4, tensor=2) puts expert
ranks 0-1 in process 0 and 2-3 in process 1. The checkpoint written by the two
processes is then restored by a single process, which must continue with the
same losses. Then a SIGTERM that reaches only one process must still stop
both at the same step with one shared checkpoint (saving is collective).
The fast tests at the end check how train.py decides to start several processes.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from unittest import mock

import numpy as np
import pytest
from compile_flags import FAST_COMPILE_FLAGS

from tedjax import data

ROOT = Path(__file__).resolve().parent.parent
STEPS = 6
OVERRIDES = [
    f"steps={STEPS}", "seed=0",
    "model.vocab_size=256", "model.d_model=32", "model.n_layers=2", "model.n_heads=4", "model.d_ff=64",
    "model.max_len=32", "model.num_experts=8", "model.expert_d_ff=32", "model.top_k=2",
    "mesh.data=1", "mesh.expert=4", "mesh.tensor=2",
    "data.source=stdlib", "data.stdlib_max_bytes=1000000", "data.seq_len=32", "data.batch_size=16",
    "optimizer.warmup_steps=2", "optimizer.learning_rate=0.01",
    # (a constant rate after the warmup: the signal test's 100000-step run then compiles the very step of the
    # 6-step runs, a persistent-cache hit, where a cosine decay over its steps would compile anew)
    "optimizer.schedule=constant",
    "log.every=1", "log.eval_every=0", "log.eval_batches=2", "log.tensorboard=false", "log.progress=false",
    "checkpoint.every=3", "checkpoint.async_save=true",
]  # fmt: skip
TIMEOUT_S = 480


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(tmp: Path) -> dict[str, str]:
    env = dict(os.environ)
    # Our own device count per process (not conftest's 8), the same compiler flags in every run.
    env["XLA_FLAGS"] = FAST_COMPILE_FLAGS
    env["JAX_PLATFORMS"] = "cpu"
    env["TEDJAX_DATA_DIR"] = str(tmp / "data")  # a small corpus of our own; the shared one is left alone
    env["JAX_COMPILATION_CACHE_DIR"] = str(tmp / "jax_cache")  # the resumed 1 x 8 run reuses the first's programs
    env["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
    for name in ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID", "SLURM_NTASKS"):
        env.pop(name, None)
    return env


def _start(args: list[str], env: dict[str, str], log: Path) -> subprocess.Popen:
    cmd = [sys.executable, "train.py", "--config", "configs/tiny.yaml", *args]
    with open(log, "w") as out:  # the child keeps its own copy of the descriptor
        return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)


def _wait_all(procs: dict[str, tuple[subprocess.Popen, Path]]) -> None:
    """Wait for every process; on a failure or timeout kill the others and show the logs."""
    try:
        for name, (proc, log) in procs.items():
            rc = proc.wait(timeout=TIMEOUT_S)
            if rc != 0:
                tail = log.read_text()[-3000:]
                raise AssertionError(f"{name} exited with {rc}; its output ends with:\n{tail}")
    finally:
        for proc, _ in procs.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait()


def _losses(log_dir: Path) -> tuple[dict[int, float], float]:
    records = [json.loads(line) for line in (log_dir / "metrics.jsonl").read_text().splitlines()]
    train = {r["step"]: r["loss"] for r in records if r["kind"] == "train"}
    evals = [r["lm_loss"] for r in records if r["kind"] == "eval"]
    assert len(evals) == 1, records
    return train, evals[0]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("multiprocess")
    env = _env(tmp)
    # Prepare the corpus once, before the processes that read it start (here: a process of its own cost ~3 s).
    with mock.patch.dict(os.environ, {"TEDJAX_DATA_DIR": env["TEDJAX_DATA_DIR"]}):
        data.ensure_stdlib_corpus(max_bytes=1000000)
    port = _free_port()
    procs = {
        "1x8": (_start(["--cpu-devices", "8", *OVERRIDES, f"log.dir={tmp / 'one'}"], env, tmp / "one.log"),
                tmp / "one.log"),
    }  # fmt: skip
    for i in range(2):
        args = ["--cpu-devices", "4", "--coordinator", f"127.0.0.1:{port}", "--num-processes", "2",
                "--process-id", str(i), *OVERRIDES, f"log.dir={tmp / 'two'}"]  # fmt: skip
        procs[f"2x4 process {i}"] = (_start(args, env, tmp / f"two_{i}.log"), tmp / f"two_{i}.log")
    _wait_all(procs)
    return tmp


@pytest.mark.slow
def test_two_processes_match_one(runs):
    one_train, one_eval = _losses(runs / "one")
    two_train, two_eval = _losses(runs / "two")
    assert sorted(one_train) == sorted(two_train) == list(range(1, STEPS + 1))
    a = np.array([one_train[s] for s in sorted(one_train)])
    b = np.array([two_train[s] for s in sorted(two_train)])
    np.testing.assert_allclose(b, a, rtol=0, atol=2e-5)
    assert abs(two_eval - one_eval) < 2e-5
    assert a[-1] < a[0] - 0.05, f"training should lower the loss: {a}"


@pytest.mark.slow
def test_two_process_checkpoint_resumes_in_one_process(runs):
    """The step-3 checkpoint that both processes wrote, restored by 1 x 8, continues to the same losses."""
    saved = runs / "two" / "checkpoints"
    assert {p.name for p in saved.iterdir() if p.name.isdigit()} == {"3", "6"}
    resumed = runs / "resumed"
    shutil.copytree(saved, resumed / "checkpoints")
    shutil.rmtree(resumed / "checkpoints" / "6")
    log = runs / "resumed.log"
    proc = _start(["--cpu-devices", "8", "--resume", *OVERRIDES, f"log.dir={resumed}"], _env(runs), log)
    _wait_all({"resumed 1x8": (proc, log)})
    assert "resumed from checkpoint step 3" in log.read_text()
    one_train, one_eval = _losses(runs / "one")
    resumed_train, resumed_eval = _losses(resumed)
    assert sorted(resumed_train) == [4, 5, 6]
    for step in (4, 5, 6):
        assert abs(resumed_train[step] - one_train[step]) < 2e-5, (step, resumed_train[step], one_train[step])
    assert abs(resumed_eval - one_eval) < 2e-5


@pytest.mark.slow
def test_signal_to_one_process_stops_both_at_one_checkpoint(runs):
    """Preemption: only process 1 gets SIGTERM; both agree on a step, save it together and exit cleanly."""
    env = _env(runs)
    port = _free_port()
    log_dir = runs / "signal"
    overrides = [o for o in OVERRIDES if not o.startswith(("steps=", "checkpoint.every=", "log.every="))]
    overrides += ["steps=100000", "checkpoint.every=0", "log.every=2", f"log.dir={log_dir}"]
    procs = {}
    for i in range(2):
        args = ["--cpu-devices", "4", "--coordinator", f"127.0.0.1:{port}", "--num-processes", "2",
                "--process-id", str(i), *overrides]  # fmt: skip
        procs[f"process {i}"] = (_start(args, env, runs / f"signal_{i}.log"), runs / f"signal_{i}.log")
    metrics = log_dir / "metrics.jsonl"
    deadline = time.monotonic() + TIMEOUT_S
    try:  # wait until training is under way (a few logged steps), then signal process 1 only
        while not (metrics.exists() and len(metrics.read_text().splitlines()) >= 3):
            dead = [name for name, (proc, _) in procs.items() if proc.poll() is not None]
            assert not dead and time.monotonic() < deadline, f"{dead or 'timeout'} before training started"
            time.sleep(0.2)
        procs["process 1"][0].send_signal(signal.SIGTERM)
    except BaseException:
        for proc, _ in procs.values():
            proc.kill()
        raise
    _wait_all(procs)
    steps = [p.name for p in (log_dir / "checkpoints").iterdir() if p.name.isdigit()]
    assert len(steps) == 1, steps
    step = int(steps[0])
    assert step % 2 == 0 and step < 100000  # agreed at a log step, long before the end
    assert f"saved checkpoint step {step}" in (runs / "signal_0.log").read_text()  # process 0 never got the signal
    for i in range(2):
        assert f"stopped by signal; checkpoint step {step} saved" in (runs / f"signal_{i}.log").read_text()


# --------------------------------------------------------------------------- train.py's multi-process options


@pytest.fixture(scope="module")
def cli():
    spec = importlib.util.spec_from_file_location("train_cli", ROOT / "train.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # (train.py imports jax only inside main)
    return module


@pytest.fixture
def clean_env(monkeypatch):
    for name in ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID", "SLURM_JOB_ID", "SLURM_NTASKS",
                 "SLURM_STEP_NODELIST"):  # fmt: skip
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


def test_partial_multiprocess_flags_refused(cli, clean_env, capsys):
    assert cli.main(["--coordinator", "127.0.0.1:12355", "--num-processes", "2"]) == 2
    err = capsys.readouterr().err
    assert "needs all of --coordinator" in err and "process_id=None" in err


def test_multiprocess_from_environment(cli, clean_env):
    clean_env.setenv("JAX_COORDINATOR_ADDRESS", "host0:1234")
    clean_env.setenv("JAX_NUM_PROCESSES", "4")
    clean_env.setenv("JAX_PROCESS_ID", "3")
    args = cli.parse_args(["steps=5", "--resume"])
    assert (args.coordinator, args.num_processes, args.process_id) == ("host0:1234", 4, 3)
    assert args.overrides == ["steps=5"] and args.resume
    assert cli._multi_process(args)
    assert cli.parse_args(["--process-id", "1"]).process_id == 1  # a flag beats the environment


def test_single_process_cases(cli, clean_env):
    assert not cli._multi_process(cli.parse_args([]))
    assert not cli._multi_process(cli.parse_args(["--num-processes", "1"]))
    clean_env.setenv("SLURM_JOB_ID", "123")  # an sbatch script or salloc shell, not inside srun
    assert not cli._multi_process(cli.parse_args([]))
    clean_env.setenv("SLURM_NTASKS", "8")
    clean_env.setenv("SLURM_STEP_NODELIST", "node[01-02]")  # inside `srun` with 8 tasks
    assert cli._multi_process(cli.parse_args([]))
    clean_env.setenv("SLURM_NTASKS", "1")
    assert not cli._multi_process(cli.parse_args([]))


def test_cpu_devices_conflicting_with_xla_flags_refused(cli, clean_env, capsys):
    clean_env.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
    assert cli.main(["--cpu-devices", "4", "steps=1"]) == 2
    assert "--cpu-devices 4 conflicts with XLA_FLAGS" in capsys.readouterr().err
