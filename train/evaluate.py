"""One-shot NLL on the test alphabets (DESIGN.md "Evaluation", the paper's Table 1).

-log p(x | q) is estimated by importance sampling with K samples from q(z | x, q):

    log p(x | q) ~ logmeanexp_k [ log p(x | z_k, q) + log N(z_k; 0, I) - log q(z_k | x, q) ]

in nats. The model is anything with two numpy methods, so the same estimator judges the
PyTorch model (`TorchModel`) and every exported bundle precision (`vce_deploy.Converter`):

    run_encoder(x, q) -> (mu, logvar)    x, q float32 (B, 1, 28, 28) -> (B, D), (B, D)
    run_convertor(z, q) -> y             z (B, D), q (B, 1, 28, 28) -> Bernoulli means (B, 1, 28, 28)

CLI: python -m train.evaluate CHECKPOINT_OR_BUNDLE --k 1000 [--all-drawings] [--json FILE]
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
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
    Targets are character-major (vce_deploy.omniglot.nll_targets); a partial last character counts."""
    values = np.asarray(per_target, dtype=np.float64)
    groups = [values[i:i + targets_per_character].mean() for i in range(0, len(values), targets_per_character)]
    return float(np.std(groups, ddof=1) / math.sqrt(len(groups))) if len(groups) > 1 else 0.0


class TorchModel:
    """A PyTorch VCE behind the evaluator's numpy interface: eval mode, no autograd."""

    def __init__(self, vce, channels_last: bool = True):
        import torch

        self.torch = torch
        # channels_last: the same convs, measured 1.7x faster on CPU at large batch (DESIGN.md)
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        self.vce = vce.eval().to(memory_format=self.memory_format)
        self.device = next(vce.parameters()).device

    @classmethod
    def from_checkpoint(cls, path, **kwargs) -> "TorchModel":
        from vce_deploy.checkpoint import load_model

        vce, _ = load_model(path)
        return cls(vce, **kwargs)

    def _image(self, a: np.ndarray):
        return self.torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32)).to(
            self.device, memory_format=self.memory_format)

    def run_encoder(self, x: np.ndarray, q: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        with self.torch.inference_mode():
            mu, logvar = self.vce.encoder(self._image(x), self._image(q))
        return mu.float().cpu().numpy(), logvar.float().cpu().numpy()

    def run_convertor(self, z: np.ndarray, q: np.ndarray) -> np.ndarray:
        with self.torch.inference_mode():
            z = self.torch.from_numpy(np.ascontiguousarray(z, dtype=np.float32)).to(self.device)
            y = self.vce.convertor(z, self._image(q))
        return y.float().contiguous().cpu().numpy()


def load_evaluable(source, backend: str | None = None, precision: str | None = None):
    """A .safetensors checkpoint -> TorchModel; a bundle directory -> vce_deploy.Converter.
    Returns (model, description)."""
    source = Path(source)
    if source.is_dir():
        try:
            from vce_deploy import Converter  # the runtime; imported only when a bundle is asked for
        except ImportError as err:
            raise ValueError(f"{source}: a bundle needs vce_deploy.Converter, which this install lacks ({err})") from err
        kwargs = {k: v for k, v in (("backend", backend), ("precision", precision)) if v is not None}
        return Converter.load(source, **kwargs), f"bundle {source} ({', '.join(f'{k}={v}' for k, v in kwargs.items()) or 'defaults'})"
    if source.name.endswith(".safetensors"):
        if backend not in (None, "torch") or precision not in (None, "fp32"):
            raise ValueError(f"{source}: a checkpoint runs in PyTorch fp32; --backend/--precision need a bundle directory")
        return TorchModel.from_checkpoint(source), f"checkpoint {source} (PyTorch fp32)"
    raise ValueError(f"{source}: expected a .safetensors checkpoint or a bundle directory")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m train.evaluate",
                                     description="One-shot NLL (nats) on the test alphabets, by importance sampling.")
    parser.add_argument("source", help="checkpoint .safetensors, or bundle directory")
    parser.add_argument("--k", type=int, nargs="+", default=[1000],
                        help="importance samples per target (1000 for a reported figure); several values = a K sweep "
                             "on the same targets, to show the estimate has converged")
    parser.add_argument("--all-drawings", action="store_true", help="all 20 drawings of every character as targets, not drawings 0 and 10")
    parser.add_argument("--precision", default=None, help="bundle precision: fp32, fp16, int8")
    parser.add_argument("--backend", default=None, help="bundle backend, e.g. onnxruntime")
    parser.add_argument("--limit", type=int, default=None, help="only the first N targets (quick checks)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch-size", type=int, default=1000, help="convertor batch")
    parser.add_argument("--data-dir", default=None, help="folder with the Omniglot zips")
    parser.add_argument("--split", default="paper", help="paper (20 novel alphabets) or small (3)")
    parser.add_argument("--part", default="test", help="test (for reporting) or validation (for choosing)")
    parser.add_argument("--json", default=None, help="also write the result here")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)

    from vce_deploy.errors import VCEError

    from vce_deploy.omniglot import load_split, nll_targets, targets_per_character

    try:
        model, description = load_evaluable(args.source, args.backend, args.precision)
        test = load_split(args.split, args.part, args.data_dir)
    except (VCEError, ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    x, q = nll_targets(test, all_drawings=args.all_drawings)
    if args.limit is not None:
        x, q = x[:args.limit], q[:args.limit]
    per_character = targets_per_character(args.all_drawings)
    records = []
    for k in args.k:
        t0 = time.perf_counter()
        result = one_shot_nll(model, x, q, k=k, seed=args.seed, batch_size=args.batch_size,
                              progress=not args.no_progress)
        seconds = time.perf_counter() - t0
        result["nll_sem_characters"] = sem_over_characters(result["nll_per_target"], per_character)
        print(f"{description}")
        print(f"NLL   {result['nll_mean']:.2f} ± {result['nll_sem_characters']:.2f} nats (SE over characters; "
              f"± {result['nll_sem']:.2f} over targets)  (K={k}, {result['targets']} targets of the {args.split} "
              f"split's {args.part} part, seed {result['seed']}, {seconds:.0f} s)")
        print(f"-ELBO {result['elbo_mean']:.2f} ± {result['elbo_sem']:.2f} nats")
        records.append(dict(result, source=str(args.source), model=description, seconds=seconds, split=args.split,
                            part=args.part, all_drawings=args.all_drawings, limit=args.limit))
    if len(records) > 1:  # paired over the same targets and noise seeds
        base = np.asarray(records[0]["nll_per_target"])
        for record in records[1:]:
            diff = np.asarray(record["nll_per_target"]) - base
            print(f"K={record['k']} - K={records[0]['k']}: {diff.mean():+.3f} ± {diff.std(ddof=1) / math.sqrt(len(diff)):.3f}"
                  f" nats (paired, {len(diff)} targets)")
    if args.json:
        from vce_deploy.fsio import atomic_write_bytes

        body = records[0] if len(records) == 1 else {"k_sweep": records}
        atomic_write_bytes(args.json, (json.dumps(body, indent=2) + "\n").encode())
    return 0


if __name__ == "__main__":
    sys.exit(main())
