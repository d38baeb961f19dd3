"""Save images as one PNG grid: one row per condition, one column per sample."""
from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np
from PIL import Image

from .errors import InputError
from .fsio import atomic_write_bytes


def grid_image(images: np.ndarray, scale: int = 2, pad: int = 2) -> Image.Image:
    """(rows, cols, H, W) values in [0, 1] (strokes 1) -> dark strokes on white, for reading."""
    images = np.asarray(images, dtype=np.float32)
    if images.ndim != 4:
        raise InputError(f"grid: expected (rows, cols, H, W), got shape {images.shape}")
    rows, cols, h, w = images.shape
    canvas = np.ones((rows * (h + pad) + pad, cols * (w + pad) + pad), np.float32)
    for r in range(rows):
        for c in range(cols):
            top, left = pad + r * (h + pad), pad + c * (w + pad)
            canvas[top:top + h, left:left + w] = 1.0 - np.clip(images[r, c], 0.0, 1.0)
    image = Image.fromarray((canvas * 255).round().astype(np.uint8), mode="L")
    return image.resize((image.width * scale, image.height * scale), Image.NEAREST)


def save_grid(images: np.ndarray, path: str | os.PathLike, scale: int = 2) -> Path:
    """Write the grid to `path` atomically (temp file, then rename)."""
    path = Path(path)
    if path.is_dir():
        raise InputError(f"{path}: expected a PNG file path to write, got a directory")
    png = io.BytesIO()
    grid_image(images, scale).save(png, format="PNG")
    return atomic_write_bytes(path, png.getvalue())
