"""GhostBatchModel (keras_implicit/ghost.py) against independent references: Keras' own step on the whole
batch (no BatchNorm), per-micro-batch gradients from plain training-mode calls, and the moving statistics
computed in NumPy. Runs on TensorFlow and on JAX (.ci/run runs this file on both backends)."""

import keras
import numpy as np
import pytest

from keras_implicit import ghost, training
from keras_implicit._distribute import check_divides

LOSS = keras.losses.SparseCategoricalCrossentropy(from_logits=True)


def _mlp(seed, batch_norm=False, dropout=False):
    keras.utils.set_random_seed(seed)
    inputs = keras.Input((20,))
    x = keras.layers.Dense(32, name="dense")(inputs)
    if batch_norm:
        x = keras.layers.BatchNormalization(name="batch_norm")(x)
    x = keras.layers.ReLU()(x)
    if dropout:
        x = keras.layers.Dropout(0.5, seed=seed)(x)
    return keras.Model(inputs, keras.layers.Dense(10, name="top")(x))


def _data(count, seed=0):
    rng = np.random.default_rng(seed)
    x = (rng.normal(size=(count, 20)) * rng.uniform(0.5, 3, (count, 1))).astype(np.float32)
    return x, rng.integers(0, 10, count).astype(np.int32)


def _weight_gradients(model, x, y, penalty=0.0):
    """d (L + penalty ||dL/dw||^2) / dw, L the mean loss of a training-mode call on (x, y), by the backend's
    autodiff on the plain model (with a penalty, nested: a gradient tape in a gradient tape, jax.grad in
    jax.grad)."""
    trainable = [v.value for v in model.trainable_variables]
    non_trainable = [v.value for v in model.non_trainable_variables]
    if keras.backend.backend() == "jax":
        import jax
        import jax.numpy as jnp

        def value(weights):
            outputs, _ = model.stateless_call(weights, non_trainable, x, training=True)
            return LOSS(y, outputs)

        def penalized(weights):
            return value(weights) + penalty * sum(jnp.sum(g ** 2) for g in jax.grad(value)(weights))

        return [np.asarray(g) for g in jax.grad(penalized if penalty else value)(trainable)]
    import tensorflow as tf

    with tf.GradientTape() as outer:
        with tf.GradientTape() as inner:
            loss = LOSS(y, model(x, training=True))
        total = loss
        if penalty:
            gradients = inner.gradient(loss, model.trainable_variables)
            total = loss + penalty * tf.add_n([tf.reduce_sum(g ** 2) for g in gradients])
    return [g.numpy() for g in outer.gradient(total, model.trainable_variables)]


F32 = float(np.finfo(np.float32).eps)


def _gradient_rounding(model, x, y, ghost_batch_size):
    """A per-entry bound on the float32 rounding of the batch gradient: 32 eps times the mean of the micro-batch
    gradients' magnitudes (the terms the two orders of summation add up; 32 covers a summation tree of depth
    log2(1024) = 10, three times over), with the tensor's mean magnitude as a floor. Summation order differs
    between CPUs (oneDNN / Eigen pick other kernels on AMD than on Intel), so this, not a constant, is what the
    micro-batch step can be asked to equal."""
    parts = [_weight_gradients(model, x[k:k + ghost_batch_size], y[k:k + ghost_batch_size])
             for k in range(0, len(x), ghost_batch_size)]
    bounds = []
    for i in range(len(parts[0])):
        magnitude = np.mean([np.abs(p[i]) for p in parts], axis=0)
        # Plus the tensor's typical magnitude: an entry whose terms cancel (a bias at 0, say) still rounds at the
        # scale of the products summed into it (about eps times the tensor's typical |g_k|).
        bounds.append(32 * F32 * (magnitude + magnitude.mean()))
    return bounds


