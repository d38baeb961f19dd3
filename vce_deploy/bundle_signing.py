"""Signing a bundle and checking its signature in full, with the OpenSSF model-signing package
(`vce sign`, `vce verify --signer`, `python -m export --sign-key`; docs/signing.md). The
load-time check (Bundle.load(trusted_keys=...)) is vce_deploy/signing.py, which bundle.py
imports; this module needs Bundle itself, so it lives apart from it (no import cycle).
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Sequence

from .bundle import MANIFEST, Bundle
from .errors import BundleError, InputError
from .fsio import atomic_write_bytes
from .signing import CURVES, SIGNATURE, bundle_files, key_fingerprint, load_public_key


def _hashing_config():
    from model_signing import hashing

    return (hashing.Config().use_file_serialization(hashing_algorithm="sha256", allow_symlinks=False)
            .set_ignored_paths(paths=[SIGNATURE], ignore_git_paths=False))


def _model_signing():
    try:
        import model_signing.signing
        import model_signing.verifying
    except ImportError as err:  # model-signing, or pyOpenSSL that its certificate module needs
        raise InputError(f"signing needs the model-signing package: expected `pip install 'vce-deploy[signing]'`, "
                         f"got {err}") from err
    return model_signing


def sign_bundle(path: str | os.PathLike, key: str | os.PathLike, password: str | None = None,
                certificate: str | os.PathLike | None = None, chain: Sequence[str | os.PathLike] = ()) -> Path:
    """Sign every file of a verified, sealed bundle with an EC private key (PEM), or with a
    certificate and its key: writes BUNDLE/bundle.sig atomically and returns its path."""
    bundle = Bundle.load(path, verify=True)  # a tampered bundle is refused, not signed
    if not bundle.sealed:
        raise BundleError(f"{bundle.path}: expected a sealed manifest to sign, got an unsealed one (re-export it)")
    unlisted = sorted(set(bundle_files(bundle.path)) - set(bundle.manifest.files) - {MANIFEST})
    if unlisted:
        raise BundleError(f"{bundle.path}: expected only the manifest's files in the bundle, got unlisted "
                          f"{unlisted[:10]}; remove them (the signature would cover files nothing checks)")
    if certificate is not None and not chain:  # model-signing needs the chain it embeds for verifiers
        raise InputError("--certificate: expected --chain with the issuing CA (and any intermediates), got none")
    for name, value in (("--key", key), ("--certificate", certificate), *(("--chain", c) for c in chain)):
        if value is not None and not Path(value).is_file():
            raise InputError(f"{name} {str(value)!r}: expected a PEM file, but it does not exist")
    ms = _model_signing()
    config = ms.signing.Config().set_hashing_config(_hashing_config())
    try:
        if certificate is None:
            config.use_elliptic_key_signer(private_key=key, password=password)
        else:
            config.use_certificate_signer(private_key=key, signing_certificate=certificate, certificate_chain=chain)
        with tempfile.TemporaryDirectory() as scratch:
            written = Path(scratch) / SIGNATURE
            config.sign(bundle.path, written)
            data = written.read_bytes()
    except (ValueError, TypeError) as err:  # a wrong password, a key that is not EC on a supported curve
        raise InputError(f"--key {str(key)!r}: expected an EC private key (PEM) on {sorted(CURVES)}"
                         f"{' matching the certificate' if certificate else ''}, got: {err}") from err
    return atomic_write_bytes(bundle.path / SIGNATURE, data)


def verify_bundle_signature(path: str | os.PathLike, signers: Sequence[str | os.PathLike] = (),
                            certificate_chain: Sequence[str | os.PathLike] = ()) -> str:
    """The full check (`vce verify --signer`): model-signing verifies bundle.sig against one of the
    public keys (or, with certificate_chain, the certificate chain) and hashes every file. Returns
    who signed; raises BundleError."""
    root = Path(path)
    signature = root / SIGNATURE
    if not signature.is_file():
        raise BundleError(f"{root}: expected a signature {SIGNATURE}, got none: the bundle is unsigned")
    ms = _model_signing()
    failures = []
    verifiers = [(f"key {Path(s).name} ({key_fingerprint(load_public_key(s, '--signer'))[:16]}...)",
                  lambda config, s=s: config.use_elliptic_key_verifier(public_key=s)) for s in signers]
    if certificate_chain:
        verifiers.append((f"certificate chain {[Path(c).name for c in certificate_chain]}",
                          lambda config: config.use_certificate_verifier(certificate_chain=certificate_chain)))
    if not verifiers:
        raise InputError("verify: expected at least one --signer public key or a --ca certificate chain")
    for who, use in verifiers:
        config = ms.verifying.Config().set_hashing_config(_hashing_config())
        try:
            use(config).verify(root, signature)
        except Exception as err:  # noqa: BLE001 - model-signing raises ValueError, InvalidSignature, OpenSSL errors
            failures.append(f"{who}: {type(err).__name__}: {str(err)[:300]}")
            continue
        # model-signing saw exactly the signed files with their digests; now the manifest must be sealed
        # and its every listed file hash as it says
        Bundle.load(root, verify=True)
        return who
    raise BundleError(f"{signature}: expected a signature that verifies, got: " + " | ".join(failures))
