"""Keras metrics for the alternative loss families, and the panel that tracks many at once.

``alt_loss_panel(...)`` returns one :class:`AltLossPanel` metric whose ``result()`` is a dict,
which Keras spreads into the logs under stable names: ``gcdf@0.5``, ``tce@2``, ``hinge@1``,
``error`` (``val_gcdf@0.5`` ... for validation data). All of its losses come from one shared
computation of the margins per batch (:func:`keras_implicit.losses.panel_values`).
"""

from __future__ import annotations

import keras
from keras import ops

from keras_implicit import losses as _losses
from keras_implicit.names import DEFAULT_MARGINS, DEFAULT_SIGMAS, DEFAULT_TEMPERATURES  # noqa: F401  (re-exported)

__all__ = [
    "Gcdf",
    "TemperedCrossentropy",
    "MulticlassHinge",
    "ZeroOneError",
    "AltLossPanel",
    "alt_loss_panel",
]


def declare_lower_is_better(metric: keras.metrics.Metric) -> None:
    """Lets ``EarlyStopping``/``ModelCheckpoint``/``ReduceLROnPlateau`` with ``mode="auto"`` minimize ``metric``.

    Keras 3 has no public way to say this: its ``MonitorCallback`` reads the private attribute
    ``_direction`` of the compiled metric whose *name* equals ``monitor`` (keras/src/callbacks/
    monitor_callback.py), which Keras' own metrics set in their constructors. This is the one place the
    library touches it; ``tests/test_metrics.py::test_monitor_callbacks_minimize_the_family_metrics`` fails
    if Keras changes the mechanism. The panel's entries (``gcdf@1`` in the logs) are not metrics of their
    own, so monitoring them needs ``mode="min"``.
    """
    metric._direction = "down"


# Keras' own pattern (keras/src/metrics/): a MeanMetricWrapper over the per-sample function, whose config is
# the metric's name and dtype plus every argument of the function.
# Registered as "GcdfMetric": the name "Gcdf" belongs to the loss of the same name.
@keras.saving.register_keras_serializable(package="keras_implicit", name="GcdfMetric")
class Gcdf(keras.metrics.MeanMetricWrapper):
    """Mean Gcdf loss (eq. 6) over samples, with sample weights; see :func:`keras_implicit.losses.gcdf`.

    Args:
        sigma: the noise level, >= 0.
        feature_norm: ||x|| as one positive number; None means 1.
        name: the metric name, default ``gcdf@<sigma>``.
        dtype: the dtype of the metric's variables.

    Example:
        >>> model.compile("sgd", "sparse_categorical_crossentropy", metrics=[Gcdf(sigma=1.0)])
    """

    def __init__(self, sigma=1.0, feature_norm=None, name=None, dtype=None):
        self.sigma = _losses.one_parameter(sigma, "sigma", allow_zero=True)
        _losses.validate_feature_norm_number(feature_norm)
        self.feature_norm = feature_norm
        name = name or _losses.panel_names(sigmas=[self.sigma])[0]
        super().__init__(_losses.gcdf, name=name, dtype=dtype, sigma=self.sigma, feature_norm=feature_norm)
        declare_lower_is_better(self)

    def get_config(self):
        return {"name": self.name, "dtype": self.dtype, "sigma": self.sigma, "feature_norm": self.feature_norm}


# Registered as "TemperedCrossentropyMetric": the name "TemperedCrossentropy" belongs to the loss of the same name.
@keras.saving.register_keras_serializable(package="keras_implicit", name="TemperedCrossentropyMetric")
class TemperedCrossentropy(keras.metrics.MeanMetricWrapper):
    """Mean tempered cross-entropy (eq. 7); see :func:`keras_implicit.losses.tempered_crossentropy`.

    Args:
        temperature: T > 0.
        name: the metric name, default ``tce@<T>``.
        dtype: the dtype of the metric's variables.
    """

    def __init__(self, temperature=1.0, name=None, dtype=None):
        self.temperature = _losses.one_parameter(temperature, "temperature", allow_zero=False)
        name = name or _losses.panel_names(temperatures=[self.temperature])[0]
        super().__init__(_losses.tempered_crossentropy, name=name, dtype=dtype, temperature=self.temperature)
        declare_lower_is_better(self)

    def get_config(self):
        return {"name": self.name, "dtype": self.dtype, "temperature": self.temperature}


