"""Reading tomograms and writing every output atomically.

A killed cluster job must never leave a half-written file behind that Snakemake (or a user) could
mistake for a result, so every writer here goes through :func:`atomic_output`: write under a
temporary name in the same folder, then rename.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path

import numpy as np

#: Voxel sizes outside this range (Å) are almost surely a broken or unset header.
PLAUSIBLE_VOXEL_SIZE_ANGSTROM = (3.0, 100.0)


class InputError(ValueError):
    """A user's input file or setting is unusable; the message names the file and the problem."""


@dataclass(frozen=True)
class TomogramInfo:
    """What the workflow needs to know about an input tomogram, without reading its voxels."""

    path: Path
    shape: tuple[int, int, int]
    voxel_size_angstrom: float
    origin_angstrom: tuple[float, float, float]

    @property
    def voxel_size_nm(self) -> float:
        return self.voxel_size_angstrom / 10.0


@contextlib.contextmanager
def atomic_output(path: str | os.PathLike):
    """Yield a temporary sibling path; on success rename it to ``path`` (file or folder)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}{''.join(path.suffixes)}")
    try:
        yield tmp
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        os.replace(tmp, path)
    finally:
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        elif tmp.exists():
            tmp.unlink()


def _open_mrc(path: Path):
    import mrcfile

    if not path.is_file():
        raise InputError(f"{path}: no such file")
    try:
        return mrcfile.mmap(path, mode="r", permissive=False)
    except Exception as err:  # mrcfile raises ValueError, OSError, EOFError... for broken files
        raise InputError(f"{path}: not a readable MRC file ({err})") from err


def validated_voxel_size_angstrom(path: Path, header_value: float, override: float | None) -> float:
    """Return the voxel size to use, refusing unset or implausible header values."""
    if override is not None:
        value, source = float(override), "config override"
    else:
        value, source = float(header_value), "MRC header"
    low, high = PLAUSIBLE_VOXEL_SIZE_ANGSTROM
    if override is None and value == 1.0:
        raise InputError(
            f"{path}: voxel size in the MRC header is 1.0 Å, which usually means it was never set; "
            "set it with the dataset's voxel_size_angstrom in the config"
        )
    if not np.isfinite(value) or not low <= value <= high:
        raise InputError(
            f"{path}: voxel size {value:g} Å from the {source} is outside the plausible range "
            f"{low:g}-{high:g} Å; fix the header or set voxel_size_angstrom in the config"
        )
    return value


def read_tomogram_info(path: str | os.PathLike, voxel_size_override: float | None = None) -> TomogramInfo:
    """Read and validate an MRC header: a 3D real-valued volume with a plausible voxel size."""
    path = Path(path)
    with _open_mrc(path) as mrc:
        if mrc.data is None or mrc.data.ndim != 3:
            ndim = 0 if mrc.data is None else mrc.data.ndim
            raise InputError(f"{path}: a tomogram must be a 3D volume, this MRC has {ndim} dimensions")
        if mrc.data.dtype.kind not in "iuf":
            raise InputError(f"{path}: unsupported MRC data type {mrc.data.dtype} (mode {int(mrc.header.mode)})")
        shape = tuple(int(s) for s in mrc.data.shape)
        if min(shape) < 2:
            raise InputError(f"{path}: a tomogram must have at least 2 voxels on each axis, shape is {shape}")
        vs = mrc.voxel_size
        sizes = {float(vs.x), float(vs.y), float(vs.z)}
        header_value = float(vs.x)
        anisotropic = not np.allclose(list(sizes), header_value, rtol=1e-3)
        if voxel_size_override is None and anisotropic:
            raise InputError(f"{path}: anisotropic voxel size {vs} is not supported")
        voxel = validated_voxel_size_angstrom(path, header_value, voxel_size_override)
        origin = (float(mrc.header.origin.z), float(mrc.header.origin.y), float(mrc.header.origin.x))
    return TomogramInfo(path=path, shape=shape, voxel_size_angstrom=voxel, origin_angstrom=origin)


def read_tomogram(path: str | os.PathLike) -> np.ndarray:
    """Memory-map the tomogram's voxels, (z, y, x). The file is opened read-only."""
    import mrcfile

    return mrcfile.mmap(Path(path), mode="r").data


def write_mrc(
    path: str | os.PathLike,
    data: np.ndarray,
    voxel_size_angstrom: float,
    origin_angstrom: tuple[float, float, float] = (0.0, 0.0, 0.0),
) -> None:
    """Write a volume as MRC atomically, with voxel size and origin (z, y, x) in Å."""
    import mrcfile

    with atomic_output(path) as tmp, mrcfile.new(tmp, overwrite=True) as mrc:
        mrc.set_data(np.ascontiguousarray(data))
        mrc.voxel_size = voxel_size_angstrom
        mrc.header.origin.z, mrc.header.origin.y, mrc.header.origin.x = origin_angstrom


def write_table(path: str | os.PathLike, table) -> None:
    """Write a pandas DataFrame as CSV (or Parquet by suffix) atomically."""
    with atomic_output(path) as tmp:
        if Path(path).suffix == ".parquet":
            table.to_parquet(tmp, index=False)
        else:
            table.to_csv(tmp, index=False, float_format="%.4f")


def write_json(path: str | os.PathLike, payload: dict) -> None:
    import json

    with atomic_output(path) as tmp:
        Path(tmp).write_text(json.dumps(payload, indent=2, sort_keys=True) + "\n")


def read_json(path: str | os.PathLike) -> dict:
    import json

    return json.loads(Path(path).read_text())
