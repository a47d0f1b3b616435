"""The distribution seam: everything that runs only under TensorFlow's distributed engine lives here, and the one
call that spreads a JAX run over devices (:func:`set_data_parallel`, ``keras.distribution.DataParallel``).

- :func:`make_strategy`: ``"default"`` (one device), ``"mirrored"`` (``tf.distribute.MirroredStrategy``:
  every GPU of this machine, or ``cpu_replicas`` logical CPU devices: how it is tested without a GPU) or
  ``"multiworker"`` (``tf.distribute.MultiWorkerMirroredStrategy``: one process per machine, the cluster in
  ``TF_CONFIG``);
- the cross-replica pieces of :class:`keras_implicit.ghost.GhostBatchModel`'s step (:func:`mean_over_replicas`,
  :func:`sum_over_replicas`, :func:`assign_on_every_replica`, :func:`replicas_in_sync`, :func:`replica_index`),
  no-ops without a strategy;
- :func:`run_epoch`: one epoch of ``model.train_step`` under ``strategy.run`` with the Keras callbacks
  (``model.fit`` is not used under a strategy: Keras 3 cannot fit under ``MultiWorkerMirroredStrategy``,
  keras-team/keras#20585);
- :func:`summed_over_replicas`: the tracker's sums over a batch split across replicas and all-reduced, so
  every worker gets the same totals (and stops at the same point);
- :func:`broadcast_from_chief`: the chief's arrays (restored weights, the plan of the run) on every worker.

Nothing outside this module (and :mod:`keras_implicit.ghost`'s TensorFlow step) touches ``tf.distribute``.
The names a :class:`~keras_implicit.training.RunConfig` accepts, and :func:`cluster_role`, are read without
importing TensorFlow.
"""

from __future__ import annotations

import os
import re
from typing import Callable, Optional

import numpy as np

from keras_implicit.config import check_divides, check_ghost_split, cluster_role  # noqa: F401  (re-exported)
from keras_implicit.names import MOVING_STATISTICS, STRATEGIES, TF_DISTRIBUTE_STRATEGIES  # noqa: F401

__all__ = [
    "split_cpu", "make_strategy", "set_data_parallel",
    "replicas_in_sync", "replica_index", "mean_over_replicas", "sum_over_replicas", "assign_on_every_replica",
    "distribute_batches", "run_epoch", "summed_over_replicas",
    "broadcast_from_chief", "WorkerLostError", "COLLECTIVE_TIMEOUT_SECONDS",
]

# How a ghost-batch step updates BatchNorm's moving statistics (keras_implicit.ghost).
# A worker that stops answering (killed, machine lost) fails the others' collectives after this long instead
# of leaving them waiting forever. Long enough for the chief's slowest pause between two steps (a checkpoint).
COLLECTIVE_TIMEOUT_SECONDS = 300


class WorkerLostError(RuntimeError):
    """A collective operation failed: another worker of a multi-worker run stopped or cannot be reached."""


def split_cpu(replicas: int) -> None:
    """Splits the CPU into ``replicas`` logical devices (before TensorFlow initializes its devices)."""
    import tensorflow as tf  # deferred: this backend only

    cpu = tf.config.list_physical_devices("CPU")[0]
    existing = tf.config.get_logical_device_configuration(cpu)
    if existing is not None and len(existing) >= int(replicas):
        return
    try:
        tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * int(replicas))
    except RuntimeError:
        raise ValueError(f"cannot split the CPU into {replicas} devices: TensorFlow has initialized its devices "
                         "already (make the strategy first, in a fresh process)") from None


def set_data_parallel(cpu_replicas: Optional[int], ghost_batch_size: int) -> int:
    """Spreads this JAX process's training over every device of the machine (``cpu_replicas`` CPU devices on a
    machine without an accelerator: ``--xla_force_host_platform_device_count``, before JAX starts its backend) with
    ``keras.distribution.DataParallel``: the variables replicated, each batch sharded on its first axis, the
    gradients all-reduced by XLA. Returns the number of devices.

    Raises ValueError when JAX has started with other devices already, or when a micro-batch of
    ``ghost_batch_size`` does not split evenly over them.
    """
    import keras  # deferred: Keras starts inside quiet_cuda_probe

    if cpu_replicas:
        flag = f"--xla_force_host_platform_device_count={int(cpu_replicas)}"
        os.environ["XLA_FLAGS"] = " ".join(part for part in (os.environ.get("XLA_FLAGS", ""), flag) if part)
    import jax  # deferred: this backend only

    devices = jax.devices()
    if cpu_replicas and len(devices) != int(cpu_replicas):
        raise ValueError(f"cpu_replicas {cpu_replicas} asks for {cpu_replicas} CPU devices, but JAX has started "
                         f"with {len(devices)} ({devices[0].platform}): start a fresh process, or leave cpu_replicas "
                         "out on a machine with accelerators")
    check_ghost_split(ghost_batch_size, len(devices))
    keras.distribution.set_distribution(keras.distribution.DataParallel(devices=devices))
    return len(devices)


