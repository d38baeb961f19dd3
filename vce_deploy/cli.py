"""The `vce` command: convert, inspect, verify, sign, build, serve, export-triton, bench. (The benchmark
is `python -m bench`, in the source tree: it is not part of the runtime; `vce bench` runs it there.)

Exit codes: 0 ok, 1 error (a one-line message on stderr), 2 bad usage (argparse).
"""
from __future__ import annotations

import argparse
import json
import secrets
import sys
import time
from pathlib import Path
from typing import Sequence

from .errors import VCEError
from .grid import FORMATS, WRAP_CELLS
from .inputs import DEFAULT_N, DEFAULT_TEMPERATURE
from .metrics import describe_mapping, describe_metrics


def build_parser() -> argparse.ArgumentParser:
    from .backends import BACKENDS
    from .contract import PRECISIONS, RUN_PRECISIONS

    parser = argparse.ArgumentParser(prog="vce", description="One-shot glyph conversion with a VCE bundle.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    convert = commands.add_parser("convert", help="write n variations of each glyph as one grid image")
    convert.add_argument("images", nargs="+", metavar="IMAGE", help="glyph image files (any size, either polarity)")
    convert.add_argument("-n", type=int, default=DEFAULT_N, help=f"variations per glyph (default {DEFAULT_N})")
    convert.add_argument("--seed", type=int, default=None, help="noise seed (default: a fresh one, printed)")
    convert.add_argument("--temperature", type=float, default=DEFAULT_TEMPERATURE,
                         help=f"noise scale (default {DEFAULT_TEMPERATURE}; 1.0 samples the prior)")
    convert.add_argument("-o", "--output", default=None,
                         help=f"image to write, format from its extension ({', '.join(FORMATS)}); its directory must "
                              f"exist; rows wrap every {WRAP_CELLS} cells (default: FIRST_IMAGE.vce.png beside the "
                              f"first image, or .vce-2.png, ... when taken: a default never overwrites)")
    convert.add_argument("--bundle", default=None, help="bundle directory (default: the shipped bundle)")
    convert.add_argument("--backend", default="auto", choices=("auto", *BACKENDS))
    convert.add_argument("--precision", default="fp32", choices=("auto", *RUN_PRECISIONS))
    convert.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: the backend's best)")
    convert.add_argument("--max-batch", type=int, default=None, help="rows per engine call")
    convert.add_argument("--threads", type=int, default=None, help="intra-op threads (default: physical cores)")
    convert.add_argument("--no-condition", action="store_true", help="leave out the condition column")
    _add_trust_options(convert)

    inspect = commands.add_parser("inspect", help="files, shapes, precisions, metrics and engines of a bundle")
    inspect.add_argument("bundle", nargs="?", default=None, help="bundle directory (default: the shipped bundle)")
    inspect.add_argument("--json", action="store_true", help="print the manifest as JSON")
    inspect.add_argument("--allow-unsealed", action="store_true", help="show a format-1 manifest without its seal")

    verify = commands.add_parser("verify", help="check hashes, golden outputs on every backend here, and parity "
                                                      "against the checkpoint when torch is there")
    verify.add_argument("bundle", nargs="?", default=None, help="bundle directory (default: the shipped bundle)")
    verify.add_argument("--batch", type=int, default=8, help="inputs compared per model (default 8)")
    verify.add_argument("--split", default="small", choices=("small", "paper"),
                        help="Omniglot split whose test glyphs are compared on (default small)")
    verify.add_argument("--data-dir", default=None, help="folder with the Omniglot zips")
    verify.add_argument("--signer", action="append", default=[], metavar="PUBKEY",
                        help="PEM public key that must have signed the bundle (repeat for several); every file hashed")
    verify.add_argument("--ca", action="append", default=[], metavar="CERT",
                        help="PEM certificate chain a certificate signature must lead to (repeatable)")
    _add_allow_unsealed(verify)

    sign = commands.add_parser("sign", help="sign every file of a bundle (OpenSSF model-signing format)")
    _add_sign_options(sign)

    _add_build_parser(commands)

    add_serve_parser(commands, BACKENDS, ("auto", *RUN_PRECISIONS))
    add_export_triton_parser(commands, PRECISIONS)
    add_bench_parser(commands)
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
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["bench"]:  # every later argument is python -m bench's, --help included
        try:
            return run_bench(argv[1:])
        except VCEError as err:
            print(f"vce bench: error: {err}", file=sys.stderr)
            return 1
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as stop:  # argparse: 2 for bad usage, 0 after --help
        return int(stop.code or 0)
    handlers = {"convert": cmd_convert, "inspect": cmd_inspect, "verify": cmd_verify, "build": cmd_build,
                "sign": cmd_sign, "serve": cmd_serve, "export-triton": cmd_export_triton}
    try:
        return handlers[args.command](args)
    except (VCEError, OSError) as err:  # OSError: an output that cannot be written, a full disk
        print(f"vce {args.command}: error: {err}", file=sys.stderr)
        return 1


def cmd_convert(args: argparse.Namespace) -> int:
    from .converter import Converter, save_conversions
    from .grid import check_grid_size, check_output_path
    from .preprocess import IMAGE_SIZE

    if args.output is None:
        args.output = default_output(args.images[0])
    # refused before the model loads: a wrong extension, a missing directory, a grid too big to write
    check_output_path(args.output, make_parents=False)
    if args.n >= 1:  # n < 1 is refused by convert, with its own message
        check_grid_size(len(args.images), args.n + (0 if args.no_condition else 1), IMAGE_SIZE, wrap=WRAP_CELLS)
    seed = args.seed if args.seed is not None else secrets.randbelow(2**31)
    converter = Converter.load(args.bundle, backend=args.backend, precision=args.precision, device=args.device,
                               max_batch=args.max_batch, threads=args.threads, allow_unsealed=args.allow_unsealed,
                               trusted_keys=args.trusted_key or None, device_built=args.device_built)
    start = time.perf_counter()
    samples = converter.convert(args.images, args.n, seed=seed, temperature=args.temperature)
    seconds = time.perf_counter() - start
    path = save_conversions(args.output, samples, None if args.no_condition else args.images)
    glyphs, variations = _count(samples.shape[0], "glyph"), _count(args.n, "variation")
    print(f"wrote {path}: {glyphs} x {variations}, seed {seed}, "
          f"{converter.backend_info.name} on {converter.backend_info.device} at {converter.precision}, "
          f"convert {seconds * 1000:.1f} ms")
    converter.close()
    return 0


def default_output(first_image: str) -> str:
    """`vce convert` without -o: glyph.png -> glyph.vce.png beside it; if that exists, glyph.vce-2.png,
    and so on: a name the user did not choose never overwrites a file."""
    from pathlib import Path

    source = Path(first_image)
    stem = source.name[: -len(source.suffix)] if source.suffix else source.name
    candidate, number = source.with_name(f"{stem}.vce.png"), 2
    while candidate.exists():
        candidate, number = source.with_name(f"{stem}.vce-{number}.png"), number + 1
    return str(candidate)


def cmd_inspect(args: argparse.Namespace) -> int:
    from .bundle import Bundle

    bundle = Bundle.load(args.bundle, verify=False, allow_unsealed=args.allow_unsealed)
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
    for line in describe_metrics(m.metrics):
        print(f"  {line}")
    if m.exporter:
        print("\n".join(describe_mapping("exporter", m.exporter)))
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    from .bundle import Bundle

    if args.batch < 1:
        print(f"vce verify: error: --batch: expected an integer >= 1, got {args.batch}", file=sys.stderr)
        return 2
    bundle = Bundle.load(args.bundle, verify=True, allow_unsealed=args.allow_unsealed)  # every file hashed
    print(f"hashes: {len(bundle.manifest.files)} files match the manifest")
    if args.signer or args.ca:
        _verify_signature(args)
    golden_failed = _verify_golden(bundle, args.allow_unsealed)
    parity_failed = _verify_parity(bundle, args)
    if golden_failed is None and parity_failed is None:
        print("vce verify: error: no outputs were checked: the bundle has no golden outputs (re-export it, or "
              "`python -m export.golden BUNDLE`) or none ran here, and the torch parity check could not run",
              file=sys.stderr)
        return 1
    return 1 if golden_failed or parity_failed else 0


def _verify_golden(bundle, allow_unsealed: bool = False) -> bool | None:
    """Every precision and engine runnable here against the bundle's golden outputs (no torch
    needed): True if any failed, None if nothing was compared (no golden set, or nothing ran
    here). vce_deploy/golden.py."""
    from .golden import load_golden, verify_golden

    golden = load_golden(bundle)
    if golden is None:
        print("golden: none in this bundle (exported before golden outputs existed)")
        return None
    results = verify_golden(bundle, golden, allow_unsealed=allow_unsealed)
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
    report = check_parity(bundle.path, glyphs, batches=(args.batch,), allow_unsealed=args.allow_unsealed)
    for check in report.checks:
        print(check.summary())
    engines = bundle.entries(format="tensorrt")
    if engines:
        print(f"engines: {len(engines)} listed; hashes checked, outputs compared where a backend ran them above")
    return not report.ok


def _add_trust_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--trusted-key", action="append", default=[], metavar="PUBKEY",
                        help="refuse the bundle unless one of these PEM public keys signed it (repeatable)")
    parser.add_argument("--device-built", action="append", default=[], metavar="GLOB",
                        help="unsigned files allowed beside a signed bundle's own, e.g. 'engines/*'")
    _add_allow_unsealed(parser)


