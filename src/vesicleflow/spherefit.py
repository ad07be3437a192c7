"""spherefit: per candidate, a sub-voxel sphere refined on the ORIGINAL tomogram.

A vesicle's membrane is a dark shell. From the segmentation's first guess, rays are cast from the
centre; along each ray the darkest point within the expected radius range marks the membrane. A
robust least-squares sphere through those points gives the centre and the membrane's mid radius;
the mean radial profile around that centre gives the membrane thickness and contrast. Rays near
the z axis are skipped: the missing wedge smears membranes whose normal points along z.

The outer radius reported (``radius_nm``) is the membrane mid radius plus half the bilayer
thickness. The bilayer thickness is a physical constant (default 4.5 nm) rather than the measured
dip width, because the measured width grows with the voxel size and the CTF blur (on simulated
data it over-estimates a 4.6 nm bilayer by 0-1 nm), while the mid radius is found to ~0.3 nm.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from scipy import ndimage

from vesicleflow.grid import GridMapping
from vesicleflow.io import read_tomogram, read_tomogram_info, write_table
from vesicleflow.parallel import ordered_map, process_pool
from vesicleflow.volumes import DEFAULT_CHUNKS, open_volume, read_box, volume_attributes, z_slabs

if TYPE_CHECKING:  # pandas is imported where tables are built: fitting workers never need it (0.5 s each)
    import pandas as pd

log = logging.getLogger(__name__)

#: Rays whose |z component| exceeds this lie inside the missing wedge's blind cone (about ±53°).
MAX_RAY_Z = 0.8
N_RAYS = 300
#: Gaussian smoothing before ray casting, in nm: suppresses noise below membrane scale.
SMOOTHING_NM = 1.0
#: Bilayer thickness bounds (nm) used when the measured dip width is implausible.
THICKNESS_BOUNDS_NM = (3.0, 9.0)


@dataclass
class SphereFit:
    z: float
    y: float
    x: float
    radius_nm: float
    membrane_radius_nm: float
    membrane_thickness_nm: float
    membrane_contrast: float
    fit_score: float
    rays_used: int


def fibonacci_directions(n: int, max_abs_z: float = MAX_RAY_Z) -> np.ndarray:
    """Near-uniform unit vectors (z, y, x), keeping those outside the missing-wedge cone."""
    i = np.arange(n) + 0.5
    z = 1 - 2 * i / n
    theta = np.pi * (1 + 5**0.5) * i
    rho = np.sqrt(1 - z**2)
    dirs = np.stack([z, rho * np.sin(theta), rho * np.cos(theta)], axis=1)
    return dirs[np.abs(dirs[:, 0]) <= max_abs_z]


_RAY_DIRECTIONS = fibonacci_directions(N_RAYS)


def fit_sphere_to_points(points: np.ndarray, weights: np.ndarray | None = None) -> tuple[np.ndarray, float]:
    """Algebraic least-squares sphere: solves 2 p·c + (R² - |c|²) = |p|²."""
    design, target = _sphere_system(points)
    if weights is not None:
        design *= weights[:, None]
        target *= weights
    return _solve_sphere(design, target)


def _sphere_system(points: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The rows (2 p, 1) and right-hand sides |p|² of the algebraic sphere fit, one per point."""
    design = np.empty((len(points), 4))
    np.multiply(points, 2, out=design[:, :3])
    design[:, 3] = 1.0
    return design, (points**2).sum(axis=1)


def _solve_sphere(design: np.ndarray, target: np.ndarray) -> tuple[np.ndarray, float]:
    solution, *_ = np.linalg.lstsq(design, target, rcond=None)
    centre = solution[:3]
    radius_sq = solution[3] + centre @ centre
    return centre, float(np.sqrt(max(radius_sq, 0.0)))


def _median(values: np.ndarray):
    """``np.median``'s number for an array without NaNs, by one selection instead of two.

    ``np.median`` also selects the maximum (to detect NaNs), which costs 7x more than the median's own
    selection on a 47³ region. Callers make sure NaNs cannot matter (see :func:`fit_sphere`).
    """
    flat = values.ravel()
    middle = flat.size // 2
    ordered = np.partition(flat, middle)
    if flat.size % 2:
        return ordered[middle]
    return (ordered[:middle].max() + ordered[middle]) / 2  # in the array's dtype, as np.mean of the two


