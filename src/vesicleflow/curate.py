"""curate: correct one tomogram's vesicles by hand (the library behind ``vesicleflow curate``).

Everything here is GUI-free and tested without napari (``curate_napari`` is the viewer on top):

- :func:`fit_at_point`: a click -> a fitted sphere. The same radial-profile fit the workflow uses
  (:func:`vesicleflow.spherefit.fit_sphere`), seeded at the click with a range of radius guesses;
  the candidate whose membrane is the darkest dip wins.
- table operations, each a pure function ``table -> new table``: :func:`add_vesicle`,
  :func:`remove_vesicles`, :func:`set_radius`, :func:`move_vesicle`; :class:`Curation` strings them
  together with undo/redo for an interactive session.
- :func:`save_curated` writes ``vesicles.curated.csv`` (vesicles.csv's columns + ``source``)
  atomically beside the automatic results, which it never touches.
- :func:`open_results` loads a results folder (``<output_dir>/<dataset>/<tomo>``) or a bare
  tomogram, resuming from an existing curated table.
- :func:`curated_spheres` merges a curated table into the spherefit table, so the export stage can
  build every export (and, through vesicles.csv, the statistics) from the curated vesicles.
"""

from __future__ import annotations

import logging
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
from scipy import ndimage

from vesicleflow.export import VESICLE_COLUMNS, nearest_neighbour_distances, nearest_surface_distances
from vesicleflow.io import InputError, read_json, read_tomogram, read_tomogram_info, write_table
from vesicleflow.spherefit import SphereFit, fibonacci_directions, fit_sphere

log = logging.getLogger(__name__)

#: The curated table's file name, in the tomogram's results folder.
CURATED_NAME = "vesicles.curated.csv"
SOURCE_AUTO, SOURCE_ADDED, SOURCE_EDITED = "auto", "added", "edited"
SOURCES = (SOURCE_AUTO, SOURCE_ADDED, SOURCE_EDITED)
CURATED_COLUMNS = [*VESICLE_COLUMNS, *([] if "source" in VESICLE_COLUMNS else ["source"])]
#: ``outlier_reason`` that :func:`curated_spheres` gives automatic vesicles the curator removed.
REMOVED_REASON = "removed_by_curator"
DEFAULT_MAX_DIAMETER_NM = 100.0
DEFAULT_MIN_RADIUS_NM = 8.0
#: Radius guesses tried from one click (geometric series from the minimum to the maximum radius).
N_RADIUS_GUESSES = 10
#: The dip score compares the membrane shell with shells this far inside and outside it (nm).
DIP_OFFSET_NM = 4.0
#: A click finds no vesicle unless the best membrane is at least this dark (standard deviations of
#: the smoothed neighbourhood). On simulated synapses (SNR 0.05-0.25) true vesicles score 0.8-2.7
#: and clicks into cytoplasm away from vesicles score below 0.3 (rarely up to 0.7).
MIN_MEMBRANE_DIP = 0.4
#: Columns measured on the volumes by export; unknown (NaN) for vesicles placed or moved by hand.
_VOLUME_MEASUREMENTS = ("membrane_intensity_sd", "lumen_intensity_sd", "mask_centre_distance_nm",
                        "mask_distance_nm")
_TEXT_COLUMNS = ("dataset", "tomogram", "flags", "source")

_SHELL_DIRECTIONS = fibonacci_directions(400)


# ----------------------------------------------------------------------------- fit at a click

def _smoothed_roi(volume, point: np.ndarray, voxel_nm: float, half_nm: float) -> tuple[np.ndarray, np.ndarray]:
    """Smoothed, robustly standardised box of half side ``half_nm`` around ``point``; (roi, lower corner)."""
    half = int(np.ceil(half_nm / voxel_nm))
    centre = np.floor(point).astype(int)
    lo = np.maximum(centre - half, 0)
    hi = np.minimum(centre + half + 1, volume.shape)
    roi = np.asarray(volume[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]], dtype=np.float32)
    roi = ndimage.gaussian_filter(roi, max(1.0 / voxel_nm, 0.5))
    return (roi - float(np.median(roi))) / (float(np.std(roi)) or 1.0), lo


