"""Native TensorRT engines (TensorRT 10/11 API): running them. Building them is
vce_deploy/engine_build.py (`vce build`).

Engines are found in the bundle (built with `vce build --into-bundle`) or in the engine cache
(vce_deploy/engine_cache.py), whichever holds one built for this TensorRT version and GPU. An
engine for another TensorRT or GPU is an EngineMismatchError naming the `vce build` command.

Each engine is deserialized once; its I/O tensors are walked once into records that own a
device buffer and a pinned host buffer sized for the profile's max batch. A host call is: set
input shapes, copy into pinned memory, async copies in, execute_async_v3 on the runner's
non-blocking stream, async copies out, ONE stream synchronise. Batches below the profile's
min are padded by Backend.run_padded. The current CUDA device is per host thread, so every
call sets it. An execution context is not thread safe, so each runner serialises its calls.

Written to the documented TensorRT Python API and cuda-python; not run here (no GPU, no
TensorRT on this machine): tests drive it through stand-ins (tests/fakegpu.py).
"""
from __future__ import annotations

import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from .. import engine_cache
from ..bundle import EngineInfo, FileEntry
from ..contract import MODELS, TENSORRT_FORMS
from ..errors import BackendError, EngineMismatchError
from . import cuda
from .base import Backend, batch_slices, check_entry_io, compare_io, pad_rows

MIN_TENSORRT_MAJOR = 10


def _trt():
    try:
        import tensorrt
    except ImportError as err:
        raise BackendError("TensorRT is not installed: expected the `tensorrt` Python package (on Jetson: JetPack "
                           "6's python3-libnvinfer; elsewhere pip install 'vce-deploy[gpu]')") from err
    check_tensorrt_version(getattr(tensorrt, "__version__", "unknown"))
    return tensorrt


def check_tensorrt_version(version: str) -> None:
    """TensorRT 8 and 9 lack strongly typed networks and the name-based I/O API this project
    builds and runs engines with: refuse them by name instead of failing on an attribute."""
    major = version.split(".", 1)[0]
    if not major.isdigit() or int(major) < MIN_TENSORRT_MAJOR:
        raise BackendError(f"TensorRT {version} is too old: expected TensorRT {MIN_TENSORRT_MAJOR} or newer "
                           "(strongly typed networks; JetPack 5 ships TensorRT 8.5, JetPack 6 ships TensorRT 10). "
                           "On this device use the ONNX Runtime backend instead: --backend onnxruntime")


def rebuild_command(bundle_path, precision: str, info: EngineInfo | None, device_id: int = 0) -> str:
    batches = (f" --min-batch {info.min_batch} --opt-batch {info.opt_batch} --max-batch {info.max_batch}"
               if info is not None else "")
    device = f" --device {device_id}" if device_id else ""
    return f"vce build {bundle_path} --precision {precision}{batches}{device}"


@dataclass(frozen=True)
class EngineSource:
    """One engine that runs here: where it is, what it was built for, and its verified bytes."""

    label: str  # the path, for messages
    info: EngineInfo
    entry: FileEntry  # the manifest entry whose I/O it must have (the engine's, or its ONNX file's)
    read: Callable[[], bytes]


def _device_id(device: str | None) -> int | BackendError:
    if device is None:
        return 0
    if not device.startswith("cuda"):
        return BackendError(f"TensorRT runs on a GPU: expected device 'cuda[:N]', got {device!r}")
    return cuda.device_index(device)


