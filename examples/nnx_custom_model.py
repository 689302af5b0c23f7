"""tedjax.MoE inside your own Flax NNX model, trained TED-sharded on a device mesh.

The model below is the user's own: flax's `nnx.Embed`, `nnx.MultiHeadAttention`,
`nnx.LayerNorm` and `nnx.Linear`, with one `tedjax.MoE` as the feed-forward
layer. Only the MoE's parameters declare sharding axes, so on the mesh
("data", "expert", "tensor"):

  * the MoE's expert weights `[E, D, F]` are split over "expert" (E) and
    "tensor" (F); its router is replicated;
  * every other parameter declares no axes and is replicated, because
    `create_sharded(..., replicate_unannotated=True)` asks for that explicitly
    (without it, an undeclared parameter is an error that says how to declare it);
  * the batch is split over ("data", "expert"), as tedjax expects.

Parameters *and* the Adam moments (nnx.Optimizer copies each parameter's
metadata to its moments) are created directly in those shardings by
`tedjax.create_sharded`: no unsharded copy exists. The train step is plain
`nnx.jit`; `examples/nnx_partitioned_transformer.py` shards every layer and
uses `tedjax.train_step_fn` (one compile, ZeRO-1 optimizer state) instead.

    python examples/nnx_custom_model.py          # 8 simulated CPU devices if no accelerator
"""

from __future__ import annotations

import os

if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    # Before jax is imported; ignored when an accelerator is present.
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()

import functools  # noqa: E402

import jax  # noqa: E402
import optax  # noqa: E402
from flax import nnx  # noqa: E402
from jax.sharding import Mesh, NamedSharding  # noqa: E402

import tedjax  # noqa: E402
from tedjax.data import synthetic_batches  # noqa: E402

VOCAB, D_MODEL, HEADS, EXPERTS, EXPERT_FF = 64, 32, 4, 8, 64
BATCH, SEQ = 16, 32
AUX_WEIGHT = 0.01  # load-balancing loss weight (the Switch Transformer default)


class MoEBlock(nnx.Module):
    """Pre-norm block: the user's causal self-attention, then a tedjax MoE FFN."""

    def __init__(self, *, rngs: nnx.Rngs):
        self.attn_norm = nnx.LayerNorm(D_MODEL, rngs=rngs)
        self.attn = nnx.MultiHeadAttention(num_heads=HEADS, in_features=D_MODEL, decode=False, rngs=rngs)
        self.ffn_norm = nnx.LayerNorm(D_MODEL, rngs=rngs)
        self.moe = tedjax.MoE(D_MODEL, EXPERTS, EXPERT_FF, top_k=2, capacity_factor=1.5, rngs=rngs)

    def __call__(self, x_bld: jax.Array, mask) -> tuple[jax.Array, tedjax.MoEStats]:
        x_bld = x_bld + self.attn(self.attn_norm(x_bld), mask=mask)
        h_bld, stats = self.moe(self.ffn_norm(x_bld))
        return x_bld + h_bld, stats


class TinyMoELM(nnx.Module):
    """tokens `[B, L]` -> (logits `[B, L, V]`, MoEStats)."""

    def __init__(self, *, rngs: nnx.Rngs):
        self.embed = nnx.Embed(VOCAB, D_MODEL, rngs=rngs)
        self.block = MoEBlock(rngs=rngs)
        self.norm = nnx.LayerNorm(D_MODEL, rngs=rngs)
        self.head = nnx.Linear(D_MODEL, VOCAB, rngs=rngs)

    def __call__(self, tokens_bl: jax.Array) -> tuple[jax.Array, tedjax.MoEStats]:
        x_bld, stats = self.block(self.embed(tokens_bl), nnx.make_causal_mask(tokens_bl))
        return self.head(self.norm(x_bld)), stats


def default_mesh() -> Mesh:
    """(data, expert, tensor) = (2, 2, 2) on 8 devices; smaller meshes on fewer."""
    n = jax.device_count()
    expert = 2 if n % 2 == 0 else 1
    tensor = 2 if n % 4 == 0 else 1
    return tedjax.make_mesh(n // (expert * tensor), expert, tensor)


@functools.cache
def _optimizer(learning_rate: float) -> optax.GradientTransformation:
    return optax.adamw(learning_rate)  # one object per rate, so nnx.jit's cached step is reused


def create_sharded(mesh: Mesh, learning_rate: float = 1e-2, seed: int = 0) -> tuple[TinyMoELM, nnx.Optimizer]:
    """Model and optimizer, every array created in its sharding on `mesh`."""

    def create():
        model = TinyMoELM(rngs=nnx.Rngs(seed))
        return model, nnx.Optimizer(model, _optimizer(learning_rate), wrt=nnx.Param)

    return tedjax.create_sharded(create, mesh, replicate_unannotated=True)


def loss_fn(model: TinyMoELM, batch: dict[str, jax.Array]) -> tuple[jax.Array, jax.Array]:
    """(LM loss + weighted load-balancing loss, LM loss)."""
    logits_blv, stats = model(batch["inputs"])
    lm_loss = optax.softmax_cross_entropy_with_integer_labels(logits_blv, batch["targets"]).mean()
    return lm_loss + AUX_WEIGHT * stats.aux_loss, lm_loss


@nnx.jit
def train_step(model: TinyMoELM, optimizer: nnx.Optimizer, batch: dict[str, jax.Array]) -> jax.Array:
    (_, lm_loss), grads = nnx.value_and_grad(loss_fn, has_aux=True)(model, batch)
    optimizer.update(model, grads)
    return lm_loss


def train(steps: int, mesh: Mesh | None = None, verbose: bool = False):
    """Train for `steps` steps on a learnable synthetic sequence task: (LM losses, model, optimizer)."""
    mesh = mesh or default_mesh()
    model, optimizer = create_sharded(mesh)
    batch_sharding = NamedSharding(mesh, tedjax.logical_to_spec(("batch", None)))  # rows over ("data", "expert")
    data = synthetic_batches(VOCAB, BATCH, SEQ, seed=0)
    losses = []
    with jax.set_mesh(mesh):  # the MoE's sharding constraints (all-to-all over "expert") need the mesh
        for step in range(steps):
            batch = jax.device_put(next(data), batch_sharding)
            losses.append(float(train_step(model, optimizer, batch)))
            if verbose and (step % 10 == 0 or step == steps - 1):
                print(f"step {step:3d}  lm loss {losses[-1]:.4f}")
    if verbose:
        w_in = model.block.moe.w_in[...]
        print(f"mesh {dict(mesh.shape)}; expert weights w_in {w_in.shape} sharded as {w_in.sharding.spec}; "
              f"attention query kernel sharded as {model.block.attn.query.kernel[...].sharding.spec}")
    return losses, model, optimizer


def main(steps: int = 50, verbose: bool = False) -> list[float]:
    return train(steps, verbose=verbose)[0]


if __name__ == "__main__":
    main(verbose=True)
