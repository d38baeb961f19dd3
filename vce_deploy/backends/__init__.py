"""Backends by name. `Converter.load` picks one class from BACKENDS once; nothing after
that asks which one it got.

Each module imports its engine (onnxruntime, tensorrt, torch) only when a backend is
checked or built, so importing this package imports none of them.
"""
from __future__ import annotations

from ..contract import MODELS
from .base import Backend, BackendInfo, HostLatentSampler, LatentSampler, LatentStream
from .onnxruntime import OnnxRuntimeBackend
from .tensorrt import TensorRTBackend
from .torch import TorchBackend

BACKENDS: dict[str, type[Backend]] = {
    cls.name: cls for cls in (TensorRTBackend, OnnxRuntimeBackend, TorchBackend)
}
# "auto" tries these in order: a native engine built for this GPU, then ONNX Runtime (which
# itself prefers its TensorRT / CUDA providers when onnxruntime-gpu and a GPU are there).
AUTO_ORDER = ("tensorrt", "onnxruntime")

__all__ = ["AUTO_ORDER", "BACKENDS", "Backend", "BackendInfo", "HostLatentSampler", "LatentSampler", "LatentStream",
           "MODELS"]
