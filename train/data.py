"""Omniglot, read straight from the two zip files, split by alphabet (DESIGN.md "Data")."""
from __future__ import annotations

import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from vce_deploy.preprocess import preprocess

DEFAULT_DATA_DIR = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "omniglot"
ZIP_NAMES = ("images_background_small1.zip", "images_background_small2.zip")
TRAIN_ALPHABETS = ("Balinese", "Early_Aramaic", "Greek", "Korean", "Latin")
TEST_ALPHABETS = ("Japanese_(katakana)", "Sanskrit", "Tagalog")
DRAWINGS_PER_CHARACTER = 20


@dataclass
class Split:
    images: np.ndarray  # (characters, 20, 28, 28) float32 {0, 1}, drawings in file-name order
    names: list[tuple[str, str]]  # (alphabet, character) per row of images

    def __len__(self) -> int:
        return len(self.names)


def _read_zips(data_dir: Path) -> dict[tuple[str, str], dict[str, bytes]]:
    """(alphabet, character) -> {file name: png bytes}, Greek and Latin deduplicated."""
    characters: dict[tuple[str, str], dict[str, bytes]] = {}
    for zip_name in ZIP_NAMES:
        path = data_dir / zip_name
        if not path.is_file():
            raise FileNotFoundError(f"Omniglot zip missing: expected {path}")
        try:
            archive = zipfile.ZipFile(path)
        except zipfile.BadZipFile as err:
            raise ValueError(f"{path}: expected a zip archive, got a corrupt file ({err})") from err
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
                # the same (alphabet, character, file) in both zips counts once
                characters.setdefault((alphabet, character), {})[file_name] = data
    return characters


def load_split(alphabets: tuple[str, ...], data_dir: Path = DEFAULT_DATA_DIR) -> Split:
    characters = _read_zips(Path(data_dir))
    names = sorted(key for key in characters if key[0] in alphabets)
    missing = set(alphabets) - {alphabet for alphabet, _ in names}
    if missing:
        raise ValueError(f"alphabets not found in {data_dir}: {sorted(missing)}")
    images = np.zeros((len(names), DRAWINGS_PER_CHARACTER, 28, 28), np.float32)
    for row, key in enumerate(names):
        files = sorted(characters[key])
        if len(files) != DRAWINGS_PER_CHARACTER:
            raise ValueError(f"{key}: expected {DRAWINGS_PER_CHARACTER} drawings, got {len(files)}")
        for col, file_name in enumerate(files):
            images[row, col] = preprocess(characters[key][file_name], what=f"{key[0]}/{key[1]}/{file_name}")
    return Split(images, names)


def load_train(data_dir: Path = DEFAULT_DATA_DIR) -> Split:
    return load_split(TRAIN_ALPHABETS, data_dir)


def load_test(data_dir: Path = DEFAULT_DATA_DIR) -> Split:
    return load_split(TEST_ALPHABETS, data_dir)


def sample_episodes(split: Split, count: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """`count` episodes: one character each, one drawing as condition q, the other 19 as
    targets x (paper section 3.3: every pair in a batch shares one condition).

    Returns x, q as float32 (count * 19, 1, 28, 28), episode-major.
    """
    chars = rng.choice(len(split), size=count, replace=count > len(split))
    xs, qs = [], []
    for c in chars:
        order = rng.permutation(DRAWINGS_PER_CHARACTER)
        q = split.images[c, order[0]]
        xs.append(split.images[c, order[1:]])
        qs.append(np.broadcast_to(q, xs[-1].shape))
    x = np.concatenate(xs)[:, None]
    q = np.concatenate(qs)[:, None]
    return np.ascontiguousarray(x), np.ascontiguousarray(q)


def nll_targets(split: Split, all_drawings: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """DESIGN.md protocol: drawings i = 0 and 10 of every character are targets, each
    conditioned on drawing (i + 1) mod 20 (or every i with all_drawings). -> x, q (N, 1, 28, 28)."""
    indices = range(DRAWINGS_PER_CHARACTER) if all_drawings else (0, 10)
    xs, qs = [], []
    for c in range(len(split)):
        for i in indices:
            xs.append(split.images[c, i])
            qs.append(split.images[c, (i + 1) % DRAWINGS_PER_CHARACTER])
    return np.stack(xs)[:, None], np.stack(qs)[:, None]
