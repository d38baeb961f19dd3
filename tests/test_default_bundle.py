"""The shipped default bundle: verifies, loads with no path, and draws the glyph it was shown.

A broken default (untrained weights, a swapped file, a preprocessing drift) fails here: the
samples must be far closer to their own condition than to any other character's drawing.
"""
from __future__ import annotations

import numpy as np
import pytest

from vce_deploy import Converter
from vce_deploy.bundle import Bundle, default_bundle_path

from vce_deploy.omniglot import load_split


def mean_bce(y: np.ndarray, target: np.ndarray) -> float:
    """Per-image summed BCE of Bernoulli means y against a binary glyph, averaged: nats."""
    y = np.clip(y, 1e-6, 1 - 1e-6)
    return float(-(target * np.log(y) + (1 - target) * np.log(1 - y)).sum(axis=(-2, -1)).mean())


@pytest.fixture(scope="module")
def converter():
    return Converter.load(backend="onnxruntime")


def test_default_bundle_verifies_and_is_trained():
    bundle = Bundle.load(default_bundle_path())  # every sha256 checked
    manifest = bundle.manifest
    assert manifest.model_config["channels"] == 32 and manifest.model_config["blocks"] == 8
    assert manifest.step > 10_000, "the shipped model is the trained default preset, not a smoke model"
    assert {e.precision for e in bundle.entries("convertor", "onnx")} >= {"fp32", "int8"}
    assert bundle.checkpoint is not None


@pytest.mark.parametrize("precision", ["fp32", "int8"])
def test_conversions_look_like_their_condition(precision):
    """For 16 test characters (never trained on), the samples' BCE against their own condition
    over the median BCE against the other 15 conditions. Measured on the shipped model (fp32):
    mean ratio 0.37, 15 of 16 below 0.5; a model that ignores its condition sits near 1."""
    converter = Converter.load(backend="onnxruntime", precision=precision)
    test = load_split("small", "test")
    characters = list(range(0, len(test), 7))  # spread over the three test alphabets
    samples = converter.convert(test.images[characters, 0], n=16, seed=0)  # (16, 16, 28, 28)
    ratios = []
    for row, c in enumerate(characters):
        own = mean_bce(samples[row], test.images[c, 0])
        others = np.median([mean_bce(samples[row], test.images[o, 0]) for o in characters if o != c])
        ratios.append(own / others)
    ratios = np.array(ratios)
    assert ratios.mean() < 0.6, (precision, ratios.round(2))
    assert (ratios < 0.6).mean() >= 0.8, (precision, ratios.round(2))


def test_same_drawing_other_hand_is_closer_than_other_characters(converter):
    """Samples of a glyph are variations of that character: another person's drawing of the
    same character fits them better than drawings of other characters do."""
    test = load_split("small", "test")
    c, other = 10, 70
    samples = converter.convert(test.images[c, 0], n=32, seed=1)[0]
    same = np.mean([mean_bce(samples, test.images[c, i]) for i in range(1, 20)])
    different = np.mean([mean_bce(samples, test.images[other, i]) for i in range(20)])
    assert same < different, (same, different)
