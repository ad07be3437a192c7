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
    stage reads these volumes again. Integer volumes (labels, masks) are compressed (:func:`fast_codec`):
    they are mostly zeros and shrink fortyfold. ``compressed`` overrides that choice (a scratch
    volume rewritten block by block is faster raw).
    """
    import zarr

    chunks = tuple(min(c, s) for c, s in zip(chunks, shape))
    if compressed is None:
        compressed = np.dtype(dtype).kind != "f"
    codec = {"compressors": fast_codec() if compressed else None}
    array = zarr.create_array(store=str(path), shape=tuple(shape), chunks=chunks, dtype=dtype,
                              fill_value=0, overwrite=True, **codec)
    if attrs:
        array.attrs.update(attrs)
    return array


def fast_codec():
    """Blosc LZ4 without shuffling: the benchmark's labels (133 M uint16 voxels, mostly zero) decode
    in 0.07 s and encode in 0.09 s of codec time, 6 MB on disk; bit shuffling saved 1 MB but decoded
    six times slower, zarr's default zstd twice slower again."""
    from zarr.codecs import BloscCodec

    return BloscCodec(cname="lz4", clevel=1, shuffle="noshuffle")


def write_block(array, start, block: np.ndarray) -> None:
    """``array[start[0]:start[0] + block.shape[0], ...] = block``, skipping zarr's empty-chunk test when
    it cannot pay.

    zarr leaves out of the store any chunk that holds only the fill value, comparing every chunk it
    writes with it: a quarter of the CPU time of writing an uncompressed float32 chunk, and 40 % of
    writing a compressed label volume (whose all-zero chunks compress to a few kB). So a compressed
    array is written with the test off (its empty chunks stored, a few kB each; the data read back is
    the same), and an uncompressed one when no chunk the block touches can be all fill
    (:func:`_touches_no_empty_chunk`).
    """
    if array.compressors or _touches_no_empty_chunk(array, start, block):
        array = array.with_config({"write_empty_chunks": True})
    array[tuple(slice(a, a + n) for a, n in zip(start, block.shape))] = block


def _touches_no_empty_chunk(array, start, block: np.ndarray) -> bool:
    """Whether the fill value is zero and the block's first voxel in every chunk it touches is not
    (bit for bit, as zarr compares floats with a zero fill: -0.0 is data)."""
    if block.dtype != array.dtype or block.dtype.kind not in "biuf" or block.itemsize > 8 or not block.size:
        return False
    if np.asarray(array.fill_value).any():
        return False
    firsts = [np.unique([0, *range(-a % c, n, c)]) for a, n, c in zip(start, block.shape, array.chunks)]
    return bool(block[np.ix_(*firsts)].view(f"u{block.itemsize}").all())


def open_volume(path: str | Path, mode: str = "r"):
    import zarr

    return zarr.open_array(store=str(path), mode=mode)


def z_slabs(n_z: int, slab: int):
    """Yield (start, stop) covering 0..n_z in slabs of at most ``slab`` planes."""
    for start in range(0, n_z, slab):
        yield start, min(start + slab, n_z)


def read_full(path: str | Path) -> np.ndarray:
    return np.asarray(open_volume(path)[...])
