"""The one preprocessing function: both polarities, every accepted input form, clear refusals."""
from __future__ import annotations

import io

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from vce_deploy import InputError, preprocess, preprocess_batch


def cross(height: int = 60, width: int = 50) -> np.ndarray:
    """Dark strokes on a white page, like an Omniglot scan."""
    image = np.full((height, width), 255, np.uint8)
    image[height // 6: 5 * height // 6, width // 2 - 3: width // 2 + 3] = 0
    image[height // 2 - 3: height // 2 + 3, width // 6: 5 * width // 6] = 0
    return image


def test_output_is_binary_float32_28x28_with_strokes_one():
    out = preprocess(cross())
    assert out.shape == (28, 28) and out.dtype == np.float32
    assert set(np.unique(out)) == {0.0, 1.0}
    assert out[14, 14] == 1.0 and out[0, 0] == 0.0  # stroke at the centre, background at the corner


def test_both_polarities_give_the_same_glyph():
    assert np.array_equal(preprocess(cross()), preprocess(255 - cross()))


def test_every_input_form_agrees():
    image = cross()
    expected = preprocess(image)
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    assert np.array_equal(preprocess(buffer.getvalue()), expected)
    assert np.array_equal(preprocess(Image.fromarray(image)), expected)
    assert np.array_equal(preprocess(Image.fromarray(image).convert("RGB")), expected)
    assert np.array_equal(preprocess(image.astype(np.float32) / 255), expected)
    assert np.array_equal(preprocess(image.astype(np.uint16) * 257), expected)
    assert np.array_equal(preprocess(image > 128), expected)


def test_sixteen_bit_and_transparent_images():
    image = cross()
    expected = preprocess(image)
    sixteen = Image.fromarray(image.astype(np.uint16) * 257)  # mode I;16
    assert sixteen.mode.startswith("I;16")
    assert np.array_equal(preprocess(sixteen), expected)
    rgba = np.zeros(image.shape + (4,), np.uint8)  # black strokes on a fully transparent page
    rgba[..., 3] = 255 - image
    assert np.array_equal(preprocess(Image.fromarray(rgba, "RGBA")), expected)


def test_batch_forms():
    images = np.stack([cross(), 255 - cross()[::-1]])
    batch = preprocess_batch(images)
    assert batch.shape == (2, 1, 28, 28)
    assert np.array_equal(preprocess_batch(images[:, None]), batch)
    assert np.array_equal(preprocess_batch(list(images)), batch)
    assert preprocess_batch(images[0]).shape == (1, 1, 28, 28)


@pytest.mark.parametrize("bad, expected", [
    (np.zeros((2, 3, 28, 28), np.uint8), "expected (B, 1, H, W) with one channel first, or (B, H, W, 3 or 4)"),
    (np.zeros((1, 1, 1, 28, 28), np.uint8), "got shape (1, 1, 1, 28, 28)"),
    (np.zeros((0, 28, 28), np.uint8), "got an empty batch"),
    ([], "got an empty batch"),
    ([np.zeros((28, 28, 2), np.uint8)], "expected a 2-D (H, W) array or a colour (H, W, 3 or 4) array, got shape "
                                        "(28, 28, 2)"),
    (np.zeros((28, 28), np.int64), "expected dtype bool, uint8, uint16 or float, got int64"),
    (np.full((28, 28), 2.0, np.float32), "expected float pixels in [0, 1], got values in [2, 2]"),
    (np.full((28, 28), np.nan, np.float32), "expected finite pixel values, got NaN or inf"),
    (np.zeros((0, 28), np.uint8), "expected a non-empty image"),
    (b"not an image", "expected a readable image file"),
    (3.5, "expected a path, bytes, PIL image or numpy array, got float"),
])
def test_refusals_name_what_was_expected(bad, expected):
    with pytest.raises(InputError) as err:
        preprocess_batch(bad)
    assert expected in str(err.value)


def test_paths(tmp_path):
    path = tmp_path / "glyph.png"
    Image.fromarray(cross()).save(path)
    assert np.array_equal(preprocess(path), preprocess(cross()))
    assert np.array_equal(preprocess(str(path)), preprocess(cross()))
    with pytest.raises(InputError, match="path does not exist"):
        preprocess(tmp_path / "absent.png")
    with pytest.raises(InputError, match="got a directory"):
        preprocess(tmp_path)
    truncated = tmp_path / "truncated.png"
    truncated.write_bytes(path.read_bytes()[:60])
    with pytest.raises(InputError, match="expected a readable image file"):
        preprocess(truncated)


@settings(max_examples=40, deadline=None)
@given(height=st.integers(1, 80), width=st.integers(1, 80), seed=st.integers(0, 2**32 - 1))
def test_any_size_gives_a_binary_28x28_or_a_clear_refusal(height, width, seed):
    """Noise of any size: a binary 28x28, or an InputError when it cannot be read as a glyph (issue 22)."""
    image = np.random.default_rng(seed).integers(0, 256, (height, width), dtype=np.uint8)
    try:
        out = preprocess(image)
    except InputError as err:
        assert "expected a glyph" in str(err)
        return
    assert out.shape == (28, 28) and out.dtype == np.float32
    assert np.isin(out, (0.0, 1.0)).all()


def _thinning_by_the_rules(mask: np.ndarray) -> np.ndarray:
    """Zhang and Suen's thinning written out rule by rule (CACM 27(3), 1984), the oracle for the
    table-driven `skeleton`."""
    image = np.pad(mask.astype(bool), 1)
    while True:
        changed = False
        for step in (0, 1):
            n = [np.roll(image, shift, axis=(0, 1)) for shift in
                 ((1, 0), (1, -1), (0, -1), (-1, -1), (-1, 0), (-1, 1), (0, 1), (1, 1))]  # P2..P9
            count = np.sum(n, axis=0)
            transitions = np.sum([~n[i] & n[(i + 1) % 8] for i in range(8)], axis=0)
            if step == 0:
                keep_off = ~(n[0] & n[2] & n[4]) & ~(n[2] & n[4] & n[6])
            else:
                keep_off = ~(n[0] & n[2] & n[6]) & ~(n[0] & n[4] & n[6])
            remove = image & (count >= 2) & (count <= 6) & (transitions == 1) & keep_off
            if remove.any():
                image, changed = image & ~remove, True
        if not changed:
            return image[1:-1, 1:-1]


def test_skeleton_is_zhang_suen_thinning():
    from vce_deploy.preprocess import skeleton

    rng = np.random.default_rng(0)
    for _ in range(120):
        height, width = rng.integers(1, 48, 2)
        blobs = rng.random((height, width)) < rng.random()
        thick = blobs | np.roll(blobs, 1, 0) | np.roll(blobs, 1, 1)  # strokes a few pixels wide
        for mask in (blobs, thick):
            assert np.array_equal(skeleton(mask), _thinning_by_the_rules(mask))
    bar = np.zeros((20, 40), bool)
    bar[8:13, 5:35] = True
    thin = skeleton(bar)
    assert thin.sum() > 20 and (thin.sum(0) <= 1).all(), "a 5-pixel bar thins to a one-pixel line"
