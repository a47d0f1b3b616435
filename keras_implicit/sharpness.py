"""What Gcdf bounds and what the paper's section 5 approximates: the noisy error and eq. 9.

Gaussian noise ``E ~ N(0, sigma^2 I)`` on the top Dense layer's kernel ``W`` ([features, classes]) moves the
logits of an example with top-layer features ``x`` to ``s + x^T E``; the columns of ``E`` are independent, so
``x^T E ~ N(0, sigma^2 ||x||^2 I_classes)``: the noisy logits are ``s + sigma ||x|| z`` with ``z ~ N(0, I)``.
The bias is not perturbed (the paper's eqs. 3-5, from which Gcdf's ``sqrt(2) sigma ||x||`` comes).

Quantities, per example (the paper's equation numbers in brackets):

====================  =====================================================================================
``noisy_error``       ``P_z[argmax(s + sigma ||x|| z) != y]``, the left side of eq. 3: the rate at which the
                      noisy top layer is wrong. Monte Carlo over ``draws`` draws of ``z`` per example.
                      Gcdf (eq. 6) is its union bound, so ``noisy_error <= Gcdf`` exactly (in expectation).
``noisy_ce``          ``E_z[CE(s + sigma ||x|| z, y)]``, Monte Carlo on the same draws: the expectation the
                      second-order expansion of eq. 9 approximates.
``hessian_trace``     ``Tr H``, the trace of the cross-entropy's Hessian with respect to the top kernel ``W``:
                      ``d^2 CE / dW_ij^2 = x_i^2 p_j (1 - p_j)``, so ``Tr H = ||x||^2 sum_j p_j (1 - p_j)``
                      with ``p = softmax(s)``.
``eq9``               ``(CE + sigma^2 / 2 * Tr H) / log 2``: eq. 9 in its multi-class form (below).
====================  =====================================================================================

**Eq. 9, multi-class.** A wrong prediction has ``p_y <= 1/2``, so ``1[argmax s != y] <= CE / log 2`` for any
number of classes, and under the noise ``noisy_error <= E[CE(W + E)] / log 2 = noisy_ce / log 2`` is an exact
upper bound. The second-order expansion of the CE around ``W`` gives ``E[CE(W + E)] ~ CE + sigma^2 / 2 * Tr H``
(the first-order term vanishes in expectation), hence ``eq9``. It is an *approximation* of an upper bound on
``noisy_error``, not a bound itself: the CE is convex in the logits and its higher-order terms do not vanish,
so ``eq9`` can fall below ``noisy_ce / log 2`` (and, at large sigma, below ``noisy_error``). Nor is it a bound
on Gcdf, or bounded by it: a confidently correct example has Gcdf -> 0 as sigma -> 0 while ``eq9 -> CE /
log 2 > 0``, and Gcdf -> (classes - 1) / 2 as sigma grows while ``eq9`` stays near ``CE / log 2`` when ``p``
is nearly one-hot. ``noisy_ce / log 2`` is tracked beside it so that both the bound and the quality of its
expansion can be read off.

Monte Carlo: every example gets its own ``draws`` draws (the same draws for every sigma: common random
numbers, so curves against sigma are smooth). The mean over examples is what independent weight draws
shared by all examples give (linearity of expectation); per-example draws make its variance smaller and
computable: with ``p_i`` the fraction of example ``i``'s draws that are wrong, the estimate over ``N``
examples is ``mean_i p_i`` with standard error ``sqrt(sum_i p_i (1 - p_i) / (draws - 1)) / N`` -- the Monte
Carlo error against the exact noisy error of the same weights on the same examples.

Cost: the draws act on the logits and features of one forward pass (``[batch, draws, classes]`` numbers per
sigma), never on a new pass through the network; see ``benchmarks/sharpness.py``.
"""

from __future__ import annotations

import functools
import math
from typing import Optional, Sequence

import keras
import numpy as np
from keras import ops

from keras_implicit import _backend, _checks
from keras_implicit import losses as _losses
from keras_implicit import metrics as _metrics
from keras_implicit import models as _models
from keras_implicit.losses import crossentropy_hessian_trace  # noqa: F401  (re-exported: eq. 9's trace)

