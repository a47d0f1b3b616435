"""The 24-loss panel against 24 hand-written Keras metrics, on every Keras backend, side by side.

For each backend (one child process each: Keras picks its backend once per process) this times
``update_state`` over precomputed fc6-shaped logits (default 60,000 x 10, batches of 1,024), compiled per
batch as each backend's trainer compiles it (``tf.function``; ``jax.jit`` of ``stateless_update_state``),
with the default panel's 24 losses tracked as:

  handwritten  24 separate ``keras.metrics.MeanMetricWrapper`` metrics, each a plain ``keras.ops`` function
               written here from the paper's formula (each computes its own margins);
  panel        one ``AltLossPanel`` on the ``keras.ops`` path (margins shared, all parameters at once);
  op           one ``AltLossPanel`` on the fused C++ op (TensorFlow only, where it is built).

Variants are interleaved repeat by repeat and the minimum of the repeats is reported (the machine is
shared and noisy); the ratios are of those minima, within one backend's process. Run:

    python benchmarks/panel_backends.py                       # tensorflow and jax, 9 repeats
    python benchmarks/panel_backends.py --backends jax --repeats 5 --rows 20000
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

VARIANTS = ("handwritten", "panel", "op")


def handwritten_metrics():
    """The default panel's 24 losses as 24 independent metrics, written the plain way."""
    import keras
    from keras import ops

    from keras_implicit import metrics as ki_metrics

    def margins(y_true, y_pred):
        labels = ops.cast(ops.reshape(y_true, (-1,)), "int32")
        classes = ops.shape(y_pred)[-1]
        true_score = ops.take_along_axis(y_pred, labels[:, None], axis=1)
        others = ops.cast(ops.not_equal(ops.arange(classes)[None, :], labels[:, None]), y_pred.dtype)
        return y_pred - true_score, others

    def gcdf(y_true, y_pred, sigma):
        d, others = margins(y_true, y_pred)
        return ops.sum(others * 0.5 * ops.erfc(-d / (2.0 * sigma)), axis=-1)

    def tce(y_true, y_pred, temperature):
        labels = ops.cast(ops.reshape(y_true, (-1,)), "int32")
        log_p = ops.log_softmax(y_pred / temperature, axis=-1)
        return -ops.take_along_axis(log_p, labels[:, None], axis=1)[:, 0]

    def hinge(y_true, y_pred, margin):
        d, others = margins(y_true, y_pred)
        return ops.sum(others * ops.relu(margin + d), axis=-1)

    def error(y_true, y_pred):
        labels = ops.cast(ops.reshape(y_true, (-1,)), "int32")
        return ops.cast(ops.not_equal(ops.argmax(y_pred, axis=-1), labels), y_pred.dtype)

    wrapper = keras.metrics.MeanMetricWrapper
    metrics = [wrapper(gcdf, name=f"g{s}", sigma=s) for s in ki_metrics.DEFAULT_SIGMAS]
    metrics += [wrapper(tce, name=f"t{t}", temperature=t) for t in ki_metrics.DEFAULT_TEMPERATURES]
    metrics += [wrapper(hinge, name=f"h{g}", margin=g) for g in ki_metrics.DEFAULT_MARGINS]
    return metrics + [wrapper(error, name="e")]


def compiled_update(metrics, path):
    """A function running ``update_state`` of every metric over a list of batches, compiled per batch the way
    each backend's trainer compiles it: ``tf.function`` on TensorFlow, ``jax.jit`` of the stateless update on
    JAX (the variables carried through the loop and written back at the end)."""
    import keras

    import keras_implicit as ki

    backend = keras.backend.backend()
    if backend == "tensorflow":
        import tensorflow as tf

        @tf.function(jit_compile=False)
        def step(y, p):
            with ki.force_path(path):
                for metric in metrics:
                    metric.update_state(y, p)

        def loop(batches):
            for y, p in batches:
                step(y, p)
        return loop
    if backend == "jax":
        import jax

        def stateless(states, y, p):
            with ki.force_path(path):
                return [m.stateless_update_state(s, y, p) for m, s in zip(metrics, states)]

        step = jax.jit(stateless)

        def loop(batches):
            states = [[v.value for v in m.variables] for m in metrics]
            for y, p in batches:
                states = step(states, y, p)
            jax.block_until_ready(states)
            for metric, state in zip(metrics, states):
                for variable, value in zip(metric.variables, state):
                    variable.assign(value)
        return loop
    raise SystemExit(f"benchmarks/panel_backends.py: no compiled loop for the {backend!r} backend")


