"""tile: the sliding-window plan (windows, overlap, shards) and the Gaussian importance map.

Windows overlap and every prediction is weighted by a Gaussian that is highest at the window's
centre; stitch divides the summed weighted predictions by the summed weights, so window borders,
where a U-Net is least reliable, never show as seams.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from vesicleflow.io import write_json
from vesicleflow.modelinfo import load_model_info
from vesicleflow.volumes import volume_shape

#: Weight floor relative to the centre: keeps sum(w) > 0 where only window corners reach.
WEIGHT_FLOOR = 1e-3


def window_starts(length: int, window: int, overlap: float) -> list[int]:
    """Start offsets along one axis: evenly spread, first at 0, last flush with the end."""
    if length <= window:
        return [0]
    stride = max(1, int(window * (1.0 - overlap)))
    count = math.ceil((length - window) / stride) + 1
    return sorted({round(i * (length - window) / (count - 1)) for i in range(count)})


def plan_windows(shape, window: int, overlap: float, shards: int) -> dict:
    """All window origins (z, y, x), split into ``shards`` contiguous groups along z.

    Exactly ``shards`` groups are made (some empty when there are fewer windows than shards), so
    the number of inference jobs is known before the volume is read.
    """
    starts = [window_starts(n, window, overlap) for n in shape]
    windows = [[z, y, x] for z in starts[0] for y in starts[1] for x in starts[2]]
    shards = max(1, int(shards))
    bounds = np.linspace(0, len(windows), shards + 1).round().astype(int)
    return {
        "shape": [int(n) for n in shape],
        "window": int(window),
        "overlap": float(overlap),
        "windows": windows,
        "shards": [list(range(bounds[k], bounds[k + 1])) for k in range(shards)],
    }


def shard_box(plan: dict, shard: int) -> tuple[list[int], list[int]]:
    """The region (start, stop per axis) that a shard's windows cover, clipped to the volume."""
    if not plan["shards"][shard]:
        return [0, 0, 0], [1, 1, 1]  # an empty shard contributes one voxel of zero weight
    origins = np.array([plan["windows"][i] for i in plan["shards"][shard]])
    stop = np.minimum(origins.max(axis=0) + plan["window"], plan["shape"])
    return origins.min(axis=0).tolist(), stop.tolist()


def gaussian_importance(window: int, sigma_fraction: float = 0.125) -> np.ndarray:
    """A separable 3D Gaussian, 1 at the centre, floored at :data:`WEIGHT_FLOOR`."""
    centre = (window - 1) / 2.0
    axis = np.exp(-0.5 * ((np.arange(window) - centre) / (sigma_fraction * window)) ** 2)
    weights = axis[:, None, None] * axis[None, :, None] * axis[None, None, :]
    return np.maximum(weights, WEIGHT_FLOOR).astype(np.float32)


def tile_tomogram(normalized: str | Path, output: str | Path, model: str | Path | None = None,
                  window: int | None = None, overlap: float = 0.25, shards: int = 1) -> dict:
    """Write the tiling plan (JSON) for a normalized volume."""
    info = load_model_info(model)
    window = int(window or info.window)
    if window % info.architecture.divisor:
        raise ValueError(f"window {window} must be a multiple of {info.architecture.divisor} for this model")
    if not 0.0 <= overlap < 1.0:
        raise ValueError(f"overlap must be in [0, 1), got {overlap}")
    plan = plan_windows(volume_shape(normalized), window, overlap, shards)
    plan["requested_shards"] = int(shards)
    write_json(output, plan)
    return plan
