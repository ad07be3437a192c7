"""postprocess: probability map -> instance labels of vesicle candidates (model grid).

Threshold, restrict to the cytoplasm mask, split touching vesicles by a watershed on the distance
transform (a filled ball has one distance maximum at its centre), and drop objects whose
inscribed radius is outside the configured range. All sizes are in nm.

Works in overlapping blocks, so memory stays bounded whatever the volume's size: each block is
processed with a halo wider than the largest accepted vesicle's diameter plus the peak spacing,
and keeps exactly the objects whose inscribed-ball centre (distance-transform peak) falls in the
block's core. Any object that can be accepted lies, with every voxel its distance transform and
watershed depend on, inside that haloed block, so the result equals processing the whole volume
at once (a test checks this). Labels are numbered 1..N in (z, y, x) order of those centres,
whatever the blocking. With the labels go each label's bounding box and sphere-fit candidate
(the centre and radius of its own largest inscribed ball), so that spherefit need not read them.
"""

from __future__ import annotations

import logging
import math
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from scipy import ndimage
from skimage.feature import peak_local_max
from skimage.segmentation import watershed

from vesicleflow.grid import GridMapping, nearest_source_indices
from vesicleflow.io import InputError, ReusedBuffers, atomic_output, open_mrc_volume, scratch_dir
from vesicleflow.parallel import ordered_map, process_pool
from vesicleflow.spherefit import region_candidate
from vesicleflow.volumes import (
    DEFAULT_CHUNKS,
    create_volume,
    open_volume,
    read_box,
    threshold_box,
    write_block,
    z_slabs,
)

log = logging.getLogger(__name__)

#: Most voxels in one haloed block. A block of vesicles needs about 3 bytes per voxel (its foreground
#: and uint16 components: 306 MB per worker for the benchmark's 78 M-voxel blocks); one component
#: filling the whole block about 52 (its distance transform and watershed). 96 Mi rather than 32 Mi:
#: the benchmark's largest tomogram is 2 blocks instead of 10, so the halos (66 voxels a side)
#: add 17 % to the volume segmented instead of 98 %: postprocess 4.7-5.0 s instead of 5.9-6.6 s.
BLOCK_VOXELS = 96 * 2**20


def _min_distance_voxels(voxel_size_nm: float, min_radius_nm: float, min_separation_nm: float | None) -> int:
    separation_nm = min_separation_nm if min_separation_nm is not None else min_radius_nm
    return max(1, round(separation_nm / voxel_size_nm))


def _overlaps(box, core) -> bool:
    return all(b.start < c.stop and c.start < b.stop for b, c in zip(box, core))


