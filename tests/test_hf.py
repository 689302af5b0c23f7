"""Hugging Face interop against transformers' own numbers (tests/fixtures/hf, made by tools/make_hf_fixtures.py).

No torch or transformers needed, except in the one test that loads a saved
directory back into transformers (skipped where it is not installed).
"""

import dataclasses
import json
import shutil
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import load_file, save_file

import tedjax
from tedjax import hf
from tedjax.config import load_config
from tedjax.model import moe_stack

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "hf"
ARCHS = ("mixtral", "qwen3_moe")
# 1 device and 5 layouts of 8: data, expert and tensor parallel alone and combined (both models have 2 KV heads).
LAYOUTS = [(1, 1, 1), (8, 1, 1), (2, 4, 1), (2, 2, 2), (4, 1, 2), (1, 4, 2)]


def golden(arch: str) -> dict[str, np.ndarray]:
    return dict(np.load(FIXTURES / f"{arch}_golden.npz"))


def mesh_of(layout):
    return tedjax.make_mesh(*layout, devices=jax.devices()[: int(np.prod(layout))])


@pytest.fixture(scope="module")
def loaded():
    """arch -> layout -> (config, model); each loaded once for the whole module."""
    return {arch: {layout: hf.load(FIXTURES / arch, mesh_of(layout)) for layout in LAYOUTS} for arch in ARCHS}


def _eval_logits(graphdef, state, tokens_bl, train=False):
    model = nnx.merge(graphdef, state)
    model.train() if train else model.eval()
    return model(tokens_bl)[0]


# functional: the model is left as it is
_eval_logits_jit = jax.jit(_eval_logits, static_argnames=("graphdef", "train"))


def logits_of(model, tokens_bl, train=False) -> np.ndarray:
    """Logits in evaluation (or training) mode, dropless for imported models; the batch tiled to 8 rows (divides
    every layout)."""
    mesh = model.embed[...].sharding.mesh
    rows = tokens_bl.shape[0]
    tiled = np.tile(tokens_bl, (8 // rows, 1))
    graphdef, state = nnx.split(model)
    with jax.set_mesh(mesh):
        batch = jax.device_put(jnp.asarray(tiled, jnp.int32), tedjax.named_sharding(mesh, ("batch", None)))
        logits = _eval_logits_jit(graphdef, state, batch, train)
    return np.asarray(logits)[:rows]


def params_of(model) -> dict:
    return jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(model, nnx.Param)))


def assert_close_to(logits, reference):
    """Relative to the logits' scale: max |tedjax - transformers| <= 1e-4 x max |transformers| (float32)."""
    scale = np.max(np.abs(reference))
    error = np.max(np.abs(logits - reference))
    assert error <= 1e-4 * scale, f"max error {error:.3g} vs scale {scale:.3g}"


@pytest.mark.parametrize("layout", LAYOUTS, ids=lambda layout: "x".join(map(str, layout)))
@pytest.mark.parametrize("arch", ARCHS)
def test_logits_equal_transformers(loaded, arch, layout):
    config, model = loaded[arch][layout]
    gold = golden(arch)
    assert_close_to(logits_of(model, gold["input_ids"]), gold["logits"])
    assert_close_to(logits_of(model, gold["input_ids"], train=True), gold["logits"])  # dropless in training too
    # loaded straight into TED's layout: experts over "expert", heads and expert FFN over "tensor"
    moe = moe_stack(model)  # [n_moe, E, D, F]: the scanned units' leading "layers" axis first
    assert moe.w_in[...].sharding.spec[1] == "expert"
    assert model.units.blocks[0].attn.wk[...].sharding.spec[2] == "tensor"
    assert {d.id for d in moe.w_in[...].sharding.device_set} == {d.id for d in mesh_of(layout).devices.flat}


