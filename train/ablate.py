"""Recipe ablations at equal budget, scored on the validation alphabets (issue 21's table).

    python -m train.ablate --from TRUNK.safetensors --steps 1000 2000 --k 200 --out runs/ablate

Every row branches (train.train.branch) from the same trunk state and trains the same number
of pairs with the same seed; rows differ only in what the row names (an augmentation, the
final loss, episodes per step, the learning rate, free bits or a KL warm-up). Rows are trained
in rounds: all of them to the first --steps milestone, each scored, then all to the next, so the
table shows whether the order holds as the budget grows. The score is train.evaluate's one-shot NLL on all the
validation alphabets' targets (mean, SE over characters); the test alphabets are never read.
The table goes to docs/results.md between this module's markers.

Resumable: a row already at a milestone is not trained again, a score computed with the same
settings and weights is read back from the row's directory.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

from vce_deploy.checkpoint import atomic_write_bytes, read_meta
from vce_deploy.errors import CheckpointError
from vce_deploy.omniglot import targets_per_character

from .config import TrainConfig, validate
from .fidelity import add_judge_flags, judge_settings
from .table1 import pick_rows, write_section
from .train import CHECKPOINT, branch

SECTION_BEGIN = "<!-- ablate:begin (written by python -m train.ablate; edits inside are overwritten) -->"
SECTION_END = "<!-- ablate:end -->"
# The fidelity columns: convert's default temperature, thresholded as users keep the variations,
# and the best form the shipped bundle's scan found (the Bernoulli means at 0.7: docs/results.md).
FIDELITY_TEMPERATURES = (0.7, 1.0)


@dataclass(frozen=True)
class Row:
    name: str
    label: str
    changes: dict = field(default_factory=dict)  # TrainConfig fields the row sets
    steps_per_pair_budget: int = 1  # episodes per step: the row takes 1/this many steps for the same pairs


ROWS = (
    Row("none", "no augmentation", {"augment": ""}),
    Row("rot90", "class augmentation (rot90)", {"augment": "rot90"}),
    Row("jitter", "per-drawing jitter of the targets", {"augment": "jitter"}),
    Row("rot90_jitter", "rot90 + jitter", {"augment": "rot90,jitter"}),
    Row("lmvae_sigma0", "rot90, final loss LMVAE σ = 0", {"augment": "rot90", "final_loss": "lmvae", "sigma": 0.0}),
    Row("episodes4", "rot90, 4 characters a step (1/4 the steps)", {"augment": "rot90", "episodes_per_step": 4}, 4),
    Row("lr_quarter", "rot90, lr / 4", {"augment": "rot90", "lr_scale": 0.25}),
    # issue 27's KL-term rows: without "augment" a row keeps the trunk's (the table's header names it)
    Row("freebits", "trunk's augmentation, free bits 0.25 nats a dimension", {"free_bits": 0.25}),
    Row("jitter_freebits", "jitter, free bits 0.25 nats a dimension", {"augment": "jitter", "free_bits": 0.25}),
    Row("klwarmup", "trunk's augmentation, KL warm-up over 1,000 steps", {"kl_warmup_steps": 1000}),
    # the prior hole's lever: a KL(z) weight above 1 pulls the posteriors toward the prior
    Row("beta2", "trunk's augmentation, KL(z) weight 2", {"kl_weight": 2.0}),
    Row("beta4", "trunk's augmentation, KL(z) weight 4", {"kl_weight": 4.0}),
)


def row_config(trunk_meta: dict, row: Row, pairs_steps: int) -> TrainConfig:
    """The trunk's recipe with the row's changes, as a final stage that starts at the trunk's
    step and lasts `pairs_steps` one-episode steps' worth of pairs, at a constant rate (the
    trunk's rate at the branch point, times the row's lr_scale)."""
    trunk = TrainConfig.from_dict(trunk_meta["train_config"])
    step = int(trunk_meta["step"])
    if step < trunk.reptile_steps:
        raise CheckpointError(f"expected a trunk past its {trunk.reptile_steps} Reptile steps, got step {step}")
    changes = dict(row.changes)
    lr = trunk.lr_at(step) * changes.pop("lr_scale", 1.0)
    changes.setdefault("final_loss", "vae")
    if pairs_steps % row.steps_per_pair_budget:
        raise ValueError(f"--steps {pairs_steps}: expected a multiple of {row.steps_per_pair_budget} for row {row.name}")
    config = replace(trunk, vae_steps=step - trunk.reptile_steps, final_steps=pairs_steps // row.steps_per_pair_budget,
                     lr=lr, lr_schedule="constant", validate_every=0, **changes)
    validate(config)
    return config


def prepare(trunk: Path, run_dir: Path, config: TrainConfig) -> int:
    """Branch the row unless its directory already holds it; -> the row's current step."""
    checkpoint = run_dir / CHECKPOINT
    if not checkpoint.is_file():
        branch(trunk, run_dir, config)
    meta = read_meta(checkpoint)
    if meta.get("branched_from", {}).get("step") != read_meta(trunk)["step"]:
        raise CheckpointError(f"{checkpoint}: not a branch of {trunk}; use another --out or remove {run_dir}")
    return int(meta["step"])


