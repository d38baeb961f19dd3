"""Seals and signatures: every tampered, unsigned, wrongly signed, downgraded (seal removed) or
version-swapped bundle is refused, and none is accepted (docs/signing.md).

Keys and certificates are generated here at run time; none is committed. The bundle under test
is a copy of the shipped default bundle (format 2, sealed), signed in the test.
"""
from __future__ import annotations

import base64
import datetime
import json
import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from vce_deploy import Converter
from vce_deploy import bundle as bundle_module
from vce_deploy.bundle import DEFAULT_BUNDLE, SEAL_KEY, Bundle, UnsealedBundleWarning, write_raw_manifest
from vce_deploy.cli import main as vce
from vce_deploy.errors import BundleError, InputError
from vce_deploy.bundle import MANIFEST
from vce_deploy.bundle_signing import sign_bundle, verify_bundle_signature
from vce_deploy.signing import SIGNATURE, check_signed_manifest


def write_key(directory: Path, name: str, curve=ec.SECP256R1()) -> tuple[Path, Path]:
    """A fresh EC key pair as PEM files: (private, public)."""
    key = ec.generate_private_key(curve)
    private, public = directory / f"{name}.key.pem", directory / f"{name}.pub.pem"
    private.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                          serialization.NoEncryption()))
    public.write_bytes(key.public_key().public_bytes(serialization.Encoding.PEM,
                                                     serialization.PublicFormat.SubjectPublicKeyInfo))
    return private, public


@pytest.fixture(scope="module")
def keys(tmp_path_factory) -> dict[str, tuple[Path, Path]]:
    directory = tmp_path_factory.mktemp("test-keys")
    return {"trusted": write_key(directory, "trusted"), "other": write_key(directory, "other"),
            "p384": write_key(directory, "p384", ec.SECP384R1())}


@pytest.fixture(scope="module")
def signed_original(keys, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("signed") / "bundle"
    shutil.copytree(DEFAULT_BUNDLE, root)
    sign_bundle(root, keys["trusted"][0])
    return root


@pytest.fixture
def signed(signed_original, tmp_path) -> Path:
    root = tmp_path / "bundle"
    shutil.copytree(signed_original, root)
    return root


@pytest.fixture
def nothing_deserialised(monkeypatch):
    """Record any manifest parse, ONNX Runtime session or safetensors read."""
    import onnxruntime
    import safetensors.torch

    calls = []
    real_parse = bundle_module.parse_manifest_bytes

    def parse(*args, **kwargs):
        calls.append("manifest")
        return real_parse(*args, **kwargs)

    class Session:
        def __init__(self, *args, **kwargs):
            calls.append("onnx")
            raise AssertionError("an ONNX Runtime session was created for a refused bundle")

    monkeypatch.setattr(bundle_module, "parse_manifest_bytes", parse)
    monkeypatch.setattr(onnxruntime, "InferenceSession", Session)
    monkeypatch.setattr(safetensors.torch, "load", lambda *a, **k: calls.append("safetensors"))
    return calls


def edit_raw(root: Path, change, seal: bool = True) -> None:
    raw = json.loads((root / "manifest.json").read_text())
    change(raw)
    if seal:
        write_raw_manifest(root, raw)
    else:
        raw.pop(SEAL_KEY, None)
        (root / "manifest.json").write_text(json.dumps(raw, indent=2))


def flip(path: Path, index: int | None = None) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2 if index is None else index] ^= 0x01
    path.write_bytes(bytes(data))


def edit_signature(root: Path, change) -> None:
    raw = json.loads((root / SIGNATURE).read_text())
    change(raw)
    (root / SIGNATURE).write_text(json.dumps(raw))


def edit_payload(root: Path, change) -> None:
    def rewrite(raw):
        statement = json.loads(base64.b64decode(raw["dsseEnvelope"]["payload"]))
        change(statement)
        raw["dsseEnvelope"]["payload"] = base64.b64encode(json.dumps(statement).encode()).decode()
    edit_signature(root, rewrite)


def flip_signature(raw: dict) -> None:
    entry = raw["dsseEnvelope"]["signatures"][0]
    sig = bytearray(base64.b64decode(entry["sig"]))
    sig[20] ^= 0x01
    entry["sig"] = base64.b64encode(bytes(sig)).decode()


