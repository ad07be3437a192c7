"""Writers for the file formats structural biologists' tools read: IMOD models, RELION/Warp STAR, MRC.

Every writer goes through :func:`vesicleflow.io.atomic_output`. Coordinates come in as the
vesicles.csv contract has them: 0-based voxel indices of the original grid, x = last numpy axis,
an integer value is a voxel centre. Each writer converts to its format's own convention:

- IMOD model (``.mod``): pixel coordinates where X and Y run from 0 at the left/bottom EDGE of the
  first pixel (a voxel centre is at i + 0.5) but Z is the section index (a section centre is at k);
  see "Model Coordinate Conventions" in IMOD's binspec.html. So ``imod = (x + 0.5, y + 0.5, z)``.
- RELION 5 (``rlnCenteredCoordinate[XYZ]Angst``): Å from the tomogram centre. RELION converts them
  back with ``pixel = centred / pixel size + size / 2`` (ParticleSet::getParticleCoordDecenteredPixel),
  where pixel coordinates are 0-based with integer = voxel centre. So ``centred = (x - nx / 2) * Å``.
- RELION 4 / Warp (``rlnCoordinate[XYZ]``): the same 0-based voxel coordinates RELION uses inside
  (decentred pixels), i.e. exactly vesicles.csv's ``x, y, z``.
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np
import pandas as pd

from vesicleflow.io import PageWriter, atomic_output, pwrite_all

# ----------------------------------------------------------------------------------------- IMOD

#: IMOD model-header flag: the model was not written by 3dmod yet (what IMOD's imodDefault sets).
IMODF_NEW_TO_3DMOD = 1 << 11
#: IMOD object flags: open contours, scattered points.
IMOD_OBJFLAG_OPEN = 1 << 3
IMOD_OBJFLAG_SCAT = 1 << 9
#: IMOD unit codes (imodel.h): model ``units`` field, ``pixsize`` is in these units.
IMOD_UNIT_NM = -9
IMOD_MMOVIE = 2


def _chunk_id(name: str) -> bytes:
    return name.encode("ascii")


def imod_point_coordinates(table: pd.DataFrame) -> np.ndarray:
    """vesicles.csv centres (0-based voxels) -> IMOD model coordinates (x, y, z) in pixels."""
    xyz = table[["x", "y", "z"]].to_numpy(dtype=np.float64).reshape(-1, 3)
    return xyz + np.array([0.5, 0.5, 0.0])


def write_imod_points(path: str | Path, xyz: np.ndarray, radii_px: np.ndarray, shape_zyx, pixel_size_nm: float,
                      name: str = "vesicleflow", object_name: str = "vesicles",
                      colour: tuple[float, float, float] = (1.0, 0.85, 0.0)) -> None:
    """Write one scattered-point object (one contour) with per-point sphere radii, IMOD binary format.

    ``xyz``: (N, 3) IMOD model coordinates in pixels (see :func:`imod_point_coordinates`);
    ``radii_px``: (N,) sphere radius of each point in pixels (the ``SIZE`` chunk); ``shape_zyx``:
    the image size (header ``xmax, ymax, zmax``); the header's pixel size is in nm (``units`` -9).
    N = 0 writes a valid model whose object has no contour. All numbers are big-endian.
    """
    xyz = np.asarray(xyz, dtype=">f4").reshape(-1, 3)
    radii = np.asarray(radii_px, dtype=">f4").reshape(-1)
    if len(radii) != len(xyz):
        raise ValueError(f"{len(xyz)} points but {len(radii)} radii")
    nz, ny, nx = (int(s) for s in shape_zyx)
    out = bytearray()
    out += b"IMODV1.2"
    # Model header, 232 bytes (binspec.html "The Model Data Structure").
    out += struct.pack(
        ">128s3ii I4i 3f3f 3i2i f2i 3f",
        name.encode("ascii", "replace")[:127],
        nx, ny, nz,
        1,                          # objsize
        IMODF_NEW_TO_3DMOD,         # flags
        1, IMOD_MMOVIE, 0, 255,     # drawmode, mousemode, blacklevel, whitelevel
        0.0, 0.0, 0.0,              # offsets (unused)
        1.0, 1.0, 1.0,              # x/y/z scale: isotropic voxels
        0, 0, -1,                   # current object, contour, point
        3, 128,                     # res, thresh
        float(pixel_size_nm), IMOD_UNIT_NM, 0,  # pixsize, units, csum
        0.0, 0.0, 0.0,              # alpha, beta, gamma
    )
    default_radius = int(round(float(np.median(radii)))) if len(radii) else 3
    # Object header, 176 bytes.
    out += _chunk_id("OBJT")
    out += struct.pack(
        ">64s16I i I 2i 3f i 8B 2i",
        object_name.encode("ascii", "replace")[:63],
        *([0] * 16),
        1 if len(xyz) else 0,                      # contsize
        IMOD_OBJFLAG_OPEN | IMOD_OBJFLAG_SCAT,     # flags: scattered points
        0, 1,                                      # axis, drawmode
        *colour,
        max(default_radius, 1),                    # pdrawsize: sphere radius of points without a size
        1, 3, 1, 1, 0, 0, 0, 0,                    # symbol, symsize, linewidth2, linewidth, linesty, ...
        0, 0,                                      # meshsize, surfsize
    )
    if len(xyz):
        out += _chunk_id("CONT")
        out += struct.pack(">iIii", len(xyz), 0, 0, 0)  # psize, flags, time, surf
        out += xyz.tobytes()
        out += _chunk_id("SIZE")
        out += struct.pack(">i", 4 * len(radii))
        out += radii.tobytes()
    out += _chunk_id("IEOF")
    with atomic_output(path) as tmp:
        Path(tmp).write_bytes(bytes(out))


def write_imod_model(path: str | Path, table: pd.DataFrame, shape_zyx, voxel_size_nm: float, title: str) -> None:
    """vesicles.csv rows -> IMOD point model: point k is vesicle_id k+1, its size the outer radius."""
    write_imod_points(path, imod_point_coordinates(table),
                      table["radius_nm"].to_numpy(dtype=np.float64) / voxel_size_nm,
                      shape_zyx, voxel_size_nm, name=title)


# ----------------------------------------------------------------------------------------- STAR

def relion5_table(table: pd.DataFrame, tomo_name: str, shape_zyx, voxel_size_angstrom: float) -> pd.DataFrame:
    """RELION 5 particles: ``rlnTomoName`` and centred coordinates in Å."""
    nz, ny, nx = (float(s) for s in shape_zyx)
    return pd.DataFrame({
        "rlnTomoName": pd.Series([tomo_name] * len(table), dtype=object),
        "rlnCenteredCoordinateXAngst": (table["x"].to_numpy(float) - nx / 2) * voxel_size_angstrom,
        "rlnCenteredCoordinateYAngst": (table["y"].to_numpy(float) - ny / 2) * voxel_size_angstrom,
        "rlnCenteredCoordinateZAngst": (table["z"].to_numpy(float) - nz / 2) * voxel_size_angstrom,
    })


def pixel_star_table(table: pd.DataFrame, tomo_name: str, micrograph_name: str) -> pd.DataFrame:
    """RELION 4 / Warp particles: 0-based voxel coordinates of this tomogram."""
    return pd.DataFrame({
        "rlnTomoName": pd.Series([tomo_name] * len(table), dtype=object),
        "rlnMicrographName": pd.Series([micrograph_name] * len(table), dtype=object),
        "rlnCoordinateX": table["x"].to_numpy(float),
        "rlnCoordinateY": table["y"].to_numpy(float),
        "rlnCoordinateZ": table["z"].to_numpy(float),
        "rlnAutopickFigureOfMerit": table["fit_score"].to_numpy(float),
    })


def write_star(path: str | Path, particles: pd.DataFrame) -> None:
    """One ``data_particles`` loop, written with ``starfile`` (valid with zero rows too)."""
    import starfile

    with atomic_output(path) as tmp:
        starfile.write({"particles": particles}, tmp, overwrite=True, float_format="%.4f")


# ------------------------------------------------------------------------------------------ MRC

def label_mrc_mode(max_label: int) -> tuple[int, type]:
    """uint16 (mode 6) up to 65535 labels; float32 (mode 2, exact integers up to 2**24) beyond."""
    if max_label < 2**16:
        return 6, np.uint16
    if max_label >= 2**24:
        raise ValueError(f"{max_label} labels cannot be stored exactly in an MRC file (float32 limit 2**24)")
    return 2, np.float32


class HeaderStats:
    """Running min, max, mean and RMS deviation (the MRC header's dmin, dmax, dmean, rms)."""

    def __init__(self):
        self.n, self.total, self.total_sq = 0, 0.0, 0.0
        self.low, self.high = np.inf, -np.inf

    def add(self, block: np.ndarray) -> None:
        block = np.asarray(block)
        if block.dtype.kind == "u" and block.dtype.itemsize <= 2:  # labels: exact, from the counts of
            flat = block.ravel()                                     # the (few) non-zero values
            foreground = flat[flat != 0]
            counts = np.bincount(foreground)
            values = np.flatnonzero(counts)
            weights = counts[values].astype(np.float64)
            self.add_moments(flat.size, float(weights @ values), float(weights @ np.square(values, dtype=np.float64)),
                             0.0 if len(foreground) < len(flat) else float(values[0]),
                             float(values[-1]) if len(values) else 0.0)
            return
        for plane in block.reshape(-1, *block.shape[-2:]):  # float64 copies of one plane only
            values = plane.astype(np.float64).ravel()
            self.add_moments(values.size, float(values.sum()), float(values @ values), float(plane.min()),
                             float(plane.max()))

    def add_moments(self, n: int, total: float, total_sq: float, low: float, high: float) -> None:
        """Add ``n`` values of the given sum, sum of squares, minimum and maximum."""
        self.n += n
        self.total += total
        self.total_sq += total_sq
        self.low = min(self.low, low)
        self.high = max(self.high, high)

    def write_to(self, header) -> None:
        mean = self.total / self.n
        header.dmin, header.dmax, header.dmean = self.low, self.high, mean
        header.rms = float(np.sqrt(max(self.total_sq / self.n - mean * mean, 0.0)))


def write_mrc_slabs(path: str | Path, shape_zyx, mrc_mode: int, voxel_size_angstrom: float,
                    origin_angstrom, slabs: Iterable[tuple[int, np.ndarray]], label: str = "",
                    stats: HeaderStats | None = None) -> None:
    """Write an MRC volume slab by slab: memory stays one slab.

    mrcfile lays out the header on an empty (sparse) file of the final size; the slabs go in with
    plain file writes, which the kernel writes back by itself (through a memory map, written pages
    count towards RSS until flushed, and flushing each slab waits for the disk). File pages that
    would hold only zero bytes are not written (:func:`write_leaving_holes`): they stay holes,
    which read as zeros. ``slabs`` yields
    ``(z_start, array)`` covering every z plane once, and may reuse one buffer: each slab is written
    before the next is requested. Header statistics are accumulated on the way so the file
    validates without a second pass. A producer that can count them more cheaply from
    data it already has passes its own ``stats``, filled by the time the last slab is yielded: the
    slabs are then not scanned.
    """
    import mrcfile

    shape = tuple(int(s) for s in shape_zyx)
    scan = stats is None
    stats = HeaderStats() if scan else stats
    covered = 0
    with atomic_output(path) as tmp:
        with mrcfile.new_mmap(tmp, shape=shape, mrc_mode=mrc_mode, overwrite=True) as mrc:
            dtype = mrc.data.dtype
            data_offset = int(mrc.header.nbytes + mrc.extended_header.nbytes)
            mrc.voxel_size = voxel_size_angstrom
            mrc.header.origin.z, mrc.header.origin.y, mrc.header.origin.x = origin_angstrom
            if label:
                mrc.add_label(label[:80])
            header = mrc.header.copy()
        plane_bytes = dtype.itemsize * shape[1] * shape[2]
        with open(tmp, "r+b") as handle, PageWriter(tmp, handle.fileno()) as writer:
            for z0, block in slabs:
                write_leaving_holes(writer.write, np.ascontiguousarray(block, dtype=dtype),
                                    data_offset + z0 * plane_bytes)
                if scan:
                    stats.add(block)
                covered += len(block)
            if covered != shape[0]:
                raise RuntimeError(f"slabs covered {covered} of {shape[0]} planes")
            # The statistics go into the header bytes directly: closing a memory map of the file
            # (mrcfile.mmap) would msync it, waiting for the disk to take every page just written.
            stats.write_to(header)
            pwrite_all(handle.fileno(), header.tobytes(), 0)


#: The unit of a file's page cache and of its holes.
FILE_PAGE_BYTES = 4096


#: Zero file pages are left as holes only in runs of at least this many: every run of data pages is a
#: write of its own, and writing a short run of zeros costs less than another (direct) write. Drawing
#: the benchmark's 1,435 spheres took 4,153 writes of 298 MiB with every zero page a hole, 1,664
#: writes of 353 MiB with this (2.2-2.3 s -> 1.8-1.9 s).
MIN_HOLE_PAGES = 16


def write_leaving_holes(write: Callable[[np.ndarray, int], None], data: np.ndarray, offset: int) -> None:
    """Write a contiguous array's bytes at ``offset`` of a file that reads as zeros there, skipping
    every run of at least :data:`MIN_HOLE_PAGES` whole file pages the bytes would fill with zeros.
    ``write(bytes, offset)`` writes a run of pages (:meth:`vesicleflow.io.PageWriter.write`: whole
    pages by direct I/O).

    Label volumes are mostly background: half of a crowded synapse's file pages hold only zeros, and
    writing them took new page-cache memory (the costliest part of writing a file) and disk space
    for nothing. Skipped pages stay holes in the sparse file, which every reader sees as zeros.
    """
    raw = data.reshape(-1).view(np.uint8)
    head = min((-offset) % FILE_PAGE_BYTES, raw.size)
    n_pages = (raw.size - head) // FILE_PAGE_BYTES
    pages = raw[head:head + n_pages * FILE_PAGE_BYTES].reshape(n_pages, FILE_PAGE_BYTES)
    nonzero = np.zeros(n_pages + 2, bool)  # bordered by written pieces: the head and the tail
    nonzero[0] = nonzero[-1] = True
    nonzero[1:-1] = pages.view(np.uint64).any(axis=1)
    # page k of the padded row starts at byte head + (k - 1) * page; runs of written pages -> byte ranges
    edges = np.flatnonzero(np.diff(nonzero.astype(np.int8)))
    starts = np.concatenate([[0], edges[1::2] + 1])
    stops = np.concatenate([edges[::2] + 1, [n_pages + 2]])
    joined = np.concatenate([starts[1:] - stops[:-1] < MIN_HOLE_PAGES, [False]])  # gaps too short to skip
    starts, stops = starts[np.concatenate([[True], ~joined[:-1]])], stops[~joined]
    for first, stop in zip(starts, stops):
        lo = max(0, head + (int(first) - 1) * FILE_PAGE_BYTES)
        hi = min(raw.size, head + (int(stop) - 1) * FILE_PAGE_BYTES)
        write(raw[lo:hi], offset + lo)


def slab_planes(plane_shape, bytes_per_voxel: int, budget_bytes: int = 128 * 2**20) -> int:
    """How many z planes fit the memory budget (at least one)."""
    return max(1, budget_bytes // max(1, int(np.prod(plane_shape)) * bytes_per_voxel))


def sphere_label_slabs(shape_zyx, centres_zyx: np.ndarray, radii_vox: np.ndarray, ids: np.ndarray, dtype,
                       budget_bytes: int = 128 * 2**20, stats: HeaderStats | None = None):
    """Yield z slabs of a volume where each sphere is drawn with its id (one buffer: each slab is
    valid until the next is requested).

    A voxel belongs to a sphere when its centre lies within the radius; where two spheres share a
    voxel, the one whose surface is farther away (smaller distance / radius) wins. Work is limited
    to each sphere's bounding box, memory to one slab. ``stats``: filled with the volume's header
    statistics by the time the last slab is yielded, from each id's voxel count (kept while drawing),
    so that :func:`write_mrc_slabs` need not scan the slabs for them.
    """
    nz, ny, nx = (int(s) for s in shape_zyx)
    centres = np.asarray(centres_zyx, dtype=np.float64).reshape(-1, 3)
    radii = np.asarray(radii_vox, dtype=np.float64).reshape(-1)
    ids = np.asarray(ids).reshape(-1)
    lo = np.ceil(centres - radii[:, None]).astype(np.int64)
    hi = np.floor(centres + radii[:, None]).astype(np.int64) + 1          # exclusive
    order = np.argsort(lo[:, 0], kind="stable")
    step = min(slab_planes((ny, nx), np.dtype(dtype).itemsize + 4, budget_bytes), nz)
    # Buffers reused from slab to slab (see write_mrc_slabs): fresh ones page-fault every slab. Only
    # the boxes drawn in a slab are cleared for the next: the rest of the buffer is still zero.
    labels_buffer = np.zeros((step, ny, nx), dtype)
    best_buffer = np.empty((step, ny, nx), np.float32)
    counts = np.zeros(int(ids.max(initial=0)) + 1, np.int64)  # voxels drawn with each id
    drawn = []
    for z0 in range(0, nz, step):
        z1 = min(z0 + step, nz)
        for box in drawn:
            labels_buffer[box] = 0
        drawn.clear()
        labels, best = labels_buffer[:z1 - z0], best_buffer[:z1 - z0]  # ``best`` is read only where a label is set
        for i in order[(lo[order, 0] < z1) & (hi[order, 0] > z0)]:
            a = np.maximum(lo[i], [z0, 0, 0])
            b = np.minimum(hi[i], [z1, ny, nx])
            if np.any(b <= a):
                continue
            grids = np.ogrid[a[0]:b[0], a[1]:b[1], a[2]:b[2]]
            q = sum((g - c) ** 2 for g, c in zip(grids, centres[i]))
            np.sqrt(q, out=q)
            q /= radii[i]
            box = (slice(a[0] - z0, b[0] - z0), slice(a[1], b[1]), slice(a[2], b[2]))
            drawn.append(box)
            region, region_best = labels[box], best[box]
            take = q <= 1.0
            claimed = region != 0
            if claimed.any():  # another sphere reaches into this one's box: the nearer surface loses
                take &= ~claimed | (q < region_best)
                counts -= np.bincount(region[take], minlength=len(counts))[:len(counts)]
                counts[0] = 0
            region[take] = ids[i]
            region_best[take] = q[take]
            counts[ids[i]] += np.count_nonzero(take)
        if stats is not None and z1 == nz:
            _add_label_counts(stats, counts, nz * ny * nx)
        yield z0, labels


def _add_label_counts(stats: HeaderStats, counts: np.ndarray, n_voxels: int) -> None:
    """Add a label volume of ``n_voxels`` whose value v > 0 occurs ``counts[v]`` times (the rest 0),
    with the numbers :meth:`HeaderStats.add` gives slab by slab (sums of integers: exact below 2**53)."""
    values = np.flatnonzero(counts[1:]) + 1
    weights = counts[values].astype(np.float64)
    labelled = int(counts[values].sum())
    stats.add_moments(n_voxels, float(weights @ values), float(weights @ np.square(values, dtype=np.float64)),
                      0.0 if labelled < n_voxels else float(values[0]), float(values[-1]) if len(values) else 0.0)


def resampled_slabs(model_volume, mapping, dtype=np.float32, block_planes: int = 64,
                    budget_bytes: int = 128 * 2**20):
    """Yield original-grid z slabs of a model-grid volume, trilinearly interpolated.

    Separable: each original plane mixes two model planes, then rows, then columns, so memory is
    a few model planes plus one original plane. Coordinates outside the model grid are clamped.
    """
    nz, ny, nx = mapping.original_shape
    mz, my, mx = model_volume.shape

    def axis_weights(n_target, n_source):
        src = np.clip(mapping.original_to_model(np.arange(n_target)), 0, n_source - 1)
        i0 = np.floor(src).astype(np.int64)
        i1 = np.minimum(i0 + 1, n_source - 1)
        return i0, i1, (src - i0).astype(np.float32)

    z0s, z1s, wz = axis_weights(nz, mz)
    y0s, y1s, wy = axis_weights(ny, my)
    x0s, x1s, wx = axis_weights(nx, mx)
    cache_start, cache = -1, None
    step = slab_planes((ny, nx), np.dtype(dtype).itemsize, budget_bytes)
    for s0 in range(0, nz, step):
        s1 = min(s0 + step, nz)
        out = np.empty((s1 - s0, ny, nx), dtype)
        for z in range(s0, s1):
            need_lo, need_hi = int(z0s[z]), int(z1s[z])
            if cache is None or need_lo < cache_start or need_hi >= cache_start + len(cache):
                cache_start = need_lo
                cache = np.asarray(model_volume[need_lo:min(need_lo + block_planes, mz)], dtype=np.float32)
            plane = (1 - wz[z]) * cache[need_lo - cache_start] + wz[z] * cache[need_hi - cache_start]
            rows = plane[y0s] * (1 - wy)[:, None] + plane[y1s] * wy[:, None]
            out[z - s0] = rows[:, x0s] * (1 - wx) + rows[:, x1s] * wx
        yield s0, out
