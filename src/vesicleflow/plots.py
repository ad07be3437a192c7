"""Figures: per-tomogram orthogonal-slice previews and the cross-dataset summary plots.

matplotlib is imported inside each function (Agg backend), so importing this module is cheap.
Every figure is written atomically as PNG.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd

from vesicleflow.io import atomic_output

#: The longest side, in pixels, of a slice shown in a preview (larger tomograms are subsampled).
PREVIEW_MAX_PIXELS = 512
#: Slices are averaged over this thickness (nm) for contrast, like a thin-section view.
PREVIEW_SLAB_NM = 3.0


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: str | Path) -> None:
    plt = _pyplot()
    with atomic_output(path) as tmp:
        # zlib level 1: the same pixels; the benchmark's preview 0.08 s faster than at 6 (and a third smaller)
        fig.savefig(tmp, format="png", bbox_inches="tight", pil_kwargs={"compress_level": 1})
    plt.close(fig)


def _contrast(image: np.ndarray) -> tuple[float, float]:
    finite = image[np.isfinite(image)]
    if finite.size == 0:
        return 0.0, 1.0
    low, high = np.percentile(finite, [1, 99])
    return float(low), float(high if high > low else low + 1)


def orthogonal_slices(volume, centre_zyx, half_thickness: int, max_pixels: int = PREVIEW_MAX_PIXELS):
    """The xy, xz and yz slices through ``centre_zyx`` of a (memory-mapped) volume.

    Each is the mean over ``2 * half_thickness + 1`` planes and subsampled by an integer stride per
    axis so that no side exceeds ``max_pixels``; only the planes/rows needed are read. Returns
    ``({"xy": img[y, x], "xz": img[z, x], "yz": img[z, y]}, (stride_z, stride_y, stride_x))``.
    """
    nz, ny, nx = volume.shape
    sz, sy, sx = (max(1, math.ceil(n / max_pixels)) for n in (nz, ny, nx))
    cz, cy, cx = (int(np.clip(round(c), 0, n - 1)) for c, n in zip(centre_zyx, (nz, ny, nx)))

    def around(c, n):
        return slice(max(c - half_thickness, 0), min(c + half_thickness + 1, n))

    xy = np.mean([np.asarray(volume[z, ::sy, ::sx], np.float32) for z in range(*around(cz, nz).indices(nz))], axis=0)
    xz = np.asarray(volume[::sz, around(cy, ny), ::sx], np.float32).mean(axis=1)
    yz = np.asarray(volume[::sz, ::sy, around(cx, nx)], np.float32).mean(axis=2)
    return {"xy": xy, "xz": xz, "yz": yz}, (sz, sy, sx)


def sphere_sections(centres: np.ndarray, radii: np.ndarray, axis: int, position: float) -> tuple[np.ndarray, ...]:
    """Circles where spheres cut the plane ``coordinate[axis] == position`` (all in voxels).

    Returns the indices of the cut spheres and their circle radii.
    """
    offset = centres[:, axis] - position
    cut = np.abs(offset) < radii
    return np.flatnonzero(cut), np.sqrt(radii[cut] ** 2 - offset[cut] ** 2)


def plot_preview(path: str | Path, volume, table: pd.DataFrame, voxel_nm: float, title: str) -> None:
    """Orthogonal slices (xy, xz, yz) with the fitted spheres drawn where they cut each slice.

    Slices go through the median vesicle centre (the tomogram centre when there is none), so most
    circles show; axes are in nm.
    """
    plt = _pyplot()
    from matplotlib.collections import PatchCollection
    from matplotlib.patches import Circle

    nz, ny, nx = volume.shape
    centres = table[["z", "y", "x"]].to_numpy(dtype=np.float64).reshape(-1, 3)
    radii = table["radius_nm"].to_numpy(dtype=np.float64) / voxel_nm
    at = np.median(centres, axis=0) if len(centres) else (np.array([nz, ny, nx]) - 1) / 2
    at = np.clip(np.round(at), 0, np.array([nz, ny, nx]) - 1)
    half = max(0, int(round(PREVIEW_SLAB_NM / voxel_nm / 2)))
    slices, strides = orthogonal_slices(volume, at, half)
    width, height, depth = nx * voxel_nm, ny * voxel_nm, nz * voxel_nm
    # xy on top-left, xz below it, yz to its right, sharing axes like IMOD's XYZ window.
    fig = plt.figure(figsize=(7.5, 7.5 * (height + depth) / (width + depth) + 0.6), dpi=110)
    grid = fig.add_gridspec(2, 2, width_ratios=[width, depth], height_ratios=[height, depth],
                            wspace=0.04, hspace=0.04)
    panels = {"xy": fig.add_subplot(grid[0, 0]), "yz": fig.add_subplot(grid[0, 1]),
              "xz": fig.add_subplot(grid[1, 0])}
    # (horizontal axis, vertical axis, plane axis, transpose); axes numbered z=0, y=1, x=2
    layout = {"xy": (2, 1, 0, False), "xz": (2, 0, 1, False), "yz": (0, 1, 2, True)}
    sizes_nm = (depth, height, width)
    for key, ax in panels.items():
        h_axis, v_axis, plane_axis, transpose = layout[key]
        image = slices[key].T if transpose else slices[key]
        low, high = _contrast(image)
        # sample k of a strided axis is voxel k * stride: its pixel spans (k -/+ 0.5) * stride voxels
        extent = [edge * strides[axis] * voxel_nm for axis, m in ((h_axis, image.shape[1]), (v_axis, image.shape[0]))
                  for edge in (-0.5, m - 0.5)]
        ax.imshow(image, cmap="gray", vmin=low, vmax=high, origin="lower", interpolation="nearest",
                  extent=extent, aspect="equal")
        index, circle_radii = sphere_sections(centres, radii, plane_axis, at[plane_axis])
        circles = [Circle((centres[i, h_axis] * voxel_nm, centres[i, v_axis] * voxel_nm), r * voxel_nm)
                   for i, r in zip(index, circle_radii)]
        ax.add_collection(PatchCollection(circles, facecolor="none", edgecolor="#ffd400", linewidth=0.8))
        ax.set_xlim(-0.5 * voxel_nm, sizes_nm[h_axis] - 0.5 * voxel_nm)
        ax.set_ylim(-0.5 * voxel_nm, sizes_nm[v_axis] - 0.5 * voxel_nm)
        plane_name = "zyx"[plane_axis]
        ax.set_title(f"{key} at {plane_name} = {int(at[plane_axis])}", fontsize=8)
        ax.tick_params(labelsize=7)
    panels["xy"].set_ylabel("y (nm)", fontsize=8)
    panels["xz"].set_xlabel("x (nm)", fontsize=8)
    panels["xz"].set_ylabel("z (nm)", fontsize=8)
    panels["yz"].set_xlabel("z (nm)", fontsize=8)
    panels["yz"].yaxis.tick_right()
    panels["xy"].tick_params(labelbottom=False)
    # the figure's title sits on the xy panel: a suptitle would float above the equal-aspect panels
    panels["xy"].set_title(f"{title}: {len(table)} vesicles, voxel {voxel_nm * 10:.2f} Å\n"
                           f"xy at z = {int(at[0])}", fontsize=9)
    _save(fig, path)


# ----------------------------------------------------------------------------- summary plots

def _no_data(ax, text: str = "no vesicles") -> None:
    ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes, color="0.4")


def _bins(values: list[np.ndarray], width: float, minimum_top: float) -> np.ndarray:
    """Bins of ``width`` from 0 (or below, for negative values) to past the largest value."""
    finite = [v[np.isfinite(v)] for v in values]
    top = max([float(v.max()) for v in finite if len(v)] + [minimum_top])
    bottom = min([float(v.min()) for v in finite if len(v)] + [0.0])
    return np.arange(np.floor(bottom / width) * width, top + 2 * width, width)


def plot_histograms(path: str | Path, values: dict[str, np.ndarray], xlabel: str, title: str,
                    bin_width: float, minimum_top: float) -> None:
    """One density histogram per dataset, overlaid as outlines."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    values = {k: v[np.isfinite(v)] for k, v in values.items()}
    bins = _bins(list(values.values()), bin_width, minimum_top)
    drawn = False
    for dataset, v in values.items():
        if len(v):
            ax.hist(v, bins=bins, histtype="step", density=True, linewidth=1.5, label=f"{dataset} (n={len(v)})")
            drawn = True
    ax.set_xlabel(xlabel)
    ax.set_ylabel("density")
    ax.set_title(title)
    if drawn:
        ax.legend(frameon=False, fontsize=8)
    else:
        _no_data(ax)
    fig.tight_layout()
    _save(fig, path)