def _cached(run_dir: Path, name: str, step: int, settings: dict, compute) -> dict:
    """run_dir/<name>_<step>.json when it was computed with these settings, else compute(checkpoint)
    written there; computed only when the row's checkpoint stands at `step` (a row trained past
    it has its score)."""
    cache = run_dir / f"{name}_{step:07d}.json"
    settings = dict(settings, step=step)
    if cache.is_file():
        record = json.loads(cache.read_text())
        if record.get("settings") == settings:
            return record
    at = read_meta(run_dir / CHECKPOINT)["step"]
    if at != step:
        raise CheckpointError(f"{run_dir}: no {name} at step {step} with these settings, and the row stands at "
                              f"step {at}; score it with the settings it was scored with, or use another --out")
    t0 = time.perf_counter()
    record = {"settings": settings, **compute(run_dir / CHECKPOINT)}
    record["seconds"] = time.perf_counter() - t0
    atomic_write_bytes(cache, (json.dumps(record) + "\n").encode())
    return record


def score(run_dir: Path, step: int, x, q, settings: dict, batch_size: int) -> dict:
    """The row's validation NLL at `step` (train.evaluate's protocol), cached in the row's directory."""
    from vce_deploy.nll import load_evaluable, one_shot_nll, sem_over_characters

    def compute(checkpoint: Path) -> dict:
        converter, _ = load_evaluable(checkpoint, threads=1)
        result = one_shot_nll(converter, x, q, k=settings["k"], seed=settings["seed"], batch_size=batch_size)
        result["nll_sem_characters"] = sem_over_characters(result["nll_per_target"], targets_per_character(False))
        return result

    return _cached(run_dir, "nll_validation", step, settings, compute)


def judged(run_dir: Path, step: int, judge, settings: dict, split: str, held_out: tuple[str, ...], data_dir) -> dict:
    """The row's judged sample fidelity at `step` (train.fidelity's score on the validation
    alphabets, with a judge trained on their real drawings), cached in the row's directory."""
    from .fidelity import fidelity_score, load_source

    def compute(checkpoint: Path) -> dict:
        converter, _ = load_source(str(checkpoint), threads=1)
        return fidelity_score(converter, "validation", n=settings["n"], characters_every=settings["every"],
                              seed=settings["seed"], temperatures=FIDELITY_TEMPERATURES, split=split,
                              data_dir=data_dir, judge=judge, validation_alphabets=held_out, log=lambda m: None)

    return _cached(run_dir, "fidelity_validation", step, dict(settings, judge=judge.key), compute)


def paired(row: dict | None, reference: dict | None) -> str:
    """Mean and SE over characters of the per-target NLL difference on the same targets and
    noise: far tighter than the two rows' own SEs, which share most of their spread."""
    if row is None or reference is None:
        return "-"
    import numpy as np

    per_character = (np.asarray(row["nll_per_target"]) - np.asarray(reference["nll_per_target"])).reshape(
        -1, targets_per_character(False)).mean(1)
    sem = per_character.std(ddof=1) / np.sqrt(len(per_character)) if len(per_character) > 1 else 0.0
    return f"{per_character.mean():+.2f} ± {sem:.2f}"


