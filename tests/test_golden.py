"""Golden outputs: the bundle verifies itself without torch (vce_deploy/golden.py)."""
from __future__ import annotations

import io
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import fakegpu
from vce_deploy.bundle import DEFAULT_BUNDLE, Bundle, sha256_file, write_raw_manifest
from vce_deploy.cli import main as vce
from vce_deploy.errors import BundleError
from vce_deploy.golden import GOLDEN_FILE, load_golden

ROOT = Path(__file__).resolve().parents[1]
# torch and onnx made unimportable, as on a device with only the runtime installed
WITHOUT_TORCH = ("import sys; sys.modules.update(torch=None, onnx=None, onnxscript=None); "
                 "from vce_deploy.cli import main; sys.exit(main(sys.argv[1:]))")


def vce_without_torch(*args, cwd) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.run([sys.executable, "-c", WITHOUT_TORCH, *args], capture_output=True, text=True, env=env,
                          cwd=cwd, timeout=300)


@pytest.fixture
def copy(tmp_path) -> Path:
    target = tmp_path / "bundle"
    shutil.copytree(DEFAULT_BUNDLE, target)
    return target


def rewrite_golden(bundle: Path, edit) -> None:
    """Replace golden.npz with edit(arrays) and re-hash it in the manifest (a bad exporter)."""
    with np.load(bundle / GOLDEN_FILE, allow_pickle=False) as archive:
        arrays = {k: archive[k] for k in archive.files}
    buffer = io.BytesIO()
    np.savez(buffer, **edit(arrays))
    (bundle / GOLDEN_FILE).write_bytes(buffer.getvalue())
    import json

    raw = json.loads((bundle / "manifest.json").read_text())
    raw["files"][GOLDEN_FILE]["sha256"] = sha256_file(bundle / GOLDEN_FILE)
    write_raw_manifest(bundle, raw)


def test_shipped_bundle_verifies_against_its_goldens_without_torch(tmp_path):
    result = vce_without_torch("verify", cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    for precision in ("fp32", "fp16", "int8"):
        assert f"golden {precision} onnxruntime on cpu: max |got - golden|" in out
        assert f"golden {precision} onnxruntime on cpu" in out and "FAILED" not in out
        assert f"golden {precision} tensorrt on cuda:0: skipped (TensorRT is not installed" in out
    assert "parity against the checkpoint: skipped" in out


def test_golden_set_is_real_glyphs_hashed_in_the_manifest():
    bundle = Bundle.load(DEFAULT_BUNDLE)
    assert bundle.entries("golden")[0].path == GOLDEN_FILE
    golden = load_golden(bundle)
    x, q = golden.arrays["x"], golden.arrays["q"]
    assert golden.count >= 8 and set(np.unique(x)) == {0.0, 1.0}
    assert 0.03 < x.mean() < 0.5, "strokes on a blank page, not random noise"
    assert not np.array_equal(x, q), "target and condition are different drawings"


def test_outputs_off_the_golden_ones_fail_verify(copy, capsys):
    rewrite_golden(copy, lambda a: {**a, "y": a["y"] + np.float32(0.01)})
    assert vce(["verify", str(copy)]) == 1
    out = capsys.readouterr().out
    assert "golden fp32 onnxruntime on cpu" in out and "FAILED: y: 12544 of 12544 values outside" in out


def test_a_pickled_golden_file_is_refused(copy):
    rewrite_golden(copy, lambda a: {**a, "x": np.array([object()], dtype=object)})
    with pytest.raises(BundleError, match="expected an .npz of plain float32 arrays"):
        load_golden(Bundle.load(copy))


def test_no_goldens_and_no_torch_is_a_failure_not_a_pass(copy, tmp_path):
    import json

    raw = json.loads((copy / "manifest.json").read_text())
    del raw["files"][GOLDEN_FILE]
    write_raw_manifest(copy, raw)
    result = vce_without_torch("verify", str(copy), cwd=tmp_path)
    assert result.returncode == 1
    assert "no outputs were checked" in result.stderr


def test_verify_checks_every_engine_against_the_goldens(copy, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("VCE_ENGINE_CACHE", str(tmp_path / "engines"))
    fakegpu.install(monkeypatch)
    assert vce(["build", str(copy), "--precision", "int8"]) == 0
    capsys.readouterr()
    assert vce(["verify", str(copy)]) == 1  # the stand-in engine computes something else: caught
    out = capsys.readouterr().out
    assert "golden int8 tensorrt on cuda:0: max |got - golden|" in out and "FAILED" in out
    assert "golden fp16 tensorrt on cuda:0: skipped (no TensorRT engine at fp16" in out
