"""Stand-ins for cuda-python's runtime and TensorRT 10, for a machine with neither.

They check how vce_deploy drives the documented APIs (which device is current on which
thread, pinned or pageable copies, how many stream waits, the batch profile, the timing
cache), NOT that TensorRT builds or runs anything: nothing here touches a GPU.

"Device" memory is host memory, so copies are real memmoves and a fake engine computes
outputs a test can check: convertor y = 0.5 q + mean(z) per row; encoder mu = the first
latent_dim pixels of x + q, logvar = -mu.
"""
from __future__ import annotations

import contextlib
import ctypes
import itertools
import json
import threading
import types

import numpy as np


class FakeCudart:
    class cudaError_t:
        cudaSuccess = 0
        cudaErrorInvalidDevice = 101

    class cudaMemcpyKind:
        cudaMemcpyHostToDevice = 1
        cudaMemcpyDeviceToHost = 2
        cudaMemcpyDeviceToDevice = 3

    cudaStreamNonBlocking = 1

    def __init__(self, devices=(("NVIDIA Jetson AGX Orin", 8, 7),)):
        self.devices = list(devices)
        self.local = threading.local()
        self.device_memory: dict[int, tuple] = {}  # ptr -> (buffer, device)
        self.pinned: dict[int, object] = {}
        self.stream_flags: list[int] = []
        self.syncs = 0
        self.copies: list[tuple[str, bool]] = []  # (kind, host side pinned?)
        self.wrong_device: list[str] = []  # device memory touched while another device was current
        self._handles = itertools.count(1)

    def current(self) -> int:
        return getattr(self.local, "device", 0)  # CUDA's default on every new host thread

    def cudaSetDevice(self, device):
        if not 0 <= device < len(self.devices):
            return (self.cudaError_t.cudaErrorInvalidDevice,)
        self.local.device = device
        return (0,)

    def cudaGetDeviceCount(self):
        return (0, len(self.devices))

    def cudaGetDeviceProperties(self, device):
        name, major, minor = self.devices[device]
        return (0, types.SimpleNamespace(name=name.encode(), major=major, minor=minor))

    def cudaGetErrorName(self, status):
        return (0, b"cudaErrorInvalidDevice" if status == 101 else b"cudaErrorUnknown")

    def cudaStreamCreate(self):
        self.stream_flags.append(0)
        return (0, next(self._handles))

    def cudaStreamCreateWithFlags(self, flags):
        self.stream_flags.append(flags)
        return (0, next(self._handles))

    def cudaStreamSynchronize(self, handle):
        self.syncs += 1
        return (0,)

    def cudaStreamDestroy(self, handle):
        return (0,)

    def cudaMalloc(self, nbytes):
        buffer = ctypes.create_string_buffer(max(nbytes, 1))
        self.device_memory[ctypes.addressof(buffer)] = (buffer, self.current())
        return (0, ctypes.addressof(buffer))

    def cudaFree(self, ptr):
        self.device_memory.pop(ptr)
        return (0,)

    def cudaHostAlloc(self, nbytes, flags):
        buffer = ctypes.create_string_buffer(max(nbytes, 1))
        self.pinned[ctypes.addressof(buffer)] = buffer
        return (0, ctypes.addressof(buffer))

    def cudaFreeHost(self, ptr):
        self.pinned.pop(ptr)
        return (0,)

    def _check_device(self, ptr, what):
        if ptr in self.device_memory and self.device_memory[ptr][1] != self.current():
            self.wrong_device.append(f"{what} on device {self.current()} of memory on {self.device_memory[ptr][1]}")

    def cudaMemcpyAsync(self, dst, src, nbytes, kind, stream):
        kinds = {1: "HostToDevice", 2: "DeviceToHost", 3: "DeviceToDevice"}
        host = {1: src, 2: dst, 3: None}[kind]
        self.copies.append((kinds[kind], host in self.pinned if host is not None else True))
        for ptr in (dst, src):
            self._check_device(ptr, kinds[kind])
        ctypes.memmove(dst, src, nbytes)
        return (0,)


def _array(ptr: int, shape: tuple) -> np.ndarray:
    count = int(np.prod(shape))
    return np.frombuffer((ctypes.c_float * count).from_address(ptr), dtype=np.float32).reshape(shape)


