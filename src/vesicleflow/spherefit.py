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

import numpy as np
import pandas as pd
from scipy import ndimage

from vesicleflow.grid import GridMapping
from vesicleflow.io import read_tomogram, read_tomogram_info, write_table
from vesicleflow.volumes import open_volume

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


def fit_sphere_to_points(points: np.ndarray, weights: np.ndarray | None = None) -> tuple[np.ndarray, float]:
    """Algebraic least-squares sphere: solves 2 p·c + (R² - |c|²) = |p|²."""
    weights = np.ones(len(points)) if weights is None else weights
    a = np.column_stack([2 * points, np.ones(len(points))]) * weights[:, None]
    b = (points**2).sum(axis=1) * weights
    solution, *_ = np.linalg.lstsq(a, b, rcond=None)
    centre = solution[:3]
    radius_sq = solution[3] + centre @ centre
    return centre, float(np.sqrt(max(radius_sq, 0.0)))


def _robust_sphere(points: np.ndarray, rounds: int = 4) -> tuple[np.ndarray, float, np.ndarray]:
    inliers = np.ones(len(points), bool)
    centre, radius = fit_sphere_to_points(points)
    for _ in range(rounds):
        residual = np.abs(np.linalg.norm(points - centre, axis=1) - radius)
        scale = max(1.4826 * np.median(residual[inliers]), 0.5)
        new_inliers = residual <= 2.5 * scale
        if new_inliers.sum() < 8 or (new_inliers == inliers).all():
            break
        inliers = new_inliers
        centre, radius = fit_sphere_to_points(points[inliers])
    return centre, radius, inliers


def _membrane_points(roi: np.ndarray, centre: np.ndarray, radii_vox: np.ndarray,
                     directions: np.ndarray) -> np.ndarray:
    """Darkest point along each ray (sub-sample parabola refinement); rays leaving the ROI dropped."""
    coords = centre[None, None, :] + radii_vox[None, :, None] * directions[:, None, :]
    samples = ndimage.map_coordinates(roi, coords.reshape(-1, 3).T, order=1, mode="constant",
                                      cval=np.nan).reshape(len(directions), len(radii_vox))
    valid = np.isfinite(samples).all(axis=1)
    samples = samples[valid]
    directions = directions[valid]
    idx = np.argmin(samples, axis=1)
    inner = np.clip(idx, 1, len(radii_vox) - 2)
    left, mid, right = (samples[np.arange(len(idx)), inner + k] for k in (-1, 0, 1))
    denom = left - 2 * mid + right
    offset = np.where(denom > 1e-9, 0.5 * (left - right) / np.where(denom > 1e-9, denom, 1), 0.0)
    step = radii_vox[1] - radii_vox[0]
    r = radii_vox[inner] + np.clip(offset, -1, 1) * step
    interior = (idx > 0) & (idx < len(radii_vox) - 1)
    return centre + r[interior, None] * directions[interior]


def radial_profile(roi: np.ndarray, centre: np.ndarray, voxel_nm: float, max_radius_nm: float,
                   bin_nm: float) -> tuple[np.ndarray, np.ndarray]:
    """Mean intensity against distance from ``centre`` (nm), outside the missing-wedge cone."""
    grid = np.indices(roi.shape, dtype=np.float32).reshape(3, -1).T - centre.astype(np.float32)
    dist = np.linalg.norm(grid, axis=1) * voxel_nm
    with np.errstate(invalid="ignore", divide="ignore"):
        away_from_poles = np.abs(grid[:, 0]) * voxel_nm <= MAX_RAY_Z * np.maximum(dist, 1e-6)
    use = (dist < max_radius_nm) & away_from_poles
    bins = (dist[use] / bin_nm).astype(np.int64)
    n_bins = int(max_radius_nm / bin_nm) + 1
    counts = np.bincount(bins, minlength=n_bins)
    sums = np.bincount(bins, weights=roi.reshape(-1)[use], minlength=n_bins)
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
    roi = np.asarray(volume[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]], dtype=np.float32)
    roi = ndimage.gaussian_filter(roi, max(SMOOTHING_NM / voxel_nm, 0.5))
    spread = float(np.std(roi)) or 1.0
    roi = (roi - float(np.median(roi))) / spread
    local = centre - lo
    directions = fibonacci_directions(N_RAYS)
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