@pytest.mark.parametrize("batch_size, ghost_batch_size", [(1024, 256), (768, 128), (512, 512)])
def test_the_accumulated_gradient_is_the_batch_gradient(batch_size, ghost_batch_size):
    """One plain SGD step of rate 1 moves the weights by minus the accumulated gradient: it equals the batch's
    gradient up to float32 rounding (per entry, :func:`_gradient_rounding`)."""
    x, y = _data(batch_size)
    micro = ghost.ghost_batch_model(_mlp(1), ghost_batch_size)
    micro.compile(keras.optimizers.SGD(learning_rate=1.0), LOSS)
    initial = [np.asarray(w) for w in micro.trainable_weights]
    reference = _weight_gradients(_mlp(1), x, y)
    rounding = _gradient_rounding(_mlp(1), x, y, ghost_batch_size)
    micro.fit(x, y, batch_size=batch_size, epochs=1, shuffle=False, verbose=0)
    for w0, w1, g, bound in zip(initial, micro.trainable_weights, reference, rounding):
        accumulated = w0 - np.asarray(w1)
        # The subtraction w0 - w1 rounds too: a few eps of |w0|.
        np.testing.assert_array_less(np.abs(accumulated - g), bound + 4 * F32 * np.abs(w0) + 1e-12)
        assert np.abs(g).max() > 1e-3  # a real gradient


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
@pytest.mark.parametrize("batch_size, ghost_batch_size", [(1024, 256), (768, 128), (512, 512)])
def test_without_batch_norm_micro_batches_equal_one_step_on_the_batch(optimizer, batch_size, ghost_batch_size):
    """Three optimizer steps on micro-batches leave the weights of three steps on the whole batches.

    SGD's update is linear in the gradient: a constant relative tolerance holds. Adam's update
    lr * m_hat / (sqrt(v_hat) + eps) divides by sqrt(v_hat): an entry whose gradient is near zero turns a rounding
    difference dg of the gradient into a change of up to about lr * |dg| / (sqrt(v_hat) + eps) of its step (the
    first-order terms through m and v, each at most 1 in units of that). The tolerance is the sum of these over
    the steps with dg from :func:`_gradient_rounding`, doubled for the weights' own differences feeding back
    into later gradients."""
    x, y = _data(3 * batch_size)
    micro, whole = ghost.ghost_batch_model(_mlp(1), ghost_batch_size), _mlp(1)
    for a, b in zip(micro.weights, whole.weights):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    lr = 0.05
    micro.compile(training.make_optimizer(optimizer, lr), LOSS)
    whole.compile(training.make_optimizer(optimizer, lr), LOSS)
    tolerance = [np.zeros(w.shape, np.float64) for w in whole.trainable_weights]
    for step in range(3):
        batch = slice(step * batch_size, (step + 1) * batch_size)
        if optimizer == "adam":
            rounding = _gradient_rounding(whole, x[batch], y[batch], ghost_batch_size)
        micro.fit(x[batch], y[batch], batch_size=batch_size, epochs=1, shuffle=False, verbose=0)
        whole.fit(x[batch], y[batch], batch_size=batch_size, epochs=1, shuffle=False, verbose=0)
        if optimizer == "adam":
            optimizer_state = whole.optimizer
            t = step + 1
            velocities = {v.path: np.asarray(v) for v in optimizer_state.variables if v.path.endswith("_velocity")}
            for i, weight in enumerate(whole.trainable_weights):
                velocity = next(value for path, value in velocities.items()
                                if path.endswith(weight.path.replace("/", "_") + "_velocity"))
                v_hat = velocity / (1 - optimizer_state.beta_2 ** t)
                epsilon = optimizer_state.epsilon / np.sqrt(1 - optimizer_state.beta_2 ** t)  # Keras' form
                tolerance[i] += 2 * 2 * lr * rounding[i] / (np.sqrt(v_hat) + epsilon)
    # Three updates each: iterations counts batches (momentum / Adam's bias correction too).
    assert int(np.asarray(micro.optimizer.iterations)) == int(np.asarray(whole.optimizer.iterations)) == 3
    moved = 0.0
    for initial, a, b, bound in zip(_mlp(1).trainable_weights, micro.trainable_weights, whole.trainable_weights,
                                    tolerance):
        a, b = np.asarray(a), np.asarray(b)
        if optimizer == "sgd":
            np.testing.assert_allclose(a, b, rtol=2e-5, atol=2e-6)
        else:
            np.testing.assert_array_less(np.abs(a - b), bound + 4 * F32 * np.abs(b) + 1e-12)
        moved = max(moved, float(np.abs(a - np.asarray(initial)).max()))
    assert moved > 1e-2  # the steps were real


