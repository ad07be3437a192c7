"""The optimised spherefit gives the very numbers of the straightforward code it replaced.

The references below are the code as it was before the optimisation (scipy's map_coordinates,
np.median, a radial profile over the whole ROI, a fresh least-squares system per refit, the
candidates found before fitting). Every comparison is exact: the optimisation changed where and
how often numbers are computed, not one of them.
"""

from __future__ import annotations

import os
from unittest import mock

import numpy as np
import pandas as pd
import pytest
from conftest import shell_volume
from scipy import ndimage

from vesicleflow import spherefit
from vesicleflow.grid import GridMapping
from vesicleflow.io import write_mrc
from vesicleflow.spherefit import (
    MAX_RAY_Z,
    N_RAYS,
    SMOOTHING_NM,
    THICKNESS_BOUNDS_NM,
    SphereFit,
    fibonacci_directions,
    fit_sphere,
    fit_spheres,
    radial_profile,
    sample_trilinear,
)
from vesicleflow.volumes import create_volume, open_volume

# ----------------------------------------------------------------------------- reference code


def reference_sphere_to_points(points):
    a = np.column_stack([2 * points, np.ones(len(points))])
    b = (points**2).sum(axis=1)
    solution, *_ = np.linalg.lstsq(a, b, rcond=None)
    centre = solution[:3]
    return centre, float(np.sqrt(max(solution[3] + centre @ centre, 0.0)))


def reference_robust_sphere(points, rounds=4):
    inliers = np.ones(len(points), bool)
    centre, radius = reference_sphere_to_points(points)
    for _ in range(rounds):
        residual = np.abs(np.linalg.norm(points - centre, axis=1) - radius)
        scale = max(1.4826 * np.median(residual[inliers]), 0.5)
        new_inliers = residual <= 2.5 * scale
        if new_inliers.sum() < 8 or (new_inliers == inliers).all():
            break
        inliers = new_inliers
        centre, radius = reference_sphere_to_points(points[inliers])
    return centre, radius, inliers


def reference_membrane_points(roi, centre, radii_vox, directions):
    coords = centre[None, None, :] + radii_vox[None, :, None] * directions[:, None, :]
    samples = ndimage.map_coordinates(roi, coords.reshape(-1, 3).T, order=1, mode="constant",
                                      cval=np.nan).reshape(len(directions), len(radii_vox))
    valid = np.isfinite(samples).all(axis=1)
    samples, directions = samples[valid], directions[valid]
    idx = np.argmin(samples, axis=1)
    inner = np.clip(idx, 1, len(radii_vox) - 2)
    left, mid, right = (samples[np.arange(len(idx)), inner + k] for k in (-1, 0, 1))
    denom = left - 2 * mid + right
    offset = np.where(denom > 1e-9, 0.5 * (left - right) / np.where(denom > 1e-9, denom, 1), 0.0)
    r = radii_vox[inner] + np.clip(offset, -1, 1) * (radii_vox[1] - radii_vox[0])
    interior = (idx > 0) & (idx < len(radii_vox) - 1)
    return centre + r[interior, None] * directions[interior]


def reference_radial_profile(roi, centre, voxel_nm, max_radius_nm, bin_nm):
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


def reference_fit_sphere(volume, centre_vox, radius_guess_nm, voxel_nm, bilayer_thickness_nm=4.5, iterations=3):
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
    for _ in range(iterations):
        radii_nm = np.arange(0.55 * membrane_guess, 1.35 * membrane_guess + 2.0, 0.25 * voxel_nm)
        points = reference_membrane_points(roi, local, radii_nm / voxel_nm, directions)
        if len(points) < 12:
            return None
        new_local, membrane_vox, inliers = reference_robust_sphere(points)
        if not np.isfinite(new_local).all() or np.linalg.norm(new_local - local) * voxel_nm > radius_guess_nm:
            return None
        local, membrane_guess = new_local, membrane_vox * voxel_nm
    radii, profile = reference_radial_profile(roi, local, voxel_nm, membrane_guess + 12.0, min(0.5, voxel_nm / 2))
    width, depth = spherefit._dip_width(radii, profile, membrane_guess, 7.0)
    thickness = float(np.clip(width, *THICKNESS_BOUNDS_NM)) if np.isfinite(width) else THICKNESS_BOUNDS_NM[0]
    z, y, x = local + lo
    half_bilayer = (bilayer_thickness_nm if bilayer_thickness_nm else thickness) / 2
    return SphereFit(z=float(z), y=float(y), x=float(x), radius_nm=membrane_guess + half_bilayer,
                     membrane_radius_nm=membrane_guess, membrane_thickness_nm=thickness,
                     membrane_contrast=depth, fit_score=float(inliers.mean()), rays_used=len(points))


