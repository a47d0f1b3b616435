"""The paper's protocol at full scale on a CPU (docs/REPRODUCTION.md, first section), on JAX, two runs at a time.

    python experiments/paper.py run                  # every setting below, cheapest first; rerun to continue
    python experiments/paper.py run --target 0.04    # the same runs continued down to CE 0.04 (finished ones too)
    python experiments/paper.py report               # every table and figure of the page, from docs/data/paper
    python experiments/paper.py run --dry-run        # the runs, their order and their commands

The settings (fc6 on all 60,000 Fashion-MNIST images and the whole test set; c1 on a class-balanced subset of
16,384; SGD, momentum 0.9, constant lr, 3 seeds each):

    fc6-lr      fc6, lr 0.1 against lr 0.001, batch 256                       (figs. 2-4, 6-7)
    fc6-batch   fc6, batch 256 against 16384 in ghost batches of 256, lr 0.1  (figs. 5, 13-16)
    c1-lr       c1, lr 0.1 against lr 0.001, batch 256, 16,384 images         (the CIFAR-10 claims, on Fashion-MNIST)

Runs stop at the target training CE (the epoch cap only bounds them); the track_every points are taken near the
ladder's levels only (--track-levels), every epoch elsewhere. Each run that ends is exported at once (config.json,
status.json, metrics.jsonl; keras_implicit.sweep.export_run) to docs/data/paper/<run>/, which the report reads: the
page regenerates from a clone alone. A progress line (runs done / running with their CE / left) is printed every
--progress-every seconds. Everything here is in the library (keras_implicit.sweep, analysis, plots); this script
holds the paper's settings and parses flags.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from keras_implicit import analysis, sweep  # noqa: E402  (neither imports TensorFlow)
from keras_implicit.training import RunConfig  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
LADDER = (1.0, 0.5, 0.3, 0.15, 0.08, 0.04)
SEEDS = (0, 1, 2)
FC6 = RunConfig(model="fc6", dataset="fashion_mnist", epochs=5000, track_levels=LADDER)
C1 = RunConfig(model="c1", dataset="fashion_mnist", train_subset=16384, epochs=2000, track_levels=LADDER)

# (stage, configuration without seed and target), cheapest first: what is cut first goes last. track_every, near
# the levels only: lr 0.1 at batch 256 every 16 steps (a point over all 70,000 images costs about 1.3 s alone, 3.5 s
# beside another run, against 16 ms a step: every 4 steps, as the 4,096-image regime runs, made a dense epoch 15
# times its training); batch 16384 takes 3 steps per epoch (every step near them); lr 0.001 moves 30-50 times more
# slowly (every 64 steps).
STAGES = (
    ("fc6 lr 0.1, batch 256", dataclasses.replace(FC6, lr=0.1, batch_size=256, track_every=16)),
    ("fc6 lr 0.1, batch 16384", dataclasses.replace(FC6, lr=0.1, batch_size=16384, track_every=1)),
    ("fc6 lr 0.001, batch 256", dataclasses.replace(FC6, lr=0.001, batch_size=256, track_every=64)),
    ("c1 lr 0.1, batch 256", dataclasses.replace(C1, lr=0.1, batch_size=256, track_every=4)),
    ("c1 lr 0.001, batch 256", dataclasses.replace(C1, lr=0.001, batch_size=256, track_every=32)),
)
# c1's ladder: its runs stop at CE 1.2, above the fc6 ladder's first level.
C1_LADDER = (1.8, 1.6, 1.4, 1.2)
# The page's comparisons: (folder, selects the runs of both settings, label a, label b, the ladder's levels).
COMPARISONS = (
    ("fc6_lr", lambda c: c["model"] == "fc6" and c["batch_size"] == 256, "lr=0.1", "lr=0.001", LADDER),
    ("fc6_batch", lambda c: c["model"] == "fc6" and c["lr"] == 0.1, "batch=256", "batch=16384", LADDER),
    ("c1_lr", lambda c: c["model"] == "c1", "lr=0.1", "lr=0.001", C1_LADDER),
)
DEFAULT_TARGETS = {"fc6": 0.08, "c1": 1.2}


def configs(targets: dict, models) -> list[RunConfig]:
    return [dataclasses.replace(config, seed=seed, target_train_loss=targets[config.model])
            for _, config in STAGES if config.model in models for seed in SEEDS]


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser("run", help="train (or continue) every run")
    run.add_argument("--runs-dir", type=Path, default=ROOT / "runs" / "paper")
    run.add_argument("--jobs", type=int, default=2, help="runs at a time (default 2, one per core)")
    run.add_argument("--target", type=float, default=None,
                     help=f"the fc6 runs' target training CE (default {DEFAULT_TARGETS['fc6']}); finished runs "
                          "continue down to a lower one")
    run.add_argument("--c1-target", type=float, default=DEFAULT_TARGETS["c1"],
                     help=f"the c1 runs' target training CE (default {DEFAULT_TARGETS['c1']})")
    run.add_argument("--models", nargs="+", default=["fc6", "c1"], choices=["fc6", "c1"])
    run.add_argument("--export-to", type=Path, default=ROOT / "docs" / "data" / "paper",
                     help="where each ended run's config.json, status.json and metrics.jsonl are copied")
    run.add_argument("--progress-every", type=float, default=300.0, help="seconds between progress lines")
    run.add_argument("--dry-run", action="store_true", help="print the runs and their commands, train nothing")
    report = commands.add_parser("report", help="every table and figure of the page, from the exported runs")
    report.add_argument("--data", type=Path, default=ROOT / "docs" / "data" / "paper")
    report.add_argument("--out", type=Path, default=ROOT / "docs" / "figures" / "paper")
    report.add_argument("--formats", nargs="+", default=["png"])
    return parser.parse_args(argv)


def run(args) -> int:
    targets = {"fc6": args.target or DEFAULT_TARGETS["fc6"], "c1": args.c1_target}
    jobs = sweep.plan(configs(targets, args.models), args.runs_dir)
    if args.dry_run:
        for job in jobs:
            print(f"{job.name}: {' '.join(job.command)}")
        return 0
    os.environ["KERAS_BACKEND"] = "jax"  # the runs' processes inherit it: the faster backend on a CPU

    def export(job, code):
        copy = sweep.export_run(job.run_dir, args.export_to)
        if copy is not None:
            print(f"[paper] exported {job.name} to {copy}", flush=True)

    for job in jobs:  # runs that ended in an earlier sitting, before their export
        export(job, 0)
    codes = sweep.run_jobs(jobs, args.jobs, args.runs_dir / "logs", progress_every=args.progress_every,
                           on_done=export)
    failed = {name: code for name, code in codes.items() if code not in (None, 0)}
    for name, code in failed.items():
        print(f"[paper] {name} exited {code}: see {args.runs_dir / 'logs' / (name + '.log')}", file=sys.stderr)
    return 1 if failed else 0


def report(args) -> int:
    from keras_implicit import plots  # matplotlib: only the report needs it

    runs = analysis.load_runs([args.data])
    written = []
    for folder, selects, a, b, levels in COMPARISONS:
        chosen = [r for r in runs if selects(r.config)]
        labels = {group.label for group in analysis.group_runs(chosen)} if chosen else set()
        if not {a, b} <= labels:
            print(f"[paper] {folder}: not yet ({a} and {b} are needed; the data holds {sorted(labels) or 'none'})")
            continue
        out = args.out / folder
        written += plots.write_ladder(chosen, a, b, out, levels, holds=(0, 2), formats=args.formats)
        level = analysis.common_level(chosen)
        written += plots.plot_all(chosen, out, level=level, formats=args.formats, loss_shapes=False)
        (out / "summary.md").write_text(analysis.summary_markdown(chosen, level))
        written.append(out / "summary.md")
    for path in written:
        print(path)
    return 0


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        return run(args) if args.command == "run" else report(args)
    except (ValueError, analysis.RunDirectoryError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