def _robust_sphere(points: np.ndarray, rounds: int = 4) -> tuple[np.ndarray, float, np.ndarray]:
    inliers = np.ones(len(points), bool)
    design, target = _sphere_system(points)  # each refit solves the inliers' rows of the same system
    centre, radius = _solve_sphere(design, target)
    for _ in range(rounds):
        offsets = points - centre
        residual = np.abs(np.sqrt((offsets * offsets).sum(axis=1)) - radius)  # the numbers np.linalg.norm gives
        scale = max(1.4826 * _median(residual[inliers]), 0.5)
        new_inliers = residual <= 2.5 * scale
        if new_inliers.sum() < 8 or np.array_equal(new_inliers, inliers):
            break
        inliers = new_inliers
        centre, radius = _solve_sphere(design[inliers], target[inliers])
    return centre, radius, inliers


def sample_trilinear(volume: np.ndarray, coords: np.ndarray) -> np.ndarray:
    """Linear interpolation of a 3-D ``volume`` at ``coords`` (3, ...), in the volume's dtype.

    The same numbers as ``ndimage.map_coordinates(volume, coords, order=1, mode="constant",
    cval=np.nan)``: NaN where a coordinate is below 0 or above n - 1, elsewhere scipy's float64
    weights, products and order of the sum. A point on the last plane of an axis takes its corners
    from the plane before (with weight 0 there and 1 on the plane, as scipy's), so every corner is a
    constant offset from the first one; this costs about half of scipy's time per point.
    """
    if coords[0].size == 0:
        return np.empty(coords.shape[1:], volume.dtype)
    flat = volume.ravel()
    strides = np.cumprod((1, *volume.shape[:0:-1]))[::-1]
    first_corner = outside = None
    weights, steps = [], []
    for coord, size, stride in zip(coords, volume.shape, strides):
        if not (coord.min() >= 0 and coord.max() <= size - 1):  # some point outside, or NaN
            inside = (coord >= 0) & (coord <= size - 1)
            coord = np.where(inside, coord, 0.0)
            outside = ~inside if outside is None else outside | ~inside
        low = np.floor(coord)
        if size > 1:
            np.minimum(low, size - 2, out=low)
        low_weight = 1.0 - (coord - low)
        weights.append((low_weight, 1.0 - low_weight))
        steps.append(stride if size > 1 else 0)  # a single plane: weight 0 on the (same) second corner
        index = (low * stride).astype(np.intp)
        first_corner = index if first_corner is None else first_corner + index
    total = None
    for iz in (0, 1):
        for iy in (0, 1):
            for ix in (0, 1):
                term = flat[first_corner + (iz * steps[0] + iy * steps[1] + ix * steps[2])] * weights[0][iz]
                term *= weights[1][iy]
                term *= weights[2][ix]
                if total is None:
                    total = term
                else:
                    total += term
    samples = total.astype(volume.dtype)
    if outside is not None:
        samples[outside] = np.nan
    return samples


def _membrane_points(roi: np.ndarray, centre: np.ndarray, radii_vox: np.ndarray,
                     directions: np.ndarray) -> np.ndarray:
    """Darkest point along each ray (sub-sample parabola refinement); rays leaving the ROI dropped.

    Rounding is monotonic, so each coordinate along a ray is monotonic in the radius: a ray lies
    inside the ROI when both its ends do, and only those rays are sampled.
    """
    axes_first = np.ascontiguousarray(directions.T)  # (3, rays): each axis' coordinates contiguous
    first = centre[:, None] + radii_vox[0] * axes_first
    last = centre[:, None] + radii_vox[-1] * axes_first
    upper = np.array(roi.shape)[:, None] - 1
    inside = ((np.minimum(first, last) >= 0) & (np.maximum(first, last) <= upper)).all(axis=0)
    directions = directions[inside]
    axes_first = np.ascontiguousarray(directions.T)
    coords = centre[:, None, None] + radii_vox * axes_first[:, :, None]  # (3, rays, radii)
    samples = sample_trilinear(roi, coords)
    finite = np.isfinite(samples).all(axis=1)
    if not finite.all():
        samples, directions = samples[finite], directions[finite]
    idx = np.argmin(samples, axis=1)
    inner = np.clip(idx, 1, len(radii_vox) - 2)
    rays = np.arange(len(idx))
    left, mid, right = (samples[rays, inner + k] for k in (-1, 0, 1))
    denom = left - 2 * mid + right
    curved = denom > 1e-9
    offset = np.where(curved, 0.5 * (left - right) / np.where(curved, denom, 1), 0.0)
    step = radii_vox[1] - radii_vox[0]
    r = radii_vox[inner] + np.clip(offset, -1, 1) * step
    interior = (idx > 0) & (idx < len(radii_vox) - 1)
    return centre + r[interior, None] * directions[interior]


