"""The training loop around the pure step: data, evaluation, checkpoints, logging, signals.

`run(config)` is what `train.py` calls; notebooks call it directly.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import fcntl
import json
import logging
import os
import re
import signal
import socket
import time
import traceback
from collections.abc import Iterable, Iterator
from pathlib import Path

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding

from tedjax import data as data_lib
from tedjax.checkpoint import Checkpointer, CheckpointError, check_writable
from tedjax.config import TrainConfig, check_mesh, resolve_dtype
from tedjax.logs import SUPERSEDED, MetricsLogger, detect_peak_tflops, require_wandb, to_python
from tedjax.mesh import expert_nodes, logical_to_spec, make_mesh, mesh_shape
from tedjax.trainer import Trainer, TrainState


class TrainingStopped(RuntimeError):
    """Training stopped on purpose (too many non-finite steps); the message says why and what to do."""


class WriteFailed(TrainingStopped):
    """Writing the run's files failed mid-run (disk full, quota, permissions): one line naming the file,
    what is intact, and how to go on; the orbax tracebacks behind it are not printed."""


@dataclasses.dataclass
class RunResult:
    state: TrainState
    trainer: Trainer
    train_losses: dict[int, float]  # step -> loss (every step, fetched lazily)
    eval_losses: dict[int, float]  # step -> validation LM loss
    stopped_by_signal: bool
    last_checkpoint: int | None
    unigram_baseline: float | None


class Batches:
    """Train and validation batches for the configured source, resumable by step."""

    def __init__(self, config: TrainConfig):
        d = config.data
        self.config = config
        self.unigram_baseline = None
        self.fingerprint: str | None = None  # of the token files (data.corpus_fingerprint); a resume compares it
        if d.source == "synthetic":
            self.train = self.val = None
            self._synthetic_seed = d.seed
            return
        directory = data_lib.ensure_stdlib_corpus(max_bytes=d.stdlib_max_bytes) if d.source == "stdlib" else Path(d.path)
        # prepare verified every byte; a start checks sizes and a cheap fingerprint, not the whole corpus
        train_file = data_lib.TokenFile(directory, "train", seq_len=d.seq_len, verify="fingerprint")
        val_file = data_lib.TokenFile(directory, "val", seq_len=d.seq_len, verify="fingerprint")
        for name, tf in (("train", train_file), ("val", val_file)):
            if tf.vocab_size > config.model.vocab_size:
                raise ValueError(
                    f"{name} tokens in {directory} use vocab_size {tf.vocab_size} but model.vocab_size="
                    f"{config.model.vocab_size}; set model.vocab_size >= {tf.vocab_size}"
                )
        self.train = data_lib.BatchIterator(train_file.tokens, d.batch_size, d.seq_len, d.seed,
                                            process_index=jax.process_index(), process_count=jax.process_count())
        self.val = data_lib.BatchIterator(val_file.tokens, d.micro_batch_size, d.seq_len, d.seed, shuffle=False,
                                          process_index=jax.process_index(), process_count=jax.process_count())
        self.unigram_baseline = train_file.meta.get("unigram_entropy_train")
        self.fingerprint = data_lib.corpus_fingerprint(directory)

    def train_batch(self, step: int) -> dict[str, np.ndarray]:
        d = self.config.data
        if self.train is None:
            rows = d.batch_size // jax.process_count()
            batch = next(data_lib.synthetic_batches(self.config.model.vocab_size, d.batch_size, d.seq_len,
                                                    seed=hash((self._synthetic_seed, step)) % 2**31))
            start = jax.process_index() * rows
            return {k: v[start:start + rows] for k, v in batch.items()}
        return self.train.batch(step)

    def val_batches(self) -> Iterator[dict[str, np.ndarray]]:
        d = self.config.data
        n = self.config.log.eval_batches
        if self.val is None:
            rows = d.micro_batch_size // jax.process_count()
            start = jax.process_index() * rows  # this process's rows, as in train_batch
            for i in range(n):
                batch = next(data_lib.synthetic_batches(self.config.model.vocab_size, d.micro_batch_size, d.seq_len,
                                                        seed=10_000 + i))
                yield {k: v[start:start + rows] for k, v in batch.items()}
            return
        for i in range(min(n, max(1, self.val.n_windows // d.micro_batch_size))):
            yield self.val.batch(i)


def evaluate(trainer: Trainer, state: TrainState, batches: Batches) -> dict:
    sharding = NamedSharding(trainer.mesh, logical_to_spec(("batch", None)))
    results = []
    with jax.set_mesh(trainer.mesh):
        for local in batches.val_batches():
            global_shape = lambda x: (x.shape[0] * jax.process_count(), *x.shape[1:])  # noqa: E731
            batch = {k: jax.make_array_from_process_local_data(sharding, v, global_shape(v)) for k, v in local.items()}
            results.append(to_python(trainer.eval_step(state.params, state.model_state, batch)))
    summary = {k: float(np.mean([r[k] for r in results])) for k in ("lm_loss", "loss")}
    if "dropped_fraction" in results[0]:
        summary["dropped_fraction"] = np.mean([r["dropped_fraction"] for r in results], axis=0).tolist()
    return summary


class _SignalFlag:
    """SIGTERM / SIGINT set a flag; the loop saves a checkpoint and returns cleanly."""

    def __init__(self):
        self.received: int | None = None
        self._previous = {}

    def __enter__(self):
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread (e.g. some notebook kernels)
                pass
        return self

    def _handle(self, signum, frame):
        self.received = signum

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def _announce(logger: MetricsLogger, config: TrainConfig, mesh, checkpointer: Checkpointer, start_step: int,
              config_file: str | None, trainer: Trainer) -> None:
    """Where everything goes, printed once at the start (process 0), and the run's `start` record."""
    counts = config.model.param_counts()
    model = config.model
    experts = (f"{model.num_experts} experts, top-{model.top_k}, in {model.n_moe_layers} of {model.n_layers} layers"
               if model.num_experts else f"dense, {model.n_layers} layers")  # fmt: skip
    ckpt = (f"every {config.checkpoint.every} steps, keep {config.checkpoint.keep}" if config.checkpoint.every
            else "only on a signal")  # fmt: skip
    log_dir = Path(config.log.dir)
    lines = [
        f"tedjax run: config {config_file or '(built in Python)'}; steps {start_step} -> {config.steps}",
        (f"  mesh {f'stage={config.mesh.stage} x ' if config.mesh.stage > 1 else ''}data={config.mesh.data} x "
         f"expert={config.mesh.expert} x tensor={config.mesh.tensor} on "
         f"{mesh.size} {mesh.devices.flat[0].platform} devices in {jax.process_count()} process"
         f"{'es' if jax.process_count() > 1 else ''}"),
        f"  model {experts}: {counts['total']:,} parameters, {counts['active']:,} active per token",
        f"  metrics     {log_dir / 'metrics.jsonl'}",
        f"  tensorboard {log_dir / 'tensorboard' if config.log.tensorboard else 'off (log.tensorboard=false)'}",
        f"  checkpoints {checkpointer.directory} ({ckpt})",
        *([f"  profile     {log_dir / 'profile'} (steps {config.log.profile_steps[0]}.."
           f"{config.log.profile_steps[1] - 1})"] if config.log.profile_steps else []),
        *([f"  wandb       project {config.log.wandb.project} ({config.log.wandb.mode}, under {log_dir / 'wandb'})"]
          if config.log.wandb.project else []),
        *checkpointer.notes,
        *_balance_lines(config, mesh, trainer),
    ]
    if logger.superseded:
        lines.append(f"  moved {logger.superseded} records of steps after {start_step} (from the run this one "
                     f"replaces) to {log_dir / SUPERSEDED}")
    logger.message("\n".join(lines))
    logger.log(start_step, {"config_file": config_file, "resumed": checkpointer.resume_step is not None,
                            "xla_flags": os.environ.get("XLA_FLAGS", ""), "compute_dtype": resolve_dtype(model.dtype),
                            "changes": [str(c) for c in checkpointer.changes], "config": config.to_dict()},
               kind="start")  # fmt: skip


