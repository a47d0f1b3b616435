"""The paper's training protocol: ghost batches, run directories, checkpoints and resume.

``train(RunConfig(lr=0.1), "runs/fc6-lr0.1")`` trains one of the library's models with plain
cross-entropy (SGD, momentum 0.9, constant learning rate, no weight decay, no augmentation) while an
:class:`~keras_implicit.callbacks.AltLossTracker` tracks the panel on the whole training and test sets,
and writes the run directory:

- ``config.json``: every setting of :class:`RunConfig`, the panel's grids (``sigmas``,
  ``temperatures``, ``margins``), ``versions`` and ``git_commit``;
- ``status.json``: ``{"state": "running" | "finished" | "diverged", "epoch", "step", "message"}``;
- ``metrics.jsonl``: one record per tracking point and split (see :mod:`keras_implicit.callbacks`);
- ``tb/``: TensorBoard scalars and the custom-scalars layout (one chart per family);
- ``checkpoint.npz``: weights, optimizer state (momentum, iteration counter), epoch, step, the
  length of ``metrics.jsonl`` and of the TensorBoard event files at that point, and a copy of
  ``config.json``; replaced atomically at each epoch end, the one it replaces kept as
  ``checkpoint.prev.npz``.

**Ghost batches** (the paper's section 4.2): the model is a :class:`~keras_implicit.ghost.GhostBatchModel`,
which applies each batch as micro-batches of ``ghost_batch_size``: each BatchNormalization normalizes its
own micro-batch, the optimizer takes one step per batch with the mean of the micro-batch gradients (equal
to the gradient of the mean loss over the batch), and the moving statistics take one update per micro-batch, in
order (``moving_statistics="sequential"``; ``"mean"``: one per step with the micro-batches' mean moments).
``optimizer.iterations`` counts batches.

**Several devices or machines** (``strategy``, TensorFlow only): ``"mirrored"`` trains on every GPU of the
machine (or on ``cpu_replicas`` logical CPU devices), ``"multiworker"`` on every machine of ``TF_CONFIG``'s
cluster. Each replica holds a contiguous ``batch_size / replicas`` of every batch, in micro-batches of
``ghost_batch_size`` (``batch_size`` must be a multiple of ``replicas * ghost_batch_size``); gradients and
moving statistics are averaged over all of them, so the run is the same run as on one device (to float
rounding). The tracker's sums are split over the replicas and added up. Only the chief (worker 0, or the task
of type ``"chief"``) reads and writes the run directory; it tells the other workers whether and from which
checkpoint to train, and sends them its restored weights. A worker that stops makes the others stop with a
:class:`WorkerLostError`; rerunning the same commands resumes from the last checkpoint.

**An epoch** is ``steps_per_epoch = n_train // batch_size`` whole large batches: the training set is
shuffled with a generator seeded by ``(seed, epoch)`` and the ``n_train % batch_size`` examples left
over at the end of the permutation are not used in that epoch (different ones each epoch). No
accumulation window straddles two epochs and no partial micro-batch is ever weighted as a full one.

**Resume.** Rerunning the same command on a run directory continues from the last checkpoint (the
last completed epoch): ``metrics.jsonl`` is cut back to the checkpoint's length so no point is logged
twice, TensorBoard points are written only at checkpoints. A finished run is left alone; a different
configuration is refused unless ``overwrite``, except for ``epochs`` and ``target_train_loss`` (``EXTENDABLE``),
which only say when to stop: changing them continues the run from its checkpoint (``config.json`` then holds the
new values), as if it had been started with them, within what it has trained. ``epochs`` below the steps the
checkpoint holds cannot be undone: a RunError, with nothing changed (a cap at or above them is accepted, e.g. 2
for a run stopped by its target inside epoch 2). A target that the records up to the checkpoint already went
below stops the run there (nothing is trained or tracked again), and the status message gives the step of its
first crossing, where a run started with it would have stopped, and the step the run went on to. A second
process on the same directory is refused (``fcntl.flock``). A run that cannot start leaves no directory behind
if ``train`` created it. With ``deterministic=True`` (``tf.config.experimental.enable_op_determinism`` on TensorFlow)
the resumed run's metrics equal an uninterrupted run's bit for bit (see the README's Experiments
section for what was measured).

**Damaged run directories** (a file truncated or overwritten on disk) cost at most one epoch, never a
traceback: each file that cannot be read gets one line naming it. A damaged or missing
``checkpoint.npz`` is a warning on stderr and the run resumes from ``checkpoint.prev.npz`` (one epoch
older; ``metrics.jsonl`` and the TensorBoard files are cut back to it, so the result is the same as
an uninterrupted run's); if neither can be read, a RunError says to rerun with ``overwrite``.
``status.json`` only summarizes: damaged, it is a warning and the run resumes from its checkpoint
(which rewrites it; a finished run just finishes again, with nothing to train). ``config.json`` defines the
run: damaged, it is restored from the copy in the newest readable checkpoint with a warning, or, with
no copy (checkpoints written before copies were kept), a RunError says to restore it or rerun with
``overwrite``. A torn last line of ``metrics.jsonl`` (a crash mid-write) is after the checkpoint and
is cut away on resume; ``analysis.load_run`` drops it with a warning. ``metrics.jsonl`` shorter
than its checkpoint counted, or a malformed line before that point, is a RunError (points were lost).
"""

from __future__ import annotations

import dataclasses
import errno
import fcntl
import io
import json
import math
import os
import platform
import shutil
import subprocess
import sys
import time
from typing import Optional

import numpy as np

from keras_implicit._distribute import MOVING_STATISTICS, STRATEGIES
from keras_implicit._distribute import check_divides as _check_divides
from keras_implicit._distribute import cluster_role as _cluster_role
from keras_implicit._startup import quiet_cuda_probe
from keras_implicit.analysis import effective_moving_statistics, parse_name

__all__ = [
    "MODELS",
    "DATASETS",
    "TRAIN_CLASS_COUNTS",
    "SCHEDULES",
    "OPTIMIZERS",
    "RunConfig",
    "RunError",
    "RunLockedError",
    "WorkerLostError",
    "STRATEGIES",
    "MOVING_STATISTICS",
    "BACKENDS",
    "LEVEL_WINDOW",
    "check_track_levels",
    "RunDirectory",
    "TrainResult",
    "parse_loss",
    "make_loss",
    "make_optimizer",
    "epoch_batches",
    "default_run_name",
    "stored_differences",
    "train",
    "train_with_exit_code",
    "EXIT_FINISHED",
    "EXIT_CANNOT_START",
    "EXIT_BAD_SETTINGS",
    "EXIT_DIVERGED",
    "EXIT_WORKER_LOST",
    "EXIT_INTERRUPTED",
]

# The names a RunConfig accepts. The modules that implement them (models, data, callbacks) import these,
# so that validating a configuration imports no TensorFlow.
MODELS = ("fc6", "c1")
# Each dataset's standard training set, as examples per class (label 0, 1, ...): what train_subset and batch_size
# are checked against before any data is loaded (data.NUM_CLASSES comes from it too). MNIST's classes are uneven
# (its class 5 has 5421), which caps its class-balanced subsets at 54215 of its 60000 examples.
TRAIN_CLASS_COUNTS = {
    "fashion_mnist": (6000,) * 10,
    "mnist": (5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949),
    "cifar10": (5000,) * 10,
}
DATASETS = tuple(TRAIN_CLASS_COUNTS)
# Seeds go to keras.utils.set_random_seed (NumPy's legacy seed: 0 .. 2**32 - 1) and numpy's SeedSequence.
MAX_SEED = 2 ** 32 - 1
SCHEDULES = ("epoch", "log")
# The Keras backends the protocol runs on (ghost batches, the tracker's compiled passes, checkpoints and resume are
# written for these two; Keras' torch backend is not supported).
BACKENDS = ("tensorflow", "jax")
OPTIMIZERS = ("sgd", "adam")
LOSS_FAMILIES = ("gcdf", "tce", "hinge")
MOMENTUM = 0.9

