"""keras_implicit.losses against independent float64 NumPy/SciPy references.

Every test that computes a loss runs on both panel paths (``keras.ops`` and, on TensorFlow, the fused op)
through the ``panel_path`` fixture of conftest.py, and on whichever Keras backend ``KERAS_BACKEND`` names
(CI runs this file on TensorFlow and on JAX).
"""

import functools
import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import keras
import numpy as np
import pytest
from scipy import special, stats

import keras_implicit as ki
from keras_implicit import losses
from keras_implicit.config import parse_objective
from tests.backend import (
    assert_refused_when_compiled,
    compiled,
    dtype_of,
    gradient,
    needs_float64,
    tensorflow_only,
    to_numpy,
)
from tests.references import random_batch, ref_error, ref_gcdf, ref_hinge, ref_tce

pytestmark = pytest.mark.usefixtures("panel_path")

SIGMAS = [0.0, 1e-3, 0.5, 1.0, 8.0, 1e3]
TEMPERATURES = [1e-3, 0.5, 1.0, 4.0, 1e3]
MARGINS = [0.0, 1e-3, 1.0, 8.0, 1e3]
SHAPES = [(1, 2), (7, 10), (64, 100), (1024, 10), (1024, 2)]


# --------------------------------------------------------------------------- #
# Values against the references
# --------------------------------------------------------------------------- #
@pytest.mark.parametrize("batch,classes", SHAPES)
@pytest.mark.parametrize("sigma", SIGMAS)
def test_gcdf_matches_reference(batch, classes, sigma):
    labels, logits = random_batch(batch, classes)
    got = to_numpy(ki.gcdf(labels, logits, sigma))
    assert got.shape == (batch,) and got.dtype == np.float32
    np.testing.assert_allclose(got, ref_gcdf(labels, logits.astype(np.float64), sigma), rtol=2e-5, atol=1e-6)


@pytest.mark.parametrize("batch,classes", SHAPES)
@pytest.mark.parametrize("temperature", TEMPERATURES)
def test_tempered_crossentropy_matches_reference(batch, classes, temperature):
    labels, logits = random_batch(batch, classes)
    got = to_numpy(ki.tempered_crossentropy(labels, logits, temperature))
    assert got.shape == (batch,)
    np.testing.assert_allclose(got, ref_tce(labels, logits, temperature), rtol=2e-5, atol=1e-6)


@pytest.mark.parametrize("batch,classes", SHAPES)
@pytest.mark.parametrize("margin", MARGINS)
def test_multiclass_hinge_matches_reference(batch, classes, margin):
    labels, logits = random_batch(batch, classes)
    got = to_numpy(ki.multiclass_hinge(labels, logits, margin))
    np.testing.assert_allclose(got, ref_hinge(labels, logits, margin), rtol=2e-6, atol=1e-4)


@pytest.mark.parametrize("batch,classes", SHAPES)
def test_zero_one_error_matches_argmax(batch, classes):
    labels, logits = random_batch(batch, classes)
    np.testing.assert_array_equal(to_numpy(ki.zero_one_error(labels, logits)), ref_error(labels, logits))


def test_zero_one_error_ties_follow_argmax():
    logits = np.array([[1.0, 1.0, 0.0]] * 3, np.float32)
    # argmax picks index 0 on the tie: label 0 is right, labels 1 and 2 are wrong.
    np.testing.assert_array_equal(to_numpy(ki.zero_one_error([0, 1, 2], logits)), [0.0, 1.0, 1.0])
    accuracy = to_numpy(keras.metrics.sparse_categorical_accuracy(np.array([0, 1, 2]), logits))
    np.testing.assert_array_equal(1.0 - accuracy, [0.0, 1.0, 1.0])


@pytest.mark.parametrize("classes", [2, 10, 100])
def test_sequences_of_parameters_give_one_column_each(classes):
    labels, logits = random_batch(33, classes)
    got = to_numpy(ki.gcdf(labels, logits, SIGMAS))
    assert got.shape == (33, len(SIGMAS))
    for k, sigma in enumerate(SIGMAS):
        np.testing.assert_allclose(got[:, k], ref_gcdf(labels, logits, sigma), rtol=2e-5, atol=1e-6)
    got = to_numpy(ki.tempered_crossentropy(labels, logits, TEMPERATURES))
    for k, temperature in enumerate(TEMPERATURES):
        np.testing.assert_allclose(got[:, k], ref_tce(labels, logits, temperature), rtol=2e-5, atol=1e-6)
    got = to_numpy(ki.multiclass_hinge(labels, logits, MARGINS))
    for k, margin in enumerate(MARGINS):
        np.testing.assert_allclose(got[:, k], ref_hinge(labels, logits, margin), rtol=2e-6, atol=1e-4)


def test_panel_values_column_order_matches_panel_names():
    labels, logits = random_batch(16, 5)
    values = to_numpy(ki.panel_values(labels, logits, sigmas=[0, 2], temperatures=[3], margins=[0.5], error=True))
    names = ki.panel_names([0, 2], [3], [0.5], True)
    assert names == ["gcdf@0", "gcdf@2", "tce@3", "hinge@0.5", "error"]
    expected = [
        ref_gcdf(labels, logits, 0),
        ref_gcdf(labels, logits, 2),
        ref_tce(labels, logits, 3),
        ref_hinge(labels, logits, 0.5),
        ref_error(labels, logits),
    ]
    np.testing.assert_allclose(values, np.stack(expected, axis=1), rtol=2e-5, atol=1e-5)


