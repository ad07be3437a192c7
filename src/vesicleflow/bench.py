"""bench: time every stage of the pipeline on tomograms of growing size (``make bench``).

For each tomogram size the stages run one after another as subprocesses, with the same
``vesicleflow`` commands and options the Snakemake rules use, so each stage's wall time, CPU time
and peak RSS are its own (``os.wait4`` gives the child's resource usage; the figures include the
process's start-up and imports, as every Snakemake job pays them).

Besides the per-stage table the benchmark reports

- inference throughput in model-grid voxels per second, and against the machine's ceiling: the
  network's FLOPs per voxel (counted by torch's FlopCounterMode: convolutions, 2 FLOPs per
  multiply-add) times the windows' redundancy (window voxels / model-grid voxels, from the tiling
  plan), over the throughput of one large conv3d measured here on the same device and threads;
- the share of the total time spent outside inference;
- the scaling exponent of time and of peak memory against voxel count (least-squares slope of
  log(y) against log(voxels) across sizes);
- each stage's peak RSS relative to the float32 size of the tomogram;
- Snakemake's own overhead: ``snakemake -n`` over many tiny tomograms.

Tomograms: one simulated tomogram (:func:`vesicleflow.simulate.simulate_tomogram`, ``BASE_SHAPE``
at the benchmark's voxel size) is mirror-tiled to each requested size: simulating 300 x 1024 x 1024
voxels directly takes far longer than the pipeline itself, and mirror tiling keeps the vesicle
density, the noise and the contrast of a real simulation. Generated files are kept in
``<out>/data`` and reused by later runs.
"""

from __future__ import annotations

import json
import logging
import math
import os
import platform
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)

DEFAULT_SHAPES = ((128, 256, 256), (200, 512, 512), (300, 1024, 1024))
#: A typical binned synapse tomogram (bin 4 of ~3.5-4 Å pixels); the model works at 20 Å.
DEFAULT_VOXEL_SIZE_ANGSTROM = 15.0
BASE_SHAPE = (128, 256, 256)
BASE_SEED = 2024
STAGES = ("normalize", "tile", "infer", "stitch", "postprocess", "spherefit", "export")
#: The large conv3d whose throughput is the ceiling: channels in = out, window side, batch.
CEILING_CONV = {"channels": 32, "side": 64, "batch": 4}
#: A wider conv3d, reported beside the ceiling: on this project's 2-core Xeon it ran 1.2-1.4x faster
#: than the ceiling's, nearer the cores' peak; the bundled model is 8-48 channels wide.
WIDE_CONV = {"channels": 192, "side": 16, "batch": 4}

#: Targets of issue 7 (2-core CPU, default settings).
TARGETS = {
    "inference_efficiency_min": 0.5,
    "non_inference_share_max": 0.25,
    "scaling_exponent_max": 1.1,
    "peak_rss_over_float32_max": 3.0,
    "snakemake_dryrun_s_max": 30.0,
    # on a GPU (mixed precision)
    "gpu_inference_voxels_per_s_min": 100e6,
    "gpu_pipeline_300x1024x1024_s_max": 60.0,
}


@dataclass
class StageRun:
    stage: str
    wall_s: float
    cpu_s: float
    peak_rss_mb: float
    returncode: int
    extra: dict = field(default_factory=dict)
    steal_s: float | None = None
    system_s: float = 0.0


def stolen_cpu_s() -> float | None:
    """CPU time the hypervisor has taken from this virtual machine since boot (all CPUs; the
    ``steal`` column of /proc/stat), or None where the system does not report it."""
    try:
        with open("/proc/stat") as handle:
            fields = handle.readline().split()
        return int(fields[8]) / os.sysconf("SC_CLK_TCK") if fields[0] == "cpu" and len(fields) > 8 else None
    except (OSError, ValueError, IndexError):
        return None


# ------------------------------------------------------------------------------------------------
# measuring


def parse_shape(text: str) -> tuple[int, int, int]:
    """'300x1024x1024' (z x y x x) -> (300, 1024, 1024)."""
    parts = text.lower().replace(",", "x").replace(" ", "x").split("x")
    shape = tuple(int(p) for p in parts if p)
    if len(shape) != 3 or min(shape) < 8:
        raise ValueError(f"a shape is Z x Y x X with every size >= 8, e.g. 128x256x256; got {text!r}")
    return shape


def fit_exponent(sizes, values) -> float | None:
    """Least-squares slope of log(values) against log(sizes); None with fewer than 2 sizes."""
    sizes, values = np.asarray(sizes, float), np.asarray(values, float)
    ok = (sizes > 0) & (values > 0)
    if len(np.unique(sizes[ok])) < 2:
        return None
    return float(np.polyfit(np.log(sizes[ok]), np.log(values[ok]), 1)[0])


