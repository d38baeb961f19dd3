"""CUDA pieces shared by the GPU backends: device discovery, checked runtime calls, owned
device buffers, and noise drawn on the device.

Written to the cuda-python (`cuda.bindings.runtime`, older `cuda.cudart`) and CuPy
documented APIs. Not run here: the machine this was written on has no GPU, so the tests
that would exercise it skip with that reason.
"""
from __future__ import annotations

from functools import lru_cache

import numpy as np

from ..errors import BackendError
from .base import LatentSampler


@lru_cache(maxsize=1)
def runtime():
    """The CUDA runtime module of cuda-python, imported on first use."""
    try:
        from cuda.bindings import runtime as cudart  # cuda-python >= 12.6
    except ImportError:
        try:
            from cuda import cudart  # older cuda-python
        except ImportError as err:
            raise BackendError("the CUDA runtime bindings are not installed: expected cuda-python "
                               "(pip install 'vce-deploy[gpu]')") from err
    return cudart


def check(result, call: str):
    """cuda-python returns (status, *values): raise on any status but success, naming the call."""
    status, *values = result if isinstance(result, tuple) else (result,)
    cudart = runtime()
    if status != cudart.cudaError_t.cudaSuccess:
        _, name = cudart.cudaGetErrorName(status)
        name = name.decode() if isinstance(name, bytes) else str(name)
        raise BackendError(f"{call} failed with {name}")
    if not values:
        return None
    return values[0] if len(values) == 1 else tuple(values)


def gpu_count() -> int:
    """CUDA devices usable here; 0 when there is no driver, no device, or no cuda-python."""
    try:
        return int(check(runtime().cudaGetDeviceCount(), "cudaGetDeviceCount"))
    except BackendError:
        return 0


def device_index(device: str) -> int:
    """"cuda" -> 0, "cuda:1" -> 1."""
    return int(device.split(":", 1)[1]) if ":" in device else 0


def device_properties(device_id: int) -> tuple[str, str]:
    """(GPU name, compute capability "major.minor") of one device."""
    props = check(runtime().cudaGetDeviceProperties(device_id), f"cudaGetDeviceProperties({device_id})")
    name = props.name.decode(errors="replace").rstrip("\x00") if isinstance(props.name, bytes) else str(props.name)
    return name, f"{props.major}.{props.minor}"


class Stream:
    """One CUDA stream, owned: destroy() releases it."""

    def __init__(self):
        self.handle = check(runtime().cudaStreamCreate(), "cudaStreamCreate")

    def synchronize(self) -> None:
        check(runtime().cudaStreamSynchronize(self.handle), "cudaStreamSynchronize")

    def destroy(self) -> None:
        if self.handle is not None:
            check(runtime().cudaStreamDestroy(self.handle), "cudaStreamDestroy")
            self.handle = None


class DeviceBuffer:
    """nbytes of device memory, owned: free() releases it (idempotent)."""

    def __init__(self, nbytes: int):
        self.nbytes = nbytes
        self.ptr = int(check(runtime().cudaMalloc(nbytes), f"cudaMalloc({nbytes})"))

    def upload(self, host: np.ndarray, stream: Stream) -> None:
        host = np.ascontiguousarray(host)
        if host.nbytes > self.nbytes:
            raise BackendError(f"upload of {host.nbytes} bytes into a {self.nbytes}-byte device buffer")
        cudart = runtime()
        check(cudart.cudaMemcpyAsync(self.ptr, host.ctypes.data, host.nbytes,
                                     cudart.cudaMemcpyKind.cudaMemcpyHostToDevice, stream.handle),
              "cudaMemcpyAsync(host to device)")

    def copy_from_device(self, source_ptr: int, nbytes: int, stream: Stream) -> None:
        cudart = runtime()
        check(cudart.cudaMemcpyAsync(self.ptr, source_ptr, nbytes,
                                     cudart.cudaMemcpyKind.cudaMemcpyDeviceToDevice, stream.handle),
              "cudaMemcpyAsync(device to device)")

    def download(self, host: np.ndarray, stream: Stream) -> None:
        """Copy into `host` (C-contiguous); the caller synchronises the stream before reading it."""
        cudart = runtime()
        check(cudart.cudaMemcpyAsync(host.ctypes.data, self.ptr, host.nbytes,
                                     cudart.cudaMemcpyKind.cudaMemcpyDeviceToHost, stream.handle),
              "cudaMemcpyAsync(device to host)")

    def free(self) -> None:
        if self.ptr:
            check(runtime().cudaFree(self.ptr), "cudaFree")
            self.ptr = 0


def cupy_or_none():
    """CuPy if installed: the GPU backends use it to draw noise on the device and to gather
    conditions there; without it they draw on the host and upload once per call."""
    try:
        import cupy

        return cupy
    except ImportError:
        return None


class DeviceLatentSampler(LatentSampler):
    """Standard-normal latents drawn on the GPU by CuPy's Philox4x32-10 generator.

    Like the host sampler, consecutive draws continue one sequence; the numbers differ from
    the host sampler's for the same seed (another generator), so a seed reproduces results
    on the same backend and device, as docs/design.md ("Runtime API") promises, not across them.
    """

    def __init__(self, seed: int | None, device_id: int):
        cupy = cupy_or_none()
        if cupy is None:
            raise BackendError("device-side noise needs CuPy (pip install cupy-cuda12x)")
        self.cupy = cupy
        self.device_id = device_id
        self.device = f"cuda:{device_id}"
        with cupy.cuda.Device(device_id):
            self._generator = cupy.random.Generator(cupy.random.Philox4x3210(seed))

    def draw(self, count: int, latent_dim: int, temperature: float):
        with self.cupy.cuda.Device(self.device_id):
            eps = self._generator.standard_normal((count, latent_dim), dtype=self.cupy.float32)  # (count, D)
            return eps if temperature == 1.0 else eps * self.cupy.float32(temperature)


DeviceLatentStream = DeviceLatentSampler  # the old name, kept for callers written before the rename