def locate_engines(bundle, precision: str, device: str | None,
                   cache_root: Path | None = None) -> tuple[dict[str, EngineSource] | None, BackendError | None]:
    """Engines for both models that run on this TensorRT and GPU (bundle first, then the engine
    cache), or the error saying why there are none. Never loads an engine."""
    device_id = _device_id(device)
    if isinstance(device_id, BackendError):
        return None, device_id
    try:
        trt = _trt()
        cuda.runtime()
    except BackendError as err:
        return None, err
    count = cuda.gpu_count()
    if count == 0:
        return None, BackendError("TensorRT engines need a CUDA GPU, and none is visible")
    if device_id >= count:
        return None, BackendError(f"device 'cuda:{device_id}' requested; expected an index below {count} "
                                  f"(the CUDA GPUs visible here)")
    gpu_name, capability = cuda.device_properties(device_id)
    root = Path(cache_root) if cache_root is not None else engine_cache.default_cache_dir()
    mismatches: list[tuple[str, EngineInfo | None]] = []
    in_bundle = {role: bundle.entries(role, "tensorrt", precision) for role in MODELS}
    if all(in_bundle.values()):
        sources = {}
        for role, (entry, *_) in in_bundle.items():
            if entry.engine is None:
                return None, BackendError(f"{bundle.path}: manifest entry {entry.path} has no engine record "
                                          "(TensorRT version, compute capability, batch profile)")
            problem = engine_cache.compatibility_problem(entry.engine, trt.__version__, gpu_name, capability)
            if problem is not None:
                mismatches.append((f"{bundle.path}/{entry.path} was {problem}", entry.engine))
                break
            sources[role] = EngineSource(f"{bundle.path}/{entry.path}", entry.engine, entry,
                                         lambda e=entry: bundle.read_verified(e))
        else:
            return sources, None
    # int8: the engines were built from the symmetric form (contract.TENSORRT_FORMS), keyed by its sha256
    onnx = {role: [e for c in TENSORRT_FORMS for e in bundle.entries(role, "onnx", precision) if e.consumer == c]
            for role in MODELS}
    if all(onnx.values()):
        sources = {}
        for role, (entry, *_) in onnx.items():
            found, rejected = engine_cache.lookup(root, entry.sha256, role, precision, trt.__version__,
                                                  gpu_name, capability)
            mismatches.extend((reason, None) for reason in rejected)
            if found is None:
                others = engine_cache.built_elsewhere(root, entry.sha256, role, precision)
                if others and not rejected:
                    mismatches.append((f"the engine cache {root} has {role} engines at {precision} only for "
                                       f"{', '.join(others)}; this is TensorRT {trt.__version__} on {gpu_name} "
                                       f"(compute capability {capability})", None))
                break
            sources[role] = EngineSource(str(found.plan), found.info, entry, found.read_verified)
        else:
            return sources, None
    info = mismatches[0][1] if mismatches else None
    command = rebuild_command(bundle.path, precision, info, device_id)
    if mismatches:
        return None, EngineMismatchError(f"{mismatches[0][0]}. Rebuild it here with `{command}`")
    return None, BackendError(
        f"no TensorRT engine at {precision} for TensorRT {trt.__version__} on {gpu_name} (compute capability "
        f"{capability}), neither in {bundle.path} nor in the engine cache {root}; build one here with `{command}`")


@dataclass
class TensorRecord:
    name: str
    is_input: bool
    dtype: np.dtype
    sample_shape: tuple  # the shape without the batch axis
    buffer: cuda.DeviceBuffer
    host: cuda.PinnedBuffer  # page-locked staging for host copies

    def host_view(self, batch: int) -> np.ndarray:
        return self.host.view((batch,) + self.sample_shape, self.dtype)


