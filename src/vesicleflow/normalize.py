"""normalize: original tomogram -> model voxel size, anti-aliased, z-scored, chunked (zarr).

Works slab by slab over z, reading only the input planes each slab needs (no memory map), so peak
memory is a few slabs, not the volume: the number of output planes per slab shrinks as the input's
planes grow, keeping the input block under :data:`BLOCK_BYTES`. Resampled slabs go to a raw scratch
file (model-grid size, deleted at the end); the z-scored volume is then written to the zarr in whole
chunk rows, so no compressed chunk is encoded twice.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
from scipy import ndimage

from vesicleflow.grid import GridMapping
from vesicleflow.io import InputError, atomic_output, open_mrc_volume, read_tomogram_info, scratch_dir
from vesicleflow.modelinfo import Preprocessing, load_model_info
from vesicleflow.volumes import DEFAULT_CHUNKS, create_volume, open_volume, z_slabs

log = logging.getLogger(__name__)

#: Most output planes computed per step.
SLAB_PLANES = 32
#: Budget for one step's input block (float32, planes + smoothing halo); peak memory is a few times this.
BLOCK_BYTES = 32 * 2**20
#: Budget for one block written to the zarr (float32); 64 planes of 1024 x 1024 fit.
WRITE_BYTES = 256 * 2**20
#: Samples used for the robust (median / MAD) statistics.
STATISTICS_SAMPLES = 4_000_000


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

    def update(self, block: np.ndarray) -> None:
        if block.size:
            self.low, self.high = min(self.low, float(block.min())), max(self.high, float(block.max()))


def _resample_slab(volume, mapping: GridMapping, out_start: int, out_stop: int, sigma_in: float,
                   sigma_out: float, raw_range: _RawRange | None = None) -> np.ndarray:
    """Resample output planes [out_start, out_stop) (plus the smoothing halo) from the input."""
    halo_out = int(np.ceil(4 * sigma_out)) if sigma_out > 0 else 0
    n_out = mapping.model_shape
    lo_out, hi_out = max(0, out_start - halo_out), min(n_out[0], out_stop + halo_out)
    z_src = mapping.model_to_original(np.arange(lo_out, hi_out))
    halo_in = int(np.ceil(4 * sigma_in)) + 2
    lo_in = max(0, int(np.floor(z_src.min())) - halo_in)
    hi_in = min(volume.shape[0], int(np.ceil(z_src.max())) + halo_in + 1)
    block = np.asarray(volume[lo_in:hi_in], dtype=np.float32)  # MrcVolume reads a private copy
    if not block.flags.writeable:  # filtered in place below
        block = block.copy()
    for k, plane in enumerate(block):  # plane by plane: no volume-sized temporary
        if not np.isfinite(plane).all():
            bad = int(block.size - np.count_nonzero(np.isfinite(block)))
            raise InputError(f"{bad} NaN or Inf voxel value(s), the first in z plane {lo_in + k}; replace them "
                             "(e.g. by the mean) before running")
    if raw_range is not None:
        raw_range.update(block)
    if sigma_in > 0:
        ndimage.gaussian_filter(block, sigma_in, mode="nearest", output=block)
    coords = [z_src - lo_in] + [mapping.model_to_original(np.arange(n)) for n in n_out[1:]]
    out = block
    for axis, positions in enumerate(coords):
        out = _linear_resample_axis(out, positions, axis)
    if sigma_out > 0:
        out = ndimage.gaussian_filter(out, sigma_out, mode="nearest")
    return out[out_start - lo_out: out_stop - lo_out]


def _linear_resample_axis(block: np.ndarray, positions: np.ndarray, axis: int) -> np.ndarray:
    """Separable linear interpolation along one axis (edges clamped)."""
    n = block.shape[axis]
    positions = np.clip(positions, 0, n - 1)
    low = np.floor(positions).astype(np.int64)
    high = np.minimum(low + 1, n - 1)
    frac = (positions - low).astype(np.float32)
    shape = [1] * block.ndim
    shape[axis] = -1
    frac = frac.reshape(shape)
    out = np.take(block, low, axis=axis)
    upper = np.take(block, high, axis=axis)
    upper -= out  # out + frac * (upper - out), in place: two temporaries instead of five
    upper *= frac
    out += upper
    return out


class _PlaneFile:
    """A float32 volume in a raw scratch file, written and read by z planes with plain file I/O.

    Not a memory map: a map's touched pages count towards the process's RSS (and a cluster job's
    memory limit) until written back, which for a large tomogram is the whole model grid.
    """

    def __init__(self, path: Path, shape):
        self.shape = tuple(int(n) for n in shape)
        self.plane_items = self.shape[1] * self.shape[2]
        self.handle = open(path, "w+b")  # noqa: SIM115 (closed on leaving the with block)

    def __enter__(self) -> _PlaneFile:
        return self

    def __exit__(self, *exc) -> None:
        self.handle.close()

    def write(self, start: int, planes: np.ndarray) -> None:
        self.handle.seek(start * self.plane_items * 4)
        np.ascontiguousarray(planes, dtype=np.float32).tofile(self.handle)

    def _read(self, start: int, n_planes: int) -> np.ndarray:
        self.handle.seek(start * self.plane_items * 4)
        return np.fromfile(self.handle, np.float32, n_planes * self.plane_items).reshape(n_planes, *self.shape[1:])

    def __getitem__(self, key) -> np.ndarray:
        """``[z0:z1:step, ...]``: the planes are read from the file, the other indices applied after."""
        key = key if isinstance(key, tuple) else (key,)
        first, stop, step = key[0].indices(self.shape[0])
        if step == 1:
            block = self._read(first, max(stop - first, 0))
        else:
            block = np.concatenate([self._read(z, 1) for z in range(first, stop, step)] or [self._read(first, 0)])
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


def normalize_tomogram(
    tomogram: str | Path,
    output: str | Path,
    model: str | Path | None = None,
    voxel_size_angstrom: float | None = None,
) -> Path:
    """Rescale ``tomogram`` to the model's voxel size, z-score it, and write a zarr at ``output``.

    The zarr's attributes hold the :class:`GridMapping` that later stages use to return to the
    original grid, plus the z-score statistics.
    """
    model_info = load_model_info(model)
    return normalize_to_grid(tomogram, output, model_info.voxel_size_angstrom, model_info.preprocessing,
                             voxel_size_angstrom)


def normalize_to_grid(tomogram: str | Path, output: str | Path, target_voxel_size_angstrom: float,
                      prep: Preprocessing, voxel_size_angstrom: float | None = None) -> Path:
    """:func:`normalize_tomogram` for an explicit voxel size and preprocessing (used by training)."""
    info = read_tomogram_info(tomogram, voxel_size_angstrom)
    mapping = GridMapping(info.shape, info.voxel_size_angstrom, target_voxel_size_angstrom,
                          info.origin_angstrom)
    log.info("%s: %s voxels at %.2f Å -> %s at %.2f Å", info.path.name, info.shape,
             info.voxel_size_angstrom, mapping.model_shape, target_voxel_size_angstrom)
    volume = open_mrc_volume(info.path)
    sigma_in = antialias_sigma(mapping.zoom)
    planes = slab_planes(mapping, sigma_in)
    raw_range = _RawRange()
    # Resampled slabs go to a raw scratch file first: slabs are thinner than a zarr chunk, and
    # writing them into the compressed zarr would re-encode each chunk once per slab.
    with (scratch_dir(output) as scratch, atomic_output(output) as tmp,
          _PlaneFile(scratch / "resampled.f32", mapping.model_shape) as resampled):
        try:
            for start, stop in z_slabs(mapping.model_shape[0], planes):
                resampled.write(start, _resample_slab(volume, mapping, start, stop, sigma_in,
                                                      prep.gaussian_sigma_voxels, raw_range))
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
        for start, stop in z_slabs(mapping.model_shape[0], _chunk_planes(mapping.model_shape)):
            array[start:stop] = (resampled[start:stop] - centre) / scale
        array.attrs.update({"grid": mapping.to_attrs(), "zscore_centre": centre, "zscore_scale": scale,
                            "zscore": prep.zscore, "source": str(info.path)})
    return Path(output)


def read_grid(normalized: str | Path) -> GridMapping:
    return GridMapping.from_attrs(dict(open_volume(normalized).attrs)["grid"])
