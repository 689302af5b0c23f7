"""Host (CPU) runtime settings that XLA:CPU runs faster with.

XLA:CPU allocates every executable's temporaries afresh on each call, as one
block per device of roughly the program's peak temporary memory. glibc's
malloc serves blocks above its mmap threshold (at most 32 MiB) with a fresh
`mmap` and gives them back with `munmap` on free, and it unmaps a thread's
heap once it is empty, so every training step page-faults all of its
temporaries in again, zero-filled by the kernel. In the top-2 MoE layer of
`benchmarks/moe_profile.py` (8 simulated devices, 45 MiB of temporaries per
device) that was 93k page faults and a fifth of the CPU time per step, and
made the layer cost 3.4x top-1's for 2.5x the FLOPs. Keeping freed memory in
the process, as jemalloc and tcmalloc do, leaves about 100 faults per step
and 2.4x.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools

# mallopt parameters (glibc's malloc.h)
_M_TRIM_THRESHOLD = -1
_M_TOP_PAD = -2
_M_MMAP_MAX = -4
_KEEP_BYTES = 2**31 - 1  # the largest value mallopt's int takes: never trim the heap
# glibc's per-thread heaps are at most 64 MiB; a top pad that large also stops it from unmapping a heap that
# has become empty (XLA runs devices on many threads, and each one's heap empties between steps)
_HEAP_BYTES = 64 * 2**20


@functools.cache
def reuse_freed_host_memory() -> bool:
    """Make glibc keep freed memory for reuse instead of unmapping it (no mmap for large blocks,
    no trimming, a 64 MiB top pad), so XLA:CPU's per-step temporaries stop page-faulting.
    Returns whether the settings were applied (False off glibc, e.g. on macOS: nothing changes).

    The process keeps its peak host memory instead of returning it to the system between
    steps (what jemalloc and tcmalloc do too). Allocations glibc cannot serve from its heaps
    still fall back to mmap, so no allocation fails because of it. Idempotent.
    """
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or None)
        mallopt = libc.mallopt
        libc.gnu_get_libc_version  # glibc only: other C libraries have other knobs
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    applied = (mallopt(_M_MMAP_MAX, 0), mallopt(_M_TRIM_THRESHOLD, _KEEP_BYTES), mallopt(_M_TOP_PAD, _HEAP_BYTES))
    return all(result == 1 for result in applied)  # mallopt returns 1 on success
