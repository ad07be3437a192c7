# Helpers shared by all rules: config validation, input discovery, path and resource functions.
import functools
import json
import math
import os
import shlex
import struct
from pathlib import Path

from snakemake.logging import logger
from snakemake.utils import min_version, validate

min_version("9.0")


validate(config, schema="../schemas/config.schema.yaml")

OUT = config["output_dir"].rstrip("/")
MODEL = config["model"]
MODEL_DIR = (
    str(Path(workflow.basedir) / "src/vesicleflow/models/default")
    if MODEL in ("", "bundled")
    else MODEL
)
MODEL_FILES = [f"{MODEL_DIR}/model.json", f"{MODEL_DIR}/weights.safetensors"]
SHARDS = list(range(config["inference"]["shards"]))


wildcard_constraints:
    dataset="[^/]+",
    tomo="[^/]+",
    shard=r"\d+",


def check_output_outside_input(input_dir, output_dir, datasets=()):
    """Nothing is ever written into input_dir: refuse an output_dir (or a dataset's results folder,
    <output_dir>/<dataset>) inside it."""
    inp = Path(input_dir).resolve()
    for target in [Path(output_dir), *(Path(output_dir, name) for name in datasets)]:
        resolved = target.resolve()
        if resolved == inp or inp in resolved.parents:
            raise WorkflowError(
                f"output_dir {output_dir!r} puts results in {str(target)!r}, inside input_dir "
                f"{input_dir!r}; nothing may be written into the input folder (and results there "
                "would be taken for datasets): choose another output_dir"
            )


def discover_tomograms(input_dir, patterns, mask_suffix):
    """{(dataset, tomogram): path} for every tomogram in input_dir/<dataset>/.

    Hidden files (``.name``, e.g. macOS ``._tomo.mrc``) and masks are not tomograms. A dataset
    folder without tomograms is reported and skipped. Two tomograms with the same stem in one
    dataset (``a.mrc`` and ``a.rec``) stop the run before any job starts: both would write to
    ``<output_dir>/<dataset>/a/``, and which one the user means cannot be guessed.
    """
    found = {}
    root = Path(input_dir)
    if not root.is_dir():
        return found
    for dataset_dir in sorted(
        p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")
    ):
        before = len(found)
        for pattern in patterns:
            for path in sorted(dataset_dir.glob(pattern)):
                if (
                    path.name.startswith(".")
                    or path.stem.endswith(mask_suffix)
                    or not path.is_file()
                ):
                    continue
                key = (dataset_dir.name, path.stem)
                if key in found:
                    raise WorkflowError(
                        f"{path}: two tomograms named {path.stem!r} in dataset {dataset_dir.name!r} "
                        f"({found[key].name} and {path.name}) would share one results folder; rename "
                        "or move one, or narrow tomogram_patterns (e.g. ['*.rec'])"
                    )
                found[key] = path
        if len(found) == before:
            logger.warning(
                f"{dataset_dir}: no tomograms ({', '.join(patterns)}) in this dataset folder; skipped"
            )
    return found


check_output_outside_input(config["input_dir"], config["output_dir"])
TOMOGRAMS = discover_tomograms(
    config["input_dir"], config["tomogram_patterns"], config["mask_suffix"]
)
check_output_outside_input(
    config["input_dir"], config["output_dir"], {dataset for dataset, _ in TOMOGRAMS}
)


def tomogram_path(wildcards):
    return str(TOMOGRAMS[(wildcards.dataset, wildcards.tomo)])


def dataset_setting(dataset, key):
    return config["datasets"].get(dataset, {}).get(key)


def mask_path(wildcards):
    """The tomogram's cytoplasm mask if one exists (beside it, or in the dataset's mask_dir)."""
    tomogram = TOMOGRAMS[(wildcards.dataset, wildcards.tomo)]
    folder = dataset_setting(wildcards.dataset, "mask_dir") or tomogram.parent
    candidate = (
        Path(folder) / f"{tomogram.stem}{config['mask_suffix']}{tomogram.suffix}"
    )
    return [str(candidate)] if candidate.is_file() else []


