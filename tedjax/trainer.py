"""The training state and the pure, jitted train and eval steps.

`train_step(state, batch) -> (state, metrics)` is one optimizer step: gradient
accumulation over micro-batches, global-norm clipping, the ZeRO (optionally
tiled) AdamW update, and a guard that skips a step whose loss or gradients are
not finite. Evaluation, checkpoints and logging live outside it.

ZeRO levels (`optimizer.zero`): 1 splits Adam's moments over each parameter's
data-parallel group, and under accumulation reduces the gradients once per
step (each device sums its own in lanes, NOTES.md section 3.2); 2 also
accumulates the gradients in those shards (each micro-batch's
reduce-scattered there); 3 also stores the parameters there
(`Trainer.param_shardings`), and XLA all-gathers each where the forward and
the backward use it. `Trainer.model_shardings` is the layers' own layout.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from tedjax import pipeline as pipe
from tedjax.config import TrainConfig, check_mesh
from tedjax.mesh import MESH_AXES, RULES, axis_size, logical_to_spec, resolve_node_size, stage_count, state_shardings
from tedjax.model import Transformer, abstract_model, loss_fn, moe_path, update_balance
from tedjax.moe import EXPERT_WEIGHTS
from tedjax.optim import (
    clip_by_global_norm,
    global_norm,
    learning_rate_schedule,
    make_optimizer,
    opt_state_shardings,
    tiled_adamw_update,
    zero1_shardings,
)


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class TrainState:
    step: jax.Array  # int32 []  optimizer steps taken (skipped ones included)
    params: dict  # float32 master parameters, pure dict
    opt_state: Any
    model_state: dict  # non-parameter module state (router-jitter RNG counters)
    bad_steps: jax.Array  # int32 []  consecutive non-finite steps
    skipped_steps: jax.Array  # int32 []  all skipped steps


class Trainer:
    """Builds the sharded state and compiles the steps for one config on one mesh."""

    def __init__(self, config: TrainConfig, mesh: Mesh):
        self.config, self.mesh = config, mesh
        check_mesh(config.model, mesh, config.data.micro_batch_size, config.data.seq_len)
        self.node_size = resolve_node_size(mesh, config.mesh.node_size)  # refuses a bad one before compiling
        abstract = abstract_model(config.model, config.seed, config.pipeline, self.node_size)
        # the order the state keeps its stacked units in: the circular schedule's stage-major order, so that no
        # step moves weights; checkpoints, placements and balance values are read and written in logical order
        self.units_order = abstract.units_order = pipe.stored_order(stage_count(mesh), config.pipeline.schedule,
                                                                    config.pipeline.repeats)
        graphdef, abstract_params, abstract_rest = nnx.split(abstract, nnx.Param, ...)
        self.graphdef = graphdef
        self.model_shardings = nnx.to_pure_dict(state_shardings(abstract_params, mesh))  # the layers' own layout
        self.abstract_params = jax.tree.map(
            lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), nnx.to_pure_dict(abstract_params)
        )
        self.rest_shardings = nnx.to_pure_dict(state_shardings(abstract_rest, mesh))
        self.schedule = learning_rate_schedule(config.optimizer, config.steps)
        self.tx = make_optimizer(config.optimizer, config.steps)
        self.zero1_shardings = zero1_shardings(self.abstract_params, self.model_shardings, mesh, config.optimizer.zero1)
        # Where the state's parameters live: ZeRO-3 stores them in the optimizer state's shards, and XLA
        # all-gathers each where the forward and backward use it.
        self.param_shardings = self.zero1_shardings if config.optimizer.zero == 3 else self.model_shardings
        self.opt_shardings = opt_state_shardings(
            self.tx, self.abstract_params, self.model_shardings, mesh, config.optimizer.zero1
        )
        replicated = NamedSharding(mesh, PartitionSpec())
        self.state_shardings = TrainState(
            step=replicated,
            params=self.param_shardings,
            opt_state=self.opt_shardings,
            model_state=self.rest_shardings,
            bad_steps=replicated,
            skipped_steps=replicated,
        )
        # [grad_accum, micro_batch, L]
        self.batch_sharding = NamedSharding(mesh, logical_to_spec((None, "batch", None)))
        # the stacked MoE variables (MoE layer k at index k of their leading "layers" axis); None without experts
        self.moe_path = moe_path(config.model) if config.model.n_moe_layers else None
        self.n_moe = config.model.n_moe_layers
        self.lanes, self.lane_dims, self.lane_shardings = self._lanes()
        step_fn = functools.partial(
            train_step, graphdef=graphdef, tx=self.tx, config=config, trainer_static=self._static()
        )
        # The layers read the mesh while tracing (pools, DTD), so the steps always run under this one.
        self.train_step = OnMesh(jax.jit(step_fn, donate_argnums=0, out_shardings=(self.state_shardings, replicated)),
                                 mesh)
        self.move_experts = OnMesh(jax.jit(self._move_experts, donate_argnums=0, out_shardings=self.state_shardings),
                                   mesh)
        # one layer's move (rebalance moves only the layers that adopt a placement); compiled on first use
        self._move_layer = OnMesh(jax.jit(self._move_layers, static_argnums=2, donate_argnums=0,
                                          out_shardings=self.state_shardings), mesh)
        self._move_compiled: dict[int, Any] = {}
        self._placed: dict[str, Any] = {}  # the last placement decision's clock and loads, a move's wall time
        self._rates = None  # the shadow cost model's (tedjax.balance.Rates), resolved on first use
        self.eval_step = OnMesh(jax.jit(functools.partial(eval_step, graphdef=graphdef), out_shardings=replicated),
                                mesh)
        # bool []: the state's parameters are all finite; the loop checks it before every save (compiled on first use)
        self.params_finite = OnMesh(jax.jit(lambda state: all_finite(state.params), out_shardings=replicated), mesh)

    def _static(self) -> _Static:
        return _Static(self.mesh, self.schedule, self.zero1_shardings, self.param_shardings, self.lanes,
                       self.lane_dims, self.lane_shardings)

    def _lanes(self) -> tuple[dict, dict, dict]:
        """(lanes, dims, shardings): per parameter, how many lanes accumulate its gradient locally (1: none), the
        dim of its lane copy `[..., lanes, ...]` and that copy's sharding (NOTES.md section 3.2).

        Lanes are the shards of the parameter's data-parallel group: "batch" for non-expert weights,
        "expert_batch" for expert weights. ZeRO-1 under accumulation gives them to every weight: ZeRO-2/3
        reduce-scatter each micro-batch into their shards, so that no full gradient lives across micro-batches.
        With pipeline stages the scanned units' weights take them under ZeRO-1 and 2 at every `grad_accum`: the
        schedule's iterations are an accumulation loop of their own (ZeRO-2 sums the lanes once per
        micro-batch; ZeRO-3 takes none, since lanes would hold its weights gathered for the whole step).
        Expert weights of shadowed or dropless layers (their own collectives on the weights) take none. The
        scanned units' `[layers, ...]` weights take their lanes at dim 1, so each unit's slice is `[lanes, ...]`.
        """
        config, mesh = self.config, self.mesh
        model = config.model
        expert_lanes = not model.shadow_experts and model.capacity_scope != "dropless"
        is_expert = _expert_weight_tree(self.abstract_params, self.moe_path)
        off = config.data.grad_accum == 1 or config.optimizer.zero != 1
        dims = jax.tree_util.tree_map_with_path(lambda path, _: int(path[0].key == "units"), self.abstract_params)
        # the pipeline would otherwise reduce the units' gradients in each of its R M + S - 1 iterations
        staged = stage_count(mesh) > 1 and config.optimizer.zero != 3

        def lanes_of(expert: bool, dim: int) -> int:
            if (off and not (staged and dim == 1)) or (expert and not expert_lanes):
                return 1
            return axis_size(mesh, "expert_batch" if expert else "batch")

        lanes = jax.tree.map(lanes_of, is_expert, dims)

        def lane_sharding(n, dim, expert, sharding, shape):
            if n == 1:
                return sharding
            spec = list(sharding.spec) + [None] * (len(shape.shape) - len(sharding.spec))
            spec.insert(dim, logical_to_spec(("expert_batch" if expert else "batch",))[0])
            return NamedSharding(mesh, PartitionSpec(*spec))

        shardings = jax.tree.map(lane_sharding, lanes, dims, is_expert, self.model_shardings, self.abstract_params)
        return lanes, dims, shardings

    def _init(self) -> TrainState:
        config = self.config
        model = Transformer(config.model, rngs=nnx.Rngs(config.seed), node_size=self.node_size)
        _, params, rest = nnx.split(model, nnx.Param, ...)
        params, rest = (pipe.reorder_units(nnx.to_pure_dict(t), (1, 1), self.units_order) for t in (params, rest))
        zero = jnp.zeros((), jnp.int32)
        return TrainState(zero, params, self.tx.init(params), rest, zero, zero)

    def stored_units(self, tree: Any) -> Any:
        """A state (or params) tree in logical order -> in the state's stored order (`units_order`), in the same
        shardings: once, at restore or import (a permutation of the units over "stage" with the circular
        schedule; the identity otherwise)."""
        return pipe.reorder_state(tree, (1, 1), self.units_order)

    def logical_units(self, tree: Any) -> Any:
        """`stored_units`' inverse: the state's units in logical order (what checkpoints and Hugging Face hold)."""
        return pipe.reorder_state(tree, self.units_order, (1, 1))

    def init_state(self) -> TrainState:
        """A fresh state, created directly in its shardings (no unsharded copy)."""
        with jax.set_mesh(self.mesh):
            return jax.jit(self._init, out_shardings=self.state_shardings)()

    def abstract_state(self) -> TrainState:
        """ShapeDtypeStructs with shardings: the restore target for checkpoints."""
        shapes = jax.eval_shape(self._init)
        return jax.tree.map(
            lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), shapes, self.state_shardings
        )

    def placements(self, state: TrainState) -> np.ndarray:
        """Each MoE layer's expert placement (logical expert -> physical slot), int `[n_moe, E]` on the host."""
        return self.balance_values(state, "placement")

    def load_means(self, state: TrainState) -> np.ndarray:
        """Each MoE layer's running mean of the expert load, `[n_moe, E]` on the host."""
        return self.balance_values(state, "load_mean")

    def balance_values(self, state: TrainState, name: str) -> np.ndarray:
        """Each MoE layer's balance variable `name` (placement, router_bias, load_mean, shadow_ids), `[n_moe, ...]`
        on the host."""
        if self.moe_path is None:
            return np.zeros((0,))
        return np.array(pipe.to_logical(np.asarray(_at(state.model_state, self.moe_path)[name]),
                                        *self.units_order))  # a writable host copy, MoE layers in logical order

    def _move_experts(self, state: TrainState, placement_ne: jax.Array) -> TrainState:
        """Adopt new placements `[n_moe, E]`: permute every expert weight AND its Adam moments (every layer;
        `_move_layers` for some)."""
        return self._move_layers(state, placement_ne, tuple(range(self.n_moe)))

    def _move_layers(self, state: TrainState, placement_ne: jax.Array, layers: tuple[int, ...]) -> TrainState:
        """Adopt the placements `[n_moe, E]` of MoE `layers` (static): permute their expert weights AND Adam moments.

        Slot s of the new layout takes the expert that placement_ne puts there,
        from the slot it holds now. Optimizer-state leaves of a parameter move
        with it (SmartMoE's public code moves weights only, so Adam's moments
        would belong to another expert after a move). Jitted once; placements
        are runtime values.
        """
        perms = {}
        model_state = jax.tree.map(lambda x: x, state.model_state)
        balance = _at(model_state, self.moe_path)
        for layer in layers:  # at its slot of the stacked MoE variables' leading "layers" axis
            unit = pipe.storage_slot(layer, self.n_moe, self.units_order)
            old_e, new_e = balance["placement"][unit], placement_ne[layer].astype(jnp.int32)
            perms[unit] = old_e[jnp.argsort(new_e)]  # new slot -> the slot its expert leaves
            balance["placement"] = balance["placement"].at[unit].set(new_e)
        is_expert = _expert_weight_tree(state.params, self.moe_path)
        opt_is_expert = optax.tree_map_params(self.tx, lambda _, flag: flag, state.opt_state, is_expert,
                                              transform_non_params=lambda _: False)

        def move(leaf, expert, sharding):
            if not expert:
                return leaf
            spec = PartitionSpec(*tuple(sharding.spec)[1:])  # one layer's slice: [E, ...] by slot
            for layer, perm in perms.items():
                leaf = leaf.at[layer].set(_permute_slots(leaf[layer], perm, spec, self.mesh))
            return leaf

        params = jax.tree.map(move, state.params, is_expert, self.param_shardings)
        opt_state = jax.tree.map(move, state.opt_state, opt_is_expert, self.opt_shardings)
        return dataclasses.replace(state, params=params, opt_state=opt_state, model_state=model_state)

    def balance_due(self, step: int) -> bool:
        """Whether `rebalance` has work after `step` (placement or shadow decisions)."""
        cfg = self.config
        shadows = cfg.model.shadow_experts and step % cfg.balance.shadow_every == 0
        return bool(shadows or (cfg.balance.every and step % cfg.balance.every == 0))

    def balance_rates(self):
        """The shadow cost model's rates (`tedjax.balance.Rates`): resolved, and measured if need be, once."""
        from tedjax import balance

        if self._rates is None:
            self._rates = balance.resolve_rates(self.config, self.mesh)
        return self._rates

    def shadow_cost_model(self):
        """FasterMoE's latency model for this config and mesh (tedjax.balance.ShadowCostModel)."""
        from tedjax import balance

        cfg, data, (_, expert, tensor) = self.config, self.config.data, tuple(self.mesh.shape[a] for a in MESH_AXES)
        m, rates = cfg.model, self.balance_rates()
        return balance.ShadowCostModel(
            d_model=m.d_model, expert_d_ff=m.expert_d_ff // tensor, weight_matrices=3 if m.activation == "swiglu" else 2,
            bytes_per_element=jnp.dtype(m.compute_dtype).itemsize, num_devices=expert,
            tokens_per_step=m.top_k * data.batch_size * data.seq_len / self.mesh.shape["data"],
            flop_rate=rates.matmul_tflops * 1e12, link_bytes_per_s=rates.link_gbytes_per_s * 1e9,
            # static capacity: the busiest expert's or device's buffer sets the time; dropless computes (and on
            # GPU/TPU sends) the rows routed to each device, FasterMoE's own model
            buffers="routed" if m.capacity_scope == "dropless" else m.capacity_scope,
        )  # fmt: skip

    def rebalance(self, state: TrainState, step: int) -> tuple[TrainState, dict]:
        """Host-side balance decisions after `step`, from each layer's recent loads (`tedjax.balance`).

        Shadows first (every balance.shadow_every steps; by the drops they save
        under static capacity, by FasterMoE's cost model with dropless pools):
        a new set is only an int array in the state. Then placement (SmartMoE,
        every balance.every steps) on the loads that still reach the pools,
        shadowed experts counting 0: shadows take the hottest experts out of
        the pools, placement spreads the rest. Returns the new state and every
        layer's decision, adopted or not: {"shadows": [ShadowDecision],
        "placement": [PlacementChange], "move_bytes": bytes one device sent
        moving the adopted layers (only those move; from the compiled move)}.
        """
        from tedjax import balance

        cfg, loads = self.config, self.load_means(state)
        done: dict = {"shadows": [], "placement": [], "move_bytes": 0.0}
        shadow_ne = self.shadow_ids(state)
        if cfg.model.shadow_experts and step % cfg.balance.shadow_every == 0:
            cost, placements = self.shadow_cost_model(), self.placements(state)
            # static capacity: a shadow buys fewer drops, chosen by the drops it saves (MoE.gain_mean); dropless
            # pools drop nothing, so time is what it buys there (FasterMoE's latency policy)
            gains = ([None] * len(loads) if cfg.model.capacity_scope == "dropless"
                     else list(self.balance_values(state, "gain_mean")))
            for layer, (load_e, placement_e) in enumerate(zip(loads, placements)):
                decision = balance.decide_shadows(layer, load_e, placement_e, cfg.model.shadow_experts, cost,
                                                  shadow_ne[layer], gains[layer])
                done["shadows"].append(decision)
                shadow_ne[layer] = decision.ids
            state = self._set_balance(state, "shadow_ids", shadow_ne)
        if cfg.balance.every and step % cfg.balance.every == 0:
            experts = cfg.model.num_experts
            pool_loads = np.stack([np.where(np.isin(np.arange(experts), ids), 0.0, load)
                                   for load, ids in zip(loads, shadow_ne)])
            placements = self.placements(state)
            if self.mesh.shape["expert"] > 1 and 0 not in self._move_compiled:  # its bytes price every move
                self._move_compiled[0] = self._move_layer.lower(state, placements, (0,)).compile()
            move_s = sum(self.move_bytes().values()) / (self.balance_rates().link_gbytes_per_s * 1e9)
            move_s = max(move_s, self._placed.get("move_wall_s", 0.0))
            now, last = time.perf_counter(), self._placed.get("clock")
            step_s = (now - last[0]) / (step - last[1]) if last and step > last[1] else 0.0
            decisions = balance.decide_placements(pool_loads, placements, int(self.mesh.shape["expert"]),
                                                  cfg.balance.margin, self.shadow_cost_model(), cfg.balance.every,
                                                  move_s, pools=self.pool_drops(), step_s=step_s,
                                                  earlier_load_ne=self._placed.get("loads", [])[-2:])
            self._placed.update(clock=(now, step), loads=[*self._placed.get("loads", [])[-1:], pool_loads])
            for d in decisions:
                if d.adopted:
                    placements[d.layer] = d.placement
            placements = jax.device_put(self.check_placements(placements), NamedSharding(self.mesh, PartitionSpec()))
            moved = [d.layer for d in decisions if d.adopted]
            for layer in moved:
                if layer not in self._move_compiled:
                    self._move_compiled[layer] = self._move_layer.lower(state, placements, (layer,)).compile()
            for layer in moved:  # only the layers that change send their experts
                start = time.perf_counter()
                with jax.set_mesh(self.mesh):
                    state = jax.block_until_ready(self._move_compiled[layer](state, placements))
                self._placed["move_wall_s"] = time.perf_counter() - start  # what the next move is priced at
            done["placement"], done["move_s"] = decisions, move_s
            done["move_bytes"] = float(sum(self.move_bytes().values())) * len(moved)
        return state, done

    def pool_drops(self):
        """Static device pools' drops model for placement (`tedjax.balance.PoolDrops`); None unless
        model.capacity_scope is "device" (dropless drops nothing: there placement saves time)."""
        from tedjax import balance
        from tedjax.routing import capacity

        m, d = self.config.model, self.config.data
        if m.capacity_scope != "device":
            return None
        group = m.group_size or d.seq_len
        per_device = m.num_experts // int(self.mesh.shape["expert"])
        pool_rows = per_device * capacity(group, m.num_experts, m.top_k, m.capacity_factor, m.min_capacity)
        return balance.PoolDrops(group * m.top_k, pool_rows)

    def shadow_ids(self, state: TrainState) -> np.ndarray:
        """Each MoE layer's shadow experts, int `[n_moe, R]` on the host (E = an empty slot)."""
        return self.balance_values(state, "shadow_ids")

    def _set_balance(self, state: TrainState, name: str, values_n) -> TrainState:
        """A copy of `state` with each MoE layer's `name` replaced (same sharding, so nothing recompiles)."""
        model_state = jax.tree.map(lambda x: x, state.model_state)
        balance = _at(model_state, self.moe_path)
        values_n = np.asarray(pipe.to_stage_major(np.asarray(values_n, balance[name].dtype), *self.units_order))
        balance[name] = jax.device_put(values_n, balance[name].sharding)
        return dataclasses.replace(state, model_state=model_state)

    def move_bytes(self) -> dict[str, float]:
        """Bytes one device sends to move one MoE layer's experts, by collective kind, from the compiled HLO
        (compiled at the first placement decision; {} before). Every MoE layer has the same shapes."""
        from tedjax import analysis

        if not self._move_compiled:
            return {}
        sent: dict[str, float] = {}
        for c in analysis.collectives(next(iter(self._move_compiled.values())), self.mesh):
            sent[c.kind] = sent.get(c.kind, 0.0) + c.sent_bytes * (c.trip_count or 1)
        return sent

    def check_placements(self, placement_ne) -> np.ndarray:
        """Host-side check of proposed placements; raises a ValueError naming the layer and the fix."""
        placement_ne = np.asarray(placement_ne)
        experts = self.config.model.num_experts
        if placement_ne.shape != (self.n_moe, experts):
            raise ValueError(f"placements must have shape (MoE layers, experts) = {(self.n_moe, experts)}, "
                             f"got {placement_ne.shape}")
        for layer, row in enumerate(placement_ne):
            if sorted(row.tolist()) != list(range(experts)):
                raise ValueError(f"placement of MoE layer {layer} must be a permutation of 0..{experts - 1} "
                                 f"(one slot per expert), got {row.tolist()}")
        return placement_ne.astype(np.int32)

    def shard_batch(self, local_batch: dict) -> dict[str, jax.Array]:
        """This process's rows `[B_local, L]` -> global arrays `[grad_accum, B / grad_accum, L]`."""
        accum = self.config.data.grad_accum

        def one(x):
            x = x.reshape(accum, x.shape[0] // accum, *x.shape[1:])
            global_shape = (accum, x.shape[1] * jax.process_count(), *x.shape[2:])
            return jax.make_array_from_process_local_data(self.batch_sharding, x, global_shape)

        return {k: one(v) for k, v in local_batch.items()}

    def lower_train_step(self, state: TrainState | None = None):
        """The lowered train step (for HLO and memory analysis), from abstract arguments."""
        state = self.abstract_state() if state is None else state
        data = self.config.data
        shape = (data.grad_accum, data.micro_batch_size, data.seq_len)
        batch = {k: jax.ShapeDtypeStruct(shape, jnp.int32, sharding=self.batch_sharding) for k in ("inputs", "targets")}
        with jax.set_mesh(self.mesh):
            return self.train_step.lower(state, batch)


class OnMesh:
    """A jitted function that always traces and runs under `jax.set_mesh(mesh)`: called outside the
    mesh, a layer that reads the mesh while tracing (device pools, DTD) would compute something else."""

    def __init__(self, jitted, mesh: Mesh):
        self.jitted, self.mesh = jitted, mesh

    def __call__(self, *args):
        with jax.set_mesh(self.mesh):
            return self.jitted(*args)

    def lower(self, *args):
        with jax.set_mesh(self.mesh):
            return self.jitted.lower(*args)

    def _cache_size(self) -> int:
        return self.jitted._cache_size()


@dataclasses.dataclass(frozen=True)
class _Static:
    mesh: Mesh
    schedule: Any
    zero1_shardings: Any
    param_shardings: Any
    lanes: Any  # per parameter: lanes of its gradient accumulation (1: none)
    lane_dims: Any  # per parameter: the dim of its lanes (1 under the scanned units' "layers" axis, else 0)
    lane_shardings: Any


def _merge(graphdef, params, model_state) -> Transformer:
    return nnx.merge(graphdef, params, model_state)


def _at(tree: dict, path) -> dict:
    for key in path:
        tree = tree[key]
    return tree


def _permute_slots(leaf: jax.Array, perm_s: jax.Array, spec: PartitionSpec, mesh: Mesh) -> jax.Array:
    """`leaf[perm_s]` along its expert-slot dim 0, with device-local memory.

    `jnp.take` over the sharded dim would all-gather the whole leaf on every
    device (for every layer at once, as XLA schedules it). Instead each device
    receives the other devices' blocks one cyclic shift at a time
    (`ppermute`) and keeps the rows it needs: the bytes of an all-gather, the
    memory of two local blocks. Leaves whose dim 0 is not split over exactly
    the experts' mesh axis fall back to `jnp.take`.
    """
    axis = RULES["experts"]
    entries = tuple(spec) + (None,) * (leaf.ndim - len(spec))
    if not isinstance(axis, str) or entries[0] != axis or mesh.shape[axis] == 1:
        return jnp.take(leaf, perm_s, axis=0)
    devices = int(mesh.shape[axis])

    def local(block, perm):
        rows = block.shape[0]
        here = jax.lax.axis_index(axis)
        source = jax.lax.dynamic_slice_in_dim(perm, here * rows, rows)
        source_device, source_row = source // rows, source % rows
        ring = [(d, (d + 1) % devices) for d in range(devices)]

        def keep_mine(shift, visiting, out):
            mine = (source_device == (here - shift) % devices).reshape((rows,) + (1,) * (block.ndim - 1))
            return jnp.where(mine, jnp.take(visiting, source_row, axis=0), out)

        def step(shift, carry):  # a loop, so one visiting block is alive at a time
            visiting, out = carry
            visiting = jax.lax.ppermute(visiting, axis, ring)
            return visiting, keep_mine(shift, visiting, out)

        out = keep_mine(0, block, jnp.zeros_like(block))
        return jax.lax.fori_loop(1, devices, step, (block, out))[1]

    return jax.shard_map(local, mesh=mesh, in_specs=(PartitionSpec(*entries), PartitionSpec()),
                         out_specs=PartitionSpec(*entries))(leaf, perm_s)


def _expert_weight_tree(params: dict, path: tuple | None) -> dict:
    """A tree like `params`: True at the stacked expert weights (`[n_moe, E, ...]`, E by slot), False elsewhere."""
    is_expert = jax.tree.map(lambda _: False, params)
    if path is not None:
        weights = _at(is_expert, path)
        for name in EXPERT_WEIGHTS:
            if name in weights:
                weights[name] = True
    return is_expert


def train_step(
    state: TrainState, batch: dict[str, jax.Array], *, graphdef, tx, config: TrainConfig, trainer_static: _Static
) -> tuple[TrainState, dict[str, jax.Array]]:
    """One optimizer step on `batch` = {"inputs", "targets"}: int32 `[grad_accum, micro_batch, L]`."""
    static = trainer_static

    def micro_grads(model_state, micro, params=state.params):
        def loss_of(params):
            model = _merge(graphdef, params, model_state)
            loss, metrics = loss_fn(model, micro)
            return loss, (metrics, nnx.to_pure_dict(nnx.split(model, nnx.Param, ...)[2]))

        (_, (metrics, model_state)), grads = jax.value_and_grad(loss_of, has_aux=True)(params)
        return grads, metrics, model_state

    accum, zero = batch["inputs"].shape[0], config.optimizer.zero

    # ZeRO-1: each weight as `[lanes, ...]` copies over its data-parallel group (a local broadcast), so each
    # lane's gradient is a local partial sum, reduced once after the loop (NOTES.md section 3.2)
    def to_lanes(p, n, dim, sharding):
        if n == 1:
            return p
        lanes = jnp.broadcast_to(jnp.expand_dims(p, dim), (*p.shape[:dim], n, *p.shape[dim:]))
        return jax.lax.with_sharding_constraint(lanes, sharding)

    def sum_lanes(grads):
        return jax.tree.map(lambda g, n, dim: g if n == 1 else jnp.sum(g, axis=dim), grads, static.lanes,
                            static.lane_dims)

    params = jax.tree.map(to_lanes, state.params, static.lanes, static.lane_dims, static.lane_shardings)
    if accum == 1:  # (lanes only with pipeline stages: the schedule's iterations accumulate in them)
        grads, metrics, model_state = micro_grads(state.model_state, jax.tree.map(lambda x: x[0], batch), params)
        grads = sum_lanes(grads)
    else:
        accum_shardings = static.lane_shardings if zero == 1 else static.zero1_shardings

        def body(carry, micro):
            grads_sum, model_state, params = carry
            if zero == 3:  # a loop-variant copy: XLA would hoist the (loop-invariant) all-gathers out of the
                params = jax.lax.optimization_barrier(params)  # loop and keep the whole model gathered
            grads, metrics, model_state = micro_grads(model_state, micro, params)
            if zero != 1:  # (ZeRO-2: the pipeline's lanes, summed per micro-batch)
                grads = sum_lanes(grads)
            # ZeRO-1: stays local in the lanes; ZeRO-2/3: reduce-scattered into the optimizer's shards
            grads = jax.lax.with_sharding_constraint(grads, accum_shardings)
            return (jax.tree.map(jnp.add, grads_sum, grads), model_state, params), metrics

        # ZeRO-2/3 accumulate in the optimizer's shards: no full gradient lives across micro-batches
        zeros = jax.lax.with_sharding_constraint(jax.tree.map(jnp.zeros_like, params if zero == 1 else state.params),
                                                 accum_shardings)
        (grads, model_state, _), metrics = jax.lax.scan(body, (zeros, state.model_state, params), batch)
        grads = jax.tree.map(lambda g: g / accum, sum_lanes(grads) if zero == 1 else grads)
        metrics = jax.tree.map(lambda m: jnp.mean(m, axis=0), metrics)

    # ZeRO-1: gradients in the optimizer-state layout (a reduce-scatter, not an all-reduce).
    grads = jax.lax.with_sharding_constraint(grads, static.zero1_shardings)
    params = jax.lax.with_sharding_constraint(state.params, static.zero1_shardings)
    grads, grad_norm = clip_by_global_norm(grads, config.optimizer.grad_clip)
    finite = jnp.isfinite(metrics["loss"]) & jnp.isfinite(grad_norm)
    if config.optimizer.tile_size:
        # Skips a non-finite step inside the update, tile by tile: keeping the old
        # state for a where() afterwards would hold a full copy next to the in-place update.
        new_params, new_opt_state = tiled_adamw_update(
            config.optimizer, static.schedule, grads, state.opt_state, params, static.zero1_shardings, static.mesh,
            finite=finite, param_shardings=static.param_shardings,
        )
        keep = lambda new, old: new
    else:
        updates, new_opt_state = tx.update(grads, state.opt_state, params)
        new_params = optax.apply_updates(params, updates)
        # A finite gradient can still give a non-finite update (a state or setting gone bad): its norm, whose
        # partial sums reduce like the gradient norm's, catches it without a second pass over the parameters.
        finite = finite & jnp.isfinite(global_norm(updates))
        keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)
    new_params = jax.lax.with_sharding_constraint(new_params, static.param_shardings)
    if "expert_load" in metrics:  # outside the gradient: load running means and router biases
        model = _merge(graphdef, state.params, model_state)
        update_balance(model, metrics["expert_load"], bias_rate=config.model.router_bias_rate,
                       load_decay=config.balance.load_decay, shadow_gain_ne=metrics.get("shadow_gain"),
                       gain_decay=config.balance.gain_decay, remote_excess_n=metrics.get("remote_excess"),
                       remote_bias_rate=config.model.remote_bias_rate)
        balanced = nnx.to_pure_dict(nnx.split(model, nnx.Param, ...)[2])
        model_state = jax.tree.map(lambda new, old: jnp.where(finite, new, old), balanced, model_state)

    new_state = TrainState(
        step=state.step + 1,
        params=keep(new_params, state.params),
        opt_state=keep(new_opt_state, state.opt_state),
        model_state=model_state,
        bad_steps=jnp.where(finite, 0, state.bad_steps + 1),
        skipped_steps=state.skipped_steps + (~finite).astype(jnp.int32),
    )
    metrics = dict(metrics, grad_norm=grad_norm, learning_rate=static.schedule(state.step), skipped=~finite,
                   bad_steps=new_state.bad_steps, skipped_total=new_state.skipped_steps)
    return new_state, metrics


def all_finite(tree) -> jax.Array:
    """bool []: every float leaf of `tree` is finite (checked before every save, outside the train step)."""
    leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.floating)]
    return jnp.all(jnp.stack(leaves)) if leaves else jnp.bool_(True)


def eval_step(params: dict, model_state: dict, batch: dict[str, jax.Array], *, graphdef) -> dict[str, jax.Array]:
    """Validation metrics on `[B, L]` batches, with the eval capacity factor and no jitter."""
    model = _merge(graphdef, params, model_state)
    model.eval()
    _, metrics = loss_fn(model, batch)
    return metrics
