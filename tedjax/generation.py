"""Text generation with a KV cache: `tedjax.generate(model, prompt_ids, max_new_tokens, ...)` and its CLI.

    python -m tedjax.generate --checkpoint runs/tiny --prompt "def "
    python -m tedjax.generate --hf DIR --prompt "def " [--temperature 0.8 --top-k 40 --top-p 0.95]

(`tedjax/generate.py` is only that command, so `tedjax.generate` stays the function.)

One compiled program does the whole generation: a prefill of the prompt that
fills each layer's key/value cache `[B, H_kv, T, K]`, then a `while_loop`
of one-token decode steps. It is compiled once per shape bucket (batch, prompt
length rounded up to a power of two, total length rounded up to a power of
two, both capped at `max_len`), on the mesh the model's parameters live on.
A prompt padded to its bucket is exact: attention is causal and the pad
positions of the cache are overwritten before any query can see them.

Routing during generation. A decode step routes one token per sequence, so
every MoE layer routes whole sequences (`group_size` 0) with no capacity
limit (capacity factor E / top_k, C = S): then each token's experts depend on
that token alone and decoding with the cache computes exactly what the
full-sequence forward does. This is how Mixtral and Qwen3-MoE run; a tedjax
model trained with a capacity factor may drop tokens in training and
evaluation but never while generating.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import re
import sys
from collections.abc import Sequence
from pathlib import Path

import jax
import jax.numpy as jnp
from jax.experimental import multihost_utils
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding

from tedjax.layers import KVCache
from tedjax.mesh import constrain, logical_to_spec, make_mesh, mesh_shape
from tedjax.model import Transformer, mask_padded_vocab, unit_view
from tedjax.moe import MoE

MIN_BUCKET = 16


def generate(
    model: Transformer,
    prompt_ids,
    max_new_tokens: int,
    *,
    temperature: float = 0.0,
    top_k: int = 0,
    top_p: float = 1.0,
    seed: int = 0,
    eos_id: int | None = None,
) -> np.ndarray:
    """Continue each prompt by `max_new_tokens` tokens; returns int32 `[B, P + max_new_tokens]` (numpy).

    `prompt_ids`: one prompt (a list / 1-D array of P ids) or a batch `[B, P]`
    of equal-length prompts. `temperature` 0 is greedy; otherwise sample from
    softmax(logits / temperature) restricted to the `top_k` most likely tokens
    (0 = all) and the smallest set whose probability reaches `top_p`. The same
    `seed` gives the same tokens. After `eos_id`, a row repeats `eos_id`.
    Runs on the mesh of the model's parameters (under `jax.set_mesh` there).
    """
    config = model.config
    prompt_bp = _check_prompt(prompt_ids, config.vocab_size)
    batch, length = prompt_bp.shape
    _check_settings(config.max_len, length, max_new_tokens, temperature, top_k, top_p, eos_id, config.vocab_size)
    mesh = model_mesh(model)
    prompt_bucket, total_bucket = buckets(length, max_new_tokens, config.max_len)
    tokens = _batch_buffer(prompt_bp, prompt_bucket, mesh)
    graphdef, state = nnx.split(model)
    with jax.set_mesh(mesh):
        tokens = jax.device_put(tokens, NamedSharding(mesh, logical_to_spec(("batch", None))))
        out = _generate_jit(
            graphdef, state, tokens, jnp.int32(length), jnp.int32(max_new_tokens), jax.random.key(seed),
            jnp.float32(temperature), jnp.int32(top_k), jnp.float32(top_p), jnp.int32(-1 if eos_id is None else eos_id),
            total_len=total_bucket,
        )  # fmt: skip
    if jax.process_count() > 1:  # every process gets the whole batch
        out = multihost_utils.process_allgather(out, tiled=True)
    return np.asarray(out)[:batch, : length + max_new_tokens]


def _batch_buffer(prompt_bp: np.ndarray, length: int, mesh: Mesh) -> np.ndarray:
    """int32 `[B', length]` with the prompts at the start of each row; B' pads B with copies of row 0
    to a multiple of data x expert, the ways the batch is split."""
    ways = math.prod(mesh_shape(mesh)[:2])
    batch, prompt_len = prompt_bp.shape
    tokens = np.zeros((-(-batch // ways) * ways, length), np.int32)
    tokens[:, :prompt_len] = prompt_bp[0]
    tokens[:batch, :prompt_len] = prompt_bp
    return tokens


def buckets(prompt_len: int, max_new_tokens: int, max_len: int) -> tuple[int, int]:
    """(prompt bucket, total bucket): powers of two >= MIN_BUCKET, capped at max_len."""

    def up(n: int) -> int:
        return min(max(MIN_BUCKET, 1 << (n - 1).bit_length()), max_len)

    prompt_bucket = up(prompt_len)
    return prompt_bucket, max(up(prompt_len + max_new_tokens), prompt_bucket)


def model_mesh(model: Transformer) -> Mesh:
    """The mesh the model's parameters are placed on (a one-device mesh for unsharded ones)."""
    leaf = model.embed[...]
    sharding = getattr(leaf, "sharding", None)
    if isinstance(sharding, NamedSharding):
        return sharding.mesh
    devices = list(sharding.device_set) if sharding is not None else jax.devices()[:1]
    return make_mesh(1, 1, 1, devices=devices[:1])


