"""The bundle contract: a verified load refuses a changed byte, a missing file, a path out of
the bundle and an unknown format version, each with an error that names it."""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vce_deploy.bundle import Bundle, resolve_inside, sha256_file, write_raw_manifest
from vce_deploy.bundle_swap import atomic_directory
from vce_deploy.errors import BundleError


@pytest.fixture
def bundle(smoke_bundle, tmp_path) -> Path:
    copy = tmp_path / "bundle"
    shutil.copytree(smoke_bundle, copy)
    return copy


def edit_manifest(root: Path, change) -> None:
    """Change the manifest and re-seal it, so only the change under test can be refused."""
    raw = json.loads((root / "manifest.json").read_text())
    change(raw)
    write_raw_manifest(root, raw)


def test_intact_bundle_loads(bundle):
    loaded = Bundle.load(bundle)
    assert loaded.model_entry("convertor", "int8", "onnx", ("tensorrt",)).path == "convertor.int8.onnx"
    assert loaded.model_entry("convertor", "int8", "onnx", ("cpu",)).path == "convertor.int8.cpu.onnx"
    assert loaded.checkpoint == (bundle / "checkpoint.safetensors").resolve()


@pytest.mark.parametrize("name", ["convertor.onnx", "encoder.int8.onnx", "checkpoint.safetensors"])
def test_one_changed_byte_is_refused(bundle, name):
    data = bytearray((bundle / name).read_bytes())
    data[len(data) // 2] ^= 0x01
    (bundle / name).write_bytes(bytes(data))
    with pytest.raises(BundleError, match=rf"{name!r} has sha256 .* the file was changed"):
        Bundle.load(bundle)


def test_runtime_refuses_a_tampered_bundle(bundle):
    from vce_deploy import Converter

    with open(bundle / "encoder.onnx", "ab") as handle:
        handle.write(b"\0")
    with pytest.raises(BundleError, match="encoder.onnx"):
        Converter.load(bundle, backend="onnxruntime")


def test_missing_file_is_refused(bundle):
    (bundle / "convertor.fp16.onnx").unlink()
    with pytest.raises(BundleError, match=r"lists 'convertor.fp16.onnx', but the file is missing"):
        Bundle.load(bundle)


@pytest.mark.parametrize("escape", ["../outside.onnx", "engines/../../outside.onnx", "/tmp/outside.onnx"])
def test_path_leaving_the_bundle_is_refused(bundle, escape):
    outside = bundle.parent / "outside.onnx"
    shutil.copy(bundle / "encoder.onnx", outside)  # a real file with a matching hash: only the path is wrong
    entry = json.loads((bundle / "manifest.json").read_text())["files"]["encoder.onnx"]
    entry = dict(entry, sha256=sha256_file(outside))
    edit_manifest(bundle, lambda raw: raw["files"].update({escape: entry}))
    with pytest.raises(BundleError, match="inside the bundle|leaves the bundle"):
        Bundle.load(bundle)


def test_symlink_out_of_the_bundle_is_refused(bundle):
    outside = bundle.parent / "elsewhere.onnx"
    shutil.move(bundle / "encoder.onnx", outside)
    os.symlink(outside, bundle / "encoder.onnx")
    with pytest.raises(BundleError, match="outside the bundle"):
        Bundle.load(bundle)


@pytest.mark.parametrize("version", [0, 3, "1", "2", None, True])
def test_unknown_format_version_is_refused(bundle, version):
    edit_manifest(bundle, lambda raw: raw.update(format_version=version))
    with pytest.raises(BundleError, match=rf"expected format_version in \[1, 2\], got {version!r}"):
        Bundle.load(bundle)


def test_missing_manifest_is_refused(bundle):
    (bundle / "manifest.json").unlink()
    with pytest.raises(BundleError, match="manifest.json"):
        Bundle.load(bundle)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.sampled_from(["a", "b.onnx", "..", ".", "engines", ""]), min_size=1, max_size=5))
def test_resolve_inside_never_leaves_root(tmp_path_factory, parts):
    root = tmp_path_factory.getbasetemp() / "root"
    root.mkdir(exist_ok=True)
    relative = "/".join(parts)
    try:
        target = resolve_inside(root, relative)
    except BundleError:
        assert ".." in parts or "" in parts or relative.startswith("/")
        return
    assert target.is_relative_to(root.resolve())


def test_atomic_directory_keeps_the_old_one_on_failure(tmp_path):
    final = tmp_path / "b"
    final.mkdir()
    (final / "manifest.json").write_text("old")  # only a bundle (or nothing) may be replaced
    with pytest.raises(RuntimeError):
        with atomic_directory(final) as stage:
            (stage / "new").write_text("new")
            raise RuntimeError("export failed")
    assert [p.name for p in final.iterdir()] == ["manifest.json"]
    assert [p.name for p in tmp_path.iterdir()] == ["b"]
    with atomic_directory(final) as stage:
        (stage / "new").write_text("new")
    assert [p.name for p in final.iterdir()] == ["new"]
