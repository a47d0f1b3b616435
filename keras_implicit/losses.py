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

Internal API (not in ``__all__``; used by :mod:`keras_implicit.metrics`, :mod:`keras_implicit.sharpness`,
:mod:`keras_implicit.callbacks` and the kernel seams, so that every module computes a formula from one
definition): :class:`Margins` (the margins ``s_j - s_y`` of a batch, computed once), :func:`prepare` (labels and
logits checked and cast), :func:`validate_parameters`, :func:`one_parameter`, :func:`parameter_grid`,
:func:`validate_feature_norm_number`, :func:`feature_norm_tensor`, :func:`integer_labels` (one NumPy label
reader), :func:`static_rank`, :func:`compute_dtype`, :func:`tce_columns` and :func:`error_column` (the tempered CE
and the zero-one error from the margins), :func:`each_parameter` and :func:`panel_keras` (the keras.ops path of
the panel).
"""

from __future__ import annotations

import math
import numbers
from typing import Optional, Sequence, Union

import keras
import numpy as np
from keras import ops

from keras_implicit import _checks, _dispatch
from keras_implicit._dispatch import active_path, force_path
from keras_implicit.config import HESSIAN_TRACE, parse_objective
from keras_implicit.names import ERROR, GCDF, HINGE, TCE, format_parameter, panel_names  # noqa: F401  (re-exported)

__all__ = [
    "gcdf",
    "tempered_crossentropy",
    "multiclass_hinge",
    "zero_one_error",
    "panel_values",
    "parameter_grid",
    "active_path",
    "force_path",
    "Gcdf",
    "TemperedCrossentropy",
    "MulticlassHinge",
    "crossentropy_hessian_trace",
    "mixture",
    "Mixture",
]

Parameters = Union[float, Sequence[float], np.ndarray]

_SQRT2 = math.sqrt(2.0)



# --------------------------------------------------------------------------- #
# Validation and preparation
# --------------------------------------------------------------------------- #
def validate_parameters(values, name: str, *, allow_zero: bool):
    """Returns (float64 1-D array, was_scalar). Raises ValueError naming `name`."""
    if ops.is_tensor(values) or isinstance(values, keras.Variable):
        raise TypeError(
            f"{name} must be a Python number or a sequence of numbers, not a tensor "
            "(parameters are fixed per loss so that metric names stay stable)."
        )
    scalar = isinstance(values, numbers.Number) or np.ndim(values) == 0
    try:
        kind = np.asarray(values).dtype.kind
        array = np.atleast_1d(np.asarray(values, dtype=np.float64))
    except (TypeError, ValueError) as error:
        raise TypeError(f"{name} must be a number or a sequence of numbers, got {values!r}") from error
    if kind not in "iuf":  # booleans, strings, None
        raise TypeError(f"{name} must be a number or a sequence of numbers, got {values!r}")
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
    names = [format_parameter(value) for value in array]
    if len(set(names)) < len(names):
        raise ValueError(f"{name} has repeated values (equal to 7 significant digits, so their metrics would share "
                         f"a name): {array.tolist()}")
    return array, scalar


def one_parameter(value, name: str, *, allow_zero: bool) -> float:
    """One validated number (the parameter of a Loss or a single Metric)."""
    array, scalar = validate_parameters(value, name, allow_zero=allow_zero)
    if not scalar:
        raise ValueError(f"{name} must be one number here, got {value!r}")
    return float(array[0])


def parameter_grid(values, name: str, *, allow_zero: bool) -> np.ndarray:
    """A validated float64 grid of one family's parameters; None or an empty sequence gives an empty grid."""
    if values is None or (not isinstance(values, numbers.Number) and np.size(values) == 0):
        return np.zeros(0)
    return validate_parameters(values, name, allow_zero=allow_zero)[0]


def validate_feature_norm_number(feature_norm) -> None:
    """A Loss's or Metric's ``feature_norm``: None or one finite number > 0."""
    if feature_norm is None:
        return
    if not isinstance(feature_norm, numbers.Number) or isinstance(feature_norm, bool):
        raise TypeError(f"feature_norm must be None or one number > 0, got {feature_norm!r}")
    if not (math.isfinite(feature_norm) and feature_norm > 0):
        raise ValueError(f"feature_norm must be a finite number > 0, got {feature_norm!r}")


