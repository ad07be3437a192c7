"""infer: run the U-Net over one shard's windows; write sum(w*p) and sum(w) over the shard's box.

Windows are batched; on CUDA the forward pass runs in mixed precision; on a GPU out-of-memory
error the batch is halved and retried. Optional flip test-time augmentation averages the
predictions of the window mirrored along x and y.

Speed (see README, "Performance"; every change is checked against the plain per-window reference
by tests/test_bench.py):

- the network is prepared for inference once: each BatchNorm is folded into the convolution
  before it and the weights and activations use the channels-last-3d memory layout (oneDNN's and
  cuDNN's fast path). Probabilities differ from the unprepared network by float32 rounding only
  (documented tolerance: 1e-4 absolute on probabilities; vesicle tables equal).
- the input is read as z slabs of whole window height, each read (and decompressed) once, not
  window by window (a 64³ window not aligned to the 64³ zarr chunks touches up to 8 chunks).
- ``sum(w*p)`` and ``sum(w)`` are accumulated with torch on the inference device when the
  shard's box fits there (a GPU no longer waits for the CPU to add each window), else on the CPU.
- shards are temporary: they are written without compression (zstd on float32 probabilities
  costs seconds and saves little).
"""

from __future__ import annotations

import copy
import json
import logging
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

from vesicleflow.io import atomic_output, read_json
from vesicleflow.model import load_model, pick_device
from vesicleflow.tiling import gaussian_importance, shard_box
from vesicleflow.volumes import DEFAULT_CHUNKS, open_volume

log = logging.getLogger(__name__)

FLIPS_XY = [(), (4,), (3,), (3, 4)]
#: Largest share of free GPU memory the two accumulators may take before they move to the CPU.
DEVICE_ACCUMULATOR_SHARE = 0.25
#: Prefix of the log line with the shard's timing (JSON), read by ``vesicleflow bench``.
STATS_PREFIX = "infer stats "


def prepare_for_inference(net: nn.Module, channels_last: bool = True) -> nn.Module:
    """A copy of ``net`` with every Conv3d -> BatchNorm3d pair folded into one Conv3d.

    In eval mode BatchNorm is an affine map per channel, so it folds exactly (up to float
    rounding) into the preceding convolution's weights and bias; the BatchNorm becomes an
    Identity. With ``channels_last`` the weights use the channels-last-3d layout.
    """
    from torch.nn.utils.fusion import fuse_conv_bn_eval

    net = copy.deepcopy(net).eval()
    for module in net.modules():
        if not isinstance(module, nn.Sequential):
            continue
        for i in range(len(module) - 1):
            conv, norm = module[i], module[i + 1]
            if isinstance(conv, nn.Conv3d) and isinstance(norm, nn.BatchNorm3d) and norm.track_running_stats:
                module[i] = fuse_conv_bn_eval(conv, norm)
                module[i + 1] = nn.Identity()
    if channels_last:
        net = net.to(memory_format=torch.channels_last_3d)
    return net


def _pad_window(data: np.ndarray, window: int) -> np.ndarray:
    """Pad a window cut at the volume's end to ``window``³ (mirror; edge when only 1 voxel thick)."""
    if data.shape != (window,) * 3:
        data = np.pad(data, [(0, window - s) for s in data.shape], mode="reflect" if min(data.shape) > 1 else "edge")
    return data


def _read_window(volume, origin, window: int) -> np.ndarray:
    """A window of the volume, padded where the volume is smaller (the per-window reference path)."""
    box = tuple(slice(o, min(o + window, n)) for o, n in zip(origin, volume.shape))
    return _pad_window(np.asarray(volume[box], dtype=np.float32), window)


class _SlabReader:
    """Windows cut from z slabs of the volume: each slab [z, z + window) over the shard's y/x box
    is read once; windows arrive in z order, so at most two slabs are held."""

    def __init__(self, volume, window: int, box_start, box_stop):
        self.volume, self.window = volume, window
        self.y0, self.y1, self.x0, self.x1 = box_start[1], box_stop[1], box_start[2], box_stop[2]
        self.slabs: dict[int, np.ndarray] = {}

    def window_at(self, origin) -> np.ndarray:
        z, y, x = origin
        if z not in self.slabs:
            for old in [k for k in self.slabs if k < z]:
                del self.slabs[old]
            stop = min(z + self.window, self.volume.shape[0])
            self.slabs[z] = np.asarray(self.volume[z:stop, self.y0:self.y1, self.x0:self.x1], dtype=np.float32)
        slab = self.slabs[z]
        w = self.window
        data = slab[:, y - self.y0: y - self.y0 + w, x - self.x0: x - self.x0 + w]
        return _pad_window(data, w)


@torch.inference_mode()
def predict_batch(net, batch: np.ndarray | torch.Tensor, device: torch.device, tta: bool,
                  channels_last: bool = False) -> torch.Tensor:
    """Sigmoid probabilities (float32 tensor on ``device``) for a batch of windows (N, D, H, W)."""
    x = torch.as_tensor(batch)[:, None].to(device, non_blocking=True)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last_3d)
    flips = FLIPS_XY if tta else [()]
    total = None
    for dims in flips:
        xin = torch.flip(x, dims) if dims else x
        with torch.autocast(device_type=device.type, dtype=torch.float16, enabled=device.type == "cuda"):
            logits = net(xin)
        prob = torch.sigmoid(logits.float())
        prob = torch.flip(prob, dims) if dims else prob
        total = prob if total is None else total + prob
    return (total / len(flips))[:, 0].contiguous()


