"""export: the user-facing results of one tomogram, on its original grid.

- ``vesicles.csv``: accepted vesicles (columns documented in README.md; ``VESICLE_COLUMNS``)
- ``labels.mrc``: instance labels of the segmentation (value = vesicle_id), input's voxel size and origin
- ``sphere_labels.mrc``: each vesicle drawn as a sphere of its fitted outer radius (value = vesicle_id)
- ``vesicles.mod``: IMOD scattered-point model, one point per vesicle with its sphere radius
- ``vesicles_relion5.star`` / ``vesicles_relion4.star``: RELION 5 (centred Å) and RELION 4 / Warp (voxels)
- ``probability.mrc`` (optional): the U-Net probability resampled to the original grid
- ``preview.png``: orthogonal slices with the fitted spheres drawn on the tomogram
- ``tomogram.json``: what aggregate needs (analysed volume, voxel size, counts)

Every file is valid (header, columns) when the tomogram has no vesicle.
"""

from __future__ import annotations

import logging
import math
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pandas as pd
from scipy import ndimage
from scipy.spatial import cKDTree

from vesicleflow import formats
from vesicleflow.grid import GridMapping, nearest_source_indices
from vesicleflow.io import read_tomogram, read_tomogram_info, write_json, write_table
from vesicleflow.spherefit import fibonacci_directions, sample_trilinear
from vesicleflow.volumes import DEFAULT_CHUNKS, open_volume, read_box

log = logging.getLogger(__name__)

#: The vesicles.csv contract: these first, in this order (README "Outputs"); new columns go at the end.
CONTRACT_COLUMNS = [
    "dataset", "tomogram", "vesicle_id", "x", "y", "z", "radius_nm",
    "x_nm", "y_nm", "z_nm", "membrane_thickness_nm", "membrane_contrast", "fit_score",
    "nn_distance_nm",
]
VESICLE_COLUMNS = [
    *CONTRACT_COLUMNS,
    "x_angstrom", "y_angstrom", "z_angstrom", "radius_voxels", "membrane_radius_nm",
    "membrane_intensity_sd", "lumen_intensity_sd", "nn_surface_distance_nm",
    "mask_centre_distance_nm", "mask_distance_nm", "flags",
]
#: Soft quality flags of accepted vesicles (``flags`` column, ``;``-separated, empty = none).
FLAG_EDGE = "edge"                      # the sphere extends beyond the tomogram
FLAG_CROSSES_MASK = "crosses_mask"      # the sphere extends beyond the mask (cytoplasm) border
FLAG_RADIUS_OUTLIER = "radius_outlier"  # radius beyond 1.5 IQR of the tomogram's quartiles (>= 8 vesicles)
#: The mask's distance transform runs on at most this many voxels (the mask is subsampled beyond).
MASK_EDT_MAX_VOXELS = 8 * 2**20
#: Planes sampled (evenly in z) for the tomogram's intensity mean and standard deviation.
REFERENCE_PLANES = 16


def nearest_neighbour_distances(centres_nm: np.ndarray) -> np.ndarray:
    """Centre-to-centre distance to the nearest other vesicle (NaN when alone)."""
    if len(centres_nm) < 2:
        return np.full(len(centres_nm), np.nan)
    distances, _ = cKDTree(centres_nm).query(centres_nm, k=2)
    return distances[:, 1]


def nearest_surface_distances(centres_nm: np.ndarray, radii_nm: np.ndarray) -> np.ndarray:
    """Gap between outer surfaces to the closest other vesicle: min_j |ci - cj| - ri - rj (NaN when alone).

    Exact: only vesicles within (nearest centre distance + max radius - min radius) can be closer.
    """
    n = len(centres_nm)
    if n < 2:
        return np.full(n, np.nan)
    tree = cKDTree(centres_nm)
    nearest = nearest_neighbour_distances(centres_nm)
    slack = float(radii_nm.max() - radii_nm.min())
    gaps = np.empty(n)
    for i, candidates in enumerate(tree.query_ball_point(centres_nm, nearest + slack + 1e-9)):
        others = np.array([j for j in candidates if j != i])
        d = np.linalg.norm(centres_nm[others] - centres_nm[i], axis=1)
        gaps[i] = np.min(d - radii_nm[others]) - radii_nm[i]
    return gaps