class StepProfiler:
    """A jax.profiler trace of steps [start, stop) (log.profile_steps) in `directory`; off when `steps` is empty.

    Steps are 0-based indices (step i makes the record of step i + 1 in metrics.jsonl). Each traced step
    is a StepTraceAnnotation (the profile tool's step view); the trace stops once step stop - 1 has
    finished on the device, so it holds whole steps. The MoE layer's named scopes
    (moe_route, moe_dispatch, moe_experts, moe_combine, moe_shadows) name its ops in the trace.
    """

    def __init__(self, steps: tuple[int, ...], directory: Path, logger: MetricsLogger):
        self.start, self.stop = steps if steps else (-1, -1)
        self.directory, self.logger, self.active = directory, logger, False

    def before(self, step: int) -> None:
        if not self.active and self.start <= step < self.stop:  # a resumed run starts inside the range
            self.directory.mkdir(parents=True, exist_ok=True)
            jax.profiler.start_trace(str(self.directory))
            self.active = True

    def annotate(self, step: int):
        return jax.profiler.StepTraceAnnotation("train", step_num=step) if self.active else contextlib.nullcontext()

    def after(self, step: int, state) -> float:
        """Stops the trace after its last step; returns the seconds that took (kept out of tokens/s)."""
        if not (self.active and step + 1 >= self.stop):
            return 0.0
        jax.block_until_ready(state)
        begin = time.perf_counter()
        self.close()
        self.logger.message(f"profile of steps {self.start}..{self.stop - 1} (the records of steps {self.start + 1}.."
                            f"{self.stop}) written to {self.directory} (open it with: xprof --logdir "
                            f"{self.directory}, or TensorBoard's profile tab)")
        return time.perf_counter() - begin

    def close(self) -> None:
        if self.active:
            self.active = False
            jax.profiler.stop_trace()