def _shell_mean(roi: np.ndarray, centre: np.ndarray, radius_vox: float) -> float:
    points = centre[:, None] + radius_vox * _SHELL_DIRECTIONS.T
    samples = ndimage.map_coordinates(roi, points, order=1, mode="constant", cval=np.nan)
    finite = np.isfinite(samples)
    return float(samples[finite].mean()) if finite.sum() >= 20 else float("nan")


def membrane_dip(roi: np.ndarray, centre_vox: np.ndarray, membrane_radius_nm: float, voxel_nm: float,
                 offset_nm: float = DIP_OFFSET_NM) -> float:
    """How much darker the shell at ``membrane_radius_nm`` is than shells ``offset_nm`` inside and
    outside it (standard deviations of ``roi``); rays in the missing-wedge cone are skipped."""
    mid = _shell_mean(roi, centre_vox, membrane_radius_nm / voxel_nm)
    inner = _shell_mean(roi, centre_vox, max(membrane_radius_nm - offset_nm, 0.5 * membrane_radius_nm) / voxel_nm)
    outer = _shell_mean(roi, centre_vox, (membrane_radius_nm + offset_nm) / voxel_nm)
    return 0.5 * (inner + outer) - mid


def _centre(fit: SphereFit) -> np.ndarray:
    return np.array([fit.z, fit.y, fit.x])


def _refine(volume, fit: SphereFit, voxel_nm: float, bilayer_thickness_nm: float | None,
            rounds: int = 5) -> SphereFit:
    """Re-seed the fit with its own result until it stops moving (a fixed point of fit_sphere)."""
    for _ in range(rounds):
        again = fit_sphere(volume, _centre(fit), fit.radius_nm, voxel_nm, bilayer_thickness_nm)
        if again is None:
            return fit
        settled = (np.linalg.norm(_centre(again) - _centre(fit)) < 0.05
                   and abs(again.radius_nm - fit.radius_nm) < 0.05)
        fit = again
        if settled:
            break
    return fit


def fit_at_point(volume, point_zyx, voxel_nm: float, max_diameter_nm: float = DEFAULT_MAX_DIAMETER_NM,
                 min_radius_nm: float = DEFAULT_MIN_RADIUS_NM, bilayer_thickness_nm: float | None = 4.5,
                 min_dip: float = MIN_MEMBRANE_DIP) -> SphereFit | None:
    """The vesicle around a clicked point: a sphere fitted to the tomogram, or None if none is found.

    ``point_zyx`` is a voxel position (original grid) anywhere inside the vesicle's membrane.
    Without a radius guess, :func:`~vesicleflow.spherefit.fit_sphere` (the workflow's fit) is
    seeded at the point with radius guesses from ``min_radius_nm`` to ``max_diameter_nm / 2``;
    solutions that stay around the point and within the radius range are refined to a fixed point
    and scored by :func:`membrane_dip` (all on one normalised box, so scores compare); the darkest
    membrane wins if its dip reaches ``min_dip``.
    """
    point = np.asarray(point_zyx, dtype=np.float64)
    max_radius_nm = max_diameter_nm / 2
    if max_radius_nm <= min_radius_nm:
        raise ValueError(f"max_diameter_nm {max_diameter_nm} leaves no radius above {min_radius_nm} nm")
    if np.any(point < -0.5) or np.any(point > np.asarray(volume.shape) - 0.5):
        return None
    roi, lo = _smoothed_roi(volume, point, voxel_nm, max_radius_nm + DIP_OFFSET_NM + 6.0)

    def plausible(fit: SphereFit | None) -> bool:
        return (fit is not None and min_radius_nm <= fit.radius_nm <= max_radius_nm
                and np.linalg.norm(_centre(fit) - point) * voxel_nm < fit.membrane_radius_nm - 2.0)

    def score(fit: SphereFit) -> float:
        dip = membrane_dip(roi, _centre(fit) - lo, fit.membrane_radius_nm, voxel_nm)
        return dip if np.isfinite(dip) else -np.inf

    candidates: list[SphereFit] = []
    for guess in np.geomspace(min_radius_nm, max_radius_nm, N_RADIUS_GUESSES):
        fit = fit_sphere(volume, point, float(guess), voxel_nm, bilayer_thickness_nm)
        if not plausible(fit):
            continue
        if any(np.linalg.norm(_centre(fit) - _centre(other)) < 0.5 and abs(fit.radius_nm - other.radius_nm) < 0.5
               for other in candidates):
            continue
        candidates.append(fit)
    # Refining is the costly part: refine the three best-scoring distinct candidates only.
    candidates.sort(key=score, reverse=True)
    refined = [fit for fit in (_refine(volume, c, voxel_nm, bilayer_thickness_nm) for c in candidates[:3])
               if plausible(fit)]
    if not refined:
        return None
    best = max(refined, key=score)
    return best if score(best) >= min_dip else None