def vesicleflow_command() -> list[str]:
    """The ``vesicleflow`` entry point of this interpreter's environment (the one the rules call)."""
    script = Path(sys.executable).parent / "vesicleflow"
    if script.is_file():
        return [str(script)]
    return [sys.executable, "-c", "import sys; from vesicleflow.cli import app; sys.argv[0] = 'vesicleflow'; app()"]


#: A minimal launcher (no site-packages, ~10 MB): Linux keeps the highest RSS a process had before
#: exec() in its ru_maxrss, so a stage forked straight from this (large) process would report this
#: process's RSS; forked from the launcher, it reports its own.
_LAUNCHER = r"""
import json, os, sys, time
began = time.perf_counter()
pid = os.fork()
if pid == 0:
    try:
        os.execvp(sys.argv[2], sys.argv[2:])
    except OSError as err:
        sys.stderr.write(f"cannot run {sys.argv[2]}: {err}\n")
    os._exit(127)
_, status, usage = os.wait4(pid, 0)
wall = time.perf_counter() - began
with open(sys.argv[1], "w") as handle:
    json.dump({"wall_s": wall, "cpu_s": usage.ru_utime + usage.ru_stime, "system_s": usage.ru_stime,
               "maxrss": usage.ru_maxrss,
               "returncode": os.waitstatus_to_exitcode(status)}, handle)
"""


def run_measured(command: list[str], log_path: Path, env: dict | None = None, stage: str = "") -> StageRun:
    """Run ``command`` as a child process; its wall time, CPU time (user + system) and peak RSS."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    usage_path = log_path.with_suffix(".usage.json")
    stolen_before = stolen_cpu_s()
    with open(log_path, "w") as handle:
        subprocess.run([sys.executable, "-I", "-S", "-c", _LAUNCHER, str(usage_path), *command],
                       stdout=handle, stderr=subprocess.STDOUT, env=env, check=False)
    if not usage_path.is_file():
        raise RuntimeError(f"the launcher of {command[0]} failed: {log_path.read_text(errors='replace')[-2000:]}")
    usage = json.loads(usage_path.read_text())
    usage_path.unlink()
    rss_mb = usage["maxrss"] / (2**20 if sys.platform == "darwin" else 1024)
    stolen_after = stolen_cpu_s()
    steal = stolen_after - stolen_before if stolen_before is not None and stolen_after is not None else None
    return StageRun(stage or command[0], usage["wall_s"], usage["cpu_s"], rss_mb, usage["returncode"], steal_s=steal,
                    system_s=usage["system_s"])


def new_file_write_cost(folder: Path, size_bytes: int = 2**30) -> dict:
    """Wall and system time of writing a new ``size_bytes`` file (1 MiB writes, no sync) in a scratch
    folder of ``folder`` that is then deleted.

    Each page of a new file written through the page cache is new memory (the stages now write
    their large files by direct I/O, but new arrays are new memory too). On a virtual machine whose
    host takes back the guest's free memory (virtio-balloon free page reporting) that memory must be
    supplied again, page by page: the same write then costs 10-40x more system time. This tells that
    state of the machine from a slow pipeline."""
    import resource

    from vesicleflow.io import pwrite_all, scratch_dir

    piece = np.ones(2**20, np.uint8)
    with scratch_dir(Path(folder) / "new_file_write_probe") as scratch:
        before, began = resource.getrusage(resource.RUSAGE_SELF).ru_stime, time.perf_counter()
        descriptor = os.open(scratch / "probe", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            for offset in range(0, size_bytes, piece.nbytes):
                pwrite_all(descriptor, piece[:size_bytes - offset], offset)
        finally:
            os.close(descriptor)
        wall = time.perf_counter() - began
        system = resource.getrusage(resource.RUSAGE_SELF).ru_stime - before
    return {"mib": round(size_bytes / 2**20, 1), "wall_s": round(wall, 3), "system_s": round(system, 3)}


def count_flops_per_voxel(net, window: int, device="cpu") -> float:
    """FLOPs of one forward pass per input voxel, counted by torch (convolutions: 2 per multiply-add)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    x = torch.zeros((1, 1, window, window, window), device=device)
    with FlopCounterMode(display=False) as counter, torch.inference_mode():
        net(x)
    return counter.get_total_flops() / window**3