@pytest.mark.parametrize("weighting", ["none", "sample_weight", "zero_weight"])
def test_in_a_users_fit_logs_metrics_and_sample_weights_are_those_of_keras_own_step(weighting):
    """Without BatchNorm the micro-batch step is Keras' own step on the batch: the same History (the loss
    tracker's running mean, compiled metrics, sample weights), the same weights after it."""
    import keras_implicit as ki

    x, y = _data(4 * 512, seed=3)
    weights = {"none": None, "sample_weight": np.random.default_rng(4).uniform(0, 2, len(x)).astype(np.float32),
               "zero_weight": np.zeros(len(x), np.float32)}[weighting]
    histories, models = [], []
    for model in (ghost.ghost_batch_model(_mlp(8), 128), _mlp(8)):
        model.compile(training.make_optimizer("sgd", 0.1), LOSS,
                      metrics=["accuracy", ki.alt_loss_panel(sigmas=[0.5, 4], temperatures=[2], margins=[1])])
        histories.append(model.fit(x, y, sample_weight=weights, batch_size=512, epochs=2, shuffle=False,
                                   verbose=0).history)
        models.append(model)
    micro, whole = histories
    assert set(micro) == set(whole) and {"loss", "accuracy", "gcdf@0.5", "tce@2", "hinge@1", "error"} <= set(micro)
    for name in whole:
        np.testing.assert_allclose(micro[name], whole[name], rtol=2e-5, atol=1e-6, err_msg=name)
    if weighting == "zero_weight":
        assert micro["loss"] == [0.0, 0.0]
    else:
        assert min(micro["loss"]) > 1.0  # a real loss (the ghost step used to log 0.0)
    for a, b, initial in zip(models[0].weights, models[1].weights, _mlp(8).weights):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=2e-5, atol=2e-6)
        if weighting == "zero_weight":
            np.testing.assert_array_equal(np.asarray(a), np.asarray(initial))


def test_a_model_with_named_outputs_keeps_them_and_takes_keras_own_step():
    """Losses and metrics compiled per output name (a dict of outputs) find their outputs in the ghost model, and
    without BatchNorm its step is Keras' own."""
    import keras_implicit as ki

    def two_heads(seed):
        keras.utils.set_random_seed(seed)
        inputs = keras.Input((20,))
        hidden = keras.layers.Dense(16, activation="relu")(inputs)
        return keras.Model(inputs, {"digit": keras.layers.Dense(10)(hidden), "parity": keras.layers.Dense(2)(hidden)})

    x, y = _data(512, seed=5)
    labels = {"digit": y, "parity": y % 2}
    histories, models = [], []
    for model in (ghost.ghost_batch_model(two_heads(2), 64), two_heads(2)):
        assert isinstance(model.output, dict) and sorted(model.output) == ["digit", "parity"]
        model.compile(training.make_optimizer("sgd", 0.1),
                      {"digit": LOSS, "parity": ki.losses.MulticlassHinge(margin=1.0)},
                      metrics={"digit": [ki.metrics.Gcdf(1.0)], "parity": ["accuracy"]})
        histories.append(model.fit(x, labels, batch_size=256, epochs=2, shuffle=False, verbose=0).history)
        models.append(model)
    micro, whole = histories
    assert set(micro) == set(whole) >= {"loss", "digit_loss", "parity_loss", "digit_gcdf@1", "parity_accuracy"}
    for name in whole:
        np.testing.assert_allclose(micro[name], whole[name], rtol=2e-5, atol=1e-6, err_msg=name)
    for a, b in zip(models[0].weights, models[1].weights):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=2e-5, atol=2e-6)