def radial_profile(roi: np.ndarray, centre: np.ndarray, voxel_nm: float, max_radius_nm: float,
                   bin_nm: float) -> tuple[np.ndarray, np.ndarray]:
    """Mean intensity against distance from ``centre`` (nm), outside the missing-wedge cone.

    Only the box around the sphere of ``max_radius_nm`` (plus a voxel against rounding) is visited,
    in the ROI's own order, so every bin sums the same voxels in the same order as over the whole ROI.
    """
    reach = max_radius_nm / voxel_nm + 1
    lo = np.maximum(np.floor(centre - reach).astype(int), 0)
    hi = np.minimum(np.ceil(centre + reach).astype(int) + 1, roi.shape)
    offsets = [np.arange(a, b, dtype=np.float32) - c for a, b, c in zip(lo, hi, centre.astype(np.float32))]
    dz, dy, dx = offsets
    squared = (dz * dz)[:, None, None] + (dy * dy)[None, :, None]
    dist = np.sqrt(squared + (dx * dx)[None, None, :]) * voxel_nm
    with np.errstate(invalid="ignore", divide="ignore"):
        away_from_poles = (np.abs(dz) * voxel_nm)[:, None, None] <= MAX_RAY_Z * np.maximum(dist, 1e-6)
    use = (dist < max_radius_nm) & away_from_poles
    bins = (dist[use] / bin_nm).astype(np.int64)
    n_bins = int(max_radius_nm / bin_nm) + 1
    counts = np.bincount(bins, minlength=n_bins)
    sums = np.bincount(bins, weights=roi[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]][use], minlength=n_bins)
    with np.errstate(invalid="ignore"):
        profile = sums / counts
    return (np.arange(n_bins) + 0.5) * bin_nm, profile


def _dip_width(radii: np.ndarray, profile: np.ndarray, r_membrane: float, window_nm: float) -> tuple[float, float]:
    """Full width at half depth, and depth, of the dark shell in a radial profile."""
    near = np.isfinite(profile) & (np.abs(radii - r_membrane) <= window_nm)
    if near.sum() < 5:
        return float("nan"), 0.0
    r, p = radii[near], profile[near]
    k = int(np.argmin(p))
    baseline = 0.5 * (p[: max(k, 1)].max() + p[k:].max())
    depth = baseline - p[k]
    half = p[k] + depth / 2
    left = k
    while left > 0 and p[left] < half:
        left -= 1
    right = k
    while right < len(p) - 1 and p[right] < half:
        right += 1
    width = r[right] - r[left]
    return float(width), float(depth)


