"""Importing CryoVesNet's published Keras network (issue 9).

The reference data (CryoVesNet's ``weights.h5`` and what TensorFlow computed with it) lives outside
the repository; the tests that need it skip when it is absent. Edited copies go to tmp_path only.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from vesicleflow.cryovesnet import import_cryovesnet
from vesicleflow.model import ModelError, load_model, load_model_info

REFERENCE = Path("/work/shared/peers/cryovesnet")
WEIGHTS = REFERENCE / "weights.h5"
WEIGHTS_SHA256 = "495748b7ad5daaa0f8895b49497798a9331a70ce84b3a227c7e387a930f15f37"

needs_reference = pytest.mark.skipif(
    not WEIGHTS.is_file(), reason=f"CryoVesNet reference data not found at {REFERENCE}"
)


@pytest.fixture(scope="module")
def imported(tmp_path_factory) -> Path:
    if not WEIGHTS.is_file():
        pytest.skip(f"CryoVesNet reference data not found at {REFERENCE}")
    return import_cryovesnet(WEIGHTS, tmp_path_factory.mktemp("cryovesnet") / "model")


def _predict(model_dir: Path, name: str) -> np.ndarray:
    net, _ = load_model(model_dir)
    volume = np.load(REFERENCE / name)
    with torch.no_grad():
        logits = net(torch.from_numpy(volume)[None, None])
    return torch.sigmoid(logits)[0, 0].numpy()


@needs_reference
@pytest.mark.parametrize("size", [32, 64])
def test_matches_tensorflow(imported: Path, size: int):
    # max |diff| seen: 2.3e-6 (32^3) and 1.5e-6 (64^3) in float32
    got = _predict(imported, f"input{size}.npy")
    want = np.load(REFERENCE / f"output{size}.npy")
    assert got.shape == want.shape
    assert np.abs(got.astype(np.float64) - want).max() < 1e-4


@needs_reference
def test_metadata(imported: Path):
    info = load_model_info(imported)
    assert info.voxel_size_angstrom == 22.0
    assert info.preprocessing.gaussian_sigma_voxels == 1.0
    assert info.preprocessing.zscore == "mean_std"
    assert info.window == 64 and info.window % info.architecture.divisor == 0
    arch = info.architecture
    assert (arch.encoder, arch.bottom, arch.decoder) == ([[16, 16], [32, 32]], [64, 32], [[32, 16], [16, 16]])
    assert arch.batchnorm_eps == pytest.approx(1e-3)
    assert arch.upsample == "nearest"
    assert WEIGHTS_SHA256 in info.trained_on and "CryoVesNet published weights" in info.trained_on
    assert info.training["published_weights"] is True
    raw = json.loads((imported / "model.json").read_text())
    assert raw["voxel_size_angstrom"] == 22.0
    assert raw["preprocessing"] == {"gaussian_sigma_voxels": 1.0, "zscore": "mean_std", "max_spread": None}


def _edited_copy(tmp_path: Path) -> Path:
    copy = tmp_path / "edited.h5"
    shutil.copyfile(WEIGHTS, copy)
    copy.chmod(0o644)
    return copy


def _replace(group: h5py.Group, name: str, data: np.ndarray) -> None:
    del group[name]
    group.create_dataset(name, data=data)


def _edit_config(h5: h5py.File, edit) -> None:
    config = json.loads(h5.attrs["model_config"])
    layers = {layer["name"]: layer for layer in config["config"]["layers"]}
    edit(layers)
    config["config"]["layers"] = list(layers.values())
    h5.attrs["model_config"] = json.dumps(config)


@needs_reference
def test_skip_first_concatenation_gives_same_network(tmp_path: Path):
    """Keras [skip, upsampled] with the kernel's input channels swapped is the same network."""
    copy = _edited_copy(tmp_path)
    with h5py.File(copy, "r+") as h5:
        _edit_config(h5, lambda layers: layers["concatenate"]["inbound_nodes"][0].reverse())
        group = h5["model_weights/up_level_1_no_0/up_level_1_no_0"]
        kernel = group["kernel:0"][()]  # (3, 3, 3, 32 up + 32 skip, 32)
        _replace(group, "kernel:0", np.concatenate([kernel[..., 32:, :], kernel[..., :32, :]], axis=3))
    model = import_cryovesnet(copy, tmp_path / "model")
    assert "not the published" in load_model_info(model).trained_on
    got = _predict(model, "input32.npy")
    assert np.abs(got - np.load(REFERENCE / "output32.npy")).max() < 1e-4


