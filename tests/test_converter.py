"""Converter and backends: determinism, parity with the eager reference, batching, threads,
and a clear error for every kind of bad input."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import types
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

from vce_deploy import (BackendError, BundleError, Converter, EngineMismatchError, InputError, VCEError,
                        save_conversions)
from vce_deploy.backends import HostLatentSampler
from vce_deploy.backends import cuda as cuda_helpers
from vce_deploy.backends import tensorrt as trt_backend
from vce_deploy.backends.base import compare_io, physical_cores
from vce_deploy.bundle import EngineInfo, FileEntry, TensorSpec, write_raw_manifest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def converter(bundle) -> Converter:
    return Converter.load(bundle, backend="onnxruntime", device="cpu")


@pytest.fixture(scope="session")
def glyphs() -> np.ndarray:
    """Three glyph-like uint8 images of different content, light background, 40x40."""
    images = np.full((3, 40, 40), 255, np.uint8)
    images[0, 8:32, 18:23] = 0  # |
    images[1, 18:23, 8:32] = 0  # -
    images[2, 8:32, 8:13] = 0  # L
    images[2, 28:33, 8:30] = 0
    return images


# -- import hygiene ---------------------------------------------------------------------------

def test_import_does_not_import_torch_or_onnxruntime():
    code = ("import sys, vce_deploy; from vce_deploy import Converter; "
            "bad = [m for m in ('torch', 'onnxruntime', 'openvino', 'tensorrt', 'cupy') if m in sys.modules]; "
            "assert not bad, bad")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 0, result.stderr


# -- noise and small pieces that need no bundle --------------------------------------------------

def test_latent_sampler_chunks_continue_one_sequence():
    whole = HostLatentSampler(7).draw(30, 56, 1.0)
    sampler = HostLatentSampler(7)
    parts = np.concatenate([sampler.draw(10, 56, 1.0), sampler.draw(20, 56, 1.0)])
    assert np.array_equal(whole, parts)
    assert not np.array_equal(whole, HostLatentSampler(8).draw(30, 56, 1.0))
    assert np.allclose(HostLatentSampler(7).draw(30, 56, 0.5), 0.5 * whole)


def test_physical_cores_is_a_positive_count():
    assert 1 <= physical_cores() <= (os.cpu_count() or 1)


def test_compare_io_lists_every_mismatch():
    image = TensorSpec("q", ("batch", 1, 28, 28), "float32")
    entry = FileEntry("convertor.onnx", "0" * 64, "convertor", "onnx",
                      inputs=(TensorSpec("z", ("batch", 56), "float32"), image),
                      outputs=(TensorSpec("y", ("batch", 1, 28, 28), "float32"),))
    good_in = {"z": (("batch", 56), "float32"), "q": (("N", 1, 28, 28), "float32")}
    compare_io(entry, good_in, {"y": ((None, 1, 28, 28), "float32")}, "here")  # dynamic axes match anything
    bad_in = {"z": (("batch", 64), "float16"), "q": (("batch", 1, 28, 28), "float32")}
    with pytest.raises(BundleError) as err:
        compare_io(entry, bad_in, {"out": (("batch", 1, 28, 28), "float32")}, "here")
    message = str(err.value)
    assert "'z' dtype: manifest float32, model float16" in message
    assert "'z' shape: manifest ['batch', 56], model ['batch', 64]" in message
    assert "output names: manifest ['y'], model ['out']" in message


# -- loading and the choice of backend ---------------------------------------------------------

def test_auto_here_is_onnxruntime_on_cpu_and_says_why(bundle):
    converter = Converter.load(bundle)
    info = converter.backend_info
    assert (info.name, info.device, info.precision) == ("onnxruntime", "cpu", "fp32")
    assert "tensorrt skipped" in info.reason  # no engine, no TensorRT, no GPU here
    assert "CPUExecutionProvider" in info.detail
    assert "onnxruntime on cpu" in str(info)


def test_default_bundle_missing_is_a_clear_error(monkeypatch, tmp_path):
    import vce_deploy.bundle as bundle_module

    monkeypatch.setattr(bundle_module, "DEFAULT_BUNDLE", tmp_path / "absent")
    with pytest.raises(BundleError, match="no default bundle"):
        Converter.load()


@pytest.mark.parametrize("kwargs, expected", [
    ({"backend": "tensorflow"}, "backend: expected one of"),
    ({"backend": None}, "backend: expected one of"),
    ({"precision": "fp64"}, "precision: expected one of"),
    ({"device": "gpu"}, "device: expected None, 'cpu'"),
    ({"max_batch": 0}, "max_batch: expected an integer >= 1, got 0"),
    ({"max_batch": 2.0}, "max_batch: expected an integer >= 1, got 2.0"),
    ({"threads": -1}, "threads: expected an integer >= 1"),
])
def test_bad_load_arguments(bundle, kwargs, expected):
    with pytest.raises(InputError, match=expected):
        Converter.load(bundle, **kwargs)


def test_missing_and_tampered_bundles(bundle, tmp_path):
    with pytest.raises(BundleError, match="does not exist"):
        Converter.load(tmp_path / "nowhere")
    copy = tmp_path / "copy"
    shutil.copytree(bundle, copy)
    target = copy / "convertor.onnx"
    data = bytearray(target.read_bytes())
    data[-1] ^= 0xFF
    target.write_bytes(bytes(data))
    with pytest.raises(BundleError, match=r"'convertor.onnx' has sha256 .* the file was changed"):
        Converter.load(copy)
    target.unlink()
    with pytest.raises(BundleError, match="the file is missing"):
        Converter.load(copy)


def test_precision_missing_from_bundle_names_what_it_has(bundle, tmp_path):
    copy = tmp_path / "fp32_only"
    shutil.copytree(bundle, copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["files"] = {p: e for p, e in manifest["files"].items() if e.get("precision", "fp32") == "fp32"}
    write_raw_manifest(copy, manifest)
    with pytest.raises(BundleError, match=r"no onnx encoder at precision 'int8'; this bundle has \['fp32'\]"):
        Converter.load(copy, backend="onnxruntime", precision="int8")


def test_torch_backend_refuses_other_precisions(bundle):
    with pytest.raises(BackendError, match=r"torch runs precisions \['fp32'\], not 'fp16'; fp16 is run by"):
        Converter.load(bundle, backend="torch", precision="fp16")


# -- the glyph API -------------------------------------------------------------------------------

def test_convert_shape_range_and_seed(converter, glyphs):
    y = converter.convert(glyphs, n=5, seed=0)
    assert y.shape == (3, 5, 28, 28) and y.dtype == np.float32
    assert 0.0 <= y.min() and y.max() <= 1.0
    assert np.array_equal(y, converter.convert(glyphs, n=5, seed=0))  # same seed: identical
    assert not np.allclose(y, converter.convert(glyphs, n=5, seed=1))  # another seed: different
    assert not np.allclose(y[:, 0], y[:, 1])  # samples of one condition differ from each other


def test_convert_accepts_every_documented_image_form(converter, glyphs, tmp_path):
    from PIL import Image

    expected = converter.convert(glyphs, n=2, seed=3)
    paths = []
    for i, image in enumerate(glyphs):
        paths.append(tmp_path / f"g{i}.png")
        Image.fromarray(image).save(paths[-1])
    assert np.array_equal(converter.convert(paths, n=2, seed=3), expected)
    assert np.array_equal(converter.convert([str(p) for p in paths], n=2, seed=3), expected)
    assert np.array_equal(converter.convert([Image.fromarray(g) for g in glyphs], n=2, seed=3), expected)
    assert np.array_equal(converter.convert(glyphs[:, None], n=2, seed=3), expected)
    assert np.array_equal(converter.convert(255 - glyphs, n=2, seed=3), expected)  # dark background too
    assert np.array_equal(converter.convert(glyphs[0], n=2, seed=3), expected[:1])


def test_onnxruntime_fp32_matches_torch_reference(bundle, converter, glyphs):
    reference = Converter.load(bundle, backend="torch", device="cpu")
    y_ort, y_torch = converter.convert(glyphs, n=6, seed=11), reference.convert(glyphs, n=6, seed=11)
    assert np.max(np.abs(y_ort - y_torch)) <= 1e-4
    mu_ort, logvar_ort = converter.encode(glyphs[[0, 1]], glyphs[[2, 2]])
    mu_torch, logvar_torch = reference.encode(glyphs[[0, 1]], glyphs[[2, 2]])
    assert np.max(np.abs(mu_ort - mu_torch)) <= 1e-4
    assert np.max(np.abs(logvar_ort - logvar_torch)) <= 1e-4


def test_max_batch_does_not_change_results(bundle, glyphs):
    one = Converter.load(bundle, backend="onnxruntime", device="cpu", max_batch=1)
    big = Converter.load(bundle, backend="onnxruntime", device="cpu", max_batch=64)
    assert np.array_equal(one.convert(glyphs, n=7, seed=5), big.convert(glyphs, n=7, seed=5))
    assert np.array_equal(one.transfer(glyphs[0], glyphs[1], glyphs, n=3, seed=2),
                          big.transfer(glyphs[0], glyphs[1], glyphs, n=3, seed=2))


def test_convert_iter_streams_the_same_numbers_as_convert(converter, glyphs):
    many = np.concatenate([glyphs] * 3)  # 9 conditions
    chunks = list(converter.convert_iter(many, n=4, seed=9, conditions_per_chunk=4))
    assert [c.shape[0] for c in chunks] == [4, 4, 1]
    assert np.array_equal(np.concatenate(chunks), converter.convert(many, n=4, seed=9))
    generator = (g for g in many)  # no len(): still streams
    assert np.array_equal(np.concatenate(list(converter.convert_iter(generator, n=4, seed=9))),
                          converter.convert(many, n=4, seed=9))


def test_encode_and_transfer(converter, glyphs):
    mu, logvar = converter.encode(glyphs[0], glyphs[1])
    assert mu.shape == logvar.shape == (1, converter.latent_dim)
    y = converter.transfer(glyphs[0], glyphs[1], glyphs, n=2, seed=4)
    assert y.shape == (3, 2, 28, 28)
    pairwise = converter.transfer(glyphs, glyphs[[1, 2, 0]], glyphs, n=2, seed=4)
    assert pairwise.shape == (3, 2, 28, 28) and not np.allclose(pairwise, y)
    with pytest.raises(InputError, match="one \\(x, q\\) pair or one per target \\(3\\), got 2 pairs"):
        converter.transfer(glyphs[:2], glyphs[:2], glyphs)
    with pytest.raises(InputError, match="same number of glyphs .* got 2 and 3"):
        converter.encode(glyphs[:2], glyphs)


def test_raw_array_methods_match_the_glyph_api(converter, glyphs):
    from vce_deploy import preprocess_batch

    q = preprocess_batch(glyphs)
    mu, logvar = converter.run_encoder(q[[0, 1]], q[[2, 2]])
    assert np.array_equal(mu, converter.encode(glyphs[[0, 1]], glyphs[[2, 2]])[0])
    z = HostLatentSampler(0).draw(3, converter.latent_dim, 1.0)
    y = converter.run_convertor(z, q)
    assert y.shape == (3, 1, 28, 28)
    assert np.array_equal(y[:, 0], converter.convert(glyphs, n=1, seed=0, temperature=1.0)[:, 0])  # n=1: sample i is z[i]


def test_threads_share_one_converter_and_get_the_serial_results(converter, glyphs):
    def call(i: int):
        kind = i % 3
        if kind == 0:
            return converter.convert(glyphs[i % 3], n=1 + i % 4, seed=i)
        if kind == 1:
            return converter.encode(glyphs[i % 3], glyphs[(i + 1) % 3])[0]
        return converter.transfer(glyphs[0], glyphs[1], glyphs[: 1 + i % 3], n=2, seed=i)

    jobs = list(range(50)) * 8
    serial = [call(i) for i in range(50)]
    with ThreadPoolExecutor(max_workers=8) as pool:
        threaded = list(pool.map(call, jobs))
    for index, result in enumerate(threaded):
        assert np.array_equal(result, serial[index % 50]), f"call {index % 50} differs under threads"


def test_save_conversions_writes_a_grid(converter, glyphs, tmp_path):
    from PIL import Image

    y = converter.convert(glyphs, n=4, seed=0)
    path = save_conversions(tmp_path / "out" / "grid.png", y, conditions=glyphs, scale=1)
    with Image.open(path) as image:
        assert image.size == (5 * 30 + 2, 3 * 30 + 2)  # 1 + n columns, B rows, 28 px + 2 px padding


# -- bad input: a clear error, and the Converter keeps working ---------------------------------

def _bad_calls(glyphs, tmp_path):
    not_image = tmp_path / "notes.png"
    not_image.write_text("not a png")
    nan = glyphs[0].astype(np.float32) / 255
    nan[3, 3] = np.nan
    inf = glyphs[0].astype(np.float32) / 255
    inf[0, 0] = np.inf
    return [
        ("rank 5", lambda c: c.convert(np.zeros((1, 1, 1, 28, 28), np.float32), 2), "expected an array (H, W)"),
        ("3 channels", lambda c: c.convert(np.zeros((2, 3, 28, 28), np.float32), 2), "one channel"),
        ("not an image file", lambda c: c.convert(not_image, 2), "expected a readable image file"),
        ("missing file", lambda c: c.convert(tmp_path / "absent.png", 2), "path does not exist"),
        ("NaN pixel", lambda c: c.convert(nan, 2), "expected finite pixel values, got NaN or inf"),
        ("inf pixel", lambda c: c.convert(inf, 2), "expected finite pixel values, got NaN or inf"),
        ("float out of range", lambda c: c.convert(glyphs[0].astype(np.float32), 2), "expected float pixels in"),
        ("empty list", lambda c: c.convert([], 2), "expected at least one image, got an empty batch"),
        ("empty array", lambda c: c.convert(np.zeros((0, 28, 28), np.float32), 2), "empty batch"),
        ("empty image", lambda c: c.convert(np.zeros((0, 5), np.uint8), 2), "non-empty image"),
        ("n = 0", lambda c: c.convert(glyphs, 0), "n: expected an integer >= 1, got 0"),
        ("n float", lambda c: c.convert(glyphs, 2.5), "n: expected an integer >= 1, got 2.5"),
        ("n bool", lambda c: c.convert(glyphs, True), "n: expected an integer >= 1, got True"),
        ("temperature 0", lambda c: c.convert(glyphs, 2, temperature=0), "temperature: expected a finite number > 0"),
        ("temperature nan", lambda c: c.convert(glyphs, 2, temperature=float("nan")), "temperature"),
        ("negative seed", lambda c: c.convert(glyphs, 2, seed=-1), "seed: expected None or an integer >= 0"),
        ("object", lambda c: c.convert(object(), 2), "expected a path, bytes, PIL image or numpy array"),
        ("iter chunk 0", lambda c: c.convert_iter(glyphs, 2, conditions_per_chunk=0), "conditions_per_chunk"),
        ("raw float64", lambda c: c.run_convertor(np.zeros((2, 56)), np.zeros((2, 1, 28, 28), np.float32)),
         "z: expected a float32 array (B, 56), got dtype float64"),
        ("raw shape", lambda c: c.run_encoder(np.zeros((2, 28, 28), np.float32), np.zeros((2, 28, 28), np.float32)),
         "x: expected a float32 array (B, 1, 28, 28), got shape (2, 28, 28)"),
        ("raw batch", lambda c: c.run_convertor(np.zeros((2, 56), np.float32), np.zeros((3, 1, 28, 28), np.float32)),
         "same batch size, got 2 and 3"),
        ("raw nan", lambda c: c.run_convertor(np.full((1, 56), np.nan, np.float32), np.zeros((1, 1, 28, 28), np.float32)),
         "z: expected finite values"),
        ("raw empty", lambda c: c.run_encoder(np.zeros((0, 1, 28, 28), np.float32), np.zeros((0, 1, 28, 28), np.float32)),
         "empty batch"),
    ]


def test_every_bad_input_gets_a_clear_error_and_the_converter_keeps_working(converter, glyphs, tmp_path):
    before = converter.convert(glyphs, n=2, seed=1)
    for label, call, expected in _bad_calls(glyphs, tmp_path):
        with pytest.raises(VCEError) as err:
            result = call(converter)
            if hasattr(result, "__next__"):
                next(result)
        assert isinstance(err.value, InputError), label
        assert expected in str(err.value), f"{label}: {err.value}"
        assert "expected" in str(err.value), label
        assert np.array_equal(converter.convert(glyphs, n=2, seed=1), before), f"converter changed after {label}"


# -- TensorRT: the manifest check runs anywhere; running an engine needs a GPU ------------------

def _bundle_with_engine(bundle: Path, tmp_path: Path, info: EngineInfo) -> Path:
    copy = tmp_path / "with_engine"
    shutil.copytree(bundle, copy)
    (copy / "engines").mkdir()
    manifest = json.loads((copy / "manifest.json").read_text())
    import hashlib

    for role in ("encoder", "convertor"):
        relative = f"engines/{role}.fp32.plan"
        (copy / relative).write_bytes(b"not a real engine")
        onnx = next(e for e in manifest["files"].values() if e["role"] == role and e["format"] == "onnx")
        manifest["files"][relative] = {
            "sha256": hashlib.sha256(b"not a real engine").hexdigest(), "role": role, "format": "tensorrt",
            "precision": "fp32", "inputs": onnx["inputs"], "outputs": onnx["outputs"], "engine": info.to_dict()}
    write_raw_manifest(copy, manifest)
    return copy


def test_engine_for_another_gpu_names_the_rebuild_command(bundle, tmp_path, monkeypatch):
    info = EngineInfo("10.3.0", "8.7", 1, 64, 256, "Jetson AGX Orin")
    copy = _bundle_with_engine(bundle, tmp_path, info)
    # pretend to be TensorRT 10.8 on a compute capability 8.9 GPU: the check is pure manifest logic
    monkeypatch.setattr(trt_backend, "_trt", lambda: types.SimpleNamespace(__version__="10.8.0"))
    monkeypatch.setattr(cuda_helpers, "runtime", lambda: object())
    monkeypatch.setattr(cuda_helpers, "gpu_count", lambda: 1)
    monkeypatch.setattr(cuda_helpers, "device_properties", lambda device_id: ("NVIDIA L4", "8.9"))
    with pytest.raises(EngineMismatchError) as err:
        Converter.load(copy, backend="tensorrt")
    message = str(err.value)
    assert "built for TensorRT 10.3.0 on compute capability 8.7 (Jetson AGX Orin)" in message
    assert "this is TensorRT 10.8.0 on NVIDIA L4 (compute capability 8.9)" in message
    assert f"vce build {copy} --precision fp32 --min-batch 1 --opt-batch 64 --max-batch 256" in message
    auto = Converter.load(copy)  # auto moves on to ONNX Runtime and says why
    assert auto.backend_info.name == "onnxruntime" and "built for TensorRT 10.3.0" in auto.backend_info.reason


def test_tensorrt_without_tensorrt_is_a_clear_error(bundle, tmp_path):
    copy = _bundle_with_engine(bundle, tmp_path, EngineInfo("10.3.0", "8.7", 1, 64, 256))
    try:
        import tensorrt  # noqa: F401
        pytest.skip("TensorRT is installed here: the missing-TensorRT message cannot be produced")
    except ImportError:
        pass
    with pytest.raises(BackendError, match="TensorRT is not installed"):
        Converter.load(copy, backend="tensorrt")


def test_tensorrt_engine_runs_and_matches_onnxruntime(bundle):
    if cuda_helpers.gpu_count() == 0:
        pytest.skip("no CUDA GPU: the TensorRT backend is written to the documented API and not run here")
    pytest.importorskip("tensorrt", reason="TensorRT is not installed")
    conv_trt = Converter.load(bundle, backend="tensorrt")  # needs engines built on this GPU
    reference = Converter.load(bundle, backend="onnxruntime", device="cpu")
    z = HostLatentSampler(0).draw(4, reference.latent_dim, 1.0)
    q = (np.random.default_rng(0).random((4, 1, 28, 28)) < 0.2).astype(np.float32)
    assert np.max(np.abs(conv_trt.run_convertor(z, q) - reference.run_convertor(z, q))) <= 1e-3


def test_onnxruntime_gpu_io_binding_is_deterministic(bundle, glyphs):
    import onnxruntime

    if "CUDAExecutionProvider" not in onnxruntime.get_available_providers() or cuda_helpers.gpu_count() == 0:
        pytest.skip("no CUDA GPU / onnxruntime-gpu: the I/O binding path is not run here")
    gpu = Converter.load(bundle, backend="onnxruntime", device="cuda")
    assert np.array_equal(gpu.convert(glyphs, n=8, seed=0), gpu.convert(glyphs, n=8, seed=0))
