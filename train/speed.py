"""python -m train.speed: training steps/s of the default model on this machine, per option.

Times whole optimiser steps (forward, backward, Adam) of the VAE and LMVAE stages on real
episodes, for each option (memory format, bf16 autocast, torch.compile of the encoder and the
convertor, torch.compile of the whole VAE step: train/compiled_step.py, episodes per step),
so the choices the presets make are measured ones. The machines are shared and noisy, so the
options are interleaved: every option runs once per round for `--seconds`, over `--rounds`
rounds, and the median and range of each are reported (docs/training.md).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from dataclasses import asdict, dataclass, fields

import numpy as np
import torch

from vce_deploy.cpu import cpu_flags, cpu_model, has_native_bf16
from vce_deploy.model import VCE, ModelConfig
from vce_deploy.omniglot import load_split

from .compiled_step import WholeStep, draw_noise
from .data import sample_episodes
from .losses import lmvae_loss, vae_loss
from .train import apply_gradients

STAGES = {"vae": vae_loss, "lmvae": lambda m, x, q: lmvae_loss(m, x, q, alternating=True)}


@dataclass(frozen=True)
class Option:
    channels_last: bool = True
    bf16: bool = False
    compiled: bool = False  # torch.compile of encoder.forward and convertor.logits
    episodes: int = 1
    whole_step: bool = False  # torch.compile of the whole VAE step (forward, backward, Adam)

    @property
    def label(self) -> str:
        parts = ["channels_last" if self.channels_last else "contiguous", "bf16" if self.bf16 else "fp32"]
        if self.compiled:
            parts.append("compiled")
        if self.whole_step:
            parts.append("whole-step compiled")
        return " ".join(parts) + f" x{self.episodes}"


class Contender:
    """One option's model, optimisers and step function, built once and reused every round."""

    def __init__(self, option: Option, stage: str, split, device: torch.device):
        self.option, self.stage, self.split, self.device = option, stage, split, device
        self.memory_format = torch.channels_last if option.channels_last else torch.contiguous_format
        self.model = VCE(ModelConfig()).to(device, memory_format=self.memory_format)
        if option.compiled:
            self.model.encoder.forward = torch.compile(self.model.encoder.forward)
            self.model.convertor.logits = torch.compile(self.model.convertor.logits)
        self.opt_enc = torch.optim.Adam(self.model.encoder.parameters(), 1e-4)
        self.opt_con = torch.optim.Adam(self.model.convertor.parameters(), 1e-4)
        self.rng = np.random.default_rng(0)
        self.whole = None
        if option.whole_step:
            if stage != "vae":
                raise ValueError(f"the whole-step option is the VAE stage's only, got stage {stage!r}")
            self.whole = WholeStep(self.model, self.opt_enc, self.opt_con, 19 * option.episodes, device,
                                   self.memory_format, autocast=option.bf16)
            self.noise = torch.Generator(device.type).manual_seed(0)
        for _ in range(3):  # warm-up (and compilation)
            self.step()

    def step(self) -> None:
        x, q = (torch.from_numpy(a).to(self.device, memory_format=self.memory_format)
                for a in sample_episodes(self.split, self.option.episodes, self.rng))
        if self.whole is not None:
            self.whole(x, q, draw_noise(len(x), self.model.config.latent_dim, self.noise, self.device), 1e-4)
            return
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.option.bf16):
            apply_gradients(self.model, STAGES[self.stage](self.model, x, q), self.opt_enc, self.opt_con)

    def steps_per_second(self, seconds: float) -> float:
        count, start = 0, time.perf_counter()
        while time.perf_counter() - start < seconds:
            self.step()
            count += 1
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        return count / (time.perf_counter() - start)


def default_options(device: torch.device, with_compile: bool, compile_only: bool = False) -> list[Option]:
    bf16_native = torch.cuda.is_bf16_supported() if device.type == "cuda" else has_native_bf16()
    if compile_only:  # the eager step against both kinds of compilation, at the default's precision
        return [Option(bf16=bf16_native), Option(compiled=True, bf16=bf16_native),
                Option(whole_step=True, bf16=bf16_native)]
    options = [Option(channels_last=False), Option(), Option(episodes=2)]
    if bf16_native:  # bf16 without native support runs emulated, far slower: not worth a row
        options += [Option(bf16=True), Option(bf16=True, episodes=2)]
    if with_compile:
        options += [Option(compiled=True, bf16=bf16_native), Option(whole_step=True, bf16=bf16_native)]
    return options


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m train.speed", description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=4.0, help="timed seconds per option per round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--stages", nargs="+", default=list(STAGES), choices=list(STAGES))
    parser.add_argument("--compile", action="store_true", help="also time torch.compile (slow to compile)")
    parser.add_argument("--compile-only", action="store_true",
                        help="time only the eager step, the compiled networks and the compiled whole step")
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    split = load_split("paper", "train")
    flags = sorted(f for f in cpu_flags() if f.startswith(("amx", "avx512_bf16", "avx512_vnni", "avx_vnni")))
    machine = {"cpu": cpu_model(), "flags": flags, "cores": os.cpu_count(), "threads": args.threads,
               "torch": torch.__version__, "device": str(device), "python": platform.python_version(),
               "load_average": os.getloadavg()}
    print(f"# {machine['cpu']} ({', '.join(flags) or 'no AMX/AVX512-BF16/VNNI'}), {args.threads} threads, "
          f"torch {torch.__version__}, {args.rounds} rounds x {args.seconds:g} s, load {machine['load_average'][0]:.1f}")
    rows = []
    for stage in args.stages:
        contenders = [Contender(o, stage, split, device) for o in default_options(device, args.compile, args.compile_only)
                      if stage == "vae" or not o.whole_step]
        rates: dict[Option, list[float]] = {c.option: [] for c in contenders}
        for _ in range(args.rounds):
            for contender in contenders:  # interleaved: a neighbour's load hits every option alike
                rates[contender.option].append(contender.steps_per_second(args.seconds))
        base = statistics.median(rates[contenders[0].option])
        for option, values in rates.items():
            median = statistics.median(values)
            rows.append({"stage": stage, **asdict(option), "label": option.label, "steps_per_s_median": median,
                         "steps_per_s_min": min(values), "steps_per_s_max": max(values),
                         "pairs_per_s_median": median * 19 * option.episodes, "speedup": median / base,
                         "speedup_against": contenders[0].option.label})
    print("| stage | option | steps/s median (min-max) | pairs/s | vs the stage's first row |")
    print("|---|---|---|---|---|")
    for r in rows:
        option = Option(**{f.name: r[f.name] for f in fields(Option)})
        print(f"| {r['stage']} | {option.label} | {r['steps_per_s_median']:.2f} ({r['steps_per_s_min']:.2f}-"
              f"{r['steps_per_s_max']:.2f}) | {r['pairs_per_s_median']:.0f} | {r['speedup']:.2f}x |")
    if args.json:
        from vce_deploy.fsio import atomic_write_bytes

        atomic_write_bytes(args.json, (json.dumps({"machine": machine, "rows": rows}, indent=2) + "\n").encode())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
