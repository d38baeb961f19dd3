"""python -m train.samples BUNDLE --out FIG.png: variations of novel-alphabet glyphs (the paper's
Figures 4 to 6 layout: one row per condition, the condition first, then its samples).

One condition per test alphabet (its first character's drawing 0), drawn through the runtime
with a fixed seed, so the figure shows exactly what `vce_deploy.Converter` gives a user.

python -m train.samples BUNDLE_OR_CHECKPOINT --follow: how closely samples follow their
condition (condition_follow below; tests/test_default_bundle.py holds the shipped model to it).
"""
from __future__ import annotations

import argparse
import sys

import numpy as np


FOLLOW_CHARACTERS = 16
FOLLOW_STRIDE = 41  # 16 characters spread over the 20 test alphabets of the paper split


def mean_bce(y: np.ndarray, target: np.ndarray) -> float:
    """Per-image summed BCE of Bernoulli means y against a binary glyph, averaged: nats."""
    y = np.clip(y, 1e-6, 1 - 1e-6)
    return float(-(target * np.log(y) + (1 - target) * np.log(1 - y)).sum(axis=(-2, -1)).mean())


def condition_follow(converter, test, seed: int = 0) -> np.ndarray:
    """Per character (16 of the test alphabets, never trained on): the BCE of 16 samples against
    their own condition over the median BCE against the other 15 conditions. A model that
    ignores its condition sits near 1 for every character; lower follows it more closely."""
    characters = list(range(0, len(test), FOLLOW_STRIDE))[:FOLLOW_CHARACTERS]
    samples = converter.convert(test.images[characters, 0], n=16, seed=seed)  # (16, 16, 28, 28)
    ratios = []
    for row, c in enumerate(characters):
        own = mean_bce(samples[row], test.images[c, 0])
        others = np.median([mean_bce(samples[row], test.images[o, 0]) for o in characters if o != c])
        ratios.append(own / others)
    return np.array(ratios)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m train.samples", description=__doc__.splitlines()[0])
    parser.add_argument("bundle", help="bundle directory (or, with --follow, a .safetensors checkpoint)")
    parser.add_argument("--out", default=None, help="PNG to write")
    parser.add_argument("--follow", action="store_true", help="print how closely samples follow their condition")
    parser.add_argument("--n", type=int, default=12, help="samples per condition")
    parser.add_argument("--rows", type=int, default=10, help="conditions (test alphabets), at most 20")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--split", default="paper")
    parser.add_argument("--data-dir", default=None)
    args = parser.parse_args(argv)

    from vce_deploy import Converter
    from vce_deploy.grid import save_grid
    from vce_deploy.nll import load_evaluable
    from vce_deploy.omniglot import load_split

    if not (args.out or args.follow):
        parser.error("expected --out FIG.png, --follow or both")
    test = load_split(args.split, "test", args.data_dir)
    if args.follow:
        ratios = condition_follow(load_evaluable(args.bundle)[0], test, args.seed)
        print(f"condition follow (own / others' BCE, {len(ratios)} test characters): mean {ratios.mean():.3f}, "
              f"median {np.median(ratios):.3f}, {(ratios < 1).sum()} of {len(ratios)} below 1")
        if not args.out:
            return 0
    first_of_alphabet = {}
    for row, (alphabet, _) in enumerate(test.names):
        first_of_alphabet.setdefault(alphabet, row)
    rows = list(first_of_alphabet.values())[:args.rows]
    conditions = test.images[rows, 0][:, None]  # (R, 1, 28, 28)
    converter = Converter.load(args.bundle)
    y = converter.convert(conditions, n=args.n, seed=args.seed)  # (R, n, 28, 28)
    save_grid(np.concatenate([conditions[:, :1], y], axis=1), args.out)
    print(f"wrote {args.out}: {len(rows)} test alphabets ({', '.join(sorted(first_of_alphabet)[:len(rows)])}), "
          f"{args.n} samples each, seed {args.seed}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
