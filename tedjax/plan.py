"""Auto-parallel planner: SmartMoE's offline stage for TED layouts.

    python -m tedjax.plan --cluster configs/clusters/dgx_h100.yaml --config configs/gpu_2.7b.yaml [--top 5] [--[no-]stages]

For a model and a cluster, every (data, expert, tensor) layout of the devices
is tried with every switch: DTD, remat none / cac / full, the tiled optimizer,
the ZeRO level (`optimizer.zero`) and each micro-batch split of the global
batch (`data.grad_accum`); the config's own device pools, shadow experts and
chunked all-to-all are modelled as given. Each plan
gets, per device and in pure arithmetic (nothing is compiled, so 1024 GPUs
cost the same as 8):

* memory: parameters, gradients, optimizer state at the plan's ZeRO level
  and `optimizer.state_dtype` (TED eq. 5 as tedjax shards it), activations
  kept for the backward pass under the remat policy, and the largest
  temporaries;
* collective traffic of one step by kind and mesh axis (all-to-all,
  all-reduce, all-gather, reduce-scatter), counted the way `tedjax.analysis`
  reads a compiled program;
* step time: matmul FLOPs / peak plus, for each collective, its latency (the
  cluster's alpha per op and per ring step) and bytes sent / the bandwidth of
  the link its mesh axes cross ("tensor" is innermost, so it stays inside a
  node first, as `make_mesh` lays devices out).

With `--stages` (`search(..., stages=True)`; the default across nodes) the fourth axis, pipeline
stages, is searched too: each stage count S dividing the devices and the
scanned units, with S, 2S, 4S or 8S microbatches, GPipe or circular (R = 2
runs per stage: see `candidates`). A stage runs 1/S of the layers (`stage_view`); the plan adds
the bubble ((S-1)/(R M + S-1) of the stage-iterations idle, compute x
(S-1)/(R M) of time), one collective-permute of a microbatch's [rows, L, D]
per iteration and one after the loop, forward and backward (`p2p_bytes`,
`p2p_count`), and keeps every iteration's activations (`Pipeline.in_flight`);
`stage_reason` says why the best plan uses stages or not. An expert axis across nodes is priced
by `balance.TopologyCostModel` (flat, or `model.a2a=hierarchical` at
`model.remote_fraction`), and `topology_line` reports the step with the
r the cost model proposes.

Plans that do not divide or do not fit are rejected with their reason; the
rest, ranked by step time, are the pool. `mesh: auto` in a config (or
`mesh=auto`) takes the pool's first plan for the devices present (stages are
searched, there and in the CLI, when the devices span more than one node).

The byte model aims to be exact: on simulated CPU meshes it equals the
collectives XLA compiles for the train step, per kind and mesh axis, on all
64 random held-out configs over every switch (`held_out_cells`;
tests/test_plan.py, benchmarks/planner.py), except for the embedding's and the router
weight's gradients and the ZeRO-3 embedding lookup, whose partitioning XLA
picks by size (`XLA_CHOOSES`; `measure` reports XLA's choice apart), and the
settings `unmodelled` names, which every entry point prints as "not modelled". The memory model is calibrated on the same programs:
arguments exact, the total within 10% on 57 of the 64 cells and 14.3% on all,
and on 21 of 24 cells of two draws compiled after the model's last change
(benchmarks/results/planner.md and README have the figures). What differs between XLA:CPU
(where the model is checked) and XLA:GPU is explicit in `Backend`; the GPU
side is not checked on GPUs.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import math
import os
import sys
from collections.abc import Iterable, Sequence
from typing import Literal

from tedjax.config import ModelConfig, TrainConfig, check_mesh, resolve_dtype
from tedjax.mesh import MESH_AXES as AXES

Layout = tuple[int, int, int]  # (data, expert, tensor)
Backend = Literal["gpu", "cpu"]
REMATS = ("none", "cac", "full")
# What a plan sets (the rest of the config is the user's): the search varies these.
PLANNED = ("mesh", "mesh.data", "mesh.expert", "mesh.tensor", "mesh.auto", "model.dtd", "model.remat",
           "optimizer.tile_size", "optimizer.zero", "data.grad_accum",
           "mesh.stage", "pipeline.microbatches", "pipeline.schedule", "pipeline.repeats")
DEFAULT_TILE = 1 << 24  # elements per tile of the tiled optimizer when the planner turns it on
HEADROOM = 0.10  # fraction of GPU memory a plan must leave free (allocator fragmentation, NCCL buffers)
GIB = 1 << 30

# Two small gradients whose partitioning XLA chooses by size and layout (op-name marks in the compiled
# program): the embedding's (the scatter-add that transposes its lookup: an all-reduce over the
# data-parallel group, or an all-to-all of token gradients plus a permute) and the router weight's
# (on some layouts computed with d_model split, then permuted into the ZeRO-1 layout). The model
# predicts TED's all-reduce for both; `measure` reports what XLA chose apart from the rest.
XLA_CHOOSES = {  # what -> op_name regex (remat wraps the router's einsum in checkpoint/...)
    "embedding gradient": r"transpose\(jvp\(jit\(_take\)\)\)",
    "router gradient": r"transpose\(.*gsd,de->gse",
    # with ZeRO-3 the lookup's table is stored split, and XLA gathers it over the axes it picks
    "embedding lookup": r"jvp\((vmap\()?jit\(_take\)\)",  # vmap: the lanes' lookup (NOTES.md section 3.2)
}


# --------------------------------------------------------------------------- #
# clusters


@dataclasses.dataclass(frozen=True)
class Cluster:
    """A GPU cluster: `nodes` x `gpus_per_node` GPUs. Bandwidths are per GPU, one direction, GB/s (1e9 B/s)."""

    name: str
    gpu: str
    nodes: int
    gpus_per_node: int
    memory_gib: float  # per GPU
    peak_bf16_tflops: float  # dense, per GPU
    peak_fp32_tflops: float
    intra_node_gbps: float  # NVLink / NVSwitch
    inter_node_gbps: float  # network (InfiniBand) share of one GPU
    # Latency (alpha) of a ring collective: a fixed cost per op plus one per ring step (an all-reduce
    # takes 2 (p - 1) steps, the other kinds p - 1), by the link the step crosses. Defaults: NCCL's own
    # cost model (src/graph/tuning.cc, ring algorithm, Simple protocol).
    collective_latency_us: float = 8.4
    intra_node_step_us: float = 3.4
    inter_node_step_us: float = 14.0
    # NCCL's low-latency (LL) protocol, which its tuner picks for small messages: a lower fixed cost and
    # per-step cost at a quarter of the link's bandwidth for an all-reduce or across nodes (a third
    # otherwise). Defaults: NCCL's cost model, ring algorithm, LL protocol.
    ll_latency_us: float = 6.6
    ll_intra_node_step_us: float = 0.6
    ll_inter_node_step_us: float = 2.7

    FIELDS = ("name", "gpu", "nodes", "gpus_per_node", "memory_gib", "peak_bf16_tflops", "peak_fp32_tflops",
              "intra_node_gbps", "inter_node_gbps")  # fmt: skip
    OPTIONAL = ("collective_latency_us", "intra_node_step_us", "inter_node_step_us", "ll_latency_us",
                "ll_intra_node_step_us", "ll_inter_node_step_us")

    def __post_init__(self):
        for name in ("name", "gpu"):
            if not isinstance(getattr(self, name), str) or not getattr(self, name):
                raise ValueError(f"cluster.{name} must be a non-empty string, got {getattr(self, name)!r}")
        for name in ("nodes", "gpus_per_node"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"cluster.{name} must be an integer >= 1, got {value!r}")
        for name in ("memory_gib", "peak_bf16_tflops", "peak_fp32_tflops", "intra_node_gbps", "inter_node_gbps"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < math.inf:
                raise ValueError(f"cluster.{name} must be a number > 0, got {value!r}")
        for name in self.OPTIONAL:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < 1e6:
                raise ValueError(f"cluster.{name} must be a number of microseconds >= 0, got {value!r}")
        if self.memory_gib > 4096:
            raise ValueError(f"cluster.memory_gib={self.memory_gib} is not a GPU's memory in GiB (e.g. 80)")
        if self.inter_node_gbps > self.intra_node_gbps and self.nodes > 1:
            raise ValueError(f"cluster.inter_node_gbps={self.inter_node_gbps} exceeds intra_node_gbps="
                             f"{self.intra_node_gbps}; the network is never faster than NVLink: check the units (GB/s)")

    @property
    def devices(self) -> int:
        return self.nodes * self.gpus_per_node

    def peak_flops(self, dtype: str) -> float:
        return (self.peak_bf16_tflops if dtype == "bfloat16" else self.peak_fp32_tflops) * 1e12

    def with_devices(self, devices: int) -> Cluster:
        """The same kind of node, as many as `devices` GPUs need (the last one partly used)."""
        if devices <= self.gpus_per_node:
            return dataclasses.replace(self, nodes=1, gpus_per_node=devices)
        return dataclasses.replace(self, nodes=-(-devices // self.gpus_per_node))

    @classmethod
    def from_dict(cls, values: dict, source: str = "cluster") -> Cluster:
        if not isinstance(values, dict):
            raise ValueError(f"{source} must be a mapping of the fields {', '.join(cls.FIELDS)}; got {values!r}")
        missing = [f for f in cls.FIELDS if f not in values]
        unknown = sorted(set(values) - set(cls.FIELDS) - set(cls.OPTIONAL))
        if missing or unknown:
            raise ValueError(f"{source}: " + "; ".join(
                ([f"missing field{'s' if len(missing) > 1 else ''} {', '.join(missing)}"] if missing else [])
                + ([f"unknown field{'s' if len(unknown) > 1 else ''} {', '.join(unknown)}"] if unknown else []))
                + f" (fields: {', '.join(cls.FIELDS + cls.OPTIONAL)}; see configs/clusters/)")
        try:
            return cls(**{f: values[f] for f in cls.FIELDS + cls.OPTIONAL if f in values})
        except ValueError as err:
            raise ValueError(f"{source}: {err}") from None

    @classmethod
    def load(cls, path: str) -> Cluster:
        """A cluster preset from YAML (configs/clusters/*.yaml)."""
        import yaml

        if not os.path.isfile(path):
            raise FileNotFoundError(f"cluster file {path} does not exist; pick one from configs/clusters/")
        with open(path) as f:
            try:
                values = yaml.safe_load(f)
            except yaml.YAMLError as err:
                raise ValueError(f"cluster file {path} is not valid YAML: {err}") from None
        return cls.from_dict(values, source=f"cluster file {path}")


# --------------------------------------------------------------------------- #
# what the model covers

# Every config key the step's collectives or memory depend on, which the model reads, and the keys that
# change neither (the rest of a run). A key in neither list (a switch added since) with a value other
# than its default is reported as not modelled, so the planner never passes one over silently.
MODELLED = {
    "model": ("vocab_size", "d_model", "n_layers", "n_heads", "d_ff", "max_len", "num_experts", "expert_d_ff",
              "top_k", "capacity_factor", "min_capacity", "moe_every", "group_size", "activation", "dtype", "dtd",
              "capacity_scope", "shadow_experts", "a2a_chunks", "remat", "n_kv_heads", "head_dim", "qk_norm",
              "attention", "vocab_multiple", "dropless_buffer_factor", "remote_fraction", "a2a"),
    "optimizer": ("zero1", "zero", "tile_size", "state_dtype"),
    "data": ("seq_len", "batch_size", "grad_accum"),
    "mesh": ("data", "expert", "tensor", "auto", "stage", "node_size"),
    "pipeline": ("microbatches", "schedule", "repeats"),
    "xla": ("all_reduce_combine_bytes", "reduce_scatter_combine_bytes", "all_gather_combine_bytes", "combine_count"),
}  # fmt: skip
NO_EFFECT = {
    "": ("steps", "seed", "max_bad_steps", "init_from"),
    "model": ("eval_capacity_factor", "aux_loss_weight", "z_loss_weight", "jitter_eps", "router_renormalize",
              "router_bias_rate", "rope_base", "norm_eps", "rope_scaling", "rope_factor", "rope_original_max_len",
              "rope_beta_fast", "rope_beta_slow", "rope_attention_factor", "rope_truncate", "sliding_window",
              "bos_token_id", "eos_token_id", "pad_token_id", "remote_bias_rate", "device_aux_loss_weight"),
    "optimizer": ("learning_rate", "min_lr_ratio", "warmup_steps", "weight_decay", "b1", "b2", "eps", "grad_clip",
                  "schedule", "decay_fraction"),
    "data": ("source", "path", "seed", "stdlib_max_bytes"),
    "checkpoint": ("dir", "every", "keep", "async_save"),
    "log": ("dir", "every", "eval_every", "eval_batches", "tensorboard", "progress", "peak_tflops", "profile_steps",
            "wandb"),
    "balance": ("every", "margin", "shadow_every", "matmul_tflops", "link_gbytes_per_s", "cluster"),
    "xla": ("cpu_all_reduce_combiner",),  # no effect on GPUs; on XLA:CPU `unmodelled` names it
}  # fmt: skip
# Keys that change bytes or memory in ways the model does not follow yet: always named when set. The throughput
# flags move XLA:GPU's scheduling (and its live ranges).
NOT_MODELLED = {
    # looped units (scan_layers=false) compile to more collectives than the scanned ones the model follows (a
    # 1 MiB permute over "data" on tiny (2,2,2), measured)
    "model": ("scan_layers",),
    "xla": ("gpu_profile",),
}


def unmodelled(config: TrainConfig, backend: Backend = "gpu") -> list[str]:
    """The settings of `config` the planner does not model ("key=value"); [] when it models them all.

    Values it knows it cannot predict: xla.cpu_all_reduce_combiner=false on XLA:CPU (its combined
    all-reduce's buffers are calibrated in). Any key in neither MODELLED nor NO_EFFECT
    (a switch newer than the planner) counts when it differs from its default.
    """
    out = []
    known = {(section, key) for table in (MODELLED, NO_EFFECT) for section, keys in table.items() for key in keys}
    default = type(config)()
    for section, node, base in [("", config, default)] + [
            (f.name, getattr(config, f.name), getattr(default, f.name)) for f in dataclasses.fields(config)
            if dataclasses.is_dataclass(getattr(config, f.name))]:
        for f in dataclasses.fields(node):
            value = getattr(node, f.name)
            if dataclasses.is_dataclass(value) or (section, f.name) in known or value == getattr(base, f.name):
                continue
            out.append(f"{section + '.' if section else ''}{f.name}={_show(value)}")
    if backend == "cpu" and not config.xla.cpu_all_reduce_combiner:
        out.append("xla.cpu_all_reduce_combiner=false")
    m = config.model
    if m.capacity_scope == "dropless" and m.shadow_experts and m.num_experts:
        # the shadow rows each device computes, a statistic XLA reduces its own way
        out.append(f"model.capacity_scope=dropless with model.shadow_experts={m.shadow_experts}")
    if m.a2a == "hierarchical" and m.num_experts:
        # its two exchanges' replica groups are no mesh axes: the byte table keeps the flat all-to-all
        out.append("model.a2a=hierarchical (its bytes per exchange; its time is modelled)")
    if m.remote_fraction < 1 and m.a2a == "flat" and m.num_experts:
        # with the gate, the own node's pools take the slots remote pools give up (routing.own_node_capacity), so
        # the flat exchange's buffers grow by P_own / P across nodes; the byte and memory tables keep P
        out.append(f"model.remote_fraction={m.remote_fraction} with model.a2a=flat (the byte and memory "
                   "tables' growth of its buffers across nodes; its time is modelled)")
    if config.mesh.stage > 1:
        # the pipeline's permutes, its stages' layers and its bubble are modelled; how XLA partitions the
        # embedding and the head (outside the pipeline) over "stage" is not known until a compiled program
        out.append(f"mesh.stage={config.mesh.stage} (the embedding's and head's collectives, and the MoE "
                   "statistics' moves, over the stage axis)")
    return out


def _show(value) -> str:
    return str(value).lower() if isinstance(value, bool) else str(value)


def unmodelled_line(config: TrainConfig, backend: Backend = "gpu") -> str:
    """"not modelled: a, b" (what `tedjax.plan`, --dry-run and mesh: auto print), or "" when all are."""
    missing = unmodelled(config, backend)
    return f"not modelled: {', '.join(missing)}" if missing else ""


# --------------------------------------------------------------------------- #
# plans


@functools.lru_cache(maxsize=4096)
def _replaced(part, changes: tuple[tuple[str, object], ...]):
    """`dataclasses.replace(part, **dict(changes))`, memoized: a search applies the same few switches to one
    config's parts for thousands of plans, and each replace runs the part's validation again."""
    return dataclasses.replace(part, **dict(changes))


@dataclasses.dataclass(frozen=True, order=True)
class Plan:
    """One point of the search: a layout and the switches."""

    data: int
    expert: int
    tensor: int
    dtd: bool = False
    remat: str = "none"
    tile_size: int = 0
    grad_accum: int = 1
    zero: int = 1  # optimizer.zero
    stage: int = 1  # mesh.stage: pipeline stages, each a (data, expert, tensor) layout
    microbatches: int = 0  # pipeline.microbatches per micro-batch (stage > 1)
    repeats: int = 1  # pipeline.repeats: > 1 is the circular schedule

    @property
    def layout(self) -> Layout:
        """The layout inside one stage."""
        return (self.data, self.expert, self.tensor)

    def apply(self, config: TrainConfig) -> TrainConfig:
        """`config` run with this plan: mesh sizes, switches and micro-batching replaced."""
        from tedjax.config import MeshConfig, PipelineConfig

        pipeline = (PipelineConfig(self.microbatches, "circular" if self.repeats > 1 else "gpipe", self.repeats)
                    if self.stage > 1 else config.pipeline)
        return dataclasses.replace(
            config,
            mesh=MeshConfig(self.data, self.expert, self.tensor, stage=self.stage, node_size=config.mesh.node_size),
            pipeline=pipeline,
            model=_replaced(config.model, (("dtd", self.dtd), ("remat", self.remat))),
            optimizer=_replaced(config.optimizer, (("tile_size", self.tile_size), ("zero", self.zero),
                                                   ("zero1", config.optimizer.zero1 or self.zero > 1))),
            data=_replaced(config.data, (("grad_accum", self.grad_accum),)),
        )

    @classmethod
    def of(cls, config: TrainConfig, layout: Layout | None = None) -> Plan:
        """The plan `config` describes (on `layout`, default its mesh)."""
        layout = layout or (config.mesh.data, config.mesh.expert, config.mesh.tensor)
        pipe = pipeline_of(config)
        stages = dict(stage=pipe.stages, microbatches=pipe.microbatches, repeats=pipe.repeats) if pipe else {}
        return cls(*layout, dtd=config.model.dtd, remat=config.model.remat,
                   tile_size=config.optimizer.tile_size, grad_accum=config.data.grad_accum,
                   zero=config.optimizer.zero if config.optimizer.zero1 else 1, **stages)

    def describe(self) -> str:
        switches = [f"remat={self.remat}"] + (["dtd"] if self.dtd else [])
        switches += [f"tile={self.tile_size}"] if self.tile_size else []
        switches += [f"zero={self.zero}"] if self.zero > 1 else []
        stages = ""
        if self.stage > 1:
            schedule = f"circular x{self.repeats}" if self.repeats > 1 else "gpipe"
            stages = f"{self.stage} stages ({schedule}, {self.microbatches} microbatches) x "
        return f"{stages}({self.data},{self.expert},{self.tensor}) {' '.join(switches)} accum={self.grad_accum}"


class _MeshShape:
    """Just enough of a Mesh (`.shape`, `.axis_names`) for check_mesh and zero1_spec: no devices needed."""

    def __init__(self, layout: Layout):
        self.shape = dict(zip(AXES, layout))
        self.axis_names = AXES
        self.size = math.prod(layout)


# --------------------------------------------------------------------------- #
# pipeline stages


@dataclasses.dataclass(frozen=True)
class Pipeline:
    """A plan's pipeline: S stages, M microbatches per micro-batch, R runs of layers per stage (circular).

    The schedule runs R M + S - 1 iterations; in each, every stage runs its
    L / (S R) layers on one microbatch (or on nothing, in the bubble) and
    passes the result on with a collective-permute.
    """

    stages: int  # S
    microbatches: int  # M
    repeats: int = 1  # R (circular when > 1)

    @property
    def iterations(self) -> int:
        return self.repeats * self.microbatches + self.stages - 1

    @property
    def bubble(self) -> float:
        """Fraction of stage-iterations that compute nothing: (S-1)/(R M + S - 1)."""
        return bubble_fraction(self.stages, self.microbatches, self.repeats)

    @property
    def overhead(self) -> float:
        """Compute time added by the bubble, relative to the microbatches' own: (S-1)/(R M)."""
        return (self.stages - 1) / (self.repeats * self.microbatches)

    @property
    def passes(self) -> int:
        """Iterations per run of layers, rounded up: M + ceil((S-1)/R) (R = 1: every iteration, bubble included)."""
        return self.microbatches + -(-(self.stages - 1) // self.repeats)

    @property
    def in_flight(self) -> float:
        """Microbatches' activations of the whole stage kept for the backward pass: each of the R M + S - 1
        iterations keeps those of L / (S R) layers, (R M + S - 1) / R stages' worth."""
        return self.iterations / self.repeats


def bubble_fraction(stages: int, microbatches: int, repeats: int = 1) -> float:
    """(S-1)/(M+S-1) for GPipe (repeats = 1), (S-1)/(R M+S-1) for the circular schedule."""
    return (stages - 1) / (repeats * microbatches + stages - 1)


def pipeline_of(config: TrainConfig) -> Pipeline | None:
    """The config's pipeline (None without stages); `pipeline.microbatches` 0 means mesh.stage."""
    stages = config.mesh.stage
    if stages <= 1:
        return None
    p = config.pipeline
    return Pipeline(stages, p.microbatches or stages, p.repeats if p.schedule == "circular" else 1)


def pipeline_problems(config: TrainConfig) -> list[str]:
    """Why `config`'s stages do not divide its model or batch ([] when they do, or without stages); the
    wording of `config.check_pipeline` on the pipeline's branch."""
    pipe = pipeline_of(config)
    if pipe is None:
        return []
    m, dc, mesh = config.model, config.data, config.mesh
    stages, repeats, micro = pipe.stages, config.pipeline.repeats, pipe.microbatches
    unit = m.moe_every if m.num_experts else 1  # the scanned unit: a (dense, MoE) run of moe_every layers
    units = m.n_layers // unit if m.n_layers % unit == 0 else 0
    problems = []
    if not units or units % (stages * pipe.repeats):
        problems.append(f"mesh.stage={stages} x pipeline.repeats={repeats} does not divide the {units} scanned units "
                        f"(model.n_layers={m.n_layers} in units of moe_every={unit}); choose stages x repeats "
                        f"dividing {units}, or change model.n_layers")
    if micro < stages:
        problems.append(f"pipeline.microbatches={micro} is too few for mesh.stage={stages}: every stage needs a "
                        f"microbatch; set pipeline.microbatches >= {stages} (0 means {stages})")
    ways = mesh.data * mesh.expert
    if dc.micro_batch_size % (micro * ways):
        problems.append(f"a micro-batch of {dc.micro_batch_size} sequences does not split into pipeline.microbatches="
                        f"{micro} microbatches over data x expert = {ways}; use a data.batch_size / data.grad_accum "
                        f"that is a multiple of {micro * ways}")
    return problems


def stage_view(config: TrainConfig) -> TrainConfig:
    """What one stage's devices run, as a config without stages: the stage's L / S layers (besides the
    embedding and head, which every stage holds) once per iteration of the schedule, bubble included (the
    scanned schedule runs every stage in every iteration), on one microbatch of B / (grad_accum M)
    sequences: `Pipeline.passes` x grad_accum micro-batches of that size, each with its collectives and
    its gradients' reduction (measured on the compiled pipeline: the expert all-to-all and the data-parallel
    reductions run (M + S - 1) / M times as often as with M passes).

    `config` unchanged when it has no stages. Call `pipeline_problems` first.
    """
    return config if config.mesh.stage <= 1 else _stage_view(config)


@functools.lru_cache(maxsize=4096)  # the search asks for each plan's view several times
def _stage_view(config: TrainConfig) -> TrainConfig:
    from tedjax.config import PipelineConfig

    pipe = pipeline_of(config)
    rows, accum = config.data.micro_batch_size // pipe.microbatches, config.data.grad_accum
    return dataclasses.replace(
        config, model=dataclasses.replace(config.model, n_layers=config.model.n_layers // pipe.stages),
        data=dataclasses.replace(config.data, batch_size=rows * accum * pipe.passes, grad_accum=accum * pipe.passes),
        mesh=dataclasses.replace(config.mesh, stage=1), pipeline=PipelineConfig())


def p2p_bytes(config: TrainConfig, layout: Layout | None = None, backend: Backend = "gpu") -> int:
    """Bytes of one collective-permute between stages, per device: one microbatch's activations
    [B / (grad_accum M data expert), L, D] in the compute dtype (float32 on XLA:CPU); 0 without stages."""
    pipe = pipeline_of(config)
    if pipe is None:
        return 0
    layout = layout or (config.mesh.data, config.mesh.expert, config.mesh.tensor)
    m, dc = config.model, config.data
    rows = -(-dc.micro_batch_size // (pipe.microbatches * layout[0] * layout[1]))
    act_b = 4 if backend == "cpu" or resolve_dtype(m.dtype, backend) == "float32" else 2
    return rows * dc.seq_len * m.d_model * act_b


def p2p_count(config: TrainConfig) -> int:
    """Collective-permutes per step: per micro-batch, one per iteration and the last stage's hand-off after
    the loop, forward and again backward: 2 (R M + S) x grad_accum."""
    pipe = pipeline_of(config)
    return 0 if pipe is None else 2 * (pipe.iterations + 1) * config.data.grad_accum


# --------------------------------------------------------------------------- #
# parameters


@dataclasses.dataclass(frozen=True)
class Leaf:
    """One parameter: its global shape, its PartitionSpec entries (mesh axes per dim), its block (None outside;
    for the scanned units, the block's position in a unit), and `units`: the size of its leading "layers" axis
    (0: none)."""

    path: str
    shape: tuple[int, ...]
    spec: tuple[tuple[str, ...], ...]
    layer: int | None = None
    units: int = 0

    @property
    def expert_weight(self) -> bool:
        """An expert FFN weight: [E, D, F] or [E, F, D] after the units' "layers" axis, split over "expert"."""
        stacked = int(self.units > 0)
        return len(self.shape) - stacked == 3 and "expert" in self.spec[stacked]


@functools.lru_cache(maxsize=32)
def _structure(model: ModelConfig) -> tuple[tuple[Leaf, ...], int]:
    """(every parameter with its sharding, bytes of the non-parameter state), from the model's own declarations.

    Traced with `eval_shape` (nothing allocated) on a model of one block of each
    kind (dense, MoE), whose blocks are then repeated: the same leaves as the
    whole model, in the time of two layers whatever its depth.
    """
    import jax
    from flax import nnx

    from tedjax.mesh import param_spec
    from tedjax.model import abstract_model

    probe_layers = min(model.n_layers, model.moe_every)
    _, params, rest = nnx.split(abstract_model(dataclasses.replace(model, n_layers=probe_layers)), nnx.Param, ...)
    first_of_kind: dict[bool, int] = {}
    for j in range(probe_layers):
        first_of_kind.setdefault(model.is_moe_layer(j), j)
    copies = {j: sum(first_of_kind[model.is_moe_layer(i)] == j for i in range(model.n_layers))
              for j in first_of_kind.values()}
    leaves, per_block = [], {j: [] for j in first_of_kind.values()}
    flat = jax.tree_util.tree_flatten_with_path(params, is_leaf=lambda x: isinstance(x, nnx.Variable))[0]
    for path, var in flat:
        shape = tuple(var.shape)
        spec = tuple(param_spec(var))
        spec = tuple(_axes_of(e) for e in spec + (None,) * (len(shape) - len(spec)))
        keys = [getattr(k, "key", getattr(k, "idx", None)) for k in path]
        if keys[0] == "units":  # the probe's one scanned unit: a leading "layers" axis of 1, block keys[2]
            per_block[keys[2]].append((jax.tree_util.keystr(path[3:]), shape[1:], spec[1:]))
        elif keys[0] == "tail":  # the probe has fewer layers than a unit: all unrolled
            per_block[keys[1]].append((jax.tree_util.keystr(path[2:]), shape, spec))
        else:
            leaves.append(Leaf(jax.tree_util.keystr(path), shape, spec))
    units = model.n_layers // model.moe_every  # stacked as the model stacks them; the rest unrolled (its tail)
    for pos in range(model.moe_every if units else 0):
        for sub, shape, spec in per_block[first_of_kind[model.is_moe_layer(pos)]]:
            leaves.append(Leaf(f"['units']['blocks'][{pos}]{sub}", (units, *shape), ((), *spec), pos, units))
    for k in range(model.n_layers - units * model.moe_every):
        for sub, shape, spec in per_block[first_of_kind[model.is_moe_layer(k)]]:
            leaves.append(Leaf(f"['tail'][{k}]{sub}", shape, spec, units * model.moe_every + k))
    other = 0
    for path, x in jax.tree_util.tree_flatten_with_path(nnx.to_pure_dict(rest))[0]:
        keys = [getattr(k, "key", getattr(k, "idx", None)) for k in path]
        nbytes = math.prod(x.shape) * x.dtype.itemsize
        block = keys[2] if keys[0] == "units" else keys[1] if keys[0] == "tail" else None  # (a unit of 1 layer)
        other += nbytes if block is None else nbytes * copies.get(block, 0)
    return tuple(leaves), other


def parameters(model: ModelConfig) -> tuple[Leaf, ...]:
    """Every parameter of the model with its sharding (see `_structure`)."""
    return _structure(model)[0]


@functools.lru_cache(maxsize=1024)
def _stacked_expert_bytes(model: ModelConfig, layout: Layout) -> int:
    """Float32 bytes per device of the scanned units' expert weights, all units (their gradient stack too)."""
    sizes = dict(zip(AXES, layout))
    return sum(_local(leaf.shape, leaf.spec, sizes) * 4 for leaf in parameters(model)
               if leaf.units and leaf.expert_weight)


def _axes_of(entry) -> tuple[str, ...]:
    return () if entry is None else ((entry,) if isinstance(entry, str) else tuple(entry))


def _zero1(leaf: Leaf, layout: Layout, enabled: bool) -> tuple[tuple[str, ...], ...]:
    """The leaf's optimizer-state spec (tedjax.optim.zero1_spec on a shape-only mesh)."""
    if not enabled:
        return leaf.spec
    from jax.sharding import PartitionSpec

    from tedjax.optim import zero1_spec

    entries = [e[0] if len(e) == 1 else (e or None) for e in leaf.spec]
    spec = zero1_spec(PartitionSpec(*entries), leaf.shape, _MeshShape(layout))
    spec = tuple(spec) + (None,) * (len(leaf.shape) - len(spec))
    return tuple(_axes_of(e) for e in spec)


def _local(shape: Sequence[int], spec: Sequence[tuple[str, ...]], sizes: dict[str, int]) -> int:
    """Elements of one device's shard (XLA pads a dim that does not divide)."""
    return math.prod(-(-n // math.prod(sizes[a] for a in axes)) for n, axes in zip(shape, spec))


# --------------------------------------------------------------------------- #
# collectives


@dataclasses.dataclass(frozen=True)
class Traffic:
    """One kind of collective of one step, per device: `count` ops of `result_bytes` each, over `axes`."""

    kind: str  # all-to-all, all-reduce, all-gather, reduce-scatter
    axes: tuple[str, ...]  # non-trivial mesh axes, in mesh order
    result_bytes: int  # per op: the result on one device
    count: int
    what: str
    group_size: int = 1

    @property
    def sent_bytes(self) -> float:
        """Bytes one device sends, per op (the formulas of tedjax.analysis)."""
        p, v = self.group_size, self.result_bytes
        if p <= 1:
            return 0.0
        if self.kind in ("all-to-all", "all-gather"):
            return v * (p - 1) / p
        if self.kind == "all-reduce":
            return 2.0 * v * (p - 1) / p
        if self.kind == "reduce-scatter":
            return float(v * (p - 1))
        if self.kind == "collective-permute":
            return float(v)
        raise ValueError(self.kind)


@dataclasses.dataclass(frozen=True)
class _Sizes:
    """Per-device shapes of one micro-batch on a layout."""

    data: int
    expert: int
    tensor: int
    rows: int  # sequences per device
    tokens: int  # rows x seq_len
    groups_in: int  # routing groups per device before the dispatch all-to-all
    groups_out: int  # after it (split over "data" only)
    capacity: int  # C: slots per expert and routing group
    pools: int  # pools per device after the all-to-all: its E/expert experts, or 1 (capacity_scope=device)
    pool: int  # slots per pool: C, or E/expert x C
    pool_a2a: int  # slots per pool the all-to-all carries (pool, or ceil(pool / tensor) with DTD)
    pool_padded: int  # pool padded to a multiple of tensor with DTD
    dtd: bool
    chunks: int  # a2a_chunks
    shadows: int  # shadow experts R
    shadow_capacity: int  # slots per shadow and routing group
    loop_fill: float = 0.0  # dropless: the pool fill that sizes XLA:CPU's `loop` blocks (0: `blocks`)

    @property
    def slots(self) -> int:
        """Expert slots on one device after the all-to-all: G/data x E/expert x C."""
        return self.groups_out * self.pools * self.pool

    @property
    def pooled(self) -> bool:
        return self.pool != self.capacity

    def sorted_rows(self, backend: Backend) -> int:
        """Rows `grouped.pool_ffn` multiplies per chunk: the slots (ragged_dot, on GPUs), or, with
        XLA:CPU's `blocks` method, each expert's run padded to whole blocks."""
        from tedjax.grouped import block_rows

        rows = self.slots // self.chunks
        if backend == "gpu":
            return rows
        experts = self.pool // self.capacity
        block = block_rows(math.ceil(rows * self.loop_fill) if self.loop_fill else rows, experts)
        return (-(-rows // block) + experts) * block


def _block(sz: _Sizes) -> int:
    """Rows per block of `grouped.pool_ffn`'s `blocks` or `loop` method (XLA:CPU)."""
    from tedjax.grouped import block_rows

    rows = sz.slots // sz.chunks
    return block_rows(math.ceil(rows * sz.loop_fill) if sz.loop_fill else rows, sz.pool // sz.capacity)


def _sizes(config: TrainConfig, layout: Layout) -> _Sizes:
    from tedjax.grouped import expected_fill
    from tedjax.routing import capacity

    m, dc = config.model, config.data
    d, e, t = layout
    micro = dc.batch_size // dc.grad_accum
    rows = -(-micro // (d * e))
    group = m.group_size or dc.seq_len
    groups = micro * dc.seq_len // group
    cap = capacity(group, m.num_experts, m.top_k, m.capacity_factor, m.min_capacity) if m.num_experts else 0
    e_local = m.num_experts // e if m.num_experts else 0
    if m.num_experts and m.capacity_scope == "dropless":  # P rows per device pool, per expert
        cap = -(-_dropless_pool(config, e) // e_local)  # (rounded up: < 1 row per expert more)
    pooled = m.capacity_scope in ("device", "dropless") and e_local > 1
    pools, pool = (1, e_local * cap) if pooled else (e_local, cap)
    dtd = m.dtd and e > 1 and t > 1 and m.num_experts > 0
    pool_a2a = -(-pool // t) if dtd else pool
    shadows = m.shadow_experts if m.num_experts else 0
    loop_fill = expected_fill("dropless", m.num_experts, m.top_k, e, m.capacity_factor, m.dropless_buffer_factor) \
        if pooled and m.capacity_scope == "dropless" else 0.0
    return _Sizes(d, e, t, rows, rows * dc.seq_len, -(-groups // (d * e)), -(-groups // d), cap, pools, pool,
                  pool_a2a, pool_a2a * t if dtd else pool, dtd, m.a2a_chunks, shadows, min(group, e * cap), loop_fill)


def collectives(config: TrainConfig, layout: Layout | None = None, backend: Backend = "gpu") -> list[Traffic]:
    """Every collective of one train step, per device, from the model, the layout and the switches.

    `backend="cpu"` predicts what XLA:CPU compiles: activations cross devices
    in float32 whatever `model.dtype` (XLA:CPU computes bf16 in f32), and the
    ZeRO-1 gradient reduce-scatter is an all-reduce plus a local slice.
    `backend="gpu"` carries activations in the compute dtype and reduce-scatters.
    With stages (`mesh.stage`), those of one stage (`stage_view`) and the
    permutes that pass each microbatch on (`p2p_bytes`, `p2p_count`).
    """
    return _collectives(config, layout, backend)


def _collectives(config: TrainConfig, layout: Layout | None, backend: Backend, lanes: bool = True
                 ) -> list[Traffic]:  # fmt: skip
    """`collectives`; `lanes=False`: a stage's view, whose gradients the trainer reduces per pass (no lanes)."""
    layout = layout or (config.mesh.data, config.mesh.expert, config.mesh.tensor)
    pipe = pipeline_of(config)
    if pipe:
        view = stage_view(config)
        # With stages the units' weights take gradient lanes (NOTES.md section 3.2): ZeRO-1 reduces every
        # gradient once per step, ZeRO-2 once per micro-batch; ZeRO-3 (no lanes) once per pass of the schedule.
        opt = view.optimizer
        zero = opt.zero if opt.zero1 else 1
        inner = _collectives(view, layout, backend, lanes=zero == 1)
        # The embedding, head and loss run once per micro-batch, outside the schedule's passes: so do their
        # collectives and the reduction of their gradients (ZeRO-2: every gradient's).
        passes, accum = pipe.passes, config.data.grad_accum
        fewer: dict = {}
        costs = _leaf_costs(view.model, layout, opt.zero1, backend, zero, opt.tile_size > 0, outside_only=zero != 2)
        once = zero == 1
        for kind, axes, nbytes, count, per_micro, what in (costs.traffic_once if once else costs.traffic):
            key = (kind, tuple(a for a in AXES if a in axes and dict(zip(AXES, layout))[a] > 1), nbytes, what)
            fewer[key] = fewer.get(key, 0) + (count * accum * (passes - 1) if per_micro else 0)
        out = []
        for t in inner:
            count = t.count // passes if t.what in _ONCE_PER_MICRO_BATCH else t.count
            count -= fewer.pop((t.kind, t.axes, t.result_bytes, t.what), 0)
            if t.what == "loss scalars (LM, aux, z)":  # the LM loss's, once per micro-batch; aux and z per pass
                count -= accum * (passes - 1)
            out.append(dataclasses.replace(t, count=count))
        permutes = Traffic("collective-permute", ("stage",), p2p_bytes(config, layout, backend), p2p_count(config),
                           "pipeline activations", pipe.stages)
        return [t for t in out if t.count > 0] + [permutes]
    m = config.model
    sz = _sizes(config, layout)
    sizes = dict(zip(AXES, layout))
    accum = config.data.grad_accum
    act_b = 4 if backend == "cpu" or resolve_dtype(m.dtype, backend) == "float32" else 2  # bytes per activation element
    d_model = m.d_model
    swiglu = m.activation == "swiglu"
    n_moe = m.n_moe_layers
    n_dense = m.n_layers - n_moe
    out: list[Traffic] = []

    def add(kind: str, axes: Iterable[str], nbytes: int, count: int, what: str) -> None:
        axes = tuple(a for a in AXES if a in set(axes) and sizes[a] > 1)
        if axes and count and nbytes:
            out.append(Traffic(kind, axes, int(nbytes), int(count), what, math.prod(sizes[a] for a in axes)))

    # ---- per micro-batch (inside the gradient-accumulation loop)
    act = sz.tokens * d_model * act_b  # [B, L, D] on one device
    batch_axes = ("data", "expert")
    if config.optimizer.zero < 3 or not config.optimizer.zero1:
        add("all-reduce", ["tensor"], sz.tokens * d_model * 4, accum, "embedding lookup")  # vocab split over tensor
    full = m.remat == "full"
    add("all-reduce", ["tensor"], act, accum * m.n_layers * (2 if full else 1), "attention output")
    add("all-reduce", ["tensor"], act, accum * m.n_layers * 3, "attention input gradient (q, k, v)")
    # full remat per scanned unit also recomputes the dense blocks before a unit's last (the next block's input)
    inner_dense = m.n_layers // m.moe_every * (m.moe_every - 1) if full else 0
    add("all-reduce", ["tensor"], act, accum * (n_dense + inner_dense), "dense FFN output")
    add("all-reduce", ["tensor"], act, accum * n_dense * (2 if swiglu else 1), "dense FFN input gradient")
    add("all-reduce", ["tensor"], act, accum, "LM head input gradient")
    add("all-reduce", ["tensor"], sz.tokens * 4, accum * 3, "cross-entropy max, sum and label logit")
    if n_moe:
        slots = sz.slots * d_model * act_b  # [G/data, E/expert, C, D]
        moved = sz.groups_out * sz.pools * sz.pool_a2a * d_model * act_b
        gathered = sz.groups_out * sz.pools * sz.pool_padded * d_model * act_b
        passes = 3 if full else 2  # forward, backward, recomputation
        add("all-to-all", ["expert"], moved, accum * n_moe * 2 * passes, "MoE dispatch and return")
        add("all-reduce", ["tensor"], slots, accum * n_moe * (passes - 1), "expert output")
        if sz.pooled:  # grouped.pool_ffn inside shard_map: one psum of the rows' input gradient per chunk
            add("all-reduce", ["tensor"], sz.chunks * sz.sorted_rows(backend) * d_model * act_b,  # `loop`: once
                accum * n_moe * (2 if swiglu and not (sz.loop_fill and backend == "cpu") else 1),
                "expert input gradient")
            # computed again in the backward pass under either remat policy (it is no collective's output)
            add("all-to-all", ["expert"], sz.groups_in * m.num_experts * 4,
                accum * n_moe * (1 if m.remat == "none" else 2), "rows per expert of each pool (int32)")
        else:
            add("all-reduce", ["tensor"], slots, accum * n_moe * (2 if swiglu else 1), "expert input gradient")
        if sz.dtd:
            add("all-gather", ["tensor"], gathered, accum * n_moe * 2 * passes, "DTD all-gather of slots")
        if sz.shadows:
            # FasterMoE's shadows: R experts' weights all-reduced to every device of "expert" (jnp.take of
            # the expert-split weights inside the layer scan: once per micro-batch, again under full remat),
            # their gradients all-reduced back over the batch axes; their tokens stay local.
            shadow_w = sz.shadows * d_model * (m.expert_d_ff // sz.tensor) * 4
            weights = 3 if swiglu else 2
            add("all-reduce", ["expert"], shadow_w, accum * n_moe * weights * (2 if full else 1),
                "shadow expert weights")
            add("all-reduce", batch_axes, shadow_w, accum * n_moe * weights, "shadow expert weight gradients")
            shadow_rows = sz.shadows * sz.groups_in * sz.shadow_capacity * d_model * act_b
            add("all-reduce", ["tensor"], shadow_rows, accum * n_moe * (passes - 1), "shadow expert output")
            add("all-reduce", ["tensor"], shadow_rows, accum * n_moe * (2 if swiglu else 1),
                "shadow expert input gradient")
            # routing.Routing.shadow_gain: each group's drops a shadow would save, summed over the groups
            # (nonlinear per group, so not derivable from the reduced loads): the shadow policy's input
            add("all-reduce", batch_axes, m.num_experts * 4, accum * n_moe, "shadow gain statistic")
        pools = {"expert": m.num_experts, "device": sz.expert, "dropless": sz.expert}.get(getattr(m, "capacity_scope", None), 0)
        add("all-reduce", batch_axes, (1 + m.num_experts + pools) * 4, accum * n_moe,
            "router statistics (drop count, expert load, pool load)")
    add("all-reduce", batch_axes, 4, accum * (1 + 2 * n_moe), "loss scalars (LM, aux, z)")
    node_size = config.mesh.node_size
    if n_moe and node_size and 0 < expert_nodes(tuple(layout), node_size, config.mesh.stage) < layout[1]:
        add("all-reduce", batch_axes, 4, accum * 2 * n_moe, "node statistics (inter-node, redirected fractions)")

    # ---- gradients over each parameter's data-parallel group (once per step with ZeRO-1, else per micro-batch),
    # the global norm's partial sums, the all-gather of the updated ZeRO-1 shards
    for kind, axes, nbytes, count, per_micro, what in _costs(config, layout, backend, lanes).traffic:
        add(kind, axes, nbytes, count * (accum if per_micro else 1), what)
    return out


# with stages, what runs once per micro-batch outside the schedule (not once per pass of a stage's layers)
_ONCE_PER_MICRO_BATCH = frozenset({"embedding lookup", "LM head input gradient",
                                   "cross-entropy max, sum and label logit"})


@dataclasses.dataclass(frozen=True)
class _LeafCosts:
    """What the parameters cost on one layout: bytes per device and their collectives."""

    params: int  # float32 local shards
    moments: int  # Adam mu + nu in the ZeRO-1 layout
    layer_grads: int  # the largest block's (or outside leaf's) local gradient bytes
    reduced: int  # local gradient bytes reduced over a data-parallel group
    traffic: tuple  # (kind, axes, bytes, count, per micro-batch, what)
    gathered: int = 0  # float32 parameters in their own layout (what ZeRO-3 gathers for a micro-batch)
    traffic_once: tuple = ()  # `traffic` under gradient accumulation (ZeRO-1 reduces once per step)
    laned: int = 0  # `gathered` of the leaves that take lanes under ZeRO-1 accumulation (the rest: per micro-batch)
    laned_state: int = 0  # their bytes in the optimizer state's layout (one moment)


def _costs(config: TrainConfig, layout: Layout, backend: Backend, lanes: bool = True) -> _LeafCosts:
    """A config's costs; `lanes=False` for a stage's view (the trainer takes no lanes with stages)."""
    opt = config.optimizer
    costs = _leaf_costs(config.model, layout, opt.zero1, backend, opt.zero if opt.zero1 else 1, opt.tile_size > 0)
    return dataclasses.replace(costs, traffic=costs.traffic_once) if lanes and config.data.grad_accum > 1 else costs


def _leaf_costs(model: ModelConfig, layout: Layout, zero1: bool, backend: Backend, zero: int = 1,
                tiled: bool = False, outside_only: bool = False) -> _LeafCosts:
    # DTD moves activations, not parameters: one cache entry serves a search's plans with and without it
    return _leaf_costs_of(_replaced(model, (("dtd", False),)) if model.dtd else model, layout, zero1, backend, zero,
                          tiled, outside_only)


@functools.lru_cache(maxsize=4096)
def _leaf_costs_of(model: ModelConfig, layout: Layout, zero1: bool, backend: Backend, zero: int,
                   tiled: bool, outside_only: bool) -> _LeafCosts:
    sizes = dict(zip(AXES, layout))
    batch_axes = ("data", "expert")
    counts: dict[tuple, int] = {}
    counts_once: dict[tuple, int] = {}  # with gradient accumulation
    params = moments = reduced = gathered = laned = laned_state = 0
    per_layer: dict = {}
    for leaf in parameters(model):
        if outside_only and leaf.layer is not None:
            continue
        used = {a for axes in leaf.spec for a in axes}
        local = _local(leaf.shape, leaf.spec, sizes) * 4
        state_spec = _zero1(leaf, layout, zero1)
        shard = _local(leaf.shape, state_spec, sizes) * 4
        params += shard if zero == 3 else local  # ZeRO-3 stores parameters in the optimizer state's shards
        gathered += local
        moments += 2 * shard
        key = leaf.layer if leaf.layer is not None else leaf.path
        per_layer[key] = per_layer.get(key, 0) + local // max(leaf.units, 1)  # one layer's share of a stacked leaf
        added = tuple(a for axes in state_spec for a in axes if a not in used)
        reduced += local if any(sizes[a] > 1 for a in batch_axes if a not in used) else 0
        what = ("embedding gradient" if leaf.path == "['embed']" else
                "router gradient" if leaf.path.endswith("['router']") else "gradient")
        # With a2a_chunks = n each chunk's expert FFN adds its own partial gradient of the expert weights,
        # and XLA reduces each before the sum (measured): n reductions per micro-batch.
        stacked = int(leaf.units > 0)  # dims before the layer's own: the "layers" axis of the scanned units
        expert_weight = leaf.expert_weight
        entries = []
        for _ in range(model.a2a_chunks if expert_weight else 1):
            entries += _gradient_reduction(local, used, added, sizes, backend, what)
        # ZeRO-1 under accumulation reduces each gradient once per step, after the micro-batches (its chunks'
        # partial sums too), as TED's all-reduce whatever XLA would pick: tedjax.trainer's lanes, NOTES.md
        # section 3.2. Not ZeRO-2/3, nor shadowed or dropless experts.
        once = zero == 1 and not (expert_weight and (model.shadow_experts or model.capacity_scope == "dropless"))
        gradients_once = (_gradient_reduction(local, used, added, sizes, backend, "gradient", per_micro=False)
                          if once else list(entries))
        n_gradients = len(entries)
        # (a leaf whose data-parallel group is one device takes no lanes: tedjax.trainer's lanes_of gives it 1)
        lane = once and any(sizes[a] > 1 for a in batch_axes if a not in used)
        laned, laned_state = laned + (local if lane else 0), laned_state + (shard if lane else 0)
        # the global norm: one partial sum per sharded dim of the optimizer-state layout
        entries += [("all-reduce", axes, 4, False, "gradient norm") for axes in state_spec]
        if not tiled:  # the untiled step's NaN guard: the update's norm, reduced as the gradient's
            entries += [("all-reduce", axes, 4, False, "update norm") for axes in state_spec]
        if zero < 3:
            entries.append(("all-gather", added, local, False, "updated parameters (ZeRO-1)"))
        elif leaf.path != "['embed']":  # the lookup's table: partitioned as XLA chooses (XLA_CHOOSES)
            pooled = model.capacity_scope == "device" and model.num_experts // sizes["expert"] > 1  # one shard_map
            norm = len(leaf.shape) - stacked == 1
            if leaf.units:
                # A scanned unit's leaf is gathered where the forward scan slices it out of the stack, and
                # again where the backward scan does (the recomputation of remat uses that gather too), for
                # all chunks at once; a norm's scale once more under remat. The backward gather of the router
                # carries its gradient's op name, so XLA_CHOOSES counts it with the router gradient. Without
                # remat the expert weights are gathered once when the backward pass keeps the forward's copy:
                # device pools (shard_map residuals) and mixed precision (the cast weights are the residual).
                # Measured on XLA:CPU.
                # Without remat the scanned units recompute their elementwise ops in the backward
                # (model.save_all_but_elementwise), a norm's product with its scale too, which gathers the scale
                # once more: every norm of the unit but the MoE block's FFN norm (measured, moe_every = 2). The
                # cast to bf16 is elementwise too, so the cast weights are no residual: only device pools keep
                # the forward's expert weights.
                # Where ZeRO-3 splits the stack's "layers" axis (a group that divides the units), the scan's slice
                # gathers the whole stack, once in the forward and once in the backward pass, where the
                # recomputation, the norms and the router all use that one copy (measured).
                kept = expert_weight and pooled and model.remat == "none"
                whole_stack = bool(state_spec[0])
                moe_ffn_norm = leaf.layer == model.moe_every - 1 and "['ffn_norm']" in leaf.path
                recomputed = model.remat != "none" or (model.scan_layers and not moe_ffn_norm)
                if kept or (leaf.path.endswith("['router']") and not whole_stack):
                    times = 1
                else:
                    times = 2 + (norm and recomputed and not whole_stack)
                if expert_weight and not pooled and not whole_stack and model.a2a_chunks > 1:
                    # Chunked, the backward's transposes gather the expert weights again rather than reuse the
                    # recomputation's: under full remat each chunk gathers in the forward, the recomputation
                    # and the transpose; under CAC (which recomputes the first matmul) the input weights once
                    # more (measured on (4,1,2); without remat nothing changes).
                    if model.remat == "full":
                        times = 3 * model.a2a_chunks
                    elif model.remat == "cac" and leaf.path.endswith(("['w_in']", "['w_gate']")):
                        times = 3
            else:
                # An unrolled leaf is gathered where a micro-batch's forward uses it and kept for the backward
                # pass; a norm's scale is gathered again there, remat gathers again what it recomputes (a
                # block's weights but its router's; expert weights twice under full remat), and each chunk of
                # a chunked all-to-all gathers the expert weights for its own FFN (device pools: once for all
                # chunks). Measured on XLA:CPU before the layers were scanned.
                recomputed = model.remat != "none" and leaf.layer is not None and not leaf.path.endswith("['router']")
                again = (2 if model.remat == "full" and expert_weight else 1) if recomputed else 0
                per_chunk = model.a2a_chunks if expert_weight and not pooled else 1
                times = (1 + again + norm) * per_chunk
            entries += [("all-gather", added, local, True, "parameters (ZeRO-3)")] * times
            if expert_weight and model.shadow_experts and not pooled and not (leaf.units and state_spec[0]):
                # Unless the whole stack is gathered (above) or device pools gather the weights, the shadows'
                # take of R experts' weights (moe_shadow_weights) gathers just those, per unit, in the forward
                # and in full remat's recomputation (the other passes keep it as a residual; measured).
                per_expert = local // max(leaf.units, 1) // _local(leaf.shape[stacked:stacked + 1],
                                                                   leaf.spec[stacked:stacked + 1], sizes)
                passes = 2 if model.remat == "full" else 1
                entries += [("all-gather", added, model.shadow_experts * per_expert, True,
                             "shadow expert weights (ZeRO-3)")] * (max(leaf.units, 1) * passes)
        def keys(listed):
            for kind, axes, nbytes, per_micro, what in listed:
                axes = tuple(a for a in AXES if a in axes and sizes[a] > 1)
                if axes and nbytes:
                    yield kind, axes, nbytes, per_micro, what

        rest, gradients = list(keys(entries[n_gradients:])), list(keys(entries[:n_gradients]))
        for tally, listed in ((counts, gradients), (counts_once, list(keys(gradients_once)) if once else gradients)):
            for key in listed + rest:
                tally[key] = tally.get(key, 0) + 1
    traffic, traffic_once = (tuple((k, a, b, n, pm, w) for (k, a, b, pm, w), n in tally.items())
                             for tally in (counts, counts_once))
    return _LeafCosts(params, moments, max(per_layer.values()), reduced, traffic, gathered, traffic_once, laned,
                      laned_state)


def _gradient_reduction(local: int, used: set, added: tuple, sizes: dict, backend: Backend, what: str,
                        per_micro: bool = True) -> list:
    """A gradient's reduction over its data-parallel group: reduce-scatter into the ZeRO-1 shard on GPUs
    (all-reduce over the rest of the group), one all-reduce on XLA:CPU."""
    batch_axes = ("data", "expert")
    entries = []
    if backend == "gpu" and any(sizes[a] > 1 for a in added):
        p_added = math.prod(sizes[a] for a in added)
        entries.append(("reduce-scatter", added, -(-local // p_added), per_micro, what))
        entries.append(("all-reduce", tuple(a for a in batch_axes if a not in used and a not in added),
                        -(-local // p_added), per_micro, what))
    else:
        entries.append(("all-reduce", tuple(a for a in batch_axes if a not in used), local, per_micro, what))
    return entries


def summarize(traffic: Iterable[Traffic], exclude: Sequence[str] = ()) -> dict[tuple[str, tuple[str, ...]], dict]:
    """{(kind, axes): {"count", "result_bytes", "sent_bytes"}} summed over ops, like tedjax.analysis.summarize."""
    out: dict = {}
    for t in traffic:
        if t.what in exclude:
            continue
        row = out.setdefault((t.kind, t.axes), {"count": 0, "result_bytes": 0, "sent_bytes": 0.0})
        row["count"] += t.count
        row["result_bytes"] += t.count * t.result_bytes
        row["sent_bytes"] += t.count * t.sent_bytes
    return out


# --------------------------------------------------------------------------- #
# memory


@dataclasses.dataclass(frozen=True)
class Memory:
    """Predicted bytes on one device. `arguments` + `temporaries` is what XLA's memory_analysis reports."""

    params: int  # float32 master weights, this device's shard
    optimizer: int  # Adam mu and nu in the ZeRO-1 layout, counters
    batch: int  # int32 inputs and targets of every micro-batch
    other: int  # non-parameter model state and step counters
    gradients: int  # float32 gradients of the local shard, before the ZeRO-1 reduction
    activations: int  # kept by the forward pass for the backward pass (the remat policy's)
    temporaries: int  # the step's peak beyond its arguments
    peak_at: str  # where that peak is: "backward start", "backward end" or "optimizer update"
    phases: tuple = ()  # ((moment, temporaries there), ...) for each of the three moments, the peak's included

    @property
    def arguments(self) -> int:
        return self.params + self.optimizer + self.batch + self.other

    @property
    def total(self) -> int:
        return self.arguments + self.temporaries


def memory(config: TrainConfig, layout: Layout | None = None, backend: Backend = "gpu") -> Memory:
    """Per-device memory of one train step on `layout` (default the config's mesh).

    Parameters, gradients and optimizer state follow the shardings exactly
    (TED eq. 5 as tedjax shards it: float32 master weights and gradients split
    over "tensor" and, for experts, "expert"; Adam's two moments also split over
    each parameter's data-parallel group by ZeRO-1). Activations count the
    tensors the forward pass keeps per layer (T tokens of a micro-batch on the
    device, slots = G/data x E/expert x C):

      attention   3 [T, D] + 3 [T, D / tensor] + 2 [T, H / tensor, L] (scores, probabilities)
      dense FFN   3 [T, D] + 3 [T, F / tensor] (x 1.5 for SwiGLU)
      MoE FFN     3 [T, D] + 3 [slots, F_expert / tensor] (x 1.5 for SwiGLU) + 1 [slots, D]

    under the remat policy: "full" keeps each layer's input and recomputes one
    layer at a time; "cac" also keeps the outputs of its collectives.

    The peak is the largest of three moments, each plus one layer's backward
    working set: the start of the backward pass (every kept activation, one
    layer's gradients), its end (every gradient, one layer's activations),
    and the optimizer update (every gradient and, without the tiled
    optimizer, a second copy of the Adam moments: the step's non-finite guard
    keeps the old ones next to the new). The backward layer scan reduces each
    unit's gradients into the optimizer's shards inside the loop, so at its
    end the scanned units' gradients are in shards and one unit's in full
    (all levels but ZeRO-1's lanes); ZeRO-3's update holds no full copy. Adam's
    moments are stored in `optimizer.state_dtype` (bfloat16: 2 + 2 bytes per
    parameter, in the same shards). With gradient accumulation the
    running sum is a second set of gradients, in the optimizer's shards;
    with mixed precision the weights cast to the compute dtype are held for
    the whole step (the scanned units' one unit at a time). These terms are
    calibrated on XLA:CPU programs (benchmarks/planner.py). `backend="cpu"`:
    activations in float32; the layer scan recomputes one unit at a time
    inside the backward loop, so remat saves there too, and without remat
    the backward of a unit holds a copy of its residuals and weights sliced
    out of their stacks next to the stacked residuals (measured).

    With stages, one stage's (`stage_view`: its layers' weights and
    optimizer state, 1/S of the layers'), whose kept activations are those
    of every iteration's microbatch, `Pipeline.in_flight` = M + (S-1)/R
    microbatches through the whole stage (the scanned schedule keeps the
    bubble's iterations too).
    """
    layout = layout or (config.mesh.data, config.mesh.expert, config.mesh.tensor)
    pipe = pipeline_of(config)
    real = pipe.microbatches * config.data.grad_accum if pipe else 0  # microbatches of input per step
    config = stage_view(config)
    m, dc = config.model, config.data
    sz = _sizes(config, layout)
    t = sz.tensor
    costs = _costs(config, layout, backend, lanes=not pipe)
    params, moments = costs.params, costs.moments  # moments: two float32 copies in the optimizer's shards
    # Adam's moments as stored (optimizer.state_dtype): bfloat16 halves them; the gradients stay float32
    state = moments // 2 if config.optimizer.state_dtype == "bfloat16" else moments
    full = costs.gathered  # float32 parameters (and gradients) in their own layout
    zero = config.optimizer.zero if config.optimizer.zero1 else 1
    counters = 3 * 4 + 2 * 4  # step, bad_steps, skipped_steps; Adam's and the schedule's counts
    batch = 2 * (real or dc.grad_accum) * sz.rows * dc.seq_len * 4
    other = _structure(m)[1]

    act_b = 4 if backend == "cpu" or resolve_dtype(m.dtype, backend) == "float32" else 2
    td, td_t = sz.tokens * m.d_model * act_b, sz.tokens * m.d_model // t * act_b
    heads = sz.tokens * (m.n_heads // t) * dc.seq_len * (4 + act_b) // 2  # float32 scores, probs in compute dtype
    flash = backend == "gpu" and (m.attention == "cudnn" or (
        m.attention == "auto" and m.dtype == "bfloat16" and m.head_size % 8 == 0 and m.head_size <= 128))
    if flash:  # cuDNN flash attention (model.attention, tedjax.layers) keeps a float32 log-sum-exp, no scores
        heads = sz.tokens * (m.n_heads // t) * 4 // 2
    slots = sz.slots
    slot_d = slots * m.d_model * act_b
    n_moe = m.n_moe_layers
    n_dense = m.n_layers - n_moe
    ffn_x2 = 3 if m.activation == "swiglu" else 2  # 2 x the FFN-wide tensors' factor
    weights = ffn_x2  # expert weight matrices: w_in, w_out (and w_gate)
    f_t = m.expert_d_ff // t
    attention = 3 * td + 3 * td_t + 2 * heads
    dense = 3 * td + 3 * sz.tokens * (m.d_ff // t) * act_b * ffn_x2 // 2
    # Device pools: grouped.pool_ffn multiplies rows sorted by expert; XLA:CPU's `blocks` method pads
    # them to whole blocks and keeps one copy of the expert weights per block, per chunk.
    rows = sz.chunks * sz.sorted_rows(backend) if sz.pooled else slots
    copies = sz.chunks * (sz.sorted_rows(backend) // _block(sz)) if sz.pooled and backend == "cpu" else 0
    moe = 3 * td + 3 * rows * f_t * act_b * ffn_x2 // 2 + slot_d + copies * m.d_model * f_t * act_b * weights
    if sz.loop_fill and backend == "cpu":  # dropless `loop`: no weight copies, no [rows, F] kept (recomputed)
        moe = 3 * td + slot_d + 2 * rows * m.d_model * act_b
    # Shadow experts: R more FFNs on each device's own tokens, with a copy of their weights.
    shadow_rows = sz.shadows * sz.groups_in * sz.shadow_capacity
    moe += (3 * shadow_rows * f_t * act_b * ffn_x2 // 2 + shadow_rows * m.d_model * act_b
            + sz.shadows * m.d_model * f_t * act_b * weights) if n_moe else 0
    one_layer = attention + (moe if n_moe else dense)
    logits = 2 * sz.tokens * (m.padded_vocab // t) * 4
    units = m.n_layers // m.moe_every
    unit = one_layer + (m.moe_every - 1) * (attention + dense)  # one scanned unit's activations
    # `kept` is stored per pass of the layers (with stages: for every iteration's microbatch, `in_flight`);
    # `once` is a working set that exists one unit at a time, in flight or not (measured with stages: taking
    # it per iteration over-predicted full remat 2.2x, remat none 6-10%)
    # Without remat the layer scan stacks every unit's residuals; on XLA:CPU the backward of a unit also holds a
    # working set next to them (below; measured: 28-41% under without it)
    residuals = m.n_layers * attention + n_dense * dense + n_moe * moe
    if m.scan_layers:
        # Scanned, the units keep the outputs of every op but the elementwise ones
        # (tedjax.model.save_all_but_elementwise), stacked over units. Read from XLA:CPU's buffer
        # assignment (gelu and swiglu): a unit's input [T, D]; per attention q, k, v and the heads'
        # output [T, D / tensor] each, the scores (not the probabilities) and the output projection
        # [T, D]; per FFN its dot outputs ([T, F / tensor] x 2, x 3 for SwiGLU) and output [T, D]; per MoE
        # FFN its dot outputs on the slots, the dispatched [slots, D] and two [T, D] (its input in
        # routing groups and the combined output).
        scores_kept = heads if flash else sz.tokens * (m.n_heads // t) * dc.seq_len * act_b
        # (of the 1.5 x ffn_x2 FFN-wide tensors counted above, ffn_x2 are dot outputs: drop the other half)
        moe_ffn = 0 if sz.loop_fill and backend == "cpu" else (rows + shadow_rows) * f_t * act_b * ffn_x2 // 2
        residuals -= (m.n_layers * (2 * td - td_t + 2 * heads - scores_kept)
                      + n_dense * (2 * td + sz.tokens * (m.d_ff // t) * act_b * ffn_x2 // 2)
                      + n_moe * (td + moe_ffn)) - units * td
    unit_backward = 0
    if backend == "cpu" and m.scan_layers and units:
        # The backward of a scanned unit slices its residuals and its weights out of their stacks (buffer
        # assignment: a dynamic-slice copy of each, live through the unit's backward; its recomputed
        # elementwise values and cotangents come and go within it). Taking all of the unit's activations
        # instead put cells -0.4 to +23 MiB off, over-predicting wherever the FFN is wide (SwiGLU, shadows).
        unit_weights = (full - _leaf_costs(m, layout, config.optimizer.zero1, backend, zero,
                                           outside_only=True).gathered) // units
        unit_backward = residuals // units + unit_weights
    if m.remat == "none":
        kept = residuals
        once = unit_backward or (unit if backend == "cpu" else 0)
    else:  # each scanned unit's (or tail layer's) input, plus (cac) its collectives' outputs; one unit recomputed
        kept, once = (m.n_layers - units * (m.moe_every - 1)) * td, unit
        if copies and n_moe and m.remat == "full":
            # The recomputed unit's backward holds one more per-block array of one chunk than its weight copies
            # (buffer assignment at the peak: a transposed per-block gradient, or a bf16-rounded copy. A (4,1,2)
            # cell with 8-row blocks holds 9 arrays of one chunk's size, where this counts 7: two from the forward
            # pass, four recomputed and three transposed; a (1,4,2) cell with 40-row blocks holds 7 (two
            # forward, one recomputed, four transposed): which are live together depends on where the peak
            # falls; not modelled)
            once += copies // sz.chunks * m.d_model * f_t * act_b
        if m.remat == "cac":
            kept += m.n_layers * td + n_dense * td + n_moe * 3 * slot_d
    activations = kept * (pipe.in_flight if pipe else 1) + once + 3 * td + logits
    if pipe:  # the head and loss run on the whole micro-batch, M microbatches; the schedule's buffer of the M
        # microbatches (stage 0's inputs, then outputs) and its cotangent
        activations += (3 * td + logits) * (pipe.microbatches - 1) + 2 * pipe.microbatches * td
    layer_grads = costs.layer_grads
    # Gradient accumulation keeps the running sum next to each micro-batch's gradients, in the optimizer's
    # shards (ZeRO-1 too: the step's constraint of the summed gradients to that layout reaches the loop's
    # carry; measured on XLA:CPU). The data-parallel reduction writes in place: measured on XLA:CPU, a second
    # copy of the reduced gradients at the end of the backward pass over-predicted data-heavy layouts
    # by up to 30%.
    # With lanes (ZeRO-1, no stages: one reduction per step, NOTES.md section 3.2) each device sums its own
    # lane's gradients, a full copy in each parameter's own layout, until the one reduction after the loop.
    # (Shadowed and dropless expert weights take no lanes: theirs is summed in the optimizer's shards.)
    lanes = not pipe and config.optimizer.zero1 and config.optimizer.zero == 1 and costs.laned > 0
    carry = (costs.laned + moments // 2 - costs.laned_state if lanes else moments // 2) if dc.grad_accum > 1 else 0
    tile = config.optimizer.tile_size
    # Mixed precision: the weights cast to the compute dtype are loop invariant, so XLA computes them
    # once and holds them for the whole step; the scanned units' weights are cast inside the layer scan,
    # one unit at a time (not hoisted out of it). Not on XLA:CPU, which carries bf16 as float32: there a
    # bf16 cell's temporaries equal its float32 twin's within 1% (measured at both peaks, remat none).
    outside_costs = _leaf_costs(m, layout, config.optimizer.zero1, backend, zero, outside_only=True)  # not the units'
    outside = outside_costs.gathered
    cast_bytes = outside + (full - outside) // max(units, 1)
    casts = 0 if resolve_dtype(m.dtype, backend) == "float32" or backend == "cpu" else cast_bytes * act_b // 4
    # With accumulation XLA also slices the parameters' ZeRO-1 shards before the loop (measured).
    # Lanes hand the layers each weight as [N, ...] copies split over its group: on XLA:CPU one more copy of
    # the laned weights in their own layout per device, held through the micro-batches (measured: three
    # full-size copies at the end of the backward pass, with the running sum and the micro-batch's gradients;
    # dead after the loop). Not counted on GPUs, where a device's lane [1, ...] can be a bitcast of its
    # weights (not checked).
    lane_weights = costs.laned if lanes and carry and backend == "cpu" else 0
    # (Kept at ZeRO-3 and for leaves no group splits, where there is no slice to take: without it there, held-out
    # cells fall 11-18% under; what XLA holds in its place is not identified. Buffer assignment of one ZeRO-3
    # (1,8,1) cell with a2a_chunks=2: the buffers live through the whole step are the running sum plus a
    # partial second copy of it, 1.3x the running sum, not 2x; the backward scan's gradient stacks of the
    # micro-batch, in the optimizer's shards, are live from the start of the backward loop. Counting those
    # stacks instead lowered the seen cells' score.)
    working = 3 * td + 4 * td_t + 2 * slot_d + casts + (moments // 2 if carry else 0)
    # ZeRO-3's gathered parameters add nothing measurable to the peak on XLA:CPU: each is gathered where a
    # layer uses it, and the backward pass frees them layer by layer as it frees the activations.
    # XLA:CPU turns ZeRO-2/3's per-micro-batch reduce-scatter into an all-reduce plus a slice: the running
    # sum saves nothing there (measured). With the layers scanned the all-reduce's full result no longer adds
    # to the peak (it did before: counting it put float32 remat cells 30-35% over).
    cpu_zero2 = full - carry if backend == "cpu" and carry else 0
    # Chunked all-to-all (no pools, no shadows): each chunk's expert FFN adds its own partial gradient of the
    # stacked expert weights, and the backward scan writes each into a stack of its own, summed after the loop
    # (measured on XLA:CPU: a2a_chunks=2 against 1, remat none, +0.93 of the units' expert weights; with shadow
    # experts, whose take adds to the same gradient, the held-out cells show no such stacks).
    chunk_grads = 0
    if sz.chunks > 1 and not sz.pooled and not sz.shadows and m.scan_layers and units:
        chunk_grads = (sz.chunks - 1) * _stacked_expert_bytes(m, layout)
    elif zero == 3 and sz.chunks > 1 and not sz.pooled and m.scan_layers and units:
        # ZeRO-3 with shadows: each chunk's transpose gathers the unit's expert weights again (the byte model's
        # extra gathers), so the backward of a unit holds chunks - 1 more gathered copies of them (buffer
        # assignment: [E, D, F] copies of one unit on (8,1,1))
        chunk_grads = (sz.chunks - 1) * _stacked_expert_bytes(m, layout) // units
    # The backward layer scan reduces each scanned unit's gradients into the optimizer's shards inside the
    # loop (compiled HLO: the scan carries the gradient stack in those shards and its reduction is
    # unit-shaped), at every ZeRO level but ZeRO-1's lanes, which sum full copies until after the loop: at
    # the end of the backward pass the units' gradients are in shards, and one unit's in full.
    grads_end, chunk_grads_end = full, 0
    if not pipe and not (lanes and dc.grad_accum > 1) and m.scan_layers and units:
        grads_end = outside + (moments - outside_costs.moments) // 2 + (full - outside) // units
        chunk_grads_end = chunk_grads  # the chunks' own stacks (above) stay full: reduced after the loop
        # the shadows' weight gradients, stacked over the units in full ([units, R, D, F / tensor] per weight:
        # buffer assignment), summed into their experts' after the loop
        chunk_grads_end += units * sz.shadows * weights * m.d_model * f_t * 4 if n_moe else 0
        if backend == "cpu":  # the all-reduce's full result next to its operand, one unit's
            cpu_zero2 = (full - outside) // units
    # ZeRO-3's update reads the gradients in the optimizer's shards and leaves the parameters there: no full
    # copy (ZeRO-1/2 all-gather the updated parameters into their own layout).
    update_grads = moments // 2 + outside if zero == 3 and not pipe else full
    # The head's backward runs before the layer scan's: inside that loop and at its end the logits are dead,
    # and at its start two of the head's three [T, D] too (the residual stream's cotangent is not). Buffer
    # assignment of the held-out cells: every peak is inside the backward layer loop. (XLA:CPU only, where it
    # is measured; the GPU figures keep both.)
    scanned = m.scan_layers and units and not pipe and backend == "cpu"
    head_done = logits + 2 * td if scanned else 0
    # The shadows' stacked weight gradients (above) are the backward scan's carry: zeros from its first step
    # (buffer assignment: live from before the loop to after it)
    shadow_grads = units * sz.shadows * weights * m.d_model * f_t * 4 if n_moe and scanned else 0
    if lanes and dc.grad_accum > 1 and sz.shadows and n_moe and scanned:
        # Shadowed expert weights take no lanes: each micro-batch's backward all-reduces a unit's expert
        # gradients in the loop, one partial gradient per chunk, and the reduced copies of all chunks are live
        # together (buffer assignment, (8,1,1) remat=full: one combined all-reduce of chunks x the unit's
        # expert weights, next to the full gradient stack)
        shadow_grads += sz.chunks * (_stacked_expert_bytes(m, layout) // units)
    phases = {"backward start": activations - head_done + carry + layer_grads + chunk_grads + lane_weights
              + shadow_grads,
              "backward end": carry + grads_end + chunk_grads_end + one_layer + (0 if scanned else logits)
              + cpu_zero2 + lane_weights,
              "optimizer update": update_grads + (4 * 4 * tile if tile else state)}
    peak_at = max(phases, key=phases.get)
    return Memory(params, state + counters, batch, other, full, activations, working + phases[peak_at], peak_at,
                  tuple((name, working + value) for name, value in phases.items()))


def state_bytes_per_parameter(config: TrainConfig) -> int:
    """Bytes every parameter needs on some device whatever the sharding: its float32 master weight and float32
    gradient, and Adam's two moments in `optimizer.state_dtype` (16 in float32)."""
    return 4 + 4 + 2 * (2 if config.optimizer.state_dtype == "bfloat16" else 4)


def parameter_bound(config: TrainConfig, cluster: Cluster, devices: int) -> int:
    """The most parameters `devices` GPUs of `cluster` can hold at any ZeRO level: their whole budget (the
    planner's, HEADROOM kept free) over `state_bytes_per_parameter`, with no activations at all."""
    return devices * int(cluster.memory_gib * GIB * (1 - HEADROOM)) // state_bytes_per_parameter(config)


# --------------------------------------------------------------------------- #
# step time


def flops_per_device(config: TrainConfig, layout: Layout | None = None) -> float:
    """Matmul FLOPs of one step on one device: forward + backward (3x the forward), and the remat recomputation.

    Counts what the program computes, not the model's ideal: expert matmuls on
    every capacity slot (empty or not), attention scores over the whole L x L
    square (the causal mask is applied after), the LM head over the local vocab.
    """
    layout = layout or (config.mesh.data, config.mesh.expert, config.mesh.tensor)
    config = stage_view(config)  # with stages: one stage's layers on the microbatches (the bubble apart)
    m, dc = config.model, config.data
    sz = _sizes(config, layout)
    t = sz.tensor
    head = getattr(m, "head_size", m.d_model // m.n_heads)
    kv_heads = getattr(m, "kv_heads", m.n_heads)
    ffn = 3 if m.activation == "swiglu" else 2
    tokens = sz.tokens
    projections = m.d_model * head * (2 * m.n_heads + 2 * kv_heads) // t  # q, o and k, v
    attention = tokens * (projections + 2 * dc.seq_len * m.n_heads * head // t)  # + scores and probs x values
    dense = tokens * ffn * m.d_model * m.d_ff // t
    e_local = m.num_experts // sz.expert if m.num_experts else 0
    slots = sz.groups_out * e_local * sz.capacity
    moe = slots * ffn * m.d_model * m.expert_d_ff // t + tokens * m.d_model * m.num_experts  # experts + router
    n_moe = m.n_moe_layers
    blocks = m.n_layers * attention + (m.n_layers - n_moe) * dense + n_moe * moe
    lm_head = tokens * m.d_model * m.padded_vocab // t
    recompute = 1 if m.remat in ("full", "cac") else 0
    return 2.0 * dc.grad_accum * ((3 + recompute) * blocks + 3 * lm_head)


def _dropless_pool(config: TrainConfig, expert: int) -> int:
    from tedjax.routing import dropless_capacity

    m = config.model
    group = m.group_size or config.data.seq_len
    return dropless_capacity(group, m.num_experts, m.top_k, expert, m.dropless_buffer_factor)


def dropless_rows(config: TrainConfig, layout: Layout | None = None, backend: Backend = "gpu") -> dict[str, float]:
    """Dropless MoE (`model.capacity_scope=dropless`) on one device, per MoE layer and micro-batch, forward.

    `buffer_rows`: the receive buffer, G/data groups x P rows (worst case
    S x min(E_local, k), or bounded by `dropless_buffer_factor`); the static
    exchange (CPU) sends all of it each way and the expert FFN computes all
    of it (what `collectives` and `flops_per_device` count). `expected_rows`:
    the routed rows under uniform routing (k S / X per group), what the ragged
    exchange sends and a grouped GEMM computes; `worst_rows`: the most it can
    be (= buffer_rows). Bytes are per direction, FLOPs the expert matmuls.
    """
    layout = layout or (config.mesh.data, config.mesh.expert, config.mesh.tensor)
    m, dc = config.model, config.data
    sz = _sizes(config, layout)
    group = m.group_size or dc.seq_len
    act_b = 4 if backend == "cpu" or m.dtype == "float32" else 2
    buffer_rows = sz.groups_out * _dropless_pool(config, sz.expert)
    expected_rows = sz.groups_out * group * m.top_k / sz.expert
    row_bytes = m.d_model * act_b
    row_flops = 2 * (3 if m.activation == "swiglu" else 2) * m.d_model * m.expert_d_ff / sz.tensor
    return {"buffer_rows": buffer_rows, "expected_rows": expected_rows, "worst_rows": buffer_rows,
            "static_bytes": buffer_rows * row_bytes, "ragged_bytes_expected": expected_rows * row_bytes,
            "ragged_bytes_worst": buffer_rows * row_bytes, "static_flops": buffer_rows * row_flops,
            "grouped_flops_expected": expected_rows * row_flops}


def _node_ids(layout: Layout, gpus_per_node: int, stages: int = 1):
    """[stage, data, expert, tensor] -> node, with devices numbered as make_mesh lays them out ("stage" outermost)."""
    import numpy as np

    shape = (stages, *layout)
    return np.arange(math.prod(shape)).reshape(shape) // gpus_per_node


@functools.lru_cache(maxsize=4096)
def _crosses_nodes(layout: Layout, axes: tuple[str, ...], gpus_per_node: int, stages: int = 1) -> bool:
    """Whether some group of `axes` spans two nodes, with devices numbered as make_mesh lays them out."""
    import numpy as np

    names = ("stage", *AXES)
    ids = _node_ids(layout, gpus_per_node, stages)
    keep = [i for i, a in enumerate(names) if a not in axes]
    moved = np.moveaxis(ids, [names.index(a) for a in axes], range(len(keep), len(names)))
    groups = moved.reshape(math.prod(ids.shape[i] for i in keep), -1)
    return bool((groups != groups[:, :1]).any())


@functools.lru_cache(maxsize=4096)
def expert_nodes(layout: Layout, gpus_per_node: int, stages: int = 1) -> int:
    """Devices of each expert-axis group that share a node (the expert axis when it stays in one node), or 0
    when node boundaries split the groups unevenly (e.g. 16 expert ranks over nodes of 3)."""
    import numpy as np

    groups = np.moveaxis(_node_ids(layout, gpus_per_node, stages), 2, -1).reshape(-1, layout[1])
    counts = {int(c) for g in groups for c in np.unique(g, return_counts=True)[1]}
    return counts.pop() if len(counts) == 1 and layout[1] % next(iter(counts | {1})) == 0 else 0


def topology_model(config: TrainConfig, cluster: Cluster, layout: Layout | None = None):
    """`balance.TopologyCostModel` of the plan's expert axis on `cluster` (nodes of `mesh.node_size`
    devices when set, else the cluster's `gpus_per_node`)."""
    from tedjax.balance import TopologyCostModel

    layout = layout or (config.mesh.data, config.mesh.expert, config.mesh.tensor)
    per_node = config.mesh.node_size or cluster.gpus_per_node
    return TopologyCostModel(layout[1], expert_nodes(layout, per_node, config.mesh.stage),
                             cluster.intra_node_gbps * 1e9, cluster.inter_node_gbps * 1e9,
                             cluster.collective_latency_us * 1e-6, cluster.intra_node_step_us * 1e-6,
                             cluster.inter_node_step_us * 1e-6)


@dataclasses.dataclass(frozen=True)
class Timing:
    """Predicted seconds of one step: compute at peak plus, per mesh-axis group, each collective's latency
    and its bytes over the link."""

    compute_s: float
    comm_s: dict  # axes (joined by "+") -> seconds, latency included
    links: dict  # axes -> "intra-node" or "inter-node"
    latency_s: float = 0.0  # the latency part of sum(comm_s): ops x (fixed + per ring step)
    bubble_s: float = 0.0  # with stages: compute_s x (S-1)/(R M), the stages' idle iterations

    @property
    def step_s(self) -> float:
        return self.compute_s + self.bubble_s + sum(self.comm_s.values())


def step_time(config: TrainConfig, cluster: Cluster, layout: Layout | None = None,
              traffic: Sequence[Traffic] | None = None) -> Timing:
    """FLOPs / peak plus, for each collective, its latency (alpha: a fixed cost and one per ring step) and
    bytes sent / bandwidth (beta) of the link its mesh axes cross. Nothing overlaps.

    With stages the bubble adds compute x (S-1)/M (GPipe), and each permute costs one step's latency plus its
    bytes over the link between stages. The MoE all-to-all over an expert axis that spans nodes is priced
    by `balance.TopologyCostModel`: flat (its NVLink and network parts at once) or, with
    `model.a2a=hierarchical`, in two phases whose network part is `model.remote_fraction` of the flat one's.
    """
    layout = layout or (config.mesh.data, config.mesh.expert, config.mesh.tensor)
    traffic = collectives(config, layout) if traffic is None else traffic
    pipe = pipeline_of(config)
    stages = pipe.stages if pipe else 1
    # clusters are GPU nodes: model.dtype auto is bfloat16 there
    compute = flops_per_device(config, layout) / cluster.peak_flops(resolve_dtype(config.model.dtype, "gpu"))
    comm: dict[str, float] = {}
    links: dict[str, str] = {}
    latency = 0.0
    # XLA's combiners merge the per-parameter collectives into buckets (xla.*_combine_bytes; XLA:GPU's
    # default threshold is taken as 30 MiB): one latency per bucket, at least one per micro-batch.
    accum = config.data.grad_accum
    bucket = config.xla.all_reduce_combine_bytes or 30 * 2**20
    combined: dict[tuple, list] = {}
    for t in traffic:
        if t.what in COMBINED:
            row = combined.setdefault((t.kind, t.axes, t.group_size), [0, 0])
            row[0] += t.count * t.result_bytes
            row[1] += t.count
    ops = {key: max(-(-nbytes // bucket), min(count, accum)) for key, (nbytes, count) in combined.items()}
    per_node = config.mesh.node_size or cluster.gpus_per_node
    topology = None
    for t in traffic:
        key = "+".join(t.axes)
        if key not in links:
            links[key] = "inter-node" if _crosses_nodes(layout, t.axes, per_node, stages) else "intra-node"
        inter = links[key] == "inter-node"
        if t.what == "MoE dispatch and return" and inter and expert_nodes(layout, per_node, stages):
            # an expert axis across nodes in whole runs: its NVLink and network parts (two links at once)
            topology = topology or topology_model(config, cluster, layout)
            m = config.model
            seconds = topology.seconds(t.result_bytes, m.a2a, m.remote_fraction)
            flat_alpha = topology.flat_s(0.0)
            alpha = (flat_alpha if m.a2a == "flat" else topology.hierarchical_s(0.0, m.remote_fraction)) * t.count
            latency += alpha
            comm[key] = comm.get(key, 0.0) + seconds * t.count
            continue
        gbps = cluster.inter_node_gbps if inter else cluster.intra_node_gbps
        steps = 1 if t.kind == "collective-permute" else (2 if t.kind == "all-reduce" else 1) * (t.group_size - 1)
        per_op = (cluster.collective_latency_us
                  + steps * (cluster.inter_node_step_us if inter else cluster.intra_node_step_us)) * 1e-6
        n_ops = ops.pop((t.kind, t.axes, t.group_size), 0) if t.what in COMBINED else t.count
        beta = t.count * t.sent_bytes / (gbps * 1e9)
        if t.kind in ("all-reduce", "all-gather", "reduce-scatter") and n_ops:
            # NCCL's tuner runs each ring collective in the protocol its cost model finds faster: LL for
            # small messages (the scalars, the norms' partial sums), Simple for large ones
            ll_per_op = (cluster.ll_latency_us
                         + steps * (cluster.ll_inter_node_step_us if inter else cluster.ll_intra_node_step_us)) * 1e-6
            ll_share = 4 if t.kind == "all-reduce" or inter else 3
            if ll_per_op * n_ops + beta * ll_share < per_op * n_ops + beta:
                per_op, beta = ll_per_op, beta * ll_share
        alpha = per_op * n_ops
        latency += alpha
        comm[key] = comm.get(key, 0.0) + alpha + beta
    # the view's FLOPs run every iteration, bubble included: its idle part is the bubble
    bubble = compute * (pipe.passes - pipe.microbatches) / pipe.passes if pipe else 0.0
    return Timing(compute - bubble, comm, links, latency, bubble)


# The per-parameter collectives XLA combines into buckets (one latency per bucket in `step_time`).
COMBINED = frozenset({"gradient", "embedding gradient", "router gradient", "gradient norm", "update norm",
                      "updated parameters (ZeRO-1)", "parameters (ZeRO-3)", "shadow expert weight gradients"})


# --------------------------------------------------------------------------- #
# search


@dataclasses.dataclass(frozen=True)
class Estimate:
    """A plan with its predicted memory, traffic and time, and why it is rejected ("" when it is not)."""

    plan: Plan
    memory: Memory | None
    timing: Timing | None
    traffic: dict  # summarize(collectives(...))
    reason: str = ""

    @property
    def fits(self) -> bool:
        return not self.reason

    @property
    def step_s(self) -> float:
        return self.timing.step_s if self.timing else math.inf


@dataclasses.dataclass(frozen=True)
class Search:
    """The ranked pool of plans that fit, and every rejected plan with its reason."""

    config: TrainConfig
    cluster: Cluster
    devices: int
    pool: list[Estimate]
    rejected: list[Estimate]
    budget_bytes: int

    @property
    def best(self) -> Estimate:
        if not self.pool:
            raise NoPlanFits(self)
        return self.pool[0]

    def closest(self) -> Estimate | None:
        """The rejected plan that divides and needs the least memory (what to show when nothing fits)."""
        sized = [e for e in self.rejected if e.memory is not None]
        return min(sized, key=lambda e: e.memory.total) if sized else None


class NoPlanFits(ValueError):
    """No layout and switch setting fits the model on the cluster; the message says what the closest plan lacks."""

    def __init__(self, search: Search):
        self.search = search
        super().__init__(_no_fit_message(search))


def _no_fit_message(search: Search) -> str:
    closest = search.closest()
    head = (f"no plan fits the model ({_count(search.config.model.param_counts()['total'])} parameters) on "
            f"{search.devices} x {search.cluster.gpu} ({search.cluster.memory_gib:g} GiB, keeping {HEADROOM:.0%} free)")
    if closest is None:
        reasons = sorted({e.reason for e in search.rejected})[:3]
        fewer = next((n for n in range(search.devices - 1, 0, -1) if any(
            estimate(search.config, p, search.cluster.with_devices(n)).memory is not None
            for layout in layouts(n) for p in candidates(search.config, layout, 0)[:1])), None)
        hint = (f"\n{fewer} GPUs divide it (--devices {fewer}, or that many devices)" if fewer else "")
        return head + ": no layout divides the model:\n  - " + "\n  - ".join(reasons) + hint
    m = closest.memory
    lacks = m.total - search.budget_bytes
    return (f"{head}. Closest: {closest.plan.describe()} needs {m.total / GIB:.1f} GiB per GPU "
            f"(params {m.params / GIB:.1f}, optimizer {m.optimizer / GIB:.1f}, peak temporaries "
            f"{m.temporaries / GIB:.1f} at {m.peak_at}), {lacks / GIB:.1f} GiB more than the "
            f"{search.budget_bytes / GIB:.1f} GiB available. Use more GPUs, GPUs with more memory, "
            "a smaller model or a shorter sequence")


def layouts(devices: int) -> list[Layout]:
    """Every (data, expert, tensor) whose product is `devices`."""
    divisors = [k for k in range(1, devices + 1) if devices % k == 0]
    return [(d, e, devices // (d * e)) for d in divisors for e in divisors if devices % (d * e) == 0]


def stage_counts(config: TrainConfig, devices: int) -> list[int]:
    """Stage counts worth trying: 1, and each S > 1 that divides the devices and the scanned units."""
    m = config.model
    unit = m.moe_every if m.num_experts else 1
    units = m.n_layers // unit if m.n_layers % unit == 0 else 0
    return [1] + [s for s in range(2, devices + 1) if devices % s == 0 and units and units % s == 0]


def candidates(config: TrainConfig, layout: Layout, tile_size: int = DEFAULT_TILE, stage: int = 1) -> list[Plan]:
    """The switch settings worth trying on a layout (DTD only where it acts: expert > 1 and tensor > 1).

    With `stage` > 1 each setting is tried with S, 2S, 4S and 8S microbatches
    (those that split the micro-batch over data x expert), GPipe and the
    circular schedule with 2 runs of layers per stage (where the stages x 2
    divide the scanned units: `estimate` rejects the others). The trainer
    keeps the circular schedule's units stage-major, so it moves no weights.
    """
    d, e, t = layout
    batch = config.data.batch_size
    accums = [a for a in range(1, batch + 1) if batch % a == 0 and (batch // a) % (d * e) == 0]
    dtds = (False, True) if e > 1 and t > 1 and config.model.num_experts else (False,)
    tiles = (0, tile_size) if tile_size else (0,)
    # ZeRO-2 differs from ZeRO-1 only with micro-batches (the running sum); zero1=false pins ZeRO off.
    zeros = (1, 2, 3) if config.optimizer.zero1 else (1,)
    plans = [Plan(d, e, t, dtd, remat, tile, accum, zero)
             for accum in accums or [1] for dtd in dtds for remat in REMATS for tile in tiles for zero in zeros
             if zero != 2 or accum > 1]
    if stage == 1:
        return plans
    repeats = (1, 2)
    # ZeRO-2 pays off with the pipeline's microbatches as with micro-batches
    plans += [Plan(d, e, t, dtd, remat, tile, accum, 2) for accum in accums or [1] for dtd in dtds
              for remat in REMATS for tile in tiles if accum == 1 and config.optimizer.zero1]
    out = []
    for p in plans:
        micro = batch // p.grad_accum
        out += [dataclasses.replace(p, stage=stage, microbatches=k * stage, repeats=r)
                for k in (1, 2, 4, 8) for r in repeats
                if micro % (k * stage) == 0 and (micro // (k * stage)) % (d * e) == 0]
    return out


def estimate(config: TrainConfig, plan: Plan, cluster: Cluster, budget_bytes: int | None = None) -> Estimate:
    """Memory, traffic and time of `plan` for `config` on `cluster`; rejected if it does not divide or fit."""
    problems = []
    try:  # (a config may refuse a plan's stages itself)
        planned = plan.apply(config)
        problems = pipeline_problems(planned)
        if not problems:  # one stage's micro-batches on the (data, expert, tensor) layout
            view = stage_view(planned)
            check_mesh(view.model, _MeshShape(plan.layout), view.data.micro_batch_size, view.data.seq_len)
    except ValueError as err:
        problems = str(err).split(":\n", 1)[-1].split("\n")
    if problems:
        return Estimate(plan, None, None, {}, "does not divide: " + "; ".join(p.strip(" -") for p in problems))
    traffic = collectives(planned, plan.layout)
    mem = memory(planned, plan.layout)
    timing = step_time(planned, cluster, plan.layout, traffic)
    budget = int(cluster.memory_gib * GIB * (1 - HEADROOM)) if budget_bytes is None else budget_bytes
    reason = ""
    if mem.total > budget:
        reason = (f"needs {mem.total / GIB:.1f} GiB per GPU, {budget / GIB:.1f} GiB available "
                  f"(peak at {mem.peak_at})")
    return Estimate(plan, mem, timing, summarize(traffic), reason)


def search(config: TrainConfig, cluster: Cluster, devices: int | None = None, *,
           tile_size: int = DEFAULT_TILE, fixed: dict | None = None, stages: bool = False) -> Search:
    """Every plan for `config` on `devices` GPUs of `cluster` (default all of them), ranked by step time.

    `fixed` pins switches, e.g. {"remat": "cac", "dtd": True}, or a layout
    {"data": 2}; the rest is searched. `stages=True` also searches pipeline
    stages (`stage_counts`, and per stage count the microbatches and
    schedules of `candidates`): several times the plans.
    """
    devices = devices or cluster.devices
    if isinstance(devices, bool) or not isinstance(devices, int) or devices < 1:
        raise ValueError(f"devices must be an integer >= 1, got {devices!r}")
    cluster = cluster.with_devices(devices) if devices != cluster.devices else cluster
    budget = int(cluster.memory_gib * GIB * (1 - HEADROOM))
    fixed = fixed or {}
    unknown = set(fixed) - {f.name for f in dataclasses.fields(Plan)}
    if unknown:
        raise ValueError(f"search(fixed=...) names unknown plan fields {sorted(unknown)}")
    pool, rejected = [], []
    untiled: dict[Plan, Estimate] = {}
    grid = [(stage, layout) for stage in (stage_counts(config, devices) if stages else [1])
            for layout in layouts(devices // stage)]
    for stage, layout in grid:
        for plan in candidates(config, layout, tile_size, stage):
            if any(getattr(plan, k) != v for k, v in fixed.items()):
                continue
            est = estimate(config, plan, cluster, budget)
            base = untiled.get(dataclasses.replace(plan, tile_size=0))
            if plan.tile_size and base is not None and base.memory is not None \
                    and est.memory.total >= base.memory.total:
                continue  # tiling changes nothing here: the plan without it stands for both
            if not plan.tile_size:
                untiled[plan] = est
            (pool if est.fits else rejected).append(est)
    pool.sort(key=lambda e: (e.step_s, e.memory.total, e.plan))
    return Search(config, cluster, devices, pool, rejected, budget)


# --------------------------------------------------------------------------- #
# the model against a compiled program


@dataclasses.dataclass(frozen=True)
class Measured:
    """What XLA compiled for one step: collectives per (kind, axes) and memory_analysis, per device."""

    traffic: dict  # (kind, axes) -> {"count", "result_bytes", "sent_bytes"}: what the model predicts exactly
    xla_choice: dict  # XLA_CHOOSES key -> {(kind, axes): {...}}: the gradients XLA partitions its own way
    memory: dict  # tedjax.analysis.memory_report

    @property
    def memory_bytes(self) -> int:
        """arguments + temporaries (what `Memory.total` predicts)."""
        return self.memory["argument_bytes"] + self.memory["temp_bytes"]


def measure(config: TrainConfig, mesh, compiled=None) -> Measured:
    """Compile the train step for `config` on `mesh` (or read `compiled`) and split its collectives.

    Each element of a combined (tuple) collective is attributed to the op that
    produced it (its operand's op_name), so XLA's combining does not hide
    which gradient it carries. Collectives in the gradient-accumulation loop
    count once per micro-batch.
    """
    import re

    from tedjax import analysis

    if compiled is None:
        from tedjax.trainer import Trainer

        compiled = Trainer(config, mesh).lower_train_step().compile()
    comps, _ = analysis._parse_module(compiled.as_text())
    instrs = {ins.name: ins for body in comps.values() for ins in body}

    def op_name(name: str) -> str:
        ins = instrs.get(name)
        found = analysis._OP_NAME.search(ins.attrs) if ins else None
        return found.group(1) if found else ""

    traffic: dict = {}
    xla_choice: dict = {}
    for c in analysis.collectives(compiled, mesh):
        if c.trivial:
            continue
        weight = c.trip_count if c.in_loop and c.trip_count else 1
        elements = analysis._tuple_elements(c.shape)
        ins = instrs.get(c.name)
        operands = re.findall(r"%([\w.\-]+)", ins.operands) if ins else []
        if c.kind != "all-reduce" or len(elements) == 1 or len(operands) != len(elements):
            elements, operands = [c.shape], [None]  # one op, one name: its own
        for element, operand in zip(elements, operands):
            name = (op_name(operand) if operand else "") or c.op_name  # a combined all-reduce: each producer's
            what = next((w for w, pattern in XLA_CHOOSES.items() if re.search(pattern, name)), None)
            nbytes = analysis.shape_bytes(element)
            row = (xla_choice.setdefault(what, {}) if what else traffic).setdefault(
                (c.kind, c.axes), {"count": 0, "result_bytes": 0, "sent_bytes": 0.0})
            row["count"] += weight
            row["result_bytes"] += weight * nbytes
            row["sent_bytes"] += weight * analysis._sent_bytes(c.kind, nbytes, max(c.group_size, 1))
    return Measured(traffic, xla_choice, analysis.memory_report(compiled))


# The held-out check's space: every switch a config can set, each with the values it is drawn from.
# The base model is configs/tiny.yaml (8 simulated devices); "larger" swaps in a bf16, SwiGLU, top-2 model.
HELD_OUT_LAYOUTS = ((8, 1, 1), (1, 8, 1), (2, 4, 1), (4, 1, 2), (2, 2, 2), (1, 4, 2), (1, 2, 4))
HELD_OUT_SWITCHES = {
    "model.dtd": (False, True),
    "model.remat": REMATS,
    "model.capacity_scope": ("expert", "device"),
    "model.shadow_experts": (0, 1, 2),
    "model.a2a_chunks": (1, 2),
    "model.top_k": (1, 2),
    "model.group_size": (0, 64),
    "model.activation": ("gelu", "swiglu"),
    "model.dtype": ("float32", "bfloat16"),
    "optimizer.tile_size": (0, 4096, 1 << 16),
    "optimizer.zero": (1, 2, 3),
    "data.grad_accum": (1, 2),
    # the model's shape, so that parameters (d_model) or activations (batch) dominate in some cells
    "model.d_model": (128, 256),
    "data.batch_size": (16, 32),
}


STATE_DTYPES = ("float32", "bfloat16")  # optimizer.state_dtype, drawn where tile_size = 0 (held_out_cells)


def held_out_cells(count: int, seed: int = 0) -> list[tuple[Layout, tuple[str, ...]]]:
    """`count` random (layout, overrides of configs/tiny.yaml) over every switch, each one that divides.

    Deterministic in `seed`: tests/test_plan.py checks a fixed sample, benchmarks/planner.py the sweep.
    """
    import random

    from tedjax.config import load_config

    rng, states = random.Random(seed), random.Random(f"state_dtype {seed}")
    base = os.path.join(os.path.dirname(CLUSTER_DIR), "tiny.yaml")
    cells: list = []
    while len(cells) < count:
        layout = rng.choice(HELD_OUT_LAYOUTS)
        overrides = ["data.source=synthetic", *(f"mesh.{a}={n}" for a, n in zip(AXES, layout))]
        overrides += [f"{key}={str(rng.choice(values)).lower()}" for key, values in HELD_OUT_SWITCHES.items()]
        # bf16 moments (untiled only: the config refuses the pair) from a draw of their own, so that the cells
        # drawn before the switch was added keep every other setting
        if "optimizer.tile_size=0" in overrides:
            overrides.append(f"optimizer.state_dtype={states.choice(STATE_DTYPES)}")
        try:
            config = load_config(base, overrides)
            check_mesh(config.model, _MeshShape(layout), config.data.micro_batch_size, config.data.seq_len)
        except ValueError:
            continue  # e.g. chunks that do not split the routing groups: draw again
        cells.append((layout, tuple(overrides[4:])))
    return cells


def comparison(config: TrainConfig, measured: Measured, layout: Layout | None = None,
               backend: Backend = "cpu") -> list[dict]:
    """Rows (kind, axes, predicted and measured result and sent bytes) over every (kind, axes) either has.

    The gradients in XLA_CHOOSES are left out of both sides (see `measured.xla_choice`).
    """
    predicted = summarize(collectives(config, layout, backend), exclude=tuple(XLA_CHOOSES))
    rows = []
    for key in sorted(set(predicted) | set(measured.traffic)):
        p = predicted.get(key, {"result_bytes": 0, "sent_bytes": 0.0})
        q = measured.traffic.get(key, {"result_bytes": 0, "sent_bytes": 0.0})
        rows.append({"kind": key[0], "axes": "+".join(key[1]), "predicted_bytes": p["result_bytes"],
                     "measured_bytes": q["result_bytes"], "predicted_sent": p["sent_bytes"],
                     "measured_sent": q["sent_bytes"], "exact": p["result_bytes"] == q["result_bytes"]})
    return rows


def permute_comparison(config: TrainConfig, compiled, mesh) -> dict:
    """The pipeline's collective-permutes over "stage" in a compiled program against `p2p_bytes` and `p2p_count`.

    Measured: each non-trivial permute over "stage" alone whose result is activations (last dims [L, D]),
    counted once per loop trip, its bytes the result on one device. `exact` when each carries the predicted
    bytes and their number is the predicted one. Other permutes over "stage" (the MoE statistics put back in
    layer order: a few bytes, not in the model) are reported apart. Backend (float32 activations on
    XLA:CPU) from the mesh's devices.
    """
    import re

    from tedjax import analysis

    backend: Backend = "gpu" if mesh.devices.flat[0].platform == "gpu" else "cpu"
    layout = (config.mesh.data, config.mesh.expert, config.mesh.tensor)
    tail = [config.data.seq_len, config.model.d_model]
    count, sizes, other_count, other_bytes = 0, set(), 0, 0
    for c in analysis.collectives(compiled, mesh):
        if c.kind != "collective-permute" or c.trivial or c.axes != ("stage",):
            continue
        times = c.trip_count if c.in_loop and c.trip_count else 1
        dims = [int(d) for d in re.findall(r"\d+", c.shape.split("[", 1)[-1].split("]", 1)[0])]
        if dims[-2:] == tail:
            count += times
            sizes.add(analysis.shape_bytes(c.shape))
        else:
            other_count += times
            other_bytes += times * analysis.shape_bytes(c.shape)
    predicted = p2p_bytes(config, layout, backend)
    return {"predicted_bytes": predicted, "measured_bytes": sorted(sizes), "predicted_count": p2p_count(config),
            "measured_count": count, "other_count": other_count, "other_bytes": other_bytes,
            "exact": sizes == {predicted} and count == p2p_count(config)}


def dry_run(config: TrainConfig, devices: Sequence | None = None, log=print,
            cluster: Cluster | None = None) -> Measured:
    """`train.py --dry-run`: compile the step for `config` on the devices present, train nothing, write nothing.

    Prints per-device memory and collectives per kind and mesh axis as XLA
    compiled them, with the planner's prediction beside (for XLA:CPU when the
    devices are simulated CPUs), and the predicted step time and memory on
    `cluster` (default: the cluster the devices form), with a warning when
    that memory exceeds its GPUs'. `mesh: auto` is resolved first.
    """
    import time

    import jax

    from tedjax.mesh import make_mesh
    from tedjax.trainer import Trainer

    devices = list(jax.devices() if devices is None else devices)
    if config.mesh.auto:
        config = auto_config(config, devices, cluster=cluster, log=log)
    layout = (config.mesh.data, config.mesh.expert, config.mesh.tensor)
    mesh = make_mesh(*layout, devices=devices)
    backend: Backend = "gpu" if devices[0].platform == "gpu" else "cpu"
    trainer = Trainer(config, mesh)  # checks the config against the mesh before compiling
    start = time.perf_counter()
    compiled = trainer.lower_train_step().compile()
    seconds = time.perf_counter() - start
    measured = measure(config, mesh, compiled)
    predicted = memory(config, layout, backend)
    log(f"dry run: {Plan.of(config).describe()} on {len(devices)} {devices[0].platform} devices "
        f"({devices[0].device_kind}); compiled in {seconds:.1f} s; nothing trained or written.")
    missing = unmodelled_line(config, backend)
    if missing:
        log(missing + " (the predictions below leave them out)")
    log("")
    mem = measured.memory
    log("| per device | predicted MiB | compiled MiB | predicted / compiled |")
    log("|---|---:|---:|---:|")
    parts = (f"arguments (params {_mib(predicted.params)}, optimizer {_mib(predicted.optimizer)}, batch "
             f"{_mib(predicted.batch)})", predicted.arguments, mem["argument_bytes"])
    for name, p, q in (parts, (f"temporaries (peak at {predicted.peak_at})", predicted.temporaries, mem["temp_bytes"]),
                       ("total", predicted.total, measured.memory_bytes)):
        log(f"| {name} | {_mib(p)} | {_mib(q)} | {f'{p / q - 1:+.1%}' if q else '-'} |")
    log("")
    log("| collective | mesh axes | predicted MiB sent | compiled MiB sent | bytes |")
    log("|---|---|---:|---:|---|")
    for row in comparison(config, measured, layout, backend):
        same = row["exact"]
        verdict = "equal" if same else (f"differ: {row['predicted_bytes']:,} vs {row['measured_bytes']:,} B "
                                         f"({row['measured_bytes'] - row['predicted_bytes']:+,})")
        log(f"| {row['kind']} | {row['axes']} | {_mib(row['predicted_sent'])} | {_mib(row['measured_sent'])} "
            f"| {verdict} |")
    for what, rows in sorted(measured.xla_choice.items()):
        parts_ = ", ".join(f"{kind} {'+'.join(axes)} {_mib(r['sent_bytes'])} MiB"
                           for (kind, axes), r in sorted(rows.items()))
        log(_wrap(f"{what} (partitioned by XLA's choice, not in the table): {parts_}"))
    if backend == "cpu":
        log("(predicted for XLA:CPU: float32 activations, all-reduce instead of reduce-scatter)")
    named = cluster is not None
    cluster = (cluster.with_devices(len(devices)) if named else cluster_for(devices))
    assumed = "" if named or backend == "gpu" else " (assumed for simulated CPU devices; --cluster to choose)"
    est = Estimate(Plan.of(config), memory(config, layout), step_time(config, cluster, layout), {})
    log("")
    log(_wrap(f"predicted on {len(devices)} x {cluster.gpu} ({cluster.name}){assumed}: " + describe_estimate(est)))
    warning = memory_warning(est.memory, cluster)
    if warning:
        log("warning: " + warning)
    return measured


def memory_warning(mem: Memory, cluster: Cluster) -> str:
    """A sentence when `mem` exceeds one GPU of `cluster` ("" when it fits)."""
    limit = cluster.memory_gib * GIB
    if mem.total <= limit:
        return ""
    return (f"predicted {mem.total / GIB:.2f} GiB per GPU exceeds the {cluster.memory_gib:g} GiB of a {cluster.gpu} "
            f"by {(mem.total - limit) / GIB:.2f} GiB (peak at {mem.peak_at}): it would run out of memory there. "
            "Plan with mesh=auto or `python -m tedjax.plan`.")


# --------------------------------------------------------------------------- #
# mesh: auto, reports, the command line


def spans_nodes(cluster: Cluster, devices: int) -> bool:
    """Whether `devices` GPUs of `cluster` take more than one node: where pipeline stages can keep traffic off
    the network, so `mesh: auto` and `python -m tedjax.plan` search them by default (inside one node they
    rarely pay for their bubble, and the search takes several times longer)."""
    return devices > cluster.gpus_per_node


def auto_config(config: TrainConfig, devices: Sequence | None = None, cluster: Cluster | None = None,
                log=print) -> TrainConfig:
    """`mesh: auto`: `config` with the best plan's layout and switches for `devices` (default jax.devices()).

    Plans for `cluster` (default: the cluster the devices form), with pipeline
    stages when the devices span more than one node (`spans_nodes`). Prints the
    chosen plan, the runner-up and any setting the planner does not model.
    Raises NoPlanFits (a ValueError naming the closest plan and what it
    lacks) before anything is compiled when no plan fits the GPUs' memory.
    """
    import jax

    devices = list(jax.devices() if devices is None else devices)
    named = cluster is not None
    cluster = cluster.with_devices(len(devices)) if named else cluster_for(devices)
    found = search(config, cluster, len(devices), stages=spans_nodes(cluster, len(devices)))
    simulated = devices[0].platform != "gpu" and not named
    assumed = ", assumed for simulated CPU devices; --cluster to choose" if simulated else ""
    missing = unmodelled_line(config)
    if missing:
        log(_wrap(missing + " (plans are ranked without them)"))
    best = found.best
    log(f"mesh: auto on {len(devices)} x {cluster.gpu} ({cluster.name}{assumed}; {len(found.pool)} plans fit, "
        f"{len(found.rejected)} rejected)")
    log(_wrap("  chosen:    " + describe_estimate(best), indent="             "))
    if len(found.pool) > 1:
        log(_wrap("  runner-up: " + describe_estimate(found.pool[1]), indent="             "))
    return best.plan.apply(config)


PRESETS = {"H200": "h200.yaml", "H100": "dgx_h100.yaml", "A100": "dgx_a100_80gb.yaml", "V100": "summit.yaml"}
CLUSTER_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs", "clusters")


def cluster_for(devices: Sequence) -> Cluster:
    """The cluster the devices present form: the preset of their GPU kind (configs/clusters/; DGX-H100
    for other kinds, simulated CPU devices included), with the GPUs per host and the memory limit the
    runtime reports on GPUs."""
    kind = str(getattr(devices[0], "device_kind", "")).upper()
    preset = next((file for key, file in PRESETS.items() if key in kind), "dgx_h100.yaml")
    cluster = Cluster.load(os.path.join(CLUSTER_DIR, preset))
    if getattr(devices[0], "platform", "") == "gpu":
        per_host = sum(1 for d in devices if d.process_index == devices[0].process_index)
        limit = (devices[0].memory_stats() or {}).get("bytes_limit")
        cluster = dataclasses.replace(cluster, gpus_per_node=per_host,
                                      memory_gib=limit / GIB if limit else cluster.memory_gib)
    return cluster.with_devices(len(devices))


WIDTH = 110  # wrap printed paragraphs at this many characters


def _wrap(text: str, indent: str = "  ") -> str:
    import textwrap

    return textwrap.fill(text, WIDTH, subsequent_indent=indent, break_on_hyphens=False, break_long_words=False)


def _mib(n: float) -> str:
    """Every size the planner prints: MiB with 3 decimals."""
    return f"{n / 2**20:,.3f}"


def _size(n: float) -> str:
    return f"{n / GIB:,.2f} GiB"


def _ms(seconds: float) -> str:
    """Every time the planner prints: milliseconds with 2 decimals."""
    return f"{seconds * 1e3:,.2f}"


def describe_estimate(est: Estimate) -> str:
    """One paragraph: the plan, its memory parts (GiB) and its time parts (ms)."""
    m, t = est.memory, est.timing
    comm = ", ".join(f"{axes} {_ms(s)} ({t.links[axes]})" for axes, s in sorted(t.comm_s.items()))
    bubble = f" + bubble {_ms(t.bubble_s)} ms" if t.bubble_s else ""
    return (f"{est.plan.describe()}: {_size(m.total)} per GPU (params {_size(m.params)}, optimizer "
            f"{_size(m.optimizer)}, gradients {_size(m.gradients)}, activations {_size(m.activations)}, peak "
            f"temporaries {_size(m.temporaries)} at {m.peak_at}); step {_ms(t.step_s)} ms = compute "
            f"{_ms(t.compute_s)} ms{bubble} + communication {_ms(sum(t.comm_s.values()))} ms "
            f"({comm or 'none'}; latency {_ms(t.latency_s)} ms of it)")


def _across_nodes_s(timing: Timing) -> float:
    return sum(s for axes, s in timing.comm_s.items() if timing.links[axes] == "inter-node")


def stage_reason(found: Search) -> str:
    """One sentence: why the best plan uses stages or not, against the best plan of the other kind (or, when
    none of that kind fits, the closest)."""
    if not found.pool:
        return ""
    best = found.pool[0]
    staged = best.plan.stage > 1
    other = next((e for e in found.pool if (e.plan.stage > 1) != staged), None)
    if not staged and other is None:
        sized = [e for e in found.rejected if e.plan.stage > 1 and e.memory is not None]
        if not sized:
            return "No stages: no stage count divides both the devices and the scanned layers, or the batch."
        closest = min(sized, key=lambda e: e.memory.total)
        return (f"No stages: no plan with stages fits (closest {closest.plan.describe()} needs "
                f"{closest.memory.total / GIB:.1f} GiB per GPU).")
    pipe = pipeline_of(best.plan.apply(found.config))
    if staged and other is None:
        sized = [e for e in found.rejected if e.plan.stage == 1 and e.memory is not None]
        closest = min(sized, key=lambda e: e.memory.total) if sized else None
        lacking = (f"the closest, {closest.plan.describe()}, needs {closest.memory.total / GIB:.1f} GiB per GPU"
                   if closest else "none divides")
        m = best.memory
        return (f"Why stages: no plan without stages fits ({lacking}, {found.budget_bytes / GIB:.1f} GiB "
                f"available). With {pipe.stages} stages each GPU holds 1/{pipe.stages} of the layers: parameters "
                f"{m.params / GIB:.1f} GiB and optimizer state {m.optimizer / GIB:.1f} GiB, for a bubble of "
                f"{pipe.bubble:.1%} ({_ms(best.timing.bubble_s)} ms).")
    p2p = p2p_bytes(best.plan.apply(found.config) if staged else other.plan.apply(found.config))
    with_, without = (best, other) if staged else (other, best)
    w, wo = with_.timing, without.timing
    verdict = "Why stages" if staged else "No stages"
    return (f"{verdict}: the best plan with stages ({with_.plan.describe()}) takes {_ms(w.step_s)} ms against "
            f"{_ms(wo.step_s)} ms without ({without.plan.describe()}): communication {_ms(sum(w.comm_s.values()))} "
            f"against {_ms(sum(wo.comm_s.values()))} ms, of which across nodes {_ms(_across_nodes_s(w))} against "
            f"{_ms(_across_nodes_s(wo))} ms (the stages pass {_mib(p2p)} MiB per microbatch), for a bubble of "
            f"{_ms(w.bubble_s)} ms; memory {with_.memory.total / GIB:.1f} against "
            f"{without.memory.total / GIB:.1f} GiB per GPU.")


# what one block's forward and backward pass send (the rest of a step is the same with and without the gate)
_OUTSIDE_BLOCKS = frozenset({"embedding lookup", "LM head input gradient", "cross-entropy max, sum and label logit",
                             "loss scalars (LM, aux, z)", "pipeline activations"})


def moe_layer_time(config: TrainConfig, cluster: Cluster, layout: Layout | None = None) -> Timing:
    """Predicted seconds of one MoE block (attention and MoE FFN) over a step: its matmuls forward and backward
    (the FLOPs of two MoE blocks less one) and the collectives of its activations, all-to-alls priced as
    `step_time` does; its gradients' reduction, the same with and without the gate, left out."""
    layout = layout or (config.mesh.data, config.mesh.expert, config.mesh.tensor)
    one, two = (dataclasses.replace(config, model=dataclasses.replace(config.model, n_layers=n, moe_every=1),
                                    mesh=dataclasses.replace(config.mesh, stage=1)) for n in (1, 2))
    traffic = [t for t in collectives(one, layout) if t.what not in COMBINED and t.what not in _OUTSIDE_BLOCKS]
    timing = step_time(one, cluster, layout, traffic)
    compute = (flops_per_device(two, layout) - flops_per_device(one, layout)) / cluster.peak_flops(
        resolve_dtype(config.model.dtype, "gpu"))
    return dataclasses.replace(timing, compute_s=compute)


def topology_line(config: TrainConfig, est: Estimate, cluster: Cluster) -> str:
    """What FasterMoE's topology-aware gate with the hierarchical all-to-all would do to `est`'s step time:
    the cost model's r (`balance.TopologyCostModel.propose_remote_fraction`) and the predicted step with and
    without. "" for a model without experts or a plan without an expert axis."""
    planned, layout = est.plan.apply(config), est.plan.layout
    if not config.model.num_experts or layout[1] == 1:
        return ""
    if not expert_nodes(layout, config.mesh.node_size or cluster.gpus_per_node, est.plan.stage):
        return (f"Across nodes: nodes of {cluster.gpus_per_node} GPUs split the expert axis ({layout[1]}) unevenly; "
                "the hierarchical all-to-all needs whole runs of expert ranks per node.")
    topo = topology_model(planned, cluster, layout)
    if topo.nodes == 1:
        return "Across nodes: the expert axis stays inside one node; model.a2a and model.remote_fraction change nothing."
    r = topo.propose_remote_fraction()
    flat = dataclasses.replace(planned, model=dataclasses.replace(planned.model, a2a="flat", remote_fraction=1.0))
    gated = dataclasses.replace(planned, model=dataclasses.replace(planned.model, a2a="hierarchical", remote_fraction=r))
    t_flat, t_gated = step_time(flat, cluster, layout).step_s, step_time(gated, cluster, layout).step_s
    return (f"Across nodes: the expert axis spans {topo.nodes} nodes of {topo.node_devices} expert ranks. With "
            f"model.a2a=hierarchical and model.remote_fraction={r:.2f} (the cost model's r: the network phase "
            f"as long as the NVLink one at r = {topo.balanced_fraction():.3f}, floor 0.14), the step is predicted "
            f"{_ms(t_gated)} ms against {_ms(t_flat)} ms flat ({t_flat / t_gated:.2f}x).")


def _count(n: int) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.1f}M"


def pool_table(found: Search, top: int = 5) -> str:
    """The pool as a markdown table, best first: memory in GiB, times in ms, both with 2 decimals."""
    title = (f"Plans for {_count(found.config.model.param_counts()['total'])} parameters on {found.devices} x "
             f"{found.cluster.gpu} ({found.cluster.name}, {found.cluster.memory_gib:g} GiB, "
             f"{HEADROOM:.0%} kept free): {len(found.pool)} fit, {len(found.rejected)} rejected.")
    header = ("| rank | data | expert | tensor | dtd | remat | tile | zero | grad_accum | memory GiB | peak at "
              "| step ms | compute ms | communication ms (latency ms) |")
    rule = "|---:|---:|---:|---:|---|---|---:|---:|---:|---:|---|---:|---:|---:|"
    staged = any(e.plan.stage > 1 for e in found.pool + found.rejected)  # searched with stages: their columns
    if staged:
        header, rule = header + " stage | schedule | microbatches | bubble ms |", rule + "---:|---|---:|---:|"
    lines = [_wrap(title, indent=""), "", header, rule]
    for i, est in enumerate(found.pool[:top], 1):
        p, m, t = est.plan, est.memory, est.timing
        row = (f"| {i} | {p.data} | {p.expert} | {p.tensor} | {'yes' if p.dtd else 'no'} | {p.remat} | "
               f"{p.tile_size or '-'} | {p.zero} | {p.grad_accum} | {m.total / GIB:,.2f} | {m.peak_at} | "
               f"{_ms(t.step_s)} | {_ms(t.compute_s)} | {_ms(sum(t.comm_s.values()))} ({_ms(t.latency_s)}) |")
        if staged:
            schedule = "-" if p.stage == 1 else f"circular x{p.repeats}" if p.repeats > 1 else "gpipe"
            row += f" {p.stage} | {schedule} | {p.microbatches or '-'} | {_ms(t.bubble_s)} |"
        lines.append(row)
    if found.pool:
        best = found.pool[0].timing
        lines += ["", _wrap("Communication of rank 1 by mesh axes: " + ", ".join(
            f"{axes} {_ms(sec)} ms ({best.links[axes]})" for axes, sec in sorted(best.comm_s.items())), indent="")]
    return "\n".join(lines) + "\n"


def rejection_summary(found: Search, limit: int = 8) -> str:
    """Why plans were rejected: each distinct reason once, with how many plans it rejected."""
    counts: dict[str, int] = {}
    for est in found.rejected:
        key = est.reason if est.reason.startswith("does not divide") else "does not fit in memory"
        counts[key] = counts.get(key, 0) + 1
    ranked = sorted(counts.items(), key=lambda kv: -kv[1])
    lines = [f"- {n} plan{'s' if n > 1 else ''}: {reason}" for reason, n in ranked]
    return "\n".join(lines[:limit])


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tedjax.plan", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cluster", required=True, help="cluster preset (configs/clusters/*.yaml)")
    parser.add_argument("--config", required=True, help="model/training config (configs/*.yaml)")
    parser.add_argument("--devices", type=int, default=None,
                        help="GPUs to plan for (default: one node of the cluster, gpus_per_node)")
    parser.add_argument("--top", type=int, default=5, help="plans to show (default 5)")
    parser.add_argument("--stages", action=argparse.BooleanOptionalAction, default=None,
                        help="search pipeline stages too (mesh.stage, pipeline.*), SmartMoE's fourth axis (several "
                        "times the plans, so slower); default: when the GPUs span more than one node")
    parser.add_argument("overrides", nargs="*", help="key.sub=value overrides of the config (not of what the planner "
                        "chooses: mesh, model.dtd, model.remat, optimizer.tile_size, optimizer.zero, data.grad_accum)")
    args = parser.parse_args(argv)
    from tedjax.config import load_config

    try:
        cluster = Cluster.load(args.cluster)
        pinned = [o for o in args.overrides if o.split("=")[0].strip() in PLANNED]
        if pinned:
            raise ValueError(f"the planner chooses {', '.join(sorted(PLANNED))}; drop the override(s) {pinned}")
        config = load_config(args.config, [*args.overrides, "mesh=auto"])
        if args.top < 1:
            raise ValueError(f"--top must be >= 1, got {args.top}")
        devices = args.devices or cluster.gpus_per_node
        if args.devices is None:
            print(f"Planning for {devices} GPUs: one node of {cluster.name} ({cluster.nodes} nodes of "
                  f"{cluster.gpus_per_node}); --devices N for more.")
        missing = unmodelled_line(config)
        if missing:
            print(_wrap(missing + " (plans are ranked without them)", indent=""))
        stages = spans_nodes(cluster, devices) if args.stages is None else args.stages
        found = search(config, cluster, devices, stages=stages)
        print(pool_table(found, args.top))
        if found.rejected:
            print("Rejected:\n" + rejection_summary(found) + "\n")
        print(_wrap("Best: " + describe_estimate(found.best)))
        if len(found.pool) > 1:
            print(_wrap("Runner-up: " + describe_estimate(found.pool[1])))
        for line in (stage_reason(found) if stages else "", topology_line(config, found.best, found.cluster)):
            if line:
                print(_wrap(line))
    except (ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
