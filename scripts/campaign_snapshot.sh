#!/usr/bin/env bash
# Copy the CPU campaign's latest checkpoint (weights + optimiser state), its loss log and its
# validation NLLs into checkpoints/default/, where the next session resumes from:
#   bash scripts/campaign_snapshot.sh [RUN_DIR] [DEST]   (defaults runs/campaign, checkpoints/default)
# The next session resumes exactly where it stopped: docs/training.md, "The CPU campaign",
# gives the command (the same schedule flags as the run it continues).
set -euo pipefail
cd "$(dirname "$0")/.."
run=${1:-runs/campaign}
dest=${2:-checkpoints/default}
mkdir -p "$dest"
for f in checkpoint.safetensors checkpoint.json losses.csv validation.jsonl stage2.safetensors stage2.json; do
    if [ -f "$run/$f" ]; then
        cp "$run/$f" "$dest/.$f.tmp" && mv "$dest/.$f.tmp" "$dest/$f"
    fi
done
python3 -c "import json; m = json.load(open('$dest/checkpoint.json')); print('snapshot at step', m['step'], m['stage'])"
