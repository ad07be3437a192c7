"""Faults: outputs appear atomically or not at all, a killed stage or workflow resumes to outputs
identical to an uninterrupted run, runs are deterministic on CPU, and a GPU out-of-memory error
halves the inference batch instead of failing.
"""

from __future__ import annotations

import ast
import json
import logging
import os
import re
import signal
import subprocess
import time
from pathlib import Path

import mrcfile
import numpy as np
import pandas as pd
import pytest
from conftest import REPO, VENV_BIN, cli_env, prepare_workdir, run_snakemake_isolated, snakemake_command

from vesicleflow.io import _HOST, atomic_output, scratch_dir
from vesicleflow.volumes import open_volume

# ------------------------------------------------------------------------------- atomic outputs


def test_a_failing_writer_leaves_the_old_output_and_no_temporary(tmp_path):
    target = tmp_path / "table.csv"
    target.write_text("old\n")
    with pytest.raises(RuntimeError), atomic_output(target) as tmp:
        tmp.write_text("half")
        raise RuntimeError("killed")
    assert target.read_text() == "old\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["table.csv"]


def test_atomic_output_replaces_files_and_folders(tmp_path):
    for target in (tmp_path / "a.json", tmp_path / "b.zarr"):
        for content in ("first", "second"):
            with atomic_output(target) as tmp:
                assert tmp.parent == target.parent and tmp.name.endswith(target.suffix)
                if target.suffix == ".zarr":
                    tmp.mkdir()
                    (tmp / "data").write_text(content)
                else:
                    tmp.write_text(content)
        assert (target / "data" if target.is_dir() else target).read_text() == "second"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.json", "b.zarr"]


def _dead_pid() -> int:
    process = subprocess.Popen(["true"])
    process.wait()
    return process.pid


def test_temporaries_of_killed_writers_are_removed_by_the_next_write(tmp_path):
    target = tmp_path / "labels.zarr"
    stale = tmp_path / f".labels.zarr.tmp-{_HOST}-{_dead_pid()}-0123abcd.zarr"
    stale.mkdir()
    stale_scratch = tmp_path / f".labels.zarr.tmp-scratch-{_HOST}-{_dead_pid()}-0123abcd.zarr"
    stale_scratch.mkdir()
    alive = tmp_path / f".labels.zarr.tmp-{_HOST}-{os.getpid()}-0123abcd.zarr"  # a live writer's: kept
    alive.mkdir()
    other_host = tmp_path / f".labels.zarr.tmp-elsewhere-{_dead_pid()}-0123abcd.zarr"  # can't tell: kept
    other_host.mkdir()
    with atomic_output(target) as tmp:
        tmp.mkdir()
    assert not stale.exists() and not stale_scratch.exists()
    assert alive.exists() and other_host.exists() and target.is_dir()


def test_scratch_folders_are_removed(tmp_path):
    with pytest.raises(KeyError), scratch_dir(tmp_path / "out.zarr") as scratch:
        (scratch / "x").write_text("1")
        raise KeyError
    assert list(tmp_path.iterdir()) == []


#: Calls that write a file's content (name, or (module, name) where the name alone is too common).
WRITE_CALLS = {"to_csv", "to_parquet", "to_json", "write_text", "write_bytes", "savefig", "save_file",
               "create_volume", "create_array", "tofile", "pwrite", "pwrite_all", "open_memmap", "ParquetWriter",
               "imwrite",
               ("np", "save"), ("np", "savez"), ("numpy", "save"), ("mrcfile", "new"), ("mrcfile", "new_mmap"),
               ("torch", "save")}
#: (module, function) pairs allowed to write without atomic_output, and why.
NON_ATOMIC_ALLOWED = {
    ("volumes.py", "create_volume"): "creates an array at the path its caller gives (an atomic temporary)",
    ("bench.py", "run_measured"): "a child process's log, streamed while it runs",
    ("normalize.py", "__init__"): "_PlaneFile: a raw file inside the scratch_dir normalize_to_grid creates and removes",
    ("io.py", "pwrite_all"): "writes into a file its caller opened (normalize's scratch, write_mrc_slabs' temporary)",
    ("normalize.py", "write"): "_PlaneFile: its raw scratch file (see __init__)",
    ("formats.py", "write_leaving_holes"): "writes into the temporary file write_mrc_slabs opened",
    ("io.py", "write"): "PageWriter: writes into a file its caller opened (write_mrc_slabs' temporary)",
    ("volumes.py", "write"): "ChunkFiles: chunk files of an array its caller created (an atomic temporary), as zarr's",
    ("infer.py", "__init__"): "_ShardWriter: the shard's arrays, inside the atomic temporary infer_shard opens",
}


