"""What would go wrong the first time the GPU code runs (issue 25), checked with stand-ins
(tests/fakegpu.py) that model what hid each defect: TensorRT's default TF32 flag, its
version-compatibility pairs and platforms. No GPU here: not run on a GPU."""
from __future__ import annotations

import json
import types

import numpy as np
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


def device_sampler(monkeypatch, seed):
    from vce_deploy.backends import cuda

    fake = fakegpu.FakeCupy()
    monkeypatch.setattr(cuda, "cupy_or_none", lambda: fake)
    return fake, cuda.DeviceLatentSampler(seed, 0)


def test_device_noise_is_the_same_whatever_the_chunking(monkeypatch):
    _, whole = device_sampler(monkeypatch, 7)
    one = whole.draw(300, 56, 1.0)  # what convert draws: every row at once
    _, chunked = device_sampler(monkeypatch, 7)
    parts = [chunked.draw(count, 56, 1.0) for count in (64, 200, 36)]  # what convert_iter draws
    np.testing.assert_array_equal(np.concatenate(parts), one)
    _, other = device_sampler(monkeypatch, 8)
    assert not np.array_equal(other.draw(300, 56, 1.0), one)


def test_device_noise_is_set_up_and_drawn_on_the_callers_stream(monkeypatch):
    fake, sampler = device_sampler(monkeypatch, 0)
    with fake.cuda.ExternalStream(1234, 0):  # what the TensorRT backend enters (its runner's stream)
        sampler.draw(10, 56, 0.5)
    assert fake.events and {stream for _, stream in fake.events} == {"ext1234"}, fake.events


def test_cupy_hint_names_the_wheel_for_the_cuda_major(monkeypatch):
    from vce_deploy.backends import cuda

    cudart, _ = fakegpu.install(monkeypatch)
    monkeypatch.setattr(cudart, "cudaDriverGetVersion", lambda: (cudart.cudaError_t.cudaSuccess, 13000), raising=False)
    monkeypatch.setattr(cuda, "cupy_or_none", lambda: None)
    with pytest.raises(BackendError, match=r"pip install cupy-cuda13x\)"):
        cuda.DeviceLatentSampler(0, 0)


def test_ort_tensorrt_provider_gets_one_profile_per_graph_and_chunks_fit_it(cache, monkeypatch):  # noqa: F811
    from test_edge import _OrtWithGpuProviders, glyphs
    from vce_deploy.backends import onnxruntime as ort_backend

    fakegpu.install(monkeypatch)
    fake = _OrtWithGpuProviders()
    monkeypatch.setattr(ort_backend, "_ort", lambda: fake)
    converter = Converter.load(backend="onnxruntime", device="cuda:0")
    convertor_trt = fake.requested[1][0][1]
    assert convertor_trt["trt_profile_max_shapes"] == "z:256x56,q:256x1x28x28"
    assert convertor_trt["trt_profile_min_shapes"] == "z:1x56,q:1x1x28x28"
    assert converter.backend.max_batch_limit == 256  # no chunk beyond the profile: no rebuild
    assert converter.convert(glyphs(1), n=2, seed=0).shape == (1, 2, 28, 28)


def test_auto_picks_torch_on_cuda_without_tensorrt_or_onnxruntime_gpu(monkeypatch):
    import sys

    import torch

    from vce_deploy.backends import BACKENDS, auto, cuda
    from vce_deploy.bundle import DEFAULT_BUNDLE, Bundle

    monkeypatch.setattr(cuda, "gpu_visible", lambda root=None: True)  # a GPU, CUDA PyTorch ...
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setitem(sys.modules, "tensorrt", None)  # ... no TensorRT, CPU-only onnxruntime
    cls, precision, why = auto.choose(BACKENDS, Bundle.load(DEFAULT_BUNDLE), "auto", "auto", None)
    assert (cls.name, precision, cls.resolve_device(None)) == ("torch", "fp32", "cuda:0"), why


def test_graph_replays_from_two_callers_streams_never_race_on_the_static_inputs():
    from vce_deploy.backends.torch import GraphRunner

    torch = fakegpu.FakeTorchStreams()
    runner = GraphRunner(torch, lambda z: {"y": torch.Tensor(z.value)}, {"z": torch.Tensor(0)})
    for name, value in (("callerA", 1), ("callerB", 2), ("callerA", 3)):  # callers' own streams
        with torch.cuda.stream(torch.cuda.Stream(name)):
            runner({"z": torch.Tensor(value)})
    assert torch.replays and not torch.races, torch.races


def test_torch_on_cuda_turns_tf32_off_for_fp32_parity(monkeypatch):
    from vce_deploy.backends import cuda
    from vce_deploy.backends.torch import TorchBackend

    torch = fakegpu.FakeTorchStreams()
    monkeypatch.setattr(cuda, "cupy_or_none", lambda: None)
    backend = TorchBackend.__new__(TorchBackend)
    backend.device = "cuda:0"
    backend._use(torch, types.SimpleNamespace(eval=lambda: None), None, "test", cuda_graphs=True)
    assert not torch.backends.cudnn.allow_tf32 and not torch.backends.cuda.matmul.allow_tf32
    assert torch.float32_matmul_precision == "highest"


def test_gpu_session_dry_run_brings_back_one_archive_and_the_check(tmp_path):
    import os
    import subprocess
    import sys
    import tarfile
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    out = tmp_path / "out"
    env = dict(os.environ, VCE_SESSION_DRY="1", PYTHON=sys.executable, TRAIN_S="2", SESSION_S="200",
               RUN_DIR=str(tmp_path / "runs" / "session"), OMP_NUM_THREADS="1")
    done = subprocess.run(["bash", str(root / "scripts" / "gpu_session.sh"), str(out)], env=env,
                          capture_output=True, text=True, timeout=300)
    log = (out / "session.log").read_text() if (out / "session.log").exists() else ""
    assert done.returncode == 0, done.stdout[-2000:] + log[-3000:]
    files = sorted(p.name for p in out.rglob("*") if p.is_file())
    assert files == ["gpu_check.json", "gpu_check.md", "session.log", "train_run.tar.gz"]  # at most 8 come back
    with tarfile.open(out / "train_run.tar.gz") as archive:
        names = archive.getnames()
    assert "session/checkpoint.safetensors" in names and "session/checkpoint.json" in names, names


def test_loss_terms_stay_on_the_device_until_read(monkeypatch):
    import torch

    from train import device_step
    from train.losses import lmvae_loss, vae_loss
    from vce_deploy.model import VCE, ModelConfig

    model = VCE(ModelConfig(channels=4, blocks=1))
    x = (torch.rand(3, 1, 28, 28) < 0.3).float()
    q = (torch.rand(3, 1, 28, 28) < 0.3).float()

    def no_sync(self):
        raise AssertionError(".item() in a training step: a host sync per term")

    monkeypatch.setattr(torch.Tensor, "item", no_sync)
    eager = vae_loss(model, x, q, torch.Generator().manual_seed(0))
    lm = lmvae_loss(model, x, q, generator=torch.Generator().manual_seed(0))
    monkeypatch.undo()
    assert all(isinstance(v, torch.Tensor) and not v.requires_grad for v in {**eager.terms, **lm.terms}.values())
    read = device_step.read_terms(eager.terms)
    assert read["loss"] == pytest.approx(float(eager.encoder)) and read["kl"] + read["con"] == pytest.approx(read["loss"], rel=1e-5)