@pytest.mark.parametrize("moving_statistics", ["sequential", "mean"])
@pytest.mark.parametrize("ghost_batch_size, micro_batches", [(16, 4), (32, 2), (8, 8)])
def test_batch_norm_normalizes_each_micro_batch_and_updates_its_moving_statistics(ghost_batch_size, micro_batches,
                                                                                   moving_statistics):
    x, y = _data(ghost_batch_size * micro_batches, seed=1)
    lr = 0.1
    model = ghost.ghost_batch_model(_mlp(2, batch_norm=True), ghost_batch_size, moving_statistics)
    start = {v.path: np.asarray(v).copy() for v in model.weights}

    # Reference gradients: each micro-batch through a plain model in training mode (its own statistics),
    # averaged; the first SGD-with-momentum step (velocity zero) is w - lr * mean gradient.
    reference = _mlp(2, batch_norm=True)
    per_micro_batch = [_weight_gradients(reference, x[k * ghost_batch_size:(k + 1) * ghost_batch_size],
                                         y[k * ghost_batch_size:(k + 1) * ghost_batch_size])
                       for k in range(micro_batches)]
    mean_gradient = [np.mean(parts, axis=0) for parts in zip(*per_micro_batch)]
    whole_batch = _weight_gradients(_mlp(2, batch_norm=True), x, y)
    # Normalizing all examples together would give another gradient: the test can tell them apart.
    assert np.abs(mean_gradient[0] - whole_batch[0]).max() > 1e-3

    model.compile(training.make_optimizer("sgd", lr), LOSS)
    model.fit(x, y, batch_size=len(x), epochs=1, shuffle=False, verbose=0)
    assert int(np.asarray(model.optimizer.iterations)) == 1
    for variable, gradient in zip(model.trainable_variables, mean_gradient):
        np.testing.assert_allclose(np.asarray(variable), start[variable.path] - lr * gradient, rtol=1e-4, atol=1e-6)

    # Moving statistics (in NumPy, float64) from the micro-batches' moments under the initial weights (they do not
    # change within a step), from Keras' initial moving mean 0 and variance 1: "sequential", one update per
    # micro-batch in order; "mean", one update with the mean of the moments.
    bn = model.get_layer("batch_norm")
    dense = model.get_layer("dense")
    kernel, bias = start[dense.kernel.path].astype(np.float64), start[dense.bias.path].astype(np.float64)
    moments = [x[k * ghost_batch_size:(k + 1) * ghost_batch_size].astype(np.float64) @ kernel + bias
               for k in range(micro_batches)]
    m = bn.momentum
    if moving_statistics == "sequential":
        moving_mean, moving_variance = 0.0, 1.0
        for h in moments:
            moving_mean = m * moving_mean + (1 - m) * h.mean(axis=0)
            moving_variance = m * moving_variance + (1 - m) * h.var(axis=0)
    else:
        moving_mean = (1 - m) * np.mean([h.mean(axis=0) for h in moments], axis=0)
        moving_variance = m + (1 - m) * np.mean([h.var(axis=0) for h in moments], axis=0)
    np.testing.assert_allclose(np.asarray(bn.moving_mean), moving_mean, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(np.asarray(bn.moving_variance), moving_variance, rtol=1e-4, atol=1e-6)


def test_seed_state_is_carried_from_one_micro_batch_to_the_next():
    x, y = _data(64, seed=3)
    model = ghost.ghost_batch_model(_mlp(4, dropout=True), 16)
    seeds = [v for v in model.non_trainable_variables if not keras.backend.is_float_dtype(v.dtype)]
    assert seeds, "Dropout's seed generator should hold integer state"
    reference = _mlp(4, dropout=True)
    for k in range(4):  # four training-mode calls: four draws of Dropout's mask
        reference(x[k * 16:(k + 1) * 16], training=True)
    expected = [np.asarray(v) for v in reference.non_trainable_variables if not keras.backend.is_float_dtype(v.dtype)]
    model.compile(training.make_optimizer("sgd", 0.1), LOSS)
    model.fit(x, y, batch_size=64, epochs=1, shuffle=False, verbose=0)
    for state, want in zip(seeds, expected):
        np.testing.assert_array_equal(np.asarray(state), want)


def test_shares_the_layers_of_the_model_it_wraps():
    network = _mlp(5, batch_norm=True)
    model = ghost.ghost_batch_model(network, 8)
    assert [v.path for v in model.weights] == [v.path for v in network.weights]
    model.compile(training.make_optimizer("sgd", 0.1), LOSS)
    x, y = _data(32)
    model.fit(x, y, batch_size=32, epochs=1, verbose=0)
    for a, b in zip(model.weights, network.weights):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_a_sequential_model_trains_as_the_same_functional_one():
    functional = _mlp(3, batch_norm=True)
    sequential = keras.Sequential([keras.Input((20,)), *functional.layers[1:]], name="sequential_mlp")
    copy = _mlp(4, batch_norm=True)
    copy.set_weights(functional.get_weights())
    x, y = _data(64)
    for network in (sequential, copy):
        model = ghost.ghost_batch_model(network, 16)
        model.compile(training.make_optimizer("sgd", 0.1), LOSS)
        model.fit(x, y, batch_size=64, epochs=2, shuffle=False, verbose=0)
    assert not np.allclose(functional.get_weights()[0], _mlp(3, batch_norm=True).get_weights()[0])
    for a, b in zip(sequential.get_weights(), copy.get_weights()):  # BatchNorm's moving statistics included
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="built on keras.Input"):
        ghost.ghost_batch_model(keras.Sequential([keras.layers.Dense(3)]), 8)