def vesicle_table(spheres: pd.DataFrame, dataset: str, tomogram: str, voxel_nm: float) -> pd.DataFrame:
    """Accepted spheres -> vesicles.csv rows numbered 1..N in (z, y, x) order; measurements that
    need the volumes (intensities, mask distances, flags) are NaN/empty here and filled by
    :func:`export_tomogram`."""
    accepted = spheres[spheres["outlier_reason"].fillna("") == ""]
    accepted = accepted.sort_values(["z", "y", "x"], kind="stable").reset_index(drop=True)
    n = len(accepted)
    nan = np.full(n, np.nan)

    def column(name):
        return accepted[name].to_numpy(dtype=np.float64) if name in accepted else nan.copy()

    x, y, z = column("x"), column("y"), column("z")
    radius = column("radius_nm")
    table = pd.DataFrame({
        "dataset": pd.Series([dataset] * n, dtype=object),
        "tomogram": pd.Series([tomogram] * n, dtype=object),
        "vesicle_id": np.arange(1, n + 1, dtype=np.int64),
        "x": x, "y": y, "z": z, "radius_nm": radius,
        "x_nm": x * voxel_nm, "y_nm": y * voxel_nm, "z_nm": z * voxel_nm,
        "membrane_thickness_nm": column("membrane_thickness_nm"),
        "membrane_contrast": column("membrane_contrast"),
        "fit_score": column("fit_score"),
    })
    centres_nm = table[["z_nm", "y_nm", "x_nm"]].to_numpy()
    table["nn_distance_nm"] = nearest_neighbour_distances(centres_nm)
    for axis, values in zip("xyz", (x, y, z)):
        table[f"{axis}_angstrom"] = values * voxel_nm * 10
    table["radius_voxels"] = radius / voxel_nm
    table["membrane_radius_nm"] = column("membrane_radius_nm")
    table["membrane_intensity_sd"] = nan.copy()
    table["lumen_intensity_sd"] = nan.copy()
    table["nn_surface_distance_nm"] = nearest_surface_distances(centres_nm, radius)
    table["mask_centre_distance_nm"] = nan.copy()
    table["mask_distance_nm"] = nan.copy()
    table["flags"] = pd.Series([""] * n, dtype=object)
    table.attrs["source_labels"] = (accepted["label"].to_numpy(dtype=np.int64) if "label" in accepted
                                    else np.zeros(0, np.int64))
    return table[VESICLE_COLUMNS]


# ------------------------------------------------------------------------- measurements

def intensity_reference(volume, planes: int = REFERENCE_PLANES) -> tuple[float, float]:
    """Mean and standard deviation of the tomogram, from ``planes`` z planes spread evenly."""
    nz = volume.shape[0]
    total = total_sq = count = 0.0
    for z in np.unique(np.linspace(0, nz - 1, min(nz, planes)).round().astype(int)):
        plane = np.asarray(volume[int(z)], dtype=np.float64)
        total += plane.sum()
        total_sq += np.square(plane).sum()
        count += plane.size
    mean = total / count
    return mean, math.sqrt(max(total_sq / count - mean * mean, 0.0)) or 1.0


def membrane_and_lumen_intensity(volume, table: pd.DataFrame, voxel_nm: float) -> tuple[np.ndarray, np.ndarray]:
    """Per vesicle: mean intensity on the membrane mid-surface and inside the lumen, in standard
    deviations from the tomogram's mean (negative = darker than average = denser, for unflipped data).

    The membrane is sampled (trilinear) on its mid radius along rays outside the missing-wedge
    cone; the lumen is every voxel within 70 % of the inner radius (membrane radius - half thickness).
    """
    n = len(table)
    membrane, lumen = np.full(n, np.nan), np.full(n, np.nan)
    if n == 0:
        return membrane, lumen
    mean, sd = intensity_reference(volume)
    directions = fibonacci_directions(256)
    shape = np.array(volume.shape)
    centres = table[["z", "y", "x"]].to_numpy(dtype=np.float64)
    mid = table["membrane_radius_nm"].to_numpy(dtype=np.float64)
    outer = table["radius_nm"].to_numpy(dtype=np.float64)
    thickness = table["membrane_thickness_nm"].to_numpy(dtype=np.float64)
    mid = np.where(np.isfinite(mid), mid, outer - np.nan_to_num(thickness, nan=4.0) / 2) / voxel_nm
    inner = mid - np.nan_to_num(thickness, nan=4.0) / 2 / voxel_nm
    for i, (centre, r_mid, r_inner) in enumerate(zip(centres, mid, inner)):
        reach = int(math.ceil(max(r_mid, 1.0))) + 2
        lo = np.maximum(np.floor(centre).astype(int) - reach, 0)
        hi = np.minimum(np.floor(centre).astype(int) + reach + 2, shape)
        if np.any(hi <= lo):
            continue
        roi = np.asarray(volume[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]], dtype=np.float32)
        local = centre - lo
        points = (local + r_mid * directions).T
        samples = sample_trilinear(roi, points)
        if np.isfinite(samples).any():
            membrane[i] = (float(np.nanmean(samples)) - mean) / sd
        lumen_radius = max(0.7 * r_inner, 0.5)
        # Only the lumen's box (a voxel wider against rounding) is visited: the same voxels, in the same order.
        near = tuple(slice(max(int(np.floor(c - lumen_radius)) - 1, 0), min(int(np.ceil(c + lumen_radius)) + 2, n))
                     for c, n in zip(local, roi.shape))
        grids = np.ogrid[near]
        dist = np.sqrt(sum((g - c) ** 2 for g, c in zip(grids, local)))
        inside = dist <= lumen_radius
        if inside.any():
            lumen[i] = (float(roi[near][inside].mean()) - mean) / sd
    return membrane, lumen


