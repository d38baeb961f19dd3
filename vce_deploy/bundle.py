"""The bundle: a directory with manifest.json and the files it lists, each with its sha256.

Parsed once into dataclasses (never eval'd), verified before any model runs: every listed
file must exist inside the bundle directory (no `..`, no absolute path, no symlink out)
and hash to what the manifest says. Writers build the bundle in a temporary sibling
directory and rename it into place, so a failed export never leaves half a bundle.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from .errors import BundleError

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
PRECISIONS = ("fp32", "fp16", "int8")
ROLES = ("encoder", "convertor", "checkpoint", "checkpoint-meta")
FORMATS = ("onnx", "tensorrt", "safetensors", "json")
DEFAULT_BUNDLE = Path(__file__).resolve().parent / "default_bundle"


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


@dataclass(frozen=True)
class TensorSpec:
    name: str
    shape: tuple  # ints, or a string for a dynamic axis ("batch")
    dtype: str  # numpy dtype name: "float32", "float16"

    @classmethod
    def parse(cls, raw: Any, where: str) -> "TensorSpec":
        try:
            return cls(str(raw["name"]), tuple(raw["shape"]), str(raw["dtype"]))
        except (KeyError, TypeError) as err:
            raise BundleError(f"{where}: expected a tensor spec {{name, shape, dtype}}, got {raw!r}") from err

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

    def to_dict(self) -> dict:
        return dict(self.__dict__)


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

    def to_dict(self) -> dict:
        body: dict[str, Any] = {"sha256": self.sha256, "role": self.role, "format": self.format,
                                "precision": self.precision}
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
        if type(version) is not int or version != FORMAT_VERSION:  # JSON true would equal 1
            raise BundleError(f"{where}: expected format_version {FORMAT_VERSION}, got {version!r}; "
                              "this vce_deploy cannot read it (re-export the bundle, or upgrade vce_deploy)")
        files_raw = raw.get("files")
        if not isinstance(files_raw, dict) or not files_raw:
            raise BundleError(f"{where}: expected a non-empty 'files' object, got {files_raw!r}")
        files = {path: _parse_entry(path, body, where) for path, body in files_raw.items()}
        try:
            return cls(
                format_version=version, image_size=int(raw["image_size"]), latent_dim=int(raw["latent_dim"]),
                latent_layout=str(raw.get("latent_layout", "")), preprocessing=dict(raw.get("preprocessing", {})),
                files=files, model_config=dict(raw.get("model_config", {})),
                train_config=dict(raw.get("train_config", {})), step=int(raw.get("step", 0)),
                metrics=dict(raw.get("metrics", {})), exporter=dict(raw.get("exporter", {})),
            )
        except (KeyError, TypeError, ValueError) as err:
            raise BundleError(f"{where}: expected image_size and latent_dim as integers, got: {err!r}") from err


def _parse_entry(path: str, body: Any, where: str) -> FileEntry:
    here = f"{where}: files[{path!r}]"
    if not isinstance(body, dict):
        raise BundleError(f"{here}: expected an object, got {body!r}")
    role, fmt, precision = body.get("role"), body.get("format"), body.get("precision", "fp32")
    if role not in ROLES:
        raise BundleError(f"{here}: expected role in {ROLES}, got {role!r}")
    if fmt not in FORMATS:
        raise BundleError(f"{here}: expected format in {FORMATS}, got {fmt!r}")
    if precision not in PRECISIONS:
        raise BundleError(f"{here}: expected precision in {PRECISIONS}, got {precision!r}")
    sha = body.get("sha256")
    if not (isinstance(sha, str) and len(sha) == 64):
        raise BundleError(f"{here}: expected a 64-hex-digit sha256, got {sha!r}")
    engine = None
    if body.get("engine") is not None:
        try:
            engine = EngineInfo(**body["engine"])
        except TypeError as err:
            raise BundleError(f"{here}: malformed engine record: {err}") from err
    return FileEntry(
        path=path, sha256=sha, role=role, format=fmt, precision=precision,
        inputs=tuple(TensorSpec.parse(t, here) for t in body.get("inputs", [])),
        outputs=tuple(TensorSpec.parse(t, here) for t in body.get("outputs", [])),
        engine=engine,
    )


def resolve_inside(root: Path, relative: str) -> Path:
    """The file `relative` names inside root, refusing absolute paths, `..` and symlinks out."""
    if os.path.isabs(relative) or relative.startswith(("/", "\\")) or "\\" in relative:
        raise BundleError(f"{root}: manifest path {relative!r} must be relative, inside the bundle")
    if any(part in ("..", "") for part in relative.split("/")):
        raise BundleError(f"{root}: manifest path {relative!r} leaves the bundle directory")
    target = (root / relative).resolve()
    if not target.is_relative_to(root.resolve()):
        raise BundleError(f"{root}: {relative!r} resolves to {target}, outside the bundle (a symlink out?)")
    return target


class Bundle:
    """A verified bundle on disk. Construct with Bundle.load(path)."""

    def __init__(self, path: Path, manifest: Manifest):
        self.path = path
        self.manifest = manifest

    @classmethod
    def load(cls, path: str | os.PathLike | None = None, verify: bool = True) -> "Bundle":
        """Parse manifest.json and (verify=True) check every file's presence and sha256."""
        root = Path(path) if path is not None else default_bundle_path()
        if not root.exists():
            raise BundleError(f"{root}: expected a bundle directory, but it does not exist")
        if not root.is_dir():
            raise BundleError(f"{root}: expected a bundle directory, got a file")
        manifest_path = root / MANIFEST
        if not manifest_path.is_file():
            raise BundleError(f"{root}: expected {MANIFEST} in the bundle, but it is missing")
        try:
            raw = json.loads(manifest_path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise BundleError(f"{manifest_path}: expected JSON, got unreadable text ({err})") from err
        manifest = Manifest.parse(raw, str(manifest_path))
        bundle = cls(root, manifest)
        if verify:
            bundle.verify()
        return bundle

    def verify(self) -> None:
        """Every listed file exists inside the bundle and hashes to its manifest sha256."""
        for relative, entry in self.manifest.files.items():
            target = resolve_inside(self.path, relative)
            if not target.is_file():
                raise BundleError(f"{self.path}: manifest lists {relative!r}, but the file is missing")
            actual = sha256_file(target)
            if actual != entry.sha256:
                raise BundleError(f"{self.path}: {relative!r} has sha256 {actual[:16]}..., expected "
                                  f"{entry.sha256[:16]}... from the manifest: the file was changed")

    def file(self, relative: str) -> Path:
        return resolve_inside(self.path, relative)

    def entries(self, role: str | None = None, format: str | None = None, precision: str | None = None) -> list[FileEntry]:
        return [e for e in self.manifest.files.values()
                if (role is None or e.role == role) and (format is None or e.format == format)
                and (precision is None or e.precision == precision)]

    def model_entry(self, role: str, precision: str, format: str = "onnx") -> FileEntry:
        found = self.entries(role, format, precision)
        if not found:
            have = sorted({e.precision for e in self.entries(role, format)})
            raise BundleError(f"{self.path}: no {format} {role} at precision {precision!r}; this bundle has {have}")
        return found[0]

    @property
    def checkpoint(self) -> Path | None:
        found = self.entries("checkpoint", "safetensors")
        return self.file(found[0].path) if found else None


def default_bundle_path() -> Path:
    if not (DEFAULT_BUNDLE / MANIFEST).is_file():
        raise BundleError(f"no default bundle is installed at {DEFAULT_BUNDLE}; pass a bundle path "
                          "(make one with `python -m train` and `python -m export`)")
    return DEFAULT_BUNDLE


@contextmanager
def atomic_directory(final: str | os.PathLike) -> Iterator[Path]:
    """Yield an empty temporary sibling of `final`; on success it replaces `final` whole,
    on any error (or kill) it is removed and `final` is left as it was."""
    final = Path(final).resolve()
    final.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=final.parent, prefix=f".{final.name}.staging."))
    try:
        yield staging
        if final.exists():
            retired = Path(tempfile.mkdtemp(dir=final.parent, prefix=f".{final.name}.old."))
            os.replace(final, retired / "old")
            os.replace(staging, final)
            shutil.rmtree(retired, ignore_errors=True)
        else:
            os.replace(staging, final)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def write_manifest(directory: Path, manifest: Manifest) -> None:
    (directory / MANIFEST).write_text(json.dumps(manifest.to_dict(), indent=2) + "\n")


def file_entry(directory: Path, relative: str, **fields_: Any) -> FileEntry:
    """A FileEntry for a file already written under directory, its sha256 computed now."""
    return FileEntry(path=relative, sha256=sha256_file(directory / relative), **fields_)