def _balance_lines(config: TrainConfig, mesh, trainer: Trainer) -> list[str]:
    """The start banner's load-balance lines: the shadow cost model's rates and where they came from, and a
    warning for each switch that cannot act on this mesh."""
    from tedjax import balance

    lines = []
    if config.model.shadow_experts:
        policy = ("FasterMoE's cost model" if config.model.capacity_scope == "dropless" else
                  "the drops they save, where copying costs less than keeping the same choices by the pools,")
        lines.append(f"  shadows     up to {config.model.shadow_experts} per MoE layer, chosen every "
                     f"{config.balance.shadow_every} steps by {policy} at {trainer.balance_rates().describe()}")
    if config.balance.every:
        lines.append(f"  placement   every {config.balance.every} steps, adopted when the largest device load "
                     f"drops by >= {config.balance.margin:.0%} and the layer time it saves over {config.balance.every} "
                     f"steps exceeds its move's, at {trainer.balance_rates().describe()}")
    warnings = balance.cannot_act(config, int(mesh.shape["expert"]))
    nodes, m = expert_nodes(mesh_shape(mesh), trainer.node_size), config.model  # across nodes (issue 24)
    if nodes > 1:
        lines.append(f"  nodes       {trainer.node_size} devices each, the expert axis spans {nodes}: remote_fraction "
                     f"{m.remote_fraction}, {m.a2a} all-to-all")
    elif m.num_experts and (m.remote_fraction < 1 or m.a2a != "flat"):
        warnings.append(f"model.remote_fraction={m.remote_fraction} and model.a2a={m.a2a} act only when the expert "
                        f"axis spans nodes, and a node of {trainer.node_size} devices holds all of it here; set "
                        "mesh.node_size below expert x tensor (simulated nodes) or leave them at 1.0 / flat")
    return lines + [f"  warning: {w}" for w in warnings]


def _router_losses_per_layer(record: dict, n_moe_layers: int) -> None:
    """The loss's router terms are sums over MoE layers; log the mean per layer (aux 1.0 = balanced) instead."""
    for key in ("aux_loss", "z_loss"):
        value = record.pop(key, None)
        if value is None or not n_moe_layers:
            continue
        if isinstance(value, list):  # already per layer
            record[f"{key}_by_layer"] = value
            value = sum(value)
        record[f"{key}_per_layer"] = value / n_moe_layers


def _init_from(trainer: Trainer, state: TrainState, directory: str) -> TrainState:
    """The fresh state with a Hugging Face checkpoint's parameters (AdamW's moments start at zero either way).

    The random parameters are freed first, so the peak is one copy of the model.
    """
    from tedjax import hf

    for leaf in jax.tree.leaves(state.params):
        leaf.delete()
    params = hf.load_params(directory, trainer.config.model, trainer.param_shardings)
    return dataclasses.replace(state, params=trainer.stored_units(params))  # (the circular schedule's order)


def _check_metrics_file(path: Path) -> None:
    """An existing metrics.jsonl must open for appending (a directory there, a read-only file): before compiling."""
    if not (path.exists() or path.is_symlink()):
        return  # the directory is writable (check_writable); the logger creates the file
    try:
        with open(path, "a"):
            pass
    except OSError as err:
        raise CheckpointError(f"cannot write {path} ({err.strerror}); move it aside or make it a writable file, "
                              "or set log.dir to another directory") from None


def _close(checkpointer: Checkpointer, logger: MetricsLogger | None) -> None:
    """Close both, the logger even when the checkpointer's close fails (the first error propagates)."""
    try:
        checkpointer.close()
    finally:
        if logger is not None:
            logger.close()