# The config keys that define a run (compared when resuming); versions and git commit are not.
# Of those, EXTENDABLE only say when to stop: changing them continues the run from its checkpoint, as if it had been
# started with them, within what the records already hold (see _Training.extend): epochs below what the checkpoint
# has trained are refused, and a target the records already reached stops the run, reported at its first crossing.
CONFIG_FLAGS = (
    "model", "dataset", "lr", "batch_size", "ghost_batch_size", "epochs", "seed", "optimizer", "loss",
    "train_subset", "track_every", "track_schedule", "track_levels", "target_train_loss", "data_dir",
    "deterministic",
    "noisy_error_draws", "moving_statistics",
)
EXTENDABLE = ("epochs", "target_train_loss")
# Examples per forward pass when tracking (inference only: large batches amortize the per-call cost).
TRACKING_BATCH_SIZES = {"fc6": 4096, "c1": 1024}


# The track_levels trigger: the running training loss is an exponential average of the batch losses with this
# weight on the newest (about ten batches), and the track_every points are due while it lies within a factor
# LEVEL_WINDOW of a level. The batch loss is the training-mode loss of one batch (noisy, and BatchNorm's batch
# statistics differ from the moving ones the tracked CE uses): the window is wide enough for both
# (benchmarks/tracking.py measures the ladder values against dense tracking).
LOSS_SMOOTHING = 0.1
LEVEL_WINDOW = 1.4


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



class RunError(RuntimeError):
    """A run cannot start: bad configuration, locked or mismatching run directory, missing data."""


class RunLockedError(RunError):
    """Another process holds the run directory."""


# --------------------------------------------------------------------------- #
# Configuration
# --------------------------------------------------------------------------- #
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


@dataclasses.dataclass
class RunConfig:
    """Every setting of a run (the flags of ``experiments/run.py``).

    Attributes:
        model: ``"fc6"`` or ``"c1"``.
        dataset: ``"fashion_mnist"``, ``"mnist"`` or ``"cifar10"``.
        lr: the constant learning rate (> 0).
        batch_size: examples per optimizer step; a multiple of ``ghost_batch_size``.
        ghost_batch_size: examples per micro-batch (what BatchNorm normalizes).
        epochs: the number of epochs (the cap when ``target_train_loss`` is set).
        seed: weights' initialization and the epochs' shuffling; 0 to ``2**32 - 1`` (NumPy's and Keras' seeds).
        optimizer: ``"sgd"`` (momentum 0.9) or ``"adam"``.
        loss: ``"ce"``, or an alternative loss to train on: ``gcdf@SIGMA``, ``tce@T``, ``hinge@GAMMA``.
        train_subset: a class-balanced subset of the training set of this size (None: all): at least one batch
            and one example per class, at most the largest class-balanced subset of the dataset's standard
            training set (:data:`TRAIN_CLASS_COUNTS`; 60000 for Fashion-MNIST, 54215 for MNIST, 50000 for CIFAR-10).
        track_every: also track every this many optimizer steps.
        track_schedule: ``"epoch"`` or ``"log"`` (dense log-spaced points over the first two epochs).
        track_levels: training losses near which the ``track_every`` points are taken (only while the running
            training loss is within a factor :data:`LEVEL_WINDOW` of one of them; every epoch elsewhere), e.g.
            ``(1, 0.5, 0.3, 0.15, 0.08, 0.04)``, the ladder's levels; None: every ``track_every`` steps.
        target_train_loss: stop once the tracked training cross-entropy is below this.
        data_dir: an existing directory with the dataset's files, or a tensorflow-datasets data directory (see
            :func:`keras_implicit.data.load_dataset`); None: the system directories, then tensorflow-datasets.
        deterministic: ``tf.config.experimental.enable_op_determinism()`` (bit-exact resume).
        strategy: ``"default"`` (one device), ``"mirrored"`` or ``"multiworker"`` (TensorFlow only; see the
            module docstring). How the run is spread, not what it is: a run may resume under another strategy.
        cpu_replicas: with ``"mirrored"`` on a machine without GPUs, split the CPU into this many devices.
        noisy_error_draws: 0 (off), or the Monte Carlo draws per example with which every tracking point also
            measures the noisy error, the noisy CE and eq. 9 for each sigma of the Gcdf grid
            (:mod:`keras_implicit.sharpness`; the draws' seed is ``seed``).
        moving_statistics: how a batch of several micro-batches updates BatchNorm's moving statistics:
            ``"sequential"`` (one update per micro-batch, in order: the paper's sequence of mini-batches) or
            ``"mean"`` (one update per step with the micro-batches' mean moments, as tf.keras 2's
            ``virtual_batch_size``; how run directories written before this setting existed were trained). See
            :mod:`keras_implicit.ghost`. With one micro-batch per step (``batch_size == ghost_batch_size``) the two
            are the same run.

    ``epochs`` and ``target_train_loss`` may change when a run is resumed (``EXTENDABLE``, see the module
    docstring); every other setting but ``strategy`` and ``cpu_replicas`` defines the run.
    """

    model: str = "fc6"
    dataset: str = "fashion_mnist"
    lr: float = 0.1
    batch_size: int = 256
    ghost_batch_size: int = 256
    epochs: int = 10
    seed: int = 0
    optimizer: str = "sgd"
    loss: str = "ce"
    train_subset: Optional[int] = None
    track_every: Optional[int] = None
    track_schedule: str = "epoch"
    track_levels: Optional[tuple] = None
    target_train_loss: Optional[float] = None
    data_dir: Optional[str] = None
    deterministic: bool = False
    strategy: str = "default"
    cpu_replicas: Optional[int] = None
    noisy_error_draws: int = 0
    moving_statistics: str = "sequential"

    def validate(self) -> "RunConfig":
        """Raises ValueError with a clear message on any bad setting; returns self. Imports no TensorFlow."""
        if self.model not in MODELS:
            raise ValueError(f"unknown model {self.model!r}: choose one of {', '.join(MODELS)}")
        if self.dataset not in DATASETS:
            raise ValueError(f"unknown dataset {self.dataset!r}: choose one of {', '.join(DATASETS)}")
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"unknown optimizer {self.optimizer!r}: choose one of {', '.join(OPTIMIZERS)}")
        parse_loss(self.loss)
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
        self._validate_strategy()
        return self

    def _validate_size(self):
        """batch_size and train_subset against the dataset's standard training set (no data is loaded)."""
        from keras_implicit.data import balanced_subset_range  # NumPy only

        counts = TRAIN_CLASS_COUNTS[self.dataset]
        total, classes = sum(counts), len(counts)
        if self.batch_size > total:
            raise ValueError(f"batch_size {self.batch_size} is larger than {self.dataset}'s training set ({total} "
                             "examples): an epoch would have no step")
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
            if self.strategy != "mirrored":
                raise ValueError("cpu_replicas splits this machine's CPU for strategy 'mirrored' only")
            if os.path.isdir("/proc/driver/nvidia/gpus") and os.listdir("/proc/driver/nvidia/gpus"):
                raise ValueError("cpu_replicas is for machines without a GPU; this one has NVIDIA GPUs: leave it "
                                 "out and strategy 'mirrored' uses every GPU")
        if self.strategy == "multiworker" and not os.environ.get("TF_CONFIG"):
            raise ValueError("strategy 'multiworker' needs TF_CONFIG (the cluster and this worker's task) in the "
                             "environment of every worker")
        # The replicas known before TensorFlow starts (GPUs are counted once it has: train() checks again).
        replicas = self.cpu_replicas or (_cluster_role()[0] if self.strategy == "multiworker" else 1)
        _check_divides(self.batch_size, self.ghost_batch_size, replicas)

    def flags(self) -> dict:
        return dataclasses.asdict(self)


def default_run_name(config: RunConfig) -> str:
    """A directory name from the settings that differ between the paper's runs:
    ``<dataset>-<model>-<loss>-<optimizer>-lr<lr>-b<batch>[-g<ghost>][-n<subset>][-bnmean]-s<seed>`` (the loss
    without its ``@``; ``-g`` when the ghost batch size is not the default 256, ``-n`` with ``train_subset``,
    ``-bnmean`` with ``moving_statistics="mean"`` on batches of several micro-batches), e.g.
    ``fashion_mnist-fc6-ce-sgd-lr0.1-b256-s0``. ``run.py`` and ``sweep.py`` both name runs with it."""
    parts = [config.dataset, config.model, config.loss, config.optimizer, f"lr{config.lr:g}", f"b{config.batch_size}"]
    if config.ghost_batch_size != RunConfig.ghost_batch_size:
        parts.append(f"g{config.ghost_batch_size}")
    if config.train_subset is not None:
        parts.append(f"n{config.train_subset}")
    if effective_moving_statistics(config.flags()) == "mean":
        parts.append("bnmean")
    parts.append(f"s{config.seed}")
    return "-".join(parts).replace("@", "")


