"""The `vce` command: convert, inspect, verify, build. (The benchmark is `python -m bench`, in
the source tree: it is not part of the runtime.)

Exit codes: 0 ok, 1 error (a one-line message on stderr), 2 bad usage (argparse).
"""
from __future__ import annotations

import argparse
import json
import secrets
import sys
import time
from typing import Sequence

from .errors import VCEError


def build_parser() -> argparse.ArgumentParser:
    from .backends import BACKENDS
    from .contract import RUN_PRECISIONS

    parser = argparse.ArgumentParser(prog="vce", description="One-shot glyph conversion with a VCE bundle.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    convert = commands.add_parser("convert", help="write n variations of each glyph as one PNG grid")
    convert.add_argument("images", nargs="+", metavar="IMAGE", help="glyph image files (any size, either polarity)")
    convert.add_argument("-n", type=int, default=16, help="variations per glyph (default 16)")
    convert.add_argument("--seed", type=int, default=None, help="noise seed (default: a fresh one, printed)")
    convert.add_argument("--temperature", type=float, default=1.0, help="noise scale (default 1.0)")
    convert.add_argument("-o", "--output", required=True, help="PNG to write")
    convert.add_argument("--bundle", default=None, help="bundle directory (default: the shipped bundle)")
    convert.add_argument("--backend", default="auto", choices=("auto", *BACKENDS))
    convert.add_argument("--precision", default="fp32", choices=("auto", *RUN_PRECISIONS))
    convert.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: the backend's best)")
    convert.add_argument("--max-batch", type=int, default=None, help="rows per engine call")
    convert.add_argument("--threads", type=int, default=None, help="intra-op threads (default: physical cores)")
    convert.add_argument("--no-condition", action="store_true", help="leave out the condition column")

    inspect = commands.add_parser("inspect", help="files, shapes, precisions, metrics and engines of a bundle")
    inspect.add_argument("bundle")
    inspect.add_argument("--json", action="store_true", help="print the manifest as JSON")

    verify = commands.add_parser("verify", help="check hashes, golden outputs on every backend here, and parity "
                                                      "against the checkpoint when torch is there")
    verify.add_argument("bundle", nargs="?", default=None, help="bundle directory (default: the shipped bundle)")
    verify.add_argument("--batch", type=int, default=8, help="inputs compared per model (default 8)")
    verify.add_argument("--split", default="small", choices=("small", "paper"),
                        help="Omniglot split whose test glyphs are compared on (default small)")
    verify.add_argument("--data-dir", default=None, help="folder with the Omniglot zips")

    _add_build_parser(commands)
    return parser


def _add_build_parser(commands) -> None:
    from .engine_build import add_arguments

    build = commands.add_parser("build", help="build TensorRT engines on this GPU (needs tensorrt, never torch)",
                                description="Build TensorRT engines from one precision of a bundle, on and for this "
                                            "GPU and TensorRT version, into the engine cache (docs/edge.md).")
    add_arguments(build)


def cmd_build(args: argparse.Namespace) -> int:
    from .engine_build import run

    return run(args)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as stop:  # argparse: 2 for bad usage, 0 after --help
        return int(stop.code or 0)
    handlers = {"convert": cmd_convert, "inspect": cmd_inspect, "verify": cmd_verify, "build": cmd_build}
    try:
        return handlers[args.command](args)
    except (VCEError, OSError) as err:  # OSError: an output that cannot be written, a full disk
        print(f"vce {args.command}: error: {err}", file=sys.stderr)
        return 1


def cmd_convert(args: argparse.Namespace) -> int:
    from .converter import Converter, save_conversions

    seed = args.seed if args.seed is not None else secrets.randbelow(2**31)
    converter = Converter.load(args.bundle, backend=args.backend, precision=args.precision, device=args.device,
                          max_batch=args.max_batch, threads=args.threads)
    start = time.perf_counter()
    samples = converter.convert(args.images, args.n, seed=seed, temperature=args.temperature)
    seconds = time.perf_counter() - start
    path = save_conversions(args.output, samples, None if args.no_condition else args.images)
    print(f"wrote {path}: {samples.shape[0]} glyphs x {args.n} variations, seed {seed}, "
          f"{converter.backend_info.name} on {converter.backend_info.device} at {converter.precision}, convert {seconds * 1000:.1f} ms")
    converter.close()
    return 0


def cmd_inspect(args: argparse.Namespace) -> int:
    from .bundle import Bundle

    bundle = Bundle.load(args.bundle, verify=False)
    m = bundle.manifest
    if args.json:
        print(json.dumps(m.to_dict(), indent=2))
        return 0
    print(f"bundle {bundle.path} (format {m.format_version}; hashes not checked here: run `vce verify`)")
    print(f"  image {m.image_size}x{m.image_size}, latent {m.latent_dim} laid out {m.latent_layout or '?'}, "
          f"trained {m.step} steps")
    if m.model_config:
        print(f"  model {json.dumps(m.model_config, sort_keys=True)}")
    print("files:")
    for path, entry in sorted(m.files.items()):
        size = _size(bundle.file(path))
        print(f"  {path:<32} {entry.role:<16} {entry.format:<11} {entry.precision:<5} {size:>9}")
        if entry.inputs or entry.outputs:
            print(f"      {_specs(entry.inputs)} -> {_specs(entry.outputs)}")
    engines = [e for e in m.files.values() if e.engine is not None]
    print("engines:" if engines else "engines: none in the bundle (`vce build BUNDLE` builds them into the engine cache)")
    for entry in engines:
        info = entry.engine
        print(f"  {entry.path}: TensorRT {info.tensorrt_version}, compute capability {info.compute_capability}"
              f"{' (' + info.gpu_name + ')' if info.gpu_name else ''}, batch min/opt/max "
              f"{info.min_batch}/{info.opt_batch}/{info.max_batch}")
    print("metrics:" if m.metrics else "metrics: none recorded")
    for key, value in sorted(m.metrics.items()):
        print(f"  {key}: {json.dumps(value, sort_keys=True)}")
    if m.exporter:
        print(f"exporter: {json.dumps(m.exporter, sort_keys=True)}")
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    from .bundle import Bundle

    if args.batch < 1:
        print(f"vce verify: error: --batch: expected an integer >= 1, got {args.batch}", file=sys.stderr)
        return 2
    bundle = Bundle.load(args.bundle, verify=True)  # raises BundleError on a missing or changed file
    print(f"hashes: {len(bundle.manifest.files)} files match the manifest")
    golden_failed = _verify_golden(bundle)
    parity_failed = _verify_parity(bundle, args)
    if golden_failed is None and parity_failed is None:
        print("vce verify: error: no outputs were checked: the bundle has no golden outputs (re-export it, or "
              "`python -m export.golden BUNDLE`) or none ran here, and the torch parity check could not run",
              file=sys.stderr)
        return 1
    return 1 if golden_failed or parity_failed else 0


def _verify_golden(bundle) -> bool | None:
    """Every precision and engine runnable here against the bundle's golden outputs (no torch
    needed): True if any failed, None if nothing was compared (no golden set, or nothing ran
    here). vce_deploy/golden.py."""
    from .golden import load_golden, verify_golden

    golden = load_golden(bundle)
    if golden is None:
        print("golden: none in this bundle (exported before golden outputs existed)")
        return None
    results = verify_golden(bundle, golden)
    for result in results:
        print(result.line())
    ran = sum(r.status != "skipped" for r in results)
    print(f"golden: {golden.count} real glyph pairs; {ran} of {len(results)} backend/precision pairs ran here")
    return any(r.status == "FAILED" for r in results) if ran else None


def _verify_parity(bundle, args: argparse.Namespace) -> bool | None:
    """Every backend against the torch backend on the checkpoint (vce_deploy/verify.py): True
    if any mismatch, None if it could not run here (no torch, no checkpoint, no glyphs)."""
    from .backends import BACKENDS
    from .omniglot import load_split
    from .verify import REFERENCE, check_parity

    problem = BACKENDS[REFERENCE].unavailable(bundle, "fp32", "cpu")
    if problem is not None:
        print(f"parity against the checkpoint: skipped ({problem})")
        return None
    try:
        glyphs = load_split(args.split, "test", args.data_dir).images  # real glyphs, never trained on
    except (FileNotFoundError, ValueError) as err:
        print(f"parity: skipped (no Omniglot glyphs to compare on: {err}; pass --data-dir)")
        return None
    report = check_parity(bundle.path, glyphs, batches=(args.batch,))
    for check in report.checks:
        print(check.summary())
    engines = bundle.entries(format="tensorrt")
    if engines:
        print(f"engines: {len(engines)} listed; hashes checked, outputs compared where a backend ran them above")
    return not report.ok


def _specs(specs) -> str:
    return ", ".join(f"{s.name}[{','.join(map(str, s.shape))}] {s.dtype}" for s in specs) or "-"


def _size(path) -> str:
    try:
        size = path.stat().st_size
    except OSError:
        return "missing"
    for unit in ("B", "KB", "MB", "GB"):
        if size < 1024 or unit == "GB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return str(size)
