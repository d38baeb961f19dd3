"""Glyph images -> the model's 28x28 {0, 1} frame.

`preprocess` is the one function for user input (paths, bytes, PIL images, arrays); it maps a
drawing onto what the model was trained on (docs/preprocessing.md). `preprocess_dataset` is the
training data's mapping, docs/design.md ("Data"): grayscale -> strokes become 1 (invert unless
the background is already dark) -> resize to 28x28 with a box filter -> binarize at 0.5, kept
bit for bit because the shipped model was trained on it.
"""
from __future__ import annotations

import io
import os
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageFilter, UnidentifiedImageError

from .errors import InputError

IMAGE_SIZE = 28
BINARIZE_THRESHOLD = 0.5
# Largest image accepted, in pixels (8192 x 8192): bounds the memory one glyph can take (a PNG
# of a few KB can declare billions of pixels). Files are refused from their header, before decoding.
MAX_PIXELS = 1 << 26
# A trailing axis of this length makes an array one colour glyph (RGB, RGBA), never a batch.
COLOUR_CHANNELS = (3, 4)
LUMA = (0.299, 0.587, 0.114)  # ITU-R 601, what PIL's convert("L") uses

# Omniglot's 28x28 training images (preprocess_dataset of the paper split's 17,580 training
# drawings), measured by `python -m bench.robustness --stats`: the median longer side of the ink's
# box, the mean centre of that box (row, column; pixel indices), the mean stroke width
# (stroke_width) and the range of ink pixels. User glyphs are brought to these (_normalise).
TRAIN_EXTENT = 18
TRAIN_CENTRE = (13.0, 13.1)
TRAIN_STROKE_WIDTH = 1.1
TRAIN_INK_RANGE = (1, 168)
TRAIN_EXTENT_RANGE = (8, 25)  # 1st to 99th percentile of that extent
TRAIN_CENTRE_RANGE = ((9.5, 16.5), (9.5, 17.0))  # 1st to 99th percentile of the box centre's row, column
# Ink pixels a preprocessed user glyph may have: below 4 it is a speck (0.8% of the training
# glyphs, dots and stray marks, have fewer; a single short stroke has more); past ~30% of the frame
# it is a filled shape, not strokes (training max: 21%).
INK_PIXELS = (4, 235)
MIN_CONTRAST = 0.15  # weakest ink-to-background grey difference read as strokes (0 to 1 scale)
BACKGROUND_BLOCKS = 10  # background estimated on blocks of 1/10 of the short side (see _ink_mask)
SUPERSAMPLE = 4  # the glyph is laid out on a 4x finer canvas before the area resize
SPECK_TRIM = 0.2  # percent of ink pixels left out at each side of the glyph's box (JPEG specks)


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
    """One user glyph (path, bytes, PIL image, (H, W) or colour (H, W, 3 or 4) array) -> float32 (28, 28) in {0, 1}.

    Strokes come out as 1, drawn the way Omniglot's 28x28 training images are (docs/preprocessing.md):
    the ink is found by its contrast with a local background estimate and an Otsu threshold (either
    polarity; a shadow or a gradient across a photo is background), then the glyph is scaled with its
    aspect ratio kept to the training glyphs' median extent, centred where they are, and its
    strokes brought to their width before the area resize, so a thin pen on a large canvas survives.
    An image already 28x28 is taken as drawn in the model's frame (a dataset array, a glyph from
    another tool): only its polarity (border mean) and a 0.5 threshold are applied, as for the data.

    Refused with an InputError: an image with no ink, and one whose ink after preprocessing is too
    little or too much to be a glyph (INK_PIXELS, the training images' range with a margin).

    Training data does not come through here: `preprocess_dataset` keeps the mapping the shipped
    model was trained on bit for bit (its NLL depends on it); this function maps user drawings
    onto the statistics of that mapping's output.
    """
    gray = _gray(image, what)
    if gray.shape == (IMAGE_SIZE, IMAGE_SIZE):
        glyph = _box_binarize(gray)
        found = int(glyph.sum())
        if found in (0, glyph.size):
            raise InputError(f"{what}: expected a glyph (strokes on a plain background), got a 28x28 image that is "
                             f"{'all background' if found == 0 else 'all ink'} after binarizing at {BINARIZE_THRESHOLD}")
        return glyph
    glyph = _normalise(_ink_mask(gray, what))
    found = int(glyph.sum())
    low, high = INK_PIXELS
    if not low <= found <= high:
        raise InputError(f"{what}: expected a glyph of {low} to {high} ink pixels out of {glyph.size} after "
                         f"preprocessing (Omniglot's training glyphs have {TRAIN_INK_RANGE[0]} to "
                         f"{TRAIN_INK_RANGE[1]}), got {found}: "
                         + ("too little ink to be a glyph" if found < low else "too much ink: a filled shape or a "
                            "photo with dark areas, not strokes"))
    return glyph