def sign_other_bundle(root: Path, key: Path) -> None:
    """A valid signature by the trusted key, but made for another bundle (replayed here)."""
    other = root.parent / "other"
    shutil.copytree(root, other)
    (other / SIGNATURE).unlink()
    edit_raw(other, lambda raw: raw.update(step=raw["step"] + 1))
    sign_bundle(other, key)
    shutil.copy(other / SIGNATURE, root / SIGNATURE)


# name -> (how the signed bundle is damaged, precision whose load must refuse it,
#          refused before the manifest is parsed). Every case is also refused by `vce verify`'s full check.
ATTACKS = {
    "unsigned": (lambda r, k: (r / SIGNATURE).unlink(), "fp32", True),
    "signed by another key": (lambda r, k: sign_bundle(r, k["other"][0]), "fp32", True),
    "signature byte flipped": (lambda r, k: edit_signature(r, flip_signature), "fp32", True),
    "signed payload edited": (lambda r, k: edit_payload(r, lambda s: s["predicate"]["resources"][0].update(
        digest="0" * 64)), "fp32", True),
    "signature replayed from another bundle": (lambda r, k: sign_other_bundle(r, k["trusted"][0]), "fp32", True),
    "signature is not JSON": (lambda r, k: (r / SIGNATURE).write_bytes(b"\x00garbage"), "fp32", True),
    "manifest edited and resealed": (lambda r, k: edit_raw(r, lambda raw: raw.update(step=1)), "fp32", True),
    "manifest byte flipped": (lambda r, k: flip(r / "manifest.json"), "fp32", True),
    "seal removed (downgrade)": (lambda r, k: edit_raw(r, lambda raw: None, seal=False), "fp32", True),
    "version swapped to 1, seal removed": (lambda r, k: edit_raw(r, lambda raw: raw.update(format_version=1),
                                                                 seal=False), "fp32", True),
    "version swapped to 1, resealed": (lambda r, k: edit_raw(r, lambda raw: raw.update(format_version=1)), "fp32",
                                       True),
    "used model byte flipped": (lambda r, k: flip(r / "encoder.onnx"), "fp32", False),
    "int8 model byte flipped": (lambda r, k: flip(r / "convertor.int8.cpu.onnx"), "int8", False),
    "fp16 model truncated": (lambda r, k: (r / "encoder.fp16.onnx").write_bytes(b""), "fp16", False),
    "model file removed": (lambda r, k: (r / "convertor.onnx").unlink(), "fp32", False),
    "unsigned file added": (lambda r, k: shutil.copy(r / "encoder.onnx", r / "extra.onnx"), "fp32", False),
    "unsigned engine added": (lambda r, k: ((r / "engines").mkdir(), (r / "engines" / "e.plan").write_bytes(b"x")),
                              "fp32", False),
}


@pytest.mark.parametrize("attack", sorted(ATTACKS))
def test_every_attack_on_a_signed_bundle_is_refused(signed, keys, attack, nothing_deserialised):
    damage, precision, before_parsing = ATTACKS[attack]
    damage(signed, keys)
    nothing_deserialised.clear()  # signing the damaged copy parsed its manifest: only the load counts
    trusted = [keys["trusted"][1]]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UnsealedBundleWarning)
        with pytest.raises(BundleError):  # the runtime, even when the caller allows unsealed bundles
            Converter.load(signed, backend="onnxruntime", precision=precision, trusted_keys=trusted,
                           allow_unsealed=True)
    assert "onnx" not in nothing_deserialised and "safetensors" not in nothing_deserialised
    if before_parsing:
        assert nothing_deserialised == [], f"{attack}: the manifest was parsed before the signature refused it"
    with pytest.raises(BundleError):  # the full check, with our reader
        Bundle.load(signed, verify=True, trusted_keys=trusted)
    with pytest.raises(BundleError):  # and with model-signing's own verifier (`vce verify --signer`)
        verify_bundle_signature(signed, trusted)


def test_the_untouched_signed_bundle_loads_and_verifies(signed, keys):
    """The control: the same checks accept the bundle the attacks start from."""
    converter = Converter.load(signed, backend="onnxruntime", trusted_keys=[keys["trusted"][1]])
    assert converter.bundle.manifest.format_version == 2 and converter.bundle.sealed
    assert verify_bundle_signature(signed, [keys["other"][1], keys["trusted"][1]]).startswith("key trusted.pub.pem")
    with pytest.raises(BundleError, match="signed by another key"):
        Bundle.load(signed, trusted_keys=[keys["other"][1]])


