"""tedjax.MoE inside a Flax *Linen* model (through `flax.nnx.bridge`), trained with optax on a mesh.

`tedjax.linen.MoE(...)` is the NNX layer wrapped as a Linen submodule
(`nnx.bridge.to_linen`); `moe(x, deterministic=True)` switches it to the eval
capacity factor and no jitter. Its parameters arrive in the Linen variables as
`bridge.NNXMeta` boxes carrying Flax's `out_sharding` metadata (the logical
axes), so `tedjax.linen.init_sharded` creates the expert weights `[E, D, F]`
split over "expert" and "tensor" from the start. The user's own Linen layers
here declare no axes and are replicated, because `replicate_unannotated=True`
asks for that. The optax state follows the same shardings: its moments keep
the boxes, and so the axes, of their parameters.

    python examples/linen_bridge.py          # 8 simulated CPU devices if no accelerator
"""

from __future__ import annotations

import os

if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    # Before jax is imported; ignored when an accelerator is present.
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()

import functools  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import optax  # noqa: E402
from flax import linen as nn  # noqa: E402
from jax.sharding import Mesh, NamedSharding  # noqa: E402

import tedjax  # noqa: E402
from tedjax.data import synthetic_batches  # noqa: E402

VOCAB, D_MODEL, EXPERTS, EXPERT_FF = 64, 32, 8, 64
BATCH, SEQ = 16, 32
AUX_WEIGHT = 0.01
LEARNING_RATE = 1e-2


class LinenMoELM(nn.Module):
    """A Linen LM: embedding, a causal self-attention block, a tedjax MoE FFN, LM head."""

    @nn.compact
    def __call__(self, tokens_bl: jax.Array, train: bool = True) -> tuple[jax.Array, tedjax.MoEStats]:
        x_bld = nn.Embed(VOCAB, D_MODEL)(tokens_bl)
        mask = nn.make_causal_mask(tokens_bl)
        x_bld = x_bld + nn.MultiHeadDotProductAttention(num_heads=4)(nn.LayerNorm()(x_bld), mask=mask)
        moe = tedjax.linen.MoE(D_MODEL, EXPERTS, EXPERT_FF, top_k=2, capacity_factor=1.5, name="moe")
        h_bld, stats = moe(nn.LayerNorm()(x_bld), deterministic=not train)
        return nn.Dense(VOCAB)(nn.LayerNorm()(x_bld + h_bld)), stats


def default_mesh() -> Mesh:
    """(data, expert, tensor) = (2, 2, 2) on 8 devices; smaller meshes on fewer."""
    n = jax.device_count()
    expert = 2 if n % 2 == 0 else 1
    tensor = 2 if n % 4 == 0 else 1
    return tedjax.make_mesh(n // (expert * tensor), expert, tensor)


def loss_fn(params, model: LinenMoELM, batch: dict[str, jax.Array]) -> tuple[jax.Array, jax.Array]:
    logits_blv, stats = model.apply({"params": params}, batch["inputs"])
    lm_loss = optax.softmax_cross_entropy_with_integer_labels(logits_blv, batch["targets"]).mean()
    return lm_loss + AUX_WEIGHT * stats.aux_loss, lm_loss


@functools.partial(jax.jit, static_argnames=("model", "tx"), donate_argnames=("params", "opt_state"))
def train_step(params, opt_state, batch, *, model: LinenMoELM, tx: optax.GradientTransformation):
    (_, lm_loss), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, model, batch)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, lm_loss


def init_sharded(model: LinenMoELM, tx: optax.GradientTransformation, mesh: Mesh, seed: int = 0):
    """(params, opt_state), each array created directly in its sharding."""
    tokens = jnp.zeros((BATCH, SEQ), jnp.int32)
    variables = tedjax.linen.init_sharded(model, mesh, jax.random.key(seed), tokens, replicate_unannotated=True)
    params = variables["params"]
    opt_shardings = tedjax.mesh.state_shardings(jax.eval_shape(tx.init, params), mesh, replicate_unannotated=True)
    with jax.set_mesh(mesh):
        opt_state = jax.jit(tx.init, out_shardings=opt_shardings)(params)
    return params, opt_state


@functools.cache
def _optimizer(learning_rate: float) -> optax.GradientTransformation:
    return optax.adamw(learning_rate)  # one object per rate, so the jitted step (tx is static) is reused


def train(steps: int, mesh: Mesh | None = None, verbose: bool = False):
    """Train for `steps` steps on a learnable synthetic sequence task: (LM losses, params, opt_state)."""
    mesh = mesh or default_mesh()
    model, tx = LinenMoELM(), _optimizer(LEARNING_RATE)
    params, opt_state = init_sharded(model, tx, mesh)
    batch_sharding = NamedSharding(mesh, tedjax.logical_to_spec(("batch", None)))  # rows over ("data", "expert")
    data = synthetic_batches(VOCAB, BATCH, SEQ, seed=0)
    losses = []
    with jax.set_mesh(mesh):  # the MoE's sharding constraints need the mesh
        for step in range(steps):
            batch = jax.device_put(next(data), batch_sharding)
            params, opt_state, lm_loss = train_step(params, opt_state, batch, model=model, tx=tx)
            losses.append(float(lm_loss))
            if verbose and (step % 10 == 0 or step == steps - 1):
                print(f"step {step:3d}  lm loss {losses[-1]:.4f}")
    if verbose:
        w_in = params["moe"]["w_in"].value
        print(f"mesh {dict(mesh.shape)}; expert weights w_in {w_in.shape} sharded as {w_in.sharding.spec}")
    return losses, params, opt_state


def main(steps: int = 50, verbose: bool = False) -> list[float]:
    return train(steps, verbose=verbose)[0]


if __name__ == "__main__":
    main(verbose=True)
