"""normalize and stitch on several threads, with reused buffers and zarr's empty-chunk test skipped:
bit for bit what a plain in-memory computation gives, whatever the threads and block sizes, and a
failure in any worker thread is raised with no output (or scratch file) left behind."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import numpy as np
import pytest
import zarr
from scipy import ndimage

from vesicleflow import normalize, stitch
from vesicleflow.io import InputError
from vesicleflow.modelinfo import Preprocessing
from vesicleflow.volumes import ChunkFiles, create_volume, read_box, read_full, threshold_box, write_block

SHAPE = (47, 53, 61)  # odd sizes: partial slabs, bands and chunks everywhere


def lerp_in_memory(volume: np.ndarray, zoom: float) -> np.ndarray:
    """The whole volume on the model grid: linear interpolation along z, then y, then x, each
    ``lower + frac * (upper - lower)`` in float32, edges clamped."""
    out = volume
    for axis in range(3):
        positions = (np.arange(max(1, round(volume.shape[axis] * zoom))) + 0.5) / zoom - 0.5
        positions = np.clip(positions, 0, out.shape[axis] - 1)
        low = np.floor(positions).astype(np.int64)
        high = np.minimum(low + 1, out.shape[axis] - 1)
        frac = (positions - low).astype(np.float32).reshape([-1 if a == axis else 1 for a in range(3)])
        lower, upper = np.take(out, low, axis=axis), np.take(out, high, axis=axis)
        out = lower + frac * (upper - lower)
    return out


def normalize_in_memory(volume: np.ndarray, zoom: float, prep: Preprocessing) -> tuple[np.ndarray, float, float]:
    """normalize's result computed on the whole volume at once: anti-aliasing, resampling, smoothing,
    then the robust z-score (median / MAD of every voxel: these volumes are smaller than the sample)."""
    sigma_in = normalize.antialias_sigma(zoom)
    volume = ndimage.gaussian_filter(volume, sigma_in, mode="nearest") if sigma_in else volume
    resampled = lerp_in_memory(volume, zoom)
    if prep.gaussian_sigma_voxels:
        resampled = ndimage.gaussian_filter(resampled, prep.gaussian_sigma_voxels, mode="nearest")
    sample = resampled.ravel()
    centre = float(np.median(sample))
    scale = float(1.4826 * np.median(np.abs(sample - centre)))
    if prep.max_spread:
        scale = max(scale, float(sample.std()) / prep.max_spread)
    return (resampled - centre) / scale, centre, scale


def assert_bit_identical(actual: np.ndarray, expected: np.ndarray) -> None:
    assert actual.shape == expected.shape and actual.dtype == expected.dtype
    assert np.array_equal(actual.view(np.uint32), expected.view(np.uint32))


def no_leftovers(folder: Path, keep: set[str]) -> bool:
    """Nothing in ``folder`` but ``keep``: no temporary output, no scratch folder."""
    return {p.name for p in folder.iterdir()} <= keep


@pytest.mark.parametrize(("voxel", "prep"), [
    (15.0, Preprocessing(max_spread=0.7)),  # the benchmark's 15 -> 20 Å: no anti-aliasing filter
    (11.0, Preprocessing(gaussian_sigma_voxels=0.8)),  # anti-aliasing (sigma 0.41) and smoothing halos
    (26.0, Preprocessing()),  # upsampling
])
def test_normalize_equals_the_whole_volume_at_once_for_any_threads_and_slabs(mrc_factory, monkeypatch, voxel, prep):
    """Slabs of 1 to 7 output planes on 1 to 3 threads, resampled in bands of 1 to 7 rows or whole
    planes, zarr writes of 5 planes (partial chunks): every voxel once, in its place, bit for bit what
    one in-memory pass gives."""
    rng = np.random.default_rng(7)
    data = rng.normal(2.0, 1.5, SHAPE).astype(np.float32)
    path = mrc_factory("tomo.mrc", data, voxel_size_angstrom=voxel)
    expected, centre, scale = normalize_in_memory(data, voxel / 20.0, prep)
    monkeypatch.setattr(normalize, "WRITE_BYTES", 4 * expected.shape[1] * expected.shape[2] * 5)
    whole_planes = normalize.BAND_BYTES
    for planes, threads, band_rows in [(None, 1, None), (1, 3, 7), (2, 2, 1), (7, 2, None)]:
        if planes:
            monkeypatch.setattr(normalize, "slab_planes", lambda *args, n=planes, **kwargs: n)
        monkeypatch.setattr(normalize, "BAND_BYTES", 4 * SHAPE[2] * band_rows if band_rows else whole_planes)
        out = normalize.normalize_to_grid(path, path.parent / f"n{planes}_{threads}.zarr", 20.0, prep,
                                          threads=threads)
        array = zarr.open_array(str(out), mode="r")
        assert (array.attrs["zscore_centre"], array.attrs["zscore_scale"]) == (centre, scale)
        assert_bit_identical(array[...], expected)
    assert no_leftovers(path.parent, {"tomo.mrc"} | {f"n{p}_{t}.zarr" for p in (None, 1, 2, 7) for t in (1, 2, 3)})


def test_normalize_reads_int16_and_big_endian_tomograms_as_float32(tmp_path):
    """The planes are read with pread into reused buffers: other MRC modes and byte orders convert as before."""
    import mrcfile

    data = np.random.default_rng(3).integers(-300, 300, SHAPE).astype(np.int16)
    for name, array in [("int16.mrc", data), ("big.mrc", data.astype(">f4"))]:
        with mrcfile.new(tmp_path / name) as mrc:
            mrc.set_data(array)
            mrc.voxel_size = 15.0
    expected = read_full(normalize.normalize_tomogram(tmp_path / "int16.mrc", tmp_path / "a.zarr", threads=2))
    assert_bit_identical(read_full(normalize.normalize_tomogram(tmp_path / "big.mrc", tmp_path / "b.zarr")), expected)
    floats, _, _ = normalize_in_memory(data.astype(np.float32), 0.75, Preprocessing(max_spread=0.7))
    assert_bit_identical(expected, floats)


def test_normalize_reports_the_first_bad_slab_whichever_thread_fails_first(mrc_factory, monkeypatch):
    """NaN in one slab, Inf in a later one: the earlier slab's error, as with one thread, even when the
    later slab's worker fails first."""
    data = np.random.default_rng(1).normal(size=SHAPE).astype(np.float32)
    data[20, 3, 4] = np.nan
    data[40, 5, 6] = np.inf
    path = mrc_factory("nan.mrc", data)
    monkeypatch.setattr(normalize, "slab_planes", lambda *args, **kwargs: 3)
    original, failed = normalize._resample_slab, []

    def slow_to_fail_at_plane_20(*args):
        try:
            return original(*args)
        except InputError as err:
            if "z plane 20" in str(err):
                time.sleep(0.5)
            failed.append(str(err))
            raise

    monkeypatch.setattr(normalize, "_resample_slab", slow_to_fail_at_plane_20)
    with pytest.raises(InputError, match=r"nan\.mrc: 1 NaN or Inf voxel value\(s\), the first in z plane 20;"):
        normalize.normalize_tomogram(path, path.parent / "nan.zarr", threads=3)
    assert "z plane 40" in failed[0]
    assert no_leftovers(path.parent, {"nan.mrc"})


