"""Eager PyTorch on the bundle's checkpoint: the reference every exported graph is judged by.

torch is imported here, on construction, and nowhere else in the runtime.
"""
from __future__ import annotations

from ..errors import BackendError, BundleError
from .base import MODELS, Backend


def _torch():
    try:
        import torch
    except ImportError as err:
        raise BackendError("the torch backend needs PyTorch: expected `pip install 'vce-deploy[torch]'`") from err
    return torch


class TorchBackend(Backend):
    name = "torch"
    precisions = ("fp32",)

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

        self._torch = torch
        if threads:
            torch.set_num_threads(threads)  # process-wide in PyTorch: there is no per-model setting
        entry = bundle.entries("checkpoint", "safetensors")[0]
        model, meta = load_model(bundle.checkpoint, data=bundle.read_verified(entry))  # the bytes that were hashed
        config = model.config
        if (config.image_size, config.latent_dim) != (self.image_size, self.latent_dim):
            raise BundleError(f"{bundle.checkpoint}: checkpoint has image_size {config.image_size}, latent_dim "
                              f"{config.latent_dim}; the manifest says {self.image_size}, {self.latent_dim}")
        self._model = model.to(device)
        self._step = meta.get("step")

    def run(self, model, inputs):
        torch = self._torch
        with torch.inference_mode():
            tensors = {name: torch.from_numpy(array).to(self.device) for name, array in inputs.items()}
            if model == "encoder":
                mu, logvar = self._model.encoder(tensors["x"], tensors["q"])
                return {"mu": mu.cpu().numpy(), "logvar": logvar.cpu().numpy()}
            if model == "convertor":
                return {"y": self._model.convertor(tensors["z"], tensors["q"]).cpu().numpy()}
        raise BackendError(f"expected model in {MODELS}, got {model!r}")

    def describe(self) -> str:
        return (f"eager torch {self._torch.__version__} on {self.device}, checkpoint step {self._step}, "
                f"{self._torch.get_num_threads()} threads, noise drawn on the host")
