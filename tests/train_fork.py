"""train.py's main, and benchmark scripts, in processes of their own, forked from a server that has already
imported jax, flax, orbax and tedjax.

test_faults starts train.py nine times and kills most of them; a fresh `python train.py` spends about 2 s
of CPU of its ~6 s importing jax, flax, orbax and tedjax. A child forked from multiprocessing's forkserver
(with this module preloaded) starts with those modules loaded and no jax backend yet (the server never
touches a device), then runs train.py's main as the script does: its own process, devices, signal handlers,
stdout/stderr and exit status. Only the imports are skipped. The server inherits the environment of the
process that first starts it (XLA_FLAGS, the persistent compilation cache).
"""

from __future__ import annotations

import importlib.util
import multiprocessing
import os
import runpy
import subprocess
import sys
import tempfile
from pathlib import Path

import jax  # noqa: F401  (no backend is created here: children create their own)

import tedjax.checkpoint  # noqa: F401  (what train.py's main imports)
import tedjax.generation  # noqa: F401
import tedjax.host  # noqa: F401
import tedjax.loop  # noqa: F401

REPO = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("train_cli", REPO / "train.py")
train_cli = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(train_cli)


def _redirect(path: str, *fds: int) -> None:
    """Point the file descriptors `fds` at `path`, truncated (a shell's `> path`)."""
    new = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    for fd in fds:
        os.dup2(new, fd)
    os.close(new)


def _run(argv: list[str], out: str) -> None:
    _redirect(out, 1, 2)  # as `python train.py > out 2>&1`
    os.chdir(REPO)
    sys.exit(train_cli.main(argv))  # multiprocessing turns SystemExit(code) into the exit status


class Forked:
    """The part of subprocess.Popen the tests use, for a forked child."""

    def __init__(self, argv: list[str], out: Path):
        self.process = multiprocessing.get_context("forkserver").Process(target=_run, args=(argv, str(out)))
        self.process.start()
        self.pid = self.process.pid

    def poll(self) -> int | None:
        return self.process.exitcode

    def wait(self, timeout: float | None = None) -> int:
        self.process.join(timeout)
        if self.process.exitcode is None:
            raise subprocess.TimeoutExpired(f"train.py (pid {self.pid})", timeout)
        return self.process.exitcode

    def send_signal(self, sig: int) -> None:
        os.kill(self.pid, sig)

    def kill(self) -> None:
        self.process.kill()


def start(argv: list[str], out: Path) -> Forked:
    """`python train.py *argv > out 2>&1`, forked from the preloaded server (started on first use)."""
    multiprocessing.set_forkserver_preload(["train_fork"])
    return Forked(argv, out)


def _script(script: str, args: list[str], env: dict[str, str], cwd: str, out: str, err: str) -> None:
    os.environ.clear()
    os.environ.update(env)  # before the script sets XLA_FLAGS: XLA reads them when the child makes its devices
    _redirect(out, 1)
    _redirect(err, 2)
    os.chdir(cwd)
    if script.startswith("-m "):  # `python -m module`: the working directory first on the path
        sys.argv = [script[3:], *args]
        sys.path.insert(0, cwd)
        runpy.run_module(script[3:], run_name="__main__", alter_sys=True)
    else:
        sys.argv = [script, *args]
        sys.path.insert(0, os.path.dirname(script))  # as `python script` puts the script's directory first
        runpy.run_path(script, run_name="__main__")  # its sys.exit(code) is the exit status


def run_script(script: str | Path, args: list[str], *, env: dict[str, str] | None = None, cwd: Path = REPO,
               timeout: float = 600) -> subprocess.CompletedProcess:
    """`subprocess.run([sys.executable, script, *args], capture_output=True, text=True)` (`script` "-m name":
    `python -m name`), forked from the preloaded server: the script runs as `__main__` in a process of its own,
    with `env` (default: this process's) set before it starts, so XLA_FLAGS it sets still take effect; only
    the imports are skipped (~2.5 s of CPU per benchmark). The child ends without the interpreter's shutdown:
    what a test checks of a fresh process's exit (tracebacks at shutdown) needs subprocess.run."""
    env = dict(os.environ) if env is None else dict(env)
    with tempfile.TemporaryDirectory(prefix="tedjax-fork-") as tmp:
        out, err = os.path.join(tmp, "stdout"), os.path.join(tmp, "stderr")
        multiprocessing.set_forkserver_preload(["train_fork"])
        process = multiprocessing.get_context("forkserver").Process(
            target=_script, args=(str(script), [str(a) for a in args], env, str(cwd), out, err))
        process.start()
        process.join(timeout)
        if process.exitcode is None:
            process.kill()
            process.join()
            raise subprocess.TimeoutExpired([str(script), *map(str, args)], timeout)
        read = lambda path: Path(path).read_text() if os.path.exists(path) else ""  # noqa: E731
        return subprocess.CompletedProcess([str(script), *map(str, args)], process.exitcode, read(out), read(err))
