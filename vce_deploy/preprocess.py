"""The one preprocessing function, shared by training data and user input.

docs/design.md ("Data") fixes it: grayscale -> strokes become 1 (invert unless the background
is already dark) -> resize to 28x28 with a box filter -> binarize at 0.5 -> float32 {0, 1}.
"""
from __future__ import annotations

import io
import os
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, UnidentifiedImageError

from .errors import InputError

IMAGE_SIZE = 28
BINARIZE_THRESHOLD = 0.5
# Largest image accepted, in pixels (8192 x 8192): bounds the memory one glyph can take (a PNG
# of a few KB can declare billions of pixels). Files are refused from their header, before decoding.
MAX_PIXELS = 1 << 26
# A trailing axis of this length makes an array one colour glyph (RGB, RGBA), never a batch.
COLOUR_CHANNELS = (3, 4)
LUMA = (0.299, 0.587, 0.114)  # ITU-R 601, what PIL's convert("L") uses


def _to_unit_float(array: np.ndarray, what: str) -> np.ndarray:
    """A 2-D array of any supported dtype as float32 in [0, 1], or a clear error."""
    if array.dtype == np.bool_:
        return array.astype(np.float32)
    if array.dtype == np.uint8:
        return array.astype(np.float32) / 255.0
    if array.dtype == np.uint16:
        return array.astype(np.float32) / 65535.0
    if np.issubdtype(array.dtype, np.floating):
        if not np.isfinite(array).all():  # checked in the caller's dtype: a cast could overflow first
            raise InputError(f"{what}: expected finite pixel values, got NaN or inf")
        low, high = float(array.min()), float(array.max())
        if low < 0.0 or high > 1.0:
            raise InputError(
                f"{what}: expected float pixels in [0, 1], got values in [{low:g}, {high:g}]"
            )
        return array.astype(np.float32)
    raise InputError(
        f"{what}: expected dtype bool, uint8, uint16 or float, got {array.dtype}"
    )


def _colour_gray(array: np.ndarray, what: str) -> np.ndarray:
    """(H, W, 3) RGB or (H, W, 4) RGBA -> (H, W) float32 in [0, 1], exactly as the same pixels
    opened as a PIL image: alpha composited onto white, then ITU-R 601 luma."""
    if array.dtype == np.uint8:  # what np.asarray(PIL image) gives: let PIL do it, bit for bit
        return _to_unit_float(_pil_gray(Image.fromarray(np.ascontiguousarray(array)), what), what)
    unit = _to_unit_float(array, what)  # checks dtype and range for every channel
    rgb = unit[..., :3]
    if array.shape[-1] == 4:
        alpha = unit[..., 3:]
        rgb = rgb * alpha + (1.0 - alpha)  # onto white, as _pil_gray composites
    return (rgb @ np.array(LUMA, np.float32)).astype(np.float32)


def _pil_gray(image: Image.Image, what: str) -> np.ndarray:
    """A PIL image as a 2-D array in its own bit depth, transparency composited onto white.

    convert("F") alone would be wrong twice: 16-bit images come out in [0, 65535] (read as
    if 8-bit), and transparent pixels keep their hidden colour (often black, so a black
    glyph on a transparent background would vanish into a black background).
    """
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        image = Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba)
    if image.mode.startswith("I;16"):
        return np.asarray(image).astype(np.uint16)  # native byte order whatever the file's
    if image.mode == "I":
        raise InputError(f"{what}: expected an 8- or 16-bit image, got 32-bit integer mode 'I' "
                         "(its value range is unknown; convert it to 'L' first)")
    if image.mode == "F":
        return np.asarray(image, dtype=np.float32)  # must already be in [0, 1]: checked by the caller
    if image.mode == "1":
        return np.asarray(image, dtype=np.bool_)
    return np.asarray(image.convert("L"))  # uint8, ITU-R 601 luma for colour images


def preprocess(image: Any, what: str = "image") -> np.ndarray:
    """One glyph (path, bytes, PIL image, (H, W) or colour (H, W, 3 or 4) array) -> float32 (28, 28) in {0, 1}.

    Strokes come out as 1. A light background (Omniglot, scanned paper) is inverted; a dark
    one (chalkboard, MNIST-style) is kept, decided by the mean of the border pixels.
    """
    if isinstance(image, (str, os.PathLike)):
        image = _open_image(Path(image), f"{what} ({image})")  # the argument and the file, both named
    elif isinstance(image, (bytes, bytearray)):
        image = _open_image(io.BytesIO(image), what)
    if isinstance(image, Image.Image):
        _check_pixels(image.height, image.width, what)
        gray = _to_unit_float(_pil_gray(image, what), what)
    elif isinstance(image, np.ndarray):
        colour = image.ndim == 3 and image.shape[-1] in COLOUR_CHANNELS
        if image.ndim != 2 and not colour:
            raise InputError(f"{what}: expected a 2-D (H, W) array or a colour (H, W, 3 or 4) array, "
                             f"got shape {image.shape}")
        if image.size == 0:  # before any min() or resize: both fail on an empty array
            raise InputError(f"{what}: expected a non-empty image, got shape {image.shape}")
        _check_pixels(image.shape[0], image.shape[1], what)
        gray = _colour_gray(image, what) if colour else _to_unit_float(image, what)
    else:
        raise InputError(
            f"{what}: expected a path, bytes, PIL image or numpy array, got {type(image).__name__}"
        )
    if gray.shape[0] < 1 or gray.shape[1] < 1:
        raise InputError(f"{what}: expected a non-empty image, got shape {gray.shape}")
    border = np.concatenate([gray[0], gray[-1], gray[:, 0], gray[:, -1]])
    if border.mean() > 0.5:  # light background: strokes are dark, make them 1
        gray = 1.0 - gray
    if gray.shape != (IMAGE_SIZE, IMAGE_SIZE):
        resized = Image.fromarray(gray, mode="F").resize((IMAGE_SIZE, IMAGE_SIZE), Image.BOX)
        gray = np.asarray(resized, dtype=np.float32)
    return (gray > BINARIZE_THRESHOLD).astype(np.float32)


def _check_pixels(height: int, width: int, what: str) -> None:
    if height * width > MAX_PIXELS:
        raise InputError(f"{what}: expected at most {MAX_PIXELS} pixels (8192 x 8192), got {height} x {width} "
                         f"= {height * width}")


def _open_image(source: Path | io.BytesIO, what: str | None = None) -> Image.Image:
    name = what or str(source)
    if isinstance(source, Path):
        if not source.exists():
            raise InputError(f"{name}: expected an image file, but the path does not exist")
        if source.is_dir():
            raise InputError(f"{name}: expected an image file, got a directory")
        if not source.is_file():  # a FIFO would block, /dev/zero would never end
            raise InputError(f"{name}: expected a regular image file, got a special file (device, FIFO or socket)")
    try:
        with Image.open(source) as opened:
            _check_pixels(opened.height, opened.width, name)  # from the header, before decoding
            opened.load()  # decode now: a truncated file fails here, not later
            return opened.copy()
    except Image.DecompressionBombError as err:  # PIL's own limit, above ours: same refusal
        raise InputError(f"{name}: expected at most {MAX_PIXELS} pixels (8192 x 8192), got: {err}") from err
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, EOFError) as err:
        raise InputError(f"{name}: expected a readable image file (PNG, JPEG, ...), got: {err}") from err
