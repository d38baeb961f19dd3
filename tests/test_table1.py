"""train.table1 end to end on the smoke run's stage-2 checkpoint, with tiny budgets."""
from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from train.config import preset
from train.table1 import CHECKPOINT, PARTS, ROWS, SECTION_BEGIN, main, nll_file
from train.train import STAGE2_CHECKPOINT
from vce_deploy.checkpoint import load_tensors, read_meta

FINAL_STEPS = 2


def _numbers(nll_file: Path) -> dict:
    return {k: v for k, v in json.loads(nll_file.read_text()).items() if k != "seconds"}


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def table(smoke_run, tmp_path_factory):
    root = tmp_path_factory.mktemp("table1")
    docs = root / "docs"
    docs.mkdir()
    (docs / "results.md").write_text("# Results\n\nLatency tables, written by someone else.\n")
    argv = ["--from", str(smoke_run / STAGE2_CHECKPOINT), "--final-steps", str(FINAL_STEPS), "--k", "4",
            "--limit", "6", "--test-every", "2", "--out", str(root / "runs"), "--docs", str(docs), "--no-progress"]
    assert main(argv) == 0
    return root, argv


def test_every_row_branches_from_stage2_and_trains_its_own_loss(table, smoke_run):
    root, _ = table
    config = preset("smoke")
    boundary = config.reptile_steps + config.vae_steps
    stage2 = {k: v for k, v in load_tensors(smoke_run / STAGE2_CHECKPOINT).items() if k.startswith("model.")}
    finals = {}
    for row in ROWS:
        meta = read_meta(root / "runs" / row.name / CHECKPOINT)
        assert meta["step"] == boundary + FINAL_STEPS
        assert meta["train_config"]["final_loss"] == row.final_loss
        if row.sigma is not None:
            assert meta["train_config"]["sigma"] == row.sigma
        assert meta["train_config"]["seed"] == config.seed
        finals[row.name] = load_tensors(root / "runs" / row.name / CHECKPOINT)
        assert any(not np.array_equal(finals[row.name][k].numpy(), v.numpy()) for k, v in stage2.items()), \
            f"{row.name}: weights equal the stage-2 checkpoint; no final-stage training happened"
    a, b = finals["lmvae_sigma0.15"], finals["lmvae_sigma0"]
    assert any(not np.array_equal(a[k].numpy(), b[k].numpy()) for k in a), "sigma had no effect"


def test_results_md_holds_our_numbers_beside_the_papers(table):
    root, _ = table
    text = (root / "docs" / "results.md").read_text()
    assert "Latency tables, written by someone else." in text, "the rest of results.md must survive"
    records = {part: {row.name: json.loads(nll_file(root / "runs" / row.name, part).read_text()) for row in ROWS}
               for part in PARTS}
    for row in ROWS:
        validation, test = records["validation"][row.name], records["test"][row.name]
        assert validation["k"] == test["k"] == 4 and validation["targets"] == test["targets"] == 6
        assert test["settings"]["every"] == 2 and validation["settings"]["every"] == 1
        line = (f"| Our VCE | {row.label} | {validation['nll_mean']:.2f} ± {validation['nll_sem_characters']:.2f} | "
                f"{test['nll_mean']:.2f} ± {test['nll_sem_characters']:.2f} |")
        assert line in text, f"missing or wrong row: {line}"
        assert re.search(re.escape(line) + r".*\| " + re.escape(f"{row.paper_nll:g}") + r" \|", text)
    assert "not directly comparable" in text and f"trains {FINAL_STEPS} final-stage steps" in text
    assert "one test character in 2 (a subset spanning all test alphabets)" in text
    summary = json.loads((root / "runs" / "table1.json").read_text())
    best = min(ROWS, key=lambda row: records["validation"][row.name]["nll_mean"])
    assert summary["chosen"] == best.name, "the final loss is chosen on validation, never on test"
    assert f"**Chosen on validation: {best.label}**" in text
    assert set(summary["validation"]) == set(summary["test"]) == {row.name for row in ROWS}


def test_the_test_subset_takes_whole_characters_from_every_alphabet():
    from vce_deploy.nll import load_targets
    from vce_deploy.omniglot import targets_per_character

    split, x, q = load_targets("small", "test", every=3)
    whole, x_all, q_all = load_targets("small", "test")
    kept = split.names[::3]
    assert {alphabet for alphabet, _ in kept} == {alphabet for alphabet, _ in whole.names}
    assert len(x) == targets_per_character() * len(kept)
    pairs = 2 * 3  # targets per character times the stride
    assert np.array_equal(x[:2], x_all[:2]) and np.array_equal(x[2:4], x_all[pairs:pairs + 2])
    assert np.array_equal(q[2:4], q_all[pairs:pairs + 2])
    with pytest.raises(ValueError, match="every: expected a positive"):
        load_targets("small", "test", every=0)


def test_sample_grids_have_one_line_per_condition(table):
    root, _ = table
    figures = root / "docs" / "figures"
    per_row = [Image.open(figures / f"table1_{row.name}.png") for row in ROWS]
    compare = Image.open(figures / "table1_compare.png")
    assert len({im.size for im in per_row}) == 1
    # save_grid: scale 2, 2 px padding, 28 px cells: 8 conditions x (1 + 10) columns
    assert per_row[0].size == (2 * (11 * 30 + 2), 2 * (8 * 30 + 2))
    assert compare.size == (2 * (11 * 30 + 2), 2 * (4 * len(ROWS) * 30 + 2))


def test_rerun_skips_finished_rows_and_redoes_only_what_is_missing(table, capsys):
    root, argv = table
    runs = root / "runs"
    before = {row.name: _digest(runs / row.name / CHECKPOINT) for row in ROWS}
    nll_before = {row.name: _numbers(nll_file(runs / row.name, "test")) for row in ROWS}
    kept = {row.name: _digest(nll_file(runs / row.name, "test")) for row in ROWS if row.name != "introvae"}
    nll_file(runs / "introvae", "test").unlink()  # evaluation of one row lost
    capsys.readouterr()
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert all(f"[{row.name}] finished" in printed for row in ROWS)
    assert {row.name: _digest(runs / row.name / CHECKPOINT) for row in ROWS} == before
    assert {row.name: _numbers(nll_file(runs / row.name, "test")) for row in ROWS} == nll_before, \
        "the re-evaluated row must give the same numbers (seeded)"
    assert {name: _digest(nll_file(runs / name, "test")) for name in kept} == kept, "cached NLLs must not be recomputed"
    assert (root / "docs" / "results.md").read_text().count(SECTION_BEGIN) == 1


def test_a_shorter_budget_than_the_finished_run_is_refused(table, capsys):
    root, argv = table
    shorter = list(argv)
    shorter[shorter.index("--final-steps") + 1] = "1"
    digest = _digest(root / "runs" / "vae" / CHECKPOINT)
    assert main(shorter) == 1
    assert "beyond the" in capsys.readouterr().err
    assert _digest(root / "runs" / "vae" / CHECKPOINT) == digest


def test_a_checkpoint_that_is_not_at_the_stage_boundary_is_refused(smoke_run, tmp_path, capsys):
    argv = ["--from", str(smoke_run / CHECKPOINT), "--final-steps", "1", "--k", "2", "--out", str(tmp_path / "runs"),
            "--docs", str(tmp_path / "docs"), "--no-progress"]
    assert main(argv) == 1
    assert "expected a stage-2 checkpoint at step" in capsys.readouterr().err
    assert not (tmp_path / "runs" / "vae" / CHECKPOINT).exists()
