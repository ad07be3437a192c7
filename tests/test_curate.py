"""Curation (issue 8): fit at a click, table edits, undo, saving, loading, the merge the export stage
uses, the napari widget headless, and a curated table driving exports and statistics after a re-run
that repeats only export and aggregate."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import pytest
from conftest import REPO, cli_env, planned_jobs, run_snakemake_isolated, shell_volume, tree_snapshot

from vesicleflow import curate
from vesicleflow.curate import (
    CURATED_COLUMNS,
    CURATED_NAME,
    REMOVED_REASON,
    Curation,
    as_curated,
    curated_spheres,
    fit_at_point,
    open_results,
    read_curated,
    remove_vesicles,
    save_curated,
    set_radius,
)
from vesicleflow.export import VESICLE_COLUMNS, vesicle_table
from vesicleflow.io import InputError, write_json, write_mrc, write_table
from vesicleflow.spherefit import SphereFit

VOXEL_NM = 1.8
#: Seed and shape of the simulated synapse the click test uses (deterministic: fixed seed).
SIM_SEED, SIM_SHAPE = 0, (48, 128, 128)
#: Click offsets: 2 voxels from the true centre, along each axis in turn, both ways.
OFFSETS = np.array([(2, 0, 0), (0, 2, 0), (0, 0, 2), (-2, 0, 0), (0, -2, 0), (0, 0, -2)], dtype=float)


@pytest.fixture(scope="module")
def synapse():
    from vesicleflow.simulate import simulate_tomogram

    return simulate_tomogram(SIM_SEED, SIM_SHAPE, VOXEL_NM)


def truth_table(sim) -> pd.DataFrame:
    """The simulator's vesicles as an automatic (curated-format) table."""
    table = sim.vesicles.drop(columns="dense_core").assign(dataset="ds", tomogram="t1")
    table["membrane_radius_nm"] = table["radius_nm"] - 2.25
    return curate.with_derived_columns(as_curated(table), sim.voxel_size_nm)


def inside_vesicles(sim) -> pd.DataFrame:
    """Vesicles whose sphere lies wholly inside the volume (not cut by its border)."""
    centres = sim.vesicles[["z", "y", "x"]].to_numpy()
    radii = sim.vesicles["radius_nm"].to_numpy()[:, None] / sim.voxel_size_nm
    inside = ((centres - radii) >= 0).all(axis=1) & ((centres + radii) <= np.array(SIM_SHAPE) - 1).all(axis=1)
    return sim.vesicles[inside]


def a_fit(z, y, x, radius_nm) -> SphereFit:
    return SphereFit(z=z, y=y, x=x, radius_nm=radius_nm, membrane_radius_nm=radius_nm - 2.25,
                     membrane_thickness_nm=4.5, membrane_contrast=1.0, fit_score=0.9, rays_used=100)


# ------------------------------------------------------------------------------- fit at a click

def test_clicks_near_removed_vesicles_bring_them_back(synapse):
    """Remove vesicles, click at true centre + 2 voxels: each returns within 1 voxel and 1 nm."""
    chosen = inside_vesicles(synapse)
    assert len(chosen) >= 5
    session = Curation(truth_table(synapse), synapse.tomogram, VOXEL_NM, "ds", "t1")
    session.remove(chosen["vesicle_id"].tolist())
    assert not session.table["vesicle_id"].isin(chosen["vesicle_id"]).any()
    for k, vesicle in enumerate(chosen.itertuples(index=False)):
        centre = np.array([vesicle.z, vesicle.y, vesicle.x])
        new_id = session.add_at(centre + OFFSETS[k % len(OFFSETS)])
        assert new_id is not None, f"vesicle {vesicle.vesicle_id}: no fit"
        row = session.table.set_index("vesicle_id").loc[new_id]
        error_vox = np.linalg.norm(row[["z", "y", "x"]].to_numpy(dtype=float) - centre)
        assert error_vox <= 1.0, f"vesicle {vesicle.vesicle_id}: centre off by {error_vox:.2f} voxels"
        assert abs(row["radius_nm"] - vesicle.radius_nm) <= 1.0, (
            f"vesicle {vesicle.vesicle_id}: radius {row['radius_nm']:.2f} nm, true {vesicle.radius_nm:.2f} nm")
        assert row["source"] == "added"
    assert len(session.table) == len(synapse.vesicles)


