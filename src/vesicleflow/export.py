"""export: the user-facing results of one tomogram, on its original grid.

- ``vesicles.csv``: accepted vesicles (columns documented in README.md)
- ``labels.mrc``: instance labels (value = vesicle_id) with the input's voxel size and origin
- ``tomogram.json``: what aggregate needs (analysed volume, voxel size, counts)
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pandas as pd
from scipy.spatial import cKDTree

from vesicleflow.grid import GridMapping, nearest_source_indices
from vesicleflow.io import atomic_output, read_tomogram, read_tomogram_info, write_json, write_table
from vesicleflow.volumes import open_volume

log = logging.getLogger(__name__)

VESICLE_COLUMNS = [
    "dataset", "tomogram", "vesicle_id", "x", "y", "z", "radius_nm",
    "x_nm", "y_nm", "z_nm", "membrane_thickness_nm", "membrane_contrast", "fit_score",
    "nn_distance_nm",
]


def nearest_neighbour_distances(centres_nm: np.ndarray) -> np.ndarray:
    """Centre-to-centre distance to the nearest other vesicle (NaN when alone)."""
    if len(centres_nm) < 2:
        return np.full(len(centres_nm), np.nan)
    distances, _ = cKDTree(centres_nm).query(centres_nm, k=2)
    return distances[:, 1]


def vesicle_table(spheres: pd.DataFrame, dataset: str, tomogram: str, voxel_nm: float) -> pd.DataFrame:
    """Accepted spheres -> the vesicles.csv contract, numbered 1..N in a stable order."""
    accepted = spheres[spheres["outlier_reason"].fillna("") == ""]
    accepted = accepted.sort_values(["z", "y", "x"], kind="stable").reset_index(drop=True)
    table = pd.DataFrame({
        "dataset": dataset,
        "tomogram": tomogram,
        "vesicle_id": np.arange(1, len(accepted) + 1),
        "x": accepted["x"], "y": accepted["y"], "z": accepted["z"],
        "radius_nm": accepted["radius_nm"],
        "x_nm": accepted["x"] * voxel_nm, "y_nm": accepted["y"] * voxel_nm, "z_nm": accepted["z"] * voxel_nm,
        "membrane_thickness_nm": accepted["membrane_thickness_nm"],
        "membrane_contrast": accepted["membrane_contrast"],
        "fit_score": accepted["fit_score"],
    })
    table["nn_distance_nm"] = nearest_neighbour_distances(table[["z_nm", "y_nm", "x_nm"]].to_numpy())
    table.attrs["source_labels"] = accepted["label"].to_numpy(dtype=np.int64)
    return table[VESICLE_COLUMNS]


def write_label_mrc(path: str | Path, model_labels, mapping: GridMapping, label_to_id: np.ndarray) -> None:
    """Resample model-grid labels to the original grid (nearest), renumbered to vesicle ids."""
    import mrcfile

    dtype = np.uint16 if label_to_id.max(initial=0) < 2**16 else np.float32
    iz, iy, ix = nearest_source_indices(mapping.original_shape, mapping.model_shape, mapping.original_to_model)
    mode = 6 if dtype == np.uint16 else 2
    with atomic_output(path) as tmp, mrcfile.new_mmap(tmp, shape=mapping.original_shape, mrc_mode=mode,
                                                       overwrite=True) as mrc:
        for z, source_z in enumerate(iz):
            plane = np.asarray(model_labels[int(source_z)])
            mrc.data[z] = label_to_id[plane[np.ix_(iy, ix)]]
        mrc.voxel_size = mapping.original_voxel_size_angstrom
        mrc.header.origin.z, mrc.header.origin.y, mrc.header.origin.x = mapping.origin_angstrom


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
                    voxel_size_angstrom: float | None = None, mask: str | Path | None = None) -> pd.DataFrame:
    out_dir = Path(out_dir)
    info = read_tomogram_info(tomogram, voxel_size_angstrom)
    spheres = pd.read_csv(spheres_csv, keep_default_na=False, na_values=[""])
    spheres["outlier_reason"] = spheres["outlier_reason"].fillna("")
    table = vesicle_table(spheres, dataset, name, info.voxel_size_nm)
    labels_zarr = open_volume(labels_path)
    mapping = GridMapping.from_attrs(dict(labels_zarr.attrs)["grid"])
    label_to_id = np.zeros(int(labels_zarr.attrs.get("count", 0)) + 1, np.uint32)
    label_to_id[table.attrs["source_labels"]] = table["vesicle_id"].to_numpy()
    write_label_mrc(out_dir / "labels.mrc", labels_zarr, mapping, label_to_id)
    write_table(out_dir / "vesicles.csv", table)
    write_json(out_dir / "tomogram.json", {
        "dataset": dataset, "tomogram": name, "source": str(info.path), "shape_zyx": list(info.shape),
        "voxel_size_angstrom": info.voxel_size_angstrom, "mask": str(mask) if mask else None,
        "analysed_volume_um3": analysed_volume_um3(mask, info.shape, info.voxel_size_nm),
        "n_vesicles": len(table), "n_rejected": int((spheres["outlier_reason"] != "").sum()),
    })
    log.info("%s/%s: %d vesicles exported to %s", dataset, name, len(table), out_dir)
    return table
