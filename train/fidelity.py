"""python -m train.fidelity BUNDLE_OR_CHECKPOINT [--part test|validation] [--json F] [--grid F.png]

Sample fidelity judged from outside the model (issue 27): do the variations a user gets read
as their condition's character? The NLL (vce_deploy/nll.py) says how likely real drawings are;
this says what the prior's samples look like, and the two can part ways (a prior hole).

The judge: a small CNN trained on real drawings of every character of one data part (the test
alphabets by default), never on the conditions scored here (the NLL protocol's drawings 1 and
11, vce_deploy/omniglot.py nll_targets) nor on HELD_OUT_DRAWINGS (real redraws by other hands:
the ceiling). Its training augments pen width, broken strokes and small affine jitter, so a
thick or broken but right glyph still reads right. Its weights are cached as safetensors,
keyed by the data's hash, the preprocessing and the judge config (judge_key); an entry that
does not match, or does not load, is retrained, never reused.

Scored, per temperature and output form (the Bernoulli means as convert returns them,
thresholded at 0.5 as users keep them, a Bernoulli sample): top-1 of the variations against
the condition redrawn with jitter (the reference) and real redraws (the ceiling); diversity
(IoU with the condition, pairwise IoU within a set); blanks; a Frechet distance in the judge's
penultimate features. With the encoder: z taken apart (posterior mean and sample of another
real drawing, prior sample, z = 0, another character's posterior) and the prior hole (the
aggregated posterior against N(0, I)).
"""
from __future__ import annotations

import argparse
import hashlib
import io
import json
import math
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np

CONDITION_DRAWINGS = (1, 11)  # the NLL protocol's conditions (drawing i + 1 for targets i = 0, 10)
HELD_OUT_DRAWINGS = (5, 9, 15, 19)  # real redraws the judge never sees: the ceiling, the diversity reference
TEMPERATURES = (0.5, 0.7, 1.0)
FORMS = ("threshold", "mean", "sample")  # convert's means binarised at 0.5; the means; a Bernoulli sample
BLANK_INK = 3  # a thresholded variation with fewer ink pixels is a blank (the sparsest real test drawing has 3)
JUDGE_VERSION = 2  # bump when the judge's network, training or augmentation code changes: old caches miss
GRID_SCALE = 3


class FidelityError(ValueError):
    """Bad input to the fidelity score: what was expected and what came."""


@dataclass(frozen=True)
class JudgeConfig:
    channels: tuple[int, ...] = (32, 64, 128)  # one conv block + 2x2 max-pool each
    features: int = 256  # the penultimate layer
    steps: int = 2600  # about 3 minutes on one thread (188 s on a shared Xeon: 80% held out; 2000: 77%)
    batch: int = 64
    lr: float = 3e-3  # Adam, cosine-decayed to 0 over the steps
    seed: int = 0
    rotate_deg: float = 10.0  # affine jitter: rotation, log-scale, shear, shift
    scale: float = 0.1
    shear: float = 0.15
    shift_px: float = 2.0
    pen_prob: float = 0.5  # chance of a thicker or thinner pen
    gap_prob: float = 0.5  # chance of broken strokes: `gaps` squares of gap_px cut on the ink
    gaps: int = 3
    gap_px: int = 3


# -- augmentation (torch, batched) ---------------------------------------------------------------

def _affine(x, config: JudgeConfig, generator):
    import torch
    import torch.nn.functional as F

    b = x.shape[0]
    u = torch.rand(b, 5, generator=generator) * 2 - 1  # (B, 5) uniform in [-1, 1]
    angle = u[:, 0] * math.radians(config.rotate_deg)
    scale = torch.exp(u[:, 1] * config.scale)
    shear = u[:, 2] * config.shear
    shift = u[:, 3:] * (2 * config.shift_px / x.shape[-1])  # affine_grid works in [-1, 1] units
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    theta = torch.stack([torch.stack([cos, -sin + shear, shift[:, 0]], 1),
                         torch.stack([sin, cos, shift[:, 1]], 1)], 1)  # (B, 2, 3)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def _pen(x, prob: float, generator):
    """Thicker (3x3 or 2x2 dilation) or thinner (2x2 erosion, where it keeps half the ink) pens."""
    import torch
    import torch.nn.functional as F

    b = x.shape[0]
    thick3 = F.max_pool2d(x, 3, 1, 1)
    thick2 = F.max_pool2d(F.pad(x, (0, 1, 0, 1)), 2, 1)
    thin = -F.max_pool2d(F.pad(-x, (0, 1, 0, 1), value=-1.0), 2, 1)
    ink = x.sum((1, 2, 3), keepdim=True).clamp_min(1e-6)
    thin = torch.where(thin.sum((1, 2, 3), keepdim=True) >= 0.5 * ink, thin, x)
    choice = torch.randint(0, 3, (b, 1, 1, 1), generator=generator)
    changed = torch.where(choice == 0, thick3, torch.where(choice == 1, thick2, thin))
    apply = torch.rand(b, 1, 1, 1, generator=generator) < prob
    return torch.where(apply, changed, x)