def test_imported_configs():
    mixtral = hf.model_config(FIXTURES / "mixtral")
    assert (mixtral.n_heads, mixtral.n_kv_heads, mixtral.head_size, mixtral.qk_norm) == (4, 2, 8, False)
    assert (mixtral.num_experts, mixtral.top_k, mixtral.router_renormalize, mixtral.moe_every) == (4, 2, True, 1)
    assert (mixtral.norm_eps, mixtral.rope_base) == (1e-5, 1e6)
    qwen = hf.model_config(FIXTURES / "qwen3_moe")
    assert (qwen.head_size, qwen.qk_norm, qwen.router_renormalize, qwen.moe_every) == (16, True, False, 2)
    assert qwen.d_ff == 48
    for config in (mixtral, qwen):  # as transformers computes: no choice is ever dropped
        assert config.capacity_scope == "dropless"
    assert hf.model_config(FIXTURES / "mixtral", dtype="bfloat16").dtype == "bfloat16"
    with pytest.raises(hf.HFCheckpointError, match="d_model"):
        hf.model_config(FIXTURES / "mixtral", d_model=64)


@pytest.mark.parametrize("arch", ARCHS)
def test_save_then_load_is_bit_exact(loaded, arch, tmp_path):
    _, model = loaded[arch][(2, 2, 2)]
    # several files, to exercise model.safetensors.index.json too
    out = hf.save(model, tmp_path / arch, max_shard_bytes=60_000, tokenizer_from=FIXTURES / arch)
    assert (out / "model.safetensors.index.json").is_file() and (out / "tokenizer.json").is_file()
    original = load_file(FIXTURES / arch / "model.safetensors")
    written = {}
    for file in out.glob("*.safetensors"):
        written.update(load_file(file))
    assert sorted(written) == sorted(original)
    for name, tensor in original.items():
        assert written[name].dtype == tensor.dtype and np.array_equal(written[name], tensor), name
    config2, model2 = hf.load(out, mesh_of((1, 4, 2)))
    assert config2 == hf.model_config(FIXTURES / arch)
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(a, b), params_of(model2), params_of(model))


def native_config(**changes) -> tedjax.ModelConfig:
    base = dict(vocab_size=64, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=48, max_len=32, num_experts=4,
                expert_d_ff=16, top_k=2, activation="swiglu", moe_every=2, qk_norm=True, head_dim=16)
    return tedjax.ModelConfig(**{**base, **changes})


def test_native_model_round_trip(tmp_path):
    """A model made in tedjax exports exactly: with qk_norm and a dense layer it is a Qwen3-MoE."""
    config = native_config()
    model = tedjax.init_model(config, mesh_of((2, 2, 2)), seed=3)
    out = hf.save(model, tmp_path / "native")
    assert json.loads((out / "config.json").read_text())["architectures"] == ["Qwen3MoeForCausalLM"]
    assert hf.export_kind(native_config(qk_norm=False, moe_every=1)) == "mixtral"
    config2, model2 = hf.load(out, mesh_of((1, 1, 1)))
    assert hf._architecture(config2) == hf._architecture(config)
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(a, b), params_of(model2), params_of(model))


def test_save_refuses_models_without_an_equivalent(tmp_path):
    from tedjax.model import abstract_model  # the refusal comes before any weight is read

    gelu = abstract_model(native_config(activation="gelu"))
    with pytest.raises(hf.HFCheckpointError, match="activation='gelu'"):
        hf.save(gelu, tmp_path / "gelu")
    mixtral_top1 = abstract_model(native_config(qk_norm=False, moe_every=1, top_k=1))
    with pytest.raises(hf.HFCheckpointError, match="router_renormalize"):
        hf.save(mixtral_top1, tmp_path / "top1")
    assert not (tmp_path / "gelu").exists() and not (tmp_path / "top1").exists()


def test_save_writes_experts_in_logical_order(loaded, tmp_path):
    """Expert weights live in physical slots; `save` writes them back in logical order whatever the placement."""
    _, model = loaded["mixtral"][(1, 1, 1)]
    model = nnx.merge(*nnx.split(model))  # a copy whose placement can change
    moe = moe_stack(model)  # every MoE layer: [n_moe, E, ...]
    perm = np.array([2, 0, 3, 1])  # logical expert e sits in slot perm[e]
    for name in ("w_in", "w_gate", "w_out"):
        weight = getattr(moe, name)
        physical = np.zeros_like(np.asarray(weight[...]))
        physical[:, perm] = np.asarray(weight[...])
        weight[...] = jnp.asarray(physical)
    moe.placement[...] = jnp.broadcast_to(jnp.asarray(perm, jnp.int32), moe.placement.shape)
    out = hf.save(model, tmp_path / "placed")
    original, written = load_file(FIXTURES / "mixtral" / "model.safetensors"), load_file(out / "model.safetensors")
    for name in original:
        assert np.array_equal(written[name], original[name]), name