def static_rank(x) -> Optional[int]:
    try:
        return len(x.shape)
    except (TypeError, ValueError):  # a TensorFlow tensor of unknown rank
        return None


def compute_dtype(dtype: str) -> str:
    # float16/bfloat16 logits are computed in float32: erfc and exp tails underflow in half precision.
    return dtype if dtype in ("float32", "float64") else "float32"


def _as_tensor(x, name: str):
    """``ops.convert_to_tensor``, which gives a variable (Keras' or TensorFlow's) back as itself: its value.
    Ragged and sparse tensors, which it passes through, are refused: every row needs every class's logit."""
    if isinstance(x, keras.Variable):
        x = x.value
    tensor = ops.convert_to_tensor(x)
    if keras.backend.backend() == "tensorflow":
        import tensorflow as tf  # deferred: this backend only

        if isinstance(tensor, tf.Variable):
            tensor = tf.convert_to_tensor(tensor)
        if isinstance(tensor, (tf.RaggedTensor, tf.SparseTensor)):
            raise TypeError(f"{name} must be a dense tensor, got a {type(tensor).__name__}: pad it, or pass "
                            f"{'.to_tensor()' if isinstance(tensor, tf.RaggedTensor) else 'tf.sparse.to_dense(...)'}")
    return tensor


def prepare(y_true, y_pred):
    """Validates shapes (values are checked in ``_panel``); returns (labels int32 [B], logits [B, C] float32/64)."""
    logits = _as_tensor(y_pred, "y_pred")
    dtype = keras.backend.standardize_dtype(logits.dtype)
    if compute_dtype(dtype) != dtype:
        logits = ops.cast(logits, compute_dtype(dtype))
    rank = static_rank(logits)
    if rank is not None and rank != 2:
        raise ValueError(f"y_pred must be logits of rank 2 [batch, classes], got shape {tuple(logits.shape)}")
    classes = logits.shape[-1] if rank == 2 else None
    if classes is not None and classes < 2:
        raise ValueError(f"y_pred must have at least 2 classes, got shape {tuple(logits.shape)}")

    labels = _as_tensor(y_true, "y_true")
    label_dtype = keras.backend.standardize_dtype(labels.dtype)
    if label_dtype == "string" or label_dtype.startswith("complex"):
        raise TypeError(f"y_true must be integer labels or one-hot rows of numbers, got dtype {label_dtype}")
    label_rank = static_rank(labels)
    if label_rank == 2 and labels.shape[-1] == 1:
        labels = ops.squeeze(labels, axis=-1)
    elif label_rank == 2 and labels.shape[-1] is None:
        # [batch, 1] integer labels or one-hot rows, told apart when the shape is known (a tf.data pipeline or a
        # tf.function signature can leave the last dimension unknown when the loss is traced).
        labels = ops.where(ops.shape(labels)[-1] == 1, ops.cast(labels[:, 0], "int32"),
                           ops.cast(ops.argmax(labels, axis=-1), "int32"))
    elif label_rank == 2:
        if classes is not None and labels.shape[-1] != classes:
            raise ValueError(
                "y_true must be integer labels [batch] or [batch, 1], or one-hot [batch, classes]; "
                f"got shape {tuple(labels.shape)} for y_pred of shape {tuple(logits.shape)}"
            )
        if _checks.is_concrete(labels):
            _check_one_hot(np.asarray(ops.convert_to_numpy(labels)))
        labels = ops.argmax(labels, axis=-1)
    elif label_rank is not None and label_rank != 1:
        raise ValueError(
            "y_true must be integer labels [batch] or [batch, 1], or one-hot [batch, classes]; "
            f"got shape {tuple(labels.shape)}"
        )
    if "float" in keras.backend.standardize_dtype(labels.dtype) and _checks.is_concrete(labels):
        values = np.asarray(ops.convert_to_numpy(labels))
        fractional = values[values != np.round(values)]
        if fractional.size:
            raise ValueError(f"y_true: float labels must be whole numbers, got {fractional[:5]}")
    labels = ops.cast(labels, "int32")
    labels = _checks.check_batch(labels, logits)
    return labels, logits  # label values are checked in _panel, by the path that computes them


