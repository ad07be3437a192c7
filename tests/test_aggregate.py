"""Statistics across tomograms and datasets, on synthetic per-tomogram results."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from vesicleflow.aggregate import (
    PER_DATASET_COLUMNS,
    PER_TOMOGRAM_COLUMNS,
    PLOTS,
    aggregate_results,
    distribution,
    read_vesicles,
)
from vesicleflow.export import CONTRACT_COLUMNS, VESICLE_COLUMNS

# dataset, tomogram: (vesicles, analysed volume µm³, has mask)
TOMOGRAMS = {
    ("wt", "a"): (30, 0.02, True),
    ("wt", "b"): (12, 0.01, True),
    ("wt", "empty"): (0, 0.015, True),
    ("ko", "a"): (25, 0.03, False),
}


def fake_vesicles(dataset, tomogram, n, has_mask, seed):
    rng = np.random.default_rng(seed)
    table = pd.DataFrame({c: np.full(n, np.nan) for c in VESICLE_COLUMNS})
    table["dataset"], table["tomogram"], table["flags"] = dataset, tomogram, ""
    table["vesicle_id"] = np.arange(1, n + 1)
    table["radius_nm"] = rng.normal(20 if dataset == "wt" else 24, 2, n)
    table["nn_distance_nm"] = rng.uniform(40, 90, n)
    if has_mask:
        table["mask_distance_nm"] = rng.uniform(-5, 300, n)
    if n:
        table.loc[0, "flags"] = "edge"
    return table


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("aggregate")
    dirs, tables = [], []
    for seed, ((dataset, tomogram), (n, volume, has_mask)) in enumerate(TOMOGRAMS.items()):
        directory = tmp_path / dataset / tomogram
        directory.mkdir(parents=True)
        table = fake_vesicles(dataset, tomogram, n, has_mask, seed)
        table.to_csv(directory / "vesicles.csv", index=False)
        (directory / "tomogram.json").write_text(json.dumps({
            "dataset": dataset, "tomogram": tomogram, "analysed_volume_um3": volume, "voxel_size_angstrom": 14.0,
            "mask": "m.mrc" if has_mask else None, "n_vesicles": n, "n_rejected": 2}))
        dirs.append(directory)
        tables.append(table)
    summary = tmp_path / "summary"
    aggregate_results(dirs, summary)
    return summary, pd.concat(tables, ignore_index=True)


def test_all_vesicles_are_concatenated_in_csv_and_parquet(results):
    summary, expected = results
    csv = pd.read_csv(summary / "vesicles.csv", keep_default_na=False, na_values={"radius_nm": [""]})
    parquet = pd.read_parquet(summary / "vesicles.parquet")
    assert list(csv.columns) == list(parquet.columns) == VESICLE_COLUMNS
    assert len(csv) == len(parquet) == len(expected) == 67
    np.testing.assert_allclose(parquet["radius_nm"], expected["radius_nm"])
    np.testing.assert_allclose(csv["radius_nm"], expected["radius_nm"], atol=1e-4)
    assert list(parquet["tomogram"]) == list(expected["tomogram"])
    assert (parquet["flags"] == expected["flags"]).all()


def test_per_tomogram_statistics(results):
    summary, vesicles = results
    table = pd.read_csv(summary / "per_tomogram.csv")
    assert list(table.columns) == PER_TOMOGRAM_COLUMNS
    assert len(table) == len(TOMOGRAMS)
    for row in table.itertuples():
        n, volume, has_mask = TOMOGRAMS[(row.dataset, row.tomogram)]
        group = vesicles[(vesicles["dataset"] == row.dataset) & (vesicles["tomogram"] == row.tomogram)]
        assert row.n_vesicles == n and row.vesicles_per_um3 == pytest.approx(n / volume, rel=1e-5)
        assert bool(row.has_mask) == has_mask and row.n_rejected == 2 and row.n_flagged == min(n, 1)
        if n == 0:
            assert np.isnan(row.radius_mean_nm) and np.isnan(row.fraction_within_50nm_of_border)
            continue
        radius = group["radius_nm"]
        assert row.radius_mean_nm == pytest.approx(radius.mean(), rel=1e-5)
        assert row.radius_sd_nm == pytest.approx(radius.std(), rel=1e-5)
        assert row.radius_median_nm == pytest.approx(radius.median(), rel=1e-5)
        assert row.radius_iqr_nm == pytest.approx(radius.quantile(0.75) - radius.quantile(0.25), rel=1e-4)
        assert row.nn_distance_median_nm == pytest.approx(group["nn_distance_nm"].median(), rel=1e-5)
        if has_mask:
            for limit in (50, 100):
                fraction = getattr(row, f"fraction_within_{limit}nm_of_border")
                assert fraction == pytest.approx((group["mask_distance_nm"] <= limit).mean(), rel=1e-5)
        else:
            assert np.isnan(row.fraction_within_100nm_of_border)


def test_per_dataset_statistics_pool_vesicles_and_volumes(results):
    summary, vesicles = results
    table = pd.read_csv(summary / "per_dataset.csv").set_index("dataset")
    assert list(table.reset_index().columns) == PER_DATASET_COLUMNS
    wt = vesicles[vesicles["dataset"] == "wt"]
    row = table.loc["wt"]
    assert row["n_tomograms"] == 3 and row["n_vesicles"] == 42 and row["n_tomograms_with_mask"] == 3
    assert row["vesicles_per_um3"] == pytest.approx(42 / 0.045, rel=1e-5)
    assert row["vesicles_per_um3_tomogram_mean"] == pytest.approx(np.mean([1500, 1200, 0]), rel=1e-5)
    assert row["radius_median_nm"] == pytest.approx(wt["radius_nm"].median(), rel=1e-5)
    assert row["radius_sd_nm"] == pytest.approx(wt["radius_nm"].std(), rel=1e-5)
    assert row["fraction_within_50nm_of_border"] == pytest.approx((wt["mask_distance_nm"] <= 50).mean(), rel=1e-5)
    assert np.isnan(table.loc["ko", "fraction_within_50nm_of_border"])


def test_every_plot_is_written(results):
    summary, _ = results
    for name in PLOTS:
        assert (summary / name).read_bytes()[:4] == b"\x89PNG", name


def test_no_tomograms_gives_empty_valid_tables(tmp_path):
    aggregate_results([], tmp_path)  # with plots: they must cope with no data
    assert list(pd.read_csv(tmp_path / "vesicles.csv").columns) == VESICLE_COLUMNS
    assert len(pd.read_parquet(tmp_path / "vesicles.parquet")) == 0
    assert len(pd.read_csv(tmp_path / "per_dataset.csv")) == 0


def test_older_tables_without_the_new_columns_still_aggregate(tmp_path):
    old = fake_vesicles("d", "t", 3, False, 0)[CONTRACT_COLUMNS]
    old.to_csv(tmp_path / "old.csv", index=False)
    table = read_vesicles(tmp_path / "old.csv")
    assert list(table.columns) == VESICLE_COLUMNS and table["mask_distance_nm"].isna().all()


def test_distribution_handles_empty_and_single_values():
    assert np.isnan(distribution([])["mean"])
    single = distribution([3.0, np.nan])
    assert single["median"] == 3.0 and np.isnan(single["sd"]) and single["iqr"] == 0.0


def test_summary_mixes_current_and_older_tables(tmp_path):
    dirs = []
    for name, columns in (("new", VESICLE_COLUMNS), ("old", CONTRACT_COLUMNS)):
        directory = tmp_path / name
        directory.mkdir()
        fake_vesicles("d", name, 4, False, 1)[columns].to_csv(directory / "vesicles.csv", index=False)
        (directory / "tomogram.json").write_text(json.dumps({
            "dataset": "d", "tomogram": name, "analysed_volume_um3": 0.01, "voxel_size_angstrom": 10.0}))
        dirs.append(directory)
    aggregate_results(dirs, tmp_path / "summary", make_plots=False)
    csv = pd.read_csv(tmp_path / "summary" / "vesicles.csv")
    assert list(csv.columns) == VESICLE_COLUMNS and list(csv["tomogram"]) == ["new"] * 4 + ["old"] * 4
    assert pd.read_parquet(tmp_path / "summary" / "vesicles.parquet")["radius_nm"].notna().sum() == 8
