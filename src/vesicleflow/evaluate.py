"""Accuracy against ground truth: one-to-one matching of detected and true vesicles.

A detection matches a true vesicle when their centres are within half the smaller radius; the
pairing that maximises matches (then minimises distance) is found with the Hungarian algorithm.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
from scipy.optimize import linear_sum_assignment

from vesicleflow.io import read_json


def match_vesicles(detected: pd.DataFrame, truth: pd.DataFrame, voxel_nm: float) -> dict:
    """Precision, recall, F1, centre error (nm) and radius error / bias (nm) of ``detected``."""
    det = detected[["z", "y", "x"]].to_numpy(float) * voxel_nm
    tru = truth[["z", "y", "x"]].to_numpy(float) * voxel_nm
    matched_det, matched_tru = np.array([], int), np.array([], int)
    if len(det) and len(tru):
        distance = np.linalg.norm(det[:, None] - tru[None], axis=2)
        limit = 0.5 * np.minimum(detected["radius_nm"].to_numpy()[:, None], truth["radius_nm"].to_numpy()[None])
        cost = np.where(distance <= limit, distance, 1e6)
        rows, cols = linear_sum_assignment(cost)
        ok = cost[rows, cols] < 1e6
        matched_det, matched_tru = rows[ok], cols[ok]
    tp = len(matched_det)
    precision = tp / len(det) if len(det) else 1.0
    recall = tp / len(tru) if len(tru) else 1.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    radius_diff = detected["radius_nm"].to_numpy()[matched_det] - truth["radius_nm"].to_numpy()[matched_tru]
    centre_err = np.linalg.norm(det[matched_det] - tru[matched_tru], axis=1)
    return {
        "n_true": len(tru), "n_detected": len(det), "true_positives": tp,
        "precision": precision, "recall": recall, "f1": f1,
        "centre_error_nm": float(centre_err.mean()) if tp else float("nan"),
        "radius_abs_error_nm": float(np.abs(radius_diff).mean()) if tp else float("nan"),
        "radius_bias_nm": float(radius_diff.mean()) if tp else float("nan"),
        "false_positives": len(det) - tp,
    }


def evaluate_results(results_dir: str | Path, truth_dir: str | Path) -> pd.DataFrame:
    """Score every ``<results>/<dataset>/<tomo>/vesicles.csv`` that has ``<truth>/<dataset>/<tomo>_vesicles.csv``."""
    rows = []
    for truth_csv in sorted(Path(truth_dir).glob("*/*_vesicles.csv")):
        dataset, name = truth_csv.parent.name, truth_csv.name.removesuffix("_vesicles.csv")
        result_dir = Path(results_dir) / dataset / name
        if not (result_dir / "vesicles.csv").is_file():
            continue
        voxel_nm = read_json(result_dir / "tomogram.json")["voxel_size_angstrom"] / 10.0
        scores = match_vesicles(pd.read_csv(result_dir / "vesicles.csv"), pd.read_csv(truth_csv), voxel_nm)
        rows.append({"dataset": dataset, "tomogram": name, **scores})
    return pd.DataFrame(rows)
