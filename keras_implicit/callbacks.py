"""Full-set tracking of the alternative losses during training, to metrics.jsonl and TensorBoard.

:class:`AltLossTracker` is a Keras callback: add it to ``model.fit(callbacks=[...])`` and, before
training and then on a schedule, it evaluates the whole training set and the test set in inference
mode with the current weights, in **one forward pass per split** (a model over the same layers with
two outputs, logits and top-layer features), and from those logits computes cross-entropy, the zero-one
error and every loss of the panel (:func:`keras_implicit.losses.panel_values`); sums are accumulated in
float64. Each tracking point gives one record per split::

    {"epoch": 3.0, "step": 705, "split": "train", "ce": ..., "error": ..., "gcdf@0.0625": ..., ...,
     "tce@0.25": ..., ..., "hinge@0.25": ..., ..., "feature_norm": ..., "top_kernel_norm": ...,
     "top_bias_norm": ...}

``step`` counts optimizer updates (large batches: with ghost batches or Keras' gradient accumulation, one
step per batch of micro-batches), ``epoch`` is ``step / steps_per_epoch`` (0 before
training). ``feature_norm`` is the mean L2 norm of the top layer's input (1 for the library's models,
whose features are normalized); the Gcdf columns use each example's own norm (eq. 6), so they hold for models
whose features are not normalized too. ``top_kernel_norm`` / ``top_bias_norm`` the Frobenius norms of the top
Dense layer's weights.

The schedule (:func:`tracking_steps`): step 0 (before training), every epoch end, plus every
``track_every`` steps, plus for ``schedule="log"`` the log-spaced steps ``round(2^(k/2))`` = 1, 2, 3, 4, 6,
8, 11, 16, 23, 32, ... up to two epochs (dense points where the loss falls fastest).
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from typing import Callable, Iterable, Optional, Sequence

import keras
import numpy as np
from keras import ops

from keras_implicit import _backend
from keras_implicit import losses as _losses
from keras_implicit import metrics as _metrics
from keras_implicit import models as _models
from keras_implicit import sharpness as _sharpness
from keras_implicit.config import (
    LEVEL_SETTLE_POINTS,
    LEVEL_WINDOW,
    LOSS_SMOOTHING,
    check_track_levels,
    level_trigger_state,
)
from keras_implicit.names import CHART_TITLES, SCHEDULES
from keras_implicit.rundir import CONFIG, atomic_write

__all__ = [
    "tracking_steps",
    "check_track_levels",
    "LEVEL_WINDOW",
    "log_spaced_steps",
    "AltLossTracker",
    "DivergenceMonitor",
    "ProgressBar",
    "custom_scalars_layout",
]

# sqrt(2) * sigma * 1e-30 stays a normal float32 for every sigma >= 1e-8, so a tie still gives Phi(0) = 1/2.
_SMALLEST_FEATURE_NORM = 1e-30

FAMILY_TITLES = CHART_TITLES  # the name this module gave them first


def log_spaced_steps(limit: int) -> list[int]:
    """``round(2^(k/2))`` for k = 0, 1, ... while <= ``limit``, without repeats: 1, 2, 3, 4, 6, 8, 11, 16, ..."""
    steps, k = [], 0
    while True:
        step = int(round(2 ** (k / 2)))
        if step > limit:
            return steps
        if not steps or step != steps[-1]:
            steps.append(step)
        k += 1


def tracking_steps(steps_per_epoch: int, total_steps: int, track_every: Optional[int] = None,
                   schedule: str = "epoch") -> list[int]:
    """The sorted optimizer steps at which to track, up to ``total_steps``.

    Always step 0 and every multiple of ``steps_per_epoch``; with ``track_every`` also its multiples;
    with ``schedule="log"`` also :func:`log_spaced_steps` up to ``2 * steps_per_epoch``.
    """
    if steps_per_epoch < 1:
        raise ValueError(f"steps_per_epoch must be >= 1, got {steps_per_epoch}")
    if schedule not in SCHEDULES:
        raise ValueError(f"unknown tracking schedule {schedule!r}: choose one of {', '.join(SCHEDULES)}")
    if track_every is not None and track_every < 1:
        raise ValueError(f"track_every must be a positive number of steps, got {track_every}")
    steps = set(range(0, total_steps + 1, steps_per_epoch))
    if track_every:
        steps.update(range(0, total_steps + 1, track_every))
    if schedule == "log":
        steps.update(s for s in log_spaced_steps(2 * steps_per_epoch) if s <= total_steps)
    return sorted(steps)


def custom_scalars_layout(names: Iterable[str], splits=("train", "test")):
    """The TensorBoard custom-scalars layout: per split, one chart per family with all its parameters,
    one for cross-entropy and error, one for the norms. Tags are ``<split>/<name>``."""
    from tensorboard.plugins.custom_scalar import layout_pb2  # deferred: this writer only

    names = list(names)
    families = []
    for name in names:
        family = name.split("@")[0]
        if "@" in name and family not in families:
            families.append(family)
    categories = []
    for split in splits:
        charts = [
            layout_pb2.Chart(
                title=f"{split}: {FAMILY_TITLES.get(family, family)}",
                multiline=layout_pb2.MultilineChartContent(tag=[rf"^{split}/{family}@.*"]),
            )
            for family in families
        ]
        charts.append(layout_pb2.Chart(
            title=f"{split}: cross-entropy and error",
            multiline=layout_pb2.MultilineChartContent(tag=[rf"^{split}/(ce|error)$"]),
        ))
        charts.append(layout_pb2.Chart(
            title=f"{split}: norms",
            multiline=layout_pb2.MultilineChartContent(tag=[rf"^{split}/(feature_norm|top_kernel_norm|top_bias_norm)$"]),
        ))
        categories.append(layout_pb2.Category(title=split, chart=charts))
    return layout_pb2.Layout(category=categories)


class AltLossTracker(keras.callbacks.Callback):
    """Tracks CE, error, the alternative-loss panel and top-layer norms on whole datasets.

    Args:
        train_data: ``(x, y)`` arrays: the training set, evaluated in full at each tracking point; ``y`` as
            integer labels [n] or [n, 1], or one-hot rows [n, classes].
        test_data: ``(x, y)`` or None.
        validation_data: ``(x, y)`` held out of the training set (what hyperparameters are chosen on), tracked as
            the split ``"validation"``; or None.
        sigmas, temperatures, margins: the panel's grids (default: the library's defaults).
        metrics_path: a ``metrics.jsonl`` to append records to (flushed at once), or None.
        config: the run's settings (``{"lr": 0.1, "batch_size": 256, "seed": 0, ...}``), written as
            ``config.json`` beside ``metrics_path`` (which it needs): with it the folder is a run directory that
            :mod:`keras_implicit.analysis` and :mod:`keras_implicit.plots` read, group by every setting but the
            seed, and label by the settings that differ (``lr``, ``batch_size`` and ``seed`` as run.py names them).
        log_dir: a TensorBoard directory (scalars ``<split>/<name>`` at the optimizer step, and the
            custom-scalars layout), or None.
        track_every: also track every this many optimizer steps.
        schedule: ``"epoch"`` or ``"log"`` (see :func:`tracking_steps`).
        steps_per_epoch: optimizer steps per epoch; None: from ``model.fit``'s ``params["steps"]``
            divided by the optimizer's ``gradient_accumulation_steps``.
        batch_size: examples per forward pass when tracking (large: inference only).
        target_train_loss: stop training (``model.stop_training``) once the training CE is below it.
        buffer_summaries: if true, TensorBoard scalars wait for :meth:`flush_summaries` (the training
            loop calls it just before each checkpoint, so a resumed run never writes a point twice).
        on_record: called with each record after it is written.
        noisy_error_draws: 0 (off), or the Monte Carlo draws per example of the noisy error: each record then
            also holds ``noisy_error@s``, ``noisy_error_se@s``, ``noisy_ce@s``, ``eq9@s`` for every sigma of
            the Gcdf grid and ``hessian_trace`` (:mod:`keras_implicit.sharpness`), from the same forward pass.
        noise_seed: the draws' seed (each tracking step, split and batch gets its own draws from it).
        track_levels: training losses (the ladder's levels, e.g. ``[1, 0.5, 0.3, 0.15, 0.08, 0.04]``) around
            whose crossings the ``track_every`` points are taken (:meth:`near_a_level`): from when the running
            training loss or the last tracked training CE comes within ``level_window`` of a level until the
            tracked CE has stayed at or below it for ``LEVEL_SETTLE_POINTS`` points; epoch ends and the ``"log"``
            schedule's points are tracked as always. None: every ``track_every`` steps. Needs ``track_every``.
        level_window: how near (a factor > 1; default 1.15).

    After training, ``records`` holds every record written, ``diverged`` a message or None and
    ``target_reached`` whether the target loss was reached.

    Example:
        >>> tracker = AltLossTracker((x_train, y_train), (x_test, y_test), metrics_path="metrics.jsonl")
        >>> model.fit(x_train, y_train, batch_size=256, epochs=5, callbacks=[tracker])
    """

    def __init__(self, train_data, test_data=None, sigmas=_metrics.DEFAULT_SIGMAS,
                 temperatures=_metrics.DEFAULT_TEMPERATURES, margins=_metrics.DEFAULT_MARGINS,
                 metrics_path=None, log_dir=None, track_every: Optional[int] = None, schedule: str = "epoch",
                 steps_per_epoch: Optional[int] = None, batch_size: int = 4096,
                 target_train_loss: Optional[float] = None, buffer_summaries: bool = False,
                 on_record: Optional[Callable[[dict], None]] = None, noisy_error_draws: int = 0,
                 noise_seed: int = 0, config: Optional[dict] = None,
                 track_levels: Optional[Sequence[float]] = None, level_window: float = LEVEL_WINDOW,
                 validation_data=None):
        super().__init__()
        if schedule not in SCHEDULES:
            raise ValueError(f"unknown tracking schedule {schedule!r}: choose one of {', '.join(SCHEDULES)}")
        if track_every is not None and int(track_every) < 1:
            raise ValueError(f"track_every must be a positive number of steps, got {track_every}")
        if int(batch_size) < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.track_levels = check_track_levels(track_levels, track_every, level_window)
        self.level_window = float(level_window)
        self._loss_estimate: Optional[float] = None  # the running training loss, this epoch (see observe_loss)
        self._epoch_mean: Optional[float] = None
        self._last_train_ce, self._points_below = level_trigger_state((), self.track_levels)
        if target_train_loss is not None and not (math.isfinite(target_train_loss) and target_train_loss > 0):
            raise ValueError(f"target_train_loss must be a finite number > 0, got {target_train_loss}")
        self.splits = {"train": self._as_tensors(train_data, "train_data")}
        if test_data is not None:
            self.splits["test"] = self._as_tensors(test_data, "test_data")
        if validation_data is not None:  # after test: the noise draws of train and test keep their split index
            self.splits["validation"] = self._as_tensors(validation_data, "validation_data")
        self.sigmas = _metrics.parameter_list(sigmas, "sigma", allow_zero=True)
        self.temperatures = _metrics.parameter_list(temperatures, "temperature", allow_zero=False)
        self.margins = _metrics.parameter_list(margins, "margin", allow_zero=True)
        self.panel_names = _losses.panel_names(self.sigmas, self.temperatures, self.margins, error=True)
        self.noisy_error_draws = 0 if not noisy_error_draws else _sharpness.validate_draws(noisy_error_draws)
        self.noise_seed = _sharpness.validate_seed(noise_seed)
        if self.noisy_error_draws and not self.sigmas:
            raise ValueError("noisy_error_draws needs sigmas: the noisy error is measured on the Gcdf grid")
        self.sharpness_names = _sharpness.sharpness_names(self.sigmas) if self.noisy_error_draws else []
        self.metric_names = ["ce", "error", *self.panel_names[:-1], *self.sharpness_names, "feature_norm",
                             "top_kernel_norm", "top_bias_norm"]
        self.metrics_path = metrics_path
        if config is not None:
            self._write_config(config)
        self.log_dir = log_dir
        self.track_every = None if track_every is None else int(track_every)
        self.schedule = schedule
        self.steps_per_epoch = steps_per_epoch
        self.batch_size = int(batch_size)
        self.target_train_loss = target_train_loss
        self.buffer_summaries = buffer_summaries
        self.on_record = on_record
        self.records: list[dict] = []
        self.last: dict[str, dict] = {}
        self.diverged: Optional[str] = None
        self.target_reached = False
        self.tracking_seconds = 0.0
        self._tracked_steps: set[int] = set()
        self._pending: list[dict] = []
        self._writer = None
        self._sums_fn = None
        self._sums_model = None
        self._log_steps: Optional[set[int]] = None  # from steps_per_epoch, known once training starts
        self._last_seen_step: Optional[int] = None

    def _write_config(self, config):
        if not isinstance(config, dict):
            raise TypeError(f"config must be a dict of the run's settings, got {type(config).__name__}")
        if self.metrics_path is None:
            raise ValueError("config is written as config.json beside metrics_path: give metrics_path too")
        try:
            text = json.dumps(config, indent=2, sort_keys=True)
        except (TypeError, ValueError) as error:
            raise ValueError(f"config must hold JSON values (numbers, strings, lists, dicts): {error}") from None
        path = os.path.join(os.path.dirname(os.path.abspath(self.metrics_path)), CONFIG)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        atomic_write(path, (text + "\n").encode("utf-8"))

    @staticmethod
    def _as_tensors(data, what):
        try:
            x, y = data
        except (TypeError, ValueError):
            raise ValueError(f"{what} must be a pair (x, y) of arrays") from None
        if len(x) != len(y) or len(x) == 0:
            raise ValueError(f"{what}: x and y must hold the same, non-zero number of examples "
                             f"(got {len(x)} and {len(y)})")
        x = x if ops.is_tensor(x) else ops.convert_to_tensor(np.asarray(x, np.float32))
        return x, ops.convert_to_tensor(_losses.integer_labels(y, what))

    # ------------------------------------------------------------------ #
    # The measurement: one forward pass per split.
    # ------------------------------------------------------------------ #
    def _build_sums(self):
        if self._sums_fn is not None and self._sums_model is self.model:
            return self._sums_fn
        two_outputs = _models.with_features(self.model)
        sigmas, temperatures, margins = self.sigmas, self.temperatures, self.margins
        total_dtype = _backend.accumulation_dtype()
        sigma_grid = np.asarray(sigmas, np.float64)

        def column_sums(logits, features, y, *noise):
            logits = ops.cast(logits, "float32")
            norms = ops.norm(ops.cast(features, "float32"), axis=-1)
            # Gcdf with each example's own ||x|| (eq. 6; 1 for the library's normalized models), as the noisy
            # error beside it. A zero feature vector takes the limit sigma * ||x|| -> 0 (the classes beating y,
            # a tie 1/2) through a norm far below any other yet above float32's underflow. A non-finite one
            # (a diverged network) is replaced, as the kernel refuses it: the feature_norm column still shows it.
            usable = ops.where(ops.isfinite(norms), ops.maximum(norms, _SMALLEST_FEATURE_NORM), 1.0)
            panel = _losses.panel_values(y, logits, sigmas, temperatures, margins, error=True, feature_norm=usable)
            ce = keras.losses.sparse_categorical_crossentropy(y, logits, from_logits=True)
            columns = ops.concatenate([ce[:, None], ops.cast(panel, "float32"), norms[:, None]], axis=-1)
            sums = ops.sum(ops.cast(columns, total_dtype), axis=0)
            if noise:  # the noisy error and eq. 9 from the same logits and features
                sums = ops.concatenate([sums, _sharpness.column_sums(y, logits, features, noise[0], sigma_grid,
                                                                     total_dtype)])
            return sums

        sums = _backend.compile_batch_sums(two_outputs, column_sums, trained_model=self.model)
        self._sums_fn, self._sums_model = sums, self.model
        return sums

    def evaluate(self, split: str = "train", step: int = 0) -> dict:
        """The means over one whole split with the current weights: ``{"ce": ..., "error": ..., ...}``.

        ``step`` (the optimizer step) only chooses the noise draws when the noisy error is on."""
        x, y = self.splits[split]
        sums_fn = self._build_sums()
        total = None
        count = int(x.shape[0])
        draws = self.noisy_error_draws
        size = self.batch_size
        if draws:
            classes = int(_models.top_layer(self.model).units)
            size = _sharpness.noise_batch_size(size, draws, classes)
            split_index = list(self.splits).index(split)
        for index, start in enumerate(range(0, count, size)):
            arguments = [x[start:start + size], y[start:start + size]]
            if draws:
                seed = _sharpness.batch_seed(self.noise_seed, step, split_index, index)
                arguments.append(_sharpness.draw_noise(int(arguments[0].shape[0]), draws, classes, seed))
            part = sums_fn(*arguments)
            total = part if total is None else total + part
        sums = ops.convert_to_numpy(total).astype(np.float64)
        panel_width = len(self.panel_names) + 2  # ce, the panel with the error, the feature norm
        means = sums[:panel_width] / count
        values = {"ce": float(means[0]), "error": float(means[-2])}
        values.update({name: float(v) for name, v in zip(self.panel_names[:-1], means[1:-2])})
        if draws:
            values.update(_sharpness.from_sums(sums[panel_width:], count, self.sigmas, draws))
        values["feature_norm"] = float(means[-1])
        top = _models.top_layer(self.model)
        values["top_kernel_norm"] = float(np.linalg.norm(np.asarray(top.kernel, np.float64)))
        bias = np.asarray(top.bias, np.float64) if top.bias is not None else np.zeros(0)
        values["top_bias_norm"] = float(np.linalg.norm(bias))
        return values

    def _note_train_ce(self, ce: float):
        self._last_train_ce, self._points_below = level_trigger_state([ce], self.track_levels, self.trigger_state())

    def trigger_state(self) -> tuple:
        """The ``track_levels`` trigger's memory across epochs: ``(last tracked training CE or None, points in a
        row at or below each level)``, as :func:`keras_implicit.config.level_trigger_state` replays it."""
        return self._last_train_ce, self._points_below

    def restore_trigger(self, state):
        """Sets :meth:`trigger_state` (a resumed run: replayed from its records up to the checkpoint, so that it
        tracks at the steps an uninterrupted run tracks at)."""
        last, counts = state
        if len(counts) != len(self.track_levels):
            raise ValueError(f"a trigger state for {len(counts)} levels, but track_levels has "
                             f"{len(self.track_levels)}")
        self._last_train_ce = None if last is None or not math.isfinite(last) else float(last)
        self._points_below = tuple(int(count) for count in counts)

    def mark_tracked(self, step: int):
        """Records that ``step`` was tracked already (by an earlier process, before a resume)."""
        self._tracked_steps.add(int(step))

    def optimizer_step(self) -> int:
        return int(ops.convert_to_numpy(self.model.optimizer.iterations))

    def _resolve_steps_per_epoch(self):
        if self.steps_per_epoch:
            return self.steps_per_epoch
        steps = (self.params or {}).get("steps")
        if not steps:
            raise ValueError("AltLossTracker needs steps_per_epoch when model.fit does not know the epoch length")
        accumulation = getattr(self.model.optimizer, "gradient_accumulation_steps", None) or 1
        self.steps_per_epoch = max(1, steps // accumulation)
        return self.steps_per_epoch

    def track(self, step: Optional[int] = None) -> list[dict]:
        """Evaluates every split now and writes the records; returns them ([] if diverged)."""
        started = time.perf_counter()
        step = self.optimizer_step() if step is None else int(step)
        steps_per_epoch = self._resolve_steps_per_epoch()
        records = []
        for split in self.splits:
            values = self.evaluate(split, step)
            if not all(math.isfinite(v) for v in values.values()):
                bad = [k for k, v in values.items() if not math.isfinite(v)]
                self.diverged = (f"non-finite {split} {', '.join(bad[:3])}{' ...' if len(bad) > 3 else ''} "
                                 f"at step {step} (epoch {step / steps_per_epoch:.3g})")
                if self.model is not None:
                    self.model.stop_training = True
                self.tracking_seconds += time.perf_counter() - started
                return []
            records.append({"epoch": step / steps_per_epoch, "step": step, "split": split, **values})
        for record in records:
            self._write(record)
            if record["split"] == "train" and self.track_levels:
                self._note_train_ce(record["ce"])
        self._tracked_steps.add(step)
        if (self.target_train_loss is not None and self.last.get("train", {}).get("ce", math.inf)
                < self.target_train_loss):
            self.target_reached = True
            self.model.stop_training = True
        self.tracking_seconds += time.perf_counter() - started
        return records

    def _write(self, record):
        if self.metrics_path is not None:
            with open(self.metrics_path, "a", encoding="utf-8") as handle:
                handle.write(json.dumps(record) + "\n")
                handle.flush()
        self.records.append(record)
        self.last[record["split"]] = record
        self._pending.append(record)
        if not self.buffer_summaries:
            self.flush_summaries()
        if self.on_record is not None:
            self.on_record(record)

    def flush_summaries(self):
        """Writes the pending TensorBoard scalars and flushes the event file."""
        if self.log_dir is None:
            self._pending.clear()
            return
        if self._writer is None:
            self._writer = _backend.open_scalar_writer(str(self.log_dir))
            if self._writer is None:  # no event writer on this backend (one warning said so)
                self.log_dir = None
                self._pending.clear()
                return
            self._writer.layout(custom_scalars_layout(["ce", *self.panel_names[:-1], *self.sharpness_names],
                                                      tuple(self.splits)))
        for record in self._pending:
            self._writer.scalars({f"{record['split']}/{name}": record[name] for name in self.metric_names},
                                 record["step"])
        self._writer.flush()
        self._pending.clear()

    def close(self):
        self.flush_summaries()
        if self._writer is not None:
            self._writer.close()
            self._writer = None

    # ------------------------------------------------------------------ #
    # Keras callback hooks
    # ------------------------------------------------------------------ #
    def _due(self, step: int) -> bool:
        if step in self._tracked_steps:
            return False
        if step == 0:
            return True
        if self.track_every and step % self.track_every == 0 and self.near_a_level():
            return True
        return self.schedule == "log" and step in self._log_steps

    def observe_loss(self, batch_loss: float):
        """Feeds the training loss of one batch to the ``track_levels`` trigger (``model.fit`` does it from its
        logs; a loop of one's own calls it after each update, before :meth:`due`)."""
        value = float(batch_loss)
        if not math.isfinite(value):
            return
        self._loss_estimate = value if self._loss_estimate is None else (
            self._loss_estimate + LOSS_SMOOTHING * (value - self._loss_estimate))

    def start_epoch(self):
        """Forgets the running training loss (``model.fit`` calls it at each epoch's start): the trigger then
        depends only on the epoch's own batches, so a run resumed from an epoch's checkpoint tracks at the steps an
        uninterrupted run tracks at."""
        self._loss_estimate = None
        self._epoch_mean = None

    def near_a_level(self) -> bool:
        """Whether the ``track_every`` points are due now: always without ``track_levels``; with them, while a
        level is open (fewer than ``LEVEL_SETTLE_POINTS`` tracked points in a row at or below it) and the lower of
        the running training loss (an exponential average of the epoch's batch losses, :meth:`observe_loss`) and
        the last tracked training CE lies at or below ``level_window`` times it. With neither signal yet, True."""
        if not self.track_levels:
            return True
        signals = [value for value in (self._loss_estimate, self._last_train_ce) if value is not None]
        if not signals:
            return True
        signal = min(signals)
        return any(count < LEVEL_SETTLE_POINTS and signal <= level * self.level_window
                   for count, level in zip(self._points_below, self.track_levels))

    def due(self, step: int) -> bool:
        """Whether ``step`` (optimizer updates so far) is a tracking point not tracked yet: step 0, an epoch's end,
        every ``track_every`` steps, and the ``"log"`` schedule's steps; what :meth:`track` is called at in
        ``model.fit``. For a training loop of your own (``steps_per_epoch`` given)::

            tracker = AltLossTracker((x, y), (x_test, y_test), steps_per_epoch=steps, metrics_path="metrics.jsonl")
            tracker.set_model(model)
            for step in range(total_steps + 1):
                if tracker.due(step):
                    tracker.track(step)  # before update ``step + 1``: the weights after ``step`` updates
                if step < total_steps:
                    ...  # one update
            tracker.close()
        """
        step = int(step)
        self._set_log_steps()
        return self._due(step) or (step not in self._tracked_steps and step % self._resolve_steps_per_epoch() == 0)

    def _set_log_steps(self):
        if self._log_steps is None:
            steps_per_epoch = self._resolve_steps_per_epoch()
            self._log_steps = set(log_spaced_steps(2 * steps_per_epoch)) if self.schedule == "log" else set()

    def on_train_begin(self, logs=None):
        self._set_log_steps()
        step = self.optimizer_step()
        self._last_seen_step = step
        if step == 0 and self._due(0):
            self.track(0)

    def on_epoch_begin(self, epoch, logs=None):
        self.start_epoch()

    def on_train_batch_end(self, batch, logs=None):
        if self.diverged or self.target_reached:
            return
        if not (self.track_every or self._log_steps):
            return
        if self.track_levels and (logs or {}).get("loss") is not None:
            # Keras logs the mean loss of the epoch's batches so far: this batch's loss is the difference.
            mean = float(logs["loss"])
            self.observe_loss(mean if self._epoch_mean is None or batch == 0
                              else (batch + 1) * mean - batch * self._epoch_mean)
            self._epoch_mean = mean
        # optimizer.iterations counts updates (with gradient accumulation, large batches): it changes only
        # on the micro-batch that completes a window, so a step seen for the first time is one whose update
        # has just been applied, never the middle of an accumulation window.
        step = self.optimizer_step()
        updated = step != self._last_seen_step
        self._last_seen_step = step
        if step and updated and self._due(step):
            self.track(step)

    def on_epoch_end(self, epoch, logs=None):
        if self.diverged or self.target_reached:
            return
        step = self.optimizer_step()
        if step not in self._tracked_steps:
            self.track(step)

    def on_train_end(self, logs=None):
        if not self.buffer_summaries:
            self.flush_summaries()


class DivergenceMonitor(keras.callbacks.Callback):
    """Stops training at the first non-finite training loss (checked after every batch).

    ``diverged`` then holds a one-line explanation with the optimizer step.
    """

    def __init__(self):
        super().__init__()
        self.diverged: Optional[str] = None

    def on_train_batch_end(self, batch, logs=None):
        loss = (logs or {}).get("loss")
        if loss is None:
            return
        value = float(loss)
        if not math.isfinite(value):
            step = int(ops.convert_to_numpy(self.model.optimizer.iterations))
            self.diverged = f"the training loss became {value} (optimizer step {step})"
            self.model.stop_training = True


class ProgressBar(keras.callbacks.Callback):
    """One progress bar per epoch (redrawn in place on a terminal, nothing otherwise).

    Args:
        epochs: the total number of epochs, for the label.
        stream: where to draw (default ``sys.stdout``).
        width: the bar's width in characters.
    """

    def __init__(self, epochs: int, stream=None, width: int = 30, interval: float = 0.2):
        super().__init__()
        self.epochs = epochs
        self.stream = stream or sys.stdout
        self.width = width
        self.interval = interval
        self.enabled = hasattr(self.stream, "isatty") and self.stream.isatty()
        self._last = 0.0
        self._start = 0.0
        self._epoch = 0
        self._loss = None

    def on_epoch_begin(self, epoch, logs=None):
        self._epoch, self._start, self._last = epoch, time.perf_counter(), 0.0

    def on_train_batch_end(self, batch, logs=None):
        if not self.enabled:
            return
        now = time.perf_counter()
        steps = (self.params or {}).get("steps") or 0
        if now - self._last < self.interval and batch + 1 < steps:
            return
        self._last = now
        loss = (logs or {}).get("loss")
        done = (batch + 1) / steps if steps else 0.0
        filled = int(self.width * done)
        rate = (now - self._start) / (batch + 1)
        eta = rate * (steps - batch - 1)
        loss_text = f" loss {float(loss):.4f}" if loss is not None else ""
        self.stream.write(f"\repoch {self._epoch + 1}/{self.epochs} [{'=' * filled}{'.' * (self.width - filled)}] "
                          f"{batch + 1}/{steps} eta {eta:4.0f}s{loss_text}   ")
        self.stream.flush()

    def on_epoch_end(self, epoch, logs=None):
        if self.enabled:
            self.stream.write("\r" + " " * (self.width + 70) + "\r")
            self.stream.flush()
