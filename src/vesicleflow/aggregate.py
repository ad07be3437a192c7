"""aggregate: all tomograms' vesicles -> one table, per-tomogram and per-dataset statistics, plots."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pandas as pd

from vesicleflow.io import atomic_output, read_json, write_table

log = logging.getLogger(__name__)


def per_tomogram_statistics(vesicles: pd.DataFrame, tomograms: pd.DataFrame) -> pd.DataFrame:
    """One row per tomogram; tomograms without vesicles count as zero."""
    grouped = vesicles.groupby(["dataset", "tomogram"])
    stats = pd.DataFrame({
        "radius_mean_nm": grouped["radius_nm"].mean(),
        "radius_sd_nm": grouped["radius_nm"].std(),
        "radius_median_nm": grouped["radius_nm"].median(),
        "nn_distance_median_nm": grouped["nn_distance_nm"].median(),
    }).reset_index()
    table = tomograms[["dataset", "tomogram", "n_vesicles", "analysed_volume_um3", "voxel_size_angstrom"]]
    table = table.merge(stats, on=["dataset", "tomogram"], how="left")
    table["vesicles_per_um3"] = table["n_vesicles"] / table["analysed_volume_um3"]
    return table.sort_values(["dataset", "tomogram"]).reset_index(drop=True)


def per_dataset_statistics(vesicles: pd.DataFrame, per_tomogram: pd.DataFrame) -> pd.DataFrame:
    grouped = vesicles.groupby("dataset")
    stats = pd.DataFrame({
        "radius_mean_nm": grouped["radius_nm"].mean(),
        "radius_sd_nm": grouped["radius_nm"].std(),
        "radius_median_nm": grouped["radius_nm"].median(),
        "nn_distance_median_nm": grouped["nn_distance_nm"].median(),
    })
    totals = per_tomogram.groupby("dataset").agg(
        n_tomograms=("tomogram", "count"), n_vesicles=("n_vesicles", "sum"),
        analysed_volume_um3=("analysed_volume_um3", "sum"))
    table = totals.join(stats, how="left").reset_index()
    table["vesicles_per_um3"] = table["n_vesicles"] / table["analysed_volume_um3"]
    return table


def plot_radius_distributions(vesicles: pd.DataFrame, path: str | Path) -> None:
    """Radius histogram per dataset, overlaid, normalised to density."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    largest = float(vesicles["radius_nm"].max()) if len(vesicles) else 0.0
    bins = np.arange(0, max(60.0, largest + 2), 1.0)
    for dataset, group in vesicles.groupby("dataset"):
        ax.hist(group["radius_nm"], bins=bins, histtype="step", density=True, linewidth=1.5,
                label=f"{dataset} (n={len(group)})")
    ax.set_xlabel("vesicle outer radius (nm)")
    ax.set_ylabel("density")
    ax.set_title("Vesicle radius per dataset")
    if len(vesicles):
        ax.legend(frameon=False)
    fig.tight_layout()
    with atomic_output(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)


def aggregate_results(tomogram_dirs: list[str | Path], out_dir: str | Path) -> dict[str, pd.DataFrame]:
    """Read each tomogram's vesicles.csv and tomogram.json; write summary tables and plots."""
    out_dir = Path(out_dir)
    tables, infos = [], []
    for directory in map(Path, tomogram_dirs):
        tables.append(pd.read_csv(directory / "vesicles.csv"))
        infos.append(read_json(directory / "tomogram.json"))
    vesicles = pd.concat(tables, ignore_index=True) if tables else pd.DataFrame(columns=["dataset", "tomogram"])
    tomograms = pd.DataFrame(infos)
    per_tomogram = per_tomogram_statistics(vesicles, tomograms)
    per_dataset = per_dataset_statistics(vesicles, per_tomogram)
    write_table(out_dir / "vesicles.csv", vesicles)
    write_table(out_dir / "vesicles.parquet", vesicles)
    write_table(out_dir / "per_tomogram.csv", per_tomogram)
    write_table(out_dir / "per_dataset.csv", per_dataset)
    plot_radius_distributions(vesicles, out_dir / "radius_distribution.png")
    log.info("aggregated %d vesicles from %d tomograms", len(vesicles), len(tomograms))
    return {"vesicles": vesicles, "per_tomogram": per_tomogram, "per_dataset": per_dataset}
