"""The benchmark (`vesicleflow bench`) and the inference optimisations it measures.

The optimised infer stage (BatchNorm folded into the convolutions, channels-last-3d, slab reads,
torch accumulation, uncompressed shards) is checked against the plain per-window reference below:
same weights exactly, probabilities within 1e-4, and equal labels and sphere tables downstream.
"""

from __future__ import annotations

import json
import math
import sys

import numpy as np
import pandas as pd
import pytest
import torch

from vesicleflow import bench
from vesicleflow.infer import (
    FastUNet,
    _read_window,
    infer_shard,
    inference_network,
    prepare_for_inference,
    upsample_conv_kernel,
)
from vesicleflow.io import write_mrc
from vesicleflow.model import UNet3d, load_model
from vesicleflow.modelinfo import Architecture
from vesicleflow.normalize import normalize_tomogram
from vesicleflow.postprocess import postprocess_probability
from vesicleflow.simulate import simulate_tomogram
from vesicleflow.spherefit import fit_spheres
from vesicleflow.stitch import stitch_shards
from vesicleflow.tiling import gaussian_importance, shard_box, tile_tomogram
from vesicleflow.volumes import create_volume, open_volume, read_full

#: Documented tolerance of the optimised inference against the reference (absolute, probabilities).
PROBABILITY_TOLERANCE = 1e-4


# ------------------------------------------------------------------------------------------------
# the reference: the plain per-window implementation the optimisations must reproduce


def reference_shard(normalized, plan: dict, shard: int) -> tuple[np.ndarray, np.ndarray]:
    """sum(w*p), sum(w) over the shard's box: one window at a time, unprepared network, numpy."""
    net, _ = load_model(None, "cpu")
    volume = open_volume(normalized)
    window = plan["window"]
    weights = gaussian_importance(window)
    start, stop = shard_box(plan, shard)
    shape = [b - a for a, b in zip(start, stop)]
    weighted, weight_sum = np.zeros(shape, np.float32), np.zeros(shape, np.float32)
    for index in plan["shards"][shard]:
        origin = plan["windows"][index]
        data = _read_window(volume, origin, window)
        with torch.inference_mode():
            prob = torch.sigmoid(net(torch.from_numpy(data)[None, None]))[0, 0].numpy()
        local = tuple(slice(o - s, min(o + window, e) - s) for o, s, e in zip(origin, start, stop))
        crop = tuple(slice(0, sl.stop - sl.start) for sl in local)
        weighted[local] += prob[crop] * weights[crop]
        weight_sum[local] += weights[crop]
    return weighted, weight_sum


def write_reference_shard(path, normalized, plan: dict, shard: int):
    weighted, weight_sum = reference_shard(normalized, plan, shard)
    start, stop = shard_box(plan, shard)
    attrs = {"box_start": start, "box_stop": stop, "shape": plan["shape"], "shard": shard}
    probability = np.divide(weighted, weight_sum, out=np.zeros_like(weighted), where=weight_sum > 0)
    create_volume(path / "probability", weighted.shape, "float32", attrs=attrs)[...] = probability
    create_volume(path / "weight", weight_sum.shape, "float32", attrs=attrs)[...] = weight_sum
    return path


@pytest.fixture(scope="module")
def simulated(tmp_path_factory):
    """A small simulated synapse (16 Å): tomogram and its normalized volume (32 x 90 x 96 model voxels)."""
    root = tmp_path_factory.mktemp("bench_sim")
    sim = simulate_tomogram(5, (40, 112, 120), voxel_size_nm=1.6)
    tomogram = root / "tomo.mrc"
    write_mrc(tomogram, sim.tomogram.astype(np.float32), 16.0)
    normalized = normalize_tomogram(tomogram, root / "normalized.zarr")
    return root, tomogram, normalized


# ------------------------------------------------------------------------------------------------
# optimisation equivalence


