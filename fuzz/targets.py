"""Fuzz targets: one function per parser, bytes in. Each must end in a valid result or one of
the project's own errors (vce_deploy.errors.VCEError); anything else is a bug the fuzzer found.

Shared by the bounded CI run (tests/test_fuzz.py, hypothesis) and the long run
(`python -m fuzz TARGET`, atheris; docs/signing.md "Fuzzing"). The seeds of each target are
in tests/fuzz_corpus/TARGET/.

Adding a target: write
`def fuzz_NAME(data: bytes) -> None` that feeds `data` to the parser and checks what comes
back, add it to TARGETS, and put a few valid inputs in tests/fuzz_corpus/NAME/. Both drivers
and the corpus-replay test pick it up by name.
"""
from __future__ import annotations

import hashlib
import io
import json
import tempfile
import warnings
from functools import lru_cache
from pathlib import Path
from typing import Callable

import numpy as np

from vce_deploy.bundle import Bundle, UnsealedBundleWarning, manifest_bytes, parse_manifest_bytes
from vce_deploy.errors import VCEError
from vce_deploy.preprocess import IMAGE_SIZE, preprocess
from vce_deploy.signing import SIGNATURE, parse_signature, signed_digests

CORPUS = Path(__file__).resolve().parents[1] / "tests" / "fuzz_corpus"
EXPECTED = (VCEError,)  # every refusal; anything else escaping a target is a finding
# the bundle target's small files: real bytes whose sha256 a fuzzed manifest may or may not match
FILES = {"encoder.onnx": b"encoder", "convertor.onnx": b"convertor", "engines/e.plan": b"engine",
         "checkpoint.safetensors": b"weights", "checkpoint.json": b"{}"}


def _sealed_variant(data: bytes) -> bytes | None:
    """When data is a JSON object, the same object sealed: random bytes rarely pass the seal, and
    the fields behind it deserve fuzzing too."""
    try:
        raw = json.loads(data)
    except (ValueError, RecursionError):
        return None
    return manifest_bytes(raw) if isinstance(raw, dict) else None


def fuzz_manifest(data: bytes) -> None:
    """manifest.json bytes -> (Manifest, sealed) or BundleError; the sealed variant too."""
    for candidate in filter(None, (data, _sealed_variant(data))):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", UnsealedBundleWarning)
                manifest, sealed = parse_manifest_bytes(candidate, "fuzz", allow_unsealed=True)
        except EXPECTED:
            continue
        assert isinstance(sealed, bool) and manifest.files and manifest.format_version in (1, 2)
        assert sealed or manifest.format_version == 1, "an unsealed format-2 manifest was accepted"
        manifest.to_dict()  # what `vce inspect --json` prints: must not fail on anything parsed


@lru_cache(maxsize=1)
def _bundle_dir() -> Path:
    root = Path(tempfile.mkdtemp(prefix="vce-fuzz-bundle-"))
    for name, content in FILES.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(content)
    return root


@lru_cache(maxsize=1)
def _trusted_key():
    from cryptography.hazmat.primitives.asymmetric import ec

    return ec.generate_private_key(ec.SECP256R1()).public_key()


def fuzz_bundle(data: bytes) -> None:
    """A bundle directory whose manifest.json (and, after a 0xff byte, bundle.sig) come from data:
    Bundle.load with every hash, each listed file read through read_verified, and the
    trusted-key path. All end in a Bundle or a VCEError."""
    root = _bundle_dir()
    manifest, _, signature = data.partition(b"\xff")
    (root / "manifest.json").write_bytes(_sealed_variant(manifest) or manifest)
    (root / SIGNATURE).write_bytes(signature)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UnsealedBundleWarning)
        try:
            bundle = Bundle.load(root, verify=True, allow_unsealed=True)
            for entry in bundle.manifest.files.values():
                assert bundle.read_verified(entry) == (root / entry.path).read_bytes()
        except EXPECTED:
            pass
        try:
            Bundle.load(root, verify=False, trusted_keys=[_trusted_key()])
            raise AssertionError("a bundle signed by no trusted key was accepted")
        except EXPECTED:
            pass


