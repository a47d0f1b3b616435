"""The GPU figures of the JAX path, written to one JSON file (run by benchmarks/gpu/run.sh).

(a) fc6 optimizer steps per second at batch 256, and at batch 16384 in ghost batches of 256, for
    ``steps_per_execution`` in {1, 8, 32}; (b) the tracking pass (AltLossTracker.evaluate) over the training and
    test splits; (c) one full ``experiments/run.py`` of fc6, lr 0.1, ``--epochs`` epochs; (d) c1 optimizer steps
    per second at batch 256. Everything goes through the library exactly as ``run.py`` uses it; synthetic data
    of the right shapes stands in for (a), (b) and (d), the Fashion-MNIST IDX files (``--data-dir``) for (c).

    KERAS_BACKEND=jax python benchmarks/gpu/measure.py --data-dir DIR --out results.json
    KERAS_BACKEND=jax JAX_PLATFORMS=cpu python benchmarks/gpu/measure.py --quick --out /tmp/cpu.json  # rehearsal
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)


def device_description() -> dict:
    import jax

    device = jax.devices()[0]
    return {"platform": device.platform, "device_kind": getattr(device, "device_kind", str(device)),
            "jax": jax.__version__, "device_count": jax.device_count()}


def steps_per_second(model_name, input_shape, batch_size, ghost_batch_size, steps_per_execution, steps, seed=0):
    """Optimizer steps per second of ``model.fit`` on synthetic data (after one warm-up epoch)."""
    import keras
    import numpy as np

    from keras_implicit import ghost, models, training

    rng = np.random.default_rng(seed)
    x = rng.random((steps * batch_size, *input_shape), dtype=np.float32)
    y = rng.integers(0, 10, len(x)).astype(np.int32)
    model = ghost.ghost_batch_model(models.make_model(model_name, input_shape, 10, seed=seed), ghost_batch_size)
    model.compile(training.make_optimizer("sgd", 0.1),
                  keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                  steps_per_execution=steps_per_execution)
    model.fit(x, y, batch_size=batch_size, epochs=1, shuffle=False, verbose=0)  # compile
    started = time.perf_counter()
    model.fit(x, y, batch_size=batch_size, epochs=1, shuffle=False, verbose=0)
    elapsed = time.perf_counter() - started
    return {"batch_size": batch_size, "ghost_batch_size": ghost_batch_size, "steps_per_execution":
            steps_per_execution, "optimizer_steps": steps, "seconds": elapsed, "steps_per_second": steps / elapsed}


def tracking_seconds(train_examples, test_examples, repeats=3):
    import numpy as np

    from keras_implicit import callbacks, models

    rng = np.random.default_rng(0)
    train = (rng.random((train_examples, 28, 28, 1), dtype=np.float32), rng.integers(0, 10, train_examples))
    test = (rng.random((test_examples, 28, 28, 1), dtype=np.float32), rng.integers(0, 10, test_examples))
    model = models.make_model("fc6", (28, 28, 1), 10, seed=0)
    tracker = callbacks.AltLossTracker(train, test, batch_size=4096, steps_per_epoch=1)
    tracker.set_model(model)
    tracker.evaluate("train"), tracker.evaluate("test")  # compile
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        tracker.evaluate("train"), tracker.evaluate("test")
        times.append(time.perf_counter() - started)
    return {"train_examples": train_examples, "test_examples": test_examples, "seconds_min": min(times)}


def full_run(data_dir, epochs, train_subset):
    with tempfile.TemporaryDirectory() as out:
        command = [sys.executable, os.path.join(ROOT, "experiments", "run.py"), "--backend", "jax", "--lr", "0.1",
                   "--epochs", str(epochs), "--no-progress", "--out", out]
        if data_dir:
            command += ["--data-dir", data_dir]
        if train_subset:
            command += ["--train-subset", str(train_subset)]
        started = time.perf_counter()
        done = subprocess.run(command, capture_output=True, text=True, cwd=ROOT)
        seconds = time.perf_counter() - started
        if done.returncode != 0:
            return {"error": done.stderr[-2000:], "exit_code": done.returncode}
        with open(os.path.join(out, "metrics.jsonl")) as handle:
            last = [json.loads(line) for line in handle][-2:]
    return {"epochs": epochs, "train_subset": train_subset, "seconds": seconds, "summary": done.stdout.splitlines(),
            "final": {r["split"]: {"ce": r["ce"], "error": r["error"]} for r in last}}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="the JSON file to write")
    parser.add_argument("--data-dir", default=None, help="Fashion-MNIST IDX files for (c)")
    parser.add_argument("--epochs", type=int, default=10, help="epochs of the full run (c)")
    parser.add_argument("--quick", action="store_true", help="tiny sizes: a CPU rehearsal of the script")
    args = parser.parse_args(argv)
    import keras

    if keras.backend.backend() != "jax":
        parser.error(f"run with KERAS_BACKEND=jax (Keras uses {keras.backend.backend()})")
    quick = args.quick
    results = {"device": device_description(), "keras": keras.__version__, "python": platform.python_version(),
               "quick": quick, "fc6": [], "c1": []}
    steps = 4 if quick else 400
    for steps_per_execution in (1, 8) if quick else (1, 8, 32):
        results["fc6"].append(steps_per_second("fc6", (28, 28, 1), 256, 256, steps_per_execution, steps))
    results["fc6"].append(steps_per_second("fc6", (28, 28, 1), 1024 if quick else 16384, 256, 1,
                                           2 if quick else 20))
    results["c1"].append(steps_per_second("c1", (32, 32, 3), 256, 256, 8, 2 if quick else 200))
    results["tracking"] = tracking_seconds(2048 if quick else 60000, 512 if quick else 10000)
    results["run_py"] = full_run(args.data_dir, 2 if quick else args.epochs, 1024 if quick else None)
    with open(args.out, "w") as handle:
        json.dump(results, handle, indent=2)
    print(json.dumps(results, indent=2))
    return 0 if "error" not in results["run_py"] else 1


if __name__ == "__main__":
    sys.exit(main())
