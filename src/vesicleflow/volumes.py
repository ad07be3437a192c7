"""Chunked intermediate volumes (zarr), so big tomograms never have to fit in memory at once."""

from __future__ import annotations

from pathlib import Path

import numpy as np

DEFAULT_CHUNKS = (64, 64, 64)


def create_volume(path: str | Path, shape, dtype, chunks=DEFAULT_CHUNKS, attrs: dict | None = None):
    """Create a zarr array (to be filled slab by slab); ``path`` is usually an atomic temp path."""
    import zarr

    chunks = tuple(min(c, s) for c, s in zip(chunks, shape))
    array = zarr.create_array(store=str(path), shape=tuple(shape), chunks=chunks, dtype=dtype,
                              fill_value=0, overwrite=True)
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
