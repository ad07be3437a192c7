"""Exports read back by independent readers (imodmodel, starfile, mrcfile) and compared with vesicles.csv."""

from __future__ import annotations

import mrcfile
import numpy as np
import pandas as pd
import pytest
import starfile
from imodmodel import ImodModel

from vesicleflow import formats
from vesicleflow.export import (
    CONTRACT_COLUMNS,
    VESICLE_COLUMNS,
    export_tomogram,
    intensity_reference,
    mask_border_distances,
    membrane_and_lumen_intensity,
    nearest_surface_distances,
    write_label_mrc,
)
from vesicleflow.grid import GridMapping, nearest_source_indices
from vesicleflow.io import DIRECT_IO_VARIABLE, PageWriter, write_mrc
from vesicleflow.simulate import simulate_tomogram
from vesicleflow.volumes import create_volume

VOXEL_NM = 1.2
SHAPE = (40, 144, 144)
ORIGIN = (12.0, -24.0, 36.0)  # z, y, x in Å


def synthetic_table(n=5, seed=0, shape=SHAPE, voxel_nm=VOXEL_NM):
    rng = np.random.default_rng(seed)
    z, y, x = (rng.uniform(3, s - 4, n) for s in shape)
    return pd.DataFrame({"vesicle_id": np.arange(1, n + 1), "x": x, "y": y, "z": z,
                         "radius_nm": rng.uniform(12, 30, n), "fit_score": rng.uniform(0.5, 1, n)})


# ----------------------------------------------------------------------------- IMOD model

def test_imod_model_reads_back_with_per_point_sizes_and_header(tmp_path):
    table = synthetic_table()
    path = tmp_path / "v.mod"
    formats.write_imod_model(path, table, SHAPE, VOXEL_NM, "vesicleflow test")
    model = ImodModel.from_file(path)
    assert (model.header.xmax, model.header.ymax, model.header.zmax) == (SHAPE[2], SHAPE[1], SHAPE[0])
    assert model.header.pixelsize == pytest.approx(VOXEL_NM) and model.header.units == formats.IMOD_UNIT_NM
    assert len(model.objects) == 1
    obj = model.objects[0]
    assert obj.header.flags.scattered and obj.header.contsize == 1
    (contour,) = obj.contours
    # IMOD: x, y from the pixel edge (voxel centre at i + 0.5), z = section index
    np.testing.assert_allclose(contour.points, table[["x", "y", "z"]].to_numpy() + [0.5, 0.5, 0.0], atol=1e-4)
    np.testing.assert_allclose(contour.point_sizes, table["radius_nm"] / VOXEL_NM, rtol=1e-6)


def test_empty_imod_model_is_valid(tmp_path):
    path = tmp_path / "empty.mod"
    formats.write_imod_model(path, synthetic_table(0), SHAPE, VOXEL_NM, "empty")
    model = ImodModel.from_file(path)
    assert len(model.objects) == 1 and model.objects[0].contours == []
    assert path.read_bytes().endswith(b"IEOF")


# ------------------------------------------------------------------------------ STAR files

def test_star_files_read_back_with_relion_conventions(tmp_path):
    table = synthetic_table()
    formats.write_star(tmp_path / "r5.star", formats.relion5_table(table, "tomo 1", SHAPE, VOXEL_NM * 10))
    formats.write_star(tmp_path / "r4.star", formats.pixel_star_table(table, "tomo 1", "tomo 1.mrc"))
    r5 = starfile.read(tmp_path / "r5.star", always_dict=True)["particles"]
    r4 = starfile.read(tmp_path / "r4.star", always_dict=True)["particles"]
    assert (r5["rlnTomoName"] == "tomo 1").all() and (r4["rlnMicrographName"] == "tomo 1.mrc").all()
    for axis, size in zip("ZYX", SHAPE):
        # RELION 5: pixel = centred / pixel size + size / 2 (0-based pixels), so the inverse holds
        back = r5[f"rlnCenteredCoordinate{axis}Angst"] / (VOXEL_NM * 10) + size / 2
        np.testing.assert_allclose(back, table[axis.lower()], atol=1e-3)
        np.testing.assert_allclose(r4[f"rlnCoordinate{axis}"], table[axis.lower()], atol=1e-4)


