"""Eager PyTorch: the reference every exported graph is judged by.

It runs the bundle's checkpoint (`Converter.load(..., backend="torch")`), or a VCE module
already in memory (`Converter.from_torch(model)`: training's validation and the exporter's
int8 calibration), without copying its weights. torch is imported here, on construction,
and nowhere else in the runtime.
"""
from __future__ import annotations

from ..contract import MODELS
from ..errors import BackendError, BundleError
from .base import Backend


def _torch():
    try:
        import torch
    except ImportError as err:
        raise BackendError("the torch backend needs PyTorch: expected `pip install 'vce-deploy[torch]'`") from err
    return torch


class TorchBackend(Backend):
    name = "torch"

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

    def __init__(self, bundle, precision, device, threads):
        super().__init__(bundle, precision, device, threads)
        problem = self.unavailable(bundle, precision, device)
        if problem is not None:
            raise problem
        torch = _torch()
        from ..checkpoint import load_model

        if threads:
            torch.set_num_threads(threads)  # process-wide in PyTorch: there is no per-model setting
        entry = bundle.entries("checkpoint", "safetensors")[0]
        model, meta = load_model(bundle.checkpoint, data=bundle.read_verified(entry))  # the bytes that were hashed
        config = model.config
        if (config.image_size, config.latent_dim) != (self.image_size, self.latent_dim):
            raise BundleError(f"{bundle.checkpoint}: checkpoint has image_size {config.image_size}, latent_dim "
                              f"{config.latent_dim}; the manifest says {self.image_size}, {self.latent_dim}")
        self._use(torch, model.to(device), torch.contiguous_format, f"checkpoint step {meta.get('step')}")

    @classmethod
    def from_module(cls, model, channels_last: bool | None = None) -> "TorchBackend":
        """A VCE module in memory, on whatever device its weights are, switched to eval mode
        (the caller restores train mode). channels_last: run in that memory format (the
        module's 4-D weights are put in it, in place: a no-op when they already are, as for a
        model being trained in it); None follows the weights as they are."""
        torch = _torch()
        stem = next(p for p in model.parameters() if p.dim() == 4)
        if channels_last is None:
            channels_last = stem.is_contiguous(memory_format=torch.channels_last) and not stem.is_contiguous()
        layout = torch.channels_last if channels_last else torch.contiguous_format
        model.to(memory_format=layout)
        backend = cls.__new__(cls)
        Backend.__init__(backend, None, "fp32", str(stem.device), None)
        backend.image_size, backend.latent_dim = model.config.image_size, model.config.latent_dim
        backend._use(torch, model, layout, "a module in memory")
        return backend

    def _use(self, torch, model, memory_format, source: str) -> None:
        self._torch = torch
        self._model = model.eval()
        self._memory_format = memory_format
        self._source = source

    def _tensor(self, array):
        tensor = self._torch.from_numpy(array).to(self.device)
        return tensor.contiguous(memory_format=self._memory_format) if tensor.dim() == 4 else tensor

    def run(self, model, inputs):
        if model not in MODELS:
            raise BackendError(f"expected model in {MODELS}, got {model!r}")
        with self._torch.inference_mode():
            tensors = {name: self._tensor(array) for name, array in inputs.items()}
            if model == "encoder":
                mu, logvar = self._model.encoder(tensors["x"], tensors["q"])
                return {"mu": _host(mu), "logvar": _host(logvar)}
            return {"y": _host(self._model.convertor(tensors["z"], tensors["q"]))}

    def describe(self) -> str:
        layout = "channels_last" if self._memory_format == self._torch.channels_last else "contiguous"
        return (f"eager torch {self._torch.__version__} on {self.device}, {self._source}, {layout}, "
                f"{self._torch.get_num_threads()} threads, noise drawn on the host")


def _host(tensor):
    """float32, C-contiguous, on the host: what every backend returns."""
    return tensor.float().contiguous().cpu().numpy()