def test_device_built_files_are_allowed_only_by_name(signed, keys):
    (signed / "engines").mkdir()
    (signed / "engines" / "encoder.fp16.plan").write_bytes(b"built here")
    trusted = [keys["trusted"][1]]
    with pytest.raises(BundleError, match=r"1 unsigned: \['engines/encoder.fp16.plan'\]"):
        Bundle.load(signed, verify=False, trusted_keys=trusted)
    Bundle.load(signed, verify=False, trusted_keys=trusted, device_built=["engines/*.plan"])
    with pytest.raises(BundleError, match="unsigned"):
        Bundle.load(signed, verify=False, trusted_keys=trusted, device_built=["engines/*.onnx"])


def test_a_local_signature_covers_a_bundle_changed_on_the_device(signed, keys):
    """After the device changes the bundle (a new manifest), its own key's signature is what it trusts."""
    edit_raw(signed, lambda raw: raw["metrics"].update(device_note="rebuilt here"))
    with pytest.raises(BundleError, match="changed after signing"):
        Bundle.load(signed, trusted_keys=[keys["trusted"][1]])
    sign_bundle(signed, keys["p384"][0])  # P-384: the hash follows the curve
    Bundle.load(signed, trusted_keys=[keys["trusted"][1], keys["p384"][1]])


def test_sign_refuses_a_tampered_or_cluttered_bundle(signed, keys):
    flip(signed / "convertor.fp16.onnx")
    with pytest.raises(BundleError, match="the file was changed"):
        sign_bundle(signed, keys["trusted"][0])
    flip(signed / "convertor.fp16.onnx")
    (signed / "notes.txt").write_text("x")
    with pytest.raises(BundleError, match=r"unlisted \['notes.txt'\]"):
        sign_bundle(signed, keys["trusted"][0])


@pytest.mark.parametrize("bad", [[], "key.pem", [b"not a key"], [42]])
def test_trusted_keys_must_be_keys(signed, bad):
    with pytest.raises(InputError, match="expected"):
        Bundle.load(signed, trusted_keys=bad)


def test_an_rsa_key_is_refused_by_name(tmp_path, signed):
    from cryptography.hazmat.primitives.asymmetric import rsa

    key = rsa.generate_private_key(public_exponent=65537, key_size=2048).public_key()
    with pytest.raises(InputError, match="elliptic-curve key"):
        check_signed_manifest(signed, b"{}", [key], MANIFEST)


def _certificates(directory: Path) -> tuple[Path, Path, Path]:
    """A CA and a leaf certificate (code signing) with the leaf's key: (key, leaf, ca)."""
    now = datetime.datetime.now(datetime.timezone.utc)

    def cert(subject, issuer, public, signer, ca):
        builder = (x509.CertificateBuilder().subject_name(subject).issuer_name(issuer).public_key(public)
                   .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(days=1))
                   .not_valid_after(now + datetime.timedelta(days=30))
                   .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
        if ca:
            builder = builder.add_extension(x509.KeyUsage(False, False, False, False, False, True, True, False, False),
                                            critical=True)
        else:
            builder = builder.add_extension(x509.KeyUsage(True, False, False, False, False, False, False, False, False),
                                            critical=True)
            builder = builder.add_extension(x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.CODE_SIGNING]),
                                            critical=False)
        return builder.sign(signer, hashes.SHA256())

    ca_key, leaf_key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "vce test CA")])
    leaf_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "vce test signer")])
    ca = cert(ca_name, ca_name, ca_key.public_key(), ca_key, True)
    leaf = cert(leaf_name, ca_name, leaf_key.public_key(), ca_key, False)
    paths = directory / "leaf.key.pem", directory / "leaf.pem", directory / "ca.pem"
    paths[0].write_bytes(leaf_key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                serialization.NoEncryption()))
    paths[1].write_bytes(leaf.public_bytes(serialization.Encoding.PEM))
    paths[2].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    return paths


def test_certificate_signing_verifies_offline_against_its_ca(signed, tmp_path, keys):
    key, leaf, ca = _certificates(tmp_path)
    with pytest.raises(InputError, match="expected --chain"):
        sign_bundle(signed, key, certificate=leaf)
    sign_bundle(signed, key, certificate=leaf, chain=[ca])
    assert "certificate chain" in verify_bundle_signature(signed, certificate_chain=[ca])
    Bundle.load(signed, trusted_keys=[leaf])  # the runtime pins the leaf certificate's key
    (tmp_path / "other").mkdir()
    _, other_leaf, other_ca = _certificates(tmp_path / "other")
    with pytest.raises(BundleError, match="expected a signature that verifies"):
        verify_bundle_signature(signed, certificate_chain=[other_ca])
    with pytest.raises(BundleError, match="signed by another key"):
        Bundle.load(signed, trusted_keys=[other_leaf])