def fake_compute(role: str, inputs: dict[str, np.ndarray], latent_dim: int) -> dict[str, np.ndarray]:
    """What a fake engine computes (tests compare against it)."""
    if role == "convertor":
        return {"y": 0.5 * inputs["q"] + inputs["z"].mean(axis=1)[:, None, None, None]}
    mu = (inputs["x"] + inputs["q"]).reshape(len(inputs["x"]), -1)[:, :latent_dim].copy()
    return {"mu": mu, "logvar": -mu}


class FakeTensorRT(types.ModuleType):
    """The parts of the TensorRT 10 Python API that vce_deploy uses, builder and runtime."""

    class Logger:
        WARNING, VERBOSE = "warning", "verbose"

        def __init__(self, level):
            self.level = level

    class TensorIOMode:
        INPUT, OUTPUT = "input", "output"

    class MemoryPoolType:
        WORKSPACE = "workspace"

    class BuilderFlag:
        VERSION_COMPATIBLE = "version_compatible"
        TF32 = "tf32"  # set by default in a new builder config, as in TensorRT 10

    class HardwareCompatibilityLevel:
        AMPERE_PLUS = "ampere_plus"

    class NetworkDefinitionCreationFlag:
        STRONGLY_TYPED = 2

    @staticmethod
    def nptype(dtype):
        return np.float32

    def __init__(self, cudart: FakeCudart, version: str = "10.3.0", reject_timing_cache: bool = False):
        super().__init__("tensorrt")
        self.__version__ = version
        self.cudart = cudart
        self.calls: list[tuple] = []
        self.executed: list[tuple[str, int]] = []  # (role, batch) per execute_async_v3
        self.reject_timing_cache = reject_timing_cache
        fake = self

        class Tensor:
            def __init__(self, name, shape):
                self.name, self.shape, self.dtype = name, shape, "float32"

        class Network:
            def __init__(self, flags):
                fake.calls.append(("create_network", flags))
                self.inputs, self.outputs = [], []

            num_inputs = property(lambda self: len(self.inputs))
            num_outputs = property(lambda self: len(self.outputs))

            def get_input(self, i):
                return self.inputs[i]

            def get_output(self, i):
                return self.outputs[i]

        class OnnxParser:
            num_errors = 0

            def __init__(self, network, logger):
                self.network = network

            def parse_from_file(self, path):
                import onnx

                graph = onnx.load(path).graph

                def tensors(values):
                    return [Tensor(v.name, tuple(d.dim_value or -1 for d in v.type.tensor_type.shape.dim))
                            for v in values]

                self.network.inputs, self.network.outputs = tensors(graph.input), tensors(graph.output)
                return True

        class Cache:
            def __init__(self, blob):
                self.blob = blob

            def serialize(self):
                return b"timings:" + fake.gpu_tag().encode()

        class Profile:
            def __init__(self):
                self.shapes = {}

            def set_shape(self, name, low, opt, high):
                fake.calls.append(("set_shape", name, low, opt, high))
                self.shapes[name] = (low, opt, high)

        class Config:
            def __init__(self):
                # TensorRT 10 turns TF32 on in every new config: fp32 layers may round to TF32
                self.profile, self.flags, self.hardware_compatibility_level = None, ["tf32"], None
                self.timing_cache = None

            def set_memory_pool_limit(self, pool, size):
                fake.calls.append(("workspace", pool, size))

            def set_flag(self, flag):
                self.flags.append(flag)

            def clear_flag(self, flag):
                self.flags = [f for f in self.flags if f != flag]

            def get_flag(self, flag):
                return flag in self.flags

            def add_optimization_profile(self, profile):
                self.profile = profile

            def create_timing_cache(self, blob):
                fake.calls.append(("timing_cache_in", bytes(blob)))
                if blob and fake.reject_timing_cache:
                    return None  # what TensorRT returns for a cache it cannot read
                return Cache(bytes(blob))

            def set_timing_cache(self, cache, ignore_mismatch):
                if cache is None:
                    raise TypeError("set_timing_cache(): incompatible function arguments (None)")
                self.timing_cache = cache
                return True

            def get_timing_cache(self):
                return self.timing_cache

        class Builder:
            def __init__(self, logger):
                self.device = fake.cudart.current()  # TensorRT builds on the current device
                fake.calls.append(("builder_on_device", self.device))

            def create_builder_config(self):
                return Config()

            def create_network(self, flags):
                return Network(flags)

            def create_optimization_profile(self):
                return Profile()

            def build_serialized_network(self, network, config):
                plan = {"device": self.device, "flags": config.flags,
                        "hardware": config.hardware_compatibility_level,
                        "inputs": {t.name: list(t.shape[1:]) for t in network.inputs},
                        "outputs": {t.name: list(t.shape[1:]) for t in network.outputs},
                        "profile": {name: [s[0][0], s[1][0], s[2][0]] for name, s in config.profile.shapes.items()}}
                return b"FAKEPLAN" + json.dumps(plan).encode()

        class Context:
            def __init__(self, engine):
                self.engine, self.shapes, self.addresses = engine, {}, {}

            def set_input_shape(self, name, shape):
                low, _, high = self.engine.plan["profile"][name]
                if not low <= shape[0] <= high:
                    return False
                self.shapes[name] = tuple(shape)
                return True

            def set_tensor_address(self, name, ptr):
                self.addresses[name] = ptr
                return True

            def execute_async_v3(self, stream):
                plan = self.engine.plan
                if fake.cudart.current() != plan["device"]:
                    fake.cudart.wrong_device.append(f"execute on device {fake.cudart.current()}, "
                                                    f"engine on {plan['device']}")
                    return False
                batch = next(iter(self.shapes.values()))[0]
                inputs = {n: _array(self.addresses[n], (batch, *shape)).copy() for n, shape in plan["inputs"].items()}
                role = "convertor" if "z" in inputs else "encoder"
                latent_dim = plan["inputs"]["z"][0] if role == "convertor" else plan["outputs"]["mu"][0]
                fake.executed.append((role, batch))
                for name, value in fake_compute(role, inputs, latent_dim).items():
                    _array(self.addresses[name], value.shape)[...] = value
                return True

        class Engine:
            def __init__(self, plan):
                self.plan = plan
                self.names = list(plan["inputs"]) + list(plan["outputs"])

            num_io_tensors = property(lambda self: len(self.names))

            def get_tensor_name(self, i):
                return self.names[i]

            def get_tensor_mode(self, name):
                return fake.TensorIOMode.INPUT if name in self.plan["inputs"] else fake.TensorIOMode.OUTPUT

            def get_tensor_dtype(self, name):
                return "float32"

            def get_tensor_shape(self, name):
                return (-1, *({**self.plan["inputs"], **self.plan["outputs"]}[name]))

            def get_tensor_profile_shape(self, name, profile):
                low, opt, high = self.plan["profile"][name]
                shape = self.plan["inputs"][name]
                return [(low, *shape), (opt, *shape), (high, *shape)]

            def create_execution_context(self):
                return Context(self)

        class Runtime:
            engine_host_code_allowed = False

            def __init__(self, logger):
                pass

            def deserialize_cuda_engine(self, data):
                if not bytes(data).startswith(b"FAKEPLAN"):
                    return None
                plan = json.loads(bytes(data)[len(b"FAKEPLAN"):])
                plan["device"] = fake.cudart.current()  # an engine lives on the device current at load
                return Engine(plan)

        self.Builder, self.OnnxParser, self.Runtime = Builder, OnnxParser, Runtime

    def gpu_tag(self) -> str:
        name, major, minor = self.cudart.devices[self.cudart.current()]
        return f"{self.__version__}/{name}/{major}.{minor}"