def test_fit_at_point_on_a_clean_shell_and_nothing_outside():
    volume = shell_volume((40, 64, 64), (20, 32, 31), membrane_radius=9.0, thickness=2.5, noise=0.2)
    fit = fit_at_point(volume, (21.5, 33, 30), voxel_nm=2.0, max_diameter_nm=60)
    assert fit is not None
    np.testing.assert_allclose([fit.z, fit.y, fit.x], [20, 32, 31], atol=0.5)
    assert fit.radius_nm == pytest.approx(9.0 * 2.0 + 2.25, abs=1.0)
    assert fit_at_point(volume, (-5, 10, 10), voxel_nm=2.0) is None  # outside the volume
    noise = np.random.default_rng(1).normal(size=(40, 64, 64)).astype(np.float32)
    assert fit_at_point(noise, (20, 32, 32), voxel_nm=2.0, max_diameter_nm=60) is None  # no membrane there
    with pytest.raises(ValueError, match="max_diameter"):
        fit_at_point(volume, (20, 32, 31), voxel_nm=2.0, max_diameter_nm=10, min_radius_nm=8)


# ------------------------------------------------------------------------------ table operations

def small_table() -> pd.DataFrame:
    table = pd.DataFrame({"dataset": "ds", "tomogram": "t1", "vesicle_id": [1, 2, 3],
                          "x": [10.0, 30.0, 50.0], "y": [10.0, 10.0, 10.0], "z": [5.0, 5.0, 5.0],
                          "radius_nm": [20.0, 22.0, 18.0], "membrane_radius_nm": [17.75, 19.75, 15.75],
                          "mask_centre_distance_nm": [100.0, 80.0, 60.0], "flags": ""})
    return curate.with_derived_columns(as_curated(table), VOXEL_NM)


def test_remove_edit_move_add_and_their_sources():
    table = small_table()
    assert list(table.columns) == CURATED_COLUMNS
    assert (table["source"] == "auto").all()
    edited = set_radius(table, 2, 25.0, VOXEL_NM)
    row = edited.set_index("vesicle_id").loc[2]
    assert row["radius_nm"] == 25.0 and row["membrane_radius_nm"] == pytest.approx(22.75)
    assert row["radius_voxels"] == pytest.approx(25.0 / VOXEL_NM)
    assert row["mask_distance_nm"] == pytest.approx(80.0 - 25.0)
    assert row["source"] == "edited" and table.set_index("vesicle_id").loc[2, "radius_nm"] == 22.0  # pure
    moved = curate.move_vesicle(table, 1, (6.0, 11.0, 12.0), VOXEL_NM).set_index("vesicle_id").loc[1]
    assert (moved["z"], moved["y"], moved["x"]) == (6.0, 11.0, 12.0) and moved["source"] == "edited"
    assert moved["x_nm"] == pytest.approx(12.0 * VOXEL_NM) and np.isnan(moved["mask_centre_distance_nm"])
    added, new_id = curate.add_vesicle(table, a_fit(5.0, 40.0, 40.0, 19.0), VOXEL_NM)
    assert new_id == 4 and added.set_index("vesicle_id").loc[4, "source"] == "added"
    assert added.set_index("vesicle_id").loc[4, "dataset"] == "ds"
    assert set_radius(added, 4, 21.0, VOXEL_NM).set_index("vesicle_id").loc[4, "source"] == "added"
    removed = remove_vesicles(added, [1, 4])
    assert removed["vesicle_id"].tolist() == [2, 3]
    # nearest-neighbour distances follow the edits
    assert removed["nn_distance_nm"].tolist() == pytest.approx([20 * VOXEL_NM] * 2)
    with pytest.raises(KeyError):
        remove_vesicles(table, [99])
    with pytest.raises(ValueError):
        set_radius(table, 1, -3.0, VOXEL_NM)