@pytest.mark.parametrize("value,text", [(1.0, "1"), (0.5, "0.5"), (0.0625, "0.0625"), (16, "16"), (1e-05, "1e-05"),
                                        (0.1, "0.1"), (2.5e20, "2.5e+20")])
def test_format_parameter_is_shortest_decimal(value, text):
    assert ki.format_parameter(value) == text


def test_names_of_numpy_grids_carry_no_rounding_noise():
    grid = np.geomspace(0.0625, 16, 9)
    assert grid[3] != 0.5 and grid[5] != 2.0  # the noise the names must not show
    assert ki.panel_names(sigmas=grid) == [f"gcdf@{v}" for v in ("0.0625", "0.125", "0.25", "0.5", "1", "2", "4", "8",
                                                                  "16")]
    assert ki.panel_names(temperatures=np.float32([0.1, 1 / 3])) == ["tce@0.1", "tce@0.3333333"]
    assert ki.AltLossPanel(sigmas=grid, temperatures=(), margins=(), error=False).names == ki.panel_names(
        sigmas=[0.0625, 0.125, 0.25, 0.5, 1, 2, 4, 8, 16])


def test_a_grid_whose_values_share_a_name_is_refused():
    with pytest.raises(ValueError, match=r"sigma has repeated values \(equal to 7 significant digits"):
        ki.gcdf([0], [[1.0, 0.0]], [1.0, 1.00000001])
    with pytest.raises(ValueError, match="margin has repeated values"):
        ki.alt_loss_panel(margins=[2, 2])


# --------------------------------------------------------------------------- #
# Closed forms, limits and tails
# --------------------------------------------------------------------------- #
@pytest.mark.parametrize("sigma", [1e-3, 0.3, 1.0, 8.0])
def test_binary_gcdf_is_phi_of_minus_z(sigma):
    z = np.linspace(-20, 20, 81)
    logits = np.stack([z, np.zeros_like(z)], axis=1)  # class 0 true, z = s_y - s_j
    got = to_numpy(ki.gcdf(np.zeros(len(z), int), logits.astype(np.float32), sigma))
    expected = stats.norm.cdf(-z / (math.sqrt(2) * sigma))
    tiny = expected < 1e-30  # below float32's range for the ratio test
    np.testing.assert_allclose(got[~tiny], expected[~tiny], rtol=1e-4)
    assert np.all(got[tiny] <= 1e-30)


def test_gcdf_lower_tail_keeps_relative_accuracy():
    # Phi(-10) = 7.6e-24: 0.5 * (1 + erf(x)) gives 0 in float32, erfc keeps it.
    for x in [-5.0, -10.0, -12.0]:
        logits = np.array([[0.0, x * math.sqrt(2)]], np.float32)
        got = to_numpy(ki.gcdf([0], logits, 1.0))[0]
        assert got == pytest.approx(stats.norm.cdf(x), rel=1e-4)


def test_gcdf_sigma_zero_counts_winners_and_half_ties():
    logits = np.array([[1.0, 1.0, 0.0, 2.0], [0.0, 0.0, 0.0, 0.0], [5.0, 1.0, 2.0, 3.0]], np.float32)
    np.testing.assert_allclose(to_numpy(ki.gcdf([0, 2, 0], logits, 0.0)), [1.5, 1.5, 0.0])


def test_gcdf_tends_to_the_sigma_zero_limit():
    labels, logits = random_batch(50, 10)
    limit = to_numpy(ki.gcdf(labels, logits, 0.0))
    np.testing.assert_allclose(to_numpy(ki.gcdf(labels, logits, 1e-6)), limit, atol=1e-6)


def test_gcdf_feature_norm_scales_sigma():
    labels, logits = random_batch(20, 6)
    norms = np.linspace(0.5, 3.0, 20)
    got = to_numpy(ki.gcdf(labels, logits, 0.7, feature_norm=norms))
    np.testing.assert_allclose(got, ref_gcdf(labels, logits, 0.7, norms), rtol=2e-5, atol=1e-6)
    scalar = to_numpy(ki.gcdf(labels, logits, 0.7, feature_norm=2.0))
    np.testing.assert_allclose(scalar, to_numpy(ki.gcdf(labels, logits, 1.4)), rtol=1e-6)


@pytest.mark.parametrize("classes", [2, 10, 100])
def test_tempered_crossentropy_tends_to_log_classes(classes):
    labels, logits = random_batch(8, classes)
    got = to_numpy(ki.tempered_crossentropy(labels, logits, 1e7))
    np.testing.assert_allclose(got, np.log(classes), rtol=1e-5)


