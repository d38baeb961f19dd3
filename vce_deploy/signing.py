"""Bundle signatures in the OpenSSF model-signing format (docs/signing.md).

`bundle.sig` beside manifest.json is a Sigstore bundle holding a DSSE envelope whose in-toto
statement lists the sha256 of every file in the bundle directory (manifest.json included, the
signature itself excluded), signed with an elliptic-curve key or a certificate's key.

Two halves, on purpose:
- `sign_bundle` and `verify_bundle_signature` (`vce sign`, `vce verify --signer`; in
  vce_deploy/bundle_signing.py, which needs Bundle while bundle.py imports this module) use the
  `model-signing` package itself, so the files it writes and checks are its format exactly, and
  the full check hashes every file.
- `check_signed_manifest` (Converter.load(trusted_keys=...)) re-implements only the offline
  key check on `cryptography`: verify the envelope's ECDSA signature, then compare the signed
  sha256 of manifest.json with its bytes. It runs before the manifest is parsed and hashes
  nothing else: the manifest's sha256 per file then covers each file a backend reads, hashed
  as it is read (Bundle.read_verified). model-signing is not imported on this path (it takes
  ~1 s to import sigstore and protobuf); tests check both halves agree on the same files.
"""
from __future__ import annotations

import base64
import binascii
import fnmatch
import hashlib
import json
import os
from pathlib import Path
from typing import Any, Iterable, Sequence

from .errors import BundleError, InputError

SIGNATURE = "bundle.sig"
MAX_SIGNATURE_BYTES = 4 << 20  # a real one is ~4 KB (one line per file); refuse to read a huge one
PAYLOAD_TYPE = "application/vnd.in-toto+json"
STATEMENT_TYPE = "https://in-toto.io/Statement/v1"
PREDICATE_TYPE = "https://model_signing/signature/v1.0"
CURVES = {"secp256r1": "SHA256", "secp384r1": "SHA384", "secp521r1": "SHA512"}  # model-signing's, and its hashes


# -- keys ---------------------------------------------------------------------------------------

def load_public_key(key: Any, what: str = "trusted key"):
    """An elliptic-curve public key from a cryptography key object, PEM bytes, or a path to a PEM
    public key or certificate (a certificate pins its key; chains are checked by `vce verify`)."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    if hasattr(key, "public_bytes") and hasattr(key, "verify"):  # a cryptography public key of any type
        public = key
    else:
        if isinstance(key, (str, os.PathLike)):
            path = Path(key)
            if not path.is_file():
                raise InputError(f"{what} {str(path)!r}: expected a PEM public key or certificate file, "
                                 "but it does not exist")
            pem, what = path.read_bytes()[:1 << 20], f"{what} {str(path)!r}"
        elif isinstance(key, (bytes, bytearray)):
            pem = bytes(key)
        else:
            raise InputError(f"{what}: expected a path, PEM bytes or an EllipticCurvePublicKey, "
                             f"got {type(key).__name__}")
        try:
            if b"-----BEGIN CERTIFICATE-----" in pem:
                from cryptography import x509  # only here: it is most of cryptography's import time

                public = x509.load_pem_x509_certificate(pem).public_key()
            else:
                public = serialization.load_pem_public_key(pem)
        except (ValueError, TypeError) as err:
            raise InputError(f"{what}: expected a PEM public key or certificate, got unreadable bytes ({err})") from err
    if not isinstance(public, ec.EllipticCurvePublicKey) or public.curve.name not in CURVES:
        name = getattr(getattr(public, "curve", None), "name", type(public).__name__)
        raise InputError(f"{what}: expected an elliptic-curve key on {sorted(CURVES)} (what model-signing "
                         f"supports), got {name}")
    return public


def key_fingerprint(public) -> str:
    """sha256 of the key's PEM: model-signing's key hint, printed by `vce verify`."""
    from cryptography.hazmat.primitives import serialization

    pem = public.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    return hashlib.sha256(pem).hexdigest()


# -- the load-time check (cryptography only) ------------------------------------------------------

def pae(payload: bytes) -> bytes:
    """DSSE v1 pre-authentication encoding: what the signature is computed over."""
    return b"DSSEv1 %d %s %d %s" % (len(PAYLOAD_TYPE), PAYLOAD_TYPE.encode(), len(payload), payload)


def parse_signature(data: bytes, where: str) -> tuple[bytes, list[bytes]]:
    """bundle.sig's bytes -> (DSSE payload, signatures). Any other shape is a BundleError."""
    raw = _json(data, where, "a model-signing signature (JSON)")
    envelope = raw.get("dsseEnvelope") if isinstance(raw, dict) else None
    if not isinstance(envelope, dict):
        raise BundleError(f"{where}: expected a Sigstore bundle with a 'dsseEnvelope' object, got "
                          f"{type(raw).__name__ if not isinstance(raw, dict) else sorted(raw)[:8]}")
    if envelope.get("payloadType") != PAYLOAD_TYPE:
        raise BundleError(f"{where}: expected payloadType {PAYLOAD_TYPE!r}, got {envelope.get('payloadType')!r}")
    signatures = envelope.get("signatures")
    if not isinstance(signatures, list) or not signatures or not all(
            isinstance(s, dict) and isinstance(s.get("sig"), str) for s in signatures):
        raise BundleError(f"{where}: expected dsseEnvelope.signatures as a non-empty list of {{sig: base64}}, "
                          f"got {str(signatures)[:200]}")
    payload = envelope.get("payload")
    if not isinstance(payload, str):
        raise BundleError(f"{where}: expected dsseEnvelope.payload as base64 text, got {type(payload).__name__}")
    return _b64(payload, where, "payload"), [_b64(s["sig"], where, "signature") for s in signatures]


