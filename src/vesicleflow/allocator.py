"""Keep freed memory in the process for reuse (glibc malloc) in the torch stages.

By default glibc gives every allocation above 128 KiB (a threshold that rises to at most 32 MiB)
its own mapping and unmaps it when freed, so every new large tensor (each U-Net activation of each
batch) is faulted in again page by page and zeroed by the kernel. On the 2-core benchmark machine
that was ~11,000 page faults per 64³ window and 30 % of the CPU forward pass (94 -> 67 ms per
window); the infer stage of the largest benchmark tomogram went from 130 s to 101-107 s. Peak RSS
is still the peak of live memory; the process only stops shrinking before it exits.
"""

from __future__ import annotations

import ctypes
import sys

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
#: Allocations at least this large still get their own mapping, returned to the system when freed.
MMAP_THRESHOLD_BYTES = 2**30
#: Free memory at the top of the heap is kept up to this size (glibc takes an int).
TRIM_THRESHOLD_BYTES = 2**31 - 1


def keep_freed_memory() -> bool:
    """Raise glibc's mmap and trim thresholds; False where the C library is not glibc (no change)."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    mapped = mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES)
    return bool(mapped) and bool(mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES))
