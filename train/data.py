"""Training episodes (docs/design.md, "Training"); the images come from vce_deploy.omniglot."""
from __future__ import annotations

import numpy as np

from vce_deploy.omniglot import DRAWINGS_PER_CHARACTER, Split


def sample_episodes(split: Split, count: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """`count` episodes: one character each, one drawing as condition q, the other 19 as
    targets x (paper section 3.3: every pair in a batch shares one condition).

    Returns x, q as float32 (count * 19, 1, 28, 28), episode-major.
    """
    chars = rng.choice(len(split), size=count, replace=count > len(split))
    xs, qs = [], []
    for c in chars:
        order = rng.permutation(DRAWINGS_PER_CHARACTER)
        q = split.images[c, order[0]]
        xs.append(split.images[c, order[1:]])
        qs.append(np.broadcast_to(q, xs[-1].shape))
    x = np.concatenate(xs)[:, None]
    q = np.concatenate(qs)[:, None]
    return np.ascontiguousarray(x), np.ascontiguousarray(q)
