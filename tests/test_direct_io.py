"""Direct I/O (O_DIRECT) for the volumes stages hand each other: aligned transfers bypass the page
cache, anything else falls back to it on the same descriptor, and every byte read or written is the
same as through the page cache (normalize's output bit for bit, MRC planes behind odd headers)."""

from __future__ import annotations

import fcntl
import os

import mrcfile
import numpy as np
import pytest

import vesicleflow.io
from vesicleflow.io import (
    DIRECT_IO_ALIGNMENT,
    DIRECT_IO_VARIABLE,
    InputError,
    aligned_empty,
    open_for_io,
    open_mrc_volume,
    pread_into,
    pwrite_all,
)
from vesicleflow.modelinfo import load_model_info
from vesicleflow.normalize import normalize_to_grid
from vesicleflow.volumes import create_volume, open_volume, read_box, read_full, write_block

pytestmark = pytest.mark.skipif(not hasattr(os, "O_DIRECT"), reason="no O_DIRECT on this platform")


def _is_direct(descriptor: int) -> bool:
    return bool(fcntl.fcntl(descriptor, fcntl.F_GETFL) & os.O_DIRECT)


def _filesystem_has_direct_io(folder) -> bool:
    try:
        os.close(os.open(folder / ".probe", os.O_WRONLY | os.O_CREAT | os.O_DIRECT, 0o644))
    except OSError:
        return False
    finally:
        (folder / ".probe").unlink(missing_ok=True)
    return True


def _direct_descriptor(path, flags) -> int:
    descriptor = open_for_io(path, flags)
    if not _is_direct(descriptor):
        os.close(descriptor)
        pytest.skip(f"the filesystem of {path} has no direct I/O")
    return descriptor


@pytest.fixture
def page_cache_fallbacks(monkeypatch) -> list:
    """The transfers that left direct I/O, recorded."""
    calls = []
    leave = vesicleflow.io._leave_direct_io

    def recording(*args):
        calls.append(args)
        leave(*args)

    monkeypatch.setattr(vesicleflow.io, "_leave_direct_io", recording)
    return calls


def test_aligned_arrays_start_on_the_boundary():
    for shape, dtype in [((3, 5, 7), np.float32), (1, np.uint8), ((64, 64, 64), np.uint16)]:
        array = aligned_empty(shape, dtype)
        assert array.ctypes.data % DIRECT_IO_ALIGNMENT == 0
        assert array.shape == np.empty(shape).shape and array.dtype == dtype and array.flags.c_contiguous


def test_aligned_transfers_stay_direct_and_unaligned_ones_fall_back(tmp_path):
    path = tmp_path / "f.raw"
    descriptor = _direct_descriptor(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC)
    try:
        block = aligned_empty(2 * DIRECT_IO_ALIGNMENT, np.uint8)
        block[:] = np.arange(block.size) % 251
        pwrite_all(descriptor, block, DIRECT_IO_ALIGNMENT)
        back = aligned_empty(block.size, np.uint8)
        assert pread_into(descriptor, back, DIRECT_IO_ALIGNMENT) == block.size
        assert _is_direct(descriptor), "an aligned transfer left direct I/O"
        assert np.array_equal(back, block)
        odd = np.arange(1000, dtype=np.uint8)  # unaligned memory, offset and length
        pwrite_all(descriptor, odd[3:], 17)
        assert not _is_direct(descriptor)
    finally:
        os.close(descriptor)
    data = np.fromfile(path, np.uint8)
    assert np.array_equal(data[17:17 + 997], odd[3:])
    assert np.array_equal(data[DIRECT_IO_ALIGNMENT:], block) and not data[1014:DIRECT_IO_ALIGNMENT].any()


def test_a_read_past_the_end_of_a_file_returns_what_is_there(tmp_path):
    path = tmp_path / "short.raw"
    np.arange(5000, dtype=np.uint8).tofile(path)  # not a whole number of blocks
    descriptor = _direct_descriptor(path, os.O_RDONLY)
    try:
        out = aligned_empty(2 * DIRECT_IO_ALIGNMENT, np.uint8)
        assert pread_into(descriptor, out, 0) == 5000
    finally:
        os.close(descriptor)
    assert np.array_equal(out[:5000], np.arange(5000, dtype=np.uint8))


def test_the_variable_turns_direct_io_off(tmp_path, monkeypatch):
    monkeypatch.setenv(DIRECT_IO_VARIABLE, "0")
    descriptor = open_for_io(tmp_path / "f.raw", os.O_WRONLY | os.O_CREAT)
    try:
        assert not _is_direct(descriptor)
    finally:
        os.close(descriptor)


