"""Table 1 of the paper on our split: one shared trunk, four final losses.

    python -m train.table1 --from checkpoints/default/stage2.safetensors --final-steps 3000 --k 1000 --out runs/t1

Every row starts from the same stage-2 checkpoint (written by train.train at the end of the
VAE stage) and trains the same number of final-stage steps with the same seed, so the rows
differ only in the final loss: VAE (the VAE stage continued), LMVAE sigma = 0.15, LMVAE
sigma = 0, IntroVAE. A row is branched (train.train.branch: the stage-2 state, the row's
recipe in its sidecar) into its run directory, and train() resumes it with the row's loss.

Each row is scored twice by train.evaluate's estimator: on the validation characters (held
out of the training alphabets), which choose the final loss, and on the test alphabets, which
are only reported. The table, with the paper's numbers beside ours, goes to docs/results.md,
and each row's samples to docs/figures/.

Resumable: a row whose checkpoint is finished is not trained again, and a row whose NLL was
computed with the same settings is not evaluated again.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from vce_deploy.checkpoint import atomic_write_bytes, read_meta, sidecar_path
from vce_deploy.errors import CheckpointError
from vce_deploy.omniglot import SPLITS, targets_per_character

from .config import TrainConfig

CHECKPOINT = "checkpoint.safetensors"
PARTS = ("validation", "test")  # validation chooses the final loss; test is only reported
SECTION_BEGIN = "<!-- table1:begin (written by python -m train.table1; edits inside are overwritten) -->"
SECTION_END = "<!-- table1:end -->"
COMPARE_CONDITIONS = 4  # rows per method in the side-by-side figure (the paper's Fig. 5 shows 4)


@dataclass(frozen=True)
class Row:
    name: str  # run directory and figure name
    label: str  # the "Loss function" column of the paper's Table 1
    final_loss: str
    sigma: float | None  # None: the stage-2 config's (unused by that loss)
    paper_nll: float  # the paper's Table 1, nats


ROWS = (
    Row("vae", "VAE", "vae", None, 68.75),
    Row("lmvae_sigma0.15", "Our LMVAE, σ = 0.15", "lmvae", 0.15, 81.39),
    Row("lmvae_sigma0", "Our LMVAE, σ = 0", "lmvae", 0.0, 62.8),
    Row("introvae", "IntroVAE", "introvae", None, 117.1),
)


def row_config(stage2_meta: dict, row: Row, final_steps: int | None) -> TrainConfig:
    """The stage-2 run's config with the row's final loss; everything else (seed, model,
    schedule, stage lengths) stays, so the rows differ in the loss alone."""
    config = TrainConfig.from_dict(stage2_meta["train_config"])
    boundary = config.final_stage_start
    if stage2_meta["step"] != boundary:
        raise CheckpointError(
            f"expected a stage-2 checkpoint at step reptile_steps + vae_steps = {boundary}, "
            f"got one at step {stage2_meta['step']} (stage {stage2_meta.get('stage')!r})")
    changes = {"final_loss": row.final_loss}
    if row.sigma is not None:
        changes["sigma"] = row.sigma
    if final_steps is not None:
        changes["final_steps"] = final_steps
    return replace(config, **changes)


def prepare_run(stage2: Path, run_dir: Path, config: TrainConfig) -> str:
    """Branch `run_dir` from the stage-2 checkpoint unless it already holds this row's run.
    Returns "branched", "resuming" or "finished"."""
    run_dir.mkdir(parents=True, exist_ok=True)
    checkpoint = run_dir / CHECKPOINT
    if checkpoint.is_file() and sidecar_path(checkpoint).is_file():
        meta = read_meta(checkpoint)
        mine = {key: getattr(config, key) for key in ("final_loss", "sigma", "seed", "reptile_steps", "vae_steps")}
        theirs = {key: meta["train_config"].get(key) for key in mine}
        if mine != theirs or meta["model_config"] != config.model.to_dict():
            raise CheckpointError(f"{checkpoint}: holds another run ({theirs}) than this row's ({mine}); "
                                  f"use another --out or remove {run_dir}")
        if meta["step"] > config.total_steps:
            raise CheckpointError(f"{checkpoint}: already trained to step {meta['step']}, beyond the "
                                  f"{config.total_steps} asked for (--final-steps {config.final_steps}); use another --out")
        return "finished" if meta["step"] == config.total_steps else "resuming"
    from .train import branch

    branch(stage2, run_dir, config)
    return "branched"


def nll_file(run_dir: Path, part: str) -> Path:
    return run_dir / f"nll_{part}.json"


def evaluate_row(run_dir: Path, part: str, x: np.ndarray, q: np.ndarray, settings: dict, batch_size: int,
                 progress: bool) -> dict:
    """The row's NLL on one part, cached in run_dir/nll_<part>.json for these exact settings and weights."""
    from vce_deploy.nll import load_evaluable, one_shot_nll, sem_over_characters

    checkpoint = run_dir / CHECKPOINT
    settings = dict(settings, step=read_meta(checkpoint)["step"])
    cache = nll_file(run_dir, part)
    if cache.is_file():
        record = json.loads(cache.read_text())
        if record.get("settings") == settings:
            return record
    converter, _ = load_evaluable(checkpoint)
    t0 = time.perf_counter()
    result = one_shot_nll(converter, x, q, k=settings["k"], seed=settings["seed"],
                          batch_size=batch_size, progress=progress)
    # characters are the unit: a character's targets share its drawings (vce_deploy/nll.py)
    result["nll_sem_characters"] = sem_over_characters(result["nll_per_target"],
                                                       targets_per_character(settings["all_drawings"]))
    record = {"settings": settings, "seconds": time.perf_counter() - t0, **result}
    atomic_write_bytes(cache, (json.dumps(record, indent=2) + "\n").encode())
    return record


