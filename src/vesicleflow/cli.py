"""The ``vesicleflow`` command line: one command per workflow stage, plus simulate/train/evaluate.

Heavy modules (torch, scikit-image, zarr) are imported inside the commands, so ``--help`` and the
light stages start fast. Errors in the user's input print one line naming the file and exit 2.
"""

from __future__ import annotations

import functools
import logging
import sys
from enum import StrEnum
from pathlib import Path
from typing import Annotated

import typer

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Find synaptic vesicles in cryo-electron tomograms.")

Model = Annotated[str | None, typer.Option(help="Model folder; default: the bundled model.")]
VoxelSize = Annotated[float | None, typer.Option("--voxel-size-angstrom",
                                                    help="Override the MRC header's voxel size (Å).")]


class PrecisionChoice(StrEnum):
    """vesicleflow.infer.PRECISIONS, spelled out here so that the CLI starts without importing torch."""

    auto = "auto"
    float32 = "float32"
    bfloat16 = "bfloat16"
    float16 = "float16"


Precision = Annotated[PrecisionChoice, typer.Option(
    help="What the network computes in: auto = float16 on CUDA, float32 on the CPU; bfloat16 is 2-3x "
         "faster on CPUs with AMX or AVX512-BF16 (results to bfloat16 rounding); float16: CUDA only.")]


