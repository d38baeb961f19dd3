"""Load time of the default bundle with one precision, before and after issue 16 (docs/signing.md).

    python -m bench.load_time [--baseline REV] [--rounds 15] [--precision fp32] [--json FILE]

What is timed: `Converter.load(backend="onnxruntime", precision=P, device="cpu", threads=1)` of the
shipped default bundle, in a fresh Python process per measurement (the import of vce_deploy
is not included; the bundle's files are in the page cache after the first round, so this is
the warm-cache load, not an eMMC's cold read). Contenders, interleaved round by round so a
change of machine load hits all alike:
- baseline: the tree at REV (default: the commit this branch started from), extracted with
  `git archive` into a temporary directory, loading its own default bundle (format 1: every
  file hashed at load, then the two used ones hashed again as the backend reads them);
- this tree: only the two files the backend loads are hashed, once, as they are read;
- this tree, signed: the same bundle signed with a key made for the run and loaded with
  trusted_keys (signature verification added).
Each process also times the bundle checks alone, as its tree's Converter.load does them (the part
issue 16 changed). Each process loads LOADS_PER_PROCESS times: the first load (lazy imports included) and the median of
the later ones are reported separately. Prints medians, spreads (min..max), the difference to the
baseline paired by round, and the CPU model.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BASE_COMMIT = "8500f16"  # main when issue 16 started
LOADS_PER_PROCESS = 5
# one measurement: the process loads LOADS_PER_PROCESS times and prints the median seconds (the
# first load pays for lazy imports: onnxruntime, and cryptography when signed)
PROBE = """
import json, statistics, sys, time
from vce_deploy import Converter
bundle, precision, keys, loads = sys.argv[1] or None, sys.argv[2], json.loads(sys.argv[3]), int(sys.argv[4])
extra = {"trusted_keys": keys} if keys else {}
seconds = []
for _ in range(loads):
    start = time.perf_counter()
    Converter.load(bundle, backend="onnxruntime", precision=precision, device="cpu", threads=1, **extra)
    seconds.append(time.perf_counter() - start)
# the bundle checks alone, as each tree's Converter.load does them, without ONNX Runtime
from vce_deploy.bundle import Bundle
checks = []
for _ in range(loads):
    start = time.perf_counter()
    if hasattr(Bundle, "check_present"):  # this tree: check presence, hash the two used files as read
        loaded = Bundle.load(bundle, verify=False, **extra)
        loaded.check_present()
    else:  # the baseline: hash every file, then the two used ones again as read
        loaded = Bundle.load(bundle)
    for role in ("encoder", "convertor"):
        loaded.read_verified(loaded.model_entry(role, precision))
    checks.append(time.perf_counter() - start)