def segment_block(foreground: np.ndarray, voxel_size_nm: float, min_radius_nm: float,
                  min_separation_nm: float | None = None,
                  core: tuple[slice, ...] | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Watershed split of a binary block: (labels 1..n, peaks (n, 3) in (z, y, x) order, inscribed radii nm).

    Label i + 1 grows from ``peaks[i]``; ``inscribed[i]`` is its largest distance to background.
    Each connected component is split within its own bounding box (plus one voxel), so the cost
    follows the foreground, not the block: most of a tomogram is cytosol. With ``core`` (a box in
    block coordinates), components entirely outside it are skipped: their peaks, which lie inside
    them, cannot fall in the core, so a blocked caller would drop them anyway.
    """
    labels, peaks, inscribed = _segment_components(foreground, voxel_size_nm, min_radius_nm, min_separation_nm, core)
    order = _peak_order(peaks)
    return _peak_order_ids(order)[labels], peaks[order], inscribed[order]


def _peak_order(peaks) -> np.ndarray:
    """Indices that sort peaks (n, 3) by z, then y, then x: ids follow this order, whatever the blocking."""
    return np.lexsort(np.asarray(peaks, np.int64).reshape(-1, 3).T[::-1])


def _peak_order_ids(order: np.ndarray, dtype=np.int32) -> np.ndarray:
    """Lookup table from ids in processing order to ids in peak (z, y, x) order, 0 kept for background."""
    ids = np.zeros(len(order) + 1, dtype)
    ids[order + 1] = np.arange(1, len(order) + 1)
    return ids


def _segment_components(foreground: np.ndarray, voxel_size_nm: float, min_radius_nm: float,
                        min_separation_nm: float | None, core: tuple[slice, ...] | None):
    """:func:`segment_block` with the ids in processing order (the caller reorders them)."""
    labels = np.zeros(foreground.shape, np.int32)
    all_peaks, all_inscribed, n_so_far = [], [], 0
    for box, obj, distance_nm, peaks, _ in _component_peaks(foreground, voxel_size_nm, min_radius_nm,
                                                         min_separation_nm, core):
        local, inscribed = _flood(obj, distance_nm, peaks)
        all_inscribed.append(inscribed)
        all_peaks.append(peaks + np.array([s.start for s in box]))
        labels[box][obj] = np.add(local[obj], n_so_far, dtype=labels.dtype)
        n_so_far += len(peaks)
    peaks = np.concatenate(all_peaks) if all_peaks else np.zeros((0, 3), np.int64)
    inscribed = np.concatenate(all_inscribed).astype(np.float64) if all_inscribed else np.zeros(0)
    return labels, peaks, inscribed


def _component_peaks(foreground: np.ndarray, voxel_size_nm: float, min_radius_nm: float,
                     min_separation_nm: float | None, core: tuple[slice, ...] | None,
                     components: np.ndarray | None = None):
    """Per connected component with distance maxima, in label order: (box one voxel wider, the
    component in it, its distance transform in nm, the maxima (p, 3) in box coordinates, and the
    distance transform's nearest background voxels (``features``, as ndimage's indices) where the
    component has one maximum and the voxel size is a power of two, else None).

    ``features`` lets the component's sphere-fit candidate skip a second distance transform
    (:func:`vesicleflow.spherefit.region_candidate`): scaled by a power of two, every distance
    ndimage compares is scaled exactly, so its choices are those of the unit-voxel transform.

    ``components``: an array of the foreground's shape to hold the connected components (a block
    worker reuses one: 0.05-0.13 s less per block than a new one; see :func:`_label_components`)."""
    components = _label_components(foreground, components)
    min_distance = _min_distance_voxels(voxel_size_nm, min_radius_nm, min_separation_nm)
    exact_scaling = math.frexp(voxel_size_nm)[0] == 0.5
    for index, box in enumerate(ndimage.find_objects(components), start=1):
        if core is not None and not _overlaps(box, core):
            continue
        box = tuple(slice(max(s.start - 1, 0), min(s.stop + 1, n)) for s, n in zip(box, foreground.shape))
        obj = components[box] == index
        distance, features = ndimage.distance_transform_edt(obj, sampling=voxel_size_nm, return_indices=True)
        distance_nm = distance.astype(np.float32)
        peaks = peak_local_max(distance_nm, min_distance=min_distance, threshold_abs=0.5 * min_radius_nm,
                               labels=obj.view(np.uint8), exclude_border=False).reshape(-1, 3)
        if len(peaks):
            yield box, obj, distance_nm, peaks, features if len(peaks) == 1 and exact_scaling else None


def _label_components(foreground: np.ndarray, components: np.ndarray | None = None) -> np.ndarray:
    """The foreground's connected components, in ``components`` when its integer type can number them
    all, else in a new int32 array. uint16 numbers 65,535: every block of the benchmark has a few
    thousand, and at half the bytes of int32 the array is cheaper to fill and to scan."""
    if components is not None:
        try:
            ndimage.label(foreground, output=components)
            return components
        except RuntimeError:  # "insufficient bit-depth in requested output type"
            pass
    components = np.empty(foreground.shape, np.int32)
    ndimage.label(foreground, output=components)
    return components


def _flood(obj: np.ndarray, distance_nm: np.ndarray, peaks: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Watershed of one component from its maxima: (ids 1..p in its box, 0 outside it; the largest
    distance in each region, float32). A single maximum floods the whole (connected) component, so
    the watershed is skipped; the region maxima come from one unsorted pass, not ndimage's argsort."""
    if len(peaks) == 1:
        return obj.view(np.uint8), np.array([distance_nm.max()])
    markers = np.zeros(obj.shape, np.int32)
    markers[tuple(peaks.T)] = np.arange(1, len(peaks) + 1)
    local = watershed(-distance_nm, markers, mask=obj)
    inscribed = np.zeros(len(peaks) + 1, np.float32)
    np.maximum.at(inscribed, local.ravel(), distance_nm.ravel())
    return local, inscribed[1:]


