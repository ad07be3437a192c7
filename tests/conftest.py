"""Shared fixtures: small synthetic volumes written as real MRC files."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from vesicleflow.io import write_mrc

REPO = Path(__file__).resolve().parents[1]


def shell_volume(shape, centre, membrane_radius, thickness, noise=0.0, seed=0) -> np.ndarray:
    """A bright background with one dark spherical shell (membrane) of the given mid radius (voxels)."""
    grid = np.indices(shape, dtype=np.float64)
    distance = np.sqrt(sum((g - c) ** 2 for g, c in zip(grid, centre)))
    volume = 1.0 - np.exp(-0.5 * ((distance - membrane_radius) / (thickness / 2.355)) ** 2)
    rng = np.random.default_rng(seed)
    return (volume + noise * rng.standard_normal(shape)).astype(np.float32)


@pytest.fixture
def mrc_factory(tmp_path):
    def make(name, data, voxel_size_angstrom=15.0):
        path = tmp_path / name
        path.parent.mkdir(parents=True, exist_ok=True)
        write_mrc(path, data, voxel_size_angstrom)
        return path

    return make
