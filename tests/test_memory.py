"""Memory: every stage's peak RSS on a 200 x 512 x 512 tomogram stays under the `mem_mb` its rule
declares, and the chunked stages give the same result whatever their block size.

Each stage runs as its own `vesicleflow` process; its peak RSS comes from os.wait4 (the kernel's
ru_maxrss of that child, including pages of memory-mapped files it touched). The declared values
come from a Snakemake dry run over the same tomogram, so the test checks what the workflow really
asks a cluster for.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from unittest import mock

import numpy as np
import pandas as pd
import pytest
from conftest import VENV_BIN, cli_env, run_snakemake_isolated

from vesicleflow.grid import GridMapping
from vesicleflow.io import write_mrc
from vesicleflow.volumes import create_volume, open_volume, read_full

SHAPE = (200, 512, 512)
VOXEL_ANGSTROM = 10.0  # a 4x-binned tomogram; the model grid (20 Å) is 100 x 256 x 256
N_VESICLES = 80


def synthetic_synapse(shape, voxel_angstrom, n_vesicles, seed=0):
    """Noise with dark spherical shells (vesicle membranes), and a matching model-grid probability map."""
    rng = np.random.default_rng(seed)
    volume = rng.normal(0, 1, shape).astype(np.float32)
    mapping = GridMapping(shape, voxel_angstrom, 20.0)
    probability = np.zeros(mapping.model_shape, np.float32)
    voxel_nm = voxel_angstrom / 10
    for _ in range(n_vesicles):
        radius = rng.uniform(15, 25) / voxel_nm
        centre = rng.uniform([radius + 4] * 3, np.array(shape) - radius - 4)
        box = tuple(slice(max(0, int(c - radius - 5)), min(n, int(c + radius + 6))) for c, n in zip(centre, shape))
        distance = np.sqrt(sum((g - c) ** 2 for g, c in zip(np.ogrid[box], centre)))
        volume[box] -= 3 * np.exp(-0.5 * ((distance - radius) / 1.5) ** 2)
        centre_m, radius_m = mapping.original_to_model(centre), radius * mapping.zoom
        box = tuple(slice(max(0, int(c - radius_m - 2)), min(n, int(c + radius_m + 3)))
                    for c, n in zip(centre_m, mapping.model_shape))
        distance = np.sqrt(sum((g - c) ** 2 for g, c in zip(np.ogrid[box], centre_m)))
        probability[box] = np.maximum(probability[box], np.clip(1.0 - 0.6 * distance / radius_m, 0, 1))
    return volume, probability, mapping


#: Runs argv[1:] and prints its peak RSS (kB). A child forked from a large process starts with that
#: process's resident pages, and Linux keeps that high-water mark across exec, so the stage must be
#: forked from this small launcher, never directly from the test process.
LAUNCHER = """
import os, sys
pid = os.fork()
if pid == 0:
    os.execv(sys.argv[1], sys.argv[1:])
