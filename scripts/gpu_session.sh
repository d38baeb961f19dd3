#!/usr/bin/env bash
# One lent GPU session in one 10-minute device call (docs/edge.md "A lent GPU session"):
#   1. train the `gpu` preset for TRAIN_S seconds (default 300) on the Omniglot zips in
#      data/omniglot (git-ignored; the call names it in `carry`: ../shared does not travel);
#   2. pack the run folder into ONE archive, OUT/train_run.tar.gz (a call brings back 8 files);
#   3. run the GPU check (scripts/gpu_check.sh) in what is left of SESSION_S (default 560 s).
# OUT ends with 4 files: train_run.tar.gz, gpu_check.json, gpu_check.md, session.log.
#   bash scripts/gpu_session.sh --prepare   here, once: copies the zips into data/omniglot
#   bash scripts/gpu_session.sh "$OUT"      on the lent machine
# VCE_SESSION_DRY=1 runs the same steps on the CPU (smoke preset, `--device cpu --quick`): the tests.
# COMPILED_STEP=1 trains with the captured whole step (scripts/train_gpu.sh says what it is).
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "${1:-}" = --prepare ]; then
    mkdir -p data/omniglot
    cp -n ../shared/data/omniglot/*.zip ../shared/data/omniglot/SOURCE.md ../shared/data/omniglot/LICENSE data/omniglot/
    du -sh data/omniglot
    exit 0
fi
out=${1:?usage: bash scripts/gpu_session.sh OUT | --prepare}
mkdir -p "$out"
out=$(cd "$out" && pwd)
session_s=${SESSION_S:-560}
train_s=${TRAIN_S:-300}
start=$(date +%s)
run_dir=${RUN_DIR:-runs/gpu_session}  # git-ignored, never brought back as loose files
log="$out/session.log"
check_args=()
if [ "${VCE_SESSION_DRY:-0}" = 1 ]; then
    export VCE_TRAIN_GPU_DRY=1
    check_args=(--device cpu --quick)
fi
echo "[gpu_session] train ${train_s}s into $run_dir (compiled step: ${COMPILED_STEP:-0})" | tee -a "$log"
train_rc=0
TIME_LIMIT_S=$train_s bash scripts/train_gpu.sh "$run_dir" >>"$log" 2>&1 || train_rc=$?
echo "[gpu_session] training exit $train_rc" | tee -a "$log"
tar -czf "$out/train_run.tar.gz.tmp" -C "$(dirname "$run_dir")" "$(basename "$run_dir")"
mv "$out/train_run.tar.gz.tmp" "$out/train_run.tar.gz"
left=$(( session_s - ($(date +%s) - start) ))
echo "[gpu_session] packed $out/train_run.tar.gz; ${left}s left for the check" | tee -a "$log"
check_rc=0
if [ "$left" -gt 30 ]; then
    # sections stop starting 20 s before the end; timeout kills the check at the end
    PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" timeout "$left" "${PYTHON:-python3}" -m bench.gpu_check "$out" \
        "${check_args[@]}" --budget-s "$(( left - 20 ))" >>"$log" 2>&1 || check_rc=$?
else
    echo "[gpu_session] no time left for the GPU check" | tee -a "$log"
    check_rc=3
fi
echo "[gpu_session] check exit $check_rc; done in $(( $(date +%s) - start ))s" | tee -a "$log"
exit $(( train_rc != 0 ? train_rc : check_rc ))
