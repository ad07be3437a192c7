"""Training: the varied training set, BatchNorm recalibration, and a real (tiny) training run via the CLI."""

from __future__ import annotations

import json
import subprocess

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import VENV_BIN, cli_env

from vesicleflow.model import Architecture, UNet3d, load_model
from vesicleflow.simulate import TRAINING_REGIMES, simulate_training_set
from vesicleflow.train import Example, augment, recalibrate_batchnorm

SMALL = (32, 64, 64)


@pytest.fixture(scope="module")
def training_set(tmp_path_factory):
    return simulate_training_set(tmp_path_factory.mktemp("train") / "set", 10, shape=SMALL, seed=3)


def test_training_set_mixes_the_regimes_with_their_own_parameters(training_set):
    regimes = {p.name for p in (training_set / "tomograms").iterdir()}
    assert regimes <= set(TRAINING_REGIMES) and len(regimes) >= 2
    for params_file in (training_set / "truth").glob("*/*_params.json"):
        params = json.loads(params_file.read_text())
        assert params["training_regime"] == params_file.parent.name
        assert 1.0 <= params["voxel_size_nm"] <= 2.8
        assert params["seed"] < 1_000_000 * 10_000  # never one of the accuracy suite's seeds (9,000,000+)
        truth = pd.read_csv(params_file.with_name(params_file.name.replace("_params.json", "_vesicles.csv")))
        if params["training_regime"] == "empty":
            assert truth.empty
        if params["training_regime"] == "low_snr":
            assert params["snr"] <= 0.06
        if params["training_regime"] == "crowded":
            assert params["vesicle_density"] >= 6000 and params["clustered_fraction"] == 1.0


def test_recalibration_makes_running_statistics_describe_the_data():
    torch.manual_seed(0)
    net = UNet3d(Architecture(encoder=[[4], [8]], bottom=[8], decoder=[[8], [4]]))
    rng = np.random.default_rng(0)
    image = (3.0 + 2.0 * rng.standard_normal((16, 16, 16))).astype(np.float32)  # far from BN's (0, 1) default
    example = Example("x", image, np.zeros(image.shape, bool))
    first = next(m for m in net.modules() if isinstance(m, torch.nn.BatchNorm3d))
    momentum = first.momentum
    recalibrate_batchnorm(net, [example], "cpu", rng, batches=4, batch_size=2, patch=16)
    assert first.momentum == momentum  # restored
    net.eval()
    with torch.no_grad():
        conv_out = net.encoder[0][0](torch.from_numpy(image)[None, None])
    assert np.allclose(first.running_mean.numpy(), conv_out.mean(dim=(0, 2, 3, 4)).numpy(), atol=0.05)
    assert np.allclose(first.running_var.numpy(), conv_out.var(dim=(0, 2, 3, 4)).numpy(), rtol=0.1)


def test_train_cli_writes_a_loadable_model_a_log_and_a_plot(training_set, tmp_path):
    out = tmp_path / "model"
    command = [str(VENV_BIN / "vesicleflow"), "train", str(training_set), "-o", str(out), "--epochs", "2",
               "--steps-per-epoch", "2", "--batch-size", "1", "--patch", "16", "--device", "cpu"]
    result = subprocess.run(command, env=cli_env(), capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    log = pd.read_csv(out / "training_log.csv")
    assert list(log["epoch"]) == [1, 2]
    assert {"train_loss", "val_dice", "val_precision", "val_recall", "val_f1"} <= set(log.columns)
    assert log["train_loss"].gt(0).all() and log["val_dice"].between(0, 1).all()
    assert (out / "training_curve.png").stat().st_size > 1000
    net, info = load_model(out)
    assert info.training["tomograms"] == 10 and info.voxel_size_angstrom == 20.0
    with torch.no_grad():
        prob = torch.sigmoid(net(torch.zeros(1, 1, 16, 16, 16)))
    assert torch.isfinite(prob).all()


def test_augmentation_keeps_dtype_and_labels_and_varies_contrast():
    rng = np.random.default_rng(0)
    image = rng.normal(size=(16, 24, 24)).astype(np.float32)
    target = np.zeros(image.shape, bool)
    target[4:9, 5:12, 6:10] = True
    spreads = []
    for _ in range(40):
        augmented, labels = augment(image, target, rng)
        assert augmented.dtype == np.float32 and labels.dtype == bool and labels.sum() == target.sum()
        spreads.append(float(augmented.std()))
    assert max(spreads) / min(spreads) > 1.5  # not re-standardised per patch