# --------------------------------------------------------------------------- #
# Pieces of the protocol
# --------------------------------------------------------------------------- #
def make_loss(loss: str):
    """The Keras loss for a ``--loss`` value (all from logits)."""
    import keras

    from keras_implicit import losses

    family, parameter = parse_loss(loss)
    if family == "ce":
        return keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    if family == "gcdf":
        return losses.Gcdf(sigma=parameter)
    if family == "tce":
        return losses.TemperedCrossentropy(temperature=parameter)
    return losses.MulticlassHinge(margin=parameter)


def make_optimizer(name: str, lr: float):
    """SGD with momentum 0.9 (or Adam), constant ``lr``, no weight decay. Ghost batches are the model's
    business (:class:`~keras_implicit.ghost.GhostBatchModel`), not the optimizer's."""
    import keras

    if name not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {name!r}: choose one of {', '.join(OPTIMIZERS)}")
    if name == "sgd":
        return keras.optimizers.SGD(learning_rate=lr, momentum=MOMENTUM)
    return keras.optimizers.Adam(learning_rate=lr)


def epoch_order(num_examples: int, batch_size: int, seed: int, epoch: int) -> np.ndarray:
    """The example indices of one epoch: a permutation seeded by ``(seed, epoch)``, cut to whole batches."""
    steps = num_examples // batch_size
    permutation = np.random.default_rng([int(seed), int(epoch)]).permutation(num_examples)
    return permutation[: steps * batch_size]


def epoch_batches(x, y, batch_size: int, seed: int, epoch: int, skip_steps: int = 0):
    """The batches of one epoch (see :func:`epoch_order`), for ``model.fit``: a ``tf.data.Dataset`` on
    TensorFlow, a ``keras.utils.PyDataset`` on the other backends (``keras_implicit._backend.batches``).

    ``x`` and ``y`` come from ``keras_implicit._backend.training_arrays`` (converted once); batches are
    gathered from them. ``skip_steps`` leaves out the epoch's first large batches (continuing a run stopped
    inside an epoch by its target loss).
    """
    from keras_implicit import _backend

    order = epoch_order(int(x.shape[0]), batch_size, seed, epoch)[int(skip_steps) * batch_size:]
    return _backend.batches(x, y, order, batch_size)


def library_versions() -> dict:
    """Python, Keras, the backend (``"backend"``) and its packages' versions, NumPy and this package."""
    import keras

    import keras_implicit
    from keras_implicit import _backend

    return {
        "python": platform.python_version(),
        "keras": keras.__version__,
        **_backend.versions(),
        "numpy": np.__version__,
        "keras_implicit": keras_implicit.__version__,
    }


def git_commit(directory: Optional[str] = None) -> Optional[str]:
    """The checkout's commit (``+dirty`` when it has uncommitted changes), or None outside git."""
    directory = directory or os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=directory, capture_output=True, text=True,
                                timeout=10)
        if commit.returncode != 0:
            return None
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=directory,
                               capture_output=True, text=True, timeout=10)
        return commit.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return None


# --------------------------------------------------------------------------- #
# The run directory
# --------------------------------------------------------------------------- #
def _write_synced(path: str, data: bytes):
    with open(path, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())


def _fsync(path: str):
    """Flushes a file or a directory (its entries: renames) to disk; a no-op where that is not possible."""
    try:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        pass


def _listed(names, most: int = 5) -> str:
    names = list(names)
    shown = ", ".join(names[:most])
    return shown + (f" and {len(names) - most} more" if len(names) > most else "")


def _atomic_write(path: str, data: bytes):
    tmp = f"{path}.tmp"
    _write_synced(tmp, data)
    os.replace(tmp, path)
    _fsync(os.path.dirname(os.path.abspath(path)))


class _UnreadableFile(RunError):
    """A file of a run directory that cannot be parsed: truncated, overwritten, or not what it should hold.

    ``problem`` is the one-line diagnosis (``<path> is unreadable (<reason>)``); the message adds what to do.
    """

    def __init__(self, path: str, reason: str):
        self.path, self.reason = path, reason
        self.problem = f"{path} is unreadable ({reason})"
        super().__init__(f"{self.problem}: restore it or rerun with overwrite=True to start again")


def _problem(error: BaseException) -> str:
    """What a parser tripped on, in a few words."""
    if isinstance(error, json.JSONDecodeError):
        return f"JSON error at line {error.lineno} column {error.colno}: {error.msg}"
    if isinstance(error, UnicodeDecodeError):
        return f"not UTF-8 text at byte {error.start}"
    return f"{type(error).__name__}: {error}"


def _read_checkpoint(path: str) -> tuple[dict, dict]:
    """(meta, arrays) of a checkpoint file, read whole (so a damaged member is found now, not half-way
    through restoring); :class:`_UnreadableFile` for anything that is not a complete checkpoint."""
    try:
        with open(path, "rb") as handle:
            if handle.read(4) != b"PK\x03\x04":  # np.savez writes a zip archive; np.load would try pickle
                raise _UnreadableFile(path, "not a checkpoint: it does not start as an .npz (zip) archive")
        with np.load(path, allow_pickle=False) as content:
            arrays = {key: content[key] for key in content.files}
        if "meta" not in arrays:
            raise _UnreadableFile(path, "not a checkpoint: it holds no meta")
        meta = json.loads(bytes(arrays.pop("meta")).decode("utf-8"))
        if not isinstance(meta, dict):
            raise _UnreadableFile(path, "its meta is not a JSON object")
    except _UnreadableFile:
        raise
    except Exception as error:  # noqa: BLE001 - whatever the parser trips on, the file is damaged
        raise _UnreadableFile(path, _problem(error)) from None
    return meta, arrays


def _warn(text: str):
    """One line on stderr: a damaged file of a run directory was worked around and the run goes on."""
    sys.stderr.write(f"warning: {text}\n")
    sys.stderr.flush()


