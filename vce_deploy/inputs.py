"""What the runtime accepts, checked in one place: glyph batches in every supported layout, and
the scalar arguments (n, seed, temperature, max_batch) of `Converter`'s methods.

Array layouts (docs/runtime.md "Inputs"):
    (H, W)                one glyph, grayscale
    (H, W, 3), (H, W, 4)  one glyph, RGB or RGBA (what np.asarray(PIL image) gives): never a batch
    (B, H, W)             B grayscale glyphs
    (B, 1, H, W)          B grayscale glyphs, channels first (what preprocess_batch returns)
    (B, H, W, 3 or 4)     B colour glyphs
A list or tuple mixes any single glyphs (paths, bytes, PIL images, arrays). A trailing axis of
3 or 4 is always read as colour channels: a glyph 3 or 4 pixels wide is not a glyph.
"""
from __future__ import annotations

import math
import os
from typing import Any, Iterator

import numpy as np

from .errors import InputError
from .preprocess import COLOUR_CHANNELS, preprocess

# The number of variations per glyph when none is asked for: Converter.convert and `vce convert`.
DEFAULT_N = 16
# The latent temperature when none is asked for, wherever z is drawn (convert, transfer, the CLI,
# both HTTP protocols). 0.7, not the prior's 1.0: the variations read as their character
# 1.5x as often (judged top-1 of the Bernoulli means, `python -m train.fidelity`), at a real
# redraw's diversity and under 1% blanks (docs/results.md, "Output form and temperature").
DEFAULT_TEMPERATURE = 0.7
# Latents are N(0, temperature^2 I) in float32: far past any useful temperature (1 samples the
# prior), and far below where float32 overflows inside the convolutions (~1e37 gives NaN).
MAX_TEMPERATURE = 1e4
LAYOUTS = "(H, W), (H, W, 3 or 4), (B, H, W), (B, 1, H, W) or (B, H, W, 3 or 4)"


def positive_int(value: Any, what: str) -> int:
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
        raise InputError(f"{what}: expected an integer >= 1, got {value!r} ({type(value).__name__})")
    if value < 1:
        raise InputError(f"{what}: expected an integer >= 1, got {value}")
    return int(value)


def seed_value(seed: Any) -> int | None:
    if seed is None:
        return None
    if isinstance(seed, (bool, np.bool_)) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise InputError(f"seed: expected None or an integer >= 0, got {seed!r}")
    return int(seed)


def temperature_value(value: Any) -> float:
    real = isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, (bool, np.bool_))
    if not real or not math.isfinite(value) or not 0 < value <= MAX_TEMPERATURE:
        raise InputError(f"temperature: expected a finite number > 0 and <= {MAX_TEMPERATURE:g} (1.0 samples the "
                         f"prior), got {value!r}")
    return float(value)


def raw_batch(array: Any, what: str, sample_shape: tuple[int, ...]) -> np.ndarray:
    """A preprocessed batch for run_encoder / run_convertor: checked, never converted."""
    expected = f"a float32 array (B, {', '.join(map(str, sample_shape))})"
    if not isinstance(array, np.ndarray):
        raise InputError(f"{what}: expected {expected}, got {type(array).__name__}")
    if array.dtype != np.float32:
        raise InputError(f"{what}: expected {expected}, got dtype {array.dtype} (convert it explicitly)")
    if array.ndim != 1 + len(sample_shape) or array.shape[1:] != sample_shape:
        raise InputError(f"{what}: expected {expected}, got shape {array.shape}")
    if array.shape[0] == 0:
        raise InputError(f"{what}: expected at least one row, got an empty batch {array.shape}")
    if not np.isfinite(array).all():
        raise InputError(f"{what}: expected finite values, got NaN or inf")
    return np.ascontiguousarray(array)


def _is_colour(shape: tuple[int, ...]) -> bool:
    return shape[-1] in COLOUR_CHANNELS


def glyph_items(images: Any, what: str = "images") -> tuple[Iterator, int | None]:
    """Everything the API accepts as images -> an iterator over single glyphs, and how many
    there are when that is known (a generator's length is not)."""
    if isinstance(images, np.ndarray):
        shape = images.shape
        if images.ndim == 2 or (images.ndim == 3 and _is_colour(shape)):
            return iter([images]), 1  # one glyph: (H, W) or (H, W, C)
        if images.ndim == 3:
            return iter(images), shape[0]  # (B, H, W)
        if images.ndim == 4 and shape[1] == 1 and not _is_colour(shape):
            return iter(images[:, 0]), shape[0]  # (B, 1, H, W)
        if images.ndim == 4 and _is_colour(shape) and shape[1] != 1:
            return iter(images), shape[0]  # (B, H, W, C)
        if images.ndim == 4 and shape[1] == 1:
            raise InputError(f"{what}: shape {shape} is ambiguous: (B, 1, H, W) grayscale glyphs of width "
                             f"{shape[-1]}, or (B, H, W, {shape[-1]}) colour glyphs one pixel high; expected {LAYOUTS}")
        if images.ndim == 4:
            raise InputError(f"{what}: expected (B, 1, H, W) with one channel first, or (B, H, W, 3 or 4) with "
                             f"colour channels last, got shape {shape}")
        raise InputError(f"{what}: expected an array {LAYOUTS}, got shape {shape}")
    if isinstance(images, (str, bytes, bytearray, os.PathLike)) or not hasattr(images, "__iter__"):
        return iter([images]), 1
    if hasattr(images, "__len__"):
        return iter(images), len(images)
    return iter(images), None


def preprocess_batch(images: Any, what: str = "images") -> np.ndarray:
    """Everything the runtime API accepts -> float32 (B, 1, 28, 28) in {0, 1}.

    One path / bytes / PIL image / array glyph, a list of them, or an array in any layout of
    this module's docstring.
    """
    items, _ = glyph_items(images, what)
    batch = [preprocess(item, what=f"{what}[{i}]") for i, item in enumerate(items)]
    if not batch:
        raise InputError(f"{what}: expected at least one image, got an empty batch")
    return np.stack(batch)[:, None]  # (B, 1, 28, 28)