def test_empty_star_files_keep_their_columns(tmp_path):
    formats.write_star(tmp_path / "e.star", formats.relion5_table(synthetic_table(0), "t", SHAPE, 12.0))
    particles = starfile.read(tmp_path / "e.star", always_dict=True)["particles"]
    assert len(particles) == 0 and "rlnCenteredCoordinateZAngst" in particles.columns


# ----------------------------------------------------------------------------------- MRC

def dense_spheres(shape, centres, radii, ids):
    """Brute force: every voxel against every sphere, deepest (smallest d / r) wins."""
    grid = np.indices(shape, dtype=np.float64)
    best = np.full(shape, np.inf)
    labels = np.zeros(shape, np.uint16)
    for c, r, i in zip(centres, radii, ids):
        q = np.sqrt(sum((g - v) ** 2 for g, v in zip(grid, c))) / r
        take = (q <= 1) & (q < best)
        labels[take], best[take] = i, q[take]
    return labels


def test_sphere_labels_match_brute_force_across_slabs():
    shape = (21, 30, 33)
    centres = np.array([[5.2, 10.0, 10.5], [9.0, 15.3, 17.0], [0.5, 29.0, 2.0], [20.0, 3.0, 31.7]])
    radii = np.array([4.5, 6.0, 3.2, 5.5])
    ids = np.array([3, 7, 1, 2])
    expected = dense_spheres(shape, centres, radii, ids)
    # a budget of ~3 planes forces several slabs, spheres crossing slab borders and volume faces;
    # the header statistics counted while drawing are those of a scan of the slabs
    counted, scanned = formats.HeaderStats(), formats.HeaderStats()
    slabs = [(z0, block.copy()) for z0, block in
             formats.sphere_label_slabs(shape, centres, radii, ids, np.uint16, budget_bytes=3 * 30 * 33 * 6,
                                        stats=counted)]
    assert len(slabs) > 3
    got = np.concatenate([block for _, block in slabs])
    np.testing.assert_array_equal(got, expected)
    scanned.add(got)
    assert vars(counted) == vars(scanned) and counted.n == got.size and counted.high == 7


def test_mrc_slab_writer_header_statistics_validate(tmp_path):
    rng = np.random.default_rng(1)
    data = rng.normal(size=(9, 10, 11)).astype(np.float32)
    path = tmp_path / "v.mrc"
    formats.write_mrc_slabs(path, data.shape, 2, 15.0, (1.0, 2.0, 3.0),
                            ((z, data[z:z + 4]) for z in range(0, 9, 4)), label="test")
    assert mrcfile.validate(path, print_file=open("/dev/null", "w"))  # noqa: SIM115
    with mrcfile.open(path) as mrc:
        np.testing.assert_array_equal(mrc.data, data)
        assert mrc.header.dmean == pytest.approx(data.mean(), abs=1e-5)
        assert mrc.header.rms == pytest.approx(data.std(), rel=1e-5)
        assert float(mrc.voxel_size.x) == 15.0
        assert (float(mrc.header.origin.z), float(mrc.header.origin.x)) == (1.0, 3.0)


