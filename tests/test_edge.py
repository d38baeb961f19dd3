"""Edge GPUs: `vce build`, the engine cache and the TensorRT runner, driven through stand-ins
for cuda-python and TensorRT (tests/fakegpu.py). They check how the documented APIs are
called, not that TensorRT works: no GPU or TensorRT here (docs/edge.md)."""
from __future__ import annotations

import hashlib
import json
import shutil
import stat
import threading
import types
from pathlib import Path

import numpy as np
import pytest

import fakegpu
from vce_deploy import Converter
from vce_deploy.backends import HostLatentSampler
from vce_deploy.backends.tensorrt import EngineRunner
from vce_deploy.bundle import DEFAULT_BUNDLE, Bundle
from vce_deploy.cli import main as vce
from vce_deploy.errors import BackendError, EngineMismatchError, InputError

ORIN = ("NVIDIA Jetson AGX Orin", 8, 7)


def tree_digest(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture
def shared_bundle(tmp_path) -> Path:
    """The shipped bundle, copied and made read-only, as a shared install would be."""
    copy = tmp_path / "bundle"
    shutil.copytree(DEFAULT_BUNDLE, copy)
    for path in [copy, *copy.rglob("*")]:
        path.chmod(path.stat().st_mode & ~(stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH))
    yield copy
    for path in [copy, *copy.rglob("*")]:
        path.chmod(path.stat().st_mode | stat.S_IWUSR)


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    root = tmp_path / "engines"
    monkeypatch.setenv("VCE_ENGINE_CACHE", str(root))
    return root


def build(bundle, *flags) -> int:
    return vce(["build", str(bundle), *flags])


def glyphs(count: int) -> np.ndarray:
    return (np.random.default_rng(1).random((count, 28, 28)) < 0.3).astype(np.float32)


def test_build_writes_engines_to_the_cache_and_leaves_a_read_only_bundle_alone(shared_bundle, cache, monkeypatch):
    _, trt = fakegpu.install(monkeypatch)
    before = tree_digest(shared_bundle)
    assert build(shared_bundle, "--precision", "fp16", "--min-batch", "2", "--opt-batch", "8",
                 "--max-batch", "32") == 0
    assert tree_digest(shared_bundle) == before
    bundle = Bundle.load(shared_bundle)
    folder = cache / "trt-10.3.0" / "nvidia-jetson-agx-orin-sm87"
    for role in ("encoder", "convertor"):
        onnx_sha = bundle.model_entry(role, "fp16").sha256
        record = json.loads((folder / f"onnx-{onnx_sha}" / f"{role}.fp16.json").read_text())
        plan = (folder / f"onnx-{onnx_sha}" / f"{role}.fp16.plan").read_bytes()
        assert record["sha256"] == hashlib.sha256(plan).hexdigest()
        assert record["engine"]["gpu_name"] == "NVIDIA Jetson AGX Orin"
        assert (record["engine"]["min_batch"], record["engine"]["max_batch"]) == (2, 32)
    assert ("create_network", 1 << 2) in trt.calls, "a strongly typed network"
    assert ("set_shape", "z", (2, 56), (8, 56), (32, 56)) in trt.calls


def test_engine_with_min_batch_above_one_pads_short_chunks(shared_bundle, cache, monkeypatch):
    _, trt = fakegpu.install(monkeypatch)
    assert build(shared_bundle, "--precision", "fp32", "--min-batch", "4", "--opt-batch", "8", "--max-batch", "16") == 0
    converter = Converter.load(shared_bundle, backend="tensorrt")
    assert (converter.backend.min_batch_limit, converter.max_batch) == (4, 16)
    images = glyphs(2)
    y = converter.convert(images, n=9, seed=3, temperature=1.0)  # 18 rows: a chunk of 16, then 2 (< min 4)
    latents = HostLatentSampler(3).draw(18, 56, 1.0)
    conditions = np.repeat(images[:, None], 9, axis=0)
    expected = fakegpu.fake_compute("convertor", {"z": latents, "q": conditions}, 56)["y"]
    np.testing.assert_allclose(y.reshape(18, 1, 28, 28), expected, rtol=1e-6)
    mu, logvar = converter.run_encoder(images[:1, None], images[1:, None])  # one row, below min
    assert mu.shape == (1, 56) and np.array_equal(logvar, -mu)
    assert all(4 <= batch <= 16 for _, batch in trt.executed), trt.executed
    with pytest.raises(InputError, match=r"max_batch: expected 4\.\.16 .* got 2"):
        Converter.load(shared_bundle, backend="tensorrt", max_batch=2)


def test_runner_states_the_real_batch_range(shared_bundle, cache, monkeypatch):
    fakegpu.install(monkeypatch)
    assert build(shared_bundle, "--precision", "fp32", "--min-batch", "4", "--max-batch", "16", "--opt-batch", "8") == 0
    converter = Converter.load(shared_bundle, backend="tensorrt")
    runner = converter.backend._runners["convertor"]
    assert isinstance(runner, EngineRunner)
    with pytest.raises(BackendError, match=r"allows batch 4\.\.16"):
        runner.run({"z": np.zeros((2, 56), np.float32), "q": np.zeros((2, 1, 28, 28), np.float32)})


def test_every_call_sets_its_device_on_its_own_thread(shared_bundle, cache, monkeypatch):
    cudart, _ = fakegpu.install(monkeypatch, devices=[("NVIDIA A100", 8, 0), ("NVIDIA A100", 8, 0)])
    assert build(shared_bundle, "--precision", "fp32", "--device", "1") == 0
    converter = Converter.load(shared_bundle, backend="tensorrt", device="cuda:1")
    results, errors = [], []

    def call():  # a fresh host thread starts on device 0
        try:
            results.append(converter.convert(glyphs(1), n=4, seed=0))
        except Exception as err:  # noqa: BLE001 - reported below
            errors.append(err)

    threads = [threading.Thread(target=call) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors and not cudart.wrong_device, (errors, cudart.wrong_device)
    assert all(np.array_equal(r, results[0]) for r in results)


def test_build_uses_and_records_the_requested_gpu(shared_bundle, cache, monkeypatch):
    _, trt = fakegpu.install(monkeypatch, devices=[("NVIDIA A100", 8, 0), ("NVIDIA L4", 8, 9)])
    assert build(shared_bundle, "--precision", "fp32", "--device", "1") == 0
    assert ("builder_on_device", 1) in trt.calls and ("builder_on_device", 0) not in trt.calls
    records = list((cache / "trt-10.3.0" / "nvidia-l4-sm89").rglob("*.json"))
    assert len(records) == 2
    assert all(json.loads(r.read_text())["engine"]["compute_capability"] == "8.9" for r in records)
    assert build(shared_bundle, "--precision", "fp32", "--device", "2") == 1  # no such GPU: refused


def test_timing_cache_is_kept_per_gpu_and_tensorrt_version(shared_bundle, cache, monkeypatch):
    _, trt = fakegpu.install(monkeypatch, devices=[("NVIDIA A100", 8, 0), ("NVIDIA L4", 8, 9)])
    assert build(shared_bundle, "--precision", "fp32", "--device", "0") == 0
    assert build(shared_bundle, "--precision", "fp32", "--device", "1") == 0
    a100 = cache / "trt-10.3.0" / "nvidia-a100-sm80" / "timing.cache"
    l4 = cache / "trt-10.3.0" / "nvidia-l4-sm89" / "timing.cache"
    assert a100.read_bytes() == b"timings:10.3.0/NVIDIA A100/8.0"
    assert l4.read_bytes() == b"timings:10.3.0/NVIDIA L4/8.9"
    assert ("timing_cache_in", b"timings:10.3.0/NVIDIA L4/8.9") not in trt.calls[:trt.calls.index(
        ("builder_on_device", 1))], "the L4 build never read the A100's timings"


def test_a_timing_cache_tensorrt_cannot_read_falls_back_to_an_empty_one(shared_bundle, cache, monkeypatch):
    _, trt = fakegpu.install(monkeypatch, reject_timing_cache=True)
    timing = cache / "trt-10.3.0" / "nvidia-jetson-agx-orin-sm87" / "timing.cache"
    timing.parent.mkdir(parents=True)
    timing.write_bytes(b"garbage from another TensorRT")
    assert build(shared_bundle, "--precision", "fp32") == 0  # create_timing_cache returned None: checked
    assert ("timing_cache_in", b"") in trt.calls


def test_tensorrt_8_is_refused_by_name(shared_bundle, cache, monkeypatch, capsys):
    _, trt = fakegpu.install(monkeypatch, version="8.5.2")
    del type(trt).NetworkDefinitionCreationFlag  # TensorRT 8 has no STRONGLY_TYPED
    try:
        assert build(shared_bundle, "--precision", "fp32") == 1
        assert "TensorRT 8.5.2 is too old: expected TensorRT 10 or newer" in capsys.readouterr().err
        with pytest.raises(BackendError, match="TensorRT 8.5.2 is too old"):
            Converter.load(shared_bundle, backend="tensorrt")
    finally:
        type(trt).NetworkDefinitionCreationFlag = type("NetworkDefinitionCreationFlag", (), {"STRONGLY_TYPED": 2})


def test_host_copies_are_pinned_on_a_non_blocking_stream_with_one_wait_per_chunk(shared_bundle, cache, monkeypatch):
    cudart, _ = fakegpu.install(monkeypatch)
    assert build(shared_bundle, "--precision", "fp32", "--min-batch", "1", "--opt-batch", "8",
                 "--max-batch", "16") == 0
    converter = Converter.load(shared_bundle, backend="tensorrt")
    assert cudart.stream_flags and set(cudart.stream_flags) == {cudart.cudaStreamNonBlocking}
    cudart.copies.clear()
    cudart.syncs = 0
    converter.convert(glyphs(3), n=10, seed=0)  # 30 rows: chunks of 16 and 14
    assert cudart.syncs == 2
    assert cudart.copies and all(pinned for _, pinned in cudart.copies), cudart.copies


def test_version_and_hardware_compatible_engines_run_on_later_tensorrt_and_other_gpus(shared_bundle, cache,
                                                                                      monkeypatch):
    fakegpu.install(monkeypatch, devices=[("NVIDIA A100", 8, 0)], version="10.3.0")  # discrete: hw-compat allowed
    assert build(shared_bundle, "--precision", "fp32") == 0
    assert build(shared_bundle, "--precision", "fp16", "--version-compatible", "--hardware-compatible") == 0
    fakegpu.install(monkeypatch, devices=[("NVIDIA L4", 8, 9)], version="10.8.0")
    with pytest.raises(EngineMismatchError, match=r"only for trt-10\.3\.0/nvidia-a100-sm80; this is TensorRT 10\.8\.0 on NVIDIA L4 "
                       r"\(compute capability 8\.9\)\. Rebuild it here with `vce build .* --precision fp32`"):
        Converter.load(shared_bundle, backend="tensorrt", precision="fp32")
    converter = Converter.load(shared_bundle, backend="tensorrt", precision="fp16")
    assert converter.backend._runtime.engine_host_code_allowed
    assert converter.convert(glyphs(1), n=2, seed=0).shape == (1, 2, 28, 28)
    fakegpu.install(monkeypatch, devices=[("Tesla T4", 7, 5)], version="10.8.0")  # before Ampere
    with pytest.raises(BackendError, match="no TensorRT engine at fp16|built for"):
        Converter.load(shared_bundle, backend="tensorrt", precision="fp16")


def test_into_bundle_lists_the_engines_in_the_manifest(tmp_path, cache, monkeypatch):
    fakegpu.install(monkeypatch)
    bundle = tmp_path / "own"
    shutil.copytree(DEFAULT_BUNDLE, bundle)
    assert build(bundle, "--precision", "int8", "--into-bundle") == 0
    loaded = Bundle.load(bundle)
    assert [e.path for e in loaded.entries(format="tensorrt")] == ["engines/convertor.int8.plan",
                                                                   "engines/encoder.int8.plan"]
    assert not list(cache.rglob("*.plan")), "no engine went to the cache (only the timing cache)"
    converter = Converter.load(bundle, backend="tensorrt", precision="int8")
    assert "engines from " + str(bundle) in converter.backend_info.detail


def test_build_without_tensorrt_or_gpu_says_so_and_writes_nothing(shared_bundle, cache, monkeypatch, capsys):
    import sys

    from vce_deploy.backends import cuda

    monkeypatch.setitem(sys.modules, "tensorrt", None)
    assert build(shared_bundle) == 1
    assert "TensorRT is not installed" in capsys.readouterr().err
    cudart, _ = fakegpu.install(monkeypatch, devices=[])
    assert cuda.gpu_count() == 0
    assert build(shared_bundle) == 1
    assert "no CUDA GPU is visible" in capsys.readouterr().err
    assert not cache.exists()


def test_export_tensorrt_forwards_to_vce_build(shared_bundle, cache, monkeypatch):
    from export.tensorrt import main

    fakegpu.install(monkeypatch)
    assert main([str(shared_bundle), "--precision", "fp32"]) == 0
    assert len(list(cache.rglob("*.plan"))) == 2


# -- ONNX Runtime on edge GPUs -------------------------------------------------------------------

class _OrtWithGpuProviders:
    """The real onnxruntime, claiming TensorRT and CUDA providers: sessions run on the CPU,
    and the providers each was asked for are recorded."""

    def __init__(self, providers=("TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"),
                 fail_with: Exception | None = None):
        import onnxruntime

        self.real, self.available, self.fail_with = onnxruntime, list(providers), fail_with
        self.requested: list = []
        self.__version__ = onnxruntime.__version__
        for name in ("SessionOptions", "GraphOptimizationLevel", "ExecutionMode"):
            setattr(self, name, getattr(onnxruntime, name))

    def get_available_providers(self):
        return self.available

    def InferenceSession(self, model, options, providers):  # noqa: N802 - ORT's name
        if self.fail_with is not None:
            raise self.fail_with
        self.requested.append(providers)
        session = self.real.InferenceSession(model, options, providers=["CPUExecutionProvider"])
        claimed = [p if isinstance(p, str) else p[0] for p in providers]
        return types.SimpleNamespace(run=session.run, get_inputs=session.get_inputs, get_outputs=session.get_outputs,
                                     io_binding=session.io_binding, get_providers=lambda: claimed)


def test_ort_tensorrt_provider_caches_engines_and_timings_per_gpu(cache, monkeypatch):
    from vce_deploy.backends import onnxruntime as ort_backend

    fakegpu.install(monkeypatch)
    fake = _OrtWithGpuProviders()
    monkeypatch.setattr(ort_backend, "_ort", lambda: fake)
    converter = Converter.load(backend="onnxruntime", device="cuda:0")
    (trt_name, options), (cuda_name, cuda_options), cpu = fake.requested[0]
    assert (trt_name, cuda_name, cpu) == ("TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider")
    where = cache / f"onnxruntime-{fake.__version__}" / "nvidia-jetson-agx-orin-sm87"
    assert options == {"device_id": 0, "trt_engine_cache_enable": True, "trt_engine_cache_path": str(where),
                       "trt_timing_cache_enable": True, "trt_timing_cache_path": str(where),
                       "trt_profile_min_shapes": "x:1x1x28x28,q:1x1x28x28",  # the encoder's session first
                       "trt_profile_opt_shapes": "x:64x1x28x28,q:64x1x28x28",
                       "trt_profile_max_shapes": "x:256x1x28x28,q:256x1x28x28"}
    assert where.is_dir() and cuda_options == {"device_id": 0}
    assert converter.convert(glyphs(1), n=2, seed=0).shape == (1, 2, 28, 28)


def test_jetson_gpu_is_found_without_the_discrete_driver_listing(tmp_path, monkeypatch):
    from vce_deploy.backends import cuda

    monkeypatch.setattr(cuda, "gpu_count", lambda: 0)  # no cuda-python
    assert not cuda.gpu_visible(tmp_path)
    orin = tmp_path / "orin"
    (orin / "dev/nvgpu/igpu0").mkdir(parents=True)
    assert cuda.gpu_visible(orin)
    tree = tmp_path / "tree"
    (tree / "proc/device-tree").mkdir(parents=True)
    (tree / "proc/device-tree/compatible").write_bytes(b"nvidia,p3737-0000+p3701-0005\0nvidia,tegra234\0")
    assert cuda.gpu_visible(tree)
    desktop = tmp_path / "desktop"
    (desktop / "proc/driver/nvidia/gpus/0000:01:00.0").mkdir(parents=True)
    assert cuda.gpu_visible(desktop)


def test_both_onnxruntime_wheels_installed_is_named_with_the_fix(monkeypatch):
    from vce_deploy.backends import onnxruntime as ort_backend

    assert [name for name, _ in ort_backend.installed_distributions()] == ["onnxruntime"]  # this machine
    monkeypatch.setattr(ort_backend, "installed_distributions",
                        lambda: [("onnxruntime", "1.20.1"), ("onnxruntime-gpu", "1.20.1")])
    monkeypatch.setattr(ort_backend, "_ort", lambda: _OrtWithGpuProviders(providers=["CPUExecutionProvider"]))
    problem = ort_backend.OnnxRuntimeBackend.unavailable(Bundle.load(DEFAULT_BUNDLE), "fp32", "cuda")
    assert "onnxruntime 1.20.1 and onnxruntime-gpu 1.20.1 are all installed" in str(problem)
    assert "pip uninstall -y onnxruntime onnxruntime-gpu && pip install onnxruntime-gpu" in str(problem)
    converter = Converter.load(backend="onnxruntime", device="cpu")
    assert "warning: onnxruntime 1.20.1 and onnxruntime-gpu 1.20.1" in converter.backend_info.detail


def test_a_cpu_load_failure_is_not_called_a_broken_bundle(monkeypatch):
    from vce_deploy.backends import onnxruntime as ort_backend
    from vce_deploy.errors import BundleError

    Fail = type("Fail", (RuntimeError,), {})  # noqa: N806 - onnxruntime's own exception name
    fake = _OrtWithGpuProviders(fail_with=Fail("[ONNXRuntimeError] : 1 : FAIL : Opset 23 is under development"))
    monkeypatch.setattr(ort_backend, "_ort", lambda: fake)
    with pytest.raises(BackendError) as err:
        Converter.load(backend="onnxruntime", device="cpu")
    assert not isinstance(err.value, BundleError)
    assert f"onnxruntime {fake.__version__} could not load" in str(err.value) and "Opset 23" in str(err.value)
    assert "matches its sha256" in str(err.value)


def test_hardware_compatible_is_refused_on_jetson(shared_bundle, cache, monkeypatch, capsys):
    from vce_deploy.backends import cuda

    fakegpu.install(monkeypatch)
    monkeypatch.setattr(cuda, "tegra_gpu", lambda root=None: True)
    assert build(shared_bundle, "--hardware-compatible") == 1
    assert "not on JetPack" in capsys.readouterr().err
    assert not list(cache.rglob("*.plan"))


def test_a_version_compatible_engine_of_tensorrt_10_runs_on_tensorrt_11(shared_bundle, cache, monkeypatch):
    fakegpu.install(monkeypatch, version="10.9.0")
    assert build(shared_bundle, "--precision", "fp32", "--version-compatible") == 0
    fakegpu.install(monkeypatch, version="11.0.1")
    assert Converter.load(shared_bundle, backend="tensorrt").backend._runtime.engine_host_code_allowed
    fakegpu.install(monkeypatch, version="10.3.0")  # older than the builder: refused
    with pytest.raises(BackendError, match="no TensorRT engine at fp32|built for"):
        Converter.load(shared_bundle, backend="tensorrt")