@pytest.mark.parametrize("where", ["_resample_rows", "write_block"])
def test_a_failing_normalize_worker_raises_and_leaves_nothing(mrc_factory, monkeypatch, where):
    """A worker that dies mid-volume (resampling a slab, or writing a band of the zarr) stops the stage
    with its exception: no output, no temporary, no scratch file."""
    path = mrc_factory("t.mrc", np.random.default_rng(2).normal(size=SHAPE).astype(np.float32))
    monkeypatch.setattr(normalize, "slab_planes", lambda *args, **kwargs: 2)
    monkeypatch.setattr(normalize, "WRITE_BYTES", 4 * 40 * 46 * 2)  # zarr writes of 2 of the 35 x 40 x 46 planes
    original, calls, lock = getattr(normalize, where), [], threading.Lock()

    def fails_on_the_third_call(*args, **kwargs):
        with lock:
            calls.append(1)
            if len(calls) == 3:
                raise OSError("disk full")
        return original(*args, **kwargs)

    monkeypatch.setattr(normalize, where, fails_on_the_third_call)
    with pytest.raises(OSError, match="disk full"):
        normalize.normalize_tomogram(path, path.parent / "t.zarr", threads=2)
    assert no_leftovers(path.parent, {"t.mrc"})


def make_shards(folder: Path, shape, boxes, seed=5) -> list[Path]:
    rng = np.random.default_rng(seed)
    create_volume(folder / "n.zarr", shape, "float32", attrs={"grid": {"model_voxel_size_angstrom": 20.0}})
    shards = []
    for k, (start, stop) in enumerate(boxes):
        box = [b - a for a, b in zip(start, stop)]
        attrs = {"box_start": list(start), "box_stop": list(stop), "shape": list(shape), "shard": k}
        weight = rng.uniform(0.05, 1, box).astype(np.float32)
        create_volume(folder / f"s{k}.zarr" / "probability", box, "float32", attrs=attrs)[...] = \
            rng.uniform(0, 1, box).astype(np.float32)
        create_volume(folder / f"s{k}.zarr" / "weight", box, "float32", attrs=attrs, compressed=True)[...] = weight
        shards.append(folder / f"s{k}.zarr")
    return shards


