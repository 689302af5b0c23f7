"""Checksummed checkpoints and resume guards (issue 14).

- Every file of a committed step is hashed into a manifest, on a background
  thread after orbax commits (never inside `save`); random byte flips in any
  file are all detected, naming the file; a damaged newest step is moved
  aside and the newest step that verifies is resumed, saying so.
- A resume compares the config saved in the checkpoint with the new one:
  every field changes results (refused unless `--allow-change`) except an
  explicit allow-list of safe ones; parameter shapes never change; a train
  state of another structure is refused by name, whatever leaves it has.
- A run that saved no checkpoint does not lock its directory.
- Issue 20: a step folder holding another step is set aside; an unverified
  step is hashed after the next start; another corpus at the same data.path
  is a change; shadow_experts fixes shapes; a mesh change says when drops
  change; more steps is a change with the learning rate before and after;
  `python -m tedjax.generate --checkpoint` verifies as --resume does.

`COUNTS` (flips tried / detected, resume changes refused / allowed) is saved
for `benchmarks/faults.py` when TEDJAX_FAULTS_SUMMARY_DIR is set.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import os
import random
import shutil
import subprocess
import sys
import threading
import time
import types
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from reference import TINY_RUN_OVERRIDES

import tedjax.checkpoint as ckpt_lib
from tedjax.checkpoint import MANIFEST, RUN_FILE, SAFE_CHANGES, Checkpointer, CheckpointError, config_changes, flatten
from tedjax.config import TrainConfig, load_config
from tedjax.mesh import make_mesh
from tedjax.trainer import Trainer

REPO = Path(__file__).resolve().parents[1]
TINY_YAML = str(REPO / "configs" / "tiny.yaml")
TINY = [*TINY_RUN_OVERRIDES, "steps=8", "checkpoint.every=2", "checkpoint.keep=10"]
COUNTS: collections.Counter = collections.Counter()
FLIPS: list[dict] = []


@pytest.fixture(scope="module", autouse=True)
def summary():
    yield
    if os.environ.get("TEDJAX_FAULTS_SUMMARY_DIR"):
        Path(os.environ["TEDJAX_FAULTS_SUMMARY_DIR"], "test_resume_guards.json").write_text(
            json.dumps({"counts": dict(COUNTS), "flips": FLIPS}, indent=1))


def tiny_config(log_dir, *extra) -> TrainConfig:
    return load_config(TINY_YAML, [*TINY, f"log.dir={log_dir}", *extra])


def as_numpy(tree):
    return jax.tree.map(np.asarray, tree)


def snapshot(root: Path) -> dict:
    return {p.relative_to(root).as_posix(): (p.read_bytes() if p.is_file() else "dir") for p in sorted(root.rglob("*"))}


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A run directory with checkpoint steps 2 and 4 (different states) of the tiny model, and its trainer."""
    log_dir = tmp_path_factory.mktemp("guards") / "run"
    config = tiny_config(log_dir)
    trainer = Trainer(config, make_mesh(2, 2, 2))
    state = trainer.init_state()
    later = dataclasses.replace(state, step=state.step + 2, params=jax.tree.map(lambda x: x + 1.0, state.params))
    expected = {2: as_numpy(state), 4: as_numpy(later)}
    checkpointer = Checkpointer(config, resume=False)
    checkpointer.save(2, state, {"step": 2})
    checkpointer.save(4, later, {"step": 4})
    checkpointer.begin(0)
    checkpointer.close()
    return log_dir, trainer, expected


def copy_run(saved, tmp_path: Path) -> Path:
    target = tmp_path / "run"
    shutil.copytree(saved[0], target)
    return target


