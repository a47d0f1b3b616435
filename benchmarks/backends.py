"""One fc6 epoch and its tracking pass on each Keras backend, side by side (issue: run.py on JAX).

Runs ``keras_implicit.training.train`` (what ``experiments/run.py`` calls) on fc6 and Fashion-MNIST (the
offline default, 60,000 training images) in throw-away run directories, one child process per backend and
configuration (Keras picks its backend once per process), interleaved round by round:

  b256        batch 256 (no accumulation);
  b1024-g256  batch 1024 in ghost batches of 256 (gradient accumulation over 4 micro-batches).

Each child trains ``--epochs`` epochs and reports ``TrainResult.epoch_seconds`` (training only) and
``tracking_seconds`` (the tracker's pass over the 60,000 + 10,000 examples); the first epoch (tracing,
compilation) is left out. Printed: the minimum over epochs and rounds per backend, and the ratios JAX /
TensorFlow measured in the same run.

    python benchmarks/backends.py                    # 3 epochs per child, 2 rounds
    python benchmarks/backends.py --epochs 2 --rounds 1 --train-subset 20000
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

CONFIGURATIONS = {"b256": (256, 256), "b1024-g256": (1024, 256)}


def child(configuration: str, epochs: int, train_subset) -> dict:
    import keras

    from keras_implicit.training import RunConfig, train

    batch_size, ghost_batch_size = CONFIGURATIONS[configuration]
    config = RunConfig(batch_size=batch_size, ghost_batch_size=ghost_batch_size, epochs=epochs,
                       train_subset=train_subset)
    with tempfile.TemporaryDirectory() as run_dir:
        result = train(config, run_dir, progress=False, verbose=False)
    return {"backend": keras.backend.backend(), "epoch_seconds": result.epoch_seconds[1:],
            "tracking_seconds": result.tracking_seconds[1:]}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backends", nargs="+", default=["tensorflow", "jax"])
    parser.add_argument("--configurations", nargs="+", default=list(CONFIGURATIONS), choices=list(CONFIGURATIONS))
    parser.add_argument("--epochs", type=int, default=3, help="per child; the first is left out")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--train-subset", type=int, default=None)
    parser.add_argument("--child", nargs=2, metavar=("CONFIGURATION", "EPOCHS"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print("RESULT " + json.dumps(child(args.child[0], int(args.child[1]), args.train_subset)))
        return 0
    if args.epochs < 2:
        parser.error("--epochs must be >= 2 (the first epoch, with compilation, is left out)")
    times = {(b, c): {"epoch": [], "tracking": []} for b in args.backends for c in args.configurations}
    for _ in range(args.rounds):
        for configuration in args.configurations:
            for backend in args.backends:
                command = [sys.executable, os.path.abspath(__file__), "--child", configuration, str(args.epochs)]
                if args.train_subset:
                    command += ["--train-subset", str(args.train_subset)]
                done = subprocess.run(command, env={**os.environ, "KERAS_BACKEND": backend}, capture_output=True,
                                      text=True, cwd=ROOT)
                if done.returncode != 0:
                    print(f"{backend} {configuration}: failed\n{done.stderr[-3000:]}", file=sys.stderr)
                    return 1
                line = next(x for x in done.stdout.splitlines() if x.startswith("RESULT "))
                result = json.loads(line[len("RESULT "):])
                times[backend, configuration]["epoch"] += result["epoch_seconds"]
                times[backend, configuration]["tracking"] += result["tracking_seconds"]
    print(f"fc6 on Fashion-MNIST ({args.train_subset or 60000} training images), min over "
          f"{args.rounds} round(s) x {args.epochs - 1} epoch(s), seconds")
    print(f"{'configuration':<14} {'backend':<11} {'epoch':>8} {'tracking':>9} {'tracking/epoch':>15}")
    for configuration in args.configurations:
        for backend in args.backends:
            t = times[backend, configuration]
            epoch, tracking = min(t["epoch"]), min(t["tracking"])
            print(f"{configuration:<14} {backend:<11} {epoch:8.2f} {tracking:9.2f} {tracking / epoch:15.2f}")
        if {"tensorflow", "jax"} <= set(args.backends):
            jax_t, tf_t = times["jax", configuration], times["tensorflow", configuration]
            print(f"{configuration:<14} {'jax / tf':<11} {min(jax_t['epoch']) / min(tf_t['epoch']):8.2f} "
                  f"{min(jax_t['tracking']) / min(tf_t['tracking']):9.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