@pytest.mark.parametrize("dtype", [">f4", "<i2", "int8"])
def test_mrc_planes_are_read_behind_any_header(dtype, tmp_path, page_cache_fallbacks):
    """An extended header of odd size puts the voxels at an unaligned offset; every plane range,
    the last planes included, reads as mrcfile reads it, in the file's byte order or converted;
    planes inside the file are read by direct I/O (only a read reaching the end leaves it)."""
    rng = np.random.default_rng(1)
    data = (rng.normal(size=(7, 33, 45)) * 100).astype(dtype)
    path = tmp_path / "odd.mrc"
    with mrcfile.new(path) as mrc:
        mrc.set_data(data.astype(data.dtype.newbyteorder("=")))
        mrc.set_extended_header(np.zeros(37, np.uint8))
    volume = open_mrc_volume(path)
    assert volume.layout.offset % DIRECT_IO_ALIGNMENT
    for start, stop in [(2, 5), (0, 7), (6, 7)]:
        for out_dtype in (np.dtype(np.float32), volume.dtype.newbyteorder("=")):
            out = np.empty((stop - start, 33, 45), out_dtype)
            scratch = aligned_empty(volume.scratch_bytes(len(out)), np.uint8)
            got = volume.read_into(start, out, scratch)
            assert got.dtype == out_dtype and np.array_equal(got, data[start:stop].astype(out_dtype))
            native_file = volume.dtype == out_dtype and volume.layout.offset % out_dtype.itemsize == 0
            assert np.shares_memory(got, scratch if native_file else out)  # no copy when none is needed
        if stop < 7 and _filesystem_has_direct_io(tmp_path):
            assert page_cache_fallbacks == []
    with pytest.raises(ValueError, match="scratch"):
        volume.read_into(0, np.empty((7, 33, 45), np.float32), np.empty(100, np.uint8))
    with open(path, "r+b") as handle:
        handle.truncate(volume.layout.offset + 6 * volume.plane_bytes + 10)
    with pytest.raises(InputError, match="truncated"):
        volume.read_into(5, np.empty((2, 33, 45), np.float32), aligned_empty(volume.scratch_bytes(2), np.uint8))


@pytest.mark.parametrize("evicted", ["nothing", "the second half", "everything"])
def test_mrc_planes_come_from_the_page_cache_where_the_kernel_holds_them(evicted, tmp_path, monkeypatch):
    """read_into copies the part of the file the kernel holds and reads the rest by direct I/O
    (direct reads would go to the disk for cached pages too): the same planes whatever is cached."""
    if not _filesystem_has_direct_io(tmp_path):
        pytest.skip("no direct I/O here")
    data = np.random.default_rng(2).normal(size=(40, 64, 64)).astype(np.float32)
    path = tmp_path / "t.mrc"
    with mrcfile.new(path) as mrc:
        mrc.set_data(data)
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)  # clean pages, which the kernel can drop
        size = path.stat().st_size
        first_evicted = {"nothing": size, "the second half": size // 2 // 4096 * 4096, "everything": 0}[evicted]
        os.posix_fadvise(descriptor, first_evicted, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(descriptor)
    direct_reads = []
    read = vesicleflow.io.pread_into
    monkeypatch.setattr(vesicleflow.io, "pread_into",
                        lambda descriptor, out, offset: direct_reads.append(offset) or read(descriptor, out, offset))
    volume = open_mrc_volume(path)
    out = np.empty(data.shape, np.float32)
    got = volume.read_into(0, out, aligned_empty(volume.scratch_bytes(len(out)), np.uint8))
    np.testing.assert_array_equal(got, data)
    if evicted == "nothing":
        assert direct_reads == []
    else:  # from the first page not cached (reading the header may have cached a few again)
        assert len(direct_reads) == 1 and first_evicted <= direct_reads[0] < size and direct_reads[0] % 4096 == 0


def test_chunk_files_read_and_write_the_same_bytes_either_way(tmp_path, monkeypatch, page_cache_fallbacks):
    """A float volume's chunk files (edge chunks included) are the same bytes by direct I/O or not,
    and direct I/O reads and writes every one of them."""
    data = np.random.default_rng(2).normal(size=(70, 90, 130)).astype(np.float32)
    written = {}
    for setting in ("1", "0"):
        monkeypatch.setenv(DIRECT_IO_VARIABLE, setting)
        path = tmp_path / f"v{setting}.zarr"
        write_block(create_volume(path, data.shape, "float32"), (0, 0, 0), data)
        written[setting] = {p.relative_to(path): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}
        assert np.array_equal(read_box(open_volume(path), (slice(3, 69),)), data[3:69])
    assert written["1"] == written["0"]
    assert page_cache_fallbacks == [] or not _filesystem_has_direct_io(tmp_path)


def test_normalize_writes_the_same_volume_with_and_without_direct_io(good_tomogram, tmp_path, monkeypatch):
    info = load_model_info(None)
    outputs = []
    for setting in ("1", "0"):
        monkeypatch.setenv(DIRECT_IO_VARIABLE, setting)
        outputs.append(read_full(normalize_to_grid(good_tomogram[0], tmp_path / f"n{setting}.zarr",
                                                   info.voxel_size_angstrom, info.preprocessing)))
    assert outputs[0].dtype == np.float32 and np.array_equal(outputs[0], outputs[1])