def data_file(step_dir: Path) -> Path:
    """The largest file of a step: OCDBT array data."""
    return max((p for p in step_dir.rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)


def flip(path: Path, offset: int, mask: int = 0x01) -> int:
    data = bytearray(path.read_bytes())
    old = data[offset]
    data[offset] ^= mask
    path.write_bytes(bytes(data))
    return old


# ---------------------------------------------------------------- checksums


def test_hashing_runs_after_the_save_returns(saved, tmp_path, monkeypatch):
    """`save` only starts orbax's write; the hashing waits on another thread until the step is committed."""
    _, trainer, _ = saved
    config = tiny_config(tmp_path / "async", "checkpoint.async_save=true")
    gate, threads = threading.Event(), []
    real = ckpt_lib.write_manifest

    def slow_manifest(step_dir):
        threads.append(threading.current_thread().name)
        assert Path(step_dir).name == "2" and Path(step_dir).is_dir()  # committed: renamed into place
        gate.wait(timeout=60)
        return real(step_dir)

    monkeypatch.setattr(ckpt_lib, "write_manifest", slow_manifest)
    checkpointer = Checkpointer(config, resume=False)
    start = time.perf_counter()
    checkpointer.save(2, trainer.init_state(), {"step": 2})
    returned = time.perf_counter() - start
    step_dir = checkpointer.directory / "2"
    assert not (step_dir / MANIFEST).exists()  # the save returned before any hashing finished
    gate.set()
    checkpointer.close()  # waits for the commit and the hash
    assert threads == ["tedjax-checksums"]
    assert ckpt_lib.verify_step(step_dir) == []
    assert returned < 30


def test_random_byte_flips_are_all_detected(saved, tmp_path):
    """60 flips at random offsets over every byte of a step (manifest included): each is caught, by file."""
    step_dir = tmp_path / "4"
    shutil.copytree(saved[0] / "checkpoints" / "4", step_dir)
    files = sorted(p for p in step_dir.rglob("*") if p.is_file())
    sizes = np.cumsum([p.stat().st_size for p in files])
    rng = random.Random(14)
    assert ckpt_lib.verify_step(step_dir) == []
    for _ in range(60):
        offset = rng.randrange(int(sizes[-1]))
        index = int(np.searchsorted(sizes, offset, side="right"))
        path = files[index]
        local = offset - (int(sizes[index - 1]) if index else 0)
        name = path.relative_to(step_dir).as_posix()
        old = flip(path, local, rng.randrange(1, 256))
        problems = ckpt_lib.verify_step(step_dir)
        COUNTS["flips_tried"] += 1
        detected = bool(problems) and any(name in p or MANIFEST in p for p in problems)
        FLIPS.append({"file": name, "offset": local, "detected": detected})
        assert detected, (name, problems)
        COUNTS["flips_detected"] += 1
        flip(path, local, old ^ path.read_bytes()[local])  # put the byte back
    assert ckpt_lib.verify_step(step_dir) == []
    assert len({f["file"] for f in FLIPS}) >= 5  # the flips reached many files, not one


def test_a_changed_digest_in_the_manifest_blames_the_manifest(saved, tmp_path):
    """One hex digit of a file's digest changed leaves valid JSON: the manifest's own sha256 catches it,
    so the report names the manifest, not the (intact) file."""
    step_dir = tmp_path / "4"
    shutil.copytree(saved[0] / "checkpoints" / "4", step_dir)
    manifest = step_dir / MANIFEST
    text = manifest.read_text()
    name, (_, digest) = next(iter(json.loads(text)["files"].items()))
    manifest.write_text(text.replace(digest, ("0" if digest[0] != "0" else "1") + digest[1:]))
    assert ckpt_lib.verify_step(step_dir) == [f"{MANIFEST} is damaged (its own sha256 does not match)"], name


def test_damaged_newest_step_falls_back_to_the_newest_that_verifies(saved, tmp_path):
    run_dir = copy_run(saved, tmp_path)
    config = tiny_config(run_dir)
    bad = data_file(run_dir / "checkpoints" / "4")
    flip(bad, bad.stat().st_size // 2)
    checkpointer = Checkpointer(config, resume=True)
    try:
        assert checkpointer.resume_step == 2
        name = bad.relative_to(run_dir / "checkpoints" / "4").as_posix()
        assert any(f"checkpoint step 4 is damaged ({name} changed since it was saved (sha256 mismatch)); moved it "
                   "to damaged-4 and resumed from step 2, the newest step that verifies" in n
                   for n in checkpointer.notes), checkpointer.notes  # fmt: skip
        assert checkpointer.existing_steps() == [2] and (run_dir / "checkpoints" / "damaged-4").is_dir()
        state, meta = checkpointer.restore(saved[1].abstract_state())
    finally:
        checkpointer.close()
    assert meta["step"] == 2
    restored = as_numpy(state)
    assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(saved[2][2])))