@pytest.mark.parametrize("direct_io", ["1", "0"])
def test_zero_file_pages_stay_holes_and_every_byte_reads_back(direct_io, tmp_path, monkeypatch):
    """Whatever the offset and wherever the data lie, the file holds exactly the bytes given, whole
    pages by direct I/O (through a buffer smaller than some runs) or not; long runs of whole file
    pages of zeros are not written (the sparse file's disk use shows it)."""
    import vesicleflow.io

    monkeypatch.setenv(DIRECT_IO_VARIABLE, direct_io)
    refused, leave = [], vesicleflow.io._leave_direct_io
    monkeypatch.setattr(vesicleflow.io, "_leave_direct_io", lambda *args: refused.append(args) or leave(*args))
    rng = np.random.default_rng(8)
    for trial in range(60):
        data = np.zeros(int(rng.integers(1, 30_000)), np.uint8)
        for _ in range(int(rng.integers(0, 5))):
            start = int(rng.integers(0, len(data)))
            stop = min(len(data), start + int(rng.integers(1, 6000)))
            data[start:stop] = rng.integers(1, 256, stop - start)
        offset = int(rng.integers(0, 9000))
        path = tmp_path / f"{trial}.bin"
        with open(path, "wb") as handle, PageWriter(path, handle.fileno(), buffer_bytes=8192) as writer:
            handle.truncate(offset + len(data) + 100)
            formats.write_leaving_holes(writer.write, data, offset)
        written = np.fromfile(path, np.uint8)
        np.testing.assert_array_equal(written[offset:offset + len(data)], data)
        assert not written[:offset].any() and not written[offset + len(data):].any()

    labels = np.zeros((40, 256, 256), np.uint16)  # 32 file pages a plane: long runs of zero pages
    labels[5:9, 10:20, 30:40] = 3
    path = tmp_path / "labels.mrc"
    formats.write_mrc_slabs(path, labels.shape, 6, 15.0, (0.0, 0.0, 0.0),
                            ((z, labels[z:z + 7]) for z in range(0, 40, 7)))
    with mrcfile.open(path) as mrc:
        np.testing.assert_array_equal(mrc.data, labels)
    assert path.stat().st_blocks * 512 < labels.nbytes / 4
    assert refused == []  # no direct write was refused (and none fell back to the page cache)


def test_label_statistics_from_value_counts_equal_the_plane_by_plane_ones():
    labels = np.random.default_rng(3).integers(0, 900, (5, 17, 19)).astype(np.uint16)
    labels[labels > 40] = 0  # mostly background, as label volumes are
    by_counts, by_planes = formats.HeaderStats(), formats.HeaderStats()
    for block in (labels, np.zeros_like(labels), np.full_like(labels, 7)):  # also all-0 and no-0 blocks
        by_counts.add(block)
        by_planes.add(block.astype(np.float32))
    for name in ("n", "total", "total_sq", "low", "high"):
        assert getattr(by_counts, name) == getattr(by_planes, name), name


def test_label_mrc_is_the_nearest_neighbour_resampling_renumbered(tmp_path):
    """Upsampling (planes repeat), downsampling, and more model planes than one zarr chunk: every
    voxel equals lut[model[nearest source]], and the header statistics (counted on the model grid)
    equal those of the written volume."""
    for original, voxel in (((23, 31, 29), 15.0), ((9, 12, 10), 30.0), ((100, 9, 8), 15.0)):
        mapping = GridMapping(original, voxel, 20.0)
        model = np.random.default_rng(5).integers(0, 6, mapping.model_shape).astype(np.uint32)
        lut = np.array([0, 4, 0, 1, 2, 3], np.uint32)
        write_label_mrc(tmp_path / "labels.mrc", model, mapping, lut)
        iz, iy, ix = nearest_source_indices(original, mapping.model_shape, mapping.original_to_model)
        with mrcfile.open(tmp_path / "labels.mrc") as mrc:
            expected = lut[model[np.ix_(iz, iy, ix)]]
            np.testing.assert_array_equal(mrc.data, expected)
            header = mrc.header
            assert (float(header.dmin), float(header.dmax)) == (expected.min(), expected.max())
            assert float(header.dmean) == pytest.approx(expected.mean(), rel=1e-6)
            assert float(header.rms) == pytest.approx(expected.std(), rel=1e-6)
    # every voxel in the output labelled, background only in model rows and columns it leaves out
    mapping = GridMapping((9, 12, 10), 30.0, 20.0)
    iz, iy, ix = nearest_source_indices(mapping.original_shape, mapping.model_shape, mapping.original_to_model)
    model = np.zeros(mapping.model_shape, np.uint32)
    model[np.ix_(iz, iy, ix)] = np.random.default_rng(6).integers(1, 6, (9, 12, 10))
    assert not model.all()
    write_label_mrc(tmp_path / "labels.mrc", model, mapping, np.array([0, 4, 9, 1, 2, 3], np.uint32))
    with mrcfile.open(tmp_path / "labels.mrc") as mrc:
        assert float(mrc.header.dmin) == mrc.data.min() > 0
        assert float(mrc.header.dmax) == mrc.data.max()