def _json(data: bytes, where: str, expected: str):
    """UTF-8 JSON bytes -> the value; unreadable bytes (deep nesting included) are a BundleError."""
    try:
        return json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as err:
        raise BundleError(f"{where}: expected {expected}, got unreadable bytes ({type(err).__name__})") from err


def _b64(text: str, where: str, what: str) -> bytes:
    try:
        return base64.b64decode(text.encode("ascii"), validate=True)
    except (binascii.Error, UnicodeEncodeError, ValueError) as err:
        raise BundleError(f"{where}: expected the {what} as base64, got undecodable text ({err})") from err


def signed_digests(payload: bytes, where: str) -> dict[str, str]:
    """The in-toto statement model-signing signs -> {file: sha256 hex}."""
    statement = _json(payload, where, "an in-toto statement (JSON) as the signed payload")
    predicate = statement.get("predicate") if isinstance(statement, dict) else None
    if (not isinstance(predicate, dict) or statement.get("_type") != STATEMENT_TYPE
            or statement.get("predicateType") != PREDICATE_TYPE):
        raise BundleError(f"{where}: expected an in-toto statement {STATEMENT_TYPE} with predicateType "
                          f"{PREDICATE_TYPE!r}, got {str(statement)[:200]}")
    serialization = predicate.get("serialization")
    if not isinstance(serialization, dict) or serialization.get("method") != "files" \
            or serialization.get("hash_type") != "sha256":
        raise BundleError(f"{where}: expected serialization {{method: files, hash_type: sha256}} (what `vce sign` "
                          f"writes), got {str(serialization)[:200]}")
    resources = predicate.get("resources")
    digests: dict[str, str] = {}
    for item in resources if isinstance(resources, list) else [None]:
        ok = (isinstance(item, dict) and item.get("algorithm") == "sha256" and isinstance(item.get("name"), str)
              and isinstance(item.get("digest"), str) and len(item["digest"]) == 64
              and all(c in "0123456789abcdef" for c in item["digest"]) and item["name"] not in digests)
        if not ok:
            raise BundleError(f"{where}: expected resources as a list of distinct {{name, algorithm: sha256, digest: "
                              f"64 hex}}, got {str(item)[:200]}")
        digests[item["name"]] = item["digest"]
    return digests


