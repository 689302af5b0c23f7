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
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from tedjax.config import ModelConfig, check_mesh
from tedjax.mesh import state_shardings
from tedjax.model import Transformer, abstract_model

ARCHITECTURES = {"MixtralForCausalLM": "mixtral", "Qwen3MoeForCausalLM": "qwen3_moe"}
# The fields a checkpoint fixes; `init_from` takes these from config.json, whatever the YAML says.
ARCH_FIELDS = ("vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "head_dim", "d_ff", "num_experts",
               "expert_d_ff", "top_k", "moe_every", "activation", "qk_norm", "norm_eps", "rope_base",
               "router_renormalize")  # fmt: skip
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
    return ModelConfig(**model_fields(path, overrides))


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
    }
    user = dict(user or {})
    return {**defaults, **{k: v for k, v in user.items() if k not in ARCH_FIELDS}, **fields}


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
    rope, scaling = hf.get("rope_parameters") or {}, hf.get("rope_scaling") or {}
    rope_type = rope.get("rope_type") or scaling.get("rope_type") or scaling.get("type") or "default"
    refuse(rope_type != "default", f"RoPE scaling (rope_type {rope_type!r})")
    rope_base = rope.get("rope_theta", hf.get("rope_theta"))
    if rope_base is None:
        raise HFCheckpointError(f"{where}: key 'rope_theta' (or rope_parameters.rope_theta) is missing")
    d_model, n_heads = int(need("hidden_size")), int(need("num_attention_heads"))
    max_len = int(need("max_position_embeddings"))
    window = hf.get("sliding_window")
    if kind == "qwen3_moe":
        refuse(bool(hf.get("use_sliding_window", False)), "use_sliding_window=true")
        refuse(bool(hf.get("mlp_only_layers")), f"mlp_only_layers={hf.get('mlp_only_layers')}")
    elif window is not None:
        max_len = min(max_len, int(window))  # within the window, sliding-window attention is full attention
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
        "rope_base": float(rope_base),
        "max_len": max_len,
    }
    if kind == "mixtral":
        fields.update(expert_d_ff=int(need("intermediate_size")), d_ff=int(need("intermediate_size")), moe_every=1,
                      qk_norm=False, router_renormalize=True)
    else:
        fields.update(expert_d_ff=int(need("moe_intermediate_size")), d_ff=int(need("intermediate_size")),
                      moe_every=int(hf.get("decoder_sparse_step") or 1), qk_norm=True,
                      router_renormalize=bool(need("norm_topk_prob")))
    refuse(fields["num_experts"] < 1, "num_experts=0 (a dense model)")
    return fields