def conv3d_ceiling(device: str = "cpu", threads: int | None = None, repeats: int = 3,
                   channels: int = CEILING_CONV["channels"], side: int = CEILING_CONV["side"],
                   batch: int = CEILING_CONV["batch"], precision: str = "auto") -> dict:
    """Throughput of one large 3x3x3 conv3d: the best of the default and channels-last-3d layouts,
    best of ``repeats`` after a warm-up; in the dtype inference computes in for ``precision``
    (:func:`vesicleflow.infer.compute_dtype`: by autocast on CUDA, as the convolution's own on the CPU).

    ``flops_per_s`` is per second of wall time; ``flops_per_cpu_s`` per second of CPU time (all
    threads), which a busy machine disturbs less."""
    import torch

    from vesicleflow.infer import autocast_to, compute_dtype, dtype_name, stored_dtype

    if threads:
        torch.set_num_threads(threads)
    dev = torch.device(device)
    dtype = compute_dtype(precision, dev)
    stored = stored_dtype(dev, dtype)
    conv = torch.nn.Conv3d(channels, channels, 3, padding=1).to(dev, stored).eval()
    x = torch.randn(batch, channels, side, side, side, device=dev).to(stored)
    flops = 2.0 * 27 * channels * channels * batch * side**3
    best, best_cpu = {}, {}
    for layout in ("contiguous", "channels_last_3d"):
        fmt = torch.channels_last_3d if layout == "channels_last_3d" else torch.contiguous_format
        c, xi = conv.to(memory_format=fmt), x.contiguous(memory_format=fmt)
        walls, cpus = [], []
        with torch.inference_mode(), autocast_to(dev, dtype):
            for _ in range(repeats + 1):
                if dev.type == "cuda":
                    torch.cuda.synchronize(dev)
                began, began_cpu = time.perf_counter(), time.process_time()
                c(xi)
                if dev.type == "cuda":
                    torch.cuda.synchronize(dev)
                walls.append(time.perf_counter() - began)
                cpus.append(time.process_time() - began_cpu)
        best[layout] = flops / min(walls[1:])
        best_cpu[layout] = flops / max(min(cpus[1:]), 1e-9)
    layout = max(best, key=best.get)
    return {"flops_per_s": best[layout], "flops_per_cpu_s": best_cpu[layout], "layout": layout,
            "by_layout": best, "conv": f"{channels}->{channels} ch, 3x3x3, {batch} x {side}^3, "
                                       + dtype_name(dtype)
                                       + (" autocast" if stored != dtype else "")}


def executed_flops_per_voxel(net, window: int) -> float:
    """FLOPs per voxel that the inference rewrite actually executes (fewer than the model's: the
    upsampling convolutions run as stride-2 transposed convolutions)."""
    from vesicleflow.infer import FastUNet

    try:
        return count_flops_per_voxel(FastUNet(net, fused=False, channels_last=False), window)
    except ValueError:
        return count_flops_per_voxel(net, window)


# ------------------------------------------------------------------------------------------------
# tomograms


def _mirror_indices(n_out: int, n_in: int) -> np.ndarray:
    """Indices 0..n_in-1 repeated as a mirror (0 1 .. n-1 n-1 .. 1 0 0 1 ..): seamless tiling."""
    i = np.arange(n_out) % (2 * n_in)
    return np.where(i < n_in, i, 2 * n_in - 1 - i)


def base_tomogram(data_dir: Path, voxel_size_angstrom: float, shape=BASE_SHAPE, seed: int = BASE_SEED) -> Path:
    """The simulated tomogram every benchmark volume is tiled from (simulated once, then reused)."""
    from vesicleflow.io import write_mrc
    from vesicleflow.simulate import simulate_tomogram

    path = Path(data_dir) / f"base_{'x'.join(map(str, shape))}_{voxel_size_angstrom:g}A_seed{seed}.mrc"
    if not path.is_file():
        log.info("simulating the base tomogram %s at %.2f Å", shape, voxel_size_angstrom)
        sim = simulate_tomogram(seed, shape, voxel_size_nm=voxel_size_angstrom / 10.0)
        write_mrc(path, sim.tomogram.astype(np.float32), voxel_size_angstrom)
    return path


def tiled_tomogram(base: Path, shape, path: Path, planes: int = 16) -> Path:
    """Write ``base`` mirror-tiled to ``shape`` (z, y, x) as a float32 MRC, a few planes at a time."""
    import mrcfile

    from vesicleflow.io import atomic_output

    with mrcfile.open(base, permissive=True) as mrc:
        source = np.asarray(mrc.data, dtype=np.float32)
        voxel = float(mrc.voxel_size.x)
    maps = [_mirror_indices(n, m) for n, m in zip(shape, source.shape)]
    rows = source[:, maps[1]][:, :, maps[2]] if shape[1:] != source.shape[1:] else source
    with atomic_output(path) as tmp, mrcfile.new_mmap(tmp, shape=tuple(shape), mrc_mode=2, overwrite=True) as mrc:
        for z0 in range(0, shape[0], planes):
            z1 = min(z0 + planes, shape[0])
            mrc.data[z0:z1] = rows[maps[0][z0:z1]]
        mrc.voxel_size = voxel
        mrc.update_header_stats()
    return path


def _mrc_shape(path: Path):
    import mrcfile

    try:
        with mrcfile.mmap(path, permissive=True, mode="r") as mrc:
            return tuple(int(n) for n in mrc.data.shape)
    except (OSError, ValueError):
        return None