# -- seals without signatures --------------------------------------------------------------------

@pytest.fixture
def plain(tmp_path) -> Path:
    root = tmp_path / "plain"
    shutil.copytree(DEFAULT_BUNDLE, root)
    return root


SEAL_ATTACKS = {
    "format 2, seal removed": (lambda r: edit_raw(r, lambda raw: None, seal=False), "requires the seal"),
    "format 2 -> 1, seal kept": (lambda r: (r / "manifest.json").write_bytes((r / "manifest.json").read_bytes().replace(
        b'"format_version": 2', b'"format_version": 1', 1)), "the manifest was changed"),
    "format 2 -> 1, seal removed": (lambda r: edit_raw(r, lambda raw: raw.update(format_version=1), seal=False),
                                    "allow_unsealed"),
    "format 2, seal of another manifest": (lambda r: (r / "manifest.json").write_bytes(
        (r / "manifest.json").read_bytes().replace(b'"step": ', b'"step": 1', 1)), "the manifest was changed"),
}


@pytest.mark.parametrize("attack", sorted(SEAL_ATTACKS))
def test_downgrades_and_version_swaps_are_refused_without_a_signature(plain, attack):
    damage, message = SEAL_ATTACKS[attack]
    damage(plain)
    with pytest.raises(BundleError, match=message):
        Converter.load(plain, backend="onnxruntime")


def test_an_unsealed_format_1_bundle_loads_only_when_asked(plain):
    edit_raw(plain, lambda raw: raw.update(format_version=1), seal=False)
    with pytest.raises(BundleError, match="nothing would detect an edited manifest.*allow_unsealed=True"):
        Bundle.load(plain)
    with pytest.warns(UnsealedBundleWarning, match="edited or downgraded manifest .* cannot be told"):
        converter = Converter.load(plain, backend="onnxruntime", allow_unsealed=True)
    assert not converter.bundle.sealed and converter.bundle.manifest.format_version == 1
    assert vce(["inspect", str(plain)]) == 1
    with pytest.warns(UnsealedBundleWarning):
        assert vce(["inspect", str(plain), "--allow-unsealed"]) == 0


def test_converter_load_hashes_only_the_files_it_reads(plain, monkeypatch):
    """fp32 on ONNX Runtime reads encoder.onnx and convertor.onnx, each hashed once as it is read;
    nothing else is hashed (the full check is `vce verify`)."""
    read, hashed = [], []
    real_read = Bundle.read_verified
    monkeypatch.setattr(Bundle, "read_verified", lambda self, entry: read.append(entry.path) or real_read(self, entry))
    monkeypatch.setattr(bundle_module, "sha256_file", lambda path: hashed.append(path))
    Converter.load(plain, backend="onnxruntime", precision="fp32")
    assert sorted(read) == ["convertor.onnx", "encoder.onnx"] and hashed == []


# -- the commands --------------------------------------------------------------------------------

def test_vce_sign_and_verify(plain, keys, capsys):
    assert vce(["sign", str(plain), "--key", str(keys["trusted"][0])]) == 0
    assert vce(["verify", str(plain), "--signer", str(keys["other"][1]), "--batch", "1"]) == 1
    assert "expected a signature that verifies" in capsys.readouterr().err
    assert vce(["verify", str(plain), "--signer", str(keys["trusted"][1]), "--batch", "1"]) == 0
    assert "signature: valid, by key trusted.pub.pem" in capsys.readouterr().out
    out = plain.parent / "out.png"
    glyph = plain.parent / "glyph.png"
    from PIL import Image
    Image.fromarray(np.eye(28, dtype=np.uint8) * 255).save(glyph)  # a stroke: a blank glyph is refused (issue 22)
    assert vce(["convert", str(glyph), "-n", "1", "-o", str(out), "--bundle", str(plain), "--backend",
                "onnxruntime", "--trusted-key", str(keys["other"][1])]) == 1
    assert "signed by another key" in capsys.readouterr().err and not out.exists()
    assert vce(["convert", str(glyph), "-n", "1", "-o", str(out), "--bundle", str(plain), "--backend",
                "onnxruntime", "--trusted-key", str(keys["trusted"][1])]) == 0 and out.exists()