def _add_allow_unsealed(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--allow-unsealed", action="store_true",
                        help="accept a format-1 manifest without its seal (nothing detects an edited manifest)")


def _add_sign_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("bundle")
    parser.add_argument("--key", required=True, help="PEM elliptic-curve private key (P-256, P-384 or P-521)")
    parser.add_argument("--password-env", default=None, metavar="VAR",
                        help="environment variable holding the key's password (never on the command line)")
    parser.add_argument("--certificate", default=None, help="PEM signing certificate for --key (certificate mode)")
    parser.add_argument("--chain", action="append", default=[], help="PEM intermediate certificates (repeatable)")


def cmd_sign(args: argparse.Namespace) -> int:
    import os

    from .bundle_signing import sign_bundle

    password = None
    if args.password_env is not None:
        password = os.environ.get(args.password_env)
        if password is None:
            print(f"vce sign: error: --password-env {args.password_env}: expected that environment variable to be "
                  "set, got nothing", file=sys.stderr)
            return 1
    path = sign_bundle(args.bundle, args.key, password=password, certificate=args.certificate, chain=args.chain)
    print(f"signed: {path} covers every file of {args.bundle}")
    return 0


def _verify_signature(args: argparse.Namespace) -> None:
    from .bundle_signing import verify_bundle_signature

    who = verify_bundle_signature(args.bundle, args.signer, args.ca)
    print(f"signature: valid, by {who}; every file hashed against it")