def mask_border_distances(mask: str | Path, centres_zyx: np.ndarray, voxel_nm: float,
                          max_voxels: int = MASK_EDT_MAX_VOXELS) -> tuple[np.ndarray, int]:
    """Distance (nm) from each centre to the nearest voxel outside the mask (mask == 0).

    The Euclidean distance transform of the mask is computed on the original grid when it has at
    most ``max_voxels`` voxels, otherwise on the mask subsampled by an integer factor f (read plane
    by plane, so memory stays bounded); values are then accurate to about f voxels. The volume's
    faces are not a border (only mask-zero voxels inside the tomogram count). Centres are
    interpolated trilinearly. All NaN when the mask has no zero voxel. Returns (distances, f).
    """
    data = read_tomogram(mask)
    shape = data.shape
    factor = max(1, math.ceil((float(np.prod(shape)) / max_voxels) ** (1 / 3)))
    start = factor // 2
    coarse = np.stack([np.asarray(data[z, start::factor, start::factor]) != 0
                       for z in range(start, shape[0], factor)])
    centres = np.asarray(centres_zyx, dtype=np.float64).reshape(-1, 3)
    if coarse.all() or len(centres) == 0:
        return np.full(len(centres), np.nan), factor
    distance = ndimage.distance_transform_edt(coarse).astype(np.float32)
    coords = ((centres - start) / factor).T
    sampled = ndimage.map_coordinates(distance, coords, order=1, mode="nearest")
    return sampled * factor * voxel_nm, factor


def quality_flags(table: pd.DataFrame, shape_zyx, voxel_nm: float) -> pd.Series:
    """``;``-joined soft flags per accepted vesicle (see FLAG_*); empty string when none apply."""
    n = len(table)
    flags = [[] for _ in range(n)]
    if n == 0:
        return pd.Series([], dtype=object)
    centres = table[["z", "y", "x"]].to_numpy(dtype=np.float64)
    radii = table["radius_nm"].to_numpy(dtype=np.float64)[:, None] / voxel_nm
    upper = np.array(shape_zyx, dtype=np.float64) - 0.5
    edge = ((centres - radii) < -0.5).any(axis=1) | ((centres + radii) > upper).any(axis=1)
    crosses = (table["mask_distance_nm"].to_numpy(dtype=np.float64) < 0)
    radius_outlier = np.zeros(n, bool)
    if n >= 8:
        q1, q3 = np.percentile(table["radius_nm"], [25, 75])
        fence = 1.5 * (q3 - q1)
        radius_outlier = (table["radius_nm"] < q1 - fence).to_numpy() | (table["radius_nm"] > q3 + fence).to_numpy()
    for i in range(n):
        if edge[i]:
            flags[i].append(FLAG_EDGE)
        if crosses[i]:
            flags[i].append(FLAG_CROSSES_MASK)
        if radius_outlier[i]:
            flags[i].append(FLAG_RADIUS_OUTLIER)
    return pd.Series([";".join(f) for f in flags], dtype=object, index=table.index)


# ------------------------------------------------------------------------------- writers

