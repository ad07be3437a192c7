"""normalize: original tomogram -> model voxel size, anti-aliased, z-scored, chunked (zarr).

Works slab by slab over z, reading only the input planes each slab needs (no memory map), so peak
memory is a few slabs, not the volume: the number of output planes per slab shrinks as the input's
planes grow, keeping the input block under :data:`BLOCK_BYTES`. Resampled slabs go to a raw scratch
file (model-grid size, deleted at the end); the z-scored volume is then written to the zarr in whole
chunk rows, so no compressed chunk is encoded twice.

Both passes use :data:`THREADS` threads (file reads and numpy's gathers and arithmetic release the
GIL): slabs are resampled in parallel, and each chunk row is z-scored and written a band of chunks
per thread. Each thread reuses its buffers from slab to slab: faulting in and zeroing the pages of
fresh allocations took a third of this stage's CPU time. The values depend on neither the number
of threads nor the slab sizes.
"""

from __future__ import annotations

import logging
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from pathlib import Path

import numpy as np

from vesicleflow.grid import GridMapping
from vesicleflow.io import (
    InputError,
    MrcVolume,
    ReusedBuffers,
    aligned_empty,
    atomic_output,
    open_for_io,
    open_mrc_volume,
    pread_into,
    pwrite_all,
    read_tomogram_info,
    scratch_dir,
)
from vesicleflow.modelinfo import Preprocessing, load_model_info
from vesicleflow.volumes import DEFAULT_CHUNKS, create_volume, open_volume, write_block, z_slabs

log = logging.getLogger(__name__)

#: Most output planes computed per step.
SLAB_PLANES = 32
#: Budget for one step's input block (float32, planes + smoothing halo); peak memory is a few times this.
BLOCK_BYTES = 32 * 2**20
#: Budget for one block written to the zarr (float32); 64 planes of 1024 x 1024 fit.
WRITE_BYTES = 256 * 2**20
#: Samples used for the robust (median / MAD) statistics.
STATISTICS_SAMPLES = 4_000_000
#: Bytes of one input row band resampled at a time (a few such arrays fit in a core's cache).
BAND_BYTES = 2**20
#: Threads resampling slabs and writing the zarr: a job's two cores.
THREADS = 2


#: Below this sigma (input voxels) a Gaussian's neighbour taps weigh under 1e-4 of its centre tap, so
#: the filter is the identity to within the data's precision and is skipped (at 15 -> 20 Å, sigma
#: 0.17, it took half of normalize's time; skipping it moved no voxel by more than 2e-6 z-score units).
NEGLIGIBLE_SIGMA = 0.233


def antialias_sigma(zoom: float) -> float:
    """Gaussian sigma (input voxels) that suppresses aliasing when shrinking by ``zoom`` < 1."""
    sigma = max(0.0, (1.0 / zoom - 1.0) / 2.0) if zoom < 1.0 else 0.0
    return sigma if sigma >= NEGLIGIBLE_SIGMA else 0.0