def test_undo_redo_and_unsaved_state(tmp_path):
    volume = np.zeros((8, 8, 8), np.float32)
    session = Curation(small_table(), volume, VOXEL_NM, "ds", "t1")
    start = session.table
    assert not session.unsaved and not session.can_undo
    session.remove([1])
    session.change_radius([2, 3], +1.0)
    session.move({3: np.array([5.0, 12.0, 50.0])})
    assert session.unsaved and len(session.table) == 2
    assert session.table.set_index("vesicle_id").loc[2, "radius_nm"] == 23.0
    assert session.undo() and session.undo() and session.undo()
    pd.testing.assert_frame_equal(session.table, start)
    assert not session.undo()
    assert session.redo()
    assert len(session.table) == 2
    session.remove([2])  # a new edit clears the redo stack
    assert not session.can_redo
    session.save(tmp_path)
    assert not session.unsaved


def test_save_writes_only_the_curated_table_and_reads_back(tmp_path):
    results = tmp_path / "ds" / "t1"
    results.mkdir(parents=True)
    write_table(results / "vesicles.csv", small_table()[VESICLE_COLUMNS])
    (results / "spheres.csv").write_text("label\n1\n")
    before = tree_snapshot(results)
    table = set_radius(small_table(), 3, 19.5, VOXEL_NM)
    path = save_curated(table, results, VOXEL_NM)
    assert path == results / CURATED_NAME
    after = tree_snapshot(results)
    assert {k: v for k, v in after.items() if k != CURATED_NAME} == before  # automatic results untouched
    back = read_curated(path)
    assert list(back.columns) == CURATED_COLUMNS
    assert back["source"].tolist() == ["auto", "auto", "edited"]
    np.testing.assert_allclose(back["radius_nm"], [20.0, 22.0, 19.5])
    assert [p.name for p in results.iterdir() if p.name.startswith(".")] == []  # no temporaries left


@pytest.mark.parametrize("content, message", [
    ("vesicle_id,x,y,z\n1,1,2,3\n", "missing column"),
    ("vesicle_id,x,y,z,radius_nm,source\n1,1,2,3,20,manual\n", "unknown source"),
    ("vesicle_id,x,y,z,radius_nm,source\n1,1,2,,20,auto\n", "line"),
    ("vesicle_id,x,y,z,radius_nm,source\n1,1,2,3,20,auto\n1,4,5,6,20,added\n", "duplicate"),
    ("vesicle_id,x,y,z,radius_nm,source\n1,1,2,3,-2,auto\n", "positive"),
])
def test_read_curated_names_the_problem(tmp_path, content, message):
    path = tmp_path / CURATED_NAME
    path.write_text(content)
    with pytest.raises(InputError, match=message):
        read_curated(path)


# ------------------------------------------------------------------------------------- loading

def test_open_results_folder_prefers_the_curated_table(tmp_path, mrc_factory):
    tomogram = mrc_factory("data/ds/t1.mrc", np.zeros((8, 16, 16), np.float32), voxel_size_angstrom=18.0)
    results = tmp_path / "out" / "ds" / "t1"
    results.mkdir(parents=True)
    write_json(results / "tomogram.json", {"dataset": "ds", "tomogram": "t1", "source": str(tomogram),
                                           "voxel_size_angstrom": 18.0})
    write_table(results / "vesicles.csv", small_table()[VESICLE_COLUMNS])
    inputs = open_results(results)
    assert (inputs.started_from, len(inputs.table), inputs.tomogram) == ("automatic", 3, tomogram)
    assert inputs.voxel_nm == pytest.approx(1.8) and inputs.probability is None
    save_curated(remove_vesicles(inputs.table, [2]), results, inputs.voxel_nm)
    resumed = open_results(results)
    assert resumed.started_from == "curated" and resumed.table["vesicle_id"].tolist() == [1, 3]
    session = resumed.session()
    assert session.volume.shape == (8, 16, 16) and session.dataset == "ds"


