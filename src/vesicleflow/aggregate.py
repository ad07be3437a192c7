"""aggregate: all tomograms' vesicles -> one table, per-tomogram and per-dataset statistics, plots.

Scales to thousands of tomograms: each tomogram's vesicles.csv is read once and streamed into
``summary/vesicles.csv`` and ``summary/vesicles.parquet`` (one Parquet row group per tomogram), so
the full table never has to be in memory. Only the few columns the per-dataset statistics and plots
need (radius, nearest-neighbour and mask distances: 24 bytes per vesicle) are kept.
"""

from __future__ import annotations

import contextlib
import logging
from collections import defaultdict
from pathlib import Path

import numpy as np
import pandas as pd

from vesicleflow.export import VESICLE_COLUMNS
from vesicleflow.io import atomic_output, read_json

log = logging.getLogger(__name__)

#: Distances (nm) from the mask border for the "fraction within" statistics.
BORDER_DISTANCES_NM = (50, 100)
TEXT_COLUMNS = ("dataset", "tomogram", "flags")
INTEGER_COLUMNS = ("vesicle_id",)

PER_TOMOGRAM_COLUMNS = [
    "dataset", "tomogram", "n_vesicles", "analysed_volume_um3", "voxel_size_angstrom",
    "radius_mean_nm", "radius_sd_nm", "radius_median_nm", "nn_distance_median_nm", "vesicles_per_um3",
    "radius_q1_nm", "radius_q3_nm", "radius_iqr_nm",
    "nn_distance_mean_nm", "nn_distance_q1_nm", "nn_distance_q3_nm",
    "has_mask", *[f"fraction_within_{d}nm_of_border" for d in BORDER_DISTANCES_NM],
    "n_rejected", "n_flagged",
]
PER_DATASET_COLUMNS = [
    "dataset", "n_tomograms", "n_vesicles", "analysed_volume_um3",
    "radius_mean_nm", "radius_sd_nm", "radius_median_nm", "nn_distance_median_nm", "vesicles_per_um3",
    "radius_q1_nm", "radius_q3_nm", "radius_iqr_nm",
    "nn_distance_mean_nm", "nn_distance_q1_nm", "nn_distance_q3_nm",
    "vesicles_per_um3_tomogram_mean", "vesicles_per_um3_tomogram_sd",
    "n_tomograms_with_mask", *[f"fraction_within_{d}nm_of_border" for d in BORDER_DISTANCES_NM],
]
#: Summary figures, file name -> what it shows (the rule's outputs and report captions use these names).
PLOTS = {
    "radius_distribution.png": "radius histogram per dataset, overlaid",
    "radius_distribution_per_dataset.png": "radius histogram, one panel per dataset",
    "nn_distance_distribution.png": "nearest-neighbour distance histogram per dataset",
    "density_per_tomogram.png": "vesicles per µm³ per tomogram, grouped by dataset",
    "border_distance_distribution.png": "distance from the mask border per dataset",
}


def read_vesicles(path: str | Path) -> pd.DataFrame:
    """One vesicles.csv with fixed dtypes; columns missing from older results are added as NaN."""
    numeric = {c: "int64" if c in INTEGER_COLUMNS else "float64" for c in VESICLE_COLUMNS if c not in TEXT_COLUMNS}
    table = pd.read_csv(path, dtype={**numeric, **dict.fromkeys(TEXT_COLUMNS, str)}, keep_default_na=False,
                        na_values=dict.fromkeys(numeric, [""]))
    for column in VESICLE_COLUMNS:
        if column not in table:
            table[column] = "" if column in TEXT_COLUMNS else np.nan
    return table[VESICLE_COLUMNS].astype(numeric)


def distribution(values) -> dict[str, float]:
    """mean, sd (n-1), median, quartiles and IQR of the finite values; NaN where undefined."""
    v = np.asarray(values, dtype=np.float64)
    v = v[np.isfinite(v)]
    if len(v) == 0:
        return dict.fromkeys(("mean", "sd", "median", "q1", "q3", "iqr"), np.nan)
    q1, median, q3 = np.percentile(v, [25, 50, 75])
    return {"mean": float(v.mean()), "sd": float(v.std(ddof=1)) if len(v) > 1 else np.nan,
            "median": float(median), "q1": float(q1), "q3": float(q3), "iqr": float(q3 - q1)}


def _fractions_near_border(mask_distance_nm, has_mask: bool) -> dict[str, float]:
    d = np.asarray(mask_distance_nm, dtype=np.float64)
    d = d[np.isfinite(d)]
    return {f"fraction_within_{limit}nm_of_border": float((d <= limit).mean()) if has_mask and len(d) else np.nan
            for limit in BORDER_DISTANCES_NM}


