"""Issue 8, hardening: what a trusted inference runtime promises.

- a bad request fails alone and clearly (every public entry point, one table);
- a bad artifact is refused before any model runs (bundles, manifests, pickles);
- an export that fails or is killed leaves the old bundle, never half a bundle;
- load does not change answers (16 threads x 200 calls equal the serial results);
- memory is bounded by max_batch, not by n (peak RSS of a subprocess, n = 100000).

Cases already covered by test_converter / test_bundle / test_cli / test_export /
test_preprocess are not repeated here.
"""
from __future__ import annotations

import hashlib
import json
import os
import pickle
import random
import shutil
import signal
import struct
import subprocess
import sys
import threading
import time
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from vce_deploy import BundleError, CheckpointError, Converter, InputError, VCEError
from vce_deploy.bundle import Bundle, UnsealedBundleWarning, sha256_file, write_raw_manifest
from vce_deploy.bundle_swap import _exchange, atomic_directory, check_replaceable, clean_stale
from vce_deploy.checkpoint import load_model, load_tensors
from vce_deploy.preprocess import MAX_PIXELS

ROOT = Path(__file__).resolve().parents[1]
PYTHON = sys.executable


@pytest.fixture(scope="module")
def converter(smoke_bundle) -> Converter:
    return Converter.load(smoke_bundle, backend="onnxruntime", device="cpu", threads=1)


@pytest.fixture(scope="module")
def glyphs() -> np.ndarray:
    images = np.full((3, 40, 40), 255, np.uint8)
    images[0, 8:32, 18:23] = 0
    images[1, 18:23, 8:32] = 0
    images[2, 8:32, 8:13] = 0
    images[2, 28:33, 8:30] = 0
    return images


@pytest.fixture
def copy(smoke_bundle, tmp_path) -> Path:
    target = tmp_path / "bundle"
    shutil.copytree(smoke_bundle, target)
    return target


