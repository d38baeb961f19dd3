"""python -m export CHECKPOINT --out BUNDLE [--precision fp32 fp16 bf16 int8] [--opset N]

Exit 0 with a verified bundle, or exit 1 with the reason (every parity mismatch listed) and
BUNDLE exactly as it was before.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from vce_deploy.contract import RUN_PRECISIONS
from vce_deploy.errors import VCEError
from vce_deploy.verify import DEFAULT_BATCHES, ParityError

from . import NLL_K, NLL_SUBSET, export_bundle
from .onnx_export import DEFAULT_OPSET, ExportError


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {value}")
    return value


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m export",
                                     description="Export a VCE checkpoint to a bundle: ONNX fp32/fp16/int8, parity "
                                                 "report, NLL per precision, manifest with sha256 of every file.")
    parser.add_argument("checkpoint", help="checkpoint .safetensors (its .json sidecar next to it)")
    parser.add_argument("--out", required=True, help="bundle directory (replaced whole, only on success)")
    parser.add_argument("--precision", nargs="+", default=["fp32", "fp16", "bf16", "int8"], choices=RUN_PRECISIONS,
                        help="bf16: no file, the fp32 graph checked and its NLL measured on OpenVINO in bfloat16 "
                             "(needs a CPU with native bf16); int8: both forms, TensorRT's and the CPU's")
    parser.add_argument("--opset", type=_positive, default=DEFAULT_OPSET,
                        help=f"ONNX opset (default {DEFAULT_OPSET}, the dynamo exporter's own)")
    parser.add_argument("--batches", type=_positive, nargs="+", default=list(DEFAULT_BATCHES), help="parity batch sizes")
    parser.add_argument("--nll-subset", type=_positive, default=NLL_SUBSET,
                        help="NLL targets, evenly spaced over the split's test targets (1,318 on the paper split)")
    parser.add_argument("--nll-k", type=_positive, default=NLL_K, help="importance samples per target")
    parser.add_argument("--no-nll", action="store_true", help="skip the NLL per precision")
    parser.add_argument("--no-slim", action="store_true", help="keep the exporter's graph (no onnxslim)")
    parser.add_argument("--data-dir", default=None, help="folder with the Omniglot zips")
    parser.add_argument("--split", default="paper", choices=("paper", "small"),
                        help="Omniglot split: int8 calibration on its training part, NLL on its test part")
    parser.add_argument("--sign-key", default=None, metavar="KEY",
                        help="sign the finished bundle with this PEM EC private key (same as `vce sign`)")
    args = parser.parse_args(argv)
    if args.sign_key and not Path(args.sign_key).is_file():  # before minutes of export, not after
        print(f"export failed, no bundle written: --sign-key {args.sign_key!r}: expected a PEM private key file, "
              "but it does not exist", file=sys.stderr)
        return 1
    try:
        export_bundle(args.checkpoint, args.out, precisions=tuple(args.precision), opset=args.opset,
                      parity_batches=tuple(args.batches), measure_nll=not args.no_nll, nll_subset=args.nll_subset,
                      nll_k=args.nll_k, slim=not args.no_slim, data_dir=args.data_dir,
                      split=args.split)
    except (ParityError, ExportError) as err:
        print(f"export failed, no bundle written: {err}", file=sys.stderr)
        return 1
    except (VCEError, ValueError, OSError) as err:  # a bad checkpoint, flag or data directory
        print(f"export failed, no bundle written: {err}", file=sys.stderr)
        return 1
    if args.sign_key:
        return _sign(args.out, args.sign_key)
    return 0


def _sign(bundle: str, key: str) -> int:
    from vce_deploy.bundle_signing import sign_bundle

    try:
        print(f"signed: {sign_bundle(bundle, key)}")
    except VCEError as err:  # the bundle is written and valid; only its signature is missing
        print(f"export done, signing failed (the bundle at {bundle} is unsigned): {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
