"""Sharding read from Flax's own metadata (NNX and Linen), the sharding helpers, the step helper's checks."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import linen as nn
from flax import nnx
from jax.sharding import PartitionSpec as P

import tedjax
from tedjax.mesh import param_spec, state_shardings

init = nnx.initializers


@pytest.fixture(scope="module")
def mesh():
    return tedjax.make_mesh(2, 2, 2)


def specs(tree, mesh, **kwargs):
    return jax.tree.map(lambda s: s.spec, state_shardings(tree, mesh, **kwargs))


# NNX metadata


def test_tedjax_parameters_declare_axes_the_flax_way(mesh):
    moe = tedjax.MoE(16, 8, 32, rngs=nnx.Rngs(0))
    flax_specs = nnx.get_partition_spec(nnx.state(moe, nnx.Param))
    assert flax_specs["w_in"].get_value() == P("experts", "embed", "ffn")
    assert moe.w_in.get_metadata()["out_sharding"] == ("experts", "embed", "ffn")
    with nnx.logical_axis_rules(tedjax.mesh.flax_rules()):  # Flax maps them through tedjax's table
        named = nnx.get_named_sharding(nnx.state(moe, nnx.Param), mesh)
    assert named["w_in"].get_value().spec == P("expert", None, "tensor")
    assert specs(nnx.state(moe, nnx.Param), mesh)["w_in"] == P("expert", None, "tensor")


def test_with_partitioning_logical_and_mesh_names(mesh):
    class User(nnx.Module):
        def __init__(self, rngs):
            self.logical = nnx.Param(jnp.ones((4, 8)), out_sharding=("embed", "ffn"), eager_sharding=False)
            self.by_mesh = nnx.Param(jnp.ones((4, 8)), out_sharding=("data", "tensor"), eager_sharding=False)
            self.grouped = nnx.Param(jnp.ones((8, 4)), out_sharding=(("data", "expert"), None), eager_sharding=False)
            self.batch_like = nnx.Param(jnp.ones((8, 4)), out_sharding=("batch", None), eager_sharding=False)

    got = specs(nnx.state(User(nnx.Rngs(0))), mesh)
    assert got["logical"] == P(None, "tensor")
    assert got["by_mesh"] == P("data", "tensor")
    assert got["grouped"] == P(("data", "expert"), None)
    assert got["batch_like"] == P(("data", "expert"), None)


def test_logical_names_shard_at_creation_under_use_mesh(mesh):
    """Flax's eager sharding of logical names fails under a bare mesh, and works under tedjax.use_mesh."""
    kernel_init = nnx.with_partitioning(init.lecun_normal(), ("embed", "ffn"))
    with jax.set_mesh(mesh), pytest.raises(ValueError, match="embed"):
        nnx.Linear(16, 32, kernel_init=kernel_init, use_bias=False, rngs=nnx.Rngs(0))
    with tedjax.use_mesh(mesh):
        linear = nnx.Linear(16, 32, kernel_init=kernel_init, use_bias=False, rngs=nnx.Rngs(0))
        moe = tedjax.MoE(16, 8, 32, rngs=nnx.Rngs(0))
    assert linear.kernel[...].sharding.spec == P(None, "tensor")
    assert moe.w_in[...].sharding.spec == P("expert", None, "tensor")


def test_unannotated_parameter_is_an_error_unless_asked(mesh):
    linear = nnx.Linear(4, 8, rngs=nnx.Rngs(0))  # no sharding metadata
    # Every undeclared array is listed at once, with how to declare it.
    with pytest.raises(ValueError, match=r"2 array\(s\) have no sharding metadata: Param at \['bias'\] \(8,\), "
                                         r"Param at \['kernel'\] \(4, 8\).*with_partitioning.*replicate_unannotated"):
        state_shardings(nnx.state(linear), mesh)
    got = specs(nnx.state(linear), mesh, replicate_unannotated=True)
    assert got["kernel"] == P() and got["bias"] == P()


