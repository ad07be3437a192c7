"""Shared fixtures: small synthetic volumes written as real MRC files."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest

from vesicleflow.io import write_mrc

REPO = Path(__file__).resolve().parents[1]


def shell_volume(shape, centre, membrane_radius, thickness, noise=0.0, seed=0) -> np.ndarray:
    """A bright background with one dark spherical shell (membrane) of the given mid radius (voxels)."""
    grid = np.indices(shape, dtype=np.float64)
    distance = np.sqrt(sum((g - c) ** 2 for g, c in zip(grid, centre)))
    volume = 1.0 - np.exp(-0.5 * ((distance - membrane_radius) / (thickness / 2.355)) ** 2)
    rng = np.random.default_rng(seed)
    return (volume + noise * rng.standard_normal(shape)).astype(np.float32)


@pytest.fixture
def mrc_factory(tmp_path):
    def make(name, data, voxel_size_angstrom=15.0):
        path = tmp_path / name
        path.parent.mkdir(parents=True, exist_ok=True)
        write_mrc(path, data, voxel_size_angstrom)
        return path

    return make


# ------------------------------------------------------------------------------------------------
# Robustness fixtures (tests/test_robustness.py, test_faults.py, test_memory.py): bad inputs, an
# isolated Snakemake runner, and one `--keep-going` run over a folder mixing bad and good tomograms.

import hashlib  # noqa: E402
import os  # noqa: E402
import shutil  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402

VENV_BIN = Path(sys.executable).parent


def cli_env() -> dict:
    """Environment for subprocesses: this venv's `vesicleflow` first on PATH, one thread each."""
    return {**os.environ, "PATH": f"{VENV_BIN}{os.pathsep}{os.environ['PATH']}", "OMP_NUM_THREADS": "1"}


def run_snakemake_isolated(workdir: Path, *args: str, timeout: float = 900, **popen) -> subprocess.CompletedProcess:
    """Snakemake on this repo's Snakefile in its own working directory (own .snakemake, own locks)."""
    prepare_workdir(workdir)
    return subprocess.run(snakemake_command(*args), cwd=workdir, env=cli_env(), text=True,
                          capture_output=True, timeout=timeout, **popen)


def prepare_workdir(workdir: Path) -> None:
    (workdir / "config").mkdir(parents=True, exist_ok=True)
    shutil.copy(REPO / "config" / "config.yaml", workdir / "config" / "config.yaml")


def snakemake_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "snakemake", "-s", str(REPO / "Snakefile"), *args]


def tree_snapshot(root: Path) -> dict[str, tuple[int, int, str]]:
    """Every path under root -> (size, mtime_ns, sha256): proves a folder was not touched."""
    snapshot = {}
    for path in sorted(root.rglob("*")):
        stat = path.stat()
        digest = hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else ""
        snapshot[str(path.relative_to(root))] = (stat.st_size if path.is_file() else 0, stat.st_mtime_ns, digest)
    return snapshot


@pytest.fixture(scope="session")
def model_copy(tmp_path_factory) -> Path:
    """A private copy of the bundled model: runs compared with each other must not see it retrained."""
    from vesicleflow.modelinfo import BUNDLED_MODEL_DIR

    target = tmp_path_factory.mktemp("model") / "default"
    shutil.copytree(BUNDLED_MODEL_DIR, target)
    return target


@pytest.fixture(scope="session")
def good_tomogram(tmp_path_factory) -> tuple[Path, Path]:
    """A simulated 48 x 128 x 128 synapse with vesicles: (tomogram, its cytoplasm mask)."""
    from vesicleflow.simulate import simulate_tree

    root = tmp_path_factory.mktemp("good")
    simulate_tree(root, n_datasets=1, n_tomograms=1, shape=(48, 128, 128), seed=3)
    tomogram = next(p for p in (root / "tomograms").rglob("*.mrc") if not p.stem.endswith("_mask"))
    return tomogram, tomogram.with_name(f"{tomogram.stem}_mask.mrc")


def _write_raw_mrc(path: Path, data: np.ndarray, voxel_size_angstrom: float) -> Path:
    import mrcfile

    path.parent.mkdir(parents=True, exist_ok=True)
    with mrcfile.new(path, overwrite=True) as mrc:
        mrc.set_data(data)
        mrc.voxel_size = voxel_size_angstrom
    return path