def preprocess_dataset(image: Any, what: str = "image") -> np.ndarray:
    """An Omniglot drawing (105x105 PNG) -> float32 (28, 28) in {0, 1}: the training mapping,
    docs/design.md ("Data"): strokes become 1 (invert unless the border is dark) -> resize to 28x28
    with a box filter -> binarize at 0.5.

    Kept apart from `preprocess` on purpose: the shipped model was trained, and its NLL measured,
    on exactly this mapping (tests/test_preprocess_user.py pins it by a digest of real PNGs), while
    user drawings need the normalisation `preprocess` adds. The dataset cache
    (vce_deploy/omniglot.py, CACHE_VERSION) is keyed on this function's output.
    """
    return _box_binarize(_gray(image, what))


def _gray(image: Any, what: str) -> np.ndarray:
    """Any accepted glyph form -> (H, W) float32 grey in [0, 1], or a clear InputError."""
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
    return gray


def _box_binarize(gray: np.ndarray) -> np.ndarray:
    """The training mapping on a grey image (see preprocess_dataset)."""
    border = np.concatenate([gray[0], gray[-1], gray[:, 0], gray[:, -1]])
    if border.mean() > 0.5:  # light background: strokes are dark, make them 1
        gray = 1.0 - gray
    if gray.shape != (IMAGE_SIZE, IMAGE_SIZE):
        resized = Image.fromarray(gray, mode="F").resize((IMAGE_SIZE, IMAGE_SIZE), Image.BOX)
        gray = np.asarray(resized, dtype=np.float32)
    return (gray > BINARIZE_THRESHOLD).astype(np.float32)


