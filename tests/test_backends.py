"""The protocol on the JAX backend: run.py end to end, kill -9 and resume, ghost batches, no TensorFlow.

Keras picks its backend once per process, so each case runs in a child process with KERAS_BACKEND=jax (the
formula, panel, metric and tracker tests themselves run on JAX in a second pytest session: see .ci/run).
"""

import json
import os
import subprocess
import sys
import textwrap

from tests.runs import kill_9_after_the_first_epoch, read_json, read_records

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "experiments", "run.py")

# run.py's main in a child where TensorFlow cannot be imported (as on the GPU machines, which have JAX but
# no TensorFlow; Keras' own set_random_seed imports TensorFlow whenever it is installed), then whether
# anything imported it (the last line of stdout).
RUN_AND_REPORT = textwrap.dedent(
    """
    import importlib.abc, importlib.util, json, sys

    class NoTensorFlow(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name == "tensorflow" or name.startswith("tensorflow."):
                raise ModuleNotFoundError(f"No module named {name!r} (hidden by the test)")
            return None

    sys.meta_path.insert(0, NoTensorFlow())
    spec = importlib.util.spec_from_file_location("run", sys.argv[1])
    run = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(run)
    code = run.main(json.loads(sys.argv[2]))
    print("REPORT " + json.dumps({"code": code, "tensorflow": "tensorflow" in sys.modules}))
    """
)


def _env(**extra):
    env = {k: v for k, v in os.environ.items() if k != "KERAS_BACKEND"}
    return {**env, "TF_CPP_MIN_LOG_LEVEL": "2", "PYTHONPATH": ROOT, **extra}


def _run(args, timeout=300):
    done = subprocess.run([sys.executable, "-c", RUN_AND_REPORT, SCRIPT, json.dumps(args)], capture_output=True,
                          text=True, timeout=timeout, env=_env(), cwd=ROOT)
    assert done.returncode == 0, done.stderr[-3000:]
    lines = done.stdout.splitlines()
    return json.loads(lines[-1][len("REPORT "):]), lines[:-1]


def test_run_py_on_jax_end_to_end_without_tensorflow(idx_dir, tmp_path):
    out = str(tmp_path / "run")
    args = ["--backend", "jax", "--dataset", "mnist", "--data-dir", idx_dir, "--epochs", "2", "--batch-size", "128",
            "--ghost-batch-size", "64", "--no-progress", "--out", out]
    report, lines = _run(args)
    assert report == {"code": 0, "tensorflow": False}
    assert [line.split(" | ")[0] for line in lines[:3]] == ["epoch 0/2", "epoch 1/2", "epoch 2/2"]
    assert "train ce" in lines[2] and "test ce" in lines[2] and lines[-1].startswith(f"finished {out}")
    assert read_json(out, "status.json") == {"state": "finished", "epoch": 2, "step": 18, "message": "2 epochs"}
    records = read_records(out)
    assert [r["step"] for r in records] == [0, 0, 9, 9, 18, 18]
    assert records[-2]["ce"] < records[0]["ce"]  # it learned
    versions = read_json(out, "config.json")["versions"]
    assert versions["backend"] == "jax" and versions["jax"] and "tensorflow" not in versions
    assert any(name.startswith("events.out.tfevents") for name in os.listdir(os.path.join(out, "tb")))

    # The same directory on another backend is refused with one line, before anything is trained.
    done = subprocess.run([sys.executable, SCRIPT, *args[2:]], capture_output=True, text=True, timeout=300,
                          env=_env(KERAS_BACKEND="tensorflow"), cwd=ROOT)
    assert done.returncode == 1 and "was trained on the jax backend" in done.stderr
    assert len(read_records(out)) == 6


def test_kill_9_and_resume_on_jax_equals_an_uninterrupted_run(idx_dir, tmp_path):
    args = ["--backend", "jax", "--dataset", "mnist", "--data-dir", idx_dir, "--epochs", "4", "--batch-size", "32",
            "--ghost-batch-size", "32", "--track-every", "5", "--deterministic", "--no-progress"]
    killed = str(tmp_path / "killed")
    process = subprocess.Popen([sys.executable, SCRIPT, *args, "--out", killed], stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL, env=_env(), cwd=ROOT)
    kill_9_after_the_first_epoch(process, killed, timeout=240)
    before = read_records(killed)

    report, lines = _run([*args, "--out", killed])
    assert report["code"] == 0 and lines[0].startswith(f"resuming {killed} from epoch ")
    after = read_records(killed)
    assert len(before) < len(after)
    steps = [(r["step"], r["split"]) for r in after]
    assert len(steps) == len(set(steps))  # nothing logged twice
    whole = str(tmp_path / "whole")
    assert _run([*args, "--out", whole])[0]["code"] == 0
    assert after == read_records(whole)  # bit for bit


