"""Orbax checkpoints of the train state, the data position and the run's model.

Each checkpoint step holds two items: `state` (the TrainState: parameters,
optimizer state, step counters; sharded arrays) and `meta` (JSON: the data
iterator's position, the model config, the mesh). Orbax writes a step to a
temporary directory and renames it when complete, so a crash mid-save never
leaves a step that looks complete; `latest_step` only sees finished ones.

Restoring takes the target's shardings, so a checkpoint saved on one mesh
(say (2, 2, 2)) restores onto another ((1, 4, 2)) by resharding on read.
"""

from __future__ import annotations

import dataclasses
import json
import os
import tempfile
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp

from tedjax.config import ModelConfig, TrainConfig

# Fields that fix parameter shapes: a checkpoint must agree on all of them.
SHAPE_FIELDS = ("vocab_size", "d_model", "n_layers", "n_heads", "d_ff", "num_experts", "expert_d_ff",
                "moe_every", "activation", "top_k")  # fmt: skip
RUN_FILE = "tedjax_run.json"


class CheckpointError(ValueError):
    """A checkpoint directory that cannot be used as asked; the message says how to fix it."""


def check_writable(path: str | Path, key: str) -> None:
    """Raise CheckpointError unless `path` is, or can be made, a writable directory; leaves nothing behind.

    Creates (and at once removes) a temporary file in the nearest existing
    directory, since permission bits say nothing when running as root.
    """
    path = Path(path).absolute()
    existing = next(p for p in (path, *path.parents) if p.exists())
    if not existing.is_dir():
        raise CheckpointError(f"cannot create {path}: {existing} is a file, not a directory; "
                              f"set {key} to a directory path")
    try:
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as err:
        raise CheckpointError(f"cannot write under {existing} ({err.strerror}); "
                              f"set {key} to a writable directory") from None


def _brief(err: Exception) -> str:
    """The first line of an orbax / tensorstore error, without the multi-kilobyte spec dumps."""
    text = str(err).split(" [tensorstore_spec")[0].strip().splitlines()
    text = text[0] if text else ""
    return f"{type(err).__name__}: {text[:300]}{'...' if len(text) > 300 else ''}"


def model_signature(model: ModelConfig) -> dict[str, Any]:
    fields = dataclasses.asdict(model)
    sig = {k: fields[k] for k in SHAPE_FIELDS}
    if not model.num_experts:
        sig.pop("top_k")
    return sig


class Checkpointer:
    """Saves and restores TrainStates for one run directory."""

    def __init__(self, config: TrainConfig, *, resume: bool):
        self.config = config
        self.directory = Path(config.checkpoint_dir).absolute()
        self._check_directory(resume)
        options = ocp.CheckpointManagerOptions(
            max_to_keep=config.checkpoint.keep,
            enable_async_checkpointing=config.checkpoint.async_save,
            cleanup_tmp_directories=True,
            create=True,
        )
        self.manager = ocp.CheckpointManager(self.directory, options=options, item_names=("state", "meta"))
        self._write_run_file()

    def _check_directory(self, resume: bool) -> None:
        """Refuse, before anything is compiled or written, to mix runs or overwrite one."""
        d = self.directory
        if d.exists() and not d.is_dir():
            raise CheckpointError(f"checkpoint path {d} is a file, not a directory; set checkpoint.dir to a directory")
        check_writable(d, "checkpoint.dir (or log.dir)")
        steps = self.existing_steps()
        run_file = d / RUN_FILE
        if run_file.exists():
            try:
                saved = json.loads(run_file.read_text())["model"]
            except (ValueError, KeyError) as err:
                raise CheckpointError(f"{run_file} is corrupt ({err}); move the directory aside or set checkpoint.dir") from None
            mine = model_signature(self.config.model)
            theirs = {k: saved.get(k) for k in mine}
            if theirs != mine:
                diff = ", ".join(f"{k}: saved {theirs[k]!r} vs config {mine[k]!r}" for k in mine if theirs[k] != mine[k])
                raise CheckpointError(
                    f"checkpoint directory {d} holds a different model ({diff}); nothing was changed. "
                    "Use a new checkpoint.dir (or log.dir), or the config that wrote it"
                )
        if steps and not resume:
            raise CheckpointError(
                f"checkpoint directory {d} already holds steps {steps}; nothing was changed. "
                "Pass --resume to continue that run, or set checkpoint.dir / log.dir to a new directory"
            )

    def existing_steps(self) -> list[int]:
        if not self.directory.is_dir():
            return []
        return sorted(int(p.name) for p in self.directory.iterdir() if p.is_dir() and p.name.isdigit())

    def _write_run_file(self) -> None:
        if jax.process_index() != 0:
            return
        path = self.directory / RUN_FILE
        text = json.dumps({"model": dataclasses.asdict(self.config.model)}, indent=1)
        if path.exists() and path.read_text() == text:
            return  # resuming: leave the file (and its mtime) as it is
        tmp = path.with_suffix(".tmp")
        tmp.write_text(text)
        os.replace(tmp, path)

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state, data_state: dict, *, force: bool = False) -> bool:
        """Start saving (asynchronously when configured); returns whether a save began."""
        meta = {"data": data_state, "step": int(step), "model": dataclasses.asdict(self.config.model),
                "mesh": dataclasses.asdict(self.config.mesh)}  # fmt: skip
        args = ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta))
        return self.manager.save(step, args=args, force=force)

    def restore(self, abstract_state, step: int | None = None):
        """(state, meta) of `step` (default: the newest complete one), resharded to `abstract_state`."""
        step = self.latest_step() if step is None else step
        if step is None:
            raise CheckpointError(f"no complete checkpoint in {self.directory}")
        try:
            meta = self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
        except Exception as err:  # orbax raises many types for damaged files
            raise CheckpointError(
                f"checkpoint step {step} in {self.directory} cannot be read ({_brief(err)}); "
                f"delete {self.directory / str(step)} to resume from the previous step"
            ) from err
        saved = model_signature(ModelConfig(**meta["model"]))
        if saved != model_signature(self.config.model):
            raise CheckpointError(f"checkpoint step {step} in {self.directory} holds a different model: {saved}")
        try:
            restored = self.manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state)))
        except Exception as err:
            raise CheckpointError(
                f"checkpoint step {step} in {self.directory} is damaged ({_brief(err)}); "
                f"delete {self.directory / str(step)} to resume from the previous step"
            ) from err
        return restored["state"], meta

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()
