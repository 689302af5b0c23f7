"""The Python API checks its token input (issue 14, bugs 6 and 7), with the id check inside jit opt-in."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.experimental import checkify
from reference import SMALL, variant

import tedjax
from tedjax.model import check_tokens

CONFIG = variant(SMALL, group_size=8)  # vocab 64, max_len 16


@pytest.fixture(scope="module")
def model():
    return tedjax.Transformer(CONFIG, rngs=nnx.Rngs(0))


def tokens(length=16, batch=2, value=1):
    return jnp.full((batch, length), value, jnp.int32)


@pytest.mark.parametrize(
    "bad, message",
    [
        (tokens(value=64), "token ids must be in [0, vocab_size=64), got ids from 64 to 64"),  # was a NaN loss
        (tokens(value=-1), "token ids must be in [0, vocab_size=64), got ids from -1 to -1"),  # read the last row
        (tokens(length=17), "sequence length 17 exceeds model.max_len=16"),  # passed
        (tokens(length=12), ("model.group_size=8 must divide the sequence length 12 or be a multiple of it: routing "
                             "groups would span parts of two sequences")),  # ran silently
        (jnp.ones((2, 16)), "tokens must be integer ids of shape [batch, length], got shape (2, 16) dtype float32"),
        (jnp.ones((32,), jnp.int32), "tokens must be integer ids of shape [batch, length], got shape (32,)"),
    ],
    ids=["id >= vocab", "id -1", "longer than max_len", "groups span sequences", "floats", "1-D"],
)
def test_transformer_refuses_bad_tokens(model, bad, message):
    with pytest.raises(ValueError) as info:
        model(bad)
    assert message in str(info.value)


def test_group_size_that_spans_sequences_is_refused_under_jit_too(model):
    """Shapes are static: the check costs nothing inside jit and fires at trace time."""
    graphdef, state = nnx.split(model)
    forward = jax.jit(lambda s, t: nnx.merge(graphdef, s)(t)[0])
    with pytest.raises(ValueError, match="group_size=8 must divide the sequence length 12"):
        forward(state, tokens(length=12))
    check_tokens(CONFIG, tokens(length=16))
    check_tokens(CONFIG, tokens(length=4, batch=4))  # a group of 8 covers two whole sequences of 4


def test_loss_fn_checkify_id_check(model):
    """Inside jit ids are not checked (a documented contract) unless loss_fn(check_ids=True) runs under checkify."""
    graphdef, state = nnx.split(model)
    good = {"inputs": tokens(), "targets": tokens()}
    bad = {"inputs": tokens(), "targets": tokens().at[1, 3].set(70)}

    def loss(state, batch):
        return tedjax.loss_fn(nnx.merge(graphdef, state), batch, check_ids=True)[0]

    checked = jax.jit(checkify.checkify(loss))
    err, value = checked(state, good)
    assert err.get() is None and np.isfinite(float(value))
    err, _ = checked(state, bad)
    with pytest.raises(checkify.JaxRuntimeError, match=r"targets token ids must be in \[0, vocab_size=64\), got ids "
                                                       r"from 1 to 70"):  # fmt: skip
        err.throw()
    with pytest.raises(Exception, match="checkify"):  # without checkify, jit refuses the check instead of skipping it
        jax.jit(loss)(state, bad)


# ---------------------------------------------------------------- API messages (issue 20, item 17)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(d_model=0), "d_model=0 must be an integer >= 1"),  # was ZeroDivisionError
        (dict(expert_d_ff=-2), "expert_d_ff=-2 must be an integer >= 1"),
        (dict(num_experts=4, top_k=5), "top_k=5 must be between 1 and num_experts=4"),
        (dict(min_capacity=-1), "min_capacity=-1 must be an integer >= 0"),
    ],
    ids=["d_model 0", "d_ff negative", "top_k > experts", "min_capacity negative"],
)
def test_moe_constructor_refuses_bad_sizes(kwargs, message):
    args = dict(d_model=8, num_experts=4, expert_d_ff=16) | kwargs
    with pytest.raises(ValueError) as info:
        tedjax.MoE(args.pop("d_model"), args.pop("num_experts"), args.pop("expert_d_ff"), **args, rngs=nnx.Rngs(0))
    assert message in str(info.value)


@pytest.mark.parametrize(
    "bad, error, message",
    [
        (jnp.ones((16, 8)), ValueError, "MoE input must have shape [batch, length, d_model=8], got (16, 8)"),
        (jnp.ones((2, 8, 6)), ValueError, "MoE input must have shape [batch, length, d_model=8], got (2, 8, 6)"),
        (jnp.ones((2, 8, 8), jnp.int32), TypeError, "MoE input must be floating point activations, got dtype int32"),
    ],
    ids=["rank 2", "wrong width", "integers"],  # were "not enough values to unpack", a reshape error, silence
)
def test_moe_call_refuses_bad_input(bad, error, message):
    moe = tedjax.MoE(8, 4, 16, rngs=nnx.Rngs(0))
    with pytest.raises(error) as info:
        moe(bad)
    assert message in str(info.value)
    out, _ = moe(jnp.ones((2, 8, 8)))  # the right input still runs
    assert out.shape == (2, 8, 8)


def test_make_mesh_refuses_no_devices():
    with pytest.raises(ValueError, match="make_mesh got an empty device list; pass devices=None"):  # was IndexError
        tedjax.make_mesh(devices=[])


@pytest.mark.parametrize("value, low, high", [(-1, -1, 1), (64, 1, 64)], ids=["-1", ">= vocab"])
def test_loss_fn_refuses_concrete_targets_out_of_range(model, value, low, high):
    """Concrete targets are checked as the inputs are (a -1 gave a wrong loss, an id >= vocab NaN), masked or not."""
    batch = {"inputs": tokens(), "targets": tokens().at[0, 5].set(value), "mask": jnp.ones((2, 16)).at[0, 5].set(0)}
    with pytest.raises(ValueError, match=rf"target ids must be in \[0, vocab_size=64\), got ids from {low} to {high}; "
                                         "give ignored positions any valid id and mask 0"):  # fmt: skip
        tedjax.loss_fn(model, batch)
    with pytest.raises(ValueError, match=r"targets must be integer ids of the inputs' shape \(2, 16\)"):
        tedjax.loss_fn(model, {"inputs": tokens(), "targets": tokens(length=8)})
    loss, _ = tedjax.loss_fn(model, {"inputs": tokens(), "targets": tokens(value=63)})
    assert np.isfinite(float(loss))
