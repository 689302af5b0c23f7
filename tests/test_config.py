"""Configs: every shipped YAML parses, overrides work, and wrong input fails clearly before any compilation."""

import dataclasses
from pathlib import Path

import jax
import pytest

import tedjax
from tedjax.config import ModelConfig, TrainConfig, check_mesh, load_config, parse_overrides

CONFIGS = sorted(Path(__file__).resolve().parents[1].glob("configs/*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_every_shipped_config_parses(path):
    config = load_config(str(path))
    assert isinstance(config, TrainConfig)
    mesh = config.mesh
    assert mesh.data * mesh.expert * mesh.tensor == 8, "shipped configs target 8 devices (one node / 8 CPU devices)"
    # The model fits its own mesh (checked without devices: sizes only).
    model = config.model
    if model.num_experts:
        assert model.num_experts % mesh.expert == 0
    assert model.n_heads % mesh.tensor == 0 and model.d_ff % mesh.tensor == 0
    assert config.data.micro_batch_size % (mesh.data * mesh.expert) == 0


def test_tiny_dense_is_the_flop_matched_twin():
    moe, dense = load_config("configs/tiny.yaml").model, load_config("configs/tiny_dense.yaml").model
    assert dense == moe.dense_twin()
    assert moe.flops_per_token(128) == pytest.approx(dense.flops_per_token(128), rel=0.01)  # router only differs
    assert moe.param_counts()["total"] > 3 * dense.param_counts()["total"]


def test_overrides_are_typed_and_nested():
    config = load_config("configs/tiny.yaml", ["model.top_k=2", "optimizer.learning_rate=1e-3", "steps=7",
                                               "model.dtd=true", "mesh.tensor=2"])  # fmt: skip
    assert config.model.top_k == 2 and config.steps == 7 and config.model.dtd is True
    assert config.optimizer.learning_rate == pytest.approx(1e-3)
    assert parse_overrides(["a.b.c=1", "a.d=x"]) == {"a": {"b": {"c": 1}, "d": "x"}}


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["model.nope=1"], "unknown config key model.nope"),
        (["optimiser.learning_rate=1"], "unknown config key optimiser"),
        (["model.top_k=two"], "model.top_k must be an integer"),
        (["model.capacity_factor=0"], "model.capacity_factor must be a number > 0"),
        (["model.capacity_factor=-1.5"], "model.capacity_factor must be a number > 0"),
        (["model.top_k=9"], "top_k=9 exceeds num_experts=8"),
        (["model.activation=relu"], "model.activation must be 'gelu' or 'swiglu'"),
        (["model.remat=sometimes"], "model.remat must be"),
        (["model.dtype=float16"], "model.dtype must be one of"),
        (["model.d_model=130"], "d_model=130 must be divisible by n_heads=4"),
        (["model.dtd=yes please"], "model.dtd must be true or false"),
        (["optimizer.b2=1.0"], "optimizer.b2 must be in [0, 1)"),
        (["data.batch_size=30", "data.grad_accum=4"], "must be divisible by data.grad_accum=4"),
        (["data.seq_len=4096"], "exceeds model.max_len"),
        (["data.source=web"], "data.source must be"),
        (["data.source=tokens"], "data.source=tokens needs data.path"),
        (["steps=0"], "steps must be an integer >= 1"),
        (["model.vocab_size=100"], "smaller than the byte tokenizer"),
        (["mesh.data=0"], "mesh.data must be an integer >= 1"),
        (["model"], "must look like key.sub=value"),
    ],
)
def test_bad_config_is_refused_with_the_key_named(overrides, message):
    with pytest.raises(ValueError, match=_escape(message)):
        load_config("configs/tiny.yaml", overrides)


def _escape(text: str) -> str:
    import re

    return re.escape(text)


def test_missing_config_file():
    with pytest.raises(FileNotFoundError, match="configs/nope.yaml does not exist"):
        load_config("configs/nope.yaml")


def test_make_mesh_errors():
    with pytest.raises(ValueError, match=r"needs 12 devices but 8 are given"):
        tedjax.make_mesh(2, 3, 2)
    with pytest.raises(ValueError, match=r"needs 16 devices.*xla_force_host_platform_device_count=16"):
        tedjax.make_mesh(2, 4, 2)
    with pytest.raises(ValueError, match="mesh axis 'expert' must be a positive integer"):
        tedjax.make_mesh(8, 0, 1)
    with pytest.raises(ValueError, match="mesh axis 'data' must be a positive integer"):
        tedjax.make_mesh(2.0, 2, 2)


def test_make_mesh_layout_tensor_innermost():
    mesh = tedjax.make_mesh(2, 2, 2)
    ids = [[[d.id for d in row] for row in plane] for plane in mesh.devices[0]]
    assert ids == [[[0, 1], [2, 3]], [[4, 5], [6, 7]]]
    assert mesh.axis_names == ("stage", "data", "expert", "tensor")  # "stage" outermost, size 1 by default
    staged = tedjax.make_mesh(2, 2, 1, stage=2)
    assert [d.id for d in staged.devices[1].flat] == [4, 5, 6, 7]  # each stage a contiguous block of devices
    assert all(t == jax.sharding.AxisType.Auto for t in mesh.axis_types)


