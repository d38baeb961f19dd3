"""The first hour of a new user (issue 17): image layouts people actually pass, the commands the
README names, the CLI's output files, one default n, the reported NLL, a quiet setup."""
from __future__ import annotations

import http.server
import json
import os
import re
import subprocess
import sys
import threading
import tomllib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw

from vce_deploy import Converter, InputError, preprocess_batch
from vce_deploy.cli import build_parser, main

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def converter():
    with Converter.load(backend="onnxruntime") as loaded:  # the shipped bundle
        yield loaded


def _glyph(mode: str, size=(105, 90), seed: int = 0) -> Image.Image:
    """A few dark strokes on white (RGBA: on a transparent background), like a scanned glyph."""
    background = (255, 255, 255, 0) if mode == "RGBA" else "white"
    image = Image.new(mode, size, background)
    draw, rng = ImageDraw.Draw(image), np.random.default_rng(seed)
    for _ in range(3):
        x0, y0, x1, y1 = rng.integers(10, 80, 4)
        draw.line((int(x0), int(y0), int(x1), int(y1)), fill=(20, 30, 200, 255)[:len(mode)], width=9)
    return image


# -- 1. colour arrays are one image, never a batch -------------------------------------------------

@pytest.mark.parametrize("mode", ["RGB", "RGBA"])
def test_a_colour_array_is_one_glyph_the_same_as_its_pil_image(converter, mode):
    image = _glyph(mode)
    array = np.asarray(image)  # (105, 90, 3 or 4) uint8: what np.asarray(Image.open(...)) gives
    got = converter.convert(array, n=4, seed=3)
    assert got.shape == (1, 4, 28, 28)
    assert np.array_equal(got, converter.convert(image, n=4, seed=3))
    assert np.array_equal(preprocess_batch(array), preprocess_batch(image))
    chunks = list(converter.convert_iter(array, n=4, seed=3))
    assert np.array_equal(np.concatenate(chunks), got)


def test_float_colour_arrays_and_colour_batches(converter):
    image = _glyph("RGBA")
    array = np.asarray(image)
    unit = array.astype(np.float32) / 255  # float RGBA in [0, 1]: composited and weighted like PIL
    assert np.mean(preprocess_batch(unit) != preprocess_batch(image)) < 0.01
    batch = np.stack([np.asarray(_glyph("RGB", seed=s)) for s in range(3)])  # (3, 105, 90, 3)
    assert converter.convert(batch, n=2, seed=0).shape == (3, 2, 28, 28)
    with pytest.raises(InputError, match="ambiguous"):
        preprocess_batch(np.zeros((2, 1, 28, 3), np.uint8))


# -- 2. empty arrays get the project's error -----------------------------------------------------

@pytest.mark.parametrize("shape", [(0, 0), (28, 0), (0, 28), (28, 0, 3), (0, 28, 28)])
@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.uint8, np.bool_])
def test_empty_arrays_give_an_input_error(converter, shape, dtype):
    with pytest.raises(InputError, match="non-empty|at least one"):
        converter.convert(np.zeros(shape, dtype), n=4)


# -- 4. one default n; inspect and verify default to the shipped bundle -----------------------------

def test_convert_without_n_uses_the_cli_default(converter, tmp_path):
    from vce_deploy import DEFAULT_N

    assert build_parser().parse_args(["convert", "a.png", "-o", "b.png"]).n == DEFAULT_N == 16
    path = tmp_path / "glyph.png"
    _glyph("L").save(path)
    assert converter.convert(str(path), seed=0).shape == (1, DEFAULT_N, 28, 28)


def test_inspect_and_verify_default_to_the_shipped_bundle(capsys):
    assert main(["inspect"]) == 0
    assert "default_bundle" in capsys.readouterr().out
    assert main(["verify", "--batch", "2"]) == 0
    assert "files match the manifest" in capsys.readouterr().out


# -- 5. the CLI's output file ------------------------------------------------------------------

@pytest.fixture()
def glyph_path(tmp_path) -> Path:
    path = tmp_path / "glyph.png"
    _glyph("L").save(path)
    return path


def test_the_output_format_follows_the_extension(glyph_path, tmp_path, capsys):
    for name, fmt in (("out.jpg", "JPEG"), ("out.JPEG", "JPEG"), ("out.png", "PNG")):
        assert main(["convert", str(glyph_path), "-n", "2", "--seed", "0", "-o", str(tmp_path / name)]) == 0
        with Image.open(tmp_path / name) as written:
            assert written.format == fmt
    capsys.readouterr()
    assert main(["convert", str(glyph_path), "-n", "2", "-o", str(tmp_path / "out.gif")]) == 1
    assert "expected a file name ending in one of .png, .jpg" in capsys.readouterr().err
    assert not (tmp_path / "out.gif").exists()


def test_a_missing_output_directory_is_refused_not_created(glyph_path, tmp_path, capsys):
    target = tmp_path / "missing" / "dir" / "x.png"
    assert main(["convert", str(glyph_path), "-n", "2", "-o", str(target)]) == 1
    assert "does not exist" in capsys.readouterr().err
    assert not (tmp_path / "missing").exists()


