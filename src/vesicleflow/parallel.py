"""Process pools for the CPU stages that split their work (postprocess, spherefit)."""

from __future__ import annotations

import contextlib
import importlib
import logging
import multiprocessing
import os
import sys
import threading

log = logging.getLogger(__name__)

#: BLAS/OpenMP thread pools: one thread in each spawned worker, the processes are the parallelism
#: (with a pool per core in each, 16 spawned workers on a 16-core node spent twice the CPU time of 2).
THREAD_VARIABLES = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")


@contextlib.contextmanager
def process_pool(workers: int, preload: tuple[str, ...] = ()):
    """A pool of ``workers`` processes, or None for one (the caller then works in-process).

    On Linux, while this process has no other thread yet, the workers are forked: they start at
    once with numpy, scipy and the stage's modules already imported (spawned workers import them
    again, ~1.5 s each). Once zarr has started its I/O threads (at the first read) a fork could copy
    a held lock, so the pool must be made before the stage touches a volume; otherwise, and on
    other systems, the workers are spawned. ``preload``: modules the workers will need, imported
    here before a fork so that each worker does not import them again (zarr: 0.2-0.3 s; importing
    it starts no thread)."""
    if workers <= 1:
        yield None
        return
    method = "fork" if sys.platform == "linux" and threading.active_count() == 1 else "spawn"
    if method == "fork":
        for module in preload:
            importlib.import_module(module)
    log.info("%d worker processes (%s)", workers, "forked" if method == "fork" else "spawned")
    saved = {name: os.environ.get(name) for name in THREAD_VARIABLES}
    os.environ.update(dict.fromkeys(THREAD_VARIABLES, "1"))  # read by the spawned workers' imports only
    try:
        pool = multiprocessing.get_context(method).Pool(workers)
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
    with pool:
        yield pool


def ordered_map(pool, function, items, chunksize: int = 1):
    """``function`` over ``items``, results in order: through ``pool``, or in-process without one."""
    return pool.imap(function, items, chunksize) if pool is not None else map(function, items)