def test_config_round_trip():
    model = ghost.ghost_batch_model(_mlp(6, batch_norm=True), 64, moving_statistics="mean")
    config = model.get_config()
    assert config["ghost_batch_size"] == 64 and config["moving_statistics"] == "mean"
    again = keras.saving.deserialize_keras_object(keras.saving.serialize_keras_object(model))
    assert isinstance(again, ghost.GhostBatchModel) and again.ghost_batch_size == 64
    assert again.moving_statistics == "mean"
    with pytest.raises(ValueError, match="moving_statistics must be one of sequential, mean, got 'last'"):
        ghost.ghost_batch_model(_mlp(6, batch_norm=True), 64, moving_statistics="last")
    assert [tuple(v.shape) for v in again.weights] == [tuple(v.shape) for v in model.weights]
    x = _data(8)[0]
    again.set_weights(model.get_weights())
    np.testing.assert_allclose(np.asarray(again(x)), np.asarray(model(x)), rtol=1e-6)


def test_a_batch_that_is_not_whole_micro_batches_is_refused():
    model = ghost.ghost_batch_model(_mlp(7), 32)
    model.compile(training.make_optimizer("sgd", 0.1), LOSS)
    x, y = _data(48)
    with pytest.raises(Exception, match="whole number of micro-batches of 32"):
        model.fit(x, y, batch_size=48, epochs=1, verbose=0)
    with pytest.raises(ValueError, match="ghost_batch_size must be >= 1"):
        ghost.ghost_batch_model(_mlp(7), 0)


@pytest.mark.parametrize("batch_size, ghost_batch_size, replicas, expected", [
    (16384, 256, 1, 64), (16384, 256, 2, 32), (16384, 256, 8, 8), (512, 256, 2, 1), (256, 128, 2, 1),
])
def test_check_divides_counts_micro_batches_per_replica(batch_size, ghost_batch_size, replicas, expected):
    assert check_divides(batch_size, ghost_batch_size, replicas) == expected


@pytest.mark.parametrize("batch_size, ghost_batch_size, replicas, message", [
    (256, 256, 2, "on 2 replicas \\(128 examples each\\).*multiple of replicas x ghost_batch_size = 512"),
    (300, 256, 1, "not a whole number of micro-batches of ghost_batch_size 256"),
    (1024, 256, 3, "multiple of replicas x ghost_batch_size = 768"),
    (1024, 0, 1, "must be >= 1"),
])
def test_check_divides_says_how_batch_replicas_and_ghost_combine(batch_size, ghost_batch_size, replicas, message):
    with pytest.raises(ValueError, match=message):
        check_divides(batch_size, ghost_batch_size, replicas)


def test_exported_at_the_top_of_the_package():
    import keras_implicit as ki

    assert ki.GhostBatchModel is ghost.GhostBatchModel and ki.ghost_batch_model is ghost.ghost_batch_model
    assert {"GhostBatchModel", "ghost_batch_model", "check_divides"} <= set(ghost.__all__)


# --------------------------------------------------------------------------- #
# Explicit regularizers per micro-batch: the gradient-norm penalty and SAM
# --------------------------------------------------------------------------- #
def _softmax(logits):
    shifted = np.exp(logits - logits.max(axis=1, keepdims=True))
    return shifted / shifted.sum(axis=1, keepdims=True)


def _linear_gradient(kernel, bias, x, y):
    """The mean CE's gradient of a linear softmax layer, in closed form (float64): X^T (P - Y) / m."""
    residual = _softmax(x @ kernel + bias) - np.eye(kernel.shape[1])[y]
    return x.T @ residual / len(x), residual.sum(axis=0) / len(x)


def _linear_hessian_product(kernel, bias, x, y, direction_kernel, direction_bias):
    """H v for the mean CE of a linear softmax layer, in closed form: dS = X V_W + V_b, dP = P dS - P (P . dS)."""
    p = _softmax(x @ kernel + bias)
    ds = x @ direction_kernel + direction_bias
    dp = p * ds - p * (p * ds).sum(axis=1, keepdims=True)
    return x.T @ dp / len(x), dp.sum(axis=0) / len(x)


