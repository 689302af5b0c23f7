"""Hugging Face checkpoints in and out: Mixtral and Qwen3-MoE on any TED layout.

`load(dir, mesh)` reads a Hugging Face model directory (`config.json` and
`*.safetensors`, through the `safetensors` package, no torch) into a sharded
`Transformer`; `save(model, dir)` writes one back that transformers loads.

One explicit table per architecture maps every tedjax parameter to the
Hugging Face tensor(s) it is made of (`weight_table`). Before anything is
read, the table is checked against the files: a missing tensor, a tensor no
row of the table uses, or a shape that differs from the config is an error
naming the tensor, and nothing is loaded. Each parameter is then built with
`jax.make_array_from_callback`: every device reads only its own slice of the
file (an expert-parallel device reads only its experts), so the model never
exists unsharded in host memory.

Layouts. A Hugging Face `nn.Linear` weight is `[out, in]`; tedjax keeps
`[in, out]` with heads split out: q_proj `[H*K, D]` -> wq `[D, H, K]`,
o_proj `[D, H*K]` -> wo `[H, K, D]`, the router `[E, D]` -> `[D, E]`, and the
E per-expert matrices stacked into `[E, D, F]` (w_gate = Mixtral w1 / Qwen
gate_proj, w_in = w3 / up_proj) and `[E, F, D]` (w_out = w2 / down_proj).
Experts are loaded in their logical order.

Semantics. Mixtral renormalises its top-k router probabilities; Qwen3-MoE
does when `norm_topk_prob` is true (`model.router_renormalize`). Neither
drops tokens, so the imported config is dropless (`capacity_scope="dropless"`:
every choice computed, in device pools of S x min(E_local, top_k) rows per
routing group rather than per-expert capacity C = S, E x S rows).
RoPE settings are read wherever config.json puts them, as transformers reads
them (`_rope_fields`): linear and YaRN scaling are implemented, any other kind
is an error naming it. Mixtral's `sliding_window` is a band in attention
(`model.sliding_window`), never a cap on `max_len`. A vocabulary "tensor" does
not divide is padded in `load` and unpadded in `save`; `save` writes back the
special token ids, the RoPE scaling and the window it read.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from tedjax import pipeline as pipe
from tedjax.config import ModelConfig, check_mesh
from tedjax.mesh import state_shardings
from tedjax.model import Transformer, abstract_model, layer_index, moe_stack

ARCHITECTURES = {"MixtralForCausalLM": "mixtral", "Qwen3MoeForCausalLM": "qwen3_moe"}
# The fields a checkpoint fixes; `init_from` takes these from config.json, whatever the YAML says.
ARCH_FIELDS = ("vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "head_dim", "d_ff", "num_experts",
               "expert_d_ff", "top_k", "moe_every", "activation", "qk_norm", "norm_eps", "rope_base",
               "router_renormalize", "rope_scaling", "rope_factor", "rope_original_max_len", "rope_beta_fast",
               "rope_beta_slow", "rope_attention_factor", "rope_truncate", "sliding_window")  # fmt: skip
# Special token ids: taken from config.json (the YAML may change them) and written back by `save`.
TOKEN_FIELDS = ("bos_token_id", "eos_token_id", "pad_token_id")
# RoPE theta when config.json gives none, per architecture (transformers' `default_theta`).
DEFAULT_THETA = {"mixtral": 1e6, "qwen3_moe": 1e4}
ROPE_TYPES = {"default": "none", "linear": "linear", "yarn": "yarn"}
# Files that hold weights: `save` refuses a directory with any of them unless told to overwrite.
WEIGHT_PATTERNS = ("*.safetensors", "*.safetensors.index.json", "pytorch_model*.bin", "pytorch_model*.bin.index.json",
                   "tf_model*.h5", "flax_model*.msgpack")  # fmt: skip
_FLOAT_DTYPES = ("F64", "F32", "F16", "BF16")


class HFCheckpointError(ValueError):
    """A Hugging Face directory tedjax cannot load or write as asked; the message names the file or key."""


# --------------------------------------------------------------------------- config.json


def read_hf_config(path: str | os.PathLike) -> dict:
    """config.json of a Hugging Face model directory, with the architecture checked."""
    d = Path(path).expanduser()
    if not d.is_dir():
        raise HFCheckpointError(f"Hugging Face model directory {str(d)!r} does not exist (or is not a directory)")
    cfg_path = d / "config.json"
    if not cfg_path.is_file():
        raise HFCheckpointError(f"{str(d)!r} has no config.json, so it is not a Hugging Face model directory; "
                                "point to the directory that holds config.json and *.safetensors")
    try:
        hf = json.loads(cfg_path.read_text())
    except (ValueError, UnicodeDecodeError) as err:
        raise HFCheckpointError(f"{cfg_path} is not valid JSON ({err})") from None
    if not isinstance(hf, dict):
        raise HFCheckpointError(f"{cfg_path} must hold a JSON object")
    archs = hf.get("architectures") or []
    arch = archs[0] if isinstance(archs, list) and archs else None
    if arch not in ARCHITECTURES:
        raise HFCheckpointError(
            f"{cfg_path}: architecture {arch!r} (model_type {hf.get('model_type')!r}) is not supported; "
            f"supported: {', '.join(ARCHITECTURES)}"
        )
    return hf


def _kind(hf: dict) -> str:
    return ARCHITECTURES[hf["architectures"][0]]


def model_config(path: str | os.PathLike, **overrides) -> ModelConfig:
    """The ModelConfig of a Hugging Face directory (dropless), with non-architecture `overrides` applied."""
    fixed = sorted(set(overrides) & set(ARCH_FIELDS))
    if fixed:
        raise HFCheckpointError(f"{fixed} are fixed by the checkpoint's config.json and cannot be overridden")
    fields = model_fields(path, overrides)
    try:
        return ModelConfig(**fields)
    except ValueError as err:  # a config.json value tedjax refuses: say it in config.json's words
        hf = read_hf_config(path)
        where = Path(path).expanduser() / "config.json"
        raise HFCheckpointError(f"{where}: {in_hf_terms(str(err), _kind(hf))}") from None


def model_fields(path: str | os.PathLike, user: dict | None = None) -> dict:
    """ModelConfig fields for a Hugging Face checkpoint: its architecture, then `user`'s other keys.

    The architecture (`ARCH_FIELDS`) always comes from config.json. The rest
    defaults to no dropped tokens (`capacity_scope="dropless"`, as the Hugging
    Face model computes), the checkpoint's router aux-loss weight and no
    z-loss; `user` (the YAML's `model:` section) may change any of it, e.g.
    `capacity_scope: expert` with a `capacity_factor` to bound the buffers.
    """
    hf = read_hf_config(path)
    where = Path(path).expanduser() / "config.json"
    fields = _arch_fields(hf, where)
    defaults = {
        "max_len": fields.pop("max_len"),
        "capacity_scope": "dropless",
        "min_capacity": 1,
        "aux_loss_weight": float(hf.get("router_aux_loss_coef", 0.0) or 0.0),
        "z_loss_weight": 0.0,
        **{key: _token_ids(hf, key, where) for key in TOKEN_FIELDS},
    }
    user = dict(user or {})
    return {**defaults, **{k: v for k, v in user.items() if k not in ARCH_FIELDS}, **fields}


def _token_ids(hf: dict, key: str, where: Path) -> int | tuple[int, ...]:
    """A special token id of config.json as ModelConfig keeps it: -1 for none; eos as a tuple (one id or a list)."""
    value = hf.get(key)
    ids = tuple(value) if isinstance(value, list) else () if value is None else (value,)
    if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in ids) or (
            len(ids) > 1 and key != "eos_token_id"):
        raise HFCheckpointError(f"{where}: {key}={value!r} is not a token id (an integer >= 0, or null)")
    return ids if key == "eos_token_id" else ids[0] if ids else -1


def _rope_fields(hf: dict, where: Path, kind: str, max_positions: int) -> dict:
    """rope_base and the model.rope_* fields, read the way transformers reads them; other RoPE kinds are errors.

    RoPE settings can sit in `rope_parameters` (transformers 5), in
    `rope_scaling` (older configs, and Qwen's documented YaRN setting beside
    `rope_parameters`), in `rope_theta`, `partial_rotary_factor` and
    `original_max_position_embeddings`. As in transformers, a non-empty
    `rope_scaling` replaces `rope_parameters` whole, and a missing theta is
    the architecture's default; where that would silently drop a value the
    file states (another rope_theta in `rope_parameters`), it is an error.
    """

    def fail(what: str):
        raise HFCheckpointError(f"{where}: {what}")

    params, scaling = hf.get("rope_parameters"), hf.get("rope_scaling")
    for key, value in (("rope_parameters", params), ("rope_scaling", scaling)):
        if value is not None and not isinstance(value, dict):
            fail(f"{key} must be a JSON object, got {value!r}")
        nested = sorted(k for k, v in (value or {}).items() if isinstance(v, dict))
        if nested:
            fail(f"{key} nested per layer type ({', '.join(nested)}) is not supported by tedjax, whose layers "
                 "all share one RoPE; write one flat block")
    top_theta = hf.get("rope_theta")
    if scaling:  # transformers: `rope_parameters = rope_scaling or rope_parameters`
        chosen, source = scaling, "rope_scaling"
        theta = scaling.get("rope_theta", top_theta if top_theta is not None else DEFAULT_THETA[kind])
        params = params or {}
        dropped = sorted(k for k, v in params.items()
                         if k != "rope_theta" and not (k in ("rope_type", "type") and v == "default"))
        if dropped:
            fail(f"both rope_scaling and a non-default rope_parameters ({', '.join(dropped)}); transformers uses "
                 "only rope_scaling. Keep one of them")
        if params.get("rope_theta") is not None and float(params["rope_theta"]) != float(theta):
            fail(f"rope_scaling replaces rope_parameters in transformers, so the model runs with rope_theta={theta} "
                 f"(rope_scaling's, else the top-level rope_theta, else the {hf['architectures'][0]} default), "
                 f"not rope_parameters.rope_theta={params['rope_theta']}; add \"rope_theta\" to rope_scaling")
    else:
        chosen, source = params or {}, "rope_parameters"
        theta = chosen.get("rope_theta", top_theta if top_theta is not None else DEFAULT_THETA[kind])
    for value, key in ((hf.get("partial_rotary_factor"), "partial_rotary_factor"),
                       (chosen.get("partial_rotary_factor"), f"{source}.partial_rotary_factor")):
        if value is not None and value != 1:
            fail(f"{key}={value} (RoPE on part of each head) is not supported by tedjax")
    rope_type = chosen.get("rope_type", chosen.get("type", "default"))
    if rope_type not in ROPE_TYPES:
        fail(f"RoPE scaling rope_type {rope_type!r} (in {source}) is not supported by tedjax, which implements "
             f"{', '.join(map(repr, ROPE_TYPES))}")
    if not isinstance(theta, (int, float)) or isinstance(theta, bool) or not theta > 0:
        fail(f"rope_theta={theta!r} (in {source}) must be a number > 0")
    fields = {"rope_base": float(theta), "rope_scaling": ROPE_TYPES[rope_type]}
    if rope_type == "default":
        return fields

    def number(key: str, default=None, low: float = 0.0):
        value = chosen.get(key)
        value = default if value is None else value
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not low < value < float("inf"):
            fail(f"{source}.{key}={chosen.get(key)!r} must be a number > {low:g} for rope_type {rope_type!r}")
        return float(value)

    if rope_type == "linear":
        return {**fields, "rope_factor": number("factor")}
    top_original = hf.get("original_max_position_embeddings")
    original = chosen.get("original_max_position_embeddings")
    if top_original is not None and original is not None and top_original != original:
        fail(f"original_max_position_embeddings={top_original} and {source}.original_max_position_embeddings="
             f"{original} differ; keep one")
    original = top_original if top_original is not None else original if original is not None else max_positions
    if isinstance(original, bool) or not isinstance(original, int) or original < 1:
        fail(f"original_max_position_embeddings={original!r} must be an integer >= 1")
    factor = number("factor", max_positions / original)
    attention = chosen.get("attention_factor")
    mscale, mscale_all = chosen.get("mscale"), chosen.get("mscale_all_dim")
    if attention is None and mscale and mscale_all:  # transformers: mscale ratio (DeepSeek's setting)
        def get_mscale(m: float) -> float:
            return 1.0 if factor <= 1 else 0.1 * m * math.log(factor) + 1.0

        attention = get_mscale(float(mscale)) / get_mscale(float(mscale_all))
    truncate = chosen.get("truncate", True)
    if not isinstance(truncate, bool):
        fail(f"{source}.truncate={truncate!r} must be true or false")
    return {**fields, "rope_factor": factor, "rope_original_max_len": original,
            "rope_beta_fast": number("beta_fast", 32.0) if chosen.get("beta_fast") else 32.0,
            "rope_beta_slow": number("beta_slow", 1.0) if chosen.get("beta_slow") else 1.0,
            "rope_attention_factor": 0.0 if attention is None else number("attention_factor", attention),
            "rope_truncate": truncate}


def capacity_note(config: ModelConfig, seq_len: int, expert_ways: int = 1) -> str:
    """The routing capacity an imported model runs with, and a warning where it can drop tokens.

    Hugging Face's Mixtral and Qwen3-MoE drop no token, and an import is
    dropless by default (`capacity_scope="dropless"`). A bounded dropless
    buffer (`dropless_buffer_factor` > 0) or a capacity the user chose can
    drop: per-expert capacity C is dropless only when C >= S (a group of S
    tokens can all pick one expert); device pools ("device", E / `expert_ways`
    experts a pool) only when pool x C covers S x min(top_k, pool).
    """
    from tedjax.routing import capacity, dropless_capacity

    group = config.group_size or seq_len
    if config.capacity_scope == "dropless":
        rows = dropless_capacity(group, config.num_experts, config.top_k, expert_ways, config.dropless_buffer_factor)
        worst = dropless_capacity(group, config.num_experts, config.top_k, expert_ways)
        text = (f"imported model routing: capacity_scope 'dropless', {rows} rows per device pool per group of "
                f"{group} tokens")
        if rows >= worst:
            return text + " (the worst case: no token is dropped, as in the Hugging Face model)"
        return (f"WARNING: {text}, below the worst case {worst} (model.dropless_buffer_factor="
                f"{config.dropless_buffer_factor:g}). Choices past it are dropped, which the Hugging Face model "
                "never does; set model.dropless_buffer_factor=0 for no drops")
    pool = max(config.num_experts // max(expert_ways, 1), 1) if config.capacity_scope == "device" else 1
    parts, dropping = [], []
    for label, key, cf in (("training", "capacity_factor", config.capacity_factor),
                           ("evaluation", "eval_capacity_factor", config.eval_capacity_factor)):
        slots = capacity(group, config.num_experts, config.top_k, cf, config.min_capacity)
        parts.append(f"{label} model.{key}={cf:g} -> {slots} slots per expert per group of {group} tokens")
        if pool * slots < group * min(config.top_k, pool):
            dropping.append(f"model.{key}")
    text = f"imported model routing: capacity_scope {config.capacity_scope!r}, {'; '.join(parts)}"
    if not dropping:
        return text + " (dropless, as the Hugging Face model)"
    dropless = config.num_experts / config.top_k
    return (f"WARNING: {text}. Tokens past an expert's capacity are dropped, which the Hugging Face model never "
            f"does; set model.capacity_scope=dropless (the import's default), or "
            f"{' and '.join(f'{k}={dropless:g}' for k in dropping)} (num_experts / top_k)")


def _arch_fields(hf: dict, where: Path) -> dict:
    """ARCH_FIELDS (+ max_len) from a Hugging Face config dict; unsupported features are errors."""
    kind = _kind(hf)

    def need(key: str, *alternatives: str):
        for k in (key, *alternatives):
            if hf.get(k) is not None:
                return hf[k]
        raise HFCheckpointError(f"{where}: key {key!r} is missing; a {hf['architectures'][0]} config needs it")

    def refuse(condition: bool, what: str):
        if condition:
            raise HFCheckpointError(f"{where}: {what} is not supported by tedjax")

    refuse(hf.get("hidden_act", "silu") != "silu", f"hidden_act={hf.get('hidden_act')!r} (only 'silu' / SwiGLU)")
    refuse(bool(hf.get("tie_word_embeddings", False)), "tie_word_embeddings=true")
    refuse(bool(hf.get("attention_bias", False)), "attention_bias=true")
    d_model, n_heads = int(need("hidden_size")), int(need("num_attention_heads"))
    max_len = int(need("max_position_embeddings"))
    window = 0
    if kind == "qwen3_moe":
        refuse(bool(hf.get("use_sliding_window", False)), "use_sliding_window=true")
        refuse(bool(hf.get("mlp_only_layers")), f"mlp_only_layers={hf.get('mlp_only_layers')}")
    elif hf.get("sliding_window") is not None:  # Mixtral: a band in attention (layers.Attention)
        window = hf["sliding_window"]
        if isinstance(window, bool) or not isinstance(window, int) or window < 1:
            raise HFCheckpointError(f"{where}: sliding_window={window!r} must be an integer >= 1 or null")
    fields = {
        "vocab_size": int(need("vocab_size")),
        "d_model": d_model,
        "n_layers": int(need("num_hidden_layers")),
        "n_heads": n_heads,
        "n_kv_heads": int(need("num_key_value_heads")),
        "head_dim": int(hf.get("head_dim") or d_model // n_heads),
        "num_experts": int(need("num_local_experts", "num_experts")),
        "top_k": int(need("num_experts_per_tok")),
        "activation": "swiglu",
        "norm_eps": float(need("rms_norm_eps")),
        "max_len": max_len,
        "sliding_window": window,
        **_rope_fields(hf, where, kind, max_len),
    }
    if kind == "mixtral":
        fields.update(expert_d_ff=int(need("intermediate_size")), d_ff=int(need("intermediate_size")), moe_every=1,
                      qk_norm=False, router_renormalize=True)
    else:
        fields.update(expert_d_ff=int(need("moe_intermediate_size")), d_ff=int(need("intermediate_size")),
                      moe_every=int(hf.get("decoder_sparse_step") or 1), qk_norm=True,
                      router_renormalize=bool(need("norm_topk_prob")))
    experts_key = "num_local_experts" if "num_local_experts" in hf else "num_experts"
    refuse(fields["num_experts"] < 1, f"{experts_key}={fields['num_experts']} (a dense model)")
    defaults = {f.name: f.default for f in dataclasses.fields(ModelConfig)}
    return {**{k: defaults[k] for k in ARCH_FIELDS if k.startswith("rope_")}, **fields}


# config.json keys of the ModelConfig fields whose names differ, per architecture (for messages).
HF_KEYS = {
    "mixtral": {"n_kv_heads": "num_key_value_heads", "n_heads": "num_attention_heads",
                "num_experts": "num_local_experts", "expert_d_ff": "intermediate_size", "d_ff": "intermediate_size",
                "d_model": "hidden_size", "n_layers": "num_hidden_layers", "top_k": "num_experts_per_tok"},
    "qwen3_moe": {"n_kv_heads": "num_key_value_heads", "n_heads": "num_attention_heads", "num_experts": "num_experts",
                  "expert_d_ff": "moe_intermediate_size", "d_ff": "intermediate_size", "d_model": "hidden_size",
                  "n_layers": "num_hidden_layers", "top_k": "num_experts_per_tok"},
}  # fmt: skip


def in_hf_terms(message: str, kind: str) -> str:
    """A message about ModelConfig fields, with each field named by its config.json key."""
    names = HF_KEYS[kind]
    pattern = r"(?<![\w.])(?:model\.)?(" + "|".join(sorted(names, key=len, reverse=True)) + r")\b"
    return re.sub(pattern, lambda m: f"config.json's {names[m.group(1)]}", message)


def _hf_config(config: ModelConfig, kind: str) -> dict:
    """config.json for `config` as a Mixtral or Qwen3-MoE model."""
    eos = None if not config.eos_token_id else config.eos_token_id[0] if len(config.eos_token_id) == 1 else list(
        config.eos_token_id)
    common = {
        "vocab_size": config.vocab_size, "hidden_size": config.d_model, "num_hidden_layers": config.n_layers,
        "num_attention_heads": config.n_heads, "num_key_value_heads": config.kv_heads,
        "head_dim": config.head_size, "max_position_embeddings": config.max_len, "rms_norm_eps": config.norm_eps,
        "rope_theta": config.rope_base, "rope_parameters": _rope_parameters(config),
        "num_experts_per_tok": config.top_k, "hidden_act": "silu", "tie_word_embeddings": False,
        "router_aux_loss_coef": config.aux_loss_weight, "attention_dropout": 0.0, "torch_dtype": "float32",
        "dtype": "float32", "sliding_window": config.sliding_window or None, "use_cache": True,
        "bos_token_id": None if config.bos_token_id < 0 else config.bos_token_id, "eos_token_id": eos,
        "pad_token_id": None if config.pad_token_id < 0 else config.pad_token_id,
    }  # fmt: skip
    if kind == "mixtral":
        return {"architectures": ["MixtralForCausalLM"], "model_type": "mixtral", **common,
                "intermediate_size": config.expert_d_ff, "num_local_experts": config.num_experts}
    return {"architectures": ["Qwen3MoeForCausalLM"], "model_type": "qwen3_moe", **common,
            "intermediate_size": config.d_ff, "moe_intermediate_size": config.expert_d_ff,
            "num_experts": config.num_experts, "num_local_experts": config.num_experts,
            "decoder_sparse_step": config.moe_every, "mlp_only_layers": [], "use_sliding_window": False,
            "attention_bias": False, "norm_topk_prob": _renormalizes(config)}  # fmt: skip


def _rope_parameters(config: ModelConfig) -> dict:
    """config.json's rope_parameters block for the model's RoPE (transformers 5's form)."""
    kind = {v: k for k, v in ROPE_TYPES.items()}[config.rope_scaling]
    block = {"rope_type": kind, "rope_theta": config.rope_base}
    if kind == "linear":
        block["factor"] = config.rope_factor
    elif kind == "yarn":
        block.update(factor=config.rope_factor, original_max_position_embeddings=config.rope_original_max_len,
                     beta_fast=config.rope_beta_fast, beta_slow=config.rope_beta_slow, truncate=config.rope_truncate)
        if config.rope_attention_factor:
            block["attention_factor"] = config.rope_attention_factor
    return block


def _architecture(config: ModelConfig) -> dict:
    """ARCH_FIELDS of `config` with their defaults resolved (n_kv_heads 0 = n_heads, ...)."""
    view = {k: getattr(config, k) for k in ARCH_FIELDS}
    view.update(n_kv_heads=config.kv_heads, head_dim=config.head_size, router_renormalize=_renormalizes(config))
    if config.num_experts and config.moe_every == 1:
        view["d_ff"] = None  # every layer is MoE: no layer has the dense width
    return view


def _renormalizes(config: ModelConfig) -> bool:
    return config.top_k > 1 if config.router_renormalize is None else config.router_renormalize


def export_kind(config: ModelConfig) -> str:
    """Which Hugging Face architecture represents `config` exactly; raises if none does."""
    problems = []
    if config.activation != "swiglu":
        problems.append(f"activation={config.activation!r} (Mixtral and Qwen3-MoE use swiglu)")
    if not config.num_experts:
        problems.append("num_experts=0 (a dense model)")
    if config.qk_norm:
        kind = "qwen3_moe"
    else:
        kind = "mixtral"
        if config.moe_every != 1:
            problems.append(f"moe_every={config.moe_every} (Mixtral has experts in every layer; qk_norm models "
                            "export as Qwen3-MoE, which allows dense layers)")
        if not _renormalizes(config):
            problems.append("router_renormalize is off (Mixtral renormalises its top-k weights)")
    if config.qk_norm and config.sliding_window:
        problems.append("sliding_window with qk_norm (Qwen3-MoE's window is not tedjax's band on every layer)")
    if problems:
        raise HFCheckpointError("this model has no exact Hugging Face equivalent: " + "; ".join(problems))
    return kind


# --------------------------------------------------------------------------- the weight tables


@dataclasses.dataclass(frozen=True)
class Source:
    """Where one tedjax parameter comes from.

    `names`: one Hugging Face tensor, or one per expert (stacked as tedjax dim 0
    when `stacked`). Each tensor of shape `hf_shape` is viewed as `split` (a
    reshape that splits dims, e.g. `[H*K, D]` as `[H, K, D]`) and transposed by
    `perm`: tedjax dim i is split dim perm[i]. `padded`: the tedjax shape when
    it is larger (a padded vocabulary); the extra rows read as zeros and are
    not written back.
    """

    names: tuple[str, ...]
    hf_shape: tuple[int, ...]
    split: tuple[int, ...]
    perm: tuple[int, ...]
    stacked: bool = False
    padded: tuple[int, ...] | None = None

    @property
    def unpadded(self) -> tuple[int, ...]:
        inner = tuple(self.split[p] for p in self.perm)
        return (len(self.names), *inner) if self.stacked else inner

    @property
    def shape(self) -> tuple[int, ...]:
        return self.padded or self.unpadded

    def to_hf(self, value: np.ndarray) -> Iterator[tuple[str, np.ndarray]]:
        """(name, Hugging Face tensor) pairs of a full tedjax value (padding stripped)."""
        inverse = tuple(np.argsort(self.perm))
        value = value[tuple(slice(0, n) for n in self.unpadded)]
        parts = value if self.stacked else [value]
        for name, part in zip(self.names, parts):
            yield name, np.ascontiguousarray(np.transpose(part, inverse).reshape(self.hf_shape))


def _linear(name: str, out_dims: tuple[int, ...], in_dim: int) -> Source:
    """An nn.Linear weight `[prod(out_dims), in]` as tedjax `[in, *out_dims]`."""
    n = len(out_dims)
    return Source((name,), (math.prod(out_dims), in_dim), (*out_dims, in_dim), (n, *range(n)))


def _linear_in(name: str, out_dim: int, in_dims: tuple[int, ...]) -> Source:
    """An nn.Linear weight `[out, prod(in_dims)]` as tedjax `[*in_dims, out]` (the row-parallel output)."""
    n = len(in_dims)
    return Source((name,), (out_dim, math.prod(in_dims)), (out_dim, *in_dims), (*range(1, n + 1), 0))


def _experts(names: list[str], out_dim: int, in_dim: int) -> Source:
    """E nn.Linear weights `[out, in]` stacked as tedjax `[E, in, out]`."""
    return Source(tuple(names), (out_dim, in_dim), (out_dim, in_dim), (1, 0), stacked=True)


def _vector(name: str, size: int) -> Source:
    return Source((name,), (size,), (size,), (0,))


def weight_table(config: ModelConfig, kind: str) -> dict[tuple, Source]:
    """tedjax parameter path -> its Source, for `kind` "mixtral" or "qwen3_moe".

    Paths name decoder layers unrolled, `("blocks", i, ...)`; `model_key` says where layer i's
    parameter sits in the model's state (a scanned unit's stacked leaf, or the unrolled tail)."""
    d, h, hkv, k, e = config.d_model, config.n_heads, config.kv_heads, config.head_size, config.num_experts
    v, vp = config.vocab_size, config.padded_vocab
    table = {
        ("embed",): Source(("model.embed_tokens.weight",), (v, d), (v, d), (0, 1), padded=(vp, d) if vp > v else None),
        ("head",): dataclasses.replace(_linear("lm_head.weight", (v,), d), padded=(d, vp) if vp > v else None),
        ("final_norm", "scale"): _vector("model.norm.weight", d),
    }
    for i in range(config.n_layers):
        pre = f"model.layers.{i}"
        block = ("blocks", i)
        table[(*block, "attn_norm", "scale")] = _vector(f"{pre}.input_layernorm.weight", d)
        table[(*block, "ffn_norm", "scale")] = _vector(f"{pre}.post_attention_layernorm.weight", d)
        table[(*block, "attn", "wq")] = _linear(f"{pre}.self_attn.q_proj.weight", (h, k), d)
        table[(*block, "attn", "wk")] = _linear(f"{pre}.self_attn.k_proj.weight", (hkv, k), d)
        table[(*block, "attn", "wv")] = _linear(f"{pre}.self_attn.v_proj.weight", (hkv, k), d)
        table[(*block, "attn", "wo")] = _linear_in(f"{pre}.self_attn.o_proj.weight", d, (h, k))
        if config.qk_norm:
            table[(*block, "attn", "q_norm", "scale")] = _vector(f"{pre}.self_attn.q_norm.weight", k)
            table[(*block, "attn", "k_norm", "scale")] = _vector(f"{pre}.self_attn.k_norm.weight", k)
        ffn = (*block, "ffn")
        if config.is_moe_layer(i):
            f = config.expert_d_ff
            if kind == "mixtral":
                moe = f"{pre}.block_sparse_moe"
                gate, up, down = "w1", "w3", "w2"
            else:
                moe = f"{pre}.mlp"
                gate, up, down = "gate_proj", "up_proj", "down_proj"
            table[(*ffn, "router")] = _linear(f"{moe}.gate.weight", (e,), d)
            table[(*ffn, "w_gate")] = _experts([f"{moe}.experts.{j}.{gate}.weight" for j in range(e)], f, d)
            table[(*ffn, "w_in")] = _experts([f"{moe}.experts.{j}.{up}.weight" for j in range(e)], f, d)
            table[(*ffn, "w_out")] = _experts([f"{moe}.experts.{j}.{down}.weight" for j in range(e)], d, f)
        else:  # a dense layer (Qwen3-MoE decoder_sparse_step > 1)
            f = config.d_ff
            table[(*ffn, "w_gate")] = _linear(f"{pre}.mlp.gate_proj.weight", (f,), d)
            table[(*ffn, "w_in")] = _linear(f"{pre}.mlp.up_proj.weight", (f,), d)
            table[(*ffn, "w_out")] = _linear(f"{pre}.mlp.down_proj.weight", (d,), f)
    return table


def model_key(config: ModelConfig, key: tuple) -> tuple[tuple, int | None]:
    """(key of `nnx.to_pure_dict` of the model's parameters, index on its leading "layers" axis or None) of a
    weight-table key."""
    if key[0] != "blocks":
        return key, None
    path, index = layer_index(config, key[1])
    return (*path, *key[2:]), index


def _table_keys(config: ModelConfig, key: tuple) -> list[tuple] | None:
    """The weight-table keys of one model parameter key: one per stacked unit, or one (None for a stacked
    key with no "layers" axis, i.e. not a parameter the table knows)."""
    if key[0] == "units":
        every, units = config.moe_every, config.n_layers // config.moe_every
        return [("blocks", u * every + key[2], *key[3:]) for u in range(units)]
    if key[0] == "tail":
        return [("blocks", config.n_layers // config.moe_every * config.moe_every + key[1], *key[2:])]
    return [key]


# Tensors some checkpoints carry that hold no weights (recomputed buffers).
_IGNORED_SUFFIXES = (".rotary_emb.inv_freq",)


# --------------------------------------------------------------------------- reading safetensors


class _Files:
    """The tensors of a directory's *.safetensors files: name -> (file, shape, dtype), read slice by slice."""

    def __init__(self, directory: Path):
        self._safe_open = _safetensors().safe_open
        self.directory = directory
        index = directory / "model.safetensors.index.json"
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (ValueError, KeyError, TypeError) as err:
                raise HFCheckpointError(f"{index} is corrupt ({err!r}); it needs a 'weight_map'") from None
            files = sorted(set(weight_map.values()))
        else:
            files = sorted(p.name for p in directory.glob("*.safetensors"))
        if not files:
            raise HFCheckpointError(f"{str(directory)!r} has no *.safetensors files; tedjax reads only safetensors "
                                    "(convert pytorch_model.bin with transformers' save_pretrained)")
        self.info: dict[str, tuple[Path, tuple[int, ...], str]] = {}
        self._stack = contextlib.ExitStack()
        self._handles: dict[tuple[Path, str], Any] = {}
        for name in files:
            path = directory / name
            if not path.is_file():
                raise HFCheckpointError(f"{index} lists {name}, which is missing from {directory}")
            try:
                handle = self._open(path, "numpy")
                for key in handle.keys():
                    tensor = handle.get_slice(key)
                    self.info[key] = (path, tuple(tensor.get_shape()), tensor.get_dtype())
            except HFCheckpointError:
                raise
            except Exception as err:  # safetensors raises several types for damaged files
                raise HFCheckpointError(f"{path} cannot be read as safetensors ({err})") from None

    def _open(self, path: Path, framework: str):
        key = (path, framework)
        if key not in self._handles:
            self._handles[key] = self._stack.enter_context(self._safe_open(str(path), framework=framework))
        return self._handles[key]

    def read(self, name: str, index: tuple[slice, ...]) -> np.ndarray:
        """float32 `tensor[index]` without reading the rest of the tensor."""
        path, _, dtype = self.info[name]
        # numpy has no bfloat16: those tensors are sliced through jax (ml_dtypes) instead.
        framework = "flax" if dtype == "BF16" else "numpy"
        block = self._open(path, framework).get_slice(name)[index]
        return np.asarray(block).astype(np.float32)

    def close(self) -> None:
        self._stack.close()


def _safetensors():
    try:
        import safetensors
        import safetensors.numpy
    except ImportError:
        raise HFCheckpointError("Hugging Face checkpoints need the `safetensors` package: "
                                "pip install 'tedjax[hf]' (or pip install safetensors)") from None
    return safetensors


def _check_files(files: _Files, table: dict[tuple, Source], where: str) -> None:
    """Every tensor the table needs is there with its shape and a float dtype, and every tensor is used."""
    problems, wanted = [], set()
    for source in table.values():
        for name in source.names:
            wanted.add(name)
            if name not in files.info:
                problems.append(f"tensor {name!r} is missing")
                continue
            path, shape, dtype = files.info[name]
            if shape != source.hf_shape:
                problems.append(f"tensor {name!r} in {path.name} has shape {list(shape)} but config.json implies "
                                f"{list(source.hf_shape)}")
            elif dtype not in _FLOAT_DTYPES:
                problems.append(f"tensor {name!r} in {path.name} has dtype {dtype} (need one of {_FLOAT_DTYPES})")
    unused = sorted(n for n in files.info if n not in wanted and not n.endswith(_IGNORED_SUFFIXES))
    problems += [f"tensor {n!r} in {files.info[n][0].name} has no place in the model (unmapped)" for n in unused]
    if problems:
        shown = problems[:12] + ([f"... and {len(problems) - 12} more"] if len(problems) > 12 else [])
        raise HFCheckpointError(f"{where} does not match its config.json; nothing was loaded:\n  - "
                                + "\n  - ".join(shown))


def _reader(files: _Files, source: Source) -> Callable[[tuple[slice, ...]], np.ndarray]:
    """A make_array_from_callback callback: tedjax index -> that block of the parameter, read from the files."""
    split_groups = _groups(source.hf_shape, source.split)
    cache: dict[tuple, np.ndarray] = {}  # replicated params: every device asks for the same block

    def read_one(name: str, index: tuple[slice, ...]) -> np.ndarray:
        split_index = [slice(None)] * len(source.split)
        for tdim, sdim in enumerate(source.perm):
            split_index[sdim] = index[tdim]
        file_index, view_shape, inner_index = [], [], []
        for hf_dim, dims in enumerate(split_groups):
            inner = math.prod(source.split[j] for j in dims[1:])
            start, stop, _ = split_index[dims[0]].indices(source.split[dims[0]])
            file_index.append(slice(start * inner, stop * inner))
            view_shape += [stop - start, *(source.split[j] for j in dims[1:])]
            inner_index += [slice(None), *(split_index[j] for j in dims[1:])]
        block = files.read(name, tuple(file_index)).reshape(view_shape)[tuple(inner_index)]
        return np.transpose(block, source.perm)

    def callback(index: tuple[slice, ...]) -> np.ndarray:
        index = tuple(index) + (slice(None),) * (len(source.shape) - len(index))
        key = tuple(s.indices(n) for s, n in zip(index, source.shape))
        if key not in cache and source.padded:  # the rows that exist, then zeros for the padding
            block = np.zeros([len(range(*k)) for k in key], np.float32)
            real = tuple(slice(min(a, n), min(b, n)) for (a, b, _), n in zip(key, source.unpadded))
            if all(r.stop > r.start for r in real):  # a block of padding only reads nothing
                block[tuple(slice(0, r.stop - r.start) for r in real)] = read_one(source.names[0], real)
            cache[key] = block
        elif key not in cache:
            if source.stacked:
                names = source.names[index[0]]
                cache[key] = np.stack([read_one(n, index[1:]) for n in names]) if names else np.zeros(
                    (0, *[len(range(*s.indices(n))) for s, n in zip(index[1:], source.shape[1:])]), np.float32)
            else:
                cache[key] = read_one(source.names[0], index)
        return cache[key]

    return callback


def _layers_reader(readers: list[Callable]) -> Callable[[tuple[slice, ...]], np.ndarray]:
    """A make_array_from_callback callback for a stacked parameter `[units, ...]`: each unit's block, stacked."""

    def callback(index: tuple[slice, ...]) -> np.ndarray:
        index = tuple(index)
        units = range(*(index[0] if index else slice(None)).indices(len(readers)))
        return np.stack([readers[u](index[1:]) for u in units])

    return callback


def _groups(hf_shape: tuple[int, ...], split: tuple[int, ...]) -> list[list[int]]:
    """Which split dims make up each Hugging Face dim (split is a reshape that only splits dims)."""
    groups, j = [], 0
    for size in hf_shape:
        dims, prod = [j], split[j]
        j += 1
        while prod < size:
            dims.append(j)
            prod *= split[j]
            j += 1
        if prod != size:
            raise AssertionError(f"split {split} is not a refinement of {hf_shape}")
        groups.append(dims)
    return groups


# --------------------------------------------------------------------------- load


def check_checkpoint(path: str | os.PathLike, config: ModelConfig) -> None:
    """Raise HFCheckpointError unless the directory holds exactly the tensors `config` needs (reads no weight)."""
    _open_checked(Path(path).expanduser(), config)[0].close()


def _open_checked(d: Path, config: ModelConfig) -> tuple[_Files, dict[tuple, Source]]:
    hf = read_hf_config(d)
    mine, theirs = _architecture(config), _architecture(ModelConfig(**model_fields(d)))
    differ = [f"model.{k}={mine[k]!r} (config.json: {theirs[k]!r})" for k in ARCH_FIELDS if mine[k] != theirs[k]]
    if differ:
        raise HFCheckpointError(f"the model config does not describe the checkpoint in {str(d)!r}: "
                                f"{', '.join(differ)}; build it with tedjax.hf.model_config({str(d)!r})")
    table = weight_table(config, _kind(hf))
    files = _Files(d)
    try:
        _check_files(files, table, str(d))
    except BaseException:
        files.close()
        raise
    return files, table


def load_params(path: str | os.PathLike, config: ModelConfig, shardings: dict) -> dict:
    """Parameters of a Hugging Face checkpoint as a pure dict of arrays in `shardings` (a pure dict tree).

    Checks every file against the table first; then builds each parameter
    from its per-device slices.
    """
    d = Path(path).expanduser()
    files, table = _open_checked(d, config)
    try:
        flat_shardings = _flatten(shardings)
        keys = {key: _table_keys(config, key) for key in flat_shardings}
        covered = {k for ks in keys.values() for k in ks}
        if covered != set(table):
            raise HFCheckpointError(
                f"tedjax parameters without a source {sorted(covered - set(table))[:5]}, sources without "
                f"a parameter {sorted(set(table) - covered)[:5]}: the model's structure is not the one "
                "the weight table describes"
            )
        flat = {}
        for key, sharding in flat_shardings.items():
            if key[0] == "units":  # the scanned units: a leading "layers" axis, one table entry per unit
                sources = [table[k] for k in keys[key]]
                flat[key] = jax.make_array_from_callback((len(sources), *sources[0].shape), sharding,
                                                         _layers_reader([_reader(files, s) for s in sources]))
            else:
                source = table[keys[key][0]]
                flat[key] = jax.make_array_from_callback(source.shape, sharding, _reader(files, source))
    finally:
        files.close()
    return _unflatten(flat)


def load(path: str | os.PathLike, mesh: Mesh, **overrides) -> tuple[ModelConfig, Transformer]:
    """(ModelConfig, Transformer sharded on `mesh`) from a Hugging Face directory.

    `overrides` change non-architecture fields (e.g. `dtype="bfloat16"`,
    `remat="cac"`, `capacity_scope="expert"`). A vocabulary that "tensor" does
    not divide is padded to a multiple of it (`model.vocab_multiple`; the
    padded logits are -inf, so the logits equal transformers'). Every error (no config.json, an
    unsupported architecture, a shape that differs from the config, a mesh the
    model does not divide) is raised before any weight is read.
    """
    config = model_config(path, **overrides)
    tensor = mesh.shape["tensor"]
    if config.padded_vocab % tensor:  # Megatron's make-vocab-divisible: pad rows, -inf logits, stripped on save
        config = dataclasses.replace(config, vocab_multiple=math.lcm(config.vocab_multiple, tensor))
    try:
        check_mesh(config, mesh)
    except ValueError as err:
        raise HFCheckpointError(f"{Path(path).expanduser() / 'config.json'}: "
                                f"{in_hf_terms(str(err), _kind(read_hf_config(path)))}") from None
    graphdef, abstract_params, abstract_rest = nnx.split(abstract_model(config), nnx.Param, ...)
    shardings = nnx.to_pure_dict(state_shardings(abstract_params, mesh))
    params = load_params(path, config, shardings)
    rest = abstract_rest
    if jax.tree.leaves(abstract_rest):  # non-parameter state (RNG counters, ...) at its initial values
        with jax.set_mesh(mesh):
            rest = jax.jit(lambda: nnx.split(Transformer(config, rngs=nnx.Rngs(0)), nnx.Param, ...)[2],
                           out_shardings=state_shardings(abstract_rest, mesh))()
    nnx.replace_by_pure_dict(abstract_params, params)
    return config, nnx.merge(graphdef, abstract_params, rest)


# --------------------------------------------------------------------------- save


def _in_logical_order(model: Transformer) -> Transformer:
    """`model` itself, or, when its stacked units are stored stage-major (a model merged from a circular-schedule
    Trainer's state), a copy whose units are in logical order, so that layer k is written as layer k."""
    if model.units_order == (1, 1):
        return model
    graphdef, state = nnx.split(model)
    nnx.replace_by_pure_dict(state, pipe.reorder_units(nnx.to_pure_dict(state), model.units_order, (1, 1)))
    logical = nnx.merge(graphdef, state)
    logical.units_order = (1, 1)
    return logical


def save(
    model: Transformer,
    path: str | os.PathLike,
    *,
    max_shard_bytes: int = 4 * 2**30,
    tokenizer_from: str | os.PathLike | None = None,
    drop_router_bias: bool = False,
    overwrite: bool = False,
) -> Path:
    """Write `model` as a Hugging Face directory (config.json + float32 safetensors); returns the path.

    Mixtral unless the model has `qk_norm` (then Qwen3-MoE). Parameters are
    gathered to the host one at a time and written in files of at most
    `max_shard_bytes` (with model.safetensors.index.json when there are
    several). `tokenizer_from`: a directory whose tokenizer files are copied.
    Experts are written in logical order whatever their placement. A router
    bias (aux-loss-free balancing) has no place in these formats: a nonzero
    one is an error unless `drop_router_bias=True`. A directory that already
    holds weights (`WEIGHT_PATTERNS`) is refused unless `overwrite=True`; then
    the weight and index files this save does not write are removed, so no
    loader can pick up a stale one. A padded vocabulary is written unpadded.
    In a multi-process run every process must call it; process 0 writes.
    """
    save_file = _safetensors().numpy.save_file
    model = _in_logical_order(model)
    config: ModelConfig = model.config
    kind = export_kind(config)
    if tokenizer_from is not None and not (Path(tokenizer_from).expanduser() / "tokenizer.json").is_file():
        raise HFCheckpointError(f"tokenizer_from={str(tokenizer_from)!r} has no tokenizer.json")
    out = Path(path).expanduser()
    writer = jax.process_index() == 0
    if out.exists() and not out.is_dir():
        raise HFCheckpointError(f"{str(out)!r} is a file; pass a directory to save into")
    existing = _weight_files(out) if out.is_dir() else []
    if existing and not overwrite:
        shown = ", ".join(p.name for p in existing[:4])
        shown += f" and {len(existing) - 4} more" if len(existing) > 4 else ""
        raise HFCheckpointError(f"{str(out)!r} already holds weights ({shown}); files left from another model would "
                                "make tedjax and transformers load different weights. Save into an empty directory, "
                                "or pass overwrite=True to replace them (stale weight and index files are removed)")
    placement = _expert_placement(model)
    moe = moe_stack(model)
    bias_ne = _to_host(moe.router_bias[...]) if moe is not None else np.zeros((0, 1))
    biased = [k * config.moe_every + config.moe_every - 1 for k in range(len(bias_ne)) if np.any(bias_ne[k])]
    if biased and not drop_router_bias:
        raise HFCheckpointError(f"MoE layers {biased} have a nonzero router_bias, which {kind} has no tensor for: the "
                                "saved model would route differently. Pass drop_router_bias=True to save without it")
    table = weight_table(config, kind)
    stacked = _flatten(nnx.to_pure_dict(nnx.state(model, nnx.Param)))
    params = {key: model_key(config, key) for key in table if model_key(config, key)[0] in stacked}
    missing = sorted(set(table) - set(params))
    if missing:
        raise HFCheckpointError(f"the model lacks parameters the {kind} format needs: {missing[:5]}")
    if writer:
        out.mkdir(parents=True, exist_ok=True)

    # Plan the files from the shapes, then materialise one file's tensors at a time.
    shards: list[list[tuple]] = [[]]
    size = 0
    for key, source in table.items():
        nbytes = 4 * math.prod(source.shape)
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(key)
        size += nbytes
    names = (["model.safetensors"] if len(shards) == 1 else
             [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))])
    weight_map = {}
    for filename, keys in zip(names, shards):
        tensors = {}
        for key in keys:
            path, index = params[key]
            value = _to_host(stacked[path] if index is None else stacked[path][index])  # one layer at a time
            if key[-1] in ("w_in", "w_gate", "w_out") and key[:-1] in placement:
                value = value[placement[key[:-1]]]  # physical slots back to logical experts
            for name, tensor in table[key].to_hf(value):
                tensors[name] = tensor
                weight_map[name] = filename
        if writer:
            tmp = out / f".{filename}.tmp"
            save_file(tensors, str(tmp), metadata={"format": "pt"})
            os.replace(tmp, out / filename)
        del tensors
    if writer:
        if len(shards) > 1:
            total = sum(4 * math.prod(s.hf_shape) * len(s.names) for s in table.values())
            index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
            _write_text(out / "model.safetensors.index.json", json.dumps(index, indent=2))
        _write_text(out / "config.json", json.dumps(_hf_config(config, kind), indent=2))
        if tokenizer_from is not None:
            _copy_tokenizer(Path(tokenizer_from).expanduser(), out)
        written = set(names) | ({"model.safetensors.index.json"} if len(shards) > 1 else set())
        for stale in existing:
            if stale.name not in written:
                stale.unlink()
    return out


def _weight_files(directory: Path) -> list[Path]:
    """The files in `directory` that a loader could take weights from (safetensors, torch, index files, ...)."""
    return sorted({p for pattern in WEIGHT_PATTERNS for p in directory.glob(pattern) if p.is_file()})


def _expert_placement(model: Transformer) -> dict[tuple, np.ndarray]:
    """Per MoE layer path: the physical slot of each logical expert, where it is not the identity."""
    placements, moe, every = {}, moe_stack(model), model.config.moe_every
    for k, slots in enumerate(np.asarray(moe.placement[...]) if moe is not None else []):
        if not np.array_equal(slots, np.arange(slots.shape[-1])):
            placements[("blocks", k * every + every - 1, "ffn")] = slots
    return placements


def _to_host(array: jax.Array) -> np.ndarray:
    if array.is_fully_addressable:
        return np.asarray(array)
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(array, tiled=True))


def _write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text + "\n")
    os.replace(tmp, path)


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json")


def _copy_tokenizer(source: Path, out: Path) -> None:
    for name in (n for n in TOKENIZER_FILES if (source / n).is_file()):
        _write_text(out / name, (source / name).read_text().rstrip("\n"))


# --------------------------------------------------------------------------- pytree paths


def _flatten(tree: dict, prefix: tuple = ()) -> dict[tuple, Any]:
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, (*prefix, key)))
        else:
            flat[(*prefix, key)] = value
    return flat


def _unflatten(flat: dict[tuple, Any]) -> dict:
    tree: dict = {}
    for path, value in flat.items():
        node = tree
        for key in path[:-1]:
            node = node.setdefault(key, {})
        node[path[-1]] = value
    return tree
