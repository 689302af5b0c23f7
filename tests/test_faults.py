"""Reliability (issue 6): crashes, signals, non-finite steps and bad input.

- Crash and resume: `train.py` runs in a process of its own and is killed with SIGKILL
  at several points (mid-step, while an asynchronous checkpoint is being
  written), then restarted with --resume. Each restart must pick the newest
  complete checkpoint; every logged loss must equal the uninterrupted run's;
  every checkpoint left must restore bit-identical to the uninterrupted run's.
- Clean stop: SIGTERM and SIGINT save a checkpoint and exit 0 with a message naming it.
- Numerical faults: non-finite loss or gradients skip the step (parameters and
  optimizer state bit-identical) and are counted; `max_bad_steps` in a row stop
  the run (exit 3) with the last checkpoint intact.
- Bad input: every config field out of range or of the wrong type, meshes
  that do not fit, bad token files, wrong or damaged checkpoint directories,
  unwritable output directories: refused with a message naming the problem
  and the fix, before anything is compiled or written.
- Routing under stress, through the whole MoE layer (forward and backward).
- Issue 20: nan / inf in every float setting refused; an update that makes the
  weights non-finite (finite loss and gradients) skipped, and never saved; a
  failed write mid-run and SIGINT during the final save each end in one line.

`COUNTS` tallies what was tried and what held; the module prints it when it
ends, and `benchmarks/faults.py` runs this file to save it.
"""

from __future__ import annotations

import collections
import dataclasses
import importlib.util
import json
import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import train_fork
from flax import nnx
from reference import TINY_RUN_OVERRIDES

import tedjax
import tedjax.checkpoint as ckpt_lib
import tedjax.loop
import tedjax.trainer
from tedjax.checkpoint import Checkpointer
from tedjax.config import TrainConfig, load_config
from tedjax.loop import Batches, run
from tedjax.mesh import make_mesh
from tedjax.trainer import Trainer

REPO = Path(__file__).resolve().parents[1]
TINY_YAML = str(REPO / "configs" / "tiny.yaml")
TINY = TINY_RUN_OVERRIDES

# What was tried and what held; printed (and saved for benchmarks/faults.py) when the module ends.
COUNTS: collections.Counter = collections.Counter()
DETAILS: dict = {}  # the kill history, for the saved summary
COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"


def tiny_config(log_dir, *extra) -> TrainConfig:
    return load_config(TINY_YAML, [*TINY, f"log.dir={log_dir}", *extra])


@pytest.fixture(scope="module", autouse=True)
def summary(request):
    yield
    line = (f"faults: kill points {COUNTS['kill_survived']}/{COUNTS['kill_tried']} survived, "
            f"clean stops {COUNTS['signal_survived']}/{COUNTS['signal_tried']}, "
            f"bad inputs {COUNTS['bad_input_rejected']}/{COUNTS['bad_input_tried']} rejected cleanly, "
            f"non-finite steps {COUNTS['nan_skipped']}/{COUNTS['nan_injected']} skipped")  # fmt: skip
    capture = request.config.pluginmanager.get_plugin("capturemanager")
    if capture is None:
        print("\n" + line)
    else:
        with capture.global_and_fixture_disabled():
            print("\n" + line)
    if os.environ.get("TEDJAX_FAULTS_SUMMARY_DIR"):
        summary_json = {"counts": dict(COUNTS), **DETAILS}
        Path(os.environ["TEDJAX_FAULTS_SUMMARY_DIR"], "test_faults.json").write_text(json.dumps(summary_json, indent=1))


@pytest.fixture
def compiles():
    """Names of the XLA compilations that happen while the test runs."""
    names: list[str] = []

    def listener(event, duration, **kwargs):
        if event == COMPILE_EVENT:
            names.append(kwargs.get("fun_name", "?"))

    jax.monitoring.register_event_duration_secs_listener(listener)
    yield names
    jax.monitoring.unregister_event_duration_listener(listener)


def snapshot(root: Path) -> dict:
    """Every file and directory under `root` with its size, mtime and bytes: proof that nothing changed."""
    if not root.exists():
        return {}
    out = {}
    for p in sorted(root.rglob("*")):
        stat = p.stat()
        # (a directory's mtime is left out: the writability probe adds and removes a file in it)
        out[p.relative_to(root).as_posix()] = "dir" if p.is_dir() else (stat.st_size, stat.st_mtime_ns, p.read_bytes())
    return out


def as_numpy(tree):
    return jax.tree.map(np.asarray, tree)


def bit_identical(a, b) -> bool:
    la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
    return jax.tree.structure(a) == jax.tree.structure(b) and all(
        x.dtype == y.dtype and x.shape == y.shape and x.tobytes() == y.tobytes() for x, y in zip(la, lb)
    )


def restore_all(config: TrainConfig) -> dict[int, object]:
    """Every checkpoint step in the run directory, restored onto the (2, 2, 2) mesh, as numpy."""
    abstract = Trainer(config, make_mesh(2, 2, 2)).abstract_state()
    checkpointer = Checkpointer(config, resume=True)
    try:
        return {s: as_numpy(checkpointer.restore(abstract, s)[0]) for s in checkpointer.existing_steps()}
    finally:
        checkpointer.close()


_PARSED: dict = {}  # path -> ((size, mtime), records): wait_until polls every 2 ms, the file changes once a step


def all_records(log_dir: Path) -> list[dict]:
    """Complete records of metrics.jsonl (a line still being written is not complete)."""
    path = log_dir / "metrics.jsonl"
    try:
        stat = path.stat()
    except FileNotFoundError:
        return []
    version = (stat.st_size, stat.st_mtime_ns)
    if _PARSED.get(path, (None,))[0] != version:
        lines = path.read_text().split("\n")[:-1]  # the last piece has no newline yet
        _PARSED[path] = (version, list(map(json.loads, lines)))
    return list(_PARSED[path][1])


