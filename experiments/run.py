#!/usr/bin/env python3
"""Train one of the paper's networks with the paper's protocol and track the alternative losses.

    python experiments/run.py                      # fc6 on Fashion-MNIST, lr 0.1, batch 256, 10 epochs
    python experiments/run.py --lr 0.001 --target-train-loss 0.1 --epochs 200
    python experiments/run.py --batch-size 16384   # ghost batch norm over micro-batches of 256
    python experiments/run.py --model c1 --dataset cifar10
    python experiments/run.py --strategy mirrored   # every GPU of this machine (tf.distribute)

Writes runs/NAME/ (config.json, status.json, metrics.jsonl, tb/, checkpoint.npz and checkpoint.prev.npz);
rerunning the same command resumes an interrupted run. Everything here is
``keras_implicit.training.train_with_exit_code``; this script only parses flags. Exit codes: 0 finished (or
already finished), 1 the run cannot start (locked directory, another configuration, --epochs below what the run has
trained, missing or unusable data), 2 bad flags, 3 diverged, 4 another worker of a multi-worker run stopped (rerun
every worker's command to resume), 130 interrupted (Ctrl-C).
"""

from __future__ import annotations

import argparse
import os
import re
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from keras_implicit.training import (  # noqa: E402  (no TensorFlow)
    BACKENDS,
    MOVING_STATISTICS,
    STRATEGIES,
    RunConfig,
    default_run_name,
)

# The library's errors name its settings; a user of this script knows them as flags.
SETTINGS_AS_FLAGS = {
    "overwrite=True": "--overwrite",
    "another run_dir": "--out for another directory",
    "cpu_replicas": "--cpu-replicas",
    "ghost_batch_size": "--ghost-batch-size",
    "batch_size": "--batch-size",
    "train_subset": "--train-subset",
    "data_dir": "--data-dir",
    "seed must": "--seed must",
    "epochs=": "--epochs ",
    "KERAS_BACKEND=": "--backend ",
    "moving_statistics": "--moving-statistics",
}


def as_flags(message: str) -> str:
    """A library message in this script's words (``overwrite=True`` -> ``--overwrite``, ...); a setting's name
    inside a path or a longer name (``/data/data_dir/``, ``my_train_subset``) is left alone."""
    for setting, flag in SETTINGS_AS_FLAGS.items():
        after = r"(?![\w/-]|\.\w)" if setting[-1].isalnum() or setting[-1] == "_" else ""
        message = re.sub(r"(?<![\w/.-])" + re.escape(setting) + after, lambda _, flag=flag: flag, message)
    return message


def choose_backend(flag: str | None) -> str:
    """Sets ``KERAS_BACKEND`` from ``--backend`` before Keras is imported; returns the backend, or raises
    ValueError with one line when it is unknown or not installed."""
    import importlib.util

    backend = flag or os.environ.get("KERAS_BACKEND") or "tensorflow"
    if backend not in BACKENDS:
        source = "--backend" if flag else "KERAS_BACKEND"
        raise ValueError(f"the Keras backend {backend!r} ({source}) is not supported: keras-implicit runs on "
                         f"{' and '.join(BACKENDS)}")
    if "keras" in sys.modules and sys.modules["keras"].backend.backend() != backend:
        raise ValueError(f"Keras is already loaded with the {sys.modules['keras'].backend.backend()} backend")
    if importlib.util.find_spec(backend) is None:
        raise ValueError(f"the {backend} backend is not installed (pip install {backend})")
    os.environ["KERAS_BACKEND"] = backend
    return backend


def _positive_int(text):
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return value


def _draws(text):
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 0 or value == 1:
        raise argparse.ArgumentTypeError(f"must be 0 (off) or at least 2 (the standard error needs two), got {value}")
    return value


def _positive_float(text):
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not (value > 0 and value != float("inf")):
        raise argparse.ArgumentTypeError(f"must be a finite number > 0, got {text}")
    return value


