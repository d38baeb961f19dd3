"""Native TensorRT engines (TensorRT 10/11 API) from the bundle's engines/ directory.

Each engine is deserialized once; its I/O tensors are walked once into records that own a
device buffer sized for the engine's max batch. A call is: set input shapes, copy in,
execute_async_v3 on the runner's own stream, copy out, synchronise. An execution context
is not thread safe, so each runner serialises its calls with a lock.

An engine runs only on the TensorRT version and GPU it was built for: the manifest says
which, and a mismatch is an EngineMismatchError that names the rebuild command.

Written to the documented TensorRT Python API and cuda-python; not run here (no GPU, no
TensorRT on this machine): the tests that would exercise it skip with that reason.
"""
from __future__ import annotations

import threading
from dataclasses import dataclass

import numpy as np

from ..errors import BackendError, EngineMismatchError
from . import cuda
from .base import MODELS, Backend, check_entry_io, compare_io


def _trt():
    try:
        import tensorrt
    except ImportError as err:
        raise BackendError("TensorRT is not installed: expected the `tensorrt` Python package "
                           "(pip install 'vce-deploy[gpu]')") from err
    return tensorrt


def rebuild_command(bundle_path, precision: str, info) -> str:
    batches = (f" --min-batch {info.min_batch} --opt-batch {info.opt_batch} --max-batch {info.max_batch}"
               if info is not None else "")
    return f"python -m export.tensorrt {bundle_path} --precision {precision}{batches}"


def engine_problem(bundle, precision: str, device: str | None) -> BackendError | None:
    """Why the bundle's engines at `precision` cannot run here, cheapest checks first."""
    for role in MODELS:
        if not bundle.entries(role, "tensorrt", precision):
            have = sorted({e.precision for e in bundle.entries(format="tensorrt")})
            return BackendError(f"{bundle.path} has no TensorRT {role} engine at {precision} (engines at {have}); "
                                f"build one with `{rebuild_command(bundle.path, precision, None)}`")
    try:
        trt = _trt()
        cuda.runtime()
    except BackendError as err:
        return err
    if cuda.gpu_count() == 0:
        return BackendError("TensorRT engines need a CUDA GPU, and none is visible")
    device_id = cuda.device_index(device) if device and device.startswith("cuda") else 0
    if device is not None and not device.startswith("cuda"):
        return BackendError(f"TensorRT runs on a GPU: expected device 'cuda[:N]', got {device!r}")
    gpu_name, capability = cuda.device_properties(device_id)
    for role in MODELS:
        entry = bundle.entries(role, "tensorrt", precision)[0]
        info = entry.engine
        if info is None:
            return BackendError(f"{bundle.path}: manifest entry {entry.path} has no engine record "
                                "(TensorRT version, compute capability, batch profile)")
        if info.tensorrt_version != trt.__version__ or info.compute_capability != capability:
            return EngineMismatchError(
                f"{bundle.path}/{entry.path} was built for TensorRT {info.tensorrt_version} on compute capability "
                f"{info.compute_capability} ({info.gpu_name or 'unnamed GPU'}); this is TensorRT {trt.__version__} "
                f"on {gpu_name} (compute capability {capability}). Rebuild it here with "
                f"`{rebuild_command(bundle.path, precision, info)}`")
    return None


@dataclass
class TensorRecord:
    name: str
    is_input: bool
    dtype: np.dtype
    sample_shape: tuple  # the shape without the batch axis
    buffer: cuda.DeviceBuffer


class EngineRunner:
    """One engine, one execution context, one stream, one device buffer per I/O tensor."""

    def __init__(self, trt, runtime, path, role: str, profile_max_batch: int, data: bytes | None = None):
        engine = runtime.deserialize_cuda_engine(data if data is not None else path.read_bytes())
        if engine is None:
            raise BackendError(f"TensorRT could not deserialize {path} (see the TensorRT log above)")
        self.engine = engine
        self.context = engine.create_execution_context()
        if self.context is None:
            raise BackendError(f"TensorRT could not create an execution context for {path}")
        self.role = role
        self.stream = cuda.Stream()
        self.lock = threading.Lock()
        self.tensors: dict[str, TensorRecord] = {}
        max_batch = profile_max_batch
        for index in range(engine.num_io_tensors):
            name = engine.get_tensor_name(index)
            is_input = engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT
            if is_input:  # the engine's own profile is the truth; the manifest only records it
                max_batch = min(max_batch, engine.get_tensor_profile_shape(name, 0)[2][0])
        self.max_batch = int(max_batch)
        try:
            self._allocate(trt, engine, path)
        except BaseException:
            self.free()  # buffers allocated before the failure are not leaked
            raise

    def _allocate(self, trt, engine, path) -> None:
        for index in range(engine.num_io_tensors):
            name = engine.get_tensor_name(index)
            dtype = np.dtype(trt.nptype(engine.get_tensor_dtype(name)))
            sample_shape = tuple(engine.get_tensor_shape(name))[1:]
            nbytes = int(np.prod(sample_shape)) * dtype.itemsize * self.max_batch
            record = TensorRecord(name, engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT, dtype,
                                  sample_shape, cuda.DeviceBuffer(nbytes))
            self.tensors[name] = record
            if not self.context.set_tensor_address(name, record.buffer.ptr):
                raise BackendError(f"{path}: set_tensor_address({name!r}) refused the buffer")

    def io(self) -> tuple[dict, dict]:
        specs = {r.name: (("batch",) + r.sample_shape, r.dtype.name) for r in self.tensors.values()}
        return ({k: v for k, v in specs.items() if self.tensors[k].is_input},
                {k: v for k, v in specs.items() if not self.tensors[k].is_input})

    def run(self, inputs: dict, device_outputs: dict | None = None) -> dict[str, np.ndarray]:
        """inputs: name -> host numpy array or device CuPy array (batch <= max_batch).
        device_outputs None: return host arrays; else name -> CuPy array, filled in place."""
        batch = next(iter(inputs.values())).shape[0]
        with self.lock:
            for name, array in inputs.items():
                record = self.tensors[name]
                if not self.context.set_input_shape(name, (batch,) + record.sample_shape):
                    raise BackendError(f"{self.role}: set_input_shape({name!r}, batch {batch}) was refused; "
                                       f"the engine's profile allows batch 1..{self.max_batch}")
                if isinstance(array, np.ndarray):
                    record.buffer.upload(array, self.stream)
                else:  # already on the device: a device-to-device copy, nothing crosses the bus
                    record.buffer.copy_from_device(array.data.ptr, array.nbytes, self.stream)
            if not self.context.execute_async_v3(int(self.stream.handle)):
                raise BackendError(f"{self.role}: execute_async_v3 failed (see the TensorRT log above)")
            results = {}
            for record in self.tensors.values():
                if record.is_input:
                    continue
                if device_outputs is not None:
                    target = device_outputs[record.name]
                    cuda.check(cuda.runtime().cudaMemcpyAsync(
                        target.data.ptr, record.buffer.ptr, target.nbytes,
                        cuda.runtime().cudaMemcpyKind.cudaMemcpyDeviceToDevice, self.stream.handle),
                        "cudaMemcpyAsync(device to device)")
                else:
                    results[record.name] = np.empty((batch,) + record.sample_shape, record.dtype)
                    record.buffer.download(results[record.name], self.stream)
            self.stream.synchronize()  # the host arrays are only valid after this
        return results

    def free(self) -> None:
        for record in self.tensors.values():
            record.buffer.free()
        self.stream.destroy()
        self.context = None
        self.engine = None


