"""Bad input: every case gives a one-line error naming the file and the problem, exit status 2, and
nothing written; awkward but valid input works. Then ONE real Snakemake `--keep-going` run over a
folder that mixes bad files with good tomograms: the bad ones' jobs fail with that line in their
log, the good ones complete, and the input folder is left exactly as it was.
"""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path

import mrcfile
import numpy as np
import pandas as pd
import pytest
import yaml
from conftest import (
    MIXED_BAD,
    MIXED_GOOD,
    REPO,
    make_bad_input,
    run_snakemake_isolated,
    tree_snapshot,
)
from typer.testing import CliRunner

from vesicleflow.cli import app
from vesicleflow.io import write_mrc
from vesicleflow.volumes import read_full

runner = CliRunner()


def invoke(*args: str):
    return runner.invoke(app, ["--log-level", "ERROR", *map(str, args)])


def assert_one_line_error(result, command: str, path, pattern: str) -> str:
    """Exit status 2 and exactly one line: `vesicleflow CMD: error: PATH: problem` matching ``pattern``."""
    assert result.exit_code == 2, (result.exit_code, result.stderr, result.exception)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    prefix = f"vesicleflow {command}: error: {path}: "
    assert lines[0].startswith(prefix), lines[0]
    assert re.search(pattern, lines[0][len(prefix):]), lines[0]
    return lines[0]


# ------------------------------------------------------------------------------- input tomograms

TOMOGRAM_CASES = {  # kind: what the one-line message must say
    "not_mrc": r"not an MRC file",
    "truncated": r"truncated: the header promises 48 x 128 x 128 float32 voxels",
    "complex": r"unsupported MRC mode 4 \(complex",
    "image_2d": r"must be a 3D volume.*2D image",
    "single_slice": r"must be a 3D volume",
    "voxel_0": r"voxel size 0 Å .*outside the plausible range 3-100 Å",
    "voxel_unset": r"1\.0 Å, which usually means it was never set",
    "voxel_huge": r"voxel size 250 Å .*plausible range",
    "voxel_tiny": r"voxel size 1\.5 Å .*plausible range",
    "nan": r"1 NaN or Inf voxel value\(s\), the first in z plane 20",
    "inf": r"1 NaN or Inf voxel value\(s\), the first in z plane 7",
    "constant": r"the volume is constant \(every voxel is 0\.25",
}


@pytest.mark.parametrize("kind", sorted(TOMOGRAM_CASES))
def test_bad_tomogram_is_refused_in_one_line_and_nothing_is_written(kind, good_tomogram, tmp_path):
    inputs = tmp_path / "in put ü"  # spaces and non-ASCII in the folder name, too
    bad = make_bad_input(kind, inputs / f"{kind}.mrc", good_tomogram[0])
    before = tree_snapshot(inputs)
    output = tmp_path / "out" / "normalized.zarr"
    assert_one_line_error(invoke("normalize", bad, output), "normalize", bad, TOMOGRAM_CASES[kind])
    assert not output.exists() and not any((tmp_path / "out").glob("*")) and not any((tmp_path / "out").glob(".*"))
    assert tree_snapshot(inputs) == before


def test_missing_tomogram_is_named(tmp_path):
    missing = tmp_path / "nope.mrc"
    assert_one_line_error(invoke("normalize", missing, tmp_path / "n.zarr"), "normalize", missing, "no such file")


@pytest.mark.parametrize("kind", ["voxel_0", "voxel_unset", "voxel_huge"])
def test_a_voxel_size_override_rescues_a_bad_header(kind, good_tomogram, tmp_path):
    bad = make_bad_input(kind, tmp_path / f"{kind}.mrc", good_tomogram[0])
    result = invoke("normalize", bad, tmp_path / "n.zarr", "--voxel-size-angstrom", "11.5")
    assert result.exit_code == 0, result.stderr
    assert read_full(tmp_path / "n.zarr").shape == (28, 74, 74)


