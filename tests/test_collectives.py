"""TED's collectives, read from the compiled HLO of the loss-and-gradient step (NOTES.md section 6)."""

import math

import jax
import pytest
from flax import nnx
from reference import SMALL, loss_and_grads, small_batch, variant

import tedjax
from tedjax import analysis

LAYOUTS = [(1, 8, 1), (2, 4, 1), (2, 2, 2), (1, 2, 4), (4, 1, 2), (8, 1, 1)]
CONFIG = variant(SMALL, top_k=2, capacity_factor=1.25)
BATCH, SEQ = 8, 16


@pytest.fixture(scope="module", params=LAYOUTS, ids=lambda s: "x".join(map(str, s)))
def program(request):
    layout = request.param
    mesh = tedjax.make_mesh(*layout)
    *_, compiled = loss_and_grads(CONFIG, mesh, small_batch(BATCH, SEQ))
    return layout, mesh, analysis.collectives(compiled, mesh)


def forward(c: analysis.Collective) -> bool:
    return "transpose(" not in c.op_name


def nontrivial(colls, kind):
    return [c for c in colls if c.kind == kind and not c.trivial]


def test_moe_forward_has_two_all_to_alls_of_the_predicted_size(program):
    (data, expert, tensor), mesh, colls = program
    a2a = nontrivial(colls, "all-to-all")
    moe_a2a = [c for c in a2a if c.axes == ("expert",)]
    if expert == 1:
        assert moe_a2a == []
        return
    n_moe = CONFIG.n_moe_layers
    assert len([c for c in moe_a2a if forward(c)]) == 2 * n_moe
    assert len([c for c in moe_a2a if not forward(c)]) == 2 * n_moe
    # Per device: its groups x every expert's C slots x d_model, float32 (NOTES.md section 6).
    groups_per_device = BATCH // (data * expert)  # one routing group per sequence
    capacity = tedjax.routing.capacity(SEQ, CONFIG.num_experts, CONFIG.top_k, CONFIG.capacity_factor, CONFIG.min_capacity)
    buffer_bytes = groups_per_device * CONFIG.num_experts * capacity * CONFIG.d_model * 4
    for c in moe_a2a:
        assert c.result_bytes == buffer_bytes
        assert c.sent_bytes == pytest.approx(buffer_bytes * (expert - 1) / expert)


def test_no_all_gather_anywhere(program):
    """Expert weights (and every other weight) stay where they live: nothing is all-gathered."""
    _, _, colls = program
    assert nontrivial(colls, "all-gather") == []


def test_tensor_all_reduces_only_where_megatron_needs_them(program):
    (data, expert, tensor), _, colls = program
    activation_bytes = (BATCH // (data * expert)) * SEQ * CONFIG.d_model * 4
    fwd_tensor = [c for c in nontrivial(colls, "all-reduce") if c.axes == ("tensor",) and forward(c)]
    big = [c for c in fwd_tensor if c.result_bytes >= activation_bytes]
    if tensor == 1:
        assert fwd_tensor == []
        return
    # one per attention output, one per FFN / expert output, one for the vocab-parallel embedding
    assert len(big) == 2 * CONFIG.n_layers + 1, [(c.shape, c.op_name) for c in big]
    # the rest are the vocab-parallel cross-entropy's per-token statistics (max, sum, label logit)
    small = [c for c in fwd_tensor if c.result_bytes < activation_bytes]
    assert all(c.result_bytes <= activation_bytes // CONFIG.d_model * 2 for c in small)


def test_expert_gradients_are_not_reduced_over_expert(program):
    (data, expert, tensor), _, colls = program
    expert_matmuls = ("emd,edf->emf", "emf,efd->emd")  # MoE._experts
    reductions = [c for c in nontrivial(colls, "all-reduce") if any(m in c.op_name for m in expert_matmuls)]
    for c in reductions:
        assert "expert" not in c.axes, (c.axes, c.shape, c.op_name)
    if data > 1:  # expert weight gradients are summed over their data-parallel replicas only
        assert any(c.axes == ("data",) and not forward(c) for c in reductions)


def test_non_expert_gradients_reduced_over_data_and_expert(program):
    (data, expert, tensor), _, colls = program
    dp_axes = tuple(a for a, n in (("data", data), ("expert", expert)) if n > 1)
    if not dp_axes:
        return
    grads = [c for c in nontrivial(colls, "all-reduce") if c.axes == dp_axes and not forward(c)]
    # The local shard of every parameter whose data-parallel group is `dp_axes` crosses it
    # once: non-expert parameters (group data x expert), and expert parameters too when
    # expert = 1 (their group is data alone).
    _, abstract, _ = nnx.split(tedjax.model.abstract_model(CONFIG), nnx.Param, ...)  # parameters only
    local_bytes = 0
    for variable in jax.tree.leaves(abstract, is_leaf=lambda x: isinstance(x, nnx.Variable)):
        spec = tedjax.logical_to_spec(variable.logical_axes)
        is_expert = "expert" in jax.tree.leaves(tuple(spec))
        if is_expert and expert > 1:
            continue
        split = math.prod(tensor for entry in spec if entry == "tensor")
        local_bytes += math.prod(variable.shape) * 4 // split
    total = sum(c.result_bytes for c in grads)
    # XLA computes the vocab-parallel embedding's scatter-add gradient unsplit over
    # "tensor" (a known inefficiency: the full [V, D] table is reduced), and a few
    # scalar losses ride in the same combined op.
    embedding_extra = CONFIG.vocab_size * CONFIG.d_model * 4 * (tensor - 1) // tensor
    assert local_bytes <= total <= local_bytes + embedding_extra + 256
