"""The openvino backend, bf16 and the CPU int8 form as precisions, and what "auto" picks from
the CPU's flags: clear errors, never a silent fallback to another precision."""
from __future__ import annotations

import json
import shutil
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from vce_deploy import BackendError, BundleError, Converter, InputError
from vce_deploy.backends import auto
from vce_deploy.bundle import Bundle, write_raw_manifest
from vce_deploy.cpu import CPU_CLASSES, CpuInfo, parse_cpuinfo, this_cpu

pytest.importorskip("openvino")
AMX_XEON = CpuInfo("Xeon with AMX", frozenset({"avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_bf16",
                                               "amx_int8", "amx_tile"}))
VNNI_ONLY = CpuInfo("Cascade Lake", frozenset({"avx2", "avx512f", "avx512_vnni"}))
EPYC_AVX2 = CpuInfo("AMD EPYC without AVX-512", frozenset({"avx2", "fma"}))
needs_bf16 = pytest.mark.skipif(not this_cpu().native_bf16, reason="this CPU has no native bf16")


@pytest.fixture(scope="module")
def feeds():
    rng = np.random.default_rng(3)
    return {"z": rng.standard_normal((5, 56), dtype=np.float32),
            "q": (rng.random((5, 1, 28, 28)) > 0.8).astype(np.float32)}


@pytest.fixture(scope="module")
def reference(bundle, feeds):
    return Converter.load(bundle, backend="onnxruntime", precision="fp32").backend.run("convertor", feeds)["y"]


def test_parse_cpuinfo_reads_model_and_flags():
    info = parse_cpuinfo("processor\t: 0\nmodel name\t: Some CPU\nflags\t\t: fpu avx2 amx_bf16 avx512_vnni\n\n"
                         "processor\t: 1\nmodel name\t: Other\nflags\t\t: fpu\n")
    assert info.model == "Some CPU" and info.native_bf16 and info.native_int8
    assert info.reported_flags == ["avx2", "avx512_vnni", "amx_bf16"]
    assert not parse_cpuinfo("flags : avx2 fma").native_bf16


def test_fp32_matches_onnxruntime_and_reads_the_fp32_files(bundle, feeds, reference):
    conv = Converter.load(bundle, backend="openvino", precision="fp32")
    y = conv.backend.run("convertor", feeds)["y"]
    assert y.shape == reference.shape and y.dtype == np.float32
    assert np.abs(y - reference).max() < 1e-4
    assert "INFERENCE_PRECISION_HINT f32" in conv.backend_info.detail and "convertor.onnx (consumer any)" in conv.backend_info.detail


@needs_bf16
def test_bf16_computes_in_bfloat16_within_its_tolerance(bundle, feeds, reference):
    y = Converter.load(bundle, backend="openvino", precision="bf16").backend.run("convertor", feeds)["y"]
    error = np.abs(y - reference).max()
    assert 0 < error < 0.1, error  # not fp32 (the hint took effect), not broken


def test_int8_runs_the_cpu_form(bundle, feeds, reference):
    conv = Converter.load(bundle, backend="openvino", precision="int8")
    assert "convertor.int8.cpu.onnx (consumer cpu)" in conv.backend_info.detail
    y = conv.backend.run("convertor", feeds)["y"]
    assert 0 < np.abs(y - reference).max() < 0.5


def test_bf16_without_native_bf16_names_what_runs(bundle, monkeypatch):
    monkeypatch.setattr("vce_deploy.backends.openvino.this_cpu", lambda: EPYC_AVX2)
    with pytest.raises(BackendError, match=r"needs a CPU with native bfloat16 .* openvino here runs \['fp32', 'int8'\]"):
        Converter.load(bundle, backend="openvino", precision="bf16")


@pytest.mark.parametrize("backend, precision, expected", [
    ("onnxruntime", "bf16", r"onnxruntime runs precisions \['fp32', 'fp16', 'int8'\], not 'bf16'; bf16 is run by \['openvino'\]"),
    ("openvino", "fp16", r"openvino runs precisions \['fp32', 'bf16', 'int8'\], not 'fp16'"),
    ("onnxruntime", "auto", r"precision='auto' picks the backend too"),
])
def test_a_precision_the_backend_cannot_run_is_refused(bundle, backend, precision, expected):
    with pytest.raises(BackendError, match=expected):
        Converter.load(bundle, backend=backend, precision=precision)


def test_openvino_device_names_pass_only_to_openvino(bundle):
    with pytest.raises(BackendError, match=r"onnxruntime does not run on device 'GPU'; backends for it: \['openvino'\]"):
        Converter.load(bundle, backend="onnxruntime", device="GPU")


def test_backend_options(bundle, feeds, reference):
    conv = Converter.load(bundle, backend="openvino", backend_options={"performance_hint": "LATENCY"})
    assert "performance_hint LATENCY" in conv.backend_info.detail
    assert np.abs(conv.backend.run("convertor", feeds)["y"] - reference).max() < 1e-4
    with pytest.raises(InputError, match=r"openvino takes \['performance_hint'\], got 'streams'"):
        Converter.load(bundle, backend="openvino", backend_options={"streams": 2})
    with pytest.raises(InputError, match=r"expected one of \['LATENCY_AND_THROUGHPUT', 'LATENCY', 'THROUGHPUT'"):
        Converter.load(bundle, backend="openvino", backend_options={"performance_hint": "FAST"})