def _linear_model(seed, features, classes):
    keras.utils.set_random_seed(seed)
    inputs = keras.Input((features,))
    top = keras.layers.Dense(classes, bias_initializer=keras.initializers.RandomNormal(stddev=0.5, seed=seed))
    return keras.Model(inputs, top(inputs))


@pytest.mark.parametrize("regularizer, value", [("gradient_penalty", 0.5), ("gradient_penalty", 0.01),
                                                ("sam_radius", 0.3), ("sam_radius", 0.05)])
@pytest.mark.parametrize("ghost_batch_size, micro_batches, classes", [(8, 3, 4), (16, 1, 10), (4, 5, 2)])
def test_a_regularized_step_is_the_closed_form_on_a_linear_softmax_layer(regularizer, value, ghost_batch_size,
                                                                       micro_batches, classes):
    """One SGD step of rate 1 (no momentum) moves the weights by the mean over micro-batches of the regularized
    gradient: g + 2 lambda H g for the penalty, g(w + rho g / ||g||) for SAM, written in NumPy from the softmax's
    closed-form gradient and Hessian-vector product (one micro-batch per step included: it leaves Keras' step)."""
    features = 6
    x, y = _data(ghost_batch_size * micro_batches, seed=3)
    x, y = x[:, :features], y % classes
    network = _linear_model(4, features, classes)
    model = ghost.ghost_batch_model(network, ghost_batch_size, **{regularizer: value})
    model.compile(keras.optimizers.SGD(1.0), LOSS)
    kernel, bias = (np.asarray(v, np.float64) for v in network.get_weights())
    model.fit(x, y, batch_size=len(x), epochs=1, shuffle=False, verbose=0)

    step_kernel, step_bias = np.zeros_like(kernel), np.zeros_like(bias)
    for k in range(micro_batches):
        part = slice(k * ghost_batch_size, (k + 1) * ghost_batch_size)
        xk, yk = x[part].astype(np.float64), y[part]
        g_kernel, g_bias = _linear_gradient(kernel, bias, xk, yk)
        if regularizer == "gradient_penalty":
            h_kernel, h_bias = _linear_hessian_product(kernel, bias, xk, yk, g_kernel, g_bias)
            g_kernel, g_bias = g_kernel + 2 * value * h_kernel, g_bias + 2 * value * h_bias
        else:
            scale = value / np.sqrt(np.sum(g_kernel ** 2) + np.sum(g_bias ** 2))
            g_kernel, g_bias = _linear_gradient(kernel + scale * g_kernel, bias + scale * g_bias, xk, yk)
        step_kernel += g_kernel / micro_batches
        step_bias += g_bias / micro_batches
    new_kernel, new_bias = network.get_weights()
    for new, old, step in ((new_kernel, kernel, step_kernel), (new_bias, bias, step_bias)):
        # new - old is read off float32 weights: it carries their rounding, a few eps times |w|.
        np.testing.assert_allclose(old - new, step, rtol=1e-4,
                                   atol=1e-5 * np.abs(step).max() + 4 * F32 * np.abs(old).max())
    # The regularizer changed the step: the test tells it from plain CE.
    plain_kernel = sum(_linear_gradient(kernel, bias, x[k * ghost_batch_size:(k + 1) * ghost_batch_size],
                                        y[k * ghost_batch_size:(k + 1) * ghost_batch_size])[0]
                       for k in range(micro_batches)) / micro_batches
    assert np.abs(step_kernel - plain_kernel).max() > 100 * 1e-5 * np.abs(step_kernel).max()