def test_label_mode_widens_past_uint16():
    assert formats.label_mrc_mode(65535) == (6, np.uint16)
    assert formats.label_mrc_mode(70000) == (2, np.float32)


def test_resampling_reproduces_a_linear_ramp():
    mapping = GridMapping((13, 17, 19), 10.0, 17.0)
    mz, my, mx = mapping.model_shape
    grid = np.indices((mz, my, mx), dtype=np.float32)
    model = 1.0 * grid[0] + 2.0 * grid[1] + 3.0 * grid[2]
    got = np.concatenate([b for _, b in formats.resampled_slabs(model, mapping, block_planes=3, budget_bytes=1)])
    coords = [np.clip(mapping.original_to_model(np.arange(n)), 0, m - 1)
              for n, m in zip(mapping.original_shape, (mz, my, mx))]
    expected = coords[0][:, None, None] + 2 * coords[1][None, :, None] + 3 * coords[2][None, None, :]
    np.testing.assert_allclose(got, expected, atol=1e-4)


# ------------------------------------------------------------------------------ measurements

def test_nearest_surface_distances_match_brute_force():
    rng = np.random.default_rng(2)
    centres, radii = rng.uniform(0, 200, (40, 3)), rng.uniform(10, 40, 40)
    d = np.linalg.norm(centres[:, None] - centres[None], axis=2) - radii[:, None] - radii[None]
    np.fill_diagonal(d, np.inf)
    np.testing.assert_allclose(nearest_surface_distances(centres, radii), d.min(axis=1))
    assert np.isnan(nearest_surface_distances(centres[:1], radii[:1])).all()


def test_mask_border_distance_exact_and_subsampled(mrc_factory):
    mask = np.zeros((24, 40, 90), np.uint8)
    mask[:, :, :60] = 1  # cytoplasm for x < 60; the border voxel is x = 60
    path = mrc_factory("m.mrc", mask)
    centres = np.array([[12.0, 20.0, 20.0], [5.0, 7.0, 45.5], [12.0, 20.0, 70.0]])
    exact, factor = mask_border_distances(path, centres, voxel_nm=2.0)
    assert factor == 1
    np.testing.assert_allclose(exact, [80.0, 29.0, 0.0])
    coarse, factor = mask_border_distances(path, centres, voxel_nm=2.0, max_voxels=4000)
    assert factor > 1
    np.testing.assert_allclose(coarse, exact, atol=2.0 * factor)


# ------------------------------------------------------------- export_tomogram end to end

@pytest.fixture(scope="module")
def simulated(tmp_path_factory):
    """A simulated tomogram + mask, its true vesicles as spheres.csv, labels and probability zarrs."""
    root = tmp_path_factory.mktemp("export")
    sim = simulate_tomogram(2, SHAPE, VOXEL_NM)
    write_mrc(root / "t.mrc", sim.tomogram, VOXEL_NM * 10, ORIGIN)
    write_mrc(root / "t_mask.mrc", sim.mask, VOXEL_NM * 10, ORIGIN)
    truth = sim.vesicles
    n = len(truth)
    mapping = GridMapping(SHAPE, VOXEL_NM * 10, VOXEL_NM * 10, ORIGIN)
    labels = create_volume(root / "labels.zarr", SHAPE, "uint16", attrs={"grid": mapping.to_attrs(), "count": n + 1})
    labels[...] = sim.labels
    coarse = GridMapping(SHAPE, VOXEL_NM * 10, 20.0, ORIGIN)  # probability on a coarser model grid
    probability = create_volume(root / "probability.zarr", coarse.model_shape, "float32",
                                attrs={"grid": coarse.to_attrs()})
    probability[...] = np.linspace(0, 1, int(np.prod(coarse.model_shape)), dtype=np.float32).reshape(
        coarse.model_shape)
    spheres = pd.DataFrame({
        "label": truth["vesicle_id"], "z": truth["z"], "y": truth["y"], "x": truth["x"],
        "radius_nm": truth["radius_nm"], "membrane_radius_nm": truth["radius_nm"] - 2.25,
        "membrane_thickness_nm": 4.5, "membrane_contrast": 1.0, "fit_score": 0.9, "outlier_reason": ""})
    rejected = pd.DataFrame([{"label": n + 1, "z": 5.0, "y": 5.0, "x": 5.0, "radius_nm": 10.0,
                              "membrane_radius_nm": 8.0, "membrane_thickness_nm": 4.0, "membrane_contrast": 0.1,
                              "fit_score": 0.2, "outlier_reason": "poor_fit"}])
    pd.concat([spheres, rejected]).to_csv(root / "spheres.csv", index=False)
    rejected.to_csv(root / "only_rejected.csv", index=False)
    out = root / "out"
    table = export_tomogram(root / "spheres.csv", root / "labels.zarr", root / "t.mrc", out, "ds", "t",
                            mask=root / "t_mask.mrc", probability=root / "probability.zarr")
    return root, out, table, sim


