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
- ``checkpoint.npz``: weights, optimizer state (momentum, iteration counter), epoch, step and the
  length of ``metrics.jsonl`` at that point; replaced atomically at each epoch end.

**Ghost batches** (the paper's section 4.2): a batch larger than ``ghost_batch_size`` is applied
as gradient accumulation over micro-batches of ``ghost_batch_size`` (Keras 3's optimizer argument
``gradient_accumulation_steps = batch_size // ghost_batch_size``): each BatchNormalization normalizes
(and updates its moving statistics with) its own micro-batch, and the optimizer takes one step per
large batch with the mean of the micro-batch gradients (equal to the gradient of the mean loss over
the large batch). ``optimizer.iterations`` then counts large-batch steps (Adam's bias correction too);
a learning-rate *schedule* would count micro-batches, which is why only constant rates are offered.

**An epoch** is ``steps_per_epoch = n_train // batch_size`` whole large batches: the training set is
shuffled with a generator seeded by ``(seed, epoch)`` and the ``n_train % batch_size`` examples left
over at the end of the permutation are not used in that epoch (different ones each epoch). No
accumulation window straddles two epochs and no partial micro-batch is ever weighted as a full one.

**Resume.** Rerunning the same command on a run directory continues from the last checkpoint (the
last completed epoch): ``metrics.jsonl`` is cut back to the checkpoint's length so no point is logged
twice, TensorBoard points are written only at checkpoints. A finished run is left alone; a different
configuration is refused unless ``overwrite``, except for ``epochs`` and ``target_train_loss``, which only
say when to stop: changing them continues the run from its checkpoint (``config.json`` then holds the new
values), as if it had been started with them. A second process on the same directory is refused
(``fcntl.flock``). With ``deterministic=True`` (``tf.config.experimental.enable_op_determinism``)
the resumed run's metrics equal an uninterrupted run's bit for bit (see the README's Experiments
section for what was measured).
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

from keras_implicit.analysis import parse_name

__all__ = [
    "OPTIMIZERS",
    "RunConfig",
    "RunError",
    "RunLockedError",
    "RunDirectory",
    "TrainResult",
    "parse_loss",
    "make_loss",
    "make_optimizer",
    "epoch_batches",
    "default_run_name",
    "train",
]

OPTIMIZERS = ("sgd", "adam")
LOSS_FAMILIES = ("gcdf", "tce", "hinge")
MOMENTUM = 0.9

# The config keys that define a run (compared when resuming); versions and git commit are not.
# Of those, EXTENDABLE only say when to stop: changing them continues the run from its checkpoint.
CONFIG_FLAGS = (
    "model", "dataset", "lr", "batch_size", "ghost_batch_size", "epochs", "seed", "optimizer", "loss",
    "train_subset", "track_every", "track_schedule", "target_train_loss", "data_dir", "deterministic",
)
EXTENDABLE = ("epochs", "target_train_loss")
# Examples per forward pass when tracking (inference only: large batches amortize the per-call cost).
TRACKING_BATCH_SIZES = {"fc6": 4096, "c1": 1024}


class RunError(RuntimeError):
    """A run cannot start: bad configuration, locked or mismatching run directory, missing data."""


class RunLockedError(RunError):
    """Another process holds the run directory."""


# --------------------------------------------------------------------------- #
# Configuration
# --------------------------------------------------------------------------- #
def parse_loss(loss: str):
    """``"ce"`` -> ("ce", None); ``"gcdf@0.5"`` -> ("gcdf", 0.5); also ``tce@T`` and ``hinge@G``."""
    if loss == "ce":
        return "ce", None
    family, parameter = parse_name(str(loss))
    if parameter is None or family not in LOSS_FAMILIES:
        raise ValueError(f"unknown loss {loss!r}: use ce, gcdf@SIGMA, tce@T or hinge@GAMMA (e.g. gcdf@0.5)")
    positive = family == "tce" or family == "gcdf"  # sigma = 0 has zero gradient: useless for training
    if not math.isfinite(parameter) or parameter < 0 or (positive and parameter == 0):
        raise ValueError(f"loss {loss!r}: the parameter must be finite and {'> 0' if positive else '>= 0'}")
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
        seed: weights' initialization and the epochs' shuffling.
        optimizer: ``"sgd"`` (momentum 0.9) or ``"adam"``.
        loss: ``"ce"``, or an alternative loss to train on: ``gcdf@SIGMA``, ``tce@T``, ``hinge@GAMMA``.
        train_subset: a class-balanced subset of the training set of this size (None: all).
        track_every: also track every this many optimizer steps.
        track_schedule: ``"epoch"`` or ``"log"`` (dense log-spaced points over the first two epochs).
        target_train_loss: stop once the tracked training cross-entropy is below this.
        data_dir: a directory with the dataset's files (see :func:`keras_implicit.data.load_dataset`).
        deterministic: ``tf.config.experimental.enable_op_determinism()`` (bit-exact resume).
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
    target_train_loss: Optional[float] = None
    data_dir: Optional[str] = None
    deterministic: bool = False

    def validate(self) -> "RunConfig":
        """Raises ValueError with a clear message on any bad setting; returns self."""
        from keras_implicit.callbacks import SCHEDULES
        from keras_implicit.data import DATASETS
        from keras_implicit.models import MODELS

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
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if self.batch_size % self.ghost_batch_size:
            raise ValueError(
                f"batch_size {self.batch_size} is not a multiple of ghost_batch_size {self.ghost_batch_size}: "
                "a large batch is applied as whole micro-batches of the ghost size"
            )
        if self.train_subset is not None and (not isinstance(self.train_subset, int) or self.train_subset < 1):
            raise ValueError(f"train_subset must be a positive integer, got {self.train_subset!r}")
        if self.train_subset is not None and self.train_subset < self.batch_size:
            raise ValueError(
                f"train_subset {self.train_subset} is smaller than one batch ({self.batch_size}): an epoch would "
                "have no step"
            )
        if self.track_every is not None and (not isinstance(self.track_every, int) or self.track_every < 1):
            raise ValueError(f"track_every must be a positive number of steps, got {self.track_every!r}")
        if self.track_schedule not in SCHEDULES:
            raise ValueError(f"unknown tracking schedule {self.track_schedule!r}: choose one of {', '.join(SCHEDULES)}")
        if self.target_train_loss is not None and not (
            math.isfinite(self.target_train_loss) and self.target_train_loss > 0
        ):
            raise ValueError(f"target_train_loss must be a finite number > 0, got {self.target_train_loss}")
        return self

    @property
    def accumulation_steps(self) -> int:
        return self.batch_size // self.ghost_batch_size

    def flags(self) -> dict:
        return dataclasses.asdict(self)


def default_run_name(config: RunConfig) -> str:
    """A directory name from the settings that differ between the paper's runs, e.g.
    ``fashion_mnist-fc6-ce-sgd-lr0.1-b256-s0`` (plus ``-g<ghost>``, ``-n<subset>`` when not default)."""
    parts = [config.dataset, config.model, config.loss, config.optimizer, f"lr{config.lr:g}", f"b{config.batch_size}"]
    if config.ghost_batch_size != 256:
        parts.append(f"g{config.ghost_batch_size}")
    if config.train_subset is not None:
        parts.append(f"n{config.train_subset}")
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


def make_optimizer(name: str, lr: float, accumulation_steps: int = 1):
    """SGD with momentum 0.9 (or Adam), constant ``lr``, no weight decay; gradient accumulation over
    ``accumulation_steps`` micro-batches when > 1 (ghost batches)."""
    import keras

    if name not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {name!r}: choose one of {', '.join(OPTIMIZERS)}")
    accumulation = int(accumulation_steps) if accumulation_steps and accumulation_steps > 1 else None
    if name == "sgd":
        return keras.optimizers.SGD(learning_rate=lr, momentum=MOMENTUM, gradient_accumulation_steps=accumulation)
    return keras.optimizers.Adam(learning_rate=lr, gradient_accumulation_steps=accumulation)


def epoch_order(num_examples: int, batch_size: int, seed: int, epoch: int) -> np.ndarray:
    """The example indices of one epoch: a permutation seeded by ``(seed, epoch)``, cut to whole batches."""
    steps = num_examples // batch_size
    permutation = np.random.default_rng([int(seed), int(epoch)]).permutation(num_examples)
    return permutation[: steps * batch_size]


def epoch_batches(x, y, batch_size: int, ghost_batch_size: int, seed: int, epoch: int, skip_steps: int = 0):
    """A ``tf.data.Dataset`` of the micro-batches of one epoch (see :func:`epoch_order`).

    ``x`` and ``y`` are tensors (converted once); batches are gathered from them. ``skip_steps`` leaves out
    the epoch's first large batches (continuing a run stopped inside an epoch by its target loss).
    """
    import tensorflow as tf

    order = epoch_order(int(x.shape[0]), batch_size, seed, epoch)[int(skip_steps) * batch_size:]
    dataset = tf.data.Dataset.from_tensor_slices(order.astype(np.int64)).batch(ghost_batch_size)
    dataset = dataset.map(lambda idx: (tf.gather(x, idx), tf.gather(y, idx)))
    return dataset.prefetch(2)


def library_versions() -> dict:
    import keras
    import tensorflow as tf

    import keras_implicit

    return {
        "python": platform.python_version(),
        "tensorflow": tf.__version__,
        "keras": keras.__version__,
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
def _atomic_write(path: str, data: bytes):
    tmp = f"{path}.tmp"
    with open(tmp, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)
    try:
        fd = os.open(os.path.dirname(os.path.abspath(path)), os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        pass


class RunDirectory:
    """One run's directory: lock, config, status, metrics and checkpoint.

    Use it as a context manager (``with RunDirectory(path) as run: ...``): entering takes an exclusive
    ``fcntl.flock`` on ``path/.lock`` (released on exit, and by the system if the process dies);
    a second process gets :class:`RunLockedError`.
    """

    CONFIG, STATUS, METRICS, CHECKPOINT, TENSORBOARD, LOCK = (
        "config.json", "status.json", "metrics.jsonl", "checkpoint.npz", "tb", ".lock")

    def __init__(self, path):
        self.path = os.fspath(path)
        self._lock_handle = None

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
        try:
            with open(self.file(name), encoding="utf-8") as handle:
                return json.load(handle)
        except FileNotFoundError:
            return None

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

    def clear(self):
        """Removes everything but the lock (``--overwrite``)."""
        for name in self.contents():
            target = self.file(name)
            if os.path.isdir(target) and not os.path.islink(target):
                shutil.rmtree(target)
            else:
                os.remove(target)

    def read_metrics(self):
        """The records of ``metrics.jsonl`` (a list of dicts)."""
        if not os.path.exists(self.metrics_path):
            return []
        with open(self.metrics_path, encoding="utf-8") as handle:
            return [json.loads(line) for line in handle if line.strip()]

    def truncate_metrics(self, size: int):
        if os.path.exists(self.metrics_path):
            with open(self.metrics_path, "r+b") as handle:
                handle.truncate(size)
                handle.flush()
                os.fsync(handle.fileno())

    def metrics_size(self) -> int:
        return os.path.getsize(self.metrics_path) if os.path.exists(self.metrics_path) else 0

    # checkpoints
    def save_checkpoint(self, model, optimizer, meta: dict):
        """Weights, optimizer variables and ``meta`` in one file, replaced atomically."""
        arrays = {f"model_{i}": np.asarray(v) for i, v in enumerate(model.weights)}
        arrays.update({f"optimizer_{i}": np.asarray(v) for i, v in enumerate(optimizer.variables)})
        arrays["meta"] = np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8)
        buffer = io.BytesIO()
        np.savez(buffer, **arrays)
        _atomic_write(self.file(self.CHECKPOINT), buffer.getvalue())

    def load_checkpoint(self, model=None, optimizer=None) -> Optional[dict]:
        """Restores weights and optimizer state (both must be built); returns the meta dict or None."""
        path = self.file(self.CHECKPOINT)
        if not os.path.exists(path):
            return None
        with np.load(path) as content:
            meta = json.loads(bytes(content["meta"]).decode())
            for prefix, variables in (("model", model.weights if model is not None else None),
                                      ("optimizer", optimizer.variables if optimizer is not None else None)):
                if variables is None:
                    continue
                stored = sorted((k for k in content.files if k.startswith(prefix + "_")),
                                key=lambda k: int(k.rsplit("_", 1)[1]))
                if len(stored) != len(variables):
                    raise RunError(f"{path}: holds {len(stored)} {prefix} variables, the {prefix} has {len(variables)}")
                for key, variable in zip(stored, variables):
                    value = content[key]
                    if tuple(value.shape) != tuple(variable.shape):
                        raise RunError(
                            f"{path}: {key} has shape {value.shape}, {variable.path} {tuple(variable.shape)}")
                    variable.assign(value)
        return meta


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


def _summary_line(epoch, epochs, step, tracker, train_seconds, tracking_seconds):
    parts = [f"epoch {epoch}/{epochs}", f"step {step}"]
    for split in ("train", "test"):
        record = tracker.last.get(split)
        if record is not None and record["step"] == step:
            parts.append(f"{split} ce {record['ce']:.4f} error {100 * record['error']:.2f}%")
    parts.append(f"{train_seconds:.1f}s train + {tracking_seconds:.1f}s tracking")
    return " | ".join(parts)


def train(config: RunConfig, run_dir, overwrite: bool = False, progress: bool = True, verbose: bool = True,
          stream=None, dataset=None, tracking_batch_size: Optional[int] = None) -> TrainResult:
    """Runs (or resumes) one training run into ``run_dir``; see the module docstring.

    Args:
        config: the :class:`RunConfig` (validated first: bad settings raise ValueError before any work).
        run_dir: the run directory (created if needed).
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
        ValueError: bad configuration. RunError: the directory is locked or holds another run,
        the data is unavailable.
    """
    config.validate()
    stream = (stream or sys.stdout) if verbose else None
    if tracking_batch_size is None:
        tracking_batch_size = TRACKING_BATCH_SIZES.get(config.model, 1024)
    with RunDirectory(run_dir) as run:
        return _train_locked(config, run, overwrite, progress, stream, dataset, tracking_batch_size)


def _comparable(content: dict) -> dict:
    return {k: content.get(k) for k in (*CONFIG_FLAGS, "sigmas", "temperatures", "margins")}


def _train_locked(config, run, overwrite, progress, stream, dataset, tracking_batch_size):
    from keras_implicit import metrics as ki_metrics

    grids = {"sigmas": list(ki_metrics.DEFAULT_SIGMAS), "temperatures": list(ki_metrics.DEFAULT_TEMPERATURES),
             "margins": list(ki_metrics.DEFAULT_MARGINS)}
    wanted = {**config.flags(), **grids}
    existing = run.config()
    if overwrite:
        run.clear()
        existing = None
    elif existing is not None:
        changed = [k for k in _comparable(wanted) if existing.get(k) != wanted.get(k)]
        if any(k not in EXTENDABLE for k in changed):
            differences = [f"{k}: {existing.get(k)!r} there, {wanted.get(k)!r} asked" for k in changed]
            raise RunError(f"{run.path} holds another run ({'; '.join(differences)}); use --overwrite to replace it "
                           "or --out for another directory")
        status = run.status() or {}
        if changed and status.get("state") != "diverged":
            _print(stream, f"{run.path}: continuing with " + ", ".join(
                f"{k} {wanted[k]} (was {existing.get(k)})" for k in changed))
            run.write_json(run.CONFIG, {**existing, **{k: wanted[k] for k in changed}})
        elif status.get("state") in ("finished", "diverged"):
            message = (f"{run.path}: run already {status['state']} at epoch {status.get('epoch')}, step "
                       f"{status.get('step')}; nothing to do"
                       + (f" ({status['message']})" if status.get("message") else ""))
            return TrainResult("already-" + status["state"], status.get("epoch", 0), status.get("step", 0), message)
    elif run.contents():
        raise RunError(f"{run.path} is not empty and holds no config.json (not a run directory); use --overwrite "
                       "to replace its contents or --out for another directory")

    import tensorflow as tf

    from keras_implicit import callbacks as ki_callbacks
    from keras_implicit import data as ki_data
    from keras_implicit import models as ki_models

    if config.deterministic:
        tf.config.experimental.enable_op_determinism()
    if dataset is None:
        try:
            dataset = ki_data.load_dataset(config.dataset, config.data_dir, config.train_subset)
        except ki_data.DatasetUnavailableError as error:
            raise RunError(str(error)) from None
    n_train = len(dataset.y_train)
    steps_per_epoch = n_train // config.batch_size
    if steps_per_epoch < 1:
        raise RunError(f"the training set has {n_train} examples, fewer than one batch of {config.batch_size}")

    if existing is None:
        run.write_json(run.CONFIG, {**wanted, "versions": library_versions(), "git_commit": git_commit()})

    model = ki_models.make_model(config.model, dataset.input_shape, dataset.num_classes, seed=config.seed)
    optimizer = make_optimizer(config.optimizer, config.lr, config.accumulation_steps)
    model.compile(optimizer=optimizer, loss=make_loss(config.loss))
    optimizer.build(model.trainable_variables)

    meta = run.load_checkpoint(model, optimizer)
    if meta is None:
        run.truncate_metrics(0)
        start_epoch, step, target_reached = 0, 0, False
    else:
        run.truncate_metrics(meta["metrics_bytes"])
        start_epoch, step = meta["epoch"], meta["step"]
        # Against the target asked now (it may have changed): the last training point before the checkpoint.
        last_train = [r for r in run.read_metrics() if r["split"] == "train"][-1:]
        target_reached = bool(config.target_train_loss is not None and last_train
                              and last_train[0]["ce"] < config.target_train_loss)
        _print(stream, f"resuming {run.path} from epoch {start_epoch} (step {step})")

    x_train = tf.convert_to_tensor(dataset.x_train)
    y_train = tf.convert_to_tensor(dataset.y_train)
    tracker = ki_callbacks.AltLossTracker(
        (x_train, y_train), (dataset.x_test, dataset.y_test), metrics_path=run.metrics_path,
        log_dir=run.tensorboard_dir, track_every=config.track_every, schedule=config.track_schedule,
        steps_per_epoch=steps_per_epoch, batch_size=tracking_batch_size,
        target_train_loss=config.target_train_loss, buffer_summaries=True,
    )
    tracker.set_model(model)
    if meta is not None:
        tracker.mark_tracked(step)  # tracked before the checkpoint was written
    monitor = ki_callbacks.DivergenceMonitor()
    callbacks = [tracker, monitor]
    if progress:
        callbacks.append(ki_callbacks.ProgressBar(config.epochs, stream=sys.stdout))
    result = TrainResult("finished", start_epoch, step)

    def checkpoint(epoch, step, target_reached):
        tracker.flush_summaries()
        run.save_checkpoint(model, optimizer, {"epoch": epoch, "step": step, "target_reached": target_reached,
                                               "metrics_bytes": run.metrics_size(), "steps_per_epoch": steps_per_epoch})

    def diverged(epoch, message):
        step_now = int(optimizer.iterations.numpy())
        tracker.flush_summaries()
        run.write_status("diverged", epoch, step_now, message)
        return dataclasses.replace(result, state="diverged", epoch=epoch, step=step_now, message=message,
                                   records=tracker.records)

    run.write_status("running", start_epoch, step)
    if meta is None:
        if step != 0 or int(optimizer.iterations.numpy()) != 0:
            raise RunError("internal error: a fresh run must start at step 0")
        tracker.track(0)
        if tracker.diverged:
            return diverged(0, tracker.diverged)
        checkpoint(0, 0, tracker.target_reached)
        target_reached = tracker.target_reached
        _print(stream, _summary_line(0, config.epochs, 0, tracker, 0.0, tracker.tracking_seconds))

    epoch = start_epoch
    while epoch < config.epochs and not target_reached:
        tracking_before = tracker.tracking_seconds
        started = time.perf_counter()
        batches = epoch_batches(x_train, y_train, config.batch_size, config.ghost_batch_size, config.seed, epoch,
                                skip_steps=step - epoch * steps_per_epoch)
        model.fit(batches, initial_epoch=epoch, epochs=epoch + 1, verbose=0, callbacks=callbacks, shuffle=False)
        elapsed = time.perf_counter() - started
        tracking = tracker.tracking_seconds - tracking_before
        step = int(optimizer.iterations.numpy())
        if monitor.diverged or tracker.diverged:
            message = monitor.diverged or tracker.diverged
            return diverged(epoch, f"diverged in epoch {epoch + 1}: {message}")
        target_reached = tracker.target_reached
        if step != (epoch + 1) * steps_per_epoch and not target_reached:
            raise RunError(f"epoch {epoch + 1} ended at step {step}, not {(epoch + 1) * steps_per_epoch}: training was "
                           "stopped by something else than divergence or the target loss")
        completed = epoch + 1 if step == (epoch + 1) * steps_per_epoch else epoch
        checkpoint(completed, step, target_reached)
        result.epoch_seconds.append(elapsed - tracking)
        result.tracking_seconds.append(tracking)
        _print(stream, _summary_line(epoch + 1, config.epochs, step, tracker, elapsed - tracking, tracking))
        run.write_status("running", completed, step)
        epoch += 1

    epochs_done = int(step // steps_per_epoch)
    message = (f"target train loss {config.target_train_loss} reached at step {step} "
               f"(epoch {step / steps_per_epoch:.3g})"
               if target_reached else f"{epochs_done} epochs")
    run.write_status("finished", epochs_done, step, message)
    tracker.close()
    return dataclasses.replace(result, state="finished", epoch=epochs_done, step=step, message=message,
                               records=tracker.records)
