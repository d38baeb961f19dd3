"""Eager PyTorch: the reference every exported graph is judged by, on the CPU, and on a CUDA
GPU with CUDA graphs.

It runs the bundle's checkpoint (`Converter.load(..., backend="torch")`), or a VCE module
already in memory (`Converter.from_torch(model)`: training's validation and the exporter's
int8 calibration), without copying its weights. torch is imported here, on construction,
and nowhere else in the runtime.

On CUDA, for a bundle's checkpoint: each (model, batch size) is captured once as a CUDA graph (static input and output
tensors, replayed per call: one launch instead of ~40 kernel launches per batch), up to
MAX_GRAPHS shapes, eager beyond that. Noise is drawn on the device (CuPy's Philox if CuPy is
installed, else torch's CUDA generator), conditions are gathered there and the B * n outputs
cross the bus once. A graph's static buffers are shared, so each replay holds that graph's
lock; the CUDA path is written to the documented torch.cuda API and has NOT run on a GPU here
(scripts/gpu_check.sh is the check to run where one is).
"""
from __future__ import annotations

import contextlib
import threading

from ..contract import MODELS
from ..errors import BackendError, BundleError
from .base import Backend, HostLatentSampler, LatentSampler, batch_slices
from . import cuda

MAX_GRAPHS = 16  # distinct (model, batch) shapes captured; a serving loop uses one or two


def _torch():
    try:
        import torch
    except ImportError as err:
        raise BackendError("the torch backend needs PyTorch: expected `pip install 'vce-deploy[torch]'` (for the CPU "
                           "build, not the multi-GB CUDA one: add `--extra-index-url "
                           "https://download.pytorch.org/whl/cpu`)") from err
    return torch


class TorchLatentSampler(LatentSampler):
    """Standard-normal latents from torch's generator on a CUDA device (when CuPy is absent)."""

    def __init__(self, torch, seed: int | None, device: str):
        self.torch, self.device = torch, device
        self._generator = torch.Generator(device=device)
        if seed is None:
            self._generator.seed()
        else:
            self._generator.manual_seed(seed)

    def draw(self, count: int, latent_dim: int, temperature: float):
        eps = self.torch.randn((count, latent_dim), generator=self._generator, device=self.device)  # (count, D)
        return eps if temperature == 1.0 else eps * temperature


class GraphRunner:
    """One model at one batch size, captured as a CUDA graph over static tensors."""

    def __init__(self, torch, forward, example: dict):
        self.lock = threading.Lock()
        self.torch = torch
        self.stream = torch.cuda.Stream()  # every replay of this graph runs here, one at a time
        self.inputs = {name: tensor.clone() for name, tensor in example.items()}
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side), torch.inference_mode():
            for _ in range(2):  # warm-up outside the capture: cuDNN picks its algorithms here
                forward(**self.inputs)
        torch.cuda.current_stream().wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        # thread_local: other threads may keep running eager kernels while this one captures
        with torch.inference_mode(), torch.cuda.graph(self.graph, capture_error_mode="thread_local"):
            self.outputs = forward(**self.inputs)

    def __call__(self, inputs: dict) -> dict:
        """Replay on this runner's own stream, ordered after the caller's stream (its inputs are
        written) and before it again (the outputs are read there): a caller on a non-default
        stream can never overwrite the static inputs while an earlier replay still reads them."""
        torch = self.torch
        with self.lock:
            caller = torch.cuda.current_stream()
            self.stream.wait_stream(caller)
            with torch.cuda.stream(self.stream):
                for name, tensor in inputs.items():
                    self.inputs[name].copy_(tensor, non_blocking=True)
                    tensor.record_stream(self.stream)  # the caller may free it while the copy runs
                self.graph.replay()  # launched on the current stream: this runner's
                outputs = {name: out.clone() for name, out in self.outputs.items()}  # the statics are reused next call
            caller.wait_stream(self.stream)
            for out in outputs.values():
                out.record_stream(caller)  # allocated on this runner's stream, used on the caller's
            return outputs


