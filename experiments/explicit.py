"""Can the small batch's bias be made explicit? docs/EXPLICIT.md's experiments, on JAX, two runs at a time.

    python experiments/explicit.py run --dry-run         # the runs of every stage, their order and commands
    python experiments/explicit.py run                   # every stage in order; rerun to continue
    python experiments/explicit.py run --stages baselines
    python experiments/explicit.py run --large-epochs 1000   # the batch-16384 baselines continued (equal steps)
    python experiments/explicit.py choose                # each term's value, chosen on the validation split
    python experiments/explicit.py report                # every table and figure, from docs/data/explicit

fc6 on the 55,000 Fashion-MNIST training images that --validation-size 5000 leaves (a class-balanced 5,000 held
out: the test set chooses nothing), lr 0.1, SGD with momentum 0.9, ghost batches of 256. The stages:

    baselines  batch 256 and batch 16384, 3 seeds, --epochs epochs (the budget of comparison (b)); the batch-16384
               runs go on to --large-epochs (comparison (c), equal steps: 64 times the epochs)
    grid       each explicit term on batch 16384, seed 0, every value of its grid, down to a training CE of --level
    chosen     each term at its chosen value(s), 3 seeds, --epochs epochs (seed 0 continues the grid's run)

The values are chosen (``choose``, and before the chosen stage of ``run``) from the grid's runs at a training CE of
--level by keras_implicit.analysis: for question (i) the value whose large-σ Gcdf profile comes closest to batch
256's (choose_by_profile), for question (ii) the lowest validation error (choose_by_validation); both are run when
they differ. The choice is written to choices.json beside the exported runs. Each run that ends is exported
(config.json, status.json, metrics.jsonl) to docs/data/explicit/<run>/, which ``choose`` and ``report`` read: the
page regenerates from a clone. Everything computed is in the library; this script holds the settings.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402

from keras_implicit import analysis, sweep  # noqa: E402  (neither imports TensorFlow)
from keras_implicit.config import RunConfig  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
LADDER = (1.0, 0.5, 0.3, 0.15, 0.08, 0.04)
SEEDS = (0, 1, 2)
LEVEL = 0.08  # the training CE of the comparison at equal loss, and the grid runs' target
EPOCHS = 200  # the budget: batch 256 is near a training CE of 0 (about 0.08 after 30 epochs on 60,000 images)
VALIDATION_SIZE = 5000
SMALL_BATCH, LARGE_BATCH = 256, 16384
# Near the ladder's levels, batch 256 is tracked every 16 steps and batch 16384 (3 steps an epoch) every step.
BASE = RunConfig(model="fc6", dataset="fashion_mnist", validation_size=VALIDATION_SIZE, lr=0.1, epochs=EPOCHS,
                 track_levels=LADDER)
SMALL = dataclasses.replace(BASE, batch_size=SMALL_BATCH, track_every=16)
LARGE = dataclasses.replace(BASE, batch_size=LARGE_BATCH, track_every=1)
# Each term: (what it is, its grid, the settings of one value). Three values each, log-spaced around the
# published or natural scale: Gcdf at σ = 2 (where batch 16384's Gcdf is 3.5 times batch 256's at CE 0.08, the
# largest gap at full scale); Smith et al.'s implicit λ = lr / 4 = 0.025 for the penalty; Foret et al.'s ρ = 0.05.
TERMS = {
    "gcdf": ("ce + λ·Gcdf(σ=2)", (0.3, 1.0, 3.0), lambda value: {"loss": f"ce+{value:g}*gcdf@2"}),
    "trh": ("ce + λ·Tr H (eq. 9)", (0.01, 0.1, 1.0), lambda value: {"loss": f"ce+{value:g}*trh"}),
    "gp": ("gradient-norm penalty λ", (0.0025, 0.025, 0.25), lambda value: {"gradient_penalty": value}),
    "sam": ("SAM radius ρ", (0.01, 0.05, 0.2), lambda value: {"sam_radius": value}),
}
STAGES = ("baselines", "grid", "chosen")
CHOICES = "choices.json"


def baseline_configs(large_epochs: int) -> list[RunConfig]:
    return [dataclasses.replace(config, seed=seed) for config in
            (SMALL, dataclasses.replace(LARGE, epochs=max(EPOCHS, large_epochs))) for seed in SEEDS]


def term_config(term: str, value: float, seed: int, **settings) -> RunConfig:
    return dataclasses.replace(LARGE, seed=seed, **TERMS[term][2](value), **settings)


def grid_configs() -> list[RunConfig]:
    return [term_config(term, value, 0, target_train_loss=LEVEL) for term in TERMS for value in TERMS[term][1]]


def chosen_configs(choices: dict) -> list[RunConfig]:
    values = {term: sorted({choice["profile"], choice["validation"]}) for term, choice in choices.items()}
    return [term_config(term, value, seed) for term in TERMS if term in values for value in values[term]
            for seed in SEEDS]


def _select(runs, config: RunConfig, seeds=SEEDS) -> list:
    """The runs of one setting (as ``config``, any seed of ``seeds``), matched by their run names."""
    names = {sweep.default_run_name(dataclasses.replace(config, seed=seed)) for seed in seeds}
    return [run for run in runs if run.name in names]


def choose(runs) -> dict:
    """Each term's value by both criteria, from the grid's runs and the batch-256 baselines at LEVEL."""
    reference = _select(runs, SMALL)
    if len(reference) < len(SEEDS):
        raise ValueError(f"the batch-256 baselines are not all in the data yet ({len(reference)} of {len(SEEDS)})")
    choices = {}
    for term, (_, values, _) in TERMS.items():
        candidates = [_select(runs, term_config(term, value, 0), seeds=(0,)) for value in values]
        if not all(candidates):
            missing = [value for value, found in zip(values, candidates) if not found]
            print(f"[explicit] {term}: not yet chosen (no grid run in the data for {missing})")
            continue
        groups = {value: analysis.RunGroup(label=f"{term}={value:g}", config=found[0].config, runs=found)
                  for value, found in zip(values, candidates)}
        by_label = {group.label: value for value, group in groups.items()}
        try:
            profile, distances = analysis.choose_by_profile(list(groups.values()), reference, LEVEL)
            validation, errors = analysis.choose_by_validation(list(groups.values()), LEVEL)
        except ValueError as error:
            print(f"[explicit] {term}: not yet chosen ({error})")
            continue
        choices[term] = {"profile": by_label[profile.label], "validation": by_label[validation.label],
                         "distances": {str(by_label[k]): v for k, v in distances.items()},
                         "validation_errors": {str(by_label[k]): v for k, v in errors.items()}}
    return choices


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser("run", help="train (or continue) the runs of the stages asked")
    run.add_argument("--stages", nargs="+", choices=STAGES, default=list(STAGES))
    run.add_argument("--runs-dir", type=Path, default=ROOT / "runs" / "explicit")
    run.add_argument("--jobs", type=int, default=2, help="runs at a time (default 2, one per core)")
    run.add_argument("--large-epochs", type=int, default=EPOCHS,
                     help=f"how far the batch-16384 baselines train (default {EPOCHS}; more for comparison (c), at "
                          "equal steps: batch 256's epochs take 64 times as many)")
    run.add_argument("--progress-every", type=float, default=300.0, help="seconds between progress lines")
    run.add_argument("--dry-run", action="store_true", help="print the runs and their commands, train nothing")
    for command in (run, commands.add_parser("choose", help="choose each term's value from the grid's runs"),
                    commands.add_parser("report", help="every table and figure of the page")):
        command.add_argument("--data", type=Path, default=ROOT / "docs" / "data" / "explicit",
                             help="the exported runs (run: where each ended run is copied)")
    commands.choices["report"].add_argument("--out", type=Path, default=ROOT / "docs" / "figures" / "explicit")
    commands.choices["report"].add_argument("--formats", nargs="+", default=["png"])
    return parser.parse_args(argv)


def _exported(data: Path) -> list:
    return analysis.load_runs([data]) if data.exists() and analysis.find_run_dirs([data]) else []


def write_choices(data: Path) -> dict:
    choices = choose(_exported(data))
    if choices:
        data.mkdir(parents=True, exist_ok=True)
        (data / CHOICES).write_text(json.dumps(choices, indent=2, sort_keys=True) + "\n")
        for term, choice in choices.items():
            same = "the same" if choice["profile"] == choice["validation"] else "they differ"
            print(f"[explicit] {term}: {choice['profile']:g} by the Gcdf profile, {choice['validation']:g} by the "
                  f"validation error ({same})")
    return choices


def run(args) -> int:
    os.environ["KERAS_BACKEND"] = "jax"  # the runs' processes inherit it: the faster backend on a CPU

    def export(job, code):
        copy = sweep.export_run(job.run_dir, args.data)
        if copy is not None:
            print(f"[explicit] exported {job.name} to {copy}", flush=True)

    failed = {}
    for stage in args.stages:
        if stage == "baselines":
            configs = baseline_configs(args.large_epochs)
        elif stage == "grid":
            configs = grid_configs()
        else:
            choices = ({} if args.dry_run else write_choices(args.data)) or (
                json.loads((args.data / CHOICES).read_text()) if (args.data / CHOICES).exists() else {})
            if not choices:
                print("[explicit] chosen: nothing chosen yet (the grid and the baselines must end first)")
                continue
            configs = chosen_configs(choices)
        jobs = sweep.plan(configs, args.runs_dir)
        print(f"[explicit] {stage}: {len(jobs)} runs", flush=True)
        if args.dry_run:
            for job in jobs:
                print(f"{job.name}: {' '.join(job.command)}")
            continue
        for job in jobs:  # runs that ended in an earlier sitting, before their export
            export(job, 0)
        codes = sweep.run_jobs(jobs, args.jobs, args.runs_dir / "logs", progress_every=args.progress_every,
                               on_done=export)
        failed.update({name: code for name, code in codes.items() if code not in (None, 0)})
    for name, code in failed.items():
        print(f"[explicit] {name} exited {code}: see {args.runs_dir / 'logs' / (name + '.log')}", file=sys.stderr)
    return 1 if failed else 0


def _mean_std_text(values, scale: float = 1.0, digits: int = 4) -> str:
    mean, std = float(np.mean(values)) * scale, (float(np.std(values, ddof=1)) * scale if len(values) > 1 else
                                                  math.nan)
    return f"{mean:.{digits}g}" + (f" ± {std:.2g}" if math.isfinite(std) else "")


def _points(runs, how: str, value: float) -> list:
    """The runs' LevelPoints at a training CE (``how="level"``), an epoch or a step."""
    if how == "level":
        return [analysis.at_level(run, value) for run in runs]
    return [analysis.at_budget(run, **{how: value}) for run in runs]