def reference_candidates(labels, voxel_nm):
    rows = []
    for label, box in enumerate(ndimage.find_objects(labels), start=1):
        if box is None:
            continue
        padded = tuple(slice(max(s.start - 1, 0), s.stop + 1) for s in box)
        dist = ndimage.distance_transform_edt(labels[padded] == label)
        peak = np.unravel_index(np.argmax(dist), dist.shape)
        centre = [p + s.start for p, s in zip(peak, padded)]
        rows.append((label, *centre, float(dist[peak]) * voxel_nm))
    return rows


# ------------------------------------------------------------------------------------------ tests


def test_trilinear_sampler_gives_map_coordinates_numbers_and_nan_outside():
    rng = np.random.default_rng(0)
    for trial in range(150):
        shape = tuple(int(n) for n in rng.integers(1, 10, 3))  # single planes too
        volume = rng.standard_normal(shape).astype(np.float32 if trial % 2 else np.float64)
        points = rng.uniform(-1.0, np.array(shape), (400, 3))
        points[:40] = np.round(points[:40])  # on voxels, including the first and last planes
        points[40:50, 0] = shape[0] - 1
        points[50:60, 1] = -0.0
        if trial % 3:  # just outside, and undefined
            points[60:70, 2] = shape[2] - 1 + 1e-12
            points[70:80, 1] = -1e-300
            points[80, 0] = np.nan
        else:  # all inside: the path without masking
            points = np.clip(points, 0, np.array(shape) - 1)
        expected = ndimage.map_coordinates(volume, points.T, order=1, mode="constant", cval=np.nan)
        got = sample_trilinear(volume, np.ascontiguousarray(points.T).reshape(3, 20, 20)).reshape(-1)
        assert got.dtype == expected.dtype
        np.testing.assert_array_equal(got, expected)  # NaN where NaN, bit for bit elsewhere
    assert sample_trilinear(volume, np.empty((3, 0, 5))).shape == (0, 5)


def test_median_is_numpys():
    rng = np.random.default_rng(1)
    for size in [*range(1, 40), 999, 1000, 47**3]:
        for dtype in (np.float32, np.float64):
            values = (rng.standard_normal(size) * 10).astype(dtype)
            if size % 3 == 0:
                values = np.round(values)  # ties
            got, expected = spherefit._median(values), np.median(values)
            assert got == expected and got.dtype == expected.dtype


def test_radial_profile_sums_the_same_voxels_in_the_same_order():
    rng = np.random.default_rng(2)
    roi = rng.standard_normal((37, 41, 39)).astype(np.float32)
    for centre in [(18.3, 20.1, 19.7), (1.2, 39.6, 0.4), (-3.0, 20.0, 45.5), (18.0, 20.0, 19.0)]:
        for voxel_nm, max_radius_nm in [(1.5, 27.3), (1.0, 12.0), (2.8, 60.0)]:
            bin_nm = min(0.5, voxel_nm / 2)
            got = radial_profile(roi, np.array(centre), voxel_nm, max_radius_nm, bin_nm)
            expected = reference_radial_profile(roi, np.array(centre), voxel_nm, max_radius_nm, bin_nm)
            np.testing.assert_array_equal(got[0], expected[0])
            np.testing.assert_array_equal(got[1], expected[1])


@pytest.mark.parametrize("noise, voxel_nm, bilayer", [(0.0, 1.0, 4.5), (0.4, 1.5, 4.5), (0.8, 1.0, None)])
def test_fit_sphere_gives_the_reference_fit(noise, voxel_nm, bilayer):
    true_centre = np.array([30.3, 31.6, 29.2])
    volume = shell_volume((56, 64, 60), true_centre, 12.4, 3.0, noise=noise, seed=3)
    guesses = [true_centre + [1.5, -1.2, 1.0], true_centre + [-2.0, 0.5, -0.7],
               np.array([12.0, 31.0, 29.0]),  # the ROI is cut by the volume's first planes
               np.array([50.5, 60.2, 3.3])]  # near a corner: few rays stay inside, or the fit fails
    for guess in guesses:
        for radius_guess in (12.4 * voxel_nm, 16.0 * voxel_nm):
            got = fit_sphere(volume, guess, radius_guess, voxel_nm, bilayer)
            assert got == reference_fit_sphere(volume, guess, radius_guess, voxel_nm, bilayer)


