"""tf.distribute (keras_implicit/_distribute.py, the strategy parts of training.py and run.py).

A strategy is set up once per process, before TensorFlow initializes its devices, so every case that trains
under one runs in child processes: 2 logical CPU devices stand in for 2 GPUs (MirroredStrategy), and 2
processes on 127.0.0.1 for 2 machines (MultiWorkerMirroredStrategy). The references are single-device runs:
Keras' own train step, plain training-mode calls per micro-batch, and run.py with the default strategy.
"""

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

from keras_implicit import _distribute
from tests.runs import assert_refused_before_tensorflow, kill_9_after_the_first_epoch, read_json, read_records

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "experiments", "run.py")


def _env(**extra):
    env = {k: v for k, v in os.environ.items() if k not in ("KERAS_BACKEND", "TF_CONFIG")}
    return {**env, "TF_CPP_MIN_LOG_LEVEL": "2", "PYTHONPATH": ROOT, **extra}


# --------------------------------------------------------------------------- #
# Without TensorFlow: the cluster, and flags refused before anything loads
# --------------------------------------------------------------------------- #
@pytest.mark.parametrize("tf_config, expected", [
    (None, (1, 0, True)),
    ({"cluster": {"worker": ["a:1", "b:2"]}, "task": {"type": "worker", "index": 0}}, (2, 0, True)),
    ({"cluster": {"worker": ["a:1", "b:2"]}, "task": {"type": "worker", "index": 1}}, (2, 1, False)),
    ({"cluster": {"chief": ["c:0"], "worker": ["a:1", "b:2"]}, "task": {"type": "chief", "index": 0}},
     (3, 0, True)),
    ({"cluster": {"chief": ["c:0"], "worker": ["a:1", "b:2"]}, "task": {"type": "worker", "index": 0}},
     (3, 0, False)),
])
def test_cluster_role_reads_tf_config(tf_config, expected):
    environ = {} if tf_config is None else {"TF_CONFIG": json.dumps(tf_config)}
    assert _distribute.cluster_role(environ) == expected


@pytest.mark.parametrize("text", ["{not json", json.dumps({"cluster": {}}), json.dumps({"task": {"type": "worker"}})])
def test_a_bad_tf_config_is_a_clear_error(text):
    with pytest.raises(ValueError, match="TF_CONFIG must be JSON with 'cluster' and 'task'"):
        _distribute.cluster_role({"TF_CONFIG": text})


@pytest.mark.parametrize("argv, message", [
    (["--strategy", "mirrored", "--backend", "jax", "--batch-size", "512"],
     "--strategy mirrored is tf.distribute: it needs --backend tensorflow"),
    (["--cpu-replicas", "2"], "splits this machine's CPU for strategy 'mirrored' or 'data-parallel' only"),
    (["--strategy", "mirrored", "--cpu-replicas", "2"],
     "on 2 replicas (128 examples each): the batch size must be a multiple of replicas x --ghost-batch-size = 512"),
    (["--strategy", "multiworker"], "needs TF_CONFIG"),
    (["--strategy", "data-parallel", "--cpu-replicas", "3", "--backend", "jax"],
     "make --ghost-batch-size a multiple of 3"),
    (["--strategy", "horovod"], "invalid choice: 'horovod'"),
])
def test_strategy_flags_are_refused_before_tensorflow(argv, message, tmp_path):
    assert_refused_before_tensorflow(SCRIPT, [*argv, "--out", str(tmp_path / "run")], ROOT, message)