def test_loads_bfloat16_checkpoints(tmp_path):
    """Real checkpoints are bfloat16; numpy has no bfloat16, so those tensors are read through jax."""
    import ml_dtypes
    from safetensors.flax import save_file as save_flax

    src = FIXTURES / "mixtral"
    shutil.copytree(src, tmp_path / "bf16")
    tensors = load_file(src / "model.safetensors")
    save_flax({k: jnp.asarray(v.astype(ml_dtypes.bfloat16)) for k, v in tensors.items()},
              str(tmp_path / "bf16" / "model.safetensors"))
    _, model = hf.load(tmp_path / "bf16", mesh_of((1, 1, 1)))
    got = np.asarray(model.units.blocks[0].attn.wq[...][0])  # layer 0: unit 0 of the stack
    want = tensors["model.layers.0.self_attn.q_proj.weight"].astype(ml_dtypes.bfloat16).astype(np.float32)
    np.testing.assert_array_equal(got, want.T.reshape(got.shape))


# --------------------------------------------------------------------------- bad input


def copy_fixture(tmp_path, arch="mixtral") -> Path:
    return Path(shutil.copytree(FIXTURES / arch, tmp_path / arch))


def edit_config(directory: Path, **changes) -> None:
    path = directory / "config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


@pytest.fixture
def no_weight_read(monkeypatch):
    """Fails the test if any parameter is built: the error must come first."""

    def refuse(*args, **kwargs):
        raise AssertionError("a weight was loaded before the error")

    monkeypatch.setattr(hf.jax, "make_array_from_callback", refuse)


def test_directory_without_config_json(tmp_path, no_weight_read):
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(hf.HFCheckpointError, match="has no config.json"):
        hf.load(tmp_path, mesh_of((1, 1, 1)))
    with pytest.raises(hf.HFCheckpointError, match="does not exist"):
        hf.load(tmp_path / "nope", mesh_of((1, 1, 1)))


def test_unsupported_architecture(tmp_path, no_weight_read):
    d = copy_fixture(tmp_path)
    edit_config(d, architectures=["LlamaForCausalLM"], model_type="llama")
    with pytest.raises(hf.HFCheckpointError, match="'LlamaForCausalLM'.*supported: MixtralForCausalLM, "
                                                   "Qwen3MoeForCausalLM"):
        hf.load(d, mesh_of((1, 1, 1)))


@pytest.mark.parametrize("change, message", [
    ({"tie_word_embeddings": True}, "tie_word_embeddings=true is not supported"),
    ({"rope_parameters": {"rope_type": "dynamic", "rope_theta": 1e6, "factor": 4.0}},
     "rope_type 'dynamic' \\(in rope_parameters\\) is not supported"),
    ({"hidden_act": "gelu"}, "hidden_act='gelu'"),
    ({"num_attention_heads": None}, "'num_attention_heads' is missing"),
])  # fmt: skip
def test_unsupported_features_are_named(tmp_path, no_weight_read, change, message):
    d = copy_fixture(tmp_path)
    edit_config(d, **change)
    with pytest.raises(hf.HFCheckpointError, match=message):
        hf.load(d, mesh_of((1, 1, 1)))


def test_shape_that_does_not_match_the_config(tmp_path, no_weight_read):
    d = copy_fixture(tmp_path)
    edit_config(d, intermediate_size=64)
    with pytest.raises(hf.HFCheckpointError) as err:
        hf.load(d, mesh_of((1, 1, 1)))
    text = str(err.value)
    assert "nothing was loaded" in text
    assert "'model.layers.0.block_sparse_moe.experts.0.w1.weight' in model.safetensors has shape [32, 32] but " \
           "config.json implies [64, 32]" in text