def install(monkeypatch, devices=(("NVIDIA Jetson AGX Orin", 8, 7),), version="10.3.0", **options):
    """Put the fakes where vce_deploy looks for cuda-python and tensorrt; returns (cudart, trt)."""
    import sys

    from vce_deploy.backends import cuda

    cudart = FakeCudart(devices)
    trt = FakeTensorRT(cudart, version, **options)
    monkeypatch.setattr(cuda, "runtime", lambda: cudart)
    monkeypatch.setitem(sys.modules, "tensorrt", trt)
    return cudart, trt


class FakeCupy(types.ModuleType):
    """The parts of CuPy DeviceLatentSampler uses, modelling what hid issue 25's noise bugs:
    a generator keeps one state per GPU thread (one per value drawn), so a draw's numbers
    depend on its size, and every generator set-up and draw records the stream it ran on."""

    def __init__(self):
        super().__init__("cupy")
        fake = self
        self.float32 = np.float32
        self.events: list[tuple[str, str]] = []  # (what, stream name)
        self._streams = ["null"]
        self.concatenate, self.ascontiguousarray = np.concatenate, np.ascontiguousarray

        def empty(shape, dtype=np.float32):
            return np.empty(shape, dtype)
        self.empty = empty

        class Stream:
            def __init__(self, name):
                self.name = name

            def __enter__(self):
                fake._streams.append(self.name)

            def __exit__(self, *exc):
                fake._streams.pop()

        class Device:
            def __init__(self, index):
                self.index = index

            def __enter__(self):
                return self

            def __exit__(self, *exc):
                return None

        class Philox4x3210:
            def __init__(self, seed):
                self.seed = int(seed)
                fake.events.append(("seed", fake._streams[-1]))

        class Generator:
            def __init__(self, bit_generator):
                self.bit, self.calls = bit_generator, 0

            def standard_normal(self, shape, dtype=np.float32):
                fake.events.append(("draw", fake._streams[-1]))
                size = int(np.prod(shape))
                # one state per thread of a launch of `size` threads: the numbers depend on the size
                values = np.random.default_rng((self.bit.seed, size, self.calls)).standard_normal(size)
                self.calls += 1
                return values.astype(dtype).reshape(shape)

        self.cuda = types.SimpleNamespace(Device=Device, ExternalStream=lambda handle, device=None: Stream(f"ext{handle}"),
                                          Stream=Stream)
        self.random = types.SimpleNamespace(Generator=Generator, Philox4x3210=Philox4x3210)


