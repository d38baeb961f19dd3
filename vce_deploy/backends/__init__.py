"""Backends by name. `Converter.load` picks one class from BACKENDS once; nothing after
that asks which one it got.

Each module imports its engine (onnxruntime, openvino, tensorrt, torch) only when a backend is
checked or built, so importing this package imports none of them.
"""
from __future__ import annotations

from ..contract import MODELS
from .base import Backend, BackendInfo, HostLatentSampler, LatentSampler, LatentStream
from .onnxruntime import OnnxRuntimeBackend
from .openvino import OpenVinoBackend
from .tensorrt import TensorRTBackend
from .torch import TorchBackend

BACKENDS: dict[str, type[Backend]] = {
    cls.name: cls for cls in (TensorRTBackend, OnnxRuntimeBackend, OpenVinoBackend, TorchBackend)
}
# "auto" (a TensorRT engine built for this GPU, then ONNX Runtime on its GPU providers, then the
# CPU order that follows this CPU's features) is decided in backends/auto.py

__all__ = ["BACKENDS", "Backend", "BackendInfo", "HostLatentSampler", "LatentSampler", "LatentStream",
           "MODELS"]
