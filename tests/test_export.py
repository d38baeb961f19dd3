"""Export: checkpoint -> bundle -> parity; int8 against fp32 on real images; failed exports
leave nothing; the engine builder refuses cleanly without TensorRT or a GPU."""
from __future__ import annotations

import hashlib
import json
import shutil
import sys
import types
from pathlib import Path

import numpy as np
import onnx
import pytest

from vce_deploy.bundle import Bundle


def tree_digest(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def test_images():
    from train.data import load_test

    return load_test().images


def test_bundle_parity_at_batch_1_and_257(smoke_bundle, test_images):
    from vce_deploy.checkpoint import load_model

    from export.parity import TorchReference, run_parity

    bundle = Bundle.load(smoke_bundle)
    vce, _ = load_model(bundle.checkpoint)  # the bundle's own weights-only checkpoint is the reference
    files = {"fp32": (bundle.file("encoder.onnx"), bundle.file("convertor.onnx"))}
    report, _ = run_parity(TorchReference(vce), files, test_images, 28, 56, batches=(1, 257))
    report.raise_if_failed()
    rows = report.precisions["fp32"].rows
    assert {(r.output, r.batch) for r in rows} == {(o, b) for o in ("mu", "logvar", "y") for b in (1, 257)}
    assert all(r.max_abs <= 1e-4 for r in rows), [(r.output, r.batch, r.max_abs) for r in rows]


def test_manifest_lists_every_file_and_the_measurements(smoke_bundle):
    from safetensors import safe_open

    bundle = Bundle.load(smoke_bundle)
    m = bundle.manifest
    on_disk = {p for p in tree_digest(smoke_bundle) if p != "manifest.json"}
    assert on_disk == set(m.files), "every file in the bundle, and only those, is in the manifest"
    for precision, consumer in (("fp32", "any"), ("fp16", "any"), ("int8", "tensorrt"), ("int8", "cpu")):
        for role in ("encoder", "convertor"):
            entry = bundle.model_entry(role, precision, "onnx", (consumer,))
            assert entry.consumer == consumer
            assert all(t.shape[0] == "batch" and t.dtype == "float32" for t in entry.inputs + entry.outputs)
    with safe_open(str(bundle.checkpoint), "np") as f:
        keys = list(f.keys())
    assert keys and all(k.startswith("model.") for k in keys), "optimizer state stripped"
    assert m.exporter["opset"] == 18 and m.latent_dim == 56
    for variant in ("fp32", "int8-tensorrt", "int8-cpu"):
        assert np.isfinite(m.metrics["nll"][variant]["nll_mean"])
        assert m.metrics["parity"][variant]["ok"] is True
    for variant in ("int8-tensorrt", "int8-cpu"):  # paired against fp32, the protocol stated
        assert np.isfinite(m.metrics["nll"][variant]["cost_vs_fp32"])
        assert "onnxruntime" in m.metrics["nll"][variant]["runner"]
    assert {"k", "targets", "cost_vs_fp32"} <= set(m.metrics["nll"]["protocol"])
    if m.metrics["parity"]["bf16"]["ran"]:  # OpenVINO on a CPU with native bf16: no file, a measured cost
        assert "openvino" in m.metrics["nll"]["bf16"]["runner"]
        assert abs(m.metrics["nll"]["bf16"]["cost_vs_fp32"]) < 1.0
    assert not [e for e in m.files.values() if e.precision == "bf16"], "bf16 runs the fp32 file"


def test_int8_stays_close_to_fp32_on_real_images(smoke_bundle, test_images):
    from export.parity import OnnxModel, parity_cases

    bundle = Bundle.load(smoke_bundle)
    fp32 = OnnxModel(bundle.file("encoder.onnx"), bundle.file("convertor.onnx"))
    int8 = OnnxModel(bundle.file("encoder.int8.onnx"), bundle.file("convertor.int8.onnx"))
    case = parity_cases(test_images, (128,), 56, seed=3)[128]
    for role in ("encoder", "convertor"):
        want, got = fp32.run(role, case[role]), int8.run(role, case[role])
        for name in want:
            err = np.abs(got[name] - want[name])
            scale = float(np.abs(want[name]).max())
            # int8 steps are 1/127 of a range; a few steps of drift is fine, a broken scale is not
            assert err.mean() <= 0.01 * max(scale, 1.0), (role, name, err.mean(), scale)
            assert err.max() <= 0.1 * max(scale, 1.0), (role, name, err.max(), scale)


def test_cpu_int8_form_has_uint8_activations_and_symmetric_int8_weights(smoke_bundle):
    model = onnx.load(str(smoke_bundle / "convertor.int8.cpu.onnx"))
    inits = {t.name: onnx.numpy_helper.to_array(t) for t in model.graph.initializer}
    quantize = [n for n in model.graph.node if n.op_type == "QuantizeLinear"]
    assert quantize, "activations are quantized"
    activation_zeros = [inits[n.input[2]] for n in quantize if len(n.input) > 2]
    assert activation_zeros and all(z.dtype == np.uint8 for z in activation_zeros)
    assert any(z.any() for z in activation_zeros), "asymmetric: some zero point is not 0"
    weights = [v for v in inits.values() if v.dtype == np.int8 and v.ndim == 4]
    assert weights, "int8 convolution weights"
    weight_zeros = [v for k, v in inits.items() if v.dtype == np.int8 and v.ndim == 1 and "zero" in k]
    assert all(not z.any() for z in weight_zeros), "weights are symmetric"


def test_each_backend_picks_its_own_int8_form(smoke_bundle):
    from vce_deploy import Converter

    bundle = Bundle.load(smoke_bundle)
    assert bundle.model_entry("convertor", "int8", "onnx", ("tensorrt", "any")).path == "convertor.int8.onnx"
    conv = Converter.load(smoke_bundle, backend="onnxruntime", precision="int8")
    assert "convertor.int8.cpu.onnx (consumer cpu)" in conv.backend.detail


def test_int8_is_symmetric_per_channel_qdq(smoke_bundle):
    model = onnx.load(str(smoke_bundle / "convertor.int8.onnx"))
    inits = {t.name: onnx.numpy_helper.to_array(t) for t in model.graph.initializer}
    ops = [n.op_type for n in model.graph.node]
    assert "QuantizeLinear" in ops and "DequantizeLinear" in ops
    convs = [n for n in model.graph.node if n.op_type == "Conv"]
    producers = {o: n for n in model.graph.node for o in n.output}
    stem, rest = convs[0], convs[1:]
    assert stem.input[1] in inits, "the stem Conv stays float (see export.quantize.stem_conv)"
    assert rest, "every Conv after the stem is int8"
    for conv in rest:
        weight_dq = producers[conv.input[1]]
        assert weight_dq.op_type == "DequantizeLinear"
        weight, scale = inits[weight_dq.input[0]], inits[weight_dq.input[1]]
        assert weight.dtype == np.int8 and scale.shape == (weight.shape[0],), "per output channel"
    zero_points = [inits[n.input[2]] for n in model.graph.node
                   if n.op_type in ("QuantizeLinear", "DequantizeLinear") and len(n.input) > 2]
    assert zero_points and all(z.dtype == np.int8 and not z.any() for z in zero_points)


def test_fp16_has_half_weights_and_float_io(smoke_bundle):
    model = onnx.load(str(smoke_bundle / "encoder.fp16.onnx"))
    assert {t.data_type for t in model.graph.initializer if len(t.dims) == 4} == {onnx.TensorProto.FLOAT16}
    io = list(model.graph.input) + list(model.graph.output)
    assert {v.type.tensor_type.elem_type for v in io} == {onnx.TensorProto.FLOAT}
    report = Bundle.load(smoke_bundle).manifest.metrics["parity"]["fp16"]
    assert report["ran_by"], "the report says what ran fp16, or why nothing could"


def test_failed_parity_exits_nonzero_and_leaves_the_old_bundle(smoke_checkpoint, tmp_path, monkeypatch, capsys):
    import export.parity as parity
    from export.__main__ import main

    class Off(parity.TorchReference):
        def run_convertor(self, z, q):
            return super().run_convertor(z, q) + np.float32(2e-4)  # just past the fp32 bar

    monkeypatch.setattr(parity, "TorchReference", Off)
    out = tmp_path / "bundle"
    out.mkdir()
    (out / "manifest.json").write_text("the previous bundle")  # only a bundle (or nothing) may be replaced
    before = tree_digest(out)
    code = main([str(smoke_checkpoint), "--out", str(out), "--precision", "fp32", "--no-nll", "--batches", "1", "7"])
    assert code == 1
    err = capsys.readouterr().err
    assert "[fp32 convertor] values: y at batch 1" in err and "y at batch 7" in err, err
    assert tree_digest(out) == before
    assert [p.name for p in tmp_path.iterdir()] == ["bundle"], "no staging directory left behind"


def test_export_refuses_unknown_precision(smoke_checkpoint, tmp_path):
    from export import export_bundle

    with pytest.raises(ValueError, match="unknown \\['fp64'\\]"):
        export_bundle(smoke_checkpoint, tmp_path / "b", precisions=("fp32", "fp64"))
    assert not (tmp_path / "b").exists()


@pytest.fixture
def bundle_copy(smoke_bundle, tmp_path) -> Path:
    copy = tmp_path / "bundle"
    shutil.copytree(smoke_bundle, copy)
    return copy


def test_engine_builder_refuses_without_tensorrt(bundle_copy, monkeypatch, capsys):
    from export.tensorrt import main

    monkeypatch.setitem(sys.modules, "tensorrt", None)  # import fails as if not installed
    before = tree_digest(bundle_copy)
    assert main([str(bundle_copy), "--precision", "int8"]) == 2
    captured = capsys.readouterr()
    assert "tensorrt Python package is not installed" in captured.err
    assert "trtexec --onnx=" in captured.out and "--stronglyTyped" in captured.out
    assert tree_digest(bundle_copy) == before


def test_engine_builder_refuses_without_gpu(bundle_copy, monkeypatch, capsys):
    from vce_deploy.backends import cuda

    from export.tensorrt import main

    monkeypatch.setitem(sys.modules, "tensorrt", types.SimpleNamespace(__version__="10.9.0"))
    monkeypatch.setattr(cuda, "gpu_count", lambda: 0)
    before = tree_digest(bundle_copy)
    assert main([str(bundle_copy), "--precision", "fp16", "--max-batch", "128"]) == 2
    assert "no CUDA GPU is visible" in capsys.readouterr().err
    assert tree_digest(bundle_copy) == before


def test_trtexec_command_matches_the_profile(smoke_bundle):
    from export.tensorrt import trtexec_command

    entry = Bundle.load(smoke_bundle).model_entry("convertor", "fp16")
    cmd = trtexec_command(smoke_bundle, entry, "fp16", 1, 32, 300, 512, Path("/c"))
    assert "--minShapes=z:1x56,q:1x1x28x28" in cmd and "--maxShapes=z:300x56,q:300x1x28x28" in cmd
    assert cmd.endswith("--memPoolSize=workspace:512M --timingCacheFile=/c")


def test_manifest_is_plain_json(smoke_bundle):
    raw = json.loads((smoke_bundle / "manifest.json").read_text())
    assert raw["format_version"] == 1 and len(raw["files"]["encoder.onnx"]["sha256"]) == 64


class _FakeTensorRT:
    """Just enough of the TensorRT 10 Python API to drive build_engines on a machine without
    it: checks how the bundle is updated, NOT that TensorRT builds anything (not run here)."""

    __version__ = "10.9.0"

    class Logger:
        WARNING, VERBOSE = "warning", "verbose"

        def __init__(self, level):
            self.level = level

    class NetworkDefinitionCreationFlag:
        STRONGLY_TYPED = 0

    class MemoryPoolType:
        WORKSPACE = "workspace"

    def __init__(self):
        self.calls = []
        fake = self

        class Tensor:
            def __init__(self, value):
                self.name = value.name
                self.shape = tuple(d.dim_value or -1 for d in value.type.tensor_type.shape.dim)
                self.dtype = "float32"

        class Network:
            def __init__(self, flags):
                fake.calls.append(("create_network", flags))
                self.inputs, self.outputs = [], []
                self.num_inputs = self.num_outputs = 0

            def get_input(self, i):
                return self.inputs[i]

            def get_output(self, i):
                return self.outputs[i]

        class OnnxParser:
            num_errors = 0

            def __init__(self, network, logger):
                self.network = network

            def parse_from_file(self, path):
                graph = onnx.load(path).graph
                self.network.inputs = [Tensor(v) for v in graph.input]
                self.network.outputs = [Tensor(v) for v in graph.output]
                self.network.num_inputs, self.network.num_outputs = len(graph.input), len(graph.output)
                return True

        class Cache:
            def serialize(self):
                return b"timings"

        class Profile:
            def set_shape(self, name, low, opt, high):
                fake.calls.append(("set_shape", name, low, opt, high))

        class Config:
            def set_memory_pool_limit(self, pool, size):
                fake.calls.append(("workspace", pool, size))

            def add_optimization_profile(self, profile):
                fake.calls.append(("profile",))

            def create_timing_cache(self, blob):
                fake.calls.append(("timing_cache_in", bytes(blob)))
                return Cache()

            def set_timing_cache(self, cache, ignore_mismatch):
                return True

            def get_timing_cache(self):
                return Cache()

        class Builder:
            def __init__(self, logger):
                pass

            def create_builder_config(self):
                return Config()

            def create_network(self, flags):
                return Network(flags)

            def create_optimization_profile(self):
                return Profile()

            def build_serialized_network(self, network, config):
                return b"PLAN:" + ",".join(t.name for t in network.inputs).encode()

        self.Builder, self.OnnxParser = Builder, OnnxParser


def test_engine_builder_updates_the_bundle_atomically(bundle_copy, tmp_path, monkeypatch):
    from vce_deploy.backends import cuda

    from export.tensorrt import main

    fake = _FakeTensorRT()
    monkeypatch.setitem(sys.modules, "tensorrt", fake)
    monkeypatch.setattr(cuda, "gpu_count", lambda: 1)
    monkeypatch.setattr(cuda, "device_properties", lambda i: ("Fake GPU", "8.7"))
    before = tree_digest(bundle_copy)
    cache = tmp_path / "timing.cache"
    args = [str(bundle_copy), "--precision", "int8", "--min-batch", "2", "--opt-batch", "16", "--max-batch", "300",
            "--timing-cache", str(cache)]
    assert main(args) == 0
    bundle = Bundle.load(bundle_copy)
    for role in ("encoder", "convertor"):
        entry = bundle.entries(role, "tensorrt", "int8")[0]
        assert entry.path == f"engines/{role}.int8.plan"
        assert (entry.engine.tensorrt_version, entry.engine.compute_capability) == ("10.9.0", "8.7")
        assert (entry.engine.min_batch, entry.engine.opt_batch, entry.engine.max_batch) == (2, 16, 300)
    after = tree_digest(bundle_copy)
    assert {k: v for k, v in after.items() if k in before and k != "manifest.json"} == \
        {k: v for k, v in before.items() if k != "manifest.json"}, "the ONNX files are untouched"
    assert ("create_network", 1) in fake.calls, "strongly typed network"
    assert ("set_shape", "z", (2, 56), (16, 56), (300, 56)) in fake.calls
    assert cache.read_bytes() == b"timings"
    assert main(args) == 0  # the second build reads the saved timing cache
    assert ("timing_cache_in", b"timings") in fake.calls


def test_opset_below_the_exporters_is_refused_not_faked(smoke_checkpoint, tmp_path):
    from export import export_bundle

    with pytest.raises(ValueError, match="opset: expected >= 18.*got 17"):
        export_bundle(smoke_checkpoint, tmp_path / "b", precisions=("fp32",), opset=17, measure_nll=False)
    assert list(tmp_path.iterdir()) == []
