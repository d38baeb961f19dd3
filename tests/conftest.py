"""Shared fixtures: one smoke-trained checkpoint and one exported bundle per test session."""
from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # train/ and export/ run from the repository root
    sys.path.insert(0, str(ROOT))
# precision="auto" follows the CPU-flag table in tests (deterministic, no timing, no cache
# written); tests of measuring turn it on themselves (tests/test_auto_measure.py)
os.environ.setdefault("VCE_AUTO_MEASURE", "0")


def pytest_addoption(parser):
    parser.addoption("--fake-cpu", default=os.environ.get("VCE_FAKE_CPU"), metavar="CLASS",
                     help="run as if on this CPU class (vce_deploy/cpu.py CPU_CLASSES: amx, vnni, zen3, zen4); "
                          "default $VCE_FAKE_CPU, else the real CPU")


def pytest_configure(config):
    from vce_deploy.cpu import fake_cpu

    name = config.getoption("--fake-cpu")
    fake_cpu(name or None)  # before collection: skipif marks read this_cpu() at import


def pytest_report_header(config):
    from vce_deploy.cpu import this_cpu

    return f"cpu: {this_cpu().describe()}"


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
