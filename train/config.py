"""Typed training configuration; the paper's numbers are the defaults (section 4.3)."""
from __future__ import annotations

import argparse
import math
from dataclasses import asdict, dataclass, field, fields, replace

from vce_deploy.model import ModelConfig
from vce_deploy.omniglot import VALIDATION_ALPHABETS


@dataclass(frozen=True)
class TrainConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    seed: int = 0
    split: str = "paper"  # vce_deploy.omniglot.SPLITS: "paper" (30/20 alphabets) or "small" (smoke runs)
    # Background alphabets held out whole for validation, comma-separated (every choice is made
    # on them: vce_deploy/omniglot.py says why); "" holds out one character in ten of each
    # training alphabet instead (the small split, and runs begun before validation alphabets).
    validation_alphabets: str = ",".join(VALIDATION_ALPHABETS)
    # Comma-separated names from AUGMENTATIONS: "rot90" turns every training character by 90,
    # 180 and 270 degrees into three new characters; "jitter" gives every target drawing its own
    # small random shift, rotation, scale and shear (train/data.py). "" = none.
    augment: str = ""
    init_from: str = ""  # a checkpoint whose weights (not optimiser state) start the run; "" = random init
    device: str = "cpu"  # "cuda" on a GPU machine
    # bf16 autocast of the forward pass: "auto" = on where the hardware runs bf16 natively (a CUDA
    # GPU; a CPU with AMX or AVX512-BF16, docs/training.md), "on", "off". Losses stay float32.
    autocast: str = "auto"
    final_loss: str = "lmvae"  # stage 3: lmvae | vae | introvae
    # stage 1: Reptile pre-training on the VAE loss (Algorithm 2)
    reptile_steps: int = 10_000  # outer iterations
    reptile_inner_steps: int = 5  # optimiser steps on one episode per outer iteration
    # The paper leaves Reptile's inner optimiser and step size open (Algorithm 2 writes plain SGD
    # with stepsize eta, section 4.3 says "SGD with Adam"). We take Adam with beta1 = 0, as
    # Nichol et al. do for few-shot Reptile (no momentum carried across tasks), and epsilon = 0.5,
    # their value for a few inner steps.
    reptile_inner_lr: float = 2e-4
    reptile_epsilon: float = 0.5  # phi <- phi + epsilon * (phi~ - phi)
    # stage 2: VAE loss; stage 3: the final loss
    vae_steps: int = 290_000
    final_steps: int = 300_000
    lr: float = 2e-4  # Adam, section 4.3
    # Fig. 3 halves the rate a few times over 600k steps without saying when: every 100k steps
    # of stages 2 and 3 puts the orange lines where the figure draws them.
    lr_halve_every: int = 100_000
    # LR_SCHEDULES over stages 2-3: "halve" every lr_halve_every steps; "constant"; "cosine" from
    # lr down to lr * COSINE_FLOOR at the last step (Loshchilov and Hutter's SGDR, one cycle).
    lr_schedule: str = "halve"
    episodes_per_step: int = 1  # batch = 19 * episodes_per_step pairs
    # LMVAE (eqs. 11, 12) and IntroVAE (eqs. 6, 7)
    margin: float = 50.0
    sigma: float = 0.15
    lam: float = 0.2
    # IntroVAE's weights (eqs. 6, 7) are not given by the paper: alpha 0.25 and beta 1 are
    # IntroVAE's own (Huang et al. 2018) for images of this size.
    intro_alpha: float = 0.25
    intro_beta: float = 1.0
    # Fidelity switches, the paper's form by default: the hinge max(0, m - KL(z_c)) per sample
    # before the batch mean (eq. 11) rather than on the batch mean; and Algorithm 1's alternating
    # updates (step the encoder on L_E, recompute z_c with the updated encoder, then step the
    # convertor on L_C) rather than both gradients from one forward pass.
    hinge_per_sample: bool = True
    alternating: bool = True
    # KL(z) of the final loss (stage 3; a branch of train.ablate is one final stage), both off by
    # default (the paper's loss, bit for bit: train/losses.py KLTerm). free_bits: a floor in nats on
    # each latent dimension's batch-mean KL (Kingma et al. 2016). kl_warmup_steps: KL(z) weighted
    # by beta rising linearly from 0 at the stage's first step to 1 after this many (Bowman et al. 2016).
    # kl_weight: beta itself, the KL(z) weight the stage ends at (beta-VAE, Higgins et al. 2017); above 1
    # it pulls every posterior toward N(0, I), the lever on the prior hole of issue 27 (prior samples
    # judged right far less often than posterior samples: docs/results.md).
    free_bits: float = 0.0
    kl_warmup_steps: int = 0
    kl_weight: float = 1.0
    # bookkeeping
    log_every: int = 10
    sample_every: int = 1000
    checkpoint_every: int = 1000
    validate_every: int = 0  # steps between validation NLLs (0: never)
    validate_k: int = 100  # importance samples per target for the validation NLL (a trend, not a report)
    checkpoint_every_s: float = 0.0  # also checkpoint after this much wall time since the last one; 0: off
    time_limit_s: float = 0.0  # stop cleanly (checkpoint written) after this much wall time; 0: no limit
    threads: int = 0  # 0: physical cores
    channels_last: bool = False
    # the VAE stage's whole step (forward, backward, Adam) through torch.compile, CUDA graphs on a
    # GPU (train/compiled_step.py); off: the eager step. Same numbers within rounding (tests).
    compiled_step: bool = False

    @property
    def total_steps(self) -> int:
        return self.reptile_steps + self.vae_steps + self.final_steps

    def stage(self, step: int) -> str:
        if step < self.reptile_steps:
            return "reptile"
        if step < self.final_stage_start:
            return "vae"
        return self.final_loss

    def lr_at(self, step: int) -> float:
        done = max(0, step - self.reptile_steps)
        if self.lr_schedule == "constant":
            return self.lr
        if self.lr_schedule == "cosine":
            progress = min(1.0, done / max(1, self.vae_steps + self.final_steps))
            return self.lr * (COSINE_FLOOR + (1 - COSINE_FLOOR) * 0.5 * (1 + math.cos(math.pi * progress)))
        return self.lr * 0.5 ** (done // self.lr_halve_every)

    @property
    def final_stage_start(self) -> int:
        return self.reptile_steps + self.vae_steps

    def kl_weight_at(self, step: int) -> float:
        """beta on KL(z) at `step`: 1 before the final stage; in it kl_weight, reached linearly
        over the warm-up's steps when there is one."""
        into_final = step - self.final_stage_start
        if into_final < 0:
            return 1.0
        if self.kl_warmup_steps <= 0:
            return self.kl_weight
        return self.kl_weight * min(1.0, into_final / self.kl_warmup_steps)

    @property
    def held_out_alphabets(self) -> tuple[str, ...]:
        return tuple(name for name in self.validation_alphabets.split(",") if name)

    @property
    def augmentations(self) -> tuple[str, ...]:
        return tuple(name for name in self.augment.split(",") if name)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> "TrainConfig":
        values = dict(values)
        model = ModelConfig.from_dict(values.pop("model", {}))
        known = {f.name for f in fields(cls)}
        unknown = set(values) - known
        if unknown:
            raise ValueError(f"unknown train config keys {sorted(unknown)}")
        return cls(model=model, **values)


PRESETS: dict[str, TrainConfig] = {
    # seconds on 2 cores: a narrow, shallow model and a few steps of every stage
    "smoke": TrainConfig(
        model=ModelConfig(channels=8, blocks=1), split="small", validation_alphabets="", autocast="off",
        reptile_steps=4, reptile_inner_steps=2, vae_steps=20, final_steps=12, lr=2e-3,
        lr_halve_every=16, log_every=2, sample_every=18, checkpoint_every=18,
        threads=1,  # a model this small gains nothing from 2 threads, and on a busy machine loses 10x
    ),
    # the CPU campaign (docs/training.md): resumable across sessions from the checkpoint in
    # checkpoints/default; a larger rate than the paper's, halved more often, for a shorter run
    "default": TrainConfig(
        reptile_steps=300, reptile_inner_steps=5, reptile_inner_lr=1e-3, vae_steps=60_000,
        final_steps=20_000, lr=1e-3, lr_halve_every=20_000, channels_last=True,
        log_every=10, sample_every=2_000, checkpoint_every=500, validate_every=5_000,
    ),
    # paper scale on one H100 in under 9 minutes (scripts/train_gpu.sh): 16 episodes a step
    "gpu": TrainConfig(
        device="cuda", reptile_steps=500, reptile_inner_steps=5, reptile_inner_lr=1e-3, vae_steps=24_000,
        final_steps=8_000, lr=1e-3, lr_halve_every=8_000, episodes_per_step=16, channels_last=True,
        log_every=50, sample_every=4_000, checkpoint_every=2_000, checkpoint_every_s=60, validate_every=8_000,
        time_limit_s=510,
    ),
    # the paper: 600k steps, for a GPU
    "paper": TrainConfig(),
}

FINAL_LOSSES = ("lmvae", "vae", "introvae")
AUTOCAST_CHOICES = ("auto", "on", "off")
AUGMENTATIONS = ("rot90", "jitter")
LR_SCHEDULES = ("halve", "constant", "cosine")
COSINE_FLOOR = 0.05
# Fields a resumed run may change: how it is run and watched, not what it learns. A larger
# final_steps extends the last stage (its lr schedule is only the same under "halve" or
# "constant": check_resumable refuses a cosine run whose length changed).
RUN_CONTROL_FIELDS = frozenset({
    "init_from", "log_every", "sample_every", "checkpoint_every", "validate_every", "validate_k",
    "checkpoint_every_s", "time_limit_s", "threads", "final_steps", "device", "autocast", "compiled_step"})
# What a checkpoint written before a field existed was trained with (the field's old behaviour).
LEGACY_VALUES = {"validation_alphabets": "", "augment": "", "lr_schedule": "halve", "free_bits": 0.0,
                 "kl_warmup_steps": 0, "kl_weight": 1.0}


def preset(name: str) -> TrainConfig:
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; expected one of {sorted(PRESETS)}")
    return PRESETS[name]


def add_override_flags(parser: argparse.ArgumentParser) -> None:
    """One --flag per config field (model fields too), default None = keep the preset's."""
    for f in fields(TrainConfig):
        if f.name == "model":
            continue
        _add_flag(parser, f.name, f.type)
    for f in fields(ModelConfig):
        _add_flag(parser, f.name, f.type)


def _add_flag(parser, name: str, type_name) -> None:
    kind = {"int": int, "float": float, "str": str, "bool": _parse_bool}[str(type_name)]
    parser.add_argument(f"--{name.replace('_', '-')}", dest=name, type=kind, default=None, metavar=str(type_name).upper())


def _parse_bool(text: str) -> bool:
    if text.lower() in ("1", "true", "yes", "on"):
        return True
    if text.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def apply_overrides(config: TrainConfig, args: argparse.Namespace) -> TrainConfig:
    train_names = {f.name for f in fields(TrainConfig)} - {"model"}
    model_names = {f.name for f in fields(ModelConfig)}
    given = {k: v for k, v in vars(args).items() if v is not None}
    model = replace(config.model, **{k: v for k, v in given.items() if k in model_names})
    config = replace(config, model=model, **{k: v for k, v in given.items() if k in train_names})
    if config.final_loss not in FINAL_LOSSES:
        raise ValueError(f"unknown final loss {config.final_loss!r}; expected one of {FINAL_LOSSES}")
    if config.autocast not in AUTOCAST_CHOICES:
        raise ValueError(f"unknown autocast {config.autocast!r}; expected one of {AUTOCAST_CHOICES}")
    validate(config)
    return config


def validate(config: TrainConfig) -> None:
    """Names that must come from a fixed list; an unknown one is an error, never ignored."""
    unknown = sorted(set(config.augmentations) - set(AUGMENTATIONS))
    if unknown:
        raise ValueError(f"unknown augmentation {unknown}; expected a comma-separated subset of {list(AUGMENTATIONS)}")
    if config.lr_schedule not in LR_SCHEDULES:
        raise ValueError(f"unknown lr schedule {config.lr_schedule!r}; expected one of {list(LR_SCHEDULES)}")
    if not config.free_bits >= 0:  # NaN too
        raise ValueError(f"free_bits: expected nats per latent dimension >= 0 (0 = off), got {config.free_bits}")
    if not config.kl_weight > 0:  # NaN too
        raise ValueError(f"kl_weight: expected a KL(z) weight > 0 (1 = the paper's), got {config.kl_weight}")
    if config.kl_warmup_steps < 0:
        raise ValueError(f"kl_warmup_steps: expected a step count >= 0 (0 = off), got {config.kl_warmup_steps}")


def resume_mismatches(saved: dict, config: TrainConfig) -> dict[str, tuple]:
    """Fields (other than RUN_CONTROL_FIELDS) whose value differs between a checkpoint's saved
    train config and the requested one: {field: (saved, requested)}."""
    requested = config.to_dict()
    saved = {**LEGACY_VALUES, **saved}
    out = {}
    for name, value in requested.items():
        if name == "model" or name in RUN_CONTROL_FIELDS:
            continue
        if saved.get(name) != value:
            out[name] = (saved.get(name), value)
    if config.lr_schedule == "cosine" and saved.get("final_steps") != config.final_steps:
        out["final_steps"] = (saved.get("final_steps"), config.final_steps)
    return out
