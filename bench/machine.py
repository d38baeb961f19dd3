"""The machine a run measured: CPU model and flags (read at run time), cores, load, versions,
the fp32 matmul peak, and the work one conversion is (FLOPs, counted by PyTorch)."""
from __future__ import annotations

import os
import platform
import time
from typing import Any, Callable

import numpy as np

from vce_deploy.backends.base import physical_cores
from vce_deploy.cpu import this_cpu


def machine_info(threads: int) -> dict[str, Any]:
    cpu = this_cpu()
    info: dict[str, Any] = {
        "cpu": cpu.model, "flags": cpu.reported_flags, "native_bf16": cpu.native_bf16, "native_int8": cpu.native_int8,
        "physical_cores": physical_cores(), "logical_cpus": os.cpu_count(), "threads": threads,
        "python": platform.python_version(), "os": platform.platform(), "numpy": np.__version__,
        "load_avg_start": list(os.getloadavg()),
    }
    for name in ("torch", "onnxruntime", "openvino"):
        try:
            info[name] = __import__(name).__version__.split("-")[0]
        except ImportError:
            info[name] = "not installed"
    return info


def measure_peak(threads: int, size: int = 1024, reps: int = 5) -> dict[str, float]:
    """fp32 GFLOP/s of a size^3 matmul (best of `reps`, through torch's MKL): the practical peak
    that share_of_peak is quoted against."""
    import torch

    a, b = torch.randn(size, size), torch.randn(size, size)
    a @ b
    best = min(_wall(lambda: a @ b) for _ in range(reps))
    return {"matmul_size": size, "peak_gflops": 2.0 * size ** 3 / best / 1e9}


def _wall(fn: Callable[[], Any]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def flops_per_conversion(convertor) -> float:
    """FLOPs of one (z, q) -> y through the PyTorch convertor at batch 1 (a multiply-add is 2)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    size = convertor.config.image_size if hasattr(convertor, "config") else 28
    latent = getattr(getattr(convertor, "config", None), "latent_dim", 56)
    counter = FlopCounterMode(display=False)
    with counter, torch.inference_mode():
        convertor(torch.zeros(1, latent), torch.zeros(1, 1, size, size))
    return float(counter.get_total_flops())
