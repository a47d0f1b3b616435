"""The cost of the noisy error (keras_implicit.sharpness) against the tracking pass it rides on.

One ``AltLossTracker.evaluate`` over a training split and the test split of fc6 on Fashion-MNIST-sized inputs
(28 x 28, 10 classes; random weights: the cost does not depend on them), with the noisy error off and with
``noisy_error_draws`` = 16, 64 and 256 (noise drawn, the 9 sigmas of the default grid, the noisy CE, eq. 9).
The variants are interleaved round by round, each after one warm-up call (tracing); the minimum over rounds
is printed, and the ratio to the pass without the noisy error. Also printed: the time of the network's
inference pass alone (logits and features, nothing computed on them), the floor of every variant.

Usage:
    python benchmarks/sharpness.py                       # 14,096 examples (4,096 + 10,000), 5 rounds
    python benchmarks/sharpness.py --examples 70000 --rounds 3
    KERAS_BACKEND=jax python benchmarks/sharpness.py
"""

from __future__ import annotations

import argparse
import os
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

DRAWS = (0, 16, 64, 256)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--examples", type=int, default=14096, help="examples evaluated per call (train + test)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--draws", type=int, nargs="+", default=list(DRAWS))
    args = parser.parse_args(argv)

    import keras
    import numpy as np

    from keras_implicit import _backend, callbacks, models

    rng = np.random.default_rng(0)
    x = rng.random((args.examples, 28, 28, 1)).astype(np.float32)
    y = rng.integers(0, 10, args.examples).astype(np.int32)
    model = models.make_model("fc6", (28, 28, 1), 10, seed=0)
    trackers = {}
    for draws in args.draws:
        tracker = callbacks.AltLossTracker((x, y), noisy_error_draws=draws, steps_per_epoch=1, batch_size=4096)
        tracker.set_model(model)
        tracker.evaluate("train")  # trace
        trackers[draws] = tracker
    two_outputs = models.with_features(model)
    forward = _backend.compile_inference(two_outputs, lambda logits, features, y: keras.ops.sum(logits))

    def inference():
        for start in range(0, args.examples, 4096):
            keras.ops.convert_to_numpy(forward(x[start:start + 4096], y[start:start + 4096]))

    inference()
    times = {name: [] for name in [*args.draws, "inference"]}
    for _ in range(args.rounds):
        for draws, tracker in trackers.items():
            started = time.perf_counter()
            tracker.evaluate("train", step=1)
            times[draws].append(time.perf_counter() - started)
        started = time.perf_counter()
        inference()
        times["inference"].append(time.perf_counter() - started)
    base = min(times[0]) if 0 in times else None
    print(f"backend {keras.backend.backend()}, fc6, {args.examples} examples of 28x28, 10 classes, 9 sigmas; "
          f"minimum of {args.rounds} interleaved rounds")
    print(f"{'variant':<28}{'seconds':>10}{'/ tracking':>12}")
    for name, values in times.items():
        label = "inference pass alone" if name == "inference" else (
            "tracking, noisy error off" if name == 0 else f"tracking + {name} draws")
        ratio = f"{min(values) / base:12.2f}" if base else ""
        print(f"{label:<28}{min(values):10.3f}{ratio}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
