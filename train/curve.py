"""python -m train.curve RUN_DIR [--every 1000] [--plot FIG.png]: the training curve of a run.

Prints the mean of KL(z) + CON (the training -ELBO of the VAE stage) over each block of steps
from RUN_DIR/losses.csv, beside the validation NLLs from RUN_DIR/validation.jsonl; --plot draws
both (matplotlib, from the bench extra).
"""
from __future__ import annotations

import argparse
import csv
import json
import sys
from pathlib import Path


def blocks(run: Path, every: int) -> list[tuple[int, float]]:
    sums: dict[int, list[float]] = {}
    with open(run / "losses.csv", newline="") as handle:
        for row in csv.DictReader(handle):
            if row.get("kl") and row.get("con"):
                sums.setdefault((int(row["step"]) - 1) // every, []).append(float(row["kl"]) + float(row["con"]))
    # a block logged by only a handful of rows (a run stopped just past a boundary) says little
    return [((block + 1) * every, sum(v) / len(v)) for block, v in sorted(sums.items()) if len(v) >= 10]


def validation(run: Path) -> list[dict]:
    path = run / "validation.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m train.curve", description=__doc__.splitlines()[0])
    parser.add_argument("run", help="run directory (losses.csv, validation.jsonl)")
    parser.add_argument("--every", type=int, default=1000)
    parser.add_argument("--plot", default=None)
    args = parser.parse_args(argv)
    run = Path(args.run)
    train_curve, valid = blocks(run, args.every), validation(run)
    print(f"| steps up to | train KL + CON (mean over {args.every} steps) |")
    print("|---|---|")
    for step, value in train_curve:
        print(f"| {step} | {value:.1f} |")
    for record in valid:
        print(f"validation NLL at step {record['step']}: {record['nll_mean']:.2f} ± {record['nll_sem']:.2f} "
              f"(K={record['k']}, {record['targets']} targets)")
    if args.plot:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6, 3.5))
        ax.plot(*zip(*train_curve), label=f"train KL + CON (mean per {args.every} steps)")
        if valid:
            ax.plot([r["step"] for r in valid], [r["nll_mean"] for r in valid], "o-", label="validation NLL")
        ax.set_xlabel("step")
        ax.set_ylabel("nats")
        ax.legend()
        fig.tight_layout()
        fig.savefig(args.plot, dpi=100)
        print(f"wrote {args.plot}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
