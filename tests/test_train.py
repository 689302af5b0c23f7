"""Training end to end: loss falls on real text, exact resume, resharding restore, ZeRO-1, global norm;
logs a cluster user can read, a resume that logs no step twice, a resume past the end that does nothing."""

import json
import math
import shutil
import struct
from pathlib import Path

import jax
import numpy as np
import pytest
from flax import nnx
from reference import FACTORIZATIONS, assert_placed_equal, init_state_on, max_abs_diff

import tedjax
from tedjax import analysis
from tedjax.checkpoint import Checkpointer, CheckpointError
from tedjax.config import load_config
from tedjax.data import synthetic_batches
from tedjax.loop import run
from tedjax.trainer import Trainer

SMALL_RUN = [
    "model.d_model=64", "model.n_layers=2", "model.n_heads=4", "model.d_ff=128", "model.expert_d_ff=128",
    "model.max_len=64", "data.seq_len=64", "data.batch_size=16", "log.progress=false", "log.every=1",
    "log.eval_batches=2", "optimizer.warmup_steps=2", "optimizer.learning_rate=0.01",
]  # fmt: skip


def small_config(tmp_path, *extra):
    return load_config("configs/tiny.yaml", [*SMALL_RUN, f"log.dir={tmp_path}", *extra])


@pytest.fixture(scope="module")
def straight_run(tmp_path_factory):
    """24 steps without stopping, checkpoints every 12 (saved on the (2, 2, 2) mesh)."""
    tmp = tmp_path_factory.mktemp("straight")
    config = small_config(tmp, "steps=24", "checkpoint.every=12", "log.eval_every=12")
    return config, run(config)


def test_loss_decreases_on_real_text(straight_run):
    config, result = straight_run
    losses = result.train_losses
    assert sorted(losses) == list(range(1, 25))
    assert np.mean([losses[23], losses[24]]) < losses[1] - 1.0
    # validation ran, and the log files exist and hold every step
    assert set(result.eval_losses) == {12, 24}
    records = [json.loads(line) for line in open(f"{config.log.dir}/metrics.jsonl")]
    train_steps = [r["step"] for r in records if r["kind"] == "train"]
    assert train_steps == list(range(1, 25))
    first = next(r for r in records if r["kind"] == "train")
    for key in ("loss", "lm_loss", "aux_loss_per_layer", "z_loss_per_layer", "learning_rate", "grad_norm",
                "tokens_per_s", "tflops_per_device", "expert_load", "dropped_fraction", "skipped_steps"):  # fmt: skip
        assert key in first, key
    # router losses are logged as means over MoE layers (aux 1.0 = balanced whatever the depth), not sums
    assert "aux_loss" not in first and 0.9 < first["aux_loss_per_layer"] < 2.0
    start = records[0]
    assert start["kind"] == "start" and start["step"] == 0 and start["config"] == config.to_dict()
    assert len(first["expert_load"]) == config.model.n_moe_layers
    assert len(first["expert_load"][0]) == config.model.num_experts
    assert any(p.name.startswith("events.out.tfevents") for p in Path(config.log.dir, "tensorboard").iterdir())


def test_tiny_run_beats_unigram_baseline(straight_run):
    """Even 24 small steps move validation loss below the unigram entropy of the text."""
    _, result = straight_run
    assert result.unigram_baseline is not None and 2.5 < result.unigram_baseline < 5.0
    assert result.eval_losses[24] < result.unigram_baseline


def tensorboard_events(directory: Path) -> list:
    """Every event of the TFRecord event files in `directory` (length, crc, payload, crc per record)."""
    from tensorboardX.proto.event_pb2 import Event

    events = []
    for path in sorted(directory.glob("events.out.tfevents.*")):
        data, at = path.read_bytes(), 0
        while at < len(data):
            (length,) = struct.unpack("<Q", data[at : at + 8])
            events.append(Event.FromString(data[at + 12 : at + 12 + length]))
            at += 12 + length + 4
    return events


