"""Each stage's library function on small arrays, with assertions that would catch real bugs."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from conftest import shell_volume

from vesicleflow.grid import GridMapping
from vesicleflow.io import InputError, read_tomogram_info
from vesicleflow.normalize import normalize_tomogram, read_grid
from vesicleflow.postprocess import segment_block, separate_instances
from vesicleflow.spherefit import fit_sphere, fit_sphere_to_points, resolve_overlaps
from vesicleflow.stitch import stitch_shards
from vesicleflow.tiling import gaussian_importance, plan_windows, window_starts
from vesicleflow.volumes import create_volume, read_full


def test_grid_mapping_round_trip_and_physical_alignment():
    mapping = GridMapping((100, 80, 60), 10.0, 20.0)
    assert mapping.model_shape == (50, 40, 30)
    index = np.array([0.0, 17.3, 99.0])
    np.testing.assert_allclose(mapping.model_to_original(mapping.original_to_model(index)), index)
    # voxel 0 and 1 of the original (10 Å) share model voxel 0 (20 Å): its centre is between them
    assert mapping.model_to_original(0) == pytest.approx(0.5)


def test_normalize_rescales_and_zscores(mrc_factory):
    rng = np.random.default_rng(0)
    data = (rng.normal(5.0, 3.0, (40, 64, 64))).astype(np.float32)
    path = mrc_factory("tomo.mrc", data, voxel_size_angstrom=10.0)
    out = normalize_tomogram(path, path.parent / "norm.zarr")  # bundled model: 20 Å
    normalized = read_full(out)
    assert normalized.shape == (20, 32, 32)
    assert abs(float(np.median(normalized))) < 0.05
    mapping = read_grid(out)
    assert mapping.original_voxel_size_angstrom == 10.0 and mapping.original_shape == (40, 64, 64)


def test_max_spread_tames_a_high_contrast_tomogram(mrc_factory):
    """Strong dark shells in little noise: the MAD alone makes them extreme; max_spread caps the std."""
    from vesicleflow.modelinfo import Preprocessing
    from vesicleflow.normalize import normalize_to_grid

    data = shell_volume((40, 64, 64), (20, 32, 32), 12, 3, noise=0.05) * 5.0
    path = mrc_factory("tomo.mrc", data, voxel_size_angstrom=20.0)
    plain = read_full(normalize_to_grid(path, path.parent / "plain.zarr", 20.0, Preprocessing()))
    capped = read_full(normalize_to_grid(path, path.parent / "capped.zarr", 20.0, Preprocessing(max_spread=1.0)))
    assert plain.std() > 2.0
    assert capped.std() == pytest.approx(1.0, abs=0.05)
    np.testing.assert_allclose(capped, plain / plain.std(), rtol=0.05, atol=0.05)


def test_scratch_plane_file_reads_back_what_was_written(tmp_path):
    from vesicleflow.normalize import _PlaneFile

    data = np.random.default_rng(2).normal(size=(11, 6, 7)).astype(np.float32)
    with _PlaneFile(tmp_path / "raw.f32", data.shape) as planes:
        for start in range(0, 11, 4):
            planes.write(start, data[start:start + 4])
        for key in [np.s_[0:11], np.s_[3:9], np.s_[1:11:3, ::2, ::3], np.s_[10:11, 5]]:
            np.testing.assert_array_equal(planes[key], data[key])


def test_normalize_streams_to_the_same_values_as_one_in_memory_pass(mrc_factory, monkeypatch):
    """Slabs, the scratch file and chunk-row writes change nothing: equal to resampling all at once."""
    from vesicleflow import normalize

    rng = np.random.default_rng(1)
    data = rng.normal(0.0, 1.0, (150, 70, 90)).astype(np.float32)
    path = mrc_factory("tomo.mrc", data, voxel_size_angstrom=13.0)
    whole = read_full(normalize_tomogram(path, path.parent / "whole.zarr"))
    monkeypatch.setattr(normalize, "BLOCK_BYTES", 4 * 70 * 90 * 12)  # a few planes per slab
    monkeypatch.setattr(normalize, "WRITE_BYTES", 4 * 45 * 59 * 5)  # five planes per zarr write
    streamed = read_full(normalize_tomogram(path, path.parent / "streamed.zarr"))
    np.testing.assert_array_equal(streamed, whole)
    assert not list(path.parent.glob(".*"))  # no scratch file or temporary left behind


def test_skipping_a_negligible_antialias_filter_changes_values_below_1e_5(mrc_factory, monkeypatch):
    """15 -> 20 Å asks for sigma 0.17 voxel, whose neighbour taps weigh ~1e-8: skipping it is exact
    to float32 rounding, while a real filter (10 -> 20 Å, sigma 0.5) is still applied."""
    from vesicleflow import normalize

    assert normalize.antialias_sigma(15 / 20) == 0.0
    assert normalize.antialias_sigma(10 / 20) == 0.5
    data = np.random.default_rng(4).normal(0.0, 1.0, (40, 64, 64)).astype(np.float32)
    path = mrc_factory("tomo.mrc", data, voxel_size_angstrom=15.0)
    skipped = read_full(normalize_tomogram(path, path.parent / "skipped.zarr"))
    monkeypatch.setattr(normalize, "NEGLIGIBLE_SIGMA", 0.0)
    filtered = read_full(normalize_tomogram(path, path.parent / "filtered.zarr"))
    assert 0 < np.abs(skipped - filtered).max() < 1e-5


def test_normalize_refuses_constant_and_nan_volumes(mrc_factory):
    constant = mrc_factory("flat.mrc", np.ones((16, 32, 32), np.float32))
    with pytest.raises(InputError, match="constant"):
        normalize_tomogram(constant, constant.parent / "flat.zarr")
    data = np.ones((16, 32, 32), np.float32)
    data[3, 4, 5] = np.nan
    nan = mrc_factory("nan.mrc", data)
    with pytest.raises(InputError, match="NaN"):
        normalize_tomogram(nan, nan.parent / "nan.zarr")
    assert not (nan.parent / "nan.zarr").exists()


@pytest.mark.parametrize("voxel", [0.0, 1.0, 500.0])
def test_implausible_voxel_size_is_an_error(mrc_factory, voxel):
    path = mrc_factory("bad.mrc", np.zeros((8, 8, 8), np.float32), voxel_size_angstrom=voxel)
    with pytest.raises(InputError, match="voxel size"):
        read_tomogram_info(path)
    assert read_tomogram_info(path, voxel_size_override=14.0).voxel_size_angstrom == 14.0


def test_window_plan_covers_volume_and_shards_partition_it():
    assert window_starts(100, 64, 0.25) == [0, 36]
    assert window_starts(40, 64, 0.25) == [0]
    plan = plan_windows((70, 150, 130), 64, 0.25, shards=3)
    covered = np.zeros((70, 150, 130), bool)
    for z, y, x in plan["windows"]:
        covered[z:z + 64, y:y + 64, x:x + 64] = True
    assert covered.all()
    indices = sorted(i for shard in plan["shards"] for i in shard)
    assert indices == list(range(len(plan["windows"])))


def _write_shard(path, box_start, box_stop, weighted, weight, shape):
    """A shard as infer writes it, from its accumulated sum(w*p) and sum(w)."""
    attrs = {"box_start": box_start, "box_stop": box_stop, "shape": list(shape)}
    probability = np.divide(weighted, weight, out=np.zeros_like(weighted), where=weight > 0)
    create_volume(path / "probability", weighted.shape, "float32", attrs=attrs)[...] = probability
    create_volume(path / "weight", weight.shape, "float32", attrs=attrs)[...] = weight


def test_stitching_a_constant_prediction_gives_a_constant_map(tmp_path):
    shape = (40, 90, 90)
    normalized = tmp_path / "norm.zarr"
    create_volume(normalized, shape, "float32", attrs={"grid": {}})
    plan = plan_windows(shape, 32, 0.5, shards=2)
    weights = gaussian_importance(32)
    shards = []
    for k, members in enumerate(plan["shards"]):
        origins = np.array([plan["windows"][i] for i in members])
        start, stop = origins.min(0), np.minimum(origins.max(0) + 32, shape)
        acc_p = np.zeros(stop - start, np.float32)
        acc_w = np.zeros(stop - start, np.float32)
        for origin in origins:
            box = tuple(slice(o - s, min(o + 32, e) - s) for o, s, e in zip(origin, start, stop))
            crop = tuple(slice(0, b.stop - b.start) for b in box)
            acc_p[box] += 0.7 * weights[crop]
            acc_w[box] += weights[crop]
        _write_shard(tmp_path / f"s{k}.zarr", start.tolist(), stop.tolist(), acc_p, acc_w, shape)
        shards.append(tmp_path / f"s{k}.zarr")
    out = stitch_shards(shards, normalized, tmp_path / "prob.zarr")
    np.testing.assert_allclose(read_full(out), 0.7, rtol=1e-5)


def test_gaussian_importance_is_centred_and_floored():
    weights = gaussian_importance(32)
    assert weights.max() == pytest.approx(weights[15, 15, 15], rel=1e-6)
    assert weights.min() > 0


def test_touching_balls_are_separated_and_small_objects_dropped():
    grid = np.indices((40, 80, 80))
    ball = lambda c, r: sum((g - v) ** 2 for g, v in zip(grid, c)) <= r**2  # noqa: E731
    foreground = ball((20, 40, 25), 10) | ball((20, 40, 44), 9) | ball((20, 10, 70), 2)
    labels = separate_instances(foreground, voxel_size_nm=2.0, min_radius_nm=8.0, max_radius_nm=40.0)
    assert labels.max() == 2
    assert labels[20, 40, 25] != labels[20, 40, 44] and labels[20, 40, 25] and labels[20, 40, 44]
    assert labels[20, 10, 70] == 0


def _whole_block_segmentation(foreground, voxel_nm, min_radius_nm):
    """The straightforward reference: one distance transform and one watershed over the whole block."""
    from scipy import ndimage
    from skimage.feature import peak_local_max
    from skimage.segmentation import watershed

    distance = ndimage.distance_transform_edt(foreground, sampling=voxel_nm).astype(np.float32)
    components, _ = ndimage.label(foreground)
    peaks = peak_local_max(distance, min_distance=round(min_radius_nm / voxel_nm), threshold_abs=0.5 * min_radius_nm,
                           labels=components, exclude_border=False)
    peaks = peaks[np.lexsort(peaks.T[::-1])]
    markers = np.zeros(foreground.shape, np.int32)
    markers[tuple(peaks.T)] = np.arange(1, len(peaks) + 1)
    labels = watershed(-distance, markers, mask=foreground)
    return labels, peaks, np.asarray(ndimage.maximum(distance, labels, np.arange(1, len(peaks) + 1)))


def test_per_component_segmentation_matches_the_whole_block_reference():
    """Splitting each component in its own box is the speed-up; only watershed ties between two
    touching objects may fall the other way (documented tolerance: < 0.1 % of foreground voxels)."""
    rng = np.random.default_rng(4)
    grid = np.indices((48, 96, 96))
    foreground = np.zeros(grid.shape[1:], bool)
    for _ in range(40):  # clustered, partly touching balls of 7-12 voxels
        centre, radius = rng.uniform([8, 8, 8], [40, 88, 88]), rng.uniform(7, 12)
        foreground |= sum((g - c) ** 2 for g, c in zip(grid, centre)) <= radius**2
    labels, peaks, inscribed = segment_block(foreground, 2.0, 8.0)
    ref_labels, ref_peaks, ref_inscribed = _whole_block_segmentation(foreground, 2.0, 8.0)
    np.testing.assert_array_equal(peaks, ref_peaks)
    np.testing.assert_allclose(inscribed, ref_inscribed)
    differ = labels != ref_labels
    assert differ.sum() <= 1e-3 * foreground.sum()
    assert (labels[differ] > 0).all() and (ref_labels[differ] > 0).all()  # ties between objects, never lost


def test_algebraic_sphere_fit_is_exact_on_points():
    rng = np.random.default_rng(1)
    directions = rng.normal(size=(200, 3))
    directions /= np.linalg.norm(directions, axis=1, keepdims=True)
    centre, radius = fit_sphere_to_points(np.array([3.0, -2.0, 7.5]) + 11.0 * directions)
    np.testing.assert_allclose(centre, [3.0, -2.0, 7.5], atol=1e-9)
    assert radius == pytest.approx(11.0)


@pytest.mark.parametrize("noise", [0.0, 0.3])
def test_synthetic_shell_fitted_within_half_a_voxel(noise):
    true_centre = np.array([30.3, 31.6, 29.2])
    membrane_radius, thickness = 12.4, 3.0
    volume = shell_volume((64, 64, 64), true_centre, membrane_radius, thickness, noise=noise)
    voxel_nm = 1.0
    guess = true_centre + np.array([1.5, -1.2, 1.0])
    fit = fit_sphere(volume, guess, membrane_radius + 1.5 + 2.0, voxel_nm)
    assert fit is not None
    assert np.linalg.norm(np.array([fit.z, fit.y, fit.x]) - true_centre) < 0.5
    assert abs(fit.membrane_radius_nm - membrane_radius) < 0.5
    assert fit.radius_nm == pytest.approx(fit.membrane_radius_nm + 4.5 / 2)  # default bilayer thickness
    assert 2.5 < fit.membrane_thickness_nm < 5.0
    assert fit.fit_score > 0.8


def test_overlapping_spheres_keep_the_better_one():
    table = pd.DataFrame({
        "z": [10.0, 10.0, 10.0], "y": [10.0, 10.0, 40.0], "x": [10.0, 14.0, 10.0],
        "radius_nm": [10.0, 10.0, 10.0], "fit_score": [0.9, 0.6, 0.9], "membrane_contrast": [1.0, 1.0, 1.0],
        "outlier_reason": ["", "", ""],
    })
    flagged = resolve_overlaps(table, voxel_nm=1.0, tolerance_nm=2.0)
    assert flagged.tolist() == [False, True, False]


def test_sharded_inference_stitches_to_the_one_shard_map(mrc_factory, tmp_path):
    from vesicleflow.infer import infer_shard
    from vesicleflow.tiling import tile_tomogram

    rng = np.random.default_rng(3)
    path = mrc_factory("t.mrc", rng.normal(size=(40, 100, 90)).astype(np.float32), voxel_size_angstrom=20.0)
    normalized = normalize_tomogram(path, tmp_path / "n.zarr")
    maps = {}
    for shards in (1, 3):
        plan = tmp_path / f"plan{shards}.json"
        tile_tomogram(normalized, plan, window=32, overlap=0.25, shards=shards)
        outputs = [infer_shard(normalized, plan, k, tmp_path / f"s{shards}_{k}.zarr", batch_size=2, threads=1)
                   for k in range(shards)]
        maps[shards] = read_full(stitch_shards(outputs, normalized, tmp_path / f"p{shards}.zarr"))
    assert maps[1].shape == (40, 100, 90)
    np.testing.assert_allclose(maps[3], maps[1], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("window, shards, keep_weight",
                         [(32, 1, False), (64, 1, False), (32, 1, True), (32, 3, True), (96, 2, True)])
def test_ring_accumulator_hands_out_the_whole_box_sums(window, shards, keep_weight):
    """The accumulators keep only a few chunk rows of planes (a ring that wraps several times over a
    deep box): the rows they hand out are bit for bit the whole box's sum(w*p) / sum(w) and sum(w),
    in order, each once, however the plan is split into shards; summing sum(w) a tile of y rows at
    a time (when the weight is not kept, as for a plan's only shard; 70 rows here, so a tile of 64
    and one of 6) divides by the same numbers."""
    import torch

    from vesicleflow.infer import WEIGHT_TILE_ROWS, _Accumulator, accumulator_planes
    from vesicleflow.tiling import shard_box

    shape = (300, 70, 50)
    plan = plan_windows(shape, window, 0.25, shards)
    weights = gaussian_importance(window)
    rng = np.random.default_rng(window + shards)
    for shard in range(shards):
        start, stop = shard_box(plan, shard)
        box = [b - a for a, b in zip(start, stop)]
        acc = _Accumulator(box, window, weights, torch.device("cpu"), keep_weight=keep_weight)
        assert acc.tile_rows == (box[1] if keep_weight else WEIGHT_TILE_ROWS) and box[1] > WEIGHT_TILE_ROWS
        assert acc.depth == accumulator_planes(window, box[0]) < box[0] or shards > 1
        numerator, denominator = np.zeros(box, np.float32), np.zeros(box, np.float32)
        rows = []
        for index in plan["shards"][shard]:
            origin = plan["windows"][index]
            local = tuple(slice(o - s, min(o + window, e) - s) for o, s, e in zip(origin, start, stop))
            crop = tuple(slice(0, sl.stop - sl.start) for sl in local)
            probability = rng.random((window,) * 3, dtype=np.float32)
            rows += [(z, p.copy(), w if w is None else w.copy()) for z, p, w in acc.finished_rows(local[0].start)]
            acc.add(local, crop, torch.from_numpy(probability))
            numerator[local] += probability[crop] * weights[crop]
            denominator[local] += weights[crop]
        rows += [(z, p.copy(), w if w is None else w.copy()) for z, p, w in acc.finished_rows(box[0])]
        assert [z for z, _, _ in rows] == list(range(0, box[0], 64))
        with np.errstate(invalid="ignore"):
            expected = np.nan_to_num(numerator / denominator, nan=0.0)
        np.testing.assert_array_equal(np.concatenate([p for _, p, _ in rows]), expected)
        if keep_weight:
            np.testing.assert_array_equal(np.concatenate([w for _, _, w in rows]), denominator)
        else:
            assert all(w is None for _, _, w in rows)
        with pytest.raises(ValueError, match="outside the accumulators"):
            acc.add((slice(0, 5), slice(0, 5), slice(0, 5)), (slice(0, 5),) * 3, torch.zeros((window,) * 3))


def test_accumulator_without_weight_refuses_voxels_no_window_reaches():
    """A plan's only shard is written without its weight, so a voxel no window reaches would be a
    silent 0: the accumulator stops instead, naming the planes."""
    import torch

    from vesicleflow.infer import _Accumulator

    window = 16
    acc = _Accumulator((16, 80, 16), window, gaussian_importance(window), torch.device("cpu"), keep_weight=False)
    for y in (0, 16, 32, 48):  # y rows 64-79, the second tile of summed weights, left out
        local = (slice(0, 16), slice(y, y + 16), slice(0, 16))
        acc.add(local, (slice(0, 16),) * 3, torch.full((window,) * 3, 0.5))
    with pytest.raises(RuntimeError, match=r"no window reaches \(box planes 0-16\)"):
        list(acc.finished_rows(16))


def test_slab_reader_reading_ahead_cuts_every_window_of_the_volume(tmp_path):
    """Two slab buffers, one read ahead on a thread and both reused, give each window of a plan with
    many z rows (batches straddling rows, edge windows padded) as cut from the whole volume."""
    from vesicleflow.infer import _pad_window, _SlabReader
    from vesicleflow.tiling import shard_box
    from vesicleflow.volumes import write_block

    shape, window = (150, 40, 45), 32
    values = np.random.default_rng(5).normal(size=shape).astype(np.float32)
    volume = create_volume(tmp_path / "v.zarr", shape, "float32")
    write_block(volume, (0, 0, 0), values)
    plan = plan_windows(shape, window, 0.25, 2)
    for shard in range(2):
        start, stop = shard_box(plan, shard)
        origins = [plan["windows"][i] for i in plan["shards"][shard]]
        with _SlabReader(volume, window, start, stop, origins) as reader:
            assert len(reader.row_starts) >= 3
            for first in range(0, len(origins), 3):
                batch = reader.batch(origins[first:first + 3])
                for got, (z, y, x) in zip(batch, origins[first:first + 3]):
                    np.testing.assert_array_equal(got, _pad_window(values[z:z + window, y:y + window, x:x + window],
                                                                   window))
            assert len(reader.free) + len(reader.slabs) + (reader.pending is not None) <= 2