class TensorRTBackend(Backend):
    name = "tensorrt"

    @classmethod
    def unavailable(cls, bundle, precision, device):
        return engine_problem(bundle, precision, device)

    @classmethod
    def resolve_device(cls, device):
        return device or "cuda:0"

    def __init__(self, bundle, precision, device, threads):
        super().__init__(bundle, precision, device, threads)
        problem = engine_problem(bundle, precision, device)
        if problem is not None:
            raise problem
        trt = _trt()
        self._trt = trt
        self.device_id = cuda.device_index(device)
        cuda.check(cuda.runtime().cudaSetDevice(self.device_id), f"cudaSetDevice({self.device_id})")
        self._logger = trt.Logger(trt.Logger.WARNING)
        self._runtime = trt.Runtime(self._logger)
        self._runners: dict[str, EngineRunner] = {}
        self._cupy = cuda.cupy_or_none()
        try:
            entries = {role: bundle.entries(role, "tensorrt", precision)[0] for role in MODELS}
            for role, entry in entries.items():
                check_entry_io(entry, role, str(bundle.path), self.image_size, self.latent_dim)
            # every engine read and hashed (once) before any is deserialized; they load from these bytes
            verified = {role: bundle.read_verified(entry) for role, entry in entries.items()}
            for role, entry in entries.items():
                runner = EngineRunner(trt, self._runtime, bundle.file(entry.path), role, entry.engine.max_batch,
                                      data=verified.pop(role))
                self._runners[role] = runner
                compare_io(entry, *runner.io(), str(bundle.path))
        except BaseException:
            self.close()
            raise

    @property
    def max_batch_limit(self) -> int:
        return min(r.max_batch for r in self._runners.values())

    @property
    def default_max_batch(self) -> int:
        return self.max_batch_limit

    def run(self, model, inputs):
        return self._runners[model].run(inputs)

    def latent_stream(self, seed):
        if self._cupy is None:
            return super().latent_stream(seed)
        return cuda.DeviceLatentStream(seed, self.device_id)

    def convert(self, conditions, samples_per_condition, stream, temperature, max_batch):
        if self._cupy is None:  # host noise, one upload per chunk through the runner's buffers
            return super().convert(conditions, samples_per_condition, stream, temperature, max_batch)
        cp = self._cupy
        size, total = self.image_size, conditions.shape[0] * samples_per_condition
        runner = self._runners["convertor"]
        with cp.cuda.Device(self.device_id):
            latents = stream.draw(total, self.latent_dim, temperature)  # (B * n, D) on the device
            device_conditions = cp.asarray(conditions)
            out = cp.empty((total, 1, size, size), dtype=cp.float32)
            for start in range(0, total, max_batch):
                stop = min(start + max_batch, total)
                rows = cp.arange(start, stop) // samples_per_condition
                chunk = {"z": cp.ascontiguousarray(latents[start:stop]),
                         "q": cp.ascontiguousarray(device_conditions[rows])}
                cp.cuda.get_current_stream().synchronize()  # CuPy's writes land before TensorRT's stream reads
                runner.run(chunk, device_outputs={"y": out[start:stop]})
            return cp.asnumpy(out)

    def describe(self) -> str:
        noise = "on the device (CuPy)" if self._cupy is not None else "on the host (install CuPy to draw it on the device)"
        name, capability = cuda.device_properties(self.device_id)
        return (f"TensorRT {self._trt.__version__} on {name} (compute capability {capability}), "
                f"engine max batch {self.max_batch_limit}, noise drawn {noise}")

    def close(self) -> None:
        for runner in self._runners.values():
            runner.free()
        self._runners = {}