def make_bad_input(kind: str, path: Path, good: Path) -> Path:
    """Write one kind of bad (or awkward but valid) tomogram at ``path``, derived from ``good``."""
    import warnings

    import mrcfile

    data = mrcfile.read(good)
    voxel = float(mrcfile.open(good, header_only=True).voxel_size.x)
    path.parent.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # mrcfile warns about NaN / Inf when writing them
        if kind == "not_mrc":
            path.write_text("this is a text file, not a tomogram\n" * 50)
        elif kind == "truncated":
            raw = good.read_bytes()
            path.write_bytes(raw[: len(raw) // 2])
        elif kind == "complex":
            _write_raw_mrc(path, data.astype(np.complex64), voxel)
        elif kind == "image_2d":
            _write_raw_mrc(path, data[0], voxel)
        elif kind == "single_slice":
            _write_raw_mrc(path, data[:1], voxel)
        elif kind == "voxel_0":
            _write_raw_mrc(path, data, 0.0)
        elif kind == "voxel_unset":
            _write_raw_mrc(path, data, 1.0)
        elif kind == "voxel_huge":
            _write_raw_mrc(path, data, 250.0)
        elif kind == "voxel_tiny":
            _write_raw_mrc(path, data, 1.5)
        elif kind == "nan":
            bad = data.copy()
            bad[20, 50, 60] = np.nan
            _write_raw_mrc(path, bad, voxel)
        elif kind == "inf":
            bad = data.copy()
            bad[7, 3, 2] = -np.inf
            _write_raw_mrc(path, bad, voxel)
        elif kind == "constant":
            _write_raw_mrc(path, np.full(data.shape, 0.25, np.float32), voxel)
        elif kind == "tiny":  # smaller than one inference window on every axis
            _write_raw_mrc(path, np.ascontiguousarray(data[:10, :24, :20]), voxel)
        elif kind == "noise":  # a valid tomogram without vesicles
            rng = np.random.default_rng(5)
            _write_raw_mrc(path, rng.normal(0, 1, data.shape).astype(np.float32), voxel)
        elif kind == "int16":
            _write_raw_mrc(path, (data * 100).astype(np.int16), voxel)
        else:
            raise ValueError(kind)
    return path


#: The mixed folder: tomograms that must fail at normalize, and those that must complete.
MIXED_BAD = ["not_mrc", "voxel_unset", "nan"]
MIXED_GOOD = ["good ü 1", "empty"]


@pytest.fixture(scope="session")
def mixed_run(good_tomogram, model_copy, tmp_path_factory):
    """One real `snakemake --keep-going` over good and bad tomograms side by side.

    ``good ü 1``: a simulated synapse with its mask (spaces and non-ASCII in the name); ``empty``:
    smaller than one inference window, with an all-zero mask (valid: zero vesicles); MIXED_BAD fail
    at normalize (a mask of the wrong shape, failing at postprocess, is tested at the CLI level); a
    hidden macOS ``._`` file is not a tomogram; ``empty_dataset/`` has no tomograms (warning only).
    """
    root = tmp_path_factory.mktemp("mixed")
    data = root / "input" / "mixed"
    tomogram, mask = good_tomogram
    (data / "good ü 1.mrc").parent.mkdir(parents=True)
    (data / "good ü 1.mrc").write_bytes(tomogram.read_bytes())
    (data / "good ü 1_mask.mrc").write_bytes(mask.read_bytes())
    (data / "._good ü 1.mrc").write_bytes(b"\0" * 4096)  # macOS metadata junk: not a tomogram
    make_bad_input("tiny", data / "empty.mrc", tomogram)
    write_mrc(data / "empty_mask.mrc", np.zeros((10, 24, 20), np.int8), 11.54)
    for kind in MIXED_BAD:
        make_bad_input(kind, data / f"{kind}.mrc", tomogram)
    (root / "input" / "empty_dataset").mkdir()
    before = tree_snapshot(root / "input")
    config = [f"input_dir={root / 'input'}", f"output_dir={root / 'results'}", f"model={model_copy}"]
    result = run_snakemake_isolated(root / "wd", "--profile", str(REPO / "profiles" / "local"), "--cores", "2",
                                    "--keep-going", "--config", *config)
    after = tree_snapshot(root / "input")
    return {"root": root, "results": root / "results", "input": data, "result": result, "config": config,
            "before": before, "after": after}


def planned_jobs(output: str) -> dict[str, int]:
    """Rule -> job count from Snakemake's 'Job stats' table, without the target rule `all`
    (empty when nothing is to be done)."""
    if "Job stats:" not in output:
        return {}
    counts = {}
    for line in output.split("Job stats:")[-1].splitlines():
        match = re.match(r"^(\w+)\s+(\d+)$", line.strip())
        if match and match.group(1) not in ("total", "all"):
            counts[match.group(1)] = int(match.group(2))
    return counts