class FakeTorchStreams(types.SimpleNamespace):
    """Enough of torch.cuda for GraphRunner, modelling stream ordering: each stream runs its own
    work in order, and work on stream B is after stream A's only once B waited on A. A write
    into a static input that is not ordered after every earlier replay is a race (`races`).
    TF32 flags start as PyTorch's CUDA defaults (cuDNN TF32 on)."""

    def __init__(self):
        fake = self
        self.races: list[str] = []
        self.replays: list[tuple[str, int]] = []  # (stream, its op index) of every replay
        self.waited: dict[str, dict[str, int]] = {}  # stream -> {other: ops of other it waited for}
        self.ops: dict[str, int] = {}  # stream -> ops enqueued so far
        self.current = ["default"]

        def ordered_after(stream, other, index):
            return stream == other or self.waited.get(stream, {}).get(other, -1) > index

        class Tensor:
            def __init__(self, value=None):
                self.value = value

            def clone(self):
                fake._op()
                return Tensor(self.value)

            def copy_(self, other, non_blocking=False):
                here = fake.current[-1]
                for stream, index in fake.replays:
                    if not ordered_after(here, stream, index):
                        fake.races.append(f"input written on {here} during a replay on {stream}")
                fake._op()
                self.value = other.value

            def record_stream(self, stream):
                pass

        class Stream:
            count = 0

            def __init__(self, name=None):
                Stream.count += 1
                self.name = name or f"stream{Stream.count}"

            def wait_stream(self, other):
                fake.waited.setdefault(self.name, {})[other.name] = fake.ops.get(other.name, 0)

        class StreamContext:
            def __init__(self, stream):
                self.stream = stream

            def __enter__(self):
                fake.current.append(self.stream.name)

            def __exit__(self, *exc):
                fake.current.pop()

        class CUDAGraph:
            def replay(self):
                here = fake.current[-1]
                fake.replays.append((here, fake.ops.get(here, 0)))
                fake._op()

        self.Tensor = Tensor
        self.cuda = types.SimpleNamespace(
            Stream=Stream, stream=StreamContext, current_stream=lambda: Stream(fake.current[-1]),
            CUDAGraph=CUDAGraph, graph=lambda graph, **kw: contextlib.nullcontext())
        self.inference_mode = contextlib.nullcontext
        self.backends = types.SimpleNamespace(cuda=types.SimpleNamespace(matmul=types.SimpleNamespace(allow_tf32=True)),
                                              cudnn=types.SimpleNamespace(allow_tf32=True))
        self.float32_matmul_precision = "high"

    def set_float32_matmul_precision(self, value):
        self.float32_matmul_precision = value

    def _op(self):
        here = self.current[-1]
        self.ops[here] = self.ops.get(here, 0) + 1