def test_resume_continues_exactly(straight_run, tmp_path, capsys):
    config, straight = straight_run
    config = small_config(tmp_path, "steps=24", "checkpoint.every=12", "log.eval_every=12")
    first = run(config, stop_after=12)
    assert first.last_checkpoint == 12
    # The run that saved step 12 went on logging before it died: records of steps 13 and 14 (and a torn
    # line) in metrics.jsonl, and a step-13 event in TensorBoard.
    from tensorboardX import SummaryWriter

    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.writelines(json.dumps({"kind": "train", "step": s, "loss": 99.0}) + "\n" for s in (13, 14))
        f.write('{"kind": "train", "st')
    writer = SummaryWriter(str(tmp_path / "tensorboard"))
    writer.add_scalar("train/loss", 99.0, 13)
    writer.close()
    capsys.readouterr()
    second = run(config, resume=True)
    out = capsys.readouterr().out
    # where everything goes, then plain one-line records (stdout is not a terminal here)
    assert "tedjax run: config (built in Python); steps 12 -> 24" in out
    assert "mesh data=2 x expert=2 x tensor=2 on 8 cpu devices in 1 process" in out
    counts = config.model.param_counts()
    assert f"{counts['total']:,} parameters, {counts['active']:,} active per token" in out
    assert f"metrics     {tmp_path}/metrics.jsonl" in out and f"tensorboard {tmp_path}/tensorboard" in out
    assert f"checkpoints {tmp_path}/checkpoints (every 12 steps, keep 3)" in out
    assert f"moved 3 records of steps after 12 (from the run this one replaces) to {tmp_path}/" in out
    assert "step 13/24 | loss " in out and " tok/s | " in out and " s/step | load max/mean " in out
    assert "| dropped " in out and "| grad norm " in out and "| ETA 0:" in out
    # every step logged once; the dead run's records kept aside, its TensorBoard events purged from step 13
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r["kind"] == "train"] == list(range(1, 25))
    assert all(r["loss"] < 90 for r in records if r["kind"] == "train")
    assert [r["step"] for r in records if r["kind"] == "start"] == [0, 12]
    superseded = (tmp_path / "metrics.superseded.jsonl").read_text().splitlines()
    assert len(superseded) == 3 and json.loads(superseded[0])["step"] == 13
    starts = [e.step for e in tensorboard_events(tmp_path / "tensorboard") if e.session_log.status == 1]  # START
    assert starts == [13]
    for step in range(13, 25):
        assert second.train_losses[step] == pytest.approx(straight.train_losses[step], rel=1e-5, abs=1e-6)
    final = jax.tree.map(np.asarray, second.state.params)
    assert max_abs_diff(final, jax.tree.map(np.asarray, straight.state.params)) < 1e-5


def snapshot(root: Path) -> dict:
    return {p.relative_to(root).as_posix(): (p.read_bytes() if p.is_file() else "dir") for p in sorted(root.rglob("*"))}


def test_resume_at_or_past_the_end_does_nothing(straight_run, tmp_path, capsys):
    """Bug 1: `steps=10 --resume` on a finished 20-step run exited 0 after writing checkpoint 10 with the
    step-20 state, deleting checkpoint 15 by rotation and logging an eval record as step 10."""
    config, _ = straight_run
    shutil.copytree(config.log.dir, tmp_path / "run")
    before = snapshot(tmp_path / "run")
    lower = small_config(tmp_path / "run", "steps=12", "checkpoint.every=12", "log.eval_every=12")
    with pytest.raises(CheckpointError, match=r"steps: 24 -> 12 \(lowering steps shortens the learning-rate"):
        run(lower, resume=True)
    same = small_config(tmp_path / "run", "steps=24", "checkpoint.every=12", "log.eval_every=12")
    for cfg, allow in ((lower, ["steps"]), (same, [])):
        capsys.readouterr()
        result = run(cfg, resume=True, allow_change=allow)
        assert (result.train_losses, result.eval_losses, result.last_checkpoint) == ({}, {}, 24)
        assert int(result.state.step) == 24
        assert (f"checkpoint step 24 in {tmp_path}/run/checkpoints already reaches steps={cfg.steps}: nothing to do; "
                "nothing was changed") in capsys.readouterr().out  # fmt: skip
    assert snapshot(tmp_path / "run") == before