def test_large_n_wraps_the_grid_and_the_summary_counts_right(glyph_path, tmp_path, capsys):
    out = tmp_path / "wide.png"
    assert main(["convert", str(glyph_path), "-n", "100", "--seed", "0", "-o", str(out)]) == 0
    with Image.open(out) as written:
        # 101 cells (condition + 100) wrap at 33 per line: 4 lines; cells are 28 px + 2 px pad, scale 2
        assert written.size == (2 * (33 * 30 + 2), 2 * (4 * 30 + 2))
    assert "1 glyph x 100 variations" in capsys.readouterr().out
    assert main(["convert", str(glyph_path), str(glyph_path), "-n", "1", "-o", str(out)]) == 0
    assert "2 glyphs x 1 variation," in capsys.readouterr().out
    assert main(["convert", str(glyph_path), "-n", "1000000", "-o", str(out)]) == 1  # refused before converting
    assert "pixels in one image" in capsys.readouterr().err


# -- 6. progress without tqdm ------------------------------------------------------------------

def test_progress_without_tqdm_names_the_missing_package(converter, monkeypatch):
    from vce_deploy import DependencyError

    monkeypatch.setitem(sys.modules, "tqdm", None)  # import tqdm -> ImportError
    monkeypatch.setitem(sys.modules, "tqdm.auto", None)
    with pytest.raises(DependencyError, match="pip install tqdm") as caught:
        converter.convert_iter(np.zeros((28, 28), np.float32), n=2, progress=True)
    assert not isinstance(caught.value, InputError)
    dependencies = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    assert any(d.startswith("tqdm") for d in dependencies)


# -- 7. transfer too large: advice that works ----------------------------------------------------

def test_an_oversized_transfer_gets_advice_that_works(converter):
    glyph = np.zeros((28, 28), np.float32)
    glyph[8:20, 12:16] = 1
    with pytest.raises(InputError) as caught:
        converter.transfer(glyph, glyph, glyph, n=10**9)
    message = str(caught.value)
    assert "convert_iter" not in message and "transfer() calls" in message


# -- 8. the reported NLL and its protocol, readable ----------------------------------------------

def test_the_manifest_carries_the_reported_nll_and_inspect_prints_it_readably(capsys):
    from vce_deploy.bundle import Bundle

    reported = Bundle.load(verify=False).manifest.metrics["nll_reported"]
    # issue 12: K = 1000 for every reported figure, on all 1,318 targets of the paper's test split
    assert {k: reported["protocol"][k] for k in ("k", "targets", "split")} == {"k": 1000, "targets": 1318,
                                                                                 "split": "paper"}
    measured = json.loads((ROOT / "docs/measurements/nll_ship4_paper_fp32_k1000.json").read_text())
    assert reported["fp32"]["nll_mean"] == measured["nll_mean"]
    assert reported["fp32"]["nll_sem"] == measured["nll_sem_characters"], "the SE over characters is reported"
    readme = (ROOT / "README.md").read_text()
    assert f"{measured['nll_mean']:.2f} ± {measured['nll_sem_characters']:.2f}" in readme
    assert main(["inspect"]) == 0
    out = capsys.readouterr().out
    metrics = out[out.index("metrics:"):]
    assert re.search(r"NLL, reported: K = 1000; 1318 targets; paper split", metrics)
    assert f"fp32  NLL {measured['nll_mean']:.2f} ± {measured['nll_sem_characters']:.2f} nats" in metrics
    assert not any(line.lstrip().startswith(("{", '"')) or len(line) > 240 for line in metrics.splitlines())


def test_record_nll_reseals_and_refuses_a_partial_evaluation(tmp_path):
    import shutil

    from export.record_nll import record
    from vce_deploy.bundle import Bundle

    copy = tmp_path / "bundle"
    shutil.copytree(ROOT / "vce_deploy/default_bundle", copy)
    result = {"nll_mean": 100.0, "nll_sem": 1.0, "elbo_mean": 110.0, "elbo_sem": 1.5, "k": 50, "targets": 212,
              "seed": 1, "split": "small", "part": "test", "limit": None, "all_drawings": False}
    record(copy, [("fp32", result)])
    section = Bundle.load(copy).manifest.metrics["nll_reported"]  # verifies the new seal
    assert section["protocol"]["k"] == 50 and section["fp32"]["nll_mean"] == 100.0
    with pytest.raises(ValueError, match="not a reportable figure"):
        record(copy, [("fp32", dict(result, limit=10))])
    with pytest.raises(ValueError, match="not a reportable figure"):
        record(copy, [("fp32", dict(result, every=4))])  # a character subset is not the protocol either
    with pytest.raises(ValueError, match="differs"):
        record(copy, [("fp32", result), ("int8", dict(result, k=1000))])


