"""Two runs in one log.dir (issue 20 item 11): the second is refused naming the first's host and PID; a lock
left by a killed run is stale, and the next run takes it over. Nothing here compiles."""

from __future__ import annotations

import json
import os
import signal
import socket
import warnings
from pathlib import Path

import pytest
from reference import TINY_RUN_OVERRIDES

from tedjax.checkpoint import CheckpointError
from tedjax.config import load_config
from tedjax.loop import LOCK_FILE, RunLock, run
from tedjax.trainer import Trainer

REPO = Path(__file__).resolve().parents[1]


def hold_lock(directory: Path) -> int:
    """A forked process that takes the run lock on `directory` and waits to be killed; returns its PID.

    (Forked rather than started: it only runs RunLock, and skips a second interpreter importing jax.)"""
    read_end, write_end = os.pipe()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # jax's note that forking a multithreaded process is unsafe
        pid = os.fork()
    if pid == 0:  # the child: lock, report, wait for SIGKILL; never returns into pytest
        try:
            os.close(read_end)
            RunLock(directory).acquire()
            os.write(write_end, b"locked")
            signal.pause()
        finally:
            os._exit(1)
    os.close(write_end)
    assert os.read(read_end, 16) == b"locked"
    os.close(read_end)
    return pid


class Reached(Exception):
    """The run got past every check to init_state (where it would compile)."""


def config(log_dir, *extra):
    return load_config(str(REPO / "configs" / "tiny.yaml"), [*TINY_RUN_OVERRIDES, "steps=4", f"log.dir={log_dir}", *extra])


def snapshot(root: Path) -> dict:
    return {p.relative_to(root).as_posix(): (p.read_bytes() if p.is_file() else "dir") for p in sorted(root.rglob("*"))}


def test_a_second_run_is_refused_and_a_killed_runs_lock_is_taken_over(tmp_path, monkeypatch):
    log_dir = tmp_path / "run"
    holder = hold_lock(log_dir)
    try:
        (log_dir / "metrics.jsonl").write_text('{"the": "first run"}\n')
        before = snapshot(tmp_path)
        monkeypatch.setattr(Trainer, "init_state", lambda self: pytest.fail("the second run reached init_state"))
        with pytest.raises(CheckpointError) as info:
            run(config(log_dir))
        assert str(info.value).startswith(
            f"{log_dir} is in use by another tedjax run (pid {holder} on host {socket.gethostname()}, since "
        ), info.value
        assert "nothing was changed" in str(info.value) and "set log.dir" in str(info.value)
        assert snapshot(tmp_path) == before
    finally:
        os.kill(holder, signal.SIGKILL)  # dies holding the lock: its file stays, naming it
        os.waitpid(holder, 0)
    assert json.loads((log_dir / LOCK_FILE).read_text())["pid"] == holder

    seen = []

    def init_state(self):
        seen.append(json.loads((log_dir / LOCK_FILE).read_text()))
        with pytest.raises(CheckpointError, match=f"pid {os.getpid()} on host"):  # held for the whole run
            RunLock(log_dir).acquire()
        raise Reached

    monkeypatch.setattr(Trainer, "init_state", init_state)
    with pytest.raises(Reached):
        run(config(log_dir))
    assert seen[0]["pid"] == os.getpid()
    assert not (log_dir / LOCK_FILE).exists()  # released when the run ended, even by an error


def test_stale_lock_is_reported_and_released_locks_leave_nothing(tmp_path):
    first = RunLock(tmp_path / "a" / "b").acquire()
    assert (tmp_path / "a" / "b" / LOCK_FILE).exists() and first.stale is None
    with pytest.raises(CheckpointError, match=rf"in use by another tedjax run \(pid {os.getpid()} on host "):
        RunLock(tmp_path / "a" / "b").acquire()
    first.release()
    assert not (tmp_path / "a").exists()  # the directories made for the lock, empty again, are gone
    # a lock file whose process is gone (the kernel dropped its flock): taken over, with a note
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / LOCK_FILE).write_text(json.dumps({"host": "node7", "pid": 4242, "started": "then"}))
    lock = RunLock(tmp_path / "c").acquire()
    try:
        assert "was left by pid 4242 on host node7 (since then), which no longer holds it" in lock.note()
    finally:
        lock.release()
    assert (tmp_path / "c").is_dir() and not (tmp_path / "c" / LOCK_FILE).exists()


def test_checkpoint_dir_elsewhere_is_locked_too(tmp_path):
    ckpt = tmp_path / "shared_ckpt"
    lock = RunLock(ckpt).acquire()
    try:
        with pytest.raises(CheckpointError, match=f"{ckpt} is in use by another tedjax run"):
            run(config(tmp_path / "other", f"checkpoint.dir={ckpt}"))
        assert not (tmp_path / "other").exists()
    finally:
        lock.release()
