"""Checkpoint -> bundle: ONNX (fp32, fp16, int8 QDQ), verified through the runtime, manifest.

One module per step, each validating its own output:
  onnx_export.py  torch.onnx (dynamo) export, onnx.checker, strict shape inference, onnxslim
  quantize.py     fp16 (float32 I/O) and int8 QDQ calibrated on real training images
  pipeline.py     the steps in order into a staging bundle, verified by loading it with the
                  runtime (vce_deploy/verify.py: parity on every backend, NLL per precision;
                  vce_deploy/golden.py: the golden outputs), then swapped into place
  golden.py       real glyphs, fixed noise and eager fp32 outputs, for `vce verify` on a device
  (TensorRT engines are built on the device by the runtime's `vce build`; export/tensorrt.py
  only forwards to it)
"""
from vce_deploy.verify import DEFAULT_BATCHES, ParityError

from .onnx_export import DEFAULT_OPSET
from .pipeline import NLL_K, NLL_SUBSET, export_bundle, model_file

__all__ = ["DEFAULT_BATCHES", "DEFAULT_OPSET", "NLL_K", "NLL_SUBSET", "ParityError", "export_bundle", "model_file"]