def write_label_mrc(path: str | Path, model_labels, mapping: GridMapping, label_to_id: np.ndarray) -> None:
    """Resample model-grid labels to the original grid (nearest), renumbered to vesicle ids.

    Model planes are read in whole zarr chunks (each read once); each is renumbered and resampled
    once into one plane buffer, written again for every original plane that repeats it. The header
    statistics come from the renumbered model plane's labelled voxels, each weighted by how often its
    row and column repeat, not from a scan of the larger output (the sums are of integers, exact
    below 2**53, so their order does not matter).
    """
    mode, dtype = formats.label_mrc_mode(int(label_to_id.max(initial=0)))
    iz, iy, ix = nearest_source_indices(mapping.original_shape, mapping.model_shape, mapping.original_to_model)
    lut = label_to_id.astype(dtype)
    stats = formats.HeaderStats()
    row_weights = np.bincount(iy, minlength=mapping.model_shape[1]).astype(np.float64)
    col_weights = np.bincount(ix, minlength=mapping.model_shape[2]).astype(np.float64)
    shown_voxels = np.count_nonzero(row_weights) * np.count_nonzero(col_weights)  # model voxels in the output

    def moments(renumbered: np.ndarray) -> tuple:
        rows, cols = np.divmod(np.flatnonzero(renumbered), renumbered.shape[1])  # np.nonzero's, in half the time
        weights = row_weights[rows] * col_weights[cols]
        seen = weights > 0
        values = renumbered[rows[seen], cols[seen]].astype(np.float64)
        weighted = values * weights[seen]
        low = 0.0 if len(values) < shown_voxels else float(values.min())
        # einsum's own loop: BLAS (``@``) would start its threads, which then spin, for a 0.1 ms job
        return (len(iy) * len(ix), float(weighted.sum()), float(np.einsum("i,i->", weighted, values)), low,
                float(values.max(initial=0.0)))

    def planes():  # one plane buffer: a repeated plane is written again, not copied
        chunk = DEFAULT_CHUNKS[0]
        plane, previous, plane_moments = np.empty((1, len(iy), len(ix)), dtype), None, None
        block_buffer = np.empty((chunk, *mapping.model_shape[1:]), model_labels.dtype)
        for b0 in range(0, mapping.model_shape[0], chunk):
            k0, k1 = (int(k) for k in np.searchsorted(iz, [b0, b0 + chunk]))  # iz never decreases
            if k0 == k1:
                continue
            block = read_box(model_labels, (slice(b0, b0 + chunk),), out=block_buffer)
            for k in range(k0, k1):
                if iz[k] != previous:  # renumber on the (smaller) model plane, then take rows and columns
                    renumbered = lut.take(block[iz[k] - b0])  # lut[...]'s values, in half the time
                    renumbered.take(iy, axis=0).take(ix, axis=1, out=plane[0])
                    previous, plane_moments = iz[k], moments(renumbered)
                stats.add_moments(*plane_moments)
                yield k, plane

    formats.write_mrc_slabs(path, mapping.original_shape, mode, mapping.original_voxel_size_angstrom,
                            mapping.origin_angstrom, planes(), label="vesicleflow: vesicle instance labels",
                            stats=stats)


def write_sphere_label_mrc(path: str | Path, table: pd.DataFrame, shape_zyx, voxel_size_angstrom: float,
                           origin_angstrom) -> None:
    """Each vesicle drawn as a sphere of its outer radius, value = vesicle_id, on the original grid."""
    mode, dtype = formats.label_mrc_mode(len(table))
    centres = table[["z", "y", "x"]].to_numpy(dtype=np.float64)
    radii = table["radius_nm"].to_numpy(dtype=np.float64) / (voxel_size_angstrom / 10)
    stats = formats.HeaderStats()
    slabs = formats.sphere_label_slabs(shape_zyx, centres, radii, table["vesicle_id"].to_numpy(), dtype, stats=stats)
    formats.write_mrc_slabs(path, shape_zyx, mode, voxel_size_angstrom, origin_angstrom, slabs,
                            label="vesicleflow: fitted vesicle spheres", stats=stats)


def write_probability_mrc(path: str | Path, probability_path: str | Path) -> None:
    """The model-grid probability map resampled (trilinear) to the original grid, float32."""
    volume = open_volume(probability_path)
    mapping = GridMapping.from_attrs(dict(volume.attrs)["grid"])
    formats.write_mrc_slabs(path, mapping.original_shape, 2, mapping.original_voxel_size_angstrom,
                            mapping.origin_angstrom, formats.resampled_slabs(volume, mapping),
                            label="vesicleflow: vesicle probability")


def analysed_volume_um3(mask: str | Path | None, shape, voxel_nm: float) -> float:
    """Cytoplasm volume when a mask is given, otherwise the whole tomogram, in µm³."""
    if mask:
        data = read_tomogram(mask)
        voxels = sum(int(np.count_nonzero(data[z])) for z in range(data.shape[0]))
    else:
        voxels = int(np.prod(shape))
    return voxels * (voxel_nm / 1000.0) ** 3


