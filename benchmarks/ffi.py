"""The 24-loss panel on JAX's CPU: the XLA FFI kernel (custom_ops/panel_ffi.cc) against the keras.ops path.

The panel is the library's default one (keras_implicit.metrics.DEFAULT_SIGMAS, DEFAULT_TEMPERATURES,
DEFAULT_MARGINS and the zero-one error: 24 columns) on float32 logits (normal, sigma = 3, true class +2), all
rows in one call. Four variants, each one jax.jit-compiled function, timed interleaved repeat by repeat (the
minimum of the repeats: the machine is shared and noisy), after one warm-up call each:

  keras forward       losses.panel_keras(labels, logits, ...)           the keras.ops path, compiled by XLA
  ffi forward         _ffi.fused_panel(labels, logits, ...)               the FFI kernel (a custom call)
  keras forward+grad  jax.value_and_grad of the sum of the panel, keras.ops path
  ffi forward+grad    the same on the FFI kernel (its custom_vjp calls the gradient handler)

It prints, per size, the minimum wall-clock and process CPU time (all threads) of each variant, the ratio
keras / ffi (above 1: the kernel is faster), and the memory of each compiled variant: XLA's temporary buffers
(``compiled.memory_analysis().temp_size_in_bytes``, besides inputs and outputs), beside the size a batch x K x
classes float32 buffer would have. The FFI kernel's own scratch is not counted there: the CPU handlers allocate
none; the CUDA ones take from XLA's allocator the bad-row words and, for reduce=True (not timed here) a
batch x K buffer, for a scalar norm's gradient a batch one. Where the device keeps allocator statistics (GPUs), the
process's peak bytes in use (``memory_stats()["peak_bytes_in_use"]``) is printed after each size.

Both run on XLA's CPU thread pool: the keras.ops path's fused loops, and the FFI kernel's chunks of rows (its
ffi::ThreadPool context). --threads N runs the process on N CPUs (its CPU affinity, set before JAX starts: XLA
sizes its pool from it), e.g. 1 to compare both on one thread.

Usage:
    KERAS_BACKEND=jax python benchmarks/ffi.py                         # 60000x10, 60000x100, 10000x1000
    KERAS_BACKEND=jax python benchmarks/ffi.py --rows 6000 --repeats 5  # a quick run: every size with 6000 rows
    KERAS_BACKEND=jax python benchmarks/ffi.py --threads 1
"""

from __future__ import annotations

import argparse
import functools
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

DEFAULT_SIZES = ((60000, 10), (60000, 100), (10000, 1000))
VARIANTS = ("keras forward", "ffi forward", "keras forward+grad", "ffi forward+grad")


def parse_args(argv=None) -> argparse.Namespace:
    """The command line; see the module docstring."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=None, help="rows of every size (default: 60000, 60000, 10000)")
    parser.add_argument("--classes", type=int, nargs="+", default=None,
                        help="class counts (default: 10 100 1000, with the default rows of each)")
    parser.add_argument("--repeats", type=int, default=7, help="timed repeats per variant (minimum reported)")
    parser.add_argument("--threads", type=int, default=None,
                        help="CPUs of the process (its affinity, set before JAX starts: XLA's CPU thread pool, which "
                             "both paths use, has as many threads); default: every CPU")
    return parser.parse_args(argv)


def sizes(args: argparse.Namespace) -> list[tuple[int, int]]:
    """(rows, classes) pairs from --rows and --classes."""
    if args.classes is None:
        return [(args.rows or rows, classes) for rows, classes in DEFAULT_SIZES]
    return [(args.rows or 10000, classes) for classes in args.classes]


def build_variants(labels, logits):
    """The four compiled functions of VARIANTS, each taking no argument (the inputs are closed over as arrays).

    Args:
        labels: int32 [rows] JAX array.
        logits: float32 [rows, classes] JAX array.

    Returns:
        dict name -> (jitted function, its arguments): ``function(*arguments)`` returns the arrays to wait for.
    """
    import jax
    import jax.numpy as jnp
    import numpy as np

    from keras_implicit import _ffi, losses, metrics

    sigmas = np.asarray(metrics.DEFAULT_SIGMAS, np.float64)
    temperatures = np.asarray(metrics.DEFAULT_TEMPERATURES, np.float64)
    margins = np.asarray(metrics.DEFAULT_MARGINS, np.float64)

    def keras_panel(y, s):
        return losses.panel_keras(y, s, None, sigmas, temperatures, margins, True)

    def ffi_panel(y, s):
        return _ffi.fused_panel(y, s, None, sigmas, temperatures, margins, True)

    def with_gradient(panel):
        return jax.jit(jax.value_and_grad(lambda s, y: jnp.sum(panel(y, s))))

    compiled = {
        "keras forward": jax.jit(keras_panel),
        "ffi forward": jax.jit(ffi_panel),
        "keras forward+grad": with_gradient(keras_panel),
        "ffi forward+grad": with_gradient(ffi_panel),
    }
    return {name: (function, (logits, labels) if name.endswith("grad") else (labels, logits))
            for name, function in compiled.items()}


def temporary_bytes(variants) -> dict[str, int]:
    """XLA's temporary buffers of each compiled variant (``memory_analysis().temp_size_in_bytes``)."""
    sizes = {}
    for name, (function, arguments) in variants.items():
        analysis = function.lower(*arguments).compile().memory_analysis()
        sizes[name] = int(analysis.temp_size_in_bytes) if analysis is not None else -1
    return sizes


