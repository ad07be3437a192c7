"""The workflow on a real SLURM: a single-node cluster started by tests/slurm/start-cluster.sh.

The cluster has one node (this machine: its CPUs and memory, plus one dummy GPU) and two
partitions, `cpu` (default) and `gpu`, the names profiles/slurm/config.yaml uses, so the
shipped profile runs unmodified; tests/slurm/test-profile only adapts it to a cluster
without accounting (squeue status) and to seconds-long jobs.

- test_toy_*: a stand-in workflow with the real rule names (tests/slurm/toy/Snakefile)
  records inside each job its SLURM job id, partition and GPU binding.
- test_demo_*: the real demo workflow under SLURM, with the first `infer` job killed by
  `scancel` while it runs; the retry in the profile must recover it, and the results
  must equal a run with profiles/local.

Needs root (or passwordless sudo) to install (Debian's slurmctld, slurmd, slurm-client,
munge) and start the cluster. Skips if SLURM cannot be installed, unless
VF_REQUIRE_SLURM=1 (CI). The cluster is stopped at the end unless it was already running
(VF_SLURM_KEEP=1 keeps it). Runs in about 5 minutes on 2 cores.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import pytest

pytestmark = [pytest.mark.slurm, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[1]
SLURM_DIR = REPO / "tests" / "slurm"
PROFILE = REPO / "profiles" / "slurm"
TEST_PROFILE = SLURM_DIR / "test-profile"
LOCAL_PROFILE = REPO / "profiles" / "local"
TOY = SLURM_DIR / "toy" / "Snakefile"
BIN = Path(sys.executable).parent

SUBMITTED = re.compile(r"has been submitted with SLURM jobid (\d+) \(log: (\S+?)\)\.?$", re.M)
RUN_ID = re.compile(r"SLURM run ID: (\S+)")


# --------------------------------------------------------------------------- helpers
def _env() -> dict[str, str]:
    """The environment for snakemake: this venv first on PATH (jobs inherit it via
    `sbatch --export=ALL`, and the rules call the `vesicleflow` CLI)."""
    env = dict(os.environ)
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}{os.pathsep}/usr/sbin"
    for var in list(env):
        if var.startswith("SLURM_"):  # not inside a SLURM job of some outer cluster
            del env[var]
    return env


def _as_root() -> list[str] | None:
    if os.geteuid() == 0:
        return []
    if shutil.which("sudo") and subprocess.run(["sudo", "-n", "true"]).returncode == 0:
        return ["sudo", "-n", "--preserve-env=VF_SLURM_STATE,VF_SLURM_TIMEOUT"]
    return None


def _tail(path: Path, lines: int = 60) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except FileNotFoundError:
        return f"({path} does not exist)"


def _snakemake(args: list[str], cwd: Path, log: Path) -> subprocess.Popen:
    cwd.mkdir(parents=True, exist_ok=True)
    out = open(log, "w")  # noqa: SIM115 - closed by the caller's wait()
    proc = subprocess.Popen(
        [str(BIN / "snakemake"), *args],
        cwd=cwd,
        stdout=out,
        stderr=subprocess.STDOUT,
        env=_env(),
        text=True,
    )
    proc.log_file = out  # type: ignore[attr-defined]
    return proc


def _wait(proc: subprocess.Popen, log: Path, timeout: float, what: str) -> None:
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.terminate()  # snakemake cancels its SLURM jobs on SIGTERM
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
        pytest.fail(f"{what} did not finish in {timeout:.0f}s:\n{_tail(log)}")
    finally:
        proc.log_file.close()  # type: ignore[attr-defined]
    assert proc.returncode == 0, f"{what} failed (exit {proc.returncode}):\n{_tail(log)}"


def _scontrol_job(job_id: str) -> dict[str, str]:
    """`scontrol show job -d` as a dict (finished jobs stay listed for MinJobAge=3600s)."""
    out = subprocess.run(
        ["scontrol", "-o", "-d", "show", "job", job_id],
        capture_output=True, text=True, env=_env(), check=True,
    ).stdout
    return dict(kv.split("=", 1) for kv in out.split() if "=" in kv)


def _submissions(log_text: str) -> list[tuple[str, str]]:
    """[(SLURM job id, rule_<rule> or group_<group>)] in submission order, from the
    plugin's log paths <logdir>/rule_<rule>/... and <logdir>/group_<group>_<rules>/..."""
    found = []
    for job_id, path in SUBMITTED.findall(log_text):
        kind = next(p for p in Path(path).parts if p.startswith(("rule_", "group_")))
        if kind.startswith("group_"):
            kind = "group_" + kind.split("_")[1]
        found.append((job_id, kind))
    return found