def make_strategy(name: str, cpu_replicas: Optional[int] = None):
    """The ``tf.distribute`` strategy for ``name`` (see the module docstring); None for ``"default"``.

    Call it first, before any other TensorFlow work: logical CPU devices and the multi-worker runtime can
    only be set up before TensorFlow initializes its devices. Raises ValueError for ``cpu_replicas`` when the
    machine has GPUs (they would be used instead), or for an unknown name.
    """
    if name not in ("default", *TF_DISTRIBUTE_STRATEGIES):
        raise ValueError(f"unknown tf.distribute strategy {name!r}: choose one of default, "
                         f"{', '.join(TF_DISTRIBUTE_STRATEGIES)}")
    if cpu_replicas and name != "mirrored":
        raise ValueError("cpu_replicas splits this machine's CPU for strategy 'mirrored' only")
    if name == "default":
        return None
    import tensorflow as tf  # deferred: this backend only

    if cpu_replicas:
        if tf.config.list_physical_devices("GPU"):
            raise ValueError("cpu_replicas splits the CPU for machines without a GPU; this one has GPUs: leave "
                             "it out and the strategy uses every GPU")
        split_cpu(cpu_replicas)
    if name == "mirrored":
        devices = ([device.name for device in tf.config.list_logical_devices("CPU")][:int(cpu_replicas)]
                   if cpu_replicas else None)
        return tf.distribute.MirroredStrategy(devices=devices)
    options = tf.distribute.experimental.CommunicationOptions(timeout_seconds=COLLECTIVE_TIMEOUT_SECONDS)
    return tf.distribute.MultiWorkerMirroredStrategy(communication_options=options)


# --------------------------------------------------------------------------- #
# Inside a replica's step (GhostBatchModel)
# --------------------------------------------------------------------------- #
def replicas_in_sync() -> int:
    import tensorflow as tf  # deferred: this backend only

    return tf.distribute.get_strategy().num_replicas_in_sync


def replica_index():
    """This replica's index in its strategy's replicas (a tensor inside a replica's step), 0 without a strategy;
    replica ``r`` holds the ``r``-th contiguous slice of every batch (:func:`distribute_batches`)."""
    import tensorflow as tf  # deferred: this backend only

    context = tf.distribute.get_replica_context()
    return 0 if context is None else context.replica_id_in_sync_group


def sum_over_replicas(values: list) -> list:
    """The sum of each tensor over all replicas (every replica gets it); ``values`` unchanged with one."""
    import tensorflow as tf  # deferred: this backend only

    context = tf.distribute.get_replica_context()
    if not values or context is None or context.num_replicas_in_sync == 1:
        return list(values)
    return context.all_reduce(tf.distribute.ReduceOp.SUM, values)


def mean_over_replicas(values: list) -> list:
    """The mean of each tensor over all replicas (every replica gets it); ``values`` unchanged with one."""
    import tensorflow as tf  # deferred: this backend only

    context = tf.distribute.get_replica_context()
    if not values or context is None or context.num_replicas_in_sync == 1:
        return list(values)
    return context.all_reduce(tf.distribute.ReduceOp.MEAN, values)


def assign_on_every_replica(variables: list, values: list) -> None:
    """``variable.assign(value)`` on every replica's copy (from a replica's step: through a merge call)."""
    import tensorflow as tf  # deferred: this backend only

    def assign(strategy, values):
        for variable, value in zip(variables, values):
            strategy.extended.update(variable.value, lambda copy, new: copy.assign(new), args=(value,), group=False)

    tf.__internal__.distribute.interim.maybe_merge_call(assign, tf.distribute.get_strategy(), values)


# --------------------------------------------------------------------------- #
# Training and tracking under a strategy
# --------------------------------------------------------------------------- #
def distribute_batches(strategy, dataset):
    """``dataset`` (batches of the global batch size) split across the replicas: each gets a contiguous
    ``1 / replicas`` of every batch (tf.distribute's rebatching); workers share batches by data, not files."""
    import tensorflow as tf  # deferred: this backend only

    options = tf.data.Options()
    options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.DATA
    return strategy.experimental_distribute_dataset(dataset.with_options(options))


def _collective_errors():
    import tensorflow as tf  # deferred: this backend only

    return (tf.errors.UnavailableError, tf.errors.DeadlineExceededError, tf.errors.CancelledError,
            tf.errors.AbortedError, tf.errors.InternalError)


