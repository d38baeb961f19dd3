"""Shared fixtures: one smoke-trained checkpoint and one exported bundle per test session."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # train/ and export/ run from the repository root
    sys.path.insert(0, str(ROOT))


@pytest.fixture(scope="session")
def smoke_run(tmp_path_factory) -> Path:
    """A run directory trained with the smoke preset (seconds on 2 cores)."""
    from train.config import preset
    from train.train import train

    out = tmp_path_factory.mktemp("smoke_run")
    train(preset("smoke"), out, progress=False)
    return out


@pytest.fixture(scope="session")
def smoke_checkpoint(smoke_run) -> Path:
    return smoke_run / "checkpoint.safetensors"


@pytest.fixture(scope="session")
def smoke_bundle(smoke_checkpoint, tmp_path_factory) -> Path:
    """The smoke checkpoint exported to a full bundle (fp32, fp16, bf16 where the CPU has it, and
    int8 in both forms)."""
    from export import export_bundle

    out = tmp_path_factory.mktemp("bundles") / "smoke"
    export_bundle(smoke_checkpoint, out, precisions=("fp32", "fp16", "bf16", "int8"), split="small")
    return out


@pytest.fixture(scope="session")
def bundle(request) -> Path:
    """VCE_TEST_BUNDLE if set (e.g. the shipped model), else the smoke run exported by export/."""
    import os

    override = os.environ.get("VCE_TEST_BUNDLE")
    return Path(override) if override else request.getfixturevalue("smoke_bundle")
