"""Dense tracking only near the ladder's levels (``track_levels``) against dense tracking everywhere: the ladder's
values, and what the schedule saves.

Two runs of ``keras_implicit.training.train`` with the same seed (the same training trajectory: tracking does not
change the weights), fc6 on a class-balanced subset of Fashion-MNIST, SGD lr 0.1, batch 256, down to a training
CE of 0.04:

  dense:   track_every 4 (a point every 4 steps, the regime runs' schedule);
  levels:  track_every 4 with track_levels 1 0.5 0.3 0.15 0.08 0.04 (those points only near a level, every
           epoch elsewhere).

Printed, per level and for every tracked column of both splits: the value at the level's first crossing
(``keras_implicit.analysis.at_level``, hold 0 and hold 2) from each run, and their largest relative difference;
beside it, the interpolation's own error, measured on the dense run by reading the level from every second dense
point only (halving the spacing the levels run keeps near a level). Then the tracking time over the training time
of each run, and their ratio. The machine is shared: the runs alternate, and the times are each run's own
(``TrainResult.epoch_seconds`` and ``tracking_seconds``).

Usage:
    python benchmarks/track_levels.py                      # 8192 images, JAX if installed
    KERAS_BACKEND=tensorflow python benchmarks/track_levels.py --train-subset 4096
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("KERAS_BACKEND", "jax")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402

from keras_implicit import analysis  # noqa: E402
from keras_implicit.config import RunConfig  # noqa: E402
from keras_implicit.names import DEFAULT_LADDER  # noqa: E402


def _thinned(run: analysis.Run, keep_every: int) -> analysis.Run:
    """The run with only every ``keep_every``-th tracking point (the epoch ends kept): the interpolation's error at
    ``keep_every`` times the spacing."""
    splits = {}
    for split, columns in run.splits.items():
        steps = columns["step"]
        keep = (np.arange(len(steps)) % keep_every == 0) | (steps == steps.max())
        splits[split] = {name: values[keep] for name, values in columns.items()}
    return dataclasses.replace(run, splits=splits)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--train-subset", type=int, default=8192)
    parser.add_argument("--levels", type=float, nargs="+", default=list(DEFAULT_LADDER))
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    from keras_implicit import training

    base = RunConfig(train_subset=args.train_subset, lr=0.1, batch_size=256, epochs=400, seed=args.seed,
                     track_every=4, target_train_loss=min(args.levels))
    configs = {"dense": base, "levels": dataclasses.replace(base, track_levels=tuple(args.levels))}
    results, runs = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, config in configs.items():
            results[name] = training.train(config, Path(tmp) / name, progress=False, verbose=False)
            runs[name] = analysis.load_run(Path(tmp) / name)
    dense, levels = runs["dense"], runs["levels"]
    thinned = _thinned(dense, 2)
    print(f"backend {os.environ['KERAS_BACKEND']}, {args.train_subset} images, lr 0.1, batch 256, seed {args.seed}")
    print(f"tracking points: dense {len(dense.splits['train']['step'])}, levels "
          f"{len(levels.splits['train']['step'])}")
    print("level  hold  max |levels - dense| / dense   interpolation's error (dense at 2x spacing)   column")
    worst = 0.0
    for level in args.levels:
        for hold in (0, 2):
            try:
                a, b, c = (analysis.at_level(r, level, hold=hold) for r in (dense, levels, thinned))
            except analysis.LevelNotReachedError as error:
                print(f"{level:<6g} {hold:<5d} not reached ({error})")
                continue
            differences, interpolation = {}, {}
            for split, of in (("train", lambda point: point.values), ("test", lambda point: point.test)):
                for column, value in of(a).items():
                    if column == "ce" and split == "train" or not np.isfinite(value) or value == 0:
                        continue  # the train CE is the level itself
                    if column not in of(b) or column not in of(c):
                        continue
                    differences[f"{split}/{column}"] = abs(of(b)[column] - value) / abs(value)
                    interpolation[f"{split}/{column}"] = abs(of(c)[column] - value) / abs(value)
            column = max(differences, key=differences.get)
            worst = max(worst, differences[column] / max(interpolation[column], 1e-12))
            print(f"{level:<6g} {hold:<5d} {differences[column]:<31.3g} {interpolation[column]:<45.3g} {column}")
    print(f"largest ratio of the schedule's difference to the interpolation's error, over levels: {worst:.3g}")
    share = {}
    for name, result in results.items():
        train_seconds, tracking_seconds = sum(result.epoch_seconds), sum(result.tracking_seconds)
        share[name] = tracking_seconds / train_seconds
        print(f"{name:7s} steps {result.step}: training {train_seconds:.1f} s, tracking {tracking_seconds:.1f} s, "
              f"tracking / training = {share[name]:.2f}")
    print(f"tracking time, levels / dense = {share['levels'] / share['dense']:.2f} (of training time)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