def _non_atomic_writes(path: Path) -> list[str]:
    """Write calls in functions that use neither atomic_output nor scratch_dir."""
    found = []

    def uses_guard(function) -> bool:
        return any(isinstance(node, ast.Call) and getattr(node.func, "id", getattr(node.func, "attr", ""))
                   in ("atomic_output", "scratch_dir") for node in ast.walk(function))

    tree = ast.parse(path.read_text())
    functions = [f for f in ast.walk(tree) if isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef))]
    guarded = {id(inner) for outer in functions if uses_guard(outer) for inner in ast.walk(outer)}
    for function in functions:
        if id(function) in guarded or (path.name, function.name) in NON_ATOMIC_ALLOWED:
            continue
        for node in ast.walk(function):
            if not isinstance(node, ast.Call):
                continue
            name = getattr(node.func, "attr", getattr(node.func, "id", ""))
            receiver = getattr(getattr(node.func, "value", None), "id", "")
            mode = [a.value for a in node.args[1:2] if isinstance(a, ast.Constant)]
            mode += [k.value.value for k in node.keywords if k.arg == "mode" and isinstance(k.value, ast.Constant)]
            opens_for_writing = name == "open" and any(isinstance(m, str) and set(m) & set("wax+") for m in mode)
            opens_for_writing |= receiver == "os" and name == "open" and "O_CREAT" in ast.dump(node)
            if name in WRITE_CALLS or (receiver, name) in WRITE_CALLS or opens_for_writing:
                found.append(f"{path.name}:{node.lineno} {function.name}: {name}")
    return found


def test_every_writer_in_the_library_is_atomic():
    """Audit: every function that writes a file does so through atomic_output (or a scratch folder)."""
    offenders = [line for path in sorted((REPO / "src" / "vesicleflow").glob("*.py"))
                 for line in _non_atomic_writes(path)]
    assert offenders == [], "\n".join(offenders)


# ----------------------------------------------------------------------- killed stages (SIGKILL)

def _cli(*args) -> list[str]:
    return [str(VENV_BIN / "vesicleflow"), "--log-level", "WARNING", *map(str, args)]