def check_signed_manifest(root: Path, manifest_data: bytes, trusted_keys: Iterable[Any],
                          manifest: str) -> dict[str, str]:
    """Refuse unless bundle.sig is signed by one of trusted_keys and signs these bytes of the
    manifest (file name `manifest`: bundle.MANIFEST, passed in because bundle.py imports this
    module, not the other way round). Returns the signed {file: sha256}. Nothing of the bundle
    but bundle.sig is parsed here."""
    try:
        from cryptography.exceptions import InvalidSignature
        from cryptography.hazmat.primitives import hashes
        from cryptography.hazmat.primitives.asymmetric import ec
    except ImportError as err:
        raise InputError(f"trusted_keys: checking signatures needs cryptography: expected `pip install "
                         f"'vce-deploy[signing]'`, got {err}") from err

    if isinstance(trusted_keys, (str, bytes, os.PathLike)) or not hasattr(trusted_keys, "__iter__"):
        raise InputError(f"trusted_keys: expected a list of public keys (paths, PEM bytes or key objects), "
                         f"got {type(trusted_keys).__name__}")
    keys = [load_public_key(k) for k in trusted_keys]
    if not keys:
        raise InputError("trusted_keys: expected at least one public key, got an empty list "
                         "(pass None to load without a signature check)")
    path = Path(root) / SIGNATURE
    if not path.is_file() or path.is_symlink():
        raise BundleError(f"{root}: expected a signature {SIGNATURE} (trusted_keys was given), got none: the bundle "
                          "is unsigned (sign it with `vce sign BUNDLE --key KEY`)")
    if path.stat().st_size > MAX_SIGNATURE_BYTES:
        raise BundleError(f"{path}: expected at most {MAX_SIGNATURE_BYTES} bytes, got {path.stat().st_size}")
    payload, signatures = parse_signature(path.read_bytes(), str(path))
    message = pae(payload)
    for key in keys:
        for signature in signatures:
            try:
                key.verify(signature, message, ec.ECDSA(getattr(hashes, CURVES[key.curve.name])()))
            except InvalidSignature:
                continue
            digests = signed_digests(payload, str(path))
            actual = hashlib.sha256(manifest_data).hexdigest()
            if digests.get(manifest) != actual:
                raise BundleError(f"{path}: the signature covers {manifest} with sha256 "
                                  f"{str(digests.get(manifest))[:16]}..., the bundle's hashes to {actual[:16]}...: "
                                  "the manifest was changed after signing")
            return digests
    raise BundleError(f"{path}: expected a signature by one of the {len(keys)} trusted key(s) "
                      f"({', '.join(key_fingerprint(k)[:16] for k in keys)}...), got none that verifies: signed by "
                      "another key, or the signature was altered")


def bundle_files(root: Path) -> list[str]:
    """Every file (and symlink) under root, "/"-separated and relative, bundle.sig left out."""
    found = []
    for directory, dirs, names in os.walk(root):
        here = Path(directory).relative_to(root)
        links = [d for d in dirs if (Path(directory) / d).is_symlink()]  # never followed, but still listed
        found += [(here / name).as_posix() for name in names + links]
    return sorted(f for f in found if f != SIGNATURE)


def check_signed_files(bundle, digests: dict[str, str], manifest: str, device_built: Sequence[str] = ()) -> None:
    """The signature lists exactly the manifest's files (same sha256) and the manifest itself (file
    name `manifest`) of `bundle` (a bundle.Bundle); files on disk that it does not list are refused
    unless they match a device_built pattern."""
    if isinstance(device_built, (str, bytes)) or not all(isinstance(p, str) for p in device_built):
        raise InputError(f"device_built: expected a list of glob patterns (str), got {device_built!r}")
    listed = {path: entry.sha256 for path, entry in bundle.manifest.files.items()}
    listed[manifest] = digests.get(manifest, "")
    problems = [f"{p!r} not signed" for p in sorted(set(listed) - set(digests))]
    problems += [f"{p!r} signed but not in the manifest" for p in sorted(set(digests) - set(listed))]
    problems += [f"{p!r} sha256 differs between the signature and the manifest" for p in sorted(set(listed) & set(digests))
                 if listed[p] != digests[p]]
    if problems:
        raise BundleError(f"{bundle.path}: expected the signature to cover exactly the manifest's files, got: "
                          + "; ".join(problems[:10]))
    extra = [f for f in bundle_files(bundle.path)
             if f not in digests and not any(fnmatch.fnmatchcase(f, p) for p in device_built)]
    if extra:
        raise BundleError(f"{bundle.path}: expected only signed files, got {len(extra)} unsigned: {extra[:10]}; "
                          "files built on this device must be allowed by name (device_built=['engines/*']) or "
                          "covered by a local signature (`vce sign` with this device's key)")
