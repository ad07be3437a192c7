"""train: fit the U-Net to tomograms with instance-label MRCs (from ``vesicleflow simulate``).

Patches are drawn from tomograms normalized exactly as the workflow normalizes them, with
augmentations spanning what real data varies in: noise level, contrast and intensity scaling,
blur and band-pass (CTF-like) filtering, flips, and 90° rotations about z (which also turn the
missing wedge's tilt axis). One tomogram in five is held out for validation. The best model
(validation Dice) is kept; a CSV log and a plot record every epoch.
"""

from __future__ import annotations

import logging
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from scipy import ndimage

from vesicleflow.grid import nearest_source_indices
from vesicleflow.io import atomic_output, read_tomogram, write_table
from vesicleflow.model import (
    Architecture,
    ModelInfo,
    Preprocessing,
    UNet3d,
    load_model,
    pick_device,
    save_model,
)
from vesicleflow.normalize import normalize_to_grid, read_grid
from vesicleflow.volumes import read_full

log = logging.getLogger(__name__)

DEFAULT_ARCHITECTURE = Architecture(encoder=[[8, 8], [16, 16], [32, 32]], bottom=[48, 48],
                                    decoder=[[32, 32], [16, 16], [8, 8]])
DEFAULT_VOXEL_SIZE_ANGSTROM = 20.0
FOREGROUND_FRACTION = 0.7


@dataclass
class Example:
    name: str
    image: np.ndarray  # normalized, model grid
    target: np.ndarray  # bool, model grid


def find_training_pairs(data_dirs: list[Path]) -> list[tuple[Path, Path]]:
    """(tomogram, labels) pairs: <dir>/tomograms/<ds>/<t>.mrc with <dir>/truth/<ds>/<t>_labels.mrc."""
    pairs = []
    for root in map(Path, data_dirs):
        for labels in sorted(root.glob("truth/*/*_labels.mrc")):
            tomogram = root / "tomograms" / labels.parent.name / (labels.name.removesuffix("_labels.mrc") + ".mrc")
            if tomogram.is_file():
                pairs.append((tomogram, labels))
    if not pairs:
        raise ValueError(f"no tomogram/label pairs found under {', '.join(map(str, data_dirs))}")
    return pairs


def load_example(tomogram: Path, labels: Path, voxel_size_angstrom: float, prep: Preprocessing,
                 workdir: Path) -> Example:
    normalized = normalize_to_grid(tomogram, workdir / f"{tomogram.parent.name}_{tomogram.stem}.zarr",
                                   voxel_size_angstrom, prep)
    mapping = read_grid(normalized)
    source = read_tomogram(labels)
    iz, iy, ix = nearest_source_indices(mapping.model_shape, mapping.original_shape, mapping.model_to_original)
    target = np.stack([np.asarray(source[z])[np.ix_(iy, ix)] > 0 for z in iz])
    return Example(f"{tomogram.parent.name}/{tomogram.stem}", read_full(normalized), target)