GHOST_BATCHES = textwrap.dedent(
    """
    import json
    import keras, numpy as np
    from keras_implicit import training

    def mlp(seed, batch_norm):
        keras.utils.set_random_seed(seed)
        inputs = keras.Input((20,))
        x = keras.layers.Dense(32)(inputs)
        if batch_norm:
            x = keras.layers.BatchNormalization()(x)
        return keras.Model(inputs, keras.layers.Dense(10)(keras.layers.ReLU()(x)))

    rng = np.random.default_rng(0)
    x = rng.normal(size=(3 * 1024, 20)).astype(np.float32)
    y = rng.integers(0, 10, 3 * 1024).astype(np.int32)
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    out = {"backend": keras.backend.backend()}
    for optimizer in ("sgd", "adam"):
        accumulated, large = mlp(1, False), mlp(1, False)
        accumulated.compile(training.make_optimizer(optimizer, 0.05, accumulation_steps=4), loss)
        large.compile(training.make_optimizer(optimizer, 0.05), loss)
        accumulated.fit(x, y, batch_size=256, epochs=1, shuffle=False, verbose=0)
        large.fit(x, y, batch_size=1024, epochs=1, shuffle=False, verbose=0)
        out[optimizer] = {
            "iterations": [int(np.asarray(m.optimizer.iterations)) for m in (accumulated, large)],
            "max_difference": max(float(np.abs(np.asarray(a) - np.asarray(b)).max())
                                  for a, b in zip(accumulated.weights, large.weights)),
            "moved": max(float(np.abs(np.asarray(a) - np.asarray(b)).max())
                         for a, b in zip(accumulated.weights, mlp(1, False).weights)),
        }
    # Ghost batch norm: with BatchNormalization each micro-batch of 256 is normalized on its own, so the
    # accumulated step differs from one step on 1024 (the point of ghost batches), and its moving statistics
    # are updated once per micro-batch.
    ghost, large = mlp(2, True), mlp(2, True)
    ghost.compile(training.make_optimizer("sgd", 0.05, accumulation_steps=4), loss)
    large.compile(training.make_optimizer("sgd", 0.05), loss)
    ghost.fit(x[:1024], y[:1024], batch_size=256, epochs=1, shuffle=False, verbose=0)
    large.fit(x[:1024], y[:1024], batch_size=1024, epochs=1, shuffle=False, verbose=0)
    out["batch_norm_difference"] = max(float(np.abs(np.asarray(a) - np.asarray(b)).max())
                                       for a, b in zip(ghost.trainable_weights, large.trainable_weights))
    print("REPORT " + json.dumps(out))
    """
)


def test_ghost_batches_on_jax_are_accumulated_gradients():
    done = subprocess.run([sys.executable, "-c", GHOST_BATCHES], capture_output=True, text=True, timeout=300,
                          env=_env(KERAS_BACKEND="jax"), cwd=ROOT)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout.splitlines()[-1][len("REPORT "):])
    assert report["backend"] == "jax"
    for optimizer in ("sgd", "adam"):
        # Three updates each: iterations counts large-batch steps; the weights agree to float32 round-off.
        assert report[optimizer]["iterations"] == [3, 3]
        assert report[optimizer]["moved"] > 1e-3
        assert report[optimizer]["max_difference"] < 2e-5 * max(1.0, report[optimizer]["moved"]) + 2e-6
    assert report["batch_norm_difference"] > 1e-4


def test_gpu_script_rehearses_on_cpu(tmp_path):
    """benchmarks/gpu/measure.py (run by benchmarks/gpu/run.sh on a GPU machine) in its --quick mode on the CPU."""
    out = tmp_path / "gpu.json"
    done = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "gpu", "measure.py"), "--quick",
                           "--out", str(out)], capture_output=True, text=True, timeout=600,
                          env=_env(KERAS_BACKEND="jax", JAX_PLATFORMS="cpu"), cwd=ROOT)
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads(out.read_text())
    assert results["device"]["platform"] == "cpu" and results["quick"] is True
    assert [(r["batch_size"], r["ghost_batch_size"]) for r in results["fc6"]] == [(256, 256), (256, 256), (1024, 256)]
    assert all(r["steps_per_second"] > 0 for r in results["fc6"] + results["c1"])
    assert results["tracking"]["seconds_min"] > 0
    assert results["run_py"]["final"]["train"]["ce"] < 2.31 and len(results["run_py"]["summary"]) == 4
