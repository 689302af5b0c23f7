"""tedjax.MoE in a Flax Linen model (through `flax.nnx.bridge`), sharded at init.

    moe = tedjax.linen.MoE(d_model=256, num_experts=8, expert_d_ff=1024, top_k=2, name="moe")
    y_bld, stats = moe(x_bld, deterministic=not train)       # inside your nn.compact __call__
    variables = tedjax.linen.init_sharded(model, mesh, jax.random.key(0), tokens)

The bridged layer's parameters are `bridge.NNXMeta` boxes carrying Flax's
`out_sharding` (the logical axes), so `nn.get_partition_spec` shows them and
`nn.logical_to_mesh_sharding(..., tedjax.mesh.flax_rules())` maps them.
`init_sharded` does that for the whole model, `nn.with_logical_partitioning`
boxes of your own layers included, and creates each variable in its sharding.
"""

from __future__ import annotations

from typing import Any

import jax
from flax import linen as nn
from flax.nnx import bridge
from jax.sharding import Mesh

from tedjax import moe as moe_lib
from tedjax.mesh import state_shardings
from tedjax.sharding import use_mesh


class _SwitchableMoE(moe_lib.MoE):
    """tedjax.MoE whose call takes `deterministic`: Linen rebuilds the NNX layer on every call, so the
    flag is set per call (eval capacity factor and no jitter when True)."""

    def __call__(self, x_bld: jax.Array, deterministic: bool = False):
        self.deterministic = bool(deterministic)
        return super().__call__(x_bld)


def MoE(d_model: int, num_experts: int, expert_d_ff: int, *, name: str | None = None, **kwargs: Any) -> nn.Module:
    """`tedjax.MoE` as a Linen module: `moe(x_bld [B, L, D], deterministic=False) -> (y_bld, MoEStats)`.

    `kwargs` are `tedjax.MoE`'s (top_k, capacity_factor, eval_capacity_factor,
    jitter_eps, ...). With `jitter_eps > 0` pass a "jitter" rng to `apply`.
    """
    return bridge.to_linen(_SwitchableMoE, d_model, num_experts, expert_d_ff, name=name, **kwargs)


def init_sharded(
    module: nn.Module, mesh: Mesh, rngs: Any, *args: Any, replicate_unannotated: bool = False, **kwargs: Any
) -> dict:
    """`module.init(rngs, *args, **kwargs)` with every variable created in its sharding on `mesh`.

    Shardings come from each variable's Flax metadata through
    `tedjax.mesh.RULES` (`tedjax.mesh.state_shardings`). A variable without
    metadata (a plain `nn.Dense` kernel) is an error that says how to declare
    it, unless `replicate_unannotated=True` replicates it on purpose. The
    returned variables keep their boxes, as `module.init` returns them.
    """

    def init(rngs, *args):
        return module.init(rngs, *args, **kwargs)

    with use_mesh(mesh):
        abstract = jax.eval_shape(init, rngs, *args)
        shardings = state_shardings(abstract, mesh, replicate_unannotated=replicate_unannotated)
        return jax.jit(init, out_shardings=shardings)(rngs, *args)
