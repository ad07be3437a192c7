"""The 3D U-Net, and saving / loading model folders.

Weights are plain tensors (safetensors): loading a model never unpickles or executes anything
from the file. Metadata lives in :mod:`vesicleflow.modelinfo`.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from vesicleflow.modelinfo import (  # noqa: F401  (re-exported: one import for model users)
    BUNDLED_MODEL_DIR,
    MODEL_FORMAT,
    Architecture,
    ModelError,
    ModelInfo,
    Preprocessing,
    load_model_info,
    resolve_model_dir,
)


def _conv_block(in_channels: int, channels: list[int], arch: Architecture) -> nn.Sequential:
    layers: list[nn.Module] = []
    for out_channels in channels:
        layers += [
            nn.Conv3d(in_channels, out_channels, arch.kernel_size, padding=arch.kernel_size // 2),
            nn.BatchNorm3d(out_channels, eps=arch.batchnorm_eps),
            nn.ReLU(inplace=True),
        ]
        in_channels = out_channels
    return nn.Sequential(*layers)


class UNet3d(nn.Module):
    """A plain 3D U-Net: conv-BN-ReLU blocks, max-pool down, upsample + concatenate up.

    Returns logits; apply a sigmoid for probabilities. Batch-norm keeps inference independent of
    which window a voxel falls in, so overlapping windows stitch without seams.
    """

    def __init__(self, arch: Architecture):
        super().__init__()
        arch.validate()
        self.arch = arch
        self.encoder = nn.ModuleList()
        channels = arch.in_channels
        skips = []
        for block in arch.encoder:
            self.encoder.append(_conv_block(channels, block, arch))
            channels = block[-1]
            skips.append(channels)
        self.bottom = _conv_block(channels, arch.bottom, arch)
        channels = arch.bottom[-1]
        self.decoder = nn.ModuleList()
        for block, skip in zip(arch.decoder, reversed(skips)):
            self.decoder.append(_conv_block(channels + skip, block, arch))
            channels = block[-1]
        self.head = nn.Conv3d(channels, arch.out_channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skips = []
        for block in self.encoder:
            x = block(x)
            skips.append(x)
            x = nn.functional.max_pool3d(x, 2)
        x = self.bottom(x)
        for block, skip in zip(self.decoder, reversed(skips)):
            x = nn.functional.interpolate(x, scale_factor=2, mode=self.arch.upsample)
            x = block(torch.cat([x, skip], dim=1))
        return self.head(x)


def save_model(net: UNet3d, info: ModelInfo, directory: str | Path) -> Path:
    """Write ``model.json`` and ``weights.safetensors`` into ``directory`` (atomically each)."""
    from safetensors.torch import save_file

    from vesicleflow.io import atomic_output

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in net.state_dict().items()}
    with atomic_output(directory / "weights.safetensors") as tmp:
        save_file(state, str(tmp))
    with atomic_output(directory / "model.json") as tmp:
        tmp.write_text(info.to_json())
    return directory


def load_model(model: str | Path | None, device: str | torch.device = "cpu") -> tuple[UNet3d, ModelInfo]:
    """Build the network from metadata and load its weights; the network is in eval mode."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    directory = resolve_model_dir(model)
    info = load_model_info(directory)
    weights = directory / "weights.safetensors"
    try:
        state = load_file(str(weights), device="cpu")
    except (SafetensorError, OSError, ValueError) as err:
        raise ModelError(f"{weights}: corrupt or missing weights ({err})") from err
    net = UNet3d(info.architecture)
    try:
        net.load_state_dict(state, strict=True)
    except RuntimeError as err:
        first = str(err).splitlines()[0]
        raise ModelError(f"{weights}: weights do not match the architecture in model.json ({first})") from err
    return net.to(device).eval(), info


def pick_device(requested: str = "auto") -> torch.device:
    """"auto" uses CUDA when present, else the CPU."""
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(requested)
