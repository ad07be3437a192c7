"""The synthetic tomogram generator: determinism, physics of the image, and exact ground truth."""

from __future__ import annotations

import json

import mrcfile
import numpy as np
import pandas as pd
import pytest

from vesicleflow.simulate import (
    Simulation,
    ctf,
    electron_wavelength_nm,
    simulate_tomogram,
    simulate_tree,
    write_simulation,
)

SHAPE = (48, 128, 128)


@pytest.fixture(scope="module")
def sim() -> Simulation:
    # a synapse with a mitochondrion and membrane fragments (hard negatives), ±60° tilt series
    return simulate_tomogram(
        11,
        SHAPE,
        voxel_size_nm=2.0,
        tilt_range_deg=60,
        snr=0.1,
        with_mitochondrion=True,
        n_membrane_fragments=3,
    )


def _uncut(sim: Simulation) -> pd.DataFrame:
    """Vesicles whose ball lies wholly inside the volume."""
    t = sim.vesicles
    r = t.radius_nm / sim.voxel_size_nm
    nz, ny, nx = sim.tomogram.shape
    inside = (
        (t.x - r >= 0) & (t.y - r >= 0) & (t.z - r >= 0)
        & (t.x + r <= nx - 1) & (t.y + r <= ny - 1) & (t.z + r <= nz - 1)
    )  # fmt: skip
    return t[inside]


def test_outputs_have_the_documented_types(sim):
    assert sim.tomogram.shape == sim.labels.shape == sim.mask.shape == SHAPE
    assert sim.tomogram.dtype == np.float32 and np.all(np.isfinite(sim.tomogram))
    assert sim.labels.dtype == np.uint16 and sim.mask.dtype == np.uint8
    assert abs(float(sim.tomogram.mean())) < 1e-3 and abs(float(sim.tomogram.std()) - 1) < 1e-3
    assert list(sim.vesicles.columns) == ["vesicle_id", "x", "y", "z", "radius_nm", "dense_core"]
    assert sim.vesicles.dense_core.dtype == bool
    json.dumps(sim.params)  # JSON-serialisable
    assert sim.params["voxel_size_nm"] == sim.voxel_size_nm == 2.0
    assert sim.params["tilt_angles_deg"][0] == -60 and sim.params["tilt_angles_deg"][-1] == 60
    assert len(sim.params["tilt_angles_deg"]) == 61
    assert sim.params["mitochondrion"] is not None and len(sim.params["membrane_fragments"]) >= 1
    assert len(sim.vesicles) >= 10


def test_same_seed_gives_identical_outputs_and_another_seed_differs():
    kw = dict(shape=(24, 64, 64), voxel_size_nm=2.4, with_mitochondrion=False)
    a, b = simulate_tomogram(3, **kw), simulate_tomogram(3, **kw)
    assert a.tomogram.tobytes() == b.tomogram.tobytes()
    assert a.labels.tobytes() == b.labels.tobytes() and a.mask.tobytes() == b.mask.tobytes()
    pd.testing.assert_frame_equal(a.vesicles, b.vesicles)
    assert a.params == b.params
    c = simulate_tomogram(4, **kw)
    assert not np.array_equal(a.tomogram, c.tomogram)
    assert not np.array_equal(a.labels, c.labels)


def test_acquisition_override_keeps_the_phantom():
    kw = dict(shape=(24, 64, 64), voxel_size_nm=2.0)
    a = simulate_tomogram(5, **kw, snr=0.05)
    b = simulate_tomogram(5, **kw, snr=1.0, defocus_um=-3.0)
    assert np.array_equal(a.labels, b.labels)
    assert not np.array_equal(a.tomogram, b.tomogram)
    assert b.params["snr"] == 1.0 and b.params["defocus_um"] == -3.0


def test_random_voxel_size_is_drawn_in_range():
    sizes = {simulate_tomogram(s, (16, 32, 32), n_vesicles=0).voxel_size_nm for s in range(4)}
    assert len(sizes) == 4 and all(1.0 <= v <= 2.8 for v in sizes)


def test_unknown_keyword_is_refused():
    with pytest.raises(TypeError, match="unknown keyword"):
        simulate_tomogram(0, (16, 32, 32), voxel_size_nm=2.0, vesicle_densty=10)


def test_ctf_physics():
    assert electron_wavelength_nm(300) == pytest.approx(1.9687e-3, rel=1e-3)
    assert electron_wavelength_nm(200) == pytest.approx(2.5079e-3, rel=1e-3)
    assert ctf(np.array([0.0]), -4.0)[0] == pytest.approx(-0.07)
    # underfocus: the first zero of the CTF lies near k = 1/sqrt(lambda*defocus)
    k = np.linspace(0.01, 0.5, 5000)
    c = ctf(k, -4.0)
    first_zero = k[np.argmax(c > 0)]
    assert first_zero == pytest.approx(1 / np.sqrt(1.9687e-3 * 4000), rel=0.05)


