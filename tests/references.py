"""Independent float64 references for the loss families: explicit loops over samples, SciPy's normal CDF."""

import math

import numpy as np
from scipy import special, stats


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