def fit_sphere(volume: np.ndarray, centre_vox: np.ndarray, radius_guess_nm: float, voxel_nm: float,
               bilayer_thickness_nm: float | None = 4.5, iterations: int = 3) -> SphereFit | None:
    """Refine a sphere around ``centre_vox`` (z, y, x) of ``volume`` (original grid, any array).

    ``radius_guess_nm`` is the outer radius from the segmentation. The outer radius is the
    membrane's mid radius plus half ``bilayer_thickness_nm`` (None or 0: the measured thickness).
    Returns None when too few rays see a membrane.
    """
    centre = np.asarray(centre_vox, dtype=np.float64)
    half = int(np.ceil((1.6 * radius_guess_nm + 6.0) / voxel_nm))
    lo = np.maximum(np.floor(centre).astype(int) - half, 0)
    hi = np.minimum(np.floor(centre).astype(int) + half + 1, volume.shape)
    if np.any(hi - lo < 3):
        return None
    # A contiguous copy first: smoothing along z straight from the memory-mapped file is slower than copying.
    roi = np.array(volume[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]], dtype=np.float32)
    roi = ndimage.gaussian_filter(roi, max(SMOOTHING_NM / voxel_nm, 0.5))
    spread = float(np.std(roi)) or 1.0  # NaN if any voxel is NaN: then all are below, whatever the median
    roi -= float(_median(roi))
    roi /= spread
    local = centre - lo
    directions = _RAY_DIRECTIONS
    membrane_guess = max(radius_guess_nm - 2.0, 2 * voxel_nm)
    step = 0.25
    points = inliers = None
    for _ in range(iterations):
        radii_nm = np.arange(0.55 * membrane_guess, 1.35 * membrane_guess + 2.0, step * voxel_nm)
        points = _membrane_points(roi, local, radii_nm / voxel_nm, directions)
        if len(points) < 12:
            return None
        new_local, membrane_vox, inliers = _robust_sphere(points)
        if not np.isfinite(new_local).all() or np.linalg.norm(new_local - local) * voxel_nm > radius_guess_nm:
            return None
        local, membrane_guess = new_local, membrane_vox * voxel_nm
    radii, profile = radial_profile(roi, local, voxel_nm, membrane_guess + 12.0, bin_nm=min(0.5, voxel_nm / 2))
    width, depth = _dip_width(radii, profile, membrane_guess, 7.0)
    r_membrane = membrane_guess
    thickness = float(np.clip(width, *THICKNESS_BOUNDS_NM)) if np.isfinite(width) else THICKNESS_BOUNDS_NM[0]
    z, y, x = local + lo
    half_bilayer = (bilayer_thickness_nm if bilayer_thickness_nm else thickness) / 2
    return SphereFit(z=float(z), y=float(y), x=float(x), radius_nm=r_membrane + half_bilayer,
                     membrane_radius_nm=r_membrane, membrane_thickness_nm=thickness,
                     membrane_contrast=depth, fit_score=float(inliers.mean()), rays_used=len(points))


def object_boxes(labels, planes: int = DEFAULT_CHUNKS[0]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(labels, lo, hi): every label present in a z-sliceable label volume (zarr or numpy) and its
    bounding box [lo, hi) (z, y, x), found slab by slab: memory stays one slab."""
    lo = np.zeros((0, 3), np.int64)
    hi = np.zeros((0, 3), np.int64)
    for z0, z1 in z_slabs(labels.shape[0], planes):
        found = ndimage.find_objects(read_box(labels, (slice(z0, z1),)))
        if len(found) > len(lo):
            grow = len(found) - len(lo)
            lo = np.concatenate([lo, np.full((grow, 3), np.iinfo(np.int64).max)])
            hi = np.concatenate([hi, np.full((grow, 3), -1)])
        for index, box in enumerate(found):
            if box is not None:
                starts = (box[0].start + z0, box[1].start, box[2].start)
                stops = (box[0].stop + z0, box[1].stop, box[2].stop)
                lo[index] = np.minimum(lo[index], starts)
                hi[index] = np.maximum(hi[index], stops)
    present = np.flatnonzero(hi[:, 0] >= 0)
    return present + 1, lo[present], hi[present]


def stored_object_boxes(labels) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
    """:func:`object_boxes` as postprocess stored them in the label zarr's attributes (``boxes``: one
    [z0, y0, x0, z1, y1, x1] per label 1..count); None when it did not."""
    boxes = labels.attrs.get("boxes")
    if boxes is None or len(boxes) != labels.attrs.get("count"):
        return None
    boxes = np.asarray(boxes, np.int64).reshape(-1, 6)
    return np.arange(1, len(boxes) + 1), boxes[:, :3], boxes[:, 3:]


def labelled_objects(labels, boxes: tuple | None = None, planes: int = DEFAULT_CHUNKS[0]):
    """Yield (label, origin, mask) of every labelled object, its mask in its box padded by one voxel.

    Reads ``labels`` slab by slab (twice, when ``boxes`` from :func:`object_boxes` is not given) and
    yields each object as soon as the slab holding its last plane is read, so a consumer works on the
    first objects while the rest is read; memory stays one slab plus the open objects' masks.
    Objects come in the order they complete (by their last plane, then label).
    """
    ids, lo, hi = object_boxes(labels, planes) if boxes is None else boxes
    shape = np.array(labels.shape)
    padded_lo, padded_hi = np.maximum(lo - 1, 0), np.minimum(hi + 1, shape)
    masks = {}
    for z0, z1 in z_slabs(labels.shape[0], planes):
        touching = np.flatnonzero((lo[:, 0] < z1) & (hi[:, 0] > z0))
        if not len(touching):
            continue
        block = read_box(labels, (slice(z0, z1),))
        for i in touching:
            mask = masks.get(i)
            if mask is None:
                mask = masks[i] = np.zeros(padded_hi[i] - padded_lo[i], bool)
            zs, ze = max(lo[i, 0], z0), min(hi[i, 0], z1)
            (_, y0, x0), (_, y1, x1) = lo[i], hi[i]
            oz, oy, ox = padded_lo[i]
            mask[zs - oz:ze - oz, y0 - oy:y1 - oy, x0 - ox:x1 - ox] = block[zs - z0:ze - z0, y0:y1, x0:x1] == ids[i]
            if hi[i, 0] <= z1:
                yield int(ids[i]), tuple(int(v) for v in padded_lo[i]), masks.pop(i)


def inscribed_ball(label: int, origin: tuple[int, ...], mask: np.ndarray, voxel_nm: float) -> tuple:
    """(label, mz, my, mx, guess_radius_nm): the centre and radius (model grid) of the object's largest ball."""
    dist = ndimage.distance_transform_edt(mask)
    peak = np.unravel_index(np.argmax(dist), dist.shape)
    mz, my, mx = (int(p + start) for p, start in zip(peak, origin))
    return label, mz, my, mx, float(dist[peak]) * voxel_nm