def _hf_config(config: ModelConfig, kind: str) -> dict:
    """config.json for `config` as a Mixtral or Qwen3-MoE model."""
    common = {
        "vocab_size": config.vocab_size, "hidden_size": config.d_model, "num_hidden_layers": config.n_layers,
        "num_attention_heads": config.n_heads, "num_key_value_heads": config.kv_heads,
        "head_dim": config.head_size, "max_position_embeddings": config.max_len, "rms_norm_eps": config.norm_eps,
        "rope_theta": config.rope_base, "rope_parameters": {"rope_type": "default", "rope_theta": config.rope_base},
        "num_experts_per_tok": config.top_k, "hidden_act": "silu", "tie_word_embeddings": False,
        "router_aux_loss_coef": config.aux_loss_weight, "attention_dropout": 0.0, "torch_dtype": "float32",
        "dtype": "float32", "sliding_window": None, "use_cache": True,
    }  # fmt: skip
    if kind == "mixtral":
        return {"architectures": ["MixtralForCausalLM"], "model_type": "mixtral", **common,
                "intermediate_size": config.expert_d_ff, "num_local_experts": config.num_experts}
    return {"architectures": ["Qwen3MoeForCausalLM"], "model_type": "qwen3_moe", **common,
            "intermediate_size": config.d_ff, "moe_intermediate_size": config.expert_d_ff,
            "num_experts": config.num_experts, "num_local_experts": config.num_experts,
            "decoder_sparse_step": config.moe_every, "mlp_only_layers": [], "use_sliding_window": False,
            "attention_bias": False, "norm_topk_prob": _renormalizes(config)}  # fmt: skip


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
    `perm`: tedjax dim i is split dim perm[i].
    """

    names: tuple[str, ...]
    hf_shape: tuple[int, ...]
    split: tuple[int, ...]
    perm: tuple[int, ...]
    stacked: bool = False

    @property
    def shape(self) -> tuple[int, ...]:
        inner = tuple(self.split[p] for p in self.perm)
        return (len(self.names), *inner) if self.stacked else inner

    def to_hf(self, value: np.ndarray) -> Iterator[tuple[str, np.ndarray]]:
        """(name, Hugging Face tensor) pairs of a full tedjax value."""
        inverse = tuple(np.argsort(self.perm))
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
    """tedjax parameter path (as in `nnx.to_pure_dict`) -> its Source, for `kind` "mixtral" or "qwen3_moe"."""
    d, h, hkv, k, e = config.d_model, config.n_heads, config.kv_heads, config.head_size, config.num_experts
    table = {
        ("embed",): Source(("model.embed_tokens.weight",), (config.vocab_size, d), (config.vocab_size, d), (0, 1)),
        ("head",): _linear("lm_head.weight", (config.vocab_size,), d),
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
        if key not in cache:
            if source.stacked:
                names = source.names[index[0]]
                cache[key] = np.stack([read_one(n, index[1:]) for n in names]) if names else np.zeros(
                    (0, *[len(range(*s.indices(n))) for s, n in zip(index[1:], source.shape[1:])]), np.float32)
            else:
                cache[key] = read_one(source.names[0], index)
        return cache[key]

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
        if set(flat_shardings) != set(table):
            raise HFCheckpointError(
                f"tedjax parameters without a source {sorted(set(flat_shardings) - set(table))[:5]}, sources without "
                f"a parameter {sorted(set(table) - set(flat_shardings))[:5]}: the model's structure is not the one "
                "the weight table describes"
            )
        flat = {key: jax.make_array_from_callback(table[key].shape, sharding, _reader(files, table[key]))
                for key, sharding in flat_shardings.items()}
    finally:
        files.close()
    return _unflatten(flat)


def load(path: str | os.PathLike, mesh: Mesh, **overrides) -> tuple[ModelConfig, Transformer]:
    """(ModelConfig, Transformer sharded on `mesh`) from a Hugging Face directory.

    `overrides` change non-architecture fields (e.g. `dtype="bfloat16"`,
    `remat="cac"`, `capacity_scope="expert"`). Every error (no config.json, an
    unsupported architecture, a shape that differs from the config, a mesh the
    model does not divide) is raised before any weight is read.
    """
    config = model_config(path, **overrides)
    check_mesh(config, mesh)
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


def save(
    model: Transformer,
    path: str | os.PathLike,
    *,
    max_shard_bytes: int = 4 * 2**30,
    tokenizer_from: str | os.PathLike | None = None,
    drop_router_bias: bool = False,
) -> Path:
    """Write `model` as a Hugging Face directory (config.json + float32 safetensors); returns the path.

    Mixtral unless the model has `qk_norm` (then Qwen3-MoE). Parameters are
    gathered to the host one at a time and written in files of at most
    `max_shard_bytes` (with model.safetensors.index.json when there are
    several). `tokenizer_from`: a directory whose tokenizer files are copied.
    Experts are written in logical order whatever their placement. A router
    bias (aux-loss-free balancing) has no place in these formats: a nonzero
    one is an error unless `drop_router_bias=True`. In a multi-process run
    every process must call it; process 0 writes.
    """
    save_file = _safetensors().numpy.save_file
    config: ModelConfig = model.config
    kind = export_kind(config)
    if tokenizer_from is not None and not (Path(tokenizer_from).expanduser() / "tokenizer.json").is_file():
        raise HFCheckpointError(f"tokenizer_from={str(tokenizer_from)!r} has no tokenizer.json")
    placement = _expert_placement(model)
    biased = [i for i, block in enumerate(model.blocks)
              if getattr(block.ffn, "router_bias", None) is not None and np.any(_to_host(block.ffn.router_bias[...]))]
    if biased and not drop_router_bias:
        raise HFCheckpointError(f"MoE layers {biased} have a nonzero router_bias, which {kind} has no tensor for: the "
                                "saved model would route differently. Pass drop_router_bias=True to save without it")
    table = weight_table(config, kind)
    params = _flatten(nnx.to_pure_dict(nnx.state(model, nnx.Param)))
    missing = sorted(set(table) - set(params))
    if missing:
        raise HFCheckpointError(f"the model lacks parameters the {kind} format needs: {missing[:5]}")
    out = Path(path).expanduser()
    writer = jax.process_index() == 0
    if writer:
        if out.exists() and not out.is_dir():
            raise HFCheckpointError(f"{str(out)!r} is a file; pass a directory to save into")
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
            value = _to_host(params[key])
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
            total = sum(4 * math.prod(s.shape) for s in table.values())
            index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
            _write_text(out / "model.safetensors.index.json", json.dumps(index, indent=2))
        _write_text(out / "config.json", json.dumps(_hf_config(config, kind), indent=2))
        if tokenizer_from is not None:
            _copy_tokenizer(Path(tokenizer_from).expanduser(), out)
    return out


def _expert_placement(model: Transformer) -> dict[tuple, np.ndarray]:
    """Per MoE layer path: the physical slot of each logical expert, where it is not the identity."""
    placements = {}
    for i, block in enumerate(model.blocks):
        slots = getattr(block.ffn, "placement", None)
        if slots is None:
            continue
        slots = np.asarray(slots[...] if isinstance(slots, nnx.Variable) else slots)
        if not np.array_equal(slots, np.arange(slots.shape[-1])):
            placements[("blocks", i, "ffn")] = slots
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