def stitch_in_memory(shards: list[Path], shape) -> np.ndarray:
    """sum(w_k*p_k) / sum(w_k) over whole volumes, summed in shard order from zero as stitch does."""
    numerator, denominator = np.zeros(shape, np.float32), np.zeros(shape, np.float32)
    for shard in shards:
        probability = zarr.open_array(str(shard / "probability"), mode="r")
        box = tuple(slice(a, b) for a, b in zip(probability.attrs["box_start"], probability.attrs["box_stop"]))
        weight = read_full(shard / "weight")
        numerator[box] += probability[...] * weight
        denominator[box] += weight
    return numerator / denominator


def test_stitch_equals_the_whole_volume_at_once_for_any_threads_and_blocks(tmp_path, monkeypatch):
    """Overlapping shards of odd boxes, 64-row bands or whole slabs, 1 to 3 threads: every block once."""
    shape = (150, 141, 77)
    boxes = [((0, 0, 0), (90, 141, 77)), ((60, 0, 0), (150, 141, 77)), ((10, 20, 5), (130, 100, 70))]
    shards = make_shards(tmp_path, shape, boxes)
    expected = stitch_in_memory(shards, shape)
    for block_bytes, threads in [(stitch.BLOCK_BYTES, 1), (1, 2), (1, 3), (stitch.BLOCK_BYTES, 2)]:
        monkeypatch.setattr(stitch, "BLOCK_BYTES", block_bytes)
        out = stitch.stitch_shards(shards, tmp_path / "n.zarr", tmp_path / f"p{block_bytes}_{threads}.zarr",
                                   threads=threads)
        assert_bit_identical(read_full(out), expected)
        assert dict(zarr.open_array(str(out), mode="r").attrs) == {"grid": {"model_voxel_size_angstrom": 20.0}}


def test_one_shard_covering_the_volume_becomes_the_map_by_links(tmp_path, monkeypatch):
    """The default single shard is the probability map itself: its chunk files are hard-linked (copied
    where linking fails), bit for bit, with the normalized volume's attributes; the map outlives the
    shard (a temp() output Snakemake deletes). A shard laid out otherwise is recomputed instead."""
    import shutil

    shape = (150, 141, 77)
    (shard,) = make_shards(tmp_path, shape, [((0, 0, 0), shape)])
    expected = read_full(shard / "probability")
    chunk = Path("c", "1", "1", "0")

    linked = stitch.stitch_shards([shard], tmp_path / "n.zarr", tmp_path / "linked.zarr", threads=2)
    assert (linked / chunk).stat().st_ino == (shard / "probability" / chunk).stat().st_ino
    assert dict(zarr.open_array(str(linked), mode="r").attrs) == {"grid": {"model_voxel_size_angstrom": 20.0}}

    def cannot_link(source, target):
        raise OSError(18, "Invalid cross-device link")

    monkeypatch.setattr(stitch.os, "link", cannot_link)
    copied = stitch.stitch_shards([shard], tmp_path / "n.zarr", tmp_path / "copied.zarr", threads=2)
    assert (copied / chunk).stat().st_nlink == 1
    shutil.rmtree(shard)
    assert_bit_identical(read_full(linked), expected)
    assert_bit_identical(read_full(copied), expected)

    (compressed,) = make_shards(tmp_path / "other", shape, [((0, 0, 0), shape)])
    probability = read_full(compressed / "probability")
    attrs = dict(zarr.open_array(str(compressed / "probability"), mode="r").attrs)
    shutil.rmtree(compressed / "probability")
    create_volume(compressed / "probability", shape, "float32", attrs=attrs, compressed=True)[...] = probability
    computed = stitch.stitch_shards([compressed], tmp_path / "n.zarr", tmp_path / "computed.zarr", threads=2)
    assert (computed / chunk).stat().st_size == 4 * 64**3  # written by stitch, uncompressed
    np.testing.assert_allclose(read_full(computed), probability, rtol=2e-7, atol=0)