def test_a_bare_tomogram_is_enough(tmp_path, mrc_factory, monkeypatch):
    tomogram = mrc_factory("data/wildtype/cell1.mrc", np.zeros((8, 16, 16), np.float32), voxel_size_angstrom=16.0)
    monkeypatch.chdir(tmp_path)
    inputs = open_results(tomogram)
    assert inputs.started_from == "empty" and inputs.table.empty and list(inputs.table.columns) == CURATED_COLUMNS
    assert (inputs.dataset, inputs.name) == ("wildtype", "cell1")
    assert inputs.results_dir == tmp_path / "wildtype" / "cell1"
    session = inputs.session()
    table, _ = curate.add_vesicle(session.table, a_fit(4.0, 8.0, 8.0, 10.0), session.voxel_nm, "wildtype", "cell1")
    save_curated(table, inputs.results_dir, session.voxel_nm)
    assert read_curated(inputs.curated_path)["tomogram"].tolist() == ["cell1"]
    assert sorted(p.name for p in tomogram.parent.iterdir()) == ["cell1.mrc"]  # nothing beside the input
    with pytest.raises(InputError, match="own folder"):
        open_results(tomogram, results_dir=tomogram.parent)
    with pytest.raises(InputError, match="tomogram.json"):
        open_results(tmp_path / "wildtype" / "cell1")
    assert open_results(tmp_path / "wildtype" / "cell1", tomogram=tomogram).started_from == "curated"


# ---------------------------------------------------------------------- the export stage's merge

def spheres_table() -> pd.DataFrame:
    """A spherefit table: labels 1-3 accepted (as small_table), label 4 rejected."""
    rows = []
    for label, (x, radius) in enumerate([(10.0, 20.0), (30.0, 22.0), (50.0, 18.0), (70.0, 15.0)], start=1):
        rows.append({"label": label, "guess_z": 5.0, "guess_y": 10.0, "guess_x": x, "guess_radius_nm": radius,
                     "z": 5.0, "y": 10.0, "x": x, "radius_nm": radius, "membrane_radius_nm": radius - 2.25,
                     "membrane_thickness_nm": 5.0, "membrane_contrast": 1.0, "fit_score": 0.9, "rays_used": 200,
                     "outlier_reason": "low_contrast" if label == 4 else ""})
    return pd.DataFrame(rows)


def test_curated_spheres_replaces_the_accepted_vesicles():
    table = remove_vesicles(small_table(), [2])                      # curator removed label 2
    table = set_radius(table, 3, 19.0, VOXEL_NM)                      # ... edited label 3
    table, _ = curate.add_vesicle(table, a_fit(5.0, 40.0, 90.0, 21.0), VOXEL_NM)  # ... added one
    merged = curated_spheres(spheres_table(), table, VOXEL_NM)
    by_label = merged.set_index("label")
    assert by_label.loc[2, "outlier_reason"] == REMOVED_REASON
    assert by_label.loc[4, "outlier_reason"] == "low_contrast"       # rejected stays rejected
    assert by_label.loc[3, "radius_nm"] == 19.0 and by_label.loc[3, "source"] == "edited"
    assert by_label.loc[1, "source"] == "auto"
    added = merged[merged["label"] == 0]
    assert len(added) == 1 and added["source"].item() == "added" and added["outlier_reason"].item() == ""
    # export's own table builder turns the merge into exactly the curated vesicles
    exported = vesicle_table(merged, "ds", "t1", VOXEL_NM)
    assert len(exported) == len(table)
    np.testing.assert_allclose(sorted(exported["radius_nm"]), sorted(table["radius_nm"]))
    assert sorted(exported.attrs["source_labels"].tolist()) == [0, 1, 3]


