"""Memory allocation policies of the vesicleflow commands: small pages for numpy (every command), and
freed memory kept in the process for reuse (glibc malloc) in the torch stages.

By default glibc gives every allocation above 128 KiB (a threshold that rises to at most 32 MiB)
its own mapping and unmaps it when freed, so every new large tensor (each U-Net activation of each
batch) is faulted in again page by page and zeroed by the kernel. On the 2-core benchmark machine
that was ~11,000 page faults per 64³ window and 30 % of the CPU forward pass (94 -> 67 ms per
window); the infer stage of the largest benchmark tomogram went from 130 s to 101-107 s. Peak RSS
is still the peak of live memory; the process only stops shrinking before it exits.
"""

from __future__ import annotations

import ctypes
import os
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


#: numpy's own switch (read when numpy is imported): 1 = ask for 2 MiB pages for arrays of 4 MiB and up.
NUMPY_HUGEPAGE_VARIABLE = "NUMPY_MADVISE_HUGEPAGE"


def small_pages_for_numpy() -> None:
    """Have numpy's large arrays use ordinary 4 KiB pages (unless :data:`NUMPY_HUGEPAGE_VARIABLE` is
    set already); effective for a numpy imported after this call, and inherited by child processes.

    A 2 MiB page can only come from a free 2 MiB block, and on a virtual machine whose balloon driver
    reports such blocks to the host (free page reporting), every one of them must first be supplied
    again by the host: on the benchmark machine a new 531 MB array took 8 s in 2 MiB pages and 0.18 s
    in 4 KiB pages, and postprocess, spherefit and export (new arrays per block) spent up to 40 % of
    their CPU time zeroing 2 MiB pages. With 4 KiB pages, in alternated runs of the largest benchmark
    tomogram: postprocess 5.3-6.6 s instead of 7.4-9.9 s, spherefit 6.7-7.9 s instead of 7.1-9.5 s,
    export 5.7-5.9 s (one run 9.4 s) instead of 5.8-7.3 s, with the same user time.
    """
    os.environ.setdefault(NUMPY_HUGEPAGE_VARIABLE, "0")
