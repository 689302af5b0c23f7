"""Hugging Face interop against transformers' own numbers (tests/fixtures/hf, made by tools/make_hf_fixtures.py).

No torch or transformers needed, except in the one test that loads a saved
directory back into transformers (skipped where it is not installed).
"""

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
    moe = next(block.ffn for block in model.blocks if block.is_moe)
    assert moe.w_in[...].sharding.spec[0] == "expert"
    assert model.blocks[0].attn.wk[...].sharding.spec[1] == "tensor"
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
    moe = model.blocks[0].ffn
    perm = np.array([2, 0, 3, 1])  # logical expert e sits in slot perm[e]
    for name in ("w_in", "w_gate", "w_out"):
        weight = getattr(moe, name)
        physical = np.zeros_like(np.asarray(weight[...]))
        physical[perm] = np.asarray(weight[...])
        weight[...] = jnp.asarray(physical)
    moe.placement[...] = jnp.asarray(perm, jnp.int32)
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
    got = np.asarray(model.blocks[0].attn.wq[...])
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
    ({"rope_parameters": {"rope_type": "yarn", "rope_theta": 1e6, "factor": 4.0}}, "RoPE scaling"),
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
    with pytest.raises(ValueError, match=r"n_kv_heads=2 is not divisible by the tensor axis \(4\)"):
        hf.load(FIXTURES / "mixtral", mesh_of((1, 2, 4)))
    with pytest.raises(ValueError, match=r"num_experts=4 is not divisible by the expert axis \(8\)"):
        hf.load(FIXTURES / "mixtral", mesh_of((1, 8, 1)))


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


def test_saved_directory_loads_in_transformers(loaded, tmp_path):
    why = "torch and transformers are the optional hf-fixtures extra (pip install -e '.[hf-fixtures]'), not in CI"
    torch = pytest.importorskip("torch", reason=why)
    transformers = pytest.importorskip("transformers", reason=why)
    cases = [(arch, loaded[arch][(2, 2, 2)][1]) for arch in ARCHS]
    cases.append(("native", tedjax.init_model(native_config(vocab_size=512), mesh_of((1, 1, 1)), seed=1)))
    gold = golden("mixtral")["input_ids"]
    for name, model in cases:
        out = hf.save(model, tmp_path / name)
        theirs = transformers.AutoModelForCausalLM.from_pretrained(out, torch_dtype=torch.float32).eval()
        with torch.no_grad():
            reference = theirs(torch.tensor(gold, dtype=torch.long)).logits.numpy()
        assert_close_to(logits_of(model, gold), reference)
