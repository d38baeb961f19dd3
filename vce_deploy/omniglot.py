"""Omniglot, read from its zip files, split by alphabet (docs/design.md, "Data").

Two splits:
- "paper" (the default): train on the 30 alphabets of images_background.zip, test on the 20
  novel alphabets of images_evaluation.zip. The training and validation parts never open the
  evaluation zip.
- "small" (smoke runs and tests): five training and three test alphabets from the two small
  background zips (Greek and Latin are in both, deduplicated by alphabet, character and file).

A validation part is held out of training for every choice (final loss, stopping point,
recipe); the test part is for reporting only. On the paper's split it is five whole background
alphabets (VALIDATION_ALPHABETS), so it measures what the test measures: one-shot generation
on alphabets never trained on. Holding out characters of the training alphabets instead
(every VALIDATION_EVERY-th character, `validation_alphabets=()`) read 16 nats below the test
(docs/training.md), and is kept only for the small split and for runs that began with it.

Decoding 32k PNGs takes a while, so each zip is decoded once into a cache keyed by its sha256;
a cache entry that does not match its zip, or that is damaged, is rebuilt, never trusted.
Numpy and the standard library only: training, export and the runtime's NLL all read it.
"""
from __future__ import annotations

import hashlib
import json
import os
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .fsio import atomic_write_bytes, sha256_file
from .preprocess import preprocess_dataset

DEFAULT_DATA_DIR = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "omniglot"
DRAWINGS_PER_CHARACTER = 20
VALIDATION_EVERY = 10  # one character in ten of each training alphabet is held out
PARTS = ("train", "validation", "test")
CACHE_VERSION = 1  # bump when preprocessing changes: old entries then miss and are rebuilt


@dataclass(frozen=True)
class SplitSpec:
    train_zips: tuple[str, ...]
    test_zips: tuple[str, ...]
    train_alphabets: tuple[str, ...] | None  # None: every alphabet in train_zips
    test_alphabets: tuple[str, ...] | None
    # whole training-zip alphabets held out for validation; () holds out characters instead
    validation_alphabets: tuple[str, ...] = ()


# Five of the 30 background alphabets, 151 characters (302 NLL targets): scripts of different
# families and sizes (an abugida, an invented script, an abjad, an alphabet, a syllabary).
VALIDATION_ALPHABETS = ("Armenian", "Bengali", "Futurama", "Hebrew", "Inuktitut_(Canadian_Aboriginal_Syllabics)")

SPLITS: dict[str, SplitSpec] = {
    "paper": SplitSpec(("images_background.zip",), ("images_evaluation.zip",), None, None, VALIDATION_ALPHABETS),
    "small": SplitSpec(
        ("images_background_small1.zip", "images_background_small2.zip"),
        ("images_background_small1.zip", "images_background_small2.zip"),
        ("Balinese", "Early_Aramaic", "Greek", "Korean", "Latin"),
        ("Japanese_(katakana)", "Sanskrit", "Tagalog"),
    ),
}


@dataclass
class Split:
    images: np.ndarray  # (characters, 20, 28, 28) float32 {0, 1}, drawings in file-name order
    names: list[tuple[str, str]]  # (alphabet, character) per row of images

    def __len__(self) -> int:
        return len(self.names)


def default_cache_dir() -> Path:
    root = os.environ.get("VCE_CACHE_DIR") or os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(root) / "vce-deploy" / "omniglot"


def _decode_zip(path: Path) -> tuple[list[tuple[str, str, str]], np.ndarray]:
    """Every drawing in the zip -> its (alphabet, character, file) and its 28x28 {0, 1} image."""
    try:
        archive = zipfile.ZipFile(path)
    except zipfile.BadZipFile as err:
        raise ValueError(f"{path}: expected a zip archive, got a corrupt file ({err})") from err
    keys, images = [], []
    with archive:
        for info in archive.infolist():
            parts = info.filename.split("/")
            if info.is_dir() or len(parts) != 4 or not parts[3].endswith(".png"):
                continue
            _, alphabet, character, file_name = parts
            try:
                data = archive.read(info)
            except (zipfile.BadZipFile, zlib.error, OSError) as err:  # zlib: damaged deflate data
                raise ValueError(f"{path}: corrupt member {info.filename} ({err})") from err
            keys.append((alphabet, character, file_name))
            images.append(preprocess_dataset(data, what=f"{path.name}:{info.filename}"))
    if not keys:
        raise ValueError(f"{path}: expected Omniglot PNGs laid out as <split>/<alphabet>/<character>/<file>.png, "
                         f"found none")
    return keys, np.stack(images).astype(np.uint8)


def _read_zip_cached(path: Path, cache_dir: Path | None) -> tuple[list[tuple[str, str, str]], np.ndarray]:
    if not path.is_file():
        raise FileNotFoundError(f"Omniglot zip missing: expected {path}")
    if cache_dir is None:
        return _decode_zip(path)
    digest = sha256_file(path)
    stem = cache_dir / f"{path.stem}-{digest[:16]}-v{CACHE_VERSION}"
    index_path, images_path = stem.with_suffix(".json"), stem.with_suffix(".npy")
    try:
        index = json.loads(index_path.read_text())
        raw = images_path.read_bytes()
        if index["zip_sha256"] != digest or index["images_sha256"] != hashlib.sha256(raw).hexdigest():
            raise ValueError("cache entry does not match its zip")
        images = np.load(images_path, allow_pickle=False)
        keys = [tuple(k) for k in index["keys"]]
        if images.shape != (len(keys), 28, 28) or images.dtype != np.uint8:
            raise ValueError("cache entry has the wrong shape")
        return keys, images
    except (OSError, ValueError, KeyError, TypeError, json.JSONDecodeError):
        pass  # missing or damaged: rebuild below
    keys, images = _decode_zip(path)
    cache_dir.mkdir(parents=True, exist_ok=True)
    buffer = _npy_bytes(images)
    atomic_write_bytes(images_path, buffer)
    atomic_write_bytes(index_path, json.dumps({
        "zip_sha256": digest, "images_sha256": hashlib.sha256(buffer).hexdigest(), "keys": keys}).encode())
    return keys, images