__all__ = [
    "noisy_error",
    "noisy_crossentropy",
    "crossentropy_hessian_trace",
    "eq9",
    "sharpness_names",
    "evaluate_sharpness",
    "column_sums",
    "from_sums",
    "batch_seed",
    "draw_noise",
    "noise_batch_size",
    "SharpnessSums",
    "DEFAULT_DRAWS",
    "NOISE_BUDGET",
]

DEFAULT_DRAWS = 64
# The most noise numbers (batch x draws x classes) one evaluation call holds: 2^24 float32 = 64 MiB. The
# evaluators cut their batches below it.
NOISE_BUDGET = 2 ** 24

NOISY_ERROR, NOISY_ERROR_SE, NOISY_CE, EQ9, HESSIAN_TRACE = "noisy_error", "noisy_error_se", "noisy_ce", "eq9", \
    "hessian_trace"
_LOG2 = math.log(2.0)


def validate_draws(draws) -> int:
    if isinstance(draws, bool) or not isinstance(draws, (int, np.integer)) or draws < 2:
        raise ValueError(f"draws must be an integer >= 2 (the standard error needs two), got {draws!r}")
    return int(draws)


def validate_seed(seed) -> int:
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or not 0 <= seed < 2 ** 32:
        raise ValueError(f"seed must be an integer in [0, 2^32), got {seed!r}")
    return int(seed)


def _norms(feature_norm, logits):
    """||x|| per example, [B]: ones when None (normalized features)."""
    norm = _losses.feature_norm_tensor(feature_norm, logits)
    batch = ops.shape(logits)[0]
    if norm is None:
        return ops.ones((batch,), logits.dtype)
    return norm * ops.ones((batch,), logits.dtype) if _losses.static_rank(norm) == 0 else norm


def _crossentropy(margins):
    """The CE per sample from shared margins: eq. 7's formula at T = 1, [B]."""
    return _losses.tce_columns(margins, np.array([1.0]))[:, 0]


def _noisy_columns(margins, norm, sigmas: np.ndarray, noise):
    """Per example and sigma: the fraction of wrong noisy predictions and the mean noisy CE, each [B, K].

    ``noise``: z, [B, draws, classes]. The noisy margins are ``d_j + sigma ||x|| (z_j - z_y)``; the prediction
    is wrong when one of them is > 0 (ties have probability 0 for sigma > 0; sigma = 0 is the zero-one error,
    with argmax's tie rule). The noisy CE is ``softplus(logsumexp_{j != y} noisy d_j)``, as eq. 7's formula.
    """
    labels, dtype = margins.labels, margins.d.dtype
    noise = ops.cast(noise, dtype)
    z_true = ops.take_along_axis(noise, labels[:, None, None] * ops.ones_like(noise[:, :, :1], "int32"), axis=2)
    spread = (noise - z_true) * norm[:, None, None]  # [B, D, C]: (z_j - z_y) ||x||
    others = margins.others[:, None, :]
    minus_inf = ops.cast(-np.inf, dtype)
    wrong_columns, ce_columns = [], []
    for sigma in sigmas:
        if sigma == 0:
            wrong_columns.append(_losses.error_column(margins)[:, 0])
            ce_columns.append(_crossentropy(margins))
            continue
        noisy = ops.where(others, margins.d[:, None, :] + float(sigma) * spread, minus_inf)  # [B, D, C]
        largest = ops.max(noisy, axis=-1)
        wrong_columns.append(ops.mean(ops.cast(largest > 0, dtype), axis=-1))
        shifted = ops.sum(ops.exp(noisy - largest[:, :, None]), axis=-1)
        ce_columns.append(ops.mean(ops.softplus(largest + ops.log(shifted)), axis=-1))
    wrong = ops.stack(wrong_columns, axis=-1)
    ce = ops.stack(ce_columns, axis=-1)
    invalid = margins.invalid[:, None]
    nan = ops.cast(np.nan, dtype)
    return ops.where(invalid, nan, wrong), ops.where(invalid, nan, ce)


def _eq9_columns(ce, trace, sigmas: np.ndarray):
    squared = ops.convert_to_tensor((sigmas * sigmas / 2.0)[None, :], ce.dtype)
    return (ce[:, None] + squared * trace[:, None]) / _LOG2


