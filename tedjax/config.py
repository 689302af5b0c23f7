"""Model configuration and its checks against a mesh.

Every check that a user can fail runs here, in plain Python, before anything is
traced or compiled.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Literal

import jax.numpy as jnp
from jax.sharding import Mesh

from tedjax.mesh import mesh_shape, stage_count

Activation = Literal["gelu", "swiglu"]
Remat = Literal["none", "full", "cac"]
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
SCHEDULES = ("cosine", "linear", "constant", "wsd", "inverse_sqrt")
GPU_PROFILES = ("default", "throughput")


def resolve_dtype(name: str, backend: str | None = None) -> str:
    """model.dtype with "auto" resolved: bfloat16 on GPU and TPU, float32 elsewhere (CPU results stay as they were).

    `backend` defaults to jax.default_backend(), so call this after jax is set up (not while parsing a config).
    """
    if name != "auto":
        return name
    if backend is None:
        import jax

        backend = jax.default_backend()
    return "bfloat16" if backend in ("gpu", "cuda", "rocm", "tpu") else "float32"


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """A decoder-only MoE transformer. Every `moe_every`-th layer (1-based) is MoE.

    `num_experts = 0` gives the FLOP-matched dense model: each MoE layer becomes
    a dense FFN of width `top_k * expert_d_ff` (see `dense_twin`).
    """

    vocab_size: int = 256
    d_model: int = 128
    n_layers: int = 4
    n_heads: int = 4
    d_ff: int = 512  # dense FFN width
    max_len: int = 256
    num_experts: int = 8
    expert_d_ff: int = 512  # width of each expert's FFN
    top_k: int = 1
    capacity_factor: float = 1.25
    eval_capacity_factor: float = 2.0
    min_capacity: int = 4
    moe_every: int = 2
    group_size: int = 0  # tokens per routing group; 0 = one sequence
    activation: Activation = "gelu"  # dense and expert FFNs
    dtype: str = "auto"  # compute: auto (bfloat16 on GPU/TPU, float32 on CPU), float32, bfloat16; params stay float32
    aux_loss_weight: float = 0.01
    z_loss_weight: float = 1e-3
    jitter_eps: float = 0.0
    router_renormalize: bool | None = None  # combine weights over kept choices sum to 1; None = top_k > 1
    dtd: bool = False  # Duplicate Token Dropping (TED)
    capacity_scope: str = "expert"  # "device": the experts of one device share their capacity (load balance);
    #                                  "dropless": every choice is computed (device pools of the worst case)
    dropless_buffer_factor: float = 0.0  # dropless: pool rows <= factor x the rows of uniform routing; 0 = worst case
    router_bias_rate: float = 0.0  # aux-loss-free balancing: bias += rate * sign(mean load - load); 0 = off
    shadow_experts: int = 0  # FasterMoE shadow experts per MoE layer (copied to every device); 0 = off
    a2a_chunks: int = 1  # split each all-to-all into this many chunks that overlap with expert compute
    # Across nodes (FasterMoE's topology-aware gate): choices of experts on other nodes keep at most this
    # fraction of their capacity, the rest go to the best expert of their own node; 1.0 = off
    remote_fraction: float = 1.0
    a2a: str = "flat"  # "hierarchical": inside each node first, then one exchange between nodes (mesh.node_size)
    # a bias >= 0 against remote experts in the choice, += rate * sign(remote choices - what remote pools keep)
    # after each step, so the choices that cross are those that prefer a remote expert the most; 0 = off
    remote_bias_rate: float = 0.0
    device_aux_loss_weight: float = 0.0  # the load-balancing loss over devices (the placement's), DeepSeek-V2; 0 = off
    remat: Remat = "none"  # activation checkpointing per scanned unit of layers; "cac" keeps collective outputs
    scan_layers: bool = True  # run the stacked layer units with lax.scan (compile time flat in depth); False: a loop
    rope_base: float = 10000.0
    n_kv_heads: int = 0  # key/value heads (grouped-query attention); 0 = n_heads
    head_dim: int = 0  # size of each attention head; 0 = d_model // n_heads
    qk_norm: bool = False  # RMSNorm over each query / key head before RoPE (Qwen3)
    norm_eps: float = 1e-6  # RMSNorm epsilon
    attention: str = "auto"  # "auto" (cuDNN flash attention on NVIDIA GPUs in bf16/fp16, else XLA), "xla", "cudnn"
    # Set by Hugging Face imports (tedjax.hf); the defaults are plain RoPE, full causal attention, no padding.
    rope_scaling: str = "none"  # "linear" or "yarn", as Hugging Face's rope_type (layers.RopeScaling)
    rope_factor: float = 1.0  # context extension factor of linear / yarn scaling
    rope_original_max_len: int = 0  # yarn: the pretraining context (original_max_position_embeddings)
    rope_beta_fast: float = 32.0  # yarn: the ramp's bounds, in rotations over the original context
    rope_beta_slow: float = 1.0
    rope_attention_factor: float = 0.0  # yarn: scale of cos / sin; 0 = 0.1 ln(rope_factor) + 1
    rope_truncate: bool = True  # yarn: round the ramp's bounds to whole dims
    sliding_window: int = 0  # each query sees this many positions, itself included (Mistral's band); 0 = all
    vocab_multiple: int = 1  # embedding and head rows padded to a multiple of this; padded logits are -inf
    bos_token_id: int = -1  # a checkpoint's special token ids (-1 / () = none), kept so hf.save writes them back
    eos_token_id: tuple[int, ...] = ()
    pad_token_id: int = -1

    def __post_init__(self):
        _check_finite(self, "model.")
        self._check_hf_fields()
        positive = ("vocab_size", "d_model", "n_layers", "n_heads", "d_ff", "max_len",
                    "expert_d_ff", "top_k", "moe_every")
        for name in positive:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"model.{name} must be an integer >= 1, got {value!r}")
        for name in ("num_experts", "min_capacity", "group_size", "n_kv_heads", "head_dim"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ValueError(f"model.{name} must be an integer >= 0, got {value!r}")
        for name in ("capacity_factor", "eval_capacity_factor"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
                raise ValueError(f"model.{name} must be a number > 0, got {value!r}; 1.0-2.0 is typical")
        _check_int("model.shadow_experts", self.shadow_experts, 0)
        _check_int("model.a2a_chunks", self.a2a_chunks, 1)
        rf = self.remote_fraction
        if isinstance(rf, bool) or not isinstance(rf, (int, float)) or not 0 < rf <= 1:
            raise ValueError(f"model.remote_fraction must be in (0, 1], got {rf!r}; 1.0 = off, 0.14 is fastmoe's "
                             "default for slow inter-node links")
        if self.a2a not in ("flat", "hierarchical"):
            raise ValueError(f"model.a2a must be 'flat' or 'hierarchical', got {self.a2a!r}")
        if self.num_experts and self.shadow_experts >= self.num_experts:
            raise ValueError(f"model.shadow_experts={self.shadow_experts} must be < num_experts={self.num_experts}; "
                             "shadow a few of the hottest experts (1-2 is typical)")
        if self.capacity_scope not in ("expert", "device", "dropless"):
            raise ValueError(f"model.capacity_scope must be 'expert', 'device' or 'dropless', "
                             f"got {self.capacity_scope!r}")
        factor = self.dropless_buffer_factor
        if isinstance(factor, bool) or not isinstance(factor, (int, float)) or not factor >= 0:
            raise ValueError(f"model.dropless_buffer_factor must be a number >= 0, got {factor!r}; 0 = the worst "
                             "case (never drops), 2 = pools of 2x the rows of uniform routing")
        for name in ("aux_loss_weight", "z_loss_weight", "jitter_eps", "router_bias_rate", "remote_bias_rate",
                     "device_aux_loss_weight"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
                raise ValueError(f"model.{name} must be a number >= 0, got {value!r}")
        if self.jitter_eps >= 1:
            raise ValueError(f"model.jitter_eps must be < 1, got {self.jitter_eps}; 0.01 is typical")
        if isinstance(self.rope_base, bool) or not isinstance(self.rope_base, (int, float)) or not self.rope_base > 0:
            raise ValueError(f"model.rope_base must be a number > 0, got {self.rope_base!r}; 10000.0 is typical")
        _check_bool("model.dtd", self.dtd)
        _check_bool("model.qk_norm", self.qk_norm)
        if isinstance(self.norm_eps, bool) or not isinstance(self.norm_eps, (int, float)) or not self.norm_eps > 0:
            raise ValueError(f"model.norm_eps must be a number > 0, got {self.norm_eps!r}; 1e-6 or 1e-5 is typical")
        if self.attention not in ("auto", "xla", "cudnn"):
            raise ValueError(f"model.attention must be 'auto', 'xla' or 'cudnn', got {self.attention!r}; 'auto' picks "
                             "cuDNN flash attention where it runs (NVIDIA GPU, bfloat16) and XLA's elsewhere")
        if self.attention == "cudnn" and (self.dtype not in ("bfloat16", "float16", "auto") or self.head_size % 8
                                          or self.head_size > 256):
            raise ValueError(f"model.attention='cudnn' needs model.dtype bfloat16 (or float16) and a head size that "
                             f"is a multiple of 8 up to 256, got {self.dtype} and {self.head_size}; use 'auto'")
        if self.n_heads % self.kv_heads:
            raise ValueError(f"model.n_heads={self.n_heads} must be a multiple of n_kv_heads={self.n_kv_heads} "
                             "(each key/value head serves n_heads / n_kv_heads query heads)")
        if self.router_renormalize is not None:
            _check_bool("model.router_renormalize", self.router_renormalize)
        if not self.head_dim and self.d_model % self.n_heads:
            raise ValueError(f"model.d_model={self.d_model} must be divisible by n_heads={self.n_heads} "
                             "(or set model.head_dim)")
        if self.head_size % 2:
            raise ValueError(f"head size {self.head_size} (model.head_dim, or d_model/n_heads) must be even (RoPE)")
        if self.num_experts and self.top_k > self.num_experts:
            raise ValueError(f"model.top_k={self.top_k} exceeds num_experts={self.num_experts}; use top_k <= num_experts")
        if self.activation not in ("gelu", "swiglu"):
            raise ValueError(f"model.activation must be 'gelu' or 'swiglu', got {self.activation!r}")
        if self.dtype not in DTYPES and self.dtype != "auto":
            raise ValueError(f"model.dtype must be one of {['auto', *sorted(DTYPES)]}, got {self.dtype!r}")
        if self.remat not in ("none", "full", "cac"):
            raise ValueError(f"model.remat must be 'none', 'full' or 'cac', got {self.remat!r}")
        _check_bool("model.scan_layers", self.scan_layers)
        # group_size is checked against the sequence length actually used (TrainConfig, check_mesh,
        # and Transformer at call time), not against max_len, which only bounds it.

    def _check_hf_fields(self) -> None:
        if self.rope_scaling not in ("none", "linear", "yarn"):
            raise ValueError(f"model.rope_scaling must be 'none', 'linear' or 'yarn', got {self.rope_scaling!r}")
        for name in ("rope_factor", "rope_beta_fast", "rope_beta_slow", "rope_attention_factor"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < float("inf"):
                raise ValueError(f"model.{name} must be a finite number >= 0, got {value!r}")
        if not self.rope_factor > 0:
            raise ValueError(f"model.rope_factor must be > 0, got {self.rope_factor!r}")
        _check_bool("model.rope_truncate", self.rope_truncate)
        for name, low in (("rope_original_max_len", 0), ("sliding_window", 0), ("vocab_multiple", 1),
                          ("bos_token_id", -1), ("pad_token_id", -1)):
            _check_int(f"model.{name}", getattr(self, name), low)
        if self.rope_scaling == "yarn" and not self.rope_original_max_len:
            raise ValueError("model.rope_scaling='yarn' needs model.rope_original_max_len (the pretraining context)")
        eos = self.eos_token_id
        if not isinstance(eos, (list, tuple)) or not all(isinstance(e, int) and not isinstance(e, bool) and e >= 0
                                                         for e in eos):
            raise ValueError(f"model.eos_token_id must be a list of token ids (integers >= 0), got {eos!r}")
        object.__setattr__(self, "eos_token_id", tuple(eos))  # JSON and YAML give lists

    @property
    def padded_vocab(self) -> int:
        """Rows of the embedding and the head: vocab_size rounded up to a multiple of vocab_multiple."""
        return -(-self.vocab_size // self.vocab_multiple) * self.vocab_multiple

    @property
    def compute_dtype(self):
        """The jnp dtype of activations and matmuls ("auto" resolved for the default backend)."""
        return DTYPES[resolve_dtype(self.dtype)]

    @property
    def kv_heads(self) -> int:
        """Key/value heads: n_kv_heads, or n_heads when 0."""
        return self.n_kv_heads or self.n_heads

    @property
    def head_size(self) -> int:
        """Size of each attention head: head_dim, or d_model // n_heads when 0."""
        return self.head_dim or self.d_model // self.n_heads

    def is_moe_layer(self, layer: int) -> bool:
        return (layer + 1) % self.moe_every == 0

    @property
    def n_moe_layers(self) -> int:
        return sum(self.is_moe_layer(i) for i in range(self.n_layers)) if self.num_experts else 0

    def dense_twin(self) -> "ModelConfig":
        """The FLOP-matched dense model: same shape, MoE layers replaced by FFNs of width top_k * expert_d_ff."""
        return dataclasses.replace(self, num_experts=0)

    def param_counts(self) -> dict[str, int]:
        """Total and active (per token) parameter counts."""
        d, f = self.d_model, self.d_ff
        ffn_mats = 3 if self.activation == "swiglu" else 2
        attn = 2 * d * self.head_size * (self.n_heads + self.kv_heads) + (2 * self.head_size if self.qk_norm else 0)
        dense_ffn = ffn_mats * d * f
        expert = ffn_mats * d * self.expert_d_ff
        total = active = 2 * self.vocab_size * d + (2 * self.n_layers + 1) * d
        for layer in range(self.n_layers):
            total += attn
            active += attn
            if self.is_moe_layer(layer) and self.num_experts:
                total += self.num_experts * expert + d * self.num_experts
                active += self.top_k * expert + d * self.num_experts
            elif self.is_moe_layer(layer):
                total += self.top_k * expert
                active += self.top_k * expert
            else:
                total += dense_ffn
                active += dense_ffn
        return {"total": total, "active": active}

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token: 6 x active matmul params + attention (causal, fwd+bwd)."""
        active = self.param_counts()["active"] - self.vocab_size * self.d_model  # embedding lookup is free
        attention = 6 * self.n_layers * seq_len * self.d_model  # 12 L T D / 2 for causal
        return 6.0 * active + attention


def check_mesh(config: ModelConfig, mesh: Mesh, batch_size: int | None = None, seq_len: int | None = None) -> None:
    """Raise a ValueError naming the problem and the fix if `config` cannot run on `mesh`."""
    data, expert, tensor = mesh_shape(mesh)
    problems = []
    stages, units = stage_count(mesh), config.n_layers // config.moe_every
    if stages > 1 and (not units or units % stages):
        problems.append(f"the {units} scanned units (n_layers={config.n_layers} // moe_every={config.moe_every}) do "
                        f"not split over {stages} pipeline stages; choose mesh.stage dividing {units}")
    if config.num_experts and config.num_experts % expert:
        problems.append(f"num_experts={config.num_experts} is not divisible by the expert axis ({expert}); "
                        "choose mesh.expert dividing num_experts")
    if not config.num_experts and expert > 1:
        pass  # a dense model may still split its batch over "expert"
    if config.n_heads % tensor:
        problems.append(f"n_heads={config.n_heads} is not divisible by the tensor axis ({tensor}); "
                        "choose mesh.tensor dividing n_heads")
    elif config.kv_heads % tensor:
        problems.append(f"n_kv_heads={config.kv_heads} is not divisible by the tensor axis ({tensor}); "
                        "choose mesh.tensor dividing n_kv_heads")
    if config.d_ff % tensor and not (config.num_experts and config.moe_every == 1):  # no dense layer uses d_ff
        problems.append(f"d_ff={config.d_ff} is not divisible by the tensor axis ({tensor})")
    if config.num_experts and config.expert_d_ff % tensor:
        problems.append(f"expert_d_ff={config.expert_d_ff} is not divisible by the tensor axis ({tensor})")
    if not config.num_experts and (config.top_k * config.expert_d_ff) % tensor:
        problems.append(f"dense-twin FFN width {config.top_k * config.expert_d_ff} is not divisible by tensor ({tensor})")
    if config.padded_vocab % tensor:
        problems.append(f"vocab_size={config.vocab_size} is not divisible by the tensor axis ({tensor}); "
                        f"set model.vocab_multiple={tensor} to pad it (padded logits are -inf)")
    if batch_size is not None:
        if batch_size % (data * expert):
            problems.append(f"batch size {batch_size} is not divisible by data x expert = {data * expert}; "
                            f"use a multiple of {data * expert}")
        if seq_len is not None and config.num_experts:
            group = config.group_size or seq_len
            if seq_len % group and group % seq_len:
                problems.append(f"group_size={group} must divide seq_len={seq_len} or be a multiple of it")
            elif batch_size * seq_len % group:
                problems.append(f"group_size={group} does not tile a batch of {batch_size} x {seq_len} tokens; "
                                f"use a batch size that makes batch x seq_len a multiple of {group}")
            else:
                groups = batch_size * seq_len // group
                if groups % (data * expert):  # each device of the batch layout routes whole groups
                    per_device = batch_size // (data * expert) * seq_len if batch_size % (data * expert) == 0 else 0
                    fix = (f"use a group_size dividing the {per_device} tokens of one device's batch"
                           if per_device else "use a batch size that splits evenly first")
                    problems.append(f"group_size={group} makes {groups} routing groups per micro-batch, which do not "
                                    f"split over data x expert = {data * expert} devices; {fix} (0 = one sequence)")
                if config.a2a_chunks > 1 and groups % (data * expert * config.a2a_chunks):
                    problems.append(f"a2a_chunks={config.a2a_chunks} does not divide the {groups} routing groups "
                                    f"of a micro-batch into chunks that split over data x expert = {data * expert}; "
                                    f"use a2a_chunks dividing {groups // (data * expert)} or a larger batch")
    if seq_len is not None and seq_len > config.max_len:
        problems.append(f"seq_len={seq_len} exceeds model.max_len={config.max_len}")
    if problems:
        raise ValueError(f"model does not fit mesh (data={data}, expert={expert}, tensor={tensor}):\n  - "
                         + "\n  - ".join(problems))


# ---------------------------------------------------------------------------
# Training run configuration: YAML presets in configs/, dotted CLI overrides.
# ---------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    """Device mesh sizes; their product must equal the device count.

    `mesh: auto` (YAML) or `mesh=auto` (command line) sets `auto`: the planner
    (tedjax.plan) picks the sizes and the TED switches for the devices present.
    """

    data: int = 8
    expert: int = 1
    tensor: int = 1
    stage: int = 1  # pipeline stages (outermost axis); 1 = no pipeline
    node_size: int = 0  # devices per node (hierarchical all-to-all, topology-aware gate); 0 = from the hosts
    auto: bool = False

    def __post_init__(self):
        for name in ("data", "expert", "tensor", "stage"):
            _check_int(f"mesh.{name}", getattr(self, name), 1)
        _check_int("mesh.node_size", self.node_size, 0)
        _check_bool("mesh.auto", self.auto)

    @classmethod
    def parse(cls, values, prefix: str = "mesh.") -> "MeshConfig":
        """`auto`, {auto: true} or {data, expert, tensor}; auto together with explicit sizes is an error."""
        if values == "auto" or (isinstance(values, dict) and values.get("auto") is True):
            sizes = sorted(set(values) & {"data", "expert", "tensor", "stage"}) if isinstance(values, dict) else []
            if sizes:
                raise ValueError(f"mesh: auto cannot be combined with explicit sizes ({', '.join(prefix + k for k in sizes)}); "
                                 "either let the planner choose (mesh=auto) or give data, expert and tensor")
            return cls(auto=True)
        if isinstance(values, str):
            raise ValueError(f"{prefix.rstrip('.')} must be a mapping of data, expert, tensor or the word auto, "
                             f"got {values!r}")
        return from_dict(cls, values, prefix, parse=False)


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
    """AdamW, linear warmup then a decay `schedule`, global-norm clipping, ZeRO-1 state sharding.

    Schedules (after `warmup_steps` of linear warmup from 0): cosine to learning_rate * min_lr_ratio;
    linear to the same; constant; wsd (warmup-stable-decay: constant, then a linear decay to
    learning_rate * min_lr_ratio over the last `decay_fraction` of the steps); inverse_sqrt
    (learning_rate * sqrt(max(warmup_steps, 1) / step)).
    """

    learning_rate: float = 3e-3
    min_lr_ratio: float = 0.1  # final lr = learning_rate * min_lr_ratio
    warmup_steps: int = 50
    weight_decay: float = 0.1
    b1: float = 0.9
    b2: float = 0.95
    eps: float = 1e-8
    grad_clip: float = 1.0  # max global gradient norm; 0 disables
    zero1: bool = True  # shard optimizer state over each parameter's data-parallel group
    tile_size: int = 0  # tiled optimizer: update large parameters this many elements at a time; 0 = off
    schedule: str = "cosine"  # cosine | linear | constant | wsd | inverse_sqrt
    decay_fraction: float = 0.2  # wsd: the last fraction of the steps that decays
    state_dtype: str = "float32"  # Adam's moments: float32 or bfloat16 (half the state memory)
    zero: int = 1  # 1: optimizer state split; 2: + gradients; 3: + parameters (FSDP). README "Memory"

    def __post_init__(self):
        if self.schedule not in SCHEDULES:
            raise ValueError(f"optimizer.schedule must be one of {', '.join(SCHEDULES)}, got {self.schedule!r}")
        _check_float("optimizer.decay_fraction", self.decay_fraction, 0)
        if self.decay_fraction > 1:
            raise ValueError(f"optimizer.decay_fraction must be in [0, 1], got {self.decay_fraction}; "
                             "0.1-0.2 is typical")
        if self.state_dtype not in DTYPES:
            raise ValueError(f"optimizer.state_dtype must be float32 or bfloat16, got {self.state_dtype!r}")
        if self.state_dtype != "float32" and self.tile_size:
            raise ValueError("optimizer.state_dtype=bfloat16 does not combine with the tiled optimizer "
                             "(optimizer.tile_size > 0); keep one of them")
        _check_float("optimizer.learning_rate", self.learning_rate, 0, strict=True)
        _check_float("optimizer.min_lr_ratio", self.min_lr_ratio, 0)
        _check_int("optimizer.warmup_steps", self.warmup_steps, 0)
        _check_float("optimizer.weight_decay", self.weight_decay, 0)
        _check_float("optimizer.eps", self.eps, 0, strict=True)
        _check_float("optimizer.grad_clip", self.grad_clip, 0)
        _check_int("optimizer.tile_size", self.tile_size, 0)
        _check_bool("optimizer.zero1", self.zero1)
        if self.zero not in (1, 2, 3) or isinstance(self.zero, bool):
            raise ValueError(f"optimizer.zero must be 1, 2 or 3 (what ZeRO splits over each parameter's "
                             f"data-parallel group: optimizer state, + gradients, + parameters), got {self.zero!r}")
        if self.zero > 1 and not self.zero1:
            raise ValueError(f"optimizer.zero={self.zero} splits gradients{' and parameters' if self.zero == 3 else ''}"
                             " into the optimizer state's shards, which optimizer.zero1=false turns off; "
                             "set optimizer.zero1=true or optimizer.zero=1")
        for name in ("b1", "b2"):
            value = getattr(self, name)
            _check_float(f"optimizer.{name}", value, 0)
            if value >= 1:
                raise ValueError(f"optimizer.{name} must be in [0, 1), got {value}")
        if self.min_lr_ratio > 1:
            raise ValueError(f"optimizer.min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """Where tokens come from. Global batch = batch_size sequences, in grad_accum micro-batches."""

    source: Literal["stdlib", "tokens", "synthetic"] = "stdlib"
    path: str = ""  # directory written by `python -m tedjax.data prepare` (source=tokens)
    seq_len: int = 128
    batch_size: int = 32  # sequences per optimizer step, all devices together
    grad_accum: int = 1  # micro-batches per step
    seed: int = 0
    stdlib_max_bytes: int = 16 * 2**20

    def __post_init__(self):
        if self.source not in ("stdlib", "tokens", "synthetic"):
            raise ValueError(f"data.source must be 'stdlib', 'tokens' or 'synthetic', got {self.source!r}")
        if self.source == "tokens" and not self.path:
            raise ValueError("data.source=tokens needs data.path=DIR (a directory made by "
                             "`python -m tedjax.data prepare --out DIR FILES...`)")
        _check_str("data.path", self.path)
        _check_int("data.seq_len", self.seq_len, 1)
        _check_int("data.batch_size", self.batch_size, 1)
        _check_int("data.grad_accum", self.grad_accum, 1)
        _check_int("data.seed", self.seed, 0)
        _check_int("data.stdlib_max_bytes", self.stdlib_max_bytes, 1)
        if self.batch_size % self.grad_accum:
            raise ValueError(f"data.batch_size={self.batch_size} must be divisible by data.grad_accum={self.grad_accum}")

    @property
    def micro_batch_size(self) -> int:
        return self.batch_size // self.grad_accum


@dataclasses.dataclass(frozen=True)
class CheckpointConfig:
    """Orbax checkpoints: every `every` steps (asynchronously), the last `keep` kept."""

    dir: str = ""  # default: <log.dir>/checkpoints
    every: int = 200
    keep: int = 3
    async_save: bool = True

    def __post_init__(self):
        _check_str("checkpoint.dir", self.dir)
        _check_int("checkpoint.every", self.every, 0)
        _check_int("checkpoint.keep", self.keep, 1)
        _check_bool("checkpoint.async_save", self.async_save)


@dataclasses.dataclass(frozen=True)
class WandbConfig:
    """Weights & Biases tracking (the optional `wandb` extra); on when `project` is set. TensorBoard stays on too."""

    project: str = ""
    name: str = ""  # run name; "" = wandb picks one
    mode: str = "online"  # online | offline (written under <log.dir>/wandb, synced later) | disabled

    def __post_init__(self):
        _check_str("log.wandb.project", self.project)
        _check_str("log.wandb.name", self.name)
        if self.mode not in ("online", "offline", "disabled"):
            raise ValueError(f"log.wandb.mode must be online, offline or disabled, got {self.mode!r}")


@dataclasses.dataclass(frozen=True)
class LogConfig:
    dir: str = "runs/tiny"
    every: int = 10  # steps between metric logs
    eval_every: int = 100  # steps between validation passes; 0 = only at the end
    eval_batches: int = 8
    tensorboard: bool = True
    progress: bool = True
    peak_tflops: float = 0.0  # peak FLOP/s per device (TFLOP/s) for MFU; 0 = detect from the device
    profile_steps: tuple[int, ...] = ()  # [start, stop]: a jax.profiler trace of steps start..stop-1 in <dir>/profile
    wandb: WandbConfig = dataclasses.field(default_factory=WandbConfig)  # off unless wandb.project is set

    def __post_init__(self):
        steps = self.profile_steps
        if not isinstance(steps, (list, tuple)) or (steps and (
                len(steps) != 2 or not all(isinstance(v, int) and not isinstance(v, bool) for v in steps)
                or not 0 <= steps[0] < steps[1])):  # fmt: skip
            raise ValueError(f"log.profile_steps must be [] or [start, stop] with 0 <= start < stop, got {steps!r}; "
                             "e.g. log.profile_steps=[10,13] traces steps 10, 11 and 12")
        object.__setattr__(self, "profile_steps", tuple(steps))

        _check_str("log.dir", self.dir)
        if not self.dir:
            raise ValueError("log.dir must be a non-empty path, got ''; e.g. log.dir=runs/tiny")
        _check_int("log.every", self.every, 1)
        _check_int("log.eval_every", self.eval_every, 0)
        _check_int("log.eval_batches", self.eval_batches, 1)
        _check_float("log.peak_tflops", self.peak_tflops, 0)
        _check_bool("log.tensorboard", self.tensorboard)
        _check_bool("log.progress", self.progress)


# xla.gpu_profile=throughput: the XLA:GPU flags MaxText sets for its GPU runs
# (src/MaxText/configs/a3/llama_2_7b/*.sh), less --xla_gpu_graph_level (gone from jaxlib 0.10) and
# --xla_disable_hlo_passes=rematerialization (it trades memory for speed; remat is model.remat here).
# The latency-hiding scheduler overlaps collectives with compute; the pipelined collectives and
# double-buffered loops let it start next layers' all-gathers/reduce-scatters early. XLA:CPU accepts
# and ignores them.
GPU_THROUGHPUT_FLAGS = (
    "--xla_gpu_enable_latency_hiding_scheduler=true",
    "--xla_gpu_enable_highest_priority_async_stream=true",
    "--xla_gpu_enable_pipelined_all_gather=true",
    "--xla_gpu_enable_pipelined_reduce_scatter=true",
    "--xla_gpu_enable_pipelined_all_reduce=true",
    "--xla_gpu_enable_while_loop_double_buffering=true",
    "--xla_gpu_enable_all_gather_combine_by_dim=false",
    "--xla_gpu_enable_reduce_scatter_combine_by_dim=false",
    "--xla_gpu_all_reduce_combine_threshold_bytes=536870912",
    "--xla_gpu_all_gather_combine_threshold_bytes=134217728",
    "--xla_gpu_reduce_scatter_combine_threshold_bytes=67108864",
    "--xla_gpu_enable_triton_gemm=false",
)


@dataclasses.dataclass(frozen=True)
class XlaConfig:
    """XLA's collective combiners (gradient bucketing), as XLA_FLAGS set before jax is imported.

    Many small all-reduces each pay a latency; XLA's combiner passes fuse
    independent collectives into one tuple-shaped op up to a byte threshold
    (NOTES.md section 6). What exists in jaxlib 0.10 (XLA's DebugOptions):

    GPU: `--xla_gpu_all_reduce_combine_threshold_bytes`,
    `--xla_gpu_reduce_scatter_combine_threshold_bytes`,
    `--xla_gpu_all_gather_combine_threshold_bytes` and
    `--xla_gpu_collective_combine_threshold_count` (the fields below; 0 keeps
    XLA's default, which XLA:GPU derives from the device memory).

    CPU: no threshold flag exists. XLA:CPU runs one `CpuAllReduceCombiner`
    after fusion with a fixed limit (no byte limit, 256 ops per combined op);
    all-gathers and reduce-scatters are never combined. The `--xla_gpu_*`
    flags are accepted and ignored there. The only switch is turning the pass
    off: `cpu_all_reduce_combiner=False` adds
    `--xla_disable_hlo_passes=cpu-all-reduce-combiner`.
    benchmarks/ted_layouts.py measures both (`bucketing` in its results).
    """

    all_reduce_combine_bytes: int = 0
    reduce_scatter_combine_bytes: int = 0
    all_gather_combine_bytes: int = 0
    combine_count: int = 0  # most collectives per combined op (GPU); 0 = XLA's default
    cpu_all_reduce_combiner: bool = True
    gpu_profile: str = "default"  # "throughput": MaxText's XLA:GPU scheduling flags (GPU_THROUGHPUT_FLAGS)

    def __post_init__(self):
        if self.gpu_profile not in GPU_PROFILES:
            raise ValueError(f"xla.gpu_profile must be one of {', '.join(GPU_PROFILES)}, got {self.gpu_profile!r}")
        for name in ("all_reduce_combine_bytes", "reduce_scatter_combine_bytes", "all_gather_combine_bytes",
                     "combine_count"):
            _check_int(f"xla.{name}", getattr(self, name), 0)
        _check_bool("xla.cpu_all_reduce_combiner", self.cpu_all_reduce_combiner)

    def flags(self) -> list[str]:
        names = {
            "all_reduce_combine_bytes": "--xla_gpu_all_reduce_combine_threshold_bytes",
            "reduce_scatter_combine_bytes": "--xla_gpu_reduce_scatter_combine_threshold_bytes",
            "all_gather_combine_bytes": "--xla_gpu_all_gather_combine_threshold_bytes",
            "combine_count": "--xla_gpu_collective_combine_threshold_count",
        }
        flags = [f"{flag}={getattr(self, key)}" for key, flag in names.items() if getattr(self, key)]
        if self.gpu_profile == "throughput":  # explicit thresholds above win over the profile's
            given = {f.split("=")[0] for f in flags}
            flags += [f for f in GPU_THROUGHPUT_FLAGS if f.split("=")[0] not in given]
        if not self.cpu_all_reduce_combiner:
            flags.append("--xla_disable_hlo_passes=cpu-all-reduce-combiner")
        return flags


@dataclasses.dataclass(frozen=True)
class BalanceConfig:
    """SmartMoE expert placement (needs model.capacity_scope=device) and FasterMoE shadow experts
    (model.shadow_experts > 0), both re-chosen during training from the recent expert loads.

    Every `every` steps the host reads each MoE layer's recent expert load and
    places experts greedily (heaviest first, on the least-loaded device with a
    free slot); a layer adopts the new placement only if its largest device load
    drops by at least `margin` (relative) and the layer time it is predicted
    to save over `every` steps exceeds the move's time (tedjax.balance). Only
    adopting layers move; weights and their Adam moments move together.
    """

    every: int = 0  # steps between placement decisions; 0 = off (SmartMoE uses 10)
    margin: float = 0.02  # relative drop of the largest device load needed to move experts
    # steps between choices of shadow experts (with model.shadow_experts > 0). A new set is only an int array in
    # the state, and which experts overflow changes within a few steps, so the default decides after every step
    # on that step's drops (FasterMoE decides at every forward pass)
    shadow_every: int = 1
    # FasterMoE's cost model, per device. Each rate comes from the first that applies: the explicit rate (> 0);
    # `cluster`, a configs/clusters/*.yaml preset read as the planner reads it (peak matmul of model.dtype,
    # NVLink or network bandwidth); else measured at start on the devices present (tedjax.balance.measure_rates).
    cluster: str = ""
    matmul_tflops: float = 0.0  # achieved TFLOP/s on the expert matmuls; 0 = from cluster or measured
    link_gbytes_per_s: float = 0.0  # GB/s one device sends across "expert"; 0 = from cluster or measured

    def __post_init__(self):
        _check_int("balance.every", self.every, 0)
        _check_int("balance.shadow_every", self.shadow_every, 1)
        _check_float("balance.margin", self.margin, 0)
        _check_str("balance.cluster", self.cluster)
        _check_float("balance.matmul_tflops", self.matmul_tflops, 0)
        _check_float("balance.link_gbytes_per_s", self.link_gbytes_per_s, 0)
        if self.margin >= 1:
            raise ValueError(f"balance.margin must be in [0, 1), got {self.margin}; 0.02 is typical")

    @property
    def load_decay(self) -> float:
        """Decay of the expert-load running mean: an average over about the last `every` steps."""
        return 1.0 - 2.0 / (self.every + 1) if self.every > 1 else 0.9

    @property
    def gain_decay(self) -> float:
        """Decay of the running mean of the drops each shadow would save: about the last `shadow_every` steps
        (0 = the last step's)."""
        return 1.0 - 2.0 / (self.shadow_every + 1)


@dataclasses.dataclass(frozen=True)
class PipelineConfig:
    """Pipeline parallelism over the mesh's "stage" axis (mesh.stage > 1).

    The scanned layers are split over the stages in contiguous runs (`repeats`
    runs per stage with the circular schedule); each step runs `microbatches`
    microbatches of the batch through them.
    """

    microbatches: int = 0  # microbatches per step; 0 = mesh.stage (the least a schedule needs)
    schedule: str = "gpipe"  # "gpipe" or "circular" (interleaved: each stage holds `repeats` runs of layers)
    repeats: int = 1  # circular: runs of layers per stage

    def __post_init__(self):
        _check_int("pipeline.microbatches", self.microbatches, 0)
        _check_int("pipeline.repeats", self.repeats, 1)
        if self.schedule not in ("gpipe", "circular"):
            raise ValueError(f"pipeline.schedule must be 'gpipe' or 'circular', got {self.schedule!r}")
        if self.repeats > 1 and self.schedule != "circular":
            raise ValueError(f"pipeline.repeats={self.repeats} needs pipeline.schedule=circular (GPipe holds one run "
                             "of layers per stage); set the schedule to circular or repeats=1")

    def microbatches_for(self, stages: int) -> int:
        """Microbatches per step on `stages` stages (`microbatches`, or `stages` when it is 0)."""
        return self.microbatches or stages


def check_pipeline(model: ModelConfig, mesh: MeshConfig, pipeline: PipelineConfig, micro_batch_size: int,
                   seq_len: int) -> None:
    """Raise a ValueError naming the problem and the fix if `pipeline` cannot split this model and batch.

    The scanned unit is a run of `moe_every` blocks (the last one MoE); n_layers // moe_every units.
    """
    stages = mesh.stage
    if stages == 1:
        return
    problems = []
    units, repeats = model.n_layers // model.moe_every, pipeline.repeats
    if not units or units % (stages * repeats):
        problems.append(f"mesh.stage={stages} x pipeline.repeats={repeats} does not divide the {units} scanned units "
                        f"(model.n_layers={model.n_layers} in units of moe_every={model.moe_every}); choose stages x "
                        f"repeats dividing {units}, or change model.n_layers")
    micro = pipeline.microbatches_for(stages)
    if micro < stages:
        problems.append(f"pipeline.microbatches={micro} is too few for mesh.stage={stages}: every stage needs a "
                        f"microbatch; set pipeline.microbatches >= {stages} (0 means {stages})")
    ways = mesh.data * mesh.expert
    if micro_batch_size % (micro * ways):
        problems.append(f"a micro-batch of {micro_batch_size} sequences does not split into pipeline.microbatches="
                        f"{micro} microbatches over data x expert = {ways}; use a data.batch_size / data.grad_accum "
                        f"that is a multiple of {micro * ways}")
    elif model.num_experts and model.group_size and (micro_batch_size // micro) * seq_len % model.group_size:
        problems.append(f"model.group_size={model.group_size} does not tile a pipeline microbatch of "
                        f"{micro_batch_size // micro} x {seq_len} tokens; use fewer pipeline.microbatches or a "
                        "smaller group_size")
    if problems:
        raise ValueError(f"pipeline does not fit (mesh.stage={stages}, {micro} microbatches):\n  - "
                         + "\n  - ".join(problems))


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    steps: int = 300
    seed: int = 0
    max_bad_steps: int = 5  # consecutive non-finite steps tolerated (each skipped) before stopping
    init_from: str = ""  # "hf:DIR": start from a Hugging Face checkpoint (model.* defaults come from its config.json)
    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    mesh: MeshConfig = dataclasses.field(default_factory=MeshConfig)
    optimizer: OptimizerConfig = dataclasses.field(default_factory=OptimizerConfig)
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    checkpoint: CheckpointConfig = dataclasses.field(default_factory=CheckpointConfig)
    log: LogConfig = dataclasses.field(default_factory=LogConfig)
    xla: XlaConfig = dataclasses.field(default_factory=XlaConfig)
    balance: BalanceConfig = dataclasses.field(default_factory=BalanceConfig)
    pipeline: PipelineConfig = dataclasses.field(default_factory=PipelineConfig)

    def __post_init__(self):
        _check_int("steps", self.steps, 1)
        _check_int("seed", self.seed, 0)
        _check_int("max_bad_steps", self.max_bad_steps, 1)
        _check_str("init_from", self.init_from)
        if self.init_from and not self.init_from.startswith("hf:"):
            raise ValueError(f"init_from must be '' or 'hf:DIR' (a Hugging Face model directory), "
                             f"got {self.init_from!r}")
        if self.data.seq_len > self.model.max_len:
            raise ValueError(f"data.seq_len={self.data.seq_len} exceeds model.max_len={self.model.max_len}; "
                             "raise model.max_len or shorten data.seq_len")
        if self.log.profile_steps and self.log.profile_steps[1] > self.steps:
            raise ValueError(f"log.profile_steps={list(self.log.profile_steps)} ends after steps={self.steps}; "
                             f"pick a range inside the run, e.g. [{max(self.steps - 3, 0)}, {self.steps}]")
        if not self.model.num_experts and (self.balance.every or self.model.shadow_experts):
            switch = (f"balance.every={self.balance.every}" if self.balance.every
                      else f"model.shadow_experts={self.model.shadow_experts}")
            raise ValueError(f"{switch} balances experts, and this model is dense (model.num_experts=0): set "
                             f"{switch.split('=')[0]}=0, or give the model experts (e.g. model.num_experts=8"
                             f"{' model.capacity_scope=device' if self.balance.every else ''})")
        if self.balance.every and self.model.capacity_scope == "expert":
            raise ValueError(f"balance.every={self.balance.every} moves experts between devices, which changes "
                             "nothing with per-expert capacity; set model.capacity_scope=device or dropless "
                             "(or balance.every=0)")
        if self.model.num_experts and self.model.router_bias_rate and self.model.top_k == self.model.num_experts:
            raise ValueError(f"model.router_bias_rate={self.model.router_bias_rate} cannot act with top_k = "
                             f"num_experts = {self.model.top_k}: every token goes to every expert, so each load is "
                             "1/E and the bias never moves; set model.router_bias_rate=0 or top_k < num_experts")
        if self.data.source != "synthetic" and self.model.vocab_size < 256:
            raise ValueError(f"model.vocab_size={self.model.vocab_size} is smaller than the byte tokenizer's 256 ids; "
                             "set model.vocab_size >= 256")
        group, length = self.model.group_size, self.data.seq_len
        if self.model.num_experts and group and length % group and group % length:
            raise ValueError(f"model.group_size={group} must divide data.seq_len={length} or be a multiple of it "
                             "(routing groups must not span parts of two sequences)")
        if self.model.num_experts and group and self.data.micro_batch_size * length % group:
            raise ValueError(f"model.group_size={group} does not tile a micro-batch of {self.data.micro_batch_size} x "
                             f"{length} tokens; choose data.batch_size so that micro-batch x seq_len is a multiple of it")
        check_pipeline(self.model, self.mesh, self.pipeline, self.data.micro_batch_size, length)

    @property
    def checkpoint_dir(self) -> str:
        return self.checkpoint.dir or f"{self.log.dir}/checkpoints"

    def to_dict(self) -> dict:
        """Plain JSON values, as a saved config reads back (tuples such as model.eos_token_id as lists)."""
        return _as_json(dataclasses.asdict(self))


def _as_json(value):
    if isinstance(value, dict):
        return {k: _as_json(v) for k, v in value.items()}
    return [_as_json(v) for v in value] if isinstance(value, (list, tuple)) else value


def _check_int(name: str, value, minimum: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")


def _check_float(name: str, value, minimum: float, strict: bool = False) -> None:
    bad = isinstance(value, bool) or not isinstance(value, (int, float))
    if not bad and not math.isfinite(value):  # nan passes every comparison, inf every lower bound
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    if bad or (value <= minimum if strict else value < minimum):
        raise ValueError(f"{name} must be a number {'>' if strict else '>='} {minimum}, got {value!r}")


def _check_finite(config, prefix: str) -> None:
    """Refuse NaN and infinity in every float field of `config` (a learning rate of nan trains NaN weights)."""
    for field in dataclasses.fields(config):
        value = getattr(config, field.name)
        if isinstance(value, float) and not math.isfinite(value):
            raise ValueError(f"{prefix}{field.name} must be a finite number, got {value!r}")


def _check_str(name: str, value) -> None:
    if not isinstance(value, str):
        raise ValueError(f"{name} must be a string (a path), got {value!r}")


def _check_bool(name: str, value) -> None:
    if not isinstance(value, bool):
        raise ValueError(f"{name} must be true or false, got {value!r}")


def from_dict(cls, values: dict, prefix: str = "", parse: bool = True):
    """Build a (nested) config dataclass from a dict, refusing unknown keys and wrong types."""
    if cls is MeshConfig and parse:
        return MeshConfig.parse(values, prefix)
    if not isinstance(values, dict):
        raise ValueError(f"{prefix.rstrip('.') or 'config'} must be a mapping, got {values!r}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - set(fields))
    if unknown:
        raise ValueError(f"unknown config key{'s' if len(unknown) > 1 else ''} "
                         f"{', '.join(prefix + k for k in unknown)}; valid keys here: "
                         f"{', '.join(prefix + k for k in fields)}")
    kwargs = {}
    for name, value in values.items():
        default = getattr(cls(), name) if _has_all_defaults(cls) else None
        if dataclasses.is_dataclass(default):
            kwargs[name] = from_dict(type(default), value, f"{prefix}{name}.")
        else:
            kwargs[name] = _coerce(f"{prefix}{name}", value, default)
    return cls(**kwargs)


def _has_all_defaults(cls) -> bool:
    return all(f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING
               for f in dataclasses.fields(cls))


def _coerce(name: str, value, default):
    """YAML gives ints for floats written as `1`; accept those, refuse everything else of the wrong type."""
    if isinstance(default, bool):
        if not isinstance(value, bool):
            raise ValueError(f"{name} must be true or false, got {value!r}")
    elif isinstance(default, float):
        if isinstance(value, str):  # YAML reads 1e-3 (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"{name} must be a number, got {value!r}")
        return float(value)
    elif isinstance(default, int):
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"{name} must be an integer, got {value!r}")
    elif isinstance(default, str):
        if not isinstance(value, str):
            raise ValueError(f"{name} must be a string, got {value!r}")
    return value


def parse_overrides(overrides: list[str]) -> dict:
    """["model.top_k=2", "steps=10"] -> {"model": {"top_k": 2}, "steps": 10} (values parsed as YAML)."""
    import yaml

    tree: dict = {}
    for item in overrides:
        if "=" not in item:
            raise ValueError(f"override {item!r} must look like key.sub=value (e.g. model.top_k=2)")
        key, raw = item.split("=", 1)
        try:
            value = yaml.safe_load(raw) if raw else ""
        except yaml.YAMLError as err:
            raise ValueError(f"override {item!r}: value is not valid YAML ({err})") from None
        node = tree
        parts = key.strip().split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ValueError(f"override {item!r} conflicts with another override of {part}")
        node[parts[-1]] = value
    return tree


def _merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for key, value in extra.items():
        if key == "mesh" and isinstance(value, dict) and out.get(key) == "auto":
            MeshConfig.parse({"auto": True, **value})  # mesh: auto in the file, sizes on the command line: refused
        out[key] = _merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def unique_key_loader() -> type:
    """A yaml SafeLoader that refuses a key given twice in one mapping (plain YAML keeps the last, silently)."""
    import yaml

    class UniqueKeyLoader(yaml.SafeLoader):
        def construct_mapping(self, node, deep=False):
            seen = set()
            for key_node, _ in node.value:
                key = self.construct_object(key_node, deep=deep)
                if key in seen:
                    raise yaml.constructor.ConstructorError(
                        None, None, f"key {key!r} appears twice in one mapping; keep one of them",
                        key_node.start_mark)  # fmt: skip
                seen.add(key)
            return super().construct_mapping(node, deep=deep)

    return UniqueKeyLoader


def load_config(path: str | None = None, overrides: list[str] = ()) -> TrainConfig:
    """TrainConfig from a YAML file plus dotted overrides; every error names the key and the fix."""
    import os

    import yaml

    values: dict = {}
    if path:
        if not os.path.isfile(path):
            raise FileNotFoundError(f"config file {path} does not exist; pick one from configs/ (e.g. configs/tiny.yaml)")
        with open(path) as f:
            try:
                values = yaml.load(f, Loader=unique_key_loader()) or {}
            except yaml.YAMLError as err:
                raise ValueError(f"config file {path} is not valid YAML: {err}") from None
        if not isinstance(values, dict):
            raise ValueError(f"config file {path} must hold a mapping of keys to values at the top level "
                             f"(e.g. `steps: 3`, `model: {{d_model: 64}}`), got a {type(values).__name__}: "
                             f"{str(values)[:80]}" + ("; remove the leading '- ' list markers" if isinstance(values, list) else ""))
    values = _merge(values, parse_overrides(list(overrides)))
    init_from = values.get("init_from")
    if isinstance(init_from, str) and init_from.startswith("hf:"):
        from tedjax.hf import model_fields  # the checkpoint fixes the architecture; other model.* keys stay yours

        values["model"] = model_fields(init_from[3:], values.get("model") or {})
    return from_dict(TrainConfig, values)