def benchmark_tomograms(data_dir: Path, shapes, voxel_size_angstrom: float, base_shape=BASE_SHAPE) -> list[Path]:
    """One tomogram per shape in ``data_dir`` (reused when present with the right shape)."""
    data_dir.mkdir(parents=True, exist_ok=True)
    base = None
    paths = []
    for shape in shapes:
        path = data_dir / f"tomo_{'x'.join(map(str, shape))}_{voxel_size_angstrom:g}A.mrc"
        if _mrc_shape(path) != tuple(shape):
            base = base or base_tomogram(data_dir, voxel_size_angstrom, base_shape)
            began = time.perf_counter()
            tiled_tomogram(base, shape, path)
            log.info("wrote %s (%.1f s)", path, time.perf_counter() - began)
        paths.append(path)
    return paths


# ------------------------------------------------------------------------------------------------
# the pipeline, stage by stage


def stage_commands(tomogram: Path, work: Path, threads: int, batch_size: int | None, overlap: float,
                   device: str, precision: str = "auto") -> list[tuple[str, list[str]]]:
    """The commands of one tomogram's pipeline, as the Snakemake rules run them (default settings)."""
    w = {name: str(work / name) for name in ("normalized.zarr", "tiles.json", "shard_0.zarr",
                                              "probability.zarr", "labels.zarr", "spheres.csv", "export")}
    return [
        ("normalize", ["normalize", str(tomogram), w["normalized.zarr"], "--threads", str(threads)]),
        ("tile", ["tile", w["normalized.zarr"], w["tiles.json"], "--overlap", str(overlap), "--shards", "1"]),
        ("infer", ["infer", w["normalized.zarr"], w["tiles.json"], w["shard_0.zarr"], "--shard", "0",
                   *(["--batch-size", str(batch_size)] if batch_size else []), "--no-tta", "--device", device,
                   "--precision", precision, "--threads", str(threads)]),
        ("stitch", ["stitch", w["probability.zarr"], "--normalized", w["normalized.zarr"], w["shard_0.zarr"],
                    "--threads", str(threads)]),
        ("postprocess", ["postprocess", w["probability.zarr"], w["labels.zarr"], "--threshold", "0.5",
                         "--min-radius-nm", "8.0", "--max-radius-nm", "60.0", "--workers", str(threads)]),
        ("spherefit", ["spherefit", w["labels.zarr"], str(tomogram), w["spheres.csv"], "--workers", str(threads)]),
        ("export", ["export", w["spheres.csv"], w["labels.zarr"], str(tomogram), w["export"],
                    "--dataset", "bench", "--name", tomogram.stem, "--threads", str(threads)]),
    ]


def _infer_stats(log_path: Path) -> dict:
    from vesicleflow.infer import STATS_PREFIX

    for line in reversed(log_path.read_text(errors="replace").splitlines()):
        if STATS_PREFIX in line:
            try:
                return json.loads(line.split(STATS_PREFIX, 1)[1])
            except ValueError:
                return {}
    return {}


def run_pipeline(tomogram: Path, work: Path, threads: int = 2, batch_size: int | None = None, overlap: float = 0.25,
                 device: str = "auto", precision: str = "auto") -> list[StageRun]:
    """Run every stage on ``tomogram`` in a fresh ``work`` folder; stop at the first failure.

    Files are kept or deleted as the workflow keeps them: the inference shard, a temporary output,
    goes once stitched."""
    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)
    env = dict(os.environ)
    runs = []
    for stage, args in stage_commands(tomogram, work, threads, batch_size, overlap, device, precision):
        log.info("%s: %s", tomogram.name, stage)
        run = run_measured(vesicleflow_command() + args, work / "logs" / f"{stage}.log", env, stage)
        if stage == "infer":
            run.extra = _infer_stats(work / "logs" / "infer.log")
        runs.append(run)
        if run.returncode != 0:
            tail = (work / "logs" / f"{stage}.log").read_text(errors="replace")[-2000:]
            raise RuntimeError(f"{tomogram.name}: stage {stage} failed (exit {run.returncode}):\n{tail}")
        if stage == "stitch":  # the shard is the workflow's temp() output: Snakemake deletes it here
            shutil.rmtree(work / "shard_0.zarr")
    return runs


# ------------------------------------------------------------------------------------------------
# Snakemake's own overhead