def test_no_step_verifies_changes_nothing(saved, tmp_path):
    run_dir = copy_run(saved, tmp_path)
    for step in (2, 4):
        bad = data_file(run_dir / "checkpoints" / str(step))
        flip(bad, 7)
    before = snapshot(run_dir)
    with pytest.raises(CheckpointError, match=r"no checkpoint step in .* verifies \(step 4: state/.* changed since it "
                                              r"was saved .*step 2: .*nothing was changed"):  # fmt: skip
        Checkpointer(tiny_config(run_dir), resume=True)
    assert snapshot(run_dir) == before


def test_step_without_manifest_restores_unverified(saved, tmp_path):
    run_dir = copy_run(saved, tmp_path)
    (run_dir / "checkpoints" / "4" / MANIFEST).unlink()
    checkpointer = Checkpointer(tiny_config(run_dir), resume=True)
    try:
        assert checkpointer.resume_step == 4
        assert any("step 4 has no tedjax_checksums.json" in n and "unverified" in n for n in checkpointer.notes)
        state, _ = checkpointer.restore(saved[1].abstract_state())
        assert int(state.step) == 2  # (the fixture's later state counts 2 more steps than step 0)
    finally:
        checkpointer.close()


@pytest.mark.slow
@pytest.mark.parametrize("target", ["state/manifest.ocdbt", "state/array_metadatas/process_0", "data"])
def test_damaged_unverified_checkpoint_gives_one_clean_error(saved, tmp_path, target):
    """Bug 3: orbax failing on a damaged file left `RuntimeError: Event loop is closed` tracebacks behind."""
    run_dir = copy_run(saved, tmp_path)
    step_dir = run_dir / "checkpoints" / "4"
    for step in (2, 4):  # an older tedjax's checkpoints: no manifests, so orbax itself meets the damage
        (run_dir / "checkpoints" / str(step) / MANIFEST).unlink()
    path = data_file(step_dir / "state") if target == "data" else step_dir / target
    data = bytearray(path.read_bytes())
    for i in range(8, len(data), max(1, len(data) // 16)):
        data[i] ^= 0xFF
    path.write_bytes(bytes(data))
    cmd = [sys.executable, str(REPO / "train.py"), "--config", TINY_YAML, *TINY, f"log.dir={run_dir}", "--resume"]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-3000:]
    lines = [line for line in proc.stderr.splitlines() if line.strip() and not line.startswith(("WARNING", "I0000", "E0000"))]
    assert lines[-1].startswith("error: checkpoint step 4 in ") and "move " in lines[-1], proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr and "Event loop is closed" not in proc.stderr, proc.stderr[-3000:]


# ---------------------------------------------------------------- resume guards

SAFE_KEYS = {"log.", "mesh.", "checkpoint.every", "checkpoint.keep", "checkpoint.async_save", "checkpoint.dir",
             "max_bad_steps", "xla.", "optimizer.zero", "model.scan_layers", "pipeline.schedule",
             "pipeline.repeats"}  # fmt: skip


def _changed(value):
    if isinstance(value, bool) or value is None:
        return not value
    if isinstance(value, int):
        return value + 1
    if isinstance(value, float):
        return value * 2 + 1
    if isinstance(value, list):  # model.eos_token_id
        return [*value, 1]
    return value + "x"


def test_every_field_is_guarded_unless_allow_listed():
    """Fields added later change results until someone lists them as safe: the list is of safe fields."""
    assert set(SAFE_CHANGES) == SAFE_KEYS
    base = TrainConfig()
    for key, value in flatten(base.to_dict()).items():
        saved = flatten(base.to_dict())
        saved[key] = _changed(value)
        nested: dict = {}
        for k, v in saved.items():
            node = nested
            *parents, leaf = k.split(".")
            for p in parents:
                node = node.setdefault(p, {})
            node[leaf] = v
        changes = config_changes(nested, base)
        assert [c.key for c in changes] == [key]
        safe = any(key == k or (k.endswith(".") and key.startswith(k)) for k in SAFE_KEYS)
        assert (changes[0].kind == "safe") == safe, changes[0]
    # a field the saved config does not know yet counts as its default
    assert config_changes({"model": {}}, base) == []


def test_steps_upward_is_an_allowed_change_and_downward_is_refused():
    saved = TrainConfig(steps=20).to_dict()
    up, = config_changes(saved, TrainConfig(steps=40))
    down, = config_changes(saved, TrainConfig(steps=10))
    assert up.kind == "change" and "schedule now spans 40 steps" in up.reason  # not "safe" (issue 20 item 20)
    assert down.kind == "result" and "shortens the learning-rate schedule" in down.reason


RESULT_CHANGES = {
    "the issue's ruined run": ["optimizer.learning_rate=0.5", "data.batch_size=64", "seed=7"],
    "capacity_factor": ["model.capacity_factor=2.0"],
    "group_size": ["model.group_size=16"],
    "dtype": ["model.dtype=bfloat16"],
    "data source": ["data.source=stdlib"],
    "data path": ["data.source=tokens", "data.path=/somewhere/else"],
    "top_k": ["model.top_k=2"],
    "data seed": ["data.seed=3"],
}


@pytest.mark.parametrize("case", list(RESULT_CHANGES))
def test_result_changes_are_refused_before_anything_is_written(saved, case):
    overrides = RESULT_CHANGES[case]
    before = snapshot(saved[0])
    COUNTS["resume_changes_tried"] += 1
    with pytest.raises(CheckpointError) as info:
        Checkpointer(tiny_config(saved[0], *overrides), resume=True)
    message = str(info.value)
    keys = [o.split("=")[0] for o in overrides]
    assert message.startswith(f"resuming checkpoint step 4 in {saved[0] / 'checkpoints'} would change the run; "
                              "nothing was changed:")  # fmt: skip
    assert all(f"  - {k}: " in message for k in keys), message
    assert set(message.rsplit("--allow-change ", 1)[1].split(",")) == set(keys), message
    if case == "top_k":
        assert "although parameter shapes allow it" in message
    assert snapshot(saved[0]) == before
    COUNTS["resume_changes_refused"] += 1


def test_allowed_changes_are_accepted_and_recorded(saved, tmp_path):
    run_dir = copy_run(saved, tmp_path)
    changes = RESULT_CHANGES["the issue's ruined run"]
    COUNTS["resume_changes_tried"] += 1
    checkpointer = Checkpointer(tiny_config(run_dir, *changes), resume=True,
                                allow_change=["optimizer.learning_rate", "data.batch_size", "seed"])  # fmt: skip
    try:
        assert checkpointer.resume_step == 4
        assert "resume changes seed: 0 -> 7 (accepted with --allow-change)" in checkpointer.notes
        checkpointer.begin(4)
    finally:
        checkpointer.close()
    run_file = json.loads((run_dir / "checkpoints" / RUN_FILE).read_text())
    assert run_file["config"]["seed"] == 7 and run_file["config"]["optimizer"]["learning_rate"] == 0.5
    last = run_file["history"][-1]
    assert last["start_step"] == 4
    assert {(c["key"], c["saved"], c["new"]) for c in last["changes"] if c["kind"] == "result"} == {
        ("optimizer.learning_rate", 0.003, 0.5), ("data.batch_size", 8, 64), ("seed", 0, 7)}
    COUNTS["resume_changes_allowed"] += 1


def test_safe_changes_are_accepted_and_logged(saved):
    COUNTS["resume_changes_tried"] += 1
    safe = ["mesh.data=1", "mesh.expert=4", "steps=20", "log.every=5", "checkpoint.every=4", "checkpoint.keep=2",
            "max_bad_steps=9", "pipeline.schedule=circular", "pipeline.repeats=2"]  # fmt: skip
    checkpointer = Checkpointer(tiny_config(saved[0], *safe), resume=True)
    try:
        notes = "\n".join(checkpointer.notes)
        assert "resume changes mesh.expert: 2 -> 4 (safe: the checkpoint is resharded onto the new mesh" in notes
        assert "resume changes steps: 8 -> 20 (changes results, allowed: the learning-rate schedule now spans 20 " \
               "steps; the learning rate at step 4 goes from" in notes
        assert "resume changes pipeline.repeats: 1 -> 2 (safe: checkpoints keep the layers in logical order" in notes
        assert len(checkpointer.changes) == 9
        assert [c.key for c in checkpointer.changes if c.kind != "safe"] == ["steps"]
    finally:
        checkpointer.close()
    COUNTS["resume_changes_allowed"] += 1


def test_shape_changes_cannot_be_allowed(saved):
    COUNTS["resume_changes_tried"] += 1
    with pytest.raises(CheckpointError, match=r"holds a different model \(d_model: saved 32 vs config 64\); nothing "
                                              "was changed"):  # fmt: skip
        Checkpointer(tiny_config(saved[0], "model.d_model=64"), resume=True, allow_change=["model.d_model"])
    COUNTS["resume_changes_refused"] += 1


def test_unknown_allow_change_key(saved):
    with pytest.raises(CheckpointError, match=r"--allow-change names unknown config keys \['optimizer.lr'\]"):
        Checkpointer(tiny_config(saved[0]), resume=True, allow_change=["optimizer.lr"])


def test_state_of_another_structure_is_refused_by_leaf(saved):
    """New TrainState leaves (say a router bias) or other shapes: named, not reported as damage."""
    _, trainer, _ = saved
    abstract = trainer.abstract_state()
    bias = jax.ShapeDtypeStruct((4,), jnp.float32, sharding=abstract.step.sharding)
    grown = dataclasses.replace(abstract, model_state={**abstract.model_state, "router_bias": bias})
    checkpointer = Checkpointer(tiny_config(saved[0]), resume=True)
    try:
        with pytest.raises(CheckpointError, match=r"holds a train state of another structure \(model_state/router_bias "
                                                  r"is new\): it was written by another model"):  # fmt: skip
            checkpointer.restore(grown)
    finally:
        checkpointer.close()


def test_a_run_that_saved_nothing_does_not_lock_its_directory(tmp_path):
    """Bug 4: killed before its first checkpoint, a run left only its run file; another model may start there."""
    first = Checkpointer(tiny_config(tmp_path), resume=False)
    first.begin(0)
    first.close()
    assert (tmp_path / "checkpoints" / RUN_FILE).exists() and first.existing_steps() == []
    second = Checkpointer(tiny_config(tmp_path, "model.num_experts=8"), resume=False)
    try:
        assert any("holds no checkpoint yet" in n for n in second.notes)
        second.begin(0)
    finally:
        second.close()
    saved = json.loads((tmp_path / "checkpoints" / RUN_FILE).read_text())
    assert saved["config"]["model"]["num_experts"] == 8


def test_closed_event_loop_noise_is_dropped_after_a_failed_read(saved, tmp_path, monkeypatch):
    """Bug 3, deterministically: tensorstore reports each late callback to orbax's closed asyncio loop through
    sys.unraisablehook (object None); once a restore has run those are dropped, and nothing else is."""
    reported = []
    monkeypatch.setattr(sys, "unraisablehook", lambda unraisable: reported.append(unraisable.exc_value))
    run_dir = copy_run(saved, tmp_path)
    (run_dir / "checkpoints" / "4" / MANIFEST).unlink()
    path = run_dir / "checkpoints" / "4" / "state" / "manifest.ocdbt"
    path.write_bytes(bytes(b ^ 0xFF for b in path.read_bytes()))
    checkpointer = Checkpointer(tiny_config(run_dir), resume=True)
    try:
        with pytest.raises(CheckpointError, match="checkpoint step 4 in .* cannot be read"):
            checkpointer.restore(saved[1].abstract_state())
    finally:
        checkpointer.close()
    time.sleep(0.5)  # let tensorstore's late callbacks arrive
    assert not [e for e in reported if "Event loop is closed" in str(e)]
    for text in ("Event loop is closed", "something else"):
        sys.unraisablehook(types.SimpleNamespace(exc_type=RuntimeError, exc_value=RuntimeError(text),
                                                 exc_traceback=None, err_msg=None, object=None))  # fmt: skip
    # an orbax read coroutine that ends with the read's error after nobody awaits it any more
    from orbax.checkpoint._src.serialization import serialization

    coroutine = serialization._read_array_index_and_device_put.__code__
    orbax_read = types.SimpleNamespace(cr_code=coroutine)
    sys.unraisablehook(types.SimpleNamespace(exc_type=Exception, exc_value=Exception("reading array index"),
                                             exc_traceback=None, err_msg=None, object=orbax_read))  # fmt: skip
    assert [str(e) for e in reported] == ["something else"]


def test_zero_size_leaves_round_trip(tmp_path):
    """Orbax refuses to save zero-size arrays (e.g. a layer with no shadow experts); they are saved as nothing
    and recreated, in their sharding, on restore."""
    mesh = make_mesh(2, 2, 2)
    sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    state = {"w": jax.device_put(jnp.arange(6.0).reshape(2, 3), sharding),
             "none_yet": jax.device_put(jnp.zeros((0, 3), jnp.int32), sharding)}  # fmt: skip
    config = tiny_config(tmp_path)
    checkpointer = Checkpointer(config, resume=False)
    checkpointer.save(1, state, {"step": 1})
    checkpointer.close()
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state)
    checkpointer = Checkpointer(config, resume=True)
    try:
        restored, _ = checkpointer.restore(abstract)
    finally:
        checkpointer.close()
    assert np.array_equal(restored["w"], state["w"])
    assert restored["none_yet"].shape == (0, 3) and restored["none_yet"].dtype == jnp.int32
    assert restored["none_yet"].sharding == sharding


