"""python -m train --preset NAME --out runs/NAME [--any-config-field VALUE ...]"""
from __future__ import annotations

import argparse
import json
import sys

from .config import PRESETS, add_override_flags, apply_overrides, preset


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m train", description="Train the VCE on Omniglot.")
    parser.add_argument("--preset", default="default", help=f"one of {sorted(PRESETS)}")
    parser.add_argument("--out", required=True, help="run directory: checkpoint, losses.csv, samples/; resumed if it holds a checkpoint")
    parser.add_argument("--data-dir", default=None, help="folder with the two Omniglot zips")
    parser.add_argument("--no-progress", action="store_true")
    add_override_flags(parser)
    args = parser.parse_args(argv)
    try:
        config = apply_overrides(preset(args.preset), argparse.Namespace(**{
            k: v for k, v in vars(args).items() if k not in ("preset", "out", "data_dir", "no_progress")}))
    except ValueError as err:
        parser.error(str(err))
    from .train import train  # torch is imported only once the arguments are known to be good
    from vce_deploy.errors import CheckpointError

    try:
        result = train(config, args.out, data_dir=args.data_dir, progress=not args.no_progress)
    except (CheckpointError, FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