def _check_one_hot(rows: np.ndarray) -> None:
    """Refuses rows [batch, classes] that are not one 1 among zeros: soft labels (label smoothing, mixup) or
    padding rows have no single true class y, which every family is defined for (checked where the values are
    known: eagerly, not inside a traced function, where such rows are read as their argmax)."""
    bad = ~(np.all((rows == 0) | (rows == 1), axis=-1) & (rows.sum(axis=-1) == 1))
    if np.any(bad):
        raise ValueError(
            f"y_true: one-hot rows must hold one 1 among zeros, but {int(bad.sum())} of {len(rows)} do not (the "
            f"first: {rows[bad][0].tolist()[:8]}); soft labels (label smoothing, mixup) have no single true class, "
            "which Gcdf, the tempered CE and the hinge need: pass integer labels"
        )


def integer_labels(y, what: str) -> np.ndarray:
    """int32 labels [n] from integer labels [n] or [n, 1], or one-hot rows [n, classes], as NumPy (the whole
    dataset of the tracker or of sharpness.evaluate_sharpness at once; traced batches go through prepare)."""
    labels = np.asarray(ops.convert_to_numpy(y) if ops.is_tensor(y) else y)
    if labels.ndim == 2 and labels.shape[1] == 1:
        labels = labels[:, 0]
    elif labels.ndim == 2:
        _check_one_hot(labels)
        labels = np.argmax(labels, axis=1)
    if labels.ndim != 1 or labels.dtype.kind not in "iuf":
        raise ValueError(f"{what}: y must be integer labels [n] or [n, 1], or one-hot rows [n, classes]; got "
                         f"shape {labels.shape} of {labels.dtype}")
    if labels.dtype.kind == "f" and np.any(labels != np.round(labels)):
        raise ValueError(f"{what}: float labels must be whole numbers, got {labels[labels != np.round(labels)][:5]}")
    return labels.astype(np.int32)


def feature_norm_tensor(feature_norm, logits):
    """None -> None; a positive scalar or one per sample -> a scalar or a [B] tensor of the logits' dtype."""
    if feature_norm is None:
        return None
    if isinstance(feature_norm, numbers.Number):
        validate_feature_norm_number(feature_norm)
        return ops.convert_to_tensor(feature_norm, logits.dtype)
    norm = ops.cast(ops.convert_to_tensor(feature_norm), logits.dtype)
    if static_rank(norm) == 2:
        norm = ops.squeeze(norm, axis=-1)
    if static_rank(norm) not in (0, 1):
        raise ValueError(f"feature_norm must be a scalar or one value per sample, got shape {tuple(norm.shape)}")
    if static_rank(norm) == 1:
        norm = _checks.check_batch(norm, logits, name="feature_norm")
    return norm  # values are checked in _panel, by the path that computes them


class Margins:
    """The shared part of every family, computed once per batch.

    ``d_j = s_j - s_y`` with the true class itself set to -inf (``others``): then Phi(-inf) = 0,
    exp(-inf) = 0 and max(0, gamma - inf) = 0, so every family sums over j != y without a mask of its own.
    ``invalid`` marks the rows whose values are NaN: NaN logits, and, where a compiled function cannot raise
    (``jax.jit``: see ``keras_implicit/_checks.py``), a label outside ``[0, classes)``.
    """

    def __init__(self, labels, logits):
        self.labels = labels
        classes = ops.shape(logits)[-1]
        true_score = ops.take_along_axis(logits, labels[:, None], axis=1)  # [B, 1]
        self.d = logits - true_score  # [B, C]
        self.others = ops.not_equal(ops.arange(classes, dtype="int32")[None, :], labels[:, None])  # j != y
        self.d_others = ops.where(self.others, self.d, ops.cast(-np.inf, self.d.dtype))
        outside = ops.logical_or(labels < 0, labels >= classes)
        self.invalid = ops.logical_or(ops.any(ops.isnan(logits), axis=-1), outside)  # [B]


