#!/usr/bin/env bash
# Installs Debian's chromium for tests/test_browser.py (the drawing page, end to end).
# Playwright's own browser download does not work here, so the test drives this binary
# (/usr/bin/chromium) through Playwright's executable_path. Idempotent; needs root (or sudo).
# .ci/run calls it before the tests: `bash scripts/install_browser.sh`.
set -euo pipefail
if command -v chromium >/dev/null 2>&1; then
    echo "chromium already installed: $(chromium --version 2>/dev/null || echo unknown version)"
    exit 0
fi
SUDO=""
if [ "$(id -u)" -ne 0 ]; then
    SUDO="sudo"
fi
$SUDO apt-get update -qq
DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends chromium
chromium --version