def _check_prompt(prompt_ids, vocab_size: int) -> np.ndarray:
    if isinstance(prompt_ids, (list, tuple)) and prompt_ids and isinstance(prompt_ids[0], (list, tuple, np.ndarray)):
        lengths = sorted({len(p) for p in prompt_ids})
        if len(lengths) > 1:
            raise ValueError(f"prompts in a batch must have equal lengths, got lengths {lengths}; "
                             "generate them separately (or in groups of equal length)")
    prompt = np.asarray(prompt_ids)
    if prompt.ndim == 1:
        prompt = prompt[None, :]
    if prompt.ndim != 2 or prompt.shape[1] == 0 or prompt.shape[0] == 0:
        raise ValueError(f"prompt_ids must be a non-empty list of token ids or a [batch, length] array, "
                         f"got shape {prompt.shape}")
    if not np.issubdtype(prompt.dtype, np.integer):
        raise ValueError(f"prompt_ids must be integer token ids, got dtype {prompt.dtype}")
    if prompt.min() < 0 or prompt.max() >= vocab_size:
        raise ValueError(f"prompt token ids must be in [0, {vocab_size}) (model.vocab_size), "
                         f"got ids from {prompt.min()} to {prompt.max()}")
    return prompt.astype(np.int32)


def _check_settings(max_len, length, max_new_tokens, temperature, top_k, top_p, eos_id, vocab_size) -> None:
    if not isinstance(max_new_tokens, (int, np.integer)) or isinstance(max_new_tokens, bool) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be an integer >= 1, got {max_new_tokens!r}")
    if length > max_len:
        raise ValueError(f"the prompt has {length} tokens, longer than model.max_len={max_len}; shorten it")
    if length + max_new_tokens > max_len:
        raise ValueError(f"prompt ({length} tokens) + max_new_tokens ({max_new_tokens}) = {length + max_new_tokens} "
                         f"exceeds model.max_len={max_len}; set max_new_tokens <= {max_len - length}")
    if not temperature >= 0:
        raise ValueError(f"temperature must be >= 0 (0 = greedy), got {temperature!r}")
    if not isinstance(top_k, (int, np.integer)) or top_k < 0:
        raise ValueError(f"top_k must be an integer >= 0 (0 = no limit), got {top_k!r}")
    if not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {top_p!r}")
    if eos_id is not None and not 0 <= eos_id < vocab_size:
        raise ValueError(f"eos_id={eos_id} is not a token id of this model (vocab_size={vocab_size})")


def prepare_for_decoding(model: Transformer) -> Transformer:
    """Set every MoE layer to route whole sequences with no capacity limit, deterministically (in place)."""
    model.eval()
    if model.config.num_experts:
        model.config = dataclasses.replace(model.config, group_size=0, min_capacity=1,
                                           eval_capacity_factor=model.config.num_experts / model.config.top_k)
    for _, module in nnx.iter_modules(model):
        if isinstance(module, MoE):
            module.group_size = 0
            module.eval_capacity_factor = module.num_experts / module.top_k
            module.min_capacity = 1
            module.a2a_chunks = 1  # a decode step has one token per sequence: nothing to chunk
    return model