# --------------------------------------------------------------------------- #
# The formulas: one definition each, per sample, on shared margins, all parameters of a family at once.
# --------------------------------------------------------------------------- #
def each_parameter(formula, margins, values: np.ndarray):
    """``formula(margins, p)`` (a reduction over the last axis) for every parameter ``p``: [B, K].

    One formula, vectorized the way the backend runs it fastest (benchmarks/panel_backends.py): on JAX and
    PyTorch one broadcast computation over [B, K, C] (margins [B, 1, C], parameters [1, K, 1]), which XLA
    fuses; on TensorFlow K computations over [B, C], which its executor runs side by side (the broadcast form
    was 1.2x slower than 24 hand-written metrics there, against 0.8x on JAX).
    """
    if keras.backend.backend() == "tensorflow":
        return ops.stack([formula(margins, float(value)) for value in values], axis=-1)
    parameters = ops.convert_to_tensor(np.asarray(values, np.float64).reshape(1, -1, 1), margins.dtype)
    return formula(margins[:, None, :], parameters)


def _gcdf_columns(m: Margins, sigmas: np.ndarray, norm):
    """Gcdf (eq. 6) for every sigma: [B, K].

    ``Phi(d / (sqrt 2 sigma ||x||)) = erfc(-d / (2 sigma ||x||)) / 2``: erfc keeps the relative accuracy of
    the lower tail, where ``(1 + erf) / 2`` cancels (Phi(-10) = 7.6e-24 is 0 that way in float32).
    """
    dtype = m.d.dtype
    columns = []
    positive = sigmas[sigmas > 0]
    if positive.size:
        # The true class has d = -inf and adds erfc(+inf) = 0. The norm divides the finite margins before the
        # mask: -inf / ||x|| would give the norm a NaN gradient (0 * inf).
        d = m.d_others
        if norm is not None:
            d = ops.where(m.others, m.d / (norm[:, None] if static_rank(norm) == 1 else norm),
                          ops.cast(-np.inf, dtype))
        positive_values = 0.5 * each_parameter(lambda d, scale: ops.sum(ops.erfc(d * scale), axis=-1), d,
                                                -0.5 / positive)
    if not np.any(sigmas == 0):
        return positive_values
    # The limit sigma -> 0: each class that beats y counts 1, a tie counts 1/2.
    beats = ops.cast(m.d_others > 0, dtype) + 0.5 * ops.cast(ops.equal(m.d_others, 0), dtype)
    limit = ops.sum(beats, axis=-1)[:, None]
    index = 0
    for sigma in sigmas:
        if sigma == 0:
            columns.append(limit)
        else:
            columns.append(positive_values[:, index:index + 1])
            index += 1
    return ops.concatenate(columns, axis=-1)


def tce_columns(m: Margins, temperatures: np.ndarray):
    """Tempered cross-entropy (eq. 7) for every T: [B, K].

    -log softmax(s/T)_y = log(1 + sum_{j!=y} exp(d_j / T)) = softplus(logsumexp_{j!=y} d_j / T): accurate
    both for tiny losses (softplus(x) ~ exp(x)) and for large logits (softplus(x) ~ x). The logsumexp is
    shifted by the largest margin M, found once for every T: M/T + log sum_{j!=y} exp((d_j - M) / T).
    """
    largest = ops.max(m.d_others, axis=-1, keepdims=True)  # [B, 1]
    # As tf.reduce_logsumexp: an infinite largest margin (infinite logits) shifts by 0, not by inf - inf = NaN.
    largest = ops.where(ops.isfinite(largest), largest, ops.zeros_like(largest))
    inverse = 1.0 / temperatures
    sums = each_parameter(lambda d, scale: ops.sum(ops.exp(d * scale), axis=-1), m.d_others - largest, inverse)
    return ops.softplus(largest * ops.convert_to_tensor(inverse[None, :], m.d.dtype) + ops.log(sums))


def _hinge_columns(m: Margins, margins: np.ndarray):
    """Multi-class hinge (eq. 8) for every gamma: [B, K]."""
    return each_parameter(lambda d, margin: ops.sum(ops.relu(margin + d), axis=-1), m.d_others, margins)