# ---------------------------------------------------------------- issue 20: held-out checks of runs


def test_a_step_folder_holding_another_step_is_set_aside(saved, tmp_path):
    """Item 14: checkpoints/6 copied from checkpoints/2 verifies against its own manifest; it resumed as step 6."""
    run_dir = copy_run(saved, tmp_path)
    shutil.copytree(run_dir / "checkpoints" / "2", run_dir / "checkpoints" / "6")
    checkpointer = Checkpointer(tiny_config(run_dir), resume=True)
    try:
        assert checkpointer.resume_step == 4
        assert any("checkpoint step 6 is damaged (it holds step 2, not step 6 (its meta/metadata says step 2: a "
                   "folder copied or renamed from another step)); moved it to damaged-6 and resumed from step 4" in n
                   for n in checkpointer.notes), checkpointer.notes  # fmt: skip
        shutil.rmtree(run_dir / "checkpoints" / "2")
        shutil.copytree(run_dir / "checkpoints" / "4", run_dir / "checkpoints" / "2")
        with pytest.raises(CheckpointError, match=r"checkpoint step 2 in .* is damaged: it holds step 4, not step 2"):
            checkpointer.restore(saved[1].abstract_state(), 2)  # an explicit step is checked too
    finally:
        checkpointer.close()