def _count(count: int, noun: str) -> str:
    return f"{count} {noun}" if count == 1 else f"{count} {noun}s"


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


def add_serve_parser(commands, backends, precisions) -> None:
    serve = commands.add_parser("serve", help="the HTTP API, metrics and drawing page (docs/serving.md)")
    serve.add_argument("--bundle", default=None, help="bundle directory (default: the shipped bundle)")
    serve.add_argument("--backend", default="auto", choices=("auto", *backends))
    serve.add_argument("--precision", default="fp32", choices=precisions)
    serve.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: the backend's best)")
    serve.add_argument("--threads", type=int, default=None, help="intra-op threads (default: physical cores)")
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--max-batch", type=int, default=64, help="engine rows per merged batch; 0: no batching")
    serve.add_argument("--max-wait-ms", type=float, default=5.0, help="how long a batch waits to fill (default 5)")
    serve.add_argument("--max-queue", type=int, default=1024, help="queued requests before 503 (default 1024)")
    serve.add_argument("--max-n", type=int, default=64, help="largest n per request (default 64)")
    serve.add_argument("--max-body-bytes", type=int, default=4 << 20, help="largest request body (default 4 MiB)")
    serve.add_argument("--workers", type=int, default=1,
                       help="worker processes, each with its own Converter and --threads split between them")
    serve.add_argument("--max-connections", type=int, default=None,
                       help="requests in flight before a 503 with Retry-After (default: no limit but --max-queue)")
    serve.add_argument("--token-file", default=None,
                       help="a file holding a bearer token every route but the health probes needs (SECURITY.md)")
    serve.add_argument("--cors-origin", action="append", default=[], metavar="ORIGIN",
                       help="a browser origin allowed to call the API (repeatable; default: none)")
    serve.add_argument("--access-log", action="store_true", help="one JSON line per request on stderr")
    serve.add_argument("--ray", action="store_true", help="serve on Ray Serve instead (vce_deploy/serve/ray_app.py)")
    serve.add_argument("--ray-address", default=None, help="with --ray: an existing cluster (default: start one)")
    serve.add_argument("--replicas", type=int, default=1, help="with --ray: replicas of the deployment")
    serve.add_argument("--cpus-per-replica", type=float, default=1.0, help="with --ray: CPUs each replica reserves")


def read_token(path: str) -> str:
    """The bearer token from its file (one line; surrounding whitespace is not part of it)."""
    from .errors import InputError

    try:
        token = open(path, encoding="utf-8").read().strip()
    except OSError as err:
        raise InputError(f"--token-file: expected a readable file, got {path!r} ({err.strerror})") from None
    if len(token) < 16 or any(c.isspace() for c in token):
        raise InputError(f"--token-file: expected one token of at least 16 characters without spaces in {path!r}")
    return token


