"""python -m train.curve RUN_DIR [--every 1000] [--plot FIG.png] [--fit FIRST LAST --reach NATS]:
the training curve of a run.

Prints the mean of KL(z) + CON (the training -ELBO of the VAE stage) over each block of steps
from RUN_DIR/losses.csv, beside the validation NLLs from RUN_DIR/validation.jsonl; --plot draws
both (matplotlib, from the bench extra). --fit fits NLL = a + b ln(step) to the validation NLLs
of steps FIRST..LAST (one stage: a new loss breaks the trend) and --reach says at which step
that line would reach a validation NLL: an extrapolation, for sizing a budget, not a promise.
"""
from __future__ import annotations

import argparse
import csv
import json
import math
import sys
from pathlib import Path

import numpy as np


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


def log_fit(records: list[dict], first: int, last: int) -> tuple[float, float, float, int]:
    """Least squares NLL = a + b ln(step) over the validation records of steps first..last.
    Returns (a, b, rms residual, points)."""
    points = [(r["step"], r["nll_mean"]) for r in records if first <= r["step"] <= last]
    if len(points) < 3:
        raise ValueError(f"--fit {first} {last}: expected at least 3 validation records in that range, got {len(points)}")
    steps, nll = (np.asarray(v, dtype=np.float64) for v in zip(*points))
    b, a = np.polyfit(np.log(steps), nll, 1)
    rms = float(np.sqrt(np.mean((a + b * np.log(steps) - nll) ** 2)))
    return float(a), float(b), rms, len(points)


def step_reaching(a: float, b: float, nll: float) -> float:
    """The step at which a + b ln(step) = nll; inf if the line does not fall."""
    return math.exp((nll - a) / b) if b < 0 else math.inf


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m train.curve", description=__doc__.splitlines()[0])
    parser.add_argument("run", help="run directory (losses.csv, validation.jsonl)")
    parser.add_argument("--every", type=int, default=1000)
    parser.add_argument("--plot", default=None)
    parser.add_argument("--fit", type=int, nargs=2, metavar=("FIRST", "LAST"), default=None,
                        help="fit NLL = a + b ln(step) to the validation NLLs of these steps (one stage)")
    parser.add_argument("--reach", type=float, nargs="*", default=[], help="validation NLLs to extrapolate the fit to")
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
    if args.fit:
        try:
            a, b, rms, n = log_fit(valid, *args.fit)
        except ValueError as err:
            print(f"error: {err}", file=sys.stderr)
            return 1
        print(f"fit over steps {args.fit[0]}..{args.fit[1]} ({n} validations): NLL = {a:.2f} {b:+.3f} ln(step), "
              f"{b * math.log(10):+.2f} nats per tenfold steps, rms residual {rms:.2f}")
        for target in args.reach:
            print(f"  the line reaches {target:g} at step {step_reaching(a, b, target):,.0f} (extrapolated)")
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
