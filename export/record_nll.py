"""python -m export.record_nll BUNDLE PRECISION=RESULT.json [...] [--split small] [--fidelity F.json]

Records reported NLL figures (`python -m train.evaluate BUNDLE --precision P --k 1000 --json
RESULT.json`) in the bundle's manifest as metrics["nll_reported"], with their protocol (K,
targets, split, seed, the command), and reseals the manifest. The figures the README quotes
and the ones `vce inspect` prints are then the same numbers, read from the same place.

The manifest is rewritten atomically (temporary file, then rename); the bundle's other files
are not touched. Results from different protocols are refused: one reported protocol per bundle.

--fidelity F.json (`python -m train.fidelity BUNDLE --part test --json F.json`, its temperatures
including vce_deploy.DEFAULT_TEMPERATURE) records the judged sample score beside it as
metrics["fidelity_reported"]: what the default output (the means at the default temperature) is
judged, against the jittered condition and real redraws, with the protocol.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from vce_deploy.bundle import MANIFEST, Bundle, write_raw_manifest
from vce_deploy.contract import PRECISIONS
from vce_deploy.errors import VCEError
from vce_deploy.inputs import DEFAULT_TEMPERATURE
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


def reported_fidelity(result: dict) -> dict:
    """A `python -m train.fidelity --json` result -> metrics["fidelity_reported"]: the default
    output's judged top-1 (convert's means at DEFAULT_TEMPERATURE) with its references."""
    protocol = result.get("protocol", {})
    if protocol.get("part") != "test":
        raise ValueError(f"fidelity: expected a score on the test part, got part={protocol.get('part')!r}")
    key = f"{DEFAULT_TEMPERATURE:g}"
    if key not in result.get("variations", {}):
        raise ValueError(f"fidelity: expected a score at the default temperature {key}, got temperatures "
                         f"{sorted(result.get('variations', {}))}")
    default, reference = result["variations"][key], result["reference"]
    return {
        "protocol": {**{k: protocol[k] for k in ("split", "part", "characters", "characters_every", "n", "seed")},
                     "judge_key": result["judge"]["key"], "judge_held_out_top1": result["judge"].get("held_out_top1"),
                     "command": f"python -m train.fidelity BUNDLE --part test --every {protocol['characters_every']} "
                                f"--n {protocol['n']} --seed {protocol['seed']}"},
        "default_output": {"temperature": DEFAULT_TEMPERATURE, "form": "mean", "top1": default["mean"]["top1"],
                           "top1_se": default["mean"]["top1_se"],
                           "x_jittered_condition": default["mean"]["top1"] / reference["jittered_condition_top1"],
                           "thresholded_top1": default["threshold"]["top1"], "iou_condition": default["iou_condition"],
                           "blanks": default["blanks"]},
        "reference": {k: reference[k] for k in ("jittered_condition_top1", "real_redraw_top1",
                                                 "real_redraw_iou_condition")},
    }


def record_fidelity(bundle_path: str | Path, result: dict) -> dict:
    """Write reported_fidelity(result) into metrics["fidelity_reported"]; returns the section."""
    bundle = Bundle.load(bundle_path, verify=True)
    raw = json.loads((bundle.path / MANIFEST).read_text())
    section = reported_fidelity(result)
    raw.setdefault("metrics", {})["fidelity_reported"] = section
    write_raw_manifest(bundle.path, raw)
    Bundle.load(bundle.path, verify=True)
    return section


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m export.record_nll", description=__doc__.split("\n\n")[1])
    parser.add_argument("bundle")
    parser.add_argument("results", nargs="*", metavar="PRECISION=RESULT.json",
                        help="e.g. fp32=docs/measurements/nll_default_fp32.json")
    parser.add_argument("--split", default=None, choices=("paper", "small"),
                        help="the split the results were computed on, when the JSON does not say")
    parser.add_argument("--fidelity", default=None, metavar="F.json", help="a train.fidelity --json result to record")
    args = parser.parse_args(argv)
    if not args.results and not args.fidelity:
        parser.error("expected PRECISION=RESULT.json or --fidelity F.json")
    try:
        pairs = []
        for item in args.results:
            precision, sep, path = item.partition("=")
            if not sep:
                raise ValueError(f"{item!r}: expected PRECISION=RESULT.json")
            pairs.append((precision, json.loads(Path(path).read_text())))
        section = {}
        if pairs:
            section["nll_reported"] = record(args.bundle, pairs, args.split)
        if args.fidelity:
            section["fidelity_reported"] = record_fidelity(args.bundle, json.loads(Path(args.fidelity).read_text()))
    except (VCEError, ValueError, KeyError, OSError) as err:
        print(f"record_nll: error: {err}", file=sys.stderr)
        return 1
    print(json.dumps(section, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