def test_a_plans_only_shard_needs_no_weight_and_is_never_combined(tmp_path):
    """infer writes a plan's only shard without its weight: stitched (here recomputed, its probability
    stored compressed), the map is its probability bit for bit; alongside another shard it is refused."""
    import shutil

    shape = (150, 141, 77)
    only, other = make_shards(tmp_path, shape, [((0, 0, 0), shape), ((0, 0, 0), shape)])
    probability = read_full(only / "probability")
    attrs = {**dict(zarr.open_array(str(only / "probability"), mode="r").attrs), "only_shard": True}
    shutil.rmtree(only)
    create_volume(only / "probability", shape, "float32", attrs=attrs, compressed=True)[...] = probability
    stitched = stitch.stitch_shards([only], tmp_path / "n.zarr", tmp_path / "map.zarr", threads=2)
    assert_bit_identical(read_full(stitched), probability)
    with pytest.raises(ValueError, match="the only shard of its tiling plan"):
        stitch.stitch_shards([only, other], tmp_path / "n.zarr", tmp_path / "mixed.zarr", threads=2)
    assert not (tmp_path / "mixed.zarr").exists()


def test_stitch_reports_uncovered_voxels_and_worker_failures_with_no_output(tmp_path, monkeypatch):
    """A gap between shards is reported for the first block it is in; a worker that fails mid-volume
    stops the stage with its exception. Either way no output or temporary is left."""
    shape = (150, 141, 77)
    gap = make_shards(tmp_path, shape, [((0, 0, 0), (70, 141, 77)), ((75, 0, 0), (150, 141, 77))])
    monkeypatch.setattr(stitch, "BLOCK_BYTES", 1)
    with pytest.raises(ValueError, match="block z 64-128, y 0-64: some voxels were covered by no window"):
        stitch.stitch_shards(gap, tmp_path / "n.zarr", tmp_path / "p.zarr", threads=3)
    assert not (tmp_path / "p.zarr").exists()

    whole = make_shards(tmp_path / "whole", shape, [((0, 0, 0), (90, 141, 77)), ((60, 0, 0), shape)])
    original, calls, lock = stitch.write_block, [], threading.Lock()

    def fails_on_the_fourth_write(*args):
        with lock:
            calls.append(1)
            if len(calls) == 4:
                raise OSError("disk full")
        return original(*args)

    monkeypatch.setattr(stitch, "write_block", fails_on_the_fourth_write)
    with pytest.raises(OSError, match="disk full"):
        stitch.stitch_shards(whole, tmp_path / "whole" / "n.zarr", tmp_path / "q.zarr", threads=2)
    assert no_leftovers(tmp_path, {"n.zarr", "s0.zarr", "s1.zarr", "whole"})


def test_write_block_leaves_the_same_store_as_plain_assignment(tmp_path, monkeypatch):
    """With zarr's empty-chunk test skipped or not, the same chunks are stored (none for an all-zero
    chunk, one for a chunk of -0.0) and read back the same values."""
    shape = (70, 130, 66)
    block = np.random.default_rng(4).normal(size=(60, 120, 66)).astype(np.float32)
    block[:, 60:120, 64:] = 0.0  # the block's part of chunk (0, 1, 1) is all zeros: not stored
    negative_zeros = np.full((6, 50, 66), -0.0, np.float32)  # not the fill value bit for bit: stored
    fast_paths = []
    with_config = zarr.Array.with_config
    monkeypatch.setattr(zarr.Array, "with_config", lambda *args: fast_paths.append(1) or with_config(*args))
    for offset in (0, 3):
        writes = [((offset, offset, 0), block), ((64, 70 + offset, 0), negative_zeros)]
        plain = create_volume(tmp_path / f"plain{offset}.zarr", shape, "float32")
        fast = create_volume(tmp_path / f"fast{offset}.zarr", shape, "float32")
        for start, values in writes:
            plain[tuple(slice(a, a + n) for a, n in zip(start, values.shape))] = values
            write_block(fast, start, values)
        chunks = [sorted(str(p.relative_to(folder)) for p in folder.rglob("c/*/*/*"))
                  for folder in (tmp_path / f"plain{offset}.zarr", tmp_path / f"fast{offset}.zarr")]
        assert chunks[0] == chunks[1] and "c/0/1/1" not in chunks[0] and "c/1/1/1" in chunks[0]
        assert_bit_identical(fast[...], plain[...])
    assert len(fast_paths) == 2  # the -0.0 blocks skipped zarr's test, the blocks with a zero chunk did not