def train_records(log_dir: Path) -> list[dict]:
    return [r for r in all_records(log_dir) if r["kind"] == "train"]


def starts(log_dir: Path) -> int:
    """How many runs have started in `log_dir` (each writes one `start` record after truncating the log)."""
    return sum(r["kind"] == "start" for r in all_records(log_dir))


def records_of_run(log_dir: Path, n_starts: int) -> list[dict]:
    """Train records written by the run whose `start` record is the `n_starts`-th ([] until it has started)."""
    records, seen = [], 0
    for r in all_records(log_dir):
        seen += r["kind"] == "start"
        if seen == n_starts and r["kind"] == "train":
            records.append(r)
    return records


# =========================================================================== crash and resume (subprocesses)

CHAIN_STEPS = 24
CHAIN = [*TINY, f"steps={CHAIN_STEPS}", "checkpoint.every=2", "checkpoint.keep=100"]


def launch(log_dir: Path, name: str, resume: bool) -> tuple[train_fork.Forked, Path]:
    """Start train.py in a process of its own (forked with its modules imported: tests/train_fork.py); the
    suite's persistent compilation cache (conftest.py) means only the first run pays for XLA."""
    out = log_dir.parent / f"{log_dir.name}-{name}.out"
    argv = ["--config", TINY_YAML, *CHAIN, f"log.dir={log_dir}", *(["--resume"] if resume else [])]
    return train_fork.start(argv, out), out


def step_dirs(ckpt: Path) -> tuple[set[int], set[str]]:
    """(complete steps, names of orbax temporary directories) in a checkpoint directory."""
    if not ckpt.exists():
        return set(), set()
    complete, partial = set(), set()
    for p in ckpt.iterdir():
        if p.is_dir() and p.name.isdigit():
            complete.add(int(p.name))
        elif p.is_dir() and "tmp" in p.name:
            partial.add(p.name)
    return complete, partial


def wait_until(proc: train_fork.Forked, ready, hang_guard_s: float = 300) -> bool:
    """Poll `ready()` every ~2 ms while `proc` lives; False if it exited first."""
    deadline = time.monotonic() + hang_guard_s
    while time.monotonic() < deadline:
        if ready():
            return proc.poll() is None
        if proc.poll() is not None:
            return False
        time.sleep(0.002)
    proc.kill()
    raise TimeoutError("train.py hung")