def _predict_with_backoff(net, batch, device, tta, channels_last=False) -> torch.Tensor:
    """Predict, halving the batch on CUDA out-of-memory until a single window fails."""
    try:
        return predict_batch(net, batch, device, tta, channels_last)
    except torch.OutOfMemoryError:
        if len(batch) == 1:
            raise
        torch.cuda.empty_cache()
        half = len(batch) // 2
        log.warning("GPU out of memory with a batch of %d windows; retrying with %d", len(batch), half)
        return torch.cat([_predict_with_backoff(net, batch[:half], device, tta, channels_last),
                          _predict_with_backoff(net, batch[half:], device, tta, channels_last)])


def _accumulator_device(device: torch.device, box_shape) -> torch.device:
    """The inference device if both accumulators fit comfortably in its free memory, else the CPU."""
    if device.type != "cuda":
        return torch.device("cpu")
    free, _ = torch.cuda.mem_get_info(device)
    need = 2 * 4 * int(np.prod(box_shape))
    return device if need <= DEVICE_ACCUMULATOR_SHARE * free else torch.device("cpu")


def _write_shard(output, weighted: np.ndarray, weight_sum: np.ndarray, attrs: dict) -> None:
    """The shard: two float32 zarr arrays ``weighted`` and ``weight`` with the box in their attrs
    (read by stitch); uncompressed, as it is temporary."""
    import zarr

    with atomic_output(output) as tmp:
        for name, data in (("weighted", weighted), ("weight", weight_sum)):
            chunks = tuple(min(c, s) for c, s in zip(DEFAULT_CHUNKS, data.shape))
            array = zarr.create_array(store=str(Path(tmp) / name), shape=data.shape, chunks=chunks,
                                      dtype="float32", fill_value=0, compressors=None, overwrite=True)
            array.attrs.update(attrs)
            array[...] = data


def infer_shard(normalized: str | Path, plan_path: str | Path, shard: int, output: str | Path,
                model: str | Path | None = None, batch_size: int = 4, tta: bool = False,
                device: str = "auto", threads: int | None = None) -> Path:
    """Predict every window of ``shard`` and write the weighted accumulations as a zarr."""
    started = time.perf_counter()
    plan = read_json(plan_path)
    if not 0 <= shard < len(plan["shards"]):
        raise ValueError(f"shard {shard} does not exist; the plan has {len(plan['shards'])}")
    if threads:
        torch.set_num_threads(threads)
    torch.manual_seed(0)
    dev = pick_device(device)
    net, _ = load_model(model, dev)
    net = prepare_for_inference(net)
    volume = open_volume(normalized)
    window = plan["window"]
    start, stop = shard_box(plan, shard)
    box_shape = [b - a for a, b in zip(start, stop)]
    acc_dev = _accumulator_device(dev, box_shape)
    weights = torch.from_numpy(gaussian_importance(window)).to(acc_dev)
    weighted = torch.zeros(box_shape, dtype=torch.float32, device=acc_dev)
    weight_sum = torch.zeros(box_shape, dtype=torch.float32, device=acc_dev)
    origins = [plan["windows"][i] for i in plan["shards"][shard]]
    reader = _SlabReader(volume, window, start, stop)
    log.info("shard %d: %d windows of %d³ on %s (batch %d, tta %s, accumulating on %s)", shard, len(origins),
             window, dev, batch_size, tta, acc_dev)
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    began = time.perf_counter()
    read_s = forward_s = accumulate_s = 0.0
    for first in range(0, len(origins), batch_size):
        chunk = origins[first:first + batch_size]
        t0 = time.perf_counter()
        batch = np.stack([reader.window_at(o) for o in chunk])
        t1 = time.perf_counter()
        probabilities = _predict_with_backoff(net, batch, dev, tta, channels_last=True).to(acc_dev)
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        t2 = time.perf_counter()
        for origin, prob in zip(chunk, probabilities):
            local = tuple(slice(o - s, min(o + window, e) - s) for o, s, e in zip(origin, start, stop))
            crop = tuple(slice(0, sl.stop - sl.start) for sl in local)
            weighted[local] += prob[crop] * weights[crop]
            weight_sum[local] += weights[crop]
        t3 = time.perf_counter()
        read_s, forward_s, accumulate_s = read_s + t1 - t0, forward_s + t2 - t1, accumulate_s + t3 - t2
        done = min(first + batch_size, len(origins))
        if done == len(origins) or (first // batch_size) % 20 == 0:
            log.info("shard %d: %d/%d windows, %.1f s", shard, done, len(origins), time.perf_counter() - began)
    t0 = time.perf_counter()
    attrs = {"box_start": start, "box_stop": stop, "shape": plan["shape"], "shard": shard}
    _write_shard(output, weighted.cpu().numpy(), weight_sum.cpu().numpy(), attrs)
    stats = {"windows": len(origins), "window": window, "batch_size": batch_size, "device": str(dev),
             "box_voxels": int(np.prod(box_shape)), "read_s": round(read_s, 3),
             "forward_s": round(forward_s, 3), "accumulate_s": round(accumulate_s, 3),
             "write_s": round(time.perf_counter() - t0, 3), "total_s": round(time.perf_counter() - started, 3)}
    if dev.type == "cuda":
        stats["gpu_peak_memory_mb"] = round(torch.cuda.max_memory_allocated(dev) / 2**20, 1)
    log.info("%s%s", STATS_PREFIX, json.dumps(stats))
    return Path(output)
