"""OpenVINO: the fast CPU backend on x86 (bf16 on AMX / AVX512-BF16, int8 on VNNI / AMX-INT8).

Both models are read from the bundle's verified ONNX bytes and compiled once, in __init__, with
the precision as OpenVINO's INFERENCE_PRECISION_HINT (f32, or bf16 for the fp32 graph; the int8
QDQ file in its CPU form runs with f32 between its int8 convolutions). By default each
model is compiled twice (PERFORMANCE_HINTS below): small batches run on a LATENCY model, large
ones are cut into one slice per stream of a THROUGHPUT model, run side by side. Calls take infer requests from a pool (created
on demand and reused): an InferRequest is not thread safe, the CompiledModel that makes them is,
so one Converter serves many threads without a lock around the engine.

Devices: "cpu" is run and tested here. OpenVINO's own names for an Intel GPU or NPU ("GPU",
"GPU.1", "NPU") pass through to Core.compile_model unchanged; they are not run here.
"""
from __future__ import annotations

import queue
from typing import ClassVar

import numpy as np

from ..contract import FILE_PRECISION
from ..cpu import BF16_FLAGS, this_cpu
from ..errors import BackendError, BundleError, InputError
from ..contract import MODELS
from .base import Backend, check_entry_io, compare_io, physical_cores

RUNS = ("fp32", "bf16", "int8")  # the contract.RUN_PRECISIONS it runs
HINT = {"fp32": "f32", "bf16": "bf16", "int8": "f32"}  # INFERENCE_PRECISION_HINT per precision
# performance_hint -> the OpenVINO PERFORMANCE_HINT each batch size class is compiled with. The
# default compiles twice: a batch of fewer than 2 * MIN_ROWS_PER_STREAM rows runs whole on a
# LATENCY model (all threads on one request), a larger one is cut into one slice per stream of
# a THROUGHPUT model (one stream per core, one thread each) and the slices run side by side.
# Compare them with `python -m bench --peers openvino-bf16 openvino-bf16-latency
# openvino-bf16-throughput` (docs/cpu_inference.md).
PERFORMANCE_HINTS = {"LATENCY_AND_THROUGHPUT": ("LATENCY", "THROUGHPUT"), "LATENCY": ("LATENCY", "LATENCY"),
                     "THROUGHPUT": ("THROUGHPUT", "THROUGHPUT"),
                     "CUMULATIVE_THROUGHPUT": ("CUMULATIVE_THROUGHPUT", "CUMULATIVE_THROUGHPUT")}
MIN_ROWS_PER_STREAM = 8
SIZES = ("small", "large")
OV_TYPES = {"f32": "float32", "f16": "float16", "bf16": "bfloat16", "i64": "int64", "i32": "int32",
            "u8": "uint8", "i8": "int8"}
CONSUMERS = ("cpu", "any", "tensorrt")  # the int8 form x86 kernels run fast first


def _ov():
    try:
        import openvino
    except ImportError as err:
        raise BackendError("openvino is not installed: expected `pip install 'vce-deploy[openvino]'`") from err
    return openvino


def ov_device(device: str) -> str:
    """The runtime's "cpu" is OpenVINO's "CPU"; OpenVINO device names pass through."""
    return "CPU" if device == "cpu" else device


