"""The bundle: a directory with manifest.json and the files it lists, each with its sha256.

Parsed once into dataclasses (never eval'd), verified before any model runs: every listed
file must exist inside the bundle directory (no `..`, no absolute path, no symlink out)
and hash to what the manifest says. Writers build the bundle in a temporary sibling
directory and rename it into place (vce_deploy/bundle_swap.py), so a failed export never
leaves half a bundle.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from .contract import CONSUMERS, MODELS, PRECISIONS
from .errors import BundleError
from .fsio import atomic_write_bytes, sha256_file

# Version 2 requires the seal below; version 1 (written before seals were required) loads unsealed
# only when the caller asks for it (allow_unsealed), with an UnsealedBundleWarning. docs/signing.md
FORMAT_VERSION = 2
READABLE_VERSIONS = (1, 2)
MANIFEST = "manifest.json"
# what a listed file is: one of the two models, the checkpoint and its JSON sidecar, or the
# golden outputs `vce verify` checks every backend against (vce_deploy/golden.py)
FILE_ROLES = (*MODELS, "checkpoint", "checkpoint-meta", "golden")
FORMATS = ("onnx", "tensorrt", "safetensors", "json", "npz")
DEFAULT_BUNDLE = Path(__file__).resolve().parent / "default_bundle"
# The manifest seals itself: "manifest_sha256" is the sha256 of manifest.json's bytes with that
# value replaced by 64 zeros, so one changed byte anywhere in the manifest is refused too.
SEAL_KEY = "manifest_sha256"
_UNSEALED = "0" * 64
MAX_MANIFEST_BYTES = 16 << 20  # a real manifest is ~10 KB; refuse to read a huge one into memory
TOP_LEVEL_KEYS = frozenset({"format_version", "image_size", "latent_dim", "latent_layout", "preprocessing",
                            "model_config", "train_config", "step", "metrics", "exporter", "files", SEAL_KEY})
_HEX64 = re.compile(r"[0-9a-f]{64}")


@dataclass(frozen=True)
class TensorSpec:
    name: str
    shape: tuple  # ints, or a string for a dynamic axis ("batch")
    dtype: str  # numpy dtype name: "float32", "float16"

    @classmethod
    def parse(cls, raw: Any, where: str) -> "TensorSpec":
        ok = (isinstance(raw, dict) and isinstance(raw.get("name"), str) and isinstance(raw.get("dtype"), str)
              and isinstance(raw.get("shape"), list)
              and all(isinstance(d, str) or (type(d) is int and d >= 1) for d in raw["shape"]))
        if not ok:
            raise BundleError(f"{where}: expected a tensor spec {{name: str, shape: [int >= 1 or axis name], "
                              f"dtype: str}}, got {raw!r}")
        return cls(raw["name"], tuple(raw["shape"]), raw["dtype"])

    def to_dict(self) -> dict:
        return {"name": self.name, "shape": list(self.shape), "dtype": self.dtype}


@dataclass(frozen=True)
class EngineInfo:
    """What a TensorRT engine was built for: it runs only there."""

    tensorrt_version: str
    compute_capability: str  # "8.7"
    min_batch: int
    opt_batch: int
    max_batch: int
    gpu_name: str = ""
    # TensorRT's compatibility modes (docs/edge.md): a version-compatible engine runs on any
    # later TensorRT of the same major version, a hardware-compatible one on any Ampere-or-newer GPU
    version_compatible: bool = False
    hardware_compatible: bool = False

    def to_dict(self) -> dict:
        body = dict(self.__dict__)
        for flag in ("version_compatible", "hardware_compatible"):
            if not body[flag]:
                del body[flag]  # records of plain engines stay as they always were
        return body


@dataclass(frozen=True)
class FileEntry:
    path: str  # relative to the bundle directory, "/"-separated
    sha256: str
    role: str  # encoder | convertor | checkpoint | checkpoint-meta
    format: str  # onnx | tensorrt | safetensors | json
    precision: str = "fp32"
    inputs: tuple[TensorSpec, ...] = ()
    outputs: tuple[TensorSpec, ...] = ()
    engine: EngineInfo | None = None
    consumer: str = "any"  # contract.CONSUMERS: which backends this file's form is for

    def to_dict(self) -> dict:
        body: dict[str, Any] = {"sha256": self.sha256, "role": self.role, "format": self.format,
                                "precision": self.precision, "consumer": self.consumer}
        if self.inputs or self.outputs:
            body["inputs"] = [t.to_dict() for t in self.inputs]
            body["outputs"] = [t.to_dict() for t in self.outputs]
        if self.engine is not None:
            body["engine"] = self.engine.to_dict()
        return body


@dataclass(frozen=True)
class Manifest:
    format_version: int
    image_size: int
    latent_dim: int
    latent_layout: str
    preprocessing: dict
    files: dict[str, FileEntry]
    model_config: dict = field(default_factory=dict)
    train_config: dict = field(default_factory=dict)
    step: int = 0
    metrics: dict = field(default_factory=dict)
    exporter: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {
            "format_version": self.format_version, "image_size": self.image_size,
            "latent_dim": self.latent_dim, "latent_layout": self.latent_layout,
            "preprocessing": self.preprocessing, "model_config": self.model_config,
            "train_config": self.train_config, "step": self.step, "metrics": self.metrics,
            "exporter": self.exporter,
            "files": {path: entry.to_dict() for path, entry in sorted(self.files.items())},
        }

    @classmethod
    def parse(cls, raw: Any, where: str) -> "Manifest":
        if not isinstance(raw, dict):
            raise BundleError(f"{where}: expected a JSON object, got {type(raw).__name__}")
        version = raw.get("format_version")
        if type(version) is not int or version not in READABLE_VERSIONS:  # JSON true would equal 1
            raise BundleError(f"{where}: expected format_version in {list(READABLE_VERSIONS)}, got {version!r}; "
                              "this vce_deploy cannot read it (re-export the bundle, or upgrade vce_deploy)")
        unknown = sorted(set(raw) - TOP_LEVEL_KEYS)
        if unknown:  # also catches a changed byte in a key name, which would otherwise fall back to a default
            raise BundleError(f"{where}: expected only the keys {sorted(TOP_LEVEL_KEYS)}, got unknown {unknown}")
        for key in ("image_size", "latent_dim"):
            if type(raw.get(key)) is not int or raw[key] < 1:
                raise BundleError(f"{where}: expected {key} as an integer >= 1, got {raw.get(key)!r}")
        step = raw.get("step", 0)
        if type(step) is not int or step < 0:
            raise BundleError(f"{where}: expected step as an integer >= 0, got {step!r}")
        for key in ("preprocessing", "model_config", "train_config", "metrics", "exporter"):
            if not isinstance(raw.get(key, {}), dict):
                raise BundleError(f"{where}: expected {key} as a JSON object, got {raw[key]!r}")
        if not isinstance(raw.get("latent_layout", ""), str):
            raise BundleError(f"{where}: expected latent_layout as a string, got {raw['latent_layout']!r}")
        files_raw = raw.get("files")
        if not isinstance(files_raw, dict) or not files_raw:
            raise BundleError(f"{where}: expected a non-empty 'files' object, got {files_raw!r}")
        for path in files_raw:
            check_relative(path, where)
        files = {path: _parse_entry(path, body, where) for path, body in files_raw.items()}
        seen: dict[tuple, str] = {}
        for entry in files.values():
            if entry.role in MODELS:
                key = (entry.role, entry.format, entry.precision, entry.consumer)
                if key in seen:
                    raise BundleError(f"{where}: expected one {entry.format} {entry.role} at {entry.precision} for "
                                      f"consumer {entry.consumer!r}, got two: {seen[key]!r} and {entry.path!r}")
                seen[key] = entry.path
        return cls(
            format_version=version, image_size=raw["image_size"], latent_dim=raw["latent_dim"],
            latent_layout=raw.get("latent_layout", ""), preprocessing=dict(raw.get("preprocessing", {})),
            files=files, model_config=dict(raw.get("model_config", {})),
            train_config=dict(raw.get("train_config", {})), step=step,
            metrics=dict(raw.get("metrics", {})), exporter=dict(raw.get("exporter", {})),
        )


def _parse_entry(path: str, body: Any, where: str) -> FileEntry:
    here = f"{where}: files[{path!r}]"
    if not isinstance(body, dict):
        raise BundleError(f"{here}: expected an object, got {body!r}")
    role, fmt, precision = body.get("role"), body.get("format"), body.get("precision", "fp32")
    if role not in FILE_ROLES:
        raise BundleError(f"{here}: expected role in {FILE_ROLES}, got {role!r}")
    if fmt not in FORMATS:
        raise BundleError(f"{here}: expected format in {FORMATS}, got {fmt!r}")
    if precision not in PRECISIONS:
        raise BundleError(f"{here}: expected precision in {PRECISIONS}, got {precision!r}")
    consumer = body.get("consumer", "any")  # manifests written before int8 had two forms: "any"
    if consumer not in CONSUMERS:
        raise BundleError(f"{here}: expected consumer in {CONSUMERS}, got {consumer!r}")
    sha = body.get("sha256")
    if not (isinstance(sha, str) and _HEX64.fullmatch(sha)):
        raise BundleError(f"{here}: expected a 64-hex-digit sha256, got {sha!r}")
    engine = None
    if body.get("engine") is not None:
        engine = _parse_engine(body["engine"], here)
    specs = {}
    for kind in ("inputs", "outputs"):
        listed = body.get(kind, [])
        if not isinstance(listed, list):
            raise BundleError(f"{here}: expected {kind} as a list of tensor specs, got {listed!r}")
        specs[kind] = tuple(TensorSpec.parse(t, here) for t in listed)
    return FileEntry(path=path, sha256=sha, role=role, format=fmt, precision=precision,
                     inputs=specs["inputs"], outputs=specs["outputs"], engine=engine, consumer=consumer)


def _parse_engine(raw: Any, here: str) -> EngineInfo:
    ints = ("min_batch", "opt_batch", "max_batch")
    strings = ("tensorrt_version", "compute_capability", "gpu_name")
    flags = ("version_compatible", "hardware_compatible")
    ok = (isinstance(raw, dict) and set(raw) <= set(ints + strings + flags) and set(ints + strings[:2]) <= set(raw)
          and all(type(raw[k]) is int and raw[k] >= 1 for k in ints)
          and all(isinstance(raw.get(k, ""), str) for k in strings)
          and all(type(raw.get(k, False)) is bool for k in flags)
          and raw["min_batch"] <= raw["opt_batch"] <= raw["max_batch"])
    if not ok:
        raise BundleError(f"{here}: expected an engine record {{tensorrt_version, compute_capability, [gpu_name], "
                          f"[version_compatible], [hardware_compatible], min_batch <= opt_batch <= max_batch (integers >= 1)}}, got {raw!r}")
    return EngineInfo(**raw)


def check_relative(relative: str, where: Any) -> None:
    """A manifest path is "/"-separated, relative, without `..` or empty parts."""
    if os.path.isabs(relative) or relative.startswith(("/", "\\")) or "\\" in relative or "\0" in relative:
        raise BundleError(f"{where}: manifest path {relative!r}: expected a relative path, inside the bundle")
    if any(part in ("..", "") for part in relative.split("/")):
        raise BundleError(f"{where}: manifest path {relative!r}: expected a path without '..' or empty parts; "
                          "this one leaves the bundle directory")


def resolve_inside(root: Path, relative: str) -> Path:
    """The file `relative` names inside root, refusing absolute paths, `..` and symlinks out."""
    check_relative(relative, root)
    target = (root / relative).resolve()
    if not target.is_relative_to(root.resolve()):
        raise BundleError(f"{root}: {relative!r}: expected a file inside the bundle, but it resolves to {target}, "
                          "outside the bundle (a symlink out?)")
    return target


class Bundle:
    """A verified bundle on disk. Construct with Bundle.load(path)."""

    def __init__(self, path: Path, manifest: Manifest, sealed: bool = False):
        self.path = path
        self.manifest = manifest
        self.sealed = sealed  # manifest.json carries its own sha256 (every bundle exported since it existed)

    @classmethod
    def load(cls, path: str | os.PathLike | None = None, verify: bool = True, *, allow_unsealed: bool = False,
             trusted_keys: Any = None, device_built: Sequence[str] = ()) -> "Bundle":
        """Parse manifest.json; verify=True also hashes every listed file (`vce verify`). Converter.load
        passes False and calls check_present: its backends hash the files they read, as they read them.

        allow_unsealed: load a format-1 manifest without its seal (warns: nothing detects an edit).
        trusted_keys: public keys (vce_deploy.signing.load_public_key) one of which must have signed
        the bundle; checked before the manifest is even parsed. device_built: glob patterns of
        unsigned files allowed beside a signed bundle's own (engines built on this device).
        """
        if path is not None and not isinstance(path, (str, os.PathLike)):
            raise BundleError(f"bundle path: expected a str or os.PathLike, got {type(path).__name__}")
        root = Path(path) if path is not None else default_bundle_path()
        if not root.exists():
            raise BundleError(f"{root}: expected a bundle directory, but it does not exist")
        if not root.is_dir():
            raise BundleError(f"{root}: expected a bundle directory, got a file")
        manifest_path = root / MANIFEST
        if not manifest_path.is_file():
            raise BundleError(f"{root}: expected {MANIFEST} in the bundle, but it is missing")
        resolve_inside(root, MANIFEST)  # a manifest.json symlinked out of the bundle is refused too
        size = manifest_path.stat().st_size
        if size > MAX_MANIFEST_BYTES:
            raise BundleError(f"{manifest_path}: expected at most {MAX_MANIFEST_BYTES} bytes, got {size}")
        data = manifest_path.read_bytes()
        signed = None
        if trusted_keys is not None:  # before json.loads: an unsigned manifest is never parsed
            from .signing import check_signed_manifest

            signed = check_signed_manifest(root, data, trusted_keys, MANIFEST)
        manifest, sealed = parse_manifest_bytes(data, str(manifest_path), allow_unsealed)
        bundle = cls(root, manifest, sealed)
        if signed is not None:
            from .signing import check_signed_files

            check_signed_files(bundle, signed, MANIFEST, device_built)
        if verify:
            bundle.verify()
        return bundle

    def verify(self) -> None:
        """Every listed file exists inside the bundle and hashes to its manifest sha256."""
        for relative, entry in self.manifest.files.items():
            target = resolve_inside(self.path, relative)
            if not target.is_file():
                raise BundleError(f"{self.path}: manifest lists {relative!r}, but the file is missing")
            self._check_hash(entry, sha256_file(target))

    def check_present(self) -> None:
        """Every listed file exists inside the bundle (no hashing: see read_verified)."""
        for relative in self.manifest.files:
            if not resolve_inside(self.path, relative).is_file():
                raise BundleError(f"{self.path}: manifest lists {relative!r}, but the file is missing")

    def _check_hash(self, entry: FileEntry, actual: str) -> None:
        if actual != entry.sha256:
            raise BundleError(f"{self.path}: {entry.path!r} has sha256 {actual[:16]}..., expected "
                              f"{entry.sha256[:16]}... from the manifest: the file was changed")

    def read_verified(self, entry: FileEntry) -> bytes:
        """The bytes of one listed file, hashed again as they are read: backends load models from
        these bytes, so what runs is exactly what was verified, even if the file changes later."""
        target = resolve_inside(self.path, entry.path)
        if not target.is_file():
            raise BundleError(f"{self.path}: manifest lists {entry.path!r}, but the file is missing")
        data = target.read_bytes()
        self._check_hash(entry, hashlib.sha256(data).hexdigest())
        return data

    def file(self, relative: str) -> Path:
        return resolve_inside(self.path, relative)

    def entries(self, role: str | None = None, format: str | None = None, precision: str | None = None) -> list[FileEntry]:
        return [e for e in self.manifest.files.values()
                if (role is None or e.role == role) and (format is None or e.format == format)
                and (precision is None or e.precision == precision)]

    def model_entry(self, role: str, precision: str, format: str = "onnx",
                    consumers: tuple[str, ...] = ("any", "cpu", "tensorrt")) -> FileEntry:
        """The `role` file at `precision`, in the first form of `consumers` the bundle has: each
        backend passes its own order (TensorRT wants the symmetric int8 form, CPUs the other)."""
        found = {e.consumer: e for e in self.entries(role, format, precision)}
        if not found:
            have = sorted({e.precision for e in self.entries(role, format)})
            raise BundleError(f"{self.path}: no {format} {role} at precision {precision!r}; this bundle has {have}")
        for consumer in consumers:
            if consumer in found:
                return found[consumer]
        raise BundleError(f"{self.path}: no {format} {role} at {precision} for consumers {list(consumers)}; this "
                          f"bundle has it for {sorted(found)}")

    @property
    def checkpoint(self) -> Path | None:
        found = self.entries("checkpoint", "safetensors")
        return self.file(found[0].path) if found else None


def default_bundle_path() -> Path:
    if not (DEFAULT_BUNDLE / MANIFEST).is_file():
        raise BundleError(f"no default bundle is installed at {DEFAULT_BUNDLE}; pass a bundle path "
                          "(make one from a clone of the repository with `python -m train` and `python -m export`)")
    return DEFAULT_BUNDLE


class UnsealedBundleWarning(UserWarning):
    """A format-1 manifest without its seal was loaded because the caller allowed it."""


def parse_manifest_bytes(data: bytes, where: str, allow_unsealed: bool = False) -> tuple[Manifest, bool]:
    """manifest.json's bytes -> (Manifest, sealed). Format 2 must be sealed; an unsealed format 1
    only with allow_unsealed (and a warning). Every refusal is a BundleError."""
    try:
        raw = json.loads(data.decode("utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as err:
        raise BundleError(f"{where}: expected JSON, got unreadable text ({type(err).__name__}: "
                          f"{str(err)[:200]})") from err
    sealed = check_seal(data, raw, where)
    manifest = Manifest.parse(raw, where)
    if not sealed:
        if manifest.format_version >= 2:
            raise BundleError(f"{where}: expected {SEAL_KEY} (format_version {manifest.format_version} requires the "
                              "seal), got none: the seal was removed, so any edit to the manifest would go unnoticed")
        if not allow_unsealed:
            raise BundleError(f"{where}: expected a sealed manifest ({SEAL_KEY}), got an unsealed format_version 1 "
                              "manifest: nothing would detect an edited manifest. Re-export it, or load it anyway "
                              "with allow_unsealed=True (vce --allow-unsealed)")
        warnings.warn(f"{where}: loading an unsealed format_version 1 manifest because allow_unsealed was set: an "
                      "edited or downgraded manifest (its seal removed) cannot be told from this one",
                      UnsealedBundleWarning, stacklevel=3)
    return manifest, sealed


def check_seal(data: bytes, raw: Any, where: str) -> bool:
    """Verify manifest.json's own sha256 (SEAL_KEY) against its bytes. True if sealed; False for
    a manifest written before seals existed (it has no SEAL_KEY at all)."""
    if not isinstance(raw, dict) or SEAL_KEY not in raw:
        return False
    seal = raw[SEAL_KEY]
    if not (isinstance(seal, str) and _HEX64.fullmatch(seal)):
        raise BundleError(f"{where}: expected {SEAL_KEY} as 64 hex digits, got {seal!r}")
    marker = f'"{SEAL_KEY}": "{seal}"'.encode()
    if data.count(marker) != 1:
        raise BundleError(f"{where}: expected {SEAL_KEY} written once as {marker.decode()!r}; "
                          "the manifest was rewritten by hand (write it with vce_deploy.bundle.write_raw_manifest)")
    actual = hashlib.sha256(data.replace(marker, f'"{SEAL_KEY}": "{_UNSEALED}"'.encode())).hexdigest()
    if actual != seal:
        raise BundleError(f"{where}: the manifest hashes to {actual[:16]}..., expected {seal[:16]}... from its "
                          f"{SEAL_KEY}: the manifest was changed")
    return True


def manifest_bytes(raw: dict) -> bytes:
    """A manifest dict as sealed manifest.json bytes (any SEAL_KEY in raw is replaced)."""
    body = {SEAL_KEY: _UNSEALED, **{k: v for k, v in raw.items() if k != SEAL_KEY}}
    data = (json.dumps(body, indent=2) + "\n").encode()
    placeholder = f'"{SEAL_KEY}": "{_UNSEALED}"'.encode()
    digest = hashlib.sha256(data).hexdigest()
    return data.replace(placeholder, f'"{SEAL_KEY}": "{digest}"'.encode(), 1)


def write_raw_manifest(directory: Path, raw: dict) -> None:
    """Write a sealed manifest.json from a plain dict, atomically (temporary file, then rename)."""
    atomic_write_bytes(Path(directory) / MANIFEST, manifest_bytes(raw))


def write_manifest(directory: Path, manifest: Manifest) -> None:
    write_raw_manifest(directory, manifest.to_dict())


def file_entry(directory: Path, relative: str, **fields_: Any) -> FileEntry:
    """A FileEntry for a file already written under directory, its sha256 computed now."""
    return FileEntry(path=relative, sha256=sha256_file(directory / relative), **fields_)
