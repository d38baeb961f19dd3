"""One whole VAE-stage training step (forward, backward, both Adam steps) as one function that
torch.compile can take whole (issues 21 item 3 and 25): on the CPU in the default mode, on CUDA
in mode="reduce-overhead" (CUDA graphs) with capturable Adam, whose lr and step counters live on
the device. The graphs read their inputs from static buffers that every call `copy_`s into, so a
replay sees this step's episode and noise. The eager path (train.train.apply_gradients) stays the
reference: tests/test_compiled_step.py checks the two agree. CUDA path: not run here (no GPU lent).
"""
from __future__ import annotations

import torch

from vce_deploy.model import VCE

from .losses import vae_loss

TERMS = ("kl", "con", "loss")  # what vae_loss logs, in the order of the step's one output tensor


def options(device: torch.device) -> dict:
    """How to compile and which Adam, per device: CUDA graphs need Adam's lr and step on the
    device (capturable) and the graphs' inputs at fixed addresses; the CPU has no graphs."""
    if device.type == "cuda":
        return {"mode": "reduce-overhead", "capturable": True}
    return {"mode": "default", "capturable": False}


def make_capturable(optimizer: torch.optim.Optimizer, device: torch.device) -> None:
    """Turn an existing Adam into a capturable one in place (its state and checkpoint format kept):
    lr as a 0-d tensor on the device (set by `fill_`, so a new rate is no recompile and no new
    graph), and on CUDA `capturable`, which keeps each step counter on the device too."""
    capturable = options(device)["capturable"]
    for group in optimizer.param_groups:
        group["lr"] = torch.tensor(float(group["lr"]), device=device)
        if capturable:
            group["capturable"] = True
            group["fused"] = None  # fused and capturable are not combined: compile fuses the update
    if capturable:
        for state in optimizer.state.values():
            if "step" in state:
                state["step"] = torch.as_tensor(state["step"], dtype=torch.float32, device=device)


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """The learning rate of every group: filled into the device tensor of a capturable Adam (a
    graph replays with the new rate), else set as the float it is."""
    for group in optimizer.param_groups:
        if isinstance(group["lr"], torch.Tensor):
            group["lr"].fill_(lr)
        else:
            group["lr"] = lr


class WholeStep:
    """The VAE stage's step, compiled once for one batch shape and replayed every call.

    step(x, q, noise, lr) -> the logged terms (kl, con, loss) as one float32 tensor (3,), a copy
    that the next replay does not overwrite. noise: eps of the reparameterisation, (batch, latent)."""

    def __init__(self, model: VCE, opt_enc: torch.optim.Optimizer, opt_con: torch.optim.Optimizer,
                 batch: int, device: torch.device, memory_format=torch.contiguous_format,
                 autocast: bool = False, compile: bool = True, backend: str = "inductor"):
        self.model, self.opt_enc, self.opt_con, self.device = model, opt_enc, opt_con, device
        self.autocast = autocast
        for opt in (opt_enc, opt_con):
            make_capturable(opt, device)
        size = model.config.image_size
        self.x = torch.zeros(batch, 1, size, size, device=device).contiguous(memory_format=memory_format)
        self.q = torch.zeros_like(self.x)
        self.noise = torch.zeros(batch, model.config.latent_dim, device=device)
        self._step = self._eager
        if compile:
            self._step = torch.compile(self._eager, mode=options(device)["mode"], backend=backend)

    def _eager(self) -> torch.Tensor:
        """The step itself: apply_gradients' VAE branch (one objective, one backward pass)."""
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.autocast):
            loss = vae_loss(self.model, self.x, self.q, noise=self.noise)
        self.opt_enc.zero_grad(set_to_none=True)
        self.opt_con.zero_grad(set_to_none=True)
        loss.encoder.backward()
        self.opt_enc.step()
        self.opt_con.step()
        return torch.stack([loss.terms[name] for name in TERMS])

    def __call__(self, x: torch.Tensor, q: torch.Tensor, noise: torch.Tensor, lr: float) -> torch.Tensor:
        if x.shape != self.x.shape:
            raise ValueError(f"WholeStep was built for a batch of shape {tuple(self.x.shape)}, got {tuple(x.shape)}")
        for opt in (self.opt_enc, self.opt_con):
            set_lr(opt, lr)
        self.x.copy_(x)
        self.q.copy_(q)
        self.noise.copy_(noise)
        return self._step().clone()

    def terms(self, values: torch.Tensor) -> dict[str, torch.Tensor]:
        """The step's output as vae_loss's terms dict (0-d device tensors: device_step.read_terms)."""
        return dict(zip(TERMS, values.unbind()))


def draw_noise(batch: int, latent_dim: int, generator: torch.Generator, device: torch.device) -> torch.Tensor:
    """The eps the eager step's reparameterize would draw from `generator` (fp32 runs: the same bits)."""
    return torch.randn((batch, latent_dim), generator=generator, dtype=torch.float32, device=device)
