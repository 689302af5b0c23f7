"""Generation with a KV cache: equal to recomputing without one, equal to transformers, reproducible sampling."""

import io
from contextlib import redirect_stdout
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import train_fork

import tedjax
from tedjax import generation, hf

REPO = Path(__file__).resolve().parents[1]
FIXTURES = REPO / "tests" / "fixtures" / "hf"

# A native tedjax model with every feature the cache path touches: GQA, qk-norm, head_dim != d/H, top-2
# experts in one layer, a dense FFN in the other, routing groups of 8 tokens and a training capacity (cf 1.0),
# both of which generation lifts.
CONFIG = tedjax.ModelConfig(
    vocab_size=64, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=16, qk_norm=True, d_ff=48, max_len=64,
    num_experts=4, expert_d_ff=16, top_k=2, activation="swiglu", capacity_factor=1.0, eval_capacity_factor=1.0,
    group_size=8,
)  # fmt: skip


def mesh_of(layout):
    return tedjax.make_mesh(*layout, devices=jax.devices()[: int(np.prod(layout))])


@pytest.fixture(scope="module")
def native():
    return tedjax.init_model(CONFIG, mesh_of((2, 2, 2)), seed=1)


@pytest.fixture(scope="module")
def mixtral():
    return hf.load(FIXTURES / "mixtral", mesh_of((1, 1, 1)))[1]


PROMPTS = np.array([[5, 9, 2, 33, 7, 1, 12], [40, 3, 3, 8, 61, 0, 19]])


def test_greedy_with_cache_equals_greedy_without(native):
    with_cache = tedjax.generate(native, PROMPTS, 24)
    without = generation.greedy_without_cache(native, PROMPTS, 24)
    assert with_cache.shape == (2, 7 + 24)
    np.testing.assert_array_equal(with_cache, without)
    assert len(set(with_cache[:, 7:].ravel().tolist())) > 4  # not a constant continuation


@pytest.mark.parametrize("arch", ["mixtral", "qwen3_moe"])
def test_greedy_equals_transformers(mixtral, arch):
    model = mixtral if arch == "mixtral" else hf.load(FIXTURES / arch, mesh_of((1, 1, 1)))[1]
    gold = np.load(FIXTURES / f"{arch}_golden.npz")
    prompt, greedy = gold["prompt"], gold["greedy"]
    np.testing.assert_array_equal(tedjax.generate(model, prompt, greedy.shape[1] - prompt.shape[1]), greedy)


def test_sampling_is_reproducible_by_seed(mixtral):
    prompt = [351, 296, 73, 66]
    kwargs = dict(temperature=1.0, top_k=50, top_p=0.95)
    first = tedjax.generate(mixtral, prompt, 20, seed=7, **kwargs)
    np.testing.assert_array_equal(first, tedjax.generate(mixtral, prompt, 20, seed=7, **kwargs))
    assert not np.array_equal(first, tedjax.generate(mixtral, prompt, 20, seed=8, **kwargs))
    # top_k=1 (or a tiny top_p) leaves only the best token: sampling is greedy
    greedy = tedjax.generate(mixtral, prompt, 20)
    np.testing.assert_array_equal(tedjax.generate(mixtral, prompt, 20, temperature=1.0, top_k=1, seed=3), greedy)
    np.testing.assert_array_equal(tedjax.generate(mixtral, prompt, 20, temperature=1.0, top_p=1e-6, seed=3), greedy)


def test_compiled_once_per_shape_bucket(mixtral):
    tedjax.generate(mixtral, list(range(1, 9)), 10)
    compiled = generation._generate_jit._cache_size()
    for length, new, extra in ((5, 12, {}), (16, 2, {"temperature": 0.7, "top_p": 0.9}), (3, 20, {"seed": 5})):
        assert generation.buckets(length, new, 128) == (16, 32)
        tedjax.generate(mixtral, list(range(1, length + 1)), new, **extra)
    assert generation._generate_jit._cache_size() == compiled


def test_sample_filters():
    logits = jnp.log(jnp.array([[0.5, 0.3, 0.15, 0.05]] * 2000))
    keys = jax.random.split(jax.random.key(0), 1)[0]
    top2 = np.asarray(generation.sample(logits, keys, 1.0, 2, 1.0))
    assert set(top2.tolist()) == {0, 1} and 0.55 < np.mean(top2 == 0) < 0.70  # 0.5 / 0.8 = 0.625
    nucleus = np.asarray(generation.sample(logits, keys, 1.0, 0, 0.85))  # 0.5 + 0.3 < 0.85: three tokens kept
    assert set(nucleus.tolist()) == {0, 1, 2}
    assert set(np.asarray(generation.sample(logits, keys, 0.0, 0, 1.0)).tolist()) == {0}


def test_eos_ends_a_row(mixtral):
    gold = np.load(FIXTURES / "mixtral_golden.npz")
    eos = int(gold["greedy"][0, 12])  # the 5th greedy token
    out = tedjax.generate(mixtral, gold["prompt"], 24, eos_id=eos)
    np.testing.assert_array_equal(out[0, :13], gold["greedy"][0, :13])
    assert np.all(out[0, 13:] == eos)


def test_bad_input_is_refused(mixtral):
    with pytest.raises(ValueError, match="longer than model.max_len=128"):
        tedjax.generate(mixtral, [1] * 129, 1)
    with pytest.raises(ValueError, match=r"exceeds model.max_len=128; set max_new_tokens <= 28"):
        tedjax.generate(mixtral, [1] * 100, 40)
    with pytest.raises(ValueError, match="equal lengths"):
        tedjax.generate(mixtral, [[1, 2, 3], [1, 2]], 4)
    with pytest.raises(ValueError, match=r"must be in \[0, 512\)"):
        tedjax.generate(mixtral, [1, 512], 4)
    with pytest.raises(ValueError, match="temperature must be >= 0"):
        tedjax.generate(mixtral, [1, 2], 4, temperature=-1.0)
    with pytest.raises(ValueError, match="top_p"):
        tedjax.generate(mixtral, [1, 2], 4, top_p=0.0)