def test_write_block_stores_a_compressed_volumes_empty_chunks_and_reads_back_the_same(tmp_path):
    """A compressed (label) volume is written without zarr's empty-chunk test: its all-zero chunks are
    stored too (a few kB each), and the values read back equal plain assignment's."""
    labels = np.zeros((64, 128, 64), np.uint16)
    labels[10:20, 5:30, 7:40] = 7  # chunk (0, 0, 0) holds a label, chunk (0, 1, 0) is all zeros
    plain = create_volume(tmp_path / "plain.zarr", labels.shape, "uint16")
    plain[...] = labels
    fast = create_volume(tmp_path / "fast.zarr", labels.shape, "uint16")
    write_block(fast, (0, 0, 0), labels)
    assert not (tmp_path / "plain.zarr" / "c" / "0" / "1" / "0").exists()
    assert (tmp_path / "fast.zarr" / "c" / "0" / "1" / "0").stat().st_size < 4096
    np.testing.assert_array_equal(fast[...], plain[...])
    np.testing.assert_array_equal(read_full(tmp_path / "fast.zarr"), labels)


def test_read_box_reads_chunk_files_as_zarr_would(tmp_path, monkeypatch):
    """Boxes across partial edge chunks and chunks never stored (read as the fill value) come out of
    raw and Blosc-compressed chunk files as zarr reads them, without zarr's reader; strided keys go
    through zarr; either way into a caller's reused buffer too, or compared with a threshold chunk by
    chunk as the whole box would be; a truncated chunk file is an error naming it."""
    rng = np.random.default_rng(9)
    shape = (70, 130, 66)
    values = rng.normal(size=shape).astype(np.float32)
    values[:64, 64:128, :64] = 2.5  # chunk (0, 1, 0) holds only the fill value: zarr does not store it
    values[5, 1, 1] = 0.3  # float32(0.3) > 0.3 in float64 only: the comparison's precision shows
    raw = zarr.create_array(store=str(tmp_path / "raw.zarr"), shape=shape, chunks=(64, 64, 64), dtype="float32",
                            fill_value=2.5, compressors=None)
    raw[...] = values
    assert not (tmp_path / "raw.zarr" / "c" / "0" / "1" / "0").exists()
    labels = create_volume(tmp_path / "labels.zarr", shape, "uint16")
    labels[...] = (values > 1).astype(np.uint16)
    boxes = [(slice(0, 70), slice(0, 130), slice(0, 66)), (slice(3, 69), slice(60, 129), slice(1, 65)),
             (slice(64, 70), slice(128, 130), slice(64, 66)), (slice(10, 10), slice(0, 5), slice(0, 5)),
             (slice(None), slice(-20, None), slice(5, 200)), (slice(2, 67),)]
    zarr_reads = []
    getitem = zarr.Array.__getitem__
    monkeypatch.setattr(zarr.Array, "__getitem__", lambda self, key: zarr_reads.append(key) or getitem(self, key))
    reused = np.full(values.size + 7, np.nan, np.float32)  # a caller's buffer, larger than any box
    for box in boxes:
        assert_bit_identical(read_box(raw, box), values[box])
        into = read_box(raw, box, out=reused)
        assert_bit_identical(into, values[box])
        assert into.size == 0 or np.shares_memory(into, reused)
        np.testing.assert_array_equal(read_box(labels, box), (values[box] > 1).astype(np.uint16))
        for threshold in (0.3, np.float64(0.3), 2.5):  # float32 and float64 comparisons; the fill value's chunk
            expected = values[box] > threshold
            compared = threshold_box(raw, box, threshold)
            assert compared.dtype == bool and compared.shape == expected.shape
            np.testing.assert_array_equal(compared, expected)
    assert zarr_reads == []
    np.testing.assert_array_equal(threshold_box(raw, (slice(0, 70, 2),), 0.3), values[::2] > 0.3)
    zarr_reads.clear()
    assert_bit_identical(read_box(raw, (slice(0, 70, 2), slice(None), slice(None))), values[::2])
    assert_bit_identical(read_box(raw, (slice(0, 70, 2),), out=reused), values[::2])
    assert len(zarr_reads) == 2
    with pytest.raises(ValueError, match="cannot hold"):
        read_box(raw, boxes[0], out=reused[:100])
    with pytest.raises(ValueError, match="cannot hold"):
        read_box(labels, boxes[0], out=reused)  # float32 buffer for uint16 labels
    for volume in ("raw.zarr", "labels.zarr"):
        chunk = tmp_path / volume / "c" / "1" / "1" / "1"
        chunk.write_bytes(chunk.read_bytes()[:-10])
        with pytest.raises(OSError, match="c/1/1/1"):
            read_box(raw if volume == "raw.zarr" else labels, boxes[0])