class EngineRunner:
    """One engine, one execution context, one stream, one device buffer per I/O tensor."""

    def __init__(self, trt, runtime, data: bytes, label: str, role: str, device_id: int):
        self.role, self.label, self.device_id = role, label, device_id
        cuda.set_device(device_id)
        engine = runtime.deserialize_cuda_engine(data)
        if engine is None:
            raise BackendError(f"TensorRT could not deserialize {label} (see the TensorRT log above)")
        self.engine = engine
        self.context = engine.create_execution_context()
        if self.context is None:
            raise BackendError(f"TensorRT could not create an execution context for {label}")
        self.lock = threading.Lock()
        self.tensors: dict[str, TensorRecord] = {}
        self.cuda_stream = None
        names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
        inputs = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        # the engine's own profile 0 is the truth (the manifest only records it): every input
        # must accept the batch, so the usable range is the intersection of theirs
        profiles = [engine.get_tensor_profile_shape(n, 0) for n in inputs]
        self.min_batch = int(max(p[0][0] for p in profiles))
        self.max_batch = int(min(p[2][0] for p in profiles))
        if self.min_batch > self.max_batch:
            raise BackendError(f"{label}: the inputs' batch profiles do not overlap ({self.min_batch} > {self.max_batch})")
        try:
            self.cuda_stream = cuda.Stream()
            self._allocate(trt, engine, names)
        except BaseException:
            self.free()  # buffers allocated before the failure are not leaked
            raise

    def _allocate(self, trt, engine, names) -> None:
        for name in names:
            dtype = np.dtype(trt.nptype(engine.get_tensor_dtype(name)))
            sample_shape = tuple(engine.get_tensor_shape(name))[1:]
            nbytes = int(np.prod(sample_shape)) * dtype.itemsize * self.max_batch
            record = TensorRecord(name, engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT, dtype, sample_shape,
                                  cuda.DeviceBuffer(nbytes), None)
            self.tensors[name] = record  # owned from here: free() releases it
            record.host = cuda.PinnedBuffer(nbytes)
            if not self.context.set_tensor_address(name, record.buffer.ptr):
                raise BackendError(f"{self.label}: set_tensor_address({name!r}) refused the buffer")

    def io(self) -> tuple[dict, dict]:
        specs = {r.name: (("batch",) + r.sample_shape, r.dtype.name) for r in self.tensors.values()}
        return ({k: v for k, v in specs.items() if self.tensors[k].is_input},
                {k: v for k, v in specs.items() if not self.tensors[k].is_input})

    def _prepare(self, batch: int) -> None:
        """On the calling thread: this runner's device, and the batch's input shapes."""
        if not self.min_batch <= batch <= self.max_batch:
            raise BackendError(f"{self.role}: batch {batch} is outside the engine's profile, which allows batch "
                               f"{self.min_batch}..{self.max_batch}")
        cuda.set_device(self.device_id)
        for record in self.tensors.values():
            if record.is_input and not self.context.set_input_shape(record.name, (batch,) + record.sample_shape):
                raise BackendError(f"{self.role}: set_input_shape({record.name!r}, batch {batch}) was refused; the "
                                   f"engine's profile allows batch {self.min_batch}..{self.max_batch}")

    def _execute(self) -> None:
        if not self.context.execute_async_v3(int(self.cuda_stream.handle)):
            raise BackendError(f"{self.role}: execute_async_v3 failed (see the TensorRT log above)")

    def run(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Host arrays in (min_batch <= batch <= max_batch), host arrays out; one synchronise."""
        batch = next(iter(inputs.values())).shape[0]
        with self.lock:
            self._prepare(batch)
            for name, array in inputs.items():
                record = self.tensors[name]
                staged = record.host_view(batch)
                np.copyto(staged, array)
                cuda.copy_async(record.buffer.ptr, record.host.ptr, staged.nbytes, "HostToDevice", self.cuda_stream)
            self._execute()
            outputs = [r for r in self.tensors.values() if not r.is_input]
            for record in outputs:
                nbytes = record.host_view(batch).nbytes
                cuda.copy_async(record.host.ptr, record.buffer.ptr, nbytes, "DeviceToHost", self.cuda_stream)
            self.cuda_stream.synchronize()  # the one wait of this chunk: the pinned outputs are valid after it
            return {r.name: r.host_view(batch).copy() for r in outputs}

    def enqueue_device(self, inputs: dict, outputs: dict) -> None:
        """Device (CuPy) arrays in and out, all work queued on self.cuda_stream; the caller queues its
        own work on the same stream (cupy.cuda.ExternalStream) and synchronises once at the end."""
        batch = next(iter(inputs.values())).shape[0]
        with self.lock:
            self._prepare(batch)
            for name, array in inputs.items():
                cuda.copy_async(self.tensors[name].buffer.ptr, array.data.ptr, array.nbytes, "DeviceToDevice",
                                self.cuda_stream)
            self._execute()
            for name, array in outputs.items():
                cuda.copy_async(array.data.ptr, self.tensors[name].buffer.ptr, array.nbytes, "DeviceToDevice",
                                self.cuda_stream)

    def free(self) -> None:
        for record in self.tensors.values():
            record.buffer.free()
            if record.host is not None:
                record.host.free()
        if self.cuda_stream is not None:
            self.cuda_stream.destroy()
        self.context = None
        self.engine = None


class TensorRTBackend(Backend):
    name = "tensorrt"

    @classmethod
    def unavailable(cls, bundle, precision, device):
        return locate_engines(bundle, precision, device)[1]

    @classmethod
    def resolve_device(cls, device):
        return device or "cuda:0"

    def __init__(self, bundle, precision, device, threads):
        super().__init__(bundle, precision, device, threads)
        sources, problem = locate_engines(bundle, precision, device)
        if problem is not None:
            raise problem
        trt = _trt()
        self._trt = trt
        self.device_id = cuda.device_index(device)
        self._logger = trt.Logger(trt.Logger.WARNING)
        self._runtime = trt.Runtime(self._logger)
        if any(s.info.version_compatible for s in sources.values()):
            self._runtime.engine_host_code_allowed = True  # version-compatible plans carry their lean runtime
        self._runners: dict[str, EngineRunner] = {}
        self._sources = sources
        self._cupy = cuda.cupy_or_none()
        try:
            for role, source in sources.items():
                check_entry_io(source.entry, role, str(bundle.path), self.image_size, self.latent_dim)
            # every engine (bundle or cache) read and hashed once before any is deserialized; they load from these bytes
            verified = {role: source.read() for role, source in sources.items()}
            for role, source in sources.items():
                runner = EngineRunner(trt, self._runtime, verified.pop(role), source.label, role, self.device_id)
                self._runners[role] = runner
                compare_io(source.entry, *runner.io(), str(bundle.path))
        except BaseException:
            self.close()
            raise

    @property
    def max_batch_limit(self) -> int:
        return min(r.max_batch for r in self._runners.values())

    @property
    def min_batch_limit(self) -> int:
        return max(r.min_batch for r in self._runners.values())

    @property
    def default_max_batch(self) -> int:
        return self.max_batch_limit

    def run(self, model, inputs):
        return self._runners[model].run(inputs)

    def latent_sampler(self, seed):
        if self._cupy is None:
            return super().latent_sampler(seed)
        return cuda.DeviceLatentSampler(seed, self.device_id)

    def convert(self, conditions, samples_per_condition, sampler, temperature, max_batch):
        if self._cupy is None:  # host noise, one pinned upload per chunk through the runner's buffers
            return super().convert(conditions, samples_per_condition, sampler, temperature, max_batch)
        cp = self._cupy
        size, total = self.image_size, conditions.shape[0] * samples_per_condition
        runner = self._runners["convertor"]
        with cp.cuda.Device(self.device_id):
            # CuPy's noise and gathers go on the runner's stream: ordered with TensorRT's work, no waits between
            with cp.cuda.ExternalStream(int(runner.cuda_stream.handle), self.device_id):
                latents = sampler.draw(total, self.latent_dim, temperature)  # (B * n, D)
                device_conditions = cp.asarray(conditions)
                out = cp.empty((total, 1, size, size), dtype=cp.float32)
                for start, stop in batch_slices(total, max_batch):
                    rows = cp.arange(start, stop) // samples_per_condition
                    count = stop - start
                    padded = max(count, runner.min_batch)  # pad a short chunk up to the profile's min
                    z = cp.ascontiguousarray(pad_rows(latents[start:stop], padded))
                    q = cp.ascontiguousarray(pad_rows(device_conditions[rows], padded))
                    y = out[start:stop] if padded == count else cp.empty((padded, 1, size, size), dtype=cp.float32)
                    runner.enqueue_device({"z": z, "q": q}, {"y": y})
                    if padded != count:
                        out[start:stop] = y[:count]
                runner.cuda_stream.synchronize()  # the one wait of the whole call
            return cp.asnumpy(out)

    def describe(self) -> str:
        noise = "on the device (CuPy)" if self._cupy is not None else "on the host (install CuPy to draw it on the device)"
        name, capability = cuda.device_properties(self.device_id)
        where = ", ".join(sorted({str(Path(s.label).parent) for s in self._sources.values()}))
        return (f"TensorRT {self._trt.__version__} on {name} (compute capability {capability}), engines from "
                f"{where}, batch profile {self.min_batch_limit}..{self.max_batch_limit}, noise drawn {noise}")

    def close(self) -> None:
        for runner in self._runners.values():
            runner.free()
        self._runners = {}