def fidelity_lines(rows: list[Row], fidelity: dict[str, dict], milestone: int) -> list[str]:
    """The judged columns of the rows scored at `milestone` (train.fidelity's score)."""
    scored = [row for row in rows if row.name in fidelity]
    if not scored:
        return []
    first = fidelity[scored[0].name]
    ref = first["reference"]
    lines = ["", f"Judged sample fidelity after {milestone:,} steps' pairs (`python -m train.fidelity`'s score on "
             f"the {first['protocol']['characters']} validation characters, {first['protocol']['n']} variations per "
             f"condition; its judge is trained on those alphabets' real drawings, never the conditions: it reads "
             f"real redraws right {ref['real_redraw_top1']:.1%}, the condition redrawn with jitter "
             f"{ref['jittered_condition_top1']:.1%}; a real redraw's IoU with its condition is "
             f"{ref['real_redraw_iou_condition']:.2f}).", "",
             "| row | t = 1, thresholded | t = 0.7, means | prior z | posterior z | IoU with condition (t = 1) "
             "| blanks | KL a target (nats) |", "|---|---|---|---|---|---|---|---|"]
    for row in scored:
        record = fidelity[row.name]
        t1, t07, parts = record["variations"]["1"], record["variations"]["0.7"], record["decomposition"]
        lines.append(f"| `{row.name}` | {t1['threshold']['top1']:.1%} ± {t1['threshold']['top1_se']:.1%} | "
                     f"{t07['mean']['top1']:.1%} ± {t07['mean']['top1_se']:.1%} | "
                     f"{parts['prior_sample']['threshold']:.1%} | {parts['posterior_sample']['threshold']:.1%} | "
                     f"{t1['iou_condition']:.2f} | {t1['blanks']:.1%} | {record['prior_hole']['kl_per_target']:.1f} |")
    return lines


