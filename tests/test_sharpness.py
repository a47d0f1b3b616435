"""keras_implicit.sharpness: the noisy error against exact quadrature and an independent NumPy Monte Carlo that
perturbs the weights themselves, the Hessian trace against automatic differentiation, Gcdf >= noisy error on
trained models, and the tracker's and run's records."""

import math

import keras
import numpy as np
import pytest
from scipy import special

from keras_implicit import callbacks, losses, metrics, sharpness
from keras_implicit.models import make_model
from tests.backend import hessian, to_numpy
from tests.references import numpy_fc6, random_batch, ref_gcdf, ref_noisy_error


@pytest.fixture(scope="module")
def trained():
    """fc6 trained on a learnable 4-class problem (36 pixels) down to a small training CE."""
    rng = np.random.default_rng(0)
    x = rng.random((400, 6, 6, 1)).astype(np.float32)
    y = (np.arange(400) % 4).astype(np.int32)
    x[np.arange(400), y, y, 0] += 1.5
    model = make_model("fc6", (6, 6, 1), 4, seed=0)
    model.compile(keras.optimizers.SGD(0.3, momentum=0.9), keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    model.fit(x, y, batch_size=50, epochs=6, verbose=0)
    return model, x, y


def _ce(labels, logits):
    return -special.log_softmax(np.asarray(logits, np.float64), axis=1)[np.arange(len(labels)), labels]


# --------------------------------------------------------------------------- #
# The functional core
# --------------------------------------------------------------------------- #
@pytest.mark.parametrize("classes", [2, 5, 10])
@pytest.mark.parametrize("sigma", [0.25, 1.0, 4.0])
def test_noisy_error_per_sample_against_exact_quadrature(classes, sigma):
    labels, logits = random_batch(8, classes, scale=2.0, seed=3)
    norms = np.linspace(0.5, 2.0, 8).astype(np.float32)
    draws = 4000
    estimate = to_numpy(sharpness.noisy_error(labels, logits, sigma, draws=draws, seed=7, feature_norm=norms))
    exact = ref_noisy_error(labels, logits, sigma, norms)
    assert estimate.shape == (8,)
    np.testing.assert_allclose(estimate * draws, np.round(estimate * draws), atol=1e-3)  # counts of wrong draws
    # Binomial: within 5 standard errors (plus one draw) of the exact value, for each sample.
    tolerance = 5 * np.sqrt(exact * (1 - exact) / draws) + 1.0 / draws
    np.testing.assert_array_less(np.abs(estimate - exact), tolerance)
    # The union bound: Gcdf (eq. 6) >= the exact noisy error, sample by sample.
    assert np.all(ref_gcdf(labels, logits, sigma, norms) >= exact * (1 - 1e-7) - 1e-9)  # equal with one rival


def test_noisy_error_grid_shares_draws_and_seed_fixes_them():
    labels, logits = random_batch(16, 5, seed=1)
    grid = to_numpy(sharpness.noisy_error(labels, logits, [0.0, 0.5, 2.0], draws=64, seed=3))
    assert grid.shape == (16, 3)
    np.testing.assert_array_equal(grid[:, 0], to_numpy(losses.zero_one_error(labels, logits)))  # sigma 0: the error
    single = to_numpy(sharpness.noisy_error(labels, logits, 2.0, draws=64, seed=3))
    np.testing.assert_array_equal(grid[:, 2], single)  # one draw per (sample, draw) whatever the grid
    other = to_numpy(sharpness.noisy_error(labels, logits, 2.0, draws=64, seed=4))
    assert not np.array_equal(single, other)


@pytest.mark.parametrize("classes", [2, 10])
def test_noisy_crossentropy_at_zero_is_the_crossentropy_and_grows_with_sigma(classes):
    labels, logits = random_batch(32, classes, seed=2)
    values = to_numpy(sharpness.noisy_crossentropy(labels, logits, [0.0, 0.5, 2.0, 8.0], draws=512, seed=0))
    np.testing.assert_allclose(values[:, 0], _ce(labels, logits), rtol=1e-5, atol=1e-6)
    # Jensen: the CE is convex in the logits, so the noise raises it on average (means over 32 samples x 512 draws).
    means = values.mean(axis=0)
    assert means[0] < means[1] < means[2] < means[3]


@pytest.mark.parametrize("classes", [2, 3, 7])
def test_hessian_trace_against_second_derivatives_by_autodiff(classes):
    rng = np.random.default_rng(classes)
    features, batch = 4, 3
    x = rng.normal(size=(batch, features))  # not normalized: the trace scales with ||x||^2
    kernel = rng.normal(size=(features, classes))
    bias = rng.normal(size=classes)
    labels = rng.integers(0, classes, batch)
    logits = x @ kernel + bias
    library = to_numpy(sharpness.crossentropy_hessian_trace(logits.astype(np.float32),
                                                            feature_norm=np.linalg.norm(x, axis=1)))
    for b in range(batch):
        def ce(w, b=b):
            kernel_w = keras.ops.reshape(w, (features, classes))
            scores = keras.ops.matmul(keras.ops.convert_to_tensor(x[b:b + 1]), kernel_w)
            scores = scores + keras.ops.convert_to_tensor(bias[None, :])
            return keras.ops.sum(keras.losses.sparse_categorical_crossentropy(labels[b:b + 1], scores,
                                                                              from_logits=True))

        trace = np.trace(hessian(ce, kernel.reshape(-1)))
        assert library[b] == pytest.approx(trace, rel=1e-5)


@pytest.mark.parametrize("sigma", [0.0, 0.5, 4.0])
def test_eq9_is_its_formula(sigma):
    labels, logits = random_batch(20, 6, seed=4)
    norms = np.linspace(0.5, 1.5, 20)
    p = special.softmax(logits.astype(np.float64), axis=1)
    trace = norms ** 2 * np.sum(p * (1 - p), axis=1)
    expected = (_ce(labels, logits) + sigma ** 2 / 2 * trace) / math.log(2)
    values = to_numpy(sharpness.eq9(labels, logits, sigma, feature_norm=norms.astype(np.float32)))
    # Tr H = ||x||^2 (1 - sum p^2) cancels: in float32 its absolute error is a few eps times ||x||^2, whatever
    # the softmax kernel (another CPU's exp or reduction order moves p by an ulp).
    trace_rounding = 4 * np.finfo(np.float32).eps * sigma ** 2 / 2 * norms ** 2 / math.log(2)
    np.testing.assert_array_less(np.abs(values - expected), 1e-5 * np.abs(expected) + trace_rounding + 1e-12)


def test_eq9_is_the_second_order_expansion_of_the_noisy_crossentropy():
    # At small sigma, E[CE(s + sigma z)] - CE = sigma^2 / 2 Tr H + O(sigma^4). The draws' first-order term has
    # mean 0 and a spread of order sigma: averaged over 64 samples x 2000 draws it is ~4e-4, against a
    # second-order term of ~1e-2 at sigma = 0.2.
    labels, logits = random_batch(64, 5, scale=1.5, seed=5)
    sigma = 0.2
    measured = to_numpy(sharpness.noisy_crossentropy(labels, logits, sigma, draws=2000, seed=9)) - _ce(labels, logits)
    second_order = to_numpy(sharpness.eq9(labels, logits, sigma)) * math.log(2) - _ce(labels, logits)
    assert np.mean(second_order) > 5e-3
    assert np.mean(measured) == pytest.approx(np.mean(second_order), rel=0.1)


@pytest.mark.parametrize("bad, message", [
    ({"draws": 1}, "draws must be an integer >= 2"),
    ({"draws": 2.5}, "draws must be an integer >= 2"),
    ({"draws": True}, "draws must be an integer >= 2"),
    ({"seed": -1}, "seed must be an integer"),
    ({"seed": 2 ** 32}, "seed must be an integer"),
    ({"sigma": -0.5}, "sigma must be >= 0"),
    ({"sigma": [1.0, math.nan]}, "sigma must be finite"),
])
def test_bad_arguments_are_refused(bad, message):
    arguments = {"sigma": 1.0, "draws": 8, "seed": 0, **bad}
    with pytest.raises(ValueError, match=message):
        sharpness.noisy_error([0, 1], [[1.0, 0.0], [0.0, 1.0]], **arguments)


def test_bad_labels_are_refused():
    with pytest.raises(ValueError, match="label"):
        sharpness.noisy_error([0, 2], [[1.0, 0.0], [0.0, 1.0]], 1.0)
    with pytest.raises(ValueError, match="label"):
        sharpness.eq9([0, -1], [[1.0, 0.0], [0.0, 1.0]], 1.0)


# --------------------------------------------------------------------------- #
# Whole datasets: against a NumPy Monte Carlo that perturbs the top layer's weights
# --------------------------------------------------------------------------- #
def _weight_noise_reference(model, x, y, sigma, draws, seed):
    """Noisy error and CE, each (mean, standard error over draws), by drawing the whole top kernel W + E with
    E ~ N(0, sigma^2 I) (shared by all examples in a draw) and running the top layer in NumPy float64."""
    _, features = numpy_fc6(model, x)
    top = model.get_layer("logits")
    kernel, bias = to_numpy(top.kernel).astype(np.float64), to_numpy(top.bias).astype(np.float64)
    rng = np.random.default_rng(seed)
    errors, ces = [], []
    for _ in range(draws):
        logits = features @ (kernel + sigma * rng.standard_normal(kernel.shape)) + bias
        errors.append(np.mean(np.argmax(logits, axis=1) != y))
        ces.append(np.mean(_ce(y, logits)))
    errors, ces = np.array(errors), np.array(ces)
    return (errors.mean(), errors.std(ddof=1) / math.sqrt(draws)), (ces.mean(), ces.std(ddof=1) / math.sqrt(draws))


def test_evaluate_sharpness_against_a_weight_noise_monte_carlo(trained):
    model, x, y = trained
    sigmas = metrics.DEFAULT_SIGMAS
    values = sharpness.evaluate_sharpness(model, x, y, sigmas=sigmas, draws=256, seed=1, batch_size=128)
    assert list(values) == sharpness.sharpness_names(sigmas)
    logits, features = numpy_fc6(model, x)
    p = special.softmax(logits, axis=1)
    trace = np.mean(np.sum(p * (1 - p), axis=1))
    assert values["hessian_trace"] == pytest.approx(trace, rel=1e-4)
    for sigma in sigmas:
        name = losses.format_parameter(sigma)
        (error, error_se), (ce, ce_se) = _weight_noise_reference(model, x, y, sigma, draws=300, seed=2)
        difference = abs(values[f"noisy_error@{name}"] - error)
        assert difference <= 4.5 * math.hypot(values[f"noisy_error_se@{name}"], error_se) + 1e-12, sigma
        assert values[f"noisy_ce@{name}"] == pytest.approx(ce, abs=5 * ce_se + 2e-3 * ce), sigma
        expected_eq9 = (np.mean(_ce(y, logits)) + sigma ** 2 / 2 * trace) / math.log(2)
        assert values[f"eq9@{name}"] == pytest.approx(expected_eq9, rel=1e-4)
    # Not a vacuous comparison: the noise changes predictions at large sigma and hardly at small sigma.
    assert values["noisy_error@16"] > 0.3 > values["noisy_error@0.0625"]


def test_the_standard_error_is_the_spread_of_repeated_estimates(trained):
    model, x, y = trained
    estimates, errors = [], []
    for seed in range(12):
        values = sharpness.evaluate_sharpness(model, x[:100], y[:100], sigmas=[2.0], draws=16, seed=seed)
        estimates.append(values["noisy_error@2"])
        errors.append(values["noisy_error_se@2"])
    # The standard deviation of 12 independent estimates against the mean reported standard error (a ratio
    # whose 12-sample spread is about +-20 %).
    assert np.std(estimates, ddof=1) == pytest.approx(np.mean(errors), rel=0.5)


def test_batches_are_cut_to_the_noise_budget(trained, monkeypatch):
    model, x, y = trained
    whole = sharpness.evaluate_sharpness(model, x, y, sigmas=[1.0], draws=32, seed=0)
    monkeypatch.setattr(sharpness, "NOISE_BUDGET", 32 * 4 * 50)  # 50 examples per call
    assert sharpness.noise_batch_size(4096, 32, 4) == 50
    cut = sharpness.evaluate_sharpness(model, x, y, sigmas=[1.0], draws=32, seed=0)
    assert cut["noisy_error@1"] != whole["noisy_error@1"] or cut["noisy_ce@1"] != whole["noisy_ce@1"]  # new draws
    assert cut["noisy_error@1"] == pytest.approx(whole["noisy_error@1"],
                                                 abs=5 * math.hypot(cut["noisy_error_se@1"], whole["noisy_error_se@1"]))
    assert cut["eq9@1"] == pytest.approx(whole["eq9@1"], rel=1e-5)  # no draws in eq. 9


def test_evaluate_sharpness_takes_labels_in_every_format(trained):
    # [N, 1] as keras.datasets.cifar10 gives them, and one-hot rows: the same values as [N], the same draws.
    model, x, y = trained
    y = np.asarray(y)
    expected = sharpness.evaluate_sharpness(model, x[:64], y[:64], sigmas=[0.5, 2.0], draws=8, seed=3)
    for labels in (y[:64, None], np.eye(int(y.max()) + 1, dtype=np.float32)[y[:64]], y[:64].astype(np.float32)):
        values = sharpness.evaluate_sharpness(model, x[:64], labels, sigmas=[0.5, 2.0], draws=8, seed=3)
        assert values == pytest.approx(expected, rel=1e-6, abs=1e-9)
    with pytest.raises(ValueError, match="one-hot rows must hold one 1"):
        sharpness.evaluate_sharpness(model, x[:4], np.full((4, 4), 0.25), sigmas=[1.0], draws=8)


# --------------------------------------------------------------------------- #
# The tracker
# --------------------------------------------------------------------------- #
def test_gcdf_bounds_the_noisy_error_on_a_trained_model_at_every_sigma(trained):
    model, x, y = trained
    tracker = callbacks.AltLossTracker((x, y), (x[:150], y[:150]), noisy_error_draws=128, noise_seed=5,
                                       steps_per_epoch=8)
    tracker.set_model(model)
    for split in ("train", "test"):
        values = tracker.evaluate(split, step=3)
        assert values["ce"] < 0.3  # trained
        for sigma in metrics.DEFAULT_SIGMAS:
            name = losses.format_parameter(sigma)
            assert values[f"gcdf@{name}"] >= values[f"noisy_error@{name}"] - 3 * values[f"noisy_error_se@{name}"]
        # The panel is the same with and without the draws.
        plain = callbacks.AltLossTracker((x, y), (x[:150], y[:150]), steps_per_epoch=8)
        plain.set_model(model)
        for name, value in plain.evaluate(split).items():
            assert values[name] == pytest.approx(value, rel=1e-6, abs=1e-9)


def test_tracker_records_and_draws_per_step(trained, tmp_path):
    model, x, y = trained
    tracker = callbacks.AltLossTracker((x, y), sigmas=(0.5, 4.0), noisy_error_draws=16, noise_seed=2,
                                       steps_per_epoch=8, metrics_path=str(tmp_path / "metrics.jsonl"),
                                       log_dir=str(tmp_path / "tb"), batch_size=128)
    tracker.set_model(model)
    first, again, later = tracker.evaluate("train", 4), tracker.evaluate("train", 4), tracker.evaluate("train", 8)
    assert first == again  # the same step: the same draws
    assert first["noisy_ce@4"] != later["noisy_ce@4"]  # another step: other draws, same weights
    record = tracker.track(8)[0]
    for name in ("noisy_error@0.5", "noisy_error_se@4", "noisy_ce@0.5", "eq9@4", "hessian_trace"):
        assert name in record and name in tracker.metric_names
    assert record["noisy_error@4"] == later["noisy_error@4"]
    tracker.close()


def test_tracker_refuses_bad_draws():
    x, y = np.zeros((4, 3), np.float32), np.zeros(4, np.int32)
    with pytest.raises(ValueError, match="draws must be an integer >= 2"):
        callbacks.AltLossTracker((x, y), noisy_error_draws=1)
    with pytest.raises(ValueError, match="needs sigmas"):
        callbacks.AltLossTracker((x, y), sigmas=(), noisy_error_draws=8)
