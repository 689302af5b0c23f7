"""The ragged exchange of dropless pools: only the filled rows cross the "expert" axis.

With device pools every routing group has one pool of P rows per device of
the "expert" axis, filled from its start (rows sorted by local expert) with
as many rows as its per-expert counts add up to. The static exchange (an
all-to-all of the `[G, X, P, D]` buffer) sends all P rows of every pool;
`jax.lax.ragged_all_to_all` sends only the filled ones.

Bookkeeping (written once, used both ways). A buffer `[A, B, P, D]` of A
regions (one per device of the axis) holding B segments of P rows, each
filled at its start with `counts[a, b]` rows, is *packed*: region a starts at
row a x B x P of a flat buffer and holds its segments back to back. Device
m sends its region a (input offset a x B x P, size sum_b counts[a, b]) to
device a, where it lands at the static offset m x B x P; the receiver knows
the sizes from the counts that travel with the pools, and unpacks. Dispatch
is `[X, G_local, P, D]` (region = destination) to `[X, G_local, P, D]`
(region = source), the return is the same call with the counts swapped. No
offsets travel: every receive region has a fixed place (so the receive
buffer is the static one, X x G_local x P rows; bound it with
`model.dropless_buffer_factor`).

XLA:CPU has no ragged-all-to-all (jax 0.10.2), so `emulated_ragged_all_to_all`
implements its semantics with an all-to-all of worst-case blocks: the
bookkeeping runs and is tested on CPU, and only the primitive needs a GPU
(benchmarks/gpu_session.sh).
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

from tedjax.grouped import gather_rows


def packed_rows(counts_ab: jax.Array, slots: int) -> tuple[jax.Array, jax.Array]:
    """Row maps between a `[A, B, P]` buffer (segment (a, b) filled at its start with counts[a, b] rows)
    and its packed form (region a at a x B x P, segments back to back): int32 `([A*B*P], [A*B*P])`,
    the packed row of every slot (A*B*P where empty) and the slot of every packed row (A*B*P where none)."""
    regions, segments = counts_ab.shape
    total = regions * segments * slots
    counts_ab = counts_ab.astype(jnp.int32)
    region_start_a = jnp.arange(regions, dtype=jnp.int32) * segments * slots
    start_ab = jnp.cumsum(counts_ab, axis=1) - counts_ab + region_start_a[:, None]
    p = jnp.arange(slots, dtype=jnp.int32)
    row_abp = jnp.where(p < counts_ab[..., None], start_ab[..., None] + p, total).reshape(total)
    slot_m = jnp.full((total,), total, jnp.int32).at[row_abp].set(jnp.arange(total, dtype=jnp.int32), mode="drop")
    return row_abp, slot_m


def pack(x_abpd: jax.Array, counts_ab: jax.Array) -> jax.Array:
    """`[A, B, P, D]` -> packed `[A*B*P, D]` (zeros after each region's rows)."""
    regions, segments, slots, d = x_abpd.shape
    row_n, slot_m = packed_rows(counts_ab, slots)
    return gather_rows(x_abpd.reshape(-1, d), slot_m, row_n)


def unpack(y_md: jax.Array, counts_ab: jax.Array, slots: int) -> jax.Array:
    """Packed `[A*B*P, D]` -> `[A, B, P, D]` (zeros in the empty slots); the inverse of `pack`."""
    regions, segments = counts_ab.shape
    row_n, slot_m = packed_rows(counts_ab, slots)
    return gather_rows(y_md, row_n, slot_m).reshape(regions, segments, slots, y_md.shape[-1])


def exchange(x_abpd: jax.Array, send_counts_ab: jax.Array, recv_counts_ab: jax.Array, axis_name,
             all_to_all: Callable = jax.lax.ragged_all_to_all) -> jax.Array:
    """Region a of this device's `[A, B, P, D]` to device a of `axis_name` (inside `shard_map`), filled
    rows only: returns `[A, B, P, D]` whose region a is device a's region for this device.

    `send_counts_ab` are this buffer's filled rows per segment, `recv_counts_ab[a, b]` device a's
    `send_counts[m, b]` for this device m. `all_to_all` is `jax.lax.ragged_all_to_all` or its emulation.
    """
    regions, segments, slots, _ = x_abpd.shape
    region = segments * slots
    send_md = pack(x_abpd, send_counts_ab)
    offsets_a = jnp.arange(regions, dtype=jnp.int32) * region
    here_a = jnp.full((regions,), jax.lax.axis_index(axis_name) * region, jnp.int32)
    out_md = all_to_all(send_md, jnp.zeros_like(send_md), offsets_a, jnp.sum(send_counts_ab, axis=1, dtype=jnp.int32),
                        here_a, jnp.sum(recv_counts_ab, axis=1, dtype=jnp.int32), axis_name=axis_name)
    return unpack(out_md, recv_counts_ab, slots)


def emulated_ragged_all_to_all(operand, output, input_offsets, send_sizes, output_offsets, recv_sizes, *,
                               axis_name):
    """`jax.lax.ragged_all_to_all`'s documented semantics (one slice per device) from ordinary collectives:
    each slice padded to the operand's length, one all-to-all of the `[devices, N, ...]` blocks and of the
    output offsets, and a gather that writes every received slice at its offset."""
    devices, n = input_offsets.shape[0], operand.shape[0]
    r = jnp.arange(n, dtype=jnp.int32)
    blocks = jnp.take(operand, input_offsets[:, None] + r, axis=0, mode="fill", fill_value=0)
    mask = (r < send_sizes[:, None]).reshape(devices, n, *(1,) * (operand.ndim - 1))
    blocks = jax.lax.all_to_all(jnp.where(mask, blocks, 0), axis_name, 0, 0, tiled=False)
    where_y = jax.lax.all_to_all(output_offsets, axis_name, 0, 0, tiled=True)  # where each sender writes here
    m = jnp.arange(output.shape[0], dtype=jnp.int32)
    inside_ym = (m >= where_y[:, None]) & (m < (where_y + recv_sizes)[:, None])
    source_m = jnp.argmax(inside_ym, axis=0)
    received = blocks[source_m, jnp.clip(m - where_y[source_m], 0, n - 1)]
    return jnp.where(jnp.any(inside_ym, axis=0).reshape(-1, *(1,) * (output.ndim - 1)), received, output)
