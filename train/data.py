"""Training episodes (docs/design.md, "Training"); the images come from vce_deploy.omniglot."""
from __future__ import annotations

import numpy as np

from vce_deploy.omniglot import DRAWINGS_PER_CHARACTER, Split


def episode_indices(characters: int, count: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """The random draws of `count` episodes, in the order every seeded run has made them: the
    characters, then one permutation of the drawings per character (order[0] is the condition).
    -> (chars (count,), orders (count, DRAWINGS_PER_CHARACTER))."""
    chars = rng.choice(characters, size=count, replace=count > characters)
    orders = np.stack([rng.permutation(DRAWINGS_PER_CHARACTER) for _ in chars])
    return chars, orders


def sample_episodes(split: Split, count: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """`count` episodes: one character each, one drawing as condition q, the other 19 as
    targets x (paper section 3.3: every pair in a batch shares one condition).

    Returns x, q as float32 (count * 19, 1, 28, 28), episode-major.
    """
    chars, orders = episode_indices(len(split), count, rng)
    x = split.images[chars[:, None], orders[:, 1:]].reshape(-1, 1, *split.images.shape[2:])
    q = np.repeat(split.images[chars, orders[:, 0]], DRAWINGS_PER_CHARACTER - 1, axis=0)[:, None]
    return np.ascontiguousarray(x, dtype=np.float32), np.ascontiguousarray(q, dtype=np.float32)


class DeviceEpisodes:
    """The training images as one tensor on the training device, copied there once; episodes
    are gathered by index on the device (issue 25: no host-to-device copy of every batch).
    The same draws as sample_episodes (episode_indices), so the same values: a seeded run's
    episode stream does not depend on where its images live."""

    def __init__(self, split: Split, device, memory_format=None):
        import torch

        self.torch, self.memory_format = torch, memory_format or torch.contiguous_format
        self.images = torch.from_numpy(np.ascontiguousarray(split.images, dtype=np.float32)).to(device)

    def __len__(self) -> int:
        return len(self.images)

    def sample(self, count: int, rng: np.random.Generator):
        """-> x, q: float32 (count * 19, 1, 28, 28) tensors on the device, as sample_episodes."""
        torch = self.torch
        chars, orders = episode_indices(len(self), count, rng)
        # one small index copy (count * 20 integers) instead of the batch's pixels
        index = torch.from_numpy(np.concatenate([chars[:, None], orders], axis=1)).to(self.images.device)
        chars_t, orders_t = index[:, 0], index[:, 1:]
        x = self.images[chars_t[:, None], orders_t[:, 1:]].reshape(-1, 1, *self.images.shape[2:])
        q = self.images[chars_t, orders_t[:, 0]].repeat_interleave(DRAWINGS_PER_CHARACTER - 1, 0)[:, None]
        return (t.contiguous(memory_format=self.memory_format) for t in (x, q))


# Augmentations (train/config.py AUGMENTATIONS; docs/results.md has their ablation rows)

def rotated_classes(split: Split) -> Split:
    """Class augmentation: each character turned by 90, 180 and 270 degrees is a new character
    (4x the classes; standard in Omniglot few-shot work). Drawings stay {0, 1}."""
    turned = [np.rot90(split.images, k, axes=(2, 3)) for k in range(4)]
    names = [name for k in range(4) for name in
             (split.names if k == 0 else [(a, f"{c}@rot{90 * k}") for a, c in split.names])]
    return Split(np.ascontiguousarray(np.concatenate(turned)), names)


# per-drawing jitter: small enough that a drawing stays the same character (pixels of 28)
JITTER_SHIFT = 1.5  # pixels, each axis
JITTER_ROTATE = 8.0  # degrees
JITTER_SCALE = 0.08  # log-uniform factor in [1/1.08, 1.08], each axis
JITTER_SHEAR = 0.12  # radians


def jitter_drawings(images: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Per-drawing augmentation: an independent small random shift, rotation, scale and shear of
    each (N, 1, 28, 28) {0, 1} drawing, resampled bilinearly and binarised at 0.5 so the targets
    stay the Bernoulli data the model is scored on. Only the targets are jittered, never the
    condition: a user's condition is a real drawing, and the variations are what should vary."""
    import torch
    from torch.nn import functional as F

    n = len(images)
    angle = np.deg2rad(rng.uniform(-JITTER_ROTATE, JITTER_ROTATE, n))
    shear = rng.uniform(-JITTER_SHEAR, JITTER_SHEAR, n)
    scale = np.exp(rng.uniform(-np.log1p(JITTER_SCALE), np.log1p(JITTER_SCALE), (n, 2)))
    shift = rng.uniform(-JITTER_SHIFT, JITTER_SHIFT, (n, 2)) * 2 / 28  # grid units: [-1, 1] spans 28 px
    cos, sin = np.cos(angle), np.sin(angle)
    rotation = np.stack([np.stack([cos, -sin], -1), np.stack([sin, cos], -1)], -2)  # (n, 2, 2)
    shearing = np.zeros((n, 2, 2))
    shearing[:, 0, 0] = shearing[:, 1, 1] = 1
    shearing[:, 0, 1] = np.tan(shear)
    linear = rotation @ shearing @ (np.eye(2) * scale[:, None, :])
    theta = torch.from_numpy(np.concatenate([linear, shift[:, :, None]], axis=2).astype(np.float32))
    source = torch.from_numpy(np.ascontiguousarray(images, dtype=np.float32))
    grid = F.affine_grid(theta, list(source.shape), align_corners=False)
    warped = F.grid_sample(source, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    return (warped >= 0.5).to(torch.float32).numpy()