def forward_cached(
    model: Transformer, tokens_bl: jax.Array, caches: list[KVCache], start: jax.Array
) -> tuple[jax.Array, list[KVCache]]:
    """Logits `[B, L, V]` of tokens at positions start..start+L-1, reading and updating the caches.

    The same blocks as `Transformer.__call__`, with each attention layer's
    `cached` call in place of the full-sequence one.
    """
    cfg = model.config
    tokens_bl = constrain(tokens_bl, ("batch", "length"))
    x_bld = jnp.take(model.embed[...], tokens_bl, axis=0).astype(cfg.compute_dtype)
    x_bld = constrain(x_bld, ("batch", "length", "act_embed"))
    new_caches = []
    units = [unit_view(model, u) for u in range(cfg.n_layers // cfg.moe_every)]  # a loop over the stacked units
    blocks = [block for unit in units for block in unit.blocks] + list(model.tail)
    for block, cache in zip(blocks, caches, strict=True):
        h_bld, cache = block.attn.cached(block.attn_norm(x_bld), cache, start)
        x_bld = x_bld + h_bld
        h_bld = block.ffn(block.ffn_norm(x_bld))
        h_bld = h_bld[0] if block.is_moe else h_bld
        x_bld = constrain(x_bld + h_bld, ("batch", "length", "act_embed"))
        new_caches.append(cache)
    x_bld = model.final_norm(x_bld)
    logits_blv = mask_padded_vocab(cfg, jnp.einsum("bld,dv->blv", x_bld, model.head[...].astype(cfg.compute_dtype)))
    return constrain(logits_blv.astype(jnp.float32), ("batch", "length", "act_vocab")), new_caches


def empty_caches(model: Transformer, batch: int, total_len: int) -> list[KVCache]:
    cfg = model.config
    shape = (batch, cfg.kv_heads, total_len, cfg.head_size)
    axes = ("batch", "act_heads", "length", None)
    zeros = lambda: constrain(jnp.zeros(shape, cfg.compute_dtype), axes)  # noqa: E731
    return [KVCache(zeros(), zeros()) for _ in range(cfg.n_layers)]


def sample(logits_bv: jax.Array, key: jax.Array, temperature, top_k, top_p) -> jax.Array:
    """Next token per row: argmax when temperature is 0, else top-k / top-p sampling. int32 `[B]`."""
    greedy_b = jnp.argmax(logits_bv, axis=-1).astype(jnp.int32)
    vocab = logits_bv.shape[-1]
    scaled_bv = logits_bv / jnp.maximum(temperature, 1e-6)
    sorted_bv = -jnp.sort(-scaled_bv, axis=-1)  # descending
    rank_v = jnp.arange(vocab)
    in_top_k_bv = jnp.where(top_k > 0, rank_v[None, :] < top_k, True)
    sorted_bv = jnp.where(in_top_k_bv, sorted_bv, -jnp.inf)
    probs_bv = jax.nn.softmax(sorted_bv, axis=-1)
    # keep the smallest prefix whose probability reaches top_p (always the first token)
    keep_bv = (jnp.cumsum(probs_bv, axis=-1) - probs_bv < top_p) & in_top_k_bv
    threshold_b1 = jnp.min(jnp.where(keep_bv, sorted_bv, jnp.inf), axis=-1, keepdims=True)
    masked_bv = jnp.where(scaled_bv >= threshold_b1, scaled_bv, -jnp.inf)
    sampled_b = jax.random.categorical(key, masked_bv, axis=-1).astype(jnp.int32)
    return jnp.where(temperature > 0, sampled_b, greedy_b)


def _generate(graphdef, state, tokens_bp, prompt_len, max_new, key, temperature, top_k, top_p, eos_id, *, total_len):
    model = prepare_for_decoding(nnx.merge(graphdef, state))
    batch, prompt_bucket = tokens_bp.shape
    caches = empty_caches(model, batch, total_len)
    logits_bpv, caches = forward_cached(model, tokens_bp, caches, jnp.int32(0))
    last_logits_bv = jax.lax.dynamic_index_in_dim(logits_bpv, prompt_len - 1, axis=1, keepdims=False)
    pad = jnp.maximum(eos_id, 0)
    positions_t = jnp.arange(total_len)
    out_bt = jnp.pad(tokens_bp, ((0, 0), (0, total_len - prompt_bucket)))
    out_bt = jnp.where(positions_t[None, :] < prompt_len, out_bt, pad)
    done_b = jnp.zeros((batch,), bool)

    def cond(carry):
        step, _, _, _, _, done_b = carry
        return (step < max_new) & ~jnp.all(done_b)

    def body(carry):
        step, out_bt, caches, logits_bv, key, done_b = carry
        key, sub = jax.random.split(key)
        token_b = jnp.where(done_b, pad, sample(logits_bv, sub, temperature, top_k, top_p))
        position = prompt_len + step
        out_bt = jax.lax.dynamic_update_slice_in_dim(out_bt, token_b[:, None], position, axis=1)
        done_b = done_b | (token_b == eos_id)
        logits_b1v, caches = forward_cached(model, token_b[:, None], caches, position)
        return step + 1, out_bt, caches, logits_b1v[:, 0], key, done_b

    carry = (jnp.int32(0), out_bt, caches, last_logits_bv, key, done_b)
    return jax.lax.while_loop(cond, body, carry)[1]


_generate_jit = jax.jit(_generate, static_argnames=("graphdef", "total_len"))


def _full_forward(graphdef, state, tokens_bl: jax.Array) -> jax.Array:
    # Functional, so the caller's model is neither reconfigured nor updated.
    return prepare_for_decoding(nnx.merge(graphdef, state))(tokens_bl)[0]


_full_forward_jit = jax.jit(_full_forward, static_argnames=("graphdef",))


def greedy_without_cache(model: Transformer, prompt_ids, max_new_tokens: int) -> np.ndarray:
    """Greedy decoding that recomputes the whole sequence for every new token: the reference for the cache.

    Each step runs the full-sequence forward (`Transformer.__call__`) on a
    fixed-length buffer (one compilation; causal attention and per-token
    routing make the unfilled tail irrelevant) and reads the logits at the
    last filled position. For tests and checks.
    """
    prompt = _check_prompt(prompt_ids, model.config.vocab_size)
    length = prompt.shape[1]
    _check_settings(model.config.max_len, length, max_new_tokens, 0.0, 0, 1.0, None, model.config.vocab_size)
    mesh = model_mesh(model)
    tokens = _batch_buffer(prompt, length + max_new_tokens, mesh)
    graphdef, state = nnx.split(model)
    with jax.set_mesh(mesh):
        for position in range(length, length + max_new_tokens):
            batch = jax.device_put(tokens, NamedSharding(mesh, logical_to_spec(("batch", None))))
            logits_blv = _full_forward_jit(graphdef, state, batch)
            tokens[:, position] = np.asarray(jnp.argmax(logits_blv[:, position - 1], axis=-1))
    return tokens[: prompt.shape[0]]


# --------------------------------------------------------------------------- loading for the CLI


def load_trained(path: str | os.PathLike, mesh: Mesh, step: int | None = None) -> tuple[object, Transformer]:
    """(ModelConfig, Transformer on `mesh`) from a tedjax run: its log dir or its checkpoint dir.

    Restores the parameters and the non-parameter model state (expert
    placement, router bias), not the optimizer state, of the newest (or
    `step`) checkpoint, resharded onto `mesh`.
    """
    import json

    import orbax.checkpoint as ocp

    from tedjax.config import ModelConfig, check_mesh
    from tedjax.hf import _flatten, _unflatten
    from tedjax.mesh import state_shardings
    from tedjax.checkpoint import _abstract_slice
    from tedjax.model import abstract_model, stack_layers, unstack_layers

    root = Path(path).expanduser()
    directory = root / "checkpoints" if (root / "checkpoints").is_dir() else root
    steps = sorted(int(p.name) for p in directory.iterdir() if p.is_dir() and p.name.isdigit()) if (
        directory.is_dir()) else []
    if not steps:
        raise FileNotFoundError(f"no checkpoint in {str(directory)!r}; pass the log.dir of a training run (e.g. "
                                "runs/tiny) or its checkpoint directory, after training with checkpoint.every > 0")
    if step is not None and step not in steps:
        raise FileNotFoundError(f"no checkpoint step {step} in {directory}; available: {steps}")
    from tedjax.checkpoint import newest_verified_step

    step, notes = newest_verified_step(directory, steps, step)  # checksums verified as --resume does
    for note in notes:
        print(note, file=sys.stderr)
    meta_file = directory / str(step) / "meta" / "metadata"
    try:
        meta = json.loads(meta_file.read_text())
        config = ModelConfig(**meta["model"])
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise FileNotFoundError(f"checkpoint step {step} in {directory}: cannot read its model config from "
                                f"{meta_file} ({err})") from None
    check_mesh(config, mesh)
    graphdef, abstract_params, abstract_rest = nnx.split(abstract_model(config), nnx.Param, ...)
    unrolled = "layers" not in meta  # written before scanned layers: `blocks/<i>`, stacked after reading
    target, empty, wanted = {}, {}, {}
    for name, abstract in (("params", abstract_params), ("model_state", abstract_rest)):
        shardings = state_shardings(abstract, mesh)
        wanted[name] = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                                    nnx.to_pure_dict(abstract), nnx.to_pure_dict(shardings))
        tree = unstack_layers(config, wanted[name], take=_abstract_slice) if unrolled else wanted[name]
        for key, leaf in _flatten(tree).items():
            (target if math.prod(leaf.shape) else empty)[(name, *key)] = leaf  # zero-size arrays are not stored
    restore_args = {key: ocp.ArrayRestoreArgs(sharding=t.sharding) for key, t in target.items()}
    args = ocp.args.PyTreeRestore(item=_unflatten(target), restore_args=_unflatten(restore_args), partial_restore=True)
    with ocp.CheckpointManager(directory, item_names=("state", "meta")) as manager:
        restored = _flatten(manager.restore(step, args=ocp.args.Composite(state=args))["state"])
    restored.update({key: jnp.zeros(t.shape, t.dtype, device=t.sharding) for key, t in empty.items()})
    restored = _unflatten(restored)
    if unrolled:
        restored = {name: jax.tree.map(lambda x, a: jax.device_put(x, a.sharding), stack_layers(config, tree),
                                       wanted[name]) for name, tree in restored.items()}
    nnx.replace_by_pure_dict(abstract_params, restored["params"])
    if "model_state" in restored:
        nnx.replace_by_pure_dict(abstract_rest, restored["model_state"])
    return config, nnx.merge(graphdef, abstract_params, abstract_rest)


def run_tokenizer(path: str | os.PathLike) -> str | None:
    """The Hugging Face tokenizer directory a tedjax run trained with, if any (None: UTF-8 bytes).

    From the newest checkpoint's config: the tokenizer recorded in its token
    files' meta.json (`prepare --tokenizer`), else its `init_from` directory.
    """
    import json

    root = Path(path).expanduser()
    directory = root / "checkpoints" if (root / "checkpoints").is_dir() else root
    steps = sorted((int(p.name) for p in directory.iterdir() if p.is_dir() and p.name.isdigit()), reverse=True)
    try:
        config = json.loads((directory / str(steps[0]) / "meta" / "metadata").read_text()).get("config") or {}
    except (IndexError, OSError, ValueError):
        return None
    data = config.get("data") or {}
    if data.get("source") == "tokens" and data.get("path"):
        try:
            tokenizer = json.loads((Path(data["path"]) / "meta.json").read_text()).get("tokenizer", "")
        except (OSError, ValueError):
            tokenizer = ""
        if isinstance(tokenizer, str) and tokenizer.startswith("hf:"):
            return str(Path(tokenizer[3:]).parent)
    init_from = config.get("init_from") or ""
    return init_from[3:] if init_from.startswith("hf:") else None


def _parse_mesh(text: str) -> tuple[int, int, int]:
    match = re.fullmatch(r"\s*(\d+)\s*,\s*(\d+)\s*,\s*(\d+)\s*", text)
    if not match:
        raise argparse.ArgumentTypeError(f"--mesh must be DATA,EXPERT,TENSOR (e.g. 1,1,1 or 2,2,2), got {text!r}")
    return tuple(int(g) for g in match.groups())  # type: ignore[return-value]


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m tedjax.generate ...`; returns the exit code."""
    parser = argparse.ArgumentParser(prog="python -m tedjax.generate", description=__doc__.splitlines()[0])
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--checkpoint", help="a tedjax run directory (log.dir, e.g. runs/tiny) or its checkpoints/")
    source.add_argument("--hf", help="a Hugging Face model directory (config.json, *.safetensors, tokenizer.json)")
    parser.add_argument("--prompt", required=True, help="text to continue")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    parser.add_argument("--top-k", type=int, default=0, help="sample among the k most likely tokens (0 = all)")
    parser.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling threshold")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--step", type=int, default=None, help="checkpoint step (default: the newest)")
    parser.add_argument("--mesh", type=_parse_mesh, default=(1, 1, 1), help="DATA,EXPERT,TENSOR (default 1,1,1)")
    parser.add_argument("--tokenizer", default=None, help="a Hugging Face tokenizer directory (default: the --hf "
                        "directory; for --checkpoint, the tokenizer the run's data was prepared with or the one it "
                        "was imported with, else UTF-8 bytes, as the run trained on)")
    args = parser.parse_args(argv)
    devices = math.prod(args.mesh)
    if devices > 1 and "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
        # Simulated CPU devices, like train.py (must be set before the CPU backend starts).
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                                   + f" --xla_force_host_platform_device_count={devices}").strip()
    from tedjax import data as data_lib
    from tedjax import hf

    try:
        # The tokenizer first: a missing one is an error before any weight is read.
        tokenizer_dir = args.tokenizer or args.hf or run_tokenizer(args.checkpoint)
        if tokenizer_dir and not (Path(tokenizer_dir).expanduser() / "tokenizer.json").is_file() and not (
                Path(tokenizer_dir).expanduser().is_file()):
            given = "--tokenizer" if args.tokenizer else "--hf" if args.hf else "the run's tokenizer"
            raise FileNotFoundError(f"{given} {str(tokenizer_dir)!r} has no tokenizer.json; pass --tokenizer DIR, a "
                                    "Hugging Face directory that holds the model's tokenizer.json")
        if tokenizer_dir:
            tokenizer = data_lib.HFTokenizer(tokenizer_dir)
            encode, decode, eos = tokenizer.encode, tokenizer.decode, tokenizer.eos_id
        else:
            encode, decode, eos = (lambda t: data_lib.encode(t).tolist()), data_lib.decode, None
        mesh = make_mesh(*args.mesh, devices=jax.devices()[:devices])
        if args.hf:
            config, model = hf.load(args.hf, mesh)
        else:
            config, model = load_trained(args.checkpoint, mesh, args.step)
        prompt = encode(args.prompt)
        out = generate(model, prompt, args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                       top_p=args.top_p, seed=args.seed, eos_id=eos)
    except (ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    new = out[0, len(prompt):].tolist()
    if eos is not None and eos in new:
        new = new[: new.index(eos)]
    print(args.prompt + decode(new))
    return 0


if __name__ == "__main__":
    sys.exit(main())


def sample_after_training(result, prompt: str = "def ", max_new_tokens: int = 80) -> str | None:
    """A short sample from a finished `loop.run` on byte-token text; None when the run's ids are not bytes
    (synthetic data, a Hugging Face tokenizer or checkpoint)."""
    import json

    from tedjax import data

    config = result.trainer.config
    if config.init_from or config.data.source == "synthetic":
        return None
    if config.data.source == "tokens":
        try:
            tokenizer = json.loads((Path(config.data.path) / "meta.json").read_text()).get("tokenizer")
        except (OSError, ValueError):
            return None
        if tokenizer != "utf8-bytes":  # what `prepare` writes for bytes; "hf:<tokenizer.json>" otherwise
            return None
    prompt_ids = data.encode(prompt)
    max_new_tokens = min(max_new_tokens, config.model.max_len - len(prompt_ids))
    if max_new_tokens < 1:
        return None
    model = nnx.merge(result.trainer.graphdef, result.state.params, result.state.model_state)
    ids = generate(model, prompt_ids, max_new_tokens, temperature=0.8, top_k=20, seed=0)
    return data.decode(ids[0])
