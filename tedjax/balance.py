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
            moved = int(np.sum(candidate // per_device != placement_e // per_device))
            # Keep experts that stay on their device in their old slot: fewer bytes would need to move.
            candidate = _keep_slots(candidate, placement_e, per_device)
            new_ne[layer] = candidate
            changes.append(PlacementChange(layer, old_max, new_max, moved, candidate))
    return new_ne, changes


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