def _kill_while_writing(command: list[str], output: Path, after_s: float, timeout: float = 300) -> bool:
    """Start ``command``; SIGKILL it ``after_s`` seconds after its temporary output appears (or when it
    ends). Returns whether it was killed while writing."""
    process = subprocess.Popen(command, env=cli_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + timeout
    prefix = f".{output.name}.tmp-"
    while process.poll() is None and time.monotonic() < deadline:
        if output.parent.is_dir() and any(p.name.startswith(prefix) for p in output.parent.iterdir()):
            time.sleep(after_s)
            break
        time.sleep(0.005)
    killed = process.poll() is None
    if killed:
        process.send_signal(signal.SIGKILL)
    process.wait(timeout=60)
    return killed


def _volume_bytes(path: Path) -> tuple[bytes, str]:
    """A zarr array's voxels and attributes (an inference shard: both of its arrays)."""
    if (path / "probability").is_dir():
        parts = [_volume_bytes(path / name) for name in ("probability", "weight") if (path / name).is_dir()]
        return b"".join(p[0] for p in parts), "".join(p[1] for p in parts)
    array = open_volume(path)
    return np.asarray(array[...]).tobytes(), json.dumps(dict(array.attrs), sort_keys=True)


@pytest.fixture(scope="module")
def stage_inputs(good_tomogram, model_copy, tmp_path_factory):
    """Reference outputs of normalize -> tile -> infer -> stitch -> postprocess, run once without faults."""
    from typer.testing import CliRunner

    from vesicleflow.cli import app

    out = tmp_path_factory.mktemp("reference")
    tomogram, mask = good_tomogram
    commands = {
        "normalize": ["normalize", tomogram, out / "normalized.zarr", "--model", model_copy],
        "tile": ["tile", out / "normalized.zarr", out / "tiles.json", "--model", model_copy, "--shards", "2"],
        "infer": ["infer", out / "normalized.zarr", out / "tiles.json", out / "shard_0.zarr", "--shard", "0",
                  "--model", model_copy, "--device", "cpu", "--threads", "2"],
        "infer1": ["infer", out / "normalized.zarr", out / "tiles.json", out / "shard_1.zarr", "--shard", "1",
                   "--model", model_copy, "--device", "cpu", "--threads", "2"],
        "stitch": ["stitch", out / "probability.zarr", "--normalized", out / "normalized.zarr",
                   out / "shard_0.zarr", out / "shard_1.zarr"],
        "postprocess": ["postprocess", out / "probability.zarr", out / "labels.zarr", "--mask", mask],
    }
    for args in commands.values():
        result = CliRunner().invoke(app, ["--log-level", "ERROR", *map(str, args)])
        assert result.exit_code == 0, (args[0], result.stderr, result.exception)
    outputs = {"normalize": out / "normalized.zarr", "infer": out / "shard_0.zarr",
               "stitch": out / "probability.zarr", "postprocess": out / "labels.zarr"}
    return out, commands, outputs


@pytest.mark.slow
@pytest.mark.parametrize("stage, after_s", [("normalize", 0.0), ("infer", 0.0), ("stitch", 0.0),
                                            ("postprocess", 0.0)])
def test_a_killed_stage_leaves_no_output_and_reruns_to_identical_results(stage, after_s, stage_inputs, tmp_path):
    """SIGKILL while the output is being written: nothing at the output path (its temporary is
    hidden), and the re-run writes exactly what an uninterrupted run wrote."""
    out, commands, outputs = stage_inputs
    reference = outputs[stage]
    target = tmp_path / reference.name
    args = [target if a == reference else a for a in commands[stage]]
    killed = _kill_while_writing(_cli(*args), target, after_s)
    leftovers = [p for p in tmp_path.iterdir() if p.name.startswith(f".{target.name}.tmp-")]
    if target.exists():  # only if the kill came after the final rename: then it must be complete
        assert _volume_bytes(target) == _volume_bytes(reference), "a killed writer left a partial output"
    if stage == "normalize":  # writing takes long enough here that the kill lands mid-write
        assert killed and leftovers and not target.exists()
    from typer.testing import CliRunner

    from vesicleflow.cli import app

    result = CliRunner().invoke(app, ["--log-level", "ERROR", *map(str, args)])  # the re-run
    assert result.exit_code == 0, (result.stderr, result.exception)
    assert _volume_bytes(target) == _volume_bytes(reference)
    assert not any(p.exists() for p in leftovers), "the re-run should remove the killed run's temporary"


def test_inference_is_deterministic_on_cpu(stage_inputs, tmp_path):
    """Same input, same threads: the same probabilities, bit for bit (on GPU see README: tolerance)."""
    from typer.testing import CliRunner

    from vesicleflow.cli import app

    out, commands, outputs = stage_inputs
    args = [tmp_path / "again.zarr" if a == out / "shard_0.zarr" else a for a in commands["infer"]]
    result = CliRunner().invoke(app, ["--log-level", "ERROR", *map(str, args)])
    assert result.exit_code == 0, result.stderr
    assert _volume_bytes(tmp_path / "again.zarr") == _volume_bytes(outputs["infer"])


# ---------------------------------------------------------------- GPU out of memory during infer

def test_out_of_memory_halves_the_batch_and_logs_it(stage_inputs, model_copy, tmp_path, monkeypatch, caplog):
    import torch

    from vesicleflow import infer
    from vesicleflow.tiling import tile_tomogram

    out, _, _ = stage_inputs
    plan = tile_tomogram(out / "normalized.zarr", tmp_path / "tiles.json", model_copy, window=32, shards=1)
    assert len(plan["windows"]) >= 8

    def run(output):
        infer.infer_shard(out / "normalized.zarr", tmp_path / "tiles.json", 0, output, model=model_copy,
                          batch_size=4, device="cpu", threads=2)

    run(tmp_path / "plain.zarr")
    real = infer.predict_batch
    calls = []

    def predict_or_run_out_of_memory(net, batch, *args, **kwargs):
        calls.append(len(batch))
        if len(batch) > 1:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return real(net, batch, *args, **kwargs)

    monkeypatch.setattr(infer, "predict_batch", predict_or_run_out_of_memory)
    with caplog.at_level(logging.WARNING, logger="vesicleflow.infer"):
        run(tmp_path / "backoff.zarr")
    assert 4 in calls and 2 in calls and 1 in calls
    messages = [r.getMessage() for r in caplog.records]
    assert "GPU out of memory with a batch of 4 windows; retrying with 2" in messages
    assert "GPU out of memory with a batch of 2 windows; retrying with 1" in messages
    # the same result, up to float rounding of other batch sizes (a one-shard plan: no weight array)
    np.testing.assert_allclose(open_volume(tmp_path / "backoff.zarr" / "probability")[...],
                               open_volume(tmp_path / "plain.zarr" / "probability")[...], atol=1e-5)


def test_out_of_memory_with_one_window_is_not_retried_forever(monkeypatch):
    import torch

    from vesicleflow import infer

    def always_out_of_memory(net, batch, *args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory (simulated)")

    monkeypatch.setattr(infer, "predict_batch", always_out_of_memory)
    with pytest.raises(torch.OutOfMemoryError):
        infer._predict_with_backoff(None, np.zeros((4, 8, 8, 8), np.float32), torch.device("cpu"), False)


# ------------------------------------------------------------------ a killed Snakemake run resumes

def _wait_for(condition, process, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and process.poll() is None:
        if condition():
            return True
        time.sleep(0.05)
    return condition()


def _tomogram_results(folder: Path) -> dict:
    """Everything of one tomogram's results that must not depend on interruptions."""
    with mrcfile.open(folder / "labels.mrc") as mrc:
        labels = mrc.data.tobytes()
    return {
        "vesicles.csv": (folder / "vesicles.csv").read_bytes(),
        "spheres.csv": (folder / "spheres.csv").read_bytes(),
        "labels.mrc": labels,
        "probability.zarr": _volume_bytes(folder / "probability.zarr")[0],
        "normalized.zarr": _volume_bytes(folder / "normalized.zarr")[0],
        "labels.zarr": _volume_bytes(folder / "labels.zarr")[0],
    }


@pytest.mark.slow
def test_a_killed_workflow_resumes_to_the_same_results(mixed_run, good_tomogram, model_copy, tmp_path):
    """SIGKILL the whole Snakemake run during inference, unlock, re-run with --rerun-incomplete: the
    results equal those of the uninterrupted run (mixed_run's `good ü 1`), byte for byte."""
    data = tmp_path / "input" / "mixed"
    data.mkdir(parents=True)
    tomogram, mask = good_tomogram
    (data / "good ü 1.mrc").write_bytes(tomogram.read_bytes())
    (data / "good ü 1_mask.mrc").write_bytes(mask.read_bytes())
    results = tmp_path / "results"
    config = ["--config", f"input_dir={tmp_path / 'input'}", f"output_dir={results}", f"model={model_copy}"]
    workdir = tmp_path / "wd"
    prepare_workdir(workdir)
    process = subprocess.Popen(snakemake_command("--profile", str(REPO / "profiles" / "local"), "--cores", "2",
                                                 *config), cwd=workdir, env=cli_env(), start_new_session=True,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    infer_log = results / "logs" / "infer" / "mixed" / "good ü 1" / "shard_0.log"
    started = _wait_for(infer_log.exists, process, timeout=600)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait(timeout=60)
    assert started, "the run ended before inference started"
    folder = results / "mixed" / "good ü 1"
    assert (folder / "normalized.zarr").is_dir() and not (folder / "vesicles.csv").exists()

    unlock = run_snakemake_isolated(workdir, "--unlock", *config)
    assert unlock.returncode == 0, unlock.stderr[-2000:]
    resumed = run_snakemake_isolated(workdir, "--profile", str(REPO / "profiles" / "local"), "--cores", "2",
                                     "--rerun-incomplete", *config)
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    assert "normalize" not in _jobs_run(resumed), "finished stages must not run again"
    reference = _tomogram_results(mixed_run["results"] / "mixed" / "good ü 1")
    assert _tomogram_results(folder) == reference
    assert not list(folder.rglob(".*.tmp-*")), "temporaries of the killed jobs must be gone"
    table = pd.read_csv(folder / "vesicles.csv")
    assert (table["tomogram"] == "good ü 1").all()


def _jobs_run(result: subprocess.CompletedProcess) -> set[str]:
    text = result.stdout + result.stderr
    return set(re.findall(r"^(?:local)?rule (\w+):", text, flags=re.M))

