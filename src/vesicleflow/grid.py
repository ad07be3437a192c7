"""The mapping between a tomogram's original grid and the model's grid.

Both grids share their physical extent: voxel i's centre sits at (i + 0.5) * voxel_size from the
volume's edge. Every stage that crosses grids goes through :class:`GridMapping`, so coordinates
in vesicles.csv always refer to the ORIGINAL grid whatever the model's voxel size.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np


@dataclass(frozen=True)
class GridMapping:
    original_shape: tuple[int, int, int]
    original_voxel_size_angstrom: float
    model_voxel_size_angstrom: float
    origin_angstrom: tuple[float, float, float] = (0.0, 0.0, 0.0)

    @property
    def zoom(self) -> float:
        """Model-grid voxels per original voxel."""
        return self.original_voxel_size_angstrom / self.model_voxel_size_angstrom

    @property
    def model_shape(self) -> tuple[int, int, int]:
        return tuple(max(1, round(n * self.zoom)) for n in self.original_shape)

    def model_to_original(self, index: np.ndarray) -> np.ndarray:
        """Continuous model-grid index -> continuous original-grid index (any shape)."""
        return (np.asarray(index, dtype=np.float64) + 0.5) / self.zoom - 0.5

    def original_to_model(self, index: np.ndarray) -> np.ndarray:
        return (np.asarray(index, dtype=np.float64) + 0.5) * self.zoom - 0.5

    def to_attrs(self) -> dict:
        return {key: list(value) if isinstance(value, tuple) else value for key, value in asdict(self).items()}

    @classmethod
    def from_attrs(cls, attrs: dict) -> GridMapping:
        return cls(
            original_shape=tuple(int(v) for v in attrs["original_shape"]),
            original_voxel_size_angstrom=float(attrs["original_voxel_size_angstrom"]),
            model_voxel_size_angstrom=float(attrs["model_voxel_size_angstrom"]),
            origin_angstrom=tuple(float(v) for v in attrs["origin_angstrom"]),
        )


def nearest_source_indices(target_shape, source_shape, target_to_source) -> list[np.ndarray]:
    """Per axis, the nearest source index of every target voxel centre (for label/mask resampling)."""
    indices = []
    for n_target, n_source in zip(target_shape, source_shape):
        source = np.rint(target_to_source(np.arange(n_target))).astype(np.int64)
        indices.append(np.clip(source, 0, n_source - 1))
    return indices