def test_lumen_intensity_is_the_mean_of_every_voxel_within_its_radius():
    """Bit for bit the mean over the voxels of the whole volume within 70 % of the inner radius, in
    C order: vesicles inside, across faces, with a lumen of a single voxel, and without a thickness."""
    rng = np.random.default_rng(4)
    volume = rng.normal(size=(30, 41, 52)).astype(np.float32)
    table = pd.DataFrame({"z": [14.3, 0.6, 29.2, 15.0], "y": [20.1, 39.7, 1.2, 20.5], "x": [25.8, 51.1, 3.4, 26.0],
                          "membrane_radius_nm": [9.0, 7.3, 12.5, 2.1], "radius_nm": [11.2, 9.5, 14.7, 4.3],
                          "membrane_thickness_nm": [4.4, 4.4, np.nan, 4.4]})
    mean, sd = intensity_reference(volume)
    grids = np.ogrid[tuple(slice(0, n) for n in volume.shape)]
    _, lumen = membrane_and_lumen_intensity(volume, table, voxel_nm=1.5)
    for row, measured in zip(table.itertuples(), lumen):
        thickness = 4.0 if np.isnan(row.membrane_thickness_nm) else row.membrane_thickness_nm
        inner = row.membrane_radius_nm / 1.5 - thickness / 2 / 1.5
        dist = np.sqrt(sum((g - c) ** 2 for g, c in zip(grids, (row.z, row.y, row.x))))
        assert measured == (float(volume[dist <= max(0.7 * inner, 0.5)].mean()) - mean) / sd


def test_vesicle_table_keeps_the_contract_and_adds_columns(simulated):
    _, out, table, sim = simulated
    csv = pd.read_csv(out / "vesicles.csv")
    assert list(csv.columns) == VESICLE_COLUMNS and VESICLE_COLUMNS[:len(CONTRACT_COLUMNS)] == CONTRACT_COLUMNS
    assert len(csv) == len(sim.vesicles) >= 3
    np.testing.assert_allclose(csv["x_angstrom"], csv["x"] * VOXEL_NM * 10, rtol=1e-4)
    np.testing.assert_allclose(csv["radius_voxels"], csv["radius_nm"] / VOXEL_NM, rtol=1e-4)
    # membranes are dark in the simulation: darker than the tomogram's mean, darker than the lumen
    assert (csv["membrane_intensity_sd"] < 0).all()
    assert (csv["membrane_intensity_sd"] < csv["lumen_intensity_sd"]).all()
    assert np.allclose(csv["mask_distance_nm"], csv["mask_centre_distance_nm"] - csv["radius_nm"], atol=1e-3)
    assert (csv["mask_centre_distance_nm"] >= 0).all()


