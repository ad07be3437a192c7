"""infer: run the U-Net over one shard's windows; write sum(w*p) and sum(w) over the shard's box.

Windows are batched; on CUDA the forward pass runs in mixed precision; on a GPU out-of-memory
error the batch is halved and retried. Optional flip test-time augmentation averages the
predictions of the window mirrored along x and y.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np
import torch

from vesicleflow.io import atomic_output, read_json
from vesicleflow.model import load_model, pick_device
from vesicleflow.tiling import gaussian_importance, shard_box
from vesicleflow.volumes import create_volume, open_volume

log = logging.getLogger(__name__)

FLIPS_XY = [(), (4,), (3,), (3, 4)]


def _read_window(volume, origin, window: int) -> np.ndarray:
    """A window of the volume; zero-padded (the z-scored mean) where the volume is smaller."""
    box = tuple(slice(o, min(o + window, n)) for o, n in zip(origin, volume.shape))
    data = np.asarray(volume[box], dtype=np.float32)
    if data.shape != (window,) * 3:
        data = np.pad(data, [(0, window - s) for s in data.shape], mode="reflect" if min(data.shape) > 1 else "edge")
    return data


@torch.inference_mode()
def predict_batch(net, batch: np.ndarray, device: torch.device, tta: bool) -> np.ndarray:
    """Sigmoid probabilities for a batch of windows (N, D, H, W)."""
    x = torch.from_numpy(batch[:, None]).to(device)
    flips = FLIPS_XY if tta else [()]
    total = None
    for dims in flips:
        xin = torch.flip(x, dims) if dims else x
        with torch.autocast(device_type=device.type, dtype=torch.float16, enabled=device.type == "cuda"):
            logits = net(xin)
        prob = torch.sigmoid(logits.float())
        prob = torch.flip(prob, dims) if dims else prob
        total = prob if total is None else total + prob
    return (total / len(flips))[:, 0].cpu().numpy()


def _predict_with_backoff(net, batch, device, tta):
    """Predict, halving the batch on CUDA out-of-memory until a single window fails."""
    try:
        return predict_batch(net, batch, device, tta)
    except torch.OutOfMemoryError:
        if len(batch) == 1:
            raise
        torch.cuda.empty_cache()
        half = len(batch) // 2
        log.warning("GPU out of memory with a batch of %d windows; retrying with %d", len(batch), half)
        return np.concatenate([_predict_with_backoff(net, batch[:half], device, tta),
                               _predict_with_backoff(net, batch[half:], device, tta)])


def infer_shard(normalized: str | Path, plan_path: str | Path, shard: int, output: str | Path,
                model: str | Path | None = None, batch_size: int = 4, tta: bool = False,
                device: str = "auto", threads: int | None = None) -> Path:
    """Predict every window of ``shard`` and write the weighted accumulations as a zarr."""
    plan = read_json(plan_path)
    if not 0 <= shard < len(plan["shards"]):
        raise ValueError(f"shard {shard} does not exist; the plan has {len(plan['shards'])}")
    if threads:
        torch.set_num_threads(threads)
    torch.manual_seed(0)
    dev = pick_device(device)
    net, _ = load_model(model, dev)
    volume = open_volume(normalized)
    window = plan["window"]
    weights = gaussian_importance(window)
    start, stop = shard_box(plan, shard)
    box_shape = [b - a for a, b in zip(start, stop)]
    weighted = np.zeros(box_shape, np.float32)
    weight_sum = np.zeros(box_shape, np.float32)
    origins = [plan["windows"][i] for i in plan["shards"][shard]]
    log.info("shard %d: %d windows of %d³ on %s (batch %d, tta %s)", shard, len(origins), window,
             dev, batch_size, tta)
    began = time.perf_counter()
    for first in range(0, len(origins), batch_size):
        chunk = origins[first:first + batch_size]
        batch = np.stack([_read_window(volume, o, window) for o in chunk])
        probabilities = _predict_with_backoff(net, batch, dev, tta)
        for origin, prob in zip(chunk, probabilities):
            local = tuple(slice(o - s, min(o + window, e) - s) for o, s, e in zip(origin, start, stop))
            extent = tuple(sl.stop - sl.start for sl in local)
            crop = tuple(slice(0, n) for n in extent)
            weighted[local] += prob[crop] * weights[crop]
            weight_sum[local] += weights[crop]
        done = min(first + batch_size, len(origins))
        if done == len(origins) or (first // batch_size) % 20 == 0:
            log.info("shard %d: %d/%d windows, %.1f s", shard, done, len(origins), time.perf_counter() - began)
    with atomic_output(output) as tmp:
        attrs = {"box_start": start, "box_stop": stop, "shape": plan["shape"], "shard": shard}
        create_volume(Path(tmp) / "weighted", box_shape, "float32", attrs=attrs)[...] = weighted
        create_volume(Path(tmp) / "weight", box_shape, "float32", attrs=attrs)[...] = weight_sum
    return Path(output)