def _ink_mask(gray: np.ndarray, what: str) -> np.ndarray:
    """(H, W) grey -> bool mask of the ink, either polarity, robust to shadows and gradients.

    Polarity: the background is the median grey (a glyph is sparse); the ink is the tail that lies
    farther from it (dark strokes on paper, light strokes on a board). A border mean is fooled by a
    shadowed border. Background: a coarse local minimum of the ink signal (blocks, then their 3x3
    neighbourhood, a quarter of the short side: wider than any stroke), smoothly upsampled and
    subtracted, so a shadow or a lighting gradient drops out. Threshold: Otsu on what is left.
    """
    counts = np.bincount(np.minimum((gray * 1023).astype(np.int32), 1023).ravel(), minlength=1024)
    low, median, high = np.searchsorted(np.cumsum(counts), np.array([0.001, 0.5, 0.999]) * gray.size) / 1023
    ink = 1.0 - gray if median - low >= high - median else gray
    height, width = ink.shape
    block = max(1, -(-min(height, width) // BACKGROUND_BLOCKS))
    rows, cols = -(-height // block), -(-width // block)
    padded = np.pad(ink, ((0, rows * block - height), (0, cols * block - width)), mode="edge")
    coarse = padded.reshape(rows, block, cols, block).min(axis=(1, 3))
    coarse = _rank3(_rank3(_rank3(coarse, np.min), np.max), np.max)  # an opening: strokes go, a shadow's edge stays
    background = np.asarray(Image.fromarray(coarse.astype(np.float32), mode="F").resize((width, height), Image.BILINEAR))
    signal = np.clip(ink - background, 0.0, 1.0)
    threshold = _otsu(signal)
    strokes, rest = signal[signal > threshold], signal[signal <= threshold]
    contrast = float(strokes.mean() - rest.mean()) if strokes.size and rest.size else 0.0
    if contrast < MIN_CONTRAST:
        raise InputError(f"{what}: expected a glyph: strokes at least {MIN_CONTRAST} darker or lighter than their "
                         f"background (on a 0 to 1 grey scale), got no ink: the strongest contrast found is "
                         f"{contrast:.3f} ({height} x {width} image)")
    return signal > max(threshold, MIN_CONTRAST / 2)


def _rank3(grid: np.ndarray, reduce) -> np.ndarray:
    """The 3x3 neighbourhood minimum or maximum (`reduce`) of a 2-D grid, edges repeated."""
    padded = np.pad(grid, 1, mode="edge")
    rows, cols = grid.shape
    return reduce([padded[i:i + rows, j:j + cols] for i in range(3) for j in range(3)], axis=0)


def _otsu(values: np.ndarray) -> float:
    """Otsu's threshold (the split maximising the between-class variance) of values in [0, 1]."""
    counts = np.bincount(np.minimum((values * 256).astype(np.int32), 255).ravel(), minlength=256).astype(np.float64)
    edges = np.arange(257) / 256  # 256 bins over [0, 1] (bincount: np.histogram is several times slower)
    centres = (edges[:-1] + edges[1:]) / 2
    below = np.cumsum(counts)
    mass = np.cumsum(counts * centres)
    total, total_mass = below[-1], mass[-1]
    above = total - below
    with np.errstate(divide="ignore", invalid="ignore"):
        between = (total_mass * below / total - mass) ** 2 / (below * above)
    between = np.nan_to_num(between[:-1], nan=0.0, posinf=0.0)
    return float(edges[1:][int(np.argmax(between))])


def _normalise(mask: np.ndarray) -> np.ndarray:
    """An ink mask of any size -> (28, 28) float32 {0, 1} in the training glyphs' frame: their size,
    place and stroke width (TRAIN_*, measured by `python -m bench.robustness --stats`).

    The canvas is padded to a square (aspect kept, never squashed). A glyph that already sits in
    it as training glyphs sit in theirs (its box's extent and centre within TRAIN_EXTENT_RANGE and
    TRAIN_CENTRE_RANGE, scaled to 28) keeps its size and place; any other (small in a corner, a
    large canvas, a wide strip) is scaled so its longer side is TRAIN_EXTENT and centred at
    TRAIN_CENTRE. Works on a canvas SUPERSAMPLE times finer than 28x28: any pixel the ink touches
    counts (a thin pen is never averaged away); the strokes are thinned to their centre lines and
    redrawn with a pen of TRAIN_STROKE_WIDTH (thickening to a mean width would still lose a stroke
    thinner than the mean), then the canvas is area-resized to 28x28 and binarized at 0.5, as the
    training images were.
    """
    side = max(mask.shape)
    square = np.zeros((side, side), bool)
    pad_top, pad_left = (side - mask.shape[0]) // 2, (side - mask.shape[1]) // 2
    square[pad_top:pad_top + mask.shape[0], pad_left:pad_left + mask.shape[1]] = mask
    ys, xs = np.nonzero(square)
    top, bottom = np.percentile(ys, (SPECK_TRIM, 100 - SPECK_TRIM)).round().astype(int)
    left, right = np.percentile(xs, (SPECK_TRIM, 100 - SPECK_TRIM)).round().astype(int)
    crop = square[top:bottom + 1, left:right + 1].astype(np.float32)
    frame = IMAGE_SIZE / side  # 28-pixel units per source pixel, in the canvas's own frame
    extent = max(crop.shape) * frame
    centre = ((top + bottom + 1) / 2 * frame - 0.5, (left + right + 1) / 2 * frame - 0.5)  # pixel-index coordinates
    in_frame = TRAIN_EXTENT_RANGE[0] <= extent <= TRAIN_EXTENT_RANGE[1] and all(
        low <= c <= high for c, (low, high) in zip(centre, TRAIN_CENTRE_RANGE))
    scale = SUPERSAMPLE * (frame if in_frame else TRAIN_EXTENT / max(crop.shape))  # fine pixels per source pixel
    if not in_frame:
        centre = TRAIN_CENTRE
    size = (max(1, round(crop.shape[1] * scale)), max(1, round(crop.shape[0] * scale)))  # (w, h) for PIL
    resample = Image.BOX if scale < 1 else Image.BILINEAR
    touched = np.asarray(Image.fromarray(crop, mode="F").resize(size, resample)) > 1e-3  # any ink in the cell
    pen = 2 * round((SUPERSAMPLE * TRAIN_STROKE_WIDTH - 1) / 2) + 1  # odd, for a centred square pen
    margin = pen // 2
    lines = np.pad(skeleton(touched), margin).astype(np.uint8) * 255
    strokes = np.asarray(Image.fromarray(lines).filter(ImageFilter.MaxFilter(pen))) > 127  # the training pen
    fine = IMAGE_SIZE * SUPERSAMPLE
    canvas = np.zeros((fine + 2 * margin, fine + 2 * margin), np.float32)
    row = int(round(SUPERSAMPLE * (centre[0] + 0.5) - size[1] / 2))  # the glyph's top-left, in fine pixels
    col = int(round(SUPERSAMPLE * (centre[1] + 0.5) - size[0] / 2))
    row, col = min(max(row, 0), fine - size[1]), min(max(col, 0), fine - size[0])
    canvas[row:row + strokes.shape[0], col:col + strokes.shape[1]] = strokes
    canvas = canvas[margin:margin + fine, margin:margin + fine]
    coverage = canvas.reshape(IMAGE_SIZE, SUPERSAMPLE, IMAGE_SIZE, SUPERSAMPLE).mean(axis=(1, 3))
    return (coverage > BINARIZE_THRESHOLD).astype(np.float32)


# P2..P9 of Zhang and Suen, clockwise from north: (row, column) offsets of each neighbour
NEIGHBOURS = ((-1, 0), (-1, 1), (0, 1), (1, 1), (1, 0), (1, -1), (0, -1), (-1, -1))


def _thinning_tables() -> np.ndarray:
    """(2, 256) bool: for each sub-iteration, whether a pixel with that neighbourhood (bit i set
    when neighbour P(i + 2) is ink) is removed: 2..6 ink neighbours, exactly one background-to-ink
    transition around it, and the sub-iteration's own pair of conditions."""
    bits = (np.arange(256)[:, None] >> np.arange(8)) & 1 == 1  # (256, 8): P2..P9
    count = bits.sum(1)
    transitions = (~bits & np.roll(bits, -1, axis=1)).sum(1)
    p2, p4, p6, p8 = bits[:, 0], bits[:, 2], bits[:, 4], bits[:, 6]
    common = (count >= 2) & (count <= 6) & (transitions == 1)
    return np.stack([common & ~(p2 & p4 & p6) & ~(p4 & p6 & p8),
                     common & ~(p2 & p4 & p8) & ~(p2 & p6 & p8)])


THINNING_TABLES = _thinning_tables()


def skeleton(mask: np.ndarray) -> np.ndarray:
    """The one-pixel centre lines of a 2-D bool mask: Zhang and Suen's thinning (CACM 27(3), 1984).
    Each sub-iteration codes every pixel's 8 neighbours as one byte and looks the rule up in
    THINNING_TABLES. A batch-1 `convert` of a PNG spends most of its time here (bench --profile)."""
    image = np.pad(mask.astype(bool), 1)
    height, width = image.shape
    ring = np.zeros((height + 2, width + 2), bool)  # the image with a background border, reused
    while True:
        changed = False
        for table in THINNING_TABLES:
            ring[1:-1, 1:-1] = image
            code = np.zeros(image.shape, np.uint8)
            for bit, (dy, dx) in enumerate(NEIGHBOURS):
                code |= ring[1 + dy:1 + dy + height, 1 + dx:1 + dx + width].view(np.uint8) << bit
            remove = image & table[code]
            if remove.any():
                image = image & ~remove
                changed = True
        if not changed:
            return image[1:-1, 1:-1]


def stroke_width(mask: np.ndarray) -> float | np.ndarray:
    """Mean stroke width in pixels of a (..., H, W) ink mask: 2 * area / perimeter (a stroke of
    width w and length L has area w * L and a perimeter near 2 * L), the perimeter counted as
    ink/background pixel edges."""
    ink = mask.astype(bool)
    padded = np.pad(ink, [(0, 0)] * (ink.ndim - 2) + [(1, 1), (1, 1)])
    edges = (padded[..., 1:, :] != padded[..., :-1, :]).sum((-2, -1)) + \
        (padded[..., :, 1:] != padded[..., :, :-1]).sum((-2, -1))
    return 2 * ink.sum((-2, -1)) / np.maximum(edges, 1)


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