def test_a_step_restored_unverified_is_hashed_after_the_start(saved, tmp_path):
    """Item 15: killed while hashing, step 4 has no manifest; it restored unverified and stayed so for good."""
    run_dir = copy_run(saved, tmp_path)
    step_dir = run_dir / "checkpoints" / "4"
    (step_dir / MANIFEST).unlink()
    checkpointer = Checkpointer(tiny_config(run_dir), resume=True)
    try:
        state, _ = checkpointer.restore(saved[1].abstract_state())
        assert not (step_dir / MANIFEST).exists()  # nothing is hashed before the start succeeded
        checkpointer.begin(4)
        assert any("checkpoint step 4 restored without error: hashing it now" in n for n in checkpointer.notes)
    finally:
        checkpointer.close()
    assert ckpt_lib.verify_step(step_dir) == []
    assert np.array_equal(as_numpy(state.step), saved[2][4].step)


def write_corpus(directory: Path, seed: int) -> Path:
    """A token directory as `prepare` lays it out (meta.json, train.bin, val.bin), of random byte ids."""
    directory.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    train, val = rng.integers(0, 256, 4000).astype(np.uint16), rng.integers(0, 256, 600).astype(np.uint16)
    train.tofile(directory / "train.bin")
    val.tofile(directory / "val.bin")
    (directory / "meta.json").write_text(json.dumps({"vocab_size": 256, "dtype": "uint16", "n_train_tokens": 4000,
                                                     "n_val_tokens": 600}))  # fmt: skip
    return directory


