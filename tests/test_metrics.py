"""keras_implicit.metrics: weighted means against NumPy references, the panel, Keras integration, saving."""

import keras
import numpy as np
import pytest

import keras_implicit as ki
from keras_implicit import losses, metrics
from tests.backend import tensorflow_only
from tests.references import random_batch, ref_error, ref_gcdf, ref_hinge, ref_tce

pytestmark = pytest.mark.usefixtures("panel_path")


METRIC_CASES = [
    (metrics.Gcdf, {"sigma": 0.5}, "gcdf@0.5", lambda y, s: ref_gcdf(y, s, 0.5)),
    (metrics.Gcdf, {"sigma": 0.0}, "gcdf@0", lambda y, s: ref_gcdf(y, s, 0.0)),
    (metrics.TemperedCrossentropy, {"temperature": 4}, "tce@4", lambda y, s: ref_tce(y, s, 4.0)),
    (metrics.MulticlassHinge, {"margin": 1.0}, "hinge@1", lambda y, s: ref_hinge(y, s, 1.0)),
    (metrics.ZeroOneError, {}, "error", ref_error),
]


@pytest.mark.parametrize("metric_class,kwargs,name,reference", METRIC_CASES)
@pytest.mark.parametrize("batch_sizes", [(1,), (8, 3), (256, 256, 100)])
def test_metric_is_weighted_mean_over_batches(metric_class, kwargs, name, reference, batch_sizes):
    metric = metric_class(**kwargs)
    assert metric.name == name
    all_values, all_weights = [], []
    for i, batch in enumerate(batch_sizes):
        labels, logits = random_batch(batch, 10, seed=i)
        weights = np.random.default_rng(i).uniform(0, 2, batch).astype(np.float32)
        metric.update_state(labels, logits, sample_weight=weights)
        all_values.append(reference(labels, logits))
        all_weights.append(weights)
    values, weights = np.concatenate(all_values), np.concatenate(all_weights)
    assert float(metric.result()) == pytest.approx(np.sum(values * weights) / np.sum(weights), rel=1e-5)
    metric.reset_state()
    assert float(metric.result()) == 0.0


def test_zero_one_error_is_one_minus_accuracy():
    labels, logits = random_batch(500, 10)
    accuracy = keras.metrics.SparseCategoricalAccuracy()
    accuracy.update_state(labels, logits)
    error = metrics.ZeroOneError()
    error.update_state(labels, logits)
    assert float(error.result()) == pytest.approx(1.0 - float(accuracy.result()))


def test_default_panel_grids():
    assert len(metrics.DEFAULT_SIGMAS) + len(metrics.DEFAULT_TEMPERATURES) + len(metrics.DEFAULT_MARGINS) + 1 == 24
    for sigma in (0.5, 1.0, 8.0):  # the paper's figs. 6 and 15
        assert sigma in metrics.DEFAULT_SIGMAS
    for grid in (metrics.DEFAULT_SIGMAS, metrics.DEFAULT_TEMPERATURES, metrics.DEFAULT_MARGINS):
        ratios = np.diff(np.log2(grid))
        np.testing.assert_allclose(ratios, 1.0)  # log-spaced: powers of two
    (panel,) = ki.alt_loss_panel()
    assert panel.names[:9] == ["gcdf@0.0625", "gcdf@0.125", "gcdf@0.25", "gcdf@0.5", "gcdf@1", "gcdf@2", "gcdf@4",
                               "gcdf@8", "gcdf@16"]
    assert panel.names[-1] == "error" and "tce@1" in panel.names and "hinge@16" in panel.names


