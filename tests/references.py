"""Independent float64 references for the loss families: explicit loops over samples, SciPy's normal CDF."""

import math

import numpy as np
from scipy import integrate, special, stats


# --------------------------------------------------------------------------- #
# Independent references: explicit loops over samples and classes, float64.
# --------------------------------------------------------------------------- #
def ref_gcdf(labels, logits, sigma, feature_norm=None):
    # A loop over samples; within a sample, SciPy's normal CDF over the classes j != y (not erfc, as the library).
    logits = np.asarray(logits, np.float64)
    norms = np.ones(len(labels)) if feature_norm is None else np.broadcast_to(feature_norm, (len(labels),))
    out = np.zeros(len(labels))
    for b, y in enumerate(labels):
        others = np.arange(logits.shape[1]) != y
        diff = logits[b, others] - logits[b, y]
        if sigma == 0:
            out[b] = np.sum(diff > 0) + 0.5 * np.sum(diff == 0)
        else:
            out[b] = np.sum(stats.norm.cdf(diff / (math.sqrt(2) * sigma * norms[b])))
    return out


def ref_tce(labels, logits, temperature):
    logits = np.asarray(logits, np.float64)
    return np.array([-special.log_softmax(logits[b] / temperature)[y] for b, y in enumerate(labels)])


def ref_tce_log1p(labels, logits, temperature):
    """-log softmax(s / T)_y = log(1 + sum_{j != y} exp(d_j / T)) in float64, accurate for tiny losses too (where
    ref_tce's log_softmax cancels): log1p below a largest scaled margin of 0, shifted by it above."""
    out = np.zeros(len(labels))
    for b, y in enumerate(labels):
        row = np.asarray(logits[b], np.float64)
        scaled = np.delete(row - row[y], y) / temperature
        top = scaled.max()
        out[b] = top + np.log(np.exp(-top) + np.exp(scaled - top).sum()) if top > 0 else np.log1p(np.exp(scaled).sum())
    return out


def ref_hinge(labels, logits, margin):
    logits = np.asarray(logits, np.float64)
    out = np.zeros(len(labels))
    for b, y in enumerate(labels):
        others = np.arange(logits.shape[1]) != y
        out[b] = np.sum(np.maximum(0.0, margin + logits[b, others] - logits[b, y]))
    return out


def ref_error(labels, logits):
    return np.array([float(np.argmax(row) != y) for row, y in zip(np.asarray(logits), labels)])


def random_batch(batch, classes, scale=3.0, seed=0):
    rng = np.random.default_rng(seed + 1000 * classes + batch)
    logits = (scale * rng.standard_normal((batch, classes))).astype(np.float32)
    labels = rng.integers(0, classes, size=batch)
    return labels, logits


def ref_noisy_error(labels, logits, sigma, feature_norm=None):
    """The exact noisy error per sample by 1-D quadrature (not Monte Carlo): with noisy logits s + c z,
    c = sigma ||x||, y stays the argmax iff z_j < (s_y - s_j) / c + z_y for every j != y, so
    P(wrong) = 1 - integral phi(t) prod_{j != y} Phi((s_y - s_j) / c + t) dt."""
    logits = np.asarray(logits, np.float64)
    norms = np.ones(len(labels)) if feature_norm is None else np.broadcast_to(feature_norm, (len(labels),))
    out = np.zeros(len(labels))
    for b, y in enumerate(labels):
        gaps = (logits[b, y] - np.delete(logits[b], y)) / (sigma * norms[b])
        correct, _ = integrate.quad(lambda t: stats.norm.pdf(t) * np.prod(stats.norm.cdf(gaps + t)), -np.inf, np.inf,
                                    epsabs=1e-12, epsrel=1e-10, limit=200)
        out[b] = 1.0 - correct
    return out


def numpy_fc6(model, x):
    """fc6 in inference mode in float64 from its weights: Dense, BatchNorm (moving statistics), ReLU x 5,
    L2 normalization, top Dense. Returns (logits, features)."""
    from keras import ops

    h = x.reshape(len(x), -1).astype(np.float64)
    for index in range(1, 6):
        dense, bn = model.get_layer(f"dense_{index}"), model.get_layer(f"batch_norm_{index}")
        h = h @ ops.convert_to_numpy(dense.kernel) + ops.convert_to_numpy(dense.bias)
        h = (h - ops.convert_to_numpy(bn.moving_mean)) / np.sqrt(ops.convert_to_numpy(bn.moving_variance) + bn.epsilon)
        h = np.maximum(h * ops.convert_to_numpy(bn.gamma) + ops.convert_to_numpy(bn.beta), 0.0)
    features = h / np.linalg.norm(h, axis=1, keepdims=True)
    top = model.get_layer("logits")
    return features @ ops.convert_to_numpy(top.kernel) + ops.convert_to_numpy(top.bias), features
