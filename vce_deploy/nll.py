"""One-shot NLL by importance sampling (docs/design.md "Evaluation protocol", the paper's Table 1).

-log p(x | q) is estimated with K samples from q(z | x, q):

    log p(x | q) ~ logmeanexp_k [ log p(x | z_k, q) + log N(z_k; 0, I) - log q(z_k | x, q) ]

in nats. The model is a `Converter`, so one estimator judges every side: a bundle at any
precision on any backend, a checkpoint on the torch backend, and the model being trained
(`Converter.from_torch`). It needs only the converter's two raw-array methods:

    run_encoder(x, q) -> (mu, logvar)    x, q float32 (B, 1, 28, 28) -> (B, D), (B, D)
    run_convertor(z, q) -> y             z (B, D), q (B, 1, 28, 28) -> Bernoulli means (B, 1, 28, 28)

numpy only; training, export, bench and `python -m train.evaluate` all call it.
"""
from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np

# y is clamped to [PROB_CLAMP, 1 - PROB_CLAMP] before the log: a saturated float32 sigmoid
# (y == 0 or 1 exactly) would otherwise make one wrong pixel cost infinite nats.
PROB_CLAMP = 1e-7
LOG_2PI = math.log(2.0 * math.pi)


def _log_bernoulli(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """sum_i x_i log y_i + (1 - x_i) log(1 - y_i) over each row, float64. x (R, M), y (R, M)."""
    y = np.clip(y.astype(np.float64), PROB_CLAMP, 1.0 - PROB_CLAMP)
    x = x.astype(np.float64)
    return (x * np.log(y) + (1.0 - x) * np.log1p(-y)).sum(axis=1)


def _logmeanexp(a: np.ndarray, axis: int) -> np.ndarray:
    """log mean exp along `axis`, shifted by the max so no term overflows."""
    peak = a.max(axis=axis, keepdims=True)
    return (peak + np.log(np.exp(a - peak).mean(axis=axis, keepdims=True))).squeeze(axis)


def _check_pair(x: np.ndarray, q: np.ndarray) -> None:
    for name, a in (("x", x), ("q", q)):
        if a.ndim != 4 or a.shape[1] != 1:
            raise ValueError(f"one_shot_nll: expected {name} of shape (N, 1, H, W), got {a.shape}")
    if x.shape != q.shape:
        raise ValueError(f"one_shot_nll: expected x and q of the same shape, got {x.shape} and {q.shape}")
    if len(x) == 0:
        raise ValueError("one_shot_nll: expected at least one target, got none")


def one_shot_nll(model, x: np.ndarray, q: np.ndarray, k: int = 1000, seed: int = 0,
                 batch_size: int = 1000, progress: bool = False) -> dict:
    """Importance-sampled -log p(x | q) per target, in nats; mean and standard error.

    Returns a dict:
      nll_mean, nll_sem   mean of -log p(x_n | q_n) over targets and its standard error
                          (sample std with ddof=1 over sqrt(N); 0 for one target)
      elbo_mean, elbo_sem the NEGATIVE ELBO in nats, positive like the NLL:
                          -mean_k [log p(x|z_k,q) + log N(z_k;0,I) - log q(z_k|x,q)] on the same
                          samples, so never below the NLL estimate (Jensen, target by target)
      k, targets, seed    what was run
      nll_per_target      list of N floats, for paired comparisons (e.g. fp32 against int8 with one seed)

    The noise of target n (its position in x) comes from numpy's default_rng([seed, n]): the
    estimates do not depend on batch_size, and the first N targets (--limit N) get the same
    numbers as in the full run. log p(x|z,q) clamps y to [1e-7, 1 - 1e-7] and, like every
    density here, is computed in float64; the model runs in its own precision (float32 in
    and out).
    """
    x = np.ascontiguousarray(x, dtype=np.float32)
    q = np.ascontiguousarray(q, dtype=np.float32)
    _check_pair(x, q)
    if k < 1:
        raise ValueError(f"one_shot_nll: expected k >= 1, got {k}")
    n = len(x)
    group = max(1, batch_size // k)  # targets whose K samples go through the convertor together
    log_px = np.empty(n, np.float64)
    elbo = np.empty(n, np.float64)
    starts = range(0, n, group)
    if progress:
        from tqdm import tqdm
        starts = tqdm(starts, desc=f"nll K={k}", unit="group", dynamic_ncols=True)
    for start in starts:
        stop = min(start + group, n)
        xs, qs = x[start:stop], q[start:stop]
        mu, logvar = (np.asarray(a, dtype=np.float64) for a in model.run_encoder(xs, qs))  # (G, D)
        g, d = mu.shape
        eps = np.stack([np.random.default_rng([seed, i]).standard_normal((k, d)) for i in range(start, stop)])
        std = np.exp(0.5 * logvar)[:, None, :]
        z32 = (mu[:, None, :] + std * eps).astype(np.float32)  # (G, K, D): what the convertor sees
        z = z32.astype(np.float64)  # densities of the z actually used, not of its float64 ancestor
        log_prior = -0.5 * (z * z + LOG_2PI).sum(axis=2)  # (G, K)
        log_q = -0.5 * (((z - mu[:, None, :]) / std) ** 2 + logvar[:, None, :] + LOG_2PI).sum(axis=2)
        q_rep = np.repeat(qs, k, axis=0)  # (G*K, 1, H, W), target-major like z
        x_rep = np.repeat(xs.reshape(g, -1), k, axis=0)  # (G*K, M)
        z_flat = z32.reshape(g * k, d)
        log_lik = np.empty(g * k, np.float64)
        for lo in range(0, g * k, batch_size):
            hi = min(lo + batch_size, g * k)
            y = np.asarray(model.run_convertor(z_flat[lo:hi], q_rep[lo:hi]))
            if y.shape != (hi - lo, *xs.shape[1:]):
                raise ValueError(f"run_convertor: expected y of shape {(hi - lo, *xs.shape[1:])}, got {y.shape}")
            log_lik[lo:hi] = _log_bernoulli(x_rep[lo:hi], y.reshape(hi - lo, -1))
        log_w = log_lik.reshape(g, k) + log_prior - log_q  # (G, K) log importance weights
        log_px[start:stop] = _logmeanexp(log_w, axis=1)
        elbo[start:stop] = log_w.mean(axis=1)
    nll, neg_elbo = -log_px, -elbo

    def sem(a: np.ndarray) -> float:
        return float(a.std(ddof=1) / math.sqrt(n)) if n > 1 else 0.0

    return {"nll_mean": float(nll.mean()), "nll_sem": sem(nll),
            "elbo_mean": float(neg_elbo.mean()), "elbo_sem": sem(neg_elbo),
            "k": int(k), "targets": int(n), "seed": int(seed), "nll_per_target": nll.tolist()}


def sem_over_characters(per_target, targets_per_character: int) -> float:
    """Standard error of the mean NLL with characters as the unit: a character's targets share
    its condition drawings and are correlated, so the per-target SE understates the spread.
    Targets are character-major (omniglot.nll_targets); a partial last character counts."""
    values = np.asarray(per_target, dtype=np.float64)
    groups = [values[i:i + targets_per_character].mean() for i in range(0, len(values), targets_per_character)]
    return float(np.std(groups, ddof=1) / math.sqrt(len(groups))) if len(groups) > 1 else 0.0


def load_targets(split: str, part: str, data_dir: str | os.PathLike | None = None, all_drawings: bool = False,
                 limit: int | None = None, every: int = 1, validation_alphabets: tuple[str, ...] | None = None):
    """The protocol's (x, q) pairs of one Omniglot split part: of every `every`-th character
    (characters are sorted by alphabet, so a subset still spans every alphabet), the first
    `limit` of them. validation_alphabets: as vce_deploy.omniglot.load_split's (None: the
    split's own). Returns (the whole Split, x, q)."""
    from .omniglot import Split, load_split, nll_targets

    if every < 1:
        raise ValueError(f"every: expected a positive number of characters, got {every}")
    images = load_split(split, part, data_dir, validation_alphabets=validation_alphabets)
    x, q = nll_targets(Split(images.images[::every], images.names[::every]), all_drawings=all_drawings)
    return images, x[:limit], q[:limit]


def load_evaluable(source: str | os.PathLike, backend: str | None = None, precision: str | None = None,
                   threads: int | None = None):
    """A bundle directory -> Converter.load (any backend and precision); a .safetensors
    checkpoint -> the torch backend on it (fp32, channels_last). threads: intra-op threads
    (default: the runtime's, physical cores). Returns (converter, description)."""
    from .converter import Converter

    source = Path(source)
    if source.is_dir():
        given = (("backend", backend), ("precision", precision), ("threads", threads))
        kwargs = {k: v for k, v in given if v is not None}
        described = ", ".join(f"{k}={v}" for k, v in kwargs.items()) or "defaults"
        return Converter.load(source, **kwargs), f"bundle {source} ({described})"
    if source.name.endswith(".safetensors"):
        if backend not in (None, "torch") or precision not in (None, "fp32"):
            raise ValueError(f"{source}: a checkpoint runs in PyTorch fp32; --backend/--precision need a bundle directory")
        from .checkpoint import load_model

        model, _ = load_model(source)
        if threads is not None:
            import torch

            torch.set_num_threads(threads)
        # channels_last: eager PyTorch ran the convertor 1.24x faster so at batch 64 (docs/measurements/bench_quiet.md)
        return Converter.from_torch(model, channels_last=True), f"checkpoint {source} (PyTorch fp32)"
    raise ValueError(f"{source}: expected a .safetensors checkpoint or a bundle directory")