@pytest.mark.parametrize("classes", [2, 10, 100])
def test_panel_equals_individual_metrics(classes):
    sigmas, temperatures, margins = [0, 0.5, 1, 8], [1, 4], [1, 4]
    (panel,) = ki.alt_loss_panel(sigmas=sigmas, temperatures=temperatures, margins=margins)
    singles = [metrics.Gcdf(s) for s in sigmas] + [metrics.TemperedCrossentropy(t) for t in temperatures]
    singles += [metrics.MulticlassHinge(g) for g in margins] + [metrics.ZeroOneError()]
    # Batches of 64, 65 and 64 examples: of two sizes (not three: on JAX each new shape compiles every op again).
    for seed in range(3):
        batch = 64 + seed % 2
        labels, logits = random_batch(batch, classes, seed=seed)
        weights = np.random.default_rng(seed).uniform(0, 1, (batch, 1)).astype(np.float32)
        panel.update_state(labels, logits, sample_weight=weights)
        for metric in singles:
            metric.update_state(labels, logits, sample_weight=weights)
    result = panel.result()
    assert list(result) == [metric.name for metric in singles]
    for metric in singles:
        assert float(result[metric.name]) == pytest.approx(float(metric.result()), rel=1e-5, abs=1e-7)


def test_panel_computes_the_margins_once_per_batch(monkeypatch):
    calls = []
    original = losses.Margins.__init__

    def counting_init(self, *args, **kwargs):
        calls.append(1)
        original(self, *args, **kwargs)

    monkeypatch.setattr(losses.Margins, "__init__", counting_init)
    (panel,) = ki.alt_loss_panel()
    labels, logits = random_batch(32, 10)
    panel.update_state(labels, logits)
    assert len(calls) == (1 if ki.active_path() == "keras" else 0)  # the op computes its margins in C++
    assert len(panel.result()) == 24


def test_panel_rejects_bad_grids():
    with pytest.raises(ValueError, match="sigma"):
        ki.alt_loss_panel(sigmas=[-1])
    with pytest.raises(ValueError, match="temperature"):
        ki.alt_loss_panel(temperatures=[0])
    with pytest.raises(ValueError, match="margin"):
        ki.alt_loss_panel(margins=[float("nan")])
    with pytest.raises(ValueError, match="empty"):
        ki.alt_loss_panel(sigmas=[], temperatures=[], margins=[], error=False)
    with pytest.raises(ValueError, match="sigma has repeated values"):
        ki.alt_loss_panel(sigmas=[1, 1.0])


def test_panel_can_leave_families_out():
    (panel,) = ki.alt_loss_panel(sigmas=[1], temperatures=[], margins=None, error=False)
    labels, logits = random_batch(8, 3)
    panel.update_state(labels, logits)
    assert list(panel.result()) == ["gcdf@1"]


def _toy_problem(samples=512, features=12, classes=4, seed=0):
    rng = np.random.default_rng(seed)
    centers = 2 * rng.standard_normal((classes, features))
    labels = rng.integers(0, classes, samples)
    x = (centers[labels] + rng.standard_normal((samples, features))).astype(np.float32)
    return x, labels


def test_fit_and_evaluate_with_the_panel():
    x, labels = _toy_problem()
    keras.utils.set_random_seed(1)
    model = keras.Sequential([keras.Input((12,)), keras.layers.Dense(16, activation="relu"), keras.layers.Dense(4)])
    model.compile(
        keras.optimizers.SGD(0.05, momentum=0.9),
        keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=ki.alt_loss_panel(sigmas=[0.5, 1, 8], temperatures=[1, 4], margins=[1, 4]),
    )
    history = model.fit(x, labels, epochs=2, batch_size=64, validation_data=(x, labels), verbose=0)
    names = ["gcdf@0.5", "gcdf@1", "gcdf@8", "tce@1", "tce@4", "hinge@1", "hinge@4", "error"]
    for name in names:
        assert name in history.history and f"val_{name}" in history.history
    logs = model.evaluate(x, labels, batch_size=100, return_dict=True, verbose=0)
    logits = model.predict(x, verbose=0)
    assert logs["gcdf@0.5"] == pytest.approx(ref_gcdf(labels, logits, 0.5).mean(), rel=1e-4)
    assert logs["tce@4"] == pytest.approx(ref_tce(labels, logits, 4).mean(), rel=1e-4)
    assert logs["hinge@1"] == pytest.approx(ref_hinge(labels, logits, 1).mean(), rel=1e-4)
    assert logs["error"] == pytest.approx(ref_error(labels, logits).mean(), abs=1e-6)
    assert logs["tce@1"] == pytest.approx(logs["loss"], rel=1e-4)  # T = 1 is the training loss


