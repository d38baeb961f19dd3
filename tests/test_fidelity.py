"""train/fidelity.py: the judge, its cache, the measures and the score, on the small split with a
tiny judge (seconds)."""
from __future__ import annotations

import json
import shutil
from dataclasses import replace

import numpy as np
import pytest

from train import fidelity
from train.fidelity import (CONDITION_DRAWINGS, HELD_OUT_DRAWINGS, FidelityError, Judge, JudgeConfig,
                            frechet_distance, frechet_gaussians, iou, judge_key, mean_pairwise_iou, prior_hole)

TINY = JudgeConfig(channels=(8, 16), features=16, steps=20)


@pytest.fixture(scope="module")
def small_test():
    from vce_deploy.omniglot import load_split

    return load_split("small", "test")


@pytest.fixture(scope="module")
def judge_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("judge_cache")


@pytest.fixture(scope="module")
def tiny_judge(small_test, judge_dir):
    return Judge.fit(small_test.images, TINY, judge_dir, log=lambda m: None)


def test_judge_never_trains_on_conditions_or_held_out_redraws():
    used = set(fidelity.train_drawings())
    assert not used & set(CONDITION_DRAWINGS + HELD_OUT_DRAWINGS)
    assert len(used) == 20 - len(CONDITION_DRAWINGS) - len(HELD_OUT_DRAWINGS)


def test_cache_is_reused_only_for_the_same_data_and_config(small_test, tiny_judge, judge_dir):
    logs = []
    again = Judge.fit(small_test.images, TINY, judge_dir, log=logs.append)
    assert again.info["cached"] and not tiny_judge.info["cached"] and again.key == tiny_judge.key
    for name, value in tiny_judge.net.state_dict().items():
        assert np.array_equal(value.numpy(), again.net.state_dict()[name].numpy()), name
    other = small_test.images.copy()
    other[0, 0, 0, 0] = 1 - other[0, 0, 0, 0]  # one pixel of other data
    assert judge_key(other, TINY) != tiny_judge.key
    assert judge_key(small_test.images, replace(TINY, gap_px=2)) != tiny_judge.key  # another augmentation


def test_mismatching_or_corrupt_cache_is_retrained(small_test, tiny_judge, tmp_path):
    path = tmp_path / f"judge-{tiny_judge.key[:24]}.safetensors"
    impostor = Judge(tiny_judge.net, "0" * 64, TINY, dict(tiny_judge.info))  # weights filed under the key
    impostor._save(path)                                                     # of other data
    logs = []
    judge = Judge.fit(small_test.images, TINY, tmp_path, log=logs.append)
    assert not judge.info["cached"] and "other data" in logs[0]
    path.write_bytes(path.read_bytes()[:100])  # truncated
    logs.clear()
    judge = Judge.fit(small_test.images, TINY, tmp_path, log=logs.append)
    assert not judge.info["cached"] and "does not load" in logs[0]
    assert Judge.fit(small_test.images, TINY, tmp_path, log=logs.append).info["cached"]  # the retrain was cached


def test_augmentation_jitters_widths_and_breaks_strokes(small_test):
    import torch

    x = torch.from_numpy(small_test.images[:16, 0].copy())[:, None]
    before = x.clone()
    config = replace(TINY, pen_prob=0.0, gap_prob=1.0, rotate_deg=0, scale=0, shear=0, shift_px=0)
    broken = fidelity.augment(x, config, torch.Generator().manual_seed(0))
    assert torch.equal(x, before)  # the input is not changed in place
    assert (broken <= x + 1e-4).all() and broken.sum() < x.sum()  # gaps only erase ink
    thick = fidelity._pen(x, 1.0, torch.Generator().manual_seed(0))
    assert broken.shape == thick.shape == x.shape and not torch.equal(thick, x)


