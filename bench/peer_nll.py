"""python -m bench.peer_nll [--peers ID ...]: what each contender's convertor costs in NLL.

The bundle's manifest states the NLL cost of its own files, but the PyTorch peers (PT2E int8
above all, the fastest contender on Zen 4 and AMX: docs/cpu_inference.md) are not bundle files,
so a speed ratio against them said nothing of what they give up. Here each peer's convertor
(bench/peers.py, exactly as timed) draws the likelihood and ONNX Runtime's fp32 encoder the
proposal, on the export's subset of test targets with one seed, so every row is paired with
`ort-fp32` target by target: the convertor's cost alone, which is all `convert` runs.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from vce_deploy import Converter
from vce_deploy.bundle import default_bundle_path
from vce_deploy.fsio import atomic_write_bytes
from vce_deploy.nll import one_shot_nll
from vce_deploy.omniglot import load_split, nll_targets, spread_subset

from .peers import PEERS, REFERENCE_RUNTIME, build_peers


class PeerConvertor:
    """one_shot_nll's model: the fp32 encoder's proposal, the peer's convertor."""

    def __init__(self, encoder: Converter, engine):
        self.run_encoder, self.run_convertor = encoder.run_encoder, engine


def evenly_spaced_targets(split: str, count: int, data_dir=None) -> tuple[np.ndarray, np.ndarray]:
    """`count` test targets spread over every test alphabet, the export's NLL subset."""
    x, q = nll_targets(load_split(split, "test", data_dir))
    picks = spread_subset(len(x), count)
    return x[picks], q[picks]


def peer_costs(bundle: Path, peer_ids, targets: int = 64, k: int = 100, seed: int = 0, threads: int = 1,
               split: str = "paper", data_dir=None, log=print) -> dict:
    x, q = evenly_spaced_targets(split, targets, data_dir)
    encoder = Converter.load(bundle, backend="onnxruntime", precision="fp32", threads=threads)
    ids = [REFERENCE_RUNTIME] + [p for p in peer_ids if p != REFERENCE_RUNTIME]
    rows, reference = {}, None
    for peer in build_peers(ids, bundle, threads):
        if peer.reason or peer.engine is None:
            rows[peer.id] = {"ran": False, "reason": peer.reason or "no engine call"}
            log(f"{peer.id}: not run ({rows[peer.id]['reason']})")
            continue
        result = one_shot_nll(PeerConvertor(encoder, peer.engine), x, q, k=k, seed=seed)
        per_target = np.asarray(result.pop("nll_per_target"))
        if reference is None:
            reference = per_target  # ort-fp32 runs first
        diff = per_target - reference
        rows[peer.id] = {"ran": True, "precision": peer.precision, "detail": peer.detail, **result,
                         "cost_vs_fp32": float(diff.mean()),
                         "cost_vs_fp32_sem": float(diff.std(ddof=1) / np.sqrt(len(diff))) if len(diff) > 1 else 0.0}
        log(f"{peer.id} ({peer.precision}): NLL {result['nll_mean']:.3f}, convertor cost vs fp32 "
            f"{rows[peer.id]['cost_vs_fp32']:+.3f} ± {rows[peer.id]['cost_vs_fp32_sem']:.3f} nats (paired)")
    return {"bundle": str(bundle), "protocol": {"targets": int(len(x)), "k": k, "seed": seed, "split": split,
                                                "encoder": "onnxruntime fp32 (the proposal)",
                                                "paired_with": REFERENCE_RUNTIME},
            "peers": rows}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.peer_nll", description=__doc__.splitlines()[0])
    parser.add_argument("--bundle", type=Path, default=None, help="default: the shipped bundle")
    parser.add_argument("--peers", nargs="+", choices=list(PEERS), metavar="ID",
                        default=["torch-pt2e-int8", "ort-int8-cpu-form", "openvino-bf16"],
                        help=f"contenders (bench/peers.py): {', '.join(PEERS)}")
    parser.add_argument("--targets", type=int, default=64)
    parser.add_argument("--k", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--split", default="paper")
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    result = peer_costs(args.bundle or default_bundle_path(), args.peers, args.targets, args.k, args.seed,
                        args.threads, args.split, args.data_dir)
    if args.json:
        atomic_write_bytes(args.json, (json.dumps(result, indent=2) + "\n").encode())
    return 0


if __name__ == "__main__":
    sys.exit(main())