def test_model_with_panel_and_metrics_survives_save_and_load(tmp_path):
    x, labels = _toy_problem(samples=128)
    model = keras.Sequential([keras.Input((12,)), keras.layers.Dense(4)])
    model.compile(
        "sgd",
        losses.TemperedCrossentropy(temperature=1.0),
        metrics=[*ki.alt_loss_panel(sigmas=[0.5, 8], temperatures=[2], margins=[1]), metrics.Gcdf(1.0),
                 metrics.TemperedCrossentropy(3.0), metrics.MulticlassHinge(2.0), metrics.ZeroOneError()],
    )
    model.fit(x, labels, verbose=0)
    before = model.evaluate(x, labels, return_dict=True, verbose=0)
    model.save(tmp_path / "m.keras")
    restored = keras.models.load_model(tmp_path / "m.keras")
    after = restored.evaluate(x, labels, return_dict=True, verbose=0)
    assert set(after) == set(before)
    for name, value in before.items():
        assert after[name] == pytest.approx(value, rel=1e-6), name


@pytest.mark.parametrize("metric", [
    metrics.AltLossPanel(sigmas=[0, 2], temperatures=[0.5], margins=[], error=False, feature_norm=3.0, name="p"),
    metrics.AltLossPanel(sigmas=[1], temperatures=[], margins=[2], name="q", prefix="digit_"),
    metrics.Gcdf(sigma=0.25, feature_norm=2.0, name="g"),
    metrics.TemperedCrossentropy(temperature=8.0),
    metrics.MulticlassHinge(margin=0.0, dtype="float64"),
    metrics.ZeroOneError(name="err"),
], ids=lambda metric: metric.name)
def test_metric_config_round_trip(metric):
    config = metric.get_config()
    restored = keras.saving.deserialize_keras_object(keras.saving.serialize_keras_object(metric))
    assert type(restored) is type(metric) and restored.get_config() == config
    labels, logits = random_batch(16, 5)
    metric.update_state(labels, logits)
    restored.update_state(labels, logits)
    result, restored_result = metric.result(), restored.result()
    if isinstance(result, dict):
        for name in result:
            assert float(restored_result[name]) == pytest.approx(float(result[name]))
    else:
        assert float(restored_result) == pytest.approx(float(result))


@tensorflow_only
def test_panel_under_distribution_strategy():
    import tensorflow as tf

    x, labels = _toy_problem(samples=256)
    strategy = tf.distribute.MirroredStrategy(["/cpu:0"])
    with strategy.scope():
        model = keras.Sequential([keras.Input((12,)), keras.layers.Dense(4)])
        model.compile("sgd", keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                      metrics=ki.alt_loss_panel(sigmas=[1], temperatures=[1], margins=[1]))
    logs = model.evaluate(x, labels, batch_size=64, return_dict=True, verbose=0)
    logits = model.predict(x, verbose=0)
    assert logs["gcdf@1"] == pytest.approx(ref_gcdf(labels, logits, 1.0).mean(), rel=1e-4)
    assert logs["tce@1"] == pytest.approx(logs["loss"], rel=1e-4)


_MONITOR_CASES = [
    (metrics.Gcdf(sigma=1.0), "gcdf@1"),
    (metrics.TemperedCrossentropy(temperature=2.0), "val_tce@2"),
    (metrics.MulticlassHinge(margin=1.0), "hinge@1"),
    (metrics.ZeroOneError(), "val_error"),
]


@pytest.fixture(scope="module")
def monitor_fits():
    """{panel path: {monitor: its EarlyStopping}}, filled by _stoppers."""
    return {}


def _stoppers(monitor_fits):
    """One fit per panel path with every metric of _MONITOR_CASES and one EarlyStopping(mode="auto") on each
    monitored name (patience 5 in 2 epochs: none stops, each infers its direction on its own), instead of one
    fit per metric: {monitor: stopper}."""
    path = ki.active_path()
    if path not in monitor_fits:
        labels, logits = random_batch(64, 4, seed=0)
        features = np.random.default_rng(1).normal(size=(64, 5)).astype(np.float32)
        model = keras.Sequential([keras.Input((5,)), keras.layers.Dense(4)])
        model.compile("sgd", keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                      metrics=[metric for metric, _ in _MONITOR_CASES])
        stoppers = {monitor: keras.callbacks.EarlyStopping(monitor=monitor, mode="auto", patience=5)
                    for _, monitor in _MONITOR_CASES}
        model.fit(features, labels, validation_data=(features, labels), epochs=2, verbose=0,
                  callbacks=list(stoppers.values()))
        monitor_fits[path] = stoppers
    return monitor_fits[path]


