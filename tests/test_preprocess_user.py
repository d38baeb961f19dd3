"""User glyphs (issue 22): thin pens, photos, any canvas mapped onto the training images'
frame; unreadable images refused; the training data's own mapping unchanged bit for bit."""
from __future__ import annotations

import hashlib
import io
import zipfile

import numpy as np
import pytest
from PIL import Image, ImageDraw

from vce_deploy import InputError, preprocess
from vce_deploy.cli import main
from vce_deploy.omniglot import CACHE_VERSION, DEFAULT_DATA_DIR
from vce_deploy.preprocess import TRAIN_EXTENT, preprocess_dataset

BACKGROUND_ZIP = DEFAULT_DATA_DIR / "images_background.zip"
# sha256 of the uint8 stack of every 97th PNG (199, in name order) of images_background.zip, as
# preprocess mapped them before issue 22: the mapping the shipped model was trained and scored on.
DATASET_DIGEST = "34548d120991640940a39ef471a36a63f2e7ab3f570277b29fabb542bb2c060b"


def _glyph(size=(500, 500), width=4, box=(100, 80, 400, 420), mode="L", ink=0, paper=255) -> Image.Image:
    """A 'T' over a ring: a bar, a stem and a closed curve, drawn with a pen `width` px wide in `box`."""
    image = Image.new(mode, size, paper)
    draw = ImageDraw.Draw(image)
    x0, y0, x1, y1 = box
    draw.line((x0, y0, x1, y0), fill=ink, width=width)
    draw.line(((x0 + x1) // 2, y0, (x0 + x1) // 2, y1), fill=ink, width=width)
    draw.ellipse((x0, (y0 + y1) // 2, x1, y1), outline=ink, width=width)
    return image


def _box(glyph: np.ndarray) -> tuple[int, int]:
    ys, xs = np.nonzero(glyph)
    return ys.max() - ys.min() + 1, xs.max() - xs.min() + 1


@pytest.mark.skipif(not BACKGROUND_ZIP.is_file(), reason=f"needs {BACKGROUND_ZIP}")
def test_training_data_maps_exactly_as_before():
    """The dataset path is bit-identical to the mapping the shipped model was trained on, so its NLL
    cannot move and the cache (CACHE_VERSION 1) stays valid."""
    with zipfile.ZipFile(BACKGROUND_ZIP) as archive:
        names = sorted(i.filename for i in archive.infolist() if i.filename.endswith(".png"))[::97]
        images = np.stack([preprocess_dataset(archive.read(n)) for n in names]).astype(np.uint8)
    assert hashlib.sha256(images.tobytes()).hexdigest() == DATASET_DIGEST
    assert CACHE_VERSION == 1, "the dataset mapping did not change: old caches must stay valid"


def test_a_thin_pen_on_a_large_canvas_keeps_its_strokes():
    """A 4 px pen on 500x500 (the issue's case): the old box filter and 0.5 threshold left almost nothing."""
    out = preprocess(_glyph())
    height, width = _box(out)
    assert abs(height - 340 / 500 * 28) <= 1.5, (height, width)  # it sits in its canvas as a training glyph would
    assert out[: 28 // 2].sum() >= 8 and out.sum() >= 30  # the bar survives, and the ring and stem with it


def test_a_small_glyph_in_a_corner_is_brought_to_the_training_size_and_place():
    out = preprocess(_glyph(size=(600, 600), width=5, box=(420, 20, 560, 180)))
    height, width = _box(out)
    ys, xs = np.nonzero(out)
    assert abs(max(height, width) - TRAIN_EXTENT) <= 1, (height, width)
    assert abs((ys.min() + ys.max()) / 2 - 13) <= 1 and abs((xs.min() + xs.max()) / 2 - 13) <= 1


def test_the_aspect_ratio_is_kept_on_a_non_square_canvas():
    """A ring drawn round on a 600x150 canvas stays round (it was squashed into a tall oval)."""
    image = Image.new("L", (600, 150), 255)
    ImageDraw.Draw(image).ellipse((50, 20, 160, 130), outline=0, width=6)
    height, width = _box(preprocess(image))
    assert abs(height - width) <= 1, (height, width)


def test_a_photo_with_a_shadowed_border_and_a_gradient_is_not_a_dark_background():
    """Blue strokes on paper, darker towards one side, a shadow over the left border, JPEG:
    the old border-mean rule inverted it into a black square."""
    rgb = np.asarray(_glyph(size=(640, 480), width=6, box=(200, 60, 460, 420), mode="RGB", ink=(35, 55, 170),
                            paper=(238, 232, 220))).astype(np.float32)
    xx = np.arange(640)[None, :]
    light = np.where(xx < 190, 0.4, 0.7 + 0.3 * xx / 639)  # a broad shadow (see docs/preprocessing.md)
    buffer = io.BytesIO()
    Image.fromarray((rgb * light[..., None]).astype(np.uint8)).save(buffer, format="JPEG", quality=70)
    out = preprocess(buffer.getvalue())
    reference = preprocess(_glyph(size=(640, 480), width=6, box=(200, 60, 460, 420)))
    assert out.sum() < 0.2 * out.size
    assert np.logical_and(out, reference).sum() / np.logical_or(out, reference).sum() > 0.6


@pytest.mark.parametrize("form", ["dark background", "RGBA", "uint8 array"])
def test_both_polarities_and_transparency_give_the_same_glyph(form):
    light = _glyph(size=(300, 260), width=8, box=(40, 30, 250, 230))
    expected = preprocess(light)
    if form == "dark background":
        image = Image.fromarray(255 - np.asarray(light))
    elif form == "RGBA":
        rgba = np.zeros((260, 300, 4), np.uint8)
        rgba[np.asarray(light) < 128] = (0, 0, 0, 255)
        image = Image.fromarray(rgba, "RGBA")
    else:
        image = np.asarray(light)
    assert np.array_equal(preprocess(image), expected)


@pytest.mark.parametrize("image, match", [
    (np.full((120, 90), 255, np.uint8), "no ink"),
    (np.full((120, 90), 0.3, np.float32), "no ink"),
    ((np.random.default_rng(0).random((100, 100)) * 0.1).astype(np.float32), "no ink"),  # faint noise only
    (np.where((np.arange(200)[:, None] % 16 < 4) | (np.arange(200) % 16 < 4), 0, 255).astype(np.uint8),
     "too much ink"),  # a dense hatching: strokes everywhere
    (np.pad(np.zeros((3, 3), np.uint8), 100, constant_values=255), "too little ink"),  # a speck
    (np.zeros((28, 28), np.uint8) + 255, "all background"),
])
def test_unreadable_images_are_refused_saying_what_was_found(image, match):
    with pytest.raises(InputError, match=match):
        preprocess(image)


def test_vce_convert_refuses_a_blank_image(tmp_path, capsys):
    blank = tmp_path / "blank.png"
    Image.new("L", (200, 200), 255).save(blank)
    assert main(["convert", str(blank), "-o", str(tmp_path / "out.png"), "--backend", "onnxruntime"]) == 1
    assert "no ink" in capsys.readouterr().err
    assert not (tmp_path / "out.png").exists()


def test_vce_convert_without_output_writes_beside_the_glyph_never_over_a_file(tmp_path, capsys):
    glyph = tmp_path / "glyph.png"
    _glyph(size=(200, 200), width=6, box=(30, 30, 170, 170)).save(glyph)
    args = ["convert", str(glyph), "-n", "2", "--seed", "0", "--backend", "onnxruntime"]
    assert main(args) == 0
    assert f"wrote {tmp_path / 'glyph.vce.png'}" in capsys.readouterr().out
    assert main(args) == 0  # the first default is taken: the next free name, never an overwrite
    assert f"wrote {tmp_path / 'glyph.vce-2.png'}" in capsys.readouterr().out
    assert Image.open(tmp_path / "glyph.vce.png").size == Image.open(tmp_path / "glyph.vce-2.png").size