def test_unknown_axis_and_reused_mesh_axis_are_errors(mesh):
    unknown = nnx.Param(jnp.ones((4,)), out_sharding=("hidden",), eager_sharding=False)
    with pytest.raises(KeyError, match="'hidden' is neither a logical axis"):
        param_spec(unknown, mesh)
    twice = nnx.Param(jnp.ones((4, 4)), out_sharding=("heads", "ffn"), eager_sharding=False)  # both "tensor"
    with pytest.raises(ValueError, match="mesh axis 'tensor' on two dims"):
        param_spec(twice, mesh)
    conflict = nnx.Param(jnp.ones((4,)), out_sharding=("embed",), sharding_rules=(("embed", "tensor"),),
                         eager_sharding=False)
    with pytest.raises(ValueError, match="RULES maps it to None"):
        param_spec(conflict, mesh)


def test_runtime_state_and_rng_state(mesh):
    """Non-Param Variables declaring a replicated axis, RNG streams and scalars are replicated."""

    class Counter(nnx.Variable):
        pass

    class Stateful(nnx.Module):
        def __init__(self, rngs):
            self.load = Counter(jnp.zeros((8,)), **tedjax.mesh.axes_metadata(("router_experts",)))
            self.steps = Counter(jnp.zeros((), jnp.int32))
            self.rngs = rngs
            self.moe = tedjax.MoE(16, 8, 32, jitter_eps=0.1, rngs=rngs)

    state = nnx.state(Stateful(nnx.Rngs(0, jitter=1)))
    flat = {jax.tree_util.keystr(k): v for k, v in jax.tree_util.tree_leaves_with_path(specs(state, mesh))}
    assert flat["['load']"] == P(None)
    assert flat["['steps']"] == P()
    assert all(v == P() for k, v in flat.items() if "rngs" in k)
    assert flat["['moe']['w_in']"] == P("expert", None, "tensor")
    for name in ("placement", "router_bias", "load_mean"):  # the MoE's own runtime state, where present
        key = f"['moe']['{name}']"
        assert flat.get(key, P(None)) == P(None)


# Sharding helpers


def test_shard_places_a_model_in_place(mesh):
    moe = tedjax.MoE(16, 8, 32, rngs=nnx.Rngs(0))
    assert moe.w_in[...].sharding.is_fully_replicated
    assert tedjax.shard(moe, mesh) is moe
    assert moe.w_in[...].sharding.spec == P("expert", None, "tensor")
    state = tedjax.shard(nnx.state(tedjax.MoE(16, 8, 32, rngs=nnx.Rngs(0))), mesh)
    assert state["w_out"][...].sharding.spec == P("expert", "tensor", None)


def test_create_sharded_equals_unsharded_values(mesh):
    make = lambda: tedjax.MoE(16, 8, 32, rngs=nnx.Rngs(3))  # noqa: E731
    sharded, plain = tedjax.create_sharded(make, mesh), make()
    assert sharded.w_in[...].sharding.spec == P("expert", None, "tensor")
    np.testing.assert_array_equal(np.asarray(sharded.w_in[...]), np.asarray(plain.w_in[...]))


def test_simulate_cpu_devices_too_late():
    assert jax.device_count() == 8
    tedjax.simulate_cpu_devices(8)  # already so: nothing to do
    with pytest.raises(RuntimeError, match=r"simulate_cpu_devices\(4\) came too late.*XLA_FLAGS"):
        tedjax.simulate_cpu_devices(4)
    with pytest.raises(ValueError, match="positive device count"):
        tedjax.simulate_cpu_devices(0)


# Linen


class LinenLM(nn.Module):
    capacity_factor: float = 0.5
    jitter_eps: float = 0.0

    @nn.compact
    def __call__(self, tokens_bl, train: bool = True):
        embed_init = nn.with_logical_partitioning(nn.initializers.normal(1.0), ("vocab", "embed"))
        x_bld = nn.Embed(64, 16, embedding_init=embed_init)(tokens_bl)
        moe = tedjax.linen.MoE(16, 8, 32, top_k=1, capacity_factor=self.capacity_factor, eval_capacity_factor=8.0,
                               min_capacity=1, jitter_eps=self.jitter_eps, name="moe")
        return moe(x_bld, deterministic=not train)


