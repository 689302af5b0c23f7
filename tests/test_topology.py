"""Across nodes (issue 24): the topology-aware gate against a loop reference, the hierarchical all-to-all
against the flat one and 1 device (one MoE layer's output and gradients), its inter-node bytes in the
compiled HLO, and the checks that refuse a bad node size or remote fraction before compiling."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from reference import max_abs_diff, one_device_mesh

import tedjax
from tedjax import analysis, routing
from tedjax.mesh import expert_nodes, resolve_node_size, state_shardings
from tedjax.moe import MoE

# One MoE layer: 8 experts, top-2, capacity 4 slots per expert per group of 16 tokens (r = 0.5 -> 2, 0.25 -> 1).
LAYER = dict(d_model=16, num_experts=8, expert_d_ff=16, top_k=2, capacity_factor=1.0, min_capacity=1)
# (layout, node_size, layer): 2 nodes of 4 on (1,8,1) and (1,4,2); on (2,4,1) a node of 4 would hold the whole
# expert axis (nothing crosses), so nodes of 2 there: the expert axis spans 2 of its 4 nodes. Capacity factor 8:
# nothing drops, so per-expert capacity, device pools, dropless + a shadow + DTD all compute the 1-device function.
ROOMY = dict(capacity_factor=8.0)
LAYOUTS = [((1, 8, 1), 4, ROOMY), ((2, 4, 1), 2, dict(ROOMY, capacity_scope="device")),
           ((1, 4, 2), 4, dict(ROOMY, capacity_scope="dropless", shadow_experts=1, dtd=True))]


def loop_gate(logits_gse, top_k, cap, remote_cap, nodes, group_node):
    """The gate's rule, one choice at a time (per-expert capacity): (expert, kept, slot, redirected) [G, S, K].
    An own-node expert takes the slots the remote ones give up: cap + (nodes - 1)(cap - remote_cap), at most S."""
    own_cap = min(cap + (nodes - 1) * (cap - remote_cap), logits_gse.shape[1])
    groups, size, experts = logits_gse.shape
    node_of = np.arange(experts) * nodes // experts
    index = np.argsort(-logits_gse, axis=-1, kind="stable")[..., :top_k]
    final, kept = index.copy(), np.zeros(index.shape, bool)
    slot, moved = np.zeros(index.shape, int), np.zeros(index.shape, bool)
    for g in range(groups):
        counts = np.zeros(experts, int)
        for k in range(top_k):
            for s in range(size):
                e = index[g, s, k]
                remote = node_of[e] != group_node[g]
                if counts[e] < (remote_cap if remote else own_cap):
                    kept[g, s, k], slot[g, s, k] = True, counts[e]
                    counts[e] += 1
                elif remote:
                    mine = set(index[g, s]) | set(final[g, s])
                    room = [x for x in range(experts) if node_of[x] == group_node[g] and counts[x] < own_cap
                            and x not in mine]
                    if room:
                        best = max(room, key=lambda x: (logits_gse[g, s, x], -x))
                        final[g, s, k], kept[g, s, k], slot[g, s, k], moved[g, s, k] = best, True, counts[best], True
                        counts[best] += 1
    return final, kept, slot, moved


@pytest.mark.parametrize("top_k,fraction", [(1, 0.25), (2, 0.5), (2, 0.25)])
def test_gate_matches_loop_reference(top_k, fraction):
    """Which choices are redirected, to which expert, in which slot: the jitted gate equals the loop."""
    rng = np.random.default_rng(top_k)
    logits = rng.normal(size=(4, 32, 8)).astype(np.float32)
    logits[..., :4] += 1.0  # node 0's experts are popular: remote pools fill up for node 1's groups
    group_node = np.array([0, 0, 1, 1], np.int32)
    cap = routing.capacity(32, 8, top_k, 1.0, 1)
    remote_cap = routing.remote_capacity(cap, fraction)
    routed = jax.jit(lambda x: routing.route(x, top_k=top_k, capacity_factor=1.0, min_capacity=1,
                                             remote_fraction=fraction, nodes=2,
                                             group_node=jnp.asarray(group_node)))(logits)
    expert, kept, slot, moved = loop_gate(logits, top_k, cap, remote_cap, 2, group_node)
    assert moved.any()
    np.testing.assert_array_equal(np.asarray(routed.expert_index), expert)
    np.testing.assert_array_equal(np.asarray(routed.kept), kept)
    np.testing.assert_array_equal(np.where(kept, np.asarray(routed.slot), -1), np.where(kept, slot, -1))
    np.testing.assert_allclose(float(routed.redirected_fraction), moved.mean())
    remote = (np.arange(8)[expert] * 2 // 8) != group_node[:, None, None]
    np.testing.assert_allclose(float(routed.internode_fraction), (kept & remote).sum() / kept.sum(), rtol=1e-6)
    assert np.asarray(routed.slot)[kept & remote].max() < remote_cap  # what the hierarchical exchange relies on
    # a group's room is what it is at r = 1: 4 own experts of P_own slots + 4 remote ones of R = 8 x C
    assert routed.capacity == cap + cap - remote_cap and 4 * routed.capacity + 4 * remote_cap == 8 * cap


def test_remote_bias_matches_loop_reference():
    """The remote bias (model.remote_bias_rate): the choice sees the logits less the bias on other nodes'
    experts, then the gate acts as before (loop reference); gates stay unbiased, `remote_excess` is the
    remote share of the choices less what remote pools keep; a zero bias changes no decision."""
    rng = np.random.default_rng(5)
    logits = rng.normal(size=(4, 32, 8)).astype(np.float32)
    logits[..., :4] += 1.0
    group_node = np.array([0, 0, 1, 1], np.int32)
    cap, top_k, bias = routing.capacity(32, 8, 2, 1.0, 1), 2, 0.7
    remote_cap = routing.remote_capacity(cap, 0.25)
    route = jax.jit(lambda x, b: routing.route(x, top_k=top_k, capacity_factor=1.0, min_capacity=1,
                                               remote_fraction=0.25, nodes=2, group_node=jnp.asarray(group_node),
                                               remote_bias=b))
    remote_ge = (np.arange(8)[None, :] * 2 // 8) != group_node[:, None]
    biased = logits - bias * remote_ge[:, None, :]
    routed = route(logits, jnp.float32(bias))
    expert, kept, slot, moved = loop_gate(biased, top_k, cap, remote_cap, 2, group_node)
    np.testing.assert_array_equal(np.asarray(routed.expert_index), expert)
    np.testing.assert_array_equal(np.asarray(routed.kept), kept)
    np.testing.assert_array_equal(np.where(kept, np.asarray(routed.slot), -1), np.where(kept, slot, -1))
    np.testing.assert_allclose(float(routed.redirected_fraction), moved.mean())
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    gate = np.where(kept, np.take_along_axis(probs, expert, -1), 0.0)
    np.testing.assert_allclose(np.asarray(routed.combine_weight), gate / np.maximum(gate.sum(-1, keepdims=True),
                                                                                      1e-12), rtol=1e-5)
    chosen = np.argsort(-biased, axis=-1, kind="stable")[..., :top_k]  # before the gate
    wanted = np.take_along_axis(np.broadcast_to(remote_ge[:, None, :], biased.shape), chosen, -1).mean()
    np.testing.assert_allclose(float(routed.remote_excess), wanted - 4 * remote_cap / (32 * top_k), rtol=1e-6)
    unbiased, plain = route(logits, jnp.float32(0.0)), route(logits, None)
    assert float(plain.remote_excess) == 0.0 < float(unbiased.remote_excess)  # read only with the bias
    for name in ("expert_index", "kept", "slot", "combine_weight", "redirected_fraction"):
        np.testing.assert_array_equal(np.asarray(getattr(unbiased, name)), np.asarray(getattr(plain, name)))


def test_remote_bias_update_and_default_off():
    """MoE.update_balance moves the remote bias by rate x sign(remote_excess), never below 0; without
    remote_bias the layer has no such variable (its state, and so its checkpoints, are unchanged)."""
    assert MoE(**LAYER, rngs=nnx.Rngs(0)).remote_bias is None
    moe = MoE(**LAYER, remote_bias=True, rngs=nnx.Rngs(0))
    load = jnp.full((8,), 1 / 8)
    for excess, expected in ((0.1, 0.05), (0.2, 0.1), (-0.3, 0.05), (-0.3, 0.0), (-0.3, 0.0), (0.0, 0.0)):
        moe.update_balance(load, bias_rate=0.0, load_decay=0.9, remote_excess=jnp.float32(excess),
                           remote_bias_rate=0.05)
        np.testing.assert_allclose(float(moe.remote_bias[...]), expected, atol=1e-7)
    with pytest.raises(ValueError, match="remote_bias_rate"):
        tedjax.ModelConfig(remote_bias_rate=-0.01)


def test_gate_shadows_are_local_and_pools_fill_their_own_node():
    """A shadowed expert is on every node (never limited); with device pools the redirects land on own-node
    pools with room, and a remote pool holds at most r x its capacity."""
    rng = np.random.default_rng(3)
    logits = jnp.asarray(rng.normal(size=(4, 32, 8)).astype(np.float32) + np.array([2.0] * 2 + [0.0] * 6))
    group_node = jnp.asarray([0, 0, 1, 1], jnp.int32)
    kwargs = dict(top_k=2, capacity_factor=1.0, min_capacity=1, remote_fraction=0.25, nodes=2, group_node=group_node)
    route = jax.jit(lambda x, **changes: routing.route(x, **kwargs, **changes),
                    static_argnames=("shadow_capacity", "experts_per_pool"))
    shadowed = route(logits, shadow_ids=jnp.asarray([0, 1], jnp.int32), shadow_capacity=64)
    assert float(shadowed.redirected_fraction) < float(route(logits).redirected_fraction)
    pooled = route(logits, experts_per_pool=2)  # 4 pools, 2 per node
    counts_gq = np.asarray(pooled.slot_counts).reshape(4, 4, 2).sum(-1)
    remote_gq = (np.arange(4)[None] // 2) != np.asarray(group_node)[:, None]
    assert counts_gq[remote_gq].max() <= pooled.remote_capacity < pooled.capacity
    assert float(pooled.redirected_fraction) > 0


def layer_grad_fn(mesh, node_size, **changes):
    """(jitted (params, x) -> (loss, grads), params, x) of one MoE layer on `mesh`."""
    moe = MoE(**{**LAYER, **changes}, node_size=node_size, rngs=nnx.Rngs(0))
    if moe.num_shadows:
        moe.shadow_ids[...] = jnp.asarray([3], jnp.int32)
    graphdef, params, rest = nnx.split(moe, nnx.Param, ...)
    params = jax.device_put(params, state_shardings(params, mesh))
    x = jnp.asarray(np.random.default_rng(0).normal(size=(8, 16, 16)), jnp.float32)
    x = jax.device_put(x, tedjax.mesh.named_sharding(mesh, ("batch", None, None)))
    probe = jnp.asarray(np.random.default_rng(1).normal(size=(8, 16, 16)), jnp.float32)

    def loss(params, x):
        out, stats = nnx.merge(graphdef, params, rest)(x)
        return jnp.sum(out * probe) + 0.01 * stats.aux_loss, stats

    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)), params, x


def run_layer(mesh, node_size, **changes):
    """(loss, grads, stats, compiled, jitted, params, x)."""
    fn, params, x = layer_grad_fn(mesh, node_size, **changes)
    with jax.set_mesh(mesh):
        compiled = fn.lower(params, x).compile()
        (loss, stats), grads = fn(params, x)
    return float(loss), jax.tree.map(np.asarray, grads), jax.tree.map(np.asarray, stats), compiled, fn, params, x


@pytest.fixture(scope="module")
def one_device():
    return run_layer(one_device_mesh(), 0, **ROOMY)


@pytest.mark.parametrize("layout,node_size,layer", LAYOUTS, ids=lambda v: "x".join(map(str, v)) if isinstance(
    v, tuple) else f"nodes{v}" if isinstance(v, int) else v.get("capacity_scope", "expert"))
def test_hierarchical_equals_one_device(one_device, layout, node_size, layer):
    """r = 1 with the hierarchical exchange: the 1-device loss and gradients (the flat exchange's are
    checked against 1 device in test_equivalence), with per-expert capacity, device pools, and dropless pools
    with a shadow and DTD; nothing redirected."""
    mesh = tedjax.make_mesh(*layout)
    assert expert_nodes(layout, node_size) == 2
    loss, grads, stats, compiled, *_ = run_layer(mesh, node_size, a2a="hierarchical", **layer)
    assert float(stats.dropped_fraction) == 0
    assert abs(loss - one_device[0]) < 1e-4 * max(1.0, abs(one_device[0]))
    assert max_abs_diff(grads, one_device[1]) < 1e-5
    assert float(stats.redirected_fraction) == 0 and 0 < float(stats.internode_fraction) < 1
    all_to_alls = [c for c in analysis.collectives(compiled, mesh) if c.kind == "all-to-all" and not c.trivial]
    assert any(len(g) == 2 for c in all_to_alls for g in c.groups)  # the exchange between nodes (pairs of ranks)


@pytest.fixture(scope="module")
def across_nodes():
    """(1,8,1) in 2 nodes of 4 at r = 0.5: flat and hierarchical; hierarchical at 0.25."""
    mesh = tedjax.make_mesh(1, 8, 1)
    runs = {(a2a, r): run_layer(mesh, 4, a2a=a2a, remote_fraction=r)
            for a2a, r in [("flat", 0.5), ("hierarchical", 0.5), ("hierarchical", 0.25)]}
    return mesh, runs


def test_hierarchical_equals_flat_with_the_gate(across_nodes):
    """r < 1: the same redirects, loss and gradients whichever exchange carries them."""
    _, runs = across_nodes
    flat, hier = runs["flat", 0.5], runs["hierarchical", 0.5]
    assert float(flat[2].redirected_fraction) > 0
    assert float(flat[2].redirected_fraction) == float(hier[2].redirected_fraction)
    assert abs(flat[0] - hier[0]) < 1e-5 and max_abs_diff(flat[1], hier[1]) < 1e-5


def test_hierarchical_equals_flat_with_pools_shadows_and_dtd():
    """r < 1 with device pools, a shadow and DTD on (1,4,2): own-node pools of P_own slots split over the
    tensor ranks, remote ones of R, the counts beside them; the same drops, loss and gradients as flat."""
    mesh, layer = tedjax.make_mesh(1, 4, 2), dict(capacity_scope="device", shadow_experts=1, dtd=True)
    flat, hier = (run_layer(mesh, 4, a2a=a2a, remote_fraction=0.5, **layer) for a2a in ("flat", "hierarchical"))
    assert float(flat[2].redirected_fraction) == float(hier[2].redirected_fraction) > 0
    assert float(flat[2].dropped_fraction) == float(hier[2].dropped_fraction)
    assert abs(flat[0] - hier[0]) < 1e-5 and max_abs_diff(flat[1], hier[1]) < 1e-5


def internode(compiled, mesh, node_size=4):
    ops = [c for c in analysis.collectives(compiled, mesh) if c.kind == "all-to-all"]
    return sum(analysis.internode_bytes(c, node_size) for c in ops), sum(analysis.internode_bytes(c, 4) > 0
                                                                          for c in ops)


@pytest.mark.parametrize("fraction", [0.5, 0.25])
def test_internode_bytes_fall_by_r(across_nodes, fraction):
    """In the compiled HLO (forward and backward), the all-to-alls whose groups cross nodes carry r x the
    bytes of the flat exchange's cross-node share at r = 1, in as many ops. The flat exchange with the gate
    (r = 0.5 here) sizes every pool at P_own, so its bytes are P_own / P of its r = 1 bytes."""
    mesh, runs = across_nodes
    cap = routing.capacity(16, 8, 2, 1.0, 1)  # P = 4 of LAYER
    flat_bytes, flat_ops = internode(runs["flat", 0.5][3], mesh)
    flat_bytes *= cap / routing.own_node_capacity(cap, routing.remote_capacity(cap, 0.5), 2, 16)
    hier_bytes, hier_ops = internode(runs["hierarchical", fraction][3], mesh)
    assert flat_bytes > 0 and hier_ops == flat_ops
    assert hier_bytes == pytest.approx(fraction * flat_bytes, rel=1e-6)


def test_no_recompile_when_routing_changes(across_nodes):
    """New tokens and router weights (new redirects) run the same compiled program."""
    mesh, runs = across_nodes
    *_, fn, params, x = runs["hierarchical", 0.25]
    same_layout = lambda new, old: jax.device_put(new, old.sharding)  # noqa: E731
    params = jax.tree.map(lambda p: same_layout(p * 3.0, p), params)
    with jax.set_mesh(mesh):
        (_, stats), _ = fn(params, same_layout(x[::-1], x))
    assert fn._cache_size() == 1 and float(stats.redirected_fraction) > 0


def test_bad_topology_refused_before_compiling():
    """A node size that splits a tensor group or the expert axis unevenly, and r outside (0, 1], raise
    while building, naming the fix."""
    with pytest.raises(ValueError, match=r"mesh.node_size=3 .* set mesh.node_size to one of \[2, 4, 8\]"):
        expert_nodes((1, 4, 2), 3)
    with pytest.raises(ValueError, match="whole tensor groups"):
        resolve_node_size(tedjax.make_mesh(1, 4, 2), 1)
    with pytest.raises(ValueError, match="expert group"):
        expert_nodes((1, 6, 1), 4)
    assert expert_nodes((2, 4, 1), 4) == 1 and expert_nodes((2, 4, 1), 2) == 2
    assert resolve_node_size(tedjax.make_mesh(1, 8, 1)) == 8  # one process: one node
    for bad in (0.0, 1.5):
        with pytest.raises(ValueError, match="remote_fraction"):
            MoE(**LAYER, remote_fraction=bad, rngs=nnx.Rngs(0))
        with pytest.raises(ValueError, match="remote_fraction"):
            tedjax.ModelConfig(remote_fraction=bad)
    with pytest.raises(ValueError, match="a2a"):
        MoE(**LAYER, a2a="ring", rngs=nnx.Rngs(0))