def measure(rows: int, classes: int, repeats: int) -> tuple[dict[str, tuple[float, float]], dict[str, int]]:
    """(min wall s, min CPU s) of each variant on one size, interleaved repeat by repeat, and XLA's temporary
    bytes of each.

    Args:
        rows: rows of logits.
        classes: classes of logits.
        repeats: timed calls of each variant.

    Returns:
        (dict variant -> (minimum wall-clock seconds, minimum process CPU seconds),
         dict variant -> temporary bytes, -1 where XLA gives no memory analysis).
    """
    import jax
    import jax.numpy as jnp
    import numpy as np

    rng = np.random.default_rng(0)
    labels_np = rng.integers(0, classes, rows).astype(np.int32)
    logits_np = rng.normal(0.0, 3.0, (rows, classes)).astype(np.float32)
    logits_np[np.arange(rows), labels_np] += 2.0
    labels, logits = jnp.asarray(labels_np), jnp.asarray(logits_np)
    variants = build_variants(labels, logits)
    calls = {name: functools.partial(function, *arguments) for name, (function, arguments) in variants.items()}
    first = {name: jax.block_until_ready(call()) for name, call in calls.items()}  # compile and warm up
    forward_ffi, forward_keras = np.asarray(first["ffi forward"]), np.asarray(first["keras forward"])
    agreement = float(np.max(np.abs(forward_ffi - forward_keras) / np.maximum(np.abs(forward_keras), 1e-30)))
    print(f"  (values agree to {agreement:.1e} relative)", flush=True)
    best = {name: (float("inf"), float("inf")) for name in calls}
    for _ in range(repeats):
        for name, call in calls.items():
            wall, cpu = time.perf_counter(), time.process_time()
            jax.block_until_ready(call())
            wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
            best[name] = (min(best[name][0], wall), min(best[name][1], cpu))
    return best, temporary_bytes(variants)


def main(argv=None) -> int:
    """Runs every size and prints the table; returns the exit status."""
    args = parse_args(argv)
    if args.threads is not None:
        cpus = sorted(os.sched_getaffinity(0))
        if not 1 <= args.threads <= len(cpus):
            print(f"benchmarks/ffi.py: --threads must be in [1, {len(cpus)}]", file=sys.stderr)
            return 2
        os.sched_setaffinity(0, cpus[:args.threads])
    os.environ["KERAS_BACKEND"] = "jax"
    import keras

    from keras_implicit import _ffi

    if keras.backend.backend() != "jax":
        print("benchmarks/ffi.py: needs KERAS_BACKEND=jax", file=sys.stderr)
        return 2
    try:
        _ffi.panel_ffi(required=True, source="benchmarks/ffi.py")
    except RuntimeError as error:
        print(f"benchmarks/ffi.py: {error}", file=sys.stderr)
        return 1
    import jax

    print(f"JAX {jax.__version__} on {jax.devices()[0]}; {os.cpu_count()} logical CPUs; threads: "
          f"{len(os.sched_getaffinity(0))}; FFI library {_ffi.library_path()}; 24 losses (default panel, "
          f"error=True), float32; minimum of {args.repeats} interleaved repeats")
    for rows, classes in sizes(args):
        print(f"\n{rows} x {classes} logits", flush=True)
        best, temporary = measure(rows, classes, args.repeats)
        print(f"  {'variant':20s} {'min s':>9s} {'min CPU s':>10s} {'XLA temp MiB':>13s}")
        for name in VARIANTS:
            print(f"  {name:20s} {best[name][0]:9.4f} {best[name][1]:10.4f} {temporary[name] / 2**20:13.1f}")
        print(f"  (a batch x 24 x classes float32 buffer: {rows * 24 * classes * 4 / 2**20:.1f} MiB)")
        stats = jax.devices()[0].memory_stats()
        if stats and "peak_bytes_in_use" in stats:
            print(f"  device peak bytes in use so far: {stats['peak_bytes_in_use'] / 2**20:.1f} MiB")
        for what in ("forward", "forward+grad"):
            keras_time, ffi_time = best[f"keras {what}"], best[f"ffi {what}"]
            print(f"  keras / ffi, {what:12s}: wall {keras_time[0] / ffi_time[0]:.2f}x, "
                  f"CPU {keras_time[1] / ffi_time[1]:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
