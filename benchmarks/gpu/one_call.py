"""One forward and one gradient call of the FFI kernel per dtype and tile width, for compute-sanitizer.

Run by benchmarks/gpu/kernel.sh. Small problems of every tile width of the CUDA kernel (8, 16 and 32 lanes per
row: 5, 10 and 1000 classes), a row with a NaN, a row with infinite logits, per-sample and scalar feature norms,
reduce=True, and a panel of 70 temperatures (two calls on CUDA, which takes 64 per call). Exits non-zero if a
value is not what the keras.ops path gives.

    KERAS_BACKEND=jax JAX_ENABLE_X64=1 compute-sanitizer --tool memcheck python benchmarks/gpu/one_call.py
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from keras_implicit import _dispatch, _ffi, losses  # noqa: E402
from keras_implicit.metrics import DEFAULT_MARGINS, DEFAULT_SIGMAS, DEFAULT_TEMPERATURES  # noqa: E402


def problem(classes, dtype, rows=37, seed=0):
    rng = np.random.default_rng(seed + classes)
    logits = rng.normal(0.0, 3.0, (rows, classes)).astype(dtype)
    labels = rng.integers(0, classes, rows).astype(np.int32)
    logits[rows - 1, 0] = np.nan
    logits[rows - 2, :2] = np.inf
    norms = rng.uniform(0.5, 2.0, rows).astype(dtype)
    return labels, logits, norms


def check(name, kernel, reference, rtol):
    kernel, reference = np.asarray(kernel), np.asarray(reference)
    if kernel.shape != reference.shape or not np.allclose(kernel, reference, rtol=rtol, atol=1e-30, equal_nan=True):
        print(f"MISMATCH {name}: max |difference| {np.nanmax(np.abs(kernel - reference))}", flush=True)
        return False
    print(f"ok {name}", flush=True)
    return True


def main() -> int:
    print("devices", jax.devices(), flush=True)
    dtypes = [np.float32] + ([np.float64] if jax.config.jax_enable_x64 else [])
    good = True
    for dtype in dtypes:
        rtol = 2e-5 if dtype == np.float32 else 1e-11
        for classes in (5, 10, 1000):
            labels, logits, norms = problem(classes, dtype)
            finite = ~np.isnan(logits).any(axis=1) & ~np.isinf(logits).any(axis=1)
            panels = {}
            for path in ("op", "keras"):
                with _dispatch.force_path(path):
                    panels[path] = losses.panel_values(labels, logits, DEFAULT_SIGMAS, DEFAULT_TEMPERATURES,
                                                       DEFAULT_MARGINS, True, feature_norm=norms)
            good &= check(f"values {dtype.__name__} {classes} classes", panels["op"], panels["keras"], rtol)
            reduced = _ffi.fused_panel(labels[finite], logits[finite], 1.5, DEFAULT_SIGMAS, DEFAULT_TEMPERATURES,
                                       DEFAULT_MARGINS, True, reduce=True)
            with _dispatch.force_path("keras"):
                summed = np.asarray(losses.panel_values(labels[finite], logits[finite], DEFAULT_SIGMAS,
                                                        DEFAULT_TEMPERATURES, DEFAULT_MARGINS, True,
                                                        feature_norm=1.5)).sum(axis=0)
            good &= check(f"reduce {dtype.__name__} {classes} classes", reduced, summed, 10 * rtol)
            gradients = {}
            for path in ("op", "keras"):
                def total(s, n, path=path):
                    with _dispatch.force_path(path):
                        values = losses.panel_values(labels[finite], s, DEFAULT_SIGMAS, DEFAULT_TEMPERATURES,
                                                     DEFAULT_MARGINS, True, feature_norm=n)
                    return jnp.sum(values * jnp.linspace(0.5, 1.5, values.shape[-1], dtype=dtype))
                gradients[path] = jax.grad(total, argnums=(0, 1))(jnp.asarray(logits[finite]),
                                                                   jnp.asarray(norms[finite]))
            for index, name in enumerate(("d logits", "d feature_norm")):
                good &= check(f"{name} {dtype.__name__} {classes} classes", gradients["op"][index],
                              gradients["keras"][index], 50 * rtol)
        labels, logits, _ = problem(10, dtype)
        temperatures = np.geomspace(0.05, 50.0, 70)
        with _dispatch.force_path("op"):
            many = losses.panel_values(labels, logits, temperatures=temperatures)
        with _dispatch.force_path("keras"):
            reference = losses.panel_values(labels, logits, temperatures=temperatures)
        good &= check(f"70 temperatures {dtype.__name__}", many, reference, rtol)
    print("kernel library:", _ffi.library_path(), flush=True)
    return 0 if good else 1


if __name__ == "__main__":
    sys.exit(main())