def _draw_noise(shape, seed: int, dtype="float32"):
    if all(isinstance(n, (int, np.integer)) for n in shape):
        return ops.cast(draw_noise(*shape, seed), dtype)
    return keras.random.normal(shape, dtype=dtype, seed=int(seed))  # a batch size known only in a graph


def draw_noise(batch: int, draws: int, classes: int, seed: int) -> np.ndarray:
    """``z ~ N(0, I)``, [batch, draws, classes] float32, from a 32-bit ``seed`` (see :func:`batch_seed`).

    Drawn on the host by NumPy (its ziggurat sampler is ~10x faster here than TensorFlow's stateless
    Philox/Box-Muller, and faster still than XLA's), so a seed gives the same draws on every backend."""
    return np.random.default_rng(int(seed)).standard_normal((int(batch), int(draws), int(classes)), np.float32)


def _single(values, scalar):
    return values[:, 0] if scalar else values


def noisy_error(y_true, y_pred, sigma, draws: int = DEFAULT_DRAWS, seed: int = 0, feature_norm=None):
    """Monte Carlo noisy error, the left side of the paper's eq. 3, per sample.

    ``P_z[argmax_j (s_j + sigma ||x|| z_j) != y]``, ``z ~ N(0, I)``: the chance that N(0, sigma^2 I) noise on
    the top layer's kernel changes the prediction to a wrong one, estimated as the fraction of ``draws`` draws
    that do. Gcdf (eq. 6) is its union bound.

    Args:
        y_true: integer labels [batch] or [batch, 1], or one-hot [batch, classes].
        y_pred: logits [batch, classes].
        sigma: a number >= 0, or a sequence of K of them (the same draws serve every sigma).
        draws: draws per example, >= 2.
        seed: the draws' seed, an integer in [0, 2^32).
        feature_norm: ||x||, a scalar or [batch]; None means 1 (features normalized as in the paper).

    Returns:
        [batch] for a number ``sigma``, [batch, K] for a sequence: multiples of 1 / draws in [0, 1].

    Example:
        >>> noisy_error([0], [[0.0, 0.0]], sigma=1.0, draws=4096)  # a tie: a coin flip, about 0.5
        >>> noisy_error([0, 1], [[2.0, 0.0], [2.0, 0.0]], sigma=[0.5, 1.0, 4.0])  # [2, 3]
    """
    sigmas, scalar = _losses.validate_parameters(sigma, "sigma", allow_zero=True)
    wrong, _ = _noisy(y_true, y_pred, sigmas, draws, seed, feature_norm)
    return _single(wrong, scalar)


def noisy_crossentropy(y_true, y_pred, sigma, draws: int = DEFAULT_DRAWS, seed: int = 0, feature_norm=None):
    """Monte Carlo ``E_z[CE(s + sigma ||x|| z, y)]``, per sample: the expectation eq. 9 expands to second order.

    Same arguments, draws and shapes as :func:`noisy_error` (the same seed gives the same draws); divided by
    log 2 it is an upper bound on the noisy error.

    Example:
        >>> keras.ops.convert_to_numpy(noisy_crossentropy([0], [[5.0, 0.0]], sigma=0.0))  # the CE itself
        array([0.00671...], dtype=float32)
    """
    sigmas, scalar = _losses.validate_parameters(sigma, "sigma", allow_zero=True)
    _, ce = _noisy(y_true, y_pred, sigmas, draws, seed, feature_norm)
    return _single(ce, scalar)


def _noisy(y_true, y_pred, sigmas, draws, seed, feature_norm):
    draws, seed = validate_draws(draws), validate_seed(seed)
    labels, logits = _losses.prepare(y_true, y_pred)
    labels = _checks.check_labels(labels, ops.shape(logits)[-1])
    norm = _norms(feature_norm, logits)
    shape = (ops.shape(logits)[0], draws, ops.shape(logits)[1])
    return _noisy_columns(_losses.Margins(labels, logits), norm, sigmas, _draw_noise(shape, seed, logits.dtype))


