"""ONNX Runtime: the CPU backend everywhere, and the CUDA / TensorRT execution providers
when onnxruntime-gpu and a GPU are there.

One InferenceSession per model, created once with full graph optimisation and one intra-op
thread per physical core; `InferenceSession.run` is thread safe, so one Converter serves
many threads. On a GPU, `convert` keeps noise, conditions and outputs on the device through
I/O binding (that path is written to the documented API and not run here: no GPU).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from ..contract import MODEL_IO, MODELS, tensor_shapes
from ..errors import BackendError, BundleError
from .base import Backend, HostLatentSampler, batch_slices, check_entry_io, compare_io, physical_cores
from . import cuda

ORT_TYPES = {"tensor(float)": "float32", "tensor(float16)": "float16", "tensor(double)": "float64",
             "tensor(int64)": "int64", "tensor(int32)": "int32", "tensor(uint8)": "uint8", "tensor(int8)": "int8"}
GPU_PROVIDERS = ("TensorrtExecutionProvider", "CUDAExecutionProvider")


def _ort():
    try:
        import onnxruntime
    except ImportError as err:
        raise BackendError("onnxruntime is not installed: expected `pip install onnxruntime` "
                           "(or onnxruntime-gpu)") from err
    return onnxruntime


def installed_distributions() -> list[tuple[str, str]]:
    """(name, version) of every installed ONNX Runtime wheel. They all install the one
    `onnxruntime` package, so with two of them the files of whichever came last win."""
    from importlib import metadata

    found = {}
    for dist in metadata.distributions():
        name = (dist.metadata["Name"] or "").lower().replace("_", "-")
        if name == "onnxruntime" or name.startswith("onnxruntime-") and name not in ("onnxruntime-extensions",
                                                                                     "onnxruntime-tools"):
            found[name] = dist.version
    return sorted(found.items())


def shadowing_note() -> str:
    """A clear word when several ONNX Runtime wheels share the one import, else ""."""
    dists = installed_distributions()
    if len(dists) < 2:
        return ""
    listed = " and ".join(f"{name} {version}" for name, version in dists)
    return (f"{listed} are all installed; they share the one `onnxruntime` import and shadow each other. Keep "
            "one: pip uninstall -y " + " ".join(name for name, _ in dists) + " && pip install onnxruntime-gpu "
            "(on Jetson: the onnxruntime-gpu wheel for your JetPack, docs/edge.md)")


def _gpu_present() -> bool:
    return cuda.gpu_visible()


# ONNX Runtime's TensorRT provider builds for the shapes it has seen unless given a profile:
# without one a larger batch rebuilds the engine (minutes on a Jetson). (min, opt, max) batch:
TRT_PROVIDER_BATCHES = (1, 64, 256)


def trt_profile_options(inputs: dict[str, tuple[int, ...]], batches=TRT_PROVIDER_BATCHES) -> dict[str, str]:
    """The provider's explicit profile, {input: per-sample shape} -> trt_profile_{min,opt,max}_shapes
    ("z:1x56,q:1x1x28x28"), so one engine serves every batch up to the max."""
    def shapes(batch: int) -> str:
        return ",".join(f"{name}:" + "x".join(str(d) for d in (batch, *shape)) for name, shape in inputs.items())
    return {f"trt_profile_{kind}_shapes": shapes(batch) for kind, batch in zip(("min", "opt", "max"), batches)}


def gpu_providers(available: list[str], device_id: int, cache_root: Path,
                  profile_inputs: dict[str, tuple[int, ...]] | None = None) -> list:
    """The GPU providers this onnxruntime has, with options, most specialised first. TensorRT's
    provider builds engines at session creation (minutes on a Jetson): its engine and timing
    caches make every later load reuse them. ORT keys its engine files by graph and GPU
    itself; the directory adds the onnxruntime version (which fixes the TensorRT it links)."""
    chosen = []
    if "TensorrtExecutionProvider" in available:
        cache_root.mkdir(parents=True, exist_ok=True)
        chosen.append(("TensorrtExecutionProvider", {
            "device_id": device_id,
            "trt_engine_cache_enable": True, "trt_engine_cache_path": str(cache_root),
            "trt_timing_cache_enable": True, "trt_timing_cache_path": str(cache_root),
            **(trt_profile_options(profile_inputs) if profile_inputs else {}),
        }))
    if "CUDAExecutionProvider" in available:
        chosen.append(("CUDAExecutionProvider", {"device_id": device_id}))
    return chosen


def _trt_provider_cache(ort, device_id: int) -> Path:
    from .. import engine_cache

    name, capability = cuda.device_properties(device_id) if cuda.gpu_count() > device_id else ("gpu", "0.0")
    return (engine_cache.default_cache_dir() / f"onnxruntime-{ort.__version__}" /
            engine_cache.gpu_key(name, capability))


class OnnxRuntimeBackend(Backend):
    name = "onnxruntime"
    options = {"int8_form": ("auto", "cpu", "tensorrt")}  # which int8 file (contract.CONSUMERS) it runs

    @classmethod
    def unavailable(cls, bundle, precision, device):
        try:
            ort = _ort()
        except BackendError as err:
            return err
        if device is not None and device.startswith("cuda"):
            have = ort.get_available_providers()
            if "CUDAExecutionProvider" not in have:
                note = shadowing_note()
                return BackendError(f"device {device!r} needs onnxruntime-gpu's CUDAExecutionProvider; "
                                    f"this onnxruntime {ort.__version__} has {have}" + (f". {note}" if note else ""))
            if not _gpu_present():
                return BackendError(f"device {device!r} requested, but no CUDA GPU is visible")
        return None

    @classmethod
    def resolve_device(cls, device):
        if device is not None:
            return device
        try:
            gpu_provider = "CUDAExecutionProvider" in _ort().get_available_providers()
        except BackendError:
            return "cpu"
        return "cuda:0" if gpu_provider and _gpu_present() else "cpu"

    def __init__(self, bundle, precision, device, threads, int8_form: str = "auto"):
        super().__init__(bundle, precision, device, threads)
        ort = _ort()
        self._ort = ort
        self.on_gpu = device.startswith("cuda")
        self.device_id = cuda.device_index(device) if self.on_gpu else 0
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.intra_op_num_threads = threads or physical_cores()
        options.inter_op_num_threads = 1  # two small sequential graphs: nothing to run side by side
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        self.intra_op_threads = options.intra_op_num_threads
        self._sessions = {}
        self._output_names = {}
        # int8: the uint8-activation form on the CPU (x86 U8S8 kernels), the symmetric one on a GPU
        # int8_form names one form instead: the exporter measures both forms' NLL and parity here
        consumers = ("tensorrt", "any", "cpu") if self.on_gpu else ("cpu", "any", "tensorrt")
        if int8_form != "auto":
            consumers = (int8_form, "any")
        entries = {role: bundle.model_entry(role, precision, "onnx", consumers) for role in MODELS}
        self._files = [f"{e.path} (consumer {e.consumer})" for e in entries.values()]
        for role, entry in entries.items():  # every manifest entry checked before any session exists
            check_entry_io(entry, role, str(bundle.path), self.image_size, self.latent_dim)
        # both files read and hashed (once) before either is parsed: a changed byte in one is refused
        # before any session exists. Sessions load these bytes, not the path: what runs is what was
        # verified, and an ONNX file cannot pull in external data files the manifest does not list
        verified = {role: bundle.read_verified(entry) for role, entry in entries.items()}
        for role, entry in entries.items():
            path = bundle.file(entry.path)
            model_bytes = verified.pop(role)
            providers = self._providers(ort, role)
            try:
                session = ort.InferenceSession(model_bytes, options, providers=providers)
            except Exception as err:  # ORT raises its own Fail/InvalidGraph types
                raise load_error(ort, path, device, err) from err
            if self.on_gpu and not set(GPU_PROVIDERS) & set(session.get_providers()):
                raise BackendError(f"expected {role} on {device} through {GPU_PROVIDERS}, but onnxruntime "
                                   f"only initialised {session.get_providers()} (check CUDA and cuDNN)")
            compare_io(entry, _node_specs(session.get_inputs()), _node_specs(session.get_outputs()),
                       str(bundle.path))
            self._sessions[role] = session
            self._output_names[role] = [o.name for o in session.get_outputs()]
        self.providers = self._sessions["convertor"].get_providers()
        self._cupy = cuda.cupy_or_none() if self.on_gpu else None

    def _providers(self, ort, role: str) -> list:
        if not self.on_gpu:
            return ["CPUExecutionProvider"]
        cache = _trt_provider_cache(ort, self.device_id)
        shapes = tensor_shapes(self.image_size, self.latent_dim)
        inputs = {name: shapes[name] for name in MODEL_IO[role].inputs}
        return gpu_providers(ort.get_available_providers(), self.device_id, cache, inputs) + ["CPUExecutionProvider"]

    @property
    def max_batch_limit(self) -> int | None:
        # the TensorRT provider's profile ends at its max batch: the Converter chunks to fit it
        if "TensorrtExecutionProvider" in getattr(self, "providers", ()):
            return TRT_PROVIDER_BATCHES[2]
        return None

    def run(self, model, inputs):
        outputs = self._sessions[model].run(self._output_names[model], inputs)
        return dict(zip(self._output_names[model], outputs))

    def describe(self) -> str:
        noise = ("on the device (CuPy)" if self._cupy is not None else "on the host (install CuPy to draw "
                 "it on the device)") if self.on_gpu else "on the host"
        note = shadowing_note()
        return (f"onnxruntime {self._ort.__version__}, providers {self.providers}, "
                f"{self.intra_op_threads} intra-op threads, files {', '.join(self._files)}, noise drawn {noise}"
                + (f"; warning: {note}" if note else ""))

    # -- GPU: noise drawn on the device, inputs and outputs bound there --------------------

    def latent_sampler(self, seed):
        if self._cupy is None:
            return HostLatentSampler(seed)
        return cuda.DeviceLatentSampler(seed, self.device_id)

    def convert(self, conditions, samples_per_condition, sampler, temperature, max_batch):
        if self._cupy is None:  # CPU, or GPU without CuPy: ORT copies each chunk in and out
            return super().convert(conditions, samples_per_condition, sampler, temperature, max_batch)
        cp, device_id = self._cupy, self.device_id
        size = self.image_size
        total = conditions.shape[0] * samples_per_condition
        session = self._sessions["convertor"]
        with cp.cuda.Device(device_id):
            latents = cp.ascontiguousarray(sampler.draw(total, self.latent_dim, temperature))  # (B * n, D)
            device_conditions = cp.asarray(conditions)  # the B conditions cross the bus once
            gathered = device_conditions[cp.arange(total) // samples_per_condition]  # (B * n, 1, S, S), contiguous
            out = cp.empty((total, 1, size, size), dtype=cp.float32)
            # ORT computes on its own stream: CuPy's writes land before it reads them. One wait for
            # all chunks here, instead of one per chunk on top of the wait inside each ORT run.
            cp.cuda.get_current_stream().synchronize()
            for start, stop in batch_slices(total, max_batch):
                q_chunk, z_chunk = gathered[start:stop], latents[start:stop]  # contiguous row ranges
                y_chunk = out[start:stop]  # ORT writes in place
                binding = session.io_binding()  # per call: bindings are not shared between threads
                binding.bind_input("z", "cuda", device_id, np.float32, z_chunk.shape, z_chunk.data.ptr)
                binding.bind_input("q", "cuda", device_id, np.float32, q_chunk.shape, q_chunk.data.ptr)
                binding.bind_output("y", "cuda", device_id, np.float32, y_chunk.shape, y_chunk.data.ptr)
                session.run_with_iobinding(binding)
            return cp.asnumpy(out)  # (B * n, 1, S, S): the one copy back to the host


# what onnxruntime raises for a file that is not a loadable graph; anything else (an opset
# newer than this onnxruntime, memory, a provider) is about this machine, not the bundle
BROKEN_MODEL_ERRORS = ("InvalidProtobuf", "InvalidGraph", "NoModel")


def load_error(ort, path, device: str, err: Exception) -> Exception:
    if type(err).__name__ in BROKEN_MODEL_ERRORS:
        return BundleError(f"{path}: expected an ONNX model that onnxruntime loads (its sha256 matches the "
                           f"manifest, so it was exported broken or truncated), got: {err}")
    note = shadowing_note()
    return BackendError(f"onnxruntime {ort.__version__} could not load {path} on {device} "
                        f"({type(err).__name__}): {err}. The file matches its sha256; this onnxruntime or machine "
                        "cannot run it (an opset newer than this onnxruntime? out of memory?)"
                        + (f". {note}" if note else ""))


def _node_specs(nodes) -> dict[str, tuple[tuple, str]]:
    return {n.name: (tuple(n.shape), ORT_TYPES.get(n.type, n.type)) for n in nodes}
