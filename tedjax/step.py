"""A custom loop's train step: one compile, pinned shardings, donation, ZeRO-1 optimizer state.

    step = tedjax.train_step_fn(loss_fn, optax.adamw(1e-3), mesh)   # loss_fn(model, batch) -> loss
    opt_state = step.init(model)          # shards the model in place; optax state split over data
    for batch in batches:
        loss, opt_state = step(model, opt_state, batch)   # the model's parameters are updated in place

A plain `jax.jit` step often compiles twice (a functional optax step did, on
steps 1 and 2): the shardings XLA picks for its outputs differ from those of
the first inputs, so the second call sees new argument shardings. Here the parameters, the other model state and the
optimizer state go in and come out in fixed shardings and are donated, so the
step compiles once. The optimizer state follows ZeRO-1 as in `Trainer`
(`tedjax.optim.zero1_shardings` / `zero1_update`, the same code).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding

from tedjax.mesh import RULES, axis_size, logical_to_spec, state_shardings
from tedjax.optim import opt_state_shardings, zero1_shardings, zero1_update
from tedjax.sharding import shard, use_mesh


class TrainStep:
    """`loss_fn(model, batch) -> loss` (or `(loss, aux)` with `has_aux`) as one compiled, sharded step.

    `init(model)` places the model on the mesh and returns the optax state in
    its ZeRO-1 shardings. `step(model, opt_state, batch)` returns
    `(loss, new_opt_state)` (`((loss, aux), new_opt_state)` with `has_aux`)
    and writes the new parameters and model state (RNG counters, running
    statistics) into `model`. The arrays passed in are donated. Batch leaves
    `[B, ...]` are split over the "batch" logical axis; host numpy is fine.
    """

    def __init__(
        self,
        loss_fn: Callable[..., Any],
        tx: optax.GradientTransformation,
        mesh: Mesh,
        *,
        zero1: bool = True,
        has_aux: bool = False,
        replicate_unannotated: bool = False,
        zero: int = 1,
    ):
        if zero not in (1, 2, 3) or isinstance(zero, bool):
            raise ValueError(f"zero must be 1, 2 or 3, got {zero!r}")
        if zero > 1 and not zero1:
            raise ValueError(f"zero={zero} splits into the optimizer state's shards, which zero1=False turns off; "
                             "pass zero1=True or zero=1")
        self.loss_fn, self.tx, self.mesh = loss_fn, tx, mesh
        self.zero1, self.has_aux, self.replicate_unannotated = zero1, has_aux, replicate_unannotated
        self.zero = zero
        self.batch_sharding = NamedSharding(mesh, logical_to_spec(("batch",)))
        self._bound: tuple | None = None  # (graphdef, shardings, jitted step) of the model last seen
        self._batch_shapes: tuple | None = None

    def init(self, model: nnx.Module) -> Any:
        """Shard `model` in place and return `tx.init` of its parameters, created in the ZeRO-1 shardings.

        With `zero=3` the model's parameters are then stored in those shards too.
        """
        shard(model, self.mesh, replicate_unannotated=self.replicate_unannotated)
        shardings = self._bind(model)[1]
        if self.zero == 3:
            _, params, _ = self._split(model)
            nnx.update(model, jax.device_put(params, shardings["params"]))
        _, params, _ = self._split(model)
        opt_shardings = shardings["opt_state"]
        with use_mesh(self.mesh):
            return jax.jit(self.tx.init, out_shardings=opt_shardings)(params)

    def __call__(self, model: nnx.Module, opt_state: Any, batch: Any):
        _, shardings, jitted = self._bind(model)
        _, params, rest = self._split(model)
        self._check_batch(batch)
        with use_mesh(self.mesh):
            args = jax.device_put(
                (params, rest, opt_state, batch),
                (shardings["params"], shardings["rest"], shardings["opt_state"], self.batch_sharding),
            )
            new_params, new_rest, new_opt_state, out = jitted(*args)
        nnx.update(model, new_params, new_rest)
        return out, new_opt_state

    def lower(self, model: nnx.Module, opt_state: Any, batch: Any) -> jax.stages.Lowered:
        """The lowered step for these arguments (for `tedjax.analysis`: HLO collectives, memory); runs nothing."""
        _, _, jitted = self._bind(model)
        _, params, rest = self._split(model)
        with use_mesh(self.mesh):
            return jitted.lower(params, rest, opt_state, batch)

    def param_shardings(self, model: nnx.Module) -> dict:
        """{"params", "model", "zero1", "rest", "opt_state"}: the NamedShardings the step pins, as pure dicts /
        optax trees. "params" is where the parameters live between steps: "model" (the layers' own layout), or
        "zero1" with `zero=3`."""
        return self._bind(model)[1]

    @staticmethod
    def _split(model: nnx.Module):
        graphdef, params, rest = nnx.split(model, nnx.Param, ...)
        return graphdef, nnx.to_pure_dict(params), nnx.to_pure_dict(rest)

    def _bind(self, model: nnx.Module) -> tuple:
        """Shardings and the jitted step for this model's structure (built once, reused while it stays the same)."""
        graphdef, params_state, rest_state = nnx.split(model, nnx.Param, ...)
        if self._bound is not None and self._bound[0] == graphdef:
            return self._bound
        mesh = self.mesh
        with use_mesh(mesh):
            flag = self.replicate_unannotated
            model_sh = nnx.to_pure_dict(state_shardings(params_state, mesh, replicate_unannotated=flag))
            rest_sh = nnx.to_pure_dict(state_shardings(rest_state, mesh, replicate_unannotated=flag))
        abstract_params = jax.tree.map(
            lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), nnx.to_pure_dict(params_state)
        )
        zero1_sh = zero1_shardings(abstract_params, model_sh, mesh, self.zero1)
        opt_sh = opt_state_shardings(self.tx, abstract_params, model_sh, mesh, self.zero1)
        # ZeRO-3: parameters stored in the optimizer's shards, all-gathered by XLA where the layers use them.
        # ZeRO-2 is ZeRO-1 here: with no accumulation, the gradients go straight into those shards already.
        param_sh = zero1_sh if self.zero == 3 else model_sh
        shardings = {"params": param_sh, "model": model_sh, "zero1": zero1_sh, "rest": rest_sh, "opt_state": opt_sh}
        loss_fn, tx, has_aux = self.loss_fn, self.tx, self.has_aux

        def step(params, rest, opt_state, batch):
            def loss_of(params):
                model = nnx.merge(graphdef, params, rest)
                out = loss_fn(model, batch)
                loss, aux = out if has_aux else (out, None)
                return loss, (aux, nnx.to_pure_dict(nnx.split(model, nnx.Param, ...)[2]))

            (loss, (aux, new_rest)), grads = jax.value_and_grad(loss_of, has_aux=True)(params)
            new_params, new_opt_state = zero1_update(tx, grads, opt_state, params, zero1_sh, param_sh)
            return new_params, new_rest, new_opt_state, ((loss, aux) if has_aux else loss)

        batch_sh = self.batch_sharding
        jitted = jax.jit(
            step,
            in_shardings=(param_sh, rest_sh, opt_sh, batch_sh),
            out_shardings=(param_sh, rest_sh, opt_sh, None),  # None: XLA picks the loss's layout
            donate_argnums=(0, 1, 2),
        )
        self._bound = (graphdef, shardings, jitted)
        return self._bound

    def _check_batch(self, batch: Any) -> None:
        """Every batch leaf must split evenly over the batch shards (checked when the shapes change)."""
        shapes = tuple(tuple(getattr(x, "shape", ())) for x in jax.tree.leaves(batch))
        if shapes == self._batch_shapes:
            return
        ways = axis_size(self.mesh, "batch")
        for path, x in jax.tree_util.tree_leaves_with_path(batch):
            shape = tuple(getattr(x, "shape", ()))
            if not shape or shape[0] % ways:
                axes = (RULES["batch"],) if isinstance(RULES["batch"], str) else tuple(RULES["batch"] or ())
                sizes = " x ".join(f"{a}={self.mesh.shape[a]}" for a in axes)
                raise ValueError(
                    f"batch leaf {jax.tree_util.keystr(path) or 'batch'} of shape {shape}: its leading (batch) dim "
                    f"must be a multiple of the {ways} batch shards ({sizes}); use a batch size that is "
                    f"a multiple of {ways}"
                )
        self._batch_shapes = shapes


def train_step_fn(
    loss_fn: Callable[..., Any],
    tx: optax.GradientTransformation,
    mesh: Mesh,
    *,
    zero1: bool = True,
    has_aux: bool = False,
    replicate_unannotated: bool = False,
    zero: int = 1,
) -> TrainStep:
    """A `TrainStep` for `loss_fn(model, batch)`: compiles once, donates, and keeps optax state ZeRO-1 sharded.

    `zero1=True` splits each parameter's optimizer state over its
    data-parallel group (non-expert parameters over ("data", "expert"), expert
    parameters over "data"), as `Trainer` does. `replicate_unannotated=True`
    replicates parameters that declare no sharding instead of raising. `zero=3`
    also stores the parameters split over that group (FSDP; the model holds
    them so between steps), `zero=2` is `zero=1` here (no accumulation).
    """
    return TrainStep(loss_fn, tx, mesh, zero1=zero1, has_aux=has_aux, replicate_unannotated=replicate_unannotated,
                     zero=zero)
