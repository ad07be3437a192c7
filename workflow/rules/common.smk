# Helpers shared by all rules: config validation, input discovery, path and resource functions.
import os
import shlex
from pathlib import Path

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


def discover_tomograms(input_dir, patterns, mask_suffix):
    """{(dataset, tomogram): path} for every tomogram in input_dir/<dataset>/."""
    found = {}
    root = Path(input_dir)
    if not root.is_dir():
        return found
    for dataset_dir in sorted(p for p in root.iterdir() if p.is_dir()):
        for pattern in patterns:
            for path in sorted(dataset_dir.glob(pattern)):
                if path.stem.endswith(mask_suffix) or not path.is_file():
                    continue
                key = (dataset_dir.name, path.stem)
                if key in found:
                    raise WorkflowError(
                        f"{path}: two tomograms named {path.stem!r} in dataset "
                        f"{dataset_dir.name!r} ({found[key].name} and {path.name}); rename one"
                    )
                found[key] = path
    return found


TOMOGRAMS = discover_tomograms(
    config["input_dir"], config["tomogram_patterns"], config["mask_suffix"]
)


def tomogram_path(wildcards):
    return str(TOMOGRAMS[(wildcards.dataset, wildcards.tomo)])


def dataset_setting(dataset, key):
    return config["datasets"].get(dataset, {}).get(key)


def mask_path(wildcards):
    """The tomogram's cytoplasm mask if one exists (beside it, or in the dataset's mask_dir)."""
    tomogram = TOMOGRAMS[(wildcards.dataset, wildcards.tomo)]
    folder = dataset_setting(wildcards.dataset, "mask_dir") or tomogram.parent
    candidate = Path(folder) / f"{tomogram.stem}{config['mask_suffix']}{tomogram.suffix}"
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


def tomogram_mb(wildcards):
    return os.path.getsize(TOMOGRAMS[(wildcards.dataset, wildcards.tomo)]) / 2**20


def memory_mb(base_mb, per_tomogram_mb):
    """mem_mb as a function of the input tomogram's size, growing with each retry."""

    def mem_mb(wildcards, attempt):
        return int((base_mb + per_tomogram_mb * tomogram_mb(wildcards)) * attempt)

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
    return summary_outputs()


def summary_outputs():
    return [
        f"{OUT}/summary/vesicles.csv",
        f"{OUT}/summary/per_tomogram.csv",
        f"{OUT}/summary/per_dataset.csv",
        f"{OUT}/summary/radius_distribution.png",
    ]