def _last_good(checkpointer: Checkpointer) -> str:
    """Where the newest checkpoint is (the loop saves only finite states), for a message."""
    step = checkpointer.latest_step()
    if step is None:
        return f"No checkpoint was saved in {checkpointer.directory}."
    return f"The last good checkpoint is step {step} in {checkpointer.directory}."


def _rebalance(trainer: Trainer, state: TrainState, step: int, logger: MetricsLogger) -> TrainState:
    """Shadow and placement decisions (tedjax.balance): each one, adopted or not, is a record (kind "shadows" or
    "placement") and a line, with its reasons (shadow lines only at log steps when decisions come more often)."""
    from tedjax import balance

    state, done = trainer.rebalance(state, step)
    shadows = done["shadows"]
    if shadows:
        rates = trainer.balance_rates()
        logger.log(step, {"layers": [d.layer for d in shadows], "shadow_ids": [d.ids.tolist() for d in shadows],
                          "chosen": "; ".join(f"L{d.layer}: {list(d.chosen) if d.chosen else 'none'}" for d in shadows),
                          "num_shadows": [len(d.chosen) for d in shadows], "changed": [d.changed for d in shadows],
                          "predicted_latency_s": [d.latency_s for d in shadows],
                          "predicted_latency_with_shadows_s": [d.with_shadows_s for d in shadows],
                          "predicted_latency_one_more_s": [d.one_more_s for d in shadows],
                          # the drop policy's reasons (static capacity; null under the latency policy)
                          "policy": "latency" if shadows[0].saved is None else "drops",
                          "predicted_saved_fraction": [d.saved for d in shadows],
                          "predicted_copy_s": [d.copy_s for d in shadows],
                          "predicted_keep_s": [d.keep_s for d in shadows],
                          "matmul_tflops": rates.matmul_tflops, "link_gbytes_per_s": rates.link_gbytes_per_s,
                          "rates_source": rates.source}, kind="shadows")  # fmt: skip
        every, log_every = trainer.config.balance.shadow_every, trainer.config.log.every
        if every >= log_every or step % log_every == 0:  # decisions more often than lines: the line at log steps
            logger.message(balance.describe_shadows(step, shadows))
    placement = done["placement"]
    if placement:
        logger.log(step, {"layers": [d.layer for d in placement], "adopted": [d.adopted for d in placement],
                          "old_max_device_load": [d.old_max_load for d in placement],
                          "new_max_device_load": [d.new_max_load for d in placement],
                          "experts_moved": [d.experts_moved if d.adopted else 0 for d in placement],
                          "predicted_gain_s_per_step": [d.gain_s for d in placement],
                          "move_s": done["move_s"], "window_steps": trainer.config.balance.every,
                          "move_bytes_per_device": done["move_bytes"],
                          "bytes_sent_per_device": trainer.move_bytes()}, kind="placement")  # fmt: skip
        logger.message(balance.describe_placement(step, placement, trainer.config.balance.margin,
                                                  sum(trainer.move_bytes().values()), trainer.config.balance.every,
                                                  done["move_s"]))
    return state


LOCK_FILE = ".tedjax.lock"


class RunLock:
    """An exclusive `flock` on a run directory, so two runs never write one log.dir (checkpoints, metrics).

    The lock file records the holder's host, PID and start time, for the refusal. The kernel releases a
    flock when its process dies, so a lock file left by a killed run is stale by construction: the next
    run takes it over and says so. On NFS, Linux maps flock to NFS byte-range locks (NFSv4: a crashed
    client's lock lapses with its lease). Only process 0 of a multi-process run locks.
    """

    def __init__(self, directory: str | Path):
        self.directory = Path(directory).absolute()
        self.path = self.directory / LOCK_FILE
        self.fd: int | None = None
        self.stale: dict | None = None  # the holder a killed run left in the file
        self._created: list[Path] = []  # directories made for the lock, removed again if they stay empty

    def acquire(self) -> RunLock:
        """Take the lock, or raise CheckpointError naming the run that holds it."""
        self._created = [p for p in (self.directory, *self.directory.parents) if not p.exists()]
        self.directory.mkdir(parents=True, exist_ok=True)
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = _lock_holder(fd)
                os.close(fd)
                self._remove_created()
                who = (f"pid {holder.get('pid')} on host {holder.get('host')}, since {holder.get('started')}"
                       if holder else "a process that has not yet recorded itself")  # fmt: skip
                raise CheckpointError(
                    f"{self.directory} is in use by another tedjax run ({who}; lock file {self.path}); nothing "
                    "was changed. Wait for that run to end (or stop it), or set log.dir / checkpoint.dir to "
                    "another directory"
                ) from None
            try:  # the holder may have removed the file between our open and our lock: lock the file there now
                current = os.stat(self.path).st_ino
            except FileNotFoundError:
                current = None
            if current == os.fstat(fd).st_ino:
                break
            os.close(fd)
        self.stale = _lock_holder(fd) or None
        record = {"host": socket.gethostname(), "pid": os.getpid(), "started": time.strftime("%Y-%m-%dT%H:%M:%S")}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(record).encode(), 0)
        self.fd = fd
        return self

    def note(self) -> str | None:
        """What to tell the user about a stale lock taken over, if any."""
        if not self.stale:
            return None
        return (f"  lock {self.path} was left by pid {self.stale.get('pid')} on host {self.stale.get('host')} "
                f"(since {self.stale.get('started')}), which no longer holds it (killed?); this run took it over")

    def release(self) -> None:
        if self.fd is None:
            return
        try:
            os.unlink(self.path)  # before unlocking: a run that opened it meanwhile retries on the new file
        except FileNotFoundError:
            pass
        os.close(self.fd)
        self.fd = None
        self._remove_created()

    def _remove_created(self) -> None:
        for directory in self._created:  # deepest first; only directories left empty
            try:
                directory.rmdir()
            except OSError:
                break


