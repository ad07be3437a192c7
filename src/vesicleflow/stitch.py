"""stitch: probability map = sum over shards of w_k * p_k / sum over shards of w_k.

Each shard k holds its own probability p_k = sum(w*p) / sum(w) over its windows and its weight
w_k = sum(w), so the weighted mean over shards is the weighted mean over every window. A tiling
plan's only shard holds no weight: alone, it is the map whatever its weight.

Kept on disk (zarr, model grid): it is the cache that post-processing re-runs from. Works block by
block (whole zarr chunks along z, bands of rows along y), so peak memory is a few blocks whatever
the volume's size. :data:`THREADS` threads combine blocks side by side, so one block's zarr reads
(and decompression) overlap another's arithmetic and writes.

A single shard that covers the whole volume (the default, ``inference.shards: 1``) already is the
probability map: its chunk files are hard-linked (copied where the file system cannot link) into
the output instead of being read, divided by 1 and written again.
"""

from __future__ import annotations

import logging
import os
import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from vesicleflow.io import atomic_output
from vesicleflow.volumes import DEFAULT_CHUNKS, create_volume, open_volume, read_box, write_block, z_slabs

log = logging.getLogger(__name__)

SLAB_PLANES = DEFAULT_CHUNKS[0]
#: Most bytes of one float32 block (numerator and denominator each hold one).
BLOCK_BYTES = 32 * 2**20
#: Threads combining blocks: a job's two cores.
THREADS = 2


def blocks(shape, block_bytes: int | None = None):
    """Yield (z0, z1, y0, y1): z slabs of whole chunks, split into row bands that fit ``block_bytes``."""
    block_bytes = BLOCK_BYTES if block_bytes is None else block_bytes
    row_bytes = 4 * shape[2]
    chunk_y = DEFAULT_CHUNKS[1]
    rows = max(1, block_bytes // (row_bytes * min(SLAB_PLANES, shape[0])))
    rows = shape[1] if rows >= shape[1] else max(chunk_y, rows // chunk_y * chunk_y)
    for z0, z1 in z_slabs(shape[0], SLAB_PLANES):
        for y0, y1 in z_slabs(shape[1], rows):
            yield z0, z1, y0, y1


def stitch_shards(shards: list[str | Path], normalized: str | Path, output: str | Path,
                  threads: int = THREADS) -> Path:
    """Combine the shards' probabilities into one probability map, block by block, on ``threads`` threads."""
    reference = open_volume(normalized)
    shape = reference.shape
    parts = []
    for shard in shards:
        probability = open_volume(Path(shard) / "probability")
        start, stop = probability.attrs["box_start"], probability.attrs["box_stop"]
        if list(probability.attrs["shape"]) != list(shape):
            raise ValueError(f"{shard}: made for a volume of shape {probability.attrs['shape']}, not {list(shape)}")
        only_shard = probability.attrs.get("only_shard", False)
        if only_shard and len(shards) > 1:
            raise ValueError(f"{shard}: the only shard of its tiling plan, which cannot be combined with other "
                             "shards; were the tiles re-planned without re-running inference?")
        weight = None if only_shard else open_volume(Path(shard) / "weight")
        parts.append((probability, weight, start, stop))

    def combine(z0: int, z1: int, y0: int, y1: int) -> None:
        """sum(w_k * p_k) / sum(w_k) over the shards for one block, written to ``output_volume``."""
        numerator = np.zeros((z1 - z0, y1 - y0, shape[2]), np.float32)
        denominator = np.zeros_like(numerator)
        for probability, weight, start, stop in parts:
            lo = (max(z0, start[0]), max(y0, start[1]))
            hi = (min(z1, stop[0]), min(y1, stop[1]))
            if lo[0] >= hi[0] or lo[1] >= hi[1]:
                continue
            target = (slice(lo[0] - z0, hi[0] - z0), slice(lo[1] - y0, hi[1] - y0), slice(start[2], stop[2]))
            source = (slice(lo[0] - start[0], hi[0] - start[0]), slice(lo[1] - start[1], hi[1] - start[1]),
                      slice(None))
            if weight is None:  # the plan's only shard: the map is its probability, whatever its weight
                numerator[target] += read_box(probability, source)
                denominator[target] += 1
                continue
            w = read_box(weight, source)
            numerator[target] += read_box(probability, source) * w
            denominator[target] += w
        if not denominator.min() > 0:
            raise ValueError(f"block z {z0}-{z1}, y {y0}-{y1}: some voxels were covered by no window; "
                             "shards missing?")
        np.divide(numerator, denominator, out=numerator)
        write_block(output_volume, (z0, y0, 0), numerator)

    with atomic_output(output) as tmp:
        output_volume = create_volume(tmp, shape, "float32", attrs=dict(reference.attrs))
        if len(parts) == 1 and _is_the_whole_map(parts[0], output_volume):
            _link_chunks(Path(shards[0]) / "probability", Path(tmp))
            done = "linked the one shard's probability"
        else:
            with ThreadPoolExecutor(max(1, threads), thread_name_prefix="stitch") as pool:
                list(pool.map(combine, *zip(*blocks(shape))))  # in block order: raises the first block's error
            done = f"stitched {len(parts)} shard(s)"
    log.info("%s into %s", done, output)
    return Path(output)


def _is_the_whole_map(part, output_volume) -> bool:
    """Whether a shard's probability covers the whole volume and stores its chunks as the output does."""
    probability, _, start, stop = part
    return (list(start) == [0, 0, 0] and list(stop) == list(output_volume.shape)
            and _layout(probability) == _layout(output_volume))


def _layout(array) -> dict:
    """An array's metadata but its attributes: equal layouts store the same chunks in the same files."""
    return {k: v for k, v in array.metadata.to_dict().items() if k != "attributes"}


def _link_chunks(source: Path, target: Path) -> None:
    """Hard-link (or, across file systems, copy) every chunk file of ``source`` into ``target``,
    whose own metadata (zarr.json) stays."""
    for folder, _, files in os.walk(source):
        relative = Path(folder).relative_to(source)
        (target / relative).mkdir(parents=True, exist_ok=True)
        for name in files:
            if relative == Path(".") and name == "zarr.json":
                continue
            try:
                os.link(Path(folder) / name, target / relative / name)
            except OSError:
                shutil.copyfile(Path(folder) / name, target / relative / name)