def test_another_corpus_at_the_same_path_is_a_change(saved, tmp_path, monkeypatch):
    """Item 13: a different corpus prepared at the same data.path resumed silently (only the path was compared)."""
    from tedjax import data as data_lib
    from tedjax.loop import run

    corpus = write_corpus(tmp_path / "corpus", seed=1)
    run_dir = tmp_path / "run"
    overrides = ["data.source=tokens", f"data.path={corpus}"]
    config = tiny_config(run_dir, *overrides)
    checkpointer = Checkpointer(config, resume=False, data_fingerprint=data_lib.corpus_fingerprint(corpus))
    checkpointer.save(2, saved[2][2], {"step": 2})  # (as numpy: this test never restores it)
    checkpointer.close()

    class Reached(Exception):
        pass

    monkeypatch.setattr(Checkpointer, "restore", lambda self, *a, **k: (_ for _ in ()).throw(Reached()))
    with pytest.raises(Reached):  # the same files: no change
        run(config, resume=True)
    write_corpus(corpus, seed=2)  # another corpus, prepared at the same path
    before = snapshot(run_dir)
    COUNTS["resume_changes_tried"] += 1
    with pytest.raises(CheckpointError) as info:
        run(config, resume=True)
    message = str(info.value)
    assert f"  - data.path: '{corpus} (corpus " in message and "another corpus was prepared at the same path" in message
    assert message.endswith("--allow-change data.path"), message
    assert snapshot(run_dir) == before
    COUNTS["resume_changes_refused"] += 1
    with pytest.raises(Reached):  # accepted when named
        run(config, resume=True, allow_change=["data.path"])


