"""The paper's alternative loss families: one definition of each formula.

Everything here works on the *margins* ``d_j = s_j - s_y`` of a batch of logits
``s`` ([batch, classes]) against integer labels ``y``. They are computed once per
batch and shared by every family and every parameter value, which is how
:func:`panel_values` evaluates dozens of losses in one pass.

Families (paper equation numbers in brackets):

========================  ==========  ================================================
family                    parameter   per-sample value
========================  ==========  ================================================
Gcdf [eq. 6]              sigma >= 0  sum_{j!=y} Phi((s_j - s_y) / (sqrt(2) sigma ||x||))
tempered CE [eq. 7]       T > 0       -log softmax(s / T)_y
multi-class hinge [eq. 8] gamma >= 0  sum_{j!=y} max(0, gamma + s_j - s_y)
zero-one error            --          1 - [argmax_j s_j == y]
========================  ==========  ================================================

The functional core returns per-sample values: ``[batch]`` for one parameter,
``[batch, K]`` for a sequence of K parameters. The ``Loss`` classes at the bottom
are thin wrappers for training on a family.
"""

from __future__ import annotations

import math
import numbers
from typing import Sequence, Union

import keras
import numpy as np
import tensorflow as tf

from keras_implicit import _op

__all__ = [
    "gcdf",
    "tempered_crossentropy",
    "multiclass_hinge",
    "zero_one_error",
    "panel_values",
    "panel_names",
    "format_parameter",
    "parameter_grid",
    "Gcdf",
    "TemperedCrossentropy",
    "MulticlassHinge",
]

Parameters = Union[float, Sequence[float], np.ndarray]

_SQRT2 = math.sqrt(2.0)

# Family keys, in the column order of panel_values; also the metric-name prefixes.
GCDF, TCE, HINGE, ERROR = "gcdf", "tce", "hinge", "error"


# --------------------------------------------------------------------------- #
# Validation and preparation
# --------------------------------------------------------------------------- #
def format_parameter(value: float) -> str:
    """The shortest decimal form of a parameter, as used in metric names.

    ``1.0 -> "1"``, ``0.5 -> "0.5"``, ``0.0625 -> "0.0625"``, ``1e-05 -> "1e-05"``.
    """
    text = repr(float(value))
    return text[:-2] if text.endswith(".0") else text


def _validate_parameters(values, name: str, *, allow_zero: bool):
    """Returns (float64 1-D array, was_scalar). Raises ValueError naming `name`."""
    if isinstance(values, (tf.Tensor, tf.Variable)):
        raise TypeError(
            f"{name} must be a Python number or a sequence of numbers, not a tensor "
            "(parameters are fixed per loss so that metric names stay stable)."
        )
    scalar = isinstance(values, numbers.Number) or np.ndim(values) == 0
    try:
        array = np.atleast_1d(np.asarray(values, dtype=np.float64))
    except (TypeError, ValueError) as error:
        raise TypeError(f"{name} must be a number or a sequence of numbers, got {values!r}") from error
    if array.ndim != 1:
        raise ValueError(f"{name} must be a number or a flat sequence of numbers, got shape {array.shape}")
    if array.size == 0:
        raise ValueError(f"{name} is empty: give at least one value")
    if not np.all(np.isfinite(array)):
        raise ValueError(f"{name} must be finite, got {array.tolist()}")
    bound_ok = array >= 0 if allow_zero else array > 0
    if not np.all(bound_ok):
        relation = ">= 0" if allow_zero else "> 0"
        raise ValueError(f"{name} must be {relation}, got {array.tolist()}")
    return array, scalar


def parameter_grid(values, name: str, *, allow_zero: bool) -> np.ndarray:
    """A validated float64 grid of one family's parameters; None or an empty sequence gives an empty grid."""
    if values is None or (not isinstance(values, numbers.Number) and np.size(values) == 0):
        return np.zeros(0)
    return _validate_parameters(values, name, allow_zero=allow_zero)[0]


def _compute_dtype(logits: tf.Tensor) -> tf.DType:
    # float16/bfloat16 logits are computed in float32: erfc and exp tails underflow in half precision.
    if logits.dtype in (tf.float32, tf.float64):
        return logits.dtype
    return tf.float32


