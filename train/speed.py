"""python -m train.speed: training steps/s of the default model on this machine, per option.

Times whole optimiser steps (forward, backward, Adam) of the VAE and LMVAE stages on real
episodes, after warm-up, for each memory format / episodes-per-step / compile choice, so
the choice baked into the `default` preset is a measured one.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import time

import numpy as np
import torch

from vce_deploy.model import VCE, ModelConfig

from .data import load_train, sample_episodes
from .losses import lmvae_loss, vae_loss
from .train import apply_gradients


def steps_per_second(loss_fn, channels_last: bool, episodes: int, compile_model: bool, seconds: float, split) -> float:
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    model = VCE(ModelConfig()).to(memory_format=memory_format)
    if compile_model:
        model.encoder.forward = torch.compile(model.encoder.forward)
        model.convertor.logits = torch.compile(model.convertor.logits)
    opt_enc = torch.optim.Adam(model.encoder.parameters(), 1e-4)
    opt_con = torch.optim.Adam(model.convertor.parameters(), 1e-4)
    rng = np.random.default_rng(0)

    def one_step():
        x, q = (torch.from_numpy(a).to(memory_format=memory_format) for a in sample_episodes(split, episodes, rng))
        apply_gradients(model, loss_fn(model, x, q), opt_enc, opt_con)

    for _ in range(3):  # warm-up (and compilation)
        one_step()
    count, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        one_step()
        count += 1
    return count / (time.perf_counter() - start)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m train.speed", description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=10.0, help="timed seconds per configuration")
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--compile", action="store_true", help="also time torch.compile (slow to compile)")
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    split = load_train()
    print(f"# {platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
          f"{args.threads} threads, {args.seconds:g} s per row")
    print("| stage | memory format | episodes/step | compiled | steps/s | pairs/s |")
    print("|---|---|---|---|---|---|")
    rows = []
    variants = [(False, 1, False), (True, 1, False), (True, 2, False)]
    if args.compile:
        variants.append((True, 1, True))
    for stage, fn in (("vae", vae_loss), ("lmvae", lmvae_loss)):
        for channels_last, episodes, compiled in variants:
            rate = steps_per_second(fn, channels_last, episodes, compiled, args.seconds, split)
            row = {"stage": stage, "channels_last": channels_last, "episodes_per_step": episodes,
                   "compiled": compiled, "steps_per_s": rate, "pairs_per_s": rate * 19 * episodes}
            rows.append(row)
            print(f"| {stage} | {'channels_last' if channels_last else 'contiguous'} | {episodes} | "
                  f"{'yes' if compiled else 'no'} | {rate:.2f} | {row['pairs_per_s']:.0f} |", flush=True)
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(rows, handle, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