def separate_instances(foreground: np.ndarray, voxel_size_nm: float, min_radius_nm: float,
                       max_radius_nm: float, min_separation_nm: float | None = None) -> np.ndarray:
    """Label touching balls separately and drop those whose inscribed radius is out of range (in memory)."""
    labels, peaks, inscribed = segment_block(foreground, voxel_size_nm, min_radius_nm, min_separation_nm)
    keep = (inscribed >= min_radius_nm) & (inscribed <= max_radius_nm)
    relabel = np.zeros(len(peaks) + 1, np.uint32)
    relabel[1:][keep] = np.arange(1, int(keep.sum()) + 1)
    log.info("%d candidate maxima, %d within %.1f-%.1f nm", len(peaks), int(keep.sum()),
             min_radius_nm, max_radius_nm)
    return relabel[labels]


def halo_voxels(voxel_size_nm: float, min_radius_nm: float, max_radius_nm: float,
                min_separation_nm: float | None = None) -> int:
    """Halo that makes blocked segmentation exact for every object it can accept.

    An accepted object's voxels lie within ``max_radius`` of its peak, and each voxel's nearest
    background within ``max_radius`` of it; peak spacing reaches ``min_distance`` further.
    """
    return (math.ceil(2 * max_radius_nm / voxel_size_nm)
            + _min_distance_voxels(voxel_size_nm, min_radius_nm, min_separation_nm) + 2)


