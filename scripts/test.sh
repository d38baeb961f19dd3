#!/usr/bin/env bash
# Set everything up, then run the test suite (CPU only; GPU tests skip with a reason).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/setup.sh
exec .venv/bin/python -m pytest -q "$@"