def test_missing_and_unmapped_tensors(tmp_path, no_weight_read):
    d = copy_fixture(tmp_path)
    tensors = load_file(d / "model.safetensors")
    tensors["model.layers.0.block_sparse_moe.experts.4.w1.weight"] = tensors.pop(
        "model.layers.0.block_sparse_moe.experts.3.w1.weight")
    save_file(tensors, str(d / "model.safetensors"))
    with pytest.raises(hf.HFCheckpointError) as err:
        hf.load(d, mesh_of((1, 1, 1)))
    assert "tensor 'model.layers.0.block_sparse_moe.experts.3.w1.weight' is missing" in str(err.value)
    assert "'model.layers.0.block_sparse_moe.experts.4.w1.weight' in model.safetensors has no place" in str(err.value)


def test_checkpoint_that_does_not_divide_the_mesh(no_weight_read):
    """The messages name config.json's keys, which the user wrote, not tedjax's fields (issue 20 item 9)."""
    with pytest.raises(ValueError, match=r"config.json's num_key_value_heads=2 is not divisible by the tensor axis "
                                         r"\(4\); choose mesh.tensor dividing config.json's num_key_value_heads"):
        hf.load(FIXTURES / "mixtral", mesh_of((1, 2, 4)))
    with pytest.raises(ValueError, match=r"config.json's num_local_experts=4 is not divisible by the expert axis "
                                         r"\(8\)"):
        hf.load(FIXTURES / "mixtral", mesh_of((1, 8, 1)))


def test_dense_checkpoint_is_named_by_its_config_key(tmp_path, no_weight_read):
    d = copy_fixture(tmp_path)
    edit_config(d, num_local_experts=0)
    with pytest.raises(hf.HFCheckpointError, match=r"num_local_experts=0 \(a dense model\) is not supported"):
        hf.load(d, mesh_of((1, 1, 1)))
    edit_config(d, num_local_experts=4, num_key_value_heads=3)  # 4 heads are no multiple of 3
    with pytest.raises(hf.HFCheckpointError, match=r"config.json: config.json's num_attention_heads=4 must be a "
                                                   r"multiple of config.json's num_key_value_heads=3"):
        hf.load(d, mesh_of((1, 1, 1)))


# --------------------------------------------------------------------------- fine-tuning and tokens


def test_init_from_takes_the_architecture_from_the_checkpoint():
    d = FIXTURES / "mixtral"
    config = load_config("configs/tiny.yaml", [f"init_from=hf:{d}", "model.capacity_factor=1.5"])
    assert hf._architecture(config.model) == hf._architecture(hf.model_config(d))
    assert config.model.capacity_factor == 1.5 and config.model.max_len == 128  # the YAML's other keys stay
    with pytest.raises(ValueError, match="init_from must be '' or 'hf:DIR'"):
        load_config("configs/tiny.yaml", [f"init_from={d}"])


def test_init_from_loads_the_weights_into_the_train_state():
    from tedjax.config import DataConfig, MeshConfig, TrainConfig
    from tedjax.loop import _init_from
    from tedjax.trainer import Trainer

    d = FIXTURES / "qwen3_moe"
    config = TrainConfig(init_from=f"hf:{d}", model=hf.model_config(d), mesh=MeshConfig(2, 2, 2),
                         data=DataConfig(source="synthetic", seq_len=16, batch_size=8))
    trainer = Trainer(config, mesh_of((2, 2, 2)))
    state = _init_from(trainer, trainer.init_state(), str(d))
    _, model = hf.load(d, mesh_of((1, 1, 1)))
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(a, b), jax.tree.map(np.asarray, state.params),
                 params_of(model))
    assert all(jax.tree.leaves(jax.tree.map(lambda a, s: a.sharding == s, state.params, trainer.param_shardings)))
    assert not any(np.any(np.asarray(m)) for m in jax.tree.leaves(state.opt_state) if np.ndim(m) > 0)


def test_prepare_with_a_hugging_face_tokenizer(tmp_path):
    from tedjax import data

    src = tmp_path / "src"
    src.mkdir()
    texts = ["def fibonacci(n):\n    return n\n" * 20, "class Stack:\n    pass\n" * 20]
    for i, text in enumerate(texts):
        (src / f"{i}.py").write_text(text)
    assert data.main(["prepare", "--out", str(tmp_path / "tok"), "--tokenizer", str(FIXTURES / "mixtral"),
                      "--val-fraction", "0.1", str(src)]) == 0
    meta = data.read_meta(tmp_path / "tok")
    assert meta["vocab_size"] == 512 and meta["tokenizer"].startswith("hf:") and meta["doc_separator_ids"] == [0]
    tokenizer = data.HFTokenizer(FIXTURES / "mixtral")
    train = data.TokenFile(tmp_path / "tok", "train").tokens
    pieces = np.split(np.asarray(train), np.flatnonzero(np.asarray(train) == 0) + 1)
    decoded = [tokenizer.decode(p[p != 0]) for p in pieces if len(p)]
    assert len(decoded) == 2 and all(len(d) > 100 and text.startswith(d) for d, text in zip(decoded, texts))