def _prepare(y_true, y_pred):
    """Validates shapes and returns (labels int32 [B], logits [B, C] float32/64)."""
    logits = tf.convert_to_tensor(y_pred)
    if not logits.dtype.is_floating:
        logits = tf.cast(logits, tf.float32)
    logits = tf.cast(logits, _compute_dtype(logits))
    if logits.shape.rank is not None and logits.shape.rank != 2:
        raise ValueError(
            f"y_pred must be logits of rank 2 [batch, classes], got shape {logits.shape}"
        )
    classes = logits.shape[-1] if logits.shape.rank == 2 else None
    if classes is not None and classes < 2:
        raise ValueError(f"y_pred must have at least 2 classes, got shape {logits.shape}")

    labels = tf.convert_to_tensor(y_true)
    rank = labels.shape.rank
    if rank == 2 and labels.shape[-1] == 1:
        labels = tf.squeeze(labels, axis=-1)
    elif rank == 2:
        if classes is not None and labels.shape[-1] is not None and labels.shape[-1] != classes:
            raise ValueError(
                f"y_true must be integer labels [batch] or [batch, 1], or one-hot [batch, classes]; "
                f"got shape {labels.shape} for y_pred of shape {logits.shape}"
            )
        labels = tf.argmax(labels, axis=-1, output_type=tf.int32)
    elif rank is not None and rank != 1:
        raise ValueError(
            f"y_true must be integer labels [batch] or [batch, 1], or one-hot [batch, classes]; "
            f"got shape {labels.shape}"
        )
    if not labels.dtype.is_integer:
        labels = tf.cast(labels, logits.dtype)
    labels = tf.cast(labels, tf.int32)

    static_batch = (labels.shape[0], logits.shape[0])
    if None not in static_batch and static_batch[0] != static_batch[1]:
        raise ValueError(
            f"y_true and y_pred have different batch sizes: {static_batch[0]} and {static_batch[1]}"
        )
    num_classes = tf.shape(logits)[-1]
    checks = [
        tf.debugging.assert_equal(
            tf.shape(labels)[0], tf.shape(logits)[0],
            message="y_true and y_pred have different batch sizes",
        ),
        tf.debugging.assert_non_negative(labels, message="y_true: label outside [0, classes)"),
        tf.debugging.assert_less(labels, num_classes, message="y_true: label outside [0, classes)"),
    ]
    with tf.control_dependencies(checks):
        labels = tf.identity(labels)
    return labels, logits


def _feature_norm_tensor(feature_norm, dtype):
    """None -> None; a positive scalar or one per sample -> tensor [B, 1] or scalar."""
    if feature_norm is None:
        return None
    if isinstance(feature_norm, numbers.Number):
        if not (math.isfinite(feature_norm) and feature_norm > 0):
            raise ValueError(f"feature_norm must be a finite number > 0, got {feature_norm!r}")
        return tf.constant(feature_norm, dtype)
    norm = tf.cast(tf.convert_to_tensor(feature_norm), dtype)
    if norm.shape.rank == 2:
        norm = tf.squeeze(norm, axis=-1)
    if norm.shape.rank not in (0, 1):
        raise ValueError(f"feature_norm must be a scalar or one value per sample, got shape {norm.shape}")
    check = tf.debugging.assert_positive(norm, message="feature_norm must be > 0")
    with tf.control_dependencies([check]):
        norm = tf.identity(norm)
    return norm if norm.shape.rank == 0 else norm[:, None]


class _Margins:
    """The shared part of every family: d_j = s_j - s_y and the mask j != y."""

    def __init__(self, labels: tf.Tensor, logits: tf.Tensor):
        self.labels = labels
        self.logits = logits
        true_score = tf.gather(logits, labels[:, None], axis=1, batch_dims=1)  # [B, 1]
        self.d = logits - true_score  # [B, C]
        classes = tf.shape(logits)[-1]
        self.others = tf.logical_not(tf.one_hot(labels, classes, on_value=True, off_value=False, dtype=tf.bool))
        self.has_nan = tf.reduce_any(tf.math.is_nan(logits), axis=-1)  # [B]

    def masked_sum(self, values: tf.Tensor) -> tf.Tensor:
        """Sum over j != y of a [B, C] tensor."""
        return tf.reduce_sum(tf.where(self.others, values, tf.zeros_like(values)), axis=-1)


# --------------------------------------------------------------------------- #
# The formulas: one definition each, per sample, on shared margins.
# --------------------------------------------------------------------------- #
def _normal_cdf(x: tf.Tensor) -> tf.Tensor:
    # Phi(x) = erfc(-x / sqrt 2) / 2 keeps relative accuracy in the lower tail, where 0.5 * (1 + erf) cancels.
    return 0.5 * tf.math.erfc(-x / _SQRT2)