def snakemake_dryrun(out: Path, n_tomograms: int = 1000, per_dataset: int = 100,
                     shape=(16, 32, 32), voxel_size_angstrom: float = 15.0) -> dict:
    """Wall time of ``snakemake -n`` over ``n_tomograms`` tiny tomograms (generated once, reused)."""
    import vesicleflow
    from vesicleflow.io import write_mrc

    repo = Path(vesicleflow.__file__).resolve().parents[2]
    snakefile = repo / "Snakefile"
    if not snakefile.is_file() or not (repo / "config" / "config.yaml").is_file():
        return {"skipped": f"no Snakefile beside the package ({repo}); run from a source checkout"}
    data = out / f"dryrun_{n_tomograms}" / "tomograms"
    names = [(f"dataset_{i // per_dataset:03d}", f"tomo_{i % per_dataset:04d}") for i in range(n_tomograms)]
    volume = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    for dataset, name in names:
        path = data / dataset / f"{name}.mrc"
        if not path.is_file():
            path.parent.mkdir(parents=True, exist_ok=True)
            write_mrc(path, volume, voxel_size_angstrom)
    work = out / f"dryrun_{n_tomograms}" / "work"
    if work.exists():
        shutil.rmtree(work)
    (work / "config").mkdir(parents=True)
    shutil.copy(repo / "config" / "config.yaml", work / "config" / "config.yaml")
    command = [sys.executable, "-m", "snakemake", "-s", str(snakefile), "-n", "--cores", "2", "--quiet", "rules",
               "--config", f"input_dir={data.resolve()}", f"output_dir={(work / 'results').resolve()}"]
    began = time.perf_counter()
    result = subprocess.run(command, cwd=work, capture_output=True, text=True)
    wall = time.perf_counter() - began
    jobs = 0
    for line in result.stdout.splitlines():
        parts = line.split()
        if len(parts) == 2 and parts[0] == "total" and parts[1].isdigit():
            jobs = int(parts[1])
    report = {"tomograms": n_tomograms, "wall_s": round(wall, 2), "jobs": jobs, "returncode": result.returncode}
    if result.returncode != 0:
        report["error"] = (result.stderr or result.stdout)[-2000:]
    return report


# ------------------------------------------------------------------------------------------------
# the benchmark


def _machine(device: str) -> dict:
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        mem_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    except (ValueError, OSError):
        mem_gib = float("nan")
    machine = {"cpu": cpu, "cores": os.cpu_count(), "memory_gib": round(mem_gib, 1),
               "python": platform.python_version(), "torch": torch.__version__, "device": device,
               "load_average": [round(x, 2) for x in os.getloadavg()]}
    if device.startswith("cuda"):
        machine["gpu"] = torch.cuda.get_device_name(torch.device(device))
    return machine


def summarize_tomogram(shape, model_shape, plan: dict, runs: list[StageRun], flops_per_voxel: float,
                       ceiling_flops: float, ceiling_flops_per_cpu_s: float | None = None) -> dict:
    """One tomogram's row of the report: stages, totals, inference throughput and efficiency."""
    voxels = math.prod(shape)
    model_voxels = math.prod(model_shape)
    float32_mb = 4 * voxels / 2**20
    stages = {r.stage: {"wall_s": round(r.wall_s, 3), "cpu_s": round(r.cpu_s, 3), "system_s": round(r.system_s, 3),
                        "peak_rss_mb": round(r.peak_rss_mb, 1),
                        "peak_rss_over_float32": round(r.peak_rss_mb / float32_mb, 3),
                        "steal_s": None if r.steal_s is None else round(r.steal_s, 2),
                        **({"infer": r.extra} if r.extra else {})}
              for r in runs}
    total = sum(r.wall_s for r in runs)
    infer = next(r for r in runs if r.stage == "infer")
    window_voxels = len(plan["windows"]) * plan["window"] ** 3
    redundancy = window_voxels / model_voxels
    ceiling_voxels = ceiling_flops / (flops_per_voxel * redundancy)
    forward_s = infer.extra.get("forward_s")
    summary = {
        "shape_zyx": list(shape), "voxels": voxels, "float32_mb": round(float32_mb, 1),
        "model_shape_zyx": list(model_shape), "model_voxels": model_voxels,
        "windows": len(plan["windows"]), "window": plan["window"], "overlap": plan["overlap"],
        "window_redundancy": round(redundancy, 3),
        "stages": stages,
        "total_wall_s": round(total, 3), "total_cpu_s": round(sum(r.cpu_s for r in runs), 3),
        "total_system_s": round(sum(r.system_s for r in runs), 3),
        "peak_rss_mb": round(max(r.peak_rss_mb for r in runs), 1),
        "non_inference_share": round((total - infer.wall_s) / total, 4),
        "non_inference_share_cpu_time": round(1 - infer.cpu_s / sum(r.cpu_s for r in runs), 4),
        "steal_s": None if any(r.steal_s is None for r in runs) else round(sum(r.steal_s for r in runs), 2),
        "inference_voxels_per_s": round(model_voxels / infer.wall_s),
        "inference_input_voxels_per_s": round(voxels / infer.wall_s),
        "inference_ceiling_voxels_per_s": round(ceiling_voxels),
        "inference_efficiency": round(model_voxels / infer.wall_s / ceiling_voxels, 4),
    }
    if ceiling_flops_per_cpu_s:  # CPU-time based: less sensitive to other processes on the machine
        summary["inference_efficiency_cpu_time"] = round(
            model_voxels * redundancy * flops_per_voxel / infer.cpu_s / ceiling_flops_per_cpu_s, 4)
    if forward_s:
        summary["forward_voxels_per_s"] = round(model_voxels / forward_s)
        summary["forward_efficiency"] = round(model_voxels / forward_s / ceiling_voxels, 4)
    if "gpu_peak_memory_mb" in infer.extra:
        summary["gpu_forward_s"] = forward_s
        summary["gpu_peak_memory_mb"] = infer.extra["gpu_peak_memory_mb"]
    return summary