def test_a_batch_split_across_streams_equals_the_whole_batch(bundle, reference, feeds):
    conv = Converter.load(bundle, backend="openvino", precision="fp32")
    assert conv.backend.streams >= 1
    rng = np.random.default_rng(0)
    z = rng.standard_normal((40, 56), dtype=np.float32)
    q = (rng.random((40, 1, 28, 28)) > 0.8).astype(np.float32)
    whole = Converter.load(bundle, backend="onnxruntime").backend.run("convertor", {"z": z, "q": q})["y"]
    split = conv.backend.run("convertor", {"z": z, "q": q})["y"]  # 40 rows: one slice per stream
    assert split.shape == whole.shape and np.abs(split - whole).max() < 1e-4


def test_one_converter_shared_by_threads_gives_each_call_its_own_answer(bundle):
    conv = Converter.load(bundle, backend="openvino", precision="fp32")
    glyph = np.zeros((28, 28), np.float32)
    glyph[5:20, 12:15] = 1
    serial = {seed: conv.convert(glyph, n=3 + seed % 4, seed=seed) for seed in range(16)}
    with ThreadPoolExecutor(4) as pool:
        shared = dict(zip(range(16), pool.map(lambda s: conv.convert(glyph, n=3 + s % 4, seed=s), range(16))))
    for seed in serial:
        np.testing.assert_array_equal(shared[seed], serial[seed])


# -- "auto" ---------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def costed_bundle(bundle, tmp_path_factory):
    """The fixture bundle with every precision's NLL cost stated: what its own manifest records
    depends on the CPU that exported it (bf16 is measured only where the CPU has it)."""
    copy = tmp_path_factory.mktemp("costed") / "bundle"
    shutil.copytree(bundle, copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    nll = manifest["metrics"].setdefault("nll", {})
    for variant, cost in (("bf16", 0.01), ("int8-cpu", 0.08), ("int8-tensorrt", 0.1), ("fp16", 0.0)):
        nll[variant] = {**nll.get(variant, {}), "cost_vs_fp32": cost}
    write_raw_manifest(copy, manifest)
    return copy


def test_auto_plan_follows_the_cpu_flags(costed_bundle):
    loaded = Bundle.load(costed_bundle)
    plan, notes = auto.cpu_plan(loaded, AMX_XEON)
    assert plan[0] == ("openvino", "bf16") and ("openvino", "int8") in plan and plan[-2:] == [
        ("onnxruntime", "fp32"), ("openvino", "fp32")]
    plan, notes = auto.cpu_plan(loaded, VNNI_ONLY)
    assert plan[0] == ("openvino", "int8") and all(p != "bf16" for _, p in plan)
    assert any("bf16 left out: this CPU has no native bf16" in n for n in notes)
    plan, _ = auto.cpu_plan(loaded, EPYC_AVX2)
    assert plan == [("onnxruntime", "fp32"), ("openvino", "fp32")]
    # Zen 4: AVX512-BF16 and VNNI without AMX; native bf16 first, as on the AMX Xeon
    assert auto.cpu_plan(loaded, CPU_CLASSES["zen4"])[0] == auto.cpu_plan(loaded, AMX_XEON)[0]


def test_auto_leaves_out_a_precision_that_costs_too_much_or_was_not_measured(bundle, tmp_path):
    copy = tmp_path / "costly"
    shutil.copytree(bundle, copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["metrics"]["nll"]["bf16"] = {"cost_vs_fp32": 0.9}
    manifest["metrics"]["nll"].pop("int8-cpu", None)
    manifest["metrics"]["nll"].pop("int8", None)
    write_raw_manifest(copy, manifest)
    plan, notes = auto.cpu_plan(Bundle.load(copy), AMX_XEON)
    assert plan == [("onnxruntime", "fp32"), ("openvino", "fp32")]
    assert any("bf16 left out: NLL cost +0.900 nats > 0.5" in n for n in notes)
    assert any("int8 left out: the manifest states no NLL cost" in n for n in notes)


def test_auto_precision_here_says_what_and_why(bundle):
    conv = Converter.load(bundle, precision="auto")
    reason = conv.backend_info.reason
    assert this_cpu().model in reason
    if this_cpu().native_bf16 and auto.nll_cost(conv.bundle, "bf16") is not None:
        assert (conv.backend.name, conv.precision) == ("openvino", "bf16")
        assert "bf16: native bf16" in reason
    assert Converter.load(bundle).precision == "fp32", "the default precision stays fp32"


def test_unknown_consumer_is_refused_and_a_missing_one_means_any(bundle, tmp_path):
    copy = tmp_path / "consumers"
    shutil.copytree(bundle, copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    for entry in manifest["files"].values():
        entry.pop("consumer", None)
    manifest["files"] = {p: e for p, e in manifest["files"].items() if ".cpu." not in p}
    write_raw_manifest(copy, manifest)
    assert Bundle.load(copy, verify=False).model_entry("convertor", "int8").consumer == "any"
    manifest["files"]["convertor.onnx"]["consumer"] = "gpu-somewhere"
    write_raw_manifest(copy, manifest)
    with pytest.raises(BundleError, match=r"expected consumer in \('any', 'tensorrt', 'cpu'\), got 'gpu-somewhere'"):
        Bundle.load(copy, verify=False)