def _lock_holder(fd: int) -> dict:
    try:
        holder = json.loads(os.pread(fd, 4096, 0) or b"{}")
    except ValueError:
        return {}
    return holder if isinstance(holder, dict) else {}


def _lock_run(config: TrainConfig) -> list[RunLock]:
    """Locks on log.dir and on checkpoint.dir when it lies elsewhere (process 0 only; [] elsewhere)."""
    if jax.process_index() != 0:
        return []
    log_dir = Path(config.log.dir).absolute()
    directories = [(log_dir, "log.dir")]
    checkpoint_dir = Path(config.checkpoint_dir).absolute()
    if log_dir not in (checkpoint_dir, *checkpoint_dir.parents):
        directories.append((checkpoint_dir, "checkpoint.dir (or log.dir)"))
    locks: list[RunLock] = []
    try:
        for directory, key in directories:
            check_writable(directory, key)
            locks.append(RunLock(directory).acquire())
    except BaseException:
        for lock in reversed(locks):
            lock.release()
        raise
    return locks


def run(config: TrainConfig, *, resume: bool = False, allow_change: Iterable[str] = (), mesh=None,
        stop_after: int | None = None, config_file: str | None = None) -> RunResult:
    """Train `config` to `config.steps` (or `stop_after` more steps); returns the final state and losses.

    `resume` continues from the newest checkpoint that verifies; a config change that alters results is
    refused unless its dotted key is in `allow_change` (see tedjax/checkpoint.py). `config_file` is only
    printed and recorded. The run holds an exclusive lock on its log.dir (RunLock) from start to end.
    """
    locks = _lock_run(config)
    progress: dict = {"step": None}  # the last step trained, for a failure's message
    for name in _NOISY_LOGGERS:
        logging.getLogger(name).addFilter(_QUIET)
    failed = False
    try:
        return _run(config, resume=resume, allow_change=allow_change, mesh=mesh, stop_after=stop_after,
                    config_file=config_file, lock_notes=[n for n in (lock.note() for lock in locks) if n],
                    progress=progress)
    except Exception as err:
        failure = _write_failure(err)
        # before training, only a full disk is a write failure (a permission error may be a read's)
        if failure is None or (progress["step"] is None and failure[0] not in _FULL):
            raise
        failed = _QUIET.failed = True
        raise WriteFailed(_write_failure_message(config, progress["step"], *failure)) from None
    finally:
        if not failed:  # after a failure orbax's abandoned writes report it again until the process exits
            for name in _NOISY_LOGGERS:
                logging.getLogger(name).removeFilter(_QUIET)
        for lock in reversed(locks):
            lock.release()


_FULL = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)
# errno values that mean the run's files cannot be written, and what to do about each
_WRITE_ERRORS = {
    errno.ENOSPC: ("the disk is full", "free space (or set log.dir / checkpoint.dir elsewhere)"),
    errno.EDQUOT: ("the disk quota is exceeded", "free space or raise the quota"),
    errno.EFBIG: ("a file reached the file-size limit", "raise the limit (ulimit -f)"),
    errno.EROFS: ("the file system is read-only", "make log.dir and checkpoint.dir writable"),
    errno.EACCES: ("permission was denied", "make log.dir and checkpoint.dir writable"),
    errno.EPERM: ("permission was denied", "make log.dir and checkpoint.dir writable"),
    errno.EIO: ("the disk reported an I/O error", "check the disk"),
}


