"""The README's demo: one never-seen glyph (a katakana character, a test alphabet of the small split)
and its 16 variations from the shipped bundle, the same conversion scripts/demo.sh runs.

    python scripts/demo_figure.py                      # regenerate docs/figures/demo_grid.png
    python scripts/demo_figure.py --glyph GLYPH.png    # only extract the demo glyph (demo.sh)
Deterministic: seed 0, the onnxruntime backend at fp32 (tests/test_demo_figure.py keeps the
committed figure equal to what the shipped bundle gives).
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # this tree's vce_deploy, not whichever one the venv has installed
ZIP = ROOT.parent / "shared" / "data" / "omniglot" / "images_background_small2.zip"
MEMBER = "images_background_small2/Japanese_(katakana)/character04/0599_01.png"
FIGURE = ROOT / "docs" / "figures" / "demo_grid.png"
CONVERT = ["-n", "16", "--seed", "0", "--backend", "onnxruntime", "--precision", "fp32"]


def extract_glyph(path: Path, zip_path: Path = ZIP) -> Path:
    with zipfile.ZipFile(zip_path) as archive:
        path.write_bytes(archive.read(MEMBER))
    return path


def render(out: Path, zip_path: Path = ZIP) -> int:
    """Write the demo grid to `out` with `vce convert`; its exit status."""
    from vce_deploy.cli import main as vce

    with tempfile.TemporaryDirectory() as work:
        glyph = extract_glyph(Path(work) / "glyph.png", zip_path)
        return vce(["convert", str(glyph), *CONVERT, "-o", str(out)])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--glyph", type=Path, default=None, help="only write the demo glyph here")
    parser.add_argument("--out", type=Path, default=FIGURE, help=f"grid to write (default {FIGURE.relative_to(ROOT)})")
    args = parser.parse_args(argv)
    if args.glyph is not None:
        extract_glyph(args.glyph)
        return 0
    return render(args.out)


if __name__ == "__main__":
    sys.exit(main())
