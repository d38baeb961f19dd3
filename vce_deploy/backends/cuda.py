"""CUDA pieces shared by the GPU backends: device discovery, checked runtime calls, owned
device buffers, and noise drawn on the device.

Written to the cuda-python (`cuda.bindings.runtime`, older `cuda.cudart`) and CuPy
documented APIs. Not run here: the machine this was written on has no GPU, so the tests
that would exercise it skip with that reason.
"""
from __future__ import annotations

import ctypes
from functools import lru_cache
from pathlib import Path

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


# Jetson's integrated GPU has no /proc/driver/nvidia/gpus (that is the discrete-GPU driver's
# listing): its nvgpu driver shows device nodes and a platform device instead (docs/edge.md)
TEGRA_GPU_NODES = ("dev/nvgpu/igpu0", "dev/nvhost-gpu", "dev/nvhost-ctrl-gpu", "sys/devices/gpu.0",
                   "sys/devices/platform/gpu.0")
DEVICE_TREE_COMPATIBLE = ("proc/device-tree/compatible", "sys/firmware/devicetree/base/compatible")


def gpu_visible(root: Path = Path("/")) -> bool:
    """Whether an NVIDIA GPU is there, even without cuda-python: CUDA says so, or the discrete
    driver lists one, or this is a Jetson (Tegra) with its integrated GPU."""
    if gpu_count() > 0:
        return True
    listing = root / "proc/driver/nvidia/gpus"
    if listing.is_dir() and any(listing.iterdir()):
        return True
    return tegra_gpu(root)


def tegra_gpu(root: Path = Path("/")) -> bool:
    if any((root / node).exists() for node in TEGRA_GPU_NODES):
        return True
    for name in DEVICE_TREE_COMPATIBLE:  # NUL-separated strings such as "nvidia,p3737-0000\0nvidia,tegra234"
        try:
            if b"nvidia,tegra" in (root / name).read_bytes():
                return True
        except OSError:
            continue
    return False


def device_index(device: str) -> int:
    """"cuda" -> 0, "cuda:1" -> 1."""
    return int(device.split(":", 1)[1]) if ":" in device else 0


def set_device(device_id: int) -> None:
    """Make device_id current for the calling host thread. CUDA's current device is per thread,
    so every call that touches device memory or a stream sets it first, on its own thread."""
    check(runtime().cudaSetDevice(device_id), f"cudaSetDevice({device_id})")


def device_properties(device_id: int) -> tuple[str, str]:
    """(GPU name, compute capability "major.minor") of one device."""
    props = check(runtime().cudaGetDeviceProperties(device_id), f"cudaGetDeviceProperties({device_id})")
    name = props.name.decode(errors="replace").rstrip("\x00") if isinstance(props.name, bytes) else str(props.name)
    return name, f"{props.major}.{props.minor}"


class Stream:
    """One non-blocking CUDA stream, owned: destroy() releases it. Non-blocking: it does not
    wait on the legacy default stream, so other libraries' default-stream work (CuPy, a
    framework in the same process) does not serialise with it."""

    def __init__(self):
        cudart = runtime()
        self.handle = check(cudart.cudaStreamCreateWithFlags(cudart.cudaStreamNonBlocking),
                            "cudaStreamCreateWithFlags(cudaStreamNonBlocking)")

    def synchronize(self) -> None:
        check(runtime().cudaStreamSynchronize(self.handle), "cudaStreamSynchronize")

    def destroy(self) -> None:
        if self.handle is not None:
            check(runtime().cudaStreamDestroy(self.handle), "cudaStreamDestroy")
            self.handle = None


def copy_async(dst: int, src: int, nbytes: int, kind: str, stream: "Stream") -> None:
    """cudaMemcpyAsync of nbytes on `stream`; kind: "HostToDevice", "DeviceToHost", "DeviceToDevice"."""
    cudart = runtime()
    check(cudart.cudaMemcpyAsync(dst, src, nbytes, getattr(cudart.cudaMemcpyKind, f"cudaMemcpy{kind}"),
                                 stream.handle), f"cudaMemcpyAsync({kind})")


class DeviceBuffer:
    """nbytes of device memory, owned: free() releases it (idempotent)."""

    def __init__(self, nbytes: int):
        self.nbytes = nbytes
        self.ptr = int(check(runtime().cudaMalloc(nbytes), f"cudaMalloc({nbytes})"))

    def free(self) -> None:
        if self.ptr:
            check(runtime().cudaFree(self.ptr), "cudaFree")
            self.ptr = 0