@pytest.mark.parametrize("regularizer, value", [("gradient_penalty", 0.2), ("sam_radius", 0.1)])
@pytest.mark.parametrize("ghost_batch_size, micro_batches", [(16, 3), (8, 1)])
def test_regularized_steps_with_batch_norm_match_autodiff_and_update_moving_statistics_once(regularizer, value,
                                                                                         ghost_batch_size,
                                                                                         micro_batches):
    """With BatchNormalization (each micro-batch normalized by its own statistics): the penalty's gradient against
    nested autodiff on the plain model, SAM's against the plain gradient at w + rho g / ||g||; and the moving
    statistics are those of the unregularized step (one update per micro-batch, the first pass's)."""
    x, y = _data(ghost_batch_size * micro_batches, seed=5)
    lr = 0.1
    model = ghost.ghost_batch_model(_mlp(7, batch_norm=True), ghost_batch_size, **{regularizer: value})
    plain = ghost.ghost_batch_model(_mlp(7, batch_norm=True), ghost_batch_size)
    start = [np.asarray(v).copy() for v in model.trainable_variables]

    reference = _mlp(7, batch_norm=True)
    gradients = []
    for k in range(micro_batches):
        xk, yk = x[k * ghost_batch_size:(k + 1) * ghost_batch_size], y[k * ghost_batch_size:(k + 1) * ghost_batch_size]
        if regularizer == "gradient_penalty":
            gradients.append(_weight_gradients(reference, xk, yk, penalty=value))
            continue
        at_w = _weight_gradients(reference, xk, yk)
        scale = value / np.sqrt(sum(np.sum(g.astype(np.float64) ** 2) for g in at_w))
        ascent = _mlp(7, batch_norm=True)
        for variable, w, g in zip(ascent.trainable_variables, start, at_w):
            variable.assign(w + scale * g)
        gradients.append(_weight_gradients(ascent, xk, yk))
    mean_gradient = [np.mean(parts, axis=0) for parts in zip(*gradients)]
    plain_gradient = [np.mean(parts, axis=0) for parts in zip(*[
        _weight_gradients(reference, x[k * ghost_batch_size:(k + 1) * ghost_batch_size],
                          y[k * ghost_batch_size:(k + 1) * ghost_batch_size]) for k in range(micro_batches)])]
    assert max(np.abs(a - b).max() for a, b in zip(mean_gradient, plain_gradient)) > 1e-3  # tells them apart

    for m in (model, plain):
        m.compile(training.make_optimizer("sgd", lr), LOSS)
        m.fit(x, y, batch_size=len(x), epochs=1, shuffle=False, verbose=0)
    for variable, w, gradient in zip(model.trainable_variables, start, mean_gradient):
        np.testing.assert_allclose(np.asarray(variable), w - lr * gradient, rtol=1e-4,
                                   atol=1e-4 * lr * np.abs(gradient).max() + 1e-7)
    for mine, theirs in zip(model.non_trainable_variables, plain.non_trainable_variables):
        np.testing.assert_allclose(np.asarray(mine), np.asarray(theirs), rtol=1e-6, atol=1e-7)


def test_the_gradient_penalty_trains_a_mixture_whose_panel_has_a_fused_kernel():
    """The penalty needs second derivatives, which the fused panel kernels lack: the step computes the loss on the
    keras.ops path, so a mixture with Gcdf trains (and its step equals the keras.ops path's, forced)."""
    from keras_implicit import losses

    x, y = _data(32, seed=8)
    results = []
    for path in ("auto", "keras"):
        model = ghost.ghost_batch_model(_mlp(9, batch_norm=True), 16, gradient_penalty=0.1)
        model.compile(keras.optimizers.SGD(0.1), losses.Mixture("ce+0.1*gcdf@4+0.2*trh"))
        with losses.force_path(path):
            model.fit(x, y, batch_size=32, epochs=1, shuffle=False, verbose=0)
        results.append([np.asarray(v) for v in model.trainable_variables])
    for a, b in zip(*results):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)


def test_regularizer_settings_round_trip_and_bad_values_are_refused():
    model = ghost.ghost_batch_model(_mlp(6), 64, gradient_penalty=0.025)
    again = keras.saving.deserialize_keras_object(keras.saving.serialize_keras_object(model))
    assert (again.gradient_penalty, again.sam_radius) == (0.025, 0.0)
    sam = keras.saving.deserialize_keras_object(keras.saving.serialize_keras_object(
        ghost.ghost_batch_model(_mlp(6), 64, sam_radius=0.05)))
    assert (sam.gradient_penalty, sam.sam_radius) == (0.0, 0.05)
    with pytest.raises(ValueError, match="gradient_penalty must be a finite number >= 0"):
        ghost.ghost_batch_model(_mlp(6), 64, gradient_penalty=-1.0)
    with pytest.raises(ValueError, match="sam_radius must be a finite number >= 0"):
        ghost.ghost_batch_model(_mlp(6), 64, sam_radius=float("nan"))
    with pytest.raises(ValueError, match="not both"):
        ghost.ghost_batch_model(_mlp(6), 64, gradient_penalty=0.1, sam_radius=0.1)