def error_column(m: Margins):
    """1 - [argmax s == y], with argmax's tie rule (the lowest index wins): [B, 1].

    From the margins: y loses to j < y on s_j >= s_y and to j > y on s_j > s_y.
    """
    classes = ops.shape(m.d)[-1]
    before = ops.arange(classes, dtype="int32")[None, :] < m.labels[:, None]
    loses = ops.logical_and(m.others, ops.logical_or(m.d > 0, ops.logical_and(ops.equal(m.d, 0), before)))
    return ops.cast(ops.any(loses, axis=-1), m.d.dtype)[:, None]


def panel_keras(labels, logits, feature_norm, sigmas, temperatures, margins, error):
    """The ``keras.ops`` path: [B, K1 + K2 + K3 + error] from one set of margins."""
    m = Margins(labels, logits)
    columns = []
    if sigmas.size:
        columns.append(_gcdf_columns(m, sigmas, feature_norm))
    if temperatures.size:
        columns.append(tce_columns(m, temperatures))
    if margins.size:
        columns.append(_hinge_columns(m, margins))
    if error:
        columns.append(error_column(m))
    values = columns[0] if len(columns) == 1 else ops.concatenate(columns, axis=-1)
    invalid = m.invalid
    if feature_norm is not None and sigmas.size:
        bad_norm = ops.logical_not(ops.logical_and(ops.isfinite(feature_norm), feature_norm > 0))
        invalid = ops.logical_or(invalid, bad_norm)
    # NaN logits (and values a compiled JAX function cannot refuse) give NaN in every column, never a
    # silent 0 from a comparison.
    return ops.where(invalid[:, None], ops.cast(np.nan, values.dtype), values)


def panel_values(
    y_true,
    y_pred,
    sigmas: Parameters = (),
    temperatures: Parameters = (),
    margins: Parameters = (),
    error: bool = False,
    feature_norm=None,
    path: Optional[str] = None,
):
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
        path: ``"op"``, ``"keras"`` or ``"auto"`` for this call; None follows :func:`force_path` and the
            environment (see :mod:`keras_implicit._dispatch`).

    Returns:
        A tensor of the backend, [batch, K], in the dtype of the computation (float32 or float64).

    Example:
        >>> values = panel_values([0, 1], [[2., 0.], [0., 1.]], sigmas=[0.5, 1], margins=[1])
        >>> tuple(values.shape)
        (2, 3)
    """
    sigmas = parameter_grid(sigmas, "sigma", allow_zero=True)
    temperatures = parameter_grid(temperatures, "temperature", allow_zero=False)
    margins = parameter_grid(margins, "margin", allow_zero=True)
    if not (sigmas.size or temperatures.size or margins.size or error):
        raise ValueError("the panel is empty: give sigmas, temperatures, margins or error=True")
    labels, logits = prepare(y_true, y_pred)
    norm = feature_norm_tensor(feature_norm, logits)
    return _panel(labels, logits, norm, sigmas, temperatures, margins, bool(error), path)


def _panel(labels, logits, feature_norm, sigmas, temperatures, margins, error, path=None):
    """The dispatch point: the fused kernel where :mod:`keras_implicit._dispatch` picks it, else keras.ops.

    Label and norm values are checked here: at once on concrete arrays (ValueError, either path); in a
    compiled graph by the keras.ops path (``keras_implicit/_checks.py``), while the fused op refuses them
    itself (``OP_REQUIRES``), so its graph carries no second check.
    """
    kernel = _dispatch.panel_kernel(path)
    if kernel is None or _checks.is_concrete(labels, logits):
        labels = _checks.check_labels(labels, ops.shape(logits)[-1])
        if feature_norm is not None:  # a tensor of rank 0 or 1 (feature_norm_tensor)
            feature_norm = _checks.check_positive(feature_norm, "feature_norm must be finite and > 0")
    if kernel is not None:
        return kernel(labels, logits, feature_norm, sigmas, temperatures, margins, error)
    return panel_keras(labels, logits, feature_norm, sigmas, temperatures, margins, error)


def _single_family(y_true, y_pred, values, name, allow_zero, family, feature_norm=None):
    array, scalar = validate_parameters(values, name, allow_zero=allow_zero)
    labels, logits = prepare(y_true, y_pred)
    norm = feature_norm_tensor(feature_norm, logits)
    empty = np.zeros(0)
    arguments = {GCDF: empty, TCE: empty, HINGE: empty}
    arguments[family] = array
    result = _panel(labels, logits, norm, arguments[GCDF], arguments[TCE], arguments[HINGE], False)
    return result[:, 0] if scalar else result


def gcdf(y_true, y_pred, sigma: Parameters, feature_norm=None):
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
        >>> keras.ops.convert_to_numpy(gcdf([0], [[1.0, 0.0]], sigma=1.0))  # Phi(-1 / sqrt 2)
        array([0.23975...], dtype=float32)
    """
    return _single_family(y_true, y_pred, sigma, "sigma", True, GCDF, feature_norm)