# --------------------------------------------------------------------------- #
# One step on 1 device and on 2 replicas; the tracker on both
# --------------------------------------------------------------------------- #
CHECKS = textwrap.dedent(
    """
    import contextlib, json
    import numpy as np
    from keras_implicit import _distribute
    strategy = _distribute.make_strategy("mirrored", cpu_replicas=2)  # before anything else touches TensorFlow
    import keras
    import tensorflow as tf
    from keras_implicit import callbacks, ghost, models, training

    LR = 0.1
    rng = np.random.default_rng(0)
    report = {"replicas": strategy.num_replicas_in_sync}

    def difference(a, b):
        # Beyond what float32 rounding of a moving average of momentum 0.99 can accumulate on either side
        # (1/2 eps |v| / (1 - m) = 50 eps |v| each): the BatchNorm variances (about 0.7) reach 6-7 ulps.
        return max(float(np.abs(np.asarray(u, np.float64) - np.asarray(v, np.float64)).max()
                         - 100 * np.finfo(np.float32).eps * np.abs(np.asarray(v, np.float64)).max())
                   for u, v in zip(a, b))

    def compiled(model, scope=contextlib.nullcontext()):
        with scope:
            optimizer = training.make_optimizer("sgd", LR)
            model.compile(optimizer, training.make_loss("ce"))
            optimizer.build(model.trainable_variables)
        return model

    def fc6(scope=contextlib.nullcontext(), ghost_batch_size=None, moving_statistics="sequential"):
        with scope:
            network = models.make_model("fc6", (10, 10, 1), 10, seed=0)
            return network if ghost_batch_size is None else ghost.ghost_batch_model(network, ghost_batch_size,
                                                                                    moving_statistics)

    def one_step_on_two_replicas(model, x, y):
        batches = tf.data.Dataset.from_tensor_slices((x, y)).batch(len(x))
        _distribute.run_epoch(model, strategy, batches, [], epoch=0, steps=1)

    def local_copies_equal(model):
        for variable in model.weights:
            copies = [np.asarray(c) for c in strategy.experimental_local_results(variable.value)]
            if len(copies) != 2 or any(not np.array_equal(copies[0], c) for c in copies[1:]):
                return False
        return True

    # (a) No BatchNorm: Keras' own step on one device against the ghost step on 2 replicas.
    def mlp(scope=contextlib.nullcontext()):
        with scope:
            keras.utils.set_random_seed(1)
            inputs = keras.Input((20,))
            hidden = keras.layers.Dense(32, activation="relu")(inputs)
            return keras.Model(inputs, keras.layers.Dense(10)(hidden))

    x = rng.normal(size=(512, 20)).astype(np.float32)
    y = rng.integers(0, 10, 512).astype(np.int32)
    single = compiled(mlp())
    single.fit(x, y, batch_size=512, epochs=1, shuffle=False, verbose=0)
    with strategy.scope():
        double = compiled(ghost.ghost_batch_model(mlp(strategy.scope()), 256), strategy.scope())
    one_step_on_two_replicas(double, x, y)
    report["a"] = {"difference": difference(single.weights, double.weights),
                   "moved": difference(single.weights, mlp().weights)}

    # (b) fc6 with BatchNorm, batch 1024 in ghost batches of 256 (2 per replica), against an independent
    # reference: four plain training-mode calls, one per group of 256, from the same initial weights, and one plain
    # model called on the four groups in order (each call updates its moving statistics once).
    x = rng.normal(size=(1024, 10, 10, 1)).astype(np.float32)
    y = rng.integers(0, 10, 1024).astype(np.int32)
    loss = training.make_loss("ce")
    gradients, moving = [], []
    for k in range(4):
        plain = fc6()
        with tf.GradientTape() as tape:
            value = loss(y[256 * k:256 * (k + 1)], plain(x[256 * k:256 * (k + 1)], training=True))
        gradients.append([g.numpy() for g in tape.gradient(value, plain.trainable_variables)])
        moving.append([np.asarray(v) for v in plain.non_trainable_variables])
    in_order = fc6()
    for k in range(4):
        in_order(x[256 * k:256 * (k + 1)], training=True)
    initial = fc6()
    expected_trainable = [np.asarray(w) - LR * np.mean(g, axis=0)
                          for w, g in zip(initial.trainable_variables, zip(*gradients))]
    expected_moving = [np.asarray(v) for v in in_order.non_trainable_variables]
    expected_mean = [np.mean(values, axis=0) for values in zip(*moving)]
    single = compiled(fc6(ghost_batch_size=256))
    single.fit(x, y, batch_size=1024, epochs=1, shuffle=False, verbose=0)
    double = compiled(fc6(strategy.scope(), ghost_batch_size=256), strategy.scope())
    one_step_on_two_replicas(double, x, y)
    test_x = rng.normal(size=(300, 10, 10, 1)).astype(np.float32)
    report["b"] = {
        "trainable_vs_reference": difference(double.trainable_variables, expected_trainable),
        "moving_vs_reference": difference(double.non_trainable_variables, expected_moving),
        "vs_one_device": difference(single.weights, double.weights),
        "moved": difference(double.trainable_variables, initial.trainable_variables),
        "moving_moved": difference(double.non_trainable_variables, initial.non_trainable_variables),
        "local_copies_equal": local_copies_equal(double),
        "evaluation_logits": difference([single(test_x, training=False)], [double(test_x, training=False)]),
        "steps": [int(np.asarray(m.optimizer.iterations)) for m in (single, double)],
        "sequential_vs_mean": difference(expected_moving, expected_mean),
    }
    # The same step with moving_statistics="mean": one update with the mean of the four micro-batches' moments.
    mean_single = compiled(fc6(ghost_batch_size=256, moving_statistics="mean"))
    mean_single.fit(x, y, batch_size=1024, epochs=1, shuffle=False, verbose=0)
    mean_double = compiled(fc6(strategy.scope(), ghost_batch_size=256, moving_statistics="mean"), strategy.scope())
    one_step_on_two_replicas(mean_double, x, y)
    report["b_mean"] = {"moving_vs_reference": difference(mean_double.non_trainable_variables, expected_mean),
                        "vs_one_device": difference(mean_single.weights, mean_double.weights),
                        "local_copies_equal": local_copies_equal(mean_double)}

    # (c) batch 16384 in ghost batches of 256: 64 on one device, 32 on each of 2 replicas.
    x = rng.normal(size=(16384, 10, 10, 1)).astype(np.float32)
    y = rng.integers(0, 10, 16384).astype(np.int32)
    single = compiled(fc6(ghost_batch_size=256))
    single.fit(x, y, batch_size=16384, epochs=1, shuffle=False, verbose=0)
    double = compiled(fc6(strategy.scope(), ghost_batch_size=256), strategy.scope())
    one_step_on_two_replicas(double, x, y)
    report["c"] = {"vs_one_device": difference(single.weights, double.weights),
                   "moved": difference(double.weights, fc6().weights), "local_copies_equal": local_copies_equal(double)}

    # (4) The tracker with the same weights on 1 device and split over 2 replicas (uneven parts: 1001 and 333
    # examples in forward passes of 300).
    train = (rng.normal(size=(1001, 10, 10, 1)).astype(np.float32), rng.integers(0, 10, 1001).astype(np.int32))
    test = (rng.normal(size=(333, 10, 10, 1)).astype(np.float32), rng.integers(0, 10, 333).astype(np.int32))
    values = []
    for model in (single, double):
        # With the noisy error on: each example's draws are cut with it, so the replicas see the same noise.
        tracker = callbacks.AltLossTracker(train, test, batch_size=300, steps_per_epoch=1, noisy_error_draws=16,
                                           noise_seed=1)
        tracker.set_model(model)
        values.append({split: tracker.evaluate(split) for split in ("train", "test")})
    report["tracker"] = {"one_device": values[0], "two_replicas": values[1],
                         "distributed": double.distribute_strategy.num_replicas_in_sync == 2}
    print("REPORT " + json.dumps(report))
    """
)


