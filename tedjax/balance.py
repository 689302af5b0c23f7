"""Host-side load-balance policy: where each expert should live (SmartMoE's placement) and which experts
to copy to every device (FasterMoE's shadows), with the reasons for each decision.

Nothing here is traced into the train step (`measure_rates` times two small
programs once at start). The train state keeps each MoE layer's
recent expert load (`MoE.load_mean`) and its placement (logical expert ->
physical slot; slot s lives on device s // experts_per_device of the "expert"
axis). Every `balance.every` steps the loop reads both, asks `propose` for new
placements, and hands any it adopts to `Trainer.move_experts`, which moves
the weights and their optimizer state in one jitted call.

Why it matters under static shapes (NOTES.md section 8): with device-pooled
capacity, a device's experts share its slots, so the most loaded *device*
sets the drops. Pairing hot experts with cold ones on the same device lowers
that maximum, and with it the drops at a given capacity factor, or the
capacity factor (so bytes and FLOPs) needed for a target drop rate.
"""

from __future__ import annotations

import dataclasses
import math
import statistics
import time
from typing import Any

import numpy as np


def device_loads(load_e: np.ndarray, placement_e: np.ndarray, num_devices: int) -> np.ndarray:
    """Load per device `[X]` of expert loads `[E]` placed by `placement_e` (logical expert -> slot)."""
    load_e, placement_e = np.asarray(load_e, np.float64), np.asarray(placement_e)
    per_device = len(load_e) // num_devices
    return np.bincount(placement_e // per_device, weights=load_e, minlength=num_devices)


def greedy_placement(load_e: np.ndarray, num_devices: int) -> np.ndarray:
    """SmartMoE's greedy (longest processing time first): heaviest expert first, onto the least-loaded
    device that still has a free slot. Returns the placement `[E]` (logical expert -> slot).

    Ties go to the lower device id and, among equal loads, the lower expert id, so the result
    is deterministic. Each device's slots are filled in order.
    """
    load_e = np.asarray(load_e, np.float64)
    experts = len(load_e)
    if num_devices < 1 or experts % num_devices:
        raise ValueError(f"{experts} experts do not divide over {num_devices} devices of the expert axis; "
                         "choose a mesh whose expert axis divides num_experts")
    per_device = experts // num_devices
    device_load = np.zeros(num_devices)
    filled = np.zeros(num_devices, np.int64)
    placement = np.empty(experts, np.int64)
    for expert in sorted(range(experts), key=lambda e: (-load_e[e], e)):
        open_devices = np.flatnonzero(filled < per_device)
        device = open_devices[np.argmin(device_load[open_devices])]
        placement[expert] = device * per_device + filled[device]
        filled[device] += 1
        device_load[device] += load_e[expert]
    return placement


@dataclasses.dataclass(frozen=True)
class PlacementChange:
    """One MoE layer's placement decision: its largest device load now and under the greedy placement (fractions
    of all choices), and whether it was adopted. `propose` returns the adopted ones; `decide_placements` all."""

    layer: int
    old_max_load: float
    new_max_load: float
    experts_moved: int
    placement: np.ndarray  # int [E]: the greedy placement (adopted or not), devices matched to the current one
    adopted: bool = True
    gain_s: float = 0.0  # predicted layer time saved per step (with a cost model)


@dataclasses.dataclass(frozen=True)
class PoolDrops:
    """What a placement changes under static device pools: drops. Each routing group sends
    `choices_per_group` (S x k) choices, device x's pool keeps at most `pool_rows` of them; a group's count
    on device x is taken as Binomial(S k, x's share of the load), so a placement's expected dropped
    fraction is sum_x E[(count_x - pool_rows)+] / (S k)."""

    choices_per_group: int
    pool_rows: int

    def dropped(self, load_e: np.ndarray, placement_e: np.ndarray, num_devices: int) -> float:
        load_x = device_loads(load_e, placement_e, num_devices)
        share_x = np.clip(load_x / max(float(load_x.sum()), 1e-12), 0.0, 1.0)
        n = self.choices_per_group
        c = np.arange(self.pool_rows + 1, n + 1)
        if c.size == 0:
            return 0.0
        log_comb = np.array([math.lgamma(n + 1) - math.lgamma(k + 1) - math.lgamma(n - k + 1) for k in c])
        over = 0.0
        for p in share_x:
            if p <= 0.0:
                continue
            if p >= 1.0:
                over += n - self.pool_rows
                continue
            over += float(np.sum((c - self.pool_rows) * np.exp(log_comb + c * math.log(p) + (n - c) * math.log1p(-p))))
        return over / n


def decide_placements(load_ne: np.ndarray, placement_ne: np.ndarray, num_devices: int, margin: float,
                      cost: ShadowCostModel | None = None, window: int = 0, move_s: float = 0.0, *,
                      pools: PoolDrops | None = None, step_s: float = 0.0, earlier_load_ne: np.ndarray | None = None
                      ) -> list[PlacementChange]:
    """Every MoE layer's decision for recent loads `[n_moe, E]` at placements `[n_moe, E]` (empty on one device).

    A layer adopts the greedy placement only if it lowers the layer's largest
    device load by at least `margin` (relative) and, given a `cost` model,
    only if the layer time it saves per step over `window` steps exceeds
    `move_s`, the time of moving one layer's experts and optimizer state
    (hysteresis: a placement that pays back only after the next decision is
    not worth its move).

    With static device `pools` the step takes the same time whatever the
    placement: what it saves is dropped choices, priced at the time it takes
    to train that many (`pools.dropped` x `step_s` per step; before a step
    time is known, x the layer time `cost` predicts, a lower bound). Loads
    drift and a greedy fitted to one window always looks better on it, so
    with `earlier_load_ne` (the loads of the previous decisions, `[n_moe, E]`
    or `[w, n_moe, E]`) the greedy is fitted to the mean of all the windows,
    and its gain is the smallest of its gains on each: it must hold over the
    window, not only on the sample it was chosen on.
    """
    load_ne, placement_ne = np.asarray(load_ne, np.float64), np.asarray(placement_ne)
    decisions = []
    if num_devices <= 1:
        return decisions
    per_device = load_ne.shape[1] // num_devices
    earlier = np.zeros((0, *load_ne.shape)) if earlier_load_ne is None else np.asarray(earlier_load_ne, np.float64)
    samples_ne = [load_ne, *earlier.reshape(-1, *load_ne.shape)]
    load_ne = np.mean(samples_ne, axis=0)
    for layer, (load_e, placement_e) in enumerate(zip(load_ne, placement_ne)):
        old_max = float(device_loads(load_e, placement_e, num_devices).max())
        candidate = greedy_placement(load_e, num_devices)
        new_max = float(device_loads(load_e, candidate, num_devices).max())
        # The greedy's device numbering is arbitrary: give each new group of experts the device that
        # already holds most of them, and keep experts that stay on their device in their old slot.
        candidate = _keep_slots(_match_devices(candidate, placement_e, per_device), placement_e, per_device)
        adopted = new_max <= (1.0 - margin) * old_max and new_max < old_max
        if pools is not None:
            price_s = step_s if step_s > 0 else cost.latency(load_e, placement_e) if cost is not None else 0.0
            gain = price_s * min(pools.dropped(sample[layer], placement_e, num_devices)
                                - pools.dropped(sample[layer], candidate, num_devices) for sample in samples_ne)
        else:
            gain = cost.latency(load_e, placement_e) - cost.latency(load_e, candidate) if cost is not None else 0.0
        if cost is not None or pools is not None:
            adopted = adopted and gain * window > move_s
        decisions.append(PlacementChange(layer, old_max, new_max, int(np.sum(candidate != placement_e)), candidate,
                                         bool(adopted), float(gain)))
    return decisions


def propose(load_ne: np.ndarray, placement_ne: np.ndarray, num_devices: int, margin: float
            ) -> tuple[np.ndarray, list[PlacementChange]]:
    """New placements `[n_moe, E]` for recent loads `[n_moe, E]`, and the layers that adopt a new one
    (`decide_placements`)."""
    new_ne = np.asarray(placement_ne).copy()
    changes = [d for d in decide_placements(load_ne, placement_ne, num_devices, margin) if d.adopted]
    for change in changes:
        new_ne[change.layer] = change.placement
    return new_ne, changes


def _match_devices(new_e: np.ndarray, old_e: np.ndarray, per_device: int) -> np.ndarray:
    """`new_e` with its devices renumbered so each group of experts lands where most of them already are
    (greedy matching on overlap, largest first)."""
    devices = len(new_e) // per_device
    overlap = np.zeros((devices, devices), np.int64)  # [new device, old device]
    np.add.at(overlap, (new_e // per_device, old_e // per_device), 1)
    target = {}
    for flat in np.argsort(-overlap, axis=None, kind="stable"):
        new_device, old_device = divmod(int(flat), devices)
        if new_device not in target and old_device not in target.values():
            target[new_device] = old_device
    return np.array([target[s // per_device] * per_device + s % per_device for s in new_e])


def _keep_slots(new_e: np.ndarray, old_e: np.ndarray, per_device: int) -> np.ndarray:
    """The same device assignment as `new_e`, with each expert that stays on its device in its old slot."""
    out = np.empty_like(new_e)
    for device in np.unique(new_e // per_device):
        members = np.flatnonzero(new_e // per_device == device)
        stay = [e for e in members if old_e[e] // per_device == device]
        taken = {int(old_e[e]) for e in stay}
        free = iter(s for s in range(device * per_device, (device + 1) * per_device) if s not in taken)
        for e in members:
            out[e] = old_e[e] if e in stay else next(free)
    return out


# ----------------------------------------------------------------------------- shadow experts (FasterMoE)


@dataclasses.dataclass(frozen=True)
class ShadowCostModel:
    """FasterMoE's step-latency model (NOTES.md section 8.4) with tedjax's quantities, for one MoE layer.

    Per token routed to expert e (B_e tokens per step over the expert group):
    comp = 2 m D F' / flop_rate for its forward FLOPs (m weight matrices, F' =
    F / tensor), and 3 comp with the backward; feat = D b / link for its
    features (b bytes per element), sent out and back, forward and backward:
    4 feat. A shadow costs the all-reduce that gathers its weights (R x D x F'
    per matrix, sent 2 (X-1)/X times) and the one that reduces its gradients:
    4 model (X-1)/X, model = m D F' b / link. Shadowed tokens are computed
    where they are, spread evenly over the X devices.

    `buffers` says what a device computes and sends. "routed" (FasterMoE's
    own model, dynamic shapes): the tokens routed to it. Under tedjax's static
    capacity every buffer has one size, so an imbalance costs either drops (at
    a fixed capacity factor) or time (at the capacity that keeps every
    token). "expert" and "device" price the second: each expert's buffer holds
    as many tokens as the busiest expert gets (per-expert capacity), or each
    device's pool as many as the busiest device gets (device pools). A shadow
    then pays when it lowers that busiest buffer by more than its copy costs,
    which is how it cuts drops at a fixed capacity factor.
    """

    d_model: int
    expert_d_ff: int  # F' = the slice of F one device computes (F / tensor)
    weight_matrices: int  # 2 (GELU) or 3 (SwiGLU)
    bytes_per_element: int  # of the compute dtype
    num_devices: int  # X, devices of the "expert" axis
    tokens_per_step: float  # choices per step over the whole expert group (k x tokens)
    flop_rate: float  # FLOP/s per device, achieved on the expert matmuls
    link_bytes_per_s: float  # bytes/s per device across the expert axis
    buffers: str = "routed"  # "routed" (FasterMoE), "expert" or "device" (static capacity that keeps every token)

    def __post_init__(self):
        if self.buffers not in ("routed", "expert", "device"):
            raise ValueError(f"buffers must be 'routed', 'expert' or 'device', got {self.buffers!r}")

    def latency(self, load_e: np.ndarray, placement_e: np.ndarray, shadows: tuple[int, ...] = ()) -> float:
        """Predicted seconds of one layer's expert compute and communication with `shadows` copied."""
        x = self.num_devices
        tokens_e = np.asarray(load_e, np.float64) * self.tokens_per_step
        shadowed = np.zeros(len(tokens_e), bool)
        shadowed[list(shadows)] = True
        comp = 2.0 * self.weight_matrices * self.d_model * self.expert_d_ff / self.flop_rate
        feat = self.d_model * self.bytes_per_element / self.link_bytes_per_s
        model = self.weight_matrices * self.d_model * self.expert_d_ff * self.bytes_per_element / self.link_bytes_per_s
        pooled_e = np.where(shadowed, 0.0, tokens_e)
        local = tokens_e[shadowed].sum() / x
        if self.buffers == "routed":
            busiest = float(np.max(device_loads(pooled_e, placement_e, x))) + local
            rows = float(pooled_e.sum())  # over the expert group: each device sends (x-1)/x of its 1/x
        elif self.buffers == "expert":  # E buffers of the busiest expert's size, E/x of them per device
            busiest = len(tokens_e) / x * float(pooled_e.max()) + local
            rows = len(tokens_e) * float(pooled_e.max())
        else:  # x pools of the busiest device's size, one per device
            busiest = float(np.max(device_loads(pooled_e, placement_e, x))) + local
            rows = x * (busiest - local)
        # tokens one device sends to the other devices' experts: its 1/x of the rows, (x-1)/x off-device
        sent = rows / x * (x - 1) / x
        return 3.0 * comp * busiest + 4.0 * feat * sent + 4.0 * model * (x - 1) / x * len(shadows)

    def copy_s(self) -> float:
        """Seconds per step one shadow costs each device: the all-reduces that gather its weights and
        reduce its gradients, 4 model (X-1)/X."""
        x = self.num_devices
        return 4.0 * self.weight_matrices * self.d_model * self.expert_d_ff * self.bytes_per_element \
            / self.link_bytes_per_s * (x - 1) / x

    def keep_s(self, fraction: float) -> float:
        """Seconds per step that keeping `fraction` of all choices of one expert costs its device beyond what
        they cost as a shadow's local rows: on the owner they are computed there (3 comp each) and the
        (X-1)/X of them from other devices cross the link (4 feat); as a shadow's they are spread over the X
        devices. The difference, (X-1)/X (3 comp + 4 feat) per choice, is what a shadow's copy must undercut."""
        x = self.num_devices
        comp = 2.0 * self.weight_matrices * self.d_model * self.expert_d_ff / self.flop_rate
        feat = self.d_model * self.bytes_per_element / self.link_bytes_per_s
        return fraction * self.tokens_per_step * (x - 1) / x * (3.0 * comp + 4.0 * feat)


def choose_shadows(load_e: np.ndarray, placement_e: np.ndarray, max_shadows: int, cost: ShadowCostModel,
                   exact_up_to: int = 4096) -> tuple[np.ndarray, float, float]:
    """Shadow ids `[max_shadows]` minimising the predicted latency, greedily, and the latency without
    and with them.

    FasterMoE walks experts in load order and stops at the first that does not
    pay. Here each step adds whichever expert lowers the predicted latency
    most, walking on to `max_shadows` even through a step that does not pay
    (with static buffers two hot experts of one size only pay together), and
    the best prefix of that walk, of the load-order walk or of the busiest
    device's experts wins. Up to `exact_up_to` candidate sets are searched
    exactly instead (tests/test_shadows_and_chunks.py measures the walks). Unused slots hold `E` (no expert): the
    id array keeps its length, so a new set never recompiles.
    """
    experts = len(load_e)
    base = cost.latency(load_e, placement_e, ())
    if sum(math.comb(experts, r) for r in range(max_shadows + 1)) <= exact_up_to:
        # where compute dominates it is a partition problem (which experts to spread): the walks below miss the
        # optimum by up to 19% on random 8-expert cases, so small cases (E = 64, R = 2: 2081 sets) are exact
        best_set, best = best_shadows_brute_force(load_e, placement_e, max_shadows, cost)
        return np.array([*best_set] + [experts] * (max_shadows - len(best_set)), np.int32), base, best
    walk: list[int] = []
    while len(walk) < max_shadows:
        walk.append(min((cost.latency(load_e, placement_e, (*walk, e)), e) for e in range(experts) if e not in walk)[1])
    load_e = np.asarray(load_e, np.float64)
    by_load = [int(e) for e in np.argsort(-load_e, kind="stable")[:max_shadows]]
    per_device = experts // cost.num_devices
    device_e = device_loads(load_e, placement_e, cost.num_devices)[np.asarray(placement_e) // per_device]
    by_device = [int(e) for e in np.lexsort((-load_e, -device_e))[:max_shadows]]  # the busiest device's, hottest first
    chosen, best = [], base
    for order in (walk, by_load, by_device):
        for r in range(1, max_shadows + 1):
            latency = cost.latency(load_e, placement_e, tuple(order[:r]))
            if latency < best:
                chosen, best = order[:r], latency
    return np.array(chosen + [experts] * (max_shadows - len(chosen)), np.int32), base, best


def best_shadows_brute_force(load_e: np.ndarray, placement_e: np.ndarray, max_shadows: int,
                             cost: ShadowCostModel) -> tuple[tuple[int, ...], float]:
    """The exact minimum of the latency model over every set of at most `max_shadows` experts (tests)."""
    import itertools

    experts = range(len(load_e))
    candidates = (s for r in range(max_shadows + 1) for s in itertools.combinations(experts, r))
    return min(((s, cost.latency(load_e, placement_e, s)) for s in candidates), key=lambda t: t[1])


def choose_shadows_for_drops(gain_e: np.ndarray, max_shadows: int, cost: ShadowCostModel) -> np.ndarray:
    """Shadow ids `[max_shadows]` that keep the most dropped choices, under static capacity.

    `gain_e` `[E]` is the fraction of all choices a shadow of each expert would
    keep from drops (`MoE.gain_mean`, measured on every choice whatever is
    shadowed). Experts are taken by gain, each only if it keeps some choice
    and its copy costs less than keeping the same choices through its pool
    would (`cost.copy_s() < cost.keep_s(gain)`): where copying is too slow
    (fast matmuls, small layers) none is chosen. Gains add exactly with
    per-expert capacity; two shadows of one device pool save at most the
    sum. Unused slots hold `E`; the ids are sorted, so the same set is never a change.
    """
    gain_e = np.asarray(gain_e, np.float64)
    chosen = sorted(int(e) for e in np.argsort(-gain_e, kind="stable")[:max_shadows]
                    if gain_e[e] > 0 and cost.keep_s(gain_e[e]) > cost.copy_s())  # sorted: a set, not an order
    return np.array(chosen + [len(gain_e)] * (max_shadows - len(chosen)), np.int32)


@dataclasses.dataclass(frozen=True)
class ShadowDecision:
    """One MoE layer's shadow choice and its reasons: the predicted layer time without shadows, with the chosen
    ones, and with one expert more (the best one not chosen: what made the greedy stop)."""

    layer: int
    ids: np.ndarray  # int [R]: the chosen experts, then E for each empty slot (the state's `shadow_ids`)
    chosen: tuple[int, ...]  # the chosen experts; () = none
    changed: bool  # differs from the set the layer had
    latency_s: float
    with_shadows_s: float  # = latency_s when none is chosen
    one_more_s: float
    # the drop policy's reasons (static capacity, `gain_e` given; None under the latency policy): the fraction of
    # all choices the chosen shadows keep from drops, the time per step of their copies, and of keeping the same
    # choices through the pools (`ShadowCostModel.keep_s`); if none is chosen, those of the best candidate
    saved: float | None = None
    copy_s: float | None = None
    keep_s: float | None = None


def decide_shadows(layer: int, load_e: np.ndarray, placement_e: np.ndarray, max_shadows: int, cost: ShadowCostModel,
                   current_e: np.ndarray, gain_e: np.ndarray | None = None) -> ShadowDecision:
    """One layer's shadows, now `current_e` `[R]`, with the predicted figures that explain them.

    Without `gain_e`: FasterMoE's latency policy (`choose_shadows`; dropless
    pools, where time is what a shadow buys). With `gain_e` `[E]` (static
    capacity, where a shadow buys fewer drops): `choose_shadows_for_drops`.
    The latency model's times are given either way.
    """
    if gain_e is None:
        ids, before, after = choose_shadows(load_e, placement_e, max_shadows, cost)
    else:
        ids = choose_shadows_for_drops(gain_e, max_shadows, cost)
    chosen = tuple(int(e) for e in ids if e < len(load_e))
    if gain_e is not None:
        before, after = cost.latency(load_e, placement_e, ()), cost.latency(load_e, placement_e, chosen)
    one_more = min(cost.latency(load_e, placement_e, (*chosen, e)) for e in range(len(load_e)) if e not in chosen)
    decision = ShadowDecision(layer, ids, chosen, not np.array_equal(ids, current_e), before, after, one_more)
    if gain_e is None:
        return decision
    gain_e = np.asarray(gain_e, np.float64)
    saved = float(gain_e[list(chosen)].sum()) if chosen else float(gain_e.max())  # if none: the best candidate's
    return dataclasses.replace(decision, saved=saved, copy_s=cost.copy_s() * max(len(chosen), 1),
                               keep_s=cost.keep_s(saved))


# ----------------------------------------------------------------------------- the cost model's rates


@dataclasses.dataclass(frozen=True)
class Rates:
    """The shadow cost model's per-device rates and where each came from (said at start and in every record)."""

    matmul_tflops: float  # achieved on the expert matmuls
    link_gbytes_per_s: float  # one device's bytes/s to the others of the "expert" axis
    source: str

    def describe(self) -> str:
        return (f"matmul {self.matmul_tflops:.4g} TFLOP/s, link {self.link_gbytes_per_s:.4g} GB/s per device "
                f"({self.source})")


def cluster_rates(path: str, dtype: str, layout: tuple[int, int, int]) -> tuple[float, float, str]:
    """(TFLOP/s, GB/s, source) of a cluster preset, read as the planner reads it (`tedjax.plan.Cluster`):
    the peak matmul rate of `dtype`, and NVLink's bandwidth if one "expert" group of `layout` fits in a node,
    else the network's."""
    from tedjax.plan import Cluster, _crosses_nodes

    cluster = Cluster.load(path)
    inter = _crosses_nodes(layout, ("expert",), cluster.gpus_per_node)
    link = cluster.inter_node_gbps if inter else cluster.intra_node_gbps
    source = (f"cluster {cluster.name} from {path}: peak {dtype} matmul, "
              f"{'network' if inter else 'NVLink'} bandwidth for the expert axis")
    return cluster.peak_flops(dtype) / 1e12, float(link), source


def measure_rates(mesh: Any, d_model: int, d_ff: int, rows: int, weight_matrices: int, dtype: Any,
                  repeats: int = 5) -> tuple[float, float]:
    """(TFLOP/s, GB/s) per device, achieved on `mesh`'s devices all at once (as in a step), median of `repeats`.

    Matmul: each device multiplies `[rows, D] x [D, F']` (the expert GEMM).
    Link: each device sends one expert's weights (`weight_matrices` x D x F',
    what a shadow copies) to its neighbour on "expert" (a ppermute). Costs two
    small compiles and about a second on 8 CPU devices.
    """
    import jax
    import jax.numpy as jnp
    from jax.sharding import NamedSharding, PartitionSpec

    axes = tuple(mesh.axis_names)
    split = PartitionSpec(axes)
    sharding = NamedSharding(mesh, split)
    rows = int(max(8, min(rows, 4096)))
    x = jax.device_put(jnp.ones((mesh.size * rows, d_model), dtype), sharding)
    w = jax.device_put(jnp.ones((mesh.size * d_model, d_ff), dtype), sharding)
    matmul = jax.jit(jax.shard_map(lambda x, w: x @ w, mesh=mesh, in_specs=(split, split), out_specs=split))
    ring = [(i, (i + 1) % mesh.shape["expert"]) for i in range(mesh.shape["expert"])]
    block = jax.device_put(jnp.ones((mesh.size * weight_matrices * d_model, d_ff), dtype), sharding)
    send = jax.jit(jax.shard_map(lambda b: jax.lax.ppermute(b, "expert", ring), mesh=mesh, in_specs=split,
                                 out_specs=split))

    def seconds(fn, *args):
        jax.block_until_ready(fn(*args))  # compile and warm up
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            jax.block_until_ready(fn(*args))
            times.append(time.perf_counter() - start)
        return statistics.median(times)

    flops = 2.0 * rows * d_model * d_ff
    sent = weight_matrices * d_model * d_ff * jnp.dtype(dtype).itemsize
    return flops / seconds(matmul, x, w) / 1e12, sent / seconds(send, block) / 1e9


def resolve_rates(config: Any, mesh: Any) -> Rates:
    """The rates for `config` (a TrainConfig) on `mesh`, each from the first that applies:
    `balance.matmul_tflops` / `balance.link_gbytes_per_s` (> 0), `balance.cluster`, or measured here."""
    b, m = config.balance, config.model
    layout = tuple(int(mesh.shape[a]) for a in ("data", "expert", "tensor"))
    sources = {}
    matmul, link = b.matmul_tflops, b.link_gbytes_per_s
    if matmul:
        sources["matmul"] = "balance.matmul_tflops"
    if link:
        sources["link"] = "balance.link_gbytes_per_s"
    if (not matmul or not link) and b.cluster:
        c_matmul, c_link, source = cluster_rates(b.cluster, m.dtype, layout)
        matmul, link = matmul or c_matmul, link or c_link
        sources.setdefault("matmul", source)
        sources.setdefault("link", source)
    if not matmul or not link:
        tokens = m.top_k * config.data.micro_batch_size * config.data.seq_len / (layout[0] * layout[1])
        measured = measure_rates(mesh, m.d_model, m.expert_d_ff // layout[2], int(tokens),
                                 3 if m.activation == "swiglu" else 2, m.compute_dtype)
        where = (f"measured at start on these {mesh.size} {mesh.devices.flat[0].platform} devices; "
                 "set balance.cluster for a target cluster's")
        matmul, link = matmul or measured[0], link or measured[1]
        sources.setdefault("matmul", where)
        sources.setdefault("link", where)
    source = sources["matmul"] if sources["matmul"] == sources["link"] else (
        f"matmul: {sources['matmul']}; link: {sources['link']}")
    return Rates(float(matmul), float(link), source)


def cannot_act(config: Any, expert_devices: int) -> list[str]:
    """Warnings for the balance switches of `config` (a TrainConfig) that cannot act with `expert_devices` on
    the "expert" axis. (Switches that cannot act on any mesh are refused by the config itself.) They are
    warnings, not errors: a run may resume onto a mesh where they act again."""
    m, b = config.model, config.balance
    out = []
    if m.shadow_experts and expert_devices == 1:
        out.append(f'model.shadow_experts={m.shadow_experts} cannot act: one device on "expert" (mesh.expert=1) '
                   "holds every expert, so a shadow keeps no token off a link and the cost model never chooses "
                   "one; use mesh.expert > 1, or model.shadow_experts=0")
    if b.every and expert_devices == 1:
        out.append(f'balance.every={b.every} cannot act: with one device on "expert" (mesh.expert=1) there is '
                   "nowhere to move an expert; use mesh.expert > 1, or balance.every=0")
    if not m.shadow_experts and (b.cluster or b.matmul_tflops or b.link_gbytes_per_s):
        out.append("balance.cluster / matmul_tflops / link_gbytes_per_s set the shadow cost model's rates, and "
                   "model.shadow_experts=0: they are not used")
    return out


def describe_shadows(step: int, decisions: list[ShadowDecision]) -> str:
    """One log line for a shadow decision: each layer's choice and the predicted layer times behind it."""
    parts = []
    for d in decisions:
        ms = lambda s: f"{s * 1e3:.3g} ms"  # noqa: E731
        if d.saved is not None and d.chosen:
            parts.append(f"L{d.layer} {list(d.chosen)}{' (new)' if d.changed else ''}: keep {d.saved:.2%} of choices "
                         f"from drops; predicted {ms(d.copy_s)} of copies, {ms(d.keep_s)} to keep them by the pools")
        elif d.saved is not None:
            why = (f"the best would keep {d.saved:.2%} of choices from drops, but its copy costs {ms(d.copy_s)} "
                   f"(predicted), more than the {ms(d.keep_s)} of keeping them by the pools" if d.saved > 0
                   else "no shadow would keep a dropped choice")
            parts.append(f"L{d.layer} none chosen: {why}")
        elif d.chosen:
            parts.append(f"L{d.layer} {list(d.chosen)}{' (new)' if d.changed else ''}: predicted {ms(d.latency_s)} "
                         f"without, {ms(d.with_shadows_s)} with")
        else:
            parts.append(f"L{d.layer} none chosen: predicted {ms(d.latency_s)} without, {ms(d.one_more_s)} with "
                         "the best one")
    return f"step {step} shadows: " + "; ".join(parts)


def describe_placement(step: int, decisions: list[PlacementChange], margin: float, layer_bytes: float,
                       window: int = 0, move_s: float = 0.0) -> str:
    """One log line for a placement decision: each layer's largest device load now and under the greedy, adopted
    or kept and why, and the bytes per device that moving one layer sends (only adopting layers move)."""
    parts = []
    for d in decisions:
        ms = lambda s: f"{s * 1e3:.3g} ms"  # noqa: E731
        if d.adopted:
            verdict = f"adopted, {d.experts_moved} experts move"
        elif d.new_max_load >= d.old_max_load or d.new_max_load > (1.0 - margin) * d.old_max_load:
            verdict = f"kept (gain under the {margin:.0%} margin)"
        else:
            verdict = f"kept (saves {ms(d.gain_s)}/step x {window} steps < a move's {ms(move_s)})"
        parts.append(f"L{d.layer} max device load {d.old_max_load:.3f} -> {d.new_max_load:.3f} {verdict}")
    return (f"step {step} placement: " + "; ".join(parts)
            + f"; moving a layer sends {layer_bytes / 2**20:.3g} MiB per device")


# ----------------------------------------------------------------------------- across nodes (FasterMoE's topology)

REMOTE_FRACTION_FLOOR = 0.14  # fastmoe's FMOE_TOPO default outgoing fraction: the least r `propose_remote_fraction` gives


@dataclasses.dataclass(frozen=True)
class TopologyCostModel:
    """ShadowCostModel's sibling on a two-level network: one MoE all-to-all, flat or hierarchical, at remote fraction r.

    The expert axis has X devices, n of them in each node, N = X / n nodes. A
    device's buffer of V bytes holds X equal parts, one per destination.

    flat: the n - 1 parts for the node's peers go over NVLink while the X - n
    parts for other nodes go over the network, at once:
        t_flat = alpha + max(V (n-1)/X / B_intra, V (X-n)/X / B_inter)
    Under static shapes the topology-aware gate's room per routing group
    stays that of r = 1 (own-node pools take the slots remote pools give up,
    `routing.own_node_capacity`), and the flat exchange sizes every pool at
    the own-node size: its buffer grows by 1 + (N-1)(1-r) (`flat_growth`;
    less where that reaches a pool's most, as with dropless pools).

    hierarchical: an all-to-all inside the node groups the rows by destination
    node (V (n-1)/n over NVLink; taken at full size), then one all-to-all
    between the N devices of each local rank carries the other nodes'
    buffers, which the gate makes r times the size:
        t_hier(r) = alpha_intra + V (n-1)/n / B_intra + alpha_inter + r V (N-1)/N / B_inter
    At r = 1 it sends the same network bytes as flat plus an NVLink phase, so
    it pays only with the gate. Latency (alpha) as the planner's: a fixed
    cost per op and one per step, (X - 1) steps for flat (the step of the
    slowest link it crosses), n - 1 NVLink and N - 1 network steps for the
    two phases.
    """

    expert_devices: int  # X
    node_devices: int  # n: devices of one expert group in one node (X when the group stays in a node)
    intra_bytes_per_s: float  # NVLink, per device, one direction
    inter_bytes_per_s: float  # network share of one device, one direction
    op_latency_s: float = 0.0
    intra_step_s: float = 0.0
    inter_step_s: float = 0.0

    def __post_init__(self):
        x, n = self.expert_devices, self.node_devices
        if n < 1 or x < 1 or x % n:
            raise ValueError(f"node_devices={n} must divide expert_devices={x}: a node holds whole runs of expert "
                             "ranks (set mesh.node_size to a divisor or multiple of the expert axis)")
        if not 0 < self.inter_bytes_per_s <= self.intra_bytes_per_s:
            raise ValueError(f"inter_bytes_per_s={self.inter_bytes_per_s} must be > 0 and <= intra_bytes_per_s="
                             f"{self.intra_bytes_per_s}: the network is never faster than NVLink")

    @property
    def nodes(self) -> int:
        return self.expert_devices // self.node_devices

    def flat_s(self, buffer_bytes: float) -> float:
        """Seconds of one flat all-to-all of a `buffer_bytes` buffer per device."""
        x, n = self.expert_devices, self.node_devices
        step = self.inter_step_s if self.nodes > 1 else self.intra_step_s
        alpha = self.op_latency_s + (x - 1) * step if x > 1 else 0.0
        return alpha + max(buffer_bytes * (n - 1) / x / self.intra_bytes_per_s,
                           buffer_bytes * (x - n) / x / self.inter_bytes_per_s)

    def phases_s(self, buffer_bytes: float, r: float) -> tuple[float, float]:
        """(NVLink phase, network phase) seconds of one hierarchical all-to-all at remote fraction `r`."""
        n, nodes = self.node_devices, self.nodes
        intra = (self.op_latency_s + (n - 1) * self.intra_step_s + buffer_bytes * (n - 1) / n / self.intra_bytes_per_s
                 if n > 1 else 0.0)
        inter = (self.op_latency_s + (nodes - 1) * self.inter_step_s
                 + r * buffer_bytes * (nodes - 1) / nodes / self.inter_bytes_per_s if nodes > 1 else 0.0)
        return intra, inter

    def hierarchical_s(self, buffer_bytes: float, r: float) -> float:
        """Seconds of one hierarchical all-to-all (the two phases run one after the other)."""
        return sum(self.phases_s(buffer_bytes, r))

    def flat_growth(self, r: float) -> float:
        """Size of the flat exchange's buffer with the gate at `r`, over r = 1's: every pool is sized as an
        own-node one, P + (N-1)(P - rP)."""
        return 1.0 + (self.nodes - 1) * (1.0 - r)

    def seconds(self, buffer_bytes: float, a2a: str = "flat", r: float = 1.0) -> float:
        """Seconds of one all-to-all as `model.a2a` and `model.remote_fraction` set it (`buffer_bytes`: the
        buffer at r = 1)."""
        if a2a not in ("flat", "hierarchical"):
            raise ValueError(f"a2a must be 'flat' or 'hierarchical', got {a2a!r}")
        if a2a == "flat":
            return self.flat_s(buffer_bytes * self.flat_growth(r))
        return self.hierarchical_s(buffer_bytes, r)

    def balanced_fraction(self) -> float:
        """r at which the network phase takes as long as the NVLink phase (bytes only):
        ((n-1)/n / B_intra) / ((N-1)/N / B_inter); 1.0 when the group stays in one node."""
        n, nodes = self.node_devices, self.nodes
        if nodes == 1:
            return 1.0
        return ((n - 1) / n / self.intra_bytes_per_s) / ((nodes - 1) / nodes / self.inter_bytes_per_s)

    def propose_remote_fraction(self, floor: float = REMOTE_FRACTION_FLOOR) -> float:
        """r for this layer and cluster: max(floor, balanced_fraction()), at most 1.

        The hierarchical time falls linearly in r, so the unconstrained minimum
        is always the floor. Below the balanced r the NVLink phase is the
        larger one: lowering r further saves less than the time already left
        on NVLink (and, with the phases overlapped in chunks, t = max(NVLink,
        network) saves nothing), while each step down redirects more choices
        away from their best expert. So r stops at the balanced point, or at
        the floor (fastmoe's 0.14) where that is lower. On a DGX-H100 (450 vs
        50 GB/s) with 8 expert ranks per node on 4 nodes it is 0.13 -> 0.14.
        """
        if not 0 < floor <= 1:
            raise ValueError(f"floor must be in (0, 1], got {floor!r}")
        return 1.0 if self.nodes == 1 else min(1.0, max(floor, self.balanced_fraction()))
