#!/usr/bin/env bash
# Install torch==2.13.0 into a venv, choosing the build for this machine (called by setup.sh).
#
#   bash scripts/install_torch.sh VENV_PYTHON [--dry-run]
#
# Without a GPU (no working `nvidia-smi`), the CPU build: from PyTorch's CPU wheel index
# (https://download.pytorch.org/whl/cpu) when it answers, so an ordinary machine never
# downloads the multi-GB CUDA build that a bare `pip install torch` takes from PyPI on Linux.
# When that index does not answer (offline mirrors, a local wheel house), plain pip with
# whatever index and find-links its configuration names; the script then says which build it
# got and warns if it is a CUDA build.
# With a GPU, the default PyPI build (CUDA). To choose yourself: VCE_TORCH=cpu or
# VCE_TORCH=cuda; for a particular CUDA version, install it first, e.g.
#   .venv/bin/pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128
# (setup.sh then keeps it: pip sees torch==2.13.0 already satisfied).
# --dry-run prints the decision and the pip command instead of running it.
set -euo pipefail
python=${1:?usage: install_torch.sh VENV_PYTHON [--dry-run]}
dry_run=${2:-}
version=2.13.0
cpu_index=${VCE_TORCH_CPU_INDEX:-https://download.pytorch.org/whl/cpu}
choice=${VCE_TORCH:-auto}

if [ "$choice" = auto ]; then
    if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
        choice=cuda
    else
        choice=cpu
    fi
fi
case "$choice" in
    cpu|cuda) ;;
    *) echo "install_torch.sh: VCE_TORCH: expected auto, cpu or cuda, got '$choice'" >&2; exit 2 ;;
esac

reachable() {  # does the index answer within a few seconds? (no internet: fails fast)
    "$python" - "$1" <<'PY' >/dev/null 2>&1
import sys, urllib.request
urllib.request.urlopen(sys.argv[1].rstrip("/") + "/torch/", timeout=5).close()
PY
}

pip=("$python" -m pip install --quiet "torch==$version")
if [ "$choice" = cuda ]; then
    why="a GPU answered nvidia-smi (or VCE_TORCH=cuda): the default PyPI build, with CUDA"
elif reachable "$cpu_index"; then
    # --index-url for torch alone, as PyTorch documents it: only CPU builds can be picked
    pip+=(--index-url "$cpu_index")
    why="no GPU: the CPU build from $cpu_index"
else
    why="no GPU, and $cpu_index did not answer: the CPU build from pip's configured sources (checked below)"
fi

echo "torch: $why"
if [ "$dry_run" = --dry-run ]; then
    echo "torch command: ${pip[*]}"
    exit 0
fi
"${pip[@]}"
# read torch/version.py without importing torch: numpy is not installed yet (setup.sh installs
# the project after torch), and `import torch` without numpy warns "Failed to initialize NumPy"
read -r installed build < <("$python" - <<'PY'
import importlib.util, pathlib, runpy
version = runpy.run_path(str(pathlib.Path(importlib.util.find_spec("torch").origin).with_name("version.py")))
print(version["__version__"], version["cuda"] or "cpu")
PY
)
echo "torch: installed $installed (CUDA: $build)"
if [ "$choice" = cpu ] && [ "$build" != cpu ]; then
    echo "torch: WARNING: asked for the CPU build but got a CUDA build ($build): the CPU wheel index was not" \
         "reachable. Reinstall with: $python -m pip install torch==$version --index-url $cpu_index" >&2
fi