# ----------------------------------------------------------------------------- table operations

def empty_table() -> pd.DataFrame:
    """A curated table without rows, with its columns and dtypes."""
    table = pd.DataFrame({column: pd.Series(dtype=object if column in _TEXT_COLUMNS else np.float64)
                          for column in CURATED_COLUMNS})
    table["vesicle_id"] = table["vesicle_id"].astype(np.int64)
    return table


def _typed(table: pd.DataFrame) -> pd.DataFrame:
    """Every curated column present, in order, with fixed dtypes (text columns never NaN)."""
    table = table.copy()
    for column in CURATED_COLUMNS:
        if column not in table:
            table[column] = "" if column in _TEXT_COLUMNS else np.nan
    for column in CURATED_COLUMNS:
        if column in _TEXT_COLUMNS:
            table[column] = table[column].fillna("").astype(str).astype(object)
        elif column == "vesicle_id":
            table[column] = table[column].astype(np.int64)
        else:
            table[column] = table[column].astype(np.float64)
    extra = [c for c in table.columns if c not in CURATED_COLUMNS]
    return table[CURATED_COLUMNS + extra].reset_index(drop=True)


def as_curated(vesicles: pd.DataFrame, source: str = SOURCE_AUTO) -> pd.DataFrame:
    """A vesicles.csv table as a curated table (every row tagged ``source``)."""
    table = vesicles.copy()
    table["source"] = source
    return _typed(table)


def read_curated(path: str | os.PathLike) -> pd.DataFrame:
    """Read and check a ``vesicles.curated.csv``; problems raise :class:`InputError` naming the file."""
    path = Path(path)
    try:
        table = pd.read_csv(path, keep_default_na=False, na_values=[""],
                            dtype=dict.fromkeys(_TEXT_COLUMNS, str))
    except (OSError, ValueError, pd.errors.ParserError) as err:
        raise InputError(f"{path}: not a readable curated vesicle table ({err})") from err
    required = ["vesicle_id", "x", "y", "z", "radius_nm", "source"]
    missing = [c for c in required if c not in table]
    if missing:
        raise InputError(f"{path}: missing column(s) {', '.join(missing)} (a curated table has vesicles.csv's "
                         "columns plus source)")
    table["source"] = table["source"].fillna("").astype(str)
    unknown = sorted(set(table["source"]) - set(SOURCES))
    if unknown:
        raise InputError(f"{path}: unknown source value(s) {', '.join(map(repr, unknown))}; expected "
                         f"{', '.join(SOURCES)}")
    numbers = table[["vesicle_id", "x", "y", "z", "radius_nm"]].apply(pd.to_numeric, errors="coerce")
    if numbers.isna().any().any():
        rows = numbers.index[numbers.isna().any(axis=1)] + 2
        raise InputError(f"{path}: empty or non-numeric vesicle_id/x/y/z/radius_nm on line(s) "
                         f"{', '.join(map(str, rows[:5]))}")
    if (numbers["radius_nm"] <= 0).any():
        raise InputError(f"{path}: radius_nm must be positive")
    if table["vesicle_id"].duplicated().any():
        raise InputError(f"{path}: duplicate vesicle_id values")
    return _typed(table)


def _next_id(table: pd.DataFrame) -> int:
    return int(table["vesicle_id"].max()) + 1 if len(table) else 1


def _require_ids(table: pd.DataFrame, ids) -> np.ndarray:
    ids = np.atleast_1d(np.asarray(list(ids) if not np.isscalar(ids) else [ids], dtype=np.int64))
    unknown = sorted(set(ids.tolist()) - set(table["vesicle_id"].tolist()))
    if unknown:
        raise KeyError(f"no vesicle with id {', '.join(map(str, unknown))}")
    return ids