def tempered_crossentropy(y_true, y_pred, temperature: Parameters):
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
        >>> keras.ops.convert_to_numpy(tempered_crossentropy([0], [[2.0, 0.0]], temperature=2.0))  # log(1 + e^-1)
        array([0.31326...], dtype=float32)
    """
    return _single_family(y_true, y_pred, temperature, "temperature", False, TCE)


def multiclass_hinge(y_true, y_pred, margin: Parameters):
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
        >>> keras.ops.convert_to_numpy(multiclass_hinge([0], [[2.0, 0.5, 1.5]], margin=1.0))  # 0 + 0.5
        array([0.5], dtype=float32)
    """
    return _single_family(y_true, y_pred, margin, "margin", True, HINGE)


def zero_one_error(y_true, y_pred):
    """Per-sample zero-one error ``1 - [argmax_j s_j == y]`` (ties: the lowest index wins, as argmax).

    Its mean is ``1 -`` Keras' sparse categorical accuracy.

    Args:
        y_true: integer labels [batch] or [batch, 1], or one-hot [batch, classes].
        y_pred: logits [batch, classes].

    Returns:
        [batch], 0 or 1 (NaN where the logits hold NaN).
    """
    labels, logits = prepare(y_true, y_pred)
    empty = np.zeros(0)
    return _panel(labels, logits, None, empty, empty, empty, True)[:, 0]


# --------------------------------------------------------------------------- #
# Loss classes
# --------------------------------------------------------------------------- #
class _LossFunctionWrapper(keras.losses.Loss):
    """Keras' own pattern (``keras/src/losses/losses.py``, not exported by Keras): a Loss over a per-sample
    function and its keyword arguments. Subclasses validate their arguments and return every one of them,
    with the Loss's name, reduction and dtype, from ``get_config``."""

    def __init__(self, fn, reduction="sum_over_batch_size", name=None, dtype=None, **fn_kwargs):
        super().__init__(name=name, reduction=reduction, dtype=dtype)
        self.fn = fn
        self._fn_kwargs = fn_kwargs
        self._config_dtype = getattr(dtype, "name", dtype)  # None, a dtype or a dtype policy's name

    def get_config(self):
        return {**super().get_config(), "dtype": self._config_dtype}

    def call(self, y_true, y_pred):
        return self.fn(y_true, y_pred, **self._fn_kwargs)


@keras.saving.register_keras_serializable(package="keras_implicit")
class Gcdf(_LossFunctionWrapper):
    """Gcdf loss (eq. 6) as a training objective; see :func:`gcdf`.

    Args:
        sigma: the noise level, > 0 (``sigma = 0``, the count of classes that beat y, has zero gradient
            almost everywhere: accepted, but nothing trains on it).
        feature_norm: ||x|| of the top layer's input as one positive number; None means 1.
        reduction: a Keras reduction, default ``"sum_over_batch_size"``.
        name: the loss name.
        dtype: the loss computation dtype.

    Example:
        >>> model.compile("sgd", loss=Gcdf(sigma=1.0))
    """

    def __init__(self, sigma=1.0, feature_norm=None, reduction="sum_over_batch_size", name="gcdf", dtype=None):
        self.sigma = one_parameter(sigma, "sigma", allow_zero=True)
        validate_feature_norm_number(feature_norm)
        self.feature_norm = feature_norm
        super().__init__(gcdf, reduction=reduction, name=name, dtype=dtype, sigma=self.sigma,
                         feature_norm=feature_norm)

    def get_config(self):
        return {**super().get_config(), "sigma": self.sigma, "feature_norm": self.feature_norm}