def run_benchmark(out: str | Path, shapes=DEFAULT_SHAPES, voxel_size_angstrom: float = DEFAULT_VOXEL_SIZE_ANGSTROM,
                  threads: int = 2, batch_size: int | None = None, overlap: float = 0.25, device: str = "auto",
                  dryrun_tomograms: int = 1000, keep: bool = False, base_shape=BASE_SHAPE,
                  ceiling_side: int = CEILING_CONV["side"], probe_bytes: int = 2**30, precision: str = "auto") -> dict:
    """Generate (or reuse) the tomograms, run every stage on each, and write ``<out>/bench.json``
    and ``<out>/bench.txt`` (the table). Returns the report."""
    from vesicleflow.infer import compute_dtype, default_batch_size, dtype_name
    from vesicleflow.io import atomic_output, read_json, write_json
    from vesicleflow.model import load_model, pick_device

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    shapes = [tuple(int(n) for n in s) for s in shapes]
    torch_device = pick_device(device)
    dev = str(torch_device)
    batch_size = batch_size or default_batch_size(torch_device)
    compute = dtype_name(compute_dtype(precision, torch_device))
    began = time.perf_counter()
    report = {"machine": _machine(dev), "settings": {
        "voxel_size_angstrom": voxel_size_angstrom, "threads": threads, "batch_size": batch_size,
        "overlap": overlap, "device": dev, "precision": precision, "compute_dtype": compute,
        "base_tomogram": list(base_shape),
        "tomograms": "simulated base tomogram mirror-tiled to each shape"}}
    tomograms = benchmark_tomograms(out / "data", shapes, voxel_size_angstrom, base_shape)

    net, info = load_model(None, "cpu")
    flops_per_voxel = count_flops_per_voxel(net, info.window)
    executed = executed_flops_per_voxel(net, info.window)
    del net

    def ceiling_and_wide_conv() -> tuple[dict, dict]:
        return (conv3d_ceiling(dev, threads, side=ceiling_side, precision=precision),
                conv3d_ceiling(dev, threads, precision=precision, **WIDE_CONV))

    before_runs = ceiling_and_wide_conv()
    report["model"] = {"name": info.name, "voxel_size_angstrom": info.voxel_size_angstrom, "window": info.window,
                       "flops_per_voxel": flops_per_voxel, "executed_flops_per_voxel": executed}
    report["tomograms"] = []
    for tomogram in tomograms:
        work = out / "runs" / tomogram.stem
        runs = run_pipeline(tomogram, work, threads, batch_size, overlap, dev, precision)
        plan = read_json(work / "tiles.json")
        report["tomograms"].append({"tomogram": str(tomogram), "plan": plan, "runs": runs})
        log.info("%s: %.1f s in all", tomogram.name, sum(r.wall_s for r in runs))
        if not keep:
            shutil.rmtree(work)
    report["machine"]["new_file_write"] = new_file_write_cost(out, probe_bytes)
    # the ceiling is the machine's best: measured before and after the runs (a busy machine lowers it)
    ceilings, wide_convs = zip(before_runs, ceiling_and_wide_conv())
    ceiling = max(ceilings, key=lambda c: c["flops_per_s"])
    wide = max(wide_convs, key=lambda c: c["flops_per_s"])
    report["conv3d_wide"] = {"flops_per_s": round(wide["flops_per_s"]), "conv": wide["conv"], "layout": wide["layout"]}
    ceiling["flops_per_cpu_s"] = max(c["flops_per_cpu_s"] for c in ceilings)
    report["conv3d_ceiling"] = {**ceiling, "flops_per_s": round(ceiling["flops_per_s"]),
                                "flops_per_cpu_s": round(ceiling["flops_per_cpu_s"]),
                                "by_layout": {k: round(v) for k, v in ceiling["by_layout"].items()},
                                "measurements_gflops": [round(c["flops_per_s"] / 1e9, 1) for c in ceilings]}
    for i, (shape, row) in enumerate(zip(shapes, report["tomograms"])):
        summary = summarize_tomogram(shape, row["plan"]["shape"], row["plan"], row["runs"], flops_per_voxel,
                                     ceiling["flops_per_s"], ceiling["flops_per_cpu_s"])
        summary["inference_efficiency_wide_conv"] = round(
            summary["inference_efficiency"] * ceiling["flops_per_s"] / wide["flops_per_s"], 4)
        report["tomograms"][i] = {"tomogram": row["tomogram"], **summary}
    report["scaling"] = scaling(report["tomograms"])
    if dryrun_tomograms:
        report["snakemake_dryrun"] = snakemake_dryrun(out, dryrun_tomograms)
    report["targets"] = check_targets(report)
    report["bench_wall_s"] = round(time.perf_counter() - began, 1)
    report["machine"]["load_average_end"] = [round(x, 2) for x in os.getloadavg()]
    write_json(out / "bench.json", report)
    with atomic_output(out / "bench.txt") as tmp:
        tmp.write_text(format_report(report))
    return report


