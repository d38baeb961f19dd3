"""The training recipe of issue 21: validation alphabets held out whole, the augmentations, the
learning-rate schedules, refusing a resume whose recipe differs, and the equal-budget
ablation table (train.ablate) that branches every row from one state."""
from __future__ import annotations

import json
import math
from dataclasses import replace

import numpy as np
import pytest

import train.train as train_module
from train.__main__ import main as train_main
from train.ablate import ROWS, Row, main as ablate_main, row_config
from train.config import LEGACY_VALUES, TrainConfig, preset, resume_mismatches, validate
from train.data import jitter_drawings, rotated_classes, sample_episodes
from train.train import CHECKPOINT, branch, train
from vce_deploy.checkpoint import read_meta, sidecar_path
from vce_deploy.errors import CheckpointError
from vce_deploy.omniglot import VALIDATION_ALPHABETS, load_split


@pytest.fixture(scope="module")
def paper_parts():
    return {part: load_split("paper", part) for part in ("train", "validation")}


def test_paper_validation_is_five_whole_background_alphabets(paper_parts):
    train_part, valid = paper_parts["train"], paper_parts["validation"]
    assert {a for a, _ in valid.names} == set(VALIDATION_ALPHABETS)
    assert not {a for a, _ in train_part.names} & set(VALIDATION_ALPHABETS), "no validation alphabet is trained on"
    assert len(train_part) + len(valid) == 964 and len(valid) == 151
    characters = load_split("paper", "validation", validation_alphabets=())  # the old hold-out, kept for old runs
    assert len(characters) == 85 and len({a for a, _ in characters.names}) == 30


def test_a_validation_alphabet_that_is_not_a_training_alphabet_is_refused():
    with pytest.raises(ValueError, match=r"\['Klingon'\] are not training alphabets.*expected names from"):
        load_split("paper", "validation", validation_alphabets=("Klingon",))
    with pytest.raises(ValueError, match="Tengwar"):  # a test alphabet: in the other zip
        load_split("paper", "train", validation_alphabets=("Tengwar",))


def test_rotated_classes_are_three_new_characters_each(paper_parts):
    small = paper_parts["validation"]
    turned = rotated_classes(small)
    n = len(small)
    assert len(turned) == 4 * n and len(set(turned.names)) == 4 * n
    np.testing.assert_array_equal(turned.images[:n], small.images)
    np.testing.assert_array_equal(turned.images[n + 3], np.rot90(small.images[3], 1, axes=(1, 2)))
    np.testing.assert_array_equal(turned.images[2 * n + 3], small.images[3, :, ::-1, ::-1])
    assert turned.names[3 * n] == (small.names[0][0], small.names[0][1] + "@rot270")


def test_jitter_moves_each_drawing_its_own_way_and_keeps_it_binary(paper_parts):
    x, _ = sample_episodes(paper_parts["validation"], 2, np.random.default_rng(0))
    a = jitter_drawings(x, np.random.default_rng(1))
    b = jitter_drawings(x, np.random.default_rng(1))
    np.testing.assert_array_equal(a, b)  # the step's rng decides it: a resumed run redraws the same
    assert a.shape == x.shape and a.dtype == np.float32 and set(np.unique(a)) <= {0.0, 1.0}
    changed = (a != x).reshape(len(x), -1).any(1)
    assert changed.mean() > 0.9, "almost every target is moved"
    ink = a.reshape(len(x), -1).sum(1) / x.reshape(len(x), -1).sum(1)
    assert 0.7 < np.median(ink) < 1.3, f"strokes neither vanish nor smear: ink ratio {np.median(ink):.2f}"
    shifts = [np.abs(np.argwhere(a[i, 0]).mean(0) - np.argwhere(x[i, 0]).mean(0)).max() for i in range(len(x))]
    assert max(shifts) < 4, "small moves: the drawing stays where it was, give or take a few pixels"


def test_unknown_augmentation_or_schedule_is_refused_with_the_choices():
    with pytest.raises(ValueError, match=r"unknown augmentation \['mirror'\].*'rot90', 'jitter'"):
        validate(TrainConfig(augment="rot90,mirror"))
    with pytest.raises(ValueError, match="unknown lr schedule 'step'.*'halve', 'constant', 'cosine'"):
        validate(TrainConfig(lr_schedule="step"))
    with pytest.raises(SystemExit):  # argparse error, exit 2, before torch trains anything
        train_main(["--preset", "smoke", "--out", "unused", "--augment", "mirror"])