def test_tempered_crossentropy_at_one_is_keras_sparse_crossentropy():
    labels, logits = random_batch(256, 10)
    keras_ce = to_numpy(keras.losses.sparse_categorical_crossentropy(labels, logits, from_logits=True))
    np.testing.assert_allclose(to_numpy(ki.tempered_crossentropy(labels, logits, 1.0)), keras_ce, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("gap", [20.0, 40.0, 80.0])
def test_tiny_tempered_crossentropy_keeps_relative_accuracy(gap):
    logits = np.array([[gap, 0.0, -1.0]], np.float32)
    expected = np.log1p(np.exp(-gap) + np.exp(-gap - 1.0))  # 2e-9 .. 2e-35
    got = to_numpy(ki.tempered_crossentropy([0], logits, 1.0))[0]
    assert got == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize("scale", [1e3, 1e5, 1e7])
def test_huge_logits_keep_relative_accuracy(scale):
    logits = np.array([[scale, 0.0, -scale]], np.float32)
    # Wrong class 1: loss = -log softmax = scale + log(1 + e^-scale + e^-2scale) ~ scale.
    assert to_numpy(ki.tempered_crossentropy([1], logits, 1.0))[0] == pytest.approx(scale, rel=1e-6)
    assert to_numpy(ki.multiclass_hinge([1], logits, 1.0))[0] == pytest.approx(scale + 1.0, rel=1e-6)
    assert to_numpy(ki.gcdf([1], logits, 1.0))[0] == pytest.approx(1.0, rel=1e-6)


def test_hinge_differs_from_keras_categorical_hinge():
    logits = np.array([[-1.0, -2.0, -3.0]], np.float32)
    ours = to_numpy(ki.multiclass_hinge([0], logits, 1.0))[0]
    assert ours == pytest.approx(max(0, 1 - 1) + max(0, 1 - 2))  # = 0
    theirs = to_numpy(keras.losses.categorical_hinge(np.array([[1.0, 0.0, 0.0]]), logits))[0]
    assert theirs != pytest.approx(ours)


# --------------------------------------------------------------------------- #
# The Monte Carlo meaning of Gcdf: noise N(0, sigma^2 I) on the top layer's weights.
# --------------------------------------------------------------------------- #
@functools.cache
def _prediction_changes_under_weight_noise(classes, sigma):
    """A top layer, 12 inputs of norm 1 and, for each input, the rate at which N(0, sigma^2 I) noise on the
    layer's weights changes its prediction (20000 draws): (scores, predictions, rates, draws). NumPy only: the
    keras and op parametrizations of the test below share it."""
    rng = np.random.default_rng(7)
    features, samples, draws = 16, 12, 20000
    kernel = rng.standard_normal((features, classes))
    bias = rng.standard_normal(classes)
    x = rng.standard_normal((samples, features))
    x /= np.linalg.norm(x, axis=1, keepdims=True)  # ||x|| = 1 as in the paper
    scores = x @ kernel + bias
    predicted = scores.argmax(axis=1)
    rates = []
    for i in range(samples):
        noise = sigma * rng.standard_normal((draws, features, classes))
        noisy = np.einsum("f,dfc->dc", x[i], kernel[None] + noise) + bias
        rates.append(np.mean(noisy.argmax(axis=1) != predicted[i]))
    return scores, predicted, rates, draws


@pytest.mark.parametrize("classes", [2, 5])
@pytest.mark.parametrize("sigma", [0.5, 2.0])
def test_gcdf_bounds_the_rate_of_prediction_changes_under_weight_noise(classes, sigma):
    scores, predicted, rates, draws = _prediction_changes_under_weight_noise(classes, sigma)
    bound = to_numpy(ki.gcdf(predicted, scores.astype(np.float32), sigma)).astype(np.float64)
    for i, rate in enumerate(rates):
        standard_error = math.sqrt(max(rate * (1 - rate), 1e-4) / draws)
        assert rate <= bound[i] + 4 * standard_error
        if classes == 2:
            assert abs(rate - bound[i]) <= 4 * standard_error


# --------------------------------------------------------------------------- #
# Labels, dtypes, graphs and distribution
# --------------------------------------------------------------------------- #
def test_label_formats_agree():
    labels, logits = random_batch(10, 4)
    sparse = to_numpy(ki.gcdf(labels, logits, 1.0))
    column = to_numpy(ki.gcdf(labels[:, None], logits, 1.0))
    float_column = to_numpy(ki.gcdf(labels[:, None].astype(np.float32), logits, 1.0))
    one_hot = to_numpy(ki.gcdf(np.eye(4, dtype=np.float32)[labels], logits, 1.0))
    for other in (column, float_column, one_hot):
        np.testing.assert_array_equal(sparse, other)


@tensorflow_only
def test_labels_whose_last_dimension_is_unknown_when_traced():
    """[batch, 1] integer labels and one-hot rows through a tf.function whose signature leaves the labels' last
    dimension unknown (as a tf.data pipeline can): told apart when run, not all read as one-hot."""
    import tensorflow as tf

    labels, logits = random_batch(10, 4)
    function = tf.function(lambda y, s: ki.panel_values(y, s, sigmas=[0.5, 2], temperatures=[1], margins=[1],
                                                        error=True),
                           input_signature=[tf.TensorSpec([None, None], tf.int32), tf.TensorSpec([None, 4])])
    expected = np.stack([ref_gcdf(labels, logits, 0.5), ref_gcdf(labels, logits, 2), ref_tce(labels, logits, 1),
                         ref_hinge(labels, logits, 1), ref_error(labels, logits)], axis=1)
    for y in (labels[:, None], np.eye(4, dtype=np.int32)[labels]):
        np.testing.assert_allclose(to_numpy(function(y, logits)), expected, rtol=2e-5, atol=1e-6)


def test_variables_are_read_as_their_values():
    labels, logits = random_batch(6, 3)
    for variable in (keras.Variable(logits), *_tf_variable(logits)):
        np.testing.assert_allclose(to_numpy(ki.gcdf(labels, variable, [0.5, 4])),
                                   np.stack([ref_gcdf(labels, logits, 0.5), ref_gcdf(labels, logits, 4)], axis=1),
                                   rtol=2e-5, atol=1e-7)


def _tf_variable(value):
    if keras.backend.backend() != "tensorflow":
        return ()
    import tensorflow as tf

    return (tf.Variable(value),)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_half_precision_logits_are_computed_in_float32(dtype):
    labels, logits = random_batch(64, 10)
    half = keras.ops.cast(logits, dtype)
    widened = to_numpy(keras.ops.cast(half, "float32"))
    values = ki.panel_values(labels, half, sigmas=[0.5], temperatures=[1], margins=[1], error=True)
    assert dtype_of(values) == "float32"
    expected = np.stack(
        [ref_gcdf(labels, widened, 0.5), ref_tce(labels, widened, 1), ref_hinge(labels, widened, 1),
         ref_error(labels, widened)], axis=1)
    np.testing.assert_allclose(to_numpy(values), expected, rtol=1e-5, atol=1e-5)


@needs_float64
def test_float64_logits_stay_float64():
    labels, logits = random_batch(8, 3)
    got = ki.tempered_crossentropy(labels, logits.astype(np.float64), 2.0)
    assert dtype_of(got) == "float64"
    np.testing.assert_allclose(to_numpy(got), ref_tce(labels, logits.astype(np.float64), 2.0), rtol=1e-12)


@tensorflow_only
def test_works_inside_tf_function_with_unknown_shapes():
    import tensorflow as tf

    @tf.function(input_signature=[tf.TensorSpec([None], tf.int32), tf.TensorSpec([None, None], tf.float32)])
    def panel(labels, logits):
        return ki.panel_values(labels, logits, sigmas=[0.5, 1], temperatures=[2], margins=[1], error=True)

    for batch, classes in [(5, 3), (17, 11)]:
        labels, logits = random_batch(batch, classes)
        eager = ki.panel_values(labels, logits, sigmas=[0.5, 1], temperatures=[2], margins=[1], error=True)
        np.testing.assert_allclose(to_numpy(panel(labels.astype(np.int32), logits)), to_numpy(eager), rtol=1e-6)


def test_works_compiled():
    labels, logits = random_batch(17, 11)
    panel = compiled(lambda y, s: ki.panel_values(y, s, sigmas=[0, 0.5, 1], temperatures=[2], margins=[0, 1],
                                                  error=True, feature_norm=1.5))
    eager = ki.panel_values(labels, logits, sigmas=[0, 0.5, 1], temperatures=[2], margins=[0, 1], error=True,
                            feature_norm=1.5)
    np.testing.assert_allclose(to_numpy(panel(labels.astype(np.int32), logits)), to_numpy(eager), rtol=1e-6)


@tensorflow_only
def test_works_under_tf_distribute():
    import tensorflow as tf

    strategy = tf.distribute.MirroredStrategy(["/cpu:0"])
    labels, logits = random_batch(32, 10)

    @tf.function
    def replica_step(y, s):
        return tf.reduce_sum(ki.gcdf(y, s, [0.5, 8.0]), axis=0)

    per_replica = strategy.run(replica_step, args=(tf.constant(labels), tf.constant(logits)))
    total = to_numpy(strategy.reduce(tf.distribute.ReduceOp.SUM, per_replica, axis=None))
    expected = [ref_gcdf(labels, logits, 0.5).sum(), ref_gcdf(labels, logits, 8.0).sum()]
    np.testing.assert_allclose(total, expected, rtol=1e-5)


# --------------------------------------------------------------------------- #
# The Loss classes: reductions, sample weights, gradients, training, serialization
# --------------------------------------------------------------------------- #
LOSS_CASES = [
    (losses.Gcdf, "sigma", 0.7, ref_gcdf),
    (losses.TemperedCrossentropy, "temperature", 2.5, ref_tce),
    (losses.MulticlassHinge, "margin", 1.5, ref_hinge),
]


@pytest.mark.parametrize("loss_class,parameter,value,reference", LOSS_CASES)
def test_loss_reductions_and_sample_weights(loss_class, parameter, value, reference):
    labels, logits = random_batch(12, 5)
    weights = np.linspace(0.0, 2.0, 12).astype(np.float32)
    per_sample = reference(labels, logits, value)
    none = to_numpy(loss_class(**{parameter: value}, reduction="none")(labels, logits, sample_weight=weights))
    np.testing.assert_allclose(none, per_sample * weights, rtol=1e-5, atol=1e-6)
    total = to_numpy(loss_class(**{parameter: value}, reduction="sum")(labels, logits, sample_weight=weights))
    assert total == pytest.approx((per_sample * weights).sum(), rel=1e-5)
    mean = to_numpy(loss_class(**{parameter: value})(labels, logits, sample_weight=weights))
    assert mean == pytest.approx((per_sample * weights).sum() / 12, rel=1e-5)


@needs_float64
@pytest.mark.parametrize("loss_class,parameter,value,reference", LOSS_CASES)
def test_loss_gradient_matches_finite_differences(loss_class, parameter, value, reference):
    labels, logits = random_batch(6, 4, scale=1.0)
    base = logits.astype(np.float64)
    loss = loss_class(**{parameter: value}, reduction="sum", dtype="float64")
    got = gradient(lambda s: loss(labels, s), base)
    step = 1e-6
    numeric = np.zeros_like(got)
    for b in range(base.shape[0]):
        for c in range(base.shape[1]):
            plus, minus = base.copy(), base.copy()
            plus[b, c] += step
            minus[b, c] -= step
            numeric[b, c] = (reference(labels, plus, value).sum() - reference(labels, minus, value).sum()) / (2 * step)
    np.testing.assert_allclose(got, numeric, rtol=1e-5, atol=1e-7)


@needs_float64
def test_tempered_crossentropy_gradient_closed_form():
    labels, logits = random_batch(9, 7)
    logits = logits.astype(np.float64)
    temperature = 3.0
    got = gradient(lambda s: ki.tempered_crossentropy(labels, s, temperature), logits)
    expected = (special.softmax(logits / temperature, axis=1) - np.eye(7)[labels]) / temperature
    np.testing.assert_allclose(got, expected, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("loss", [losses.Gcdf(sigma=1.0), losses.TemperedCrossentropy(temperature=2.0),
                                  losses.MulticlassHinge(margin=1.0)], ids=lambda loss: loss.name)
def test_losses_train_a_model(loss):
    rng = np.random.default_rng(3)
    centers = rng.standard_normal((3, 8)) * 3
    labels = rng.integers(0, 3, 600)
    x = (centers[labels] + rng.standard_normal((600, 8))).astype(np.float32)
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((8,)), keras.layers.Dense(3)])
    model.compile(keras.optimizers.SGD(0.05, momentum=0.9), loss=loss)
    before = model.evaluate(x, labels, verbose=0)
    model.fit(x, labels, epochs=5, batch_size=64, verbose=0)
    after = model.evaluate(x, labels, verbose=0)
    assert after < 0.5 * before


