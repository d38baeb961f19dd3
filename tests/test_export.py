"""Export: checkpoint -> bundle -> parity; int8 against fp32 on real images; failed exports
leave nothing; the engine builder refuses cleanly without TensorRT or a GPU."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import onnx
import pytest

from vce_deploy.bundle import FORMAT_VERSION, Bundle


def tree_digest(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def test_images():
    from vce_deploy.omniglot import load_split

    return load_split("small", "test").images


def test_bundle_parity_at_batch_1_and_257(smoke_bundle, test_images):
    from vce_deploy.verify import check_parity

    # the reference is the torch backend on the bundle's own weights-only checkpoint
    report = check_parity(smoke_bundle, test_images, batches=(1, 257), backends=("onnxruntime",), precisions=("fp32",))
    report.raise_if_failed()
    [check] = report.checks
    assert (check.backend, check.precision, check.ran) == ("onnxruntime", "fp32", True)
    rows = check.rows
    assert {(r.output, r.batch) for r in rows} == {(o, b) for o in ("mu", "logvar", "y") for b in (1, 257)}
    assert all(r.max_abs <= 1e-4 for r in rows), [(r.output, r.batch, r.max_abs) for r in rows]


def test_a_precision_that_must_run_fails_when_no_backend_runs_it(smoke_bundle, test_images):
    """No TensorRT here: fp16 (may go unrun) is "not run here", fp32 (must run) is a mismatch."""
    from vce_deploy.verify import ParityError, check_parity

    report = check_parity(smoke_bundle, test_images, batches=(2,), backends=("tensorrt",), precisions=("fp32", "fp16"))
    by_precision = {check.precision: check for check in report.checks}
    assert not by_precision["fp32"].ran and not by_precision["fp16"].ran
    # the reason is the first thing missing: TensorRT runs on a GPU, and check_parity asked for the CPU
    # (engines may come from the bundle or the engine cache, so "none in the bundle" is not a reason by itself)
    assert "TensorRT runs on a GPU: expected device 'cuda[:N]', got 'cpu'" in by_precision["fp32"].ran_by
    assert [m.kind for m in by_precision["fp32"].mismatches] == ["load"] and by_precision["fp16"].ok
    assert "not run here" in by_precision["fp16"].summary()
    with pytest.raises(ParityError, match="no backend ran it here, and fp32 must run"):
        report.raise_if_failed()


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
    for precision in ("fp32", "int8"):
        assert m.metrics["parity"]["onnxruntime"][precision]["ok"] is True
    # TensorRT's int8 form is judged on the CPU too, with the int8 tolerance
    assert m.metrics["parity"]["onnxruntime-int8-tensorrt-form"]["int8"]["ok"] is True
    for variant in ("int8-tensorrt", "int8-cpu"):  # paired against fp32, the protocol stated
        assert np.isfinite(m.metrics["nll"][variant]["cost_vs_fp32"])
        assert "onnxruntime" in m.metrics["nll"][variant]["runner"]
    assert {"k", "targets", "cost_vs_fp32"} <= set(m.metrics["nll"]["protocol"])
    if m.metrics["parity"]["openvino"]["bf16"]["ran"]:  # OpenVINO on a CPU with native bf16: no file, a measured cost
        assert "openvino" in m.metrics["nll"]["bf16"]["runner"].lower()
        assert abs(m.metrics["nll"]["bf16"]["cost_vs_fp32"]) < 1.0
    assert not [e for e in m.files.values() if e.precision == "bf16"], "bf16 runs the fp32 file"


def test_int8_stays_close_to_fp32_on_real_images(smoke_bundle, test_images):
    from vce_deploy import Converter
    from vce_deploy.verify import parity_inputs, run_models

    case = parity_inputs(test_images, (128,), 56, seed=3)[128]
    want, got = (run_models(Converter.load(smoke_bundle, backend="onnxruntime", precision=p), case)
                 for p in ("fp32", "int8"))
    for name in want:
        err = np.abs(got[name] - want[name])
        scale = float(np.abs(want[name]).max())
        # int8 steps are 1/127 of a range; a few steps of drift is fine, a broken scale is not
        assert err.mean() <= 0.01 * max(scale, 1.0), (name, err.mean(), scale)
        assert err.max() <= 0.1 * max(scale, 1.0), (name, err.max(), scale)


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
    assert "convertor.int8.cpu.onnx (consumer cpu)" in conv.backend_info.detail


def test_int8_keeps_in_float_the_convs_the_check_cannot_hold(smoke_bundle, test_images, monkeypatch, tmp_path):
    """Mixed int8 (export/quantize.py to_int8): when the all-int8 graph leaves the check's margin,
    the Convs with the largest int8 error stay float, worst first, until it holds; at worst all
    of them, and the file says so."""
    from export import quantize
    from vce_deploy import Converter

    reference = Converter.load(smoke_bundle, backend="onnxruntime", precision="fp32")
    feeds = quantize.calibration_batches(reference, test_images[:96, 0, None], test_images[:96, 1, None], batch=32)
    src, args = smoke_bundle / "convertor.onnx", ("convertor", feeds["convertor"], 28, 56, 18, "cpu")
    assert len(quantize.to_int8(src, tmp_path / "all.onnx", *args)) == 1, "without a check: the stem alone is float"
    all_int8 = quantize.int8_error(src, tmp_path / "all.onnx", feeds["convertor"])
    monkeypatch.setattr(quantize, "INT8_CHECK_MARGIN", 0.99 * all_int8)  # the all-int8 graph now misses the margin
    floats = quantize.to_int8(src, tmp_path / "mixed.onnx", *args, check_feeds=feeds["convertor"])
    assert len(floats) > 1 and floats[0] == quantize.stem_conv(onnx.load(str(src)))
    assert quantize.int8_error(src, tmp_path / "mixed.onnx", feeds["convertor"]) <= 0.99 * all_int8
    mixed = onnx.load(str(tmp_path / "mixed.onnx"))
    weights = {t.name for t in mixed.graph.initializer}
    assert {n.name for n in mixed.graph.node if n.op_type == "Conv" and n.input[1] in weights} == set(floats)
    monkeypatch.setattr(quantize, "INT8_CHECK_MARGIN", 0.0)  # only the fp32 graph itself holds this
    floats = quantize.to_int8(src, tmp_path / "float.onnx", *args, check_feeds=feeds["convertor"])
    graph = onnx.load(str(tmp_path / "float.onnx")).graph
    assert set(floats) == {n.name for n in graph.node if n.op_type == "Conv"}
    assert "QuantizeLinear" not in {n.op_type for n in graph.node}


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
    report = Bundle.load(smoke_bundle).manifest.metrics["parity"]["onnxruntime"]["fp16"]
    assert report["ran_by"], "the report says what ran fp16, or why nothing could"


def test_failed_parity_exits_nonzero_and_leaves_the_old_bundle(smoke_checkpoint, tmp_path, monkeypatch, capsys):
    from vce_deploy.backends.torch import TorchBackend

    from export.__main__ import main

    real_run = TorchBackend.run

    def off(self, model, inputs):  # the reference, just past the fp32 bar on y
        out = real_run(self, model, inputs)
        return {name: a + np.float32(2e-4) if name == "y" else a for name, a in out.items()}

    monkeypatch.setattr(TorchBackend, "run", off)
    out = tmp_path / "bundle"
    out.mkdir()
    (out / "manifest.json").write_text("the previous bundle")  # only a bundle (or nothing) may be replaced
    before = tree_digest(out)
    code = main([str(smoke_checkpoint), "--out", str(out), "--precision", "fp32", "--no-nll", "--batches", "1", "7"])
    assert code == 1
    err = capsys.readouterr().err
    assert "[onnxruntime fp32 convertor] values: y at batch 1" in err and "y at batch 7" in err, err
    assert tree_digest(out) == before
    assert [p.name for p in tmp_path.iterdir()] == ["bundle"], "no staging directory left behind"


def test_export_refuses_unknown_precision(smoke_checkpoint, tmp_path):
    from export import export_bundle

    with pytest.raises(ValueError, match="unknown \\['fp64'\\]"):
        export_bundle(smoke_checkpoint, tmp_path / "b", precisions=("fp32", "fp64"))
    assert not (tmp_path / "b").exists()


def test_trtexec_command_matches_the_profile(smoke_bundle):
    from vce_deploy.engine_build import trtexec_command

    entry = Bundle.load(smoke_bundle).model_entry("convertor", "fp16")
    cmd = trtexec_command(smoke_bundle, entry, Path("/e.plan"), 1, 32, 300, 512, Path("/c"))
    assert "--minShapes=z:1x56,q:1x1x28x28" in cmd and "--maxShapes=z:300x56,q:300x1x28x28" in cmd
    assert cmd.endswith("--memPoolSize=workspace:512M --timingCacheFile=/c")


def test_manifest_is_plain_json(smoke_bundle):
    raw = json.loads((smoke_bundle / "manifest.json").read_text())
    assert raw["format_version"] == FORMAT_VERSION == 2 and len(raw["files"]["encoder.onnx"]["sha256"]) == 64


# the engine builder (vce build) is tested in tests/test_edge.py with tests/fakegpu.py


def test_opset_below_the_exporters_is_refused_not_faked(smoke_checkpoint, tmp_path):
    from export import export_bundle

    with pytest.raises(ValueError, match="opset: expected >= 18.*got 17"):
        export_bundle(smoke_checkpoint, tmp_path / "b", precisions=("fp32",), opset=17, measure_nll=False)
    assert list(tmp_path.iterdir()) == []
