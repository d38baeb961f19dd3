"""Omniglot splits (vce_deploy.omniglot): the paper's 30/20 split, the small one, the
validation hold-out, the NLL protocol, the decode cache and errors that name the file."""
from __future__ import annotations

import io
import json
import shutil
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import vce_deploy.omniglot as omniglot
from train.data import sample_episodes
from vce_deploy.omniglot import DEFAULT_DATA_DIR, SPLITS, load_split, nll_targets
from vce_deploy.preprocess import preprocess

SMALL = SPLITS["small"]


@pytest.fixture(scope="module")
def small():
    return {part: load_split("small", part) for part in ("train", "validation", "test")}


def test_small_split_counts_and_disjoint_alphabets(small):
    assert len(small["train"]) + len(small["validation"]) == 136, "136 training characters, validation held out"
    assert len(small["validation"]) == 12 and small["test"].images.shape == (106, 20, 28, 28)
    train_alphabets = {a for a, _ in small["train"].names}
    assert train_alphabets == set(SMALL.train_alphabets)
    assert {a for a, _ in small["test"].names} == set(SMALL.test_alphabets)
    assert not set(small["train"].names) & set(small["validation"].names), "validation is held out of training"
    for split in small.values():
        assert set(np.unique(split.images)) <= {0.0, 1.0}
        assert split.images.reshape(-1, 784).sum(1).min() > 0, "every drawing keeps some stroke pixels"


def test_paper_split_has_30_and_20_alphabets_and_1318_targets():
    train, valid, test = (load_split("paper", p) for p in ("train", "validation", "test"))
    assert len(train) + len(valid) == 964 and len(test) == 659
    assert len({a for a, _ in train.names} | {a for a, _ in valid.names}) == 30
    assert len({a for a, _ in test.names}) == 20
    assert not {a for a, _ in train.names} & {a for a, _ in test.names}
    assert len(valid) >= 60, "enough validation characters to choose on"
    x, q = nll_targets(test)
    assert x.shape == q.shape == (1318, 1, 28, 28)


def test_training_and_validation_never_open_the_evaluation_zip(monkeypatch, tmp_path):
    opened = []
    real = zipfile.ZipFile

    def recording(path, *args, **kwargs):
        opened.append(Path(path).name)
        return real(path, *args, **kwargs)

    monkeypatch.setattr(omniglot.zipfile, "ZipFile", recording)
    calls = []
    real_read = omniglot._read_zip_cached
    monkeypatch.setattr(omniglot, "_read_zip_cached", lambda path, cache: calls.append(path.name) or real_read(path, cache))
    for part in ("train", "validation"):
        load_split("paper", part, cache_dir=tmp_path / "cache")
    assert "images_evaluation.zip" not in opened + calls
    assert set(calls) == {"images_background.zip"}


def test_greek_and_latin_are_in_both_small_zips_and_counted_once(small):
    per_zip = []
    for name in SMALL.train_zips:
        with zipfile.ZipFile(DEFAULT_DATA_DIR / name) as archive:
            per_zip.append({tuple(n.split("/")[1:4]) for n in archive.namelist() if n.endswith(".png")})
    shared = per_zip[0] & per_zip[1]
    assert {alphabet for alphabet, _, _ in shared} == {"Greek", "Latin"}, "the premise of deduplication"
    greek = [c for part in ("train", "validation") for a, c in small[part].names if a == "Greek"]
    assert len(greek) == len({c for a, c, _ in shared if a == "Greek"})


def test_nll_targets_follow_the_protocol(small):
    test = small["test"]
    x, q = nll_targets(test)
    assert x.shape == q.shape == (212, 1, 28, 28)
    np.testing.assert_array_equal(x[0, 0], test.images[0, 0])
    np.testing.assert_array_equal(q[0, 0], test.images[0, 1])
    np.testing.assert_array_equal(x[1, 0], test.images[0, 10])
    np.testing.assert_array_equal(q[1, 0], test.images[0, 11])
    x_all, q_all = nll_targets(test, all_drawings=True)
    assert x_all.shape == (2120, 1, 28, 28)
    np.testing.assert_array_equal(q_all[19, 0], test.images[0, 0])  # drawing 19 is conditioned on drawing 0


def test_episodes_share_one_condition_of_the_same_character(small):
    train = small["train"]
    x, q = sample_episodes(train, 2, np.random.default_rng(0))
    assert x.shape == q.shape == (38, 1, 28, 28)
    for episode in range(2):
        xs, qs = x[19 * episode:19 * (episode + 1), 0], q[19 * episode:19 * (episode + 1), 0]
        assert (qs == qs[0]).all()
        char = next(c for c in range(len(train)) if any(np.array_equal(train.images[c, i], qs[0]) for i in range(20)))
        others = {i for i in range(20) if not np.array_equal(train.images[char, i], qs[0])}
        assert all(any(np.array_equal(t, train.images[char, i]) for i in others) for t in xs)