class RunDirectory:
    """One run's directory: lock, config, status, metrics and checkpoint.

    Use it as a context manager (``with RunDirectory(path) as run: ...``): entering takes an exclusive
    ``fcntl.flock`` on ``path/.lock`` (released on exit, and by the system if the process dies);
    a second process gets :class:`RunLockedError`.

    A file that cannot be parsed raises a :class:`RunError` naming it and saying what to do; the
    checkpoint it replaces is kept as ``checkpoint.prev.npz``, the fallback when ``checkpoint.npz`` is
    missing or damaged (:meth:`restore_checkpoint`).
    """

    CONFIG, STATUS, METRICS, CHECKPOINT, TENSORBOARD, LOCK = (
        "config.json", "status.json", "metrics.jsonl", "checkpoint.npz", "tb", ".lock")
    PREVIOUS_CHECKPOINT = "checkpoint.prev.npz"

    def __init__(self, path):
        self.path = os.fspath(path)
        self._lock_handle = None
        # Set when restore_checkpoint fell back on the previous checkpoint: the next save then replaces the
        # damaged latest instead of rotating it over the good previous one.
        self._latest_checkpoint_damaged = False

    def file(self, name: str) -> str:
        return os.path.join(self.path, name)

    @property
    def metrics_path(self):
        return self.file(self.METRICS)

    @property
    def tensorboard_dir(self):
        return self.file(self.TENSORBOARD)

    # locking
    def __enter__(self):
        self.lock()
        return self

    def __exit__(self, *exc):
        self.unlock()

    def lock(self):
        os.makedirs(self.path, exist_ok=True)
        handle = open(self.file(self.LOCK), "a+")
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as error:
            handle.close()
            if error.errno in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                raise RunLockedError(
                    f"{self.path} is in use by another process (it holds {self.file(self.LOCK)})") from None
            raise
        handle.seek(0)
        handle.truncate()
        handle.write(f"{os.getpid()}\n")
        handle.flush()
        self._lock_handle = handle

    def unlock(self):
        if self._lock_handle is not None:
            fcntl.flock(self._lock_handle.fileno(), fcntl.LOCK_UN)
            self._lock_handle.close()
            self._lock_handle = None

    # files
    def read_json(self, name):
        """The JSON object in ``name``; None if the file is missing; a :class:`RunError` naming it (and
        what to do) if it is not a JSON object (truncated, overwritten)."""
        path = self.file(name)
        try:
            with open(path, "rb") as handle:
                raw = handle.read()
        except FileNotFoundError:
            return None
        try:
            content = json.loads(raw.decode("utf-8"))
        except ValueError as error:  # JSONDecodeError, UnicodeDecodeError
            raise _UnreadableFile(path, _problem(error)) from None
        if not isinstance(content, dict):
            raise _UnreadableFile(path, f"a JSON {type(content).__name__}, not an object")
        return content

    def write_json(self, name, content):
        _atomic_write(self.file(name), (json.dumps(content, indent=2) + "\n").encode())

    def config(self):
        return self.read_json(self.CONFIG)

    def status(self):
        return self.read_json(self.STATUS)

    def write_status(self, state, epoch, step, message=None):
        status = {"state": state, "epoch": int(epoch), "step": int(step)}
        if message:
            status["message"] = message
        self.write_json(self.STATUS, status)

    def contents(self):
        return sorted(n for n in os.listdir(self.path) if n != self.LOCK) if os.path.isdir(self.path) else []

    def format_names(self) -> tuple:
        """The names this format writes into a run directory (a ``.tmp`` beside a file is an atomic write that
        a crash interrupted)."""
        return (self.CONFIG, self.STATUS, self.METRICS, self.CHECKPOINT, self.PREVIOUS_CHECKPOINT,
                self.TENSORBOARD, self.LOCK)

    def foreign_contents(self) -> list:
        """What the directory holds that the run-directory format never writes: nothing a run may delete."""
        owned = set(self.format_names())
        owned |= {f"{name}.tmp" for name in owned}
        foreign = []
        for name in self.contents():
            target = self.file(name)
            if name not in owned or (name == self.TENSORBOARD and (os.path.islink(target)
                                                                  or not os.path.isdir(target))):
                foreign.append(name + ("/" if os.path.isdir(target) and not os.path.islink(target) else ""))
        return foreign

    def discard(self):
        """Removes the lock file and the directory, which must hold nothing else (a run that could not start in
        a directory it created); the lock stays held until :meth:`unlock`."""
        try:
            os.remove(self.file(self.LOCK))
            os.rmdir(self.path)
        except OSError:  # something else appeared in it meanwhile: leave it
            pass

    def clear(self):
        """Removes the run's files but the lock (``overwrite=True``). A :class:`RunError` naming them, with
        nothing removed, if the directory holds anything the run-directory format does not write (a slip such as
        ``run_dir="."`` must not empty a working or home directory)."""
        foreign = self.foreign_contents()
        if foreign:
            raise RunError(f"{self.path} holds files that are not a run's ({_listed(foreign)}): nothing was "
                           "removed; use another run_dir")
        for name in self.contents():
            target = self.file(name)
            if os.path.isdir(target) and not os.path.islink(target):
                shutil.rmtree(target)
            else:
                os.remove(target)

    def read_metrics(self):
        """The records of ``metrics.jsonl`` (a list of dicts); a :class:`RunError` naming a line that is not
        a JSON object (call it after :meth:`truncate_metrics`, which cuts a torn last line away)."""
        if not os.path.exists(self.metrics_path):
            return []
        records = []
        with open(self.metrics_path, "rb") as handle:
            for number, line in enumerate(handle, start=1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except ValueError as error:
                    raise _UnreadableFile(f"{self.metrics_path}:{number}", _problem(error)) from None
                if not isinstance(record, dict):
                    raise _UnreadableFile(f"{self.metrics_path}:{number}", "not a JSON object")
                records.append(record)
        return records

    def truncate_metrics(self, size: int):
        """Cuts ``metrics.jsonl`` back to ``size`` bytes (a checkpoint's ``metrics_bytes``): what was written
        after the checkpoint, a torn last line included, goes. A :class:`RunError` if it holds fewer bytes
        (records the checkpoint counted were lost)."""
        held = self.metrics_size()
        if held < size:
            raise RunError(
                f"{self.metrics_path} holds {held} bytes, fewer than the {size} its checkpoint counted: tracking "
                "points were lost; restore it or rerun with overwrite=True to start again")
        if os.path.exists(self.metrics_path):
            with open(self.metrics_path, "r+b") as handle:
                handle.truncate(size)
                handle.flush()
                os.fsync(handle.fileno())

    def metrics_size(self) -> int:
        return os.path.getsize(self.metrics_path) if os.path.exists(self.metrics_path) else 0

    # checkpoints
    def save_checkpoint(self, model, optimizer, meta: dict):
        """Weights, optimizer variables and ``meta`` in one file, written atomically (a temporary file,
        fsync'd, renamed). The checkpoint it replaces becomes ``checkpoint.prev.npz`` (by rename, so both
        are always whole files) and ``metrics.jsonl`` is fsync'd first: the records a checkpoint counts are
        on disk before it."""
        arrays = {f"model_{i}": np.asarray(v) for i, v in enumerate(model.weights)}
        arrays.update({f"optimizer_{i}": np.asarray(v) for i, v in enumerate(optimizer.variables)})
        arrays["meta"] = np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8)
        buffer = io.BytesIO()
        np.savez(buffer, **arrays)
        if os.path.exists(self.metrics_path):
            _fsync(self.metrics_path)
        latest = self.file(self.CHECKPOINT)
        _write_synced(f"{latest}.tmp", buffer.getvalue())
        if os.path.exists(latest) and not self._latest_checkpoint_damaged:
            os.replace(latest, self.file(self.PREVIOUS_CHECKPOINT))
        os.replace(f"{latest}.tmp", latest)
        _fsync(os.path.abspath(self.path))
        self._latest_checkpoint_damaged = False

    def load_checkpoint(self, model=None, optimizer=None, name: Optional[str] = None) -> Optional[dict]:
        """Restores weights and optimizer state (both must be built) from ``name`` (default
        ``checkpoint.npz``); returns the meta dict, or None if there is no such file.

        Raises:
            RunError: the file is damaged (nothing is restored then), or holds other variables than the
                model's or optimizer's (another model: a different count or shape).
        """
        path = self.file(name or self.CHECKPOINT)
        if not os.path.exists(path):
            return None
        meta, content = _read_checkpoint(path)
        assignments = []
        for prefix, variables in (("model", model.weights if model is not None else None),
                                  ("optimizer", optimizer.variables if optimizer is not None else None)):
            if variables is None:
                continue
            stored = sorted((k for k in content if k.startswith(prefix + "_") and k[len(prefix) + 1:].isdigit()),
                            key=lambda k: int(k[len(prefix) + 1:]))
            if len(stored) != len(variables):
                raise RunError(f"{path}: holds {len(stored)} {prefix} variables, the {prefix} has {len(variables)}")
            for key, variable in zip(stored, variables):
                value = content[key]
                if tuple(value.shape) != tuple(variable.shape):
                    raise RunError(
                        f"{path}: {key} has shape {value.shape}, {variable.path} {tuple(variable.shape)}")
                assignments.append((variable, value))
        for variable, value in assignments:
            variable.assign(value)
        return meta

    def restore_checkpoint(self, model, optimizer, required=("epoch", "step", "metrics_bytes")) -> Optional[dict]:
        """Restores the newest readable checkpoint: ``checkpoint.npz``, or ``checkpoint.prev.npz`` (one
        epoch older) with a warning on stderr when the latest is missing or damaged.

        A checkpoint whose meta lacks an integer in one of ``required`` counts as damaged.

        Returns:
            Its meta dict, or None when there is neither file (a fresh run).

        Raises:
            RunError: no checkpoint can be read (one clear line naming both files: rerun with
                ``overwrite=True``), or one holds another model's variables.
        """
        latest, previous = self.file(self.CHECKPOINT), self.file(self.PREVIOUS_CHECKPOINT)

        def load(name):
            meta = self.load_checkpoint(model, optimizer, name)
            missing = [k for k in required if meta is not None and not isinstance(meta.get(k), int)]
            if missing:
                raise _UnreadableFile(self.file(name), f"its meta has no {', '.join(missing)}")
            return meta

        try:
            meta = load(self.CHECKPOINT)
            if meta is not None:
                return meta
            latest_problem = "missing"
        except _UnreadableFile as error:
            latest_problem = error.reason
        try:
            meta = load(self.PREVIOUS_CHECKPOINT)
        except _UnreadableFile as error:
            raise RunError(
                f"{self.path}: no checkpoint can be read ({self.CHECKPOINT}: {latest_problem}; "
                f"{self.PREVIOUS_CHECKPOINT}: {error.reason}): rerun with overwrite=True to start again") from None
        if meta is None:
            if latest_problem == "missing":
                return None
            raise RunError(f"{latest} is unreadable ({latest_problem}) and there is no {self.PREVIOUS_CHECKPOINT} "
                           "to fall back on: rerun with overwrite=True to start again")
        self._latest_checkpoint_damaged = latest_problem != "missing"
        _warn(f"{latest} is " + ("missing" if latest_problem == "missing" else f"unreadable ({latest_problem})")
              + f": resuming from {previous} (epoch {meta['epoch']}, step {meta['step']}); the epoch after it is "
              "trained again")
        return meta

    def config_from_checkpoint(self) -> tuple[Optional[dict], Optional[str]]:
        """(the copy of ``config.json`` in the newest readable checkpoint, that checkpoint's path), or
        (None, None) when no checkpoint holds one (checkpoints written before copies were kept hold none)."""
        for name in (self.CHECKPOINT, self.PREVIOUS_CHECKPOINT):
            path = self.file(name)
            if not os.path.exists(path):
                continue
            try:
                meta, _ = _read_checkpoint(path)
            except _UnreadableFile:
                continue
            if isinstance(meta.get("config"), dict):
                return meta["config"], path
        return None, None

    # TensorBoard
    def tensorboard_sizes(self) -> dict:
        """``{path relative to tb/: size in bytes}`` of the files under ``tb/`` (kept in a checkpoint's meta)."""
        sizes = {}
        for root, _, names in os.walk(self.tensorboard_dir):
            for name in names:
                path = os.path.join(root, name)
                sizes[os.path.relpath(path, self.tensorboard_dir)] = os.path.getsize(path)
        return sizes

    def truncate_tensorboard(self, sizes: dict):
        """Cuts the event files under ``tb/`` back to ``sizes`` (:meth:`tensorboard_sizes` at a checkpoint) and
        removes the event files started after it, so that a run resumed from that checkpoint writes no point
        twice (an event file is a sequence of records: a prefix is a valid file)."""
        for relative, size in self.tensorboard_sizes().items():
            path = os.path.join(self.tensorboard_dir, relative)
            if relative in sizes:
                if size > sizes[relative]:
                    with open(path, "r+b") as handle:
                        handle.truncate(sizes[relative])
            elif os.path.basename(relative).startswith("events.out.tfevents"):
                os.remove(path)