def _write_failure(err: BaseException | None) -> tuple[int, str | None] | None:
    """(errno, file) when `err`, or an error in its chain, is a failed write; orbax and the checksum thread
    report them as text ("[os_error_code='28']", "[Errno 28]"), so that is read too."""
    seen, stack = set(), [err]
    while stack:
        e = stack.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno in _WRITE_ERRORS:
            return e.errno, e.filename or _file_written_in(e)
        text = str(e)
        code = re.search(r"\[Errno (\d+)\]|os_error_code='(\d+)'", text)
        if code and int(code.group(1) or code.group(2)) in _WRITE_ERRORS:
            path = re.search(r'Failed writing: "([^"]+)"|\] [^:]*: \'([^\']+)\'', text)
            return int(code.group(1) or code.group(2)), path and (path.group(1) or path.group(2))
        stack += [e.__cause__, e.__context__]
    return None


def _file_written_in(err: BaseException) -> str | None:
    """The file a buffered write failed on (flush names none): the metrics file, when the logger wrote it."""
    for frame, _ in traceback.walk_tb(err.__traceback__):
        jsonl = getattr(frame.f_locals.get("self"), "jsonl", None)
        if jsonl is not None:
            return jsonl.name
    return None


def _write_failure_message(config: TrainConfig, step: int | None, code: int, path: str | None) -> str:
    what, fix = _WRITE_ERRORS[code]
    directory = Path(config.checkpoint_dir).absolute()
    saved = sorted(int(p.name) for p in directory.iterdir() if p.is_dir() and p.name.isdigit()) if (
        directory.is_dir()) else []  # fmt: skip
    kept = f"checkpoint step {saved[-1]} in {directory} is complete" if saved else f"no checkpoint was saved in {directory}"
    at = f"at step {step}" if step is not None else "before the first step"
    return (f"{at}: {what} ({os.strerror(code)} writing {path or 'the run files'}); stopping. Nothing written before "
            f"is lost: {kept}, and metrics.jsonl holds every step logged. {fix[0].upper()}{fix[1:]}, then "
            "continue with --resume")


class _QuietWriteFailures(logging.Filter):
    """Drops orbax's reports of a failed write from its threads and tasks (absl and asyncio ERROR records
    with tracebacks, hundreds of lines when the disk is full): the run stops on it with one line
    (WriteFailed). After such a failure, also the reports of orbax's writes cut off by the exit."""

    failed = False

    def filter(self, record: logging.LogRecord) -> bool:
        err = record.exc_info[1] if record.exc_info else None
        text = f"{record.getMessage()} {err}"
        if _write_failure(err) is not None or _write_failure(RuntimeError(text)) is not None:
            self.failed = True
            return False
        return not (self.failed and "cannot schedule new futures after shutdown" in text)


_QUIET = _QuietWriteFailures()
_NOISY_LOGGERS = ("absl", "asyncio")