def test_record_fidelity_puts_the_default_outputs_judged_score_in_the_manifest(tmp_path):
    import shutil

    from export.record_nll import main as record_main
    from vce_deploy import DEFAULT_TEMPERATURE
    from vce_deploy.bundle import Bundle

    shipped = Bundle.load(verify=False).manifest.metrics["fidelity_reported"]
    assert shipped["default_output"]["temperature"] == DEFAULT_TEMPERATURE, "re-record after changing the default"
    copy = tmp_path / "bundle"
    shutil.copytree(ROOT / "vce_deploy/default_bundle", copy)
    result = json.loads((ROOT / "docs/measurements/fidelity_forms_every4.json").read_text())
    source = tmp_path / "fidelity.json"
    source.write_text(json.dumps(result))
    assert record_main([str(copy), "--fidelity", str(source)]) == 0
    section = Bundle.load(copy).manifest.metrics["fidelity_reported"]  # verifies the new seal
    at_default = result["variations"][f"{DEFAULT_TEMPERATURE:g}"]["mean"]["top1"]
    assert section["default_output"]["top1"] == at_default and section["protocol"]["part"] == "test"
    for bad in (dict(result, protocol=dict(result["protocol"], part="validation")),
                dict(result, variations={"1": result["variations"]["1"]})):
        source.write_text(json.dumps(bad))
        assert record_main([str(copy), "--fidelity", str(source)]) == 1


# -- 9. a quiet build ------------------------------------------------------------------------

def test_packaging_config_is_the_non_deprecated_form():
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert isinstance(config["project"]["license"], str)  # SPDX string, not the deprecated table
    packages = set(config["tool"]["setuptools"]["packages"])
    shipped = {str(p.parent.relative_to(ROOT)).replace("/", ".") for p in (ROOT / "vce_deploy").rglob("*")
               if p.is_file() and "__pycache__" not in p.parts}
    assert shipped <= packages, f"directories shipped without being listed as packages: {shipped - packages}"


# -- 10. setup picks the CPU build of torch without a GPU ---------------------------------------

def _plan(tmp_path: Path, gpu: bool, index: str, choice: str = "auto") -> subprocess.CompletedProcess:
    fake = tmp_path / f"bin-{gpu}"
    fake.mkdir(exist_ok=True)
    (fake / "nvidia-smi").write_text(f"#!/bin/sh\n{'echo GPU 0' if gpu else 'exit 9'}\n")
    (fake / "nvidia-smi").chmod(0o755)
    env = dict(os.environ, PATH=f"{fake}:{os.environ['PATH']}", VCE_TORCH_CPU_INDEX=index, VCE_TORCH=choice)
    return subprocess.run(["bash", str(ROOT / "scripts/install_torch.sh"), sys.executable, "--dry-run"],
                          capture_output=True, text=True, env=env, timeout=60)


@pytest.fixture()
def cpu_index():
    """A local stand-in for https://download.pytorch.org/whl/cpu that answers /torch/."""
    class Index(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200 if self.path.rstrip("/").endswith("/torch") else 404)
            self.end_headers()

        def log_message(self, *args):
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), Index)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_port}/whl/cpu"
    server.shutdown()


def test_setup_takes_torch_from_the_cpu_index_when_there_is_no_gpu(tmp_path, cpu_index):
    plan = _plan(tmp_path, gpu=False, index=cpu_index)
    assert plan.returncode == 0, plan.stderr
    assert f"torch==2.13.0 --index-url {cpu_index}" in plan.stdout
    unreachable = _plan(tmp_path, gpu=False, index="http://127.0.0.1:9/whl/cpu")  # nothing listens there
    assert unreachable.returncode == 0 and "--index-url" not in unreachable.stdout
    assert "did not answer" in unreachable.stdout
    with_gpu = _plan(tmp_path, gpu=True, index=cpu_index)
    assert "--index-url" not in with_gpu.stdout and "CUDA" in with_gpu.stdout
    assert "--index-url" not in _plan(tmp_path, gpu=False, index=cpu_index, choice="cuda").stdout
    assert _plan(tmp_path, gpu=False, index=cpu_index, choice="rocm").returncode == 2
    assert "scripts/install_torch.sh" in (ROOT / "scripts/setup.sh").read_text()


# -- 11. the README's API snippet runs as written -------------------------------------------------

def test_the_readme_api_snippet_runs(tmp_path, monkeypatch):
    readme = (ROOT / "README.md").read_text()
    use_it = readme[readme.index("## Use it"):]
    snippet = use_it[use_it.index("```python") + len("```python"):use_it.index("```", use_it.index("```python") + 9)]
    for seed, name in enumerate(("glyph.png", "a.png", "a_bold.png", "b.png", "c.png")):
        _glyph("L", seed=seed).save(tmp_path / name)
    monkeypatch.chdir(tmp_path)
    scope: dict = {}
    exec(compile(snippet, "README.md (Use it)", "exec"), scope)  # noqa: S102 - our own README
    assert scope["y"].shape == (2, 4, 28, 28)
    assert scope["mu"].shape == (1, 56)
    width, height = Image.open(tmp_path / "grid.png").size  # y of convert: 1 glyph, 16 cells in a row
    assert width > 16 * 56 > height >= 56, "the snippet shows saving y (issue 22)"
    assert "its input is [x, q]" in snippet, "the snippet says why encode takes x first (issue 22)"
