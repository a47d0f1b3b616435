"""The project's shared vocabulary: the loss families and their column names, the default grids, and the choices a
run's settings take. Standard library and NumPy only: every layer imports it, and it imports no layer.

Column names: a family, ``@``, and its parameter in its shortest decimal form (:func:`format_parameter`):
``gcdf@0.5``, ``tce@2``, ``hinge@1``; :func:`parse_name` reads them back. ``error`` is the zero-one error.

Example:
    >>> panel_names([0.5, 1], [2], [], error=True)
    ['gcdf@0.5', 'gcdf@1', 'tce@2', 'error']
    >>> parse_name("gcdf@0.5")
    ('gcdf', 0.5)
"""

from __future__ import annotations

import os
from typing import Iterable, Sequence, Union

import numpy as np

__all__ = [
    "GCDF", "TCE", "HINGE", "ERROR", "FAMILIES", "FAMILY_GRID", "FAMILY_PARAMETER", "FAMILY_TITLE", "CHART_TITLES",
    "format_parameter", "panel_names", "parse_name", "family_names",
    "DEFAULT_SIGMAS", "DEFAULT_TEMPERATURES", "DEFAULT_MARGINS", "DEFAULT_LADDER",
    "MODELS", "DATASETS", "TRAIN_CLASS_COUNTS", "SYSTEM_DIRS", "system_directories", "SCHEDULES", "OPTIMIZERS",
    "LOSS_FAMILIES", "STRATEGIES", "MOVING_STATISTICS", "BACKENDS", "MAX_SEED", "MOMENTUM",
]

Parameters = Union[float, Sequence[float], np.ndarray]

# Family keys, in the column order of the panel; also the metric-name prefixes.
GCDF, TCE, HINGE, ERROR = "gcdf", "tce", "hinge", "error"
FAMILIES = (GCDF, TCE, HINGE)
# Each family's grid key in config.json, its parameter's symbol and its title in figures.
FAMILY_GRID = {GCDF: "sigmas", TCE: "temperatures", HINGE: "margins"}
FAMILY_PARAMETER = {GCDF: "σ", TCE: "T", HINGE: "γ"}
FAMILY_TITLE = {GCDF: "Gcdf loss", TCE: "tempered cross-entropy", HINGE: "multi-class hinge"}
# TensorBoard's chart titles: the families with their equations, and the noisy error's columns.
CHART_TITLES = {
    GCDF: "Gcdf(sigma), eq. 6",
    TCE: "tempered cross-entropy(T), eq. 7",
    HINGE: "multi-class hinge(gamma), eq. 8",
    "noisy_error": "noisy error(sigma), eq. 3 (Monte Carlo)",
    "noisy_error_se": "noisy error's standard error(sigma)",
    "noisy_ce": "noisy cross-entropy(sigma) (Monte Carlo)",
    "eq9": "eq. 9 (CE + sigma^2/2 Tr H) / log 2",
}

# The default grids: powers of two holding the paper's sigma = 0.5, 1 and 8 (24 losses with the error).
DEFAULT_SIGMAS = (0.0625, 0.125, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0, 16.0)
DEFAULT_TEMPERATURES = (0.25, 0.5, 1.0, 2.0, 4.0, 8.0, 16.0)
DEFAULT_MARGINS = (0.25, 0.5, 1.0, 2.0, 4.0, 8.0, 16.0)
# The training-CE levels of the ladders (docs/REPRODUCTION.md).
DEFAULT_LADDER = (1.0, 0.5, 0.3, 0.15, 0.08, 0.04)