def test_prepared_network_matches_the_plain_network():
    net, _ = load_model(None, "cpu")
    prepared = prepare_for_inference(net)
    assert not any(isinstance(m, torch.nn.BatchNorm3d) for m in prepared.modules())
    assert any(isinstance(m, torch.nn.BatchNorm3d) for m in net.modules())  # the original is untouched
    x = torch.randn(3, 1, 32, 40, 48, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        expected = torch.sigmoid(net(x))
        got = torch.sigmoid(prepared(x.contiguous(memory_format=torch.channels_last_3d)))
    assert float((got - expected).abs().max()) < PROBABILITY_TOLERANCE


def test_nearest_upsampling_then_conv_is_a_transposed_conv():
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(2, 3, 5, 6, 7, generator=gen, dtype=torch.float64)
    weight = torch.randn(4, 3, 3, 3, 3, generator=gen, dtype=torch.float64)
    expected = torch.nn.functional.conv3d(torch.nn.functional.interpolate(x, scale_factor=2, mode="nearest"),
                                          weight, padding=1)
    got = torch.nn.functional.conv_transpose3d(x, upsample_conv_kernel(weight), stride=2, padding=1)
    assert got.shape == expected.shape
    assert float((got - expected).abs().max()) < 1e-10


def _randomised(arch: Architecture) -> UNet3d:
    """A network with random weights and random BatchNorm statistics (folding must use them)."""
    torch.manual_seed(3)
    net = UNet3d(arch)
    for module in net.modules():
        if isinstance(module, torch.nn.BatchNorm3d):
            module.running_mean.uniform_(-0.5, 0.5)
            module.running_var.uniform_(0.5, 2.0)
            module.weight.data.uniform_(0.5, 1.5)
            module.bias.data.uniform_(-0.2, 0.2)
    return net.eval()


@pytest.mark.parametrize("upsample, kernel", [("nearest", 3), ("trilinear", 3), ("nearest", 5)])
@pytest.mark.parametrize("fused", [True, False])
def test_fast_unet_matches_other_architectures(upsample, kernel, fused):
    arch = Architecture(encoder=[[4, 4], [6]], bottom=[8], decoder=[[6], [4, 5]], upsample=upsample,
                        kernel_size=kernel)
    net = _randomised(arch)
    x = torch.randn(2, 1, 16, 24, 32, generator=torch.Generator().manual_seed(0))
    try:
        fast = FastUNet(net, fused=fused)
        with torch.inference_mode():
            got = fast(x.contiguous(memory_format=torch.channels_last_3d))
    except RuntimeError:
        if fused:
            pytest.skip("oneDNN fused operations unavailable in this torch build")
        raise
    with torch.inference_mode():
        expected = net(x)
    assert float((got - expected).abs().max()) < 1e-4
    model, form = inference_network(net, torch.device("cpu"))
    assert form in ("fast-fused", "fast")


@pytest.mark.parametrize("window, shards", [(None, 1), (32, 3)])
def test_infer_shard_matches_the_per_window_reference(simulated, window, shards):
    root, _, normalized = simulated
    plan_path = root / f"tiles_{window}_{shards}.json"
    plan = tile_tomogram(normalized, plan_path, window=window, overlap=0.25, shards=shards)
    if window is None:  # the model's 64³ windows: z (30 planes) is padded, y and x overlap
        assert plan["shape"][0] < plan["window"] and len(plan["windows"]) > 1
    for shard in range(shards):
        out = infer_shard(normalized, plan_path, shard, root / f"shard_{window}_{shard}.zarr", batch_size=4,
                          device="cpu", threads=2)
        weighted, weight_sum = reference_shard(normalized, plan, shard)
        got_probability = read_full(out / "probability")
        attrs = dict(open_volume(out / "probability").attrs)
        assert attrs["box_start"] == shard_box(plan, shard)[0] and attrs["only_shard"] == (shards == 1)
        if shards == 1:  # the plan's only shard: no weight, and every voxel reached
            assert not (out / "weight").exists() and weight_sum.min() > 0
        else:
            np.testing.assert_array_equal(read_full(out / "weight"), weight_sum)
        covered = weight_sum > 0  # a shard's box may hold voxels none of its windows reach
        np.testing.assert_array_equal(got_probability[~covered], 0)
        np.testing.assert_allclose(got_probability[covered], weighted[covered] / weight_sum[covered],
                                   rtol=0, atol=PROBABILITY_TOLERANCE)


def test_optimised_inference_gives_equal_vesicle_tables(simulated):
    """Downstream of the probability map nothing changes: same labels, same fitted spheres (also when
    the spheres are fitted by two worker processes)."""
    root, tomogram, normalized = simulated
    plan_path = root / "tiles_e2e.json"
    plan = tile_tomogram(normalized, plan_path, overlap=0.25, shards=1)
    results = {}
    for kind in ("reference", "optimised"):
        shard = root / f"{kind}_shard.zarr"
        if kind == "reference":
            write_reference_shard(shard, normalized, plan, 0)
        else:
            infer_shard(normalized, plan_path, 0, shard, device="cpu", threads=2)
        probability = stitch_shards([shard], normalized, root / f"{kind}_probability.zarr")
        labels = root / f"{kind}_labels.zarr"
        postprocess_probability(probability, labels, 0.5, None, 8.0, 60.0, None)
        spheres = fit_spheres(labels, tomogram, root / f"{kind}_spheres.csv",  # in parallel: same table
                              workers=1 if kind == "reference" else 2)
        results[kind] = (read_full(probability), read_full(labels), spheres)
    (p_ref, l_ref, s_ref), (p_opt, l_opt, s_opt) = results["reference"], results["optimised"]
    assert float(np.abs(p_opt - p_ref).max()) < PROBABILITY_TOLERANCE
    np.testing.assert_array_equal(l_opt, l_ref)
    assert (s_ref["outlier_reason"] == "").sum() > 0  # the test tomogram has vesicles
    pd.testing.assert_frame_equal(s_opt, s_ref)


# ------------------------------------------------------------------------------------------------
# the benchmark's measurements


def test_flop_count_of_a_tiny_unet_matches_the_hand_count():
    arch = Architecture(encoder=[[2]], bottom=[3], decoder=[[2]])
    net = UNet3d(arch).eval()
    # full resolution: conv 1->2 (3³), decoder conv (3+2)->2 (3³), head 2->1 (1³); bottom 2->3 at 1/8
    macs = 27 * 1 * 2 + 27 * 5 * 2 + 2 * 1 + 27 * 2 * 3 / 8
    assert bench.count_flops_per_voxel(net, 16) == pytest.approx(2 * macs)


def test_bundled_model_flops_per_voxel():
    net, info = load_model(None, "cpu")
    arch = info.architecture
    k3 = arch.kernel_size**3
    macs, channels = 0.0, arch.in_channels
    skips = []
    for level, block in enumerate(arch.encoder):
        for c in block:
            macs += k3 * channels * c / 8**level
            channels = c
        skips.append(channels)
    for c in arch.bottom:
        macs += k3 * channels * c / 8 ** len(arch.encoder)
        channels = c
    for level, (block, skip) in enumerate(zip(arch.decoder, reversed(skips))):
        channels += skip
        for c in block:
            macs += k3 * channels * c / 8 ** (len(arch.encoder) - 1 - level)
            channels = c
    macs += channels * arch.out_channels
    assert bench.count_flops_per_voxel(net, info.window) == pytest.approx(2 * macs)


def test_scaling_exponent_fit():
    voxels = [1e6, 8e6, 64e6]
    assert bench.fit_exponent(voxels, [3 * v for v in voxels]) == pytest.approx(1.0)
    assert bench.fit_exponent(voxels, [2 + 0 * v for v in voxels]) == pytest.approx(0.0, abs=1e-12)
    assert bench.fit_exponent(voxels, [v**1.5 for v in voxels]) == pytest.approx(1.5)
    assert bench.fit_exponent([5.0], [1.0]) is None


def test_mirror_tiling_is_seamless_and_exact():
    assert bench._mirror_indices(7, 3).tolist() == [0, 1, 2, 2, 1, 0, 0]
    assert bench._mirror_indices(3, 3).tolist() == [0, 1, 2]


def test_tiled_tomogram_keeps_voxel_size_and_content(tmp_path):
    data = np.arange(4 * 5 * 6, dtype=np.float32).reshape(4, 5, 6)
    write_mrc(tmp_path / "base.mrc", data, 14.0)
    out = bench.tiled_tomogram(tmp_path / "base.mrc", (9, 10, 7), tmp_path / "big.mrc", planes=2)
    import mrcfile

    with mrcfile.open(out) as mrc:
        assert mrc.voxel_size.x == pytest.approx(14.0)
        big = np.asarray(mrc.data)
    np.testing.assert_array_equal(big[:4, :5, :6], data)
    np.testing.assert_array_equal(big[4], data[3, bench._mirror_indices(10, 5)][:, bench._mirror_indices(7, 6)])


def test_run_measured_reports_the_childs_own_peak_memory(tmp_path):
    _ballast = np.ones(64 * 2**20 // 8)  # this process is bigger than the child
    small = bench.run_measured(["true"], tmp_path / "true.log")
    big = bench.run_measured([bench.sys.executable, "-c", "import numpy; a = numpy.ones(2**25); a += 1"],
                             tmp_path / "big.log")
    assert small.returncode == 0 and small.peak_rss_mb < 40
    assert big.peak_rss_mb > 256 and big.cpu_s > 0 and big.wall_s > 0
    assert bench.run_measured(["sh", "-c", "exit 3"], tmp_path / "fail.log").returncode == 3
    del _ballast


def test_run_measured_tells_system_time_from_user_time(tmp_path):
    """The kernel's share of a stage's CPU time (where a virtual machine pays for fresh memory) is
    reported on its own: a loop of reads from /dev/zero is system time, a Python loop user time."""
    kernel = bench.run_measured([bench.sys.executable, "-c", "import os\nfd = os.open('/dev/zero', os.O_RDONLY)\n"
                                 "for _ in range(300): os.read(fd, 2**22)"], tmp_path / "kernel.log")
    user = bench.run_measured([bench.sys.executable, "-c", "sum(i * i for i in range(4_000_000))"],
                              tmp_path / "user.log")
    assert kernel.returncode == user.returncode == 0
    assert 0 <= kernel.system_s <= kernel.cpu_s and 0 <= user.system_s <= user.cpu_s
    assert kernel.system_s > 0.5 * kernel.cpu_s
    assert user.system_s < 0.5 * user.cpu_s


def test_bench_end_to_end_on_a_tiny_tomogram(tmp_path):
    """Every stage runs, the table prints, the JSON holds the figures the README quotes."""
    report = bench.run_benchmark(tmp_path, shapes=[(24, 64, 64)], dryrun_tomograms=0, base_shape=(24, 64, 64),
                                 ceiling_side=32, probe_bytes=3 * 2**20)
    saved = json.loads((tmp_path / "bench.json").read_text())
    probe = saved["machine"]["new_file_write"]
    assert probe["mib"] == pytest.approx(3.0, abs=0.01) and probe["wall_s"] > 0 and probe["system_s"] >= 0
    assert not [p for p in tmp_path.iterdir() if "probe" in p.name]
    assert saved["tomograms"][0]["shape_zyx"] == [24, 64, 64]
    row = report["tomograms"][0]
    assert list(row["stages"]) == list(bench.STAGES)
    assert all(s["wall_s"] > 0 and s["peak_rss_mb"] > 0 for s in row["stages"].values())
    assert row["total_wall_s"] == pytest.approx(sum(s["wall_s"] for s in row["stages"].values()), rel=1e-3)
    assert row["model_shape_zyx"] == [18, 48, 48] and row["windows"] == 1
    assert row["window_redundancy"] == pytest.approx(64**3 / math.prod([18, 48, 48]), rel=1e-3)
    assert row["stages"]["infer"]["infer"]["windows"] == 1
    assert row["inference_efficiency"] > 0 and 0 < row["non_inference_share"] < 1
    assert 0 < row["non_inference_share_cpu_time"] < 1
    assert all(0 <= s["system_s"] <= s["cpu_s"] for s in row["stages"].values())
    assert row["total_system_s"] == pytest.approx(sum(s["system_s"] for s in row["stages"].values()), abs=0.01)
    if sys.platform == "linux":  # the hypervisor's share, per stage and in all (0 on bare metal)
        assert all(s["steal_s"] >= 0 for s in row["stages"].values())
        assert row["steal_s"] == pytest.approx(sum(s["steal_s"] for s in row["stages"].values()), abs=0.05)
    assert report["conv3d_ceiling"]["flops_per_s"] > 1e8
    # the wider conv3d beside the ceiling: the same inference measured against it
    wide = report["conv3d_wide"]
    assert wide["conv"].startswith("192->192 ch") and wide["flops_per_s"] > 1e8
    assert row["inference_efficiency_wide_conv"] == pytest.approx(
        row["inference_efficiency"] * report["conv3d_ceiling"]["flops_per_s"] / wide["flops_per_s"], rel=1e-2)
    text = (tmp_path / "bench.txt").read_text()
    for word in ("normalize", "export", "total", "sys s", "writing a new 3 MiB file", "FLOPs per voxel", "targets:",
                 "a wider conv3d ran at", "against the wider conv3d"):
        assert word in text
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())
    # the tomogram is reused by a second run
    before = (tmp_path / "data" / "tomo_24x64x64_15A.mrc").stat().st_mtime_ns
    bench.benchmark_tomograms(tmp_path / "data", [(24, 64, 64)], 15.0, (24, 64, 64))
    assert (tmp_path / "data" / "tomo_24x64x64_15A.mrc").stat().st_mtime_ns == before


def test_bench_measures_in_the_precision_asked_for(tmp_path):
    """The ceiling and the infer stage use the dtype the network will compute in."""
    commands = dict(bench.stage_commands(tmp_path / "t.mrc", tmp_path, 2, None, 0.25, "cpu", "bfloat16"))
    assert commands["infer"][commands["infer"].index("--precision") + 1] == "bfloat16"
    for precision, dtype in (("auto", "float32"), ("bfloat16", "bfloat16")):
        ceiling = bench.conv3d_ceiling("cpu", 2, repeats=1, channels=8, side=16, batch=1, precision=precision)
        assert ceiling["conv"].endswith(dtype) and ceiling["flops_per_s"] > 0


def test_targets_and_scaling_from_a_report():
    def row(voxels, seconds, rss_over_float32):
        rss = rss_over_float32 * 4 * voxels / 2**20
        stages = {s: {"wall_s": seconds / 7, "cpu_s": 1.0, "system_s": 0.1, "peak_rss_mb": rss,
                      "peak_rss_over_float32": rss_over_float32} for s in bench.STAGES}
        return {"shape_zyx": [voxels, 1, 1], "voxels": voxels, "stages": stages, "total_wall_s": seconds,
                "peak_rss_mb": rss, "inference_efficiency": 0.6, "non_inference_share": 0.2}

    # the small tomogram's ratio (interpreter overhead) does not count; the largest's does
    tomograms = [row(10**6, 10.0, 20.0), row(8 * 10**6, 80.0, 2.5)]
    tomograms[0]["peak_rss_mb"] = tomograms[1]["peak_rss_mb"] / 8
    report = {"tomograms": tomograms, "scaling": bench.scaling(tomograms), "settings": {"device": "cpu"},
              "snakemake_dryrun": {"tomograms": 1000, "wall_s": 12.0}}
    assert report["scaling"]["total_wall_s"] == pytest.approx(1.0)
    assert report["scaling"]["peak_rss_mb"] == pytest.approx(1.0)
    targets = bench.check_targets(report)
    assert all(t["pass"] for t in targets.values()), targets
    assert len(targets) == 6
    tomograms[1]["total_wall_s"] = 640.0  # quadratic
    report["scaling"] = bench.scaling(tomograms)
    assert not bench.check_targets(report)["time exponent"]["pass"]
    tomograms[1]["stages"]["export"]["peak_rss_over_float32"] = 3.5
    assert not bench.check_targets(report)["peak RSS / float32 tomogram (largest: export)"]["pass"]


def test_snakemake_dry_run_over_a_few_tomograms(tmp_path):
    result = bench.snakemake_dryrun(tmp_path, n_tomograms=3, per_dataset=2)
    if "skipped" in result:
        pytest.skip(result["skipped"])
    assert result["returncode"] == 0, result.get("error")
    assert result["jobs"] >= 3 * 7  # seven per-tomogram rules, plus aggregate


def test_parse_shape():
    assert bench.parse_shape("300x1024x1024") == (300, 1024, 1024)
    with pytest.raises(ValueError):
        bench.parse_shape("12x34")


FAULTS_OF_NEW_TENSORS = """
import resource, sys, torch
from vesicleflow.allocator import keep_freed_memory
if sys.argv[1] == "keep":
    assert keep_freed_memory()
faults = []
for _ in range(20):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    torch.ones(2**24)  # 64 MiB, freed at once
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(sum(faults[10:]))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc settings")
def test_infer_process_reuses_freed_memory_instead_of_faulting_it_in_again():
    """The 10 last of 20 new 64 MiB tensors: each faulted in page by page by default; with the infer
    stage's malloc settings they reuse the freed ones (glibc settles after a few aligned blocks)."""
    import subprocess

    def faults(mode):
        done = subprocess.run([sys.executable, "-c", FAULTS_OF_NEW_TENSORS, mode], capture_output=True,
                              text=True, check=True)
        return int(done.stdout.split()[-1])

    pages = 2**26 // 4096
    if faults("default") < 5 * pages:
        pytest.skip("this system does not fault freed 64 MiB blocks back in (huge pages?)")
    assert faults("keep") < pages