@pytest.mark.parametrize("loss", [losses.Gcdf(sigma=0.25, feature_norm=2.0, reduction="sum", name="g"),
                                  losses.TemperedCrossentropy(temperature=3.0, reduction="none", dtype="float64"),
                                  losses.MulticlassHinge(margin=0.5, name="h")], ids=lambda loss: loss.name)
def test_loss_config_round_trip(loss):
    config = loss.get_config()
    clone = type(loss).from_config(config)
    assert clone.get_config() == config
    restored = keras.saving.deserialize_keras_object(keras.saving.serialize_keras_object(loss))
    assert type(restored) is type(loss) and restored.get_config() == config
    assert restored.dtype == clone.dtype == loss.dtype
    labels, logits = random_batch(5, 3)
    np.testing.assert_allclose(to_numpy(restored(labels, logits)), to_numpy(loss(labels, logits)))


def test_model_compiled_with_a_loss_survives_save_and_load(tmp_path):
    labels, logits_x = random_batch(64, 4)
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(4)])
    model.compile("sgd", loss=losses.Gcdf(sigma=2.0))
    model.fit(logits_x, labels, verbose=0)
    path = tmp_path / "m.keras"
    model.save(path)
    restored = keras.models.load_model(path)
    assert isinstance(restored.loss, losses.Gcdf) and restored.loss.get_config()["sigma"] == 2.0
    assert restored.evaluate(logits_x, labels, verbose=0) == pytest.approx(model.evaluate(logits_x, labels, verbose=0))


