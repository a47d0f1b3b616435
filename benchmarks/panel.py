"""The cost of a 24-loss panel, three ways, side by side, against a forward pass of fc6.

For each logits size (default 60,000 x 10, 60,000 x 100 and 10,000 x 1000) it times, in one process and
interleaved repeat by repeat (the minimum of the repeats; the machine is shared and noisy):

  (a) separate: 24 separate Keras metrics, the plain way: keras_implicit.metrics.Gcdf / TemperedCrossentropy /
      MulticlassHinge / ZeroOneError, one per parameter, each computing its own margins (pure TensorFlow);
  (b) vectorized: one AltLossPanel on the keras.ops path (margins shared, one [batch, classes] tensor
      per column);
  (c) op: one AltLossPanel on the fused C++ op (custom_ops/), if it is built;
  forward: one forward pass of fc6 (784 inputs, classes outputs) over the same number of examples.

Everything runs in tf.function, batch by batch (--batch-size, default 4096 as in AltLossTracker), like an
evaluation. The wall-clock minimum is the measurement; the process's CPU time (all threads, its minimum) is
printed beside it, because on a shared machine it is less disturbed by other jobs. Peak memory is the rise of the
resident set (VmHWM - VmRSS, Linux) over one cold run of each variant, each in its own child process.

--op-alone times the op alone instead: the raw op (module.keras_implicit_panel, the call _op.fused_panel
makes) on precomputed logits and parameter tensors, no Keras metric, no tf.function, one call per
--batch-size rows (default: all rows in one call). Each library named by --libraries (portable, avx2, auto,
or the path of a built library, e.g. one built from an older revision) runs in its own child process, since
a process can load only one build of the op; the parent interleaves them repeat by repeat and prints the
minimum wall-clock and CPU time of each, and their ratios to the first library.

Both modes report the minimum over the repeats (the least disturbed by other jobs on a shared machine).

Usage:
    python benchmarks/panel.py                      # all three sizes, 5 repeats
    python benchmarks/panel.py --sizes 60000x10 --repeats 9 --no-memory
    python benchmarks/panel.py --threads 1 --no-memory  # one thread: CPU time = wall time
    python benchmarks/panel.py --libraries portable --no-memory  # the metrics on the portable build
    python benchmarks/panel.py --op-alone --libraries avx2 portable --panel gcdf --sizes 10000x1000 --threads 1
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
LIBRARY_VARIANTS = ("auto", "portable", "avx2")  # the values of KERAS_IMPLICIT_OP_VARIANT
PANELS = ("full", "gcdf")  # the 24-loss default panel, or its nine Gcdf columns only


def parse_size(text: str) -> tuple[int, int]:
    try:
        rows, classes = (int(part) for part in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"a size is ROWSxCLASSES, e.g. 60000x10, got {text!r}") from None
    if rows < 1 or classes < 2:
        raise argparse.ArgumentTypeError(f"a size needs rows >= 1 and classes >= 2, got {text!r}")
    return rows, classes


def make_data(rows: int, classes: int, seed: int = 0, images: bool = True):
    rng = np.random.default_rng(seed)
    # Logits of a partly trained network: the true class ahead by ~2 on average, spread 3.
    labels = rng.integers(0, classes, rows).astype(np.int32)
    logits = rng.normal(0.0, 3.0, (rows, classes)).astype(np.float32)
    logits[np.arange(rows), labels] += 2.0
    pixels = rng.random((rows, 28, 28, 1), dtype=np.float32) if images else None
    return labels, logits, pixels


def build(variant: str, classes: int, batch_size: int):
    """Returns run(labels, logits, images) -> None, which evaluates the variant over every batch."""
    import tensorflow as tf

    from keras_implicit import _dispatch, metrics, models

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
        path = "keras"
    else:
        metric_list = metrics.alt_loss_panel()
        path = "keras" if variant == "vectorized" else "op"
    assert sum(len(getattr(m, "names", [m.name])) for m in metric_list) == 24

    @tf.function(reduce_retracing=True)
    def update(y, s):
        for metric in metric_list:
            metric.update_state(y, s)

    def run(labels, logits, images):
        for metric in metric_list:
            metric.reset_state()
        with _dispatch.force_path(path):  # decides the path when update is traced
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


# --------------------------------------------------------------------------- #
# --op-alone: the raw op, one child process per library, interleaved
# --------------------------------------------------------------------------- #
def panel_grid(panel: str):
    """(sigmas, temperatures, margins, error) of the default alt_loss_panel, or its Gcdf columns only."""
    from keras_implicit import metrics

    if panel == "gcdf":
        return metrics.DEFAULT_SIGMAS, (), (), False
    return metrics.DEFAULT_SIGMAS, metrics.DEFAULT_TEMPERATURES, metrics.DEFAULT_MARGINS, True


def resolve_library(library: str) -> str:
    """The file a library argument names: a KERAS_IMPLICIT_OP_VARIANT value through keras_implicit._op
    (its errors included: a missing build, a CPU that cannot run it), or a path to a built library."""
    if library in LIBRARY_VARIANTS:
        os.environ["KERAS_IMPLICIT_OP_VARIANT"] = library
        from keras_implicit import _op

        return str(_op.library_path())
    if not os.path.isfile(library):
        raise FileNotFoundError(f"{library!r} is neither one of {', '.join(LIBRARY_VARIANTS)} nor a built library")
    return os.path.abspath(library)


def op_child(library: str, size: str, panel: str, batch_size: int | None, threads: int | None) -> int:
    """Child process of --op-alone: loads one library, then times one pass over the logits for every
    "run" line on stdin, answering "TIME wall_s cpu_s" on stdout."""
    import tensorflow as tf

    if threads:
        tf.config.threading.set_intra_op_parallelism_threads(threads)
        tf.config.threading.set_inter_op_parallelism_threads(threads)
    path = resolve_library(library)
    module = tf.load_op_library(path)
    rows, classes = parse_size(size)
    labels, logits, _ = make_data(rows, classes, images=False)
    sigmas, temperatures, margins, error = panel_grid(panel)
    parameters = [tf.constant(np.asarray(p, np.float64).reshape(-1)) for p in (sigmas, temperatures, margins)]
    step = batch_size or rows
    batches = [(tf.constant(labels[start:start + step]), tf.constant(logits[start:start + step]))
               for start in range(0, rows, step)]
    norm = tf.ones([], tf.float32)

    def run():
        for batch_labels, batch_logits in batches:
            values = module.keras_implicit_panel(batch_logits, batch_labels, norm, *parameters, error=error)
        values.numpy()  # eager ops run synchronously on the CPU; this only makes sure

    for _ in range(2):  # warms caches and TensorFlow's thread pool
        run()
    print(f"READY {path}", flush=True)
    for line in sys.stdin:
        if line.strip() != "run":
            break
        start, cpu_start = time.perf_counter(), time.process_time()
        run()
        print(f"TIME {time.perf_counter() - start:.6f} {time.process_time() - cpu_start:.6f}", flush=True)
    return 0


class OpChild:
    """One --op-alone child process and its line protocol."""

    def __init__(self, library: str, size: tuple[int, int], args):
        command = [sys.executable, os.path.abspath(__file__), "--op-child", library, f"{size[0]}x{size[1]}",
                   "--panel", args.panel]
        if args.batch_size:
            command += ["--batch-size", str(args.batch_size)]
        if args.threads:
            command += ["--threads", str(args.threads)]
        self.library = library
        self.process = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        self.path = self._expect("READY")

    def _expect(self, tag: str) -> str:
        line = self.process.stdout.readline()
        if not line.startswith(tag + " "):
            self.process.kill()
            raise RuntimeError(f"the benchmark child for {self.library!r} failed (its error is above)")
        return line[len(tag) + 1:].strip()

    def time_once(self) -> tuple[float, float]:
        self.process.stdin.write("run\n")
        self.process.stdin.flush()
        wall, cpu = self._expect("TIME").split()
        return float(wall), float(cpu)

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.stdin.close()
            self.process.wait(timeout=60)


def op_alone(args) -> int:
    libraries = args.libraries or ["auto"]
    sigmas, temperatures, margins, error = panel_grid(args.panel)
    columns = len(sigmas) + len(temperatures) + len(margins) + int(error)
    print(f"machine: {machine()}; the op alone, {columns} losses ({args.panel}); float32 logits; "
          f"{'all rows in one call' if not args.batch_size else f'{args.batch_size} rows per call'}; "
          f"minimum of {args.repeats} interleaved repeats; threads: {args.threads or 'default'}")
    results = []
    for rows, classes in args.sizes:
        children = []
        try:
            for library in libraries:  # started one after the other: each warms up alone
                children.append(OpChild(library, (rows, classes), args))
            times = {child.library: [] for child in children}
            cpu_times = {child.library: [] for child in children}
            for _ in range(args.repeats):
                for child in children:
                    wall, cpu = child.time_once()
                    times[child.library].append(wall)
                    cpu_times[child.library].append(cpu)
        finally:
            for child in children:
                child.close()
        best = {library: min(values) for library, values in times.items()}
        best_cpu = {library: min(values) for library, values in cpu_times.items()}
        first = libraries[0]
        width = max(len(library) for library in ["library", *libraries]) + 2
        print(f"\n{rows} x {classes} logits, {columns} losses; ratios to {first}")
        print(f"  {'library':<{width}}{'min s':>9}{'ratio':>7}{'min CPU s':>11}{'ratio':>7}{'median s':>10}  file")
        for child in children:
            library = child.library
            print(f"  {library:<{width}}{best[library]:>9.4f}{best[library] / best[first]:>7.2f}"
                  f"{best_cpu[library]:>11.4f}{best_cpu[library] / best_cpu[first]:>7.2f}"
                  f"{statistics.median(times[library]):>10.4f}  {child.path}")
        results.append({
            "rows": rows, "classes": classes, "panel": args.panel, "columns": columns,
            "libraries": {child.library: {"path": child.path, "min_s": best[child.library],
                                          "min_cpu_s": best_cpu[child.library], "all_s": times[child.library],
                                          "all_cpu_s": cpu_times[child.library]} for child in children},
        })
    if args.json:
        with open(args.json, "w") as out:
            json.dump({"machine": machine(), "mode": "op-alone", "threads": args.threads, "results": results}, out,
                      indent=1)
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=parse_size, nargs="+",
                        default=[(60000, 10), (60000, 100), (10000, 1000)], help="ROWSxCLASSES ...")
    parser.add_argument("--batch-size", type=int, default=None,
                        help="rows per update (default 4096; with --op-alone, all rows in one call)")
    parser.add_argument("--repeats", type=int, default=5, help="timed repeats per variant (minimum reported)")
    parser.add_argument("--libraries", nargs="+", metavar="LIBRARY",
                        help="which build of the op: auto (default), portable or avx2 (KERAS_IMPLICIT_OP_VARIANT); "
                             "with --op-alone also paths of built libraries, several compared side by side")
    parser.add_argument("--op-alone", action="store_true",
                        help="time the raw op on precomputed logits, no Keras metric (one child per library)")
    parser.add_argument("--panel", choices=PANELS, default="full",
                        help="with --op-alone: the 24-loss default panel (full) or its nine Gcdf columns (gcdf)")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory child processes")
    parser.add_argument("--threads", type=int, default=None,
                        help="TensorFlow intra- and inter-op threads (default: TensorFlow's choice)")
    parser.add_argument("--json", help="also write the results to this JSON file")
    parser.add_argument("--memory-child", nargs=2, metavar=("VARIANT", "SIZE"), help=argparse.SUPPRESS)
    parser.add_argument("--op-child", nargs=2, metavar=("LIBRARY", "SIZE"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if (args.batch_size is not None and args.batch_size < 1) or args.repeats < 1:
        parser.error("--batch-size and --repeats must be >= 1")

    if args.op_child:
        return op_child(*args.op_child, args.panel, args.batch_size, args.threads)
    if args.op_alone:
        return op_alone(args)
    if args.panel != "full":
        parser.error("--panel needs --op-alone (the metrics always compute the 24-loss panel)")
    if args.libraries:
        if len(args.libraries) != 1 or args.libraries[0] not in LIBRARY_VARIANTS:
            parser.error(f"without --op-alone, --libraries takes one of {', '.join(LIBRARY_VARIANTS)}")
        os.environ["KERAS_IMPLICIT_OP_VARIANT"] = args.libraries[0]  # this process and its memory children
    if args.batch_size is None:
        args.batch_size = 4096

    if args.memory_child:
        variant, size = args.memory_child
        rows, classes = parse_size(size)
        print(f"MEMORY {measure_memory(variant, rows, classes, args.batch_size):.1f}")
        return 0

    import tensorflow as tf

    if args.threads:
        tf.config.threading.set_intra_op_parallelism_threads(args.threads)
        tf.config.threading.set_inter_op_parallelism_threads(args.threads)
    from keras_implicit import _dispatch, _op

    if args.libraries:
        _op.library_path()  # a named build that is missing or that this CPU cannot run: an error, not (c) left out
    with _dispatch.force_path(None):
        op_available = _dispatch.active_path() == "op"
    variants = [v for v in VARIANTS if v != "op" or op_available]
    print(f"machine: {machine()}; TensorFlow {tf.__version__}; batch size {args.batch_size}; "
          f"minimum of {args.repeats} interleaved repeats; threads: {args.threads or 'default'}; "
          f"op library: {_op.library_path().name if op_available else '-'}")
    if not op_available:
        print(f"the fused op is not available ({_op.load_error()}): column (c) is left out")
    results = []
    for rows, classes in args.sizes:
        times, cpu_times = time_case(rows, classes, args.batch_size, args.repeats, variants)
        best = {variant: min(values) for variant, values in times.items()}
        best_cpu = {variant: min(values) for variant, values in cpu_times.items()}
        memory = {}
        if not args.no_memory:
            memory = {variant: memory_in_child(variant, rows, classes, args.batch_size) for variant in variants}
        results.append({"rows": rows, "classes": classes, "min_s": best, "min_cpu_s": best_cpu,
                        "median_s": {variant: statistics.median(values) for variant, values in times.items()},
                        "all_s": times, "peak_mib": memory})

        print(f"\n{rows} x {classes} logits, 24 losses")
        print(f"  {'variant':<12}{'min s':>10}{'/ forward':>11}{'/ op':>8}{'CPU s':>9}{'CPU / op':>10}"
              f"{'peak MiB':>10}")
        for variant in variants:
            ratio_op = f"{best[variant] / best['op']:.2f}" if "op" in best else "-"
            cpu_ratio = f"{best_cpu[variant] / best_cpu['op']:.2f}" if "op" in best_cpu else "-"
            peak = memory.get(variant)
            print(f"  {variant:<12}{best[variant]:>10.4f}{best[variant] / best['forward']:>11.3f}"
                  f"{ratio_op:>8}{best_cpu[variant]:>9.4f}{cpu_ratio:>10}"
                  f"{(f'{peak:.0f}' if peak is not None else '-'):>10}")
        fastest = min(("vectorized", "op") if "op" in best else ("vectorized",), key=best.get)
        print(f"  faster panel path: {fastest}, {100 * best[fastest] / best['forward']:.1f}% of the forward pass"
              + (f"; op speed-up: {best['separate'] / best['op']:.2f}x over (a), "
                 f"{best['vectorized'] / best['op']:.2f}x over (b)" if "op" in best else ""))
    if args.json:
        with open(args.json, "w") as out:
            json.dump({"machine": machine(), "batch_size": args.batch_size, "results": results}, out, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
