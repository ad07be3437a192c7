"""postprocess: probability map -> instance labels of vesicle candidates (model grid).

Threshold, restrict to the cytoplasm mask, split touching vesicles by a watershed on the distance
transform (a filled ball has one distance maximum at its centre), and drop objects whose
inscribed radius is outside the configured range. All sizes are in nm.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
from scipy import ndimage
from skimage.feature import peak_local_max
from skimage.segmentation import watershed

from vesicleflow.grid import GridMapping, nearest_source_indices
from vesicleflow.io import InputError, atomic_output, read_tomogram
from vesicleflow.volumes import create_volume, open_volume

log = logging.getLogger(__name__)


def mask_on_model_grid(mask_path: str | Path, mapping: GridMapping) -> np.ndarray:
    """Nearest-neighbour resampling of an original-grid mask onto the model grid (bool)."""
    mask = read_tomogram(mask_path)
    if tuple(mask.shape) != tuple(mapping.original_shape):
        raise InputError(f"{mask_path}: mask shape {tuple(mask.shape)} differs from the tomogram's "
                         f"{tuple(mapping.original_shape)}")
    iz, iy, ix = nearest_source_indices(mapping.model_shape, mapping.original_shape, mapping.model_to_original)
    return np.stack([np.asarray(mask[z])[np.ix_(iy, ix)] != 0 for z in iz])


def separate_instances(foreground: np.ndarray, voxel_size_nm: float, min_radius_nm: float,
                       max_radius_nm: float, min_separation_nm: float | None = None) -> np.ndarray:
    """Label touching balls separately and drop those whose inscribed radius is out of range."""
    distance_nm = ndimage.distance_transform_edt(foreground, sampling=voxel_size_nm).astype(np.float32)
    separation_nm = min_separation_nm if min_separation_nm is not None else min_radius_nm
    min_distance = max(1, round(separation_nm / voxel_size_nm))
    components, _ = ndimage.label(foreground)
    peaks = peak_local_max(distance_nm, min_distance=min_distance, threshold_abs=0.5 * min_radius_nm,
                           labels=components, exclude_border=False)
    markers = np.zeros(foreground.shape, np.int32)
    markers[tuple(peaks.T)] = np.arange(1, len(peaks) + 1)
    labels = watershed(-distance_nm, markers, mask=foreground)
    inscribed = ndimage.maximum(distance_nm, labels, index=np.arange(1, len(peaks) + 1))
    keep = (np.asarray(inscribed) >= min_radius_nm) & (np.asarray(inscribed) <= max_radius_nm)
    relabel = np.zeros(len(peaks) + 1, np.uint32)
    relabel[1:][keep] = np.arange(1, int(keep.sum()) + 1)
    log.info("%d candidate maxima, %d within %.1f-%.1f nm", len(peaks), int(keep.sum()),
             min_radius_nm, max_radius_nm)
    return relabel[labels]


def postprocess_probability(probability: str | Path, output: str | Path, threshold: float = 0.5,
                            mask: str | Path | None = None, min_radius_nm: float = 8.0,
                            max_radius_nm: float = 60.0, min_separation_nm: float | None = None) -> int:
    """Write instance labels (zarr, model grid); returns the number of candidates."""
    if not 0.0 < threshold < 1.0:
        raise ValueError(f"threshold must be between 0 and 1, got {threshold}")
    source = open_volume(probability)
    attrs = dict(source.attrs)
    mapping = GridMapping.from_attrs(attrs["grid"])
    voxel_nm = mapping.model_voxel_size_angstrom / 10.0
    foreground = np.asarray(source[...]) > threshold
    if mask:
        foreground &= mask_on_model_grid(mask, mapping)
    labels = separate_instances(foreground, voxel_nm, min_radius_nm, max_radius_nm, min_separation_nm)
    count = int(labels.max())
    dtype = "uint16" if count < 2**16 else "uint32"
    with atomic_output(output) as tmp:
        target = create_volume(tmp, labels.shape, dtype, attrs={**attrs, "count": count,
                                                                   "mask": str(mask) if mask else None})
        target[...] = labels.astype(dtype)
    return count
