"""python -m train.evaluate CHECKPOINT_OR_BUNDLE --k 1000 [--all-drawings] [--json FILE]

One-shot NLL on the test alphabets (docs/design.md "Evaluation protocol", the paper's Table 1),
by the runtime's estimator (vce_deploy/nll.py) on a Converter: a bundle at any precision and
backend, or a checkpoint on the torch backend.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time

import numpy as np


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m train.evaluate",
                                     description="One-shot NLL (nats) on the test alphabets, by importance sampling.")
    parser.add_argument("source", help="checkpoint .safetensors, or bundle directory")
    parser.add_argument("--k", type=int, nargs="+", default=[1000],
                        help="importance samples per target (1000 for a reported figure); several values = a K sweep "
                             "on the same targets and noise, to show the estimate has converged")
    parser.add_argument("--all-drawings", action="store_true", help="all 20 drawings of every character as targets, not drawings 0 and 10")
    parser.add_argument("--precision", default=None, help="bundle precision: fp32, fp16, int8")
    parser.add_argument("--backend", default=None, help="bundle backend, e.g. onnxruntime")
    parser.add_argument("--threads", type=int, default=None,
                        help="intra-op threads (default: physical cores; 1 beside a training run on a 2-core machine)")
    parser.add_argument("--limit", type=int, default=None, help="only the first N targets (quick checks)")
    parser.add_argument("--every", type=int, default=1,
                        help="only every N-th character (a subset spanning every alphabet, e.g. for a K sweep)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch-size", type=int, default=1000, help="convertor batch")
    parser.add_argument("--data-dir", default=None, help="folder with the Omniglot zips")
    parser.add_argument("--split", default="paper", help="paper (20 novel alphabets) or small (3)")
    parser.add_argument("--part", default="test", help="test (for reporting) or validation (for choosing)")
    parser.add_argument("--json", default=None, help="also write the result here")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)

    from vce_deploy.errors import VCEError
    from vce_deploy.nll import load_evaluable, load_targets, one_shot_nll, sem_over_characters
    from vce_deploy.omniglot import targets_per_character

    try:
        model, description = load_evaluable(args.source, args.backend, args.precision, args.threads)
        _, x, q = load_targets(args.split, args.part, args.data_dir, args.all_drawings, args.limit, args.every)
    except (VCEError, ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
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
                            part=args.part, all_drawings=args.all_drawings, limit=args.limit,
                            every=args.every))
    if len(records) > 1:  # paired: the same targets and the same noise seeds
        base = np.asarray(records[0]["nll_per_target"])
        for record in records[1:]:
            diff = np.asarray(record["nll_per_target"]) - base
            sem = diff.std(ddof=1) / math.sqrt(len(diff)) if len(diff) > 1 else 0.0
            print(f"K={record['k']} - K={records[0]['k']}: {diff.mean():+.3f} ± {sem:.3f} nats "
                  f"(paired, {len(diff)} targets)")
    if args.json:
        from vce_deploy.fsio import atomic_write_bytes

        body = records[0] if len(records) == 1 else {"k_sweep": records}
        atomic_write_bytes(args.json, (json.dumps(body, indent=2) + "\n").encode())
    return 0


if __name__ == "__main__":
    sys.exit(main())