def _gcdf_column(m: _Margins, sigma: float, norm) -> tf.Tensor:
    d = m.d
    if sigma == 0.0:
        # The limit sigma -> 0: each class that beats y counts 1, a tie counts 1/2.
        beats = tf.cast(d > 0, d.dtype) + 0.5 * tf.cast(tf.equal(d, 0), d.dtype)
        return m.masked_sum(beats)
    scale = _SQRT2 * sigma
    z = d / scale if norm is None else d / (scale * norm)
    return m.masked_sum(_normal_cdf(z))


def _tce_column(m: _Margins, temperature: float) -> tf.Tensor:
    # -log softmax(s/T)_y = log(1 + sum_{j!=y} exp(d_j / T)) = softplus(logsumexp_{j!=y} d_j / T):
    # accurate both for tiny losses (softplus(x) ~ exp(x)) and for large logits (softplus(x) ~ x).
    scaled = tf.where(m.others, m.d / temperature, tf.cast(-np.inf, m.d.dtype))
    return tf.nn.softplus(tf.reduce_logsumexp(scaled, axis=-1))


def _hinge_column(m: _Margins, margin: float) -> tf.Tensor:
    return m.masked_sum(tf.nn.relu(margin + m.d))


def _error_column(m: _Margins) -> tf.Tensor:
    # 1 - [argmax s == y], with argmax's tie rule (the lowest index wins), from the margins:
    # y loses to j < y on s_j >= s_y and to j > y on s_j > s_y.
    classes = tf.shape(m.d)[-1]
    before = tf.range(classes)[None, :] < m.labels[:, None]
    loses = tf.logical_and(m.others, tf.logical_or(m.d > 0, tf.logical_and(tf.equal(m.d, 0), before)))
    return tf.cast(tf.reduce_any(loses, axis=-1), m.d.dtype)


def _panel_pure_tf(labels, logits, feature_norm, sigmas, temperatures, margins, error) -> tf.Tensor:
    """The vectorized TensorFlow path: [B, K1 + K2 + K3 + error] from one set of margins."""
    m = _Margins(labels, logits)
    columns = [_gcdf_column(m, float(s), feature_norm) for s in sigmas]
    columns += [_tce_column(m, float(t)) for t in temperatures]
    columns += [_hinge_column(m, float(g)) for g in margins]
    if error:
        columns.append(_error_column(m))
    values = tf.stack(columns, axis=-1)
    # NaN logits give NaN in every column, never a silent 0 from a comparison.
    return tf.where(m.has_nan[:, None], tf.cast(np.nan, values.dtype), values)


def panel_values(
    y_true,
    y_pred,
    sigmas: Parameters = (),
    temperatures: Parameters = (),
    margins: Parameters = (),
    error: bool = False,
    feature_norm=None,
) -> tf.Tensor:
    """Every loss of a panel, per sample, from one shared computation of the margins.

    Columns come in the order of :func:`panel_names`: one per sigma (Gcdf, eq. 6), one per
    temperature (tempered cross-entropy, eq. 7), one per margin (multi-class hinge, eq. 8),
    and the zero-one error last if ``error`` is true.

    Args:
        y_true: integer labels [batch] or [batch, 1], or one-hot labels [batch, classes].
        y_pred: logits [batch, classes] (float16/bfloat16 are computed in float32).
        sigmas: Gcdf noise levels, each >= 0.
        temperatures: tempered cross-entropy temperatures, each > 0.
        margins: hinge margins, each >= 0.
        error: whether to append the zero-one error column.
        feature_norm: ||x|| of the top layer's input, a scalar or one per sample [batch];
            None means 1 (normalized features). Used by Gcdf only.

    Returns:
        Tensor [batch, K] in the dtype of the computation (float32 or float64).

    Example:
        >>> values = panel_values([0, 1], [[2., 0.], [0., 1.]], sigmas=[0.5, 1], margins=[1])
        >>> values.shape
        TensorShape([2, 3])
    """
    sigmas = parameter_grid(sigmas, "sigma", allow_zero=True)
    temperatures = parameter_grid(temperatures, "temperature", allow_zero=False)
    margins = parameter_grid(margins, "margin", allow_zero=True)
    if not (sigmas.size or temperatures.size or margins.size or error):
        raise ValueError("the panel is empty: give sigmas, temperatures, margins or error=True")
    labels, logits = _prepare(y_true, y_pred)
    norm = _feature_norm_tensor(feature_norm, logits.dtype)
    return _panel(labels, logits, norm, sigmas, temperatures, margins, bool(error))


def _panel(labels, logits, feature_norm, sigmas, temperatures, margins, error):
    """Dispatch point between the fused op (custom_ops/) and the pure-TensorFlow path."""
    op = _op.panel_op()
    if op is not None:
        return op(labels, logits, feature_norm, sigmas, temperatures, margins, error)
    return _panel_pure_tf(labels, logits, feature_norm, sigmas, temperatures, margins, error)