@pytest.fixture(scope="module")
def simulated_run(tmp_path_factory):
    """A simulated tomogram with 40 vesicles and its labels (the model grid is the tomogram's)."""
    from vesicleflow.simulate import simulate_tomogram

    root = tmp_path_factory.mktemp("spherefit")
    sim = simulate_tomogram(3, (48, 128, 128), voxel_size_nm=2.0, n_vesicles=40, with_plasma_membrane=False,
                            randomize=False)
    tomogram = root / "tomogram.mrc"
    write_mrc(tomogram, sim.tomogram, 20.0)
    mapping = GridMapping(sim.tomogram.shape, 20.0, 20.0)
    labels = create_volume(root / "labels.zarr", sim.labels.shape, sim.labels.dtype,
                           attrs={"grid": mapping.to_attrs(), "count": int(sim.labels.max())})
    labels[...] = sim.labels
    return root, tomogram, sim


def test_fit_spheres_gives_the_reference_table_whatever_the_workers(simulated_run):
    root, tomogram, sim = simulated_run
    environment = dict(os.environ)
    tables = {workers: fit_spheres(root / "labels.zarr", tomogram, root / f"spheres_{workers}.csv", workers=workers)
              for workers in (1, 2)}
    assert dict(os.environ) == environment  # the workers' single-thread settings stay theirs
    pd.testing.assert_frame_equal(tables[1], tables[2], check_exact=True)
    # postprocess stores each label's box with the labels; then the volume is not scanned for them
    open_volume(root / "labels.zarr", mode="r+").attrs["boxes"] = [
        [s.start for s in box] + [s.stop for s in box] for box in ndimage.find_objects(sim.labels)]
    with mock.patch.object(spherefit, "object_boxes", side_effect=AssertionError("scanned")):
        stored = fit_spheres(root / "labels.zarr", tomogram, root / "spheres_stored.csv", workers=2)
    pd.testing.assert_frame_equal(stored, tables[1], check_exact=True)
    table = tables[1]
    assert len(table) == 40 and (table["outlier_reason"] == "").sum() >= 30

    candidates = reference_candidates(sim.labels, 2.0)
    np.testing.assert_array_equal(table["label"], [c[0] for c in candidates])
    np.testing.assert_array_equal(table[["guess_z", "guess_y", "guess_x"]], [c[1:4] for c in candidates])
    np.testing.assert_array_equal(table["guess_radius_nm"], [c[4] for c in candidates])
    for (_, *centre, radius_guess), row in zip(candidates, table.itertuples()):
        fit = reference_fit_sphere(sim.tomogram, np.array(centre, float), radius_guess, 2.0)
        if fit is None:
            assert row.outlier_reason == "fit_failed"
        else:
            assert {field: getattr(row, field) for field in SphereFit.__dataclass_fields__} == vars(fit)


@pytest.mark.parametrize("planes", [1, 5, 64])
def test_objects_cut_slab_by_slab_are_the_whole_volume_ones(simulated_run, planes):
    """Objects spanning several slabs (and the volume's faces) get the same padded box and mask as
    cut from the whole volume at once, each exactly once."""
    root, _, sim = simulated_run
    labels = spherefit.open_volume(root / "labels.zarr")
    objects = list(spherefit.labelled_objects(labels, planes=planes))
    got = {label: (origin, mask) for label, origin, mask in objects}
    assert len(got) == len(objects)
    expected = {}
    for label, box in enumerate(ndimage.find_objects(sim.labels), start=1):
        if box is not None:
            padded = tuple(slice(max(s.start - 1, 0), s.stop + 1) for s in box)
            expected[label] = (tuple(s.start for s in padded), sim.labels[padded] == label)
    assert sorted(got) == sorted(expected) and len(got) == 40
    for label, (origin, mask) in expected.items():
        assert got[label][0] == origin
        np.testing.assert_array_equal(got[label][1], mask)
