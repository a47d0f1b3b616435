"""keras_implicit.training: ghost batches, epochs, run directories, resume, divergence, target loss, locks."""

import dataclasses
import io
import json
import math
import os
import shutil

import keras
import numpy as np
import pytest
import tensorflow as tf

from keras_implicit import config, training
from keras_implicit import data as ki_data
from keras_implicit.training import RunConfig, RunDirectory, RunError, RunLockedError
from tests.runs import tensorboard_points

CONTRACT_FLAGS = {"model", "dataset", "lr", "batch_size", "ghost_batch_size", "epochs", "seed", "optimizer", "loss",
                  "train_subset", "track_every", "target_train_loss", "data_dir"}


def write_idx_fixture(directory, n_train=600, n_test=200, side=12, seed=0):
    """Four gzipped IDX files of a learnable 10-class problem: a class-specific blob plus noise."""
    rng = np.random.default_rng(seed)
    prototypes = rng.uniform(0, 255, size=(10, side, side))
    for split, count in (("train", n_train), ("test", n_test)):
        labels = (np.arange(count) % 10).astype(np.uint8)
        rng.shuffle(labels)
        images = np.clip(prototypes[labels] + rng.normal(0, 60, (count, side, side)), 0, 255).astype(np.uint8)
        images_name, labels_name = ki_data.IDX_FILES[split]
        ki_data.write_idx(os.path.join(directory, images_name + ".gz"), images)
        ki_data.write_idx(os.path.join(directory, labels_name + ".gz"), labels)
    return str(directory)


@pytest.fixture(scope="module")
def idx_dir(tmp_path_factory):
    return write_idx_fixture(tmp_path_factory.mktemp("idx"))


def small_config(idx_dir, **overrides):
    settings = dict(dataset="mnist", data_dir=idx_dir, epochs=2, batch_size=64, ghost_batch_size=64, lr=0.1)
    settings.update(overrides)
    return RunConfig(**settings)