def test_iou_and_frechet():
    a = np.zeros((28, 28)); a[5:10, 5:10] = 1
    b = np.zeros((28, 28)); b[5:10, 7:12] = 1
    assert iou(a, a) == 1 and iou(a, b) == pytest.approx(15 / 35)
    assert iou(np.zeros((28, 28)), np.zeros((28, 28))) == 1
    assert mean_pairwise_iou(np.stack([a, a, a])[None]) == 1
    cov = np.diag([1.0, 4.0])
    assert frechet_gaussians(np.zeros(2), cov, np.ones(2), np.eye(2)) == pytest.approx(2 + (1 - 1) ** 2 + (2 - 1) ** 2)
    rng = np.random.default_rng(0)
    rows = rng.standard_normal((4000, 3))
    assert frechet_distance(rows, rows) == pytest.approx(0, abs=1e-6)
    assert frechet_distance(rows, rows + 2) == pytest.approx(12, rel=1e-6)


def test_prior_hole_of_the_prior_is_near_zero():
    rng = np.random.default_rng(0)
    mu = rng.standard_normal((20000, 4)) * np.sqrt(0.5)
    hole = prior_hole(mu, np.full_like(mu, np.log(0.5)))  # mixture of N(mu, 0.5) over mu ~ N(0, 0.5) = N(0, I)
    assert hole["cov_trace_over_d"] == pytest.approx(1, abs=0.03) and hole["w2_sq_vs_prior"] < 0.01
    shifted = prior_hole(mu + 3, np.full_like(mu, np.log(0.5)))
    assert shifted["mean_norm_sq"] == pytest.approx(36, rel=0.02)


def test_score_on_a_checkpoint(smoke_checkpoint, small_test, tiny_judge, tmp_path):
    converter, _ = fidelity.load_source(str(smoke_checkpoint))
    result = fidelity.fidelity_score(converter, split="small", n=3, characters_every=15, judge=tiny_judge,
                                     temperatures=(0.5, 1.0))
    ref = result["reference"]
    assert result["protocol"]["characters"] == len(range(0, len(small_test), 15))
    assert set(result["variations"]) == {"0.5", "1"}
    for row in result["variations"].values():
        assert all(0 <= row[form]["top1"] <= 1 and row[form]["top1_se"] >= 0 for form in fidelity.FORMS)
        assert 0 <= row["blanks"] <= 1
    assert 0 < ref["real_redraw_iou_condition"] < 1 and ref["real_redraw_top1"] >= 0
    assert set(result["decomposition"]) == {"posterior_mean", "posterior_sample", "prior_sample", "zero",
                                            "other_character_posterior"}
    assert result["prior_hole"]["latent_dim"] == converter.latent_dim
    json.dumps(result)  # JSON-ready
    assert "real redraws (ceiling)" in fidelity.fidelity_table(result)
    with pytest.raises(FidelityError, match="other data"):  # a judge of another part is refused
        fidelity.fidelity_score(converter, split="small", part="validation", n=2, characters_every=40,
                                judge=tiny_judge)


def test_cli_json_grid_and_bad_input(smoke_bundle, judge_dir, tmp_path, capsys):
    out, grid = tmp_path / "r.json", tmp_path / "g.png"
    common = ["--split", "small", "--n", "2", "--every", "30", "--temperatures", "1.0",
              "--judge-cache", str(judge_dir), "--judge-steps", "20", "--judge-channels", "8", "16", "--judge-features", "16"]
    assert fidelity.main([str(smoke_bundle), *common, "--json", str(out), "--grid", str(grid)]) == 0
    from PIL import Image

    body = json.loads(out.read_text())
    assert body["variations"]["1"]["threshold"]["top1"] >= 0 and Image.open(grid).mode == "RGB"
    assert fidelity.main([str(tmp_path / "nope"), *common]) == 1
    assert "does not exist" in capsys.readouterr().err
    broken = tmp_path / "no_encoder"
    shutil.copytree(smoke_bundle, broken)
    (broken / "encoder.onnx").unlink()
    assert fidelity.main([str(broken), *common]) == 1
    assert "encoder.onnx" in capsys.readouterr().err
