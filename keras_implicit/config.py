"""A run's settings: :class:`RunConfig`, its validation, its comparison with a stored ``config.json``, the loss
grammar (``ce``, ``gcdf@SIGMA``, ``tce@T``, ``hinge@GAMMA``) and the run's default name. Standard library and NumPy
only (below every layer): validating a configuration imports no TensorFlow.

Each setting's documentation is its field's ``metadata["help"]``: the class docstring lists them, and
``experiments/run.py`` and ``experiments/sweep.py`` build their flags from them (:func:`add_arguments`,
:func:`config_from_arguments`), so a setting is described once.

Example:
    >>> config = RunConfig(lr=0.001, batch_size=16384).validate()
    >>> default_run_name(config)
    'fashion_mnist-fc6-ce-sgd-lr0.001-b16384-s0'
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import math
import os
import re
import sys
from typing import Optional, Sequence

from keras_implicit.names import (
    BACKENDS,
    DATASETS,
    DEFAULT_MARGINS,
    DEFAULT_SIGMAS,
    DEFAULT_TEMPERATURES,
    LOSS_FAMILIES,
    MAX_SEED,
    MODELS,
    MOVING_STATISTICS,
    OPTIMIZERS,
    SCHEDULES,
    STRATEGIES,
    TRAIN_CLASS_COUNTS,
    parse_name,
    system_directories,
)
from keras_implicit.rundir import read_config_quietly

__all__ = [
    "RunConfig",
    "CONFIG_FLAGS",
    "EXTENDABLE",
    "LEVEL_WINDOW",
    "LOSS_SMOOTHING",
    "check_track_levels",
    "level_trigger_state",
    "LEVEL_SETTLE_POINTS",
    "check_divides",
    "check_ghost_split",
    "cluster_role",
    "balanced_subset_range",
    "effective_moving_statistics",
    "parse_loss",
    "parse_objective",
    "HESSIAN_TRACE",
    "default_run_name",
    "grids",
    "differences",
    "stored_differences",
    "add_arguments",
    "add_run_arguments",
    "in_flag_words",
    "choose_backend",
    "flag_name",
    "positive_int",
    "positive_float",
    "config_from_arguments",
    "explicit_settings",
    "ADDED_LATER",
    "with_added_later",
]


# The config keys that define a run (compared when resuming); versions and git commit are not.
# Of those, EXTENDABLE only say when to stop: changing them continues the run from its checkpoint, as if it had been
# started with them, within what the records already hold (see _Training.extend): epochs below what the checkpoint
# has trained are refused, and a target the records already reached stops the run, reported at its first crossing.
CONFIG_FLAGS = (
    "model", "dataset", "lr", "batch_size", "ghost_batch_size", "epochs", "seed", "optimizer", "loss",
    "train_subset", "track_every", "track_schedule", "track_levels", "target_train_loss", "data_dir",
    "deterministic",
    "noisy_error_draws", "moving_statistics", "gradient_penalty", "sam_radius", "validation_size",
)
EXTENDABLE = ("epochs", "target_train_loss")

# The track_levels trigger. Two signals say how far training has come: the running training loss (an exponential
# average of the batch losses with this weight on the newest, about ten batches) and the last tracked training CE
# (the whole training set, BatchNorm's moving statistics). The batch loss runs 1-12 times *below* the tracked CE at lr
# 0.1 (measured on fc6, 8,192 images: median 2.4), so neither alone says when the tracked CE crosses a level. The
# track_every points are due while some level is *open* and the lower signal lies at or below LEVEL_WINDOW times
# it; a level closes once LEVEL_SETTLE_POINTS tracked points in a row have a training CE at or below it (the first
# crossing and the two points a settled crossing with hold=2 reads). benchmarks/track_levels.py measures the
# ladder's values against dense tracking.
LOSS_SMOOTHING = 0.1
LEVEL_WINDOW = 1.15
LEVEL_SETTLE_POINTS = 3


def level_trigger_state(train_ces: Sequence[float], track_levels: Sequence[float], state: Optional[tuple] = None
                        ) -> tuple:
    """The state of the ``track_levels`` trigger, ``(last tracked training CE or None, tracked points in a row at
    or below each level)``, after the tracked training CEs ``train_ces`` (in order) from ``state`` (None: a fresh
    run). A count that reaches ``LEVEL_SETTLE_POINTS`` stays there: the level is closed. The tracker updates it
    at each point; a resumed run replays it from its records."""
    last, counts = state if state is not None else (None, (0,) * len(track_levels))
    counts = list(counts)
    for ce in train_ces:
        last = float(ce)
        for k, level in enumerate(track_levels):
            if counts[k] < LEVEL_SETTLE_POINTS:
                counts[k] = counts[k] + 1 if last <= level else 0
    return last, tuple(counts)


def check_track_levels(track_levels, track_every, level_window=LEVEL_WINDOW) -> tuple:
    """``track_levels`` as a tuple of floats (empty for None), or a ValueError naming the problem."""
    if track_levels is None:
        return ()
    try:
        levels = tuple(float(level) for level in track_levels)
    except (TypeError, ValueError):
        raise ValueError(f"track_levels must be a list of numbers, got {track_levels!r}") from None
    if not levels or not all(math.isfinite(level) and level > 0 for level in levels):
        raise ValueError(f"track_levels must be finite training losses > 0, got {list(track_levels)!r}")
    if not track_every:
        raise ValueError("track_levels says where the track_every points are taken: give track_every too")
    if not (isinstance(level_window, (int, float)) and math.isfinite(level_window) and level_window > 1):
        raise ValueError(f"level_window must be a number > 1, got {level_window!r}")
    return levels


def check_divides(batch_size: int, ghost_batch_size: int, replicas: int = 1) -> int:
    """The number of micro-batches per replica, ``batch_size / (replicas * ghost_batch_size)``; a ValueError
    that says how the three combine when it is not a positive whole number."""
    batch_size, ghost_batch_size, replicas = int(batch_size), int(ghost_batch_size), int(replicas)
    if ghost_batch_size < 1 or replicas < 1:
        raise ValueError(f"ghost_batch_size and replicas must be >= 1, got {ghost_batch_size} and {replicas}")
    if batch_size < 1 or batch_size % (replicas * ghost_batch_size):
        per_replica = f" on {replicas} replicas ({batch_size / replicas:g} examples each)" if replicas > 1 else ""
        raise ValueError(
            f"batch size {batch_size} is not a whole number of micro-batches of ghost_batch_size "
            f"{ghost_batch_size}{per_replica}: the batch size must be a multiple of replicas x ghost_batch_size "
            f"= {replicas * ghost_batch_size}")
    return batch_size // (replicas * ghost_batch_size)


def check_ghost_split(ghost_batch_size: int, devices: int) -> None:
    """A ValueError unless a micro-batch of ``ghost_batch_size`` splits evenly over ``devices`` (strategy
    ``"data-parallel"`` shards each micro-batch over the devices)."""
    if int(ghost_batch_size) % int(devices):
        raise ValueError(f"strategy 'data-parallel' splits each micro-batch of {ghost_batch_size} over the "
                         f"{devices} devices: make ghost_batch_size a multiple of {devices}")


def cluster_role(environ=None) -> tuple[int, int, bool]:
    """``(workers, index, is_chief)`` from ``TF_CONFIG`` (no TensorFlow import): ``(1, 0, True)`` without one.

    The chief is the task of type ``"chief"``, or worker 0 when the cluster has no chief task.
    Raises ValueError when ``TF_CONFIG`` is not valid JSON or lacks ``cluster`` / ``task``.
    """
    text = (environ if environ is not None else os.environ).get("TF_CONFIG")
    if not text:
        return 1, 0, True
    try:
        config = json.loads(text)
        cluster, task = config["cluster"], config["task"]
        kind, index = task["type"], int(task["index"])
    except (ValueError, KeyError, TypeError) as error:
        raise ValueError(f"TF_CONFIG must be JSON with 'cluster' and 'task' ({{'type', 'index'}}): {error}") from None
    workers = sum(len(cluster.get(name, [])) for name in ("chief", "worker"))
    is_chief = kind == "chief" or (kind == "worker" and index == 0 and not cluster.get("chief"))
    return max(workers, 1), index, is_chief


def balanced_subset_range(class_counts) -> tuple[int, int]:
    """``(smallest, largest)`` size that :func:`keras_implicit.data.class_balanced_subset` can take from a training
    set with ``class_counts[c]`` examples of class ``c``: at least one example of each class, and at most
    ``q * C + r`` where ``q`` is the smallest class's count and the first ``r`` classes (those before the first
    class of count ``q``) can give one more. Fashion-MNIST (6000 of each class): (10, 60000); MNIST (its class 5
    has 5421): (10, 54215)."""
    counts = [int(c) for c in class_counts]
    smallest = min(counts)
    return len(counts), smallest * len(counts) + counts.index(smallest)


def effective_moving_statistics(config) -> Optional[str]:
    """How a run's ghost batches updated BatchNorm's moving statistics (``RunConfig.moving_statistics``):
    ``"sequential"`` or ``"mean"``; None with one micro-batch per step (``batch_size == ghost_batch_size``), where
    the two are the same, and without ghost batches (no ``ghost_batch_size``: a run of a user's own training
    loop). A ``config.json`` of run.py written before the setting existed says nothing: those runs used
    ``"mean"``."""
    batch, ghost = config.get("batch_size"), config.get("ghost_batch_size")
    if ghost is None or (batch is not None and batch == ghost):
        return None
    return config.get("moving_statistics", "mean")


# The parameter's bound for *training* on a family, and why. The metrics and Loss classes accept gcdf@0 (the
# number of classes beating the true one), but it is piecewise constant: no gradient to train with.
# hinge@0 = Σ max(0, s_j − s_y) is the multi-class perceptron loss: its gradient is nonzero on misclassified
# examples, which is enough to train; its trivial minimizer s = 0 is the caveat the README states.
_TRAINING_LOSS_BOUNDS = {
    "gcdf": ("> 0", "σ = 0 counts the classes beating the true one: its gradient is zero almost everywhere, "
                    "so training would not move"),
    "tce": ("> 0", "the temperature divides the logits"),
    "hinge": (">= 0", "γ is a margin; γ = 0 trains on misclassified examples only"),
}


def parse_loss(loss: str):
    """``"ce"`` -> ("ce", None); ``"gcdf@0.5"`` -> ("gcdf", 0.5); also ``tce@T`` and ``hinge@G``.

    Raises ValueError for an unknown loss or a parameter out of its training bound: σ > 0, T > 0, γ >= 0.
    """
    if loss == "ce":
        return "ce", None
    family, parameter = parse_name(str(loss))
    if parameter is None or family not in LOSS_FAMILIES:
        raise ValueError(f"unknown loss {loss!r}: use ce, gcdf@SIGMA, tce@T or hinge@GAMMA (e.g. gcdf@0.5)")
    bound, why = _TRAINING_LOSS_BOUNDS[family]
    if not math.isfinite(parameter) or parameter < 0 or (bound == "> 0" and parameter == 0):
        raise ValueError(f"loss {loss!r}: the parameter must be finite and {bound} ({why})")
    return family, parameter



# The objective grammar's name of the Hessian-trace penalty.
HESSIAN_TRACE = "trh"


def parse_objective(loss: str) -> tuple:
    """A training objective: one loss, or a weighted sum of them, ``TERM[+TERM...]`` with ``TERM`` =
    ``[WEIGHT*]LOSS`` and ``LOSS`` one of :func:`parse_loss`'s (``ce``, ``gcdf@SIGMA``, ``tce@T``,
    ``hinge@GAMMA``).

    ``TERM`` may also be ``[WEIGHT*]trh``: the trace of the cross-entropy's Hessian with respect to the top Dense
    kernel (:func:`keras_implicit.losses.crossentropy_hessian_trace`, the paper's eq. 9 made explicit), a penalty
    added to a loss and never an objective alone.

    ``"ce"`` -> ``((1.0, "ce", None),)``; ``"ce+0.1*gcdf@4"`` -> ``((1.0, "ce", None), (0.1, "gcdf", 4.0))``;
    ``"ce+0.05*trh"`` -> ``((1.0, "ce", None), (0.05, "trh", None))``.

    Raises ValueError, naming the expression, for an empty term, a weight that is not a finite number > 0, a loss
    :func:`parse_loss` refuses, one loss twice, or ``trh`` without a loss.
    """
    text = str(loss).replace(" ", "")
    terms, seen = [], set()
    for term in re.split(r"(?<![eE\d.][eE])\+", text) if text else [""]:
        weight_text, star, name = term.rpartition("*")
        if not name:
            raise ValueError(f"loss {loss!r}: an empty term (write e.g. ce+0.1*gcdf@4)")
        weight = 1.0
        if star:
            try:
                weight = float(weight_text)
            except ValueError:
                raise ValueError(f"loss {loss!r}: the weight {weight_text!r} is not a number (write e.g. "
                                 "ce+0.1*gcdf@4)") from None
            if not (math.isfinite(weight) and weight > 0):
                raise ValueError(f"loss {loss!r}: the weight {weight_text} must be a finite number > 0")
        try:
            family, parameter = (HESSIAN_TRACE, None) if name == HESSIAN_TRACE else parse_loss(name)
        except ValueError as error:
            if "+" in text or star:
                raise ValueError(f"loss {loss!r}: {error}") from None
            raise
        if (family, parameter) in seen:
            raise ValueError(f"loss {loss!r}: {name} appears twice (give it one weight)")
        seen.add((family, parameter))
        terms.append((weight, family, parameter))
    if all(family == HESSIAN_TRACE for _, family, _ in terms):
        raise ValueError(f"loss {loss!r}: trh is a penalty on the top layer's curvature, not an objective by itself: "
                         "add it to a loss (e.g. ce+0.1*trh)")
    return tuple(terms)


def _setting(default, help: str, kind: Optional[str] = None, choices: Optional[Sequence[str]] = None,
             argparse_choices: bool = True, metavar: Optional[str] = None):
    """A RunConfig field with its documentation and how its flag parses (``kind``: ``positive_int``, ``int``,
    ``positive_float``, ``floats``, ``draws``, ``flag``; None: a string)."""
    return dataclasses.field(default=default, metadata={"help": help, "kind": kind, "choices": choices,
                                                        "argparse_choices": argparse_choices, "metavar": metavar})


@dataclasses.dataclass
class RunConfig:
    """Every setting of a run (the flags of ``experiments/run.py``); :meth:`validate` checks them without importing
    TensorFlow. ``epochs`` and ``target_train_loss`` may change when a run is resumed (:data:`EXTENDABLE`); every
    other setting but ``strategy`` and ``cpu_replicas`` defines the run (:data:`CONFIG_FLAGS`).

    Attributes:
{attributes}
    """

    model: str = _setting("fc6", "fc6 or c1 (keras_implicit.models)", choices=MODELS, argparse_choices=False)
    dataset: str = _setting("fashion_mnist", "fashion_mnist, mnist or cifar10", choices=DATASETS,
                            argparse_choices=False)
    lr: float = _setting(0.1, "constant learning rate (> 0)", kind="positive_float")
    batch_size: int = _setting(256, "examples per optimizer step (a multiple of --ghost-batch-size)",
                               kind="positive_int")
    ghost_batch_size: int = _setting(
        256, "micro-batch size: BatchNorm normalizes this many examples; the optimizer steps once per batch, with "
             "the mean gradient of its batch-size / ghost-batch-size micro-batches", kind="positive_int")
    epochs: int = _setting(10, "number of epochs (the cap with --target-train-loss); an epoch is "
                               "n_train // batch-size whole batches", kind="positive_int")
    seed: int = _setting(0, "initialization and shuffling seed, 0 to 2**32 - 1", kind="int")
    optimizer: str = _setting("sgd", "sgd (momentum 0.9) or adam", choices=OPTIMIZERS, argparse_choices=False)
    loss: str = _setting("ce", "training loss: ce, or gcdf@SIGMA (SIGMA > 0), tce@T (T > 0), hinge@GAMMA "
                               "(GAMMA >= 0), or a weighted sum of them, e.g. ce+0.1*gcdf@4; a sum may add trh, the "
                               "trace of the CE's Hessian in the top kernel (eq. 9's curvature), e.g. ce+0.1*trh")
    train_subset: Optional[int] = _setting(
        None, "train on a class-balanced subset of this many examples (at least one batch, at most 60000 for "
              "fashion_mnist, 54215 for mnist, 50000 for cifar10)", kind="positive_int")
    validation_size: Optional[int] = _setting(
        None, "hold out a class-balanced validation split of this many training examples (each class's last ones, "
              "the same for every seed), tracked as the split 'validation'; training and --train-subset use the "
              "rest, and the test set is never used to choose anything", kind="positive_int")
    track_every: Optional[int] = _setting(None, "also track every this many optimizer steps", kind="positive_int")
    track_schedule: str = _setting("epoch", "epoch (step 0 and every epoch) or log (also steps 1, 2, 3, 4, 6, 8, "
                                            "11, 16, ... up to two epochs)", choices=SCHEDULES,
                                   argparse_choices=False)
    track_levels: Optional[tuple] = _setting(
        None, "with --track-every: take its points only around the crossings of these training losses (from when "
              "the running training loss or the last tracked CE is within a factor 1.15 of one until three tracked "
              "points in a row are at or below it), every epoch elsewhere, e.g. --track-levels 1 0.5 0.3 0.15 0.08 "
              "0.04 (the ladder's levels)", kind="floats", metavar="CE")
    target_train_loss: Optional[float] = _setting(
        None, "stop once the tracked training cross-entropy is below this", kind="positive_float")
    data_dir: Optional[str] = _setting(
        None, "an existing directory with the dataset's IDX files (or CIFAR-10 batches, or a tensorflow-datasets "
              "data directory); given, no other directory is read (default: /usr/share/datasets/fashion-mnist, "
              "then tensorflow-datasets)")
    deterministic: bool = _setting(False, "enable TensorFlow's op determinism (bit-exact resume)", kind="flag")
    strategy: str = _setting(
        "default", "default: one device; mirrored: every GPU of this machine (tf.distribute.MirroredStrategy); "
                   "multiworker: every machine of the cluster in $TF_CONFIG (MultiWorkerMirroredStrategy, run the "
                   "same command on each), both TensorFlow only; data-parallel: every device of this machine "
                   "(keras.distribution.DataParallel), JAX only", choices=STRATEGIES)
    cpu_replicas: Optional[int] = _setting(
        None, "with --strategy mirrored or data-parallel on a machine without GPUs: split the CPU into this many "
              "devices (mirrored: the batch must be a multiple of replicas x --ghost-batch-size; data-parallel: "
              "the ghost batch a multiple of the devices)", kind="positive_int")
    noisy_error_draws: int = _setting(
        0, "also measure, at every tracking point, the noisy error (Monte Carlo with DRAWS draws per example, e.g. "
           "64; 0: off), the noisy cross-entropy and eq. 9 for each sigma (keras_implicit.sharpness)",
        kind="draws", metavar="DRAWS")
    moving_statistics: str = _setting(
        "sequential", "how a batch of several micro-batches updates BatchNorm's moving statistics: sequential "
                      "(once per micro-batch, in order, the paper's sequence of mini-batches) or mean (once per "
                      "step with the micro-batches' mean moments, tf.keras 2's virtual_batch_size)",
        choices=MOVING_STATISTICS)
    gradient_penalty: float = _setting(
        0.0, "lambda of the gradient-norm penalty over the micro-batches: each step follows the mean over the "
             "micro-batches k of the gradient of L_k + lambda ||grad L_k||^2 (double backpropagation; Smith et al. "
             "2021's implicit value is lr / 4; 0: off)", kind="nonnegative_float", metavar="LAMBDA")
    sam_radius: float = _setting(
        0.0, "rho of sharpness-aware minimization per micro-batch (m-sharpness, m = --ghost-batch-size): each "
             "micro-batch's gradient is taken at w + rho g / ||g||, g its gradient at w; BatchNorm's moving "
             "statistics are updated by the first pass only (0: off)", kind="nonnegative_float", metavar="RHO")

    def validate(self) -> "RunConfig":
        """Raises ValueError with a clear message on any bad setting; returns self. Imports no TensorFlow."""
        if self.model not in MODELS:
            raise ValueError(f"unknown model {self.model!r}: choose one of {', '.join(MODELS)}")
        if self.dataset not in DATASETS:
            raise ValueError(f"unknown dataset {self.dataset!r}: choose one of {', '.join(DATASETS)}")
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"unknown optimizer {self.optimizer!r}: choose one of {', '.join(OPTIMIZERS)}")
        parse_objective(self.loss)
        if not (isinstance(self.lr, (int, float)) and math.isfinite(self.lr) and self.lr > 0):
            raise ValueError(f"the learning rate must be a finite number > 0, got {self.lr}")
        for name in ("batch_size", "ghost_batch_size", "epochs"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if self.batch_size % self.ghost_batch_size:
            raise ValueError(
                f"batch_size {self.batch_size} is not a multiple of ghost_batch_size {self.ghost_batch_size}: "
                "a large batch is applied as whole micro-batches of the ghost size"
            )
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or not 0 <= self.seed <= MAX_SEED:
            raise ValueError(f"seed must be an integer from 0 to {MAX_SEED} (2**32 - 1, what NumPy and Keras take as "
                             f"a seed), got {self.seed!r}")
        self._validate_size()
        if self.data_dir and not os.path.isdir(self.data_dir):
            raise ValueError(f"data_dir {self.data_dir} " + (
                "is not a directory" if os.path.exists(self.data_dir) else "does not exist")
                + ": give the directory that holds the dataset's files (or a tensorflow-datasets data directory), "
                "or leave data_dir out")
        if self.track_every is not None and (not isinstance(self.track_every, int) or self.track_every < 1):
            raise ValueError(f"track_every must be a positive number of steps, got {self.track_every!r}")
        if self.track_schedule not in SCHEDULES:
            raise ValueError(f"unknown tracking schedule {self.track_schedule!r}: choose one of {', '.join(SCHEDULES)}")
        check_track_levels(self.track_levels, self.track_every)
        if self.target_train_loss is not None and not (
            math.isfinite(self.target_train_loss) and self.target_train_loss > 0
        ):
            raise ValueError(f"target_train_loss must be a finite number > 0, got {self.target_train_loss}")
        if (isinstance(self.noisy_error_draws, bool) or not isinstance(self.noisy_error_draws, int)
                or self.noisy_error_draws == 1 or self.noisy_error_draws < 0):
            raise ValueError(f"noisy_error_draws must be 0 (off) or an integer >= 2, got {self.noisy_error_draws!r}")
        if self.moving_statistics not in MOVING_STATISTICS:
            raise ValueError(f"unknown moving_statistics {self.moving_statistics!r}: choose one of "
                             f"{', '.join(MOVING_STATISTICS)}")
        for name in ("gradient_penalty", "sam_radius"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not (
                    math.isfinite(value) and value >= 0):
                raise ValueError(f"{name} must be a finite number >= 0 (0: off), got {value!r}")
        if self.gradient_penalty and self.sam_radius:
            raise ValueError("gradient_penalty and sam_radius are two explicit regularizers: give one of them (a "
                             "run with both would need a third backpropagation and compares with neither)")
        self._validate_strategy()
        return self

    def _validate_size(self):
        """batch_size and train_subset against the dataset's standard training set (no data is loaded)."""
        counts = list(TRAIN_CLASS_COUNTS[self.dataset])
        total, classes = sum(counts), len(counts)
        held = self.validation_size
        if held is not None:
            if isinstance(held, bool) or not isinstance(held, int) or held < 1:
                raise ValueError(f"validation_size must be a positive integer, got {held!r}")
            if held < classes or held >= total or any(
                    held // classes + (label < held % classes) >= count for label, count in enumerate(counts)):
                raise ValueError(f"validation_size {held} must be from {classes} (one example of each class) to "
                                 f"less than {self.dataset}'s training set ({total} examples), each class keeping "
                                 "some for training")
            counts = [count - held // classes - (label < held % classes) for label, count in enumerate(counts)]
            total = sum(counts)
        if self.batch_size > total:
            raise ValueError(f"batch_size {self.batch_size} is larger than {self.dataset}'s training set ({total} "
                             f"examples{' after the validation split' if held else ''}): an epoch would have no "
                             "step")
        subset = self.train_subset
        if subset is None:
            return
        if isinstance(subset, bool) or not isinstance(subset, int) or subset < 1:
            raise ValueError(f"train_subset must be a positive integer, got {subset!r}")
        low, high = balanced_subset_range(counts)
        low = max(low, self.batch_size)
        limits = (f"train_subset must be from {low} to {high} for {self.dataset} with batch_size {self.batch_size}"
                  if low <= high else f"no class-balanced subset of {self.dataset} holds a batch of {self.batch_size}")
        if subset < self.batch_size:
            raise ValueError(f"train_subset {subset} is smaller than one batch ({self.batch_size}): an epoch would "
                             f"have no step ({limits})")
        if subset < classes:
            raise ValueError(f"train_subset {subset} is smaller than the number of classes ({classes}): a "
                             f"class-balanced subset holds at least one example of each ({limits})")
        if subset > high:
            smallest = min(counts)
            what = (f"{self.dataset}'s training set ({total} examples)" if high == total else
                    f"the largest class-balanced subset of {self.dataset}'s training set ({high} of its {total} "
                    f"examples: its smallest class, {counts.index(smallest)}, has {smallest})")
            raise ValueError(f"train_subset {subset} is larger than {what} ({limits})")

    def _validate_strategy(self):
        if self.strategy not in STRATEGIES:
            raise ValueError(f"unknown strategy {self.strategy!r}: choose one of {', '.join(STRATEGIES)}")
        if self.cpu_replicas is not None:
            if not isinstance(self.cpu_replicas, int) or self.cpu_replicas < 1:
                raise ValueError(f"cpu_replicas must be a positive integer, got {self.cpu_replicas!r}")
            if self.strategy not in ("mirrored", "data-parallel"):
                raise ValueError("cpu_replicas splits this machine's CPU for strategy 'mirrored' or "
                                 "'data-parallel' only")
            if os.path.isdir("/proc/driver/nvidia/gpus") and os.listdir("/proc/driver/nvidia/gpus"):
                raise ValueError("cpu_replicas is for machines without a GPU; this one has NVIDIA GPUs: leave it "
                                 "out and strategy 'mirrored' uses every GPU")
        if self.strategy == "multiworker" and not os.environ.get("TF_CONFIG"):
            raise ValueError("strategy 'multiworker' needs TF_CONFIG (the cluster and this worker's task) in the "
                             "environment of every worker")
        # The replicas known before TensorFlow starts (GPUs are counted once it has: train() checks again).
        if self.strategy == "data-parallel":  # each micro-batch is split over the devices
            check_ghost_split(self.ghost_batch_size, self.cpu_replicas or 1)  # GPUs: checked once JAX has started
            check_divides(self.batch_size, self.ghost_batch_size)
        else:
            replicas = self.cpu_replicas or (cluster_role()[0] if self.strategy == "multiworker" else 1)
            check_divides(self.batch_size, self.ghost_batch_size, replicas)

    def flags(self) -> dict:
        """Every setting as a dict (what ``config.json`` holds of them)."""
        return dataclasses.asdict(self)

    @classmethod
    def help(cls, name: str) -> str:
        """The documentation of one setting (its field's ``metadata["help"]``)."""
        return _FIELDS[name].metadata["help"]


def default_run_name(config: RunConfig) -> str:
    """A directory name from the settings that differ between the paper's runs:
    ``<dataset>-<model>-<loss>-<optimizer>-lr<lr>-b<batch>[-g<ghost>][-n<subset>][-v<validation>][-bnmean][-gp<lambda>]
    [-sam<rho>]
    -s<seed>`` (the loss without its ``@``, ``*`` as ``x``; ``-g`` when the ghost batch size is not the default 256,
    ``-n`` with ``train_subset``, ``-bnmean`` with ``moving_statistics="mean"`` on batches of several
    micro-batches, ``-gp`` with a gradient penalty, ``-sam`` with SAM, ``-v`` with a validation split before them),
    e.g.
    ``fashion_mnist-fc6-ce-sgd-lr0.1-b256-s0``. ``run.py`` and ``sweep.py`` both name runs with it."""
    parts = [config.dataset, config.model, config.loss, config.optimizer, f"lr{config.lr:g}", f"b{config.batch_size}"]
    if config.ghost_batch_size != RunConfig.ghost_batch_size:
        parts.append(f"g{config.ghost_batch_size}")
    if config.train_subset is not None:
        parts.append(f"n{config.train_subset}")
    if config.validation_size is not None:
        parts.append(f"v{config.validation_size}")
    if effective_moving_statistics(config.flags()) == "mean":
        parts.append("bnmean")
    if config.gradient_penalty:
        parts.append(f"gp{config.gradient_penalty:g}")
    if config.sam_radius:
        parts.append(f"sam{config.sam_radius:g}")
    parts.append(f"s{config.seed}")
    return "-".join(parts).replace("@", "").replace("*", "x")


_FIELDS = {field.name: field for field in dataclasses.fields(RunConfig)}
RunConfig.__doc__ = RunConfig.__doc__.format(attributes="\n".join(
    f"        {name}: {field.metadata['help']}." for name, field in _FIELDS.items()))


# --------------------------------------------------------------------------- #
# Flags: one per setting, from the fields
# --------------------------------------------------------------------------- #
def _integer(text) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None


def positive_int(text):
    """argparse's type of a positive integer flag (its error says what is wrong with the text)."""
    value = _integer(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return value


def draws_count(text):
    """argparse's type of ``--noisy-error-draws``: 0 (off) or at least 2."""
    value = _integer(text)
    if value < 0 or value == 1:
        raise argparse.ArgumentTypeError(f"must be 0 (off) or at least 2 (the standard error needs two), got {value}")
    return value


def positive_float(text):
    """argparse's type of a finite number > 0."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not (value > 0 and value != float("inf")):
        raise argparse.ArgumentTypeError(f"must be a finite number > 0, got {text}")
    return value


def nonnegative_float(text):
    """argparse's type of a finite number >= 0 (0: a setting off)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not (value >= 0 and value != float("inf")):
        raise argparse.ArgumentTypeError(f"must be a finite number >= 0 (0: off), got {text}")
    return value


_KINDS = {"positive_int": positive_int, "int": int, "positive_float": positive_float,
          "nonnegative_float": nonnegative_float, "draws": draws_count, "floats": float, None: None}


def flag_name(name: str) -> str:
    """The command-line flag of a setting: ``ghost_batch_size`` -> ``--ghost-batch-size``."""
    return "--" + name.replace("_", "-")


def add_arguments(parser: argparse.ArgumentParser, names: Optional[Sequence[str]] = None,
                  defaults: Optional[RunConfig] = None, unset: bool = False) -> None:
    """Adds one flag per RunConfig setting (``names``: a subset, in field order) to ``parser``, with the field's
    help, parsing and default (``defaults``' values, else the field's; with ``unset``, None: a flag not given then
    reads None, for a tool that passes on only what it was given)."""
    defaults = defaults or RunConfig()
    for name, field in _FIELDS.items():
        if names is not None and name not in names:
            continue
        meta = field.metadata
        options = {"help": meta["help"], "dest": name}
        default = None if unset else getattr(defaults, name)
        if meta["kind"] == "flag":
            parser.add_argument(flag_name(name), action="store_true", default=None if unset else default, **options)
            continue
        options["default"] = None if default is None else (list(default) if meta["kind"] == "floats" else default)
        if _KINDS[meta["kind"]] is not None:
            options["type"] = _KINDS[meta["kind"]]
        if meta["kind"] == "floats":
            options["nargs"] = "+"
        if meta["choices"] is not None and meta["argparse_choices"]:
            options["choices"] = meta["choices"]
        if meta["metavar"]:
            options["metavar"] = meta["metavar"]
        parser.add_argument(flag_name(name), **options)


def add_run_arguments(parser: argparse.ArgumentParser) -> None:
    """``experiments/run.py``'s command line: every setting (:func:`add_arguments`), then where the run goes and how
    it is run (``--out``, ``--overwrite``, ``--no-progress``, ``--backend``). ``experiments/sweep.py`` parses the
    flags it passes on to run.py with the same parser."""
    add_arguments(parser)
    parser.add_argument("--out", default=None, help="run directory (default: runs/<name from the flags>)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace what the run directory holds (a run's files only) instead of resuming")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--backend", default=None, metavar="{" + ",".join(BACKENDS) + "}",
                        help="the Keras backend (default: $KERAS_BACKEND, else Keras' own default, tensorflow); "
                             "tf.distribute is TensorFlow-only")


# The library's errors name its settings; a user of the command lines knows them as flags.
SETTINGS_AS_FLAGS = {
    "overwrite=True": "--overwrite",
    "another run_dir": "--out for another directory",
    "cpu_replicas": "--cpu-replicas",
    "ghost_batch_size": "--ghost-batch-size",
    "batch_size": "--batch-size",
    "train_subset": "--train-subset",
    "data_dir": "--data-dir",
    "seed must": "--seed must",
    "epochs=": "--epochs ",
    "KERAS_BACKEND=": "--backend ",
    "moving_statistics": "--moving-statistics",
    "gradient_penalty": "--gradient-penalty",
    "sam_radius": "--sam-radius",
    "validation_size": "--validation-size",
}


def in_flag_words(message: str) -> str:
    """A library message in the command lines' words (``overwrite=True`` -> ``--overwrite``, ...); a setting's name
    inside a path or a longer name (``/data/data_dir/``, ``my_train_subset``) is left alone."""
    for setting, flag in SETTINGS_AS_FLAGS.items():
        after = r"(?![\w/-]|\.\w)" if setting[-1].isalnum() or setting[-1] == "_" else ""
        message = re.sub(r"(?<![\w/.-])" + re.escape(setting) + after, lambda _, flag=flag: flag, message)
    return message


def choose_backend(flag: str | None) -> str:
    """Sets ``KERAS_BACKEND`` from ``--backend`` before Keras is imported; returns the backend, or raises
    ValueError with one line when it is unknown or not installed."""
    backend = flag or os.environ.get("KERAS_BACKEND") or "tensorflow"
    if backend not in BACKENDS:
        source = "--backend" if flag else "KERAS_BACKEND"
        raise ValueError(f"the Keras backend {backend!r} ({source}) is not supported: keras-implicit runs on "
                         f"{' and '.join(BACKENDS)}")
    if "keras" in sys.modules and sys.modules["keras"].backend.backend() != backend:
        raise ValueError(f"Keras is already loaded with the {sys.modules['keras'].backend.backend()} backend")
    if importlib.util.find_spec(backend) is None:
        raise ValueError(f"the {backend} backend is not installed (pip install {backend})")
    os.environ["KERAS_BACKEND"] = backend
    return backend


def config_from_arguments(args: argparse.Namespace, **overrides) -> RunConfig:
    """The RunConfig of parsed flags (those :func:`add_arguments` added; ``overrides`` replace some), not yet
    validated."""
    settings = {name: getattr(args, name) for name in _FIELDS if hasattr(args, name)}
    settings.update(overrides)
    if settings.get("track_levels") is not None:
        settings["track_levels"] = tuple(settings["track_levels"])
    return RunConfig(**settings)


def explicit_settings(argv: Sequence[str], names: Optional[Sequence[str]] = None) -> set:
    """The settings that the flags ``argv`` set explicitly (whatever their value), for a tool that must tell a
    flag given from a default; unknown flags are ignored. Raises ValueError for a flag that does not parse."""
    parser = argparse.ArgumentParser(add_help=False)

    def refuse(message):
        raise ValueError(message)

    parser.error = refuse
    add_arguments(parser, names, unset=True)
    parsed, _ = parser.parse_known_args(list(argv))
    return {name for name, value in vars(parsed).items() if value is not None}


def grids() -> dict:
    """The panel's grids as ``config.json`` holds them (the library's defaults)."""
    return {"sigmas": list(DEFAULT_SIGMAS), "temperatures": list(DEFAULT_TEMPERATURES),
            "margins": list(DEFAULT_MARGINS)}


# Settings added after runs were made: a config.json without them had the default.
ADDED_LATER = {"noisy_error_draws": RunConfig.noisy_error_draws, "track_levels": RunConfig.track_levels,
               "gradient_penalty": RunConfig.gradient_penalty, "sam_radius": RunConfig.sam_radius,
               "validation_size": RunConfig.validation_size}


def with_added_later(content: dict) -> dict:
    """A ``config.json`` content with the settings added after it was written, at the value it was trained with
    (their defaults: :data:`ADDED_LATER`), so that old and new runs of one setting group together."""
    return {**ADDED_LATER, **content}


def _data_directory(content: dict) -> Optional[str]:
    """The directory a ``data_dir`` setting reads: itself, or without it the dataset's system directory where this
    machine has one (``data.SYSTEM_DIRS``), resolved; None (tensorflow-datasets' default) otherwise. Leaving
    ``--data-dir`` out and naming that directory are one setting."""
    data_dir = content.get("data_dir")
    if not data_dir:
        data_dir = next(iter(system_directories(content.get("dataset"))), None)
    return os.path.realpath(data_dir) if data_dir else None


def _comparable(content: dict) -> dict:
    comparable = {k: content.get(k, ADDED_LATER.get(k)) for k in (*CONFIG_FLAGS, "sigmas", "temperatures", "margins")}
    # What a run's config.json lacks, or what cannot differ with one micro-batch per step, as analysis reads it.
    comparable["moving_statistics"] = effective_moving_statistics(content)
    comparable["data_dir"] = _data_directory(content)
    return comparable


def differences(stored: dict, wanted: dict, keys=None) -> dict:
    """``{key: (stored, wanted)}`` where a ``config.json`` content and the settings wanted now differ, over ``keys``
    (default: every key that defines a run, the grids included); ``wanted`` is compared as config.json would hold
    it (tuples as lists)."""
    before, asked = _comparable(stored), _comparable(json.loads(json.dumps(wanted)))
    return {k: (before[k], asked.get(k)) for k in (keys or before) if before[k] != asked.get(k)}


def stored_differences(run_dir, config: RunConfig) -> Optional[dict]:
    """``{setting: (stored, asked)}`` for the settings that define a run (``CONFIG_FLAGS``) in which ``config``
    differs from the run in ``run_dir``, read from its ``config.json`` without locking or changing anything; None
    when it holds no readable ``config.json``. :func:`train` continues a run that differs only in ``EXTENDABLE``
    settings and refuses any other difference; a scheduler (``experiments/sweep.py``) can skip a finished run
    only when this is empty.

    Example:
        >>> stored_differences("runs/fc6_lr0.1", dataclasses.replace(config, epochs=20))
        {'epochs': (10, 20)}
    """
    stored = read_config_quietly(run_dir)
    if stored is None:
        return None
    return differences(stored, config.flags(), CONFIG_FLAGS)  # the grids are the library's, not a setting