def test_saved_directory_loads_in_transformers(loaded, variants, tmp_path):
    why = "torch and transformers are the optional hf-fixtures extra (pip install -e '.[hf-fixtures]'), not in CI"
    torch = pytest.importorskip("torch", reason=why)
    transformers = pytest.importorskip("transformers", reason=why)
    cases = [(arch, loaded[arch][(2, 2, 2)][1]) for arch in ARCHS]
    cases.append(("native", tedjax.init_model(native_config(vocab_size=512), mesh_of((1, 1, 1)), seed=1)))
    # RoPE scaling and the window as written by save; a padded vocabulary written unpadded
    cases += [(name, hf.load(variants[name], mesh_of((1, 1, 1)))[1]) for name in VARIANTS]
    cases.append(("odd_vocab", hf.load(odd_vocab_checkpoint(tmp_path / "odd"), mesh_of((1, 1, 2)))[1]))
    gold = golden("mixtral")["input_ids"]
    for name, model in cases:
        out = hf.save(model, tmp_path / name)
        theirs = transformers.AutoModelForCausalLM.from_pretrained(out, torch_dtype=torch.float32).eval()
        with torch.no_grad():
            reference = theirs(torch.tensor(gold, dtype=torch.long)).logits.numpy()
        assert_close_to(logits_of(model, gold)[..., : reference.shape[-1]], reference)


# --------------------------------------------------------------------------- issue 20: RoPE scaling, window, ...

MANIFEST = json.loads((FIXTURES / "manifest.json").read_text())["models"]
VARIANTS = ("qwen3_moe_yarn", "mixtral_linear", "mixtral_window")  # tools/make_hf_fixtures.py VARIANTS
VARIANT_LAYOUTS = [(2, 2, 2)]  # every axis split; test_saved_config_writes_what_was_read checks (1, 1, 1)


def variant_dir(root: Path, name: str) -> Path:
    """The base fixture's files with the variant's config.json (the fixtures store only what differs)."""
    d = Path(shutil.copytree(FIXTURES / MANIFEST[name]["base"], root / name))
    shutil.copy(FIXTURES / "variants" / f"{name}.json", d / "config.json")
    return d


@pytest.fixture(scope="module")
def variants(tmp_path_factory):
    root = tmp_path_factory.mktemp("variants")
    return {name: variant_dir(root, name) for name in VARIANTS}


@pytest.mark.parametrize("layout", VARIANT_LAYOUTS, ids=lambda layout: "x".join(map(str, layout)))
@pytest.mark.parametrize("name", VARIANTS)
def test_variant_logits_equal_transformers(variants, name, layout):
    """YaRN in `rope_scaling` beside `rope_parameters` (Qwen's documented form), linear scaling in
    `rope_parameters`, and a Mixtral window of 6 over 16 positions: transformers' logits at every position."""
    config, model = hf.load(variants[name], mesh_of(layout))
    gold = golden(name)
    assert_close_to(logits_of(model, gold["input_ids"]), gold["logits"])
    # and they are not the base model's: each setting changes the logits a lot
    base = golden(MANIFEST[name]["base"])["logits"]
    assert np.max(np.abs(gold["logits"] - base)) > 0.1 * np.max(np.abs(base))


def test_variant_configs(variants):
    for name, expected in [
        ("qwen3_moe_yarn", dict(rope_scaling="yarn", rope_factor=4.0, rope_original_max_len=32, rope_base=1e4,
                                rope_attention_factor=0.0, rope_beta_fast=32.0, rope_beta_slow=1.0)),
        ("mixtral_linear", dict(rope_scaling="linear", rope_factor=2.0, rope_base=1e6)),
        ("mixtral_window", dict(sliding_window=6, rope_scaling="none", max_len=128)),
    ]:
        config = hf.model_fields(variants[name])
        assert {k: config[k] for k in expected} == expected, name


