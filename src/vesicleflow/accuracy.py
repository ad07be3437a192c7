"""The held-out accuracy suite: simulated cases that stress what real data varies in.

Seeds here start at :data:`SUITE_SEED` and are never used for training (the bundled model's
training tomograms have seeds below 9,000,000 or hashed from tree seeds below 1,000,000), so the
suite measures generalisation, not memory.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from vesicleflow.simulate import simulate_tomogram, write_simulation

SUITE_SEED = 9_000_000
#: The suite's ``shape`` is given in voxels of this size (nm).
REFERENCE_VOXEL_NM = 1.6

#: case -> (voxel size nm, simulator overrides)
CASES: dict[str, tuple[float, dict]] = {
    "standard": (1.6, {}),
    "crowded": (1.6, {"vesicle_density": 9000.0, "n_clusters": 1, "cluster_sd_nm": 70.0,
                      "clustered_fraction": 1.0}),
    "low_snr": (1.6, {"snr": 0.04}),
    "fine": (1.2, {}),
    "empty": (1.6, {"n_vesicles": 0}),
}


#: Conditions outside what the simulator's defaults (and so the training data) span, to see how the
#: model holds up when the data differ: a stand-in for another simulator or microscope. Not tuned on.
SHIFTED_SEED = 9_500_000
SHIFTED_CASES: dict[str, tuple[float, dict]] = {
    "defocus_7um": (1.6, {"defocus_um": -7.0}),
    "defocus_2um": (1.6, {"defocus_um": -2.0}),
    "thin_small": (1.6, {"membrane_thickness_nm": 3.8, "radius_mean_nm": 17.0, "bfactor_nm2": 6.0}),
    "wedge_45deg": (1.6, {"tilt_range_deg": 45}),
    "clean": (1.6, {"snr": 1.0}),
}


def write_accuracy_suite(out_dir: str | Path, tomograms_per_case: int = 5,
                         shape: tuple[int, int, int] = (64, 256, 256), shifted: bool = False) -> Path:
    """Write ``out_dir/tomograms/<case>/`` and ``out_dir/truth/<case>/`` for every case
    (of :data:`SHIFTED_CASES` with ``shifted``, else of :data:`CASES`).

    ``shape`` is in voxels of :data:`REFERENCE_VOXEL_NM`; every case covers the same physical
    volume, so a finer voxel size means more voxels, not a thinner slab of cytoplasm.
    """
    out_dir = Path(out_dir)
    cases, first_seed = (SHIFTED_CASES, SHIFTED_SEED) if shifted else (CASES, SUITE_SEED)
    for case_index, (case, (voxel_nm, overrides)) in enumerate(cases.items()):
        case_shape = tuple(round(n * REFERENCE_VOXEL_NM / voxel_nm) for n in shape)
        for t in range(tomograms_per_case):
            seed = first_seed + 1000 * case_index + t
            sim = simulate_tomogram(seed, shape=case_shape, voxel_size_nm=voxel_nm, **overrides)
            write_simulation(sim, out_dir / "tomograms" / case, out_dir / "truth" / case, f"tomo_{t + 1:02d}")
    return out_dir


def summarize_by_dataset(scores: pd.DataFrame) -> pd.DataFrame:
    """Pool per-tomogram matches into one row per dataset (case)."""
    rows = []
    for dataset, group in scores.groupby("dataset", sort=False):
        tp, n_true, n_det = group["true_positives"].sum(), group["n_true"].sum(), group["n_detected"].sum()
        precision = tp / n_det if n_det else 1.0
        recall = tp / n_true if n_true else 1.0
        rows.append({
            "case": dataset, "tomograms": len(group), "n_true": int(n_true), "n_detected": int(n_det),
            "precision": precision, "recall": recall,
            "f1": 2 * precision * recall / (precision + recall) if precision + recall else 0.0,
            "centre_error_nm": _pooled(group, "centre_error_nm"),
            "radius_abs_error_nm": _pooled(group, "radius_abs_error_nm"),
            "radius_bias_nm": _pooled(group, "radius_bias_nm"),
            "false_positives_per_tomogram": group["false_positives"].mean(),
        })
    return pd.DataFrame(rows)


def _pooled(group: pd.DataFrame, column: str) -> float:
    """Mean of a per-tomogram error weighted by each tomogram's matched vesicles."""
    weights = group["true_positives"].to_numpy()
    ok = weights > 0
    return float(np.average(group[column].to_numpy()[ok], weights=weights[ok])) if ok.any() else float("nan")