def test_integer_modes_are_read(good_tomogram, tmp_path):
    tomogram = make_bad_input("int16", tmp_path / "int16.mrc", good_tomogram[0])
    assert invoke("normalize", tomogram, tmp_path / "n.zarr").exit_code == 0


@pytest.fixture(scope="module")
def small_chain(good_tomogram, tmp_path_factory):
    """normalize -> tile -> infer -> stitch of the good tomogram (small windows), for later stages."""
    out = tmp_path_factory.mktemp("chain")
    tomogram, mask = good_tomogram
    for args in (["normalize", tomogram, out / "norm.zarr"],
                 ["tile", out / "norm.zarr", out / "tiles.json", "--window", "32"],
                 ["infer", out / "norm.zarr", out / "tiles.json", out / "shard.zarr", "--device", "cpu"],
                 ["stitch", out / "prob.zarr", "--normalized", out / "norm.zarr", out / "shard.zarr"]):
        result = invoke(*args)
        assert result.exit_code == 0, (args[0], result.stderr, result.exception)
    return out, tomogram, mask


def test_a_mask_of_another_shape_is_refused(small_chain, tmp_path):
    out, tomogram, _ = small_chain
    mask = tmp_path / "wrong_mask.mrc"
    write_mrc(mask, np.ones((48, 128, 120), np.int8), 11.54)
    result = invoke("postprocess", out / "prob.zarr", tmp_path / "labels.zarr", "--mask", mask)
    assert_one_line_error(result, "postprocess", mask, r"mask shape \(48, 128, 120\) .*differs from the "
                                                         r"tomogram's \(48, 128, 128\)")
    assert not (tmp_path / "labels.zarr").exists()


def test_a_corrupt_mask_is_refused(small_chain, good_tomogram, tmp_path):
    out, _, _ = small_chain
    mask = make_bad_input("truncated", tmp_path / "m_mask.mrc", good_tomogram[1])
    result = invoke("postprocess", out / "prob.zarr", tmp_path / "labels.zarr", "--mask", mask)
    assert_one_line_error(result, "postprocess", mask, "truncated")


def test_an_all_zero_mask_gives_zero_vesicles_and_valid_outputs(small_chain, tmp_path):
    out, tomogram, _ = small_chain
    mask = tmp_path / "zero_mask.mrc"
    write_mrc(mask, np.zeros((48, 128, 128), np.int8), 11.54)
    assert invoke("postprocess", out / "prob.zarr", tmp_path / "labels.zarr", "--mask", mask).exit_code == 0
    assert read_full(tmp_path / "labels.zarr").max() == 0
    assert invoke("spherefit", tmp_path / "labels.zarr", tomogram, tmp_path / "spheres.csv").exit_code == 0
    result = invoke("export", tmp_path / "spheres.csv", tmp_path / "labels.zarr", tomogram, tmp_path / "res",
                    "--dataset", "d", "--name", "t", "--mask", mask)
    assert result.exit_code == 0, result.stderr
    assert_empty_but_valid_results(tmp_path / "res", (48, 128, 128))


def assert_empty_but_valid_results(folder, shape) -> None:
    """Zero vesicles: a header-only vesicles.csv, an all-zero labels.mrc, and parseable exports."""
    from vesicleflow.export import VESICLE_COLUMNS

    table = pd.read_csv(folder / "vesicles.csv")
    assert len(table) == 0 and list(table.columns)[:len(VESICLE_COLUMNS)] == VESICLE_COLUMNS
    with mrcfile.open(folder / "labels.mrc", permissive=False) as mrc:
        assert mrc.data.shape == tuple(shape) and not mrc.data.any()
    assert json.loads((folder / "tomogram.json").read_text())["n_vesicles"] == 0
    for star in folder.glob("*.star"):  # RELION exports, where export writes them
        import starfile

        parsed = starfile.read(star, always_dict=True)
        assert all(len(block) == 0 for block in parsed.values() if isinstance(block, pd.DataFrame)), star
    for model in folder.glob("*.mod"):  # IMOD model: a valid file with no points
        from imodmodel import ImodModel

        parsed = ImodModel.from_file(model)
        assert all(len(obj.contours) == 0 for obj in parsed.objects), model