def test_window_is_no_context_cap(variants):
    """No max_len switches the window off, directly or through init_from with a YAML (issue 20 item 2)."""
    d = variants["mixtral_window"]
    config = hf.model_config(d, max_len=16)
    assert config.sliding_window == 6 and config.max_len == 16
    _, model = hf.load(d, mesh_of((1, 1, 1)), max_len=16)
    gold = golden("mixtral_window")
    assert_close_to(logits_of(model, gold["input_ids"]), gold["logits"])
    train = load_config("configs/tiny.yaml", [f"init_from=hf:{d}", "model.max_len=128"])
    assert train.model.sliding_window == 6
    with pytest.raises(hf.HFCheckpointError, match="sliding_window"):
        hf.model_config(d, sliding_window=0)


@pytest.mark.parametrize("change, message", [
    ({"rope_scaling": {"rope_type": "longrope", "factor": 2.0}}, r"rope_type 'longrope' \(in rope_scaling\)"),
    ({"rope_scaling": {"type": "dynamic", "factor": 2.0}}, r"rope_type 'dynamic' \(in rope_scaling\)"),
    ({"rope_parameters": {"rope_type": "llama3", "factor": 8.0, "rope_theta": 1e6}}, r"rope_type 'llama3'"),
    ({"rope_parameters": {"full_attention": {"rope_type": "linear", "factor": 2.0}}},
     r"rope_parameters nested per layer type \(full_attention\)"),
    ({"partial_rotary_factor": 0.5}, r"partial_rotary_factor=0.5"),
    ({"rope_parameters": {"rope_type": "default", "rope_theta": 1e4}, "rope_scaling": {"type": "linear", "factor": 2}},
     r"rope_theta=1000000.0 .*not rope_parameters.rope_theta=10000.0"),
    ({"rope_scaling": {"rope_type": "linear"}}, r"rope_scaling.factor=None must be a number"),
    ({"sliding_window": 0}, r"sliding_window=0 must be an integer >= 1"),
])  # fmt: skip
def test_rope_settings_tedjax_cannot_honour_are_refused(tmp_path, no_weight_read, change, message):
    """Every place a config.json carries RoPE settings is read; what tedjax does not implement is named."""
    d = copy_fixture(tmp_path)
    edit_config(d, **change)
    with pytest.raises(hf.HFCheckpointError, match=message):
        hf.load(d, mesh_of((1, 1, 1)))


def test_rope_read_as_transformers_reads_it(tmp_path):
    """Legacy `type`, a top-level rope_theta and no rope_parameters: the values transformers 5 would use."""
    d = copy_fixture(tmp_path)
    cfg = json.loads((d / "config.json").read_text())
    del cfg["rope_parameters"]
    (d / "config.json").write_text(json.dumps({**cfg, "rope_theta": 5e5, "rope_scaling": {"type": "linear",
                                                                                          "factor": 3}}))
    config = hf.model_config(d)
    assert (config.rope_base, config.rope_scaling, config.rope_factor) == (5e5, "linear", 3.0)
    edit_config(d, rope_scaling={"rope_type": "yarn", "factor": 2.0, "mscale": 0.5, "mscale_all_dim": 1.0,
                                 "beta_fast": 16, "truncate": False})
    config = hf.model_config(d)
    assert (config.rope_original_max_len, config.rope_beta_fast, config.rope_beta_slow, config.rope_truncate) == (
        128, 16.0, 1.0, False)
    mscale = lambda m: 0.1 * m * np.log(2.0) + 1  # noqa: E731
    assert config.rope_attention_factor == pytest.approx(mscale(0.5) / mscale(1.0))


@pytest.mark.parametrize("name", ["qwen3_moe_yarn", "mixtral_window"])
def test_saved_config_writes_what_was_read(variants, name, tmp_path):
    """bos / eos / pad ids, the RoPE scaling and the window round-trip through save (issue 20 item 4)."""
    d = variants[name]
    config, model = hf.load(d, mesh_of((1, 1, 1)))
    out = hf.save(model, tmp_path / "out")
    written, read = json.loads((out / "config.json").read_text()), json.loads((d / "config.json").read_text())
    for key in ("bos_token_id", "eos_token_id", "pad_token_id", "sliding_window", "max_position_embeddings"):
        assert written[key] == read[key], key
    assert hf.model_config(out) == config
    assert_close_to(logits_of(hf.load(out, mesh_of((1, 1, 1)))[1], golden(name)["input_ids"]), golden(name)["logits"])