def region_candidate(region: np.ndarray, region_origin, volume_shape, voxel_nm: float,
                     features: np.ndarray | None = None) -> list:
    """[mz, my, mx, guess_radius_nm] of :func:`inscribed_ball` for the object whose voxels are the
    True ones of ``region``, an array placed at ``region_origin`` in a volume of ``volume_shape``:
    its mask is cut as :func:`labelled_objects` cuts it from a label volume (its bounding box padded
    by one voxel within the volume), so both give the same candidate. postprocess calls this on each
    object it keeps.

    ``features``: the nearest background voxel of each voxel of ``region`` (ndimage's indices, as
    ``distance_transform_edt(region, return_indices=True)`` gives them); where ``region`` is that
    padded box, the candidate comes from their integer squared distances, which are the unit-voxel
    transform's before its square root: the same centre and radius, without a second transform."""
    found = ndimage.find_objects(region.view(np.uint8))[0]
    region_origin = np.asarray(region_origin, np.int64)
    lo = region_origin + [s.start for s in found]
    hi = region_origin + [s.stop for s in found]
    padded_lo, padded_hi = np.maximum(lo - 1, 0), np.minimum(hi + 1, volume_shape)
    region_stop = region_origin + region.shape
    if features is not None and (padded_lo == region_origin).all() and (padded_hi == region_stop).all():
        squared = np.zeros(region.shape, np.int64)
        for axis, nearest in enumerate(features):
            offset = nearest - np.arange(region.shape[axis]).reshape([-1 if a == axis else 1 for a in range(3)])
            squared += offset * offset
        peak = np.unravel_index(int(np.argmax(squared)), region.shape)
        return [*(int(p + start) for p, start in zip(peak, padded_lo)),
                float(np.sqrt(np.float64(squared[peak]))) * voxel_nm]
    mask = np.zeros(padded_hi - padded_lo, bool)
    start, stop = np.maximum(padded_lo, region_origin), np.minimum(padded_hi, region_stop)
    mask[tuple(slice(a, b) for a, b in zip(start - padded_lo, stop - padded_lo))] = \
        region[tuple(slice(a, b) for a, b in zip(start - region_origin, stop - region_origin))]
    return list(inscribed_ball(0, tuple(int(v) for v in padded_lo), mask, voxel_nm)[1:])


