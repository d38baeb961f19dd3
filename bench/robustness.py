"""Robustness of user-glyph preprocessing: test-alphabet glyphs re-drawn the way users hand them in.

Each drawing of Omniglot's test alphabets (images_evaluation.zip, never trained on) is re-drawn
from its raw 105x105 PNG in several ways (RENDERINGS: thin pen on a large canvas, off-centre,
a phone photo of coloured ink on paper with a shadow, JPEG-compressed, a non-square canvas,
mouse-like strokes, dark background, transparent background), preprocessed by the old mapping
(box resize + 0.5 threshold, `preprocess_dataset`) and by `preprocess`, and compared with the
dataset's own 28x28 of the same drawing:
  - IoU, shift-tolerant (the best over shifts of up to 3 pixels each way): is the glyph there?
  - IoU vs clean: the same, against the clean PNG through the same mapping (new: rescaled to the
    training glyphs' median size, so its IoU against the dataset's own scale is bounded by that);
  - ink ratio (ink pixels over the dataset image's): strokes kept, not thinned away or blotted;
  - follow: the shipped bundle's samples (onnxruntime fp32) BCE against their own dataset glyph
    over the median BCE against the other glyphs' (below 1: the conversions follow the drawing;
    train/samples.py condition_follow on clean data gives ~0.65);
  - refused: how many the preprocessing refused (InputError).
Prints a Markdown table (docs/preprocessing.md) and the CPU it ran on.
    python -m bench.robustness                 # 24 glyphs, ~1 minute on 2 cores
    python -m bench.robustness --stats         # the training statistics preprocess targets
"""
from __future__ import annotations

import argparse
import io
import zipfile
from pathlib import Path
from typing import Callable

import numpy as np
from PIL import Image, ImageFilter

from vce_deploy.cpu import cpu_model
from vce_deploy.errors import InputError
from vce_deploy.nll import _log_bernoulli
from vce_deploy.omniglot import DEFAULT_DATA_DIR
from vce_deploy.preprocess import preprocess, preprocess_dataset, stroke_width

MAX_SHIFT = 3


def raw_glyphs(count: int, zip_path: Path | None = None, seed: int = 0) -> list[tuple[str, np.ndarray]]:
    """`count` raw drawings (name, (105, 105) bool ink mask), spread over the test alphabets."""
    with zipfile.ZipFile(zip_path or DEFAULT_DATA_DIR / "images_evaluation.zip") as archive:
        names = sorted(i.filename for i in archive.infolist() if i.filename.endswith(".png"))
        picked = np.random.default_rng(seed).choice(len(names), count, replace=False)
        return [(names[i], np.asarray(Image.open(io.BytesIO(archive.read(names[i]))).convert("L")) < 128)
                for i in sorted(picked)]


