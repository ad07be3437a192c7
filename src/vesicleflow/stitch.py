"""stitch: probability map = sum over shards of sum(w*p) / sum over shards of sum(w).

Kept on disk (zarr, model grid): it is the cache that post-processing re-runs from.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from vesicleflow.io import atomic_output
from vesicleflow.volumes import create_volume, open_volume, z_slabs

log = logging.getLogger(__name__)

SLAB_PLANES = 64


def stitch_shards(shards: list[str | Path], normalized: str | Path, output: str | Path) -> Path:
    """Combine the shards' accumulations into one probability map, slab by slab."""
    reference = open_volume(normalized)
    shape = reference.shape
    parts = []
    for shard in shards:
        weighted = open_volume(Path(shard) / "weighted")
        weight = open_volume(Path(shard) / "weight")
        start, stop = weighted.attrs["box_start"], weighted.attrs["box_stop"]
        if list(weighted.attrs["shape"]) != list(shape):
            raise ValueError(f"{shard}: made for a volume of shape {weighted.attrs['shape']}, not {list(shape)}")
        parts.append((weighted, weight, start, stop))
    with atomic_output(output) as tmp:
        probability = create_volume(tmp, shape, "float32", attrs=dict(reference.attrs))
        for z0, z1 in z_slabs(shape[0], SLAB_PLANES):
            numerator = np.zeros((z1 - z0, *shape[1:]), np.float32)
            denominator = np.zeros_like(numerator)
            for weighted, weight, start, stop in parts:
                lo, hi = max(z0, start[0]), min(z1, stop[0])
                if lo >= hi:
                    continue
                target = (slice(lo - z0, hi - z0), slice(start[1], stop[1]), slice(start[2], stop[2]))
                source = slice(lo - start[0], hi - start[0])
                numerator[target] += np.asarray(weighted[source])
                denominator[target] += np.asarray(weight[source])
            if not (denominator > 0).all():
                raise ValueError(f"slab {z0}-{z1}: some voxels were covered by no window; shards missing?")
            probability[z0:z1] = numerator / denominator
    log.info("stitched %d shard(s) into %s", len(parts), output)
    return Path(output)