def read_metrics(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl")) as handle:
        return [json.loads(line) for line in handle]


# --------------------------------------------------------------------------- #
# Epochs and batches (ghost batches: tests/test_ghost.py)
# --------------------------------------------------------------------------- #
def test_epoch_order_uses_whole_batches_reproducibly():
    first = training.epoch_order(1000, 256, seed=3, epoch=0)
    assert len(first) == 768 and len(set(first.tolist())) == 768 and first.max() < 1000
    np.testing.assert_array_equal(first, training.epoch_order(1000, 256, seed=3, epoch=0))
    assert not np.array_equal(first, training.epoch_order(1000, 256, seed=3, epoch=1))
    assert not np.array_equal(first, training.epoch_order(1000, 256, seed=4, epoch=0))
    # Over epochs every example is used (different ones are left out each time).
    used = set(np.concatenate([training.epoch_order(1000, 256, 3, e) for e in range(10)]).tolist())
    assert used == set(range(1000))


def test_epoch_batches_are_whole_batches_of_the_epoch_order():
    x = tf.constant(np.arange(100, dtype=np.float32)[:, None] * np.ones((1, 3), np.float32))
    y = tf.constant(np.arange(100, dtype=np.int32))
    batches = list(training.epoch_batches(x, y, batch_size=40, seed=0, epoch=2))
    assert [len(b[1]) for b in batches] == [40, 40]
    order = training.epoch_order(100, 40, 0, 2)
    np.testing.assert_array_equal(np.concatenate([b[1].numpy() for b in batches]), order)
    np.testing.assert_array_equal(batches[0][0].numpy()[:, 0], order[:40].astype(np.float32))
    skipped = list(training.epoch_batches(x, y, batch_size=40, seed=0, epoch=2, skip_steps=1))
    np.testing.assert_array_equal(skipped[0][1].numpy(), order[40:])


# --------------------------------------------------------------------------- #
# Configuration
# --------------------------------------------------------------------------- #
@pytest.mark.parametrize("overrides, message", [
    ({"model": "resnet"}, "unknown model"),
    ({"dataset": "imagenet"}, "unknown dataset"),
    ({"optimizer": "rmsprop"}, "unknown optimizer"),
    ({"loss": "mse"}, "unknown loss"),
    ({"loss": "gcdf@x"}, "not a number"),
    ({"loss": "gcdf@0"}, "> 0"),
    ({"loss": "hinge@-1"}, ">= 0"),
    ({"batch_size": 300, "ghost_batch_size": 256}, "not a multiple"),
    ({"lr": 0.0}, "learning rate"),
    ({"lr": -0.1}, "learning rate"),
    ({"lr": float("nan")}, "learning rate"),
    ({"epochs": 0}, "epochs"),
    ({"track_schedule": "linear"}, "tracking schedule"),
    ({"track_every": 0}, "track_every"),
    ({"target_train_loss": -1.0}, "target_train_loss"),
    ({"train_subset": 100}, "smaller than one batch"),
    ({"train_subset": 100000}, r"larger than fashion_mnist's training set \(60000 examples\) \(train_subset must be "
                               r"from 256 to 60000 for fashion_mnist with batch_size 256\)"),
    ({"train_subset": 50001, "dataset": "cifar10"}, "must be from 256 to 50000"),
    # MNIST's classes are uneven: its class 5 (5421 examples) caps a balanced subset at 54215.
    ({"train_subset": 54216, "dataset": "mnist"}, "largest class-balanced subset of mnist's training set "
                                                  r"\(54215 of its 60000 examples: its smallest class, 5, has 5421\)"),
    ({"train_subset": 9, "batch_size": 8, "ghost_batch_size": 8}, r"smaller than the number of classes \(10\).*"
                                                                  "must be from 10 to 60000"),
    ({"batch_size": 65536}, r"batch_size 65536 is larger than fashion_mnist's training set \(60000 examples\)"),
    ({"seed": -1}, r"seed must be an integer from 0 to 4294967295 .*got -1"),
    ({"seed": 2 ** 32}, "got 4294967296"),
    ({"seed": 1.5}, "seed must be an integer"),
    ({"data_dir": "/nonexistent/data"}, "data_dir /nonexistent/data does not exist"),
    ({"strategy": "horovod"}, "unknown strategy"),
    ({"cpu_replicas": 2}, "for strategy 'mirrored' or 'data-parallel' only"),
    ({"cpu_replicas": 0, "strategy": "mirrored"}, "cpu_replicas must be a positive integer"),
    ({"cpu_replicas": 2, "strategy": "mirrored"}, "multiple of replicas x ghost_batch_size = 512"),
    ({"strategy": "multiworker"}, "needs TF_CONFIG"),
    ({"strategy": "data-parallel", "cpu_replicas": 3}, "splits each micro-batch of 256 over the 3 devices"),
    ({"noisy_error_draws": 1}, "noisy_error_draws must be 0"),
    ({"noisy_error_draws": -4}, "noisy_error_draws must be 0"),
    ({"moving_statistics": "last"}, "unknown moving_statistics 'last': choose one of sequential, mean"),
])
def test_bad_settings_are_refused_with_a_clear_message(overrides, message):
    with pytest.raises(ValueError, match=message):
        RunConfig(**overrides).validate()


@pytest.mark.parametrize("overrides", [
    {"seed": 0}, {"seed": 2 ** 32 - 1}, {"train_subset": 60000}, {"dataset": "mnist", "train_subset": 54215},
    {"dataset": "cifar10", "train_subset": 50000}, {"train_subset": 10, "batch_size": 10, "ghost_batch_size": 10},
])
def test_the_limits_themselves_are_accepted(overrides):
    RunConfig(**overrides).validate()


def test_the_subset_limits_are_class_balanced_subset_s_own():
    # What validate() checks without data is what class_balanced_subset takes from labels with those counts.
    for name, counts in training.TRAIN_CLASS_COUNTS.items():
        labels = np.repeat(np.arange(len(counts)), counts)
        low, high = ki_data.balanced_subset_range(counts)
        assert ki_data.NUM_CLASSES[name] == len(counts) == low and name in training.DATASETS
        assert len(ki_data.class_balanced_subset(labels, high, len(counts))) == high
        assert len(ki_data.class_balanced_subset(labels, low, len(counts))) == low
        with pytest.raises(ValueError):
            ki_data.class_balanced_subset(labels, high + 1, len(counts))
        with pytest.raises(ValueError):
            ki_data.class_balanced_subset(labels, low - 1, len(counts))
        RunConfig(dataset=name, train_subset=high).validate()
        with pytest.raises(ValueError, match=f"must be from 256 to {high} for {name}"):
            RunConfig(dataset=name, train_subset=high + 1).validate()
    assert sum(training.TRAIN_CLASS_COUNTS["mnist"]) == 60000


def test_epoch_text():
    assert [training._epoch_text(step, 78) for step in (0, 60, 78, 156, 200)] == ["0", "0.77", "1", "2", "2.56"]
    assert training._epoch_text(7799, 7800) == "0.999872"  # not "1.00": that reads as a whole epoch


def test_parse_and_make_loss():
    assert training.parse_loss("ce") == ("ce", None)
    assert training.parse_loss("tce@2") == ("tce", 2.0)
    assert training.parse_loss("hinge@0") == ("hinge", 0.0)
    from keras_implicit import losses

    assert isinstance(training.make_loss("gcdf@0.5"), losses.Gcdf)
    assert training.make_loss("gcdf@0.5").get_config()["sigma"] == 0.5
    assert isinstance(training.make_loss("tce@4"), losses.TemperedCrossentropy)
    assert isinstance(training.make_loss("hinge@1"), losses.MulticlassHinge)
    optimizer = training.make_optimizer("sgd", 0.3)
    assert math.isclose(optimizer.momentum, 0.9) and optimizer.gradient_accumulation_steps is None
    assert math.isclose(float(np.asarray(optimizer.learning_rate)), 0.3, rel_tol=1e-7)


def test_default_run_name():
    assert training.default_run_name(RunConfig()) == "fashion_mnist-fc6-ce-sgd-lr0.1-b256-s0"
    name = training.default_run_name(RunConfig(batch_size=16384, lr=0.001, loss="gcdf@0.5", train_subset=5000))
    assert name == "fashion_mnist-fc6-gcdf0.5-sgd-lr0.001-b16384-n5000-s0"
    # The moving statistics' "mean" updates show where they differ from sequential ones (several micro-batches).
    assert training.default_run_name(RunConfig(batch_size=16384, moving_statistics="mean")) == (
        "fashion_mnist-fc6-ce-sgd-lr0.1-b16384-bnmean-s0")
    assert training.default_run_name(RunConfig(moving_statistics="mean")) == "fashion_mnist-fc6-ce-sgd-lr0.1-b256-s0"
    assert training.default_run_name(RunConfig(batch_size=16384, gradient_penalty=0.025)) == (
        "fashion_mnist-fc6-ce-sgd-lr0.1-b16384-gp0.025-s0")
    assert training.default_run_name(RunConfig(batch_size=16384, sam_radius=0.05, loss="ce+0.1*trh")) == (
        "fashion_mnist-fc6-ce+0.1xtrh-sgd-lr0.1-b16384-sam0.05-s0")


# --------------------------------------------------------------------------- #
# Runs
# --------------------------------------------------------------------------- #
def test_train_writes_the_run_directory(idx_dir, tmp_path):
    run_dir = str(tmp_path / "run")
    config = small_config(idx_dir, track_every=3)
    result = training.train(config, run_dir, progress=False, verbose=False)
    assert result.state == "finished" and result.epoch == 2 and result.step == 2 * (600 // 64)

    stored = json.load(open(os.path.join(run_dir, "config.json")))
    assert CONTRACT_FLAGS <= set(stored)
    assert stored["lr"] == 0.1 and stored["data_dir"] == idx_dir and stored["track_every"] == 3
    from keras_implicit import metrics

    assert stored["sigmas"] == list(metrics.DEFAULT_SIGMAS)
    assert stored["temperatures"] == list(metrics.DEFAULT_TEMPERATURES)
    assert stored["margins"] == list(metrics.DEFAULT_MARGINS)
    assert set(stored["versions"]) == {"python", "keras", "backend", "tensorflow", "numpy", "keras_implicit"}
    assert stored["versions"]["backend"] == "tensorflow"
    assert "git_commit" in stored
    assert stored["data"] == {"source": os.path.abspath(idx_dir), "train_examples": 600, "test_examples": 200}
    assert json.load(open(os.path.join(run_dir, "status.json"))) == {
        "state": "finished", "epoch": 2, "step": 18, "message": "2 epochs"}

    records = read_metrics(run_dir)
    steps_per_epoch = 600 // 64
    expected_steps = sorted(set(range(0, 19, 3)) | {0, 9, 18})
    assert [r["step"] for r in records] == [s for s in expected_steps for _ in ("train", "test")]
    assert [r["split"] for r in records] == ["train", "test"] * len(expected_steps)
    from keras_implicit import losses

    names = losses.panel_names(metrics.DEFAULT_SIGMAS, metrics.DEFAULT_TEMPERATURES, metrics.DEFAULT_MARGINS)
    for record in records:
        assert record["epoch"] == pytest.approx(record["step"] / steps_per_epoch)
        assert set(record) == {"epoch", "step", "split", "ce", "error", *names, "feature_norm", "top_kernel_norm",
                               "top_bias_norm"}
        assert record["feature_norm"] == pytest.approx(1.0, abs=1e-5)
        assert record["tce@1"] == pytest.approx(record["ce"], rel=1e-5)
    # Training on a learnable problem lowers the training CE.
    assert records[-2]["ce"] < records[0]["ce"] - 0.3
    assert os.path.isfile(os.path.join(run_dir, "checkpoint.npz"))
    assert any(name.startswith("events.out.tfevents") for name in os.listdir(os.path.join(run_dir, "tb")))


def copy_run(source, tmp_path):
    """A copy of the run directory ``source`` (a module fixture's) for one test to continue or damage."""
    run_dir = str(tmp_path / "run")
    shutil.copytree(source, run_dir)
    return run_dir


@pytest.fixture(scope="module")
def one_epoch(idx_dir, tmp_path_factory):
    """A finished run of small_config(idx_dir, epochs=1): (config, its directory). The tests that continue,
    replace or damage such a run take a copy (copy_run) instead of training the same run again each."""
    config = small_config(idx_dir, epochs=1)
    run_dir = str(tmp_path_factory.mktemp("one_epoch") / "run")
    training.train(config, run_dir, progress=False, verbose=False)
    return config, run_dir


def test_rerunning_a_finished_run_does_nothing(one_epoch, tmp_path):
    config, source = one_epoch
    run_dir = copy_run(source, tmp_path)
    before = open(os.path.join(run_dir, "metrics.jsonl")).read()
    again = training.train(config, run_dir, progress=False, verbose=False)
    assert again.state == "already-finished" and "nothing to do" in again.message
    assert open(os.path.join(run_dir, "metrics.jsonl")).read() == before


def test_another_config_is_refused_unless_overwrite(idx_dir, one_epoch, tmp_path):
    run_dir = copy_run(one_epoch[1], tmp_path)  # a finished run of small_config(idx_dir, epochs=1)
    with pytest.raises(RunError, match=r"another run \(lr: 0.1 there, 0.2 asked\)"):
        training.train(small_config(idx_dir, epochs=1, lr=0.2), run_dir, progress=False, verbose=False)
    result = training.train(small_config(idx_dir, epochs=1, lr=0.2), run_dir, overwrite=True, progress=False,
                            verbose=False)
    assert result.state == "finished"
    assert json.load(open(os.path.join(run_dir, "config.json")))["lr"] == 0.2
    assert len(read_metrics(run_dir)) == 4  # steps 0 and 9, train and test: nothing left from the first run


def test_more_epochs_or_a_lower_target_continue_a_finished_run(idx_dir, tmp_path):
    base = small_config(idx_dir, epochs=4, track_every=2, deterministic=True)
    whole = str(tmp_path / "whole")
    training.train(dataclass_replace(base, target_train_loss=1.0), whole, progress=False, verbose=False)
    expected = read_metrics(whole)
    assert [r["ce"] for r in expected if r["split"] == "train"][-1] < 1.0

    run_dir = str(tmp_path / "run")
    first = training.train(dataclass_replace(base, epochs=1), run_dir, progress=False, verbose=False)
    assert first.state == "finished" and first.step == 9
    # A target reached inside an epoch: the run stops there, at a step that is not an epoch's end, and says so.
    lines = io.StringIO()
    second = training.train(dataclass_replace(base, target_train_loss=2.05), run_dir, progress=False, stream=lines)
    assert second.state == "finished" and "target train loss 2.05 reached" in second.message
    assert second.step % 9 != 0  # inside epoch 2: the third call finishes that epoch's remaining batches
    fraction = f"{second.step / 9:.2f}"
    assert lines.getvalue().splitlines()[-1].startswith(f"epoch {fraction}/4 | step {second.step} | train ce ")
    assert second.message == f"target train loss 2.05 reached at step {second.step} (epoch {fraction})"
    # It has trained 1.xx epochs: a cap of 1 is refused, a cap of 2 is "as if started with it" (nothing to train).
    with pytest.raises(RunError, match=rf"has trained {fraction} epochs \(step {second.step}\), more than the 1 "
                                       "asked.*ask for epochs=2 or more"):
        training.train(dataclass_replace(base, target_train_loss=2.05, epochs=1), run_dir, progress=False,
                       verbose=False)
    lines = io.StringIO()
    capped = training.train(dataclass_replace(base, target_train_loss=2.05, epochs=2), run_dir, progress=False,
                            stream=lines)
    assert capped.state == "finished" and capped.step == second.step and capped.message == second.message
    assert lines.getvalue().splitlines() == [
        f"{run_dir}: now with epochs 2 (was 4); nothing left to train at epoch {fraction} (step {second.step}): "
        f"target train loss 2.05 reached at step {second.step}"]
    lines = io.StringIO()
    third = training.train(dataclass_replace(base, target_train_loss=1.0), run_dir, progress=False, stream=lines)
    assert third.state == "finished"
    assert lines.getvalue().splitlines()[:2] == [
        f"{run_dir}: continuing with epochs 4 (was 2), target_train_loss 1.0 (was 2.05)",
        f"resuming {run_dir} from epoch {fraction} (step {second.step})"]
    assert read_metrics(run_dir) == expected
    stored = json.load(open(os.path.join(run_dir, "config.json")))
    assert (stored["epochs"], stored["target_train_loss"]) == (4, 1.0)


def test_stored_differences_are_what_train_would_continue_or_refuse(one_epoch, tmp_path):
    config, run_dir = one_epoch
    assert training.stored_differences(run_dir, config) == {}
    assert training.stored_differences(run_dir, dataclass_replace(config, epochs=3, lr=0.05)) == {
        "lr": (0.1, 0.05), "epochs": (1, 3)}
    assert training.stored_differences(tmp_path / "nothing", config) is None
    (tmp_path / "config.json").write_text("{torn")
    assert training.stored_differences(tmp_path, config) is None


def test_the_data_dir_is_compared_by_the_directory_it_reads(idx_dir, one_epoch, tmp_path, monkeypatch):
    # The finished run read idx_dir, named as data_dir. Leaving data_dir out reads the dataset's system
    # directory: the same run where that is idx_dir (as /usr/share/datasets/fashion-mnist for fashion_mnist).
    config, source = one_epoch
    run_dir = copy_run(source, tmp_path)
    other = tmp_path / "other"
    other.mkdir()
    without = dataclass_replace(config, data_dir=None)
    monkeypatch.setitem(ki_data.SYSTEM_DIRS, "mnist", (str(other),))
    assert training.stored_differences(run_dir, without) == {"data_dir": (os.path.realpath(idx_dir), str(other))}
    with pytest.raises(RunError, match=rf"holds another run \(data_dir: '{idx_dir}' there, '{other}' asked\)"):
        training.train(without, run_dir, progress=False, verbose=False)
    monkeypatch.setitem(ki_data.SYSTEM_DIRS, "mnist", (str(other / "missing"), os.path.join(idx_dir, ".")))
    assert training.stored_differences(run_dir, without) == {}
    assert training.train(without, run_dir, progress=False, verbose=False).state == "already-finished"
    assert training.stored_differences(run_dir, dataclass_replace(config, data_dir=os.path.join(idx_dir, "."))) == {}


def test_moving_statistics_define_a_run_of_several_micro_batches(idx_dir, one_epoch, tmp_path):
    config = small_config(idx_dir, epochs=1, batch_size=128, moving_statistics="mean")
    run_dir = str(tmp_path / "run")
    assert training.train(config, run_dir, progress=False, verbose=False).state == "finished"
    path = os.path.join(run_dir, "config.json")
    assert json.load(open(path))["moving_statistics"] == "mean"
    sequential = dataclass_replace(config, moving_statistics="sequential", epochs=2)
    with pytest.raises(training.RunError, match=r"holds another run \(.*moving_statistics: 'mean' there, "
                                                r"'sequential' asked"):
        training.train(sequential, run_dir, progress=False, verbose=False)
    # A config.json from before the setting existed: those runs took one update per step ("mean").
    stored = json.load(open(path))
    del stored["moving_statistics"]
    with open(path, "w") as handle:
        json.dump(stored, handle)
    assert training.stored_differences(run_dir, config) == {}
    assert training.stored_differences(run_dir, sequential) == {"moving_statistics": ("mean", "sequential"),
                                                                "epochs": (1, 2)}
    assert training.train(dataclass_replace(config, epochs=2), run_dir, progress=False, verbose=False).epoch == 2
    # With one micro-batch per step the two are the same run: either resumes it.
    one_config, one_dir = one_epoch
    assert training.stored_differences(one_dir, dataclass_replace(one_config, moving_statistics="mean")) == {}


def test_a_resume_on_other_data_than_recorded_warns(idx_dir, two_epochs, tmp_path, capsys):
    run_dir = copy_run(two_epochs, tmp_path)
    path = os.path.join(run_dir, "config.json")
    stored = json.load(open(path))
    recorded = {**stored["data"], "source": "/elsewhere/mnist"}
    with open(path, "w") as handle:
        json.dump({**stored, "data": recorded}, handle)
    capsys.readouterr()
    result = training.train(resume_config(idx_dir), run_dir, progress=False, verbose=False)
    assert result.state == "finished" and result.epoch == 3
    assert warning_lines(capsys.readouterr()) == [
        f"warning: {run_dir} was started on 600 training and 200 test examples from /elsewhere/mnist; this process "
        f"loaded 600 training and 200 test examples from {os.path.abspath(idx_dir)}: the run goes on with these "
        "data (config.json keeps the first)"]
    assert json.load(open(path))["data"] == recorded


def test_fewer_epochs_than_trained_are_refused_and_nothing_changes(idx_dir, two_epochs, tmp_path):
    run_dir = copy_run(two_epochs, tmp_path)  # resume_config with 2 epochs, finished: 18 steps of 9 per epoch
    before = {name: open(os.path.join(run_dir, name), "rb").read()
              for name in ("config.json", "status.json", "metrics.jsonl", "checkpoint.npz")}
    with pytest.raises(RunError) as raised:
        training.train(dataclass_replace(resume_config(idx_dir), epochs=1), run_dir, progress=False, verbose=False)
    assert str(raised.value) == (
        f"{run_dir} has trained 2 epochs (step 18), more than the 1 asked: a run cannot be cut back to fewer epochs "
        "(its checkpoint and metrics.jsonl hold every step trained); ask for epochs=2 or more (the earlier epochs' "
        "points are in its metrics.jsonl), or use overwrite=True to start again or another run_dir")
    for name, content in before.items():
        assert open(os.path.join(run_dir, name), "rb").read() == content, name
    assert json.load(open(os.path.join(run_dir, "config.json")))["epochs"] == 2


def test_a_target_the_records_already_reached_is_reported_where_it_was_reached(idx_dir, two_epochs, tmp_path,
                                                                                capsys):
    run_dir = copy_run(two_epochs, tmp_path)  # finished, 2 epochs, no target; tracked at steps 0, 4, 8, 9, 12, 16, 18
    train = [r for r in read_metrics(run_dir) if r["split"] == "train"]
    # A target first crossed by the second tracking point (step 4): the records go on to step 18.
    target = train[1]["ce"] * 1.0001
    first = next(r for r in train if r["ce"] < target)
    assert first["step"] < 18 and train[-1]["ce"] < target
    records_before = read_metrics(run_dir)
    config = dataclass_replace(resume_config(idx_dir), epochs=2, target_train_loss=target)
    capsys.readouterr()
    result = training.train(config, run_dir, progress=False)
    expected = (f"target train loss {target} reached at step {first['step']} (epoch "
                f"{training._epoch_text(first['step'], 9)}); the run goes on to step 18 (epoch 2), trained before this "
                "target was asked for")
    assert result.state == "finished" and result.step == 18 and result.message == expected
    assert capsys.readouterr().out.splitlines()[0] == (
        f"{run_dir}: now with target_train_loss {target} (was None); nothing left to train at epoch 2 (step 18): "
        f"target train loss {target} reached at step {first['step']}")
    assert json.load(open(os.path.join(run_dir, "status.json"))) == {
        "state": "finished", "epoch": 2, "step": 18, "message": expected}
    assert read_metrics(run_dir) == records_before  # nothing trained, nothing tracked again
    assert json.load(open(os.path.join(run_dir, "config.json")))["target_train_loss"] == target
    again = training.train(config, run_dir, progress=False, verbose=False)
    assert again.state == "already-finished" and expected in again.message


def test_a_directory_that_is_not_a_run_is_refused(idx_dir, tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(RunError, match="not a run directory"):
        training.train(small_config(idx_dir), str(tmp_path), progress=False, verbose=False)
    assert (tmp_path / "notes.txt").read_text() == "mine"


def test_overwrite_removes_only_a_runs_files_and_refuses_anything_else(idx_dir, tmp_path):
    """overwrite=True clears a run directory, and refuses, removing nothing, one that holds anything else: a slip
    such as run_dir="." must not empty a working directory."""
    mine = tmp_path / "mine"
    (mine / "sub").mkdir(parents=True)
    (mine / "important.txt").write_text("keep")
    (mine / "sub" / "notes.md").write_text("keep too")
    with pytest.raises(RunError) as refused:
        training.train(small_config(idx_dir), str(mine), progress=False, verbose=False)
    assert "not a run directory (it holds important.txt, sub/)" in str(refused.value)
    assert "overwrite=True" not in str(refused.value)
    with pytest.raises(RunError, match=r"holds files that are not a run's \(important.txt, sub/\): nothing was "
                                       "removed; use another run_dir"):
        training.train(small_config(idx_dir), str(mine), overwrite=True, progress=False, verbose=False)
    assert (mine / "important.txt").read_text() == "keep" and (mine / "sub" / "notes.md").read_text() == "keep too"

    run_dir = tmp_path / "run"
    assert training.train(small_config(idx_dir, epochs=1), str(run_dir), progress=False,
                          verbose=False).state == "finished"
    assert {"config.json", "status.json", "metrics.jsonl", "checkpoint.npz"} <= set(os.listdir(run_dir))
    (run_dir / "checkpoint.npz.tmp").write_bytes(b"torn")  # an atomic write a crash interrupted: the run's own
    result = training.train(small_config(idx_dir, epochs=1, lr=0.05), str(run_dir), overwrite=True,
                            progress=False, verbose=False)
    assert result.state == "finished" and not (run_dir / "checkpoint.npz.tmp").exists()
    assert json.load(open(run_dir / "config.json"))["lr"] == 0.05
    (run_dir / "results.csv").write_text("a user's file")
    with pytest.raises(RunError, match=r"results.csv\): nothing was removed"):
        training.train(small_config(idx_dir, epochs=1), str(run_dir), overwrite=True, progress=False, verbose=False)
    assert (run_dir / "results.csv").exists() and (run_dir / "metrics.jsonl").exists()


def test_a_second_process_is_refused_by_the_lock(idx_dir, tmp_path):
    run_dir = str(tmp_path / "run")
    with RunDirectory(run_dir):
        with pytest.raises(RunLockedError, match="in use by another process"):
            training.train(small_config(idx_dir), run_dir, progress=False, verbose=False)
    # Released: now it runs.
    assert training.train(small_config(idx_dir, epochs=1), run_dir, progress=False, verbose=False).state == "finished"


def test_data_that_cannot_be_used_is_a_run_error_and_leaves_no_directory(idx_dir, tmp_path, offline_tfds):
    empty = tmp_path / "empty"
    empty.mkdir()
    run_dir = tmp_path / "run"
    # A data_dir without the files: no system directory stands in for it.
    with pytest.raises(RunError, match=f"data_dir {empty} does not hold mnist's files"):
        training.train(small_config(str(empty)), str(run_dir), progress=False, verbose=False)
    assert not run_dir.exists()
    # More examples than the (custom, 600-example) files hold: one line, not a traceback.
    with pytest.raises(RunError, match="train_subset 640 is larger than the training set \\(600 examples\\)"):
        training.train(small_config(idx_dir, train_subset=640), str(run_dir), progress=False, verbose=False)
    assert not run_dir.exists()
    # A directory that existed is left as it was.
    run_dir.mkdir()
    with pytest.raises(RunError):
        training.train(small_config(str(empty)), str(run_dir), progress=False, verbose=False)
    assert run_dir.is_dir() and os.listdir(run_dir) == [".lock"]


def test_same_seed_same_metrics_other_seed_other_metrics(idx_dir, tmp_path):
    runs = {}
    for name, seed in (("a", 5), ("b", 5), ("c", 6)):
        training.train(small_config(idx_dir, seed=seed, epochs=1), str(tmp_path / name), progress=False, verbose=False)
        runs[name] = read_metrics(str(tmp_path / name))
    assert runs["a"] == runs["b"]
    assert runs["a"][-2]["ce"] != runs["c"][-2]["ce"]


def test_resume_from_a_checkpoint_truncates_later_records(idx_dir, two_epochs, tmp_path):
    """A crash after the epoch-1 checkpoint: the records written after it are cut and recomputed."""
    config = small_config(idx_dir, epochs=2, track_every=4, deterministic=True)
    assert dataclass_replace(resume_config(idx_dir), epochs=2) == config
    expected = read_metrics(two_epochs)  # the uninterrupted run of this config

    partial = str(tmp_path / "partial")
    training.train(dataclass_replace(config, epochs=1), partial, progress=False, verbose=False)
    # Make it look like a run of 2 epochs killed in epoch 2: config of the 2-epoch run, status
    # "running", and a stray record written after the checkpoint.
    stored = json.load(open(os.path.join(partial, "config.json")))
    stored["epochs"] = 2
    json.dump(stored, open(os.path.join(partial, "config.json"), "w"))
    json.dump({"state": "running", "epoch": 1, "step": 9}, open(os.path.join(partial, "status.json"), "w"))
    with open(os.path.join(partial, "metrics.jsonl"), "a") as handle:
        handle.write(json.dumps({**expected[-1], "step": 12, "ce": 123.0}) + "\n")
    result = training.train(config, partial, progress=False, verbose=False)
    assert result.state == "finished"
    assert read_metrics(partial) == expected


def dataclass_replace(config, **changes):
    import dataclasses

    return dataclasses.replace(config, **changes)


def test_target_train_loss_stops_the_run(idx_dir, tmp_path):
    run_dir = str(tmp_path / "run")
    config = small_config(idx_dir, epochs=20, track_every=1, target_train_loss=1.5)
    result = training.train(config, run_dir, progress=False, verbose=False)
    records = read_metrics(run_dir)
    train_ce = [r["ce"] for r in records if r["split"] == "train"]
    assert train_ce[-1] < 1.5 and all(ce >= 1.5 for ce in train_ce[:-1])
    assert result.state == "finished" and result.step == records[-1]["step"] < 20 * 9
    status = json.load(open(os.path.join(run_dir, "status.json")))
    assert status["state"] == "finished" and "target train loss 1.5 reached" in status["message"]
    assert status["step"] == result.step


def test_divergence_stops_with_status_and_keeps_records(idx_dir, tmp_path):
    run_dir = str(tmp_path / "run")
    result = training.train(small_config(idx_dir, lr=1e30, epochs=3), run_dir, progress=False, verbose=False)
    assert result.state == "diverged"
    status = json.load(open(os.path.join(run_dir, "status.json")))
    assert status["state"] == "diverged" and status["epoch"] == 0 and "nan" in status["message"].lower()
    records = read_metrics(run_dir)
    assert [r["step"] for r in records] == [0, 0]  # the tracking point before training stays
    assert all(math.isfinite(r["ce"]) for r in records)
    again = training.train(small_config(idx_dir, lr=1e30, epochs=3), run_dir, progress=False, verbose=False)
    assert again.state == "already-diverged"


def test_checkpoint_round_trip_restores_weights_and_optimizer(tmp_path):
    from keras_implicit.models import make_model

    model = make_model("fc6", (4, 4, 1), 3, seed=0)
    optimizer = training.make_optimizer("sgd", 0.1)
    model.compile(optimizer, keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    x = np.random.default_rng(0).random((32, 4, 4, 1)).astype(np.float32)
    y = np.arange(32) % 3
    model.fit(x, y, batch_size=16, epochs=1, verbose=0)
    with RunDirectory(tmp_path) as run:
        run.save_checkpoint(model, optimizer, {"epoch": 1, "step": 2})
        other = make_model("fc6", (4, 4, 1), 3, seed=1)
        other_optimizer = training.make_optimizer("sgd", 0.1)
        other_optimizer.build(other.trainable_variables)
        assert run.load_checkpoint(other, other_optimizer) == {"epoch": 1, "step": 2}
    for a, b in zip(model.weights, other.weights):
        np.testing.assert_array_equal(a.numpy(), b.numpy())
    for a, b in zip(optimizer.variables, other_optimizer.variables):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert int(other_optimizer.iterations.numpy()) == 2
    assert not os.path.exists(os.path.join(tmp_path, "checkpoint.npz.tmp"))


# --------------------------------------------------------------------------- #
# Damaged run directories: one clear line per file, at most one epoch lost
# --------------------------------------------------------------------------- #
def damage(path, how):
    """``truncated``: the first half of the file is left (a write cut short); ``garbage``: random bytes;
    ``middle``: 64 random bytes in the middle (the rest intact)."""
    content = open(path, "rb").read()
    noise = np.random.default_rng(0).integers(0, 256, len(content), dtype=np.uint8).tobytes()
    if how == "truncated":
        content = content[: len(content) // 2]
    elif how == "middle":
        middle = len(content) // 2
        content = content[:middle] + noise[:64] + content[middle + 64:]
    else:
        content = noise
    with open(path, "wb") as handle:
        handle.write(content)


def warning_lines(captured):
    return [line for line in captured.err.splitlines() if line.startswith("warning:")]


def resume_config(idx_dir):
    return small_config(idx_dir, epochs=3, track_every=4, deterministic=True)


@pytest.fixture(scope="module")
def three_epochs_run(idx_dir, tmp_path_factory):
    """An uninterrupted deterministic run of 3 epochs: (config, its directory)."""
    config = resume_config(idx_dir)
    whole = str(tmp_path_factory.mktemp("whole") / "run")
    training.train(config, whole, progress=False, verbose=False)
    return config, whole


@pytest.fixture(scope="module")
def three_epochs(three_epochs_run):
    """An uninterrupted deterministic run of 3 epochs: (config, metrics records, TensorBoard points)."""
    config, whole = three_epochs_run
    return config, read_metrics(whole), tensorboard_points(whole)


@pytest.fixture(scope="module")
def two_epochs(idx_dir, tmp_path_factory):
    """The directory of a finished run of resume_config with 2 epochs (the first two of three_epochs' three):
    the tests that damage it and resume it for the third epoch take a copy (copy_run)."""
    run_dir = str(tmp_path_factory.mktemp("two_epochs") / "run")
    training.train(dataclass_replace(resume_config(idx_dir), epochs=2), run_dir, progress=False, verbose=False)
    return run_dir


def checkpoint_meta(run_dir, name="checkpoint.npz"):
    with RunDirectory(run_dir) as run:
        return run.load_checkpoint(name=name)


@pytest.mark.parametrize("how", ["truncated", "garbage", "middle"])
def test_a_damaged_checkpoint_resumes_from_the_previous_one(how, three_epochs, two_epochs, tmp_path, capsys):
    config, expected, expected_points = three_epochs
    run_dir = copy_run(two_epochs, tmp_path)  # dataclass_replace(config, epochs=2), trained
    assert checkpoint_meta(run_dir)["epoch"] == 2
    assert checkpoint_meta(run_dir, "checkpoint.prev.npz")["epoch"] == 1  # the one it replaced
    damage(os.path.join(run_dir, "checkpoint.npz"), how)
    capsys.readouterr()

    result = training.train(config, run_dir, progress=False, verbose=False)
    assert result.state == "finished" and result.epoch == 3
    warnings = warning_lines(capsys.readouterr())
    assert len(warnings) == 1
    reason = {"truncated": "BadZipFile: File is not a zip file", "garbage": "not a checkpoint: it does not start "
              "as an .npz (zip) archive", "middle": "BadZipFile: Bad CRC-32 for file '"}[how]
    assert f"{run_dir}/checkpoint.npz is unreadable ({reason}" in warnings[0]
    assert f"resuming from {run_dir}/checkpoint.prev.npz (epoch 1, step 9)" in warnings[0]
    # Epoch 2 was trained again: nothing logged twice, in metrics.jsonl or in TensorBoard, and the same
    # numbers as the uninterrupted run.
    assert read_metrics(run_dir) == expected
    assert tensorboard_points(run_dir) == expected_points
    # The damaged file was replaced, not rotated over the good previous one.
    assert checkpoint_meta(run_dir)["epoch"] == 3
    assert checkpoint_meta(run_dir, "checkpoint.prev.npz")["epoch"] == 2


def test_a_missing_latest_checkpoint_resumes_from_the_previous_one(three_epochs, two_epochs, tmp_path, capsys):
    """A crash between the two renames of a checkpoint's rotation leaves only checkpoint.prev.npz."""
    config, expected, _ = three_epochs
    run_dir = copy_run(two_epochs, tmp_path)  # dataclass_replace(config, epochs=2), trained
    os.remove(os.path.join(run_dir, "checkpoint.npz"))
    capsys.readouterr()
    assert training.train(config, run_dir, progress=False, verbose=False).state == "finished"
    assert f"{run_dir}/checkpoint.npz is missing: resuming from" in warning_lines(capsys.readouterr())[0]
    assert read_metrics(run_dir) == expected


@pytest.mark.parametrize("previous", ["garbage", "missing"])
def test_no_readable_checkpoint_is_one_clear_error(previous, one_epoch, tmp_path, capsys):
    config, source = one_epoch
    run_dir = copy_run(source, tmp_path)
    damage(os.path.join(run_dir, "checkpoint.npz"), "truncated")
    previous_path = os.path.join(run_dir, "checkpoint.prev.npz")
    if previous == "missing":
        os.remove(previous_path)
    else:
        damage(previous_path, "garbage")
    before = open(os.path.join(run_dir, "metrics.jsonl")).read()
    more = dataclass_replace(config, epochs=2)
    if previous == "missing":
        match = (r"checkpoint.npz is unreadable \(BadZipFile: .*\) and there is no checkpoint.prev.npz to fall back "
                 r"on: rerun with overwrite=True to start again$")
    else:
        match = (r": no checkpoint can be read \(checkpoint.npz: BadZipFile: .*; checkpoint.prev.npz: .*\): "
                 r"rerun with overwrite=True to start again$")
    with pytest.raises(RunError, match=match) as raised:
        training.train(more, run_dir, progress=False, verbose=False)
    assert "\n" not in str(raised.value)
    assert open(os.path.join(run_dir, "metrics.jsonl")).read() == before  # nothing was touched
    assert training.train(more, run_dir, overwrite=True, progress=False, verbose=False).state == "finished"


def test_a_checkpoint_of_another_model_is_refused_and_restores_nothing(tmp_path):
    from keras_implicit.models import make_model

    model = make_model("fc6", (4, 4, 1), 3, seed=0)
    optimizer = training.make_optimizer("sgd", 0.1)
    optimizer.build(model.trainable_variables)
    other = make_model("fc6", (5, 5, 1), 3, seed=1)
    other_optimizer = training.make_optimizer("sgd", 0.1)
    other_optimizer.build(other.trainable_variables)
    before = [w.numpy().copy() for w in other.weights]
    with RunDirectory(tmp_path) as run:
        run.save_checkpoint(model, optimizer, {"epoch": 0, "step": 0, "metrics_bytes": 0})
        with pytest.raises(RunError, match=r"checkpoint.npz: model_0 has shape \(16, "):
            run.restore_checkpoint(other, other_optimizer)
    for weight, value in zip(other.weights, before):
        np.testing.assert_array_equal(weight.numpy(), value)


@pytest.mark.parametrize("state", ["running", "finished"])
def test_a_damaged_status_is_rebuilt_from_the_checkpoint(state, three_epochs, three_epochs_run, two_epochs, tmp_path,
                                                         capsys):
    config, expected, expected_points = three_epochs
    if state == "running":  # killed in epoch 3: the 3-epoch config, a point logged after the checkpoint
        run_dir = copy_run(two_epochs, tmp_path)  # dataclass_replace(config, epochs=2), trained
        stored = json.load(open(os.path.join(run_dir, "config.json")))
        json.dump({**stored, "epochs": 3}, open(os.path.join(run_dir, "config.json"), "w"))
        with open(os.path.join(run_dir, "metrics.jsonl"), "a") as handle:
            handle.write(json.dumps({**expected[-1], "step": 20, "ce": 123.0}) + "\n")
    else:
        run_dir = copy_run(three_epochs_run[1], tmp_path)  # config, trained
    damage(os.path.join(run_dir, "status.json"), "garbage")
    capsys.readouterr()

    result = training.train(config, run_dir, progress=False, verbose=False)
    assert result.state == "finished" and result.epoch == 3 and result.step == 27
    warnings = warning_lines(capsys.readouterr())
    assert len(warnings) == 1 and f"{run_dir}/status.json is unreadable (not UTF-8 text at byte " in warnings[0]
    assert "resuming from the checkpoint" in warnings[0]
    assert json.load(open(os.path.join(run_dir, "status.json"))) == {
        "state": "finished", "epoch": 3, "step": 27, "message": "3 epochs"}
    assert read_metrics(run_dir) == expected
    assert tensorboard_points(run_dir) == expected_points


@pytest.mark.parametrize("how", ["truncated", "missing"])
def test_a_damaged_config_is_restored_from_the_checkpoint(how, one_epoch, tmp_path, capsys):
    config, source = one_epoch
    run_dir = copy_run(source, tmp_path)
    config_path = os.path.join(run_dir, "config.json")
    original = open(config_path).read()
    if how == "missing":
        os.remove(config_path)
    else:
        damage(config_path, how)
    capsys.readouterr()

    again = training.train(config, run_dir, progress=False, verbose=False)
    assert again.state == "already-finished"
    warnings = warning_lines(capsys.readouterr())
    assert len(warnings) == 1
    problem = "is missing" if how == "missing" else "is unreadable (JSON error at line "
    assert f"{config_path} {problem}" in warnings[0]
    assert warnings[0].endswith(f": restored from the copy in {run_dir}/checkpoint.npz")
    assert json.loads(open(config_path).read()) == json.loads(original)
    # Restored, it still defines the run: another configuration is refused.
    with pytest.raises(RunError, match=r"another run \(lr: 0.1 there, 0.2 asked\)"):
        training.train(dataclass_replace(config, lr=0.2), run_dir, progress=False, verbose=False)


def test_a_damaged_config_without_a_copy_is_one_clear_error(one_epoch, tmp_path):
    config, source = one_epoch
    run_dir = copy_run(source, tmp_path)
    # Checkpoints written before copies were kept: the same files without the meta's "config".
    for name in ("checkpoint.npz", "checkpoint.prev.npz"):
        path = os.path.join(run_dir, name)
        with np.load(path) as content:
            arrays = {key: content[key] for key in content.files}
        meta = json.loads(bytes(arrays["meta"]).decode())
        del meta["config"]
        arrays["meta"] = np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8)
        np.savez(path, **arrays)
    config_path = os.path.join(run_dir, "config.json")
    with open(config_path, "w") as handle:
        handle.write('{\n  "model": "fc6",\n  "lr": 0.1,,\n}\n')
    with pytest.raises(RunError) as raised:
        training.train(config, run_dir, progress=False, verbose=False)
    assert str(raised.value) == (f"{config_path} is unreadable (JSON error at line 3 column 13: Expecting property "
                                 "name enclosed in double quotes): restore it or rerun with overwrite=True to start "
                                 "again")
    assert training.train(config, run_dir, overwrite=True, progress=False, verbose=False).state == "finished"


def test_a_torn_metrics_line_is_cut_on_resume_and_dropped_by_analysis(three_epochs, two_epochs, tmp_path, capsys):
    from keras_implicit import analysis

    config, expected, _ = three_epochs
    run_dir = copy_run(two_epochs, tmp_path)  # dataclass_replace(config, epochs=2), trained
    complete = read_metrics(run_dir)
    json.dump({"state": "running", "epoch": 2, "step": 18}, open(os.path.join(run_dir, "status.json"), "w"))
    torn = json.dumps({**expected[-1], "step": 20})
    with open(os.path.join(run_dir, "metrics.jsonl"), "a") as handle:
        handle.write(torn[: len(torn) // 2])  # killed in the middle of a write

    with pytest.warns(RuntimeWarning, match="dropping a truncated last line"):
        loaded = analysis.load_run(run_dir)
    train_steps = [r["step"] for r in complete if r["split"] == "train"]
    np.testing.assert_array_equal(loaded.splits["train"]["step"], train_steps)

    capsys.readouterr()
    assert training.train(config, run_dir, progress=False, verbose=False).state == "finished"
    assert warning_lines(capsys.readouterr()) == []  # after the checkpoint: cut like any later point
    assert read_metrics(run_dir) == expected


@pytest.mark.parametrize("how", ["shorter", "malformed"])
def test_metrics_damaged_before_the_checkpoint_is_one_clear_error(how, one_epoch, tmp_path):
    config, source = one_epoch
    run_dir = copy_run(source, tmp_path)
    path = os.path.join(run_dir, "metrics.jsonl")
    lines = open(path).read().splitlines(keepends=True)
    if how == "shorter":
        open(path, "w").write("".join(lines[:2]))
        match = r"metrics.jsonl holds \d+ bytes, fewer than the \d+ its checkpoint counted: .* overwrite=True"
    else:
        lines[1] = "x" * (len(lines[1]) - 1) + "\n"  # the same length: only the content is damaged
        open(path, "w").write("".join(lines))
        match = (r"metrics.jsonl:2 is unreadable \(JSON error at line 1 column 1: .*\): restore it or rerun with "
                 "overwrite=True")
    with pytest.raises(RunError, match=match):
        training.train(dataclass_replace(config, epochs=2), run_dir, progress=False, verbose=False)


def test_noisy_error_is_tracked_and_runs_made_before_it_resume(idx_dir, one_epoch, tmp_path):
    noisy = str(tmp_path / "noisy")
    training.train(small_config(idx_dir, epochs=1, noisy_error_draws=8), noisy, progress=False, verbose=False)
    records = read_metrics(noisy)
    for record in records:
        for name in ("noisy_error@1", "noisy_error_se@1", "noisy_ce@16", "eq9@0.0625", "hessian_trace"):
            assert math.isfinite(record[name])
        assert record["gcdf@1"] >= record["noisy_error@1"] - 3 * record["noisy_error_se@1"]
    assert json.load(open(os.path.join(noisy, "config.json")))["noisy_error_draws"] == 8
    # A run directory written before the setting existed (no noisy_error_draws in config.json) had it off:
    # it continues, and a run asking for the draws is refused as another run.
    run_dir = copy_run(one_epoch[1], tmp_path)
    path = os.path.join(run_dir, "config.json")
    stored = json.load(open(path))
    del stored["noisy_error_draws"]
    json.dump(stored, open(path, "w"))
    result = training.train(small_config(idx_dir, epochs=2), run_dir, progress=False, verbose=False)
    assert result.state == "finished" and result.step == 18
    with pytest.raises(RunError, match=r"noisy_error_draws: 0 there, 8 asked"):
        training.train(small_config(idx_dir, epochs=3, noisy_error_draws=8), run_dir, progress=False, verbose=False)


def test_track_levels_are_recorded_and_a_resumed_run_tracks_at_the_same_steps(idx_dir, tmp_path):
    """track_levels is a setting of the run (config.json, refused when changed on resume) and its trigger's memory
    (the levels closed, the last tracked CE) is replayed from the records: a run resumed from an epoch's checkpoint
    tracks at the steps an uninterrupted one does. Level 2 closes in the second epoch (three points at or below it),
    before the checkpoint the resumed run starts from; a trigger started afresh would open it again."""
    settings = dict(epochs=3, track_every=1, track_levels=(2.0,), deterministic=True)
    whole, parts = tmp_path / "whole", tmp_path / "parts"
    training.train(small_config(idx_dir, **settings), str(whole), progress=False, verbose=False)
    training.train(small_config(idx_dir, **{**settings, "epochs": 2}), str(parts), progress=False, verbose=False)
    train_ce = [r["ce"] for r in read_metrics(parts) if r["split"] == "train"]
    assert config.level_trigger_state(train_ce, settings["track_levels"])[1][0] == config.LEVEL_SETTLE_POINTS
    training.train(small_config(idx_dir, **settings), str(parts), progress=False, verbose=False)
    steps = [(r["step"], r["split"]) for r in read_metrics(whole)]
    assert steps == [(r["step"], r["split"]) for r in read_metrics(parts)]
    tracked = sorted({step for step, _ in steps})
    every_step = 3 * (600 // 64)
    assert 4 < len(tracked) < every_step  # dense near the levels only (every step: every_step + 1 points)
    assert json.load(open(whole / "config.json"))["track_levels"] == [2.0]
    with pytest.raises(RunError, match=r"track_levels: \[2.0\] there, \[0.5\] asked"):
        training.train(small_config(idx_dir, **{**settings, "track_levels": (0.5,)}), str(whole), progress=False,
                       verbose=False)
    with pytest.raises(ValueError, match="give track_every too"):
        small_config(idx_dir, track_levels=(1.0,)).validate()


def test_a_mixture_objective_trains_and_is_the_runs_setting(idx_dir, tmp_path):
    from keras_implicit import losses

    assert isinstance(training.make_loss("ce+0.1*gcdf@4"), losses.Mixture)
    assert isinstance(training.make_loss("2*ce"), losses.Mixture)  # a weight: not Keras' own CE
    assert not isinstance(training.make_loss("gcdf@4"), losses.Mixture)
    run_dir = tmp_path / "mix"
    config = small_config(idx_dir, loss="ce+0.1*gcdf@4", epochs=2)
    assert training.default_run_name(config) == "mnist-fc6-ce+0.1xgcdf4-sgd-lr0.1-b64-g64-s0"
    assert training.train(config, str(run_dir), progress=False, verbose=False).state == "finished"
    train = [r for r in read_metrics(run_dir) if r["split"] == "train"]
    assert train[-1]["ce"] < train[0]["ce"]  # it trained
    assert json.load(open(run_dir / "config.json"))["loss"] == "ce+0.1*gcdf@4"
    with pytest.raises(RunError, match=r"loss: 'ce\+0.1\*gcdf@4' there, 'ce\+0.2\*gcdf@4' asked"):
        training.train(small_config(idx_dir, loss="ce+0.2*gcdf@4", epochs=2), str(run_dir), progress=False,
                       verbose=False)


@pytest.mark.parametrize("regularizer", [{"gradient_penalty": 0.01}, {"sam_radius": 0.05}])
def test_an_explicit_regularizer_trains_resumes_and_is_the_runs_setting(idx_dir, tmp_path, regularizer):
    """Each regularizer is a setting: recorded in config.json, read back by analysis (a group of its own, labelled
    by it), resumed from the checkpoint as the same run, and refused when another value is asked of the run."""
    from keras_implicit import analysis

    name, value = next(iter(regularizer.items()))
    run_dir = tmp_path / "regularized"
    config = small_config(idx_dir, epochs=1, batch_size=128, **regularizer)
    assert training.train(config, str(run_dir), progress=False, verbose=False).state == "finished"
    assert json.load(open(run_dir / "config.json"))[name] == value
    resumed = training.train(dataclasses.replace(config, epochs=2), str(run_dir), progress=False, verbose=False)
    assert resumed.state == "finished" and resumed.epoch == 2
    train = [r for r in read_metrics(run_dir) if r["split"] == "train"]
    assert [r["epoch"] for r in train] == [0, 1, 2] and train[-1]["ce"] < train[0]["ce"]
    with pytest.raises(RunError, match=rf"{name}: {value} there, {2 * value} asked"):
        training.train(dataclasses.replace(config, epochs=2, **{name: 2 * value}), str(run_dir), progress=False,
                       verbose=False)

    plain_dir = tmp_path / "plain"
    assert training.train(small_config(idx_dir, epochs=1, batch_size=128), str(plain_dir), progress=False,
                          verbose=False).state == "finished"
    config_path = plain_dir / "config.json"  # a run from before the settings existed: no key, the default
    stored = json.load(open(config_path))
    del stored["gradient_penalty"], stored["sam_radius"]
    config_path.write_text(json.dumps(stored))
    assert training.stored_differences(plain_dir, small_config(idx_dir, epochs=1, batch_size=128)) == {}
    groups = analysis.group_runs(analysis.load_runs([run_dir, plain_dir]))
    short = {"gradient_penalty": "gp", "sam_radius": "sam"}[name]
    assert sorted(g.label for g in groups) == sorted([f"{short}=0", f"{short}={value:g}"])


def test_a_validation_split_is_held_out_tracked_and_named(idx_dir, tmp_path):
    run_dir = tmp_path / "validated"
    config = small_config(idx_dir, epochs=1, validation_size=100)
    assert training.default_run_name(config) == "mnist-fc6-ce-sgd-lr0.1-b64-g64-v100-s0"
    assert training.train(config, str(run_dir), progress=False, verbose=False).state == "finished"
    stored = json.load(open(run_dir / "config.json"))
    assert stored["validation_size"] == 100
    assert (stored["data"]["train_examples"], stored["data"]["validation_examples"]) == (500, 100)
    records = read_metrics(run_dir)
    assert [r["split"] for r in records] == ["train", "test", "validation"] * 2
    assert records[-1]["step"] == 500 // 64  # an epoch is the 500 training examples left
    for bad, message in ((0, "validation_size must be a positive integer"),
                         (60000, "validation_size 60000 must be from 10")):
        with pytest.raises(ValueError, match=message):
            small_config(idx_dir, validation_size=bad).validate()
    with pytest.raises(ValueError, match="after the validation split"):
        RunConfig(dataset="mnist", validation_size=30000, batch_size=32768, ghost_batch_size=256).validate()