def _lost(error) -> WorkerLostError:
    text = str(error)
    peer = re.search(r"remote target (/job:\w+/replica:\d+/task:\d+)", text)
    lines = [line.strip() for line in text.splitlines() if line.strip() and "execution error" not in line]
    what = f"no answer from {peer.group(1)}" if peer else (lines[0][:200] if lines else "")
    return WorkerLostError(f"a collective operation failed ({type(error).__name__}: {what}): another worker "
                           "stopped or cannot be reached")


def _step_function(model, strategy):
    import tensorflow as tf  # deferred: this backend only

    step = getattr(model, "_keras_implicit_distributed_step", None)
    if step is not None:
        return step

    @tf.function
    def step(batch):
        logs = strategy.run(model.train_step, args=(batch,))
        return {name: strategy.reduce(tf.distribute.ReduceOp.MEAN, value, axis=None) for name, value in logs.items()}

    model._keras_implicit_distributed_step = step
    return step


def run_epoch(model, strategy, dataset, callbacks, epoch: int, steps: int) -> None:
    """One epoch of ``model.train_step`` on ``dataset`` (global batches) under ``strategy``, with the
    Keras callbacks called as ``model.fit`` calls them (batch and epoch hooks, ``model.stop_training``).

    Raises WorkerLostError when a collective fails (another worker is gone).
    """
    import keras  # deferred: this module is imported before Keras picks its backend

    callback_list = keras.callbacks.CallbackList(callbacks, model=model, add_history=False, add_progbar=False,
                                                 verbose=0, epochs=epoch + 1, steps=steps)
    step = _step_function(model, strategy)
    model.stop_training = False
    model.reset_metrics()  # the step's logs are running means over the epoch, as in model.fit
    try:
        callback_list.on_train_begin()
        callback_list.on_epoch_begin(epoch)
        logs = {}
        for index, batch in enumerate(distribute_batches(strategy, dataset)):
            callback_list.on_train_batch_begin(index)
            logs = {name: float(value) for name, value in step(batch).items()}
            callback_list.on_train_batch_end(index, logs)
            if model.stop_training:
                break
        callback_list.on_epoch_end(epoch, logs)
        callback_list.on_train_end(logs)
    except _collective_errors() as error:
        raise _lost(error) from None


def summed_over_replicas(strategy, model, fn: Callable) -> Callable:
    """``run(x, y, *per_example)`` = ``fn(*model(x, training=False), y, *per_example)`` where ``fn`` returns sums
    over the batch: the batch (``x``, ``y`` and every ``per_example`` tensor) is cut into one contiguous part per
    replica and the parts' sums are added over all replicas (every worker gets the total)."""
    import tensorflow as tf  # deferred: this backend only

    replicas = strategy.num_replicas_in_sync

    @tf.function(reduce_retracing=True)
    def replica_sums(x, y, *per_example):
        return fn(*model(x, training=False), y, *per_example)

    @tf.function(reduce_retracing=True)
    def run(x, y, *per_example):
        size = tf.shape(x)[0]

        def part(context):
            start = size * context.replica_id_in_sync_group // replicas
            end = size * (context.replica_id_in_sync_group + 1) // replicas
            return tuple(t[start:end] for t in (x, y, *per_example))

        parts = strategy.experimental_distribute_values_from_function(part)
        sums = strategy.run(replica_sums, args=parts)
        return strategy.reduce(tf.distribute.ReduceOp.SUM, sums, axis=None)

    def guarded(x, y, *per_example):
        try:
            return run(x, y, *per_example)
        except _collective_errors() as error:
            raise _lost(error) from None

    return guarded


def broadcast_from_chief(strategy, arrays: list) -> list:
    """The chief's ``arrays`` (NumPy) on every worker of a multi-worker strategy; ``arrays`` unchanged with one
    worker. Every worker must call it with arrays of the same shapes and dtypes (its own values are ignored)."""
    if strategy is None or cluster_role()[0] == 1:
        return arrays
    import tensorflow as tf  # deferred: this backend only

    dtypes = [np.asarray(a).dtype for a in arrays]

    def contribute(*values):
        context = tf.distribute.get_replica_context()
        first = tf.equal(context.replica_id_in_sync_group, 0)  # replica 0 lives on the chief
        return context.all_reduce(tf.distribute.ReduceOp.SUM,
                                  [tf.where(first, v, tf.zeros_like(v)) for v in values])

    try:
        summed = strategy.run(tf.function(contribute),
                              args=tuple(tf.constant(np.asarray(a, np.float64)) for a in arrays))
    except _collective_errors() as error:
        raise _lost(error) from None
    return [np.asarray(strategy.experimental_local_results(s)[0]).astype(dtype) for s, dtype in zip(summed, dtypes)]