# --------------------------------------------------------------------------- #
# Training
# --------------------------------------------------------------------------- #
@dataclasses.dataclass
class TrainResult:
    """What :func:`train` did: ``state`` is "finished", "diverged" or "already-finished"."""

    state: str
    epoch: int
    step: int
    message: str = ""
    records: list = dataclasses.field(default_factory=list)
    epoch_seconds: list = dataclasses.field(default_factory=list)
    tracking_seconds: list = dataclasses.field(default_factory=list)


def _print(stream, text):
    if stream is not None:
        stream.write(text + "\n")
        stream.flush()


def _epoch_text(step: int, steps_per_epoch: int) -> str:
    """The epochs done at an optimizer step: ``"3"`` at an epoch's end, ``"0.77"`` inside one (a run stopped by its
    target between two epochs' ends)."""
    whole, rest = divmod(int(step), int(steps_per_epoch))
    if not rest:
        return str(whole)
    text = f"{step / steps_per_epoch:.2f}"
    return text if not text.endswith(".00") else f"{step / steps_per_epoch:.6f}".rstrip("0")


def _summary_line(epoch: str, epochs, step, tracker, train_seconds, tracking_seconds):
    parts = [f"epoch {epoch}/{epochs}", f"step {step}"]
    for split in ("train", "test"):
        record = tracker.last.get(split)
        if record is not None and record["step"] == step:
            parts.append(f"{split} ce {record['ce']:.4f} error {100 * record['error']:.2f}%")
    parts.append(f"{train_seconds:.1f}s train + {tracking_seconds:.1f}s tracking")
    return " | ".join(parts)


def _check_settings(config: RunConfig) -> None:
    """``config.validate()``, and a tf.distribute strategy only on the TensorFlow backend (imports Keras then)."""
    config.validate()
    if config.strategy != "default":
        import keras

        if keras.backend.backend() != "tensorflow":
            raise ValueError(f"strategy {config.strategy!r} is tf.distribute: it needs the tensorflow backend, "
                             f"this process runs Keras on {keras.backend.backend()}")


def train(config: RunConfig, run_dir, overwrite: bool = False, progress: bool = True, verbose: bool = True,
          stream=None, dataset=None, tracking_batch_size: Optional[int] = None) -> TrainResult:
    """Runs (or resumes) one training run into ``run_dir``; see the module docstring.

    Args:
        config: the :class:`RunConfig` (validated first: bad settings raise ValueError before any work).
            With ``strategy="mirrored"`` or ``"multiworker"``, call ``train`` before any other TensorFlow work
            in the process (the strategy is set up first: logical CPU devices, the multi-worker runtime).
        run_dir: the run directory (created if needed). On several workers only the chief writes it.
        overwrite: start again in a directory that holds another configuration (or any finished run).
        progress: draw a progress bar per epoch (on a terminal only).
        verbose: print one summary line per epoch.
        stream: where the summary lines go (default ``sys.stdout``).
        dataset: an already loaded :class:`keras_implicit.data.Dataset` matching the config (tests,
            sweeps); None loads it.
        tracking_batch_size: examples per forward pass when tracking; None: 4096 for fc6, 1024 for c1
            (whose first convolution's output is 256 KiB per example).

    Returns:
        A :class:`TrainResult`.

    Raises:
        ValueError: bad configuration. RunError: the directory is locked or holds another run (or fewer
        ``epochs`` than it has trained), the data is unavailable or cannot give ``train_subset``.
        WorkerLostError (a RunError): another worker of a multi-worker run stopped.
    """
    _check_settings(config)
    stream = (stream or sys.stdout) if verbose else None
    if tracking_batch_size is None:
        tracking_batch_size = TRACKING_BATCH_SIZES.get(config.model, 1024)
    session = _Training(config, stream, progress, dataset, tracking_batch_size)
    if not session.chief:
        return session.run(None, overwrite)
    created = not os.path.exists(run_dir)
    with RunDirectory(run_dir) as run:
        try:
            return session.run(run, overwrite)
        except BaseException:
            if created and not run.contents():  # refused before writing anything: leave no empty directory
                run.discard()
            raise


class WorkerLostError(RunError):
    """Another worker of a multi-worker run stopped (or cannot be reached): this one stopped too."""


# The exit codes of a training process (experiments/run.py, keras_implicit.sweep's runs).
EXIT_FINISHED, EXIT_CANNOT_START, EXIT_BAD_SETTINGS, EXIT_DIVERGED, EXIT_WORKER_LOST = 0, 1, 2, 3, 4
EXIT_INTERRUPTED = 130