print(seconds[0], statistics.median(seconds[1:]), statistics.median(checks[1:]))
"""


# why the load-time signature check is written on cryptography rather than model-signing: what each
# costs to import in a fresh process (timed in the same rounds)
IMPORTS = {
    "model-signing (sign / full verify)": "import model_signing.signing, model_signing.verifying",
    "cryptography (trusted_keys check)": "from cryptography.hazmat.primitives import hashes, serialization\n"
                                         "from cryptography.hazmat.primitives.asymmetric import ec\n"
                                         "from cryptography.exceptions import InvalidSignature",
}


def import_seconds(statement: str) -> float:
    code = f"import time\nstart = time.perf_counter()\n{statement}\nprint(time.perf_counter() - start)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return float(out.stdout.strip().splitlines()[-1])


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def extract(rev: str, into: Path) -> Path:
    archive = into / "baseline.tar"
    with open(archive, "wb") as handle:
        subprocess.run(["git", "-C", str(ROOT), "archive", rev, "vce_deploy"], stdout=handle, check=True)
    with tarfile.open(archive) as tar:
        tar.extractall(into / "baseline", filter="data")
    return into / "baseline"


def signed_copy(into: Path) -> tuple[Path, Path]:
    """The default bundle signed with a key made for this run: (bundle, public key)."""
    sys.path.insert(0, str(ROOT))
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    from vce_deploy.bundle import DEFAULT_BUNDLE
    from vce_deploy.bundle_signing import sign_bundle

    key = ec.generate_private_key(ec.SECP256R1())
    private, public = into / "bench.key.pem", into / "bench.pub.pem"
    private.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                          serialization.NoEncryption()))
    public.write_bytes(key.public_key().public_bytes(serialization.Encoding.PEM,
                                                     serialization.PublicFormat.SubjectPublicKeyInfo))
    bundle = into / "signed"
    shutil.copytree(DEFAULT_BUNDLE, bundle)
    sign_bundle(bundle, private)
    return bundle, public


def measure(tree: Path, bundle: str, precision: str, keys: list[str]) -> tuple[float, float, float]:
    """(first load in a fresh process, median of the next ones, median of the bundle checks alone) in seconds."""
    env = dict(os.environ, PYTHONPATH=str(tree))
    out = subprocess.run([sys.executable, "-c", PROBE, bundle, precision, json.dumps(keys), str(LOADS_PER_PROCESS)],
                         env=env, capture_output=True, text=True, check=True, cwd=tree)
    first, repeat, checks = out.stdout.strip().splitlines()[-1].split()
    return float(first), float(repeat), float(checks)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.load_time", description=__doc__.splitlines()[0])
    parser.add_argument("--baseline", default=BASE_COMMIT, help=f"git revision to compare with (default {BASE_COMMIT})")
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--precision", default="fp32", choices=("fp32", "fp16", "int8"))
    parser.add_argument("--json", default=None, help="write the raw timings here")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as scratch:
        scratch = Path(scratch)
        baseline = extract(args.baseline, scratch)
        signed, public = signed_copy(scratch)
        contenders = {f"baseline {args.baseline}": (baseline, "", []),
                      "this tree": (ROOT, "", []),
                      "this tree, signed, trusted_keys": (ROOT, str(signed), [str(public)])}
        times: dict[str, list[tuple[float, float, float]]] = {name: [] for name in contenders}
        for name, (tree, bundle, keys) in contenders.items():  # warm-up: page cache, .pyc files
            measure(tree, bundle, args.precision, keys)
        imports: dict[str, list[float]] = {name: [] for name in IMPORTS}
        for _ in range(args.rounds):
            for name, (tree, bundle, keys) in contenders.items():
                times[name].append(measure(tree, bundle, args.precision, keys))
            for name, statement in IMPORTS.items():
                imports[name].append(import_seconds(statement))
    print(f"Converter.load(default bundle, onnxruntime, {args.precision}, cpu, threads=1), {args.rounds} interleaved "
          f"rounds of one fresh process each, CPU: {cpu_model()} ({os.cpu_count()} logical CPUs)")
    base = next(iter(times))
    for column, label in ((0, "first load in a process"), (1, f"later loads (median of {LOADS_PER_PROCESS - 1})"),
                          (2, "the bundle checks and reads alone (manifest, hashes, the two model files' bytes)")):
        print(f" {label}:")
        for name, values in times.items():
            ms = sorted(v[column] * 1000 for v in values)
            paired = sorted((v[column] - b[column]) * 1000 for v, b in zip(values, times[base]))
            vs = "" if name == base else (f"   minus baseline, paired by round: median {statistics.median(paired):+.1f} "
                                          f"ms ({paired[0]:+.1f}..{paired[-1]:+.1f})")
            print(f"  {name:<34} median {statistics.median(ms):7.1f} ms  spread {ms[0]:.1f}..{ms[-1]:.1f}{vs}")
    print(" import time in a fresh process:")
    for name, values in imports.items():
        ms = sorted(v * 1000 for v in values)
        print(f"  {name:<34} median {statistics.median(ms):7.1f} ms  spread {ms[0]:.1f}..{ms[-1]:.1f}")
    if args.json:
        Path(args.json).write_text(json.dumps({"cpu": cpu_model(), "precision": args.precision, "seconds": times,
                                               "imports": imports}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
