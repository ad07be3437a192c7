"""End to end: the real Snakemake workflow on simulated tomograms of different sizes and voxel sizes."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import mrcfile
import numpy as np
import pandas as pd
import pytest
from conftest import REPO, planned_jobs

from vesicleflow.evaluate import evaluate_results
from vesicleflow.export import VESICLE_COLUMNS
from vesicleflow.simulate import simulate_tomogram, write_simulation

pytestmark = pytest.mark.slow

TOMOGRAMS = {  # dataset, name: (shape, voxel size nm, seed)
    ("fine", "cell 1"): ((64, 176, 176), 1.6, 11),
    ("coarse", "tomo_b"): ((48, 128, 144), 2.2, 12),
}


def run_snakemake(*args: str, cwd: Path = REPO) -> subprocess.CompletedProcess:
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    return subprocess.run([sys.executable, "-m", "snakemake", *args], cwd=cwd, env=env, text=True,
                          capture_output=True, timeout=1200)


@pytest.fixture(scope="module")
def completed_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("e2e")
    for (dataset, name), (shape, voxel_nm, seed) in TOMOGRAMS.items():
        sim = simulate_tomogram(seed, shape, voxel_nm)
        write_simulation(sim, root / "tomograms" / dataset, root / "truth" / dataset, name)
    inputs_before = sorted(p.name for p in (root / "tomograms").rglob("*"))
    config = [f"input_dir={root / 'tomograms'}", f"output_dir={root / 'results'}"]
    result = run_snakemake("--profile", "profiles/local", "--cores", "2", "--config", *config)
    assert result.returncode == 0, result.stderr[-4000:]
    assert sorted(p.name for p in (root / "tomograms").rglob("*")) == inputs_before
    return root, config


def test_every_tomogram_has_a_vesicle_table_following_the_contract(completed_run):
    root, _ = completed_run
    for (dataset, name), (shape, voxel_nm, _) in TOMOGRAMS.items():
        table = pd.read_csv(root / "results" / dataset / name / "vesicles.csv")
        assert list(table.columns) == VESICLE_COLUMNS
        assert len(table) > 3
        assert (table["dataset"] == dataset).all() and (table["tomogram"] == name).all()
        for axis, size in zip("zyx", shape):
            assert table[axis].between(-0.5, size - 0.5).all()
        np.testing.assert_allclose(table["x_nm"], table["x"] * voxel_nm, rtol=1e-3)
        assert table["radius_nm"].between(8, 60).all()
        with mrcfile.open(root / "results" / dataset / name / "labels.mrc") as mrc:
            assert mrc.data.shape == shape
            assert float(mrc.voxel_size.x) == pytest.approx(voxel_nm * 10, rel=1e-4)
            assert set(np.unique(mrc.data)) - {0} == set(table["vesicle_id"])


def test_vesicles_are_found(completed_run):
    root, _ = completed_run
    scores = evaluate_results(root / "results", root / "truth")
    assert len(scores) == len(TOMOGRAMS)
    assert (scores["f1"] >= 0.8).all(), scores.to_string()


def test_summary_counts_every_tomogram(completed_run):
    root, _ = completed_run
    per_tomogram = pd.read_csv(root / "results" / "summary" / "per_tomogram.csv")
    assert len(per_tomogram) == len(TOMOGRAMS)
    all_vesicles = pd.read_csv(root / "results" / "summary" / "vesicles.csv")
    assert per_tomogram["n_vesicles"].sum() == len(all_vesicles)
    assert (per_tomogram["vesicles_per_um3"] > 0).all()
    assert (root / "results" / "summary" / "radius_distribution.png").stat().st_size > 1000


def test_changing_a_postprocess_parameter_reruns_only_downstream_stages(completed_run):
    root, config = completed_run
    changed = root / "changed.yaml"
    changed.write_text("postprocess: {threshold: 0.6, min_radius_nm: 8.0, max_radius_nm: 60.0, "
                       "min_separation_nm: null}\n")
    result = run_snakemake("--profile", "profiles/local", "--dry-run", "--configfile", "config/config.yaml",
                           str(changed), "--config", *config)
    assert result.returncode == 0, result.stderr[-3000:]
    jobs = planned_jobs(result.stdout + result.stderr)
    n = len(TOMOGRAMS)
    assert jobs == {"postprocess": n, "spherefit": n, "export": n, "aggregate": 1}, jobs


def test_changing_the_precision_reruns_inference_but_not_normalization(completed_run):
    root, config = completed_run
    result = run_snakemake("--profile", "profiles/local", "--dry-run", "--config", *config,
                           "inference={precision: bfloat16}")
    assert result.returncode == 0, result.stderr[-3000:]
    jobs = planned_jobs(result.stdout + result.stderr)
    n = len(TOMOGRAMS)
    assert jobs == {"infer": n, "stitch": n, "postprocess": n, "spherefit": n, "export": n, "aggregate": 1}, jobs


@pytest.mark.parametrize(("setting", "message"), [
    ("postprocess: {treshold: 0.6}", "('treshold' was unexpected)"),
    ("inference: {shards: two}", "'two' is not of type 'integer'"),
    ("postprocess: {threshold: 1.5}", "1.5 is greater than or equal to the maximum of 1"),
])
def test_a_wrong_config_key_is_named(tmp_path, setting, message):
    wrong = tmp_path / "wrong.yaml"
    wrong.write_text(setting + "\n")
    result = run_snakemake("--dry-run", "--configfile", "config/config.yaml", str(wrong),
                           "--config", f"input_dir={tmp_path}", f"output_dir={tmp_path / 'out'}")
    output = result.stdout + result.stderr  # Snakemake prints workflow errors on stdout
    assert result.returncode != 0
    assert "Error validating config file" in output
    assert message in output