# --------------------------------------------------------------------------- #
# Bad input
# --------------------------------------------------------------------------- #
@pytest.mark.parametrize("function,parameter,bad", [
    (ki.gcdf, "sigma", -0.1), (ki.gcdf, "sigma", float("nan")), (ki.gcdf, "sigma", float("inf")),
    (ki.gcdf, "sigma", []), (ki.gcdf, "sigma", [0.5, -1]),
    (ki.tempered_crossentropy, "temperature", 0.0), (ki.tempered_crossentropy, "temperature", -2.0),
    (ki.tempered_crossentropy, "temperature", float("nan")), (ki.tempered_crossentropy, "temperature", []),
    (ki.multiclass_hinge, "margin", -1.0), (ki.multiclass_hinge, "margin", float("inf")),
    (ki.multiclass_hinge, "margin", ()),
])
def test_bad_parameters_raise_naming_the_argument(function, parameter, bad):
    with pytest.raises(ValueError, match=parameter):
        function([0], [[1.0, 0.0]], bad)


@pytest.mark.parametrize("loss_class,parameter,bad", [
    (losses.Gcdf, "sigma", -1.0), (losses.TemperedCrossentropy, "temperature", 0.0),
    (losses.MulticlassHinge, "margin", float("nan")), (losses.Gcdf, "sigma", [1.0, 2.0]),
])
def test_bad_loss_parameters_raise(loss_class, parameter, bad):
    with pytest.raises(ValueError, match=parameter):
        loss_class(**{parameter: bad})


@pytest.mark.parametrize("bad", ["1", True, None, [1.0, "2"], np.array([True])], ids=repr)
def test_parameters_that_are_not_numbers_are_refused(bad):
    with pytest.raises(TypeError, match="sigma must be a number or a sequence of numbers"):
        losses.Gcdf(sigma=bad)
    with pytest.raises(TypeError, match="temperature must be a number"):
        ki.tempered_crossentropy([0], [[1.0, 0.0]], bad)


def test_labels_that_are_not_whole_numbers_are_refused():
    logits = np.zeros((2, 3), np.float32)
    with pytest.raises(ValueError, match=r"y_true: float labels must be whole numbers, got \[1.7\]"):
        ki.gcdf(np.array([1.7, 0.0]), logits, 1.0)
    np.testing.assert_array_equal(to_numpy(ki.zero_one_error(np.array([2.0, 0.0]), logits)), [1.0, 0.0])