def test_cli_with_a_hugging_face_directory(mixtral):
    text = io.StringIO()
    with redirect_stdout(text):
        assert generation.main(["--hf", str(FIXTURES / "mixtral"), "--prompt", "def ", "--max-new-tokens", "8"]) == 0
    tokenizer = tedjax.data.HFTokenizer(FIXTURES / "mixtral")
    prompt = tokenizer.encode("def ")
    expected = tokenizer.decode(tedjax.generate(mixtral, prompt, 8)[0, len(prompt):])
    assert text.getvalue() == "def " + expected + "\n"


def test_cli_with_a_training_checkpoint(native, tmp_path):
    """`--checkpoint` restores the parameters of a saved train state (any mesh) and continues bytes."""
    from tedjax.checkpoint import Checkpointer
    from tedjax.config import DataConfig, LogConfig, MeshConfig, TrainConfig
    from tedjax.trainer import Trainer

    config = TrainConfig(model=tedjax.ModelConfig(vocab_size=256, d_model=32, n_layers=2, n_heads=4, d_ff=64,
                                                  max_len=32, num_experts=4, expert_d_ff=32),
                         mesh=MeshConfig(2, 2, 2), data=DataConfig(source="synthetic", seq_len=32, batch_size=8),
                         log=LogConfig(dir=str(tmp_path / "run")))  # fmt: skip
    trainer = Trainer(config, mesh_of((2, 2, 2)))
    state = trainer.init_state()
    checkpointer = Checkpointer(config, resume=False)
    checkpointer.begin(0)
    checkpointer.save(1, state, {"step": 1}, force=True)
    checkpointer.close()
    text = io.StringIO()
    with redirect_stdout(text):
        assert generation.main(["--checkpoint", str(tmp_path / "run"), "--prompt", "def ", "--max-new-tokens",
                                "6"]) == 0
    config_loaded, model = generation.load_trained(tmp_path / "run", mesh_of((1, 1, 1)))
    assert config_loaded == config.model
    np.testing.assert_array_equal(np.asarray(model.embed[...]), np.asarray(state.params["embed"]))
    out = tedjax.generate(model, tedjax.data.encode("def ").tolist(), 6)
    assert text.getvalue() == "def " + tedjax.data.decode(out[0, 4:]) + "\n"
    assert generation.main(["--checkpoint", str(tmp_path / "missing"), "--prompt", "x"]) == 2


@pytest.mark.slow
def test_benchmark_quick(tmp_path):
    proc = train_fork.run_script(REPO / "benchmarks" / "generate.py", ["--quick", "--out", str(tmp_path)])
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    import json

    result = json.loads((tmp_path / "generate.json").read_text())
    assert result["settings"]["quick"] is True
    rows = {r["cache"]: r for r in result["rows"]}
    assert set(rows) == {"yes", "no"}
    for row in rows.values():
        assert row["tokens_per_s"] == pytest.approx(row["batch"] * row["new_tokens"] / row["call_s"])
    assert "tokens/s" in (tmp_path / "generate.md").read_text()


# --------------------------------------------------------------------------- issue 20


def variant(tmp_path, name: str) -> Path:
    """A variant fixture: the base model's files with the variant's config.json."""
    import json
    import shutil

    base = json.loads((FIXTURES / "manifest.json").read_text())["models"][name]["base"]
    d = Path(shutil.copytree(FIXTURES / base, tmp_path / name))
    shutil.copy(FIXTURES / "variants" / f"{name}.json", d / "config.json")
    return d


def test_greedy_equals_transformers_past_the_window(tmp_path):
    """Cached decoding with a window of 6 over 32 positions: transformers' greedy tokens."""
    model = hf.load(variant(tmp_path, "mixtral_window"), mesh_of((1, 1, 1)))[1]
    gold = np.load(FIXTURES / "mixtral_window_golden.npz")
    prompt, greedy = gold["prompt"], gold["greedy"]
    np.testing.assert_array_equal(tedjax.generate(model, prompt, greedy.shape[1] - prompt.shape[1]), greedy)


def test_cli_without_a_tokenizer_names_the_flag(tmp_path, monkeypatch, capsys):
    """No tokenizer.json: refused before any weight is read, naming --tokenizer (a run with one:
    test_cli_with_a_hugging_face_directory)."""
    import shutil

    d = Path(shutil.copytree(FIXTURES / "mixtral", tmp_path / "mixtral"))
    (d / "tokenizer.json").unlink()
    monkeypatch.setattr(hf.jax, "make_array_from_callback", lambda *a, **k: pytest.fail("a weight was read"))
    assert generation.main(["--hf", str(d), "--prompt", "def ", "--max-new-tokens", "2"]) == 2
    assert "--hf " + repr(str(d)) + " has no tokenizer.json; pass --tokenizer DIR" in capsys.readouterr().err
    assert generation.main(["--hf", str(d), "--tokenizer", str(tmp_path), "--prompt", "x"]) == 2
    assert "--tokenizer " + repr(str(tmp_path)) + " has no tokenizer.json" in capsys.readouterr().err


def test_cli_help_tells_where_the_tokenizer_comes_from(capsys):
    with pytest.raises(SystemExit):
        generation.main(["--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    assert "default: the --hf directory; for --checkpoint," in help_text
    assert "else UTF-8 bytes, as the run trained on" in help_text
