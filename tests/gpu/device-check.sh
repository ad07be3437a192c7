#!/usr/bin/env bash
# Issue 7's GPU checks in one run, for a CUDA machine where vesicleflow's dependencies import
# (installed, or on PYTHONPATH): `vesicleflow bench` on CUDA (forward-pass and stage throughput,
# peak GPU memory, the whole pipeline up to a 300x1024x1024 tomogram) and the CUDA precision tests.
# Usage: tests/gpu/device-check.sh [OUT_DIR]   (default bench/gpu; DEVICE=cpu rehearses it here)
set -euo pipefail
cd "$(dirname "$0")/../.."
out=${1:-bench/gpu}
device=${DEVICE:-cuda}
mkdir -p "$out"
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
python=${PYTHON:-python3}

"$python" - "$device" <<'PY'
import sys, torch
device = sys.argv[1]
if device.startswith("cuda") and not torch.cuda.is_available():
    sys.exit("device-check: torch sees no CUDA device")
name = torch.cuda.get_device_name(0) if device.startswith("cuda") else "cpu"
print(f"device-check: torch {torch.__version__}, {name}")
PY

# both run whatever the other's outcome; the script fails if either did
status=0
"$python" -c 'import sys; from vesicleflow.cli import app; sys.argv[0] = "vesicleflow"; app()' \
    bench --out "$out" --device "$device" --threads "${THREADS:-$(nproc)}" --dryrun-tomograms 0 \
    ${BENCH_ARGS:-} 2>&1 | tee "$out/bench.log" || status=1
"$python" -m pytest -p no:cacheprovider -q tests/test_precision.py 2>&1 | tee "$out/precision-tests.log" || status=1
exit "$status"