class Canceller(threading.Thread):
    """Waits until a job of this snakemake run whose comment starts with `prefix` has been
    RUNNING for `after` seconds, then `scancel`s it (once)."""

    def __init__(self, log: Path, prefix: str, after: float = 2.0):
        super().__init__(daemon=True)
        self.log, self.prefix, self.after = log, prefix, after
        self.cancelled: str | None = None
        self.comment: str | None = None
        self.stop = threading.Event()

    def run(self) -> None:
        run_id = None
        while not self.stop.wait(0.3):
            if run_id is None:
                match = RUN_ID.search(self.log.read_text(errors="replace"))
                if not match:
                    continue
                run_id = match.group(1)
            out = subprocess.run(
                ["squeue", "-h", "-t", "RUNNING", "-n", run_id, "-o", "%i|%k|%M"],
                capture_output=True, text=True, env=_env(),
            ).stdout
            for line in out.splitlines():
                job_id, comment, elapsed = line.split("|")
                seconds = sum(int(x) * 60**i for i, x in enumerate(reversed(elapsed.split(":"))))
                if comment.startswith(self.prefix) and seconds >= self.after:
                    subprocess.run(["scancel", job_id], env=_env(), check=True)
                    self.cancelled, self.comment = job_id, comment
                    return


# --------------------------------------------------------------------------- cluster
@pytest.fixture(scope="module")
def slurm_cluster():
    required = os.environ.get("VF_REQUIRE_SLURM") == "1"
    prefix = _as_root()
    if prefix is None:
        if required:
            pytest.fail("VF_REQUIRE_SLURM=1 but neither root nor passwordless sudo")
        pytest.skip("starting a SLURM cluster needs root or passwordless sudo")
    start = subprocess.run(
        [*prefix, "bash", str(SLURM_DIR / "start-cluster.sh")],
        capture_output=True, text=True, timeout=900,
    )
    output = start.stdout + start.stderr
    if start.returncode == 3 and not required:
        pytest.skip(f"SLURM could not be installed:\n{output[-2000:]}")
    assert start.returncode == 0, f"start-cluster.sh failed:\n{output}"
    already_running = "already running" in start.stdout
    yield
    if not already_running and os.environ.get("VF_SLURM_KEEP") != "1":
        subprocess.run([*prefix, "bash", str(SLURM_DIR / "stop-cluster.sh")], timeout=300)


# --------------------------------------------------------------------------- toy workflow
def test_toy_jobs_run_in_slurm_with_gpu_for_infer(slurm_cluster, tmp_path):
    """The profile's GPU request reaches the job: infer runs in partition `gpu` with a GPU
    bound (SLURM_JOB_GPUS, CUDA_VISIBLE_DEVICES), the CPU stages in `cpu` without; the
    small stages run as one `prepare` and one `finish` group job."""
    out = tmp_path / "toy"
    log = tmp_path / "snakemake.log"
    proc = _snakemake(
        ["-s", str(TOY), "--profile", str(PROFILE), "--profile", str(TEST_PROFILE),
         "--until", "stitch", "--config", f"output_dir={out}", "tomograms=1", "shards=1"],
        cwd=tmp_path, log=log,
    )
    _wait(proc, log, 240, "toy workflow under SLURM")

    def record(path: Path, rule: str) -> dict[str, str]:
        line = next(x for x in path.read_text().splitlines() if x.startswith(f"rule={rule} "))
        return dict(kv.split("=", 1) for kv in line.split())

    infer = record(out / "d/t0/shards/shard_0.txt", "infer")
    assert infer["partition"] == "gpu"
    assert infer["gpus"] == "0" and infer["cuda"] == "0", infer
    assert infer["cpus"] == "2", infer  # the rule's threads
    for rule, path in [("normalize", "tiles.txt"), ("tile", "tiles.txt"), ("stitch", "probability.txt")]:
        rec = record(out / "d/t0" / path, rule)
        assert rec["job"] != "none" and rec["partition"] == "cpu" and rec["gpus"] == "none", rec
    # normalize and tile ran in the same SLURM job (group prepare)
    assert record(out / "d/t0/tiles.txt", "normalize")["job"] == record(out / "d/t0/tiles.txt", "tile")["job"]

    subs = _submissions(log.read_text())
    assert Counter(kind for _, kind in subs) == {
        "group_prepare": 1, "rule_infer": 1, "group_finish": 1,
    }, subs
    job = _scontrol_job(infer["job"])
    assert job["Partition"] == "gpu" and job["JOB_GRES"] == "gpu:1", job


# --------------------------------------------------------------------------- demo workflow
@dataclass
class DemoRuns:
    data: Path
    slurm: Path
    local: Path
    slurm_log: Path
    cancelled: str | None
    cancelled_comment: str | None
    seconds: dict[str, float] = field(default_factory=dict)