def _statistics(radius, nn) -> dict[str, float]:
    r, n = distribution(radius), distribution(nn)
    return {"radius_mean_nm": r["mean"], "radius_sd_nm": r["sd"], "radius_median_nm": r["median"],
            "nn_distance_median_nm": n["median"], "radius_q1_nm": r["q1"], "radius_q3_nm": r["q3"],
            "radius_iqr_nm": r["iqr"], "nn_distance_mean_nm": n["mean"], "nn_distance_q1_nm": n["q1"],
            "nn_distance_q3_nm": n["q3"]}


def tomogram_statistics(vesicles: pd.DataFrame, info: dict) -> dict:
    """One per_tomogram.csv row from a tomogram's vesicles and its tomogram.json."""
    has_mask = bool(info.get("mask"))
    row = {"dataset": info["dataset"], "tomogram": info["tomogram"], "n_vesicles": len(vesicles),
           "analysed_volume_um3": info["analysed_volume_um3"], "voxel_size_angstrom": info["voxel_size_angstrom"],
           "vesicles_per_um3": len(vesicles) / info["analysed_volume_um3"] if info["analysed_volume_um3"] else np.nan,
           "has_mask": has_mask, "n_rejected": info.get("n_rejected", 0),
           "n_flagged": int((vesicles["flags"].fillna("") != "").sum())}
    row.update(_statistics(vesicles["radius_nm"], vesicles["nn_distance_nm"]))
    row.update(_fractions_near_border(vesicles["mask_distance_nm"], has_mask))
    return row


def dataset_statistics(per_tomogram: pd.DataFrame, pooled: dict[str, dict[str, list]]) -> pd.DataFrame:
    """per_dataset.csv: totals over tomograms, distributions over all the dataset's vesicles."""
    rows = []
    for dataset, group in per_tomogram.groupby("dataset", sort=True):
        values = {k: np.concatenate(v) if v else np.zeros(0) for k, v in pooled[dataset].items()}
        volume = float(group["analysed_volume_um3"].sum())
        density = group["vesicles_per_um3"].to_numpy(dtype=np.float64)
        row = {"dataset": dataset, "n_tomograms": len(group), "n_vesicles": int(group["n_vesicles"].sum()),
               "analysed_volume_um3": volume,
               "vesicles_per_um3": float(group["n_vesicles"].sum()) / volume if volume else np.nan,
               "vesicles_per_um3_tomogram_mean": float(np.nanmean(density)) if np.isfinite(density).any() else np.nan,
               "vesicles_per_um3_tomogram_sd": float(np.nanstd(density, ddof=1)) if np.isfinite(density).sum() > 1
               else np.nan,
               "n_tomograms_with_mask": int(group["has_mask"].sum())}
        row.update(_statistics(values.get("radius_nm", []), values.get("nn_distance_nm", [])))
        row.update(_fractions_near_border(values.get("mask_distance_nm", []), row["n_tomograms_with_mask"] > 0))
        rows.append(row)
    return pd.DataFrame(rows, columns=PER_DATASET_COLUMNS)


def arrow_schema():
    import pyarrow as pa

    return pa.schema([(c, pa.string() if c in TEXT_COLUMNS else pa.int64() if c in INTEGER_COLUMNS
                       else pa.float64()) for c in VESICLE_COLUMNS])


def read_vesicles_arrow(path: Path):
    """(arrow table with the summary schema, the file's data lines as text or None).

    The fast path (pyarrow's CSV reader, data lines copied verbatim into the summary CSV) applies
    when the header is exactly ``VESICLE_COLUMNS``; older tables go through :func:`read_vesicles`.
    """
    import pyarrow as pa
    import pyarrow.csv as pacsv

    schema = arrow_schema()
    text = Path(path).read_text()
    header, _, body = text.partition("\n")
    if header.strip().split(",") != VESICLE_COLUMNS:
        return pa.Table.from_pandas(read_vesicles(path), schema=schema, preserve_index=False), None
    table = pacsv.read_csv(pa.py_buffer(text.encode()), convert_options=pacsv.ConvertOptions(
        column_types=schema, strings_can_be_null=False, quoted_strings_can_be_null=False))
    return table.select(VESICLE_COLUMNS).cast(schema), body


