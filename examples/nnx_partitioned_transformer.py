"""Your own NNX transformer, sharded the Flax way, with tedjax.MoE as its FFN and a ZeRO-1 train step.

Every layer is plain Flax (`nnx.Embed`, `nnx.Linear`, `nnx.LayerNorm`) and
declares its parameter axes with `nnx.with_partitioning`, using the logical
names of `tedjax.mesh.RULES` ("embed", "heads", "vocab", "norm"). The FFN is a
`tedjax.MoE`, whose parameters declare theirs the same way. So on the mesh
("data", "expert", "tensor"):

  * the expert weights `[E, D, F]` are split over "expert" and "tensor" from
    the moment they are created (`tedjax.create_sharded`);
  * attention is split Megatron style: q/k/v columns and the output
    projection's rows over "tensor" (heads), as are the vocab dims;
  * `tedjax.train_step_fn` compiles the step once, donates the state, and
    keeps each parameter's Adam state split over its data-parallel group
    (ZeRO-1): non-expert parameters over ("data", "expert"), experts over "data".

    python examples/nnx_partitioned_transformer.py    # 8 simulated CPU devices if no accelerator
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh

import tedjax
from tedjax.data import synthetic_batches

VOCAB, D_MODEL, HEADS, EXPERTS, EXPERT_FF = 64, 32, 4, 8, 64
BATCH, SEQ = 16, 32
AUX_WEIGHT = 0.01  # load-balancing loss weight (the Switch Transformer default)
LEARNING_RATE = 1e-2


def linear(d_in: int, d_out: int, axes: tuple[str, str], *, rngs: nnx.Rngs) -> nnx.Linear:
    """nnx.Linear whose kernel [d_in, d_out] and bias [d_out] declare their logical axes."""
    return nnx.Linear(
        d_in, d_out, rngs=rngs,
        kernel_init=nnx.with_partitioning(nnx.initializers.lecun_normal(), axes),
        bias_init=nnx.with_partitioning(nnx.initializers.zeros_init(), axes[1:]),
    )  # fmt: skip


def layer_norm(*, rngs: nnx.Rngs) -> nnx.LayerNorm:
    return nnx.LayerNorm(
        D_MODEL, rngs=rngs,
        scale_init=nnx.with_partitioning(nnx.initializers.ones_init(), ("norm",)),
        bias_init=nnx.with_partitioning(nnx.initializers.zeros_init(), ("norm",)),
    )  # fmt: skip


class Attention(nnx.Module):
    """Causal self-attention; the D = H x K columns of q, k, v (and rows of the output) are heads."""

    def __init__(self, *, rngs: nnx.Rngs):
        self.q, self.k, self.v = (linear(D_MODEL, D_MODEL, ("embed", "heads"), rngs=rngs) for _ in range(3))
        self.out = linear(D_MODEL, D_MODEL, ("heads", "embed"), rngs=rngs)

    def __call__(self, x_bld: jax.Array) -> jax.Array:
        batch, length, _ = x_bld.shape
        split = lambda t: t.reshape(batch, length, HEADS, D_MODEL // HEADS)  # noqa: E731
        o_blhk = jax.nn.dot_product_attention(split(self.q(x_bld)), split(self.k(x_bld)), split(self.v(x_bld)),
                                              is_causal=True)
        return self.out(o_blhk.reshape(batch, length, D_MODEL))


class PartitionedLM(nnx.Module):
    """tokens `[B, L]` -> (logits `[B, L, V]`, MoEStats): embed, attention, tedjax MoE FFN, LM head."""

    def __init__(self, *, rngs: nnx.Rngs):
        self.embed = nnx.Embed(
            VOCAB, D_MODEL, rngs=rngs,
            embedding_init=nnx.with_partitioning(nnx.initializers.normal(1.0), ("vocab", "embed")),
        )  # fmt: skip
        self.attn_norm, self.attn = layer_norm(rngs=rngs), Attention(rngs=rngs)
        self.ffn_norm = layer_norm(rngs=rngs)
        self.moe = tedjax.MoE(D_MODEL, EXPERTS, EXPERT_FF, top_k=2, capacity_factor=1.5, rngs=rngs)
        self.final_norm = layer_norm(rngs=rngs)
        self.head = linear(D_MODEL, VOCAB, ("embed", "vocab"), rngs=rngs)

    def __call__(self, tokens_bl: jax.Array) -> tuple[jax.Array, tedjax.MoEStats]:
        x_bld = self.embed(tokens_bl)
        x_bld = x_bld + self.attn(self.attn_norm(x_bld))
        h_bld, stats = self.moe(self.ffn_norm(x_bld))
        return self.head(self.final_norm(x_bld + h_bld)), stats


def loss_fn(model: PartitionedLM, batch: dict[str, jax.Array]) -> tuple[jax.Array, jax.Array]:
    """(LM loss + weighted load-balancing loss, LM loss)."""
    logits_blv, stats = model(batch["inputs"])
    lm_loss = optax.softmax_cross_entropy_with_integer_labels(logits_blv, batch["targets"]).mean()
    return lm_loss + AUX_WEIGHT * stats.aux_loss, lm_loss


def default_mesh() -> Mesh:
    """(data, expert, tensor) = (2, 2, 2) on 8 devices; smaller meshes on fewer."""
    n = jax.device_count()
    expert = 2 if n % 2 == 0 else 1
    tensor = 2 if n % 4 == 0 else 1
    return tedjax.make_mesh(n // (expert * tensor), expert, tensor)


def create(mesh: Mesh, seed: int = 0) -> tuple[PartitionedLM, tedjax.TrainStep, object]:
    """(model, train step, optimizer state): every array created in its sharding on `mesh`."""
    model = tedjax.create_sharded(lambda: PartitionedLM(rngs=nnx.Rngs(seed)), mesh)
    step = tedjax.train_step_fn(loss_fn, optax.adamw(LEARNING_RATE), mesh, zero1=True, has_aux=True)
    return model, step, step.init(model)


def train(steps: int, mesh: Mesh | None = None, verbose: bool = False):
    """Train on a learnable synthetic sequence task: (LM losses, model, step, optimizer state)."""
    mesh = mesh or default_mesh()
    model, step, opt_state = create(mesh)
    data = synthetic_batches(VOCAB, BATCH, SEQ, seed=0)  # host numpy; the step splits rows over the batch shards
    losses = []
    for i in range(steps):
        (_, lm_loss), opt_state = step(model, opt_state, next(data))
        losses.append(float(lm_loss))
        if verbose and (i % 10 == 0 or i == steps - 1):
            print(f"step {i:3d}  lm loss {losses[-1]:.4f}")
    if verbose:
        mu = opt_state[0].mu
        print(f"mesh {dict(mesh.shape)}")
        print(f"expert weights w_in {model.moe.w_in.shape}: {model.moe.w_in[...].sharding.spec}, "
              f"Adam mu {mu['moe']['w_in'].sharding.spec}")
        print(f"attention q kernel {model.attn.q.kernel.shape}: {model.attn.q.kernel[...].sharding.spec}, "
              f"Adam mu {mu['attn']['q']['kernel'].sharding.spec}")
    return losses, model, step, opt_state


def main(steps: int = 50, verbose: bool = False) -> list[float]:
    return train(steps, verbose=verbose)[0]


if __name__ == "__main__":
    tedjax.simulate_cpu_devices(8)  # a stand-in for an 8-accelerator host; remove it on real devices
    main(verbose=True)