def test_shadow_experts_fix_the_state_shapes(saved):
    """Item 18b: called a results change, with --allow-change leading to a state-structure error."""
    change, = config_changes(tiny_config("x").to_dict(), tiny_config("x", "model.shadow_experts=1"))
    assert change.kind == "shape" and "fixes the train state's shapes" in change.reason
    COUNTS["resume_changes_tried"] += 1
    with pytest.raises(CheckpointError, match=r"holds a different model \(shadow_experts: saved 0 vs config 1\)"):
        Checkpointer(tiny_config(saved[0], "model.shadow_experts=1"), resume=True,
                     allow_change=["model.shadow_experts"])  # fmt: skip
    COUNTS["resume_changes_refused"] += 1


@pytest.mark.parametrize("switch", ["model.capacity_scope=device", "model.shadow_experts=1", None])
def test_a_mesh_change_says_when_it_changes_drops(switch):
    """Item 18c: with device pools or shadows the size of "expert" changes which tokens drop; still allowed."""
    extra = [switch] if switch else []
    change, = config_changes(tiny_config("x", *extra).to_dict(), tiny_config("x", *extra, "mesh.expert=4",
                                                                             "mesh.data=1"))[1:]  # fmt: skip
    assert change.key == "mesh.expert" and change.kind == "safe"
    says = 'the size of "expert" changes which tokens are dropped' in change.reason
    assert says == (switch is not None), change.reason
    if switch:
        assert ("device pools" if "scope" in switch else "shadow experts") in change.reason


