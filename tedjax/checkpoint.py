"""Orbax checkpoints of the train state, with checksums, the run's full config and resume guards.

Each checkpoint step holds two items: `state` (the whole TrainState, whatever
leaves it has; sharded arrays) and `meta` (JSON: the data position, the step
and the full TrainConfig that produced it). Orbax writes a step to a temporary
directory and renames it when complete, so a crash mid-save never leaves a
step that looks complete.

Checksums: orbax's OCDBT store has none, so a flipped byte can restore
silently. Once orbax has committed a step, a background thread hashes every
file of it (sha256) into `tedjax_checksums.json` inside the step, off the
training step's critical path. Resuming verifies the newest step first; a
step whose files do not match is moved aside (renamed `damaged-<step>`, never
deleted) and the newest step that verifies is used instead, saying so. A step
folder whose saved step number is not its name (copied or renamed) counts as
damaged. A step without a manifest (the run was killed while hashing it, or an
older tedjax wrote it) is restored unverified, with a note, and hashed once the
run has started from it.

Resume guards: the config saved in the step is compared field by field with
the new one. Fields in `SAFE_CHANGES` (mesh, log.*, checkpoint frequency, ...)
may change and are logged; a larger `steps` is allowed but logged as a change
of results, with the learning rate at the resumed step before and after; fields
that fix the state's shapes (`SHAPE_FIELDS`) can never change; every other
field, including ones added later, changes results and is refused unless named
in `allow_change` (`--allow-change key1,key2`), in which case the run records
it. The token files' fingerprint (tedjax.data.corpus_fingerprint) is saved
too: another corpus at the same `data.path` is a change of `data.path`.

Restoring takes the target's shardings, so a checkpoint saved on one mesh
(say (2, 2, 2)) restores onto another ((1, 4, 2)) by resharding on read.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import queue
import sys
import tempfile
import threading
import time
import warnings
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from orbax.checkpoint._src.metadata import array_metadata_store

from tedjax import __version__
from tedjax import pipeline as pipe
from tedjax.config import TrainConfig, resolve_dtype
from tedjax.model import stack_layers, unstack_layers

RUN_FILE = "tedjax_run.json"  # in the checkpoint directory: the current config and every resume's changes
MANIFEST = "tedjax_checksums.json"  # in each step directory: {relative path: [size, sha256]}
HASH_CHUNK = 8 << 20

# Model fields that fix parameter shapes: a checkpoint can never be resumed with other values.
SHAPE_FIELDS = ("vocab_size", "d_model", "n_layers", "n_heads", "d_ff", "num_experts", "expert_d_ff", "moe_every",
                "activation", "n_kv_heads", "head_dim", "qk_norm", "shadow_experts", "vocab_multiple")  # fmt: skip
SHAPE_REASONS = {"shadow_experts": "fixes the train state's shapes (its shadow-expert slots)",
                 "vocab_multiple": "fixes the embedding's and the head's rows (the padded vocabulary)"}
# Fields that do not change what the run computes, with the reason; all others do (new fields included).
SAFE_CHANGES = {
    "mesh.": "the checkpoint is resharded onto the new mesh on restore",
    "optimizer.zero": "where the state is stored only: restored into the new level's shards",
    "log.": "logging only",
    "model.scan_layers": "the same stacked parameters run by a scan or a loop (the same losses)",
    "checkpoint.every": "checkpoint frequency only",
    "checkpoint.keep": "checkpoint retention only",
    "checkpoint.async_save": "how checkpoints are written only",
    "checkpoint.dir": "the same directory, named another way",
    "max_bad_steps": "only when a run stops",
    "xla.": "collective-combining thresholds: speed only",
    # (pipeline.microbatches stays guarded: no test shows that it leaves results as they are)
    "pipeline.schedule": "checkpoints keep the layers in logical order; a schedule's stage order is made on restore",
    "pipeline.repeats": "checkpoints keep the layers in logical order; a schedule's stage order is made on restore",
}
REASONS = {
    "model.top_k": "changes which experts each token reaches, so results, although parameter shapes allow it",
    "steps": "lowering steps shortens the learning-rate schedule, so every later step changes",
}


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


# ---------------------------------------------------------------- checksums


def _files(step_dir: Path) -> list[Path]:
    return sorted(p for p in step_dir.rglob("*") if p.is_file() and p.name != MANIFEST)


def file_sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def write_manifest(step_dir: str | Path) -> int:
    """Hash every file of a committed step into its manifest (atomically); returns the bytes hashed."""
    step_dir = Path(step_dir)
    files = {p.relative_to(step_dir).as_posix(): [p.stat().st_size, file_sha256(p)] for p in _files(step_dir)}
    # Compact JSON without a trailing newline: any changed byte changes a token, so it cannot verify by luck.
    # The manifest's own digest tells a damaged manifest (say, one hex digit of a file's digest) from a
    # damaged file.
    text = json.dumps({"algorithm": "sha256", "files": files, "self": _manifest_digest(files)}, sort_keys=True,
                      separators=(",", ":"))
    tmp = step_dir / f".{MANIFEST}.tmp-{os.getpid()}"
    tmp.write_text(text)
    os.replace(tmp, step_dir / MANIFEST)
    return sum(size for size, _ in files.values())


def _manifest_digest(files: dict) -> str:
    return hashlib.sha256(json.dumps(files, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def verify_step(step_dir: str | Path) -> list[str] | None:
    """Problems found checking a step against its manifest ([] = verified); None when it has no manifest."""
    step_dir = Path(step_dir)
    path = step_dir / MANIFEST
    if not path.exists():
        return None
    try:
        manifest = json.loads(path.read_bytes())
        files = manifest.get("files") if manifest.get("algorithm") == "sha256" else None
    except (ValueError, AttributeError):  # any damage to the manifest itself
        files = None
    if not isinstance(files, dict):
        return [f"{MANIFEST} is damaged"]
    if "self" in manifest and manifest["self"] != _manifest_digest(files):  # manifests before it had no "self"
        return [f"{MANIFEST} is damaged (its own sha256 does not match)"]
    problems = []
    for name, entry in sorted(files.items()):
        p = step_dir / name
        try:
            size, digest = entry
            if not p.is_file():
                problems.append(f"{name} is missing")
            elif p.stat().st_size != size:
                problems.append(f"{name} has {p.stat().st_size} bytes, {size} when saved")
            elif file_sha256(p) != digest:
                problems.append(f"{name} changed since it was saved (sha256 mismatch)")
        except (TypeError, ValueError):
            problems.append(f"{MANIFEST} is damaged (entry for {name})")
    unlisted = [p.relative_to(step_dir).as_posix() for p in _files(step_dir)
                if p.relative_to(step_dir).as_posix() not in files]  # fmt: skip
    problems += [f"{name} was not there when the step was saved" for name in unlisted]
    return problems


def check_step(step_dir: str | Path) -> list[str] | None:
    """`verify_step`, plus whether the step folder holds that step: a folder copied or renamed from another
    step verifies against its own manifest, and would resume under the wrong step number."""
    step_dir = Path(step_dir)
    problems = verify_step(step_dir)
    try:
        saved = json.loads((step_dir / "meta" / "metadata").read_text()).get("step")
    except (OSError, ValueError, AttributeError):
        saved = None  # unreadable: verify_step (or reading the meta) reports it
    if isinstance(saved, int) and step_dir.name.isdigit() and saved != int(step_dir.name):
        problems = [*(problems or []), f"it holds step {saved}, not step {step_dir.name} (its meta/metadata says "
                                       f"step {saved}: a folder copied or renamed from another step)"]
    return problems


def newest_verified_step(directory: str | Path, steps: list[int], step: int | None = None) -> tuple[int, list[str]]:
    """(the step to read, notes) for a reader that changes nothing (`python -m tedjax.generate`).

    `step` given: it must verify, else CheckpointError. Otherwise the newest step that verifies (or has no
    manifest), as `--resume` picks it, with a note for each newer damaged step and for an unverified one.
    """
    directory = Path(directory)
    notes: list[str] = []
    for candidate in ([step] if step is not None else list(reversed(steps))):
        problems = check_step(directory / str(candidate))
        if problems:
            if step is not None:
                raise CheckpointError(f"checkpoint step {step} in {directory} is damaged ({'; '.join(problems[:3])}"
                                      f"{'; ...' if len(problems) > 3 else ''}); pick another --step of {steps}")
            notes.append(f"checkpoint step {candidate} in {directory} is damaged ({'; '.join(problems[:3])}"
                         f"{'; ...' if len(problems) > 3 else ''}); using an older step")
            continue
        if problems is None:
            notes.append(f"checkpoint step {candidate} has no {MANIFEST}: reading it unverified")
        return candidate, notes
    raise CheckpointError(f"no checkpoint step in {directory} verifies ({'; '.join(notes)}); resume the run, "
                          "which sets damaged steps aside, or train again")


def _state_handler() -> ocp.StandardCheckpointHandler:
    """The `state` item's handler: orbax's standard one, with each array written by one replica on one process.

    Orbax's replica-parallel writes (its default off GPU) split every replicated array between its replicas,
    compiling a slicing program per shape and sharding on a run's first save (112 for the tiny test run: 0.3 s
    of CPU per launch from a warm compilation cache, seconds cold); with one process there is no other host to
    share the writes with. The arrays' values are the same; only the chunking differs, and a restore reads
    either.
    """
    handler = ocp.StandardCheckpointHandler()
    if jax.process_count() > 1 or not isinstance(getattr(handler, "_impl", None), ocp.PyTreeCheckpointHandler):
        return handler  # (an orbax without the attribute keeps its default; tests/test_zero.py notices)
    array = ocp.type_handlers.ArrayHandler(use_replica_parallel=False,
                                           array_metadata_store=array_metadata_store.Store())  # as orbax's default
    registry = ocp.type_handlers.create_type_handler_registry(
        (int, ocp.type_handlers.ScalarHandler()), (float, ocp.type_handlers.ScalarHandler()),
        (np.number, ocp.type_handlers.ScalarHandler()), (np.ndarray, ocp.type_handlers.NumpyHandler()),
        (jax.Array, array))  # every type StandardCheckpointHandler accepts
    handler._impl = ocp.PyTreeCheckpointHandler(save_concurrent_gb=96, restore_concurrent_gb=96, use_ocdbt=True,
                                                  type_handler_registry=registry)  # the standard handler's own
    return handler


class _ManifestWriter:
    """Hashes each saved step on a background thread, once orbax has committed it (renamed it into place)."""

    def __init__(self, directory: Path, manager: ocp.CheckpointManager):
        self.directory, self.manager = directory, manager
        self.queue: queue.Queue = queue.Queue()
        self.thread: threading.Thread | None = None
        self.errors: list[str] = []
        self.bytes_hashed, self.seconds = 0, 0.0

    def add(self, step: int) -> None:
        if self.thread is None:
            self.thread = threading.Thread(target=self._work, name="tedjax-checksums", daemon=True)
            self.thread.start()
        self.queue.put(step)

    def _committed(self, step: int) -> bool:
        final = self.directory / str(step)
        while True:
            saving = self.manager.is_saving_in_progress()  # read before the directory: see below
            if final.exists():
                return True
            if not saving:  # orbax renames before it clears the flag: no directory now means the save failed
                return final.exists()
            time.sleep(0.02)

    def _work(self) -> None:
        while True:
            step = self.queue.get()
            try:
                if step is None:
                    return
                if self._committed(step):
                    start = time.perf_counter()
                    self.bytes_hashed += write_manifest(self.directory / str(step))
                    self.seconds += time.perf_counter() - start
            except FileNotFoundError:
                pass  # rotated away (checkpoint.keep) before it was hashed
            except Exception as err:  # noqa: BLE001 - reported by wait(), never lost in the thread
                self.errors.append(f"step {step}: {type(err).__name__}: {err}")
            finally:
                self.queue.task_done()

    def drain(self) -> None:
        if self.thread is not None:
            self.queue.join()

    def stop(self) -> None:
        if self.thread is not None:
            self.queue.put(None)
            self.thread.join()
            self.thread = None


# ---------------------------------------------------------------- config comparison


def flatten(tree: dict, prefix: str = "") -> dict[str, Any]:
    """{"model": {"top_k": 1}} -> {"model.top_k": 1}."""
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


@dataclasses.dataclass(frozen=True)
class Change:
    key: str  # dotted config key
    saved: Any
    new: Any
    # "safe" (allowed and logged), "change" (changes results, allowed and logged: a longer schedule),
    # "shape" (never allowed), "result" (needs --allow-change)
    kind: str
    reason: str

    def __str__(self) -> str:
        return f"{self.key}: {self.saved!r} -> {self.new!r} ({self.reason})"


def config_changes(saved: dict, config: TrainConfig, step: int | None = None) -> list[Change]:
    """Every field of `config` that differs from the `saved` config dict, classified (see the module docstring).

    A key the saved config lacks (a field added since) counts as its default value. `step`, the step
    resumed, lets a change of `steps` say how the learning rate moves there.
    """
    new, old, default = flatten(config.to_dict()), flatten(saved), flatten(TrainConfig().to_dict())
    for tree in (new, old, default):  # model.dtype auto is the dtype it resolves to here (float32 on CPU)
        tree["model.dtype"] = resolve_dtype(tree.get("model.dtype", "auto"))
    dense = not config.model.num_experts
    shape_keys = {f"model.{k}" for k in SHAPE_FIELDS + (("top_k",) if dense else ())}
    changes = []
    for key, value in new.items():
        before = old.get(key, default.get(key))
        if before == value:
            continue
        safe = next((why for prefix, why in SAFE_CHANGES.items() if key == prefix or key.startswith(prefix)
                     and prefix.endswith(".")), None)  # fmt: skip
        if key in shape_keys:
            change = Change(key, before, value, "shape", SHAPE_REASONS.get(key.removeprefix("model."),
                                                                           "fixes parameter shapes"))
        elif key == "steps" and isinstance(before, int) and value > before:
            # allowed (training longer is what raising steps asks for), but never called safe: the schedule
            # stretches, so the learning rate from the resumed step on differs from the saved run's
            change = Change(key, before, value, "change", f"the learning-rate schedule now spans {value} steps"
                            + _lr_jump(old, default, config, before, step))
        elif safe and key == "mesh.expert" and _expert_axis_drops(config):
            change = Change(key, before, value, "safe", f"{safe}; but with {_expert_axis_drops(config)} the size "
                            'of "expert" changes which tokens are dropped, so later steps differ slightly')
        elif safe:
            change = Change(key, before, value, "safe", safe)
        else:
            change = Change(key, before, value, "result", REASONS.get(key, "changes results"))
        changes.append(change)
    return changes


def _expert_axis_drops(config: TrainConfig) -> str:
    """What makes the token drops depend on the size of "expert": device pools or shadow experts ('' if none)."""
    model = config.model
    reasons = (["device pools (model.capacity_scope=device)"] if model.num_experts and model.capacity_scope == "device"
               else []) + (["shadow experts (model.shadow_experts)"] if model.num_experts and model.shadow_experts else [])
    return " and ".join(reasons)


def learning_rate_at(step: int, optimizer: dict, total_steps: int) -> float:
    """The learning rate of `optimizer` (OptimizerConfig fields; missing ones take their defaults) at `step` of
    a run of `total_steps`: tedjax.optim.learning_rate_schedule itself, evaluated on the host."""
    from tedjax.config import OptimizerConfig
    from tedjax.optim import learning_rate_schedule

    fields = {f.name for f in dataclasses.fields(OptimizerConfig)}
    cfg = OptimizerConfig(**{k: v for k, v in optimizer.items() if k in fields})
    return float(learning_rate_schedule(cfg, total_steps)(step))


def _lr_jump(old: dict, default: dict, config: TrainConfig, saved_steps: int, step: int | None) -> str:
    if step is None:
        return ""
    saved_opt = {key[len("optimizer."):]: old.get(key, value) for key, value in default.items()
                 if key.startswith("optimizer.")}  # the saved run's optimizer (older files lack newer fields)
    before = learning_rate_at(step, saved_opt, saved_steps)
    after = learning_rate_at(step, dataclasses.asdict(config.optimizer), config.steps)
    return f"; the learning rate at step {step} goes from {before:.3g} to {after:.3g}"


def config_keys() -> set[str]:
    return set(flatten(TrainConfig().to_dict()))


# ---------------------------------------------------------------- the damaged-checkpoint noise of tensorstore


def _quiet_closed_event_loop() -> None:
    """When orbax fails to read a damaged checkpoint, the other reads of the same restore fail later, on
    tensorstore's threads: each tries to wake the asyncio loop orbax has already closed (`RuntimeError: Event
    loop is closed`, reported with no object), or ends an orbax read coroutine nobody awaits any more. Python
    prints each as a traceback around the clean error. Drop exactly those (installed once, by restore)."""
    previous = sys.unraisablehook
    if getattr(previous, "_tedjax_filter", False):
        return

    def hook(unraisable):
        err, obj = unraisable.exc_value, unraisable.object
        if isinstance(err, RuntimeError) and str(err) == "Event loop is closed" and obj is None:
            return
        code = getattr(obj, "cr_code", None)  # a coroutine
        if code is not None and f"{os.sep}orbax{os.sep}" in code.co_filename:
            return
        previous(unraisable)

    hook._tedjax_filter = True
    sys.unraisablehook = hook
    # the same abandoned orbax read, when Python finalizes it as a coroutine never awaited
    warnings.filterwarnings("ignore", message="coroutine '_read_array_index_and_device_put' was never awaited",
                            category=RuntimeWarning)


# ---------------------------------------------------------------- the checkpointer


class Checkpointer:
    """Saves and restores TrainStates for one run directory.

    With `resume=True` it picks, before anything is compiled, the newest step
    that verifies (`resume_step`, None when there is none), and refuses config
    changes that would alter the run (see the module docstring); `notes` holds
    what the user should be told (fallbacks, unverified steps, accepted changes).
    `data_fingerprint` identifies the token files: a resume onto other files at
    the same `data.path` is a change of `data.path`.
    """

    def __init__(self, config: TrainConfig, *, resume: bool, allow_change: Iterable[str] = (),
                 data_fingerprint: str | None = None):
        self.config = config
        self.data_fingerprint = data_fingerprint  # tedjax.data.corpus_fingerprint of the tokens; saved in meta
        self.directory = Path(config.checkpoint_dir).absolute()
        self.allow_change = _check_allow_change(allow_change)
        self.notes: list[str] = []
        self.changes: list[Change] = []
        self.resume_step: int | None = None
        self._verified: set[int] = set()
        self._check_directory(resume)
        options = ocp.CheckpointManagerOptions(
            max_to_keep=config.checkpoint.keep,
            enable_async_checkpointing=config.checkpoint.async_save,
            cleanup_tmp_directories=True,
            create=True,
        )
        handlers = {"state": _state_handler(), "meta": ocp.JsonCheckpointHandler()}
        self.manager = ocp.CheckpointManager(self.directory, options=options, item_handlers=handlers)
        self.hasher = _ManifestWriter(self.directory, self.manager)

    # -- before anything is compiled or written

    def _check_directory(self, resume: bool) -> None:
        """Refuse, before anything is compiled or written, to mix runs, overwrite one or change one silently."""
        d = self.directory
        if d.exists() and not d.is_dir():
            raise CheckpointError(f"checkpoint path {d} is a file, not a directory; set checkpoint.dir to a directory")
        check_writable(d, "checkpoint.dir (or log.dir)")
        steps = self.existing_steps()
        if not steps:  # a run that saved nothing (killed early) does not lock the directory
            if (d / RUN_FILE).exists():
                self.notes.append(f"{d} holds no checkpoint yet; its {RUN_FILE} is replaced by this run's config")
            return
        if not resume:
            try:
                shape = [c for c in self._changes_against(steps[-1]) if c.kind == "shape"]
            except CheckpointError:
                shape = []  # unreadable: the refusal below says what to do anyway
            if shape:
                raise CheckpointError(_different_model(d, shape))
            raise CheckpointError(
                f"checkpoint directory {d} already holds steps {steps}; nothing was changed. "
                "Pass --resume to continue that run, or set checkpoint.dir / log.dir to a new directory"
            )
        step, damaged = self._newest_verified(steps)
        changes = self._changes_against(step)
        shape = [c for c in changes if c.kind == "shape"]
        if shape:
            raise CheckpointError(_different_model(d, shape))
        refused = [c for c in changes if c.kind == "result" and c.key not in self.allow_change]
        if refused:
            raise CheckpointError(
                f"resuming checkpoint step {step} in {d} would change the run; nothing was changed:\n  - "
                + "\n  - ".join(map(str, refused))
                + f"\nResume with the saved values ({RUN_FILE} there holds the full config), or accept these "
                f"changes with --allow-change {','.join(c.key for c in refused)}"
            )
        for bad, problems in damaged:  # only now that the resume is accepted: set aside, never delete
            aside = _free_name(d / f"damaged-{bad}")
            if jax.process_index() == 0:
                os.replace(d / str(bad), aside)
            self.notes.append(f"checkpoint step {bad} is damaged ({'; '.join(problems[:3])}"
                              f"{'; ...' if len(problems) > 3 else ''}); moved it to {aside.name} and resumed from "
                              f"step {step}, the newest step that verifies")  # fmt: skip
        _sync("tedjax-checkpoint-damaged-aside")  # before any process's orbax manager lists the steps
        self.changes = changes
        self.resume_step = step
        for c in changes:
            how = {"result": "accepted with --allow-change", "change": f"changes results, allowed: {c.reason}"}.get(
                c.kind, f"safe: {c.reason}")
            self.notes.append(f"resume changes {c.key}: {c.saved!r} -> {c.new!r} ({how})")

    def _newest_verified(self, steps: list[int]) -> tuple[int, list[tuple[int, list[str]]]]:
        """(newest step that verifies or has no manifest, [(newer damaged step, problems)]); process 0 hashes."""
        damaged: list[tuple[int, list[str]]] = []
        chosen = -1
        if jax.process_index() == 0:
            for step in reversed(steps):
                problems = check_step(self.directory / str(step))
                if problems:
                    damaged.append((step, problems))
                    continue
                chosen = step
                if problems is None:
                    self.notes.append(f"checkpoint step {step} has no {MANIFEST} (the run stopped before hashing "
                                      "it, or an older tedjax wrote it): restoring it unverified")  # fmt: skip
                else:
                    self._verified.add(step)
                break
        chosen = _from_process_0(chosen)
        if jax.process_index() != 0:
            damaged = [(s, ["see process 0's output"]) for s in steps if s > chosen]
        if chosen < 0:
            detail = "; ".join(f"step {s}: {p[0]}" for s, p in damaged)
            raise CheckpointError(f"no checkpoint step in {self.directory} verifies ({detail}); nothing was changed. "
                                  "Move the directory aside to start afresh, or set checkpoint.dir / log.dir")
        return chosen, damaged

    def _changes_against(self, step: int) -> list[Change]:
        meta = self.read_meta(step)
        saved = meta.get("config") or {"model": meta.get("model", {}), "mesh": meta.get("mesh", {})}
        changes = config_changes(saved, self.config, step)
        if "config" not in meta:  # written by an older tedjax: only the model and the mesh were saved
            changes = [c for c in changes if c.key.startswith(("model.", "mesh."))]
        corpus = meta.get("data_fingerprint")  # the same data.path may hold another corpus now
        if corpus and self.data_fingerprint and corpus != self.data_fingerprint and not any(
                c.key in ("data.path", "data.source") for c in changes):
            path = self.config.data.path or self.config.data.source
            changes.append(Change("data.path", f"{path} (corpus {corpus[:12]})",
                                  f"{path} (corpus {self.data_fingerprint[:12]})", "result",
                                  "the token files there are not the ones this checkpoint trained on (their "
                                  "fingerprint differs): another corpus was prepared at the same path"))
        return changes

    def read_meta(self, step: int) -> dict:
        """The `meta` item (JSON) of a step, read directly: no orbax threads, nothing compiled."""
        path = self.directory / str(step) / "meta" / "metadata"
        try:
            return json.loads(path.read_text())
        except (OSError, ValueError) as err:
            raise CheckpointError(f"checkpoint step {step} in {self.directory}: cannot read {path} ({err}); "
                                  f"move {self.directory / str(step)} aside to use the previous step") from None

    def existing_steps(self) -> list[int]:
        if not self.directory.is_dir():
            return []
        return sorted(int(p.name) for p in self.directory.iterdir() if p.is_dir() and p.name.isdigit())

    def begin(self, start_step: int) -> None:
        """Record this run's full config, and the changes a resume accepted, in the run file (process 0)."""
        if jax.process_index() != 0:
            return
        path = self.directory / RUN_FILE
        history = []
        if self.resume_step is not None and path.exists():
            try:
                history = json.loads(path.read_text()).get("history", [])
            except (ValueError, AttributeError):
                history = []  # a damaged run file is only a record; the checkpoints hold the configs
        if self.resume_step is not None and self.resume_step not in self._verified:
            # restored unverified (no manifest: killed while hashing it); orbax read it whole, so hash it now,
            # or it would stay unverified for good
            self.hasher.add(self.resume_step)
            self._verified.add(self.resume_step)
            self.notes.append(f"checkpoint step {self.resume_step} restored without error: hashing it now into its "
                              f"{MANIFEST}")
        history.append({"time": time.strftime("%Y-%m-%dT%H:%M:%S"), "start_step": start_step,
                        "changes": [dataclasses.asdict(c) for c in self.changes]})  # fmt: skip
        text = json.dumps({"config": self.config.to_dict(), "history": history}, indent=1)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(text)
        os.replace(tmp, path)

    # -- saving and restoring

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state, data_state: dict, *, force: bool = False) -> bool:
        """Start saving (asynchronously when configured); returns whether a save began.

        The step is hashed on a background thread once orbax has committed it.
        """
        meta = {"data": data_state, "step": int(step), "config": self.config.to_dict(), "tedjax_version": __version__,
                "layers": "scanned",  # decoder layers stacked in units (before: unrolled `blocks`, no "layers" key)
                "model": dataclasses.asdict(self.config.model), "mesh": dataclasses.asdict(self.config.mesh)}  # fmt: skip
        if self.data_fingerprint:
            meta["data_fingerprint"] = self.data_fingerprint
        # the units in logical order, whatever order the trainer keeps them in (a device copy of the units' state
        # while orbax reads it, with the circular schedule), so a checkpoint restores onto any stage count
        state = pipe.reorder_state(state, self._units_order(state), (1, 1))
        state = jax.tree.map(lambda x: None if _empty(x) else x, state)  # orbax cannot save zero-size arrays
        args = ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta))
        started = self.manager.save(step, args=args, force=force)
        if started and jax.process_index() == 0:
            self.hasher.add(step)
        return started

    def restore(self, abstract_state, step: int | None = None):
        """(state, meta) of `step` (default: `resume_step`, else the newest), resharded to `abstract_state`.

        The step's files are verified against its manifest first (CheckpointError naming the file if not).
        """
        step = step if step is not None else self.resume_step if self.resume_step is not None else self.latest_step()
        if step is None:
            raise CheckpointError(f"no complete checkpoint in {self.directory}")
        step_dir = self.directory / str(step)
        if step not in self._verified:
            problems = check_step(step_dir) if jax.process_index() == 0 else []
            if _from_process_0(int(bool(problems))):
                raise CheckpointError(f"checkpoint step {step} in {self.directory} is damaged: "
                                      f"{'; '.join(problems or ['see process 0'])}; "
                                      f"move {step_dir} aside to use the previous step")
            if problems is not None:
                self._verified.add(step)
        meta = self.read_meta(step)
        _quiet_closed_event_loop()  # before orbax reads: its noise about damaged files can come at once
        try:
            saved = self.manager.item_metadata(step)["state"]
        except Exception as err:  # orbax raises many types for damaged files
            raise CheckpointError(f"checkpoint step {step} in {self.directory} cannot be read ({_brief(err)}); "
                                  f"move {step_dir} aside to resume from the previous step") from err
        target = _restore_target(abstract_state)
        differences = state_differences(saved, target)
        unrolled = differences and _has_unrolled_blocks(saved) and not _has_unrolled_blocks(target)
        if unrolled:  # written before layers were scanned (meta has no "layers"): read unrolled, then stack
            differences = state_differences(saved, _layer_trees(target, lambda t: unstack_layers(
                self.config.model, t, take=_abstract_slice)))
            if differences:
                raise CheckpointError(
                    f"checkpoint step {step} in {self.directory} was written by a tedjax before scanned layers "
                    f"(version {meta.get('tedjax_version', '0.1.0 or older')}, unrolled `blocks`) for another model "
                    f"({'; '.join(differences[:5])}): use the config that wrote it, or a new checkpoint.dir")
            target = _layer_trees(target, lambda t: unstack_layers(self.config.model, t, take=_abstract_slice))
        if differences:
            raise CheckpointError(
                f"checkpoint step {step} in {self.directory} holds a train state of another structure "
                f"({'; '.join(differences[:5])}{'; ...' if len(differences) > 5 else ''}): it was written by another "
                "model or another tedjax version. Use the config that wrote it, or a new checkpoint.dir"
            )
        try:
            restored = self.manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target)))
        except Exception as err:
            raise CheckpointError(
                f"checkpoint step {step} in {self.directory} is damaged ({_brief(err)}); "
                f"move {step_dir} aside to resume from the previous step"
            ) from err
        state = restored["state"]
        if unrolled:  # each unit's layers stacked on the "layers" axis, in the target's shardings
            state = _layer_trees(state, lambda t: stack_layers(self.config.model, t))
            state = jax.tree.map(lambda x, a: x if x is None else jax.device_put(x, a.sharding), state,
                                 _restore_target(abstract_state), is_leaf=lambda x: x is None)
        state = _refill_empty(abstract_state, state)
        return pipe.reorder_state(state, (1, 1), self._units_order(abstract_state)), meta

    def _units_order(self, state) -> tuple[int, int]:
        """The order (`pipeline.stored_order`) a Trainer keeps the units of `state` in: from its mesh's stages
        and the pipeline config."""
        meshes = [x.sharding.mesh for x in jax.tree.leaves(state) if isinstance(getattr(x, "sharding", None),
                                                                                   jax.sharding.NamedSharding)]
        stages = int(dict(meshes[0].shape).get("stage", 1)) if meshes else 1
        return pipe.stored_order(stages, self.config.pipeline.schedule, self.config.pipeline.repeats)

    def wait(self) -> None:
        """Block until every started save is committed and hashed."""
        self.manager.wait_until_finished()
        self.hasher.drain()
        if self.hasher.errors:
            errors, self.hasher.errors = self.hasher.errors, []
            raise CheckpointError(f"hashing checkpoints in {self.directory} failed: {'; '.join(errors)}")

    def close(self) -> None:
        try:
            self.wait()
        finally:
            self.hasher.stop()
            self.manager.close()


def _empty(leaf) -> bool:
    return hasattr(leaf, "shape") and 0 in tuple(leaf.shape)


def _refill_empty(abstract_state, restored):
    """The restored state with its zero-size leaves (saved as None) recreated in their shardings."""
    leaves, treedef = jax.tree.flatten(abstract_state)
    got = jax.tree.leaves(restored, is_leaf=lambda x: x is None)
    return jax.tree.unflatten(treedef, [jnp.zeros(a.shape, a.dtype, device=a.sharding) if _empty(a) else g
                                        for a, g in zip(leaves, got, strict=True)])  # fmt: skip


def _has_unrolled_blocks(tree) -> bool:
    """Whether a train state (or its saved metadata) holds decoder layers unrolled as `params/blocks/<i>`."""
    def key(k) -> str:
        return str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k))))

    return any([key(k) for k in path[:2]] == ["params", "blocks"] for path, _ in jax.tree_util.tree_flatten_with_path(
        tree, is_leaf=lambda x: x is None)[0])


def _layer_trees(tree, fn):
    """`tree` with `fn` applied to each dict that holds decoder layers (params, Adam moments, model state)."""
    def holds_layers(x) -> bool:
        return isinstance(x, dict) and bool({"units", "tail", "blocks"} & set(x))

    return jax.tree.map(lambda x: fn(x) if holds_layers(x) else x, tree, is_leaf=holds_layers)


def _abstract_slice(leaf: jax.ShapeDtypeStruct, index: int) -> jax.ShapeDtypeStruct:
    """One unit of a stacked abstract leaf: the leading "layers" dim dropped from its shape and sharding."""
    sharding = leaf.sharding
    spec = jax.sharding.PartitionSpec(*tuple(sharding.spec)[1:])
    return jax.ShapeDtypeStruct(leaf.shape[1:], leaf.dtype, sharding=jax.sharding.NamedSharding(sharding.mesh, spec))


def _restore_target(abstract_state):
    """The restore target of `abstract_state`: zero-size leaves as None (orbax saves them so)."""
    return jax.tree.map(lambda x: None if _empty(x) else x, abstract_state)


def state_differences(saved_metadata, abstract_state) -> list[str]:
    """Leaves whose path, shape or dtype differ between a saved state's metadata and the restore target."""

    def table(tree) -> dict[tuple[str, ...], tuple]:
        leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
        return {tuple(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path):
                (tuple(leaf.shape), str(leaf.dtype)) for path, leaf in leaves if hasattr(leaf, "shape")}  # fmt: skip

    saved, target = table(saved_metadata), table(abstract_state)
    name = "/".join
    out = [f"{name(p)} is new" for p in sorted(set(target) - set(saved))]
    out += [f"{name(p)} is gone" for p in sorted(set(saved) - set(target))]
    out += [f"{name(p)}: saved {saved[p][0]} {saved[p][1]}, now {target[p][0]} {target[p][1]}"
            for p in sorted(set(saved) & set(target)) if saved[p] != target[p]]  # fmt: skip
    return out


def _different_model(directory: Path, shape: list[Change]) -> str:
    diff = ", ".join(f"{c.key.removeprefix('model.')}: saved {c.saved!r} vs config {c.new!r}" for c in shape)
    return (f"checkpoint directory {directory} holds a different model ({diff}); nothing was changed. "
            "Use a new checkpoint.dir (or log.dir), or the config that wrote it")


def _check_allow_change(keys: Iterable[str]) -> frozenset[str]:
    keys = frozenset(k.strip() for k in keys if k.strip())
    unknown = sorted(keys - config_keys())
    if unknown:
        raise CheckpointError(f"--allow-change names unknown config keys {unknown}; use dotted keys such as "
                              "optimizer.learning_rate,data.batch_size,seed")
    return keys


def _from_process_0(value: int) -> int:
    """Process 0's `value` on every process (it alone hashes checkpoint files)."""
    if jax.process_count() == 1:
        return value
    from jax.experimental import multihost_utils

    return int(multihost_utils.broadcast_one_to_all(np.int32(value)))


def _sync(name: str) -> None:
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def _free_name(path: Path) -> Path:
    candidate, n = path, 1
    while candidate.exists():
        n += 1
        candidate = path.with_name(f"{path.name}-{n}")
    return candidate