def test_learning_rate_schedules_by_hand():
    base = dict(reptile_steps=10, vae_steps=60, final_steps=40, lr=1e-3, lr_halve_every=50)
    halve, constant, cosine = (TrainConfig(lr_schedule=s, **base) for s in ("halve", "constant", "cosine"))
    assert [halve.lr_at(s) for s in (0, 59, 60, 110)] == [1e-3, 1e-3, 5e-4, 2.5e-4]
    assert {constant.lr_at(s) for s in (0, 60, 109)} == {1e-3}
    assert cosine.lr_at(10) == pytest.approx(1e-3)
    assert cosine.lr_at(60) == pytest.approx(1e-3 * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * 0.5))))
    assert cosine.lr_at(110) == pytest.approx(5e-5) and cosine.lr_at(500) == pytest.approx(5e-5)


def test_resume_refuses_another_recipe_and_accepts_run_control_changes(tmp_path):
    config = replace(preset("smoke"), reptile_steps=2, vae_steps=2, final_steps=1, checkpoint_every=1)
    train(config, tmp_path, progress=False)
    longer = replace(config, final_steps=3, time_limit_s=100.0, log_every=1)  # run control: fine
    assert train(longer, tmp_path, progress=False)["steps"] == 7
    with pytest.raises(CheckpointError, match=r"augment: checkpoint '', requested 'rot90'.*another --out"):
        train(replace(longer, augment="rot90"), tmp_path, progress=False)
    with pytest.raises(CheckpointError, match="lr: checkpoint 0.002, requested 0.001"):
        train(replace(longer, lr=1e-3), tmp_path, progress=False)
    # a cosine schedule is its length: a longer run would not be the same run
    assert "final_steps" in resume_mismatches({**replace(config, lr_schedule="cosine").to_dict()},
                                              replace(config, lr_schedule="cosine", final_steps=9))


def test_a_checkpoint_from_before_the_recipe_fields_resumes_as_what_it_was():
    old = {k: v for k, v in TrainConfig(validation_alphabets="").to_dict().items() if k not in LEGACY_VALUES}
    assert resume_mismatches(old, TrainConfig(validation_alphabets="")) == {}
    assert set(resume_mismatches(old, TrainConfig())) == {"validation_alphabets"}
    before_kl_options = {k: v for k, v in TrainConfig().to_dict().items() if k not in ("free_bits", "kl_warmup_steps", "kl_weight")}
    assert resume_mismatches(before_kl_options, TrainConfig()) == {}
    assert resume_mismatches(before_kl_options, TrainConfig(free_bits=0.25)) == {"free_bits": (0.0, 0.25)}
    assert resume_mismatches(before_kl_options, TrainConfig(kl_weight=2.0)) == {"kl_weight": (1.0, 2.0)}


def test_kl_rows_keep_the_trunks_augmentation_unless_they_name_one():
    meta = {"train_config": TrainConfig(augment="rot90", reptile_steps=2, vae_steps=3).to_dict(), "step": 5}
    rows = {row.name: row_config(meta, row, 10) for row in ROWS if row.name in ("freebits", "jitter_freebits", "klwarmup")}
    assert (rows["freebits"].augment, rows["freebits"].free_bits, rows["freebits"].kl_warmup_steps) == ("rot90", 0.25, 0)
    assert (rows["jitter_freebits"].augment, rows["jitter_freebits"].free_bits) == ("jitter", 0.25)
    assert (rows["klwarmup"].augment, rows["klwarmup"].kl_warmup_steps, rows["klwarmup"].free_bits) == ("rot90", 1000, 0)
    assert rows["klwarmup"].kl_weight_at(5) == 0.0, "the warm-up starts at the branch point"
    beta = row_config(meta, next(row for row in ROWS if row.name == "beta2"), 10)
    assert (beta.augment, beta.kl_weight, beta.kl_weight_at(4), beta.kl_weight_at(5)) == ("rot90", 2.0, 1.0, 2.0)


def test_branch_starts_a_new_recipe_from_a_state_and_remembers_where(tmp_path):
    trunk = tmp_path / "trunk"
    config = replace(preset("smoke"), reptile_steps=2, vae_steps=3, final_steps=0, checkpoint_every=1)
    train(config, trunk, progress=False)
    row = row_config(read_meta(trunk / CHECKPOINT), Row("j", "jitter", {"augment": "jitter"}), 2)
    assert (row.vae_steps, row.final_steps, row.total_steps, row.lr_schedule) == (3, 2, 7, "constant")
    branch(trunk / CHECKPOINT, tmp_path / "row", row)
    assert (tmp_path / "row" / CHECKPOINT).read_bytes() == (trunk / CHECKPOINT).read_bytes()
    train(row, tmp_path / "row", progress=False)
    meta = read_meta(tmp_path / "row" / CHECKPOINT)
    assert meta["step"] == 7 and meta["train_config"]["augment"] == "jitter"
    assert meta["branched_from"]["step"] == 5 and meta["branched_from"]["train_config"]["augment"] == ""
    with pytest.raises(CheckpointError, match="cannot branch, its model config"):
        branch(trunk / CHECKPOINT, tmp_path / "other", replace(row, model=replace(row.model, channels=4)))
    assert not sidecar_path(tmp_path / "other" / CHECKPOINT).exists()


