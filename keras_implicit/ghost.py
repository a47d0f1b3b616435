"""Ghost batches (the paper's section 4.2): large batches whose BatchNorm statistics come from micro-batches.

A batch of ``B`` examples is applied as ``B / ghost_batch_size`` micro-batches (on ``R`` replicas of a
``tf.distribute`` strategy, ``B / (R * ghost_batch_size)`` per replica, each replica holding a contiguous
``B / R`` slice of the batch):

- each micro-batch goes through the network on its own, so every BatchNormalization normalizes with
  the mean and variance of ``ghost_batch_size`` examples, whatever ``B`` and ``R`` are;
- the gradients of all micro-batches (of all replicas) are averaged, and the optimizer takes **one step
  per batch** with that mean (the gradient of the mean loss over the batch): ``optimizer.iterations``
  counts batches;
- BatchNorm's moving mean and variance (every float non-trainable variable) take **one moving-average
  update per micro-batch, in order** (``moving_statistics="sequential"``, the default): the values a sequence
  of ``B / ghost_batch_size`` training steps on the micro-batches would leave, as in the paper ("the
  gradients are accumulated on a sequence of smaller mini-batches of size 256") and in Hoffer et al.'s ghost
  batch norm. On ``R`` replicas each replica runs its micro-batches in order from the step's initial values,
  and the replicas' results are composed in the order of their slices,
  ``moving = m**(RK) * moving0 + sum_r m**((R - 1 - r) K) * (f_r - m**K * moving0)`` for a BatchNormalization of
  momentum ``m`` whose replica ``r`` ended its ``K`` micro-batches at ``f_r``, so 1 device and N replicas end
  with the same moving statistics on every replica. ``moving_statistics="mean"`` takes one update per step with
  the mean of the micro-batches' moments instead, ``moving = m * moving + (1 - m) * mean_k(stat_k)``, as tf.keras
  2's ``BatchNormalization(virtual_batch_size=...)`` did: its moving statistics warm up ``B / ghost_batch_size``
  times more slowly per example seen, which matters to everything measured in inference mode while a large-batch
  run has taken few steps (docs/REPRODUCTION.md). Other float non-trainable variables (no momentum known) are
  carried in order on one device and averaged over replicas. Non-float state (random seeds) is carried from one
  micro-batch to the next.

**Explicit regularizers, per micro-batch** (the gradient that enters the mean above, for micro-batch ``k`` with
loss ``L_k`` at the weights ``w``):

- ``gradient_penalty=lambda``: ``grad (L_k + lambda ||grad L_k||^2)``, by double backpropagation (a gradient tape
  inside a gradient tape on TensorFlow, ``jax.grad`` of a function holding ``jax.grad`` on JAX), the norm over
  every trainable variable (the loss is then computed on the ``keras.ops`` path, since the fused kernels have no
  second derivative): the micro-batch gradient-norm penalty of Smith et al. (2021) and Novack et al. (2023),
  whose "implicit" value is ``lambda = lr / 4``;
- ``sam_radius=rho``: ``grad L_k`` at ``w + rho g_k / ||g_k||`` with ``g_k = grad L_k(w)``: sharpness-aware
  minimization (Foret et al., 2021) with one ascent per micro-batch (m-sharpness, ``m = ghost_batch_size``). Both
  passes are in training mode (BatchNorm normalizes with the micro-batch's statistics); the moving statistics
  take the first pass's update only, and the logged loss and metrics are the first pass's, at ``w``.

The logged loss is ``L_k``'s mean, without the penalty. A batch of one micro-batch takes this step too (Keras' own
step has no regularizer).

Micro-batches run one after another (a ``tf.while_loop`` / ``jax.lax.scan``): memory is that of one
micro-batch, whatever the batch size. Keras 3's ``BatchNormalization`` has no ``virtual_batch_size`` and its
optimizer's ``gradient_accumulation_steps`` fails under ``tf.distribute.MirroredStrategy``, hence this
class. TensorFlow and JAX are supported.

Example:
    >>> model = ghost_batch_model(make_model("fc6", (28, 28, 1), 10, seed=0), ghost_batch_size=256)
    >>> model.compile(keras.optimizers.SGD(0.1, momentum=0.9),
    ...               keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    >>> model.fit(x, y, batch_size=4096, shuffle=False)  # 16 micro-batches of 256 per optimizer step
"""

