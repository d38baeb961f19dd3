"""python -m train.evaluate CHECKPOINT_OR_BUNDLE --k 1000 [--all-drawings] [--json FILE]

One-shot NLL on the test alphabets (docs/design.md "Evaluation protocol", the paper's Table 1),
by the runtime's estimator (vce_deploy/nll.py) on a Converter: a bundle at any precision and
backend, or a checkpoint on the torch backend.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m train.evaluate",
                                     description="One-shot NLL (nats) on the test alphabets, by importance sampling.")
    parser.add_argument("source", help="checkpoint .safetensors, or bundle directory")
    parser.add_argument("--k", type=int, default=1000, help="importance samples per target (1000 for a reported figure)")
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
    from vce_deploy.nll import load_evaluable, load_targets, one_shot_nll

    try:
        model, description = load_evaluable(args.source, args.backend, args.precision)
        _, x, q = load_targets(args.split, args.part, args.data_dir, args.all_drawings, args.limit)
    except (VCEError, ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    t0 = time.perf_counter()
    result = one_shot_nll(model, x, q, k=args.k, seed=args.seed, batch_size=args.batch_size,
                          progress=not args.no_progress)
    seconds = time.perf_counter() - t0
    print(f"{description}")
    print(f"NLL   {result['nll_mean']:.2f} ± {result['nll_sem']:.2f} nats  (K={result['k']}, "
          f"{result['targets']} targets, seed {result['seed']}, {seconds:.0f} s)")
    print(f"-ELBO {result['elbo_mean']:.2f} ± {result['elbo_sem']:.2f} nats")
    if args.json:
        record = dict(result, source=str(args.source), model=description, seconds=seconds,
                      split=args.split, part=args.part,
                      all_drawings=args.all_drawings, limit=args.limit)
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(record, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
