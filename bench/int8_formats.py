"""python bench/int8_formats.py [--checkpoint C] [--seconds S] [--threads T]

Which int8 QDQ flavour of the convertor ONNX Runtime's CPU provider runs fast here, against
fp32: symmetric int8 activations (what the bundle ships, because TensorRT takes only zero
point 0) and asymmetric uint8 activations (ONNX Runtime's x86 U8S8 kernels). Weights are
per-channel symmetric int8 and the stem Conv stays float in both, as in export.quantize.
Times bare InferenceSession.run at batch 64 on real test conditions; prints images/s and the
max |y - y_torch|.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main(argv=None) -> int:
    import onnx
    import onnxruntime as ort
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    from export.pipeline import _calibration_pairs
    from export.onnx_export import export_onnx
    from export.quantize import _Reader, calibration_batches, stem_conv
    from vce_deploy.checkpoint import load_model
    from vce_deploy.converter import Converter
    from vce_deploy.omniglot import load_split, nll_targets

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[2])
    parser.add_argument("--checkpoint", default="vce_deploy/default_bundle/checkpoint.safetensors")
    parser.add_argument("--seconds", type=float, default=4.0)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)

    vce, _ = load_model(args.checkpoint)
    reference = Converter.from_torch(vce, channels_last=False)  # eager fp32
    x, q = _calibration_pairs(load_split("paper", "train"), 0)
    feeds = calibration_batches(reference, x[:256], q[:256])["convertor"]
    q64 = nll_targets(load_split("paper", "test"))[1][:64]
    z64 = np.random.default_rng(1).standard_normal((64, vce.config.latent_dim)).astype(np.float32)
    expected = reference.run_convertor(z64, q64)

    def measure(path: Path) -> tuple[float, float]:
        options = ort.SessionOptions()
        options.intra_op_num_threads = args.threads
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        feed = {"z": z64, "q": q64}
        error = float(np.abs(session.run(None, feed)[0] - expected).max())
        for _ in range(2):
            session.run(None, feed)
        calls, start = 0, time.perf_counter()
        while time.perf_counter() - start < args.seconds:
            session.run(None, feed)
            calls += 1
        return 64 * calls / (time.perf_counter() - start), error

    with tempfile.TemporaryDirectory() as scratch:
        scratch = Path(scratch)
        export_onnx(vce.convertor, "convertor", vce.config.image_size, vce.config.latent_dim,
                    scratch / "fp32.onnx", 18, False)
        quant_pre_process(str(scratch / "fp32.onnx"), str(scratch / "pre.onnx"), skip_symbolic_shape=True)
        stem = stem_conv(onnx.load(str(scratch / "pre.onnx")))
        print(f"| convertor, batch 64, {args.threads} thread(s) | images/s | max abs err vs torch |")
        print("|---|---|---|")
        rate, error = measure(scratch / "fp32.onnx")
        print(f"| fp32 | {rate:.0f} | {error:.1e} |", flush=True)
        flavours = {"int8, symmetric int8 activations (shipped; TensorRT)": (QuantType.QInt8, True),
                    "int8, asymmetric uint8 activations (ORT x86 U8S8)": (QuantType.QUInt8, False)}
        for name, (activation, symmetric) in flavours.items():
            out = scratch / "int8.onnx"
            quantize_static(str(scratch / "pre.onnx"), str(out), _Reader(feeds), quant_format=QuantFormat.QDQ,
                            op_types_to_quantize=["Conv"], per_channel=True, reduce_range=False,
                            activation_type=activation, weight_type=QuantType.QInt8,
                            calibrate_method=CalibrationMethod.MinMax, nodes_to_exclude=[stem],
                            extra_options={"ActivationSymmetric": symmetric, "WeightSymmetric": True,
                                           "QuantizeBias": False})
            rate, error = measure(out)
            print(f"| {name} | {rate:.0f} | {error:.2f} |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