def stored_candidates(attrs: dict) -> list[tuple] | None:
    """The candidates (label, mz, my, mx, guess_radius_nm) postprocess stored in the label volume's
    attributes (``candidates``: one [mz, my, mx, guess_radius_nm] per label 1..count); None when it
    did not (labels written by an earlier version)."""
    candidates = attrs.get("candidates")
    if candidates is None or len(candidates) != attrs.get("count"):
        return None
    return [(label, int(mz), int(my), int(mx), float(radius))
            for label, (mz, my, mx, radius) in enumerate(candidates, start=1)]


def resolve_overlaps(table: pd.DataFrame, voxel_nm: float, tolerance_nm: float) -> pd.Series:
    """Flag the lower-scoring sphere of every pair overlapping by more than ``tolerance_nm``."""
    import pandas as pd

    flagged = pd.Series(False, index=table.index)
    ok = table[table["outlier_reason"] == ""]
    if len(ok) < 2:
        return flagged
    from scipy.spatial import cKDTree

    centres = ok[["z", "y", "x"]].to_numpy() * voxel_nm
    radii = ok["radius_nm"].to_numpy()
    tree = cKDTree(centres)
    pairs = tree.query_pairs(2 * radii.max())
    order = np.argsort(-ok["fit_score"].to_numpy() * ok["membrane_contrast"].to_numpy(), kind="stable")
    rank = np.empty_like(order)
    rank[order] = np.arange(len(order))
    dropped = np.zeros(len(ok), bool)
    for i, j in sorted(pairs, key=lambda p: min(rank[p[0]], rank[p[1]])):
        if dropped[i] or dropped[j]:
            continue
        overlap = radii[i] + radii[j] - np.linalg.norm(centres[i] - centres[j])
        if overlap > tolerance_nm:
            dropped[j if rank[i] < rank[j] else i] = True
    flagged.loc[ok.index[dropped]] = True
    return flagged


_WORKER: dict = {}


def _init_worker(tomogram: str, grid_attrs: dict, voxel_nm: float, settings: dict) -> None:
    """Per-process state: the memory-mapped tomogram and the fit settings."""
    mapping = GridMapping.from_attrs(grid_attrs)
    _WORKER.update(volume=read_tomogram(tomogram), mapping=mapping, voxel_nm=voxel_nm,
                   model_voxel_nm=mapping.model_voxel_size_angstrom / 10, **settings)


def _fit_candidate(cand: tuple) -> dict:
    """One row of spheres.csv for a candidate (label, mz, my, mx, guess_radius_nm)."""
    w = _WORKER
    label, mz, my, mx, guess_radius_nm = cand
    guess = w["mapping"].model_to_original(np.array([mz, my, mx]))
    fit = fit_sphere(w["volume"], guess, guess_radius_nm, w["voxel_nm"], w["bilayer_thickness_nm"])
    row = {"label": label, "guess_z": guess[0], "guess_y": guess[1], "guess_x": guess[2],
           "guess_radius_nm": guess_radius_nm}
    if fit is None:
        row.update({k: np.nan for k in SphereFit.__dataclass_fields__}, outlier_reason="fit_failed")
    else:
        row.update(asdict(fit), outlier_reason=_outlier_reason(
            fit, guess, guess_radius_nm, w["voxel_nm"], w["min_radius_nm"], w["max_radius_nm"],
            w["min_contrast"], w["min_fit_score"], w["trusted_contrast"]))
    return row


def _set_up(context: tuple) -> None:
    """Set this process up for the fit's ``context`` (small, carried by every task) at its first task:
    the pool exists before the labels are read (see :func:`vesicleflow.parallel.process_pool`)."""
    if _WORKER.get("context") != context:
        _init_worker(*context)
        _WORKER["context"] = context


def _fit_object(task: tuple) -> dict:
    """One row of spheres.csv for a labelled object (label, origin, mask): its candidate, then its fit."""
    context, obj = task
    _set_up(context)
    return _fit_candidate(inscribed_ball(*obj, _WORKER["model_voxel_nm"]))


def _fit_stored(task: tuple) -> dict:
    """One row of spheres.csv for a candidate that postprocess stored (see :func:`stored_candidates`)."""
    context, candidate = task
    _set_up(context)
    return _fit_candidate(candidate)