def test_every_export_reads_back_and_agrees_with_vesicles_csv(simulated):
    root, out, _, _ = simulated
    csv = pd.read_csv(out / "vesicles.csv")
    model = ImodModel.from_file(out / "vesicles.mod")
    (contour,) = model.objects[0].contours
    np.testing.assert_allclose(contour.points, csv[["x", "y", "z"]].to_numpy() + [0.5, 0.5, 0], atol=1e-3)
    np.testing.assert_allclose(contour.point_sizes, csv["radius_nm"] / VOXEL_NM, rtol=1e-3)
    r5 = starfile.read(out / "vesicles_relion5.star", always_dict=True)["particles"]
    np.testing.assert_allclose(r5["rlnCenteredCoordinateXAngst"], (csv["x"] - SHAPE[2] / 2) * VOXEL_NM * 10,
                               atol=1e-2)
    r4 = starfile.read(out / "vesicles_relion4.star", always_dict=True)["particles"]
    np.testing.assert_allclose(r4[["rlnCoordinateX", "rlnCoordinateY", "rlnCoordinateZ"]],
                               csv[["x", "y", "z"]], atol=1e-3)
    for name in ("labels", "sphere_labels", "probability"):
        path = out / f"{name}.mrc"
        assert mrcfile.validate(path, print_file=open("/dev/null", "w")), name  # noqa: SIM115
        with mrcfile.open(path) as mrc:
            assert mrc.data.shape == SHAPE
            assert float(mrc.voxel_size.x) == pytest.approx(VOXEL_NM * 10)
            origin = (float(mrc.header.origin.z), float(mrc.header.origin.y), float(mrc.header.origin.x))
            assert origin == pytest.approx(ORIGIN)
    with mrcfile.open(out / "sphere_labels.mrc") as mrc:
        spheres = np.asarray(mrc.data)
    centres = np.rint(csv[["z", "y", "x"]].to_numpy()).astype(int)
    assert [spheres[tuple(c)] for c in centres] == list(csv["vesicle_id"])
    for row in csv.itertuples():  # each sphere's volume matches its radius
        volume_nm3 = (spheres == row.vesicle_id).sum() * VOXEL_NM**3
        inside_fraction = volume_nm3 / (4 / 3 * np.pi * row.radius_nm**3)
        assert 0.5 < inside_fraction < 1.1 if "edge" in str(row.flags) else 0.9 < inside_fraction < 1.1
    with mrcfile.open(out / "labels.mrc") as mrc:
        assert set(np.unique(mrc.data)) - {0} == set(csv["vesicle_id"])
    with mrcfile.open(out / "probability.mrc") as mrc:
        assert 0 <= mrc.data.min() < mrc.data.max() <= 1
    assert (out / "preview.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_no_vesicles_gives_empty_but_valid_outputs(simulated, tmp_path):
    root, _, _, _ = simulated
    out = tmp_path / "empty"
    table = export_tomogram(root / "only_rejected.csv", root / "labels.zarr", root / "t.mrc", out, "ds", "t")
    assert len(table) == 0
    assert list(pd.read_csv(out / "vesicles.csv").columns) == VESICLE_COLUMNS
    assert ImodModel.from_file(out / "vesicles.mod").objects[0].contours == []
    for name in ("vesicles_relion5.star", "vesicles_relion4.star"):
        assert len(starfile.read(out / name, always_dict=True)["particles"]) == 0
    for name in ("labels.mrc", "sphere_labels.mrc"):
        assert mrcfile.validate(out / name, print_file=open("/dev/null", "w"))  # noqa: SIM115
        with mrcfile.open(out / name) as mrc:
            assert mrc.data.max() == 0
    assert (out / "preview.png").stat().st_size > 1000


def test_preview_png_has_the_pixels_of_matplotlibs_default_png(tmp_path, monkeypatch):
    """The preview is written with zlib level 1 (faster): its pixels are those of a default PNG."""
    from PIL import Image

    from vesicleflow import plots

    volume = np.random.default_rng(0).normal(size=SHAPE).astype(np.float32)
    table = synthetic_table()
    plots.plot_preview(tmp_path / "fast.png", volume, table, VOXEL_NM, "ds/t")
    figures = []
    monkeypatch.setattr(plots, "_save", lambda fig, path: figures.append(fig))
    plots.plot_preview(tmp_path / "unused.png", volume, table, VOXEL_NM, "ds/t")
    figures[0].savefig(tmp_path / "default.png", format="png", bbox_inches="tight")
    fast, default = (np.asarray(Image.open(tmp_path / name)) for name in ("fast.png", "default.png"))
    assert fast.shape == default.shape and fast.shape[0] > 200
    assert np.array_equal(fast, default)
