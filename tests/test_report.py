"""The Snakemake report: a real (tiny) run, then `snakemake --report` as HTML and as ZIP."""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from conftest import REPO

from vesicleflow.aggregate import PLOTS
from vesicleflow.simulate import simulate_tomogram, write_simulation

pytestmark = pytest.mark.slow


def snakemake(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    return subprocess.run([sys.executable, "-m", "snakemake", *args], cwd=REPO, env=env, text=True,
                          capture_output=True, timeout=900)


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("report")
    write_simulation(simulate_tomogram(5, (32, 96, 96), 1.6), root / "tomograms" / "synapse", root / "truth",
                     "tomo 1")
    (root / "export.yaml").write_text("export:\n  probability_mrc: true\n")
    options = ["--configfile", str(root / "export.yaml"),
               "--config", f"input_dir={root / 'tomograms'}", f"output_dir={root / 'results'}"]
    # target the aggregate rule: every summary output and, through its inputs, every export
    result = snakemake("aggregate", "--profile", "profiles/local", "--cores", "2", *options)
    assert result.returncode == 0, result.stderr[-4000:]
    return root, options


def test_every_export_is_produced(finished_run):
    root, _ = finished_run
    folder = root / "results" / "synapse" / "tomo 1"
    for name in ("vesicles.csv", "labels.mrc", "sphere_labels.mrc", "vesicles.mod", "vesicles_relion5.star",
                 "vesicles_relion4.star", "preview.png", "probability.mrc", "tomogram.json"):
        assert (folder / name).is_file(), name
    for name in ("vesicles.csv", "vesicles.parquet", "per_tomogram.csv", "per_dataset.csv", *PLOTS):
        assert (root / "results" / "summary" / name).is_file(), name


def test_html_report_has_captions_categories_and_runtimes(finished_run):
    root, options = finished_run
    report = root / "report.html"
    result = snakemake("aggregate", "--report", str(report), *options)
    assert result.returncode == 0, result.stderr[-4000:]
    html = report.read_text()
    for expected in ("Summary", "synapse", "tomo 1", "per_dataset.csv", "density_per_tomogram.png",
                     "through the median vesicle centre",  # preview caption, rendered per tomogram
                     "Vesicle density per tomogram",        # a plot caption
                     "Runtime"):
        assert expected in html, expected


def test_zip_report(finished_run):
    root, options = finished_run
    report = root / "report.zip"
    result = snakemake("aggregate", "--report", str(report), *options)
    assert result.returncode == 0, result.stderr[-4000:]
    names = zipfile.ZipFile(report).namelist()
    assert any(n.endswith("report.html") for n in names)
    assert any(n.endswith("preview.png") for n in names)
