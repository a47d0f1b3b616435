"""The cost of experiments/run.py's per-epoch tracking, and of a ghost-batch epoch, as ratios.

Runs ``keras_implicit.training.train`` (what ``experiments/run.py`` calls) on fc6 and Fashion-MNIST (the
offline default) in throw-away run directories, and reads the per-epoch wall times it returns:
``epoch_seconds`` (the training epoch without tracking) and ``tracking_seconds`` (the AltLossTracker pass over
the whole training and test splits at the end of the epoch: forward pass, cross-entropy, the 24-loss panel,
norms, metrics.jsonl and TensorBoard). Configurations, all in this process, interleaved round by round:

  plain-256:          batch 256 (ghost batch 256: no accumulation), the panel on the default path;
  plain-256-pure-tf:  the same, with the panel forced onto the keras.ops path (only tracking differs);
  ghost-16384:        batch 16384 in micro-batches of 256 (gradient accumulation, ghost batch norm).

Printed: tracking / epoch for both panel paths (target <= 0.4), an inference pass over both splits / epoch
(the floor that tracking cannot beat), and the ghost-batch epoch / the batch-256 epoch (target <= 1.05).
The epoch baseline pools both plain configurations (they train identically). The first epoch of every run
(tracing) is left out; medians over the remaining epochs and rounds.

Usage:
    python benchmarks/tracking.py                 # 3 epochs per run, 1 round
    python benchmarks/tracking.py --epochs 4 --rounds 2 --train-subset 30000
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

CONFIGURATIONS = {
    "plain-256": {"batch_size": 256, "ghost_batch_size": 256, "path": None},
    "plain-256-pure-tf": {"batch_size": 256, "ghost_batch_size": 256, "path": "keras"},
    "ghost-16384": {"batch_size": 16384, "ghost_batch_size": 256, "path": None},
}


def run_once(name: str, dataset, epochs: int, data_dir: str | None, train_subset: int | None):
    from keras_implicit import _dispatch
    from keras_implicit.training import RunConfig, train

    settings = CONFIGURATIONS[name]
    config = RunConfig(
        model="fc6", dataset="fashion_mnist", lr=0.1, batch_size=settings["batch_size"],
        ghost_batch_size=settings["ghost_batch_size"], epochs=epochs, seed=0, data_dir=data_dir,
        train_subset=train_subset,
    )
    with tempfile.TemporaryDirectory() as run_dir, _dispatch.force_path(settings["path"]):
        result = train(config, run_dir, progress=False, verbose=False, dataset=dataset)
    if result.state != "finished":
        raise RuntimeError(f"{name}: the run ended {result.state}: {result.message}")
    return list(result.epoch_seconds), list(result.tracking_seconds)


def inference_pass_seconds(dataset, repeats: int) -> float:
    """One forward pass of fc6 over the training and test splits, batches of 4096 as the tracker uses."""
    import tensorflow as tf

    from keras_implicit import models

    model = models.make_model("fc6", dataset.input_shape, dataset.num_classes, seed=0)
    forward = tf.function(lambda x: model(x, training=False), reduce_retracing=True)
    splits = [tf.convert_to_tensor(dataset.x_train), tf.convert_to_tensor(dataset.x_test)]

    def one_pass():
        for x in splits:
            for start in range(0, int(x.shape[0]), 4096):
                forward(x[start:start + 4096]).numpy()

    one_pass()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        one_pass()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--epochs", type=int, default=3, help="epochs per run (the first is left out; >= 2)")
    parser.add_argument("--rounds", type=int, default=1, help="rounds of all configurations, interleaved")
    parser.add_argument("--data-dir", default=None, help="Fashion-MNIST IDX directory (default: the library's)")
    parser.add_argument("--train-subset", type=int, default=None, help="train on this many examples")
    parser.add_argument("--only", nargs="+", choices=sorted(CONFIGURATIONS), default=list(CONFIGURATIONS))
    parser.add_argument("--json", help="also write the results to this JSON file")
    args = parser.parse_args(argv)
    if args.epochs < 2 or args.rounds < 1:
        parser.error("--epochs must be >= 2 and --rounds >= 1")

    from benchmarks.panel import machine
    from keras_implicit import _dispatch
    from keras_implicit.data import load_dataset

    dataset = load_dataset("fashion_mnist", args.data_dir, args.train_subset)
    print(f"machine: {machine()}; fc6 on Fashion-MNIST ({len(dataset.y_train)} train, {len(dataset.y_test)} test); "
          f"{args.epochs} epochs per run, {args.rounds} round(s); default panel path: {_dispatch.active_path()}")
    epochs = {name: [] for name in args.only}
    tracking = {name: [] for name in args.only}
    for _ in range(args.rounds):
        for name in args.only:
            epoch_seconds, tracking_seconds = run_once(name, dataset, args.epochs, args.data_dir, args.train_subset)
            epochs[name] += epoch_seconds[1:]
            tracking[name] += tracking_seconds[1:]
            print(f"  {name:<18} epochs {', '.join(f'{s:.2f}' for s in epoch_seconds)} s; "
                  f"tracking {', '.join(f'{s:.2f}' for s in tracking_seconds)} s", flush=True)
    inference = inference_pass_seconds(dataset, repeats=3)

    median_epoch = {name: statistics.median(values) for name, values in epochs.items()}
    median_tracking = {name: statistics.median(values) for name, values in tracking.items()}
    print()
    results = {"machine": machine(), "epoch_s": median_epoch, "tracking_s": median_tracking,
               "inference_pass_s": inference}
    plain = [name for name in ("plain-256", "plain-256-pure-tf") if name in epochs]
    if plain:
        # Both plain configurations train identically (only the tracked panel's path differs): their epochs
        # are pooled into one batch-256 baseline.
        base = statistics.median([s for name in plain for s in epochs[name]])
        results["base_epoch_s"] = base
        print(f"batch-256 epoch without tracking (median of {sum(len(epochs[n]) for n in plain)}): {base:.2f} s")
        for name in plain:
            label = "default path (" + _dispatch.active_path() + ")" if name == "plain-256" else "keras.ops path"
            ratio = median_tracking[name] / base
            results[f"tracking_ratio_{name}"] = ratio
            print(f"tracking / epoch, panel on the {label}: {ratio:.3f} ({median_tracking[name]:.2f} s; "
                  "target <= 0.4)")
        print(f"inference pass over both splits / epoch: {inference / base:.3f} ({inference:.2f} s)")
        if "ghost-16384" in median_epoch:
            ratio = median_epoch["ghost-16384"] / base
            results["ghost_ratio"] = ratio
            print(f"ghost-batch epoch (16384 in micro-batches of 256) / batch-256 epoch: {ratio:.3f} "
                  f"({median_epoch['ghost-16384']:.2f} s; target <= 1.05)")
    if args.json:
        with open(args.json, "w") as out:
            json.dump(results, out, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
