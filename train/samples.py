"""python -m train.samples BUNDLE --out FIG.png: variations of novel-alphabet glyphs (the paper's
Figures 4 to 6 layout: one row per condition, the condition first, then its samples).

One condition per test alphabet (its first character's drawing 0), drawn through the runtime
with a fixed seed, so the figure shows exactly what `vce_deploy.Converter` gives a user.
"""
from __future__ import annotations

import argparse
import sys

import numpy as np


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m train.samples", description=__doc__.splitlines()[0])
    parser.add_argument("bundle", help="bundle directory")
    parser.add_argument("--out", required=True, help="PNG to write")
    parser.add_argument("--n", type=int, default=12, help="samples per condition")
    parser.add_argument("--rows", type=int, default=10, help="conditions (test alphabets), at most 20")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--split", default="paper")
    parser.add_argument("--data-dir", default=None)
    args = parser.parse_args(argv)

    from vce_deploy import Converter
    from vce_deploy.grid import save_grid
    from vce_deploy.omniglot import load_split

    test = load_split(args.split, "test", args.data_dir)
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
