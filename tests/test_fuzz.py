"""The bounded fuzz run: thousands of generated inputs through every target of fuzz/targets.py
(manifest parser, bundle loader, signature parser, preprocess, the server's request parsing), each ending in a valid result
or a VCEError, never another exception; and the committed corpus replayed (tests/fuzz_corpus).

Hypothesis drives it here (~6,000 inputs, about a minute on 2 busy cores); the long
coverage-guided runs use atheris: `python -m fuzz TARGET -atheris_runs=N` (docs/signing.md
"Fuzzing"). More examples:
VCE_FUZZ_EXAMPLES=20000 pytest tests/test_fuzz.py.
"""
from __future__ import annotations

import base64
import copy
import json
import os

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fuzz.seed_corpus import _small_manifest
from fuzz.targets import (TARGETS, corpus, fuzz_bundle, fuzz_manifest, fuzz_preprocess, fuzz_server_request,
                          fuzz_signature, png_bytes)
from vce_deploy.bundle import DEFAULT_BUNDLE
from vce_deploy.signing import PAYLOAD_TYPE, PREDICATE_TYPE, STATEMENT_TYPE

SCALE = int(os.environ.get("VCE_FUZZ_EXAMPLES", "0")) or None


def examples(default: int) -> int:
    return SCALE or default


FAST = dict(deadline=None, derandomize=False, database=None, suppress_health_check=list(HealthCheck))

JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-2, 2**70) | st.floats() | st.text(max_size=10)
    | st.sampled_from(["fp32", "int8", "onnx", "tensorrt", "encoder", "convertor", "batch", "float32", "a" * 64]),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8) | st.sampled_from(
        ["sha256", "role", "format", "precision", "inputs", "outputs", "engine", "name", "shape", "dtype"]),
        inner, max_size=4),
    max_leaves=10)


def paths_of(value, prefix=()):
    """Every path into a JSON value (dict keys, list indices)."""
    yield prefix
    if isinstance(value, dict):
        for key, child in value.items():
            yield from paths_of(child, prefix + (key,))
    elif isinstance(value, list):
        for index, child in enumerate(value):
            yield from paths_of(child, prefix + (index,))


@st.composite
def mutated(draw, base: dict):
    """base with 1-3 subtrees replaced by arbitrary JSON, or deleted."""
    raw = copy.deepcopy(base)
    for _ in range(draw(st.integers(1, 3))):
        paths = [p for p in paths_of(raw) if p]
        if not paths:
            break
        path = draw(st.sampled_from(paths))
        parent = raw
        for key in path[:-1]:
            parent = parent[key]
        if draw(st.booleans()) and isinstance(parent, dict):
            del parent[path[-1]]
        else:
            parent[path[-1]] = draw(JSON)
    return raw


# the shipped manifest's structure, without the free-form records (metrics, configs) that would
# make most mutations land where the parser only checks "is an object"
DEFAULT_MANIFEST = {k: v for k, v in json.loads((DEFAULT_BUNDLE / "manifest.json").read_text()).items()
                    if k not in ("metrics", "exporter", "train_config", "model_config", "preprocessing")}
SMALL = _small_manifest()


@settings(max_examples=examples(700), **FAST)
@given(st.one_of(mutated(DEFAULT_MANIFEST), mutated(SMALL), JSON), st.booleans())
def test_manifest_parser(raw, as_text):
    data = json.dumps(raw).encode() if as_text else json.dumps(raw, indent=2).encode()
    fuzz_manifest(data)  # sealed and unsealed variants both


@settings(max_examples=examples(1500), **FAST)
@given(st.binary(max_size=300) | st.text(max_size=200).map(str.encode))
def test_manifest_parser_on_bytes(data):
    fuzz_manifest(data)


def envelope(statement_raw, sig: bytes, payload_type: str, as_base64: bool) -> bytes:
    payload = json.dumps(statement_raw).encode()
    return json.dumps({"dsseEnvelope": {
        "payloadType": payload_type, "payload": base64.b64encode(payload).decode() if as_base64 else payload.decode(),
        "signatures": [{"sig": base64.b64encode(sig).decode()}]}}).encode()


STATEMENT = {"_type": STATEMENT_TYPE, "predicateType": PREDICATE_TYPE, "subject": [],
             "predicate": {"serialization": {"method": "files", "hash_type": "sha256"},
                           "resources": [{"name": "manifest.json", "algorithm": "sha256", "digest": "ab" * 32}]}}


@settings(max_examples=examples(700), **FAST)
@given(mutated(STATEMENT) | JSON, st.binary(max_size=80),
       st.sampled_from([PAYLOAD_TYPE, "text/plain", ""]), st.booleans())
def test_signature_parser(statement, sig, payload_type, as_base64):
    fuzz_signature(envelope(statement, sig, payload_type, as_base64))


@settings(max_examples=examples(1000), **FAST)
@given(st.binary(max_size=400))
def test_signature_parser_on_bytes(data):
    fuzz_signature(data)


@settings(max_examples=examples(400), **FAST)
@given(mutated(SMALL), st.booleans(), st.binary(max_size=100))
def test_bundle_loader(raw, with_signature, signature):
    fuzz_bundle(json.dumps(raw).encode() + (b"\xff" + signature if with_signature else b""))


@settings(max_examples=examples(1200), **FAST)
@given(st.binary(max_size=600))
def test_preprocess_on_bytes(data):
    fuzz_preprocess(data)


@st.composite
def damaged_png(draw):
    """A real small PNG with a few bytes changed, cut or appended: reaches the decoders."""
    import numpy as np

    side = draw(st.integers(1, 40))
    glyph = (np.arange(side * side).reshape(side, side) % 7 == 0).astype(np.uint8) * 255
    data = bytearray(png_bytes(glyph))
    for _ in range(draw(st.integers(0, 4))):
        index = draw(st.integers(0, len(data) - 1))
        data[index] = draw(st.integers(0, 255))
    cut = draw(st.integers(8, len(data)))
    return bytes(data[:cut]) + draw(st.binary(max_size=8))


@settings(max_examples=examples(600), **FAST)
@given(damaged_png())
def test_preprocess_on_damaged_images(data):
    fuzz_preprocess(data)


GLYPH = [[255 * ((r * 28 + c) % 9 == 0) for c in range(28)] for r in range(28)]
REQUEST = {"image": GLYPH, "n": 2, "seed": 7, "temperature": 1.0, "format": "json"}
PIXELS = st.lists(st.lists(st.integers(-2, 300) | st.floats() | st.booleans() | st.text(max_size=2),
                           max_size=5), max_size=5)


@settings(max_examples=examples(500), **FAST)
@given(mutated(REQUEST) | mutated({"images": [GLYPH, GLYPH], "n": 1}) | st.fixed_dictionaries(
    {"image": PIXELS}, optional={"n": JSON, "seed": JSON, "temperature": JSON, "format": JSON}) | JSON)
def test_server_request_json(raw):
    fuzz_server_request(b"\x00" + json.dumps(raw).encode())  # \x00: sent as application/json


@settings(max_examples=examples(800), **FAST)
@given(st.binary(max_size=300) | st.text(max_size=200).map(lambda t: b"\x00" + t.encode()))
def test_server_request_on_bytes(data):
    fuzz_server_request(data)


@pytest.mark.parametrize("target", sorted(TARGETS))
def test_corpus_replays_clean(target):
    """Every committed seed and past finding still ends in a result or a VCEError."""
    inputs = corpus(target)
    assert inputs, f"tests/fuzz_corpus/{target} is empty: run `python -m fuzz.seed_corpus`"
    for data in inputs:
        TARGETS[target](data)