class PinnedBuffer:
    """nbytes of page-locked host memory, owned: free() releases it. Copies from pageable
    memory are staged by the driver and run synchronously; from pinned memory
    cudaMemcpyAsync is truly asynchronous and runs at full bus speed."""

    def __init__(self, nbytes: int):
        self.nbytes = nbytes
        self.ptr = int(check(runtime().cudaHostAlloc(nbytes, 0), f"cudaHostAlloc({nbytes})"))  # 0: cudaHostAllocDefault

    def view(self, shape: tuple, dtype: np.dtype) -> np.ndarray:
        """A numpy array over the first bytes of the buffer (no copy)."""
        dtype = np.dtype(dtype)
        count = int(np.prod(shape))
        if count * dtype.itemsize > self.nbytes:
            raise BackendError(f"a {shape} {dtype} view needs {count * dtype.itemsize} bytes; the pinned buffer "
                               f"has {self.nbytes}")
        raw = (ctypes.c_byte * (count * dtype.itemsize)).from_address(self.ptr)
        return np.frombuffer(raw, dtype=dtype, count=count).reshape(shape)

    def free(self) -> None:
        if self.ptr:
            check(runtime().cudaFreeHost(self.ptr), "cudaFreeHost")
            self.ptr = 0


def cupy_or_none():
    """CuPy if installed: the GPU backends use it to draw noise on the device and to gather
    conditions there; without it they draw on the host and upload once per call."""
    try:
        import cupy

        return cupy
    except ImportError:
        return None


def cupy_package() -> str:
    """The CuPy wheel for this machine's CUDA major (cupy-cuda12x, cupy-cuda13x): the driver's
    CUDA version (cudaDriverGetVersion: 13000 = 13.0) names the newest toolkit it runs."""
    try:
        version = check(runtime().cudaDriverGetVersion(), "cudaDriverGetVersion")
        return f"cupy-cuda{int(version) // 1000}x"
    except (BackendError, AttributeError, TypeError, ValueError):
        return "cupy-cuda12x or cupy-cuda13x, matching your CUDA major"


class DeviceLatentSampler(LatentSampler):
    """Standard-normal latents drawn on the GPU by CuPy's Philox4x32-10 generator.

    CuPy's generators keep one state per GPU thread, so the numbers a draw returns depend on
    the draw's size: one draw of 2n rows is not two draws of n. So the sequence is cut into
    blocks of BLOCK_ROWS rows, block k drawn whole by a generator made for (seed, k) at the
    call: rows [a, b) are the same numbers whatever the chunking (convert and convert_iter
    agree, docs/design.md "Runtime API"). The generator is made and drawn on the caller's
    current CuPy stream (the runner's), so its set-up is ordered before the draw and the
    engine's reads; nothing runs on the null stream. The numbers differ from the host
    sampler's for the same seed (another generator).
    """

    BLOCK_ROWS = 256

    def __init__(self, seed: int | None, device_id: int):
        cupy = cupy_or_none()
        if cupy is None:
            raise BackendError(f"device-side noise needs CuPy (pip install {cupy_package()})")
        self.cupy = cupy
        self.device_id = device_id
        self.device = f"cuda:{device_id}"
        # seed None: fresh noise, fixed for this call so its blocks continue one sequence
        self.seed = int(np.random.SeedSequence(seed).generate_state(1, np.uint64)[0])
        self._row = 0  # rows handed out so far

    def _block(self, index: int, latent_dim: int):
        cp = self.cupy
        block_seed = int(np.random.SeedSequence((self.seed, index)).generate_state(1, np.uint64)[0])
        generator = cp.random.Generator(cp.random.Philox4x3210(block_seed))  # on the current stream
        return generator.standard_normal((self.BLOCK_ROWS, latent_dim), dtype=cp.float32)

    def draw(self, count: int, latent_dim: int, temperature: float):
        cp = self.cupy
        start, stop = self._row, self._row + count
        self._row = stop
        with cp.cuda.Device(self.device_id):
            if count == 0:
                return cp.empty((0, latent_dim), dtype=cp.float32)
            first, last = start // self.BLOCK_ROWS, -(-stop // self.BLOCK_ROWS)
            blocks = [self._block(k, latent_dim) for k in range(first, last)]
            rows = cp.concatenate(blocks) if len(blocks) > 1 else blocks[0]
            offset = first * self.BLOCK_ROWS
            eps = rows[start - offset:stop - offset]  # (count, D)
            return cp.ascontiguousarray(eps if temperature == 1.0 else eps * cp.float32(temperature))


DeviceLatentStream = DeviceLatentSampler  # the old name, kept for callers written before the rename