def voxel_size_option(wildcards):
    value = dataset_setting(wildcards.dataset, "voxel_size_angstrom")
    return f"--voxel-size-angstrom {value}" if value else ""


def mask_option(wildcards, input):
    return f"--mask {shlex.quote(str(input.mask))}" if input.mask else ""


def model_dir_of(wildcards, input):
    return os.path.dirname(input.model[0])


def tomogram_dir(dataset, tomo):
    return f"{OUT}/{dataset}/{tomo}"


def curated_table(wildcards):
    """A hand-curated table (`vesicleflow curate`) beside the results replaces spherefit's vesicles.

    Being an input, its appearance, change (mtime) or removal re-runs export and aggregate only.
    """
    path = (
        Path(tomogram_dir(wildcards.dataset, wildcards.tomo)) / "vesicles.curated.csv"
    )
    return [str(path)] if path.is_file() else []


def tomogram_mb(wildcards):
    return os.path.getsize(TOMOGRAMS[(wildcards.dataset, wildcards.tomo)]) / 2**20


# ------------------------------------------------------------------------------------------------
# Calibrated memory per stage (tests/test_memory.py measures every stage's peak RSS against these).
# Every stage works in bounded blocks, so memory depends on the size of a tomogram's planes and on
# the model grid (the tomogram rescaled to the model's voxel size), not simply on its file size.
# The constants include ~250 MB for Python, numpy, scipy, zarr and torch (the CLI imports torch).

#: Bytes per voxel of the MRC modes vesicleflow reads.
MRC_ITEMSIZE = {0: 1, 1: 2, 2: 4, 6: 2, 12: 2}
MB = 2**20


def _model_voxel_size_angstrom():
    try:
        return float(
            json.loads(Path(MODEL_DIR, "model.json").read_text())["voxel_size_angstrom"]
        )
    except (OSError, ValueError, KeyError, TypeError):
        return 20.0


MODEL_VOXEL_ANGSTROM = _model_voxel_size_angstrom()


@functools.lru_cache(maxsize=None)
def mrc_header_geometry(path):
    """((nz, ny, nx), voxel size Å) from an MRC header, or None if unreadable (its job fails with a message)."""
    try:
        with open(path, "rb") as handle:
            head = handle.read(1024)
        for order in "<>":
            nx, ny, nz, mode = struct.unpack(f"{order}4i", head[:16])
            mx = struct.unpack(f"{order}i", head[28:32])[0]
            xlen = struct.unpack(f"{order}f", head[40:44])[0]
            if all(0 < n < 2**24 for n in (nx, ny, nz)) and mode in MRC_ITEMSIZE:
                voxel = xlen / mx if mx > 0 and math.isfinite(xlen) else 0.0
                return (nz, ny, nx), voxel
    except (OSError, struct.error):
        pass
    return None


def tomogram_geometry(wildcards):
    """(original shape, model-grid shape) of a job's tomogram; (1, 1, 1) twice if unreadable."""
    geometry = mrc_header_geometry(str(TOMOGRAMS[(wildcards.dataset, wildcards.tomo)]))
    if geometry is None:
        return (1, 1, 1), (1, 1, 1)
    shape, header_voxel = geometry
    voxel = dataset_setting(wildcards.dataset, "voxel_size_angstrom") or header_voxel
    if not 3.0 <= voxel <= 100.0:
        voxel = MODEL_VOXEL_ANGSTROM  # the job will refuse the voxel size; any estimate will do
    zoom = voxel / MODEL_VOXEL_ANGSTROM
    return shape, tuple(max(1, round(n * zoom)) for n in shape)