def fuzz_signature(data: bytes) -> None:
    """bundle.sig bytes -> (payload, signatures) or BundleError, and the payload's statement too."""
    for candidate in (data, _signature_around(data)):
        try:
            payload, signatures = parse_signature(candidate, "fuzz")
        except EXPECTED:
            continue
        assert isinstance(payload, bytes) and signatures and all(isinstance(s, bytes) for s in signatures)
        try:
            digests = signed_digests(payload, "fuzz")
        except EXPECTED:
            continue
        assert all(len(d) == 64 for d in digests.values())


def _signature_around(statement: bytes) -> bytes:
    """data as the signed payload of a well-formed envelope: reaches the statement parser."""
    import base64

    return json.dumps({"dsseEnvelope": {"payloadType": "application/vnd.in-toto+json",
                                        "payload": base64.b64encode(statement).decode(),
                                        "signatures": [{"sig": "AAAA"}]}}).encode()


def fuzz_preprocess(data: bytes) -> None:
    """One glyph from data, as image file bytes and as a raw array -> (28, 28) in {0, 1} or InputError."""
    for glyph in (data, _as_array(data)):
        try:
            out = preprocess(glyph, "fuzz")
        except EXPECTED:
            continue
        assert out.shape == (IMAGE_SIZE, IMAGE_SIZE) and out.dtype == np.float32
        assert set(np.unique(out).tolist()) <= {0.0, 1.0}


ARRAY_DTYPES = (np.uint8, np.uint16, np.float32, np.float64, np.bool_, np.int32, np.float16, np.complex64)


def _as_array(data: bytes):
    """The first two bytes choose dtype and width, the rest are the pixels (any rank 2 shape)."""
    if len(data) < 2:
        return np.zeros((0, 0), np.uint8)
    dtype = np.dtype(ARRAY_DTYPES[data[0] % len(ARRAY_DTYPES)])
    body = data[2:][: len(data[2:]) // dtype.itemsize * dtype.itemsize]
    flat = np.frombuffer(body, dtype=dtype) if dtype != np.bool_ else np.frombuffer(body, np.uint8).astype(bool)
    width = max(1, data[1])
    return flat[: flat.size // width * width].reshape(-1, width)


# the Content-Types a fuzzed request body is sent as (its first byte picks one): JSON and a raw
# image are parsed, the rest must be refused with 415
SERVER_KINDS = ("application/json", "image/png", "text/plain", "multipart/form-data", "")


@lru_cache(maxsize=1)
def _server():
    """The shipped bundle on ONNX Runtime (CPU) and small limits: what checks a request's shape."""
    from vce_deploy.converter import Converter
    from vce_deploy.serve.requests import ServeSettings

    converter = Converter.load(backend="onnxruntime", device="cpu", threads=1)
    return converter, ServeSettings(max_image_pixels=256 * 256, max_images=4, max_n=8)


def fuzz_server_request(data: bytes) -> None:
    """A POST /v1/convert body (its first byte picks the Content-Type) through the server's own
    parsing (vce_deploy/serve/requests.py, as app.py and ray_app.py call it) -> a checked
    ConvertRequest, or an ApiError with a 4xx status: never a 500 for what a client sent."""
    from vce_deploy.serve.requests import ApiError, checked_request, options, parse_plain

    converter, settings = _server()
    kind = SERVER_KINDS[data[0] % len(SERVER_KINDS)] if data else ""
    try:
        fields, images = parse_plain(kind, data[1:], {}, ("image",), settings)
        opts = options(fields, "application/json", settings)
        request = checked_request(converter, images["image"], opts)
    except ApiError as err:
        assert 400 <= err.status < 500, f"{err.status} {err.code}: {err.message}"
        return
    assert request.conditions.shape[1:] == (1, IMAGE_SIZE, IMAGE_SIZE)
    assert 1 <= request.conditions.shape[0] <= settings.max_images and 1 <= request.n <= settings.max_n


TARGETS: dict[str, Callable[[bytes], None]] = {
    "manifest": fuzz_manifest,
    "bundle": fuzz_bundle,
    "signature": fuzz_signature,
    "preprocess": fuzz_preprocess,
    "server_request": fuzz_server_request,
}


def corpus(target: str) -> list[bytes]:
    folder = CORPUS / target
    return [p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()] if folder.is_dir() else []


def corpus_name(data: bytes) -> str:
    return hashlib.sha1(data).hexdigest()[:16]


def png_bytes(array: np.ndarray) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()
