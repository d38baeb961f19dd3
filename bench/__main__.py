"""python -m bench [--bundle B] [--batch-sizes 1 64] [--peers ID ...] [--seconds S] [--rounds R]
                   [--threads N] [--json FILE] [--profile]
(the same as `python bench/latency.py ...`, and `vce bench ...` in a clone)

Every runtime backend (bare engine call and Converter.convert end to end) against the honest
PyTorch peers, on the same inputs, in interleaved rounds; prints the markdown table the
README's "Speed" section is made from. Needs torch for the PyTorch peers; never onnx or the
exporter (the bundle is the shipped default one unless --bundle names another).
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
from pathlib import Path

from vce_deploy.backends.base import physical_cores
from vce_deploy.bundle import Bundle
from vce_deploy.errors import VCEError

from . import machine, peers, report, run


def parse(argv) -> argparse.Namespace:
    description = " ".join(__doc__.split("\n\n")[1].split())  # the whole paragraph, never a cut line
    parser = argparse.ArgumentParser(prog="python -m bench", description=description)
    parser.add_argument("--bundle", default=None, help="bundle directory (default: the shipped default bundle)")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 64])
    parser.add_argument("--peers", nargs="+", default=list(peers.PEERS), choices=list(peers.PEERS), metavar="ID",
                        help=f"contenders (default all): {', '.join(peers.PEERS)}")
    parser.add_argument("--seconds", type=float, default=4.0, help="timed seconds per contender and batch")
    parser.add_argument("--rounds", type=int, default=8, help="interleaved rounds those seconds are split into")
    parser.add_argument("--warmup", type=float, default=0.5, help="warm-up seconds per contender and batch")
    parser.add_argument("--threads", type=int, default=None, help="threads per contender (default: physical cores)")
    parser.add_argument("--json", default=None, metavar="FILE", help="write machine, records and targets as JSON")
    parser.add_argument("--profile", action="store_true", help="also break Converter.convert at batch 1 into steps, and time one "
                        "Converter shared by threads (pool of infer requests against a lock)")
    args = parser.parse_args(argv)
    if min(args.batch_sizes) < 1 or args.seconds <= 0 or args.rounds < 1 or args.warmup < 0 or \
            (args.threads is not None and args.threads < 1):
        parser.error("expected batch sizes >= 1, --seconds > 0, --rounds >= 1, --warmup >= 0, --threads >= 1")
    return args


def main(argv=None) -> int:
    args = parse(argv)
    try:
        bundle = Bundle.load(args.bundle)
    except VCEError as err:
        print(f"bench: error: {err}", file=sys.stderr)
        return 1
    threads = args.threads or physical_cores()
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(threads)  # process-wide: every PyTorch peer and the peak share it
    try:
        return _run(args, bundle, threads, argv)
    finally:
        torch.set_num_threads(before)  # a caller's process (a test session) is left as it was


def _run(args, bundle: Bundle, threads: int, argv) -> int:
    info = machine.machine_info(threads)
    peak = machine.measure_peak(threads)["peak_gflops"]
    image, image_note = run.condition_image()
    contenders = peers.build_peers(args.peers, bundle.path, threads)
    flops = machine.flops_per_conversion(peers._convertor(bundle.path))
    result = run.run(contenders, args.batch_sizes, args.seconds, args.rounds, args.warmup, image,
                     bundle.manifest.latent_dim, log=lambda m: print(m, file=sys.stderr))
    info["load_avg_end"] = list(os.getloadavg())
    rows = report.records(contenders, args.batch_sizes, result, flops, peak)
    goals = report.targets(rows, big=max(args.batch_sizes), small=min(args.batch_sizes))
    meta = {"flops": flops, "peak_gflops": peak, "image": image_note, "seconds": args.seconds, "rounds": args.rounds,
            "command": "python -m bench " + shlex.join(argv if argv is not None else sys.argv[1:])}
    text = report.markdown(rows, info, meta, goals)
    if args.profile:
        from .profile import batch1_steps, shared_converter

        text += batch1_steps(bundle.path, threads, image)
        text += shared_converter(bundle.path, threads, image)
    sys.stdout.write(text)
    if args.json:
        Path(args.json).write_text(json.dumps({"machine": info, "meta": meta, "records": rows, "targets": goals},
                                              indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