def eq9(y_true, y_pred, sigma, feature_norm=None):
    """The right side of the paper's eq. 9, multi-class, per sample: ``(CE + sigma^2 / 2 * Tr H) / log 2``.

    ``Tr H`` is :func:`crossentropy_hessian_trace`. The second-order approximation of ``E[CE] / log 2`` under
    N(0, sigma^2 I) noise on the top kernel, itself an upper bound on the noisy error; an approximation, not
    a bound on the noisy error or on Gcdf (see the module docstring).

    Args:
        y_true: integer labels [batch] or [batch, 1], or one-hot [batch, classes].
        y_pred: logits [batch, classes].
        sigma: a number >= 0, or a sequence of K of them.
        feature_norm: ||x||, a scalar or [batch]; None means 1.

    Returns:
        [batch] for a number ``sigma``, [batch, K] for a sequence.

    Example:
        >>> keras.ops.convert_to_numpy(eq9([0], [[0.0, 0.0]], sigma=2.0))  # (log 2 + 2 * 0.5) / log 2
        array([2.4426...], dtype=float32)
    """
    sigmas, scalar = _losses.validate_parameters(sigma, "sigma", allow_zero=True)
    labels, logits = _losses.prepare(y_true, y_pred)
    labels = _checks.check_labels(labels, ops.shape(logits)[-1])
    ce = _crossentropy(_losses.Margins(labels, logits))
    return _single(_eq9_columns(ce, _losses.hessian_trace_values(logits, _norms(feature_norm, logits)), sigmas), scalar)


# --------------------------------------------------------------------------- #
# Whole-dataset evaluation: sums over batches, shared by evaluate_sharpness and the tracker.
# --------------------------------------------------------------------------- #
def sharpness_names(sigmas: Sequence[float]) -> list[str]:
    """The names of the quantities :func:`evaluate_sharpness` returns (and the tracker records), in order:
    ``noisy_error@s``, ``noisy_error_se@s``, ``noisy_ce@s``, ``eq9@s`` for each sigma, then ``hessian_trace``."""
    names = []
    for family in (NOISY_ERROR, NOISY_ERROR_SE, NOISY_CE, EQ9):
        names += [f"{family}@{_losses.format_parameter(s)}" for s in sigmas]
    return names + [HESSIAN_TRACE]


def column_sums(labels, logits, features, noise, sigmas: np.ndarray, dtype: str):
    """The sums over a batch from which :func:`from_sums` gives the dataset's means: for each sigma the
    wrong fractions, their ``p (1 - p)``, the noisy CE and eq. 9, then the Hessian trace ([4K + 1], ``dtype``).

    ``features`` are the top layer's inputs [B, features] (their norms are used), ``noise`` the draws
    [B, draws, classes]. On TensorFlow the computation is compiled by XLA (``_backend.fused``): its
    ``[B, draws, classes]`` element-wise steps then run as a few fused loops, 2-3x faster than op by op."""
    return _fused_column_sums(tuple(float(s) for s in sigmas), dtype)(labels, logits, features, noise)


@functools.lru_cache(maxsize=16)
def _fused_column_sums(sigmas: tuple, dtype: str):
    grid = np.asarray(sigmas, np.float64)

    def sums(labels, logits, features, noise):
        logits = ops.cast(logits, "float32")
        norm = ops.norm(ops.cast(features, "float32"), axis=-1)
        labels = ops.cast(labels, "int32")
        margins = _losses.Margins(labels, logits)  # shared by the noisy columns and the CE of eq. 9
        wrong, noisy_ce = _noisy_columns(margins, norm, grid, noise)
        trace = _losses.hessian_trace_values(logits, norm)
        ce = _crossentropy(margins)
        columns = ops.concatenate([wrong, wrong * (1.0 - wrong), noisy_ce, _eq9_columns(ce, trace, grid),
                                   trace[:, None]], axis=-1)
        return ops.sum(ops.cast(columns, dtype), axis=0)

    return _backend.fused(sums)


def from_sums(sums: np.ndarray, count: int, sigmas: Sequence[float], draws: int) -> dict:
    """``{name: value}`` (:func:`sharpness_names`) from :func:`column_sums` added over ``count`` examples."""
    sums = np.asarray(sums, np.float64)
    k = len(sigmas)
    means = sums / count
    # Var(p_i) = P_i (1 - P_i) / draws, estimated without bias by p_i (1 - p_i) / (draws - 1).
    standard_error = np.sqrt(np.maximum(sums[k:2 * k], 0.0) / (draws - 1)) / count
    values = np.concatenate([means[:k], standard_error, means[2 * k:4 * k], means[4 * k:]])
    return dict(zip(sharpness_names(sigmas), (float(v) for v in values)))


