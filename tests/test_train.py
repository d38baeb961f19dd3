"""Training: data, determinism, checkpoints and resume, and the errors a user meets."""
from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

import train.train as train_module
from train.__main__ import main as train_main
from train.config import PRESETS, preset
from train.data import sample_episodes
from vce_deploy.omniglot import DEFAULT_DATA_DIR, SPLITS, load_split
from train.train import STAGE2_CHECKPOINT, _resume, _save, train
from vce_deploy.checkpoint import load_model, load_tensors, read_meta, save_checkpoint
from vce_deploy.errors import CheckpointError
from vce_deploy.model import VCE

CHECKPOINT = "checkpoint.safetensors"


@pytest.fixture(scope="module")
def splits():
    return load_split("small", "train"), load_split("small", "validation")


# ---------------------------------------------------------------- training runs

def tiny(**overrides):
    """9 steps: 2 Reptile, 4 VAE, 3 final; a checkpoint every 3."""
    config = replace(preset("smoke"), reptile_steps=2, vae_steps=4, final_steps=3, checkpoint_every=3,
                     sample_every=1000, log_every=1)
    return replace(config, **overrides)


@pytest.fixture
def cached_data(monkeypatch, splits):
    """The loop reads the zips on every call; these tests are about the loop, so read them once."""
    by_part = {"train": splits[0], "validation": splits[1]}
    monkeypatch.setattr(train_module, "load_split", lambda split, part, data_dir=None, **_: by_part[part])


def _weights(path: Path) -> dict[str, torch.Tensor]:
    return load_tensors(path)


def _assert_same_tensors(a: dict, b: dict, what: str) -> None:
    assert a.keys() == b.keys(), f"{what}: tensor names differ: {sorted(a.keys() ^ b.keys())[:5]}"
    differ = [k for k in a if not torch.equal(a[k], b[k])]
    assert not differ, f"{what}: {len(differ)} tensors differ, e.g. {differ[:3]}"


def _log_rows(path: Path) -> list[dict]:
    with open(path, newline="") as handle:
        return [{k: v for k, v in row.items() if k != "seconds"} for row in csv.DictReader(handle)]


def test_smoke_run_lowers_its_loss(smoke_run):
    rows = list(csv.DictReader(open(smoke_run / "losses.csv", newline="")))
    first = float(rows[0]["loss"])
    vae = [float(r["loss"]) for r in rows if r["stage"] == "vae"]
    assert len(vae) >= 4
    late = np.mean(vae[-3:])
    assert late < 0.8 * first, f"VAE loss should fall by 20%: first {first:.1f}, last VAE rows {late:.1f}"
    assert (smoke_run / CHECKPOINT).is_file() and (smoke_run / STAGE2_CHECKPOINT).is_file()
    meta, stage2 = read_meta(smoke_run / CHECKPOINT), read_meta(smoke_run / STAGE2_CHECKPOINT)
    config = preset("smoke")
    assert meta["step"] == config.total_steps
    assert stage2["step"] == config.reptile_steps + config.vae_steps and stage2["stage"] == "vae"


def test_checkpoint_round_trip_is_bit_exact(smoke_checkpoint, tmp_path):
    model, meta = load_model(smoke_checkpoint)
    stored = {k[len("model."):]: v for k, v in _weights(smoke_checkpoint).items() if k.startswith("model.")}
    _assert_same_tensors(model.state_dict(), stored, "load_model")
    copy = tmp_path / "again.safetensors"
    save_checkpoint(copy, {f"model.{k}": v for k, v in model.state_dict().items()}, meta)
    again, meta_again = load_model(copy)
    _assert_same_tensors(again.state_dict(), model.state_dict(), "save then load")
    assert {k: v for k, v in meta_again.items()} == meta


