"""Checkpoints: safetensors weights plus a JSON sidecar (config, step, seed, metrics).

Nothing here unpickles: safetensors holds only tensors, JSON only data. Writes go to a
temporary file and are renamed into place, so a crash never leaves half a checkpoint.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from .errors import CheckpointError
from .fsio import atomic_write_bytes

CHECKPOINT_FORMAT = "vce-checkpoint/1"


def sidecar_path(path: str | os.PathLike) -> Path:
    path = Path(path)
    return path.with_name(path.name[: -len(".safetensors")] + ".json") if path.name.endswith(".safetensors") else path.with_suffix(".json")


def save_checkpoint(path: str | os.PathLike, tensors: dict, meta: dict[str, Any]) -> None:
    """Write tensors (name -> torch.Tensor) and meta atomically; the JSON lands last, so a
    checkpoint whose sidecar exists is complete."""
    from safetensors.torch import save

    path = Path(path)
    contiguous = {name: t.detach().contiguous().cpu() for name, t in tensors.items()}
    atomic_write_bytes(path, save(contiguous))
    body = dict(meta, format=CHECKPOINT_FORMAT)
    atomic_write_bytes(sidecar_path(path), (json.dumps(body, indent=2, sort_keys=True) + "\n").encode())


def read_meta(path: str | os.PathLike, data: bytes | None = None) -> dict[str, Any]:
    """The sidecar's content; `data`: its bytes when the caller has already read (and hashed) them."""
    side = sidecar_path(path)
    if data is None and not side.is_file():
        raise CheckpointError(f"{path}: expected a JSON sidecar at {side}, but it is missing")
    try:
        meta = json.loads(side.read_bytes() if data is None else data)
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as err:
        raise CheckpointError(f"{side}: expected JSON, got unreadable text ({type(err).__name__})") from err
    found = meta.get("format") if isinstance(meta, dict) else type(meta).__name__
    if found != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{side}: expected format {CHECKPOINT_FORMAT!r}, got {found!r}")
    return meta


def _refuse_non_safetensors(path: Path, head: bytes) -> None:
    """safetensors starts with an 8-byte header length and then its JSON header ("{"). Anything
    else is refused here, a pickle (any protocol; torch.save's zip holds one) by name. Nothing
    in this module could unpickle it anyway: safetensors parses only that length and JSON."""
    if head[:1] == b"\x80" or head[:4] == b"PK\x03\x04":
        raise CheckpointError(f"{path}: expected safetensors, got a pickle/zip (torch.save) file; it is never loaded")
    if len(head) < 9 or head[8:9] != b"{":
        raise CheckpointError(f"{path}: expected safetensors (an 8-byte header length, then a JSON header), got "
                              f"bytes {head[:9]!r}; only safetensors checkpoints are read, pickles never")


def load_tensors(path: str | os.PathLike, data: bytes | None = None) -> dict:
    """safetensors only: a pickle (torch.save) file is refused, never loaded. `data`: the file's
    bytes when the caller has already read (and hashed) them."""
    from safetensors import SafetensorError
    from safetensors.torch import load, load_file

    path = Path(path)
    if data is None:
        if path.is_dir():
            raise CheckpointError(f"{path}: expected a .safetensors checkpoint file, got a directory")
        if not path.is_file():
            raise CheckpointError(f"{path}: expected a .safetensors checkpoint file, but it does not exist")
        with open(path, "rb") as handle:
            head = handle.read(9)
    else:
        head = data[:9]
    _refuse_non_safetensors(path, head)
    try:
        return load_file(str(path)) if data is None else load(data)
    except (SafetensorError, OSError, ValueError) as err:
        raise CheckpointError(f"{path}: expected a valid safetensors file, got: {err}") from err


def load_model(path: str | os.PathLike, data: bytes | None = None, meta_data: bytes | None = None):
    """Checkpoint -> (VCE in eval mode, meta). The config comes from the sidecar alone; `data` and
    `meta_data`: the weights' and the sidecar's bytes, already read and hashed by the caller."""
    from .model import VCE, ModelConfig

    if Path(path).is_dir():
        raise CheckpointError(f"{path}: expected a .safetensors checkpoint file, got a directory")
    if data is None and not Path(path).is_file():
        raise CheckpointError(f"{path}: expected a .safetensors checkpoint file, but it does not exist")
    meta = read_meta(path, meta_data)
    try:
        config = ModelConfig.from_dict(meta["model_config"])
    except (KeyError, TypeError, ValueError) as err:
        raise CheckpointError(f"{sidecar_path(path)}: expected a valid 'model_config', got: {err}") from err
    tensors = load_tensors(path, data)
    weights = {k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")}
    model = VCE(config)
    expected = model.state_dict()
    wrong = [f"{k} {tuple(v.shape)} {v.dtype} (expected {tuple(expected[k].shape)} {expected[k].dtype})"
             for k, v in weights.items() if k in expected and (v.shape != expected[k].shape or v.dtype != expected[k].dtype)]
    if wrong:
        raise CheckpointError(f"{path}: weights do not match model_config {config}: {'; '.join(wrong[:5])}")
    missing, unexpected = model.load_state_dict(weights, strict=False)
    if missing or unexpected:
        raise CheckpointError(
            f"{path}: weights do not match model_config {config}: missing {missing[:5]}, unexpected {unexpected[:5]}"
        )
    return model.eval(), meta
