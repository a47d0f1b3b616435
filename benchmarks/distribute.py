"""One fc6 training epoch on 1 device and on 2 replicas of tf.distribute.MirroredStrategy (issue: tf.distribute).

On this machine (no GPU) the 2 replicas are 2 logical devices of the same CPU (``--cpu-replicas 2``), so the
second is expected to be slower: the figure is the overhead of the distributed path (per-replica steps, the
all-reduce of gradients and moving statistics, the merge call), not a speed-up. Everything runs in one
process whose CPU is split into 2 logical devices first; variants are interleaved round by round and the
minimum over rounds is printed, with ratios measured side by side:

  keras-accumulation  1 device, the plain model with Keras' gradient_accumulation_steps on micro-batches
                      (what training.py used before GhostBatchModel; with one micro-batch per step, the plain
                      model's own fit);
  ghost-model         1 device, keras_implicit.ghost.GhostBatchModel under model.fit (run.py's default path);
  mirrored-2          2 replicas, GhostBatchModel under keras_implicit._distribute.run_epoch (run.py
                      --strategy mirrored --cpu-replicas 2).

for three batch settings: ``b256-g256`` (run.py's default, one micro-batch per step: 1 device only, 2 replicas
need ghost batches of 128), ``b256-g128`` (batch 256 in ghost batches of 128, one per replica) and
``b4096-g256`` (batch 4096 in 16 ghost batches of 256, 8 per replica). An epoch is ``--examples`` examples
of 28 x 28 synthetic images; the first epoch of each variant (tracing) is left out.

    python benchmarks/distribute.py                      # 16384 examples, 3 rounds
    python benchmarks/distribute.py --examples 8192 --rounds 2
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

SETTINGS = {"b256-g256": (256, 256), "b256-g128": (256, 128), "b4096-g256": (4096, 256)}
VARIANTS = ("keras-accumulation", "ghost-model", "mirrored-2")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--examples", type=int, default=16384, help="examples per epoch")
    parser.add_argument("--rounds", type=int, default=3, help="timed epochs per variant (interleaved)")
    parser.add_argument("--json", default=None, help="also write the results here")
    args = parser.parse_args(argv)

    from keras_implicit import _distribute

    strategy = _distribute.make_strategy("mirrored", cpu_replicas=2)  # first: before TensorFlow starts
    import keras
    import numpy as np
    import tensorflow as tf

    from keras_implicit import ghost, models, training

    rng = np.random.default_rng(0)
    x = rng.random((args.examples, 28, 28, 1), dtype=np.float32)
    y = rng.integers(0, 10, args.examples).astype(np.int32)
    x_tensor, y_tensor = tf.constant(x), tf.constant(y)

    def build(variant, batch_size, ghost_batch_size):
        scope = strategy.scope() if variant == "mirrored-2" else contextlib.nullcontext()
        with scope:
            network = models.make_model("fc6", (28, 28, 1), 10, seed=0)
            if variant == "keras-accumulation":
                model = network
                steps = batch_size // ghost_batch_size
                optimizer = keras.optimizers.SGD(0.1, momentum=0.9,
                                                 gradient_accumulation_steps=steps if steps > 1 else None)
            else:
                model = ghost.ghost_batch_model(network, ghost_batch_size)
                optimizer = training.make_optimizer("sgd", 0.1)
            model.compile(optimizer, training.make_loss("ce"))
            optimizer.build(model.trainable_variables)
        return model

    def epoch(variant, model, batch_size, ghost_batch_size, index):
        order = training.epoch_order(args.examples, batch_size, 0, index)
        started = time.perf_counter()
        if variant == "keras-accumulation":
            batches = tf.data.Dataset.from_tensor_slices(order).batch(ghost_batch_size).map(
                lambda i: (tf.gather(x_tensor, i), tf.gather(y_tensor, i))).prefetch(2)
            model.fit(batches, verbose=0, shuffle=False)
        else:
            batches = training.epoch_batches(x_tensor, y_tensor, batch_size, 0, index)
            if variant == "ghost-model":
                model.fit(batches, verbose=0, shuffle=False)
            else:
                _distribute.run_epoch(model, strategy, batches, [], index, len(order) // batch_size)
        return time.perf_counter() - started

    results = {}
    for setting, (batch_size, ghost_batch_size) in SETTINGS.items():
        variants = [v for v in VARIANTS if v != "mirrored-2" or batch_size % (2 * ghost_batch_size) == 0]
        models_by_variant = {v: build(v, batch_size, ghost_batch_size) for v in variants}
        for variant, model in models_by_variant.items():
            epoch(variant, model, batch_size, ghost_batch_size, 0)  # tracing
        seconds = {v: [] for v in variants}
        for round_index in range(args.rounds):
            for variant, model in models_by_variant.items():
                seconds[variant].append(epoch(variant, model, batch_size, ghost_batch_size, round_index + 1))
        best = {v: min(s) for v, s in seconds.items()}
        results[setting] = {v: {"seconds": best[v], "examples_per_second": args.examples / best[v],
                                "all_seconds": seconds[v]} for v in variants}
        print(f"{setting}: " + "  ".join(f"{v} {args.examples / best[v]:,.0f} ex/s ({best[v]:.2f} s)"
                                        for v in variants))
        line = f"  ghost-model / keras-accumulation time {best['ghost-model'] / best['keras-accumulation']:.2f}x"
        if "mirrored-2" in best:
            line += f"; mirrored-2 / ghost-model time {best['mirrored-2'] / best['ghost-model']:.2f}x"
        print(line)
    if args.json:
        with open(args.json, "w") as handle:
            json.dump({"examples": args.examples, "rounds": args.rounds, "results": results}, handle, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