@pytest.mark.parametrize(
    "changes, layout, batch, message",
    [
        ({"num_experts": 6}, (1, 4, 2), None, "num_experts=6 is not divisible by the expert axis (4)"),
        ({"n_heads": 2, "d_model": 32}, (1, 2, 4), None, "n_heads=2 is not divisible by the tensor axis (4)"),
        ({"d_ff": 65}, (2, 2, 2), None, "d_ff=65 is not divisible by the tensor axis (2)"),
        ({"expert_d_ff": 30}, (1, 2, 4), None, "expert_d_ff=30 is not divisible by the tensor axis (4)"),
        ({"vocab_size": 65}, (2, 2, 2), None, "vocab_size=65 is not divisible by the tensor axis (2)"),
        ({}, (2, 4, 1), 12, "batch size 12 is not divisible by data x expert = 8"),
    ],
)
def test_model_does_not_fit_mesh(changes, layout, batch, message):
    config = dataclasses.replace(ModelConfig(vocab_size=64, d_model=32, n_heads=4, d_ff=64, expert_d_ff=32), **changes)
    with pytest.raises(ValueError, match=_escape(message)):
        check_mesh(config, tedjax.make_mesh(*layout), batch_size=batch, seq_len=16 if batch else None)


def test_init_model_checks_before_compiling(monkeypatch):
    """The mesh check runs before any jit: a jit call would fail loudly here."""
    monkeypatch.setattr(jax, "jit", lambda *a, **k: pytest.fail("compiled before refusing the config"))
    with pytest.raises(ValueError, match="not divisible by the expert axis"):
        tedjax.init_model(ModelConfig(num_experts=6), tedjax.make_mesh(1, 4, 2))


def test_moe_layer_rejects_bad_top_k():
    from flax import nnx

    with pytest.raises(ValueError, match="top_k=3 must be between 1 and num_experts=2"):
        tedjax.MoE(8, 2, 8, top_k=3, rngs=nnx.Rngs(0))


def test_unknown_logical_axis_is_an_error_not_a_silent_replication():
    with pytest.raises(KeyError, match="logical axis 'experts_typo' has no rule"):
        tedjax.logical_to_spec(("experts_typo", None))
    with pytest.raises(ValueError, match="put mesh axis 'tensor' on two dims"):
        tedjax.logical_to_spec(("heads", "ffn"))


@pytest.mark.parametrize(
    "text, kind",
    [("- steps: 3\n", "list"), ("- [steps, 3]\n", "list"), ("steps 3\n", "str"), ("3\n", "int")],
    ids=["list of mappings", "list of pairs", "a string", "a number"],
)
def test_yaml_top_level_must_be_a_mapping(tmp_path, text, kind):
    """Bug 5: `- steps: 3` gave a Python error text and `- [steps, 3]` was silently read as steps=3."""
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ValueError, match=_escape(f"config file {path} must hold a mapping of keys to values at the "
                                                 f"top level (e.g. `steps: 3`, `model: {{d_model: 64}}`), got a {kind}")):
        load_config(str(path))


@pytest.mark.parametrize("text, key, line", [("steps: 3\nseed: 1\nsteps: 5\n", "steps", 3),
                                             ("model:\n  d_model: 64\n  top_k: 1\n  d_model: 32\n", "d_model", 4)],
                         ids=["top level", "nested"])
def test_yaml_duplicate_keys_are_refused(tmp_path, text, key, line):
    """Issue 20 item 17: plain YAML kept the last of two equal keys, silently."""
    path = tmp_path / "dup.yaml"
    path.write_text(text)
    with pytest.raises(ValueError, match=_escape(f"config file {path} is not valid YAML: key {key!r} appears twice "
                                                 f"in one mapping; keep one of them\n  in \"{path}\", line {line}")):
        load_config(str(path))


def test_group_size_is_checked_against_the_sequence_length_used():
    """Bug 6: group_size was checked against max_len, so a valid seq_len was refused."""
    config = load_config("configs/tiny.yaml", ["model.max_len=128", "data.seq_len=96", "model.group_size=24"])
    assert config.model.group_size == 24
    check_mesh(config.model, tedjax.make_mesh(2, 2, 2), config.data.micro_batch_size, config.data.seq_len)
    assert ModelConfig(max_len=128, group_size=24).group_size == 24  # the model alone does not know the length
    with pytest.raises(ValueError, match=_escape("model.group_size=40 must divide data.seq_len=96 or be a multiple")):
        load_config("configs/tiny.yaml", ["data.seq_len=96", "model.group_size=40"])
    with pytest.raises(ValueError, match=_escape("model.group_size=192 does not tile a micro-batch of 3 x 96 tokens")):
        load_config("configs/tiny.yaml", ["data.seq_len=96", "model.group_size=192", "data.batch_size=3"])
    load_config("configs/tiny.yaml", ["data.seq_len=96", "model.group_size=40", "model.num_experts=0"])  # dense: unused
