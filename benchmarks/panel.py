"""The cost of a 24-loss panel, three ways, side by side, against a forward pass of fc6.

For each logits size (default 60,000 x 10, 60,000 x 100 and 10,000 x 1000) it times, in one process and
interleaved repeat by repeat (medians; the machine is shared and noisy):

  (a) separate: 24 separate Keras metrics, the plain way: keras_implicit.metrics.Gcdf / TemperedCrossentropy /
      MulticlassHinge / ZeroOneError, one per parameter, each computing its own margins (pure TensorFlow);
  (b) vectorized: one AltLossPanel on the pure-TensorFlow path (margins shared, one [batch, classes] tensor
      per column);
  (c) op: one AltLossPanel on the fused C++ op (custom_ops/), if it is built;
  forward: one forward pass of fc6 (784 inputs, classes outputs) over the same number of examples.

Everything runs in tf.function, batch by batch (--batch-size, default 4096 as in AltLossTracker), like an
evaluation. Wall-clock medians are the measurement; the process's CPU time (all threads) is printed beside
them, because on a shared machine it is less disturbed by other jobs. Peak memory is the rise of the
resident set (VmHWM - VmRSS, Linux) over one cold run of each variant, each in its own child process.

Usage:
    python benchmarks/panel.py                      # all three sizes, 5 repeats
    python benchmarks/panel.py --sizes 60000x10 --repeats 9 --no-memory
    python benchmarks/panel.py --threads 1 --no-memory  # one thread: CPU time = wall time
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402

VARIANTS = ("separate", "vectorized", "op", "forward")


def parse_size(text: str) -> tuple[int, int]:
    try:
        rows, classes = (int(part) for part in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"a size is ROWSxCLASSES, e.g. 60000x10, got {text!r}") from None
    if rows < 1 or classes < 2:
        raise argparse.ArgumentTypeError(f"a size needs rows >= 1 and classes >= 2, got {text!r}")
    return rows, classes


def make_data(rows: int, classes: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    # Logits of a partly trained network: the true class ahead by ~2 on average, spread 3.
    labels = rng.integers(0, classes, rows).astype(np.int32)
    logits = rng.normal(0.0, 3.0, (rows, classes)).astype(np.float32)
    logits[np.arange(rows), labels] += 2.0
    images = rng.random((rows, 28, 28, 1), dtype=np.float32)
    return labels, logits, images


def build(variant: str, classes: int, batch_size: int):
    """Returns run(labels, logits, images) -> None, which evaluates the variant over every batch."""
    import tensorflow as tf

    from keras_implicit import _op, metrics, models

    if variant == "forward":
        model = models.make_model("fc6", (28, 28, 1), classes, seed=0)

        @tf.function(reduce_retracing=True)
        def forward(x):
            return model(x, training=False)

        def run(labels, logits, images):
            for start in range(0, int(images.shape[0]), batch_size):
                forward(images[start:start + batch_size])

        return run

    if variant == "separate":
        metric_list = [metrics.Gcdf(s) for s in metrics.DEFAULT_SIGMAS]
        metric_list += [metrics.TemperedCrossentropy(t) for t in metrics.DEFAULT_TEMPERATURES]
        metric_list += [metrics.MulticlassHinge(g) for g in metrics.DEFAULT_MARGINS]
        metric_list += [metrics.ZeroOneError()]
        path = "tf"
    else:
        metric_list = metrics.alt_loss_panel()
        path = "tf" if variant == "vectorized" else "op"
    assert sum(len(getattr(m, "names", [m.name])) for m in metric_list) == 24

    @tf.function(reduce_retracing=True)
    def update(y, s):
        for metric in metric_list:
            metric.update_state(y, s)

    def run(labels, logits, images):
        for metric in metric_list:
            metric.reset_state()
        with _op.force_path(path):  # decides the path when update is traced
            for start in range(0, int(logits.shape[0]), batch_size):
                update(labels[start:start + batch_size], logits[start:start + batch_size])
        for metric in metric_list:
            result = metric.result()
            values = result.values() if isinstance(result, dict) else [result]
            for value in values:
                float(value)  # waits for the computation

    return run


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def measure_memory(variant: str, rows: int, classes: int, batch_size: int) -> float:
    """Child process: MiB by which one cold run raises the peak resident set above the resident set before."""
    import tensorflow as tf

    labels, logits, images = make_data(rows, classes)
    labels, logits = tf.constant(labels), tf.constant(logits)
    images = tf.constant(images) if variant == "forward" else images[:0]
    run = build(variant, classes, batch_size)
    before = _status_kib("VmRSS")
    with open("/proc/self/clear_refs", "w") as clear:
        clear.write("5")  # resets VmHWM to the current resident set
    run(labels, logits, images)
    return (_status_kib("VmHWM") - before) / 1024.0


def memory_in_child(variant: str, rows: int, classes: int, batch_size: int) -> float | None:
    command = [sys.executable, __file__, "--memory-child", variant, f"{rows}x{classes}",
               "--batch-size", str(batch_size)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=1800)
    for line in done.stdout.splitlines():
        if line.startswith("MEMORY "):
            return float(line.split()[1])
    sys.stderr.write(f"memory measurement of {variant} {rows}x{classes} failed:\n{done.stderr[-2000:]}\n")
    return None


def time_case(rows: int, classes: int, batch_size: int, repeats: int, variants) -> dict[str, list[float]]:
    import tensorflow as tf

    labels, logits, images = make_data(rows, classes)
    labels, logits, images = tf.constant(labels), tf.constant(logits), tf.constant(images)
    runs = {variant: build(variant, classes, batch_size) for variant in variants}
    for run in runs.values():  # traces, loads the op, warms caches
        run(labels, logits, images)
    times = {variant: [] for variant in variants}
    cpu_times = {variant: [] for variant in variants}
    for _ in range(repeats):
        for variant, run in runs.items():
            start, cpu_start = time.perf_counter(), time.process_time()
            run(labels, logits, images)
            times[variant].append(time.perf_counter() - start)
            cpu_times[variant].append(time.process_time() - cpu_start)
    return times, cpu_times


def machine() -> str:
    try:
        model = next(
            line.split(":", 1)[1].strip()
            for line in subprocess.run(["lscpu"], capture_output=True, text=True).stdout.splitlines()
            if line.startswith("Model name")
        )
    except (OSError, StopIteration):
        model = "unknown CPU"
    return f"{model}, {os.cpu_count()} logical CPUs"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=parse_size, nargs="+",
                        default=[(60000, 10), (60000, 100), (10000, 1000)], help="ROWSxCLASSES ...")
    parser.add_argument("--batch-size", type=int, default=4096, help="rows per update (default 4096)")
    parser.add_argument("--repeats", type=int, default=5, help="timed repeats per variant (median)")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory child processes")
    parser.add_argument("--threads", type=int, default=None,
                        help="TensorFlow intra- and inter-op threads (default: TensorFlow's choice)")
    parser.add_argument("--json", help="also write the results to this JSON file")
    parser.add_argument("--memory-child", nargs=2, metavar=("VARIANT", "SIZE"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.batch_size < 1 or args.repeats < 1:
        parser.error("--batch-size and --repeats must be >= 1")

    if args.memory_child:
        variant, size = args.memory_child
        rows, classes = parse_size(size)
        print(f"MEMORY {measure_memory(variant, rows, classes, args.batch_size):.1f}")
        return 0

    import tensorflow as tf

    if args.threads:
        tf.config.threading.set_intra_op_parallelism_threads(args.threads)
        tf.config.threading.set_inter_op_parallelism_threads(args.threads)
    from keras_implicit import _op

    with _op.force_path(None):
        op_available = _op.active_path() == "op"
    variants = [v for v in VARIANTS if v != "op" or op_available]
    print(f"machine: {machine()}; TensorFlow {tf.__version__}; batch size {args.batch_size}; "
          f"median of {args.repeats} interleaved repeats; threads: {args.threads or 'default'}")
    if not op_available:
        print(f"the fused op is not available ({_op.load_error()}): column (c) is left out")
    results = []
    for rows, classes in args.sizes:
        times, cpu_times = time_case(rows, classes, args.batch_size, args.repeats, variants)
        median = {variant: statistics.median(values) for variant, values in times.items()}
        median_cpu = {variant: statistics.median(values) for variant, values in cpu_times.items()}
        memory = {}
        if not args.no_memory:
            memory = {variant: memory_in_child(variant, rows, classes, args.batch_size) for variant in variants}
        results.append({"rows": rows, "classes": classes, "median_s": median, "all_s": times,
                        "median_cpu_s": median_cpu, "peak_mib": memory})

        print(f"\n{rows} x {classes} logits, 24 losses")
        print(f"  {'variant':<12}{'median s':>10}{'/ forward':>11}{'/ op':>8}{'CPU s':>9}{'CPU / op':>10}"
              f"{'peak MiB':>10}")
        for variant in variants:
            ratio_op = f"{median[variant] / median['op']:.2f}" if "op" in median else "-"
            cpu_ratio = f"{median_cpu[variant] / median_cpu['op']:.2f}" if "op" in median_cpu else "-"
            peak = memory.get(variant)
            print(f"  {variant:<12}{median[variant]:>10.4f}{median[variant] / median['forward']:>11.3f}"
                  f"{ratio_op:>8}{median_cpu[variant]:>9.4f}{cpu_ratio:>10}"
                  f"{(f'{peak:.0f}' if peak is not None else '-'):>10}")
        fastest = min(("vectorized", "op") if "op" in median else ("vectorized",), key=median.get)
        print(f"  faster panel path: {fastest}, {100 * median[fastest] / median['forward']:.1f}% of the forward pass"
              + (f"; op speed-up: {median['separate'] / median['op']:.2f}x over (a), "
                 f"{median['vectorized'] / median['op']:.2f}x over (b)" if "op" in median else ""))
    if args.json:
        with open(args.json, "w") as out:
            json.dump({"machine": machine(), "batch_size": args.batch_size, "results": results}, out, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