# Registered as "MulticlassHingeMetric": the name "MulticlassHinge" belongs to the loss of the same name.
@keras.saving.register_keras_serializable(package="keras_implicit", name="MulticlassHingeMetric")
class MulticlassHinge(keras.metrics.MeanMetricWrapper):
    """Mean multi-class hinge loss (eq. 8); see :func:`keras_implicit.losses.multiclass_hinge`.

    Args:
        margin: gamma >= 0.
        name: the metric name, default ``hinge@<gamma>``.
        dtype: the dtype of the metric's variables.
    """

    def __init__(self, margin=1.0, name=None, dtype=None):
        self.margin = _losses.one_parameter(margin, "margin", allow_zero=True)
        name = name or _losses.panel_names(margins=[self.margin])[0]
        super().__init__(_losses.multiclass_hinge, name=name, dtype=dtype, margin=self.margin)
        declare_lower_is_better(self)

    def get_config(self):
        return {"name": self.name, "dtype": self.dtype, "margin": self.margin}


@keras.saving.register_keras_serializable(package="keras_implicit")
class ZeroOneError(keras.metrics.MeanMetricWrapper):
    """Mean zero-one error, ``1 -`` sparse categorical accuracy (ties resolved as argmax does).

    Args:
        name: the metric name, default ``error``.
        dtype: the dtype of the metric's variables.
    """

    def __init__(self, name="error", dtype=None):
        super().__init__(_losses.zero_one_error, name=name, dtype=dtype)
        declare_lower_is_better(self)

    def get_config(self):
        return {"name": self.name, "dtype": self.dtype}