def test_curated_rows_whose_sphere_is_gone_are_kept_without_label():
    table = small_table()
    moved_spheres = spheres_table()
    moved_spheres.loc[0, "x"] = 90.0  # spherefit re-ran after curation: label 1 is elsewhere now
    merged = curated_spheres(moved_spheres, table, VOXEL_NM)
    accepted = merged[merged["outlier_reason"] == ""]
    assert len(accepted) == 3 and sorted(accepted["label"].tolist()) == [0, 2, 3]
    assert merged.set_index("label").loc[1, "outlier_reason"] == REMOVED_REASON


# --------------------------------------------------------------------- the napari widget, headless

def qt_offscreen_works() -> str | None:
    """None if napari and a Qt binding import and a QApplication starts offscreen; else why not."""
    try:
        import napari  # noqa: F401
        import qtpy  # noqa: F401
    except Exception as err:  # ImportError, or qtpy's error when no Qt binding is installed
        return f"napari/Qt not importable ({err}); install with pip install -e '.[curate]'"
    probe = subprocess.run([sys.executable, "-c", "from qtpy.QtWidgets import QApplication; QApplication([])"],
                           env={**os.environ, "QT_QPA_PLATFORM": "offscreen"}, capture_output=True, text=True,
                           timeout=120)
    if probe.returncode != 0:
        return f"Qt cannot start offscreen: {probe.stderr.strip()[-300:]}"
    return None


@dataclass
class MouseEvent:
    """What napari's mouse callbacks read from a vispy mouse event."""

    type: str
    position: tuple
    pos: np.ndarray = field(default_factory=lambda: np.zeros(2))
    is_dragging: bool = False
    button: int = 1
    modifiers: list = field(default_factory=list)
    view_direction: object = None
    up_direction: object = None
    dims_displayed: list = field(default_factory=lambda: [1, 2])
    delta: object = None
    native: object = None
    handled: bool = False


class EventProxy:
    """Stands for the event of a whole drag, as napari's Qt canvas passes it: napari swaps the
    event inside (``__wrapped__``) at each move and at the release."""

    def __init__(self, event: MouseEvent):
        object.__setattr__(self, "__wrapped__", event)

    def __getattr__(self, name):
        return getattr(self.__wrapped__, name)

    def __setattr__(self, name, value):
        if name == "__wrapped__":
            object.__setattr__(self, name, value)
        else:
            setattr(self.__wrapped__, name, value)


def drag(layer, start, *path) -> None:
    """Press at ``start`` (z, y, x), move along ``path``, release at its end (a click if no path)."""
    from napari.utils.interactions import mouse_move_callbacks, mouse_press_callbacks, mouse_release_callbacks

    mouse_press_callbacks(layer, EventProxy(MouseEvent("mouse_press", tuple(start))))
    for k, point in enumerate(path):
        pos = np.full(2, 10.0 * (k + 1))  # canvas pixels: far enough to count as a drag
        mouse_move_callbacks(layer, MouseEvent("mouse_move", tuple(point), pos=pos, is_dragging=True))
    end = path[-1] if path else start
    mouse_release_callbacks(layer, MouseEvent("mouse_release", tuple(end), pos=np.full(2, 10.0 * len(path))))


@pytest.fixture(scope="module")
def qt_app():
    reason = qt_offscreen_works()
    if reason:
        pytest.skip(reason)
    previous = os.environ.get("QT_QPA_PLATFORM")
    os.environ["QT_QPA_PLATFORM"] = "offscreen"
    from qtpy.QtWidgets import QApplication

    yield QApplication.instance() or QApplication([])
    if previous is None:
        os.environ.pop("QT_QPA_PLATFORM", None)
    else:
        os.environ["QT_QPA_PLATFORM"] = previous


