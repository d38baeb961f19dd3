"""python -m fuzz TARGET [libFuzzer flags], e.g.

    python -m fuzz manifest -atheris_runs=100000 -timeout=10 -rss_limit_mb=2048

Runs one target of fuzz/targets.py under atheris, seeded from tests/fuzz_corpus/TARGET (copied
to a scratch folder, so new inputs never land in the repository unless you pass a folder).
libFuzzer stops at the first input that escapes with anything but a VCEError, hangs past
-timeout or passes -rss_limit_mb, and writes it as crash-*/timeout-*/oom-*; a run that ends
with "Done N in S second(s)" had zero such inputs. Add a finding to tests/fuzz_corpus/TARGET/ once fixed.
"""
from __future__ import annotations

import shutil
import sys
import tempfile


def main(argv: list[str]) -> int:
    try:
        import atheris
    except ImportError:
        print("python -m fuzz: error: expected atheris (pip install atheris)", file=sys.stderr)
        return 1
    with atheris.instrument_imports(include=["vce_deploy", "fuzz"]):
        from fuzz.targets import CORPUS, TARGETS
    if len(argv) < 2 or argv[1] not in TARGETS:
        print(f"usage: python -m fuzz TARGET [libFuzzer flags]; TARGET one of {sorted(TARGETS)}", file=sys.stderr)
        return 2
    name, flags = argv[1], argv[2:]
    target = TARGETS[name]
    folders = [f for f in flags if not f.startswith("-")]
    if not folders:  # seed from the committed corpus without writing into it
        scratch = tempfile.mkdtemp(prefix=f"vce-fuzz-{name}-")
        if (CORPUS / name).is_dir():
            shutil.copytree(CORPUS / name, scratch, dirs_exist_ok=True)
        flags.append(scratch)
    atheris.Setup([argv[0], *flags], target)
    atheris.Fuzz()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
