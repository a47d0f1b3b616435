"""keras_implicit.callbacks: the tracker's values against an independent NumPy/SciPy forward pass and losses."""

import json
import math
import os

import keras
import numpy as np
import pytest
from scipy import special
from tensorboard.util.tensor_util import make_ndarray

from keras_implicit import callbacks, config, losses, metrics
from keras_implicit.models import make_model
from tests.backend import to_numpy
from tests.references import numpy_fc6, ref_error, ref_gcdf, ref_hinge, ref_tce

SIGMAS, TEMPERATURES, MARGINS = (0.0, 0.25, 1.0, 8.0), (0.5, 1.0, 4.0), (0.0, 1.0, 4.0)


@pytest.fixture(scope="module")
def trained():
    rng = np.random.default_rng(0)
    x = rng.random((300, 6, 6, 1)).astype(np.float32)
    y = (np.arange(300) % 4).astype(np.int32)
    x[np.arange(300), y, y, 0] += 2.0  # learnable
    model = make_model("fc6", (6, 6, 1), 4, seed=0)
    model.compile(keras.optimizers.SGD(0.5, momentum=0.9),
                  keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    model.fit(x, y, batch_size=50, epochs=3, verbose=0)
    return model, x, y


def test_evaluate_matches_an_independent_forward_pass_and_references(trained):
    model, x, y = trained
    tracker = callbacks.AltLossTracker((x, y), (x[:77], y[:77]), SIGMAS, TEMPERATURES, MARGINS, batch_size=64)
    tracker.set_model(model)
    for split, (xs, ys) in (("train", (x, y)), ("test", (x[:77], y[:77]))):
        values = tracker.evaluate(split)
        logits, features = numpy_fc6(model, xs)
        assert values["ce"] == pytest.approx(np.mean(-special.log_softmax(logits, axis=1)[np.arange(len(ys)), ys]),
                                             rel=1e-4)
        assert values["error"] == pytest.approx(np.mean(ref_error(ys, logits)), abs=1e-9)
        for s in SIGMAS:
            assert values[f"gcdf@{losses.format_parameter(s)}"] == pytest.approx(np.mean(ref_gcdf(ys, logits, s)),
                                                                                rel=1e-4, abs=1e-6)
        for t in TEMPERATURES:
            assert values[f"tce@{losses.format_parameter(t)}"] == pytest.approx(np.mean(ref_tce(ys, logits, t)),
                                                                               rel=1e-4)
        for g in MARGINS:
            assert values[f"hinge@{losses.format_parameter(g)}"] == pytest.approx(
                np.mean(ref_hinge(ys, logits, g)), rel=1e-4, abs=1e-6)
        assert values["feature_norm"] == pytest.approx(np.mean(np.linalg.norm(features, axis=1)), abs=1e-6)
        top = model.get_layer("logits")
        assert values["top_kernel_norm"] == pytest.approx(np.sqrt(np.sum(to_numpy(top.kernel) ** 2.0)), rel=1e-6)
        assert values["top_bias_norm"] == pytest.approx(np.linalg.norm(to_numpy(top.bias)), rel=1e-6, abs=1e-12)
    # The model learned: the error is not that of chance, so the comparison above is not trivial.
    assert tracker.evaluate("train")["error"] < 0.5


@pytest.mark.parametrize("sigma", [0.25, 1.0, 8.0])
def test_gcdf_uses_each_examples_feature_norm(sigma):
    # A top layer on raw inputs (||x|| about 17, one row of zeros): Gcdf with each example's own norm (eq. 6), and
    # for the zero row the limit sigma * ||x|| -> 0, sigma = 0's count of classes beating y (a tie 1/2).
    rng = np.random.default_rng(1)
    x = 7.0 * rng.standard_normal((40, 6)).astype(np.float32)
    x[5] = 0.0
    y = rng.integers(0, 5, 40)
    inputs = keras.Input((6,))
    model = keras.Model(inputs, keras.layers.Dense(5, name="logits")(inputs))
    model.layers[-1].bias.assign(np.array([0.0, 0.0, 1.0, -1.0, 0.0], np.float32))  # ties on the zero row
    tracker = callbacks.AltLossTracker((x, y), sigmas=[sigma], temperatures=[1.0], margins=[1.0], steps_per_epoch=1)
    tracker.set_model(model)
    logits = x.astype(np.float64) @ to_numpy(model.layers[-1].kernel) + to_numpy(model.layers[-1].bias)
    norms = np.linalg.norm(x.astype(np.float64), axis=1)
    expected = ref_gcdf(y, logits, sigma, np.where(norms > 0, norms, 1.0))
    expected[5] = ref_gcdf(y[5:6], logits[5:6], 0.0)[0]
    value = tracker.evaluate("train")[f"gcdf@{losses.format_parameter(sigma)}"]
    assert value == pytest.approx(np.mean(expected), rel=1e-5)
    assert value != pytest.approx(np.mean(ref_gcdf(y, logits, sigma)), rel=1e-2)  # not the ||x|| = 1 value


def test_a_run_of_a_users_own_model_with_config_is_a_run_directory_for_analysis(tmp_path):
    from keras_implicit import analysis

    rng = np.random.default_rng(0)
    x = rng.normal(size=(256, 8)).astype(np.float32)
    y = (x[:, 0] > 0).astype(np.int32) + 2 * (x[:, 1] > 0).astype(np.int32)
    for lr in (0.5, 0.05):
        keras.utils.set_random_seed(0)
        inputs = keras.Input((8,))
        model = keras.Model(inputs, keras.layers.Dense(4, name="logits")(keras.layers.Dense(16, "relu")(inputs)))
        model.compile(keras.optimizers.SGD(lr, momentum=0.9),
                      keras.losses.SparseCategoricalCrossentropy(from_logits=True))
        tracker = callbacks.AltLossTracker((x, y), sigmas=[0.5, 8.0], temperatures=[1.0], margins=[1.0],
                                           metrics_path=str(tmp_path / f"lr{lr}" / "metrics.jsonl"),
                                           config={"lr": lr, "batch_size": 32, "seed": 0})
        model.fit(x, y, batch_size=32, epochs=4, verbose=0, callbacks=[tracker])
    runs = analysis.load_runs([tmp_path])
    assert [r.config for r in runs] == [{"batch_size": 32, "lr": lr, "moving_statistics": None, "seed": 0}
                                        for lr in (0.05, 0.5)]
    fast, slow = analysis.group_runs(runs)
    assert (fast.label, slow.label) == ("lr=0.5", "lr=0.05")
    level = analysis.common_level(runs)
    point = analysis.at_level(runs[1], level)
    assert point.values["ce"] == pytest.approx(level, rel=1e-6)
    with pytest.raises(ValueError, match="beside metrics_path: give metrics_path too"):
        callbacks.AltLossTracker((x, y), config={"lr": 0.1})
    with pytest.raises(ValueError, match="config must hold JSON values"):
        callbacks.AltLossTracker((x, y), metrics_path=str(tmp_path / "m.jsonl"), config={"lr": object()})
    # Without config.json the error says how to get one; two runs with no seed are not averaged as seeds.
    (tmp_path / "lr0.5" / "config.json").unlink()
    with pytest.raises(analysis.RunDirectoryError, match=r"AltLossTracker\(\.\.\., metrics_path=\.\.\., config="):
        analysis.load_run(tmp_path / "lr0.5")
    (tmp_path / "lr0.5" / "config.json").write_text("{}")
    (tmp_path / "lr0.05" / "config.json").write_text("{}")
    with pytest.raises(ValueError, match="have the same settings in their config.json and no seed"):
        analysis.group_runs(analysis.load_runs([tmp_path]))


def test_evaluate_does_not_depend_on_the_batch_size(trained):
    model, x, y = trained
    results = []
    for batch_size in (7, 300, 4096):
        tracker = callbacks.AltLossTracker((x, y), batch_size=batch_size)
        tracker.set_model(model)
        results.append(tracker.evaluate("train"))
    for other in results[1:]:
        for name, value in results[0].items():
            assert other[name] == pytest.approx(value, rel=1e-5, abs=1e-7)


def test_one_forward_pass_per_split(trained, monkeypatch):
    model, x, y = trained
    tracker = callbacks.AltLossTracker((x, y), (x[:50], y[:50]), batch_size=1000)
    tracker.set_model(model)
    tracker.evaluate("train")  # trace
    calls = []
    original = losses.panel_values
    monkeypatch.setattr(losses, "panel_values", lambda *a, **k: calls.append(1) or original(*a, **k))
    tracker._sums_fn = None  # retrace with the counting wrapper: once per trace, not per loss
    tracker.evaluate("train")
    assert calls == [1]


def test_schedules():
    assert callbacks.log_spaced_steps(40) == [1, 2, 3, 4, 6, 8, 11, 16, 23, 32]
    assert callbacks.tracking_steps(10, 30) == [0, 10, 20, 30]
    assert callbacks.tracking_steps(10, 30, track_every=4) == [0, 4, 8, 10, 12, 16, 20, 24, 28, 30]
    assert callbacks.tracking_steps(10, 40, schedule="log") == [0, 1, 2, 3, 4, 6, 8, 10, 11, 16, 20, 30, 40]
    with pytest.raises(ValueError, match="schedule"):
        callbacks.tracking_steps(10, 30, schedule="cosine")
    with pytest.raises(ValueError, match="track_every"):
        callbacks.AltLossTracker((np.zeros((2, 3)), np.zeros(2)), track_every=0)


_SCHEDULES = [
    (None, "epoch", [0, 4, 8]),
    (3, "epoch", [0, 3, 4, 6, 8]),
    (None, "log", [0, 1, 2, 3, 4, 6, 8]),
]


@pytest.fixture(scope="module")
def users_fit(tmp_path_factory):
    """One user's fit with gradient accumulation, watched by one tracker per (track_every, schedule) of
    _SCHEDULES, each with its own metrics file and TensorBoard folder: {(track_every, schedule): (tracker,
    metrics path)}. A tracker only evaluates the model, so each one sees the training it would see alone (the
    same fit three times over, less two compilations of the same model)."""
    rng = np.random.default_rng(1)
    x = rng.random((512, 3, 3, 1)).astype(np.float32)
    y = rng.integers(0, 3, 512).astype(np.int32)
    model = make_model("fc6", (3, 3, 1), 3, seed=1)
    model.compile(keras.optimizers.SGD(0.1, momentum=0.9, gradient_accumulation_steps=2),
                  keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    trackers = {}
    for track_every, schedule, _ in _SCHEDULES:
        folder = tmp_path_factory.mktemp(f"tracker_{track_every}_{schedule}")
        path = folder / "metrics.jsonl"
        tracker = callbacks.AltLossTracker((x, y), (x[:64], y[:64]), metrics_path=str(path),
                                           track_every=track_every, schedule=schedule, log_dir=str(folder / "tb"))
        trackers[track_every, schedule] = (tracker, path)
    # 512 / 32 = 16 micro-batches = 8 optimizer steps per epoch... in 2 epochs of 4 steps each:
    model.fit(x[:256], y[:256], batch_size=32, epochs=2, shuffle=False, verbose=0,
              callbacks=[tracker for tracker, _ in trackers.values()])
    return trackers


@pytest.mark.parametrize("track_every, schedule, expected", _SCHEDULES)
def test_tracker_in_a_users_fit_with_gradient_accumulation(users_fit, track_every, schedule, expected):
    tracker, path = users_fit[track_every, schedule]
    records = [json.loads(line) for line in path.read_text().splitlines()]
    assert [r["step"] for r in records[::2]] == expected
    assert [r["split"] for r in records] == ["train", "test"] * len(expected)
    assert [r["epoch"] for r in records[::2]] == [s / 4 for s in expected]
    assert tracker.records == records


def test_a_users_own_loop_with_due_and_track_gets_the_records_of_fit(tmp_path):
    """A loop of train_on_batch calls, tracked where ``due`` says, writes the records that the same tracker writes
    in ``model.fit`` over the same batches; ``due`` agrees with :func:`callbacks.tracking_steps`."""
    rng = np.random.default_rng(2)
    x = rng.random((192, 3, 3, 1)).astype(np.float32)
    y = rng.integers(0, 3, 192).astype(np.int32)
    steps_per_epoch, epochs, batch = 6, 2, 32
    records = {}
    for how in ("fit", "loop"):
        model = make_model("fc6", (3, 3, 1), 3, seed=4)
        model.compile(keras.optimizers.SGD(0.05, momentum=0.9),
                      keras.losses.SparseCategoricalCrossentropy(from_logits=True))
        tracker = callbacks.AltLossTracker((x, y), (x[:40], y[:40]), metrics_path=str(tmp_path / f"{how}.jsonl"),
                                           track_every=5, schedule="log", steps_per_epoch=steps_per_epoch)
        if how == "fit":
            model.fit(x, y, batch_size=batch, epochs=epochs, shuffle=False, verbose=0, callbacks=[tracker])
        else:
            tracker.set_model(model)
            total = epochs * steps_per_epoch
            due = []
            for step in range(total + 1):
                if tracker.due(step):
                    due.append(step)
                    tracker.track(step)
                    assert not tracker.due(step)  # tracked now
                if step < total:
                    start = batch * (step % steps_per_epoch)
                    model.train_on_batch(x[start:start + batch], y[start:start + batch])
            tracker.close()
            assert due == callbacks.tracking_steps(steps_per_epoch, total, track_every=5, schedule="log")
        records[how] = [json.loads(line) for line in (tmp_path / f"{how}.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records["loop"][::2]] == [0, 1, 2, 3, 4, 5, 6, 8, 10, 11, 12]
    assert [(r["step"], r["split"]) for r in records["loop"]] == [(r["step"], r["split"]) for r in records["fit"]]
    for mine, theirs in zip(records["loop"], records["fit"]):
        assert set(mine) == set(theirs)
        for name in mine:
            if isinstance(mine[name], str):  # "split": pytest.approx takes numbers only (pytest >= 9)
                assert mine[name] == theirs[name], (mine["step"], name)
            else:
                assert mine[name] == pytest.approx(theirs[name], rel=1e-5, abs=1e-7), (mine["step"], name)


def test_tensorboard_scalars_and_custom_scalars_layout(tmp_path, trained):
    model, x, y = trained
    from tensorboard.backend.event_processing import event_accumulator
    from tensorboard.plugins.custom_scalar import layout_pb2, metadata

    tracker = callbacks.AltLossTracker((x, y), (x[:50], y[:50]), SIGMAS, TEMPERATURES, MARGINS,
                                       log_dir=str(tmp_path), steps_per_epoch=10, buffer_summaries=True)
    tracker.set_model(model)
    tracker.track(0)
    tracker.track(7)
    assert not any(name.startswith("events") for name in os.listdir(tmp_path))  # buffered until flushed
    tracker.close()
    accumulator = event_accumulator.EventAccumulator(str(tmp_path), size_guidance={"tensors": 0})
    accumulator.Reload()
    # tf.summary (TensorFlow) writes tensor summaries, tensorboardX (other backends) simple scalars.
    tags = set(accumulator.Tags()["tensors"]) | set(accumulator.Tags()["scalars"])
    names = ["ce", "error", *losses.panel_names(SIGMAS, TEMPERATURES, MARGINS), "feature_norm", "top_kernel_norm",
             "top_bias_norm"]
    assert {f"{split}/{name}" for split in ("train", "test") for name in names} <= tags
    if "train/gcdf@1" in accumulator.Tags()["tensors"]:
        events = [(e.step, float(make_ndarray(e.tensor_proto))) for e in accumulator.Tensors("train/gcdf@1")]
    else:
        events = [(e.step, e.value) for e in accumulator.Scalars("train/gcdf@1")]
    assert [step for step, _ in events] == [0, 7]
    assert events[0][1] == pytest.approx(tracker.records[0]["gcdf@1"], rel=1e-6)

    layout = layout_pb2.Layout()
    layout.ParseFromString(make_ndarray(accumulator.Tensors(metadata.CONFIG_SUMMARY_TAG)[0].tensor_proto).item())
    charts = {chart.title: list(chart.multiline.tag) for category in layout.category for chart in category.chart}
    import re

    for split in ("train", "test"):
        for family, parameters in (("gcdf", SIGMAS), ("tce", TEMPERATURES), ("hinge", MARGINS)):
            (title,) = [t for t in charts if charts[t] == [rf"^{split}/{family}@.*"]]
            assert title.startswith(f"{split}: ")
            matched = [tag for tag in tags if re.match(charts[title][0], tag)]
            assert sorted(matched) == sorted(f"{split}/{family}@{losses.format_parameter(p)}" for p in parameters)


def test_divergence_is_detected_and_not_logged(tmp_path, trained):
    model, x, y = trained
    tracker = callbacks.AltLossTracker((x, y), metrics_path=str(tmp_path / "m.jsonl"), steps_per_epoch=10)
    clone = keras.models.clone_model(model)
    clone.set_weights([np.full_like(w, np.nan) if i == 0 else w for i, w in enumerate(model.get_weights())])
    clone.compile(keras.optimizers.SGD(0.1), "sparse_categorical_crossentropy")
    tracker.set_model(clone)
    assert tracker.track(5) == []
    assert "non-finite train ce" in tracker.diverged and "step 5" in tracker.diverged
    assert clone.stop_training
    assert not (tmp_path / "m.jsonl").exists()

    monitor = callbacks.DivergenceMonitor()
    monitor.set_model(clone)
    monitor.on_train_batch_end(0, {"loss": 0.3})
    assert monitor.diverged is None
    monitor.on_train_batch_end(1, {"loss": float("inf")})
    assert "inf" in monitor.diverged


def test_target_train_loss_stops_training(trained):
    model, x, y = trained
    ce = callbacks.AltLossTracker((x, y), steps_per_epoch=1)
    ce.set_model(model)
    value = ce.evaluate("train")["ce"]
    above = callbacks.AltLossTracker((x, y), steps_per_epoch=1, target_train_loss=value * 0.99)
    above.set_model(model)
    model.stop_training = False
    above.track(0)
    assert not above.target_reached and not model.stop_training
    below = callbacks.AltLossTracker((x, y), steps_per_epoch=1, target_train_loss=value * 1.01)
    below.set_model(model)
    below.track(0)
    assert below.target_reached and model.stop_training
    model.stop_training = False


def test_default_grids_are_the_metrics_defaults():
    tracker = callbacks.AltLossTracker((np.zeros((2, 3)), np.zeros(2)))
    assert tracker.panel_names == losses.panel_names(metrics.DEFAULT_SIGMAS, metrics.DEFAULT_TEMPERATURES,
                                                     metrics.DEFAULT_MARGINS, error=True)
    assert math.isclose(len(tracker.metric_names), len(tracker.panel_names) + 4)


def test_bad_data_is_refused():
    with pytest.raises(ValueError, match="pair"):
        callbacks.AltLossTracker(np.zeros((3, 3)))
    with pytest.raises(ValueError, match="same, non-zero number"):
        callbacks.AltLossTracker((np.zeros((2, 3)), np.zeros(3)))
    with pytest.raises(ValueError, match=r"train_data: y must be integer labels \[n\] or \[n, 1\], or one-hot"):
        callbacks.AltLossTracker((np.zeros((2, 3)), np.zeros((2, 3, 1))))
    with pytest.raises(ValueError, match="test_data: float labels must be whole numbers"):
        callbacks.AltLossTracker((np.zeros((2, 3)), np.zeros(2)), (np.zeros((2, 3)), np.array([0.5, 1.0])))
    with pytest.raises(ValueError, match="one-hot rows must hold one 1 among zeros, but 1 of 2 do not"):
        callbacks.AltLossTracker((np.zeros((2, 3)), np.array([[0.0, 1.0], [0.1, 0.9]])))


def test_labels_in_every_format_give_the_same_values(trained):
    model, x, y = trained
    results = []
    for labels in (y, y[:, None], np.eye(4, dtype=np.float32)[y], y.astype(np.float64), keras.ops.convert_to_tensor(y)):
        tracker = callbacks.AltLossTracker((x, labels), batch_size=128)
        tracker.set_model(model)
        results.append(tracker.evaluate("train"))
    assert all(other == results[0] for other in results[1:])


def test_a_model_that_does_not_output_logits_is_refused():
    inputs = keras.Input((3,))
    model = keras.Model(inputs, keras.layers.Dense(4, activation="softmax")(inputs))
    tracker = callbacks.AltLossTracker((np.zeros((2, 3)), np.zeros(2)))
    tracker.set_model(model)
    with pytest.raises(ValueError, match="has activation 'softmax': the losses are computed from logits"):
        tracker.evaluate("train")


# --------------------------------------------------------------------------- #
# track_levels: dense points only near the ladder's levels
# --------------------------------------------------------------------------- #
def test_near_a_level_follows_the_lower_signal_and_closes_settled_levels():
    rng = np.random.default_rng(0)
    tracker = callbacks.AltLossTracker((rng.random((8, 3)), np.zeros(8, np.int32)), track_every=2,
                                       track_levels=[1.0, 0.1], level_window=1.5, steps_per_epoch=10)
    assert tracker.near_a_level()  # no signal yet
    tracker.observe_loss(3.0)
    assert not tracker.near_a_level()  # 3 > 1.5 * 1
    tracker.observe_loss(-15.0)  # the average moves by a tenth of the difference: 3 + 0.1 * (-15 - 3) = 1.2
    assert tracker._loss_estimate == pytest.approx(1.2) and tracker.near_a_level()
    tracker.observe_loss(float("nan"))  # ignored
    assert tracker._loss_estimate == pytest.approx(1.2)
    for _ in range(200):
        tracker.observe_loss(0.3)  # below level 1: open (no tracked point at or below it yet), so still due
    assert tracker.near_a_level()
    tracker._note_train_ce(0.9)
    tracker._note_train_ce(1.1)  # back above: the count starts again
    assert tracker.trigger_state() == (1.1, (0, 0))
    for ce in (0.9, 0.8, 0.95):
        tracker._note_train_ce(ce)
    assert tracker.trigger_state() == (0.95, (3, 0))  # level 1 closed: 3 points in a row at or below it
    assert not tracker.near_a_level()  # 0.3 > 1.5 * 0.1, and level 1 is closed
    tracker._note_train_ce(1.2)
    assert tracker.trigger_state() == (1.2, (3, 0))  # a closed level stays closed
    tracker.start_epoch()  # forgets the running loss, keeps the tracked CE: 1.2 > 0.15
    assert not tracker.near_a_level()
    tracker._note_train_ce(0.14)
    assert tracker.near_a_level()  # the tracked CE alone: 0.14 <= 0.15
    tracker.observe_loss(0.5)
    assert tracker.near_a_level()  # the lower of the two signals
    assert callbacks.AltLossTracker((np.ones((2, 3)), [0, 1]), track_every=5).near_a_level()  # no levels: always


@pytest.mark.parametrize("ces, state", [
    ([], (None, (0, 0, 0))),
    ([2.0, 0.9, 0.4, 0.45, 0.3, 0.6], (0.6, (3, 3, 0))),
    ([0.9, 0.8, 1.1, 0.9, 0.45], (0.45, (2, 1, 0))),
    ([0.4, 0.4, 0.6, 0.4, 0.29, 0.2], (0.2, (3, 3, 2))),
])
def test_level_trigger_state_counts_points_in_a_row_and_closes_at_three(ces, state):
    levels = (1.0, 0.5, 0.3)
    assert config.level_trigger_state(ces, levels) == state
    assert config.LEVEL_SETTLE_POINTS == 3
    half = len(ces) // 2  # replayed in two parts (a resume) from the first part's state
    assert config.level_trigger_state(ces[half:], levels, config.level_trigger_state(ces[:half], levels)) == state
    tracker = callbacks.AltLossTracker((np.ones((2, 3)), [0, 1]), track_every=1, track_levels=levels)
    tracker.restore_trigger(state)
    assert tracker.trigger_state() == state
    with pytest.raises(ValueError, match="for 2 levels"):
        tracker.restore_trigger((1.0, (0, 0)))


@pytest.mark.parametrize("levels, every, window, message", [
    ([1.0], None, 1.4, "give track_every too"),
    ([0.0], 3, 1.4, "finite training losses > 0"),
    ([], 3, 1.4, "finite training losses > 0"),
    (["x"], 3, 1.4, "a list of numbers"),
    ([1.0], 3, 1.0, "level_window must be a number > 1"),
])
def test_bad_track_levels_are_refused(levels, every, window, message):
    with pytest.raises(ValueError, match=message):
        callbacks.AltLossTracker((np.ones((2, 3)), [0, 1]), track_every=every, track_levels=levels,
                                 level_window=window)


class _BatchLosses(keras.callbacks.Callback):
    """Keras' logged epoch means after every batch, and the optimizer step, for an independent replay."""

    def __init__(self):
        super().__init__()
        self.epochs = []

    def on_epoch_begin(self, epoch, logs=None):
        self.epochs.append([])

    def on_train_batch_end(self, batch, logs=None):
        self.epochs[-1].append((int(np.asarray(self.model.optimizer.iterations)), float(logs["loss"])))


@pytest.mark.parametrize("levels", [(1.0, 0.5), (0.8,)])
def test_fit_tracks_every_step_only_near_the_levels_as_replayed_from_the_batch_losses(levels):
    """The steps tracked in model.fit are the epoch ends plus the track_every steps at which an independent
    replay of the rule (batch losses from Keras' logged means, an exponential average per epoch, the band)
    says a level is near; and fewer than dense tracking's."""
    rng = np.random.default_rng(3)
    x = rng.random((400, 5, 5, 1)).astype(np.float32)
    y = (np.arange(400) % 4).astype(np.int32)
    x[np.arange(400), y, y, 0] += 1.5
    model = make_model("fc6", (5, 5, 1), 4, seed=1)
    model.compile(keras.optimizers.SGD(0.1, momentum=0.9),
                  keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    window = 1.3
    tracker = callbacks.AltLossTracker((x, y), None, track_every=1, track_levels=levels, level_window=window)
    replay = _BatchLosses()
    model.fit(x, y, batch_size=20, epochs=3, shuffle=False, verbose=0, callbacks=[replay, tracker])
    # The rule replayed: the running average of the batch losses (per epoch), the tracked training CEs so far
    # (read from the tracker's records at the steps the replay expects: a missing one fails the lookup), the
    # points in a row at or below each level (3 close it), and the band's upper edge.
    train_ce = {r["step"]: r["ce"] for r in tracker.records if r["split"] == "train"}
    expected, last_ce, counts = [0], train_ce[0], [0] * len(levels)

    def tracked(step):
        nonlocal last_ce
        expected.append(step)
        last_ce = train_ce[step]
        for k, level in enumerate(levels):
            if counts[k] < 3:
                counts[k] = counts[k] + 1 if last_ce <= level else 0

    for level_index, level in enumerate(levels):  # the step-0 point
        counts[level_index] = 1 if last_ce <= level else 0
    for epoch in replay.epochs:
        average, previous = None, None
        for batch, (step, mean) in enumerate(epoch):
            loss = mean if previous is None else (batch + 1) * mean - batch * previous
            previous = mean
            average = loss if average is None else average + 0.1 * (loss - average)
            signal = min(average, last_ce)
            if any(count < 3 and signal <= level * window for count, level in zip(counts, levels)):
                tracked(step)
            elif batch == len(epoch) - 1:
                tracked(step)  # the epoch's end
    steps = [r["step"] for r in tracker.records]
    assert steps == expected
    assert 3 < len(steps) < 60  # some steps near a level, not all 60
