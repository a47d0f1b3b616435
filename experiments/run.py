#!/usr/bin/env python3
"""Train one of the paper's networks with the paper's protocol and track the alternative losses.

    python experiments/run.py                      # fc6 on Fashion-MNIST, lr 0.1, batch 256, 10 epochs
    python experiments/run.py --lr 0.001 --target-train-loss 0.1 --epochs 200
    python experiments/run.py --batch-size 16384   # ghost batch norm over micro-batches of 256
    python experiments/run.py --model c1 --dataset cifar10
    python experiments/run.py --strategy mirrored   # every GPU of this machine (tf.distribute)
    python experiments/run.py --backend jax --strategy data-parallel   # every device (keras.distribution)

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
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from keras_implicit.config import (  # noqa: E402  (no TensorFlow)
    RunConfig,
    add_run_arguments,
    choose_backend,
    config_from_arguments,
    default_run_name,
    in_flag_words,
)

# The library's messages in this script's words (``overwrite=True`` -> ``--overwrite``, ...).
as_flags = in_flag_words


def build_parser() -> argparse.ArgumentParser:
    """One flag per :class:`keras_implicit.config.RunConfig` setting, with its documentation
    (:func:`keras_implicit.config.add_run_arguments`), and ``--out``, ``--overwrite``, ``--no-progress``,
    ``--backend``."""
    parser = argparse.ArgumentParser(
        description="Train with cross-entropy (SGD, momentum 0.9, constant learning rate) and track Gcdf, "
                    "tempered cross-entropy and hinge panels on the full training and test sets.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    add_run_arguments(parser)
    return parser


def config_from_args(args: argparse.Namespace) -> RunConfig:
    """The run's configuration from parsed flags, not yet validated."""
    return config_from_arguments(args)


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    config = config_from_args(args)
    try:
        config.validate()  # imports no TensorFlow: bad flags are refused before anything is loaded
        backend = choose_backend(args.backend)
        if config.strategy == "data-parallel" and backend != "jax":
            raise ValueError(f"--strategy data-parallel is keras.distribution's DataParallel: it needs --backend "
                             f"jax, not {backend}")
        if config.strategy not in ("default", "data-parallel") and backend != "tensorflow":
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
