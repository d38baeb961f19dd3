"""scripts/gpu_check.sh in its dry mode (--device cpu --quick): the same sections as on a GPU,
on the CPU, so the script cannot rot on machines without one. It has NOT run on a GPU here."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_check_dry_mode_writes_every_section(tmp_path):
    out = tmp_path / "check"
    env = dict(os.environ, PYTHON=sys.executable)
    done = subprocess.run(["bash", str(ROOT / "scripts" / "gpu_check.sh"), str(out), "--device", "cpu", "--quick"],
                          capture_output=True, text=True, env=env, timeout=480)
    assert done.returncode == 0, done.stdout + done.stderr
    report = json.loads((out / "gpu_check.json").read_text())
    sections = report["sections"]
    assert list(sections) == ["environment", "parity", "seeds", "threads", "latency", "tensorrt", "onnxruntime_gpu"]
    assert sections["parity"]["status"] == "ok" and max(sections["parity"]["max_abs_diff_vs_cpu_fp32"].values()) <= 1e-3
    assert sections["seeds"]["same_seed_identical"] and sections["seeds"]["different_seed_differs"]
    assert sections["threads"] == {**sections["threads"], "status": "ok", "threads": 16, "mismatching_seeds": []}
    contenders = {row["contender"] for row in sections["latency"]["rows"]}
    assert {"eager PyTorch", "Converter engine"} <= contenders
    assert sections["tensorrt"]["status"] == "skipped: not installed"  # no TensorRT on this machine
    assert sections["onnxruntime_gpu"]["status"].startswith("skipped: not installed")
    assert "| latency | ok |" in (out / "gpu_check.md").read_text()


def test_gpu_check_without_a_gpu_points_to_the_dry_mode(tmp_path):
    import torch

    if torch.cuda.is_available():
        return  # a GPU is here: the real check runs instead
    env = dict(os.environ, PYTHON=sys.executable)
    done = subprocess.run(["bash", str(ROOT / "scripts" / "gpu_check.sh"), str(tmp_path / "x")],
                          capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 2 and "--device cpu" in done.stderr
