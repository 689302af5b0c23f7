"""Each local expert's FFN on a device's pooled buffer (device-pooled capacity).

With device-pooled capacity one device's experts share its buffer: a routing
group's pool holds the kept choices sorted by expert (`routing.route` lays
them out so), with `counts` saying how many rows each expert has. The rows of
all local groups are brought into one expert-sorted order, each expert's FFN
runs on its own rows, and the results return to buffer order. Shapes stay
static: only how many rows each expert owns is a runtime value.

Three ways to run the grouped matmuls, chosen by measurement (benchmarks/load_balance.py,
benchmarks/dropless.py):
- `ragged`: `jax.lax.ragged_dot`, a grouped GEMM on GPU and TPU with no extra
  FLOPs or weight copies. XLA:CPU lowers it to a masked dense product
  (E_local x the FLOPs), 2.5-6x slower than the per-expert matmul there.
- `blocks` (MegaBlocks' idea with static shapes): each expert's run is padded
  to a multiple of b rows and the padded rows are cut into blocks of b; one
  batched matmul runs every block with its expert's weights (selected with a
  one-hot matmul, which keeps the backward free of scatters). With
  b = M / (8 E_local) the padding adds at most 1/8 of the rows. It holds one
  weight copy per block, and it computes every block of the buffer, filled or
  not.
- `loop` (the CPU choice for dropless pools): the same padded blocks, but a
  `while_loop` runs only the blocks that hold rows, each with its expert's
  weights sliced in place (no copies). Work and memory follow the filled
  rows, not the buffer: what
  dropless pools need, whose buffer holds the worst case (up to E/k x the
  routed rows). Its backward (a custom VJP) is a second loop that recomputes
  each block's activations, so no `[rows, F]` activation is kept. XLA's cost
  analysis counts a loop body once, so its FLOPs are
  `loop_blocks(...) x` one block's (benchmarks/dropless.py).

The row permutation is a gather whose transpose is the inverse gather
(`gather_rows`), not XLA's scatter-add, which XLA:CPU runs element by element.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp

from tedjax.layers import activate

METHODS = ("auto", "ragged", "blocks", "loop")


@jax.custom_vjp
def gather_rows(x_nd: jax.Array, index_m: jax.Array, inverse_n: jax.Array) -> jax.Array:
    """`y[i] = x[index[i]]` (0 where index is out of range), `[M, D]` from `[N, D]`.

    `index` must be injective on its in-range entries and `inverse` its inverse
    (`inverse[j] = i` where `index[i] = j`, out of range where no i takes j):
    then the transpose is the gather `dx[j] = dy[inverse[j]]`.
    """
    return jnp.take(x_nd, index_m, axis=0, mode="fill", fill_value=0)


def _gather_rows_fwd(x_nd, index_m, inverse_n):
    return gather_rows(x_nd, index_m, inverse_n), (index_m, inverse_n)


def _gather_rows_bwd(residual, dy_md):
    index_m, inverse_n = residual
    return jnp.take(dy_md, inverse_n, axis=0, mode="fill", fill_value=0), None, None


gather_rows.defvjp(_gather_rows_fwd, _gather_rows_bwd)


def resolve_method(method: str, worst_case_pool: bool = False) -> str:
    """`auto`: `ragged` on GPU/TPU; on CPU `loop` for pools sized for the worst case (dropless: mostly
    empty) and `blocks` for static pools near full (what tedjax.plan models for them)."""
    if method not in METHODS:
        raise ValueError(f"grouped matmul method must be one of {METHODS}, got {method!r}")
    if method == "auto":
        return ("loop" if worst_case_pool else "blocks") if jax.default_backend() == "cpu" else "ragged"
    return method


def expected_fill(capacity_scope: str, num_experts: int, top_k: int, devices: int, capacity_factor: float,
                  buffer_factor: float = 0.0) -> float:
    """The fraction of a device pool's rows uniform routing fills (what sizes `loop`'s blocks): k / (X
    min(E_local, k)) of a worst-case dropless pool, 1 / f of a bounded one, 1 / cf of a device pool."""
    if capacity_scope == "dropless":
        worst = top_k / (devices * min(num_experts // devices, top_k))
        return min(1.0, max(worst, 1.0 / buffer_factor if buffer_factor else 0.0))
    return min(1.0, 1.0 / capacity_factor)


def block_rows(rows: int, local_experts: int) -> int:
    """Block size b for `blocks` and `loop`: padding (< b rows per expert) stays under 1/8 of `rows`
    (for `loop`, the rows expected to be filled)."""
    return max(8, math.ceil(rows / (8 * local_experts)))


def _block_ffn(x_bd, w_in_df, w_gate_df, w_out_fd):
    """One block's FFN `[b, D] -> [b, D]` with one expert's weights."""
    h_bf = x_bd @ w_in_df
    gate_bf = None if w_gate_df is None else x_bd @ w_gate_df
    return activate(h_bf, gate_bf) @ w_out_fd


def _varying(zeros, *like):
    """`zeros` typed as varying over every manual mesh axis any of `like` varies over (inside `shard_map`
    a loop's carry must keep the type its body gives it); unchanged outside `shard_map`."""
    axes = (frozenset().union(*(jax.typeof(a).manual_axis_type.varying for a in jax.tree.leaves(like)))
            - jax.typeof(zeros).manual_axis_type.varying)
    return jax.lax.pcast(zeros, tuple(sorted(axes)), to="varying") if axes else zeros


def _sum_to(ct, primal):
    """A cotangent summed over the manual mesh axes it varies over and its primal does not (the transpose of
    the implicit broadcast of an invariant input, as `shard_map`'s autodiff does)."""
    axes = jax.typeof(ct).manual_axis_type.varying - jax.typeof(primal).manual_axis_type.varying
    return jax.lax.psum(ct, tuple(sorted(axes))) if axes else ct


def _expert_weights(weights, e):
    return tuple(None if w is None else jax.lax.dynamic_index_in_dim(w, e, 0, keepdims=False) for w in weights)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _loop_ffn(block, x_md, weights, block_expert_j, used_blocks):
    """`y[j-th block] = FFN_{block_expert[j]}(x[j-th block])` for the first `used_blocks` blocks, 0 after:
    `[M, D] -> [M, D]`, only the used blocks computed."""
    y_md, _ = _loop_ffn_fwd(block, x_md, weights, block_expert_j, used_blocks)
    return y_md


def _loop_ffn_fwd(block, x_md, weights, block_expert_j, used_blocks):
    def body(carry):
        j, y_md = carry
        x_bd = jax.lax.dynamic_slice_in_dim(x_md, j * block, block)
        y_bd = _block_ffn(x_bd, *_expert_weights(weights, block_expert_j[j]))
        return j + 1, jax.lax.dynamic_update_slice_in_dim(y_md, y_bd.astype(y_md.dtype), j * block, 0)

    y0_md = _varying(jnp.zeros_like(x_md), x_md, weights, block_expert_j)
    _, y_md = jax.lax.while_loop(lambda c: c[0] < used_blocks, body, (jnp.int32(0), y0_md))
    return y_md, (x_md, weights, block_expert_j, used_blocks)


def _loop_ffn_bwd(block, residual, dy_md):
    x_md, weights, block_expert_j, used_blocks = residual
    like = (x_md, weights, block_expert_j, dy_md)

    def body(carry):
        j, dx_md, dweights = carry
        e = block_expert_j[j]
        # every input typed varying over all the axes: the block's cotangents stay partial sums (no
        # collective inside the loop), summed once after it
        x_bd = _varying(jax.lax.dynamic_slice_in_dim(x_md, j * block, block), like)
        _, vjp = jax.vjp(_block_ffn, x_bd, *(None if w is None else _varying(w, like)
                                              for w in _expert_weights(weights, e)))
        dx_bd, *dw = vjp(jax.lax.dynamic_slice_in_dim(dy_md, j * block, block))
        dx_md = jax.lax.dynamic_update_slice_in_dim(dx_md, dx_bd.astype(dx_md.dtype), j * block, 0)
        dweights = tuple(None if acc is None else  # accumulated in float32, in place
                         jax.lax.dynamic_update_index_in_dim(acc, acc[e] + d.astype(acc.dtype), e, 0)
                         for acc, d in zip(dweights, dw))
        return j + 1, dx_md, dweights

    zeros = tuple(None if w is None else _varying(jnp.zeros(w.shape, jnp.float32), like) for w in weights)
    _, dx_md, dweights = jax.lax.while_loop(lambda c: c[0] < used_blocks, body,
                                            (jnp.int32(0), _varying(jnp.zeros_like(x_md), like), zeros))
    dweights = tuple(None if d is None else _sum_to(d.astype(w.dtype), w) for d, w in zip(dweights, weights))
    return _sum_to(dx_md, x_md), dweights, None, None


_loop_ffn.defvjp(_loop_ffn_fwd, _loop_ffn_bwd)


def _count_at_most(sorted_e: jax.Array, value_j: jax.Array) -> jax.Array:
    """`searchsorted(sorted_e, value_j, side="right")` `[J]` as a comparison count: jnp.searchsorted's loop,
    traced in a scan body under the pipeline's stage vmap inside `shard_map`, is typed varying over every
    manual axis, "stage" included, which the pools' out_specs cannot hold (E is small: J x E compares)."""
    return jnp.sum(sorted_e[None, :] <= value_j[:, None], axis=1, dtype=jnp.int32)


def loop_blocks(counts_gqx: jax.Array, block: int) -> jax.Array:
    """Blocks `loop` runs on these counts (int32 scalar): each expert's rows, all groups together, in
    whole blocks of `block` rows."""
    total_e = jnp.sum(counts_gqx.reshape(-1, counts_gqx.shape[-2] * counts_gqx.shape[-1]), axis=0)
    return jnp.sum((total_e + block - 1) // block).astype(jnp.int32)


def pool_ffn(
    buf_gqpd: jax.Array,
    counts_gqx: jax.Array,
    w_in_edf: jax.Array,
    w_gate_edf: jax.Array | None,
    w_out_efd: jax.Array,
    *,
    method: str = "auto",
    expected_fill: float = 1.0,
    worst_case_pool: bool = False,
) -> jax.Array:
    """FFN of each row's expert on pooled buffers: `[G, Q, P, D] -> [G, Q, P, D]`.

    G groups, Q local pools of P rows, X experts per pool; `counts_gqx[g, q, x]`
    rows of pool q (at its start, in expert order) belong to its expert x, and
    the rest are empty (output 0). The weights hold the E = Q x X local experts,
    pool q's first. With the FFN dim split over devices the output is a partial
    sum, as for the per-expert path. `expected_fill` (the fraction of the rows expected to be filled)
    sizes `loop`'s blocks; `worst_case_pool` (dropless) makes `loop` the CPU choice.
    """
    groups, pools, pool_size, d_model = buf_gqpd.shape
    per_pool = counts_gqx.shape[-1]
    experts = pools * per_pool
    rows = groups * pools * pool_size
    method = resolve_method(method, worst_case_pool)

    # Expert of every row, and its rank among the expert's rows of its group.
    end_gqx = jnp.cumsum(counts_gqx, axis=-1)
    position_p = jnp.arange(pool_size, dtype=jnp.int32)
    within_gqp = jnp.sum(position_p[None, None, :, None] >= end_gqx[:, :, None, :], axis=-1)
    valid_gqp = within_gqp < per_pool
    within_gqp = jnp.minimum(within_gqp, per_pool - 1)
    start_gqx = end_gqx - counts_gqx
    rank_gqp = position_p[None, None, :] - jnp.take_along_axis(start_gqx, within_gqp, axis=-1)
    expert_gqp = jnp.arange(pools, dtype=jnp.int32)[None, :, None] * per_pool + within_gqp

    # Sorted order: expert-major, then group, then rank.
    counts_ge = counts_gqx.reshape(groups, experts)
    total_e = jnp.sum(counts_ge, axis=0)
    if method in ("blocks", "loop"):
        block = block_rows(math.ceil(rows * expected_fill) if method == "loop" else rows, experts)
        num_blocks = math.ceil(rows / block) + experts
        sorted_rows = num_blocks * block
        group_sizes_e = (total_e + block - 1) // block * block
    else:
        sorted_rows, group_sizes_e = rows, total_e
    base_e = jnp.cumsum(group_sizes_e) - group_sizes_e
    before_ge = jnp.cumsum(counts_ge, axis=0) - counts_ge
    expert_n = expert_gqp.reshape(rows)
    group_n = jnp.repeat(jnp.arange(groups, dtype=jnp.int32), pools * pool_size)
    dest_n = base_e[expert_n] + before_ge[group_n, expert_n] + rank_gqp.reshape(rows)
    dest_n = jnp.where(valid_gqp.reshape(rows), dest_n, sorted_rows)
    source_m = jnp.full((sorted_rows,), rows, jnp.int32).at[dest_n].set(
        jnp.arange(rows, dtype=jnp.int32), mode="drop"
    )

    x_md = gather_rows(buf_gqpd.reshape(rows, d_model), source_m, dest_n)
    if method == "ragged":
        sizes = group_sizes_e.astype(jnp.int32)
        h_mf = jax.lax.ragged_dot(x_md, w_in_edf, sizes)
        gate_mf = None if w_gate_edf is None else jax.lax.ragged_dot(x_md, w_gate_edf, sizes)
        y_md = jax.lax.ragged_dot(activate(h_mf, gate_mf), w_out_efd, sizes)
    elif method == "loop":
        block_end_e = jnp.cumsum(group_sizes_e) // block
        block_expert_j = jnp.minimum(_count_at_most(block_end_e, jnp.arange(num_blocks, dtype=jnp.int32)),
                                     experts - 1)
        y_md = _loop_ffn(block, x_md, (w_in_edf, w_gate_edf, w_out_efd), block_expert_j.astype(jnp.int32),
                         block_end_e[-1].astype(jnp.int32))
    else:
        block_start_j = jnp.arange(num_blocks, dtype=jnp.int32) * block
        block_expert_j = jnp.minimum(_count_at_most(jnp.cumsum(group_sizes_e), block_start_j), experts - 1)
        select_je = jax.nn.one_hot(block_expert_j, experts, dtype=w_in_edf.dtype)
        x_jbd = x_md.reshape(num_blocks, block, d_model)

        def mixed(w):
            return jnp.einsum("je,e...->j...", select_je, w)

        h_jbf = jnp.einsum("jbd,jdf->jbf", x_jbd, mixed(w_in_edf))
        gate_jbf = None if w_gate_edf is None else jnp.einsum("jbd,jdf->jbf", x_jbd, mixed(w_gate_edf))
        y_md = jnp.einsum("jbf,jfd->jbd", activate(h_jbf, gate_jbf), mixed(w_out_efd)).reshape(sorted_rows, d_model)
    return gather_rows(y_md, dest_n, source_m).reshape(groups, pools, pool_size, d_model)
