"""Chunked intermediate volumes (zarr), so big tomograms never have to fit in memory at once."""

from __future__ import annotations

import itertools
import json
import os
import struct
import sys
from pathlib import Path

import numpy as np

from vesicleflow.io import aligned_empty, open_for_io, pread_into, pwrite_all

DEFAULT_CHUNKS = (64, 64, 64)


def create_volume(path: str | Path, shape, dtype, chunks=DEFAULT_CHUNKS, attrs: dict | None = None,
                  compressed: bool | None = None):
    """Create a zarr array (to be filled slab by slab); ``path`` is usually an atomic temp path.

    Float volumes (normalized tomogram, probability) are stored uncompressed: noisy float32 shrinks
    by under 10 % with zstd, while decoding it costs several times the read itself, and every later
    stage reads these volumes again. Integer volumes (labels, masks) are compressed (:func:`fast_codec`):
    they are mostly zeros and shrink fortyfold. ``compressed`` overrides that choice (a scratch
    volume rewritten block by block is faster raw).
    """
    import zarr

    chunks = tuple(min(c, s) for c, s in zip(chunks, shape))
    if compressed is None:
        compressed = np.dtype(dtype).kind != "f"
    codec = {"compressors": fast_codec() if compressed else None}
    array = zarr.create_array(store=str(path), shape=tuple(shape), chunks=chunks, dtype=dtype,
                              fill_value=0, overwrite=True, **codec)
    if attrs:
        array.attrs.update(attrs)
    return array


def fast_codec():
    """Blosc LZ4 without shuffling: the benchmark's labels (133 M uint16 voxels, mostly zero) decode
    in 0.07 s and encode in 0.09 s of codec time, 6 MB on disk; bit shuffling saved 1 MB but decoded
    six times slower, zarr's default zstd twice slower again."""
    from zarr.codecs import BloscCodec

    return BloscCodec(cname="lz4", clevel=1, shuffle="noshuffle")


def write_block(array, start, block: np.ndarray) -> None:
    """``array[start[0]:start[0] + block.shape[0], ...] = block``, by the fastest path that stores the same.

    A block of whole chunks (those at the array's end may be partial) of an array whose chunk files
    this module can write (:class:`ChunkFiles`) goes straight into them. Otherwise zarr writes it,
    skipping its empty-chunk test when that cannot pay: zarr leaves out of the store any chunk that
    holds only the fill value, comparing every chunk it writes with it, a quarter of the CPU time of
    writing an uncompressed float32 chunk and 40 % of writing a compressed label volume (whose
    all-zero chunks compress to a few kB). Both paths store a compressed array's every chunk, and
    leave out an uncompressed array's all-fill chunks unless no chunk the block touches can be all
    fill (:func:`_touches_no_empty_chunk`); the data read back is the same either way.
    """
    store_every_chunk = bool(array.compressors) or _touches_no_empty_chunk(array, start, block)
    files = ChunkFiles.of(array)
    if files is not None and files.holds_whole_chunks(start, block.shape):
        files.write(start, block, skip_fill=not store_every_chunk)
        return
    if store_every_chunk:
        array = array.with_config({"write_empty_chunks": True})
    array[tuple(slice(a, a + n) for a, n in zip(start, block.shape))] = block


def _touches_no_empty_chunk(array, start, block: np.ndarray) -> bool:
    """Whether the fill value is zero and the block's first voxel in every chunk it touches is not
    (bit for bit, as zarr compares floats with a zero fill: -0.0 is data)."""
    if block.dtype != array.dtype or block.dtype.kind not in "biuf" or block.itemsize > 8 or not block.size:
        return False
    if np.asarray(array.fill_value).any():
        return False
    firsts = [np.unique([0, *range(-a % c, n, c)]) for a, n, c in zip(start, block.shape, array.chunks)]
    return bool(block[np.ix_(*firsts)].view(f"u{block.itemsize}").all())


def read_box(array, box: tuple[slice, ...], out: np.ndarray | None = None) -> np.ndarray:
    """``np.asarray(array[box])`` for a box of unit-step slices (axes left out: whole); through
    :class:`ChunkFiles` where it can, else zarr (or numpy).

    ``out``: an array of the array's dtype, at least the box's size, that a caller reading box after
    box reuses (a new array's pages, for a large box, cost more to fault in than the read itself);
    the result is then a view of its first elements."""
    chunked = _chunk_files_box(array, box)
    if chunked is None:
        data = np.asarray(array[tuple(box)])
        if out is None:
            return data
        target = _view_of(out, data.shape, data.dtype)
        target[...] = data
        return target
    files, starts, stops = chunked
    return files.read(starts, stops, out)


def threshold_box(array, box: tuple[slice, ...], threshold: float) -> np.ndarray:
    """``read_box(array, box) > threshold``, compared chunk by chunk where :class:`ChunkFiles` reads
    the box: the box's values are never held whole (postprocess's blocks: a quarter of the memory,
    and 0.2-0.3 s less per block than reading the floats into a new array, then comparing)."""
    chunked = _chunk_files_box(array, box)
    if chunked is None:
        return read_box(array, box) > threshold
    files, starts, stops = chunked
    return files.read(starts, stops, above=threshold)