def add_vesicle(table: pd.DataFrame, fit: SphereFit, voxel_nm: float, dataset: str = "",
                tomogram: str = "") -> tuple[pd.DataFrame, int]:
    """Append a fitted sphere as a new vesicle (``source`` = added); returns (table, its id)."""
    vesicle_id = _next_id(table)
    row = {"dataset": dataset or (table["dataset"].iloc[0] if len(table) else ""),
           "tomogram": tomogram or (table["tomogram"].iloc[0] if len(table) else ""),
           "vesicle_id": vesicle_id, "x": fit.x, "y": fit.y, "z": fit.z, "radius_nm": fit.radius_nm,
           "membrane_thickness_nm": fit.membrane_thickness_nm, "membrane_contrast": fit.membrane_contrast,
           "fit_score": fit.fit_score, "membrane_radius_nm": fit.membrane_radius_nm, "flags": "",
           "source": SOURCE_ADDED}
    new = _typed(pd.DataFrame([row]))
    combined = new if table.empty else pd.concat([_typed(table), new], ignore_index=True)
    return with_derived_columns(combined, voxel_nm), vesicle_id


def remove_vesicles(table: pd.DataFrame, ids) -> pd.DataFrame:
    """The table without the vesicles ``ids`` (unknown ids raise KeyError)."""
    ids = _require_ids(table, ids)
    return table[~table["vesicle_id"].isin(ids)].reset_index(drop=True)


def _edited(source: str) -> str:
    return SOURCE_ADDED if source == SOURCE_ADDED else SOURCE_EDITED


def set_radius(table: pd.DataFrame, vesicle_id: int, radius_nm: float, voxel_nm: float) -> pd.DataFrame:
    """Give one vesicle a new outer radius by hand (source auto -> edited; added stays added).

    The membrane mid radius moves with it (same bilayer offset); the measured membrane thickness,
    contrast and fit score describe the original fit and are kept.
    """
    if not np.isfinite(radius_nm) or radius_nm <= 0:
        raise ValueError(f"radius must be positive, got {radius_nm}")
    _require_ids(table, [vesicle_id])
    table = table.copy()
    row = table.index[table["vesicle_id"] == vesicle_id][0]
    offset = table.at[row, "radius_nm"] - table.at[row, "membrane_radius_nm"]
    table.at[row, "radius_nm"] = float(radius_nm)
    table.at[row, "membrane_radius_nm"] = float(radius_nm) - offset if np.isfinite(offset) else np.nan
    table.at[row, "source"] = _edited(table.at[row, "source"])
    return with_derived_columns(table, voxel_nm)


def move_vesicle(table: pd.DataFrame, vesicle_id: int, centre_zyx, voxel_nm: float) -> pd.DataFrame:
    """Move one vesicle's centre by hand (source auto -> edited); volume measurements become unknown."""
    _require_ids(table, [vesicle_id])
    table = table.copy()
    row = table.index[table["vesicle_id"] == vesicle_id][0]
    table.loc[row, ["z", "y", "x"]] = np.asarray(centre_zyx, dtype=np.float64)
    table.loc[row, list(_VOLUME_MEASUREMENTS)] = np.nan
    table.at[row, "source"] = _edited(table.at[row, "source"])
    return with_derived_columns(table, voxel_nm)


def with_derived_columns(table: pd.DataFrame, voxel_nm: float) -> pd.DataFrame:
    """Recompute what follows from centres and radii: nm/Å coordinates, radius in voxels,
    nearest-neighbour distances, distance of the surface to the mask border."""
    table = _typed(table)
    for axis in "xyz":
        table[f"{axis}_nm"] = table[axis] * voxel_nm
        table[f"{axis}_angstrom"] = table[axis] * voxel_nm * 10
    table["radius_voxels"] = table["radius_nm"] / voxel_nm
    centres_nm = table[["z_nm", "y_nm", "x_nm"]].to_numpy(dtype=np.float64)
    radii = table["radius_nm"].to_numpy(dtype=np.float64)
    table["nn_distance_nm"] = nearest_neighbour_distances(centres_nm)
    table["nn_surface_distance_nm"] = nearest_surface_distances(centres_nm, radii) if len(table) else []
    table["mask_distance_nm"] = table["mask_centre_distance_nm"] - table["radius_nm"]
    return table


