#!/usr/bin/env bash
# The main job, with only what it runs: one never-seen glyph (a Japanese katakana character, a
# test alphabet) -> a PNG grid of 16 new handwritten variations, written to runs/demo/grid.png.
# Uses the shipped default bundle in a runtime-only venv, .venv-runtime (the package's own
# dependencies: numpy, onnxruntime, pillow, tqdm; no torch, no dev extra), the same set a wheel
# user gets. Without a shipped bundle, it sets up the full .venv (scripts/setup.sh) and trains
# and exports the smoke model first (draws noise, for plumbing only).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
mkdir -p runs/demo
bundle_args=()
if [ -f vce_deploy/default_bundle/manifest.json ]; then
    venv=.venv-runtime
    [ -x "$venv/bin/python" ] || "$PYTHON" -m venv "$venv"
    stamp=$venv/.installed-$(sha256sum pyproject.toml | cut -c1-16)
    if [ ! -f "$stamp" ]; then
        "$venv/bin/python" -m pip install --quiet --upgrade pip
        "$venv/bin/python" -m pip install --quiet -e .  # runtime dependencies only
        rm -f "$venv"/.installed-* && touch "$stamp"
    fi
else
    echo "no shipped default bundle: training and exporting the smoke model (draws noise, for plumbing only)"
    source scripts/setup.sh
    venv=.venv
    .venv/bin/python -m train --preset smoke --out runs/smoke --no-progress
    .venv/bin/python -m export runs/smoke/checkpoint.safetensors --out runs/smoke/bundle --precision fp32 int8
    bundle_args=(--bundle runs/smoke/bundle)
fi
"$venv/bin/python" scripts/demo_figure.py --glyph runs/demo/glyph.png
# the conversion of docs/figures/demo_grid.png (scripts/demo_figure.py): seed 0, onnxruntime fp32
"$venv/bin/vce" convert runs/demo/glyph.png -n 16 --seed 0 --backend onnxruntime --precision fp32 -o runs/demo/grid.png "${bundle_args[@]}"
echo "(first column: the condition; then 16 variations)"