def _chunk_files_box(array, box: tuple) -> tuple[ChunkFiles, list[int], list[int]] | None:
    """(the array's chunk files, the box's starts, its stops) where :class:`ChunkFiles` can read the
    box (a local zarr v3 layout, unit-step slices); None where zarr (or numpy) must."""
    files = ChunkFiles.of(array)
    box = (*box, *[slice(None)] * (array.ndim - len(box)))
    if files is None or len(box) != array.ndim or not all(isinstance(k, slice) for k in box):
        return None
    bounds = [key.indices(n) for key, n in zip(box, array.shape)]
    if any(step != 1 for _, _, step in bounds):
        return None
    return files, [start for start, _, _ in bounds], [max(start, stop) for start, stop, _ in bounds]


def _view_of(buffer: np.ndarray, shape, dtype) -> np.ndarray:
    """The first elements of ``buffer`` (contiguous, of ``dtype``) as an array of ``shape``."""
    size = int(np.prod(shape))
    if buffer.dtype != dtype or not buffer.flags.c_contiguous or buffer.size < size:
        raise ValueError(f"a buffer of {buffer.size} {buffer.dtype} cannot hold {tuple(shape)} {np.dtype(dtype)}")
    return buffer.reshape(-1)[:size].reshape(shape)


class ChunkFiles:
    """A local zarr v3 array's chunk files, read and written without zarr's reader and writer.

    Each chunk file of such an array is the chunk's bytes, raw or Blosc-compressed (numcodecs'
    Blosc, the codec zarr itself uses). zarr handles every chunk through an asyncio codec pipeline
    and a fresh buffer (page-faulted anew each time); here one reused chunk buffer serves a whole
    box: reading the benchmark's uncompressed probability map is 3-4x faster, and writing a label
    volume 2x. Uncompressed chunks go between that buffer and the disk by direct I/O
    (:func:`vesicleflow.io.open_for_io`). Layout, key names and fill value come from the array's own
    metadata.
    """

    def __init__(self, array, folder: Path, chunks: tuple[int, ...], codec):
        self.array, self.folder, self.chunks, self.codec = array, folder, chunks, codec
        self.dtype = np.dtype(array.dtype)
        self.compressed = codec is not None

    @classmethod
    def of(cls, array) -> ChunkFiles | None:
        """The chunk files of ``array``, or None when they are not laid out as described above."""
        from zarr.codecs import BloscCodec, BytesCodec
        from zarr.core.chunk_grids import RegularChunkGrid
        from zarr.storage import LocalStore

        metadata = getattr(array, "metadata", None)
        if getattr(metadata, "zarr_format", None) != 3 or not isinstance(array.store_path.store, LocalStore):
            return None
        codecs = metadata.codecs
        if not isinstance(metadata.chunk_grid, RegularChunkGrid) or not isinstance(codecs[0], BytesCodec):
            return None
        dtype = np.dtype(array.dtype)
        native = dtype.itemsize == 1 or (codecs[0].endian is not None and codecs[0].endian.value == sys.byteorder)
        if dtype.kind not in "biuf" or not native:
            return None
        if len(codecs) == 1:
            codec = None
        elif len(codecs) == 2 and isinstance(codecs[1], BloscCodec):
            from numcodecs import Blosc

            shuffles = {"noshuffle": Blosc.NOSHUFFLE, "shuffle": Blosc.SHUFFLE, "bitshuffle": Blosc.BITSHUFFLE}
            blosc = codecs[1]
            codec = Blosc(cname=blosc.cname.value, clevel=blosc.clevel, shuffle=shuffles[blosc.shuffle.value],
                          blocksize=blosc.blocksize)
        else:
            return None
        folder = Path(array.store_path.store.root) / array.store_path.path
        return cls(array, folder, tuple(metadata.chunk_grid.chunk_shape), codec)

    def holds_whole_chunks(self, start, shape) -> bool:
        """Whether the box [start, start + shape) is made of whole chunks (cut only by the array's end)."""
        return all(a % c == 0 and ((a + n) % c == 0 or a + n == size)
                   for a, n, c, size in zip(start, shape, self.chunks, self.array.shape))

    def _chunks_in(self, starts, stops):
        """(chunk path, the box's part of the chunk, that part's place in the box), for each chunk the box meets."""
        grid = [range(a // c, (b - 1) // c + 1) for a, b, c in zip(starts, stops, self.chunks)]
        for index in itertools.product(*grid):
            corner = [i * c for i, c in zip(index, self.chunks)]
            inside = tuple(slice(max(a, o) - o, min(b, o + c) - o)
                           for a, b, o, c in zip(starts, stops, corner, self.chunks))
            placed = tuple(slice(s.start + o - a, s.stop + o - a) for s, o, a in zip(inside, corner, starts))
            yield self.folder / self.array.metadata.encode_chunk_key(index), inside, placed

    def read(self, starts, stops, out: np.ndarray | None = None, above: float | None = None) -> np.ndarray:
        """The box [starts, stops), into ``out`` if given (see :func:`read_box`); chunks not stored
        read as the fill value. With ``above``, the box's values ``> above`` (bool; see :func:`threshold_box`)."""
        shape = [b - a for a, b in zip(starts, stops)]
        dtype = self.dtype if above is None else np.dtype(bool)
        out = np.empty(shape, dtype) if out is None else _view_of(out, shape, dtype)
        if not out.size:
            return out
        buffer = aligned_empty(self.chunks, self.dtype)
        fill = np.array(self.array.fill_value, self.dtype)  # a chunk holding only the fill value is not stored
        for path, inside, placed in self._chunks_in(starts, stops):
            values = buffer[inside] if self._read_chunk(path, buffer) else fill
            if above is None:
                out[placed] = values
            else:
                np.greater(values, above, out=out[placed])
        return out

    def _open(self, path: Path, flags: int) -> int:
        """A chunk file's descriptor: direct I/O for raw chunks (read into, written from, the aligned
        chunk buffer), the page cache for compressed ones (small, and of any length)."""
        return open_for_io(path, flags) if self.codec is None else os.open(path, flags, 0o644)

    def _read_chunk(self, path: Path, buffer: np.ndarray) -> bool:
        try:
            descriptor = self._open(path, os.O_RDONLY)
        except FileNotFoundError:
            return False
        try:
            if self.codec is None:
                complete = pread_into(descriptor, buffer, 0) == buffer.nbytes
            else:  # a Blosc frame's header: its decoded size (bytes 4-7) and its own size (12-15)
                encoded = os.read(descriptor, os.fstat(descriptor).st_size)
                sizes = struct.unpack_from("<III", encoded, 4) if len(encoded) >= 16 else (0, 0, 0)
                complete = sizes[0] == buffer.nbytes and sizes[2] == len(encoded)
                if complete:
                    self.codec.decode(encoded, out=buffer)
        finally:
            os.close(descriptor)
        if not complete:
            raise OSError(f"{path}: chunk file does not hold its {buffer.nbytes} bytes; the volume is damaged")
        return True

    def write(self, start, block: np.ndarray, skip_fill: bool) -> None:
        """Write a block of whole chunks (see :meth:`holds_whole_chunks`) at ``start``; with
        ``skip_fill``, a chunk holding only the fill value (bit for bit) is not stored, as zarr does."""
        buffer = aligned_empty(self.chunks, self.dtype)
        fill = np.array(self.array.fill_value, self.dtype).view(f"u{self.dtype.itemsize}")
        stops = [a + n for a, n in zip(start, block.shape)]
        folders = set()
        for path, inside, placed in self._chunks_in(start, stops):
            if buffer[inside].shape != buffer.shape:  # an edge chunk: stored whole, padded with the fill value
                buffer.fill(self.array.fill_value)
            buffer[inside] = block[placed]
            if skip_fill and (buffer.view(fill.dtype) == fill).all():
                path.unlink(missing_ok=True)
                continue
            if path.parent not in folders:
                path.parent.mkdir(parents=True, exist_ok=True)
                folders.add(path.parent)
            data = buffer if self.codec is None else self.codec.encode(buffer)
            descriptor = self._open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
            try:
                pwrite_all(descriptor, data, 0)
            finally:
                os.close(descriptor)


def _array_metadata(path: str | Path) -> dict | None:
    """The ``zarr.json`` document of a zarr v3 array at ``path``; None for anything else."""
    metadata = Path(path) / "zarr.json"
    if metadata.is_file():
        document = json.loads(metadata.read_text())
        if document.get("zarr_format") == 3 and document.get("node_type") == "array":
            return document
    return None


def volume_shape(path: str | Path) -> tuple[int, ...]:
    """The shape of the zarr array at ``path``; a zarr v3 array's from its ``zarr.json`` alone, without
    importing zarr (a quarter of a second, most of a stage that needs nothing else)."""
    document = _array_metadata(path)
    if document is not None:
        return tuple(int(n) for n in document["shape"])
    return tuple(open_volume(path).shape)


def volume_attributes(path: str | Path) -> dict:
    """The attributes of the zarr array at ``path``; a zarr v3 array's from its ``zarr.json`` alone, as
    :func:`volume_shape` reads its shape."""
    document = _array_metadata(path)
    if document is not None:
        return dict(document.get("attributes", {}))
    return dict(open_volume(path).attrs)


def open_volume(path: str | Path, mode: str = "r"):
    import zarr

    return zarr.open_array(store=str(path), mode=mode)


def z_slabs(n_z: int, slab: int):
    """Yield (start, stop) covering 0..n_z in slabs of at most ``slab`` planes."""
    for start in range(0, n_z, slab):
        yield start, min(start + slab, n_z)


def read_full(path: str | Path) -> np.ndarray:
    return np.asarray(open_volume(path)[...])