def cmd_serve(args: argparse.Namespace) -> int:
    from .serve import ServeSettings, check_extra

    if (args.max_batch < 0 or args.max_n < 1 or args.max_queue < 1 or not 0 <= args.max_wait_ms <= 10_000
            or args.workers < 1 or (args.max_connections is not None and args.max_connections < 1)):
        print("vce serve: error: expected --max-batch >= 0, --max-n >= 1, --max-queue >= 1, --workers >= 1, "
              "--max-connections >= 1 and --max-wait-ms in [0, 10000]", file=sys.stderr)
        return 2
    check_extra()  # before anything is loaded or announced (issue 22)
    settings = ServeSettings(max_batch=args.max_batch, max_wait_ms=args.max_wait_ms, max_queue=args.max_queue,
                             max_n=args.max_n, max_body_bytes=args.max_body_bytes,
                             token=read_token(args.token_file) if args.token_file else None,
                             cors_origins=tuple(args.cors_origin), access_log=args.access_log,
                             max_connections=args.max_connections)
    load = {"path": args.bundle, "backend": args.backend, "precision": args.precision, "device": args.device,
            "threads": args.threads}
    if args.ray:
        from .serve.ray_app import run_ray

        ray_load = {k: v for k, v in load.items() if k != "path"}
        run_ray(args.bundle, ray_load, settings, host=args.host, port=args.port, replicas=args.replicas,
                cpus_per_replica=args.cpus_per_replica, address=args.ray_address)
        return 0
    from .backends.base import physical_cores
    from .converter import Converter
    from .serve import serve

    batching = "off" if args.max_batch == 0 else f"max {args.max_batch} rows, wait {args.max_wait_ms:g} ms"
    if args.workers > 1:  # each worker loads its own Converter with its share of the threads
        load["threads"] = max(1, (args.threads or physical_cores()) // args.workers)
        print(f"vce serve: http://{args.host}:{args.port}/ ({args.workers} workers, {load['threads']} threads each; "
              f"batching {batching})", flush=True)
        serve(None, settings, host=args.host, port=args.port, workers=args.workers, load=load)
        return 0
    converter = Converter.load(**load)
    loaded = converter.backend_info
    print(f"vce serve: http://{args.host}:{args.port}/ ({loaded.name} on {loaded.device} at "
          f"{converter.precision}; batching {batching})", flush=True)
    serve(converter, settings, host=args.host, port=args.port)
    converter.close()
    return 0


def add_bench_parser(commands) -> None:
    bench = commands.add_parser("bench", help="the latency benchmark (source tree only: python -m bench --help)",
                                add_help=False)
    bench.add_argument("bench_args", nargs=argparse.REMAINDER, help="python -m bench's arguments")


# the source tree's benchmark, beside this package in a clone or an editable install; a wheel
# ships the runtime only. Run as a script, never imported: the runtime imports nothing of bench/.
BENCH_SCRIPT = Path(__file__).resolve().parents[1] / "bench" / "latency.py"


def run_bench(bench_args: list[str]) -> int:
    """`python bench/latency.py ARGS` where the source tree is here, else an error saying where it runs."""
    if not BENCH_SCRIPT.is_file():
        raise VCEError("vce bench runs the benchmark of the source tree (bench/), which the wheel does not ship: "
                       "in a clone with the bench extra (pip install -e '.[bench]'), run `vce bench`, "
                       "`python bench/latency.py` or `python -m bench`")
    import subprocess

    return subprocess.call([sys.executable, str(BENCH_SCRIPT), *bench_args])


def add_export_triton_parser(commands, precisions) -> None:
    triton = commands.add_parser("export-triton", help="a Triton Inference Server model repository from a bundle")
    triton.add_argument("bundle", help="bundle directory ('default': the shipped bundle)")
    triton.add_argument("out", help="model repository directory to write (must not exist)")
    triton.add_argument("--precision", default="fp32", choices=precisions)
    triton.add_argument("--max-batch", type=int, default=64, help="Triton max_batch_size (default 64)")
    triton.add_argument("--max-queue-delay-us", type=int, default=5000, help="dynamic batching delay (default 5000)")


def cmd_export_triton(args: argparse.Namespace) -> int:
    from .triton import export_triton

    bundle = None if args.bundle == "default" else args.bundle
    out = export_triton(bundle, args.out, precision=args.precision, max_batch=args.max_batch,
                        max_queue_delay_us=args.max_queue_delay_us)
    print(f"wrote the Triton model repository {out} (docs/serving.md, \"Triton\")")
    return 0