@contextlib.contextmanager
def summary_writer(csv_path: Path, parquet_path: Path):
    """Yield ``add(arrow_table, csv_lines)``, which streams tomogram tables into one CSV and one
    Parquet file (a row group per tomogram); both appear, atomically, only when the block completes."""
    import pyarrow.parquet as pq

    schema = arrow_schema()
    with contextlib.ExitStack() as stack:
        csv_tmp = stack.enter_context(atomic_output(csv_path))
        parquet_tmp = stack.enter_context(atomic_output(parquet_path))
        csv = stack.enter_context(open(csv_tmp, "w", newline=""))
        parquet = stack.enter_context(pq.ParquetWriter(parquet_tmp, schema))
        csv.write(",".join(VESICLE_COLUMNS) + "\n")

        def add(table, csv_lines: str | None) -> None:
            if table.num_rows == 0:
                return
            if csv_lines is None:
                table.to_pandas().to_csv(csv, header=False, index=False, float_format="%.4f")
            else:
                csv.write(csv_lines if csv_lines.endswith("\n") else csv_lines + "\n")
            parquet.write_table(table)

        yield add


def aggregate_results(tomogram_dirs: list[str | Path], out_dir: str | Path,
                      make_plots: bool = True) -> dict[str, pd.DataFrame]:
    """Read each tomogram's vesicles.csv and tomogram.json; write summary tables and (``PLOTS``) plots."""
    out_dir = Path(out_dir)
    rows = []
    pooled: dict[str, dict[str, list]] = defaultdict(lambda: defaultdict(list))
    with summary_writer(out_dir / "vesicles.csv", out_dir / "vesicles.parquet") as add:
        for directory in map(Path, tomogram_dirs):
            table, lines = read_vesicles_arrow(directory / "vesicles.csv")
            info = read_json(directory / "tomogram.json")
            add(table, lines)
            vesicles = table.select(["radius_nm", "nn_distance_nm", "mask_distance_nm", "flags"]).to_pandas()
            rows.append(tomogram_statistics(vesicles, info))
            for column in ("radius_nm", "nn_distance_nm", "mask_distance_nm"):
                pooled[info["dataset"]][column].append(vesicles[column].to_numpy(dtype=np.float32))
    per_tomogram = pd.DataFrame(rows, columns=PER_TOMOGRAM_COLUMNS).sort_values(["dataset", "tomogram"])
    per_tomogram = per_tomogram.reset_index(drop=True)
    per_dataset = dataset_statistics(per_tomogram, pooled)
    for name, table in (("per_tomogram.csv", per_tomogram), ("per_dataset.csv", per_dataset)):
        with atomic_output(out_dir / name) as tmp:  # %g: volumes in µm³ are small, densities large
            table.to_csv(tmp, index=False, float_format="%.6g")
    if make_plots:
        write_plots(out_dir, pooled, per_tomogram)
    n_vesicles = int(per_tomogram["n_vesicles"].sum())
    log.info("aggregated %d vesicles from %d tomograms", n_vesicles, len(per_tomogram))
    return {"per_tomogram": per_tomogram, "per_dataset": per_dataset}


def write_plots(out_dir: Path, pooled: dict[str, dict[str, list]], per_tomogram: pd.DataFrame) -> None:
    """The summary figures (``PLOTS``) from the pooled per-dataset values and per-tomogram table."""
    from vesicleflow import plots

    def by_dataset(column):
        return {d: np.concatenate(pooled[d][column]) if pooled[d][column] else np.zeros(0)
                for d in sorted(pooled)}

    radius = by_dataset("radius_nm")
    plots.plot_histograms(out_dir / "radius_distribution.png", radius, "vesicle outer radius (nm)",
                          "Vesicle radius per dataset", bin_width=1.0, minimum_top=40.0)
    plots.plot_histogram_panels(out_dir / "radius_distribution_per_dataset.png", radius,
                                "vesicle outer radius (nm)", "Vesicle radius per dataset",
                                bin_width=1.0, minimum_top=40.0)
    plots.plot_histograms(out_dir / "nn_distance_distribution.png", by_dataset("nn_distance_nm"),
                          "centre-to-centre distance to the nearest vesicle (nm)",
                          "Nearest-neighbour distance per dataset", bin_width=2.0, minimum_top=80.0)
    plots.plot_density_per_tomogram(out_dir / "density_per_tomogram.png", per_tomogram)
    with_mask = set(per_tomogram.loc[per_tomogram["has_mask"].astype(bool), "dataset"])
    plots.plot_histograms(out_dir / "border_distance_distribution.png",
                          {d: v for d, v in by_dataset("mask_distance_nm").items() if d in with_mask},
                          "distance from the vesicle's outer surface to the mask border (nm)",
                          "Distance to the mask border per dataset (tomograms with a mask)",
                          bin_width=5.0, minimum_top=200.0)
