"""What differs between Keras backends outside the formulas: the one place that names a backend.

Everything else in the library is written once in ``keras.ops``. This module is where

- the tracker's measurement is compiled the way each backend compiles (``tf.function`` on TensorFlow,
  ``jax.jit`` over the model's ``stateless_call`` on JAX, eager under ``torch.no_grad`` on PyTorch);
- TensorBoard scalars are written: through ``tf.summary`` on TensorFlow, through ``tensorboardX`` (a
  TensorBoard event writer that needs no TensorFlow) on the other backends, or not at all, with one
  warning, when neither is there;
- the training protocol feeds its micro-batches (a ``tf.data`` pipeline gathering from tensors on
  TensorFlow, a ``keras.utils.PyDataset`` over NumPy arrays elsewhere), asks for deterministic kernels and
  records the backend's versions.

The fused C++ op has its own TensorFlow seam, :mod:`keras_implicit._op`.
"""

from __future__ import annotations

import importlib.metadata
import logging
import os
import time
from typing import Callable, Optional

import keras
import numpy as np

from keras_implicit import _distribute

__all__ = [
    "compile_inference", "compile_batch_sums", "fused",
    "accumulation_dtype", "ScalarWriter", "open_scalar_writer", "training_arrays",
    "batches", "enable_determinism", "versions",
]

_LOGGER = logging.getLogger("keras_implicit")


def accumulation_dtype() -> str:
    """float64 where the backend computes it (JAX only with ``JAX_ENABLE_X64=1``), else float32."""
    if keras.backend.backend() == "jax":
        import jax  # deferred: this backend only

        return "float64" if jax.config.jax_enable_x64 else "float32"
    return "float64"


def compile_inference(model: keras.Model, fn: Callable) -> Callable:
    """``run(x, y, *per_example) = fn(*model(x, training=False), y, *per_example)``, compiled for the backend,
    with the model's current weights at each call (JAX: the variables are passed in, never captured as
    constants). ``per_example``: more tensors with one row per example of ``x`` (the noise draws of
    :mod:`keras_implicit.sharpness`)."""
    backend = keras.backend.backend()
    if backend == "tensorflow":
        import tensorflow as tf  # deferred: this backend only

        @tf.function(reduce_retracing=True)
        def run_tf(x, y, *per_example):
            return fn(*model(x, training=False), y, *per_example)

        return run_tf
    if backend == "jax":
        import jax  # deferred: this backend only

        @jax.jit
        def stateless(trainable, non_trainable, x, y, *per_example):
            outputs, _ = model.stateless_call(trainable, non_trainable, x, training=False)
            return fn(*outputs, y, *per_example)

        def run_jax(x, y, *per_example):
            return stateless([v.value for v in model.trainable_variables],
                             [v.value for v in model.non_trainable_variables], x, y, *per_example)

        return run_jax

    def run_eager(x, y, *per_example):
        if backend == "torch":
            import torch  # deferred: only on this backend

            with torch.no_grad():
                return fn(*model(x, training=False), y, *per_example)
        return fn(*model(x, training=False), y, *per_example)

    return run_eager


def compile_batch_sums(model: keras.Model, fn: Callable, trained_model: Optional[keras.Model] = None) -> Callable:
    """:func:`compile_inference` for an ``fn`` that returns sums over the batch. When ``trained_model`` (default
    ``model``) was built under a ``tf.distribute`` strategy with several replicas, the batch is split over the
    replicas (``per_example`` tensors cut the same way) and their sums added
    (``keras_implicit._distribute.summed_over_replicas``)."""
    if keras.backend.backend() == "tensorflow":
        strategy = (trained_model or model).distribute_strategy
        if strategy.num_replicas_in_sync > 1:

            return _distribute.summed_over_replicas(strategy, model, fn)
    return compile_inference(model, fn)


def fused(fn: Callable) -> Callable:
    """``fn`` compiled by XLA where that is a separate choice: ``tf.function(jit_compile=True)`` on TensorFlow
    (called inside another ``tf.function``, it becomes one XLA cluster of that graph); unchanged on JAX, whose
    ``jax.jit`` around the caller compiles everything with XLA already, and on PyTorch."""
    if keras.backend.backend() == "tensorflow":
        import tensorflow as tf  # deferred: this backend only

        return tf.function(fn, jit_compile=True, reduce_retracing=True)
    return fn


class ScalarWriter:
    """Scalars and one custom-scalars layout into a TensorBoard event file (see :func:`open_scalar_writer`)."""

    def scalars(self, values: dict[str, float], step: int) -> None:
        raise NotImplementedError

    def layout(self, layout_proto) -> None:
        raise NotImplementedError

    def flush(self) -> None:
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError


class _TFWriter(ScalarWriter):
    def __init__(self, log_dir: str):
        import tensorflow as tf  # deferred: this backend only

        self._tf = tf
        self._writer = tf.summary.create_file_writer(log_dir)

    def scalars(self, values, step):
        with self._writer.as_default():
            for tag, value in values.items():
                self._tf.summary.scalar(tag, value, step=step)

    def layout(self, layout_proto):
        from tensorboard.plugins.custom_scalar import (  # deferred: for this writer only
            summary as custom_scalar_summary,
        )

        with self._writer.as_default():
            self._tf.summary.experimental.write_raw_pb(custom_scalar_summary.pb(layout_proto).SerializeToString(),
                                                       step=0)

    def flush(self):
        self._writer.flush()

    def close(self):
        self._writer.close()