def test_sample_after_a_run_on_byte_token_files(straight_run, tmp_path):
    """Issue 20 item 19: token files from `prepare` say tokenizer "utf8-bytes", which was taken for a Hugging Face
    tokenizer, so a data.source=tokens run printed no sample. A real HF tokenizer still gets none (ids aren't bytes)."""
    import copy
    import dataclasses

    from tedjax import data
    from tedjax.generation import sample_after_training

    (tmp_path / "text").mkdir()
    (tmp_path / "text" / "a.py").write_text("def f(x):\n    return x + 1\n" * 40)
    meta = data.prepare([tmp_path / "text"], tmp_path / "tokens", val_fraction=0.1)
    assert meta["tokenizer"] == "utf8-bytes"
    config, result = straight_run
    trainer = copy.copy(result.trainer)
    trainer.config = dataclasses.replace(config, data=dataclasses.replace(config.data, source="tokens",
                                                                          path=str(tmp_path / "tokens")))
    on_tokens = dataclasses.replace(result, trainer=trainer)
    sample = sample_after_training(on_tokens, max_new_tokens=6)
    assert isinstance(sample, str) and sample.startswith("def ") and len(sample.encode()) >= 6
    meta_path = tmp_path / "tokens" / "meta.json"
    meta_path.write_text(json.dumps(dict(meta, tokenizer=f"hf:{tmp_path}/tokenizer.json")))
    assert sample_after_training(on_tokens, max_new_tokens=6) is None


def test_plain_log_line():
    from tedjax.logs import format_postfix, format_record

    record = {"loss": 3.5, "lm_loss": 3.4, "aux_loss_per_layer": 1.02, "z_loss_per_layer": 0.5, "tokens_per_s": 1234.5,
              "mfu": 0.125, "expert_load": [[0.5, 0.25, 0.25, 0.0], [0.25] * 4], "dropped_fraction": [0.1, 0.0],
              "learning_rate": 1e-3, "skipped_steps": 2, "grad_norm": 0.53214, "seconds_per_step": 12.5}  # fmt: skip
    assert format_record(10, 300, record) == ("step 10/300 | loss 3.5000 (lm 3.4000, aux/layer 1.02, z/layer 0.5) | "
                                              "grad norm 0.532 | 1,234 tok/s | 12.5 s/step | mfu 12.5% | "
                                              "load max/mean 2.00 | dropped 5.0% | lr 1.00e-03 | skipped 2 | "
                                              "ETA 1:00:25")  # fmt: skip (290 steps x 12.5 s)
    assert format_record(300, 300, record).endswith("| skipped 2")  # no ETA once done
    assert format_record(20, 300, {"lm_loss": 2.0}, "eval") == "step 20/300 | eval lm_loss 2.0000"
    # what the bar shows on a terminal (it showed loss and tok/s only)
    assert format_postfix(record) == "loss 3.5000, aux 1.02, load 2.00, drop 5.0%, lr 1.00e-03, 1,234 tok/s, skipped 2"
    # the shadows a step used (issue 26), on the bar and the plain line; 4 = an empty slot of E = 4
    shadowed = dict(record, shadow_ids=[[0, 4], [4, 4]])
    assert "drop 5.0%, shadows L0 0 L1 none, lr" in format_postfix(shadowed)
    assert "| dropped 5.0% | shadows L0 0 L1 none | lr" in format_record(10, 300, shadowed)


