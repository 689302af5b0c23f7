"""The training loop around the pure step: data, evaluation, checkpoints, logging, signals.

`run(config)` is what `train.py` calls; notebooks call it directly.
"""

from __future__ import annotations

import dataclasses
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding

from tedjax import data as data_lib
from tedjax.checkpoint import Checkpointer, check_writable
from tedjax.config import TrainConfig, check_mesh
from tedjax.logs import MetricsLogger, detect_peak_tflops, to_python
from tedjax.mesh import logical_to_spec, make_mesh
from tedjax.trainer import Trainer, TrainState


class TrainingStopped(RuntimeError):
    """Training stopped on purpose (too many non-finite steps); the message says why and what to do."""


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
        if d.source == "synthetic":
            self.train = self.val = None
            self._synthetic_seed = d.seed
            return
        directory = data_lib.ensure_stdlib_corpus(max_bytes=d.stdlib_max_bytes) if d.source == "stdlib" else Path(d.path)
        train_file = data_lib.TokenFile(directory, "train", seq_len=d.seq_len)
        val_file = data_lib.TokenFile(directory, "val", seq_len=d.seq_len)
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


def run(config: TrainConfig, *, resume: bool = False, mesh=None, stop_after: int | None = None) -> RunResult:
    """Train `config` to `config.steps` (or `stop_after` more steps); returns the final state and losses."""
    mesh = mesh or make_mesh(config.mesh.data, config.mesh.expert, config.mesh.tensor)
    check_mesh(config.model, mesh, config.data.micro_batch_size, config.data.seq_len)
    if config.data.batch_size % jax.process_count():
        raise ValueError(f"data.batch_size={config.data.batch_size} must divide evenly over {jax.process_count()} processes")
    if jax.process_index() == 0:
        check_writable(config.log.dir, "log.dir")
    batches = Batches(config)  # validates token files before anything is written or compiled
    checkpointer = Checkpointer(config, resume=resume)  # refuses a wrong directory before compiling
    try:
        trainer = Trainer(config, mesh)
        start_step, last_checkpoint = 0, checkpointer.latest_step() if resume else None
        if resume and last_checkpoint is not None:
            state, meta = checkpointer.restore(trainer.abstract_state(), last_checkpoint)
            start_step = int(meta["step"])
        else:
            state = trainer.init_state()
    except BaseException:
        checkpointer.close()  # lets orbax's background threads finish before the error propagates
        raise
    logger = MetricsLogger(config.log.dir, total_steps=config.steps, start_step=start_step,
                           tensorboard=config.log.tensorboard, progress=config.log.progress)  # fmt: skip
    if resume:
        logger.message(f"resumed from checkpoint step {last_checkpoint} in {checkpointer.directory}"
                       if last_checkpoint is not None else
                       f"--resume: no checkpoint in {checkpointer.directory} yet, starting from step 0")

    tokens_per_step = config.data.batch_size * config.data.seq_len
    flops_per_step = config.model.flops_per_token(config.data.seq_len) * tokens_per_step
    peak = config.log.peak_tflops or detect_peak_tflops()
    n_devices = mesh.size
    end_step = config.steps if stop_after is None else min(config.steps, start_step + stop_after)

    train_losses, eval_losses = {}, {}
    pending: list[tuple[int, dict]] = []  # metrics fetched one step late, keeping the device busy
    window_start, window_steps = time.perf_counter(), 0
    stopped_by_signal = False

    def drain(keep_last: bool):
        nonlocal window_start, window_steps
        while len(pending) > (1 if keep_last else 0):
            step_done, metrics = pending.pop(0)
            bad = int(metrics["bad_steps"])
            loss = float(metrics["loss"])
            train_losses[step_done] = loss
            if bad >= config.max_bad_steps:
                raise TrainingStopped(
                    f"{bad} consecutive steps (up to step {step_done}) had a non-finite loss or gradient and were "
                    f"skipped; stopping. The last good checkpoint is step {checkpointer.latest_step()} in "
                    f"{checkpointer.directory}. Lower optimizer.learning_rate, check the data, or raise max_bad_steps"
                )
            if step_done % config.log.every == 0 or step_done == end_step:
                jax.block_until_ready(metrics)
                elapsed = time.perf_counter() - window_start
                record = to_python({k: v for k, v in metrics.items() if k != "bad_steps"})
                tokens_per_s = tokens_per_step * window_steps / max(elapsed, 1e-9)
                tflops = flops_per_step * window_steps / max(elapsed, 1e-9) / n_devices / 1e12
                record.update(tokens_per_s=tokens_per_s, tflops_per_device=tflops,
                              skipped_steps=int(metrics["skipped_total"]))
                if peak:
                    record["mfu"] = tflops / peak
                record.pop("skipped_total", None)
                logger.log(step_done, record)
                window_start, window_steps = time.perf_counter(), 0

    def stop_requested(step_done: int) -> bool:
        """A signal arrived. With several processes all must stop at the same step (saving is a
        collective), so they agree every log.every steps: stop if any process got one."""
        if jax.process_count() == 1:
            return signals.received is not None
        if step_done % config.log.every:
            return False
        return bool(np.any(multihost_utils.process_allgather(np.int32(signals.received is not None))))

    try:
        with _SignalFlag() as signals, jax.set_mesh(mesh):
            for step in range(start_step, end_step):
                batch = trainer.shard_batch(batches.train_batch(step))
                state, metrics = trainer.train_step(state, batch)
                pending.append((step + 1, metrics))
                window_steps += 1
                drain(keep_last=True)
                logger.advance()
                done = step + 1
                if config.log.eval_every and done % config.log.eval_every == 0 and done != end_step:
                    drain(keep_last=False)
                    eval_losses[done] = evaluate(trainer, state, batches)["lm_loss"]
                    logger.log(done, {"lm_loss": eval_losses[done]}, kind="eval")
                if config.checkpoint.every and done % config.checkpoint.every == 0:
                    drain(keep_last=False)
                    checkpointer.save(done, state, {"step": done})
                    last_checkpoint = done
                if stop_requested(done):
                    drain(keep_last=False)
                    if last_checkpoint != done:  # (orbax refuses to save a step twice)
                        checkpointer.save(done, state, {"step": done}, force=True)
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
                    checkpointer.save(done, state, {"step": done}, force=True)
                    last_checkpoint = done
        checkpointer.wait()
        baseline = batches.unigram_baseline
        if eval_losses:
            final = f"final val loss {eval_losses[max(eval_losses)]:.4f} nats/token"
            logger.message(final + (f" (unigram baseline {baseline:.4f})" if baseline else ""))
    finally:
        checkpointer.close()
        logger.close()
    return RunResult(state, trainer, train_losses, eval_losses, stopped_by_signal, last_checkpoint, baseline)
