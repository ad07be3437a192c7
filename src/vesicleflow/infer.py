"""infer: run the U-Net over one shard's windows; write the shard's probability sum(w*p)/sum(w) and its
weight sum(w) over the shard's box (a plan's only shard, which covers the volume: no weight).

Windows are batched; on CUDA the forward pass runs in mixed precision (float16 autocast by
default); on the CPU in float32 by default, or in bfloat16 when asked (``precision``: 2-3x faster
where the CPU has AMX or AVX512-BF16, results to bfloat16 rounding); on a GPU out-of-memory error
the batch is halved and retried. Optional flip test-time augmentation averages the
predictions of the window mirrored along x and y.

Speed (README, "Performance"; tests/test_bench.py checks every change against the plain
per-window reference: weights equal, probabilities within 1e-4, vesicle tables equal):

- the network is rewritten once for inference (:class:`FastUNet`): each BatchNorm is folded into
  the convolution before it; on the CPU each convolution and its ReLU run as one oneDNN operation;
  the decoder's ``conv(cat(upsample(x), skip))`` becomes ``conv(skip) + upconv(x)`` (no
  concatenated copy), where a nearest 2x upsampling followed by a 3x3x3 convolution is computed
  exactly as one stride-2 transposed convolution with a 4x4x4 kernel (8 instead of 27
  multiply-adds per output voxel and input channel, and no upsampled copy); tensors use the
  channels-last-3d layout. The results differ from the plain network by float32 rounding only.
- the input is read as z slabs of whole window height, each read (and decompressed) once, not
  window by window (a 64³ window not aligned to the 64³ zarr chunks touches up to 8 chunks), the
  next slab on a thread while the network runs.
- ``sum(w*p)`` is accumulated with torch, on the GPU when it fits there (the GPU no longer waits
  for the CPU to add each window), on the CPU with the job's threads, for a few chunk rows of
  planes at a time (:class:`_Accumulator`): each chunk row is divided by its ``sum(w)`` and written
  as soon as no later window reaches it.
- the input slabs and the accumulators reuse their memory from slab to slab and row to row.
- the ``infer`` command keeps freed memory for reuse (:mod:`vesicleflow.allocator`): each batch's
  activations reuse the last batch's pages instead of being faulted in and zeroed again.
- the shard stores its probability already divided by its weight: a shard that covers the whole
  volume is then the probability map itself, which stitch links instead of recomputing. It is
  written without compression, like the probability map (zstd costs CPU time and saves ~30 % on
  probabilities); ``sum(w)`` keeps zarr's default codec (it shrinks 16x). A plan's only shard
  (the default) is written without ``sum(w)``: with no other shard to weigh it against, the map is
  its probability whatever its weight, and compressing 133 M weights took 0.9 s.
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

from vesicleflow.io import InputError, atomic_output, read_json
from vesicleflow.model import load_model, pick_device
from vesicleflow.tiling import gaussian_importance, shard_box
from vesicleflow.volumes import DEFAULT_CHUNKS, create_volume, open_volume, read_box, write_block

log = logging.getLogger(__name__)

FLIPS_XY = [(), (4,), (3,), (3, 4)]
#: Default windows per forward pass. CPU: larger batches gain nothing. H100, bundled model, fp16:
#: 555 / 730 / 750 / 715 M window voxels/s at batches of 4 / 8 / 16 / 32.
CPU_BATCH_SIZE, CUDA_BATCH_SIZE = 4, 16
#: Largest share of free GPU memory the two accumulators may take before they move to the CPU.
DEVICE_ACCUMULATOR_SHARE = 0.25
#: y rows of a chunk row whose sum(w) is summed at a time when the shard's weight is not written.
WEIGHT_TILE_ROWS = 64
#: Prefix of the log line with the shard's timing (JSON), read by ``vesicleflow bench``.
STATS_PREFIX = "infer stats "
#: What the network computes in. ``auto``: float16 autocast on CUDA, float32 on the CPU (the
#: network's own arithmetic to float32 rounding). ``bfloat16``: on the CPU weights and activations
#: are bfloat16 (oneDNN accumulates in float32), on CUDA bfloat16 autocast. ``float16``: CUDA only.
PRECISIONS = ("auto", "float32", "bfloat16", "float16")


def default_batch_size(device: torch.device) -> int:
    """Windows per forward pass when none is asked for: :data:`CUDA_BATCH_SIZE` on CUDA, else
    :data:`CPU_BATCH_SIZE`."""
    return CUDA_BATCH_SIZE if device.type == "cuda" else CPU_BATCH_SIZE


def compute_dtype(precision: str, device: torch.device) -> torch.dtype:
    """The dtype the network computes in for ``precision`` (one of :data:`PRECISIONS`) on ``device``."""
    if precision not in PRECISIONS:
        raise InputError(f"precision {precision!r} is not one of {', '.join(PRECISIONS)}")
    if precision == "auto":
        return torch.float16 if device.type == "cuda" else torch.float32
    if precision == "float16" and device.type != "cuda":
        raise InputError("precision float16 needs a CUDA device; on the CPU use bfloat16 or float32")
    return getattr(torch, precision)


def cpu_has_native_bfloat16() -> bool:
    """Whether this CPU multiplies bfloat16 in hardware (AMX tiles or AVX512-BF16); without it oneDNN
    emulates bfloat16 and the network may run slower than in float32."""
    return any(getattr(torch.cpu, probe, lambda: False)()
               for probe in ("_is_amx_tile_supported", "_is_avx512_bf16_supported"))


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


def upsample_conv_kernel(weight: torch.Tensor) -> torch.Tensor:
    """Transposed-convolution kernel (in, out, 4, 4, 4) equal to nearest 2x upsampling followed by
    the 3x3x3 convolution ``weight`` (out, in, 3, 3, 3), padding 1.

    Along one axis, output 2i sees inputs i-1, i, i (taps w0, w1, w2) and output 2i+1 sees i, i,
    i+1, so the upsampled convolution is a stride-2 transposed convolution (padding 1) with the
    taps [w2, w1 + w2, w0 + w1, w0]; zero padding maps to zero padding. The 3D kernel is the
    same rule applied along each axis.
    """
    kernel = weight
    for axis in (2, 3, 4):
        k = kernel.movedim(axis, -1)
        k = torch.stack([k[..., 2], k[..., 1] + k[..., 2], k[..., 0] + k[..., 1], k[..., 0]], dim=-1)
        kernel = k.movedim(-1, axis)
    return kernel.transpose(0, 1).contiguous()


def _block_convs(block: nn.Module) -> list[nn.Conv3d]:
    """The convolutions of a prepared block (Conv3d, Identity, ReLU)*; ValueError if it is not one."""
    layers = list(block)
    convs = [m for m in layers if isinstance(m, nn.Conv3d)]
    relus = [m for m in layers if isinstance(m, nn.ReLU)]
    if (len(convs) != len(relus) or len(convs) + len(relus) + sum(isinstance(m, nn.Identity) for m in layers)
            != len(layers) or any(not isinstance(a, nn.Conv3d) for a in layers[::3])):
        raise ValueError(f"unexpected block {block}")
    for conv in convs:
        if conv.stride != (1, 1, 1) or conv.dilation != (1, 1, 1) or conv.groups != 1 or conv.padding_mode != "zeros":
            raise ValueError(f"unexpected convolution {conv}")
    return convs


class FastUNet(nn.Module):
    """:class:`~vesicleflow.model.UNet3d` rewritten for inference (see the module docstring).

    ``fused``: run conv + ReLU and conv + add + ReLU as single oneDNN operations (CPU only);
    otherwise the same arithmetic with plain torch operations (any device, autocast, FLOP counting).
    """

    def __init__(self, net: nn.Module, fused: bool = True, channels_last: bool = True):
        super().__init__()
        arch = net.arch
        prepared = prepare_for_inference(net, channels_last=False)
        fmt = torch.channels_last_3d if channels_last else torch.contiguous_format
        self.fused = fused
        self.encoder = nn.ModuleList(nn.ModuleList(_block_convs(b)) for b in prepared.encoder)
        self.bottom = nn.ModuleList(_block_convs(prepared.bottom))
        self.decoder = nn.ModuleList(nn.ModuleList(_block_convs(b)[1:]) for b in prepared.decoder)
        self.head = prepared.head
        self.transposed = arch.upsample == "nearest" and arch.kernel_size == 3
        self.mode = arch.upsample
        self.up_weights, self.skip_weights, self.up_bias = [], [], []
        for block, skip in zip(prepared.decoder, reversed([b[-1].out_channels for b in self.encoder])):
            first = _block_convs(block)[0]
            n_up = first.in_channels - skip
            up = first.weight[:, :n_up]
            up = upsample_conv_kernel(up) if self.transposed else up
            self.up_weights.append(nn.Parameter(up.contiguous(memory_format=fmt), requires_grad=False))
            self.skip_weights.append(nn.Parameter(first.weight[:, n_up:].contiguous(memory_format=fmt),
                                                  requires_grad=False))
            self.up_bias.append(nn.Parameter(first.bias.detach().clone(), requires_grad=False))
        self.up_weights = nn.ParameterList(self.up_weights)
        self.skip_weights = nn.ParameterList(self.skip_weights)
        self.up_bias = nn.ParameterList(self.up_bias)
        self.padding = arch.kernel_size // 2
        self.to(memory_format=fmt)

    def _conv_relu(self, x, conv: nn.Conv3d):
        if self.fused:
            return torch.ops.mkldnn._convolution_pointwise(x, conv.weight, conv.bias, list(conv.padding), [1, 1, 1],
                                                           [1, 1, 1], 1, "relu", [], "")
        return torch.relu_(conv(x))

    def _conv_add_relu(self, skip, up, weight):
        p = [self.padding] * 3
        if self.fused:
            return torch.ops.mkldnn._convolution_pointwise.binary(skip, up, weight, None, p, [1, 1, 1], [1, 1, 1], 1,
                                                                  "add", None, "relu", [], "")
        return torch.relu_(nn.functional.conv3d(skip, weight, None, padding=p).add_(up))

    def _upconv(self, x, weight, bias):
        if self.transposed:
            return nn.functional.conv_transpose3d(x, weight, bias, stride=2, padding=1)
        x = nn.functional.interpolate(x, scale_factor=2, mode=self.mode)
        return nn.functional.conv3d(x, weight, bias, padding=self.padding)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skips = []
        for block in self.encoder:
            for conv in block:
                x = self._conv_relu(x, conv)
            skips.append(x)
            x = nn.functional.max_pool3d(x, 2)
        for conv in self.bottom:
            x = self._conv_relu(x, conv)
        for block, skip, up_w, skip_w, up_b in zip(self.decoder, reversed(skips), self.up_weights,
                                                   self.skip_weights, self.up_bias):
            x = self._conv_add_relu(skip, self._upconv(x, up_w, up_b), skip_w)
            for conv in block:
                x = self._conv_relu(x, conv)
        return self.head(x)


def stored_dtype(device: torch.device, dtype: torch.dtype) -> torch.dtype:
    """The dtype of the network's weights and inputs when it computes in ``dtype``: ``dtype`` itself
    on the CPU; float32 on CUDA, where :func:`autocast_to` casts per operation."""
    return torch.float32 if device.type == "cuda" else dtype


def autocast_to(device: torch.device, dtype: torch.dtype):
    """Autocast to ``dtype`` where the network is stored in float32 for it (CUDA); else nothing."""
    if stored_dtype(device, dtype) != dtype:
        return torch.autocast(device_type=device.type, dtype=dtype)
    return contextlib.nullcontext()


def dtype_name(dtype: torch.dtype) -> str:
    """``torch.bfloat16`` -> ``"bfloat16"`` (logs and the bench's report)."""
    return str(dtype).removeprefix("torch.")


def _fused_ops_available() -> bool:
    return (torch.backends.mkldnn.is_available() and hasattr(torch.ops, "mkldnn")
            and hasattr(torch.ops.mkldnn, "_convolution_pointwise"))


@contextlib.contextmanager
def _exact_cuda_convolutions():
    """cuDNN convolutions without TF32 (its default on CUDA): TF32 rounds to ~1e-3, so the
    rewrite check would compare rounding, not arithmetic."""
    allowed = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32 = allowed


def inference_network(net: nn.Module, device: torch.device,
                      dtype: torch.dtype = torch.float32) -> tuple[nn.Module, str]:
    """The fastest exact-to-rounding form of ``net`` for ``device``, and its name.

    The rewrite is checked once on a small random input against the plain network; any failure
    or difference above 1e-3 in the logits falls back to the next simpler form (fused CPU ops ->
    plain-op rewrite -> BatchNorm folding only). The form is then stored in
    :func:`stored_dtype` (on the CPU ``dtype`` itself: it must run in it, else the next is tried;
    on CUDA float32, and :func:`predict_batch` autocasts to ``dtype``)."""
    net = net.eval()
    candidates = []
    if device.type == "cpu" and _fused_ops_available():
        candidates.append(("fast-fused", lambda: FastUNet(net, fused=True)))
    candidates.append(("fast", lambda: FastUNet(net, fused=False)))
    stored = stored_dtype(device, dtype)
    side = 2 * net.arch.divisor
    probe = torch.randn(1, net.arch.in_channels, side, side, side, generator=torch.Generator().manual_seed(0))
    probe = probe.to(device).contiguous(memory_format=torch.channels_last_3d)
    with torch.inference_mode(), _exact_cuda_convolutions():
        expected = net(probe).float()
        for name, build in candidates:
            try:
                candidate = build().to(device)
                got = candidate(probe).float()
                if float((got - expected).abs().max()) > 1e-3:
                    log.warning("inference rewrite %s differs from the network; not used", name)
                    continue
                if stored != torch.float32:
                    candidate = candidate.to(stored)
                    candidate(probe.to(stored))
                return candidate, name
            except (RuntimeError, ValueError, AttributeError, TypeError, NotImplementedError) as err:
                log.info("inference rewrite %s unavailable (%s)", name, str(err).splitlines()[0] if str(err) else err)
    return prepare_for_inference(net).to(device, stored), "folded"


def _pad_window(data: np.ndarray, window: int) -> np.ndarray:
    """Pad a window cut at the volume's end to ``window``³ (mirror; edge when only 1 voxel thick)."""
    if data.shape != (window,) * 3:
        data = np.pad(data, [(0, window - s) for s in data.shape], mode="reflect" if min(data.shape) > 1 else "edge")
    return data


def _read_window(volume, origin, window: int) -> np.ndarray:
    """A window of the volume, padded where the volume is smaller (the per-window reference path)."""
    box = tuple(slice(o, min(o + window, n)) for o, n in zip(origin, volume.shape))
    return _pad_window(read_box(volume, box).astype(np.float32, copy=False), window)


class _SlabReader:
    """Windows cut from z slabs of the volume: each slab [z, z + window) over the shard's y/x box
    is read once, and the next one is read ahead on a thread while the network runs on this one.
    Windows arrive in z order, so two slab buffers suffice, reused from slab to slab (a 768 x 768
    slab is 151 MB: new pages for each took longer than reading it)."""

    def __init__(self, volume, window: int, box_start, box_stop, origins):
        from concurrent.futures import ThreadPoolExecutor

        self.volume, self.window = volume, window
        self.y0, self.y1, self.x0, self.x1 = box_start[1], box_stop[1], box_start[2], box_stop[2]
        self.row_starts = sorted({int(o[0]) for o in origins})
        self.slabs: dict[int, tuple[np.ndarray, np.ndarray]] = {}  # z -> (buffer, slab)
        self.free: list[np.ndarray] = []
        self.ahead = ThreadPoolExecutor(1, thread_name_prefix="read-ahead")
        self.pending = None  # (z, buffer, future) of the slab being read ahead
        if self.row_starts:  # the first slab, while the caller gets ready (loads the network)
            self._read_ahead(self.row_starts[0])

    def __enter__(self) -> _SlabReader:
        return self

    def __exit__(self, *exc) -> None:
        self.ahead.shutdown(wait=True, cancel_futures=True)

    def batch(self, origins) -> np.ndarray:
        """The windows at ``origins`` (z order), copied into one new (N, window, window, window) array:
        a window is a view of a slab buffer that the next slab may reuse."""
        w = self.window
        out = np.empty((len(origins), w, w, w), np.float32)
        for target, origin in zip(out, origins):
            target[...] = self._window_at(origin)
        return out

    def _read_slab(self, z: int, buffer: np.ndarray) -> np.ndarray:
        box = (slice(z, min(z + self.window, self.volume.shape[0])), slice(self.y0, self.y1), slice(self.x0, self.x1))
        return read_box(self.volume, box, out=buffer).astype(np.float32, copy=False)

    def _buffer(self) -> np.ndarray:
        return self.free.pop() if self.free else np.empty(
            (self.window, self.y1 - self.y0, self.x1 - self.x0), self.volume.dtype)

    def _slab(self, z: int) -> np.ndarray:
        if z not in self.slabs:
            for old in [k for k in self.slabs if k < z]:
                self.free.append(self.slabs.pop(old)[0])
            if self.pending is not None:
                ahead_z, buffer, future = self.pending
                self.pending = None
                slab = future.result()
                if ahead_z == z:
                    self.slabs[z] = buffer, slab
                else:
                    self.free.append(buffer)
            if z not in self.slabs:
                buffer = self._buffer()
                self.slabs[z] = buffer, self._read_slab(z, buffer)
            following = [r for r in self.row_starts if r > z]
            if following:
                self._read_ahead(following[0])
        return self.slabs[z][1]

    def _read_ahead(self, z: int) -> None:
        buffer = self._buffer()
        self.pending = z, buffer, self.ahead.submit(self._read_slab, z, buffer)

    def _window_at(self, origin) -> np.ndarray:
        z, y, x = origin
        slab = self._slab(z)
        w = self.window
        data = slab[:, y - self.y0: y - self.y0 + w, x - self.x0: x - self.x0 + w]
        return _pad_window(data, w)


@torch.inference_mode()
def predict_batch(net, batch: np.ndarray | torch.Tensor, device: torch.device, tta: bool,
                  channels_last: bool = False, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Sigmoid probabilities (float32 tensor on ``device``) for a batch of windows (N, D, H, W), the
    network computing in ``dtype`` (on the CPU the network's own, see :func:`inference_network`;
    on CUDA by autocast)."""
    x = torch.as_tensor(batch)[:, None].to(device, non_blocking=True)
    x = x.to(dtype=stored_dtype(device, dtype),
             memory_format=torch.channels_last_3d if channels_last else torch.preserve_format)
    flips = FLIPS_XY if tta else [()]
    total = None
    for dims in flips:
        xin = torch.flip(x, dims) if dims else x
        with autocast_to(device, dtype):
            logits = net(xin)
        prob = torch.sigmoid(logits.float())
        prob = torch.flip(prob, dims) if dims else prob
        total = prob if total is None else total + prob
    return (total / len(flips))[:, 0].contiguous()


def _predict_with_backoff(net, batch, device, tta, channels_last=False, dtype=torch.float32) -> torch.Tensor:
    """Predict, halving the batch on CUDA out-of-memory until a single window fails."""
    try:
        return predict_batch(net, batch, device, tta, channels_last, dtype)
    except torch.OutOfMemoryError:
        if len(batch) == 1:
            raise
        torch.cuda.empty_cache()
        half = len(batch) // 2
        log.warning("GPU out of memory with a batch of %d windows; retrying with %d", len(batch), half)
        return torch.cat([_predict_with_backoff(net, batch[:half], device, tta, channels_last, dtype),
                          _predict_with_backoff(net, batch[half:], device, tta, channels_last, dtype)])


def _accumulator_device(device: torch.device, planes: int, plane_shape) -> torch.device:
    """The inference device if ``planes`` float32 planes (the accumulator's) fit comfortably in its
    free memory, else the CPU."""
    if device.type != "cuda":
        return torch.device("cpu")
    free, _ = torch.cuda.mem_get_info(device)
    need = 4 * planes * int(np.prod(plane_shape))
    return device if need <= DEVICE_ACCUMULATOR_SHARE * free else torch.device("cpu")


def accumulator_planes(window: int, box_depth: int, chunk: int = DEFAULT_CHUNKS[0]) -> int:
    """z planes of the sum(w*p) ring: whole chunk rows enough for the planes still open (from the
    chunk row of the current window's first plane to its last, at most ``chunk - 1 + window``)."""
    rows = -(-(chunk - 1 + window) // chunk)
    return min(rows, -(-box_depth // chunk)) * chunk


class _Accumulator:
    """sum(w*p) over a shard's box, a torch tensor on ``device`` (on the CPU torch's elementwise
    kernels use the job's threads; numpy, on one core, took twice as long per window), and sum(w).

    Windows arrive in z order, so a plane below the current window's first is final. sum(w*p) is
    kept for :func:`accumulator_planes` planes only, as a ring (box plane z at slot z mod depth),
    and each chunk row of planes is handed out (:meth:`finished_rows`) once it is final, then its
    slots are zeroed for the planes to come. sum(w) depends on where the windows lie alone, so it
    is not kept as a second ring: each row's is summed when the row is handed out, from the windows
    that reach it, in the order they came (the same float32 additions in the same order as a
    running sum). A plan's only shard is written without its weight (``keep_weight`` False), so
    sum(w) is then summed :data:`WEIGHT_TILE_ROWS` y rows at a time. For the largest benchmark
    tomogram that is 0.31 GB taken once (a 302 MB ring and a 13 MB tile; 151 MB for a whole row
    when the weight is kept) instead of 0.6 GB (two rings) or 1.06 GB (whole-box sums); new memory
    is the dearest part of starting infer on a host that must supply it. The shard is written
    during inference, not after it.
    """

    def __init__(self, box_shape, window: int, weights: np.ndarray, device: torch.device,
                 chunk: int = DEFAULT_CHUNKS[0], keep_weight: bool = True):
        self.box_shape, self.chunk, self.keep_weight = tuple(box_shape), chunk, keep_weight
        self.depth = accumulator_planes(window, box_shape[0], chunk)
        self.weighted = torch.zeros((self.depth, *box_shape[1:]), dtype=torch.float32, device=device)
        self.tile_rows = box_shape[1] if keep_weight else min(WEIGHT_TILE_ROWS, box_shape[1])
        self.weight_tile = torch.empty((min(chunk, box_shape[0]), self.tile_rows, box_shape[2]),
                                       dtype=torch.float32, device=device)
        self.weights = torch.from_numpy(weights).to(device)
        self.product = torch.empty_like(self.weights)
        self.device = device
        self.placed: list[tuple] = []  # (local, crop) of the windows added that reach planes not handed out
        self.handed_out = 0  # box planes below this were handed out

    @staticmethod
    def planes(window: int, box_shape, chunk: int = DEFAULT_CHUNKS[0]) -> int:
        """The float32 planes of the box's y/x size that an accumulator holds at most: its ring and a row."""
        return accumulator_planes(window, box_shape[0], chunk) + min(chunk, box_shape[0])

    def add(self, local, crop, probability: torch.Tensor) -> None:
        """Add a window's ``probability[crop]`` at the box region ``local`` (its planes not handed out)."""
        w, product = self.weights[crop], self.product[crop]
        torch.mul(probability[crop], w, out=product)  # rounded, then added: never a fused multiply-add
        z0, z1 = local[0].start, local[0].stop
        if z0 < self.handed_out or z1 - z0 > self.depth:
            raise ValueError(f"planes {z0}-{z1} are outside the accumulators' planes from {self.handed_out}")
        slot = z0 % self.depth
        split = min(z1 - z0, self.depth - slot)  # the ring wraps after ``split`` planes
        for (a, b), (pa, pb) in (((slot, slot + split), (0, split)), ((0, z1 - z0 - split), (split, z1 - z0))):
            if b > a:
                self.weighted[(slice(a, b), *local[1:])].add_(product[pa:pb])
        self.placed.append((local, crop))

    def _weight_of_tile(self, z0: int, z1: int, y0: int, y1: int) -> torch.Tensor:
        """sum(w) over box planes [z0, z1) and y rows [y0, y1), in the tile buffer: the windows'
        weights in the order added."""
        weight = self.weight_tile[:z1 - z0, :y1 - y0]
        weight.zero_()
        for local, crop in self.placed:
            a, b = max(local[0].start, z0), min(local[0].stop, z1)
            ya, yb = max(local[1].start, y0), min(local[1].stop, y1)
            if a < b and ya < yb:
                z, y = local[0].start, local[1].start
                weight[a - z0:b - z0, ya - y0:yb - y0, local[2]].add_(self.weights[crop][a - z:b - z, ya - y:yb - y])
        return weight

    def finished_rows(self, below: int):
        """Yield ``(z, probability, weight)`` for each chunk row of planes that ends at or below box
        plane ``below`` (or at the box's end) and was not yet handed out: sum(w*p) / sum(w) (0 where
        no window of the shard reaches) and sum(w) (None unless ``keep_weight``), numpy arrays valid
        until the next row is asked for; its slots are then zeroed. Without ``keep_weight`` a voxel
        that no window reaches is an error (the shard is the whole plan)."""
        while self.handed_out < self.box_shape[0]:
            z0 = self.handed_out
            z1 = min(z0 + self.chunk, self.box_shape[0])
            if z1 > below:
                return
            weighted = self.weighted[z0 % self.depth: z0 % self.depth + z1 - z0]
            for y0 in range(0, self.box_shape[1], self.tile_rows):
                y1 = min(y0 + self.tile_rows, self.box_shape[1])
                weight = self._weight_of_tile(z0, z1, y0, y1)
                if not self.keep_weight and not weight.min() > 0:
                    raise RuntimeError(f"the plan's only shard leaves voxels that no window reaches "
                                       f"(box planes {z0}-{z1})")
                weighted[:, y0:y1].div_(weight)
            weighted.nan_to_num_(nan=0.0)  # 0 / 0: voxels of the box that none of its windows reach
            yield z0, weighted.cpu().numpy(), weight.cpu().numpy() if self.keep_weight else None
            weighted.zero_()
            self.handed_out = z1
            self.placed = [(local, crop) for local, crop in self.placed if local[0].stop > z1]


class _ShardWriter:
    """The shard being written, a chunk row of planes at a time, in an atomic temporary: float32 zarr
    arrays ``probability`` and (for a plan with other shards) ``weight`` with the box in their attrs
    (read by stitch). ``probability`` is laid out as stitch's probability map
    (:func:`vesicleflow.volumes.create_volume`: uncompressed), so a shard covering the whole volume
    can become that map as it is; ``weight`` (smooth and periodic) is compressed with zarr's
    default codec (16x smaller, quickly)."""

    def __init__(self, tmp: Path, box_shape, attrs: dict):
        import zarr

        self.probability = create_volume(tmp / "probability", box_shape, "float32", attrs=attrs)
        self.weight = None
        if not attrs["only_shard"]:
            chunks = tuple(min(c, s) for c, s in zip(DEFAULT_CHUNKS, box_shape))
            self.weight = zarr.create_array(store=str(tmp / "weight"), shape=tuple(box_shape), chunks=chunks,
                                            dtype="float32", fill_value=0, overwrite=True)
            self.weight.attrs.update(attrs)
        self.seconds = 0.0

    def write(self, z: int, probability: np.ndarray, weight: np.ndarray | None) -> None:
        began = time.perf_counter()
        write_block(self.probability, (z, 0, 0), probability)
        if self.weight is not None:
            write_block(self.weight, (z, 0, 0), weight)
        self.seconds += time.perf_counter() - began


def infer_shard(normalized: str | Path, plan_path: str | Path, shard: int, output: str | Path,
                model: str | Path | None = None, batch_size: int | None = None, tta: bool = False,
                device: str = "auto", threads: int | None = None, precision: str = "auto") -> Path:
    """Predict every window of ``shard`` and write its probability (and, when the plan has other
    shards, its weight) as a zarr; the network computes in ``precision`` (:data:`PRECISIONS`)."""
    started = time.perf_counter()
    plan = read_json(plan_path)
    if not 0 <= shard < len(plan["shards"]):
        raise ValueError(f"shard {shard} does not exist; the plan has {len(plan['shards'])}")
    if threads:
        torch.set_num_threads(threads)
    torch.manual_seed(0)
    dev = pick_device(device)
    dtype = compute_dtype(precision, dev)
    if dev.type == "cpu" and dtype == torch.bfloat16 and not cpu_has_native_bfloat16():
        log.warning("this CPU has no AMX or AVX512-BF16: bfloat16 is emulated and may be slower than float32")
    batch_size = batch_size or default_batch_size(dev)
    volume = open_volume(normalized)
    window = plan["window"]
    start, stop = shard_box(plan, shard)
    origins = [plan["windows"][i] for i in plan["shards"][shard]]
    with contextlib.ExitStack() as stack:
        # the reader starts on the first slab at once: it is read while the network loads
        reader = stack.enter_context(_SlabReader(volume, window, start, stop, origins))
        net, _ = load_model(model, dev)
        net, form = inference_network(net, dev, dtype)
        box_shape = [b - a for a, b in zip(start, stop)]
        only_shard = len(plan["shards"]) == 1
        acc_device = _accumulator_device(dev, _Accumulator.planes(window, box_shape), box_shape[1:])
        acc = _Accumulator(box_shape, window, gaussian_importance(window), acc_device,
                           keep_weight=not only_shard)
        log.info("shard %d: %d windows of %d³ on %s (network %s in %s, batch %d, tta %s, accumulating on %s)",
                 shard, len(origins), window, dev, form, dtype_name(dtype), batch_size, tta, acc.device)
        if dev.type == "cuda":
            torch.cuda.reset_peak_memory_stats(dev)
        attrs = {"box_start": start, "box_stop": stop, "shape": plan["shape"], "shard": shard,
                 "only_shard": only_shard}
        began = time.perf_counter()
        setup_s = began - started
        read_s = forward_s = accumulate_s = 0.0
        tmp = stack.enter_context(atomic_output(output))
        writer = _ShardWriter(Path(tmp), box_shape, attrs)
        for first in range(0, len(origins), batch_size):
            chunk = origins[first:first + batch_size]
            t0 = time.perf_counter()
            batch = reader.batch(chunk)
            t1 = time.perf_counter()
            probabilities = _predict_with_backoff(net, batch, dev, tta, True, dtype).to(acc.device)
            if dev.type == "cuda":
                torch.cuda.synchronize(dev)
            t2 = time.perf_counter()
            written_s = writer.seconds
            for origin, prob in zip(chunk, probabilities):
                local = tuple(slice(o - s, min(o + window, e) - s) for o, s, e in zip(origin, start, stop))
                for row in acc.finished_rows(local[0].start):
                    writer.write(*row)
                acc.add(local, tuple(slice(0, sl.stop - sl.start) for sl in local), prob)
            t3 = time.perf_counter()
            read_s, forward_s = read_s + t1 - t0, forward_s + t2 - t1
            accumulate_s += t3 - t2 - (writer.seconds - written_s)
            done = min(first + batch_size, len(origins))
            if done == len(origins) or (first // batch_size) % 20 == 0:
                log.info("shard %d: %d/%d windows, %.1f s", shard, done, len(origins), time.perf_counter() - began)
        for row in acc.finished_rows(box_shape[0]):
            writer.write(*row)
    stats = {"windows": len(origins), "window": window, "batch_size": batch_size, "device": str(dev),
             "network": form, "precision": dtype_name(dtype), "box_voxels": int(np.prod(box_shape)),
             "setup_s": round(setup_s, 3),
             "read_s": round(read_s, 3), "forward_s": round(forward_s, 3), "accumulate_s": round(accumulate_s, 3),
             "write_s": round(writer.seconds, 3), "total_s": round(time.perf_counter() - started, 3)}
    if dev.type == "cuda":
        stats["gpu_peak_memory_mb"] = round(torch.cuda.max_memory_allocated(dev) / 2**20, 1)
    log.info("%s%s", STATS_PREFIX, json.dumps(stats))
    return Path(output)