def plot_histogram_panels(path: str | Path, values: dict[str, np.ndarray], xlabel: str, title: str,
                          bin_width: float, minimum_top: float, columns: int = 4) -> None:
    """One histogram panel per dataset (shared x axis), with median marked."""
    plt = _pyplot()
    names = list(values) or ["(none)"]
    ncols = min(columns, len(names))
    nrows = math.ceil(len(names) / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(3.2 * ncols, 2.4 * nrows + 0.5), dpi=110,
                             sharex=True, squeeze=False)
    finite = {k: v[np.isfinite(v)] for k, v in values.items()}
    bins = _bins(list(finite.values()), bin_width, minimum_top)
    for ax, name in zip(axes.flat, names):
        v = finite.get(name, np.array([]))
        if len(v):
            ax.hist(v, bins=bins, color="#4477aa")
            median = float(np.median(v))
            ax.axvline(median, color="k", linewidth=1)
            ax.set_title(f"{name}: n={len(v)}, median {median:.1f}", fontsize=8)
        else:
            ax.set_title(name, fontsize=8)
            _no_data(ax)
        ax.tick_params(labelsize=7)
    for ax in list(axes.flat)[len(names):]:
        ax.set_visible(False)
    for ax in axes[-1]:
        ax.set_xlabel(xlabel, fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    _save(fig, path)


def plot_density_per_tomogram(path: str | Path, per_tomogram: pd.DataFrame) -> None:
    """Vesicles per µm³ of analysed volume: one dot per tomogram, a box per dataset."""
    plt = _pyplot()
    datasets = sorted(per_tomogram["dataset"].unique()) if len(per_tomogram) else []
    fig, ax = plt.subplots(figsize=(max(4.0, 1.2 * len(datasets) + 2), 4), dpi=120)
    rng = np.random.default_rng(0)
    for i, dataset in enumerate(datasets):
        group = per_tomogram[per_tomogram["dataset"] == dataset]
        density = group["vesicles_per_um3"].to_numpy(dtype=float)
        density = density[np.isfinite(density)]
        if len(density) >= 3:
            ax.boxplot([density], positions=[i], widths=0.5, showfliers=False)
        jitter = rng.uniform(-0.15, 0.15, len(density)) if len(density) > 1 else np.zeros(len(density))
        ax.scatter(i + jitter, density, s=14, alpha=0.7, zorder=3)
    ax.set_xticks(range(len(datasets)), datasets, rotation=30, ha="right", fontsize=8)
    ax.set_xlim(-0.7, max(len(datasets) - 0.3, 0.7))
    ax.set_ylabel("vesicles per µm³ analysed volume")
    ax.set_title("Vesicle density per tomogram")
    if not datasets:
        _no_data(ax, "no tomograms")
    fig.tight_layout()
    _save(fig, path)