def panel_names(sigmas: Parameters = (), temperatures: Parameters = (), margins: Parameters = (), error=False):
    """The column names of :func:`panel_values`: ``gcdf@0.5``, ``tce@2``, ``hinge@1``, ``error``."""
    names = [f"{GCDF}@{format_parameter(s)}" for s in np.atleast_1d(sigmas)] if np.size(sigmas) else []
    names += [f"{TCE}@{format_parameter(t)}" for t in np.atleast_1d(temperatures)] if np.size(temperatures) else []
    names += [f"{HINGE}@{format_parameter(g)}" for g in np.atleast_1d(margins)] if np.size(margins) else []
    if error:
        names.append(ERROR)
    return names


def _single_family(y_true, y_pred, values, name, allow_zero, family, feature_norm=None):
    array, scalar = _validate_parameters(values, name, allow_zero=allow_zero)
    labels, logits = _prepare(y_true, y_pred)
    norm = _feature_norm_tensor(feature_norm, logits.dtype)
    empty = np.zeros(0)
    arguments = {GCDF: empty, TCE: empty, HINGE: empty}
    arguments[family] = array
    result = _panel(labels, logits, norm, arguments[GCDF], arguments[TCE], arguments[HINGE], False)
    return result[:, 0] if scalar else result


def gcdf(y_true, y_pred, sigma: Parameters, feature_norm=None) -> tf.Tensor:
    """Gcdf loss, the paper's eq. 6, per sample.

    ``L_sigma = sum_{j != y} Phi((s_j - s_y) / (sqrt(2) * sigma * ||x||))``: an upper bound on the
    probability that N(0, sigma^2 I) noise on the top layer's weights changes the prediction.
    ``sigma = 0`` is the limit sigma -> 0: the number of classes that beat y, a tie counting 1/2.
    Phi is computed through ``erfc``, so the lower tail keeps its relative accuracy.

    Args:
        y_true: integer labels [batch] or [batch, 1], or one-hot [batch, classes].
        y_pred: logits [batch, classes].
        sigma: a number >= 0, or a sequence of K of them.
        feature_norm: ||x||, a scalar or [batch]; None means 1 (features normalized as in the paper).

    Returns:
        [batch] for a number ``sigma``, [batch, K] for a sequence.

    Example:
        >>> gcdf([0], [[1.0, 0.0]], sigma=1.0).numpy()  # Phi(-1 / sqrt 2)
        array([0.23975...], dtype=float32)
    """
    return _single_family(y_true, y_pred, sigma, "sigma", True, GCDF, feature_norm)


def tempered_crossentropy(y_true, y_pred, temperature: Parameters) -> tf.Tensor:
    """Tempered cross-entropy, the paper's eq. 7, per sample: ``-log softmax(s / T)_y``.

    Computed as ``softplus(logsumexp_{j != y} (s_j - s_y) / T)``, which keeps relative accuracy
    both when the loss is tiny and when the logits are large. At ``T = 1`` it equals Keras'
    sparse categorical cross-entropy from logits; as T -> infinity it tends to log(classes).

    Args:
        y_true: integer labels [batch] or [batch, 1], or one-hot [batch, classes].
        y_pred: logits [batch, classes].
        temperature: a number > 0, or a sequence of K of them.

    Returns:
        [batch] for a number ``temperature``, [batch, K] for a sequence.

    Example:
        >>> tempered_crossentropy([0], [[2.0, 0.0]], temperature=2.0).numpy()  # log(1 + e^-1)
        array([0.31326...], dtype=float32)
    """
    return _single_family(y_true, y_pred, temperature, "temperature", False, TCE)


def multiclass_hinge(y_true, y_pred, margin: Parameters) -> tf.Tensor:
    """Multi-class hinge loss, the paper's eq. 8, per sample: ``sum_{j != y} max(0, gamma + s_j - s_y)``.

    This is not Keras' ``CategoricalHinge``, which computes ``max(0, 1 + max_{j != y} p_j - p_y)``
    with a max over classes instead of a sum, a fixed margin of 1, and ``p_y = sum(y_true * y_pred)``
    (which takes ``max(..., 0)`` of the *negative* class scores and so is wrong for negative logits).

    Args:
        y_true: integer labels [batch] or [batch, 1], or one-hot [batch, classes].
        y_pred: logits [batch, classes].
        margin: gamma, a number >= 0, or a sequence of K of them.

    Returns:
        [batch] for a number ``margin``, [batch, K] for a sequence.

    Example:
        >>> multiclass_hinge([0], [[2.0, 0.5, 1.5]], margin=1.0).numpy()  # 0 + 0.5
        array([0.5], dtype=float32)
    """
    return _single_family(y_true, y_pred, margin, "margin", True, HINGE)