# The choices of a run's settings (keras_implicit.config.RunConfig).
MODELS = ("fc6", "c1")
# Each dataset's standard training set, as examples per class (label 0, 1, ...): what train_subset and batch_size
# are checked against before any data is loaded. MNIST's classes are uneven (its class 5 has 5421), which caps its
# class-balanced subsets at 54215 of its 60000 examples.
TRAIN_CLASS_COUNTS = {
    "fashion_mnist": (6000,) * 10,
    "mnist": (5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949),
    "cifar10": (5000,) * 10,
}
DATASETS = tuple(TRAIN_CLASS_COUNTS)
# Directories searched (in order) before tensorflow-datasets when no data_dir is given.
SYSTEM_DIRS = {"fashion_mnist": ("/usr/share/datasets/fashion-mnist",), "mnist": (), "cifar10": ()}
SCHEDULES = ("epoch", "log")
OPTIMIZERS = ("sgd", "adam")
LOSS_FAMILIES = FAMILIES
# How a run is spread over devices: tf.distribute (TensorFlow: mirrored, multiworker), keras.distribution's
# DataParallel (JAX: data-parallel); and how a ghost-batch step updates BatchNorm's moving statistics.
STRATEGIES = ("default", "mirrored", "multiworker", "data-parallel")
TF_DISTRIBUTE_STRATEGIES = ("mirrored", "multiworker")
MOVING_STATISTICS = ("sequential", "mean")
# The Keras backends the protocol runs on (ghost batches, the tracker's compiled passes, checkpoints and resume are
# written for these two; Keras' torch backend is not supported).
BACKENDS = ("tensorflow", "jax")
# Seeds go to keras.utils.set_random_seed (NumPy's legacy seed: 0 .. 2**32 - 1) and numpy's SeedSequence.
MAX_SEED = 2 ** 32 - 1
MOMENTUM = 0.9


def system_directories(name: str) -> list[str]:
    """The directories of :data:`SYSTEM_DIRS` for ``name`` that exist on this machine, in the order they are read
    when no ``data_dir`` is given."""
    return [d for d in SYSTEM_DIRS.get(name, ()) if os.path.isdir(d)]


def format_parameter(value: float) -> str:
    """The shortest decimal form of a parameter to 7 significant digits (float32's precision, in which the losses
    are computed), as used in column names.

    ``1.0 -> "1"``, ``0.5 -> "0.5"``, ``0.0625 -> "0.0625"``, ``1e-05 -> "1e-05"``; a grid's rounding noise does
    not reach the name: ``np.float32(0.1) -> "0.1"``, ``np.geomspace(0.0625, 16, 9)[3]`` (0.49999999999999994)
    ``-> "0.5"``. A family's grid whose values give the same name is refused (``keras_implicit.losses``).
    """
    text = repr(float(f"{float(value):.7g}"))
    return text[:-2] if text.endswith(".0") else text


def panel_names(sigmas: Parameters = (), temperatures: Parameters = (), margins: Parameters = (),
                error: bool = False) -> list[str]:
    """The column names of :func:`keras_implicit.losses.panel_values`: ``gcdf@0.5``, ``tce@2``, ``hinge@1``,
    ``error``, in that order."""
    names = [f"{GCDF}@{format_parameter(s)}" for s in np.atleast_1d(sigmas)] if np.size(sigmas) else []
    names += [f"{TCE}@{format_parameter(t)}" for t in np.atleast_1d(temperatures)] if np.size(temperatures) else []
    names += [f"{HINGE}@{format_parameter(g)}" for g in np.atleast_1d(margins)] if np.size(margins) else []
    if error:
        names.append(ERROR)
    return names


def parse_name(name: str) -> tuple[str, float] | tuple[str, None]:
    """Splits a tracked quantity's name: ``"gcdf@0.5" -> ("gcdf", 0.5)``, ``"ce" -> ("ce", None)``.

    Raises ValueError for a name with ``@`` whose parameter is not a number.
    """
    if "@" not in name:
        return name, None
    family, _, text = name.partition("@")
    try:
        return family, float(text)
    except ValueError:
        raise ValueError(f"cannot parse the parameter of {name!r}: {text!r} is not a number") from None


def family_names(names: Iterable[str], family: str) -> tuple[np.ndarray, list[str]]:
    """The parameters (sorted ascending) and column names of one family among ``names``."""
    pairs = []
    for name in names:
        key, value = parse_name(name)
        if key == family and value is not None:
            pairs.append((value, name))
    pairs.sort()
    return np.array([p for p, _ in pairs], dtype=np.float64), [n for _, n in pairs]