# record fields that differ between runs
TIMING = {"time", "tokens_per_s", "tflops_per_device", "mfu", "seconds_per_step"}


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The uninterrupted run: per-step metrics and every checkpoint (keep=100 keeps all)."""
    log_dir = tmp_path_factory.mktemp("faults") / "reference"
    proc, out = launch(log_dir, "run", resume=False)
    assert proc.wait(timeout=600) == 0, out.read_text()[-3000:]
    records = train_records(log_dir)
    metrics = {r["step"]: {k: v for k, v in r.items() if k not in TIMING} for r in records}
    assert sorted(metrics) == list(range(1, CHAIN_STEPS + 1)) and len(records) == CHAIN_STEPS
    states = restore_all(load_config(TINY_YAML, [*CHAIN, f"log.dir={log_dir}"]))
    assert sorted(states) == list(range(2, CHAIN_STEPS + 1, 2))
    return metrics, states


# (signal, when): "records N" = after N new metric records (so mid-step), "tmp N" = when the N-th new
# orbax temporary directory appears (an asynchronous checkpoint write in progress), "random" = a random
# moment 0-0.6 s after the first new record.
KILL_PLAN = [
    (signal.SIGKILL, "records 3"),
    (signal.SIGKILL, "tmp 1"),
    (signal.SIGTERM, "records 2"),
    (signal.SIGKILL, "records 1"),  # during the first step after a restore
    (signal.SIGKILL, "tmp 2"),
    (signal.SIGINT, "tmp 1"),  # lands on a checkpoint step: the stop must not save that step twice
    (signal.SIGKILL, "random"),
]


def kill_point(when: str, log_dir: Path, ckpt: Path, rng: random.Random, run_number: int):
    """A predicate that turns true at the kill point `when` (see KILL_PLAN) of the run just started.

    `run_number`: how many `start` records the log holds once this run has started (records of steps
    after the checkpoint it resumes are moved aside by it first, so counts before it started mislead)."""
    kind, _, n = when.partition(" ")
    if kind == "records":
        return lambda: len(records_of_run(log_dir, run_number)) >= int(n)
    if kind == "tmp":
        seen, fresh_count = set(step_dirs(ckpt)[1]), [0]  # leftovers of the last kill are not new

        def ready():
            fresh = step_dirs(ckpt)[1] - seen
            seen.update(fresh)
            fresh_count[0] += len(fresh)
            return fresh_count[0] >= int(n)

        return ready
    delay, started = rng.uniform(0.0, 0.6), []

    def ready():
        if not started and records_of_run(log_dir, run_number):
            started.append(time.monotonic())
        return bool(started) and time.monotonic() - started[0] >= delay

    return ready


@pytest.mark.slow
def test_crash_and_resume_equals_uninterrupted_run(reference, tmp_path):
    ref_metrics, ref_states = reference
    log_dir, ckpt = tmp_path / "chain", tmp_path / "chain" / "checkpoints"
    rng = random.Random(0)
    history = DETAILS.setdefault("kill_history", [])
    newest = None  # newest complete checkpoint after the last interruption
    complete_before: set[int] = set()
    for i, (sig, when) in enumerate([*KILL_PLAN, (None, "to the end")]):
        run_number = starts(log_dir) + 1
        proc, out = launch(log_dir, f"run{i}", resume=i > 0)
        if sig is None:
            assert proc.wait(timeout=600) == 0, out.read_text()[-3000:]
        else:
            alive = wait_until(proc, kill_point(when, log_dir, ckpt, rng, run_number))
            assert alive, f"run {i} ended before its kill point ({when}):\n" + out.read_text()[-3000:]
            partial_at_kill = step_dirs(ckpt)[1]
            proc.send_signal(sig)
            rc = proc.wait(timeout=300)
            complete, partial = step_dirs(ckpt)
            COUNTS["kill_tried" if sig == signal.SIGKILL else "signal_tried"] += 1
            if sig == signal.SIGKILL:
                assert rc == -signal.SIGKILL
            else:  # a clean stop: exit 0, a message naming the checkpoint, which is complete
                text = out.read_text()
                saved = re.search(rf"received signal {int(sig)}: saved checkpoint step (\d+) in "
                                  rf"{re.escape(str(ckpt))}; resume with --resume", text)  # fmt: skip
                assert rc == 0 and saved, text[-3000:]
                assert f"stopped by signal; checkpoint step {saved.group(1)} saved" in text
                assert int(saved.group(1)) == max(complete) and not partial
                COUNTS["signal_survived"] += 1
            # (c) no complete checkpoint ever disappears (keep=100: none is due for deletion)
            assert complete_before <= complete, (complete_before, complete)
            complete_before = complete
        if i > 0:  # (a) it restarted from the newest complete checkpoint, whatever partial ones lay around
            text = out.read_text()
            expected = f"resumed from checkpoint step {newest} in {ckpt}" if newest else "--resume: no checkpoint in"
            assert expected in text, text[-3000:]
            new = records_of_run(log_dir, run_number)
            assert new and new[0]["step"] == (newest or 0) + 1
            history[-1]["resumed_from"] = newest or 0
        if sig is not None:
            newest = max(complete) if complete else None
            partial_steps = sorted(int(name.split(".")[0]) for name in partial_at_kill | partial)
            history.append({"signal": signal.Signals(sig).name, "when": when, "newest_complete": newest,
                            "partial_steps": partial_steps})  # fmt: skip
    assert COUNTS["kill_tried"] >= 5
    # some kills caught an asynchronous write half done, with a partial step newer than every complete one
    assert any(h["partial_steps"] and max(h["partial_steps"]) > (h["newest_complete"] or 0) for h in history)
    # (b) every logged metric, before and after each resume, equals the uninterrupted run's, and is there
    # once: a resume moves the records of steps after its checkpoint aside (metrics.superseded.jsonl)
    records = train_records(log_dir)
    assert [r["step"] for r in records] == list(range(1, CHAIN_STEPS + 1))
    untimed = [{k: v for k, v in r.items() if k not in TIMING} for r in records]
    mismatched = [r["step"] for r in untimed if r != ref_metrics[r["step"]]]
    assert not mismatched, mismatched
    # (c) every checkpoint left is complete and bit-identical to the uninterrupted run's; no temporaries left
    complete, partial = step_dirs(ckpt)
    assert not partial
    states = restore_all(load_config(TINY_YAML, [*CHAIN, f"log.dir={log_dir}"]))
    assert sorted(states) == sorted(ref_states)
    for step, state in states.items():
        assert bit_identical(state, ref_states[step]), f"checkpoint {step} differs from the uninterrupted run"
    COUNTS["kill_survived"] += COUNTS["kill_tried"]
    print("\nkills:", *map(json.dumps, history), sep="\n  ")


# =========================================================================== numerical faults (in process)

_real_loss_fn = tedjax.trainer.loss_fn
NAN_LOSS, INF_LOSS, INF_GRAD = -1, -2, -3  # marks in targets[0, 0] of a batch


@jax.custom_vjp
def _inf_gradient(x, flag):
    return x


_inf_gradient.defvjp(lambda x, flag: (x, flag), lambda flag, g: (jnp.where(flag, jnp.inf, 1.0) * g, None))


def poisoned_loss_fn(model, batch):
    """The real loss, made non-finite for batches marked in targets[0, 0] (test-only; see the marks above)."""
    mark = batch["targets"][0, 0]
    loss, metrics = _real_loss_fn(model, dict(batch, targets=jnp.maximum(batch["targets"], 0)))
    loss = loss + jnp.where(mark == NAN_LOSS, jnp.nan, 0.0) + jnp.where(mark == INF_LOSS, jnp.inf, 0.0)
    loss = _inf_gradient(loss, mark == INF_GRAD)  # finite loss, infinite gradients
    return loss, dict(metrics, loss=loss)


def marked(batch: dict, mark: int | None) -> dict:
    if mark is None:
        return batch
    targets = batch["targets"].copy()
    targets[0, 0] = mark
    return dict(batch, targets=targets)


@pytest.fixture(scope="module")
def trainers():
    """Trainers by (config minus its directories, mesh, loss function): runs of one tiny config in this module
    compile once (the loss function is in the key because some tests poison it)."""
    cache: dict = {}

    def make(config, mesh):
        key = (dataclasses.replace(config, log=dataclasses.replace(config.log, dir="-")), tuple(mesh.shape.items()),
               tedjax.trainer.loss_fn)  # fmt: skip
        if key not in cache:
            cache[key] = Trainer(config, mesh)
        return cache[key]

    return make


# The poisoned runs below share this config, so they share one compiled (poisoned) step.
POISONED_RUN = ["steps=12", "max_bad_steps=3", "checkpoint.every=2", "checkpoint.keep=10"]


def test_non_finite_steps_are_skipped_bit_exactly(trainers, monkeypatch, tmp_path):
    """NaN loss, inf loss, inf gradients (finite loss): each step skipped, state bit-identical, counted."""
    monkeypatch.setattr(tedjax.trainer, "loss_fn", poisoned_loss_fn)
    config = tiny_config(tmp_path, *POISONED_RUN)
    trainer = trainers(config, make_mesh(2, 2, 2))
    batches = Batches(config)
    state = trainer.init_state()
    plan = [None, None, NAN_LOSS, INF_LOSS, INF_GRAD, None]  # (step 0 has learning rate 0: warm-up)
    for step, mark in enumerate(plan):
        before = as_numpy((state.params, state.opt_state))  # the step donates `state`
        state, metrics = trainer.train_step(state, trainer.shard_batch(marked(batches.train_batch(step), mark)))
        after = as_numpy((state.params, state.opt_state))
        metrics = as_numpy(metrics)
        if mark is None:
            assert not metrics["skipped"] and np.isfinite(metrics["loss"])
            assert step == 0 or not bit_identical(after[0], before[0])  # a good step changes the parameters
            assert int(metrics["bad_steps"]) == 0
        else:
            COUNTS["nan_injected"] += 1
            if mark == INF_GRAD:
                assert np.isfinite(metrics["loss"]) and not np.isfinite(metrics["grad_norm"])
            else:
                assert not np.isfinite(metrics["loss"])
            assert metrics["skipped"]
            assert bit_identical(after, before), "a skipped step changed parameters or optimizer state"
            assert int(metrics["bad_steps"]) == step - 1  # 1, 2, 3 in a row
            COUNTS["nan_skipped"] += 1
    assert int(state.step) == 6 and int(state.skipped_steps) == 3 and int(state.bad_steps) == 0


def _load_train_module():
    spec = importlib.util.spec_from_file_location("train_cli", REPO / "train.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_too_many_bad_steps_stop_with_the_checkpoints_intact(trainers, monkeypatch, tmp_path, capsys):
    """Batches from step 4 on are poisoned: steps 5, 6, 7 are skipped, then train.py exits 3."""
    monkeypatch.setattr(tedjax.trainer, "loss_fn", poisoned_loss_fn)
    monkeypatch.setattr(tedjax.loop, "Trainer", trainers)
    real_train_batch = Batches.train_batch
    monkeypatch.setattr(Batches, "train_batch", lambda self, step: marked(real_train_batch(self, step),
                                                                           NAN_LOSS if step >= 4 else None))
    extra = [*POISONED_RUN, f"log.dir={tmp_path}"]
    rc = _load_train_module().main(["--config", TINY_YAML, *TINY, *extra])
    err = capsys.readouterr().err
    ckpt = tmp_path / "checkpoints"
    assert rc == 3, err
    assert (f"stopped: 3 consecutive steps (up to step 7) had a non-finite loss, gradient or update and were skipped; "
            f"stopping. The last good checkpoint is step 6 in {ckpt}. Lower optimizer.learning_rate") in err
    COUNTS["nan_injected"] += 3
    # the skips are in the logs
    records = {r["step"]: r for r in train_records(tmp_path)}
    assert sorted(records) == [1, 2, 3, 4, 5, 6]
    assert [records[s]["skipped"] for s in range(1, 7)] == [0, 0, 0, 0, 1, 1]
    assert [records[s]["skipped_steps"] for s in range(1, 7)] == [0, 0, 0, 0, 1, 2]
    # every checkpoint is complete; the one saved during the bad streak holds step 4's parameters and moments
    assert step_dirs(ckpt) == ({2, 4, 6}, set())
    states = restore_all(tiny_config(tmp_path, *extra))
    for state in states.values():
        assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves((state.params, state.opt_state)))
    assert bit_identical((states[6].params, states[6].opt_state), (states[4].params, states[4].opt_state))
    assert not bit_identical(states[4].params, states[2].params)
    assert (int(states[6].bad_steps), int(states[6].skipped_steps), int(states[6].step)) == (2, 2, 6)
    COUNTS["nan_skipped"] += 3


def test_non_finite_updates_are_skipped_and_never_saved(monkeypatch, tmp_path, capsys):
    """Issue 20 item 10: from step 4 on the learning rate is nan (as a nan setting gave), so the loss and the
    gradients stay finite while the update is not. The guard checked only the loss and the gradient norm:
    checkpoint 4 held NaN weights, and the stop message called it "the last good checkpoint"."""
    import tedjax.optim

    real_schedule = tedjax.optim.learning_rate_schedule
    monkeypatch.setattr(tedjax.optim, "learning_rate_schedule", lambda cfg, steps: (
        lambda count: jnp.where(count >= 3, jnp.nan, real_schedule(cfg, steps)(count))))  # fmt: skip
    extra = ["steps=12", "max_bad_steps=2", "checkpoint.every=2", "checkpoint.keep=10", f"log.dir={tmp_path}"]
    rc = _load_train_module().main(["--config", TINY_YAML, *TINY, *extra])
    err = capsys.readouterr().err
    ckpt = tmp_path / "checkpoints"
    assert rc == 3, err
    assert (f"stopped: 2 consecutive steps (up to step 5) had a non-finite loss, gradient or update and were "
            f"skipped; stopping. The last good checkpoint is step 4 in {ckpt}.") in err, err
    COUNTS["nan_injected"] += 2
    records = {r["step"]: r for r in train_records(tmp_path)}
    assert [records[s]["skipped"] for s in range(1, 5)] == [0, 0, 0, 1]
    assert all(np.isfinite(r["loss"]) and np.isfinite(r["grad_norm"]) for r in records.values())
    states = restore_all(tiny_config(tmp_path, *extra))
    assert sorted(states) == [2, 4]
    for state in states.values():  # never a non-finite state on disk
        assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves((state.params, state.opt_state)))
    assert not bit_identical(states[4].params, states[2].params)  # step 3 trained; step 4 was skipped
    assert (int(states[4].skipped_steps), int(states[4].bad_steps)) == (1, 1)
    COUNTS["nan_skipped"] += 2


ENDINGS = ["steps=4", "checkpoint.every=2", "checkpoint.keep=10"]


def test_a_failed_write_mid_run_ends_in_one_line(trainers, monkeypatch, tmp_path, capsys):
    """Issue 20 item 16: the disk filling up mid-run ended in hundreds of lines of tracebacks. Here the metrics
    file turns into /dev/full after step 2 (every later write fails with ENOSPC, as on a full disk)."""
    from tedjax.logs import MetricsLogger

    monkeypatch.setattr(tedjax.loop, "Trainer", trainers)
    real_log = MetricsLogger.log

    def log(self, step, record, *, kind="train"):
        if step == 3 and kind == "train":
            self.jsonl.close()
            self.jsonl = open("/dev/full", "a")
        real_log(self, step, record, kind=kind)

    monkeypatch.setattr(MetricsLogger, "log", log)
    rc = _load_train_module().main(["--config", TINY_YAML, *TINY, *ENDINGS, f"log.dir={tmp_path}"])
    err = capsys.readouterr().err
    lines = [x for x in err.splitlines() if x.strip()]
    COUNTS["write_failure_tried"] += 1
    assert rc == 3 and "Traceback" not in err and len(lines) == 1, err
    ckpt = tmp_path / "checkpoints"
    assert lines[0].startswith(f"stopped: at step 3: the disk is full (No space left on device writing /dev/full); "
                               f"stopping. Nothing written before is lost: checkpoint step 2 in {ckpt} is complete, "
                               "and metrics.jsonl holds every step logged. Free space"), lines[0]  # fmt: skip
    assert [r["step"] for r in train_records(tmp_path)] == [1, 2]
    assert step_dirs(ckpt) == ({2}, set()) and not (tmp_path / ".tedjax.lock").exists()
    COUNTS["write_failure_one_line"] += 1


def test_a_signal_during_the_final_save_ends_in_one_line(trainers, monkeypatch, tmp_path, capsys):
    """Issue 20 item 16: SIGINT while the final checkpoint was being written raised KeyboardInterrupt (the
    signal handler was already gone). Now the save finishes, and the run ends as a clean stop."""
    from tedjax.checkpoint import Checkpointer as RealCheckpointer

    monkeypatch.setattr(tedjax.loop, "Trainer", trainers)
    real_wait, sent = RealCheckpointer.wait, []

    def wait(self):
        if not sent:  # the first wait is the final save's (no signal stopped the loop)
            sent.append(os.getpid())
            os.kill(os.getpid(), signal.SIGINT)
        return real_wait(self)

    monkeypatch.setattr(RealCheckpointer, "wait", wait)
    COUNTS["signal_tried"] += 1
    try:
        rc = _load_train_module().main(["--config", TINY_YAML, *TINY, *ENDINGS, f"log.dir={tmp_path}"])
    except KeyboardInterrupt:
        pytest.fail("SIGINT during the final save raised KeyboardInterrupt")
    out, err = capsys.readouterr()
    ckpt = tmp_path / "checkpoints"
    assert rc == 0 and sent and not err.strip(), err
    assert (f"received signal {int(signal.SIGINT)} while finishing: the run completed and checkpoint step 4 in "
            f"{ckpt} is complete") in out
    assert out.strip().splitlines()[-1] == "stopped by signal; checkpoint step 4 saved"
    assert step_dirs(ckpt) == ({2, 4}, set()) and ckpt_lib.verify_step(ckpt / "4") == []
    COUNTS["signal_survived"] += 1


# =========================================================================== bad input

# Every config field must be refused out of range, or be listed here with the reason it has no range.
OUT_OF_RANGE = {
    "steps": 0, "seed": -1, "max_bad_steps": 0,
    "model.vocab_size": 0, "model.d_model": 0, "model.n_layers": 0, "model.n_heads": 0, "model.d_ff": 0,
    "model.max_len": 0, "model.num_experts": -1, "model.expert_d_ff": 0, "model.top_k": 0,
    "model.capacity_factor": 0.0, "model.eval_capacity_factor": -1.0, "model.min_capacity": -1,
    "model.moe_every": 0, "model.group_size": -1, "model.activation": "relu", "model.dtype": "float16",
    "model.aux_loss_weight": -0.1, "model.z_loss_weight": -0.1, "model.jitter_eps": 1.5, "model.remat": "sometimes",
    "model.rope_base": 0.0, "model.capacity_scope": "everywhere", "model.router_bias_rate": -0.1,
    "model.remote_bias_rate": -0.1, "model.device_aux_loss_weight": -1.0,
    "model.n_kv_heads": -1, "model.head_dim": -1, "model.norm_eps": 0.0, "model.attention": "flash", "init_from": "somewhere",
    "balance.every": -1, "balance.margin": 1.5, "balance.shadow_every": 0, "balance.matmul_tflops": -1.0,
    "balance.link_gbytes_per_s": -1.0, "model.a2a_chunks": 0, "model.shadow_experts": -1,
    "mesh.data": 0, "mesh.expert": 0, "mesh.tensor": 0, "mesh.stage": 0, "mesh.node_size": -1,
    "model.a2a": "ring", "model.remote_fraction": 1.5,
    "pipeline.microbatches": -1, "pipeline.repeats": 0, "pipeline.schedule": "1f1b",
    "optimizer.learning_rate": 0.0, "optimizer.min_lr_ratio": 1.5, "optimizer.warmup_steps": -1,
    "optimizer.weight_decay": -0.1, "optimizer.b1": 1.0, "optimizer.b2": -0.5, "optimizer.eps": 0.0,
    "optimizer.grad_clip": -1.0, "optimizer.tile_size": -1, "optimizer.zero": 4,
    "data.source": "web", "data.seq_len": 0, "data.batch_size": 0, "data.grad_accum": 0, "data.seed": -1,
    "data.stdlib_max_bytes": 0,
    "checkpoint.every": -1, "checkpoint.keep": 0,
    "log.dir": "", "log.every": 0, "log.eval_every": -1, "log.eval_batches": 0, "log.peak_tflops": -1.0,
    "xla.all_reduce_combine_bytes": -1, "xla.reduce_scatter_combine_bytes": -1, "xla.all_gather_combine_bytes": -1,
    "xla.combine_count": -1,
    "model.rope_scaling": "ntk", "model.rope_factor": 0.0, "model.rope_original_max_len": -1,
    "model.rope_beta_fast": -1.0, "model.rope_beta_slow": -1.0, "model.rope_attention_factor": -1.0,
    "model.sliding_window": -1, "model.vocab_multiple": 0, "model.dropless_buffer_factor": -1.0, "model.bos_token_id": -2, "model.eos_token_id": [-1],
    "model.pad_token_id": -2,
    "optimizer.schedule": "step", "optimizer.decay_fraction": 1.5, "optimizer.state_dtype": "float16",
    "log.profile_steps": [3, 1], "log.wandb.mode": "sometimes", "xla.gpu_profile": "fast",
}  # fmt: skip
NO_RANGE = {
    "model.dtd": "a switch", "model.qk_norm": "a switch", "model.router_renormalize": "a switch (None = top_k > 1)",
    "optimizer.zero1": "a switch", "checkpoint.async_save": "a switch",
    "log.tensorboard": "a switch", "log.progress": "a switch", "mesh.auto": "a switch (the planner picks the sizes)", "xla.cpu_all_reduce_combiner": "a switch",
    "data.path": "a path, checked when the run starts (see the token-directory cases below)",
    "checkpoint.dir": "a path ('' = <log.dir>/checkpoints), checked when the run starts",
    "model.rope_truncate": "a switch", "model.scan_layers": "a switch (a Python loop over the same stacked layers)",
    "log.wandb.project": "a name ('' = off)", "log.wandb.name": "a name ('' = wandb picks one)",
    "balance.cluster": "a path ('' = measured rates), checked when the run starts",
}  # fmt: skip


def config_fields() -> list[tuple[type, str, str, object]]:
    """(dataclass, dotted path, field name, default) of every scalar field of TrainConfig, nested ones included."""
    out = []

    def walk(cls, prefix):
        default = cls()
        for field in dataclasses.fields(cls):
            value = getattr(default, field.name)
            if dataclasses.is_dataclass(value):
                walk(type(value), f"{prefix}{field.name}.")
            else:
                out.append((cls, prefix + field.name, field.name, value))

    walk(TrainConfig, "")
    return out


FIELDS = config_fields()


def test_every_config_field_is_covered():
    paths = {path for _, path, _, _ in FIELDS}
    assert len(paths) > 50
    assert not set(OUT_OF_RANGE) & set(NO_RANGE)
    assert paths == set(OUT_OF_RANGE) | set(NO_RANGE), (
        f"classify new fields: {sorted(paths - set(OUT_OF_RANGE) - set(NO_RANGE))}; "
        f"stale entries: {sorted((set(OUT_OF_RANGE) | set(NO_RANGE)) - paths)}"
    )


def wrong_type(default):
    if isinstance(default, bool):
        return "maybe"
    if isinstance(default, int):
        return 2.5
    if isinstance(default, float):
        return "abc"
    return 7  # a string field given a number


def _as_override(path, value) -> str:
    return f"{path}={value}"


def _check_refused(path, value, make):
    COUNTS["bad_input_tried"] += 1
    with pytest.raises(ValueError) as info:
        make()
    message = str(info.value)
    assert re.search(rf"(^|[^\w.]){re.escape(path)}\b", message), message  # names the key
    assert "must" in message and repr(value) in message, message  # says what is wanted and what it got
    COUNTS["bad_input_rejected"] += 1


@pytest.mark.parametrize("cls, path, name, default", FIELDS, ids=[f[1] for f in FIELDS])
def test_config_field_refused(cls, path, name, default, compiles):
    bad_values = [wrong_type(default)] + ([OUT_OF_RANGE[path]] if path in OUT_OF_RANGE else [])
    for value in bad_values:
        # from YAML / the command line
        _check_refused(path, value, lambda: load_config(TINY_YAML, [*TINY, _as_override(path, value)]))
        # from Python
        _check_refused(path, value, lambda: cls(**{name: value}))
    assert compiles == []


FLOAT_FIELDS = [f for f in FIELDS if isinstance(f[3], float)]


@pytest.mark.parametrize("cls, path, name, default", FLOAT_FIELDS, ids=[f[1] for f in FLOAT_FIELDS])
def test_non_finite_float_field_refused(cls, path, name, default, compiles):
    """Issue 20 item 10: nan passes every range check written as a comparison, and inf every lower bound;
    a learning rate of nan trained NaN weights. Every float field refuses nan, inf and -inf by name."""
    assert len(FLOAT_FIELDS) >= 19
    for value, text in ((float("nan"), "nan"), (float("inf"), "inf"), (float("-inf"), "-.inf")):
        COUNTS["bad_input_tried"] += 1
        with pytest.raises(ValueError, match=rf"^{re.escape(path)} must be a finite number, got {value!r}$"):
            load_config(TINY_YAML, [*TINY, f"{path}={text}"])
        with pytest.raises(ValueError, match=rf"^{re.escape(path)} must be a finite number"):
            cls(**{name: value})
        COUNTS["bad_input_rejected"] += 1
    assert compiles == []


# ---------------------------------------------------------------- run-level bad input (in process)


def write_tokens(d: Path, train, val=None, vocab: int = 256) -> Path:
    d.mkdir(parents=True)
    train = np.asarray(train, np.uint16)
    val = train[:40] if val is None else np.asarray(val, np.uint16)
    train.tofile(d / "train.bin")
    val.tofile(d / "val.bin")
    meta = {"vocab_size": vocab, "dtype": "uint16", "n_train_tokens": int(train.size), "n_val_tokens": int(val.size)}
    (d / "meta.json").write_text(json.dumps(meta))
    return d


@pytest.fixture(scope="module")
def saved_run(tmp_path_factory):
    """A run directory holding one real checkpoint (step 2) of the tiny model, made in process."""
    log_dir = tmp_path_factory.mktemp("saved") / "run"
    config = tiny_config(log_dir, "steps=4", "checkpoint.every=2")
    trainer = Trainer(config, make_mesh(2, 2, 2))
    checkpointer = Checkpointer(config, resume=False)
    checkpointer.save(2, trainer.init_state(), {"step": 2}, force=True)
    checkpointer.close()
    return log_dir


RUN_CASES = {
    # mesh
    "mesh product is not the device count": (["mesh.data=1"], "mesh (data=1, expert=2, tensor=2) needs 4 devices "
                                             "but 8 are given (cpu); choose sizes whose product is 8"),
    "more devices than present": (["mesh.data=4"], "needs 16 devices but 8 are given (cpu); choose sizes whose "
                                  "product is 8 or run on CPU with "
                                  "XLA_FLAGS=--xla_force_host_platform_device_count=16"),
    "experts not divisible": (["mesh.data=1", "mesh.expert=8", "mesh.tensor=1"],
                              "num_experts=4 is not divisible by the expert axis (8); choose mesh.expert dividing "
                              "num_experts"),
    "heads not divisible": (["mesh.data=2", "mesh.expert=1", "mesh.tensor=4"],
                            "n_heads=2 is not divisible by the tensor axis (4); choose mesh.tensor dividing n_heads"),
    "d_ff not divisible": (["model.n_heads=4", "model.d_ff=66", "mesh.data=2", "mesh.expert=1", "mesh.tensor=4"],
                           "d_ff=66 is not divisible by the tensor axis (4)"),
    "batch not divisible": (["data.batch_size=6"], "batch size 6 is not divisible by data x expert = 4; use a "
                            "multiple of 4"),
    # token files
    "data directory missing": (["data.source=tokens", "data.path={tmp}/nowhere"],
                               "token directory '{tmp}/nowhere' does not exist; create it with `python -m tedjax.data "
                               "prepare"),
    "train file empty": (["data.source=tokens", "data.path={empty}"], "train.bin' is empty (0 tokens); prepare it "
                         "from more text"),
    "shorter than one sequence": (["data.source=tokens", "data.path={short}"], "has 20 tokens, too short for one "
                                  "sequence of seq_len=32 (needs seq_len + 1 = 33)"),
    "token id >= vocab_size": (["data.source=tokens", "data.path={big_id}"], "holds token id 300 but vocab_size is "
                               "256 (ids must be < 256)"),
    "data vocabulary larger than the model's": (["data.source=tokens", "data.path={big_vocab}"],
                                                "use vocab_size 512 but model.vocab_size=256; set model.vocab_size "
                                                ">= 512"),
    # output directories
    "log.dir under a regular file": (["log.dir={tmp}/a_file/run"], "cannot create {tmp}/a_file/run: {tmp}/a_file is "
                                     "a file, not a directory; set log.dir to a directory path"),
    "checkpoint.dir in /proc": (["checkpoint.dir=/proc/tedjax/ckpt"], "cannot write under /proc (No such file or "
                                "directory); set checkpoint.dir (or log.dir) to a writable directory"),
    "log.dir in /proc": (["log.dir=/proc/tedjax"], "cannot write under /proc"),
    "metrics.jsonl unwritable (a directory)": (["log.dir={tmp}/mdir"], "cannot write {tmp}/mdir/metrics.jsonl (Is a "
                                               "directory); move it aside or make it a writable file"),
    # checkpoint directories (a real saved run; see the `saved_run` fixture)
    "steps exist, no --resume": (["log.dir={saved}"], "checkpoint directory {saved}/checkpoints already holds steps "
                                 "[2]; nothing was changed. Pass --resume to continue that run, or set checkpoint.dir"),
    "another model's directory": (["log.dir={saved}", "model.d_model=64", "--resume"],
                                  "checkpoint directory {saved}/checkpoints holds a different model (d_model: saved 32 "
                                  "vs config 64); nothing was changed. Use a new checkpoint.dir"),
    "another model's directory, no --resume": (["log.dir={saved}", "model.num_experts=8"],
                                               "holds a different model (num_experts: saved 4 vs config 8)"),
    "truncated checkpoint": (["log.dir={damaged}", "--resume"], "no checkpoint step in {damaged}/checkpoints verifies "
                             "(step 2: state/d/"),
}  # fmt: skip


@pytest.fixture
def bad_inputs(tmp_path, saved_run):
    """The files the cases name: token directories, a regular file, copies of the saved run."""
    import shutil

    paths = {"tmp": tmp_path}
    paths["empty"] = write_tokens(tmp_path / "empty", [], val=np.arange(40))
    paths["short"] = write_tokens(tmp_path / "short", np.arange(20))
    big = np.arange(4000) % 256
    big[3999] = 300  # at the very end: the scan must read it all
    paths["big_id"] = write_tokens(tmp_path / "big_id", big)
    paths["big_vocab"] = write_tokens(tmp_path / "big_vocab", np.arange(4000) % 256, vocab=512)
    (tmp_path / "a_file").write_text("not a directory")
    (tmp_path / "mdir" / "metrics.jsonl").mkdir(parents=True)
    paths["saved"] = tmp_path / "saved"
    shutil.copytree(saved_run, paths["saved"])
    paths["damaged"] = tmp_path / "damaged"
    shutil.copytree(saved_run, paths["damaged"])
    data_file = max((paths["damaged"] / "checkpoints" / "2" / "state" / "d").iterdir(), key=lambda p: p.stat().st_size)
    os.truncate(data_file, data_file.stat().st_size // 2)
    return paths


@pytest.mark.parametrize("case", list(RUN_CASES))
def test_run_refuses_before_compiling_or_writing(case, bad_inputs, compiles, monkeypatch):
    overrides, message = RUN_CASES[case]
    fill = lambda s: s.format(**bad_inputs)  # noqa: E731
    resume = "--resume" in overrides
    overrides = [fill(o) for o in overrides if o != "--resume"]
    if not any(o.startswith("log.dir=") for o in overrides):
        overrides.append(f"log.dir={bad_inputs['tmp']}/run")
    config = load_config(TINY_YAML, [*TINY, "steps=4", "checkpoint.every=2", *overrides])
    before = snapshot(bad_inputs["tmp"])
    # anything past the checks would compile: make that loud too
    monkeypatch.setattr(Trainer, "init_state", lambda self: pytest.fail("reached init_state"))
    COUNTS["bad_input_tried"] += 1
    with pytest.raises((ValueError, FileNotFoundError)) as info:
        run(config, resume=resume)
    assert fill(message) in str(info.value), str(info.value)
    assert compiles == [], compiles
    assert snapshot(bad_inputs["tmp"]) == before  # nothing written, nothing overwritten
    COUNTS["bad_input_rejected"] += 1


def test_run_accepts_the_good_token_directory(tmp_path, compiles, monkeypatch):
    """Control for the token cases: a good directory passes every check and reaches init_state."""
    good = write_tokens(tmp_path / "good", np.arange(4000) % 256)
    config = tiny_config(tmp_path / "run", "data.source=tokens", f"data.path={good}", "steps=4")

    class Reached(Exception):
        pass

    monkeypatch.setattr(Trainer, "init_state", lambda self: (_ for _ in ()).throw(Reached()))
    with pytest.raises(Reached):
        run(config)
    assert compiles == []


@pytest.mark.parametrize(
    "overrides, message, subprocess_run",
    [
        (["mesh.data=4"], "error: mesh (data=4, expert=2, tensor=2) needs 16 devices but 8 are given", True),
        # (train.py's main in this process: the exit status and stderr train.py passes on, one launch fewer)
        (["data.source=tokens", "data.path={big_id}"], "holds token id 300 but vocab_size is 256", False),
    ],
    ids=["mesh", "token ids"],
)
def test_cli_exits_2_with_the_error_line(overrides, message, subprocess_run, bad_inputs, capsys):
    COUNTS["bad_input_tried"] += 1
    log_dir = bad_inputs["tmp"] / "cli"
    argv = ["--config", TINY_YAML, *TINY, f"log.dir={log_dir}", *[o.format(**bad_inputs) for o in overrides]]
    if subprocess_run:
        proc = subprocess.run([sys.executable, str(REPO / "train.py"), *argv], cwd=REPO, capture_output=True,
                              text=True, timeout=300, env=dict(os.environ))  # fmt: skip
        returncode, stderr = proc.returncode, proc.stderr
    else:
        returncode, stderr = _load_train_module().main(argv), capsys.readouterr().err
    assert returncode == 2, stderr[-3000:]
    lines = stderr.strip().splitlines()
    assert lines[-1].startswith("error: ") and message in lines[-1], stderr[-3000:]
    assert "Traceback" not in stderr
    assert not log_dir.exists()
    COUNTS["bad_input_rejected"] += 1


# =========================================================================== routing under stress, whole MoE layer


@pytest.mark.parametrize("min_capacity, group", [(0, 16), (8, 4)], ids=["capacity<group", "group<capacity"])
def test_moe_layer_finite_under_extreme_routing(min_capacity, group):
    """Forward and backward of the MoE layer stay finite and count drops exactly for degenerate routers.

    Tokens are positive (x = 1 + noise), so a router column of +10 sends every token to that expert.
    """
    E, D, F, B, L = 4, 16, 32, 2, 16
    moe = tedjax.MoE(D, E, F, top_k=1, capacity_factor=1.0, min_capacity=min_capacity, group_size=group,
                     rngs=nnx.Rngs(0))  # fmt: skip
    graphdef, params, rest = nnx.split(moe, nnx.Param, ...)  # rest: non-trained state (placement, counters)
    params = nnx.to_pure_dict(params)
    x = jnp.asarray(1.0 + 0.1 * np.random.default_rng(0).random((B, L, D)), jnp.float32)

    @jax.jit
    def forward_backward(params, x):
        def loss(params, x):
            out, stats = nnx.merge(graphdef, params, rest)(x)
            return jnp.sum(out**2) + stats.aux_loss + stats.z_loss, (out, stats)

        (value, (out, stats)), grads = jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)(params, x)
        return value, out, stats, grads

    router = np.asarray(params["router"])
    one_hot = np.zeros_like(router)
    one_hot[:, 2] = 10.0
    capacity = max(min_capacity, -(-group // E))  # ceil(cf * S / E), at least min_capacity
    kept = min(capacity, group) / group  # everyone on one expert: it keeps `capacity` of each group
    cases = {
        "all tokens to one expert": (one_hot, 1 - kept),
        "all logits equal": (np.zeros_like(router), 1 - kept),  # ties go to expert 0
        "huge logits": (router * 1e4, None),
        "tiny logits": (router * 1e-8, None),
    }
    for name, (weights, dropped) in cases.items():
        p = dict(params, router=jnp.asarray(weights, jnp.float32))
        value, out, stats, grads = forward_backward(p, x)
        leaves = [value, out, *jax.tree.leaves(stats), *jax.tree.leaves(grads)]
        assert all(bool(jnp.all(jnp.isfinite(v))) for v in leaves), name
        if dropped is not None:
            assert float(stats.dropped_fraction) == pytest.approx(dropped, abs=1e-6), name
            load = np.zeros(E)
            load[2 if name.startswith("all tokens") else 0] = 1.0
            np.testing.assert_allclose(np.asarray(stats.expert_load), load, atol=1e-6)
