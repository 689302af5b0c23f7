"""Host-side load-balance policy: where each expert should live (SmartMoE's placement).

Nothing here is traced or jitted. The train state keeps each MoE layer's
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
    """One MoE layer's adopted placement: its largest device load before and after, as fractions of all choices."""

    layer: int
    old_max_load: float
    new_max_load: float
    experts_moved: int
    placement: np.ndarray  # int [E]


def propose(load_ne: np.ndarray, placement_ne: np.ndarray, num_devices: int, margin: float
            ) -> tuple[np.ndarray, list[PlacementChange]]:
    """New placements `[n_moe, E]` for recent loads `[n_moe, E]`, and the layers that change.

    A layer keeps its placement unless the greedy one lowers its largest device
    load by at least `margin` (relative): moving experts costs an all-to-all of
    their weights and optimizer state, so small gains are not worth it.
    """
    load_ne, placement_ne = np.asarray(load_ne, np.float64), np.asarray(placement_ne)
    new_ne = placement_ne.copy()
    changes = []
    if num_devices <= 1:
        return new_ne, changes
    for layer, (load_e, placement_e) in enumerate(zip(load_ne, placement_ne)):
        old_max = float(device_loads(load_e, placement_e, num_devices).max())
        candidate = greedy_placement(load_e, num_devices)
        new_max = float(device_loads(load_e, candidate, num_devices).max())
        if new_max <= (1.0 - margin) * old_max and new_max < old_max:
            per_device = len(load_e) // num_devices
            # The greedy's device numbering is arbitrary: give each new group of experts the device that
            # already holds most of them, and keep experts that stay on their device in their old slot.
            candidate = _keep_slots(_match_devices(candidate, placement_e, per_device), placement_e, per_device)
            moved = int(np.sum(candidate != placement_e))
            new_ne[layer] = candidate
            changes.append(PlacementChange(layer, old_max, new_max, moved, candidate))
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
    """

    d_model: int
    expert_d_ff: int  # F' = the slice of F one device computes (F / tensor)
    weight_matrices: int  # 2 (GELU) or 3 (SwiGLU)
    bytes_per_element: int  # of the compute dtype
    num_devices: int  # X, devices of the "expert" axis
    tokens_per_step: float  # choices per step over the whole expert group (k x tokens)
    flop_rate: float  # FLOP/s per device, achieved on the expert matmuls
    link_bytes_per_s: float  # bytes/s per device across the expert axis

    def latency(self, load_e: np.ndarray, placement_e: np.ndarray, shadows: tuple[int, ...] = ()) -> float:
        """Predicted seconds of one layer's expert compute and communication with `shadows` copied."""
        x = self.num_devices
        tokens_e = np.asarray(load_e, np.float64) * self.tokens_per_step
        shadowed = np.zeros(len(tokens_e), bool)
        shadowed[list(shadows)] = True
        comp = 2.0 * self.weight_matrices * self.d_model * self.expert_d_ff / self.flop_rate
        feat = self.d_model * self.bytes_per_element / self.link_bytes_per_s
        model = self.weight_matrices * self.d_model * self.expert_d_ff * self.bytes_per_element / self.link_bytes_per_s
        own = device_loads(np.where(shadowed, 0.0, tokens_e), placement_e, x)
        busiest = float(np.max(own + tokens_e[shadowed].sum() / x))
        # tokens one device sends to the other devices' experts: its 1/x of the tokens, (x-1)/x off-device
        sent = float(tokens_e[~shadowed].sum()) / x * (x - 1) / x
        return 3.0 * comp * busiest + 4.0 * feat * sent + 4.0 * model * (x - 1) / x * len(shadows)


def choose_shadows(load_e: np.ndarray, placement_e: np.ndarray, max_shadows: int, cost: ShadowCostModel
                   ) -> tuple[np.ndarray, float, float]:
    """Shadow ids `[max_shadows]` minimising the predicted latency, greedily, and the latency without
    and with them.

    FasterMoE walks experts in load order and stops at the first that does not
    pay. Here each step adds whichever expert lowers the predicted latency most,
    and stops when none does: on 300 random 8-expert cases the load-order walk
    missed the brute-force optimum 17 times (by up to 17%), this one never
    (tests/test_load_balance.py). Unused slots hold `E` (no expert): the id
    array keeps its length, so a new set never recompiles.
    """
    experts = len(load_e)
    chosen: list[int] = []
    base = best = cost.latency(load_e, placement_e, ())
    while len(chosen) < max_shadows:
        trials = [(cost.latency(load_e, placement_e, (*chosen, e)), e) for e in range(experts) if e not in chosen]
        latency, expert = min(trials)
        if latency >= best:
            break
        chosen, best = [*chosen, expert], latency
    return np.array(chosen + [experts] * (max_shadows - len(chosen)), np.int32), base, best


def best_shadows_brute_force(load_e: np.ndarray, placement_e: np.ndarray, max_shadows: int,
                             cost: ShadowCostModel) -> tuple[tuple[int, ...], float]:
    """The exact minimum of the latency model over every set of at most `max_shadows` experts (tests)."""
    import itertools

    experts = range(len(load_e))
    candidates = (s for r in range(max_shadows + 1) for s in itertools.combinations(experts, r))
    return min(((s, cost.latency(load_e, placement_e, s)) for s in candidates), key=lambda t: t[1])
