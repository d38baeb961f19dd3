"""python -m export.record_nll BUNDLE RESULT.json [RESULT.json ...] [--split small]

Records reported NLL figures (`python -m train.evaluate BUNDLE --precision P --k 1000 --json
RESULT.json`) in the bundle's manifest as metrics["nll_reported"], with their protocol (K,
targets, split, seed, the command), and reseals the manifest. The figures the README quotes
and the ones `vce inspect` prints are then the same numbers, read from the same place.

The manifest is rewritten atomically (temporary file, then rename); the bundle's other files
are not touched. Results from different protocols are refused: one reported protocol per bundle.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from vce_deploy.bundle import MANIFEST, Bundle, write_raw_manifest
from vce_deploy.contract import PRECISIONS
from vce_deploy.errors import VCEError
from vce_deploy.metrics import reported_nll


def record(bundle_path: str | Path, results: list[tuple[str, dict]], split: str | None = None) -> dict:
    """Write [(precision, evaluate --json result)] into metrics["nll_reported"]; returns the section."""
    bundle = Bundle.load(bundle_path, verify=True)
    raw = json.loads((bundle.path / MANIFEST).read_text())
    section: dict = {}
    for precision, result in results:
        if precision not in PRECISIONS:
            raise ValueError(f"{precision!r}: expected a precision in {list(PRECISIONS)}")
        chosen_split = result.get("split") or split
        if not chosen_split:
            raise ValueError("the result does not name its split: pass --split (paper or small)")
        if result.get("limit") or result.get("every", 1) != 1 or result.get("part", "test") != "test":
            raise ValueError(f"{precision}: expected a full test-part evaluation, got limit={result.get('limit')!r}, "
                             f"every={result.get('every', 1)!r}, part={result.get('part')!r}: not a reportable figure")
        command = (f"python -m train.evaluate BUNDLE --precision {precision} --k {result['k']} --split {chosen_split}"
                   f"{' --all-drawings' if result.get('all_drawings') else ''} --seed {result['seed']}")
        protocol, figures = reported_nll(result, chosen_split, command.replace(f" {precision} ", " P "))
        if "protocol" in section and section["protocol"] != protocol:
            raise ValueError(f"{precision}: protocol {protocol} differs from the other results' {section['protocol']}")
        section["protocol"] = protocol
        section[precision] = figures
    raw.setdefault("metrics", {})["nll_reported"] = section
    write_raw_manifest(bundle.path, raw)
    Bundle.load(bundle.path, verify=True)  # reads back, sealed
    return section


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m export.record_nll", description=__doc__.split("\n\n")[1])
    parser.add_argument("bundle")
    parser.add_argument("results", nargs="+", metavar="PRECISION=RESULT.json",
                        help="e.g. fp32=docs/measurements/nll_default_fp32.json")
    parser.add_argument("--split", default=None, choices=("paper", "small"),
                        help="the split the results were computed on, when the JSON does not say")
    args = parser.parse_args(argv)
    try:
        pairs = []
        for item in args.results:
            precision, sep, path = item.partition("=")
            if not sep:
                raise ValueError(f"{item!r}: expected PRECISION=RESULT.json")
            pairs.append((precision, json.loads(Path(path).read_text())))
        section = record(args.bundle, pairs, args.split)
    except (VCEError, ValueError, KeyError, OSError) as err:
        print(f"record_nll: error: {err}", file=sys.stderr)
        return 1
    print(json.dumps(section, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
