#!/usr/bin/env bash
# The long fuzz run recorded in docs/signing.md: every target under atheris, each input bounded
# in time (-timeout, seconds) and memory (-rss_limit_mb). libFuzzer stops at the first input
# that escapes with anything but a VCEError (crash-*), hangs (timeout-*) or blows memory (oom-*);
# "Done N in S second(s)" means N inputs and zero such findings. Findings land in $OUT.
#   scripts/fuzz_long.sh [RUNS_FAST] [RUNS_BUNDLE]     (defaults 100000 and 20000)
set -euo pipefail
cd "$(dirname "$0")/.."
RUNS_FAST=${1:-100000}
RUNS_BUNDLE=${2:-20000}
OUT=${OUT:-$(mktemp -d -t vce-fuzz-XXXX)}
PY=${PYTHON:-python}
for spec in "manifest $RUNS_FAST" "signature $RUNS_FAST" "preprocess $RUNS_FAST" "bundle $RUNS_BUNDLE"; do
  set -- $spec
  PYTHONPATH=$PWD "$PY" -m fuzz "$1" -atheris_runs="$2" -timeout=10 -rss_limit_mb=2048 -seed=1 \
    -artifact_prefix="$OUT/$1-" -print_final_stats=1 > "$OUT/$1.log" 2>&1 || { echo "$1: FINDING, see $OUT/$1.log"; exit 1; }
  echo "$1: $(grep -E '^Done [0-9]+ in' "$OUT/$1.log")"
done
