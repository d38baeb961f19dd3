"""The `vce` command: convert, inspect, verify, bench.

Exit codes: 0 ok, 1 error (a one-line message on stderr), 2 bad usage (argparse).
"""
from __future__ import annotations

import argparse
import json
import secrets
import sys
import time
from typing import Sequence

import numpy as np

from .errors import VCEError
from .tolerances import TOLERANCES

# Largest |ONNX - checkpoint| each precision may show on the same inputs: the export's own


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

    verify = commands.add_parser("verify", help="check hashes, and parity against the checkpoint when it is there")
    verify.add_argument("bundle")
    verify.add_argument("--batch", type=int, default=8, help="inputs compared per model (default 8)")

    bench = commands.add_parser("bench", help="the latency benchmark (bench/latency.py)")
    bench.add_argument("args", nargs=argparse.REMAINDER, help="passed to bench/latency.py")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    try:
        # bench's own options belong to bench/latency.py, so they pass through unparsed
        args, passthrough = parser.parse_known_args(argv)
        if args.command == "bench":
            args.args = [*passthrough, *args.args]
        elif passthrough:
            parser.error(f"unrecognized arguments: {' '.join(passthrough)}")
    except SystemExit as stop:  # argparse: 2 for bad usage, 0 after --help
        return int(stop.code or 0)
    handlers = {"convert": cmd_convert, "inspect": cmd_inspect, "verify": cmd_verify, "bench": cmd_bench}
    try:
        return handlers[args.command](args)
    except (VCEError, OSError) as err:  # OSError: an output that cannot be written, a full disk
        print(f"vce {args.command}: error: {err}", file=sys.stderr)
        return 1


def cmd_convert(args: argparse.Namespace) -> int:
    from .converter import Converter, save_conversions

    seed = args.seed if args.seed is not None else secrets.randbelow(2**31)
    conv = Converter.load(args.bundle, backend=args.backend, precision=args.precision, device=args.device,
                          max_batch=args.max_batch, threads=args.threads)
    start = time.perf_counter()
    samples = conv.convert(args.images, args.n, seed=seed, temperature=args.temperature)
    seconds = time.perf_counter() - start
    path = save_conversions(args.output, samples, None if args.no_condition else args.images)
    print(f"wrote {path}: {samples.shape[0]} glyphs x {args.n} variations, seed {seed}, "
          f"{conv.backend.name} on {conv.backend.device} at {conv.precision}, convert {seconds * 1000:.1f} ms")
    conv.close()
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
    print("engines:" if engines else "engines: none (build them with `python -m export.tensorrt BUNDLE ...`)")
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
    from .backends import BACKENDS
    from .bundle import Bundle
    from .converter import Converter

    if args.batch < 1:
        print(f"vce verify: error: --batch: expected an integer >= 1, got {args.batch}", file=sys.stderr)
        return 2
    bundle = Bundle.load(args.bundle, verify=True)  # raises BundleError on a missing or changed file
    print(f"hashes: {len(bundle.manifest.files)} files match the manifest")
    problem = BACKENDS["torch"].unavailable(bundle, "fp32", "cpu")
    if problem is not None:
        print(f"parity: skipped ({problem})")
        return 0
    reference = Converter.load(bundle.path, backend="torch", device="cpu")
    inputs = _parity_inputs(args.batch, bundle.manifest.latent_dim, bundle.manifest.image_size)
    expected = _outputs(reference, inputs)
    failed = False
    precisions = sorted({e.precision for e in bundle.entries(format="onnx")})
    for precision in precisions:
        conv = Converter.load(bundle.path, backend="onnxruntime", precision=precision, device="cpu")
        got = _outputs(conv, inputs)
        diffs = {name: float(np.max(np.abs(got[name] - expected[name]))) for name in expected}
        tolerance = TOLERANCES[precision]  # the exporter's own
        within = all(np.all(np.abs(got[name] - expected[name]) <= tolerance.allowed(expected[name]))
                     for name in expected)
        verdict = "ok" if within else "FAILED"
        failed |= not within
        limit = f" (tolerance {tolerance.atol:g} + {tolerance.rtol:g}*|torch|)"
        print(f"parity {precision}: max |onnxruntime - torch| "
              + ", ".join(f"{name} {value:.2e}" for name, value in diffs.items()) + f"{limit}: {verdict}")
    engines = bundle.entries(format="tensorrt")
    if engines:
        print(f"engines: {len(engines)} listed; hashes checked, outputs not compared here")
    return 1 if failed else 0


def _parity_inputs(batch: int, latent_dim: int, size: int) -> dict[str, np.ndarray]:
    """Fixed, seeded inputs: binary glyph-like images and prior latents."""
    rng = np.random.default_rng(0)
    images = (rng.random((2, batch, 1, size, size)) < 0.2).astype(np.float32)
    return {"x": images[0], "q": images[1], "z": rng.standard_normal((batch, latent_dim), dtype=np.float32)}


def _outputs(conv, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    mu, logvar = conv.run_encoder(inputs["x"], inputs["q"])
    return {"mu": mu, "logvar": logvar, "y": conv.run_convertor(inputs["z"], inputs["q"])}


def cmd_bench(args: argparse.Namespace) -> int:
    try:
        from bench.latency import main as bench_main
    except ImportError as err:
        print("vce bench: error: the benchmark is bench/latency.py in the vce-deploy source tree and could not "
              f"be imported ({err}); run it from the repository root: `python -m bench.latency`", file=sys.stderr)
        return 1
    result = bench_main(list(args.args))
    return int(result or 0)


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