def test_saved_config_keeps_the_token_ids(tmp_path):
    d = copy_fixture(tmp_path, "mixtral")
    edit_config(d, bos_token_id=3, eos_token_id=[0, 7], pad_token_id=5)
    config, model = hf.load(d, mesh_of((1, 1, 1)))
    assert (config.bos_token_id, config.eos_token_id, config.pad_token_id) == (3, (0, 7), 5)
    assert (hf.model_config(FIXTURES / "mixtral").bos_token_id, hf.model_config(FIXTURES / "mixtral").eos_token_id) == (
        -1, (0,))
    written = json.loads((hf.save(model, tmp_path / "out") / "config.json").read_text())
    assert (written["bos_token_id"], written["eos_token_id"], written["pad_token_id"]) == (3, [0, 7], 5)
    assert written["sliding_window"] is None
    # a run's config with them reads back from its JSON unchanged (the resume guard sees no change)
    from tedjax.checkpoint import config_changes

    run = load_config("configs/tiny.yaml", [f"init_from=hf:{d}"])
    assert run.model.eos_token_id == (0, 7)
    assert config_changes(json.loads(json.dumps(run.to_dict())), run) == []


def test_save_refuses_a_folder_with_weights(loaded, tmp_path, monkeypatch):
    """Stale weight files would make tedjax and transformers load different models (issue 20 item 3)."""
    _, model = loaded["mixtral"][(1, 1, 1)]
    out = hf.save(model, tmp_path / "out", max_shard_bytes=60_000)  # several files and an index
    many = sorted(p.name for p in out.iterdir())
    assert "model.safetensors.index.json" in many and len([n for n in many if n.endswith(".safetensors")]) > 2
    (out / "pytorch_model.bin").write_bytes(b"stale")
    (out / "notes.txt").write_text("mine")
    monkeypatch.setattr(hf, "_to_host", lambda a: pytest.fail("a weight was gathered before the refusal"))
    with pytest.raises(hf.HFCheckpointError, match=r"already holds weights .*overwrite=True"):
        hf.save(model, out)
    assert sorted(p.name for p in out.iterdir()) == sorted([*many, "pytorch_model.bin", "notes.txt"])
    monkeypatch.undo()
    hf.save(model, out, overwrite=True)  # one file now: the shards, the index and the .bin are stale
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors", "notes.txt"]
    assert hf.model_config(out) == hf.model_config(FIXTURES / "mixtral")


def odd_vocab_checkpoint(root: Path) -> Path:
    """The Mixtral fixture with its last vocabulary row removed: transformers' logits are the golden ones
    without the last column (an embedding row and a head row per id)."""
    d = copy_fixture(root)
    tensors = load_file(d / "model.safetensors")
    for name in ("model.embed_tokens.weight", "lm_head.weight"):
        tensors[name] = np.ascontiguousarray(tensors[name][:511])
    save_file(tensors, str(d / "model.safetensors"))
    edit_config(d, vocab_size=511)
    return d


def test_odd_vocabulary_is_padded_to_tensor(tmp_path):
    """Megatron's make-vocab-divisible in hf.load: padded rows, -inf logits, stripped on save (issue 20 item 6)."""
    d = odd_vocab_checkpoint(tmp_path)
    config, model = hf.load(d, mesh_of((2, 2, 2)))
    assert (config.vocab_size, config.vocab_multiple, config.padded_vocab) == (511, 2, 512)
    assert model.embed[...].shape == (512, 32) and model.head[...].sharding.spec[1] == "tensor"
    gold = golden("mixtral")
    logits = logits_of(model, gold["input_ids"])
    assert np.all(logits[..., 511] == -np.inf)
    assert_close_to(logits[..., :511], gold["logits"][..., :511])
    out = hf.save(model, tmp_path / "out")
    written, original = load_file(out / "model.safetensors"), load_file(d / "model.safetensors")
    assert all(np.array_equal(written[k], original[k]) for k in original)
    assert json.loads((out / "config.json").read_text())["vocab_size"] == 511
    # fine-tuning it: a finite loss, and no gradient reaches the padded head column
    tokens = jnp.asarray(gold["input_ids"], jnp.int32)
    (loss, _), grads = jax.jit(nnx.value_and_grad(lambda m, b: tedjax.model.loss_fn(m, b), has_aux=True))(
        model, {"inputs": tokens, "targets": jnp.roll(tokens, -1, axis=1)})
    head_grad = np.asarray(grads.head[...])
    assert np.isfinite(float(loss)) and np.all(np.isfinite(head_grad)) and not np.any(head_grad[:, 511])


