"""What would go wrong the first time the GPU code runs (issue 25), checked with stand-ins
(tests/fakegpu.py) that model what hid each defect: TensorRT's default TF32 flag, its
version-compatibility pairs and platforms. No GPU here: not run on a GPU."""
from __future__ import annotations

import json

import pytest

import fakegpu
from test_edge import build, cache, shared_bundle  # noqa: F401  (fixtures)
from vce_deploy import Converter, engine_cache
from vce_deploy.errors import BackendError






def test_fp32_engines_are_built_with_tf32_cleared(shared_bundle, cache):  # noqa: F811
    with pytest.MonkeyPatch.context() as mp:
        fakegpu.install(mp)
        assert build(shared_bundle, "--precision", "fp32") == 0
    plan_bytes = [p.read_bytes() for p in cache.rglob("*.plan")]
    assert plan_bytes and all(b'"tf32"' not in blob for blob in plan_bytes), "TensorRT's default TF32 left on"


@pytest.mark.parametrize("built, runtime, runs", [
    ("10.3.0", "10.8.0", True), ("10.9.0", "11.0.1", True), ("8.6.1", "10.3.0", True), ("9.2.0", "10.0.0", True),
    ("8.6.1", "11.0.0", False), ("8.5.3", "8.6.1", False), ("10.8.0", "10.3.0", False), ("11.0.0", "10.9.0", False)])
def test_version_compatible_plans_load_only_on_the_allowed_pairs(built, runtime, runs):
    assert engine_cache.version_compatible_runs(built, runtime) is runs


def test_a_tensorrt_8_version_compatible_folder_is_not_tried_on_tensorrt_11(tmp_path):
    (tmp_path / "trt-8.x").mkdir()
    (tmp_path / "trt-10.x").mkdir()
    found, rejected = engine_cache.lookup(tmp_path, "0" * 64, "convertor", "fp32", "11.0.0", "NVIDIA H100", "9.0")
    assert found is None and not any("trt-8" in reason for reason in rejected)


def test_hardware_compatible_engines_are_keyed_by_platform(shared_bundle, cache, monkeypatch):  # noqa: F811
    monkeypatch.setattr(engine_cache.platform, "machine", lambda: "x86_64")
    fakegpu.install(monkeypatch, devices=[("NVIDIA A100", 8, 0)])
    assert build(shared_bundle, "--precision", "fp16", "--hardware-compatible") == 0
    assert list(cache.glob("trt-*/ampere-plus-x86_64"))
    monkeypatch.setattr(engine_cache.platform, "machine", lambda: "aarch64")  # an SBSA / Grace machine
    fakegpu.install(monkeypatch, devices=[("NVIDIA GH200", 9, 0)])
    with pytest.raises(BackendError, match="only for trt-10.3.0/ampere-plus-x86_64"):
        Converter.load(shared_bundle, backend="tensorrt", precision="fp16")