def _wrong_kernel(h5: h5py.File) -> None:
    _replace(h5["model_weights/middle_0/middle_0"], "kernel:0", np.zeros((3, 3, 3, 16, 64), np.float32))


def _missing_weight(h5: h5py.File) -> None:
    del h5["model_weights/batch_normalization_4/batch_normalization_4/moving_variance:0"]


def _tanh_activation(h5: h5py.File) -> None:
    _edit_config(h5, lambda layers: layers["activation_3"]["config"].update(activation="tanh"))


def _no_batchnorm(h5: h5py.File) -> None:
    def edit(layers):
        layers["activation_2"]["inbound_nodes"] = [[["down_level_1_no_0", 0, 0, {}]]]
        del layers["batch_normalization_2"]

    _edit_config(h5, edit)


def _trilinear_size(h5: h5py.File) -> None:
    _edit_config(h5, lambda layers: layers["up_sampling3d"]["config"].update(size=[2, 2, 1]))


@needs_reference
@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (_wrong_kernel, "'middle_0' kernel has shape (3, 3, 3, 16, 64)"),
        (_missing_weight, "batch_normalization_4"),
        (_tanh_activation, "not a ReLU"),
        (_no_batchnorm, "not BatchNormalization"),
        (_trilinear_size, "upsamples by [2, 2, 1]"),
    ],
)
def test_refuses_mismatched_file(tmp_path: Path, edit, message: str):
    copy = _edited_copy(tmp_path)
    with h5py.File(copy, "r+") as h5:
        edit(h5)
    with pytest.raises(ModelError) as err:
        import_cryovesnet(copy, tmp_path / "model")
    assert str(copy) in str(err.value) and message in str(err.value)
    assert not (tmp_path / "model").exists()


def test_refuses_garbage(tmp_path: Path):
    not_hdf5 = tmp_path / "weights.h5"
    not_hdf5.write_bytes(b"certainly not HDF5")
    with pytest.raises(ModelError, match="not a readable HDF5"):
        import_cryovesnet(not_hdf5, tmp_path / "a")

    weights_only = tmp_path / "weights_only.h5"
    with h5py.File(weights_only, "w") as h5:
        h5.create_dataset("conv3d/kernel:0", data=np.zeros((1, 1, 1, 16, 1), np.float32))
    with pytest.raises(ModelError, match="no 'model_config'"):
        import_cryovesnet(weights_only, tmp_path / "b")

    sequential = tmp_path / "sequential.h5"
    with h5py.File(sequential, "w") as h5:
        h5.attrs["model_config"] = json.dumps({"class_name": "Sequential", "config": {}})
    with pytest.raises(ModelError, match="'Sequential' is not a Keras functional model"):
        import_cryovesnet(sequential, tmp_path / "c")

    malformed = tmp_path / "malformed.h5"
    with h5py.File(malformed, "w") as h5:
        h5.attrs["model_config"] = json.dumps({
            "class_name": "Functional",
            "config": {"layers": [1, 2], "input_layers": [["a", 0, 0]], "output_layers": [["b", 0, 0]]},
        })
    with pytest.raises(ModelError, match="malformed layer configuration"):
        import_cryovesnet(malformed, tmp_path / "e")

    with pytest.raises(ModelError, match="no such file"):
        import_cryovesnet(tmp_path / "absent.h5", tmp_path / "d")
    assert not any((tmp_path / d).exists() for d in "abcde")