def _run(config: TrainConfig, *, resume: bool, allow_change: Iterable[str], mesh, stop_after: int | None,
         config_file: str | None, lock_notes: list[str], progress: dict) -> RunResult:
    if mesh is None and config.mesh.auto:  # mesh: auto -> the planner's best plan for these devices
        from tedjax.plan import auto_config

        config = auto_config(config)
    mesh = mesh or make_mesh(config.mesh.data, config.mesh.expert, config.mesh.tensor, stage=config.mesh.stage)
    check_mesh(config.model, mesh, config.data.micro_batch_size, config.data.seq_len)
    if config.balance.cluster:  # a wrong cluster preset is refused before anything is written or compiled
        from tedjax.plan import Cluster

        Cluster.load(config.balance.cluster)
    if config.data.batch_size % jax.process_count():
        raise ValueError(f"data.batch_size={config.data.batch_size} must divide evenly over {jax.process_count()} processes")
    if jax.process_index() == 0:
        check_writable(config.log.dir, "log.dir")
        if config.log.wandb.project:
            require_wandb()
    batches = Batches(config)  # validates token files before anything is written or compiled
    if config.init_from:  # checks the Hugging Face files against the model (no weight read) before compiling
        from tedjax import hf

        hf.check_checkpoint(config.init_from[3:], config.model)
    if jax.process_index() == 0:
        _check_metrics_file(Path(config.log.dir) / "metrics.jsonl")
    # Refuses a wrong directory or a silent config change, and verifies checksums, before compiling.
    checkpointer = Checkpointer(config, resume=resume, allow_change=allow_change, data_fingerprint=batches.fingerprint)
    checkpointer.notes[:0] = lock_notes
    start_step = last_checkpoint = checkpointer.resume_step
    start_step = start_step or 0
    end_step = config.steps if stop_after is None else min(config.steps, start_step + stop_after)
    try:
        trainer = Trainer(config, mesh)
        state = checkpointer.restore(trainer.abstract_state())[0] if last_checkpoint is not None else trainer.init_state()
        if last_checkpoint is None and config.init_from:
            state = _init_from(trainer, state, config.init_from[3:])
    except BaseException:
        checkpointer.close()  # lets orbax's background threads finish before the error propagates
        raise
    if start_step >= end_step:  # e.g. a finished run resumed again: train, evaluate, save and log nothing
        checkpointer.close()
        if jax.process_index() == 0:
            print(*checkpointer.notes, sep="\n", flush=True)
            print(f"checkpoint step {start_step} in {checkpointer.directory} already reaches "
                  f"{f'steps={config.steps}' if start_step >= config.steps else f'stop_after={stop_after}'}: "
                  "nothing to do; nothing was changed (raise steps to train on)", flush=True)
        return RunResult(state, trainer, {}, {}, False, last_checkpoint, batches.unigram_baseline)
    logger = None
    try:
        checkpointer.begin(start_step)
        wb = config.log.wandb
        logger = MetricsLogger(config.log.dir, total_steps=config.steps, start_step=start_step,
                               tensorboard=config.log.tensorboard, progress=config.log.progress,
                               wandb=dict(project=wb.project, name=wb.name, mode=wb.mode, config=config.to_dict())
                               if wb.project else None)  # fmt: skip
        _announce(logger, config, mesh, checkpointer, start_step, config_file, trainer)
        if config.init_from and config.model.num_experts:  # the capacity the import routes with; a warning if it drops
            from tedjax import hf

            logger.message(hf.capacity_note(config.model, config.data.seq_len, mesh.shape["expert"]))
        if resume:
            logger.message(f"resumed from checkpoint step {last_checkpoint} in {checkpointer.directory}"
                           if last_checkpoint is not None else
                           f"--resume: no checkpoint in {checkpointer.directory} yet, starting from step 0")
    except BaseException:
        _close(checkpointer, logger)
        raise
    progress["step"] = start_step

    tokens_per_step = config.data.batch_size * config.data.seq_len
    flops_per_step = config.model.flops_per_token(config.data.seq_len) * tokens_per_step
    peak = config.log.peak_tflops or detect_peak_tflops(dtype=resolve_dtype(config.model.dtype))
    n_devices = mesh.size

    train_losses, eval_losses = {}, {}
    pending: list[tuple[int, dict]] = []  # metrics fetched one step late, keeping the device busy
    window_start, window_from = time.perf_counter(), start_step  # the window: steps after window_from
    stopped_by_signal = False
    # each train record shows the shadows its step used (int [n_moe, R], E = empty), kept on the host
    shadows_now = trainer.shadow_ids(state).tolist() if config.model.shadow_experts else None

    def save(step_done: int, force: bool = False) -> None:
        """Saves the current state, never a non-finite one (loaded non-finite weights, or a step the tiled
        optimizer could not undo: the untiled step skips a non-finite update itself)."""
        if not bool(trainer.params_finite(state)):
            raise TrainingStopped(
                f"the parameters after step {step_done} are not finite (non-finite weights loaded, or an update the "
                f"tiled optimizer could not undo); stopping without saving them. {_last_good(checkpointer)} Lower "
                "optimizer.learning_rate or check the loaded weights"
            )
        checkpointer.save(step_done, state, {"step": step_done}, force=force)

    def drain(keep_last: bool):
        nonlocal window_start, window_from
        while len(pending) > (1 if keep_last else 0):
            step_done, metrics = pending.pop(0)
            bad = int(metrics["bad_steps"])
            loss = float(metrics["loss"])
            train_losses[step_done] = loss
            if bad >= config.max_bad_steps:
                raise TrainingStopped(
                    f"{bad} consecutive steps (up to step {step_done}) had a non-finite loss, gradient or update and "
                    f"were skipped; stopping. {_last_good(checkpointer)} Lower optimizer.learning_rate, check the "
                    "data, or raise max_bad_steps"
                )
            if step_done % config.log.every == 0 or step_done == end_step:
                jax.block_until_ready(metrics)
                elapsed, window_steps = time.perf_counter() - window_start, step_done - window_from
                record = to_python({k: v for k, v in metrics.items() if k != "bad_steps"})
                tokens_per_s = tokens_per_step * window_steps / max(elapsed, 1e-9)
                tflops = flops_per_step * window_steps / max(elapsed, 1e-9) / n_devices / 1e12
                record.update(tokens_per_s=tokens_per_s, tflops_per_device=tflops,
                              seconds_per_step=elapsed / window_steps,
                              skipped_steps=int(metrics["skipped_total"]))
                if peak:
                    record["mfu"] = tflops / peak
                record.pop("skipped_total", None)
                _router_losses_per_layer(record, config.model.n_moe_layers)
                logger.log(step_done, record)
                window_start, window_from = time.perf_counter(), step_done

    def stop_requested(step_done: int) -> bool:
        """A signal arrived. With several processes all must stop at the same step (saving is a
        collective), so they agree every log.every steps: stop if any process got one."""
        if jax.process_count() == 1:
            return signals.received is not None
        if step_done % config.log.every:
            return False
        return bool(np.any(multihost_utils.process_allgather(np.int32(signals.received is not None))))

    profile_dir = Path(config.log.dir) / "profile"
    if jax.process_count() > 1:  # the trace files are named by host, and processes may share one
        profile_dir = profile_dir / f"process_{jax.process_index()}"
    profiler = StepProfiler(config.log.profile_steps, profile_dir, logger)
    try:
        with _SignalFlag() as signals, jax.set_mesh(mesh):
            for step in range(start_step, end_step):
                batch = trainer.shard_batch(batches.train_batch(step))
                profiler.before(step)
                with profiler.annotate(step):
                    state, metrics = trainer.train_step(state, batch)
                window_start += profiler.after(step, state)  # writing the trace is not training time
                pending.append((step + 1, metrics if shadows_now is None else dict(metrics, shadow_ids=shadows_now)))
                drain(keep_last=True)
                logger.advance()
                done = progress["step"] = step + 1
                if trainer.balance_due(done) and done != end_step:
                    state = _rebalance(trainer, state, done, logger)
                    shadows_now = trainer.shadow_ids(state).tolist() if shadows_now is not None else None
                if config.log.eval_every and done % config.log.eval_every == 0 and done != end_step:
                    drain(keep_last=False)
                    eval_losses[done] = evaluate(trainer, state, batches)["lm_loss"]
                    logger.log(done, {"lm_loss": eval_losses[done]}, kind="eval")
                if config.checkpoint.every and done % config.checkpoint.every == 0:
                    drain(keep_last=False)
                    save(done)
                    last_checkpoint = done
                if stop_requested(done):
                    drain(keep_last=False)
                    if last_checkpoint != done:  # (orbax refuses to save a step twice)
                        save(done, force=True)
                    checkpointer.wait()
                    last_checkpoint = done
                    stopped_by_signal = True
                    where = signals.received or "in another process"
                    logger.message(f"received signal {where}: saved checkpoint step {done} in "
                                   f"{checkpointer.directory}; resume with --resume")
                    break
            drain(keep_last=False)
            if not stopped_by_signal:
                done = end_step
                ev = evaluate(trainer, state, batches)
                eval_losses[done] = ev["lm_loss"]
                logger.log(done, ev, kind="eval")
                if config.checkpoint.every and last_checkpoint != done:
                    save(done, force=True)
                    last_checkpoint = done
            checkpointer.wait()  # still under the signal flag: a SIGINT now lets the final save finish
            signalled = signals.received is not None
            if jax.process_count() > 1 and not stopped_by_signal:  # all are here; a save is collective: agree first
                signalled = bool(np.any(multihost_utils.process_allgather(np.int32(signalled))))
            if signalled and not stopped_by_signal:  # it came during the final evaluation or save
                if last_checkpoint != done:
                    save(done, force=True)
                    checkpointer.wait()
                    last_checkpoint = done
                stopped_by_signal = True
                logger.message(f"received signal {signals.received or 'in another process'} while finishing: the run "
                               f"completed and "
                               f"checkpoint step {done} in {checkpointer.directory} is complete")
        logger.close_bar()  # the finished bar first, then the closing lines below it
        baseline = batches.unigram_baseline
        if eval_losses:
            final = f"final val loss {eval_losses[max(eval_losses)]:.4f} nats/token"
            logger.message(final + (f" (unigram baseline {baseline:.4f})" if baseline else ""))
    finally:
        profiler.close()
        _close(checkpointer, logger)
    return RunResult(state, trainer, train_losses, eval_losses, stopped_by_signal, last_checkpoint, baseline)