def test_progress_bar_shows_balance_and_closes_before_the_final_lines(tmp_path, monkeypatch):
    """Issue 20 item 21: on a terminal the bar hid drops, load, aux and lr, and its last redraw came after
    "final val loss". stdout and stderr share one fake terminal here, so the order is what a user sees."""
    import io
    import sys

    from reference import TINY_RUN_OVERRIDES

    class Terminal(io.StringIO):
        def isatty(self):
            return True

    terminal = Terminal()
    monkeypatch.setattr(sys, "stdout", terminal)
    monkeypatch.setattr(sys, "stderr", terminal)
    config = load_config(None, [*TINY_RUN_OVERRIDES, "steps=2", "log.progress=true", f"log.dir={tmp_path}",
                                "mesh.data=1", "mesh.expert=1", "mesh.tensor=1"])  # fmt: skip
    run(config, mesh=tedjax.make_mesh(devices=jax.devices()[:1]))
    out = terminal.getvalue()
    for shown in ("loss ", ", aux ", ", load ", ", drop ", ", lr ", " tok/s"):
        assert shown in out.rsplit("2/2", 1)[1], shown  # in the finished bar's postfix
    assert out.rindex("2/2") < out.index("final val loss")


def test_restore_onto_another_mesh_reshards(straight_run):
    config, straight = straight_run
    new_mesh = tedjax.make_mesh(1, 4, 2)
    trainer = Trainer(config, new_mesh)
    state, meta = Checkpointer(config, resume=True).restore(trainer.abstract_state())
    assert meta["step"] == 24
    expert_w = state.params["units"]["blocks"][1]["ffn"]["w_in"]  # [n_moe, E, D, F]
    assert expert_w.sharding.mesh.shape == new_mesh.shape
    assert expert_w.sharding.spec == jax.sharding.PartitionSpec(None, "expert", None, "tensor")
    np_restored = jax.tree.map(np.asarray, state.params)
    assert max_abs_diff(np_restored, jax.tree.map(np.asarray, straight.state.params)) == 0.0
    # the next step gives the same loss on both meshes
    batch = next(synthetic_batches(config.model.vocab_size, 16, 64, seed=3))
    losses = []
    for trainer_i, state_i in ((trainer, state), (straight.trainer, straight.state)):
        with jax.set_mesh(trainer_i.mesh):
            _, metrics = trainer_i.train_step(state_i, trainer_i.shard_batch(batch))
        losses.append(float(metrics["loss"]))
    assert losses[0] == pytest.approx(losses[1], rel=1e-5)


# ---------------------------------------------------------------- ZeRO-1


def _zero1_trainer(layout, zero1=True, tmp="/tmp/unused"):
    config = load_config("configs/tiny.yaml", [*SMALL_RUN, f"log.dir={tmp}", f"optimizer.zero1={str(zero1).lower()}",
                                               f"mesh.data={layout[0]}", f"mesh.expert={layout[1]}",
                                               f"mesh.tensor={layout[2]}"])  # fmt: skip
    return Trainer(config, tedjax.make_mesh(*layout))


def _per_device_bytes(tree) -> int:
    device = jax.devices()[0]
    return sum(s.data.nbytes for leaf in jax.tree.leaves(tree) for s in leaf.addressable_shards if s.device == device)


