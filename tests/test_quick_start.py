"""The Quick start (issue 22): the demo installs only what it runs, setup's torch step prints no
NumPy warning, and the README's demo figure is what the shipped bundle gives today."""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
import demo_figure  # noqa: E402  (scripts/ is not a package)


@pytest.mark.skipif(not demo_figure.ZIP.is_file(), reason=f"needs {demo_figure.ZIP}")
def test_the_readme_demo_figure_is_what_the_shipped_bundle_gives(tmp_path):
    """Regenerate with `python scripts/demo_figure.py`. A stale figure differed in 17,560 pixels; a
    few grey levels are allowed for fp32 rounding that differs between CPUs (AVX2, AVX-512, AMX)."""
    out = tmp_path / "grid.png"
    assert demo_figure.render(out) == 0
    fresh = np.asarray(Image.open(out).convert("L"), np.int16)
    committed = np.asarray(Image.open(demo_figure.FIGURE).convert("L"), np.int16)
    assert fresh.shape == committed.shape
    far = np.abs(fresh - committed) > 3
    assert far.mean() < 0.002, f"{far.sum()} pixels differ: run `python scripts/demo_figure.py` and commit it"


def test_the_demo_uses_a_runtime_only_venv_and_says_wrote_once():
    demo = (ROOT / "scripts/demo.sh").read_text()
    runtime_path = demo[demo.index("if [ -f vce_deploy/default_bundle/manifest.json ]"):demo.index("else")]
    assert "pip install --quiet -e .  #" in runtime_path and "[dev]" not in runtime_path
    assert "setup.sh" not in runtime_path, "the shipped-bundle path must not install the dev extra"
    echoes = [line for line in demo.splitlines() if line.lstrip().startswith("echo")]
    assert not any("wrote" in line for line in echoes), "vce convert already prints 'wrote PATH'"
    assert "--seed 0 --backend onnxruntime --precision fp32" in demo  # the figure's conversion


def test_install_torch_never_imports_torch(tmp_path):
    """After `pip install torch` numpy is not there yet: `import torch` would warn "Failed to initialize
    NumPy". A stand-in python whose pip does nothing and whose torch says when it is imported."""
    fake_torch = tmp_path / "site" / "torch"
    fake_torch.mkdir(parents=True)
    (fake_torch / "__init__.py").write_text("print('TORCH IMPORTED')\n")
    (fake_torch / "version.py").write_text("__version__ = '2.13.0+cpu'\ncuda = None\n")
    python = tmp_path / "python"
    python.write_text(f'#!/bin/sh\n[ "$1" = -m ] && [ "$2" = pip ] && exit 0\n'
                      f'PYTHONPATH={tmp_path / "site"} exec {sys.executable} "$@"\n')
    python.chmod(0o755)
    env = dict(os.environ, VCE_TORCH="cpu", VCE_TORCH_CPU_INDEX="http://127.0.0.1:9/whl/cpu")
    done = subprocess.run(["bash", str(ROOT / "scripts/install_torch.sh"), str(python)], capture_output=True,
                          text=True, env=env, timeout=60)
    assert done.returncode == 0, done.stderr
    assert "TORCH IMPORTED" not in done.stdout + done.stderr
    assert re.search(r"torch: installed 2\.13\.0\+cpu \(CUDA: cpu\)", done.stdout), done.stdout