@keras.saving.register_keras_serializable(package="keras_implicit")
class TemperedCrossentropy(_LossFunctionWrapper):
    """Tempered cross-entropy (eq. 7) as a training objective; see :func:`tempered_crossentropy`.

    Args:
        temperature: T > 0; ``T = 1`` is the ordinary cross-entropy from logits.
        reduction: a Keras reduction, default ``"sum_over_batch_size"``.
        name: the loss name.
        dtype: the loss computation dtype.

    Example:
        >>> model.compile("sgd", loss=TemperedCrossentropy(temperature=2.0))
    """

    def __init__(self, temperature=1.0, reduction="sum_over_batch_size", name="tempered_crossentropy", dtype=None):
        self.temperature = one_parameter(temperature, "temperature", allow_zero=False)
        super().__init__(tempered_crossentropy, reduction=reduction, name=name, dtype=dtype,
                         temperature=self.temperature)

    def get_config(self):
        return {**super().get_config(), "temperature": self.temperature}


@keras.saving.register_keras_serializable(package="keras_implicit")
class MulticlassHinge(_LossFunctionWrapper):
    """Multi-class hinge loss (eq. 8) as a training objective; see :func:`multiclass_hinge`.

    Args:
        margin: gamma >= 0.
        reduction: a Keras reduction, default ``"sum_over_batch_size"``.
        name: the loss name.
        dtype: the loss computation dtype.

    Example:
        >>> model.compile("sgd", loss=MulticlassHinge(margin=1.0))
    """

    def __init__(self, margin=1.0, reduction="sum_over_batch_size", name="multiclass_hinge", dtype=None):
        self.margin = one_parameter(margin, "margin", allow_zero=True)
        super().__init__(multiclass_hinge, reduction=reduction, name=name, dtype=dtype, margin=self.margin)

    def get_config(self):
        return {**super().get_config(), "margin": self.margin}


def hessian_trace_values(logits, norm):
    """``Tr H = ||x||^2 (1 - sum_j p_j^2)`` per sample from logits [B, C] and ||x|| ([B]; None: 1): the one
    definition that :func:`crossentropy_hessian_trace`, :func:`mixture`'s ``trh`` term and
    :mod:`keras_implicit.sharpness`'s eq. 9 use (``sum_j p_j (1 - p_j) = 1 - sum_j p_j^2``)."""
    probabilities = ops.softmax(logits, axis=-1)
    trace = 1.0 - ops.sum(probabilities * probabilities, axis=-1)
    return trace if norm is None else norm * norm * trace


def crossentropy_hessian_trace(y_pred, feature_norm=None):
    """``Tr H`` of the cross-entropy with respect to the top Dense kernel, per sample (the curvature in the
    paper's eq. 9).

    ``H_(ij),(ij) = d^2 CE / dW_ij^2 = x_i^2 p_j (1 - p_j)``, so ``Tr H = ||x||^2 sum_j p_j (1 - p_j)`` with
    ``p = softmax(s)``; it does not depend on the label. (The Hessian with respect to the logits has trace
    ``sum_j p_j (1 - p_j)``: the two differ by ``||x||^2``, which is 1 for normalized features.) As a training
    penalty it is the ``trh`` term of :func:`mixture` (``ce+0.1*trh``).

    Args:
        y_pred: logits [batch, classes].
        feature_norm: ||x||, a scalar or [batch]; None means 1.

    Returns:
        [batch], in [0, ||x||^2 (1 - 1 / classes)].

    Example:
        >>> keras.ops.convert_to_numpy(crossentropy_hessian_trace([[0.0, 0.0]]))  # 2 * (1/2 * 1/2)
        array([0.5], dtype=float32)
    """
    logits = ops.convert_to_tensor(y_pred)
    logits = ops.cast(logits, compute_dtype(keras.backend.standardize_dtype(logits.dtype)))
    if static_rank(logits) != 2:
        raise ValueError(f"y_pred must be logits of rank 2 [batch, classes], got shape {tuple(logits.shape)}")
    norm = feature_norm_tensor(feature_norm, logits)
    if norm is not None:
        norm = _checks.check_positive(norm, "feature_norm must be finite and > 0")
    return hessian_trace_values(logits, norm)