def scaling(tomograms: list[dict]) -> dict:
    """Exponents of wall time and peak RSS against voxel count: per stage and for the total."""
    voxels = [t["voxels"] for t in tomograms]
    result = {"total_wall_s": fit_exponent(voxels, [t["total_wall_s"] for t in tomograms]),
              "peak_rss_mb": fit_exponent(voxels, [t["peak_rss_mb"] for t in tomograms]), "stages": {}}
    for stage in STAGES:
        rows = [t["stages"].get(stage) for t in tomograms]
        if all(rows):
            result["stages"][stage] = {
                "wall_s": fit_exponent(voxels, [r["wall_s"] for r in rows]),
                "peak_rss_mb": fit_exponent(voxels, [r["peak_rss_mb"] for r in rows])}

    def rounded(value):
        if isinstance(value, dict):
            return {k: rounded(v) for k, v in value.items()}
        return round(value, 3) if isinstance(value, float) else value

    return rounded(result)


def check_targets(report: dict) -> dict:
    """Each target of issue 7 measured here: value, limit and pass/fail (CPU targets on the CPU only)."""
    tomograms = report["tomograms"]
    largest = max(tomograms, key=lambda t: t["voxels"])
    checks = {}
    if not report["settings"]["device"].startswith("cuda"):
        checks["inference efficiency (largest)"] = (largest["inference_efficiency"],
                                                    TARGETS["inference_efficiency_min"], ">=")
        checks["time outside inference (largest)"] = (largest["non_inference_share"],
                                                      TARGETS["non_inference_share_max"], "<=")
    else:
        # the forward passes alone, and the whole infer process (start-up, CUDA set-up, reads, writes)
        if "forward_voxels_per_s" in largest:
            checks["GPU inference forward passes, model-grid voxels/s (largest)"] = (
                largest["forward_voxels_per_s"], TARGETS["gpu_inference_voxels_per_s_min"], ">=")
        checks["GPU infer stage, model-grid voxels/s (largest)"] = (largest["inference_voxels_per_s"],
                                                                   TARGETS["gpu_inference_voxels_per_s_min"], ">=")
        for t in tomograms:
            if t["shape_zyx"] == [300, 1024, 1024]:
                checks["GPU whole pipeline 300x1024x1024 (s)"] = (t["total_wall_s"],
                                                                 TARGETS["gpu_pipeline_300x1024x1024_s_max"], "<=")
    if len(tomograms) >= 2:
        checks["time exponent"] = (report["scaling"]["total_wall_s"], TARGETS["scaling_exponent_max"], "<=")
        checks["memory exponent"] = (report["scaling"]["peak_rss_mb"], TARGETS["scaling_exponent_max"], "<=")
    # memory against the tomogram's size on the largest one: on small ones the interpreter's fixed
    # ~100-300 MB (numpy, zarr, torch) dominates any ratio
    stage, row = max(largest["stages"].items(), key=lambda kv: kv[1]["peak_rss_over_float32"])
    checks[f"peak RSS / float32 tomogram (largest: {stage})"] = (
        row["peak_rss_over_float32"], TARGETS["peak_rss_over_float32_max"], "<=")
    dry = report.get("snakemake_dryrun", {})
    if "wall_s" in dry:
        checks[f"snakemake -n over {dry['tomograms']} tomograms (s)"] = (dry["wall_s"],
                                                                          TARGETS["snakemake_dryrun_s_max"], "<=")
    return {name: {"value": value, "limit": limit,
                   "pass": bool(value is not None and (value >= limit if op == ">=" else value <= limit))}
            for name, (value, limit, op) in checks.items()}


