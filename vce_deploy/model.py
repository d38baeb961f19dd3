"""The whole Variational Convertor-Encoder (paper section 4.2, docs/design.md "Model").

Imported by training, export and the eager reference backend only: `import vce_deploy`
never imports torch.

Shapes below use the defaults: image 28x28, latent D = 2 * H = 56 laid out as (H, 2),
so z[2r] and z[2r + 1] belong to image row r.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, fields

import torch
from torch import nn
from torch.nn import functional as F


@dataclass(frozen=True)
class ModelConfig:
    image_size: int = 28  # H = W
    channels: int = 32  # width of every trunk conv
    blocks: int = 8  # residual blocks in each trunk
    latent_per_row: int = 2  # "every two sampled noises are juxtaposed with one line"

    @property
    def latent_dim(self) -> int:
        return self.image_size * self.latent_per_row  # D = 56

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> "ModelConfig":
        known = {f.name for f in fields(cls)}
        unknown = set(values) - known
        if unknown:
            raise ValueError(f"unknown model config keys {sorted(unknown)}; expected {sorted(known)}")
        return cls(**values)


class ResidualBlock(nn.Module):
    """Two 3x3 SAME convs, stride 1, identity skip (He et al. 2016)."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return F.relu(h + self.conv2(F.relu(self.conv1(h))))


class Trunk(nn.Module):
    """3x3 conv in, residual blocks, 5x5 conv out: stride 1 everywhere, so every pixel keeps
    its coordinates end to end (paper section 3.3)."""

    def __init__(self, in_channels: int, out_channels: int, config: ModelConfig):
        super().__init__()
        self.stem = nn.Conv2d(in_channels, config.channels, 3, padding=1)
        self.blocks = nn.Sequential(*[ResidualBlock(config.channels) for _ in range(config.blocks)])
        self.head = nn.Conv2d(config.channels, out_channels, 5, padding=2)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.head(self.blocks(F.relu(self.stem(h))))


class Encoder(nn.Module):
    """Enc(x, q) -> (mu, logvar): the rules that turn the condition q into the target x."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.trunk = Trunk(2, 2 * config.latent_per_row, config)

    def forward(self, x: torch.Tensor, q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.trunk(torch.cat([x, q], dim=1))  # (B, 4, H, W)
        per_row = h.mean(dim=3).transpose(1, 2)  # (B, H, 4): (mu_0, mu_1, logvar_0, logvar_1)
        k = self.config.latent_per_row
        mu = per_row[:, :, :k].reshape(-1, self.config.latent_dim)  # (B, 56), z[2r + j] = row r
        logvar = per_row[:, :, k:].reshape(-1, self.config.latent_dim)  # (B, 56)
        return mu, logvar


class Convertor(nn.Module):
    """Con(z, q) -> Bernoulli means y of the converted glyph."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.trunk = Trunk(1 + config.latent_per_row, 1, config)

    def logits(self, z: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
        size, k = self.config.image_size, self.config.latent_per_row
        rows = z.reshape(-1, size, k).transpose(1, 2).unsqueeze(3)  # (B, 2, H, 1)
        planes = rows.expand(-1, -1, -1, size)  # (B, 2, H, W): row r's values along row r
        return self.trunk(torch.cat([q, planes], dim=1))  # (B, 1, H, W)

    def forward(self, z: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.logits(z, q))  # (B, 1, H, W)


class VCE(nn.Module):
    def __init__(self, config: ModelConfig = ModelConfig()):
        super().__init__()
        self.config = config
        self.encoder = Encoder(config)
        self.convertor = Convertor(config)


def reparameterize(mu: torch.Tensor, logvar: torch.Tensor, generator: torch.Generator | None = None,
                   noise: torch.Tensor | None = None) -> torch.Tensor:
    """z = mu + sigma * eps (paper section 3.1). `noise`: eps drawn beforehand (a captured
    training step reads it from a static buffer: train/compiled_step.py), else drawn here."""
    eps = torch.randn(mu.shape, generator=generator, dtype=mu.dtype, device=mu.device) if noise is None else noise.to(mu.dtype)
    return mu + torch.exp(0.5 * logvar) * eps