from __future__ import annotations

import math

import keras

from keras_implicit import _dispatch, _distribute
from keras_implicit.config import check_divides
from keras_implicit.names import MOVING_STATISTICS

__all__ = ["GhostBatchModel", "ghost_batch_model", "check_divides", "MOVING_STATISTICS"]


@keras.saving.register_keras_serializable(package="keras_implicit")
class GhostBatchModel(keras.Model):
    """A functional model whose ``train_step`` applies each batch as micro-batches of ``ghost_batch_size``
    (see the module docstring). Build it with :func:`ghost_batch_model`, or as
    ``GhostBatchModel(inputs, outputs, ghost_batch_size=256)``.

    Args:
        ghost_batch_size: examples per micro-batch (what BatchNorm normalizes). Each replica's batch
            must be a whole number of micro-batches (:func:`check_divides`).
        moving_statistics: ``"sequential"`` or ``"mean"``: how BatchNorm's moving statistics are updated (see
            the module docstring).
        gradient_penalty: lambda >= 0 of the micro-batch gradient-norm penalty (0: off).
        sam_radius: rho >= 0 of SAM per micro-batch (0: off). At most one of the two is on.
        *args, **kwargs: those of a functional ``keras.Model`` (``inputs``, ``outputs``, ``name``).
    """

    def __init__(self, *args, ghost_batch_size: int = 256, moving_statistics: str = "sequential",
                 gradient_penalty: float = 0.0, sam_radius: float = 0.0, **kwargs):
        super().__init__(*args, **kwargs)
        for name, value in (("gradient_penalty", gradient_penalty), ("sam_radius", sam_radius)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not (
                    math.isfinite(value) and value >= 0):
                raise ValueError(f"{name} must be a finite number >= 0 (0: off), got {value!r}")
        if gradient_penalty and sam_radius:
            raise ValueError("give gradient_penalty or sam_radius, not both")
        if int(ghost_batch_size) < 1:
            raise ValueError(f"ghost_batch_size must be >= 1, got {ghost_batch_size!r}")
        if moving_statistics not in MOVING_STATISTICS:
            raise ValueError(f"moving_statistics must be one of {', '.join(MOVING_STATISTICS)}, got "
                             f"{moving_statistics!r}")
        if keras.backend.backend() not in ("tensorflow", "jax"):
            raise ValueError(f"ghost batches run on the tensorflow and jax backends, not {keras.backend.backend()}")
        self.ghost_batch_size = int(ghost_batch_size)
        self.moving_statistics = moving_statistics
        self.gradient_penalty = float(gradient_penalty)
        self.sam_radius = float(sam_radius)

    def get_config(self):
        return {**super().get_config(), "ghost_batch_size": self.ghost_batch_size,
                "moving_statistics": self.moving_statistics, "gradient_penalty": self.gradient_penalty,
                "sam_radius": self.sam_radius}

    @classmethod
    def from_config(cls, config, custom_objects=None):
        config = dict(config)
        ghost_batch_size = config.pop("ghost_batch_size", 256)
        moving_statistics = config.pop("moving_statistics", "sequential")
        regularizers = {name: config.pop(name, 0.0) for name in ("gradient_penalty", "sam_radius")}
        return ghost_batch_model(keras.Model.from_config(config, custom_objects=custom_objects), ghost_batch_size,
                                 moving_statistics, **regularizers)

    def _floats(self):
        return [keras.backend.is_float_dtype(v.dtype) for v in self.non_trainable_variables]

    def _carried(self):
        """Which non-trainable variables a micro-batch takes from the one before it (the others start from the
        step's initial values): non-float state always, float state too when updates are sequential."""
        sequential = self.moving_statistics == "sequential"
        return [sequential or not f for f in self._floats()]

    def _momenta(self):
        """Each non-trainable variable's moving-average momentum: its BatchNormalization's, or None."""
        momenta, layers = {}, list(self.layers)
        while layers:
            layer = layers.pop()
            layers.extend(getattr(layer, "layers", []))  # nested models
            momentum = getattr(layer, "momentum", None)
            for name in ("moving_mean", "moving_variance"):
                variable = getattr(layer, name, None)
                if momentum is not None and variable is not None:
                    momenta[id(variable)] = float(momentum)
        return [momenta.get(id(v)) for v in self.non_trainable_variables]

    def train_step(self, *args):
        x = keras.utils.unpack_x_y_sample_weight(args[-1])[0]
        if _leading_dimension(x) == self.ghost_batch_size and _one_replica() and not self._regularized():
            # One micro-batch on one device: Keras' own step is the same step (one moving-average update with
            # the micro-batch's moments), without the loop's overhead (run.py's default, batch 256).
            return super().train_step(*args)
        if keras.backend.backend() == "jax":
            return self._jax_train_step(*args)
        return self._tf_train_step(*args)

    def _regularized(self) -> bool:
        return bool(self.gradient_penalty or self.sam_radius)

    def _output_dtypes(self):
        return [output.dtype for output in self.outputs]

    def _predictions(self, flat):
        """The model's output structure (one tensor, a list, a dict) from its flat list of outputs."""
        return keras.tree.pack_sequence_as(self.output, list(flat))

    # ------------------------------------------------------------------ #
    def _tf_train_step(self, data):
        import tensorflow as tf  # deferred: this backend only

        x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(data)
        micro = self.ghost_batch_size
        message = f"a replica's batch is not a whole number of micro-batches of {micro} (see check_divides)"
        first = keras.tree.flatten(x)[0]
        if first.shape[0] is not None and first.shape[0] % micro:
            raise ValueError(f"{message}: it holds {first.shape[0]} examples")
        size = tf.shape(first)[0]
        tf.debugging.assert_equal(size % micro, 0, message=message)
        count = size // micro

        def split(structure):
            if structure is None:
                return None
            return tf.nest.map_structure(
                lambda t: tf.reshape(t, tf.concat([[count, micro], tf.shape(t)[1:]], 0)), structure)

        def part(structure, index):
            return None if structure is None else tf.nest.map_structure(lambda t: t[index], structure)

        xs, ys, weights = split(x), split(y), split(sample_weight)
        trainable = [v.value for v in self.trainable_variables]
        initial = [v.value for v in self.non_trainable_variables]
        floats = self._floats()

        carried = self._carried()

        def micro_batch(index, gradient_sums, state, state_sums, loss_sum, predictions):
            inputs = [c if k else s for s, c, k in zip(initial, state, carried)]
            x_micro, y_micro, weight_micro = part(xs, index), part(ys, index), part(weights, index)

            def forward(weights_now):
                y_pred, updated = self.stateless_call(weights_now, inputs, x_micro, training=True)
                loss = self._compute_loss(x=x_micro, y=y_micro, y_pred=y_pred, sample_weight=weight_micro,
                                          training=True)
                return y_pred, updated, loss

            with tf.GradientTape() as tape:
                tape.watch(trainable)
                if self.gradient_penalty:
                    with tf.GradientTape() as inner, _dispatch.force_path("keras"):
                        inner.watch(trainable)
                        y_pred, updated, loss = forward(trainable)
                    inner_gradients = inner.gradient(loss, trainable, unconnected_gradients="zero")
                    # compute_loss divided the loss by the R replicas: R ||grad(L / R)||^2 = ||grad L||^2 / R,
                    # which the sum over replicas makes lambda ||grad L||^2.
                    penalty = _squared_norm(inner_gradients) * tf.cast(_distribute.replicas_in_sync(), loss.dtype)
                    scaled = self.optimizer.scale_loss(loss + tf.cast(self.gradient_penalty, loss.dtype) * penalty)
                else:
                    y_pred, updated, loss = forward(trainable)
                    scaled = self.optimizer.scale_loss(loss)
            gradients = tape.gradient(scaled, trainable)
            if self.sam_radius:
                step = tf.cast(self.sam_radius, "float32") / (tf.sqrt(_squared_norm(gradients)) + 1e-12)
                perturbed = [w + tf.cast(step, g.dtype) * g for w, g in zip(trainable, gradients)]
                with tf.GradientTape() as ascent:
                    ascent.watch(perturbed)
                    _, _, perturbed_loss = forward(perturbed)  # its moving statistics are not kept
                    scaled = self.optimizer.scale_loss(perturbed_loss)
                gradients = ascent.gradient(scaled, perturbed)
            predictions = [array.write(index, value) for array, value in zip(predictions, tf.nest.flatten(y_pred))]
            return (index + 1, [a + b for a, b in zip(gradient_sums, gradients)], list(updated),
                    [a + b for a, b in zip(state_sums, updated)], loss_sum + tf.cast(loss, "float32"), predictions)

        zeros = [tf.zeros_like(v) for v in trainable]
        arrays = [tf.TensorArray(dtype, size=count) for dtype in self._output_dtypes()]
        _, gradient_sums, state, state_sums, loss_sum, arrays = tf.while_loop(
            lambda index, *_: index < count, micro_batch,
            (tf.constant(0), zeros, initial, [tf.zeros_like(v) for v in initial], tf.zeros((), "float32"), arrays))
        gradients = [g / tf.cast(count, g.dtype) for g in gradient_sums]
        # compute_loss divides by the number of replicas and the optimizer sums over them: the mean gradient.
        self.optimizer.apply_gradients(zip(gradients, self.trainable_variables))
        if self.moving_statistics == "sequential":
            final = _compose_replicas(initial, state, floats, self._momenta(), count)
        else:
            means = iter(_distribute.mean_over_replicas(
                [t / tf.cast(count, t.dtype) for t, f in zip(state_sums, floats) if f]))
            final = [next(means) if f else s for s, f in zip(state, floats)]
        _distribute.assign_on_every_replica(self.non_trainable_variables, final)
        # The replica's mean loss, unscaled (compute_loss divided it by the number of replicas).
        loss = loss_sum / tf.cast(count, "float32") * _distribute.replicas_in_sync()
        y_pred = self._predictions([array.concat() for array in arrays])
        return self._logs(loss, size, x, y, y_pred, sample_weight)

    def _logs(self, loss, size, x, y, y_pred, sample_weight):
        """What Keras' own step returns: the loss tracker and the compiled metrics, on the micro-batches'
        training-mode outputs of the whole batch."""
        tracker = getattr(self, "_loss_tracker", None)
        if tracker is not None:
            tracker.update_state(loss, sample_weight=size)
        return self.compute_metrics(x, y, y_pred, sample_weight=sample_weight)

    # ------------------------------------------------------------------ #
    def _jax_train_step(self, state, data):
        import jax  # deferred: this backend only
        import jax.numpy as jnp  # deferred: this backend only

        trainable, non_trainable, optimizer_variables, metrics_variables = state
        x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(data)
        micro = self.ghost_batch_size
        size = _leading_dimension(x)
        if size % micro:
            raise ValueError(f"a batch of {size} is not a whole number of micro-batches of {micro} "
                             "(see check_divides)")
        count = size // micro
        xs, ys, weights = jax.tree_util.tree_map(lambda t: jnp.reshape(t, (count, micro) + tuple(t.shape[1:])),
                                                 (x, y, sample_weight))
        floats, carried_state = self._floats(), self._carried()
        optimizer_mapping = list(zip(self.optimizer.variables, optimizer_variables))

        def loss_and_state(trainable, inputs, metrics_variables, x_micro, y_micro, weight_micro):
            y_pred, updated = self.stateless_call(trainable, inputs, x_micro, training=True)
            loss, (_, updated, metrics_variables) = self.stateless_compute_loss(
                trainable, updated, metrics_variables, x=x_micro, y=y_micro, y_pred=y_pred,
                sample_weight=weight_micro, training=True)
            with keras.StatelessScope(state_mapping=optimizer_mapping):
                scaled = self.optimizer.scale_loss(loss)
            return scaled, (loss, updated, metrics_variables, y_pred)

        gradient_of = jax.value_and_grad(loss_and_state, has_aux=True)
        penalty = self.gradient_penalty

        def penalized(trainable, inputs, metrics_variables, x_micro, y_micro, weight_micro):
            def loss_only(weights_now):
                with _dispatch.force_path("keras"):  # the fused kernels have no second derivative
                    _, aux = loss_and_state(weights_now, inputs, metrics_variables, x_micro, y_micro, weight_micro)
                return aux[0], aux

            inner_gradients, aux = jax.grad(loss_only, has_aux=True)(trainable)
            total = aux[0] + jnp.asarray(penalty, aux[0].dtype) * _squared_norm(inner_gradients)
            with keras.StatelessScope(state_mapping=optimizer_mapping):
                scaled = self.optimizer.scale_loss(total)
            return scaled, aux

        if penalty:
            gradient_of = jax.value_and_grad(penalized, has_aux=True)

        def micro_batch(carry, batch):
            gradient_sums, carried, state_sums, loss_sum, metrics_variables = carry
            inputs = [c if k else s for s, c, k in zip(non_trainable, carried, carried_state)]
            (_, (loss, updated, metrics_variables_after, y_pred)), gradients = gradient_of(
                trainable, inputs, metrics_variables, *batch)
            if self.sam_radius:
                step = self.sam_radius / (jnp.sqrt(_squared_norm(gradients)) + 1e-12)
                perturbed = [w + (step * g).astype(g.dtype) for w, g in zip(trainable, gradients)]
                # SAM and the penalty exclusive: gradient_of is the plain loss's here; its state is not kept.
                _, gradients = gradient_of(perturbed, inputs, metrics_variables, *batch)
            metrics_variables = metrics_variables_after
            carry = ([a + b for a, b in zip(gradient_sums, gradients)], list(updated),
                     [a + b for a, b in zip(state_sums, updated)], loss_sum + loss.astype("float32"),
                     metrics_variables)
            return carry, y_pred

        start = ([jnp.zeros_like(v) for v in trainable], list(non_trainable),
                 [jnp.zeros_like(v) for v in non_trainable], jnp.zeros((), "float32"), list(metrics_variables))
        (gradient_sums, carried, state_sums, loss_sum, metrics_variables), y_pred = jax.lax.scan(
            micro_batch, start, (xs, ys, weights))
        gradients = [g / count for g in gradient_sums]
        trainable, optimizer_variables = self.optimizer.stateless_apply(optimizer_variables, gradients, trainable)
        if self.moving_statistics == "sequential":  # one device: the state carried through the micro-batches
            non_trainable = list(carried)
        else:
            non_trainable = [(t / count).astype(t.dtype) if f else c for t, c, f in zip(state_sums, carried, floats)]
        y_pred = jax.tree_util.tree_map(lambda t: jnp.reshape(t, (size,) + tuple(t.shape[2:])), y_pred)
        with keras.StatelessScope(state_mapping=list(zip(self.metrics_variables, metrics_variables))) as scope:
            logs = self._logs(loss_sum / count, size, x, y, y_pred, sample_weight)
        metrics_variables = [value if scope.get_current_value(v) is None else scope.get_current_value(v)
                             for v, value in zip(self.metrics_variables, metrics_variables)]
        return logs, (trainable, non_trainable, optimizer_variables, metrics_variables)


def _squared_norm(gradients):
    """``sum ||g||^2`` over a list of gradients, in float32 (TensorFlow or JAX arrays)."""
    return sum(keras.ops.sum(keras.ops.square(keras.ops.cast(g, "float32"))) for g in gradients)


def _leading_dimension(x):
    """The (static, where known) batch size of ``x``: its first array's first dimension."""
    return keras.tree.flatten(x)[0].shape[0]


def _one_replica() -> bool:
    if keras.backend.backend() != "tensorflow":
        return True

    return _distribute.replicas_in_sync() == 1


def _compose_replicas(initial, state, floats, momenta, count):
    """The moving statistics after every replica's micro-batches in the order of the replicas' slices, on every
    replica (see the module docstring): ``state`` is this replica's values after its ``count`` micro-batches run in
    order from ``initial``."""
    import tensorflow as tf  # deferred: this backend only

    replicas = _distribute.replicas_in_sync()
    if replicas == 1:
        return list(state)
    index = _distribute.replica_index()
    composed, averaged = [], []
    for start, end, f, m in zip(initial, state, floats, momenta):
        if f and m is not None:
            decay = tf.cast(m, end.dtype) ** tf.cast(count, end.dtype)  # m**K: one replica's K updates
            later = tf.cast(replicas - 1 - index, end.dtype)
            composed.append(decay ** later * (end - decay * start))
        elif f:
            averaged.append(end)
    composed, averaged = iter(_distribute.sum_over_replicas(composed)), iter(_distribute.mean_over_replicas(averaged))
    final = []
    for start, end, f, m in zip(initial, state, floats, momenta):
        if f and m is not None:
            total = tf.cast(m, end.dtype) ** tf.cast(count * replicas, end.dtype)
            final.append(total * start + next(composed))
        else:
            final.append(next(averaged) if f else end)
    return final


def ghost_batch_model(model: keras.Model, ghost_batch_size: int, moving_statistics: str = "sequential",
                      gradient_penalty: float = 0.0, sam_radius: float = 0.0) -> GhostBatchModel:
    """A :class:`GhostBatchModel` over the layers of the functional ``model`` (the same weights, shared).

    Args:
        model: a functional ``keras.Model`` (as :func:`keras_implicit.models.make_model` returns), or a
            ``keras.Sequential`` built on a ``keras.Input``.
        ghost_batch_size: examples per micro-batch.
        moving_statistics: ``"sequential"`` (one moving-average update per micro-batch, in order; the paper's
            sequence of mini-batches) or ``"mean"`` (one per step with the micro-batches' mean moments; tf.keras
            2's ``virtual_batch_size``). See the module docstring.
        gradient_penalty: lambda >= 0 of the gradient-norm penalty per micro-batch (0: off).
        sam_radius: rho >= 0 of SAM per micro-batch (0: off).

    Returns:
        The model to compile and fit; ``model`` itself is unchanged and shares its variables.
    """
    if not getattr(model, "inputs", None):
        raise ValueError("ghost_batch_model needs a functional model, or a Sequential one built on keras.Input, with "
                         "known inputs (make_model returns one)")
    if isinstance(model, keras.Sequential):  # one input, one output; Sequential has no model.input/.output
        inputs, outputs = model.inputs[0], model.outputs[0]
    else:
        # The structures the model was built with (a tensor, a list, a dict of outputs), so that losses and
        # metrics compiled per output name find their outputs.
        inputs, outputs = model.input, model.output
    return GhostBatchModel(inputs, outputs, name=model.name, ghost_batch_size=ghost_batch_size,
                           moving_statistics=moving_statistics, gradient_penalty=gradient_penalty,
                           sam_radius=sam_radius)