def test_unused_intermediate_size_does_not_block_tensor_layouts(tmp_path):
    """A Qwen3-MoE with every layer MoE never uses intermediate_size, so "tensor" need not divide it (item 7)."""
    d = copy_fixture(tmp_path, "qwen3_moe")
    edit_config(d, decoder_sparse_step=1, intermediate_size=47)  # config.json is all the mesh check reads
    config = hf.model_config(d)
    assert (config.moe_every, config.d_ff) == (1, 47)
    tedjax.config.check_mesh(config, mesh_of((1, 2, 2)))
    with pytest.raises(ValueError, match="d_ff=47"):  # a dense layer uses it: still refused
        tedjax.config.check_mesh(dataclasses.replace(config, moe_every=2), mesh_of((1, 1, 2)))


def test_import_capacity_is_printed_and_a_dropping_one_warned(tmp_path, capsys, monkeypatch):
    """tiny.yaml's capacity factor 1.25 drops tokens of an import; the run says so at its start (item 5)."""
    from tedjax import loop

    d = FIXTURES / "qwen3_moe"
    dropless = load_config(None, [f"init_from=hf:{d}", "data.seq_len=16"]).model
    assert hf.capacity_note(dropless, 16) == (
        "imported model routing: capacity_scope 'dropless', 32 rows per device pool per group of 16 tokens "
        "(the worst case: no token is dropped, as in the Hugging Face model)")  # S x min(E_local, k) = 16 x 2
    bounded = load_config(None, [f"init_from=hf:{d}", "data.seq_len=16", "model.dropless_buffer_factor=1"]).model
    assert hf.capacity_note(bounded, 16, expert_ways=2).startswith(
        "WARNING: imported model routing: capacity_scope 'dropless', 16 rows per device pool per group of 16 "
        "tokens, below the worst case 32")
    tiny = load_config("configs/tiny.yaml", [f"init_from=hf:{d}", "data.seq_len=16"]).model
    assert tiny.capacity_scope == "dropless"  # tiny.yaml's capacity factor 1.25 no longer drops an import
    capped = load_config("configs/tiny.yaml", [f"init_from=hf:{d}", "data.seq_len=16",
                                               "model.capacity_scope=expert"]).model
    note = hf.capacity_note(capped, 16)
    assert note.startswith("WARNING: imported model routing: capacity_scope 'expert', training "
                           "model.capacity_factor=1.25 -> 5 slots")
    # evaluation's 2.0 -> 8 slots drops too
    assert note.endswith("set model.capacity_scope=dropless (the import's default), or model.capacity_factor=4 and "
                         "model.eval_capacity_factor=4 (num_experts / top_k)")
    config = load_config("configs/tiny.yaml", [f"init_from=hf:{d}", "model.capacity_scope=expert", "steps=1",
                                               "data.source=synthetic",
                                               "data.seq_len=16", "data.batch_size=8", f"log.dir={tmp_path}",
                                               "log.progress=false", "log.tensorboard=false", "log.eval_every=0",
                                               "checkpoint.every=0", "mesh.data=8", "mesh.expert=1",
                                               "mesh.tensor=1"])  # fmt: skip

    class Announced(Exception):
        pass

    def announced(text):  # the run prints its start, then the capacity note: stop there, before compiling steps
        print(text)
        if text.startswith("WARNING: imported model routing"):
            raise Announced

    monkeypatch.setattr(loop.MetricsLogger, "message", lambda self, text: announced(text))
    with pytest.raises(Announced):
        loop.run(config)
    assert note in capsys.readouterr().out