@pytest.mark.parametrize("function", ["gcdf", "tempered_crossentropy", "multiclass_hinge", "zero_one_error"])
def test_rows_that_are_not_one_hot_are_refused(function):
    logits = np.array([[1.0, 0.0, 2.0], [0.5, 0.5, 0.0], [0.0, 3.0, 1.0]], np.float32)
    call = {"zero_one_error": lambda y: ki.zero_one_error(y, logits)}.get(
        function, lambda y: getattr(ki, function)(y, logits, 1.0))
    smoothed = np.array([[0.05, 0.05, 0.9], [0.9, 0.05, 0.05], [0.05, 0.9, 0.05]], np.float32)  # label smoothing
    with pytest.raises(ValueError, match=r"one-hot rows must hold one 1 among zeros, but 3 of 3 do not \(the first: "
                                         r"\[0.05000000074505806, 0.05000000074505806, 0.8999999761581421\]\)"):
        call(smoothed)
    padded = np.array([[0, 0, 1], [0, 0, 0], [0, 1, 0]], np.float32)  # an all-zero padding row
    with pytest.raises(ValueError, match=r"but 1 of 3 do not \(the first: \[0.0, 0.0, 0.0\]\)"):
        call(padded)
    one_hot = np.eye(3, dtype=np.float32)[[2, 0, 1]]
    np.testing.assert_allclose(to_numpy(call(one_hot)), to_numpy(call(np.array([2, 0, 1]))))


@tensorflow_only
def test_string_labels_are_refused_naming_y_true():
    with pytest.raises(TypeError, match="y_true must be integer labels or one-hot rows of numbers, got dtype string"):
        ki.gcdf(np.array(["a", "b"]), np.zeros((2, 3), np.float32), 1.0)


@tensorflow_only
def test_ragged_and_sparse_tensors_are_refused_naming_the_argument():
    import tensorflow as tf

    ragged = tf.ragged.constant([[1.0, 0.0], [0.0, 1.0, 2.0]])
    with pytest.raises(TypeError, match=r"y_pred must be a dense tensor, got a RaggedTensor: pad it, or pass "
                                        r"\.to_tensor\(\)"):
        ki.gcdf(tf.constant([0, 1]), ragged, sigma=1.0)
    sparse = tf.sparse.from_dense(tf.constant([[0.0, 1.0], [1.0, 0.0]]))
    with pytest.raises(TypeError, match="y_true must be a dense tensor, got a SparseTensor"):
        ki.multiclass_hinge(sparse, tf.zeros((2, 2)), margin=1.0)


def test_feature_norms_must_be_one_per_sample():
    labels, logits = random_batch(1, 3)
    with pytest.raises(ValueError, match="feature_norm and y_pred have different batch sizes: 3 and 1"):
        ki.gcdf(labels, logits, 1.0, feature_norm=np.array([1.0, 2.0, 3.0]))


def test_bad_feature_norm_raises():
    with pytest.raises(ValueError, match="feature_norm"):
        ki.gcdf([0], [[1.0, 0.0]], 1.0, feature_norm=0.0)
    with pytest.raises(ValueError, match="feature_norm"):
        ki.gcdf([0, 1], [[1.0, 0.0], [0.0, 1.0]], 1.0, feature_norm=np.array([1.0, -1.0]))
    with pytest.raises(ValueError, match="feature_norm"):
        ki.gcdf([0, 1], [[1.0, 0.0], [0.0, 1.0]], 1.0, feature_norm=np.array([1.0, np.inf]))
    gcdf = compiled(lambda y, s, norm: ki.gcdf(y, s, 1.0, feature_norm=norm))
    labels, logits = np.array([0, 1], np.int32), np.array([[1.0, 0.0], [0.0, 1.0]], np.float32)
    gcdf(labels, logits, np.array([1.0, 2.0], np.float32))  # compiles and runs fine
    for bad in ([1.0, -1.0], [0.0, 1.0], [np.nan, 1.0], [np.inf, 1.0]):
        bad_rows = [i for i, value in enumerate(bad) if not (np.isfinite(value) and value > 0)]
        assert_refused_when_compiled(lambda: gcdf(labels, logits, np.array(bad, np.float32)), "feature_norm",
                                     bad_rows)


def test_empty_panel_raises():
    with pytest.raises(ValueError, match="empty"):
        ki.panel_values([0], [[1.0, 0.0]])


@pytest.mark.parametrize("label", [-1, 3, 10])
def test_label_outside_range_raises_eagerly(label):
    with pytest.raises(ValueError, match="y_true: label outside"):
        ki.gcdf([0, label], np.zeros((2, 3), np.float32), 1.0)


@pytest.mark.parametrize("label", [-1, 3])
def test_label_outside_range_is_refused_when_compiled(label):
    panel = compiled(lambda labels, logits: ki.panel_values(labels, logits, [0, 1], [1], [0, 1], True))
    logits = np.random.default_rng(0).normal(size=(3, 3)).astype(np.float32)
    assert np.all(np.isfinite(to_numpy(panel(np.array([0, 2, 1], np.int32), logits))))  # compiles, runs fine
    # "y_true: label outside [0, classes)" (keras.ops path), "labels[1] = 3 is outside [0, 3)" (the op).
    assert_refused_when_compiled(lambda: panel(np.array([0, label, 1], np.int32), logits), r"outside \[0, ", [1])


