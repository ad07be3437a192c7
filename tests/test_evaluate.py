"""Matching detections to ground truth, and pooling scores per case."""

from __future__ import annotations

import json

import mrcfile
import numpy as np
import pandas as pd
import pytest

from vesicleflow.accuracy import (
    CASES,
    SHIFTED_CASES,
    SHIFTED_SEED,
    SUITE_SEED,
    summarize_by_dataset,
    write_accuracy_suite,
)
from vesicleflow.evaluate import match_vesicles


def _table(rows):
    return pd.DataFrame(rows, columns=["x", "y", "z", "radius_nm"])


def test_matching_is_one_to_one_within_half_the_smaller_radius():
    truth = _table([(10, 10, 10, 20), (60, 10, 10, 20), (110, 10, 10, 20)])
    detected = _table([
        (11, 10, 10, 21),    # matches the first (1 voxel = 2 nm off)
        (10.5, 10, 10, 20),  # a duplicate of the first: a false positive, not a second match
        (60, 16, 10, 20),    # 6 voxels = 12 nm off: beyond 10 nm, no match
    ])
    scores = match_vesicles(detected, truth, voxel_nm=2.0)
    assert scores["true_positives"] == 1
    assert scores["precision"] == pytest.approx(1 / 3)
    assert scores["recall"] == pytest.approx(1 / 3)
    assert scores["false_positives"] == 2
    assert scores["radius_bias_nm"] == pytest.approx(0.0)  # the closer duplicate wins the match
    assert scores["centre_error_nm"] == pytest.approx(1.0)


def test_empty_truth_and_empty_detection():
    empty = _table([])
    scores = match_vesicles(empty, empty, voxel_nm=1.0)
    assert scores["f1"] == 1.0 and scores["false_positives"] == 0
    scores = match_vesicles(_table([(1, 1, 1, 20)]), empty, voxel_nm=1.0)
    assert scores["precision"] == 0.0 and scores["false_positives"] == 1


def test_pooling_weights_tomograms_by_their_vesicles():
    scores = pd.DataFrame([
        {"dataset": "a", "n_true": 10, "n_detected": 10, "true_positives": 9, "false_positives": 1,
         "centre_error_nm": 1.0, "radius_abs_error_nm": 0.5, "radius_bias_nm": 0.1},
        {"dataset": "a", "n_true": 30, "n_detected": 28, "true_positives": 27, "false_positives": 1,
         "centre_error_nm": 2.0, "radius_abs_error_nm": 0.5, "radius_bias_nm": 0.1},
    ])
    pooled = summarize_by_dataset(scores).iloc[0]
    assert pooled["recall"] == pytest.approx(36 / 40)
    assert pooled["precision"] == pytest.approx(36 / 38)
    assert pooled["centre_error_nm"] == pytest.approx((9 * 1.0 + 27 * 2.0) / 36)
    assert pooled["false_positives_per_tomogram"] == 1.0


def test_accuracy_suite_cases_cover_the_same_volume_with_held_out_seeds(tmp_path):
    write_accuracy_suite(tmp_path, tomograms_per_case=1, shape=(32, 112, 112))
    assert {p.name for p in (tmp_path / "tomograms").iterdir()} == set(CASES)
    extents = []
    for case, (voxel_nm, _) in CASES.items():
        params = json.loads((tmp_path / "truth" / case / "tomo_01_params.json").read_text())
        assert params["seed"] >= SUITE_SEED and params["voxel_size_nm"] == voxel_nm
        with mrcfile.open(tmp_path / "tomograms" / case / "tomo_01.mrc") as mrc:
            extents.append(np.array(mrc.data.shape) * voxel_nm)
        truth = pd.read_csv(tmp_path / "truth" / case / "tomo_01_vesicles.csv")
        assert truth.empty == (case == "empty")
    assert np.ptp(extents, axis=0).max() <= 1.6  # the fine case has more voxels, not a thinner slab


def test_shifted_suite_applies_its_conditions_with_held_out_seeds(tmp_path):
    write_accuracy_suite(tmp_path, tomograms_per_case=1, shape=(24, 80, 80), shifted=True)
    assert {p.name for p in (tmp_path / "tomograms").iterdir()} == set(SHIFTED_CASES)
    for case, (_, overrides) in SHIFTED_CASES.items():
        params = json.loads((tmp_path / "truth" / case / "tomo_01_params.json").read_text())
        assert params["seed"] >= SHIFTED_SEED > SUITE_SEED
        for key, value in overrides.items():
            recorded = params[key]
            assert (max(recorded) if isinstance(recorded, list) else recorded) == value, (case, key)
