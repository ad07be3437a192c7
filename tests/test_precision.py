"""Reduced-precision inference against the CPU's float32: the same probabilities to rounding and the
same vesicles. bfloat16 on the CPU runs wherever oneDNN does it (emulated without AMX or
AVX512-BF16, slowly); CUDA's float16 and bfloat16 autocast are skipped without a CUDA device (CI has
none; run on a GPU node)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.spatial import cKDTree

from vesicleflow.cli import PrecisionChoice
from vesicleflow.infer import PRECISIONS, compute_dtype, infer_shard
from vesicleflow.io import InputError, write_mrc
from vesicleflow.normalize import normalize_tomogram
from vesicleflow.postprocess import postprocess_probability
from vesicleflow.simulate import simulate_tomogram
from vesicleflow.spherefit import fit_spheres
from vesicleflow.stitch import stitch_shards
from vesicleflow.tiling import tile_tomogram
from vesicleflow.volumes import read_full

#: Largest probability change allowed: bfloat16 keeps 8 bits of mantissa (float16 11), so logits of
#: magnitude ~10 move by ~0.05 and a probability near 0.5 by up to a quarter of that, times the layers.
MAX_PROBABILITY_CHANGE = {"float16": 0.05, "bfloat16": 0.1}

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
needs_cpu_bfloat16 = pytest.mark.skipif(
    not (torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()),
    reason="oneDNN has no bfloat16 on this CPU")


@pytest.fixture(scope="module")
def synapse(tmp_path_factory):
    """A simulated tomogram, normalized and tiled, and the CPU float32 pipeline's probability map and
    vesicles."""
    work = tmp_path_factory.mktemp("precision")
    tomogram = work / "synapse.mrc"
    write_mrc(tomogram, simulate_tomogram(11, (64, 256, 256), voxel_size_nm=1.5).tomogram.astype(np.float32), 15.0)
    normalized = normalize_tomogram(tomogram, work / "normalized.zarr")
    plan = work / "tiles.json"
    tile_tomogram(normalized, plan)
    return work, tomogram, normalized, plan, _run("cpu", "float32", work, tomogram, normalized, plan)


def _run(device: str, precision: str, work, tomogram, normalized, plan):
    name = f"{device}_{precision}"
    shard = infer_shard(normalized, plan, 0, work / f"shard_{name}.zarr", batch_size=4, device=device,
                        precision=precision)
    probability = stitch_shards([shard], normalized, work / f"probability_{name}.zarr")
    labels = work / f"labels_{name}.zarr"
    postprocess_probability(probability, labels)
    table = fit_spheres(labels, tomogram, work / f"spheres_{name}.csv")
    return read_full(probability), table[table["outlier_reason"] == ""]


def _assert_same_vesicles(reference, other, label: str, max_probability_change: float):
    (ref_map, ref), (map_, found) = reference, other
    difference = np.abs(map_ - ref_map)
    print(f"probability |{label} - cpu float32|: max {difference.max():.4f}, mean {difference.mean():.2e}; "
          f"vesicles {len(ref)} and {len(found)}")
    assert 0 < difference.max() < max_probability_change and difference.mean() < 1e-3
    assert len(ref) > 20 and len(found) == len(ref)
    distance, match = cKDTree(ref[["z", "y", "x"]].to_numpy()).query(found[["z", "y", "x"]].to_numpy())
    assert len(set(match)) == len(ref) and distance.max() < 0.5
    radius_change = np.abs(found["radius_nm"].to_numpy() - ref["radius_nm"].to_numpy()[match])
    assert radius_change.max() < 0.3


@needs_cpu_bfloat16
def test_cpu_bfloat16_finds_the_same_vesicles_as_float32(synapse):
    work, *inputs, reference = synapse
    _assert_same_vesicles(reference, _run("cpu", "bfloat16", work, *inputs), "cpu bfloat16",
                          MAX_PROBABILITY_CHANGE["bfloat16"])


def test_the_cpu_default_is_float32_and_float16_is_refused_there(synapse):
    work, tomogram, normalized, plan, reference = synapse
    cpu = torch.device("cpu")
    assert compute_dtype("auto", cpu) == torch.float32 and compute_dtype("bfloat16", cpu) == torch.bfloat16
    assert compute_dtype("auto", torch.device("cuda")) == torch.float16
    assert [choice.value for choice in PrecisionChoice] == list(PRECISIONS)  # the CLI's, spelled out
    default = _run("cpu", "auto", work, tomogram, normalized, plan)
    np.testing.assert_array_equal(default[0], reference[0])
    with pytest.raises(InputError, match="float16 needs a CUDA device"):
        infer_shard(normalized, plan, 0, work / "refused.zarr", device="cpu", precision="float16")
    with pytest.raises(InputError, match="not one of"):
        infer_shard(normalized, plan, 0, work / "refused.zarr", device="cpu", precision="half")
    assert not (work / "refused.zarr").exists()


@needs_cuda
@pytest.mark.parametrize(("precision", "dtype"), [("auto", "float16"), ("bfloat16", "bfloat16")])
def test_cuda_mixed_precision_finds_the_same_vesicles_as_the_cpu(synapse, precision, dtype):
    work, *inputs, reference = synapse
    _assert_same_vesicles(reference, _run("cuda", precision, work, *inputs), f"cuda {precision}",
                          MAX_PROBABILITY_CHANGE[dtype])