def markdown(rows: list[Row], scores: dict[str, dict[int, dict]], milestones: list[int], trunk: Path,
             trunk_meta: dict, command: str, machine: str, fidelity: dict[str, dict] | None = None) -> str:
    trunk_config = TrainConfig.from_dict(trunk_meta["train_config"])
    held_out = (f"the alphabets {', '.join(trunk_config.held_out_alphabets)}" if trunk_config.held_out_alphabets
                else "one character in ten of each training alphabet")
    first = next(iter(next(iter(scores.values())).values()))
    best = min(rows, key=lambda r: scores[r.name][milestones[-1]]["nll_mean"]) if all(
        milestones[-1] in scores[r.name] for r in rows) else None
    last, reference = milestones[-1], rows[0]
    head = ("| row | " + " | ".join(f"NLL after {m:,} steps' pairs" for m in milestones)
            + f" | rank at each | paired vs `{reference.name}` at {last:,} |")
    lines = [SECTION_BEGIN, "## Recipe ablations on the validation alphabets (train.ablate)", "",
             f"One-shot NLL in nats on the {first['targets']} targets of the validation part "
             f"({held_out}), never trained on; K = {first['k']} "
             f"importance samples, mean ± SE over characters. Every row branches from the same trunk "
             f"(`{trunk}`, step {trunk_meta['step']}: recipe `augment={trunk_config.augment or 'none'}`, lr "
             f"{trunk_config.lr_at(trunk_meta['step']):g} at the branch point) and trains the same number of "
             f"pairs (19 a character) with seed {trunk_config.seed}, at a constant rate.", "",
             head, "|---|" + "---|" * (len(milestones) + 2)]
    ranks = {m: sorted((r for r in rows if m in scores[r.name]), key=lambda r: scores[r.name][m]["nll_mean"])
             for m in milestones}
    for row in rows:
        cells = [f"{scores[row.name][m]['nll_mean']:.2f} ± {scores[row.name][m]['nll_sem_characters']:.2f}"
                 if m in scores[row.name] else "not run" for m in milestones]
        order = " / ".join(str(ranks[m].index(row) + 1) if row in ranks[m] else "-" for m in milestones)
        lines.append(f"| {row.label} (`{row.name}`) | " + " | ".join(cells) + f" | {order} | "
                     f"{paired(scores[row.name].get(last), scores[reference.name].get(last))} |")
    lines += fidelity_lines(rows, fidelity or {}, last)
    lines += ["", f"Command: `{command}`, on {machine}, one thread, beside the campaign and other jobs "
              "(wall times are not comparable; steps are)."]
    if best is not None:
        lines += ["", f"Lowest after {milestones[-1]:,} steps' pairs: **{best.label}**."]
    lines += ["", SECTION_END, ""]
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m train.ablate", description=__doc__.split("\n\n")[0])
    parser.add_argument("--from", dest="trunk", required=True, help="trunk checkpoint every row branches from")
    parser.add_argument("--steps", type=int, nargs="+", required=True,
                        help="milestones, in one-episode steps' worth of pairs; every row is scored at each")
    parser.add_argument("--k", type=int, default=200, help="importance samples per NLL target")
    parser.add_argument("--out", required=True, help="one run directory per row goes here")
    parser.add_argument("--rows", default=",".join(r.name for r in ROWS), help="comma-separated subset of rows")
    parser.add_argument("--docs", default="docs", help="results.md goes here")
    parser.add_argument("--seed", type=int, default=0, help="NLL noise seed")
    parser.add_argument("--batch-size", type=int, default=1000, help="convertor batch for the NLL")
    parser.add_argument("--data-dir", default=None, help="folder with the Omniglot zips")
    parser.add_argument("--fidelity", action="store_true",
                        help="also score every row's judged sample fidelity at the last milestone (train.fidelity)")
    parser.add_argument("--fidelity-n", type=int, default=8, help="variations per condition for --fidelity")
    parser.add_argument("--fidelity-every", type=int, default=1, help="judge every N-th validation character")
    add_judge_flags(parser)
    args = parser.parse_args(argv)
    rows = pick_rows(parser, args.rows, ROWS)
    milestones = sorted(set(args.steps))

    from vce_deploy.nll import load_targets
    from vce_deploy.cpu import this_cpu

    from .train import train

    trunk, out = Path(args.trunk), Path(args.out)
    try:
        if not trunk.is_file():
            raise CheckpointError(f"{trunk}: expected a trunk checkpoint, but it does not exist")
        trunk_meta = read_meta(trunk)
        trunk_config = TrainConfig.from_dict(trunk_meta["train_config"])
        split, x, q = load_targets(trunk_config.split, "validation", args.data_dir, False, None, 1,
                                   validation_alphabets=trunk_config.held_out_alphabets)
        scores: dict[str, dict[int, dict]] = {row.name: {} for row in rows}
        settings = {"k": args.k, "seed": args.seed, "targets": len(x)}
        judge, fidelity = None, {}
        if args.fidelity:
            from vce_deploy.omniglot import load_split

            from .fidelity import Judge

            judge_config, judge_cache = judge_settings(args)
            validation = load_split(trunk_config.split, "validation", args.data_dir,
                                    validation_alphabets=trunk_config.held_out_alphabets)
            judge = Judge.fit(validation.images, judge_config, judge_cache, log=print)
        for milestone in milestones:
            for row in rows:
                config = row_config(trunk_meta, row, milestone)
                run_dir = out / row.name
                at = prepare(trunk, run_dir, config)
                if at < config.total_steps:
                    train(config, run_dir, data_dir=args.data_dir, progress=False)
                record = score(run_dir, config.total_steps, x, q, settings, args.batch_size)
                scores[row.name][milestone] = record
                print(f"[{row.name}] {milestone} steps' pairs: validation NLL {record['nll_mean']:.2f} ± "
                      f"{record['nll_sem_characters']:.2f} ({record['seconds']:.0f} s)", flush=True)
                if judge is not None and milestone == milestones[-1]:
                    fidelity[row.name] = judged(run_dir, config.total_steps, judge,
                                                {"n": args.fidelity_n, "every": args.fidelity_every, "seed": args.seed},
                                                trunk_config.split, trunk_config.held_out_alphabets, args.data_dir)
                    top1 = fidelity[row.name]["variations"]["1"]["threshold"]["top1"]
                    print(f"[{row.name}] judged top-1 at t = 1, thresholded: {top1:.1%}", flush=True)
                command = "python -m train.ablate " + " ".join(argv if argv is not None else sys.argv[1:])
                write_section(Path(args.docs) / "results.md",
                              markdown(rows, scores, milestones, trunk, trunk_meta, command, this_cpu().describe(),
                                       fidelity),
                              SECTION_BEGIN, SECTION_END)
    except (CheckpointError, FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    summary = {name: {m: {k: v for k, v in r.items() if k != "nll_per_target"} for m, r in by_m.items()}
               for name, by_m in scores.items()}
    for name, record in fidelity.items():
        summary[name]["fidelity"] = {k: record[k] for k in ("variations", "decomposition", "prior_hole")}
    atomic_write_bytes(out / "ablate.json", (json.dumps(summary, indent=2) + "\n").encode())
    return 0


if __name__ == "__main__":
    sys.exit(main())