def strict_fp32(torch) -> None:
    """fp32 that is fp32 on CUDA: PyTorch runs cuDNN convolutions in TF32 by default (10-bit
    mantissas: about 2e-3 off the goldens, bound 1e-4). Process-wide, as PyTorch's flags are."""
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    torch.set_float32_matmul_precision("highest")


class TorchBackend(Backend):
    name = "torch"
    precisions = ("fp32",)

    @classmethod
    def resolve_device(cls, device):
        """cuda:0 where a GPU is visible and this PyTorch has CUDA; torch is imported only then."""
        if device is not None:
            return device
        if not cuda.gpu_visible():
            return "cpu"
        try:
            return "cuda:0" if _torch().cuda.is_available() else "cpu"
        except BackendError:
            return "cpu"

    @classmethod
    def unavailable(cls, bundle, precision, device):
        if precision != "fp32":
            return BackendError(f"the torch backend runs the checkpoint at fp32 only, got precision {precision!r}")
        if bundle.checkpoint is None:
            return BackendError(f"{bundle.path} has no checkpoint.safetensors for the torch backend to run "
                                "(export the bundle with its checkpoint)")
        try:
            torch = _torch()
        except BackendError as err:
            return err
        if device is not None and device.startswith("cuda") and not torch.cuda.is_available():
            return BackendError(f"device {device!r} requested, but this PyTorch sees no CUDA GPU")
        return None

    def __init__(self, bundle, precision, device, threads, cuda_graphs: bool = True):
        super().__init__(bundle, precision, device, threads)
        problem = self.unavailable(bundle, precision, device)
        if problem is not None:
            raise problem
        torch = _torch()
        from ..checkpoint import load_model

        if threads:
            torch.set_num_threads(threads)  # process-wide in PyTorch: there is no per-model setting
        entry = bundle.entries("checkpoint", "safetensors")[0]
        sidecar = bundle.entries("checkpoint-meta", "json")
        model, meta = load_model(bundle.checkpoint, data=bundle.read_verified(entry),  # the bytes that were hashed
                                 meta_data=bundle.read_verified(sidecar[0]) if sidecar else None)
        config = model.config
        if (config.image_size, config.latent_dim) != (self.image_size, self.latent_dim):
            raise BundleError(f"{bundle.checkpoint}: checkpoint has image_size {config.image_size}, latent_dim "
                              f"{config.latent_dim}; the manifest says {self.image_size}, {self.latent_dim}")
        self._use(torch, model.to(device), torch.contiguous_format, f"checkpoint step {meta.get('step')}",
                  cuda_graphs)

    @classmethod
    def from_module(cls, model, channels_last: bool | None = None) -> "TorchBackend":
        """A VCE module in memory, on whatever device its weights are, switched to eval mode
        (the caller restores train mode). channels_last: run in that memory format (the
        module's 4-D weights are put in it, in place: a no-op when they already are, as for a
        model being trained in it); None follows the weights as they are. Eager, no CUDA
        graphs: a graph holds the addresses of the weights, which a training loop may move."""
        torch = _torch()
        stem = next(p for p in model.parameters() if p.dim() == 4)
        if channels_last is None:
            channels_last = stem.is_contiguous(memory_format=torch.channels_last) and not stem.is_contiguous()
        layout = torch.channels_last if channels_last else torch.contiguous_format
        model.to(memory_format=layout)
        backend = cls.__new__(cls)
        Backend.__init__(backend, None, "fp32", str(stem.device), None)
        backend.image_size, backend.latent_dim = model.config.image_size, model.config.latent_dim
        backend._use(torch, model, layout, "a module in memory", cuda_graphs=False)
        return backend

    def _use(self, torch, model, memory_format, source: str, cuda_graphs: bool) -> None:
        self._torch = torch
        self._model = model.eval()
        self._memory_format = memory_format
        self._source = source
        self.on_gpu = self.device.startswith("cuda")
        if self.on_gpu:
            strict_fp32(torch)  # the reference must match CPU fp32 (bench/gpu_check.py parity)
        self.device_id = cuda.device_index(self.device) if self.on_gpu else 0
        self._use_graphs = self.on_gpu and cuda_graphs
        self._graphs: dict[tuple[str, int], GraphRunner] = {}
        self._capture_lock = threading.Lock()
        self._cupy = cuda.cupy_or_none() if self.on_gpu else None

    def _tensor(self, array):
        tensor = self._torch.from_numpy(array).to(self.device, non_blocking=True)
        return tensor.contiguous(memory_format=self._memory_format) if tensor.dim() == 4 else tensor

    # -- one batch on the device -------------------------------------------------------------

    def _forward(self, model: str):
        if model == "encoder":
            return lambda x, q: dict(zip(("mu", "logvar"), self._model.encoder(x, q)))
        if model == "convertor":
            return lambda z, q: {"y": self._model.convertor(z, q)}
        raise BackendError(f"expected model in {MODELS}, got {model!r}")

    def _run_tensors(self, model: str, tensors: dict) -> dict:
        """Device tensors in, device tensors out: a replayed CUDA graph when one fits."""
        forward = self._forward(model)
        if not self._use_graphs:
            with self._torch.inference_mode():
                return forward(**tensors)
        key = (model, next(iter(tensors.values())).shape[0])
        runner = self._graphs.get(key)
        if runner is None:
            with self._capture_lock:
                runner = self._graphs.get(key)
                if runner is None and len(self._graphs) < MAX_GRAPHS:
                    runner = self._graphs[key] = GraphRunner(self._torch, forward, tensors)
        if runner is None:
            with self._torch.inference_mode():
                return forward(**tensors)
        return runner(tensors)

    def run(self, model, inputs):
        if model not in MODELS:
            raise BackendError(f"expected model in {MODELS}, got {model!r}")
        with self._torch.cuda.device(self.device_id) if self.on_gpu else contextlib.nullcontext():
            tensors = {name: self._tensor(array) for name, array in inputs.items()}
            return {name: _host(out) for name, out in self._run_tensors(model, tensors).items()}

    # -- GPU: noise, conditions and outputs stay on the device ------------------------------

    def latent_sampler(self, seed):
        if not self.on_gpu:
            return HostLatentSampler(seed)
        if self._cupy is not None:
            return cuda.DeviceLatentSampler(seed, self.device_id)
        return TorchLatentSampler(self._torch, seed, self.device)

    def convert(self, conditions, samples_per_condition, sampler, temperature, max_batch):
        if not self.on_gpu:
            return super().convert(conditions, samples_per_condition, sampler, temperature, max_batch)
        torch = self._torch
        total = conditions.shape[0] * samples_per_condition
        with torch.cuda.device(self.device_id):
            latents = sampler.draw(total, self.latent_dim, temperature)  # (B * n, D) on the device
            if not isinstance(latents, torch.Tensor):
                latents = torch.from_dlpack(latents)  # CuPy -> torch, no copy (DLPack orders the streams)
            device_conditions = self._tensor(conditions)  # the B conditions cross once
            out = torch.empty((total, 1, self.image_size, self.image_size), device=self.device)
            for start, stop in batch_slices(total, max_batch):
                rows = torch.arange(start, stop, device=self.device) // samples_per_condition
                q = device_conditions[rows].contiguous(memory_format=self._memory_format)
                chunk = {"z": latents[start:stop].contiguous(), "q": q}
                out[start:stop] = self._run_tensors("convertor", chunk)["y"]
            return _host(out)  # the one copy back, and the one wait

    def describe(self) -> str:
        layout = "channels_last" if self._memory_format == self._torch.channels_last else "contiguous"
        if not self.on_gpu:
            return (f"eager torch {self._torch.__version__} on {self.device}, {self._source}, {layout}, "
                    f"{self._torch.get_num_threads()} threads, noise drawn on the host")
        noise = "CuPy" if self._cupy is not None else "torch.cuda"
        graphs = f"CUDA graphs per batch size (up to {MAX_GRAPHS})" if self._use_graphs else "eager"
        return (f"torch {self._torch.__version__} on {self._torch.cuda.get_device_name(self.device_id)}, "
                f"{graphs}, {self._source}, {layout}, noise drawn on the device ({noise})")


def _host(tensor):
    """float32, C-contiguous, on the host: what every backend returns."""
    return tensor.float().contiguous().cpu().numpy()