@pytest.fixture(scope="module")
def two_replica_report():
    done = subprocess.run([sys.executable, "-c", CHECKS], capture_output=True, text=True, timeout=600, env=_env(),
                          cwd=ROOT)
    assert done.returncode == 0, done.stderr[-4000:]
    return json.loads(done.stdout.splitlines()[-1][len("REPORT "):])


def test_without_batch_norm_two_replicas_take_keras_own_step(two_replica_report):
    a = two_replica_report["a"]
    assert two_replica_report["replicas"] == 2
    assert a["moved"] > 1e-3 and a["difference"] < 1e-6 + 1e-5 * a["moved"]


def test_with_ghost_batch_norm_two_replicas_equal_the_micro_batch_reference(two_replica_report):
    b = two_replica_report["b"]
    assert b["steps"] == [1, 1]
    assert b["moved"] > 1e-4 and b["moving_moved"] > 1e-4  # a real step, and moving statistics that moved
    assert b["trainable_vs_reference"] < 2e-6, b
    assert b["moving_vs_reference"] < 2e-6, b
    assert b["vs_one_device"] < 2e-6, b
    assert b["local_copies_equal"]  # no drift between replicas
    assert b["evaluation_logits"] < 1e-5, b
    # Sequential and mean updates differ by more than the tolerance: the test tells them apart.
    assert b["sequential_vs_mean"] > 1e-4, b
    mean = two_replica_report["b_mean"]
    assert mean["moving_vs_reference"] < 2e-6 and mean["vs_one_device"] < 2e-6 and mean["local_copies_equal"], mean