def _gap_rows(small, large, treated, label: str) -> list[str]:
    """Markdown rows: test error and test CE of the three settings, and the fraction of the gap closed, at LEVEL
    and at the budget of EPOCHS epochs."""
    rows = []
    for how, value, where in (("level", LEVEL, f"train CE {LEVEL:g}"), ("epoch", EPOCHS, f"{EPOCHS} epochs")):
        try:
            points = [_points(runs, how, value) for runs in (small, large, treated)]
        except (analysis.LevelNotReachedError, analysis.BudgetNotReachedError) as error:
            rows.append(f"| {label} | {where} | not reached: {error} | | | | |")
            continue
        for quantity, scale in (("error", 100.0), ("ce", 1.0)):
            values = [[point.test[quantity] for point in group] for group in points]
            gap = analysis.gap_closed(*values, quantity=f"test {quantity}")
            beyond = "" if gap.gap_beyond_spread else " (gap within the seed spread)"
            rows.append(f"| {label} | {where} | test {quantity} | {_mean_std_text(values[0], scale)} | "
                        f"{_mean_std_text(values[1], scale)} | {_mean_std_text(values[2], scale)} | "
                        f"{gap.fraction:.2f}{beyond} |")
    return rows


def _profile_row(small, treated, label: str, sigmas=(0.0625, 0.5, 1.0, 2.0, 8.0)) -> str:
    """A Markdown row: treated / batch 256 of the seed means of Gcdf(σ) at LEVEL, ± the per-seed ratios' std."""
    try:
        a, b = analysis.aggregate(treated, LEVEL), analysis.aggregate(small, LEVEL)
    except analysis.LevelNotReachedError as error:
        return f"| {label} | not reached: {error} |" + " |" * len(sigmas)
    cells = []
    for sigma in sigmas:
        name = f"gcdf@{sigma:g}"
        ratios = [p.values[name] / q.values[name] for p, q in zip(a.points, b.points)]
        spread = f" ± {np.std(ratios, ddof=1):.2g}" if len(ratios) > 1 else ""
        cells.append(f"{a.mean[name] / b.mean[name]:.3g}{spread}")
    return f"| {label} | " + " | ".join(cells) + f" | {a.epoch_mean:.3g} |"


