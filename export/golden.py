"""The bundle's golden set, written at export: real glyph pairs from the test alphabets, fixed
prior noise, and eager PyTorch fp32 outputs on them. The runtime's vce_deploy/golden.py
checks every precision and engine against it, without torch (`vce verify`).

    python -m export.golden BUNDLE [--data-dir DIR] [--split paper|small]   # add one to a bundle exported before goldens

Stored as golden.npz (numpy's zip of .npy arrays, read back with allow_pickle=False), listed
in the manifest with its sha256 like every other file.
"""
from __future__ import annotations

import argparse
import dataclasses
import io
import shutil
import sys
from pathlib import Path

import numpy as np

from vce_deploy.bundle import Bundle, FileEntry, file_entry, write_manifest
from vce_deploy.bundle_swap import atomic_directory
from vce_deploy.errors import VCEError
from vce_deploy.fsio import atomic_write_bytes
from vce_deploy.golden import GOLDEN_FILE, load_golden, verify_golden

GOLDEN_COUNT = 16  # glyph pairs: one batch, small enough for a device to check in seconds
GOLDEN_SEED = 0


def golden_inputs(test_images: np.ndarray, latent_dim: int, count: int = GOLDEN_COUNT,
                  seed: int = GOLDEN_SEED) -> dict[str, np.ndarray]:
    """count (x, q) pairs, drawings 0 and 1 of characters spread evenly over the test
    alphabets (never trained on), and count prior latents from a fixed seed."""
    characters = test_images.shape[0]
    rows = np.linspace(0, characters - 1, count).round().astype(int)
    x = np.ascontiguousarray(test_images[rows, 0][:, None], dtype=np.float32)  # (count, 1, S, S)
    q = np.ascontiguousarray(test_images[rows, 1][:, None], dtype=np.float32)
    z = np.random.default_rng(seed).standard_normal((count, latent_dim), dtype=np.float32)  # (count, D)
    return {"x": x, "q": q, "z": z}


def write_golden(stage: Path, reference, test_images: np.ndarray, latent_dim: int) -> FileEntry:
    """golden.npz in `stage` from `reference` (eager fp32: `Converter.from_torch(model)`); its entry."""
    arrays = golden_inputs(test_images, latent_dim)
    arrays["mu"], arrays["logvar"] = reference.run_encoder(arrays["x"], arrays["q"])
    arrays["y"] = reference.run_convertor(arrays["z"], arrays["q"])
    buffer = io.BytesIO()
    np.savez_compressed(buffer, **{name: np.ascontiguousarray(a, dtype=np.float32) for name, a in arrays.items()})
    atomic_write_bytes(stage / GOLDEN_FILE, buffer.getvalue())
    return file_entry(stage, GOLDEN_FILE, role="golden", format="npz", precision="fp32")


def check_golden(bundle_dir: Path, log=print) -> None:
    """The runtime's own check of a freshly written bundle: raises ValueError on a failure."""
    bundle = Bundle.load(bundle_dir, verify=True)
    results = verify_golden(bundle, load_golden(bundle))
    for result in results:
        log(result.line())
    failed = [r.line() for r in results if r.status == "FAILED"]
    if failed:
        raise ValueError("golden outputs: " + " | ".join(failed))


def add_golden(bundle_path, data_dir=None, split: str = "paper", log=print) -> Path:
    """Add (or replace) golden.npz in an existing bundle, from the bundle's own checkpoint."""
    from vce_deploy.checkpoint import load_model
    from vce_deploy.converter import Converter
    from vce_deploy.omniglot import load_split

    bundle = Bundle.load(bundle_path, verify=True)
    if bundle.checkpoint is None:
        raise ValueError(f"{bundle.path}: expected checkpoint.safetensors in the bundle to compute golden outputs")
    model, _ = load_model(bundle.checkpoint)
    test = load_split(split, "test", data_dir)
    files = dict(bundle.manifest.files)
    with atomic_directory(bundle.path) as stage:
        shutil.copytree(bundle.path, stage, dirs_exist_ok=True)
        files[GOLDEN_FILE] = write_golden(stage, Converter.from_torch(model, channels_last=False), test.images, bundle.manifest.latent_dim)
        write_manifest(stage, dataclasses.replace(bundle.manifest, files=files))
        check_golden(stage, log)
    return bundle.path


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m export.golden", description=__doc__.split("\n\n")[0])
    parser.add_argument("bundle")
    parser.add_argument("--data-dir", default=None, help="folder with the Omniglot zips")
    parser.add_argument("--split", default="paper", choices=("paper", "small"),
                        help="Omniglot split whose test alphabets give the golden glyphs")
    args = parser.parse_args(argv)
    try:
        add_golden(args.bundle, args.data_dir, args.split)
    except (VCEError, ValueError, OSError) as err:
        print(f"export.golden: {err}; the bundle was not changed", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