def batch_seed(seed: int, *position: int) -> int:
    """A 32-bit seed for the draws of one batch, from the evaluation's ``seed`` and the batch's position
    (tracking step, split, batch index): every batch gets its own draws, the same on every rerun."""
    return int(np.random.SeedSequence([int(seed), *(int(p) for p in position)]).generate_state(1)[0])


def noise_batch_size(batch_size: int, draws: int, classes: int) -> int:
    """``batch_size`` cut so that one batch's draws hold at most :data:`NOISE_BUDGET` numbers."""
    return max(1, min(int(batch_size), NOISE_BUDGET // (int(draws) * int(classes))))


def evaluate_sharpness(model: keras.Model, x, y, sigmas: Sequence[float] = _metrics.DEFAULT_SIGMAS,
                       draws: int = DEFAULT_DRAWS, seed: int = 0, batch_size: int = 4096) -> dict:
    """The noisy error (with its standard error), noisy CE, eq. 9 and Hessian trace of ``model`` on ``(x, y)``.

    One inference pass over the data; the draws act on its logits and top-layer features. ``model``'s top layer
    must be a Dense fed by one tensor (as :func:`keras_implicit.models.make_model`'s are; features need not be
    normalized: their norms enter every formula). For tracking during training, pass
    ``noisy_error_draws`` to :class:`keras_implicit.callbacks.AltLossTracker` instead: it shares the tracking
    pass.

    Args:
        model: a functional Keras model (see above).
        x: inputs [N, ...]; y: integer labels [N] or [N, 1], or one-hot rows [N, classes].
        sigmas: noise levels, each >= 0.
        draws: draws per example, >= 2.
        seed: the draws' seed.
        batch_size: examples per forward pass (cut to keep ``batch x draws x classes`` <= ``NOISE_BUDGET``).

    Returns:
        ``{"noisy_error@1": ..., "noisy_error_se@1": ..., "noisy_ce@1": ..., "eq9@1": ..., ...,
        "hessian_trace": ...}``: means over the N examples (the standard error is the Monte Carlo one).

    Example:
        >>> values = evaluate_sharpness(model, x_test, y_test, sigmas=[0.5, 1, 2], draws=128)
        >>> values["noisy_error@1"], values["noisy_error_se@1"]
    """
    sigmas = _losses.parameter_grid(sigmas, "sigma", allow_zero=True)
    if not sigmas.size:
        raise ValueError("sigmas is empty: give at least one value")
    draws, seed = validate_draws(draws), validate_seed(seed)
    if len(x) != len(y) or len(x) == 0:
        raise ValueError(f"x and y must hold the same, non-zero number of examples (got {len(x)} and {len(y)})")
    y = _losses.integer_labels(y, "evaluate_sharpness")
    evaluator = SharpnessSums(model, sigmas, draws)
    total = None
    size = noise_batch_size(batch_size, draws, evaluator.classes)
    for index, start in enumerate(range(0, len(x), size)):
        part = evaluator(x[start:start + size], y[start:start + size], batch_seed(seed, index))
        total = part if total is None else total + part
    return from_sums(ops.convert_to_numpy(total), len(x), sigmas, draws)


class SharpnessSums:
    """``sums = SharpnessSums(model, sigmas, draws)(x, y, seed)``: :func:`column_sums` of one batch, compiled
    for the backend (one forward pass of ``model`` returning logits and top-layer features)."""

    def __init__(self, model: keras.Model, sigmas: np.ndarray, draws: int, trained_model: Optional[keras.Model] = None):
        self.sigmas, self.draws = np.asarray(sigmas, np.float64), int(draws)
        self.classes = int(_models.top_layer(model).units)
        two_outputs = _models.with_features(model)
        dtype = _backend.accumulation_dtype()
        sigmas = self.sigmas

        def sums(logits, features, y, noise):
            return column_sums(y, logits, features, noise, sigmas, dtype)

        self._sums = _backend.compile_batch_sums(two_outputs, sums, trained_model=trained_model or model)

    def __call__(self, x, y, seed: int):
        return self._sums(x, y, draw_noise(int(x.shape[0]), self.draws, self.classes, seed))
