#!/usr/bin/env bash
# Train the paper-scale VCE on one GPU in at most 9 minutes of wall time (the `gpu` preset:
# 16 episodes a step, bf16 autocast, a checkpoint every minute, a clean stop at 8.5 minutes).
#   bash scripts/train_gpu.sh OUT_DIR [extra `python -m train` flags]
# Needs only PyTorch with CUDA and the Omniglot zips: DATA_DIR, default data/omniglot in this repo
# (git-ignored, filled by `bash scripts/gpu_session.sh --prepare`, and named in the device call's
# `carry`: ../shared does not travel to a lent machine), else ../shared/data/omniglot here.
# TIME_LIMIT_S (default the preset's) caps the training; the hard stop is 45 s after it.
# Rerunning with the same OUT_DIR resumes from its checkpoint.
# COMPILED_STEP=1 runs the VAE stage through the captured whole step (--compiled-step true:
# torch.compile mode="reduce-overhead", CUDA graphs, capturable Adam; train/compiled_step.py).
# Off by default: not yet run or timed on a GPU, and compiling costs time out of the budget.
# VCE_TRAIN_GPU_DRY=1 runs the same path on the CPU with the smoke model (what the tests do).
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:?usage: bash scripts/train_gpu.sh OUT_DIR [flags]}
shift
if [ -z "${PYTHON:-}" ]; then
    PYTHON=python3
    [ -x .venv/bin/python ] && PYTHON=.venv/bin/python
fi
if [ -z "${DATA_DIR:-}" ]; then
    DATA_DIR=data/omniglot
    ls data/omniglot/*.zip >/dev/null 2>&1 || DATA_DIR=../shared/data/omniglot
fi
data_dir=$DATA_DIR
ls "$data_dir"/*.zip >/dev/null 2>&1 || { echo "train_gpu.sh: no Omniglot zips in $data_dir (expected data/omniglot/*.zip: run bash scripts/gpu_session.sh --prepare, and carry data/omniglot)" >&2; exit 2; }
if [ "${VCE_TRAIN_GPU_DRY:-0}" = 1 ]; then
    preset=(--preset smoke --device cpu --time-limit-s 60 --checkpoint-every-s 1)
else
    "$PYTHON" -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else "no CUDA GPU visible to PyTorch: use a GPU machine, or VCE_TRAIN_GPU_DRY=1")'
    preset=(--preset gpu)
fi
if [ "${COMPILED_STEP:-0}" = 1 ]; then
    preset+=(--compiled-step true)
fi
limit=()
hard_stop=560
if [ -n "${TIME_LIMIT_S:-}" ]; then
    limit=(--time-limit-s "$TIME_LIMIT_S" --checkpoint-every-s "$(( TIME_LIMIT_S < 60 ? 1 : 60 ))")
    hard_stop=$(( TIME_LIMIT_S + 45 ))
fi
mkdir -p "$out"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
# timeout is the hard stop; the preset's time limit stops well before it, checkpoint written
timeout --signal=INT "$hard_stop" "$PYTHON" -m train "${preset[@]}" "${limit[@]}" --out "$out" --data-dir "$data_dir" --no-progress "$@" \
    2>&1 | tee -a "$out/train_gpu.log"
"$PYTHON" - "$out" <<'PY'
import json, sys
from pathlib import Path
meta = json.loads((Path(sys.argv[1]) / "checkpoint.json").read_text())
print(f"checkpoint at step {meta['step']} ({meta['stage']}) in {sys.argv[1]}")
PY