def train_with_exit_code(config: RunConfig, run_dir, overwrite: bool = False, progress: bool = True,
                         wording=None, stdout=None, stderr=None) -> int:
    """:func:`train` as a process runs it: its outcome as one line and an exit code, never a traceback for what
    a user can fix.

    Args:
        config, run_dir, overwrite, progress: as for :func:`train`.
        wording: rewrites the library's messages for the caller's users (``experiments/run.py`` turns setting
            names into its flags); None leaves them as they are.
        stdout, stderr: where the lines go (default ``sys.stdout``, ``sys.stderr``).

    Returns:
        ``EXIT_FINISHED`` (0): finished, or already finished; ``EXIT_CANNOT_START`` (1): a :class:`RunError` (a
        locked directory, another configuration, ``epochs`` below what the run has trained, missing data);
        ``EXIT_BAD_SETTINGS`` (2): a bad setting (checked before anything is loaded); ``EXIT_DIVERGED`` (3):
        diverged, now or before; ``EXIT_WORKER_LOST`` (4): another worker of a multi-worker run stopped;
        ``EXIT_INTERRUPTED`` (130): KeyboardInterrupt (Ctrl-C, SIGINT), after the last completed epoch's
        checkpoint.
    """
    stdout, stderr = stdout or sys.stdout, stderr or sys.stderr
    wording = wording or (lambda text: text)
    out = os.fspath(run_dir)

    def say(text, stream):
        print(text, file=stream, flush=True)

    try:
        _check_settings(config)  # here, so that a ValueError raised while training stays a traceback (a bug)
    except ValueError as error:
        say(f"error: {wording(str(error))}", stderr)
        return EXIT_BAD_SETTINGS
    try:
        with quiet_cuda_probe():  # TensorFlow's "no CUDA driver" lines on a CPU machine (keras_implicit._startup)
            import keras

            if keras.backend.backend() == "tensorflow":
                import tensorflow as tf

                tf.config.list_physical_devices()
        result = train(config, out, overwrite=overwrite, progress=progress, stream=stdout)
    except WorkerLostError as error:
        say(f"error: {wording(str(error))}", stderr)
        return EXIT_WORKER_LOST
    except RunError as error:
        say(f"error: {wording(str(error))}", stderr)
        return EXIT_CANNOT_START
    except KeyboardInterrupt:
        checkpoints = [os.path.join(out, name) for name in (RunDirectory.CHECKPOINT, RunDirectory.PREVIOUS_CHECKPOINT)]
        if any(os.path.isfile(path) for path in checkpoints):
            say(f"\ninterrupted: rerun the same command to resume {out} from its last completed epoch", stderr)
        else:
            say(f"\ninterrupted before {out} held a checkpoint: rerun the same command to start it", stderr)
        return EXIT_INTERRUPTED
    if result.state.startswith("already-"):
        say(result.message, stdout)
        return EXIT_DIVERGED if result.state == "already-diverged" else EXIT_FINISHED
    if result.state == "diverged":
        say(f"error: {out}: {result.message}", stderr)
        return EXIT_DIVERGED
    say(f"finished {out}: {result.message}" + ("" if f"step {result.step}" in result.message
                                               else f", step {result.step}"), stdout)
    return EXIT_FINISHED


# Settings added after runs were made: a config.json without them had the default.
_ADDED_LATER = {"noisy_error_draws": RunConfig.noisy_error_draws, "track_levels": RunConfig.track_levels}


def _data_directory(content: dict) -> Optional[str]:
    """The directory a ``data_dir`` setting reads: itself, or without it the dataset's system directory where this
    machine has one (``data.SYSTEM_DIRS``), resolved; None (tensorflow-datasets' default) otherwise. Leaving
    ``--data-dir`` out and naming that directory are one setting."""
    from keras_implicit import data as ki_data

    data_dir = content.get("data_dir")
    if not data_dir:
        data_dir = next(iter(ki_data.system_directories(content.get("dataset"))), None)
    return os.path.realpath(data_dir) if data_dir else None


def _comparable(content: dict) -> dict:
    comparable = {k: content.get(k, _ADDED_LATER.get(k)) for k in (*CONFIG_FLAGS, "sigmas", "temperatures", "margins")}
    # What a run's config.json lacks, or what cannot differ with one micro-batch per step, as analysis reads it.
    comparable["moving_statistics"] = effective_moving_statistics(content)
    comparable["data_dir"] = _data_directory(content)
    return comparable


def _differences(stored: dict, wanted: dict, keys=None) -> dict:
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
    try:
        with open(os.path.join(os.fspath(run_dir), RunDirectory.CONFIG), encoding="utf-8") as handle:
            stored = json.load(handle)
    except (OSError, ValueError):
        return None
    if not isinstance(stored, dict):
        return None
    return _differences(stored, config.flags(), CONFIG_FLAGS)  # the grids are the library's, not a setting


def _read_config(run: RunDirectory) -> Optional[dict]:
    """``config.json``; if it is damaged (or missing beside a checkpoint), the copy the newest readable
    checkpoint holds, written back with a warning. A damaged one without a copy is a RunError."""
    try:
        content = run.config()
        if content is not None:
            return content
        problem = f"{run.file(run.CONFIG)} is missing"
        damaged = None
    except _UnreadableFile as error:
        problem, damaged = error.problem, error
    copy, source = run.config_from_checkpoint()
    if copy is None:
        if damaged is not None:
            raise damaged  # "<path> is unreadable (<reason>): restore it or rerun with overwrite=True ..."
        return None
    _warn(f"{problem}: restored from the copy in {source}")
    run.write_json(run.CONFIG, copy)
    return copy


def _read_status(run: RunDirectory) -> dict:
    """``status.json``, or {} (state unknown: resume from the checkpoint) with a warning if it is damaged."""
    try:
        return run.status() or {}
    except _UnreadableFile as error:
        _warn(f"{error.problem}: it only summarizes the run; resuming from the checkpoint, which rewrites it")
        return {}


def _data_text(data: dict) -> str:
    return (f"{data.get('train_examples')} training and {data.get('test_examples')} test examples from "
            f"{data.get('source')}")


def _check_same_backend(run: RunDirectory, existing: dict) -> None:
    """A run continues on the Keras backend it started on (a resume is then the run it would have been)."""
    import keras

    started_on = (existing.get("versions") or {}).get("backend", "tensorflow")  # older runs: TensorFlow only
    if started_on != keras.backend.backend():
        raise RunError(f"{run.path} was trained on the {started_on} backend, this process runs Keras on "
                       f"{keras.backend.backend()}: resume it with KERAS_BACKEND={started_on}, or use another "
                       "run_dir")


def _grids() -> dict:
    from keras_implicit import metrics as ki_metrics

    return {"sigmas": list(ki_metrics.DEFAULT_SIGMAS), "temperatures": list(ki_metrics.DEFAULT_TEMPERATURES),
            "margins": list(ki_metrics.DEFAULT_MARGINS)}


# What the chief tells the other workers before training (broadcast_from_chief): one number each.
_PLAN_FIELDS = ("action", "resumed", "epoch", "step", "target_reached", "target_step")
_TRAIN, _ALREADY_FINISHED, _ALREADY_DIVERGED, _REFUSED = 0, 1, 2, 3


