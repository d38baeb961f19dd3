"""`vce export-triton`: every config.pbtxt parses with Triton's own protobuf schema and says what
the bundle is; the ensemble wires existing models by their real tensor names; the Python noise
model, run against a stand-in of triton_python_backend_utils, feeds the convertor the latents
that make the ensemble answer exactly what `Converter.convert` answers. (Triton itself is not
run here: no server in this environment.)"""
from __future__ import annotations

import importlib.util
import sys
import types

import numpy as np
import pytest

model_config_pb2 = pytest.importorskip("tritonclient.grpc.model_config_pb2")
from google.protobuf import text_format  # noqa: E402

from vce_deploy import BundleError, Converter  # noqa: E402
from vce_deploy.backends import HostLatentSampler  # noqa: E402
from vce_deploy.cli import main  # noqa: E402
from vce_deploy.contract import MODEL_IO, tensor_shapes  # noqa: E402
from vce_deploy.triton import export_triton  # noqa: E402

FP32, INT64 = model_config_pb2.TYPE_FP32, model_config_pb2.TYPE_INT64


@pytest.fixture(scope="module")
def repository(tmp_path_factory):
    return export_triton(None, tmp_path_factory.mktemp("triton") / "repo", max_batch=32, max_queue_delay_us=2500)


def parse(path) -> "model_config_pb2.ModelConfig":
    return text_format.Parse(path.read_text(), model_config_pb2.ModelConfig())


def io(tensors) -> dict:
    return {t.name: (t.data_type, tuple(t.dims)) for t in tensors}


def test_every_config_parses_with_tritons_schema(repository):
    configs = {p.parent.name: parse(p) for p in repository.glob("*/config.pbtxt")}
    assert set(configs) == {"vce_convertor_onnx", "vce_convertor_trt", "vce_noise", "vce_convert", "vce_convert_trt"}
    for name, config in configs.items():
        assert config.name == name and config.max_batch_size == 32


def test_convertor_configs_follow_the_contract(repository):
    converter = Converter.load(backend="onnxruntime", device="cpu", threads=1)
    shapes = tensor_shapes(converter.image_size, converter.latent_dim)
    for name, platform in (("vce_convertor_onnx", "onnxruntime_onnx"), ("vce_convertor_trt", "tensorrt_plan")):
        config = parse(repository / name / "config.pbtxt")
        assert config.platform == platform
        assert io(config.input) == {t: (FP32, shapes[t]) for t in MODEL_IO["convertor"].inputs}
        assert io(config.output) == {t: (FP32, shapes[t]) for t in MODEL_IO["convertor"].outputs}
        assert config.HasField("dynamic_batching")
        assert config.dynamic_batching.max_queue_delay_microseconds == 2500
        assert max(config.dynamic_batching.preferred_batch_size) == 32
    assert (repository / "vce_convertor_onnx" / "1" / "model.onnx").read_bytes() == \
        (converter.bundle.file(converter.bundle.model_entry("convertor", "fp32").path)).read_bytes()
    assert "python -m export.tensorrt" in (repository / "README.md").read_text()  # no engine in the shipped bundle: say how


def test_ensembles_wire_existing_models_by_their_tensor_names(repository):
    for name in ("vce_convert", "vce_convert_trt"):
        config = parse(repository / name / "config.pbtxt")
        assert config.platform == "ensemble"
        assert io(config.input)["SEED"] == (INT64, (1,))
        produced = {t.name for t in config.input}
        for step in config.ensemble_scheduling.step:
            member = parse(repository / step.model_name / "config.pbtxt")
            assert set(step.input_map) == {t.name for t in member.input}, step
            assert set(step.output_map) == {t.name for t in member.output}, step
            assert set(step.input_map.values()) <= produced, f"{step.model_name} reads a tensor nobody wrote"
            produced |= set(step.output_map.values())
        assert {t.name for t in config.output} <= produced


class FakeTensor:
    def __init__(self, name, array):
        self.name, self.array = name, np.asarray(array)

    def as_numpy(self):
        return self.array


def fake_pb_utils() -> types.ModuleType:
    """The few names of triton_python_backend_utils the noise model uses."""
    module = types.ModuleType("triton_python_backend_utils")
    module.Tensor = FakeTensor
    module.get_input_tensor_by_name = lambda request, name: request[name]
    module.InferenceResponse = lambda output_tensors, error=None: types.SimpleNamespace(
        output_tensors=output_tensors, error=error)
    module.TritonError = lambda message: RuntimeError(message)
    return module


def test_noise_model_plus_convertor_equals_convert(repository, monkeypatch):
    monkeypatch.setitem(sys.modules, "triton_python_backend_utils", fake_pb_utils())
    spec = importlib.util.spec_from_file_location("vce_noise_model", repository / "vce_noise" / "1" / "model.py")
    noise = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(noise)
    converter = Converter.load(backend="onnxruntime", device="cpu", threads=1)
    glyph = np.zeros((28, 28), np.float32)
    glyph[5:23, 12:16] = 1
    q = np.repeat(glyph[None, None], 5, axis=0)  # one glyph, n = 5 rows
    requests = [{"Q": FakeTensor("Q", q), "SEED": FakeTensor("SEED", np.full((5, 1), seed, np.int64)),
                 "TEMPERATURE": FakeTensor("TEMPERATURE", np.full((5, 1), t, np.float32))}
                for seed, t in ((3, 1.0), (77, 0.5))]
    responses = noise.TritonPythonModel().execute(requests)  # two requests batched together by Triton
    for (seed, t), response in zip(((3, 1.0), (77, 0.5)), responses):
        z = response.output_tensors[0].as_numpy()
        np.testing.assert_array_equal(z, HostLatentSampler(seed).draw(5, converter.latent_dim, t))
        y = converter.run_convertor(z, q.astype(np.float32))  # what the ensemble's second step computes
        np.testing.assert_allclose(y[:, 0], converter.convert(glyph, 5, seed=seed, temperature=t)[0], atol=1e-6)
    bad = noise.TritonPythonModel().execute([{**requests[0], "SEED": FakeTensor("SEED", [[-1]])}])
    assert "expected SEED >= 0" in str(bad[0].error)


def test_cli_and_refusals(tmp_path, capsys):
    assert main(["export-triton", "default", str(tmp_path / "repo"), "--max-batch", "8"]) == 0
    assert parse(tmp_path / "repo" / "vce_convert" / "config.pbtxt").max_batch_size == 8
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("mine")
    assert main(["export-triton", "default", str(tmp_path / "busy")]) == 1
    assert "refusing to delete" in capsys.readouterr().err
    with pytest.raises(BundleError, match="no onnx convertor at precision 'fp64'|precision"):
        export_triton(None, tmp_path / "other", precision="fp64")
    assert not (tmp_path / "other").exists()
