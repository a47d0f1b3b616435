"""The paper's training protocol: ghost batches, run directories, checkpoints and resume.

``train(RunConfig(lr=0.1), "runs/fc6-lr0.1")`` trains one of the library's models with plain cross-entropy (SGD,
momentum 0.9, constant learning rate) while an :class:`~keras_implicit.callbacks.AltLossTracker` tracks the panel on
the whole training and test sets, and writes the run directory (``config.json``, ``status.json``, ``metrics.jsonl``,
``tb/``, ``checkpoint.npz``), from which rerunning the same call resumes. The specification (the run directory's
files, ghost batches, epochs, several devices, resume, damaged files) is the page docs/protocol.md.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import platform
import subprocess
import sys
import time
from typing import Optional

import numpy as np

from keras_implicit._distribute import check_divides as _check_divides
from keras_implicit._distribute import cluster_role as _cluster_role
from keras_implicit._startup import quiet_cuda_probe
from keras_implicit.config import (  # noqa: F401  (CONFIG_FLAGS: re-exported)
    CONFIG_FLAGS,
    EXTENDABLE,
    LEVEL_WINDOW,
    RunConfig,
    check_track_levels,
    default_run_name,
    differences,
    grids,
    level_trigger_state,
    parse_loss,  # noqa: F401  (re-exported)
    parse_objective,
    stored_differences,
)
from keras_implicit.names import (
    BACKENDS,
    DATASETS,
    MODELS,
    MOMENTUM,
    MOVING_STATISTICS,
    OPTIMIZERS,
    SCHEDULES,
    STRATEGIES,
    TRAIN_CLASS_COUNTS,
)
from keras_implicit.rundir import (
    RunDirectory,
    RunError,
    RunLockedError,
    UnreadableFileError,  # noqa: F401  (re-exported)
    read_status,
    restore_config,
    warn,
)

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

# Examples per forward pass when tracking (inference only: large batches amortize the per-call cost).
TRACKING_BATCH_SIZES = {"fc6": 4096, "c1": 1024}


# --------------------------------------------------------------------------- #
# Pieces of the protocol
# --------------------------------------------------------------------------- #
def make_loss(loss: str):
    """The Keras loss for a ``--loss`` value (all from logits): one family's, or a
    :class:`~keras_implicit.losses.Mixture` for a weighted sum (``ce+0.1*gcdf@4``)."""
    import keras  # deferred: Keras starts inside quiet_cuda_probe

    from keras_implicit import losses  # deferred: Keras starts inside quiet_cuda_probe

    terms = parse_objective(loss)
    if len(terms) > 1 or terms[0][0] != 1.0:
        return losses.Mixture(loss)
    _, family, parameter = terms[0]
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
    import keras  # deferred: Keras starts inside quiet_cuda_probe

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
    from keras_implicit import _backend  # deferred: Keras starts inside quiet_cuda_probe

    order = epoch_order(int(x.shape[0]), batch_size, seed, epoch)[int(skip_steps) * batch_size:]
    return _backend.batches(x, y, order, batch_size)


def library_versions() -> dict:
    """Python, Keras, the backend (``"backend"``) and its packages' versions, NumPy and this package."""
    import keras  # deferred: Keras starts inside quiet_cuda_probe

    import keras_implicit  # deferred: Keras starts inside quiet_cuda_probe
    from keras_implicit import _backend  # deferred: Keras starts inside quiet_cuda_probe

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
        import keras  # deferred: Keras starts inside quiet_cuda_probe

        needed = "jax" if config.strategy == "data-parallel" else "tensorflow"
        if keras.backend.backend() != needed:
            engine = "keras.distribution's DataParallel" if needed == "jax" else "tf.distribute"
            raise ValueError(f"strategy {config.strategy!r} is {engine}: it needs the {needed} backend, this "
                             f"process runs Keras on {keras.backend.backend()}")


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
        ValueError: bad configuration.
        RunError: the directory is locked or holds another run (or fewer
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
            import keras  # deferred: Keras starts inside quiet_cuda_probe

            if keras.backend.backend() == "tensorflow":
                import tensorflow as tf  # deferred: this backend only

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


def _data_text(data: dict) -> str:
    return (f"{data.get('train_examples')} training and {data.get('test_examples')} test examples from "
            f"{data.get('source')}")


def _check_same_backend(run: RunDirectory, existing: dict) -> None:
    """A run continues on the Keras backend it started on (a resume is then the run it would have been)."""
    import keras  # deferred: Keras starts inside quiet_cuda_probe

    started_on = (existing.get("versions") or {}).get("backend", "tensorflow")  # older runs: TensorFlow only
    if started_on != keras.backend.backend():
        raise RunError(f"{run.path} was trained on the {started_on} backend, this process runs Keras on "
                       f"{keras.backend.backend()}: resume it with KERAS_BACKEND={started_on}, or use another "
                       "run_dir")


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
            from keras_implicit import _distribute  # deferred: Keras starts inside quiet_cuda_probe

            try:
                if config.strategy == "data-parallel":  # the default fit path, its batches sharded by Keras
                    _distribute.set_data_parallel(config.cpu_replicas, config.ghost_batch_size)
                else:
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
        from keras_implicit import _distribute  # deferred: Keras starts inside quiet_cuda_probe

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
        wanted = {**config.flags(), **grids()}
        try:
            self.existing = None if overwrite else restore_config(run)
            if overwrite:
                run.clear()
                return None, None
            if self.existing is None:
                run.check_empty()
                return None, None
            existing = self.existing
            changed = differences(existing, wanted)
            if any(k not in EXTENDABLE for k in changed):
                described = [f"{k}: {stored!r} there, {asked!r} asked" for k, (stored, asked) in changed.items()]
                raise RunError(f"{run.path} holds another run ({'; '.join(described)}); use overwrite=True to "
                               "replace it or another run_dir")
            _check_same_backend(run, existing)
        except RunError as error:  # the other workers must hear of it before the chief stops
            return None, error
        status = read_status(run)
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
        from keras_implicit import _backend  # deferred: Keras starts inside quiet_cuda_probe
        from keras_implicit import data as ki_data  # deferred: Keras starts inside quiet_cuda_probe

        config = self.config
        if config.deterministic:
            _backend.enable_determinism()
        if self.dataset is None:
            try:
                self.dataset = ki_data.load_dataset(config.dataset, config.data_dir, config.train_subset,
                                                    validation_size=config.validation_size)
            # Missing files, damaged ones, or (custom data_dir files) fewer examples than train_subset: one line.
            except (ki_data.DatasetUnavailableError, ValueError) as error:
                raise RunError(str(error)) from None
        held = self.dataset.y_validation
        if (config.validation_size is None) != (held is None) or (held is not None and
                                                                   len(held) != config.validation_size):
            raise RunError(f"validation_size is {config.validation_size} but the dataset given holds "
                           f"{'no' if held is None else len(held)} validation examples: load it with "
                           "load_dataset(..., validation_size=validation_size)")
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
        provenance = {"source": source, "train_examples": int(len(self.dataset.y_train)),
                      "test_examples": int(len(self.dataset.y_test))}
        if self.dataset.y_validation is not None:
            provenance["validation_examples"] = int(len(self.dataset.y_validation))
        return provenance

    def build(self):
        """The model (a :class:`~keras_implicit.ghost.GhostBatchModel`), its optimizer, compiled and built;
        under a strategy, inside its scope (the variables mirrored on every replica)."""


        from keras_implicit import ghost  # deferred: Keras starts inside quiet_cuda_probe
        from keras_implicit import models as ki_models  # deferred: Keras starts inside quiet_cuda_probe

        config, dataset = self.config, self.dataset
        replicas = self.strategy.num_replicas_in_sync if self.strategy is not None else 1
        try:
            _check_divides(config.batch_size, config.ghost_batch_size, replicas)
        except ValueError as error:
            raise RunError(str(error)) from None
        with self.strategy.scope() if self.strategy is not None else contextlib.nullcontext():
            network = ki_models.make_model(config.model, dataset.input_shape, dataset.num_classes, seed=config.seed)
            self.model = ghost.ghost_batch_model(network, config.ghost_batch_size, config.moving_statistics,
                                                 gradient_penalty=config.gradient_penalty,
                                                 sam_radius=config.sam_radius)
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
            run.write_json(run.CONFIG, {**config.flags(), **grids(), "data": data, "versions": library_versions(),
                                        "git_commit": git_commit()})
        elif self.existing.get("data") not in (None, data):  # older runs recorded none
            warn(f"{run.path} was started on {_data_text(self.existing['data'])}; this process loaded "
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
        train_records = [r for r in run.read_metrics() if r.get("split") == "train"]
        below = [r for r in train_records if target is not None and r["ce"] < target]
        # The track_levels trigger remembers the tracked CEs across epochs: replayed, a resumed run tracks where an
        # uninterrupted one does.
        meta["level_trigger"] = level_trigger_state([r["ce"] for r in train_records], config.track_levels or ())
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
        from keras_implicit import _distribute  # deferred: Keras starts inside quiet_cuda_probe

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
        levels = self.config.track_levels or ()
        last_ce, counts = (meta or {}).get("level_trigger") or level_trigger_state((), levels)
        trigger = np.array([math.nan if last_ce is None else last_ce, *counts], np.float64)
        arrays = [np.array([float(numbers[k]) for k in _PLAN_FIELDS]), trigger] + [np.asarray(v) for v in variables]
        shared = _distribute.broadcast_from_chief(self.strategy, arrays)
        received = dict(zip(_PLAN_FIELDS, (int(v) for v in shared[0])))
        if received["action"] == _TRAIN:
            for variable, value in zip(variables, shared[2:]):
                variable.assign(value)
            if received["resumed"]:
                last_ce = float(shared[1][0])
                meta = {**(meta or {}), "epoch": received["epoch"], "step": received["step"],
                        "target_reached": bool(received["target_reached"]),
                        "target_step": received["target_step"] if received["target_step"] >= 0 else None,
                        "level_trigger": (None if math.isnan(last_ce) else last_ce,
                                          tuple(int(v) for v in shared[1][1:]))}
        else:
            meta = {"epoch": received["epoch"], "step": received["step"]}
        return received["action"], meta

    def make_tracker(self, meta: Optional[dict]):
        from keras_implicit import callbacks as ki_callbacks  # deferred: Keras starts inside quiet_cuda_probe

        run, dataset = self.run_dir, self.dataset
        self.tracker = ki_callbacks.AltLossTracker(
            (self.x_train, self.y_train), (dataset.x_test, dataset.y_test),
            validation_data=(None if dataset.y_validation is None else (dataset.x_validation, dataset.y_validation)),
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
            if meta.get("level_trigger") is not None and self.config.track_levels:
                self.tracker.restore_trigger(meta["level_trigger"])
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
        from keras_implicit import _distribute  # deferred: Keras starts inside quiet_cuda_probe

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