def test_write_block_of_whole_chunks_writes_the_chunk_files_zarr_would_read(tmp_path, monkeypatch):
    """Blocks of whole chunks (edge chunks partial) go into the chunk files without zarr's writer, raw
    and compressed; zarr reads back what was written, an uncompressed volume's all-zero chunks are
    left out (and one rewritten to zeros is removed) as zarr leaves them out, and a block that cuts
    chunks is written by zarr."""
    rng = np.random.default_rng(10)
    shape = (70, 130, 66)
    zarr_writes = []
    setitem = zarr.Array.__setitem__
    monkeypatch.setattr(zarr.Array, "__setitem__",
                        lambda self, key, value: zarr_writes.append(key) or setitem(self, key, value))
    for dtype in ("float32", "uint16"):
        values = (rng.normal(size=shape) * 5).astype(dtype)
        values[:64, 64:128, :64] = 0
        fast = create_volume(tmp_path / f"fast_{dtype}.zarr", shape, dtype)
        write_block(fast, (0, 0, 0), values[:64])
        write_block(fast, (64, 0, 0), values[64:])
        assert zarr_writes == []
        np.testing.assert_array_equal(fast[...], values)
        plain = create_volume(tmp_path / f"plain_{dtype}.zarr", shape, dtype)
        setitem(plain, (slice(None),) * 3, values)
        stored = [sorted(str(p.relative_to(folder)) for p in folder.rglob("c/*/*/*"))
                  for folder in (tmp_path / f"fast_{dtype}.zarr", tmp_path / f"plain_{dtype}.zarr")]
        assert ("c/0/1/0" in stored[0]) == (dtype == "uint16")  # compressed: every chunk stored, as before
        assert [key for key in stored[0] if key != "c/0/1/0"] == [key for key in stored[1] if key != "c/0/1/0"]
    fast = create_volume(tmp_path / "rewritten.zarr", shape, "float32")
    write_block(fast, (0, 0, 0), np.ones(shape, np.float32))
    write_block(fast, (0, 64, 0), np.zeros((70, 64, 66), np.float32))
    assert not (tmp_path / "rewritten.zarr" / "c" / "0" / "1" / "0").exists()
    np.testing.assert_array_equal(fast[:, 64:128], 0)
    write_block(fast, (3, 0, 0), np.full((5, 5, 5), 7, np.float32))
    assert len(zarr_writes) == 1 and fast[3, 0, 0] == 7 and fast[2, 0, 0] == 1


@pytest.mark.parametrize("compressor", ["blosc-zstd-bitshuffle", "zstd"])
def test_chunk_files_follow_the_arrays_own_codec(tmp_path, compressor):
    """Another Blosc set-up is read and written through the chunk files with its own settings; a
    codec they do not handle (zarr's zstd) goes through zarr; either way zarr reads back the data."""
    from zarr.codecs import BloscCodec, ZstdCodec

    codec = BloscCodec(cname="zstd", clevel=3, shuffle="bitshuffle") if compressor.startswith("blosc") else ZstdCodec()
    values = np.random.default_rng(11).integers(0, 5, size=(70, 130, 66)).astype(np.uint16)
    array = zarr.create_array(store=str(tmp_path / "v.zarr"), shape=values.shape, chunks=(64, 64, 64),
                              dtype="uint16", fill_value=0, compressors=codec)
    files = ChunkFiles.of(array)
    assert (files is not None) == compressor.startswith("blosc")
    if files is not None:
        assert files.codec.get_config()["shuffle"] == 2 and files.codec.get_config()["cname"] == "zstd"
    write_block(array, (0, 0, 0), values)
    np.testing.assert_array_equal(zarr.open_array(str(tmp_path / "v.zarr"), mode="r")[...], values)
    np.testing.assert_array_equal(read_box(array, (slice(5, 70), slice(60, 130))), values[5:, 60:])