def test_a_tomogram_smaller_than_one_window_works(good_tomogram, tmp_path):
    tiny = make_bad_input("tiny", tmp_path / "tiny.mrc", good_tomogram[0])
    for args in (["normalize", tiny, tmp_path / "n.zarr"],
                 ["tile", tmp_path / "n.zarr", tmp_path / "t.json"],
                 ["infer", tmp_path / "n.zarr", tmp_path / "t.json", tmp_path / "s.zarr", "--device", "cpu"],
                 ["stitch", tmp_path / "p.zarr", "--normalized", tmp_path / "n.zarr", tmp_path / "s.zarr"],
                 ["postprocess", tmp_path / "p.zarr", tmp_path / "l.zarr"]):
        result = invoke(*args)
        assert result.exit_code == 0, (args[0], result.stderr, result.exception)
    probability = read_full(tmp_path / "p.zarr")
    assert probability.shape == read_full(tmp_path / "n.zarr").shape == (6, 14, 12)
    assert np.isfinite(probability).all() and ((probability >= 0) & (probability <= 1)).all()


# ------------------------------------------------------------------------------------------ models

def _model_dir(tmp_path, name="model"):
    import shutil

    from vesicleflow.modelinfo import BUNDLED_MODEL_DIR

    target = tmp_path / name
    shutil.copytree(BUNDLED_MODEL_DIR, target)
    return target


def _edit_json(path, edit):
    raw = json.loads(path.read_text())
    edit(raw)
    path.write_text(json.dumps(raw))


