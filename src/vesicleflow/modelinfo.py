"""Model metadata (``model.json``) without torch, so light stages can read it quickly.

A model is a folder holding ``model.json`` (architecture, the voxel size and preprocessing the
network expects, provenance) and ``weights.safetensors`` (loaded by :mod:`vesicleflow.model`).

The architecture is described by explicit channel lists, so one network class expresses both the
bundled network and imported ones (CryoVesNet's Keras U-Net):

- ``encoder``: per resolution level, the output channels of its convolutions (then 2x max-pool)
- ``bottom``: the convolutions at the coarsest level
- ``decoder``: per level, coarse to fine, the convolutions after upsampling + concatenating the skip
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

MODEL_FORMAT = "vesicleflow-model/1"
BUNDLED_MODEL_DIR = Path(__file__).parent / "models" / "default"


class ModelError(ValueError):
    """A model folder is missing, corrupt, or does not match this code."""


@dataclass
class Architecture:
    encoder: list[list[int]]
    bottom: list[int]
    decoder: list[list[int]]
    in_channels: int = 1
    out_channels: int = 1
    kernel_size: int = 3
    batchnorm_eps: float = 1e-5
    upsample: str = "nearest"  # "nearest" or "trilinear"
    name: str = "unet3d"

    @property
    def divisor(self) -> int:
        """Window sides must be multiples of this (one 2x pool per encoder level)."""
        return 2 ** len(self.encoder)

    def validate(self) -> None:
        if self.name != "unet3d":
            raise ModelError(f"unknown architecture {self.name!r}; this code knows 'unet3d'")
        if len(self.decoder) != len(self.encoder):
            raise ModelError("architecture: decoder needs one entry per encoder level")
        if self.upsample not in ("nearest", "trilinear"):
            raise ModelError(f"architecture: unknown upsample mode {self.upsample!r}")
        blocks = [*self.encoder, self.bottom, *self.decoder]
        if any(not block or any(int(c) < 1 for c in block) for block in blocks):
            raise ModelError("architecture: every block needs at least one positive channel count")


@dataclass
class Preprocessing:
    """What normalize applies after rescaling to the model's voxel size."""

    gaussian_sigma_voxels: float = 0.0
    zscore: str = "robust"  # "robust" (median / scaled MAD) or "mean_std" (whole-volume mean / std)
    #: robust only: where the z-scored volume's standard deviation exceeds this, divide by it too. In a
    #: high-SNR tomogram the MAD is small and membranes come out far darker than the network saw.
    max_spread: float | None = None


@dataclass
class ModelInfo:
    architecture: Architecture
    voxel_size_angstrom: float
    preprocessing: Preprocessing = field(default_factory=Preprocessing)
    window: int = 64
    name: str = "vesicleflow-unet"
    version: str = "0"
    trained_on: str = ""
    training: dict = field(default_factory=dict)
    format: str = MODEL_FORMAT

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2) + "\n"

    @classmethod
    def from_dict(cls, raw: dict, source: Path) -> ModelInfo:
        if raw.get("format") != MODEL_FORMAT:
            raise ModelError(f"{source}: format {raw.get('format')!r} is not {MODEL_FORMAT!r}")
        try:
            raw = dict(raw)
            raw["architecture"] = Architecture(**raw["architecture"])
            raw["preprocessing"] = Preprocessing(**raw.get("preprocessing", {}))
            info = cls(**raw)
        except (KeyError, TypeError) as err:
            raise ModelError(f"{source}: metadata does not match this code ({err})") from err
        try:
            info.architecture.validate()
        except ModelError as err:
            raise ModelError(f"{source}: {err}") from None
        if not 3.0 <= float(info.voxel_size_angstrom) <= 100.0:
            raise ModelError(f"{source}: implausible model voxel size {info.voxel_size_angstrom} Å")
        if info.preprocessing.zscore not in ("robust", "mean_std"):
            raise ModelError(f"{source}: unknown z-score mode {info.preprocessing.zscore!r}")
        if info.window % info.architecture.divisor:
            raise ModelError(f"{source}: window {info.window} is not a multiple of {info.architecture.divisor}")
        return info


def resolve_model_dir(model: str | Path | None) -> Path:
    """``None``, "" or "bundled" mean the model that ships with vesicleflow."""
    if model in (None, "", "bundled"):
        return BUNDLED_MODEL_DIR
    return Path(model)


def load_model_info(model: str | Path | None) -> ModelInfo:
    directory = resolve_model_dir(model)
    meta = directory / "model.json"
    if not meta.is_file():
        raise ModelError(f"{directory}: not a vesicleflow model folder (no model.json)")
    try:
        raw = json.loads(meta.read_text())
    except json.JSONDecodeError as err:
        raise ModelError(f"{meta}: corrupt model metadata ({err})") from err
    return ModelInfo.from_dict(raw, meta)