def _stage_mb(stage, shape, model_shape):
    """Peak memory (MB) of one stage, calibrated on measurements (see tests/test_memory.py)."""
    plane_mb = 4 * shape[1] * shape[2] / MB  # one original plane as float32
    volume_mb = 4 * math.prod(shape) / MB  # the original grid as float32 (memory maps)
    model_mb = 4 * math.prod(model_shape) / MB  # the model grid as float32
    zoom = model_shape[1] / shape[1]
    if stage == "normalize":
        # z slabs of input planes (as normalize.slab_planes): 32 MB, or more when planes are large;
        # the halo of the unskipped anti-aliasing sigma, an upper bound for normalize.antialias_sigma
        sigma = max(0.0, (1 / zoom - 1) / 2)
        halo = 2 * (math.ceil(4 * sigma) + 3)
        n_out = max(
            math.floor(max(32 / plane_mb - halo, 0) * zoom), math.ceil(halo * zoom)
        )
        block_mb = (min(max(n_out, 1), 32) / zoom + halo) * plane_mb
        # + the z-scored write of up to 64 model-grid planes (normalize.WRITE_BYTES: 256 MB)
        write_mb = min(64 * 4 * model_shape[1] * model_shape[2] / MB, 256.0)
        return 550 + 2 * max(block_mb, 32.0) + 2.5 * write_mb
    if stage == "tile":
        return 500
    if stage == "infer":
        # the network and one batch of activations + sum(w*p), sum(w) over the shard's box (the
        # activations' freed blocks stay in the process: vesicleflow.allocator, within this bound)
        inference = config["inference"]
        window = inference["window"] or 64
        # "auto" is 4 on the CPU; on CUDA the larger batch's activations are in GPU memory
        batch = 4 if inference["batch_size"] == "auto" else inference["batch_size"]
        activations = 400 * (window / 64) ** 3 * batch / 4
        return 600 + activations + 2.2 * model_mb
    if stage == "stitch":
        # numerator, denominator and shard reads over 64-plane slabs of 32 MB row bands
        block_mb = max(32.0, 64 * 64 * 4 * model_shape[2] / MB)
        return 450 + 5 * block_mb
    if stage == "postprocess":
        # one haloed block (at most 96 Mi voxels unless the halo needs more) per worker process
        # (the rule's 2 threads) at 16 bytes a voxel (about 3 for a block of vesicles, about 52 for
        # one component filling it: the third attempt's memory covers that), + every block's kept
        # objects until the write
        post = config["postprocess"]
        halo = 2 * post["max_radius_nm"] / (MODEL_VOXEL_ANGSTROM / 10) + 10
        block_voxels = min(math.prod(model_shape), max(96 * MB, (8 + 2 * halo) ** 3))
        return 450 + (2 * 16 + 4) * block_voxels / MB + 200
    if stage == "spherefit":
        # at most the model-grid labels (read in 64-plane slabs, the open objects' masks kept)
        # + the pages of the tomogram's memory map it touches, + a second worker process
        return 800 + 1.1 * volume_mb + 2.5 * model_mb
    if stage == "export":
        # the tomogram's memory map + label volumes written on the original grid (uint16)
        return 600 + 1.1 * volume_mb + 0.5 * volume_mb + 2.5 * model_mb
    raise ValueError(f"no memory model for stage {stage!r}")


def stage_memory_mb(stage):
    """mem_mb of one stage's job from its tomogram's header, growing with each retry."""

    def mem_mb(wildcards, attempt):
        shape, model_shape = tomogram_geometry(wildcards)
        return int(math.ceil(_stage_mb(stage, shape, model_shape) * attempt))

    return mem_mb


def runtime_min(base_min, per_gb_min):
    """Runtime (minutes) as a function of the tomogram's size, growing with each retry."""

    def runtime(wildcards, attempt):
        return int((base_min + per_gb_min * tomogram_mb(wildcards) / 1024) * attempt)

    return runtime


def all_inputs(wildcards):
    """Everything a complete run produces; an empty input is an error, not an empty summary."""
    if not TOMOGRAMS:
        patterns = ", ".join(config["tomogram_patterns"])
        raise WorkflowError(
            f"no tomograms ({patterns}) found in dataset sub-folders of input_dir "
            f"{config['input_dir']!r}; set it with --config input_dir=DIR"
        )
    return list(rules.aggregate.output)
