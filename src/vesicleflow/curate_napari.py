"""curate_napari: the napari viewer and dock widget of ``vesicleflow curate``.

napari and Qt are imported only inside the functions here (``pip install 'vesicleflow[curate]'``),
so the rest of the package never needs them. All editing goes through
:class:`vesicleflow.curate.Curation`; this module only shows its table and turns mouse and
keyboard input into its operations:

- the ``vesicles`` points layer shows every vesicle as a ring of its outer radius; in 2D the rings
  are the spheres' cross-sections (points are drawn in the neighbouring slices with a spherical
  fall-off), coloured by source (auto cyan, added yellow, edited magenta);
- napari's own points modes do the pointing: in add mode a click adds a raw point, which is
  replaced at once by the sphere fitted around it (or removed, with a message, when no membrane
  is found); in select mode, selected vesicles can be deleted or dragged (a move by hand);
- the controller (:class:`CurationController`) listens to the layer's data events and keeps
  table and layer in step; every change is one undo step.

The controller works on a ``napari.components.ViewerModel`` as well as on a ``napari.Viewer``,
so it is tested without a window; the widget is a plain Qt widget.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd

from vesicleflow.curate import SOURCE_ADDED, SOURCE_AUTO, SOURCE_EDITED, Curation, CurationInputs

log = logging.getLogger(__name__)

#: Ring colours by source (RGBA).
SOURCE_COLOURS = {
    SOURCE_AUTO: (0.0, 0.85, 1.0, 1.0),
    SOURCE_ADDED: (1.0, 0.85, 0.0, 1.0),
    SOURCE_EDITED: (1.0, 0.25, 0.85, 1.0),
}
#: Radius step (nm) of the grow / shrink shortcuts.
RADIUS_STEP_NM = 0.5
VESICLE_LAYER = "vesicles"
PROBABILITY_LAYER = "probability"

#: (keys as shown, what they do). napari's own points-layer keys are listed with the vesicle
#: layer selected; the others are bound on the viewer, so they work whichever layer is selected.
SHORTCUTS = [
    ("P", "place mode: click inside a vesicle to fit and add it"),
    ("S", "select mode: click, Shift+click or drag a box"),
    ("Z", "pan/zoom mode"),
    ("Delete / Backspace", "delete the selected vesicles"),
    ("]", f"grow the selected vesicles by {RADIUS_STEP_NM} nm"),
    ("[", f"shrink the selected vesicles by {RADIUS_STEP_NM} nm"),
    ("Ctrl+Z", "undo"),
    ("Ctrl+Shift+Z", "redo"),
    ("Ctrl+Shift+S", "save vesicles.curated.csv"),
]


def require_napari() -> None:
    """Raise ImportError with the install line when napari or a Qt binding is missing."""
    try:
        import napari  # noqa: F401
        import qtpy  # noqa: F401
        from qtpy import QtWidgets  # noqa: F401
    except Exception as err:  # ImportError, or qtpy's PythonQtError when no binding is installed
        raise ImportError(f"the curation viewer needs napari and a Qt binding ({err}); install them with "
                          "pip install 'vesicleflow[curate]'") from err


def contrast_limits(volume, planes: int = 12) -> tuple[float, float]:
    """0.5 and 99.5 percentiles of a few z planes spread over the volume (reads only those planes)."""
    nz = volume.shape[0]
    picks = np.unique(np.linspace(0, nz - 1, min(nz, planes)).round().astype(int))
    sample = np.concatenate([np.asarray(volume[int(z)], dtype=np.float32).ravel()[::7] for z in picks])
    low, high = np.percentile(sample[np.isfinite(sample)], [0.5, 99.5])
    return float(low), float(high) if high > low else float(low) + 1.0


def _probability_layer_args(path: Path) -> tuple[object, dict]:
    """The probability volume and napari layer keywords placing it on the original grid."""
    if path.suffix == ".mrc":
        from vesicleflow.io import read_tomogram

        return read_tomogram(path, "probability map"), {}
    from vesicleflow.grid import GridMapping
    from vesicleflow.volumes import open_volume

    volume = open_volume(path)
    mapping = GridMapping.from_attrs(dict(volume.attrs)["grid"])
    # model index i sits at original index (i + 0.5) / zoom - 0.5
    scale = 1.0 / mapping.zoom
    return volume, {"scale": (scale,) * 3, "translate": (0.5 * scale - 0.5,) * 3}


class CurationController:
    """Keeps a :class:`Curation` and the viewer's ``vesicles`` layer in step; owns the shortcuts."""

    def __init__(self, viewer, curation: Curation, results_dir: str | Path, probability: Path | None = None,
                 title: str = "tomogram"):
        self.viewer = viewer
        self.curation = curation
        self.results_dir = Path(results_dir)
        self.listeners: list[Callable[[], None]] = []
        self.message = ""
        self._syncing = False
        self._last_added: list[int] = []
        self.image = viewer.add_image(curation.volume, name=title, contrast_limits=contrast_limits(curation.volume),
                                      colormap="gray")
        self.probability = None
        if probability is not None:
            data, placement = _probability_layer_args(Path(probability))
            self.probability = viewer.add_image(data, name=PROBABILITY_LAYER, colormap="magma", blending="additive",
                                                opacity=0.5, contrast_limits=(0.0, 1.0), visible=False,
                                                **placement)
        self.points = viewer.add_points(
            np.empty((0, 3)), name=VESICLE_LAYER, ndim=3, face_color="transparent", border_width=0.08,
            border_width_is_relative=True, features=pd.DataFrame({"vesicle_id": pd.Series(dtype=np.int64)}),
            feature_defaults={"vesicle_id": 0}, **self._projection_keywords())
        self.points.events.data.connect(self._on_data)
        selection_events = self.points.selected_data.events
        try:  # napari >= 0.6 (psygnal) names it items_changed, older versions changed
            selection_changed = selection_events.items_changed
        except AttributeError:
            selection_changed = selection_events.changed
        selection_changed.connect(self._notify)
        viewer.layers.selection.active = self.points
        self._bind_keys()
        self.refresh()
        if len(curation.volume.shape) == 3:
            viewer.dims.set_point(0, curation.volume.shape[0] // 2)

    @staticmethod
    def _projection_keywords() -> dict:
        """Draw points as spheres' cross-sections in thick slices (napari >= 0.5); older: plain discs."""
        import inspect

        from napari.layers import Points

        if "projection_mode" in inspect.signature(Points).parameters:
            return {"projection_mode": "rescale_spherical"}
        return {"out_of_slice_display": True}

    # ------------------------------------------------------------------ table -> layer

    @contextlib.contextmanager
    def _quiet(self):
        previous, self._syncing = self._syncing, True
        try:
            yield
        finally:
            self._syncing = previous

    def refresh(self, select_ids=()) -> None:
        """Redraw the vesicles layer from the table; select ``select_ids``."""
        table = self.curation.table
        voxel_nm = self.curation.voxel_nm
        coords = table[["z", "y", "x"]].to_numpy(dtype=np.float64).reshape(-1, 3)
        diameters = 2 * table["radius_nm"].to_numpy(dtype=np.float64) / voxel_nm
        colours = np.array([SOURCE_COLOURS.get(s, (1, 1, 1, 1)) for s in table["source"]]).reshape(-1, 4)
        ids = table["vesicle_id"].to_numpy(dtype=np.int64)
        with self._quiet():
            self.points.selected_data = set()
            self.points.data = coords
            self.points.features = pd.DataFrame({"vesicle_id": ids})
            self.points.feature_defaults = {"vesicle_id": 0}
            if len(coords):
                self.points.size = diameters
                self.points.border_color = colours
                self.points.face_color = np.zeros((len(coords), 4))
            wanted = set(np.atleast_1d(select_ids).tolist())
            self.points.selected_data = {i for i, v in enumerate(ids) if v in wanted}
        # thick z slices so that every sphere shows its cross-section in each plane it crosses
        reach = float(diameters.max()) / 2 + 1 if len(diameters) else 1.0
        if self.curation.volume.shape[0] > 1 and len(self.viewer.dims.range) == 3:
            margins = list(self.viewer.dims.margin_left)
            if margins[0] < reach:
                margins[0] = reach
                self.viewer.dims.margin_left = self.viewer.dims.margin_right = tuple(margins)
        self._notify()

    def _notify(self, *args) -> None:
        for listener in list(self.listeners):
            listener()

    def _say(self, message: str) -> None:
        self.message = message
        with contextlib.suppress(Exception):
            self.viewer.status = message
        log.info("%s", message)
        self._notify()

    # ------------------------------------------------------------------ layer -> table

    def selected_ids(self) -> list[int]:
        ids = self.points.features["vesicle_id"].to_numpy()
        return [int(ids[i]) for i in sorted(self.points.selected_data) if i < len(ids) and ids[i] > 0]

    def _on_data(self, event) -> None:
        """napari changed the layer (a click in add mode, a delete, a drag): apply it to the table."""
        if self._syncing:
            return
        action = str(getattr(event, "action", "")).lower().rsplit(".", 1)[-1]
        if action == "added":
            n = len(self.points.data)
            new = [i % n for i in (getattr(event, "data_indices", None) or ()) if -n <= i < n]
            if not new:  # napari < 0.5 sends no indices: new points carry the default id 0
                new = np.flatnonzero(self.points.features["vesicle_id"].to_numpy() <= 0).tolist()
            added = [self.place(self.points.data[index], refresh=False) for index in new]
            self.refresh(select_ids=[v for v in added if v is not None])
        elif action == "removed":
            present = set(self.points.features["vesicle_id"].tolist())
            gone = [v for v in self.curation.table["vesicle_id"].tolist() if v not in present]
            if gone:
                self.curation.remove(gone)
                self._say(f"deleted {len(gone)} vesicle(s)")
            self.refresh()
        elif action == "changed":
            ids = self.points.features["vesicle_id"].to_numpy()
            indices = [i for i in (getattr(event, "data_indices", None) or range(len(ids))) if 0 <= i < len(ids)]
            table = self.curation.table.set_index("vesicle_id")
            moves = {int(ids[i]): self.points.data[i] for i in indices
                     if ids[i] in table.index and not np.allclose(table.loc[ids[i], ["z", "y", "x"]].to_numpy(float),
                                                       self.points.data[i])}
            if moves:
                self.curation.move(moves)
                self._say(f"moved {len(moves)} vesicle(s)")
            self.refresh(select_ids=list(moves))

    # ----------------------------------------------------------------------- actions

    def place(self, point_zyx, refresh: bool = True) -> int | None:
        """Fit the vesicle around a point (z, y, x voxels) and add it; its id or None."""
        point = np.asarray(point_zyx, dtype=np.float64)
        vesicle_id = self.curation.add_at(point)
        where = ", ".join(f"{c:.0f}" for c in point)
        if vesicle_id is None:
            self._last_added = []
            self._say(f"no vesicle membrane found around (z, y, x) = ({where}); click nearer its centre, "
                      "or raise the maximum diameter")
        else:
            self._last_added = [vesicle_id]
            row = self.curation.table.set_index("vesicle_id").loc[vesicle_id]
            self._say(f"added vesicle {vesicle_id}: radius {row['radius_nm']:.1f} nm at "
                      f"(z, y, x) = ({row['z']:.1f}, {row['y']:.1f}, {row['x']:.1f})")
        if refresh:
            self.refresh(select_ids=self._last_added)
        return vesicle_id

    def delete_selected(self) -> int:
        ids = self.selected_ids()
        if ids:
            self.curation.remove(ids)
            self.refresh()
            self._say(f"deleted {len(ids)} vesicle(s)")
        else:
            self._say("nothing selected (select mode: S)")
        return len(ids)

    def set_radius(self, radius_nm: float) -> None:
        ids = self.selected_ids()
        if ids:
            self.curation.set_radius(ids, radius_nm)
            self.refresh(select_ids=ids)
            self._say(f"radius of {len(ids)} vesicle(s) set to {radius_nm:.1f} nm")

    def change_radius(self, delta_nm: float) -> None:
        ids = self.selected_ids()
        if ids:
            self.curation.change_radius(ids, delta_nm)
            self.refresh(select_ids=ids)
            self._say(f"radius {'+' if delta_nm > 0 else ''}{delta_nm:g} nm for {len(ids)} vesicle(s)")
        else:
            self._say("nothing selected (select mode: S)")

    def undo(self) -> None:
        self._say("undone" if self.curation.undo() else "nothing to undo")
        self.refresh()

    def redo(self) -> None:
        self._say("redone" if self.curation.redo() else "nothing to redo")
        self.refresh()

    def save(self) -> Path:
        path = self.curation.save(self.results_dir)
        self._say(f"saved {len(self.curation.table)} vesicles to {path}")
        return path

    def set_mode(self, mode: str) -> None:
        self.viewer.layers.selection.active = self.points
        self.points.mode = mode

    def _bind_keys(self) -> None:
        bindings = {
            "Delete": lambda viewer: self.delete_selected(),
            "Backspace": lambda viewer: self.delete_selected(),
            "]": lambda viewer: self.change_radius(+RADIUS_STEP_NM),
            "[": lambda viewer: self.change_radius(-RADIUS_STEP_NM),
            "Control-Z": lambda viewer: self.undo(),
            "Control-Shift-Z": lambda viewer: self.redo(),
            "Control-Shift-S": lambda viewer: self.save(),
        }
        for key, action in bindings.items():
            self.viewer.bind_key(key, action, overwrite=True)


def make_widget(controller: CurationController):
    """The dock widget: counts, save path, radius and search settings, buttons, shortcut list."""
    from qtpy.QtCore import Qt
    from qtpy.QtWidgets import (
        QDoubleSpinBox,
        QFormLayout,
        QGridLayout,
        QLabel,
        QPushButton,
        QVBoxLayout,
        QWidget,
    )

    curation = controller.curation
    widget = QWidget()
    widget.setObjectName("vesicleflow_curation")
    layout = QVBoxLayout(widget)
    summary = QLabel()
    summary.setWordWrap(True)
    layout.addWidget(summary)

    form = QFormLayout()
    radius = QDoubleSpinBox()
    radius.setRange(1.0, 500.0)
    radius.setDecimals(1)
    radius.setSingleStep(RADIUS_STEP_NM)
    radius.setSuffix(" nm")
    radius.setKeyboardTracking(False)
    radius.setToolTip("outer radius of the selected vesicle(s); type a value or use ] and [")
    form.addRow("radius of selection", radius)
    diameter = QDoubleSpinBox()
    diameter.setRange(2 * curation.min_radius_nm + 1, 1000.0)
    diameter.setDecimals(0)
    diameter.setSingleStep(10.0)
    diameter.setSuffix(" nm")
    diameter.setValue(curation.max_diameter_nm)
    diameter.setToolTip("a click searches for vesicles up to this outer diameter")
    form.addRow("max diameter (click)", diameter)
    layout.addLayout(form)

    buttons = QGridLayout()
    actions = [
        ("Place (P)", lambda: controller.set_mode("add")),
        ("Select (S)", lambda: controller.set_mode("select")),
        ("Delete (Del)", controller.delete_selected),
        ("Undo (Ctrl+Z)", controller.undo),
        ("Redo (Ctrl+Shift+Z)", controller.redo),
        ("Save (Ctrl+Shift+S)", controller.save),
    ]
    widget.buttons = {}
    for k, (text, action) in enumerate(actions):
        button = QPushButton(text)
        button.clicked.connect(lambda checked=False, action=action: action())
        buttons.addWidget(button, k // 2, k % 2)
        widget.buttons[text.split(" (")[0].lower()] = button
    layout.addLayout(buttons)

    rows = "".join(f"<tr><td><b>{keys}</b></td><td>&nbsp;{what}</td></tr>" for keys, what in SHORTCUTS)
    help_label = QLabel(f"<table>{rows}</table>")
    help_label.setTextFormat(Qt.RichText)
    help_label.setWordWrap(True)
    layout.addWidget(help_label)
    status = QLabel()
    status.setWordWrap(True)
    layout.addWidget(status)
    layout.addStretch(1)

    def update() -> None:
        table = curation.table
        counts = {s: int((table["source"] == s).sum()) for s in SOURCE_COLOURS}
        summary.setText(
            f"<b>{curation.dataset}/{curation.tomogram}</b>: {len(table)} vesicles "
            f"({counts[SOURCE_AUTO]} auto, {counts[SOURCE_ADDED]} added, {counts[SOURCE_EDITED]} edited)"
            f"{' — <i>unsaved changes</i>' if curation.unsaved else ''}<br>"
            f"saves to {controller.results_dir / 'vesicles.curated.csv'}")
        ids = controller.selected_ids()
        radius.blockSignals(True)
        radius.setEnabled(bool(ids))
        if ids:
            radius.setValue(float(table.loc[table["vesicle_id"] == ids[0], "radius_nm"].iloc[0]))
        radius.blockSignals(False)
        widget.buttons["undo"].setEnabled(curation.can_undo)
        widget.buttons["redo"].setEnabled(curation.can_redo)
        status.setText(controller.message)

    def radius_changed(value: float) -> None:
        controller.set_radius(value)

    def diameter_changed(value: float) -> None:
        curation.max_diameter_nm = float(value)

    radius.valueChanged.connect(radius_changed)
    diameter.valueChanged.connect(diameter_changed)
    controller.listeners.append(update)
    widget.radius, widget.diameter, widget.summary, widget.status = radius, diameter, summary, status
    update()
    return widget


def open_viewer(inputs: CurationInputs, viewer=None, show: bool = True, **session_options):
    """Build the viewer (or use ``viewer``) with the layers and the dock widget; (viewer, controller, widget)."""
    require_napari()
    import napari

    if viewer is None:
        viewer = napari.Viewer(title=f"vesicleflow curate: {inputs.dataset}/{inputs.name}", show=show)
    curation = inputs.session(**session_options)
    controller = CurationController(viewer, curation, inputs.results_dir, inputs.probability, title=inputs.name)
    widget = make_widget(controller)
    if hasattr(viewer, "window"):
        viewer.window.add_dock_widget(widget, name="vesicleflow curation", area="right")
    return viewer, controller, widget


def save_screenshot(viewer, path: str | Path, size: tuple[int, int] = (1500, 950)) -> Path:
    """Render the whole window (canvas, layer list, dock widget) to a PNG."""
    from qtpy.QtWidgets import QApplication

    window = viewer.window._qt_window  # napari has no public way to size the window
    window.resize(*size)
    for _ in range(3):
        QApplication.processEvents()
    viewer.reset_view()
    QApplication.processEvents()
    viewer.screenshot(str(path), canvas_only=False)
    return Path(path)


def _ask_before_closing_unsaved(viewer, controller: CurationController) -> None:
    """Closing the window with unsaved edits asks: save, discard or cancel."""
    from qtpy.QtCore import QEvent, QObject
    from qtpy.QtWidgets import QMessageBox

    class CloseGuard(QObject):
        def eventFilter(self, watched, event):  # noqa: N802 (Qt's name)
            if event.type() != QEvent.Close or not controller.curation.unsaved:
                return False
            answer = QMessageBox.question(
                watched, "vesicleflow curate", "Save the curated vesicles before closing?",
                QMessageBox.Save | QMessageBox.Discard | QMessageBox.Cancel, QMessageBox.Save)
            if answer == QMessageBox.Cancel:
                event.ignore()
                return True
            if answer == QMessageBox.Save:
                controller.save()
            return False

    window = viewer.window._qt_window
    window._vesicleflow_close_guard = CloseGuard(window)  # keep a reference
    window.installEventFilter(window._vesicleflow_close_guard)


def run(inputs: CurationInputs, screenshot: str | Path | None = None, **session_options) -> None:
    """Open the curation viewer and block until it is closed; with ``screenshot``, render the
    window to that PNG and return instead (no interaction)."""
    require_napari()
    import napari

    viewer, controller, _ = open_viewer(inputs, show=True, **session_options)
    if screenshot is not None:
        save_screenshot(viewer, screenshot)
        viewer.close()
        return
    _ask_before_closing_unsaved(viewer, controller)
    napari.run()
    if controller.curation.unsaved:
        log.warning("closed with unsaved changes: %s was not written", controller.results_dir / "vesicles.curated.csv")