def save_curated(table: pd.DataFrame, results_dir: str | os.PathLike, voxel_nm: float) -> Path:
    """Write ``<results_dir>/vesicles.curated.csv`` atomically (rows by vesicle_id); returns its path.

    Only that file is written: the automatic results (vesicles.csv, spheres.csv, ...) are untouched.
    """
    path = Path(results_dir) / CURATED_NAME
    table = with_derived_columns(table, voxel_nm).sort_values("vesicle_id", kind="stable")
    write_table(path, table[CURATED_COLUMNS])
    log.info("%d vesicles (%s) saved to %s", len(table),
             ", ".join(f"{(table['source'] == s).sum()} {s}" for s in SOURCES), path)
    return path


def curation_summary(table: pd.DataFrame) -> dict[str, int]:
    """Counts per source, plus the total: ``{"n_vesicles", "auto", "added", "edited"}``."""
    return {"n_vesicles": len(table), **{s: int((table["source"] == s).sum()) for s in SOURCES}}


# ---------------------------------------------------------------------------- editing session

@dataclass
class Curation:
    """An interactive editing session on one tomogram: the current table plus undo/redo stacks.

    Every edit is one of the pure table functions above; the session only remembers the tables
    before and after, so undo and redo restore exactly.
    """

    table: pd.DataFrame
    volume: object  # (z, y, x) array-like of the ORIGINAL tomogram (a memory map is fine)
    voxel_nm: float
    dataset: str = ""
    tomogram: str = ""
    bilayer_thickness_nm: float | None = 4.5
    max_diameter_nm: float = DEFAULT_MAX_DIAMETER_NM
    min_radius_nm: float = DEFAULT_MIN_RADIUS_NM
    _undo: list[pd.DataFrame] = field(default_factory=list, repr=False)
    _redo: list[pd.DataFrame] = field(default_factory=list, repr=False)
    _saved: pd.DataFrame | None = field(default=None, repr=False)

    def __post_init__(self):
        self.table = with_derived_columns(self.table, self.voxel_nm)
        self._saved = self.table

    def _commit(self, table: pd.DataFrame) -> None:
        self._undo.append(self.table)
        self._redo.clear()
        self.table = table

    @property
    def can_undo(self) -> bool:
        return bool(self._undo)

    @property
    def can_redo(self) -> bool:
        return bool(self._redo)

    @property
    def unsaved(self) -> bool:
        return self.table is not self._saved

    def fit(self, point_zyx) -> SphereFit | None:
        return fit_at_point(self.volume, point_zyx, self.voxel_nm, self.max_diameter_nm, self.min_radius_nm,
                            self.bilayer_thickness_nm)

    def add_at(self, point_zyx) -> int | None:
        """Fit the vesicle around a clicked point and add it; its id, or None when no membrane is found."""
        fit = self.fit(point_zyx)
        if fit is None:
            return None
        table, vesicle_id = add_vesicle(self.table, fit, self.voxel_nm, self.dataset, self.tomogram)
        self._commit(table)
        return vesicle_id

    def remove(self, ids) -> int:
        ids = list(ids)
        if not ids:
            return 0
        self._commit(remove_vesicles(self.table, ids))
        return len(ids)

    def set_radius(self, ids, radius_nm: float) -> None:
        table = self.table
        for vesicle_id in np.atleast_1d(ids):
            table = set_radius(table, int(vesicle_id), radius_nm, self.voxel_nm)
        if table is not self.table:
            self._commit(table)

    def change_radius(self, ids, delta_nm: float) -> None:
        """Grow (delta > 0) or shrink every vesicle in ``ids`` by ``delta_nm`` (one undo step)."""
        table = self.table
        for vesicle_id in np.atleast_1d(ids):
            current = float(table.loc[table["vesicle_id"] == int(vesicle_id), "radius_nm"].iloc[0])
            table = set_radius(table, int(vesicle_id), max(current + delta_nm, 0.5), self.voxel_nm)
        if table is not self.table:
            self._commit(table)

    def move(self, moves: dict[int, np.ndarray]) -> None:
        """Move vesicles {id: new (z, y, x)} by hand (one undo step)."""
        table = self.table
        for vesicle_id, centre in moves.items():
            table = move_vesicle(table, int(vesicle_id), centre, self.voxel_nm)
        if table is not self.table:
            self._commit(table)

    def undo(self) -> bool:
        if not self._undo:
            return False
        self._redo.append(self.table)
        self.table = self._undo.pop()
        return True

    def redo(self) -> bool:
        if not self._redo:
            return False
        self._undo.append(self.table)
        self.table = self._redo.pop()
        return True

    def save(self, results_dir: str | os.PathLike) -> Path:
        path = save_curated(self.table, results_dir, self.voxel_nm)
        self._saved = self.table
        return path