@pytest.fixture(scope="module")
def demo_runs(slurm_cluster, tmp_path_factory) -> DemoRuns:
    """The demo data through the workflow twice, at the same time: under SLURM (with the
    first running `infer` job scancelled) and with profiles/local."""
    if not (REPO / "Snakefile").is_file():
        pytest.skip("no Snakefile yet")
    base = tmp_path_factory.mktemp("demo")
    data = base / "data"
    subprocess.run(
        [str(BIN / "vesicleflow"), "simulate", str(data), "--datasets", "1", "--tomograms", "2",
         "--shape", "48", "160", "160", "--seed", "3"],
        check=True, env=_env(), capture_output=True, timeout=300,
    )
    common = ["-s", str(REPO / "Snakefile"), "--configfile", str(REPO / "config/config.yaml")]
    runs = {}
    seconds = {}
    t0 = time.monotonic()
    for name, profiles, extra in [
        ("slurm", ["--profile", str(PROFILE), "--profile", str(TEST_PROFILE)], []),
        ("local", ["--profile", str(LOCAL_PROFILE)], ["--cores", "2"]),
    ]:
        work = base / name
        runs[name] = (
            _snakemake(
                [*common, *profiles, *extra, "--config",
                 f"input_dir={data / 'tomograms'}", f"output_dir={work / 'results'}"],
                cwd=work, log=base / f"{name}.log",
            ),
            base / f"{name}.log",
        )
    canceller = Canceller(base / "slurm.log", prefix="rule_infer_", after=1.0)
    canceller.start()
    try:
        for name in ("local", "slurm"):
            proc, log = runs[name]
            _wait(proc, log, 480, f"demo workflow ({name})")
            seconds[name] = time.monotonic() - t0
    finally:
        canceller.stop.set()
    return DemoRuns(
        data=data, slurm=base / "slurm" / "results", local=base / "local" / "results",
        slurm_log=base / "slurm.log", cancelled=canceller.cancelled,
        cancelled_comment=canceller.comment, seconds=seconds,
    )


def test_demo_jobs_ran_in_slurm_and_infer_got_a_gpu(demo_runs):
    """Every job went through sbatch: its SLURM log is named by its SLURM job id, SLURM
    knows the job, and every `infer` job was allocated a GPU in partition `gpu`. A
    tomogram costs prepare (shared) + 1 infer + 1 finish job."""
    text = demo_runs.slurm_log.read_text()
    subs = _submissions(text)
    assert subs, text[-3000:]
    for job_id, path in SUBMITTED.findall(text):
        assert Path(path).name == f"{job_id}.log" and Path(path).is_file(), path
    counts = Counter(kind for _, kind in subs)
    retried = 1 if demo_runs.cancelled else 0
    # 2 tomograms, 1 shard each: 1 prepare (both tomograms), 2 infer (+ the retry),
    # 2 finish, 1 aggregate
    assert counts == {
        "group_prepare": 1, "rule_infer": 2 + retried, "group_finish": 2, "rule_aggregate": 1,
    }, counts
    for job_id, kind in subs:
        job = _scontrol_job(job_id)
        if kind == "rule_infer":
            assert job["Partition"] == "gpu" and job.get("JOB_GRES") == "gpu:1", job
            assert job["Comment"].startswith("rule_infer_wildcards_dataset_a_tomo_0"), job
        else:
            assert job["Partition"] == "cpu" and job.get("JOB_GRES", "(null)") == "(null)", job


def test_demo_recovers_from_a_cancelled_slurm_job(demo_runs):
    """`scancel` on a running `infer` job: snakemake sees it CANCELLED, resubmits it
    (retries: 2 in the profile, attempt 2 gets more memory) and completes the run."""
    assert demo_runs.cancelled, "no infer job was seen running to cancel"
    text = demo_runs.slurm_log.read_text()
    assert re.search(rf"SLURM-job '{demo_runs.cancelled}' failed, SLURM status is: 'CANCELLED'", text)
    assert _scontrol_job(demo_runs.cancelled)["JobState"] == "CANCELLED"
    infer_jobs = [j for j, kind in _submissions(text) if kind == "rule_infer"]
    retry = [j for j in infer_jobs if j != demo_runs.cancelled
             and _scontrol_job(j)["Comment"] == demo_runs.cancelled_comment]
    assert len(retry) == 1, (infer_jobs, demo_runs.cancelled_comment)
    assert _scontrol_job(retry[0])["JobState"] == "COMPLETED"
    # the retry asked for more memory (the rules scale mem_mb with the attempt)
    mem = [int(_scontrol_job(j)["MinMemoryNode"].rstrip("M")) for j in (demo_runs.cancelled, retry[0])]
    assert mem[1] > mem[0], mem
    # the run is complete
    for tomo in ("tomo_01", "tomo_02"):
        assert (demo_runs.slurm / "dataset_a" / tomo / "vesicles.csv").is_file()
    assert (demo_runs.slurm / "summary" / "vesicles.csv").is_file()


def test_demo_slurm_results_equal_local_results(demo_runs):
    """The same vesicles, whether the stages ran as SLURM jobs (with a retried infer) or
    on this machine."""
    import pandas as pd
    from pandas.testing import assert_frame_equal

    tables = sorted(p.relative_to(demo_runs.local) for p in demo_runs.local.rglob("vesicles.csv"))
    assert len(tables) == 3, tables  # 2 tomograms + summary
    for rel in tables:
        local = pd.read_csv(demo_runs.local / rel)
        slurm = pd.read_csv(demo_runs.slurm / rel)
        assert_frame_equal(slurm, local, obj=str(rel))