@app.callback()
def main(log_level: Annotated[str, typer.Option(help="DEBUG, INFO, WARNING")] = "INFO") -> None:
    from vesicleflow.allocator import small_pages_for_numpy

    small_pages_for_numpy()  # before any command imports numpy
    logging.basicConfig(level=log_level.upper(), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")


def user_errors(command):
    """Turn the library's input/model errors into a one-line message and exit status 2."""

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        from vesicleflow.io import InputError
        from vesicleflow.modelinfo import ModelError

        try:
            return command(*args, **kwargs)
        except (InputError, ModelError) as err:
            typer.echo(f"vesicleflow {command.__name__}: error: {err}", err=True)
            raise typer.Exit(2) from None

    return wrapper


@app.command()
@user_errors
def normalize(tomogram: Path, output: Path, model: Model = None, voxel_size_angstrom: VoxelSize = None,
              threads: Annotated[int, typer.Option(help="Threads reading, resampling and writing.")] = 2) -> None:
    """Rescale to the model's voxel size and z-score (writes a zarr)."""
    from vesicleflow.normalize import normalize_tomogram

    normalize_tomogram(tomogram, output, model, voxel_size_angstrom, threads)


@app.command()
@user_errors
def tile(normalized: Path, output: Path, model: Model = None,
         window: Annotated[int | None, typer.Option(help="Window side (model voxels).")] = None,
         overlap: float = 0.25, shards: int = 1) -> None:
    """Plan the sliding windows and split them into shards (writes JSON)."""
    from vesicleflow.tiling import tile_tomogram

    tile_tomogram(normalized, output, model, window, overlap, shards)


@app.command()
@user_errors
def infer(normalized: Path, plan: Path, output: Path, shard: int = 0, model: Model = None,
          batch_size: Annotated[int | None, typer.Option(
              help="Windows per forward pass; default: 4 on the CPU, 16 on CUDA.")] = None,
          tta: bool = False, device: str = "auto",
          threads: Annotated[int | None, typer.Option(help="CPU threads for torch.")] = None,
          precision: Precision = PrecisionChoice.auto) -> None:
    """Run the U-Net over one shard's windows."""
    from vesicleflow.allocator import keep_freed_memory
    from vesicleflow.infer import infer_shard

    keep_freed_memory()
    infer_shard(normalized, plan, shard, output, model, batch_size, tta, device, threads, precision.value)


@app.command()
@user_errors
def stitch(output: Path, normalized: Annotated[Path, typer.Option(help="The normalized zarr.")],
           shards: list[Path],
           threads: Annotated[int, typer.Option(help="Threads combining blocks.")] = 2) -> None:
    """Combine shard predictions into the probability map."""
    from vesicleflow.stitch import stitch_shards

    stitch_shards(shards, normalized, output, threads)


@app.command()
@user_errors
def postprocess(probability: Path, output: Path, threshold: float = 0.5,
                mask: Annotated[Path | None, typer.Option(help="Cytoplasm mask MRC.")] = None,
                min_radius_nm: float = 8.0, max_radius_nm: float = 60.0,
                min_separation_nm: float | None = None,
                workers: Annotated[int, typer.Option(help="Processes segmenting blocks in parallel.")] = 1) -> None:
    """Threshold, mask and separate touching vesicles into instance labels."""
    from vesicleflow.postprocess import postprocess_probability

    postprocess_probability(probability, output, threshold, mask, min_radius_nm, max_radius_nm, min_separation_nm,
                            workers=max(1, workers))


@app.command()
@user_errors
def spherefit(labels: Path, tomogram: Path, output: Path, voxel_size_angstrom: VoxelSize = None,
              min_radius_nm: float = 8.0, max_radius_nm: float = 60.0, min_contrast: float = 0.6,
              min_fit_score: float = 0.5, overlap_tolerance_nm: float = 2.0,
              bilayer_thickness_nm: Annotated[float, typer.Option(
                  help="Outer radius = membrane mid radius + half this; 0 = use the measured thickness.")] = 4.5,
              trusted_contrast: Annotated[float, typer.Option(
                  help="Membrane darkness at which a fit is kept even where it left the segmentation's guess.")] = 1.5,
              workers: Annotated[int, typer.Option(help="Processes fitting candidates in parallel.")] = 1,
              ) -> None:
    """Fit a sphere to every candidate on the original tomogram; flag outliers."""
    from vesicleflow.spherefit import fit_spheres

    fit_spheres(labels, tomogram, output, voxel_size_angstrom, min_radius_nm, max_radius_nm,
                min_contrast, min_fit_score, overlap_tolerance_nm, bilayer_thickness_nm, trusted_contrast,
                max(1, workers))


@app.command()
@user_errors
def export(spheres: Path, labels: Path, tomogram: Path, out_dir: Path,
           dataset: Annotated[str, typer.Option()], name: Annotated[str, typer.Option()],
           voxel_size_angstrom: VoxelSize = None,
           mask: Annotated[Path | None, typer.Option(help="Cytoplasm mask MRC.")] = None,
           probability: Annotated[Path | None, typer.Option(
               help="probability.zarr: also write it as probability.mrc on the original grid.")] = None,
           curated: Annotated[Path | None, typer.Option(
               help="vesicles.curated.csv: export its vesicles instead of spherefit's.")] = None,
           threads: Annotated[int, typer.Option(help="Threads writing the MRC volumes.")] = 2) -> None:
    """Write vesicles.csv, label/sphere MRCs, IMOD model, RELION STARs and a preview on the original grid."""
    from vesicleflow.export import export_tomogram

    export_tomogram(spheres, labels, tomogram, out_dir, dataset, name, voxel_size_angstrom, mask, probability,
                    curated, threads)


@app.command()
@user_errors
def aggregate(out_dir: Path, tomogram_dirs: list[Path]) -> None:
    """Summarise all tomograms: tables and plots."""
    from vesicleflow.aggregate import aggregate_results

    aggregate_results(tomogram_dirs, out_dir)


def _echo_tree(out_dir: Path) -> None:
    """Where a simulated tree's tomograms and ground truth went."""
    typer.echo(f"tomograms: {out_dir / 'tomograms'}\nground truth: {out_dir / 'truth'}")


@app.command()
def simulate(out_dir: Path, datasets: int = 2, tomograms: int = 2,
             shape: Annotated[tuple[int, int, int], typer.Option(help="Z Y X voxels.")] = (64, 256, 256),
             seed: int = 0,
             voxel_size_nm: Annotated[list[float] | None, typer.Option(
                 help="Voxel size per dataset (repeat); default: random 1.0-2.8 nm.")] = None) -> None:
    """Write synthetic tomograms (OUT/tomograms) and their ground truth (OUT/truth)."""
    from vesicleflow.simulate import simulate_tree

    simulate_tree(out_dir, n_datasets=datasets, n_tomograms=tomograms, shape=shape, seed=seed,
                  voxel_sizes_nm=voxel_size_nm)
    _echo_tree(out_dir)


@app.command("training-set")
def training_set(out_dir: Path, tomograms: int = 48, seed: int = 0,
                 shape: Annotated[tuple[int, int, int], typer.Option(help="Z Y X voxels.")] = (96, 192, 192)) -> None:
    """Write a varied simulated training set (standard, crowded, low-SNR and vesicle-free tomograms)."""
    from vesicleflow.simulate import simulate_training_set

    simulate_training_set(out_dir, tomograms, shape, seed)
    _echo_tree(out_dir)


@app.command("accuracy-suite")
def accuracy_suite(out_dir: Path, tomograms_per_case: int = 5,
                   shape: Annotated[tuple[int, int, int], typer.Option(help="Z Y X voxels.")] = (64, 256, 256),
                   shifted: Annotated[bool, typer.Option(
                       help="Write the shifted-conditions cases (defocus, bilayer and radius, missing "
                            "wedge, SNR outside the defaults) instead.")] = False) -> None:
    """Write the held-out simulated accuracy suite (standard, crowded, low_snr, fine, empty)."""
    from vesicleflow.accuracy import write_accuracy_suite

    write_accuracy_suite(out_dir, tomograms_per_case, shape, shifted)
    _echo_tree(out_dir)


@app.command()
def evaluate(results_dir: Path, truth_dir: Path,
             min_f1: Annotated[float | None, typer.Option(help="Exit 1 if any tomogram's F1 is lower.")] = None,
             by_dataset: Annotated[bool, typer.Option(help="Also pool the scores per dataset.")] = False,
             json_out: Annotated[Path | None, typer.Option(help="Write the scores as JSON.")] = None) -> None:
    """Precision, recall and F1 of a run against simulated ground truth."""
    import pandas as pd

    from vesicleflow.accuracy import summarize_by_dataset
    from vesicleflow.evaluate import evaluate_results
    from vesicleflow.io import write_json

    scores = evaluate_results(results_dir, truth_dir)
    if scores.empty:
        typer.echo("no tomogram with both results and ground truth found", err=True)
        raise typer.Exit(1)
    with pd.option_context("display.width", 200, "display.max_columns", 20):
        typer.echo(scores.round(3).to_string(index=False))
        if by_dataset:
            pooled = summarize_by_dataset(scores)
            typer.echo("\nPooled per dataset:\n" + pooled.round(3).to_string(index=False))
    if json_out:
        payload = {"per_tomogram": scores.to_dict(orient="records")}
        if by_dataset:
            payload["per_dataset"] = pooled.to_dict(orient="records")
        write_json(json_out, payload)
    if min_f1 is not None and (scores["f1"] < min_f1).any():
        typer.echo(f"F1 below {min_f1} for at least one tomogram", err=True)
        raise typer.Exit(1)


@app.command()
@user_errors
def train(data_dirs: Annotated[list[Path], typer.Argument(
              help="Folders from `vesicleflow simulate` (tomograms/ + truth/).")],
          output: Annotated[Path, typer.Option("-o", "--output", help="Model folder to write.")],
          init: Model = None, epochs: int = 20, steps_per_epoch: int = 50, batch_size: int = 2,
          patch: int = 48, learning_rate: float = 2e-3, seed: int = 0, device: str = "auto") -> None:
    """Train (or fine-tune from --init) a U-Net on tomograms with label MRCs."""
    from vesicleflow.allocator import keep_freed_memory
    from vesicleflow.train import train_model

    keep_freed_memory()
    train_model(data_dirs, output, init=init, epochs=epochs, steps_per_epoch=steps_per_epoch,
                batch_size=batch_size, patch=patch, learning_rate=learning_rate, seed=seed, device=device)


@app.command("import-model")
@user_errors
def import_model(kind: Annotated[str, typer.Argument(help="Model family; supported: cryovesnet")],
                 source: Path, output: Annotated[Path, typer.Option("-o", "--output")]) -> None:
    """Convert a foreign model file into a vesicleflow model folder."""
    if kind != "cryovesnet":
        typer.echo(f"unknown model kind {kind!r}; supported: cryovesnet", err=True)
        raise typer.Exit(2)
    from vesicleflow.cryovesnet import import_cryovesnet

    typer.echo(str(import_cryovesnet(source, output)))


@app.command()
def bench(out: Annotated[Path, typer.Option(
              help="Folder for the tomograms (reused), bench.json and bench.txt.")] = Path("bench/perf"),
          shape: Annotated[list[str] | None, typer.Option(
              help="Tomogram size Z x Y x X (repeat); default: 128x256x256, 200x512x512, 300x1024x1024.")] = None,
          voxel_size_angstrom: Annotated[float, typer.Option(help="Voxel size of the benchmark tomograms (Å).")] = 15.0,
          threads: Annotated[int, typer.Option(help="CPU threads of the infer stage (the rule's).")] = 2,
          batch_size: Annotated[int | None, typer.Option(
              help="Windows per forward pass; default: 4 on the CPU, 16 on CUDA.")] = None,
          overlap: float = 0.25, device: str = "auto", precision: Precision = PrecisionChoice.auto,
          dryrun_tomograms: Annotated[int, typer.Option(
              help="Time `snakemake -n` over this many tiny tomograms; 0 = skip.")] = 1000,
          keep: Annotated[bool, typer.Option(help="Keep the stages' outputs under OUT/runs (as the workflow "
                                                  "leaves them: no shard).")] = False) -> None:
    """Time every stage on tomograms of growing size; print the table, write OUT/bench.json."""
    from vesicleflow.allocator import keep_freed_memory
    from vesicleflow.bench import DEFAULT_SHAPES, format_report, parse_shape, run_benchmark

    keep_freed_memory()  # as in the infer stage, so the conv3d ceiling is measured the same way
    shapes = [parse_shape(s) for s in shape] if shape else DEFAULT_SHAPES
    report = run_benchmark(out, shapes, voxel_size_angstrom, threads, batch_size, overlap, device,
                           dryrun_tomograms, keep, precision=precision.value)
    typer.echo(format_report(report) + f"written: {out / 'bench.json'}, {out / 'bench.txt'}")


@app.command()
@user_errors
def curate(path: Annotated[Path, typer.Argument(
               help="A results folder <output_dir>/<dataset>/<tomogram>, or a bare tomogram (.mrc/.rec).")],
           results_dir: Annotated[Path | None, typer.Option(
               help="Folder for vesicles.curated.csv; default: PATH for a results folder, "
                    "./<dataset>/<tomogram> for a bare tomogram.")] = None,
           tomogram: Annotated[Path | None, typer.Option(
               help="The tomogram, when the results folder has no tomogram.json.")] = None,
           voxel_size_angstrom: VoxelSize = None,
           max_diameter_nm: Annotated[float, typer.Option(
               help="A click searches for vesicles up to this outer diameter (nm).")] = 100.0,
           min_radius_nm: Annotated[float, typer.Option(help="Smallest radius a click accepts (nm).")] = 8.0,
           bilayer_thickness_nm: Annotated[float, typer.Option(
               help="Outer radius = membrane mid radius + half this (as in spherefit); 0 = measured.")] = 4.5,
           screenshot: Annotated[Path | None, typer.Option(
               help="Render the window to this PNG and exit (needs a display, e.g. xvfb-run).")] = None) -> None:
    """Curate one tomogram's vesicles in napari: click to add (fitted), delete, resize, undo, save."""
    from vesicleflow.curate import open_results

    inputs = open_results(path, results_dir, tomogram, voxel_size_angstrom)
    try:
        from vesicleflow import curate_napari

        curate_napari.require_napari()
    except ImportError as err:
        typer.echo(f"vesicleflow curate: error: {err}", err=True)
        raise typer.Exit(2) from None
    typer.echo(f"{inputs.dataset}/{inputs.name}: {len(inputs.table)} vesicles ({inputs.started_from}); "
               f"saving to {inputs.curated_path}", err=True)
    curate_napari.run(inputs, screenshot, max_diameter_nm=max_diameter_nm, min_radius_nm=min_radius_nm,
                      bilayer_thickness_nm=bilayer_thickness_nm or None)