def _gaps(x, config: JudgeConfig, generator):
    """Broken strokes: squares of gap_px around random ink pixels are erased."""
    import torch
    import torch.nn.functional as F

    b, _, h, w = x.shape
    weights = x.reshape(b, -1).clamp_min(0) + 1e-6  # a blank image draws anywhere (and erases nothing)
    centres = torch.multinomial(weights, config.gaps, replacement=True, generator=generator)  # (B, gaps)
    points = torch.zeros(b, h * w).scatter_(1, centres, 1.0).reshape(b, 1, h, w)
    k = config.gap_px
    mask = F.max_pool2d(F.pad(points, (k // 2, (k - 1) // 2, k // 2, (k - 1) // 2)), k, 1)
    apply = (torch.rand(b, 1, 1, 1, generator=generator) < config.gap_prob).float()
    return x * (1 - mask * apply)


def augment(x, config: JudgeConfig, generator, gaps: bool = True):
    """(B, 1, H, W) glyphs in [0, 1] -> new tensors: affine jitter, pen width, broken strokes."""
    x = _pen(_affine(x, config, generator), config.pen_prob, generator)
    return _gaps(x, config, generator) if gaps else x


def jittered_redraws(images: np.ndarray, copies: int, config: JudgeConfig, seed: int) -> np.ndarray:
    """The reference: each glyph (N, 28, 28) redrawn `copies` times with small affine and pen
    jitter, binarised at 0.5 like a drawing -> (N, copies, 28, 28)."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    x = torch.from_numpy(np.repeat(images.astype(np.float32), copies, axis=0))[:, None]
    out = augment(x, config, generator, gaps=False)[:, 0].numpy()
    return (out >= 0.5).astype(np.float32).reshape(len(images), copies, *images.shape[1:])


# -- the judge ------------------------------------------------------------------------------------

def _network(classes: int, config: JudgeConfig):
    import torch.nn as nn

    layers, width = [], 1
    for channels in config.channels:
        layers += [nn.Conv2d(width, channels, 3, padding=1), nn.BatchNorm2d(channels), nn.ReLU(), nn.MaxPool2d(2)]
        width = channels
    side = 28 >> len(config.channels)  # the layout is kept (a global pool lost it: 57% against 77% held out)
    features = nn.Sequential(*layers, nn.Flatten(), nn.Linear(width * side * side, config.features),
                             nn.BatchNorm1d(config.features), nn.ReLU())  # (B, features): the Frechet space
    return nn.ModuleDict({"features": features, "head": nn.Sequential(nn.Dropout(0.2),
                                                                      nn.Linear(config.features, classes))})


def train_drawings() -> list[int]:
    """The drawings the judge trains on: all but the scored conditions and the held-out redraws."""
    from vce_deploy.omniglot import DRAWINGS_PER_CHARACTER

    return [d for d in range(DRAWINGS_PER_CHARACTER) if d not in CONDITION_DRAWINGS + HELD_OUT_DRAWINGS]


def judge_key(images: np.ndarray, config: JudgeConfig) -> str:
    """What a cached judge must have been trained on: the data (its preprocessed pixels), the
    preprocessing, the drawings used and the judge config."""
    from vce_deploy import omniglot
    from vce_deploy.preprocess import BINARIZE_THRESHOLD, IMAGE_SIZE

    data = np.ascontiguousarray(images, dtype=np.float32)
    body = {"data_sha256": hashlib.sha256(data.tobytes()).hexdigest(), "data_shape": list(data.shape),
            "preprocessing": {"image_size": IMAGE_SIZE, "threshold": BINARIZE_THRESHOLD,
                              "omniglot_cache": omniglot.CACHE_VERSION},
            "train_drawings": train_drawings(), "config": asdict(config), "judge_version": JUDGE_VERSION}
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


def judge_cache_dir() -> Path:
    from vce_deploy.omniglot import default_cache_dir

    return default_cache_dir().parent / "fidelity"


class Judge:
    """A trained judge on one data part: classes are the part's characters in order."""

    def __init__(self, net, key: str, config: JudgeConfig, info: dict):
        self.net, self.key, self.config, self.info = net.eval(), key, config, info

    def features_logits(self, images: np.ndarray, batch: int = 512) -> tuple[np.ndarray, np.ndarray]:
        """(N, 28, 28) glyphs in [0, 1] -> penultimate features (N, F) and logits (N, classes)."""
        import torch

        feats, logits = [], []
        with torch.no_grad():
            for start in range(0, len(images), batch):
                x = torch.from_numpy(np.ascontiguousarray(images[start:start + batch], np.float32))[:, None]
                f = self.net["features"](x)
                feats.append(f.numpy())
                logits.append(self.net["head"](f).numpy())
        return np.concatenate(feats), np.concatenate(logits)

    def predict(self, images: np.ndarray) -> np.ndarray:
        return self.features_logits(images)[1].argmax(1)

    @classmethod
    def fit(cls, images: np.ndarray, config: JudgeConfig = JudgeConfig(), cache_dir: Path | None = None,
            log=print) -> "Judge":
        """The judge for `images` (characters, 20, 28, 28): from the cache when an entry with this
        exact key loads, else trained (one thread) and cached. cache_dir None: judge_cache_dir()."""
        import torch

        if images.ndim != 4 or images.shape[1] <= max(CONDITION_DRAWINGS + HELD_OUT_DRAWINGS):
            raise FidelityError(f"judge data: expected (characters, 20, 28, 28), got shape {images.shape}")
        key = judge_key(images, config)
        path = (cache_dir or judge_cache_dir()) / f"judge-{key[:24]}.safetensors"
        cached = cls._load(path, key, images.shape[0], config, log)
        if cached is not None:
            return cached
        threads = torch.get_num_threads()
        torch.set_num_threads(1)  # the judge's budget is one thread (it runs beside training)
        try:
            t0 = time.perf_counter()
            net = cls._train(images, config)
            seconds = time.perf_counter() - t0
        finally:
            torch.set_num_threads(threads)
        judge = cls(net, key, config, {"train_seconds": round(seconds, 1), "cached": False})
        judge.info["held_out_top1"] = float((judge.predict(images[:, list(HELD_OUT_DRAWINGS)].reshape(-1, 28, 28))
                                             == np.repeat(np.arange(len(images)), len(HELD_OUT_DRAWINGS))).mean())
        judge._save(path)
        log(f"judge trained in {seconds:.0f} s on one thread ({images.shape[0]} characters), held-out real "
            f"drawings top-1 {judge.info['held_out_top1']:.3f}; cached at {path}")
        return judge

    @staticmethod
    def _train(images: np.ndarray, config: JudgeConfig):
        import torch
        import torch.nn.functional as F

        torch.manual_seed(config.seed)
        generator = torch.Generator().manual_seed(config.seed)
        drawings = train_drawings()
        x_all = torch.from_numpy(np.ascontiguousarray(images[:, drawings], np.float32).reshape(-1, 1, 28, 28))
        labels = torch.arange(images.shape[0]).repeat_interleave(len(drawings))
        net = _network(images.shape[0], config).train()
        optimizer = torch.optim.Adam(net.parameters(), lr=config.lr)
        schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, config.steps)
        for _ in range(config.steps):
            pick = torch.randint(0, len(x_all), (config.batch,), generator=generator)
            x = augment(x_all[pick], config, generator)
            loss = F.cross_entropy(net["head"](net["features"](x)), labels[pick])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
        return net.eval()

    def _save(self, path: Path) -> None:
        from safetensors.torch import save

        from vce_deploy.fsio import atomic_write_bytes

        meta = {"key": self.key, "config": json.dumps(asdict(self.config)), "info": json.dumps(self.info)}
        tensors = {k: v.detach().contiguous() for k, v in self.net.state_dict().items()}
        atomic_write_bytes(path, save(tensors, metadata=meta))

    @classmethod
    def _load(cls, path: Path, key: str, classes: int, config: JudgeConfig, log) -> "Judge | None":
        """The cached judge if `path` holds one with exactly this key; None (retrain) otherwise."""
        if not path.is_file():
            return None
        try:
            from safetensors import safe_open
            from safetensors.torch import load

            data = path.read_bytes()
            with safe_open(str(path), "pt") as handle:
                meta = handle.metadata() or {}
            if meta.get("key") != key:
                log(f"judge cache {path} was made for other data, preprocessing or config: retraining")
                return None
            net = _network(classes, config)
            net.load_state_dict(load(data), strict=True)
            info = dict(json.loads(meta["info"]), cached=True)
        except Exception as err:  # a damaged entry of any kind is retrained, never trusted
            log(f"judge cache {path} does not load ({type(err).__name__}: {err}): retraining")
            return None
        return cls(net, key, config, info)


# -- measures ------------------------------------------------------------------------------------

def iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU of binary glyphs over the last two axes (broadcast); two blanks count as identical."""
    a, b = a >= 0.5, b >= 0.5
    inter = (a & b).sum((-2, -1))
    union = (a | b).sum((-2, -1))
    return np.where(union > 0, inter / np.maximum(union, 1), 1.0)


def mean_pairwise_iou(sets: np.ndarray) -> float:
    """(S, n, H, W): mean IoU over the distinct pairs within each set."""
    n = sets.shape[1]
    pairs = [(i, j) for i in range(n) for j in range(i + 1, n)]
    if not pairs:
        return float("nan")
    return float(np.mean([iou(sets[:, i], sets[:, j]).mean() for i, j in pairs]))


def _sqrt_psd(matrix: np.ndarray) -> np.ndarray:
    values, vectors = np.linalg.eigh((matrix + matrix.T) / 2)
    return (vectors * np.sqrt(np.clip(values, 0, None))) @ vectors.T


def frechet_gaussians(mu1, cov1, mu2, cov2) -> float:
    """Squared 2-Wasserstein distance of two Gaussians: |mu1 - mu2|^2 + tr(C1 + C2 - 2 (C1^1/2 C2 C1^1/2)^1/2)."""
    root1 = _sqrt_psd(cov1)
    cross = np.linalg.eigvalsh(root1 @ cov2 @ root1)
    return float(((mu1 - mu2) ** 2).sum() + np.trace(cov1) + np.trace(cov2) - 2 * np.sqrt(np.clip(cross, 0, None)).sum())


def frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
    """The Frechet distance (FID's formula) between two sets of feature rows (N, F), float64."""
    a, b = a.astype(np.float64), b.astype(np.float64)
    return frechet_gaussians(a.mean(0), np.cov(a, rowvar=False), b.mean(0), np.cov(b, rowvar=False))


def prior_hole(mu: np.ndarray, logvar: np.ndarray) -> dict:
    """The aggregated posterior (the mixture of q(z | x, q) over targets) moment-matched,
    against the prior N(0, I): a model without a hole has mean 0 and covariance I."""
    mu, logvar = mu.astype(np.float64), logvar.astype(np.float64)
    d = mu.shape[1]
    mean = mu.mean(0)
    cov = np.cov(mu, rowvar=False) + np.diag(np.exp(logvar).mean(0))  # (D, D): law of total variance
    eig = np.linalg.eigvalsh(cov)
    kl = 0.5 * (np.trace(cov) + mean @ mean - d - np.log(np.clip(eig, 1e-12, None)).sum())
    per_target_kl = 0.5 * (mu ** 2 + np.exp(logvar) - logvar - 1).sum(1)
    return {"mean_norm_sq": float(mean @ mean), "cov_trace_over_d": float(np.trace(cov) / d),
            "cov_eig_min": float(eig.min()), "cov_eig_max": float(eig.max()),
            "kl_gaussian_vs_prior": float(kl), "w2_sq_vs_prior": frechet_gaussians(mean, cov, np.zeros(d), np.eye(d)),
            "kl_per_target": float(per_target_kl.mean()),
            "active_dims": int((mu.var(0) > 0.01).sum()), "latent_dim": int(d)}


# -- the score -----------------------------------------------------------------------------------

def _forms(means: np.ndarray, rng: np.random.Generator) -> dict[str, np.ndarray]:
    return {"threshold": (means >= 0.5).astype(np.float32), "mean": means.astype(np.float32),
            "sample": (rng.random(means.shape) < means).astype(np.float32)}


def _top1(judge: Judge, images: np.ndarray, labels: np.ndarray) -> tuple[float, np.ndarray]:
    """Share judged as `labels` (one per leading row) and the judge's features, for (R, k, H, W)."""
    share, feats, _ = _judged(judge, images, labels)
    return share, feats


def _judged(judge: Judge, images: np.ndarray, labels: np.ndarray, per_character: int = 1):
    """_top1 and its standard error over characters (`per_character` leading rows each: a
    character's samples share its conditions and are correlated)."""
    flat = images.reshape(-1, *images.shape[-2:])
    feats, logits = judge.features_logits(flat)
    right = logits.argmax(1) == np.repeat(labels, flat.shape[0] // len(labels))
    by_character = right.reshape(len(labels) // per_character, -1).mean(1)
    se = float(by_character.std(ddof=1) / math.sqrt(len(by_character))) if len(by_character) > 1 else 0.0
    return float(right.mean()), feats, se


def fidelity_score(converter, part: str = "test", n: int = 8, characters_every: int = 1, seed: int = 0,
                   temperatures=(1.0,), split: str = "paper", data_dir=None, judge: Judge | None = None,
                   judge_config: JudgeConfig = JudgeConfig(), cache_dir: Path | None = None,
                   decomposition: bool = True, validation_alphabets: tuple[str, ...] | None = None,
                   log=print) -> dict:
    """The judged sample-quality score of `converter` on one data part (see the module doc).
    Returns a JSON-ready dict; fidelity_table(result) renders it. An ablation row (n = 8, t = 1.0,
    330 characters, judge cached) took 27 s of CPU on one thread (docs/results.md).
    validation_alphabets: which background alphabets the validation part holds (load_split's;
    a run's TrainConfig.held_out_alphabets)."""
    from vce_deploy.omniglot import load_split

    if n < 2:
        raise FidelityError(f"n: expected at least 2 variations per condition (pairwise diversity), got {n}")
    if characters_every < 1:
        raise FidelityError(f"characters_every: expected a positive integer, got {characters_every}")
    data = load_split(split, part, data_dir, validation_alphabets=validation_alphabets)
    judge = judge or Judge.fit(data.images, judge_config, cache_dir, log)
    if judge.key != judge_key(data.images, judge.config):
        raise FidelityError(f"judge: expected one trained on the {split} split's {part} part, got one made for "
                            "other data or config (key mismatch)")
    chosen = np.arange(0, len(data), characters_every)
    images = data.images[chosen]  # (C, 20, 28, 28)
    conditions = images[:, list(CONDITION_DRAWINGS)].reshape(-1, 28, 28)  # (P, 28, 28): character-major
    labels = np.repeat(chosen, len(CONDITION_DRAWINGS))  # (P,)
    redraws = images[:, list(HELD_OUT_DRAWINGS)]  # (C, R, 28, 28)
    rng = np.random.default_rng(seed)

    real_top1, real_feats = _top1(judge, redraws, chosen)
    jitter = jittered_redraws(conditions, n, judge.config, seed)
    jitter_top1, jitter_feats = _top1(judge, jitter, labels)
    cond_of_redraw = np.repeat(images[:, list(CONDITION_DRAWINGS)], len(HELD_OUT_DRAWINGS), 1)  # (C, 2R, ...)
    reference = {
        "real_redraw_top1": real_top1, "jittered_condition_top1": jitter_top1,
        "condition_top1": _top1(judge, conditions[:, None], labels)[0],
        "real_redraw_iou_condition": float(iou(np.tile(redraws, (1, len(CONDITION_DRAWINGS), 1, 1)),
                                               cond_of_redraw).mean()),
        "real_redraw_pairwise_iou": mean_pairwise_iou(redraws),
        "jittered_condition_frechet": frechet_distance(real_feats, jitter_feats),
    }
    variations = {}
    for t in temperatures:
        t0 = time.perf_counter()
        means = converter.convert(conditions[:, None], n=n, seed=seed, temperature=float(t))  # (P, n, 28, 28)
        row = {}
        for form, ys in _forms(means, rng).items():
            top1, feats, se = _judged(judge, ys, labels, len(CONDITION_DRAWINGS))
            row[form] = {"top1": top1, "top1_se": se, "frechet": frechet_distance(real_feats, feats)}
        binary = (means >= 0.5)
        row["iou_condition"] = float(iou(binary, conditions[:, None]).mean())
        row["pairwise_iou"] = mean_pairwise_iou(binary)
        row["blanks"] = float((binary.sum((-2, -1)) < BLANK_INK).mean())
        row["seconds"] = round(time.perf_counter() - t0, 1)
        variations[f"{t:g}"] = row
    result = {"protocol": {"split": split, "part": part, "characters": int(len(chosen)), "classes": int(len(data)),
                           "characters_every": characters_every, "condition_drawings": list(CONDITION_DRAWINGS),
                           "held_out_drawings": list(HELD_OUT_DRAWINGS), "n": n, "seed": seed,
                           "blank_ink_pixels": BLANK_INK},
              "judge": dict(judge.info, key=judge.key, config=asdict(judge.config)),
              "reference": reference, "variations": variations}
    if decomposition:
        result["decomposition"], result["prior_hole"] = _decompose(converter, judge, images, chosen, rng)
    return result


def _decompose(converter, judge: Judge, images: np.ndarray, chosen: np.ndarray, rng) -> tuple[dict, dict]:
    """z taken apart with the model's own encoder: x = another real drawing of the character
    (a held-out redraw), q = each condition."""
    c = len(chosen)
    pairs = [(ci, d, HELD_OUT_DRAWINGS[(ci + k) % len(HELD_OUT_DRAWINGS)])
             for ci in range(c) for k, d in enumerate(CONDITION_DRAWINGS)]
    q = np.stack([images[ci, d] for ci, d, _ in pairs])[:, None]  # (P, 1, 28, 28)
    x = np.stack([images[ci, h] for ci, _, h in pairs])[:, None]
    labels = chosen[[ci for ci, _, _ in pairs]]
    try:
        mu, logvar = converter.run_encoder(x, q)  # (P, D) each
    except Exception as err:
        raise FidelityError(f"the decomposition needs the model's encoder, and it failed: {err}") from err
    p, d = mu.shape
    other = (np.arange(p) + len(CONDITION_DRAWINGS)) % p  # the same condition slot of the next character
    zs = {"posterior_mean": mu, "posterior_sample": mu + np.exp(0.5 * logvar) * rng.standard_normal((p, d)),
          "prior_sample": rng.standard_normal((p, d)), "zero": np.zeros((p, d)),
          "other_character_posterior": mu[other] if c > 1 else None}
    out = {}
    for name, z in zs.items():
        if z is None:
            continue
        means = converter.run_convertor(z.astype(np.float32), q)[:, 0]  # (P, 28, 28)
        out[name] = {form: _top1(judge, ys[:, None], labels)[0]
                     for form, ys in _forms(means, rng).items() if form != "sample"}
    return out, prior_hole(mu, logvar)


# -- report --------------------------------------------------------------------------------------

def fidelity_table(result: dict) -> str:
    """A readable table of fidelity_score's result (markdown)."""
    ref, proto = result["reference"], result["protocol"]
    lines = [f"judge: top-1 {result['judge'].get('held_out_top1', float('nan')):.3f} on held-out real drawings "
             f"({proto['classes']} classes); {proto['characters']} characters x {len(proto['condition_drawings'])} "
             f"conditions x n = {proto['n']}, seed {proto['seed']}",
             "", "| sample | top-1 (± SE over characters) | Frechet | IoU with condition | pairwise IoU | blanks |",
             "|---|---|---|---|---|---|",
             f"| real redraws (ceiling) | {ref['real_redraw_top1']:.3f} | 0 | {ref['real_redraw_iou_condition']:.3f} | "
             f"{ref['real_redraw_pairwise_iou']:.3f} | 0 |",
             f"| condition redrawn with jitter (reference) | {ref['jittered_condition_top1']:.3f} | "
             f"{ref['jittered_condition_frechet']:.1f} | | | |",
             f"| the condition itself | {ref['condition_top1']:.3f} | | 1 | | 0 |"]
    for t, row in result["variations"].items():
        for form in FORMS:
            extra = (f"{row['iou_condition']:.3f} | {row['pairwise_iou']:.3f} | {row['blanks']:.3f}"
                     if form == "threshold" else " | | ")
            se = f" ± {row[form]['top1_se']:.3f}" if "top1_se" in row[form] else ""
            lines.append(f"| variations t = {t}, {form} | {row[form]['top1']:.3f}{se} | {row[form]['frechet']:.1f} | "
                         f"{extra} |")
    best = max(((t, form) for t in result["variations"] for form in FORMS),
               key=lambda tf: result["variations"][tf[0]][tf[1]]["top1"])
    row = result["variations"][best[0]]
    lines += ["", f"best by top-1: t = {best[0]}, {best[1]} ({row[best[1]]['top1']:.3f}, "
                  f"{row[best[1]]['top1'] / max(ref['jittered_condition_top1'], 1e-9):.2f}x the jittered condition; "
                  "target 0.8x)"]
    if "decomposition" in result:
        lines += ["", "| z (convertor(z, condition)) | top-1 thresholded | top-1 means |", "|---|---|---|"]
        lines += [f"| {name} | {v['threshold']:.3f} | {v['mean']:.3f} |" for name, v in result["decomposition"].items()]
        hole = result["prior_hole"]
        lines += ["", f"prior hole: aggregated posterior mean |m|^2 {hole['mean_norm_sq']:.2f}, tr(C)/D "
                      f"{hole['cov_trace_over_d']:.2f}, eigenvalues {hole['cov_eig_min']:.3f}..{hole['cov_eig_max']:.2f}, "
                      f"KL(N(m, C) || N(0, I)) {hole['kl_gaussian_vs_prior']:.1f} nats, W2^2 {hole['w2_sq_vs_prior']:.1f}; "
                      f"KL per target {hole['kl_per_target']:.1f} nats, {hole['active_dims']} of {hole['latent_dim']} "
                      "dimensions active"]
    return "\n".join(lines)


def save_judged_grid(converter, judge: Judge, split, path, n: int = 10, seed: int = 0, temperature: float = 1.0,
                     rows: int = 20) -> Path:
    """One row per alphabet (its first character's condition drawing 1, grey frame), then n
    thresholded variations framed green where the judge reads the condition's character, red
    where not."""
    from PIL import Image

    from vce_deploy.fsio import atomic_write_bytes
    from vce_deploy.grid import check_output_path, output_format

    path = check_output_path(path)
    first: dict[str, int] = {}
    for index, (alphabet, _) in enumerate(split.names):
        first.setdefault(alphabet, index)
    chosen = np.array(list(first.values())[:rows])
    conditions = split.images[chosen, CONDITION_DRAWINGS[0]]  # (R, 28, 28)
    ys = (converter.convert(conditions[:, None], n=n, seed=seed, temperature=temperature) >= 0.5).astype(np.float32)
    right = (judge.predict(ys.reshape(-1, 28, 28)) == np.repeat(chosen, n)).reshape(len(chosen), n)
    frame, pad, size = 2, 2, 28 * GRID_SCALE
    cell = size + 2 * frame
    canvas = np.full((len(chosen) * (cell + pad) + pad, (n + 1) * (cell + pad) + pad, 3), 255, np.uint8)
    colours = {None: (128, 128, 128), True: (0, 160, 0), False: (220, 0, 0)}
    for r in range(len(chosen)):
        for col in range(n + 1):
            glyph, verdict = (conditions[r], None) if col == 0 else (ys[r, col - 1], bool(right[r, col - 1]))
            top, left = pad + r * (cell + pad), pad + col * (cell + pad)
            canvas[top:top + cell, left:left + cell] = colours[verdict]
            ink = np.kron(glyph, np.ones((GRID_SCALE, GRID_SCALE)))
            canvas[top + frame:top + frame + size, left + frame:left + frame + size] = \
                (255 * (1 - ink))[..., None].astype(np.uint8)
    encoded = io.BytesIO()
    Image.fromarray(canvas, mode="RGB").save(encoded, format=output_format(path))
    atomic_write_bytes(path, encoded.getvalue())
    return path


def load_source(source: str, threads: int | None = None):
    """A bundle directory (Converter.load) or a training checkpoint .safetensors (the torch
    backend), as train/evaluate.py loads them; a missing path is refused by name."""
    from vce_deploy.nll import load_evaluable

    if not Path(source).exists():
        raise FidelityError(f"{source}: does not exist; expected a bundle directory or a checkpoint .safetensors")
    return load_evaluable(source, threads=threads)


def add_judge_flags(parser: argparse.ArgumentParser) -> None:
    """The judge's flags (this CLI's and train.ablate's --fidelity); judge_settings reads them."""
    parser.add_argument("--judge-steps", type=int, default=None, help="judge training steps (default: JudgeConfig)")
    parser.add_argument("--judge-channels", type=int, nargs="+", default=None,
                        help="judge conv widths (default: JudgeConfig; small ones for tests)")
    parser.add_argument("--judge-features", type=int, default=None, help="judge penultimate width")
    parser.add_argument("--judge-cache", default=None, help="judge cache directory (default: the user cache)")


def judge_settings(args: argparse.Namespace) -> tuple[JudgeConfig, Path | None]:
    """add_judge_flags' values -> (the judge config, the cache directory or None for the default)."""
    config = JudgeConfig()
    if args.judge_steps is not None:
        config = replace(config, steps=args.judge_steps)
    if args.judge_channels is not None:
        config = replace(config, channels=tuple(args.judge_channels))
    if args.judge_features is not None:
        config = replace(config, features=args.judge_features)
    return config, (Path(args.judge_cache) if args.judge_cache else None)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m train.fidelity", description=__doc__.splitlines()[2])
    parser.add_argument("source", help="bundle directory, or training checkpoint .safetensors")
    parser.add_argument("--part", default="test", choices=("test", "validation"),
                        help="the data part: its characters train the judge and give the conditions")
    parser.add_argument("--split", default="paper", help="paper or small")
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--n", type=int, default=8, help="variations per condition")
    parser.add_argument("--every", type=int, default=1, help="score every N-th character (the judge knows all)")
    parser.add_argument("--temperatures", type=float, nargs="+", default=list(TEMPERATURES))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="torch and model threads (1 beside a training run)")
    parser.add_argument("--json", default=None, help="write the result here (atomically)")
    parser.add_argument("--grid", default=None, help="write a PNG of judged variations (green right, red wrong)")
    parser.add_argument("--grid-temperature", type=float, default=1.0)
    add_judge_flags(parser)
    args = parser.parse_args(argv)

    import torch

    from vce_deploy.errors import VCEError
    from vce_deploy.omniglot import load_split

    torch.set_num_threads(args.threads)
    config, cache = judge_settings(args)
    try:
        if args.grid:
            from vce_deploy.grid import check_output_path

            check_output_path(args.grid)
        converter, description = load_source(args.source, args.threads)
        data = load_split(args.split, args.part, args.data_dir)
        judge = Judge.fit(data.images, config, cache, log=lambda m: print(m, file=sys.stderr))
        result = fidelity_score(converter, args.part, args.n, args.every, args.seed, args.temperatures, args.split,
                                args.data_dir, judge=judge)
        if args.grid:
            save_judged_grid(converter, judge, data, args.grid, seed=args.seed, temperature=args.grid_temperature)
    except (VCEError, ValueError, FileNotFoundError) as err:  # FidelityError is a ValueError
        print(f"error: {err}", file=sys.stderr)
        return 1
    result["source"], result["model"] = str(args.source), description
    print(description)
    print(fidelity_table(result))
    if args.grid:
        print(f"wrote {args.grid}")
    if args.json:
        from vce_deploy.fsio import atomic_write_bytes

        atomic_write_bytes(args.json, (json.dumps(result, indent=2) + "\n").encode())
    return 0


if __name__ == "__main__":
    sys.exit(main())