def candidates_from_labels(labels: np.ndarray, voxel_nm: float) -> pd.DataFrame:
    """Inscribed-ball centre and radius (model grid) of each labelled candidate."""
    rows = []
    for label, box in enumerate(ndimage.find_objects(labels), start=1):
        if box is None:
            continue
        padded = tuple(slice(max(s.start - 1, 0), s.stop + 1) for s in box)
        obj = labels[padded] == label
        dist = ndimage.distance_transform_edt(obj)
        peak = np.unravel_index(np.argmax(dist), dist.shape)
        centre = [p + s.start for p, s in zip(peak, padded)]
        rows.append({"label": label, "mz": centre[0], "my": centre[1], "mx": centre[2],
                     "guess_radius_nm": float(dist[peak]) * voxel_nm})
    return pd.DataFrame(rows, columns=["label", "mz", "my", "mx", "guess_radius_nm"])


def resolve_overlaps(table: pd.DataFrame, voxel_nm: float, tolerance_nm: float) -> pd.Series:
    """Flag the lower-scoring sphere of every pair overlapping by more than ``tolerance_nm``."""
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
    _WORKER.update(volume=read_tomogram(tomogram), mapping=GridMapping.from_attrs(grid_attrs),
                   voxel_nm=voxel_nm, **settings)


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


def fit_spheres(labels_path: str | Path, tomogram: str | Path, output: str | Path,
                voxel_size_angstrom: float | None = None, min_radius_nm: float = 8.0,
                max_radius_nm: float = 60.0, min_contrast: float = 0.6, min_fit_score: float = 0.5,
                overlap_tolerance_nm: float = 2.0, bilayer_thickness_nm: float | None = 4.5,
                trusted_contrast: float = 1.5, workers: int = 1) -> pd.DataFrame:
    """Fit every candidate, flag outliers (``outlier_reason``), and write the table as CSV.

    A fit that moved far from the segmentation's guess is an outlier unless its membrane is at
    least ``trusted_contrast`` dark: a weak or partial probability blob gives a poor guess, and a
    clear bilayer measured on the tomogram itself is the better evidence. Candidates are fitted
    independently, by ``workers`` processes (the table does not depend on their number).

    Coordinates (z, y, x) are 0-based voxel indices of the original tomogram.
    """
    labels_zarr = open_volume(labels_path)
    grid_attrs = dict(labels_zarr.attrs)["grid"]
    model_voxel_nm = GridMapping.from_attrs(grid_attrs).model_voxel_size_angstrom / 10
    info = read_tomogram_info(tomogram, voxel_size_angstrom)
    voxel_nm = info.voxel_size_nm
    candidates = candidates_from_labels(np.asarray(labels_zarr[...]), model_voxel_nm)
    settings = {"min_radius_nm": min_radius_nm, "max_radius_nm": max_radius_nm, "min_contrast": min_contrast,
                "min_fit_score": min_fit_score, "trusted_contrast": trusted_contrast,
                "bilayer_thickness_nm": bilayer_thickness_nm}
    init_args = (str(tomogram), grid_attrs, voxel_nm, settings)
    work = list(candidates.itertuples(index=False, name=None))
    if workers > 1 and len(work) > 1:
        import multiprocessing

        with multiprocessing.get_context("spawn").Pool(workers, _init_worker, init_args) as pool:
            rows = pool.map(_fit_candidate, work, chunksize=max(1, len(work) // (8 * workers)))
    else:
        _init_worker(*init_args)
        rows = [_fit_candidate(cand) for cand in work]
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
