"""The wheel, installed in a clean virtual environment without torch or onnx: `vce build --help`
and `vce verify` (golden outputs) work from it. Slow (builds a wheel, pip-installs numpy,
onnxruntime and pillow from the package index): runs only with VCE_WHEEL_TEST=1."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.skipif(os.environ.get("VCE_WHEEL_TEST") != "1",
                                reason="slow (wheel + clean venv + pip install): set VCE_WHEEL_TEST=1")


def run(*args, cwd) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    return subprocess.run([str(a) for a in args], capture_output=True, text=True, cwd=cwd, env=env, timeout=900)


def test_wheel_builds_and_verifies_without_torch_or_onnx(tmp_path):
    dist = tmp_path / "dist"
    built = run(sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-w", dist, ROOT,
                cwd=tmp_path)
    assert built.returncode == 0, built.stderr[-2000:]
    wheel = next(dist.glob("vce_deploy-*.whl"))
    venv = tmp_path / "venv"
    assert run(sys.executable, "-m", "venv", venv, cwd=tmp_path).returncode == 0
    python, vce = venv / "bin" / "python", venv / "bin" / "vce"
    installed = run(python, "-m", "pip", "install", "--quiet", wheel, cwd=tmp_path)
    assert installed.returncode == 0, installed.stderr[-2000:]
    for module in ("torch", "onnx", "tensorrt"):
        assert run(python, "-c", f"import {module}", cwd=tmp_path).returncode != 0, f"{module} is in the clean venv"
    help_ = run(vce, "build", "--help", cwd=tmp_path)
    assert help_.returncode == 0 and "--min-batch" in help_.stdout and "--cache" in help_.stdout
    verify = run(vce, "verify", cwd=tmp_path)
    assert verify.returncode == 0, verify.stdout + verify.stderr
    for precision in ("fp32", "fp16", "int8"):
        assert f"golden {precision} onnxruntime on cpu: max |got - golden|" in verify.stdout
    assert "FAILED" not in verify.stdout and "parity against the checkpoint: skipped" in verify.stdout
    no_trt = run(vce, "build", "--precision", "fp16", cwd=tmp_path)
    assert no_trt.returncode == 1 and "TensorRT is not installed" in no_trt.stderr