def sample_grids(rows: list[Row], out: Path, test, seed: int, figures: Path) -> list[Path]:
    """Figs. 4 and 5: per row, one line per test-alphabet condition (condition first, then
    samples); and all rows stacked, with the same conditions and the same noise."""
    from vce_deploy.checkpoint import load_model
    from vce_deploy.grid import save_grid

    from .train import sample_grid

    written, stacked = [], []
    for row in rows:
        vce, _ = load_model(out / row.name / CHECKPOINT)
        grid = sample_grid(vce, test, seed)  # (conditions, 1 + samples, 28, 28)
        written.append(save_grid(grid, figures / f"table1_{row.name}.png"))
        stacked.append(grid[::len(grid) // COMPARE_CONDITIONS][:COMPARE_CONDITIONS])  # spread over the 3 alphabets
    written.append(save_grid(np.concatenate(stacked), figures / "table1_compare.png"))
    return written


def _pm(record: dict, key: str = "nll") -> str:
    sem = record["nll_sem_characters"] if key == "nll" else record[f"{key}_sem"]
    return f"{record[f'{key}_mean']:.2f} ± {sem:.2f}"


def choose(rows: list[Row], validation: dict[str, dict]) -> Row:
    """The final loss the validation characters choose: the lowest validation NLL."""
    return min(rows, key=lambda row: validation[row.name]["nll_mean"])


def split_sentence(config: TrainConfig, counts: dict[str, int]) -> str:
    spec = SPLITS[config.split]
    if spec.train_alphabets is None:
        return (f"the paper's split: training on the alphabets of {', '.join(spec.train_zips)}, less "
                f"{counts['validation']} validation characters (one in ten of each alphabet), and testing on the "
                f"{counts['test']} characters of the novel alphabets of {', '.join(spec.test_zips)}")
    return (f"the `{config.split}` split: training on {len(spec.train_alphabets)} alphabets "
            f"({', '.join(spec.train_alphabets)}) less {counts['validation']} validation characters, testing on "
            f"{len(spec.test_alphabets)} others ({', '.join(spec.test_alphabets)}: {counts['test']} characters)")


def results_markdown(rows: list[Row], records: dict[str, dict[str, dict]], counts: dict[str, int], stage2: Path,
                     stage2_meta: dict, config: TrainConfig, figures: list[Path], docs: Path) -> str:
    validation, test = records["validation"], records["test"]
    chosen = choose(rows, validation)
    settings = next(iter(test.values()))["settings"]
    drawings = ("all 20 drawings of every character" if settings["all_drawings"]
                else "drawings 0 and 10 of every character, each conditioned on the next drawing")
    subset = (f" of one test character in {settings['every']} (a subset spanning all test alphabets)"
              if settings["every"] > 1 else "")
    lines = [
        SECTION_BEGIN,
        "## Table 1 on our split: one-shot NLL, final loss chosen on validation",
        "",
        f"Negative log-likelihood -log p(x | q) in nats (lower is better), importance-sampled with "
        f"K = {settings['k']} samples from q(z | x, q) per target (`train/evaluate.py`); targets are {drawings}. "
        f"Validation: {next(iter(validation.values()))['targets']} targets of the held-out training-alphabet "
        f"characters. Test: {next(iter(test.values()))['targets']} targets{subset}. Mean ± standard error over "
        f"characters; -ELBO is on the same samples.",
        "",
        "| Model | Loss function | NLL, validation | NLL, test | -ELBO, test | NLL (paper) |",
        "|---|---|---|---|---|---|",
    ]
    for row in rows:
        lines.append(f"| Our VCE | {row.label} | {_pm(validation[row.name])} | {_pm(test[row.name])} | "
                     f"{_pm(test[row.name], 'elbo')} | {row.paper_nll:g} |")
    boundary = config.final_stage_start
    trunk = (f"{config.reptile_steps} Reptile outer steps of {config.reptile_inner_steps} inner steps, then "
             if config.reptile_steps else "") + f"{config.vae_steps} VAE steps"
    if config.init_from:
        trunk += f", starting from the weights of `{config.init_from}`"
    lines += [
        "",
        f"**Chosen on validation: {chosen.label}** (lowest validation NLL). The test column is reported, "
        "never used to choose.",
        "",
        "**Budget.** Every row starts from the same stage-2 checkpoint "
        f"(`{stage2}`, step {stage2_meta['step']}: {trunk}) and trains "
        f"{config.final_steps} final-stage steps with seed {config.seed}, batch {19 * config.episodes_per_step}, "
        f"Adam lr {config.lr:g} halved every {config.lr_halve_every} steps ({config.lr_at(boundary):g} at the "
        f"branch point); {boundary + config.final_steps} steps in all. Model: {config.model.channels} channels, "
        f"{config.model.blocks} residual block(s) per trunk, latent {config.model.latent_dim}. "
        f"LMVAE m = {config.margin:g}, λ = {config.lam:g}; "
        f"IntroVAE α = {config.intro_alpha:g}, β = {config.intro_beta:g}.",
        "",
        f"**Against the paper.** We use {split_sentence(config, counts)}. The paper trains 600,000 steps on a "
        "GPU and does not state its NLL estimator's K or its target/condition protocol; ours is "
        "docs/design.md's. Budgets and protocol differ, so the two NLL columns are not directly comparable; "
        "compare the rows with each other.",
        "",
        "Samples (one line per test-alphabet condition: the condition, then conversions):",
        "",
    ]
    for path in figures:
        what = ("the rows of the table stacked in table order, "
                f"{COMPARE_CONDITIONS} conditions each, same noise" if path.stem == "table1_compare" else "")
        lines.append(f"- `{path.stem}`{': ' + what if what else ''}: ![{path.stem}]({os.path.relpath(path, docs)})")
    lines += ["", SECTION_END, ""]
    return "\n".join(lines)


def pick_rows(parser: argparse.ArgumentParser, names: str, rows: tuple) -> list:
    """--rows a,b -> those rows in the order given; an unknown name is a usage error listing the known."""
    by_name = {r.name: r for r in rows}
    unknown = [n for n in names.split(",") if n not in by_name]
    if unknown:
        parser.error(f"unknown rows {unknown}; expected some of {list(by_name)}")
    return [by_name[n] for n in names.split(",")]


def write_section(path: Path, section: str, begin: str = SECTION_BEGIN, end: str = SECTION_END) -> None:
    """Replace the section between `begin` and `end` of results.md (or append it), leaving the
    rest of the file alone."""
    text = path.read_text() if path.is_file() else "# Results\n\n"
    if begin in text and end in text:
        head, rest = text.split(begin, 1)
        tail = rest.split(end, 1)[1].lstrip("\n")
        text = head + section + tail
    else:
        text = text.rstrip("\n") + "\n\n" + section
    atomic_write_bytes(path, text.encode())


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m train.table1", description=__doc__.split("\n\n")[0])
    parser.add_argument("--from", dest="stage2", required=True, help="stage-2 checkpoint (RUN/stage2.safetensors)")
    parser.add_argument("--final-steps", type=int, default=None, help="final-stage steps per row (default: the stage-2 run's)")
    parser.add_argument("--k", type=int, default=1000, help="importance samples per NLL target")
    parser.add_argument("--out", required=True, help="one run directory per row goes here")
    parser.add_argument("--docs", default="docs", help="results.md and figures/ go here")
    parser.add_argument("--rows", default=",".join(r.name for r in ROWS), help="comma-separated subset of rows")
    parser.add_argument("--limit", type=int, default=None, help="only the first N NLL targets (quick checks)")
    parser.add_argument("--all-drawings", action="store_true", help="all 20 drawings of every character as targets")
    parser.add_argument("--seed", type=int, default=0, help="NLL noise and sample-grid seed")
    parser.add_argument("--batch-size", type=int, default=1000, help="convertor batch for the NLL")
    parser.add_argument("--data-dir", default=None, help="folder with the Omniglot zips")
    parser.add_argument("--test-every", type=int, default=1,
                        help="test on every N-th character only (the validation part is always whole)")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    rows = pick_rows(parser, args.rows, ROWS)

    from vce_deploy.nll import load_targets
    from .train import train

    stage2, out, docs = Path(args.stage2), Path(args.out), Path(args.docs)
    progress = not args.no_progress
    try:
        if not stage2.is_file():
            raise CheckpointError(f"{stage2}: expected a stage-2 checkpoint (RUN/stage2.safetensors), but it does not exist")
        stage2_meta = read_meta(stage2)
        configs = {row.name: row_config(stage2_meta, row, args.final_steps) for row in rows}
        for row in rows:
            run_dir = out / row.name
            status = prepare_run(stage2, run_dir, configs[row.name])
            sigma = f", sigma {row.sigma:g}" if row.sigma is not None else ""
            print(f"[{row.name}] {status}: final loss {row.final_loss}{sigma}, to step {configs[row.name].total_steps}",
                  flush=True)
            if status != "finished":
                train(configs[row.name], run_dir, data_dir=args.data_dir, progress=progress)
        split = configs[rows[0].name].split
        targets = {part: load_targets(split, part, args.data_dir, args.all_drawings, args.limit,
                                      args.test_every if part == "test" else 1) for part in PARTS}
    except (CheckpointError, FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1

    records: dict[str, dict[str, dict]] = {part: {} for part in PARTS}
    for part, (_, x, q) in targets.items():
        settings = {"k": args.k, "seed": args.seed, "targets": len(x), "all_drawings": args.all_drawings,
                    "limit": args.limit, "every": args.test_every if part == "test" else 1}
        for row in rows:
            r = records[part][row.name] = evaluate_row(out / row.name, part, x, q, settings, args.batch_size, progress)
            print(f"[{row.name}] {part} NLL {_pm(r)}  -ELBO {r['elbo_mean']:.2f}  (paper {row.paper_nll:g}; "
                  f"{r['seconds']:.0f} s)", flush=True)
    chosen = choose(rows, records["validation"])
    print(f"chosen on validation: {chosen.name}")
    test_split = targets["test"][0]
    figures = sample_grids(rows, out, test_split, args.seed, docs / "figures")
    counts = {part: len(split_part) for part, (split_part, _, _) in targets.items()}
    write_section(docs / "results.md", results_markdown(rows, records, counts, stage2, stage2_meta,
                                                        configs[rows[0].name], figures, docs))
    summary = {part: {name: {k: v for k, v in r.items() if k != "nll_per_target"} for name, r in by_row.items()}
               for part, by_row in records.items()}
    summary["chosen"] = chosen.name
    atomic_write_bytes(out / "table1.json", (json.dumps(summary, indent=2) + "\n").encode())
    print(f"wrote {docs / 'results.md'}, {len(figures)} figures in {docs / 'figures'}, {out / 'table1.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