# ---------------------------------------------------------------------------------- loading

@dataclass
class CurationInputs:
    """What a curation session needs, found from a results folder or a bare tomogram."""

    tomogram: Path
    results_dir: Path
    dataset: str
    name: str
    voxel_size_angstrom: float
    table: pd.DataFrame
    started_from: str  # "curated" (resumed), "automatic" (vesicles.csv) or "empty"
    probability: Path | None = None  # probability.mrc (original grid) or probability.zarr (model grid)

    @property
    def voxel_nm(self) -> float:
        return self.voxel_size_angstrom / 10

    @property
    def curated_path(self) -> Path:
        return self.results_dir / CURATED_NAME

    def session(self, **kwargs) -> Curation:
        """A :class:`Curation` on this tomogram (keywords: bilayer_thickness_nm, max_diameter_nm, ...)."""
        return Curation(self.table, read_tomogram(self.tomogram), self.voxel_nm, self.dataset, self.name, **kwargs)

    def describe(self) -> dict:
        info = {k: v for k, v in asdict(self).items() if k != "table"}
        return {**info, **curation_summary(self.table)}


def curated_path(results_dir: str | os.PathLike) -> Path | None:
    """``<results_dir>/vesicles.curated.csv`` if it exists, else None."""
    path = Path(results_dir) / CURATED_NAME
    return path if path.is_file() else None


def open_results(path: str | os.PathLike, results_dir: str | os.PathLike | None = None,
                 tomogram: str | os.PathLike | None = None,
                 voxel_size_angstrom: float | None = None) -> CurationInputs:
    """Find the tomogram, voxel size, names and starting table of a curation session.

    ``path`` is either a tomogram's results folder ``<output_dir>/<dataset>/<tomo>`` (its
    ``tomogram.json`` names the tomogram and voxel size) or a bare tomogram (``.mrc``/``.rec``):
    then results go to ``results_dir`` (default ``./<dataset>/<tomo>``, i.e. the layout of an
    output folder when run from one; dataset = the tomogram's folder name). The table starts from
    ``vesicles.curated.csv`` if present (resume), else ``vesicles.csv``, else empty; both are looked
    for in ``results_dir`` first, then in the results folder ``path``.
    """
    path = Path(path)
    info: dict = {}
    if path.is_dir():
        folder = Path(results_dir) if results_dir else path
        if (path / "tomogram.json").is_file():
            info = read_json(path / "tomogram.json")
        source = tomogram or info.get("source")
        if not source:
            raise InputError(f"{path}: no tomogram.json here (the workflow has not exported this tomogram); "
                             "name the tomogram with --tomogram, or pass the tomogram file instead")
        source = Path(source)
        if not source.exists():
            raise InputError(f"{path}: the tomogram {source} (from tomogram.json) is not there (paths in it are "
                             "relative to where the workflow ran); name it with --tomogram")
        dataset, name = info.get("dataset") or path.resolve().parent.name, info.get("tomogram") or path.name
    elif path.exists():
        source = path
        dataset, name = path.resolve().parent.name, path.stem
        folder = Path(results_dir) if results_dir else Path.cwd() / dataset / name
        if (folder / "tomogram.json").is_file():
            info = read_json(folder / "tomogram.json")
    else:
        raise InputError(f"{path}: no such file or folder")
    if folder.resolve() == source.resolve().parent:
        raise InputError(f"{folder}: the results folder would be the tomogram's own folder; nothing is written "
                         "beside input tomograms: choose another --results-dir")
    override = voxel_size_angstrom if voxel_size_angstrom is not None else info.get("voxel_size_angstrom")
    voxel = read_tomogram_info(source, override).voxel_size_angstrom
    places = [folder] + ([path] if path.is_dir() and path.resolve() != folder.resolve() else [])
    curated = next((p / CURATED_NAME for p in places if curated_path(p)), None)
    automatic = next((p / "vesicles.csv" for p in places if (p / "vesicles.csv").is_file()), None)
    if curated:
        table, started = read_curated(curated), "curated"
    elif automatic:
        table, started = as_curated(pd.read_csv(automatic, keep_default_na=False, na_values=[""],
                                                dtype=dict.fromkeys(("dataset", "tomogram", "flags"), str))), \
            "automatic"
    else:
        table, started = empty_table(), "empty"
    table["dataset"], table["tomogram"] = dataset, name
    probability = next((p for p in (folder / "probability.mrc", folder / "probability.zarr") if p.exists()), None)
    return CurationInputs(tomogram=source, results_dir=folder, dataset=dataset, name=name,
                          voxel_size_angstrom=voxel, table=table, started_from=started, probability=probability)