@keras.saving.register_keras_serializable(package="keras_implicit")
class AltLossPanel(keras.metrics.Metric):
    """Many alternative losses as one metric: one shared computation per batch.

    ``result()`` is a dict ``{"gcdf@0.5": ..., "tce@2": ..., "hinge@1": ..., "error": ...}`` of
    sample-weighted means, which Keras spreads into the training and evaluation logs.

    Args:
        sigmas: Gcdf noise levels (eq. 6), each >= 0.
        temperatures: tempered cross-entropy temperatures (eq. 7), each > 0.
        margins: hinge margins (eq. 8), each >= 0.
        error: whether to track the zero-one error.
        feature_norm: ||x|| as one positive number for Gcdf; None means 1.
        name: the metric's own name (not shown in the logs).
        dtype: the dtype of the accumulators (default float32).
        prefix: put before every log name (``"digit_"`` gives ``digit_gcdf@1``). Keras does not rename the
            entries of a metric's dict result, so two panels of one model (one per output of a multi-output
            model, or one in ``metrics`` and one in ``weighted_metrics``) need different prefixes: their logs
            would otherwise share names and one panel's values would hide the other's.

    Example:
        >>> panel = AltLossPanel(sigmas=[0.5, 1], temperatures=[2], margins=[1])
        >>> panel.update_state([0, 1], [[2.0, 0.0], [0.0, 1.0]])
        >>> sorted(panel.result())
        ['error', 'gcdf@0.5', 'gcdf@1', 'hinge@1', 'tce@2']
    """

    def __init__(
        self,
        sigmas=DEFAULT_SIGMAS,
        temperatures=DEFAULT_TEMPERATURES,
        margins=DEFAULT_MARGINS,
        error=True,
        feature_norm=None,
        name="alt_loss_panel",
        dtype=None,
        prefix="",
    ):
        super().__init__(name=name, dtype=dtype)
        if not isinstance(prefix, str):
            raise TypeError(f"prefix must be a string, got {prefix!r}")
        self.prefix = prefix
        self.sigmas = parameter_list(sigmas, "sigma", allow_zero=True)
        self.temperatures = parameter_list(temperatures, "temperature", allow_zero=False)
        self.margins = parameter_list(margins, "margin", allow_zero=True)
        self.error = bool(error)
        _losses.validate_feature_norm_number(feature_norm)
        self.feature_norm = feature_norm
        self.names = _losses.panel_names(self.sigmas, self.temperatures, self.margins, self.error)
        if not self.names:
            raise ValueError("the panel is empty: give sigmas, temperatures, margins or error=True")
        self.totals = self.add_variable(shape=(len(self.names),), initializer="zeros", name="totals")
        self.count = self.add_variable(shape=(), initializer="zeros", name="count")

    def update_state(self, y_true, y_pred, sample_weight=None):
        values = _losses.panel_values(
            y_true, y_pred, self.sigmas, self.temperatures, self.margins, self.error, self.feature_norm
        )
        values = ops.cast(values, self.dtype)
        if sample_weight is None:
            self.totals.assign_add(ops.sum(values, axis=0))
            self.count.assign_add(ops.cast(ops.shape(values)[0], self.dtype))
            return
        weights = ops.cast(ops.convert_to_tensor(sample_weight), self.dtype)
        if len(weights.shape) == 2:
            weights = ops.squeeze(weights, axis=-1)
        weights = ops.broadcast_to(weights, ops.shape(values)[:1])
        self.totals.assign_add(ops.sum(values * weights[:, None], axis=0))
        self.count.assign_add(ops.sum(weights))

    def result(self):
        means = ops.divide_no_nan(self.totals, self.count)
        return {self.prefix + name: means[i] for i, name in enumerate(self.names)}

    def reset_state(self):
        self.totals.assign(ops.zeros(self.totals.shape, dtype=self.dtype))
        self.count.assign(ops.zeros((), dtype=self.dtype))

    def get_config(self):
        return {
            "sigmas": list(self.sigmas),
            "temperatures": list(self.temperatures),
            "margins": list(self.margins),
            "error": self.error,
            "feature_norm": self.feature_norm,
            "name": self.name,
            "dtype": self.dtype,
            "prefix": self.prefix,
        }


def parameter_list(values, name, allow_zero):
    return [float(v) for v in _losses.parameter_grid(values, name, allow_zero=allow_zero)]


def alt_loss_panel(
    sigmas=DEFAULT_SIGMAS,
    temperatures=DEFAULT_TEMPERATURES,
    margins=DEFAULT_MARGINS,
    error=True,
    feature_norm=None,
    prefix="",
):
    """The metrics to pass to ``model.compile(metrics=...)`` to track the paper's loss families.

    Returns a list holding one :class:`AltLossPanel`; its logs are named ``gcdf@<sigma>``,
    ``tce@<T>``, ``hinge@<gamma>`` and ``error``, parameters in their shortest decimal form.
    Defaults: sigma in 2^-4 .. 2^4 (9 values), T in 2^-2 .. 2^4 (7), gamma in 2^-2 .. 2^4 (7), and
    the error: 24 losses. Pass an empty list to leave a family out.

    Args:
        sigmas: Gcdf noise levels, each >= 0 (0 is the sigma -> 0 limit).
        temperatures: tempered cross-entropy temperatures, each > 0.
        margins: multi-class hinge margins, each >= 0.
        error: whether to track the zero-one error.
        feature_norm: ||x|| as one positive number; None means 1 (normalized features).
        prefix: put before every log name; give each panel of a model its own (one per output, or
            ``"weighted_"`` for one in ``weighted_metrics``): see :class:`AltLossPanel`.

    Returns:
        ``[AltLossPanel(...)]``.

    Example:
        >>> model.compile("sgd", "sparse_categorical_crossentropy",
        ...               metrics=alt_loss_panel(sigmas=[0.5, 1, 8], temperatures=[1, 4], margins=[1, 4]))
    """
    return [AltLossPanel(sigmas, temperatures, margins, error, feature_norm, prefix=prefix)]