def block_cores(shape, halo: int, budget_voxels: int | None = None, workers: int = 1) -> tuple[int, ...]:
    """Core size per axis: of the block grids whose haloed blocks fit ``budget_voxels``, the one
    that ``workers`` processes finish first, taking each grid's time as its rounds of ``workers``
    blocks times its largest haloed block, then the fewest voxels in all (halos included); cores are
    at least 8 voxels."""
    budget_voxels = BLOCK_VOXELS if budget_voxels is None else budget_voxels
    options = []
    for n in shape:  # distinct core sizes along one axis, as (core, blocks, haloed extent)
        cores = sorted({math.ceil(n / k) for k in range(1, max(1, n // 8) + 1)} | {n}, reverse=True)
        cores = [c for c in cores if c >= min(8, n)][:256]
        options.append(np.array([(c, math.ceil(n / c), min(c + 2 * halo, n)) for c in cores], np.int64))
    oz, oy, ox = options
    extent = oz[:, None, None, 2] * oy[None, :, None, 2] * ox[None, None, :, 2]
    blocks = oz[:, None, None, 1] * oy[None, :, None, 1] * ox[None, None, :, 1]
    total = extent * blocks
    makespan = -(-blocks // max(1, workers)) * extent
    if (extent <= budget_voxels).any():
        makespan = np.where(extent <= budget_voxels, makespan, np.iinfo(np.int64).max)
    else:  # the halo alone exceeds the budget: smallest blocks
        makespan, total = extent, extent
    best = np.flatnonzero(makespan.ravel() == makespan.min())
    iz, iy, ix = np.unravel_index(int(best[np.argmin(total.ravel()[best])]), total.shape)
    return int(oz[iz, 0]), int(oy[iy, 0]), int(ox[ix, 0])


def iter_blocks(shape, core, halo: int):
    """Yield (core box, haloed box) pairs as tuples of slices; the cores tile the volume."""
    starts = [range(0, n, c) for n, c in zip(shape, core)]
    for z in starts[0]:
        for y in starts[1]:
            for x in starts[2]:
                origin = (z, y, x)
                inner = tuple(slice(o, min(o + c, n)) for o, c, n in zip(origin, core, shape))
                outer = tuple(slice(max(0, s.start - halo), min(n, s.stop + halo)) for s, n in zip(inner, shape))
                yield inner, outer


def _planes_per_pass(shape, bytes_per_voxel: int, budget_bytes: int = 64 * 2**20) -> int:
    """Planes per streaming pass: whole zarr chunks (64) unless planes are so large that fewer fit."""
    return int(np.clip(budget_bytes // (bytes_per_voxel * shape[1] * shape[2]), 1, DEFAULT_CHUNKS[0]))


def _chunk_blocks(shape, bytes_per_voxel: int, budget_bytes: int = 64 * 2**20):
    """Boxes of whole zarr chunks (64 planes x bands of 64-row multiples) within ``budget_bytes``."""
    chunk_z, chunk_y = DEFAULT_CHUNKS[0], DEFAULT_CHUNKS[1]
    rows = budget_bytes // (bytes_per_voxel * min(chunk_z, shape[0]) * shape[2])
    rows = shape[1] if rows >= shape[1] else max(chunk_y, rows // chunk_y * chunk_y)
    for z0, z1 in z_slabs(shape[0], chunk_z):
        for y0, y1 in z_slabs(shape[1], rows):
            yield slice(z0, z1), slice(y0, y1)


def _check_mask(mask_path: str | Path, mapping: GridMapping):
    mask = open_mrc_volume(mask_path, what="mask")
    if tuple(mask.shape) != tuple(mapping.original_shape):
        raise InputError(f"{mask_path}: mask shape {tuple(mask.shape)} (z, y, x) differs from the tomogram's "
                         f"{tuple(mapping.original_shape)}; a mask must match its tomogram voxel for voxel")
    return mask


def _mask_planes(mask, mapping: GridMapping, start: int, stop: int) -> np.ndarray:
    """Model-grid mask planes [start, stop) by nearest-neighbour sampling of the original-grid mask."""
    iz, iy, ix = nearest_source_indices(mapping.model_shape, mapping.original_shape, mapping.model_to_original)
    out = np.zeros((stop - start, len(iy), len(ix)), bool)
    cached_z, plane = None, None
    for k, z in enumerate(iz[start:stop]):
        if z != cached_z:
            cached_z, plane = z, mask[int(z)]
        out[k] = plane[np.ix_(iy, ix)] != 0
    return out


#: A process's arrays reused from block to block (see :class:`ReusedBuffers`).
_BLOCK_BUFFERS = ReusedBuffers()


def _segment_haloed_block(job: tuple) -> tuple:
    """Segment one haloed block; keep the objects whose peak lies in its core and whose inscribed
    radius is in range. Returns (the number of maxima in the core, the kept objects as pieces
    [(box in volume coordinates, ids 1..k there, 0 elsewhere)], their peaks (k, 3) in volume
    coordinates, row i for id i + 1, and their sphere-fit candidates, k rows of [mz, my, mx,
    guess_radius_nm]: see :func:`vesicleflow.spherefit.region_candidate`). A piece is one
    component's kept part, cropped: the pieces hold about the kept voxels, not the block. Reads its
    inputs itself: worker processes get paths, not volumes."""
    probability, model_mask, inner, outer, threshold, voxel_nm, min_radius_nm, max_radius_nm, separation = job
    source = open_volume(probability)
    foreground = threshold_box(source, outer, threshold)
    if model_mask is not None:
        foreground &= read_box(open_volume(model_mask), outer)
    pieces, centres, candidates, n_in_core = [], [], [], 0
    if not foreground.any():
        return n_in_core, pieces, np.zeros((0, 3), np.int64), []
    local_core = tuple(slice(i.start - o.start, i.stop - o.start) for i, o in zip(inner, outer))
    low, high = np.array([c.start for c in local_core]), np.array([c.stop for c in local_core])
    origin = np.array([o.start for o in outer])
    components = _BLOCK_BUFFERS.get("components", foreground.shape, np.uint16)
    for box, obj, distance_nm, peaks, features in _component_peaks(foreground, voxel_nm, min_radius_nm, separation,
                                                                   local_core, components):
        start = np.array([s.start for s in box])
        in_core = np.all((peaks + start >= low) & (peaks + start < high), axis=1)
        n_in_core += int(in_core.sum())
        if not in_core.any():  # none of it can be kept: skip the watershed
            continue
        local, inscribed = _flood(obj, distance_nm, peaks)
        keep = in_core & (inscribed >= min_radius_nm) & (inscribed <= max_radius_nm)
        if not keep.any():
            continue
        n_kept = len(centres) + int(keep.sum())
        ids = np.zeros(len(peaks) + 1, np.min_scalar_type(n_kept))
        ids[1:][keep] = np.arange(len(centres) + 1, n_kept + 1)
        kept = ids[local]
        crop = _bounding_box(kept > 0)
        pieces.append((tuple(slice(int(o + b.start + c.start), int(o + b.start + c.stop))
                             for o, b, c in zip(origin, box, crop)), kept[crop].copy()))
        centres.extend(peaks[keep] + start + origin)
        if features is not None:  # one maximum: the object is the component, in the same box
            candidates.append(region_candidate(obj, start + origin, source.shape, voxel_nm, features))
        else:
            candidates.extend(region_candidate(local == region, start + origin, source.shape, voxel_nm)
                              for region in np.flatnonzero(keep) + 1)
    return n_in_core, _compact(pieces), np.array(centres, np.int64).reshape(-1, 3), candidates


def _compact(pieces: list) -> list:
    """The pieces as one crop where their boxes together outgrow their bounding box (nested or
    crossing components), so that a block never returns more ids than that box holds voxels."""
    if len(pieces) < 2:
        return pieces
    low = np.min([[s.start for s in box] for box, _ in pieces], axis=0)
    high = np.max([[s.stop for s in box] for box, _ in pieces], axis=0)
    if sum(ids.size for _, ids in pieces) <= np.prod(high - low):
        return pieces
    crop = np.zeros(high - low, np.result_type(*(ids.dtype for _, ids in pieces)))
    for box, ids in pieces:  # components are disjoint: no piece overwrites another's ids
        region = crop[tuple(slice(s.start - lo, s.stop - lo) for s, lo in zip(box, low))]
        np.copyto(region, ids, where=ids > 0)
    return [(tuple(slice(int(lo), int(hi)) for lo, hi in zip(low, high)), crop)]


def _write_labels(labels, pieces: list, threads: int = 1) -> None:
    """Paste the pieces (box, ids, lookup table to final ids) into the labels volume, one box of whole
    chunks at a time, each written once, by ``threads`` threads. A voxel keeps the id of the first
    piece that claims it."""
    local = threading.local()

    def write(box: tuple[slice, ...]) -> None:
        box = (*box, slice(0, labels.shape[2]))
        shape = [s.stop - s.start for s in box]
        held = getattr(local, "buffer", None)
        if held is None or any(b < n for b, n in zip(held.shape, shape)):  # grown to fit every box so far
            local.buffer = np.zeros(tuple(np.maximum(held.shape, shape) if held is not None else shape), labels.dtype)
        region = local.buffer[:shape[0], :shape[1]]
        region.fill(0)
        for piece_box, ids, lookup in pieces:
            overlap = tuple(slice(max(p.start, b.start), min(p.stop, b.stop)) for p, b in zip(piece_box, box))
            if any(s.start >= s.stop for s in overlap):
                continue
            target = region[tuple(slice(s.start - b.start, s.stop - b.start) for s, b in zip(overlap, box))]
            source = ids[tuple(slice(s.start - p.start, s.stop - p.start) for s, p in zip(overlap, piece_box))]
            np.copyto(target, lookup[source], where=target == 0)  # lookup[0] == 0: background writes nothing
        write_block(labels, [s.start for s in box], region)

    with ThreadPoolExecutor(max(1, threads), thread_name_prefix="labels") as pool:
        list(pool.map(write, _chunk_blocks(labels.shape, labels.dtype.itemsize)))  # raises a box's error


def _label_boxes(pieces: list, count: int) -> np.ndarray:
    """Each final label's bounding box, (count, 6): z0, y0, x0, z1, y1, x1 (stops exclusive), from the
    pieces (box, ids, lookup to final ids). Stored with the labels, so that spherefit need not scan
    the volume for them before its workers can start."""
    boxes = np.empty((count, 6), np.int64)
    boxes[:, :3], boxes[:, 3:] = np.iinfo(np.int64).max, -1
    for box, ids, lookup in pieces:
        start = np.array([s.start for s in box])
        for local, found in enumerate(ndimage.find_objects(ids), start=1):
            if found is not None:
                final = int(lookup[local]) - 1
                boxes[final, :3] = np.minimum(boxes[final, :3], start + [s.start for s in found])
                boxes[final, 3:] = np.maximum(boxes[final, 3:], start + [s.stop for s in found])
    return boxes


def _bounding_box(mask: np.ndarray) -> tuple[slice, ...]:
    """Smallest box holding every True voxel of a 3-D mask with at least one."""
    box = []
    for axis in range(3):
        present = np.flatnonzero(mask.any(axis=tuple(a for a in range(3) if a != axis)))
        box.append(slice(int(present[0]), int(present[-1]) + 1))
    return tuple(box)


def postprocess_probability(probability: str | Path, output: str | Path, threshold: float = 0.5,
                            mask: str | Path | None = None, min_radius_nm: float = 8.0,
                            max_radius_nm: float = 60.0, min_separation_nm: float | None = None,
                            block_voxels: int | None = None, workers: int = 1) -> int:
    """Write instance labels (zarr, model grid); returns the number of candidates.

    Blocks are segmented by ``workers`` processes; their results are merged in block order, so
    the labels do not depend on the number of workers. The main process keeps every block's pieces
    (one byte per voxel of the kept objects' boxes while a block has under 256: 12 MB for the
    benchmark's 1589 objects in 133 M voxels; at worst one id per voxel of each block's kept box)
    until the ids are final, then writes the labels once, in boxes of whole chunks (64 MB buffer)."""
    if not 0.0 < threshold < 1.0:
        raise ValueError(f"threshold must be between 0 and 1, got {threshold}")
    if not 0.0 < min_radius_nm < max_radius_nm:
        raise ValueError(f"need 0 < min_radius_nm < max_radius_nm, got {min_radius_nm} and {max_radius_nm}")
    with process_pool(workers, preload=("zarr",)) as pool:  # before the first read: see process_pool
        source = open_volume(probability)
        attrs = dict(source.attrs)
        mapping = GridMapping.from_attrs(attrs["grid"])
        voxel_nm = mapping.model_voxel_size_angstrom / 10.0
        shape = tuple(source.shape)
        mask_volume = _check_mask(mask, mapping) if mask else None
        halo = halo_voxels(voxel_nm, min_radius_nm, max_radius_nm, min_separation_nm)
        core = block_cores(shape, halo, block_voxels, workers)
        with scratch_dir(output) as scratch:
            model_mask = None
            if mask_volume is not None:
                model_mask = scratch / "mask.zarr"
                mask_array = create_volume(model_mask, shape, "bool")
                for z0, z1 in z_slabs(shape[0], _planes_per_pass(shape, 1)):
                    mask_array[z0:z1] = _mask_planes(mask_volume, mapping, z0, z1)
            jobs = [(str(probability), str(model_mask) if model_mask else None, inner, outer, threshold, voxel_nm,
                     min_radius_nm, max_radius_nm, min_separation_nm)
                    for inner, outer in iter_blocks(shape, core, halo)]
            blocks, centres, candidates, n_maxima = [], [], [], 0
            for in_core, pieces, peaks, block_candidates in ordered_map(pool, _segment_haloed_block, jobs):
                n_maxima += in_core
                blocks.append((len(centres), len(peaks), pieces))
                centres.extend(map(tuple, peaks))
                candidates.extend(block_candidates)
            _BLOCK_BUFFERS.release()  # without workers, this process segmented the blocks itself
            count = len(centres)
            dtype = "uint16" if count < 2**16 else "uint32"
            renumber = _peak_order_ids(_peak_order(centres), dtype)
            by_label = [None] * count
            for final_id, candidate in zip(renumber[1:].tolist(), candidates):
                by_label[final_id - 1] = candidate
            pieces = []
            for offset, n, block_pieces in blocks:  # block-local ids 1..n -> final ids
                lookup = renumber[offset:offset + n + 1].copy()
                lookup[0] = 0
                pieces.extend((box, ids, lookup) for box, ids in block_pieces)
            with atomic_output(output) as tmp:
                labels = create_volume(tmp, shape, dtype, attrs={**attrs, "count": count,
                                                                 "mask": str(mask) if mask else None,
                                                                 "boxes": _label_boxes(pieces, count).tolist(),
                                                                 "candidates": by_label})
                _write_labels(labels, pieces, workers)
    log.info("%d candidate maxima, %d within %.1f-%.1f nm (%d block(s) of core %s, halo %d voxels, %d worker(s))",
             n_maxima, count, min_radius_nm, max_radius_nm, len(jobs), core, halo, workers)
    return count