def _scaled(ink: np.ndarray, factor: float, pen: int | None = None) -> np.ndarray:
    """The ink mask scaled up by `factor`; with `pen`, its strokes thinned (eroded) to about that width."""
    size = round(ink.shape[0] * factor)
    big = np.asarray(Image.fromarray(ink.astype(np.uint8) * 255).resize((size, size), Image.BILINEAR)) > 127
    if pen is not None:
        width = float(stroke_width(big))
        erode = int((width - pen) // 2)
        if erode > 0:
            thinned = Image.fromarray(big.astype(np.uint8) * 255).filter(ImageFilter.MinFilter(2 * erode + 1))
            thin = np.asarray(thinned) > 127
            big = thin if thin.sum() > 0.2 * big.sum() else big  # never erase the glyph
    return big


def _paste(canvas_hw: tuple[int, int], ink: np.ndarray, top: int, left: int) -> np.ndarray:
    canvas = np.zeros(canvas_hw, bool)
    h, w = min(ink.shape[0], canvas_hw[0] - top), min(ink.shape[1], canvas_hw[1] - left)
    canvas[top:top + h, left:left + w] = ink[:h, :w]
    return canvas


def _on_paper(ink: np.ndarray) -> np.ndarray:
    return np.where(ink, 0, 255).astype(np.uint8)


def thin_pen(ink, rng):  # a 3-4 px pen on a 600x600 canvas, as a tablet app exports it
    return _on_paper(_paste((600, 600), _scaled(ink, 5, pen=4), 30 + rng.integers(20), 40 + rng.integers(20)))


def off_centre(ink, rng):  # small, in a corner of a large canvas
    return _on_paper(_paste((400, 400), _scaled(ink, 1.5), 10 + rng.integers(20), 220 + rng.integers(20)))


def photo(ink, rng):
    """Blue ink on off-white paper, 640x480 RGB, lit from one side, a shadow over the left border, JPEG q70."""
    mask = _paste((480, 640), _scaled(ink, 3.5, pen=6), 40 + rng.integers(30), 150 + rng.integers(60))  # strokes partly in the shadow
    yy, xx = np.mgrid[:480, :640]
    light = 0.75 + 0.25 * xx / 639  # a gradient across the page
    light = np.where(xx < 200 + 0.2 * yy, light * 0.45, light)  # a hard shadow over the left third, border included
    paper, pen = np.array([238, 232, 220], np.float32), np.array([35, 55, 170], np.float32)
    rgb = np.where(mask[..., None], pen, paper) * light[..., None] + rng.normal(0, 4, (480, 640, 1))
    buffer = io.BytesIO()
    Image.fromarray(np.clip(rgb, 0, 255).astype(np.uint8)).save(buffer, format="JPEG", quality=70)
    return np.asarray(Image.open(io.BytesIO(buffer.getvalue())))


def non_square(ink, rng):  # a wide 360x120 canvas, the glyph at its left
    return _on_paper(_paste((120, 360), _scaled(ink, 1.0), 8, 20 + rng.integers(40)))


def mouse(ink, rng):
    """The drawing page (280x280, white 14 px strokes on black), with the wobble of a hand on a mouse."""
    strokes = _scaled(ink, 2.5)
    strokes = np.asarray(Image.fromarray(strokes.astype(np.uint8) * 255).filter(ImageFilter.MaxFilter(7))) > 127
    wobble = np.cumsum(rng.integers(-1, 2, strokes.shape[0])).clip(-4, 4)  # each row shifted a little
    strokes = np.stack([np.roll(row, int(s)) for row, s in zip(strokes, wobble)])
    return np.where(_paste((280, 280), strokes, 8, 8), 255, 0).astype(np.uint8)


def dark_background(ink, rng):
    return 255 - _on_paper(_paste((200, 200), _scaled(ink, 1.5), 20, 20))


def transparent(ink, rng):  # RGBA: dark strokes on a transparent background
    mask = _paste((210, 210), _scaled(ink, 2.0), 0, 0)
    rgba = np.zeros((210, 210, 4), np.uint8)
    rgba[mask] = (20, 20, 20, 255)
    return rgba


RENDERINGS: dict[str, Callable] = {"dataset PNG (105x105)": lambda ink, rng: _on_paper(ink),
                                   "thin pen, 600x600": thin_pen, "off-centre, 400x400": off_centre,
                                   "photo: shadow, gradient, JPEG": photo, "non-square 360x120": non_square,
                                   "mouse strokes, drawing page": mouse, "dark background": dark_background,
                                   "transparent RGBA": transparent}


def shift_iou(a: np.ndarray, b: np.ndarray, max_shift: int = MAX_SHIFT) -> float:
    """The best IoU of two binary images over shifts of a by up to max_shift pixels each way."""
    best = 0.0
    for dy in range(-max_shift, max_shift + 1):
        for dx in range(-max_shift, max_shift + 1):
            moved = np.roll(a, (dy, dx), axis=(0, 1))
            union = np.logical_or(moved, b).sum()
            best = max(best, np.logical_and(moved, b).sum() / union if union else 0.0)
    return float(best)


def measure(count: int = 24, seed: int = 0, bundle: str | None = None) -> list[dict]:
    """One row per (rendering, preprocessing): mean shift-IoU, median ink ratio, refused, follow."""
    from vce_deploy import Converter

    glyphs = raw_glyphs(count, seed=seed)
    truth = np.stack([preprocess_dataset(_on_paper(ink)) for _, ink in glyphs])  # the dataset's own 28x28
    rng = np.random.default_rng(seed)
    converter = Converter.load(bundle, backend="onnxruntime", precision="fp32")
    rows = []
    for name, render in RENDERINGS.items():
        drawn = [render(ink, rng) for _, ink in glyphs]
        for label, mapping in (("old", preprocess_dataset), ("new", preprocess)):  # old: preprocess before issue 22
            outs, kept = [], []
            for i, image in enumerate(drawn):
                try:
                    outs.append(mapping(image))
                    kept.append(i)
                except InputError:
                    pass
            clean = np.stack([mapping(_on_paper(ink)) for _, ink in glyphs])  # the clean PNG, same mapping
            row = {"rendering": name, "preprocessing": label, "refused": count - len(kept)}
            if kept:
                got = np.stack(outs)
                row["iou"] = float(np.mean([shift_iou(g, truth[i]) for g, i in zip(got, kept)]))
                row["same"] = float(np.mean([shift_iou(g, clean[i]) for g, i in zip(got, kept)]))
                row["ink"] = float(np.median(got.sum((1, 2)) / truth[kept].sum((1, 2))))
                row["follow"] = _follow(converter, got, truth[kept], seed)
            rows.append(row)
    converter.close()
    return rows


def _mean_bce(y: np.ndarray, target: np.ndarray) -> float:
    """Summed BCE of Bernoulli means y (n, 28, 28) against one binary glyph, averaged over the n: nats
    (the runtime NLL's Bernoulli term, vce_deploy/nll.py)."""
    y = y.reshape(len(y), -1)
    return float(-_log_bernoulli(np.broadcast_to(target.reshape(1, -1), y.shape), y).mean())


def _follow(converter, glyphs: np.ndarray, truth: np.ndarray, seed: int) -> float:
    """Median over glyphs of: samples' BCE against their own dataset glyph / median BCE against the others'."""
    if len(glyphs) < 2:
        return float("nan")
    # run_convertor, not convert: the old mapping's blank conditions were accepted then, so they are scored
    n, q = 8, np.repeat(glyphs[:, None], 8, axis=0)  # (B * n, 1, 28, 28)
    z = np.random.default_rng(seed).standard_normal((len(q), converter.latent_dim), np.float32)
    samples = converter.run_convertor(z, q).reshape(len(glyphs), n, 28, 28)
    ratios = []
    for row in range(len(glyphs)):
        own = _mean_bce(samples[row], truth[row])
        others = np.median([_mean_bce(samples[row], truth[o]) for o in range(len(glyphs)) if o != row])
        ratios.append(own / others)
    return float(np.median(ratios))


def table(rows: list[dict], count: int) -> str:
    lines = [f"| rendering ({count} test glyphs) | preprocessing | shift-IoU | IoU vs clean | ink ratio | follow | refused |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        if "iou" in r:
            lines.append(f"| {r['rendering']} | {r['preprocessing']} | {r['iou']:.2f} | {r['same']:.2f} | {r['ink']:.2f} | "
                         f"{r['follow']:.2f} | {r['refused']} |")
        else:
            lines.append(f"| {r['rendering']} | {r['preprocessing']} | - | - | - | - | {r['refused']} |")
    return "\n".join(lines)


def training_stats() -> dict:
    """The statistics of the training images that preprocess's TRAIN_* constants hold."""
    from vce_deploy.omniglot import load_split

    images = load_split("paper", "train").images.reshape(-1, 28, 28).astype(bool)
    rows, cols = images.any(2), images.any(1)
    first = lambda a: a.argmax(1)  # noqa: E731
    last = lambda a: a.shape[1] - 1 - a[:, ::-1].argmax(1)  # noqa: E731
    extent = np.maximum(last(rows) - first(rows) + 1, last(cols) - first(cols) + 1)
    ink = images.sum((1, 2))
    return {"drawings": len(images), "median extent": float(np.median(extent)),
            "mean box centre (row, col)": (float(np.mean((first(rows) + last(rows)) / 2)),
                                           float(np.mean((first(cols) + last(cols)) / 2))),
            "mean stroke width": float(np.mean(stroke_width(images))), "ink range": (int(ink.min()), int(ink.max()))}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.robustness", description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=24, help="test glyphs re-drawn per rendering (default 24)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--bundle", default=None, help="bundle directory (default: the shipped bundle)")
    parser.add_argument("--stats", action="store_true", help="print the training statistics and stop")
    args = parser.parse_args(argv)
    if args.stats:
        for key, value in training_stats().items():
            print(f"{key}: {value}")
        return 0
    print(table(measure(args.count, args.seed, args.bundle), args.count))
    print(f"\nCPU: {cpu_model()}; onnxruntime fp32; seed {args.seed}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