def format_report(report: dict) -> str:
    """The human-readable table."""
    m = report["machine"]
    lines = [f"vesicleflow bench: {m['cpu']}, {m['cores']} cores, {m['memory_gib']} GiB, torch {m['torch']}, "
             f"device {m['device']}" + (f" ({m['gpu']})" if "gpu" in m else ""),
             f"load average at start {m['load_average']}, at end {m.get('load_average_end')}",
             f"writing a new {m['new_file_write']['mib']:g} MiB file after the runs: "
             f"{m['new_file_write']['wall_s']:.2f} s ({m['new_file_write']['system_s']:.2f} s system time; "
             "many seconds where the host must supply fresh memory, see README)",
             f"input voxel size {report['settings']['voxel_size_angstrom']:g} Å -> model grid "
             f"{report['model']['voxel_size_angstrom']:g} Å; window {report['model']['window']}, overlap "
             f"{report['settings']['overlap']}, batch {report['settings']['batch_size']}, "
             f"threads {report['settings']['threads']}, network in {report['settings']['compute_dtype']} "
             f"(precision {report['settings']['precision']}"
             + ("; the targets are for the default, auto)" if report['settings']['precision'] != "auto" else ")"),
             f"model: {report['model']['flops_per_voxel']:,.0f} FLOPs per voxel (counted; the inference rewrite "
             f"executes {report['model']['executed_flops_per_voxel']:,.0f}); conv3d ceiling "
             f"{report['conv3d_ceiling']['flops_per_s'] / 1e9:.1f} GFLOP/s ({report['conv3d_ceiling']['conv']}, "
             f"{report['conv3d_ceiling']['layout']})",
             f"a wider conv3d ran at {report['conv3d_wide']['flops_per_s'] / 1e9:.1f} GFLOP/s "
             f"({report['conv3d_wide']['conv']}); the targets use the ceiling above", ""]
    header = (f"{'stage':<12}{'wall s':>9}{'CPU s':>9}{'sys s':>8}{'peak RSS MB':>13}{'RSS/f32':>9}{'share':>8}"
              f"{'steal s':>9}")
    for t in report["tomograms"]:
        shape = "x".join(map(str, t["shape_zyx"]))
        model = "x".join(map(str, t["model_shape_zyx"]))
        lines += [f"tomogram {shape} ({t['voxels'] / 1e6:.1f} M voxels, {t['float32_mb']:.0f} MB float32) -> "
                  f"model grid {model} ({t['model_voxels'] / 1e6:.1f} M), {t['windows']} windows "
                  f"(redundancy {t['window_redundancy']:.2f})", header]
        for stage, row in t["stages"].items():
            steal = "" if row.get("steal_s") is None else f"{row['steal_s']:>9.2f}"
            lines.append(f"{stage:<12}{row['wall_s']:>9.2f}{row['cpu_s']:>9.2f}{row['system_s']:>8.2f}"
                         f"{row['peak_rss_mb']:>13.0f}"
                         f"{row['peak_rss_over_float32']:>9.2f}{row['wall_s'] / t['total_wall_s']:>8.1%}{steal}")
        steal = "" if t.get("steal_s") is None else f"{'':>17}{t['steal_s']:>9.2f}"
        lines.append(f"{'total':<12}{t['total_wall_s']:>9.2f}{t['total_cpu_s']:>9.2f}{t['total_system_s']:>8.2f}"
                     f"{t['peak_rss_mb']:>13.0f}{steal}")
        infer = t["stages"]["infer"].get("infer", {})
        extras = [f"forward only: {t['forward_efficiency']:.0%}"] if "forward_efficiency" in t else []
        if "inference_efficiency_cpu_time" in t:
            extras.append(f"by CPU time: {t['inference_efficiency_cpu_time']:.0%}")
        if "inference_efficiency_wide_conv" in t:
            extras.append(f"against the wider conv3d: {t['inference_efficiency_wide_conv']:.0%}")
        lines.append(f"inference: {t['inference_voxels_per_s'] / 1e6:.2f} M model voxels/s "
                     f"({t['inference_input_voxels_per_s'] / 1e6:.2f} M input voxels/s); ceiling "
                     f"{t['inference_ceiling_voxels_per_s'] / 1e6:.2f} M/s -> "
                     f"efficiency {t['inference_efficiency']:.0%}" + (f" ({'; '.join(extras)})" if extras else ""))
        if infer:
            lines.append(f"  infer breakdown: setup {infer.get('setup_s')} s, read {infer.get('read_s')} s, "
                         f"forward {infer.get('forward_s')} s, accumulate {infer.get('accumulate_s')} s, "
                         f"write {infer.get('write_s')} s"
                         + (f", GPU peak {infer['gpu_peak_memory_mb']} MB" if "gpu_peak_memory_mb" in infer else ""))
        lines.append(f"outside inference: {t['non_inference_share']:.1%} of the total wall time "
                     f"({t['non_inference_share_cpu_time']:.1%} of the CPU time)\n")
    s = report["scaling"]
    if s["total_wall_s"] is not None:
        lines.append(f"scaling exponent against voxels: time {s['total_wall_s']:.2f}, "
                     f"peak memory {s['peak_rss_mb']:.2f}")
        lines.append("  per stage (time / memory): " + ", ".join(
            f"{k} {v['wall_s']:.2f}/{v['peak_rss_mb']:.2f}" for k, v in s["stages"].items()))
    dry = report.get("snakemake_dryrun")
    if dry:
        lines.append(f"snakemake -n over {dry.get('tomograms')} tomograms: "
                     + (f"{dry['wall_s']:.1f} s, {dry['jobs']} jobs" if "wall_s" in dry else dry.get("skipped", "")))
    lines += ["", "targets:"]
    for name, check in report["targets"].items():
        lines.append(f"  {'PASS' if check['pass'] else 'FAIL'}  {name}: {check['value']} (limit {check['limit']})")
    if not report["settings"]["device"].startswith("cuda"):
        lines.append("  (GPU targets not measured: no CUDA device)")
    lines.append(f"\nbenchmark took {report['bench_wall_s']:.0f} s")
    return "\n".join(lines) + "\n"
