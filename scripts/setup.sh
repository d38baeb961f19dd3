#!/usr/bin/env bash
# Sets up .venv with everything the project needs (idempotent). Sourced by demo.sh and test.sh.
# torch is pinned to 2.13.0 and installed first by install_torch.sh: the CPU build on a machine
# without a GPU (PyTorch's CPU wheel index where it answers), never the multi-GB CUDA build a bare
# `pip install torch` takes on Linux. CUDA build: VCE_TORCH=cuda (see install_torch.sh).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    "$PYTHON" -m venv .venv
fi
stamp=.venv/.installed-$(sha256sum pyproject.toml | cut -c1-16)
if [ ! -f "$stamp" ]; then
    .venv/bin/python -m pip install --quiet --upgrade pip
    bash scripts/install_torch.sh .venv/bin/python
    .venv/bin/python -m pip install --quiet -e ".[dev]"
    rm -f .venv/.installed-*
    touch "$stamp"
fi