class _TensorboardXWriter(ScalarWriter):
    # tensorboardX's synchronous EventsWriter and its Summary protos directly. Its FileWriter hands events to a
    # thread that writes them when it gets to them and flushes every 120 s, and its flush() does not wait for
    # that thread: the event file's size at a checkpoint (RunDirectory.tensorboard_sizes, which a resume cuts the
    # file back to) must hold every point written before it. Its SummaryWriter.add_scalar also rewrites tags
    # ("train/gcdf@1" into "train/gcdf_1"), and the logs must carry the same tags on every backend.
    def __init__(self, log_dir: str):
        import tensorboardX  # deferred: this writer only
        from tensorboardX.event_file_writer import EventsWriter  # deferred: this writer only
        from tensorboardX.proto.event_pb2 import Event  # deferred: this writer only
        from tensorboardX.proto.summary_pb2 import Summary  # deferred: this writer only

        os.makedirs(log_dir, exist_ok=True)
        self._event = Event
        self._summary = Summary
        self._custom_scalars = tensorboardX.summary.custom_scalars
        self._writer = EventsWriter(os.path.join(log_dir, "events"))

    def _write(self, summary, step: int):
        self._writer.write_event(self._event(wall_time=time.time(), step=step, summary=summary))

    def scalars(self, values, step):
        self._write(self._summary(value=[self._summary.Value(tag=tag, simple_value=float(value))
                                         for tag, value in values.items()]), int(step))

    def layout(self, layout_proto):
        # tensorboardX takes the layout as {category: {chart: ["Multiline", [tag regexes]]}}.
        self._write(self._custom_scalars({
            category.title: {chart.title: ["Multiline", list(chart.multiline.tag)] for chart in category.chart}
            for category in layout_proto.category
        }), 0)

    def flush(self):
        self._writer.flush()

    def close(self):
        self._writer.close()


_warned_no_writer = False


def open_scalar_writer(log_dir: str) -> Optional[ScalarWriter]:
    """A writer for ``log_dir``: tf.summary on TensorFlow, tensorboardX elsewhere, None (one warning) without."""
    global _warned_no_writer
    if keras.backend.backend() == "tensorflow":
        return _TFWriter(log_dir)
    try:
        return _TensorboardXWriter(log_dir)
    except ImportError:
        if not _warned_no_writer:
            _warned_no_writer = True
            _LOGGER.warning("keras_implicit: no TensorBoard event files on the %s backend without TensorFlow: "
                            "pip install tensorboardX (metrics.jsonl is written all the same)",
                            keras.backend.backend())
        return None


def training_arrays(x, y):
    """The training set as the micro-batch pipeline wants it: tensors on TensorFlow (gathered by tf.data),
    NumPy arrays elsewhere (sliced on the host, sent to the device batch by batch)."""
    if keras.backend.backend() == "tensorflow":
        import tensorflow as tf  # deferred: this backend only

        return tf.convert_to_tensor(x), tf.convert_to_tensor(y)
    return np.asarray(x), np.asarray(y)


class _Batches(keras.utils.PyDataset):
    """``(x[order[i*b:(i+1)*b]], y[...])`` for each batch ``i`` of one epoch, in order."""

    def __init__(self, x, y, order, batch_size):
        super().__init__(workers=1, use_multiprocessing=False)
        self.x, self.y, self.order, self.batch_size = x, y, order, int(batch_size)

    def __len__(self):
        return len(self.order) // self.batch_size

    def __getitem__(self, index):
        indices = self.order[index * self.batch_size:(index + 1) * self.batch_size]
        return self.x[indices], self.y[indices]


def batches(x, y, order: np.ndarray, batch_size: int):
    """The batches of one epoch, ``order`` cut into whole groups of ``batch_size``, for ``model.fit``."""
    if keras.backend.backend() == "tensorflow":
        import tensorflow as tf  # deferred: this backend only

        dataset = tf.data.Dataset.from_tensor_slices(order.astype(np.int64)).batch(batch_size, drop_remainder=True)
        dataset = dataset.map(lambda idx: (tf.gather(x, idx), tf.gather(y, idx)))
        return dataset.prefetch(2)
    return _Batches(x, y, order, batch_size)


def enable_determinism() -> str:
    """Deterministic kernels where the backend has a switch; returns what was done, for the logs."""
    backend = keras.backend.backend()
    if backend == "tensorflow":
        import tensorflow as tf  # deferred: this backend only

        tf.config.experimental.enable_op_determinism()
        return "tf.config.experimental.enable_op_determinism()"
    if backend == "torch":
        import torch  # deferred: only on this backend

        torch.use_deterministic_algorithms(True)
        return "torch.use_deterministic_algorithms(True)"
    # XLA's CPU kernels are deterministic; on GPUs, XLA_FLAGS must be set before JAX starts.
    flags = os.environ.get("XLA_FLAGS", "")
    if "--xla_gpu_deterministic_ops" not in flags:
        os.environ["XLA_FLAGS"] = (flags + " --xla_gpu_deterministic_ops=true").strip()
    return "XLA_FLAGS=--xla_gpu_deterministic_ops=true (CPU kernels are deterministic already)"


_BACKEND_PACKAGES = {"tensorflow": ("tensorflow",), "jax": ("jax", "jaxlib"), "torch": ("torch",)}


def versions() -> dict:
    """The backend's name and the versions of its packages (read from the installed metadata: nothing is
    imported, so a JAX run never loads TensorFlow to say which version is installed)."""
    backend = keras.backend.backend()
    found = {"backend": backend}
    for package in _BACKEND_PACKAGES.get(backend, ()):
        try:
            found[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            found[package] = None
    return found