class _Training:
    """One call of :func:`train`, in the order it happens: :meth:`reconcile` the run directory with the
    config, :meth:`load_data`, :meth:`build` the model, :meth:`restore` the checkpoint, :meth:`make_tracker`,
    :meth:`train_epochs`, :meth:`finish`. On several workers only the chief has a run directory (``run``);
    the others get its decisions and restored weights through :meth:`share_plan`."""

    def __init__(self, config: RunConfig, stream, progress: bool, dataset, tracking_batch_size: int):
        self.config, self.stream, self.progress = config, stream, progress
        self.dataset, self.tracking_batch_size = dataset, tracking_batch_size
        self.strategy = None
        if config.strategy != "default":
            from keras_implicit import _distribute

            try:
                self.strategy = _distribute.make_strategy(config.strategy, config.cpu_replicas)
            except ValueError as error:
                raise RunError(str(error)) from None
        self.multiworker = config.strategy == "multiworker"
        self.chief = _cluster_role()[2] if self.multiworker else True
        self.run_dir: Optional[RunDirectory] = None
        self.existing: Optional[dict] = None
        self.changed: dict = {}  # EXTENDABLE settings asked to change: {key: (stored, asked)}
        self.target_step: Optional[int] = None
        self.stored_config: Optional[dict] = None

    # ------------------------------------------------------------------ #
    def run(self, run: Optional[RunDirectory], overwrite: bool) -> TrainResult:
        from keras_implicit import _distribute

        self.run_dir = run
        try:
            plan, refusal = self.reconcile(overwrite) if self.chief else (None, None)
            if not self.multiworker:  # one process: nobody else to tell
                if refusal is not None:
                    raise refusal
                if plan is not None:
                    return plan
            self.load_data()
            self.build()
            meta = None
            if self.chief and plan is None and refusal is None:
                try:
                    meta = self.restore()
                except RunError as error:
                    if not self.multiworker:
                        raise
                    refusal = error  # the other workers must hear of it before the chief stops
            action, meta = self.share_plan(plan, refusal, meta)
            if action != _TRAIN:
                if refusal is not None:
                    raise refusal
                if plan is not None:
                    return plan
                if action == _REFUSED:
                    raise RunError("the chief refused the run (its output says why); this worker stops too")
                state = "finished" if action == _ALREADY_FINISHED else "diverged"
                return TrainResult("already-" + state, meta["epoch"], meta["step"], "the chief's run is " + state)
            self.make_tracker(meta)
            result = self.train_epochs(meta)
            if not self.chief:
                result.message += f" (worker {_cluster_role()[1]}: the chief writes the run directory)"
            return result
        except _distribute.WorkerLostError as error:
            raise WorkerLostError(
                f"{error}; the run stopped. Rerun the same command on every worker to resume from the last "
                "checkpoint") from None

    # ------------------------------------------------------------------ #
    def reconcile(self, overwrite: bool):
        """(a TrainResult when there is nothing to do, None) or (None, a RunError refusing the run) or
        (None, None): compares the run directory with the config, clears it for ``overwrite``."""
        config, run = self.config, self.run_dir
        wanted = {**config.flags(), **_grids()}
        try:
            self.existing = None if overwrite else _read_config(run)
            if overwrite:
                run.clear()
                return None, None
            if self.existing is None:
                foreign = run.foreign_contents()
                if foreign:
                    raise RunError(f"{run.path} is not a run directory (it holds {_listed(foreign)}): use "
                                   "another run_dir")
                if run.contents():
                    raise RunError(f"{run.path} holds a run's files but no config.json ({_listed(run.contents())}); "
                                   "use overwrite=True to replace them or another run_dir")
                return None, None
            existing = self.existing
            changed = _differences(existing, wanted)
            if any(k not in EXTENDABLE for k in changed):
                differences = [f"{k}: {stored!r} there, {asked!r} asked" for k, (stored, asked) in changed.items()]
                raise RunError(f"{run.path} holds another run ({'; '.join(differences)}); use overwrite=True to "
                               "replace it or another run_dir")
            _check_same_backend(run, existing)
        except RunError as error:  # the other workers must hear of it before the chief stops
            return None, error
        status = _read_status(run)
        if changed and status.get("state") != "diverged":
            # Checked against the checkpoint and written by extend(), once the checkpoint is restored.
            self.changed = changed
        elif status.get("state") in ("finished", "diverged"):
            message = (f"{run.path}: run already {status['state']} at epoch {status.get('epoch')}, step "
                       f"{status.get('step')}; nothing to do"
                       + (f" ({status['message']})" if status.get("message") else ""))
            return TrainResult("already-" + status["state"], status.get("epoch", 0), status.get("step", 0),
                               message), None
        return None, None

    def load_data(self):
        from keras_implicit import _backend
        from keras_implicit import data as ki_data

        config = self.config
        if config.deterministic:
            _backend.enable_determinism()
        if self.dataset is None:
            try:
                self.dataset = ki_data.load_dataset(config.dataset, config.data_dir, config.train_subset)
            # Missing files, damaged ones, or (custom data_dir files) fewer examples than train_subset: one line.
            except (ki_data.DatasetUnavailableError, ValueError) as error:
                raise RunError(str(error)) from None
        n_train = len(self.dataset.y_train)
        self.steps_per_epoch = n_train // config.batch_size
        if self.steps_per_epoch < 1:
            raise RunError(f"the training set has {n_train} examples, fewer than one batch of {config.batch_size}")
        self.x_train, self.y_train = _backend.training_arrays(self.dataset.x_train, self.dataset.y_train)

    def data_provenance(self) -> dict:
        """What ``config.json`` records of the data read: where from (an absolute directory, or
        ``"tensorflow-datasets"``) and how many examples (after ``train_subset``)."""
        source = self.dataset.source
        if source != "tensorflow-datasets" and os.path.isdir(source):
            source = os.path.abspath(source)
        return {"source": source, "train_examples": int(len(self.dataset.y_train)),
                "test_examples": int(len(self.dataset.y_test))}

    def build(self):
        """The model (a :class:`~keras_implicit.ghost.GhostBatchModel`), its optimizer, compiled and built;
        under a strategy, inside its scope (the variables mirrored on every replica)."""
        import contextlib

        from keras_implicit import ghost
        from keras_implicit import models as ki_models

        config, dataset = self.config, self.dataset
        replicas = self.strategy.num_replicas_in_sync if self.strategy is not None else 1
        try:
            _check_divides(config.batch_size, config.ghost_batch_size, replicas)
        except ValueError as error:
            raise RunError(str(error)) from None
        with self.strategy.scope() if self.strategy is not None else contextlib.nullcontext():
            network = ki_models.make_model(config.model, dataset.input_shape, dataset.num_classes, seed=config.seed)
            self.model = ghost.ghost_batch_model(network, config.ghost_batch_size, config.moving_statistics)
            self.optimizer = make_optimizer(config.optimizer, config.lr)
            self.model.compile(optimizer=self.optimizer, loss=make_loss(config.loss))
            self.optimizer.build(self.model.trainable_variables)

    def restore(self) -> Optional[dict]:
        """The chief's checkpoint restored into the model and optimizer (None: a fresh run); writes
        ``config.json`` for a fresh run (or with the EXTENDABLE settings changed, :meth:`extend`) and cuts
        ``metrics.jsonl`` and TensorBoard back to the checkpoint. The meta gets ``target_reached`` and
        ``target_step``: whether and where the training CE first went below the target asked now (which may
        have changed) in the records up to the checkpoint."""
        run, config = self.run_dir, self.config
        data = self.data_provenance()
        if self.existing is None:
            run.write_json(run.CONFIG, {**config.flags(), **_grids(), "data": data, "versions": library_versions(),
                                        "git_commit": git_commit()})
        elif self.existing.get("data") not in (None, data):  # older runs recorded none
            _warn(f"{run.path} was started on {_data_text(self.existing['data'])}; this process loaded "
                  f"{_data_text(data)}: the run goes on with these data (config.json keeps the first)")
        meta = run.restore_checkpoint(self.model, self.optimizer)  # .prev, with a warning, if the latest is damaged
        changes = self.extend(meta) if self.changed else None  # may refuse: nothing is written before
        self.stored_config = run.config()  # each checkpoint keeps a copy: a damaged config.json is restored from it
        if meta is None:
            if changes:
                _print(self.stream, f"{run.path}: continuing with {changes}")
            run.truncate_metrics(0)
            return None
        # Cut what was written after the checkpoint (a torn last line too): it is tracked again.
        run.truncate_metrics(meta["metrics_bytes"])
        if isinstance(meta.get("tensorboard_bytes"), dict):  # checkpoints from before it was kept hold none
            run.truncate_tensorboard(meta["tensorboard_bytes"])
        # Against the target asked now: a run started with it would have stopped at the first training point below
        # it, so that point (not the checkpoint's) is where it was reached.
        target = config.target_train_loss
        below = [r for r in run.read_metrics()
                 if target is not None and r.get("split") == "train" and r["ce"] < target]
        meta["target_reached"] = bool(below)
        meta["target_step"] = int(below[0]["step"]) if below else None
        step, steps_per_epoch = int(meta["step"]), self.steps_per_epoch
        if meta["target_reached"] or step >= config.epochs * steps_per_epoch:
            # The new settings ask for nothing more (a target the records reached, or no more epochs than trained).
            done = (f"target train loss {target} reached at step {meta['target_step']}" if meta["target_reached"]
                    else f"all {config.epochs} epochs trained")
            _print(self.stream, f"{run.path}: " + (f"now with {changes}; " if changes else "")
                   + f"nothing left to train at epoch {_epoch_text(step, steps_per_epoch)} (step {step}): {done}")
            return meta
        if changes:
            _print(self.stream, f"{run.path}: continuing with {changes}")
        _print(self.stream, f"resuming {run.path} from epoch {_epoch_text(step, steps_per_epoch)} (step {step})")
        return meta

    def extend(self, meta: Optional[dict]) -> str:
        """Applies the changed EXTENDABLE settings (``self.changed``) to ``config.json``, as if the run had been
        started with them, and returns them as text (``"epochs 8 (was 4)"``); or raises a RunError (having written
        nothing) for ``epochs`` below what the checkpoint has trained: its records and weights cannot be cut
        back."""
        run, config, steps_per_epoch = self.run_dir, self.config, self.steps_per_epoch
        trained = int(meta["step"]) if meta is not None else 0
        if "epochs" in self.changed and config.epochs * steps_per_epoch < trained:
            raise RunError(
                f"{run.path} has trained {_epoch_text(trained, steps_per_epoch)} epochs (step {trained}), more than "
                f"the {config.epochs} asked: a run cannot be cut back to fewer epochs (its checkpoint and "
                f"metrics.jsonl hold every step trained); ask for epochs={math.ceil(trained / steps_per_epoch)} or "
                "more (the earlier epochs' points are in its metrics.jsonl), or use overwrite=True to start again "
                "or another run_dir")
        run.write_json(run.CONFIG, {**self.existing, **{k: asked for k, (_, asked) in self.changed.items()}})
        return ", ".join(f"{k} {asked} (was {stored})" for k, (stored, asked) in self.changed.items())

    def share_plan(self, plan: Optional[TrainResult], refusal: Optional[RunError], meta: Optional[dict]):
        """(action, meta): on several workers, the chief's decision and restored weights on every worker;
        with one process, what the chief decided."""
        from keras_implicit import _distribute

        if not self.multiworker:
            return _TRAIN, meta
        if plan is not None:
            action = _ALREADY_FINISHED if plan.state == "already-finished" else _ALREADY_DIVERGED
        else:
            action = _REFUSED if refusal is not None else _TRAIN
        numbers = {**dict.fromkeys(_PLAN_FIELDS, 0), "action": action}
        if plan is not None:
            numbers.update(epoch=plan.epoch, step=plan.step)
        if meta is not None:
            target_step = meta.get("target_step")
            numbers.update(resumed=1, epoch=meta["epoch"], step=meta["step"],
                           target_reached=int(meta["target_reached"]),
                           target_step=-1 if target_step is None else target_step)
        variables = [*self.model.weights, *self.optimizer.variables]
        arrays = [np.array([float(numbers[k]) for k in _PLAN_FIELDS])] + [np.asarray(v) for v in variables]
        shared = _distribute.broadcast_from_chief(self.strategy, arrays)
        received = dict(zip(_PLAN_FIELDS, (int(v) for v in shared[0])))
        if received["action"] == _TRAIN:
            for variable, value in zip(variables, shared[1:]):
                variable.assign(value)
            if received["resumed"]:
                meta = {**(meta or {}), "epoch": received["epoch"], "step": received["step"],
                        "target_reached": bool(received["target_reached"]),
                        "target_step": received["target_step"] if received["target_step"] >= 0 else None}
        else:
            meta = {"epoch": received["epoch"], "step": received["step"]}
        return received["action"], meta

    def make_tracker(self, meta: Optional[dict]):
        from keras_implicit import callbacks as ki_callbacks

        run, dataset = self.run_dir, self.dataset
        self.tracker = ki_callbacks.AltLossTracker(
            (self.x_train, self.y_train), (dataset.x_test, dataset.y_test),
            metrics_path=run.metrics_path if run is not None else None,
            log_dir=run.tensorboard_dir if run is not None else None,
            track_every=self.config.track_every, schedule=self.config.track_schedule,
            track_levels=self.config.track_levels, steps_per_epoch=self.steps_per_epoch,
            batch_size=self.tracking_batch_size,
            target_train_loss=self.config.target_train_loss, buffer_summaries=True,
            noisy_error_draws=self.config.noisy_error_draws, noise_seed=self.config.seed % 2 ** 32,
        )
        self.tracker.set_model(self.model)
        if meta is not None:
            self.tracker.mark_tracked(meta["step"])  # tracked before the checkpoint was written
        self.monitor = ki_callbacks.DivergenceMonitor()
        self.callbacks = [self.tracker, self.monitor]
        if self.progress and self.chief:
            self.callbacks.append(ki_callbacks.ProgressBar(self.config.epochs, stream=sys.stdout))

    # ------------------------------------------------------------------ #
    def checkpoint(self, epoch: int, step: int, target_reached: bool):
        self.tracker.flush_summaries()
        run = self.run_dir
        if run is None:
            return
        run.save_checkpoint(self.model, self.optimizer, {
            "epoch": epoch, "step": step, "target_reached": target_reached, "metrics_bytes": run.metrics_size(),
            "steps_per_epoch": self.steps_per_epoch, "tensorboard_bytes": run.tensorboard_sizes(),
            "config": self.stored_config})

    def write_status(self, state, epoch, step, message=None):
        if self.run_dir is not None:
            self.run_dir.write_status(state, epoch, step, message)

    def diverged(self, result: TrainResult, epoch: int, message: str) -> TrainResult:
        step_now = int(np.asarray(self.optimizer.iterations))
        self.tracker.flush_summaries()
        self.write_status("diverged", epoch, step_now, message)
        return dataclasses.replace(result, state="diverged", epoch=epoch, step=step_now, message=message,
                                   records=self.tracker.records)

    def fit_epoch(self, epoch: int, step: int):
        """One epoch (from ``step``, which may lie inside it after a target stop) with the callbacks."""
        from keras_implicit import _distribute

        config = self.config
        skip_steps = step - epoch * self.steps_per_epoch
        batches = epoch_batches(self.x_train, self.y_train, config.batch_size, config.seed, epoch, skip_steps)
        if self.strategy is None:
            self.model.fit(batches, initial_epoch=epoch, epochs=epoch + 1, verbose=0, callbacks=self.callbacks,
                           shuffle=False)
        else:
            _distribute.run_epoch(self.model, self.strategy, batches, self.callbacks, epoch,
                                  self.steps_per_epoch - skip_steps)

    def train_epochs(self, meta: Optional[dict]) -> TrainResult:
        config, tracker, steps_per_epoch = self.config, self.tracker, self.steps_per_epoch
        start_epoch, step = (meta["epoch"], meta["step"]) if meta is not None else (0, 0)
        target_reached = bool(meta["target_reached"]) if meta is not None else False
        # Where the records first went below the target, when they did before this call (else: where it stops).
        self.target_step = meta.get("target_step") if meta is not None else None
        result = TrainResult("finished", start_epoch, step)
        self.write_status("running", start_epoch, step)
        if meta is None:
            if int(np.asarray(self.optimizer.iterations)) != 0:
                raise RunError("internal error: a fresh run must start at step 0")
            tracker.track(0)
            if tracker.diverged:
                return self.diverged(result, 0, tracker.diverged)
            self.checkpoint(0, 0, tracker.target_reached)
            target_reached = tracker.target_reached
            _print(self.stream, _summary_line("0", config.epochs, 0, tracker, 0.0, tracker.tracking_seconds))

        epoch = start_epoch
        while epoch < config.epochs and not target_reached:
            tracking_before = tracker.tracking_seconds
            started = time.perf_counter()
            self.fit_epoch(epoch, step)
            elapsed = time.perf_counter() - started
            tracking = tracker.tracking_seconds - tracking_before
            step = int(np.asarray(self.optimizer.iterations))
            if self.monitor.diverged or tracker.diverged:
                message = self.monitor.diverged or tracker.diverged
                return self.diverged(result, epoch, f"diverged in epoch {epoch + 1}: {message}")
            target_reached = tracker.target_reached
            if step != (epoch + 1) * steps_per_epoch and not target_reached:
                raise RunError(f"epoch {epoch + 1} ended at step {step}, not {(epoch + 1) * steps_per_epoch}: "
                               "training was stopped by something else than divergence or the target loss")
            completed = epoch + 1 if step == (epoch + 1) * steps_per_epoch else epoch
            self.checkpoint(completed, step, target_reached)
            result.epoch_seconds.append(elapsed - tracking)
            result.tracking_seconds.append(tracking)
            _print(self.stream, _summary_line(_epoch_text(step, steps_per_epoch), config.epochs, step, tracker,
                                              elapsed - tracking, tracking))
            self.write_status("running", completed, step)
            epoch += 1
        return self.finish(result, step, target_reached)

    def finish(self, result: TrainResult, step: int, target_reached: bool) -> TrainResult:
        config, steps_per_epoch = self.config, self.steps_per_epoch
        epochs_done = int(step // steps_per_epoch)
        message = f"{epochs_done} epochs"
        if target_reached:
            reached = step if self.target_step is None else int(self.target_step)
            message = (f"target train loss {config.target_train_loss} reached at step {reached} "
                       f"(epoch {_epoch_text(reached, steps_per_epoch)})")
            if reached != step:  # already in the records when this target was asked for: the run went on
                message += (f"; the run goes on to step {step} (epoch {_epoch_text(step, steps_per_epoch)}), "
                            "trained before this target was asked for")
        self.write_status("finished", epochs_done, step, message)
        self.tracker.close()
        return dataclasses.replace(result, state="finished", epoch=epochs_done, step=step, message=message,
                                   records=self.tracker.records)