def test_missing_wedge_is_visible_in_fourier_space(sim):
    tomo = sim.tomogram.astype(float)
    nz, ny, nx = tomo.shape
    window = np.hanning(nz)[:, None, None] * np.hanning(ny)[None, :, None] * np.hanning(nx)
    power = (np.abs(np.fft.fftn(tomo * window)) ** 2).sum(axis=1)  # (kz, kx), summed over ky
    kz, kx = np.fft.fftfreq(nz)[:, None], np.fft.fftfreq(nx)[None, :]
    k = np.hypot(kz, kx)
    angle = np.degrees(np.arctan2(np.abs(kz), np.abs(kx)))  # from the kx axis
    band = (k > 0.08) & (k < 0.4)
    in_wedge = power[band & (angle > 72)].mean()  # tilts reach 60°: the wedge is 60-90° from kx
    sampled = power[band & (angle < 45)].mean()
    assert in_wedge < 0.05 * sampled


def test_membranes_are_darker_than_lumen_and_background(sim):
    tomo, v = sim.tomogram, sim.voxel_size_nm
    half_t = sim.params["membrane_thickness_nm"] / 2
    zz, yy, xx = np.indices(tomo.shape)
    shell, lumen = [], []
    for ves in _uncut(sim).itertuples():
        mid = ves.radius_nm - half_t
        d = np.sqrt((zz - ves.z) ** 2 + (yy - ves.y) ** 2 + (xx - ves.x) ** 2) * v
        equator = np.abs(zz - ves.z) * v < 0.5 * ves.radius_nm  # the poles vanish in the wedge
        shell.append(tomo[(np.abs(d - mid) < 1.5) & equator])
        lumen.append(tomo[(d < mid - 5) & equator])
    assert len(shell) >= 3
    shell_mean = float(np.concatenate(shell).mean())
    lumen_mean = float(np.concatenate(lumen).mean())
    background = float(tomo[sim.labels == 0].mean())
    assert shell_mean < lumen_mean - 0.3
    assert shell_mean < background - 0.3
    # so is the plasma membrane: voxels within 1 nm of its mid-surface (a sphere in params)
    pm = sim.params["plasma_membrane"]
    d = np.linalg.norm(np.stack([zz, yy, xx], axis=-1) * v - pm["curvature_centre_nm_zyx"], axis=-1)
    s = d - pm["curvature_radius_nm"]
    assert np.count_nonzero(np.abs(s) < 1.0) > 100
    assert float(tomo[np.abs(s) < 1.0].mean()) < background - 0.3
    # and the presynaptic mask ends at its inner surface
    assert np.all(sim.mask[s < -half_t - v] == 1) and np.all(sim.mask[s > -half_t + v] == 0)


def test_ground_truth_matches_the_table(sim):
    t, labels, v = sim.vesicles, sim.labels, sim.voxel_size_nm
    assert list(t.vesicle_id) == list(range(1, len(t) + 1))
    ids, counts = np.unique(labels[labels > 0], return_counts=True)
    assert list(ids) == list(t.vesicle_id)  # every vesicle has voxels, nothing else is labelled
    # centres inside the volume, radii in the documented ranges
    nz, ny, nx = labels.shape
    assert t.x.between(0, nx - 1).all() and t.y.between(0, ny - 1).all() and t.z.between(0, nz - 1).all()
    clear = t[~t.dense_core]
    assert clear.radius_nm.between(12, 30).all() and t[t.dense_core].radius_nm.between(35, 50).all()
    # some vesicles are cut by the border
    assert len(_uncut(sim)) < len(t)
    # uncut vesicles: label centroid and volume match the table
    from scipy.ndimage import center_of_mass

    uncut = _uncut(sim)
    assert len(uncut) >= 3
    volume = dict(zip(ids, counts))
    for ves in uncut.itertuples():
        cz, cy, cx = center_of_mass(labels == ves.vesicle_id)
        assert np.allclose([cz, cy, cx], [ves.z, ves.y, ves.x], atol=0.35)
        r = (3 * volume[ves.vesicle_id] / (4 * np.pi)) ** (1 / 3) * v
        assert r == pytest.approx(ves.radius_nm, rel=0.05)


def test_vesicles_never_overlap_and_some_nearly_touch(sim):
    t = sim.vesicles
    xyz = t[["z", "y", "x"]].to_numpy() * sim.voxel_size_nm
    r = t.radius_nm.to_numpy()
    dist = np.linalg.norm(xyz[:, None] - xyz[None], axis=2)
    gap = dist - r[:, None] - r[None]
    np.fill_diagonal(gap, np.inf)
    assert gap.min() >= 1.0 - 1e-6
    assert (gap < 3.5).sum() >= 2  # near-touching pairs exist


def test_vesicles_lie_inside_the_presynaptic_mask(sim):
    mask, labels, t = sim.mask, sim.labels, sim.vesicles
    assert 0.2 < mask.mean() < 0.95  # the plasma membrane cuts the volume
    assert np.all(mask[labels > 0] == 1)
    idx = np.rint(t[["z", "y", "x"]].to_numpy()).astype(int)
    assert np.all(mask[idx[:, 0], idx[:, 1], idx[:, 2]] == 1)