@tensorflow_only
def test_under_tensorflow_xla_a_bad_label_gives_a_nan_row():
    """jit_compile=True (Keras' default on GPUs) drops TensorFlow's Assert ops: the keras.ops path's NaN rows are
    what remains, never a silent number (the fused op is not XLA-compilable, so XLA takes that path)."""
    import tensorflow as tf

    panel = tf.function(lambda y, s: ki.panel_values(y, s, sigmas=[0.5], temperatures=[1], margins=[1], error=True),
                        jit_compile=True)
    labels, logits = random_batch(4, 3)
    labels[2] = 7
    values = to_numpy(panel(labels, logits))
    assert np.all(np.isnan(values[2])) and np.all(np.isfinite(np.delete(values, 2, axis=0)))


@pytest.mark.parametrize("logits", [np.zeros(3), np.zeros((2, 3, 4)), np.zeros((2, 1))])
def test_logits_of_wrong_shape_raise(logits):
    with pytest.raises(ValueError, match="y_pred"):
        ki.gcdf(np.zeros(logits.shape[0] if logits.ndim else 1, int), logits.astype(np.float32), 1.0)


def test_batch_size_mismatch_raises():
    with pytest.raises(ValueError, match="batch"):
        ki.tempered_crossentropy([0, 1, 2], np.zeros((2, 3), np.float32), 1.0)
    with pytest.raises(ValueError, match="batch"):
        compiled(lambda y, s: ki.tempered_crossentropy(y, s, 1.0))(np.array([0, 1, 2]), np.zeros((2, 3), np.float32))


@tensorflow_only
def test_batch_size_mismatch_raises_with_dynamic_shapes():
    import tensorflow as tf

    @tf.function(input_signature=[tf.TensorSpec([None], tf.int32), tf.TensorSpec([None, 3], tf.float32)])
    def tce(labels, logits):
        return ki.tempered_crossentropy(labels, logits, 1.0)

    with pytest.raises(tf.errors.InvalidArgumentError, match="batch"):
        tce(tf.constant([0, 1, 2]), tf.zeros((2, 3)))


def test_nan_logits_give_nan_never_zero():
    logits = np.array([[np.nan, 0.0, 1.0], [0.0, np.nan, 1.0], [2.0, 1.0, 0.0]], np.float32)
    values = to_numpy(ki.panel_values([0, 0, 0], logits, sigmas=[0, 1], temperatures=[1], margins=[0, 1], error=True))
    assert np.all(np.isnan(values[:2]))
    assert np.all(np.isfinite(values[2]))


@functools.cache
def _fresh_interpreter(code: str, backend: str | None = None) -> str:
    """The stdout of ``code`` in a fresh interpreter (with ``KERAS_BACKEND=backend`` where given), run once per
    session: the child does not see the parent's forced panel path, so the ``keras`` and ``op``
    parametrizations of a test check the same child (instead of starting TensorFlow twice for one answer)."""
    env = dict(os.environ) if backend is None else {**os.environ, "KERAS_BACKEND": backend}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env).stdout


_NO_TFP = textwrap.dedent(
    """
    import sys
    import keras_implicit as ki
    ki.alt_loss_panel()
    ki.gcdf([0], [[1.0, 0.0]], 1.0)  # the default path
    for path in ["keras"] + (["op"] if ki.active_path() == "op" else []):  # each path this process has
        with ki.force_path(path):
            ki.gcdf([0], [[1.0, 0.0]], 1.0)
    print('tensorflow_probability' in sys.modules)
    """
)


def test_library_does_not_import_tensorflow_probability():
    output = _fresh_interpreter(_NO_TFP)
    assert output.strip().endswith("False")


@tensorflow_only
@pytest.mark.parametrize("backend", ["jax", "torch"])
def test_importing_on_another_backend_does_not_import_tensorflow(backend):
    pytest.importorskip(backend)
    code = ("import sys, keras, keras_implicit as ki; from keras_implicit import losses, metrics; "
            "ki.alt_loss_panel(); ki.gcdf([0], [[1.0, 0.0]], 1.0); "
            "print(keras.backend.backend(), ki.active_path(), 'tensorflow' in sys.modules)")
    output = _fresh_interpreter(code, backend)
    # On JAX, auto takes the FFI kernel wherever it is built (the CPU libraries), else keras.ops.
    package = Path(ki.__file__).parent
    ffi_built = any((package / name).exists() for name in ("_panel_ffi.so", "_panel_ffi_avx2.so"))
    path = "op" if backend == "jax" and ffi_built else "keras"
    assert output.strip().splitlines()[-1] == f"{backend} {path} False"


def test_phi_matches_tensorflow_probability():
    import tensorflow_probability as tfp

    # Binary Gcdf with sigma = 1 and the true class ahead by -x sqrt 2 is Phi(x).
    x = np.linspace(-12, 8, 401).astype(np.float32)
    logits = np.stack([np.zeros_like(x), x * np.float32(math.sqrt(2))], axis=1)
    ours = to_numpy(ki.gcdf(np.zeros(len(x), np.int32), logits, 1.0))
    theirs = to_numpy(tfp.distributions.Normal(0.0, 1.0).cdf(x))
    np.testing.assert_allclose(ours, theirs, rtol=1e-4, atol=0)
    np.testing.assert_allclose(ours, stats.norm.cdf(x.astype(np.float64)), rtol=1e-4)


