"""The cost per optimizer step of each explicit objective against plain cross-entropy, side by side (issue 27).

fc6 (the paper's network, 784 inputs) in ghost batches of 256, one GhostBatchModel per objective, all built in one
process per backend and timed round by round, interleaved (``train_on_batch`` on one fixed batch of random
images; the step's cost does not depend on the pixels):

  ce                       plain cross-entropy (Keras' own step at batch 256, the micro-batch loop above it);
  ce+0.1*gcdf@4            a mixture with the paper's Gcdf (the fused panel kernel where it loads);
  ce+0.1*trh               eq. 9's Hessian trace as a penalty;
  gradient_penalty=0.025   the micro-batch gradient-norm penalty (double backpropagation);
  sam_radius=0.05          SAM per micro-batch (a second forward and backward pass).

Printed per backend: the minimum over rounds of the seconds per step (the least disturbed by other jobs on a
shared machine) and its ratio to ``ce`` measured in the same run.

    python benchmarks/explicit.py                          # batches 256 and 4096, TensorFlow and JAX (~4 min)
    python benchmarks/explicit.py --backends jax --batch-sizes 16384 --rounds 3
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

# (label, training loss, GhostBatchModel regularizer)
VARIANTS = (
    ("ce", "ce", {}),
    ("ce+0.1*gcdf@4", "ce+0.1*gcdf@4", {}),
    ("ce+0.1*trh", "ce+0.1*trh", {}),
    ("gradient_penalty=0.025", "ce", {"gradient_penalty": 0.025}),
    ("sam_radius=0.05", "ce", {"sam_radius": 0.05}),
)


def child(batch_sizes, rounds: int, steps: int) -> dict:
    import keras
    import numpy as np

    from keras_implicit import ghost, models, training

    rng = np.random.default_rng(0)
    results = {}
    for batch_size in batch_sizes:
        x = rng.uniform(0, 1, (batch_size, 28, 28, 1)).astype(np.float32)
        y = rng.integers(0, 10, batch_size).astype(np.int32)
        compiled = []
        for label, loss, regularizer in VARIANTS:
            model = ghost.ghost_batch_model(models.make_model("fc6", (28, 28, 1), 10, seed=0), 256, **regularizer)
            model.compile(training.make_optimizer("sgd", 0.001), training.make_loss(loss))
            for _ in range(2):  # tracing and compilation
                model.train_on_batch(x, y)
            compiled.append((label, model))
        seconds = {label: [] for label, _ in compiled}
        for _ in range(rounds):
            for label, model in compiled:
                start = time.perf_counter()
                for _ in range(steps):
                    model.train_on_batch(x, y)
                seconds[label].append((time.perf_counter() - start) / steps)
        results[str(batch_size)] = {label: min(values) for label, values in seconds.items()}
    return {"backend": keras.backend.backend(), "results": results}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backends", nargs="+", default=["tensorflow", "jax"])
    parser.add_argument("--batch-sizes", nargs="+", type=int, default=[256, 4096])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=None, help="steps per round (default: about 16 micro-batches)")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if any(b % 256 for b in args.batch_sizes):
        parser.error("batch sizes must be multiples of the ghost batch size, 256")
    steps = args.steps or max(1, 16 * 256 // max(args.batch_sizes))
    if args.child:
        print("RESULT " + json.dumps(child(args.batch_sizes, args.rounds, steps)))
        return 0
    for backend in args.backends:
        command = [sys.executable, os.path.abspath(__file__), "--child", "--rounds", str(args.rounds), "--steps",
                   str(steps), "--batch-sizes", *map(str, args.batch_sizes)]
        done = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "KERAS_BACKEND": backend})
        lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
        if done.returncode or not lines:
            print(f"{backend}: the child failed ({done.returncode}):\n{done.stderr[-3000:]}", file=sys.stderr)
            return 1
        report = json.loads(lines[-1][len("RESULT "):])
        for batch_size, timings in report["results"].items():
            print(f"\n{backend}, fc6, batch {batch_size} in micro-batches of 256, minimum of {args.rounds} rounds "
                  f"of {steps} steps")
            print("| objective | s / step | ratio to ce |\n|---|---|---|")
            for label, value in timings.items():
                print(f"| {label} | {value:.4f} | {value / timings['ce']:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