def test_optimizer_state_round_trips_through_a_checkpoint(tmp_path):
    config = tiny()
    torch.manual_seed(0)

    def build():
        model = VCE(config.model)
        return model, {"encoder": torch.optim.Adam(model.encoder.parameters(), lr=1e-3),
                       "convertor": torch.optim.Adam(model.convertor.parameters(), lr=1e-3),
                       "reptile": torch.optim.Adam(model.parameters(), lr=1e-3)}

    model, optimizers = build()
    x = torch.rand(2, 1, 28, 28)
    for name, opt in optimizers.items():
        params = model.parameters() if name == "reptile" else getattr(model, name).parameters()
        loss = sum(p.sum() for p in params) + model.convertor(torch.zeros(2, 56), x).sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
    _save(tmp_path, model, optimizers, config, 5, {})
    model2, optimizers2 = build()
    assert _resume(tmp_path, model2, optimizers2, config) == (5, None)
    _assert_same_tensors(model2.state_dict(), model.state_dict(), "model")
    for name in optimizers:
        a, b = optimizers[name].state_dict()["state"], optimizers2[name].state_dict()["state"]
        assert a.keys() == b.keys() and a, f"optimizer {name}: states for {sorted(a)} vs {sorted(b)}"
        for index in a:
            _assert_same_tensors(a[index], b[index], f"optimizer {name}, parameter {index}")


def test_same_seed_same_run(tmp_path, cached_data):
    train(tiny(), tmp_path / "a", progress=False)
    train(tiny(), tmp_path / "b", progress=False)
    _assert_same_tensors(_weights(tmp_path / "a" / CHECKPOINT), _weights(tmp_path / "b" / CHECKPOINT), "two runs, seed 0")
    train(tiny(seed=1), tmp_path / "c", progress=False)
    a, c = _weights(tmp_path / "a" / CHECKPOINT), _weights(tmp_path / "c" / CHECKPOINT)
    assert any(not torch.equal(a[k], c[k]) for k in a), "another seed should give other weights"


def test_resume_after_an_interruption_gives_the_uninterrupted_run(tmp_path, cached_data, monkeypatch):
    train(tiny(), tmp_path / "straight", progress=False)

    real_apply, calls = train_module.apply_gradients, []

    def crash_on_step_5(*args, **kwargs):  # steps 2.. use apply_gradients; the checkpoint of step 3 exists
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt("simulated crash")
        return real_apply(*args, **kwargs)

    monkeypatch.setattr(train_module, "apply_gradients", crash_on_step_5)
    with pytest.raises(KeyboardInterrupt):
        train(tiny(), tmp_path / "resumed", progress=False)
    assert read_meta(tmp_path / "resumed" / CHECKPOINT)["step"] == 3
    monkeypatch.setattr(train_module, "apply_gradients", real_apply)
    result = train(tiny(), tmp_path / "resumed", progress=False)
    assert result["resumed_from"] == 3
    _assert_same_tensors(_weights(tmp_path / "resumed" / CHECKPOINT), _weights(tmp_path / "straight" / CHECKPOINT),
                         "resumed against uninterrupted")
    assert _log_rows(tmp_path / "resumed" / "losses.csv") == _log_rows(tmp_path / "straight" / "losses.csv")


@pytest.mark.parametrize("final_loss, sigma", [("vae", 0.15), ("lmvae", 0.0), ("introvae", 0.15)])
def test_branching_at_the_stage2_checkpoint_gives_the_uninterrupted_run(tmp_path, cached_data, final_loss, sigma):
    """What train.table1 does: branch stage2 into a new run dir, resume with another final loss."""
    train(tiny(), tmp_path / "trunk", progress=False)  # final loss lmvae, sigma 0.15
    branch = tmp_path / "branch"
    config = tiny(final_loss=final_loss, sigma=sigma)
    if final_loss != "lmvae" or sigma != 0.15:  # resuming a copy with another recipe is refused
        shutil.copytree(tmp_path / "trunk", tmp_path / "copy")
        with pytest.raises(CheckpointError, match="final_loss|sigma"):
            train(config, tmp_path / "copy", progress=False)
    train_module.branch(tmp_path / "trunk" / STAGE2_CHECKPOINT, branch, config)
    assert train(config, branch, progress=False)["resumed_from"] == config.reptile_steps + config.vae_steps
    train(config, tmp_path / "straight", progress=False)
    _assert_same_tensors(_weights(branch / CHECKPOINT), _weights(tmp_path / "straight" / CHECKPOINT),
                         f"branch ({final_loss}) against an uninterrupted {final_loss} run")
    meta = read_meta(branch / CHECKPOINT)
    assert meta["train_config"]["final_loss"] == final_loss and meta["step"] == config.total_steps