def test_a_16384_batch_on_two_replicas_equals_one_device(two_replica_report):
    c = two_replica_report["c"]
    assert c["moved"] > 1e-3 and c["vs_one_device"] < 2e-6, c
    assert c["local_copies_equal"]


def test_the_tracker_gives_the_same_record_on_two_replicas(two_replica_report):
    tracker = two_replica_report["tracker"]
    assert tracker["distributed"]
    for split in ("train", "test"):
        one, two = tracker["one_device"][split], tracker["two_replicas"][split]
        assert one.keys() == two.keys() and len(one) > 20 and "noisy_error@1" in one
        for name in one:
            np.testing.assert_allclose(two[name], one[name], rtol=2e-6, atol=1e-7, err_msg=f"{split} {name}")


# --------------------------------------------------------------------------- #
# run.py under MirroredStrategy on 2 CPU devices: trains, resumes, and is the run of one device
# --------------------------------------------------------------------------- #
def _start(args, **env):
    return subprocess.Popen([sys.executable, SCRIPT, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=_env(**env), cwd=ROOT)


def _finish(process, timeout=300):
    stdout, stderr = process.communicate(timeout=timeout)
    return process.returncode, stdout, stderr


def _assert_same_records(records, reference, rtol, atol, error_atol):
    """``error_atol``: a number, or one per split (a changed prediction moves a split's error by 1 / its size)."""
    assert [(r["step"], r["split"]) for r in records] == [(r["step"], r["split"]) for r in reference]
    for record, expected in zip(records, reference):
        for name, value in expected.items():
            if name in ("epoch", "step", "split"):
                assert record[name] == value
            else:
                split_atol = error_atol[expected["split"]] if isinstance(error_atol, dict) else error_atol
                tolerance = split_atol if name == "error" else atol
                np.testing.assert_allclose(record[name], value, rtol=rtol, atol=tolerance,
                                           err_msg=f"step {expected['step']} {expected['split']} {name}")


def test_run_py_mirrored_trains_resumes_and_equals_one_device(idx_dir, tmp_path):
    common = ["--data-dir", idx_dir, "--batch-size", "128", "--ghost-batch-size", "64", "--epochs", "4",
              "--track-every", "3", "--no-progress"]
    one_device = _start([*common, "--out", str(tmp_path / "one")])
    mirrored = [*common, "--strategy", "mirrored", "--cpu-replicas", "2", "--out", str(tmp_path / "two")]
    killed = _start(mirrored)
    kill_9_after_the_first_epoch(killed, str(tmp_path / "two"), timeout=240)
    code, stdout, stderr = _finish(_start(mirrored))
    assert code == 0, stderr[-3000:]
    assert f"resuming {tmp_path / 'two'} from epoch " in stdout
    code, _, stderr = _finish(one_device)
    assert code == 0, stderr[-3000:]
    records = read_records(tmp_path / "two")
    assert read_json(tmp_path / "two", "status.json")["state"] == "finished"
    assert read_json(tmp_path / "two", "config.json")["strategy"] == "mirrored"
    # The same run to float32 rounding (2 replicas add gradients in another order), over 36 steps.
    _assert_same_records(records, read_records(tmp_path / "one"), rtol=1e-4, atol=1e-5,
                          error_atol={"train": 2 / 1200, "test": 2 / 200})


# --------------------------------------------------------------------------- #
# run.py under MultiWorkerMirroredStrategy: 2 workers on 127.0.0.1
# --------------------------------------------------------------------------- #
def _free_ports(count):
    sockets = [socket.socket() for _ in range(count)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


def _workers(args, chief_out, other_out):
    """Worker 0 (the chief) writing ``chief_out`` and worker 1 given ``other_out`` (which it must never write)."""
    ports = _free_ports(2)
    cluster = {"worker": [f"127.0.0.1:{port}" for port in ports]}
    return [_start([*args, "--out", str(out)], TF_CONFIG=json.dumps({"cluster": cluster,
                                                                    "task": {"type": "worker", "index": index}}))
            for index, out in ((0, chief_out), (1, other_out))]


def test_run_py_multiworker_writes_once_survives_kill_9_and_resumes(idx_dir, tmp_path):
    args = ["--data-dir", idx_dir, "--batch-size", "128", "--ghost-batch-size", "64", "--epochs", "3",
            "--track-every", "3", "--track-levels", "2.0", "--strategy", "multiworker", "--no-progress"]
    whole, killed, elsewhere = tmp_path / "whole", tmp_path / "killed", tmp_path / "worker1"

    results = [_finish(process, timeout=120) for process in _workers(args, whole, elsewhere)]
    assert [code for code, _, _ in results] == [0, 0], results[0][2][-3000:] + results[1][2][-3000:]
    assert read_json(whole, "status.json")["state"] == "finished"
    assert sorted(os.listdir(whole)) == [".lock", "checkpoint.npz", "checkpoint.prev.npz", "config.json",
                                         "metrics.jsonl", "status.json", "tb"]
    assert not elsewhere.exists()  # only the chief writes
    assert "the chief writes" in results[1][1]

    # Worker 1 killed in the middle of epoch 2 (once a point of it is tracked, after the epoch-1 checkpoint): the
    # chief stops with one clear line, its files whole.
    chief, worker = _workers(args, killed, elsewhere)
    steps_per_epoch = 1200 // 128  # 9: points at steps 0, 3, 6, 9 (the checkpoint), 12, ...
    deadline = time.time() + 120
    while time.time() < deadline and worker.poll() is None:
        if (killed / "metrics.jsonl").exists() and (killed / "metrics.jsonl").read_text().count("\n") >= 2 * 5:
            break
        time.sleep(0.02)
    assert worker.poll() is None, "the run finished before worker 1 could be killed"
    worker.send_signal(signal.SIGKILL)
    worker.wait()
    started = time.time()
    code, _, stderr = _finish(chief, timeout=120)
    assert code == 4 and time.time() - started < 60, stderr[-3000:]
    errors = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "another worker stopped or cannot be reached" in errors[0], stderr[-3000:]
    assert "Rerun the same command on every worker" in errors[0]
    status = read_json(killed, "status.json")
    assert status["state"] == "running" and status["epoch"] == 1
    with np.load(killed / "checkpoint.npz") as checkpoint:
        assert json.loads(bytes(checkpoint["meta"]).decode())["epoch"] == 1
    assert status["step"] == steps_per_epoch
    assert len(read_records(killed)) >= 2 * 5  # a point of epoch 2, after the checkpoint

    # The same commands again: the run resumes from the checkpoint to the uninterrupted run's records.
    results = [_finish(process, timeout=120) for process in _workers(args, killed, elsewhere)]
    assert [code for code, _, _ in results] == [0, 0], results[0][2][-3000:]
    assert f"resuming {killed} from epoch 1" in results[0][1]
    _assert_same_records(read_records(killed), read_records(whole), rtol=1e-6, atol=1e-7, error_atol=0)
    assert not elsewhere.exists()