def _npy_bytes(array: np.ndarray) -> bytes:
    import io

    out = io.BytesIO()
    np.save(out, array, allow_pickle=False)
    return out.getvalue()


def _characters(zip_paths: list[Path], cache_dir: Path | None) -> dict[tuple[str, str], dict[str, np.ndarray]]:
    """(alphabet, character) -> {file name: image}; the same file in two zips counts once."""
    characters: dict[tuple[str, str], dict[str, np.ndarray]] = {}
    for path in zip_paths:
        keys, images = _read_zip_cached(path, cache_dir)
        for (alphabet, character, file_name), image in zip(keys, images):
            characters.setdefault((alphabet, character), {})[file_name] = image
    return characters


def _is_validation(index_in_alphabet: int) -> bool:
    return index_in_alphabet % VALIDATION_EVERY == VALIDATION_EVERY - 1


def load_split(split: str = "paper", part: str = "train", data_dir: str | os.PathLike | None = None,
               cache_dir: str | os.PathLike | None | bool = True,
               validation_alphabets: tuple[str, ...] | None = None) -> Split:
    """One part ("train", "validation", "test") of a split ("paper", "small").

    cache_dir: True for default_cache_dir(), a path, or None/False to decode without a cache.
    validation_alphabets: None for the split's own (SplitSpec.validation_alphabets); a tuple of
    training-zip alphabets to hold out whole; () to hold out every VALIDATION_EVERY-th character
    of each training alphabet instead.
    """
    if split not in SPLITS:
        raise ValueError(f"split: expected one of {sorted(SPLITS)}, got {split!r}")
    if part not in PARTS:
        raise ValueError(f"part: expected one of {list(PARTS)}, got {part!r}")
    spec = SPLITS[split]
    data_dir = Path(data_dir) if data_dir else DEFAULT_DATA_DIR
    cache = default_cache_dir() if cache_dir is True else (Path(cache_dir) if cache_dir else None)
    zips, alphabets = ((spec.test_zips, spec.test_alphabets) if part == "test"
                       else (spec.train_zips, spec.train_alphabets))
    characters = _characters([data_dir / name for name in zips], cache)
    if alphabets is not None:
        missing = set(alphabets) - {alphabet for alphabet, _ in characters}
        if missing:
            raise ValueError(f"alphabets not found in {[str(data_dir / z) for z in zips]}: {sorted(missing)}")
    names = sorted(key for key in characters if alphabets is None or key[0] in alphabets)
    held_out = spec.validation_alphabets if validation_alphabets is None else tuple(validation_alphabets)
    if part != "test" and held_out:
        present = {alphabet for alphabet, _ in names}
        missing = sorted(set(held_out) - present)
        if missing:
            raise ValueError(f"validation alphabets {missing} are not training alphabets of split {split!r}; "
                             f"expected names from {sorted(present)}")
        names = [key for key in names if (key[0] in held_out) == (part == "validation")]
    elif part != "test":
        index_in_alphabet: dict[str, int] = {}
        kept = []
        for alphabet, character in names:
            index = index_in_alphabet.get(alphabet, 0)
            index_in_alphabet[alphabet] = index + 1
            if _is_validation(index) == (part == "validation"):
                kept.append((alphabet, character))
        names = kept
    images = np.zeros((len(names), DRAWINGS_PER_CHARACTER, 28, 28), np.float32)
    for row, key in enumerate(names):
        files = sorted(characters[key])
        if len(files) != DRAWINGS_PER_CHARACTER:
            raise ValueError(f"{'/'.join(key)} in {[str(data_dir / z) for z in zips]}: expected "
                             f"{DRAWINGS_PER_CHARACTER} drawings, got {len(files)}")
        images[row] = np.stack([characters[key][f] for f in files])
    return Split(images, names)


def spread_subset(total: int, count: int) -> np.ndarray:
    """Indices of `count` of `total` character-major targets, evenly spaced so every alphabet has
    some: the export's NLL subset (export/pipeline.py) and bench.peer_nll score the same ones."""
    return np.unique(np.linspace(0, total - 1, min(count, total)).round().astype(int))


def nll_targets(split: Split, all_drawings: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """The one-shot NLL protocol (docs/design.md, "Evaluation"): drawings i = 0 and 10 of every
    character are targets, each conditioned on drawing (i + 1) mod 20 (every i with
    all_drawings). -> x, q (N, 1, 28, 28), character-major."""
    indices = range(DRAWINGS_PER_CHARACTER) if all_drawings else (0, 10)
    xs, qs = [], []
    for c in range(len(split)):
        for i in indices:
            xs.append(split.images[c, i])
            qs.append(split.images[c, (i + 1) % DRAWINGS_PER_CHARACTER])
    return np.stack(xs)[:, None], np.stack(qs)[:, None]


def targets_per_character(all_drawings: bool = False) -> int:
    return DRAWINGS_PER_CHARACTER if all_drawings else 2