def zero_one_error(y_true, y_pred) -> tf.Tensor:
    """Per-sample zero-one error ``1 - [argmax_j s_j == y]`` (ties: the lowest index wins, as argmax).

    Its mean is ``1 -`` Keras' sparse categorical accuracy.

    Args:
        y_true: integer labels [batch] or [batch, 1], or one-hot [batch, classes].
        y_pred: logits [batch, classes].

    Returns:
        [batch], 0 or 1 (NaN where the logits hold NaN).
    """
    labels, logits = _prepare(y_true, y_pred)
    empty = np.zeros(0)
    return _panel(labels, logits, None, empty, empty, empty, True)[:, 0]


# --------------------------------------------------------------------------- #
# Loss classes
# --------------------------------------------------------------------------- #
class _FamilyLoss(keras.losses.Loss):
    _parameter = ""
    _allow_zero = True

    def __init__(self, fn, parameter_value, reduction, name, dtype, **fn_kwargs):
        super().__init__(name=name, reduction=reduction, dtype=dtype)
        array, scalar = _validate_parameters(parameter_value, self._parameter, allow_zero=self._allow_zero)
        if not scalar:
            raise ValueError(f"{self._parameter} of a Loss must be one number, got {parameter_value!r}")
        self._parameter_value = float(array[0])
        self._fn = fn
        self._fn_kwargs = {self._parameter: self._parameter_value, **fn_kwargs}

    def call(self, y_true, y_pred):
        return self._fn(y_true, y_pred, **self._fn_kwargs)

    def get_config(self):
        return {**super().get_config(), self._parameter: self._parameter_value}


@keras.saving.register_keras_serializable(package="keras_implicit")
class Gcdf(_FamilyLoss):
    """Gcdf loss (eq. 6) as a training objective; see :func:`gcdf`.

    Args:
        sigma: the noise level, >= 0 (``sigma = 0`` has zero gradient almost everywhere).
        feature_norm: ||x|| of the top layer's input as one positive number; None means 1.
        reduction: a Keras reduction, default ``"sum_over_batch_size"``.
        name: the loss name.
        dtype: the loss computation dtype.

    Example:
        >>> model.compile("sgd", loss=Gcdf(sigma=1.0))
    """

    _parameter = "sigma"

    def __init__(self, sigma=1.0, feature_norm=None, reduction="sum_over_batch_size", name="gcdf", dtype=None):
        if feature_norm is not None:
            _feature_norm_tensor(feature_norm, tf.float32)  # validates
        self.feature_norm = feature_norm
        super().__init__(gcdf, sigma, reduction, name, dtype, feature_norm=feature_norm)

    def get_config(self):
        return {**super().get_config(), "feature_norm": self.feature_norm}


@keras.saving.register_keras_serializable(package="keras_implicit")
class TemperedCrossentropy(_FamilyLoss):
    """Tempered cross-entropy (eq. 7) as a training objective; see :func:`tempered_crossentropy`.

    Args:
        temperature: T > 0; ``T = 1`` is the ordinary cross-entropy from logits.
        reduction: a Keras reduction, default ``"sum_over_batch_size"``.
        name: the loss name.
        dtype: the loss computation dtype.

    Example:
        >>> model.compile("sgd", loss=TemperedCrossentropy(temperature=2.0))
    """

    _parameter = "temperature"
    _allow_zero = False

    def __init__(self, temperature=1.0, reduction="sum_over_batch_size", name="tempered_crossentropy", dtype=None):
        super().__init__(tempered_crossentropy, temperature, reduction, name, dtype)


@keras.saving.register_keras_serializable(package="keras_implicit")
class MulticlassHinge(_FamilyLoss):
    """Multi-class hinge loss (eq. 8) as a training objective; see :func:`multiclass_hinge`.

    Args:
        margin: gamma >= 0.
        reduction: a Keras reduction, default ``"sum_over_batch_size"``.
        name: the loss name.
        dtype: the loss computation dtype.

    Example:
        >>> model.compile("sgd", loss=MulticlassHinge(margin=1.0))
    """

    _parameter = "margin"

    def __init__(self, margin=1.0, reduction="sum_over_batch_size", name="multiclass_hinge", dtype=None):
        super().__init__(multiclass_hinge, margin, reduction, name, dtype)