class OpenVinoBackend(Backend):
    name = "openvino"
    precisions = RUNS
    device_names = r"cpu|GPU(\.\d+)?|NPU"
    options: ClassVar[dict[str, tuple]] = {"performance_hint": tuple(PERFORMANCE_HINTS)}

    @classmethod
    def unavailable(cls, bundle, precision, device):
        if precision not in RUNS:
            return BackendError(f"openvino runs precisions {list(RUNS)}, got {precision!r}")
        try:
            _ov()
        except BackendError as err:
            return err
        if precision == "bf16" and (device or "cpu") == "cpu" and not this_cpu().native_bf16:
            runs = [p for p in RUNS if p != "bf16"]
            return BackendError(f"precision 'bf16' needs a CPU with native bfloat16 ({' or '.join(BF16_FLAGS)} in "
                                f"/proc/cpuinfo); this {this_cpu().describe()} has neither: openvino here runs {runs}")
        if not bundle.entries("convertor", "onnx", FILE_PRECISION[precision]):
            return BackendError(f"{bundle.path} has no {FILE_PRECISION[precision]} ONNX graphs for openvino "
                                f"precision {precision!r}")
        return None

    def __init__(self, bundle, precision, device, threads, performance_hint: str = "LATENCY_AND_THROUGHPUT"):
        super().__init__(bundle, precision, device, threads)
        if performance_hint not in PERFORMANCE_HINTS:
            raise InputError(f"performance_hint: expected one of {list(PERFORMANCE_HINTS)}, got {performance_hint!r}")
        ov = _ov()
        self._ov_version = ov.__version__.split("-")[0]
        core = ov.Core()
        self.threads = threads or physical_cores()
        config = {"INFERENCE_PRECISION_HINT": HINT[precision]}
        if ov_device(device) == "CPU":
            config["INFERENCE_NUM_THREADS"] = self.threads
        self.performance_hint = performance_hint
        self._compiled, self._pools, self._outputs, self._files = {}, {}, {}, []
        entries = {role: bundle.model_entry(role, FILE_PRECISION[precision], "onnx", CONSUMERS) for role in MODELS}
        for role, entry in entries.items():
            check_entry_io(entry, role, str(bundle.path), self.image_size, self.latent_dim)
        for role, entry in entries.items():
            try:  # the verified bytes, never the path: what runs is what was hashed
                model = core.read_model(bundle.read_verified(entry), b"")
            except RuntimeError as err:
                raise BundleError(f"{bundle.file(entry.path)}: expected an ONNX model OpenVINO reads (its sha256 "
                                  f"matches the manifest), got: {str(err).splitlines()[0]}") from err
            compare_io(entry, _specs(model.inputs), _specs(model.outputs), str(bundle.path))
            for size, hint in zip(SIZES, PERFORMANCE_HINTS[performance_hint]):
                try:
                    compiled = core.compile_model(model, ov_device(device), {**config, "PERFORMANCE_HINT": hint})
                except RuntimeError as err:
                    raise BackendError(f"openvino could not compile {entry.path} for {ov_device(device)!r} with "
                                       f"{config}, PERFORMANCE_HINT {hint}: {str(err).splitlines()[0]}") from err
                self._compiled[role, size] = compiled
                self._pools[role, size] = queue.SimpleQueue()
                self._pools[role, size].put(compiled.create_infer_request())  # the first one, made at load
            self._outputs[role] = [o.get_any_name() for o in model.outputs]
            self._files.append(f"{entry.path} (consumer {entry.consumer})")
        self.streams = max(1, int(self._compiled["convertor", "large"].get_property("NUM_STREAMS")))

    def _take(self, key: tuple[str, str]):
        try:
            return self._pools[key].get_nowait()
        except queue.Empty:  # more concurrent callers than requests so far: one more, kept after
            return self._compiled[key].create_infer_request()

    def run(self, model, inputs):
        batch = next(iter(inputs.values())).shape[0]
        parts = max(1, min(self.streams, batch // MIN_ROWS_PER_STREAM))
        key = (model, "large" if batch >= 2 * MIN_ROWS_PER_STREAM else "small")
        bounds = np.linspace(0, batch, parts + 1).astype(int)
        requests = [self._take(key) for _ in range(parts)]
        try:
            # one slice of the batch per stream, run side by side; share_inputs: OpenVINO reads
            # the caller's arrays in place (they outlive the wait below)
            for request, start, stop in zip(requests, bounds[:-1], bounds[1:]):
                request.start_async({k: v[start:stop] for k, v in inputs.items()}, share_inputs=True)
            for request in requests:
                request.wait()
            # outputs are copied out before the requests go back to the pool, where the next
            # call overwrites them
            return {name: np.concatenate([r.get_output_tensor(i).data for r in requests]) if parts > 1
                    else np.array(requests[0].get_output_tensor(i).data)
                    for i, name in enumerate(self._outputs[model])}
        finally:
            for request in requests:
                self._pools[key].put(request)

    def describe(self) -> str:
        return (f"openvino {self._ov_version} on {ov_device(self.device)}, INFERENCE_PRECISION_HINT "
                f"{HINT[self.precision]}, performance_hint {self.performance_hint} ({self.streams} streams for a "
                f"batch of >= {2 * MIN_ROWS_PER_STREAM} rows, split across them), {self.threads} threads, files "
                f"{', '.join(self._files)}, a pool of infer requests, noise drawn on the host")


def _specs(ports) -> dict[str, tuple[tuple, str]]:
    out = {}
    for port in ports:
        shape = tuple(d.get_length() if d.is_static else None for d in port.get_partial_shape())
        out[port.get_any_name()] = (shape, OV_TYPES.get(port.get_element_type().get_type_name(),
                                                        port.get_element_type().get_type_name()))
    return out