def test_widget_headless(qt_app, synapse, tmp_path):
    """Place by clicking in napari's add mode, select, delete, resize, undo, save: through the
    layer's mouse callbacks, the keymap and the widget, on a windowless ViewerModel."""
    from napari.components import ViewerModel
    from napari.utils.key_bindings import KeymapHandler

    from vesicleflow import curate_napari

    chosen = inside_vesicles(synapse).iloc[0]
    table = remove_vesicles(truth_table(synapse), [int(chosen["vesicle_id"])])
    session = Curation(table, synapse.tomogram, VOXEL_NM, "ds", "t1")
    viewer = ViewerModel()
    controller = curate_napari.CurationController(viewer, session, tmp_path / "ds" / "t1", title="t1")
    widget = curate_napari.make_widget(controller)
    keys = KeymapHandler()
    keys.keymap_providers = [controller.points, viewer]

    def press(key):
        keys.press_key(key)
        keys.release_key(key)

    n = len(session.table)
    assert len(controller.points.data) == n and viewer.layers[-1] is controller.points
    assert f"{n} vesicles" in widget.summary.text()
    for shown, _ in curate_napari.SHORTCUTS:  # every shortcut is listed in the widget
        assert shown in "".join(label.text() for label in widget.findChildren(type(widget.summary)))

    # a click in add mode, 2 voxels off the true centre, becomes the fitted vesicle at once
    centre = np.array([chosen["z"], chosen["y"], chosen["x"]])
    click = centre + (0, 2, 0)
    viewer.dims.set_point(0, click[0])
    controller.set_mode("add")
    drag(controller.points, click)
    assert len(session.table) == n + 1, controller.message
    new = session.table.iloc[-1]
    assert new["source"] == "added"
    assert np.linalg.norm(new[["z", "y", "x"]].to_numpy(dtype=float) - centre) <= 1.0
    assert abs(new["radius_nm"] - chosen["radius_nm"]) <= 1.0
    np.testing.assert_allclose(controller.points.data[-1], new[["z", "y", "x"]].to_numpy(dtype=float))
    assert controller.points.size[-1] == pytest.approx(2 * new["radius_nm"] / VOXEL_NM)
    assert controller.selected_ids() == [int(new["vesicle_id"])]  # the new vesicle is selected
    assert widget.radius.value() == pytest.approx(new["radius_nm"], abs=0.05)

    # resize by keys and by the widget's spin box
    press("]")
    assert session.table.iloc[-1]["radius_nm"] == pytest.approx(new["radius_nm"] + 0.5)
    widget.radius.setValue(30.0)
    assert session.table.iloc[-1]["radius_nm"] == pytest.approx(30.0)
    assert controller.points.size[-1] == pytest.approx(60.0 / VOXEL_NM)

    # select another vesicle with a click in select mode
    target = session.table.iloc[0]
    controller.set_mode("select")
    viewer.dims.set_point(0, target["z"])
    at = np.array([target["z"], target["y"], target["x"]])
    drag(controller.points, at)
    assert controller.selected_ids() == [int(target["vesicle_id"])]
    # dragging it moves it by hand (source edited), one undo step
    drag(controller.points, at, at + (0, 1, -1), at + (0, 3, -2))
    moved = session.table.set_index("vesicle_id").loc[int(target["vesicle_id"])]
    np.testing.assert_allclose(moved[["z", "y", "x"]].to_numpy(dtype=float), at + (0, 3, -2))
    assert moved["source"] == "edited"
    press("Control-Z")
    assert session.table.set_index("vesicle_id").loc[int(target["vesicle_id"]), "source"] == "auto"
    drag(controller.points, at)  # select it again, delete it with the key, undo
    press("Delete")
    assert int(target["vesicle_id"]) not in session.table["vesicle_id"].tolist()
    assert len(controller.points.data) == len(session.table) == n
    press("Control-Z")
    assert int(target["vesicle_id"]) in session.table["vesicle_id"].tolist()
    # napari's own removal (e.g. its layer-controls delete button) is applied to the table too
    controller.points.selected_data = {0}
    controller.points.remove_selected()
    assert len(session.table) == n and len(controller.points.data) == n
    widget.buttons["undo"].click()
    assert len(session.table) == n + 1

    # save with the key: only vesicles.curated.csv is written
    press("Control-Shift-S")
    saved = read_curated(tmp_path / "ds" / "t1" / CURATED_NAME)
    assert len(saved) == n + 1 and (saved["source"] == "added").sum() == 1
    assert not session.unsaved and "unsaved" not in widget.summary.text()
    assert sorted(p.name for p in (tmp_path / "ds" / "t1").iterdir()) == [CURATED_NAME]


