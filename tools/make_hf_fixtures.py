"""Build the Hugging Face golden fixtures in tests/fixtures/hf/ (needs torch and transformers).

    pip install -e ".[hf-fixtures]"     # torch + transformers, only for this script
    python tools/make_hf_fixtures.py [--out tests/fixtures/hf]

Writes, all small (< 2 MB together):
- tokenizer/tokenizer.json: a byte-level BPE of 512 tokens trained on a few
  stdlib files, id 0 = "<|endoftext|>";
- mixtral/, qwen3_moe/: tiny random MixtralForCausalLM and Qwen3MoeForCausalLM
  (2 layers, GQA, float32), saved with `save_pretrained` plus the tokenizer;
  the Qwen3-MoE one has explicit head_dim != hidden/heads, norm_topk_prob=false
  and decoder_sparse_step=2 (layer 0 dense, layer 1 MoE);
- <name>_golden.npz: fixed input ids [2, 16] and transformers' float32 logits
  for them, a prompt [1, 8] and transformers' greedy continuation (24 new
  tokens, no end token);
- variants/<variant>.json + <variant>_golden.npz: the same weights under a
  changed config.json (VARIANTS): Qwen's documented YaRN `rope_scaling` beside
  the `rope_parameters` block, linear scaling in `rope_parameters`, and a
  Mixtral `sliding_window` of 6, shorter than the 16 input and 32 generated
  positions. Only config.json differs, so only it is stored (the tests copy
  the base directory's weights next to it);
- manifest.json: versions, seeds and the decision margins checked below.

The tests compare tedjax with these numbers without torch. A comparison is
only meaningful when no decision sits on a knife edge, so the script checks
that every routing decision (k-th vs (k+1)-th router logit) and every greedy
step (best vs second logit) wins by at least MIN_MARGIN, trying the next seed
otherwise. It also wants a greedy continuation with at least MIN_DISTINCT
different tokens (a random model that repeats one token would test the KV
cache of the importer little).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sysconfig
from pathlib import Path

import numpy as np

MIN_MARGIN = 1e-3
MIN_DISTINCT = 8  # distinct tokens among the 24 greedy ones
VOCAB = 512
TEXTS = [
    "def fibonacci(n):\n    return n if n < 2 else fibonacci(n - 1) + fibonacci(n - 2)\n",
    "class Stack:\n    def __init__(self):\n        self.items = []\n",
]


def train_tokenizer(out: Path) -> Path:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    stdlib = Path(sysconfig.get_paths()["stdlib"])
    corpus = [(stdlib / name).read_text() for name in ("textwrap.py", "bisect.py", "heapq.py", "keyword.py")]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(corpus, trainer)
    out.mkdir(parents=True, exist_ok=True)
    tok.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|endoftext|>",
                                                           "tokenizer_class": "PreTrainedTokenizerFast"}, indent=2))
    return out


def configs():
    from transformers import MixtralConfig, Qwen3MoeConfig

    common = dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                  max_position_embeddings=128, initializer_range=0.3, tie_word_embeddings=False,
                  eos_token_id=0, bos_token_id=None, pad_token_id=None)
    mixtral = MixtralConfig(**common, intermediate_size=32, num_local_experts=4, num_experts_per_tok=2,
                            rms_norm_eps=1e-5, sliding_window=None, rope_theta=1e6)
    qwen = Qwen3MoeConfig(**common, head_dim=16, intermediate_size=48, moe_intermediate_size=16, num_experts=8,
                          num_experts_per_tok=2, norm_topk_prob=False, decoder_sparse_step=2, mlp_only_layers=[],
                          rms_norm_eps=1e-6, rope_theta=10000.0)
    return {"mixtral": (mixtral, "MixtralForCausalLM"), "qwen3_moe": (qwen, "Qwen3MoeForCausalLM")}


# variant -> (base model, config.json changes). Weights are the base model's (same seed).
VARIANTS = {
    "qwen3_moe_yarn": ("qwen3_moe", {"rope_scaling": {"rope_type": "yarn", "factor": 4.0,
                                                      "original_max_position_embeddings": 32}}),
    "mixtral_linear": ("mixtral", {"rope_parameters": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1e6}}),
    "mixtral_window": ("mixtral", {"sliding_window": 6}),
}


def router_margin(router_logits, top_k: int) -> float:
    """Smallest gap between the k-th and (k+1)-th router logit over all tokens and MoE layers."""
    gaps = []
    for logits in router_logits:
        ordered = np.sort(np.asarray(logits, np.float64), axis=-1)[:, ::-1]
        gaps.append(np.min(ordered[:, top_k - 1] - ordered[:, top_k]))
    return float(min(gaps))


def build(name: str, out: Path, tokenizer_dir: Path, input_ids: np.ndarray, prompt: np.ndarray, seed: int,
          variant: dict | None = None):
    import torch
    import transformers

    base = VARIANTS[name][0] if variant is not None else name
    config, arch = configs()[base]
    if variant is not None:  # the base model's config.json as written, with the variant's keys changed
        written = {**json.loads((out / base / "config.json").read_text()), **variant}
        config = type(config).from_dict(written)
    torch.manual_seed(seed)
    model = getattr(transformers, arch)(config).eval()
    if variant is not None:  # as saved, the weights must be the base model's, tensor for tensor
        import tempfile

        from safetensors.numpy import load_file

        with tempfile.TemporaryDirectory() as tmp:
            model.save_pretrained(tmp)
            mine, weights = load_file(Path(tmp) / "model.safetensors"), load_file(out / base / "model.safetensors")
        assert sorted(mine) == sorted(weights) and all(np.array_equal(mine[k], weights[k]) for k in weights), \
            f"{name}: the seed no longer gives the weights of {base}"
    with torch.no_grad():
        result = model(torch.tensor(input_ids), output_router_logits=True)
        logits = result.logits.float().numpy()
        margin_inputs = router_margin(result.router_logits, config.num_experts_per_tok)
        model.generation_config.eos_token_id = None
        model.generation_config.pad_token_id = 0
        gen = model.generate(torch.tensor(prompt), max_new_tokens=24, do_sample=False, output_logits=True,
                             return_dict_in_generate=True)
        greedy = gen.sequences.numpy()
        step_logits = np.stack([s.float().numpy()[0] for s in gen.logits])
        top2 = np.sort(step_logits, axis=-1)[:, -2:]
        margin_greedy = float(np.min(top2[:, 1] - top2[:, 0]))
        full = model(gen.sequences, output_router_logits=True)
        margin_greedy_routing = router_margin(full.router_logits, config.num_experts_per_tok)
    margins = {"router_inputs": margin_inputs, "greedy_logits": margin_greedy, "router_greedy": margin_greedy_routing}
    distinct = len(set(greedy[0, prompt.shape[1]:].tolist()))
    if min(margins.values()) < MIN_MARGIN or distinct < MIN_DISTINCT:  # a continuation that repeats tests little
        return None, dict(margins, distinct_new_tokens=distinct)
    if variant is not None:
        (out / "variants").mkdir(exist_ok=True)
        (out / "variants" / f"{name}.json").write_text(json.dumps(written, indent=2) + "\n")
    else:
        directory = out / name
        if directory.exists():
            shutil.rmtree(directory)
        model.save_pretrained(directory)
        for file in ("tokenizer.json", "tokenizer_config.json"):
            shutil.copy(tokenizer_dir / file, directory / file)
    np.savez_compressed(out / f"{name}_golden.npz", input_ids=input_ids.astype(np.int32),
                        logits=logits.astype(np.float32),
                        prompt=prompt.astype(np.int32), greedy=greedy.astype(np.int32))
    info = {"architecture": arch, "seed": seed, "margins": margins, "greedy_new_tokens": 24,
            "distinct_new_tokens": distinct, **({"base": base, "changes": variant} if variant is not None else {})}
    return info, margins


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "hf"))
    args = parser.parse_args()
    import tokenizers
    import torch
    import transformers

    torch.set_num_threads(1)
    out = Path(args.out)
    tokenizer_dir = train_tokenizer(out / "tokenizer")
    tok = tokenizers.Tokenizer.from_file(str(tokenizer_dir / "tokenizer.json"))
    rows = [tok.encode(text).ids[:16] for text in TEXTS]
    assert all(len(r) == 16 for r in rows), [len(r) for r in rows]
    input_ids = np.array(rows, np.int64)
    prompt = input_ids[:1, :8]
    manifest = {"transformers": transformers.__version__, "torch": torch.__version__,
                "tokenizers": tokenizers.__version__, "min_margin": MIN_MARGIN, "models": {}}
    for name in configs():
        for seed in range(100):
            info, margins = build(name, out, tokenizer_dir, input_ids, prompt, seed)
            print(f"{name} seed {seed}: margins {margins}")
            if info is not None:
                manifest["models"][name] = info
                break
        else:
            raise SystemExit(f"no seed in 0..99 gave margins >= {MIN_MARGIN} for {name}")
    for name, (base, changes) in VARIANTS.items():
        seed = manifest["models"][base]["seed"]
        info, margins = build(name, out, tokenizer_dir, input_ids, prompt, seed, variant=changes)
        print(f"{name} (weights of {base}, seed {seed}): margins {margins}")
        if info is None:
            raise SystemExit(f"{name}: the weights of {base} give margins < {MIN_MARGIN} or a repetitive continuation "
                             "under this config; change the variant's settings")
        manifest["models"][name] = info
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    total = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    print(f"wrote {out} ({total / 1e6:.2f} MB)")


if __name__ == "__main__":
    main()