def _random_patch(example: Example, patch: int, rng: np.random.Generator,
                  foreground_fraction: float = FOREGROUND_FRACTION) -> tuple[np.ndarray, np.ndarray]:
    shape = np.array(example.image.shape)
    padded_image, padded_target = example.image, example.target
    if (shape < patch).any():
        pad = [(0, max(0, patch - n)) for n in shape]
        padded_image = np.pad(example.image, pad, mode="reflect")
        padded_target = np.pad(example.target, pad, mode="constant")
        shape = np.array(padded_image.shape)
    if rng.random() < foreground_fraction and padded_target.any():
        points = np.argwhere(padded_target[::4, ::4, ::4]) * 4
        centre = points[rng.integers(len(points))]
        start = np.clip(centre - patch // 2 + rng.integers(-patch // 4, patch // 4 + 1, 3), 0, shape - patch)
    else:
        start = rng.integers(0, shape - patch + 1)
    box = tuple(slice(s, s + patch) for s in start)
    return padded_image[box].copy(), padded_target[box].copy()


def augment(image: np.ndarray, target: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Geometric (flips, 90° about z) and photometric (blur, band-pass, noise, contrast) changes."""
    for axis in range(3):
        if rng.random() < 0.5:
            image, target = np.flip(image, axis), np.flip(target, axis)
    turns = int(rng.integers(4))
    image, target = np.rot90(image, turns, axes=(1, 2)), np.rot90(target, turns, axes=(1, 2))
    image = np.ascontiguousarray(image, dtype=np.float32)
    if rng.random() < 0.3:
        image = ndimage.gaussian_filter(image, rng.uniform(0.3, 1.2))
    if rng.random() < 0.3:  # a crude CTF-like band-pass: remove the lowest frequencies
        image = image - ndimage.gaussian_filter(image, rng.uniform(3.0, 8.0))
    if rng.random() < 0.5:
        image = image + rng.normal(0, rng.uniform(0.1, 0.8), image.shape).astype(np.float32)
    # No per-patch re-standardisation: inference sees the whole tomogram's robust z-score, under which
    # a patch's spread varies (a membrane-rich or high-SNR patch has a larger one); training must too.
    image = image * float(rng.uniform(0.7, 1.4)) + float(rng.uniform(-0.3, 0.3))
    return image, np.ascontiguousarray(target)


def dice_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    prob = torch.sigmoid(logits)
    intersection = (prob * target).sum()
    return 1 - (2 * intersection + 1) / (prob.sum() + target.sum() + 1)


def recalibrate_batchnorm(net: torch.nn.Module, examples: list[Example], device, rng: np.random.Generator,
                          batches: int = 16, batch_size: int = 4, patch: int = 64) -> None:
    """Re-estimate BatchNorm's running statistics from whole-tomogram-like input.

    Training batches are small, augmented and drawn mostly around vesicles, so the running averages
    BatchNorm keeps during training describe those batches, not a normalized tomogram; inference
    with them missed clearly visible vesicles. Averaging over uniformly drawn, unaugmented patches
    (as inference sees them) fixes the statistics without changing any learned weight.
    """
    norms = [m for m in net.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    momenta = [m.momentum for m in norms]
    for norm in norms:
        norm.reset_running_stats()
        norm.momentum = None  # cumulative average over all batches below
    net.train()
    with torch.no_grad():
        for _ in range(batches):
            images = [_random_patch(examples[rng.integers(len(examples))], patch, rng, foreground_fraction=0.0)[0]
                      for _ in range(batch_size)]
            net(torch.from_numpy(np.stack(images)[:, None]).to(device))
    for norm, momentum in zip(norms, momenta):
        norm.momentum = momentum


def _validation_scores(net, examples: list[Example], device, patch: int) -> dict:
    """Soft Dice, and voxel precision / recall / F1 at 0.5, on fixed validation patches."""
    rng = np.random.default_rng(1234)
    tp = fp = fn = 0.0
    soft_num = soft_den = 0.0
    net.eval()
    with torch.inference_mode():
        for example in examples:
            for _ in range(6):
                image, target = _random_patch(example, patch, rng)
                prob = torch.sigmoid(net(torch.from_numpy(image)[None, None].to(device)))[0, 0].cpu().numpy()
                predicted = prob > 0.5
                tp += float((predicted & target).sum())
                fp += float((predicted & ~target).sum())
                fn += float((~predicted & target).sum())
                soft_num += 2 * float((prob * target).sum())
                soft_den += float(prob.sum() + target.sum())
    net.train()
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"val_dice": soft_num / soft_den if soft_den else 0.0, "val_precision": precision,
            "val_recall": recall, "val_f1": f1}


def plot_training_log(history: pd.DataFrame, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4), dpi=110)
    ax.plot(history["epoch"], history["train_loss"], label="training loss")
    ax.plot(history["epoch"], history["val_dice"], label="validation Dice")
    ax.plot(history["epoch"], history["val_f1"], label="validation voxel F1")
    ax.set_xlabel("epoch")
    ax.legend(frameon=False)
    fig.tight_layout()
    with atomic_output(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)


def train_model(data_dirs: list[Path], output: Path, init: str | Path | None = None, epochs: int = 20,
                steps_per_epoch: int = 50, batch_size: int = 2, patch: int = 48,
                learning_rate: float = 2e-3, seed: int = 0, device: str = "auto") -> Path:
    """Train from scratch (default architecture, 20 Å voxels) or fine-tune ``init``; returns the folder."""
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    dev = pick_device(device)
    if init:
        net, info = load_model(init, dev)
    else:
        info = ModelInfo(architecture=DEFAULT_ARCHITECTURE, voxel_size_angstrom=DEFAULT_VOXEL_SIZE_ANGSTROM,
                         preprocessing=Preprocessing(), window=64)
        net = UNet3d(info.architecture).to(dev)
    if patch % info.architecture.divisor:
        raise ValueError(f"patch {patch} must be a multiple of {info.architecture.divisor}")
    pairs = find_training_pairs(data_dirs)
    with tempfile.TemporaryDirectory(prefix="vesicleflow-train-") as workdir:
        examples = [load_example(t, lab, info.voxel_size_angstrom, info.preprocessing, Path(workdir))
                    for t, lab in pairs]
    order = rng.permutation(len(examples))
    n_val = max(1, len(examples) // 5) if len(examples) > 1 else 0
    validation = [examples[i] for i in order[:n_val]] or examples
    training = [examples[i] for i in order[n_val:]] or examples
    log.info("training on %d tomograms, validating on %d, device %s", len(training), len(validation), dev)
    optimizer = torch.optim.AdamW(net.parameters(), lr=learning_rate, weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=learning_rate,
                                                   total_steps=epochs * steps_per_epoch)
    bce = torch.nn.BCEWithLogitsLoss()
    history, best = [], -1.0
    began = time.perf_counter()
    net.train()
    for epoch in range(1, epochs + 1):
        losses = []
        for _ in range(steps_per_epoch):
            batch = [augment(*_random_patch(training[rng.integers(len(training))], patch, rng), rng)
                     for _ in range(batch_size)]
            images = torch.from_numpy(np.stack([b[0] for b in batch])[:, None]).to(dev)
            targets = torch.from_numpy(np.stack([b[1] for b in batch])[:, None].astype(np.float32)).to(dev)
            logits = net(images)
            loss = bce(logits, targets) + dice_loss(logits, targets)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
            losses.append(float(loss.detach()))
        recalibrate_batchnorm(net, training, dev, rng)
        scores = _validation_scores(net, validation, dev, patch)
        history.append({"epoch": epoch, "train_loss": float(np.mean(losses)), **scores,
                        "seconds": time.perf_counter() - began})
        log.info("epoch %d/%d: loss %.4f, val Dice %.3f, val F1 %.3f", epoch, epochs,
                 history[-1]["train_loss"], scores["val_dice"], scores["val_f1"])
        table = pd.DataFrame(history)
        write_table(Path(output) / "training_log.csv", table)
        plot_training_log(table, Path(output) / "training_curve.png")
        if scores["val_dice"] > best:
            best = scores["val_dice"]
            info.training = {"epochs": epoch, "steps_per_epoch": steps_per_epoch, "batch_size": batch_size,
                             "patch": patch, "learning_rate": learning_rate, "seed": seed,
                             "tomograms": len(examples), "validation_dice": round(best, 4),
                             "init": str(init) if init else None}
            save_model(net, info, output)
    return Path(output)