def fit_spheres(labels_path: str | Path, tomogram: str | Path, output: str | Path,
                voxel_size_angstrom: float | None = None, min_radius_nm: float = 8.0,
                max_radius_nm: float = 60.0, min_contrast: float = 0.6, min_fit_score: float = 0.5,
                overlap_tolerance_nm: float = 2.0, bilayer_thickness_nm: float | None = 4.5,
                trusted_contrast: float = 1.5, workers: int = 1) -> pd.DataFrame:
    """Fit every candidate, flag outliers (``outlier_reason``), and write the table as CSV.

    A fit that moved far from the segmentation's guess is an outlier unless its membrane is at
    least ``trusted_contrast`` dark: a weak or partial probability blob gives a poor guess, and a
    clear bilayer measured on the tomogram itself is the better evidence. Each label's candidate
    (its largest inscribed ball) is the one postprocess stored with the labels, or, for labels
    without them, found in the labels by the workers; candidates are fitted independently, by
    ``workers`` processes (the table does not depend on their number).

    Coordinates (z, y, x) are 0-based voxel indices of the original tomogram.
    """
    with process_pool(workers) as pool:  # before the first read: see process_pool
        attrs = volume_attributes(labels_path)
        info = read_tomogram_info(tomogram, voxel_size_angstrom)
        voxel_nm = info.voxel_size_nm
        settings = {"min_radius_nm": min_radius_nm, "max_radius_nm": max_radius_nm, "min_contrast": min_contrast,
                    "min_fit_score": min_fit_score, "trusted_contrast": trusted_contrast,
                    "bilayer_thickness_nm": bilayer_thickness_nm}
        context = (str(tomogram), attrs["grid"], voxel_nm, settings)
        candidates = stored_candidates(attrs)
        if candidates is not None:  # the labels themselves need not be read
            fit, n_tasks = _fit_stored, len(candidates)
            tasks = ((context, candidate) for candidate in candidates)
        else:
            # Objects are cut from the labels while the workers fit the first ones (the pool draws
            # tasks from the generator in a thread of its own).
            labels_zarr = open_volume(labels_path)
            boxes = stored_object_boxes(labels_zarr) or object_boxes(labels_zarr)
            fit, n_tasks = _fit_object, len(boxes[0])
            tasks = ((context, obj) for obj in labelled_objects(labels_zarr, boxes))
        # 32 chunks per process: the last ones, fitted while other processes may idle, are short.
        fitted = ordered_map(pool, fit, tasks, chunksize=max(1, n_tasks // (32 * max(workers, 1))))
        import pandas as pd  # while the workers fit

        rows = sorted(fitted, key=lambda row: row["label"])
    columns = ["label", "guess_z", "guess_y", "guess_x", "guess_radius_nm", *SphereFit.__dataclass_fields__,
               "outlier_reason"]
    table = pd.DataFrame(rows, columns=columns)
    table["outlier_reason"] = table["outlier_reason"].fillna("").astype(str)
    table.loc[resolve_overlaps(table, voxel_nm, overlap_tolerance_nm), "outlier_reason"] = "overlap"
    write_table(output, table)
    kept = int((table["outlier_reason"] == "").sum())
    log.info("%s: %d candidates, %d vesicles kept", Path(tomogram).name, len(table), kept)
    return table


def _outlier_reason(fit: SphereFit, guess: np.ndarray, guess_radius_nm: float, voxel_nm: float,
                    min_radius_nm: float, max_radius_nm: float, min_contrast: float,
                    min_fit_score: float, trusted_contrast: float) -> str:
    shift_nm = np.linalg.norm(np.array([fit.z, fit.y, fit.x]) - guess) * voxel_nm
    if not min_radius_nm <= fit.radius_nm <= max_radius_nm:
        return "radius_out_of_range"
    disagrees = shift_nm > 0.5 * guess_radius_nm or abs(fit.radius_nm - guess_radius_nm) > 0.5 * guess_radius_nm
    if disagrees and fit.membrane_contrast < trusted_contrast:
        return "disagrees_with_segmentation"
    if fit.membrane_contrast < min_contrast:
        return "low_contrast"
    if fit.fit_score < min_fit_score:
        return "poor_fit"
    return ""