# ------------------------------------------------------------------- the export stage's merge

def curated_spheres(spheres: pd.DataFrame, curated: pd.DataFrame, voxel_nm: float) -> pd.DataFrame:
    """The spherefit table (``spheres.csv``) with a curator's table applied, for the export stage.

    The curated table replaces the automatic list of accepted vesicles:

    - candidates spherefit rejected stay rejected (their ``outlier_reason`` is kept);
    - each curated ``auto`` or ``edited`` row takes the place of the accepted sphere it came from
      (the nearest accepted centre within half that sphere's radius, each sphere used once): the
      row's centre, radius and fit values, with that sphere's segmentation ``label``;
    - accepted spheres that no curated row came from get ``outlier_reason`` = ``removed_by_curator``;
    - ``added`` rows, and rows whose sphere is gone (e.g. spherefit re-ran after the curation),
      are appended with ``label`` 0: they have no segmentation instance, so export must leave them
      out of ``labels.mrc`` (they are in every other export).

    A ``source`` column is added (auto/added/edited; empty for rejected candidates). Rows keep
    spheres.csv's columns; ``voxel_nm`` converts radii to voxels for the matching.
    """
    spheres = spheres.copy().reset_index(drop=True)
    spheres["outlier_reason"] = spheres["outlier_reason"].fillna("").astype(str)
    spheres["source"] = ""
    curated = _typed(curated)
    accepted = np.flatnonzero(spheres["outlier_reason"].to_numpy() == "")
    centres = spheres.loc[accepted, ["z", "y", "x"]].to_numpy(dtype=np.float64)
    reach = spheres.loc[accepted, "radius_nm"].to_numpy(dtype=np.float64) / voxel_nm / 2
    pairs = []  # (distance in voxels, curated row, spheres row)
    for i, row in enumerate(curated.itertuples(index=False)):
        if row.source == SOURCE_ADDED or len(centres) == 0:
            continue
        distance = np.linalg.norm(centres - np.array([row.z, row.y, row.x]), axis=1)
        pairs += [(float(distance[k]), i, int(accepted[k])) for k in np.flatnonzero(distance <= reach)]
    matched_curated, matched_spheres = {}, set()
    for _, i, j in sorted(pairs):
        if i not in matched_curated and j not in matched_spheres:
            matched_curated[i] = j
            matched_spheres.add(j)
    fit_columns = ["z", "y", "x", "radius_nm", "membrane_radius_nm", "membrane_thickness_nm",
                   "membrane_contrast", "fit_score"]
    for i, j in matched_curated.items():
        for column in fit_columns:
            spheres.at[j, column] = curated.at[i, column]
        spheres.at[j, "source"] = curated.at[i, "source"]
    removed = [int(j) for j in accepted if j not in matched_spheres]
    spheres.loc[removed, "outlier_reason"] = REMOVED_REASON
    unmatched = [i for i in range(len(curated)) if i not in matched_curated]
    stray = [i for i in unmatched if curated.at[i, "source"] != SOURCE_ADDED]
    if stray:
        log.warning("%d curated vesicle(s) match no automatic sphere (did spherefit re-run after curation?); "
                    "exported without a segmentation label", len(stray))
    extra = curated.loc[unmatched, fit_columns + ["source"]].copy()
    extra["label"] = 0
    extra["outlier_reason"] = ""
    merged = pd.concat([spheres, extra], ignore_index=True) if len(extra) else spheres
    merged["label"] = merged["label"].astype(np.int64)
    return merged