@pytest.mark.parametrize("metric,monitor", _MONITOR_CASES)
def test_monitor_callbacks_minimize_the_family_metrics(metric, monitor, monitor_fits):
    """EarlyStopping(mode="auto") learns from the metric that lower is better (metrics.declare_lower_is_better):
    if Keras changes how MonitorCallback infers the direction, this fails instead of silently maximizing."""
    stopper = _stoppers(monitor_fits)[monitor]
    assert stopper.monitor_op is keras.ops.less


def test_monitoring_a_panel_entry_needs_mode_min():
    labels, _ = random_batch(64, 4, seed=0)
    features = np.random.default_rng(1).normal(size=(64, 5)).astype(np.float32)
    model = keras.Sequential([keras.Input((5,)), keras.layers.Dense(4)])
    model.compile("sgd", keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                  metrics=ki.alt_loss_panel(sigmas=[1.0], temperatures=[], margins=[]))
    with pytest.raises(ValueError, match="mode='min'"):
        model.fit(features, labels, epochs=1, verbose=0,
                  callbacks=[keras.callbacks.EarlyStopping(monitor="gcdf@1", mode="auto")])
    stopper = keras.callbacks.EarlyStopping(monitor="gcdf@1", mode="min", patience=5)
    history = model.fit(features, labels, epochs=2, verbose=0, callbacks=[stopper])
    assert stopper.best == pytest.approx(min(history.history["gcdf@1"]))


def test_panels_of_two_outputs_and_a_weighted_panel_keep_apart_with_prefixes():
    """Keras spreads a dict result into the logs without its metric's name: panels with their own prefixes keep
    apart (each output's values from its logits, the weighted one weighted), without them one hides the other."""
    rng = np.random.default_rng(3)
    x = rng.normal(size=(48, 4)).astype(np.float32)
    labels = {"digit": rng.integers(0, 5, 48), "parity": rng.integers(0, 2, 48)}
    weights = rng.uniform(0, 2, 48).astype(np.float32)
    inputs = keras.Input((4,))
    model = keras.Model(inputs, {"digit": keras.layers.Dense(5)(inputs), "parity": keras.layers.Dense(2)(inputs)})
    panel = dict(sigmas=[1], temperatures=[2], margins=[], error=False)
    model.compile("sgd", {"digit": losses.TemperedCrossentropy(1.0), "parity": losses.TemperedCrossentropy(1.0)},
                  metrics={"digit": ki.alt_loss_panel(**panel, prefix="digit_"),
                           "parity": ki.alt_loss_panel(**panel, prefix="parity_")},
                  weighted_metrics={"digit": ki.alt_loss_panel(**panel, prefix="weighted_digit_")})
    logs = model.evaluate(x, labels, sample_weight=weights, batch_size=48, verbose=0, return_dict=True)
    logits = {k: np.asarray(v) for k, v in model.predict(x, batch_size=48, verbose=0).items()}
    for output in ("digit", "parity"):
        y, s = labels[output], logits[output]
        assert logs[f"{output}_gcdf@1"] == pytest.approx(ref_gcdf(y, s, 1.0).mean(), rel=1e-5)
        assert logs[f"{output}_tce@2"] == pytest.approx(ref_tce(y, s, 2.0).mean(), rel=1e-5)
    weighted = np.sum(ref_gcdf(labels["digit"], logits["digit"], 1.0) * weights) / weights.sum()
    assert logs["weighted_digit_gcdf@1"] == pytest.approx(weighted, rel=1e-5)
    assert logs["weighted_digit_gcdf@1"] != pytest.approx(logs["digit_gcdf@1"], rel=1e-3)
    with pytest.raises(TypeError, match="prefix must be a string"):
        ki.alt_loss_panel(prefix=1)