class _Payload:
    """Unpickling this runs code: it would create the marker file."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        import os

        return (os.system, (f"touch '{self.marker}'",))


def _pickle_weights(model, tmp_path):
    import torch

    marker = tmp_path / "payload-ran"
    torch.save({"encoder.0.0.weight": _Payload(marker)}, model / "weights.safetensors")
    return marker


MODEL_CASES = {  # case: (break the model folder, which file the message names, what it says)
    "corrupt_weights": (lambda m, t: (m / "weights.safetensors").write_bytes(b"\x00garbage" * 100),
                        "weights.safetensors", r"corrupt or missing weights"),
    "missing_weights": (lambda m, t: (m / "weights.safetensors").unlink(),
                        "weights.safetensors", r"corrupt or missing weights"),
    "pickle_payload": (_pickle_weights, "weights.safetensors", r"corrupt or missing weights"),
    "corrupt_metadata": (lambda m, t: (m / "model.json").write_text("{not json"),
                         "model.json", r"corrupt model metadata"),
    "other_format": (lambda m, t: _edit_json(m / "model.json", lambda r: r.update(format="other/9")),
                     "model.json", r"format 'other/9'"),
    "other_channels": (lambda m, t: _edit_json(m / "model.json",
                                               lambda r: r["architecture"].update(bottom=[64, 64])),
                       "weights.safetensors", r"do not match the architecture in model.json"),
    "unknown_architecture": (lambda m, t: _edit_json(m / "model.json",
                                                     lambda r: r["architecture"].update(name="resnet")),
                             "model.json", r"unknown architecture 'resnet'"),
    "implausible_voxel_size": (lambda m, t: _edit_json(m / "model.json",
                                                       lambda r: r.update(voxel_size_angstrom=0.5)),
                               "model.json", r"implausible model voxel size"),
}


@pytest.mark.parametrize("case", sorted(MODEL_CASES))
def test_a_broken_or_mismatched_model_is_refused(case, small_chain, tmp_path):
    out, _, _ = small_chain
    model = _model_dir(tmp_path)
    breaker, named, pattern = MODEL_CASES[case]
    payload_marker = breaker(model, tmp_path)
    result = invoke("infer", out / "norm.zarr", out / "tiles.json", tmp_path / "s.zarr", "--model", model,
                    "--device", "cpu")
    assert result.exit_code == 2, (result.stderr, result.exception)
    line = result.stderr.strip()
    assert "\n" not in line and line.startswith("vesicleflow infer: error: "), line
    assert f"{model / named}" in line or f"{model}:" in line, line
    assert re.search(pattern, line), line
    assert not (tmp_path / "s.zarr").exists()
    if isinstance(payload_marker, Path):
        assert not payload_marker.exists(), "the pickle payload ran"


def test_no_code_path_unpickles():
    """Model files are data: nothing in the library calls torch.load, pickle or allow_pickle."""
    sources = "\n".join(p.read_text() for p in (REPO / "src" / "vesicleflow").glob("*.py"))
    for forbidden in ("torch.load(", "pickle.load", "allow_pickle=True", "weights_only=False"):
        assert forbidden not in sources, forbidden


# ------------------------------------------------------------------------------------------ config

CONFIG_CASES = {  # edit: the key the message must name
    "unknown top-level key": (lambda c: c.update(colour="red"), "colour"),
    "unknown nested key": (lambda c: c["postprocess"].update(treshold=0.6), "treshold"),
    "unknown dataset key": (lambda c: c.update(datasets={"a": {"voxelsize": 12}}), "voxelsize"),
    "wrong type": (lambda c: c["inference"].update(shards="two"), "shards"),
    "out of range": (lambda c: c["postprocess"].update(threshold=1.5), "threshold"),
    "negative voxel size": (lambda c: c.update(datasets={"a": {"voxel_size_angstrom": -3}}), "voxel_size_angstrom"),
    "bad device": (lambda c: c["inference"].update(device="gpu"), "device"),
    "bad precision": (lambda c: c["inference"].update(precision="half"), "half"),
}


@pytest.mark.parametrize("case", sorted(CONFIG_CASES))
def test_config_schema_names_the_bad_key(case):
    from snakemake.exceptions import WorkflowError
    from snakemake.utils import validate

    config = yaml.safe_load((REPO / "config" / "config.yaml").read_text())
    edit, key = CONFIG_CASES[case]
    bad = copy.deepcopy(config)
    edit(bad)
    validate(copy.deepcopy(config), str(REPO / "workflow" / "schemas" / "config.schema.yaml"))
    with pytest.raises(WorkflowError, match=re.escape(key)):
        validate(bad, str(REPO / "workflow" / "schemas" / "config.schema.yaml"))


def test_a_config_from_before_precision_existed_gets_the_default():
    from snakemake.utils import validate

    config = yaml.safe_load((REPO / "config" / "config.yaml").read_text())
    assert config["inference"].pop("precision") == "auto"
    validate(config, str(REPO / "workflow" / "schemas" / "config.schema.yaml"))
    assert config["inference"]["precision"] == "auto"


# --------------------------------------------------------------------------- workflow: discovery

def _dry_run(tmp_path, input_dir, output_dir=None, *extra):
    output_dir = output_dir or tmp_path / "results"
    return run_snakemake_isolated(tmp_path / "wd", "--dry-run", "--config", f"input_dir={input_dir}",
                                  f"output_dir={output_dir}", *extra, timeout=300)


@pytest.mark.slow
def test_discovery_errors_stop_the_run_before_any_job(good_tomogram, tmp_path):
    # an empty input folder
    (tmp_path / "empty").mkdir()
    result = _dry_run(tmp_path, tmp_path / "empty")
    assert result.returncode != 0 and "no tomograms (*.mrc, *.rec) found" in result.stdout + result.stderr
    # two tomograms with one stem in one dataset: which one is meant cannot be guessed
    twins = tmp_path / "twins" / "ds"
    twins.mkdir(parents=True)
    for name in ("a.mrc", "a.rec"):
        (twins / name).write_bytes(good_tomogram[0].read_bytes())
    result = _dry_run(tmp_path, tmp_path / "twins")
    assert result.returncode != 0
    assert re.search(r"two tomograms named 'a' in dataset 'ds' \(a.mrc and a.rec\)", result.stdout + result.stderr)
    # results inside the input folder would be written into it (and found as datasets)
    result = _dry_run(tmp_path, tmp_path / "twins", tmp_path / "twins" / "results")
    assert result.returncode != 0 and "inside input_dir" in result.stdout + result.stderr
    # ... also when only a dataset's results folder, <output_dir>/<dataset>, would be the input folder
    (tmp_path / "x" / "x").mkdir(parents=True)
    (tmp_path / "x" / "x" / "a.mrc").write_bytes(good_tomogram[0].read_bytes())
    result = _dry_run(tmp_path, tmp_path / "x", tmp_path)
    assert result.returncode != 0 and "inside input_dir" in result.stdout + result.stderr
    # a bad config value on the command line names its key
    result = _dry_run(tmp_path, tmp_path / "twins", None,
                      "postprocess={threshold: 2, min_radius_nm: 8, max_radius_nm: 60, min_separation_nm: null}")
    assert result.returncode != 0 and re.search(r"\['postprocess'\]\['threshold'\]", result.stdout + result.stderr)


# ------------------------------------------------------------------- workflow: one --keep-going run

@pytest.mark.slow
def test_keep_going_fails_only_the_bad_tomograms(mixed_run):
    result = mixed_run["result"]
    assert result.returncode != 0, "a run with bad tomograms must not report success"
    assert "empty_dataset: no tomograms (*.mrc, *.rec) in this dataset folder; skipped" in result.stdout + result.stderr
    logs = mixed_run["results"] / "logs"
    for kind in MIXED_BAD:
        path = mixed_run["input"] / f"{kind}.mrc"
        log = (logs / "normalize" / "mixed" / f"{kind}.log").read_text()
        errors = [line for line in log.splitlines() if "error:" in line]
        assert errors == [f"vesicleflow normalize: error: {path}: " + errors[0].split(f"{path}: ", 1)[1]], log
        assert re.search(TOMOGRAM_CASES[kind], errors[0]), errors[0]
        assert not (mixed_run["results"] / "mixed" / kind / "normalized.zarr").exists()


@pytest.mark.slow
def test_keep_going_completes_every_good_tomogram(mixed_run):
    """Re-planning the same run leaves nothing to do for the good tomograms: their outputs are complete."""
    result = run_snakemake_isolated(mixed_run["root"] / "wd", "--dry-run", "--config", *mixed_run["config"])
    assert result.returncode == 0, result.stderr[-3000:]
    planned = set(re.findall(r"wildcards: dataset=mixed, tomo=([^\n,]+)", result.stdout + result.stderr))
    assert planned == set(MIXED_BAD), planned
    for name in MIXED_GOOD:
        folder = mixed_run["results"] / "mixed" / name
        assert (folder / "vesicles.csv").is_file() and (folder / "labels.mrc").is_file(), name
    assert_empty_but_valid_results(mixed_run["results"] / "mixed" / "empty", (10, 24, 20))


@pytest.mark.slow
def test_keep_going_writes_nothing_into_the_input_folder(mixed_run):
    assert mixed_run["after"] == mixed_run["before"]


@pytest.mark.slow
def test_tomograms_without_vesicles_count_as_zero_in_the_statistics(mixed_run, tmp_path):
    result = invoke("aggregate", tmp_path / "summary", *(mixed_run["results"] / "mixed" / name for name in MIXED_GOOD))
    assert result.exit_code == 0, (result.stderr, result.exception)
    per_tomogram = pd.read_csv(tmp_path / "summary" / "per_tomogram.csv").set_index("tomogram")
    assert set(per_tomogram.index) == set(MIXED_GOOD)
    assert per_tomogram.loc["empty", "n_vesicles"] == 0
    per_dataset = pd.read_csv(tmp_path / "summary" / "per_dataset.csv")
    assert per_dataset["n_vesicles"].sum() == per_tomogram["n_vesicles"].sum()