@pytest.mark.parametrize("layout", [(2, 2, 2), (1, 4, 2), (8, 1, 1)], ids=lambda s: "x".join(map(str, s)))
def test_zero1_optimizer_state_bytes_match_the_formula(layout):
    data, expert, tensor = layout
    trainer = _zero1_trainer(layout)
    state = trainer.init_state()
    # Formula (NOTES.md section 1): Adam's mu and nu (2 x 4 bytes per element), each parameter
    # split over its own shards, then over its data-parallel group: data x expert for
    # non-expert parameters, data for expert parameters.
    expected = 0
    _, abstract, _ = nnx.split(tedjax.model.abstract_model(trainer.config.model), nnx.Param, ...)  # trained only
    for v in jax.tree.leaves(abstract, is_leaf=lambda x: isinstance(x, nnx.Variable)):
        spec = tedjax.logical_to_spec(v.logical_axes)
        is_expert = "experts" in v.logical_axes
        model_split = (tensor if "tensor" in jax.tree.leaves(tuple(spec)) else 1) * (expert if is_expert else 1)
        dp_group = data if is_expert else data * expert
        expected += 2 * 4 * math.prod(v.shape) // (model_split * dp_group)
    scalars = 4 * 2  # Adam's count and the schedule's count, replicated
    assert _per_device_bytes(state.opt_state) == expected + scalars
    replicated = _zero1_trainer(layout, zero1=False).init_state()
    if data * expert > 1:
        assert _per_device_bytes(replicated.opt_state) > 1.5 * _per_device_bytes(state.opt_state)


def test_zero1_update_gathers_parameters_over_their_data_parallel_group():
    trainer = _zero1_trainer((2, 2, 2))
    colls = analysis.collectives(trainer.lower_train_step().compile(), trainer.mesh)
    # float32 gathers are the parameters' (the embedding backward also gathers int32 token ids)
    gathers = analysis.summarize([c for c in colls if c.kind == "all-gather" and c.shape.startswith("f32")])
    # every updated shard is gathered back: non-expert params over (data, expert), expert params over data
    params = trainer.abstract_params
    expert_bytes = sum(4 * math.prod(p.shape) // (2 * 2) for p in jax.tree.leaves(params) if p.ndim == 4 and
                       p.shape[1] == trainer.config.model.num_experts)  # fmt: skip  ([units, E, ...], scanned)
    assert gathers[("all-gather", ("data",))]["result_bytes"] == expert_bytes
    assert ("all-gather", ("data", "expert")) in gathers
    assert not any("expert" in axes and "data" not in axes for (_, axes) in gathers)


# ---------------------------------------------------------------- global norm


@pytest.fixture(scope="module")
def one_step_batch():
    return next(synthetic_batches(256, 16, 64, seed=5))


def _grad_norm_on(layout, batch):
    trainer = _zero1_trainer(layout)
    state = init_state_on(trainer)
    with jax.set_mesh(trainer.mesh):
        _, metrics = trainer.train_step(state, trainer.shard_batch(batch))
    return float(metrics["grad_norm"]), float(metrics["loss"])


@pytest.fixture(scope="module")
def one_device_norm(one_step_batch):
    config = load_config("configs/tiny.yaml", [*SMALL_RUN, "mesh.data=1", "mesh.expert=1", "mesh.tensor=1"])
    trainer = Trainer(config, tedjax.make_mesh(1, 1, 1, devices=jax.devices()[:1]))
    with jax.set_mesh(trainer.mesh):
        _, metrics = trainer.train_step(trainer.init_state(), trainer.shard_batch(one_step_batch))
    return float(metrics["grad_norm"]), float(metrics["loss"])


@pytest.mark.slow
@pytest.mark.parametrize("layout", FACTORIZATIONS, ids=lambda s: "x".join(map(str, s)))
def test_global_grad_norm_counts_every_expert_once(layout, one_step_batch, one_device_norm):
    norm, loss = _grad_norm_on(layout, one_step_batch)
    assert loss == pytest.approx(one_device_norm[1], rel=1e-5)
    assert norm == pytest.approx(one_device_norm[0], rel=1e-4)


@pytest.mark.parametrize("layout", [(2, 2, 2)], ids=lambda s: "x".join(map(str, s)))
def test_init_state_on_equals_init_state(layout):
    """The tests' shortcut (one device's initial train state placed in the trainer's shardings) is the trainer's
    own sharded init, bit for bit and in the same shardings."""
    trainer = _zero1_trainer(layout)
    placed, built = init_state_on(trainer), trainer.init_state()
    assert_placed_equal(placed, built)