def measure(rows: int, classes: int, batch_size: int, repeats: int) -> dict:
    """Runs in the child process: min seconds per variant on this process's backend."""
    import keras
    import numpy as np

    import keras_implicit as ki
    from keras_implicit import _dispatch

    backend = keras.backend.backend()
    rng = np.random.default_rng(0)
    labels = rng.integers(0, classes, rows).astype(np.int32)
    logits = rng.normal(0.0, 3.0, (rows, classes)).astype(np.float32)
    logits[np.arange(rows), labels] += 2.0

    variants = {"handwritten": (handwritten_metrics(), "keras"), "panel": (ki.alt_loss_panel(), "keras")}
    try:
        op_available = backend == "tensorflow" and _dispatch.active_path("op") == "op"
    except RuntimeError:  # the op cannot load here: the keras.ops variants only
        op_available = False
    if op_available:
        variants["op"] = (ki.alt_loss_panel(), "op")
    # Tensors of the backend, made once (as a data pipeline hands them over): the loop times the updates only.
    tensor = keras.ops.convert_to_tensor
    batches = [(tensor(labels[i:i + batch_size]), tensor(logits[i:i + batch_size])) for i in range(0, rows, batch_size)]
    updates = {name: compiled_update(metrics, path) for name, (metrics, path) in variants.items()}

    def run(name):
        metrics = variants[name][0]
        for metric in metrics:
            metric.reset_state()
        started = time.perf_counter()
        updates[name](batches)
        elapsed = time.perf_counter() - started
        results = {}
        for metric in metrics:
            value = metric.result()
            results.update({k: float(v) for k, v in value.items()} if isinstance(value, dict)
                           else {metric.name: float(value)})
        return elapsed, results

    results = {}
    for name in variants:  # compile / trace once, and keep the values for a cross-check
        results[name] = run(name)[1]
    times = {name: [] for name in variants}
    for _ in range(repeats):
        for name in variants:
            times[name].append(run(name)[0])
    panel, hand = results["panel"], results["handwritten"]
    agree = all(math.isclose(panel[f"gcdf@{ki.format_parameter(s)}"], hand[f"g{s}"], rel_tol=1e-4)
                for s in ki.metrics.DEFAULT_SIGMAS)
    return {"backend": backend, "keras": keras.__version__, "rows": rows, "classes": classes,
            "batch_size": batch_size, "repeats": repeats, "seconds": {n: min(t) for n, t in times.items()},
            "panel_equals_handwritten": agree}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backends", nargs="+", default=["tensorflow", "jax"])
    parser.add_argument("--rows", type=int, default=60000)
    parser.add_argument("--classes", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=1024)
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(measure(args.rows, args.classes, args.batch_size, args.repeats)))
        return 0
    rows = []
    for backend in args.backends:
        command = [sys.executable, os.path.abspath(__file__), "--child", "--rows", str(args.rows), "--classes",
                   str(args.classes), "--batch-size", str(args.batch_size), "--repeats", str(args.repeats)]
        done = subprocess.run(command, env={**os.environ, "KERAS_BACKEND": backend}, capture_output=True, text=True)
        if done.returncode != 0:
            print(f"{backend}: failed\n{done.stderr[-3000:]}", file=sys.stderr)
            return 1
        rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
    print(f"update_state over {args.rows} x {args.classes} logits, batches of {args.batch_size}, "
          f"min of {args.repeats} (seconds; ratios to 24 hand-written metrics)")
    print(f"{'backend':<11} {'handwritten':>12} {'panel':>8} {'op':>8}  {'panel/hand':>10} "
          f"{'op/hand':>8}  values agree")
    for row in rows:
        t = row["seconds"]
        op = f"{t['op']:8.3f}" if "op" in t else f"{'-':>8}"
        op_ratio = f"{t['op'] / t['handwritten']:8.2f}" if "op" in t else f"{'-':>8}"
        print(f"{row['backend']:<11} {t['handwritten']:12.3f} {t['panel']:8.3f} {op}  "
              f"{t['panel'] / t['handwritten']:10.2f} {op_ratio}  {row['panel_equals_handwritten']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
