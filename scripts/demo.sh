#!/usr/bin/env bash
# Set everything up, then the main job: one never-seen glyph (a Japanese katakana character, a test
# alphabet) -> a PNG grid of 16 new handwritten variations, written to runs/demo/grid.png.
# Uses the shipped default bundle; without one, it trains and exports a smoke model first.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/setup.sh
mkdir -p runs/demo
.venv/bin/python - <<'PY'
import zipfile
from pathlib import Path
member = "images_background_small2/Japanese_(katakana)/character04/0599_01.png"
with zipfile.ZipFile(Path("..") / "shared/data/omniglot/images_background_small2.zip") as archive:
    Path("runs/demo/glyph.png").write_bytes(archive.read(member))
PY
bundle_args=()
if [ ! -f vce_deploy/default_bundle/manifest.json ]; then
    echo "no shipped default bundle: training and exporting the smoke model (draws noise, for plumbing only)"
    .venv/bin/python -m train --preset smoke --out runs/smoke --no-progress
    .venv/bin/python -m export runs/smoke/checkpoint.safetensors --out runs/smoke/bundle --precision fp32 int8
    bundle_args=(--bundle runs/smoke/bundle)
fi
.venv/bin/vce convert runs/demo/glyph.png -n 16 --seed 0 -o runs/demo/grid.png "${bundle_args[@]}"
echo "wrote runs/demo/grid.png (first column: the condition; then 16 variations)"