def mixture(y_true, y_pred, terms: Sequence, feature_norm=None):
    """A weighted sum of the families per sample: ``sum_i w_i * loss_i(y, s)``, every term from one set of
    margins (:func:`panel_values`); ``ce`` is the tempered cross-entropy at ``T = 1`` (Keras' sparse categorical
    cross-entropy from logits), and ``trh`` the Hessian trace of :func:`crossentropy_hessian_trace` (eq. 9's
    curvature: ``ce + lambda * trh`` is eq. 9 made explicit, with ``lambda = sigma^2 / 2``).

    Args:
        y_true: integer labels [batch] or [batch, 1], or one-hot [batch, classes].
        y_pred: logits [batch, classes].
        terms: ``(weight, family, parameter)`` triples (:func:`keras_implicit.config.parse_objective`), the family
            ``"ce"`` (parameter None), ``"gcdf"``, ``"tce"``, ``"hinge"`` or ``"trh"`` (parameter None).
        feature_norm: ||x|| of the top layer's input for the Gcdf and trh terms (None: 1).

    Returns:
        [batch].

    Example:
        >>> mixture(labels, logits, parse_objective("ce+0.1*gcdf@4"))  # CE plus a tenth of Gcdf(4)
    """
    grids = {GCDF: [], TCE: [], HINGE: []}
    weights = {GCDF: [], TCE: [], HINGE: []}
    trace_weight = None
    for weight, family, parameter in terms:
        if family == HESSIAN_TRACE:
            if trace_weight is not None:
                raise ValueError("trh appears twice in the mixture")
            trace_weight = float(weight)
            continue
        family, parameter = (TCE, 1.0) if family == "ce" else (family, parameter)
        if family not in grids:
            raise ValueError(f"unknown family {family!r} in a mixture: ce, gcdf, tce, hinge or trh")
        if parameter in grids[family]:
            raise ValueError(f"{family}@{format_parameter(parameter)} appears twice in the mixture")
        grids[family].append(float(parameter))
        weights[family].append(float(weight))
    if not any(grids.values()):
        raise ValueError("a mixture needs at least one loss term (trh alone is a penalty, not an objective)")
    columns = panel_values(y_true, y_pred, sigmas=grids[GCDF], temperatures=grids[TCE], margins=grids[HINGE],
                           feature_norm=feature_norm)
    weight_row = np.asarray([*weights[GCDF], *weights[TCE], *weights[HINGE]], np.float64)
    total = ops.sum(columns * ops.cast(weight_row, columns.dtype)[None, :], axis=-1)
    if trace_weight is None:
        return total
    return total + trace_weight * crossentropy_hessian_trace(y_pred, feature_norm)


@keras.saving.register_keras_serializable(package="keras_implicit")
class Mixture(_LossFunctionWrapper):
    """A weighted sum of the families as a training objective (``ce + 0.1 * gcdf@4``, ``ce + 0.1 * trh``); see
    :func:`mixture`.

    Args:
        loss: the objective as :func:`keras_implicit.config.parse_objective` reads it, e.g. ``"ce+0.1*gcdf@4"``
            (what ``run.py --loss`` takes).
        feature_norm: ||x|| of the top layer's input as one positive number (the Gcdf terms); None means 1.
        reduction: a Keras reduction, default ``"sum_over_batch_size"``.
        name: the loss name.
        dtype: the loss computation dtype.

    Example:
        >>> model.compile("sgd", loss=Mixture("ce+0.1*gcdf@4"))
    """

    def __init__(self, loss="ce", feature_norm=None, reduction="sum_over_batch_size", name="mixture", dtype=None):
        self.loss = str(loss)
        self.terms = parse_objective(self.loss)
        validate_feature_norm_number(feature_norm)
        self.feature_norm = feature_norm
        super().__init__(mixture, reduction=reduction, name=name, dtype=dtype, terms=self.terms,
                         feature_norm=feature_norm)

    def get_config(self):
        return {**super().get_config(), "loss": self.loss, "feature_norm": self.feature_norm}