# --------------------------------------------------------------------------- #
# Mixtures of the families: the explicit objectives of ce + lambda * family
# --------------------------------------------------------------------------- #
def _reference_hessian_trace(logits):
    """Tr of the CE's Hessian in the top kernel for unit features: the diagonal of diag(p) - p p^T, summed, with
    the Hessian written out per example as a matrix (NumPy, float64)."""
    p = np.exp(logits - logits.max(axis=1, keepdims=True))
    p /= p.sum(axis=1, keepdims=True)
    return np.array([np.trace(np.diag(row) - np.outer(row, row)) for row in p])


@pytest.mark.parametrize("expression, reference", [
    ("ce+0.1*gcdf@4", lambda y, s: ref_tce(y, s, 1.0) + 0.1 * ref_gcdf(y, s, 4.0)),
    ("ce+2*hinge@1", lambda y, s: ref_tce(y, s, 1.0) + 2 * ref_hinge(y, s, 1.0)),
    ("0.5*tce@4+gcdf@0.5+0.25*gcdf@8", lambda y, s: 0.5 * ref_tce(y, s, 4.0) + ref_gcdf(y, s, 0.5)
     + 0.25 * ref_gcdf(y, s, 8.0)),
    ("3*ce", lambda y, s: 3 * ref_tce(y, s, 1.0)),
    ("ce+0.5*trh", lambda y, s: ref_tce(y, s, 1.0) + 0.5 * _reference_hessian_trace(s)),
    ("hinge@1+2*trh+0.1*gcdf@2", lambda y, s: ref_hinge(y, s, 1.0) + 2 * _reference_hessian_trace(s)
     + 0.1 * ref_gcdf(y, s, 2.0)),
])
@pytest.mark.parametrize("classes, batch", [(3, 5), (10, 64)])
def test_a_mixture_is_the_weighted_sum_of_its_families(expression, reference, classes, batch, panel_path):
    labels, logits = random_batch(batch, classes, seed=11)
    values = to_numpy(losses.mixture(labels, logits, parse_objective(expression)))
    expected = reference(labels, logits.astype(np.float64))
    np.testing.assert_allclose(values, expected, rtol=2e-5, atol=1e-6)
    loss = losses.Mixture(expression)
    assert float(to_numpy(loss(labels, logits))) == pytest.approx(expected.mean(), rel=2e-5, abs=1e-6)


def test_mixture_config_round_trips_and_bad_expressions_are_refused():
    loss = losses.Mixture("ce+0.1*gcdf@4", feature_norm=2.0, name="objective")
    config = loss.get_config()
    assert config["loss"] == "ce+0.1*gcdf@4" and config["feature_norm"] == 2.0 and config["name"] == "objective"
    again = keras.losses.deserialize(keras.losses.serialize(loss))
    assert isinstance(again, losses.Mixture) and again.terms == ((1.0, "ce", None), (0.1, "gcdf", 4.0))
    for bad, message in (("ce+", "an empty term"), ("x*ce", "is not a number"), ("ce+ce", "appears twice"),
                         ("-1*ce", "finite number > 0"), ("ce+0.1*gcdf@0", "must be finite and > 0"),
                         ("mse", "unknown loss 'mse'"), ("trh", "not an objective by itself"),
                         ("0.5*trh", "not an objective by itself"), ("ce+trh+0.1*trh", "appears twice")):
        with pytest.raises(ValueError, match=message):
            losses.Mixture(bad)


@pytest.mark.parametrize("feature_norm", [None, 0.5, 3.0])
@pytest.mark.parametrize("classes, batch", [(2, 4), (10, 32)])
def test_the_hessian_trace_is_the_trace_of_the_autodiff_hessian_in_the_top_kernel(feature_norm, classes, batch):
    """Tr H of the CE in W for s = x W (||x|| the feature norm), against the diagonal of the Hessian that NumPy
    builds from the closed form d^2 CE / dW_ij dW_kl = x_i x_k (diag(p) - p p^T)_jl with a random direction of
    x: only ||x|| matters."""
    labels, logits = random_batch(batch, classes, seed=12)
    rng = np.random.default_rng(13)
    norm = 1.0 if feature_norm is None else feature_norm
    values = to_numpy(losses.crossentropy_hessian_trace(logits, feature_norm=feature_norm))
    for example in range(batch):
        x = rng.normal(size=5)
        x *= norm / np.linalg.norm(x)
        p = np.exp(logits[example] - logits[example].max())
        p /= p.sum()
        hessian = np.kron(np.outer(x, x), np.diag(p) - np.outer(p, p))  # [(i, j), (k, l)], W_ij row-major
        # 1 - sum p^2 cancels for a confident p: float32 leaves a few eps there, times ||x||^2.
        eps = float(np.finfo(np.float32).eps)
        assert values[example] == pytest.approx(np.trace(hessian), rel=1e-5, abs=8 * eps * norm ** 2)
    mixed = to_numpy(losses.mixture(labels, logits, parse_objective("ce+0.25*trh"), feature_norm=feature_norm))
    ce = to_numpy(losses.tempered_crossentropy(labels, logits, 1.0))
    np.testing.assert_allclose(mixed, ce + 0.25 * values, rtol=1e-6, atol=1e-7)
