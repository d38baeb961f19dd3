"""The `vce` command: exit codes 0 / 1 / 2, a PNG from convert, inspect and verify output."""
from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from vce_deploy.cli import main

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture()
def glyph_files(tmp_path) -> list[Path]:
    paths = []
    for i, (rows, cols) in enumerate([(slice(8, 32), slice(18, 23)), (slice(18, 23), slice(8, 32))]):
        image = np.full((40, 40), 255, np.uint8)
        image[rows, cols] = 0
        paths.append(tmp_path / f"glyph{i}.png")
        Image.fromarray(image).save(paths[-1])
    return paths


def test_convert_writes_a_png_grid(bundle, glyph_files, tmp_path, capsys):
    out = tmp_path / "grid.png"
    code = main(["convert", *map(str, glyph_files), "-n", "3", "--seed", "0", "-o", str(out),
                 "--bundle", str(bundle), "--backend", "onnxruntime", "--precision", "fp32"])
    assert code == 0
    with Image.open(out) as image:
        assert image.format == "PNG"
        assert image.size == (2 * (4 * 30 + 2), 2 * (2 * 30 + 2))  # (1 + n) columns, 2 rows, scale 2
        pixels = np.asarray(image)
    assert pixels.min() < 128 < pixels.max()  # not a blank canvas
    stdout = capsys.readouterr().out
    assert "2 glyphs x 3 variations, seed 0" in stdout and "onnxruntime on cpu" in stdout


def test_convert_same_seed_writes_the_same_png(bundle, glyph_files, tmp_path):
    for name in ("a.png", "b.png"):
        assert main(["convert", str(glyph_files[0]), "-n", "4", "--seed", "7", "-o", str(tmp_path / name),
                     "--bundle", str(bundle), "--no-condition"]) == 0
    assert (tmp_path / "a.png").read_bytes() == (tmp_path / "b.png").read_bytes()


@pytest.mark.parametrize("argv", [
    [],
    ["convert"],
    ["convert", "x.png", "-o"],  # -o without its value (no -o at all is allowed: a default name, issue 22)
    ["convert", "x.png", "-o", "y.png", "--backend", "tensorflow"],
    ["convert", "x.png", "-o", "y.png", "-n", "many"],
    ["frobnicate"],
])
def test_bad_usage_exits_2(argv, capsys):
    assert main(argv) == 2
    assert "usage: vce" in capsys.readouterr().err


def test_errors_exit_1_with_one_line(bundle, tmp_path, capsys):
    not_image = tmp_path / "notes.png"
    not_image.write_text("hello")
    assert main(["convert", str(not_image), "-o", str(tmp_path / "g.png"), "--bundle", str(bundle)]) == 1
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith("vce convert: error:") and "expected a readable image" in err
    assert main(["convert", str(not_image), "-n", "0", "-o", str(tmp_path / "g.png"), "--bundle", str(bundle)]) == 1
    assert "n: expected an integer >= 1, got 0" in capsys.readouterr().err
    assert not (tmp_path / "g.png").exists()
    assert main(["inspect", str(tmp_path / "missing")]) == 1
    assert "does not exist" in capsys.readouterr().err


def test_inspect_lists_files_and_shapes(bundle, capsys):
    assert main(["inspect", str(bundle)]) == 0
    out = capsys.readouterr().out
    assert "encoder.onnx" in out and "convertor.onnx" in out
    assert "z[batch,56] float32, q[batch,1,28,28] float32 -> y[batch,1,28,28] float32" in out
    assert main(["inspect", str(bundle), "--json"]) == 0
    assert '"latent_dim": 56' in capsys.readouterr().out


def test_verify_checks_hashes_and_parity(bundle, tmp_path, capsys):
    assert main(["verify", str(bundle)]) == 0
    out = capsys.readouterr().out
    assert "files match the manifest" in out
    assert "parity fp32: max |onnxruntime - torch|" in out and ": ok" in out
    copy = tmp_path / "tampered"
    shutil.copytree(bundle, copy)
    onnx = copy / "encoder.onnx"
    onnx.write_bytes(onnx.read_bytes() + b"\0")
    assert main(["verify", str(copy)]) == 1
    assert "the file was changed" in capsys.readouterr().err


def test_verify_without_glyphs_skips_parity_and_says_why(bundle, tmp_path, capsys):
    assert main(["verify", str(bundle), "--data-dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "files match the manifest" in out and "parity: skipped (no Omniglot glyphs" in out


def test_python_dash_m_runs_the_cli():
    result = subprocess.run([sys.executable, "-m", "vce_deploy", "--help"], capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 0 and "convert" in result.stdout and "verify" in result.stdout