def slab_planes(mapping: GridMapping, sigma_in: float, budget_bytes: int | None = None) -> int:
    """Output planes per step: as many as keep the float32 input block within ``budget_bytes``, but
    at least enough that each block reads as many new planes as halo planes (so no input plane is
    read, and smoothed, more than about twice however large the planes are)."""
    budget_bytes = BLOCK_BYTES if budget_bytes is None else budget_bytes
    plane_bytes = 4 * mapping.original_shape[1] * mapping.original_shape[2]
    halo_in = 2 * (int(np.ceil(4 * sigma_in)) + 3)
    within_budget = np.floor(max(budget_bytes // plane_bytes - halo_in, 0) * mapping.zoom)
    amortized = np.ceil(halo_in * mapping.zoom)
    return int(np.clip(max(within_budget, amortized), 1, SLAB_PLANES))


class _RawRange:
    """Running min / max of the raw input, to tell a constant volume from a merely flat one."""

    def __init__(self):
        self.low, self.high = np.inf, -np.inf

    def update(self, low: float, high: float) -> None:
        self.low, self.high = min(self.low, low), max(self.high, high)


def _finite_range(block: np.ndarray, first_plane: int) -> tuple[float, float]:
    """Min and max of a raw input block, refusing NaN or Inf (either makes the min or the max non-finite,
    so no separate pass looks for them)."""
    if not block.size:
        return np.inf, -np.inf
    low, high = float(block.min()), float(block.max())
    if not (np.isfinite(low) and np.isfinite(high)):
        finite = np.isfinite(block)
        bad = int(block.size - np.count_nonzero(finite))
        first = first_plane + int(np.argmin(finite.reshape(len(block), -1).all(axis=1)))
        raise InputError(f"{bad} NaN or Inf voxel value(s), the first in z plane {first}; replace them "
                         "(e.g. by the mean) before running")
    return low, high


def _resample_slab(volume: MrcVolume, mapping: GridMapping, out_start: int, out_stop: int, sigma_in: float,
                   sigma_out: float, buffers: ReusedBuffers) -> tuple[np.ndarray, float, float]:
    """Resample output planes [out_start, out_stop) (plus the smoothing halo) from the input, in
    ``buffers``; also returns the raw input block's min and max.

    Separable linear interpolation along z, then y, then x, a band of output rows at a time so that
    the intermediate arrays stay in the core's cache."""
    halo_out = int(np.ceil(4 * sigma_out)) if sigma_out > 0 else 0
    n_out = mapping.model_shape
    lo_out, hi_out = max(0, out_start - halo_out), min(n_out[0], out_stop + halo_out)
    z_src = mapping.model_to_original(np.arange(lo_out, hi_out))
    halo_in = int(np.ceil(4 * sigma_in)) + 2
    lo_in = max(0, int(np.floor(z_src.min())) - halo_in)
    hi_in = min(volume.shape[0], int(np.ceil(z_src.max())) + halo_in + 1)
    block = volume.read_into(lo_in, buffers.get("block", (hi_in - lo_in, *volume.shape[1:])),
                             buffers.get("scratch", volume.scratch_bytes(hi_in - lo_in), np.uint8))
    low, high = _finite_range(block, lo_in)
    if sigma_in > 0:
        from scipy import ndimage  # only here: importing it takes a third of a second

        ndimage.gaussian_filter(block, sigma_in, mode="nearest", output=block)
    z_taps = _interpolation_taps(z_src - lo_in, len(block))
    y_taps, x_taps = (_interpolation_taps(mapping.model_to_original(np.arange(n_out[axis])), block.shape[axis])
                      for axis in (1, 2))
    out = buffers.get("slab", (hi_out - lo_out, *n_out[1:]))
    band = max(1, BAND_BYTES // (4 * block.shape[2]))
    for k, z in enumerate(zip(*z_taps)):
        for j in range(0, n_out[1], band):
            _resample_rows(block, z, [taps[j:j + band] for taps in y_taps], x_taps, out[k, j:j + band], buffers)
    if sigma_out > 0:
        from scipy import ndimage

        out = ndimage.gaussian_filter(out, sigma_out, mode="nearest")
    return out[out_start - lo_out: out_stop - lo_out], low, high


def _interpolation_taps(positions: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Each position's lower and upper neighbour among ``n`` samples and the upper's weight (edges clamped)."""
    positions = np.clip(positions, 0, n - 1)
    low = np.floor(positions).astype(np.int64)
    high = np.minimum(low + 1, n - 1)
    return low, high, (positions - low).astype(np.float32)


def _resample_rows(block: np.ndarray, z_taps, y_taps, x_taps, out: np.ndarray, buffers: ReusedBuffers) -> None:
    """One band of rows of one output plane: along z (on just the input rows the band needs), then y,
    then x, each ``lower + frac * (upper - lower)`` in float32."""
    z_low, z_high, z_frac = z_taps
    y_low, y_high, y_frac = y_taps
    first, stop = y_low[0], y_high[-1] + 1
    rows = buffers.get("rows", (stop - first, block.shape[2]))
    np.subtract(block[z_high, first:stop], block[z_low, first:stop], out=rows)
    rows *= z_frac
    np.add(block[z_low, first:stop], rows, out=rows)
    band = buffers.get("band", (len(y_low), block.shape[2]))
    _lerp(rows, (y_low - first, y_high - first, y_frac[:, None]), 0, band, buffers)
    _lerp(band, x_taps, 1, out, buffers)


def _lerp(values: np.ndarray, taps, axis: int, out: np.ndarray, buffers: ReusedBuffers) -> None:
    """``out = lower + frac * (upper - lower)`` along ``axis``, the neighbours gathered with ``take``."""
    low, high, frac = taps
    np.take(values, low, axis=axis, out=out, mode="clip")
    upper = np.take(values, high, axis=axis, out=buffers.get(f"upper{axis}", out.shape), mode="clip")
    upper -= out
    upper *= frac
    out += upper


def _resample_all(volume: MrcVolume, mapping: GridMapping, sigma_in: float, sigma_out: float,
                  resampled: _PlaneFile, threads: int) -> _RawRange:
    """Resample every slab into ``resampled`` on ``threads`` threads; an error is raised in slab order
    (the first bad slab's, as in one thread), and the slabs not yet started are cancelled."""
    raw_range = _RawRange()
    local = threading.local()

    def resample(start: int, stop: int) -> tuple[float, float]:
        if not hasattr(local, "buffers"):
            local.buffers = ReusedBuffers()
        slab, low, high = _resample_slab(volume, mapping, start, stop, sigma_in, sigma_out, local.buffers)
        resampled.write(start, slab)
        return low, high

    slabs = list(z_slabs(mapping.model_shape[0], slab_planes(mapping, sigma_in)))
    with ThreadPoolExecutor(threads, thread_name_prefix="resample") as pool:
        for low, high in pool.map(resample, *zip(*slabs)):  # in slab order; raises the first error
            raw_range.update(low, high)
    return raw_range


class _PlaneFile:
    """A float32 volume in a raw scratch file, written and read by z planes with plain file I/O.

    Not a memory map: a map's touched pages count towards the process's RSS (and a cluster job's
    memory limit) until written back, which for a large tomogram is the whole model grid. Reads and
    writes are positioned (pread / pwrite), so threads may share it, and direct (:func:`open_for_io`)
    where the planes fill whole disk blocks.
    """

    def __init__(self, path: Path, shape):
        self.shape = tuple(int(n) for n in shape)
        self.plane_bytes = 4 * self.shape[1] * self.shape[2]
        self.fd = open_for_io(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC)

    def __enter__(self) -> _PlaneFile:
        return self

    def __exit__(self, *exc) -> None:
        os.close(self.fd)

    def write(self, start: int, planes: np.ndarray) -> None:
        pwrite_all(self.fd, np.ascontiguousarray(planes, dtype=np.float32).reshape(-1).view(np.uint8),
                   start * self.plane_bytes)

    def read_into(self, start: int, out: np.ndarray) -> np.ndarray:
        """Planes [start, start + len(out)) into ``out`` (contiguous float32)."""
        if pread_into(self.fd, out, start * self.plane_bytes) != out.nbytes:
            raise EOFError(f"scratch file: planes {start}-{start + len(out)} were never written")
        return out

    def truncate(self, n_planes: int) -> None:
        """Drop the planes from ``n_planes`` on, freeing their disk space (and any page cache) at once."""
        os.ftruncate(self.fd, n_planes * self.plane_bytes)

    def __getitem__(self, key) -> np.ndarray:
        """``[z0:z1:step, ...]``: the planes are read from the file, the other indices applied after."""
        key = key if isinstance(key, tuple) else (key,)
        first, stop, step = key[0].indices(self.shape[0])
        planes = range(first, stop, step)
        block = aligned_empty((len(planes), *self.shape[1:]), np.float32)
        if step == 1:
            self.read_into(first, block)
        else:
            for out, z in zip(block, planes):
                self.read_into(z, out)
        return block[(slice(None), *key[1:])]


def _chunk_planes(shape) -> int:
    """Planes per zarr write: whole chunk rows (64 planes), fewer only if they exceed :data:`WRITE_BYTES`."""
    return int(np.clip(WRITE_BYTES // (4 * shape[1] * shape[2]), 1, DEFAULT_CHUNKS[0]))


def _model_planes(shape) -> int:
    """Model-grid planes per pass over the written volume: whole zarr chunks (64) within the budget."""
    plane_bytes = 8 * shape[1] * shape[2]  # float64 statistics
    return int(np.clip(BLOCK_BYTES // plane_bytes, 1, 64))


def _statistics(array, zscore: str, max_spread: float | None = None) -> tuple[float, float]:
    """Centre and scale for the z-score, computed chunk-wise (exact mean/std, sampled median/MAD).

    ``max_spread`` (robust only): widen the scale so that the sample's z-scored standard deviation
    is at most this."""
    n_z = array.shape[0]
    planes = _model_planes(array.shape)
    if zscore == "mean_std":
        total, total_sq, count = 0.0, 0.0, 0
        for start, stop in z_slabs(n_z, planes):
            block = np.asarray(array[start:stop], dtype=np.float64)
            total += block.sum()
            total_sq += np.square(block).sum()
            count += block.size
        centre = total / count
        scale = float(np.sqrt(max(total_sq / count - centre**2, 0.0)))
    else:
        step = max(1, int(np.ceil((np.prod(array.shape) / STATISTICS_SAMPLES) ** (1 / 3))))
        sample = np.concatenate([np.asarray(array[start:stop:step, ::step, ::step]).ravel()
                                 for start, stop in z_slabs(n_z, planes * step)])
        centre = float(np.median(sample))
        scale = float(1.4826 * np.median(np.abs(sample - centre)))
        if scale <= 0:
            scale = float(sample.std())
        elif max_spread:
            scale = max(scale, float(sample.std()) / max_spread)
    return float(centre), scale


def _write_zscored(resampled: _PlaneFile, array, centre: float, scale: float, threads: int) -> None:
    """Write ``(resampled - centre) / scale`` into the zarr ``array`` by whole chunk rows, last row first.

    Each row is read into one buffer, reused, then scaled and written by ``threads`` threads, a band
    of whole chunks each. The scratch file is truncated behind every row read, so the disk (and,
    without direct I/O, the page cache) it frees is there for the zarr's files to reuse: taking new
    pages made file writes several times slower than the copy itself.
    """
    rows = list(z_slabs(array.shape[0], _chunk_planes(array.shape)))[::-1]
    first_start, first_stop = rows[-1]
    buffer = aligned_empty((first_stop - first_start, *array.shape[1:]), np.float32)
    chunk_rows = array.chunks[1]
    band_rows = -(-array.shape[1] // (threads * chunk_rows)) * chunk_rows
    bands = list(z_slabs(array.shape[1], band_rows))

    def zscore(start: int, block: np.ndarray, y0: int, y1: int) -> None:
        band = block[:, y0:y1]
        np.subtract(band, centre, out=band)
        np.divide(band, scale, out=band)
        write_block(array, (start, y0, 0), band)

    with ThreadPoolExecutor(threads, thread_name_prefix="zscore") as pool:
        for start, stop in rows:
            block = resampled.read_into(start, buffer[:stop - start])
            resampled.truncate(start)
            list(pool.map(partial(zscore, start, block), *zip(*bands)))  # raises a band's error


def normalize_tomogram(
    tomogram: str | Path,
    output: str | Path,
    model: str | Path | None = None,
    voxel_size_angstrom: float | None = None,
    threads: int = THREADS,
) -> Path:
    """Rescale ``tomogram`` to the model's voxel size, z-score it, and write a zarr at ``output``.

    The zarr's attributes hold the :class:`GridMapping` that later stages use to return to the
    original grid, plus the z-score statistics.
    """
    model_info = load_model_info(model)
    return normalize_to_grid(tomogram, output, model_info.voxel_size_angstrom, model_info.preprocessing,
                             voxel_size_angstrom, threads)


def normalize_to_grid(tomogram: str | Path, output: str | Path, target_voxel_size_angstrom: float,
                      prep: Preprocessing, voxel_size_angstrom: float | None = None, threads: int = THREADS) -> Path:
    """:func:`normalize_tomogram` for an explicit voxel size and preprocessing (used by training)."""
    info = read_tomogram_info(tomogram, voxel_size_angstrom)
    threads = max(1, threads)
    mapping = GridMapping(info.shape, info.voxel_size_angstrom, target_voxel_size_angstrom,
                          info.origin_angstrom)
    log.info("%s: %s voxels at %.2f Å -> %s at %.2f Å", info.path.name, info.shape,
             info.voxel_size_angstrom, mapping.model_shape, target_voxel_size_angstrom)
    volume = open_mrc_volume(info.path)
    sigma_in = antialias_sigma(mapping.zoom)
    # Resampled slabs go to a raw scratch file first: slabs are thinner than a zarr chunk, and
    # writing them into the compressed zarr would re-encode each chunk once per slab.
    with (scratch_dir(output) as scratch, atomic_output(output) as tmp,
          _PlaneFile(scratch / "resampled.f32", mapping.model_shape) as resampled):
        try:
            raw_range = _resample_all(volume, mapping, sigma_in, prep.gaussian_sigma_voxels, resampled, threads)
        except InputError as err:
            raise InputError(f"{info.path}: {err}") from None
        if raw_range.low == raw_range.high:
            raise InputError(f"{info.path}: the volume is constant (every voxel is {raw_range.low:g}, standard "
                             "deviation 0); is it an empty or placeholder file?")
        centre, scale = _statistics(resampled, prep.zscore, prep.max_spread)
        if not scale > 1e-6 * max(1.0, abs(centre)):
            raise InputError(f"{info.path}: the volume is nearly constant (standard deviation {scale:g} around "
                             f"{centre:g}); nothing to detect")
        array = create_volume(tmp, mapping.model_shape, "float32")
        _write_zscored(resampled, array, centre, scale, threads)
        array.attrs.update({"grid": mapping.to_attrs(), "zscore_centre": centre, "zscore_scale": scale,
                            "zscore": prep.zscore, "source": str(info.path)})
    return Path(output)


def read_grid(normalized: str | Path) -> GridMapping:
    return GridMapping.from_attrs(dict(open_volume(normalized).attrs)["grid"])
