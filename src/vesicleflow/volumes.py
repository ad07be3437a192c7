"""Chunked intermediate volumes (zarr), so big tomograms never have to fit in memory at once."""

from __future__ import annotations

from pathlib import Path

import numpy as np

DEFAULT_CHUNKS = (64, 64, 64)


def create_volume(path: str | Path, shape, dtype, chunks=DEFAULT_CHUNKS, attrs: dict | None = None,
                  compressed: bool | None = None):
    """Create a zarr array (to be filled slab by slab); ``path`` is usually an atomic temp path.

    Float volumes (normalized tomogram, probability) are stored uncompressed: noisy float32 shrinks
    by under 10 % with zstd, while decoding it costs several times the read itself, and every later
    stage reads these volumes again. Integer volumes (labels, masks) keep zarr's default codec: they
    are mostly zeros and shrink a hundredfold. ``compressed`` overrides that choice (a scratch
    volume rewritten block by block is faster raw).
    """
    import zarr

    chunks = tuple(min(c, s) for c, s in zip(chunks, shape))
    if compressed is None:
        compressed = np.dtype(dtype).kind != "f"
    codec = {} if compressed else {"compressors": None}
    array = zarr.create_array(store=str(path), shape=tuple(shape), chunks=chunks, dtype=dtype,
                              fill_value=0, overwrite=True, **codec)
    if attrs:
        array.attrs.update(attrs)
    return array


def open_volume(path: str | Path):
    import zarr

    return zarr.open_array(store=str(path), mode="r")


def z_slabs(n_z: int, slab: int):
    """Yield (start, stop) covering 0..n_z in slabs of at most ``slab`` planes."""
    for start in range(0, n_z, slab):
        yield start, min(start + slab, n_z)


def read_full(path: str | Path) -> np.ndarray:
    return np.asarray(open_volume(path)[...])