def tree_digest(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def edit_manifest(root: Path, change) -> None:
    """Change the manifest and re-seal it: only the change under test can be refused."""
    raw = json.loads((root / "manifest.json").read_text())
    change(raw)
    write_raw_manifest(root, raw)


def png_bytes(image: np.ndarray) -> bytes:
    import io

    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return buffer.getvalue()


def huge_png_header(width: int, height: int) -> bytes:
    """A 60-byte PNG that declares width x height 1-bit pixels (and holds almost none)."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 16)) + chunk(b"IEND", b"")


@pytest.fixture(scope="module")
def bad_files(tmp_path_factory, glyphs) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("bad_files")
    good = png_bytes(glyphs[0])
    files = {"truncated": root / "truncated.png", "text": root / "notes.png", "huge": root / "huge.png",
             "empty": root / "empty.png", "directory": root / "a_directory.png", "good": root / "good.png"}
    files["truncated"].write_bytes(good[: len(good) // 2])
    files["text"].write_text("these are notes, not a PNG")
    files["huge"].write_bytes(huge_png_header(100_000, 100_000))
    files["empty"].write_bytes(b"")
    files["directory"].mkdir()
    files["good"].write_bytes(good)
    return files


# -- 1. bad input: the documented exception, a message naming expected and actual, and the
#       same Converter converts correctly afterwards --------------------------------------------

def _bad_requests(glyphs, files):
    g = glyphs[0]
    nan = g.astype(np.float32) / 255
    nan[1, 1] = np.nan
    huge_view = np.broadcast_to(np.uint8(255), (10_000, 10_000))  # 100M pixels, no memory
    return [
        # (label, call, exception, fragments: what was expected, and what came)
        ("load: path is an int", lambda c: Converter.load(7), InputError, ["expected None, a str", "got int"]),
        ("load: path is a file", lambda c: Converter.load(files["good"]), BundleError,
         ["expected a bundle directory", "got a file"]),
        ("convert: rank 0", lambda c: c.convert(np.float32(0.5), 2), InputError,
         ["expected a path, bytes, PIL image or numpy array", "float32"]),
        ("convert: rank 1", lambda c: c.convert(np.zeros(28, np.uint8), 2), InputError,
         ["expected an array (H, W), (H, W, 3 or 4), (B, H, W), (B, 1, H, W)", "(28,)"]),
        ("convert: int64 pixels", lambda c: c.convert(g.astype(np.int64), 2), InputError,
         ["expected dtype bool, uint8, uint16 or float", "int64"]),
        ("convert: complex pixels", lambda c: c.convert(g.astype(np.complex64), 2), InputError,
         ["expected dtype", "complex64"]),
        ("convert: object array", lambda c: c.convert(np.array([[None, 1]], dtype=object), 2), InputError,
         ["expected dtype", "object"]),
        ("convert: 100M-pixel array", lambda c: c.convert(huge_view, 2), InputError,
         [f"expected at most {MAX_PIXELS} pixels", "10000 x 10000"]),
        ("convert: truncated PNG", lambda c: c.convert(files["truncated"], 2), InputError,
         ["expected a readable image file", "truncated"]),
        ("convert: text file", lambda c: c.convert(files["text"], 2), InputError,
         ["expected a readable image file", "cannot identify"]),
        ("convert: empty file", lambda c: c.convert(files["empty"], 2), InputError,
         ["expected a readable image file", "cannot identify"]),
        ("convert: PNG declaring 10^10 pixels", lambda c: c.convert(files["huge"], 2), InputError,
         [f"expected at most {MAX_PIXELS} pixels", "10000000000"]),
        ("convert: a directory", lambda c: c.convert(files["directory"], 2), InputError,
         ["expected an image file", "got a directory"]),
        ("convert: a device", lambda c: c.convert("/dev/zero", 2), InputError,
         ["expected a regular image file", "special file"]),
        ("convert: huge n", lambda c: c.convert(g, 10**7), InputError,
         ["expected convert() to fit in max_output_bytes", "n = 10000000", "convert_iter"]),
        ("convert: huge batch x n", lambda c: c.convert(np.repeat(g[None], 300, 0), 5000), InputError,
         ["expected convert() to fit", "300 glyphs x n = 5000"]),
        ("convert: temperature 1e30", lambda c: c.convert(g, 2, temperature=1e30), InputError,
         ["temperature: expected a finite number > 0 and <= 10000", "1e+30"]),
        ("convert: numpy NaN seed", lambda c: c.convert(g, 2, seed=np.float64("nan")), InputError,
         ["seed: expected None or an integer >= 0", "nan"]),
        ("encode: x and q counts", lambda c: c.encode(glyphs[:2], glyphs[:3]), InputError,
         ["expected the same number of glyphs", "got 2 and 3"]),
        ("encode: NaN in x", lambda c: c.encode(nan, g), InputError,
         ["x[0]: expected finite pixel values", "NaN or inf"]),
        ("encode: q is a directory", lambda c: c.encode(g, files["directory"]), InputError,
         ["q[0] (", "a_directory.png): expected an image file", "got a directory"]),
        ("transfer: pairs vs targets", lambda c: c.transfer(glyphs[:2], glyphs[:2], glyphs), InputError,
         ["expected one (x, q) pair or one per target (3)", "got 2 pairs"]),
        ("transfer: empty targets", lambda c: c.transfer(g, g, []), InputError,
         ["targets: expected at least one image", "empty batch"]),
        ("transfer: huge n", lambda c: c.transfer(g, g, g, n=10**7), InputError,
         ["expected transfer() to fit", "transfer() calls"]),
        ("transfer: wrong rank targets", lambda c: c.transfer(g, g, np.zeros((1, 2, 1, 28, 28), np.uint8)),
         InputError, ["targets: expected an array", "(1, 2, 1, 28, 28)"]),
        ("convert_iter: n = 0", lambda c: c.convert_iter(g, 0), InputError, ["n: expected an integer >= 1", "got 0"]),
        ("convert_iter: truncated 2nd image", lambda c: c.convert_iter([g, files["truncated"]], 2,
                                                                         conditions_per_chunk=1),
         InputError, ["images[1:2][0] (", "truncated.png): expected a readable image file", "truncated"]),
        ("convert_iter: empty generator", lambda c: c.convert_iter(iter([]), 2), InputError,
         ["expected at least one image", "empty batch"]),
        ("run_convertor: float16 z", lambda c: c.run_convertor(np.zeros((1, 56), np.float16),
                                                               np.zeros((1, 1, 28, 28), np.float32)),
         InputError, ["expected a float32 array (B, 56)", "float16"]),
    ]


def test_every_entry_point_refuses_bad_input_alone_and_clearly(converter, glyphs, bad_files):
    before = converter.convert(glyphs, n=3, seed=5)
    for label, call, kind, fragments in _bad_requests(glyphs, bad_files):
        with pytest.raises(VCEError) as err:
            result = call(converter)
            while hasattr(result, "__next__"):  # convert_iter fails when it reaches the bad chunk
                next(result)
        message = str(err.value)
        assert type(err.value) is kind, f"{label}: {type(err.value).__name__}: {message}"
        assert "expected" in message, f"{label}: {message}"
        for fragment in fragments:
            assert fragment in message, f"{label}: {fragment!r} not in {message!r}"
        assert np.array_equal(converter.convert(glyphs, n=3, seed=5), before), f"the converter changed after {label}"


def test_huge_n_streams_through_convert_iter_in_max_batch_slices(converter, glyphs):
    """The policy: convert() refuses n past max_output_bytes; convert_iter takes any n."""
    chunks = converter.convert_iter(glyphs[0], n=10**12, seed=0)
    first = next(chunks)
    assert first.shape == (1, converter.max_batch, 28, 28)
    chunks.close()


def _cli_cases(bundle: Path, files: dict, tmp_path: Path):
    out = ["-o", str(tmp_path / "grid.png"), "--bundle", str(bundle)]
    good = str(files["good"])
    return [
        (["convert", str(files["directory"]), *out], 1, ["expected an image file", "got a directory"]),
        (["convert", str(files["truncated"]), *out], 1, ["expected a readable image file"]),
        (["convert", str(files["huge"]), *out], 1, [f"expected at most {MAX_PIXELS} pixels"]),
        # the CLI writes one image: refused for its size before the model loads
        (["convert", good, "-n", "100000000", *out], 1, ["pixels in one image", "convert_iter"]),
        (["convert", good, "--temperature", "nan", *out], 1, ["temperature: expected a finite number", "nan"]),
        (["convert", good, "--max-batch", "0", *out], 1, ["max_batch: expected an integer >= 1, got 0"]),
        (["convert", good, "-o", str(tmp_path), "--bundle", str(bundle)], 1,
         ["expected an image file path to write", "got a directory"]),
        (["convert", good, "-o", str(tmp_path / "g.png"), "--bundle", good], 1,
         ["expected a bundle directory", "got a file"]),
        (["verify", good], 1, ["expected a bundle directory", "got a file"]),
        (["convert", good, "-n", "-1", *out], 1, ["n: expected an integer >= 1, got -1"]),
    ]


def test_vce_cli_bad_input_exits_1_with_one_line(smoke_bundle, bad_files, tmp_path, capsys):
    from vce_deploy.cli import main

    for argv, code, fragments in _cli_cases(smoke_bundle, bad_files, tmp_path):
        assert main(argv) == code, argv
        err = capsys.readouterr().err.strip()
        assert err.count("\n") == 0 and "error:" in err and "expected" in err, (argv, err)
        for fragment in fragments:
            assert fragment in err, (argv, err)
    assert not (tmp_path / "grid.png").exists(), "no output from a refused request"
    assert main(["convert", str(bad_files["good"]), "-n", "2", *_cli_cases(smoke_bundle, bad_files, tmp_path)[0][0][2:]]) == 0


class _Pwned:
    """Unpickling this creates a file: the proof that something was unpickled."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def _pickles(tmp_path: Path, marker: Path) -> dict[str, Path]:
    import torch

    found = {}
    for protocol in range(pickle.HIGHEST_PROTOCOL + 1):
        path = tmp_path / f"protocol{protocol}.safetensors"
        path.write_bytes(pickle.dumps({"model.w": _Pwned(marker)}, protocol=protocol))
        found[f"pickle protocol {protocol}"] = path
    path = tmp_path / "torch_save.safetensors"
    torch.save({"model.w": torch.zeros(2), "evil": _Pwned(marker)}, path)
    found["torch.save"] = path
    return found


def test_python_dash_m_export_refuses_bad_input(smoke_checkpoint, tmp_path, capsys):
    from export.__main__ import main

    marker = tmp_path / "unpickled"
    pickled = _pickles(tmp_path, marker)["pickle protocol 2"]
    shutil.copy(smoke_checkpoint.with_suffix(".json"), pickled.with_suffix(".json"))
    home = tmp_path / "home"
    home.mkdir()
    (home / "thesis.tex").write_text("years of work")
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    fast = ["--precision", "fp32", "--no-nll", "--batches", "1"]
    cases = [
        ([str(tmp_path / "absent.safetensors"), "--out", str(tmp_path / "b"), *fast], 1,
         ["expected a .safetensors checkpoint file", "does not exist"]),
        ([str(tmp_path), "--out", str(tmp_path / "b"), *fast], 1,
         ["expected a .safetensors checkpoint file", "got a directory"]),
        ([str(pickled), "--out", str(tmp_path / "b"), *fast], 1, ["expected safetensors", "pickle"]),
        ([str(smoke_checkpoint), "--out", str(home), *fast], 1,
         ["expected an empty directory or a bundle", "thesis.tex", "refusing"]),
        ([str(smoke_checkpoint), "--out", str(a_file), *fast], 1, ["expected a bundle directory", "got a file"]),
        ([str(smoke_checkpoint), "--out", str(tmp_path / "b"), "--batches", "0"], 2, ["expected an integer >= 1, got 0"]),
        ([str(smoke_checkpoint), "--out", str(tmp_path / "b"), "--nll-k", "-5"], 2, ["expected an integer >= 1, got -5"]),
        ([str(smoke_checkpoint), "--out", str(tmp_path / "b"), "--precision", "fp64"], 2, ["invalid choice"]),
    ]
    for argv, code, fragments in cases:
        try:
            got = main(argv)
        except SystemExit as stop:  # argparse: bad usage
            got = stop.code
        err = capsys.readouterr().err
        assert got == code, (argv, err)
        for fragment in fragments:
            assert fragment in err, (argv, err)
    assert not marker.exists(), "the pickle was unpickled"
    assert (home / "thesis.tex").read_text() == "years of work" and a_file.read_text() == "x"
    assert not (tmp_path / "b").exists()


# -- 2. bad artifacts: refused before any model runs --------------------------------------------

@pytest.fixture
def no_session(monkeypatch):
    """Fail the test if any ONNX Runtime session is created: refusals must come first."""
    import onnxruntime

    created = []

    class Refuse:
        def __init__(self, *args, **kwargs):
            created.append(args)
            raise AssertionError("an ONNX Runtime session was created for a bundle that should be refused")

    monkeypatch.setattr(onnxruntime, "InferenceSession", Refuse)
    return created


def test_one_changed_byte_in_any_file_is_refused_before_a_model_runs(copy, no_session):
    """The files the fp32 ONNX Runtime load reads are refused by Converter.load before any session
    exists; every other file (other precisions, checkpoint) by the full check (`vce verify`)."""
    names = sorted(tree_digest(copy))
    assert "manifest.json" in names and len(names) >= 8
    used = {"manifest.json", "encoder.onnx", "convertor.onnx"}
    for name in names:
        path = copy / name
        original = path.read_bytes()
        data = bytearray(original)
        data[len(data) // 2] ^= 0x01
        path.write_bytes(bytes(data))
        with pytest.raises(BundleError) as err:
            if name in used:
                Converter.load(copy, backend="onnxruntime", precision="fp32")
            else:
                Bundle.load(copy, verify=True)
        assert "expected" in str(err.value) and "changed" in str(err.value) or "JSON" in str(err.value), err.value
        path.write_bytes(original)
    assert not no_session
    Bundle.load(copy)  # restored: it loads again (the test can tell a good bundle from a bad one)


def test_single_byte_changes_of_the_manifest_are_refused(copy):
    """Every byte of the seal and the first keys, and 800 more positions spread at random."""
    data = (copy / "manifest.json").read_bytes()
    assert Bundle.load(copy, verify=False).sealed
    accepted = []
    positions = sorted(set(range(200)) | set(random.Random(0).sample(range(200, len(data)), 800)))
    for index in positions:
        for flip in (0x01,):
            changed = bytearray(data)
            changed[index] ^= flip
            (copy / "manifest.json").write_bytes(bytes(changed))
            try:
                Bundle.load(copy, verify=False)
                accepted.append((index, flip))
            except BundleError:
                pass
    assert not accepted, f"{len(accepted)} one-byte changes were accepted, e.g. at {accepted[:3]}"


def test_a_renamed_key_in_an_unsealed_manifest_is_refused(copy):
    """Format-1 bundles exported before the seal existed load when asked; a key changed in them is caught."""
    raw = json.loads((copy / "manifest.json").read_text())
    raw.pop("manifest_sha256")
    raw["format_version"] = 1
    (copy / "manifest.json").write_text(json.dumps(raw))
    with pytest.warns(UnsealedBundleWarning):
        assert not Bundle.load(copy, allow_unsealed=True).sealed
    raw["latent_dimm"] = raw.pop("latent_dim")
    (copy / "manifest.json").write_text(json.dumps(raw))
    with pytest.raises(BundleError, match=r"expected only the keys .* got unknown \['latent_dimm'\]"):
        Bundle.load(copy, allow_unsealed=True)


def test_symlinked_directory_and_manifest_out_of_the_bundle_are_refused(copy, tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    shutil.copy(copy / "encoder.onnx", outside / "encoder.onnx")
    (copy / "models").symlink_to(outside, target_is_directory=True)
    edit_manifest(copy, lambda raw: raw["files"].update(
        {"models/encoder.onnx": dict(raw["files"].pop("encoder.onnx"))}))
    with pytest.raises(BundleError, match="resolves to .* outside the bundle"):
        Bundle.load(copy)
    second = tmp_path / "second"
    shutil.copytree(copy.parent / "bundle", second, symlinks=True)
    shutil.move(second / "manifest.json", outside / "manifest.json")
    (second / "manifest.json").symlink_to(outside / "manifest.json")
    with pytest.raises(BundleError, match="manifest.json.*outside the bundle"):
        Bundle.load(second, verify=False)


def test_truncated_onnx_with_a_matching_hash_is_refused(copy):
    path = copy / "convertor.onnx"
    path.write_bytes(path.read_bytes()[:1000])  # an exporter that died mid-write, then re-hashed
    edit_manifest(copy, lambda raw: raw["files"]["convertor.onnx"].update(sha256=sha256_file(path)))
    with pytest.raises(BundleError, match=r"convertor.onnx: expected an ONNX model that onnxruntime loads .* got"):
        Converter.load(copy, backend="onnxruntime")


@pytest.mark.parametrize("lie, expected", [
    (lambda raw: raw["files"]["convertor.onnx"]["inputs"][0].update(shape=["batch", 57]),
     r"'z' shape \['batch', 57\], expected \['batch', 56\]"),
    (lambda raw: raw["files"]["encoder.onnx"]["outputs"][0].update(dtype="float16"),
     r"'mu' dtype float16, expected float32"),
    (lambda raw: raw["files"]["encoder.onnx"]["inputs"][0].update(shape=[1, 1, 28, 28]),
     r"'x' shape \[1, 1, 28, 28\], expected \['batch', 1, 28, 28\]"),
    (lambda raw: raw["files"]["convertor.onnx"]["inputs"][0].update(name="w"),
     r"must take inputs \['z', 'q'\] .* the manifest says inputs \['w', 'q'\]"),
])
def test_a_manifest_that_lies_about_shapes_is_refused_at_load(copy, no_session, lie, expected):
    edit_manifest(copy, lie)
    with pytest.raises(BundleError, match=expected):
        Converter.load(copy, backend="onnxruntime")
    assert not no_session


def test_a_consistent_lie_is_caught_against_the_real_model(copy):
    """latent_dim and every latent spec say 57: only the real ONNX session can tell."""
    def lie(raw):
        raw["latent_dim"] = 57
        for entry in raw["files"].values():
            for spec in entry.get("inputs", []) + entry.get("outputs", []):
                if spec["name"] in ("z", "mu", "logvar"):
                    spec["shape"] = ["batch", 57]
    edit_manifest(copy, lie)
    with pytest.raises(BundleError, match=r"does not match its manifest entry: .*shape: manifest \['batch', 57\], "
                                          r"model \['batch', 56\]"):
        Converter.load(copy, backend="onnxruntime")


def test_a_file_swapped_after_verification_is_refused(copy, monkeypatch):
    """Backends load the bytes they hash: a file changed between the manifest check and load never runs."""
    original_check = Bundle.check_present

    def check_then_swap(self):
        original_check(self)
        with open(self.path / "encoder.onnx", "ab") as handle:
            handle.write(b"\0")

    monkeypatch.setattr(Bundle, "check_present", check_then_swap)
    with pytest.raises(BundleError, match="'encoder.onnx' has sha256 .* the file was changed"):
        Converter.load(copy, backend="onnxruntime")


def test_pickles_are_refused_never_loaded(tmp_path, smoke_checkpoint):
    marker = tmp_path / "unpickled"
    for label, path in _pickles(tmp_path, marker).items():
        shutil.copy(smoke_checkpoint.with_suffix(".json"), path.with_suffix(".json"))
        for load in (load_tensors, load_model):
            with pytest.raises(CheckpointError, match="expected safetensors.*pickle"):
                load(path)
    assert not marker.exists(), "a pickle was unpickled"
    other = tmp_path / "random.safetensors"
    other.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all")
    with pytest.raises(CheckpointError, match=r"expected safetensors \(an 8-byte header length"):
        load_tensors(other)
    assert load_tensors(smoke_checkpoint), "a real checkpoint still loads"


def test_a_pickle_inside_a_bundle_is_refused_by_the_torch_backend(copy, tmp_path):
    marker = tmp_path / "unpickled"
    evil = _pickles(tmp_path, marker)["torch.save"]
    shutil.copy(evil, copy / "checkpoint.safetensors")
    edit_manifest(copy, lambda raw: raw["files"]["checkpoint.safetensors"].update(
        sha256=sha256_file(copy / "checkpoint.safetensors")))
    with pytest.raises(CheckpointError, match="expected safetensors, got a pickle/zip"):
        Converter.load(copy, backend="torch")
    assert not marker.exists()


def test_weights_of_the_wrong_shape_are_a_checkpoint_error(tmp_path, smoke_checkpoint):
    from safetensors.torch import save_file

    tensors = load_tensors(smoke_checkpoint)
    name = next(k for k in tensors if k.startswith("model.") and k.endswith("weight"))
    tensors[name] = tensors[name][:1].clone()
    path = tmp_path / "wrong.safetensors"
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path))
    shutil.copy(smoke_checkpoint.with_suffix(".json"), path.with_suffix(".json"))
    with pytest.raises(CheckpointError, match=rf"weights do not match model_config .*{name[len('model.'):]}"):
        load_model(path)


# -- 3. export is atomic ------------------------------------------------------------------------

@pytest.fixture(scope="module")
def cached_data():
    from vce_deploy.omniglot import load_split

    return load_split("small", "train"), load_split("small", "test")


def _fast_export(monkeypatch, smoke_bundle: Path, cached_data) -> None:
    """The same export_bundle, its slow steps (tracing, quantizing, data loading) replaced by
    copies of the session bundle's files; a test then makes one step fail."""
    import export.onnx_export as onnx_export
    import export.quantize as quantize
    import vce_deploy.omniglot as data

    def copy_onnx(module, role, size, latent, path, opset, slim):
        shutil.copy(smoke_bundle / Path(path).name, path)
        return onnx_export.OnnxInfo(Path(path), opset, 0, False, "copied by the test")

    def copy_quantized(src, dst, *args, **kwargs):
        shutil.copy(smoke_bundle / Path(dst).name, dst)

    monkeypatch.setattr(onnx_export, "export_onnx", copy_onnx)
    monkeypatch.setattr(quantize, "to_fp16", copy_quantized)
    monkeypatch.setattr(quantize, "to_int8", copy_quantized)
    monkeypatch.setattr(quantize, "calibration_batches", lambda *a, **k: {"encoder": [], "convertor": []})
    monkeypatch.setattr(data, "load_split", lambda split, part, data_dir=None: cached_data[part == "test"])


def _boom(*args, **kwargs):
    raise RuntimeError("failed on purpose")


def _half_manifest(directory, manifest):
    (Path(directory) / "manifest.json").write_text(json.dumps(manifest.to_dict())[:500])
    raise OSError("disk full, on purpose")


def _fail_convertor_onnx(original):
    def fail(module, role, size, latent, path, opset, slim):
        if role == "convertor":
            Path(path).write_bytes(b"half an onnx file")
            raise RuntimeError("failed on purpose")
        return original(module, role, size, latent, path, opset, slim)
    return fail


STEPS = {  # step -> how to make it fail: (module, attribute, replacement or wrapper)
    "weights": ("export.pipeline", "_weights_only", _boom),
    "onnx": ("export.onnx_export", "export_onnx", "fail_convertor"),
    "fp16": ("export.quantize", "to_fp16", _boom),
    "int8": ("export.quantize", "to_int8", _boom),
    "parity": ("vce_deploy.verify", "check_parity", _boom),
    "nll": ("export.pipeline", "_nll_metrics", _boom),
    "manifest": ("export.pipeline", "write_manifest", _half_manifest),
    "verify": ("export.pipeline", "Bundle", type("Refuse", (), {"load": staticmethod(_boom)})),
}


@pytest.mark.parametrize("step", [*STEPS, None])
def test_an_export_failing_at_any_step_leaves_the_old_bundle_byte_identical(
        step, smoke_checkpoint, smoke_bundle, cached_data, tmp_path, monkeypatch):
    import importlib

    from export import export_bundle

    out = tmp_path / "bundle"
    shutil.copytree(smoke_bundle, out)
    write_raw_manifest(out, dict(json.loads((out / "manifest.json").read_text()), step=-0 + 12345))
    before = tree_digest(out)
    _fast_export(monkeypatch, smoke_bundle, cached_data)
    if step is not None:
        module, name, replacement = STEPS[step]
        target = importlib.import_module(module)
        if replacement == "fail_convertor":
            replacement = _fail_convertor_onnx(getattr(target, name))
        monkeypatch.setattr(target, name, replacement)
    run = lambda: export_bundle(smoke_checkpoint, out, precisions=("fp32", "fp16", "int8"),  # noqa: E731
                                parity_batches=(1,), measure_nll=step == "nll", split="small", log=lambda _: None)
    if step is None:
        run()  # the harness really replaces the bundle when nothing fails
        assert tree_digest(out) != before and Bundle.load(out).manifest.step != 12345
    else:
        with pytest.raises((RuntimeError, OSError)):
            run()
        assert tree_digest(out) == before, f"the old bundle changed when {step} failed"
        Bundle.load(out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bundle"], "staging left behind"


KILL_DRIVER = r"""
import os, shutil, signal, sys
from pathlib import Path
sys.path.insert(0, {root!r})
checkpoint, out, source, kill_at = sys.argv[1:5]
import export.pipeline as pipeline, export.onnx_export as onnx_export, vce_deploy.bundle_swap as bundle_swap

def die(*args, **kwargs):
    os.kill(os.getpid(), signal.SIGKILL)

def copy_onnx(module, role, size, latent, path, opset, slim):
    shutil.copy(Path(source) / Path(path).name, path)
    return onnx_export.OnnxInfo(Path(path), opset, 0, False, "copied")

onnx_export.export_onnx = copy_onnx
if kill_at == "manifest":  # every model file written, the manifest next
    pipeline.write_manifest = die
elif kill_at == "swap":  # right after the new bundle took the old one's place
    real = bundle_swap._exchange
    def exchange_then_die(a, b):
        assert real(a, b), "RENAME_EXCHANGE is not available here"
        die()
    bundle_swap._exchange = exchange_then_die
pipeline.export_bundle(checkpoint, out, precisions=("fp32",), parity_batches=(1,), measure_nll=False, split="small", log=lambda _: None)
print("export finished: the kill point was never reached")
"""


@pytest.mark.parametrize("kill_at", ["manifest", "swap"])
def test_an_export_killed_half_way_leaves_a_whole_bundle(kill_at, smoke_checkpoint, smoke_bundle, tmp_path):
    out = tmp_path / "bundle"
    shutil.copytree(smoke_bundle, out)
    before = tree_digest(out)
    driver = tmp_path / "driver.py"
    driver.write_text(KILL_DRIVER.format(root=str(ROOT)))
    done = subprocess.run([PYTHON, str(driver), str(smoke_checkpoint), str(out), str(smoke_bundle), kill_at],
                          capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert done.returncode == -signal.SIGKILL, done.stdout + done.stderr
    litter = [p for p in tmp_path.iterdir() if p.name.startswith(".bundle.staging.")]
    assert litter, "the kill left its staging directory (to be cleaned by the next export)"
    loaded = Bundle.load(out)  # whole, verified, whichever it is
    if kill_at == "manifest":
        assert tree_digest(out) == before, "the old bundle is intact"
    else:
        assert tree_digest(out) != before and set(loaded.manifest.files) == {
            "checkpoint.safetensors", "checkpoint.json", "encoder.onnx", "convertor.onnx", "golden.npz"}, "the new bundle, whole"
        assert tree_digest(litter[0]) == before, "the litter is the old bundle"
    assert clean_stale(out) == litter, "the dead export's staging directory is cleaned"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bundle", "driver.py"]


def test_the_bundle_path_never_disappears_during_a_replace(smoke_bundle, tmp_path):
    """RENAME_EXCHANGE: a reader polling the final path always finds a whole, sealed manifest."""
    final = tmp_path / "bundle"
    shutil.copytree(smoke_bundle, final)
    assert _exchange(tmp_path / "bundle", tmp_path / "bundle") in (True, False)
    probe_a, probe_b = tmp_path / "a", tmp_path / "b"
    probe_a.mkdir(), probe_b.mkdir()
    assert _exchange(probe_a, probe_b), "renameat2(RENAME_EXCHANGE) works on this filesystem"
    stop, seen = threading.Event(), {"ok": 0, "bad": []}

    def reader():
        while not stop.is_set():
            try:
                Bundle.load(final, verify=False)
                seen["ok"] += 1
            except BundleError as err:
                seen["bad"].append(str(err))

    thread = threading.Thread(target=reader)
    thread.start()
    try:
        for i in range(40):
            with atomic_directory(final) as stage:
                shutil.copytree(smoke_bundle, stage, dirs_exist_ok=True)
                edit_manifest(stage, lambda raw: raw.update(step=i))
    finally:
        stop.set()
        thread.join()
    assert seen["ok"] > 0 and not seen["bad"], seen["bad"][:3]
    assert Bundle.load(final).manifest.step == 39


def test_stale_staging_of_a_live_process_is_kept(tmp_path):
    final = tmp_path / "bundle"
    mine = tmp_path / f".bundle.staging.{os.getpid()}-abc"
    dead = tmp_path / ".bundle.staging.999999999-abc"
    unrelated = tmp_path / ".other.staging.999999999-abc"
    for path in (mine, dead, unrelated):
        path.mkdir()
    assert clean_stale(final) == [dead]
    assert mine.exists() and unrelated.exists()


def test_only_an_empty_directory_or_a_bundle_may_be_replaced(tmp_path, smoke_bundle):
    check_replaceable(tmp_path / "absent")
    (tmp_path / "empty").mkdir()
    check_replaceable(tmp_path / "empty")
    check_replaceable(smoke_bundle)
    (tmp_path / "link").symlink_to(smoke_bundle)
    with pytest.raises(BundleError, match="got a symlink; refusing"):
        check_replaceable(tmp_path / "link")
    (tmp_path / "stuff").mkdir()
    (tmp_path / "stuff" / "notes.txt").write_text("x")
    with pytest.raises(BundleError, match=r"got a directory with 1 other entries \(notes.txt\)"):
        with atomic_directory(tmp_path / "stuff"):
            raise AssertionError("never reached")
    assert (tmp_path / "stuff" / "notes.txt").read_text() == "x"


# -- 4. concurrency: one Converter, 16 threads x 200 calls, results equal the serial ones -------

def test_sixteen_threads_times_two_hundred_calls_equal_the_serial_results(smoke_bundle, glyphs):
    converter = Converter.load(smoke_bundle, backend="onnxruntime", device="cpu", max_batch=8, threads=1)
    rng = random.Random(0)
    specs = []
    for i in range(200):
        kind = rng.choice(["convert", "convert", "iter", "encode", "transfer"])
        batch = glyphs[: rng.randint(1, 3)]
        specs.append((kind, batch, rng.randint(1, 12), rng.randrange(2**32)))

    def call(spec):
        kind, batch, n, seed = spec
        if kind == "convert":
            return converter.convert(batch, n=n, seed=seed)
        if kind == "iter":
            return np.concatenate([c.reshape(-1, 28, 28) for c in converter.convert_iter(batch, n=n, seed=seed)])
        if kind == "encode":
            return np.concatenate(converter.encode(batch, batch[::-1]), axis=1)
        return converter.transfer(glyphs[0], glyphs[1], batch, n=n, seed=seed)

    serial = [call(spec) for spec in specs]

    def worker(thread: int):
        order = list(range(len(specs)))
        random.Random(thread).shuffle(order)
        return [(i, call(specs[i])) for i in order]

    start = time.perf_counter()
    with ThreadPoolExecutor(max_workers=16) as pool:
        results = list(pool.map(worker, range(16)))
    seconds = time.perf_counter() - start
    assert sum(len(r) for r in results) == 16 * 200
    for thread, pairs in enumerate(results):
        for i, result in pairs:
            assert np.array_equal(result, serial[i]), f"thread {thread}, call {i} ({specs[i][0]}) differs"
    print(f"16 x 200 calls in {seconds:.1f} s")


# -- 5. memory: n = 100000 through convert_iter, peak RSS bounded by max_batch, not n ------------

MEMORY_DRIVER = r"""
import json, sys, time, tracemalloc
sys.path.insert(0, {root!r})
import numpy as np
from vce_deploy import Converter
bundle, n, max_batch = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
converter = Converter.load(bundle, backend="onnxruntime", device="cpu", max_batch=max_batch)
glyph = np.full((40, 40), 255, np.uint8); glyph[8:32, 18:23] = 0
def peak_kb():  # VmHWM: this process's peak RSS (ru_maxrss would carry the parent's over exec)
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1])

converter.convert(glyph, n=max_batch, seed=1)  # warm: sessions, arenas, one full chunk
base = peak_kb()
tracemalloc.start()
start, count, largest, total = time.perf_counter(), 0, 0, 0.0
for chunk in converter.convert_iter(glyph, n=n, seed=0):
    count += chunk.shape[0] * chunk.shape[1]
    largest = max(largest, chunk.shape[1])
    total += float(chunk.sum(dtype=np.float64))
seconds = time.perf_counter() - start
_, traced_peak = tracemalloc.get_traced_memory()
tracemalloc.stop()
peak = peak_kb()
held = np.ones(n * 784, np.float32)  # the control: holding the whole output must show in the measure
control = peak_kb()
print(json.dumps({{"samples": count, "largest_chunk": largest, "seconds": seconds, "base_rss_kb": base,
                  "peak_rss_kb": peak, "control_rss_kb": control, "traced_peak_bytes": traced_peak,
                  "mean": total / count / 784}}))
"""


def test_n_100000_streams_in_memory_bounded_by_max_batch(smoke_bundle, tmp_path):
    n, max_batch = 100_000, 256
    driver = tmp_path / "memory.py"
    driver.write_text(MEMORY_DRIVER.format(root=str(ROOT)))
    done = subprocess.run([PYTHON, str(driver), str(smoke_bundle), str(n), str(max_batch)],
                          capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout.strip().splitlines()[-1])
    print(report)
    assert report["samples"] == n and report["largest_chunk"] <= max_batch
    whole = n * (28 * 28 + 56) * 4  # what holding the whole result and its latents would take: 336 MB
    grew = (report["peak_rss_kb"] - report["base_rss_kb"]) * 1024
    control = (report["control_rss_kb"] - report["peak_rss_kb"]) * 1024
    assert control > n * 784 * 4 * 0.9, f"the measure missed a {n * 784 * 4 / 2**20:.0f} MiB array: {report}"
    assert grew < whole / 4, f"peak RSS grew by {grew / 2**20:.0f} MiB streaming n={n}; holding it all is {whole / 2**20:.0f} MiB"
    assert report["traced_peak_bytes"] < 32 * max_batch * (28 * 28 + 56) * 4, report  # a few chunks, not n
