"""Save images as one grid image: one row per condition, one column per sample, long rows
wrapped onto continuation lines. The file format follows the file name's extension."""
from __future__ import annotations

import io
import math
import os
from pathlib import Path

import numpy as np
from PIL import Image

from .errors import InputError
from .fsio import atomic_write_bytes
from .preprocess import MAX_PIXELS

# File name extension -> the format written. Anything else is refused, never written as PNG bytes.
FORMATS = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG", ".bmp": "BMP", ".tif": "TIFF", ".tiff": "TIFF"}
# Cells per grid line where callers wrap (save_conversions, `vce convert`): a condition and 32 samples.
WRAP_CELLS = 33


def output_format(path: str | os.PathLike) -> str:
    """The PIL format for `path`, from its extension, or a clear refusal."""
    suffix = Path(path).suffix.lower()
    if suffix not in FORMATS:
        raise InputError(f"{path}: expected a file name ending in one of {', '.join(FORMATS)} (the format follows "
                         f"the extension), got {suffix or 'no extension'!r}")
    return FORMATS[suffix]


def check_output_path(path: str | os.PathLike, make_parents: bool = True) -> Path:
    """Refuse an output path before any work is done: a known extension, not a directory, and
    (make_parents=False) a parent directory that already exists."""
    path = Path(path)
    if path.is_dir():
        raise InputError(f"{path}: expected an image file path to write, got a directory")
    output_format(path)
    parent = path.parent
    if not make_parents and not parent.is_dir():
        what = "is not a directory" if parent.exists() else "does not exist"
        raise InputError(f"{path}: expected an existing directory to write into, but {parent} {what} (create it "
                         "first)")
    return path


def grid_lines(rows: int, cols: int, wrap: int | None) -> tuple[int, int]:
    """(lines per row, cells per line) when rows of `cols` cells wrap at `wrap` cells."""
    per_line = cols if wrap is None else max(1, min(wrap, cols))
    return math.ceil(cols / per_line), per_line


def _layout(rows: int, cols: int, h: int, w: int, pad: int, wrap: int | None) -> tuple[int, int, int, int, int]:
    """Canvas (height, width) before scaling, lines per row, cells per line, and the extra gap
    between rows (wider when rows wrap, to tell them apart)."""
    lines, per_line = grid_lines(rows, cols, wrap)
    gap = 2 * pad if lines > 1 else 0
    height = rows * lines * (h + pad) + (rows - 1) * gap + pad
    return height, per_line * (w + pad) + pad, lines, per_line, gap


def grid_pixels(rows: int, cols: int, size: int, scale: int = 2, pad: int = 2, wrap: int | None = None) -> int:
    height, width, *_ = _layout(rows, cols, size, size, pad, wrap)
    return height * width * scale * scale


def check_grid_size(rows: int, cols: int, size: int, scale: int = 2, wrap: int | None = None) -> None:
    pixels = grid_pixels(rows, cols, size, scale, wrap=wrap)
    if pixels > MAX_PIXELS:
        raise InputError(f"grid: expected at most {MAX_PIXELS} pixels in one image, got {rows} rows x {cols} cells = "
                         f"{pixels} pixels; ask for fewer samples per image (or use Converter.convert_iter and "
                         "save the chunks yourself)")


def grid_image(images: np.ndarray, scale: int = 2, pad: int = 2, wrap: int | None = None) -> Image.Image:
    """(rows, cols, H, W) values in [0, 1] (strokes 1) -> dark strokes on white, for reading.
    wrap: at most this many cells per line; a longer row continues on the lines below it."""
    images = np.asarray(images, dtype=np.float32)
    if images.ndim != 4:
        raise InputError(f"grid: expected (rows, cols, H, W), got shape {images.shape}")
    rows, cols, h, w = images.shape
    height, width, lines, per_line, gap = _layout(rows, cols, h, w, pad, wrap)
    canvas = np.ones((height, width), np.float32)
    for r in range(rows):
        for c in range(cols):
            line, column = r * lines + c // per_line, c % per_line
            top, left = pad + line * (h + pad) + r * gap, pad + column * (w + pad)
            canvas[top:top + h, left:left + w] = 1.0 - np.clip(images[r, c], 0.0, 1.0)
    image = Image.fromarray((canvas * 255).round().astype(np.uint8), mode="L")
    return image.resize((image.width * scale, image.height * scale), Image.NEAREST)


def save_grid(images: np.ndarray, path: str | os.PathLike, scale: int = 2, wrap: int | None = None) -> Path:
    """Write the grid to `path` atomically (temp file, then rename), in the format its
    extension names (.png, .jpg, ...)."""
    path = check_output_path(path)
    images = np.asarray(images)
    if images.ndim == 4:
        check_grid_size(images.shape[0], images.shape[1], images.shape[2], scale, wrap)
    encoded = io.BytesIO()
    grid_image(images, scale, wrap=wrap).save(encoded, format=output_format(path))
    return atomic_write_bytes(path, encoded.getvalue())