def build_parser() -> argparse.ArgumentParser:
    defaults = RunConfig()
    parser = argparse.ArgumentParser(
        description="Train with cross-entropy (SGD, momentum 0.9, constant learning rate) and track Gcdf, "
                    "tempered cross-entropy and hinge panels on the full training and test sets.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--model", default=defaults.model, help="fc6 or c1")
    parser.add_argument("--dataset", default=defaults.dataset, help="fashion_mnist, mnist or cifar10")
    parser.add_argument("--lr", type=_positive_float, default=defaults.lr, help="constant learning rate")
    parser.add_argument("--batch-size", type=_positive_int, default=defaults.batch_size,
                        help="examples per optimizer step (a multiple of --ghost-batch-size)")
    parser.add_argument("--ghost-batch-size", type=_positive_int, default=defaults.ghost_batch_size,
                        help="micro-batch size: BatchNorm normalizes this many examples; the optimizer steps "
                             "once per batch, with the mean gradient of its batch-size / ghost-batch-size "
                             "micro-batches")
    parser.add_argument("--moving-statistics", choices=MOVING_STATISTICS, default=defaults.moving_statistics,
                        help="how a batch of several micro-batches updates BatchNorm's moving statistics: "
                             "sequential (once per micro-batch, in order, the paper's sequence of mini-batches) or "
                             "mean (once per step with the micro-batches' mean moments, tf.keras 2's "
                             "virtual_batch_size)")
    parser.add_argument("--epochs", type=_positive_int, default=defaults.epochs,
                        help="number of epochs (the cap with --target-train-loss); an epoch is "
                             "n_train // batch-size whole batches")
    parser.add_argument("--seed", type=int, default=defaults.seed,
                        help="initialization and shuffling seed, 0 to 2**32 - 1")
    parser.add_argument("--optimizer", default=defaults.optimizer, help="sgd (momentum 0.9) or adam")
    parser.add_argument("--loss", default=defaults.loss,
                        help="training loss: ce, or gcdf@SIGMA (SIGMA > 0), tce@T (T > 0), hinge@GAMMA (GAMMA >= 0)")
    parser.add_argument("--train-subset", type=_positive_int, default=None,
                        help="train on a class-balanced subset of this many examples (at least one batch, at most "
                             "60000 for fashion_mnist, 54215 for mnist, 50000 for cifar10)")
    parser.add_argument("--track-every", type=_positive_int, default=None,
                        help="also track every this many optimizer steps")
    parser.add_argument("--track-levels", type=float, nargs="+", default=None, metavar="CE",
                        help="with --track-every: take its points only near these training losses (while the "
                             "running training loss is within a factor 1.4 of one of them), every epoch elsewhere, "
                             "e.g. --track-levels 1 0.5 0.3 0.15 0.08 0.04 (the ladder's levels)")
    parser.add_argument("--track-schedule", default=defaults.track_schedule,
                        help="epoch (step 0 and every epoch) or log (also steps 1, 2, 3, 4, 6, 8, 11, 16, ... "
                             "up to two epochs)")
    parser.add_argument("--target-train-loss", type=_positive_float, default=None,
                        help="stop once the tracked training cross-entropy is below this")
    parser.add_argument("--data-dir", default=None,
                        help="an existing directory with the dataset's IDX files (or CIFAR-10 batches, or a "
                             "tensorflow-datasets data directory); given, no other directory is read (default: "
                             "/usr/share/datasets/fashion-mnist, then tensorflow-datasets)")
    parser.add_argument("--deterministic", action="store_true",
                        help="enable TensorFlow's op determinism (bit-exact resume)")
    parser.add_argument("--out", default=None, help="run directory (default: runs/<name from the flags>)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace what the run directory holds instead of resuming")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--backend", default=None, metavar="{" + ",".join(BACKENDS) + "}",
                        help="the Keras backend (default: $KERAS_BACKEND, else Keras' own default, tensorflow); "
                             "tf.distribute is TensorFlow-only")
    parser.add_argument("--strategy", choices=STRATEGIES, default=defaults.strategy,
                        help="default: one device; mirrored: every GPU of this machine (tf.distribute."
                             "MirroredStrategy); multiworker: every machine of the cluster in $TF_CONFIG "
                             "(MultiWorkerMirroredStrategy, run the same command on each). TensorFlow only")
    parser.add_argument("--cpu-replicas", type=_positive_int, default=None,
                        help="with --strategy mirrored on a machine without GPUs: split the CPU into this many "
                             "devices (the batch must be a multiple of replicas x --ghost-batch-size)")
    parser.add_argument("--noisy-error-draws", type=_draws, default=defaults.noisy_error_draws, metavar="DRAWS",
                        help="also measure, at every tracking point, the noisy error (Monte Carlo with DRAWS draws "
                             "per example, e.g. 64; 0: off), the noisy cross-entropy and eq. 9 for each sigma "
                             "(keras_implicit.sharpness)")
    return parser


def config_from_args(args: argparse.Namespace) -> RunConfig:
    """The run's configuration from parsed flags, not yet validated (``experiments/sweep.py`` uses it too)."""
    return RunConfig(
        model=args.model, dataset=args.dataset, lr=args.lr, batch_size=args.batch_size,
        ghost_batch_size=args.ghost_batch_size, epochs=args.epochs, seed=args.seed, optimizer=args.optimizer,
        loss=args.loss, train_subset=args.train_subset, track_every=args.track_every,
        track_schedule=args.track_schedule, target_train_loss=args.target_train_loss,
        track_levels=None if args.track_levels is None else tuple(args.track_levels),
        data_dir=args.data_dir, deterministic=args.deterministic, strategy=args.strategy,
        cpu_replicas=args.cpu_replicas, noisy_error_draws=args.noisy_error_draws,
        moving_statistics=args.moving_statistics,
    )


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    config = config_from_args(args)
    try:
        config.validate()  # imports no TensorFlow: bad flags are refused before anything is loaded
        backend = choose_backend(args.backend)
        if config.strategy != "default" and backend != "tensorflow":
            raise ValueError(f"--strategy {config.strategy} is tf.distribute: it needs --backend tensorflow, "
                             f"not {backend}")
    except ValueError as error:
        parser.error(as_flags(str(error)))
    out = args.out or os.path.join("runs", default_run_name(config))

    from keras_implicit.training import train_with_exit_code

    return train_with_exit_code(config, out, overwrite=args.overwrite, progress=not args.no_progress,
                                wording=as_flags)


if __name__ == "__main__":
    sys.exit(main())
