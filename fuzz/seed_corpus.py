"""Write the seed inputs of tests/fuzz_corpus/ (python -m fuzz.seed_corpus): a few small valid
inputs per target for the fuzzers to mutate. Findings are added by hand next to them."""
from __future__ import annotations

import base64
import hashlib
import io
import json
import tempfile
from pathlib import Path

import numpy as np

from vce_deploy.bundle import DEFAULT_BUNDLE, manifest_bytes

from .targets import CORPUS, FILES, corpus_name, png_bytes


def _small_manifest(version: int = 2) -> dict:
    io_spec = {"name": "x", "shape": ["batch", 1, 28, 28], "dtype": "float32"}
    files = {name: {"sha256": hashlib.sha256(content).hexdigest(), "role": role, "format": fmt, "precision": "fp32"}
             for (name, content), (role, fmt) in zip(FILES.items(), [
                 ("encoder", "onnx"), ("convertor", "onnx"), ("convertor", "tensorrt"), ("checkpoint", "safetensors"),
                 ("checkpoint-meta", "json")])}
    files["encoder.onnx"].update(inputs=[io_spec], outputs=[dict(io_spec, name="mu", shape=["batch", 56])])
    files["engines/e.plan"]["engine"] = {"tensorrt_version": "10.0", "compute_capability": "8.7", "min_batch": 1,
                                         "opt_batch": 8, "max_batch": 64}
    return {"format_version": version, "image_size": 28, "latent_dim": 56, "latent_layout": "", "preprocessing": {},
            "step": 3, "files": files}


def _signature(statement_names: list[str]) -> bytes:
    """A model-signing envelope over a small statement, signed by a key made here and thrown away."""
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.hazmat.primitives import hashes

    from vce_deploy.signing import PAYLOAD_TYPE, PREDICATE_TYPE, STATEMENT_TYPE, pae

    statement = {"_type": STATEMENT_TYPE, "subject": [{"name": "bundle", "digest": {"sha256": "0" * 64}}],
                 "predicateType": PREDICATE_TYPE,
                 "predicate": {"serialization": {"method": "files", "hash_type": "sha256", "allow_symlinks": False,
                                                 "ignore_paths": ["bundle.sig"]},
                               "resources": [{"name": n, "algorithm": "sha256", "digest": "ab" * 32}
                                             for n in statement_names]}}
    payload = json.dumps(statement).encode()
    key = ec.generate_private_key(ec.SECP256R1())
    sig = key.sign(pae(payload), ec.ECDSA(hashes.SHA256()))
    return json.dumps({"mediaType": "application/vnd.dev.sigstore.bundle.v0.3+json",
                       "verificationMaterial": {"publicKey": {"hint": "00" * 32}, "tlogEntries": []},
                       "dsseEnvelope": {"payload": base64.b64encode(payload).decode(), "payloadType": PAYLOAD_TYPE,
                                        "signatures": [{"sig": base64.b64encode(sig).decode(), "keyid": ""}]}},
                      indent=2).encode()


def seeds() -> dict[str, list[bytes]]:
    small = manifest_bytes(_small_manifest())
    unsealed_v1 = json.dumps(_small_manifest(1)).encode()
    signature = _signature(["manifest.json", *FILES])
    glyph = np.zeros((28, 28), np.uint8)
    glyph[5:23, 12:16] = 255
    from PIL import Image

    images = []
    for mode, fmt in (("L", "PNG"), ("1", "BMP"), ("RGBA", "PNG"), ("P", "GIF"), ("I;16", "TIFF"), ("RGB", "JPEG")):
        buffer = io.BytesIO()
        Image.fromarray(glyph).convert(mode).save(buffer, format=fmt)
        images.append(buffer.getvalue())
    return {
        "manifest": [(DEFAULT_BUNDLE / "manifest.json").read_bytes(), small, unsealed_v1],
        "bundle": [small, unsealed_v1, small + b"\xff" + signature],
        "signature": [signature, json.dumps({"_type": "x"}).encode()],
        "preprocess": [png_bytes(glyph), *images, bytes([0, 28]) + glyph.tobytes(),
                       bytes([2, 4]) + np.linspace(0, 1, 16, dtype=np.float32).tobytes()],
        # first byte: the Content-Type index in targets.SERVER_KINDS (0 JSON, 1 image/png)
        "server_request": [b"\x00" + json.dumps({"image": glyph.tolist(), "n": 2, "seed": 7}).encode(),
                           b"\x00" + json.dumps({"images": [glyph.tolist(), (glyph / 255).tolist()], "n": 1,
                                                  "temperature": 0.5, "format": "png"}).encode(),
                           b"\x01" + png_bytes(glyph), b"\x00" + b"[" * 5000],
    }


def main() -> None:
    for target, inputs in seeds().items():
        folder = CORPUS / target
        folder.mkdir(parents=True, exist_ok=True)
        for data in inputs:
            (folder / f"seed-{corpus_name(data)}").write_bytes(data)
        print(f"{folder}: {len(inputs)} seeds")


if __name__ == "__main__":
    main()
