"""Checkpoints: safetensors weights plus a JSON sidecar (config, step, seed, metrics).

Nothing here unpickles: safetensors holds only tensors, JSON only data. Writes go to a
temporary file and are renamed into place, so a crash never leaves half a checkpoint.
"""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

from .errors import CheckpointError

CHECKPOINT_FORMAT = "vce-checkpoint/1"


def sidecar_path(path: str | os.PathLike) -> Path:
    path = Path(path)
    return path.with_name(path.name[: -len(".safetensors")] + ".json") if path.name.endswith(".safetensors") else path.with_suffix(".json")


def atomic_write_bytes(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save_checkpoint(path: str | os.PathLike, tensors: dict, meta: dict[str, Any]) -> None:
    """Write tensors (name -> torch.Tensor) and meta atomically; the JSON lands last, so a
    checkpoint whose sidecar exists is complete."""
    from safetensors.torch import save

    path = Path(path)
    contiguous = {name: t.detach().contiguous().cpu() for name, t in tensors.items()}
    atomic_write_bytes(path, save(contiguous))
    body = dict(meta, format=CHECKPOINT_FORMAT)
    atomic_write_bytes(sidecar_path(path), (json.dumps(body, indent=2, sort_keys=True) + "\n").encode())


def read_meta(path: str | os.PathLike) -> dict[str, Any]:
    side = sidecar_path(path)
    if not side.is_file():
        raise CheckpointError(f"{path}: expected a JSON sidecar at {side}, but it is missing")
    try:
        meta = json.loads(side.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{side}: expected JSON, got unreadable text ({err})") from err
    if meta.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{side}: expected format {CHECKPOINT_FORMAT!r}, got {meta.get('format')!r}")
    return meta


def load_tensors(path: str | os.PathLike) -> dict:
    """safetensors only: a pickle (torch.save) file is refused, never loaded."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: expected a .safetensors checkpoint file, but it does not exist")
    with open(path, "rb") as handle:
        head = handle.read(8)
    if head[:2] == b"\x80\x04" or head[:2] == b"\x80\x02" or head[:4] == b"PK\x03\x04":
        raise CheckpointError(f"{path}: expected safetensors, got a pickle/zip (torch.save) file; it is never loaded")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as err:
        raise CheckpointError(f"{path}: expected a valid safetensors file, got: {err}") from err


def load_model(path: str | os.PathLike):
    """Checkpoint -> (VCE in eval mode, meta). The config comes from the sidecar alone."""
    from .model import VCE, ModelConfig

    meta = read_meta(path)
    try:
        config = ModelConfig.from_dict(meta["model_config"])
    except (KeyError, TypeError, ValueError) as err:
        raise CheckpointError(f"{sidecar_path(path)}: expected a valid 'model_config', got: {err}") from err
    tensors = load_tensors(path)
    weights = {k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")}
    model = VCE(config)
    missing, unexpected = model.load_state_dict(weights, strict=False)
    if missing or unexpected:
        raise CheckpointError(
            f"{path}: weights do not match model_config {config}: missing {missing[:5]}, unexpected {unexpected[:5]}"
        )
    return model.eval(), meta