_, status, usage = os.wait4(pid, 0)
print(usage.ru_maxrss, file=sys.stderr)
sys.exit(os.waitstatus_to_exitcode(status))
"""


def peak_rss_mb(args: list, log) -> tuple[float, float]:
    """Run one `vesicleflow` command; its peak RSS (MB) and wall time (s)."""
    began = time.perf_counter()
    result = subprocess.run([sys.executable, "-c", LAUNCHER, str(VENV_BIN / "vesicleflow"), *map(str, args)],
                            env=cli_env(), stdout=log, stderr=subprocess.PIPE, text=True)
    log.write(result.stderr)
    assert result.returncode == 0, f"{args[0]} failed: {result.stderr[-2000:]}"
    return int(result.stderr.strip().splitlines()[-1]) / 1024, time.perf_counter() - began


def declared_mem_mb(input_dir, output_dir, model) -> dict[str, int]:
    """rule -> mem_mb, from a dry run of the workflow over ``input_dir``."""
    result = run_snakemake_isolated(output_dir.parent / "wd", "--dry-run", "--config", f"input_dir={input_dir}",
                                    f"output_dir={output_dir}", f"model={model}", timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    declared, rule = {}, None
    for line in (result.stdout + result.stderr).splitlines():
        if match := re.match(r"^(?:local)?rule (\w+):", line.strip()):
            rule = match.group(1)
        elif rule and (match := re.search(r"resources:.*\bmem_mb=(\d+)", line)):
            declared[rule] = int(match.group(1))
    return declared


@pytest.mark.slow
def test_every_stage_stays_under_its_declared_memory(model_copy, tmp_path):
    volume, probability, mapping = synthetic_synapse(SHAPE, VOXEL_ANGSTROM, N_VESICLES)
    tomogram = write_path = tmp_path / "input" / "ds" / "big.mrc"
    write_mrc(write_path, volume, VOXEL_ANGSTROM)
    del volume
    work = tmp_path / "work"
    work.mkdir()
    # stitch input: one shard covering the volume whose probability is the synthetic one
    attrs = {"box_start": [0, 0, 0], "box_stop": list(mapping.model_shape), "shape": list(mapping.model_shape),
             "shard": 0}
    create_volume(work / "full_shard.zarr" / "probability", mapping.model_shape, "float32", attrs=attrs)[...] = \
        probability
    create_volume(work / "full_shard.zarr" / "weight", mapping.model_shape, "float32", attrs=attrs)[...] = 0.5
    del probability
    declared = declared_mem_mb(tmp_path / "input", tmp_path / "results", model_copy)

    stages = {
        "normalize": ["normalize", tomogram, work / "normalized.zarr", "--model", model_copy],
        # infer: shard 0 of 10 (5 of the 50 windows) keeps CPU time short; its memory is the model,
        # one batch of activations and the shard's box, so a full shard adds only 8 bytes per voxel
        "tile": ["tile", work / "normalized.zarr", work / "tiles.json", "--model", model_copy, "--shards", "10"],
        "infer": ["infer", work / "normalized.zarr", work / "tiles.json", work / "shard_0.zarr", "--shard", "0",
                  "--model", model_copy, "--device", "cpu", "--threads", "2"],
        "stitch": ["stitch", work / "probability.zarr", "--normalized", work / "normalized.zarr",
                   work / "full_shard.zarr"],
        "postprocess": ["postprocess", work / "probability.zarr", work / "labels.zarr"],
        "spherefit": ["spherefit", work / "labels.zarr", tomogram, work / "spheres.csv"],
        "export": ["export", work / "spheres.csv", work / "labels.zarr", tomogram, work / "out",
                   "--dataset", "ds", "--name", "big"],
    }
    measured = {}
    with open(tmp_path / "stages.log", "w") as log:
        for stage, args in stages.items():
            peak, wall = peak_rss_mb(args, log)
            measured[stage] = {"peak_rss_mb": round(peak), "declared_mem_mb": declared.get(stage),
                               "wall_s": round(wall, 1)}
    report = json.dumps(measured, indent=1)
    print(f"\npeak RSS per stage on {SHAPE} at {VOXEL_ANGSTROM} Å:\n{report}")
    (tmp_path / "memory.json").write_text(report)
    n_labels = int(read_full(work / "labels.zarr").max())
    assert n_labels > N_VESICLES // 2, "postprocess should see the synthetic vesicles"
    over = {stage: m for stage, m in measured.items() if m["declared_mem_mb"] is None
            or m["peak_rss_mb"] > m["declared_mem_mb"]}
    assert not over, f"stages over (or without) their declared mem_mb:\n{report}"


# ------------------------------------------------------------------------ chunking changes nothing

def test_normalize_is_the_same_in_any_slab_size(mrc_factory, monkeypatch):
    from vesicleflow import normalize

    rng = np.random.default_rng(2)
    path = mrc_factory("t.mrc", rng.normal(3, 2, (40, 96, 80)).astype(np.float32), voxel_size_angstrom=13.0)
    whole = read_full(normalize.normalize_tomogram(path, path.parent / "a.zarr"))
    monkeypatch.setattr(normalize, "slab_planes", lambda *args, **kwargs: 1)  # one output plane per step
    np.testing.assert_array_equal(read_full(normalize.normalize_tomogram(path, path.parent / "b.zarr")), whole)


def test_stitch_is_the_same_in_any_block_size(tmp_path, monkeypatch):
    from vesicleflow import stitch

    shape = (70, 150, 90)
    rng = np.random.default_rng(3)
    create_volume(tmp_path / "n.zarr", shape, "float32", attrs={"grid": {}})
    boxes = [((0, 0, 0), (50, 150, 90)), ((30, 0, 0), (70, 150, 90)), ((10, 20, 30), (60, 100, 90))]
    for k, (start, stop) in enumerate(boxes):
        box = [b - a for a, b in zip(start, stop)]
        attrs = {"box_start": list(start), "box_stop": list(stop), "shape": list(shape)}
        weight = rng.uniform(0.1, 1, box).astype(np.float32)
        create_volume(tmp_path / f"s{k}.zarr" / "probability", box, "float32", attrs=attrs)[...] = \
            rng.uniform(0, 1, box).astype(np.float32)
        create_volume(tmp_path / f"s{k}.zarr" / "weight", box, "float32", attrs=attrs)[...] = weight
    shards = [tmp_path / f"s{k}.zarr" for k in range(len(boxes))]
    whole = read_full(stitch.stitch_shards(shards, tmp_path / "n.zarr", tmp_path / "a.zarr"))
    monkeypatch.setattr(stitch, "BLOCK_BYTES", 1)  # 64-plane slabs of 64-row bands
    assert len(list(stitch.blocks(shape))) == 6
    np.testing.assert_array_equal(read_full(stitch.stitch_shards(shards, tmp_path / "n.zarr", tmp_path / "b.zarr")),
                                  whole)


def blob_probability(path, shape, voxel_angstrom: float, seed: int = 1) -> np.ndarray:
    """A model-grid probability zarr at ``path`` of 60 noisy balls (radius 2.5-14 voxels; touching,
    crossing the faces, too small and too large for 8-20 nm); returns the probabilities."""
    rng = np.random.default_rng(seed)
    probability = np.zeros(shape, np.float32)
    for _ in range(60):
        centre, radius = rng.uniform([0, 0, 0], shape), rng.uniform(2.5, 14)
        distance = np.sqrt(sum((g - c) ** 2 for g, c in zip(np.ogrid[tuple(slice(0, n) for n in shape)], centre)))
        probability = np.maximum(probability, np.clip(1.2 - 0.7 * distance / radius, 0, 1))
    probability += rng.normal(0, 0.05, shape).astype(np.float32)
    attrs = {"grid": GridMapping(shape, voxel_angstrom, voxel_angstrom).to_attrs()}
    create_volume(path, shape, "float32", attrs=attrs)[...] = probability
    return probability


@pytest.mark.parametrize("voxel_angstrom", [20.0, 15.0])
def test_postprocess_stores_the_candidates_spherefit_would_cut_from_the_labels(tmp_path, voxel_angstrom):
    """Each label's candidate that postprocess stores (from its distance transform's nearest
    background where the voxel size is a power of two, else from a second transform) is the one
    spherefit finds in the written labels, in one block or in several on two workers; spherefit then
    fits them without reading the labels, to the same table."""
    from vesicleflow import spherefit
    from vesicleflow.postprocess import postprocess_probability
    from vesicleflow.spherefit import fit_spheres, inscribed_ball, labelled_objects, stored_candidates

    shape = (48, 120, 136)
    probability = blob_probability(tmp_path / "p.zarr", shape, voxel_angstrom)
    tomogram = tmp_path / "tomogram.mrc"
    write_mrc(tomogram, -probability.astype(np.float32), voxel_angstrom)  # dark balls
    kwargs = {"threshold": 0.5, "min_radius_nm": 8.0, "max_radius_nm": 20.0}
    tables = []
    for name, budget, workers in (("whole", 10**9, 1), ("blocked", 400_000, 2)):
        labels_path = tmp_path / f"{name}.zarr"
        count = postprocess_probability(tmp_path / "p.zarr", labels_path, **kwargs, block_voxels=budget,
                                        workers=workers)
        labels = open_volume(labels_path)
        expected = sorted(inscribed_ball(*obj, voxel_angstrom / 10) for obj in labelled_objects(labels))
        stored = stored_candidates(dict(labels.attrs))
        assert len(stored) == count > 10 and stored == expected
        with mock.patch.object(spherefit, "open_volume", side_effect=AssertionError("labels read")):
            tables.append(fit_spheres(labels_path, tomogram, tmp_path / f"{name}.csv", workers=workers))
        del open_volume(labels_path, mode="r+").attrs["candidates"]  # an earlier version's labels: cut from them
        pd.testing.assert_frame_equal(fit_spheres(labels_path, tomogram, tmp_path / f"{name}_cut.csv"), tables[-1],
                                      check_exact=True)
    pd.testing.assert_frame_equal(tables[0], tables[1], check_exact=True)


def test_postprocess_in_blocks_equals_the_whole_volume_at_once(tmp_path, monkeypatch):
    """Touching vesicles, vesicles across block borders, blobs too small and too large: the blocked
    result (in one process or two, its labels written by one thread or three, in any box order)
    equals the single-block one voxel for voxel, labels numbered identically."""
    from vesicleflow import postprocess
    from vesicleflow.postprocess import block_cores, halo_voxels, postprocess_probability, separate_instances
    from vesicleflow.spherefit import object_boxes, stored_object_boxes

    shape = (48, 120, 136)
    probability = blob_probability(tmp_path / "p.zarr", shape, 20.0)
    kwargs = {"threshold": 0.5, "min_radius_nm": 8.0, "max_radius_nm": 20.0}
    n_whole = postprocess_probability(tmp_path / "p.zarr", tmp_path / "whole.zarr", **kwargs, block_voxels=10**9)
    budget = 400_000
    halo = halo_voxels(2.0, 8.0, 20.0)
    cores = block_cores(shape, halo, budget)
    assert np.prod([-(-n // c) for n, c in zip(shape, cores)]) >= 8, cores
    n_blocked = postprocess_probability(tmp_path / "p.zarr", tmp_path / "blocked.zarr", **kwargs, block_voxels=budget)
    assert not postprocess._BLOCK_BUFFERS._bytes  # the blocks' reused arrays are not kept after the stage
    n_parallel = postprocess_probability(tmp_path / "p.zarr", tmp_path / "parallel.zarr", **kwargs,
                                         block_voxels=budget, workers=2)
    whole, blocked = read_full(tmp_path / "whole.zarr"), read_full(tmp_path / "blocked.zarr")
    assert n_whole == n_blocked == n_parallel > 10
    np.testing.assert_array_equal(blocked, whole)
    np.testing.assert_array_equal(read_full(tmp_path / "parallel.zarr"), whole)
    in_memory = separate_instances(probability > 0.5, 2.0, 8.0, 20.0)
    np.testing.assert_array_equal(in_memory, whole)
    for name in ("whole", "blocked", "parallel"):  # the boxes stored for spherefit are the labels' own
        stored, scanned = stored_object_boxes(open_volume(tmp_path / f"{name}.zarr")), object_boxes(whole)
        assert len(stored[0]) == n_whole and all(np.array_equal(a, b) for a, b in zip(stored, scanned))
    # the command line forks its workers (this test process has zarr's threads, so it spawned them)
    forked = subprocess.run(["vesicleflow", "postprocess", str(tmp_path / "p.zarr"), str(tmp_path / "cli.zarr"),
                             "--threshold", "0.5", "--min-radius-nm", "8", "--max-radius-nm", "20", "--workers", "2"],
                            capture_output=True, text=True, env=cli_env(), check=True)
    assert "2 worker processes (forked)" in forked.stderr
    np.testing.assert_array_equal(read_full(tmp_path / "cli.zarr"), whole)
    chunk_blocks = postprocess._chunk_blocks  # boxes of 64 and 56 rows, the smaller first
    monkeypatch.setattr(postprocess, "_chunk_blocks",
                        lambda shape, size: reversed(list(chunk_blocks(shape, size, size * 48 * 64 * 136))))
    for workers in (1, 3):  # one thread: its buffer must grow for the second box
        postprocess_probability(tmp_path / "p.zarr", tmp_path / f"threads{workers}.zarr", **kwargs,
                                block_voxels=budget, workers=workers)
        np.testing.assert_array_equal(read_full(tmp_path / f"threads{workers}.zarr"), whole)


def test_postprocess_blocks_keep_every_worker_busy_within_the_budget():
    """Blocks are as few as the budget allows, but never fewer than the workers when splitting
    finishes sooner: the benchmark's largest model grid is one block per worker, its middle one
    two blocks for two workers instead of one that leaves a worker idle."""
    from vesicleflow.postprocess import BLOCK_VOXELS, block_cores

    def blocks(shape, workers, budget=BLOCK_VOXELS):
        cores = block_cores(shape, 66, budget, workers)
        assert np.prod([min(c + 132, n) for c, n in zip(cores, shape)]) <= budget
        return int(np.prod([-(-n // c) for n, c in zip(shape, cores)]))

    assert blocks((225, 768, 768), 1) == blocks((225, 768, 768), 2) == 2
    assert blocks((225, 768, 768), 4) == 4
    assert blocks((150, 384, 384), 1) == 1 and blocks((150, 384, 384), 2) == 2
    assert blocks((225, 768, 768), 2, 32 * 2**20) == 10  # the earlier budget


def test_components_past_uint16_are_numbered_in_int32():
    """Blocks label their components in a reused uint16 array; a block with more than 65,535
    components gets an int32 array with the same numbering instead of an error."""
    from scipy import ndimage

    from vesicleflow.postprocess import _label_components

    for planes, expected in ((60, 54_000), (80, 72_000)):
        foreground = np.zeros((planes, 80, 90), bool)
        foreground[::2, ::2, ::2] = True  # isolated voxels, each a component
        reference, count = ndimage.label(foreground)
        reused = np.empty(foreground.shape, np.uint16)
        labelled = _label_components(foreground, reused)
        assert count == expected and (labelled is reused) == (count < 2**16)
        assert labelled.dtype == (np.uint16 if count < 2**16 else np.int32)
        np.testing.assert_array_equal(labelled, reference)


def test_forked_workers_start_with_the_preloaded_modules():
    """process_pool imports ``preload`` before forking, so a worker does not import it again."""
    probe = ("import sys\nfrom vesicleflow.parallel import process_pool\n"
             "def imported(_):\n    return 'zarr' in sys.modules\n"
             "assert 'zarr' not in sys.modules\n"
             "with process_pool(2, preload=('zarr',)) as pool:\n    print(pool.map(imported, [0, 1]))\n")
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, env=cli_env(), check=True)
    assert result.stdout.strip() == "[True, True]"


@pytest.mark.parametrize("scene", ["over 255 objects", "ball inside a shell"])
def test_postprocess_pieces_keep_every_id_and_nesting(tmp_path, monkeypatch, scene):
    """A block returns its kept objects as pieces of ids in the smallest dtype that holds them: past
    255 objects they need uint16. A ball inside a thick shell nests its piece in the shell's (its box
    holds shell voxels): the two are merged into one crop. Either way the labels equal the in-memory
    segmentation."""
    from vesicleflow import postprocess

    grid = np.indices((36, 156, 156) if scene == "over 255 objects" else (48, 48, 48))
    if scene == "over 255 objects":  # 3 x 13 x 13 balls, inscribed radius 10 nm
        foreground = sum(((g - 6) % 12 - 6) ** 2 for g in grid) <= 4.5**2
    else:
        distance = np.sqrt(sum((g - 24.0) ** 2 for g in grid))
        foreground = (distance <= 7) | ((distance >= 9) & (distance <= 21))  # a 2-voxel gap
    probability = np.where(foreground, 0.9, 0.1).astype(np.float32)
    attrs = {"grid": GridMapping(probability.shape, 20.0, 20.0).to_attrs()}
    create_volume(tmp_path / "p.zarr", probability.shape, "float32", attrs=attrs)[...] = probability
    returned = []  # (pieces, what _compact made of them) per block

    def spy(pieces, compact=postprocess._compact):
        returned.append((pieces, compact(pieces)))
        return returned[-1][1]

    monkeypatch.setattr(postprocess, "_compact", spy)
    kwargs = {"threshold": 0.5, "min_radius_nm": 8.0, "max_radius_nm": 20.0}
    count = postprocess.postprocess_probability(tmp_path / "p.zarr", tmp_path / "l.zarr", **kwargs)
    expected = postprocess.separate_instances(foreground, 2.0, 8.0, 20.0)
    assert count == expected.max()
    np.testing.assert_array_equal(read_full(tmp_path / "l.zarr"), expected)
    (pieces, result), = returned  # one block
    if scene == "over 255 objects":
        assert count == 3 * 13 * 13 and {ids.dtype.name for _, ids in result} == {"uint8", "uint16"}
    else:
        assert len(pieces) == 2 and len(result) == 1


@pytest.mark.parametrize("preset, expected", [(None, "False"), ("1", "True")])
def test_commands_give_numpy_small_pages_unless_told_otherwise(preset, expected):
    """Every vesicleflow command runs numpy without 2 MiB pages (dear on a VM whose host takes back
    free memory; see allocator.py), unless NUMPY_MADVISE_HUGEPAGE says otherwise."""
    env = cli_env()
    env.pop("NUMPY_MADVISE_HUGEPAGE", None)
    if preset:
        env["NUMPY_MADVISE_HUGEPAGE"] = preset
    probe = ("import sys\nfrom vesicleflow.cli import app\nsys.argv = ['vesicleflow', 'tile', '--help']\n"
             "try:\n    app()\nexcept SystemExit:\n    pass\n"
             "from numpy._core.multiarray import _set_madvise_hugepage\n"
             "print('huge pages', _set_madvise_hugepage(False))\n")
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, env=env, check=True)
    assert result.stdout.strip().splitlines()[-1] == f"huge pages {expected}"