def display_command() -> list[str] | None:
    """A prefix that gives a subprocess an X display (xvfb-run), [] if one exists, None if neither."""
    if os.environ.get("DISPLAY"):
        return []
    if shutil.which("xvfb-run"):
        return ["xvfb-run", "-a", "-s", "-screen 0 1600x1000x24"]
    return None


@pytest.mark.slow
def test_real_window_renders_a_screenshot(tmp_path, synapse):
    """`vesicleflow curate --screenshot` opens the real napari window (OpenGL canvas + dock widget)."""
    reason = qt_offscreen_works()
    if reason:
        pytest.skip(reason)
    prefix = display_command()
    if prefix is None:
        pytest.skip("no X display and no xvfb-run (Debian: apt-get install xvfb libxcb-icccm4 libxcb-keysyms1)")
    tomogram = tmp_path / "data" / "ds" / "t1.mrc"
    write_mrc(tomogram, synapse.tomogram, VOXEL_NM * 10)
    results = tmp_path / "out" / "ds" / "t1"
    save_curated(truth_table(synapse), results, VOXEL_NM)
    png = tmp_path / "shot.png"
    cli = [sys.executable, "-c", "from vesicleflow.cli import app; app()"]
    env = {k: v for k, v in cli_env().items() if k != "QT_QPA_PLATFORM"}  # a real (X) platform: OpenGL
    result = subprocess.run([*prefix, *cli, "curate", str(tomogram), "--results-dir",
                             str(results), "--screenshot", str(png)], env=env, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    import matplotlib.image

    image = matplotlib.image.imread(png)[..., :3]
    height, width = image.shape[:2]
    assert height >= 600 and width >= 1000
    assert image.std() > 0.05  # not blank
    canvas_middle = image[int(0.4 * height):int(0.6 * height), int(0.35 * width):int(0.55 * width)]
    assert canvas_middle.std() > 0.04, "the OpenGL canvas (tomogram) was not drawn"


# ------------------------------------------- end to end: a curated table drives export + aggregate

@pytest.mark.slow
def test_curated_table_drives_exports_and_statistics_after_rerun(tmp_path):
    """Run the workflow, curate (remove 2, add 1 by a click, resize 1), save; the re-run repeats
    export and aggregate only, and every export and the statistics show the curated vesicles."""
    import mrcfile
    import starfile

    from vesicleflow.simulate import simulate_tomogram, write_simulation

    sim = simulate_tomogram(SIM_SEED, SIM_SHAPE, VOXEL_NM)
    write_simulation(sim, tmp_path / "tomograms" / "ds", tmp_path / "truth" / "ds", "t1")
    out = tmp_path / "results"
    config = ["--config", f"input_dir={tmp_path / 'tomograms'}", f"output_dir={out}"]
    profile = ["--profile", str(REPO / "profiles" / "local"), "--cores", "2"]
    first = run_snakemake_isolated(tmp_path / "wd", *profile, *config)
    assert first.returncode == 0, first.stderr[-4000:]
    results = out / "ds" / "t1"
    automatic = pd.read_csv(results / "vesicles.csv")
    assert len(automatic) >= 4

    # curate: remove two vesicles, bring one back with a click 2 voxels off, resize another
    inputs = open_results(results)
    assert inputs.started_from == "automatic"
    session = inputs.session()
    gone, back, resized = automatic["vesicle_id"].iloc[:3].tolist()
    session.remove([gone, back])
    centre = automatic.set_index("vesicle_id").loc[back, ["z", "y", "x"]].to_numpy(dtype=float)
    added = session.add_at(centre + (0, 0, 2))
    assert added is not None
    session.set_radius([resized], 31.0)
    session.save(results)
    curated = read_curated(results / CURATED_NAME)
    upstream = {name: tree_snapshot(results / name) for name in
                ("probability.zarr", "labels.zarr", "normalized.zarr")}
    spheres_before = (results / "spheres.csv").read_bytes()

    dry = run_snakemake_isolated(tmp_path / "wd", "--dry-run", *config)
    assert dry.returncode == 0, dry.stderr[-3000:]
    assert planned_jobs(dry.stdout + dry.stderr) == {"export": 1, "aggregate": 1}
    rerun = run_snakemake_isolated(tmp_path / "wd", *profile, *config)
    assert rerun.returncode == 0, rerun.stderr[-4000:]
    for name, snapshot in upstream.items():
        assert tree_snapshot(results / name) == snapshot, f"{name} was rewritten"
    assert (results / "spheres.csv").read_bytes() == spheres_before
    assert read_curated(results / CURATED_NAME).equals(curated)  # export never writes the curated table

    vesicles = pd.read_csv(results / "vesicles.csv")
    assert list(vesicles.columns[:len(VESICLE_COLUMNS)]) == VESICLE_COLUMNS
    assert len(vesicles) == len(curated) == len(automatic) - 1
    np.testing.assert_allclose(sorted(vesicles["radius_nm"]), sorted(curated["radius_nm"]), atol=1e-3)
    assert vesicles["vesicle_id"].tolist() == list(range(1, len(vesicles) + 1))
    gone_centre = automatic.set_index("vesicle_id").loc[gone, ["z", "y", "x"]].to_numpy(dtype=float)
    assert np.linalg.norm(vesicles[["z", "y", "x"]].to_numpy() - gone_centre, axis=1).min() > 1.0
    assert (vesicles["radius_nm"] - 31.0).abs().min() < 1e-3
    # every export follows the table
    relion = starfile.read(results / "vesicles_relion4.star")
    relion = relion if isinstance(relion, pd.DataFrame) else next(iter(relion.values()))
    assert len(relion) == len(vesicles)
    with mrcfile.open(results / "sphere_labels.mrc") as mrc:
        assert set(np.unique(mrc.data)) - {0} == set(vesicles["vesicle_id"])
    with mrcfile.open(results / "labels.mrc") as mrc:  # hand-placed vesicles have no segmentation
        assert set(np.unique(mrc.data)) - {0} <= set(vesicles["vesicle_id"])
    # and so do the statistics
    per_tomogram = pd.read_csv(out / "summary" / "per_tomogram.csv")
    assert per_tomogram["n_vesicles"].item() == len(curated)
    assert per_tomogram["radius_mean_nm"].item() == pytest.approx(curated["radius_nm"].mean(), abs=1e-3)
    assert len(pd.read_csv(out / "summary" / "vesicles.csv")) == len(curated)

    # up to date now; deleting the curated table brings the automatic results back (export + aggregate)
    assert planned_jobs(run_snakemake_isolated(tmp_path / "wd", "--dry-run", *config).stdout) == {}
    (results / CURATED_NAME).unlink()
    dry = run_snakemake_isolated(tmp_path / "wd", "--dry-run", *config)
    assert planned_jobs(dry.stdout + dry.stderr) == {"export": 1, "aggregate": 1}