def export_tomogram(spheres_csv: str | Path, labels_path: str | Path, tomogram: str | Path,
                    out_dir: str | Path, dataset: str, name: str,
                    voxel_size_angstrom: float | None = None, mask: str | Path | None = None,
                    probability: str | Path | None = None, curated: str | Path | None = None,
                    threads: int = 2) -> pd.DataFrame:
    """Write every per-tomogram result (see the module docstring) into ``out_dir``.

    The original-grid volumes (label, sphere and probability MRCs), most of the time, are written
    by ``threads`` threads (their numpy work and file writes release the GIL) while this thread
    measures the membrane and lumen intensities and writes the small files.

    ``curated``: a ``vesicles.curated.csv`` (``vesicleflow curate``); when given, its vesicles
    replace spherefit's accepted ones in every export (see :func:`vesicleflow.curate.curated_spheres`).

    ``probability``: the model-grid probability zarr; when given, ``probability.mrc`` is written too.
    """
    from vesicleflow.plots import plot_preview

    out_dir = Path(out_dir)
    info = read_tomogram_info(tomogram, voxel_size_angstrom)
    voxel_nm = info.voxel_size_nm
    spheres = pd.read_csv(spheres_csv, keep_default_na=False, na_values=[""])
    spheres["outlier_reason"] = spheres["outlier_reason"].fillna("").astype(str)
    if curated:
        from vesicleflow.curate import curated_spheres, read_curated

        spheres = curated_spheres(spheres, read_curated(curated), voxel_nm)
    table = vesicle_table(spheres, dataset, name, voxel_nm)
    volume = read_tomogram(tomogram)
    border_factor = None
    if mask:
        centre_distance, border_factor = mask_border_distances(mask, table[["z", "y", "x"]].to_numpy(), voxel_nm)
        table["mask_centre_distance_nm"] = centre_distance
        table["mask_distance_nm"] = centre_distance - table["radius_nm"].to_numpy()
    table["flags"] = quality_flags(table, info.shape, voxel_nm)

    labels_zarr = open_volume(labels_path)
    mapping = GridMapping.from_attrs(dict(labels_zarr.attrs)["grid"])
    label_to_id = np.zeros(int(labels_zarr.attrs.get("count", 0)) + 1, np.uint32)
    source_labels = table.attrs["source_labels"]
    segmented = source_labels > 0  # vesicles placed by hand (curate) have no segmentation instance
    label_to_id[source_labels[segmented]] = table["vesicle_id"].to_numpy()[segmented]
    volume_writers = [
        (write_label_mrc, out_dir / "labels.mrc", labels_zarr, mapping, label_to_id),
        (write_sphere_label_mrc, out_dir / "sphere_labels.mrc",
         table[["z", "y", "x", "radius_nm", "vesicle_id"]].copy(), info.shape, info.voxel_size_angstrom,
         info.origin_angstrom),
    ] + ([(write_probability_mrc, out_dir / "probability.mrc", probability)] if probability else [])
    with ThreadPoolExecutor(max(1, threads)) as pool:
        pending = [pool.submit(*job) for job in volume_writers]  # their own copies: the table grows below
        membrane, lumen = membrane_and_lumen_intensity(volume, table, voxel_nm)
        table["membrane_intensity_sd"], table["lumen_intensity_sd"] = membrane, lumen
        formats.write_imod_model(out_dir / "vesicles.mod", table, info.shape, voxel_nm,
                                 f"vesicleflow {dataset}/{name}")
        formats.write_star(out_dir / "vesicles_relion5.star",
                           formats.relion5_table(table, name, info.shape, info.voxel_size_angstrom))
        formats.write_star(out_dir / "vesicles_relion4.star", formats.pixel_star_table(table, name, info.path.name))
        plot_preview(out_dir / "preview.png", volume, table, voxel_nm, f"{dataset}/{name}")
        for job in pending:
            job.result()
    write_table(out_dir / "vesicles.csv", table)
    write_json(out_dir / "tomogram.json", {
        "dataset": dataset, "tomogram": name, "source": str(info.path), "shape_zyx": list(info.shape),
        "voxel_size_angstrom": info.voxel_size_angstrom, "mask": str(mask) if mask else None,
        "analysed_volume_um3": analysed_volume_um3(mask, info.shape, voxel_nm),
        "n_vesicles": len(table), "n_rejected": int((spheres["outlier_reason"] != "").sum()),
        "curated": str(curated) if curated else None,
        "n_flagged": int((table["flags"] != "").sum()), "mask_distance_subsampling": border_factor,
    })
    log.info("%s/%s: %d vesicles exported to %s", dataset, name, len(table), out_dir)
    return table