@pytest.fixture(scope="module")
def tokens():
    return jnp.asarray(np.random.default_rng(0).integers(0, 64, (8, 16)), jnp.int32)


def test_linen_init_sharded_and_linen_standard_path(mesh, tokens):
    model = LinenLM()
    variables = tedjax.linen.init_sharded(model, mesh, jax.random.key(0), tokens)
    params = variables["params"]
    assert params["moe"]["w_in"].value.sharding.spec == P("expert", None, "tensor")
    assert params["Embed_0"]["embedding"].value.sharding.spec == P("tensor", None)
    # Linen's own path with tedjax's rules agrees: the expert weights are not silently replicated.
    abstract = jax.eval_shape(model.init, jax.random.key(0), tokens)
    linen_specs = nn.logical_to_mesh_sharding(nn.get_partition_spec(abstract), mesh, tedjax.mesh.flax_rules())
    assert linen_specs["params"]["moe"]["w_in"].spec == P("expert", None, "tensor")
    assert linen_specs["params"]["Embed_0"]["embedding"].spec == P("tensor", None)


def test_linen_unannotated_is_an_error(mesh, tokens):
    class Plain(nn.Module):
        @nn.compact
        def __call__(self, x):
            return nn.Dense(4)(x)

    with pytest.raises(ValueError, match=r"no sharding metadata: array at \['params'\]\['Dense_0'\]\['bias'\]"):
        tedjax.linen.init_sharded(Plain(), mesh, jax.random.key(0), jnp.ones((8, 4)))


def test_linen_deterministic_switches_capacity_and_jitter(mesh, tokens):
    model = LinenLM(jitter_eps=0.5)
    rngs = {"params": jax.random.key(0), "jitter": jax.random.key(1)}  # the layer jitters in training, init too
    variables = tedjax.linen.init_sharded(model, mesh, rngs, tokens)
    with tedjax.use_mesh(mesh):
        apply = jax.jit(model.apply, static_argnames="train")
        train_out = [apply(variables, tokens, train=True, rngs={"jitter": jax.random.key(s)}) for s in (1, 2)]
        eval_out = [apply(variables, tokens, train=False, rngs={"jitter": jax.random.key(s)}) for s in (1, 2)]
    assert float(train_out[0][1].dropped_fraction) > 0.1  # capacity factor 0.5 drops tokens
    assert float(eval_out[0][1].dropped_fraction) == 0.0  # eval capacity factor 8 keeps them all
    assert not np.allclose(train_out[0][0], train_out[1][0])  # jitter differs by rng in training
    np.testing.assert_array_equal(eval_out[0][0], eval_out[1][0])  # and is off in eval


# The step helper


def test_step_rejects_a_batch_that_does_not_split(mesh):
    moe = tedjax.MoE(16, 8, 32, rngs=nnx.Rngs(0))
    step = tedjax.train_step_fn(lambda m, b: jnp.mean(m(b["x"])[0] ** 2), optax.sgd(0.1), mesh)
    opt_state = step.init(moe)
    with pytest.raises(ValueError, match=r"multiple of the 4 batch shards \(data=2 x expert=2\)"):
        step(moe, opt_state, {"x": np.ones((6, 8, 16), np.float32)})


def test_step_without_zero1_keeps_parameter_layout(mesh):
    moe = tedjax.MoE(16, 8, 32, rngs=nnx.Rngs(0))
    step = tedjax.train_step_fn(lambda m, b: jnp.mean(m(b["x"])[0] ** 2), optax.adam(0.1), mesh, zero1=False)
    opt_state = step.init(moe)
    assert opt_state[0].mu["w_in"].sharding.spec == P("expert", None, "tensor")
    assert step.param_shardings(moe)["zero1"]["w_in"].spec == P("expert", None, "tensor")
    loss, opt_state = step(moe, opt_state, {"x": np.ones((8, 8, 16), np.float32)})
    assert np.isfinite(float(loss)) and moe.w_in[...].sharding.spec == P("expert", None, "tensor")
