#!/usr/bin/env bash
# The GPU check (bench/gpu_check.py): bash scripts/gpu_check.sh OUT_DIR [--device cuda:N|cpu] [--quick]
# For a machine with an NVIDIA GPU, PyTorch and CuPy, no internet; TensorRT and onnxruntime-gpu
# parts run when installed and say "skipped: not installed" otherwise. At most 8 minutes: the
# sections stop starting after 7 (--budget-s 420) and the whole run is killed at 8.
# Writes OUT_DIR/gpu_check.json and OUT_DIR/gpu_check.md. `--device cpu` is the dry mode.
set -euo pipefail
cd "$(dirname "$0")/.."
out="${1:?usage: bash scripts/gpu_check.sh OUT_DIR [--device cuda:N|cpu] [--quick]}"
shift
python="${PYTHON:-python3}"
if [[ -x .venv/bin/python && -z "${PYTHON:-}" ]]; then python=.venv/bin/python; fi
PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" exec timeout 480 "$python" -m bench.gpu_check "$out" "$@"
