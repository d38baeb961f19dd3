"""What keeps a CUDA training step from waiting on the host (issue 25), in one place:
loss terms stay on the device and are read once every `log_every` steps (one sync for all of
them, not one `.item()` per term per step), fused Adam (one kernel per parameter group, not
several per tensor), and cuDNN's autotuner for the fixed episode shapes. On the CPU every
choice here is PyTorch's default, so CPU runs are unchanged. Written to the documented
torch API; not run on a GPU here (no GPU was lent: docs/training.md)."""
from __future__ import annotations

import torch


def prepare(device: torch.device) -> None:
    """Fixed shapes every step: let cuDNN time its algorithms once and keep the fastest."""
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True


def adam(params, device: torch.device, **options) -> torch.optim.Adam:
    """torch.optim.Adam, fused on CUDA (the parameters must already be there)."""
    return torch.optim.Adam(params, fused=device.type == "cuda", **options)


def read_terms(terms: dict) -> dict[str, float]:
    """The loss terms (0-d device tensors) as floats, in one device-to-host copy."""
    if not terms:
        return {}
    values = torch.stack([torch.as_tensor(v, dtype=torch.float32).detach().reshape(()) for v in terms.values()])
    return dict(zip(terms, values.float().cpu().tolist()))


def mean(values: list) -> float:
    """The mean of a list of 0-d loss tensors (kept on the device step by step), read once."""
    return float(torch.stack([torch.as_tensor(v).detach().float().reshape(()) for v in values]).mean())