def test_both_polarities_give_the_same_glyph():
    with zipfile.ZipFile(DEFAULT_DATA_DIR / SMALL.train_zips[1]) as archive:
        names = sorted(n for n in archive.namelist() if n.endswith(".png"))[::300][:10]
        blobs = [archive.read(n) for n in names]
    for name, blob in zip(names, blobs):
        light = preprocess(blob, what=name)  # Omniglot: dark strokes on white
        gray = np.asarray(Image.open(io.BytesIO(blob)).convert("L"))
        dark = 255 - gray
        assert light.sum() > 0
        np.testing.assert_array_equal(preprocess(gray), light, err_msg=f"{name}: uint8 array, light background")
        np.testing.assert_array_equal(preprocess(dark), light, err_msg=f"{name}: uint8 array, dark background")


# ---------------------------------------------------------------- the cache

def test_cache_is_keyed_by_the_zip_and_a_damaged_entry_is_rebuilt(tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    first = load_split("small", "test", cache_dir=cache)
    entries = sorted(cache.glob("*.npy"))
    assert len(entries) == 2, "one entry per zip"
    decodes = []
    real_decode = omniglot._decode_zip
    monkeypatch.setattr(omniglot, "_decode_zip", lambda path: decodes.append(path.name) or real_decode(path))
    again = load_split("small", "test", cache_dir=cache)
    assert decodes == [], "a matching cache is read, not decoded again"
    np.testing.assert_array_equal(first.images, again.images)
    blob = bytearray(entries[0].read_bytes())
    blob[-1] ^= 1  # one flipped pixel in the cached images
    entries[0].write_bytes(bytes(blob))
    rebuilt = load_split("small", "test", cache_dir=cache)
    assert len(decodes) == 1, "the damaged entry, and only it, is decoded again"
    np.testing.assert_array_equal(first.images, rebuilt.images)
    index = sorted(cache.glob("*.json"))[1]
    index.write_text("{not json")
    load_split("small", "test", cache_dir=cache)
    assert len(decodes) == 2


def test_uncached_and_cached_decodes_agree(tmp_path, small):
    uncached = load_split("small", "validation", cache_dir=None)
    np.testing.assert_array_equal(uncached.images, small["validation"].images)
    assert uncached.names == small["validation"].names


# ---------------------------------------------------------------- bad input names the file

@pytest.fixture
def data_copy(tmp_path) -> Path:
    folder = tmp_path / "omniglot"
    folder.mkdir()
    for name in SMALL.train_zips:
        shutil.copy(DEFAULT_DATA_DIR / name, folder / name)
        (folder / name).chmod(0o644)
    return folder


def test_missing_zip_is_named(data_copy):
    (data_copy / SMALL.train_zips[1]).unlink()
    with pytest.raises(FileNotFoundError, match=SMALL.train_zips[1]):
        load_split("small", "test", data_copy, cache_dir=None)


def test_corrupt_zip_is_named(data_copy, tmp_path):
    (data_copy / SMALL.train_zips[0]).write_bytes(b"not a zip at all" * 100)
    with pytest.raises(ValueError, match=rf"{SMALL.train_zips[0]}: expected a zip archive, got a corrupt file"):
        load_split("small", "train", data_copy, cache_dir=tmp_path / "cache")


def test_damaged_member_of_a_zip_is_named(data_copy):
    path = data_copy / SMALL.train_zips[1]
    with zipfile.ZipFile(path) as archive:
        member = next(i for i in archive.infolist() if i.compress_type == zipfile.ZIP_DEFLATED and i.filename.endswith(".png"))
    blob = bytearray(path.read_bytes())
    start = member.header_offset + 30 + len(member.filename.encode()) + len(member.extra)
    for offset in range(start + 10, start + member.compress_size - 4, 7):  # the deflate stream, not the headers
        blob[offset] ^= 0x55
    path.write_bytes(bytes(blob))
    with pytest.raises(ValueError, match=rf"{SMALL.train_zips[1]}: corrupt member {member.filename}"):
        load_split("small", "test", data_copy, cache_dir=None)


def test_unknown_split_part_and_alphabet_are_refused(data_copy, monkeypatch):
    with pytest.raises(ValueError, match=r"split: expected one of \['paper', 'small'\], got 'big'"):
        load_split("big")
    with pytest.raises(ValueError, match=r"part: expected one of"):
        load_split("small", "holdout")
    spec = SPLITS["small"]
    monkeypatch.setitem(SPLITS, "small", omniglot.SplitSpec(spec.train_zips, spec.test_zips, ("Klingon",), None))
    with pytest.raises(ValueError, match=r"alphabets not found .*Klingon"):
        load_split("small", "train", data_copy, cache_dir=None)


def test_a_character_with_the_wrong_number_of_drawings_is_named(data_copy, tmp_path):
    target = data_copy / SMALL.train_zips[0]
    with zipfile.ZipFile(target) as archive:
        members = [(i, archive.read(i)) for i in archive.infolist()]
    dropped = next(i.filename for i, _ in members if i.filename.endswith(".png") and "Balinese" in i.filename)
    with zipfile.ZipFile(target, "w") as archive:
        for info, data in members:
            if info.filename != dropped:
                archive.writestr(info, data)
    (data_copy / SMALL.train_zips[1]).unlink()
    shutil.copy(target, data_copy / SMALL.train_zips[1])  # both zips now lack the drawing
    character = "/".join(dropped.split("/")[1:3])
    with pytest.raises(ValueError, match=rf"{character} in .*expected 20 drawings, got 19"):
        load_split("small", "train", data_copy, cache_dir=None)