def test_resume_with_another_model_config_fails_and_keeps_the_checkpoint(tmp_path, cached_data):
    out = tmp_path / "run"
    train(tiny(), out, progress=False)
    files = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in out.iterdir() if p.is_file()}
    wider = tiny(model=replace(tiny().model, channels=16))
    with pytest.raises(CheckpointError, match=r"cannot resume.*'channels': 8.*'channels': 16"):
        train(wider, out, progress=False)
    assert {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in out.iterdir() if p.is_file()} == files


# ---------------------------------------------------------------- errors a user meets

def test_unknown_preset_is_named(tmp_path, capsys):
    with pytest.raises(ValueError, match=r"unknown preset 'nope'.*'smoke'"):
        preset("nope")
    with pytest.raises(SystemExit) as exit_info:
        train_main(["--preset", "nope", "--out", str(tmp_path / "run")])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "nope" in err and all(name in err for name in PRESETS)
    assert not (tmp_path / "run").exists()


def test_missing_zip_is_named_by_the_cli(tmp_path, capsys):
    data_copy = tmp_path / "omniglot"
    data_copy.mkdir()
    assert train_main(["--preset", "smoke", "--out", str(tmp_path / "run"), "--data-dir", str(data_copy),
                       "--no-progress"]) == 1
    assert str(data_copy / SPLITS["small"].train_zips[0]) in capsys.readouterr().err


def test_time_limit_stops_cleanly_with_a_checkpoint_and_the_run_resumes(tmp_path, cached_data):
    result = train(tiny(time_limit_s=1e-9), tmp_path / "run", progress=False)
    assert result["steps"] == 1, "stopped after the first step"
    assert read_meta(tmp_path / "run" / CHECKPOINT)["step"] == 1
    resumed = train(tiny(), tmp_path / "run", progress=False)
    assert resumed["resumed_from"] == 1 and resumed["steps"] == 9
    train(tiny(), tmp_path / "whole", progress=False)
    _assert_same_tensors(_weights(tmp_path / "run" / CHECKPOINT), _weights(tmp_path / "whole" / CHECKPOINT),
                         "stopped by the clock, then resumed")


def test_validation_nll_is_logged_at_milestones(tmp_path, cached_data):
    train(tiny(validate_every=4, validate_k=2), tmp_path / "run", progress=False)
    records = [json.loads(line) for line in (tmp_path / "run" / "validation.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [4, 8]
    assert all(r["k"] == 2 and r["targets"] == 24 and r["nll_mean"] > 0 for r in records)


def test_init_from_starts_from_another_runs_weights(tmp_path, cached_data):
    train(tiny(), tmp_path / "a", progress=False)
    config = tiny(init_from=str(tmp_path / "a" / CHECKPOINT), reptile_steps=0, vae_steps=0, final_steps=0)
    train(config, tmp_path / "b", progress=False)
    assert not (tmp_path / "b" / CHECKPOINT).exists(), "no step, no checkpoint"
    model = VCE(config.model)
    train_module._resume(tmp_path / "b", model, {}, config)
    want = {k: v for k, v in _weights(tmp_path / "a" / CHECKPOINT).items() if k.startswith("model.")}
    _assert_same_tensors({f"model.{k}": v for k, v in model.state_dict().items()}, want, "init_from")


def test_train_gpu_script_runs_its_dry_mode_on_the_cpu(tmp_path):
    root = Path(__file__).resolve().parents[1]
    env = dict(os.environ, VCE_TRAIN_GPU_DRY="1", PYTHON=sys.executable)
    done = subprocess.run(["bash", str(root / "scripts" / "train_gpu.sh"), str(tmp_path / "gpu")], env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:] + done.stdout[-2000:]
    assert "checkpoint at step 36" in done.stdout
    assert read_meta(tmp_path / "gpu" / CHECKPOINT)["step"] == 36