def report(args) -> int:
    from keras_implicit import plots  # matplotlib: only the report needs it

    runs = _exported(args.data)
    small, large = _select(runs, SMALL), _select(runs, LARGE)
    if not small or not large:
        print(f"[explicit] no baselines in {args.data} yet: run `python experiments/explicit.py run` first")
        return 1
    written = plots.write_ladder(small + large, f"batch={SMALL_BATCH}", f"batch={LARGE_BATCH}",
                                 args.out / "baselines", LADDER, holds=(0, 2), formats=args.formats)
    choices = json.loads((args.data / CHOICES).read_text()) if (args.data / CHOICES).exists() else {}
    sigmas = (0.0625, 0.5, 1.0, 2.0, 8.0)
    lines = ["# Explicit terms on batch 16384 against batch 256, fc6, lr 0.1 (generated by "
             "`python experiments/explicit.py report`)", "",
             f"Seeds: batch 256 {sorted(r.seed for r in small)}, batch 16384 {sorted(r.seed for r in large)}.", "",
             "## Equal steps (comparison (c))", ""]
    steps = min(float(run.columns("train")["step"][-1]) for run in large)
    try:
        at_steps = [_points(group, "step", steps) for group in (small, large)]
        lines += [f"At step {steps:g} (batch 16384 trained {steps / 3:.0f} epochs): test error "
                  f"{_mean_std_text([p.test['error'] for p in at_steps[0]], 100)} % (batch 256) against "
                  f"{_mean_std_text([p.test['error'] for p in at_steps[1]], 100)} % (batch 16384); training CE "
                  f"{_mean_std_text([p.level for p in at_steps[0]])} against "
                  f"{_mean_std_text([p.level for p in at_steps[1]])}.", ""]
    except analysis.BudgetNotReachedError as error:
        lines += [f"Not measured: {error}", ""]
    lines += [f"## The grid (seed 0, at a training CE of {LEVEL:g})", "",
              "| term | value | Gcdf profile distance to batch 256 (σ ≥ 2) | validation error |", "|---|---|---|---|"]
    for term, choice in choices.items():
        for value in TERMS[term][1]:
            mark = "".join(m for m, key in ((" (i)", "profile"), (" (ii)", "validation"))
                           if choice[key] == value)
            lines.append(f"| {TERMS[term][0]} | {value:g}{mark} | {choice['distances'][str(value)]:.3g} | "
                         f"{100 * choice['validation_errors'][str(value)]:.2f} % |")
    lines += ["", "(i): chosen for the bias (the closest profile); (ii): chosen for generalization (the lowest "
              "validation error).", "", f"## The panel at a training CE of {LEVEL:g}: Gcdf, ratio to batch 256", "",
              "| setting | " + " | ".join(f"σ={s:g}" for s in sigmas) + " | epoch |",
              "|---|" + "---|" * (len(sigmas) + 1), _profile_row(small, large, f"batch {LARGE_BATCH}", sigmas)]
    treated_groups = {}
    for term, choice in choices.items():
        for value in sorted({choice["profile"], choice["validation"]}):
            treated = _select(runs, term_config(term, value, 0))
            if treated:
                label = f"{TERMS[term][0]} = {value:g}"
                treated_groups[label] = treated
                lines.append(_profile_row(small, treated, label, sigmas))
    lines += ["", "## Generalization: test error and test CE, and the fraction of the gap closed", "",
              "| term | where | quantity | batch 256 | batch 16384 | with the term | gap closed |",
              "|---|---|---|---|---|---|---|"]
    for label, treated in treated_groups.items():
        lines += _gap_rows(small, large, treated, f"{label} (seeds {sorted(r.seed for r in treated)})")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "summary.md").write_text("\n".join(lines) + "\n")
    written.append(args.out / "summary.md")
    for path in written:
        print(path)
    return 0


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        if args.command == "run":
            return run(args)
        if args.command == "choose":
            return 0 if write_choices(args.data) else 1
        return report(args)
    except (ValueError, analysis.RunDirectoryError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