def test_ablate_scores_every_row_at_every_milestone_from_one_trunk(tmp_path):
    trunk = tmp_path / "trunk"
    train(replace(preset("smoke"), reptile_steps=2, vae_steps=2, final_steps=0), trunk, progress=False)
    args = ["--from", str(trunk / CHECKPOINT), "--steps", "4", "8", "--k", "3", "--out", str(tmp_path / "rows"),
            "--rows", "none,episodes4", "--docs", str(tmp_path / "docs")]
    assert ablate_main(args) == 0
    for name, steps in (("none", 4 + 8), ("episodes4", 4 + 2)):
        assert read_meta(tmp_path / "rows" / name / CHECKPOINT)["step"] == steps
    text = (tmp_path / "docs" / "results.md").read_text()
    table = [line for line in text.splitlines() if line.startswith("| ")]
    assert len(table) == 3 and "NLL after 8 steps' pairs" in table[0]
    assert all(line.count("±") == 3 for line in table[1:]), "every row scored at both milestones, and paired"
    assert "| +0.00 ± 0.00 |" in table[1], "the first row is the paired reference"
    first_scores = [line.split("|")[2] for line in table[1:]]
    assert first_scores != [line.split("|")[3] for line in table[1:]], "each milestone has its own score"
    assert ablate_main(args) == 0, "resumable: a second call trains and scores nothing new"
    with pytest.raises(SystemExit):
        ablate_main(args[:8] + ["--rows", "none,nope"])


def test_ablate_fidelity_judges_every_row_at_the_last_milestone(tmp_path):
    trunk = tmp_path / "trunk"
    train(replace(preset("smoke"), reptile_steps=2, vae_steps=2, final_steps=0), trunk, progress=False)
    args = ["--from", str(trunk / CHECKPOINT), "--steps", "2", "4", "--k", "3", "--out", str(tmp_path / "rows"),
            "--rows", "none,beta4", "--docs", str(tmp_path / "docs"), "--fidelity", "--fidelity-n", "2",
            "--fidelity-every", "20", "--judge-steps", "10", "--judge-channels", "4", "8", "--judge-features", "8",
            "--judge-cache", str(tmp_path / "judge")]
    assert ablate_main(args) == 0
    records = {name: sorted((tmp_path / "rows" / name).glob("fidelity_validation_*.json")) for name in ("none", "beta4")}
    assert all(len(found) == 1 and found[0].name.endswith("0000008.json") for found in records.values()), \
        "judged once, at the last milestone (trunk step 4 + 4)"
    kl = {name: json.loads(found[0].read_text())["prior_hole"]["kl_per_target"] for name, found in records.items()}
    assert kl["beta4"] != kl["none"], "the rows' weights differ, so do their posteriors"
    text = (tmp_path / "docs" / "results.md").read_text()
    judged_rows = [line for line in text.splitlines() if line.startswith("| `")]
    assert [line.split("|")[1].strip() for line in judged_rows] == ["`none`", "`beta4`"]
    assert all(line.count("%") >= 5 for line in judged_rows)
    stamp = records["none"][0].stat().st_mtime_ns
    assert ablate_main(args) == 0 and records["none"][0].stat().st_mtime_ns == stamp, "the judged score is cached"

def test_kl_options_reach_a_final_stage_with_the_vae_loss(tmp_path):
    """The final stage with final_loss="vae" is named "vae" like stage 2; free bits must still
    change it (a floor of 50 nats a dimension leaves KL(z) no gradient) and leave stage 2 alone."""
    from vce_deploy.checkpoint import load_tensors

    base = replace(preset("smoke"), reptile_steps=0, vae_steps=1, final_steps=2, final_loss="vae", checkpoint_every=1)
    weights = {}
    for name, free_bits in (("plain", 0.0), ("floored", 50.0)):
        train(replace(base, free_bits=free_bits), tmp_path / name, progress=False)
        weights[name] = load_tensors(tmp_path / name / CHECKPOINT)
    changed = [k for k in weights["plain"] if not np.array_equal(weights["plain"][k], weights["floored"][k])]
    assert any(".encoder." in k for k in changed), "free bits did not reach the final VAE stage"