def test_hard_negatives_are_not_labelled(sim):
    mito = sim.params["mitochondrion"]
    rot = np.asarray(mito["rotation_zyx"])
    semi = np.asarray(mito["semi_axes_nm"])
    pts = np.argwhere(sim.labels > 0) * sim.voxel_size_nm
    local = (pts - np.asarray(mito["centre_nm_zyx"])) @ rot
    assert np.all(((local / semi) ** 2).sum(axis=1) > 1.0)  # no labelled voxel inside it
    for frag in sim.params["membrane_fragments"]:
        rel = pts - np.asarray(frag["centre_nm_zyx"])
        d = np.linalg.norm(rel, axis=1)
        on_cap = rel @ np.asarray(frag["axis_zyx"]) >= d * np.cos(np.radians(frag["half_angle_deg"]))
        assert np.all(np.abs(d[on_cap] - frag["radius_nm"]) > 2.0)  # vesicles keep clear of it


def test_vesicle_count_follows_density():
    kw = dict(shape=(32, 96, 96), voxel_size_nm=2.5, with_plasma_membrane=False)
    sparse = simulate_tomogram(1, **kw, vesicle_density=1000, with_mitochondrion=False)
    dense = simulate_tomogram(1, **kw, vesicle_density=4000, with_mitochondrion=False)
    assert sparse.mask.all()
    assert len(dense.vesicles) > 2 * len(sparse.vesicles) > 0
    fixed = simulate_tomogram(1, **kw, n_vesicles=7)
    assert len(fixed.vesicles) == 7 == fixed.params["n_vesicles_placed"]


def test_write_simulation_files_and_header(tmp_path):
    sim = simulate_tomogram(2, (24, 64, 56), voxel_size_nm=1.7, n_vesicles=3, with_plasma_membrane=False)
    assert len(sim.vesicles) == 3
    write_simulation(sim, tmp_path / "tomos", tmp_path / "truth", "t1")
    with mrcfile.open(tmp_path / "tomos" / "t1.mrc") as mrc:
        assert mrc.data.dtype == np.float32 and mrc.data.shape == (24, 64, 56)
        assert float(mrc.voxel_size.x) == pytest.approx(17.0, rel=1e-5)
        assert float(mrc.voxel_size.z) == pytest.approx(17.0, rel=1e-5)
        np.testing.assert_array_equal(mrc.data, sim.tomogram)
    with mrcfile.open(tmp_path / "tomos" / "t1_mask.mrc") as mrc:
        np.testing.assert_array_equal(mrc.data, sim.mask)
        assert float(mrc.voxel_size.x) == pytest.approx(17.0, rel=1e-5)
    with mrcfile.open(tmp_path / "truth" / "t1_labels.mrc") as mrc:
        assert mrc.data.dtype == np.uint16
        np.testing.assert_array_equal(mrc.data, sim.labels)
        assert float(mrc.voxel_size.x) == pytest.approx(17.0, rel=1e-5)
    table = pd.read_csv(tmp_path / "truth" / "t1_vesicles.csv")
    assert list(table.columns) == [
        "vesicle_id", "x", "y", "z", "radius_nm", "dense_core", "x_nm", "y_nm", "z_nm",
    ]  # fmt: skip
    assert len(table) == len(sim.vesicles)
    np.testing.assert_allclose(table.x_nm, table.x * 1.7, atol=1e-3)
    params = json.loads((tmp_path / "truth" / "t1_params.json").read_text())
    assert params["seed"] == 2 and params["voxel_size_nm"] == 1.7
    assert not list(tmp_path.rglob(".*tmp*"))  # no temporary files left


def test_simulate_tree_layout(tmp_path):
    out = simulate_tree(tmp_path / "sim", n_datasets=2, n_tomograms=2, shape=(16, 40, 40), seed=7)
    assert out == tmp_path / "sim"
    for dataset in ("dataset_a", "dataset_b"):
        sizes = set()
        for tomo in ("tomo_01", "tomo_02"):
            assert (out / "tomograms" / dataset / f"{tomo}.mrc").is_file()
            assert (out / "tomograms" / dataset / f"{tomo}_mask.mrc").is_file()
            assert (out / "truth" / dataset / f"{tomo}_labels.mrc").is_file()
            assert (out / "truth" / dataset / f"{tomo}_vesicles.csv").is_file()
            params = json.loads((out / "truth" / dataset / f"{tomo}_params.json").read_text())
            sizes.add(params["voxel_size_nm"])
        assert len(sizes) == 1 and 1.0 <= sizes.pop() <= 2.8  # one voxel size per dataset
    names = sorted(p.name for p in (out / "tomograms").rglob("*.mrc"))
    assert len(names) == 8
    a = mrcfile.read(out / "tomograms" / "dataset_a" / "tomo_01.mrc")
    b = mrcfile.read(out / "tomograms" / "dataset_a" / "tomo_02.mrc")
    assert not np.array_equal(a, b)  # each tomogram has its own seed
    again = simulate_tree(tmp_path / "again", n_datasets=1, n_tomograms=1, shape=(16, 40, 40), seed=7)
    np.testing.assert_array_equal(mrcfile.read(again / "tomograms" / "dataset_a" / "tomo_01.mrc"), a)