def test_more_steps_is_a_change_with_the_learning_rate_jump(saved):
    """Item 20: steps 8 -> 20 was called safe although the learning rate at the resumed step jumps."""
    from tedjax.optim import learning_rate_schedule

    config = tiny_config(saved[0], "steps=20")
    for name in ("cosine", "wsd", "inverse_sqrt"):  # a saved optimizer dict gives the run's own schedule
        optimizer = dataclasses.replace(config.optimizer, schedule=name)
        for total in (8, 20, 2):
            schedule = learning_rate_schedule(optimizer, total)
            for step in range(0, total + 2):
                assert ckpt_lib.learning_rate_at(step, dataclasses.asdict(optimizer), total) == pytest.approx(
                    float(schedule(step)), rel=1e-6, abs=1e-12)
    before = float(learning_rate_schedule(config.optimizer, 8)(4))
    after = float(learning_rate_schedule(config.optimizer, 20)(4))
    assert after > 1.2 * before
    COUNTS["resume_changes_tried"] += 1
    checkpointer = Checkpointer(config, resume=True)
    try:
        (change,) = checkpointer.changes
        assert change.kind == "change"
        assert (f"resume changes steps: 8 -> 20 (changes results, allowed: the learning-rate schedule now spans 20 "
                f"steps; the learning rate at step 4 goes from {before:.3g} to {after:.3g})") in checkpointer.notes
    finally:
        checkpointer.close()
    COUNTS["resume_changes_allowed"] += 1


def test_generate_verifies_checkpoints_as_resume_does(saved, tmp_path, capsys):
    """Item 12: `python -m tedjax.generate --checkpoint` read a damaged step (its w_out off by 9.6e15)."""
    from tedjax import generation

    run_dir = copy_run(saved, tmp_path)
    bad = data_file(run_dir / "checkpoints" / "4")
    flip(bad, bad.stat().st_size // 2)
    before = snapshot(run_dir)
    mesh = make_mesh(1, 1, 1, devices=jax.devices()[:1])
    _, model = generation.load_trained(run_dir, mesh)  # the newest step is damaged: the newest that verifies
    err = capsys.readouterr().err
    assert "checkpoint step 4 in" in err and "changed since it was saved (sha256 mismatch)); using an older step" in err
    embed = next(v for k, v in flatten(jax.tree.map(np.asarray, __import__("flax").nnx.to_pure_dict(
        __import__("flax").nnx.state(model, __import__("flax").nnx.Param)))).items() if "embed" in k)
    saved_embed = next(v for k, v in flatten(saved[2][2].params).items() if "embed" in k)
    assert np.array_equal(embed, saved_embed)  # step 2's parameters
    rc = generation.main(["--checkpoint", str(run_dir), "--step", "4", "--prompt", "x", "--max-new-tokens", "1"])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith(f"error: checkpoint step 4 in {run_dir / 'checkpoints'} is damaged (state/"), err
    assert snapshot(run_dir) == before  # a reader changes nothing
